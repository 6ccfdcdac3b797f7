//! Checks of generated copy against the channel's rule pack and against the spec.
//!
//! Pure functions: no IO, no model. `check` returns structured findings (rule id, field,
//! severity, message, span); a draft with an error finding is never shown as ready.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    channel::{Channel, FieldDefKind},
    spec::ProductSpec,
};

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
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RulePack {
    pub version: String,
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRules>,
}

/// Rules for one field.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldRules {
    pub min_chars: Option<usize>,
    pub max_chars: Option<usize>,
    /// Over this length is a warning (a recommendation), not an error.
    pub warn_max_chars: Option<usize>,
    pub item_min_chars: Option<usize>,
    pub item_max_chars: Option<usize>,
}

impl RulePack {
    pub fn field(&self, name: &str) -> Option<&FieldRules> {
        self.fields.get(name)
    }
}

/// Runs every rule of the channel over `fields`.
pub fn check(channel: &Channel, _spec: &ProductSpec, fields: &Fields) -> Vec<Finding> {
    let mut out = Vec::new();
    for def in &channel.fields {
        let rules = channel.rules.field(&def.name).cloned().unwrap_or_default();
        let finding = |rule: &str, item: Option<usize>, severity, message: String| Finding {
            rule: rule.into(),
            field: def.name.clone(),
            item,
            severity,
            message,
            span: None,
        };
        match (def.kind, fields.get(&def.name)) {
            (_, None) => out.push(finding(
                "schema.missing",
                None,
                Severity::Error,
                format!("`{}` is missing", def.name),
            )),
            (FieldDefKind::Text, Some(FieldValue::Text(t))) => length_rules(
                &rules.min_chars,
                &rules.max_chars,
                &rules.warn_max_chars,
                t,
                None,
                &mut out,
                &finding,
            ),
            (FieldDefKind::List, Some(FieldValue::List(items))) => {
                let (min, max) = def.item_range();
                if items.len() < min || items.len() > max {
                    let want = if min == max {
                        format!("{min}")
                    } else {
                        format!("{min}..{max}")
                    };
                    out.push(finding(
                        "items.count",
                        None,
                        Severity::Error,
                        format!("has {} items, needs {want}", items.len()),
                    ));
                }
                for (i, t) in items.iter().enumerate() {
                    length_rules(
                        &rules.item_min_chars,
                        &rules.item_max_chars,
                        &None,
                        t,
                        Some(i),
                        &mut out,
                        &finding,
                    );
                }
            }
            (FieldDefKind::Text, Some(_)) => out.push(finding(
                "schema.type",
                None,
                Severity::Error,
                "must be a string".into(),
            )),
            (FieldDefKind::List, Some(_)) => out.push(finding(
                "schema.type",
                None,
                Severity::Error,
                "must be a list of strings".into(),
            )),
        }
    }
    out
}

fn length_rules(
    min: &Option<usize>,
    max: &Option<usize>,
    warn_max: &Option<usize>,
    text: &str,
    item: Option<usize>,
    out: &mut Vec<Finding>,
    finding: &dyn Fn(&str, Option<usize>, Severity, String) -> Finding,
) {
    let n = text.chars().count();
    if let Some(min) = min {
        if n < *min {
            out.push(finding(
                "length.min",
                item,
                Severity::Error,
                format!("is {n} characters, at least {min} needed"),
            ));
        }
    }
    if let Some(max) = max {
        if n > *max {
            let mut f = finding(
                "length.max",
                item,
                Severity::Error,
                format!("is {n} characters, at most {max} allowed"),
            );
            f.span = Some((*max, n));
            out.push(f);
            return;
        }
    }
    if let Some(w) = warn_max {
        if n > *w {
            out.push(finding(
                "length.recommended",
                item,
                Severity::Warning,
                format!("is {n} characters; {w} or fewer recommended"),
            ));
        }
    }
}

/// Whether any finding is an error.
pub fn has_errors(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity == Severity::Error)
}
