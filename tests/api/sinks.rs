//! Sinks against the real brokers (design.md, "Sinks"): one suite every sink passes, each
//! case reading back with the broker's own client; then each broker stopped and started
//! again under the running service, and the service killed between the broker's
//! acknowledgement and the recorded outcome.
//!
//! NATS with JetStream on `WEBHOOK_INBOX_TEST_NATS_URL` (default `nats://127.0.0.1:4222`),
//! RabbitMQ on `WEBHOOK_INBOX_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`)
//! and Redis on `WEBHOOK_INBOX_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); the outage
//! tests start their own `nats-server` and `redis-server` and use a RabbitMQ vhost of their
//! own (`rabbitmqctl`). A broker that cannot be reached skips its group with one line,
//! unless `WEBHOOK_INBOX_TEST_BROKERS=required` (CI), where it fails.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use webhook_inbox::Handler as _;
use webhook_inbox::handlers::sinks::SinkConnections;
use webhook_inbox::handlers::sinks::amqp::AmqpSink;
use webhook_inbox::handlers::sinks::nats::NatsSink;
use webhook_inbox::handlers::sinks::redis::RedisSink;
use webhook_inbox::store::DeliveryKey;

use crate::helpers::{Options, TestApp, event, eventually_async, spawn_with};

/// A message as a consumer reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadBack {
    /// The subject, stream key or routing key.
    name: String,
    body: Bytes,
    /// Headers, fields or AMQP headers; AMQP's `message_id` as `message-id`.
    meta: HashMap<String, String>,
}

fn required() -> bool {
    std::env::var("WEBHOOK_INBOX_TEST_BROKERS").as_deref() == Ok("required")
}

fn skip_or_fail(group: &str, why: &str) {
    assert!(
        !required(),
        "{group}: broker required but unavailable: {why}"
    );
    println!("skipped: {group}: {why}");
}

fn unique() -> String {
    format!("t{}", hex::encode(rand::random::<[u8; 6]>()))
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.into())
}

fn nats_url() -> String {
    env_or("WEBHOOK_INBOX_TEST_NATS_URL", "nats://127.0.0.1:4222")
}

fn amqp_url() -> String {
    env_or(
        "WEBHOOK_INBOX_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )
}

fn redis_url() -> String {
    env_or("WEBHOOK_INBOX_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

/// A reading connection to RabbitMQ, made again when it was closed (the outage test
/// closes every connection of its vhost).
struct AmqpReader {
    url: String,
    channel: Option<lapin::Channel>,
    connection: Option<lapin::Connection>,
}

impl AmqpReader {
    async fn channel(&mut self) -> Result<lapin::Channel, String> {
        if let Some(c) = self.channel.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let connect = async {
            let connection =
                lapin::Connection::connect(&self.url, lapin::ConnectionProperties::default())
                    .await
                    .map_err(|e| e.to_string())?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((connection, channel))
        };
        let (connection, channel) = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| "connection timed out".to_owned())??;
        self.connection = Some(connection);
        self.channel = Some(channel.clone());
        Ok(channel)
    }
}

/// One broker under test: where a test's messages go, and how to read them back.
enum Broker {
    Nats {
        url: String,
        js: async_nats::jetstream::Context,
        stream: String,
        prefix: String,
    },
    Amqp {
        reader: AmqpReader,
        exchange: String,
        queue: String,
        /// What was taken off the queue so far (a read is destructive).
        seen: Vec<ReadBack>,
    },
    Redis {
        url: String,
        connection: redis::aio::ConnectionManager,
        prefix: String,
    },
}

impl Broker {
    /// JetStream at `url` with a stream of this test's own.
    async fn nats_at(url: &str) -> Result<Broker, String> {
        let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
            .await
            .map_err(|_| "connection timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let js = async_nats::jetstream::new(client);
        let prefix = unique();
        let stream = prefix.to_uppercase();
        js.create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("no JetStream: {e}"))?;
        Ok(Broker::Nats {
            url: url.to_owned(),
            js,
            stream,
            prefix,
        })
    }

    /// RabbitMQ at `url` with a topic exchange of this test's own and a queue that takes
    /// everything it routes.
    async fn amqp_at(url: &str) -> Result<Broker, String> {
        let mut reader = AmqpReader {
            url: url.to_owned(),
            channel: None,
            connection: None,
        };
        let channel = reader.channel().await?;
        let exchange = unique();
        let queue = unique();
        let durable = || ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                durable(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(Broker::Amqp {
            reader,
            exchange,
            queue,
            seen: Vec::new(),
        })
    }

    async fn redis_at(url: &str) -> Result<Broker, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        // A manager, which connects again after the outage test restarts the server.
        let connection =
            tokio::time::timeout(Duration::from_secs(5), client.get_connection_manager())
                .await
                .map_err(|_| "connection timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        Ok(Broker::Redis {
            url: url.to_owned(),
            connection,
            prefix: unique(),
        })
    }

    async fn nats() -> Option<Broker> {
        Broker::nats_at(&nats_url())
            .await
            .map_err(|e| skip_or_fail("sinks on NATS", &e))
            .ok()
    }

    async fn amqp() -> Option<Broker> {
        Broker::amqp_at(&amqp_url())
            .await
            .map_err(|e| skip_or_fail("sinks on RabbitMQ", &e))
            .ok()
    }

    async fn redis() -> Option<Broker> {
        Broker::redis_at(&redis_url())
            .await
            .map_err(|e| skip_or_fail("sinks on Redis", &e))
            .ok()
    }

    /// The `broker` label of this broker's sink.
    fn kind(&self) -> &'static str {
        match self {
            Broker::Nats { .. } => "nats",
            Broker::Amqp { .. } => "amqp",
            Broker::Redis { .. } => "redis",
        }
    }

    /// How many copies of one pair a rerun may leave: RabbitMQ keeps no window of seen ids.
    fn copies_a_rerun_may_leave(&self) -> usize {
        match self {
            Broker::Amqp { .. } => 2,
            _ => 1,
        }
    }

    /// The keys of a sink table publishing here through `url` (the sink's own URL).
    fn sink_keys(&self, url: &str) -> String {
        match self {
            Broker::Nats { prefix, .. } => format!(
                "kind = \"nats\"\nurl = \"{url}\"\nsubject = \"{prefix}.{{source}}.{{event_type}}\"\n"
            ),
            Broker::Amqp { exchange, .. } => format!(
                "kind = \"amqp\"\nurl = \"{url}\"\nexchange = \"{exchange}\"\nrouting_key = \"{{source}}.{{event_type}}\"\n"
            ),
            Broker::Redis { prefix, .. } => format!(
                "kind = \"redis\"\nurl = \"{url}\"\nstream = \"{prefix}:{{source}}\"\nmax_len = 100000\n"
            ),
        }
    }

    /// The URL the test's sinks use to reach this broker.
    fn url(&self) -> String {
        match self {
            Broker::Nats { url, .. } | Broker::Redis { url, .. } => url.clone(),
            Broker::Amqp { reader, .. } => reader.url.clone(),
        }
    }

    /// The `[[handlers]]` table of a sink named `name` bound to `credicorp`.
    fn handler_toml(&self, name: &str) -> String {
        format!(
            "[[handlers]]\nname = \"{name}\"\nsource = \"credicorp\"\n{}",
            self.sink_keys(&self.url())
        )
    }

    /// The sink itself, for running it directly.
    fn sink(&self, name: &str) -> Box<dyn webhook_inbox::Handler> {
        let connections = SinkConnections::default();
        let url = self.url();
        match self {
            Broker::Nats { prefix, .. } => Box::new(
                NatsSink::new(
                    &connections,
                    name,
                    Some(&url),
                    None,
                    &format!("{prefix}.{{source}}.{{event_type}}"),
                )
                .expect("sink"),
            ),
            Broker::Amqp { exchange, .. } => Box::new(
                AmqpSink::new(
                    &connections,
                    name,
                    Some(&url),
                    None,
                    exchange,
                    "{source}.{event_type}",
                )
                .expect("sink"),
            ),
            Broker::Redis { prefix, .. } => Box::new(
                RedisSink::new(
                    &connections,
                    name,
                    Some(&url),
                    None,
                    &format!("{prefix}:{{source}}"),
                    None,
                    Duration::from_secs(600),
                )
                .expect("sink"),
            ),
        }
    }

    /// Everything published so far, in order; an empty list while the broker is away.
    async fn read_back(&mut self) -> Vec<ReadBack> {
        match self {
            Broker::Nats { js, stream, .. } => {
                let Ok(mut stream) = js.get_stream(stream.as_str()).await else {
                    return Vec::new();
                };
                let Ok(info) = stream.info().await else {
                    return Vec::new();
                };
                let last = info.state.last_sequence;
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
            Broker::Amqp {
                reader,
                queue,
                seen,
                ..
            } => {
                if let Ok(channel) = reader.channel().await {
                    while let Ok(Some(m)) = channel
                        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                        .await
                    {
                        let properties = &m.delivery.properties;
                        let mut meta: HashMap<String, String> = properties
                            .headers()
                            .as_ref()
                            .map(|t| {
                                t.inner()
                                    .iter()
                                    .map(|(k, v)| {
                                        let v = match v {
                                            AMQPValue::LongString(s) => s.to_string(),
                                            other => format!("{other:?}"),
                                        };
                                        (k.to_string(), v)
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let property = |p: &Option<lapin::types::ShortString>| {
                            p.as_ref().map(|s| s.to_string()).unwrap_or_default()
                        };
                        meta.insert("message-id".into(), property(properties.message_id()));
                        meta.insert("content-type".into(), property(properties.content_type()));
                        meta.insert(
                            "delivery-mode".into(),
                            properties
                                .delivery_mode()
                                .map(|m| m.to_string())
                                .unwrap_or_default(),
                        );
                        seen.push(ReadBack {
                            name: m.delivery.routing_key.to_string(),
                            body: Bytes::from(m.delivery.data.clone()),
                            meta,
                        });
                    }
                }
                seen.clone()
            }
            Broker::Redis {
                connection, prefix, ..
            } => {
                let key = format!("{prefix}:credicorp");
                type Entry = (String, Vec<(String, Vec<u8>)>);
                let entries = match redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async::<Vec<Entry>>(connection)
                    .await
                {
                    Ok(entries) => entries,
                    Err(e) => {
                        eprintln!("XRANGE: {e}");
                        return Vec::new();
                    }
                };
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

    /// What has been published, once `done` says it is all there (or after 60 s).
    async fn read_until(&mut self, done: impl Fn(&[ReadBack]) -> bool) -> Vec<ReadBack> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let messages = self.read_back().await;
            if done(&messages) || Instant::now() > deadline {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn expected_name(&self, event_type: &str) -> String {
        match self {
            Broker::Nats { prefix, .. } => format!("{prefix}.credicorp.{event_type}"),
            Broker::Amqp { .. } => format!("credicorp.{event_type}"),
            Broker::Redis { prefix, .. } => format!("{prefix}:credicorp"),
        }
    }

    /// Drops what the test made on a shared broker (best effort).
    async fn clean_up(mut self) {
        match &mut self {
            Broker::Nats { js, stream, .. } => {
                let _ = js.delete_stream(stream.as_str()).await;
            }
            Broker::Amqp {
                reader,
                exchange,
                queue,
                ..
            } => {
                if let Ok(channel) = reader.channel().await {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), Default::default())
                        .await;
                }
            }
            Broker::Redis {
                connection, prefix, ..
            } => {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(format!("{prefix}:credicorp"))
                    .query_async(connection)
                    .await;
            }
        }
    }
}

/// How many messages carry `webhook-id` = `id`.
fn copies_of(messages: &[ReadBack], id: &str) -> usize {
    messages
        .iter()
        .filter(|m| m.meta.get("webhook-id").map(String::as_str) == Some(id))
        .count()
}

/// Every accepted delivery arrives once, body byte for byte, with the metadata; a
/// redelivery publishes nothing; a rerun of the pair (a crash between the broker's
/// acknowledgement and the recorded outcome) leaves one copy (RabbitMQ: at most two, with
/// one `message_id`).
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
    let messages = broker.read_until(|m| m.len() >= 2).await;
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
        let key = DeliveryKey::new("credicorp", &id)
            .job("to-broker")
            .idempotency_key();
        assert_eq!(m.meta["idempotency-key"], key);
        if let Broker::Amqp { .. } = broker {
            assert_eq!(m.meta["message-id"], key);
            assert_eq!(m.meta["content-type"], "application/json");
            assert_eq!(m.meta["delivery-mode"], "2", "persistent");
        }
    }
    app.stop().await;

    // A rerun of one pair, as after a crash between the broker's acknowledgement and the
    // recorded outcome: both runs succeed, the broker holds one copy where it can tell.
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
    let may_leave = broker.copies_a_rerun_may_leave();
    let messages = broker
        .read_until(|m| copies_of(m, "msg_sink_rerun") >= may_leave)
        .await;
    assert_eq!(copies_of(&messages, "msg_sink_rerun"), may_leave);
    // `sink_publishes_total` tells a duplicate the broker dropped from a publish.
    let kind = broker.kind();
    let count = |result: &'static str| {
        webhook_inbox::handlers::sinks::publish_counts()
            .get_or_create(&webhook_inbox::handlers::sinks::PublishLabels {
                handler: "to-broker".into(),
                broker: kind,
                result,
            })
            .get()
    };
    if may_leave == 1 {
        assert!(
            count("duplicate") >= 1,
            "{kind}: the rerun counted as a duplicate"
        );
    }
    assert!(
        count("published") >= 3,
        "{kind}: {} published",
        count("published")
    );
    broker.clean_up().await;
}

/// A broker that does not answer fails the run retryably, saying so, and never shows the
/// URL's credentials.
async fn a_broker_that_is_down_fails_the_run_retryably(broker: Broker) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let connections = SinkConnections::default();
    let sink: Box<dyn webhook_inbox::Handler> = match &broker {
        Broker::Nats { .. } => Box::new(
            NatsSink::new(
                &connections,
                "down",
                Some(&format!("nats://user:s3cr3t@127.0.0.1:{port}")),
                None,
                "x.{source}",
            )
            .expect("sink"),
        ),
        Broker::Amqp { .. } => Box::new(
            AmqpSink::new(
                &connections,
                "down",
                Some(&format!("amqp://user:s3cr3t@127.0.0.1:{port}/%2f")),
                None,
                "x",
                "{source}",
            )
            .expect("sink"),
        ),
        Broker::Redis { .. } => Box::new(
            RedisSink::new(
                &connections,
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
            assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}");
            assert!(!m.contains("s3cr3t"), "{m}");
        }
        other => panic!("retryable: {other:?}"),
    }
    broker.clean_up().await;
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
async fn every_sink_meets_the_sink_contract_on_rabbitmq() {
    for (name, case) in CASES {
        let Some(broker) = Broker::amqp().await else {
            return;
        };
        println!("amqp: {name}");
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
    let Some(broker) = Broker::nats().await else {
        return;
    };
    let sink = NatsSink::new(
        &SinkConnections::default(),
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
    broker.clean_up().await;
}

/// An exchange that routes the message to no queue (`mandatory`) and an exchange that does
/// not exist each fail the run, saying which; the sink goes on once the exchange routes.
#[tokio::test]
async fn an_exchange_that_routes_nowhere_fails_the_run() {
    let Some(mut broker) = Broker::amqp().await else {
        return;
    };
    let Broker::Amqp {
        reader, exchange, ..
    } = &mut broker
    else {
        unreachable!("amqp")
    };
    let channel = reader.channel().await.expect("channel");
    let nowhere = unique();
    channel
        .exchange_declare(
            nowhere.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    let connections = SinkConnections::default();
    let run = |exchange: String| {
        let connections = &connections;
        async move {
            let sink = AmqpSink::new(
                connections,
                "rabbit",
                Some(&amqp_url()),
                None,
                &exchange,
                "{source}.{event_type}",
            )
            .expect("sink");
            let d = webhook_inbox::testing::delivery(
                "credicorp",
                &unique(),
                Some("application.created"),
                "{}",
            );
            let ctx = webhook_inbox::testing::context("rabbit", &d);
            sink.handle(&d, &ctx).await
        }
    };
    match run(nowhere.clone()).await {
        Err(webhook_inbox::HandlerError::Retryable(m)) => {
            assert!(m.contains("routed the message to no queue"), "{m}");
            assert!(
                m.contains("routing key `credicorp.application.created`"),
                "{m}"
            );
        }
        other => panic!("unroutable fails: {other:?}"),
    }
    match run(unique()).await {
        Err(webhook_inbox::HandlerError::Retryable(m)) => {
            assert!(m.contains("NOT_FOUND"), "{m}")
        }
        other => panic!("a missing exchange fails: {other:?}"),
    }
    // The link the missing exchange closed is made again: the next run goes through.
    run(exchange.clone()).await.expect("a routed message");
    let _ = channel
        .exchange_delete(nowhere.as_str().into(), Default::default())
        .await;
    broker.clean_up().await;
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
            "kind = \"amqp\"\nurl = \"http://u:s3cr3t@127.0.0.1\"\nexchange = \"w\"\nrouting_key = \"k\"",
            "an amqp:// or amqps:// URL is expected",
        ),
        (
            "kind = \"amqp\"\nurl = \"amqp://u:s3cr3t@127.0.0.1\"\nexchange = \"w\"\nrouting_key = \"{event}\"",
            "routing_key: `{event}`: unknown placeholder `{event}`",
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

// ---- The broker stopped and started again under the running service ----------------

/// A free port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// A broker process of the test's own: stopped (SIGTERM, so it stores what it
/// acknowledged) and started again on the same port and data directory.
struct OwnServer {
    program: String,
    args: Vec<String>,
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl OwnServer {
    /// `nats-server` with JetStream, or why not.
    fn nats() -> Result<OwnServer, String> {
        let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
        let port = free_port();
        let args = [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            &dir.path().display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        OwnServer::start_new(
            env_or("WEBHOOK_INBOX_TEST_NATS_SERVER", "nats-server"),
            args,
            port,
            dir,
        )
    }

    /// `redis-server` keeping every write in its append-only file, or why not.
    fn redis() -> Result<OwnServer, String> {
        let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
        let port = free_port();
        let args = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--dir",
            &dir.path().display().to_string(),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ]
        .map(String::from)
        .to_vec();
        OwnServer::start_new(
            env_or("WEBHOOK_INBOX_TEST_REDIS_SERVER", "redis-server"),
            args,
            port,
            dir,
        )
    }

    fn start_new(
        program: String,
        args: Vec<String>,
        port: u16,
        dir: tempfile::TempDir,
    ) -> Result<OwnServer, String> {
        let mut server = OwnServer {
            program,
            args,
            port,
            child: None,
            _dir: dir,
        };
        server.start()?;
        Ok(server)
    }

    /// Starts the process and waits until it accepts connections.
    fn start(&mut self) -> Result<(), String> {
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!("{} ended: {status}", self.program));
            }
            if Instant::now() > deadline {
                return Err(format!("{} does not listen", self.program));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops it the way a service manager does, and waits for the end.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `rabbitmqctl` with `args`, or what it said.
fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new(env_or("WEBHOOK_INBOX_TEST_RABBITMQCTL", "rabbitmqctl"))
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A RabbitMQ vhost of the test's own: "stopped" by taking the user's access away and
/// closing every connection to it, "started" by giving the access back.
struct OwnVhost {
    name: String,
}

impl OwnVhost {
    fn new() -> Result<OwnVhost, String> {
        let name = unique();
        rabbitmqctl(&["add_vhost", &name])?;
        let vhost = OwnVhost { name };
        vhost.start()?;
        Ok(vhost)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    fn start(&self) -> Result<(), String> {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])
    }

    fn stop(&self) -> Result<(), String> {
        rabbitmqctl(&["clear_permissions", "-p", &self.name, "guest"])?;
        rabbitmqctl(&["close_all_connections", "-p", &self.name, "outage test"])
    }
}

impl Drop for OwnVhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["delete_vhost", &self.name]);
    }
}

/// The state of `handler`'s pair of delivery `id`, as the admin API shows it.
async fn pair_state(app: &TestApp, id: &str, handler: &str) -> serde_json::Value {
    let shown = app.admin_show("credicorp", id).await;
    shown["handlers"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == handler))
        .map(|h| h["state"].clone())
        .unwrap_or_default()
}

/// The broker stopped while deliveries keep coming: the runs fail retryably, naming the
/// broker; once it is back, everything arrives — once where the broker can tell — with no
/// restart of the inbox.
async fn the_broker_goes_away_and_comes_back(
    mut broker: Broker,
    stop: impl Fn() -> Result<(), String>,
    start: impl Fn() -> Result<(), String>,
    says: &str,
) {
    let app = spawn_with(Options {
        extra_toml: broker.handler_toml("to-broker"),
        admin_token: Some("admin-token"),
        max_attempts: 100_000,
        ..Options::default()
    })
    .await;
    for i in 0..5 {
        let body = event("application.created", i);
        assert_eq!(
            app.deliver(&format!("msg_before_{i}"), &body)
                .await
                .status(),
            202
        );
    }
    let before = broker.read_until(|m| m.len() >= 5).await;
    assert_eq!(before.len(), 5, "{before:?}");

    stop().expect("stop the broker");
    for i in 0..5 {
        let body = event("application.created", 10 + i);
        assert_eq!(
            app.deliver(&format!("msg_during_{i}"), &body)
                .await
                .status(),
            202
        );
    }
    // Each run fails, retryably, saying what it could not reach.
    for i in 0..5 {
        let id = format!("msg_during_{i}");
        let failed = eventually_async(Duration::from_secs(60), || async {
            let state = pair_state(&app, &id, "to-broker").await;
            state["status"] != "succeeded"
                && state["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(says))
        })
        .await;
        let state = pair_state(&app, &id, "to-broker").await;
        assert!(failed, "{id} failed retryably, saying `{says}`: {state}");
        assert_ne!(state["status"], "dead", "{state}");
    }

    start().expect("start the broker again");
    for i in 0..5 {
        let id = format!("msg_during_{i}");
        let done = eventually_async(Duration::from_secs(60), || async {
            pair_state(&app, &id, "to-broker").await["status"] == "succeeded"
        })
        .await;
        assert!(done, "{id}: {}", pair_state(&app, &id, "to-broker").await);
    }
    let may_leave = broker.copies_a_rerun_may_leave();
    let messages = broker
        .read_until(|m| (0..5).all(|i| copies_of(m, &format!("msg_during_{i}")) >= 1))
        .await;
    for i in 0..5 {
        for prefix in ["msg_before", "msg_during"] {
            let id = format!("{prefix}_{i}");
            let copies = copies_of(&messages, &id);
            assert!(
                (1..=may_leave).contains(&copies),
                "{id}: {copies} copies in {messages:?}"
            );
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopped_and_started_again_loses_nothing() {
    let server = match OwnServer::nats() {
        Ok(s) => s,
        Err(e) => return skip_or_fail("NATS outage", &e),
    };
    let url = format!("nats://127.0.0.1:{}", server.port);
    let broker = Broker::nats_at(&url).await.expect("own nats-server");
    let server = std::sync::Mutex::new(server);
    the_broker_goes_away_and_comes_back(
        broker,
        || {
            server.lock().expect("server").stop();
            Ok(())
        },
        || server.lock().expect("server").start(),
        &format!("127.0.0.1:{}", port_of(&url)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_started_again_loses_nothing() {
    let server = match OwnServer::redis() {
        Ok(s) => s,
        Err(e) => return skip_or_fail("Redis outage", &e),
    };
    let url = format!("redis://127.0.0.1:{}", server.port);
    let broker = Broker::redis_at(&url).await.expect("own redis-server");
    let server = std::sync::Mutex::new(server);
    the_broker_goes_away_and_comes_back(
        broker,
        || {
            server.lock().expect("server").stop();
            Ok(())
        },
        || server.lock().expect("server").start(),
        &format!("127.0.0.1:{}", port_of(&url)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_connections_closed_and_refused_lose_nothing() {
    if let Err(e) = Broker::amqp_at(&amqp_url()).await {
        return skip_or_fail("RabbitMQ outage", &e);
    }
    let vhost = match OwnVhost::new() {
        Ok(v) => v,
        Err(e) => return skip_or_fail("RabbitMQ outage", &e),
    };
    let broker = Broker::amqp_at(&vhost.url()).await.expect("own vhost");
    the_broker_goes_away_and_comes_back(
        broker,
        || vhost.stop(),
        || vhost.start(),
        "127.0.0.1:5672",
    )
    .await;
}

/// The port of a URL (`scheme://host:port`).
fn port_of(url: &str) -> u16 {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.port())
        .expect("a port")
}

// ---- kill -9 between the broker's acknowledgement and the recorded outcome -----------

/// A TCP proxy in front of a broker that can hold back every reply: the broker takes a
/// publish and acknowledges it, the acknowledgement never reaches the inbox, and the test
/// kills the inbox in that window.
struct HoldingProxy {
    port: u16,
    holding: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldingProxy {
    async fn start(upstream: SocketAddr) -> HoldingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let holding = Arc::new(AtomicBool::new(false));
        let hold = holding.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let hold = hold.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = tokio::io::copy(&mut client_read, &mut server_write);
                    let down = async {
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            let n = server_read.read(&mut buffer).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if !hold.load(Ordering::SeqCst) {
                                client_write.write_all(&buffer[..n]).await?;
                            }
                        }
                    };
                    let _ = tokio::join!(up, down);
                });
            }
        });
        HoldingProxy {
            port,
            holding,
            task,
        }
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The address of a broker URL.
fn address_of(url: &str) -> SocketAddr {
    let u = reqwest::Url::parse(url).expect("url");
    let host = u.host_str().expect("host");
    let port = u.port().expect("port");
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .expect("resolves")
        .next()
        .expect("an address")
}

/// The real binary publishes through the proxy; its broker took a delivery and
/// acknowledged it, and the acknowledgement is held back; the binary is killed with
/// SIGKILL before it can record the outcome. The restarted binary runs the pair again with
/// the same key: NATS and Redis hold one copy, RabbitMQ at most two with one `message_id`.
async fn killed_after_the_broker_acknowledged(mut broker: Broker) {
    let broker_url = broker.url();
    let proxy = HoldingProxy::start(address_of(&broker_url)).await;
    let mut proxied = reqwest::Url::parse(&broker_url).expect("url");
    proxied.set_port(Some(proxy.port)).expect("port");
    let dir = tempfile::TempDir::new().expect("dir");
    let options = Options {
        extra_toml: format!(
            "[admin]\ntoken_env = \"WEBHOOK_INBOX_TEST_ADMIN_TOKEN\"\n\n[[handlers]]\nname = \"to-broker\"\nsource = \"credicorp\"\n{}",
            broker.sink_keys(proxied.as_str())
        ),
        dispatch_toml: "run_lease = \"2s\"".into(),
        ..Options::default()
    };
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        crate::helpers::config_text(dir.path(), &options),
    )
    .expect("config");
    let config = webhook_inbox::config::Config::load(&config_path).expect("config");
    let source = config.sources["credicorp"].clone();
    let client = crate::helpers::client();

    let mut serving =
        crate::helpers::try_spawn_serve(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let port = AtomicU16::new(serving.port);
    let body = event("application.created", 1);
    crate::crash::send_until_acknowledged(&client, &port, &source, "msg_warm", &body).await;
    let warm = broker.read_until(|m| copies_of(m, "msg_warm") == 1).await;
    assert_eq!(copies_of(&warm, "msg_warm"), 1, "{warm:?}");

    proxy.holding.store(true, Ordering::SeqCst);
    let body = event("application.created", 2);
    crate::crash::send_until_acknowledged(&client, &port, &source, "msg_acked", &body).await;
    let taken = broker.read_until(|m| copies_of(m, "msg_acked") == 1).await;
    assert_eq!(copies_of(&taken, "msg_acked"), 1, "the broker took it");
    serving.child.kill().expect("SIGKILL");
    let _ = serving.child.wait();
    proxy.holding.store(false, Ordering::SeqCst);

    let mut serving =
        crate::helpers::try_spawn_serve(&config_path).unwrap_or_else(|e| panic!("{e}"));
    let admin = format!(
        "http://127.0.0.1:{}/admin/deliveries/credicorp/msg_acked",
        serving.admin_port
    );
    let attempts = || async {
        let shown: serde_json::Value = client
            .get(&admin)
            .bearer_auth("admin-token")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let state = shown["handlers"]
            .as_array()?
            .iter()
            .find(|h| h["name"] == "to-broker")?["state"]
            .clone();
        (state["status"] == "succeeded").then(|| state["attempts"].as_u64())?
    };
    let rerun = eventually_async(Duration::from_secs(60), || async {
        attempts().await.is_some()
    })
    .await;
    assert!(rerun, "the pair ran again after the restart");
    assert_eq!(
        attempts().await,
        Some(2),
        "attempt 1 was lost with the process"
    );
    let may_leave = broker.copies_a_rerun_may_leave();
    let messages = broker
        .read_until(|m| copies_of(m, "msg_acked") >= may_leave)
        .await;
    let copies: Vec<&ReadBack> = messages
        .iter()
        .filter(|m| m.meta.get("webhook-id").map(String::as_str) == Some("msg_acked"))
        .collect();
    assert!((1..=may_leave).contains(&copies.len()), "{copies:?}");
    if may_leave == 2 {
        let key = DeliveryKey::new("credicorp", "msg_acked")
            .job("to-broker")
            .idempotency_key();
        assert!(
            copies.iter().all(|m| m.meta["message-id"] == key),
            "{copies:?}"
        );
    }
    assert_eq!(copies_of(&messages, "msg_warm"), 1);
    let _ = serving.child.kill();
    let _ = serving.child.wait();
    broker.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_holds_one_copy_after_a_kill_between_ack_and_outcome() {
    if let Some(broker) = Broker::nats().await {
        killed_after_the_broker_acknowledged(broker).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_holds_at_most_two_copies_with_one_message_id_after_a_kill() {
    if let Some(broker) = Broker::amqp().await {
        killed_after_the_broker_acknowledged(broker).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_one_copy_after_a_kill_between_ack_and_outcome() {
    if let Some(broker) = Broker::redis().await {
        killed_after_the_broker_acknowledged(broker).await;
    }
}
