//! Fault tolerance with real processes: `kill -9` a worker mid-batch, restart PostgreSQL
//! mid-batch, SIGTERM for a graceful stop. These tests run one at a time (a lock) because
//! restarting the database server affects everything using it.

#[path = "it/support/mod.rs"]
mod support;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use enricher::{config::Settings, intake, on_db, startup::App, store::Db};
use support::{enricher_bin, root, shared_data, test_settings, Backend, TestDb};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn settings(db: &TestDb) -> Settings {
    test_settings(&db.url)
}

/// An `enricher worker` process on `db` with the stub provider taking `latency_ms`.
fn spawn_worker(db: &TestDb, latency_ms: u64, concurrency: usize) -> Child {
    Command::new(enricher_bin())
        .arg("worker")
        .current_dir(db.dir.path())
        .env("DATABASE_URL", &db.url)
        .env("ENRICHER_DEFAULT_PROVIDER", "stub")
        .env(
            "ENRICHER_PROVIDERS__STUB__SIMULATED_LATENCY_MS",
            latency_ms.to_string(),
        )
        .env("ENRICHER_PATHS__PROMPTS_DIR", root().join("prompts"))
        .env("ENRICHER_PATHS__MODELS_DIR", root().join("models"))
        .env("ENRICHER_WORKER__CONCURRENCY", concurrency.to_string())
        .env("ENRICHER_WORKER__POLL_INTERVAL_MS", "50")
        .env("ENRICHER_WORKER__HEARTBEAT_S", "1")
        .env("ENRICHER_WORKER__MISSED_HEARTBEATS", "2")
        .env("ENRICHER_WORKER__TASK_TIMEOUT_S", "20")
        .env("ENRICHER_WORKER__BACKOFF_BASE_MS", "200")
        .env("ENRICHER_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start enricher worker")
}

async fn submit(app: &App, n: usize, channels: &[&str]) -> String {
    let text = std::fs::read_to_string(shared_data("wdc-pave-dev.jsonl")).unwrap();
    let lines: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    let chans: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    let r = intake::submit_bytes(
        &app.db,
        &app.channels,
        &app.settings,
        lines.as_bytes(),
        &chans,
        "faults",
        None,
    )
    .await
    .unwrap();
    r.batch_id
}

async fn count(db: &Db, sql: &str) -> i64 {
    on_db!(db, p => sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_string())).fetch_one(p).await).unwrap_or(-1)
}

async fn wait_for(db: &Db, sql: &str, at_least: i64, limit: Duration) {
    let start = Instant::now();
    loop {
        let n = count(db, sql).await;
        if n >= at_least {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "`{sql}` reached {n}, not {at_least}, in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_exactly_one_draft_per_task(db: &Db, tasks: i64) {
    assert_eq!(
        count(db, "select count(*) from tasks where status = 'succeeded'").await,
        tasks,
        "every task succeeded"
    );
    assert_eq!(
        count(db, "select count(*) from drafts").await,
        tasks,
        "one draft per task"
    );
    assert_eq!(
        count(db, "select count(*) from (select product_id, channel from drafts group by product_id, channel having count(*) > 1) d").await,
        0,
        "no (product, channel) has two drafts"
    );
}

async fn kill_nine_a_worker_mid_batch(backend: Backend) {
    let _g = SERIAL.lock().await;
    let db = TestDb::new(backend).await;
    let app = App::init(settings(&db)).await.unwrap();
    submit(&app, 200, &["seo"]).await;
    let mut a = spawn_worker(&db, 40, 4);
    wait_for(
        &app.db,
        "select count(*) from drafts",
        30,
        Duration::from_secs(60),
    )
    .await;
    a.kill().expect("SIGKILL the worker"); // kill -9
    let _ = a.wait();
    let at_kill = count(&app.db, "select count(*) from drafts").await;
    assert!(
        at_kill < 200,
        "the batch was still running when the worker died ({at_kill})"
    );
    let mut b = spawn_worker(&db, 40, 4);
    wait_for(
        &app.db,
        "select count(*) from tasks where status in ('succeeded', 'failed')",
        200,
        Duration::from_secs(120),
    )
    .await;
    let _ = b.kill();
    let _ = b.wait();
    assert_exactly_one_draft_per_task(&app.db, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_a_worker_mid_batch_sqlite() {
    kill_nine_a_worker_mid_batch(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_a_worker_mid_batch_postgres() {
    kill_nine_a_worker_mid_batch(Backend::Postgres).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_mid_batch_and_workers_finish() {
    let _g = SERIAL.lock().await;
    let db = TestDb::new(Backend::Postgres).await;
    let app = App::init(settings(&db)).await.unwrap();
    submit(&app, 120, &["seo"]).await;
    let mut w = spawn_worker(&db, 40, 4);
    wait_for(
        &app.db,
        "select count(*) from drafts",
        20,
        Duration::from_secs(60),
    )
    .await;
    let cluster = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .expect("a PostgreSQL cluster under /etc/postgresql");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &cluster, "main", "restart"])
        .status()
        .expect("pg_ctlcluster");
    assert!(status.success(), "restarting PostgreSQL");
    // the worker process survives the outage and finishes the batch
    wait_for(
        &app.db,
        "select count(*) from tasks where status in ('succeeded', 'failed')",
        120,
        Duration::from_secs(180),
    )
    .await;
    assert!(
        w.try_wait().unwrap().is_none(),
        "the worker is still running"
    );
    let _ = w.kill();
    let _ = w.wait();
    assert_exactly_one_draft_per_task(&app.db, 120).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_tasks_and_releases_the_rest() {
    let _g = SERIAL.lock().await;
    let db = TestDb::new(Backend::Sqlite).await;
    let app = App::init(settings(&db)).await.unwrap();
    submit(&app, 6, &["seo"]).await;
    let mut a = spawn_worker(&db, 1500, 2);
    wait_for(
        &app.db,
        "select count(*) from tasks where status = 'running'",
        2,
        Duration::from_secs(30),
    )
    .await;
    let term = Command::new("kill")
        .args(["-TERM", &a.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = a.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "worker did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "clean exit: {exit:?}");
    // the two running tasks finished; nothing is left locked by the stopped worker
    assert!(count(&app.db, "select count(*) from drafts").await >= 2);
    assert_eq!(
        count(
            &app.db,
            "select count(*) from tasks where status = 'running'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &app.db,
            "select count(*) from Jobs where status in ('Queued', 'Running')"
        )
        .await,
        0
    );
    // another worker takes the rest at once (no heartbeat timeout to wait for)
    let mut b = spawn_worker(&db, 10, 2);
    wait_for(
        &app.db,
        "select count(*) from tasks where status = 'succeeded'",
        6,
        Duration::from_secs(30),
    )
    .await;
    let _ = b.kill();
    let _ = b.wait();
    assert_exactly_one_draft_per_task(&app.db, 6).await;
}
