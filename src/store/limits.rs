//! Shared rate-limit windows, daily token usage and batch budgets.

use super::{on_db, Db, StoreError};

/// Takes one request and `tokens` from the provider's window starting at `window_start`
/// if that stays within `max_requests` / `max_tokens` (`i64::MAX` for no limit). Atomic
/// across every process sharing the database. Returns whether the reservation was made.
pub async fn reserve(
    db: &Db,
    provider: &str,
    window_start: i64,
    tokens: i64,
    max_requests: i64,
    max_tokens: i64,
) -> Result<bool, StoreError> {
    if tokens > max_tokens {
        // would never fit; let it through alone in an otherwise empty window
        let used: Option<i64> = on_db!(db, p => sqlx::query_scalar(
            "select requests from rate_windows where provider = $1 and window_start = $2",
        )
        .bind(provider)
        .bind(window_start)
        .fetch_optional(p)
        .await)?;
        if used.unwrap_or(0) > 0 {
            return Ok(false);
        }
    }
    let row: Option<i64> = on_db!(db, p => sqlx::query_scalar(
        "insert into rate_windows (provider, window_start, requests, tokens) values ($1, $2, 1, $3)
         on conflict (provider, window_start) do update
            set requests = rate_windows.requests + 1, tokens = rate_windows.tokens + excluded.tokens
          where rate_windows.requests + 1 <= $4 and rate_windows.tokens + excluded.tokens <= $5
         returning requests",
    )
    .bind(provider)
    .bind(window_start)
    .bind(tokens)
    .bind(max_requests)
    .bind(max_tokens)
    .fetch_optional(p)
    .await)?;
    Ok(row.is_some())
}

/// Corrects a window's token count once the real usage is known.
pub async fn adjust_tokens(
    db: &Db,
    provider: &str,
    window_start: i64,
    delta: i64,
) -> Result<(), StoreError> {
    on_db!(db, p => sqlx::query(
        "update rate_windows set tokens = tokens + $1 where provider = $2 and window_start = $3",
    )
    .bind(delta)
    .bind(provider)
    .bind(window_start)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Old windows are of no use; keeps the table small.
pub async fn prune_windows(db: &Db, before: i64) -> Result<(), StoreError> {
    on_db!(db, p => sqlx::query("delete from rate_windows where window_start < $1")
        .bind(before)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Tokens spent on `day` over all providers.
pub async fn day_usage(db: &Db, day: &str) -> Result<i64, StoreError> {
    let n: Option<i64> = on_db!(db, p => sqlx::query_scalar(
        "select cast(coalesce(sum(tokens), 0) as bigint) from token_usage where day = $1",
    )
    .bind(day)
    .fetch_one(p)
    .await)?;
    Ok(n.unwrap_or(0))
}

/// Tokens a batch has spent: the sum over its drafts.
pub async fn batch_tokens(db: &Db, batch_id: &str) -> Result<i64, StoreError> {
    Ok(on_db!(db, p => sqlx::query_scalar(
        "select cast(coalesce(sum(tokens), 0) as bigint) from drafts where batch_id = $1",
    )
    .bind(batch_id)
    .fetch_one(p)
    .await)?)
}

/// A batch's token budget, if it has one.
pub async fn batch_budget(db: &Db, batch_id: &str) -> Result<Option<i64>, StoreError> {
    let row: Option<Option<i64>> = on_db!(db, p => sqlx::query_scalar(
        "select token_budget from batches where id = $1",
    )
    .bind(batch_id)
    .fetch_optional(p)
    .await)?;
    row.ok_or_else(|| StoreError::NotFound(format!("batch {batch_id}")))
}

/// Parks a task (it waits, status queued) and says why on the batch.
pub async fn park(db: &Db, task_id: &str, batch_id: &str, reason: &str) -> Result<(), StoreError> {
    on_db!(db, p => sqlx::query(
        "update tasks set status = 'queued', parked_reason = $1, updated_at = $2 where id = $3 and status <> 'succeeded'",
    )
    .bind(reason)
    .bind(super::now_ms())
    .bind(task_id)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    on_db!(db, p => sqlx::query("update batches set paused_reason = $1 where id = $2")
        .bind(reason)
        .bind(batch_id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Sets a batch's token budget (`None` removes it).
pub async fn set_batch_budget(
    db: &Db,
    batch_id: &str,
    budget: Option<i64>,
) -> Result<(), StoreError> {
    let n = on_db!(db, p => sqlx::query("update batches set token_budget = $1 where id = $2")
        .bind(budget)
        .bind(batch_id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    if n == 0 {
        return Err(StoreError::NotFound(format!("batch {batch_id}")));
    }
    Ok(())
}

/// Re-queues the parked tasks of a batch (or of every batch, with `None`) whose reason
/// starts with `reason_prefix`: a fresh queue job each (the old one is done), in one
/// transaction. Clears the batch's paused reason. Returns how many were resumed.
pub async fn resume_parked(
    db: &Db,
    batch_id: Option<&str>,
    reason_prefix: &str,
) -> Result<u64, StoreError> {
    let like = format!("{reason_prefix}%");
    let rows: Vec<(String, String, i64, i64)> = on_db!(db, p => sqlx::query_as(
        "select id, batch_id, generation, max_attempts from tasks
         where parked_reason like $1 and ($2 is null or batch_id = $2) order by id",
    )
    .bind(&like)
    .bind(batch_id)
    .fetch_all(p)
    .await)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut tx = db.begin().await?;
    for (task_id, _, generation, max_attempts) in &rows {
        let next = generation + 1;
        super::on_tx!(&mut tx, c => sqlx::query(
            "update tasks set parked_reason = null, generation = $1, attempts = 0, updated_at = $2 where id = $3",
        )
        .bind(next)
        .bind(super::now_ms())
        .bind(task_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        let payload = serde_json::to_vec(&super::batches::EnrichJob {
            task_id: task_id.clone(),
        })
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        super::jobs::enqueue_generation(
            &mut tx,
            super::jobs::ENRICH_QUEUE,
            task_id,
            next,
            &payload,
            *max_attempts,
        )
        .await?;
    }
    let mut batches: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    batches.sort();
    batches.dedup();
    for b in batches {
        super::on_tx!(&mut tx, c => sqlx::query("update batches set paused_reason = null where id = $1")
            .bind(b)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
    }
    tx.commit().await?;
    Ok(rows.len() as u64)
}

/// Parked tasks of a batch.
pub async fn parked_count(db: &Db, batch_id: &str) -> Result<i64, StoreError> {
    Ok(on_db!(db, p => sqlx::query_scalar(
        "select count(*) from tasks where batch_id = $1 and parked_reason is not null",
    )
    .bind(batch_id)
    .fetch_one(p)
    .await)?)
}
