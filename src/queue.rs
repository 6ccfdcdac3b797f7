//! The job queue: apalis workers over the same database as the app data (apalis-sqlite or
//! apalis-postgres), one job per task (product x channel).
//!
//! Retries: a failed attempt that may succeed later (rate limit, timeout, 5xx, model error)
//! moves the job's `run_at` forward by an exponential backoff with jitter (or the provider's
//! `Retry-After`, when longer) and fails the attempt; apalis re-fetches a failed job only
//! after `run_at`, and at most `max_attempts` times. A failure that cannot succeed later (bad
//! stored spec, unknown channel, rejected request) aborts the job at once. Either way the
//! task row says why, so the API and CLI can show it.

use std::{future::Future, sync::Arc, time::Duration};

use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use rand::Rng;

use crate::{
    config::Settings,
    pipeline::Pipeline,
    store::{
        self,
        batches::EnrichJob,
        drafts::NewDraft,
        jobs::{self, ENRICH_QUEUE},
        Db, StoreError,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("job queue: {0}")]
    Monitor(String),
}

/// What the job handler needs.
#[derive(Clone, Debug)]
pub struct EnrichDeps {
    pub db: Db,
    pub pipeline: Arc<Pipeline>,
    pub settings: Arc<Settings>,
}

/// Why an attempt did not produce a draft.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// Try again later (the job's `run_at` has been moved).
    #[error("{0}")]
    Retry(String),
    /// Do not try again; the task is marked failed.
    #[error("{0}")]
    Abort(String),
}

/// The apalis handler: runs one attempt and maps its outcome to apalis's retry semantics.
async fn handle_enrich(
    job: EnrichJob,
    deps: Data<Arc<EnrichDeps>>,
    attempt: Attempt,
    job_id: TaskId,
) -> Result<(), BoxDynError> {
    let n = attempt.current().max(1) as i64;
    let started = std::time::Instant::now();
    let result = run_attempt(&deps, &job.task_id, &job_id.to_string(), n).await;
    let outcome = match &result {
        Ok(()) => "succeeded",
        Err(AttemptError::Retry(_)) => "retry",
        Err(AttemptError::Abort(_)) => "failed",
    };
    metrics::counter!("enricher_attempts_total", "outcome" => outcome).increment(1);
    metrics::histogram!("enricher_task_duration_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => Ok(()),
        Err(AttemptError::Retry(m)) => Err(m.into()),
        Err(AttemptError::Abort(m)) => Err(AbortError::new(m).into()),
    }
}

/// The retry delay before attempt `attempt + 1`: `base * 2^(attempt-1)`, capped, with up to
/// 25% jitter so that many failing tasks do not come back at the same instant.
pub fn backoff(settings: &Settings, attempt: i64) -> Duration {
    let w = &settings.worker;
    let exp = (attempt.max(1) - 1).min(20) as u32;
    let base = w
        .backoff_base_ms
        .saturating_mul(1u64 << exp)
        .min(w.backoff_max_ms);
    let jitter = rand::thread_rng().gen_range(0..=base / 4);
    Duration::from_millis(base + jitter)
}

/// Runs attempt `attempt` (1-based) of task `task_id`: load, generate, check, store.
/// Idempotent: a task that already has its draft is not run again.
#[tracing::instrument(skip(deps), fields(channel, product_id))]
pub async fn run_attempt(
    deps: &EnrichDeps,
    task_id: &str,
    job_id: &str,
    attempt: i64,
) -> Result<(), AttemptError> {
    let db = &deps.db;
    let (task, spec, budget) = match store::tasks::begin_attempt(db, task_id, attempt).await {
        Ok(Some(t)) => t,
        Ok(None) => return Ok(()), // already finished: a duplicate delivery
        Err(StoreError::NotFound(_)) => {
            return Err(AttemptError::Abort(format!(
                "task {task_id} does not exist"
            )))
        }
        Err(e @ StoreError::Corrupt(_)) => return fail(db, task_id, &e.to_string()).await,
        Err(e) => return Err(AttemptError::Retry(e.to_string())),
    };
    tracing::Span::current().record("channel", task.channel.as_str());
    tracing::Span::current().record("product_id", task.product_id.as_str());
    let max = task.max_attempts;
    let daily = deps.settings.budget.daily_tokens;
    if budget.is_some() || daily.is_some() {
        match crate::limits::over_budget(db, daily, &task.batch_id, budget).await {
            Ok(None) => {}
            Ok(Some(reason)) => {
                // parked, not failed: no attempt is spent; raising the budget resumes it
                tracing::info!(task_id, %reason, "task parked");
                return match store::limits::park(db, task_id, &task.batch_id, &reason).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(AttemptError::Retry(e.to_string())),
                };
            }
            Err(e) => {
                return retry_or_fail(deps, task_id, job_id, attempt, max, &e.to_string(), None)
                    .await
            }
        }
    }
    let timeout = Duration::from_secs(deps.settings.worker.task_timeout_s.max(1));
    let result = tokio::time::timeout(
        timeout,
        deps.pipeline
            .enrich(&spec, &task.channel, task.feedback.as_deref()),
    )
    .await;
    let outcome = match result {
        Err(_) => {
            let msg = format!("attempt timed out after {}s", timeout.as_secs());
            return retry_or_fail(deps, task_id, job_id, attempt, max, &msg, None).await;
        }
        Ok(Err(e)) if e.is_retryable() => {
            let ra = match &e {
                crate::pipeline::PipelineError::Llm(l) => l.retry_after(),
                _ => None,
            };
            return retry_or_fail(deps, task_id, job_id, attempt, max, &e.to_string(), ra).await;
        }
        Ok(Err(e)) => return fail(db, task_id, &e.to_string()).await,
        Ok(Ok(o)) => o,
    };
    let spent = (outcome.provenance.prompt_tokens + outcome.provenance.completion_tokens) as i64;
    let today = crate::limits::today();
    let provenance = serde_json::to_value(&outcome.provenance)
        .map_err(|e| AttemptError::Abort(format!("provenance: {e}")))?;
    let stored = store::drafts::insert_for_task(
        db,
        &task,
        &NewDraft {
            task_id,
            status: outcome.status,
            fields: &outcome.fields,
            findings: &outcome.findings,
            provenance: &provenance,
            rules_version: &outcome.provenance.rules_version,
            attempts: attempt,
            tokens: spent,
            // the day's usage only matters (and is only written) under a daily budget
            day_usage: daily.map(|_| (today.as_str(), outcome.provenance.model.provider.as_str())),
        },
    )
    .await;
    match stored {
        Ok(draft_id) => {
            metrics::counter!("enricher_drafts_created_total", "channel" => task.channel.clone(), "status" => outcome.status.as_str())
                .increment(1);
            tracing::debug!(%draft_id, status = %outcome.status, findings = outcome.findings.len(),
                latency_ms = outcome.provenance.latency_ms, "draft stored");
            Ok(())
        }
        Err(e) => {
            retry_or_fail(
                deps,
                task_id,
                job_id,
                attempt,
                max,
                &format!("storing the draft: {e}"),
                None,
            )
            .await
        }
    }
}

async fn fail(db: &Db, task_id: &str, msg: &str) -> Result<(), AttemptError> {
    tracing::warn!(task_id, error = msg, "task failed permanently");
    if let Err(e) = store::tasks::mark_failed(db, task_id, msg).await {
        tracing::error!(task_id, error = %e, "could not record the task failure");
    }
    Err(AttemptError::Abort(msg.to_string()))
}

async fn retry_or_fail(
    deps: &EnrichDeps,
    task_id: &str,
    job_id: &str,
    attempt: i64,
    max: i64,
    msg: &str,
    retry_after: Option<Duration>,
) -> Result<(), AttemptError> {
    if attempt >= max {
        let msg = format!("{msg} (gave up after {attempt} attempts)");
        return fail(&deps.db, task_id, &msg).await;
    }
    let delay = backoff(&deps.settings, attempt).max(retry_after.unwrap_or_default());
    let run_at = chrono::Utc::now().timestamp() + delay.as_secs().max(1) as i64;
    tracing::warn!(
        task_id,
        attempt,
        max,
        retry_in_s = delay.as_secs(),
        error = msg,
        "attempt failed; will retry"
    );
    if let Err(e) = jobs::delay(&deps.db, job_id, run_at).await {
        tracing::error!(task_id, error = %e, "could not schedule the retry");
    }
    if let Err(e) = store::tasks::mark_retrying(&deps.db, task_id, msg).await {
        tracing::error!(task_id, error = %e, "could not record the failed attempt");
    }
    Err(AttemptError::Retry(msg.to_string()))
}

/// Runs the enrichment workers until `shutdown` resolves; then stops fetching and gives
/// running tasks up to `grace` to finish.
pub async fn run_workers(
    deps: Arc<EnrichDeps>,
    worker_name: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), QueueError> {
    let settings = deps.settings.clone();
    let name_prefix = worker_name.clone();
    let concurrency = settings.worker.concurrency;
    let poll = Duration::from_millis(settings.worker.poll_interval_ms.max(10));
    let signal = async move {
        shutdown.await;
        Ok::<(), std::io::Error>(())
    };
    // A worker whose backend fails (the database restarting, a dropped connection) is
    // restarted, after a short pause that grows with the restarts so a long outage does not
    // spin. The pause is brief and only on a failure path.
    let monitor = Monitor::new()
        .shutdown_timeout(grace)
        .should_restart(|ctx, err| {
            let n = ctx.restarts().min(5) as u32;
            let pause = Duration::from_millis(100 * (1u64 << n)).min(Duration::from_secs(2));
            tracing::warn!(worker = %ctx.name(), error = %err, restarts = ctx.restarts(), pause_ms = pause.as_millis() as u64,
                "queue worker failed; restarting");
            std::thread::sleep(pause);
            true
        });
    let monitor = match deps.db.clone() {
        Db::Sqlite(pool) => {
            let config = apalis_sqlite::Config::default()
                .queue(ENRICH_QUEUE)
                .batch_size(settings.worker.batch_size.max(1))
                .heartbeat_interval(Duration::from_secs(settings.worker.heartbeat_s.max(1)))
                .missed_heartbeats(settings.worker.missed_heartbeats.max(1));
            let deps = deps.clone();
            monitor.register(move |run| {
                let backend = SqliteStorage::<EnrichJob>::new(&pool)
                    .with_config(config.clone())
                    .poll_with_interval(poll);
                WorkerBuilder::new(format!("{worker_name}-{run}"))
                    .backend(backend)
                    .catch_panic()
                    .concurrency(concurrency)
                    .data(deps.clone())
                    .build(handle_enrich)
            })
        }
        Db::Postgres(pool) => {
            let config = apalis_postgres::Config::default()
                .queue(ENRICH_QUEUE)
                .batch_size(settings.worker.batch_size.max(1))
                .heartbeat_interval(Duration::from_secs(settings.worker.heartbeat_s.max(1)))
                .missed_heartbeats(settings.worker.missed_heartbeats.max(1));
            let deps = deps.clone();
            monitor.register(move |run| {
                // LISTEN/NOTIFY wakes idle workers at once; the interval poll is a safety net
                // (and what picks up retries whose run_at has come).
                let backend = PostgresStorage::<EnrichJob>::new(&pool)
                    .with_config(config.clone())
                    .with_pubsub()
                    .poll_with_interval(poll.max(Duration::from_millis(500)));
                WorkerBuilder::new(format!("{worker_name}-{run}"))
                    .backend(backend)
                    .catch_panic()
                    .concurrency(concurrency)
                    .data(deps.clone())
                    .build(handle_enrich)
            })
        }
    };
    let result = monitor
        .run_with_signal(signal)
        .await
        .map_err(|e| QueueError::Monitor(e.to_string()));
    // Whatever this process still held (tasks that did not finish within the grace period,
    // jobs fetched but not started) goes back to the queue now, not after the heartbeat
    // timeout.
    match jobs::release_worker_jobs(&deps.db, ENRICH_QUEUE, &format!("{name_prefix}-")).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(released = n, "released unfinished tasks back to the queue"),
        Err(e) => {
            tracing::warn!(error = %e, "could not release unfinished tasks; they return after the heartbeat timeout")
        }
    }
    result
}
