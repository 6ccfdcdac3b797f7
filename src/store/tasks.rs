//! Tasks: one (product, channel) generation, its attempts and its outcome.

use serde::Serialize;

use super::{now_ms, on_db, Db, StoreError};
use crate::spec::ProductSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    Queued,
    Running,
    /// Failed an attempt; waiting for the next one.
    Retrying,
    Succeeded,
    /// Out of attempts, or failed for good (bad input); `last_error` says why.
    Failed,
}

impl TaskStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Retrying => "retrying",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => TaskStatus::Queued,
            "running" => TaskStatus::Running,
            "retrying" => TaskStatus::Retrying,
            "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct Task {
    pub id: String,
    pub batch_id: String,
    pub spec_id: String,
    pub product_id: String,
    pub channel: String,
    pub status: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub last_error: Option<String>,
    pub feedback: Option<String>,
    pub parent_draft_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

pub async fn get(db: &Db, id: &str) -> Result<Task, StoreError> {
    let t: Option<Task> = on_db!(db, p => sqlx::query_as("select * from tasks where id = $1")
        .bind(id)
        .fetch_optional(p)
        .await)?;
    t.ok_or_else(|| StoreError::NotFound(format!("task {id}")))
}

/// The spec a task works on.
pub async fn spec_of(db: &Db, spec_id: &str) -> Result<ProductSpec, StoreError> {
    let body: Option<String> = on_db!(db, p => sqlx::query_scalar("select body from specs where id = $1")
        .bind(spec_id)
        .fetch_optional(p)
        .await)?;
    let body = body.ok_or_else(|| StoreError::NotFound(format!("spec {spec_id}")))?;
    let v: serde_json::Value = super::from_json("spec body", &body)?;
    ProductSpec::from_stored(v).map_err(|e| StoreError::Corrupt(format!("spec {spec_id}: {e}")))
}

/// Starts attempt `attempt` of a task and returns everything it needs, in one statement:
/// the task (now `running`), its spec, and its batch's token budget. `Ok(None)` when the
/// task is already finished (a duplicate delivery of its job).
pub async fn begin_attempt(
    db: &Db,
    id: &str,
    attempt: i64,
) -> Result<Option<(Task, ProductSpec, Option<i64>)>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        task: Task,
        body: String,
        token_budget: Option<i64>,
    }
    let row: Option<Row> = on_db!(db, p => sqlx::query_as(
        "update tasks set status = 'running', attempts = $1, updated_at = $2
         where id = $3 and status not in ('succeeded', 'failed')
         returning *,
            (select body from specs where specs.id = tasks.spec_id) as body,
            (select token_budget from batches where batches.id = tasks.batch_id) as token_budget",
    )
    .bind(attempt)
    .bind(now_ms())
    .bind(id)
    .fetch_optional(p)
    .await)?;
    let Some(row) = row else {
        // finished, or not there at all
        get(db, id).await?;
        return Ok(None);
    };
    let v: serde_json::Value = super::from_json("spec body", &row.body)?;
    let spec = ProductSpec::from_stored(v)
        .map_err(|e| StoreError::Corrupt(format!("spec {}: {e}", row.task.spec_id)))?;
    Ok(Some((row.task, spec, row.token_budget)))
}

/// Records a failed attempt that will be retried.
pub async fn mark_retrying(db: &Db, id: &str, error: &str) -> Result<(), StoreError> {
    set_outcome(db, id, TaskStatus::Retrying, Some(error)).await
}

/// Records that the task failed for good.
pub async fn mark_failed(db: &Db, id: &str, error: &str) -> Result<(), StoreError> {
    set_outcome(db, id, TaskStatus::Failed, Some(error)).await
}

async fn set_outcome(
    db: &Db,
    id: &str,
    status: TaskStatus,
    error: Option<&str>,
) -> Result<(), StoreError> {
    on_db!(db, p => sqlx::query(
        "update tasks set status = $1, last_error = $2, updated_at = $3 where id = $4 and status <> 'succeeded'",
    )
    .bind(status.as_str())
    .bind(error)
    .bind(now_ms())
    .bind(id)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Tasks of a batch, optionally only those in `status`.
pub async fn list_for_batch(
    db: &Db,
    batch_id: &str,
    status: Option<TaskStatus>,
    limit: i64,
) -> Result<Vec<Task>, StoreError> {
    Ok(on_db!(db, p => sqlx::query_as(
        "select * from tasks where batch_id = $1 and ($2 is null or status = $2)
         order by product_id, channel limit $3",
    )
    .bind(batch_id)
    .bind(status.map(TaskStatus::as_str))
    .bind(limit)
    .fetch_all(p)
    .await)?)
}
