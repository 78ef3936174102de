//! `webhook-inbox replay`: sign fixtures like their sender would and send them, to try
//! handlers locally or check a deployment.
//!
//! Each fixture is sent `times` times; `concurrency` workers take the copies in order, so
//! with C > 1 the copies of one fixture race each other (duplicates in parallel). `tamper`
//! sends a bad signature and expects 401; `new_ids` gives every copy a fresh id. The run
//! fails (non-zero exit) on any 5xx, any connection failure, or a tampered copy that was
//! not refused.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::Config;
use crate::fixture::{Fixture, collect};
use crate::verify::Source;

/// What to send, and where.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Base URL of the public listener, e.g. `http://127.0.0.1:8080`.
    pub target: String,
    /// Copies of each fixture.
    pub times: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Send a bad signature (expect 401).
    pub tamper: bool,
    /// A fresh id for every copy.
    pub new_ids: bool,
    /// Print one line per response.
    pub verbose: bool,
}

/// Counts of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Requests sent.
    pub sent: usize,
    /// 2xx answers that were first answers.
    pub accepted: usize,
    /// 2xx answers with `Idempotent-Replayed: true`.
    pub replayed: usize,
    /// 409/422 answers.
    pub conflicts: usize,
    /// Other 4xx answers.
    pub rejected: usize,
    /// 5xx answers and connection failures.
    pub errors: usize,
    /// Tampered copies that were not answered 401.
    pub unexpected: usize,
    /// Latencies in microseconds, sorted.
    pub latencies_us: Vec<u64>,
}

impl Summary {
    /// Whether the run should exit 0.
    pub fn ok(&self) -> bool {
        self.errors == 0 && self.unexpected == 0
    }

    /// The `p`-th percentile latency (0–100).
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies_us.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * (self.latencies_us.len() - 1) as f64).round() as usize;
        Duration::from_micros(self.latencies_us[rank.min(self.latencies_us.len() - 1)])
    }

    /// The closing report.
    pub fn report(&self) -> String {
        format!(
            "sent {} · accepted {} · replayed {} · conflicts {} · rejected {} · errors {}{}\n\
             latency p50 {:?} · p90 {:?} · p99 {:?} · max {:?}",
            self.sent,
            self.accepted,
            self.replayed,
            self.conflicts,
            self.rejected,
            self.errors,
            if self.unexpected > 0 {
                format!(" · NOT REFUSED (tampered) {}", self.unexpected)
            } else {
                String::new()
            },
            self.percentile(50.0),
            self.percentile(90.0),
            self.percentile(99.0),
            self.percentile(100.0),
        )
    }
}

struct Job {
    source: Arc<Source>,
    fixture: Arc<Fixture>,
    name: String,
    copy: usize,
}

/// Why a replay could not run (answers it got are in the [`Summary`], not here).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No fixture file under the paths given.
    #[error("no fixture files found")]
    NoFixtures,
    /// A fixture could not be read or signed.
    #[error(transparent)]
    Fixture(#[from] crate::fixture::FixtureError),
    /// A fixture's source is not configured or cannot be built.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// A sender task failed.
    #[error("a sender stopped: {0}")]
    Sender(#[from] tokio::task::JoinError),
}

/// Sends every fixture under `paths` as `options` says.
pub async fn run(
    config: &Config,
    paths: &[PathBuf],
    options: &ReplayOptions,
) -> Result<Summary, ReplayError> {
    let files = collect(paths)?;
    if files.is_empty() {
        return Err(ReplayError::NoFixtures);
    }
    let mut jobs = Vec::new();
    // Each source's secrets are decoded once, not per request.
    let mut sources: std::collections::HashMap<String, Arc<Source>> = Default::default();
    for file in &files {
        let fixture = Arc::new(Fixture::load(file)?);
        let source = match sources.get(&fixture.source) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(Source::named(config, &fixture.source)?);
                sources.insert(fixture.source.clone(), s.clone());
                s
            }
        };
        // Fail before sending anything if a fixture cannot be signed.
        fixture.sign_as(&source, &fixture.id, SystemTime::now(), false)?;
        for copy in 0..options.times.max(1) {
            jobs.push(Job {
                source: source.clone(),
                fixture: fixture.clone(),
                name: file.display().to_string(),
                copy,
            });
        }
    }
    let total = jobs.len();
    jobs.reverse(); // popped from the end, in file order
    let queue = Arc::new(Mutex::new(jobs));
    let summary = Arc::new(Mutex::new(Summary::default()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let progress = total > 20 && !options.verbose && std::io::stderr().is_terminal();
    let run_id = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);

    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let (queue, summary, client) = (queue.clone(), summary.clone(), client.clone());
            let options = options.clone();
            tokio::spawn(async move {
                loop {
                    let Some(job) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                        return;
                    };
                    let id = if options.new_ids {
                        format!("{}-{run_id:x}-{}", job.fixture.id, job.copy)
                    } else {
                        job.fixture.id.clone()
                    };
                    let line = send(&client, &options, &job, &id, &summary).await;
                    let s = summary.lock().unwrap_or_else(|p| p.into_inner());
                    if options.verbose {
                        println!("{line}");
                    } else if progress {
                        eprint!("\r{}/{total} sent", s.sent);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await?;
    }
    if progress {
        eprintln!();
    }
    let mut summary = summary.lock().unwrap_or_else(|p| p.into_inner()).clone();
    summary.latencies_us.sort_unstable();
    Ok(summary)
}

async fn send(
    client: &reqwest::Client,
    options: &ReplayOptions,
    job: &Job,
    id: &str,
    summary: &Mutex<Summary>,
) -> String {
    let request = match job
        .fixture
        .sign_as(&job.source, id, SystemTime::now(), options.tamper)
    {
        Ok(r) => r,
        Err(e) => {
            let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
            s.sent += 1;
            s.errors += 1;
            return format!("{} {id}: {e}", job.name);
        }
    };
    let mut builder = client
        .post(format!(
            "{}{}",
            options.target.trim_end_matches('/'),
            request.path
        ))
        .body(request.body);
    for (k, v) in &request.headers {
        builder = builder.header(k.as_str(), v.as_str());
    }
    let started = Instant::now();
    let result = builder.send().await;
    let elapsed = started.elapsed().as_micros() as u64;
    let mut s = summary.lock().unwrap_or_else(|p| p.into_inner());
    s.sent += 1;
    s.latencies_us.push(elapsed);
    match result {
        Err(e) => {
            s.errors += 1;
            format!("{} {id}: connection failed: {e}", job.name)
        }
        Ok(response) => {
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            match status {
                200..=299 if replayed => s.replayed += 1,
                200..=299 => s.accepted += 1,
                409 | 422 => s.conflicts += 1,
                400..=499 => s.rejected += 1,
                _ => s.errors += 1,
            }
            if options.tamper && status != 401 {
                s.unexpected += 1;
            }
            format!(
                "{} {id}: {status}{}",
                job.name,
                if replayed { " (replayed)" } else { "" }
            )
        }
    }
}
