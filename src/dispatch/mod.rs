//! Dispatch: runs each (delivery, handler) pair until it succeeds once.
//!
//! The queue lives in the store, one per handler ordered by due time, and its entries are
//! written with the claim, before the acknowledgement; the [`Dispatcher`] reads, in turns,
//! only the front of the queues of the handlers that may start a run now (not paused,
//! under their `concurrency` and `rate`), so a held-back handler's backlog costs nothing. A
//! run is counted *before* the handler starts ([`JobQueue::begin_attempt`](crate::store::JobQueue::begin_attempt): durably
//! with PostgreSQL; in memory with sled, where a crash is counted at the next opening
//! instead) and its queue entry stays until the outcome is recorded, so a crash mid-run
//! leaves the entry due: on the next start the pair runs again with `attempt + 1` and the
//! same idempotency key. Start-up therefore costs what is queued, not what is stored.
//!
//! What a pass costs is kept off the number of runs in flight, since the entries being
//! run stay at the front of the queue: with a store of this process alone the dispatcher
//! reads [`READ_AHEAD`] due entries at once and starts them as slots free up, the next
//! read starts past the last entry read (and from the front at least every
//! half a second, and at once when nothing of the handler is in flight), the same read
//! tells when to look next, and skipped entries
//! are recognised by their raw keys ([`crate::store::SkipSet`]). Whatever went stale in
//! between is caught by `begin_attempt`, under the delivery's lock.
//!
//! Failures back off exponentially with jitter ([`backoff`]); after `max_attempts`, or a
//! [`HandlerError::Permanent`](crate::handlers::HandlerError::Permanent), the pair is dead-lettered and kept.
//!
//! Where things are: [`runner`] runs one pair once (its turn, its start, the handler under
//! a fenced lease, the outcome); [`turns`] is each handler's `concurrency` and `rate`, the
//! one gate every run of this process goes through; [`dispatcher`] is the loop that reads
//! the queues and hands due pairs to the runner; [`retry`] decides what a failure becomes;
//! [`hold`] keeps a lease while work runs.

pub mod dispatcher;
pub mod hold;
pub mod retry;
pub mod runner;
pub mod turns;

pub use dispatcher::{Dispatcher, READ_AHEAD, SHARED_STORE_POLL};
pub use hold::{Held, hold_lease};
pub use retry::backoff;
pub use runner::{RunResult, Runner};
pub use turns::{Entered, RateTurn, Turn, Turns};
