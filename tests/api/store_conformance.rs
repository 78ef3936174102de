//! The store contract, through the store's roles only: one suite that every backend runs,
//! one test per (backend, case) (`conformance_cases!`), each on a fresh, empty store; then
//! the cases only one backend has, and property tests of PostgreSQL's statements against
//! `store::transitions`.

use std::sync::Arc;
use std::time::SystemTime;

use sqlx::Connection as _;

use bytes::Bytes;
use webhook_inbox::config::{Config, Durability};
use webhook_inbox::store::{
    AttemptOutcome, Begin, Binding, CallJournal, CallRecord, Claim, Claims, DeliveryKey,
    DeliveryStore, JobQueue, JobStatus, Lease, Maintenance, NewDelivery, StoredResponse,
    TAKE_OVER_GRACE_MS, TakeOver,
};
use webhook_inbox::verify::Source;

type Store = Arc<dyn DeliveryStore>;

const NOW: u64 = 2_000_000_000_000;
const LEASE: u64 = NOW + 30_000;

/// A fresh sled store, and the temp dir that keeps it.
fn sled_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::TempDir::new().expect("dir");
    let store =
        webhook_inbox::store::SledStore::open(&dir.path().join("data"), Durability::Fsync, 8 << 20)
            .expect("store");
    (Arc::new(store), dir)
}

/// A fresh PostgreSQL store (a schema of its own), where a test database is configured.
async fn postgres_store() -> Option<Store> {
    let url = crate::helpers::test_postgres_url("store conformance on PostgreSQL")?;
    Some(crate::helpers::postgres_store(&url).await)
}

fn source() -> Source {
    let config = Config::parse(
        "[sources.credicorp]\nsecrets = [\"whsec_Y29uZm9ybWFuY2U=\"]\n",
        "conformance.toml",
    )
    .expect("config");
    Source::named(&config, "credicorp").expect("source")
}

fn new(id: &str, body: &str, handlers: &[&str], body_dedup: bool) -> NewDelivery {
    let d =
        webhook_inbox::testing::authenticated(&source(), id, body.as_bytes(), SystemTime::now())
            .expect("signed");
    NewDelivery::new(
        d,
        NOW - 1000,
        handlers.iter().map(|h| h.to_string()).collect(),
        body_dedup,
    )
    .acknowledged(StoredResponse {
        status: 202,
        body: format!("{{\"delivery_id\":\"{id}\"}}"),
    })
}

/// Every queue entry due at `now_ms`.
async fn due_now(store: &Store, now_ms: u64) -> Vec<webhook_inbox::store::QueuedJob> {
    store
        .due_jobs(now_ms, 1000, &Default::default())
        .await
        .expect("queue")
}

fn key(id: &str) -> DeliveryKey {
    DeliveryKey::new("credicorp", id)
}

async fn claim_new_then_existing(store: Store) {
    let first = new("c1", r#"{"type":"a"}"#, &["h"], false);
    assert!(matches!(
        store.claim(first).await.expect("claim"),
        Claim::New
    ));
    match store
        .claim(new("c1", r#"{"type":"a"}"#, &["h"], false))
        .await
    {
        Ok(Claim::Existing(r)) => {
            assert_eq!(r.id, "c1");
            assert_eq!(r.response.expect("answer").body, r#"{"delivery_id":"c1"}"#);
        }
        other => panic!("{other:?}"),
    }
    // Another body under the same id: the stored record, whose fingerprint differs.
    match store
        .claim(new("c1", r#"{"type":"b"}"#, &["h"], false))
        .await
    {
        Ok(Claim::Existing(r)) => assert_ne!(
            r.fingerprint,
            webhook_inbox::domain::fingerprint(br#"{"type":"b"}"#)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.body(&key("c1")).await.expect("body"),
        Some(Bytes::from_static(br#"{"type":"a"}"#))
    );
}

async fn concurrent_claims_of_one_id_have_one_winner(store: Store) {
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .claim(new("c2", r#"{"type":"a"}"#, &["h"], false))
                    .await
                    .expect("claim")
            })
        })
        .collect();
    let mut news = 0;
    for t in tasks {
        news += usize::from(matches!(t.await.expect("task"), Claim::New));
    }
    assert_eq!(news, 1);
    assert_eq!(due_now(&store, u64::MAX).await.len(), 1);
}

async fn one_body_under_many_ids_is_one_delivery_and_aliases(store: Store) {
    let tasks: Vec<_> = (0..12)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let id = format!("b{n}");
                let claim = store
                    .claim(new(&id, r#"{"same":"body"}"#, &["h"], true))
                    .await
                    .expect("claim");
                (id, claim)
            })
        })
        .collect();
    let mut first = None;
    let mut aliases = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            (id, Claim::New) => {
                assert!(first.replace(id).is_none(), "two new claims for one body");
            }
            (id, Claim::BodyDuplicate(of)) => aliases.push((id, of.id)),
            other => panic!("{other:?}"),
        }
    }
    let first = first.expect("one new claim");
    assert_eq!(aliases.len(), 11);
    for (alias, of) in &aliases {
        assert_eq!(of, &first);
        let record = store
            .record(&key(alias))
            .await
            .expect("read")
            .expect("stored");
        assert_eq!(record.alias_of.as_deref(), Some(first.as_str()));
        assert!(record.handlers.is_empty(), "an alias runs nothing");
        // Its redelivery is answered as the first.
        match store
            .claim(new(alias, r#"{"same":"body"}"#, &["h"], true))
            .await
            .expect("claim")
        {
            Claim::Existing(r) => assert_eq!(r.id, first),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(due_now(&store, u64::MAX).await.len(), 1);
}

async fn a_run_has_one_runner_and_a_success_is_final(store: Store) {
    store
        .claim(new("r1", "{}", &["h"], false))
        .await
        .expect("claim");
    let due = due_now(&store, u64::MAX).await;
    let entry = due.first().expect("due").clone();
    let Begin::Started(attempt) = store
        .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
        .await
        .expect("begin")
    else {
        panic!("runnable")
    };
    assert_eq!(attempt.attempt, 1);
    assert_eq!(attempt.body, Bytes::from_static(b"{}"));
    // A second runner (same entry, or inline) is refused while the lease lives.
    assert!(matches!(
        store.begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE).await.expect("begin"),
        Begin::Busy { until_ms } if until_ms == LEASE + TAKE_OVER_GRACE_MS
    ));
    assert!(matches!(
        store
            .begin_attempt(&entry.job, None, NOW, LEASE)
            .await
            .expect("begin"),
        Begin::Busy { .. }
    ));
    assert!(
        store
            .renew_job_lease(&entry.job, 1, LEASE + 1000)
            .await
            .expect("renew")
    );
    assert!(
        !store
            .renew_job_lease(&entry.job, 2, LEASE + 1000)
            .await
            .expect("renew")
    );
    store
        .finish_attempt(&entry.job, 1, AttemptOutcome::Succeeded, NOW)
        .await
        .expect("finish");
    assert!(matches!(
        store
            .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
            .await
            .expect("begin"),
        Begin::Skipped
    ));
    assert!(due_now(&store, u64::MAX).await.is_empty());
    // A late failure of a superseded attempt does not undo the success.
    store
        .finish_attempt(
            &entry.job,
            1,
            AttemptOutcome::RetryAt {
                due_ms: NOW,
                error: "late".into(),
            },
            NOW,
        )
        .await
        .expect("finish");
    assert_eq!(
        store
            .job(&entry.job)
            .await
            .expect("job")
            .expect("state")
            .status,
        JobStatus::Succeeded
    );
}

/// Starts and successes asked for at once (a dispatcher hands out many runs together; the
/// PostgreSQL store writes them many to a statement): every pair starts once, however many
/// ask for it, and every success is recorded.
async fn many_runs_started_and_finished_at_once_each_start_once(store: Store) {
    for i in 0..24 {
        store
            .claim(new(&format!("m{i}"), "{}", &["h"], false))
            .await
            .expect("claim");
    }
    let due = due_now(&store, u64::MAX).await;
    assert_eq!(due.len(), 24);
    // Each pair asked for three times at once: by its entry twice, and inline once.
    let starts = due.iter().flat_map(|entry| {
        let store = store.clone();
        [Some(entry.due_ms), Some(entry.due_ms), None].map(move |queued| {
            let (store, job) = (store.clone(), entry.job.clone());
            async move {
                let begin = store.begin_attempt(&job, queued, NOW, LEASE).await;
                (job, begin.expect("begin"))
            }
        })
    });
    let begun = futures_util::future::join_all(starts).await;
    for entry in &due {
        let of_pair: Vec<&Begin> = begun
            .iter()
            .filter(|(job, _)| *job == entry.job)
            .map(|(_, begin)| begin)
            .collect();
        let started = of_pair
            .iter()
            .filter(|b| matches!(b, Begin::Started(a) if a.attempt == 1))
            .count();
        assert_eq!(started, 1, "{}: {of_pair:?}", entry.job);
        assert!(
            of_pair
                .iter()
                .all(|b| matches!(b, Begin::Started(_) | Begin::Busy { .. })),
            "{}: {of_pair:?}",
            entry.job
        );
    }
    let finishes = due.iter().map(|entry| {
        let (store, job) = (store.clone(), entry.job.clone());
        async move {
            store
                .finish_attempt(&job, 1, AttemptOutcome::Succeeded, NOW)
                .await
        }
    });
    for finished in futures_util::future::join_all(finishes).await {
        finished.expect("finish");
    }
    for entry in &due {
        let state = store.job(&entry.job).await.expect("job").expect("state");
        assert_eq!(state.status, JobStatus::Succeeded, "{}", entry.job);
        assert_eq!(state.attempts, 1, "{}", entry.job);
    }
    assert!(due_now(&store, u64::MAX).await.is_empty());
}

/// A queue read passes over the pairs it is told to (those this process is running) without
/// their taking the places of its batch: asked for four past four it holds, it returns four
/// others. (On PostgreSQL the four stay reserved by this replica until their starts commit;
/// a read that filtered them out after the statement returned none.)
async fn a_queue_read_fills_its_batch_past_the_pairs_it_passes_over(store: Store) {
    for i in 0..10 {
        store
            .claim(new(&format!("s{i}"), "{}", &["h"], false))
            .await
            .expect("claim");
    }
    let held = store
        .due_jobs(NOW, 4, &Default::default())
        .await
        .expect("queue");
    assert_eq!(held.len(), 4);
    let skip: webhook_inbox::store::SkipSet = held.iter().map(|q| q.job.clone()).collect();
    let next = store.due_jobs(NOW, 4, &skip).await.expect("queue");
    assert_eq!(next.len(), 4, "{next:?}");
    assert!(next.iter().all(|q| !skip.contains(&q.job)), "{next:?}");
    let of_handler = store.due_jobs_of("h", NOW, 4, &skip).await.expect("queue");
    assert_eq!(of_handler.len(), 4, "{of_handler:?}");
    assert!(of_handler.iter().all(|q| !skip.contains(&q.job)));
}

async fn a_failure_moves_the_entry_and_a_stale_entry_runs_nothing(store: Store) {
    store
        .claim(new("r2", "{}", &["h"], false))
        .await
        .expect("claim");
    let entry = due_now(&store, u64::MAX).await[0].clone();
    let Begin::Started(a) = store
        .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
        .await
        .expect("begin")
    else {
        panic!("runnable")
    };
    store
        .finish_attempt(
            &entry.job,
            a.attempt,
            AttemptOutcome::RetryAt {
                due_ms: NOW + 5000,
                error: "down".into(),
            },
            NOW,
        )
        .await
        .expect("finish");
    let due = due_now(&store, u64::MAX).await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].due_ms, NOW + 5000);
    assert!(due_now(&store, NOW).await.is_empty());
    // The old entry is gone: a runner holding it starts nothing.
    assert!(matches!(
        store
            .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
            .await
            .expect("begin"),
        Begin::Skipped
    ));
    let Begin::Started(b) = store
        .begin_attempt(&entry.job, Some(NOW + 5000), NOW + 5000, LEASE + 5000)
        .await
        .expect("begin")
    else {
        panic!("runnable")
    };
    assert_eq!(b.attempt, 2);
}

async fn dead_letters_retry_with_a_fresh_budget_and_running_pairs_are_left_alone(store: Store) {
    store
        .claim(new("r3", "{}", &["dies", "runs"], false))
        .await
        .expect("claim");
    let due = due_now(&store, u64::MAX).await;
    for entry in &due {
        let Begin::Started(a) = store
            .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
            .await
            .expect("begin")
        else {
            panic!("runnable")
        };
        if entry.job.handler == "dies" {
            store
                .finish_attempt(
                    &entry.job,
                    a.attempt,
                    AttemptOutcome::Dead { error: "no".into() },
                    NOW,
                )
                .await
                .expect("finish");
        }
    }
    assert_eq!(store.dead_letters().await.expect("count"), 1);
    let requeued = store.retry(&key("r3"), NOW).await.expect("retry");
    assert_eq!(
        requeued,
        vec!["dies".to_owned()],
        "the running pair is left alone"
    );
    assert_eq!(store.dead_letters().await.expect("count"), 0);
    let dies = key("r3").job("dies");
    let Begin::Started(a) = store
        .begin_attempt(&dies, Some(NOW), NOW, LEASE)
        .await
        .expect("begin")
    else {
        panic!("runnable")
    };
    assert_eq!((a.attempt, a.attempts_in_round), (2, 1));
}

async fn retention_keeps_what_is_due_and_forgets_what_is_final(store: Store) {
    store
        .claim(new("e1", r#"{"n":1}"#, &[], false))
        .await
        .expect("claim");
    store
        .claim(new("e2", r#"{"n":2}"#, &["h"], false))
        .await
        .expect("claim");
    let expired = store.expire(NOW, NOW, 100).await.expect("expire");
    assert_eq!((expired.removed, expired.kept), (1, 1));
    assert!(store.record(&key("e1")).await.expect("read").is_none());
    assert!(store.record(&key("e2")).await.expect("read").is_some());
    assert!(matches!(
        store
            .claim(new("e1", r#"{"n":1}"#, &[], false))
            .await
            .expect("claim"),
        Claim::New
    ));
}

fn call_record(status: u16, fingerprint: &str) -> CallRecord {
    CallRecord {
        request: "POST http://partner.test/links".into(),
        fingerprint: fingerprint.into(),
        status,
        content_type: Some("application/json".into()),
        location: None,
        body: br#"{"id":"res_1"}"#.to_vec(),
        body_truncated: false,
        attempts: 1,
        at_ms: NOW,
        replayed: 0,
    }
}

/// The call journal: first writer wins, a replay is counted, the steps list by handler
/// then step, and they go with their delivery when retention removes it.
async fn the_call_journal_keeps_the_first_answer_and_goes_with_its_delivery(store: Store) {
    store
        .claim(new("j1", r#"{"n":1}"#, &["g", "h"], false))
        .await
        .expect("claim");
    let job = key("j1").job("h");
    assert_eq!(store.journal_get(&job, "open").await.expect("get"), None);
    let first = call_record(201, "f1");
    assert_eq!(
        store.journal_put(&job, "open", &first).await.expect("put"),
        first
    );
    // A second writer (a run that lost its lease) gets the kept answer, not its own.
    assert_eq!(
        store
            .journal_put(&job, "open", &call_record(500, "f2"))
            .await
            .expect("put"),
        first
    );
    store
        .journal_replayed(&job, "open")
        .await
        .expect("replayed");
    store
        .journal_replayed(&job, "none")
        .await
        .expect("nothing kept: nothing done");
    let kept = store
        .journal_get(&job, "open")
        .await
        .expect("get")
        .expect("kept");
    assert_eq!((kept.status, kept.replayed), (201, 1));
    store
        .journal_put(&key("j1").job("g"), "z", &call_record(200, "g1"))
        .await
        .expect("put");
    store
        .journal_put(&job, "close", &call_record(204, "f3"))
        .await
        .expect("put");
    let steps: Vec<(String, String)> = store
        .journal_of(&key("j1"))
        .await
        .expect("list")
        .into_iter()
        .map(|e| (e.handler, e.step))
        .collect();
    assert_eq!(
        steps,
        [("g", "z"), ("h", "close"), ("h", "open")].map(|(h, s)| (h.to_owned(), s.to_owned()))
    );
    // Another delivery whose id starts the same way shares nothing.
    assert!(store.journal_of(&key("j")).await.expect("list").is_empty());
    // Both pairs final, so retention may take the delivery.
    for _ in 0..2 {
        run_once(&store, "j1", AttemptOutcome::Succeeded).await;
    }
    assert_eq!(
        store.expire(NOW, NOW, 100).await.expect("expire").removed,
        1
    );
    assert!(store.journal_of(&key("j1")).await.expect("list").is_empty());
    assert_eq!(store.journal_get(&job, "open").await.expect("get"), None);
}

async fn a_forgotten_body_is_still_a_replay_by_its_fingerprint(store: Store) {
    store
        .claim(new("f1", r#"{"fp":1}"#, &[], true))
        .await
        .expect("claim");
    assert_eq!(
        store.expire(NOW, NOW, 100).await.expect("expire").removed,
        1
    );
    match store
        .claim(new("f1", r#"{"fp":1}"#, &[], true))
        .await
        .expect("claim")
    {
        Claim::Existing(r) => {
            assert_eq!(r.response.expect("answer").body, r#"{"delivery_id":"f1"}"#)
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.claim(new("f2", r#"{"fp":1}"#, &[], true)).await.expect("claim"),
        Claim::BodyDuplicate(first) if first.id == "f1"
    ));
    // Past the fingerprint retention too, the body is new again.
    store.expire_fingerprints(NOW, 100).await.expect("expire");
    store.expire(NOW, NOW, 100).await.expect("expire");
    assert!(matches!(
        store
            .claim(new("f3", r#"{"fp":1}"#, &[], true))
            .await
            .expect("claim"),
        Claim::New
    ));
}

async fn a_processed_lease_is_taken_over_only_past_its_grace(store: Store) {
    let d = webhook_inbox::testing::authenticated(&source(), "p1", b"{}", SystemTime::now())
        .expect("signed");
    let first = Lease {
        owner: 1,
        until_ms: NOW + 1000,
    };
    let pending = NewDelivery::new(d, NOW, vec!["h".into()], false).leased(first);
    assert!(matches!(
        store.claim(pending).await.expect("claim"),
        Claim::New
    ));
    let second = |until_ms| Lease { owner: 2, until_ms };
    assert!(matches!(
        store.take_over(&key("p1"), NOW, second(NOW + 2000)).await.expect("take over"),
        TakeOver::Held { until_ms } if until_ms == NOW + 1000 + TAKE_OVER_GRACE_MS
    ));
    assert!(
        store
            .renew_lease(
                &key("p1"),
                Lease {
                    owner: 1,
                    until_ms: NOW + 5000
                }
            )
            .await
            .expect("renew")
    );
    // Lapsed, but within the grace: its holder may still be stopping.
    assert!(matches!(
        store
            .take_over(
                &key("p1"),
                NOW + 5000 + TAKE_OVER_GRACE_MS - 1,
                second(NOW + 99_000)
            )
            .await
            .expect("take over"),
        TakeOver::Held { .. }
    ));
    let taken_at = NOW + 5000 + TAKE_OVER_GRACE_MS;
    assert!(matches!(
        store
            .take_over(&key("p1"), taken_at, second(taken_at + 9000))
            .await
            .expect("take over"),
        TakeOver::Acquired(r) if r.lease_owner == Some(2)
    ));
    let answer = StoredResponse {
        status: 200,
        body: "{}".into(),
    };
    store
        .release(&key("p1"), 2, Some(answer.clone()))
        .await
        .expect("release");
    assert!(matches!(
        store.take_over(&key("p1"), NOW + 99_000, second(NOW + 99_999)).await.expect("take over"),
        TakeOver::Final(r) if r.response == Some(answer)
    ));
    assert!(
        !store
            .renew_lease(&key("p1"), second(NOW + 99_999))
            .await
            .expect("renew")
    );
}

async fn renew_or_release_by_a_non_owner_changes_nothing(store: Store) {
    // The processed lease: the old holder, taken over, can neither extend nor clear it.
    let d = webhook_inbox::testing::authenticated(&source(), "p2", b"{}", SystemTime::now())
        .expect("signed");
    let old = Lease {
        owner: 1,
        until_ms: NOW,
    };
    let pending = NewDelivery::new(d, NOW - 10_000, vec!["h".into()], false).leased(old);
    store.claim(pending).await.expect("claim");
    let new = Lease {
        owner: 2,
        until_ms: NOW + 60_000,
    };
    assert!(matches!(
        store
            .take_over(&key("p2"), NOW + TAKE_OVER_GRACE_MS, new)
            .await
            .expect("take over"),
        TakeOver::Acquired(_)
    ));
    let before = store
        .record(&key("p2"))
        .await
        .expect("read")
        .expect("stored");
    assert!(
        !store
            .renew_lease(
                &key("p2"),
                Lease {
                    owner: 1,
                    until_ms: NOW + 999_000
                }
            )
            .await
            .expect("renew")
    );
    let answer = StoredResponse {
        status: 200,
        body: "{}".into(),
    };
    assert!(
        !store
            .release(&key("p2"), 1, Some(answer))
            .await
            .expect("release")
    );
    assert!(!store.release(&key("p2"), 1, None).await.expect("release"));
    assert_eq!(
        store
            .record(&key("p2"))
            .await
            .expect("read")
            .expect("stored"),
        before,
        "a non-owner's renew and release change nothing"
    );
    assert!(matches!(
        store
            .take_over(&key("p2"), NOW + 30_000, old)
            .await
            .expect("take over"),
        TakeOver::Held { .. }
    ));

    // The run lease: a runner whose attempt was taken over renews nothing.
    store
        .claim(new_delivery_for_run("r2"))
        .await
        .expect("claim");
    let entry = due_now(&store, NOW).await[0].clone();
    let Begin::Started(a) = store
        .begin_attempt(&entry.job, Some(entry.due_ms), NOW, NOW + 1000)
        .await
        .expect("begin")
    else {
        panic!("runnable")
    };
    let later = NOW + 1000 + TAKE_OVER_GRACE_MS;
    let Begin::Started(b) = store
        .begin_attempt(&entry.job, Some(entry.due_ms), later, later + 30_000)
        .await
        .expect("begin")
    else {
        panic!("taken over past the grace")
    };
    assert_eq!((a.attempt, b.attempt), (1, 2));
    let state = store.job(&entry.job).await.expect("read");
    assert!(
        !store
            .renew_job_lease(&entry.job, a.attempt, later + 999_000)
            .await
            .expect("renew"),
        "the superseded attempt cannot renew"
    );
    assert_eq!(
        store.job(&entry.job).await.expect("read"),
        state,
        "nothing changed"
    );
}

fn new_delivery_for_run(id: &str) -> NewDelivery {
    new(id, "{}", &["h"], false)
}

async fn a_run_whose_lease_lapsed_is_started_again_with_the_next_attempt(store: Store) {
    store
        .claim(new("l1", "{}", &["h"], false))
        .await
        .expect("claim");
    let entry = due_now(&store, NOW).await[0].clone();
    let Begin::Started(a) = store
        .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
        .await
        .expect("begin")
    else {
        panic!("runnable")
    };
    assert_eq!(a.attempt, 1);
    // Its runner died: nothing renews the lease, nothing finishes the run.
    assert!(
        due_now(&store, LEASE - 1).await.is_empty()
            || matches!(
                store
                    .begin_attempt(&entry.job, Some(entry.due_ms), LEASE - 1, LEASE + 30_000)
                    .await,
                Ok(Begin::Busy { .. })
            ),
        "not before the lease lapses"
    );
    // Lapsed, within the grace: its runner may still be stopping.
    assert!(
        due_now(&store, LEASE + 1).await.is_empty()
            || matches!(
                store
                    .begin_attempt(&entry.job, Some(entry.due_ms), LEASE + 1, LEASE + 30_000)
                    .await,
                Ok(Begin::Busy { until_ms }) if until_ms == LEASE + TAKE_OVER_GRACE_MS
            ),
        "not within the grace past the lease"
    );
    let past = LEASE + TAKE_OVER_GRACE_MS;
    let due = due_now(&store, past).await;
    assert_eq!(due.len(), 1, "due again once the lease is past its grace");
    let Begin::Started(b) = store
        .begin_attempt(&due[0].job, Some(due[0].due_ms), past, past + 30_000)
        .await
        .expect("begin")
    else {
        panic!("taken over")
    };
    assert_eq!(
        b.attempt, 2,
        "attempt + 1, same pair (same idempotency key)"
    );
}

/// A run taken over past its grace, whose successor dies, can still report success: the
/// work was done, so the pair is succeeded — and out of the dead letters (their count and
/// their listing), not just out of the dead status.
async fn a_superseded_success_after_a_death_takes_the_pair_out_of_the_dead_letters(store: Store) {
    store
        .claim(new("sd", "{}", &["h"], false))
        .await
        .expect("claim");
    let entry = due_now(&store, NOW).await[0].clone();
    let Begin::Started(first) = store
        .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
        .await
        .expect("begin")
    else {
        panic!("runnable")
    };
    let past = LEASE + TAKE_OVER_GRACE_MS;
    let due = due_now(&store, past).await;
    let Begin::Started(second) = store
        .begin_attempt(&due[0].job, Some(due[0].due_ms), past, past + 30_000)
        .await
        .expect("begin")
    else {
        panic!("taken over")
    };
    store
        .finish_attempt(
            &entry.job,
            second.attempt,
            AttemptOutcome::Dead { error: "no".into() },
            past,
        )
        .await
        .expect("finish");
    assert_eq!(store.dead_letters().await.expect("count"), 1);
    store
        .finish_attempt(
            &entry.job,
            first.attempt,
            AttemptOutcome::Succeeded,
            past + 1,
        )
        .await
        .expect("finish");
    let state = store.job(&entry.job).await.expect("read").expect("state");
    assert_eq!(state.status, JobStatus::Succeeded);
    assert_eq!(
        store.dead_letters().await.expect("count"),
        0,
        "a succeeded pair is not a dead letter"
    );
    let dead = webhook_inbox::store::RetryFilter {
        source: None,
        handler: None,
        status: JobStatus::Dead,
        since_ms: None,
        until_ms: None,
    };
    assert_eq!(
        store.retry_all(&dead, past + 2).await.expect("retry"),
        0,
        "nothing dead is left to retry"
    );
    assert_eq!(
        store.job(&entry.job).await.expect("read").map(|s| s.status),
        Some(JobStatus::Succeeded)
    );
}

async fn no_run_of_a_paused_handler_starts(store: Store) {
    store
        .claim(new("pz", "{}", &["h"], false))
        .await
        .expect("claim");
    let entry = due_now(&store, NOW).await[0].clone();
    store.set_paused("h", true, NOW).await.expect("pause");
    assert!(store.paused_handlers().await.expect("read").contains("h"));
    // A dispatcher that read the queue before the pause still starts nothing.
    assert!(matches!(
        store
            .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
            .await
            .expect("begin"),
        Begin::Busy { .. }
    ));
    assert_eq!(
        store.queue_depths().await.expect("depths"),
        vec![("h".to_owned(), 1)],
        "still queued"
    );
    store.set_paused("h", false, NOW).await.expect("resume");
    assert!(store.paused_handlers().await.expect("read").is_empty());
    let entry = due_now(&store, NOW).await[0].clone();
    assert!(matches!(
        store
            .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
            .await
            .expect("begin"),
        Begin::Started(_)
    ));
}

/// A delivery whose handler `h` runs in the line of `value`, received at `received_at`.
fn ordered(id: &str, value: &str, received_at: u64) -> NewDelivery {
    let body = format!(r#"{{"type":"a","data":{{"key":"{value}","id":"{id}"}}}}"#);
    let d =
        webhook_inbox::testing::authenticated(&source(), id, body.as_bytes(), SystemTime::now())
            .expect("signed");
    NewDelivery::new(d, received_at, vec!["h".into()], false)
        .acknowledged(StoredResponse {
            status: 202,
            body: format!("{{\"delivery_id\":\"{id}\"}}"),
        })
        .ordered([("h".to_owned(), value.to_owned())].into())
}

/// The ids of the pairs due at `now_ms`, sorted.
async fn due_ids(store: &Store, now_ms: u64) -> Vec<String> {
    let mut ids: Vec<String> = due_now(store, now_ms)
        .await
        .into_iter()
        .map(|q| q.job.delivery.id)
        .collect();
    ids.sort();
    ids
}

/// Runs the due pair `id` with `outcome`.
async fn run_once(store: &Store, id: &str, outcome: AttemptOutcome) {
    let entry = due_now(store, u64::MAX / 2)
        .await
        .into_iter()
        .find(|q| q.job.delivery.id == id)
        .unwrap_or_else(|| panic!("{id} is queued"));
    let Begin::Started(a) = store
        .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
        .await
        .expect("begin")
    else {
        panic!("{id} starts")
    };
    store
        .finish_attempt(&entry.job, a.attempt, outcome, NOW)
        .await
        .expect("finish");
}

async fn an_ordered_line_runs_one_pair_at_a_time_in_received_order(store: Store) {
    for (id, value, at) in [
        ("o1", "A", NOW - 3000),
        ("o2", "A", NOW - 2000),
        ("p1", "B", NOW - 2500),
        ("o3", "A", NOW - 1000),
    ] {
        assert!(matches!(
            store.claim(ordered(id, value, at)).await.expect("claim"),
            Claim::New
        ));
    }
    store
        .claim(new("u1", "{}", &["h"], false))
        .await
        .expect("claim");
    // Only the first of each line (and the unordered one) is queued: the others wait
    // without a queue entry.
    assert_eq!(due_ids(&store, NOW).await, ["o1", "p1", "u1"]);
    let stats = store.handler_stats(NOW).await.expect("stats")["h"].clone();
    assert_eq!((stats.queued, stats.waiting), (3, 2), "{stats:?}");
    // A failure keeps the line: o2 waits for o1's retry.
    let retry_at = NOW + 60_000;
    run_once(
        &store,
        "o1",
        AttemptOutcome::RetryAt {
            due_ms: retry_at,
            error: "busy".into(),
        },
    )
    .await;
    assert_eq!(due_ids(&store, u64::MAX / 2).await, ["o1", "p1", "u1"]);
    // An operator retry of a pair waiting in line does not let it overtake.
    assert!(
        store
            .retry(&key("o2"), NOW)
            .await
            .expect("retry")
            .is_empty()
    );
    assert_eq!(due_ids(&store, u64::MAX / 2).await, ["o1", "p1", "u1"]);
    // Retention keeps what waits in line.
    assert_eq!(
        store
            .expire(NOW + 10, NOW + 10, 100)
            .await
            .expect("expire")
            .removed,
        0,
        "everything here still runs"
    );
    // Dead: the next in line goes.
    run_once(
        &store,
        "o1",
        AttemptOutcome::Dead {
            error: "gave up".into(),
        },
    )
    .await;
    assert_eq!(due_ids(&store, NOW).await, ["o2", "p1", "u1"]);
    // The dead pair, retried, goes back in line behind the active o2.
    assert_eq!(store.retry(&key("o1"), NOW).await.expect("retry"), ["h"]);
    assert_eq!(due_ids(&store, u64::MAX / 2).await, ["o2", "p1", "u1"]);
    run_once(&store, "o2", AttemptOutcome::Succeeded).await;
    // o1 was received first: it goes before o3.
    assert_eq!(due_ids(&store, u64::MAX / 2).await, ["o1", "p1", "u1"]);
    run_once(&store, "o1", AttemptOutcome::Succeeded).await;
    assert_eq!(due_ids(&store, u64::MAX / 2).await, ["o3", "p1", "u1"]);
    let a = store
        .job(&key("o1").job("h"))
        .await
        .expect("job")
        .expect("state");
    assert_eq!((a.status, a.attempts), (JobStatus::Succeeded, 3));
    run_once(&store, "o3", AttemptOutcome::Succeeded).await;
    // An empty line: the next delivery of that value runs at once.
    store.claim(ordered("o4", "A", NOW)).await.expect("claim");
    assert_eq!(due_ids(&store, u64::MAX / 2).await, ["o4", "p1", "u1"]);
}

async fn a_bulk_retry_of_dead_ordered_pairs_keeps_one_per_line_running(store: Store) {
    for (id, at) in [("d1", NOW - 3000), ("d2", NOW - 2000), ("d3", NOW - 1000)] {
        store.claim(ordered(id, "K", at)).await.expect("claim");
    }
    for id in ["d1", "d2", "d3"] {
        run_once(
            &store,
            id,
            AttemptOutcome::Dead {
                error: "down".into(),
            },
        )
        .await;
    }
    assert!(due_ids(&store, u64::MAX / 2).await.is_empty());
    let filter = webhook_inbox::store::RetryFilter {
        source: None,
        handler: Some("h".into()),
        status: JobStatus::Dead,
        since_ms: None,
        until_ms: None,
    };
    assert_eq!(store.retry_all(&filter, NOW).await.expect("bulk"), 3);
    // All three back in line, one due at a time, in received order.
    for id in ["d1", "d2", "d3"] {
        assert_eq!(due_ids(&store, u64::MAX / 2).await, [id]);
        run_once(&store, id, AttemptOutcome::Succeeded).await;
    }
    assert!(due_ids(&store, u64::MAX / 2).await.is_empty());
    assert_eq!(store.dead_letters().await.expect("dead"), 0);
}

/// One queue read gives the due entries (up to the limit, past the skipped ones) and the due
/// time of the first entry after them, due or not: what the dispatcher looks again by.
/// A bulk retry over more dead letters than one batch looks at (sled works in batches of
/// [`webhook_inbox::store::RETRY_BATCH`]) requeues every pair its filter selects, once.
async fn a_bulk_retry_larger_than_a_batch_requeues_every_selected_pair_once(store: Store) {
    let deliveries = webhook_inbox::store::RETRY_BATCH / 2 + 40;
    for i in 0..deliveries {
        let id = format!("b{i:04}");
        store
            .claim(new(&id, &format!("{{\"n\":{i}}}"), &["g", "h"], false))
            .await
            .expect("claim");
    }
    loop {
        let due = due_now(&store, u64::MAX / 2).await;
        if due.is_empty() {
            break;
        }
        for entry in due {
            let Begin::Started(a) = store
                .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
                .await
                .expect("begin")
            else {
                panic!("starts")
            };
            store
                .finish_attempt(
                    &entry.job,
                    a.attempt,
                    AttemptOutcome::Dead {
                        error: "down".into(),
                    },
                    NOW,
                )
                .await
                .expect("finish");
        }
    }
    assert_eq!(store.dead_letters().await.expect("dead"), 2 * deliveries);
    let filter = webhook_inbox::store::RetryFilter {
        source: Some("credicorp".into()),
        handler: Some("h".into()),
        status: JobStatus::Dead,
        since_ms: None,
        until_ms: None,
    };
    assert_eq!(
        store.retry_all(&filter, NOW).await.expect("bulk"),
        deliveries
    );
    assert_eq!(
        store.dead_letters().await.expect("dead"),
        deliveries,
        "g's stay dead"
    );
    let due = due_now(&store, u64::MAX / 2).await;
    assert_eq!(due.len(), deliveries);
    assert!(due.iter().all(|q| q.job.handler == "h"));
    assert_eq!(
        store.retry_all(&filter, NOW).await.expect("bulk"),
        0,
        "nothing dead left"
    );
}

async fn a_queue_read_tells_when_the_next_entry_is_due(store: Store) {
    for id in ["q1", "q2", "q3"] {
        store
            .claim(new(id, &format!("{{\"n\":\"{id}\"}}"), &["h"], false))
            .await
            .expect("claim");
    }
    let none = webhook_inbox::store::SkipSet::default();
    let (due, next) = store
        .due_jobs_and_next_of("h", NOW, 2, &none, None)
        .await
        .expect("read");
    assert_eq!(due.len(), 2);
    assert_eq!(next, Some(NOW - 1000), "a third entry, due too");
    let first = due[0].job.clone();
    let skip: webhook_inbox::store::SkipSet = [first.clone()].into_iter().collect();
    let (due, next) = store
        .due_jobs_and_next_of("h", NOW, 5, &skip, None)
        .await
        .expect("read");
    assert_eq!(due.len(), 2);
    assert!(
        due.iter().all(|q| q.job != first),
        "the skipped entry is passed over"
    );
    assert_eq!(next, None);
    // One entry moved to later: read past the due ones, its time comes back.
    run_once(
        &store,
        &first.delivery.id,
        AttemptOutcome::RetryAt {
            due_ms: NOW + 5000,
            error: "down".into(),
        },
    )
    .await;
    let (due, next) = store
        .due_jobs_and_next_of("h", NOW, 5, &none, None)
        .await
        .expect("read");
    assert_eq!(due.len(), 2);
    assert_eq!(next, Some(NOW + 5000));
    let (due, next) = store
        .due_jobs_and_next_of("other", NOW, 5, &none, None)
        .await
        .expect("read");
    assert!(due.is_empty() && next.is_none());
}

/// Backfill: a stored delivery gets a pending pair with the new handler, due at its
/// received_at; a second bind is `Already` and makes no second entry; an existing pair
/// (bound at the claim, or run) is never reset; a delivery that is gone is `Skipped`; the
/// window read walks the deliveries oldest first, batch after batch.
async fn a_backfill_binds_a_stored_delivery_once_and_never_resets_a_pair(store: Store) {
    for id in ["k1", "k2", "k3"] {
        store
            .claim(new(id, "{}", &["h"], false))
            .await
            .expect("claim");
    }
    let first = store
        .received_between(0, NOW, None, 2)
        .await
        .expect("window");
    assert_eq!(first.len(), 2);
    let rest = store
        .received_between(0, NOW, first.last(), 2)
        .await
        .expect("window");
    assert_eq!(rest.len(), 1);
    let mut seen: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|r| r.key.id.clone())
        .collect();
    seen.sort();
    assert_eq!(seen, ["k1", "k2", "k3"]);
    assert!(
        store
            .received_between(NOW - 999, NOW, None, 10)
            .await
            .expect("window")
            .is_empty(),
        "received before the window"
    );
    // k1's pair with h has run to success: binding h again changes nothing.
    let entry = due_now(&store, NOW)
        .await
        .into_iter()
        .find(|e| e.job.delivery.id == "k1")
        .expect("due");
    let Begin::Started(a) = store
        .begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
        .await
        .expect("begin")
    else {
        panic!("runnable")
    };
    store
        .finish_attempt(&entry.job, a.attempt, AttemptOutcome::Succeeded, NOW)
        .await
        .expect("finish");
    let bindings = store
        .bind_handler(
            "later",
            &[(key("k1"), None), (key("k2"), None), (key("gone"), None)],
        )
        .await
        .expect("bind");
    assert_eq!(bindings, [Binding::Bound, Binding::Bound, Binding::Skipped]);
    let again = store
        .bind_handler("later", &[(key("k1"), None), (key("k2"), None)])
        .await
        .expect("bind");
    assert_eq!(again, [Binding::Already, Binding::Already]);
    assert_eq!(
        store
            .bind_handler("h", &[(key("k1"), None)])
            .await
            .expect("bind"),
        [Binding::Already],
        "bound at the claim"
    );
    let record = store
        .record(&key("k2"))
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(record.handlers, ["h", "later"], "named once");
    let later: Vec<_> = due_now(&store, NOW)
        .await
        .into_iter()
        .filter(|e| e.job.handler == "later")
        .collect();
    assert_eq!(later.len(), 2, "one entry per bound pair: {later:?}");
    assert!(
        later.iter().all(|e| e.due_ms == NOW - 1000),
        "due at received_at"
    );
    assert_eq!(
        store
            .job(&key("k1").job("h"))
            .await
            .expect("job")
            .expect("state")
            .status,
        JobStatus::Succeeded,
        "never reset"
    );
}

/// One test per (backend, case), so that a failure on one backend or in one case does not
/// hide the others: `store_conformance::sled::<case>` and `store_conformance::postgres::<case>`
/// (which passes without running where no test database is configured).
macro_rules! conformance_cases {
    ($($case:ident),* $(,)?) => {
        mod sled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _dir) = super::sled_store();
                    super::$case(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(store) = super::postgres_store().await {
                        super::$case(store).await;
                    }
                }
            )*
        }
    };
}

conformance_cases!(
    many_runs_started_and_finished_at_once_each_start_once,
    a_queue_read_fills_its_batch_past_the_pairs_it_passes_over,
    a_backfill_binds_a_stored_delivery_once_and_never_resets_a_pair,
    a_queue_read_tells_when_the_next_entry_is_due,
    an_ordered_line_runs_one_pair_at_a_time_in_received_order,
    a_bulk_retry_of_dead_ordered_pairs_keeps_one_per_line_running,
    no_run_of_a_paused_handler_starts,
    a_run_whose_lease_lapsed_is_started_again_with_the_next_attempt,
    claim_new_then_existing,
    concurrent_claims_of_one_id_have_one_winner,
    one_body_under_many_ids_is_one_delivery_and_aliases,
    a_run_has_one_runner_and_a_success_is_final,
    a_failure_moves_the_entry_and_a_stale_entry_runs_nothing,
    dead_letters_retry_with_a_fresh_budget_and_running_pairs_are_left_alone,
    retention_keeps_what_is_due_and_forgets_what_is_final,
    a_forgotten_body_is_still_a_replay_by_its_fingerprint,
    the_call_journal_keeps_the_first_answer_and_goes_with_its_delivery,
    a_bulk_retry_larger_than_a_batch_requeues_every_selected_pair_once,
    renew_or_release_by_a_non_owner_changes_nothing,
    a_processed_lease_is_taken_over_only_past_its_grace,
    a_superseded_success_after_a_death_takes_the_pair_out_of_the_dead_letters,
);

/// Two replicas on one database: reading the queue at once they take different pairs, and a
/// pair one of them reserved is busy for the other until it starts it or the reservation
/// lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reading_the_queue_at_once_take_different_pairs() {
    let Some(server) = crate::helpers::test_postgres_url("store: two replicas on one queue") else {
        return;
    };
    let url = crate::helpers::fresh_postgres_schema(&server).await;
    let open = || async { crate::helpers::postgres_store_at(&url).await as Store };
    let (a, b) = (open().await, open().await);
    for i in 0..10 {
        a.claim(new(
            &format!("q{i}"),
            &format!("{{\"n\":{i}}}"),
            &["h"],
            false,
        ))
        .await
        .expect("claim");
    }
    let (from_a, from_b) = tokio::join!(due_now(&a, NOW), due_now(&b, NOW));
    assert_eq!(from_a.len() + from_b.len(), 10, "{from_a:?} {from_b:?}");
    for entry in &from_a {
        assert!(
            !from_b.iter().any(|e| e.job == entry.job),
            "{entry:?} taken twice"
        );
        // Reserved by A: B may not start it…
        assert!(matches!(
            b.begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
                .await
                .expect("begin"),
            Begin::Busy { .. }
        ));
    }
    // …A does, once.
    for entry in &from_a {
        assert!(matches!(
            a.begin_attempt(&entry.job, Some(entry.due_ms), NOW, LEASE)
                .await
                .expect("begin"),
            Begin::Started(_)
        ));
    }
    // B's reservations lapse unused (B died): A takes them after the reservation time.
    let later = NOW + 10 * 60_000;
    let taken = due_now(&a, later).await;
    assert_eq!(
        taken.len(),
        from_b.len() + from_a.len(),
        "A's own runs lapsed too by then"
    );
}

/// A batch of starts or successes whose statement fails (here: the table is away) answers
/// every request in it with the error and writes nothing: no attempt is counted, no pair
/// starts or succeeds; once the table is back, the same requests go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_every_request_in_it_and_writes_nothing() {
    let Some(server) = crate::helpers::test_postgres_url("store: a failed batch") else {
        return;
    };
    let url = crate::helpers::fresh_postgres_schema(&server).await;
    let store: Store = crate::helpers::postgres_store_at(&url).await;
    for i in 0..3 {
        store
            .claim(new(&format!("f{i}"), "{}", &["h"], false))
            .await
            .expect("claim");
    }
    let mut due = due_now(&store, NOW).await;
    due.sort_by(|a, b| a.job.delivery.id.cmp(&b.job.delivery.id));
    assert_eq!(due.len(), 3);
    assert!(matches!(
        store
            .begin_attempt(&due[0].job, Some(due[0].due_ms), NOW, LEASE)
            .await
            .expect("begin"),
        Begin::Started(_)
    ));
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
    let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
    sqlx::query(&rename("inbox_jobs", "inbox_jobs_away"))
        .execute(&mut db)
        .await
        .expect("rename");
    let (first, second, success) = tokio::join!(
        store.begin_attempt(&due[1].job, Some(due[1].due_ms), NOW, LEASE),
        store.begin_attempt(&due[2].job, Some(due[2].due_ms), NOW, LEASE),
        store.finish_attempt(&due[0].job, 1, AttemptOutcome::Succeeded, NOW),
    );
    assert!(first.is_err(), "{first:?}");
    assert!(second.is_err(), "{second:?}");
    assert!(success.is_err(), "{success:?}");
    sqlx::query(&rename("inbox_jobs_away", "inbox_jobs"))
        .execute(&mut db)
        .await
        .expect("rename back");
    let state = |n: usize| {
        let (store, job) = (store.clone(), due[n].job.clone());
        async move { store.job(&job).await.expect("job").expect("state") }
    };
    let running = state(0).await;
    assert_eq!((running.status, running.attempts), (JobStatus::Running, 1));
    for n in [1, 2] {
        // Never started: no state yet.
        let untouched = store.job(&due[n].job).await.expect("job");
        assert!(untouched.is_none(), "{untouched:?}");
    }
    assert!(matches!(
        store
            .begin_attempt(&due[1].job, Some(due[1].due_ms), NOW, LEASE)
            .await
            .expect("begin"),
        Begin::Started(attempt) if attempt.attempt == 1
    ));
    store
        .finish_attempt(&due[0].job, 1, AttemptOutcome::Succeeded, NOW)
        .await
        .expect("finish");
    assert_eq!(state(0).await.status, JobStatus::Succeeded);
}

/// New work on one replica wakes the others' dispatchers (LISTEN/NOTIFY), without polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_work_on_one_replica_is_announced_to_the_others() {
    let Some(server) = crate::helpers::test_postgres_url("store: LISTEN/NOTIFY") else {
        return;
    };
    let url = crate::helpers::fresh_postgres_schema(&server).await;
    let open = || crate::helpers::postgres_store_at(&url);
    let (a, b) = (open().await, open().await);
    let signal = b.work_signal().expect("a shared store announces work");
    let wait = std::time::Duration::from_secs(30);
    // The listener says so once when it starts listening (work may have come meanwhile).
    tokio::time::timeout(wait, signal.notified())
        .await
        .expect("listening");
    a.claim(new("n1", "{}", &["h"], false))
        .await
        .expect("claim");
    tokio::time::timeout(wait, signal.notified())
        .await
        .expect("the claim on A is announced to B");
}

/// `rate` across replicas is the store's reservation: three stores on one schema reserving
/// 30 starts of a handler at once, all at the same instant, get 30 distinct slots exactly
/// one interval apart (a burst of one), so no two replicas ever start in the same turn. A
/// handler in another schema of the same database has a line of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_reserving_starts_at_once_get_one_interval_each() {
    use webhook_inbox::store::JobQueue as _;
    let Some(server) = crate::helpers::test_postgres_url("store: rate reservations") else {
        return;
    };
    let url = crate::helpers::fresh_postgres_schema(&server).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(crate::helpers::postgres_store_at(&url).await);
    }
    const INTERVAL: u64 = 200;
    let reservations = (0..30).map(|i| {
        let store = replicas[i % 3].clone();
        tokio::spawn(async move { store.reserve_start("paced", INTERVAL, NOW).await })
    });
    let mut slots: Vec<u64> = futures_util::future::join_all(reservations)
        .await
        .into_iter()
        .map(|r| {
            r.expect("task")
                .expect("reserve")
                .expect("PostgreSQL keeps the spacing")
        })
        .collect();
    slots.sort_unstable();
    assert_eq!(
        slots,
        (0..30).map(|i| NOW + i * INTERVAL).collect::<Vec<_>>(),
        "one slot per start, an interval apart"
    );
    let neighbour =
        crate::helpers::postgres_store_at(&crate::helpers::fresh_postgres_schema(&server).await)
            .await;
    assert_eq!(
        neighbour
            .reserve_start("paced", INTERVAL, NOW)
            .await
            .expect("reserve"),
        Some(NOW),
        "another schema's handler of the same name is not behind this one"
    );
}

/// Retention runs on one replica at a time: while another holds the sweep's advisory lock,
/// a sweep does nothing (and says it reached the end, so it does not spin). The lock is
/// the schema's, not the database's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_sweeps_retention_at_a_time() {
    use sqlx::Connection as _;
    let Some(server) = crate::helpers::test_postgres_url("store: one retention sweep") else {
        return;
    };
    let url = crate::helpers::fresh_postgres_schema(&server).await;
    let store = crate::helpers::postgres_store_at(&url).await;
    store
        .claim(new("old", "{}", &[], false))
        .await
        .expect("claim");
    let mut other = sqlx::PgConnection::connect(&url).await.expect("connect");
    let mut sweeping = other.begin().await.expect("tx");
    let held: bool = sqlx::query_scalar(webhook_inbox::store::postgres::TRY_RETENTION_LOCK)
        .fetch_one(&mut *sweeping)
        .await
        .expect("lock");
    assert!(held);
    let pass = store.expire(NOW, NOW, 100).await.expect("expire");
    assert_eq!(
        (pass.removed, pass.examined),
        (0, 0),
        "another replica sweeps"
    );
    // The lock is this schema's: a deployment in another schema of the same database
    // sweeps its own retention meanwhile.
    let neighbour =
        crate::helpers::postgres_store_at(&crate::helpers::fresh_postgres_schema(&server).await)
            .await;
    neighbour
        .claim(new("old", "{}", &[], false))
        .await
        .expect("claim");
    assert_eq!(
        neighbour
            .expire(NOW, NOW, 100)
            .await
            .expect("expire")
            .removed,
        1,
        "a sweep in another schema is not held up"
    );
    sweeping.rollback().await.expect("release");
    assert_eq!(
        store.expire(NOW, NOW, 100).await.expect("expire").removed,
        1
    );
}

/// `store copy` keeps `order_by` lines both ways, sled → PostgreSQL → sled, a page of one
/// item at a time: a line's waiting pairs arrive waiting, one pair of each line due — the
/// first *received*, though ids sort the other way and arrive on later pages — and the line
/// hands on in received order in the target. The call journal goes with its delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_copy_keeps_order_by_lines_both_ways() {
    use webhook_inbox::store::copy::copy;
    let Some(server) = crate::helpers::test_postgres_url("store copy of order_by lines") else {
        return;
    };
    let dir = tempfile::TempDir::new().expect("dir");
    let open_sled = |name: &str| {
        Arc::new(
            webhook_inbox::store::SledStore::open(
                &dir.path().join(name),
                Durability::Fsync,
                8 << 20,
            )
            .expect("sled"),
        )
    };
    let sled = open_sled("data");
    // Received l3, l2, l1: the reverse of the key order the copy reads in.
    for (id, at) in [("l3", NOW - 3000), ("l2", NOW - 2000), ("l1", NOW - 1000)] {
        sled.claim(ordered(id, "L", at)).await.expect("claim");
    }
    let kept = call_record(201, "copied");
    sled.journal_put(&key("l3").job("h"), "open", &kept)
        .await
        .expect("journal");
    let from: Store = sled.clone();
    assert_eq!(due_ids(&from, u64::MAX / 2).await, ["l3"]);
    let pg = crate::helpers::postgres_store(&server).await;
    let report = copy(&*sled, &*pg, NOW, 1).await.expect("copy");
    assert_eq!((report.deliveries, report.written), (3, 3));
    let back = open_sled("back");
    let report = copy(&*pg, &*back, NOW, 1).await.expect("copy back");
    assert_eq!((report.deliveries, report.written), (3, 3));
    let again = copy(&*pg, &*back, NOW, 1).await.expect("copy again");
    assert_eq!(again.written, 0, "what is there is left alone");
    let pg: Store = pg;
    let back: Store = back;
    for target in [&pg, &back] {
        assert_eq!(
            target
                .journal_get(&key("l3").job("h"), "open")
                .await
                .expect("get"),
            Some(kept.clone()),
            "the call journal goes with its delivery"
        );
        assert_eq!(due_ids(target, u64::MAX / 2).await, ["l3"]);
        for (id, next) in [("l3", Some("l2")), ("l2", Some("l1")), ("l1", None)] {
            run_once(target, id, AttemptOutcome::Succeeded).await;
            let due = due_ids(target, u64::MAX / 2).await;
            assert_eq!(due, next.into_iter().collect::<Vec<_>>(), "after {id}");
        }
    }
}

/// Every status a pair can be in, for the property tests.
const EVERY_STATUS: [JobStatus; 5] = [
    JobStatus::Pending,
    JobStatus::Running,
    JobStatus::Failed,
    JobStatus::Succeeded,
    JobStatus::Dead,
];

/// Random states per property test of a PostgreSQL statement (each is a few round trips).
const PROPERTY_CASES: u32 = 48;

/// For the property tests of PostgreSQL's statements: a fresh store holding delivery `id`
/// with one pair (handler `h`), and a runtime to drive it; `None` without a test database.
fn one_pair_on_postgres(
    what: &str,
    id: &str,
) -> Option<(
    tokio::runtime::Runtime,
    String,
    Arc<webhook_inbox::store::PgStore>,
)> {
    let server = crate::helpers::test_postgres_url(what)?;
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (url, pg) = runtime.block_on(async {
        let url = crate::helpers::fresh_postgres_schema(&server).await;
        let pg = crate::helpers::postgres_store_at(&url).await;
        pg.claim(new(id, "{}", &["h"], false)).await.expect("claim");
        (url, pg)
    });
    Some((runtime, url, pg))
}

/// Puts the pair of delivery `id` in a state written straight into its row: `status` after
/// `attempts` runs, its queue entry due at `due` (none: not queued), changed 50 ms ago, and,
/// if running, leased to runner 9 until `lease_until`.
async fn set_pair(
    url: &str,
    id: &str,
    status: JobStatus,
    attempts: u32,
    due: Option<u64>,
    lease_until: u64,
) {
    let mut db = sqlx::PgConnection::connect(url).await.expect("connect");
    let leased = status == JobStatus::Running;
    sqlx::query(
        "UPDATE inbox_jobs SET status = $1, attempts = $2, retry_base = 0, last_error = NULL, \
            due_ms = $3, updated_ms = $4, lease_owner = $5, lease_until_ms = $6, \
            reserved_by = NULL, reserved_until_ms = NULL WHERE id = $7",
    )
    .bind(format!("{status:?}").to_lowercase())
    .bind(attempts as i32)
    .bind(due.map(|ms| ms as i64))
    .bind((NOW - 50) as i64)
    .bind(leased.then_some(9_i64))
    .bind(leased.then_some(lease_until as i64))
    .bind(id)
    .execute(&mut db)
    .await
    .expect("set the state");
}

/// PostgreSQL records the end of a run in one statement per outcome, where sled applies
/// [`webhook_inbox::store::transitions::finish`]: on random states of a started pair and
/// random outcomes of current and superseded attempts, the statement leaves the row as the
/// module says (or untouched where it says nothing changes).
#[test]
fn postgres_s_end_of_run_statements_agree_with_the_transitions_module() {
    use proptest::prelude::*;
    use webhook_inbox::store::transitions;
    let Some((runtime, url, pg)) = one_pair_on_postgres("store: finish statements", "fin") else {
        return;
    };
    let job = key("fin").job("h");
    let statuses = [
        JobStatus::Running,
        JobStatus::Failed,
        JobStatus::Succeeded,
        JobStatus::Dead,
    ];
    let outcomes = prop_oneof![
        Just(AttemptOutcome::Succeeded),
        Just(AttemptOutcome::Dead {
            error: "dead".into()
        }),
        Just(AttemptOutcome::RetryAt {
            due_ms: NOW + 700,
            error: "again".into()
        }),
        Just(AttemptOutcome::Failed {
            error: "processed".into()
        }),
    ];
    let config = ProptestConfig::with_cases(PROPERTY_CASES);
    proptest!(config, |(
        status in prop::sample::select(statuses.to_vec()),
        attempts in 1u32..4,
        attempt in 1u32..4,
        queued in any::<bool>(),
        outcome in outcomes,
    )| {
        runtime.block_on(async {
            set_pair(&url, "fin", status, attempts, queued.then_some(NOW - 50), NOW + 30_000).await;
            let before = pg.job(&job).await.expect("read").expect("a state");
            pg.finish_attempt(&job, attempt, outcome.clone(), NOW)
                .await
                .expect("finish");
            let after = pg.job(&job).await.expect("read").expect("a state");
            let expected = transitions::finish(Some(&before), attempt, &outcome, NOW)
                .map_or(before.clone(), |f| f.state);
            assert_eq!(after, expected, "from {before:?}, attempt {attempt}, {outcome:?}");
        });
    });
}

/// The same for an operator retry: PostgreSQL's retry statement against
/// [`webhook_inbox::store::transitions::operator_retry`], over every status, live and
/// lapsed leases, queued or not (outside any `order_by` line).
#[test]
fn postgres_s_retry_statement_agrees_with_the_transitions_module() {
    use proptest::prelude::*;
    use webhook_inbox::store::transitions::{self, Retry, RetryContext};
    use webhook_inbox::store::{JobState, Operations as _, TAKE_OVER_GRACE_MS};
    let Some((runtime, url, pg)) = one_pair_on_postgres("store: retry statement", "again") else {
        return;
    };
    let statuses = EVERY_STATUS;
    let config = ProptestConfig::with_cases(PROPERTY_CASES);
    proptest!(config, |(
        status in prop::sample::select(statuses.to_vec()),
        attempts in 0u32..4,
        queued in any::<bool>(),
        live in any::<bool>(),
    )| {
        runtime.block_on(async {
            let until = if live { NOW + 30_000 } else { NOW - TAKE_OVER_GRACE_MS - 1 };
            set_pair(&url, "again", status, attempts, queued.then_some(NOW - 50), until).await;
            let job = key("again").job("h");
            let before = pg.job(&job).await.expect("read").expect("a state");
            pg.retry(&key("again"), NOW).await.expect("retry");
            let after = pg.job(&job).await.expect("read").expect("a state");
            let context = RetryContext {
                lease_is_live: before.lease.is_some_and(|l| l.blocks_at(NOW)),
                only: None,
                ordered: false,
                parked: false,
                queued_on_arrival: None,
            };
            let expected = match transitions::operator_retry(Some(before.clone()), context, NOW) {
                Retry::Untouched => before.clone(),
                Retry::DueNow { state, .. } | Retry::BackInLine { state } => JobState {
                    queued_at_ms: Some(NOW),
                    ..state
                },
            };
            assert_eq!(after, expected, "from {before:?}");
        });
    });
}

/// A start on PostgreSQL (`begun`, taking the pair from `before` to `after`) as
/// [`webhook_inbox::store::transitions::start`] says it goes: the same answer (started, busy
/// or skipped) and the same state after (untouched unless started; the lease's owner is the
/// store's own runner id).
fn assert_start_agrees(
    before: &webhook_inbox::store::JobState,
    after: &webhook_inbox::store::JobState,
    begun: &Begin,
    paused: bool,
    queued_due: Option<u64>,
) {
    use webhook_inbox::store::transitions::{self, Start};
    let expected = transitions::start(
        Some(before.clone()),
        before.attempts,
        before.lease.is_some_and(|l| l.blocks_at(NOW)),
        paused,
        Lease {
            owner: after.lease.map_or(0, |l| l.owner),
            until_ms: LEASE,
        },
        queued_due,
        NOW,
    );
    match expected {
        Start::Run(state) => {
            assert!(matches!(begun, Begin::Started(_)), "{before:?}: {begun:?}");
            assert_eq!(*after, state, "from {before:?}");
        }
        Start::Busy { .. } => {
            assert!(matches!(begun, Begin::Busy { .. }), "{before:?}: {begun:?}");
            assert_eq!(after, before);
        }
        Start::Skip => {
            assert!(matches!(begun, Begin::Skipped), "{before:?}: {begun:?}");
            assert_eq!(
                (after.status, after.attempts),
                (before.status, before.attempts)
            );
        }
    }
}

/// And for the start of a run: PostgreSQL's conditional `UPDATE … RETURNING` against
/// [`webhook_inbox::store::transitions::start`], over every status, live and lapsed leases,
/// a paused handler or not, a run from the queue or inline: the same answer (started, busy
/// or skipped) and the same state after.
#[test]
fn postgres_s_start_statement_agrees_with_the_transitions_module() {
    use proptest::prelude::*;
    use webhook_inbox::store::{Operations as _, TAKE_OVER_GRACE_MS};
    let Some((runtime, url, pg)) = one_pair_on_postgres("store: start statement", "go") else {
        return;
    };
    let statuses = EVERY_STATUS;
    let config = ProptestConfig::with_cases(PROPERTY_CASES);
    proptest!(config, |(
        status in prop::sample::select(statuses.to_vec()),
        attempts in 0u32..4,
        live in any::<bool>(),
        paused in any::<bool>(),
        from_queue in any::<bool>(),
    )| {
        runtime.block_on(async {
            let until = if live { NOW + 30_000 } else { NOW - TAKE_OVER_GRACE_MS - 1 };
            set_pair(&url, "go", status, attempts, Some(NOW - 50), until).await;
            pg.set_paused("h", paused, NOW).await.expect("pause");
            let job = key("go").job("h");
            let before = pg.job(&job).await.expect("read").expect("a state");
            let queued_due = from_queue.then_some(NOW - 50);
            let begun = pg
                .begin_attempt(&job, queued_due, NOW, LEASE)
                .await
                .expect("begin");
            let after = pg.job(&job).await.expect("read").expect("a state");
            assert_start_agrees(&before, &after, &begun, paused, queued_due);
        });
    });
}

/// PostgreSQL's start under a cross-replica `concurrency` (`begin_limited_attempt`): with as
/// many of the handler's pairs running under leases that block a take-over as the limit,
/// nothing starts and nothing changes ([`Begin::AtLimit`]); below it, the same answer and
/// state as [`webhook_inbox::store::transitions::start`]. Random states of the pair to start
/// and of two others of the same handler, random limits.
#[test]
fn postgres_s_limited_start_agrees_with_the_transitions_module_and_counts_live_leases() {
    use proptest::prelude::*;
    use webhook_inbox::store::TAKE_OVER_GRACE_MS;
    let Some((runtime, url, pg)) = one_pair_on_postgres("store: limited start", "lim") else {
        return;
    };
    let others = ["lim-1", "lim-2"];
    runtime.block_on(async {
        for id in others {
            pg.claim(new(id, "{}", &["h"], false)).await.expect("claim");
        }
    });
    let pair = || {
        (
            prop::sample::select(EVERY_STATUS.to_vec()),
            0u32..4,
            any::<bool>(),
        )
    };
    let config = ProptestConfig::with_cases(PROPERTY_CASES);
    proptest!(config, |(
        (status, attempts, live) in pair(),
        other_pairs in [pair(), pair()],
        limit in 1usize..4,
    )| {
        runtime.block_on(async {
            let until = |live| if live { NOW + 30_000 } else { NOW - TAKE_OVER_GRACE_MS - 1 };
            set_pair(&url, "lim", status, attempts, Some(NOW - 50), until(live)).await;
            for (id, (status, attempts, live)) in others.iter().zip(&other_pairs) {
                set_pair(&url, id, *status, *attempts, Some(NOW - 50), until(*live)).await;
            }
            let mut running = 0;
            for id in std::iter::once("lim").chain(others) {
                let state = pg.job(&key(id).job("h")).await.expect("read").expect("a state");
                if state.status == JobStatus::Running
                    && state.lease.is_some_and(|l| l.blocks_at(NOW))
                {
                    running += 1;
                }
            }
            let job = key("lim").job("h");
            let before = pg.job(&job).await.expect("read").expect("a state");
            let begun = pg
                .begin_limited_attempt(&job, Some(NOW - 50), NOW, LEASE, Some(limit))
                .await
                .expect("begin");
            let after = pg.job(&job).await.expect("read").expect("a state");
            if running >= limit {
                assert!(matches!(begun, Begin::AtLimit { .. }), "{running} running: {begun:?}");
                assert_eq!(after, before);
                return;
            }
            assert_start_agrees(&before, &after, &begun, false, Some(NOW - 50));
        });
    });
}

/// PostgreSQL's lease renewal against [`webhook_inbox::store::transitions::renew`]: over
/// every status, current and superseded attempts, and a lease held by this store or by
/// another runner, the statement renews exactly when the module does — the fencing of a
/// runner that was taken over — and leaves the row as the module says.
#[test]
fn postgres_s_renewal_statement_agrees_with_the_transitions_module() {
    use proptest::prelude::*;
    use webhook_inbox::store::{Lease, transitions};
    let Some((runtime, url, pg)) = one_pair_on_postgres("store: renewal statement", "ren") else {
        return;
    };
    // This store's runner id: the owner of a lease it takes.
    let me = runtime.block_on(async {
        pg.claim(new("mine", "{}", &["h"], false))
            .await
            .expect("claim");
        let job = key("mine").job("h");
        pg.begin_attempt(&job, None, NOW, LEASE)
            .await
            .expect("begin");
        pg.job(&job)
            .await
            .expect("read")
            .and_then(|s| s.lease)
            .expect("leased")
            .owner
    });
    let config = ProptestConfig::with_cases(PROPERTY_CASES);
    // Mostly running pairs leased by this store: the states where the fencing decides.
    let statuses = prop_oneof![
        3 => Just(JobStatus::Running),
        1 => prop::sample::select(EVERY_STATUS.to_vec()),
    ];
    proptest!(config, |(
        status in statuses,
        attempts in 1u32..4,
        attempt in 1u32..4,
        mine in prop::bool::weighted(0.75),
    )| {
        runtime.block_on(async {
            set_pair(&url, "ren", status, attempts, Some(NOW - 50), NOW + 30_000).await;
            if mine && status == JobStatus::Running {
                let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
                sqlx::query("UPDATE inbox_jobs SET lease_owner = $1 WHERE id = 'ren'")
                    .bind(me as i64)
                    .execute(&mut db)
                    .await
                    .expect("own the lease");
            }
            let job = key("ren").job("h");
            let before = pg.job(&job).await.expect("read").expect("a state");
            let renewed = pg
                .renew_job_lease(&job, attempt, NOW + 60_000)
                .await
                .expect("renew");
            let after = pg.job(&job).await.expect("read").expect("a state");
            let lease = Lease { owner: me, until_ms: NOW + 60_000 };
            let expected = transitions::renew(Some(&before), attempt, lease);
            assert_eq!(renewed, expected.is_some(), "from {before:?}, attempt {attempt}");
            assert_eq!(after, expected.unwrap_or(before.clone()), "from {before:?}");
        });
    });
}

/// PostgreSQL decides in one query which deliveries retention keeps; sled asks
/// [`webhook_inbox::store::transitions::keeps_its_delivery`] pair by pair. Over every
/// status, queued or not, in an `order_by` line or not, live and lapsed leases, a sweep
/// past the delivery's age removes it exactly when the module says its pair does not keep
/// it.
#[test]
fn postgres_s_retention_query_agrees_with_the_transitions_module() {
    use proptest::prelude::*;
    use webhook_inbox::store::{TAKE_OVER_GRACE_MS, transitions};
    let Some((runtime, url, pg)) = one_pair_on_postgres("store: retention query", "old") else {
        return;
    };
    let config = ProptestConfig::with_cases(PROPERTY_CASES);
    proptest!(config, |(
        status in prop::sample::select(EVERY_STATUS.to_vec()),
        attempts in 0u32..3,
        queued in any::<bool>(),
        in_line in any::<bool>(),
        live in any::<bool>(),
    )| {
        runtime.block_on(async {
            if pg.record(&key("old")).await.expect("read").is_none() {
                pg.claim(new("old", "{}", &["h"], false)).await.expect("claim");
            }
            let until = if live { NOW + 30_000 } else { NOW - TAKE_OVER_GRACE_MS - 1 };
            set_pair(&url, "old", status, attempts, queued.then_some(NOW - 50), until).await;
            let mut db = sqlx::PgConnection::connect(&url).await.expect("connect");
            sqlx::query("UPDATE inbox_jobs SET order_key = $1 WHERE id = 'old'")
                .bind(in_line.then_some("line-1"))
                .execute(&mut db)
                .await
                .expect("line");
            let job = key("old").job("h");
            let before = pg.job(&job).await.expect("read").expect("a state");
            let keeps = transitions::keeps_its_delivery(
                Some(&before),
                queued,
                in_line,
                before.lease.is_some_and(|l| l.blocks_at(NOW)),
            );
            pg.expire(NOW, NOW, 10).await.expect("expire");
            let kept = pg.record(&key("old")).await.expect("read").is_some();
            assert_eq!(kept, keeps, "{before:?}, queued {queued}, in line {in_line}");
        });
    });
}
