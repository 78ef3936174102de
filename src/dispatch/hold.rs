//! Work under a lease, fenced (design.md, invariant 6; the rules in [`crate::store::lease`]).
//!
//! One helper for both leases a run can hold: a pair's run lease (the dispatcher's runs and
//! processed-mode inline runs) and a processed-mode delivery's lease (ingest). The holder
//! renews every third of the lease and keeps, on tokio's clock, the instant until which the
//! last successful write surely holds: the instant *before* that write was issued, plus the
//! lease. When that instant minus [`lease_margin`] passes without a newer successful
//! renewal (the store is unreachable, or slow), or a renewal says the lease is someone
//! else's, the work's cancellation token fires; whatever the work does then, it is dropped
//! by the lease's end, and its result is not reported. A taker waits until the lease's end
//! plus [`crate::store::TAKE_OVER_GRACE_MS`], so the two never overlap.

use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::store::{StoreError, lease_margin};

/// How work under a lease ended.
#[derive(Debug)]
pub enum Held<T> {
    /// The work finished while the lease was provably held: its result counts.
    Finished(T),
    /// The lease could not be proven held: the work was cancelled (and dropped, if it did
    /// not stop by the lease's end); nothing may be reported. The text says why.
    Lost(String),
}

/// Runs `work` while holding a lease of length `lease` that surely holds until `held_until`
/// (tokio's clock). `renew(until_ms)` extends it to `until_ms` (wall clock, from `clock`):
/// `Ok(true)` renewed, `Ok(false)` the lease is no longer ours, `Err` unknown. `cancel` is
/// the work's own cancellation token (a handler's `shutdown`).
pub async fn hold_lease<'a, T>(
    work: impl Future<Output = T>,
    lease: Duration,
    held_until: Instant,
    clock: Clock,
    cancel: &CancellationToken,
    mut renew: impl FnMut(u64) -> BoxFuture<'a, Result<bool, StoreError>>,
) -> Held<T> {
    let margin = lease_margin(lease);
    // The proof of the lease may already be spent before the work begins: a start that
    // took longer than the lease to commit (the database stalled, the start waited for its
    // batch). Then the work never begins: polled once, it may already have acted.
    if Instant::now() + margin >= held_until {
        let why = String::from("the lease could not be proven held when the work was to begin");
        tracing::warn!("{why}: not starting the work");
        return Held::Lost(why);
    }
    let every = lease / 3;
    let lease_ms = lease.as_millis() as u64;
    tokio::pin!(work);
    let mut held_until = held_until;
    // The lease's end as far as this holder goes: `held_until`, or sooner once it knows the
    // lease is gone.
    let mut stop_by = held_until;
    let mut next_renewal = Instant::now() + every;
    let mut renewal: Option<(Instant, BoxFuture<'a, Result<bool, StoreError>>)> = None;
    let mut stopping = false;
    let mut why = String::from("the lease could not be renewed in time");
    loop {
        let cancel_at = held_until.checked_sub(margin).unwrap_or(held_until);
        tokio::select! {
            biased;
            out = &mut work => {
                return if stopping { Held::Lost(why) } else { Held::Finished(out) };
            }
            result = async {
                match renewal.as_mut() {
                    Some((_, f)) => f.await,
                    None => std::future::pending().await,
                }
            }, if renewal.is_some() => {
                let issued = renewal.take().map_or_else(Instant::now, |(at, _)| at);
                match result {
                    Ok(true) if !stopping => {
                        held_until = issued + lease;
                        stop_by = held_until;
                    }
                    Ok(true) => {}
                    Ok(false) => {
                        why = "the lease was taken over or released by someone else".into();
                        tracing::warn!("{why}: stopping the work under it");
                        stopping = true;
                        cancel.cancel();
                        // Someone else may hold it now: only the time to stop cleanly.
                        stop_by = stop_by.min(Instant::now() + margin);
                    }
                    Err(e) => {
                        why = format!("the lease could not be renewed: {e}");
                        tracing::warn!(error = %e, "renewing a lease failed");
                    }
                }
                next_renewal = Instant::now() + every;
            }
            () = tokio::time::sleep_until(next_renewal), if renewal.is_none() && !stopping => {
                let issued = Instant::now();
                renewal = Some((issued, renew(clock.now_ms() + lease_ms)));
            }
            () = tokio::time::sleep_until(cancel_at), if !stopping => {
                tracing::warn!(reason = %why, "cannot prove the lease is still held: stopping the work under it");
                stopping = true;
                cancel.cancel();
            }
            () = tokio::time::sleep_until(stop_by) => {
                tracing::warn!(reason = %why, "the lease ended before the work stopped: dropped");
                return Held::Lost(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const LEASE: Duration = Duration::from_secs(9);

    /// What renewal `n` (from 0) answers: `None`, never.
    type Answers = fn(u32) -> Option<Result<bool, StoreError>>;

    /// Holds a [`LEASE`] over `work(token)` with renewals answered by `answer`: what
    /// `hold_lease` said, whether the token fired, how long it took, how many renewals.
    async fn hold<F: Future<Output = &'static str>>(
        work: impl FnOnce(CancellationToken) -> F,
        answer: Answers,
    ) -> (Held<&'static str>, bool, Duration, u32) {
        let token = CancellationToken::new();
        let start = Instant::now();
        let calls = AtomicU32::new(0);
        let out = hold_lease(
            work(token.clone()),
            LEASE,
            start + LEASE,
            Clock::tokio(),
            &token,
            |_| {
                let answer = answer(calls.fetch_add(1, Ordering::SeqCst));
                Box::pin(async move {
                    match answer {
                        Some(answer) => answer,
                        None => std::future::pending().await,
                    }
                })
            },
        )
        .await;
        let renewals = calls.load(Ordering::SeqCst);
        (out, token.is_cancelled(), start.elapsed(), renewals)
    }

    /// A handler that honours its token: stops when told, else runs `length`.
    fn handler(
        length: Duration,
    ) -> impl FnOnce(CancellationToken) -> BoxFuture<'static, &'static str> {
        move |token| {
            Box::pin(async move {
                tokio::select! {
                    () = tokio::time::sleep(length) => "done",
                    () = token.cancelled() => "stopped",
                }
            })
        }
    }

    fn unreachable(_: u32) -> Option<Result<bool, StoreError>> {
        Some(Err(StoreError::Backend("database unreachable".into())))
    }

    #[tokio::test(start_paused = true)]
    async fn renewed_work_runs_to_its_end() {
        let (out, cancelled, _, renewals) =
            hold(handler(Duration::from_secs(60)), |_| Some(Ok(true))).await;
        assert!(matches!(out, Held::Finished("done")), "{out:?}");
        assert!(renewals >= 60 / 3 - 1);
        assert!(!cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_renewals_cancel_the_work_before_the_lease_ends() {
        let (out, cancelled, took, _) = hold(handler(Duration::from_secs(60)), unreachable).await;
        assert!(matches!(out, Held::Lost(_)), "{out:?}");
        assert!(cancelled);
        assert!(took <= LEASE - lease_margin(LEASE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_hangs_proves_nothing_and_work_that_ignores_its_token_is_dropped() {
        let ignores_its_token = |_| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "done"
        };
        let (out, cancelled, took, _) = hold(ignores_its_token, |_| None).await;
        assert!(matches!(out, Held::Lost(_)), "{out:?}");
        assert!(cancelled);
        assert_eq!(took, LEASE, "dropped at the lease's end");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_taken_over_stops_the_work_at_once() {
        let (out, cancelled, took, _) =
            hold(handler(Duration::from_secs(60)), |_| Some(Ok(false))).await;
        assert!(matches!(out, Held::Lost(_)), "{out:?}");
        assert!(cancelled);
        assert_eq!(took, LEASE / 3, "at the first renewal");
    }

    #[tokio::test(start_paused = true)]
    async fn work_whose_lease_is_spent_before_it_begins_never_begins() {
        let token = CancellationToken::new();
        let began = std::sync::atomic::AtomicBool::new(false);
        // The start was issued a lease ago less half the margin: not provable any more.
        let held_until = Instant::now() + lease_margin(LEASE) / 2;
        let out = hold_lease(
            async {
                began.store(true, Ordering::SeqCst);
                "done"
            },
            LEASE,
            held_until,
            Clock::tokio(),
            &token,
            |_| Box::pin(async { Ok(true) }),
        )
        .await;
        assert!(matches!(out, Held::Lost(_)), "{out:?}");
        assert!(!began.load(Ordering::SeqCst), "the work was polled");
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_shorter_than_the_lease_is_ridden_out() {
        // The second renewal fails; the others succeed.
        let (out, cancelled, _, _) = hold(handler(Duration::from_secs(30)), |n| {
            Some(if n == 1 { unreachable(n)? } else { Ok(true) })
        })
        .await;
        assert!(matches!(out, Held::Finished("done")), "{out:?}");
        assert!(!cancelled);
    }
}
