//! `GET /metrics`: Prometheus text format. Counters and histograms come from the process;
//! gauges of tasks, drafts and queue depth are read from the database at scrape time, so
//! any front end reports the state of the whole (shared) database.

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};

use super::AppState;
use crate::store::{self, jobs};

pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

async fn render(State(s): State<AppState>) -> impl IntoResponse {
    let Some(handle) = crate::telemetry::metrics() else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            "metrics recorder not installed\n".to_string(),
        );
    };
    if let Ok(rows) = store::stats::tasks_by_status(&s.db).await {
        for (status, n) in rows {
            metrics::gauge!("enricher_tasks", "status" => status).set(n as f64);
        }
    }
    if let Ok(rows) = store::stats::drafts_by_status(&s.db).await {
        for (status, n) in rows {
            metrics::gauge!("enricher_drafts", "status" => status).set(n as f64);
        }
    }
    if let Ok(rows) = store::stats::deliveries_by_status(&s.db).await {
        for (status, n) in rows {
            metrics::gauge!("enricher_deliveries", "status" => status).set(n as f64);
        }
    }
    if let Ok(n) = jobs::queue_depth(&s.db, jobs::ENRICH_QUEUE).await {
        metrics::gauge!("enricher_queue_depth").set(n as f64);
    }
    (
        axum::http::StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}
