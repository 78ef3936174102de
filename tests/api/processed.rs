//! `ack = "processed"`: handlers run before the answer; 200 stored and replayed; 409 for a
//! concurrent duplicate; 500 and a retry that re-runs only what failed.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc};
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

use crate::helpers::{Options, Recorder, assert_error, assert_replayed, event, spawn_with};

fn processed() -> Options {
    Options {
        ack: "processed",
        ..Options::default()
    }
}

#[tokio::test]
async fn all_handlers_succeed_then_200_is_stored_and_replayed_byte_for_byte() {
    let app = spawn_with(processed()).await;
    let body = event("application.decision_made", 1);
    let first = app.deliver("msg_proc", &body).await;
    assert_eq!(first.status().as_u16(), 200);
    // The handler ran before the answer.
    assert_eq!(app.recorder.runs_of("msg_proc"), 1);
    let first = first.bytes().await.expect("body");
    let json: serde_json::Value = serde_json::from_slice(&first).expect("json");
    assert_eq!(json["status"], "processed");

    let again = app.deliver("msg_proc", &body).await;
    assert_eq!(again.status().as_u16(), 200);
    assert_replayed(&again);
    assert_eq!(again.bytes().await.expect("body"), first);
    assert_error(
        app.deliver("msg_proc", &event("application.decision_made", 2))
            .await,
        422,
        "delivery_id_conflict",
    )
    .await;
    assert_eq!(app.recorder.runs_of("msg_proc"), 1);
}

/// Blocks every run until a permit is added; reports each entry.
struct Gate {
    permits: Arc<Semaphore>,
    entered: mpsc::UnboundedSender<()>,
}

#[async_trait]
impl Handler for Gate {
    async fn handle(&self, _: &Delivery, _: &HandlerContext) -> Result<(), HandlerError> {
        let _ = self.entered.send(());
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
        permit.forget();
        Ok(())
    }
}

#[tokio::test]
async fn a_concurrent_duplicate_gets_409_with_retry_after_while_the_first_runs() {
    let permits = Arc::new(Semaphore::new(0));
    let (entered_tx, mut entered) = mpsc::unbounded_channel();
    let app = Arc::new(
        spawn_with(Options {
            handlers: vec![Registration::new(
                "gate",
                Gate {
                    permits: permits.clone(),
                    entered: entered_tx,
                },
            )],
            ..processed()
        })
        .await,
    );
    let body = event("payment_link.provisioned", 1);
    let first = tokio::spawn({
        let app = app.clone();
        let body = body.clone();
        async move { app.deliver("msg_busy", &body).await }
    });
    tokio::time::timeout(Duration::from_secs(20), entered.recv())
        .await
        .expect("the first copy reached the handler");

    let duplicate = app.deliver("msg_busy", &body).await;
    let retry_after: u64 = duplicate
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    assert!(retry_after >= 1);
    assert_error(duplicate, 409, "delivery_in_progress").await;

    permits.add_permits(1);
    let first = first.await.expect("join");
    assert_eq!(first.status().as_u16(), 200);
    let first = first.bytes().await.expect("body");
    let again = app.deliver("msg_busy", &body).await;
    assert_eq!(again.status().as_u16(), 200);
    assert_eq!(again.bytes().await.expect("body"), first);
    assert_eq!(app.recorder.runs_of("msg_busy"), 1);
}

#[tokio::test]
async fn a_failed_handler_answers_500_and_the_retry_reruns_only_the_failure() {
    let flaky = Recorder {
        fail_first: 1,
        ..Recorder::default()
    };
    let app = spawn_with(Options {
        handlers: vec![Registration::new("flaky", flaky.clone()).source("credicorp")],
        ..processed()
    })
    .await;
    let body = event("identity_check.completed", 1);
    assert_error(app.deliver("msg_half", &body).await, 500, "handler_failed").await;
    assert_eq!(app.recorder.runs_of("msg_half"), 1);
    assert_eq!(flaky.runs_of("msg_half"), 1);

    let retry = app.deliver("msg_half", &body).await;
    assert_eq!(
        retry.status().as_u16(),
        200,
        "the sender's retry completes it"
    );
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(
        app.recorder.runs_of("msg_half"),
        1,
        "the handler that succeeded did not run again"
    );
    let runs = flaky.runs();
    assert_eq!(runs.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(runs[0].idempotency_key, runs[1].idempotency_key);

    let replay = app.deliver("msg_half", &body).await;
    assert_replayed(&replay);
    assert_eq!(flaky.runs_of("msg_half"), 2);
}

/// With a short retention, an expired id is accepted as new again; the sweep runs in the
/// background of the real app.
#[tokio::test]
async fn an_expired_id_is_accepted_again() {
    let app = spawn_with(Options {
        retention: "1s",
        tolerance: "1s",
        ..Options::default()
    })
    .await;
    let body = event("application.created", 1);
    assert_eq!(
        app.deliver("msg_expiring", &body).await.status().as_u16(),
        202
    );
    let second = app.deliver("msg_expiring", &body).await;
    assert!(
        second.headers().get("idempotent-replayed").is_some(),
        "unexpired: replayed"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = app
            .deliver("msg_expiring", &event("application.created", 1))
            .await;
        assert_eq!(r.status().as_u16(), 202);
        if r.headers().get("idempotent-replayed").is_none() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        crate::helpers::eventually(Duration::from_secs(20), || app
            .recorder
            .runs_of("msg_expiring")
            == 2)
        .await
    );
}
