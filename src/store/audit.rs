//! The audit log: append-only (database triggers refuse updates and deletes). Every review
//! action, token change and delivery replay writes one entry, in the same transaction as
//! the change when there is one.

use serde::Serialize;

use super::{now_ms, on_db, on_tx, Db, StoreError, Tx};

/// An entry to append.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub entity_type: &'a str,
    pub entity_id: &'a str,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub reason: Option<&'a str>,
}

impl<'a> Entry<'a> {
    pub fn new(actor: &'a str, action: &'a str, entity_type: &'a str, entity_id: &'a str) -> Self {
        Self {
            actor,
            action,
            entity_type,
            entity_id,
            before: None,
            after: None,
            reason: None,
        }
    }
    pub fn before(mut self, v: serde_json::Value) -> Self {
        self.before = Some(v);
        self
    }
    pub fn after(mut self, v: serde_json::Value) -> Self {
        self.after = Some(v);
        self
    }
    pub fn reason(mut self, r: Option<&'a str>) -> Self {
        self.reason = r;
        self
    }
}

const INSERT: &str =
    "insert into audit_log (at, actor, action, entity_type, entity_id, before, after, reason)
                      values ($1, $2, $3, $4, $5, $6, $7, $8)";

pub async fn record(db: &Db, e: &Entry<'_>) -> Result<(), StoreError> {
    on_db!(db, p => sqlx::query(INSERT)
        .bind(now_ms())
        .bind(e.actor)
        .bind(e.action)
        .bind(e.entity_type)
        .bind(e.entity_id)
        .bind(e.before.as_ref().map(|v| v.to_string()))
        .bind(e.after.as_ref().map(|v| v.to_string()))
        .bind(e.reason)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

pub async fn record_tx(tx: &mut Tx, e: &Entry<'_>) -> Result<(), StoreError> {
    on_tx!(tx, c => sqlx::query(INSERT)
        .bind(now_ms())
        .bind(e.actor)
        .bind(e.action)
        .bind(e.entity_type)
        .bind(e.entity_id)
        .bind(e.before.as_ref().map(|v| v.to_string()))
        .bind(e.after.as_ref().map(|v| v.to_string()))
        .bind(e.reason)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// A stored entry.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Raw {
    id: i64,
    at: i64,
    actor: String,
    action: String,
    entity_type: String,
    entity_id: String,
    before: Option<String>,
    after: Option<String>,
    reason: Option<String>,
}

impl From<Raw> for AuditEntry {
    fn from(r: Raw) -> Self {
        let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str(&s).ok());
        AuditEntry {
            id: r.id,
            at: r.at,
            actor: r.actor,
            action: r.action,
            entity_type: r.entity_type,
            entity_id: r.entity_id,
            before: parse(r.before),
            after: parse(r.after),
            reason: r.reason,
        }
    }
}

/// Entries about one entity, oldest first.
pub async fn for_entity(
    db: &Db,
    entity_type: &str,
    entity_id: &str,
) -> Result<Vec<AuditEntry>, StoreError> {
    let rows: Vec<Raw> = on_db!(db, p => sqlx::query_as(
        "select * from audit_log where entity_type = $1 and entity_id = $2 order by id",
    )
    .bind(entity_type)
    .bind(entity_id)
    .fetch_all(p)
    .await)?;
    Ok(rows.into_iter().map(AuditEntry::from).collect())
}

/// Entries with an id above `after`, oldest first (for exports and paging).
pub async fn list(db: &Db, after: i64, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
    let rows: Vec<Raw> = on_db!(db, p => sqlx::query_as(
        "select * from audit_log where id > $1 order by id limit $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(p)
    .await)?;
    Ok(rows.into_iter().map(AuditEntry::from).collect())
}
