//! An instant, deterministic provider: it reads the product data block of the prompt and
//! answers with schema-shaped JSON built from those lines. No model, no network.
//!
//! It exists to measure and exercise everything around the model (queue, storage, review,
//! delivery) at full speed, e.g. `enricher bench queue`; it never writes real copy.

use async_trait::async_trait;

use super::{FieldKind, GenerateRequest, Generation, LlmError, ModelInfo, Provider};
use crate::config::ProviderSettings;

#[derive(Debug)]
pub struct StubProvider {
    name: String,
    latency: std::time::Duration,
}

impl StubProvider {
    pub fn new(name: &str, settings: &ProviderSettings) -> Self {
        Self {
            name: name.to_string(),
            latency: std::time::Duration::from_millis(settings.simulated_latency_ms),
        }
    }
}

#[async_trait]
impl Provider for StubProvider {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            provider: self.name.clone(),
            kind: "stub".into(),
            model: "stub".into(),
            model_sha256: None,
        }
    }

    async fn generate(&self, req: GenerateRequest) -> Result<Generation, LlmError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let text = answer(&req);
        Ok(Generation {
            prompt_tokens: (req.user.len() / 4) as u32,
            completion_tokens: (text.len() / 4) as u32,
            text,
            finish_reason: "stop".into(),
        })
    }
}

fn answer(req: &GenerateRequest) -> String {
    let block = req
        .user
        .split("<product_data>")
        .nth(1)
        .and_then(|b| b.split("</product_data>").next())
        .unwrap_or("");
    let facts: Vec<(&str, &str)> = block
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| !matches!(*k, "Shop title" | "Shop description"))
        .collect();
    let get = |k: &str| {
        facts
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| *v)
    };
    let brand = get("Brand").unwrap_or("");
    let category = get("Category").unwrap_or("Product");
    let attrs: Vec<String> = facts
        .iter()
        .filter(|(k, _)| !matches!(*k, "Brand" | "Category"))
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let headline = format!(
        "{brand} {category} {}",
        attrs.first().cloned().unwrap_or_default()
    );
    let mut obj = serde_json::Map::new();
    let Some(schema) = &req.schema else {
        return headline;
    };
    for f in &schema.fields {
        let v = match &f.kind {
            FieldKind::Text { max_chars } => {
                let mut t = format!("{headline}. {}", attrs.join(", "));
                if let Some(max) = max_chars {
                    t = t
                        .chars()
                        .take(*max)
                        .collect::<String>()
                        .trim_end()
                        .to_string();
                }
                serde_json::Value::String(t)
            }
            FieldKind::List {
                min_items,
                max_items,
                ..
            } => {
                let n = (*min_items).max(1).min(*max_items);
                let items = (0..n)
                    .map(|i| {
                        let a = attrs
                            .get(i % attrs.len().max(1))
                            .cloned()
                            .unwrap_or_default();
                        if f.name.contains("hashtag") {
                            format!("#{}", a.split_whitespace().next().unwrap_or("item"))
                        } else {
                            format!("{brand} {a}").trim().to_string()
                        }
                    })
                    .map(serde_json::Value::String)
                    .collect();
                serde_json::Value::Array(items)
            }
        };
        obj.insert(f.name.clone(), v);
    }
    serde_json::Value::Object(obj).to_string()
}
