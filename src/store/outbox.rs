//! The outbox: one event per approved version, written in the approval's own transaction
//! (so an approval never exists without its event, and a crash cannot lose one), plus one
//! pending webhook delivery per matching subscription.
//!
//! ## The feed position (`seq`) is commit order
//! A PIM polling `GET /v1/feed?cursor=n` must never miss an event: when it has seen `seq = n`,
//! no event with a smaller `seq` may appear later. A plain sequence does not give that on
//! PostgreSQL: transaction A takes 4, B takes 5, B commits, a reader sees 5 and moves its
//! cursor past 4, then A commits — 4 is lost to that reader.
//!
//! So the position is handed out under a lock held until commit: PostgreSQL takes the
//! transaction-level advisory lock [`FEED_LOCK_KEY`] (`pg_advisory_xact_lock`, released by
//! commit or rollback, after the commit is visible), then reads `max(seq) + 1`. The next
//! approval waits for the lock, so it reads the committed maximum and commits after it:
//! positions are committed in order. Only the very end of an approval transaction (the event
//! insert and the commit) is serialised; approvals are human actions, a few per second at
//! most. SQLite already serialises writers (the approval has written before it gets here),
//! so the same `max(seq) + 1` is safe there without a lock. The unique key on `seq` is the
//! last line of defence: a second writer with the same position fails instead of hiding.

use super::{from_json, new_id, now_ms, on_db, on_tx, to_json, Db, StoreError, Tx};
use crate::{
    delivery::event::{ContentEvent, CONTENT_APPROVED},
    store::approved::ApprovedContent,
};

/// Key of the PostgreSQL advisory lock that orders feed positions ("enricher" in ASCII).
pub const FEED_LOCK_KEY: i64 = 0x656e_7269_6368_6572;

/// What [`record_approval`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub event_id: String,
    pub seq: i64,
    /// Webhook deliveries queued for it (one per matching subscription).
    pub deliveries: usize,
}

/// Writes the `content.approved` event for `content` inside the approval's transaction, and
/// queues a delivery for every active subscription that wants it.
pub async fn record_approval(
    tx: &mut Tx,
    content: &ApprovedContent,
) -> Result<RecordedEvent, StoreError> {
    if let Tx::Postgres(t) = tx {
        sqlx::query("select pg_advisory_xact_lock($1)")
            .bind(FEED_LOCK_KEY)
            .execute(&mut **t)
            .await?;
    }
    let seq: i64 = on_tx!(tx, c => sqlx::query_scalar(
        "select coalesce(max(seq), 0) + 1 from outbox_events",
    )
    .fetch_one(c)
    .await)?;
    let event_id = new_id();
    let event = ContentEvent::approved(content, &event_id, seq);
    let now = now_ms();
    on_tx!(tx, c => sqlx::query(
        "insert into outbox_events (id, seq, type, product_id, channel, version, approved_content_id, payload, created_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&event_id)
    .bind(seq)
    .bind(CONTENT_APPROVED)
    .bind(&content.product_id)
    .bind(&content.channel)
    .bind(content.version)
    .bind(&content.id)
    .bind(to_json(&event))
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;

    let subs: Vec<(String, String)> = on_tx!(tx, c => sqlx::query_as(
        "select id, event_types from webhook_subscriptions
         where removed_at is null and (channel is null or channel = $1)
         order by id",
    )
    .bind(&content.channel)
    .fetch_all(c)
    .await)?;
    let mut deliveries = 0;
    for (sub_id, types) in subs {
        let types: Vec<String> = from_json("subscription event types", &types)?;
        if !types.iter().any(|t| t == CONTENT_APPROVED || t == "*") {
            continue;
        }
        on_tx!(tx, c => sqlx::query(
            "insert into webhook_deliveries (id, subscription_id, event_id, event_seq, product_id, status,
                                             attempts, next_attempt_at, retry_from, created_at, updated_at)
             values ($1, $2, $3, $4, $5, 'pending', 0, $6, $6, $6, $6)",
        )
        .bind(new_id())
        .bind(&sub_id)
        .bind(&event_id)
        .bind(seq)
        .bind(&content.product_id)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        deliveries += 1;
    }
    Ok(RecordedEvent {
        event_id,
        seq,
        deliveries,
    })
}

/// One feed entry: its position and the event JSON exactly as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEntry {
    pub seq: i64,
    pub payload: String,
}

/// Events after position `after`, in position (= commit) order, optionally of one channel.
pub async fn feed(
    db: &Db,
    after: i64,
    limit: i64,
    channel: Option<&str>,
) -> Result<Vec<FeedEntry>, StoreError> {
    let rows: Vec<(i64, String)> = on_db!(db, p => sqlx::query_as(
        "select seq, payload from outbox_events
         where seq > $1 and ($2 is null or channel = $2)
         order by seq limit $3",
    )
    .bind(after)
    .bind(channel)
    .bind(limit)
    .fetch_all(p)
    .await)?;
    Ok(rows
        .into_iter()
        .map(|(seq, payload)| FeedEntry { seq, payload })
        .collect())
}

/// The newest position (0 when there is no event yet).
pub async fn head(db: &Db) -> Result<i64, StoreError> {
    Ok(on_db!(db, p => sqlx::query_scalar::<_, i64>(
        "select coalesce(max(seq), 0) from outbox_events",
    )
    .fetch_one(p)
    .await)?)
}

/// One event by id (its JSON as stored).
pub async fn get(db: &Db, event_id: &str) -> Result<FeedEntry, StoreError> {
    let row: Option<(i64, String)> = on_db!(db, p => sqlx::query_as(
        "select seq, payload from outbox_events where id = $1",
    )
    .bind(event_id)
    .fetch_optional(p)
    .await)?;
    row.map(|(seq, payload)| FeedEntry { seq, payload })
        .ok_or_else(|| StoreError::NotFound(format!("event {event_id}")))
}
