//! The delivery worker: sends queued webhook deliveries, signed, and records every attempt.
//!
//! It claims due deliveries from the database with a lease (see `store::deliveries`), so any
//! number of processes can run it against one PostgreSQL database, and a process that dies
//! mid-send loses nothing: when its lease ends, another claim sends the delivery again with
//! the same idempotency key. Outcomes:
//! - 2xx: delivered.
//! - connection errors, timeouts, 408, 429, 5xx: retried after an exponential backoff with
//!   jitter (or the receiver's `Retry-After`, when longer) until the retry budget is spent;
//!   then dead-lettered.
//! - any other status (other 4xx, 3xx: redirects are not followed), or a destination the
//!   SSRF policy refuses: dead-lettered at once.
//!
//! Dead deliveries stay until replayed (`enricher deliveries replay`, or the API).
//!
//! Why not one apalis job per delivery: deliveries of one product must go in version order
//! (version n+1 waits until n is delivered or dead), which a claim query can express and a
//! job queue's independent retries cannot without burning attempts; and the retry budget is
//! a time span (about a day), not an attempt count. The delivery table is the queue.

use std::{sync::Arc, time::Duration};

use rand::Rng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    signature::{self, ATTEMPT_HEADER, EVENT_ID_HEADER, EVENT_TYPE_HEADER, IDEMPOTENCY_HEADER},
    url::{AddressPolicy, GuardedResolver, UrlError, WebhookUrl},
};
use crate::{
    config::DeliverySettings,
    store::{
        self,
        deliveries::{AttemptRecord, Claimed, Next},
        new_id, now_ms, Db, StoreError,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("building the webhook HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Characters of the receiver's response kept in the delivery log.
pub const SNIPPET_CHARS: usize = 500;

/// The result of one HTTP attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum SendOutcome {
    Delivered {
        status: u16,
        snippet: String,
    },
    /// Worth trying again later.
    Retry {
        status: Option<u16>,
        error: String,
        retry_after: Option<Duration>,
        snippet: Option<String>,
    },
    /// Trying again will not help.
    Permanent {
        status: Option<u16>,
        error: String,
        snippet: Option<String>,
    },
}

/// Signs and sends webhook requests.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    policy: AddressPolicy,
    timeout: Duration,
}

impl Sender {
    pub fn new(settings: &DeliverySettings) -> Result<Self, DeliveryError> {
        let policy = AddressPolicy::from(settings);
        let timeout = Duration::from_millis(settings.request_timeout_ms.max(1));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // no proxy from the environment: it would connect to the target for us, unchecked
            .no_proxy()
            // a redirect could point anywhere (an internal address); receivers answer 2xx
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(GuardedResolver::shared(policy))
            .user_agent(concat!("enricher-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DeliveryError::Client(e.to_string()))?;
        Ok(Self {
            client,
            policy,
            timeout,
        })
    }

    /// Sends `body` to `url`, signed with `secret`, once.
    pub async fn send(&self, d: &Claimed, attempt: i64) -> SendOutcome {
        let url = match WebhookUrl::parse(&d.url, self.policy) {
            Ok(u) => u,
            Err(e) => return refused(e),
        };
        // (name resolution is bounded too: the lease assumes a send ends within the timeout)
        match tokio::time::timeout(self.timeout, url.check_resolved(self.policy)).await {
            Ok(Ok(())) => {}
            Ok(Err(e @ UrlError::Resolve { .. })) => {
                return SendOutcome::Retry {
                    status: None,
                    error: e.to_string(),
                    retry_after: None,
                    snippet: None,
                }
            }
            Ok(Err(e)) => return refused(e),
            Err(_) => {
                return SendOutcome::Retry {
                    status: None,
                    error: format!("resolving {} timed out", url.host()),
                    retry_after: None,
                    snippet: None,
                }
            }
        }
        let timestamp = chrono::Utc::now().timestamp();
        let sig = signature::sign(&d.secret, timestamp, d.payload.as_bytes());
        let sent = self
            .client
            .post(url.url().clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, &d.id)
            .header(signature::TIMESTAMP_HEADER, timestamp.to_string())
            .header(signature::SIGNATURE_HEADER, sig)
            .header(EVENT_ID_HEADER, &d.event_id)
            .header(EVENT_TYPE_HEADER, &d.event_type)
            .header(ATTEMPT_HEADER, attempt.to_string())
            .body(d.payload.clone())
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => return self.transport_error(e),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
        let snippet = read_snippet(resp).await;
        let code = status.as_u16();
        if status.is_success() {
            SendOutcome::Delivered {
                status: code,
                snippet,
            }
        } else if is_retryable_status(code) {
            SendOutcome::Retry {
                status: Some(code),
                error: format!("receiver answered {status}"),
                retry_after,
                snippet: Some(snippet),
            }
        } else {
            let error = if status.is_redirection() {
                format!("receiver answered {status}; redirects are not followed")
            } else {
                format!("receiver answered {status}")
            };
            SendOutcome::Permanent {
                status: Some(code),
                error,
                snippet: Some(snippet),
            }
        }
    }

    fn transport_error(&self, e: reqwest::Error) -> SendOutcome {
        // the resolver refused the address it was about to connect to (e.g. DNS rebinding)
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if let Some(u) = s.downcast_ref::<UrlError>() {
                if !matches!(u, UrlError::Resolve { .. }) {
                    return refused(u.clone());
                }
            }
            source = s.source();
        }
        let error = if e.is_timeout() {
            format!("timed out after {} ms", self.timeout.as_millis())
        } else {
            // without the URL: its query may hold a receiver's token
            let e = e.without_url();
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            msg
        };
        SendOutcome::Retry {
            status: None,
            error,
            retry_after: None,
            snippet: None,
        }
    }
}

fn refused(e: UrlError) -> SendOutcome {
    SendOutcome::Permanent {
        status: None,
        error: format!("destination refused: url {e}"),
        snippet: None,
    }
}

/// 408, 429 and 5xx may succeed later; other non-2xx statuses will not.
pub fn is_retryable_status(code: u16) -> bool {
    code == 408 || code == 429 || (500..600).contains(&code)
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(v: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = v.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let t = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let ms = (t.with_timezone(&chrono::Utc) - now).num_milliseconds();
    Some(Duration::from_millis(ms.max(0) as u64))
}

/// The first [`SNIPPET_CHARS`] characters of the response body (reading no more than needed).
async fn read_snippet(mut resp: reqwest::Response) -> String {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < SNIPPET_CHARS * 4 {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    String::from_utf8_lossy(&buf)
        .chars()
        .take(SNIPPET_CHARS)
        .collect()
}

/// The delay before retry `attempt + 1`: `base * 2^(attempt-1)` capped at `max`, of which a
/// random part (up to half) is jitter, so receivers coming back are not hit all at once.
pub fn backoff(settings: &DeliverySettings, attempt: i64) -> Duration {
    let exp = (attempt.max(1) - 1).min(30) as u32;
    let cap = settings
        .backoff_base_ms
        .max(1)
        .saturating_mul(1u64 << exp)
        .min(settings.backoff_max_ms.max(1));
    let half = cap / 2;
    Duration::from_millis(half + rand::thread_rng().gen_range(0..=cap - half))
}

/// The worker: claims due deliveries and sends them, up to `concurrency` at once.
pub struct DeliveryWorker {
    db: Db,
    sender: Sender,
    settings: DeliverySettings,
    name: String,
}

impl DeliveryWorker {
    pub fn new(db: Db, settings: &DeliverySettings, name: &str) -> Result<Self, DeliveryError> {
        Ok(Self {
            sender: Sender::new(settings)?,
            db,
            settings: settings.clone(),
            name: name.to_string(),
        })
    }

    /// How long a claim holds its rows: the request's own limit, the same again for DNS and
    /// recording the outcome, and a second. A worker that dies holds them no longer.
    fn lease_ms(&self) -> i64 {
        (self.settings.request_timeout_ms.saturating_mul(2) + 1_000) as i64
    }

    /// Claims and sends one round of due deliveries, waiting for them; returns how many were
    /// attempted. Tests use it to drive delivery without a background loop.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let now = now_ms();
        let claim_id = format!("{}:{}", self.name, new_id());
        let claimed = store::deliveries::claim(
            &self.db,
            &claim_id,
            now,
            now + self.lease_ms(),
            self.settings.concurrency as i64,
        )
        .await?;
        let n = claimed.len();
        let this = Arc::new(self.clone_parts());
        let mut set = JoinSet::new();
        for d in claimed {
            let this = this.clone();
            let claim_id = claim_id.clone();
            set.spawn(async move { this.deliver(d, &claim_id).await });
        }
        while set.join_next().await.is_some() {}
        Ok(n)
    }

    fn clone_parts(&self) -> Parts {
        Parts {
            db: self.db.clone(),
            sender: self.sender.clone(),
            settings: self.settings.clone(),
        }
    }

    /// Runs until `token` is cancelled; then stops claiming and lets sends in flight finish
    /// (each is bounded by the request timeout).
    pub async fn run(self, token: CancellationToken) {
        let poll = Duration::from_millis(self.settings.poll_interval_ms.max(10));
        let max = self.settings.concurrency.max(1);
        let parts = Arc::new(self.clone_parts());
        let mut inflight: JoinSet<()> = JoinSet::new();
        tracing::info!(worker = %self.name, concurrency = max, "delivery worker started");
        loop {
            while inflight.try_join_next().is_some() {}
            if token.is_cancelled() {
                break;
            }
            let free = max.saturating_sub(inflight.len());
            let claimed = if free == 0 {
                Vec::new()
            } else {
                let now = now_ms();
                let claim_id = format!("{}:{}", self.name, new_id());
                match store::deliveries::claim(
                    &self.db,
                    &claim_id,
                    now,
                    now + self.lease_ms(),
                    free as i64,
                )
                .await
                {
                    Ok(v) => v.into_iter().map(|d| (d, claim_id.clone())).collect(),
                    Err(e) => {
                        tracing::error!(error = %e, "claiming webhook deliveries failed");
                        Vec::new()
                    }
                }
            };
            if claimed.is_empty() {
                // nothing to start: wait for a send to finish (its successor may be due), the
                // poll interval, or the stop signal
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(poll) => {}
                    Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
                }
                continue;
            }
            for (d, claim_id) in claimed {
                let parts = parts.clone();
                inflight.spawn(async move { parts.deliver(d, &claim_id).await });
            }
        }
        while inflight.join_next().await.is_some() {}
        tracing::info!(worker = %self.name, "delivery worker stopped");
    }
}

/// What one delivery task needs.
struct Parts {
    db: Db,
    sender: Sender,
    settings: DeliverySettings,
}

impl Parts {
    #[tracing::instrument(skip_all, fields(delivery_id = %d.id, subscription_id = %d.subscription_id, event_id = %d.event_id, attempt = d.attempts + 1))]
    async fn deliver(&self, d: Claimed, claim_id: &str) {
        let attempt = d.attempts + 1;
        let started_at = now_ms();
        let t0 = std::time::Instant::now();
        let outcome = self.sender.send(&d, attempt).await;
        let latency_ms = t0.elapsed().as_millis() as i64;
        let budget_ms = (self.settings.retry_budget_s as i64).saturating_mul(1000);
        let deadline = d.retry_from.saturating_add(budget_ms);
        let (next, status, error, snippet) = match outcome {
            SendOutcome::Delivered { status, snippet } => {
                tracing::info!(status, latency_ms, "webhook delivered");
                (Next::Delivered, Some(status), None, Some(snippet))
            }
            SendOutcome::Permanent {
                status,
                error,
                snippet,
            } => {
                tracing::warn!(?status, error = %error, "webhook failed permanently; dead-lettered");
                (Next::Dead, status, Some(error), snippet)
            }
            SendOutcome::Retry {
                status,
                error,
                retry_after,
                snippet,
            } => {
                let now = now_ms();
                if now >= deadline {
                    let error = format!(
                        "{error} (retry budget of {}s used up after {attempt} attempts)",
                        self.settings.retry_budget_s
                    );
                    tracing::warn!(?status, error = %error, "webhook dead-lettered");
                    (Next::Dead, status, Some(error), snippet)
                } else {
                    let mut delay = backoff(&self.settings, attempt);
                    if let Some(ra) = retry_after {
                        delay = delay.max(ra);
                    }
                    let at = now.saturating_add(delay.as_millis() as i64).min(deadline);
                    tracing::warn!(?status, error = %error, retry_in_ms = at - now, "webhook attempt failed; will retry");
                    (Next::RetryAt(at), status, Some(error), snippet)
                }
            }
        };
        metrics::counter!("enricher_delivery_attempts_total", "outcome" => match next {
            Next::Delivered => "delivered",
            Next::Dead => "dead",
            Next::RetryAt(_) => "retry",
        })
        .increment(1);
        let record = AttemptRecord {
            attempt,
            started_at,
            latency_ms,
            status_code: status.map(i64::from),
            error: error.as_deref(),
            response_snippet: snippet.as_deref(),
        };
        // a failure to record is retried a few times: the send happened, the log must say so
        for i in 0..3 {
            match store::deliveries::finish(&self.db, &d.id, claim_id, &record, next).await {
                Ok(true) => return,
                Ok(false) => {
                    tracing::warn!("lease lost before the outcome was recorded (another worker or a removal took over)");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, try_ = i + 1, "recording the delivery outcome failed");
                    tokio::time::sleep(Duration::from_millis(200 << i)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        for c in [408, 429, 500, 502, 503, 504, 599] {
            assert!(is_retryable_status(c), "{c}");
        }
        for c in [400, 401, 403, 404, 409, 410, 422, 301, 302] {
            assert!(!is_retryable_status(c), "{c}");
        }
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-28T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let s = DeliverySettings {
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
            ..Default::default()
        };
        for _ in 0..50 {
            let d1 = backoff(&s, 1).as_millis();
            assert!((500..=1_000).contains(&d1), "{d1}");
            let d4 = backoff(&s, 4).as_millis();
            assert!((4_000..=8_000).contains(&d4), "{d4}");
            let d30 = backoff(&s, 30).as_millis();
            assert!((30_000..=60_000).contains(&d30), "{d30}");
        }
        let spread: std::collections::BTreeSet<u128> =
            (0..50).map(|_| backoff(&s, 6).as_millis()).collect();
        assert!(spread.len() > 10, "jitter spreads retries");
    }
}
