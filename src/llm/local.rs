//! Local inference with candle (placeholder until the candle runner lands).

use std::path::Path;

use async_trait::async_trait;

use super::{GenerateRequest, Generation, LlmError, ModelInfo, Provider};
use crate::config::ProviderSettings;

#[derive(Debug)]
pub struct LocalProvider {
    name: String,
    model: String,
}

impl LocalProvider {
    pub async fn load(
        name: &str,
        s: &ProviderSettings,
        _models_dir: &Path,
    ) -> Result<Self, LlmError> {
        Ok(Self {
            name: name.to_string(),
            model: s.model.clone(),
        })
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            provider: self.name.clone(),
            kind: "local".into(),
            model: self.model.clone(),
            model_sha256: None,
        }
    }
    async fn generate(&self, _req: GenerateRequest) -> Result<Generation, LlmError> {
        Err(LlmError::Setup("local provider not built yet".into()))
    }
}
