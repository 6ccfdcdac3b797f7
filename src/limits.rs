//! Rate limits and token budgets shared by every worker of a database.
//!
//! - [`LimitedProvider`] wraps a provider: before each call it reserves one request and the
//!   estimated tokens in the provider's current one-minute window (an atomic upsert in the
//!   database, so the limit holds across processes and hosts); when the window is full it
//!   waits for the next one. After the call the window's token count is corrected.
//! - Budgets: a batch may carry a token budget; the day has one (`budget.daily_tokens`).
//!   A task whose batch or day is over budget is parked (it waits, unspent) and the batch
//!   says why; raising the budget (or the next day) resumes it.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use rand::Rng;

use crate::{
    config::RateLimit,
    llm::{GenerateRequest, Generation, LlmError, ModelInfo, Provider},
    store::{self, Db},
};

const WINDOW_MS: i64 = 60_000;

/// A provider behind a shared rate limit.
pub struct LimitedProvider {
    inner: Arc<dyn Provider>,
    db: Db,
    name: String,
    limit: RateLimit,
}

impl LimitedProvider {
    pub fn new(inner: Arc<dyn Provider>, db: Db, name: &str, limit: RateLimit) -> Self {
        Self {
            inner,
            db,
            name: name.to_string(),
            limit,
        }
    }
}

/// Tokens a request will use at most: the prompt (about four characters a token) and the
/// completion cap.
pub fn estimate_tokens(req: &GenerateRequest) -> i64 {
    ((req.system.len() + req.user.len()) / 4 + req.sampling.max_new_tokens) as i64
}

#[async_trait]
impl Provider for LimitedProvider {
    fn info(&self) -> ModelInfo {
        self.inner.info()
    }

    async fn generate(&self, req: GenerateRequest) -> Result<Generation, LlmError> {
        let estimate = estimate_tokens(&req);
        let window_ms = i64::from(self.limit.window_s.unwrap_or(60).max(1)) * 1000;
        let max_requests = self.limit.requests_per_minute.map_or(i64::MAX, i64::from);
        let max_tokens = self.limit.tokens_per_minute.map_or(i64::MAX, i64::from);
        let window = loop {
            let now = chrono::Utc::now().timestamp_millis();
            let window = now - now.rem_euclid(window_ms);
            let ok = store::limits::reserve(
                &self.db,
                &self.name,
                window,
                estimate,
                max_requests,
                max_tokens,
            )
            .await
            .map_err(|e| LlmError::Unavailable(format!("rate limiter: {e}")))?;
            if ok {
                break window;
            }
            // full: wait for the next window (with jitter, so waiting workers do not all
            // arrive at once)
            let jitter = rand::thread_rng().gen_range(0..(window_ms / 10).clamp(1, 500)) as u64;
            let wait = (window + window_ms - now).max(1) as u64 + jitter;
            tracing::debug!(provider = %self.name, wait_ms = wait, "rate limit reached; waiting for the next window");
            metrics::counter!("enricher_rate_limit_waits_total", "provider" => self.name.clone())
                .increment(1);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        };
        let result = self.inner.generate(req).await;
        let actual = match &result {
            Ok(g) => i64::from(g.prompt_tokens) + i64::from(g.completion_tokens),
            Err(_) => 0,
        };
        if actual != estimate {
            let _ =
                store::limits::adjust_tokens(&self.db, &self.name, window, actual - estimate).await;
        }
        result
    }
}

/// Why a task may not spend now, if it may not.
pub async fn over_budget(
    db: &Db,
    daily_tokens: Option<u64>,
    batch_id: &str,
    budget: Option<i64>,
) -> Result<Option<String>, store::StoreError> {
    if let Some(b) = budget {
        let used = store::limits::batch_tokens(db, batch_id).await?;
        if used >= b {
            return Ok(Some(format!(
                "batch token budget of {b} exhausted ({used} used); raise it to resume"
            )));
        }
    }
    if let Some(daily) = daily_tokens {
        let today = today();
        let spent = store::limits::day_usage(db, &today).await?;
        if spent >= daily as i64 {
            return Ok(Some(format!(
                "daily token budget of {daily} exhausted ({spent} used on {today}); resumes tomorrow (UTC)"
            )));
        }
    }
    Ok(None)
}

/// The current UTC day, `YYYY-MM-DD`.
pub fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// Housekeeping run by each worker process: resume tasks parked by the daily budget once
/// the day allows, drop old rate windows.
pub async fn maintain(db: &Db, daily_tokens: Option<u64>) {
    let now = chrono::Utc::now().timestamp_millis();
    let _ = store::limits::prune_windows(db, now - 10 * WINDOW_MS).await;
    let may_resume = match daily_tokens {
        None => true,
        Some(d) => store::limits::day_usage(db, &today())
            .await
            .map(|s| s < d as i64)
            .unwrap_or(false),
    };
    if may_resume {
        match store::limits::resume_parked(db, None, "daily token budget").await {
            Ok(0) => {}
            Ok(n) => tracing::info!(resumed = n, "daily budget allows work again; tasks resumed"),
            Err(e) => tracing::warn!(error = %e, "could not resume parked tasks"),
        }
    }
}
