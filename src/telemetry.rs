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

/// The process's Prometheus recorder, installed on first use. `None` when another recorder
/// was installed first (metrics then go there).
pub fn metrics() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                        300.0,
                    ],
                )
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "enricher_attempts_total",
        "Task attempts by outcome (succeeded, retry, failed, duplicate)."
    );
    describe_histogram!(
        "enricher_task_duration_seconds",
        Unit::Seconds,
        "Wall time of one task attempt, by channel and outcome."
    );
    describe_counter!(
        "enricher_tokens_total",
        "Model tokens by provider and direction (prompt, completion)."
    );
    describe_counter!(
        "enricher_provider_errors_total",
        "Provider errors by provider and kind."
    );
    describe_counter!(
        "enricher_drafts_created_total",
        "Drafts stored, by channel and status."
    );
    describe_gauge!(
        "enricher_tasks",
        "Tasks by status (from the database at scrape time)."
    );
    describe_gauge!(
        "enricher_drafts",
        "Drafts by status (from the database at scrape time)."
    );
    describe_gauge!(
        "enricher_queue_depth",
        "Queue jobs not finished yet (from the database at scrape time)."
    );
}
