//! Counts for metrics and status pages.

use super::{on_db, Db, StoreError};

pub async fn tasks_by_status(db: &Db) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        on_db!(db, p => sqlx::query_as("select status, count(*) from tasks group by status")
        .fetch_all(p)
        .await)?,
    )
}

pub async fn drafts_by_status(db: &Db) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        on_db!(db, p => sqlx::query_as("select status, count(*) from drafts group by status")
        .fetch_all(p)
        .await)?,
    )
}

pub async fn deliveries_by_status(db: &Db) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        on_db!(db, p => sqlx::query_as("select status, count(*) from webhook_deliveries group by status")
        .fetch_all(p)
        .await)?,
    )
}
