//! Leases and their fencing (design.md, invariant 6), written once for every backend.
//!
//! Two kinds of hold exist: the *run lease* of a (delivery, handler) pair while its handler
//! runs ([`super::JobState::lease`]), and the *processed lease* of an `ack = "processed"`
//! delivery while its sender waits ([`DeliveryRecord::lease_until_ms`] and
//! [`DeliveryRecord::lease_owner`]). A lease is only as good as its holder's knowledge that
//! it still holds it, so each has three rules:
//!
//! 1. **The holder stops in time.** It renews every third of the lease; when it can no
//!    longer prove it holds it (the end of the last lease it wrote, minus
//!    [`lease_margin`], has passed without a successful renewal) it cancels its handler, and
//!    by the lease's end it has dropped the run and reports no outcome
//!    (`crate::dispatch::hold_lease`).
//! 2. **Nobody takes over early.** A lapsed lease is taken over only once
//!    [`TAKE_OVER_GRACE_MS`] past its end: longer than any margin, so the old holder has
//!    stopped by then even with a second of clock skew between replicas.
//! 3. **Only the owner renews or releases.** The store's condition names the owner (and, for
//!    a run, the attempt number, a token that only grows): the old holder can neither
//!    extend nor clear the lease of the one that took over.
//!
//! The processed lease's transitions are pure functions of the record here, applied by
//! sled under the delivery's lock and by PostgreSQL under the row's lock.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DeliveryRecord, StoredResponse, TakeOver};

/// How long past a lease's end another runner must wait before taking it over. Longer than
/// the largest [`lease_margin`] (1 s): the holder has stopped its handler by the lease's
/// end, and this leaves a second more for clock skew between replicas.
pub const TAKE_OVER_GRACE_MS: u64 = 2_000;

/// How long before its lease ends a holder that could not renew cancels its handler: a
/// quarter of the lease, at most a second (so always shorter than [`TAKE_OVER_GRACE_MS`]).
pub fn lease_margin(lease: Duration) -> Duration {
    (lease / 4).min(Duration::from_secs(1))
}

/// A runner's hold on a running pair, or a sender's on a processed-mode delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it: for a run, the store instance (process); for a processed-mode
    /// delivery, a random token of the request that took it.
    pub owner: u64,
    /// Until when it holds, ms since the epoch.
    pub until_ms: u64,
}

impl Lease {
    /// Whether nobody else may take it at `now_ms`: it is live, or lapsed less than
    /// [`TAKE_OVER_GRACE_MS`] ago (its holder may still be stopping).
    pub fn blocks_at(&self, now_ms: u64) -> bool {
        self.taken_over_from() > now_ms
    }

    /// When another runner may take it over.
    pub fn taken_over_from(&self) -> u64 {
        self.until_ms.saturating_add(TAKE_OVER_GRACE_MS)
    }

    /// A fresh random owner token (processed-mode leases).
    pub fn new_owner() -> u64 {
        // Never 0: records written before owners existed read as owner 0.
        rand::random::<u64>().max(1)
    }
}

impl DeliveryRecord {
    /// `ack = "processed"`: who holds the unfinished delivery, and until when.
    pub fn processed_lease(&self) -> Option<Lease> {
        self.lease_until_ms.map(|until_ms| Lease {
            owner: self.lease_owner.unwrap_or(0),
            until_ms,
        })
    }

    fn set_processed_lease(&mut self, lease: Option<Lease>) {
        self.lease_until_ms = lease.map(|l| l.until_ms);
        self.lease_owner = lease.map(|l| l.owner);
    }

    /// Takes an unfinished processed-mode delivery over for `lease` at `now_ms`, unless it
    /// is final or someone holds it (live, or lapsed within the grace). `.1`: whether the
    /// record changed.
    pub fn take_over(&mut self, now_ms: u64, lease: Lease) -> (TakeOver, bool) {
        if self.response.is_some() {
            return (TakeOver::Final(self.clone()), false);
        }
        if let Some(held) = self.processed_lease()
            && held.blocks_at(now_ms)
        {
            return (
                TakeOver::Held {
                    until_ms: held.taken_over_from(),
                },
                false,
            );
        }
        self.set_processed_lease(Some(lease));
        (TakeOver::Acquired(self.clone()), true)
    }

    /// Extends the processed lease to `lease.until_ms` if `lease.owner` still holds it and
    /// the delivery is not final; false (nothing changed) otherwise.
    pub fn renew_processed_lease(&mut self, lease: Lease) -> bool {
        match self.processed_lease() {
            Some(held) if held.owner == lease.owner && self.response.is_none() => {
                self.set_processed_lease(Some(lease));
                true
            }
            _ => false,
        }
    }

    /// Ends `owner`'s processed lease, storing the final `response` if there is one; false
    /// (nothing changed) when `owner` no longer holds it.
    pub fn release_processed_lease(
        &mut self,
        owner: u64,
        response: Option<StoredResponse>,
    ) -> bool {
        match self.processed_lease() {
            Some(held) if held.owner == owner && self.response.is_none() => {
                self.set_processed_lease(None);
                if response.is_some() {
                    self.response = response;
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DeliveryRecord;

    fn record(lease: Option<Lease>) -> DeliveryRecord {
        let mut r = DeliveryRecord {
            source: "s".into(),
            id: "i".into(),
            fingerprint: String::new(),
            received_at_ms: 0,
            event_type: None,
            headers: Default::default(),
            response: None,
            lease_until_ms: None,
            lease_owner: None,
            handlers: vec!["h".into()],
            body_dedup: false,
            alias_of: None,
            order_keys: Default::default(),
            trace_parent: None,
        };
        r.set_processed_lease(lease);
        r
    }

    const A: u64 = 7;
    const B: u64 = 9;

    #[test]
    fn a_lapsed_lease_is_taken_over_only_after_the_grace() {
        let mut r = record(Some(Lease {
            owner: A,
            until_ms: 1_000,
        }));
        let b = Lease {
            owner: B,
            until_ms: 50_000,
        };
        assert!(
            matches!(r.take_over(999, b), (TakeOver::Held { until_ms }, false) if until_ms == 1_000 + TAKE_OVER_GRACE_MS)
        );
        assert!(matches!(
            r.take_over(1_000 + TAKE_OVER_GRACE_MS - 1, b),
            (TakeOver::Held { .. }, false)
        ));
        assert!(matches!(
            r.take_over(1_000 + TAKE_OVER_GRACE_MS, b),
            (TakeOver::Acquired(_), true)
        ));
        assert_eq!(r.processed_lease(), Some(b));
    }

    #[test]
    fn only_the_owner_renews_or_releases() {
        let a = Lease {
            owner: A,
            until_ms: 1_000,
        };
        let mut r = record(Some(Lease {
            owner: B,
            until_ms: 5_000,
        }));
        let before = r.clone();
        assert!(!r.renew_processed_lease(Lease {
            until_ms: 9_000,
            ..a
        }));
        assert!(!r.release_processed_lease(
            A,
            Some(StoredResponse {
                status: 200,
                body: "{}".into()
            })
        ));
        assert_eq!(r, before, "a non-owner changes nothing");
        assert!(r.renew_processed_lease(Lease {
            owner: B,
            until_ms: 9_000
        }));
        assert_eq!(r.lease_until_ms, Some(9_000));
        assert!(r.release_processed_lease(B, None));
        assert_eq!(r.processed_lease(), None);
        assert!(!r.release_processed_lease(B, None), "released once");
    }

    #[test]
    fn a_final_delivery_is_neither_taken_nor_renewed() {
        let mut r = record(None);
        r.response = Some(StoredResponse {
            status: 200,
            body: "{}".into(),
        });
        let lease = Lease {
            owner: A,
            until_ms: 1,
        };
        assert!(matches!(r.take_over(0, lease), (TakeOver::Final(_), false)));
        assert!(!r.renew_processed_lease(lease));
    }

    #[test]
    fn the_margin_is_shorter_than_the_grace() {
        for secs in [1, 2, 3, 9, 30, 3600] {
            let m = lease_margin(Duration::from_secs(secs));
            assert!(m > Duration::ZERO && m.as_millis() < TAKE_OVER_GRACE_MS as u128);
        }
    }
}
