//! What "on disk" means for sled 0.34: the body log's segments synced, then `db.flush()`,
//! then a real `fsync` of its data file and of every blob file it wrote (sled writes those
//! without one). Run by the group commit thread, once per batch of waiting writers, after
//! it has written the batch's `received` index entries (see `received`).

use std::collections::HashSet;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use super::FlushHook;
use super::bodies::BodyLog;
use super::received::ReceivedIndex;

/// Syncs the body log on a thread of its own, beside the group commit's sync of sled:
/// started once, instead of a thread spawned for every batch (a `clone3` and a stack per
/// batch: ~1.5 % of the server's CPU at ~750 batches a second in session 18's profile).
pub(super) struct BodySyncThread {
    /// `None` once dropping: the thread then ends.
    request: Option<mpsc::SyncSender<()>>,
    done: mpsc::Receiver<std::io::Result<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Waits for the thread to end: it holds the body log, and through it a tree of sled's, so
/// the store's directory is not free to open again until it has.
impl Drop for BodySyncThread {
    fn drop(&mut self) {
        self.request = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl BodySyncThread {
    /// Starts the thread for `bodies`; it ends when this handle is dropped.
    pub(super) fn start(bodies: Arc<BodyLog>) -> std::io::Result<BodySyncThread> {
        let (request, requests) = mpsc::sync_channel::<()>(1);
        let (finished, done) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("body-log-sync".into())
            .spawn(move || {
                for () in requests {
                    if finished.send(bodies.sync()).is_err() {
                        return;
                    }
                }
            })?;
        Ok(BodySyncThread {
            request: Some(request),
            done,
            thread: Some(thread),
        })
    }

    /// Starts a sync of the body log; [`BodySyncThread::finish`] waits for it.
    fn begin(&self) -> std::io::Result<()> {
        self.request
            .as_ref()
            .and_then(|request| request.send(()).ok())
            .ok_or_else(|| std::io::Error::other("the body log's sync thread has ended"))
    }

    fn finish(&self) -> std::io::Result<()> {
        self.done
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the body log's sync thread ended")))
    }
}

/// `db.flush()` then a real fsync of what sled wrote: its log file `db` and any blob files
/// (sled keeps pages over a quarter of a segment in `blobs/`, written without fsync).
pub(super) struct DiskSync {
    /// Synced first: no record may reach the disk ahead of its body.
    pub(super) bodies: Arc<BodyLog>,
    /// Syncs `bodies` beside sled's sync.
    pub(super) body_sync: BodySyncThread,
    pub(super) db: sled::Db,
    /// Its held items are written as the batch's entries before sled's flush.
    pub(super) received: Arc<ReceivedIndex>,
    pub(super) data_file: File,
    pub(super) blobs_dir: PathBuf,
    pub(super) synced_blobs: HashSet<std::ffi::OsString>,
    pub(super) hook: Option<FlushHook>,
}

impl DiskSync {
    pub(super) fn sync(&mut self) -> std::io::Result<()> {
        if let Some(hook) = &self.hook {
            hook()?;
        }
        self.received
            .write_pending()
            .map_err(std::io::Error::other)?;
        // The body log and sled's log are synced side by side, not one after the other: an
        // acknowledgement waits for both either way, and two fsyncs in a row would double
        // the wait of every batch. (Should the power fail between the two, a record whose
        // body did not make it is one nobody was told of; see `bodies`.)
        let (bodies, sled) = if self.bodies.has_unsynced() {
            self.body_sync.begin()?;
            let sled = self.sync_sled();
            (self.body_sync.finish(), sled)
        } else {
            (Ok(()), self.sync_sled())
        };
        bodies?;
        sled?;
        self.sync_blobs()
    }

    fn sync_sled(&self) -> std::io::Result<()> {
        self.db.flush().map_err(std::io::Error::other)?;
        self.data_file.sync_data()
    }

    fn sync_blobs(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut present = HashSet::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !self.synced_blobs.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    // Garbage-collected by sled between listing and opening.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::BodySyncThread;
    use crate::store::sled::bodies::{BodyLog, BodyLogSettings};

    /// The sync thread holds the body log, and through it a tree of sled's (so sled's
    /// directory lock): once its handle is dropped it must be gone, or a store dropped and
    /// opened again in the same process (a restart in a test, the `store` tools) finds its
    /// directory still locked. The handle's drop joins the thread, so the body log is
    /// released by the time it returns.
    #[test]
    fn the_sync_thread_lets_go_of_the_body_log_when_its_handle_is_dropped() {
        let dir = tempfile::TempDir::new().expect("dir");
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let meta = db.open_tree("meta").expect("tree");
        for round in 0..20 {
            let bodies = Arc::new(
                BodyLog::open(dir.path(), meta.clone(), BodyLogSettings::default(), true)
                    .expect("open"),
            );
            let thread = BodySyncThread::start(bodies.clone()).expect("start");
            bodies.append(&[], &[round; 300], 1_000).expect("append");
            thread.begin().expect("begin");
            thread.finish().expect("synced");
            assert!(!bodies.has_unsynced());
            drop(thread);
            assert_eq!(Arc::strong_count(&bodies), 1, "round {round}");
        }
    }
}
