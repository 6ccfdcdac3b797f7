//! `enricher bench queue|pipeline|remote`: prints figures (see `enricher::bench`).

use std::process::ExitCode;

use clap::Subcommand;
use enricher::{bench, config::Settings};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// End-to-end jobs/s (submit -> draft stored) with the instant stub provider.
    Queue {
        /// sqlite, postgres, or both (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "sqlite")]
        backend: Vec<String>,
        /// Worker processes to try (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        workers: Vec<usize>,
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
        /// Tasks in flight per worker process.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Tasks fetched (and acknowledged) per queue round trip.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// PostgreSQL server for the postgres runs (a database is created and dropped).
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
        pg: String,
    },
    /// CPU per job of the pipeline alone (render, generate with the stub, parse, check).
    Pipeline {
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
    },
    /// Local inference speed: prompt and generation tokens/s, time to first token, peak RSS.
    Local {
        /// A model from models/models.toml (default: the local provider's).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 300)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 64)]
        gen_tokens: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also send this many requests at once and report the aggregate generation rate.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Write the prompt (text and token ids) here, to run the same prompt elsewhere.
        #[arg(long)]
        dump_prompt: Option<std::path::PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remote-provider throughput against a loopback server with a fixed latency.
    Remote {
        #[arg(long, default_value_t = 200)]
        latency_ms: u64,
        #[arg(long, value_delimiter = ',', default_value = "8,32,64")]
        concurrency: Vec<usize>,
        /// Requests per concurrency slot.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
}

pub async fn run(settings: Settings, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Queue {
            backend,
            workers,
            jobs,
            concurrency,
            batch_size,
            pg,
        } => {
            println!(
                "| backend | worker processes | jobs | seconds | jobs/s | worker CPU ms/job |"
            );
            println!("| --- | --- | --- | --- | --- | --- |");
            for b in &backend {
                for &w in &workers {
                    let f =
                        bench::queue(&settings, b, w, jobs, concurrency, batch_size, &pg).await?;
                    println!(
                        "| {} | {} | {} | {:.2} | {:.0} | {:.3} |",
                        f.backend,
                        f.workers,
                        f.jobs,
                        f.seconds,
                        f.jobs_per_second,
                        f.worker_cpu_ms_per_job
                    );
                }
            }
        }
        BenchCommand::Pipeline { jobs } => {
            let f = bench::pipeline(&settings, jobs).await?;
            println!(
                "pipeline (channels {}): {} jobs, {:.3} ms CPU per job, {:.3} ms wall per job",
                f.channels.join(","),
                f.jobs,
                f.cpu_ms_per_job,
                f.wall_ms_per_job
            );
        }
        BenchCommand::Local {
            model,
            prompt_tokens,
            gen_tokens,
            runs,
            batch,
            dump_prompt,
            json,
        } => {
            let f = bench::local(
                &settings,
                model.as_deref(),
                prompt_tokens,
                gen_tokens,
                runs,
                batch,
                dump_prompt.as_deref(),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&f)?);
            } else {
                println!("| model | prompt tokens | prompt tok/s | gen tok/s | first token ms | batch | batch gen tok/s | batch speedup | peak RSS MiB (file MiB) |");
                println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
                println!(
                    "| {} | {} | {:.1} | {:.1} | {:.0} | {} | {} | {} | {:.0} ({:.0}) |",
                    f.model,
                    f.prompt_tokens,
                    f.prompt_tokens_per_s,
                    f.gen_tokens_per_s,
                    f.time_to_first_token_ms,
                    f.batch,
                    f.batch_gen_tokens_per_s
                        .map(|x| format!("{x:.1}"))
                        .unwrap_or_else(|| "-".into()),
                    f.batch_speedup
                        .map(|x| format!("{x:.2}x"))
                        .unwrap_or_else(|| "-".into()),
                    f.peak_rss_mib,
                    f.model_file_mib
                );
            }
        }
        BenchCommand::Remote {
            latency_ms,
            concurrency,
            rounds,
        } => {
            println!("| concurrency | latency ms | requests | seconds | req/s | limit req/s | fraction of limit |");
            println!("| --- | --- | --- | --- | --- | --- | --- |");
            for c in concurrency {
                let f = bench::remote(c, latency_ms, rounds).await?;
                println!(
                    "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1}% |",
                    f.concurrency,
                    f.latency_ms,
                    f.requests,
                    f.seconds,
                    f.requests_per_second,
                    f.limit_per_second,
                    f.fraction_of_limit * 100.0
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
