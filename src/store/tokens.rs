//! API tokens (hashed) and review-page sessions.

use serde::Serialize;

use super::{new_id, now_ms, on_db, Db, StoreError};
use crate::auth::Role;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub roles: Vec<Role>,
    pub created_at: i64,
    pub created_by: Option<String>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Raw {
    id: String,
    name: String,
    roles: String,
    created_at: i64,
    created_by: Option<String>,
    revoked_at: Option<i64>,
    last_used_at: Option<i64>,
}

impl From<Raw> for TokenRow {
    fn from(r: Raw) -> Self {
        TokenRow {
            id: r.id,
            name: r.name,
            roles: r.roles.split(',').filter_map(Role::parse).collect(),
            created_at: r.created_at,
            created_by: r.created_by,
            revoked_at: r.revoked_at,
            last_used_at: r.last_used_at,
        }
    }
}

const COLUMNS: &str = "id, name, roles, created_at, created_by, revoked_at, last_used_at";

pub async fn insert(
    db: &Db,
    name: &str,
    token_hash: &str,
    roles: &[Role],
    created_by: &str,
) -> Result<String, StoreError> {
    let id = new_id();
    let roles = roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(",");
    on_db!(db, p => sqlx::query(
        "insert into api_tokens (id, name, token_hash, roles, created_at, created_by) values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&id)
    .bind(name)
    .bind(token_hash)
    .bind(roles)
    .bind(now_ms())
    .bind(created_by)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(id)
}

/// The unrevoked token with this hash; records its use.
pub async fn find_active_by_hash(
    db: &Db,
    token_hash: &str,
) -> Result<Option<TokenRow>, StoreError> {
    let sql =
        format!("select {COLUMNS} from api_tokens where token_hash = $1 and revoked_at is null");
    let row: Option<Raw> = on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(token_hash)
        .fetch_optional(p)
        .await)?;
    if let Some(r) = &row {
        // best effort: a failed bookkeeping write must not refuse the request
        let _ = on_db!(db, p => sqlx::query("update api_tokens set last_used_at = $1 where id = $2")
            .bind(now_ms())
            .bind(&r.id)
            .execute(p)
            .await
            .map(|r| r.rows_affected()));
    }
    Ok(row.map(TokenRow::from))
}

pub async fn get(db: &Db, id: &str) -> Result<TokenRow, StoreError> {
    let sql = format!("select {COLUMNS} from api_tokens where id = $1");
    let row: Option<Raw> = on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(id)
        .fetch_optional(p)
        .await)?;
    row.map(TokenRow::from)
        .ok_or_else(|| StoreError::NotFound(format!("token {id}")))
}

pub async fn list(db: &Db) -> Result<Vec<TokenRow>, StoreError> {
    let sql = format!("select {COLUMNS} from api_tokens order by created_at, id");
    let rows: Vec<Raw> = on_db!(db, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
        .fetch_all(p)
        .await)?;
    Ok(rows.into_iter().map(TokenRow::from).collect())
}

/// Revokes a token (and ends its sessions). Revoking twice is not an error.
pub async fn revoke(db: &Db, id: &str) -> Result<(), StoreError> {
    get(db, id).await?;
    on_db!(db, p => sqlx::query("update api_tokens set revoked_at = $1 where id = $2 and revoked_at is null")
        .bind(now_ms())
        .bind(id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    on_db!(db, p => sqlx::query("delete from sessions where token_id = $1")
        .bind(id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}

/// A review-page session.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub token: TokenRow,
    pub csrf: String,
}

pub async fn create_session(
    db: &Db,
    id_hash: &str,
    token_id: &str,
    csrf: &str,
    ttl_ms: i64,
) -> Result<(), StoreError> {
    let now = now_ms();
    on_db!(db, p => sqlx::query(
        "insert into sessions (id_hash, token_id, csrf, created_at, expires_at) values ($1, $2, $3, $4, $5)",
    )
    .bind(id_hash)
    .bind(token_id)
    .bind(csrf)
    .bind(now)
    .bind(now + ttl_ms)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// The live session with this id hash, if its token is still valid.
pub async fn find_session(db: &Db, id_hash: &str) -> Result<Option<Session>, StoreError> {
    let row: Option<(String, String)> = on_db!(db, p => sqlx::query_as(
        "select s.token_id, s.csrf from sessions s join api_tokens t on t.id = s.token_id
         where s.id_hash = $1 and s.expires_at > $2 and t.revoked_at is null",
    )
    .bind(id_hash)
    .bind(now_ms())
    .fetch_optional(p)
    .await)?;
    match row {
        None => Ok(None),
        Some((token_id, csrf)) => Ok(Some(Session {
            token: get(db, &token_id).await?,
            csrf,
        })),
    }
}

pub async fn delete_session(db: &Db, id_hash: &str) -> Result<(), StoreError> {
    on_db!(db, p => sqlx::query("delete from sessions where id_hash = $1")
        .bind(id_hash)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
    Ok(())
}
