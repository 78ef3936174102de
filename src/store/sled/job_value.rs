//! The `jobs` tree's value: a job state in a compact binary form.
//!
//! Why: every delivery's run ends with one `jobs` insert (its outcome), and sled copies a
//! value several times over its life (the log, then every rewrite of the leaf that holds
//! it). As JSON a succeeded state is ~100 bytes, field names and `null`s included; this form
//! (postcard: varints, no field names, led by a version byte) is 13. Smaller leaves are
//! cheaper to rewrite on every outcome and take less disk (BENCHMARKS.md, session 19).
//!
//! Values written as JSON before stay readable: a JSON object starts with `{`, which no
//! version byte of this form is. The status is written as an explicit code, so reordering
//! [`JobStatus`]'s variants cannot change what a stored byte means. A field added to
//! [`JobState`] must be added here too, last: the destructuring in [`encode`] does not
//! compile until it is.

use serde::{Deserialize, Serialize};

use super::encoding::corrupt;
use crate::store::{JobState, JobStatus, Lease, StoreError};

/// The form written by [`encode`]. Never `b'{'`: that byte marks a JSON value.
const VERSION: u8 = 1;

/// The written form, read back borrowing its error text from the stored bytes.
#[derive(Serialize, Deserialize)]
struct StateForm<'a> {
    version: u8,
    status: u8,
    attempts: u32,
    retry_base: u32,
    updated_ms: u64,
    queued_at_ms: Option<u64>,
    lease: Option<(u64, u64)>,
    #[serde(borrow)]
    last_error: Option<&'a str>,
}

fn status_code(status: JobStatus) -> u8 {
    match status {
        JobStatus::Pending => 0,
        JobStatus::Running => 1,
        JobStatus::Succeeded => 2,
        JobStatus::Failed => 3,
        JobStatus::Dead => 4,
    }
}

fn status_of(code: u8) -> Result<JobStatus, StoreError> {
    Ok(match code {
        0 => JobStatus::Pending,
        1 => JobStatus::Running,
        2 => JobStatus::Succeeded,
        3 => JobStatus::Failed,
        4 => JobStatus::Dead,
        other => {
            return Err(StoreError::Corrupt(format!(
                "a job state with status code {other}"
            )));
        }
    })
}

/// A job state as the `jobs` tree holds it.
pub(super) fn encode(state: &JobState) -> Vec<u8> {
    let JobState {
        status,
        attempts,
        last_error,
        queued_at_ms,
        updated_ms,
        retry_base,
        lease,
    } = state;
    let out = StateForm {
        version: VERSION,
        status: status_code(*status),
        attempts: *attempts,
        retry_base: *retry_base,
        updated_ms: *updated_ms,
        queued_at_ms: *queued_at_ms,
        lease: lease.map(|l| (l.owner, l.until_ms)),
        last_error: last_error.as_deref(),
    };
    // Integers, options and a string: postcard cannot fail to write them to a Vec.
    postcard::to_allocvec(&out).expect("a job state serializes")
}

/// A `jobs` value, in this form or as the JSON written before it.
pub(super) fn decode(bytes: &[u8]) -> Result<JobState, StoreError> {
    if bytes.first() == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(corrupt);
    }
    let state: StateForm<'_> = postcard::from_bytes(bytes)
        .map_err(|e| StoreError::Corrupt(format!("a job state: {e}")))?;
    if state.version != VERSION {
        return Err(StoreError::Corrupt(format!(
            "a job state of form {}, this build reads {VERSION} (written by a newer build?)",
            state.version
        )));
    }
    Ok(JobState {
        status: status_of(state.status)?,
        attempts: state.attempts,
        last_error: state.last_error.map(str::to_owned),
        queued_at_ms: state.queued_at_ms,
        updated_ms: state.updated_ms,
        retry_base: state.retry_base,
        lease: state
            .lease
            .map(|(owner, until_ms)| Lease { owner, until_ms }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn status() -> impl Strategy<Value = JobStatus> {
        prop_oneof![
            Just(JobStatus::Pending),
            Just(JobStatus::Running),
            Just(JobStatus::Succeeded),
            Just(JobStatus::Failed),
            Just(JobStatus::Dead),
        ]
    }

    prop_compose! {
        fn job_state()(
            status in status(),
            attempts in any::<u32>(),
            last_error in proptest::option::of(".{0,80}"),
            queued_at_ms in proptest::option::of(any::<u64>()),
            updated_ms in any::<u64>(),
            retry_base in any::<u32>(),
            lease in proptest::option::of((any::<u64>(), any::<u64>())),
        ) -> JobState {
            JobState {
                status,
                attempts,
                last_error,
                queued_at_ms,
                updated_ms,
                retry_base,
                lease: lease.map(|(owner, until_ms)| Lease { owner, until_ms }),
            }
        }
    }

    proptest! {
        #[test]
        fn every_state_reads_back_as_written(state in job_state()) {
            prop_assert_eq!(decode(&encode(&state)).expect("decodes"), state);
        }

        #[test]
        fn a_state_written_as_json_before_still_reads(state in job_state()) {
            let json = serde_json::to_vec(&state).expect("json");
            prop_assert_eq!(decode(&json).expect("decodes"), state);
        }
    }

    #[test]
    fn a_succeeded_run_is_a_few_bytes_not_a_json_object() {
        let state = JobState {
            status: JobStatus::Succeeded,
            attempts: 1,
            last_error: None,
            queued_at_ms: None,
            updated_ms: 1_765_000_000_000,
            retry_base: 0,
            lease: None,
        };
        let binary = encode(&state);
        assert_eq!(binary.len(), 13, "{binary:?}");
        assert!(serde_json::to_vec(&state).expect("json").len() > 90);
    }

    #[test]
    fn an_unknown_form_or_status_is_an_error_not_a_guess() {
        let mut newer = encode(&JobState::pending());
        newer[0] = VERSION + 1;
        assert!(matches!(decode(&newer), Err(StoreError::Corrupt(_))));
        let mut bad_status = encode(&JobState::pending());
        bad_status[1] = 9;
        assert!(matches!(decode(&bad_status), Err(StoreError::Corrupt(_))));
        assert!(matches!(decode(&[]), Err(StoreError::Corrupt(_))));
    }
}
