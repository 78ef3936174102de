//! Several `serve` processes on one PostgreSQL database (design.md, "PostgreSQL"): the real
//! binary, a real database, a `command` handler that appends each run to a file shared by
//! the replicas. Skipped, with one line saying so, without `WEBHOOK_INBOX_TEST_POSTGRES_URL`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use sqlx::Connection as _;
use webhook_inbox::config::Config;
use webhook_inbox::verify::Source;

use crate::helpers::{
    SECRET, Serving, eventually, eventually_async, fresh_postgres_schema, test_postgres_url,
    try_spawn_serve,
};

/// Appends `source id attempt key serve-pid` per run; the first run ever (with `$2` given)
/// creates the directory `$2`, says `held …`, and hangs, so a test can kill its replica
/// while it runs.
const SCRIPT: &str = r#"echo "run $WEBHOOK_SOURCE $WEBHOOK_ID $WEBHOOK_ATTEMPT $IDEMPOTENCY_KEY $PPID" >> "$1"; cat > /dev/null; if [ -n "$2" ] && mkdir "$2" 2>/dev/null; then echo "held $WEBHOOK_SOURCE $WEBHOOK_ID $WEBHOOK_ATTEMPT $IDEMPOTENCY_KEY $PPID" >> "$1"; sleep 30; fi"#;

/// A config for replicas on `url`: `credicorp` (plain) and `dedup` (body dedup), one
/// `command` handler for both, a 2 s run lease so that a take-over is quick.
fn replica_config(url: &str, runs: &Path, hold: Option<&Path>) -> String {
    let hold = hold.map(|h| h.display().to_string()).unwrap_or_default();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
workers = 2

[storage]
backend = "postgres"
postgres_url = "{url}"
pool_size = 4

[dispatch]
concurrency = 4
max_attempts = 6
initial_backoff = "50ms"
max_backoff = "200ms"
run_lease = "2s"

[sources.credicorp]
secrets = ["{SECRET}"]

[sources.dedup]
secrets = ["{SECRET}"]
body_dedup = true

[sources.control]
secrets = ["{SECRET}"]

[admin]
token_env = "WEBHOOK_INBOX_TEST_ADMIN_TOKEN"

[[handlers]]
name = "witness"
kind = "log"
source = "control"

[[handlers]]
name = "effect"
kind = "command"
command = ["sh", "-c", {SCRIPT:?}, "sh", "{runs}", "{hold}"]

[sources.lines]
secrets = ["{SECRET}"]

[[handlers]]
name = "in-line"
kind = "command"
source = "lines"
order_by = "/key"
command = ["sh", "-c", {LINE_SCRIPT:?}, "sh", "{lines}"]
"#,
        runs = runs.display(),
        lines = runs.with_file_name("lines.log").display(),
    )
}

/// Appends `start id` and `end id` around each run of the ordered handler.
const LINE_SCRIPT: &str = r#"echo "start $WEBHOOK_ID $PPID" >> "$1"; cat > /dev/null; sleep 0.02; echo "end $WEBHOOK_ID $PPID" >> "$1""#;

/// One line of the runs file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RunLine {
    held: bool,
    source: String,
    id: String,
    attempt: u32,
    key: String,
    pid: u32,
}

fn runs(path: &Path) -> Vec<RunLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            Some(RunLine {
                held: *f.first()? == "held",
                source: f.get(1)?.to_string(),
                id: f.get(2)?.to_string(),
                attempt: f.get(3)?.parse().ok()?,
                key: f.get(4)?.to_string(),
                pid: f.get(5)?.parse().ok()?,
            })
        })
        .collect()
}

/// id, status, attempts, due_ms, lease_until_ms, last_error of a job row.
type UnfinishedRow = (
    String,
    String,
    i32,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

/// A database schema of its own, a config file on it, and the replicas started on it.
struct Cluster {
    /// Holds the config and the runs file for as long as the replicas run.
    _dir: tempfile::TempDir,
    url: String,
    config: Config,
    runs: PathBuf,
    replicas: Vec<Serving>,
}

impl Cluster {
    async fn start(server_url: &str, replicas: usize, hold: bool) -> Cluster {
        let url = fresh_postgres_schema(server_url).await;
        let cluster = Cluster::start_on(url, replicas, hold);
        cluster.ready().await;
        cluster
    }

    fn start_on(url: String, replicas: usize, hold: bool) -> Cluster {
        let dir = tempfile::TempDir::new().expect("dir");
        let runs = dir.path().join("runs.log");
        let hold = hold.then(|| dir.path().join("held"));
        let text = replica_config(&url, &runs, hold.as_deref());
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let config = Config::parse(&text, "replicas.toml").expect("config");
        let replicas = (0..replicas)
            .map(|_| try_spawn_serve(&config_path).unwrap_or_else(|e| panic!("{e}")))
            .collect();
        Cluster {
            _dir: dir,
            url,
            config,
            runs,
            replicas,
        }
    }

    fn sign(&self, source: &str, id: &str, body: &[u8]) -> Vec<(String, String)> {
        Source::from_config(source, &self.config.sources[source], "t.toml", &|_| None)
            .expect("source")
            .sign(id, body, SystemTime::now())
    }

    /// Counts of job rows: (all, not succeeded).
    async fn jobs(&self) -> (i64, i64) {
        let mut db = sqlx::PgConnection::connect(&self.url).await.expect("db");
        let row: (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status <> 'succeeded') FROM inbox_jobs",
        )
        .fetch_one(&mut db)
        .await
        .expect("count");
        let _ = db.close().await;
        row
    }

    /// The job rows that have not succeeded, one line each.
    async fn unfinished(&self) -> Vec<String> {
        let mut db = sqlx::PgConnection::connect(&self.url).await.expect("db");
        let rows: Vec<UnfinishedRow> = sqlx::query_as(
            "SELECT id, status, attempts, due_ms, lease_until_ms, last_error FROM inbox_jobs \
                 WHERE status <> 'succeeded' ORDER BY id LIMIT 20",
        )
        .fetch_all(&mut db)
        .await
        .expect("rows");
        let _ = db.close().await;
        rows.into_iter().map(|r| format!("{r:?}")).collect()
    }

    /// Waits until `expected` job rows exist and every one has succeeded: from then on
    /// nothing can run again, so the runs file is final.
    async fn settle(&self, expected: i64) {
        let settled = eventually_async(Duration::from_secs(90), || async {
            self.jobs().await == (expected, 0)
        })
        .await;
        assert!(
            settled,
            "jobs (all, unfinished) = {:?}, expected ({expected}, 0); unfinished: {:#?}; {} runs",
            self.jobs().await,
            self.unfinished().await,
            runs(&self.runs).len()
        );
    }

    /// Waits until every replica says it is ready (its database reachable, migrated).
    async fn ready(&self) {
        let client = crate::helpers::client();
        for replica in &self.replicas {
            let port = replica.admin_port;
            assert!(
                eventually_async(Duration::from_secs(30), || async {
                    readyz(&client, port).await == 200
                })
                .await,
                "replica on port {} never became ready",
                replica.port
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

async fn post(
    client: &reqwest::Client,
    port: u16,
    source: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let mut request = client
        .post(format!("http://127.0.0.1:{port}/webhooks/{source}"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// `post` as a sender does it: a 503 `storage_unavailable` (the replica's connections all
/// busy past their wait, on a loaded machine) is sent again after a pause, for up to a
/// minute; any other answer is the answer.
async fn post_until_answered(
    client: &reqwest::Client,
    port: u16,
    source: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let answer = post(client, port, source, headers, body).await;
        let busy = answer.0 == 503 && answer.1.contains("storage_unavailable");
        if !busy || tokio::time::Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same delivery sent to three replicas at once, twice each, over many ids: one run
/// per delivery, and every copy gets the first answer byte for byte (a copy answered 503
/// because its replica's connections were busy is sent again, as a sender would). One body
/// under three ids sent to the three replicas at once (body dedup): one run per body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_run_each_delivery_once_and_each_body_once() {
    let Some(server) = test_postgres_url("replicas: three replicas, one database") else {
        return;
    };
    let cluster = Cluster::start(&server, 3, false).await;
    let client = crate::helpers::client();
    const IDS: usize = 40;
    const BODIES: usize = 15;
    let ports: Vec<u16> = cluster.replicas.iter().map(|r| r.port).collect();

    type Sends =
        std::pin::Pin<Box<dyn std::future::Future<Output = (String, Vec<(u16, String)>)> + Send>>;
    let mut sends: Vec<Sends> = Vec::new();
    for i in 0..IDS {
        let id = format!("msg_replicas_{i:03}");
        let body = format!(r#"{{"type":"application.created","data":{{"n":{i}}}}}"#);
        let headers = cluster.sign("credicorp", &id, body.as_bytes());
        let copies: Vec<_> = ports
            .iter()
            .chain(ports.iter())
            .map(|&port| {
                let (client, headers, body) = (client.clone(), headers.clone(), body.clone());
                async move {
                    post_until_answered(&client, port, "credicorp", &headers, body.as_bytes()).await
                }
            })
            .collect();
        sends.push(Box::pin(async move {
            (id, futures_util::future::join_all(copies).await)
        }));
    }
    for b in 0..BODIES {
        let body = format!(r#"{{"type":"application.created","data":{{"body":{b}}}}}"#);
        let copies: Vec<_> = ports
            .iter()
            .enumerate()
            .map(|(r, &port)| {
                let id = format!("dup_{b:03}_{r}");
                let headers = cluster.sign("dedup", &id, body.as_bytes());
                let (client, body) = (client.clone(), body.clone());
                async move {
                    post_until_answered(&client, port, "dedup", &headers, body.as_bytes()).await
                }
            })
            .collect();
        sends.push(Box::pin(async move {
            (
                format!("body {b}"),
                futures_util::future::join_all(copies).await,
            )
        }));
    }
    for (what, answers) in futures_util::future::join_all(sends).await {
        let first = &answers[0];
        assert_eq!(first.0, 202, "{what}: {answers:?}");
        assert!(
            answers.iter().all(|a| a == first),
            "{what}: every copy gets the first answer byte for byte: {answers:?}"
        );
    }

    // One job row per id of `credicorp`, one per body of `dedup` (aliases have none).
    cluster.settle((IDS + BODIES) as i64).await;
    let lines = runs(&cluster.runs);
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_body: BTreeMap<String, usize> = BTreeMap::new();
    for line in &lines {
        match line.source.as_str() {
            "credicorp" => *per_id.entry(line.id.clone()).or_default() += 1,
            _ => *per_body.entry(line.id[..7].to_owned()).or_default() += 1,
        }
    }
    assert_eq!(per_id.len(), IDS, "{per_id:?}");
    assert!(per_id.values().all(|&n| n == 1), "{per_id:?}");
    assert_eq!(per_body.len(), BODIES, "{per_body:?}");
    assert!(per_body.values().all(|&n| n == 1), "{per_body:?}");
    let pids: HashSet<u32> = lines.iter().map(|l| l.pid).collect();
    println!("runs spread over {} replica(s)", pids.len());
}

/// A replica killed (SIGKILL) while a handler of its runs: another replica takes the pair
/// over once the run lease lapses, with attempt + 1 and the same idempotency key; every
/// acknowledged delivery is run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_running_pair_is_taken_over_with_the_same_key() {
    let Some(server) = test_postgres_url("replicas: take-over after kill -9") else {
        return;
    };
    let mut cluster = Cluster::start(&server, 2, true).await;
    let client = crate::helpers::client();
    const IDS: usize = 6;
    for i in 0..IDS {
        let id = format!("msg_takeover_{i}");
        let body = format!(r#"{{"type":"application.created","data":{{"n":{i}}}}}"#);
        let port = cluster.replicas[i % 2].port;
        let headers = cluster.sign("credicorp", &id, body.as_bytes());
        let (status, _) = post(&client, port, "credicorp", &headers, body.as_bytes()).await;
        assert_eq!(status, 202);
    }
    // The first run ever hangs: find it, and kill the replica that runs it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = loop {
        if let Some(line) = runs(&cluster.runs).into_iter().find(|l| l.held) {
            break line;
        }
        assert!(Instant::now() < deadline, "no run started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let victim = cluster
        .replicas
        .iter()
        .position(|r| r.child.id() == held.pid)
        .expect("the held run belongs to a replica");
    let mut killed = cluster.replicas.remove(victim);
    killed.child.kill().expect("SIGKILL");
    let _ = killed.child.wait();
    let survivor = cluster.replicas[0].child.id();

    cluster.settle(IDS as i64).await;
    let lines: Vec<RunLine> = runs(&cluster.runs)
        .into_iter()
        .filter(|l| !l.held)
        .collect();
    let of_held: Vec<&RunLine> = lines.iter().filter(|l| l.id == held.id).collect();
    assert_eq!(
        of_held.len(),
        2,
        "the held pair ran again once: {of_held:?}"
    );
    assert_eq!((of_held[0].attempt, of_held[1].attempt), (1, 2));
    assert_eq!(of_held[0].key, of_held[1].key, "the same idempotency key");
    assert_eq!(
        of_held[1].pid, survivor,
        "taken over by the surviving replica"
    );
    let mut per_id: HashMap<&str, Vec<u32>> = HashMap::new();
    for line in &lines {
        per_id.entry(&line.id).or_default().push(line.attempt);
    }
    assert_eq!(
        per_id.len(),
        IDS,
        "every acknowledged delivery ran: {lines:?}"
    );
}

/// A PostgreSQL server of the test's own (initdb in a temp directory, a free port), so it
/// can be stopped and started without disturbing the tests that share the machine's
/// server. As root, its programs run as the `postgres` user, as `pg_ctlcluster` does.
struct OwnPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl OwnPostgres {
    /// `None` (with a line saying why) where PostgreSQL's server programs are not installed.
    fn create() -> Option<OwnPostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|b| b.join("initdb").exists());
        let Some(bin) = bin else {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "PostgreSQL stop/start: skipped: no /usr/lib/postgresql/*/bin/initdb"
            );
            return None;
        };
        let dir = tempfile::TempDir::new().expect("dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let pg = OwnPostgres { dir, bin, port };
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        pg.run(
            "initdb",
            &["-A", "trust", "-U", "postgres", "-D", &pg.data()],
        );
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = command.args(args).output().expect("runs");
        assert!(
            out.status.success(),
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
    }

    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        if is_root() {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .args(["-D", &self.data(), "-m", "immediate", "stop"])
                .output();
        }
    }
}

fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    // `id -u`: the project's `nix` is built without its `user` feature, and only this test
    // asks.
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

async fn readyz(client: &reqwest::Client, admin_port: u16) -> u16 {
    client
        .get(format!("http://127.0.0.1:{admin_port}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// A replica started while its database is down serves (not ready, webhooks 503); the
/// database comes up, then is stopped and started again under load: 503
/// `storage_unavailable` with `Retry-After` while it is down, every acknowledged delivery
/// runs, and the service is ready again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_load_loses_nothing() {
    if test_postgres_url("replicas: PostgreSQL stopped and started under load").is_none() {
        return;
    }
    let Some(pg) = OwnPostgres::create() else {
        return;
    };
    // Started before its database: it must come up anyway, not ready.
    let cluster = Cluster::start_on(pg.url(), 1, false);
    let (port, admin) = (cluster.replicas[0].port, cluster.replicas[0].admin_port);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    assert_eq!(readyz(&client, admin).await, 503);
    let body = br#"{"type":"application.created"}"#;
    let headers = cluster.sign("credicorp", "msg_before_db", body);
    let (status, answer) = post(&client, port, "credicorp", &headers, body).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer.contains("storage_unavailable"), "{answer}");

    pg.start();
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            readyz(&client, admin).await == 200
        })
        .await,
        "ready once the database is up"
    );

    // Senders that retry until acknowledged, as real senders do.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let saw_503 = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    const PER_SENDER: usize = 60;
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let (client, acked, saw_503) = (client.clone(), acked.clone(), saw_503.clone());
            let sources = cluster.config.sources["credicorp"].clone();
            tokio::spawn(async move {
                for i in 0..PER_SENDER {
                    let id = format!("msg_outage_{s}_{i:03}");
                    let body = format!(r#"{{"type":"application.created","data":{{"n":{i}}}}}"#);
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        assert!(Instant::now() < deadline, "{id} never acknowledged");
                        let headers = Source::from_config("credicorp", &sources, "t", &|_| None)
                            .expect("source")
                            .sign(&id, body.as_bytes(), SystemTime::now());
                        let mut request = client
                            .post(format!("http://127.0.0.1:{port}/webhooks/credicorp"))
                            .body(body.clone());
                        for (k, v) in headers {
                            request = request.header(k, v);
                        }
                        match request.send().await {
                            Ok(r) if r.status().as_u16() == 202 => {
                                acked.lock().expect("lock").push(id);
                                break;
                            }
                            Ok(r) => {
                                assert_eq!(r.status().as_u16(), 503, "{id}");
                                assert!(r.headers().contains_key("retry-after"), "{id}");
                                saw_503.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(e) => panic!("{id}: the service stopped answering: {e}"),
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    // Some acknowledged, then the database goes away under load…
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            acked.lock().expect("lock").len() >= 20
        })
        .await
    );
    pg.stop();
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            readyz(&client, admin).await == 503
        })
        .await,
        "not ready while the database is down"
    );
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            saw_503.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await,
        "webhooks answered 503 while the database is down"
    );
    // …and comes back: the same process recovers by itself.
    pg.start();
    for sender in senders {
        sender.await.expect("sender");
    }
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            readyz(&client, admin).await == 200
        })
        .await,
        "ready again without a restart"
    );
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), 4 * PER_SENDER);
    cluster.settle(acked.len() as i64).await;
    let ran: HashSet<String> = runs(&cluster.runs).into_iter().map(|l| l.id).collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !ran.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged, never run: {lost:?}");
    drop(cluster);
    drop(pg);
}

/// Runs `webhook-inbox store copy --from FROM --to TO`, which must succeed; its output.
fn store_copy(from: &Path, to: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
        .args(["store", "copy", "--from"])
        .arg(from)
        .arg("--to")
        .arg(to)
        .output()
        .expect("store copy runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `store copy` from a stopped sled server into PostgreSQL, and from there back into a new
/// sled store: a redelivery of a copied id is answered byte for byte as before and runs
/// nothing; a kept fingerprint (body dedup) is still a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_the_dedup_window_from_sled_to_postgres_and_back() {
    let Some(server) = test_postgres_url("replicas: store copy sled to postgres") else {
        return;
    };
    let url = fresh_postgres_schema(&server).await;
    let dir = tempfile::TempDir::new().expect("dir");
    let runs_path = dir.path().join("runs.log");
    let postgres_text = replica_config(&url, &runs_path, None);
    let sled_text = postgres_text.replace(
        &format!("backend = \"postgres\"\npostgres_url = \"{url}\"\npool_size = 4"),
        &format!("path = \"{}\"", dir.path().join("data").display()),
    );
    let old = dir.path().join("old.toml");
    let new = dir.path().join("new.toml");
    std::fs::write(&old, &sled_text).expect("write");
    std::fs::write(&new, &postgres_text).expect("write");
    let config = Config::parse(&sled_text, "old.toml").expect("old config");
    assert_eq!(config.storage.backend, webhook_inbox::config::Backend::Sled);
    let sign = |source: &str, id: &str, body: &[u8]| {
        Source::from_config(source, &config.sources[source], "t", &|_| None)
            .expect("source")
            .sign(id, body, SystemTime::now())
    };
    let client = crate::helpers::client();

    // On sled: deliveries arrive and run.
    let mut sled = try_spawn_serve(&old).unwrap_or_else(|e| panic!("{e}"));
    let mut answers = Vec::new();
    for i in 0..5 {
        let (source, id) = if i < 4 {
            ("credicorp", format!("msg_copy_{i}"))
        } else {
            ("dedup", "msg_copy_dedup".to_owned())
        };
        let body = format!(r#"{{"type":"application.created","data":{{"n":{i}}}}}"#);
        let headers = sign(source, &id, body.as_bytes());
        let answer = post(&client, sled.port, source, &headers, body.as_bytes()).await;
        assert_eq!(answer.0, 202);
        answers.push((source, id, body, answer));
    }
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            runs(&runs_path).len() == 5
        })
        .await
    );
    let _ = Command::new("kill")
        .args(["-TERM", &sled.child.id().to_string()])
        .status();
    assert!(sled.child.wait().expect("wait").success());

    let stdout = store_copy(&old, &new);
    assert!(stdout.contains("copied 5 deliveries"), "{stdout}");

    // On PostgreSQL: every redelivery is the replay it is.
    let cluster = Cluster::start_on(url, 1, false);
    cluster.ready().await;
    for (source, id, body, first) in &answers {
        let headers = sign(source, id, body.as_bytes());
        let again = post(
            &client,
            cluster.replicas[0].port,
            source,
            &headers,
            body.as_bytes(),
        )
        .await;
        assert_eq!(&again, first, "{id}: the first answer, byte for byte");
    }
    // The same body under a new id is a body duplicate there too.
    let (_, _, body, first) = &answers[4];
    let headers = sign("dedup", "msg_copy_dedup_again", body.as_bytes());
    let again = post(
        &client,
        cluster.replicas[0].port,
        "dedup",
        &headers,
        body.as_bytes(),
    )
    .await;
    assert_eq!(&again, first);
    // Nothing is due or running, so nothing can run: the runs are the five from before.
    cluster.settle(5).await;
    assert_eq!(runs(&runs_path).len(), 5, "{:?}", runs(&runs_path));
    drop(cluster);

    // And back into sled, once the replicas are stopped: the same replays there.
    let back_path = dir.path().join("back");
    let back = dir.path().join("back.toml");
    std::fs::write(
        &back,
        sled_text.replace(
            &dir.path().join("data").display().to_string(),
            &back_path.display().to_string(),
        ),
    )
    .expect("write");
    let stdout = store_copy(&new, &back);
    assert!(stdout.contains("copied 6 deliveries"), "{stdout}");
    let mut sled = try_spawn_serve(&back).unwrap_or_else(|e| panic!("{e}"));
    for (source, id, body, first) in &answers {
        let headers = sign(source, id, body.as_bytes());
        let again = post(&client, sled.port, source, &headers, body.as_bytes()).await;
        assert_eq!(
            &again, first,
            "{id}: the first answer, byte for byte, on sled again"
        );
    }
    let _ = Command::new("kill")
        .args(["-TERM", &sled.child.id().to_string()])
        .status();
    assert!(sled.child.wait().expect("wait").success());
    // Nothing came back due: every pair is as it was, succeeded, and nothing ran.
    use webhook_inbox::store::Operations as _;
    let store = webhook_inbox::store::SledStore::open(
        &back_path,
        webhook_inbox::config::Durability::Fsync,
        8 << 20,
    )
    .expect("open the copy");
    assert_eq!(store.queue_depths().await.expect("depths"), Vec::new());
    assert_eq!(runs(&runs_path).len(), 5, "{:?}", runs(&runs_path));
    drop(dir);
}

/// The PostgreSQL keys fail at start with the key named, never the URL.
#[test]
fn a_missing_url_variable_or_a_bad_url_is_a_start_up_error_naming_the_key() {
    let dir = tempfile::TempDir::new().expect("dir");
    let check = |storage: &str| {
        let text = format!(
            "[storage]\nbackend = \"postgres\"\n{storage}\n[sources.credicorp]\nsecrets = [\"{SECRET}\"]\n"
        );
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("WEBHOOK_INBOX_UNSET_URL")
            .output()
            .expect("runs");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = check("postgres_url_env = \"WEBHOOK_INBOX_UNSET_URL\"");
    assert!(
        missing.contains("storage.postgres_url_env") && missing.contains("WEBHOOK_INBOX_UNSET_URL"),
        "{missing}"
    );
    let bad = check("postgres_url = \"postgres://user:s3cret@[::1/db\"");
    assert!(bad.contains("storage.postgres_url"), "{bad}");
    assert!(
        !bad.contains("s3cret"),
        "the URL's password is never shown: {bad}"
    );
    let none = check("");
    assert!(none.contains("storage.postgres_url_env"), "{none}");
}

/// `webhook-inbox migrate` brings a database's schema up to date, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_embedded_migrations_once() {
    let Some(server) = test_postgres_url("replicas: migrate") else {
        return;
    };
    let url = fresh_postgres_schema(&server).await;
    let dir = tempfile::TempDir::new().expect("dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, replica_config(&url, &dir.path().join("runs"), None)).expect("write");
    let migrate = || {
        let out = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"))
            .args(["migrate", "--config"])
            .arg(&path)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(migrate().starts_with("5 migration(s) applied"));
    assert!(migrate().starts_with("0 migration(s) applied"));
    let mut db = sqlx::PgConnection::connect(&url).await.expect("db");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'inbox_%' \
         AND schemaname = ANY(current_schemas(false))",
    )
    .fetch_one(&mut db)
    .await
    .expect("count");
    assert_eq!(tables, 5);
}

/// A pause asked of one replica holds on the others (it is in the database), and a resume
/// asked of another lets every replica run the queued pairs, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_on_every_replica() {
    let Some(server) = test_postgres_url("replicas: pause across replicas") else {
        return;
    };
    let cluster = Cluster::start(&server, 2, false).await;
    let client = crate::helpers::client();
    let admin = |replica: usize, verb: &str| {
        client
            .post(format!(
                "http://127.0.0.1:{}/admin/handlers/effect/{verb}",
                cluster.replicas[replica].admin_port
            ))
            .bearer_auth("admin-token")
            .send()
    };
    assert_eq!(
        admin(0, "pause").await.expect("pause").status().as_u16(),
        200
    );
    for i in 0..10 {
        let id = format!("msg_pause_{i}");
        let body = format!(r#"{{"type":"application.created","data":{{"n":{i}}}}}"#);
        let headers = cluster.sign("control", &id, body.as_bytes());
        let port = cluster.replicas[1].port;
        let (status, _) = post(&client, port, "control", &headers, body.as_bytes()).await;
        assert_eq!(status, 202);
    }
    // Both replicas ran the other handler of those deliveries, none ran `effect`.
    let statuses = || async {
        let mut db = sqlx::PgConnection::connect(&cluster.url).await.expect("db");
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT handler, status, count(*) FROM inbox_jobs GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .fetch_all(&mut db)
        .await
        .expect("rows");
        let _ = db.close().await;
        rows
    };
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            statuses()
                .await
                .contains(&("witness".into(), "succeeded".into(), 10))
        })
        .await,
        "{:?}",
        statuses().await
    );
    assert!(runs(&cluster.runs).is_empty(), "a paused handler ran");
    assert!(
        statuses()
            .await
            .contains(&("effect".into(), "pending".into(), 10)),
        "{:?}",
        statuses().await
    );
    assert_eq!(
        admin(1, "resume").await.expect("resume").status().as_u16(),
        200
    );
    cluster.settle(20).await;
    let lines = runs(&cluster.runs);
    let ids: HashSet<&str> = lines.iter().map(|l| l.id.as_str()).collect();
    assert_eq!((lines.len(), ids.len()), (10, 10), "each once: {lines:?}");
}

/// `store check` on PostgreSQL: a healthy database passes; a pair stranded with nothing
/// queued (damage from outside: a hand edit, a restored backup) is listed, exit 1, and
/// `--repair` queues it, after which a replica runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_check_on_postgres_lists_and_repairs_a_stranded_pair() {
    let Some(server) = test_postgres_url("replicas: store check on PostgreSQL") else {
        return;
    };
    let mut cluster = Cluster::start(&server, 1, false).await;
    let client = crate::helpers::client();
    let body = br#"{"type":"application.created"}"#;
    let headers = cluster.sign("credicorp", "msg_check", body);
    let (status, _) = post(
        &client,
        cluster.replicas[0].port,
        "credicorp",
        &headers,
        body,
    )
    .await;
    assert_eq!(status, 202);
    cluster.settle(1).await;
    for mut replica in cluster.replicas.drain(..) {
        let _ = replica.child.kill();
        let _ = replica.child.wait();
    }
    let dir = tempfile::TempDir::new().expect("dir");
    let config = dir.path().join("check.toml");
    std::fs::write(&config, replica_config(&cluster.url, &cluster.runs, None)).expect("write");
    let check = |repair: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_webhook-inbox"));
        command.args(["store", "check", "--config"]).arg(&config);
        if repair {
            command.arg("--repair");
        }
        let out = command.output().expect("runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = check(false);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("0 violation(s)"), "{text}");

    let mut db = sqlx::PgConnection::connect(&cluster.url).await.expect("db");
    sqlx::query("UPDATE inbox_jobs SET status = 'pending', due_ms = NULL, updated_ms = NULL")
        .execute(&mut db)
        .await
        .expect("damage");
    let (code, text) = check(false);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("credicorp/msg_check#effect"), "{text}");
    let (code, text) = check(true);
    assert_eq!(code, 0, "{text}");
    let due: Option<i64> = sqlx::query_scalar("SELECT due_ms FROM inbox_jobs")
        .fetch_one(&mut db)
        .await
        .expect("row");
    assert!(due.is_some(), "repaired: queued again");
    let (code, text) = check(false);
    assert_eq!((code, text.contains("0 violation(s)")), (0, true), "{text}");
}

/// `order_by` across replicas: deliveries of one key sent alternately to two replicas (each
/// after the previous one's answer), many keys at once: per key the runs, wherever they
/// happen, never overlap and start in received order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_by_line_holds_across_replicas() {
    let Some(server) = test_postgres_url("replicas: order_by across replicas") else {
        return;
    };
    const KEYS: usize = 8;
    const PER_KEY: usize = 10;
    let cluster = Cluster::start(&server, 2, false).await;
    let ports: Vec<u16> = cluster.replicas.iter().map(|r| r.port).collect();
    let client = crate::helpers::client();
    let sends = (0..KEYS).map(|key| {
        let (client, ports) = (client.clone(), ports.clone());
        let cluster = &cluster;
        async move {
            for seq in 0..PER_KEY {
                let id = format!("line_{key}_{seq:02}");
                let body = format!(r#"{{"type":"a","key":"k{key}","seq":{seq}}}"#);
                let headers = cluster.sign("lines", &id, body.as_bytes());
                let port = ports[seq % ports.len()];
                let (status, text) = post(&client, port, "lines", &headers, body.as_bytes()).await;
                assert_eq!(status, 202, "{id}: {text}");
            }
        }
    });
    futures_util::future::join_all(sends).await;
    let log = cluster.runs.with_file_name("lines.log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let ended = || read().lines().filter(|l| l.starts_with("end ")).count();
    assert!(
        eventually_async(Duration::from_secs(60), || async {
            ended() >= KEYS * PER_KEY
        })
        .await,
        "{} of {} ran",
        ended(),
        KEYS * PER_KEY
    );
    let mut per_key: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    let mut pids = HashSet::new();
    for line in read().lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let [phase, id, pid] = f[..] else { continue };
        let mut parts = id.split('_').skip(1);
        let (Some(key), Some(Ok(seq))) = (parts.next(), parts.next().map(str::parse::<usize>))
        else {
            continue;
        };
        pids.insert(pid.to_owned());
        per_key
            .entry(key.to_owned())
            .or_default()
            .push((phase.to_owned(), seq));
    }
    let mut breaches = Vec::new();
    for (key, events) in &per_key {
        let mut running = false;
        let mut next = 0;
        for (phase, seq) in events {
            match phase.as_str() {
                "start" => {
                    if running {
                        breaches.push(format!("key {key}: {seq} started while another ran"));
                    }
                    if *seq != next {
                        breaches.push(format!("key {key}: {seq} started, {next} was next"));
                    }
                    running = true;
                }
                _ => {
                    running = false;
                    next = seq + 1;
                }
            }
        }
        if next != PER_KEY {
            breaches.push(format!("key {key}: ran up to {next}"));
        }
    }
    assert_eq!(per_key.len(), KEYS);
    assert!(breaches.is_empty(), "{}", breaches.join("\n"));
    println!("ordered runs spread over {} replica(s)", pids.len());
}

/// A processed-mode handler that works for 12 s, writing `tick ATTEMPT` every quarter of a
/// second while it lives, between `start ATTEMPT` and `end ATTEMPT`: the file's order shows
/// whether two runs were alive at once.
const TICKING_SCRIPT: &str = r#"echo "start $WEBHOOK_ATTEMPT" >> "$1"; cat > /dev/null; i=0; while [ $i -lt 48 ]; do echo "tick $WEBHOOK_ATTEMPT" >> "$1"; sleep 0.25; i=$((i+1)); done; echo "end $WEBHOOK_ATTEMPT" >> "$1""#;

/// Replicas of the test's own config on `url`: `[server]` and `[storage]` as every replica
/// test has them, then `rest` (dispatch, sources, handlers); written into `dir`, `replicas`
/// started, each ready before this returns.
async fn ready_replicas(
    dir: &Path,
    url: &str,
    rest: &str,
    replicas: usize,
) -> (Config, Vec<Serving>) {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
workers = 2

[storage]
backend = "postgres"
postgres_url = "{url}"
pool_size = 4
{rest}"#
    );
    let config_path = dir.join("config.toml");
    std::fs::write(&config_path, &text).expect("write config");
    let config = Config::parse(&text, "replicas.toml").expect("config");
    let serving: Vec<Serving> = (0..replicas)
        .map(|_| try_spawn_serve(&config_path).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let client = crate::helpers::client();
    for r in &serving {
        let admin = r.admin_port;
        assert!(
            eventually_async(Duration::from_secs(30), || async {
                readyz(&client, admin).await == 200
            })
            .await,
            "replica on port {} never became ready",
            r.port
        );
    }
    (config, serving)
}

/// Issue 22.1, invariant 6: two replicas, `ack = "processed"`, 3 s leases, a handler that
/// takes 12 s. The database goes away while replica A runs it: A can no longer prove its
/// leases, so it stops the handler and answers 503 by the lease's end; once the database is
/// back, the sender's retry to replica B takes over (after the grace) and runs it again. No
/// tick of the first run comes after the second run's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_longer_than_the_lease_never_lets_two_runs_overlap() {
    if test_postgres_url("replicas: lease fencing under a database outage").is_none() {
        return;
    }
    let Some(pg) = OwnPostgres::create() else {
        return;
    };
    pg.start();
    let dir = tempfile::TempDir::new().expect("dir");
    let runs = dir.path().join("runs.log");
    let rest = format!(
        r#"
[dispatch]
run_lease = "3s"

[sources.credicorp]
secrets = ["{SECRET}"]
ack = "processed"
processed_lease = "3s"

[[handlers]]
name = "slow-effect"
kind = "command"
timeout = "60s"
command = ["sh", "-c", {TICKING_SCRIPT:?}, "sh", "{runs}"]
"#,
        runs = runs.display(),
    );
    let (config, mut replicas) = ready_replicas(dir.path(), &pg.url(), &rest, 2).await;
    let (a, b) = (&replicas[0], &replicas[1]);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let body = br#"{"type":"application.created","data":{"id":"app_1"}}"#.to_vec();
    let sign = || {
        Source::from_config("credicorp", &config.sources["credicorp"], "t", &|_| None)
            .expect("source")
            .sign("msg_fenced", &body, SystemTime::now())
    };
    let first = {
        let (client, headers, body, port) = (client.clone(), sign(), body.clone(), a.port);
        tokio::spawn(async move { post(&client, port, "credicorp", &headers, &body).await })
    };
    let lines = || std::fs::read_to_string(&runs).unwrap_or_default();
    assert!(
        eventually(Duration::from_secs(30), || lines().contains("start 1")).await,
        "replica A started the handler"
    );
    // The outage: longer than the lease and its grace, or until A has answered.
    pg.stop();
    let outage_end = Instant::now() + Duration::from_secs(8);
    while !first.is_finished() && Instant::now() < outage_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.start();
    let (status, answer) = first.await.expect("first request");
    assert_eq!(
        status, 503,
        "A cannot prove its lease: 503, not a result: {answer}"
    );
    assert!(answer.contains("storage_unavailable"), "{answer}");
    // The sender retries, at replica B, as its Retry-After says.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, answer) = post(&client, b.port, "credicorp", &sign(), &body).await;
        if status == 200 {
            break;
        }
        assert!(
            [409, 503].contains(&status),
            "only in progress or unavailable before the take-over: {status} {answer}"
        );
        assert!(Instant::now() < deadline, "never processed: {answer}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = lines();
    let second_start = log
        .lines()
        .position(|l| l.starts_with("start ") && l != "start 1")
        .unwrap_or_else(|| panic!("a second run started: {log}"));
    let late_ticks: Vec<&str> = log
        .lines()
        .skip(second_start)
        .filter(|l| *l == "tick 1")
        .collect();
    assert!(
        late_ticks.is_empty(),
        "the first run was still alive after the second started ({} ticks):\n{log}",
        late_ticks.len()
    );
    assert!(!log.contains("end 1"), "the first run was stopped: {log}");
    assert_eq!(
        log.lines().filter(|l| l.starts_with("end ")).count(),
        1,
        "one run completed: {log}"
    );
    for r in &mut replicas {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
    drop(pg);
}

/// Appends `start NS` and `end NS` (nanoseconds of the wall clock) around a run that takes
/// `$2` seconds.
const TIMED_SCRIPT: &str = r#"echo "start $(date +%s%N)" >> "$1"; cat > /dev/null; sleep "$2"; echo "end $(date +%s%N)" >> "$1""#;

/// Every line of a file of [`TIMED_SCRIPT`] as (ns, is a start), in time order: enough for
/// the starts and for how many runs were alive at once.
fn timed_events(path: &Path) -> Vec<(u128, bool)> {
    let mut events: Vec<(u128, bool)> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (kind, ns) = l.split_once(' ')?;
            Some((ns.trim().parse().ok()?, kind == "start"))
        })
        .collect();
    // Ends before starts at the same instant: a run that ended frees its slot.
    events.sort_by_key(|&(at, start)| (at, start));
    events
}

/// Issue 22.3: with PostgreSQL, a handler's `concurrency` and `rate` hold across all
/// replicas together. Three replicas share 30 deliveries; `slots` (`concurrency = 2`) never
/// runs more than twice at once anywhere, and `paced` (`rate = "5/s"`) takes its turns at
/// 5/s across them all (ten turns never in less than 1.5 s: the slack is a program's spawn
/// delay on a loaded machine; the exact spacing is the store's, checked by
/// `store_conformance::replicas_reserving_starts_at_once_get_one_interval_each`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_and_rate_hold_across_three_replicas() {
    let Some(server) = test_postgres_url("replicas: global concurrency and rate") else {
        return;
    };
    let url = fresh_postgres_schema(&server).await;
    let dir = tempfile::TempDir::new().expect("dir");
    let (slots, paced) = (dir.path().join("slots.log"), dir.path().join("paced.log"));
    let rest = format!(
        r#"
[dispatch]
concurrency = 8

[sources.credicorp]
secrets = ["{SECRET}"]

[[handlers]]
name = "slots"
kind = "command"
concurrency = 2
command = ["sh", "-c", {TIMED_SCRIPT:?}, "sh", "{slots}", "0.2"]

[[handlers]]
name = "paced"
kind = "command"
rate = "5/s"
command = ["sh", "-c", {TIMED_SCRIPT:?}, "sh", "{paced}", "0"]
"#,
        slots = slots.display(),
        paced = paced.display(),
    );
    let (config, mut replicas) = ready_replicas(dir.path(), &url, &rest, 3).await;
    let client = crate::helpers::client();
    const DELIVERIES: usize = 30;
    let source = Source::from_config("credicorp", &config.sources["credicorp"], "t", &|_| None)
        .expect("source");
    for i in 0..DELIVERIES {
        let id = format!("msg_limits_{i:02}");
        let body = format!(r#"{{"type":"application.created","n":{i}}}"#);
        let headers = source.sign(&id, body.as_bytes(), SystemTime::now());
        let port = replicas[i % 3].port;
        let (status, answer) = post(&client, port, "credicorp", &headers, body.as_bytes()).await;
        assert_eq!(status, 202, "{answer}");
    }
    let ends = |path: &Path| {
        timed_events(path)
            .iter()
            .filter(|(_, start)| !start)
            .count()
    };
    assert!(
        eventually(Duration::from_secs(90), || {
            ends(&slots) == DELIVERIES && ends(&paced) == DELIVERIES
        })
        .await,
        "every run ended: slots {}, paced {}",
        ends(&slots),
        ends(&paced)
    );
    let mut alive = 0usize;
    let mut most = 0usize;
    for (_, start) in timed_events(&slots) {
        if start {
            alive += 1;
            most = most.max(alive);
        } else {
            alive = alive.saturating_sub(1);
        }
    }
    assert!(most <= 2, "`slots` ran {most} at once across the replicas");
    assert!(most >= 1);
    // A start is written by the handler's process, which begins some time after its turn:
    // on a loaded machine one start may show late and make the next look early. So the
    // rate is checked over ten turns (2 s at 5/s) with half a second of slack, where the
    // replicas' own limits without the store's reservation (15/s) would take 0.7 s.
    let mut starts: Vec<u128> = timed_events(&paced)
        .into_iter()
        .filter_map(|(at, start)| start.then_some(at))
        .collect();
    starts.sort_unstable();
    assert!(starts.len() >= DELIVERIES, "{} starts", starts.len());
    let shortest = starts
        .windows(11)
        .map(|turns| turns[10] - turns[0])
        .min()
        .unwrap_or(0);
    assert!(
        shortest >= 1_500_000_000,
        "`paced` took {} ms for ten turns across the replicas (5/s: 2 000 ms)",
        shortest / 1_000_000
    );
    for r in &mut replicas {
        let _ = r.child.kill();
        let _ = r.child.wait();
    }
}

/// A new delivery `id` that queues a `log` run, acknowledged 202.
fn queued_delivery(id: &str) -> webhook_inbox::store::NewDelivery {
    use webhook_inbox::store::{NewDelivery, StoredResponse};
    let config = Config::parse(
        &format!("[sources.credicorp]\nsecrets = [\"{SECRET}\"]\n"),
        "t.toml",
    )
    .expect("config");
    let source = Source::named(&config, "credicorp").expect("source");
    let body = bytes::Bytes::from_static(br#"{"type":"application.created"}"#);
    let delivery = webhook_inbox::testing::authenticated(&source, id, &body, SystemTime::now())
        .expect("signed");
    let now = webhook_inbox::clock::Clock::System.now_ms();
    NewDelivery::new(delivery, now, vec!["log".into()], false).acknowledged(StoredResponse {
        status: 202,
        body: "{}".into(),
    })
}

/// Work notices are the schema's: a claim in another schema of the same database announces
/// nothing on this one's channel. (PostgreSQL delivers notices in commit order, so had the
/// other schema's notice been sent here, it would come before the marker sent after it.)
#[tokio::test]
async fn a_claim_in_another_schema_announces_nothing_here() {
    use sqlx::postgres::PgListener;
    use webhook_inbox::store::postgres::WORK_CHANNEL_QUERY;
    use webhook_inbox::store::{Claim, Claims as _};
    let Some(server) = test_postgres_url("replicas: work notice per schema") else {
        return;
    };
    let there_url = fresh_postgres_schema(&server).await;
    let here_url = fresh_postgres_schema(&server).await;
    let there = crate::helpers::postgres_store_at(&there_url).await;
    let here = sqlx::PgPool::connect(&here_url).await.expect("connect");
    let channel = |pool: sqlx::PgPool| async move {
        let name: String = sqlx::query_scalar(WORK_CHANNEL_QUERY)
            .fetch_one(&pool)
            .await
            .expect("channel");
        let mut listener = PgListener::connect_with(&pool).await.expect("listener");
        listener.listen(&name).await.expect("listen");
        (name, listener)
    };
    let there_pool = sqlx::PgPool::connect(&there_url).await.expect("connect");
    let (there_channel, mut there_listener) = channel(there_pool).await;
    let (here_channel, mut here_listener) = channel(here.clone()).await;
    assert_ne!(there_channel, here_channel);

    assert!(matches!(
        there
            .claim(queued_delivery("msg_elsewhere"))
            .await
            .expect("claim"),
        Claim::New
    ));
    tokio::time::timeout(Duration::from_secs(30), there_listener.recv())
        .await
        .expect("the other schema announces its claim")
        .expect("notice");
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(&here_channel)
        .execute(&here)
        .await
        .expect("notify");
    let first = tokio::time::timeout(Duration::from_secs(30), here_listener.recv())
        .await
        .expect("the marker arrives")
        .expect("notice");
    assert_eq!(
        first.payload(),
        "marker",
        "only this schema's notices arrive here"
    );
}

/// A claim on one replica wakes another's dispatcher at once, not at its next poll. The
/// notice goes out after the claim commits: sent inside the claim's transaction,
/// PostgreSQL ran every notifying commit one at a time (BENCHMARKS.md, session 14).
#[tokio::test]
async fn a_claim_on_one_replica_wakes_the_other_replicas_dispatcher() {
    use webhook_inbox::store::{Claim, Claims as _, JobQueue as _};
    let Some(server) = test_postgres_url("replicas: work notice") else {
        return;
    };
    let url = fresh_postgres_schema(&server).await;
    let claimant = crate::helpers::postgres_store_at(&url).await;
    let other = crate::helpers::postgres_store_at(&url).await;
    let signal = other.work_signal().expect("PostgreSQL announces work");
    // The listener wakes the dispatcher once it listens: after that, only a notice does.
    tokio::time::timeout(Duration::from_secs(30), signal.notified())
        .await
        .expect("the other replica listens");

    let new = queued_delivery("msg_notice");
    let woken = signal.notified();
    assert!(matches!(
        claimant.claim(new).await.expect("claim"),
        Claim::New
    ));
    tokio::time::timeout(Duration::from_secs(10), woken)
        .await
        .expect("the other replica is told of the new work");
}

/// The store's connections plan a prepared statement for the table as it is when it runs,
/// not from a generic plan PostgreSQL cached while the table was small (the run-start batch
/// went on reading a grown `inbox_jobs` whole: BENCHMARKS.md, session 27). A join of
/// `unnest` over keys, as the store's batches are, is run six times on a ten-row table
/// (where a sequential scan is the cheaper plan, and PostgreSQL's default keeps it),
/// then the table grows to 50 000 rows without an ANALYZE (which would drop cached plans):
/// the next execution must look the keys up by index.
#[tokio::test]
async fn the_store_s_connections_plan_statements_for_the_table_as_it_is_now() {
    use webhook_inbox::config::Durability;
    use webhook_inbox::store::postgres::PgStore;
    let Some(server) = test_postgres_url("replicas: plans follow the table") else {
        return;
    };
    let url = fresh_postgres_schema(&server).await;
    let options = PgStore::options(&url, Durability::Fsync).expect("options");
    let mut db = sqlx::PgConnection::connect_with(&options)
        .await
        .expect("connect");
    for statement in [
        "CREATE TABLE t (k text PRIMARY KEY, v bigint NOT NULL)",
        "INSERT INTO t SELECT 'k' || n, n FROM generate_series(1, 10) AS n",
        "PREPARE lookup(text[]) AS \
         SELECT t.v FROM t JOIN unnest($1::text[]) AS r(k) ON t.k = r.k",
    ] {
        sqlx::query(statement)
            .execute(&mut db)
            .await
            .expect(statement);
    }
    // Batches of 64 keys: costed per execution, dearer than the generic plan's guess of
    // ten rows, which PostgreSQL's default then keeps.
    let keys: Vec<String> = (1..=64).map(|n| format!("'k{n}'")).collect();
    let batch = format!("EXECUTE lookup(ARRAY[{}])", keys.join(", "));
    for _ in 0..6 {
        sqlx::query(&batch).execute(&mut db).await.expect("execute");
    }
    sqlx::query("INSERT INTO t SELECT 'k' || n, n FROM generate_series(11, 50000) AS n")
        .execute(&mut db)
        .await
        .expect("grow");
    let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE lookup(ARRAY['k1', 'k2'])")
        .fetch_all(&mut db)
        .await
        .expect("explain");
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index") && !plan.contains("Seq Scan on t"),
        "a plan from when the table held 10 rows:\n{plan}"
    );
}
