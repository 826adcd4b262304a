//! `outpost.toml`: parsing, validation with file:line:col errors, and the embedded default
//! (one handler file answering every host and path).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use geo_config::NodeIdentity;
use geo_config::client::GeoConfig;
use geo_config::maxmind::GeoDatabases;
use geo_config::overrides::Override;
use geo_config::regions::{RegionConfig, RegionTree};

use crate::limits::egress::{EgressConfig, NodeEgressConfig};
use crate::limits::{Limits, LimitsConfig};

use crate::router::RoutePattern;

mod document;
use document::Document;

/// Why a function or override may not set an `OUTPOST_` variable.
const RESERVED_ENV: &str = "names starting with OUTPOST_ are reserved for values Outpost sets (OUTPOST_POP, OUTPOST_REGION); rename the variable";

/// A validated configuration, with paths resolved against the config file's directory.
#[derive(Debug, Clone)]
pub struct Config {
  /// The file it was loaded from (`None` for the single-handler default).
  pub file: Option<PathBuf>,
  /// For the single-handler default: the handler file and the address it is served on,
  /// from which a reload makes the config anew.
  pub handler: Option<(PathBuf, SocketAddr)>,
  /// The file `[node]`, `[geo]`, `[[regions]]` and `[[overrides]]` came from, when not this one.
  pub geo_file: Option<PathBuf>,
  /// Who this node is (`[node]`); its PoP and region reach every function's `env`.
  pub node: Option<NodeIdentity>,
  pub egress: NodeEgressConfig,
  pub listeners: Vec<ListenerConfig>,
  pub functions: Vec<FunctionConfig>,
  pub server: ServerConfig,
  pub cache: CacheConfig,
  /// The admin listener, when `[admin]` is present.
  pub admin: Option<AdminConfig>,
  /// Where clients are: trusted peers and geo headers (`[geo]`).
  pub geo: GeoConfig,
  /// The server log (`[log]`).
  pub log: LogConfig,
  /// The node's default limits (`[limits]`), which deployed functions' limits refine.
  pub limits: LimitsConfig,
  /// Span export (`[tracing]`).
  pub tracing: crate::observe::otlp::TracingConfig,
}

/// The server log (`[log]`): access records, handler console output and the rest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
  /// A tracing filter: `"info"`, or per target, `"warn,outpost::access=info"`. The
  /// `OUTPOST_LOG` environment variable, when set, takes its place.
  pub level: String,
  /// `"text"` (human-readable, to stderr) or `"json"` (one object per line, to stdout).
  pub format: LogFormat,
  /// Console output (UTF-8 bytes) one request may write; the rest is dropped.
  pub console_bytes_per_request: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
  Text,
  Json,
}

impl Default for LogConfig {
  fn default() -> Self {
    LogConfig {
      level: "info".into(),
      format: LogFormat::Text,
      console_bytes_per_request: 64 * 1024,
    }
  }
}

impl LogConfig {
  /// Every value that cannot work, with the reason.
  pub fn problems(&self) -> Vec<(&'static str, String)> {
    match tracing_subscriber::EnvFilter::try_new(&self.level) {
      Ok(_) => Vec::new(),
      Err(err) => vec![(
        "level",
        format!(
          "{:?} is not a log filter ({err}); use a level such as \"info\" or \"warn,outpost::access=info\"",
          self.level
        ),
      )],
    }
  }
}

/// The shared edge cache (`[cache]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
  /// Bytes the whole cache may hold (bodies plus headers): `"256MiB"` or a number.
  pub max_bytes: bytesize::ByteSize,
  /// Bytes one entry may take; larger responses are not stored.
  pub max_entry_bytes: bytesize::ByteSize,
}

impl Default for CacheConfig {
  fn default() -> Self {
    Self {
      max_bytes: bytesize::ByteSize::mib(256),
      max_entry_bytes: bytesize::ByteSize::mib(16),
    }
  }
}

impl CacheConfig {
  /// Every value that cannot work, with the reason.
  pub fn problems(&self) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if self.max_entry_bytes > self.max_bytes {
      problems.push((
        "max_entry_bytes",
        format!(
          "{} is larger than max_bytes ({})",
          self.max_entry_bytes, self.max_bytes
        ),
      ));
    }
    if self.max_entry_bytes.as_u64() > u64::from(u32::MAX) {
      problems.push(("max_entry_bytes", "must be below 4 GiB".to_string()));
    }
    problems
  }
}

/// Caching in front of one function (`cache = { ... }` on a function).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
  /// Store cacheable GET responses and serve them without entering JS.
  #[serde(default)]
  pub enabled: bool,
}

/// The admin listener (`[admin]`): cache purges and stats.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
  /// Where it listens; loopback unless set otherwise.
  #[serde(default = "AdminConfig::default_address")]
  pub address: SocketAddr,
  /// The bearer token every admin request must carry; required off loopback.
  #[serde(default)]
  pub token: Option<String>,
  /// A file holding the token (its first line), instead of `token`.
  #[serde(default)]
  pub token_file: Option<PathBuf>,
  /// Where deployed functions are kept; without it the deploy API is off.
  #[serde(default)]
  pub data_dir: Option<PathBuf>,
}

impl AdminConfig {
  fn default_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
  }

  /// Every value that cannot work, with the reason.
  pub fn problems(&self) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if self.token.is_some() && self.token_file.is_some() {
      problems.push((
        "token_file",
        "set token or token_file, not both".to_string(),
      ));
    }
    if !self.address.ip().is_loopback() && self.token.as_deref().is_none_or(str::is_empty) {
      problems.push((
        "token",
        format!(
          "the admin listener on {} is reachable off this machine: set a token, or bind it to 127.0.0.1",
          self.address
        ),
      ));
    }
    problems
  }
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
  pub address: SocketAddr,
  /// Certificates to choose from by SNI; empty for a plain HTTP/1.1 + h2c listener.
  pub tls: Vec<CertificateConfig>,
  /// Every connection starts with a PROXY protocol header naming the client.
  pub proxy_protocol: bool,
}

pub use crate::http::tls::CertificateConfig;

#[derive(Debug, Clone)]
pub struct FunctionConfig {
  pub name: String,
  pub entry: PathBuf,
  pub routes: Vec<RoutePattern>,
  pub env: BTreeMap<String, String>,
  pub pool: PoolConfig,
  pub egress: EgressConfig,
  pub limits: Limits,
  pub cache: RouteCacheConfig,
  /// The status its routes answer when `[[overrides]]` switch it off on this node.
  pub disabled: Option<u16>,
  /// Service bindings: `env` name → the function it calls in-process.
  pub services: BTreeMap<String, String>,
}

/// Isolate pool settings of one function (`pool = { ... }`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
  /// Isolates created at startup and kept warm.
  pub prewarm: usize,
  /// Upper bound the pool grows to under load.
  pub max_isolates: usize,
  /// Isolates above `prewarm` that stay idle this long are evicted.
  pub idle_timeout_s: u64,
  /// Requests in flight on every isolate before the pool starts another one.
  pub isolate_concurrency: usize,
}

impl Default for PoolConfig {
  fn default() -> Self {
    Self {
      prewarm: 1,
      max_isolates: 4,
      idle_timeout_s: 300,
      isolate_concurrency: 16,
    }
  }
}

/// Node-wide server settings (`[server]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
  /// How long in-flight requests may run after SIGTERM/SIGINT before the process exits.
  pub shutdown_grace_s: u64,
  /// Compress compressible responses with brotli or gzip per `Accept-Encoding`.
  pub compression: bool,
  /// Blank isolates each shard keeps ready for pools that grow and functions new to it.
  pub spare_isolates: usize,
  /// Isolates a shard may be starting at once ahead of requests: when a TLS ClientHello names
  /// a host whose function would need a new isolate for its request, one is started during
  /// the handshake (0: never).
  pub sni_prewarm: usize,
  /// How long loading a function's module may take before the isolate is terminated and
  /// the function reported as failed to load.
  pub load_timeout_ms: u64,
  /// Largest request head (request line and headers) accepted; HTTP/1.1 answers 431 above
  /// it, HTTP/2 refuses the stream. At least 8192.
  pub max_header_bytes: usize,
  /// Most header lines a request may have, on every protocol: 431 above it.
  pub max_headers: usize,
  /// Largest request body accepted; 413 above it.
  pub max_body_bytes: u64,
  /// Time a client has to send a complete request head (guards against slowloris).
  pub header_read_timeout_ms: u64,
  /// A connection (HTTP/1.1 or HTTP/2) with no request in flight for this long is closed;
  /// HTTP/2 gets a GOAWAY first.
  pub idle_timeout_ms: u64,
  /// Streams one HTTP/2 connection may have open at once.
  pub h2_max_concurrent_streams: u32,
  /// Streams an HTTP/2 client may reset before they are served, before the connection is
  /// closed (the rapid-reset flood guard).
  pub h2_max_pending_resets: usize,
  /// Requests in flight on the whole node at once.
  pub max_in_flight: usize,
  /// Requests that may wait for a free slot when the node or their function is at its limit.
  pub queue_depth: usize,
  /// How long a request may wait in that queue before it gets 503.
  pub queue_timeout_ms: u64,
  /// Switch a slow-lane isolate thread to `SCHED_IDLE` while an entry into JS runs long (see
  /// `crate::limits::cpu`), so that the shards are delayed less.
  pub demote_long_entries: bool,
  /// Put load errors and handler stacks into the bodies of 503/500 answers (for
  /// development); off, the body names the request id and the details stay in the log.
  pub error_details: bool,
  /// Shards: threads that each serve HTTP and run isolates (0: one per core available to
  /// the process).
  pub shards: usize,
  /// An entry into JS past this much CPU time counts against its function; after a few
  /// the function moves to the slow lane, as it does at once when an entry is killed at its
  /// CPU limit (0: neither moves a function; its soft CPU limit still does).
  pub slow_lane_entry_ms: u64,
}

impl ServerConfig {
  /// How many shards to start: `shards`, or one per core available to the process.
  pub fn shard_count(&self) -> usize {
    if self.shards > 0 {
      return self.shards;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
  }
}

impl Default for ServerConfig {
  fn default() -> Self {
    Self {
      shutdown_grace_s: 30,
      compression: true,
      spare_isolates: 1,
      sni_prewarm: 4,
      load_timeout_ms: 10_000,
      max_header_bytes: 64 * 1024,
      max_headers: 100,
      max_body_bytes: 100 * 1024 * 1024,
      header_read_timeout_ms: 10_000,
      idle_timeout_ms: 60_000,
      h2_max_concurrent_streams: 250,
      h2_max_pending_resets: 20,
      max_in_flight: 10_000,
      queue_depth: 1024,
      queue_timeout_ms: 1000,
      demote_long_entries: true,
      error_details: false,
      shards: 0,
      slow_lane_entry_ms: 2,
    }
  }
}

/// Every problem found in a config file, each with its location.
#[derive(Debug, thiserror::Error)]
#[error("{}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors {
  pub errors: Vec<ConfigError>,
}

/// One config problem: where it is, which key, and what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}: {message}", file = .file.display())]
pub struct ConfigError {
  pub file: PathBuf,
  pub line: usize,
  pub column: usize,
  pub key: String,
  pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
  #[serde(default)]
  node: Option<Spanned<NodeIdentity>>,
  #[serde(default)]
  egress: NodeEgressConfig,
  #[serde(default)]
  limits: Option<Spanned<LimitsConfig>>,
  #[serde(default)]
  listen: Vec<RawListener>,
  #[serde(default)]
  functions: Vec<RawFunction>,
  #[serde(default)]
  server: ServerConfig,
  #[serde(default)]
  cache: Option<Spanned<CacheConfig>>,
  #[serde(default)]
  admin: Option<Spanned<AdminConfig>>,
  #[serde(default)]
  log: Option<Spanned<LogConfig>>,
  #[serde(default)]
  tracing: Option<Spanned<crate::observe::otlp::TracingConfig>>,
  /// A separate file holding `[node]`, `[geo]`, `[[regions]]` and `[[overrides]]`.
  #[serde(default)]
  geo_file: Option<Spanned<String>>,
  #[serde(default)]
  geo: Option<Spanned<GeoConfig>>,
  #[serde(default)]
  regions: Vec<Spanned<RegionConfig>>,
  #[serde(default)]
  overrides: Vec<Spanned<Override<LimitsConfig>>>,
}

/// The tables a `geo_file` may hold: the node's PoP identity and per-region configuration.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeoFile {
  #[serde(default)]
  node: Option<Spanned<NodeIdentity>>,
  #[serde(default)]
  geo: Option<Spanned<GeoConfig>>,
  #[serde(default)]
  regions: Vec<Spanned<RegionConfig>>,
  #[serde(default)]
  overrides: Vec<Spanned<Override<LimitsConfig>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
  address: Option<Spanned<String>>,
  #[serde(default)]
  tls: Vec<RawCertificate>,
  #[serde(default)]
  proxy_protocol: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
  cert: Option<Spanned<String>>,
  key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
  name: Option<Spanned<String>>,
  entry: Option<Spanned<String>>,
  routes: Option<Spanned<Vec<Spanned<String>>>>,
  #[serde(default)]
  env: Option<Spanned<BTreeMap<String, String>>>,
  #[serde(default)]
  pool: Option<Spanned<PoolConfig>>,
  #[serde(default)]
  egress: Option<Spanned<EgressConfig>>,
  #[serde(default)]
  limits: Option<Spanned<LimitsConfig>>,
  #[serde(default)]
  cache: Option<Spanned<RouteCacheConfig>>,
  #[serde(default)]
  services: Option<Spanned<BTreeMap<String, String>>>,
}

impl Config {
  /// Reads and validates a config file. All problems are reported at once.
  pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigErrors {
      errors: vec![ConfigError {
        file: path.to_path_buf(),
        line: 1,
        column: 1,
        key: "<file>".into(),
        message: format!("cannot read the config file: {err}"),
      }],
    })?;
    let mut config = Config::parse(path, &text)?;
    config.file = Some(path.to_path_buf());
    Ok(config)
  }

  /// Parses config text; `path` names the file in errors and anchors relative paths.
  pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let (mut document, syntax) = Document::parse(text);
    let plain = Locator {
      file: path,
      text,
      document: None,
    };
    // A document with syntax errors is not read further: what follows from a half-parsed
    // document would only add errors that are not there.
    if !syntax.is_empty() {
      return Err(ConfigErrors {
        errors: plain.problems(syntax),
      });
    }
    let (raw, problems) = document.deserialize::<RawConfig>();
    let mut errors = plain.problems(problems);
    let Some(raw) = raw else {
      return Err(ConfigErrors { errors });
    };
    let locate = Locator {
      file: path,
      text,
      document: Some(&document),
    };
    let base = path.parent().unwrap_or(Path::new("."));
    // The PoP tables, from `geo_file` when set: errors in them name that file.
    let geo_path = raw.geo_file.as_ref().map(|file| base.join(file.get_ref()));
    let geo_text = match (&raw.geo_file, &geo_path) {
      (Some(file), Some(geo_path)) => match std::fs::read_to_string(geo_path) {
        Ok(text) => Some(text),
        Err(err) => {
          let message = format!("cannot read {}: {err}", geo_path.display());
          errors.push(locate.error(file.span(), "geo_file", message));
          None
        }
      },
      _ => None,
    };
    let mut raw = raw;
    let mut geo_document = None;
    if let (Some(geo_path), Some(geo_text)) = (&geo_path, &geo_text) {
      let geo_plain = Locator {
        file: geo_path,
        text: geo_text,
        document: None,
      };
      let (mut parsed, syntax) = Document::parse(geo_text);
      let (file, problems) = if syntax.is_empty() {
        parsed.deserialize::<RawGeoFile>()
      } else {
        (None, syntax)
      };
      errors.extend(geo_plain.problems(problems));
      if let Some(file) = file {
        let both = raw.node.is_some()
          || raw.geo.is_some()
          || !raw.regions.is_empty()
          || !raw.overrides.is_empty();
        if both {
          errors.push(locate.error(
            raw.geo_file.as_ref().map_or(0..0, Spanned::span),
            "geo_file",
            "with geo_file set, [node], [geo], [[regions]] and [[overrides]] belong in that file only".into(),
          ));
        }
        raw.node = file.node;
        raw.geo = file.geo;
        raw.regions = file.regions;
        raw.overrides = file.overrides;
      }
      geo_document = Some(parsed);
    }
    let geo_locate = match (&geo_path, &geo_text) {
      (Some(geo_path), Some(geo_text)) => Locator {
        file: geo_path,
        text: geo_text,
        document: geo_document.as_ref(),
      },
      _ => Locator {
        file: path,
        text,
        document: Some(&document),
      },
    };
    let geo_base = geo_path.as_deref().and_then(Path::parent).unwrap_or(base);
    let mut listeners = Vec::new();
    if raw.listen.is_empty() {
      errors.push(locate.error(
        0..0,
        "listen",
        "no [[listen]] section: add one, e.g. [[listen]] address = \"127.0.0.1:8787\"".into(),
      ));
    }
    for (i, listener) in raw.listen.iter().enumerate() {
      let key = format!("listen[{i}].address");
      let address = locate
        .required(
          &listener.address,
          &key,
          "address = \"0.0.0.0:8443\"",
          &mut errors,
        )
        .and_then(|address| match address.get_ref().parse::<SocketAddr>() {
          Ok(parsed) => Some(parsed),
          Err(err) => {
            errors.push(locate.error(
              address.span(),
              &key,
              format!(
                "{:?} is not an IP address with a port ({err}), e.g. \"0.0.0.0:8443\"",
                address.get_ref()
              ),
            ));
            None
          }
        });
      let mut tls = Vec::new();
      for (j, cert) in listener.tls.iter().enumerate() {
        let cert_key = format!("listen[{i}].tls[{j}].cert");
        let key_key = format!("listen[{i}].tls[{j}].key");
        let cert_path = locate
          .required(&cert.cert, &cert_key, "cert = \"cert.pem\"", &mut errors)
          .and_then(|cert| locate.existing_file(base, cert, &cert_key, &mut errors));
        let key_path = locate
          .required(&cert.key, &key_key, "key = \"key.pem\"", &mut errors)
          .and_then(|key| locate.existing_file(base, key, &key_key, &mut errors));
        if let (Some(cert), Some(key)) = (cert_path, key_path) {
          let certificate = CertificateConfig { cert, key };
          // Read now, so that a certificate that cannot serve is reported at its entry.
          if let Err(err) = crate::http::tls::server_config(std::slice::from_ref(&certificate)) {
            errors.push(locate.error(0..0, &cert_key, err.to_string()));
          }
          tls.push(certificate);
        }
      }
      if let Some(address) = address {
        listeners.push(ListenerConfig {
          address,
          tls,
          proxy_protocol: listener.proxy_protocol,
        });
      }
    }

    let node_limits = locate.table(&raw.limits, "limits", LimitsConfig::problems, &mut errors);
    for (field, message) in raw.egress.problems() {
      errors.push(locate.error(0..0, &format!("egress.{field}"), message));
    }
    let cache = locate.table(&raw.cache, "cache", CacheConfig::problems, &mut errors);
    let log = locate.table(&raw.log, "log", LogConfig::problems, &mut errors);
    let tracing = locate.table(
      &raw.tracing,
      "tracing",
      crate::observe::otlp::TracingConfig::problems,
      &mut errors,
    );
    let mut geo = geo_locate.table(&raw.geo, "geo", GeoConfig::problems, &mut errors);
    if let Some(table) = &raw.geo {
      // Database paths are relative to the file; each must open as a MaxMind DB.
      for (field, path) in [
        ("mmdb_city", &mut geo.mmdb_city),
        ("mmdb_asn", &mut geo.mmdb_asn),
      ] {
        let Some(relative) = path.as_mut() else {
          continue;
        };
        let resolved = geo_base.join(&*relative);
        *relative = resolved.display().to_string();
        if let Err(message) = GeoDatabases::open(&resolved, None) {
          errors.push(geo_locate.error(table.span(), &format!("geo.{field}"), message));
        }
      }
    }
    let admin = raw.admin.as_ref().map(|table| {
      let mut admin = table.get_ref().clone();
      // Paths are relative to the config file; the token file is read now.
      admin.data_dir = admin.data_dir.map(|dir| base.join(dir));
      if let Some(file) = admin.token_file.take() {
        let file = base.join(file);
        match std::fs::read_to_string(&file) {
          Ok(text) => admin.token = text.lines().next().map(|line| line.trim().to_string()),
          Err(err) => errors.push(locate.error(
            table.span(),
            "admin.token_file",
            format!("cannot read {}: {err}", file.display()),
          )),
        }
      }
      for (field, message) in admin.problems() {
        errors.push(locate.error(table.span(), &format!("admin.{field}"), message));
      }
      admin
    });
    if raw.server.max_in_flight == 0 {
      errors.push(locate.error(0..0, "server.max_in_flight", "must be at least 1".into()));
    }
    let regions = geo_locate.regions(&raw.regions, raw.node.as_ref(), &mut errors);
    let overrides: Vec<Override<LimitsConfig>> =
      raw.overrides.iter().map(|o| o.get_ref().clone()).collect();
    let function_names: Vec<&str> = raw
      .functions
      .iter()
      .filter_map(|f| Some(f.name.as_ref()?.get_ref().as_str()))
      .collect();
    for problem in geo_config::overrides::problems(&overrides, &regions, &function_names) {
      let span = raw.overrides[problem.index].span();
      let key = format!("overrides[{}].{}", problem.index, problem.field);
      errors.push(geo_locate.error(span, &key, problem.message));
    }
    for (index, entry) in raw.overrides.iter().enumerate() {
      let limits = entry
        .get_ref()
        .limits
        .iter()
        .flat_map(LimitsConfig::problems);
      for (field, message) in limits {
        let key = format!("overrides[{index}].limits.{field}");
        errors.push(geo_locate.error(entry.span(), &key, message));
      }
      for name in entry
        .get_ref()
        .env
        .keys()
        .filter(|k| k.starts_with("OUTPOST_"))
      {
        let key = format!("overrides[{index}].env.{name}");
        errors.push(geo_locate.error(entry.span(), &key, RESERVED_ENV.into()));
      }
    }
    if !overrides.is_empty() && raw.node.is_none() {
      errors.push(geo_locate.error(
        raw.overrides[0].span(),
        "overrides",
        "[[overrides]] apply by PoP and region: add a [node] table with this node's pop".into(),
      ));
    }
    let mut functions = Vec::new();
    let mut names = HashSet::new();
    let mut seen_routes: Vec<(RoutePattern, String)> = Vec::new();
    for (i, function) in raw.functions.iter().enumerate() {
      let name_key = format!("functions[{i}].name");
      let entry_key = format!("functions[{i}].entry");
      let routes_key = format!("functions[{i}].routes");
      let name = locate.required(&function.name, &name_key, "name = \"api\"", &mut errors);
      if let Some(name) = name.map(Spanned::get_ref) {
        if let Err(message) = check_function_name(name) {
          errors.push(locate.error(0..0, &name_key, message));
        } else if !names.insert(name.clone()) {
          errors.push(locate.error(
            0..0,
            &name_key,
            format!("function {name:?} is defined twice; function names must be unique"),
          ));
        }
      }
      let entry = locate
        .required(
          &function.entry,
          &entry_key,
          "entry = \"index.ts\"",
          &mut errors,
        )
        .and_then(|entry| locate.existing_file(base, entry, &entry_key, &mut errors));
      let route_list = locate.required(
        &function.routes,
        &routes_key,
        "routes = [\"/\"]",
        &mut errors,
      );
      let Some(name) = name.map(Spanned::get_ref) else {
        continue;
      };
      let mut routes = Vec::new();
      if let Some(list) = route_list
        && list.get_ref().is_empty()
      {
        errors.push(locate.error(
          list.span(),
          &routes_key,
          "no routes: add at least one, e.g. routes = [\"/\"]".into(),
        ));
      }
      for (j, route) in route_list.into_iter().flat_map(|r| r.get_ref()).enumerate() {
        let key = format!("functions[{i}].routes[{j}]");
        match RoutePattern::parse(route.get_ref()) {
          Ok(pattern) => {
            if let Some((_, other)) = seen_routes.iter().find(|(p, _)| *p == pattern) {
              errors.push(locate.error(
                route.span(),
                &key,
                format!(
                  "route {:?} is already routed to function {other:?}",
                  route.get_ref()
                ),
              ));
            } else {
              seen_routes.push((pattern.clone(), name.clone()));
              routes.push(pattern);
            }
          }
          Err(message) => errors.push(locate.error(route.span(), &key, message)),
        }
      }
      let env = function
        .env
        .as_ref()
        .map(|e| e.get_ref().clone())
        .unwrap_or_default();
      if let Some(spanned) = &function.env {
        for key in env.keys().filter(|k| k.starts_with("OUTPOST_")) {
          errors.push(locate.error(
            spanned.span(),
            &format!("functions[{i}].env.{key}"),
            RESERVED_ENV.into(),
          ));
        }
      }
      let services = function
        .services
        .as_ref()
        .map(|s| s.get_ref().clone())
        .unwrap_or_default();
      for (binding, target) in &services {
        let key = format!("functions[{i}].services.{binding}");
        if let Err(message) = check_binding_name(binding) {
          errors.push(locate.error(0..0, &key, message));
        } else if env.contains_key(binding) {
          errors.push(locate.error(
            0..0,
            &key,
            format!(
              "{binding} is also an env variable of this function; give the binding another name"
            ),
          ));
        }
        if let Err(message) = check_function_name(target) {
          errors.push(locate.error(0..0, &key, message));
        }
      }
      let limits = locate.table(
        &function.limits,
        &format!("functions[{i}].limits"),
        LimitsConfig::problems,
        &mut errors,
      );
      let egress = locate.table(
        &function.egress,
        &format!("functions[{i}].egress"),
        |egress: &EgressConfig| egress.problems(&raw.egress),
        &mut errors,
      );
      let cache = function
        .cache
        .as_ref()
        .map(|c| c.get_ref().clone())
        .unwrap_or_default();
      let pool = function
        .pool
        .as_ref()
        .map(|p| p.get_ref().clone())
        .unwrap_or_default();
      if let Some(spanned) = &function.pool
        && let Err(message) = pool.validate()
      {
        errors.push(locate.error(spanned.span(), &format!("functions[{i}].pool"), message));
      }
      // What this node's PoP and region change (see geo_config::overrides).
      let (pop, region) = raw.node.as_ref().map_or(("", None), |node| {
        let node = node.get_ref();
        (node.pop.as_str(), node.region.as_deref())
      });
      let applied = geo_config::overrides::apply(&overrides, &regions, pop, region, name);
      let mut env = env;
      env.extend(applied.env);
      let limits = applied
        .limits
        .into_iter()
        .fold(limits, |limits, over| limits.overlay(over));
      if let Some(entry) = entry {
        functions.push(FunctionConfig {
          name: name.clone(),
          entry,
          routes,
          env,
          pool,
          egress,
          limits: Limits::resolve(&limits, &node_limits),
          cache,
          disabled: (!applied.enabled).then_some(applied.disabled_status),
          services,
        });
      }
    }

    if raw.server.max_header_bytes < 8192 {
      errors.push(locate.error(
        0..0,
        "server.max_header_bytes",
        format!(
          "{} is below the minimum of 8192 bytes",
          raw.server.max_header_bytes
        ),
      ));
    }
    for (key, value) in [
      (
        "server.header_read_timeout_ms",
        raw.server.header_read_timeout_ms,
      ),
      ("server.idle_timeout_ms", raw.server.idle_timeout_ms),
      ("server.max_headers", raw.server.max_headers as u64),
    ] {
      if value == 0 {
        errors.push(locate.error(0..0, key, "must be at least 1".to_string()));
      }
    }
    if let Some(node) = &raw.node {
      for problem in node.get_ref().problems() {
        errors.push(geo_locate.error(
          node.span(),
          &format!("node.{}", problem.field),
          problem.message,
        ));
      }
    }

    if errors.is_empty() {
      Ok(Config {
        file: None,
        handler: None,
        geo_file: geo_path,
        node: raw.node.map(Spanned::into_inner),
        egress: raw.egress,
        listeners,
        functions,
        server: raw.server,
        cache,
        admin,
        geo,
        log,
        limits: node_limits,
        tracing,
      })
    } else {
      Err(ConfigErrors { errors })
    }
  }

  /// The embedded default: one handler file answers every host and path on one plain
  /// listener.
  pub fn single_handler(entry: &Path, address: SocketAddr) -> Result<Config, ConfigErrors> {
    let error = |message: String| ConfigErrors {
      errors: vec![ConfigError {
        file: entry.to_path_buf(),
        line: 1,
        column: 1,
        key: "<handler>".into(),
        message,
      }],
    };
    let entry = std::path::absolute(entry).map_err(|err| error(err.to_string()))?;
    if !entry.is_file() {
      return Err(error("the handler file does not exist".into()));
    }
    Ok(Config {
      file: None,
      handler: Some((entry.clone(), address)),
      geo_file: None,
      listeners: vec![ListenerConfig {
        address,
        tls: Vec::new(),
        proxy_protocol: false,
      }],
      functions: vec![FunctionConfig {
        name: "default".into(),
        entry,
        routes: vec![RoutePattern::parse("/").expect("\"/\" is a valid route")],
        env: BTreeMap::new(),
        pool: PoolConfig::default(),
        egress: EgressConfig::default(),
        limits: Limits::resolve(&LimitsConfig::default(), &LimitsConfig::default()),
        cache: RouteCacheConfig::default(),
        disabled: None,
        services: BTreeMap::new(),
      }],
      server: ServerConfig::default(),
      node: None,
      egress: NodeEgressConfig::default(),
      cache: CacheConfig::default(),
      admin: None,
      geo: GeoConfig::default(),
      log: LogConfig::default(),
      limits: LimitsConfig::default(),
      tracing: crate::observe::otlp::TracingConfig::default(),
    })
  }
}

impl Config {
  /// The egress policy of a function on this node.
  pub fn egress_policy(&self, function: &FunctionConfig) -> crate::limits::egress::EgressPolicy {
    crate::limits::egress::EgressPolicy::new(&function.egress, &self.egress)
  }

  /// The `env` a function's handler receives: its own variables plus the node identity
  /// (`OUTPOST_POP`, `OUTPOST_REGION`).
  pub fn handler_env(&self, function: &FunctionConfig) -> BTreeMap<String, String> {
    let mut env = function.env.clone();
    if let Some(node) = &self.node {
      env.extend(node.env_vars().into_iter().map(|(k, v)| (k.to_string(), v)));
    }
    env
  }
}

impl PoolConfig {
  fn validate(&self) -> Result<(), String> {
    if self.max_isolates == 0 {
      return Err("max_isolates must be at least 1".into());
    }
    if self.prewarm > self.max_isolates {
      return Err(format!(
        "prewarm ({}) is larger than max_isolates ({}); lower prewarm or raise max_isolates",
        self.prewarm, self.max_isolates
      ));
    }
    if self.isolate_concurrency == 0 {
      return Err("isolate_concurrency must be at least 1".into());
    }
    Ok(())
  }
}

/// Service binding names are JS identifiers of letters, digits and `_`, as env names are.
pub fn check_binding_name(name: &str) -> Result<(), String> {
  let valid = !name.is_empty()
    && name.len() <= 128
    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    && !name.as_bytes()[0].is_ascii_digit();
  if valid {
    Ok(())
  } else {
    Err(format!(
      "{name:?} is not a binding name: use letters, digits and _, not starting with a digit (e.g. AUTH)"
    ))
  }
}

/// The one rule for function names, in the config file and the deploy API alike: a DNS
/// label (1 to 63 of a-z, 0-9 and -, not starting or ending with -), so a name can be a
/// host name part, a path segment and a metric label as it is.
pub fn check_function_name(name: &str) -> Result<(), String> {
  let valid = (1..=63).contains(&name.len())
    && name
      .bytes()
      .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    && !name.starts_with('-')
    && !name.ends_with('-');
  if valid {
    Ok(())
  } else {
    Err(format!(
      "{name:?} is not a valid function name: use 1 to 63 of a-z, 0-9 and -, not starting or ending with -"
    ))
  }
}

/// Turns byte spans of the config text into `file:line:col` errors; with the document, an
/// error is shown at the value of the key it names when the document has one.
struct Locator<'a> {
  file: &'a Path,
  text: &'a str,
  document: Option<&'a Document<'a>>,
}

impl Locator<'_> {
  /// The value of an optional table (its default when absent), with each of its problems
  /// reported at the table as `{key}.{field}`.
  fn table<T: Clone + Default, F: std::fmt::Display>(
    &self,
    table: &Option<Spanned<T>>,
    key: &str,
    problems: impl Fn(&T) -> Vec<(F, String)>,
    errors: &mut Vec<ConfigError>,
  ) -> T {
    let Some(table) = table else {
      return T::default();
    };
    for (field, message) in problems(table.get_ref()) {
      errors.push(self.error(table.span(), &format!("{key}.{field}"), message));
    }
    table.get_ref().clone()
  }

  /// The region hierarchy, with its problems (and a node region missing from it) reported
  /// at their spans.
  fn regions(
    &self,
    regions: &[Spanned<RegionConfig>],
    node: Option<&Spanned<NodeIdentity>>,
    errors: &mut Vec<ConfigError>,
  ) -> RegionTree {
    let plain: Vec<RegionConfig> = regions.iter().map(|r| r.get_ref().clone()).collect();
    let tree = match RegionTree::new(&plain) {
      Ok(tree) => tree,
      Err(problems) => {
        for problem in problems {
          let key = format!("regions[{}].{}", problem.index, problem.field);
          errors.push(self.error(regions[problem.index].span(), &key, problem.message));
        }
        return RegionTree::default();
      }
    };
    if let Some(node) = node
      && let Some(region) = &node.get_ref().region
      && !tree.is_empty()
      && !tree.contains(region)
    {
      errors.push(self.error(
        node.span(),
        "node.region",
        format!("region {region:?} is not declared in [[regions]]"),
      ));
    }
    tree
  }

  /// Errors for the problems [`Document`] found.
  fn problems(&self, problems: Vec<document::Problem>) -> Vec<ConfigError> {
    problems
      .into_iter()
      .map(|problem| self.error(problem.span, &problem.key, problem.message))
      .collect()
  }

  fn error(&self, span: Range<usize>, key: &str, message: String) -> ConfigError {
    let span = self
      .document
      .and_then(|document| document.value_span(key))
      .unwrap_or(span);
    let before = &self.text[..span.start.min(self.text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    ConfigError {
      file: self.file.to_path_buf(),
      line,
      column,
      key: key.into(),
      message,
    }
  }

  /// A key a table must have: reported as missing (at its table) unless it was there and
  /// taken out for a refused value, which was reported already.
  fn required<'v, T>(
    &self,
    value: &'v Option<Spanned<T>>,
    key: &str,
    example: &str,
    errors: &mut Vec<ConfigError>,
  ) -> Option<&'v Spanned<T>> {
    let removed = self.document.is_some_and(|document| document.removed(key));
    if value.is_none() && !removed {
      let table = key.rsplit_once('.').map_or("", |(table, _)| table);
      let span = self
        .document
        .and_then(|document| document.value_span(table))
        .unwrap_or(0..0);
      errors.push(self.error(span, key, format!("missing: add {example}")));
    }
    value.as_ref()
  }

  /// Resolves a path relative to the config directory and checks that it is a file.
  fn existing_file(
    &self,
    base: &Path,
    value: &Spanned<String>,
    key: &str,
    errors: &mut Vec<ConfigError>,
  ) -> Option<PathBuf> {
    let path = base.join(value.get_ref());
    if path.is_file() {
      Some(path)
    } else {
      errors.push(self.error(
        value.span(),
        key,
        format!(
          "file not found: {} (paths are relative to the config file)",
          path.display()
        ),
      ));
      None
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(Path::new("/nonexistent/outpost.toml"), text)
  }

  #[test]
  fn unknown_key_reports_line_and_column() {
    let err = parse("[[listen]]\naddress = \"127.0.0.1:1\"\nbogus = 1\n").unwrap_err();
    let e = &err.errors[0];
    assert_eq!((e.line, e.column), (3, 1), "{e}");
    assert!(e.message.contains("unknown field `bogus`"), "{e}");
  }

  #[test]
  fn all_semantic_errors_are_reported_at_once() {
    let text = r#"
[[listen]]
address = "not-an-address"

[[functions]]
name = "Bad Name"
entry = "missing.ts"
routes = []
pool = { prewarm = 5, max_isolates = 2 }
egress = { allow = ["api.example.com"], deny = ["not a host"] }
"#;
    let err = parse(text).unwrap_err();
    let keys: Vec<_> = err.errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
      keys,
      [
        "listen[0].address",
        "functions[0].name",
        "functions[0].entry",
        "functions[0].routes",
        "functions[0].egress.deny[0]",
        "functions[0].pool"
      ]
    );
    let address = &err.errors[0];
    assert_eq!((address.line, address.column), (3, 11), "{address}");
    assert!(
      err
        .to_string()
        .contains("outpost.toml:7:9: functions[0].entry: file not found")
    );
  }

  #[test]
  fn cache_sizes_and_an_exposed_admin_listener_are_checked() {
    let err = parse(
      "[cache]\nmax_bytes = \"1MiB\"\nmax_entry_bytes = \"2MiB\"\n\n[admin]\naddress = \"0.0.0.0:9901\"\n\n[[listen]]\naddress = \"127.0.0.1:0\"\n",
    )
    .unwrap_err();
    let keys: Vec<_> = err.errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["cache.max_entry_bytes", "admin.token"], "{err}");
    // Each at its key (admin.token is missing: at its table).
    assert_eq!((err.errors[0].line, err.errors[1].line), (3, 5), "{err}");
    let config = parse(
      "[cache]\nmax_bytes = \"64MiB\"\n\n[admin]\naddress = \"0.0.0.0:9901\"\ntoken = \"t\"\n\n[[listen]]\naddress = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    assert_eq!(config.cache.max_bytes.as_u64(), 64 << 20);
    assert_eq!(config.admin.unwrap().token.as_deref(), Some("t"));
  }

  #[test]
  fn a_header_limit_below_what_hyper_accepts_is_an_error() {
    let err = parse("[server]\nmax_header_bytes = 4096\n\n[[listen]]\naddress = \"127.0.0.1:0\"\n")
      .unwrap_err();
    assert_eq!(err.errors.len(), 1);
    assert_eq!(err.errors[0].key, "server.max_header_bytes");
    assert!(
      err.errors[0].message.contains("minimum of 8192"),
      "{}",
      err.errors[0]
    );
  }

  #[test]
  fn regions_and_overrides_are_validated_at_their_lines_and_applied() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.js"), "").unwrap();
    let path = dir.path().join("outpost.toml");
    let head = "[node]\npop = \"ams1\"\nregion = \"eu-west\"\n\n[[listen]]\naddress = \"127.0.0.1:0\"\n\n[[functions]]\nname = \"f\"\nentry = \"f.js\"\nroutes = [\"/\"]\nlimits = { cpu_ms = 40, wall_ms = 1000 }\n\n[[regions]]\nname = \"eu\"\n\n[[regions]]\nname = \"eu-west\"\nparent = \"eu\"\n";
    let bad = format!(
      "{head}\n[[regions]]\nname = \"us\"\nparent = \"americas\"\n\n[[overrides]]\nregion = \"asia\"\nfunction = \"f\"\n\n[[overrides]]\npop = \"ams1\"\nfunction = \"g\"\nlimits = {{ cpu_ms = 0 }}\n"
    );
    let err = Config::parse(&path, &bad).unwrap_err();
    let found: Vec<_> = err
      .errors
      .iter()
      .map(|e| (e.key.as_str(), e.line))
      .collect();
    assert_eq!(
      found,
      [
        // Each at its key's value.
        ("regions[2].parent", 23),
        ("overrides[0].region", 26),
        ("overrides[1].function", 31),
        ("overrides[1].limits.cpu_ms", 32),
      ],
      "{err}"
    );

    let good = format!(
      "{head}\n[[overrides]]\nregion = \"eu\"\nfunction = \"f\"\nenv = {{ GREETING = \"hello\", ORIGIN = \"eu.example\" }}\nlimits = {{ cpu_ms = 30 }}\n\n[[overrides]]\npop = \"ams1\"\nfunction = \"f\"\nenv = {{ GREETING = \"hallo\" }}\nenabled = false\ndisabled_status = 451\n"
    );
    let config = Config::parse(&path, &good).unwrap();
    let function = &config.functions[0];
    assert_eq!(function.env["GREETING"], "hallo");
    assert_eq!(function.env["ORIGIN"], "eu.example");
    assert_eq!(function.limits.cpu, std::time::Duration::from_millis(30));
    assert_eq!(function.limits.wall, std::time::Duration::from_millis(1000));
    assert_eq!(function.disabled, Some(451));
  }

  #[test]
  fn pop_tables_may_live_in_their_own_file_whose_errors_name_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.js"), "").unwrap();
    let path = dir.path().join("outpost.toml");
    let main = "geo_file = \"pop.toml\"\n\n[[listen]]\naddress = \"127.0.0.1:0\"\n\n[[functions]]\nname = \"f\"\nentry = \"f.js\"\nroutes = [\"/\"]\n";
    let pop = "[node]\npop = \"ams1\"\nregion = \"eu\"\n\n[[regions]]\nname = \"eu\"\n\n[[overrides]]\nregion = \"eu\"\nfunction = \"f\"\nenv = { GREETING = \"hallo\" }\n";
    std::fs::write(dir.path().join("pop.toml"), pop).unwrap();
    let config = Config::parse(&path, main).unwrap();
    assert_eq!(config.functions[0].env["GREETING"], "hallo");
    assert_eq!(config.node.as_ref().unwrap().pop, "ams1");
    assert_eq!(config.geo_file, Some(dir.path().join("pop.toml")));

    let broken = pop.replace("region = \"eu\"\nfunction", "region = \"us\"\nfunction");
    std::fs::write(dir.path().join("pop.toml"), broken).unwrap();
    let both = format!("{main}\n[[regions]]\nname = \"x\"\n");
    let err = Config::parse(&path, &both).unwrap_err();
    let found: Vec<_> = err
      .errors
      .iter()
      .map(|e| {
        (
          e.file.file_name().unwrap().to_str().unwrap(),
          e.key.as_str(),
          e.line,
        )
      })
      .collect();
    assert_eq!(
      found,
      [
        ("outpost.toml", "geo_file", 1),
        ("pop.toml", "overrides[0].region", 9)
      ],
      "{err}"
    );
  }

  #[test]
  fn node_identity_is_validated_and_reaches_handler_env() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.js"), "").unwrap();
    let path = dir.path().join("outpost.toml");
    let function = "[[functions]]\nname = \"f\"\nentry = \"f.js\"\nroutes = [\"/\"]\n";
    let listen = "[[listen]]\naddress = \"127.0.0.1:0\"\n";

    let bad = format!(
      "[node]\npop = \"AMS\"\nlatitude = 100.0\nlongitude = 4.9\n\n{listen}{function}env = {{ OUTPOST_POP = \"x\" }}\n"
    );
    let err = Config::parse(&path, &bad).unwrap_err();
    let keys: Vec<_> = err.errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
      keys,
      ["functions[0].env.OUTPOST_POP", "node.pop", "node.latitude"]
    );
    assert_eq!(
      (err.errors[1].line, err.errors[1].column),
      (2, 7),
      "{}",
      err.errors[1]
    );

    let good = format!(
      "[node]\npop = \"ams1\"\nregion = \"eu-west\"\n\n{listen}{function}env = {{ A = \"1\" }}\n"
    );
    let config = Config::parse(&path, &good).unwrap();
    let env = config.handler_env(&config.functions[0]);
    let env: Vec<_> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
      env,
      [
        ("A", "1"),
        ("OUTPOST_POP", "ams1"),
        ("OUTPOST_REGION", "eu-west")
      ]
    );
  }
}
