//! Crash test against the real binary: deliveries (with duplicates) under load while the
//! process is killed with SIGKILL at random moments and restarted; the senders retry until
//! acknowledged. Afterwards every acknowledged delivery's `command` handler has run, and it
//! ran more than once only where a crash interrupted that very run: then in a later process,
//! with the same idempotency key and a higher attempt number.

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rand::{Rng, SeedableRng};
use webhook_inbox::config::Config;
use webhook_inbox::verify::Source;

use crate::helpers::{Options, config_text};

const DELIVERIES: usize = 150;
const COPIES: usize = 2;
const KILLS: usize = 6;
const SENDERS: usize = 8;

/// Starts the binary; a start refused because the store is still locked is tried again,
/// as a service manager would: a handler program the killed process was forking when it
/// died holds the store's lock until that child execs (and closes it), which on a loaded
/// machine can be a moment after the kill.
pub fn start(config: &std::path::Path) -> (Child, u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match crate::helpers::try_spawn_binary(config) {
            Ok((child, port, _logs)) => return (child, port),
            Err(e) if e.contains("in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Sends one delivery to `credicorp` on whatever port the current process listens on,
/// re-signed each time as a real sender does, until it is answered 202; a refused
/// connection (the process is down) or a 5xx is tried again.
pub async fn send_until_acknowledged(
    client: &reqwest::Client,
    port: &AtomicU16,
    source: &webhook_inbox::config::SourceConfig,
    id: &str,
    body: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "{id} never acknowledged");
        let headers = Source::from_config("credicorp", source, "t.toml", &|_| None)
            .expect("source")
            .sign(id, body.as_bytes(), SystemTime::now());
        let mut request = client
            .post(format!(
                "http://127.0.0.1:{}/webhooks/credicorp",
                port.load(Ordering::SeqCst)
            ))
            .body(body.to_owned());
        for (k, v) in headers {
            request = request.header(k, v);
        }
        match request.send().await {
            Ok(r) if r.status().as_u16() == 202 => return,
            Ok(r) => assert!(r.status().is_server_error(), "{id}: {}", r.status()),
            Err(_) => {} // the process is down: retry
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `store check` on the stopped server's store and asserts it found no violation;
/// returns its report.
pub fn assert_store_check_clean(config_path: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["store", "check", "--config"])
        .arg(config_path)
        .output()
        .expect("store check runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("0 violation(s)"),
        "store check after the crashes: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[derive(Debug, Clone)]
struct RunLine {
    phase: String,
    attempt: u32,
    key: String,
    pid: String,
}

#[test]
fn sigkill_at_random_moments_loses_no_acked_delivery_and_reruns_only_interrupted_runs() {
    crash_cycles(false);
}

/// The same under contention (issue 10, item 5): three copies of every delivery race each
/// other from different senders, and every third body is also sent under a second id
/// (body dedup), while the dispatcher runs. Each body runs its handler under one id only,
/// and after the last restart `store check` finds nothing to repair.
#[test]
fn sigkill_under_contention_loses_nothing_runs_each_body_once_and_leaves_nothing_to_repair() {
    crash_cycles(true);
}

/// The id of copy `copy` of delivery `i`: under contention every third body also goes out
/// under a second id.
fn id_of(i: usize, copy: usize, contended: bool) -> String {
    if contended && i.is_multiple_of(3) && copy % 2 == 1 {
        format!("msg_crash_{i:04}_b")
    } else {
        format!("msg_crash_{i:04}")
    }
}

/// Writes `dir/config.toml`: the test config with `source_keys` added to the source and a
/// `command` handler `effect` running `sh -c script sh args…`. Returns its path and config.
fn write_config(
    dir: &std::path::Path,
    source_keys: &str,
    script: &str,
    args: &[&std::path::Path],
) -> (std::path::PathBuf, Config) {
    let args: String = args
        .iter()
        .map(|a| format!(", \"{}\"", a.display()))
        .collect();
    let extra = format!(
        "{source_keys}\n[[handlers]]\nname = \"effect\"\nkind = \"command\"\nsource = \"credicorp\"\ncommand = [\"sh\", \"-c\", {script:?}, \"sh\"{args}]\n"
    );
    let text = config_text(
        dir,
        &Options {
            extra_toml: extra,
            ..Options::default()
        },
    );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, &text).expect("write config");
    let config = Config::parse(&text, "t.toml").expect("config");
    (config_path, config)
}

fn crash_cycles(contended: bool) {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test seed {seed} (CRASH_SEED={seed} repeats it)");
    let copies = if contended { 3 } else { COPIES };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::TempDir::new().expect("dir");
    let log = dir.path().join("runs.log");
    let script = r#"echo "start $WEBHOOK_ID $WEBHOOK_ATTEMPT $IDEMPOTENCY_KEY $PPID" >> "$1"; cat > /dev/null; sleep 0.02; echo "end $WEBHOOK_ID $WEBHOOK_ATTEMPT $IDEMPOTENCY_KEY $PPID" >> "$1""#;
    let prefix = if contended { "body_dedup = true\n" } else { "" };
    let (config_path, config) = write_config(dir.path(), prefix, script, &[&log]);
    let source = Source::from_config("credicorp", &config.sources["credicorp"], "t.toml", &|_| {
        None
    })
    .expect("source");

    let (mut child, port) = start(&config_path);
    let current_port = Arc::new(AtomicU16::new(port));
    let acked = Arc::new(AtomicUsize::new(0));

    // Every copy of every delivery, shuffled, shared by the senders.
    let mut work: Vec<(usize, usize)> = (0..DELIVERIES)
        .flat_map(|i| (0..copies).map(move |c| (i, c)))
        .collect();
    for i in (1..work.len()).rev() {
        work.swap(i, rng.gen_range(0..=i));
    }
    let work = Arc::new(std::sync::Mutex::new(work));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let work = work.clone();
            let port = current_port.clone();
            let acked = acked.clone();
            let cfg = config.sources["credicorp"].clone();
            runtime.spawn(async move {
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("client");
                loop {
                    let Some((i, copy)) = work.lock().expect("lock").pop() else {
                        return;
                    };
                    let id = id_of(i, copy, contended);
                    // Every other body is long enough for the body log, so both kinds
                    // of stored body are cut by the kills.
                    let pad = if i % 2 == 0 {
                        "p".repeat(400)
                    } else {
                        String::new()
                    };
                    let body = format!(
                        r#"{{"type":"application.created","data":{{"n":{i},"pad":"{pad}"}}}}"#
                    );
                    send_until_acknowledged(&client, &port, &cfg, &id, &body).await;
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    drop(source);

    let mut kills = 0;
    while kills < KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(30..300)));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        kills += 1;
        let (next, port) = start(&config_path);
        child = next;
        current_port.store(port, Ordering::SeqCst);
    }
    for s in senders {
        runtime.block_on(s).expect("sender finished");
    }
    assert_eq!(
        acked.load(Ordering::SeqCst),
        DELIVERIES * copies,
        "every copy acknowledged"
    );

    // Wait for the surviving process to finish every handler run.
    let read_runs = || -> BTreeMap<String, Vec<RunLine>> {
        let mut runs: BTreeMap<String, Vec<RunLine>> = BTreeMap::new();
        for line in std::fs::read_to_string(&log).unwrap_or_default().lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            if let [phase, id, attempt, key, pid] = parts[..] {
                runs.entry(id.to_owned()).or_default().push(RunLine {
                    phase: phase.to_owned(),
                    attempt: attempt.parse().expect("attempt"),
                    key: key.to_owned(),
                    pid: pid.to_owned(),
                });
            }
        }
        runs
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let runs = read_runs();
        let finished = runs
            .iter()
            .filter(|(_, r)| r.iter().any(|l| l.phase == "end"))
            .map(|(id, _)| id.trim_end_matches("_b"))
            .collect::<HashSet<_>>()
            .len();
        if finished == DELIVERIES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {finished} of {DELIVERIES} deliveries were handled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let survivor = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &survivor]).status();
    let status = child.wait().expect("exit");
    assert!(
        status.success(),
        "graceful exit after the crash cycles: {status:?}"
    );

    if contended {
        let report = assert_store_check_clean(&config_path);
        eprintln!("store check: {}", report.trim());
    }

    let runs = read_runs();
    let bodies_run: HashSet<&str> = runs.keys().map(|id| id.trim_end_matches("_b")).collect();
    assert_eq!(
        bodies_run.len(),
        runs.len(),
        "one body runs under one id only: {:?}",
        runs.keys().collect::<Vec<_>>()
    );
    let mut reruns = 0;
    for (id, lines) in &runs {
        let starts: Vec<&RunLine> = lines.iter().filter(|l| l.phase == "start").collect();
        assert!(!starts.is_empty(), "{id}");
        assert!(
            starts.iter().all(|s| s.key == starts[0].key),
            "{id}: one idempotency key: {starts:?}"
        );
        for pair in starts.windows(2) {
            reruns += 1;
            assert!(
                pair[1].attempt > pair[0].attempt,
                "{id}: a rerun has a higher attempt: {starts:?}"
            );
            assert_ne!(
                pair[1].pid, pair[0].pid,
                "{id}: reran only in a later process, after a crash: {starts:?}"
            );
            // Only a run whose process was killed is run again: one interrupted, or one
            // whose outcome had not reached the disk yet (outcomes are not waited for).
            assert_ne!(
                pair[0].pid, survivor,
                "{id}: a run of the process that survived ran again: {starts:?}"
            );
        }
    }
    let pids: HashSet<&str> = runs.values().flatten().map(|l| l.pid.as_str()).collect();
    eprintln!(
        "crash test: {KILLS} SIGKILL cycles, {DELIVERIES} deliveries x {copies} copies, {} processes ran handlers, {reruns} runs repeated after a crash",
        pids.len()
    );
}

/// `store copy` takes a crashed sled store's count of unclean starts along: the pair a
/// kill -9 cut mid-run, whose start was never written, is exported with that run counted,
/// so on PostgreSQL it runs again with attempt 2, as it would have on sled.
#[test]
fn a_store_exported_after_a_crash_counts_the_run_it_cut() {
    let dir = tempfile::TempDir::new().expect("dir");
    let log = dir.path().join("runs.log");
    let release = dir.path().join("release");
    // Records its start, then waits until the test releases it, or its temp dir is gone
    // (the test may end within the loop's 50 ms): no stray sleeper is left either way.
    let script = r#"echo "start $WEBHOOK_ID $WEBHOOK_ATTEMPT" >> "$1"; cat > /dev/null; while [ ! -e "$2" ] && [ -e "$1" ]; do sleep 0.05; done"#;
    let (config_path, config) = write_config(dir.path(), "", script, &[&log, &release]);
    let (mut child, port) = start(&config_path);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = crate::helpers::client();
        send_until_acknowledged(
            &client,
            &AtomicU16::new(port),
            &config.sources["credicorp"],
            "msg_cut",
            r#"{"type":"application.created"}"#,
        )
        .await;
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains("start msg_cut 1")) {
        assert!(Instant::now() < deadline, "the handler never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    std::fs::write(&release, b"").expect("release the handler");

    let deadline = Instant::now() + Duration::from_secs(30);
    let store = loop {
        match webhook_inbox::store::SledStore::open(
            &dir.path().join("data"),
            webhook_inbox::config::Durability::Fsync,
            8 << 20,
        ) {
            Ok(store) => break store,
            Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    };
    let (items, _) = store
        .export_page(&webhook_inbox::store::ExportPosition::default(), 10)
        .expect("export");
    let jobs = items
        .iter()
        .find_map(|item| match item {
            webhook_inbox::store::StoredItem::Delivery { record, jobs, .. }
                if record.id == "msg_cut" =>
            {
                Some(jobs.clone())
            }
            _ => None,
        })
        .expect("msg_cut is exported");
    let state = jobs
        .iter()
        .find(|(handler, _)| handler == "effect")
        .and_then(|(_, state)| state.clone())
        .expect("a state that counts the run the crash cut");
    assert_eq!(state.attempts, 1, "{state:?}");
    assert!(!state.is_final(), "{state:?}");
}

/// sled keeps a first run's queue entry in memory while the process lives (`first_runs`):
/// a kill -9 loses the entries of deliveries acknowledged but not yet run (here four wait
/// behind a run that blocks, `concurrency = 1`). `store check` lists each as what a crash
/// left, not as a breach of invariant 1, and the next process runs every one of them.
#[test]
fn first_runs_queued_in_memory_all_run_after_a_kill_dash_nine() {
    const N: usize = 5;
    let dir = tempfile::TempDir::new().expect("dir");
    let log = dir.path().join("runs.log");
    let gate = dir.path().join("gate");
    // Blocks until the gate exists (or the test's directory is gone: no stray loop).
    let script = r#"echo "start $WEBHOOK_ID $PPID" >> "$1"; cat > /dev/null; while [ ! -e "$2" ] && [ -d "$(dirname "$1")" ]; do sleep 0.05; done; echo "end $WEBHOOK_ID $PPID" >> "$1""#;
    let extra = format!(
        "[[handlers]]\nname = \"effect\"\nkind = \"command\"\nsource = \"credicorp\"\nconcurrency = 1\ncommand = [\"sh\", \"-c\", {script:?}, \"sh\", \"{}\", \"{}\"]\n",
        log.display(),
        gate.display()
    );
    let text = config_text(
        dir.path(),
        &Options {
            extra_toml: extra,
            sled_only: true,
            ..Options::default()
        },
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).expect("write config");
    let config = Config::parse(&text, "t.toml").expect("config");
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait_for = |what: &str, done: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done(&lines()) {
            assert!(Instant::now() < deadline, "{what}: {}", lines());
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    let (mut child, port) = start(&config_path);
    let port = AtomicU16::new(port);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = crate::helpers::client();
    for n in 0..N {
        let body = format!(r#"{{"type":"application.created","data":{{"n":{n}}}}}"#);
        runtime.block_on(send_until_acknowledged(
            &client,
            &port,
            &config.sources["credicorp"],
            &format!("msg_mem_{n}"),
            &body,
        ));
    }
    wait_for("one run started", &|l| l.contains("start "));
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");

    let report = assert_store_check_clean(&config_path);
    assert_eq!(
        report.matches("first run queued in memory").count(),
        N,
        "each pair that had not run is listed as the crash's: {report}"
    );

    std::fs::write(&gate, b"").expect("open the gate");
    let (mut child, _) = start(&config_path);
    let survivor = child.id().to_string();
    wait_for("every delivery run by the next process", &|l| {
        (0..N).all(|n| l.contains(&format!("end msg_mem_{n} {survivor}")))
    });
    let _ = Command::new("kill").args(["-TERM", &survivor]).status();
    assert!(child.wait().expect("exit").success());
    let report = assert_store_check_clean(&config_path);
    assert!(!report.contains("first run queued in memory"), "{report}");
}
