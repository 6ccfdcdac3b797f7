//! The `enricher` command: parses the command line and calls into the library.

mod cli;

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "enricher",
    version,
    about = "AI content enrichment for product data: specs in, reviewed channel copy out"
)]
struct Cli {
    /// Configuration file (default: ./enricher.toml when it exists). Env: ENRICHER_CONFIG.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole thing on the defaults: fetch the model, start the service, enrich the
    /// example products, print a summary and how to review them.
    Demo(cli::demo::DemoArgs),
    /// Run the HTTP API and the queue workers.
    Serve {
        /// Address to listen on (default from config: 127.0.0.1:8080).
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// Serve the API only; run workers elsewhere (`enricher worker`).
        #[arg(long)]
        no_workers: bool,
    },
    /// Run queue workers only.
    Worker,
    /// Submit products (JSON object, JSON array or JSONL) and follow the batch.
    Submit(cli::submit::SubmitArgs),
    /// Show a batch's progress (or list recent batches).
    Status(cli::submit::StatusArgs),
    /// Set or remove a batch's token budget (resumes a paused batch).
    Budget(cli::submit::BudgetArgs),
    /// List or show drafts.
    #[command(subcommand)]
    Drafts(cli::review::DraftsCommand),
    /// Approve a draft (optionally with an edit).
    Approve(cli::review::ApproveArgs),
    /// Reject a draft with a reason.
    Reject(cli::review::RejectArgs),
    /// Queue a new draft for the same product and channel, with feedback for the model.
    Regenerate(cli::review::RegenerateArgs),
    /// Export drafts or approved content as JSONL or CSV.
    Export(cli::review::ExportArgs),
    /// List or fetch models.
    #[command(subcommand)]
    Models(cli::models::ModelsCommand),
    /// Create, list or revoke API tokens.
    #[command(subcommand)]
    Tokens(cli::tokens::TokensCommand),
    /// Run products through the real pipeline and report quality (optionally vs a baseline).
    Eval(cli::eval::EvalArgs),
    /// Measure throughput and overhead (prints figures).
    #[command(subcommand)]
    Bench(cli::bench::BenchCommand),
    /// Add, list or remove webhook subscriptions.
    #[command(subcommand)]
    Webhooks(cli::webhooks::WebhooksCommand),
    /// List, inspect or replay webhook deliveries.
    #[command(subcommand)]
    Deliveries(cli::webhooks::DeliveriesCommand),
    /// Create or upgrade the database schema.
    Migrate,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli.config.as_deref(), cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
