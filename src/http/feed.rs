//! The pull feed of approved-content events (consumer role).
//!
//! - `GET /v1/feed?cursor=&limit=&channel=` -> `{"events": [...], "next_cursor": "n",
//!   "has_more": bool}`
//!
//! Events come in commit order; `next_cursor` is the position of the last event returned
//! (or the given cursor when there is none), so a client that stores it and asks again
//! gets every later event exactly once, in order — see `store::outbox` for why positions are
//! commit order on PostgreSQL too. No cursor means from the beginning.

use axum::{
    extract::{Query, State},
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::{
    auth::{Caller, Role},
    store::{self, from_json},
};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/feed", get(feed))
}

pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

#[derive(Debug, Deserialize)]
struct FeedQuery {
    cursor: Option<String>,
    limit: Option<String>,
    channel: Option<String>,
}

async fn feed(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<FeedQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Consumer)?;
    let cursor = match q.cursor.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(c) => c.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::unprocessable("cursor", "must be a cursor returned by this feed")
        })?,
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| ApiError::unprocessable("limit", format!("must be 1 to {MAX_LIMIT}")))?,
    };
    if let Some(c) = &q.channel {
        s.channels.get(c)?;
    }
    let mut page = store::outbox::feed(&s.db, cursor, limit + 1, q.channel.as_deref()).await?;
    let has_more = page.len() as i64 > limit;
    page.truncate(limit as usize);
    let next = page.last().map(|e| e.seq).unwrap_or(cursor);
    let events = page
        .iter()
        .map(|e| from_json::<Value>("outbox event", &e.payload))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({
        "events": events,
        "next_cursor": next.to_string(),
        "has_more": has_more,
    })))
}
