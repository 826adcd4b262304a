//! The admin listener (`[admin]`): operations on the node that are not for the public.
//! It is bound to loopback unless configured otherwise, and then requires a bearer token
//! (`Authorization: Bearer <token>`); with a token set, every request must carry it.
//!
//! - `POST /cache/purge` with a JSON body naming exactly one of `url`, `prefix` or `tag`
//!   (the `Cache-Tag` response header), and optionally `function` to purge only that
//!   function's entries: answers `{"purged": N}`, the number of URLs whose entries were
//!   removed.
//! - `GET /cache/stats`: the cache counters of every function, as JSON.
//! - `GET /metrics`: Prometheus metrics (text format 0.0.4), see `crate::observe::metrics`.
//! - `GET /usage?since=<unix seconds>`: requests, CPU and wall milliseconds, egress bytes and
//!   subrequests per function from the minute of `since` (default: all kept, a day).
//! - Deployments (with `[admin] data_dir`, see `super::deployments`): `PUT /functions/{name}`
//!   with a bundle (`?activate=true` to serve it at once), `GET /functions`,
//!   `GET /functions/{name}/versions`, `POST /functions/{name}/activate` with
//!   `{"version": "..."}`, `POST /functions/{name}/rollback` (to what served before, or
//!   `{"to": "..."}`), `POST /functions/{name}/split` with
//!   `{"versions": {"a": 95, "b": 5}, "sticky": {"header": "x-user"}}` (percentages), and
//!   `DELETE /functions/{name}`; `PUT|DELETE /functions/{name}/secrets/{NAME}` (the value is
//!   the body) and `GET /functions/{name}/secrets` (names only).
//! - `GET /functions/{name}/tail`: the function's access records and console output as
//!   they come, one JSON object per line (see `crate::observe::tail`).
//! - `POST /reload`: re-reads the config file (as SIGHUP does; see [`Reload`]).
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

use super::deployments::{Activation, DeployError, Deployments, MAX_BUNDLE_BYTES};
use crate::cache::edge_cache::Purge;
use crate::node::NodeState;

/// Largest admin request body read.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The body of admin answers: JSON or text, or a stream (a function's tail).
type AdminBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Re-reads the node's configuration and applies it (`POST /reload`, as SIGHUP does).
pub trait Reload: Send + Sync {
  /// Reloads; the notes on what applies only at restart, or why nothing changed.
  fn reload<'a>(
    &'a self,
    trigger: &'a str,
  ) -> futures::future::BoxFuture<'a, Result<Vec<String>, String>>;
}

/// What the admin handlers work on.
pub struct Admin {
  pub node: Arc<NodeState>,
  pub token: Option<String>,
  /// The deploy API's functions, with `[admin] data_dir`.
  pub deployments: Option<Arc<Deployments>>,
  pub reload: Arc<dyn Reload>,
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

async fn handle(admin: &Admin, request: Request<Incoming>) -> Response<AdminBody> {
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
  if request.method() == Method::GET
    && let Some(name) = request
      .uri()
      .path()
      .strip_prefix("/functions/")
      .and_then(|rest| rest.strip_suffix("/tail"))
  {
    return tail(admin, name);
  }
  if let Some(rest) = request.uri().path().strip_prefix("/functions") {
    let rest = rest.to_string();
    return functions(admin, request, &rest).await;
  }
  match (request.method(), request.uri().path()) {
    (&Method::POST, "/cache/purge") => purge(admin, request).await,
    (&Method::GET, "/metrics") => {
      let text = admin.node.observers.metrics.render(&admin.node.reading());
      let mut response = Response::new(Full::new(Bytes::from(text)).boxed_unsync());
      response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::observe::metrics::CONTENT_TYPE),
      );
      response
    }
    (&Method::GET, "/usage") => usage(admin, request.uri().query()),
    (&Method::POST, "/reload") => match admin.reload.reload("POST /reload").await {
      Ok(notes) => json(
        StatusCode::OK,
        &serde_json::json!({ "reloaded": true, "notes": notes }),
      ),
      Err(errors) => json(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "reloaded": false, "error": format!("the running configuration stays: {errors}") }),
      ),
    },
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
      &serde_json::json!({ "error": format!("no admin endpoint {} {path}: the endpoints are POST /cache/purge, GET /cache/stats, /metrics, /usage, /healthz, /readyz, /reload and /functions", request.method()) }),
    ),
  }
}

async fn purge(admin: &Admin, request: Request<Incoming>) -> Response<AdminBody> {
  let bad_request = |message: String| {
    json(
      StatusCode::BAD_REQUEST,
      &serde_json::json!({ "error": message }),
    )
  };
  let body = match read_body(request, MAX_BODY_BYTES).await {
    Ok(body) => body,
    Err(response) => return response,
  };
  let request: PurgeRequest = match serde_json::from_slice(&body) {
    Ok(request) => request,
    Err(err) => {
      return bad_request(format!(
        "the body must be JSON like {{\"url\": \"https://example.com/a\"}}, {{\"prefix\": ...}} or {{\"tag\": ...}}: {err}"
      ));
    }
  };
  // A URL is a full key as the function sees it (scheme://host/path?query), or a path
  // (`/a?b`): then every host's entry of that path is meant.
  let absolute = |url: &str| url.starts_with("https://") || url.starts_with("http://");
  let purge = match (request.url, request.prefix, request.tag) {
    (Some(url), None, None) if absolute(&url) => Purge::Url(url),
    (Some(url), None, None) if url.starts_with('/') => Purge::Path(url),
    (None, Some(prefix), None) if absolute(&prefix) => Purge::Prefix(prefix),
    (None, Some(prefix), None) if prefix.starts_with('/') => Purge::PathPrefix(prefix),
    (Some(what), None, None) | (None, Some(what), None) => {
      return bad_request(format!(
        "{what:?} is neither a full URL (https://host/path?query, as the function sees it) nor a path starting with /"
      ));
    }
    (None, None, Some(tag)) => Purge::Tag(tag),
    _ => return bad_request("name exactly one of \"url\", \"prefix\" or \"tag\"".into()),
  };
  let namespace = request.function.map(|f| CacheNamespace(f.into()));
  let purged = admin.node.cache.purge(namespace.as_ref(), &purge);
  tracing::info!(
    purge = %purge,
    function = namespace.as_ref().map(|n| n.0.as_ref()),
    purged,
    "cache purge"
  );
  let mut answer = serde_json::json!({ "purged": purged });
  if purged == 0 {
    let whose = namespace.as_ref().map_or("any function".to_string(), |n| {
      format!("function {:?}", n.0)
    });
    answer["reason"] = match &purge {
      Purge::Url(url) => format!("no entry of {whose} is stored under {url}; keys are full URLs as the function saw them (scheme, host, path and query), or give a path such as /a?b for every host"),
      Purge::Prefix(prefix) => format!("no URL stored for {whose} starts with {prefix}"),
      Purge::Path(path) => format!("no entry of {whose} has the path and query {path} on any host"),
      Purge::PathPrefix(prefix) => format!("no entry of {whose} has a path starting with {prefix}"),
      Purge::Tag(tag) => format!("no entry of {whose} carries the Cache-Tag {tag}"),
    }
    .into();
  }
  json(StatusCode::OK, &answer)
}

/// The deploy API: `rest` is the path after `/functions`.
async fn functions(admin: &Admin, request: Request<Incoming>, rest: &str) -> Response<AdminBody> {
  let Some(deployments) = admin.deployments.clone() else {
    return json(
      StatusCode::NOT_FOUND,
      &serde_json::json!({ "error": "the deploy API is off on this node: set [admin] data_dir" }),
    );
  };
  let error = |err: DeployError| {
    let status = StatusCode::from_u16(err.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, &serde_json::json!({ "error": err.to_string() }))
  };
  let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
  let method = request.method().clone();
  let activate_now = request
    .uri()
    .query()
    .is_some_and(|q| q.split('&').any(|p| p == "activate=true"));
  match (method, segments.as_slice()) {
    (Method::GET, [""]) => {
      let mut list: Vec<serde_json::Value> = admin
        .node
        .configured_names()
        .into_iter()
        .map(|name| serde_json::json!({ "name": name, "source": "config" }))
        .collect();
      list.extend(deployments.list());
      json(StatusCode::OK, &serde_json::json!({ "functions": list }))
    }
    (Method::PUT, [name]) => {
      let body = match read_body(request, MAX_BUNDLE_BYTES).await {
        Ok(body) => body,
        Err(response) => return response,
      };
      let (version, created) = match deployments.upload(name, &body).await {
        Ok(stored) => stored,
        Err(err) => return error(err),
      };
      let mut warnings = Vec::new();
      if activate_now {
        let activation = Activation {
          versions: [(version.clone(), 100)].into(),
          sticky: None,
        };
        if let Err(err) = deployments.activate(name, activation).await {
          return error(err);
        }
        warnings = admin.node.shadowed_routes(name);
      }
      let status = if created {
        StatusCode::CREATED
      } else {
        StatusCode::OK
      };
      json(
        status,
        &serde_json::json!({ "name": name, "version": version, "created": created, "active": activate_now, "warnings": warnings }),
      )
    }
    (Method::POST, [name, "rollback"]) => {
      let body = match read_body(request, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(response) => return response,
      };
      #[derive(Deserialize)]
      #[serde(deny_unknown_fields)]
      struct Rollback {
        to: Option<String>,
      }
      let to = if body.is_empty() {
        None
      } else {
        match serde_json::from_slice::<Rollback>(&body) {
          Ok(rollback) => rollback.to,
          Err(err) => {
            return json(
              StatusCode::BAD_REQUEST,
              &serde_json::json!({ "error": format!("the body must be empty or {{\"to\": \"VERSION\"}}: {err}") }),
            );
          }
        }
      };
      match deployments.rollback(name, to.as_deref()).await {
        Ok(activation) => json(
          StatusCode::OK,
          &serde_json::json!({ "name": name, "versions": activation.versions, "warnings": admin.node.shadowed_routes(name) }),
        ),
        Err(err) => error(err),
      }
    }
    (Method::PUT, [name, "secrets", key]) => {
      let body = match read_body(request, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(response) => return response,
      };
      let Ok(value) = std::str::from_utf8(&body) else {
        return json(
          StatusCode::BAD_REQUEST,
          &serde_json::json!({ "error": "the secret's value must be UTF-8 text" }),
        );
      };
      match deployments.set_secret(name, key, value).await {
        // The value is never echoed back.
        Ok(()) => json(
          StatusCode::OK,
          &serde_json::json!({ "name": name, "secret": key }),
        ),
        Err(err) => error(err),
      }
    }
    (Method::DELETE, [name, "secrets", key]) => match deployments.delete_secret(name, key).await {
      Ok(()) => json(StatusCode::OK, &serde_json::json!({ "deleted": key })),
      Err(err) => error(err),
    },
    (Method::GET, [name, "secrets"]) => match deployments.secret_names(name) {
      Ok(names) => json(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "secrets": names }),
      ),
      Err(err) => error(err),
    },
    (Method::DELETE, [name]) => match deployments.delete(name).await {
      Ok(()) => json(StatusCode::OK, &serde_json::json!({ "deleted": name })),
      Err(err) => error(err),
    },
    (Method::GET, [name, "versions"]) => match deployments.versions(name) {
      Ok(versions) => json(
        StatusCode::OK,
        &serde_json::json!({ "name": name, "versions": versions }),
      ),
      Err(err) => error(err),
    },
    (Method::POST, [name, action @ ("activate" | "split")]) => {
      let body = match read_body(request, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(response) => return response,
      };
      let activation = if *action == "activate" {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Activate {
          version: String,
        }
        serde_json::from_slice::<Activate>(&body)
          .map(|a| Activation {
            versions: [(a.version, 100)].into(),
            sticky: None,
          })
          .map_err(|err| format!("the body must be {{\"version\": \"...\"}}: {err}"))
      } else {
        serde_json::from_slice::<Activation>(&body).map_err(|err| {
          format!(
            "the body must be {{\"versions\": {{\"a\": 95, \"b\": 5}}}}, optionally with \"sticky\": {{\"header\": \"x-user\"}} or {{\"cookie\": \"uid\"}}: {err}"
          )
        })
      };
      let activation = match activation {
        Ok(activation) => activation,
        Err(message) => {
          return json(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({ "error": message }),
          );
        }
      };
      let versions = activation.versions.clone();
      match deployments.activate(name, activation).await {
        Ok(()) => json(
          StatusCode::OK,
          &serde_json::json!({ "name": name, "versions": versions, "warnings": admin.node.shadowed_routes(name) }),
        ),
        Err(err) => error(err),
      }
    }
    (method, _) => json(
      StatusCode::NOT_FOUND,
      &serde_json::json!({ "error": format!("no admin endpoint {method} /functions{rest}: see GET /functions, PUT|DELETE /functions/NAME, GET /functions/NAME/versions, POST /functions/NAME/activate|split|rollback, PUT|DELETE /functions/NAME/secrets/KEY") }),
    ),
  }
}

/// Follows function `name`: its access records and console lines as they come, one JSON
/// object per line, until the client goes away. A follower too slow to keep up gets
/// `{"kind": "missed", "lines": N}` in place of what it missed.
fn tail(admin: &Admin, name: &str) -> Response<AdminBody> {
  if let Err(message) = crate::config::check_function_name(name) {
    return json(
      StatusCode::BAD_REQUEST,
      &serde_json::json!({ "error": message }),
    );
  }
  let Some(tails) = &admin.node.tails else {
    return json(
      StatusCode::NOT_FOUND,
      &serde_json::json!({ "error": "this node has no function tails" }),
    );
  };
  let receiver = tails.follow();
  let name: std::sync::Arc<str> = name.into();
  let lines = futures::stream::unfold(receiver, move |mut receiver| {
    let name = name.clone();
    async move {
      loop {
        let line = match receiver.recv().await {
          Ok(line) if line.function == name => format!("{}\n", line.json),
          Ok(_) => continue,
          Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
            format!("{{\"kind\":\"missed\",\"lines\":{missed}}}\n")
          }
          Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        let frame = http_body::Frame::data(Bytes::from(line));
        return Some((Ok::<_, Infallible>(frame), receiver));
      }
    }
  });
  let mut response = Response::new(http_body_util::StreamBody::new(lines).boxed_unsync());
  response.headers_mut().insert(
    CONTENT_TYPE,
    HeaderValue::from_static("application/x-ndjson"),
  );
  response
}

/// Reads a request body of at most `limit` bytes, or answers 400/413.
async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Response<AdminBody>> {
  Limited::new(request.into_body(), limit)
    .collect()
    .await
    .map(|body| body.to_bytes())
    .map_err(|err| {
      let status = if err.is::<http_body_util::LengthLimitError>() {
        StatusCode::PAYLOAD_TOO_LARGE
      } else {
        StatusCode::BAD_REQUEST
      };
      json(
        status,
        &serde_json::json!({ "error": format!("cannot read the request body (at most {limit} bytes): {err}") }),
      )
    })
}

fn readiness(admin: &Admin) -> Response<AdminBody> {
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

fn usage(admin: &Admin, query: Option<&str>) -> Response<AdminBody> {
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

fn json(status: StatusCode, value: &serde_json::Value) -> Response<AdminBody> {
  let mut response = Response::new(Full::new(Bytes::from(format!("{value}\n"))).boxed_unsync());
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
