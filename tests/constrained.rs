//! Constrained decoding on the real model (`models/SmolLM2-135M-Instruct.Q4_1.gguf`) with
//! the real prompts, for real products (`../shared/data/products/wdc-pave-dev.jsonl`):
//! every answer must be exactly one JSON object of the channel's schema, and every number in
//! it one of the spec's (`checks::spec_numbers`). Prints how many answers pass the
//! grounding checks and the speed.
//!
//! `CONSTRAINED_PRODUCTS=n` changes how many products are used (default 20).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use enricher::{
    channel::{Channel, Channels},
    checks::{self, FieldValue, Fields, Severity},
    config::{InputLimits, Settings},
    llm::{local::LocalProvider, FieldKind, GenerateRequest},
    prompt::{PromptInputs, Prompts},
    spec::{parse_submission, ProductSpec},
};
use regex::Regex;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn products(n: usize) -> Vec<ProductSpec> {
    let path = root().join("../shared/data/products/wdc-pave-dev.jsonl");
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (shared test data)", path.display()));
    parse_submission(&bytes, &InputLimits::default())
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .take(n)
        .collect()
}

/// The answer as the channel's fields; panics unless it is exactly one object of the schema.
fn parse_strict(channel: &Channel, text: &str) -> Fields {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {text}"));
    let schema = channel.schema();
    assert_eq!(obj.len(), schema.fields.len(), "{text}");
    let mut fields = Fields::new();
    for f in &schema.fields {
        let v = obj
            .get(&f.name)
            .unwrap_or_else(|| panic!("no {}: {text}", f.name));
        let value = match f.kind {
            FieldKind::Text { max_chars } => {
                let s = v.as_str().unwrap_or_else(|| panic!("{}: {text}", f.name));
                if let Some(m) = max_chars {
                    assert!(s.chars().count() <= m, "{} too long: {text}", f.name);
                }
                FieldValue::Text(s.to_string())
            }
            FieldKind::List {
                min_items,
                max_items,
                item_max_chars,
            } => {
                let items: Vec<String> = v
                    .as_array()
                    .unwrap_or_else(|| panic!("{}: {text}", f.name))
                    .iter()
                    .map(|i| i.as_str().expect("string items").to_string())
                    .collect();
                assert!(
                    (min_items..=max_items).contains(&items.len()),
                    "{} items: {text}",
                    items.len()
                );
                if let Some(m) = item_max_chars {
                    assert!(items.iter().all(|i| i.chars().count() <= m), "{text}");
                }
                FieldValue::List(items)
            }
        };
        fields.insert(f.name.clone(), value);
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn real_products_give_schema_valid_grounded_json() {
    let n: usize = std::env::var("CONSTRAINED_PRODUCTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let settings = Settings::default();
    let models_dir: &Path = &root().join("models");
    let provider = LocalProvider::load("local", &settings.providers["local"], models_dir)
        .await
        .unwrap_or_else(|e| {
            panic!("loading the local model: {e}; fetch it with `cargo run -- models fetch`")
        });
    let channels = Channels::load(&root().join("prompts")).unwrap();
    let prompts = Prompts::load(&root().join("prompts")).unwrap();
    let number = Regex::new(r"\d+(?:[.,]\d+)*").unwrap();
    let specs = products(n);
    assert_eq!(specs.len(), n);

    for (name, max_new) in [("seo", 96usize), ("amazon", 160)] {
        let channel = channels.get(name).unwrap();
        let (mut grounded, mut clean, mut stopped) = (0, 0, 0);
        let (mut tokens, mut decode, mut sampling_time) = (0u64, Duration::ZERO, Duration::ZERO);
        for spec in &specs {
            let prompt = prompts
                .render(channel, spec, &PromptInputs::default())
                .unwrap();
            let allowed = checks::spec_numbers(spec);
            let mut s = settings.sampling_for("local");
            s.max_new_tokens = max_new;
            let (g, t) = provider
                .generate_timed(GenerateRequest {
                    system: prompt.system,
                    user: prompt.user,
                    sampling: s,
                    schema: Some(channel.schema()),
                    allowed_numbers: Some(allowed.clone()),
                })
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", spec.id));
            tokens += u64::from(g.completion_tokens.saturating_sub(1));
            decode += t.decode;
            sampling_time += t.sampling;
            stopped += usize::from(g.finish_reason == "stop");
            let fields = parse_strict(channel, &g.text);
            for v in fields.values() {
                let texts = match v {
                    FieldValue::Text(s) => vec![s.clone()],
                    FieldValue::List(l) => l.clone(),
                };
                for t in texts {
                    for m in number.find_iter(&t) {
                        assert!(
                            allowed.iter().any(|a| a == m.as_str()),
                            "{}: {} is not in {allowed:?}: {}",
                            spec.id,
                            m.as_str(),
                            g.text
                        );
                    }
                }
            }
            let findings = checks::check(channel, spec, &fields);
            let errors: Vec<_> = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .collect();
            if !errors.iter().any(|f| f.rule.starts_with("grounding.")) {
                grounded += 1;
            }
            if errors.is_empty() {
                clean += 1;
            }
            println!(
                "{name} {} [{}] {}{}",
                spec.id,
                g.finish_reason,
                g.text,
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(
                        "\n    errors: {}",
                        errors
                            .iter()
                            .map(|f| f.rule.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
        }
        println!(
            "== {name}: {n} outputs, all schema-valid with grounded digits; {grounded} without \
             grounding errors, {clean} without any error; {stopped} ended by the model; \
             {:.1} tokens/s decoding, {:.2} ms/token choosing tokens",
            tokens as f64 / decode.as_secs_f64().max(1e-9),
            sampling_time.as_secs_f64() * 1e3 / tokens.max(1) as f64
        );
    }
}
