//! Exports: one line (JSONL) or row (CSV) per (product, channel).
//!
//! `status = approved` exports the current approved version of each (product, channel);
//! any other status exports the drafts in that status. JSONL lines look like
//! `{"product_id","channel","status","version","fields":{...},"provenance":{...}}`;
//! CSV has one column per field, list fields spread over numbered columns (`bullets_1`..).

use std::io::Write;

use serde::Serialize;

use crate::{
    channel::{Channels, FieldDefKind},
    checks::{FieldValue, Fields, Finding},
    review::DraftStatus,
    store::{self, approved::ApprovedFilter, drafts::DraftFilter, Db, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("unknown format `{0}` (use jsonl or csv)")]
    Format(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl std::str::FromStr for Format {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self, ExportError> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            other => Err(ExportError::Format(other.to_string())),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExportFilter {
    pub status: DraftStatus,
    pub channel: Option<String>,
    pub batch_id: Option<String>,
    /// Approved (or, for drafts, created) at or after this time, epoch ms.
    pub since_ms: Option<i64>,
}

/// One exported record.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExportLine {
    pub product_id: String,
    pub channel: String,
    pub status: DraftStatus,
    /// Approved version number (approved content only).
    pub version: Option<i64>,
    pub fields: Fields,
    pub provenance: serde_json::Value,
    pub draft_id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<Finding>,
    pub approved_by: Option<String>,
    pub approved_at: Option<i64>,
}

/// Parses `--since`/`?since=`: RFC 3339, a date (`2026-11-28`), or epoch milliseconds.
pub fn parse_since(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis());
    }
    s.parse::<i64>().ok()
}

const PAGE: i64 = 500;

/// Collects the export lines for `filter`, in a stable order.
pub async fn lines(db: &Db, filter: &ExportFilter) -> Result<Vec<ExportLine>, ExportError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    if filter.status == DraftStatus::Approved {
        loop {
            let page = store::approved::list(
                db,
                &ApprovedFilter {
                    channel: filter.channel.clone(),
                    batch_id: filter.batch_id.clone(),
                    since_ms: filter.since_ms,
                    limit: PAGE,
                    after: after.clone(),
                    ..Default::default()
                },
            )
            .await?;
            let n = page.len();
            after = page.last().map(|a| a.id.clone());
            out.extend(page.into_iter().map(|a| ExportLine {
                product_id: a.product_id,
                channel: a.channel,
                status: DraftStatus::Approved,
                version: Some(a.version),
                fields: a.fields,
                provenance: a.provenance,
                draft_id: a.draft_id,
                findings: Vec::new(),
                approved_by: Some(a.approved_by),
                approved_at: Some(a.approved_at),
            }));
            if (n as i64) < PAGE {
                break;
            }
        }
    } else {
        loop {
            let page = store::drafts::list(
                db,
                &DraftFilter {
                    status: Some(filter.status),
                    channel: filter.channel.clone(),
                    batch_id: filter.batch_id.clone(),
                    after: after.clone(),
                    limit: PAGE,
                    ..Default::default()
                },
            )
            .await?;
            let n = page.len();
            after = page.last().map(|d| d.id.clone());
            out.extend(
                page.into_iter()
                    .filter(|d| filter.since_ms.is_none_or(|s| d.created_at >= s))
                    .map(|d| ExportLine {
                        fields: d.current_fields().clone(),
                        product_id: d.product_id,
                        channel: d.channel,
                        status: d.status,
                        version: None,
                        provenance: d.provenance,
                        draft_id: d.id,
                        findings: d.findings,
                        approved_by: None,
                        approved_at: None,
                    }),
            );
            if (n as i64) < PAGE {
                break;
            }
        }
    }
    out.sort_by(|a, b| (&a.product_id, &a.channel).cmp(&(&b.product_id, &b.channel)));
    Ok(out)
}

/// Writes `lines` in `format`.
pub fn write(
    lines: &[ExportLine],
    format: Format,
    channels: &Channels,
    mut w: impl Write,
) -> Result<(), ExportError> {
    match format {
        Format::Jsonl => {
            for l in lines {
                serde_json::to_writer(&mut w, l).map_err(std::io::Error::from)?;
                w.write_all(b"\n")?;
            }
        }
        Format::Csv => {
            // Columns: the union of the channels' fields, lists spread over numbered columns.
            let mut columns: Vec<(String, Option<usize>)> = Vec::new();
            for ch in channels.all() {
                for f in &ch.fields {
                    match f.kind {
                        FieldDefKind::Text => {
                            if !columns.iter().any(|(n, i)| n == &f.name && i.is_none()) {
                                columns.push((f.name.clone(), None));
                            }
                        }
                        FieldDefKind::List => {
                            let (_, max) = f.item_range();
                            for i in 1..=max {
                                if !columns.iter().any(|(n, j)| n == &f.name && *j == Some(i)) {
                                    columns.push((f.name.clone(), Some(i)));
                                }
                            }
                        }
                    }
                }
            }
            let mut csv = csv::Writer::from_writer(w);
            let mut header = vec![
                "product_id".to_string(),
                "channel".into(),
                "status".into(),
                "version".into(),
            ];
            header.extend(columns.iter().map(|(n, i)| match i {
                Some(i) => format!("{n}_{i}"),
                None => n.clone(),
            }));
            header.extend([
                "draft_id".to_string(),
                "approved_by".into(),
                "approved_at".into(),
            ]);
            csv.write_record(&header)?;
            for l in lines {
                let mut row = vec![
                    l.product_id.clone(),
                    l.channel.clone(),
                    l.status.to_string(),
                    l.version.map(|v| v.to_string()).unwrap_or_default(),
                ];
                for (name, idx) in &columns {
                    let cell = match (l.fields.get(name), idx) {
                        (Some(FieldValue::Text(t)), None) => t.clone(),
                        (Some(FieldValue::List(items)), Some(i)) => {
                            items.get(i - 1).cloned().unwrap_or_default()
                        }
                        _ => String::new(),
                    };
                    row.push(cell);
                }
                row.push(l.draft_id.clone());
                row.push(l.approved_by.clone().unwrap_or_default());
                row.push(
                    l.approved_at
                        .and_then(chrono::DateTime::from_timestamp_millis)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default(),
                );
                csv.write_record(&row)?;
            }
            csv.flush()?;
        }
    }
    Ok(())
}
