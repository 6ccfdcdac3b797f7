//! Approved content for the PIM.
//!
//! - `GET /v1/products/{product_id}/content?channel=&history=true`
//! - `GET /v1/export?status=approved&format=jsonl|csv&channel=&batch=&since=RFC3339`

use axum::{
    extract::{Path, Query, State},
    http::header,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use crate::{
    auth::{Caller, Role},
    delivery::export::{self, ExportFilter, Format},
    http::{drafts::parse_status, ApiError},
    review::DraftStatus,
    store::{self, approved::ApprovedFilter},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/products/{product_id}/content", get(product_content))
        .route("/v1/export", get(export_route))
}

#[derive(Debug, Deserialize)]
struct ContentQuery {
    channel: Option<String>,
    history: Option<bool>,
}

async fn product_content(
    State(s): State<AppState>,
    caller: Caller,
    Path(product_id): Path<String>,
    Query(q): Query<ContentQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require_any(&[Role::Consumer, Role::Reviewer])?;
    let content = store::approved::list(
        &s.db,
        &ApprovedFilter {
            product_id: Some(product_id.clone()),
            channel: q.channel,
            history: q.history.unwrap_or(false),
            limit: 1000,
            ..Default::default()
        },
    )
    .await?;
    if content.is_empty() {
        return Err(ApiError::NotFound(format!(
            "approved content for product {product_id}"
        )));
    }
    Ok(Json(
        json!({ "product_id": product_id, "content": content }),
    ))
}

#[derive(Debug, Deserialize)]
struct ExportQuery {
    status: Option<String>,
    format: Option<String>,
    channel: Option<String>,
    batch: Option<String>,
    since: Option<String>,
}

async fn export_route(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let status = parse_status(q.status.as_deref())?.unwrap_or(DraftStatus::Approved);
    // approved content is for the PIM; drafts in review are for reviewers
    if status == DraftStatus::Approved {
        caller.require_any(&[Role::Consumer, Role::Reviewer])?;
    } else {
        caller.require(Role::Reviewer)?;
    }
    let format: Format = q.format.as_deref().unwrap_or("jsonl").parse()?;
    if let Some(c) = &q.channel {
        s.channels.get(c)?;
    }
    let since_ms = match q.since.as_deref() {
        None => None,
        Some(x) => Some(export::parse_since(x).ok_or_else(|| {
            ApiError::unprocessable(
                "since",
                "must be an RFC 3339 time, a date (YYYY-MM-DD) or epoch milliseconds",
            )
        })?),
    };
    let lines = export::lines(
        &s.db,
        &ExportFilter {
            status,
            channel: q.channel,
            batch_id: q.batch,
            since_ms,
        },
    )
    .await?;
    let mut buf = Vec::new();
    export::write(&lines, format, &s.channels, &mut buf)?;
    let ct = match format {
        Format::Jsonl => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
    };
    Ok(([(header::CONTENT_TYPE, ct)], buf).into_response())
}
