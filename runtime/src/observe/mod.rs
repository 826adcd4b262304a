//! What is observed of every request: its access record, the metrics and usage it feeds,
//! trace context and span export, and live function tails.

pub mod access_log;
pub mod metrics;
pub mod otlp;
pub mod tail;
pub mod trace_context;
pub mod usage_ledger;
