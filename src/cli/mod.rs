//! Command implementations (the binary edge: anyhow lives here, not in the library).

pub mod bench;
pub mod demo;
pub mod eval;
pub mod models;
pub mod review;
pub mod submit;
pub mod tokens;
pub mod webhooks;

use std::{path::Path, process::ExitCode, time::Duration};

use anyhow::Context;
use enricher::{
    config::Settings,
    startup::{self, App, RunOptions},
};

use crate::Command;

pub async fn run(config: Option<&Path>, command: Command) -> anyhow::Result<ExitCode> {
    let mut settings = Settings::load(config)?;
    // One-shot commands talk to a person: only warnings and errors in the log unless asked.
    let long_running = matches!(command, Command::Serve { .. } | Command::Worker);
    if !long_running
        && std::env::var_os("RUST_LOG").is_none()
        && std::env::var_os("ENRICHER_LOG__FILTER").is_none()
    {
        settings.log.filter = "warn".into();
    }
    enricher::telemetry::init(&settings.log);
    match command {
        Command::Demo(args) => demo::run(settings, args).await,
        Command::Serve { bind, no_workers } => serve(settings, bind, !no_workers, true).await,
        Command::Worker => serve(settings, None, true, false).await,
        Command::Submit(args) => submit::submit(settings, args).await,
        Command::Status(args) => submit::status(settings, args).await,
        Command::Budget(args) => submit::budget(settings, args).await,
        Command::Drafts(cmd) => review::drafts(settings, cmd).await,
        Command::Approve(args) => review::approve(settings, args).await,
        Command::Reject(args) => review::reject(settings, args).await,
        Command::Regenerate(args) => review::regenerate(settings, args).await,
        Command::Export(args) => review::export(settings, args).await,
        Command::Models(cmd) => models::run(settings, cmd).await,
        Command::Tokens(cmd) => tokens::run(settings, cmd).await,
        Command::Bench(cmd) => bench::run(settings, cmd).await,
        Command::Eval(args) => eval::run(settings, args).await,
        Command::Webhooks(cmd) => webhooks::webhooks(settings, cmd).await,
        Command::Deliveries(cmd) => webhooks::deliveries(settings, cmd).await,
        Command::Migrate => {
            let app = App::init(settings).await?;
            println!("database migrated ({})", app.db.backend());
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve(
    settings: Settings,
    bind: Option<std::net::SocketAddr>,
    workers: bool,
    http: bool,
) -> anyhow::Result<ExitCode> {
    let bind = bind.unwrap_or(settings.http.bind);
    let app = App::init(settings).await.context("starting")?;
    let pipeline = if workers {
        Some(
            app.pipeline()
                .await
                .context("loading the model providers")?,
        )
    } else {
        None
    };
    let running = startup::start(
        &app,
        RunOptions {
            http: http.then_some(bind),
            workers: pipeline,
            worker_name: startup::default_worker_name(),
            grace: Duration::from_secs(app.settings.worker.task_timeout_s.min(120)),
        },
    )
    .await?;
    if let Some(addr) = running.http_addr {
        eprintln!("enricher API on http://{addr}/v1 (health: /healthz)");
    }
    let token = running.token();
    tokio::spawn(async move {
        startup::shutdown_signal().await;
        token.cancel();
    });
    running.wait().await.map_err(anyhow::Error::msg)?;
    app.db.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Opens the app for a command that only reads or writes the database.
pub async fn open(settings: Settings) -> anyhow::Result<App> {
    App::init(settings).await.context("opening the database")
}
