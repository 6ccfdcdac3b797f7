//! Benchmarks behind `enricher bench ...`: they print figures; nothing here asserts a speed.
//!
//! - `queue`: end-to-end jobs/s (submit -> draft stored) with the instant `stub` provider
//!   behind the real provider interface, on SQLite or PostgreSQL, with N worker processes
//!   (this binary's `worker` command), and the CPU time the workers spent per job.
//! - `pipeline`: CPU per job of the pipeline alone (render, parse, check) in this process.
//! - `remote`: the `openai` provider against a loopback OpenAI-compatible server that answers
//!   after a fixed latency, at several concurrency levels, as a fraction of the limit
//!   (concurrency / latency).

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    config::{ProviderKind, ProviderSettings, Settings},
    intake,
    llm::{GenerateRequest, Provider},
    spec,
    startup::App,
    store::{Db, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn setup<E: std::fmt::Display>(e: E) -> BenchError {
    BenchError::Setup(e.to_string())
}

const COLORS: [&str; 3] = ["Black", "White", "Blue"];

/// Synthetic but realistic specs: `n` products with distinct ids and values.
pub fn synthetic_specs(n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let line = serde_json::json!({
            "id": format!("bench-{i:06}"),
            "brand": "Northwind",
            "category": "Headphones",
            "attributes": {
                "Product Type": "Wireless Over-Ear Headphones",
                "Battery Life": format!("{} hours", 20 + i % 30),
                "Connectivity": "Bluetooth 5.3",
                "Weight": format!("{} g", 200 + i % 90),
                "Color": COLORS[i % 3],
                "Model Number": format!("NW-{:04}", i % 10_000),
            }
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// One `bench queue` result.
#[derive(Debug, Clone, Serialize)]
pub struct QueueFigure {
    pub backend: String,
    pub workers: usize,
    pub jobs: usize,
    pub seconds: f64,
    pub jobs_per_second: f64,
    /// CPU time (user + system) of the worker processes per job, in milliseconds.
    pub worker_cpu_ms_per_job: f64,
}

/// A fresh database for one benchmark run.
struct BenchDb {
    url: String,
    _dir: Option<std::path::PathBuf>,
    pg: Option<(String, String)>,
}

impl BenchDb {
    async fn new(backend: &str, pg_admin: &str) -> Result<Self, BenchError> {
        match backend {
            "sqlite" => {
                let dir =
                    std::env::temp_dir().join(format!("enricher-bench-{}", ulid::Ulid::new()));
                std::fs::create_dir_all(&dir).map_err(setup)?;
                Ok(Self {
                    url: format!("sqlite://{}", dir.join("bench.db").display()),
                    _dir: Some(dir),
                    pg: None,
                })
            }
            "postgres" => {
                let name = format!(
                    "enricher_bench_{}",
                    ulid::Ulid::new().to_string().to_lowercase()
                );
                let pool = sqlx::PgPool::connect(&format!("{pg_admin}/postgres"))
                    .await
                    .map_err(setup)?;
                sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
                    .execute(&pool)
                    .await
                    .map_err(setup)?;
                pool.close().await;
                Ok(Self {
                    url: format!("{pg_admin}/{name}"),
                    _dir: None,
                    pg: Some((pg_admin.to_string(), name)),
                })
            }
            other => Err(BenchError::Setup(format!(
                "unknown backend `{other}` (sqlite or postgres)"
            ))),
        }
    }

    async fn drop_db(self) {
        if let Some((admin, name)) = &self.pg {
            if let Ok(pool) = sqlx::PgPool::connect(&format!("{admin}/postgres")).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "drop database if exists {name} with (force)"
                )))
                .execute(&pool)
                .await;
                pool.close().await;
            }
        }
        if let Some(dir) = &self._dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn bench_settings(base: &Settings, url: &str) -> Settings {
    let mut s = base.clone();
    s.database_url = url.to_string();
    s.default_provider = "stub".into();
    s.routing.clear();
    s.repair.max_prompts = 0;
    s
}

fn spawn_worker(
    url: &str,
    base: &Settings,
    concurrency: usize,
    batch_size: usize,
) -> Result<Child, BenchError> {
    let exe = std::env::current_exe().map_err(setup)?;
    Command::new(exe)
        .arg("worker")
        .env("DATABASE_URL", url)
        .env("ENRICHER_DEFAULT_PROVIDER", "stub")
        .env("ENRICHER_REPAIR__MAX_PROMPTS", "0")
        .env("ENRICHER_PATHS__PROMPTS_DIR", &base.paths.prompts_dir)
        .env("ENRICHER_PATHS__MODELS_DIR", &base.paths.models_dir)
        .env("ENRICHER_WORKER__CONCURRENCY", concurrency.to_string())
        .env("ENRICHER_WORKER__BATCH_SIZE", batch_size.max(1).to_string())
        .env("ENRICHER_WORKER__POLL_INTERVAL_MS", "20")
        .env("ENRICHER_LOG__FILTER", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(setup)
}

/// CPU time (user + system) of this process's waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

async fn finished(db: &Db) -> Result<i64, BenchError> {
    Ok(crate::on_db!(db, p => sqlx::query_scalar::<_, i64>(
        "select count(*) from tasks where status in ('succeeded', 'failed')"
    )
    .fetch_one(p)
    .await)
    .map_err(StoreError::from)?)
}

/// Runs `jobs` tasks through `workers` worker processes on a fresh database.
pub async fn queue(
    base: &Settings,
    backend: &str,
    workers: usize,
    jobs: usize,
    concurrency: usize,
    batch_size: usize,
    pg_admin: &str,
) -> Result<QueueFigure, BenchError> {
    let db = BenchDb::new(backend, pg_admin).await?;
    let settings = bench_settings(base, &db.url);
    let app = App::init(settings.clone()).await.map_err(setup)?;
    // Workers start first (they load nothing for the stub), so the clock measures the queue.
    let cpu_before = children_cpu();
    let mut children = Vec::new();
    for _ in 0..workers {
        children.push(spawn_worker(&db.url, &settings, concurrency, batch_size)?);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let specs = synthetic_specs(jobs);
    let started = Instant::now();
    intake::submit_bytes(
        &app.db,
        &app.channels,
        &app.settings,
        &specs,
        &["seo".to_string()],
        "bench",
        None,
    )
    .await
    .map_err(setup)?;
    let deadline = Duration::from_secs(600);
    loop {
        if finished(&app.db).await? >= jobs as i64 {
            break;
        }
        if started.elapsed() > deadline {
            return Err(BenchError::Setup(
                "the benchmark did not finish in 10 minutes".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    for c in &mut children {
        // SIGTERM: a graceful stop, so the CPU accounting includes the whole run
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    for mut c in children {
        let _ = c.wait();
    }
    let cpu = children_cpu().saturating_sub(cpu_before);
    app.db.close().await;
    db.drop_db().await;
    Ok(QueueFigure {
        backend: backend.to_string(),
        workers,
        jobs,
        seconds,
        jobs_per_second: jobs as f64 / seconds,
        worker_cpu_ms_per_job: cpu.as_secs_f64() * 1000.0 / jobs as f64,
    })
}

/// CPU per job of the pipeline alone (render, stub generation, parse, check), in-process.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineFigure {
    pub jobs: usize,
    pub channels: Vec<String>,
    pub cpu_ms_per_job: f64,
    pub wall_ms_per_job: f64,
}

fn process_cpu() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

pub async fn pipeline(base: &Settings, jobs: usize) -> Result<PipelineFigure, BenchError> {
    let dir = std::env::temp_dir().join(format!("enricher-bench-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).map_err(setup)?;
    let settings = bench_settings(base, &format!("sqlite://{}", dir.join("b.db").display()));
    let app = App::init(settings).await.map_err(setup)?;
    let pipeline = app.pipeline().await.map_err(setup)?;
    let specs: Vec<_> = spec::parse_submission(&synthetic_specs(jobs), &app.settings.limits)
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .collect();
    let channels: Vec<String> = app.channels.names().map(str::to_string).collect();
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let mut n = 0usize;
    for s in &specs {
        let ch = &channels[n % channels.len()];
        pipeline.enrich(s, ch, None).await.map_err(setup)?;
        n += 1;
    }
    let cpu = process_cpu().saturating_sub(cpu0);
    let wall = t0.elapsed();
    app.db.close().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(PipelineFigure {
        jobs: n,
        channels,
        cpu_ms_per_job: cpu.as_secs_f64() * 1000.0 / n.max(1) as f64,
        wall_ms_per_job: wall.as_secs_f64() * 1000.0 / n.max(1) as f64,
    })
}

/// One `bench remote` result.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteFigure {
    pub concurrency: usize,
    pub latency_ms: u64,
    pub requests: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    /// concurrency / latency: the most any client can get from such a server.
    pub limit_per_second: f64,
    pub fraction_of_limit: f64,
}

/// A loopback OpenAI-compatible server that answers every chat completion after `latency`.
pub async fn fixed_latency_server(latency: Duration) -> Result<std::net::SocketAddr, BenchError> {
    use axum::{routing::post, Json, Router};
    let app = Router::new().route(
        "/v1/chat/completions",
        post(move |Json(req): Json<serde_json::Value>| async move {
            tokio::time::sleep(latency).await;
            Json(serde_json::json!({
                "id": "bench", "object": "chat.completion", "created": 0, "model": req["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                    "content": "{\"title\": \"Northwind Wireless Over-Ear Headphones, 40 hours\", \"meta_description\": \"Northwind wireless over-ear headphones with Bluetooth 5.3 and 40 hours of battery life.\"}"}}],
                "usage": {"prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240}
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(setup)?;
    let addr = listener.local_addr().map_err(setup)?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

pub async fn remote(
    concurrency: usize,
    latency_ms: u64,
    rounds: usize,
) -> Result<RemoteFigure, BenchError> {
    let latency = Duration::from_millis(latency_ms);
    let addr = fixed_latency_server(latency).await?;
    let ps = ProviderSettings {
        kind: ProviderKind::Openai,
        model: "bench".into(),
        base_url: Some(format!("http://{addr}/v1")),
        api_key: None,
        timeout_s: 30,
        concurrency,
        max_retries: 0,
        structured_output: true,
        sampling: None,
        threads: 0,
        prefix_cache: true,
        prompt_memory_mib: crate::llm::local::prefix::REMEMBERED_BYTES >> 20,
        simulated_latency_ms: 0,
        rate_limit: Default::default(),
    };
    let provider: Arc<dyn Provider> =
        Arc::new(crate::llm::openai::OpenAiProvider::new("bench", &ps).map_err(setup)?);
    let requests = concurrency * rounds;
    let req = GenerateRequest {
        system: "You write product copy.".into(),
        user: "Product: Northwind headphones".into(),
        sampling: Default::default(),
        schema: None,
        allowed_numbers: None,
    };
    // warm-up: connections
    let warm: Vec<_> = (0..concurrency)
        .map(|_| provider.generate(req.clone()))
        .collect();
    futures::future::join_all(warm).await;
    let started = Instant::now();
    let calls: Vec<_> = (0..requests)
        .map(|_| provider.generate(req.clone()))
        .collect();
    let results = futures::future::join_all(calls).await;
    let seconds = started.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    if failed > 0 {
        return Err(BenchError::Setup(format!(
            "{failed} of {requests} requests failed"
        )));
    }
    let rps = requests as f64 / seconds;
    let limit = concurrency as f64 / latency.as_secs_f64();
    Ok(RemoteFigure {
        concurrency,
        latency_ms,
        requests,
        seconds,
        requests_per_second: rps,
        limit_per_second: limit,
        fraction_of_limit: rps / limit,
    })
}

/// One `bench local` result (medians over the runs).
#[derive(Debug, Clone, Serialize)]
pub struct LocalFigure {
    pub model: String,
    pub model_file_mib: f64,
    pub runs: usize,
    pub prompt_tokens: usize,
    /// Mean tokens generated per run (a run stops early at end of turn).
    pub gen_tokens: f64,
    pub prompt_tokens_per_s: f64,
    pub gen_tokens_per_s: f64,
    pub time_to_first_token_ms: f64,
    /// Requests sent at once; with more than one, `batch_gen_tokens_per_s` is the
    /// aggregate rate (prompts included in the time) and `batch_speedup` the time of the
    /// same requests one after another divided by their time together.
    pub batch: usize,
    pub batch_gen_tokens_per_s: Option<f64>,
    pub batch_speedup: Option<f64>,
    pub peak_rss_mib: f64,
    pub load_seconds: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Peak resident memory of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// A user prompt of about `n` tokens (chat template included): product data and a task.
fn prompt_of(
    provider: &crate::llm::local::LocalProvider,
    system: &str,
    n: usize,
) -> Result<String, BenchError> {
    let specs = String::from_utf8_lossy(&synthetic_specs(64)).to_string();
    let words: Vec<&str> = specs.split_whitespace().collect();
    let task = "Write a detailed product description for the product below.\n\n";
    let build = |k: usize| format!("{task}{}", words[..k.min(words.len())].join(" "));
    let len = |k: usize| {
        provider
            .prompt_ids(system, &build(k))
            .map(|v| v.len())
            .unwrap_or(0)
    };
    let (mut lo, mut hi) = (0usize, words.len());
    if len(hi) < n {
        return Err(BenchError::Setup(format!(
            "cannot build a {n}-token prompt"
        )));
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if len(mid) < n {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(build(lo))
}

#[allow(clippy::too_many_arguments)]
pub async fn local(
    base: &Settings,
    model: Option<&str>,
    prompt_tokens: usize,
    gen_tokens: usize,
    runs: usize,
    batch: usize,
    dump_prompt: Option<&std::path::Path>,
) -> Result<LocalFigure, BenchError> {
    let mut ps = base
        .providers
        .values()
        .find(|p| p.kind == ProviderKind::Local)
        .cloned()
        .ok_or_else(|| BenchError::Setup("no local provider configured".into()))?;
    if let Some(m) = model {
        ps.model = m.to_string();
    }
    // every run repeats the same prompt: with the prefix cache on it would be prefilled once
    ps.prefix_cache = false;
    // the runner decodes up to `concurrency` requests together
    ps.concurrency = batch.max(1);
    let provider = crate::llm::local::LocalProvider::load("bench", &ps, &base.paths.models_dir)
        .await
        .map_err(setup)?;
    let system = "You write factual product copy.";
    let user = prompt_of(&provider, system, prompt_tokens)?;
    let ids = provider.prompt_ids(system, &user).map_err(setup)?;
    if let Some(path) = dump_prompt {
        std::fs::write(
            path,
            serde_json::json!({"system": system, "user": user, "ids": ids, "gen_tokens": gen_tokens}).to_string(),
        )
        .map_err(setup)?;
    }
    let req = GenerateRequest {
        system: system.into(),
        user: user.clone(),
        sampling: crate::llm::Sampling {
            temperature: 0.0,
            max_new_tokens: gen_tokens,
            ..Default::default()
        },
        schema: None,
        allowed_numbers: None,
    };
    // one warm-up run: page the weights in
    provider.generate_timed(req.clone()).await.map_err(setup)?;
    let (mut ptps, mut gtps, mut ttft, mut gens) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs.max(1) {
        let (g, t) = provider.generate_timed(req.clone()).await.map_err(setup)?;
        ptps.push(t.prompt_tokens_per_s(&g));
        gtps.push(t.completion_tokens_per_s(&g));
        ttft.push((t.tokenize + t.prefill).as_secs_f64() * 1000.0);
        gens.push(f64::from(g.completion_tokens));
    }
    let (batch_gen, batch_speedup) = if batch > 1 {
        let started = Instant::now();
        for _ in 0..batch {
            provider.generate(req.clone()).await.map_err(setup)?;
        }
        let one_by_one = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let calls: Vec<_> = (0..batch).map(|_| provider.generate(req.clone())).collect();
        let results = futures::future::join_all(calls).await;
        let together = started.elapsed().as_secs_f64();
        let mut tokens = 0u32;
        for r in results {
            tokens += r.map_err(setup)?.completion_tokens;
        }
        (
            Some(f64::from(tokens) / together),
            Some(one_by_one / together.max(1e-9)),
        )
    } else {
        (None, None)
    };
    let file_mib = std::fs::metadata(provider.model_path())
        .map(|m| m.len() as f64 / 1048576.0)
        .unwrap_or(0.0);
    Ok(LocalFigure {
        model: ps.model,
        model_file_mib: file_mib,
        runs: runs.max(1),
        prompt_tokens: ids.len(),
        gen_tokens: gens.iter().sum::<f64>() / gens.len().max(1) as f64,
        prompt_tokens_per_s: median(ptps),
        gen_tokens_per_s: median(gtps),
        time_to_first_token_ms: median(ttft),
        batch,
        batch_gen_tokens_per_s: batch_gen,
        batch_speedup,
        peak_rss_mib: peak_rss_mib(),
        load_seconds: provider.load_time().as_secs_f64(),
    })
}
