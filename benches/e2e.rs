//! End-to-end load against the real binary, side by side with a bare actix-web endpoint on
//! the same machine, so every figure comes with the machine's own ceiling and the ratio
//! holds on a noisy box. Not part of the library or the CLI:
//!
//! ```sh
//! cargo bench --bench e2e -- --seconds 5 --prefill 1000000 --sustain-seconds 30
//! ```
//!
//! The load generator is light on purpose (a hyper HTTP/1.1 client on one runtime thread of
//! its own): a heavier one takes more of the two cores from both servers and flatters the
//! ratio. The sustained case offers 80 % of the measured fsync ack ceiling at a steady pace
//! and reports handler runs per second beside acks per second, and the largest queue depth;
//! with `--postgres-url`, each PostgreSQL case (1 and 3 replicas) is followed by its own
//! sustained case at 80 % of the acks it just measured.
//!
//! Each case starts a server process (`webhook-inbox serve` on a temp data dir, or this
//! benchmark itself as the bare endpoint, `--bare`), drives
//! it with `concurrency` keep-alive connections sending signed, unique deliveries (a share
//! of them duplicates), and reads the server's RSS from `/proc` and its data dir's size.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use webhook_inbox::config::{Config, Durability};
use webhook_inbox::store::{Claims, Maintenance, NewDelivery, SledStore};
use webhook_inbox::verify::Source;

/// The admin token of every server the benchmark starts.
const BENCH_TOKEN: &str = "bench-admin-token";

const SECRET: &str = "whsec_YmVuY2htYXJrLXNlY3JldC1ub3QtZm9yLXByb2R1Y3Rpb24=";

/// What the run measures.
#[derive(Debug, Clone)]
struct BenchOptions {
    /// Connections sending at once.
    concurrency: usize,
    /// Measured seconds per case (after a one-second warm-up).
    seconds: u64,
    /// Deliveries pre-filled for the large-store case (0 skips it).
    prefill: usize,
    /// Deliveries stored before a handler is backfilled over them (0 skips the case).
    backfill: usize,
    /// actix-web workers of both servers.
    workers: usize,
    /// Seconds of the sustained case (0 skips it).
    sustain_seconds: u64,
    /// A PostgreSQL server for the postgres cases (none: skipped).
    postgres_url: Option<String>,
    /// Skip the sled cases.
    postgres_only: bool,
    /// Only the sled cases whose name contains one of these (none: all; the bare endpoint
    /// always runs).
    only: Vec<String>,
    /// Alternated rounds of the fsync, unique, 1 KiB case (bare, this binary, each baseline).
    rounds: usize,
    /// Other builds of the service (earlier commits) measured in the same rounds.
    baselines: Vec<PathBuf>,
    /// TOML appended to this build's config, each a further variant in the same rounds.
    variants: Vec<String>,
    /// The rounds replay stored deliveries (100 % duplicates) instead of sending new ones.
    rounds_replay: bool,
    /// Where the large-store case keeps its pre-filled store between runs (none: a
    /// temporary directory, filled every run).
    prefill_dir: Option<PathBuf>,
}

/// One case's figures.
#[derive(Debug, Clone, Default)]
struct CaseResult {
    /// Case name.
    name: String,
    /// Answered requests per second.
    rate: f64,
    /// Latency percentiles.
    p50: Duration,
    /// 99th percentile.
    p99: Duration,
    /// 99.9th percentile.
    p999: Duration,
    /// Non-2xx answers and connection errors.
    errors: u64,
    /// Server resident memory at the end, bytes.
    rss: u64,
    /// Data dir size divided by the body bytes of the deliveries stored (0 for bare).
    disk_ratio: f64,
    /// Rate relative to the bare endpoint with the same body size.
    vs_bare: f64,
    /// Handler runs per second over the same window (sustained case).
    processed: Option<f64>,
    /// The largest queue depth sampled (sustained case).
    max_queue_depth: Option<f64>,
    /// p50 and p99 of the copies alone (cases with a share of duplicates).
    copies: Option<(Duration, Duration)>,
}

struct Load {
    body_size: usize,
    duplicates: Option<Duplicates>,
    replay_only: bool,
}

/// Every `every`-th request (`n % every == 1`) repeats the delivery sent `behind` requests
/// before it: `behind = 1` races the copy with its first (still in flight, often in the
/// same group commit); a larger odd `behind` repeats one acknowledged a while ago, as a
/// sender's retry does.
#[derive(Clone, Copy)]
struct Duplicates {
    every: u64,
    behind: u64,
}

fn body(n: u64, size: usize) -> String {
    let head = format!(r#"{{"type":"application.created","data":{{"n":{n},"pad":""#);
    let pad = size.saturating_sub(head.len() + 3);
    format!("{head}{}\"}}}}", "x".repeat(pad))
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn config_text(dir: &Path, durability: &str, port: u16, admin: u16, workers: usize) -> String {
    let storage = format!(
        "path = \"{}\"\ndurability = \"{durability}\"",
        dir.join("data").display()
    );
    config_with_storage(&storage, port, admin, workers)
}

fn config_with_storage(storage: &str, port: u16, admin: u16, workers: usize) -> String {
    config_with_handler(storage, port, admin, workers, "kind = \"log\"")
}

/// `base` with the TOML of a `--variant` merged in, table by table (so that a variant may
/// set `[storage]` keys beside the ones the benchmark writes).
fn with_variant(base: &str, variant: &str) -> Result<String, String> {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (key, value) in from {
            match (into.get_mut(&key), value) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, value) => {
                    into.insert(key, value);
                }
            }
        }
    }
    let mut config: toml::Table = base.parse().map_err(|e| format!("bench config: {e}"))?;
    let variant: toml::Table = variant
        .parse()
        .map_err(|e| format!("--variant {variant:?}: {e}"))?;
    merge(&mut config, variant);
    toml::to_string(&config).map_err(|e| e.to_string())
}

/// The bench config with the handler `noop` of `kind_keys` (its kind and the kind's keys).
fn config_with_handler(
    storage: &str,
    port: u16,
    admin: u16,
    workers: usize,
    kind_keys: &str,
) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
max_body_bytes = 1048576
workers = {workers}

[storage]
{storage}

[sources.bench]
secrets = ["{SECRET}"]

[[handlers]]
name = "noop"
source = "bench"
{kind_keys}
"#
    )
}

struct Server {
    child: Child,
    port: u16,
    admin: u16,
}

/// Polls `/metrics` until the dispatch queue is empty.
async fn wait_queue_drained(admin: u16, deadline: Duration) -> Result<(), String> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    while started.elapsed() < deadline {
        let text = client
            .get(format!("http://127.0.0.1:{admin}/metrics"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        if text
            .lines()
            .any(|l| l.trim() == "webhook_inbox_queue_depth 0")
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the dispatch queue never drained".into())
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(url: &str, deadline: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    while started.elapsed() < deadline {
        if client
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(format!("{url} never became ready"))
}

/// The service's own binary, built by cargo for this benchmark.
fn exe() -> Result<PathBuf, String> {
    Ok(PathBuf::from(env!("CARGO_BIN_EXE_webhook-inbox")))
}

async fn start_inbox(
    dir: &Path,
    durability: &str,
    workers: usize,
) -> Result<(Server, Duration), String> {
    let (port, admin) = (free_port(), free_port());
    let config = dir.join("bench.toml");
    std::fs::write(&config, config_text(dir, durability, port, admin, workers))
        .map_err(|e| e.to_string())?;
    start_with(&config, port, admin).await
}

async fn start_with(config: &Path, port: u16, admin: u16) -> Result<(Server, Duration), String> {
    start_binary(&exe()?, config, port, admin).await
}

/// Starts `binary serve --config config` and waits for its readiness.
async fn start_binary(
    binary: &Path,
    config: &Path,
    port: u16,
    admin: u16,
) -> Result<(Server, Duration), String> {
    let child = Command::new(binary)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .env("WEBHOOK_INBOX_ADMIN_TOKEN", BENCH_TOKEN)
        .env_remove("WEBHOOK_INBOX_LISTEN")
        .env_remove("WEBHOOK_INBOX_ADMIN_LISTEN")
        .env_remove("WEBHOOK_INBOX_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let server = Server { child, port, admin };
    let startup = wait_ready(
        &format!("http://127.0.0.1:{admin}/readyz"),
        Duration::from_secs(120),
    )
    .await?;
    Ok((server, startup))
}

async fn start_bare(workers: usize) -> Result<Server, String> {
    let port = free_port();
    let child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .args(["--bare", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--workers", &workers.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let server = Server {
        child,
        port,
        admin: 0,
    };
    wait_ready(
        &format!("http://127.0.0.1:{port}/"),
        Duration::from_secs(30),
    )
    .await?;
    Ok(server)
}

/// Serves `POST /*`: reads the body, answers 200. The machine's ceiling for the HTTP part.
async fn serve_bare(listen: &str, workers: usize) -> std::io::Result<()> {
    use actix_web::{App, HttpResponse, HttpServer, web};
    HttpServer::new(|| {
        App::new().default_service(web::to(|body: Bytes| async move {
            HttpResponse::Ok().body(format!("{{\"bytes\":{}}}", body.len()))
        }))
    })
    .workers(workers.max(1))
    .bind(listen)?
    .run()
    .await
}

/// Drives `port` with `options.concurrency` keep-alive HTTP/1.1 connections on a
/// light load generator: a hyper client on one runtime thread of its own (so it takes as
/// little of the two cores from the server as it can), nothing allocated per request but the
/// id, the body and the signature. `pace`: total requests per second to offer (each
/// connection sends on a fixed schedule), or as fast as answers come (`None`).
async fn drive(
    port: u16,
    source: Arc<Source>,
    load: Load,
    options: &BenchOptions,
    first_id: u64,
) -> (CaseResult, u64) {
    drive_for(
        &[port],
        source,
        load,
        options.concurrency,
        options.seconds,
        None,
        first_id,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn drive_for(
    ports: &[u16],
    source: Arc<Source>,
    load: Load,
    concurrency: usize,
    seconds: u64,
    pace: Option<f64>,
    first_id: u64,
) -> (CaseResult, u64) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let next = Arc::new(AtomicU64::new(first_id));
    let next_after = next.clone();
    let ports: Arc<[u16]> = ports.into();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("load generator runtime");
        let result = runtime.block_on(load_generator(
            ports,
            source,
            Arc::new(load),
            concurrency,
            seconds,
            pace,
            next,
        ));
        let _ = done_tx.send(result);
    });
    let result = done_rx.await.unwrap_or_default();
    (result, next_after.load(Ordering::Relaxed))
}

/// Connection `i` goes to `ports[i % ports.len()]` (several replicas share the load).
async fn load_generator(
    ports: Arc<[u16]>,
    source: Arc<Source>,
    load: Arc<Load>,
    concurrency: usize,
    seconds: u64,
    pace: Option<f64>,
    next: Arc<AtomicU64>,
) -> CaseResult {
    use http_body_util::{BodyExt as _, Full};
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let interval = pace.map(|rate| Duration::from_secs_f64(concurrency as f64 / rate.max(1.0)));
    let mut workers = Vec::new();
    for connection in 0..concurrency {
        let port = ports[connection % ports.len()];
        let (next, measuring, stop, source, load) = (
            next.clone(),
            measuring.clone(),
            stop.clone(),
            source.clone(),
            load.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut copies = Vec::new();
            let mut errors = 0u64;
            let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return (latencies, copies, 1);
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut sender, connection)) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
            else {
                return (latencies, copies, 1);
            };
            tokio::spawn(connection);
            let mut slot = tokio::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if let Some(every) = interval {
                    slot += every;
                    tokio::time::sleep_until(slot).await;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                let id_n = if load.replay_only {
                    n % 10_000
                } else {
                    match load.duplicates {
                        Some(d) if n % d.every == 1 => n.checked_sub(d.behind).unwrap_or(n - 1),
                        _ => n,
                    }
                };
                let id = format!("msg_{id_n}");
                let body = Bytes::from(body(id_n, load.body_size));
                let mut request = hyper::Request::post("/webhooks/bench")
                    .header("host", "127.0.0.1")
                    .header("content-type", "application/json");
                for (k, v) in source.sign(&id, &body, SystemTime::now()) {
                    request = request.header(k, v);
                }
                let Ok(request) = request.body(Full::new(body)) else {
                    errors += 1;
                    continue;
                };
                if sender.ready().await.is_err() {
                    errors += 1;
                    break;
                }
                let started = Instant::now();
                let ok = match sender.send_request(request).await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        let _ = response.into_body().collect().await;
                        ok
                    }
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    let us = started.elapsed().as_micros() as u64;
                    latencies.push(us);
                    if id_n != n && !load.replay_only {
                        copies.push(us);
                    }
                    if !ok {
                        errors += 1;
                    }
                }
                if !ok && !measuring.load(Ordering::Relaxed) && stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            (latencies, copies, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut copies = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, c, e)) = w.await {
            latencies.extend(l);
            copies.extend(c);
            errors += e;
        }
    }
    latencies.sort_unstable();
    copies.sort_unstable();
    let pct = |sorted: &[u64], p: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * p).round().max(0.0) as usize)
            .map(|us| Duration::from_micros(*us))
            .unwrap_or_default()
    };
    CaseResult {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(&latencies, 0.5),
        p99: pct(&latencies, 0.99),
        p999: pct(&latencies, 0.999),
        errors,
        copies: (!copies.is_empty()).then(|| (pct(&copies, 0.5), pct(&copies, 0.99))),
        ..CaseResult::default()
    }
}

/// One scrape of the admin listener: (handler runs that succeeded, queue depth).
async fn scrape(client: &reqwest::Client, admin: u16) -> Option<(f64, f64)> {
    let text = client
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |prefix: &str| {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    Some((
        value("webhook_inbox_handler_runs_total{handler=\"noop\",result=\"succeeded\"}"),
        value("webhook_inbox_queue_depth "),
    ))
}

/// Samples the handler runs of every server (summed) and the queue depth every 250 ms while
/// a case runs: the servers' processing rate over that window and the largest depth seen.
struct RunSampler {
    sampling: Arc<AtomicBool>,
    #[allow(clippy::type_complexity)]
    task: tokio::task::JoinHandle<(f64, Option<(Instant, f64)>, Option<(Instant, f64)>)>,
}

impl RunSampler {
    /// Starts sampling the admin listeners `admins` (replicas share one queue).
    fn start(admins: Vec<u16>) -> RunSampler {
        let sampling = Arc::new(AtomicBool::new(true));
        let client = reqwest::Client::new();
        let running = sampling.clone();
        let task = tokio::spawn(async move {
            let mut max_depth = 0f64;
            let (mut first, mut last) = (None, None);
            while running.load(Ordering::Relaxed) {
                let mut total = Some((0.0, 0.0));
                for &admin in &admins {
                    total = match (total, scrape(&client, admin).await) {
                        (Some((runs, _)), Some((r, depth))) => Some((runs + r, depth)),
                        _ => None, // a sample is all the servers or nothing
                    };
                }
                if let Some((runs, depth)) = total {
                    max_depth = max_depth.max(depth);
                    let now = Instant::now();
                    first.get_or_insert((now, runs));
                    last = Some((now, runs));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (max_depth, first, last)
        });
        RunSampler { sampling, task }
    }

    /// Stops sampling: (handler runs per second, largest queue depth).
    async fn finish(self) -> Result<(f64, f64), String> {
        self.sampling.store(false, Ordering::Relaxed);
        let (max_depth, first, last) = self.task.await.map_err(|e| e.to_string())?;
        let processed = match (first, last) {
            (Some((t0, r0)), Some((t1, r1))) if t1 > t0 => (r1 - r0) / (t1 - t0).as_secs_f64(),
            _ => 0.0,
        };
        Ok((processed, max_depth))
    }
}

/// The sustained case: a steady offered load at 80 % of the measured fsync ack ceiling for
/// `options.sustain_seconds`; reports acks per second, handler runs per second over the same
/// window, and the largest queue depth seen (sampled every 250 ms).
async fn sustained(
    options: &BenchOptions,
    source: Arc<Source>,
    ceiling: f64,
    bare: f64,
) -> Result<CaseResult, String> {
    let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
    let (server, _) = start_inbox(dir.path(), "fsync", options.workers).await?;
    let offered = ceiling * 0.8;
    let sampler = RunSampler::start(vec![server.admin]);
    let (mut r, _) = drive_for(
        &[server.port],
        source,
        Load {
            body_size: 1024,
            duplicates: None,
            replay_only: false,
        },
        options.concurrency,
        options.sustain_seconds,
        Some(offered),
        0,
    )
    .await;
    let (processed, max_depth) = sampler.finish().await?;
    r.name = format!(
        "sustained {:.0}/s offered (80 % of the ack ceiling), fsync, 1 KiB",
        offered
    );
    r.rss = rss_bytes(server.child.id());
    r.vs_bare = r.rate / bare;
    r.processed = Some(processed);
    r.max_queue_depth = Some(max_depth);
    eprintln!(
        "{}: accepted {:.0}/s, processed {:.0}/s, queue depth at most {:.0}",
        r.name, r.rate, processed, max_depth
    );
    Ok(r)
}

fn bench_source() -> Result<Source, String> {
    let config = Config::parse(
        &format!("[sources.bench]\nsecrets = [\"{SECRET}\"]\n"),
        "bench",
    )
    .map_err(|e| e.to_string())?;
    Source::from_config("bench", &config.sources["bench"], "bench", &|_| None)
        .map_err(|e| e.to_string())
}

/// Runs every case and returns the results in order.
async fn run(options: &BenchOptions) -> Result<Vec<CaseResult>, String> {
    let source = Arc::new(bench_source()?);
    let mut results = Vec::new();
    let mut bare_rate = std::collections::HashMap::new();

    for size in [1024usize, 65536] {
        let server = start_bare(options.workers).await?;
        let (mut r, _) = drive(
            server.port,
            source.clone(),
            Load {
                body_size: size,
                duplicates: None,
                replay_only: false,
            },
            options,
            0,
        )
        .await;
        r.name = format!("bare actix-web, {} KiB", size / 1024);
        r.rss = rss_bytes(server.child.id());
        r.vs_bare = 1.0;
        bare_rate.insert(size, r.rate);
        eprintln!("{}: {:.0}/s", r.name, r.rate);
        results.push(r);
    }

    let cases: [(&str, &str, usize, Option<Duplicates>, bool); 7] = [
        ("fsync, unique, 1 KiB", "fsync", 1024, None, false),
        ("buffered, unique, 1 KiB", "buffered", 1024, None, false),
        (
            "fsync, 50% duplicates, 1 KiB",
            "fsync",
            1024,
            Some(Duplicates {
                every: 2,
                behind: 1,
            }),
            false,
        ),
        (
            "fsync, 50% retries of earlier deliveries, 1 KiB",
            "fsync",
            1024,
            Some(Duplicates {
                every: 2,
                behind: 2001,
            }),
            false,
        ),
        (
            "fsync, 100% duplicates (replay path), 1 KiB",
            "fsync",
            1024,
            None,
            true,
        ),
        ("fsync, unique, 64 KiB", "fsync", 65536, None, false),
        ("buffered, unique, 64 KiB", "buffered", 65536, None, false),
    ];
    let cases = if options.postgres_only {
        &cases[..0]
    } else {
        &cases[..]
    };
    let wanted = |name: &str| {
        options.only.is_empty() || options.only.iter().any(|o| name.contains(o.as_str()))
    };
    for &(name, durability, size, duplicates, replay_only) in cases {
        if !wanted(name) {
            continue;
        }
        let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
        let (server, _) = start_inbox(dir.path(), durability, options.workers).await?;
        let mut recorded = 0;
        if replay_only {
            // Record ids first and let their handlers finish; the measured run replays the
            // first 10 000 of them.
            let quick = BenchOptions {
                seconds: 2,
                ..options.clone()
            };
            let (_, sent) = drive(
                server.port,
                source.clone(),
                Load {
                    body_size: size,
                    duplicates: None,
                    replay_only: false,
                },
                &quick,
                0,
            )
            .await;
            recorded = sent;
            wait_queue_drained(server.admin, Duration::from_secs(120)).await?;
        }
        // Runs are sampled while new deliveries arrive (the case is a burst at the ack
        // ceiling), and the backlog it leaves is timed until it has drained.
        let sampler = (!replay_only).then(|| RunSampler::start(vec![server.admin]));
        let (mut r, sent) = drive(
            server.port,
            source.clone(),
            Load {
                body_size: size,
                duplicates,
                replay_only,
            },
            options,
            0,
        )
        .await;
        r.name = name.to_owned();
        r.rss = rss_bytes(server.child.id());
        if let Some(sampler) = sampler {
            let client = reqwest::Client::new();
            let backlog = scrape(&client, server.admin).await.map_or(0.0, |(_, d)| d);
            let started = Instant::now();
            wait_queue_drained(server.admin, Duration::from_secs(120)).await?;
            let (processed, max_depth) = sampler.finish().await?;
            r.processed = Some(processed);
            r.max_queue_depth = Some(max_depth);
            eprintln!(
                "  runs {processed:.0}/s against {:.0} acks/s during the burst; it left {backlog:.0} queued, drained in {:.2} s",
                r.rate,
                started.elapsed().as_secs_f64()
            );
        }
        drop(server);
        let stored = if replay_only {
            recorded
        } else if duplicates.is_some() {
            sent / 2
        } else {
            sent
        };
        r.disk_ratio =
            dir_size(&dir.path().join("data")) as f64 / (stored.max(1) as f64 * size as f64);
        r.vs_bare = r.rate / bare_rate[&size];
        eprintln!("{}: {:.0}/s ({:.2}x bare)", r.name, r.rate, r.vs_bare);
        if let Some((p50, p99)) = r.copies {
            eprintln!(
                "  the copies alone: p50 {:.2} ms, p99 {:.2} ms",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
        results.push(r);
    }

    if !options.postgres_only && wanted("sink") {
        results.extend(sinks(options, source.clone(), bare_rate[&1024]).await?);
    }
    if options.sustain_seconds > 0 && !options.postgres_only && wanted("sustained") {
        let ceiling = results
            .iter()
            .find(|r| r.name == "fsync, unique, 1 KiB")
            .map_or(1000.0, |r| r.rate);
        results.push(sustained(options, source.clone(), ceiling, bare_rate[&1024]).await?);
    }
    if let Some(url) = &options.postgres_url {
        // This build's config, then each `--variant` appended to it.
        for extra in std::iter::once("").chain(options.variants.iter().map(String::as_str)) {
            for replicas in [1, 3] {
                let bare = bare_rate[&1024];
                let full =
                    postgres(options, source.clone(), url, replicas, bare, extra, None).await?;
                let ceiling = full.rate;
                results.push(full);
                if options.sustain_seconds > 0 {
                    let offered = Some(ceiling * 0.8);
                    results.push(
                        postgres(options, source.clone(), url, replicas, bare, extra, offered)
                            .await?,
                    );
                }
            }
        }
    } else {
        eprintln!(
            "postgres cases: skipped: pass --postgres-url (or set WEBHOOK_INBOX_TEST_POSTGRES_URL)"
        );
    }
    if options.rounds > 0 {
        rounds(options, source.clone()).await?;
    }
    if !options.postgres_only && wanted("writes") {
        writes_per_delivery(options, source.clone()).await?;
    }
    if options.backfill > 0 && !options.postgres_only && wanted("backfill") {
        results.extend(backfill_case(options, source.clone(), bare_rate[&1024]).await?);
    }
    if options.prefill > 0 {
        results.extend(large_store(options, source.clone(), bare_rate[&1024]).await?);
    }
    Ok(results)
}

/// The sink cases: 1 KiB unique deliveries, fsync acks, handler `noop` publishing to each
/// broker (`WEBHOOK_INBOX_TEST_NATS_URL`, `…_AMQP_URL`, `…_REDIS_URL`, or the local
/// defaults), beside the `log` handler in the same run: accepted/s, and published/s (runs
/// that succeeded) over the same window. A broker that cannot be reached is skipped.
async fn sinks(
    options: &BenchOptions,
    source: Arc<Source>,
    bare: f64,
) -> Result<Vec<CaseResult>, String> {
    let env_or = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let nats = env_or("WEBHOOK_INBOX_TEST_NATS_URL", "nats://127.0.0.1:4222");
    let amqp = env_or(
        "WEBHOOK_INBOX_TEST_AMQP_URL",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    );
    let redis = env_or("WEBHOOK_INBOX_TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let run_id = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let prefix = format!("bench{run_id}");
    let mut cases = vec![(
        "sink: log (the same run's baseline)",
        "kind = \"log\"".to_owned(),
    )];
    match prepare_nats(&nats, &prefix).await {
        Ok(()) => cases.push((
            "sink: nats (JetStream)",
            format!("kind = \"nats\"\nurl = \"{nats}\"\nsubject = \"{prefix}.{{source}}.{{event_type}}\""),
        )),
        Err(e) => eprintln!("sink: nats: skipped: {e}"),
    }
    match prepare_amqp(&amqp, &prefix).await {
        Ok(()) => cases.push((
            "sink: amqp (RabbitMQ)",
            format!("kind = \"amqp\"\nurl = \"{amqp}\"\nexchange = \"{prefix}\"\nrouting_key = \"{{source}}.{{event_type}}\""),
        )),
        Err(e) => eprintln!("sink: amqp: skipped: {e}"),
    }
    match prepare_redis(&redis).await {
        Ok(()) => cases.push((
            "sink: redis (stream)",
            format!("kind = \"redis\"\nurl = \"{redis}\"\nstream = \"{prefix}:{{source}}\"\nmax_len = 1000000"),
        )),
        Err(e) => eprintln!("sink: redis: skipped: {e}"),
    }
    let mut results = Vec::new();
    for (name, kind_keys) in cases {
        let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
        let (port, admin) = (free_port(), free_port());
        let storage = format!(
            "path = \"{}\"\ndurability = \"fsync\"",
            dir.path().join("data").display()
        );
        let config = dir.path().join("bench.toml");
        std::fs::write(
            &config,
            config_with_handler(&storage, port, admin, options.workers, &kind_keys),
        )
        .map_err(|e| e.to_string())?;
        let (server, _) = start_with(&config, port, admin).await?;
        let sampler = RunSampler::start(vec![admin]);
        let (mut r, _) = drive(
            port,
            source.clone(),
            Load {
                body_size: 1024,
                duplicates: None,
                replay_only: false,
            },
            options,
            0,
        )
        .await;
        let (published, max_depth) = sampler.finish().await?;
        r.name = name.to_owned();
        r.rss = rss_bytes(server.child.id());
        r.vs_bare = r.rate / bare;
        r.processed = Some(published);
        r.max_queue_depth = Some(max_depth);
        eprintln!(
            "{name}: accepted {:.0}/s ({:.2}x bare), published {published:.0}/s",
            r.rate, r.vs_bare
        );
        results.push(r);
    }
    Ok(results)
}

/// A JetStream stream over `<prefix>.>` (memory storage is not used: the sink's
/// acknowledgement is the file store's).
async fn prepare_nats(url: &str, prefix: &str) -> Result<(), String> {
    let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
        .await
        .map_err(|_| "connection timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: prefix.to_uppercase(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Redis answers.
async fn prepare_redis(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut connection = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connection timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    redis::cmd("PING")
        .query_async::<String>(&mut connection)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A durable topic exchange `prefix` and a durable queue bound to it with `#`.
async fn prepare_amqp(url: &str, prefix: &str) -> Result<(), String> {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let connect = lapin::Connection::connect(url, lapin::ConnectionProperties::default());
    let connection = tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| "connection timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .exchange_declare(
            prefix.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    channel
        .queue_declare(
            prefix.into(),
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
            prefix.into(),
            prefix.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())
}

/// `replicas` servers on one PostgreSQL database (a fresh schema), the connections spread
/// over them, as fast as answers come (`offered: None`, for `options.seconds`) or at a
/// steady `offered` rate (the sustained case, for `options.sustain_seconds`): acks per
/// second and handler runs per second (all replicas together) over the same window, and the
/// largest queue depth seen.
async fn postgres(
    options: &BenchOptions,
    source: Arc<Source>,
    server_url: &str,
    replicas: usize,
    bare: f64,
    extra_config: &str,
    offered: Option<f64>,
) -> Result<CaseResult, String> {
    use sqlx::Connection as _;
    let schema = format!("bench_{}", rand::random::<u32>());
    let mut db = sqlx::PgConnection::connect(server_url)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    let separator = if server_url.contains('?') { '&' } else { '?' };
    let url = format!("{server_url}{separator}options[search_path]={schema}");
    let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
    let storage = format!("backend = \"postgres\"\npostgres_url = \"{url}\"\npool_size = 16");
    let mut servers = Vec::new();
    for n in 0..replicas {
        let (port, admin) = (free_port(), free_port());
        let config = dir.path().join(format!("replica{n}.toml"));
        let text = config_with_storage(&storage, port, admin, options.workers);
        std::fs::write(&config, with_variant(&text, extra_config)?).map_err(|e| e.to_string())?;
        servers.push(start_with(&config, port, admin).await?.0);
    }
    let sampler = RunSampler::start(servers.iter().map(|s| s.admin).collect());
    let ports: Vec<u16> = servers.iter().map(|s| s.port).collect();
    let (mut r, _) = drive_for(
        &ports,
        source,
        Load {
            body_size: 1024,
            duplicates: None,
            replay_only: false,
        },
        options.concurrency,
        offered.map_or(options.seconds, |_| options.sustain_seconds),
        offered,
        0,
    )
    .await;
    let (processed, max_depth) = sampler.finish().await?;
    r.processed = Some(processed);
    r.max_queue_depth = Some(max_depth);
    r.name = match offered {
        None => format!("postgres, {replicas} replica(s), unique, 1 KiB"),
        Some(rate) => format!(
            "postgres, {replicas} replica(s), sustained {rate:.0}/s offered (80 % of its ack \
             ceiling), 1 KiB"
        ),
    };
    if !extra_config.is_empty() {
        r.name = format!("{}, with `{}`", r.name, extra_config.replace('\n', "; "));
    }
    r.rss = servers.iter().map(|s| rss_bytes(s.child.id())).sum();
    r.vs_bare = r.rate / bare;
    drop(servers);
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut db)
        .await;
    eprintln!(
        "{}: accepted {:.0}/s ({:.2}x bare), processed {:.0}/s, queue depth at most {:.0}",
        r.name, r.rate, r.vs_bare, processed, max_depth
    );
    Ok(r)
}

/// Store writes per delivery (`store_writes_total{tree}` over `deliveries_total`
/// accepted): unique 1 KiB deliveries, fsync, one `log` handler, for `options.seconds`, then
/// until every run is over; printed per tree (claim and run together).
async fn writes_per_delivery(options: &BenchOptions, source: Arc<Source>) -> Result<(), String> {
    let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
    let (server, _) = start_inbox(dir.path(), "fsync", options.workers).await?;
    let load = Load {
        body_size: 1024,
        duplicates: None,
        replay_only: false,
    };
    let _ = drive(server.port, source, load, options, 0).await;
    wait_queue_drained(server.admin, Duration::from_secs(120)).await?;
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/metrics", server.admin))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let accepted: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("webhook_inbox_deliveries_total{") && l.contains("outcome=\"accepted\"")
        })
        .filter_map(value)
        .sum();
    let mut per_tree: Vec<(String, f64)> = text
        .lines()
        .filter(|l| l.starts_with("webhook_inbox_store_writes_total{"))
        .filter_map(|l| {
            let tree = l.split('"').nth(1)?.to_owned();
            Some((tree, value(l)?))
        })
        .collect();
    per_tree.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = per_tree.iter().map(|(_, n)| n).sum();
    eprintln!(
        "store writes per accepted delivery (claim + its run), {accepted:.0} deliveries: {:.2}",
        total / accepted.max(1.0)
    );
    for (tree, n) in per_tree {
        eprintln!("  {tree:<14} {:.2}", n / accepted.max(1.0));
    }
    Ok(())
}

/// CPU time (user and system) the process `pid` has used so far, in seconds, from
/// `/proc/<pid>/stat` (clock ticks of 1/100 s, Linux's `USER_HZ`).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Handler runs that succeeded and deliveries accepted so far, from `/metrics`.
async fn runs_and_accepted(client: &reqwest::Client, admin: u16) -> (f64, f64) {
    let Ok(response) = client
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
    else {
        return (0.0, 0.0);
    };
    let text = response.text().await.unwrap_or_default();
    let sum = |wanted: &dyn Fn(&str) -> bool| {
        text.lines()
            .filter(|l| wanted(l))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        sum(&|l| l.starts_with("webhook_inbox_handler_runs_total{") && l.contains("succeeded")),
        sum(&|l| {
            l.starts_with("webhook_inbox_deliveries_total{") && l.contains("outcome=\"accepted\"")
        }),
    )
}

/// Alternated rounds of the fsync, unique, 1 KiB case with a `log` handler bound: in each
/// round the bare endpoint, then this build and every `--baseline` build, so that a change is
/// compared with the code before it under the same machine's moment (issue 26). The builds'
/// order changes each round ([`round_order`]), so that none is always the first after the
/// bare endpoint nor always after the same build: two copies of one binary, always in the
/// same order, read 15 % apart here (BENCHMARKS.md, session 19). Prints, per round and as medians, acks
/// per second as a ratio to bare, p99, and the share of what was accepted that the
/// dispatcher had already run when the window closed; then, per other build, in how many
/// rounds this build used less CPU per delivery than it.
/// The order the `n` builds run in, in round `round` (from 1): rotations of the list, each
/// followed by its reverse (rotation k in rounds 2k + 1, its reverse in 2k + 2). Over 2n
/// rounds each build comes first after the bare endpoint equally often and, for two or three
/// builds, follows each other build equally often (with three, turning by one alone put
/// each build after the same neighbour in two rounds of three; session 22). Use 2n rounds,
/// or a multiple, for the balance.
fn round_order(round: usize, n: usize) -> Vec<usize> {
    let index = round.saturating_sub(1);
    let turn = (index / 2) % n.max(1);
    let mut order: Vec<usize> = (turn..n).chain(0..turn).collect();
    if index % 2 == 1 {
        order.reverse();
    }
    order
}

async fn rounds(options: &BenchOptions, source: Arc<Source>) -> Result<(), String> {
    // (name, binary, TOML appended to its config)
    let mut binaries = vec![("this build".to_owned(), exe()?, String::new())];
    for extra in &options.variants {
        let name = format!("this build with `{}`", extra.replace('\n', "; "));
        binaries.push((name, exe()?, extra.clone()));
    }
    for path in &options.baselines {
        binaries.push((path.display().to_string(), path.clone(), String::new()));
    }
    // Per binary: (ratio to bare, p99 ms, processed share, CPU µs per delivery) of every
    // round.
    let mut figures: Vec<Vec<(f64, f64, f64, f64)>> = vec![Vec::new(); binaries.len()];
    let load = || Load {
        body_size: 1024,
        duplicates: None,
        replay_only: options.rounds_replay,
    };
    let client = reqwest::Client::new();
    for round in 1..=options.rounds {
        let bare = start_bare(options.workers).await?;
        let (b, _) = drive(bare.port, source.clone(), load(), options, 0).await;
        drop(bare);
        eprintln!("round {round}: bare {:.0}/s", b.rate);
        for (i, (name, binary, extra)) in round_order(round, binaries.len())
            .into_iter()
            .map(|i| (i, &binaries[i]))
        {
            let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
            let (port, admin) = (free_port(), free_port());
            let config = dir.path().join("bench.toml");
            let text = config_text(dir.path(), "fsync", port, admin, options.workers);
            std::fs::write(&config, with_variant(&text, extra)?).map_err(|e| e.to_string())?;
            let (server, _) = start_binary(binary, &config, port, admin).await?;
            if options.rounds_replay {
                // Record the ids first and let their handlers finish: the measured window
                // replays the first 10 000 of them.
                let quick = BenchOptions {
                    seconds: 2,
                    ..options.clone()
                };
                let unique = Load {
                    replay_only: false,
                    ..load()
                };
                drive(server.port, source.clone(), unique, &quick, 0).await;
                wait_queue_drained(admin, Duration::from_secs(120)).await?;
            }
            let (r, sent) = drive(server.port, source.clone(), load(), options, 0).await;
            let (runs, accepted) = runs_and_accepted(&client, admin).await;
            let processed_share = if accepted > 0.0 { runs / accepted } else { 0.0 };
            // Then every accepted delivery run, and the server's CPU time per delivery
            // (start-up included): steadier than a rate on a shared machine.
            wait_queue_drained(admin, Duration::from_secs(300)).await?;
            // Replaying, per request answered (the recorded ones and the replays).
            let answered = if options.rounds_replay {
                accepted + sent as f64
            } else {
                accepted
            };
            let cpu_us = cpu_seconds(server.child.id()) * 1e6 / answered.max(1.0);
            let ratio = r.rate / b.rate.max(1.0);
            let p99 = r.p99.as_secs_f64() * 1000.0;
            eprintln!(
                "round {round}: {name}: {:.0} acks/s ({ratio:.2}x bare), p99 {p99:.1} ms, \
                 {:.0} % of the accepted already run, {cpu_us:.0} µs of server CPU per \
                 delivery acked and run",
                r.rate,
                processed_share * 100.0
            );
            figures[i].push((ratio, p99, processed_share, cpu_us));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    eprintln!("medians over {} rounds:", options.rounds);
    for ((name, _, _), runs) in binaries.iter().zip(&figures) {
        eprintln!(
            "  {name}: {:.2}x bare, p99 {:.1} ms, {:.0} % run by the window's end, {:.0} µs CPU per delivery",
            median(runs.iter().map(|f| f.0).collect()),
            median(runs.iter().map(|f| f.1).collect()),
            median(runs.iter().map(|f| f.2).collect()) * 100.0,
            median(runs.iter().map(|f| f.3).collect())
        );
    }
    if let Some((this, others)) = figures.split_first() {
        for ((name, _, _), runs) in binaries.iter().skip(1).zip(others) {
            let less = this.iter().zip(runs).filter(|(a, b)| a.3 < b.3).count();
            eprintln!(
                "  this build used less CPU per delivery than {name} in {less} of {} rounds",
                runs.len()
            );
        }
    }
    Ok(())
}

/// The backfill case: `options.backfill` deliveries stored with no handler bound, a
/// server with handler `later` added; fsync acks of new deliveries measured first alone,
/// then while `POST /admin/handlers/later/backfill` binds `later` to every stored one
/// (acks' p99 must stay within 2x; RSS before and after shows the batches' flat memory).
async fn backfill_case(
    options: &BenchOptions,
    source: Arc<Source>,
    bare: f64,
) -> Result<Vec<CaseResult>, String> {
    let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
    {
        let store = SledStore::open(&dir.path().join("data"), Durability::Buffered, 64 << 20)
            .map_err(|e| e.to_string())?;
        let received = webhook_inbox::clock::to_ms(SystemTime::now()) - 3_600_000;
        for n in 0..options.backfill as u64 {
            let b = Bytes::from(body(n + 20_000_000, 1024));
            let delivery = webhook_inbox::testing::authenticated(
                &source,
                &format!("msg_stored_{n}"),
                &b,
                SystemTime::now(),
            )
            .map_err(|e| e.to_string())?;
            let new = NewDelivery::new(delivery, received + n, Vec::new(), false).acknowledged(
                webhook_inbox::store::StoredResponse {
                    status: 202,
                    body: "{}".into(),
                },
            );
            store.claim(new).await.map_err(|e| e.to_string())?;
        }
        store.flush().await.map_err(|e| e.to_string())?;
    }
    let (port, admin) = (free_port(), free_port());
    let storage = format!(
        "path = \"{}\"\ndurability = \"fsync\"",
        dir.path().join("data").display()
    );
    let config = dir.path().join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[[handlers]]\nname = \"later\"\nkind = \"log\"\nsource = \"bench\"\n\n[[handlers]]\nname = \"alone\"\nkind = \"log\"\nsource = \"bench\"\n",
            config_with_handler(&storage, port, admin, options.workers, "kind = \"log\"")
        ),
    )
    .map_err(|e| e.to_string())?;
    let (server, _) = start_with(&config, port, admin).await?;
    // First a backfill with nothing else going on (handler `alone`), RSS sampled while it
    // binds: the memory of the backfill itself.
    let idle_rss = rss_bytes(server.child.id());
    let pid = server.child.id();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    let started = Instant::now();
    let alone: serde_json::Value = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{admin}/admin/handlers/alone/backfill"
        ))
        .bearer_auth(BENCH_TOKEN)
        .json(&serde_json::json!({}))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let took_alone = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    let peak = sampler.await.map_err(|e| e.to_string())?;
    eprintln!(
        "backfill alone: bound {} in {:.1} s; RSS {} MiB idle, at most {} MiB while binding",
        alone["bound"],
        took_alone.as_secs_f64(),
        idle_rss >> 20,
        peak >> 20
    );
    wait_queue_drained(admin, Duration::from_secs(300)).await?;
    let load = || Load {
        body_size: 1024,
        duplicates: None,
        replay_only: false,
    };
    let (mut alone, sent) = drive(port, source.clone(), load(), options, 0).await;
    alone.name = format!(
        "fsync, unique, 1 KiB, {} stored, no backfill (the same server just before)",
        options.backfill
    );
    alone.rss = rss_bytes(server.child.id());
    alone.vs_bare = alone.rate / bare;
    eprintln!("{}: {:.0}/s, p99 {:.2?}", alone.name, alone.rate, alone.p99);
    let before_rss = alone.rss;
    let started = Instant::now();
    let backfill = tokio::spawn(async move {
        let answer = reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{admin}/admin/handlers/later/backfill"
            ))
            .bearer_auth(BENCH_TOKEN)
            .json(&serde_json::json!({}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let report: serde_json::Value = answer.json().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((report, started.elapsed()))
    });
    let (mut during, _) = drive(port, source, load(), options, sent).await;
    let (report, took) = backfill.await.map_err(|e| e.to_string())??;
    during.rss = rss_bytes(server.child.id());
    during.vs_bare = during.rate / bare;
    during.name = format!(
        "the same, during a backfill of {} stored (bound {} in {:.1} s; RSS {} -> {} MiB)",
        options.backfill,
        report["bound"],
        took.as_secs_f64(),
        before_rss >> 20,
        during.rss >> 20
    );
    eprintln!(
        "{}: {:.0}/s, p99 {:.2?} ({:.2}x the p99 without)",
        during.name,
        during.rate,
        during.p99,
        during.p99.as_secs_f64() / alone.p99.as_secs_f64().max(1e-9)
    );
    Ok(vec![alone, during])
}

/// Pre-fills `options.prefill` deliveries through the store API (or reuses a store kept by
/// `--prefill-dir`), then measures, for this build, every `--variant` and every
/// `--baseline`, each on its own copy of the pre-filled store: start-up, idle RSS, RSS and
/// throughput under load, and the data directory against the body bytes it holds.
async fn large_store(
    options: &BenchOptions,
    source: Arc<Source>,
    bare: f64,
) -> Result<Vec<CaseResult>, String> {
    let scratch = tempfile::TempDir::new().map_err(|e| e.to_string())?;
    let prefilled = match &options.prefill_dir {
        Some(dir) => dir.join(format!("prefilled-{}", options.prefill)),
        None => scratch.path().join("prefilled"),
    };
    if !prefilled.join("complete").exists() {
        prefill(&prefilled.join("data"), options.prefill, &source).await?;
        std::fs::write(prefilled.join("complete"), b"").map_err(|e| e.to_string())?;
    }
    let body_bytes = |deliveries: f64| deliveries * 1024.0;
    let fresh = dir_size(&prefilled.join("data")) as f64 / body_bytes(options.prefill as f64);
    eprintln!(
        "fresh store of {} deliveries: disk {fresh:.2}x body bytes",
        options.prefill
    );
    let mut builds = vec![("this build".to_owned(), exe()?, String::new())];
    for extra in &options.variants {
        builds.push((
            format!("this build with `{}`", extra.replace('\n', "; ")),
            exe()?,
            extra.clone(),
        ));
    }
    for path in &options.baselines {
        builds.push((path.display().to_string(), path.clone(), String::new()));
    }
    let client = reqwest::Client::new();
    let mut results = Vec::new();
    for (name, binary, extra) in builds {
        let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
        copy_dir(&prefilled.join("data"), &dir.path().join("data"))?;
        let (port, admin) = (free_port(), free_port());
        let config = dir.path().join("bench.toml");
        let text = config_text(dir.path(), "fsync", port, admin, options.workers);
        std::fs::write(&config, with_variant(&text, &extra)?).map_err(|e| e.to_string())?;
        let (server, startup) = start_binary(&binary, &config, port, admin).await?;
        let idle_rss = rss_bytes(server.child.id());
        let load = Load {
            body_size: 1024,
            duplicates: None,
            replay_only: false,
        };
        let (mut r, _) = drive(server.port, source.clone(), load, options, 0).await;
        r.rss = rss_bytes(server.child.id());
        // The window's deliveries (its warm-up's too) are stored beside the pre-filled ones.
        let (_, accepted) = runs_and_accepted(&client, admin).await;
        drop(server);
        r.name = format!(
            "{name}: fsync, unique, 1 KiB, {} stored (start-up {} ms, idle RSS {} MiB, \
             fresh store {fresh:.2}x)",
            options.prefill,
            startup.as_millis(),
            idle_rss >> 20
        );
        r.vs_bare = r.rate / bare;
        r.disk_ratio = dir_size(&dir.path().join("data")) as f64
            / body_bytes(options.prefill as f64 + accepted);
        eprintln!("{}: {:.0}/s", r.name, r.rate);
        results.push(r);
    }
    Ok(results)
}

/// Stores `count` acknowledged deliveries of 1 KiB, each with a first run of `noop` queued,
/// at `data`, as the server would have recorded them from the load generator's requests.
async fn prefill(data: &Path, count: usize, source: &Source) -> Result<(), String> {
    use futures_util::StreamExt as _;
    // With fsync and 64 claims at a time, as a server under load writes its store (the
    // received_at index one entry per group commit, not per delivery).
    let store = SledStore::open(data, Durability::Fsync, 64 << 20).map_err(|e| e.to_string())?;
    let started = Instant::now();
    // Received from an hour ago on, a thousand a second, as a store that grew over time
    // was: the start-up repair re-checks only what arrived in the last minute before the
    // previous stop, and a prefill that took longer than that would be re-checked whole.
    let first = webhook_inbox::clock::to_ms(SystemTime::now()) - 3_600_000;
    let claim = |n: u64| {
        let store = &store;
        async move { prefill_one(store, source, n, first + n).await }
    };
    let mut claims = futures_util::stream::iter((0..count as u64).map(claim)).buffer_unordered(64);
    while let Some(claimed) = claims.next().await {
        claimed?;
    }
    drop(claims);
    store.flush().await.map_err(|e| e.to_string())?;
    eprintln!("pre-filled {count} deliveries in {:.1?}", started.elapsed());
    Ok(())
}

/// Claims pre-fill delivery `n`, received at `now`.
async fn prefill_one(store: &SledStore, source: &Source, n: u64, now: u64) -> Result<(), String> {
    let b = Bytes::from(body(n + 10_000_000, 1024));
    // The headers the load generator's requests arrive with (its own, hyper's, the
    // signature's), and the answer the server stores: records the size of real ones.
    let mut headers = vec![
        ("host".to_owned(), "127.0.0.1".to_owned()),
        ("content-type".to_owned(), "application/json".to_owned()),
        ("content-length".to_owned(), b.len().to_string()),
    ];
    headers.extend(source.sign(&format!("msg_prefill_{n}"), &b, SystemTime::now()));
    let delivery = match source
        .authenticate(
            webhook_inbox::domain::Headers::from_pairs(headers),
            &[],
            b,
            SystemTime::now(),
        )
        .map_err(|e| e.to_string())?
    {
        webhook_inbox::verify::Authenticated::Delivery(d) => d,
        webhook_inbox::verify::Authenticated::Handshake(_) => {
            return Err("a handshake in the pre-fill".into());
        }
    };
    let new = NewDelivery::new(delivery, now, vec!["noop".into()], false);
    let response = webhook_inbox::ingest::first_response(new.record(), false);
    store
        .claim(new.acknowledged(response))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Copies the directory `from` (files and subdirectories) to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(from).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let target = to.join(entry.file_name());
        if entry.file_type().map_err(|e| e.to_string())?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The results as a Markdown table.
fn report(results: &[CaseResult], options: &BenchOptions) -> String {
    let mut out = format!(
        "c = {}, {} s per case after 1 s warm-up, {} server workers, load generator in the same machine\n\n\
         | case | accepted/s | vs bare | processed/s | max queue | p50 | p99 | p99.9 | errors | server RSS | disk / body bytes |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        options.concurrency, options.seconds, options.workers
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2}x | {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} MiB | {} |\n",
            r.name,
            r.rate,
            r.vs_bare,
            r.processed.map_or("-".into(), |p| format!("{p:.0}")),
            r.max_queue_depth.map_or("-".into(), |d| format!("{d:.0}")),
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.p999.as_secs_f64() * 1e3,
            r.errors,
            r.rss >> 20,
            if r.disk_ratio > 0.0 {
                format!("{:.2}x", r.disk_ratio)
            } else {
                "-".into()
            },
        ));
    }
    out
}

/// The command line of `cargo bench --bench e2e -- …`.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Connections sending at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measured seconds per case.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Deliveries to pre-fill for the large-store case (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    prefill: usize,
    /// Deliveries stored before the backfill case backfills a handler over them (0 skips).
    #[arg(long, default_value_t = 100_000)]
    backfill: usize,
    /// actix-web workers of both servers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Seconds of the sustained end-to-end case (0 skips it).
    #[arg(long, default_value_t = 30)]
    sustain_seconds: u64,
    /// A PostgreSQL server for the PostgreSQL cases (one replica, three replicas), each in a
    /// fresh schema; without it they are skipped.
    #[arg(long, env = "WEBHOOK_INBOX_TEST_POSTGRES_URL")]
    postgres_url: Option<String>,
    /// Only the bare endpoint and the PostgreSQL cases.
    #[arg(long)]
    postgres_only: bool,
    /// Only the sled cases whose name contains this text; repeatable. "sustained" names the
    /// sustained case, which takes its offered load from the "fsync, unique, 1 KiB" case.
    #[arg(long)]
    only: Vec<String>,
    /// Alternated rounds of bare / this build / each `--baseline` (fsync, unique, 1 KiB,
    /// a `log` handler bound); 0 skips them. Combine with `--only rounds` to run only them.
    #[arg(long, default_value_t = 0)]
    rounds: usize,
    /// A build of an earlier commit (`target/release/webhook-inbox` copied aside), measured
    /// in the same rounds; repeatable.
    #[arg(long = "baseline")]
    baselines: Vec<PathBuf>,
    /// TOML appended to this build's config (e.g. "[dispatch]\nconcurrency = 64"), measured
    /// as a further variant in the same rounds; repeatable.
    #[arg(long = "variant")]
    variants: Vec<String>,
    /// The rounds replay stored deliveries (the replay path, 100 % duplicates) instead of
    /// sending new ones.
    #[arg(long)]
    rounds_replay: bool,
    /// Keep the large-store case's pre-filled store here and reuse it in later runs (each
    /// build still runs on a copy of its own).
    #[arg(long)]
    prefill_dir: Option<PathBuf>,
    /// Serve the bare endpoint at `--listen` instead (the benchmark starts itself so).
    #[arg(long, hide = true)]
    bare: bool,
    /// Address of the bare endpoint.
    #[arg(long, hide = true, default_value = "127.0.0.1:0")]
    listen: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

// The same allocator as the service binary, for the bare endpoint it is compared with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = <Args as clap::Parser>::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if args.bare {
        return match runtime.block_on(serve_bare(&args.listen, args.workers)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let options = BenchOptions {
        concurrency: args.concurrency,
        seconds: args.seconds,
        prefill: args.prefill,
        backfill: args.backfill,
        workers: args.workers,
        sustain_seconds: args.sustain_seconds,
        postgres_url: args.postgres_url,
        postgres_only: args.postgres_only,
        only: args.only,
        rounds: args.rounds,
        baselines: args.baselines,
        variants: args.variants,
        rounds_replay: args.rounds_replay,
        prefill_dir: args.prefill_dir,
    };
    match runtime.block_on(run(&options)) {
        Ok(results) => {
            println!("{}", report(&results, &options));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
