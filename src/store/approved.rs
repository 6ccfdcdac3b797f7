//! Approved content: per (product, channel), numbered versions. Approving again adds a
//! version and marks the previous one superseded; nothing is overwritten.

use serde::Serialize;

use super::{from_json, new_id, now_ms, on_db, on_tx, to_json, Db, StoreError, Tx};
use crate::checks::Fields;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ApprovedContent {
    pub id: String,
    pub product_id: String,
    pub channel: String,
    pub version: i64,
    pub draft_id: String,
    pub fields: Fields,
    /// What the model (and repair) produced, before any human edit.
    pub generated_fields: Fields,
    pub provenance: serde_json::Value,
    pub approved_by: String,
    pub approved_at: i64,
    pub superseded_at: Option<i64>,
}

#[derive(Debug, sqlx::FromRow)]
struct Row {
    id: String,
    product_id: String,
    channel: String,
    version: i64,
    draft_id: String,
    fields: String,
    generated_fields: String,
    provenance: String,
    approved_by: String,
    approved_at: i64,
    superseded_at: Option<i64>,
}

impl TryFrom<Row> for ApprovedContent {
    type Error = StoreError;
    fn try_from(r: Row) -> Result<Self, StoreError> {
        Ok(Self {
            fields: from_json("approved fields", &r.fields)?,
            generated_fields: from_json("generated fields", &r.generated_fields)?,
            provenance: from_json("approved provenance", &r.provenance)?,
            id: r.id,
            product_id: r.product_id,
            channel: r.channel,
            version: r.version,
            draft_id: r.draft_id,
            approved_by: r.approved_by,
            approved_at: r.approved_at,
            superseded_at: r.superseded_at,
        })
    }
}

/// What an approval stores.
#[derive(Debug, Clone)]
pub struct NewVersion<'a> {
    pub product_id: &'a str,
    pub channel: &'a str,
    pub draft_id: &'a str,
    pub fields: &'a Fields,
    pub generated_fields: &'a Fields,
    pub provenance: &'a serde_json::Value,
    pub approved_by: &'a str,
}

/// Adds the next version for (product, channel) inside `tx`, superseding the current one.
/// Returns the new version number. Two concurrent approvals of the same (product, channel)
/// cannot both get the same number: the unique key refuses the second.
pub async fn insert_version(
    tx: &mut Tx,
    v: &NewVersion<'_>,
) -> Result<ApprovedContent, StoreError> {
    let now = now_ms();
    let prev: Option<i64> = on_tx!(tx, c => sqlx::query_scalar(
        "select max(version) from approved_content where product_id = $1 and channel = $2",
    )
    .bind(v.product_id)
    .bind(v.channel)
    .fetch_one(c)
    .await)?;
    let version = prev.unwrap_or(0) + 1;
    on_tx!(tx, c => sqlx::query(
        "update approved_content set superseded_at = $1
         where product_id = $2 and channel = $3 and superseded_at is null",
    )
    .bind(now)
    .bind(v.product_id)
    .bind(v.channel)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    let id = new_id();
    on_tx!(tx, c => sqlx::query(
        "insert into approved_content (id, product_id, channel, version, draft_id, fields, generated_fields,
                                       provenance, approved_by, approved_at, superseded_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, null)",
    )
    .bind(&id)
    .bind(v.product_id)
    .bind(v.channel)
    .bind(version)
    .bind(v.draft_id)
    .bind(to_json(v.fields))
    .bind(to_json(v.generated_fields))
    .bind(v.provenance.to_string())
    .bind(v.approved_by)
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(ApprovedContent {
        id,
        product_id: v.product_id.to_string(),
        channel: v.channel.to_string(),
        version,
        draft_id: v.draft_id.to_string(),
        fields: v.fields.clone(),
        generated_fields: v.generated_fields.clone(),
        provenance: v.provenance.clone(),
        approved_by: v.approved_by.to_string(),
        approved_at: now,
        superseded_at: None,
    })
}

/// Filter for approved content.
#[derive(Debug, Clone, Default)]
pub struct ApprovedFilter {
    pub product_id: Option<String>,
    pub channel: Option<String>,
    pub batch_id: Option<String>,
    /// Approved at or after this time (epoch ms).
    pub since_ms: Option<i64>,
    /// Include superseded versions too.
    pub history: bool,
    pub limit: i64,
    /// Keyset pagination on id.
    pub after: Option<String>,
}

pub async fn list(db: &Db, f: &ApprovedFilter) -> Result<Vec<ApprovedContent>, StoreError> {
    let rows: Vec<Row> = on_db!(db, p => sqlx::query_as(
        "select a.* from approved_content a
         where ($1 is null or a.product_id = $1)
           and ($2 is null or a.channel = $2)
           and ($3 is null or exists (select 1 from drafts d where d.id = a.draft_id and d.batch_id = $3))
           and ($4 is null or a.approved_at >= $4)
           and ($5 = 1 or a.superseded_at is null)
           and ($6 is null or a.id > $6)
         order by a.id limit $7",
    )
    .bind(f.product_id.as_deref())
    .bind(f.channel.as_deref())
    .bind(f.batch_id.as_deref())
    .bind(f.since_ms)
    .bind(i64::from(f.history))
    .bind(f.after.as_deref())
    .bind(f.limit)
    .fetch_all(p)
    .await)?;
    rows.into_iter().map(ApprovedContent::try_from).collect()
}
