//! The downstream call journal ([`crate::store::CallJournal`]).

use async_trait::async_trait;

use super::encoding::{backend, corrupt, to_json};
use super::{SledStore, journal_prefix};
use crate::config::Durability;
use crate::store::CallJournal;
use crate::store::{CallRecord, DeliveryKey, JobKey, JournalEntry, StoreError};

#[async_trait]
impl CallJournal for SledStore {
    async fn journal_get(
        &self,
        job: &JobKey,
        step: &str,
    ) -> Result<Option<CallRecord>, StoreError> {
        self.calls
            .get(journal_key(job, step))
            .map_err(backend)?
            .map(|v| serde_json::from_slice(&v).map_err(corrupt))
            .transpose()
    }

    async fn journal_put(
        &self,
        job: &JobKey,
        step: &str,
        record: &CallRecord,
    ) -> Result<CallRecord, StoreError> {
        if self.durability == Durability::Fsync && self.commit.is_poisoned() {
            return Err(StoreError::Flush(
                "an earlier flush failed; restart to recover".into(),
            ));
        }
        let key = journal_key(job, step);
        match self
            .calls
            .compare_and_swap(&key, None::<&[u8]>, Some(to_json(record)))
            .map_err(backend)?
        {
            Ok(()) => Ok(record.clone()),
            Err(existing) => match existing.current {
                Some(v) => serde_json::from_slice(&v).map_err(corrupt),
                None => Ok(record.clone()),
            },
        }
    }

    async fn journal_replayed(&self, job: &JobKey, step: &str) -> Result<(), StoreError> {
        self.calls
            .fetch_and_update(journal_key(job, step), |old| {
                let mut record: CallRecord = serde_json::from_slice(old?).ok()?;
                record.replayed = record.replayed.saturating_add(1);
                Some(to_json(&record))
            })
            .map_err(backend)?;
        Ok(())
    }

    async fn journal_of(&self, key: &DeliveryKey) -> Result<Vec<JournalEntry>, StoreError> {
        self.journal_entries(key)
    }
}

pub(super) fn journal_key(job: &JobKey, step: &str) -> Vec<u8> {
    let mut key = journal_prefix(&job.encode());
    key.extend_from_slice(step.as_bytes());
    key
}
