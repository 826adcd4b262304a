//! Outpost, the edge function runtime: the HTTP server, routing, the shards and their
//! isolates, and the configuration. The `outpost` binary (`main.rs`) is a thin CLI over this
//! library.
//!
//! A request flows one way: a shard accepts it and runs TLS and HTTP for it ([`http`]),
//! [`router`] picks the function ([`node`]), and the function's isolate on the same shard
//! ([`shard`], [`isolate`]) answers it, metered and limited ([`limits`]); the response
//! streams back. Around that path: the shared edge cache ([`cache`]), what is observed of
//! every request ([`observe`]), the admin API and deployments ([`ops`]), and [`server`],
//! which wires them into a running node.
//!
//! Layers, each using only those below it: `config`, `router`, `error`, `cache`, `observe`,
//! `limits` and `isolate` at the bottom; `shard` above them; `node` above that; `ops` and
//! `http` on top of the node; `server` over all.

pub mod cache;
pub mod config;
pub mod error;
pub mod http;
pub mod isolate;
pub mod limits;
pub mod node;
pub mod observe;
pub mod ops;
pub mod router;
pub mod server;
pub mod shard;

/// Initialises V8 once per process, on the calling thread. Call it from the main thread
/// before any shard or isolate thread starts: isolate threads must descend from the thread
/// that initialised the platform.
pub fn init_v8() {
  deno_core::JsRuntime::init_platform(None);
}
