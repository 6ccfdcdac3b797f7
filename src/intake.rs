//! Taking in a submission: parse the records, refuse the bad ones (each alone), resolve the
//! channels, store the batch and queue one task per (product, channel). Shared by the HTTP
//! API and the CLI.

use std::collections::HashMap;

use serde::Serialize;

use crate::{
    channel::{ChannelError, Channels},
    config::Settings,
    spec::{self, Position, ProductSpec, SpecError},
    store::{
        self,
        batches::{NewSubmission, Receipt},
        Db, StoreError,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// Nothing in the submission could be used.
    #[error("no valid product in the submission ({} refused)", .0.len())]
    NothingValid(Vec<SpecError>),
    #[error("the submission is empty")]
    Empty,
    #[error("token_budget must be a positive number of tokens")]
    Budget,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What happened to a submission.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IntakeReport {
    pub batch_id: String,
    pub channels: Vec<String>,
    /// Products accepted and queued.
    pub accepted: usize,
    pub tasks: usize,
    /// Records refused, each with its position, field and reason.
    pub rejected: Vec<SpecError>,
}

/// Parses `bytes` (one object, an array, or JSONL) and queues the valid products.
pub async fn submit_bytes(
    db: &Db,
    channels: &Channels,
    settings: &Settings,
    bytes: &[u8],
    requested_channels: &[String],
    source: &str,
    submitted_by: Option<&str>,
) -> Result<IntakeReport, IntakeError> {
    submit_bytes_with(
        db,
        channels,
        settings,
        bytes,
        requested_channels,
        source,
        submitted_by,
        None,
    )
    .await
}

/// [`submit_bytes`] with a token budget for the batch.
#[allow(clippy::too_many_arguments)]
pub async fn submit_bytes_with(
    db: &Db,
    channels: &Channels,
    settings: &Settings,
    bytes: &[u8],
    requested_channels: &[String],
    source: &str,
    submitted_by: Option<&str>,
    token_budget: Option<i64>,
) -> Result<IntakeReport, IntakeError> {
    let channel_list = channels.resolve(requested_channels)?;
    let records = spec::parse_submission(bytes, &settings.limits);
    if records.is_empty() {
        return Err(IntakeError::Empty);
    }
    submit_records(
        db,
        settings,
        records,
        channel_list,
        source,
        submitted_by,
        token_budget,
    )
    .await
}

/// Queues already parsed records.
pub async fn submit_records(
    db: &Db,
    settings: &Settings,
    records: Vec<(Position, Result<ProductSpec, SpecError>)>,
    channel_list: Vec<String>,
    source: &str,
    submitted_by: Option<&str>,
    token_budget: Option<i64>,
) -> Result<IntakeReport, IntakeError> {
    if token_budget.is_some_and(|b| b <= 0) {
        return Err(IntakeError::Budget);
    }
    let mut specs = Vec::new();
    let mut rejected = Vec::new();
    let mut seen: HashMap<String, Position> = HashMap::new();
    for (pos, r) in records {
        match r {
            Ok(s) => {
                if let Some(first) = seen.get(&s.id) {
                    rejected.push(SpecError {
                        position: pos,
                        product_id: Some(s.id.clone()),
                        field: "id".into(),
                        message: format!("duplicate of {first} in the same submission"),
                    });
                    continue;
                }
                seen.insert(s.id.clone(), pos);
                specs.push((pos, s));
            }
            Err(e) => rejected.push(e),
        }
    }
    if specs.is_empty() {
        return Err(IntakeError::NothingValid(rejected));
    }
    let Receipt {
        batch_id,
        products,
        tasks,
        ..
    } = store::batches::insert_submission(
        db,
        &NewSubmission {
            source,
            channels: &channel_list,
            submitted_by,
            specs: &specs,
            errors: &rejected,
            max_attempts: settings.worker.max_attempts,
            feedback: None,
            parent_draft_id: None,
            token_budget,
        },
    )
    .await?;
    tracing::info!(%batch_id, products, tasks, rejected = rejected.len(), "batch queued");
    Ok(IntakeReport {
        batch_id,
        channels: channel_list,
        accepted: products,
        tasks,
        rejected,
    })
}
