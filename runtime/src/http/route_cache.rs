//! Caching in front of a function (`cache = { enabled = true }` on it): GET responses the
//! HTTP caching rules let a shared cache keep are stored in the node's cache (the function's
//! namespace, store `Route`) as they stream out, and later requests are answered from it
//! without entering JS. Responses carry `outpost-cache: HIT`, `MISS` or `STALE`:
//! - fresh: served (`HIT`), with `Age`; a conditional request it satisfies gets 304;
//! - stale within `stale-while-revalidate`: served (`STALE`) while one background request
//!   to the function refreshes it;
//! - stale within `stale-if-error`: the function is asked, and when it fails (5xx, or a
//!   limit ended it) the stale response is served (`STALE`) instead.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::{Method, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use outpost_ext_cache::{CacheNamespace, CachedResponse, EdgeCache};
use outpost_ext_dispatch::{Body, BoxError, full_body};

use crate::cache::edge_cache::{Lookup, SharedCache, Store as CacheStore};
use crate::node::NodeState;
use crate::node::call::{ConnectionActivity, FunctionCall, call_function, outpost_error};
use crate::observe::access_log::{AccessRecord, RequestHead};
use crate::observe::trace_context::TraceContext;

/// Response header saying how route caching answered.
pub const CACHE_HEADER: &str = "outpost-cache";

/// Answers a GET or HEAD to a function with route caching on. A HEAD is answered from the
/// stored GET response (its head; the body is dropped on the way out); when nothing fresh is
/// stored it goes to the function, and nothing is stored from it.
pub async fn serve(state: &Arc<NodeState>, call: FunctionCall) -> Response<Body> {
  let namespace = CacheNamespace(call.function.name().into());
  let mut request = call.cache_request();
  let is_head = request.method == Method::HEAD;
  request.method = Method::GET;
  match state
    .cache
    .lookup_in(&namespace, CacheStore::Route, &request)
  {
    Lookup::Fresh(found) => cached(found, "HIT"),
    Lookup::StaleWhileRevalidate(found) => {
      revalidate(state, &call, namespace, request);
      cached(found, "STALE")
    }
    Lookup::Miss { if_error } => {
      let response = match call_function(state, call).await {
        Ok(response) if is_head => response,
        Ok(response) => ResponseStore {
          cache: state.cache.clone(),
          namespace,
          request,
        }
        .keep(response),
        Err(response) => response,
      };
      match if_error {
        Some(stale) if response.status().is_server_error() => cached(stale, "STALE"),
        _ => response,
      }
    }
  }
}

/// A response from the cache.
fn cached(found: CachedResponse, how: &'static str) -> Response<Body> {
  let mut response = Response::from_parts(found.head, full_body(found.body));
  response
    .headers_mut()
    .insert(CACHE_HEADER, HeaderValue::from_static(how));
  response
}

/// Asks the function again in the background and stores its answer, unless a refresh of
/// the same URL is already under way.
fn revalidate(
  state: &Arc<NodeState>,
  call: &FunctionCall,
  namespace: CacheNamespace,
  request: http::request::Parts,
) {
  let key = format!("{}\n{}", namespace.0, call.url);
  if !state
    .revalidating
    .lock()
    .expect("revalidating lock")
    .insert(key.clone())
  {
    return;
  }
  let mut headers = request.headers.clone();
  for conditional in [http::header::IF_NONE_MATCH, http::header::IF_MODIFIED_SINCE] {
    headers.remove(conditional);
  }
  // The refresh is a request of its own, with its own access record (method GET, the
  // client request's host and path).
  let access = AccessRecord::new(
    state.observers.clone(),
    state.request_ids.next(),
    Some(RequestHead {
      method: Method::GET,
      uri: call.url.parse().unwrap_or_default(),
      host: None,
    }),
  );
  access.set_function(&call.function.identity);
  let trace = TraceContext::from_headers(&headers);
  access.set_trace(&trace);
  let refresh = FunctionCall {
    function: call.function.clone(),
    shard: call.shard.clone(),
    trace,
    method: Method::GET,
    url: call.url.clone(),
    headers,
    body: None,
    body_exceeded: Arc::new(AtomicBool::new(false)),
    access: access.clone(),
    active: Arc::new(ConnectionActivity::default()).begin(),
    cf: call.cf.clone(),
  };
  let store = ResponseStore {
    cache: state.cache.clone(),
    namespace,
    request,
  };
  let state = state.clone();
  // On the shard the request came in on (a refresh of a service binding's call has none).
  tokio::task::spawn_local(async move {
    let response = match call_function(&state, refresh).await {
      Ok(response) => store.keep(response),
      Err(response) => response,
    };
    let status = response.status().as_u16();
    let error = outpost_error(&response).map(str::to_string);
    let body = access.respond(status, error.as_deref(), response.into_body());
    // Reading the body to its end is what stores it.
    if let Err(err) = body.collect().await {
      tracing::warn!(url = key, error = %err, "background revalidation failed");
    }
    state
      .revalidating
      .lock()
      .expect("revalidating lock")
      .remove(&key);
  });
}

/// Where a function's response to a cacheable request may be kept.
struct ResponseStore {
  cache: Arc<SharedCache>,
  namespace: CacheNamespace,
  request: http::request::Parts,
}

impl ResponseStore {
  /// Marks the function's response `outpost-cache: MISS` and, when the caching rules allow
  /// storing it, copies its body into the cache as it streams out (up to
  /// `cache.max_entry_bytes`; a larger body is sent but not stored).
  fn keep(self, response: Response<Body>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    let storable = self.cache.storable(&self.namespace, &self.request, &parts);
    let head = {
      let (mut head, ()) = Response::new(()).into_parts();
      head.status = parts.status;
      head.headers = parts.headers.clone();
      head
    };
    parts
      .headers
      .insert(CACHE_HEADER, HeaderValue::from_static("MISS"));
    if !storable {
      return Response::from_parts(parts, body);
    }
    let limit = self.cache.max_entry_bytes();
    let tee = TeeBody {
      expected: http_body::Body::size_hint(&body).exact(),
      inner: body,
      collected: Some(BytesMut::new()),
      limit,
      head: Some(head),
      store: self,
    };
    Response::from_parts(parts, tee.boxed_unsync())
  }
}

/// A response body that is also collected, and stored once it has been sent in full: when
/// it ends, or, for a body of known length (which the connection may stop polling once it
/// has all of it), when the last byte has passed.
struct TeeBody {
  inner: Body,
  /// The body's length, when known up front.
  expected: Option<u64>,
  /// `None` once the body outgrew `limit` (or failed): nothing is stored.
  collected: Option<BytesMut>,
  limit: usize,
  head: Option<http::response::Parts>,
  store: ResponseStore,
}

impl http_body::Body for TeeBody {
  type Data = Bytes;
  type Error = BoxError;

  fn poll_frame(
    mut self: Pin<&mut Self>,
    cx: &mut Context<'_>,
  ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let polled = Pin::new(&mut self.inner).poll_frame(cx);
    match &polled {
      Poll::Ready(Some(Ok(frame))) => {
        if let Some(data) = frame.data_ref() {
          let limit = self.limit;
          if let Some(collected) = &mut self.collected {
            if collected.len() + data.len() > limit {
              self.collected = None;
            } else {
              collected.extend_from_slice(data);
            }
          }
        }
        if self.inner.is_end_stream() {
          self.finish();
        }
      }
      Poll::Ready(Some(Err(_))) => self.collected = None,
      Poll::Ready(None) => self.finish(),
      Poll::Pending => {}
    }
    polled
  }

  fn is_end_stream(&self) -> bool {
    self.inner.is_end_stream()
  }

  fn size_hint(&self) -> http_body::SizeHint {
    self.inner.size_hint()
  }
}

impl TeeBody {
  /// Stores the collected body, once.
  fn finish(&mut self) {
    if let (Some(collected), Some(head)) = (self.collected.take(), self.head.take()) {
      let ResponseStore {
        cache,
        namespace,
        request,
      } = &self.store;
      cache.store_in(
        namespace,
        CacheStore::Route,
        request,
        head,
        collected.freeze(),
      );
    }
  }
}

impl Drop for TeeBody {
  fn drop(&mut self) {
    // A body of known length that was sent in full, whose end was never polled.
    let complete = self
      .collected
      .as_ref()
      .is_some_and(|c| Some(c.len() as u64) == self.expected);
    if complete {
      self.finish();
    }
  }
}
