//! The event that leaves the service: the JSON body of a webhook POST and of a feed entry.
//!
//! It is built once, when the approval commits, and stored as text: every retry and every
//! feed read sends the very same bytes (the signature covers them).

use serde::{Deserialize, Serialize};

use crate::{checks::Fields, store::approved::ApprovedContent};

/// Event type of a new approved version (which supersedes the previous one, if any).
pub const CONTENT_APPROVED: &str = "content.approved";

/// Every event type a subscription may ask for.
pub const EVENT_TYPES: [&str; 1] = [CONTENT_APPROVED];

/// An approved-content event, as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentEvent {
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Position in the feed (commit order); the feed's cursor.
    pub sequence: i64,
    pub product_id: String,
    pub channel: String,
    pub version: i64,
    /// The version this one supersedes (`null` for the first).
    pub supersedes_version: Option<i64>,
    pub fields: Fields,
    pub approved_by: String,
    /// RFC 3339, UTC.
    pub approved_at: String,
    pub draft_id: String,
    pub provenance: ProvenanceSummary,
}

/// Where the copy came from: enough to trace it, without the whole provenance record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceSummary {
    pub provider: Option<String>,
    pub kind: Option<String>,
    pub model: Option<String>,
    pub model_sha256: Option<String>,
    pub template: Option<String>,
    pub template_hash: Option<String>,
    pub rules_version: Option<String>,
    /// Whether a person changed the generated text before approving it.
    pub edited: bool,
}

impl ContentEvent {
    /// The event for a newly approved version.
    pub fn approved(content: &ApprovedContent, event_id: &str, sequence: i64) -> Self {
        let p = &content.provenance;
        let s = |k: &str| p.get(k).and_then(|v| v.as_str()).map(str::to_string);
        Self {
            event_id: event_id.to_string(),
            kind: CONTENT_APPROVED.to_string(),
            sequence,
            product_id: content.product_id.clone(),
            channel: content.channel.clone(),
            version: content.version,
            supersedes_version: (content.version > 1).then_some(content.version - 1),
            fields: content.fields.clone(),
            approved_by: content.approved_by.clone(),
            approved_at: chrono::DateTime::from_timestamp_millis(content.approved_at)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default(),
            draft_id: content.draft_id.clone(),
            provenance: ProvenanceSummary {
                provider: s("provider"),
                kind: s("kind"),
                model: s("model"),
                model_sha256: s("model_sha256"),
                template: s("template"),
                template_hash: s("template_hash"),
                rules_version: s("rules_version"),
                edited: content.fields != content.generated_fields,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::FieldValue;

    #[test]
    fn event_carries_the_approval_and_a_provenance_summary() {
        let mut fields = Fields::new();
        fields.insert("title".into(), FieldValue::Text("A title".into()));
        let content = ApprovedContent {
            id: "a1".into(),
            product_id: "p1".into(),
            channel: "seo".into(),
            version: 2,
            draft_id: "d1".into(),
            fields: fields.clone(),
            generated_fields: fields,
            provenance: serde_json::json!({"provider": "stub", "kind": "stub", "model": "m",
                "template": "seo", "template_hash": "abc", "rules_version": "seo@1", "prompt_tokens": 5}),
            approved_by: "maria".into(),
            approved_at: 1_764_300_000_000,
            superseded_at: None,
        };
        let e = ContentEvent::approved(&content, "ev1", 7);
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "content.approved");
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["supersedes_version"], 1);
        assert_eq!(v["approved_at"], "2025-11-28T03:20:00.000Z");
        assert_eq!(v["provenance"]["template_hash"], "abc");
        assert_eq!(v["provenance"]["rules_version"], "seo@1");
        assert_eq!(v["provenance"]["edited"], false);
        assert!(v["provenance"].get("prompt_tokens").is_none());
        let back: ContentEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
