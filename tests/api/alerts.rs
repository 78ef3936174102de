//! Operational webhooks (design.md, "Observability"): a second `webhook-inbox` receives the
//! alerts of the first, as any Standard Webhooks sender's deliveries — it verifies their
//! signatures with the alert secret and deduplicates them — and each expected alert arrives
//! once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use webhook_inbox::{Delivery, Handler, HandlerContext, HandlerError, Registration};

use crate::helpers::{ALERT_SECRET, ALERT_SECRET_ENV, Options, event, eventually, spawn_with};

/// Fails every run of a delivery whose id starts with `bad`.
#[derive(Clone, Default)]
struct FailsBad;

#[async_trait]
impl Handler for FailsBad {
    async fn handle(&self, d: &Delivery, _: &HandlerContext) -> Result<(), HandlerError> {
        if d.id.starts_with("bad") {
            Err(HandlerError::Retryable("the partner is down".into()))
        } else {
            Ok(())
        }
    }
}

/// The alerts the receiving inbox ran its handler for: (type, id, body).
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, String, serde_json::Value)>>>);

#[async_trait]
impl Handler for Received {
    async fn handle(&self, d: &Delivery, _: &HandlerContext) -> Result<(), HandlerError> {
        let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap_or_default();
        self.0.lock().expect("lock").push((
            d.event_type.clone().unwrap_or_default(),
            d.id.clone(),
            body,
        ));
        Ok(())
    }
}

impl Received {
    fn of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .filter(|(t, _, _)| t == kind)
            .map(|(_, _, b)| b.clone())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_a_second_inbox_signed_and_once_each() {
    let received = Received::default();
    let ops = spawn_with(Options {
        extra_toml: format!("[sources.ops]\nsecrets = [\"{ALERT_SECRET}\"]\n"),
        handlers: vec![Registration::new("ops-log", received.clone()).source("ops")],
        ..Options::default()
    })
    .await;
    let app = spawn_with(Options {
        extra_toml: format!(
            "[[alerts]]\nurl = \"{}/webhooks/ops\"\nsecret_env = \"{ALERT_SECRET_ENV}\"\n\
             min_interval = \"1s\"\nfailing_after = 2\nrejections_over = 2\n",
            ops.address
        ),
        handlers: vec![Registration::new("payments", FailsBad).source("credicorp")],
        max_attempts: 2,
        ..Options::default()
    })
    .await;
    // Two failed runs (failing), dead (dead), a second dead within the interval
    // (counted into the next), then a success (recovered); three refused requests.
    assert_eq!(
        app.deliver("bad_1", &event("application.created", 1))
            .await
            .status(),
        202
    );
    assert!(
        eventually(Duration::from_secs(30), || received
            .of("delivery.dead")
            .len()
            == 1)
        .await,
        "the first dead letter is told at once"
    );
    assert_eq!(
        app.deliver("bad_2", &event("application.created", 2))
            .await
            .status(),
        202
    );
    // The success only once bad_2 is dead: run beside bad_2's, it could come between its
    // two failures and make them a second "failing" after a "recovered".
    assert!(
        crate::helpers::eventually_async(Duration::from_secs(30), || async {
            crate::helpers::dead_letters(&app).await == 2.0
        })
        .await,
        "bad_2 dead-lettered"
    );
    assert_eq!(
        app.deliver("good_1", &event("application.created", 3))
            .await
            .status(),
        202
    );
    for i in 0..3 {
        let body = event("application.created", 10 + i);
        let mut headers = app.sign(&format!("forged_{i}"), body.as_bytes());
        for (name, value) in &mut headers {
            if name == "webhook-signature" {
                *value = "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into();
            }
        }
        let response = app.post("credicorp", &headers, body.into_bytes()).await;
        assert_eq!(response.status(), 401);
    }
    let all_in = eventually(Duration::from_secs(30), || {
        received.of("delivery.dead").len() == 2
            && received.of("handler.failing").len() == 1
            && received.of("handler.recovered").len() == 1
            && received.of("source.rejections").len() == 1
    })
    .await;
    let seen = received.0.lock().expect("lock").clone();
    assert!(all_in, "{seen:#?}");
    let failing = &received.of("handler.failing")[0];
    assert_eq!(failing["data"]["subject"], "payments");
    assert_eq!(failing["data"]["details"]["consecutive_failures"], 2);
    let dead = received.of("delivery.dead");
    assert_eq!(dead[0]["data"]["details"]["delivery_id"], "bad_1");
    assert_eq!(dead[1]["data"]["details"]["delivery_id"], "bad_2");
    assert_eq!(dead[1]["data"]["count"], 1);
    let rejections = &received.of("source.rejections")[0];
    assert_eq!(rejections["data"]["subject"], "credicorp");
    // Each alert once, each with an id of its own.
    let mut ids: Vec<String> = seen.iter().map(|(_, id, _)| id.clone()).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "one run per alert id");
    assert!(ids.iter().all(|id| id.starts_with("alert_")));
    // Nothing more arrives: the counted alert was the only one held back.
    let settle = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        received.0.lock().expect("lock").len(),
        n,
        "nothing sent twice"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"webhook_inbox_alerts_total{event="delivery.dead",result="sent"} 2"#),
        "{metrics}"
    );
    app.stop().await;
    ops.stop().await;
}

/// An alert endpoint that is down is never in the way: while every alert to it waits for
/// its next retry, deliveries are answered and every handler runs as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_alert_endpoint_is_never_in_the_way() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let app = spawn_with(Options {
        extra_toml: format!(
            "[[alerts]]\nurl = \"http://127.0.0.1:{port}/hooks\"\nformat = \"slack\"\nfailing_after = 1\n"
        ),
        handlers: vec![Registration::new("payments", FailsBad).source("credicorp")],
        max_attempts: 1,
        ..Options::default()
    })
    .await;
    for i in 0..20 {
        let id = if i % 2 == 0 {
            format!("bad_{i}")
        } else {
            format!("good_{i}")
        };
        assert_eq!(
            app.deliver(&id, &event("application.created", i))
                .await
                .status(),
            202
        );
    }
    let recorder = app.recorder.clone();
    assert!(eventually(Duration::from_secs(30), || recorder.runs().len() == 20).await);
    app.stop().await;
}

/// Bad `[[alerts]]` tables are start-up errors naming the key.
#[test]
fn alert_configuration_errors_name_the_key() {
    for (table, says) in [
        ("url = \"ftp://x\"", "alerts[0].url"),
        (
            "url = \"http://x\"\nformat = \"slack\"\nevents = [\"handler.exploded\"]",
            "unknown alert `handler.exploded`",
        ),
        ("url = \"http://x\"", "alerts[0].secret_env"),
        (
            "url = \"http://x\"\nformat = \"slack\"\nfailing_after = 0",
            "failing_after must be at least 1",
        ),
    ] {
        let text = format!("[[alerts]]\n{table}\n");
        let e = webhook_inbox::config::Config::parse(&text, "t.toml")
            .expect_err(table)
            .to_string();
        assert!(e.contains(says), "{table}: {e}");
    }
}

/// An endpoint that refuses an alert at first gets it again (about a second later) with the
/// same `webhook-id`, signed afresh; the alert is counted sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_alert_is_retried_with_the_same_id() {
    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let kept = seen.clone();
    let server = HttpServer::new(move || {
        let kept = kept.clone();
        App::new().default_service(web::to(move |req: HttpRequest| {
            let kept = kept.clone();
            async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                let mut kept = kept.lock().expect("lock");
                kept.push((header("webhook-id"), header("webhook-signature")));
                if kept.len() == 1 {
                    HttpResponse::ServiceUnavailable().finish()
                } else {
                    HttpResponse::NoContent().finish()
                }
            }
        }))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .expect("bind");
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    let app = spawn_with(Options {
        extra_toml: format!(
            "[[alerts]]\nurl = \"http://127.0.0.1:{port}/hooks\"\nsecret_env = \"{ALERT_SECRET_ENV}\"\nevents = [\"delivery.dead\"]\n"
        ),
        handlers: vec![Registration::new("payments", FailsBad).source("credicorp")],
        max_attempts: 1,
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("bad_1", &event("application.created", 1))
            .await
            .status(),
        202
    );
    let requests = seen.clone();
    assert!(
        eventually(Duration::from_secs(30), || requests
            .lock()
            .expect("lock")
            .len()
            == 2)
        .await,
        "retried after the refusal"
    );
    let requests = seen.lock().expect("lock").clone();
    assert_eq!(requests[0].0, requests[1].0, "the same webhook-id");
    assert!(requests[0].0.starts_with("alert_"));
    assert!(
        requests
            .iter()
            .all(|(_, signature)| signature.starts_with("v1,"))
    );
    let sent = crate::helpers::eventually_async(Duration::from_secs(10), || async {
        app.metrics()
            .await
            .contains(r#"webhook_inbox_alerts_total{event="delivery.dead",result="sent"} 1"#)
    })
    .await;
    assert!(sent, "counted sent once");
    app.stop().await;
}
