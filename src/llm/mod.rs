//! Language-model providers behind one trait.
//!
//! The pipeline only sees [`Provider`]: a request made of a system and a user message,
//! sampling parameters and (optionally) the output schema and the numbers the spec allows,
//! and a [`Generation`] back. Adding a provider means one file implementing the trait and
//! one arm in [`build_provider`].
//!
//! - `local`: candle, quantized GGUF, in-process on CPU (see `local`).
//! - `openai`: any OpenAI-compatible HTTP API through async-openai (see `openai`).
//! - `stub`: instant, deterministic copy built from the spec; for benchmarks and demos of
//!   the queue, never for real copy (see `stub`).

pub mod local;
pub mod openai;
pub mod stub;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::{ProviderKind, ProviderSettings, Settings};

/// Sampling parameters of one generation. Recorded in every draft's provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// 0 means greedy decoding.
    pub temperature: f64,
    pub top_p: f64,
    pub repeat_penalty: f32,
    /// Window of recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.2,
            top_p: 0.9,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 42,
            max_new_tokens: 256,
        }
    }
}

/// What the output must look like: the fields of a channel's JSON object.
///
/// Remote providers turn it into a JSON Schema (`response_format`); the local provider uses
/// it to constrain decoding so that only valid JSON of this shape can be produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSchema {
    pub name: String,
    pub fields: Vec<SchemaField>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchemaField {
    pub name: String,
    pub kind: FieldKind,
    /// The fewest characters of the text (or of each item of a list). The local provider's
    /// constraint keeps a string open until it has them, while the token budget allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_chars: Option<usize>,
    /// Each string (each item of a list) is a hashtag, `#` then letters and digits (the
    /// rule pack's `hashtag_format`); the local provider's constraint writes nothing else.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hashtags: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FieldKind {
    /// A string of at most `max_chars` characters (when set).
    Text { max_chars: Option<usize> },
    /// An array of strings with `min_items..=max_items` items.
    List {
        min_items: usize,
        max_items: usize,
        item_max_chars: Option<usize>,
    },
}

impl OutputSchema {
    /// The JSON Schema of the object, as OpenAI's structured outputs expect it
    /// (`additionalProperties: false`, every property required).
    pub fn to_json_schema(&self) -> serde_json::Value {
        let mut props = serde_json::Map::new();
        for f in &self.fields {
            let v = match &f.kind {
                FieldKind::Text { .. } => serde_json::json!({ "type": "string" }),
                FieldKind::List {
                    min_items,
                    max_items,
                    ..
                } => serde_json::json!({
                    "type": "array",
                    "items": { "type": "string" },
                    "minItems": min_items,
                    "maxItems": max_items,
                }),
            };
            props.insert(f.name.clone(), v);
        }
        let required: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
        serde_json::json!({
            "type": "object",
            "properties": props,
            "required": required,
            "additionalProperties": false,
        })
    }
}

/// One generation request.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub system: String,
    pub user: String,
    pub sampling: Sampling,
    /// When set, the answer must be one JSON object of this shape.
    pub schema: Option<OutputSchema>,
    /// Numbers (as written in the spec) that the output may contain. The local provider uses
    /// them for grounded decoding of the schema's strings (so only together with `schema`);
    /// `None` means unconstrained.
    pub allowed_numbers: Option<Vec<String>>,
}

/// What a provider returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// `stop` (end of turn), `length` (token cap), or what the server said.
    pub finish_reason: String,
}

/// Which model produced a draft, for provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Provider name from the configuration (`local`, `openai`, ...).
    pub provider: String,
    /// Provider kind (`local`, `openai`, `stub`).
    pub kind: String,
    pub model: String,
    /// sha256 of the model file, for local models.
    pub model_sha256: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// 429 from the server; `retry_after` when it said how long to wait.
    #[error("rate limited by the provider{}", fmt_retry(.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, connection refused/reset: worth retrying.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    #[error("provider timed out after {0:?}")]
    Timeout(Duration),
    /// The server answered something that is not the wire format (e.g. malformed JSON).
    #[error("malformed response from provider: {0}")]
    MalformedResponse(String),
    /// 4xx other than 408/429: retrying will not help (bad key, unknown model, ...).
    #[error("request rejected by provider: {0}")]
    Rejected(String),
    /// The provider cannot be used at all (model missing, failed to load, bad config).
    #[error("provider not usable: {0}")]
    Setup(String),
    /// The local model failed while generating.
    #[error("model error: {0}")]
    Model(String),
}

fn fmt_retry(d: &Option<Duration>) -> String {
    match d {
        Some(d) => format!(" (retry after {}s)", d.as_secs()),
        None => String::new(),
    }
}

impl LlmError {
    /// Whether a later attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LlmError::RateLimited { .. }
                | LlmError::Unavailable(_)
                | LlmError::Timeout(_)
                | LlmError::MalformedResponse(_)
                | LlmError::Model(_)
        )
    }

    /// How long the provider asked us to wait, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }

    /// A short stable name, for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::Unavailable(_) => "unavailable",
            LlmError::Timeout(_) => "timeout",
            LlmError::MalformedResponse(_) => "malformed_response",
            LlmError::Rejected(_) => "rejected",
            LlmError::Setup(_) => "setup",
            LlmError::Model(_) => "model",
        }
    }
}

/// A language model that turns a prompt into text.
#[async_trait]
pub trait Provider: Send + Sync {
    fn info(&self) -> ModelInfo;
    async fn generate(&self, req: GenerateRequest) -> Result<Generation, LlmError>;
}

/// The configured providers, by name, and which one serves which channel.
#[derive(Clone)]
pub struct Providers {
    by_name: BTreeMap<String, Arc<dyn Provider>>,
    routing: BTreeMap<String, String>,
    default: String,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Providers")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .field("routing", &self.routing)
            .field("default", &self.default)
            .finish()
    }
}

impl Providers {
    /// Builds only the providers that some channel routes to (loading a local model is not
    /// free, so an unused one is never loaded).
    pub async fn from_settings(settings: &Settings, channels: &[String]) -> Result<Self, LlmError> {
        let mut needed: Vec<String> = channels
            .iter()
            .map(|c| settings.provider_for(c).to_string())
            .collect();
        needed.sort();
        needed.dedup();
        let mut by_name = BTreeMap::new();
        for name in needed {
            let ps = settings.providers.get(&name).ok_or_else(|| {
                LlmError::Setup(format!(
                    "routing names provider `{name}`, which is not configured under [providers]"
                ))
            })?;
            by_name.insert(name.clone(), build_provider(&name, ps, settings).await?);
        }
        Ok(Self {
            by_name,
            routing: settings.routing.clone(),
            default: settings.default_provider.clone(),
        })
    }

    /// A registry with explicit providers (tests, benchmarks).
    pub fn from_parts(
        by_name: BTreeMap<String, Arc<dyn Provider>>,
        routing: BTreeMap<String, String>,
        default: String,
    ) -> Self {
        Self {
            by_name,
            routing,
            default,
        }
    }

    pub fn for_channel(&self, channel: &str) -> Result<Arc<dyn Provider>, LlmError> {
        let name = self.routing.get(channel).unwrap_or(&self.default);
        self.get(name)
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn Provider>, LlmError> {
        self.by_name
            .get(name)
            .cloned()
            .ok_or_else(|| LlmError::Setup(format!("provider `{name}` is not loaded")))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Replaces each provider with `f(name, provider)` (e.g. to add a rate limit).
    pub fn wrap(mut self, f: impl Fn(&str, Arc<dyn Provider>) -> Arc<dyn Provider>) -> Self {
        self.by_name = self
            .by_name
            .into_iter()
            .map(|(n, p)| {
                let w = f(&n, p);
                (n, w)
            })
            .collect();
        self
    }
}

/// The one place that maps a provider kind to its implementation.
pub async fn build_provider(
    name: &str,
    ps: &ProviderSettings,
    settings: &Settings,
) -> Result<Arc<dyn Provider>, LlmError> {
    Ok(match ps.kind {
        ProviderKind::Local => {
            Arc::new(local::LocalProvider::load(name, ps, &settings.paths.models_dir).await?)
        }
        ProviderKind::Openai => Arc::new(openai::OpenAiProvider::new(name, ps)?),
        ProviderKind::Stub => Arc::new(stub::StubProvider::new(name, ps)),
    })
}

/// Finds the first complete JSON object in model output: skips prose and code fences
/// around it, respects strings and escapes. Returns `None` when there is none.
pub fn extract_json_object(text: &str) -> Option<serde_json::Value> {
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(off) = text[start..].find('{') {
        let begin = start + off;
        let mut depth = 0usize;
        let mut in_str = false;
        let mut escaped = false;
        for (i, &b) in bytes.iter().enumerate().skip(begin) {
            if in_str {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_str = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_str = true,
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text[begin..=i]) {
                            if v.is_object() {
                                return Some(v);
                            }
                        }
                        break;
                    }
                }
                _ => {}
            }
        }
        start = begin + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_object_from_prose_and_fences() {
        let t = "Sure! Here it is:\n```json\n{\"title\": \"A {braced} \\\"q\\\" title\", \"n\": [1,2]}\n```\nDone.";
        let v = extract_json_object(t).expect("object");
        assert_eq!(v["title"], "A {braced} \"q\" title");
        assert_eq!(v["n"][1], 2);
    }

    #[test]
    fn skips_broken_objects_and_finds_a_later_one() {
        let t = "{not json} then {\"a\": 1}";
        assert_eq!(extract_json_object(t).unwrap()["a"], 1);
        assert!(extract_json_object("no braces here").is_none());
        assert!(extract_json_object("{\"unterminated\": ").is_none());
    }

    #[test]
    fn json_schema_lists_every_field_as_required() {
        let s = OutputSchema {
            name: "amazon".into(),
            fields: vec![
                SchemaField {
                    name: "title".into(),
                    kind: FieldKind::Text {
                        max_chars: Some(200),
                    },
                    min_chars: None,
                    hashtags: false,
                },
                SchemaField {
                    name: "bullets".into(),
                    kind: FieldKind::List {
                        min_items: 5,
                        max_items: 5,
                        item_max_chars: Some(255),
                    },
                    min_chars: None,
                    hashtags: false,
                },
            ],
        };
        let j = s.to_json_schema();
        assert_eq!(j["required"], serde_json::json!(["title", "bullets"]));
        assert_eq!(j["properties"]["bullets"]["minItems"], 5);
        assert_eq!(j["additionalProperties"], false);
    }

    #[test]
    fn retryable_errors_are_the_transient_ones() {
        assert!(LlmError::RateLimited { retry_after: None }.is_retryable());
        assert!(LlmError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!LlmError::Rejected("401".into()).is_retryable());
        assert!(!LlmError::Setup("x".into()).is_retryable());
    }
}
