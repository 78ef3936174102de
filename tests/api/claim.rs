//! design.md "claim": new, replay byte for byte, conflict, concurrency, restart, storage
//! failure, and what `durability` promises.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use webhook_inbox::config::Durability;

use webhook_inbox::store::{Claims, DeliveryKey};

use crate::helpers::{
    Options, SyncGate, assert_error, assert_replayed, event, eventually, eventually_async,
    open_store, spawn_app, spawn_with,
};

#[tokio::test]
async fn a_new_delivery_is_202_with_the_contract_body_and_runs_its_handler_once() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    let response = app.deliver("msg_new", &body).await;
    assert_eq!(response.status().as_u16(), 202);
    assert!(response.headers().get("idempotent-replayed").is_none());
    let json: serde_json::Value = response.json().await.expect("json");
    assert_eq!(json["status"], "accepted");
    assert_eq!(json["source"], "credicorp");
    assert_eq!(json["delivery_id"], "msg_new");
    let received_at = json["received_at"].as_str().expect("received_at");
    humantime::parse_rfc3339(received_at).expect("RFC 3339");

    assert!(
        eventually(Duration::from_secs(10), || app.recorder.runs_of("msg_new")
            == 1)
        .await
    );
    let run = &app.recorder.runs()[0];
    assert_eq!(run.event_type.as_deref(), Some("application.created"));
    assert_eq!(run.body, body.as_bytes());
    assert_eq!(run.attempt, 1);
    assert_eq!(run.idempotency_key.len(), 64);
}

#[tokio::test]
async fn a_redelivery_gets_the_first_answer_byte_for_byte_and_runs_nothing() {
    let app = spawn_app().await;
    let body = event("application.created", 1);
    let first = app.deliver("msg_replay", &body).await;
    let first_status = first.status();
    let first_body = first.bytes().await.expect("body");
    assert!(
        eventually(Duration::from_secs(10), || app
            .recorder
            .runs_of("msg_replay")
            == 1)
        .await
    );

    // A sender's retry is signed afresh (new timestamp), same id, same body.
    tokio::time::sleep(Duration::from_millis(5)).await; // a different received_at if re-recorded
    for _ in 0..3 {
        let again = app.deliver("msg_replay", &body).await;
        assert_eq!(again.status(), first_status);
        assert_replayed(&again);
        assert_eq!(again.bytes().await.expect("body"), first_body);
    }
    // The first copy's run happens (not waited for by the answer); then, once the app has
    // stopped, nothing ran again.
    let stopped = app.recorder.clone();
    assert!(
        eventually(Duration::from_secs(20), || stopped.runs_of("msg_replay")
            >= 1)
        .await
    );
    app.stop().await;
    assert_eq!(stopped.runs_of("msg_replay"), 1);
}

#[tokio::test]
async fn a_known_id_with_another_body_is_422_and_changes_nothing() {
    let app = spawn_app().await;
    let original = event("application.created", 1);
    let first = app
        .deliver("msg_conflict", &original)
        .await
        .bytes()
        .await
        .expect("body");

    let other = event("application.created", 2);
    assert_error(
        app.deliver("msg_conflict", &other).await,
        422,
        "delivery_id_conflict",
    )
    .await;
    assert_error(
        app.deliver("msg_conflict", &other).await,
        422,
        "delivery_id_conflict",
    )
    .await;

    let again = app.deliver("msg_conflict", &original).await;
    assert_replayed(&again);
    assert_eq!(again.bytes().await.expect("body"), first);
    let recorder = app.recorder.clone();
    assert!(
        eventually(Duration::from_secs(20), || recorder.runs_of("msg_conflict")
            >= 1)
        .await
    );
    app.stop().await;
    assert_eq!(recorder.runs_of("msg_conflict"), 1);
    assert_eq!(recorder.runs()[0].body, original.as_bytes());
}

#[tokio::test]
async fn sixty_four_concurrent_copies_run_one_handler_and_get_one_answer() {
    let app = Arc::new(spawn_app().await);
    let body = event("payment_link.provisioned", 7);
    let headers = app.sign("msg_storm", body.as_bytes());
    let requests: Vec<_> = (0..64)
        .map(|_| {
            let app = app.clone();
            let headers = headers.clone();
            let body = body.clone().into_bytes();
            tokio::spawn(async move {
                let response = app.post("credicorp", &headers, body).await;
                let replayed = response.headers().get("idempotent-replayed").is_some();
                (
                    response.status().as_u16(),
                    replayed,
                    response.bytes().await.expect("body"),
                )
            })
        })
        .collect();
    let mut answers = Vec::new();
    for r in requests {
        answers.push(r.await.expect("join"));
    }
    assert!(
        answers.iter().all(|(status, _, _)| *status == 202),
        "{answers:?}"
    );
    assert!(
        answers.iter().all(|(_, _, b)| *b == answers[0].2),
        "bodies differ"
    );
    assert_eq!(
        answers.iter().filter(|(_, replayed, _)| !replayed).count(),
        1,
        "exactly one first answer"
    );

    let app = Arc::into_inner(app).expect("sole owner");
    let recorder = app.recorder.clone();
    assert!(
        eventually(Duration::from_secs(10), || recorder.runs_of("msg_storm")
            >= 1)
        .await
    );
    app.stop().await;
    assert_eq!(recorder.runs_of("msg_storm"), 1);
}

#[tokio::test]
async fn after_a_restart_the_delivery_is_still_replayed_and_runs_nothing() {
    let app = spawn_app().await;
    let body = event("application.updated", 3);
    let first = app
        .deliver("msg_restart", &body)
        .await
        .bytes()
        .await
        .expect("body");
    let recorder = app.recorder.clone();
    assert!(
        eventually(Duration::from_secs(10), || recorder.runs_of("msg_restart")
            == 1)
        .await
    );
    let dir = app.stop().await;

    let app = spawn_with(Options {
        dir: Some(dir),
        ..Options::default()
    })
    .await;
    let again = app.deliver("msg_restart", &body).await;
    assert_eq!(again.status().as_u16(), 202);
    assert_replayed(&again);
    assert_eq!(again.bytes().await.expect("body"), first);
    assert_error(
        app.deliver("msg_restart", &event("application.updated", 4))
            .await,
        422,
        "delivery_id_conflict",
    )
    .await;
    let recorder = app.recorder.clone();
    app.stop().await;
    assert_eq!(
        recorder.runs_of("msg_restart"),
        0,
        "nothing runs again after a restart"
    );
}

#[tokio::test]
async fn a_failed_flush_answers_503_never_2xx_and_the_store_stays_closed() {
    let dir = Arc::new(tempfile::TempDir::new().expect("dir"));
    let store = open_store(
        dir.path(),
        Durability::Fsync,
        Some(Box::new(|| {
            Err(std::io::Error::other("injected: disk write cache failure"))
        })),
    )
    .await;
    let app = spawn_with(Options {
        dir: Some(dir),
        store: Some(store),
        ..Options::default()
    })
    .await;
    let response = app
        .deliver("msg_disk_fails", &event("application.created", 1))
        .await;
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_error(response, 503, "storage_unavailable").await;
    // What reached the disk is unknown after a failed fsync: refuse, don't replay a 202.
    assert_error(
        app.deliver("msg_disk_fails", &event("application.created", 1))
            .await,
        503,
        "storage_unavailable",
    )
    .await;
    assert_error(
        app.deliver("msg_other", &event("application.created", 1))
            .await,
        503,
        "storage_unavailable",
    )
    .await;
    let ready = app
        .client
        .get(format!("{}/readyz", app.admin_address))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    let health = app
        .client
        .get(format!("{}/healthz", app.admin_address))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
}

/// With `durability = "fsync"`, the 202 is sent only after the sync step returns: a sync
/// held open by a gate holds the answer back, and releasing it lets the 202 through.
#[tokio::test]
async fn an_fsync_ack_waits_until_the_record_is_on_disk() {
    let dir = Arc::new(tempfile::TempDir::new().expect("dir"));
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(release_rx);
    let store = open_store(
        dir.path(),
        Durability::Fsync,
        Some(Box::new(move || {
            let _ = entered_tx.send(());
            let _ = release_rx
                .lock()
                .expect("lock")
                .recv_timeout(Duration::from_secs(30));
            Ok(())
        })),
    )
    .await;
    let app = Arc::new(
        spawn_with(Options {
            dir: Some(dir),
            store: Some(store),
            ..Options::default()
        })
        .await,
    );
    let request = tokio::spawn({
        let app = app.clone();
        async move {
            app.deliver("msg_gated", &event("application.created", 1))
                .await
                .status()
        }
    });
    tokio::task::spawn_blocking(move || entered_rx.recv().expect("sync entered"))
        .await
        .expect("join");
    // The sync is held: no answer may arrive, however long we look.
    let early = tokio::time::timeout(Duration::from_millis(300), async {
        while !request.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(early.is_err(), "answered before the record was on disk");
    release_tx.send(()).expect("release");
    assert_eq!(request.await.expect("join").as_u16(), 202);
    // Later syncs (the dispatcher's) pass straight through.
    drop(release_tx);
}

/// A redelivery waits for the disk only when the record it read may not be there yet: while
/// a new delivery's sync is held shut, sixteen concurrent copies of a delivery acknowledged
/// before are answered at once (they waited for the whole batch before), and sixteen of the
/// held delivery are not answered until its record is on disk.
#[tokio::test]
async fn a_redelivery_waits_for_the_disk_only_for_a_write_to_its_own_record() {
    let dir = Arc::new(tempfile::TempDir::new().expect("dir"));
    let gate = SyncGate::default();
    let _open_at_the_end = gate.opened_on_drop();
    let store = open_store(dir.path(), Durability::Fsync, Some(gate.hook())).await;
    let app = Arc::new(
        spawn_with(Options {
            dir: Some(dir),
            store: Some(store.clone()),
            ..Options::default()
        })
        .await,
    );
    let earlier_body = event("application.created", 1);
    let earlier = app.deliver("msg_earlier", &earlier_body).await;
    assert_eq!(earlier.status().as_u16(), 202);
    let earlier = earlier.bytes().await.expect("body");

    gate.set(true);
    let held_body = event("application.created", 2);
    let held = tokio::spawn({
        let (app, body) = (app.clone(), held_body.clone());
        async move { app.deliver("msg_held", &body).await.status() }
    });
    // Its record is written (and its claim waits at the gate).
    let held_key = DeliveryKey::new("credicorp", "msg_held");
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            store.record(&held_key).await.expect("read").is_some()
        })
        .await,
        "the held delivery's record is written"
    );

    // Sixteen copies at once of each: none of the earlier one's waits, all of the held one's do.
    let copies_of = |id: &'static str, body: &str| {
        (0..16)
            .map(|_| {
                let (app, body) = (app.clone(), body.to_owned());
                tokio::spawn(async move { app.deliver(id, &body).await })
            })
            .collect::<Vec<_>>()
    };
    for again in copies_of("msg_earlier", &earlier_body) {
        let again = tokio::time::timeout(Duration::from_secs(10), again)
            .await
            .expect(
                "a copy of a delivery on disk is answered while another write waits for the disk",
            )
            .expect("join");
        assert_eq!(again.status().as_u16(), 202);
        assert_replayed(&again);
        assert_eq!(again.bytes().await.expect("body"), earlier);
    }

    let copies = copies_of("msg_held", &held_body);
    // The held record is not on disk: no answer may arrive from it, however long we look.
    let early = tokio::time::timeout(Duration::from_millis(300), async {
        while !copies.iter().any(|copy| copy.is_finished()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        early.is_err(),
        "a copy was answered before the record was on disk"
    );
    assert!(!held.is_finished(), "the held delivery was answered");
    gate.set(false);
    assert_eq!(held.await.expect("join").as_u16(), 202);
    for copy in copies {
        let copy = copy.await.expect("join");
        assert_eq!(copy.status().as_u16(), 202);
        assert_replayed(&copy);
    }
}

/// With `durability = "buffered"` the ack does not wait for any flush. (The `quiet` source
/// has no handlers, so only requests could wait.)
#[tokio::test]
async fn buffered_acks_do_not_wait_for_a_flush_and_fsync_acks_do() {
    for (durability, expected_waits) in [(Durability::Buffered, 0), (Durability::Fsync, 5)] {
        let dir = Arc::new(tempfile::TempDir::new().expect("dir"));
        let store = open_store(dir.path(), durability, None).await;
        let app = spawn_with(Options {
            durability: if durability == Durability::Fsync {
                "fsync"
            } else {
                "buffered"
            },
            dir: Some(dir),
            store: Some(store.clone()),
            extra_toml: format!(
                "[sources.quiet]\nsecrets = [\"{}\"]\n",
                crate::helpers::SECRET
            ),
            ..Options::default()
        })
        .await;
        let before = store.group_commit().stats().waiters.load(Ordering::SeqCst);
        for i in 0..5 {
            let body = event("application.created", i);
            let headers = app.sign(&format!("msg_q_{i}"), body.as_bytes());
            let response = app.post("quiet", &headers, body.into_bytes()).await;
            assert_eq!(response.status().as_u16(), 202);
        }
        let waited = store.group_commit().stats().waiters.load(Ordering::SeqCst) - before;
        assert_eq!(waited, expected_waits, "{durability:?}");
        app.stop().await;
    }
}

#[tokio::test]
async fn health_endpoints_answer_on_the_admin_listener() {
    let app = spawn_app().await;
    for path in ["healthz", "readyz"] {
        let r = app
            .client
            .get(format!("{}/{path}", app.admin_address))
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
    // Not on the public listener.
    let r = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 404);
}
