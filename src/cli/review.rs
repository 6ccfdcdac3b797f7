//! `enricher drafts`, `approve`, `reject`, `regenerate`, `export`: acting on the local
//! database directly (no token needed).

use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Args, Subcommand};
use enricher::{
    checks::{FieldValue, Fields},
    config::Settings,
    delivery::export::{self, ExportFilter, Format},
    review::{self, Actor, DraftStatus},
    store::{self, drafts::DraftFilter},
};

#[derive(Debug, Subcommand)]
pub enum DraftsCommand {
    /// List drafts.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        channel: Option<String>,
        #[arg(long)]
        batch: Option<String>,
        #[arg(long)]
        product: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one draft with its findings and provenance.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// Draft id(s).
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Edit before approving: FIELD=TEXT (a list field takes items separated by " | ").
    #[arg(long = "set", value_name = "FIELD=TEXT")]
    pub set: Vec<String>,
    /// Who approves (recorded in the audit trail); default: $USER.
    #[arg(long)]
    pub by: Option<String>,
}

#[derive(Debug, Args)]
pub struct RejectArgs {
    pub id: String,
    #[arg(long)]
    pub reason: String,
    #[arg(long)]
    pub by: Option<String>,
}

#[derive(Debug, Args)]
pub struct RegenerateArgs {
    pub id: String,
    /// What to change, passed to the model as data.
    #[arg(long, default_value = "")]
    pub feedback: String,
    #[arg(long)]
    pub by: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Draft status to export; `approved` exports the current approved versions.
    #[arg(long, default_value = "approved")]
    pub status: String,
    /// jsonl or csv.
    #[arg(long, default_value = "jsonl")]
    pub format: String,
    #[arg(long)]
    pub channel: Option<String>,
    #[arg(long)]
    pub batch: Option<String>,
    /// Only content approved (or drafts created) since: RFC 3339, YYYY-MM-DD, or epoch ms.
    #[arg(long)]
    pub since: Option<String>,
    /// Write to this file instead of standard output.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

fn who(by: &Option<String>) -> String {
    by.clone()
        .or_else(|| std::env::var("USER").ok())
        .map(|u| format!("cli:{u}"))
        .unwrap_or_else(|| "cli".into())
}

fn parse_status(s: &str) -> anyhow::Result<DraftStatus> {
    DraftStatus::parse(s).with_context(|| {
        format!(
            "unknown status `{s}` (one of: {})",
            DraftStatus::ALL.map(|s| s.as_str()).join(", ")
        )
    })
}

pub async fn drafts(settings: Settings, cmd: DraftsCommand) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    match cmd {
        DraftsCommand::List {
            status,
            channel,
            batch,
            product,
            limit,
            json,
        } => {
            let filter = DraftFilter {
                status: status.as_deref().map(parse_status).transpose()?,
                channel,
                batch_id: batch,
                product_id: product,
                limit: limit.clamp(1, 10_000),
                ..Default::default()
            };
            let list = store::drafts::list(&app.db, &filter).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no drafts match");
            }
            for d in list {
                let headline = d
                    .current_fields()
                    .get("title")
                    .or_else(|| d.current_fields().get("post"))
                    .map(FieldValue::joined)
                    .unwrap_or_default();
                println!(
                    "{}  {:<16} {:<8} {:<28} {}{}",
                    d.id,
                    d.status.as_str(),
                    d.channel,
                    truncate(&d.product_id, 28),
                    truncate(&headline, 60),
                    if d.findings.is_empty() {
                        String::new()
                    } else {
                        format!("  [{} findings]", d.findings.len())
                    }
                );
            }
        }
        DraftsCommand::Show { id, json } => {
            let d = store::drafts::get(&app.db, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!("draft {}  [{}]  revision {}", d.id, d.status, d.revision);
            println!(
                "product {}  channel {}  batch {}",
                d.product_id, d.channel, d.batch_id
            );
            for (name, value) in d.current_fields() {
                match value {
                    FieldValue::Text(t) => println!("  {name} ({} chars): {t}", t.chars().count()),
                    FieldValue::List(items) => {
                        println!("  {name}:");
                        for i in items {
                            println!("    - {i} ({} chars)", i.chars().count());
                        }
                    }
                }
            }
            if d.edited_fields.is_some() {
                println!("  (edited by a reviewer; generated text kept in the draft)");
            }
            for f in &d.findings {
                println!("  {:?} {} {}: {}", f.severity, f.rule, f.field, f.message);
            }
            if let Some(r) = &d.reject_reason {
                println!("  reason: {r}");
            }
            println!("  provenance: {}", d.provenance);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

pub async fn approve(settings: Settings, args: ApproveArgs) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    let by = who(&args.by);
    let mut failures = 0;
    for id in &args.ids {
        let edit = if args.set.is_empty() {
            None
        } else {
            let d = store::drafts::get(&app.db, id).await?;
            let mut fields: Fields = d.current_fields().clone();
            for kv in &args.set {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--set `{kv}`: expected FIELD=TEXT"))?;
                let value = match fields.get(k) {
                    Some(FieldValue::List(_)) => {
                        FieldValue::List(v.split(" | ").map(|s| s.trim().to_string()).collect())
                    }
                    _ => FieldValue::Text(v.to_string()),
                };
                fields.insert(k.to_string(), value);
            }
            Some(fields)
        };
        match review::approve(
            &app.db,
            &app.channels,
            id,
            edit.as_ref(),
            &Actor {
                name: &by,
                expected_revision: None,
            },
        )
        .await
        {
            Ok(c) => println!(
                "approved {id}: {} / {} version {}",
                c.product_id, c.channel, c.version
            ),
            Err(e) => {
                failures += 1;
                eprintln!("could not approve {id}: {e}");
                if let review::ReviewError::Invalid { findings, .. } = &e {
                    for f in findings {
                        eprintln!("  {:?} {} {}: {}", f.severity, f.rule, f.field, f.message);
                    }
                }
            }
        }
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn reject(settings: Settings, args: RejectArgs) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    let by = who(&args.by);
    let d = review::reject(
        &app.db,
        &args.id,
        &args.reason,
        &Actor {
            name: &by,
            expected_revision: None,
        },
    )
    .await?;
    println!("rejected {}: {} / {}", d.id, d.product_id, d.channel);
    Ok(ExitCode::SUCCESS)
}

pub async fn regenerate(settings: Settings, args: RegenerateArgs) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    let by = who(&args.by);
    let task = review::regenerate(
        &app.db,
        &args.id,
        &args.feedback,
        app.settings.worker.max_attempts,
        &Actor {
            name: &by,
            expected_revision: None,
        },
    )
    .await?;
    println!("queued task {task} to replace draft {} (run `enricher worker` or `enricher serve` to process it)", args.id);
    Ok(ExitCode::SUCCESS)
}

pub async fn export(settings: Settings, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    let status = parse_status(&args.status)?;
    let format: Format = args.format.parse()?;
    if let Some(c) = &args.channel {
        app.channels.get(c)?;
    }
    let since_ms = match &args.since {
        Some(s) => Some(enricher::delivery::export::parse_since(s).with_context(|| {
            format!("--since `{s}`: expected RFC 3339, YYYY-MM-DD or epoch milliseconds")
        })?),
        None => None,
    };
    let lines = export::lines(
        &app.db,
        &ExportFilter {
            status,
            channel: args.channel,
            batch_id: args.batch,
            since_ms,
        },
    )
    .await?;
    match &args.output {
        Some(path) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            export::write(&lines, format, &app.channels, std::io::BufWriter::new(f))?;
            eprintln!("{} records written to {}", lines.len(), path.display());
        }
        None => {
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            export::write(&lines, format, &app.channels, &mut lock)?;
            lock.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
