//! Calibration of grounding on real data: the WDC-PAVE reference titles were written by
//! people from the same products, so grounding each title against a spec made of the
//! attributes, brand and category shows what the checker flags on human copy.
//!
//! `cargo test --lib checks::calibration -- --ignored --nocapture` prints every flag
//! (`CALIBRATE=flipkart-dev.jsonl` for the other file, `CALIBRATE_FIELD=description` to
//! ground the shop descriptions) and runs real copy through check -> repair -> check.
//!
//! Measured on wdc-pave-dev.jsonl (215 titles), before the calibration fixes: 92 titles with a
//! flag, 186 flags, of which 9 were false positives (the spec had the fact in another form:
//! `4GB` for `2x2GB`, `10000` for `10, 000`, `8.2-cu ft` for `8.20 cubic feet`, `24-Count`,
//! `4-Tier`, `2-Level`, `2-Hoppers` for a bare count, `Prestige` as a product line read as a
//! brand). After: 88 titles, 177 flags, none found to be stated by the attributes.

use std::path::Path;

use super::{
    rules::{scan, Ctx, Limits},
    FieldRules, RulePack,
};
use crate::{config::InputLimits, spec::ProductSpec};

fn load(name: &str) -> Vec<ProductSpec> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/products")
        .join(name);
    let bytes = std::fs::read(path).expect("shared test data");
    crate::spec::parse_submission(&bytes, &InputLimits::default())
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .collect()
}

/// (title, flagged claims) per record, grounding the title against attributes + brand +
/// category only.
fn flags(file: &str) -> Vec<(String, Vec<(String, String)>)> {
    let pack = RulePack {
        version: "calibration".into(),
        ..Default::default()
    };
    let r = FieldRules::default();
    load(file)
        .into_iter()
        .filter_map(|mut spec| {
            // `CALIBRATE_FIELD=description` grounds the shop descriptions instead
            let title = spec.title.take()?;
            let description = spec.description.take();
            let title = match std::env::var("CALIBRATE_FIELD").as_deref() {
                Ok("description") => description?,
                _ => title,
            };
            let ctx = Ctx::new(&pack, &spec);
            let hits = scan(&ctx, &r, Limits::default(), &title, false);
            let chars: Vec<char> = title.chars().collect();
            let flagged = hits
                .into_iter()
                .filter(|h| h.rule.starts_with("grounding."))
                .map(|h| {
                    let (s, e) = h.span.unwrap_or((0, 0));
                    (h.rule.to_string(), super::text::slice(&chars, s, e))
                })
                .collect();
            Some((title, flagged))
        })
        .collect()
}

#[test]
#[ignore = "prints the calibration report"]
fn print_title_grounding() {
    let file = std::env::var("CALIBRATE").unwrap_or_else(|_| "wdc-pave-dev.jsonl".into());
    let f = flags(&file);
    let n = f.len();
    let flagged = f.iter().filter(|(_, x)| !x.is_empty()).count();
    let claims: usize = f.iter().map(|(_, x)| x.len()).sum();
    for (t, x) in &f {
        if !x.is_empty() {
            println!("{t}\n    {x:?}");
        }
    }
    println!("{n} titles, {flagged} with a flag, {claims} flags");
}

#[test]
fn wdc_reference_titles_stay_within_the_measured_flag_rate() {
    let f = flags("wdc-pave-dev.jsonl");
    assert!(f.len() > 200, "{} titles", f.len());
    let flagged = f.iter().filter(|(_, x)| !x.is_empty()).count();
    let flags: usize = f.iter().map(|(_, x)| x.len()).sum();
    // Measured at calibration: 88 of 215 titles, 177 flags, all of them claims the attributes
    // do not state (shop titles add part numbers, pack sizes, form factors). A normaliser
    // regression (`2.0GHz` no longer equal to `2.00GHz`, `1.5-TB` to `1.5 TB`) raises it.
    assert!(
        flagged <= 90 && flags <= 180,
        "{flagged} titles, {flags} flags"
    );
    // Forms that the spec states differently and that must stay grounded.
    for (title, x) in &f {
        for (_, claim) in x {
            for ok in [
                "2.0GHz", "1.5-TB", "5.9K", "24-Count", "4-Tier", "2-Level", "4GB",
            ] {
                assert_ne!(claim, ok, "{title}");
            }
        }
    }
}

/// Real, messy human copy through check -> repair -> check on every channel: no panic, no new
/// number, and what repair keeps is grounded.
#[test]
fn repair_real_copy_end_to_end() {
    use super::{check, has_errors, repair, FieldValue, Fields};
    let channels =
        crate::channel::Channels::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts"))
            .expect("channels");
    let mut stats = std::collections::BTreeMap::<&str, (usize, usize, usize)>::new();
    for file in ["wdc-pave-dev.jsonl", "flipkart-dev.jsonl"] {
        for spec in load(file) {
            let title = spec.title.clone().unwrap_or_default();
            let desc: String = spec
                .description
                .clone()
                .unwrap_or_default()
                .chars()
                .take(1500)
                .collect();
            let mut base = spec.clone();
            base.title = None;
            base.description = None;
            let sentences: Vec<String> = desc
                .split(". ")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .take(5)
                .collect();
            for ch in channels.all() {
                let mut fields = Fields::new();
                for def in &ch.fields {
                    let v = match (def.kind, def.name.as_str()) {
                        (crate::channel::FieldDefKind::List, "hashtags") => FieldValue::List(
                            title
                                .split_whitespace()
                                .take(3)
                                .map(|w| format!("#{w}"))
                                .collect(),
                        ),
                        (crate::channel::FieldDefKind::List, _) => {
                            FieldValue::List(sentences.clone())
                        }
                        (_, "title" | "post") => FieldValue::Text(title.clone()),
                        _ => FieldValue::Text(desc.clone()),
                    };
                    fields.insert(def.name.clone(), v);
                }
                let before = check(ch, &base, &fields);
                let r = repair(ch, &base, &fields, &before);
                let after = check(ch, &base, &r.fields);
                if std::env::var("SHOW").is_ok() && (has_errors(&after) || spec.id.ends_with('1')) {
                    println!(
                        "== {} {}\n  in: {:?}\n  out: {:?}\n  src: {:?}\n  left: {:?}",
                        ch.name,
                        spec.id,
                        fields,
                        r.fields,
                        r.sources,
                        after
                            .iter()
                            .filter(|f| f.severity == super::Severity::Error)
                            .map(|f| format!("{} {}", f.rule, f.message))
                            .collect::<Vec<_>>()
                    );
                }
                let e = stats.entry(ch.name.as_str()).or_default();
                e.0 += 1;
                e.1 += usize::from(has_errors(&before));
                e.2 += usize::from(has_errors(&after));
                let allowed: String = format!(
                    "{}\n{}\n{}",
                    fields
                        .values()
                        .map(|v| v.joined())
                        .collect::<Vec<_>>()
                        .join("\n"),
                    base.fact_texts().join("\n"),
                    ch.fallback.values().cloned().collect::<Vec<_>>().join("\n")
                );
                let runs = |s: &str| -> std::collections::BTreeSet<String> {
                    s.split(|c: char| !c.is_ascii_digit())
                        .filter(|t| !t.is_empty())
                        .map(str::to_string)
                        .collect()
                };
                let ok = runs(&allowed);
                for v in r.fields.values() {
                    for d in runs(&v.joined()) {
                        assert!(ok.contains(&d), "{}: new number {d} in {v:?}", ch.name);
                    }
                }
            }
        }
    }
    for (ch, (n, before, after)) in &stats {
        println!("{ch}: {n} drafts, {before} with errors before repair, {after} after");
    }
}
