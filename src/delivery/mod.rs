//! Getting approved content to the PIM: exports (JSONL, CSV).

pub mod export;
