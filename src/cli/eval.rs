//! `enricher eval`: run products through the real pipeline and report quality.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Args;
use enricher::{
    config::Settings,
    eval::{self, EvalReport},
    pipeline::Mode,
    startup::App,
};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Products (JSON, JSON array or JSONL).
    #[arg(long)]
    pub input: PathBuf,
    /// Channels (comma-separated); default: all.
    #[arg(long, value_delimiter = ',')]
    pub channels: Vec<String>,
    /// Provider for every channel (default: the configured routing).
    #[arg(long)]
    pub provider: Option<String>,
    /// Only the first N products.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write the Markdown report here (and the JSON report next to it, `.json`).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Also run the same model with a plain prompt and no structure, checks or repair.
    #[arg(long)]
    pub baseline: bool,
    /// Also run without grounded decoding (the local model may write any digits), to show
    /// what it changes in the grounding errors of first answers.
    #[arg(long)]
    pub ungrounded: bool,
    /// Drafts generated at once. With a local model they are decoded together (batched),
    /// up to `--batch` of them.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Requests the local model decodes together (its provider's `concurrency` for this
    /// run); default: `--concurrency`. With fewer, the other drafts in flight wait for a
    /// place in the batch (to compare batch sizes at the same load).
    #[arg(long)]
    pub batch: Option<usize>,
}

pub async fn run(mut settings: Settings, args: EvalArgs) -> anyhow::Result<ExitCode> {
    if let Some(p) = &args.provider {
        anyhow::ensure!(
            settings.providers.contains_key(p),
            "unknown provider `{p}` (configured: {})",
            settings
                .providers
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        settings.routing.clear();
        settings.default_provider = p.clone();
    }
    let concurrency = args.concurrency.max(1);
    let batch = args.batch.unwrap_or(concurrency).clamp(1, concurrency);
    for p in settings.providers.values_mut() {
        if p.kind == enricher::config::ProviderKind::Local {
            p.concurrency = batch;
        } else if p.concurrency < concurrency {
            p.concurrency = concurrency;
        }
    }
    // eval needs no queue: a throw-away database keeps the user's one untouched
    let tmp = std::env::temp_dir().join(format!("enricher-eval-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    settings.database_url = format!("sqlite://{}", tmp.join("eval.db").display());
    let app = App::init(settings).await.context("starting")?;
    let channels = app.channels.resolve(&args.channels)?;
    let specs = eval::load_specs(&args.input, args.limit, &app.settings.limits)?;
    let pipeline = app
        .pipeline()
        .await
        .context("loading the model providers")?;
    let provider = app.settings.provider_for(&channels[0]).to_string();
    let info = pipeline.providers.for_channel(&channels[0])?.info();
    let mut modes = vec![(Mode::Full, "enricher")];
    if args.ungrounded {
        modes.push((Mode::Ungrounded, "ungrounded"));
    }
    if args.baseline {
        modes.push((Mode::Baseline, "baseline"));
    }
    let mut reports = Vec::new();
    for (mode, name) in modes {
        let pb = ProgressBar::new((specs.len() * channels.len()) as u64);
        pb.set_style(
            ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {bar:40} {pos}/{len} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_message(name);
        let (samples, wall) = eval::run_mode(
            &pipeline,
            &specs,
            &channels,
            mode,
            concurrency,
            |done, _| pb.set_position(done as u64),
        )
        .await?;
        pb.finish();
        reports.push(eval::summarize(name, &samples, wall));
    }
    let mut take = |name: &str| {
        reports
            .iter()
            .position(|r| r.mode == name)
            .map(|i| reports.remove(i))
    };
    let (enricher, ungrounded, baseline) = (
        take("enricher").context("no report")?,
        take("ungrounded"),
        take("baseline"),
    );
    let report = EvalReport {
        input: args.input.display().to_string(),
        products: specs.len(),
        channels,
        provider,
        model: info.model,
        concurrency,
        batch,
        enricher,
        ungrounded,
        baseline,
    };
    let md = eval::markdown(&report);
    match &args.report {
        Some(path) => {
            std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
            let json = path.with_extension("json");
            std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
            eprintln!(
                "report written to {} and {}",
                path.display(),
                json.display()
            );
            println!("{}", md.split("\n## Rule failures").next().unwrap_or(&md));
        }
        None => println!("{md}"),
    }
    app.db.close().await;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(ExitCode::SUCCESS)
}
