//! One function call: a request on its way into a function's isolates, and what comes back
//! turned into the response (the function's own, or one Outpost makes when a limit or a
//! failure ended the request). Admission (node-wide and per function concurrency), the
//! wall-clock limit and the response body's guards live here.

use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use outpost_ext_dispatch::{
  Body, BoxError, DispatchRequest, EndOnDrop, FailureKind, OutboundTrace, RequestEnd, RequestId,
  full_body,
};
use tokio::sync::{Notify, oneshot};

use super::NodeState;
use super::function::RoutedFunction;
use super::hop_by_hop;
use crate::isolate::InFlightGuard;
use crate::limits::Admitted;
use crate::observe::access_log::AccessRecord;
use crate::observe::trace_context::TraceContext;
use crate::shard::Shard;

/// Response header naming the request id on every response.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("outpost-request-id");
/// Response header set on responses Outpost generated itself, naming why.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("outpost-error");
/// Response header naming the limit that ended a request.
pub const TERMINATION_HEADER: HeaderName = HeaderName::from_static("outpost-termination");

/// A request on its way into a function.
pub struct FunctionCall {
  /// The function (the version of it, for deployed functions) that answers.
  pub function: Arc<RoutedFunction>,
  /// The shard the request came in on (its isolates there are called on this thread), or
  /// `None` for a call from elsewhere (service bindings).
  pub shard: Option<Rc<Shard>>,
  /// Where the request is in its trace; outbound fetches continue it.
  pub trace: TraceContext,
  pub method: Method,
  /// The full URL the client asked for.
  pub url: String,
  /// The request headers, hop-by-hop ones removed.
  pub headers: http::HeaderMap,
  pub body: Option<Body>,
  /// Set when the request body grew past `server.max_body_bytes` while streaming.
  pub body_exceeded: Arc<AtomicBool>,
  /// The request's access record; its id is the request id.
  pub access: Arc<AccessRecord>,
  pub active: ActiveRequest,
  /// `request.cf` fields.
  pub cf: Vec<(&'static str, String)>,
}

impl FunctionCall {
  /// The request's head as the cache sees it: method, URL and headers.
  pub fn cache_request(&self) -> http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = self.method.clone();
    if let Ok(uri) = self.url.parse() {
      head.uri = uri;
    }
    head.headers = self.headers.clone();
    head
  }
}

/// Hands a request to its function and turns what comes back into the response: `Ok` with
/// the function's own (hop-by-hop headers removed; its body guarded by the request's limits
/// until sent), or `Err` with one Outpost made when a limit or a failure ended the request.
pub async fn call_function(
  state: &NodeState,
  call: FunctionCall,
) -> Result<Response<Body>, Response<Body>> {
  let FunctionCall {
    function,
    shard,
    trace,
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
  let RoutedFunction {
    pool,
    limits,
    slots,
    ..
  } = &*function;
  // The wall-clock limit covers everything from here on, the response body included: one
  // timer, registered once, watches the dispatch, the handler and the body in turn.
  let mut deadline = Box::pin(tokio::time::sleep(limits.wall));
  let admitted = match state.admission.admit(slots).await {
    Ok(admitted) => admitted,
    Err(rejection) => {
      tracing::warn!(%request_id, function = pool.name(), ?rejection, "overloaded");
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
      return Err(response);
    }
  };
  let end = RequestEnd::default();
  // Ends the request on the isolate's side (body streaming, `request.signal`) when this call
  // is dropped: the client went away, a limit ended it, or its response was sent.
  let end_on_drop = end.clone().end_on_drop();
  let (reply, replied) = oneshot::channel();
  let dispatched = pool.dispatch(
    shard.as_ref(),
    DispatchRequest {
      method,
      url,
      headers,
      body,
      end: end.clone(),
      reply,
      usage: Arc::new(access.usage()),
      cf,
      trace: Some(OutboundTrace {
        traceparent: trace.outbound_traceparent(),
        tracestate: trace.tracestate,
      }),
    },
  );
  let in_flight = match before(&mut deadline, dispatched).await {
    None => return Err(wall_time_exceeded(pool.name(), limits.wall)),
    Some(Ok(guard)) => {
      access.set_cold(guard.first());
      guard
    }
    Some(Err(err)) => {
      tracing::warn!(%request_id, function = pool.name(), error = %err, "function unavailable");
      // The reason names server paths and source lines: it stays in the log unless the
      // node shows error details (`server.error_details`, for development).
      let details = if state.error_details {
        format!(": {err}")
      } else {
        "; the reason is in the server log".into()
      };
      return Err(outpost_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "function-unavailable",
        format!(
          "outpost: function {:?} is unavailable (request id {request_id}){details}\n",
          pool.name()
        ),
      ));
    }
  };
  let Some(replied) = before(&mut deadline, replied).await else {
    // Dropping the guard cancels the request's token: body streaming stops.
    drop(end_on_drop);
    tracing::warn!(
      %request_id,
      function = pool.name(),
      "wall-clock limit reached"
    );
    return Err(wall_time_exceeded(pool.name(), limits.wall));
  };
  // A body that outgrew the limit while streaming (no or a false Content-Length) makes the
  // answer 413, whatever the handler made of the failed read.
  if body_exceeded.load(Ordering::Relaxed) {
    return Err(body_too_large(state.max_body_bytes));
  }
  let answer = match replied {
    Ok(Ok(mut response)) => {
      hop_by_hop::strip_response(response.headers_mut());
      // Framing is ours: hyper derives Content-Length from the body (exact for inline
      // bodies, also for HEAD) or streams it chunked. A handler's own value could contradict
      // the body and break the connection.
      response.headers_mut().remove(http::header::CONTENT_LENGTH);
      return Ok(response.map(|body| {
        GuardedBody {
          inner: body,
          end: end_on_drop,
          deadline,
          _active: active,
          _in_flight: in_flight,
          _admitted: admitted,
        }
        .boxed_unsync()
      }));
    }
    Ok(Err(failure)) => {
      let what = match failure.kind {
        FailureKind::Exception => "threw an exception",
        FailureKind::NotAResponse => "did not return a Response",
      };
      tracing::error!(
        %request_id,
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
        %request_id,
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
        %request_id,
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
        %request_id,
        function = pool.name(),
        "the isolate stopped before answering"
      );
      outpost_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "isolate-stopped",
        format!("outpost: the isolate stopped before answering (request id {request_id})\n"),
      )
    }
  };
  Err(answer)
}

/// `future`'s output, or `None` once `deadline` has passed first.
async fn before<F: Future>(
  deadline: &mut Pin<Box<tokio::time::Sleep>>,
  future: F,
) -> Option<F::Output> {
  tokio::select! {
    biased;
    output = future => Some(output),
    () = deadline.as_mut() => None,
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

pub fn body_too_large(limit: u64) -> Response<Body> {
  outpost_response(
    StatusCode::PAYLOAD_TOO_LARGE,
    "body-too-large",
    format!("outpost: the request body is larger than this node accepts ({limit} bytes)\n"),
  )
}

/// A request body that fails once more than `remaining` bytes have come, and says so.
pub struct LimitedBody {
  pub inner: Incoming,
  pub remaining: u64,
  pub exceeded: Arc<AtomicBool>,
  /// Bytes read so far, for the access record.
  pub read: Arc<AtomicU64>,
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
pub fn outpost_response(status: StatusCode, reason: &'static str, body: String) -> Response<Body> {
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
  /// Marked finished once the body has been sent in full; ends the request when dropped.
  end: EndOnDrop,
  deadline: Pin<Box<tokio::time::Sleep>>,
  _active: ActiveRequest,
  _in_flight: InFlightGuard,
  _admitted: Admitted,
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
      self.end.finish();
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

/// Request ids: a random per-process prefix plus a counter, so ids from different runs
/// are unlikely to collide.
pub struct RequestIds {
  prefix: u32,
  counter: AtomicU64,
}

impl Default for RequestIds {
  fn default() -> RequestIds {
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
}

impl RequestIds {
  /// The next id: 8 hex digits of the prefix, 12 of the counter.
  pub fn next(&self) -> RequestId {
    RequestId::new(self.prefix, self.counter.fetch_add(1, Ordering::Relaxed))
  }
}

/// How many requests a connection has in flight, and since when it has had none.
pub struct ConnectionActivity {
  in_flight: AtomicUsize,
  idle_since: std::sync::Mutex<tokio::time::Instant>,
  became_idle: Notify,
}

impl Default for ConnectionActivity {
  fn default() -> ConnectionActivity {
    ConnectionActivity {
      in_flight: AtomicUsize::new(0),
      idle_since: std::sync::Mutex::new(tokio::time::Instant::now()),
      became_idle: Notify::new(),
    }
  }
}

impl ConnectionActivity {
  /// Counts a request as in flight until the returned guard is dropped.
  pub fn begin(self: &Arc<Self>) -> ActiveRequest {
    self.in_flight.fetch_add(1, Ordering::Relaxed);
    ActiveRequest(self.clone())
  }

  /// Resolves once the connection has had no request in flight for `timeout`.
  pub async fn idle_for(&self, timeout: Duration) {
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
pub struct ActiveRequest(Arc<ConnectionActivity>);

impl Drop for ActiveRequest {
  fn drop(&mut self) {
    if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
      *self.0.idle_since.lock().expect("activity lock") = tokio::time::Instant::now();
      self.0.became_idle.notify_waiters();
    }
  }
}

/// Why Outpost answered a request itself (its `outpost-termination` or `outpost-error`
/// header), when it did.
pub fn outpost_error<B>(response: &Response<B>) -> Option<&str> {
  let headers = response.headers();
  headers
    .get(TERMINATION_HEADER)
    .or_else(|| headers.get(ERROR_HEADER))
    .and_then(|v| v.to_str().ok())
}
