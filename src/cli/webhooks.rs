//! `enricher webhooks add|list|remove` and `enricher deliveries list|show|replay`, on the
//! local database (no token needed). A running `serve`/`worker` sends what these queue.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use enricher::{
    config::Settings,
    delivery::webhooks::{self, CreateSubscription},
    store::{
        self,
        deliveries::{DeliveryFilter, DeliveryStatus},
    },
};

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Subscribe a URL to events; prints the signing secret once.
    Add {
        /// http(s) URL that receives POSTs.
        url: String,
        /// Signing secret (16+ characters); generated when left out.
        #[arg(long, env = "ENRICHER_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Event type(s) to receive (default: all); repeat or comma-separate.
        #[arg(long = "event", value_delimiter = ',')]
        events: Vec<String>,
        /// Only events of this channel.
        #[arg(long)]
        channel: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Print the subscription (and secret) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List subscriptions (without their secrets).
    List {
        /// Include removed subscriptions.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove a subscription; its outstanding deliveries are cancelled.
    Remove { id: String },
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    List {
        /// pending, delivered, dead or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        subscription: Option<String>,
        #[arg(long)]
        product: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Show one delivery with its attempt log.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Send dead-lettered deliveries again (same idempotency key, fresh retry budget).
    Replay {
        /// Delivery ids.
        #[arg(required_unless_present = "all_dead")]
        ids: Vec<String>,
        /// Replay every dead delivery (of --subscription, or all).
        #[arg(long, conflicts_with = "ids")]
        all_dead: bool,
        #[arg(long, requires = "all_dead")]
        subscription: Option<String>,
    },
}

fn actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "local".into())
    )
}

fn when(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| "-".into())
}

pub async fn webhooks(settings: Settings, cmd: WebhooksCommand) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    match cmd {
        WebhooksCommand::Add {
            url,
            secret,
            events,
            channel,
            description,
            json,
        } => {
            let created = webhooks::create(
                &app.db,
                &app.channels,
                &app.settings.delivery,
                &CreateSubscription {
                    url,
                    secret,
                    event_types: events,
                    channel,
                    description,
                },
                &actor(),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                let s = &created.subscription;
                eprintln!(
                    "webhook {} created for {} (events: {}, channel: {}); its signing secret is shown only once:",
                    s.id,
                    s.url,
                    s.event_types.join(","),
                    s.channel.as_deref().unwrap_or("all")
                );
                println!("{}", created.secret);
            }
        }
        WebhooksCommand::List { all, json } => {
            let subs = store::webhooks::list(&app.db, all).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&subs)?);
            } else {
                for s in subs {
                    let counts = store::deliveries::count_by_status(&app.db, Some(&s.id))
                        .await?
                        .into_iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" ");
                    println!(
                        "{}  {}  events={} channel={} {}{}",
                        s.id,
                        s.url,
                        s.event_types.join(","),
                        s.channel.as_deref().unwrap_or("*"),
                        if s.removed_at.is_some() {
                            "removed "
                        } else {
                            ""
                        },
                        counts
                    );
                }
            }
        }
        WebhooksCommand::Remove { id } => {
            let n = webhooks::remove(&app.db, &id, &actor()).await?;
            println!("webhook {id} removed ({n} outstanding deliveries cancelled)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn deliveries(settings: Settings, cmd: DeliveriesCommand) -> anyhow::Result<ExitCode> {
    let app = super::open(settings).await?;
    match cmd {
        DeliveriesCommand::List {
            status,
            subscription,
            product,
            limit,
            json,
        } => {
            let status = match status.as_deref() {
                None => None,
                Some(s) => Some(DeliveryStatus::parse(s).with_context(|| {
                    format!(
                        "unknown status `{s}` (one of: {})",
                        DeliveryStatus::ALL.map(|s| s.as_str()).join(", ")
                    )
                })?),
            };
            let list = store::deliveries::list(
                &app.db,
                &DeliveryFilter {
                    status,
                    subscription_id: subscription,
                    product_id: product,
                    before: None,
                    limit: limit.clamp(1, 10_000),
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for d in list {
                    println!(
                        "{}  {:<9} {:<30} {:<8} v{:<3} attempts={} last={} {}",
                        d.id,
                        d.status.as_str(),
                        d.product_id,
                        d.channel,
                        d.version,
                        d.attempts,
                        d.last_status_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".into()),
                        d.last_error.unwrap_or_default()
                    );
                }
            }
        }
        DeliveriesCommand::Show { id, json } => {
            let d = store::deliveries::get(&app.db, &id).await?;
            let attempts = store::deliveries::attempts(&app.db, &id).await?;
            if json {
                let mut v = serde_json::json!(d);
                v["attempt_log"] = serde_json::json!(attempts);
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "delivery {}  {}  subscription {}\nevent {} ({}) product {} channel {} version {}",
                    d.id,
                    d.status,
                    d.subscription_id,
                    d.event_id,
                    d.event_type,
                    d.product_id,
                    d.channel,
                    d.version
                );
                if let Some(t) = d.next_attempt_at {
                    println!("next attempt at {}", when(Some(t)));
                }
                for a in attempts {
                    println!(
                        "  #{:<3} {}  {:>6} ms  {:<9} {}  {}{}",
                        a.attempt,
                        when(Some(a.started_at)),
                        a.latency_ms,
                        a.outcome,
                        a.status_code
                            .map(|c| c.to_string())
                            .unwrap_or_else(|| "-".into()),
                        a.error.unwrap_or_default(),
                        a.response_snippet
                            .filter(|s| !s.is_empty())
                            .map(|s| format!("  response: {s}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        DeliveriesCommand::Replay {
            ids,
            all_dead,
            subscription,
        } => {
            if all_dead {
                let n = webhooks::replay_dead(&app.db, subscription.as_deref(), &actor()).await?;
                println!("{n} dead deliveries replayed");
            } else {
                for id in ids {
                    let d = webhooks::replay(&app.db, &id, &actor()).await?;
                    println!(
                        "delivery {} replayed: {} v{} goes out again",
                        d.id, d.product_id, d.version
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
