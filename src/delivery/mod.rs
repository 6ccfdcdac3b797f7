//! Getting approved content to the PIM: the outbox events, signed webhooks with retries and
//! a dead-letter state, the pull feed (`store::outbox`), and exports (JSONL, CSV).

pub mod event;
pub mod export;
pub mod signature;
pub mod url;
pub mod webhooks;
pub mod worker;
