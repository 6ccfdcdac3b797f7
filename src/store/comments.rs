//! Comments on drafts.

use serde::Serialize;

use super::{new_id, now_ms, on_db, Db, StoreError};

#[derive(Debug, Clone, Serialize, PartialEq, sqlx::FromRow)]
pub struct Comment {
    pub id: String,
    pub draft_id: String,
    pub author: String,
    pub body: String,
    pub created_at: i64,
}

pub async fn insert(
    db: &Db,
    draft_id: &str,
    author: &str,
    body: &str,
) -> Result<Comment, StoreError> {
    let c = Comment {
        id: new_id(),
        draft_id: draft_id.to_string(),
        author: author.to_string(),
        body: body.to_string(),
        created_at: now_ms(),
    };
    on_db!(db, p => sqlx::query(
        "insert into comments (id, draft_id, author, body, created_at) values ($1, $2, $3, $4, $5)",
    )
    .bind(&c.id)
    .bind(&c.draft_id)
    .bind(&c.author)
    .bind(&c.body)
    .bind(c.created_at)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(c)
}

pub async fn for_draft(db: &Db, draft_id: &str) -> Result<Vec<Comment>, StoreError> {
    Ok(
        on_db!(db, p => sqlx::query_as("select * from comments where draft_id = $1 order by created_at, id")
        .bind(draft_id)
        .fetch_all(p)
        .await)?,
    )
}
