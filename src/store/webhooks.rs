//! Webhook subscriptions. The signing secret is stored as given — it has to be usable to
//! sign requests, so it cannot be hashed like API tokens — and only [`secret_of`] reads it
//! back (for the sender); listings never include it.

use serde::Serialize;

use super::{from_json, new_id, now_ms, on_db, to_json, Db, StoreError};

/// A subscription, without its secret.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Subscription {
    pub id: String,
    pub url: String,
    pub event_types: Vec<String>,
    /// Only events of this channel (`None`: every channel).
    pub channel: Option<String>,
    pub description: Option<String>,
    pub created_at: i64,
    pub created_by: String,
    pub removed_at: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Raw {
    id: String,
    url: String,
    event_types: String,
    channel: Option<String>,
    description: Option<String>,
    created_at: i64,
    created_by: String,
    removed_at: Option<i64>,
}

impl TryFrom<Raw> for Subscription {
    type Error = StoreError;
    fn try_from(r: Raw) -> Result<Self, StoreError> {
        Ok(Subscription {
            event_types: from_json("subscription event types", &r.event_types)?,
            id: r.id,
            url: r.url,
            channel: r.channel,
            description: r.description,
            created_at: r.created_at,
            created_by: r.created_by,
            removed_at: r.removed_at,
        })
    }
}

const COLUMNS: &str =
    "id, url, event_types, channel, description, created_at, created_by, removed_at";

/// What creating a subscription stores (already validated).
#[derive(Debug, Clone)]
pub struct NewSubscription<'a> {
    pub url: &'a str,
    pub secret: &'a str,
    pub event_types: &'a [String],
    pub channel: Option<&'a str>,
    pub description: Option<&'a str>,
    pub created_by: &'a str,
}

pub async fn insert(db: &Db, s: &NewSubscription<'_>) -> Result<Subscription, StoreError> {
    let id = new_id();
    on_db!(db, p => sqlx::query(
        "insert into webhook_subscriptions (id, url, secret, event_types, channel, description, created_at, created_by)
         values ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(s.url)
    .bind(s.secret)
    .bind(to_json(s.event_types))
    .bind(s.channel)
    .bind(s.description)
    .bind(now_ms())
    .bind(s.created_by)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    get(db, &id).await
}

pub async fn get(db: &Db, id: &str) -> Result<Subscription, StoreError> {
    let sql = format!("select {COLUMNS} from webhook_subscriptions where id = $1");
    let row: Option<Raw> = on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(id)
        .fetch_optional(p)
        .await)?;
    row.ok_or_else(|| StoreError::NotFound(format!("webhook subscription {id}")))?
        .try_into()
}

/// Subscriptions, oldest first; removed ones only when `include_removed`.
pub async fn list(db: &Db, include_removed: bool) -> Result<Vec<Subscription>, StoreError> {
    let sql = format!(
        "select {COLUMNS} from webhook_subscriptions where ($1 = 1 or removed_at is null) order by id"
    );
    let rows: Vec<Raw> = on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(i64::from(include_removed))
        .fetch_all(p)
        .await)?;
    rows.into_iter().map(Subscription::try_from).collect()
}

/// The signing secret of a subscription (for the sender only; never log it).
pub async fn secret_of(db: &Db, id: &str) -> Result<String, StoreError> {
    let s: Option<String> = on_db!(db, p => sqlx::query_scalar(
        "select secret from webhook_subscriptions where id = $1",
    )
    .bind(id)
    .fetch_optional(p)
    .await)?;
    s.ok_or_else(|| StoreError::NotFound(format!("webhook subscription {id}")))
}

/// Removes a subscription: it gets no new events, and its deliveries that are not done
/// (pending or dead-lettered) are cancelled. The row and its delivery log stay.
/// Returns how many deliveries were cancelled.
pub async fn remove(db: &Db, id: &str) -> Result<u64, StoreError> {
    let now = now_ms();
    let mut tx = db.begin().await?;
    let n = super::on_tx!(&mut tx, c => sqlx::query(
        "update webhook_subscriptions set removed_at = $1 where id = $2 and removed_at is null",
    )
    .bind(now)
    .bind(id)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    if n == 0 {
        // unknown, or already removed
        let exists: Option<Option<i64>> = super::on_tx!(&mut tx, c => sqlx::query_scalar(
            "select removed_at from webhook_subscriptions where id = $1",
        )
        .bind(id)
        .fetch_optional(c)
        .await)?;
        return match exists {
            None => Err(StoreError::NotFound(format!("webhook subscription {id}"))),
            Some(_) => Err(StoreError::Conflict(format!(
                "webhook subscription {id} is already removed"
            ))),
        };
    }
    let cancelled = super::on_tx!(&mut tx, c => sqlx::query(
        "update webhook_deliveries set status = 'cancelled', locked_by = null, locked_until = null, updated_at = $1
         where subscription_id = $2 and status in ('pending', 'dead')",
    )
    .bind(now)
    .bind(id)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    tx.commit().await?;
    Ok(cancelled)
}
