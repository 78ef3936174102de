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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::handlers::HandlerRegistry;
use crate::store::{JobQueue, StoreError};

/// Every handler's gate.
pub struct Turns {
    slots: HashMap<String, Arc<Semaphore>>,
    concurrency: HashMap<String, usize>,
    intervals: HashMap<String, Duration>,
    /// Per rate-limited handler, when its next start may be (this process's own spacing,
    /// used where the store does not keep one for every process).
    next_start: std::sync::Mutex<HashMap<String, Instant>>,
    store: Arc<dyn JobQueue>,
    clock: Clock,
}

/// A handler's turn: its concurrency slot, released when dropped (at the run's end).
#[derive(Debug)]
pub struct Turn {
    _slot: Option<OwnedSemaphorePermit>,
}

impl Turns {
    /// The gates of every handler in `registry`.
    pub fn new(registry: &HandlerRegistry, store: Arc<dyn JobQueue>, clock: Clock) -> Turns {
        let mut slots = HashMap::new();
        let mut concurrency = HashMap::new();
        let mut intervals = HashMap::new();
        for (name, limits) in registry.limits() {
            if let Some(n) = limits.concurrency {
                slots.insert(name.to_owned(), Arc::new(Semaphore::new(n)));
                concurrency.insert(name.to_owned(), n);
            }
            if let Some(rate) = limits.rate {
                intervals.insert(name.to_owned(), rate.interval());
            }
        }
        Turns {
            slots,
            concurrency,
            intervals,
            next_start: Default::default(),
            store,
            clock,
        }
    }

    /// Waits for `handler`'s turn. With `wait`, gives up (`None`) when the turn would come
    /// later than that from now; a rate turn reserved in a shared store is then spent.
    pub async fn take(
        &self,
        handler: &str,
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
