//! End-to-end load against the real binary, side by side with a bare actix-web endpoint on
//! the same machine, so every figure comes with the machine's own ceiling and the ratio
//! holds on a noisy box. Not part of the library or the CLI:
//!
//! ```sh
//! cargo bench --bench e2e -- --seconds 5 --prefill 1000000
//! ```
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
use webhook_inbox::store::{DeliveryStore, NewDelivery, SledStore};
use webhook_inbox::verify::Source;

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
    /// actix-web workers of both servers.
    workers: usize,
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
}

struct Load {
    body_size: usize,
    duplicate_every: Option<u64>,
    replay_only: bool,
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
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
max_body_bytes = 1048576
workers = {workers}

[storage]
path = "{}"
durability = "{durability}"

[sources.bench]
secrets = ["{SECRET}"]

[[handlers]]
name = "noop"
kind = "log"
source = "bench"
"#,
        dir.join("data").display()
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
    let child = Command::new(exe()?)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
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

async fn drive(
    port: u16,
    source: Arc<Source>,
    load: Load,
    options: &BenchOptions,
    first_id: u64,
) -> (CaseResult, u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency)
        .build()
        .unwrap_or_default();
    let url = format!("http://127.0.0.1:{port}/webhooks/bench");
    let next = Arc::new(AtomicU64::new(first_id));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(load);
    let mut workers = Vec::new();
    for _ in 0..options.concurrency {
        let (client, url, next, measuring, stop, source, load) = (
            client.clone(),
            url.clone(),
            next.clone(),
            measuring.clone(),
            stop.clone(),
            source.clone(),
            load.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let id_n = if load.replay_only {
                    n % 10_000
                } else {
                    match load.duplicate_every {
                        Some(k) if n % k == 1 => n - 1,
                        _ => n,
                    }
                };
                let id = format!("msg_{id_n}");
                let body = body(id_n, load.body_size);
                let mut request = client.post(&url).body(body.clone());
                for (k, v) in source.sign(&id, body.as_bytes(), SystemTime::now()) {
                    request = request.header(k, v);
                }
                let started = Instant::now();
                let ok = match request.send().await {
                    Ok(r) => {
                        let ok = r.status().is_success();
                        let _ = r.bytes().await;
                        ok
                    }
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    latencies.push(started.elapsed().as_micros() as u64);
                    if !ok {
                        errors += 1;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, e)) = w.await {
            latencies.extend(l);
            errors += e;
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round().max(0.0) as usize)
            .map(|us| Duration::from_micros(*us))
            .unwrap_or_default()
    };
    let result = CaseResult {
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.5),
        p99: pct(0.99),
        p999: pct(0.999),
        errors,
        ..CaseResult::default()
    };
    (result, next.load(Ordering::Relaxed))
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
                duplicate_every: None,
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

    let cases: [(&str, &str, usize, Option<u64>, bool); 6] = [
        ("fsync, unique, 1 KiB", "fsync", 1024, None, false),
        ("buffered, unique, 1 KiB", "buffered", 1024, None, false),
        (
            "fsync, 50% duplicates, 1 KiB",
            "fsync",
            1024,
            Some(2),
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
    for (name, durability, size, duplicate_every, replay_only) in cases {
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
                    duplicate_every: None,
                    replay_only: false,
                },
                &quick,
                0,
            )
            .await;
            recorded = sent;
            wait_queue_drained(server.admin, Duration::from_secs(120)).await?;
        }
        let (mut r, sent) = drive(
            server.port,
            source.clone(),
            Load {
                body_size: size,
                duplicate_every,
                replay_only,
            },
            options,
            0,
        )
        .await;
        r.name = name.to_owned();
        r.rss = rss_bytes(server.child.id());
        drop(server);
        let stored = if replay_only {
            recorded
        } else if duplicate_every.is_some() {
            sent / 2
        } else {
            sent
        };
        r.disk_ratio =
            dir_size(&dir.path().join("data")) as f64 / (stored.max(1) as f64 * size as f64);
        r.vs_bare = r.rate / bare_rate[&size];
        eprintln!("{}: {:.0}/s ({:.2}x bare)", r.name, r.rate, r.vs_bare);
        results.push(r);
    }

    if options.prefill > 0 {
        results.extend(large_store(options, source.clone(), bare_rate[&1024]).await?);
    }
    Ok(results)
}

/// Pre-fills `options.prefill` deliveries through the store API, then measures start-up,
/// RSS and throughput against an empty store in the same conditions.
async fn large_store(
    options: &BenchOptions,
    source: Arc<Source>,
    bare: f64,
) -> Result<Vec<CaseResult>, String> {
    let dir = tempfile::TempDir::new().map_err(|e| e.to_string())?;
    {
        let store = SledStore::open(&dir.path().join("data"), Durability::Buffered, 64 << 20)
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let now = webhook_inbox::clock::to_ms(SystemTime::now());
        for n in 0..options.prefill as u64 {
            let b = Bytes::from(body(n + 10_000_000, 1024));
            let delivery = webhook_inbox::testing::authenticated(
                &source,
                &format!("msg_prefill_{n}"),
                &b,
                SystemTime::now(),
            )
            .map_err(|e| e.to_string())?;
            let new = NewDelivery::new(delivery, now, vec!["noop".into()], false).acknowledged(
                webhook_inbox::store::StoredResponse {
                    status: 202,
                    body: "{}".into(),
                },
            );
            store.claim(new).await.map_err(|e| e.to_string())?;
        }
        store.flush().await.map_err(|e| e.to_string())?;
        eprintln!(
            "pre-filled {} deliveries in {:.1?}",
            options.prefill,
            started.elapsed()
        );
    }
    let mut results = Vec::new();
    let (server, startup) = start_inbox(dir.path(), "fsync", options.workers).await?;
    let idle_rss = rss_bytes(server.child.id());
    let (mut r, _) = drive(
        server.port,
        source,
        Load {
            body_size: 1024,
            duplicate_every: None,
            replay_only: false,
        },
        options,
        0,
    )
    .await;
    r.name = format!(
        "fsync, unique, 1 KiB, {} stored (start-up {} ms, idle RSS {} MiB)",
        options.prefill,
        startup.as_millis(),
        idle_rss >> 20
    );
    r.rss = rss_bytes(server.child.id());
    r.vs_bare = r.rate / bare;
    drop(server);
    r.disk_ratio = dir_size(&dir.path().join("data")) as f64 / (options.prefill as f64 * 1024.0);
    eprintln!("{}: {:.0}/s", r.name, r.rate);
    results.push(r);
    Ok(results)
}

/// The results as a Markdown table.
fn report(results: &[CaseResult], options: &BenchOptions) -> String {
    let mut out = format!(
        "c = {}, {} s per case after 1 s warm-up, {} server workers, load generator in the same machine\n\n\
         | case | deliveries/s | vs bare | p50 | p99 | p99.9 | errors | server RSS | disk / body bytes |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        options.concurrency, options.seconds, options.workers
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2}x | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} MiB | {} |\n",
            r.name,
            r.rate,
            r.vs_bare,
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
    /// actix-web workers of both servers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
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
        workers: args.workers,
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
