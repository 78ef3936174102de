#![allow(missing_docs)] // criterion_group! generates an undocumented public function
//! Micro-benchmarks: signature verification per scheme on a 1 KiB body, the claim of a
//! new and of a duplicate delivery id in the sled store, and a downstream call: a first
//! call to the partner simulator (one HTTP exchange, one unsynced journal write) against a
//! journal replay of it (no network), and the same call without a journal.
//!
//! `cargo bench --bench micro`

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use webhook_inbox::config::{Config, Durability};
use webhook_inbox::store::{Claims, DeliveryStore, NewDelivery, SledStore};
use webhook_inbox::verify::{Headers, Source};

const CONFIG: &str = r#"
[sources.standard-webhooks]
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]
[sources.stripe]
scheme = "stripe"
secrets = ["whsec_stripe"]
[sources.github]
scheme = "github"
secrets = ["github"]
[sources.slack]
scheme = "slack"
secrets = ["slack"]
[sources.shopify]
scheme = "shopify"
secrets = ["shopify"]
[sources.hmac-sha256]
scheme = "hmac-sha256"
secrets = ["partner"]
signature_header = "X-Signature"
timestamp_header = "X-Timestamp"
id_header = "X-Id"
"#;

fn body() -> Bytes {
    let head = r#"{"type":"application.created","id":"evt_1","event_id":"Ev1","pad":""#;
    Bytes::from(format!("{head}{}\"}}", "x".repeat(1024 - head.len() - 2)))
}

fn verification(c: &mut Criterion) {
    let config = Config::parse(CONFIG, "bench.toml").expect("config");
    let body = body();
    let mut group = c.benchmark_group("verify 1 KiB");
    for name in config.sources.keys() {
        let source = Source::from_config(name, &config.sources[name], "bench.toml", &|_| None)
            .expect("source");
        let headers = Headers::from_pairs(source.sign("evt_1", &body, SystemTime::now()));
        group.bench_function(name.as_str(), |b| {
            b.iter(|| {
                source
                    .authenticate(headers.clone(), &[], body.clone(), SystemTime::now())
                    .expect("valid")
            })
        });
        // What a redelivery of the stored body pays: the checks up to the id (ingest).
        group.bench_function(format!("{name}, redelivery (up to the id)"), |b| {
            b.iter(|| {
                source
                    .authenticate_signed(headers.clone(), &[], body.clone(), SystemTime::now())
                    .expect("valid")
            })
        });
    }
    group.finish();
}

/// A claimable delivery: signed and verified for real (the only way to make one), outside
/// the measured routine.
fn record(source: &Source, id: &str, body: &Bytes) -> NewDelivery {
    let delivery =
        webhook_inbox::testing::authenticated(source, id, body, SystemTime::now()).expect("signed");
    NewDelivery::new(delivery, 1_795_830_000_000, vec!["noop".into()], false).acknowledged(
        webhook_inbox::store::StoredResponse {
            status: 202,
            body: "{}".into(),
        },
    )
}

fn claims(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::TempDir::new().expect("dir");
    let config = Config::parse(CONFIG, "bench.toml").expect("config");
    let source = Source::named(&config, "standard-webhooks").expect("source");
    // Buffered: the CPU cost of the claim itself; fsync cost is the disk's (see BENCHMARKS.md).
    let store =
        SledStore::open(&dir.path().join("data"), Durability::Buffered, 64 << 20).expect("store");
    let body = body();
    let mut n = 0u64;
    c.bench_function("claim new id (buffered)", |b| {
        b.iter_batched(
            || {
                n += 1;
                record(&source, &format!("msg_{n}"), &body)
            },
            |new| runtime.block_on(store.claim(new)).expect("claim"),
            BatchSize::SmallInput,
        )
    });
    runtime
        .block_on(store.claim(record(&source, "msg_dup", &body)))
        .expect("claim");
    c.bench_function("claim duplicate id", |b| {
        b.iter_batched(
            || record(&source, "msg_dup", &body),
            |new| runtime.block_on(store.claim(new)).expect("claim"),
            BatchSize::SmallInput,
        )
    });
}

#[path = "../examples/partner/simulator.rs"]
mod simulator;

fn calls(c: &mut Criterion) {
    use std::sync::Arc;
    use webhook_inbox::calls::{CallService, Calls};
    use webhook_inbox::store::DeliveryKey;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::TempDir::new().expect("dir");
    let store: Arc<dyn DeliveryStore> = Arc::new(
        SledStore::open(&dir.path().join("data"), Durability::Fsync, 64 << 20).expect("store"),
    );
    let partner = runtime
        .block_on(simulator::Partner::start(
            "127.0.0.1:0".parse().expect("addr"),
            false,
        ))
        .expect("simulator");
    let url = format!("{}/links", partner.url());
    let service = CallService::new(
        Some(store.clone()),
        webhook_inbox::clock::Clock::System,
        Default::default(),
        Default::default(),
    );
    let job = DeliveryKey::new("bench", "msg_1").job("pay");
    let calls = service.for_run(job.clone(), Default::default());
    let body = body();
    let mut n = 0u64;
    c.bench_function("call: first (simulator + journal write)", |b| {
        b.iter(|| {
            n += 1;
            let step = format!("s{n}");
            runtime
                .block_on(calls.step(&step).post(&url).body(body.clone()).send())
                .expect("answer")
        })
    });
    runtime
        .block_on(calls.step("replayed").post(&url).body(body.clone()).send())
        .expect("answer");
    c.bench_function("call: journal replay (no network)", |b| {
        b.iter(|| {
            let r = runtime
                .block_on(calls.step("replayed").post(&url).body(body.clone()).send())
                .expect("answer");
            assert!(r.replayed);
        })
    });
    let direct = Calls::direct(job, Default::default());
    c.bench_function("call: no journal (simulator only)", |b| {
        b.iter(|| {
            n += 1;
            let step = format!("d{n}");
            runtime
                .block_on(direct.step(&step).post(&url).body(body.clone()).send())
                .expect("answer")
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = verification, claims, calls
}
criterion_main!(benches);
