//! End-to-end tests: the real `outpost` binary on 127.0.0.1:0, real TLS with certificates
//! from a test CA, real HTTP/1.1 and h2 clients, real V8. One test binary, so V8 is linked
//! once.

mod ambient_authority;
mod cache;
mod cli;
mod cpu;
mod deploy;
mod dev;
mod egress;
mod geo;
mod handlers;
mod limits;
mod memory;
mod observability;
mod pool;
mod protocols;
mod reload;
mod shards;
mod streaming;
mod support;
