//! What a run's result means for the pair: the retry decision, a pure function of the
//! result, the attempt and `[dispatch]` (design.md, "Dispatch"), so that every branch —
//! success, processed mode, permanent error, the last attempt, a back-off — has a unit
//! test, and the runner only records what this says.

use std::time::Duration;

use crate::config::DispatchConfig;
use crate::handlers::HandlerError;
use crate::store::AttemptOutcome;

/// The delay before retry number `attempt` (1 after the first failure): doubling from
/// `initial`, capped at `max`, plus up to half again of random jitter so that a burst of
/// failures does not retry in lock-step. Each delay is at least the previous one's maximum
/// until the cap, so delays grow.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let base = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    let jitter_ms = (base.as_millis() as u64) / 2;
    let jitter = if jitter_ms == 0 {
        0
    } else {
        rand::random::<u64>() % jitter_ms
    };
    (base + Duration::from_millis(jitter)).min(max)
}

/// The outcome the store records for attempt `attempt` (the `attempts_in_round`-th since
/// the last operator retry) that ended with `result` at `now_ms`. `queued`: the run came
/// from the queue; an inline run of `ack = "processed"` that fails is only recorded as
/// failed, because the sender's retry runs it again.
pub fn outcome(
    result: &Result<(), HandlerError>,
    queued: bool,
    attempt: u32,
    attempts_in_round: u32,
    config: &DispatchConfig,
    now_ms: u64,
) -> AttemptOutcome {
    match result {
        Ok(()) => AttemptOutcome::Succeeded,
        Err(e) if !queued => AttemptOutcome::Failed {
            error: e.to_string(),
        },
        Err(HandlerError::Permanent(m)) => AttemptOutcome::Dead {
            error: format!("permanent: {m}"),
        },
        Err(e @ HandlerError::Retryable(_)) if attempts_in_round >= config.max_attempts => {
            AttemptOutcome::Dead {
                error: format!("{e} (gave up after {attempt} attempts)"),
            }
        }
        Err(e) => {
            let delay = backoff(attempt, config.initial_backoff, config.max_backoff);
            AttemptOutcome::RetryAt {
                due_ms: now_ms + delay.as_millis() as u64,
                error: e.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn config() -> DispatchConfig {
        DispatchConfig {
            max_attempts: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            ..DispatchConfig::default()
        }
    }

    fn retryable() -> Result<(), HandlerError> {
        Err(HandlerError::Retryable("503".into()))
    }

    #[test]
    fn backoff_grows_within_bounds() {
        let initial = Duration::from_secs(1);
        let max = Duration::from_secs(600);
        for _ in 0..100 {
            let mut previous = Duration::ZERO;
            for attempt in 1..=12 {
                let d = backoff(attempt, initial, max);
                assert!(d >= initial && d <= max, "attempt {attempt}: {d:?}");
                assert!(
                    d >= previous || d == max,
                    "attempt {attempt}: {d:?} < {previous:?}"
                );
                previous = d;
            }
        }
        assert_eq!(backoff(40, initial, max), max);
    }

    #[test]
    fn a_success_is_final() {
        assert_eq!(
            outcome(&Ok(()), true, 1, 1, &config(), NOW),
            AttemptOutcome::Succeeded
        );
    }

    #[test]
    fn a_retryable_failure_backs_off_from_now() {
        for attempt in 1..=2 {
            let AttemptOutcome::RetryAt { due_ms, error } =
                outcome(&retryable(), true, attempt, attempt, &config(), NOW)
            else {
                panic!("retried");
            };
            let base = 1000 << (attempt - 1);
            assert!(
                (NOW + base..=NOW + base * 3 / 2).contains(&due_ms),
                "{due_ms}"
            );
            assert_eq!(error, "retryable: 503");
        }
    }

    #[test]
    fn the_last_attempt_of_a_round_dies_saying_how_many_ran() {
        // Attempt 5 overall, the third since an operator retry: max_attempts is 3.
        let AttemptOutcome::Dead { error } = outcome(&retryable(), true, 5, 3, &config(), NOW)
        else {
            panic!("dead");
        };
        assert_eq!(error, "retryable: 503 (gave up after 5 attempts)");
    }

    #[test]
    fn a_permanent_error_dies_at_once() {
        let permanent = Err(HandlerError::Permanent("bad request".into()));
        assert_eq!(
            outcome(&permanent, true, 1, 1, &config(), NOW),
            AttemptOutcome::Dead {
                error: "permanent: bad request".into()
            }
        );
    }

    #[test]
    fn an_inline_run_that_fails_is_only_recorded_failed() {
        for result in [retryable(), Err(HandlerError::Permanent("x".into()))] {
            assert!(matches!(
                outcome(&result, false, 3, 3, &config(), NOW),
                AttemptOutcome::Failed { .. }
            ));
        }
    }
}
