//! A handler's turn: its `concurrency` and `rate`, taken *before* a run starts and holding
//! no lease (design.md, invariant 6 and "Delivery control").
//!
//! One gate per handler, shared by every run of this process (the dispatcher's and the
//! processed-mode inline runs): a concurrency slot (a semaphore permit, held until the run
//! ends), then the rate's spacing (the start is delayed until the previous start plus the
//! rate's interval, a burst of one). With a store that several processes share
//! (PostgreSQL) both hold across all of them: the spacing is reserved in the store
//! ([`JobQueue::reserve_start`]), and the store counts the handler's live run leases
//! when it starts a run ([`JobQueue::begin_limited_attempt`]). Only then is the lease
//! taken, so a run waiting for its turn never holds one that could lapse under it.
//!
//! The spacing is kept here only: the dispatcher's loop asks [`Turns::rate_turn`] whether a
//! rate-limited handler may be handed a run now, and a run handed out is counted as waiting
//! ([`Turns::enter`]) from that moment, before its task first runs, so that the loop hands
//! out one run per rate turn and no more.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::collections::FastHashMap;
use crate::handlers::HandlerRegistry;
use crate::store::{JobQueue, StoreError};

/// Every handler's gate.
pub struct Turns {
    slots: FastHashMap<String, Arc<Semaphore>>,
    concurrency: FastHashMap<String, usize>,
    intervals: FastHashMap<String, Duration>,
    /// Per rate-limited handler, when its next start may be: this process's own spacing,
    /// or, where the store keeps the spacing for every process, the slot after the last one
    /// this process reserved (no start of this process comes earlier).
    next_start: std::sync::Mutex<FastHashMap<String, Instant>>,
    /// Per rate-limited handler, the runs handed out that have not had their rate turn yet.
    waiting: FastHashMap<String, Arc<AtomicUsize>>,
    /// Fired when a run handed out got its rate turn or gave up waiting for it: the next
    /// one may be handed out.
    turn_taken: Arc<Notify>,
    store: Arc<dyn JobQueue>,
    clock: Clock,
}

/// Where a handler's rate stands, for the loop that hands out runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateTurn {
    /// No `rate`: as many runs as its other limits allow.
    Unlimited,
    /// One run may be handed out now.
    Free,
    /// Not before this time (ms since the epoch).
    At(u64),
    /// A run handed out waits for its turn: none more until it has it
    /// ([`Turns::turn_taken`]).
    Waiting,
}

/// A run handed out and not yet through its rate turn (counted by [`Turns::rate_turn`]);
/// spent by [`Turns::take`], or dropped with the run.
#[derive(Debug)]
pub struct Entered {
    waiting: Option<(Arc<AtomicUsize>, Arc<Notify>)>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Some((waiting, turn_taken)) = self.waiting.take() {
            waiting.fetch_sub(1, Ordering::SeqCst);
            turn_taken.notify_one();
        }
    }
}

/// A handler's turn: its concurrency slot, released when dropped (at the run's end).
#[derive(Debug)]
pub struct Turn {
    _slot: Option<OwnedSemaphorePermit>,
}

impl Turns {
    /// The gates of every handler in `registry`.
    pub fn new(registry: &HandlerRegistry, store: Arc<dyn JobQueue>, clock: Clock) -> Turns {
        let mut slots = FastHashMap::default();
        let mut concurrency = FastHashMap::default();
        let mut intervals = FastHashMap::default();
        let mut waiting = FastHashMap::default();
        for (name, limits) in registry.limits() {
            if let Some(n) = limits.concurrency {
                slots.insert(name.to_owned(), Arc::new(Semaphore::new(n)));
                concurrency.insert(name.to_owned(), n);
            }
            if let Some(rate) = limits.rate {
                intervals.insert(name.to_owned(), rate.interval());
                waiting.insert(name.to_owned(), Arc::default());
            }
        }
        Turns {
            slots,
            concurrency,
            intervals,
            next_start: Default::default(),
            waiting,
            turn_taken: Arc::new(Notify::new()),
            store,
            clock,
        }
    }

    /// A run of `handler` handed out: counted as waiting for its rate turn until
    /// [`Turns::take`] has it.
    pub fn enter(&self, handler: &str) -> Entered {
        let waiting = self.waiting.get(handler).map(|waiting| {
            waiting.fetch_add(1, Ordering::SeqCst);
            (waiting.clone(), self.turn_taken.clone())
        });
        Entered { waiting }
    }

    /// Whether the loop may hand out a run of `handler` now, as far as its `rate` goes.
    pub fn rate_turn(&self, handler: &str, now_ms: u64) -> RateTurn {
        let Some(waiting) = self.waiting.get(handler) else {
            return RateTurn::Unlimited;
        };
        if waiting.load(Ordering::SeqCst) > 0 {
            return RateTurn::Waiting;
        }
        let next = self.next_start.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match next.get(handler) {
            Some(&at) if at > now => RateTurn::At(now_ms + (at - now).as_millis() as u64),
            _ => RateTurn::Free,
        }
    }

    /// Fires when a run handed out got its rate turn or gave up waiting for it (then
    /// [`Turns::rate_turn`] has changed).
    pub async fn turn_taken(&self) {
        self.turn_taken.notified().await;
    }

    /// Waits for `handler`'s turn (`entered`: [`Turns::enter`]'s for this run). With
    /// `wait`, gives up (`None`) when the turn would come later than that from now; a rate
    /// turn reserved in a shared store is then spent.
    pub async fn take(
        &self,
        handler: &str,
        entered: Entered,
        wait: Option<Duration>,
    ) -> Result<Option<Turn>, StoreError> {
        let deadline = wait.map(|w| Instant::now() + w);
        let slot = match self.slots.get(handler) {
            None => None,
            Some(slots) => {
                let acquire = slots.clone().acquire_owned();
                let permit = match deadline {
                    None => acquire.await,
                    Some(at) => match tokio::time::timeout_at(at, acquire).await {
                        Ok(permit) => permit,
                        Err(_) => return Ok(None),
                    },
                };
                // The semaphore is never closed.
                permit.ok()
            }
        };
        if let Some(&interval) = self.intervals.get(handler) {
            // A rate turn is a slot of time, not a ticket: a start woken too late for its
            // slot (a loaded machine, a slow store) would crowd the next slot's start, so
            // the slot is given up and a new one reserved. The lateness allowed grows with
            // each slot given up, so that a run on a machine that is always late still
            // starts.
            let mut allowed = interval / 4;
            loop {
                let Some(start) = self.reserve_start(handler, interval, deadline).await? else {
                    return Ok(None);
                };
                tokio::time::sleep_until(start).await;
                if Instant::now().saturating_duration_since(start) <= allowed {
                    break;
                }
                allowed = allowed.saturating_mul(2);
            }
        }
        // Through the rate: the next run may be handed out.
        drop(entered);
        Ok(Some(Turn { _slot: slot }))
    }

    /// When the next start of `handler` may be: reserved in the store when it keeps the
    /// spacing for every process, else in memory. `None`: later than `deadline`.
    async fn reserve_start(
        &self,
        handler: &str,
        interval: Duration,
        deadline: Option<Instant>,
    ) -> Result<Option<Instant>, StoreError> {
        let now_ms = self.clock.now_ms();
        if let Some(at_ms) = self
            .store
            .reserve_start(handler, interval.as_millis() as u64, now_ms)
            .await?
        {
            // From the clock as it is now the store answered, not as it was when asked: the
            // time the reservation took must not push the start past its slot.
            let waited = Duration::from_millis(at_ms.saturating_sub(self.clock.now_ms()));
            let at = Instant::now() + waited;
            let mut next = self.next_start.lock().unwrap_or_else(|p| p.into_inner());
            next.insert(handler.to_owned(), at + interval);
            return Ok(deadline.is_none_or(|d| at <= d).then_some(at));
        }
        let mut next = self.next_start.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let at = next.get(handler).map_or(now, |n| (*n).max(now));
        if deadline.is_some_and(|d| at > d) {
            return Ok(None);
        }
        next.insert(handler.to_owned(), at + interval);
        Ok(Some(at))
    }

    /// `handler`'s `concurrency`, if it has one.
    pub fn concurrency_of(&self, handler: &str) -> Option<usize> {
        self.concurrency.get(handler).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::{HandlerRegistry, Registration};

    /// Turns over a `paced` handler (2 starts a second) and a `free` one, on a store of
    /// this process alone (the spacing is kept here).
    fn turns(dir: &tempfile::TempDir) -> Turns {
        let config = crate::config::Config::parse("", "t.toml").expect("config");
        let handlers = vec![
            Registration::new("paced", crate::handlers::LogHandler)
                .rate("2/s".parse().expect("rate")),
            Registration::new("free", crate::handlers::LogHandler),
        ];
        let registry = HandlerRegistry::build(&config, handlers).expect("registry");
        let store = crate::store::SledStore::open(
            &dir.path().join("data"),
            crate::config::Durability::Buffered,
            1 << 20,
        )
        .expect("store");
        Turns::new(&registry, Arc::new(store), Clock::System)
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_handed_out_holds_the_rate_turn_until_it_has_it_then_the_next_slot_is_due() {
        let dir = tempfile::TempDir::new().expect("dir");
        let turns = Arc::new(turns(&dir));
        assert_eq!(turns.rate_turn("free", 0), RateTurn::Unlimited);
        assert_eq!(turns.rate_turn("paced", 0), RateTurn::Free);

        // Handed out: counted at once, before its task runs.
        let first = turns.enter("paced");
        assert_eq!(turns.rate_turn("paced", 0), RateTurn::Waiting);
        let turn = turns.take("paced", first, None).await.expect("turn");
        assert!(turn.is_some());
        // Through: the loop is told, and the next slot is half a second on.
        turns.turn_taken().await;
        assert_eq!(turns.rate_turn("paced", 1_000), RateTurn::At(1_500));

        // The second run waits for that slot; the loop hears when it has it.
        let second = turns.enter("paced");
        let taking = tokio::spawn({
            let turns = turns.clone();
            async move { turns.take("paced", second, None).await.map(|t| t.is_some()) }
        });
        let started = Instant::now();
        turns.turn_taken().await;
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        assert!(taking.await.expect("task").expect("turn"));
        assert!(matches!(turns.rate_turn("paced", 0), RateTurn::At(_)));

        // A run handed out and dropped before its turn (shutdown, an inline run that gave
        // up) gives the turn back, and says so.
        let third = turns.enter("paced");
        assert_eq!(turns.rate_turn("paced", 0), RateTurn::Waiting);
        drop(third);
        turns.turn_taken().await;
        assert_ne!(turns.rate_turn("paced", 0), RateTurn::Waiting);
    }
}
