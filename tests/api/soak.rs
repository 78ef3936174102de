//! Soak: the real binary under mixed traffic — valid deliveries, duplicates, tampered
//! signatures, oversized bodies and bodies that stall — from several senders. Afterwards:
//! no 5xx but the intended 503s, every acknowledged delivery ran its handler exactly once,
//! and the server's resident memory and open file descriptors did not grow.
//!
//! Under `cargo test` it runs for a few seconds; for minutes:
//! `WEBHOOK_INBOX_SOAK_SECS=600 cargo test --release --test api soak -- --nocapture`.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rand::{Rng, SeedableRng};
use webhook_inbox::config::Config;
use webhook_inbox::verify::Source;

use crate::helpers::{Options, config_text, spawn_binary};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[derive(Default, Debug)]
struct Tally {
    accepted: usize,
    replayed: usize,
    refused: HashMap<u16, usize>,
    /// Ids acknowledged (202), first copy or not.
    acked: std::collections::HashSet<String>,
}

#[test]
fn mixed_traffic_keeps_memory_and_descriptors_flat_and_runs_each_delivery_once() {
    let secs: u64 = std::env::var("WEBHOOK_INBOX_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::TempDir::new().expect("dir");
    let log = dir.path().join("runs.log");
    let script = r#"echo "$WEBHOOK_ID" >> "$1""#;
    let extra = format!(
        "\n[[handlers]]\nname = \"effect\"\nkind = \"command\"\nsource = \"credicorp\"\ncommand = [\"sh\", \"-c\", {script:?}, \"sh\", \"{}\"]\n",
        log.display()
    );
    let text = config_text(
        dir.path(),
        &Options {
            max_body_bytes: 16 * 1024,
            server_toml: "body_timeout = \"1s\"\nmax_inflight_bytes = 1048576".into(),
            extra_toml: extra,
            ..Options::default()
        },
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).expect("config");
    let config = Config::parse(&text, "soak.toml").expect("config");
    let source = Arc::new(Source::named(&config, "credicorp").expect("source"));
    let (mut child, port, _logs) = spawn_binary(&config_path);
    let pid = child.id();
    let url = format!("http://127.0.0.1:{port}/webhooks/credicorp");

    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let baseline: Arc<Mutex<Option<(u64, usize)>>> = Arc::default();
    let senders: Vec<_> = (0..6u64)
        .map(|sender| {
            let (tally, source, url, baseline) =
                (tally.clone(), source.clone(), url.clone(), baseline.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(sender);
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client");
                let mut sent: Vec<(String, String)> = Vec::new();
                let mut n = 0u64;
                while Instant::now() < until {
                    // Warmed up: the first sender takes the baseline once.
                    if sender == 0
                        && started.elapsed() > Duration::from_secs(secs / 4)
                        && baseline.lock().expect("lock").is_none()
                    {
                        *baseline.lock().expect("lock") = Some((rss_kib(pid), open_fds(pid)));
                    }
                    n += 1;
                    let kind = rng.gen_range(0..100);
                    let (id, body) = if kind < 25 && !sent.is_empty() {
                        sent[rng.gen_range(0..sent.len())].clone()
                    } else {
                        let id = format!("soak-{sender}-{n}");
                        (
                            id.clone(),
                            format!(r#"{{"type":"application.created","id":"{id}"}}"#),
                        )
                    };
                    let status = match kind {
                        // Stalls mid-body: 408 after body_timeout.
                        0..=2 => {
                            let mut stream =
                                std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
                            let mut head = String::from(
                                "POST /webhooks/credicorp HTTP/1.1
Host: x
Content-Length: 100
Connection: close
",
                            );
                            for (k, v) in source.sign(&id, body.as_bytes(), SystemTime::now()) {
                                head.push_str(&format!("{k}: {v}\r\n"));
                            }
                            head.push_str("\r\n{");
                            let _ = stream.write_all(head.as_bytes());
                            let mut answer = String::new();
                            stream
                                .set_read_timeout(Some(Duration::from_secs(10)))
                                .expect("timeout");
                            let _ = std::io::Read::read_to_string(&mut stream, &mut answer);
                            answer
                                .split(' ')
                                .nth(1)
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0)
                        }
                        // Oversized: 413.
                        3..=7 => client
                            .post(&url)
                            .body(vec![b'x'; 17 * 1024])
                            .headers(
                                source
                                    .sign(&id, b"x", SystemTime::now())
                                    .into_iter()
                                    .map(|(k, v)| {
                                        (
                                            reqwest::header::HeaderName::from_bytes(k.as_bytes())
                                                .expect("name"),
                                            v.parse().expect("value"),
                                        )
                                    })
                                    .collect(),
                            )
                            .send()
                            .map_or(0, |r| r.status().as_u16()),
                        // Tampered: 401.
                        8..=17 => {
                            let mut r = client.post(&url).body(format!("{body} "));
                            for (k, v) in source.sign(&id, body.as_bytes(), SystemTime::now()) {
                                r = r.header(k, v);
                            }
                            r.send().map_or(0, |r| r.status().as_u16())
                        }
                        _ => {
                            let mut r = client.post(&url).body(body.clone());
                            for (k, v) in source.sign(&id, body.as_bytes(), SystemTime::now()) {
                                r = r.header(k, v);
                            }
                            match r.send() {
                                Ok(r) => {
                                    let status = r.status().as_u16();
                                    let replayed = r.headers().contains_key("idempotent-replayed");
                                    if status == 202 {
                                        let mut t = tally.lock().expect("lock");
                                        t.acked.insert(id.clone());
                                        if replayed {
                                            t.replayed += 1;
                                        } else {
                                            t.accepted += 1;
                                            sent.push((id, body));
                                        }
                                    }
                                    status
                                }
                                Err(_) => 0,
                            }
                        }
                    };
                    if status != 202 {
                        *tally
                            .lock()
                            .expect("lock")
                            .refused
                            .entry(status)
                            .or_default() += 1;
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.join().expect("sender");
    }
    let tally = std::mem::take(&mut *tally.lock().expect("lock"));
    // Every acknowledged delivery runs once; the queue drains.
    let deadline = Instant::now() + Duration::from_secs(120);
    let runs = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let mut runs: HashMap<String, usize> = HashMap::new();
        for line in text.lines() {
            *runs.entry(line.to_owned()).or_default() += 1;
        }
        if tally.acked.iter().all(|id| runs.contains_key(id)) || Instant::now() > deadline {
            break runs;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (rss_end, fds_end) = (rss_kib(pid), open_fds(pid));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(child.wait().expect("exit").success(), "clean exit");

    eprintln!(
        "soak {secs}s: {} accepted, {} replayed, refused {:?}, {} ids acknowledged",
        tally.accepted,
        tally.replayed,
        tally.refused,
        tally.acked.len()
    );
    for id in &tally.acked {
        assert_eq!(runs.get(id), Some(&1), "{id} ran {:?} times", runs.get(id));
    }
    assert_eq!(runs.len(), tally.acked.len(), "nothing else ran");
    for status in tally.refused.keys() {
        assert!(
            matches!(status, 401 | 408 | 413 | 503),
            "unexpected answers: {:?}",
            tally.refused
        );
    }
    let (rss_start, fds_start) = baseline
        .lock()
        .expect("lock")
        .expect("a baseline was taken");
    eprintln!("RSS {rss_start} KiB -> {rss_end} KiB, fds {fds_start} -> {fds_end}");
    assert!(
        rss_end < rss_start + 64 * 1024,
        "RSS grew from {rss_start} KiB to {rss_end} KiB"
    );
    assert!(
        fds_end < fds_start + 32,
        "open files grew from {fds_start} to {fds_end}"
    );
}
