//! OpenTelemetry traces over OTLP/HTTP (design.md, "Observability"), against the real
//! binary and an OTLP receiver inside the test that decodes the protobuf: a sender's
//! `traceparent` is the parent of `receive`; each attempt's `run` links to that `receive`
//! (through the trace context stored with the delivery); the `call` of a run is its child;
//! the partner receives the same trace id in its `traceparent`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

use crate::helpers::{Options, config_text, event, eventually};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SENDER_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver (`POST /v1/traces`) keeping every span it is sent.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    use actix_web::{App, HttpResponse, HttpServer, web};
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let kept = spans.clone();
    let server = HttpServer::new(move || {
        let kept = kept.clone();
        App::new().route(
            "/v1/traces",
            web::post().to(move |body: web::Bytes| {
                let kept = kept.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body.as_ref()) {
                        Ok(request) => {
                            let mut kept = kept.lock().expect("lock");
                            for resource in request.resource_spans {
                                for scope in resource.scope_spans {
                                    kept.extend(scope.spans);
                                }
                            }
                            HttpResponse::Ok()
                                .content_type("application/x-protobuf")
                                .body(Vec::<u8>::new())
                        }
                        Err(_) => HttpResponse::BadRequest().finish(),
                    }
                }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .expect("bind");
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    (format!("http://127.0.0.1:{port}"), spans)
}

/// A partner that fails its first request (500) and accepts the rest, keeping each
/// request's `traceparent`.
async fn partner() -> (String, Arc<Mutex<Vec<String>>>) {
    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = seen.clone();
    let server = HttpServer::new(move || {
        let kept = kept.clone();
        App::new().default_service(web::to(move |req: HttpRequest| {
            let kept = kept.clone();
            async move {
                let traceparent = req
                    .headers()
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let mut kept = kept.lock().expect("lock");
                kept.push(traceparent);
                if kept.len() == 1 {
                    HttpResponse::InternalServerError().finish()
                } else {
                    HttpResponse::Created().json(serde_json::json!({"ok": true}))
                }
            }
        }))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .expect("bind");
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    (format!("http://127.0.0.1:{port}/cases"), seen)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| {
        match a.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            Value::BoolValue(b) => Some(b.to_string()),
            _ => None,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_s_trace_runs_from_the_sender_through_every_attempt_to_the_partner() {
    let (endpoint, spans) = otlp_receiver().await;
    let (partner_url, partner_seen) = partner().await;
    let dir = tempfile::TempDir::new().expect("dir");
    // A Redis stream sink beside it, when Redis is there (CI requires it).
    let redis_url = std::env::var("WEBHOOK_INBOX_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let stream = format!("traces{}", hex::encode(rand::random::<[u8; 6]>()));
    let redis = match redis::Client::open(redis_url.as_str()) {
        Ok(client) => tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .ok()
        .and_then(Result::ok),
        Err(_) => None,
    };
    if redis.is_none() {
        assert!(
            std::env::var("WEBHOOK_INBOX_TEST_BROKERS").as_deref() != Ok("required"),
            "Redis required"
        );
        println!("skipped: the broker message's traceparent (no Redis)");
    }
    let sink = if redis.is_some() {
        format!(
            "[[handlers]]\nname = \"to-redis\"\nkind = \"redis\"\nsource = \"credicorp\"\nurl = \"{redis_url}\"\nstream = \"{stream}\"\n"
        )
    } else {
        String::new()
    };
    let options = Options {
        extra_toml: format!(
            "[telemetry]\notlp_endpoint = \"{endpoint}\"\n\n[calls]\nmax_attempts = 1\n\n\
             [[handlers]]\nname = \"open-case\"\nkind = \"http\"\nsource = \"credicorp\"\nurl = \"{partner_url}\"\n{sink}"
        ),
        ..Options::default()
    };
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config_text(dir.path(), &options)).expect("config");
    let mut serving =
        crate::helpers::try_spawn_serve(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let config = webhook_inbox::config::Config::load(&config_path).expect("config");
    let source = webhook_inbox::verify::Source::named(&config, "credicorp").expect("source");
    let body = event("application.created", 1);
    let mut request = crate::helpers::client()
        .post(format!(
            "http://127.0.0.1:{}/webhooks/credicorp",
            serving.port
        ))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE_ID}-{SENDER_SPAN}-01"))
        .body(body.clone());
    for (k, v) in source.sign("msg_traced", body.as_bytes(), std::time::SystemTime::now()) {
        request = request.header(k, v);
    }
    assert_eq!(request.send().await.expect("sent").status(), 202);
    let partner = partner_seen.clone();
    assert!(
        eventually(Duration::from_secs(30), || partner
            .lock()
            .expect("lock")
            .len()
            == 2)
        .await,
        "the partner saw both attempts"
    );
    let broker_traceparent = if let Some(mut redis) = redis.clone() {
        let entry = || {
            let mut redis = redis.clone();
            let stream = stream.clone();
            async move {
                type Entry = (String, Vec<(String, String)>);
                let entries: Vec<Entry> = redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut redis)
                    .await
                    .unwrap_or_default();
                entries.into_iter().next()
            }
        };
        assert!(
            crate::helpers::eventually_async(Duration::from_secs(30), || async {
                entry().await.is_some()
            })
            .await,
            "the sink published"
        );
        let (_, fields) = entry().await.expect("an entry");
        let traceparent = fields
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.clone())
            .expect("the message carries a traceparent");
        let _: Result<(), _> = redis::cmd("DEL").arg(&stream).query_async(&mut redis).await;
        Some(traceparent)
    } else {
        None
    };
    // A graceful stop exports what is buffered.
    let pid = nix::unistd::Pid::from_raw(serving.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let _ = serving.child.wait();
    let kept = spans.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let spans = kept.lock().expect("lock");
            spans.iter().filter(|s| s.name == "call").count() >= 2
                && spans.iter().any(|s| s.name == "receive")
        })
        .await,
        "spans exported: {:?}",
        spans
            .lock()
            .expect("lock")
            .iter()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    );
    let spans = spans.lock().expect("lock").clone();
    let trace = hex::decode(TRACE_ID).expect("hex");
    let receive = spans
        .iter()
        .find(|s| s.name == "receive")
        .expect("a receive span");
    assert_eq!(receive.trace_id, trace, "the sender's trace");
    assert_eq!(
        receive.parent_span_id,
        hex::decode(SENDER_SPAN).expect("hex")
    );
    assert_eq!(
        attribute(receive, "delivery_id").as_deref(),
        Some("msg_traced")
    );
    let mut runs: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "run" && attribute(s, "handler").as_deref() == Some("open-case"))
        .collect();
    runs.sort_by_key(|s| attribute(s, "attempt"));
    assert_eq!(runs.len(), 2, "one run span per attempt");
    for (run, (attempt, result)) in runs.iter().zip([("1", "failed"), ("2", "succeeded")]) {
        assert_eq!(attribute(run, "attempt").as_deref(), Some(attempt));
        assert_eq!(attribute(run, "result").as_deref(), Some(result));
        assert!(
            run.links
                .iter()
                .any(|l| l.trace_id == receive.trace_id && l.span_id == receive.span_id),
            "run {attempt} links to its receive"
        );
        let call = spans
            .iter()
            .find(|s| s.name == "call" && s.parent_span_id == run.span_id)
            .unwrap_or_else(|| panic!("run {attempt} has its call"));
        assert_eq!(attribute(call, "step").as_deref(), Some("forward"));
    }
    if let Some(traceparent) = broker_traceparent {
        let run = spans
            .iter()
            .find(|s| s.name == "run" && attribute(s, "handler").as_deref() == Some("to-redis"))
            .expect("the sink's run");
        assert!(
            run.links.iter().any(|l| l.span_id == receive.span_id),
            "the sink's run links to receive"
        );
        let publish = spans
            .iter()
            .find(|s| s.name == "publish" && s.parent_span_id == run.span_id)
            .expect("a publish span in the sink's run");
        assert_eq!(
            traceparent,
            format!(
                "00-{}-{}-01",
                hex::encode(&publish.trace_id),
                hex::encode(&publish.span_id)
            ),
            "the broker message carries its publish span's traceparent"
        );
    }
    let second_run = runs[1];
    let partner = partner_seen.lock().expect("lock").clone();
    let last = partner.last().expect("a request");
    assert!(
        last.starts_with(&format!("00-{}-", hex::encode(&second_run.trace_id))),
        "the partner got the run's trace: {last}"
    );
}

/// Without an endpoint nothing is exported and nothing is added to outbound requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_no_traceparent_goes_out() {
    let (partner_url, partner_seen) = partner().await;
    let app = crate::helpers::spawn_with(Options {
        extra_toml: format!(
            "[calls]\nmax_attempts = 1\n\n[[handlers]]\nname = \"open-case\"\nkind = \"http\"\nsource = \"credicorp\"\nurl = \"{partner_url}\"\n"
        ),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_untraced", &event("application.created", 1))
            .await
            .status(),
        202
    );
    let partner = partner_seen.clone();
    assert!(
        eventually(Duration::from_secs(30), || partner
            .lock()
            .expect("lock")
            .len()
            == 2)
        .await
    );
    assert!(
        partner_seen
            .lock()
            .expect("lock")
            .iter()
            .all(String::is_empty)
    );
    app.stop().await;
}
