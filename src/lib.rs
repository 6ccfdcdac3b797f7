//! enricher: product specs in, channel-ready copy out — checked against the channel's rules
//! and the spec, reviewed by people, delivered to the PIM.
//!
//! See ARCHITECTURE.md for the map and the path of one job.

pub mod auth;
pub mod bench;
pub mod channel;
pub mod checks;
pub mod config;
pub mod delivery;
pub mod eval;
pub mod http;
pub mod intake;
pub mod limits;
pub mod llm;
pub mod models;
pub mod pipeline;
pub mod prompt;
pub mod queue;
pub mod review;
pub mod spec;
pub mod startup;
pub mod store;
pub mod telemetry;
