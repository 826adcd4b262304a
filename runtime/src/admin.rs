//! The admin listener (`[admin]`): operations on the node that are not for the public.
//! It is bound to loopback unless configured otherwise, and then requires a bearer token
//! (`Authorization: Bearer <token>`); with a token set, every request must carry it.
//!
//! - `POST /cache/purge` with a JSON body naming exactly one of `url`, `prefix` or `tag`
//!   (the `Cache-Tag` response header), and optionally `function` to purge only that
//!   function's entries: answers `{"purged": N}`, the number of URLs whose entries were
//!   removed.
//! - `GET /cache/stats`: the cache counters of every function, as JSON.
//! - `GET /metrics`: Prometheus metrics (text format 0.0.4), see `crate::metrics`.
//! - `GET /usage?since=<unix seconds>`: requests, CPU and wall milliseconds, egress bytes and
//!   subrequests per function from the minute of `since` (default: all kept, a day).
//! - `GET /healthz`: 200 while the process serves. `GET /readyz`: 200 when the node serves
//!   traffic, 503 while it drains on shutdown. These two need no token (load balancers and
//!   process supervisors probe them) and say nothing about the node's contents.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outpost_ext_cache::CacheNamespace;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::edge_cache::Purge;
use crate::server::NodeState;

/// Largest admin request body read.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the admin handlers work on.
pub struct Admin {
  pub(crate) node: Arc<NodeState>,
  pub token: Option<String>,
}

/// The body of `POST /cache/purge`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
  url: Option<String>,
  prefix: Option<String>,
  tag: Option<String>,
  function: Option<String>,
}

/// Serves admin requests on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
  loop {
    let (stream, peer) = tokio::select! {
      accepted = listener.accept() => match accepted {
        Ok(accepted) => accepted,
        Err(err) => {
          tracing::warn!(error = %err, "admin accept failed");
          tokio::time::sleep(std::time::Duration::from_millis(50)).await;
          continue;
        }
      },
      () = stop.cancelled() => return,
    };
    let admin = admin.clone();
    let service = hyper::service::service_fn(move |request| {
      let admin = admin.clone();
      async move { Ok::<_, Infallible>(handle(&admin, request).await) }
    });
    tokio::spawn(async move {
      let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
      let connection = builder.serve_connection(TokioIo::new(stream), service);
      if let Err(err) = connection.await {
        tracing::debug!(%peer, error = %err, "admin connection ended with an error");
      }
    });
  }
}

async fn handle(admin: &Admin, request: Request<Incoming>) -> Response<Full<Bytes>> {
  match (request.method(), request.uri().path()) {
    (&Method::GET, "/healthz") => {
      return json(StatusCode::OK, &serde_json::json!({ "alive": true }));
    }
    (&Method::GET, "/readyz") => return readiness(admin),
    _ => {}
  }
  if let Some(token) = &admin.token {
    let expected = format!("Bearer {token}");
    let presented = request
      .headers()
      .get(AUTHORIZATION)
      .map_or(&b""[..], HeaderValue::as_bytes);
    if !constant_time_eq(presented, expected.as_bytes()) {
      return json(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({ "error": "missing or wrong bearer token (Authorization: Bearer <admin.token>)" }),
      );
    }
  }
  match (request.method(), request.uri().path()) {
    (&Method::POST, "/cache/purge") => purge(admin, request).await,
    (&Method::GET, "/metrics") => {
      let text = admin.node.observers.metrics.render(&admin.node.reading());
      let mut response = Response::new(Full::new(Bytes::from(text)));
      response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
      );
      response
    }
    (&Method::GET, "/usage") => usage(admin, request.uri().query()),
    (&Method::GET, "/cache/stats") => {
      let stats: serde_json::Map<String, serde_json::Value> = admin
        .node
        .cache
        .stats()
        .into_iter()
        .map(|(namespace, stats)| {
          let value = serde_json::to_value(stats).unwrap_or_default();
          (namespace.0.to_string(), value)
        })
        .collect();
      json(StatusCode::OK, &serde_json::json!({ "functions": stats }))
    }
    (_, path) => json(
      StatusCode::NOT_FOUND,
      &serde_json::json!({ "error": format!("no admin endpoint {} {path}: the endpoints are POST /cache/purge, GET /cache/stats, /metrics, /usage, /healthz and /readyz", request.method()) }),
    ),
  }
}

async fn purge(admin: &Admin, request: Request<Incoming>) -> Response<Full<Bytes>> {
  let bad_request = |message: String| {
    json(
      StatusCode::BAD_REQUEST,
      &serde_json::json!({ "error": message }),
    )
  };
  let body = match Limited::new(request.into_body(), MAX_BODY_BYTES)
    .collect()
    .await
  {
    Ok(body) => body.to_bytes(),
    Err(err) => return bad_request(format!("cannot read the request body: {err}")),
  };
  let request: PurgeRequest = match serde_json::from_slice(&body) {
    Ok(request) => request,
    Err(err) => {
      return bad_request(format!(
        "the body must be JSON like {{\"url\": \"https://example.com/a\"}}, {{\"prefix\": ...}} or {{\"tag\": ...}}: {err}"
      ));
    }
  };
  let purge = match (request.url, request.prefix, request.tag) {
    (Some(url), None, None) => Purge::Url(url),
    (None, Some(prefix), None) => Purge::Prefix(prefix),
    (None, None, Some(tag)) => Purge::Tag(tag),
    _ => return bad_request("name exactly one of \"url\", \"prefix\" or \"tag\"".into()),
  };
  let namespace = request.function.map(|f| CacheNamespace(f.into()));
  let purged = admin.node.cache.purge(namespace.as_ref(), &purge);
  tracing::info!(?purge, function = ?namespace.map(|n| n.0), purged, "cache purge");
  json(StatusCode::OK, &serde_json::json!({ "purged": purged }))
}

fn readiness(admin: &Admin) -> Response<Full<Bytes>> {
  if admin
    .node
    .draining
    .load(std::sync::atomic::Ordering::Relaxed)
  {
    return json(
      StatusCode::SERVICE_UNAVAILABLE,
      &serde_json::json!({ "ready": false, "reason": "draining: shutting down" }),
    );
  }
  // Serving at all means the config, certificates and pre-warmed pools loaded (the node
  // starts listening only after all of them).
  json(StatusCode::OK, &serde_json::json!({ "ready": true }))
}

fn usage(admin: &Admin, query: Option<&str>) -> Response<Full<Bytes>> {
  let since = query
    .into_iter()
    .flat_map(|q| q.split('&'))
    .filter_map(|pair| pair.strip_prefix("since="))
    .next_back();
  let since = match since.map(str::parse::<u64>) {
    None => 0,
    Some(Ok(since)) => since,
    Some(Err(_)) => {
      return json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "error": "since must be unix seconds, e.g. /usage?since=1795000000" }),
      );
    }
  };
  let report = admin
    .node
    .observers
    .usage
    .since(since, std::time::SystemTime::now());
  json(
    StatusCode::OK,
    &serde_json::to_value(report).unwrap_or_default(),
  )
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
  let mut response = Response::new(Full::new(Bytes::from(format!("{value}\n"))));
  *response.status_mut() = status;
  response
    .headers_mut()
    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
  response
}

/// Compares without exiting early, so response time does not reveal how much of a token
/// matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
  a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
