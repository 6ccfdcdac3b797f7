//! Token administration (admin role).
//!
//! - `POST /v1/tokens` `{"name": "...", "roles": ["reviewer", ...]}` -> the token, shown once
//! - `GET /v1/tokens` -> tokens without secrets
//! - `DELETE /v1/tokens/{id}` -> revoke

use axum::{
    extract::{Path, State},
    http::StatusCode,
    routing::{delete, get},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::{
    auth::{self, Caller, Role},
    store::{self, audit},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tokens", get(list).post(create))
        .route("/v1/tokens/{id}", delete(revoke))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    roles: Vec<String>,
}

async fn create(
    State(s): State<AppState>,
    caller: Caller,
    Json(b): Json<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Admin)?;
    let mut roles = Vec::new();
    for r in &b.roles {
        roles.push(Role::parse(r).ok_or_else(|| {
            ApiError::unprocessable(
                "roles",
                format!("unknown role `{r}` (one of: submitter, reviewer, consumer, admin)"),
            )
        })?);
    }
    let t = auth::create_token(&s.db, &b.name, &roles, &caller.actor()).await?;
    audit::record(
        &s.db,
        &audit::Entry::new(&caller.actor(), "token.create", "token", &t.id)
            .after(json!({"name": t.name, "roles": t.roles})),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!(t))))
}

async fn list(State(s): State<AppState>, caller: Caller) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    Ok(Json(json!({ "tokens": store::tokens::list(&s.db).await? })))
}

async fn revoke(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    store::tokens::revoke(&s.db, &id).await?;
    audit::record(
        &s.db,
        &audit::Entry::new(&caller.actor(), "token.revoke", "token", &id),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
