//! The HTTP front, on every shard: listeners, TLS, PROXY protocol, hyper connections, and
//! the request path up to the function call.
//!
//! accept on the shard's own `SO_REUSEPORT` socket → rustls (SNI, ALPN) → hyper (HTTP/1.1,
//! h2, h2c), run on the shard's thread → route by host and path ([`NodeState::route`]) →
//! route cache ([`route_cache`]) → the function's isolate on the same shard
//! ([`call_function`]) → JS `fetch(request, env, ctx)` → response streamed back, compressed
//! when eligible ([`compression`]).

pub mod compression;
pub mod proxy_protocol;
pub mod route_cache;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::HeaderValue;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use outpost_ext_dispatch::{Body, BoxError, full_body};
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ListenerConfig, ServerConfig};
use crate::error::Error;
use crate::node::NodeState;
use crate::node::call::{
  ActiveRequest, ConnectionActivity, FunctionCall, LimitedBody, REQUEST_ID_HEADER, body_too_large,
  call_function, outpost_error, outpost_response,
};
use crate::node::hop_by_hop;
use crate::observe::access_log::{AccessRecord, MeteredBody, RequestHead};
use crate::observe::trace_context::TraceContext;
use crate::shard::Shard;

/// A listener of the node: one socket per shard, all bound to the same address with
/// `SO_REUSEPORT`, so the kernel spreads connections over the shards and no accept takes a
/// shared lock.
pub struct Listener {
  /// The address it is bound to (the port picked, for port 0).
  pub address: SocketAddr,
  /// The certificates, replaced on reload: each handshake uses those current at its start.
  pub tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
  /// Connections start with a PROXY protocol header.
  pub proxy_protocol: bool,
  /// The sockets not yet handed to their shards.
  sockets: std::sync::Mutex<Vec<std::net::TcpListener>>,
}

impl Listener {
  /// Binds `config`'s address `shards` times with `SO_REUSEPORT` (port 0: the port the first
  /// socket got), with its certificates loaded.
  pub fn bind(config: &ListenerConfig, shards: usize) -> Result<Listener, Error> {
    let tls = if config.tls.is_empty() {
      None
    } else {
      let server = tls::server_config(&config.tls).map_err(|source| Error::Listener {
        address: config.address,
        source: Box::new(source),
      })?;
      Some(Arc::new(ArcSwap::new(server)))
    };
    let bind_error = |source| Error::Bind {
      address: config.address,
      source,
    };
    let mut address = config.address;
    let mut sockets = Vec::with_capacity(shards);
    for _ in 0..shards.max(1) {
      let socket = reuse_port_socket(address).map_err(bind_error)?;
      address = socket.local_addr().map_err(bind_error)?;
      sockets.push(socket);
    }
    Ok(Listener {
      address,
      tls,
      proxy_protocol: config.proxy_protocol,
      sockets: std::sync::Mutex::new(sockets),
    })
  }

  /// The socket of one shard (each is taken once).
  fn take_socket(&self) -> Option<std::net::TcpListener> {
    self.sockets.lock().expect("listener lock").pop()
  }
}

/// A listening socket with `SO_REUSEPORT`, non-blocking, for a shard's runtime to take.
fn reuse_port_socket(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
  let socket = socket2::Socket::new(
    socket2::Domain::for_address(address),
    socket2::Type::STREAM,
    Some(socket2::Protocol::TCP),
  )?;
  socket.set_reuse_address(true)?;
  socket.set_reuse_port(true)?;
  socket.set_nonblocking(true)?;
  socket.bind(&address.into())?;
  socket.listen(1024)?;
  Ok(socket.into())
}

/// Runs hyper's futures as tasks of the shard (they are not `Send`: the request path holds
/// the shard's isolates).
#[derive(Clone, Copy, Debug)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
  F: Future + 'static,
{
  fn execute(&self, future: F) {
    tokio::task::spawn_local(future);
  }
}

/// How every connection is served: the hyper settings with the protocol limits of
/// `[server]`, and the timeouts hyper does not keep itself.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
  server: ServerConfig,
  /// Bounds the TLS handshake as hyper bounds the request head.
  handshake_timeout: Duration,
  idle_timeout: Duration,
}

impl ConnectionSettings {
  pub fn new(server: &ServerConfig) -> ConnectionSettings {
    ConnectionSettings {
      server: server.clone(),
      handshake_timeout: Duration::from_millis(server.header_read_timeout_ms),
      idle_timeout: Duration::from_millis(server.idle_timeout_ms),
    }
  }

  /// HTTP/1.1 and HTTP/2 settings, with the protocol limits of `[server]`.
  fn builder(&self) -> auto::Builder<LocalExec> {
    let server = &self.server;
    let mut builder = auto::Builder::new(LocalExec);
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
}

/// The HTTP front of one shard.
struct ShardFront {
  shard: Rc<Shard>,
  node: Arc<NodeState>,
  settings: ConnectionSettings,
  builder: auto::Builder<LocalExec>,
}

/// Starts `shard`'s part of every listener: its socket's accept loop (tracked by
/// `acceptors`), whose connections are served on the shard, tracked by `connections`, and
/// closed gracefully once `stop` is cancelled.
pub fn serve_on(
  shard: &Rc<Shard>,
  node: Arc<NodeState>,
  listeners: &[Arc<Listener>],
  settings: &ConnectionSettings,
  connections: &TaskTracker,
  acceptors: &TaskTracker,
  stop: &CancellationToken,
) -> Result<(), Error> {
  let front = Rc::new(ShardFront {
    shard: shard.clone(),
    node,
    builder: settings.builder(),
    settings: settings.clone(),
  });
  for listener in listeners {
    let socket = listener
      .take_socket()
      .ok_or_else(|| Error::IsolateThread("a listener has no socket left for a shard".into()))?;
    let socket = tokio::net::TcpListener::from_std(socket).map_err(|source| Error::Bind {
      address: listener.address,
      source,
    })?;
    // Tracked by `acceptors`: once they have all ended, every socket is closed.
    tokio::task::spawn_local(acceptors.track_future(accept_loop(
      socket,
      listener.clone(),
      front.clone(),
      connections.clone(),
      stop.clone(),
    )));
  }
  Ok(())
}

async fn accept_loop(
  socket: tokio::net::TcpListener,
  listener: Arc<Listener>,
  front: Rc<ShardFront>,
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
      accepted = socket.accept() => match accepted {
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
    let tls = listener.tls.as_ref().map(|tls| tls.load_full());
    let connection = serve_connection(
      stream,
      peer,
      listener.proxy_protocol,
      tls,
      front.clone(),
      scheme,
      stop.clone(),
    );
    tokio::task::spawn_local(connections.track_future(async move {
      if let Err(err) = connection.await {
        tracing::debug!(%peer, error = %err, "connection ended with an error");
      }
    }));
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
  tls: Option<Arc<rustls::ServerConfig>>,
  front: Rc<ShardFront>,
  scheme: &'static str,
  stop: CancellationToken,
) -> Result<(), BoxError> {
  let settings = &front.settings;
  front.shard.arrived();
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
    Some(config) => {
      let handshake = async {
        let hello =
          tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream)
            .await?;
        // The client named the host: its function's isolate can load during the rest of
        // the handshake.
        if let Some(host) = hello.client_hello().server_name() {
          front.prewarm(host);
        }
        hello.into_stream(config).await
      };
      match tokio::time::timeout(settings.handshake_timeout, handshake).await {
        Ok(Ok(stream)) => Either::Right(stream),
        Ok(Err(err)) => return Err(format!("TLS handshake failed: {err}").into()),
        Err(_) => return Err("TLS handshake timed out".into()),
      }
    }
  };
  let activity = Arc::new(ConnectionActivity::default());
  let service_activity = activity.clone();
  let service_front = front.clone();
  let service = hyper::service::service_fn(move |request| {
    let front = service_front.clone();
    let active = service_activity.begin();
    let origin = Origin { scheme, peer };
    async move { Ok::<_, Infallible>(front.handle_request(request, origin, active).await) }
  });
  let connection = front
    .builder
    .serve_connection(TokioIo::new(stream), service);
  tokio::pin!(connection);
  let mut closing = false;
  loop {
    tokio::select! {
      result = connection.as_mut() => {
        if let Err(err) = &result {
          record_refusal(&front.node, peer, err.as_ref());
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
  tracing::info!(%request_id, %peer, error = %err, "request refused by the HTTP parser");
  let access = AccessRecord::new(state.observers.clone(), request_id, None);
  drop(access.respond(status, Some(reason), full_body(Bytes::new())));
}

/// Where a request came in: the listener's scheme and the connecting peer.
#[derive(Debug, Clone, Copy)]
struct Origin {
  scheme: &'static str,
  peer: SocketAddr,
}

impl ShardFront {
  /// Starts isolates here for the functions `host` routes to that would need a new one for
  /// a request (`server.sni_prewarm` at most under way at once).
  fn prewarm(&self, host: &str) {
    let limit = self.settings.server.sni_prewarm;
    if limit == 0 {
      return;
    }
    for function in self.node.functions_for_host(host) {
      function.pool.prewarm_here(&self.shard, limit);
    }
  }

  /// One request, from routing to the response the client gets.
  async fn handle_request(
    &self,
    request: Request<Incoming>,
    origin: Origin,
    active: ActiveRequest,
  ) -> Response<MeteredBody> {
    self.shard.arrived();
    let node = &self.node;
    let request_id = node.request_ids.next();
    let head = RequestHead {
      method: request.method().clone(),
      uri: request.uri().clone(),
      host: request.headers().get(http::header::HOST).cloned(),
    };
    let authority = head.host().map(str::to_string);
    let access = AccessRecord::new(node.observers.clone(), request_id, Some(head));
    access.set_shard(self.shard.id);
    let is_head = request.method() == Method::HEAD;
    let encoding = compression::negotiate(request.headers());
    let mut response = self
      .dispatch(request, authority, origin, &access, active)
      .await;
    // The function's responses and the cache's are compressed for the client when eligible;
    // Outpost's own answers are not.
    if self.settings.server.compression && outpost_error(&response).is_none() {
      compression::compress_response(&mut response, encoding, is_head);
    }
    if is_head {
      response = without_body(response);
    }
    if let Ok(value) = HeaderValue::from_str(request_id.as_str()) {
      response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let status = response.status().as_u16();
    let error = outpost_error(&response).map(str::to_string);
    response.map(|body| access.respond(status, error.as_deref(), body))
  }

  async fn dispatch(
    &self,
    request: Request<Incoming>,
    authority: Option<String>,
    origin: Origin,
    access: &Arc<AccessRecord>,
    active: ActiveRequest,
  ) -> Response<Body> {
    let node = &self.node;
    let scheme = origin.scheme;
    let Some(authority) = authority else {
      return outpost_response(
        StatusCode::BAD_REQUEST,
        "missing-host",
        "outpost: the request has no Host header or :authority\n".into(),
      );
    };
    if request.headers().len() > node.max_headers {
      return outpost_response(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "too-many-headers",
        format!(
          "outpost: the request has {} header lines; this node accepts at most {} (server.max_headers)\n",
          request.headers().len(),
          node.max_headers
        ),
      );
    }
    let path = request.uri().path();
    let Some(function) = node.route(&authority, path, request.headers()) else {
      return outpost_response(
        StatusCode::NOT_FOUND,
        "no-route",
        format!("outpost: no function is routed for {authority}{path}\n"),
      );
    };
    access.set_function(&function.identity);
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
    let geo = node.geo.current();
    let mut cf = geo
      .config
      .client(origin.peer.ip(), &mut headers, geo.databases.as_ref())
      .fields;
    if let Some(pop) = &node.pop {
      cf.push(("colo", pop.clone()));
    }
    for (field, value) in &node.request_cf {
      match cf.iter_mut().find(|(name, _)| name == field) {
        Some(known) => known.1.clone_from(value),
        None => cf.push((field, value.clone())),
      }
    }
    let declared_length = headers
      .get(http::header::CONTENT_LENGTH)
      .and_then(|v| v.to_str().ok())
      .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > node.max_body_bytes) {
      return body_too_large(node.max_body_bytes);
    }
    let body_exceeded = Arc::new(AtomicBool::new(false));
    let body = if http_body::Body::is_end_stream(&body) {
      None
    } else {
      let limited = LimitedBody {
        inner: body,
        remaining: node.max_body_bytes,
        exceeded: body_exceeded.clone(),
        read: access.bytes_in.clone(),
      };
      Some(limited.boxed_unsync())
    };
    let trace = TraceContext::from_headers(&headers);
    access.set_trace(&trace);
    let call = FunctionCall {
      function,
      shard: Some(self.shard.clone()),
      trace,
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
      route_cache::serve(node, call).await
    } else {
      match call_function(node, call).await {
        Ok(response) | Err(response) => response,
      }
    }
  }
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
