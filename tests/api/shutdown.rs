//! SIGTERM against the real binary: stop accepting, finish the request in flight, exit 0.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use webhook_inbox::config::Config;
use webhook_inbox::verify::Source;

use crate::helpers::{Options, config_text};

#[test]
fn sigterm_finishes_the_request_in_flight_and_exits_zero() {
    let dir = tempfile::TempDir::new().expect("dir");
    // `ack = "processed"` with a handler that waits for a file: the request is provably in
    // flight (the handler has started) when the signal arrives.
    let script = r#"touch "$1/started"; while [ ! -e "$1/release" ] && [ -e "$1" ]; do sleep 0.01; done; cat > /dev/null"#;
    let extra = format!(
        "\n[[handlers]]\nname = \"slow\"\nkind = \"command\"\nsource = \"credicorp\"\ncommand = [\"sh\", \"-c\", {script:?}, \"sh\", \"{}\"]\n",
        dir.path().display()
    );
    let text = config_text(
        dir.path(),
        &Options {
            ack: "processed",
            extra_toml: extra,
            ..Options::default()
        },
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).expect("write config");
    let (mut child, port, drain) = crate::helpers::spawn_binary(&config_path);

    let config = Config::parse(&text, "t.toml").expect("config");
    let source = Source::from_config("credicorp", &config.sources["credicorp"], "t.toml", &|_| {
        None
    })
    .expect("source");
    let body = br#"{"type":"application.created","data":{"n":1}}"#.to_vec();
    let headers = source.sign("msg_in_flight", &body, SystemTime::now());
    let request = std::thread::spawn(move || {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        let mut request = client
            .post(format!("http://127.0.0.1:{port}/webhooks/credicorp"))
            .body(body);
        for (k, v) in headers {
            request = request.header(k, v);
        }
        let response = request.send().expect("answered");
        (
            response.status().as_u16(),
            response.text().unwrap_or_default(),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("started").exists() {
        assert!(Instant::now() < deadline, "the handler never started");
        std::thread::sleep(Duration::from_millis(10));
    }

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Wait until the listener is closed: the signal has been handled.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        child.try_wait().expect("wait").is_none(),
        "exited with a request in flight"
    );
    std::fs::write(dir.path().join("release"), b"").expect("release");
    let (status, text) = request.join().expect("request thread");
    assert_eq!(status, 200, "the in-flight request finished: {text}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    let rest = drain.join().expect("logs");
    assert!(status.success(), "exit status {status:?}\n{rest}");
}

/// The signal handlers are in place before the "serving" line: a SIGTERM right after it is
/// a graceful stop (exit 0), not the default action (killed by signal 15). Found by the
/// crash test, whose last restart is sometimes stopped at once.
#[test]
fn sigterm_right_after_the_serving_line_is_a_clean_exit() {
    for _ in 0..3 {
        let dir = tempfile::TempDir::new().expect("dir");
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config_text(dir.path(), &Options::default())).expect("write");
        let (mut child, _port, logs) = crate::helpers::spawn_binary(&config_path);
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let status = child.wait().expect("exit");
        let logs = logs.join().expect("logs");
        assert!(status.success(), "{status:?}\n{logs}");
    }
}

/// The store's background tasks end in the shutdown sequence, not whenever the last handle
/// to the store is dropped: after a graceful stop, a PostgreSQL store that is still held
/// elsewhere runs none (its LISTEN task and migrations retry were running while it served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_ends_the_store_s_background_tasks() {
    let Some(server) = crate::helpers::test_postgres_url("shutdown: store tasks") else {
        return;
    };
    let pg = crate::helpers::postgres_store(&server).await;
    assert!(
        pg.running_tasks() > 0,
        "the LISTEN task runs while it serves"
    );
    let app = crate::helpers::spawn_with(Options {
        store: Some(pg.clone()),
        ..Options::default()
    })
    .await;
    app.stop().await;
    assert_eq!(pg.running_tasks(), 0);
}

/// The same for sled: the group-commit thread ends in the shutdown sequence, and a store
/// still held afterwards (a test, a tool) keeps its durability: a claim waits for a sync
/// run in its caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_ends_sled_s_group_commit_and_the_store_stays_durable() {
    use webhook_inbox::store::{Claim, Claims as _, NewDelivery, StoredResponse};
    let dir = tempfile::TempDir::new().expect("dir");
    let sled = Arc::new(
        webhook_inbox::store::SledStore::open(
            &dir.path().join("data"),
            webhook_inbox::config::Durability::Fsync,
            8 << 20,
        )
        .expect("store"),
    );
    assert!(sled.group_commit().is_running());
    let app = crate::helpers::spawn_with(Options {
        store: Some(sled.clone()),
        ..Options::default()
    })
    .await;
    assert_eq!(app.deliver("msg_before_stop", "{}").await.status(), 202);
    let config = app.config.clone();
    app.stop().await;
    assert!(!sled.group_commit().is_running(), "ended by the shutdown");
    let batches = sled
        .group_commit()
        .stats()
        .batches
        .load(std::sync::atomic::Ordering::SeqCst);
    let source = webhook_inbox::verify::Source::named(&config, "credicorp").expect("source");
    let delivery = webhook_inbox::testing::authenticated(
        &source,
        "msg_after_stop",
        b"{}",
        std::time::SystemTime::now(),
    )
    .expect("signed");
    let new = NewDelivery::new(delivery, 1, Vec::new(), false).acknowledged(StoredResponse {
        status: 202,
        body: "{}".into(),
    });
    assert!(matches!(sled.claim(new).await.expect("claim"), Claim::New));
    assert_eq!(
        sled.group_commit()
            .stats()
            .batches
            .load(std::sync::atomic::Ordering::SeqCst),
        batches,
        "the thread's counters stand still: the sync ran in the caller"
    );
}
