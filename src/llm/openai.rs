//! Any OpenAI-compatible chat-completions API (OpenAI, vLLM, Ollama, llama.cpp server),
//! through async-openai.
//!
//! - The HTTP layer is our own tower service under async-openai: it turns every non-2xx
//!   answer into an [`HttpStatus`] error that keeps the status, the `Retry-After` header and
//!   a snippet of the body (JSON or not), so a 429 with an HTML body is a rate limit, not a
//!   crash.
//! - Retries (429, 408, 5xx, timeouts, connection errors, malformed JSON) use exponential
//!   backoff with jitter (backon), and honour `Retry-After`. A wait longer than
//!   [`MAX_INLINE_WAIT`] is not slept here: the error goes up and the queue schedules the
//!   task's next attempt for later, so a worker slot is not held.
//! - `response_format: json_schema` is asked for when a schema is given; a server that
//!   refuses it (400/422, or any status with a validation error naming
//!   `response_format`, as llama-cpp-python's 500) is asked again with `json_object`, then
//!   with no format, and the provider remembers what the server accepts.
//! - At most `concurrency` requests are in flight from this process.

use std::{
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_openai::{
    config::OpenAIConfig, error::OpenAIError, middleware::HttpRequestFactory, Client,
};
use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use secrecy::ExposeSecret;
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::{GenerateRequest, Generation, LlmError, ModelInfo, Provider};
use crate::config::ProviderSettings;

/// Longest `Retry-After` slept inside one attempt; longer waits go back to the queue.
pub const MAX_INLINE_WAIT: Duration = Duration::from_secs(30);

/// A non-2xx answer, with what is needed to decide about a retry.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}: {body}")]
pub struct HttpStatus {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub body: String,
}

/// reqwest under async-openai, reporting non-2xx answers as [`HttpStatus`].
#[derive(Clone, Debug)]
struct StatusService {
    client: reqwest::Client,
}

impl tower::Service<HttpRequestFactory> for StatusService {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<reqwest::Response, OpenAIError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        let client = self.client.clone();
        Box::pin(async move {
            let request = request.build().await?;
            let response = client.execute(request).await?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = response.text().await.unwrap_or_default();
            Err(OpenAIError::Boxed(Box::new(HttpStatus {
                status: status.as_u16(),
                retry_after,
                body: snippet(&body, 300),
            })))
        })
    }
}

/// `Retry-After` as seconds or as an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

fn snippet(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The response fields we read; lenient, because "compatible" servers differ.
#[derive(Debug, Deserialize)]
struct ChatResponse {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: Message,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

/// What `response_format` the server has accepted so far.
const FORMAT_SCHEMA: u8 = 0;
const FORMAT_OBJECT: u8 = 1;
const FORMAT_NONE: u8 = 2;

pub struct OpenAiProvider {
    name: String,
    model: String,
    base_url: String,
    client: Client<OpenAIConfig>,
    permits: Arc<Semaphore>,
    max_retries: u32,
    timeout: Duration,
    format: AtomicU8,
}

impl std::fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl OpenAiProvider {
    pub fn new(name: &str, s: &ProviderSettings) -> Result<Self, LlmError> {
        let base_url = s
            .base_url
            .clone()
            .unwrap_or_else(|| "https://api.openai.com/v1".to_string());
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(LlmError::Setup(format!(
                "provider `{name}`: base_url `{base_url}` must start with http:// or https://"
            )));
        }
        if s.model.trim().is_empty() {
            return Err(LlmError::Setup(format!(
                "provider `{name}`: model is empty"
            )));
        }
        let timeout = Duration::from_secs(s.timeout_s.max(1));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| LlmError::Setup(format!("provider `{name}`: HTTP client: {e}")))?;
        let mut config = OpenAIConfig::new().with_api_base(base_url.trim_end_matches('/'));
        // Local servers take any key; an empty one would still send "Bearer ".
        let key = s
            .api_key
            .as_ref()
            .map(|k| k.expose_secret().to_string())
            .unwrap_or_else(|| "none".to_string());
        config = config.with_api_key(key);
        let client = Client::with_config(config).with_http_service(StatusService { client: http });
        Ok(Self {
            name: name.to_string(),
            model: s.model.clone(),
            base_url,
            client,
            permits: Arc::new(Semaphore::new(s.concurrency.max(1))),
            max_retries: s.max_retries,
            timeout,
            format: AtomicU8::new(if s.structured_output {
                FORMAT_SCHEMA
            } else {
                FORMAT_NONE
            }),
        })
    }

    fn body(&self, req: &GenerateRequest, format: u8) -> serde_json::Value {
        let s = &req.sampling;
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": req.system},
                {"role": "user", "content": req.user},
            ],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_new_tokens,
            "seed": s.seed,
            "stream": false,
        });
        if let Some(schema) = &req.schema {
            let rf = match format {
                FORMAT_SCHEMA => Some(serde_json::json!({
                    "type": "json_schema",
                    "json_schema": {
                        "name": schema_name(&schema.name),
                        "schema": schema.to_json_schema(),
                        "strict": true,
                    }
                })),
                FORMAT_OBJECT => Some(serde_json::json!({"type": "json_object"})),
                _ => None,
            };
            if let Some(rf) = rf {
                body["response_format"] = rf;
            }
        }
        body
    }

    /// One HTTP call, errors classified.
    async fn call_once(&self, req: &GenerateRequest) -> Result<Generation, LlmError> {
        loop {
            let format = self.format.load(Ordering::Relaxed);
            let body = self.body(req, format);
            let result: Result<ChatResponse, OpenAIError> =
                self.client.chat().create_byot(body).await;
            match result {
                Ok(r) => return to_generation(r),
                Err(e) => {
                    let err = classify(e, self.timeout);
                    // A server that does not take our response_format refuses it; step down.
                    if req.schema.is_some() && format < FORMAT_NONE && refuses_format(&err) {
                        tracing::info!(provider = %self.name, from = format, "server refused response_format; falling back");
                        let _ = self.format.compare_exchange(
                            format,
                            format + 1,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }
}

/// Whether an error is a server refusing the request's `response_format`: a 400/422
/// (OpenAI, vLLM), or a validation error about `response_format` whatever its status
/// (llama-cpp-python's server answers 500 to `json_schema`).
fn refuses_format(err: &LlmError) -> bool {
    match err {
        LlmError::Rejected(m) => {
            m.starts_with("HTTP 400") || m.starts_with("HTTP 422") || m.contains("response_format")
        }
        LlmError::Unavailable(m) => m.starts_with("HTTP 5") && m.contains("response_format"),
        _ => false,
    }
}

fn schema_name(name: &str) -> String {
    let n: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if n.is_empty() {
        "output".into()
    } else {
        n
    }
}

fn to_generation(r: ChatResponse) -> Result<Generation, LlmError> {
    let choice = r
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| LlmError::MalformedResponse("the response has no choices".into()))?;
    let usage = r.usage.unwrap_or(Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
    });
    Ok(Generation {
        text: choice.message.content.unwrap_or_default(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        finish_reason: choice.finish_reason.unwrap_or_else(|| "stop".into()),
    })
}

/// Maps a client error to what the queue needs to know.
fn classify(e: OpenAIError, timeout: Duration) -> LlmError {
    match e {
        OpenAIError::Boxed(b) => match b.downcast::<HttpStatus>() {
            Ok(h) => match h.status {
                429 => LlmError::RateLimited {
                    retry_after: h.retry_after,
                },
                408 => LlmError::Timeout(timeout),
                s if s >= 500 => LlmError::Unavailable(format!("HTTP {s}: {}", h.body)),
                s => LlmError::Rejected(format!("HTTP {s}: {}", h.body)),
            },
            Err(other) => match other.downcast::<reqwest::Error>() {
                Ok(re) => classify_reqwest(&re, timeout),
                Err(other) => LlmError::Unavailable(other.to_string()),
            },
        },
        OpenAIError::Reqwest(re) => classify_reqwest(&re, timeout),
        OpenAIError::JSONDeserialize(err, content) => LlmError::MalformedResponse(format!(
            "{err}; body starts with: {}",
            snippet(&content, 120)
        )),
        OpenAIError::ApiError(api) => {
            let s = api.status_code.as_u16();
            match s {
                429 => LlmError::RateLimited { retry_after: None },
                s if s >= 500 => LlmError::Unavailable(api.to_string()),
                _ => LlmError::Rejected(api.to_string()),
            }
        }
        other => LlmError::Unavailable(other.to_string()),
    }
}

fn classify_reqwest(e: &reqwest::Error, timeout: Duration) -> LlmError {
    if e.is_timeout() {
        LlmError::Timeout(timeout)
    } else if e.is_decode() || e.is_body() {
        LlmError::MalformedResponse(e.to_string())
    } else {
        // connection refused/reset and the like: the server may come back
        LlmError::Unavailable(without_url(e))
    }
}

/// reqwest errors print the URL; it may carry credentials in its query.
fn without_url(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    if let Some(url) = e.url() {
        msg = msg.replace(url.as_str(), "<url>");
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            provider: self.name.clone(),
            kind: "openai".into(),
            model: self.model.clone(),
            model_sha256: None,
        }
    }

    #[tracing::instrument(skip_all, fields(provider = %self.name, model = %self.model))]
    async fn generate(&self, req: GenerateRequest) -> Result<Generation, LlmError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| LlmError::Setup("provider is shutting down".into()))?;
        let started = Instant::now();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(Duration::from_secs(8))
            .with_max_times(self.max_retries as usize)
            .with_jitter();
        let result = (|| self.call_once(&req))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &LlmError| {
                e.is_retryable() && e.retry_after().is_none_or(|d| d <= MAX_INLINE_WAIT)
            })
            .adjust(|e: &LlmError, dur| match e.retry_after() {
                Some(ra) => Some(ra),
                None => dur,
            })
            .notify(|e: &LlmError, dur| {
                tracing::warn!(error = %e, retry_in_ms = dur.as_millis() as u64, "provider call failed; retrying");
            })
            .await;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "provider call finished"
        );
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_http_date() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("soon"), None);
        let future = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        let d = parse_retry_after(&future).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        let past = (chrono::Utc::now() - chrono::Duration::seconds(30)).to_rfc2822();
        assert_eq!(parse_retry_after(&past), Some(Duration::ZERO));
    }

    #[test]
    fn status_errors_are_classified() {
        let mk = |status, retry_after| {
            classify(
                OpenAIError::Boxed(Box::new(HttpStatus {
                    status,
                    retry_after,
                    body: "<html>busy</html>".into(),
                })),
                Duration::from_secs(5),
            )
        };
        assert!(matches!(
            mk(429, Some(Duration::from_secs(3))),
            LlmError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(3)
        ));
        assert!(matches!(mk(503, None), LlmError::Unavailable(_)));
        assert!(matches!(mk(408, None), LlmError::Timeout(_)));
        assert!(matches!(mk(401, None), LlmError::Rejected(_)));
    }

    #[test]
    fn only_refusals_of_the_response_format_step_down() {
        let mk = |status, body: &str| {
            classify(
                OpenAIError::Boxed(Box::new(HttpStatus {
                    status,
                    retry_after: None,
                    body: body.into(),
                })),
                Duration::from_secs(5),
            )
        };
        assert!(refuses_format(&mk(400, "bad request")));
        assert!(refuses_format(&mk(422, "unprocessable")));
        let pydantic = "1 validation error: ('body', 'response_format', 'type')";
        assert!(refuses_format(&mk(500, pydantic)));
        // an outage or an auth failure is not about the format
        assert!(!refuses_format(&mk(500, "internal error")));
        assert!(!refuses_format(&mk(503, "<html>busy</html>")));
        assert!(!refuses_format(&mk(401, "invalid api key")));
        assert!(!refuses_format(&LlmError::Timeout(Duration::from_secs(1))));
    }
}
