//! `enricher submit` and `enricher status`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Args;
use enricher::{
    config::Settings,
    intake::{self, IntakeError},
    startup::{self, App, RunOptions},
    store::{self, batches::BatchStatus, jobs, tasks::TaskStatus},
};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Products: a JSON object, a JSON array, or JSONL; `-` reads standard input.
    pub file: PathBuf,
    /// Channels to generate (comma-separated); default: all.
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// Queue the batch and return at once.
    #[arg(long)]
    pub no_wait: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Tokens (prompt + completion) this batch may spend; over it, the batch pauses.
    #[arg(long)]
    pub token_budget: Option<i64>,
}

#[derive(Debug, Args)]
pub struct BudgetArgs {
    pub batch: String,
    /// The batch's new token budget.
    #[arg(
        long,
        conflicts_with = "unlimited",
        required_unless_present = "unlimited"
    )]
    pub tokens: Option<i64>,
    /// Remove the batch's token budget.
    #[arg(long)]
    pub unlimited: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Batch id; without it, the most recent batches are listed.
    pub batch: Option<String>,
    /// Show every failed task with its last error.
    #[arg(long)]
    pub failed: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn submit(settings: Settings, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let bytes = if args.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        buf
    } else {
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?
    };
    let app = super::open(settings).await?;
    let source = args.file.display().to_string();
    let report = match intake::submit_bytes_with(
        &app.db,
        &app.channels,
        &app.settings,
        &bytes,
        &args.channels,
        &source,
        Some("cli"),
        args.token_budget,
    )
    .await
    {
        Ok(r) => r,
        Err(IntakeError::NothingValid(errors)) => {
            for e in &errors {
                eprintln!("refused: {e}");
            }
            anyhow::bail!("no valid product in {source} ({} refused)", errors.len());
        }
        Err(e) => return Err(e.into()),
    };
    for e in &report.rejected {
        eprintln!("refused: {e}");
    }
    eprintln!(
        "batch {}: {} products x {} channels = {} tasks queued{}",
        report.batch_id,
        report.accepted,
        report.channels.len(),
        report.tasks,
        if report.rejected.is_empty() {
            String::new()
        } else {
            format!(", {} records refused", report.rejected.len())
        }
    );
    if args.no_wait {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let status = follow(&app, &report.batch_id, !args.json, true).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&app, &status, true).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for a batch to finish, with a progress bar. When `may_work` and no worker is
/// running anywhere, runs workers in this process meanwhile (a caller that has just started
/// its own workers passes false: they may not have registered yet).
pub async fn follow(
    app: &App,
    batch_id: &str,
    bar: bool,
    may_work: bool,
) -> anyhow::Result<BatchStatus> {
    let work_here = may_work
        && jobs::live_workers(&app.db, jobs::ENRICH_QUEUE, 60)
            .await
            .unwrap_or(0)
            == 0;
    let local = if work_here {
        eprintln!("no worker is running; processing in this process (start `enricher serve` or `enricher worker` to share the work)");
        let pipeline = app
            .pipeline()
            .await
            .context("loading the model providers")?;
        Some(
            startup::start(
                app,
                RunOptions {
                    http: None,
                    workers: Some(pipeline),
                    worker_name: startup::default_worker_name(),
                    grace: Duration::from_secs(30),
                },
            )
            .await?,
        )
    } else {
        None
    };
    let mut status = store::batches::get(&app.db, batch_id).await?;
    let pb = if bar {
        let pb = ProgressBar::new(status.tasks as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tasks {msg} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    loop {
        let done = status
            .tasks_by_status
            .get("succeeded")
            .copied()
            .unwrap_or(0)
            + status.tasks_by_status.get("failed").copied().unwrap_or(0);
        pb.set_position(done as u64);
        pb.set_message(summary_line(&status));
        if status.done {
            break;
        }
        let active = ["running", "retrying"]
            .iter()
            .map(|k| status.tasks_by_status.get(*k).copied().unwrap_or(0))
            .sum::<i64>();
        if let Some(reason) = &status.paused_reason {
            if active == 0
                && store::limits::parked_count(&app.db, batch_id)
                    .await
                    .unwrap_or(0)
                    > 0
            {
                pb.abandon_with_message(format!("paused: {reason}"));
                eprintln!(
                    "batch {batch_id} is paused: {reason}\nraise its budget with `enricher budget {batch_id} --tokens N` (or --unlimited)"
                );
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        status = store::batches::get(&app.db, batch_id).await?;
    }
    pb.finish();
    if let Some(running) = local {
        running.shutdown().await.map_err(anyhow::Error::msg)?;
    }
    Ok(status)
}

fn summary_line(s: &BatchStatus) -> String {
    let mut parts = Vec::new();
    for (k, v) in &s.drafts_by_status {
        parts.push(format!("{k}: {v}"));
    }
    if let Some(f) = s.tasks_by_status.get("failed") {
        parts.push(format!("failed: {f}"));
    }
    if let Some(r) = s.tasks_by_status.get("retrying") {
        parts.push(format!("retrying: {r}"));
    }
    parts.join(", ")
}

pub async fn print_status(app: &App, s: &BatchStatus, show_failed: bool) -> anyhow::Result<()> {
    println!(
        "batch {}  ({})",
        s.id,
        if s.done { "done" } else { "in progress" }
    );
    println!("  source:    {}", s.source);
    println!("  channels:  {}", s.channels.join(", "));
    println!(
        "  products:  {} ({} input records refused)",
        s.products, s.input_errors
    );
    let tasks: Vec<String> = s
        .tasks_by_status
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("  tasks:     {} ({})", s.tasks, tasks.join(", "));
    let drafts: Vec<String> = s
        .drafts_by_status
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "  drafts:    {}",
        if drafts.is_empty() {
            "none yet".to_string()
        } else {
            drafts.join(", ")
        }
    );
    if show_failed {
        let failed =
            store::tasks::list_for_batch(&app.db, &s.id, Some(TaskStatus::Failed), 50).await?;
        for t in &failed {
            println!(
                "  failed: {} / {}: {}",
                t.product_id,
                t.channel,
                t.last_error.as_deref().unwrap_or("?")
            );
        }
    }
    Ok(())
}

pub async fn status(settings: Settings, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    match &args.batch {
        Some(id) => {
            let s = store::batches::get(&app.db, id).await?;
            if args.json {
                let failed =
                    store::tasks::list_for_batch(&app.db, id, Some(TaskStatus::Failed), 10_000)
                        .await?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "batch": s, "failed_tasks": failed })
                    )?
                );
            } else {
                print_status(&app, &s, true).await?;
                if args.failed {
                    let errs = store::batches::input_errors(&app.db, id).await?;
                    for e in errs {
                        println!("  refused {}: {}: {}", e.position, e.field, e.message);
                    }
                }
            }
        }
        None => {
            let list = store::batches::list(&app.db, 20).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no batches yet; submit one with `enricher submit FILE`");
            } else {
                for b in list {
                    println!(
                        "{}  {}  {} products  {} tasks  {}  [{}]",
                        b.id,
                        chrono::DateTime::from_timestamp_millis(b.created_at)
                            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                            .unwrap_or_default(),
                        b.products,
                        b.tasks,
                        if b.done { "done" } else { "in progress" },
                        summary_line(&b)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn budget(settings: Settings, args: BudgetArgs) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    let budget = if args.unlimited { None } else { args.tokens };
    if budget.is_some_and(|b| b <= 0) {
        anyhow::bail!("--tokens must be a positive number");
    }
    store::limits::set_batch_budget(&app.db, &args.batch, budget).await?;
    let resumed = match enricher::limits::over_budget(
        &app.db,
        None,
        &args.batch,
        store::limits::batch_budget(&app.db, &args.batch).await?,
    )
    .await?
    {
        None => {
            store::limits::resume_parked(&app.db, Some(&args.batch), "batch token budget").await?
        }
        Some(_) => 0,
    };
    println!(
        "batch {}: token budget {}; {resumed} parked tasks resumed",
        args.batch,
        budget.map_or("removed".to_string(), |b| b.to_string())
    );
    Ok(ExitCode::SUCCESS)
}
