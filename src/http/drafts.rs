//! Reading and reviewing drafts.
//!
//! - `GET /v1/drafts?status=&channel=&batch=&product=&has_findings=&after=&limit=`
//! - `GET /v1/drafts/{id}`
//! - `POST /v1/drafts/{id}/approve` `{"fields"?: {...}, "revision"?: n}` (with `fields`:
//!   edit then approve; both texts are kept)
//! - `POST /v1/drafts/{id}/reject` `{"reason": "...", "revision"?: n}`
//! - `PUT /v1/drafts/{id}/fields` `{"fields": {...}, "revision"?: n}` (save an edit)
//! - `POST /v1/drafts/{id}/regenerate` `{"feedback"?: "...", "revision"?: n}`
//! - `GET|POST /v1/drafts/{id}/comments`, `GET /v1/drafts/{id}/history`
//! - `POST /v1/drafts/bulk-approve` `{"batch"?, "channel"?, "product"?}`: approves the
//!   pending drafts without findings, lists the others as skipped with the reason
//! - `GET /v1/quality`: acceptance rate, reasons, edit distance per channel and template
//! - `GET /v1/audit?after=&limit=&format=jsonl` (admin)

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    routing::{get, post, put},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::AppState;
use crate::{
    auth::{Caller, Role},
    checks::Fields,
    http::ApiError,
    review::{self, Actor, DraftStatus},
    store::{self, drafts::DraftFilter},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/drafts", get(list))
        .route("/v1/drafts/{id}", get(show))
        .route("/v1/drafts/{id}/approve", post(approve))
        .route("/v1/drafts/{id}/reject", post(reject))
        .route("/v1/drafts/{id}/fields", put(edit))
        .route("/v1/drafts/{id}/regenerate", post(regenerate))
        .route("/v1/drafts/{id}/comments", get(comments).post(add_comment))
        .route("/v1/drafts/{id}/history", get(history))
        .route("/v1/drafts/bulk-approve", post(bulk_approve))
        .route("/v1/quality", get(quality))
        .route("/v1/audit", get(audit_log))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommentBody {
    body: String,
}

async fn add_comment(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(b): Json<CommentBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Reviewer)?;
    let c = review::comment(&s.db, &id, &b.body, &caller.actor()).await?;
    Ok((StatusCode::CREATED, Json(json!(c))))
}

async fn comments(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Reviewer)?;
    store::drafts::get(&s.db, &id).await?;
    Ok(Json(
        json!({ "comments": store::comments::for_draft(&s.db, &id).await? }),
    ))
}

/// A draft's history: its versions of approved content, the diff between generated and
/// current text, the audit entries and the comments.
async fn history(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Reviewer)?;
    let d = store::drafts::get(&s.db, &id).await?;
    let versions = store::approved::list(
        &s.db,
        &store::approved::ApprovedFilter {
            product_id: Some(d.product_id.clone()),
            channel: Some(d.channel.clone()),
            history: true,
            limit: 1000,
            ..Default::default()
        },
    )
    .await?;
    let audit = store::audit::for_entity(&s.db, "draft", &id).await?;
    let comments = store::comments::for_draft(&s.db, &id).await?;
    let diff = review::diff_fields(&d.fields, d.current_fields());
    Ok(Json(json!({
        "draft_id": id,
        "versions": versions,
        "diff": diff,
        "audit": audit,
        "comments": comments,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkBody {
    batch: Option<String>,
    channel: Option<String>,
    product: Option<String>,
}

async fn bulk_approve(
    State(s): State<AppState>,
    caller: Caller,
    body: Option<Json<BulkBody>>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Reviewer)?;
    let b = body.map(|Json(b)| b).unwrap_or_default();
    if b.batch.is_none() && b.channel.is_none() && b.product.is_none() {
        return Err(ApiError::unprocessable(
            "batch",
            "name at least one of batch, channel or product (bulk approval of everything is refused)",
        ));
    }
    if let Some(c) = &b.channel {
        s.channels.get(c)?;
    }
    let name = caller.actor();
    let out = review::bulk_approve(
        &s.db,
        &s.channels,
        &DraftFilter {
            status: Some(DraftStatus::PendingReview),
            channel: b.channel,
            batch_id: b.batch,
            product_id: b.product,
            limit: 500,
            ..Default::default()
        },
        &Actor {
            name: &name,
            expected_revision: None,
        },
    )
    .await?;
    Ok(Json(json!(out)))
}

async fn quality(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Reviewer)?;
    Ok(Json(json!(review::quality(&s.db).await?)))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    after: Option<i64>,
    limit: Option<i64>,
    format: Option<String>,
}

/// The audit log, oldest first; `format=jsonl` for an export.
async fn audit_log(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<AuditQuery>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    caller.require(Role::Admin)?;
    let entries = store::audit::list(
        &s.db,
        q.after.unwrap_or(0),
        q.limit.unwrap_or(1000).clamp(1, 100_000),
    )
    .await?;
    if q.format.as_deref() == Some("jsonl") {
        let mut out = String::new();
        for e in &entries {
            out.push_str(&serde_json::to_string(e).map_err(|e| ApiError::Internal(e.to_string()))?);
            out.push('\n');
        }
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            out,
        )
            .into_response());
    }
    Ok(
        Json(json!({ "entries": entries, "next_after": entries.last().map(|e| e.id) }))
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<String>,
    channel: Option<String>,
    batch: Option<String>,
    product: Option<String>,
    has_findings: Option<bool>,
    after: Option<String>,
    limit: Option<i64>,
}

pub(crate) fn parse_status(s: Option<&str>) -> Result<Option<DraftStatus>, ApiError> {
    match s {
        None | Some("") => Ok(None),
        Some(x) => DraftStatus::parse(x).map(Some).ok_or_else(|| {
            ApiError::unprocessable(
                "status",
                format!(
                    "unknown draft status `{x}` (one of: {})",
                    DraftStatus::ALL.map(|s| s.as_str()).join(", ")
                ),
            )
        }),
    }
}

async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Reviewer)?;
    if let Some(c) = &q.channel {
        s.channels.get(c)?;
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let filter = DraftFilter {
        status: parse_status(q.status.as_deref())?,
        channel: q.channel,
        batch_id: q.batch,
        product_id: q.product,
        has_findings: q.has_findings,
        after: q.after,
        limit,
    };
    let drafts = store::drafts::list(&s.db, &filter).await?;
    let counts = store::drafts::count_by_status(&s.db, &filter).await?;
    let next = (drafts.len() as i64 == limit)
        .then(|| drafts.last().map(|d| d.id.clone()))
        .flatten();
    Ok(Json(json!({
        "drafts": drafts,
        "counts": counts.into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "next_after": next,
    })))
}

async fn show(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Reviewer)?;
    let d = store::drafts::get(&s.db, &id).await?;
    let spec = store::tasks::spec_of(&s.db, &d.spec_id).await?;
    let mut v = serde_json::to_value(&d).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["spec"] = spec.to_json();
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    fields: Option<Fields>,
    revision: Option<i64>,
}

async fn approve(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Option<Json<ApproveBody>>,
) -> Result<Json<Value>, ApiError> {
    let b = body.map(|Json(b)| b).unwrap_or(ApproveBody {
        fields: None,
        revision: None,
    });
    caller.require(Role::Reviewer)?;
    let name = caller.actor();
    let content = review::approve(
        &s.db,
        &s.channels,
        &id,
        b.fields.as_ref(),
        &Actor {
            name: &name,
            expected_revision: b.revision,
        },
    )
    .await?;
    Ok(Json(json!({ "approved": content })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RejectBody {
    reason: Option<String>,
    revision: Option<i64>,
}

async fn reject(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(b): Json<RejectBody>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Reviewer)?;
    let name = caller.actor();
    let d = review::reject(
        &s.db,
        &id,
        b.reason.as_deref().unwrap_or(""),
        &Actor {
            name: &name,
            expected_revision: b.revision,
        },
    )
    .await?;
    Ok(Json(
        serde_json::to_value(d).map_err(|e| ApiError::Internal(e.to_string()))?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EditBody {
    fields: Fields,
    revision: Option<i64>,
}

async fn edit(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(b): Json<EditBody>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Reviewer)?;
    let name = caller.actor();
    let d = review::save_edit(
        &s.db,
        &s.channels,
        &id,
        &b.fields,
        &Actor {
            name: &name,
            expected_revision: b.revision,
        },
    )
    .await?;
    Ok(Json(
        serde_json::to_value(d).map_err(|e| ApiError::Internal(e.to_string()))?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegenerateBody {
    feedback: Option<String>,
    revision: Option<i64>,
}

async fn regenerate(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Option<Json<RegenerateBody>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let b = body.map(|Json(b)| b).unwrap_or(RegenerateBody {
        feedback: None,
        revision: None,
    });
    caller.require(Role::Reviewer)?;
    let name = caller.actor();
    let task_id = review::regenerate(
        &s.db,
        &id,
        b.feedback.as_deref().unwrap_or(""),
        s.settings.worker.max_attempts,
        &Actor {
            name: &name,
            expected_revision: b.revision,
        },
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({ "task_id": task_id, "replaces_draft": id, "task_url": format!("/v1/tasks/{task_id}") }),
        ),
    ))
}
