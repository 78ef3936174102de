//! design.md's invariants through the real endpoint: the verified id is the claimed id
//! (Svix's header names), one body under many ids runs once and leaves a trace, and a
//! processed-mode pair has one runner at a time however long it runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc};
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

use crate::helpers::{
    Options, Recorder, assert_error, assert_replayed, event, eventually, is_replayed, spawn_with,
};

/// The headers a Svix library sends: the Standard Webhooks ones under `svix-` names.
fn as_svix(headers: Vec<(String, String)>) -> Vec<(String, String)> {
    headers
        .into_iter()
        .map(|(k, v)| (k.replacen("webhook-", "svix-", 1), v))
        .collect()
}

/// Invariant 3: a sender that uses only `svix-id`, `svix-timestamp` and `svix-signature`
/// is verified against `svix-id`, and that is the id claimed.
#[tokio::test]
async fn svix_header_names_are_claimed_under_the_svix_id() {
    let app = spawn_with(Options::default()).await;
    let body = event("application.created", 1);
    let headers = as_svix(app.sign("msg_svix", body.as_bytes()));
    assert!(headers.iter().all(|(k, _)| k.starts_with("svix-")));
    let first = app
        .post("credicorp", &headers, body.clone().into_bytes())
        .await;
    assert_eq!(first.status().as_u16(), 202);
    let first: serde_json::Value = first.json().await.expect("json");
    assert_eq!(first["delivery_id"], "msg_svix");
    let again = app.post("credicorp", &headers, body.into_bytes()).await;
    assert_eq!(again.status().as_u16(), 202);
    assert_replayed(&again);
    assert!(
        eventually(Duration::from_secs(10), || app.recorder.runs_of("msg_svix")
            == 1)
        .await
    );
}

/// Invariant 3: with `id_header = "svix-id"`, a captured request (signed over its
/// `webhook-id`) resent with fresh `svix-id` values is the same delivery: the id claimed is
/// the one the signature covered, never a second header the replayer chose.
#[tokio::test]
async fn a_captured_request_resent_under_fresh_svix_ids_runs_nothing_again() {
    let app = spawn_with(Options {
        extra_toml: "id_header = \"svix-id\"\n".into(),
        ..Options::default()
    })
    .await;
    let body = event("application.created", 2);
    let mut captured = app.sign("msg_signed", body.as_bytes());
    captured.push(("svix-id".into(), "msg_signed".into()));
    let first = app
        .post("credicorp", &captured, body.clone().into_bytes())
        .await;
    assert_eq!(first.status().as_u16(), 202);
    let first = first.bytes().await.expect("body");
    for fresh in ["msg_fresh_1", "msg_fresh_2", "msg_fresh_3"] {
        let mut replayed = captured.clone();
        for (k, v) in replayed.iter_mut() {
            if k == "svix-id" {
                *v = fresh.into();
            }
        }
        let answer = app
            .post("credicorp", &replayed, body.clone().into_bytes())
            .await;
        assert_eq!(answer.status().as_u16(), 202);
        assert_replayed(&answer);
        assert_eq!(answer.bytes().await.expect("body"), first);
    }
    assert!(
        eventually(Duration::from_secs(10), || app
            .recorder
            .runs_of("msg_signed")
            == 1)
        .await
    );
    assert_eq!(app.recorder.runs().len(), 1, "{:?}", app.recorder.runs());
}

const GITHUB: &str = r#"
[sources.github]
scheme = "github"
secrets = ["github-secret"]
"#;

/// Invariants 4 and 8 of issue 10: one body under several ids — one after another or at the
/// same instant — runs each handler once; every later id is recorded as an alias of the
/// first (admin shows it, a metric counts it) and its own redeliveries replay the answer.
#[tokio::test]
async fn one_body_under_many_ids_runs_once_and_each_id_leaves_a_trace() {
    let github = Recorder::default();
    let app = Arc::new(
        spawn_with(Options {
            extra_toml: GITHUB.into(),
            handlers: vec![Registration::new("gh", github.clone()).source("github")],
            admin_token: Some("admin-token"),
            ..Options::default()
        })
        .await,
    );
    let body = br#"{"action":"opened","number":7}"#.to_vec();
    let mut tasks = Vec::new();
    for n in 0..16 {
        let app = app.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("gh-{n}");
            let mut headers = app.sign_for("github", &id, &body);
            headers.push(("x-github-event".into(), "pull_request".into()));
            let r = app.post("github", &headers, body).await;
            assert_eq!(r.status().as_u16(), 202);
            (id, is_replayed(&r), r.bytes().await.expect("body"))
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("sender"));
    }
    let firsts: Vec<&(String, bool, bytes::Bytes)> = answers
        .iter()
        .filter(|(_, replayed, _)| !replayed)
        .collect();
    assert_eq!(firsts.len(), 1, "exactly one id is new: {answers:?}");
    let (first_id, _, first_body) = firsts[0];
    assert!(
        answers.iter().all(|(_, _, b)| b == first_body),
        "one answer"
    );
    assert!(eventually(Duration::from_secs(10), || github.runs().len() == 1).await);
    assert_eq!(&github.runs()[0].id, first_id);

    // Every other id is stored, as an alias of the first.
    let alias = answers
        .iter()
        .find(|(id, _, _)| id != first_id)
        .map(|(id, _, _)| id.clone())
        .expect("an alias");
    let shown: serde_json::Value = app.admin_show("github", &alias).await;
    assert_eq!(shown["record"]["alias_of"], first_id.as_str(), "{shown}");
    assert_eq!(
        shown["body"],
        String::from_utf8(body.clone()).expect("utf8")
    );
    // Its own redelivery replays the same answer and runs nothing.
    let mut headers = app.sign_for("github", &alias, &body);
    headers.push(("x-github-event".into(), "pull_request".into()));
    let again = app.post("github", &headers, body.clone()).await;
    assert_replayed(&again);
    assert_eq!(&again.bytes().await.expect("body"), first_body);
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("outcome=\"body_duplicate\"")
                && l.contains("source=\"github\"")
                && l.ends_with(" 15")),
        "{metrics}"
    );
    assert_eq!(github.runs().len(), 1);
}

/// Blocks every run until a permit is added; reports each entry and counts overlaps.
#[derive(Clone)]
struct Slow {
    permits: Arc<Semaphore>,
    entered: mpsc::UnboundedSender<u32>,
    running: Arc<std::sync::atomic::AtomicUsize>,
    overlaps: Arc<std::sync::atomic::AtomicUsize>,
    fail_first: bool,
}

#[async_trait]
impl Handler for Slow {
    async fn handle(&self, d: &Delivery, _: &HandlerContext) -> Result<(), HandlerError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.running.fetch_add(1, SeqCst) > 0 {
            self.overlaps.fetch_add(1, SeqCst);
        }
        let _ = self.entered.send(d.attempt);
        if self.fail_first && d.attempt == 1 {
            self.running.fetch_sub(1, SeqCst);
            return Err(HandlerError::Retryable("first attempt fails".into()));
        }
        let permit = self.permits.acquire().await;
        self.running.fetch_sub(1, SeqCst);
        permit
            .map(|p| p.forget())
            .map_err(|e| HandlerError::Retryable(e.to_string()))
    }
}

fn slow(fail_first: bool) -> (Slow, mpsc::UnboundedReceiver<u32>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Slow {
            permits: Arc::new(Semaphore::new(0)),
            entered: tx,
            running: Arc::default(),
            overlaps: Arc::default(),
            fail_first,
        },
        rx,
    )
}

/// Issue 10 (a): a handler that runs longer than `processed_lease` keeps its lease (it is
/// renewed), so a copy sent after the lease would have lapsed gets 409, not a second run.
#[tokio::test]
async fn a_processed_lease_is_renewed_while_the_handler_runs() {
    let (handler, mut entered) = slow(false);
    let app = Arc::new(
        spawn_with(Options {
            ack: "processed",
            extra_toml: "processed_lease = \"1s\"\n".into(),
            handlers: vec![Registration::new("slow", handler.clone()).source("credicorp")],
            ..Options::default()
        })
        .await,
    );
    let body = event("application.created", 3);
    let first = {
        let app = app.clone();
        let body = body.clone();
        tokio::spawn(async move { app.deliver("msg_long", &body).await })
    };
    assert_eq!(entered.recv().await, Some(1));
    // Past the lease as first granted (1 s), the handler still running.
    let lapsed = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < lapsed {
        let copy = app.deliver("msg_long", &body).await;
        assert_error(copy, 409, "delivery_in_progress").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    handler.permits.add_permits(1);
    assert_eq!(first.await.expect("first").status().as_u16(), 200);
    assert!(entered.try_recv().is_err(), "the handler ran once");
    assert_eq!(
        handler.overlaps.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_replayed(&app.deliver("msg_long", &body).await);
}

/// Issue 10 (b): an operator retry of a processed-mode delivery while the sender's retry
/// runs it inline does not start a second run beside it.
#[tokio::test]
async fn an_operator_retry_never_runs_beside_the_senders_retry() {
    let (handler, mut entered) = slow(true);
    let app = Arc::new(
        spawn_with(Options {
            ack: "processed",
            handlers: vec![Registration::new("slow", handler.clone()).source("credicorp")],
            admin_token: Some("admin-token"),
            ..Options::default()
        })
        .await,
    );
    let body = event("application.created", 4);
    assert_error(app.deliver("msg_both", &body).await, 500, "handler_failed").await;
    assert_eq!(entered.recv().await, Some(1));
    let retry = {
        let app = app.clone();
        let body = body.clone();
        tokio::spawn(async move { app.deliver("msg_both", &body).await })
    };
    assert_eq!(entered.recv().await, Some(2), "the sender's retry runs it");
    let operator: serde_json::Value = app
        .client
        .post(format!(
            "{}/admin/deliveries/credicorp/msg_both/retry",
            app.admin_address
        ))
        .bearer_auth("admin-token")
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    // The recorder succeeded in the first run, and the running pair is not requeued.
    assert_eq!(operator["requeued"], serde_json::json!([]), "{operator}");
    handler.permits.add_permits(1);
    assert_eq!(retry.await.expect("retry").status().as_u16(), 200);
    let shown: serde_json::Value = app.admin_show("credicorp", "msg_both").await;
    let slow_state = shown["handlers"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == "slow"))
        .map(|h| h["state"].clone())
        .expect("slow handler");
    assert_eq!(slow_state["status"], "succeeded", "{shown}");
    assert_eq!(slow_state["attempts"], 2, "{shown}");
    assert!(entered.try_recv().is_err(), "no third run");
    assert_eq!(
        handler.overlaps.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// Issue 22.4, invariant 8: a logged body that fails its checksum is dead-lettered for its
/// handler with the reason, hands its `order_by` line on (the next delivery of the key
/// runs), and stays inspectable: the admin API answers 200 with `body_error` instead of 503.
/// Reproduced as reported: the handler paused, two 400-byte bodies of one key, the server
/// stopped, a byte of the first body flipped in `bodies/*.log`, restarted, resumed.
#[tokio::test]
async fn a_body_failing_its_checksum_is_dead_lettered_and_hands_its_line_on() {
    let in_line = crate::helpers::Recorder::default();
    let options = |dir: Option<std::sync::Arc<tempfile::TempDir>>| crate::helpers::Options {
        admin_token: Some("admin-token"),
        sled_only: true,
        dir,
        handlers: vec![
            webhook_inbox::Registration::new("in-line", in_line.clone())
                .source("credicorp")
                .ordered_by("/key"),
        ],
        ..crate::helpers::Options::default()
    };
    let app = crate::helpers::spawn_with(options(None)).await;
    let toggle = |app: &crate::helpers::TestApp, verb: &'static str| {
        app.client
            .post(format!(
                "{}/admin/handlers/in-line/{verb}",
                app.admin_address
            ))
            .bearer_auth("admin-token")
            .send()
    };
    assert!(
        toggle(&app, "pause")
            .await
            .expect("pause")
            .status()
            .is_success()
    );
    let body = |marker: &str| {
        format!(
            r#"{{"type":"application.created","key":"k1","marker":"{marker}","pad":"{}"}}"#,
            "x".repeat(330)
        )
    };
    for (id, marker) in [("msg_crc_1", "FIRSTBODY"), ("msg_crc_2", "SECONDBODY")] {
        assert_eq!(app.deliver(id, &body(marker)).await.status().as_u16(), 202);
    }
    let dir = app.stop().await;
    // Flip one byte of the first body where it lies in the body log.
    let segments: Vec<_> = std::fs::read_dir(dir.path().join("data").join("bodies"))
        .expect("body log")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    let mut flipped = false;
    for segment in segments {
        let mut bytes = std::fs::read(&segment).expect("segment");
        if let Some(at) = bytes.windows(9).position(|w| w == b"FIRSTBODY") {
            bytes[at] ^= 0x01;
            std::fs::write(&segment, bytes).expect("write segment");
            flipped = true;
        }
    }
    assert!(flipped, "the first body is in the body log");

    let app = crate::helpers::spawn_with(options(Some(dir))).await;
    assert!(
        toggle(&app, "resume")
            .await
            .expect("resume")
            .status()
            .is_success()
    );
    let settled = crate::helpers::eventually_async(std::time::Duration::from_secs(30), || async {
        let first = app.admin_show("credicorp", "msg_crc_1").await;
        let second = app.admin_show("credicorp", "msg_crc_2").await;
        let state = |v: &serde_json::Value| {
            v["handlers"]
                .as_array()
                .and_then(|h| h.iter().find(|h| h["name"] == "in-line"))
                .map(|h| h["state"]["status"].clone())
        };
        state(&first) == Some("dead".into()) && state(&second) == Some("succeeded".into())
    })
    .await;
    let first = app.admin_show("credicorp", "msg_crc_1").await;
    assert!(
        settled,
        "the unreadable one dead, the next of its line run: {first:#}"
    );
    assert!(
        first["body_error"]
            .as_str()
            .is_some_and(|e| e.contains("body unreadable") && e.contains("checksum")),
        "{first:#}"
    );
    assert!(first["body"].is_null(), "no wrong bytes shown: {first:#}");
    let handler = first["handlers"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["name"] == "in-line"))
        .expect("in-line");
    assert!(
        handler["state"]["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("body unreadable")),
        "{handler:#}"
    );
    let ran: Vec<String> = in_line.runs().into_iter().map(|r| r.id).collect();
    assert_eq!(
        ran,
        vec!["msg_crc_2".to_owned()],
        "never run on wrong bytes"
    );
    app.stop().await;
}
