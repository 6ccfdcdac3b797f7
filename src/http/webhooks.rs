//! Webhook subscriptions and their deliveries (admin role).
//!
//! - `POST /v1/webhooks` `{"url", "secret"?, "event_types"?: [..], "channel"?, "description"?}`
//!   -> 201 with the subscription and its signing secret (shown this once)
//! - `GET /v1/webhooks?include_removed=true` -> subscriptions (no secrets) with delivery counts
//! - `GET /v1/webhooks/{id}`, `DELETE /v1/webhooks/{id}` (cancels its outstanding deliveries)
//! - `GET /v1/deliveries?status=dead&subscription=&product=&before=&limit=` -> newest first
//! - `GET /v1/deliveries/{id}` -> the delivery and its attempt log
//! - `POST /v1/deliveries/{id}/replay` -> a dead delivery goes back in line
//! - `POST /v1/deliveries/replay` `{"subscription_id"?}` -> every dead delivery goes back

use std::collections::BTreeMap;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::{
    auth::{Caller, Role},
    delivery::webhooks::{self, CreateSubscription, WebhookError},
    store::{
        self,
        deliveries::{DeliveryFilter, DeliveryStatus},
        Db,
    },
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/webhooks", get(list).post(create))
        .route("/v1/webhooks/{id}", get(show).delete(remove))
        .route("/v1/deliveries", get(deliveries))
        .route("/v1/deliveries/replay", post(replay_dead))
        .route("/v1/deliveries/{id}", get(delivery))
        .route("/v1/deliveries/{id}/replay", post(replay))
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        match e {
            e @ WebhookError::Url(_) => ApiError::unprocessable("url", e.to_string()),
            WebhookError::Invalid { field, message } => ApiError::unprocessable(&field, message),
            WebhookError::Store(s) => s.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    url: String,
    secret: Option<String>,
    #[serde(default)]
    event_types: Vec<String>,
    channel: Option<String>,
    description: Option<String>,
}

async fn create(
    State(s): State<AppState>,
    caller: Caller,
    Json(b): Json<CreateBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require(Role::Admin)?;
    let created = webhooks::create(
        &s.db,
        &s.channels,
        &s.settings.delivery,
        &CreateSubscription {
            url: b.url,
            secret: b.secret,
            event_types: b.event_types,
            channel: b.channel,
            description: b.description,
        },
        &caller.actor(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!(created))))
}

async fn counts(db: &Db, id: &str) -> Result<BTreeMap<String, i64>, ApiError> {
    Ok(store::deliveries::count_by_status(db, Some(id))
        .await?
        .into_iter()
        .collect())
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    include_removed: Option<bool>,
}

async fn list(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let subs = store::webhooks::list(&s.db, q.include_removed.unwrap_or(false)).await?;
    let mut out = Vec::with_capacity(subs.len());
    for sub in subs {
        let c = counts(&s.db, &sub.id).await?;
        let mut v = json!(sub);
        v["deliveries"] = json!(c);
        out.push(v);
    }
    Ok(Json(json!({ "webhooks": out })))
}

async fn show(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let sub = store::webhooks::get(&s.db, &id).await?;
    let mut v = json!(sub);
    v["deliveries"] = json!(counts(&s.db, &id).await?);
    Ok(Json(v))
}

async fn remove(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let cancelled = webhooks::remove(&s.db, &id, &caller.actor()).await?;
    Ok(Json(
        json!({ "removed": id, "cancelled_deliveries": cancelled }),
    ))
}

#[derive(Debug, Deserialize)]
struct DeliveriesQuery {
    status: Option<String>,
    subscription: Option<String>,
    product: Option<String>,
    before: Option<String>,
    limit: Option<i64>,
}

pub(crate) fn parse_delivery_status(s: Option<&str>) -> Result<Option<DeliveryStatus>, ApiError> {
    match s {
        None | Some("") => Ok(None),
        Some(x) => DeliveryStatus::parse(x).map(Some).ok_or_else(|| {
            ApiError::unprocessable(
                "status",
                format!(
                    "unknown delivery status `{x}` (one of: {})",
                    DeliveryStatus::ALL.map(|s| s.as_str()).join(", ")
                ),
            )
        }),
    }
}

async fn deliveries(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::unprocessable("limit", "must be 1 to 1000"));
    }
    let list = store::deliveries::list(
        &s.db,
        &DeliveryFilter {
            status: parse_delivery_status(q.status.as_deref())?,
            subscription_id: q.subscription,
            product_id: q.product,
            before: q.before,
            limit,
        },
    )
    .await?;
    let next = (list.len() as i64 == limit)
        .then(|| list.last().map(|d| d.id.clone()))
        .flatten();
    Ok(Json(json!({ "deliveries": list, "next_before": next })))
}

async fn delivery(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let d = store::deliveries::get(&s.db, &id).await?;
    let attempts = store::deliveries::attempts(&s.db, &id).await?;
    let mut v = json!(d);
    v["attempt_log"] = json!(attempts);
    Ok(Json(v))
}

async fn replay(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let d = webhooks::replay(&s.db, &id, &caller.actor()).await?;
    Ok(Json(json!({ "delivery": d })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    subscription_id: Option<String>,
}

async fn replay_dead(
    State(s): State<AppState>,
    caller: Caller,
    body: Option<Json<ReplayBody>>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Role::Admin)?;
    let b = body.map(|Json(b)| b).unwrap_or_default();
    if let Some(id) = &b.subscription_id {
        store::webhooks::get(&s.db, id).await?;
    }
    let n = webhooks::replay_dead(&s.db, b.subscription_id.as_deref(), &caller.actor()).await?;
    Ok(Json(json!({ "replayed": n })))
}
