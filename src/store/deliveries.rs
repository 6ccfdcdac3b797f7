//! Webhook deliveries (one per subscription and event) and their log of attempts.
//!
//! The delivery table is the queue. A worker claims due rows with a lease (`locked_by`,
//! `locked_until`) in a single statement; on PostgreSQL the candidate rows are taken with
//! `FOR UPDATE SKIP LOCKED`, so many worker processes claim disjoint rows without waiting on
//! each other; SQLite serialises writers, so the same statement is atomic there. A worker
//! that dies holding a lease only delays its rows until the lease ends; the next claim sends
//! them again (same idempotency key).
//!
//! Order: a delivery is claimable only when no earlier event (lower `event_seq`) of the same
//! product for the same subscription is still pending — version n+1 is not sent before
//! version n is delivered or dead-lettered.

use serde::Serialize;

use super::{new_id, now_ms, on_db, on_tx, Db, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for its (next) attempt.
    Pending,
    Delivered,
    /// Failed permanently or ran out of retry budget; can be replayed.
    Dead,
    /// Its subscription was removed.
    Cancelled,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 4] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Delivered,
        DeliveryStatus::Dead,
        DeliveryStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

impl std::fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A delivery, with the event's channel and version for display.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Delivery {
    pub id: String,
    pub subscription_id: String,
    pub event_id: String,
    pub event_seq: i64,
    pub event_type: String,
    pub product_id: String,
    pub channel: String,
    pub version: i64,
    pub status: DeliveryStatus,
    pub attempts: i64,
    pub next_attempt_at: Option<i64>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
    pub dead_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(sqlx::FromRow)]
struct Raw {
    id: String,
    subscription_id: String,
    event_id: String,
    event_seq: i64,
    event_type: String,
    product_id: String,
    channel: String,
    version: i64,
    status: String,
    attempts: i64,
    next_attempt_at: i64,
    last_status_code: Option<i64>,
    last_error: Option<String>,
    delivered_at: Option<i64>,
    dead_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<Raw> for Delivery {
    type Error = StoreError;
    fn try_from(r: Raw) -> Result<Self, StoreError> {
        let status = DeliveryStatus::parse(&r.status)
            .ok_or_else(|| StoreError::Corrupt(format!("delivery status `{}`", r.status)))?;
        Ok(Delivery {
            next_attempt_at: (status == DeliveryStatus::Pending).then_some(r.next_attempt_at),
            id: r.id,
            subscription_id: r.subscription_id,
            event_id: r.event_id,
            event_seq: r.event_seq,
            event_type: r.event_type,
            product_id: r.product_id,
            channel: r.channel,
            version: r.version,
            status,
            attempts: r.attempts,
            last_status_code: r.last_status_code,
            last_error: r.last_error,
            delivered_at: r.delivered_at,
            dead_at: r.dead_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

const SELECT: &str =
    "select d.id, d.subscription_id, d.event_id, d.event_seq, e.type as event_type,
        d.product_id, e.channel, e.version, d.status, d.attempts, d.next_attempt_at,
        d.last_status_code, d.last_error, d.delivered_at, d.dead_at, d.created_at, d.updated_at
    from webhook_deliveries d join outbox_events e on e.id = d.event_id";

/// One logged HTTP attempt.
#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct Attempt {
    pub attempt: i64,
    pub started_at: i64,
    pub latency_ms: i64,
    pub status_code: Option<i64>,
    /// `delivered`, `retry` or `failed`.
    pub outcome: String,
    pub error: Option<String>,
    pub response_snippet: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub subscription_id: Option<String>,
    pub product_id: Option<String>,
    /// Keyset pagination, newest first: deliveries with an id below this one.
    pub before: Option<String>,
    pub limit: i64,
}

/// Deliveries, newest first.
pub async fn list(db: &Db, f: &DeliveryFilter) -> Result<Vec<Delivery>, StoreError> {
    let sql = format!(
        "{SELECT}
         where ($1 is null or d.status = $1)
           and ($2 is null or d.subscription_id = $2)
           and ($3 is null or d.product_id = $3)
           and ($4 is null or d.id < $4)
         order by d.id desc limit $5"
    );
    let rows: Vec<Raw> = on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(f.status.map(DeliveryStatus::as_str))
        .bind(f.subscription_id.as_deref())
        .bind(f.product_id.as_deref())
        .bind(f.before.as_deref())
        .bind(f.limit)
        .fetch_all(p)
        .await)?;
    rows.into_iter().map(Delivery::try_from).collect()
}

pub async fn get(db: &Db, id: &str) -> Result<Delivery, StoreError> {
    let sql = format!("{SELECT} where d.id = $1");
    let row: Option<Raw> = on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(id)
        .fetch_optional(p)
        .await)?;
    row.ok_or_else(|| StoreError::NotFound(format!("delivery {id}")))?
        .try_into()
}

/// The attempt log of a delivery, oldest first.
pub async fn attempts(db: &Db, delivery_id: &str) -> Result<Vec<Attempt>, StoreError> {
    Ok(on_db!(db, p => sqlx::query_as::<_, Attempt>(
        "select attempt, started_at, latency_ms, status_code, outcome, error, response_snippet
         from webhook_attempts where delivery_id = $1 order by attempt, started_at",
    )
    .bind(delivery_id)
    .fetch_all(p)
    .await)?)
}

/// Number of deliveries per status (for one subscription, or all).
pub async fn count_by_status(
    db: &Db,
    subscription_id: Option<&str>,
) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(on_db!(db, p => sqlx::query_as::<_, (String, i64)>(
        "select status, count(*) from webhook_deliveries
         where ($1 is null or subscription_id = $1) group by status order by status",
    )
    .bind(subscription_id)
    .fetch_all(p)
    .await)?)
}

/// A claimed delivery with what sending it needs. `secret` is the subscription's signing
/// secret: never log it (Debug hides it).
#[derive(Clone, sqlx::FromRow)]
pub struct Claimed {
    pub id: String,
    pub subscription_id: String,
    pub event_id: String,
    pub event_type: String,
    pub product_id: String,
    pub attempts: i64,
    pub retry_from: i64,
    pub url: String,
    pub secret: String,
    pub payload: String,
}

impl std::fmt::Debug for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claimed")
            .field("id", &self.id)
            .field("subscription_id", &self.subscription_id)
            .field("event_id", &self.event_id)
            .field("attempts", &self.attempts)
            .field("secret", &"***")
            .finish_non_exhaustive()
    }
}

/// The candidates of a claim: due, not leased, and first in line for their product.
const CANDIDATES: &str = "select d.id from webhook_deliveries d
    where d.status = 'pending' and d.next_attempt_at <= $3
      and (d.locked_until is null or d.locked_until <= $3)
      and not exists (select 1 from webhook_deliveries e
                      where e.subscription_id = d.subscription_id and e.product_id = d.product_id
                        and e.status = 'pending' and e.event_seq < d.event_seq)
    order by d.event_seq
    limit $4";

/// Claims up to `limit` due deliveries for `claim_id` until `lease_until` (epoch ms), and
/// returns them in event order.
pub async fn claim(
    db: &Db,
    claim_id: &str,
    now: i64,
    lease_until: i64,
    limit: i64,
) -> Result<Vec<Claimed>, StoreError> {
    let update = |candidates: &str| {
        format!(
            "update webhook_deliveries set locked_by = $1, locked_until = $2, updated_at = $3
             where id in ({candidates})"
        )
    };
    let n = match db {
        Db::Sqlite(p) => sqlx::query(sqlx::AssertSqlSafe(update(CANDIDATES)))
            .bind(claim_id)
            .bind(lease_until)
            .bind(now)
            .bind(limit)
            .execute(p)
            .await?
            .rows_affected(),
        Db::Postgres(p) => sqlx::query(sqlx::AssertSqlSafe(update(&format!(
            "{CANDIDATES} for update skip locked"
        ))))
        .bind(claim_id)
        .bind(lease_until)
        .bind(now)
        .bind(limit)
        .execute(p)
        .await?
        .rows_affected(),
    };
    if n == 0 {
        return Ok(Vec::new());
    }
    Ok(on_db!(db, p => sqlx::query_as::<_, Claimed>(
        "select d.id, d.subscription_id, d.event_id, e.type as event_type, d.product_id, d.attempts,
                d.retry_from, s.url, s.secret, e.payload
         from webhook_deliveries d
         join webhook_subscriptions s on s.id = d.subscription_id
         join outbox_events e on e.id = d.event_id
         where d.locked_by = $1 and d.status = 'pending'
         order by d.event_seq",
    )
    .bind(claim_id)
    .fetch_all(p)
    .await)?)
}

/// How an attempt ended, for the delivery row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Delivered,
    /// Try again at this time (epoch ms).
    RetryAt(i64),
    Dead,
}

/// One attempt to log.
#[derive(Debug, Clone)]
pub struct AttemptRecord<'a> {
    pub attempt: i64,
    pub started_at: i64,
    pub latency_ms: i64,
    pub status_code: Option<i64>,
    pub error: Option<&'a str>,
    pub response_snippet: Option<&'a str>,
}

/// Logs an attempt and moves the delivery on, releasing the lease. Returns false when the
/// lease was lost meanwhile (another worker took the row over after the lease ran out, or
/// the subscription was removed): the attempt is logged, the row is left alone.
pub async fn finish(
    db: &Db,
    delivery_id: &str,
    claim_id: &str,
    a: &AttemptRecord<'_>,
    next: Next,
) -> Result<bool, StoreError> {
    let now = now_ms();
    let outcome = match next {
        Next::Delivered => "delivered",
        Next::RetryAt(_) => "retry",
        Next::Dead => "failed",
    };
    let (status, next_at, delivered_at, dead_at) = match next {
        Next::Delivered => ("delivered", now, Some(now), None),
        Next::RetryAt(t) => ("pending", t, None, None),
        Next::Dead => ("dead", now, None, Some(now)),
    };
    let mut tx = db.begin().await?;
    on_tx!(&mut tx, c => sqlx::query(
        "insert into webhook_attempts (id, delivery_id, attempt, started_at, latency_ms, status_code, outcome, error, response_snippet)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(new_id())
    .bind(delivery_id)
    .bind(a.attempt)
    .bind(a.started_at)
    .bind(a.latency_ms)
    .bind(a.status_code)
    .bind(outcome)
    .bind(a.error)
    .bind(a.response_snippet)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    let n = on_tx!(&mut tx, c => sqlx::query(
        "update webhook_deliveries
         set status = $1, attempts = $2, next_attempt_at = $3, delivered_at = $4, dead_at = $5,
             last_status_code = $6, last_error = $7, locked_by = null, locked_until = null, updated_at = $8
         where id = $9 and locked_by = $10 and status = 'pending'",
    )
    .bind(status)
    .bind(a.attempt)
    .bind(next_at)
    .bind(delivered_at)
    .bind(dead_at)
    .bind(a.status_code)
    .bind(a.error)
    .bind(now)
    .bind(delivery_id)
    .bind(claim_id)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    tx.commit().await?;
    Ok(n == 1)
}

/// Puts a dead-lettered delivery back in line, due now, with a fresh retry budget. Its
/// idempotency key (the delivery id) stays the same.
pub async fn replay(db: &Db, id: &str) -> Result<Delivery, StoreError> {
    let now = now_ms();
    let n = on_db!(db, p => sqlx::query(
        "update webhook_deliveries
         set status = 'pending', next_attempt_at = $1, retry_from = $1, dead_at = null,
             locked_by = null, locked_until = null, updated_at = $1
         where id = $2 and status = 'dead'",
    )
    .bind(now)
    .bind(id)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    let d = get(db, id).await?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "delivery {id} is {}; only dead deliveries can be replayed",
            d.status
        )));
    }
    Ok(d)
}

/// Replays every dead delivery (of one subscription, or all). Returns how many.
pub async fn replay_dead(db: &Db, subscription_id: Option<&str>) -> Result<u64, StoreError> {
    let now = now_ms();
    Ok(on_db!(db, p => sqlx::query(
        "update webhook_deliveries
         set status = 'pending', next_attempt_at = $1, retry_from = $1, dead_at = null,
             locked_by = null, locked_until = null, updated_at = $1
         where status = 'dead' and ($2 is null or subscription_id = $2)",
    )
    .bind(now)
    .bind(subscription_id)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?)
}
