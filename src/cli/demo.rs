//! `enricher demo`: the whole path on the embedded defaults, for a new user.
//!
//! Fetches the default model when missing, starts the API and the workers, submits the
//! example products, waits with a progress bar, prints a summary and how to review.

use std::{
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use enricher::{
    auth::{self, Role},
    config::{ProviderKind, Settings},
    intake, models,
    startup::{self, App, RunOptions},
    store::{self, drafts::DraftFilter},
};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Products to enrich.
    #[arg(long, default_value = "examples/products.jsonl")]
    pub input: PathBuf,
    /// Keep serving the API after the batch is done (until ctrl-c).
    #[arg(long)]
    pub serve: bool,
}

pub async fn run(settings: Settings, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    // The model first: it is the slow part on a fresh machine.
    let mut fetched_in = None;
    for (name, p) in &settings.providers {
        let used =
            settings.default_provider == *name || settings.routing.values().any(|v| v == name);
        if used && p.kind == ProviderKind::Local {
            let dir = settings.paths.models_dir.clone();
            let model = p.model.clone();
            if models::locate(&dir, &model).is_err() {
                eprintln!("fetching model {model} (about 100 MB, once)...");
                let t = Instant::now();
                tokio::task::spawn_blocking(move || models::fetch(&dir, &model, false)).await??;
                fetched_in = Some(t.elapsed());
            }
        }
    }
    let bytes =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let app = App::init(settings).await.context("starting")?;
    let t_load = Instant::now();
    let pipeline = app.pipeline().await.context("loading the model")?;
    let load_time = t_load.elapsed();
    // Listen on the configured address; if it is taken, on any free port.
    let bind = app.settings.http.bind;
    let running = match startup::start(
        &app,
        RunOptions {
            http: Some(bind),
            workers: Some(pipeline.clone()),
            worker_name: startup::default_worker_name(),
            grace: Duration::from_secs(60),
        },
    )
    .await
    {
        Ok(r) => r,
        Err(startup::StartupError::Bind { .. }) => {
            startup::start(
                &app,
                RunOptions {
                    http: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
                    workers: Some(pipeline),
                    worker_name: startup::default_worker_name(),
                    grace: Duration::from_secs(60),
                },
            )
            .await?
        }
        Err(e) => return Err(e.into()),
    };
    let addr = running.http_addr.context("no HTTP address")?;
    let report = intake::submit_bytes(
        &app.db,
        &app.channels,
        &app.settings,
        &bytes,
        &[],
        &args.input.display().to_string(),
        Some("demo"),
    )
    .await?;
    eprintln!(
        "submitted {} products x {} channels ({} tasks) from {}",
        report.accepted,
        report.channels.len(),
        report.tasks,
        args.input.display()
    );
    for e in &report.rejected {
        eprintln!("refused: {e}");
    }
    let t_run = Instant::now();
    let status = super::submit::follow(&app, &report.batch_id, true, false).await?;
    let run_time = t_run.elapsed();
    println!();
    super::submit::print_status(&app, &status, true).await?;
    let drafts = store::drafts::list(
        &app.db,
        &DraftFilter {
            batch_id: Some(report.batch_id.clone()),
            limit: 1000,
            ..Default::default()
        },
    )
    .await?;
    println!();
    println!("drafts:");
    for d in &drafts {
        let head = d
            .fields
            .get("title")
            .or_else(|| d.fields.get("post"))
            .map(|v| v.joined())
            .unwrap_or_default();
        println!(
            "  {}  {:<16} {:<7} {:<22} {}",
            d.id,
            d.status.as_str(),
            d.channel,
            d.product_id,
            head
        );
    }
    let per_task = if status.tasks > 0 {
        run_time / status.tasks as u32
    } else {
        Duration::ZERO
    };
    println!();
    println!(
        "timings: {}model load {:.1}s, {} tasks in {:.1}s ({:.1}s per task), total {:.1}s",
        fetched_in
            .map(|d| format!("model fetch {:.1}s, ", d.as_secs_f64()))
            .unwrap_or_default(),
        load_time.as_secs_f64(),
        status.tasks,
        run_time.as_secs_f64(),
        per_task.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let first = drafts
        .iter()
        .find(|d| d.status.is_open())
        .map(|d| d.id.clone())
        .unwrap_or_else(|| "DRAFT_ID".into());
    let token = auth::create_token(&app.db, "demo", &[Role::Admin, Role::Reviewer], "demo").await?;
    println!();
    println!("review them:");
    println!("  cargo run -- drafts list --status pending_review");
    println!("  cargo run -- drafts show {first}");
    println!("  cargo run -- approve {first}");
    println!("  cargo run -- reject DRAFT_ID --reason \"...\"");
    println!("  cargo run -- export --status approved --format jsonl");
    println!();
    println!("or in the browser: `cargo run -- serve`, open http://{}/ui and log in with this local admin/reviewer token", app.settings.http.bind);
    println!(
        "(shown once; create more with `cargo run -- tokens create --name NAME --role reviewer`):"
    );
    println!("  {}", token.token);
    println!(
        "the same token works for the API: curl -H 'Authorization: Bearer {}' http://{}/v1/drafts",
        token.token, app.settings.http.bind
    );
    let _ = addr;
    if args.serve {
        eprintln!("serving on http://{addr} until ctrl-c");
        startup::shutdown_signal().await;
    }
    running.shutdown().await.map_err(anyhow::Error::msg)?;
    app.db.close().await;
    Ok(ExitCode::SUCCESS)
}
