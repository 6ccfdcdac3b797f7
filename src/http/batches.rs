//! Submitting products and following batches.
//!
//! `POST /v1/batches` takes, by content type:
//! - `application/json`: one product, an array of products, or
//!   `{"products": [...], "channels": ["seo", ...]}` (or `"product": {...}`);
//! - `application/x-ndjson` (or `application/jsonl`, `text/plain`): JSONL;
//! - `multipart/form-data`: a `file` part (JSON or JSONL) and an optional `channels` part.
//!
//! Channels may also be given as `?channels=seo,amazon`; none means all.

use axum::{
    body::Bytes,
    extract::{FromRequest, Multipart, Path, Query, Request, State},
    http::{header::CONTENT_TYPE, StatusCode},
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{csv_list, AppState};
use crate::{
    auth::{Caller, Role},
    http::ApiError,
    intake::{self, IntakeReport},
    spec::{self, Position},
    store::{self, tasks::TaskStatus},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/batches", get(list).post(submit))
        .route("/v1/batches/{id}", get(status))
        .route("/v1/batches/{id}/tasks", get(tasks))
        .route("/v1/batches/{id}/errors", get(errors))
        .route("/v1/batches/{id}/budget", axum::routing::put(set_budget))
        .route("/v1/tasks/{id}", get(task))
}

#[derive(Debug, Deserialize)]
struct SubmitQuery {
    channels: Option<String>,
    source: Option<String>,
    /// Tokens the batch may spend; over it, the batch pauses.
    token_budget: Option<i64>,
}

#[tracing::instrument(skip_all)]
async fn submit(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<SubmitQuery>,
    req: Request,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Submitter)?;
    let who = caller.actor();
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    let mut channels = csv_list(q.channels.as_deref());
    let source = q.source.unwrap_or_else(|| "api".into());
    let report = if content_type.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &s)
            .await
            .map_err(|e| ApiError::BadRequest(format!("multipart: {e}")))?;
        let mut file: Option<(String, Bytes)> = None;
        while let Some(field) = mp
            .next_field()
            .await
            .map_err(|e| ApiError::BadRequest(format!("multipart: {e}")))?
        {
            match field.name() {
                Some("file") => {
                    let name = field.file_name().unwrap_or("upload").to_string();
                    let data = field
                        .bytes()
                        .await
                        .map_err(|e| ApiError::BadRequest(format!("multipart file: {e}")))?;
                    file = Some((name, data));
                }
                Some("channels") => {
                    let text = field
                        .text()
                        .await
                        .map_err(|e| ApiError::BadRequest(format!("multipart channels: {e}")))?;
                    channels.extend(csv_list(Some(&text)));
                }
                _ => {}
            }
        }
        let (name, data) =
            file.ok_or_else(|| ApiError::unprocessable("file", "a `file` part is required"))?;
        intake::submit_bytes_with(
            &s.db,
            &s.channels,
            &s.settings,
            &data,
            &channels,
            &format!("upload:{name}"),
            Some(&who),
            q.token_budget,
        )
        .await?
    } else {
        let body = Bytes::from_request(req, &s)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        match wrapper(&body, &s.settings.limits)? {
            Some((records, wrapped_channels, wrapped_budget)) => {
                channels.extend(wrapped_channels);
                let list = s.channels.resolve(&channels)?;
                intake::submit_records(
                    &s.db,
                    &s.settings,
                    records,
                    list,
                    &source,
                    Some(&who),
                    q.token_budget.or(wrapped_budget),
                )
                .await?
            }
            None => {
                intake::submit_bytes_with(
                    &s.db,
                    &s.channels,
                    &s.settings,
                    &body,
                    &channels,
                    &source,
                    Some(&who),
                    q.token_budget,
                )
                .await?
            }
        }
    };
    Ok((StatusCode::ACCEPTED, Json(receipt(&report))))
}

type Records = Vec<(Position, Result<spec::ProductSpec, spec::SpecError>)>;
/// A wrapper body: its records, its channels and its token budget.
type Wrapped = (Records, Vec<String>, Option<i64>);

/// `{"products": [...], "channels": [...]}` or `{"product": {...}}`; `None` for any other body.
fn wrapper(body: &[u8], limits: &crate::config::InputLimits) -> Result<Option<Wrapped>, ApiError> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    if !obj.contains_key("products") && !obj.contains_key("product") {
        return Ok(None);
    }
    let channels = match obj.remove("channels") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::unprocessable(
                    "channels",
                    "must be an array of channel names",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::String(s)) => csv_list(Some(&s)),
        Some(_) => {
            return Err(ApiError::unprocessable(
                "channels",
                "must be an array of channel names",
            ))
        }
    };
    let budget = match obj.remove("token_budget") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_i64().ok_or_else(|| {
            ApiError::unprocessable("token_budget", "must be a positive whole number")
        })?),
        Some(_) => return Err(ApiError::unprocessable("token_budget", "must be a number")),
    };
    let records = match (obj.remove("products"), obj.remove("product")) {
        (Some(Value::Array(items)), None) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    Position::Index(i),
                    spec::validate(v, Position::Index(i), limits),
                )
            })
            .collect(),
        (None, Some(v)) => vec![(
            Position::Single,
            spec::validate(v, Position::Single, limits),
        )],
        (Some(_), None) => {
            return Err(ApiError::unprocessable(
                "products",
                "must be an array of products",
            ))
        }
        _ => {
            return Err(ApiError::unprocessable(
                "products",
                "give either `products` (an array) or `product` (an object), not both",
            ))
        }
    };
    Ok(Some((records, channels, budget)))
}

fn receipt(r: &IntakeReport) -> Value {
    json!({
        "batch_id": r.batch_id,
        "channels": r.channels,
        "accepted": r.accepted,
        "tasks": r.tasks,
        "rejected": r.rejected,
        "status_url": format!("/v1/batches/{}", r.batch_id),
    })
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_any(&[Role::Submitter, Role::Reviewer])?;
    let batches = store::batches::list(&s.db, q.limit.unwrap_or(50).clamp(1, 500)).await?;
    Ok(Json(json!({ "batches": batches })))
}

async fn status(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_any(&[Role::Submitter, Role::Reviewer])?;
    let b = store::batches::get(&s.db, &id).await?;
    Ok(Json(
        serde_json::to_value(b).map_err(|e| ApiError::Internal(e.to_string()))?,
    ))
}

#[derive(Debug, Deserialize)]
struct TasksQuery {
    status: Option<String>,
    limit: Option<i64>,
}

async fn tasks(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<TasksQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require_any(&[Role::Submitter, Role::Reviewer])?;
    let status = match q.status.as_deref() {
        None => None,
        Some(x) => Some(TaskStatus::parse(x).ok_or_else(|| {
            ApiError::unprocessable(
                "status",
                format!("unknown task status `{x}` (queued, running, retrying, succeeded, failed)"),
            )
        })?),
    };
    store::batches::get(&s.db, &id).await?;
    let tasks =
        store::tasks::list_for_batch(&s.db, &id, status, q.limit.unwrap_or(1000).clamp(1, 10_000))
            .await?;
    Ok(Json(json!({ "tasks": tasks })))
}

async fn errors(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_any(&[Role::Submitter, Role::Reviewer])?;
    store::batches::get(&s.db, &id).await?;
    let errors = store::batches::input_errors(&s.db, &id).await?;
    Ok(Json(json!({ "errors": errors })))
}

async fn task(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require_any(&[Role::Submitter, Role::Reviewer])?;
    let t = store::tasks::get(&s.db, &id).await?;
    Ok(Json(
        serde_json::to_value(t).map_err(|e| ApiError::Internal(e.to_string()))?,
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetBody {
    /// Tokens the batch may spend; `null` removes the limit.
    token_budget: Option<i64>,
}

/// Sets (or removes) a batch's token budget and resumes its parked tasks when it allows.
async fn set_budget(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(b): Json<BudgetBody>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Submitter)?;
    if b.token_budget.is_some_and(|t| t <= 0) {
        return Err(ApiError::unprocessable(
            "token_budget",
            "must be a positive number of tokens, or null",
        ));
    }
    store::limits::set_batch_budget(&s.db, &id, b.token_budget).await?;
    store::audit::record(
        &s.db,
        &store::audit::Entry::new(&caller.actor(), "batch.budget", "batch", &id)
            .after(serde_json::json!({"token_budget": b.token_budget})),
    )
    .await?;
    let resumed = match crate::limits::over_budget(
        &s.db,
        None,
        &id,
        store::limits::batch_budget(&s.db, &id).await?,
    )
    .await?
    {
        None => store::limits::resume_parked(&s.db, Some(&id), "batch token budget").await?,
        Some(_) => 0,
    };
    let batch = store::batches::get(&s.db, &id).await?;
    Ok(Json(json!({ "batch": batch, "resumed_tasks": resumed })))
}
