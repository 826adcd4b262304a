//! The HTTP front: listeners, TLS, hyper connections, and the request path
//!
//! TCP accept → rustls (SNI, ALPN) → hyper (HTTP/1.1, h2, h2c) → [`route`](Router::route)
//! by host and path → [`IsolatePool::dispatch`] to an isolate thread over a channel with a
//! oneshot reply → JS `fetch(request, env, ctx)` → response streamed back, compressed when
//! eligible.

use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use outpost_ext_dispatch::{
  Body, BoxError, DispatchRequest, FailureKind, OutboundTrace, full_body,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessRecord, MeteredBody, Observers};
use crate::admin::{self, Admin};
use crate::client_geo::{ClientGeo, LiveGeo};
use crate::compression;
use crate::config::{Config, FunctionConfig, ServerConfig};
use crate::deployments::Deployments;
use crate::edge_cache::SharedCache;
use crate::error::Error;
use crate::function_code::{FunctionCode, TranspileCache};
use crate::hop_by_hop;
use crate::isolate::{FunctionSpec, InFlightGuard, IsolateFactory};
use crate::limits::{Admission, Admitted, Limits};
use crate::metrics::{NodeMetrics, NodeReading};
use crate::pool::IsolatePool;
use crate::proxy_protocol;
use crate::route_cache;
use crate::router::Router;
use crate::tail::Tails;
use crate::tls;
use crate::trace_context::TraceContext;
use crate::usage_ledger::UsageLedger;
use arc_swap::ArcSwap;

/// Response header naming the request id on every response.
pub const REQUEST_ID_HEADER: &str = "outpost-request-id";
/// Response header set on responses Outpost generated itself, naming why.
pub const ERROR_HEADER: &str = "outpost-error";
/// Response header naming the limit that ended a request.
pub const TERMINATION_HEADER: &str = "outpost-termination";

/// What the process gives the node beyond its config.
#[derive(Default)]
pub struct NodeServices {
  /// Exports each request as a span (see `crate::otlp`).
  pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
  /// Function tails (`GET /functions/{name}/tail`), fed by the process's log.
  pub tails: Option<Tails>,
}

/// A running node: functions loaded, listeners bound.
pub struct Node {
  state: Arc<NodeState>,
  listeners: Vec<BoundListener>,
  /// The admin listener and its token, when `[admin]` is configured.
  admin: Option<(TcpListener, Option<String>)>,
  server: ServerConfig,
}

pub(crate) struct NodeState {
  /// The `[[functions]]` of the config file and their routes; replaced whole on reload.
  configured: ArcSwap<ConfiguredFunctions>,
  /// What reloads need to start functions and rebuild TLS.
  factory: Arc<IsolateFactory>,
  transpiler: Arc<TranspileCache>,
  /// The config file, re-read on reload (and for `[geo]` when its files change).
  config_file: Option<std::path::PathBuf>,
  /// The handler file and address of the single-handler default, re-read on reload.
  handler: Option<(std::path::PathBuf, SocketAddr)>,
  /// Each TLS listener's address and current certificates.
  tls: Vec<(SocketAddr, Arc<ArcSwap<rustls::ServerConfig>>)>,
  /// The `[[listen]]` addresses the node was started with.
  listen: Vec<SocketAddr>,
  admission: Admission,
  pub(crate) compression: bool,
  /// Whether 5xx bodies carry load errors and handler stacks (`server.error_details`).
  error_details: bool,
  /// Most header lines a request may have (`server.max_headers`).
  max_headers: usize,
  max_body_bytes: u64,
  pub(crate) request_ids: RequestIds,
  /// The shared cache: the Cache API's and route caching's.
  pub(crate) cache: Arc<SharedCache>,
  /// URLs (by namespace) whose cached response is being refreshed in the background.
  pub(crate) revalidating: std::sync::Mutex<std::collections::HashSet<String>>,
  /// Trusted peers, geo headers and MaxMind databases; replaced on reload.
  geo: Arc<LiveGeo>,
  /// This node's PoP: `request.cf.colo`.
  pop: Option<String>,
  /// Metrics and usage, fed by every request's access record.
  pub(crate) observers: Arc<Observers>,
  /// Set once shutdown has begun: `/readyz` answers 503 while connections drain.
  pub(crate) draining: AtomicBool,
  /// Functions deployed through the admin API, when `[admin] data_dir` is set.
  pub(crate) deployments: Option<Arc<Deployments>>,
  /// Live tails of functions' access records and console output.
  pub(crate) tails: Option<Tails>,
}

impl NodeState {
  /// The function for `host` + `path`: a `[[functions]]` route first, then a deployed one.
  fn route(
    &self,
    host: &str,
    path: &str,
    headers: &http::HeaderMap,
  ) -> Option<Arc<RoutedFunction>> {
    let configured = self.configured.load();
    if let Some(index) = configured.router.route(host, path) {
      return configured.functions.get(index).cloned();
    }
    self.deployments.as_ref()?.route(host, path, headers)
  }

  /// The names of the `[[functions]]` of the config file.
  pub(crate) fn configured_names(&self) -> Vec<String> {
    let configured = self.configured.load();
    configured
      .functions
      .iter()
      .map(|f| f.name().to_string())
      .collect()
  }

  /// Warnings for the routes of deployed function `name` that a configured route, matched
  /// first, takes every request of: through them the function serves nothing. (Routes that
  /// share some requests with configured ones are ordinary routing and not warned about.)
  pub(crate) fn shadowed_routes(&self, name: &str) -> Vec<String> {
    use crate::router::{Overlap, RoutePattern};
    let Some(routes) = self.deployments.as_ref().and_then(|d| d.routes_of(name)) else {
      return Vec::new();
    };
    let configured = self.configured.load();
    let mut warnings = Vec::new();
    for route in routes {
      let Ok(deployed) = RoutePattern::parse(&route) else {
        continue;
      };
      for (pattern, index) in configured.router.patterns() {
        let owner = configured.functions.get(*index).map_or("?", |f| f.name());
        if pattern.overlap(&deployed) != Overlap::All {
          continue;
        }
        let warning = format!(
          "route {route:?} is shadowed by route \"{pattern}\" of configured function {owner:?}, which is matched first: no request reaches {name:?} through it"
        );
        tracing::warn!(function = name, "{warning}");
        warnings.push(warning);
      }
    }
    warnings
  }

  /// The function called `name` (for a deployed one with a split, the version for a request
  /// with `headers`): what a service binding calls.
  fn function_named(&self, name: &str, headers: &http::HeaderMap) -> Option<Arc<RoutedFunction>> {
    let configured = self.configured.load();
    if let Some(function) = configured.functions.iter().find(|f| f.name() == name) {
      return Some(function.clone());
    }
    self.deployments.as_ref()?.named(name, headers)
  }

  /// Every function that serves: the configured ones and each serving deployed version.
  fn serving(&self) -> Vec<Arc<RoutedFunction>> {
    let mut serving = self.configured.load().functions.clone();
    if let Some(deployments) = &self.deployments {
      serving.extend(deployments.serving());
    }
    serving
  }

  /// What a metrics scrape reads from the node now.
  pub(crate) fn reading(&self) -> NodeReading {
    // Isolates per function name: the versions of a deployed function add up.
    let mut isolates = std::collections::BTreeMap::<String, (usize, usize)>::new();
    let mut in_flight = 0;
    for function in self.serving() {
      let (idle, busy) = function.pool.isolate_counts();
      let counts = isolates.entry(function.name().to_string()).or_default();
      counts.0 += idle;
      counts.1 += busy;
      in_flight += function.pool.in_flight();
    }
    NodeReading {
      isolates: isolates
        .into_iter()
        .map(|(name, (idle, busy))| (name, idle, busy))
        .collect(),
      queued: self.admission.waiting(),
      in_flight,
      cache: self
        .cache
        .stats()
        .into_iter()
        .map(|(namespace, stats)| (namespace.0.to_string(), stats))
        .collect(),
    }
  }
}

struct BoundListener {
  listener: TcpListener,
  /// The certificates, replaced on reload: each handshake uses those current at its start.
  tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
  /// Connections start with a PROXY protocol header.
  proxy_protocol: bool,
}

/// A bound listener's address and whether it speaks TLS.
#[derive(Debug, Clone, Copy)]
pub struct ListenerInfo {
  pub address: SocketAddr,
  pub tls: bool,
}

impl Node {
  /// Loads every function (pre-warming its isolates) and binds every listener.
  pub async fn start(config: &Config) -> Result<Node, Error> {
    Node::start_with(config, NodeServices::default()).await
  }

  /// As [`Node::start`], with what the process wired up around the node.
  pub async fn start_with(config: &Config, services: NodeServices) -> Result<Node, Error> {
    let NodeServices { tracer, tails } = services;
    let transpiler = Arc::new(TranspileCache::default());
    // Isolates are created before their function is known, with the largest heap any
    // function may use; smaller limits are checked per function.
    let max_heap = config
      .functions
      .iter()
      .map(|f| f.limits.memory)
      .max()
      .unwrap_or(Limits::DEFAULT_MEMORY_MB * 1024 * 1024);
    let cache = Arc::new(SharedCache::from_config(&config.cache));
    let services = Arc::new(ServiceCalls::default());
    let factory = IsolateFactory::new(&config.server, max_heap, cache.clone(), services.clone())?;
    let deployments = match config.admin.as_ref().and_then(|a| a.data_dir.as_ref()) {
      None => None,
      Some(dir) => Some(
        Deployments::open(
          dir,
          Arc::new(config.clone()),
          factory.clone(),
          transpiler.clone(),
        )
        .await
        .map_err(|err| Error::Deployments(err.to_string()))?,
      ),
    };
    let configured = ConfiguredFunctions::start(config, &factory, &transpiler).await?;
    // Listen only once the spares exist, so the first new isolate never waits for one.
    factory.spares_settled().await;

    let mut listeners = Vec::new();
    let mut tls_listeners = Vec::new();
    for listener in &config.listeners {
      let tls = if listener.tls.is_empty() {
        None
      } else {
        let config = tls::server_config(&listener.tls).map_err(|source| Error::Listener {
          address: listener.address,
          source: Box::new(source),
        })?;
        let live = Arc::new(ArcSwap::new(config));
        tls_listeners.push((listener.address, live.clone()));
        Some(live)
      };
      let bound = TcpListener::bind(listener.address)
        .await
        .map_err(|source| Error::Bind {
          address: listener.address,
          source,
        })?;
      listeners.push(BoundListener {
        listener: bound,
        tls,
        proxy_protocol: listener.proxy_protocol,
      });
    }
    let geo = Arc::new(LiveGeo::new(ClientGeo::open(config)?));
    let admin = match &config.admin {
      None => None,
      Some(admin) => {
        let listener = TcpListener::bind(admin.address)
          .await
          .map_err(|source| Error::Bind {
            address: admin.address,
            source,
          })?;
        Some((listener, admin.token.clone()))
      }
    };
    let state = Arc::new(NodeState {
      configured: ArcSwap::from_pointee(configured),
      factory,
      transpiler,
      config_file: config.file.clone(),
      handler: config.handler.clone(),
      tls: tls_listeners,
      listen: config.listeners.iter().map(|l| l.address).collect(),
      admission: Admission::new(
        config.server.max_in_flight,
        config.server.queue_depth,
        Duration::from_millis(config.server.queue_timeout_ms),
      ),
      compression: config.server.compression,
      error_details: config.server.error_details,
      max_headers: config.server.max_headers,
      max_body_bytes: config.server.max_body_bytes,
      request_ids: RequestIds::new(),
      cache,
      revalidating: std::sync::Mutex::default(),
      geo: geo.clone(),
      pop: config.node.as_ref().map(|node| node.pop.clone()),
      observers: Arc::new(Observers {
        metrics: NodeMetrics::new(env!("CARGO_PKG_VERSION"), &config_hash(config)),
        usage: UsageLedger::default(),
        tracer,
      }),
      draining: AtomicBool::new(false),
      deployments,
      tails,
    });
    let _ = services.node.set(Arc::downgrade(&state));
    Ok(Node {
      admin,
      state,
      listeners,
      server: config.server.clone(),
    })
  }

  /// The admin listener's address, when there is one.
  pub fn admin_address(&self) -> Option<SocketAddr> {
    self.admin.as_ref()?.0.local_addr().ok()
  }

  pub fn listeners(&self) -> Vec<ListenerInfo> {
    self
      .listeners
      .iter()
      .filter_map(|l| {
        Some(ListenerInfo {
          address: l.listener.local_addr().ok()?,
          tls: l.tls.is_some(),
        })
      })
      .collect()
  }

  /// Serves until `shutdown` resolves; then stops accepting, lets in-flight requests finish
  /// within the grace period, and returns.
  pub async fn run(self, shutdown: impl Future<Output = ()>) {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let settings = Arc::new(ConnectionSettings::new(&self.server));
    let mut accept_loops = Vec::new();
    for listener in self.listeners {
      accept_loops.push(tokio::spawn(accept_loop(
        listener,
        self.state.clone(),
        settings.clone(),
        connections.clone(),
        stop.clone(),
      )));
    }
    let evictor = tokio::spawn(evict_idle_isolates(self.state.clone()));
    // The admin listener outlives the drain, so `/readyz` can say the node is draining.
    let admin_stop = CancellationToken::new();
    if let Some((listener, token)) = self.admin {
      let admin = Arc::new(Admin {
        node: self.state.clone(),
        token,
      });
      tokio::spawn(admin::serve(listener, admin, admin_stop.clone()));
    }
    if let Some(file) = self.state.config_file.clone() {
      tokio::spawn(self.state.geo.clone().watch(file, stop.clone()));
    }
    // Also without a config file: SIGHUP then re-reads the handler file (and never ends the
    // process, as its default action would).
    tokio::spawn(reload_on_hangup(self.state.clone(), stop.clone()));
    shutdown.await;
    self.state.draining.store(true, Ordering::Relaxed);
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    // Every connection is told to finish what it has and close.
    stop.cancel();
    for accept_loop in accept_loops {
      let _ = accept_loop.await;
    }
    tracing::info!("listeners closed: new connections are refused");
    evictor.abort();
    connections.close();
    match tokio::time::timeout(
      Duration::from_secs(self.server.shutdown_grace_s),
      connections.wait(),
    )
    .await
    {
      Ok(()) => tracing::info!("all connections closed"),
      Err(_) => tracing::warn!(
        grace_s = self.server.shutdown_grace_s,
        "grace period over; closing the remaining connections"
      ),
    }
    for function in self.state.serving() {
      function.pool.close();
    }
    admin_stop.cancel();
  }
}

/// A short hash of the config file's text (`outpost_build_info`'s `config_hash`), so a
/// fleet's scrapes show which nodes run which config.
fn config_hash(config: &Config) -> String {
  use sha2::Digest;
  let Some(text) = config
    .file
    .as_ref()
    .and_then(|file| std::fs::read(file).ok())
  else {
    return "none".into();
  };
  let digest = sha2::Sha256::digest(&text);
  digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// How every connection is served: the hyper builder with the protocol limits of
/// `[server]`, and the timeouts hyper does not keep itself.
struct ConnectionSettings {
  builder: auto::Builder<TokioExecutor>,
  /// Bounds the TLS handshake as hyper bounds the request head.
  handshake_timeout: Duration,
  idle_timeout: Duration,
}

impl ConnectionSettings {
  fn new(server: &ServerConfig) -> ConnectionSettings {
    ConnectionSettings {
      builder: connection_builder(server),
      handshake_timeout: Duration::from_millis(server.header_read_timeout_ms),
      idle_timeout: Duration::from_millis(server.idle_timeout_ms),
    }
  }
}

/// HTTP/1.1 and HTTP/2 settings, with the protocol limits of `[server]`.
fn connection_builder(server: &ServerConfig) -> auto::Builder<TokioExecutor> {
  let mut builder = auto::Builder::new(TokioExecutor::new());
  // hyper refuses more header lines than this itself (a bare 431, recorded from the
  // connection's error); up to it, requests over `max_headers` get Outpost's own 431. At
  // most 100 lines are parsed without a heap allocation per request.
  builder
    .http1()
    .timer(hyper_util::rt::TokioTimer::new())
    .header_read_timeout(Duration::from_millis(server.header_read_timeout_ms))
    .max_buf_size(server.max_header_bytes)
    .max_headers(server.max_headers.max(100));
  builder
    .http2()
    .timer(hyper_util::rt::TokioTimer::new())
    .max_header_list_size(u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX))
    .max_concurrent_streams(server.h2_max_concurrent_streams)
    .max_pending_accept_reset_streams(server.h2_max_pending_resets);
  builder
}

async fn accept_loop(
  listener: BoundListener,
  state: Arc<NodeState>,
  settings: Arc<ConnectionSettings>,
  connections: TaskTracker,
  stop: CancellationToken,
) {
  let scheme = if listener.tls.is_some() {
    "https"
  } else {
    "http"
  };
  loop {
    let (stream, peer) = tokio::select! {
      accepted = listener.listener.accept() => match accepted {
        Ok(accepted) => accepted,
        Err(err) => {
          // Typically EMFILE: back off instead of spinning.
          tracing::warn!(error = %err, "accept failed");
          tokio::time::sleep(Duration::from_millis(50)).await;
          continue;
        }
      },
      () = stop.cancelled() => return,
    };
    let _ = stream.set_nodelay(true);
    let tls = listener
      .tls
      .as_ref()
      .map(|tls| TlsAcceptor::from(tls.load_full()));
    let connection = serve_connection(
      stream,
      peer,
      listener.proxy_protocol,
      tls,
      state.clone(),
      scheme,
      settings.clone(),
      stop.clone(),
    );
    connections.spawn(async move {
      if let Err(err) = connection.await {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
      }
    });
  }
}

/// One connection, from the TLS handshake to its close: when the peer closes it, when it has
/// been idle (no request in flight) for the idle timeout, or at shutdown once its requests
/// are answered.
#[allow(clippy::too_many_arguments, reason = "one connection's whole setting")]
async fn serve_connection(
  mut stream: TcpStream,
  mut peer: SocketAddr,
  proxy_protocol: bool,
  tls: Option<TlsAcceptor>,
  state: Arc<NodeState>,
  scheme: &'static str,
  settings: Arc<ConnectionSettings>,
  stop: CancellationToken,
) -> Result<(), BoxError> {
  if proxy_protocol {
    // Bounded like the TLS handshake; a connection without a valid header is closed.
    let header = tokio::time::timeout(
      settings.handshake_timeout,
      proxy_protocol::read_header(&mut stream),
    );
    match header.await {
      Ok(Ok(Some(client))) => peer = client,
      Ok(Ok(None)) => {}
      Ok(Err(err)) => {
        tracing::warn!(%peer, error = %err, "closing a connection with a malformed PROXY header");
        return Ok(());
      }
      Err(_) => {
        tracing::warn!(%peer, "closing a connection that sent no PROXY header in time");
        return Ok(());
      }
    }
  }
  let stream = match tls {
    None => Either::Left(stream),
    Some(acceptor) => {
      let handshake = tokio::time::timeout(settings.handshake_timeout, acceptor.accept(stream));
      match handshake.await {
        Ok(Ok(stream)) => Either::Right(stream),
        Ok(Err(err)) => return Err(format!("TLS handshake failed: {err}").into()),
        Err(_) => return Err("TLS handshake timed out".into()),
      }
    }
  };
  let activity = Arc::new(ConnectionActivity::new());
  let service_activity = activity.clone();
  let refusals = state.clone();
  let service = hyper::service::service_fn(move |request| {
    let state = state.clone();
    let active = service_activity.begin();
    let origin = Origin { scheme, peer };
    async move { Ok::<_, Infallible>(handle_request(&state, request, origin, active).await) }
  });
  let connection = settings
    .builder
    .serve_connection(TokioIo::new(stream), service);
  tokio::pin!(connection);
  let mut closing = false;
  loop {
    tokio::select! {
      result = connection.as_mut() => {
        if let Err(err) = &result {
          record_refusal(&refusals, peer, err.as_ref());
        }
        return result;
      }
      () = stop.cancelled(), if !closing => {
        connection.as_mut().graceful_shutdown();
        closing = true;
      }
      () = activity.idle_for(settings.idle_timeout), if !closing => {
        connection.as_mut().graceful_shutdown();
        closing = true;
      }
    }
  }
}

/// Gives a request that hyper refused before it reached Outpost (a head it could not
/// parse: 400, or too large, or with too many lines: 431) an access record and a request id,
/// as every other answer has. hyper wrote the response itself, without the id header.
fn record_refusal(state: &NodeState, peer: SocketAddr, err: &(dyn std::error::Error + 'static)) {
  let Some(err) = err.downcast_ref::<hyper::Error>() else {
    return;
  };
  let (status, reason) = if err.is_parse_too_large() {
    (431, "headers-too-large")
  } else if err.is_parse() {
    (400, "bad-request")
  } else {
    return;
  };
  let request_id = state.request_ids.next();
  tracing::info!(request_id, %peer, error = %err, "request refused by the HTTP parser");
  let access = AccessRecord::new(state.observers.clone(), &request_id, "", "", "");
  drop(access.respond(status, Some(reason), full_body(Bytes::new())));
}

/// How many requests a connection has in flight, and since when it has had none.
pub(crate) struct ConnectionActivity {
  in_flight: AtomicUsize,
  idle_since: std::sync::Mutex<tokio::time::Instant>,
  became_idle: Notify,
}

impl ConnectionActivity {
  pub(crate) fn new() -> ConnectionActivity {
    ConnectionActivity {
      in_flight: AtomicUsize::new(0),
      idle_since: std::sync::Mutex::new(tokio::time::Instant::now()),
      became_idle: Notify::new(),
    }
  }

  /// Counts a request as in flight until the returned guard is dropped.
  pub(crate) fn begin(self: &Arc<Self>) -> ActiveRequest {
    self.in_flight.fetch_add(1, Ordering::Relaxed);
    ActiveRequest(self.clone())
  }

  /// Resolves once the connection has had no request in flight for `timeout`.
  async fn idle_for(&self, timeout: Duration) {
    loop {
      let became_idle = self.became_idle.notified();
      if self.in_flight.load(Ordering::Relaxed) > 0 {
        became_idle.await;
        continue;
      }
      let deadline = *self.idle_since.lock().expect("activity lock") + timeout;
      if tokio::time::Instant::now() >= deadline {
        return;
      }
      // Requests that come and go meanwhile move `idle_since`: look again at the deadline.
      tokio::time::sleep_until(deadline).await;
    }
  }
}

/// A request in flight on a connection (see [`ConnectionActivity`]).
pub(crate) struct ActiveRequest(Arc<ConnectionActivity>);

impl Drop for ActiveRequest {
  fn drop(&mut self) {
    if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
      *self.0.idle_since.lock().expect("activity lock") = tokio::time::Instant::now();
      self.0.became_idle.notify_waiters();
    }
  }
}

/// Checks for idle isolates at half the shortest idle timeout (between 250 ms and 5 s), so
/// an isolate is evicted at most half a timeout late.
async fn evict_idle_isolates(state: Arc<NodeState>) {
  let shortest = state
    .serving()
    .iter()
    .map(|f| f.pool.idle_timeout())
    .min()
    .unwrap_or(Duration::from_secs(10));
  let period = (shortest / 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
  let mut interval = tokio::time::interval(period);
  loop {
    interval.tick().await;
    for function in state.serving() {
      function.pool.evict_idle();
    }
  }
}

/// One request, from routing to the response the client gets.
async fn handle_request(
  state: &Arc<NodeState>,
  request: Request<Incoming>,
  origin: Origin,
  active: ActiveRequest,
) -> Response<MeteredBody> {
  let request_id = state.request_ids.next();
  // The host the client named: the :authority (HTTP/2, absolute-form) or the Host header.
  let authority = request
    .uri()
    .authority()
    .map(|a| a.as_str().to_string())
    .or_else(|| {
      request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
    });
  let access = AccessRecord::new(
    state.observers.clone(),
    &request_id,
    authority.as_deref().unwrap_or(""),
    request.method().as_str(),
    request.uri().path(),
  );
  let is_head = request.method() == Method::HEAD;
  let mut response = dispatch(state, request, authority, origin, &access, active).await;
  if is_head {
    response = without_body(response);
  }
  if let Ok(value) = HeaderValue::from_str(&request_id) {
    response.headers_mut().insert(REQUEST_ID_HEADER, value);
  }
  let status = response.status().as_u16();
  let error = outpost_error(&response).map(str::to_string);
  response.map(|body| access.respond(status, error.as_deref(), body))
}

/// The response to a HEAD request: the head a GET would get, `Content-Length` included when
/// the body's length is known, and no body. hyper's HTTP/2 server does not know the request
/// method and would send the body as DATA frames, which clients refuse with a stream reset
/// (RFC 9110 §9.3.2: a HEAD response has no content); HTTP/1.1 drops the body itself.
fn without_body(response: Response<Body>) -> Response<Body> {
  let (mut parts, body) = response.into_parts();
  let bodiless = parts.status.is_informational()
    || parts.status == StatusCode::NO_CONTENT
    || parts.status == StatusCode::NOT_MODIFIED;
  if !bodiless
    && !parts.headers.contains_key(http::header::CONTENT_LENGTH)
    && let Some(length) = http_body::Body::size_hint(&body).exact()
  {
    parts
      .headers
      .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
  }
  // Dropping the body ends what produces it (the handler's stream, the request's guards).
  drop(body);
  Response::from_parts(parts, full_body(Bytes::new()))
}

/// Why Outpost answered a request itself (its `outpost-termination` or `outpost-error`
/// header), when it did.
pub(crate) fn outpost_error<B>(response: &Response<B>) -> Option<&str> {
  let headers = response.headers();
  headers
    .get(TERMINATION_HEADER)
    .or_else(|| headers.get(ERROR_HEADER))
    .and_then(|v| v.to_str().ok())
}

/// Where a request came in: the listener's scheme and the connecting peer.
#[derive(Debug, Clone, Copy)]
struct Origin {
  scheme: &'static str,
  peer: SocketAddr,
}

async fn dispatch(
  state: &Arc<NodeState>,
  request: Request<Incoming>,
  authority: Option<String>,
  origin: Origin,
  access: &Arc<AccessRecord>,
  active: ActiveRequest,
) -> Response<Body> {
  let scheme = origin.scheme;
  let Some(authority) = authority else {
    return outpost_response(
      StatusCode::BAD_REQUEST,
      "missing-host",
      "outpost: the request has no Host header or :authority\n".into(),
    );
  };
  if request.headers().len() > state.max_headers {
    return outpost_response(
      StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
      "too-many-headers",
      format!(
        "outpost: the request has {} header lines; this node accepts at most {} (server.max_headers)\n",
        request.headers().len(),
        state.max_headers
      ),
    );
  }
  let path = request.uri().path();
  let Some(function) = state.route(&authority, path, request.headers()) else {
    return outpost_response(
      StatusCode::NOT_FOUND,
      "no-route",
      format!("outpost: no function is routed for {authority}{path}\n"),
    );
  };
  access.set_function(function.name(), function.version());
  if let Some(status) = function.disabled {
    return outpost_response(
      status,
      "disabled-here",
      format!(
        "outpost: function {:?} is switched off at this PoP\n",
        function.name()
      ),
    );
  }
  let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
  let url = format!("{scheme}://{authority}{path_and_query}");

  let (parts, body) = request.into_parts();
  let mut headers = parts.headers;
  hop_by_hop::strip_request(&mut headers);
  // HTTP/2 carries the host as :authority; handlers read it as `host` either way.
  if !headers.contains_key(http::header::HOST)
    && let Ok(host) = HeaderValue::from_str(&authority)
  {
    headers.insert(http::header::HOST, host);
  }
  // The client's address and place; spoofed geo headers from untrusted peers go here.
  let geo = state.geo.current();
  let mut cf = geo
    .config
    .client(origin.peer.ip(), &mut headers, geo.databases.as_ref())
    .fields;
  if let Some(pop) = &state.pop {
    cf.push(("colo", pop.clone()));
  }
  let declared_length = headers
    .get(http::header::CONTENT_LENGTH)
    .and_then(|v| v.to_str().ok())
    .and_then(|v| v.parse::<u64>().ok());
  if declared_length.is_some_and(|length| length > state.max_body_bytes) {
    return body_too_large(state.max_body_bytes);
  }
  let body_exceeded = Arc::new(AtomicBool::new(false));
  let body = if http_body::Body::is_end_stream(&body) {
    None
  } else {
    let limited = LimitedBody {
      inner: body,
      remaining: state.max_body_bytes,
      exceeded: body_exceeded.clone(),
      read: access.bytes_in.clone(),
    };
    Some(limited.boxed_unsync())
  };
  let trace = TraceContext::from_headers(&headers);
  access.set_trace(&trace);
  let call = FunctionCall {
    function,
    trace,
    encoding: compression::negotiate(&headers),
    method: parts.method,
    url,
    headers,
    body,
    body_exceeded,
    access: access.clone(),
    active,
    cf,
  };
  if call.function.route_cache && (call.method == Method::GET || call.method == Method::HEAD) {
    route_cache::serve(state, call).await
  } else {
    call_function(state, call, None).await
  }
}

/// A request on its way into a function.
pub(crate) struct FunctionCall {
  /// The function (the version of it, for deployed functions) that answers.
  pub(crate) function: Arc<RoutedFunction>,
  /// Where the request is in its trace; outbound fetches continue it.
  pub(crate) trace: TraceContext,
  /// How the response may be compressed for this client.
  pub(crate) encoding: Option<compression::Encoding>,
  pub(crate) method: Method,
  /// The full URL the client asked for.
  pub(crate) url: String,
  /// The request headers, hop-by-hop ones removed.
  pub(crate) headers: http::HeaderMap,
  pub(crate) body: Option<Body>,
  /// Set when the request body grew past `server.max_body_bytes` while streaming.
  pub(crate) body_exceeded: Arc<AtomicBool>,
  /// The request's access record; its id is the request id.
  pub(crate) access: Arc<AccessRecord>,
  pub(crate) active: ActiveRequest,
  /// `request.cf` fields.
  pub(crate) cf: Vec<(&'static str, String)>,
}

impl FunctionCall {
  /// The request's head as the cache sees it: method, URL and headers.
  pub(crate) fn cache_request(&self) -> http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = self.method.clone();
    if let Ok(uri) = self.url.parse() {
      head.uri = uri;
    }
    head.headers = self.headers.clone();
    head
  }
}

/// Hands a request to its function and turns what comes back into the response: the
/// function's own (handed to `store` before it is compressed, when route caching may keep
/// it), or one Outpost makes when a limit or a failure ended the request.
pub(crate) async fn call_function(
  state: &NodeState,
  call: FunctionCall,
  store: Option<route_cache::ResponseStore>,
) -> Response<Body> {
  let FunctionCall {
    function,
    trace,
    encoding,
    method,
    url,
    headers,
    body,
    body_exceeded,
    access,
    active,
    cf,
  } = call;
  let request_id = access.request_id();
  let is_head = method == Method::HEAD;
  let RoutedFunction {
    pool,
    limits,
    slots,
    ..
  } = &*function;
  // The wall-clock limit covers everything from here on, the response body included.
  let deadline = tokio::time::Instant::now() + limits.wall;
  let admitted = match state.admission.admit(slots).await {
    Ok(admitted) => admitted,
    Err(rejection) => {
      tracing::warn!(request_id, function = pool.name(), ?rejection, "overloaded");
      let mut response = outpost_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        format!(
          "outpost: function {:?} is at its concurrency limit; retry shortly\n",
          pool.name()
        ),
      );
      response
        .headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
      return response;
    }
  };
  let cancel = CancellationToken::new();
  // Ends the request on the isolate's side (body streaming, `request.signal`) when this call
  // is dropped: the client went away, a limit ended it, or its response was sent.
  let cancel_on_drop = cancel.clone().drop_guard();
  let finished = Arc::new(AtomicBool::new(false));
  let (reply, replied) = oneshot::channel();
  let dispatched = pool.dispatch(DispatchRequest {
    method,
    url,
    headers,
    body,
    cancel,
    finished: finished.clone(),
    reply,
    usage: Arc::new(access.usage()),
    cf,
    trace: Some(OutboundTrace {
      traceparent: trace.outbound_traceparent(),
      tracestate: trace.tracestate,
    }),
  });
  let in_flight = match tokio::time::timeout_at(deadline, dispatched).await {
    Err(_) => return wall_time_exceeded(pool.name(), limits.wall),
    Ok(Ok(guard)) => {
      access.set_cold(guard.first());
      guard
    }
    Ok(Err(err)) => {
      tracing::warn!(request_id, function = pool.name(), error = %err, "function unavailable");
      // The reason names server paths and source lines: it stays in the log unless the
      // node shows error details (`server.error_details`, for development).
      let details = if state.error_details {
        format!(": {err}")
      } else {
        "; the reason is in the server log".into()
      };
      return outpost_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "function-unavailable",
        format!(
          "outpost: function {:?} is unavailable (request id {request_id}){details}\n",
          pool.name()
        ),
      );
    }
  };
  let Ok(replied) = tokio::time::timeout_at(deadline, replied).await else {
    // Dropping the guard cancels the request's token: body streaming stops.
    drop(cancel_on_drop);
    tracing::warn!(
      request_id,
      function = pool.name(),
      "wall-clock limit reached"
    );
    return wall_time_exceeded(pool.name(), limits.wall);
  };
  // A body that outgrew the limit while streaming (no or a false Content-Length) makes the
  // answer 413, whatever the handler made of the failed read.
  if body_exceeded.load(Ordering::Relaxed) {
    return body_too_large(state.max_body_bytes);
  }
  match replied {
    Ok(Ok(mut response)) => {
      hop_by_hop::strip_response(response.headers_mut());
      // Framing is ours: hyper derives Content-Length from the body (exact for inline
      // bodies, also for HEAD) or streams it chunked. A handler's own value could contradict
      // the body and break the connection.
      response.headers_mut().remove(http::header::CONTENT_LENGTH);
      if let Some(store) = store {
        response = store.keep(response);
      }
      if state.compression {
        compression::compress_response(&mut response, encoding, is_head);
      }
      response.map(|body| {
        GuardedBody {
          inner: body,
          finished,
          deadline: Box::pin(tokio::time::sleep_until(deadline)),
          _active: active,
          _in_flight: in_flight,
          _admitted: admitted,
          _cancel_on_drop: cancel_on_drop,
        }
        .boxed_unsync()
      })
    }
    Ok(Err(failure)) => {
      let what = match failure.kind {
        FailureKind::Exception => "threw an exception",
        FailureKind::NotAResponse => "did not return a Response",
      };
      tracing::error!(
        request_id,
        function = pool.name(),
        "handler {what}: {}",
        failure.detail
      );
      let details = if state.error_details {
        format!(":\n{}", failure.detail)
      } else {
        "; the stack is in the server log".into()
      };
      outpost_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "handler-error",
        format!(
          "outpost: function {:?} {what} (request id {request_id}){details}\n",
          pool.name()
        ),
      )
    }
    Err(_) if let Some(used) = in_flight.isolate().terminated_for_cpu() => {
      // Every request in flight on an isolate terminated for CPU ends here: JS cannot be
      // stopped for one request only.
      tracing::warn!(
        request_id,
        function = pool.name(),
        cpu_limit = ?limits.cpu,
        cpu_used = ?used,
        "isolate terminated: CPU limit"
      );
      termination_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "cpu-limit",
        format!(
          "outpost: function {:?} ran past its CPU limit of {:?} (terminated after {} us of CPU); its isolate was discarded (request id {request_id})\n",
          pool.name(),
          limits.cpu,
          used.as_micros()
        ),
      )
    }
    Err(_) if in_flight.isolate().terminated_for_memory() => {
      tracing::warn!(
        request_id,
        function = pool.name(),
        "isolate terminated: memory limit"
      );
      termination_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "memory-limit",
        format!(
          "outpost: function {:?} ran past its memory limit; its isolate was discarded (request id {request_id})\n",
          pool.name()
        ),
      )
    }
    Err(_) => {
      tracing::error!(
        request_id,
        function = pool.name(),
        "the isolate stopped before answering"
      );
      outpost_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "isolate-stopped",
        format!("outpost: the isolate stopped before answering (request id {request_id})\n"),
      )
    }
  }
}

/// The functions of the config file, routed.
struct ConfiguredFunctions {
  router: Router,
  functions: Vec<Arc<RoutedFunction>>,
}

impl ConfiguredFunctions {
  /// Starts every `[[functions]]` entry's pool (pre-warmed) and builds their router.
  async fn start(
    config: &Config,
    factory: &Arc<IsolateFactory>,
    transpiler: &Arc<TranspileCache>,
  ) -> Result<ConfiguredFunctions, Error> {
    let mut starts = Vec::new();
    for function in &config.functions {
      let code = FunctionCode::new(&function.name, &function.entry, transpiler.clone()).map_err(
        |source| Error::Entry {
          function: function.name.clone(),
          entry: function.entry.display().to_string(),
          source,
        },
      )?;
      let spec = FunctionSpec::new(config, function, code);
      starts.push(IsolatePool::start(
        factory.clone(),
        spec,
        function.pool.clone(),
      ));
    }
    let pools = futures::future::join_all(starts).await;
    let functions = pools
      .into_iter()
      .zip(&config.functions)
      .map(|(pool, function)| Arc::new(RoutedFunction::new(pool, function, None)))
      .collect();
    let router = Router::new(
      config
        .functions
        .iter()
        .enumerate()
        .flat_map(|(index, f)| f.routes.iter().map(move |r| (r.clone(), index))),
    );
    Ok(ConfiguredFunctions { router, functions })
  }

  /// `function "name": reason` for every function whose module does not load.
  fn load_errors(&self) -> Vec<String> {
    self
      .functions
      .iter()
      .filter_map(|f| {
        let error = f.pool.load_error()?;
        Some(format!("function {:?} does not load: {error}", f.name()))
      })
      .collect()
  }
}

/// Re-reads the config file and applies what can change while serving: the functions of
/// `[[functions]]` (new pools are warmed before they take traffic; requests in flight finish
/// on the old ones), listeners' certificates (new handshakes use them; open connections keep
/// theirs) and `[geo]`. Nothing changes unless all of it loads. Returns notes on changes
/// that need a restart.
pub(crate) async fn reload(state: &NodeState, trigger: &str) -> Result<Vec<String>, String> {
  let config = match (&state.config_file, &state.handler) {
    (Some(file), _) => Config::load(file),
    (None, Some((entry, address))) => Config::single_handler(entry, *address),
    (None, None) => return Err("this node has no config file or handler file to reload".into()),
  }
  .map_err(|errors| errors.to_string())?;
  let geo = ClientGeo::open(&config).map_err(|err| err.to_string())?;
  let mut notes = Vec::new();
  let mut certificates = Vec::new();
  for (index, (address, live)) in state.tls.iter().enumerate() {
    let listener = config
      .listeners
      .iter()
      .filter(|l| !l.tls.is_empty())
      .nth(index)
      .filter(|l| l.address == *address);
    match listener {
      Some(listener) => {
        let tls = tls::server_config(&listener.tls)
          .map_err(|err| format!("listener {address}: {err}"))?;
        certificates.push((live.clone(), tls));
      }
      None => notes.push(format!(
        "TLS listener {address} is not the same in the new config: listener changes apply at restart"
      )),
    }
  }
  let addresses: Vec<SocketAddr> = config.listeners.iter().map(|l| l.address).collect();
  if addresses != state.listen {
    notes.push("[[listen]] entries changed: listener changes apply at restart".into());
  }
  let configured = ConfiguredFunctions::start(&config, &state.factory, &state.transpiler)
    .await
    .map_err(|err| err.to_string())?;
  // A function that does not load would replace a working pool with one that answers 503:
  // the whole reload is refused instead, as a deploy of such a version is.
  let failed = configured.load_errors();
  if !failed.is_empty() {
    return Err(failed.join("\n"));
  }
  for (live, tls) in certificates {
    live.store(tls);
  }
  state.geo.replace(geo);
  state.configured.store(Arc::new(configured));
  notes.push(
    "[server], [cache], [limits] defaults of deployed functions and [admin] apply at restart"
      .into(),
  );
  tracing::info!(trigger, "configuration reloaded");
  Ok(notes)
}

/// Reloads on SIGHUP until `stop`.
async fn reload_on_hangup(state: Arc<NodeState>, stop: CancellationToken) {
  let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
    Ok(hangup) => hangup,
    Err(err) => {
      tracing::warn!(error = %err, "no SIGHUP handler: reload with POST /reload");
      return;
    }
  };
  loop {
    tokio::select! {
      _ = hangup.recv() => {
        if let Err(errors) = reload(&state, "SIGHUP").await {
          tracing::error!("reload rejected, the running configuration stays:\n{errors}");
        }
      }
      () = stop.cancelled() => return,
    }
  }
}

/// A function of the node (for a deployed function, one version of it): its pool, its
/// limits and its concurrency slots.
pub(crate) struct RoutedFunction {
  pub(crate) pool: Arc<IsolatePool>,
  limits: Limits,
  slots: Arc<Semaphore>,
  /// Whether its GET responses are cached in front of it.
  pub(crate) route_cache: bool,
  /// The status its routes answer when `[[overrides]]` switch it off on this node.
  disabled: Option<StatusCode>,
  /// The deployed version this is; `None` for a function of the config file.
  version: Option<String>,
}

impl RoutedFunction {
  pub(crate) fn new(
    pool: Arc<IsolatePool>,
    function: &FunctionConfig,
    version: Option<String>,
  ) -> RoutedFunction {
    RoutedFunction {
      version,
      pool,
      limits: function.limits,
      slots: Arc::new(Semaphore::new(function.limits.max_concurrency)),
      route_cache: function.cache.enabled,
      disabled: function
        .disabled
        .and_then(|status| StatusCode::from_u16(status).ok()),
    }
  }

  /// The function's name (also its cache namespace).
  pub(crate) fn name(&self) -> &str {
    self.pool.name()
  }

  /// The deployed version, if it is one.
  pub(crate) fn version(&self) -> Option<&str> {
    self.version.as_deref()
  }
}

/// 504 for a request that ran past its function's wall-clock limit.
fn wall_time_exceeded(function: &str, limit: Duration) -> Response<Body> {
  termination_response(
    StatusCode::GATEWAY_TIMEOUT,
    "timeout",
    format!(
      "outpost: function {function:?} did not answer within its wall-clock limit of {limit:?}\n"
    ),
  )
}

/// A response for a request a limit ended: `outpost-error` and `outpost-termination` both
/// name the limit.
fn termination_response(status: StatusCode, limit: &'static str, body: String) -> Response<Body> {
  let mut response = outpost_response(status, limit, body);
  response
    .headers_mut()
    .insert(TERMINATION_HEADER, HeaderValue::from_static(limit));
  response
}

fn body_too_large(limit: u64) -> Response<Body> {
  outpost_response(
    StatusCode::PAYLOAD_TOO_LARGE,
    "body-too-large",
    format!("outpost: the request body is larger than this node accepts ({limit} bytes)\n"),
  )
}

/// A request body that fails once more than `remaining` bytes have come, and says so.
struct LimitedBody {
  inner: Incoming,
  remaining: u64,
  exceeded: Arc<AtomicBool>,
  /// Bytes read so far, for the access record.
  read: Arc<AtomicU64>,
}

impl http_body::Body for LimitedBody {
  type Data = Bytes;
  type Error = BoxError;

  fn poll_frame(
    mut self: Pin<&mut Self>,
    cx: &mut Context<'_>,
  ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
      Poll::Ready(Some(Ok(frame))) => frame,
      Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err.into()))),
      Poll::Ready(None) => return Poll::Ready(None),
      Poll::Pending => return Poll::Pending,
    };
    if let Some(data) = frame.data_ref() {
      let length = data.len() as u64;
      if length > self.remaining {
        self.exceeded.store(true, Ordering::Relaxed);
        return Poll::Ready(Some(Err(
          "the request body is larger than this node accepts".into(),
        )));
      }
      self.remaining -= length;
      self.read.fetch_add(length, Ordering::Relaxed);
    }
    Poll::Ready(Some(Ok(frame)))
  }

  fn is_end_stream(&self) -> bool {
    self.inner.is_end_stream()
  }

  fn size_hint(&self) -> http_body::SizeHint {
    self.inner.size_hint()
  }
}

/// A response generated by Outpost itself (not a function), marked with `outpost-error`.
fn outpost_response(status: StatusCode, reason: &'static str, body: String) -> Response<Body> {
  let mut response = Response::new(full_body(Bytes::from(body)));
  *response.status_mut() = status;
  let headers = response.headers_mut();
  headers.insert(
    CONTENT_TYPE,
    HeaderValue::from_static("text/plain; charset=utf-8"),
  );
  headers.insert(ERROR_HEADER, HeaderValue::from_static(reason));
  response
}

/// A response body that keeps its request counted as in flight (and holding its admission
/// slots) until it has been sent, ends it at the wall-clock deadline, and cancels body
/// streaming inside the isolate when it is dropped early.
struct GuardedBody {
  inner: Body,
  /// Set once the body has been sent in full.
  finished: Arc<AtomicBool>,
  deadline: Pin<Box<tokio::time::Sleep>>,
  _active: ActiveRequest,
  _in_flight: InFlightGuard,
  _admitted: Admitted,
  _cancel_on_drop: DropGuard,
}

impl http_body::Body for GuardedBody {
  type Data = Bytes;
  type Error = BoxError;

  fn poll_frame(
    mut self: Pin<&mut Self>,
    cx: &mut Context<'_>,
  ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    if self.deadline.as_mut().poll(cx).is_ready() {
      return Poll::Ready(Some(Err(
        "the function's wall-clock limit ended the response".into(),
      )));
    }
    let frame = Pin::new(&mut self.inner).poll_frame(cx);
    if matches!(frame, Poll::Ready(None)) || self.inner.is_end_stream() {
      self.finished.store(true, Ordering::Release);
    }
    frame
  }

  fn is_end_stream(&self) -> bool {
    self.inner.is_end_stream()
  }

  fn size_hint(&self) -> http_body::SizeHint {
    self.inner.size_hint()
  }
}

/// The node's side of service bindings (`outpost_ext_dispatch::ServiceDispatch`): a call is a
/// request of its own to the bound function, served in-process as any request is (its
/// limits, access record and usage), continuing the caller's trace.
#[derive(Default)]
struct ServiceCalls {
  /// Set once the node exists (its isolates are created before it).
  node: std::sync::OnceLock<std::sync::Weak<NodeState>>,
}

impl outpost_ext_dispatch::ServiceDispatch for ServiceCalls {
  fn call(
    &self,
    function: &str,
    request: Request<Body>,
  ) -> futures::future::BoxFuture<'static, Result<Response<Body>, String>> {
    let node = self.node.get().and_then(std::sync::Weak::upgrade);
    let function = function.to_string();
    Box::pin(async move {
      let node = node.ok_or("the node is shutting down")?;
      let (parts, body) = request.into_parts();
      let target = node
        .function_named(&function, &parts.headers)
        .ok_or_else(|| format!("no function {function:?} serves on this node"))?;
      let request_id = node.request_ids.next();
      let access = AccessRecord::new(
        node.observers.clone(),
        &request_id,
        parts.uri.authority().map_or("", |a| a.as_str()),
        parts.method.as_str(),
        parts.uri.path(),
      );
      access.set_function(target.name(), target.version());
      let mut headers = parts.headers;
      hop_by_hop::strip_request(&mut headers);
      let trace = TraceContext::from_headers(&headers);
      access.set_trace(&trace);
      let call = FunctionCall {
        function: target,
        trace,
        encoding: None,
        method: parts.method,
        url: parts.uri.to_string(),
        headers,
        body: (!http_body::Body::is_end_stream(&body)).then_some(body),
        body_exceeded: Arc::new(AtomicBool::new(false)),
        access: access.clone(),
        active: Arc::new(ConnectionActivity::new()).begin(),
        cf: Vec::new(),
      };
      let mut response = call_function(&node, call, None).await;
      if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
      }
      let status = response.status().as_u16();
      let error = outpost_error(&response).map(str::to_string);
      Ok(response.map(|body| {
        access
          .respond(status, error.as_deref(), body)
          .boxed_unsync()
      }))
    })
  }
}

/// Request ids: a random per-process prefix plus a counter, so ids from different runs
/// are unlikely to collide.
pub(crate) struct RequestIds {
  prefix: u32,
  counter: AtomicU64,
}

impl RequestIds {
  fn new() -> RequestIds {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
      std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos(),
    );
    RequestIds {
      prefix: hasher.finish() as u32,
      counter: AtomicU64::new(1),
    }
  }

  pub(crate) fn next(&self) -> String {
    format!(
      "{:08x}{:012x}",
      self.prefix,
      self.counter.fetch_add(1, Ordering::Relaxed)
    )
  }
}
