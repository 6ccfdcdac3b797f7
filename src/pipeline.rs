//! spec -> prompt -> model -> parse -> check -> (repair) -> draft outcome.
//!
//! The pipeline does no IO of its own beyond calling the provider: the queue handler loads
//! the spec and stores the outcome. That keeps it usable from `enricher eval` and tests.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use serde::{Deserialize, Serialize};

use crate::{
    channel::{Channel, ChannelError, Channels, FieldDefKind},
    checks::{self, FieldValue, Fields, Finding, Severity},
    config::Settings,
    llm::{extract_json_object, GenerateRequest, LlmError, ModelInfo, Providers, Sampling},
    prompt::{PromptError, PromptInputs, Prompts},
    review::DraftStatus,
    spec::ProductSpec,
};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Llm(#[from] LlmError),
}

impl PipelineError {
    /// Whether another attempt of the task may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            PipelineError::Llm(e) => e.is_retryable(),
            _ => false,
        }
    }
}

pub use crate::checks::FieldSource;

/// Everything needed to know how a draft was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    #[serde(flatten)]
    pub model: ModelInfo,
    pub template: String,
    pub template_hash: String,
    pub rules_version: String,
    pub sampling: Sampling,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Wall time of all model calls of this draft.
    pub latency_ms: u64,
    /// Model calls made (1 + repair prompts).
    pub model_calls: u32,
    pub finish_reason: String,
    pub field_sources: BTreeMap<String, FieldSource>,
    /// The reviewer feedback given to the model, if this is a regeneration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedback: Option<String>,
    /// The last raw model output, kept when it could not be parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_output: Option<String>,
    /// Deterministic fixes applied after the model (trims, removals, fallback fills).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repairs: Vec<String>,
}

/// The result of enriching one product for one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub fields: Fields,
    pub findings: Vec<Finding>,
    pub status: DraftStatus,
    pub provenance: Provenance,
    /// Findings of the model's first answer, before re-prompting and repair (for `eval`).
    pub first_findings: Vec<Finding>,
}

/// How to enrich.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The channel's template, structured output, grounded decoding, checks and repair.
    #[default]
    Full,
    /// A plain prompt, no structure, no repair: what a model does when simply asked
    /// (`enricher eval --baseline`). Checks still run, to measure.
    Baseline,
    /// Like `Full` without grounded decoding (the local model may write any digits), to
    /// measure what grounded decoding changes (`enricher eval --ungrounded`).
    Ungrounded,
}

/// Runs the enrichment of one (spec, channel).
#[derive(Clone, Debug)]
pub struct Pipeline {
    pub channels: Arc<Channels>,
    pub prompts: Arc<Prompts>,
    pub providers: Providers,
    pub settings: Arc<Settings>,
}

impl Pipeline {
    pub async fn enrich(
        &self,
        spec: &ProductSpec,
        channel_name: &str,
        feedback: Option<&str>,
    ) -> Result<Outcome, PipelineError> {
        self.enrich_with(spec, channel_name, feedback, Mode::Full)
            .await
    }

    pub async fn enrich_with(
        &self,
        spec: &ProductSpec,
        channel_name: &str,
        feedback: Option<&str>,
        mode: Mode,
    ) -> Result<Outcome, PipelineError> {
        let full = mode != Mode::Baseline;
        let channel = self.channels.get(channel_name)?;
        let provider_name = self.settings.provider_for(channel_name).to_string();
        let provider = self.providers.for_channel(channel_name)?;
        let mut sampling = self.settings.sampling_for(&provider_name);
        if let Some(cap) = channel.max_new_tokens {
            sampling.max_new_tokens = sampling.max_new_tokens.min(cap);
        }
        let schema = channel.schema();
        let rounds = if full {
            1 + self.settings.repair.max_prompts
        } else {
            1
        };
        let mut first_findings: Option<Vec<Finding>> = None;
        let started = Instant::now();
        let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
        let mut repair_notes: Vec<String> = Vec::new();
        let mut best: Option<(Fields, Vec<Finding>, String, Option<String>)> = None;
        let mut template = (String::new(), String::new());
        let mut calls = 0u32;
        for round in 0..rounds {
            let prompt = if full {
                self.prompts.render(
                    channel,
                    spec,
                    &PromptInputs {
                        feedback,
                        findings: &repair_notes,
                    },
                )?
            } else {
                self.prompts.render_baseline(channel, spec)?
            };
            template = (prompt.template.clone(), prompt.template_hash.clone());
            let mut s = sampling.clone();
            s.seed = sampling.seed.wrapping_add(round as u64);
            let generation = provider
                .generate(GenerateRequest {
                    system: prompt.system,
                    user: prompt.user,
                    sampling: s,
                    schema: full.then(|| schema.clone()),
                    allowed_numbers: (mode == Mode::Full).then(|| checks::spec_numbers(spec)),
                })
                .await
                .inspect_err(|e| {
                    metrics::counter!("enricher_provider_errors_total", "provider" => provider_name.clone(), "kind" => e.kind())
                        .increment(1);
                })?;
            metrics::counter!("enricher_tokens_total", "provider" => provider_name.clone(), "direction" => "prompt")
                .increment(u64::from(generation.prompt_tokens));
            metrics::counter!("enricher_tokens_total", "provider" => provider_name.clone(), "direction" => "completion")
                .increment(u64::from(generation.completion_tokens));
            calls += 1;
            prompt_tokens += u64::from(generation.prompt_tokens);
            completion_tokens += u64::from(generation.completion_tokens);
            let (fields, mut findings, parsed) = parse_output(channel, &generation.text);
            findings.extend(checks::check(channel, spec, &fields));
            if first_findings.is_none() {
                first_findings = Some(findings.clone());
            }
            let errors = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count();
            let raw = (!parsed).then(|| generation.text.clone());
            let better = match &best {
                None => true,
                Some((_, bf, _, _)) => {
                    errors < bf.iter().filter(|f| f.severity == Severity::Error).count()
                }
            };
            if better {
                best = Some((fields, findings.clone(), generation.finish_reason, raw));
            }
            if errors == 0 {
                break;
            }
            repair_notes = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .map(describe_finding)
                .collect();
        }
        let (fields, findings, finish_reason, raw_output) = best.expect("at least one round runs");
        // Deterministic repair: fixes that cannot add facts, then the channel's fallback
        // from spec facts for what is still missing; then everything is checked again.
        let (fields, findings, field_sources, repairs) = if full && checks::has_errors(&findings) {
            let r = checks::repair(channel, spec, &fields, &findings);
            let findings = checks::check(channel, spec, &r.fields);
            (r.fields, findings, r.sources, r.applied)
        } else {
            let sources = fields
                .keys()
                .map(|k| (k.clone(), FieldSource::Model))
                .collect();
            (fields, findings, sources, Vec::new())
        };
        let status = if checks::has_errors(&findings) {
            DraftStatus::NeedsAttention
        } else {
            DraftStatus::PendingReview
        };
        Ok(Outcome {
            provenance: Provenance {
                model: provider.info(),
                template: template.0,
                template_hash: template.1,
                rules_version: channel.rules.version.clone(),
                sampling,
                prompt_tokens,
                completion_tokens,
                latency_ms: started.elapsed().as_millis() as u64,
                model_calls: calls,
                finish_reason,
                field_sources,
                feedback: feedback.map(str::to_string),
                raw_output,
                repairs,
            },
            fields,
            findings,
            status,
            first_findings: first_findings.unwrap_or_default(),
        })
    }
}

/// A finding as one line for a repair prompt.
pub fn describe_finding(f: &Finding) -> String {
    match f.item {
        Some(i) => format!("{} item {}: {}", f.field, i + 1, f.message),
        None => format!("{}: {}", f.field, f.message),
    }
}

/// Reads the model's answer into the channel's fields. Returns the fields (missing ones
/// absent), findings about the shape, and whether a JSON object was found at all.
pub fn parse_output(channel: &Channel, text: &str) -> (Fields, Vec<Finding>, bool) {
    let mut fields = Fields::new();
    let mut findings = Vec::new();
    let Some(serde_json::Value::Object(obj)) = extract_json_object(text) else {
        findings.push(Finding {
            rule: "output.json".into(),
            field: "(output)".into(),
            item: None,
            severity: Severity::Error,
            message: "the model's answer is not a JSON object".into(),
            span: None,
        });
        return (fields, findings, false);
    };
    for def in &channel.fields {
        let Some(v) = obj.get(&def.name) else {
            continue; // reported as schema.missing by the checks
        };
        let value = match (def.kind, v) {
            (FieldDefKind::Text, serde_json::Value::String(s)) => FieldValue::Text(clean(s)),
            (FieldDefKind::Text, serde_json::Value::Array(items)) => FieldValue::Text(
                items
                    .iter()
                    .filter_map(scalar_text)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            (FieldDefKind::Text, other) => match scalar_text(other) {
                Some(s) => FieldValue::Text(s),
                None => continue,
            },
            (FieldDefKind::List, serde_json::Value::Array(items)) => {
                FieldValue::List(items.iter().filter_map(scalar_text).collect())
            }
            (FieldDefKind::List, serde_json::Value::String(s)) => FieldValue::List(
                s.lines()
                    .map(|l| clean(l.trim_start_matches(['-', '*', '•', ' '])))
                    .filter(|l| !l.is_empty())
                    .collect(),
            ),
            (FieldDefKind::List, _) => continue,
        };
        fields.insert(def.name.clone(), value);
    }
    (fields, findings, true)
}

fn scalar_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(clean(s)),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Trims and collapses whitespace; model text has stray newlines and double spaces.
fn clean(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn channels() -> Channels {
        Channels::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts")).unwrap()
    }

    #[test]
    fn parses_fields_and_tolerates_shapes() {
        let ch = channels();
        let amazon = ch.get("amazon").unwrap();
        let (f, findings, ok) = parse_output(
            amazon,
            "Here you go: {\"title\": \" HP  Xeon\\nKit \", \"bullets\": \"- One fact here\\n- Two facts here\"}",
        );
        assert!(ok && findings.is_empty());
        assert_eq!(f["title"], FieldValue::Text("HP Xeon Kit".into()));
        assert_eq!(
            f["bullets"],
            FieldValue::List(vec!["One fact here".into(), "Two facts here".into()])
        );
    }

    #[test]
    fn non_json_output_is_a_finding_not_a_crash() {
        let ch = channels();
        let (f, findings, ok) = parse_output(ch.get("seo").unwrap(), "I cannot do that.");
        assert!(!ok && f.is_empty());
        assert_eq!(findings[0].rule, "output.json");
    }
}
