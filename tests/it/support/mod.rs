//! Test harness: a real service (HTTP on loopback + queue workers) over a fresh database —
//! a SQLite file in a temporary directory, or a fresh PostgreSQL database on the local server
//! (created per test, dropped after) — and helpers to drive it.

#![allow(dead_code, clippy::field_reassign_with_default)]

pub mod fake_openai;
pub mod webhook_receiver;

use std::{
    path::{Path, PathBuf},
    sync::Once,
    time::{Duration, Instant},
};

use enricher::{
    config::{ProviderKind, ProviderSettings, Settings},
    startup::{self, App, RunOptions, Running},
    store::Db,
};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one test per backend from an async fn taking a `Backend`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            }
        )*
    };
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn shared_data(name: &str) -> PathBuf {
    root().join("../shared/data/products").join(name)
}

/// The first `n` lines of a shared data file.
pub fn shared_lines(name: &str, n: usize) -> String {
    let text =
        std::fs::read_to_string(shared_data(name)).expect("shared test data (../shared/data)");
    text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n"
}

static TRACING: Once = Once::new();

pub fn init_tracing() {
    TRACING.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            enricher::telemetry::init(&enricher::config::LogSettings {
                format: "pretty".into(),
                filter: "info,enricher=debug,sqlx=warn".into(),
            });
        }
    });
}

/// A fresh database for one test; removed when dropped.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pg: Option<(String, String)>,
}

pub fn pg_admin_url() -> String {
    std::env::var("ENRICHER_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}", dir.path().join("enricher.db").display());
                Self {
                    url,
                    backend,
                    dir,
                    pg: None,
                }
            }
            Backend::Postgres => {
                let admin = pg_admin_url();
                let name = format!(
                    "enricher_test_{}",
                    ulid::Ulid::new().to_string().to_lowercase()
                );
                let pool = sqlx::PgPool::connect(&format!("{admin}/postgres"))
                    .await
                    .expect("PostgreSQL at 127.0.0.1:5432 (set ENRICHER_TEST_PG to use another)");
                sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
                    .execute(&pool)
                    .await
                    .expect("create test database");
                pool.close().await;
                Self {
                    url: format!("{admin}/{name}"),
                    backend,
                    dir,
                    pg: Some((admin, name)),
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop is synchronous; use a private runtime on a plain thread.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async move {
                        if let Ok(pool) = sqlx::PgPool::connect(&format!("{admin}/postgres")).await
                        {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                                "drop database if exists {name} with (force)"
                            )))
                            .execute(&pool)
                            .await;
                            pool.close().await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

/// Settings for tests: fast polling and backoff, the stub provider by default.
pub fn test_settings(db_url: &str) -> Settings {
    let mut s = Settings::default();
    s.database_url = db_url.to_string();
    s.paths.prompts_dir = root().join("prompts");
    s.paths.models_dir = root().join("models");
    s.worker.poll_interval_ms = 50;
    s.worker.backoff_base_ms = 200;
    s.worker.backoff_max_ms = 1_000;
    s.worker.max_attempts = 3;
    s.worker.concurrency = 8;
    s.worker.heartbeat_s = 1;
    s.worker.missed_heartbeats = 2;
    s.default_provider = "stub".into();
    s
}

/// An OpenAI-compatible provider pointing at `base_url`.
pub fn remote_provider(base_url: &str) -> ProviderSettings {
    ProviderSettings {
        kind: ProviderKind::Openai,
        model: "fake-model".into(),
        base_url: Some(base_url.to_string()),
        api_key: Some(secrecy::SecretString::from(
            "sk-test-secret-key".to_string(),
        )),
        timeout_s: 2,
        concurrency: 8,
        max_retries: 2,
        structured_output: true,
        sampling: None,
        threads: 0,
        prefix_cache: true,
        prompt_memory_mib: enricher::llm::local::prefix::REMEMBERED_BYTES >> 20,
        simulated_latency_ms: 0,
        rate_limit: Default::default(),
    }
}

/// The service under test.
pub struct TestApp {
    pub app: App,
    pub addr: std::net::SocketAddr,
    pub base: String,
    /// A client that sends the admin token.
    pub http: reqwest::Client,
    pub admin_token: String,
    pub running: Option<Running>,
    pub db: TestDb,
}

impl TestApp {
    /// Starts API + workers over a fresh database with `settings` adjusted by `tweak`.
    pub async fn spawn(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_with(backend, tweak, true).await
    }

    pub async fn spawn_with(
        backend: Backend,
        tweak: impl FnOnce(&mut Settings),
        workers: bool,
    ) -> Self {
        init_tracing();
        let db = TestDb::new(backend).await;
        let mut settings = test_settings(&db.url);
        tweak(&mut settings);
        let app = App::init(settings).await.expect("app init");
        let admin = enricher::auth::create_token(
            &app.db,
            "test-admin",
            &[enricher::auth::Role::Admin],
            "test",
        )
        .await
        .expect("admin token");
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", admin.token).parse().expect("header"),
        );
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client");
        let pipeline = if workers {
            Some(app.pipeline().await.expect("providers"))
        } else {
            None
        };
        let running = startup::start(
            &app,
            RunOptions {
                http: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
                workers: pipeline,
                worker_name: format!("test-{}", ulid::Ulid::new()),
                grace: Duration::from_secs(5),
            },
        )
        .await
        .expect("start");
        let addr = running.http_addr.expect("http addr");
        Self {
            app,
            addr,
            base: format!("http://{addr}"),
            http,
            admin_token: admin.token,
            running: Some(running),
            db,
        }
    }

    /// A new token with `roles`.
    pub async fn token(&self, roles: &[enricher::auth::Role]) -> String {
        enricher::auth::create_token(&self.app.db, "test", roles, "test")
            .await
            .expect("token")
            .token
    }

    /// Sends a request with `token` (or none), returning status and JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub fn db(&self) -> &Db {
        &self.app.db
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_raw(&self, path: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .http
            .put(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    /// Submits JSONL and returns the receipt.
    pub async fn submit_jsonl(&self, jsonl: &str, channels: &str) -> Value {
        let (status, body) = self
            .post_raw(
                &format!("/v1/batches?channels={channels}"),
                "application/x-ndjson",
                jsonl.as_bytes().to_vec(),
            )
            .await;
        assert_eq!(status, 202, "submit: {body}");
        body
    }

    /// Polls the batch until every task is finished (no blind sleeps: a short poll loop).
    pub async fn wait_batch(&self, batch_id: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (status, b) = self.get(&format!("/v1/batches/{batch_id}")).await;
            assert_eq!(status, 200, "{b}");
            if b["done"] == true {
                return b;
            }
            assert!(
                start.elapsed() < limit,
                "batch {batch_id} not done after {limit:?}: {b}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn drafts(&self, query: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/v1/drafts?{query}")).await;
        assert_eq!(status, 200, "{body}");
        body["drafts"].as_array().cloned().unwrap_or_default()
    }
}

/// Path of the built `enricher` binary (cargo builds it for integration tests).
pub fn enricher_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_enricher"))
}
