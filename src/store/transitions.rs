//! The life of a (delivery, handler) pair as pure functions: what a start, a lease renewal,
//! the end of a run and an operator retry make of its [`JobState`], what that asks of the
//! queue, and whether the pair still holds its delivery against retention.
//!
//! Why here: the rules — a final pair never runs again, a superseded run's failure is
//! ignored but its success is kept, a retry gives a fresh `max_attempts`, a live lease
//! blocks a second runner — are the promises of design.md's invariants 1, 5 and 6, and
//! each backend used to write them out on its own. sled applies these functions under its
//! delivery locks, in its crash-safe write order; PostgreSQL states the same rules in the
//! statements of `postgres/queue.rs` and `postgres/operator.rs` (one round trip each), and
//! the conformance suite runs the same cases against both. The functions read no clock and
//! no storage: what they need (the time, whether a lease is live, whether the handler is
//! paused) is passed in, so every rule has a unit test below.

use super::{AttemptOutcome, JobState, JobStatus, Lease, PAUSED_RETRY_MS};

/// What a start of a run makes of a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Final, nothing to run: its queue entry (if any) is stale.
    Skip,
    /// Not now: look again at this time (a live lease, a pause).
    Busy {
        /// When (ms since the epoch).
        until_ms: u64,
    },
    /// Runs, as this state (running under the new lease, one attempt more).
    Run(JobState),
}

/// A run starting: `stored` is the pair's state (`None`: never ran), `attempts_so_far` the
/// count its attempt number goes on from (sled adds the runs a crash interrupted, see
/// `sled/starts.rs`), `lease_is_live` whether the stored lease still fences other runners
/// (the backend knows whose leases can be live), `paused` whether the handler is paused,
/// `queued_due` the queue entry the run was taken from (`None` for an inline run).
pub fn start(
    stored: Option<JobState>,
    attempts_so_far: u32,
    lease_is_live: bool,
    paused: bool,
    lease: Lease,
    queued_due: Option<u64>,
    now_ms: u64,
) -> Start {
    let mut state = stored.unwrap_or_else(JobState::pending);
    if state.is_final() {
        return Start::Skip;
    }
    if state.status == JobStatus::Running
        && lease_is_live
        && let Some(held) = state.lease
    {
        return Start::Busy {
            until_ms: held.taken_over_from(),
        };
    }
    if paused {
        return Start::Busy {
            until_ms: now_ms + PAUSED_RETRY_MS,
        };
    }
    state.status = JobStatus::Running;
    state.attempts = attempts_so_far + 1;
    state.updated_ms = now_ms;
    state.lease = Some(lease);
    if queued_due.is_some() {
        state.queued_at_ms = queued_due;
    }
    Start::Run(state)
}

/// A running attempt's lease extended to `lease.until_ms`, fenced: only the runner that
/// holds it (`lease.owner`) renews it, and only for the attempt it runs — the attempt number
/// only grows, so a runner that was taken over can never extend the new runner's lease.
/// `None`: not renewed (the runner must stop: its lease is not proven held).
pub fn renew(stored: Option<&JobState>, attempt: u32, lease: Lease) -> Option<JobState> {
    let state = stored?;
    let holds = state.status == JobStatus::Running
        && state.attempts == attempt
        && state.lease.is_some_and(|held| held.owner == lease.owner);
    holds.then(|| JobState {
        lease: Some(lease),
        ..state.clone()
    })
}

/// What the end of a run asks of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueChange {
    /// Nothing (processed mode's failure: the sender's retry runs it again).
    Keep,
    /// Final: the entry at this due time (if any) goes, once the outcome is written.
    Remove(Option<u64>),
    /// Runs again: a new entry at `to`, then the state, then the old entry at `from` goes.
    Move {
        /// The old entry's due time, if it had one.
        from: Option<u64>,
        /// The new one's.
        to: u64,
    },
}

/// The end of a run, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// The pair's state from now on.
    pub state: JobState,
    /// What becomes of its queue entry.
    pub queue: QueueChange,
    /// The pair was dead before this outcome (a superseded run's success can still come in).
    was_dead: bool,
}

impl Finish {
    /// It died: into the dead letters.
    pub fn dead_letter(&self) -> bool {
        self.state.status == JobStatus::Dead
    }

    /// It was dead and is not any more (a superseded run succeeded after the current one
    /// died): out of the dead letters.
    pub fn leaves_dead_letters(&self) -> bool {
        self.was_dead && !self.dead_letter()
    }

    /// It is final: its `order_by` line, if it is in one, is handed on to the next pair.
    pub fn hands_on(&self) -> bool {
        self.state.is_final()
    }
}

/// Attempt `attempt` of the pair ended with `outcome`. `None`: nothing changes — the pair
/// is gone or already succeeded, or the attempt was superseded (taken over after its lease
/// lapsed) and did not succeed: the current run decides. A superseded run's success is
/// kept (its work was done; the idempotency key makes the other run's harmless).
pub fn finish(
    stored: Option<&JobState>,
    attempt: u32,
    outcome: &AttemptOutcome,
    now_ms: u64,
) -> Option<Finish> {
    let mut state = stored?.clone();
    if state.status == JobStatus::Succeeded {
        return None;
    }
    let was_dead = state.status == JobStatus::Dead;
    let current = state.attempts == attempt;
    if !current && *outcome != AttemptOutcome::Succeeded {
        return None;
    }
    state.updated_ms = now_ms;
    if current {
        state.lease = None;
    }
    let finish = |state: JobState, queue| Finish {
        state,
        queue,
        was_dead,
    };
    Some(match outcome {
        AttemptOutcome::Succeeded | AttemptOutcome::Dead { .. } => {
            if let AttemptOutcome::Dead { error } = outcome {
                state.status = JobStatus::Dead;
                state.last_error = Some(error.clone());
            } else {
                state.status = JobStatus::Succeeded;
            }
            state.lease = None;
            let old = state.queued_at_ms.take();
            finish(state, QueueChange::Remove(old))
        }
        AttemptOutcome::RetryAt { due_ms, error } => {
            state.status = JobStatus::Failed;
            state.last_error = Some(error.clone());
            let from = state.queued_at_ms.replace(*due_ms);
            let queue = QueueChange::Move { from, to: *due_ms };
            finish(state, queue)
        }
        AttemptOutcome::Failed { error } => {
            state.status = JobStatus::Failed;
            state.last_error = Some(error.clone());
            finish(state, QueueChange::Keep)
        }
    })
}

/// Retention's rule (design.md, invariant 2): a pair keeps its delivery stored while it is
/// not final and still has a way to run — its queue entry (`queued`), its place in its
/// `order_by` line (`in_line`: the pair ahead hands it a way when it is final), or a run
/// under a lease that still fences other runners (`lease_is_live`). A pair that is not
/// final but has none of these (a processed-mode failure: the sender's retry runs it)
/// does not keep it.
pub fn keeps_its_delivery(
    state: Option<&JobState>,
    queued: bool,
    in_line: bool,
    lease_is_live: bool,
) -> bool {
    if state.is_some_and(JobState::is_final) {
        return false;
    }
    let running = state.is_some_and(|s| s.status == JobStatus::Running && s.lease.is_some());
    (running && lease_is_live) || queued || in_line
}

/// An `order_by` line's hand-on: once no pair of the line has a way to run (one at a time),
/// the first pair that is not final, in received order, is given one — a queue entry due
/// at this time: its arrival if it never ran (the entry its claim would have written), now
/// if it ran before and an operator put it back in line.
pub fn next_in_line_due(state: Option<&JobState>, received_at_ms: u64, now_ms: u64) -> u64 {
    if state.is_none_or(|s| s.status == JobStatus::Pending) {
        received_at_ms
    } else {
        now_ms
    }
}

/// What an operator retry makes of a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retry {
    /// Left as it is: succeeded, running under a live lease, not in the state asked for,
    /// or parked in its `order_by` line (it runs in its turn; a retry must not let it
    /// overtake).
    Untouched,
    /// Due now, as this state (its queue entry moves from `state.queued_at_ms` before the
    /// change to now).
    DueNow {
        /// The new state (its `queued_at_ms` is still the old entry's; the caller moves it).
        state: JobState,
        /// It was dead: out of the dead letters.
        revived: bool,
    },
    /// A dead pair of an `order_by` line: back into its line, at its place — due now if
    /// nobody in the line runs, else in its turn.
    BackInLine {
        /// The new state.
        state: JobState,
    },
}

/// Where a pair stands, as an operator retry needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryContext {
    /// The stored state's lease still fences other runners.
    pub lease_is_live: bool,
    /// Only a pair in this state is retried (bulk retry of failed or dead pairs).
    pub only: Option<JobStatus>,
    /// The handler's runs of this delivery are ordered (`order_by`).
    pub ordered: bool,
    /// It waits in its line with no way to run (only asked when `ordered`).
    pub parked: bool,
    /// Where a pair that never ran is queued: its arrival, if the delivery was acknowledged.
    pub queued_on_arrival: Option<u64>,
}

/// An operator retry of the pair (`stored`: `None` if it never ran), at `now_ms`: due now
/// with a fresh `max_attempts` if it failed or died (invariant 5).
pub fn operator_retry(stored: Option<JobState>, at: RetryContext, now_ms: u64) -> Retry {
    let mut state = match stored {
        Some(s) if s.status == JobStatus::Succeeded => return Retry::Untouched,
        Some(s) if s.status == JobStatus::Running && s.lease.is_some() && at.lease_is_live => {
            return Retry::Untouched;
        }
        Some(s) => s,
        None => JobState {
            queued_at_ms: at.queued_on_arrival,
            ..JobState::pending()
        },
    };
    if at.only.is_some_and(|wanted| wanted != state.status) {
        return Retry::Untouched;
    }
    let revived = state.status == JobStatus::Dead;
    if at.ordered && !revived && at.parked {
        return Retry::Untouched;
    }
    if matches!(state.status, JobStatus::Dead | JobStatus::Failed) {
        state.retry_base = state.attempts;
    }
    if state.status != JobStatus::Pending {
        state.status = JobStatus::Failed;
    }
    state.lease = None;
    state.updated_ms = now_ms;
    if at.ordered && revived {
        return Retry::BackInLine { state };
    }
    Retry::DueNow { state, revived }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn lease(until_ms: u64) -> Lease {
        Lease { owner: 7, until_ms }
    }

    fn state(status: JobStatus, attempts: u32) -> JobState {
        JobState {
            status,
            attempts,
            queued_at_ms: Some(NOW - 10),
            updated_ms: NOW - 10,
            ..JobState::pending()
        }
    }

    fn running(attempts: u32) -> JobState {
        JobState {
            lease: Some(lease(NOW + 30_000)),
            ..state(JobStatus::Running, attempts)
        }
    }

    fn failed(error: &str) -> AttemptOutcome {
        AttemptOutcome::RetryAt {
            due_ms: NOW + 500,
            error: error.into(),
        }
    }

    fn run(stored: Option<JobState>, live: bool, paused: bool) -> Start {
        let attempts = stored.as_ref().map_or(0, |s| s.attempts);
        start(
            stored,
            attempts,
            live,
            paused,
            lease(NOW + 30_000),
            Some(NOW - 5),
            NOW,
        )
    }

    #[test]
    fn a_pair_that_never_ran_starts_as_attempt_one_under_the_new_lease() {
        let Start::Run(s) = run(None, false, false) else {
            panic!("starts");
        };
        assert_eq!(s.status, JobStatus::Running);
        assert_eq!(s.attempts, 1);
        assert_eq!(s.lease, Some(lease(NOW + 30_000)));
        assert_eq!(s.queued_at_ms, Some(NOW - 5), "the entry it was taken from");
        assert_eq!(s.updated_ms, NOW);
    }

    #[test]
    fn a_start_counts_from_what_the_backend_says_ran_before() {
        let s = start(
            Some(state(JobStatus::Failed, 2)),
            4, // two runs a crash interrupted
            false,
            false,
            lease(NOW + 1),
            None,
            NOW,
        );
        let Start::Run(s) = s else { panic!("starts") };
        assert_eq!(s.attempts, 5);
        assert_eq!(
            s.queued_at_ms,
            Some(NOW - 10),
            "an inline run keeps its entry"
        );
    }

    #[test]
    fn a_final_pair_never_starts() {
        for status in [JobStatus::Succeeded, JobStatus::Dead] {
            assert_eq!(run(Some(state(status, 1)), false, false), Start::Skip);
        }
    }

    #[test]
    fn a_live_lease_fences_a_second_runner_until_it_can_be_taken_over() {
        let held = running(1);
        let until = held.lease.expect("lease").taken_over_from();
        assert_eq!(
            run(Some(held.clone()), true, false),
            Start::Busy { until_ms: until }
        );
        // A lapsed lease (or one of a process that died) is taken over: one attempt more.
        let Start::Run(s) = run(Some(held), false, false) else {
            panic!("taken over");
        };
        assert_eq!(s.attempts, 2);
    }

    #[test]
    fn no_run_of_a_paused_handler_starts() {
        assert_eq!(
            run(Some(state(JobStatus::Failed, 1)), false, true),
            Start::Busy {
                until_ms: NOW + PAUSED_RETRY_MS
            }
        );
    }

    #[test]
    fn only_the_runner_of_the_current_attempt_renews_its_lease() {
        let held = running(2);
        let renewed = renew(Some(&held), 2, lease(NOW + 60_000)).expect("renewed");
        assert_eq!(renewed.lease, Some(lease(NOW + 60_000)));
        assert_eq!(
            JobState {
                lease: held.lease,
                ..renewed
            },
            held,
            "nothing else changes"
        );
        // Taken over (attempt 3 runs now), another owner, not running, gone: not renewed.
        assert_eq!(renew(Some(&running(3)), 2, lease(NOW + 60_000)), None);
        let other = Lease {
            owner: 8,
            until_ms: NOW + 60_000,
        };
        assert_eq!(renew(Some(&held), 2, other), None);
        let failed = state(JobStatus::Failed, 2);
        assert_eq!(renew(Some(&failed), 2, lease(NOW + 60_000)), None);
        assert_eq!(renew(None, 2, lease(NOW + 60_000)), None);
    }

    #[test]
    fn a_success_is_final_and_removes_the_entry_and_hands_the_line_on() {
        let f = finish(Some(&running(1)), 1, &AttemptOutcome::Succeeded, NOW).expect("change");
        assert_eq!(f.state.status, JobStatus::Succeeded);
        assert_eq!(f.state.lease, None);
        assert_eq!(f.state.queued_at_ms, None);
        assert_eq!(f.queue, QueueChange::Remove(Some(NOW - 10)));
        assert!(f.hands_on() && !f.dead_letter());
    }

    #[test]
    fn a_death_is_final_dead_lettered_with_its_error() {
        let dead = AttemptOutcome::Dead {
            error: "gave up".into(),
        };
        let f = finish(Some(&running(3)), 3, &dead, NOW).expect("change");
        assert_eq!(f.state.status, JobStatus::Dead);
        assert_eq!(f.state.last_error.as_deref(), Some("gave up"));
        assert!(f.dead_letter() && f.hands_on() && !f.leaves_dead_letters());
        assert_eq!(f.queue, QueueChange::Remove(Some(NOW - 10)));
    }

    #[test]
    fn a_superseded_success_after_the_current_run_died_takes_the_pair_out_of_the_dead_letters() {
        let mut dead = running(3);
        dead.status = JobStatus::Dead;
        dead.lease = None;
        dead.queued_at_ms = None;
        let f = finish(Some(&dead), 2, &AttemptOutcome::Succeeded, NOW).expect("change");
        assert_eq!(f.state.status, JobStatus::Succeeded);
        assert!(f.leaves_dead_letters() && !f.dead_letter());
        // Its line was handed on when it died; handing on again finds the next one active.
        assert!(f.hands_on());
        assert_eq!(f.queue, QueueChange::Remove(None));
        // The superseded run's failure changes nothing.
        assert_eq!(finish(Some(&dead), 2, &failed("503"), NOW), None);
    }

    #[test]
    fn a_failure_moves_the_entry_to_its_retry_and_keeps_the_line() {
        let f = finish(Some(&running(1)), 1, &failed("503"), NOW).expect("change");
        assert_eq!(f.state.status, JobStatus::Failed);
        assert_eq!(f.state.last_error.as_deref(), Some("503"));
        assert_eq!(f.state.queued_at_ms, Some(NOW + 500));
        assert_eq!(
            f.queue,
            QueueChange::Move {
                from: Some(NOW - 10),
                to: NOW + 500
            }
        );
        assert!(!f.hands_on() && !f.dead_letter());
        assert_eq!(f.state.lease, None);
    }

    #[test]
    fn a_processed_mode_failure_records_the_error_and_leaves_the_queue() {
        let outcome = AttemptOutcome::Failed {
            error: "sibling failed".into(),
        };
        let f = finish(Some(&running(1)), 1, &outcome, NOW).expect("change");
        assert_eq!(f.state.status, JobStatus::Failed);
        assert_eq!(f.queue, QueueChange::Keep);
        assert_eq!(f.state.queued_at_ms, Some(NOW - 10));
    }

    #[test]
    fn a_superseded_run_s_failure_is_ignored_but_its_success_is_kept() {
        // Attempt 1 was taken over: attempt 2 runs now.
        let now_running = running(2);
        assert_eq!(finish(Some(&now_running), 1, &failed("late"), NOW), None);
        let dead = AttemptOutcome::Dead {
            error: "late".into(),
        };
        assert_eq!(finish(Some(&now_running), 1, &dead, NOW), None);
        let f = finish(Some(&now_running), 1, &AttemptOutcome::Succeeded, NOW).expect("kept");
        assert_eq!(f.state.status, JobStatus::Succeeded);
        assert_eq!(f.state.lease, None, "the pair is final: no lease holds it");
    }

    #[test]
    fn a_succeeded_pair_stays_succeeded_and_a_gone_one_changes_nothing() {
        let done = state(JobStatus::Succeeded, 1);
        for outcome in [AttemptOutcome::Succeeded, failed("x")] {
            assert_eq!(finish(Some(&done), 1, &outcome, NOW), None);
            assert_eq!(finish(None, 1, &outcome, NOW), None);
        }
    }

    fn context() -> RetryContext {
        RetryContext {
            lease_is_live: false,
            only: None,
            ordered: false,
            parked: false,
            queued_on_arrival: Some(NOW - 100),
        }
    }

    #[test]
    fn a_retry_gives_a_failed_or_dead_pair_a_fresh_max_attempts_due_now() {
        for (status, revived) in [(JobStatus::Failed, false), (JobStatus::Dead, true)] {
            let Retry::DueNow {
                state: s,
                revived: r,
            } = operator_retry(Some(state(status, 5)), context(), NOW)
            else {
                panic!("retried");
            };
            assert_eq!((s.status, s.retry_base, r), (JobStatus::Failed, 5, revived));
            assert_eq!(s.updated_ms, NOW);
            assert_eq!(s.queued_at_ms, Some(NOW - 10), "the entry the caller moves");
        }
    }

    #[test]
    fn a_retry_of_a_pair_that_never_ran_keeps_it_pending_from_its_arrival_entry() {
        let Retry::DueNow { state: s, revived } = operator_retry(None, context(), NOW) else {
            panic!("retried");
        };
        assert_eq!(
            (s.status, s.attempts, s.retry_base),
            (JobStatus::Pending, 0, 0)
        );
        assert_eq!(s.queued_at_ms, Some(NOW - 100));
        assert!(!revived);
    }

    #[test]
    fn a_retry_leaves_succeeded_and_live_running_pairs_alone() {
        let succeeded = Some(state(JobStatus::Succeeded, 1));
        assert_eq!(operator_retry(succeeded, context(), NOW), Retry::Untouched);
        let live = RetryContext {
            lease_is_live: true,
            ..context()
        };
        assert_eq!(
            operator_retry(Some(running(1)), live, NOW),
            Retry::Untouched
        );
        // A running pair whose lease lapsed (its runner died) is retried, its lease dropped.
        let Retry::DueNow { state: s, .. } = operator_retry(Some(running(1)), context(), NOW)
        else {
            panic!("retried");
        };
        assert_eq!((s.status, s.lease), (JobStatus::Failed, None));
    }

    #[test]
    fn a_bulk_retry_takes_only_the_state_it_asks_for() {
        let only_dead = RetryContext {
            only: Some(JobStatus::Dead),
            ..context()
        };
        let failed_pair = Some(state(JobStatus::Failed, 2));
        assert_eq!(
            operator_retry(failed_pair, only_dead, NOW),
            Retry::Untouched
        );
        assert!(matches!(
            operator_retry(Some(state(JobStatus::Dead, 2)), only_dead, NOW),
            Retry::DueNow { revived: true, .. }
        ));
    }

    #[test]
    fn in_an_order_by_line_a_parked_pair_waits_its_turn_and_a_dead_one_goes_back_in_line() {
        let parked = RetryContext {
            ordered: true,
            parked: true,
            ..context()
        };
        let failed_pair = Some(state(JobStatus::Failed, 1));
        assert_eq!(operator_retry(failed_pair, parked, NOW), Retry::Untouched);
        let Retry::BackInLine { state: s } =
            operator_retry(Some(state(JobStatus::Dead, 3)), parked, NOW)
        else {
            panic!("back in line");
        };
        assert_eq!((s.status, s.retry_base), (JobStatus::Failed, 3));
        // The active pair of a line (not parked) is retried like any other.
        let active = RetryContext {
            ordered: true,
            ..context()
        };
        assert!(matches!(
            operator_retry(Some(state(JobStatus::Failed, 1)), active, NOW),
            Retry::DueNow { .. }
        ));
    }

    #[test]
    fn a_pair_keeps_its_delivery_while_it_has_a_way_to_run() {
        let keeps = |state: Option<&JobState>, queued, in_line, live| {
            keeps_its_delivery(state, queued, in_line, live)
        };
        // Final: never, whatever is left behind.
        for status in [JobStatus::Succeeded, JobStatus::Dead] {
            assert!(!keeps(Some(&state(status, 1)), true, true, true));
        }
        // Never ran: its arrival entry.
        assert!(keeps(None, true, false, false));
        assert!(!keeps(None, false, false, false));
        // Waiting in its line.
        assert!(keeps(
            Some(&state(JobStatus::Pending, 0)),
            false,
            true,
            false
        ));
        // Running: while its lease fences, even with its entry gone.
        assert!(keeps(Some(&running(1)), false, false, true));
        assert!(!keeps(Some(&running(1)), false, false, false));
        // Failed, waiting for its retry.
        assert!(keeps(
            Some(&state(JobStatus::Failed, 2)),
            true,
            false,
            false
        ));
        // Failed with no way to run (processed mode: the sender's retry runs it).
        assert!(!keeps(
            Some(&state(JobStatus::Failed, 2)),
            false,
            false,
            false
        ));
    }

    #[test]
    fn the_next_pair_of_a_line_is_due_at_its_arrival_unless_it_ran_before() {
        assert_eq!(next_in_line_due(None, 5, NOW), 5);
        assert_eq!(
            next_in_line_due(Some(&state(JobStatus::Pending, 0)), 5, NOW),
            5
        );
        // Put back in line by an operator retry (it died, or failed): due now.
        for status in [JobStatus::Failed, JobStatus::Dead] {
            assert_eq!(next_in_line_due(Some(&state(status, 2)), 5, NOW), NOW);
        }
    }
}
