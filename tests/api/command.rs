//! The `command` handler runs a real program: raw body on stdin, the documented
//! environment, and the exit-code contract (0 done, 65 dead, anything else retried).

use std::sync::Arc;
use std::time::Duration;

use webhook_inbox::config::Durability;
use webhook_inbox::store::{DeliveryKey, JobStatus};

use crate::helpers::{Options, event, eventually, open_store, spawn_with, wait_for_job};

fn command_handler(name: &str, events: &str, script: &str, out: &std::path::Path) -> String {
    format!(
        r#"
[[handlers]]
name = "{name}"
kind = "command"
source = "credicorp"
events = [{events}]
command = ["sh", "-c", {script:?}, "sh", "{out}"]
timeout = "20s"
"#,
        out = out.display()
    )
}

#[tokio::test]
async fn a_program_sees_the_raw_body_on_stdin_and_the_documented_environment() {
    let out = tempfile::TempDir::new().expect("out dir");
    let script = r#"cat > "$1/$WEBHOOK_ID.body" && env > "$1/$WEBHOOK_ID.tmp" && mv "$1/$WEBHOOK_ID.tmp" "$1/$WEBHOOK_ID.env""#;
    let app = spawn_with(Options {
        extra_toml: command_handler("to-disk", r#""application.*""#, script, out.path()),
        ..Options::default()
    })
    .await;
    // Raw bytes, with spacing a re-serialization would lose.
    let body = "{ \"type\": \"application.created\",\n  \"data\": {\"amount\": 1.50} }";
    assert_eq!(app.deliver("msg_cmd_1", body).await.status().as_u16(), 202);
    // A type the handler is not bound to.
    assert_eq!(
        app.deliver("msg_cmd_2", &event("payment_link.paid", 1))
            .await
            .status()
            .as_u16(),
        202
    );

    let env_file = out.path().join("msg_cmd_1.env");
    assert!(
        eventually(Duration::from_secs(20), || env_file.exists()).await,
        "the program ran"
    );
    let seen_body = std::fs::read(out.path().join("msg_cmd_1.body")).expect("body file");
    assert_eq!(seen_body, body.as_bytes(), "stdin is the raw body");
    let env = std::fs::read_to_string(&env_file).expect("env file");
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_owned)
    };
    assert_eq!(var("WEBHOOK_SOURCE").as_deref(), Some("credicorp"));
    assert_eq!(var("WEBHOOK_ID").as_deref(), Some("msg_cmd_1"));
    assert_eq!(
        var("WEBHOOK_EVENT_TYPE").as_deref(),
        Some("application.created")
    );
    assert_eq!(var("WEBHOOK_ATTEMPT").as_deref(), Some("1"));
    let key = DeliveryKey::new("credicorp", "msg_cmd_1")
        .job("to-disk")
        .idempotency_key();
    assert_eq!(var("IDEMPOTENCY_KEY"), Some(key));

    // The recorder (bound to every event) saw both; the command only the bound one.
    assert!(
        eventually(Duration::from_secs(20), || app
            .recorder
            .runs_of("msg_cmd_2")
            == 1)
        .await
    );
    app.stop().await;
    assert!(!out.path().join("msg_cmd_2.env").exists());
}

#[tokio::test]
async fn exit_65_is_dead_at_once_and_other_failures_are_retried_until_max_attempts() {
    let out = tempfile::TempDir::new().expect("out dir");
    let dir = Arc::new(tempfile::TempDir::new().expect("data dir"));
    let store = open_store(dir.path(), Durability::Fsync, None).await;
    let mut extra = command_handler(
        "permanent",
        r#""*""#,
        r#"echo "$WEBHOOK_ATTEMPT" >> "$1/permanent"; echo 'bad payload' >&2; exit 65"#,
        out.path(),
    );
    extra += &command_handler(
        "flaky",
        r#""*""#,
        r#"echo "$WEBHOOK_ATTEMPT $IDEMPOTENCY_KEY" >> "$1/flaky"; exit 3"#,
        out.path(),
    );
    let app = spawn_with(Options {
        extra_toml: extra,
        dir: Some(dir),
        store: Some(store.clone()),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_fail", &event("application.created", 1))
            .await
            .status()
            .as_u16(),
        202
    );

    let key = DeliveryKey::new("credicorp", "msg_fail");
    let permanent = wait_for_job(&*store, &key.job("permanent"), JobStatus::Dead).await;
    let flaky = wait_for_job(&*store, &key.job("flaky"), JobStatus::Dead).await;
    assert_eq!(permanent.attempts, 1, "exit 65 is never retried");
    assert!(
        permanent
            .last_error
            .unwrap_or_default()
            .contains("bad payload"),
        "stderr is kept as the error"
    );
    assert_eq!(flaky.attempts, 3, "max_attempts = 3");

    let flaky = std::fs::read_to_string(out.path().join("flaky")).expect("flaky log");
    let lines: Vec<(&str, &str)> = flaky
        .lines()
        .map(|l| l.split_once(' ').expect("attempt key"))
        .collect();
    assert_eq!(
        lines.iter().map(|l| l.0).collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    assert!(
        lines.iter().all(|l| l.1 == lines[0].1),
        "one idempotency key for every attempt"
    );
    // The recorder of the same delivery succeeded once, untouched by its siblings' retries.
    app.stop().await;
    let permanent = std::fs::read_to_string(out.path().join("permanent")).expect("log");
    assert_eq!(permanent.lines().count(), 1);
}

/// Whether `pid` is a live process (a zombie waiting to be reaped counts as dead).
fn is_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Issue 12: the program's environment is clean — the service's own variables (here the
/// ones cargo gives the test process) reach it only when the handler lists them in `env`.
#[tokio::test]
async fn a_program_gets_a_clean_environment_plus_its_allowlist() {
    let out = tempfile::TempDir::new().expect("out dir");
    let script = r#"env > "$1/$WEBHOOK_ID.tmp" && mv "$1/$WEBHOOK_ID.tmp" "$1/$WEBHOOK_ID.env""#;
    let mut extra = command_handler("plain", r#""*""#, script, &out.path().join("plain"));
    extra.push_str(&command_handler(
        "allowed",
        r#""*""#,
        script,
        &out.path().join("allowed"),
    ));
    extra.push_str("env = [\"CARGO_PKG_NAME\"]\n");
    std::fs::create_dir(out.path().join("plain")).expect("dir");
    std::fs::create_dir(out.path().join("allowed")).expect("dir");
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok() && std::env::var("CARGO_PKG_NAME").is_ok());
    let app = spawn_with(Options {
        extra_toml: extra,
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_env", &event("application.created", 1))
            .await
            .status()
            .as_u16(),
        202
    );
    let plain = out.path().join("plain/msg_env.env");
    let allowed = out.path().join("allowed/msg_env.env");
    assert!(
        eventually(Duration::from_secs(20), || plain.exists()
            && allowed.exists())
        .await
    );
    let plain = std::fs::read_to_string(plain).expect("env");
    let allowed = std::fs::read_to_string(allowed).expect("env");
    for env in [&plain, &allowed] {
        assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
        assert!(
            env.lines().any(|l| l.starts_with("IDEMPOTENCY_KEY=")),
            "{env}"
        );
        assert!(!env.contains("CARGO_MANIFEST_DIR"), "{env}");
    }
    assert!(!plain.contains("CARGO_PKG_NAME"), "{plain}");
    assert!(
        allowed.contains("CARGO_PKG_NAME=webhook-inbox"),
        "{allowed}"
    );
}

/// Issue 12: a timeout ends the program's whole process group, not only the program: a
/// shell script's background child does not outlive it.
#[tokio::test]
async fn a_timeout_kills_the_programs_children_too() {
    let out = tempfile::TempDir::new().expect("out dir");
    let script = r#"sleep 300 & echo $! > "$1/child.$WEBHOOK_ATTEMPT.tmp"; mv "$1/child.$WEBHOOK_ATTEMPT.tmp" "$1/child.$WEBHOOK_ATTEMPT.pid"; wait"#;
    let extra = command_handler("stuck", r#""*""#, script, out.path())
        .replace("timeout = \"20s\"", "timeout = \"500ms\"");
    let app = spawn_with(Options {
        extra_toml: extra,
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_stuck", &event("application.created", 1))
            .await
            .status()
            .as_u16(),
        202
    );
    let pid_file = out.path().join("child.1.pid");
    assert!(eventually(Duration::from_secs(20), || pid_file.exists()).await);
    let pid = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .to_owned();
    let gone = eventually(Duration::from_secs(20), || !is_alive(&pid)).await;
    // Leave nothing behind whatever happened.
    for entry in std::fs::read_dir(out.path()).expect("dir").flatten() {
        if let Ok(p) = std::fs::read_to_string(entry.path()) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", p.trim()])
                .status();
        }
    }
    assert!(gone, "the background child {pid} outlived the timeout");
}

/// Issue 22.6: a program that writes megabytes to stderr costs bounded memory; its error
/// keeps the end of what it wrote and says how much came before.
#[tokio::test]
async fn a_program_s_stderr_is_kept_bounded() {
    use webhook_inbox::Handler as _;
    let handler = webhook_inbox::handlers::CommandHandler::new(
        vec![
            "sh".into(),
            "-c".into(),
            "head -c 8000000 /dev/zero | tr '\\0' 'e' >&2; echo THE-END >&2; exit 3".into(),
        ],
        Duration::from_secs(60),
    );
    let delivery = webhook_inbox::testing::delivery("credicorp", "msg_1", None, "{}");
    let ctx = webhook_inbox::testing::context("noisy", &delivery);
    match handler.handle(&delivery, &ctx).await {
        Err(webhook_inbox::HandlerError::Retryable(m)) => {
            assert!(m.len() < 2048, "bounded: {} bytes", m.len());
            assert!(m.contains("exited 3") && m.ends_with("THE-END"), "{m}");
            assert!(m.contains("earlier bytes of stderr not kept"), "{m}");
        }
        other => panic!("exit 3 is retried: {other:?}"),
    }
}
