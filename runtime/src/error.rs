//! The error type of the runtime crate. Configuration problems are collected separately as
//! [`ConfigErrors`](crate::config::ConfigErrors), a located list reported all at once.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
  #[error("deployed functions: {0}")]
  Deployments(String),
  #[error("cannot listen on {address}: {source}")]
  Bind {
    address: SocketAddr,
    source: std::io::Error,
  },
  #[error("listener {address}: {source}")]
  Listener {
    address: SocketAddr,
    source: Box<Error>,
  },
  #[error("function {function:?}: cannot read {entry}: {source}")]
  Entry {
    function: String,
    entry: String,
    source: std::io::Error,
  },

  #[error("{path}: cannot read certificates: {reason}")]
  Certificates { path: String, reason: String },
  #[error("{path}: cannot read the private key: {reason}")]
  PrivateKey { path: String, reason: String },
  #[error("{path}: {reason}")]
  UnusableCertificate { path: String, reason: String },
  #[error("a TLS listener needs at least one certificate")]
  NoCertificates,
  #[error("TLS configuration: {0}")]
  Tls(#[from] rustls::Error),
  #[error("PROXY protocol: {0}")]
  ProxyHeader(String),
  #[error("geo database: {0}")]
  GeoDatabase(String),

  #[error("creating the isolate failed: {0}")]
  IsolateCreate(String),
  #[error("the isolate thread could not be started: {0}")]
  IsolateThread(String),
  /// The function's module failed to load, evaluate, or has no handler. The message names
  /// file:line:col where V8 or the transpiler gives one.
  #[error("{0}")]
  FunctionLoad(String),

  /// Requests for a function whose module does not load.
  #[error("function {function:?} failed to load: {message}")]
  FunctionFailed { function: String, message: String },
  #[error("function {function:?} has no isolate available: {message}")]
  FunctionUnavailable { function: String, message: String },
}
