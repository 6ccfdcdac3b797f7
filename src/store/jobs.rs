//! The job queue's rows (apalis tables), written directly so that enqueueing a task is part
//! of the same transaction as the task itself: a task row never exists without its queue
//! entry, and vice versa. The layout follows apalis-sqlite / apalis-postgres 1.0
//! (`Jobs` / `apalis.jobs`); the queue tests check that apalis workers pick these rows up.

use super::{Db, StoreError, Tx};

/// The apalis queue (`job_type`) that enrichment tasks go to.
pub const ENRICH_QUEUE: &str = "enricher.enrich";

/// Adds one job for `task_id` to the queue, runnable at once. A second call for the same
/// task is a no-op (the idempotency key is the task id).
pub async fn enqueue(
    tx: &mut Tx,
    queue: &str,
    task_id: &str,
    payload: &[u8],
    max_attempts: i64,
) -> Result<(), StoreError> {
    enqueue_generation(tx, queue, task_id, 0, payload, max_attempts).await
}

/// Adds the first queue job of each task in `task_ids`, in one statement.
pub async fn enqueue_tasks(
    tx: &mut Tx,
    queue: &str,
    task_ids: &[&str],
    max_attempts: i64,
) -> Result<(), StoreError> {
    let jobs: Vec<NewJob> = task_ids
        .iter()
        .map(|id| {
            let payload = serde_json::to_vec(&super::batches::EnrichJob {
                task_id: id.to_string(),
            })
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            Ok(NewJob {
                id: id.to_string(),
                key: id.to_string(),
                payload,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    insert_jobs(tx, queue, &jobs, max_attempts).await
}

/// One row of apalis's jobs table: id, idempotency key, payload.
struct NewJob {
    id: String,
    key: String,
    payload: Vec<u8>,
}

/// Inserts pending jobs in one statement; a job whose idempotency key exists is skipped.
async fn insert_jobs(
    tx: &mut Tx,
    queue: &str,
    jobs: &[NewJob],
    max_attempts: i64,
) -> Result<(), StoreError> {
    if jobs.is_empty() {
        return Ok(());
    }
    let now_s = chrono::Utc::now().timestamp();
    match tx {
        Tx::Sqlite(t) => {
            let sql = format!(
                "insert into Jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key)
                 values {} on conflict (job_type, idempotency_key) do nothing",
                super::batches::values_sql(jobs.len(), "(?, ?, ?, 'Pending', 0, ?, ?, 0, '{}', ?)")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
            for j in jobs {
                q = q
                    .bind(&j.payload)
                    .bind(&j.id)
                    .bind(queue)
                    .bind(max_attempts)
                    .bind(now_s)
                    .bind(&j.key);
            }
            q.execute(&mut **t).await?;
        }
        Tx::Postgres(t) => {
            let sql = format!(
                "insert into apalis.jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key)
                 values {} on conflict (job_type, idempotency_key) do nothing",
                super::batches::values_sql(jobs.len(), "(?, ?, ?, 'Pending', 0, ?, to_timestamp(?), 0, ''::hstore, ?)")
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
            for j in jobs {
                q = q
                    .bind(&j.payload)
                    .bind(&j.id)
                    .bind(queue)
                    .bind(max_attempts as i32)
                    .bind(now_s as f64)
                    .bind(&j.key);
            }
            q.execute(&mut **t).await?;
        }
    }
    Ok(())
}

/// The job id of a task's `generation`-th queue job: the task id for the first, a fresh
/// ULID for later ones (a resumed task gets a new job; the old one is done).
fn job_id(task_id: &str, generation: i64) -> String {
    if generation == 0 {
        task_id.to_string()
    } else {
        ulid::Ulid::new().to_string()
    }
}

/// Like [`enqueue`], for the `generation`-th job of a task (idempotency key
/// `task_id` or `task_id#generation`).
pub async fn enqueue_generation(
    tx: &mut Tx,
    queue: &str,
    task_id: &str,
    generation: i64,
    payload: &[u8],
    max_attempts: i64,
) -> Result<(), StoreError> {
    let key = if generation == 0 {
        task_id.to_string()
    } else {
        format!("{task_id}#{generation}")
    };
    let job = NewJob {
        id: job_id(task_id, generation),
        key,
        payload: payload.to_vec(),
    };
    insert_jobs(tx, queue, std::slice::from_ref(&job), max_attempts).await
}

/// Delays the next attempt of a failed job until `run_at_s` (Unix seconds). apalis re-fetches
/// a failed job only once `run_at` has passed, so this is the retry backoff; it lives in the
/// database, so it holds across restarts and across workers.
pub async fn delay(db: &Db, job_id: &str, run_at_s: i64) -> Result<(), StoreError> {
    match db {
        Db::Sqlite(p) => {
            sqlx::query("update Jobs set run_at = $1 where id = $2")
                .bind(run_at_s)
                .bind(job_id)
                .execute(p)
                .await?;
        }
        Db::Postgres(p) => {
            sqlx::query("update apalis.jobs set run_at = to_timestamp($1) where id = $2")
                .bind(run_at_s as f64)
                .bind(job_id)
                .execute(p)
                .await?;
        }
    }
    Ok(())
}

/// Queue-side state of a job: (status, attempts, last_result).
pub async fn job_state(
    db: &Db,
    task_id: &str,
) -> Result<Option<(String, i64, Option<String>)>, StoreError> {
    Ok(match db {
        Db::Sqlite(p) => {
            sqlx::query_as::<_, (String, i64, Option<String>)>(
                "select status, attempts, last_result from Jobs where id = $1",
            )
            .bind(task_id)
            .fetch_optional(p)
            .await?
        }
        Db::Postgres(p) => sqlx::query_as::<_, (String, i32, Option<String>)>(
            "select status, attempts, last_result::text from apalis.jobs where id = $1",
        )
        .bind(task_id)
        .fetch_optional(p)
        .await?
        .map(|(s, a, r)| (s, a as i64, r)),
    })
}

/// Jobs of `queue` not yet finished (pending, queued, running, or failed with attempts left).
pub async fn queue_depth(db: &Db, queue: &str) -> Result<i64, StoreError> {
    Ok(match db {
        Db::Sqlite(p) => {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from Jobs where job_type = $1
                 and (status in ('Pending', 'Queued', 'Running') or (status = 'Failed' and attempts < max_attempts))",
            )
            .bind(queue)
            .fetch_one(p)
            .await?
        }
        Db::Postgres(p) => {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from apalis.jobs where job_type = $1
                 and (status in ('Pending', 'Queued', 'Running') or (status = 'Failed' and attempts < max_attempts))",
            )
            .bind(queue)
            .fetch_one(p)
            .await?
        }
    })
}

/// Workers of `queue` seen within `within_s` seconds (from apalis's worker registry).
pub async fn live_workers(db: &Db, queue: &str, within_s: i64) -> Result<i64, StoreError> {
    Ok(match db {
        Db::Sqlite(p) => {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from Workers where worker_type = $1 and last_seen >= strftime('%s', 'now') - $2",
            )
            .bind(queue)
            .bind(within_s)
            .fetch_one(p)
            .await?
        }
        Db::Postgres(p) => {
            sqlx::query_scalar::<_, i64>(
                "select count(*) from apalis.workers where worker_type = $1 and last_seen >= now() - make_interval(secs => $2)",
            )
            .bind(queue)
            .bind(within_s as f64)
            .fetch_one(p)
            .await?
        }
    })
}

/// Puts back into the queue every job of `queue` still locked by a worker whose name starts
/// with `worker_prefix` (this process, shutting down), and marks their tasks queued again.
/// Returns how many jobs were released.
pub async fn release_worker_jobs(
    db: &Db,
    queue: &str,
    worker_prefix: &str,
) -> Result<u64, StoreError> {
    let pattern = format!("{}%", worker_prefix.replace('%', "\\%").replace('_', "\\_"));
    let payloads: Vec<Vec<u8>> = match db {
        Db::Sqlite(p) => {
            sqlx::query_scalar(
                "update Jobs set status = 'Pending', lock_by = null, lock_at = null
                 where job_type = $1 and status in ('Queued', 'Running') and lock_by like $2 escape '\\'
                 returning job",
            )
            .bind(queue)
            .bind(&pattern)
            .fetch_all(p)
            .await?
        }
        Db::Postgres(p) => {
            sqlx::query_scalar(
                "update apalis.jobs set status = 'Pending', lock_by = null, lock_at = null
                 where job_type = $1 and status in ('Queued', 'Running') and lock_by like $2 escape '\\'
                 returning job",
            )
            .bind(queue)
            .bind(&pattern)
            .fetch_all(p)
            .await?
        }
    };
    let task_ids: Vec<String> = payloads
        .iter()
        .filter_map(|p| serde_json::from_slice::<super::batches::EnrichJob>(p).ok())
        .map(|j| j.task_id)
        .collect();
    for id in &task_ids {
        crate::on_db!(db, p => sqlx::query("update tasks set status = 'queued', updated_at = $1 where id = $2 and status = 'running'")
            .bind(super::now_ms())
            .bind(id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
    }
    Ok(payloads.len() as u64)
}
