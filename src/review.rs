//! The human approval workflow: the draft state machine and the review actions (approve,
//! edit then approve, reject with a reason, regenerate with feedback).
//!
//! ```text
//! pending_review  --approve-->  approved
//!        |        --reject--->  rejected            (reason required)
//!        |        --regenerate-> changes_requested  (a new draft is queued, linked)
//! needs_attention --edit (checks pass)--> pending_review --> ...
//!                 --approve with an edit that passes the checks--> approved
//! ```
//! Every change goes through an optimistic revision check: two reviewers acting on the
//! same draft cannot silently overwrite each other (the second gets a conflict).

use serde::{Deserialize, Serialize};

use crate::{
    channel::{Channel, Channels, FieldDefKind},
    checks::{self, FieldValue, Fields, Finding},
    store::{
        self,
        approved::{ApprovedContent, NewVersion},
        audit::{self, Entry},
        drafts::{Draft, ReviewUpdate},
        Db, StoreError,
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DraftStatus {
    /// Passed every error-level check; waiting for a reviewer.
    PendingReview,
    /// Failed checks that repair could not fix; needs an edit or a regeneration.
    NeedsAttention,
    Approved,
    Rejected,
    /// A reviewer asked for a new version (regenerate with feedback).
    ChangesRequested,
}

impl DraftStatus {
    pub const ALL: [DraftStatus; 5] = [
        DraftStatus::PendingReview,
        DraftStatus::NeedsAttention,
        DraftStatus::Approved,
        DraftStatus::Rejected,
        DraftStatus::ChangesRequested,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DraftStatus::PendingReview => "pending_review",
            DraftStatus::NeedsAttention => "needs_attention",
            DraftStatus::Approved => "approved",
            DraftStatus::Rejected => "rejected",
            DraftStatus::ChangesRequested => "changes_requested",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether a reviewer can still act on a draft in this state.
    pub fn is_open(self) -> bool {
        matches!(
            self,
            DraftStatus::PendingReview | DraftStatus::NeedsAttention
        )
    }
}

impl std::fmt::Display for DraftStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("{0} not found")]
    NotFound(String),
    /// The action does not fit the draft's state, or another reviewer changed it first.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong (missing reason, edit that fails the checks, ...).
    #[error("{field}: {message}")]
    Invalid {
        field: String,
        message: String,
        findings: Vec<Finding>,
    },
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ReviewError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ReviewError::NotFound(what),
            StoreError::Conflict(m) => ReviewError::Conflict(m),
            e if e.is_unique_violation() => ReviewError::Conflict(
                "another approval of the same product and channel happened at the same time; try again".into(),
            ),
            e => ReviewError::Store(e),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ReviewError {
    ReviewError::Invalid {
        field: field.into(),
        message: message.into(),
        findings: Vec::new(),
    }
}

/// Who acts, and on which revision of the draft they looked at.
#[derive(Debug, Clone)]
pub struct Actor<'a> {
    pub name: &'a str,
    /// The revision the reviewer saw; `None` means "the current one".
    pub expected_revision: Option<i64>,
}

async fn load_open(db: &Db, draft_id: &str, action: &str) -> Result<Draft, ReviewError> {
    let d = store::drafts::get(db, draft_id).await?;
    if !d.status.is_open() {
        return Err(ReviewError::Conflict(format!(
            "draft {draft_id} is {}; only pending_review or needs_attention drafts can be {action}",
            d.status
        )));
    }
    Ok(d)
}

fn expected(d: &Draft, actor: &Actor<'_>) -> Result<i64, ReviewError> {
    match actor.expected_revision {
        Some(r) if r != d.revision => Err(ReviewError::Conflict(format!(
            "draft {} is at revision {}, you acted on revision {r}; reload it and try again",
            d.id, d.revision
        ))),
        _ => Ok(d.revision),
    }
}

/// Checks an edit: same fields as the channel, right shapes, and the channel's checks.
/// Returns the findings (warnings allowed, errors refused).
pub fn check_edit(
    channel: &Channel,
    spec: &crate::spec::ProductSpec,
    edit: &Fields,
) -> Result<Vec<Finding>, ReviewError> {
    for name in edit.keys() {
        if channel.field(name).is_none() {
            return Err(invalid(
                &format!("fields.{name}"),
                format!("channel `{}` has no field `{name}`", channel.name),
            ));
        }
    }
    for def in &channel.fields {
        match (def.kind, edit.get(&def.name)) {
            (_, None) => {
                return Err(invalid(
                    &format!("fields.{}", def.name),
                    "is missing (an edit gives every field)",
                ))
            }
            (FieldDefKind::Text, Some(FieldValue::List(_))) => {
                return Err(invalid(&format!("fields.{}", def.name), "must be a string"))
            }
            (FieldDefKind::List, Some(FieldValue::Text(_))) => {
                return Err(invalid(
                    &format!("fields.{}", def.name),
                    "must be a list of strings",
                ))
            }
            _ => {}
        }
    }
    let findings = checks::check(channel, spec, edit);
    if checks::has_errors(&findings) {
        let first = findings
            .iter()
            .find(|f| f.severity == checks::Severity::Error)
            .map(|f| format!("{}: {}", f.field, f.message))
            .unwrap_or_default();
        return Err(ReviewError::Invalid {
            field: "fields".into(),
            message: format!("the edit fails the channel's checks ({first})"),
            findings,
        });
    }
    Ok(findings)
}

/// Approves a draft, optionally with an edit (edit-then-approve keeps both texts). The new
/// approved version is written in the same transaction as the draft's state.
pub async fn approve(
    db: &Db,
    channels: &Channels,
    draft_id: &str,
    edit: Option<&Fields>,
    actor: &Actor<'_>,
) -> Result<ApprovedContent, ReviewError> {
    let d = load_open(db, draft_id, "approved").await?;
    let rev = expected(&d, actor)?;
    let channel = channels
        .get(&d.channel)
        .map_err(|e| ReviewError::Conflict(e.to_string()))?;
    // The text to approve: this call's edit, else an earlier saved edit, else the generated copy.
    let (approved_fields, findings) = match edit.or(d.edited_fields.as_ref()) {
        Some(edit) => {
            let spec = store::tasks::spec_of(db, &d.spec_id).await?;
            (edit.clone(), Some(check_edit(channel, &spec, edit)?))
        }
        None => {
            if d.status == DraftStatus::NeedsAttention {
                return Err(invalid(
                    "fields",
                    "this draft failed its checks; edit it (or regenerate it) before approving",
                ));
            }
            (d.fields.clone(), None)
        }
    };
    let mut tx = db.begin().await?;
    store::drafts::update_review(
        &mut tx,
        &d.id,
        rev,
        &ReviewUpdate {
            status: DraftStatus::Approved,
            edited_fields: edit,
            findings: findings.as_deref(),
            reviewed_by: actor.name,
            reject_reason: None,
        },
    )
    .await?;
    let content = store::approved::insert_version(
        &mut tx,
        &NewVersion {
            product_id: &d.product_id,
            channel: &d.channel,
            draft_id: &d.id,
            fields: &approved_fields,
            generated_fields: &d.fields,
            provenance: &d.provenance,
            approved_by: actor.name,
        },
    )
    .await?;
    audit::record_tx(
        &mut tx,
        &Entry::new(actor.name, if edit.is_some() || d.edited_fields.is_some() { "draft.edit_approve" } else { "draft.approve" }, "draft", &d.id)
            .before(serde_json::json!({"status": d.status, "fields": d.current_fields()}))
            .after(serde_json::json!({"status": DraftStatus::Approved, "fields": approved_fields, "version": content.version})),
    )
    .await?;
    // the delivery event (feed entry + webhook deliveries) commits with the approval
    store::outbox::record_approval(&mut tx, &content).await?;
    tx.commit().await?;
    tracing::info!(draft_id = %d.id, product_id = %d.product_id, channel = %d.channel, version = content.version, "draft approved");
    Ok(content)
}

/// Rejects a draft; a reason is required.
pub async fn reject(
    db: &Db,
    draft_id: &str,
    reason: &str,
    actor: &Actor<'_>,
) -> Result<Draft, ReviewError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(invalid("reason", "is required to reject a draft"));
    }
    let d = load_open(db, draft_id, "rejected").await?;
    let rev = expected(&d, actor)?;
    let mut tx = db.begin().await?;
    store::drafts::update_review(
        &mut tx,
        &d.id,
        rev,
        &ReviewUpdate {
            status: DraftStatus::Rejected,
            edited_fields: None,
            findings: None,
            reviewed_by: actor.name,
            reject_reason: Some(reason),
        },
    )
    .await?;
    audit::record_tx(
        &mut tx,
        &Entry::new(actor.name, "draft.reject", "draft", &d.id)
            .before(serde_json::json!({"status": d.status}))
            .after(serde_json::json!({"status": DraftStatus::Rejected}))
            .reason(Some(reason)),
    )
    .await?;
    tx.commit().await?;
    Ok(store::drafts::get(db, draft_id).await?)
}

/// Saves an edit without approving it. The draft's findings are recomputed for the edited
/// text; a draft that needed attention becomes pending review when the edit passes.
pub async fn save_edit(
    db: &Db,
    channels: &Channels,
    draft_id: &str,
    edit: &Fields,
    actor: &Actor<'_>,
) -> Result<Draft, ReviewError> {
    let d = load_open(db, draft_id, "edited").await?;
    let rev = expected(&d, actor)?;
    let channel = channels
        .get(&d.channel)
        .map_err(|e| ReviewError::Conflict(e.to_string()))?;
    let spec = store::tasks::spec_of(db, &d.spec_id).await?;
    let findings = check_edit(channel, &spec, edit)?;
    let mut tx = db.begin().await?;
    store::drafts::update_review(
        &mut tx,
        &d.id,
        rev,
        &ReviewUpdate {
            status: DraftStatus::PendingReview,
            edited_fields: Some(edit),
            findings: Some(&findings),
            reviewed_by: actor.name,
            reject_reason: None,
        },
    )
    .await?;
    audit::record_tx(
        &mut tx,
        &Entry::new(actor.name, "draft.edit", "draft", &d.id)
            .before(serde_json::json!({"status": d.status, "fields": d.current_fields()}))
            .after(serde_json::json!({"status": DraftStatus::PendingReview, "fields": edit})),
    )
    .await?;
    tx.commit().await?;
    Ok(store::drafts::get(db, draft_id).await?)
}

/// Marks the draft `changes_requested` and queues a new generation of the same product and
/// channel with the reviewer's feedback (given to the model as data). Returns the new task id.
pub async fn regenerate(
    db: &Db,
    draft_id: &str,
    feedback: &str,
    max_attempts: u32,
    actor: &Actor<'_>,
) -> Result<String, ReviewError> {
    let feedback = feedback.trim();
    if feedback.chars().count() > 2_000 {
        return Err(invalid("feedback", "is longer than 2000 characters"));
    }
    let d = load_open(db, draft_id, "regenerated").await?;
    let rev = expected(&d, actor)?;
    let mut tx = db.begin().await?;
    store::drafts::update_review(
        &mut tx,
        &d.id,
        rev,
        &ReviewUpdate {
            status: DraftStatus::ChangesRequested,
            edited_fields: None,
            findings: None,
            reviewed_by: actor.name,
            reject_reason: (!feedback.is_empty()).then_some(feedback),
        },
    )
    .await?;
    let task_id = store::batches::insert_regeneration(
        &mut tx,
        &d,
        (!feedback.is_empty()).then_some(feedback),
        max_attempts,
    )
    .await?;
    audit::record_tx(
        &mut tx,
        &Entry::new(actor.name, "draft.regenerate", "draft", &d.id)
            .before(serde_json::json!({"status": d.status}))
            .after(serde_json::json!({"status": DraftStatus::ChangesRequested, "task_id": task_id}))
            .reason((!feedback.is_empty()).then_some(feedback)),
    )
    .await?;
    tx.commit().await?;
    Ok(task_id)
}

/// What a bulk approval did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BulkOutcome {
    pub approved: Vec<BulkApproved>,
    pub skipped: Vec<BulkSkipped>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BulkApproved {
    pub draft_id: String,
    pub product_id: String,
    pub channel: String,
    pub version: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BulkSkipped {
    pub draft_id: String,
    pub reason: String,
}

/// Approves every open draft matching `filter` that has no findings at all (no error and no
/// warning); every other matching draft is listed as skipped with the reason.
pub async fn bulk_approve(
    db: &Db,
    channels: &Channels,
    filter: &store::drafts::DraftFilter,
    actor: &Actor<'_>,
) -> Result<BulkOutcome, ReviewError> {
    let mut out = BulkOutcome::default();
    let mut f = filter.clone();
    f.limit = 500;
    loop {
        let page = store::drafts::list(db, &f).await?;
        let n = page.len();
        f.after = page.last().map(|d| d.id.clone());
        for d in page {
            if !d.status.is_open() {
                continue;
            }
            let skip = |reason: String| BulkSkipped {
                draft_id: d.id.clone(),
                reason,
            };
            if d.status == DraftStatus::NeedsAttention {
                out.skipped
                    .push(skip("needs attention (failed checks)".into()));
                continue;
            }
            if !d.findings.is_empty() {
                let errors = d
                    .findings
                    .iter()
                    .filter(|f| f.severity == checks::Severity::Error)
                    .count();
                let warnings = d.findings.len() - errors;
                out.skipped.push(skip(format!(
                    "has {errors} error and {warnings} warning findings"
                )));
                continue;
            }
            let one = Actor {
                name: actor.name,
                expected_revision: Some(d.revision),
            };
            match approve(db, channels, &d.id, None, &one).await {
                Ok(c) => out.approved.push(BulkApproved {
                    draft_id: d.id.clone(),
                    product_id: c.product_id,
                    channel: c.channel,
                    version: c.version,
                }),
                Err(ReviewError::Store(e)) => return Err(ReviewError::Store(e)),
                Err(e) => out.skipped.push(skip(e.to_string())),
            }
        }
        if (n as i64) < f.limit {
            break;
        }
    }
    Ok(out)
}

/// Review outcomes of a group of drafts (a channel, or a prompt template version).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct QualityStats {
    pub decided: u64,
    pub approved: u64,
    pub approved_unedited: u64,
    pub rejected: u64,
    pub changes_requested: u64,
    /// approved / decided.
    pub acceptance_rate: f64,
    /// Mean Levenshtein distance (characters) between generated and approved text, over
    /// approved drafts (0 for unedited ones).
    pub mean_edit_distance: f64,
    /// Rejection and change-request reasons, most frequent first.
    pub reasons: Vec<(String, u64)>,
}

/// Quality per channel and per prompt-template hash, over drafts a reviewer decided.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct QualityReport {
    pub by_channel: std::collections::BTreeMap<String, QualityStats>,
    /// Keyed by `channel/template_hash`.
    pub by_template: std::collections::BTreeMap<String, QualityStats>,
}

fn text_of(f: &Fields) -> String {
    f.iter()
        .map(|(k, v)| format!("{k}: {}", v.joined()))
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn quality(db: &Db) -> Result<QualityReport, ReviewError> {
    use std::collections::BTreeMap;
    #[derive(Default)]
    struct Acc {
        s: QualityStats,
        dist_sum: f64,
        reasons: BTreeMap<String, u64>,
    }
    let mut by_channel: BTreeMap<String, Acc> = BTreeMap::new();
    let mut by_template: BTreeMap<String, Acc> = BTreeMap::new();
    for status in [
        DraftStatus::Approved,
        DraftStatus::Rejected,
        DraftStatus::ChangesRequested,
    ] {
        let mut f = store::drafts::DraftFilter {
            status: Some(status),
            limit: 1000,
            ..Default::default()
        };
        loop {
            let page = store::drafts::list(db, &f).await?;
            let n = page.len();
            f.after = page.last().map(|d| d.id.clone());
            for d in &page {
                let hash = d
                    .provenance
                    .get("template_hash")
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown");
                let key = format!("{}/{}", d.channel, &hash[..hash.len().min(12)]);
                for acc in [
                    by_channel.entry(d.channel.clone()).or_default(),
                    by_template.entry(key).or_default(),
                ] {
                    acc.s.decided += 1;
                    match d.status {
                        DraftStatus::Approved => {
                            acc.s.approved += 1;
                            match &d.edited_fields {
                                Some(e) => {
                                    acc.dist_sum +=
                                        strsim::levenshtein(&text_of(&d.fields), &text_of(e)) as f64
                                }
                                None => acc.s.approved_unedited += 1,
                            }
                        }
                        DraftStatus::Rejected => acc.s.rejected += 1,
                        _ => acc.s.changes_requested += 1,
                    }
                    if d.status != DraftStatus::Approved {
                        let reason = d
                            .reject_reason
                            .as_deref()
                            .unwrap_or("(no reason)")
                            .trim()
                            .to_lowercase();
                        *acc.reasons.entry(reason).or_default() += 1;
                    }
                }
            }
            if (n as i64) < f.limit {
                break;
            }
        }
    }
    let finish = |m: BTreeMap<String, Acc>| {
        m.into_iter()
            .map(|(k, mut a)| {
                a.s.acceptance_rate = if a.s.decided == 0 {
                    0.0
                } else {
                    a.s.approved as f64 / a.s.decided as f64
                };
                a.s.mean_edit_distance = if a.s.approved == 0 {
                    0.0
                } else {
                    a.dist_sum / a.s.approved as f64
                };
                let mut reasons: Vec<(String, u64)> = a.reasons.into_iter().collect();
                reasons.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
                reasons.truncate(10);
                a.s.reasons = reasons;
                (k, a.s)
            })
            .collect()
    };
    Ok(QualityReport {
        by_channel: finish(by_channel),
        by_template: finish(by_template),
    })
}

/// One piece of a word-level diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffOp {
    /// `equal`, `delete` (only in the generated text) or `insert` (only in the approved).
    pub op: &'static str,
    pub text: String,
}

/// Word-level diff of each field between the generated and the edited/approved text.
pub fn diff_fields(
    generated: &Fields,
    approved: &Fields,
) -> std::collections::BTreeMap<String, Vec<DiffOp>> {
    let mut out = std::collections::BTreeMap::new();
    let names: std::collections::BTreeSet<&String> =
        generated.keys().chain(approved.keys()).collect();
    for name in names {
        let a = generated
            .get(name)
            .map(FieldValue::joined)
            .unwrap_or_default();
        let b = approved
            .get(name)
            .map(FieldValue::joined)
            .unwrap_or_default();
        let diff = similar::TextDiff::from_words(a.as_str(), b.as_str());
        let ops = diff
            .iter_all_changes()
            .map(|c| DiffOp {
                op: match c.tag() {
                    similar::ChangeTag::Equal => "equal",
                    similar::ChangeTag::Delete => "delete",
                    similar::ChangeTag::Insert => "insert",
                },
                text: c.value().to_string(),
            })
            .collect();
        out.insert(name.clone(), ops);
    }
    out
}

/// Adds a comment to a draft (any state).
pub async fn comment(
    db: &Db,
    draft_id: &str,
    body: &str,
    author: &str,
) -> Result<store::comments::Comment, ReviewError> {
    let body = body.trim();
    if body.is_empty() || body.chars().count() > 5_000 {
        return Err(invalid("body", "must be 1 to 5000 characters"));
    }
    store::drafts::get(db, draft_id).await?;
    let c = store::comments::insert(db, draft_id, author, body).await?;
    audit::record(
        db,
        &Entry::new(author, "draft.comment", "draft", draft_id)
            .after(serde_json::json!({"comment_id": c.id, "body": body})),
    )
    .await?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_diff_marks_inserted_and_deleted_words() {
        let mut a = Fields::new();
        a.insert("title".into(), FieldValue::Text("Fast red car".into()));
        let mut b = Fields::new();
        b.insert("title".into(), FieldValue::Text("Fast blue car".into()));
        let d = diff_fields(&a, &b);
        let ops: Vec<(&str, &str)> = d["title"].iter().map(|o| (o.op, o.text.as_str())).collect();
        assert!(ops.contains(&("delete", "red")), "{ops:?}");
        assert!(ops.contains(&("insert", "blue")), "{ops:?}");
        assert!(ops.contains(&("equal", "Fast")), "{ops:?}");
    }

    #[test]
    fn status_names_round_trip() {
        for s in DraftStatus::ALL {
            assert_eq!(DraftStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(DraftStatus::parse("ready"), None);
        assert!(DraftStatus::PendingReview.is_open());
        assert!(!DraftStatus::Approved.is_open());
    }
}
