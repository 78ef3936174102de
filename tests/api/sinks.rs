//! Sinks against the real brokers (design.md, "Sinks"): one suite every sink passes, each
//! case reading back with the broker's own client. NATS with JetStream on
//! `WEBHOOK_INBOX_TEST_NATS_URL` (default `nats://127.0.0.1:4222`), Redis on
//! `WEBHOOK_INBOX_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`). A broker that cannot
//! be reached skips its group with one line, unless `WEBHOOK_INBOX_TEST_BROKERS=required`
//! (CI), where it fails.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use webhook_inbox::Handler as _;
use webhook_inbox::handlers::sinks::nats::NatsSink;
use webhook_inbox::handlers::sinks::redis::RedisSink;

use crate::helpers::{Options, event, spawn_with};

/// A message as a consumer reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadBack {
    name: String,
    body: Bytes,
    meta: HashMap<String, String>,
}

fn required() -> bool {
    std::env::var("WEBHOOK_INBOX_TEST_BROKERS").as_deref() == Ok("required")
}

fn skip_or_fail(group: &str, why: &str) {
    assert!(
        !required(),
        "{group}: broker required but unreachable: {why}"
    );
    println!("skipped: {group}: {why}");
}

fn unique() -> String {
    format!("t{}", hex::encode(rand::random::<[u8; 6]>()))
}

fn nats_url() -> String {
    std::env::var("WEBHOOK_INBOX_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn redis_url() -> String {
    std::env::var("WEBHOOK_INBOX_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One broker under test: where a test's messages go, and how to read them back.
enum Broker {
    Nats {
        js: async_nats::jetstream::Context,
        stream: String,
        prefix: String,
    },
    Redis {
        connection: redis::aio::MultiplexedConnection,
        prefix: String,
    },
}

impl Broker {
    async fn nats() -> Option<Broker> {
        let client =
            match tokio::time::timeout(Duration::from_secs(5), async_nats::connect(nats_url()))
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    skip_or_fail("sinks on NATS", &e.to_string());
                    return None;
                }
                Err(_) => {
                    skip_or_fail("sinks on NATS", "connection timed out");
                    return None;
                }
            };
        let js = async_nats::jetstream::new(client);
        let prefix = unique();
        let stream = prefix.to_uppercase();
        if let Err(e) = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: stream.clone(),
                subjects: vec![format!("{prefix}.>")],
                ..Default::default()
            })
            .await
        {
            skip_or_fail("sinks on NATS", &format!("no JetStream: {e}"));
            return None;
        }
        Some(Broker::Nats { js, stream, prefix })
    }

    async fn redis() -> Option<Broker> {
        let client = redis::Client::open(redis_url()).expect("url");
        match tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(Ok(connection)) => Some(Broker::Redis {
                connection,
                prefix: unique(),
            }),
            Ok(Err(e)) => {
                skip_or_fail("sinks on Redis", &e.to_string());
                None
            }
            Err(_) => {
                skip_or_fail("sinks on Redis", "connection timed out");
                None
            }
        }
    }

    /// The `[[handlers]]` table of a sink named `name` bound to `credicorp`.
    fn handler_toml(&self, name: &str) -> String {
        match self {
            Broker::Nats { prefix, .. } => format!(
                "[[handlers]]\nname = \"{name}\"\nkind = \"nats\"\nsource = \"credicorp\"\nurl = \"{}\"\nsubject = \"{prefix}.{{source}}.{{event_type}}\"\n",
                nats_url()
            ),
            Broker::Redis { prefix, .. } => format!(
                "[[handlers]]\nname = \"{name}\"\nkind = \"redis\"\nsource = \"credicorp\"\nurl = \"{}\"\nstream = \"{prefix}:{{source}}\"\nmax_len = 100000\n",
                redis_url()
            ),
        }
    }

    /// The sink itself, for running it directly.
    fn sink(&self, name: &str) -> Box<dyn webhook_inbox::Handler> {
        match self {
            Broker::Nats { prefix, .. } => Box::new(
                NatsSink::new(
                    name,
                    Some(&nats_url()),
                    None,
                    &format!("{prefix}.{{source}}.{{event_type}}"),
                )
                .expect("sink"),
            ),
            Broker::Redis { prefix, .. } => Box::new(
                RedisSink::new(
                    name,
                    Some(&redis_url()),
                    None,
                    &format!("{prefix}:{{source}}"),
                    None,
                    Duration::from_secs(600),
                )
                .expect("sink"),
            ),
        }
    }

    /// Everything published so far, in order.
    async fn read_back(&mut self) -> Vec<ReadBack> {
        match self {
            Broker::Nats { js, stream, .. } => {
                let mut stream = js.get_stream(stream.as_str()).await.expect("stream");
                let last = stream.info().await.expect("info").state.last_sequence;
                let mut out = Vec::new();
                for seq in 1..=last {
                    let Ok(m) = stream.get_raw_message(seq).await else {
                        continue;
                    };
                    let meta = m
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.to_string(),
                                v.first().map(|v| v.to_string()).unwrap_or_default(),
                            )
                        })
                        .collect();
                    out.push(ReadBack {
                        name: m.subject.to_string(),
                        body: m.payload,
                        meta,
                    });
                }
                out
            }
            Broker::Redis { connection, prefix } => {
                let key = format!("{prefix}:credicorp");
                type Entry = (String, Vec<(String, Vec<u8>)>);
                let entries: Vec<Entry> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(connection)
                    .await
                    .expect("xrange");
                entries
                    .into_iter()
                    .map(|(_, fields)| {
                        let mut body = Bytes::new();
                        let mut meta = HashMap::new();
                        for (field, value) in fields {
                            if field == "body" {
                                body = Bytes::from(value);
                            } else {
                                meta.insert(field, String::from_utf8_lossy(&value).into_owned());
                            }
                        }
                        ReadBack {
                            name: key.clone(),
                            body,
                            meta,
                        }
                    })
                    .collect()
            }
        }
    }

    fn expected_name(&self, event_type: &str) -> String {
        match self {
            Broker::Nats { prefix, .. } => format!("{prefix}.credicorp.{event_type}"),
            Broker::Redis { prefix, .. } => format!("{prefix}:credicorp"),
        }
    }
}

/// Every accepted delivery arrives once, body byte for byte, with the metadata; a
/// redelivery publishes nothing; a rerun of the pair (a crash between the broker's
/// acknowledgement and the recorded outcome) leaves one copy.
async fn each_delivery_arrives_once_with_its_metadata(mut broker: Broker) {
    let app = spawn_with(Options {
        extra_toml: broker.handler_toml("to-broker"),
        ..Options::default()
    })
    .await;
    let bodies = [
        // Spacing a re-serialization would lose.
        "{ \"type\": \"application.created\",\n  \"data\": {\"amount\": 1.50} }".to_owned(),
        event("payment_link.paid", 2),
    ];
    for (i, body) in bodies.iter().enumerate() {
        let id = format!("msg_sink_{i}");
        assert_eq!(app.deliver(&id, body).await.status(), 202);
        // The redelivery is answered from the store and runs nothing.
        assert_eq!(app.deliver(&id, body).await.status(), 202);
    }
    // Polled with a deadline: the runs happen in the background.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut messages = broker.read_back().await;
    while messages.len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        messages = broker.read_back().await;
    }
    assert_eq!(messages.len(), 2, "{messages:?}");
    for (i, body) in bodies.iter().enumerate() {
        let id = format!("msg_sink_{i}");
        let m = messages
            .iter()
            .find(|m| m.meta.get("webhook-id") == Some(&id))
            .unwrap_or_else(|| panic!("{id} arrived: {messages:?}"));
        assert_eq!(m.body, body.as_bytes(), "the raw body");
        let event_type = if i == 0 {
            "application.created"
        } else {
            "payment_link.paid"
        };
        assert_eq!(m.name, broker.expected_name(event_type));
        assert_eq!(m.meta["webhook-source"], "credicorp");
        assert_eq!(m.meta["webhook-event-type"], event_type);
        assert!(m.meta["webhook-received-at"].ends_with('Z'));
        let key = webhook_inbox::store::DeliveryKey::new("credicorp", &id)
            .job("to-broker")
            .idempotency_key();
        assert_eq!(m.meta["idempotency-key"], key);
    }
    app.stop().await;

    // A rerun of one pair, as after a crash between the broker's acknowledgement and the
    // recorded outcome: both runs succeed, the broker holds one copy.
    let sink = broker.sink("to-broker");
    let d = webhook_inbox::testing::delivery(
        "credicorp",
        "msg_sink_rerun",
        Some("application.created"),
        &event("application.created", 9),
    );
    let (first, second) = webhook_inbox::testing::run_twice(&*sink, "to-broker", &d).await;
    first.expect("first run");
    second.expect("the rerun");
    let copies = broker
        .read_back()
        .await
        .into_iter()
        .filter(|m| m.meta.get("webhook-id").map(String::as_str) == Some("msg_sink_rerun"))
        .count();
    assert_eq!(copies, 1, "one copy after a rerun");
}

/// A broker that does not answer fails the run retryably, saying so, and never shows the
/// URL's credentials.
async fn a_broker_that_is_down_fails_the_run_retryably(broker: Broker) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let sink: Box<dyn webhook_inbox::Handler> = match broker {
        Broker::Nats { .. } => Box::new(
            NatsSink::new(
                "down",
                Some(&format!("nats://user:s3cr3t@127.0.0.1:{port}")),
                None,
                "x.{source}",
            )
            .expect("sink"),
        ),
        Broker::Redis { .. } => Box::new(
            RedisSink::new(
                "down",
                Some(&format!("redis://:s3cr3t@127.0.0.1:{port}")),
                None,
                "x:{source}",
                None,
                Duration::from_secs(60),
            )
            .expect("sink"),
        ),
    };
    let d = webhook_inbox::testing::delivery("credicorp", "msg_down", None, "{}");
    let ctx = webhook_inbox::testing::context("down", &d);
    match sink.handle(&d, &ctx).await {
        Err(webhook_inbox::HandlerError::Retryable(m)) => {
            assert!(m.contains("cannot connect"), "{m}");
            assert!(!m.contains("s3cr3t"), "{m}");
        }
        other => panic!("retryable: {other:?}"),
    }
}

type Case = fn(Broker) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

const CASES: &[(&str, Case)] = &[
    ("each_delivery_arrives_once_with_its_metadata", |b| {
        Box::pin(each_delivery_arrives_once_with_its_metadata(b))
    }),
    ("a_broker_that_is_down_fails_the_run_retryably", |b| {
        Box::pin(a_broker_that_is_down_fails_the_run_retryably(b))
    }),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_meets_the_sink_contract_on_nats() {
    for (name, case) in CASES {
        let Some(broker) = Broker::nats().await else {
            return;
        };
        println!("nats: {name}");
        case(broker).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_meets_the_sink_contract_on_redis() {
    for (name, case) in CASES {
        let Some(broker) = Broker::redis().await else {
            return;
        };
        println!("redis: {name}");
        case(broker).await;
    }
}

/// A subject no JetStream stream binds fails the run, saying so.
#[tokio::test]
async fn a_subject_no_stream_binds_fails_the_run() {
    let Some(_broker) = Broker::nats().await else {
        return;
    };
    let sink = NatsSink::new(
        "unbound",
        Some(&nats_url()),
        None,
        &format!("{}.{{source}}", unique()),
    )
    .expect("sink");
    let d = webhook_inbox::testing::delivery("credicorp", "msg_unbound", None, "{}");
    let ctx = webhook_inbox::testing::context("unbound", &d);
    match sink.handle(&d, &ctx).await {
        Err(webhook_inbox::HandlerError::Retryable(m)) => {
            assert!(m.contains("no JetStream stream binds this subject"), "{m}")
        }
        other => panic!("fails: {other:?}"),
    }
}

/// Bad URLs, unknown placeholders and credentials: start-up errors naming the handler and
/// the key, never the credentials.
#[test]
fn sink_configuration_errors_name_the_key_and_hide_credentials() {
    let base = "[sources.credicorp]\nsecrets = [\"whsec_dGVzdA==\"]\n";
    for (table, says) in [
        (
            "kind = \"nats\"\nurl = \"nats://u:s3cr3t@127.0.0.1:4222\"\nsubject = \"w.{sourc}\"",
            "subject: `w.{sourc}`: unknown placeholder `{sourc}`",
        ),
        (
            "kind = \"nats\"\nurl = \"http://u:s3cr3t@127.0.0.1:4222\"\nsubject = \"w\"",
            "a nats:// URL is expected",
        ),
        (
            "kind = \"redis\"\nurl = \"mysql://u:s3cr3t@127.0.0.1\"\nstream = \"w\"",
            "a redis:// URL is expected",
        ),
        (
            "kind = \"redis\"\nurl_env = \"WEBHOOK_INBOX_TEST_NO_SUCH_VAR\"\nstream = \"w\"",
            "url_env: the variable WEBHOOK_INBOX_TEST_NO_SUCH_VAR is not set",
        ),
        (
            "kind = \"redis\"\nstream = \"w\"",
            "set one of `url` and `url_env`",
        ),
    ] {
        let text = format!("{base}[[handlers]]\nname = \"sink\"\n{table}\n");
        let config = webhook_inbox::config::Config::parse(&text, "t.toml").expect("parses");
        let e = webhook_inbox::handlers::HandlerRegistry::build(&config, Vec::new())
            .expect_err(table)
            .to_string();
        assert!(e.contains("handler `sink`") && e.contains(says), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
    }
}
