//! The HTTP API (JSON under `/v1`) and health endpoints, served by axum.
//! Each submodule exposes `router()`; they are merged here once.

pub mod auth;
mod batches;
mod content;
mod drafts;
pub mod error;
mod feed;
mod health;
mod metrics;
mod tokens;
mod ui;
mod webhooks;

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::DefaultBodyLimit, Router};
use tower_http::trace::TraceLayer;

use crate::{channel::Channels, config::Settings, store::Db};

pub use error::ApiError;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub channels: Arc<Channels>,
    pub settings: Arc<Settings>,
}

pub fn router(state: AppState) -> Router {
    let limit = state.settings.http.max_body_mib * 1024 * 1024;
    Router::new()
        .merge(health::router())
        .merge(metrics::router())
        .merge(batches::router())
        .merge(drafts::router())
        .merge(content::router())
        .merge(tokens::router())
        .merge(ui::router())
        .merge(webhooks::router())
        .merge(feed::router())
        .layer(DefaultBodyLimit::max(limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// A bound HTTP server; `port()` is the real port (so port 0 works in tests).
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    app: Router,
}

impl HttpServer {
    pub async fn bind(addr: SocketAddr, state: AppState) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Ok(Self {
            listener,
            app: router(state),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, self.app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// Parses an optional comma-separated query value into a list.
pub(crate) fn csv_list(v: Option<&str>) -> Vec<String> {
    v.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}
