//! Checks of generated copy against the channel's rule pack and against the spec.
//!
//! Pure functions: no IO, no model. `check` returns structured findings (rule id, field,
//! item, severity, message, span); a draft with an error finding is never shown as ready.
//! `repair` applies deterministic fixes that only remove text or fill fields from spec facts
//! through the channel's fallback templates, so it can never add a fact.
//!
//! - [`text`]: counting (plain and X-weighted), char spans, phrase search, removals.
//! - [`claims`]: claim extraction (numbers, years, percentages, part numbers,
//!   certifications) and the unit normaliser.
//! - [`grounding`]: the spec's facts, brand detection, whether a claim is supported.
//! - [`injection`]: echoes of prompt-injection text.
//! - [`rules`]: the per-field rules of a channel's rule pack.
//! - [`repair`]: the deterministic repair.
//!
//! Rule ids (stable): `length.min`, `length.max`, `length.recommended`, `items.count`,
//! `items.duplicate`, `chars.forbidden`, `phrase.forbidden`, `caps.word`, `html.tag`,
//! `contact.url`, `contact.email`, `contact.phone`, `placeholder.text`, `hashtag.format`,
//! `hashtag.count`, `case.start`, `claim.price`, `claim.shipping`, `claim.availability`,
//! `grounding.number`, `grounding.year`, `grounding.percent`, `grounding.part_number`,
//! `grounding.certification`, `grounding.brand`, `injection.echo`, `schema.missing`,
//! `schema.type`.

pub mod claims;
pub mod grounding;
pub mod injection;
pub mod repair;
pub mod rules;
pub mod text;

#[cfg(test)]
mod calibration;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    channel::{Channel, FieldDefKind},
    spec::ProductSpec,
};

pub use grounding::spec_numbers;
pub use repair::{check_fallback_templates, repair, FieldSource, Repaired};
pub use text::Counting;

/// Generated (or edited) copy: field name -> text or list of texts.
pub type Fields = BTreeMap<String, FieldValue>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldValue {
    Text(String),
    List(Vec<String>),
}

impl FieldValue {
    /// All text of the field, list items joined by newlines.
    pub fn joined(&self) -> String {
        match self {
            FieldValue::Text(s) => s.clone(),
            FieldValue::List(v) => v.join("\n"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Error,
}

/// One problem found in a draft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// Stable rule id, e.g. `length.max`, `grounding.number`.
    pub rule: String,
    pub field: String,
    /// Index of the list item, for list fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
    pub severity: Severity,
    pub message: String,
    /// Character range `[start, end)` in the field (or item) text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<(usize, usize)>,
}

/// A channel's rules, versioned; each draft records the version that checked it.
///
/// ```toml
/// [rules]
/// version = "amazon-2026.11.2"
/// [rules.all]                 # applies to every field (a field's own table overrides)
/// no_urls = true
/// forbidden_phrases = ["free shipping", "#1"]
/// [rules.fields.title]
/// max_chars = 200
/// warn_max_chars = 80
/// forbidden_chars = "!$?_{}^¬¦~#<>*"
/// [rules.grounding]
/// extra_brands = ["Acme"]
/// ```
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RulePack {
    pub version: String,
    /// Rules for every field; a field's own rules override single values and add to lists.
    #[serde(default)]
    pub all: FieldRules,
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRules>,
    #[serde(default)]
    pub grounding: GroundingRules,
    #[serde(default)]
    pub injection: InjectionRules,
}

/// Rules for one field. Every rule is off unless set.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldRules {
    pub min_chars: Option<usize>,
    pub max_chars: Option<usize>,
    /// Over this length is a warning (a recommendation), not an error.
    pub warn_max_chars: Option<usize>,
    pub item_min_chars: Option<usize>,
    pub item_max_chars: Option<usize>,
    pub item_warn_max_chars: Option<usize>,
    /// How lengths are counted: `chars` (default) or `x` (emoji and CJK count 2).
    pub counting: Option<Counting>,
    /// Each character of this string is forbidden.
    pub forbidden_chars: Option<String>,
    /// Emoji are forbidden.
    pub no_emoji: Option<bool>,
    /// Case-insensitive, at word boundaries; a space matches any whitespace or hyphens.
    #[serde(default)]
    pub forbidden_phrases: Vec<String>,
    /// Flag words of 2+ letters in capitals that are not in the spec nor common acronyms.
    pub all_caps: Option<bool>,
    /// More words allowed in capitals.
    #[serde(default)]
    pub allowed_caps: Vec<String>,
    pub no_html: Option<bool>,
    pub no_urls: Option<bool>,
    pub no_emails: Option<bool>,
    pub no_phones: Option<bool>,
    /// N/A, TBD, lorem ipsum, `[brand]`, XXX, ...
    pub no_placeholders: Option<bool>,
    /// More placeholder phrases.
    #[serde(default)]
    pub placeholders: Vec<String>,
    /// Price, shipping and availability claims.
    pub no_commerce_claims: Option<bool>,
    /// Each item (of a list field) must be `#` followed by letters or digits.
    pub hashtag_format: Option<bool>,
    /// Hashtags in a text, or items of a list field.
    pub min_hashtags: Option<usize>,
    pub max_hashtags: Option<usize>,
    /// The text (each item of a list) starts with a capital letter.
    pub capital_start: Option<bool>,
    /// No repeated items (exact or near-duplicate after normalisation).
    pub unique_items: Option<bool>,
    /// Claims must be supported by the spec (default on).
    pub grounding: Option<bool>,
    /// Echoes of prompt-injection text are errors (default on).
    pub injection: Option<bool>,
    /// Severity overrides by rule id, e.g. `"caps.word" = "error"`.
    #[serde(default)]
    pub severity: BTreeMap<String, Severity>,
}

/// Grounding settings of a channel.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GroundingRules {
    pub enabled: bool,
    /// Replaces the built-in certification list when set.
    pub certifications: Option<Vec<String>>,
    pub extra_certifications: Vec<String>,
    /// More known brands (names other than the spec's brand are errors).
    pub extra_brands: Vec<String>,
    /// Built-in brands not to look for.
    pub ignore_brands: Vec<String>,
    /// More groups of names for the same brand, e.g. `[["HP", "Hewlett-Packard"]]`.
    pub brand_aliases: Vec<Vec<String>>,
    /// Bare numbers (no unit) below this are not claims (default 2: `1` and `0`).
    pub ignore_bare_below: f64,
}

impl Default for GroundingRules {
    fn default() -> Self {
        Self {
            enabled: true,
            certifications: None,
            extra_certifications: Vec::new(),
            extra_brands: Vec::new(),
            ignore_brands: Vec::new(),
            brand_aliases: Vec::new(),
            ignore_bare_below: 2.0,
        }
    }
}

/// Prompt-injection echo settings of a channel.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InjectionRules {
    pub enabled: bool,
    /// More phrases that must never appear in copy.
    pub extra_phrases: Vec<String>,
}

impl Default for InjectionRules {
    fn default() -> Self {
        Self {
            enabled: true,
            extra_phrases: Vec::new(),
        }
    }
}

impl RulePack {
    /// The field's own rules, as written.
    pub fn field(&self, name: &str) -> Option<&FieldRules> {
        self.fields.get(name)
    }

    /// The rules that apply to a field: `[rules.all]` merged with the field's own table.
    pub fn effective(&self, name: &str) -> FieldRules {
        match self.fields.get(name) {
            Some(f) => self.all.merged(f),
            None => self.all.clone(),
        }
    }
}

impl FieldRules {
    /// `self` overridden by `over`: single values of `over` win, lists are joined.
    pub fn merged(&self, over: &FieldRules) -> FieldRules {
        let join = |a: &Vec<String>, b: &Vec<String>| {
            let mut v = a.clone();
            v.extend(b.iter().cloned());
            v
        };
        let mut severity = self.severity.clone();
        severity.extend(over.severity.iter().map(|(k, v)| (k.clone(), *v)));
        FieldRules {
            min_chars: over.min_chars.or(self.min_chars),
            max_chars: over.max_chars.or(self.max_chars),
            warn_max_chars: over.warn_max_chars.or(self.warn_max_chars),
            item_min_chars: over.item_min_chars.or(self.item_min_chars),
            item_max_chars: over.item_max_chars.or(self.item_max_chars),
            item_warn_max_chars: over.item_warn_max_chars.or(self.item_warn_max_chars),
            counting: over.counting.or(self.counting),
            forbidden_chars: match (&self.forbidden_chars, &over.forbidden_chars) {
                (Some(a), Some(b)) => Some(format!("{a}{b}")),
                (a, b) => b.clone().or_else(|| a.clone()),
            },
            no_emoji: over.no_emoji.or(self.no_emoji),
            forbidden_phrases: join(&self.forbidden_phrases, &over.forbidden_phrases),
            all_caps: over.all_caps.or(self.all_caps),
            allowed_caps: join(&self.allowed_caps, &over.allowed_caps),
            no_html: over.no_html.or(self.no_html),
            no_urls: over.no_urls.or(self.no_urls),
            no_emails: over.no_emails.or(self.no_emails),
            no_phones: over.no_phones.or(self.no_phones),
            no_placeholders: over.no_placeholders.or(self.no_placeholders),
            placeholders: join(&self.placeholders, &over.placeholders),
            no_commerce_claims: over.no_commerce_claims.or(self.no_commerce_claims),
            hashtag_format: over.hashtag_format.or(self.hashtag_format),
            min_hashtags: over.min_hashtags.or(self.min_hashtags),
            max_hashtags: over.max_hashtags.or(self.max_hashtags),
            capital_start: over.capital_start.or(self.capital_start),
            unique_items: over.unique_items.or(self.unique_items),
            grounding: over.grounding.or(self.grounding),
            injection: over.injection.or(self.injection),
            severity,
        }
    }

    /// The severity of `rule` for this field (its default unless overridden).
    pub fn severity_of(&self, rule: &str) -> Severity {
        self.severity
            .get(rule)
            .copied()
            .unwrap_or_else(|| rules::default_severity(rule))
    }
}

/// Runs every rule of the channel over `fields`.
pub fn check(channel: &Channel, spec: &ProductSpec, fields: &Fields) -> Vec<Finding> {
    let ctx = rules::Ctx::new(&channel.rules, spec);
    check_with(&ctx, channel, fields)
}

pub(crate) fn check_with(ctx: &rules::Ctx<'_>, channel: &Channel, fields: &Fields) -> Vec<Finding> {
    let mut out = Vec::new();
    for def in &channel.fields {
        let r = channel.rules.effective(&def.name);
        let finding = |rule: &str, item: Option<usize>, message: String, span| Finding {
            rule: rule.into(),
            field: def.name.clone(),
            item,
            severity: r.severity_of(rule),
            message,
            span,
        };
        match (def.kind, fields.get(&def.name)) {
            (_, None) => out.push(finding(
                "schema.missing",
                None,
                format!("`{}` is missing", def.name),
                None,
            )),
            (FieldDefKind::Text, Some(FieldValue::Text(t))) => {
                for h in rules::scan(ctx, &r, rules::Limits::text(&r), t, false) {
                    out.push(finding(h.rule, None, h.message, h.span));
                }
            }
            (FieldDefKind::List, Some(FieldValue::List(items))) => {
                let (min, max) = def.item_range();
                let mut count_reported = false;
                if items.len() < min || items.len() > max {
                    let want = if min == max {
                        format!("{min}")
                    } else {
                        format!("{min}..{max}")
                    };
                    out.push(finding(
                        "items.count",
                        None,
                        format!("has {} items, needs {want}", items.len()),
                        None,
                    ));
                    count_reported = true;
                }
                for (i, t) in items.iter().enumerate() {
                    for h in rules::scan(ctx, &r, rules::Limits::item(&r), t, true) {
                        out.push(finding(h.rule, Some(i), h.message, h.span));
                    }
                }
                for (i, h) in rules::scan_items(&r, items, count_reported) {
                    out.push(finding(h.rule, i, h.message, h.span));
                }
            }
            (FieldDefKind::Text, Some(_)) => out.push(finding(
                "schema.type",
                None,
                "must be a string".into(),
                None,
            )),
            (FieldDefKind::List, Some(_)) => out.push(finding(
                "schema.type",
                None,
                "must be a list of strings".into(),
                None,
            )),
        }
    }
    out
}

/// Whether any finding is an error.
pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        channel::Channels,
        config::InputLimits,
        spec::{validate, Position},
    };

    fn channels() -> Channels {
        Channels::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts")).expect("channels")
    }

    fn hp() -> ProductSpec {
        validate(
            serde_json::json!({"id": "p", "brand": "HP", "category": "Computers",
                "attributes": {"Part Number": "643770-B21", "Cache": "24MB",
                    "Processor Type": "Intel Xeon E7-4850", "Clock Speed": "2.00GHz"}}),
            Position::Single,
            &InputLimits::default(),
        )
        .expect("spec")
    }

    type Row<'a> = (&'a str, &'a str, Option<usize>, Option<(usize, usize)>);

    #[test]
    fn amazon_findings_are_structured() {
        let ch = channels();
        let amazon = ch.get("amazon").expect("amazon");
        let fields: Fields = [
            (
                "title".to_string(),
                FieldValue::Text("HP Xeon Kit - Best Seller!".into()),
            ),
            (
                "bullets".to_string(),
                FieldValue::List(vec![
                    "Größe egal: 24MB cache™ for fast access".into(),
                    "runs at 2.0 GHz".into(),
                    "Free shipping with a 3-year Samsung warranty".into(),
                    "Part 643770-B21, visit www.example.com".into(),
                ]),
            ),
        ]
        .into_iter()
        .collect();
        let f = check(amazon, &hp(), &fields);
        let got: Vec<Row<'_>> = f
            .iter()
            .map(|f| (f.rule.as_str(), f.field.as_str(), f.item, f.span))
            .collect();
        let want: Vec<Row<'_>> = vec![
            ("chars.forbidden", "title", None, Some((25, 26))),
            ("phrase.forbidden", "title", None, Some((14, 25))),
            ("items.count", "bullets", None, None),
            ("chars.forbidden", "bullets", Some(0), Some((22, 23))),
            ("case.start", "bullets", Some(1), Some((0, 1))),
            ("phrase.forbidden", "bullets", Some(2), Some((0, 13))),
            ("claim.shipping", "bullets", Some(2), Some((0, 13))),
            ("grounding.number", "bullets", Some(2), Some((21, 27))),
            ("grounding.brand", "bullets", Some(2), Some((28, 35))),
            ("contact.url", "bullets", Some(3), Some((23, 38))),
        ];
        assert_eq!(got, want, "{f:#?}");
        let phrase = &f[1];
        assert_eq!(phrase.message, "contains \"Best Seller\"");
        assert_eq!(phrase.severity, Severity::Error);
        assert!(has_errors(&f));
        // over the 80-character recommendation only: a warning
        let long = "HP Xeon E7-4850 processor option kit with 24MB cache at 2.00GHz for HP servers";
        let fields: Fields = [(
            "title".to_string(),
            FieldValue::Text(format!("{long} here")),
        )]
        .into_iter()
        .collect();
        let f = check(amazon, &hp(), &fields);
        let w: Vec<_> = f.iter().filter(|f| f.field == "title").collect();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            (w[0].rule.as_str(), w[0].severity),
            ("length.recommended", Severity::Warning)
        );
    }

    #[test]
    fn item_lengths_and_types() {
        let ch = channels();
        let amazon = ch.get("amazon").expect("amazon");
        let long = format!("Xeon {}", "fast ".repeat(60));
        let fields: Fields = [
            (
                "title".to_string(),
                FieldValue::List(vec!["HP Xeon kit".into()]),
            ),
            (
                "bullets".to_string(),
                FieldValue::List(vec![
                    "Short".into(),
                    long.clone(),
                    "Cache: 24MB".into(),
                    "Clock Speed: 2.00GHz".into(),
                    "Part Number: 643770-B21".into(),
                ]),
            ),
        ]
        .into_iter()
        .collect();
        let f = check(amazon, &hp(), &fields);
        let got: Vec<_> = f
            .iter()
            .map(|f| (f.rule.as_str(), f.item, f.span))
            .collect();
        let n = long.chars().count();
        assert_eq!(
            got,
            [
                ("schema.type", None, None),
                ("length.min", Some(0), None),
                ("length.max", Some(1), Some((255, n))),
            ]
        );
        assert_eq!(
            f[2].message,
            format!("is {n} characters, at most 255 allowed")
        );
    }

    #[test]
    fn rule_packs_merge_all_with_fields_and_override_severity() {
        let text = r#"
name = "x"
system = "s"
[[fields]]
name = "t"
kind = "text"
[[fields]]
name = "u"
kind = "text"
[rules]
version = "x-1"
[rules.all]
forbidden_phrases = ["cheap"]
max_chars = 20
all_caps = true
[rules.fields.t]
forbidden_phrases = ["deal"]
max_chars = 10
[rules.fields.t.severity]
"caps.word" = "error"
"phrase.forbidden" = "warning"
"#;
        let ch = Channels::parse(text, Path::new("x.toml")).expect("parses");
        let t = ch.rules.effective("t");
        assert_eq!(t.forbidden_phrases, ["cheap", "deal"]);
        assert_eq!(t.max_chars, Some(10));
        assert_eq!(ch.rules.effective("u").max_chars, Some(20));
        assert_eq!(ch.rules.field("u"), None);
        let fields: Fields = [
            ("t".to_string(), FieldValue::Text("A WOW deal".into())),
            ("u".to_string(), FieldValue::Text("A WOW deal".into())),
        ]
        .into_iter()
        .collect();
        let f = check(&ch, &hp(), &fields);
        let got: Vec<_> = f
            .iter()
            .map(|f| (f.field.as_str(), f.rule.as_str(), f.severity))
            .collect();
        assert_eq!(
            got,
            [
                ("t", "phrase.forbidden", Severity::Warning),
                ("t", "caps.word", Severity::Error),
                ("u", "caps.word", Severity::Warning),
            ]
        );
        // unknown rule keys are refused
        let bad = text.replace("all_caps = true", "all_capz = true");
        assert!(Channels::parse(&bad, Path::new("x.toml")).is_err());
    }
}
