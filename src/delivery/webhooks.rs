//! Managing webhook subscriptions and dead-lettered deliveries: the rules shared by the API
//! and the CLI (validation, secrets, audit).

use serde::Serialize;

use super::{
    event::EVENT_TYPES,
    url::{AddressPolicy, UrlError, WebhookUrl},
};
use crate::{
    auth,
    channel::Channels,
    config::DeliverySettings,
    store::{
        self, audit,
        deliveries::Delivery,
        webhooks::{NewSubscription, Subscription},
        Db, StoreError,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("url {0}")]
    Url(#[from] UrlError),
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &str, message: impl Into<String>) -> WebhookError {
    WebhookError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

impl From<&DeliverySettings> for AddressPolicy {
    fn from(s: &DeliverySettings) -> Self {
        AddressPolicy {
            allow_private: s.allow_private_networks,
            allow_loopback: s.allow_loopback,
        }
    }
}

/// A request to subscribe.
#[derive(Debug, Clone, Default)]
pub struct CreateSubscription {
    pub url: String,
    /// The signing secret; generated when absent.
    pub secret: Option<String>,
    /// Event types (default: every type, today `content.approved`); `*` means all.
    pub event_types: Vec<String>,
    /// Only events of this channel.
    pub channel: Option<String>,
    pub description: Option<String>,
}

/// A new subscription, with its secret: the only time the secret is shown.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedSubscription {
    #[serde(flatten)]
    pub subscription: Subscription,
    pub secret: String,
}

pub const MIN_SECRET_CHARS: usize = 16;
pub const MAX_SECRET_CHARS: usize = 256;

/// Validates and stores a subscription. The URL must pass the SSRF policy, its host included
/// (resolved now; it is checked again before every send).
pub async fn create(
    db: &Db,
    channels: &Channels,
    settings: &DeliverySettings,
    req: &CreateSubscription,
    actor: &str,
) -> Result<CreatedSubscription, WebhookError> {
    let policy = AddressPolicy::from(settings);
    let url = WebhookUrl::parse(&req.url, policy)?;
    url.check_resolved(policy).await?;
    let secret = match &req.secret {
        Some(s) => {
            let n = s.chars().count();
            if !(MIN_SECRET_CHARS..=MAX_SECRET_CHARS).contains(&n)
                || s.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(
                    "secret",
                    format!("must be {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} characters without spaces (or leave it out to get a generated one)"),
                ));
            }
            s.clone()
        }
        None => auth::random_secret("whsec_", 40),
    };
    let mut event_types: Vec<String> = Vec::new();
    for t in &req.event_types {
        let t = t.trim();
        if t != "*" && !EVENT_TYPES.contains(&t) {
            return Err(invalid(
                "event_types",
                format!(
                    "unknown event type `{t}` (one of: {}, or * for all)",
                    EVENT_TYPES.join(", ")
                ),
            ));
        }
        if !event_types.iter().any(|x| x == t) {
            event_types.push(t.to_string());
        }
    }
    if event_types.is_empty() {
        event_types.push("*".into());
    }
    let channel = match req.channel.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(c) => {
            channels
                .get(c)
                .map_err(|e| invalid("channel", e.to_string()))?;
            Some(c.to_string())
        }
    };
    let description = req
        .description
        .as_deref()
        .map(str::trim)
        .filter(|d| !d.is_empty());
    if description.is_some_and(|d| d.chars().count() > 500) {
        return Err(invalid("description", "must be at most 500 characters"));
    }
    let subscription = store::webhooks::insert(
        db,
        &NewSubscription {
            url: url.as_str(),
            secret: &secret,
            event_types: &event_types,
            channel: channel.as_deref(),
            description,
            created_by: actor,
        },
    )
    .await?;
    audit::record(
        db,
        &audit::Entry::new(actor, "webhook.create", "webhook", &subscription.id).after(
            serde_json::json!({
                "url": subscription.url,
                "event_types": subscription.event_types,
                "channel": subscription.channel,
            }),
        ),
    )
    .await?;
    tracing::info!(subscription_id = %subscription.id, host = %url.host(), "webhook subscription created");
    Ok(CreatedSubscription {
        subscription,
        secret,
    })
}

/// Removes a subscription and cancels its outstanding deliveries; returns how many.
pub async fn remove(db: &Db, id: &str, actor: &str) -> Result<u64, WebhookError> {
    let cancelled = store::webhooks::remove(db, id).await?;
    audit::record(
        db,
        &audit::Entry::new(actor, "webhook.remove", "webhook", id)
            .after(serde_json::json!({ "cancelled_deliveries": cancelled })),
    )
    .await?;
    tracing::info!(subscription_id = %id, cancelled, "webhook subscription removed");
    Ok(cancelled)
}

/// Puts a dead-lettered delivery back in line (same idempotency key, fresh retry budget).
pub async fn replay(db: &Db, delivery_id: &str, actor: &str) -> Result<Delivery, WebhookError> {
    let d = store::deliveries::replay(db, delivery_id).await?;
    audit::record(
        db,
        &audit::Entry::new(actor, "delivery.replay", "delivery", delivery_id),
    )
    .await?;
    tracing::info!(delivery_id, subscription_id = %d.subscription_id, "dead delivery replayed");
    Ok(d)
}

/// Replays every dead delivery (of one subscription, or all); returns how many.
pub async fn replay_dead(
    db: &Db,
    subscription_id: Option<&str>,
    actor: &str,
) -> Result<u64, WebhookError> {
    let n = store::deliveries::replay_dead(db, subscription_id).await?;
    audit::record(
        db,
        &audit::Entry::new(
            actor,
            "delivery.replay_dead",
            "webhook",
            subscription_id.unwrap_or("*"),
        )
        .after(serde_json::json!({ "replayed": n })),
    )
    .await?;
    Ok(n)
}
