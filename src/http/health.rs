//! `/healthz`: the process is up. `/readyz`: the database answers (the model is loaded
//! before the server starts listening, so a listening server has its providers).

use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let db = s.db.ping().await;
    let status = if db {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({ "status": if db { "ready" } else { "not_ready" }, "database": db, "backend": s.db.backend() }),
        ),
    )
}
