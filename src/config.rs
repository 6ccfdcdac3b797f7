//! Typed settings, layered: built-in defaults, then a TOML file (`enricher.toml` in the
//! working directory, or the file named by `--config` / `ENRICHER_CONFIG`), then environment
//! variables `ENRICHER_<SECTION>__<KEY>` (e.g. `ENRICHER_WORKER__CONCURRENCY=8`).
//!
//! Well-known variables are honoured too: `DATABASE_URL`, `OPENAI_API_KEY`,
//! `OPENAI_BASE_URL`, `OPENAI_MODEL`. Secrets are `SecretString`: they never reach a log line
//! or a `Debug` print.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::llm::Sampling;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("configuration file {path}: {source}")]
    File {
        path: PathBuf,
        source: Box<figment::Error>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// `sqlite://enricher.db` (default) or `postgres://user@host/db`.
    pub database_url: String,
    pub http: HttpSettings,
    pub worker: WorkerSettings,
    pub paths: PathSettings,
    pub limits: InputLimits,
    /// Sampling defaults for every provider (a provider may override them).
    pub sampling: Sampling,
    /// Provider used by channels that `routing` does not name.
    pub default_provider: String,
    /// Channel name -> provider name.
    pub routing: BTreeMap<String, String>,
    /// Provider name -> settings.
    pub providers: BTreeMap<String, ProviderSettings>,
    pub log: LogSettings,
    pub repair: RepairSettings,
    pub budget: BudgetSettings,
    /// Webhook delivery of approved content.
    pub delivery: DeliverySettings,
}

/// Webhook delivery (see `delivery::worker`). Durations are milliseconds unless named `_s`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DeliverySettings {
    /// Run the delivery worker wherever queue workers run (`serve`, `worker`).
    pub enabled: bool,
    /// How often an idle delivery worker looks for due deliveries.
    pub poll_interval_ms: u64,
    /// Webhook requests in flight at once from one process.
    pub concurrency: usize,
    /// Limit of one webhook request: connect, send, and the response.
    pub request_timeout_ms: u64,
    /// How long a delivery keeps being retried, counted from its event (or its replay),
    /// before it is dead-lettered.
    pub retry_budget_s: u64,
    /// Backoff before retry n: about `base * 2^(n-1)`, capped at `max`, with jitter; a
    /// longer `Retry-After` from the receiver wins.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Allow webhook URLs whose host is (or resolves to) a private, shared, link-local,
    /// unique-local or reserved address. Off by default: a guard against SSRF.
    pub allow_private_networks: bool,
    /// Allow loopback addresses (127.0.0.0/8, ::1), for local receivers and tests.
    pub allow_loopback: bool,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            poll_interval_ms: 500,
            concurrency: 16,
            request_timeout_ms: 10_000,
            retry_budget_s: 24 * 60 * 60,
            backoff_base_ms: 2_000,
            backoff_max_ms: 60 * 60 * 1_000,
            allow_private_networks: false,
            allow_loopback: true,
        }
    }
}

/// How hard the pipeline tries to fix copy that fails its checks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RepairSettings {
    /// Re-prompts with the findings after a failed check (0 = none).
    pub max_prompts: usize,
}

impl Default for RepairSettings {
    fn default() -> Self {
        Self { max_prompts: 1 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    pub bind: SocketAddr,
    /// Largest accepted request body (file uploads), in MiB.
    pub max_body_mib: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerSettings {
    /// Tasks one worker process runs at once (generation itself may be limited further by
    /// the provider's `concurrency`: for a local model, the requests decoded together).
    /// Default 8, the local model's default batch, so that the batch stays full.
    pub concurrency: usize,
    /// How often an idle SQLite worker looks for new tasks.
    pub poll_interval_ms: u64,
    /// Attempts per task, the first one included.
    pub max_attempts: u32,
    /// Backoff before retry n is `base * 2^(n-1)`, capped at `max`, with jitter.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// A task running longer than this is failed (and retried if attempts remain).
    pub task_timeout_s: u64,
    /// Tasks fetched per poll.
    pub batch_size: usize,
    /// How often a worker tells the queue it is alive.
    pub heartbeat_s: u64,
    /// Heartbeats a worker may miss before its locked tasks are given to another worker
    /// (recovery time after a crash = heartbeat_s x missed_heartbeats).
    pub missed_heartbeats: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct PathSettings {
    /// Channel definitions (`*.toml`) and their prompt templates (`*.tera`).
    pub prompts_dir: PathBuf,
    /// Model manifest (`models.toml`) and downloaded model files.
    pub models_dir: PathBuf,
}

/// Limits on input specs; a spec over a limit fails alone with an error naming the field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct InputLimits {
    pub max_description_chars: usize,
    pub max_title_chars: usize,
    pub max_attributes: usize,
    pub max_attribute_value_chars: usize,
    pub max_id_chars: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// `pretty` or `json`.
    pub format: String,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Local,
    Openai,
    Stub,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderSettings {
    pub kind: ProviderKind,
    /// Local: a name from `models/models.toml`. Remote: the model name the server expects.
    #[serde(default)]
    pub model: String,
    /// Remote: base URL of an OpenAI-compatible API, e.g. `http://127.0.0.1:8000/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Remote: API key. Prefer the environment (`OPENAI_API_KEY`) to a file.
    #[serde(default, skip_serializing)]
    pub api_key: Option<SecretString>,
    /// Remote: per-request timeout.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Requests in flight at once from this process. Local: requests decoded together by
    /// the model's runner (the batch size of continuous batching).
    #[serde(default = "default_provider_concurrency")]
    pub concurrency: usize,
    /// Remote: retries of one request inside an attempt (429/5xx/timeouts), with backoff.
    #[serde(default = "default_request_retries")]
    pub max_retries: u32,
    /// Remote: ask for `response_format: json_schema` (falls back to `json_object`, then to
    /// plain text, when the server refuses).
    #[serde(default = "default_true")]
    pub structured_output: bool,
    /// Overrides of the global sampling defaults.
    #[serde(default)]
    pub sampling: Option<Sampling>,
    /// Local: CPU threads for inference (0: one per CPU, or `RAYON_NUM_THREADS`).
    #[serde(default)]
    pub threads: usize,
    /// Local: reuse the KV cache of prompt prefixes shared between requests (the system
    /// prompt and channel instructions), so only the spec part of a prompt is prefilled.
    /// Decided by the first provider that loads a model file.
    #[serde(default = "default_true")]
    pub prefix_cache: bool,
    /// Local: MiB of KV cache kept of the last prompts answered, so that a repair or a
    /// regeneration, which repeats its first prompt up to the end of the product data, reads
    /// only what follows (about 11 MiB per 500-token prompt for SmolLM2-135M; 0: none kept).
    #[serde(default = "default_prompt_memory_mib")]
    pub prompt_memory_mib: usize,
    /// Stub only: pretend each generation takes this long (benchmarks, fault tests).
    #[serde(default)]
    pub simulated_latency_ms: u64,
    /// Requests and tokens per minute for this provider, across every worker that shares
    /// the database.
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// A provider's shared rate limit; unset means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Length of the window the limits count over, in seconds (default 60: the limits are
    /// per minute).
    #[serde(default)]
    pub window_s: Option<u32>,
}

impl RateLimit {
    pub fn is_set(&self) -> bool {
        self.requests_per_minute.is_some() || self.tokens_per_minute.is_some()
    }
}

/// Token budgets. A batch can carry its own budget (set at submission or later).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct BudgetSettings {
    /// Tokens (prompt + completion, all providers) per UTC day; tasks wait for the next day
    /// once it is spent.
    pub daily_tokens: Option<u64>,
}

fn default_timeout_s() -> u64 {
    60
}
fn default_provider_concurrency() -> usize {
    8
}
fn default_request_retries() -> u32 {
    3
}
fn default_true() -> bool {
    true
}

fn default_prompt_memory_mib() -> usize {
    crate::llm::local::prefix::REMEMBERED_BYTES >> 20
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_mib: 64,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 8,
            poll_interval_ms: 100,
            max_attempts: 4,
            backoff_base_ms: 1_000,
            backoff_max_ms: 5 * 60 * 1_000,
            task_timeout_s: 600,
            batch_size: 8,
            heartbeat_s: 5,
            missed_heartbeats: 3,
        }
    }
}

impl Default for PathSettings {
    fn default() -> Self {
        Self {
            prompts_dir: PathBuf::from("prompts"),
            models_dir: PathBuf::from("models"),
        }
    }
}

impl Default for InputLimits {
    fn default() -> Self {
        Self {
            max_description_chars: 20_000,
            max_title_chars: 1_000,
            max_attributes: 300,
            max_attribute_value_chars: 2_000,
            max_id_chars: 256,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: "pretty".into(),
            filter: "info,sqlx=warn,apalis=warn,apalis_core=warn".into(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        let mut providers = BTreeMap::new();
        providers.insert(
            "local".to_string(),
            ProviderSettings {
                kind: ProviderKind::Local,
                model: crate::models::DEFAULT_MODEL.to_string(),
                base_url: None,
                api_key: None,
                timeout_s: default_timeout_s(),
                // Eight decoded together: 2.2x the products/min of one at a time
                // with the AVX-512 kernels, against 1.9x for four (README).
                concurrency: default_provider_concurrency(),
                max_retries: 0,
                structured_output: true,
                sampling: None,
                threads: 0,
                prefix_cache: true,
                prompt_memory_mib: default_prompt_memory_mib(),
                simulated_latency_ms: 0,
                rate_limit: RateLimit::default(),
            },
        );
        providers.insert(
            "openai".to_string(),
            ProviderSettings {
                kind: ProviderKind::Openai,
                model: "gpt-4o-mini".into(),
                base_url: None,
                api_key: None,
                timeout_s: default_timeout_s(),
                concurrency: default_provider_concurrency(),
                max_retries: default_request_retries(),
                structured_output: true,
                sampling: None,
                threads: 0,
                prefix_cache: true,
                prompt_memory_mib: default_prompt_memory_mib(),
                simulated_latency_ms: 0,
                rate_limit: RateLimit::default(),
            },
        );
        providers.insert(
            "stub".to_string(),
            ProviderSettings {
                kind: ProviderKind::Stub,
                model: "stub".into(),
                base_url: None,
                api_key: None,
                timeout_s: default_timeout_s(),
                concurrency: 1024,
                max_retries: 0,
                structured_output: true,
                sampling: None,
                threads: 0,
                prefix_cache: true,
                prompt_memory_mib: default_prompt_memory_mib(),
                simulated_latency_ms: 0,
                rate_limit: RateLimit::default(),
            },
        );
        Self {
            database_url: "sqlite://enricher.db".into(),
            http: HttpSettings::default(),
            worker: WorkerSettings::default(),
            paths: PathSettings::default(),
            limits: InputLimits::default(),
            sampling: Sampling::default(),
            default_provider: "local".into(),
            routing: BTreeMap::new(),
            providers,
            log: LogSettings::default(),
            repair: RepairSettings::default(),
            budget: BudgetSettings::default(),
            delivery: DeliverySettings::default(),
        }
    }
}

impl Settings {
    /// Loads defaults, then `file` (or `enricher.toml` when it exists), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("ENRICHER_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let p = PathBuf::from("enricher.toml");
                p.exists().then_some(p)
            });
        if let Some(path) = &file {
            if !path.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(Env::prefixed("ENRICHER_").split("__").ignore(&["CONFIG"]));
        if let Ok(url) = std::env::var("DATABASE_URL") {
            fig = fig.merge(Serialized::default("database_url", url));
        }
        let mut s: Settings = fig.extract().map_err(|e| match &file {
            Some(path) => ConfigError::File {
                path: path.clone(),
                source: Box::new(e),
            },
            None => ConfigError::Invalid(e.to_string()),
        })?;
        s.apply_openai_env();
        s.validate()?;
        Ok(s)
    }

    /// `OPENAI_API_KEY`, `OPENAI_BASE_URL` and `OPENAI_MODEL` fill in every `openai` provider
    /// that does not set them itself.
    fn apply_openai_env(&mut self) {
        let key = std::env::var("OPENAI_API_KEY").ok();
        let base = std::env::var("OPENAI_BASE_URL").ok();
        let model = std::env::var("OPENAI_MODEL").ok();
        for p in self.providers.values_mut() {
            if p.kind != ProviderKind::Openai {
                continue;
            }
            if p.api_key.is_none() {
                if let Some(k) = &key {
                    p.api_key = Some(SecretString::from(k.clone()));
                }
            }
            if p.base_url.is_none() {
                p.base_url = base.clone();
            }
            if let Some(m) = &model {
                p.model = m.clone();
            }
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.providers.contains_key(&self.default_provider) {
            return Err(ConfigError::Invalid(format!(
                "default_provider `{}` is not defined under [providers]",
                self.default_provider
            )));
        }
        for (channel, provider) in &self.routing {
            if !self.providers.contains_key(provider) {
                return Err(ConfigError::Invalid(format!(
                    "routing.{channel} names provider `{provider}`, which is not defined under [providers]"
                )));
            }
        }
        if self.worker.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "worker.max_attempts must be at least 1".into(),
            ));
        }
        if self.worker.concurrency == 0 {
            return Err(ConfigError::Invalid(
                "worker.concurrency must be at least 1".into(),
            ));
        }
        if self.delivery.concurrency == 0 || self.delivery.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "delivery.concurrency and delivery.request_timeout_ms must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The provider name that serves `channel`.
    pub fn provider_for(&self, channel: &str) -> &str {
        self.routing
            .get(channel)
            .map(String::as_str)
            .unwrap_or(&self.default_provider)
    }

    /// Sampling for a provider: its own overrides, else the global defaults.
    pub fn sampling_for(&self, provider: &str) -> Sampling {
        self.providers
            .get(provider)
            .and_then(|p| p.sampling.clone())
            .unwrap_or_else(|| self.sampling.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_route_everything_to_local() {
        let s = Settings::default();
        s.validate().unwrap();
        assert_eq!(s.provider_for("seo"), "local");
        assert_eq!(s.database_url, "sqlite://enricher.db");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn file_and_env_layers_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "enricher.toml",
                r#"
                default_provider = "openai"
                [worker]
                concurrency = 2
                [routing]
                seo = "stub"
                "#,
            )?;
            jail.set_env("ENRICHER_WORKER__MAX_ATTEMPTS", "7");
            jail.set_env("DATABASE_URL", "sqlite://other.db");
            jail.set_env("OPENAI_API_KEY", "sk-test");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.worker.concurrency, 2);
            assert_eq!(s.worker.max_attempts, 7);
            assert_eq!(s.database_url, "sqlite://other.db");
            assert_eq!(s.provider_for("seo"), "stub");
            assert_eq!(s.provider_for("amazon"), "openai");
            assert!(s.providers["openai"].api_key.is_some());
            // the key never shows in Debug output
            assert!(!format!("{s:?}").contains("sk-test"));
            Ok(())
        });
    }

    #[test]
    fn routing_to_an_unknown_provider_is_an_error_naming_it() {
        let mut s = Settings::default();
        s.routing.insert("seo".into(), "nope".into());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("routing.seo") && e.contains("nope"), "{e}");
    }
}
