//! `enricher eval`: products through the real pipeline (no HTTP, no queue), measured.
//!
//! Per channel: the share of products ready without edits, each rule's failure rate on the
//! model's first answer and on the final draft, grounding errors before and after, model
//! calls per draft, the share of ready fields the model wrote (versus the deterministic
//! fallback), tokens and latency percentiles, and the worst examples. `--baseline` runs the
//! same model with a plain prompt and no structure or repair, for comparison.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use serde::Serialize;

use crate::{
    checks::{FieldValue, Fields, Finding, Severity},
    pipeline::{FieldSource, Mode, Pipeline},
    review::DraftStatus,
    spec::{self, ProductSpec},
};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no valid product in {0}")]
    Empty(String),
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
}

/// One evaluated (product, channel).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub product_id: String,
    pub channel: String,
    pub status: DraftStatus,
    pub fields: Fields,
    pub findings: Vec<Finding>,
    pub first_findings: Vec<Finding>,
    pub field_sources: BTreeMap<String, FieldSource>,
    pub model_calls: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: u64,
    pub repairs: Vec<String>,
}

/// Figures for one channel in one mode.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChannelStats {
    pub drafts: usize,
    /// Drafts with no error finding (status pending_review).
    pub ready: usize,
    pub ready_share: f64,
    /// Fields of ready drafts written by the model / all fields of ready drafts.
    pub model_field_share: f64,
    /// Share of drafts failing each rule (error severity), on the first answer and final.
    pub rule_failure_before: BTreeMap<String, f64>,
    pub rule_failure_after: BTreeMap<String, f64>,
    /// Grounding error findings per draft, before and after.
    pub grounding_errors_before: f64,
    pub grounding_errors_after: f64,
    /// Share of drafts with at least one ungrounded claim, before and after.
    pub grounding_draft_share_before: f64,
    pub grounding_draft_share_after: f64,
    pub model_calls_mean: f64,
    pub prompt_tokens_mean: f64,
    pub completion_tokens_mean: f64,
    pub latency_ms_p50: u64,
    pub latency_ms_p90: u64,
    pub latency_ms_max: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub mode: &'static str,
    pub by_channel: BTreeMap<String, ChannelStats>,
    /// The drafts with the most error findings.
    pub worst: Vec<Sample>,
    pub wall_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub input: String,
    pub products: usize,
    pub channels: Vec<String>,
    pub provider: String,
    pub model: String,
    /// Drafts generated at once (for a local model: decoded together).
    pub concurrency: usize,
    /// Requests a local model decodes together (at most `concurrency`).
    pub batch: usize,
    pub enricher: ModeReport,
    /// The full pipeline without grounded decoding (`--ungrounded`).
    pub ungrounded: Option<ModeReport>,
    pub baseline: Option<ModeReport>,
}

/// Loads up to `limit` valid products from `path` (a bad record is skipped and counted).
pub fn load_specs(
    path: &std::path::Path,
    limit: Option<usize>,
    limits: &crate::config::InputLimits,
) -> Result<Vec<ProductSpec>, EvalError> {
    let bytes = std::fs::read(path).map_err(|source| EvalError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut specs: Vec<ProductSpec> = spec::parse_submission(&bytes, limits)
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .collect();
    if let Some(n) = limit {
        specs.truncate(n);
    }
    if specs.is_empty() {
        return Err(EvalError::Empty(path.display().to_string()));
    }
    Ok(specs)
}

/// Runs every spec x channel in `mode`, up to `concurrency` drafts at once (results in
/// input order); `progress` is called after each draft. A draft that takes long (repairs)
/// does not hold back the next ones: a new one starts whenever one ends, as in the worker.
pub async fn run_mode(
    pipeline: &Pipeline,
    specs: &[ProductSpec],
    channels: &[String],
    mode: Mode,
    concurrency: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Vec<Sample>, f64), EvalError> {
    use futures::StreamExt;
    let total = specs.len() * channels.len();
    let started = Instant::now();
    let mut out = Vec::with_capacity(total);
    let tasks = specs
        .iter()
        .flat_map(|s| channels.iter().map(move |ch| (s, ch)))
        .enumerate()
        .map(|(i, (s, ch))| async move {
            let o = pipeline.enrich_with(s, ch, None, mode).await?;
            Ok::<_, EvalError>(Sample {
                product_id: s.id.clone(),
                channel: ch.clone(),
                status: o.status,
                fields: o.fields,
                findings: o.findings,
                first_findings: o.first_findings,
                field_sources: o.provenance.field_sources.clone(),
                model_calls: o.provenance.model_calls,
                prompt_tokens: o.provenance.prompt_tokens,
                completion_tokens: o.provenance.completion_tokens,
                latency_ms: o.provenance.latency_ms,
                repairs: o.provenance.repairs.clone(),
            })
            .map(|sample| (i, sample))
        });
    let mut stream = futures::stream::iter(tasks).buffer_unordered(concurrency.max(1));
    while let Some(sample) = stream.next().await {
        out.push(sample?);
        progress(out.len(), total);
    }
    let elapsed = started.elapsed().as_secs_f64();
    out.sort_by_key(|(i, _)| *i);
    Ok((out.into_iter().map(|(_, s)| s).collect(), elapsed))
}

fn error_rules(f: &[Finding]) -> BTreeSet<String> {
    f.iter()
        .filter(|x| x.severity == Severity::Error)
        .map(|x| x.rule.clone())
        .collect()
}

fn grounding(f: &[Finding]) -> usize {
    f.iter()
        .filter(|x| x.severity == Severity::Error && x.rule.starts_with("grounding."))
        .count()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Aggregates samples into per-channel figures.
pub fn summarize(mode: &'static str, samples: &[Sample], wall_seconds: f64) -> ModeReport {
    let mut by_channel = BTreeMap::new();
    let channels: BTreeSet<&str> = samples.iter().map(|s| s.channel.as_str()).collect();
    for ch in channels {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.channel == ch).collect();
        let n = of.len();
        let nf = n.max(1) as f64;
        let ready: Vec<&&Sample> = of
            .iter()
            .filter(|s| s.status == DraftStatus::PendingReview)
            .collect();
        let (mut model_fields, mut all_fields) = (0usize, 0usize);
        for s in &ready {
            for src in s.field_sources.values() {
                all_fields += 1;
                if *src == FieldSource::Model {
                    model_fields += 1;
                }
            }
        }
        let mut before: BTreeMap<String, f64> = BTreeMap::new();
        let mut after: BTreeMap<String, f64> = BTreeMap::new();
        for s in &of {
            for r in error_rules(&s.first_findings) {
                *before.entry(r).or_default() += 1.0 / nf;
            }
            for r in error_rules(&s.findings) {
                *after.entry(r).or_default() += 1.0 / nf;
            }
        }
        let mut lat: Vec<u64> = of.iter().map(|s| s.latency_ms).collect();
        lat.sort_unstable();
        by_channel.insert(
            ch.to_string(),
            ChannelStats {
                drafts: n,
                ready: ready.len(),
                ready_share: ready.len() as f64 / nf,
                model_field_share: if all_fields == 0 {
                    0.0
                } else {
                    model_fields as f64 / all_fields as f64
                },
                rule_failure_before: before,
                rule_failure_after: after,
                grounding_errors_before: of
                    .iter()
                    .map(|s| grounding(&s.first_findings))
                    .sum::<usize>() as f64
                    / nf,
                grounding_errors_after: of.iter().map(|s| grounding(&s.findings)).sum::<usize>()
                    as f64
                    / nf,
                grounding_draft_share_before: of
                    .iter()
                    .filter(|s| grounding(&s.first_findings) > 0)
                    .count() as f64
                    / nf,
                grounding_draft_share_after: of
                    .iter()
                    .filter(|s| grounding(&s.findings) > 0)
                    .count() as f64
                    / nf,
                model_calls_mean: of.iter().map(|s| s.model_calls as f64).sum::<f64>() / nf,
                prompt_tokens_mean: of.iter().map(|s| s.prompt_tokens as f64).sum::<f64>() / nf,
                completion_tokens_mean: of.iter().map(|s| s.completion_tokens as f64).sum::<f64>()
                    / nf,
                latency_ms_p50: percentile(&lat, 0.5),
                latency_ms_p90: percentile(&lat, 0.9),
                latency_ms_max: lat.last().copied().unwrap_or(0),
            },
        );
    }
    let mut worst: Vec<Sample> = samples.to_vec();
    worst.sort_by_key(|s| {
        std::cmp::Reverse(
            s.findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count(),
        )
    });
    worst.retain(|s| s.findings.iter().any(|f| f.severity == Severity::Error));
    worst.truncate(10);
    ModeReport {
        mode,
        by_channel,
        worst,
        wall_seconds,
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// The report as Markdown.
pub fn markdown(r: &EvalReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "# enricher eval\n\nInput `{}`, {} products, channels {}, provider `{}` (model `{}`).\n\n",
        r.input,
        r.products,
        r.channels.join(", "),
        r.provider,
        r.model
    ));
    out.push_str("## Headline\n\n");
    out.push_str("| channel | mode | ready without edits | ready fields written by the model | drafts with ungrounded claims (first answer -> final) | model calls per draft | latency p50 / p90 |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    let modes: Vec<&ModeReport> = std::iter::once(&r.enricher)
        .chain(r.ungrounded.iter())
        .chain(r.baseline.iter())
        .collect();
    for ch in &r.channels {
        for m in &modes {
            if let Some(s) = m.by_channel.get(ch) {
                out.push_str(&format!(
                    "| {ch} | {} | {} ({}/{}) | {} | {} -> {} | {:.2} | {:.1} s / {:.1} s |\n",
                    m.mode,
                    pct(s.ready_share),
                    s.ready,
                    s.drafts,
                    pct(s.model_field_share),
                    pct(s.grounding_draft_share_before),
                    pct(s.grounding_draft_share_after),
                    s.model_calls_mean,
                    s.latency_ms_p50 as f64 / 1000.0,
                    s.latency_ms_p90 as f64 / 1000.0,
                ));
            }
        }
    }
    out.push('\n');
    for m in &modes {
        out.push_str(&format!(
            "Throughput, {}: {} products x {} channels in {:.0} s = {:.1} products/min ({:.1} drafts/min), {} at once{}.\n",
            m.mode,
            r.products,
            r.channels.len(),
            m.wall_seconds,
            r.products as f64 * 60.0 / m.wall_seconds.max(1e-9),
            (r.products * r.channels.len()) as f64 * 60.0 / m.wall_seconds.max(1e-9),
            r.concurrency,
            if r.batch < r.concurrency {
                format!(" (a local model decodes up to {} together)", r.batch)
            } else {
                String::new()
            },
        ));
    }
    for m in &modes {
        out.push_str(&format!(
            "\n## Rule failures, {} (share of drafts; first answer -> final)\n\n",
            m.mode
        ));
        for (ch, s) in &m.by_channel {
            out.push_str(&format!(
                "### {ch}\n\nTokens per draft: {:.0} prompt, {:.0} completion. Grounding errors per draft: {:.2} -> {:.2}. Wall time {:.0} s for the mode.\n\n| rule | first answer | final |\n| --- | --- | --- |\n",
                s.prompt_tokens_mean, s.completion_tokens_mean, s.grounding_errors_before, s.grounding_errors_after, m.wall_seconds
            ));
            let rules: BTreeSet<&String> = s
                .rule_failure_before
                .keys()
                .chain(s.rule_failure_after.keys())
                .collect();
            for rule in rules {
                out.push_str(&format!(
                    "| `{rule}` | {} | {} |\n",
                    pct(s.rule_failure_before.get(rule).copied().unwrap_or(0.0)),
                    pct(s.rule_failure_after.get(rule).copied().unwrap_or(0.0))
                ));
            }
            out.push('\n');
        }
        out.push_str(&format!("## The 10 worst drafts, {}\n\n", m.mode));
        for s in &m.worst {
            out.push_str(&format!(
                "- **{}** / {} ({}):\n",
                s.product_id, s.channel, s.status
            ));
            for (k, v) in &s.fields {
                let text = match v {
                    FieldValue::Text(t) => t.clone(),
                    FieldValue::List(items) => items.join(" | "),
                };
                out.push_str(&format!("  - {k}: {}\n", text.replace('\n', " ")));
            }
            for f in s.findings.iter().filter(|f| f.severity == Severity::Error) {
                out.push_str(&format!("  - `{}` {}: {}\n", f.rule, f.field, f.message));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Provider;
    use std::sync::Arc;

    /// The stub's answers, but the product with brand `Slow` answers only once `release`
    /// products have had a call (or after a few seconds, recorded as a timeout). Products
    /// are told apart by their `Capacity` line.
    struct Gate {
        inner: crate::llm::stub::StubProvider,
        started: std::sync::Mutex<BTreeSet<String>>,
        release: usize,
        changed: tokio::sync::Notify,
        timed_out: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Provider for Gate {
        fn info(&self) -> crate::llm::ModelInfo {
            self.inner.info()
        }

        async fn generate(
            &self,
            req: crate::llm::GenerateRequest,
        ) -> Result<crate::llm::Generation, crate::llm::LlmError> {
            use std::sync::atomic::Ordering;
            let product = req.user.lines().find(|l| l.starts_with("Capacity: "));
            let seen = |s: &Self| s.started.lock().map(|p| p.len()).unwrap_or(0);
            if let (Some(p), Ok(mut started)) = (product, self.started.lock()) {
                started.insert(p.to_string());
            }
            self.changed.notify_waiters();
            if req.user.contains("Brand: Slow") {
                let wait = async {
                    loop {
                        let changed = self.changed.notified();
                        if seen(self) >= self.release {
                            return;
                        }
                        changed.await;
                    }
                };
                if tokio::time::timeout(std::time::Duration::from_secs(5), wait)
                    .await
                    .is_err()
                {
                    self.timed_out.store(true, Ordering::SeqCst);
                }
            }
            self.inner.generate(req).await
        }
    }

    #[tokio::test]
    async fn a_slow_draft_does_not_hold_back_the_next_ones_and_results_keep_input_order() {
        use std::sync::atomic::Ordering;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts");
        let settings = crate::config::Settings::default();
        let gate = Arc::new(Gate {
            inner: crate::llm::stub::StubProvider::new("gate", &settings.providers["stub"]),
            started: Default::default(),
            // The slow product and three others: the third other one can only start while
            // the slow one runs if a finished draft frees its place (3 at once).
            release: 4,
            changed: tokio::sync::Notify::new(),
            timed_out: Default::default(),
        });
        let providers = crate::llm::Providers::from_parts(
            BTreeMap::from([("gate".to_string(), gate.clone() as Arc<dyn Provider>)]),
            BTreeMap::new(),
            "gate".into(),
        );
        let pipeline = Pipeline {
            channels: Arc::new(crate::channel::Channels::load(&dir).unwrap()),
            prompts: Arc::new(crate::prompt::Prompts::load(&dir).unwrap()),
            providers,
            settings: Arc::new(crate::config::Settings {
                default_provider: "gate".into(),
                routing: BTreeMap::new(),
                ..settings.clone()
            }),
        };
        let records = (0..6)
            .map(|i| {
                let brand = if i == 0 { "Slow" } else { "Acme" };
                format!(
                    r#"{{"id": "p{i}", "brand": "{brand}", "category": "Kettle", "attributes": {{"Capacity": "1.{i} l"}}}}"#
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let specs: Vec<ProductSpec> =
            crate::spec::parse_submission(records.as_bytes(), &settings.limits)
                .into_iter()
                .map(|(_, r)| r.unwrap())
                .collect();
        let channels = vec!["seo".to_string()];
        let (samples, _) = run_mode(&pipeline, &specs, &channels, Mode::Full, 3, |_, _| {})
            .await
            .unwrap();
        assert!(
            !gate.timed_out.load(Ordering::SeqCst),
            "the slow draft held back the drafts after it"
        );
        let ids: Vec<&str> = samples.iter().map(|s| s.product_id.as_str()).collect();
        assert_eq!(ids, ["p0", "p1", "p2", "p3", "p4", "p5"]);
    }

    fn finding(rule: &str) -> Finding {
        Finding {
            rule: rule.into(),
            field: "title".into(),
            item: None,
            severity: Severity::Error,
            message: "m".into(),
            span: None,
        }
    }

    fn sample(
        ch: &str,
        status: DraftStatus,
        first: Vec<Finding>,
        last: Vec<Finding>,
        sources: &[FieldSource],
    ) -> Sample {
        Sample {
            product_id: "p".into(),
            channel: ch.into(),
            status,
            fields: Fields::new(),
            findings: last,
            first_findings: first,
            field_sources: sources
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("f{i}"), *s))
                .collect(),
            model_calls: 1,
            prompt_tokens: 100,
            completion_tokens: 20,
            latency_ms: 1000,
            repairs: vec![],
        }
    }

    #[test]
    fn summary_counts_ready_sources_and_rule_rates() {
        let samples = vec![
            sample(
                "seo",
                DraftStatus::PendingReview,
                vec![finding("grounding.number")],
                vec![],
                &[FieldSource::Model, FieldSource::Fallback],
            ),
            sample(
                "seo",
                DraftStatus::PendingReview,
                vec![],
                vec![],
                &[FieldSource::Model, FieldSource::Model],
            ),
            sample(
                "seo",
                DraftStatus::NeedsAttention,
                vec![finding("length.max")],
                vec![finding("length.max")],
                &[FieldSource::Model],
            ),
            sample(
                "seo",
                DraftStatus::PendingReview,
                vec![],
                vec![],
                &[FieldSource::Model, FieldSource::Model],
            ),
        ];
        let r = summarize("enricher", &samples, 1.0);
        let s = &r.by_channel["seo"];
        assert_eq!((s.drafts, s.ready), (4, 3));
        assert!((s.ready_share - 0.75).abs() < 1e-9);
        assert!((s.model_field_share - 5.0 / 6.0).abs() < 1e-9);
        assert!((s.rule_failure_before["grounding.number"] - 0.25).abs() < 1e-9);
        assert!(!s.rule_failure_after.contains_key("grounding.number"));
        assert!((s.grounding_draft_share_before - 0.25).abs() < 1e-9);
        assert_eq!(s.grounding_draft_share_after, 0.0);
        assert_eq!(r.worst.len(), 1);
        let md = markdown(&EvalReport {
            input: "x.jsonl".into(),
            products: 4,
            channels: vec!["seo".into()],
            provider: "stub".into(),
            model: "stub".into(),
            concurrency: 1,
            batch: 1,
            enricher: r,
            ungrounded: None,
            baseline: None,
        });
        assert!(md.contains("| seo | enricher | 75% (3/4) | 83% |"), "{md}");
    }
}
