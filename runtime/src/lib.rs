//! Outpost, the edge function runtime: the HTTP server, routing, the isolate pool and the
//! configuration. The `outpost` binary (`main.rs`) is a thin CLI over this library.
//!
//! A request flows one way: [`server`] accepts it (TLS, HTTP/1.1, h2), [`router`] picks the
//! function, [`pool`] hands it to one of the function's [`isolate`] threads, and the
//! response streams back.

pub mod access_log;
pub mod admin;
pub mod client_geo;
pub mod compression;
pub mod config;
pub mod cpu;
pub mod deployments;
pub mod edge_cache;
pub mod egress;
pub mod error;
pub mod function_code;
pub mod hop_by_hop;
pub mod isolate;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod otlp;
pub mod pool;
pub mod proxy_protocol;
pub mod route_cache;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod tail;
pub mod tls;
pub mod trace_context;
pub mod usage_ledger;

/// Initialises V8 once per process, on the calling thread. Call it from the main thread
/// before any isolate thread starts: isolate threads must descend from the thread that
/// initialised the platform.
pub fn init_v8() {
  deno_core::JsRuntime::init_platform(None);
}
