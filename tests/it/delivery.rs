//! Delivery of approved content: signed webhooks through the outbox (real HTTP on loopback,
//! a receiver that checks signatures and records idempotency keys), retries and recovery,
//! dead letters and replay, crashes between approval and delivery, the pull feed under
//! concurrent approvals, SSRF checks and roles.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use enricher::{
    auth::Role,
    config::Settings,
    delivery::worker::DeliveryWorker,
    review::{self, Actor},
    startup::{self, RunOptions},
    store::{self, deliveries::DeliveryFilter},
};
use serde_json::{json, Value};

use crate::{
    backend_tests,
    support::{
        enricher_bin, root, shared_lines,
        webhook_receiver::{reserve_addr, Received, Receiver, Reply},
        Backend, TestApp, TestDb,
    },
};

const SECRET: &str = "whsec_test_0123456789abcdef";

/// Fast polling and backoff for tests.
fn fast(s: &mut Settings) {
    s.delivery.poll_interval_ms = 20;
    s.delivery.backoff_base_ms = 20;
    s.delivery.backoff_max_ms = 200;
    s.delivery.request_timeout_ms = 5_000;
    s.delivery.concurrency = 16;
}

async fn subscribe(app: &TestApp, url: &str, channel: Option<&str>) -> String {
    let (status, body) = app
        .post_json(
            "/v1/webhooks",
            &json!({"url": url, "secret": SECRET, "channel": channel}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["secret"], SECRET, "the secret is shown at creation");
    body["id"].as_str().unwrap().to_string()
}

/// Generates drafts for the first `n` products on `channels` (stub provider) and returns the
/// ids of those ready for approval.
async fn ready_drafts(app: &TestApp, n: usize, channels: &str) -> Vec<Value> {
    let receipt = app
        .submit_jsonl(&shared_lines("wdc-pave-dev.jsonl", n), channels)
        .await;
    let batch = receipt["batch_id"].as_str().unwrap().to_string();
    app.wait_batch(&batch, Duration::from_secs(180)).await;
    app.drafts(&format!("batch={batch}&status=pending_review&limit=1000"))
        .await
}

async fn approve(app: &TestApp, draft_id: &str) -> store::approved::ApprovedContent {
    review::approve(
        app.db(),
        &app.app.channels,
        draft_id,
        None,
        &Actor {
            name: "tester",
            expected_revision: None,
        },
    )
    .await
    .expect("approve")
}

/// Polls the deliveries until `done` holds for the list (all statuses), or panics.
async fn wait_deliveries(
    app: &TestApp,
    limit: Duration,
    what: &str,
    done: impl Fn(&[store::deliveries::Delivery]) -> bool,
) -> Vec<store::deliveries::Delivery> {
    let start = Instant::now();
    loop {
        let list = store::deliveries::list(
            app.db(),
            &DeliveryFilter {
                limit: 10_000,
                ..Default::default()
            },
        )
        .await
        .expect("list deliveries");
        if done(&list) {
            return list;
        }
        assert!(
            start.elapsed() < limit,
            "{what} not reached after {limit:?}: {:?}",
            list.iter()
                .map(|d| (d.status, d.attempts, d.last_error.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn all_delivered(n: usize) -> impl Fn(&[store::deliveries::Delivery]) -> bool {
    move |l| {
        l.len() == n
            && l.iter()
                .all(|d| d.status == store::deliveries::DeliveryStatus::Delivered)
    }
}

/// No request for version v of a product arrives before version v-1 was answered 2xx.
/// Returns the last delivered version per product.
fn assert_version_order(got: &[Received]) -> BTreeMap<String, i64> {
    let mut delivered: BTreeMap<String, i64> = BTreeMap::new();
    for r in got {
        let p = r.event["product_id"].as_str().unwrap().to_string();
        let v = r.event["version"].as_i64().unwrap();
        let done = delivered.get(&p).copied().unwrap_or(0);
        assert_eq!(
            v,
            done + 1,
            "{p}: version {v} was sent while version {} was not yet delivered",
            done + 1
        );
        if r.ok() {
            delivered.insert(p, v);
        }
    }
    delivered
}

backend_tests!(
    approvals_arrive_signed_once_per_key,
    receiver_failures_are_retried_and_versions_stay_in_order,
    a_crashed_worker_loses_nothing,
    killed_process_resends_after_restart,
    permanent_failures_are_dead_lettered_visible_and_replayable,
    feed_pages_concurrent_approvals_without_gaps_or_duplicates,
    feed_positions_are_commit_order,
    many_workers_share_the_queue,
);

async fn approvals_arrive_signed_once_per_key(backend: Backend) {
    let receiver = Receiver::start(SECRET).await;
    let amazon_only = Receiver::start(SECRET).await;
    let app = TestApp::spawn(backend, fast).await;
    let all_id = subscribe(&app, &receiver.url(), None).await;
    subscribe(&app, &amazon_only.url(), Some("amazon")).await;

    let drafts = ready_drafts(&app, 120, "seo,amazon").await;
    assert!(drafts.len() >= 200, "{} drafts ready", drafts.len());
    let drafts = &drafts[..200];
    let t0 = Instant::now();
    for d in drafts {
        approve(&app, d["id"].as_str().unwrap()).await;
    }
    let approve_s = t0.elapsed().as_secs_f64();
    let amazon = drafts.iter().filter(|d| d["channel"] == "amazon").count();
    let got = receiver
        .wait_until(Duration::from_secs(120), "200 deliveries", |r| {
            r.iter().filter(|x| x.ok()).count() >= 200
        })
        .await;
    let wall_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "[{backend:?}] 200 approvals in {approve_s:.2}s; all delivered {wall_s:.2}s after the first"
    );
    wait_deliveries(
        &app,
        Duration::from_secs(30),
        "every delivery recorded",
        all_delivered(200 + amazon),
    )
    .await;
    // no late duplicates either
    let other = amazon_only
        .wait_until(Duration::from_secs(60), "amazon deliveries", |r| {
            r.len() >= amazon
        })
        .await;
    let got_now = receiver.received();
    assert_eq!(got_now.len(), 200, "exactly one request per event");
    assert!(
        got.iter().all(|r| r.signature_ok),
        "every signature verifies"
    );
    let keys: HashSet<&str> = got_now.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys.len(), 200, "one idempotency key per event");
    let events: HashSet<&str> = got_now
        .iter()
        .map(|r| r.event["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(events.len(), 200);
    let approved_drafts: HashSet<&str> = drafts.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let sent_drafts: HashSet<&str> = got_now
        .iter()
        .map(|r| r.event["draft_id"].as_str().unwrap())
        .collect();
    assert_eq!(approved_drafts, sent_drafts, "every approval arrived");
    let e = &got_now[0].event;
    for k in [
        "event_id",
        "type",
        "product_id",
        "channel",
        "version",
        "fields",
        "approved_by",
        "approved_at",
        "provenance",
    ] {
        assert!(e.get(k).is_some(), "event lacks {k}: {e}");
    }
    assert_eq!(e["type"], "content.approved");
    assert_eq!(e["approved_by"], "tester");
    assert_eq!(e["provenance"]["provider"], "stub");
    assert_eq!(e["provenance"]["template_hash"].as_str().unwrap().len(), 64);
    assert!(e["provenance"]["rules_version"].is_string());
    // the channel filter
    assert_eq!(other.len(), amazon);
    assert!(other
        .iter()
        .all(|r| r.event["channel"] == "amazon" && r.signature_ok));
    // the secret is never listed
    let (status, text) = app.get_text("/v1/webhooks").await;
    assert_eq!(status, 200);
    assert!(!text.contains(SECRET), "{text}");
    let (_, list) = app.get("/v1/webhooks").await;
    // the list's order between two subscriptions made in the same millisecond is not set
    let all = list["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == all_id.as_str())
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(all["deliveries"]["delivered"], 200);
}

async fn receiver_failures_are_retried_and_versions_stay_in_order(backend: Backend) {
    let addr = reserve_addr();
    let url = format!("http://{addr}/hook");
    let app = TestApp::spawn(backend, |s| {
        fast(s);
        s.delivery.request_timeout_ms = 1_000;
    })
    .await;
    subscribe(&app, &url, None).await;
    // three approved versions of each of 12 products, approved while the receiver is down
    let mut rounds = Vec::new();
    for _ in 0..3 {
        rounds.push(ready_drafts(&app, 12, "seo").await);
    }
    let products: HashSet<&str> = rounds[0]
        .iter()
        .map(|d| d["product_id"].as_str().unwrap())
        .collect();
    assert!(products.len() >= 8, "{} products ready", products.len());
    let mut n = 0;
    for round in &rounds {
        for d in round {
            if products.contains(d["product_id"].as_str().unwrap()) {
                approve(&app, d["id"].as_str().unwrap()).await;
                n += 1;
            }
        }
    }
    // connection refused, retried
    wait_deliveries(
        &app,
        Duration::from_secs(30),
        "failed attempts while the receiver is down",
        |l| l.iter().any(|d| d.attempts >= 2),
    )
    .await;
    // the receiver comes up, and fails some more: 500, a timeout, 503, 429, 502, a timeout
    let receiver = Receiver::start_on(addr, SECRET).await;
    receiver.script([
        Reply::status(500),
        Reply::Hang(Duration::from_secs(3)),
        Reply::status(503),
        Reply::Status {
            code: 429,
            retry_after: Some("0".into()),
        },
        Reply::status(502),
        Reply::Hang(Duration::from_secs(3)),
        Reply::status(408),
    ]);
    let got = receiver
        .wait_until(Duration::from_secs(120), "every version delivered", |r| {
            r.iter()
                .filter(|x| x.ok())
                .map(|x| &x.key)
                .collect::<HashSet<_>>()
                .len()
                >= n
        })
        .await;
    let list = wait_deliveries(
        &app,
        Duration::from_secs(30),
        "every delivery recorded",
        all_delivered(n),
    )
    .await;
    assert!(got.iter().all(|r| r.signature_ok));
    let mut ok_per_key: HashMap<&str, usize> = HashMap::new();
    for r in got.iter().filter(|r| r.ok()) {
        *ok_per_key.entry(&r.key).or_default() += 1;
    }
    assert_eq!(ok_per_key.len(), n, "all {n} arrived after recovery");
    assert!(ok_per_key.values().all(|c| *c == 1), "once per key");
    let delivered = assert_version_order(&got);
    assert!(delivered.values().all(|v| *v == 3), "{delivered:?}");
    // the attempt log shows each kind of failure
    let mut errors = Vec::new();
    for d in &list {
        for a in store::deliveries::attempts(app.db(), &d.id).await.unwrap() {
            errors.push((a.status_code, a.outcome, a.error.unwrap_or_default()));
        }
    }
    assert!(
        errors
            .iter()
            .any(|(code, _, e)| code.is_none() && e.contains("onnect")),
        "connection refused logged: {errors:?}"
    );
    assert!(
        errors.iter().any(|(_, _, e)| e.contains("timed out")),
        "timeout logged"
    );
    for code in [500, 503, 429, 502, 408] {
        assert!(
            errors
                .iter()
                .any(|(c, outcome, _)| *c == Some(code) && outcome == "retry"),
            "{code} retried"
        );
    }
    let retried = list.iter().filter(|d| d.attempts > 1).count();
    eprintln!("[{backend:?}] {n} versions delivered in order; {retried} needed retries");
}

async fn a_crashed_worker_loses_nothing(backend: Backend) {
    let receiver = Receiver::start(SECRET).await;
    // drafts come from a service with workers; the approval happens while no delivery runs
    let mut app = TestApp::spawn(backend, |s| {
        fast(s);
        s.delivery.enabled = false;
        s.delivery.request_timeout_ms = 500;
    })
    .await;
    subscribe(&app, &receiver.url(), None).await;
    let drafts = ready_drafts(&app, 2, "seo").await;
    let a = approve(&app, drafts[0]["id"].as_str().unwrap()).await;
    let b = approve(&app, drafts[1]["id"].as_str().unwrap()).await;
    // a worker claimed the first delivery and died mid-send: its lease is held, nothing sent
    let now = store::now_ms();
    let lease_ends = Instant::now() + Duration::from_millis(1_500);
    let leased = store::deliveries::claim(app.db(), "dead-worker", now, now + 1_500, 1)
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    // the service stops abruptly (no delivery worker ran at all)
    app.stop().await;
    assert!(receiver.received().is_empty());

    // a new service on the same database sends both: the leased one once its lease ends
    let mut settings = (*app.app.settings).clone();
    settings.delivery.enabled = true;
    let mut app2 = app.app.clone();
    app2.settings = Arc::new(settings);
    let running = startup::start(
        &app2,
        RunOptions {
            http: None,
            workers: Some(app2.pipeline().await.unwrap()),
            worker_name: "restarted".into(),
            grace: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let got = receiver
        .wait_until(Duration::from_secs(30), "both events", |r| {
            r.iter().filter(|x| x.ok()).count() >= 2
        })
        .await;
    let ids: HashSet<&str> = got
        .iter()
        .map(|r| r.event["draft_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        HashSet::from([a.draft_id.as_str(), b.draft_id.as_str()])
    );
    assert_eq!(got.len(), 2, "each sent once");
    let leased_at = got
        .iter()
        .find(|r| r.key == leased[0].id)
        .expect("the leased delivery")
        .at;
    assert!(
        leased_at + Duration::from_millis(50) >= lease_ends,
        "the leased delivery waits for its lease to end"
    );
    assert_ne!(got[0].key, leased[0].id, "the other one did not wait");
    wait_deliveries(&app, Duration::from_secs(10), "recorded", all_delivered(2)).await;
    running.shutdown().await.unwrap();
}

/// The `enricher worker` binary against the test database.
fn spawn_worker(db: &TestDb, timeout_ms: u64) -> Child {
    Command::new(enricher_bin())
        .arg("worker")
        .current_dir(db.dir.path())
        .env("DATABASE_URL", &db.url)
        .env("ENRICHER_DEFAULT_PROVIDER", "stub")
        .env("ENRICHER_PATHS__PROMPTS_DIR", root().join("prompts"))
        .env("ENRICHER_PATHS__MODELS_DIR", root().join("models"))
        .env("ENRICHER_WORKER__POLL_INTERVAL_MS", "50")
        .env("ENRICHER_DELIVERY__POLL_INTERVAL_MS", "20")
        .env("ENRICHER_DELIVERY__BACKOFF_BASE_MS", "20")
        .env(
            "ENRICHER_DELIVERY__REQUEST_TIMEOUT_MS",
            timeout_ms.to_string(),
        )
        .env("ENRICHER_LOG__FILTER", "warn")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn enricher worker")
}

async fn killed_process_resends_after_restart(backend: Backend) {
    let receiver = Receiver::start(SECRET).await;
    // the first request hangs: the process is killed while it is in flight
    receiver.script([Reply::Hang(Duration::from_secs(30))]);
    let mut app = TestApp::spawn(backend, |s| {
        fast(s);
        s.delivery.enabled = false;
    })
    .await;
    subscribe(&app, &receiver.url(), None).await;
    let drafts = ready_drafts(&app, 1, "seo").await;
    app.stop().await;
    let content = approve(&app, drafts[0]["id"].as_str().unwrap()).await;

    let mut first = spawn_worker(&app.db, 1_000);
    let got = receiver
        .wait_until(Duration::from_secs(60), "the first send", |r| !r.is_empty())
        .await;
    first.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
    first.wait().expect("reaped");
    assert_eq!(got[0].answered, 0, "in flight when killed");

    let mut second = spawn_worker(&app.db, 1_000);
    let got = receiver
        .wait_until(Duration::from_secs(60), "the resend", |r| {
            r.iter().any(|x| x.ok())
        })
        .await;
    let list = wait_deliveries(&app, Duration::from_secs(30), "recorded", all_delivered(1)).await;
    second.kill().ok();
    second.wait().ok();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].key, got[1].key, "the same idempotency key");
    assert_eq!(got[1].event["draft_id"], content.draft_id.as_str());
    assert!(got.iter().all(|r| r.signature_ok));
    // the killed process never recorded its attempt; the restarted one did
    let attempts = store::deliveries::attempts(app.db(), &list[0].id)
        .await
        .unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome, "delivered");
}

async fn permanent_failures_are_dead_lettered_visible_and_replayable(backend: Backend) {
    let receiver = Receiver::start(SECRET).await;
    receiver.script([Reply::status(410), Reply::status(400)]);
    let app = TestApp::spawn(backend, fast).await;
    subscribe(&app, &receiver.url(), None).await;
    let drafts = ready_drafts(&app, 2, "seo").await;
    approve(&app, drafts[0]["id"].as_str().unwrap()).await;
    approve(&app, drafts[1]["id"].as_str().unwrap()).await;
    let dead = wait_deliveries(&app, Duration::from_secs(30), "both dead", |l| {
        l.len() == 2
            && l.iter()
                .all(|d| d.status == store::deliveries::DeliveryStatus::Dead)
    })
    .await;
    assert!(dead.iter().all(|d| d.attempts == 1), "4xx is not retried");
    assert_eq!(receiver.received().len(), 2);

    // visible by API, with the attempt log
    let (status, body) = app.get("/v1/deliveries?status=dead").await;
    assert_eq!(status, 200, "{body}");
    let listed = body["deliveries"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let codes: HashSet<i64> = listed
        .iter()
        .map(|d| d["last_status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, HashSet::from([410, 400]));
    let id_api = listed[0]["id"].as_str().unwrap().to_string();
    let id_cli = listed[1]["id"].as_str().unwrap().to_string();
    let (status, one) = app.get(&format!("/v1/deliveries/{id_api}")).await;
    assert_eq!(status, 200);
    let log = one["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["outcome"], "failed");
    assert!(log[0]["latency_ms"].is_i64());
    assert!(
        log[0]["response_snippet"]
            .as_str()
            .unwrap()
            .starts_with("scripted 4"),
        "{one}"
    );

    // visible by CLI
    let cli = |args: &[&str]| {
        let o = Command::new(enricher_bin())
            .args(args)
            .current_dir(app.db.dir.path())
            .env("DATABASE_URL", &app.db.url)
            .env("ENRICHER_DEFAULT_PROVIDER", "stub")
            .env("ENRICHER_PATHS__PROMPTS_DIR", root().join("prompts"))
            .env("ENRICHER_PATHS__MODELS_DIR", root().join("models"))
            .env_remove("RUST_LOG")
            .output()
            .expect("run enricher");
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{args:?}: {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let out = cli(&["deliveries", "list", "--status", "dead", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 2);
    let out = cli(&["deliveries", "show", &id_cli]);
    assert!(out.contains("dead") && out.contains("failed"), "{out}");
    let out = cli(&["webhooks", "list"]);
    assert!(out.contains("dead=2") && !out.contains(SECRET), "{out}");

    // replayable, by API and by CLI; the fixed receiver gets them with the same keys
    let (status, body) = app
        .post_json(&format!("/v1/deliveries/{id_api}/replay"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let out = cli(&["deliveries", "replay", &id_cli]);
    assert!(out.contains("replayed"), "{out}");
    let got = receiver
        .wait_until(Duration::from_secs(30), "replays", |r| {
            r.iter().filter(|x| x.ok()).count() >= 2
        })
        .await;
    let ok_keys: HashSet<&str> = got
        .iter()
        .filter(|r| r.ok())
        .map(|r| r.key.as_str())
        .collect();
    assert_eq!(ok_keys, HashSet::from([id_api.as_str(), id_cli.as_str()]));
    wait_deliveries(&app, Duration::from_secs(10), "delivered", all_delivered(2)).await;
    // only dead deliveries can be replayed
    let (status, _) = app
        .post_json(&format!("/v1/deliveries/{id_api}/replay"), &json!({}))
        .await;
    assert_eq!(status, 409);
}

async fn feed_pages_concurrent_approvals_without_gaps_or_duplicates(backend: Backend) {
    let app = Arc::new(TestApp::spawn(backend, fast).await);
    let consumer = app.token(&[Role::Consumer]).await;
    let drafts = ready_drafts(&app, 60, "seo,amazon").await;
    let total = drafts.len();
    assert!(total >= 100, "{total} drafts ready");
    let done = Arc::new(AtomicBool::new(false));
    let mut approvers = Vec::new();
    for chunk in drafts.chunks(total.div_ceil(4)) {
        let ids: Vec<String> = chunk
            .iter()
            .map(|d| d["id"].as_str().unwrap().to_string())
            .collect();
        let app = app.clone();
        approvers.push(tokio::spawn(async move {
            for id in ids {
                approve(&app, &id).await;
            }
        }));
    }
    let pager = {
        let app = app.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut cursor = String::new();
            let mut seen: Vec<(i64, String)> = Vec::new();
            let mut pages = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let (status, page) = app
                    .call(
                        "GET",
                        &format!("/v1/feed?cursor={cursor}&limit=7"),
                        Some(&consumer),
                        None,
                    )
                    .await;
                assert_eq!(status, 200, "{page}");
                pages += 1;
                let events = page["events"].as_array().unwrap();
                for e in events {
                    seen.push((
                        e["sequence"].as_i64().unwrap(),
                        e["event_id"].as_str().unwrap().to_string(),
                    ));
                }
                cursor = page["next_cursor"].as_str().unwrap().to_string();
                if events.is_empty() && finished {
                    return (seen, pages);
                }
            }
        })
    };
    for a in approvers {
        a.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (seen, pages) = pager.await.unwrap();
    let ids: HashSet<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), seen.len(), "no duplicates");
    assert_eq!(seen.len(), total, "no gaps: every approval seen");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "positions only grow"
    );
    assert_eq!(seen.last().unwrap().0, total as i64, "positions are dense");
    eprintln!("[{backend:?}] {total} concurrent approvals paged in {pages} pages");
    // a consumer that starts over sees the same sequence
    let (status, page) = app
        .call(
            "GET",
            "/v1/feed?limit=1000",
            Some(&app.token(&[Role::Consumer]).await),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let again: Vec<(i64, String)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["sequence"].as_i64().unwrap(),
                e["event_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(again, seen);
    assert_eq!(page["has_more"], false);
}

/// The case a plain sequence gets wrong: approval A takes its feed position, B comes later
/// but would commit first. B must wait for A, so a reader never sees B's position while A's
/// is still invisible.
async fn feed_positions_are_commit_order(backend: Backend) {
    let app = Arc::new(TestApp::spawn(backend, fast).await);
    let drafts = ready_drafts(&app, 2, "seo").await;
    let consumer = app.token(&[Role::Consumer]).await;
    let a = store::drafts::get(app.db(), drafts[0]["id"].as_str().unwrap())
        .await
        .unwrap();
    // A: an approval transaction that has written its event and not yet committed
    let mut tx = app.db().begin().await.unwrap();
    let content = store::approved::insert_version(
        &mut tx,
        &store::approved::NewVersion {
            product_id: &a.product_id,
            channel: &a.channel,
            draft_id: &a.id,
            fields: &a.fields,
            generated_fields: &a.fields,
            provenance: &a.provenance,
            approved_by: "slow",
        },
    )
    .await
    .unwrap();
    let ev_a = store::outbox::record_approval(&mut tx, &content)
        .await
        .unwrap();
    assert_eq!(ev_a.seq, 1);
    // B: a whole approval, started after A took its position
    let b = {
        let app = app.clone();
        let id = drafts[1]["id"].as_str().unwrap().to_string();
        tokio::spawn(async move { approve(&app, &id).await })
    };
    // B cannot commit while A is open (it waits for the feed lock / the write lock)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "B committed ahead of A");
    // (read the store directly: on SQLite, authenticating an API call writes, and A holds
    // the write lock)
    let visible = store::outbox::feed(app.db(), 0, 10, None).await.unwrap();
    assert!(visible.is_empty(), "nothing visible yet: {visible:?}");
    tx.commit().await.unwrap();
    let b = tokio::time::timeout(Duration::from_secs(30), b)
        .await
        .expect("B goes on once A commits")
        .unwrap();
    let (_, page) = app.call("GET", "/v1/feed", Some(&consumer), None).await;
    let seen: Vec<(i64, String)> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["sequence"].as_i64().unwrap(),
                e["draft_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(seen, vec![(1, a.id.clone()), (2, b.draft_id.clone())]);
}

/// Several delivery workers (as several processes would) claim from one queue: no delivery
/// is sent twice, and versions still go in order.
async fn many_workers_share_the_queue(backend: Backend) {
    let receiver = Receiver::start(SECRET).await;
    receiver.script([Reply::status(500), Reply::status(503), Reply::status(500)]);
    let app = TestApp::spawn(backend, |s| {
        fast(s);
        s.delivery.enabled = false;
        s.delivery.concurrency = 4;
    })
    .await;
    subscribe(&app, &receiver.url(), None).await;
    let r1 = ready_drafts(&app, 40, "seo").await;
    let r2 = ready_drafts(&app, 40, "seo").await;
    let both: HashSet<&str> = r1
        .iter()
        .map(|d| d["product_id"].as_str().unwrap())
        .collect();
    let mut n = 0;
    for d in r1.iter().chain(r2.iter()) {
        if both.contains(d["product_id"].as_str().unwrap()) {
            approve(&app, d["id"].as_str().unwrap()).await;
            n += 1;
        }
    }
    let token = tokio_util::sync::CancellationToken::new();
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let w = DeliveryWorker::new(
                app.db().clone(),
                &app.app.settings.delivery,
                &format!("w{i}"),
            )
            .unwrap();
            tokio::spawn(w.run(token.clone()))
        })
        .collect();
    let t0 = Instant::now();
    receiver
        .wait_until(Duration::from_secs(60), "every event", |r| {
            r.iter().filter(|x| x.ok()).count() >= n
        })
        .await;
    wait_deliveries(&app, Duration::from_secs(30), "recorded", all_delivered(n)).await;
    let took = t0.elapsed();
    token.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let got = receiver.received();
    assert_eq!(
        got.len(),
        n + 3,
        "each delivery sent once, plus the 3 scripted failures"
    );
    let keys: HashSet<&str> = got
        .iter()
        .filter(|r| r.ok())
        .map(|r| r.key.as_str())
        .collect();
    assert_eq!(keys.len(), n);
    let delivered = assert_version_order(&got);
    assert!(delivered.values().all(|v| *v == 2));
    eprintln!("[{backend:?}] 4 workers delivered {n} events in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let receiver = Receiver::start(SECRET).await;
    receiver.script([Reply::Status {
        code: 429,
        retry_after: Some("1".into()),
    }]);
    let app = TestApp::spawn(Backend::Sqlite, fast).await;
    subscribe(&app, &receiver.url(), None).await;
    let drafts = ready_drafts(&app, 1, "seo").await;
    approve(&app, drafts[0]["id"].as_str().unwrap()).await;
    let got = receiver
        .wait_until(Duration::from_secs(30), "the retry", |r| {
            r.iter().any(|x| x.ok())
        })
        .await;
    assert_eq!(got.len(), 2);
    let gap = got[1].at.duration_since(got[0].at);
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After: 1 is honoured (backoff alone is 20 ms): {gap:?}"
    );
    assert_eq!(got[0].attempt_header.as_deref(), Some("1"));
    assert_eq!(got[1].attempt_header.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_runs_out_into_the_dead_letters() {
    let receiver = Receiver::start(SECRET).await;
    receiver.set_default(Reply::status(503));
    let app = TestApp::spawn(Backend::Sqlite, |s| {
        fast(s);
        s.delivery.retry_budget_s = 1;
    })
    .await;
    subscribe(&app, &receiver.url(), None).await;
    let drafts = ready_drafts(&app, 1, "seo").await;
    approve(&app, drafts[0]["id"].as_str().unwrap()).await;
    let l = wait_deliveries(&app, Duration::from_secs(30), "dead", |l| {
        l.len() == 1 && l[0].status == store::deliveries::DeliveryStatus::Dead
    })
    .await;
    assert!(
        l[0].attempts >= 3,
        "retried until the budget ran out: {l:?}"
    );
    assert!(
        l[0].last_error.as_deref().unwrap().contains("retry budget"),
        "{l:?}"
    );
    assert_eq!(receiver.received().len() as i64, l[0].attempts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_are_checked_against_ssrf_at_creation() {
    let receiver = Receiver::start(SECRET).await;
    let app = TestApp::spawn(Backend::Sqlite, fast).await;
    for url in [
        "http://10.0.0.1/hook",
        "http://192.168.1.10/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00::1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1/hook",
        "not a url",
    ] {
        let (status, body) = app
            .post_json("/v1/webhooks", &json!({"url": url, "secret": SECRET}))
            .await;
        assert_eq!(status, 422, "{url}: {body}");
        assert_eq!(body["error"]["field"], "url", "{url}: {body}");
    }
    let (status, body) = app
        .post_json(
            "/v1/webhooks",
            &json!({"url": receiver.url(), "secret": "short"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "secret");
    let (status, body) = app
        .post_json(
            "/v1/webhooks",
            &json!({"url": receiver.url(), "event_types": ["content.deleted"]}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    // a generated secret when none is given
    let (status, body) = app
        .post_json("/v1/webhooks", &json!({"url": receiver.url()}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(body["secret"].as_str().unwrap().starts_with("whsec_"));
    let generated = body["id"].as_str().unwrap().to_string();
    let (status, _) = app
        .call(
            "DELETE",
            &format!("/v1/webhooks/{generated}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(status, 200);

    // with loopback closed, creation refuses a name that resolves to loopback
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    let mut closed = app.app.settings.delivery.clone();
    closed.allow_loopback = false;
    let err = enricher::delivery::webhooks::create(
        app.db(),
        &app.app.channels,
        &closed,
        &enricher::delivery::webhooks::CreateSubscription {
            url: url.clone(),
            ..Default::default()
        },
        "test",
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_are_checked_again_at_send_time() {
    let receiver = Receiver::start(SECRET).await;
    let app = TestApp::spawn(Backend::Sqlite, |s| {
        fast(s);
        s.delivery.enabled = false;
    })
    .await;
    // allowed when created (loopback is allowed by default) ...
    let url = format!("http://localhost:{}/hook", receiver.addr.port());
    subscribe(&app, &url, None).await;
    let drafts = ready_drafts(&app, 1, "seo").await;
    approve(&app, drafts[0]["id"].as_str().unwrap()).await;
    // ... but the sender's policy now forbids loopback: refused, dead-lettered, nothing sent
    let mut closed = app.app.settings.delivery.clone();
    closed.allow_loopback = false;
    let worker = DeliveryWorker::new(app.db().clone(), &closed, "closed").unwrap();
    assert_eq!(worker.run_once().await.unwrap(), 1);
    let l = wait_deliveries(&app, Duration::from_secs(5), "dead", |l| {
        l.len() == 1 && l[0].status == store::deliveries::DeliveryStatus::Dead
    })
    .await;
    let err = l[0].last_error.clone().unwrap_or_default();
    assert!(
        err.contains("destination refused") && err.contains("loopback"),
        "{err}"
    );
    assert!(receiver.received().is_empty());
    // replayed with the default policy, it goes out
    enricher::delivery::webhooks::replay(app.db(), &l[0].id, "test")
        .await
        .unwrap();
    let open = DeliveryWorker::new(app.db().clone(), &app.app.settings.delivery, "open").unwrap();
    assert_eq!(open.run_once().await.unwrap(), 1);
    assert_eq!(receiver.received().len(), 1);
    assert!(receiver.received()[0].ok() && receiver.received()[0].signature_ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_routes_check_roles() {
    let app = TestApp::spawn(Backend::Sqlite, fast).await;
    let consumer = app.token(&[Role::Consumer]).await;
    let reviewer = app.token(&[Role::Reviewer]).await;
    let submitter = app.token(&[Role::Submitter]).await;
    let (s, _) = app.call("GET", "/v1/feed", None, None).await;
    assert_eq!(s, 401);
    let (s, body) = app.call("GET", "/v1/feed", Some(&consumer), None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["next_cursor"], "0");
    assert_eq!(body["events"], json!([]));
    for t in [&reviewer, &submitter] {
        let (s, _) = app.call("GET", "/v1/feed", Some(t), None).await;
        assert_eq!(s, 403);
    }
    let (s, _) = app
        .call("GET", "/v1/feed?cursor=abc", Some(&consumer), None)
        .await;
    assert_eq!(s, 422);
    let (s, _) = app
        .call("GET", "/v1/feed?limit=5000", Some(&consumer), None)
        .await;
    assert_eq!(s, 422);
    let body = json!({"url": "http://127.0.0.1:9/hook", "secret": SECRET});
    for t in [&consumer, &reviewer, &submitter] {
        for (m, p, b) in [
            ("POST", "/v1/webhooks", Some(&body)),
            ("GET", "/v1/webhooks", None),
            ("GET", "/v1/webhooks/x", None),
            ("DELETE", "/v1/webhooks/x", None),
            ("GET", "/v1/deliveries", None),
            ("GET", "/v1/deliveries/x", None),
            ("POST", "/v1/deliveries/x/replay", None),
            ("POST", "/v1/deliveries/replay", None),
        ] {
            let (s, _) = app.call(m, p, Some(t), b).await;
            assert_eq!(s, 403, "{m} {p}");
            let (s, _) = app.call(m, p, None, b).await;
            assert_eq!(s, 401, "{m} {p}");
        }
    }
    let (s, _) = app
        .call("POST", "/v1/webhooks", Some(&app.admin_token), Some(&body))
        .await;
    assert_eq!(s, 201);
    let (s, _) = app
        .call("GET", "/v1/deliveries/nope", Some(&app.admin_token), None)
        .await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_subscription_cancels_its_deliveries() {
    let addr = reserve_addr(); // nothing listens: deliveries stay pending
    let app = TestApp::spawn(Backend::Sqlite, |s| {
        fast(s);
        s.delivery.backoff_base_ms = 60_000;
    })
    .await;
    let id = subscribe(&app, &format!("http://{addr}/hook"), None).await;
    let drafts = ready_drafts(&app, 2, "seo").await;
    for d in &drafts {
        approve(&app, d["id"].as_str().unwrap()).await;
    }
    let (s, body) = app
        .call(
            "DELETE",
            &format!("/v1/webhooks/{id}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["cancelled_deliveries"], drafts.len());
    let (_, list) = app.get(&format!("/v1/deliveries?subscription={id}")).await;
    assert!(list["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["status"] == "cancelled"));
    let (_, subs) = app.get("/v1/webhooks").await;
    assert_eq!(subs["webhooks"], json!([]));
    let (s, _) = app
        .call(
            "DELETE",
            &format!("/v1/webhooks/{id}"),
            Some(&app.admin_token),
            None,
        )
        .await;
    assert_eq!(s, 409);
    // a new approval does not go to a removed subscription
    let more = ready_drafts(&app, 3, "amazon").await;
    approve(&app, more[0]["id"].as_str().unwrap()).await;
    let (_, list) = app.get(&format!("/v1/deliveries?subscription={id}")).await;
    assert_eq!(list["deliveries"].as_array().unwrap().len(), drafts.len());
    // and a worker run finds nothing to send
    let w = DeliveryWorker::new(app.db().clone(), &app.app.settings.delivery, "t").unwrap();
    assert_eq!(w.run_once().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_filter_approved_content_by_channel_batch_and_since() {
    let app = TestApp::spawn(Backend::Sqlite, |s| {
        fast(s);
        s.delivery.enabled = false;
    })
    .await;
    let first = ready_drafts(&app, 3, "seo,amazon").await;
    let batch1 = first[0]["batch_id"].as_str().unwrap().to_string();
    for d in &first {
        approve(&app, d["id"].as_str().unwrap()).await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let since = store::now_ms();
    let second = ready_drafts(&app, 1, "amazon").await;
    let batch2 = second[0]["batch_id"].as_str().unwrap().to_string();
    let newer = approve(&app, second[0]["id"].as_str().unwrap()).await;
    assert_eq!(newer.version, 2);

    let lines = |text: &str| -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // one line per (product, channel): the current version
    let (s, all) = app.get_text("/v1/export?format=jsonl").await;
    assert_eq!(s, 200);
    let all = lines(&all);
    assert_eq!(all.len(), first.len());
    let pairs: HashSet<(String, String)> = all
        .iter()
        .map(|l| (l["product_id"].to_string(), l["channel"].to_string()))
        .collect();
    assert_eq!(pairs.len(), all.len());
    let (_, recent) = app.get_text(&format!("/v1/export?since={since}")).await;
    let recent = lines(&recent);
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0]["version"], 2);
    let (_, b2) = app.get_text(&format!("/v1/export?batch={batch2}")).await;
    assert_eq!(lines(&b2).len(), 1);
    let (_, b1) = app
        .get_text(&format!("/v1/export?batch={batch1}&channel=seo"))
        .await;
    let b1 = lines(&b1);
    assert!(!b1.is_empty() && b1.iter().all(|l| l["channel"] == "seo"));
    // CSV: bullets as separate columns
    let (_, csv) = app
        .get_text(&format!("/v1/export?format=csv&since={since}"))
        .await;
    let mut rows = csv::Reader::from_reader(csv.as_bytes());
    let header = rows.headers().unwrap().clone();
    let rec = rows.records().next().unwrap().unwrap();
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let bullets = match &newer.fields["bullets"] {
        enricher::checks::FieldValue::List(items) => items.clone(),
        other => panic!("bullets: {other:?}"),
    };
    assert_eq!(&rec[col("bullets_1")], bullets[0].as_str());
    assert_eq!(&rec[col("bullets_2")], bullets[1].as_str());
    assert_eq!(&rec[col("version")], "2");
}
