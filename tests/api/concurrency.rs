//! Randomized, seeded concurrency test of the whole service: many senders, thousands of
//! distinct deliveries, each sent more than once, some under a second id with the same
//! body, while the dispatcher runs (one handler retries once) and retention sweeps expire
//! what is final. Every delivery runs each handler exactly once per time it was claimed new:
//! never left behind (invariants 1, 2), never twice (4, 5).
//!
//! The seeds are fixed, so a failure repeats. A longer soak with fresh seeds:
//! `WEBHOOK_INBOX_SOAK_SECS=300 cargo test --release --test api concurrency -- --nocapture`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use webhook_inbox::Registration;

use crate::helpers::{Options, Recorder, eventually, is_replayed, spawn_with};

const SENDERS: usize = 16;

/// Sends every (id, body) from [`SENDERS`] concurrent senders; counts the new claims.
async fn send(
    app: &Arc<crate::helpers::TestApp>,
    work: Vec<(String, String)>,
    news: &Arc<Mutex<HashMap<String, usize>>>,
) {
    let work = Arc::new(Mutex::new(work));
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (app, work, news) = (app.clone(), work.clone(), news.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let Some((id, body)) = work.lock().expect("lock").pop() else {
                    return;
                };
                let answer = app.deliver(&id, &body).await;
                assert_eq!(answer.status().as_u16(), 202, "{id}");
                if !is_replayed(&answer) {
                    *news.lock().expect("lock").entry(id).or_default() += 1;
                }
            }
        }));
    }
    for s in senders {
        s.await.expect("sender");
    }
}

/// One round: `deliveries` bodies, each sent 2 or 3 times, every tenth also under a second
/// id; all copies shuffled and shared by the senders.
async fn round(seed: u64, deliveries: usize) {
    let flaky = Recorder {
        fail_first: 1,
        ..Recorder::default()
    };
    let app = Arc::new(
        spawn_with(Options {
            // A short retention, so sweeps remove final deliveries during the round and
            // later copies of them are new again; the tolerance as long, so a request
            // delayed on a loaded machine is still in time (2 s to spare at least).
            retention: "3s",
            // Fingerprints forgotten with their deliveries, so that bodies come back new.
            fingerprint_retention: Some("3s"),
            tolerance: "3s",
            extra_toml: "body_dedup = true\n".into(),
            handlers: vec![Registration::new("flaky", flaky.clone()).source("credicorp")],
            ..Options::default()
        })
        .await,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut work: Vec<(String, String)> = Vec::new();
    for i in 0..deliveries {
        let body = format!(r#"{{"type":"application.created","data":{{"n":{i},"seed":{seed}}}}}"#);
        for _ in 0..rng.gen_range(2..=3) {
            work.push((format!("msg_{i}"), body.clone()));
        }
        if i % 10 == 0 {
            work.push((format!("msg_{i}_again"), body));
        }
    }
    for i in (1..work.len()).rev() {
        work.swap(i, rng.gen_range(0..=i));
    }
    // A second wave: a fifth of the bodies again, a little past the retention, while the
    // sweeps remove what the first wave made final (whatever the timing, the counts below
    // stay exact: an expired id answers as new, and must run again).
    let mut late: Vec<(String, String)> = work
        .iter()
        .filter(|_| rng.gen_ratio(1, 5))
        .cloned()
        .collect();
    late.dedup();
    let total = work.len() + late.len();
    // Answers without `Idempotent-Replayed`: the claims that were new, per id.
    let news: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    send(&app, work, &news).await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    send(&app, late, &news).await;
    let news = news.lock().expect("lock").clone();
    let settled = || {
        news.iter()
            .all(|(id, n)| app.recorder.runs_of(id) == *n && flaky.runs_of(id) == 2 * n)
    };
    assert!(
        eventually(Duration::from_secs(60), settled).await,
        "seed {seed}: not every new delivery ran its handlers"
    );
    for (id, n) in &news {
        assert_eq!(app.recorder.runs_of(id), *n, "seed {seed}: {id}");
        assert_eq!(
            flaky.runs_of(id),
            2 * n,
            "seed {seed}: {id} (fails once, then succeeds)"
        );
    }
    let ran: usize = app.recorder.runs().len();
    let new_claims: usize = news.values().sum();
    assert_eq!(
        ran, new_claims,
        "seed {seed}: no run of a delivery that was not new"
    );
    let again = news.keys().filter(|id| id.ends_with("_again")).count();
    eprintln!(
        "seed {seed}: {total} requests, {new_claims} new claims of {} ids ({} claimed new again after expiring; {again} second ids ran, the rest were body duplicates), every handler ran once per new claim",
        news.len(),
        new_claims - news.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_senders_duplicates_and_same_body_ids_run_each_handler_once() {
    for seed in [1, 2] {
        round(seed, 600).await;
    }
    if let Some(secs) = std::env::var("WEBHOOK_INBOX_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        let until = Instant::now() + Duration::from_secs(secs);
        let mut seed = rand::random::<u32>() as u64;
        while Instant::now() < until {
            round(seed, 3000).await;
            seed += 1;
        }
    }
}
