//! Logging with tracing: human-readable by default, JSON lines with `log.format = "json"`.
//! `RUST_LOG` overrides the configured filter.

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::LogSettings;

/// Installs the global subscriber; a second call is a no-op (tests call it many times).
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = if settings.format == "json" {
        registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(fmt::layer().with_target(false).with_writer(std::io::stderr))
            .try_init()
    };
}
