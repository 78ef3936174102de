//! Downstream calls (design.md, "Downstream calls") against the partner simulator
//! (`examples/partner/simulator.rs`, on a real port): one key per step, the same on every
//! retry and run; retries through every fault; the journal that answers a later run
//! without a network call; a step that changed; and `webhook-inbox call` in a `command`
//! handler of the real binary, killed with SIGKILL after its second step.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use webhook_inbox::store::DeliveryKey;
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

use crate::helpers::{Options, TestApp, event, eventually, eventually_async, spawn_with};

#[path = "../../examples/partner/simulator.rs"]
mod simulator;

use simulator::{Fault, Partner};

/// Fast retries inside a call, so the faults cost little time.
const FAST_CALLS: &str = r#"
[calls]
timeout = "2s"
max_attempts = 6
initial_backoff = "10ms"
max_backoff = "50ms"
max_elapsed = "20s"
"#;

/// Polls the admin API until handler `handler` of delivery `id` has `status`; its state.
async fn wait_for(app: &TestApp, id: &str, handler: &str, status: &str) -> serde_json::Value {
    let state = |shown: &serde_json::Value| {
        shown["handlers"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["name"] == handler))
            .map(|h| h["state"].clone())
            .unwrap_or_default()
    };
    let reached = eventually_async(Duration::from_secs(60), || async {
        state(&app.admin_show("credicorp", id).await)["status"] == status
    })
    .await;
    let shown = app.admin_show("credicorp", id).await;
    assert!(reached, "{id}/{handler} never {status}: {shown}");
    state(&shown)
}

async fn partner(ignore_keys: bool) -> Partner {
    Partner::start("127.0.0.1:0".parse().expect("addr"), ignore_keys)
        .await
        .expect("simulator")
}

/// What each run of [`Steps`] saw of each step: (attempt, step, status, replayed).
type Seen = Arc<Mutex<Vec<(u32, String, u16, bool)>>>;

/// A handler making steps `a`, `b`, `c` at the partner; its first attempt stops after `b`
/// with a retryable error (as a crash there would), and `body_of` says each step's body.
#[derive(Clone)]
struct Steps {
    partner: String,
    seen: Seen,
    fail_first_after: Option<&'static str>,
    body_of: fn(u32, &str) -> String,
}

#[async_trait]
impl Handler for Steps {
    async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
        for step in ["a", "b", "c"] {
            let response = ctx
                .call(step)
                .post(format!("{}/links/{step}", self.partner))
                .header("Authorization", "Bearer partner-secret")
                .json(&serde_json::json!({ "delivery": d.id, "body": (self.body_of)(d.attempt, step) }))
                .send()
                .await?;
            self.seen.lock().expect("lock").push((
                d.attempt,
                step.to_owned(),
                response.status,
                response.replayed,
            ));
            if d.attempt == 1 && self.fail_first_after == Some(step) {
                return Err(HandlerError::Retryable(format!("stopped after {step}")));
            }
        }
        Ok(())
    }
}

fn same_body(_: u32, step: &str) -> String {
    format!("step {step}")
}

fn keys(id: &str, handler: &str) -> Vec<String> {
    let job = DeliveryKey::new("credicorp", id).job(handler);
    ["a", "b", "c"].iter().map(|s| job.step_key(s)).collect()
}

/// A run stopped after step b: the next attempt gets a and b from the journal (no network
/// call, `replayed`) and calls c once; the partner acted once per step, under each step's
/// own key.
#[tokio::test]
async fn a_later_run_replays_journaled_steps_and_calls_the_rest_once() {
    let partner = partner(false).await;
    let seen = Seen::default();
    let handler = Steps {
        partner: partner.url(),
        seen: seen.clone(),
        fail_first_after: Some("b"),
        body_of: same_body,
    };
    let app = spawn_with(Options {
        extra_toml: FAST_CALLS.into(),
        handlers: vec![Registration::new("steps", handler).source("credicorp")],
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    let body = event("application.created", 1);
    assert_eq!(app.deliver("msg_steps", &body).await.status(), 202);
    wait_for(&app, "msg_steps", "steps", "succeeded").await;
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen,
        vec![
            (1, "a".into(), 201, false),
            (1, "b".into(), 201, false),
            (2, "a".into(), 201, true),
            (2, "b".into(), 201, true),
            (2, "c".into(), 201, false),
        ]
    );
    for key in keys("msg_steps", "steps") {
        assert_eq!(partner.actions(&key), 1, "one action for {key}");
    }
    assert_eq!(partner.total_actions(), 3);
    // The admin API shows each step: status, attempts, when, replayed; no header, no query.
    let shown: serde_json::Value = app
        .admin_get("/admin/deliveries/credicorp/msg_steps")
        .await
        .json()
        .await
        .expect("json");
    let steps = shown["handlers"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == "steps"))
        .map(|h| h["steps"].clone())
        .expect("the handler's steps");
    assert_eq!(steps.as_array().map(Vec::len), Some(3), "{steps}");
    assert_eq!(steps[0]["step"], "a");
    assert_eq!(steps[0]["status"], 201);
    assert_eq!(steps[0]["replayed"], 1);
    assert_eq!(steps[2]["replayed"], 0);
    let text = shown.to_string();
    assert!(!text.contains("partner-secret"), "{text}");

    // The console's delivery page shows the same steps.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let signed_in = http
        .post(format!("{}/console/sign-in", app.admin_address))
        .form(&[("token", "admin-token")])
        .send()
        .await
        .expect("sign in");
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("name=value")
        .to_owned();
    let page = http
        .get(format!(
            "{}/console/deliveries/credicorp/msg_steps",
            app.admin_address
        ))
        .header("cookie", cookie)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert!(page.contains("Downstream calls"), "{page}");
    for key in keys("msg_steps", "steps") {
        assert!(page.contains(&key), "the page shows step key {key}");
    }
    assert!(!page.contains("partner-secret"));
}

/// Every fault of the simulator in turn, one per step: each step still acts exactly once at
/// a partner that honours keys, and the run succeeds in one attempt.
#[tokio::test]
async fn through_every_fault_each_step_acts_once() {
    let partner = partner(false).await;
    for fault in [
        Fault::ActThenDrop,
        Fault::ActThenFail,
        Fault::Throttle(1),
        Fault::ThrottleUntil(1),
        // Slower than `calls.timeout`: the retry finds the first still in flight (409).
        Fault::Slow(Duration::from_millis(2500)),
    ] {
        partner.push_fault(fault);
    }
    let seen = Seen::default();
    let handler = Steps {
        partner: partner.url(),
        seen: seen.clone(),
        fail_first_after: None,
        body_of: same_body,
    };
    let app = spawn_with(Options {
        extra_toml: FAST_CALLS.into(),
        handlers: vec![Registration::new("steps", handler).source("credicorp")],
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    for id in ["msg_fault_1", "msg_fault_2"] {
        assert_eq!(
            app.deliver(id, &event("application.created", 1))
                .await
                .status(),
            202
        );
        wait_for(&app, id, "steps", "succeeded").await;
        for key in keys(id, "steps") {
            assert_eq!(partner.actions(&key), 1, "{id}: one action for {key}");
        }
    }
    let state = wait_for(&app, "msg_fault_1", "steps", "succeeded").await;
    assert_eq!(
        state["attempts"], 1,
        "retried inside the calls, not by dispatch"
    );
    assert_eq!(partner.total_actions(), 6);
}

/// At a partner that ignores keys, the journal still keeps a later run from acting again;
/// what it cannot close is an exchange retried after the partner acted (the connection
/// dropped after the action): measured here as the honest limit.
#[tokio::test]
async fn at_a_partner_that_ignores_keys_only_a_retried_exchange_acts_twice() {
    let partner = partner(true).await;
    let seen = Seen::default();
    let handler = Steps {
        partner: partner.url(),
        seen: seen.clone(),
        fail_first_after: Some("b"),
        body_of: same_body,
    };
    let app = spawn_with(Options {
        extra_toml: FAST_CALLS.into(),
        handlers: vec![Registration::new("steps", handler).source("credicorp")],
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_nokeys", &event("application.created", 1))
            .await
            .status(),
        202
    );
    wait_for(&app, "msg_nokeys", "steps", "succeeded").await;
    assert_eq!(partner.total_actions(), 3, "two runs, one action per step");

    partner.push_fault(Fault::ActThenDrop);
    assert_eq!(
        app.deliver("msg_nokeys_2", &event("application.created", 2))
            .await
            .status(),
        202
    );
    wait_for(&app, "msg_nokeys_2", "steps", "succeeded").await;
    let a = &keys("msg_nokeys_2", "steps")[0];
    assert_eq!(
        partner.actions(a),
        2,
        "the dropped exchange was retried and the partner acted again"
    );
    assert_eq!(partner.total_actions(), 3 + 4);
}

/// A step whose request changes between runs fails for good with the contract's message;
/// the partner is not called for it again.
#[tokio::test]
async fn a_step_that_changes_between_runs_fails_for_good() {
    let partner = partner(false).await;
    fn changing(attempt: u32, step: &str) -> String {
        format!("step {step} at {attempt}")
    }
    let handler = Steps {
        partner: partner.url(),
        seen: Seen::default(),
        fail_first_after: Some("a"),
        body_of: changing,
    };
    let app = spawn_with(Options {
        extra_toml: FAST_CALLS.into(),
        handlers: vec![Registration::new("steps", handler).source("credicorp")],
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_nondet", &event("application.created", 1))
            .await
            .status(),
        202
    );
    let state = wait_for(&app, "msg_nondet", "steps", "dead").await;
    let error = state["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("step a sent a different request than before: a step must be deterministic"),
        "{error}"
    );
    assert_eq!(partner.total_actions(), 1);
}

/// Without a journal (a second client for the same pair), the partner itself refuses a
/// reused key with another request: 422 ends the run for good. A bad step name is refused
/// before anything is sent, naming it; a refused connection runs out of attempts, retryably.
#[tokio::test]
async fn refusals_and_unreachable_partners() {
    let partner = partner(false).await;
    let job = DeliveryKey::new("credicorp", "msg_direct").job("direct");
    let settings = webhook_inbox::config::Config::parse(
        &format!("{FAST_CALLS}\n[sources.credicorp]\nsecrets = [\"whsec_dGVzdA==\"]\n"),
        "t.toml",
    )
    .expect("config")
    .calls;
    let calls = webhook_inbox::calls::Calls::direct(job.clone(), settings);
    let first = calls
        .step("open")
        .post(format!("{}/cases", partner.url()))
        .body("one")
        .send()
        .await
        .expect("answer");
    assert_eq!((first.status, first.replayed), (201, false));
    let again = calls
        .step("open")
        .post(format!("{}/cases", partner.url()))
        .body("one")
        .send()
        .await
        .expect("answer");
    assert_eq!(
        again.body, first.body,
        "the partner replayed its first answer"
    );
    let refused = calls
        .step("open")
        .post(format!("{}/cases", partner.url()))
        .body("two")
        .send()
        .await
        .expect_err("422");
    assert!(refused.is_permanent());
    assert_eq!(
        refused.to_string(),
        "step open: the partner refused a reused key with a different request"
    );
    assert_eq!(partner.actions(&job.step_key("open")), 1);

    let bad = calls
        .step("open case")
        .post(partner.url())
        .send()
        .await
        .expect_err("bad step");
    assert!(
        bad.is_permanent() && bad.to_string().contains("`open case`"),
        "{bad}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let unreachable = calls
        .step("open")
        .post(format!("http://127.0.0.1:{port}/cases?token=s3cr3t"))
        .send()
        .await
        .expect_err("refused");
    assert!(!unreachable.is_permanent());
    let text = unreachable.to_string();
    assert!(
        text.starts_with("step open: no final answer after 6 attempt(s)"),
        "{text}"
    );
    assert!(!text.contains("s3cr3t"), "{text}");
}

/// A `command` handler calling two steps with `webhook-inbox call`, in the real binary,
/// killed with SIGKILL after its second step: after the restart the next attempt gets both
/// from the journal and the partner acted once per step. A finished run's loopback token is
/// refused.
#[tokio::test]
async fn webhook_inbox_call_in_a_command_handler_survives_sigkill() {
    let partner = partner(false).await;
    let dir = tempfile::TempDir::new().expect("dir");
    let marks = dir.path().join("marks");
    std::fs::create_dir_all(&marks).expect("marks");
    let bin = env!("CARGO_BIN_EXE_webhook-inbox");
    // Attempt 1 makes both steps, then waits to be killed; attempt 2 makes both again.
    let script = format!(
        r#"set -e
"{bin}" call one POST "{p}/links/one" --data '{{"n":1}}' > "$1/one.$WEBHOOK_ATTEMPT" 2> "$1/one.err.$WEBHOOK_ATTEMPT"
"{bin}" call two POST "{p}/links/two" -H "Authorization: Bearer s3cr3t" --data @- < "$1/one.$WEBHOOK_ATTEMPT" > "$1/two.$WEBHOOK_ATTEMPT" 2> "$1/two.err.$WEBHOOK_ATTEMPT"
echo "$WEBHOOK_INBOX_CALLS" > "$1/url.$WEBHOOK_ATTEMPT"
if [ "$WEBHOOK_ATTEMPT" = 1 ]; then touch "$1/waiting"; sleep 60; fi
"#,
        p = partner.url()
    );
    let options = Options {
        extra_toml: format!(
            "{FAST_CALLS}\n[[handlers]]\nname = \"caller\"\nkind = \"command\"\nsource = \"credicorp\"\nevents = [\"application.*\"]\ncommand = [\"sh\", \"-c\", {script:?}, \"sh\", \"{}\"]\ntimeout = \"90s\"\n",
            marks.display()
        ),
        ..Options::default()
    };
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        crate::helpers::config_text(dir.path(), &options),
    )
    .expect("config");
    let (mut child, port) = crate::crash::start(&config_path);
    let config = webhook_inbox::config::Config::load(&config_path).expect("config");
    let source = config.sources["credicorp"].clone();
    let client = crate::helpers::client();
    let port = std::sync::atomic::AtomicU16::new(port);
    let body = event("application.created", 7);
    crate::crash::send_until_acknowledged(&client, &port, &source, "msg_cmd_calls", &body).await;
    assert!(
        eventually(Duration::from_secs(60), || marks.join("waiting").exists()).await,
        "attempt 1 made both steps"
    );
    let job = DeliveryKey::new("credicorp", "msg_cmd_calls").job("caller");
    let (one, two) = (job.step_key("one"), job.step_key("two"));
    assert_eq!((partner.actions(&one), partner.actions(&two)), (1, 1));
    let first_answer = std::fs::read_to_string(marks.join("two.1")).expect("step two's answer");
    assert!(first_answer.contains(&two), "{first_answer}");
    let url = std::fs::read_to_string(marks.join("url.1")).expect("url");
    // The journal is written without waiting for the disk; any later durable write (here
    // the fsync'd ack of a delivery no handler of this test takes) carries it to the disk,
    // sled's log being written in order. Without it a kill could lose the entries, and the
    // partner's own key would close the gap instead (the answers would still match).
    crate::crash::send_until_acknowledged(&client, &port, &source, "msg_flush", &event("ping", 1))
        .await;
    child.kill().expect("SIGKILL");
    let _ = child.wait();

    let (mut child, new_port) = crate::crash::start(&config_path);
    port.store(new_port, std::sync::atomic::Ordering::SeqCst);
    // `url.2` is written last, and exists (empty) before its line is in it: the run is
    // over once that line is whole.
    assert!(
        eventually(Duration::from_secs(60), || {
            std::fs::read_to_string(marks.join("url.2")).is_ok_and(|url| url.ends_with('\n'))
        })
        .await,
        "attempt 2 ran"
    );
    assert_eq!(
        (partner.actions(&one), partner.actions(&two)),
        (1, 1),
        "the journal answered both steps"
    );
    assert_eq!(
        std::fs::read_to_string(marks.join("two.2")).expect("answer"),
        first_answer,
        "the same answer, from the journal"
    );
    let replayed = std::fs::read_to_string(marks.join("two.err.2")).unwrap_or_default();
    assert!(replayed.contains("answered from the journal"), "{replayed}");
    // The first process's token died with it; the second run's token, once its run ended.
    let url2 = std::fs::read_to_string(marks.join("url.2")).expect("url");
    let admin_base = url2
        .trim()
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .expect("base");
    let finished = eventually_async(Duration::from_secs(30), || {
        let client = client.clone();
        let url2 = url2.trim().to_owned();
        async move {
            client
                .post(&url2)
                .json(&serde_json::json!({"step": "x", "method": "POST", "url": "http://127.0.0.1:1/"}))
                .send()
                .await
                .is_ok_and(|r| r.status() == 404)
        }
    })
    .await;
    assert!(finished, "a finished run's token is refused");
    let old_token = url
        .trim()
        .rsplit_once('/')
        .map(|(_, t)| t.to_owned())
        .expect("token");
    let stale = client
        .post(format!("{admin_base}/{old_token}"))
        .json(&serde_json::json!({"step": "x", "method": "POST", "url": "http://127.0.0.1:1/"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(stale.status(), 404);
    child.kill().expect("stop");
    let _ = child.wait();
}

/// An answer over `journal_max_bytes`: the handler is given its first bytes, flagged
/// `body_truncated`, live and replayed alike (the rest is never read).
#[tokio::test]
async fn an_answer_over_journal_max_bytes_is_kept_cut_and_flagged() {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let server = HttpServer::new(|| {
        App::new().default_service(web::to(|| async {
            HttpResponse::Created()
                .content_type("text/plain")
                .body("x".repeat(5000))
        }))
    })
    .workers(1)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .expect("bind");
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);

    type Bodies = Arc<Mutex<Vec<(usize, bool, bool)>>>;
    #[derive(Clone)]
    struct Big {
        url: String,
        seen: Bodies,
    }
    #[async_trait]
    impl Handler for Big {
        async fn handle(&self, d: &Delivery, ctx: &HandlerContext) -> Result<(), HandlerError> {
            let r = ctx.call("fetch").post(&self.url).send().await?;
            self.seen
                .lock()
                .expect("lock")
                .push((r.body.len(), r.body_truncated, r.replayed));
            if d.attempt == 1 {
                return Err(HandlerError::Retryable("once more".into()));
            }
            Ok(())
        }
    }
    let seen = Bodies::default();
    let app = spawn_with(Options {
        extra_toml: format!("{FAST_CALLS}journal_max_bytes = 1024\n"),
        handlers: vec![
            Registration::new(
                "big",
                Big {
                    url: format!("http://127.0.0.1:{port}/big"),
                    seen: seen.clone(),
                },
            )
            .source("credicorp"),
        ],
        admin_token: Some("admin-token"),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_big", &event("application.created", 1))
            .await
            .status(),
        202
    );
    wait_for(&app, "msg_big", "big", "succeeded").await;
    assert_eq!(
        seen.lock().expect("lock").clone(),
        vec![(1024, true, false), (1024, true, true)]
    );
    handle.stop(false).await;
}

/// On PostgreSQL with two replicas: the replica running a two-step `command` handler is
/// killed after both steps; the other takes the pair over (after the run lease and its
/// grace), its attempt 2 gets both steps from the journal, and the partner acted once per
/// step, under the same keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_steps_are_replayed_by_the_replica_that_takes_over() {
    let Some(server) = crate::helpers::test_postgres_url("calls: replica take-over") else {
        return;
    };
    let url = crate::helpers::fresh_postgres_schema(&server).await;
    let partner = partner(false).await;
    let dir = tempfile::TempDir::new().expect("dir");
    let marks = dir.path().join("marks");
    std::fs::create_dir_all(&marks).expect("marks");
    let bin = env!("CARGO_BIN_EXE_webhook-inbox");
    let script = format!(
        r#"set -e
"{bin}" call one POST "{p}/links/one" --data '{{"n":1}}' > /dev/null
"{bin}" call two POST "{p}/links/two" --data '{{"n":2}}' > "$1/two.$WEBHOOK_ATTEMPT" 2> "$1/two.err.$WEBHOOK_ATTEMPT"
echo "$PPID" > "$1/pid.$WEBHOOK_ATTEMPT"
if [ "$WEBHOOK_ATTEMPT" = 1 ]; then sleep 60; fi
"#,
        p = partner.url()
    );
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[storage]
backend = "postgres"
postgres_url = "{url}"
pool_size = 4

[dispatch]
initial_backoff = "50ms"
max_backoff = "200ms"
run_lease = "2s"

{FAST_CALLS}

[sources.credicorp]
secrets = ["{secret}"]

[[handlers]]
name = "caller"
kind = "command"
source = "credicorp"
command = ["sh", "-c", {script:?}, "sh", "{marks}"]
timeout = "90s"
"#,
        secret = crate::helpers::SECRET,
        marks = marks.display(),
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &config).expect("config");
    let mut replicas: Vec<crate::helpers::Serving> = (0..2)
        .map(|_| crate::helpers::try_spawn_serve(&config_path).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let client = crate::helpers::client();
    let source = webhook_inbox::config::Config::parse(&config, "t.toml")
        .expect("config")
        .sources["credicorp"]
        .clone();
    let port = std::sync::atomic::AtomicU16::new(replicas[0].port);
    crate::crash::send_until_acknowledged(
        &client,
        &port,
        &source,
        "msg_takeover_calls",
        &event("application.created", 3),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(60), || marks.join("pid.1").exists()).await,
        "attempt 1 made both steps"
    );
    let runner: u32 = std::fs::read_to_string(marks.join("pid.1"))
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    let victim = replicas
        .iter()
        .position(|r| r.child.id() == runner)
        .expect("the run belongs to a replica");
    let mut killed = replicas.remove(victim);
    killed.child.kill().expect("SIGKILL");
    let _ = killed.child.wait();
    assert!(
        eventually(Duration::from_secs(60), || marks.join("pid.2").exists()).await,
        "the surviving replica ran attempt 2"
    );
    let taken_over_by: u32 = std::fs::read_to_string(marks.join("pid.2"))
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    assert_eq!(taken_over_by, replicas[0].child.id());
    let job = DeliveryKey::new("credicorp", "msg_takeover_calls").job("caller");
    assert_eq!(
        (
            partner.actions(&job.step_key("one")),
            partner.actions(&job.step_key("two"))
        ),
        (1, 1)
    );
    assert_eq!(
        std::fs::read_to_string(marks.join("two.2")).expect("answer"),
        std::fs::read_to_string(marks.join("two.1")).expect("answer"),
    );
    assert!(
        std::fs::read_to_string(marks.join("two.err.2"))
            .unwrap_or_default()
            .contains("answered from the journal")
    );
    for mut r in replicas {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}
