//! `webhook-inbox store check [--repair]` and the repair a server does on start, against the
//! damage the first version of the store could leave: an acknowledged delivery whose
//! handler has no state and no queue entry ("pending with nothing that will run it").

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use webhook_inbox::config::{Config, Durability};
use webhook_inbox::store::{
    Claim, Claims, DeliveryKey, JobQueue, Maintenance, NewDelivery, Operations, SledOptions,
    SledStore, StoredResponse,
};
use webhook_inbox::verify::Source;

use crate::helpers::{Options, SECRET, assert_replayed, eventually, spawn_with};

fn config_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("check.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\npath = {:?}\n[sources.credicorp]\nsecrets = [\"{SECRET}\"]\n",
            dir.join("data")
        ),
    )
    .expect("write config");
    path
}

/// The `credicorp` source of a minimal config, to sign deliveries with.
fn credicorp() -> Source {
    let config = Config::parse(
        &format!("[sources.credicorp]\nsecrets = [\"{SECRET}\"]\n"),
        "t.toml",
    )
    .expect("config");
    Source::named(&config, "credicorp").expect("source")
}

/// Waits for sled's file lock of a store dropped in this process to be released.
fn open_raw(path: &std::path::Path, repair: bool) -> SledStore {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let options = SledOptions {
            repair_on_open: repair,
            ..SledOptions::default()
        };
        match SledStore::open_with(path, Durability::Fsync, 8 << 20, options) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("store does not open: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn open_sled(path: &std::path::Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if Instant::now() > deadline => panic!("sled does not open: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A body short enough to stay in its record (not the body log).
const SMALL_BODY: &[u8] = br#"{"type":"application.created"}"#;

/// A JSON body long enough for the body log.
fn large_body() -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"application.created","pad":"{}"}}"#,
        "x".repeat(600)
    ))
}

/// Claims one acknowledged delivery `id` of `credicorp`, bound to handler `recorder`, in the
/// sled store at `path` (`fsync`), and closes the store with a final flush.
async fn store_one_acknowledged(path: &std::path::Path, id: &str, body: Bytes) {
    let store = open_raw(path, true);
    let source = credicorp();
    let delivery = webhook_inbox::testing::authenticated(&source, id, &body, SystemTime::now())
        .expect("signed");
    let now = webhook_inbox::clock::Clock::System.now_ms();
    let new = NewDelivery::new(delivery, now, vec!["recorder".into()], false).acknowledged(
        StoredResponse {
            status: 202,
            body: "{}".into(),
        },
    );
    assert!(matches!(store.claim(new).await.expect("claim"), Claim::New));
    store.flush().await.expect("flush");
}

/// An acknowledged delivery `msg_lost` bound to handler `recorder`, whose queue entry is
/// then deleted behind the store's back (what the first version's race left), plus a queue
/// entry that leads nowhere (what a crash mid-claim leaves).
async fn damaged_store(dir: &std::path::Path) {
    let path = dir.join("data");
    store_one_acknowledged(&path, "msg_lost", Bytes::from_static(SMALL_BODY)).await;
    let db = open_sled(&path);
    db.open_tree("handler_queue")
        .expect("queue")
        .clear()
        .expect("clear");
    // The leftover is written in the queue layout of the first versions (one tree `queue`,
    // due time first), so opening the store also moves it to the per-handler layout.
    let mut dangling = 5u64.to_be_bytes().to_vec();
    dangling.extend_from_slice(b"credicorp\0msg_never_landed\0recorder");
    db.open_tree("queue")
        .expect("old queue")
        .insert(dangling, &[])
        .expect("insert");
    // A call journal step of a delivery that is gone (written after retention took it).
    db.open_tree("calls")
        .expect("journal")
        .insert(b"credicorp\0msg_expired\0recorder\0open", b"{}".to_vec())
        .expect("insert");
    // A dead-letter entry of a pair that is not dead (a crash between a superseded run's
    // success and the entry's removal).
    db.open_tree("dead")
        .expect("dead letters")
        .insert(b"credicorp\0msg_lost\0recorder", &[])
        .expect("insert");
    db.flush().expect("flush");
}

fn store_check(config: &std::path::Path, repair: bool) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"));
    command.args(["store", "check", "--config"]).arg(config);
    if repair {
        command.arg("--repair");
    }
    // sled's lock of an in-process store can outlive its drop by a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = command.output().expect("binary runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let code = out.status.code().unwrap_or(-1);
        if code == 2 && text.contains("in use") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        return (code, text);
    }
}

#[tokio::test]
async fn store_check_lists_a_lost_delivery_and_repair_puts_it_back() {
    let dir = tempfile::TempDir::new().expect("dir");
    damaged_store(dir.path()).await;
    let config = config_file(dir.path());

    let (code, text) = store_check(&config, false);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("credicorp/msg_lost#recorder") && text.contains("nothing queued"),
        "{text}"
    );
    assert!(
        text.contains("msg_never_landed"),
        "leftovers listed: {text}"
    );
    assert!(
        text.contains("call journal step of credicorp/msg_expired without its delivery"),
        "journal leftovers listed: {text}"
    );
    assert!(
        text.contains("credicorp/msg_lost#recorder: in the dead letters but not dead"),
        "dead-letter leftovers listed: {text}"
    );
    assert!(text.contains("1 violation(s)"), "{text}");

    let (code, text) = store_check(&config, true);
    assert_eq!(code, 0, "{text}");
    let (code, text) = store_check(&config, false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("0 violation(s), 0 leftover(s)"), "{text}");

    // The repaired delivery runs its handler once the server starts.
    let app = spawn_with(Options {
        sled_only: true,
        dir: Some(std::sync::Arc::new(dir)),
        ..Options::default()
    })
    .await;
    assert!(
        eventually(Duration::from_secs(20), || app.recorder.runs_of("msg_lost")
            == 1)
        .await
    );
}

/// The server repairs on start what a crash can leave among recent deliveries, without
/// `store check`.
#[tokio::test]
async fn a_starting_server_puts_back_what_the_store_lost() {
    let dir = tempfile::TempDir::new().expect("dir");
    damaged_store(dir.path()).await;
    let app = spawn_with(Options {
        sled_only: true,
        dir: Some(std::sync::Arc::new(dir)),
        ..Options::default()
    })
    .await;
    assert!(
        eventually(Duration::from_secs(20), || app.recorder.runs_of("msg_lost")
            == 1)
        .await
    );
}

/// With `fsync`, a claim's `received` index item waits in memory for its batch's entry,
/// written just before the flush its ack waits for: a kill -9 between the claim's record
/// reaching sled's log and that entry leaves a record no entry lists (a delivery not yet
/// acknowledged, whose sender retries and is answered from the record) and its first run's
/// queue entry lost with the memory. The claim journaled its key in the body log first, and
/// the `received-pending` mark holds the log position from which keys may lack an entry.
///
/// This is that disk, made by hand from a real claim: its index entry and queue entry
/// deleted, the mark put back with `mark` as its value. Either the next start finds the
/// record (`found_at_start`): indexes it, runs its handler and lists it; or it does not look
/// that far back (what a power loss can leave: sled's log page with the record written back
/// by the OS, the body log's page with its key not), and the sender's retry finds it before
/// it is answered: indexed, its run put back, then answered as a replay. Either way the
/// handler runs once and `store check` then finds nothing.
async fn a_lost_index_entry_on_start(body: Bytes, mark: Mark, found_at_start: bool) {
    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("data");
    // An earlier delivery, which stays indexed, as a crash leaves every one before the
    // last batch (and which keeps the index from looking empty to retention).
    store_one_acknowledged(&path, "msg_indexed", body.clone()).await;
    store_one_acknowledged(&path, "msg_unindexed", body.clone()).await;
    // Each store opened appended to a segment of its own: the last is the claim's.
    let segment = std::fs::read_dir(path.join("bodies"))
        .expect("body log")
        .filter_map(|e| {
            let name = e.expect("entry").file_name();
            u64::from_str_radix(name.to_str()?.strip_suffix(".log")?, 16).ok()
        })
        .max()
        .expect("a body segment");
    let segment_len = std::fs::metadata(path.join("bodies").join(format!("{segment:016x}.log")))
        .expect("segment")
        .len();
    let position = |offset: u64| [segment.to_be_bytes(), offset.to_be_bytes()].concat();
    let db = open_sled(&path);
    db.open_tree("handler_queue")
        .expect("tree")
        .clear()
        .expect("clear");
    // The claim's batch entry (each store's close wrote its one item in an entry of its own).
    let received = db.open_tree("received").expect("tree");
    let lost: Vec<_> = received
        .iter()
        .map(|e| e.expect("entry"))
        .filter(|(_, v)| v.windows(13).any(|w| w == b"msg_unindexed"))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(lost.len(), 1, "one batch entry lists the claim");
    received.remove(&lost[0]).expect("remove");
    assert_eq!(received.len(), 1, "the earlier delivery's stays");
    drop(received);
    let mark = match mark {
        Mark::WithoutPosition => Vec::new(),
        Mark::AtTheClaimsFrame => position(0),
        Mark::PastTheClaimsFrame => position(segment_len),
    };
    db.open_tree("meta")
        .expect("meta")
        .insert(b"received-pending", mark)
        .expect("mark");
    db.flush().expect("flush");
    drop(db);
    let app = spawn_with(Options {
        sled_only: true,
        admin_token: Some("admin-token"),
        dir: Some(std::sync::Arc::new(dir)),
        ..Options::default()
    })
    .await;
    let listed = || async {
        app.admin_get("/admin/deliveries")
            .await
            .text()
            .await
            .expect("listing")
            .contains("msg_unindexed")
    };
    if found_at_start {
        assert!(listed().await, "listed again on start");
    } else {
        assert!(!listed().await, "the start read only the journal's tail");
        // Two retries at once (a sender's retry and its proxy's): one repairs, the other
        // waits for that repair's disk; both are answered as replays, the handler runs once.
        let headers = app.sign("msg_unindexed", &body);
        let (first, second) = tokio::join!(
            app.post("credicorp", &headers, body.to_vec()),
            app.post("credicorp", &headers, body.to_vec())
        );
        for retried in [first, second] {
            assert_eq!(retried.status(), 202);
            assert_replayed(&retried);
        }
        assert!(listed().await, "indexed by the retry");
    }
    assert!(
        eventually(Duration::from_secs(20), || app
            .recorder
            .runs_of("msg_unindexed")
            == 1)
        .await
    );
    let recorder = app.recorder.clone();
    let dir = app.stop().await;
    assert_eq!(recorder.runs_of("msg_unindexed"), 1, "once, by the stop");
    let (code, text) = store_check(&config_file(dir.path()), false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("0 violation(s), 0 leftover(s)"), "{text}");
}

/// What the `received-pending` mark holds in [`a_lost_index_entry_on_start`].
enum Mark {
    /// As the version before the journal wrote it: every record is read.
    WithoutPosition,
    /// The body-log position of the claim's frame.
    AtTheClaimsFrame,
    /// The end of the body log: the claim is before it.
    PastTheClaimsFrame,
}

/// A body kept in its record: the claim's key has a frame of its own.
#[tokio::test]
async fn a_record_whose_batch_index_entry_a_crash_lost_is_found_by_its_journaled_key() {
    a_lost_index_entry_on_start(Bytes::from_static(SMALL_BODY), Mark::AtTheClaimsFrame, true).await;
}

/// A body in the body log: the key is in the body's frame.
#[tokio::test]
async fn a_logged_body_journals_its_key_in_its_own_frame() {
    a_lost_index_entry_on_start(large_body(), Mark::AtTheClaimsFrame, true).await;
}

/// The start after a crash reads the journal from the mark's position, not the store (what
/// keeps its cost from growing with the store): a record whose key is not journaled after
/// it is not looked for at start. Its sender's retry finds it.
#[tokio::test]
async fn a_record_the_journal_does_not_name_is_repaired_by_its_senders_retry() {
    a_lost_index_entry_on_start(large_body(), Mark::PastTheClaimsFrame, false).await;
}

/// A store whose process died under the version before the journal (a mark without a
/// position) is still repaired, by reading every record once.
#[tokio::test]
async fn a_mark_without_a_position_reads_every_record() {
    a_lost_index_entry_on_start(Bytes::from_static(SMALL_BODY), Mark::WithoutPosition, true).await;
}

/// An operator retry requeues a pair that has no state yet (invariant-1 damage), not only
/// failed and dead ones.
#[tokio::test]
async fn an_operator_retry_requeues_a_pair_that_never_ran() {
    let dir = tempfile::TempDir::new().expect("dir");
    damaged_store(dir.path()).await;
    let store = open_raw(&dir.path().join("data"), false);
    assert_eq!(
        store
            .due_jobs(u64::MAX, 10, &Default::default())
            .await
            .expect("queue")
            .len(),
        1
    );
    let requeued = store
        .retry(&DeliveryKey::new("credicorp", "msg_lost"), 1)
        .await
        .expect("retry");
    assert_eq!(requeued, vec!["recorder".to_owned()]);
    let due = store
        .due_jobs(u64::MAX, 10, &Default::default())
        .await
        .expect("queue");
    assert!(
        due.iter().any(|e| e.job.delivery.id == "msg_lost"),
        "{due:?}"
    );
}

/// A data directory a running server holds is refused with a clear error; nothing changes.
#[tokio::test]
async fn store_check_refuses_a_store_in_use() {
    let app = spawn_with(Options {
        sled_only: true,
        ..Options::default()
    })
    .await;
    let config = config_file(app.dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["store", "check", "--repair", "--config"])
        .arg(&config)
        .output()
        .expect("binary runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("in use") && text.contains("stop it first"),
        "{text}"
    );
    assert_eq!(
        app.deliver("msg_after", "{\"type\":\"a\"}").await.status(),
        202
    );
}

/// Issue 12, item 10: a `status=dead` listing reads the dead letters, not the whole store:
/// two dead deliveries older than 12 000 others come back on the first page (a listing of
/// the received_at index stops after 10 000 entries with a cursor to go on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_from_their_own_tree() {
    use webhook_inbox::store::{AttemptOutcome, Begin, DeliveryStatus};
    let dir = tempfile::TempDir::new().expect("dir");
    let store =
        SledStore::open(&dir.path().join("data"), Durability::Buffered, 64 << 20).expect("store");
    let config = Config::parse(
        &format!("[sources.credicorp]\nsecrets = [\"{SECRET}\"]\n"),
        "t.toml",
    )
    .expect("config");
    let source = Source::named(&config, "credicorp").expect("source");
    let claim = |id: String, at: u64, handlers: Vec<String>| {
        let d = webhook_inbox::testing::authenticated(&source, &id, b"{}", SystemTime::now())
            .expect("signed");
        NewDelivery::new(d, at, handlers, false).acknowledged(StoredResponse {
            status: 202,
            body: "{}".into(),
        })
    };
    for (n, id) in ["dead-1", "dead-2"].into_iter().enumerate() {
        store
            .claim(claim(id.into(), 1_000 + n as u64, vec!["h".into()]))
            .await
            .expect("claim");
        let job = DeliveryKey::new("credicorp", id).job("h");
        let Begin::Started(a) = store
            .begin_attempt(&job, Some(1_000 + n as u64), 2_000, 3_000)
            .await
            .expect("begin")
        else {
            panic!("runnable")
        };
        store
            .finish_attempt(
                &job,
                a.attempt,
                AttemptOutcome::Dead { error: "no".into() },
                2_000,
            )
            .await
            .expect("finish");
    }
    for n in 0..12_000u64 {
        store
            .claim(claim(format!("ok-{n}"), 10_000 + n, Vec::new()))
            .await
            .expect("claim");
    }
    let page = store
        .list(None, Some(DeliveryStatus::Dead), 50, None)
        .await
        .expect("list");
    let ids: Vec<&str> = page
        .deliveries
        .iter()
        .map(|d| d.record.id.as_str())
        .collect();
    assert_eq!(ids, ["dead-2", "dead-1"], "newest first, all on one page");
    assert!(page.next.is_none());
}

/// A store written before queue entries were kept per handler (one tree `queue`, due time
/// first) is moved to the per-handler layout when opened: what was queued still runs, once.
#[tokio::test]
async fn a_store_of_the_old_queue_layout_is_upgraded_and_its_queue_runs() {
    let dir = tempfile::TempDir::new().expect("dir");
    damaged_store(dir.path()).await; // `msg_lost` acknowledged, its queue entry removed
    {
        // …and put back in the old layout, as the first versions wrote it.
        let db = open_sled(&dir.path().join("data"));
        let mut entry = 7u64.to_be_bytes().to_vec();
        entry.extend_from_slice(b"credicorp\0msg_lost\0recorder");
        db.open_tree("queue")
            .expect("old queue")
            .insert(entry, &[])
            .expect("insert");
        db.flush().expect("flush");
    }
    {
        let store = open_raw(&dir.path().join("data"), false);
        let due = store
            .due_jobs(u64::MAX, 10, &Default::default())
            .await
            .expect("queue");
        let ids: Vec<&str> = due.iter().map(|e| e.job.delivery.id.as_str()).collect();
        assert_eq!(ids, ["msg_never_landed", "msg_lost"], "{due:?}");
    }
    let app = spawn_with(Options {
        sled_only: true,
        dir: Some(std::sync::Arc::new(dir)),
        ..Options::default()
    })
    .await;
    assert!(
        eventually(Duration::from_secs(20), || app.recorder.runs_of("msg_lost")
            == 1)
        .await
    );
}

/// A body in the body log whose bytes changed on disk is a violation `store check` names
/// (its CRC no longer matches), where a clean one passes.
#[tokio::test]
async fn store_check_reports_a_body_log_entry_that_no_longer_matches() {
    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("data");
    {
        let store = open_raw(&path, true);
        let source = credicorp();
        let pad = "p".repeat(500);
        let body = Bytes::from(format!(r#"{{"type":"application.created","pad":"{pad}"}}"#));
        let delivery =
            webhook_inbox::testing::authenticated(&source, "msg_long", &body, SystemTime::now())
                .expect("signed");
        let now = webhook_inbox::clock::Clock::System.now_ms();
        let new = NewDelivery::new(delivery, now, vec![], false).acknowledged(StoredResponse {
            status: 202,
            body: "{}".into(),
        });
        assert!(matches!(store.claim(new).await.expect("claim"), Claim::New));
        assert_eq!(
            store
                .body(&DeliveryKey::new("credicorp", "msg_long"))
                .await
                .expect("body")
                .as_deref(),
            Some(&body[..])
        );
        assert_eq!(store.body_segments().expect("segments").len(), 1);
        store.flush().await.expect("flush");
    }
    let config = config_file(dir.path());
    let (code, text) = store_check(&config, false);
    assert_eq!(code, 0, "{text}");

    let segment = std::fs::read_dir(path.join("bodies"))
        .expect("bodies dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&segment, bytes).expect("write");

    let (code, text) = store_check(&config, false);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("credicorp/msg_long") && text.contains("checksum mismatch"),
        "{text}"
    );
}

/// A store written before records were binary (each delivery value's record as JSON, as
/// the first versions wrote it) is read as it was: a redelivery gets the stored first answer
/// byte for byte, another body under its id is a conflict, and the record is shown whole.
#[tokio::test]
async fn records_written_as_json_by_earlier_versions_are_still_read() {
    let dir = tempfile::TempDir::new().expect("dir");
    let body = r#"{"type":"application.created","written":"as json"}"#;
    let answer = r#"{"status":"accepted","written":"by an earlier version"}"#;
    {
        let source = credicorp();
        let delivery = webhook_inbox::testing::authenticated(
            &source,
            "msg_json",
            body.as_bytes(),
            SystemTime::now(),
        )
        .expect("signed");
        let now = webhook_inbox::clock::Clock::System.now_ms();
        let new = NewDelivery::new(delivery, now, vec![], false).acknowledged(StoredResponse {
            status: 202,
            body: answer.into(),
        });
        let record = new.record();
        // The value's layout then: the JSON's length (u32 BE, no flag), the JSON, the body.
        let json = serde_json::to_vec(record).expect("json");
        let mut value = (json.len() as u32).to_be_bytes().to_vec();
        value.extend_from_slice(&json);
        value.extend_from_slice(body.as_bytes());
        let key = record.key().encode();
        let mut received = record.received_at_ms.to_be_bytes().to_vec();
        received.extend_from_slice(&key);
        let db = open_sled(&dir.path().join("data"));
        db.open_tree("deliveries")
            .expect("deliveries")
            .insert(key, value)
            .expect("insert");
        db.open_tree("received")
            .expect("received")
            .insert(received, &[])
            .expect("insert");
        db.flush().expect("flush");
    }
    let app = spawn_with(Options {
        sled_only: true,
        admin_token: Some("admin-token"),
        dir: Some(std::sync::Arc::new(dir)),
        ..Options::default()
    })
    .await;
    let replay = app.deliver("msg_json", body).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.text().await.expect("body"), answer);
    let other = app
        .deliver("msg_json", r#"{"type":"application.created"}"#)
        .await;
    assert_eq!(other.status(), 422);
    assert!(
        other
            .text()
            .await
            .expect("body")
            .contains("delivery_id_conflict")
    );
    let shown = app.admin_show("credicorp", "msg_json").await;
    assert_eq!(shown["record"]["id"], "msg_json", "{shown}");
    assert_eq!(shown["body"], body, "{shown}");
    assert!(
        shown.to_string().contains("webhook-timestamp"),
        "its headers: {shown}"
    );
}
