//! The `http` handler against a real local HTTP server: the headers it sends, and the
//! retry / give-up split by status code.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use webhook_inbox::config::Durability;
use webhook_inbox::store::{DeliveryKey, JobQueue, JobStatus};

use crate::helpers::{Options, event, open_store, spawn_with, wait_for_job};

#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

/// A downstream API: `/status/{a}/{b}/…` answers a, then b, … then 200 forever.
#[derive(Clone, Default)]
struct Downstream {
    seen: Arc<Mutex<Vec<Seen>>>,
}

async fn downstream(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<Downstream>,
) -> HttpResponse {
    let path = req.path().to_owned();
    let mut seen = state.seen.lock().expect("lock");
    let nth = seen.iter().filter(|s| s.path == path).count();
    seen.push(Seen {
        path: path.clone(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body: body.to_vec(),
    });
    let script: Vec<u16> = path
        .trim_start_matches("/status/")
        .split('/')
        .filter_map(|s| s.parse().ok())
        .collect();
    let status = script.get(nth).copied().unwrap_or(200);
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).expect("status"))
        .body("downstream says hi")
}

fn start_downstream() -> (Downstream, u16, actix_web::dev::ServerHandle) {
    let state = Downstream::default();
    let data = web::Data::new(state.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .default_service(web::to(downstream))
    })
    .workers(1)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .expect("bind");
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    (state, port, handle)
}

fn http_handler(name: &str, port: u16, path: &str) -> String {
    format!(
        "\n[[handlers]]\nname = \"{name}\"\nkind = \"http\"\nsource = \"credicorp\"\nurl = \"http://127.0.0.1:{port}{path}\"\ntimeout = \"10s\"\n"
    )
}

#[tokio::test]
async fn sends_the_documented_headers_and_splits_retry_from_give_up_by_status() {
    let (downstream, port, server) = start_downstream();
    let dir = Arc::new(tempfile::TempDir::new().expect("dir"));
    let store = open_store(dir.path(), Durability::Fsync, None).await;
    let cases = [
        ("ok", "/status/200", JobStatus::Succeeded, 1),
        // Retried inside the one run, with the same key (the `forward` step's client).
        (
            "unavailable-then-ok",
            "/status/503",
            JobStatus::Succeeded,
            1,
        ),
        (
            "throttled-then-ok",
            "/status/429/408",
            JobStatus::Succeeded,
            1,
        ),
        (
            "conflict-then-ok",
            "/status/409/425",
            JobStatus::Succeeded,
            1,
        ),
        ("rejected", "/status/422", JobStatus::Dead, 1),
        ("gone", "/status/404", JobStatus::Dead, 1),
        // Out of exchanges in each run (three here), then dispatch's back-off: three runs.
        (
            "always-5xx",
            "/status/500/502/500/500/503/503/500/500/500",
            JobStatus::Dead,
            3,
        ),
    ];
    let mut extra: String = cases
        .iter()
        .map(|(name, path, ..)| http_handler(name, port, path))
        .collect();
    extra.push_str(
        "\n[calls]\nmax_attempts = 3\ninitial_backoff = \"10ms\"\nmax_backoff = \"20ms\"\n",
    );
    let app = spawn_with(Options {
        extra_toml: extra,
        dir: Some(dir),
        store: Some(store.clone()),
        ..Options::default()
    })
    .await;
    let body = "{\"type\": \"payment_link.paid\",  \"amount\": 10}";
    assert_eq!(app.deliver("msg_http", body).await.status().as_u16(), 202);

    let key = DeliveryKey::new("credicorp", "msg_http");
    for (name, _, expected, attempts) in cases {
        // Succeeded and dead are final: the state is checked once it is reached.
        let job = wait_for_job(&*store, &key.job(name), expected).await;
        assert_eq!(job.attempts, attempts, "{name}: {job:?}");
    }
    app.stop().await;
    server.stop(true).await;

    let seen = downstream.seen.lock().expect("lock").clone();
    let first = seen
        .iter()
        .find(|s| s.path == "/status/200")
        .expect("called");
    assert_eq!(first.body, body.as_bytes(), "the raw body");
    assert_eq!(
        first.headers["idempotency-key"],
        key.job("ok").idempotency_key()
    );
    assert_eq!(first.headers["webhook-source"], "credicorp");
    assert_eq!(first.headers["webhook-id"], "msg_http");
    assert_eq!(first.headers["webhook-event-type"], "payment_link.paid");
    assert_eq!(first.headers["content-type"], "application/json");
    let retried: Vec<_> = seen
        .iter()
        .filter(|s| s.path == "/status/429/408")
        .collect();
    assert_eq!(retried.len(), 3);
    assert!(
        retried
            .iter()
            .all(|s| s.headers["idempotency-key"] == retried[0].headers["idempotency-key"])
    );
    let error = store
        .job(&key.job("rejected"))
        .await
        .expect("read")
        .expect("job")
        .last_error
        .unwrap_or_default();
    assert_eq!(
        error,
        "permanent: step forward: the partner refused a reused key with a different request"
    );
}

#[tokio::test]
async fn a_refused_connection_is_retried() {
    // Bind then drop: nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dir = Arc::new(tempfile::TempDir::new().expect("dir"));
    let store = open_store(dir.path(), Durability::Fsync, None).await;
    let app = spawn_with(Options {
        extra_toml: http_handler("nobody-home", port, "/"),
        dir: Some(dir),
        store: Some(store.clone()),
        ..Options::default()
    })
    .await;
    assert_eq!(
        app.deliver("msg_refused", &event("payment_link.paid", 1))
            .await
            .status()
            .as_u16(),
        202
    );
    let job = DeliveryKey::new("credicorp", "msg_refused").job("nobody-home");
    let state = wait_for_job(&*store, &job, JobStatus::Dead).await;
    assert_eq!(state.attempts, 3, "retried up to max_attempts");
}

/// Issue 22.6: the `http` handler follows no redirect (a 3xx is a final failure naming the
/// Location, without its credentials or query), and reads a final error's body only up to
/// `calls.journal_max_bytes`, keeping its start and saying there was more; a 5xx's body is
/// not read at all (the exchange is retried, then the run fails retryably).
#[tokio::test]
async fn a_redirect_is_a_final_failure_and_an_error_body_is_capped() {
    async fn target(req: HttpRequest) -> HttpResponse {
        match req.path() {
            "/moved" => HttpResponse::Found()
                .insert_header(("Location", "http://user:pw@127.0.0.1:9/elsewhere?token=x"))
                .finish(),
            "/huge" => HttpResponse::BadRequest().body("E".repeat(4 << 20)),
            "/down" => HttpResponse::InternalServerError().body("E".repeat(4 << 20)),
            _ => HttpResponse::Ok().finish(),
        }
    }
    let server = HttpServer::new(|| App::new().default_service(web::to(target)))
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .expect("bind");
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    let delivery = webhook_inbox::testing::delivery("credicorp", "msg_1", None, "{}");
    let ctx = webhook_inbox::testing::context("forward", &delivery);
    let call = |path: &str| {
        webhook_inbox::handlers::HttpHandler::new(
            &format!("http://127.0.0.1:{port}{path}"),
            std::time::Duration::from_secs(10),
        )
        .expect("url")
    };
    use webhook_inbox::Handler as _;
    match call("/moved").handle(&delivery, &ctx).await {
        Err(webhook_inbox::HandlerError::Permanent(m)) => {
            assert!(
                m.contains("302") && m.contains("127.0.0.1:9/elsewhere"),
                "{m}"
            );
            assert!(!m.contains("pw") && !m.contains("token"), "{m}");
        }
        other => panic!("a redirect is final: {other:?}"),
    }
    match call("/huge").handle(&delivery, &ctx).await {
        Err(webhook_inbox::HandlerError::Permanent(m)) => {
            assert!(m.len() < 2048, "capped: {} bytes", m.len());
            assert!(m.contains("400") && m.contains("at least"), "{m}");
        }
        other => panic!("a 400 is final: {other:?}"),
    }
    match call("/down").handle(&delivery, &ctx).await {
        Err(webhook_inbox::HandlerError::Retryable(m)) => {
            assert!(m.starts_with("step forward: no final answer after"), "{m}");
            assert!(m.contains("answered 500") && m.len() < 512, "{m}");
        }
        other => panic!("a 500 is retried: {other:?}"),
    }
    handle.stop(false).await;
}
