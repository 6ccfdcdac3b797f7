//! Reading and reviewing drafts.
//!
//! - `GET /v1/drafts?status=&channel=&batch=&product=&has_findings=&after=&limit=`
//! - `GET /v1/drafts/{id}`
//! - `POST /v1/drafts/{id}/approve` `{"fields"?: {...}, "revision"?: n}` (with `fields`:
//!   edit then approve; both texts are kept)
//! - `POST /v1/drafts/{id}/reject` `{"reason": "...", "revision"?: n}`
//! - `PUT /v1/drafts/{id}/fields` `{"fields": {...}, "revision"?: n}` (save an edit)
//! - `POST /v1/drafts/{id}/regenerate` `{"feedback"?: "...", "revision"?: n}`

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
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
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
