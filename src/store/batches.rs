//! Batches: a submission's products, its refused records, and its tasks (one per product x
//! channel), written in one transaction together with their queue entries.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{jobs, new_id, now_ms, on_db, on_tx, to_json, Db, StoreError};
use crate::spec::{Position, ProductSpec, SpecError};

#[cfg(test)]
mod tests {
    #[test]
    fn values_are_numbered_in_order() {
        assert_eq!(
            super::values_sql(2, "(?, 'x', ?)"),
            "($1, 'x', $2), ($3, 'x', $4)"
        );
    }
}

/// A validated submission, ready to be stored and queued.
#[derive(Debug)]
pub struct NewSubmission<'a> {
    pub source: &'a str,
    pub channels: &'a [String],
    pub submitted_by: Option<&'a str>,
    pub specs: &'a [(Position, ProductSpec)],
    pub errors: &'a [SpecError],
    pub max_attempts: u32,
    /// Reviewer feedback for every task (regeneration), if any.
    pub feedback: Option<&'a str>,
    /// The draft a regeneration replaces, if any.
    pub parent_draft_id: Option<&'a str>,
    /// Tokens this batch may spend (prompt + completion); `None` = no limit.
    pub token_budget: Option<i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Receipt {
    pub batch_id: String,
    pub products: usize,
    pub tasks: usize,
    pub task_ids: Vec<String>,
}

/// Rows per multi-row insert (well under SQLite's and PostgreSQL's bind limits).
const CHUNK: usize = 400;

/// `n` copies of a row template with `?` markers, numbered `$1, $2, ...` in order.
pub(crate) fn values_sql(n: usize, row: &str) -> String {
    let mut out = String::with_capacity(n * (row.len() + 8));
    let mut k = 0;
    for i in 0..n {
        if i > 0 {
            out.push_str(", ");
        }
        for ch in row.chars() {
            if ch == '?' {
                k += 1;
                out.push('$');
                out.push_str(&k.to_string());
            } else {
                out.push(ch);
            }
        }
    }
    out
}

/// The payload of a queued job.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct EnrichJob {
    pub task_id: String,
}

/// Stores the batch, its specs, its input errors and one queued task per (spec, channel).
pub async fn insert_submission(db: &Db, sub: &NewSubmission<'_>) -> Result<Receipt, StoreError> {
    let batch_id = new_id();
    let now = now_ms();
    let mut tx = db.begin().await?;
    on_tx!(&mut tx, c => sqlx::query(
        "insert into batches (id, created_at, source, channels, products, input_errors, submitted_by, token_budget)
         values ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&batch_id)
    .bind(now)
    .bind(sub.source)
    .bind(to_json(&sub.channels))
    .bind(sub.specs.len() as i64)
    .bind(sub.errors.len() as i64)
    .bind(sub.submitted_by)
    .bind(sub.token_budget)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    for chunk in sub.errors.chunks(CHUNK) {
        let sql = format!(
            "insert into input_errors (batch_id, position, product_id, field, message) values {}",
            values_sql(chunk.len(), "(?, ?, ?, ?, ?)")
        );
        on_tx!(&mut tx, c => {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
            for e in chunk {
                q = q
                    .bind(&batch_id)
                    .bind(e.position.to_string())
                    .bind(e.product_id.as_deref())
                    .bind(&e.field)
                    .bind(&e.message);
            }
            q.execute(c).await.map(|r| r.rows_affected())
        })?;
    }
    // Specs, tasks and queue jobs go in multi-row inserts: a 10,000-product batch is a few
    // dozen statements, not tens of thousands.
    let specs: Vec<(String, &Position, &ProductSpec)> = sub
        .specs
        .iter()
        .map(|(pos, spec)| (new_id(), pos, spec))
        .collect();
    for chunk in specs.chunks(CHUNK) {
        let sql = format!(
            "insert into specs (id, batch_id, product_id, position, body, created_at) values {}",
            values_sql(chunk.len(), "(?, ?, ?, ?, ?, ?)")
        );
        on_tx!(&mut tx, c => {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
            for (id, pos, spec) in chunk {
                q = q
                    .bind(id)
                    .bind(&batch_id)
                    .bind(&spec.id)
                    .bind(pos.to_string())
                    .bind(spec.to_json().to_string())
                    .bind(now);
            }
            q.execute(c).await.map(|r| r.rows_affected())
        })?;
    }
    let tasks: Vec<(String, &str, &str, &str)> = specs
        .iter()
        .flat_map(|(spec_id, _, spec)| {
            sub.channels
                .iter()
                .map(move |ch| (new_id(), spec_id.as_str(), spec.id.as_str(), ch.as_str()))
        })
        .collect();
    for chunk in tasks.chunks(CHUNK) {
        let sql = format!(
            "insert into tasks (id, batch_id, spec_id, product_id, channel, status, attempts, max_attempts, feedback, parent_draft_id, created_at, updated_at)
             values {}",
            values_sql(chunk.len(), "(?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?)")
        );
        on_tx!(&mut tx, c => {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()));
            for (id, spec_id, product_id, channel) in chunk {
                q = q
                    .bind(id)
                    .bind(&batch_id)
                    .bind(*spec_id)
                    .bind(*product_id)
                    .bind(*channel)
                    .bind(sub.max_attempts as i64)
                    .bind(sub.feedback)
                    .bind(sub.parent_draft_id)
                    .bind(now)
                    .bind(now);
            }
            q.execute(c).await.map(|r| r.rows_affected())
        })?;
        let ids: Vec<&str> = chunk.iter().map(|t| t.0.as_str()).collect();
        jobs::enqueue_tasks(&mut tx, jobs::ENRICH_QUEUE, &ids, sub.max_attempts as i64).await?;
    }
    let task_ids: Vec<String> = tasks.into_iter().map(|t| t.0).collect();
    tx.commit().await?;
    Ok(Receipt {
        batch_id,
        products: sub.specs.len(),
        tasks: task_ids.len(),
        task_ids,
    })
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct BatchRow {
    id: String,
    created_at: i64,
    source: String,
    channels: String,
    products: i64,
    input_errors: i64,
    submitted_by: Option<String>,
    token_budget: Option<i64>,
    paused_reason: Option<String>,
}

/// A batch with its progress.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchStatus {
    pub id: String,
    pub created_at: i64,
    pub source: String,
    pub channels: Vec<String>,
    pub products: i64,
    pub input_errors: i64,
    pub submitted_by: Option<String>,
    pub tasks: i64,
    /// Task status -> count (`queued`, `running`, `retrying`, `succeeded`, `failed`).
    pub tasks_by_status: BTreeMap<String, i64>,
    /// Draft status -> count.
    pub drafts_by_status: BTreeMap<String, i64>,
    /// Every task succeeded or failed.
    pub done: bool,
    pub token_budget: Option<i64>,
    pub tokens_used: i64,
    /// Why the batch waits (budget exhausted), when it does.
    pub paused_reason: Option<String>,
}

pub async fn get(db: &Db, id: &str) -> Result<BatchStatus, StoreError> {
    let row: Option<BatchRow> = on_db!(db, p => sqlx::query_as("select * from batches where id = $1")
        .bind(id)
        .fetch_optional(p)
        .await)?;
    let row = row.ok_or_else(|| StoreError::NotFound(format!("batch {id}")))?;
    status_of(db, row).await
}

async fn status_of(db: &Db, row: BatchRow) -> Result<BatchStatus, StoreError> {
    let tasks: Vec<(String, i64)> = on_db!(db, p => sqlx::query_as(
        "select status, count(*) from tasks where batch_id = $1 group by status",
    )
    .bind(&row.id)
    .fetch_all(p)
    .await)?;
    let drafts: Vec<(String, i64)> = on_db!(db, p => sqlx::query_as(
        "select status, count(*) from drafts where batch_id = $1 group by status",
    )
    .bind(&row.id)
    .fetch_all(p)
    .await)?;
    let tasks_by_status: BTreeMap<String, i64> = tasks.into_iter().collect();
    let tokens_used = super::limits::batch_tokens(db, &row.id).await?;
    let total: i64 = tasks_by_status.values().sum();
    let finished = tasks_by_status.get("succeeded").copied().unwrap_or(0)
        + tasks_by_status.get("failed").copied().unwrap_or(0);
    Ok(BatchStatus {
        channels: serde_json::from_str(&row.channels).unwrap_or_default(),
        id: row.id,
        created_at: row.created_at,
        source: row.source,
        products: row.products,
        input_errors: row.input_errors,
        submitted_by: row.submitted_by,
        tasks: total,
        done: finished == total,
        token_budget: row.token_budget,
        tokens_used,
        paused_reason: row.paused_reason,
        tasks_by_status,
        drafts_by_status: drafts.into_iter().collect(),
    })
}

/// The most recent batches, newest first.
pub async fn list(db: &Db, limit: i64) -> Result<Vec<BatchStatus>, StoreError> {
    let rows: Vec<BatchRow> = on_db!(db, p => sqlx::query_as(
        "select * from batches order by created_at desc, id desc limit $1",
    )
    .bind(limit)
    .fetch_all(p)
    .await)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(status_of(db, r).await?);
    }
    Ok(out)
}

/// A refused record of a submission.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct InputErrorRow {
    pub position: String,
    pub product_id: Option<String>,
    pub field: String,
    pub message: String,
}

pub async fn input_errors(db: &Db, batch_id: &str) -> Result<Vec<InputErrorRow>, StoreError> {
    Ok(on_db!(db, p => sqlx::query_as(
        "select position, product_id, field, message from input_errors where batch_id = $1 order by id",
    )
    .bind(batch_id)
    .fetch_all(p)
    .await)?)
}

/// One task to create.
struct NewTask<'a> {
    batch_id: &'a str,
    spec_id: &'a str,
    product_id: &'a str,
    channel: &'a str,
    max_attempts: u32,
    feedback: Option<&'a str>,
    parent_draft_id: Option<&'a str>,
}

/// Inserts a queued task and its queue job in `tx`; returns the task id.
async fn insert_task(tx: &mut super::Tx, t: &NewTask<'_>) -> Result<String, StoreError> {
    let task_id = new_id();
    on_tx!(tx, c => sqlx::query(
        "insert into tasks (id, batch_id, spec_id, product_id, channel, status, attempts, max_attempts, feedback, parent_draft_id, created_at, updated_at)
         values ($1, $2, $3, $4, $5, 'queued', 0, $6, $7, $8, $9, $9)",
    )
    .bind(&task_id)
    .bind(t.batch_id)
    .bind(t.spec_id)
    .bind(t.product_id)
    .bind(t.channel)
    .bind(t.max_attempts as i64)
    .bind(t.feedback)
    .bind(t.parent_draft_id)
    .bind(now_ms())
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    let payload = serde_json::to_vec(&EnrichJob {
        task_id: task_id.clone(),
    })
    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
    jobs::enqueue(
        tx,
        jobs::ENRICH_QUEUE,
        &task_id,
        &payload,
        t.max_attempts as i64,
    )
    .await?;
    Ok(task_id)
}

/// Queues a new task for the same spec and channel as `draft`, in `tx`, carrying the
/// reviewer's feedback and a link to the draft it replaces. Returns the task id.
pub async fn insert_regeneration(
    tx: &mut super::Tx,
    draft: &crate::store::drafts::Draft,
    feedback: Option<&str>,
    max_attempts: u32,
) -> Result<String, StoreError> {
    insert_task(
        tx,
        &NewTask {
            batch_id: &draft.batch_id,
            spec_id: &draft.spec_id,
            product_id: &draft.product_id,
            channel: &draft.channel,
            max_attempts,
            feedback,
            parent_draft_id: Some(&draft.id),
        },
    )
    .await
}
