//! Drafts: generated copy and its review state.

use serde::Serialize;

use super::{from_json, new_id, now_ms, on_db, on_tx, to_json, Db, StoreError, Tx};
use crate::{
    checks::{Fields, Finding},
    review::DraftStatus,
};

/// A draft as stored.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Draft {
    pub id: String,
    pub task_id: String,
    pub batch_id: String,
    pub spec_id: String,
    pub product_id: String,
    pub channel: String,
    pub status: DraftStatus,
    /// What the pipeline produced (model text, repaired).
    pub fields: Fields,
    /// The reviewer's edit, when there is one.
    pub edited_fields: Option<Fields>,
    pub findings: Vec<Finding>,
    pub provenance: serde_json::Value,
    pub rules_version: String,
    pub attempts: i64,
    /// Bumped by every change; a change made against an older revision is refused.
    pub revision: i64,
    pub parent_draft_id: Option<String>,
    pub reviewed_by: Option<String>,
    pub reviewed_at: Option<i64>,
    pub reject_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Draft {
    /// The text a reviewer would approve: the edit when there is one, else the generated text.
    pub fn current_fields(&self) -> &Fields {
        self.edited_fields.as_ref().unwrap_or(&self.fields)
    }
}

#[derive(Debug, sqlx::FromRow)]
struct DraftRow {
    id: String,
    task_id: String,
    batch_id: String,
    spec_id: String,
    product_id: String,
    channel: String,
    status: String,
    fields: String,
    edited_fields: Option<String>,
    findings: String,
    provenance: String,
    rules_version: String,
    attempts: i64,
    revision: i64,
    parent_draft_id: Option<String>,
    reviewed_by: Option<String>,
    reviewed_at: Option<i64>,
    reject_reason: Option<String>,
    created_at: i64,
    updated_at: i64,
}

impl TryFrom<DraftRow> for Draft {
    type Error = StoreError;
    fn try_from(r: DraftRow) -> Result<Self, StoreError> {
        Ok(Draft {
            status: DraftStatus::parse(&r.status).ok_or_else(|| {
                StoreError::Corrupt(format!("draft {}: status {}", r.id, r.status))
            })?,
            fields: from_json("draft fields", &r.fields)?,
            edited_fields: r
                .edited_fields
                .as_deref()
                .map(|s| from_json("draft edited fields", s))
                .transpose()?,
            findings: from_json("draft findings", &r.findings)?,
            provenance: from_json("draft provenance", &r.provenance)?,
            id: r.id,
            task_id: r.task_id,
            batch_id: r.batch_id,
            spec_id: r.spec_id,
            product_id: r.product_id,
            channel: r.channel,
            rules_version: r.rules_version,
            attempts: r.attempts,
            revision: r.revision,
            parent_draft_id: r.parent_draft_id,
            reviewed_by: r.reviewed_by,
            reviewed_at: r.reviewed_at,
            reject_reason: r.reject_reason,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

/// What the pipeline hands over for storage.
#[derive(Debug, Clone)]
pub struct NewDraft<'a> {
    pub task_id: &'a str,
    pub status: DraftStatus,
    pub fields: &'a Fields,
    pub findings: &'a [Finding],
    pub provenance: &'a serde_json::Value,
    pub rules_version: &'a str,
    pub attempts: i64,
    /// Tokens spent (prompt + completion).
    pub tokens: i64,
    /// `(day, provider)`: also add the tokens to that day's usage (daily budget).
    pub day_usage: Option<(&'a str, &'a str)>,
}

/// Stores the draft of a task and marks the task succeeded, in one transaction. Idempotent
/// per task: when the task already has a draft (a re-delivered job), nothing changes and
/// the existing draft's id is returned.
pub async fn insert_for_task(
    db: &Db,
    task: &super::tasks::Task,
    d: &NewDraft<'_>,
) -> Result<String, StoreError> {
    let id = new_id();
    let now = now_ms();
    // A trigger marks the task succeeded in the same statement (migration 7).
    const INSERT: &str = "insert into drafts (id, task_id, batch_id, spec_id, product_id, channel, status, fields, findings,
                         provenance, rules_version, attempts, revision, parent_draft_id, created_at, updated_at, tokens)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 0, $13, $14, $14, $15)
         on conflict (task_id) do nothing";
    macro_rules! insert {
        ($c:expr) => {
            sqlx::query(INSERT)
                .bind(&id)
                .bind(&task.id)
                .bind(&task.batch_id)
                .bind(&task.spec_id)
                .bind(&task.product_id)
                .bind(&task.channel)
                .bind(d.status.as_str())
                .bind(to_json(d.fields))
                .bind(to_json(&d.findings))
                .bind(d.provenance.to_string())
                .bind(d.rules_version)
                .bind(d.attempts)
                .bind(task.parent_draft_id.as_deref())
                .bind(now)
                .bind(d.tokens)
                .execute($c)
                .await
                .map(|r| r.rows_affected())
        };
    }
    let inserted = match d.day_usage {
        // the usual case: one statement, no explicit transaction
        None => on_db!(db, p => insert!(p))?,
        // under a daily budget the day's usage is counted in the same transaction
        Some((day, provider)) => {
            let mut tx = db.begin().await?;
            let n = on_tx!(&mut tx, c => insert!(&mut *c))?;
            if n == 1 {
                on_tx!(&mut tx, c => sqlx::query(
                    "insert into token_usage (day, provider, tokens) values ($1, $2, $3)
                     on conflict (day, provider) do update set tokens = token_usage.tokens + excluded.tokens",
                )
                .bind(day)
                .bind(provider)
                .bind(d.tokens)
                .execute(c)
                .await
                .map(|r| r.rows_affected()))?;
            }
            tx.commit().await?;
            n
        }
    };
    if inserted == 1 {
        return Ok(id);
    }
    let existing: Option<String> = on_db!(db, p => sqlx::query_scalar("select id from drafts where task_id = $1")
        .bind(d.task_id)
        .fetch_optional(p)
        .await)?;
    existing.ok_or_else(|| StoreError::NotFound(format!("draft of task {}", d.task_id)))
}

pub async fn get(db: &Db, id: &str) -> Result<Draft, StoreError> {
    let row: Option<DraftRow> = on_db!(db, p => sqlx::query_as("select * from drafts where id = $1")
        .bind(id)
        .fetch_optional(p)
        .await)?;
    row.ok_or_else(|| StoreError::NotFound(format!("draft {id}")))?
        .try_into()
}

/// Filters for listing drafts; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct DraftFilter {
    pub status: Option<DraftStatus>,
    pub channel: Option<String>,
    pub batch_id: Option<String>,
    pub product_id: Option<String>,
    /// Only drafts with (true) or without (false) findings.
    pub has_findings: Option<bool>,
    /// Keyset pagination: drafts with an id greater than this.
    pub after: Option<String>,
    pub limit: i64,
}

const FILTER_SQL: &str = "($1 is null or status = $1)
      and ($2 is null or channel = $2)
      and ($3 is null or batch_id = $3)
      and ($4 is null or product_id = $4)
      and ($5 is null or ($5 = 1 and findings <> '[]') or ($5 = 0 and findings = '[]'))";

pub async fn list(db: &Db, f: &DraftFilter) -> Result<Vec<Draft>, StoreError> {
    let sql = format!(
        "select * from drafts where {FILTER_SQL} and ($6 is null or id > $6) order by id limit $7"
    );
    let rows: Vec<DraftRow> = on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(f.status.map(DraftStatus::as_str))
        .bind(f.channel.as_deref())
        .bind(f.batch_id.as_deref())
        .bind(f.product_id.as_deref())
        .bind(f.has_findings.map(i64::from))
        .bind(f.after.as_deref())
        .bind(f.limit)
        .fetch_all(p)
        .await)?;
    rows.into_iter().map(Draft::try_from).collect()
}

/// The draft just before `id` (by id) that matches the filter.
pub async fn previous(db: &Db, f: &DraftFilter, id: &str) -> Result<Option<String>, StoreError> {
    let sql =
        format!("select id from drafts where {FILTER_SQL} and id < $6 order by id desc limit 1");
    Ok(
        on_db!(db, p => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(f.status.map(DraftStatus::as_str))
        .bind(f.channel.as_deref())
        .bind(f.batch_id.as_deref())
        .bind(f.product_id.as_deref())
        .bind(f.has_findings.map(i64::from))
        .bind(id)
        .fetch_optional(p)
        .await)?,
    )
}

/// Draft counts by status for a filter (status in the filter is ignored).
pub async fn count_by_status(db: &Db, f: &DraftFilter) -> Result<Vec<(String, i64)>, StoreError> {
    let sql = format!(
        "select status, count(*) from drafts where {FILTER_SQL} group by status order by status"
    );
    Ok(
        on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(Option::<&str>::None)
        .bind(f.channel.as_deref())
        .bind(f.batch_id.as_deref())
        .bind(f.product_id.as_deref())
        .bind(f.has_findings.map(i64::from))
        .fetch_all(p)
        .await)?,
    )
}

/// A review decision to record on a draft.
#[derive(Debug, Clone)]
pub struct ReviewUpdate<'a> {
    pub status: DraftStatus,
    pub edited_fields: Option<&'a Fields>,
    pub findings: Option<&'a [Finding]>,
    pub reviewed_by: &'a str,
    pub reject_reason: Option<&'a str>,
}

/// Applies a review decision if the draft is still at `expected_revision`; returns the new
/// revision. A concurrent change makes this a `Conflict`.
pub async fn update_review(
    tx: &mut Tx,
    id: &str,
    expected_revision: i64,
    u: &ReviewUpdate<'_>,
) -> Result<i64, StoreError> {
    let now = now_ms();
    let edited = u.edited_fields.map(to_json);
    let findings = u.findings.map(to_json);
    let n = on_tx!(tx, c => sqlx::query(
        "update drafts set status = $1,
             edited_fields = coalesce($2, edited_fields),
             findings = coalesce($3, findings),
             reviewed_by = $4, reviewed_at = $5, reject_reason = $6,
             revision = revision + 1, updated_at = $5
         where id = $7 and revision = $8",
    )
    .bind(u.status.as_str())
    .bind(edited)
    .bind(findings)
    .bind(u.reviewed_by)
    .bind(now)
    .bind(u.reject_reason)
    .bind(id)
    .bind(expected_revision)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    if n == 0 {
        return Err(StoreError::Conflict(format!(
            "draft {id} changed since revision {expected_revision}; reload it and try again"
        )));
    }
    Ok(expected_revision + 1)
}
