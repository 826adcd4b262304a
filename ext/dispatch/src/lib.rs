//! `outpost_dispatch`: the deno_core extension that hands HTTP requests into an isolate and
//! carries responses back out.
//!
//! The server builds a [`DispatchRequest`] (method, URL, headers, a streaming body, a
//! [`RequestEnd`] and a oneshot reply) and pushes it onto the isolate's [`RequestQueue`]
//! on the isolate's thread. Inside the isolate, the JS serve loop pulls requests with
//! `op_dispatch_next`, turns them into
//! `Request` objects (`01_dispatch.js`), and answers with `op_dispatch_respond` or
//! `op_dispatch_fail`. Bodies stream both ways through bounded channels; nothing is buffered
//! whole.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use deno_core::convert::{ByteString, Uint8Array};
use deno_core::{
  AsyncRefCell, AsyncResult, BufView, CancelHandle, CancelTryFuture, OpState, RcRef, Resource,
  ResourceId, ToV8, op2, v8,
};
use deno_error::JsErrorBox;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::{mpsc, oneshot};

/// Error type of bodies that cross the isolate boundary.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A streaming HTTP body that can be sent between threads.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// How many body chunks may wait between the isolate and the connection before the producer
/// is paused. With 64 KiB reads this bounds a response's in-flight data to about 512 KiB.
const BODY_CHANNEL_CHUNKS: usize = 8;
/// Largest chunk read from a JS response stream at once.
const RESPONSE_READ_CHUNK: usize = 64 * 1024;

/// One request handed from the server to an isolate.
pub struct DispatchRequest {
  pub method: http::Method,
  /// The full URL the client asked for: scheme, host, path and query.
  pub url: String,
  pub headers: http::HeaderMap,
  /// `None` when the request has no body (e.g. a GET).
  pub body: Option<Body>,
  /// Ended by the server when the request is over: stops body streaming, and aborts
  /// `request.signal` unless the request finished.
  pub end: RequestEnd,
  pub reply: oneshot::Sender<DispatchReply>,
  /// Filled in by the isolate as the request uses CPU.
  pub usage: Arc<RequestUsage>,
  /// What is known of the client, as `request.cf` fields (Workers names).
  pub cf: Vec<(&'static str, String)>,
  /// Trace context for the handler's outbound `fetch()` calls.
  pub trace: Option<OutboundTrace>,
}

/// How a request ends, shared by the server and the isolate. The server ends it when it is
/// over: the client went away, a limit ended it, or its response was sent in full (then it
/// is marked finished first). The isolate's body streaming and `request.signal` watch it.
/// (One allocation and atomics: a request is ended once and asked often, and a cancellation
/// tree's locks are not needed.)
#[derive(Clone, Default)]
pub struct RequestEnd(Arc<EndState>);

#[derive(Default)]
struct EndState {
  over: AtomicBool,
  finished: AtomicBool,
  waiters: tokio::sync::Notify,
}

impl RequestEnd {
  /// Ends the request (once; later calls do nothing).
  pub fn end(&self) {
    if !self.0.over.swap(true, Ordering::AcqRel) {
      self.0.waiters.notify_waiters();
    }
  }

  /// Marks the response as sent in full; the end that follows is not an abort.
  pub fn finish(&self) {
    self.0.finished.store(true, Ordering::Release);
  }

  pub fn is_over(&self) -> bool {
    self.0.over.load(Ordering::Acquire)
  }

  /// Whether the response was sent in full.
  pub fn finished(&self) -> bool {
    self.0.finished.load(Ordering::Acquire)
  }

  /// Resolves once the request is over.
  pub async fn ended(&self) {
    loop {
      let notified = self.0.waiters.notified();
      let mut notified = std::pin::pin!(notified);
      // Registered before the check, so an end between the two is not missed.
      notified.as_mut().enable();
      if self.is_over() {
        return;
      }
      notified.await;
    }
  }

  /// Ends the request when the returned guard is dropped.
  pub fn end_on_drop(self) -> EndOnDrop {
    EndOnDrop(self)
  }
}

/// Ends its request when dropped (see [`RequestEnd::end_on_drop`]).
pub struct EndOnDrop(RequestEnd);

impl EndOnDrop {
  /// Marks the response as sent in full (see [`RequestEnd::finish`]).
  pub fn finish(&self) {
    self.0.finish();
  }
}

impl Drop for EndOnDrop {
  fn drop(&mut self) {
    self.0.end();
  }
}

/// The W3C trace headers every `fetch()` of a request carries unless the handler sets them.
#[derive(Debug, Clone)]
pub struct OutboundTrace {
  pub traceparent: String,
  pub tracestate: Option<String>,
}

/// What the isolate answers for one request.
pub type DispatchReply = Result<http::Response<Body>, HandlerFailure>;

/// Why a handler produced no response.
#[derive(Debug, Clone)]
pub struct HandlerFailure {
  pub kind: FailureKind,
  /// The exception's stack (or message) as JS rendered it.
  pub detail: String,
}

/// Classes of handler failure, as reported by the JS serve loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
  /// The handler threw or its promise rejected.
  Exception,
  /// The handler resolved to something that is not a `Response`.
  NotAResponse,
}

/// An isolate's requests, waiting to be taken by its JS serve loop (`op_dispatch_next`).
/// It lives on the isolate's thread: whoever hands a request over pushes it here and wakes
/// the serve loop's op with a local waker, with no channel, lock or system call between.
/// Kept in `OpState` as `Rc<RequestQueue>`.
#[derive(Default)]
pub struct RequestQueue {
  requests: RefCell<std::collections::VecDeque<DispatchRequest>>,
  /// The serve loop's op, parked while the queue is empty.
  waiting: RefCell<Option<std::task::Waker>>,
  closed: std::cell::Cell<bool>,
}

impl RequestQueue {
  /// Queues `request` and wakes the serve loop; hands it back once the queue is closed.
  pub fn push(&self, request: DispatchRequest) -> Result<(), Box<DispatchRequest>> {
    if self.closed.get() {
      return Err(Box::new(request));
    }
    self.requests.borrow_mut().push_back(request);
    if let Some(waker) = self.waiting.borrow_mut().take() {
      waker.wake();
    }
    Ok(())
  }

  /// Takes no more requests: the serve loop ends once it has taken those queued.
  pub fn close(&self) {
    self.closed.set(true);
    if let Some(waker) = self.waiting.borrow_mut().take() {
      waker.wake();
    }
  }

  /// Whether it was closed.
  pub fn is_closed(&self) -> bool {
    self.closed.get()
  }

  /// Requests queued and not yet taken.
  pub fn len(&self) -> usize {
    self.requests.borrow().len()
  }

  /// Whether no request waits.
  pub fn is_empty(&self) -> bool {
    self.requests.borrow().is_empty()
  }

  fn poll_next(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<DispatchRequest>> {
    if let Some(request) = self.requests.borrow_mut().pop_front() {
      return std::task::Poll::Ready(Some(request));
    }
    if self.closed.get() {
      return std::task::Poll::Ready(None);
    }
    *self.waiting.borrow_mut() = Some(cx.waker().clone());
    std::task::Poll::Pending
  }
}

/// Requests taken from the queue and not yet answered, by dispatch id.
#[derive(Default)]
struct InFlight {
  next_id: u32,
  pending: HashMap<u32, PendingReply>,
  /// How each request taken off the queue ends, for `request.signal`; dropped once over.
  endings: HashMap<u32, RequestEnd>,
  /// Usage of the requests answered during the current entry into JS: they still get
  /// their share of it when it ends.
  answered: Vec<Arc<RequestUsage>>,
}

struct PendingReply {
  reply: oneshot::Sender<DispatchReply>,
  end: RequestEnd,
  usage: Arc<RequestUsage>,
  /// The CPU time charged while it was the only request in flight: the time that is
  /// certainly its own, and what its CPU limit is enforced on.
  cpu_alone: Duration,
}

/// A request's id (the `outpost-request-id` response header): 20 lowercase hex digits, 8
/// of a per-process prefix and 12 of a counter, kept inline so that handing it around (to
/// the access record, the isolate, the logs) allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId([u8; 20]);

impl RequestId {
  /// The id made of `prefix` and the low 48 bits of `count`.
  pub fn new(prefix: u32, count: u64) -> RequestId {
    let mut bytes = [0u8; 10];
    bytes[..4].copy_from_slice(&prefix.to_be_bytes());
    bytes[4..].copy_from_slice(&count.to_be_bytes()[2..]);
    let mut id = [0u8; 20];
    // 10 bytes make exactly 20 digits: this cannot fail.
    let _ = hex::encode_to_slice(bytes, &mut id);
    RequestId(id)
  }

  pub fn as_str(&self) -> &str {
    // Hex digits only, by construction.
    std::str::from_utf8(&self.0).unwrap_or_default()
  }
}

impl std::fmt::Display for RequestId {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.write_str(self.as_str())
  }
}

impl std::fmt::Debug for RequestId {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.write_str(self.as_str())
  }
}

/// What a request used inside its isolate, shared between the server and the isolate. It
/// is complete when the last holder lets go, after the entry into JS that answered the
/// request has been charged; its observer is told then.
pub struct RequestUsage {
  request_id: RequestId,
  cpu_ns: AtomicU64,
  heap_peak: AtomicUsize,
  subrequests: AtomicU32,
  observer: Option<Arc<dyn UsageObserver>>,
}

/// Told once of a request's complete usage, when the last holder of its [`RequestUsage`]
/// lets go.
pub trait UsageObserver: Send + Sync {
  fn complete(&self, usage: &RequestUsage);
}

impl std::fmt::Debug for RequestUsage {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.debug_struct("RequestUsage")
      .field("request_id", &self.request_id)
      .field("cpu", &self.cpu())
      .field("heap_peak", &self.heap_peak())
      .field("subrequests", &self.subrequests())
      .finish_non_exhaustive()
  }
}

impl Drop for RequestUsage {
  fn drop(&mut self) {
    if let Some(observer) = self.observer.take() {
      observer.complete(self);
    }
  }
}

impl RequestUsage {
  pub fn new(request_id: RequestId) -> RequestUsage {
    RequestUsage::with_observer(request_id, None)
  }

  /// The id of the request (the `outpost-request-id` response header).
  pub fn request_id(&self) -> RequestId {
    self.request_id
  }

  /// Usage that tells `observer` of itself once complete.
  pub fn observed_by(request_id: RequestId, observer: Arc<dyn UsageObserver>) -> RequestUsage {
    RequestUsage::with_observer(request_id, Some(observer))
  }

  fn with_observer(
    request_id: RequestId,
    observer: Option<Arc<dyn UsageObserver>>,
  ) -> RequestUsage {
    RequestUsage {
      request_id,
      cpu_ns: AtomicU64::new(0),
      heap_peak: AtomicUsize::new(0),
      subrequests: AtomicU32::new(0),
      observer,
    }
  }

  /// CPU time charged to the request, its share of entries into JS it was in flight for
  /// included, up to and including the entry in which it was answered.
  pub fn cpu(&self) -> Duration {
    Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed))
  }

  /// The most memory (V8 heap in use plus ArrayBuffer bytes) its isolate held at the end of
  /// an entry into JS while the request was in flight.
  pub fn heap_peak(&self) -> usize {
    self.heap_peak.load(Ordering::Relaxed)
  }

  /// `fetch()` calls the handler made before its response was handed over.
  pub fn subrequests(&self) -> u32 {
    self.subrequests.load(Ordering::Relaxed)
  }

  fn charge(&self, cpu: Duration, heap: usize) {
    self.cpu_ns.fetch_add(nanos(cpu), Ordering::Relaxed);
    self.heap_peak.fetch_max(heap, Ordering::Relaxed);
  }
}

fn nanos(duration: Duration) -> u64 {
  u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// How many requests are in flight on this isolate, and the most CPU time any of them used
/// while it was alone.
pub fn cpu_in_flight(state: &OpState) -> (usize, Duration) {
  let in_flight = state.borrow::<InFlight>();
  let most = in_flight
    .pending
    .values()
    .map(|p| p.cpu_alone)
    .max()
    .unwrap_or_default();
  (in_flight.pending.len(), most)
}

/// The CPU budget of the current entry into JS, as the dispatch ops see it (put into
/// `OpState` as `Arc<dyn EntryBudget>` by the runtime).
pub trait EntryBudget {
  /// A request was taken off the queue during the entry: its handler may run in this
  /// entry too, so the entry may use one more request's worth of CPU.
  fn request_joined(&self);
}

/// Charges one entry into JS to the requests in flight and those answered during the
/// entry: `cpu` split evenly among them (JS runs them interleaved on one thread, so no finer
/// attribution exists), and the isolate's memory after the entry (`memory` is only called
/// when some request is charged). Time spent with no request around (`waitUntil` work,
/// timers) is charged to none.
///
/// Returns how many requests were answered during the entry.
pub fn charge_entry(state: &mut OpState, cpu: Duration, memory: impl FnOnce() -> usize) -> usize {
  let in_flight = state.borrow_mut::<InFlight>();
  let alone = in_flight.pending.len() == 1 && in_flight.answered.is_empty();
  let answered = in_flight.answered.len();
  let share = match u32::try_from(in_flight.pending.len() + answered) {
    Ok(0) | Err(_) => return 0,
    Ok(n) => cpu / n,
  };
  let memory = memory();
  for pending in in_flight.pending.values_mut() {
    pending.usage.charge(share, memory);
    if alone {
      pending.cpu_alone += share;
    }
  }
  for usage in in_flight.answered.drain(..) {
    usage.charge(share, memory);
  }
  answered
}

/// Errors the dispatch ops raise into JS.
#[derive(Debug, thiserror::Error, deno_error::JsError)]
pub enum DispatchError {
  #[class(type)]
  #[error("dispatch id {0} is not in flight (already answered or never issued)")]
  UnknownDispatch(u32),
  #[class(type)]
  #[error("invalid response status {0}: must be a status code from 100 to 999")]
  InvalidStatus(u32),
  #[class(type)]
  #[error("invalid response header {name:?}: {reason}")]
  InvalidHeader { name: String, reason: String },
  #[class(type)]
  #[error("{0}")]
  Service(String),
  #[class(inherit)]
  #[error(transparent)]
  Resource(#[from] deno_core::error::ResourceError),
}

deno_core::extension!(
  outpost_dispatch,
  deps = [deno_webidl, deno_web, deno_fetch],
  ops = [
    op_dispatch_next,
    op_dispatch_respond,
    op_dispatch_fail,
    op_dispatch_subrequest,
    op_dispatch_cancelled,
    op_dispatch_service
  ],
  esm = ["01_dispatch.js"],
  options = { queue: Option<Rc<RequestQueue>> },
  state = |state, options| {
    state.put(InFlight::default());
    if let Some(queue) = options.queue {
      state.put(queue);
    }
  },
);

/// A request as the JS side sees it when it comes off the queue. It crosses into JS once,
/// as one array of fixed layout (see [`NextRequest::to_v8`]): every request then has the
/// same shape in V8. (`#[derive(ToV8)]` makes an object with a null prototype, which V8
/// builds in dictionary mode, a slow object, on every request.)
pub struct NextRequest {
  id: u32,
  method: http::Method,
  url: String,
  headers: http::HeaderMap,
  body_rid: Option<u32>,
  cf: Vec<(&'static str, String)>,
  request_id: RequestId,
  trace: Option<OutboundTrace>,
}

impl<'a> ToV8<'a> for NextRequest {
  type Error = std::convert::Infallible;

  /// `[id, method, url, headers, bodyRid, cf, requestId, traceparent, tracestate]`:
  /// `headers` as `[[name, value], ...]`, the header list deno_fetch keeps (byte strings),
  /// `cf` as `[[field, value], ...]`; absent values are `null`.
  fn to_v8<'i>(
    self,
    scope: &mut v8::PinScope<'a, 'i>,
  ) -> Result<v8::Local<'a, v8::Value>, Self::Error> {
    let null: v8::Local<v8::Value> = v8::null(scope).into();
    let headers: Vec<v8::Local<v8::Value>> = self
      .headers
      .iter()
      .map(|(name, value)| {
        let pair = [
          byte_string(
            scope,
            name.as_str().as_bytes(),
            v8::NewStringType::Internalized,
          ),
          byte_string(scope, value.as_bytes(), v8::NewStringType::Normal),
        ];
        v8::Array::new_with_elements(scope, &pair).into()
      })
      .collect();
    let cf: Vec<v8::Local<v8::Value>> = self
      .cf
      .iter()
      .map(|(field, value)| {
        let pair = [
          text(scope, field, v8::NewStringType::Internalized),
          text(scope, value, v8::NewStringType::Normal),
        ];
        v8::Array::new_with_elements(scope, &pair).into()
      })
      .collect();
    let (traceparent, tracestate) = match &self.trace {
      Some(trace) => (
        text(scope, &trace.traceparent, v8::NewStringType::Normal),
        trace
          .tracestate
          .as_deref()
          .map_or(null, |state| text(scope, state, v8::NewStringType::Normal)),
      ),
      None => (null, null),
    };
    let elements = [
      v8::Integer::new_from_unsigned(scope, self.id).into(),
      byte_string(
        scope,
        self.method.as_str().as_bytes(),
        v8::NewStringType::Internalized,
      ),
      text(scope, &self.url, v8::NewStringType::Normal),
      v8::Array::new_with_elements(scope, &headers).into(),
      self.body_rid.map_or(null, |rid| {
        v8::Integer::new_from_unsigned(scope, rid).into()
      }),
      v8::Array::new_with_elements(scope, &cf).into(),
      text(scope, self.request_id.as_str(), v8::NewStringType::Normal),
      traceparent,
      tracestate,
    ];
    Ok(v8::Array::new_with_elements(scope, &elements).into())
  }
}

/// A JS string of the bytes, one per character (a ByteString, as header values are).
fn byte_string<'a>(
  scope: &mut v8::PinScope<'a, '_>,
  bytes: &[u8],
  kind: v8::NewStringType,
) -> v8::Local<'a, v8::Value> {
  match v8::String::new_from_one_byte(scope, bytes, kind) {
    Some(string) => string.into(),
    // Only past V8's maximum string length, which the server's limits never let through.
    None => v8::String::empty(scope).into(),
  }
}

/// A JS string of UTF-8 text.
fn text<'a>(
  scope: &mut v8::PinScope<'a, '_>,
  text: &str,
  kind: v8::NewStringType,
) -> v8::Local<'a, v8::Value> {
  match v8::String::new_from_utf8(scope, text.as_bytes(), kind) {
    Some(string) => string.into(),
    None => v8::String::empty(scope).into(),
  }
}

/// Waits for the next request. Resolves to `null` once the queue is closed, which ends the
/// JS serve loop.
#[op2]
async fn op_dispatch_next(state: Rc<RefCell<OpState>>) -> Option<NextRequest> {
  let queue = state.borrow().try_borrow::<Rc<RequestQueue>>()?.clone();
  let request = std::future::poll_fn(|cx| queue.poll_next(cx)).await?;
  let mut state = state.borrow_mut();
  if let Some(budget) = state.try_borrow::<Arc<dyn EntryBudget>>() {
    budget.request_joined();
  }
  let body_rid = request.body.map(|body| {
    state
      .resource_table
      .add(RequestBodyResource::new(body, request.end.clone()))
  });
  let request_id = request.usage.request_id();
  let in_flight = state.borrow_mut::<InFlight>();
  let id = in_flight.next_id;
  in_flight.next_id = in_flight.next_id.wrapping_add(1);
  // Endings of requests that are over go, now and then, so the map holds about what is in
  // flight (a handler that never reads `request.signal` never asks for its entry).
  if in_flight.endings.len() > 2 * in_flight.pending.len() + 64 {
    in_flight.endings.retain(|_, end| !end.is_over());
  }
  in_flight.endings.insert(id, request.end.clone());
  in_flight.pending.insert(
    id,
    PendingReply {
      reply: request.reply,
      end: request.end,
      usage: request.usage,
      cpu_alone: Duration::ZERO,
    },
  );
  Some(NextRequest {
    id,
    method: request.method,
    url: request.url,
    headers: request.headers,
    body_rid,
    cf: request.cf,
    request_id,
    trace: request.trace,
  })
}

/// A response body the handler gave whole: a string (encoded as UTF-8 here, so JS makes no
/// `Uint8Array` of it first), a `Uint8Array`, or nothing (`null`).
pub struct InlineBody(Bytes);

impl<'a> deno_core::FromV8<'a> for InlineBody {
  type Error = JsErrorBox;

  fn from_v8<'i>(
    scope: &mut v8::PinScope<'a, 'i>,
    value: v8::Local<'a, v8::Value>,
  ) -> Result<Self, Self::Error> {
    if value.is_null_or_undefined() {
      return Ok(InlineBody(Bytes::new()));
    }
    if let Ok(text) = v8::Local::<v8::String>::try_from(value) {
      // Lone surrogates become U+FFFD, as TextEncoder makes them.
      return Ok(InlineBody(Bytes::from(
        text.to_rust_string_lossy(scope).into_bytes(),
      )));
    }
    if let Ok(bytes) = <Uint8Array as deno_core::convert::FromV8Scopeless>::from_v8(value) {
      return Ok(InlineBody(Bytes::from(bytes.0)));
    }
    Err(JsErrorBox::type_error(
      "a response body must be a string, a Uint8Array or null",
    ))
  }
}

/// Sends the handler's response. The body is either inline (`body`: text or bytes), a stream
/// resource (`body_rid`, streamed out chunk by chunk), or neither (empty body).
#[op2]
fn op_dispatch_respond(
  state: &mut OpState,
  #[smi] id: u32,
  #[smi] status: u32,
  #[scoped] headers: Vec<(ByteString, ByteString)>,
  #[scoped] body: InlineBody,
  #[smi] body_rid: Option<ResourceId>,
) -> Result<(), DispatchError> {
  if !state.borrow::<InFlight>().pending.contains_key(&id) {
    return Err(DispatchError::UnknownDispatch(id));
  }
  // Validate everything before taking the reply, so that a bad response can still be
  // reported with op_dispatch_fail.
  let status = u16::try_from(status)
    .ok()
    .and_then(|s| http::StatusCode::from_u16(s).ok())
    .ok_or(DispatchError::InvalidStatus(status))?;
  let header_map = header_map(headers)
    .map_err(|InvalidHeader { name, reason }| DispatchError::InvalidHeader { name, reason })?;
  let resource = body_rid
    .map(|rid| state.resource_table.take_any(rid))
    .transpose()?;
  let in_flight = state.borrow_mut::<InFlight>();
  let pending = in_flight.pending.remove(&id).expect("checked above");
  in_flight.answered.push(pending.usage.clone());
  let body = match resource {
    Some(resource) => stream_resource_body(resource, pending.end.clone()),
    None => full_body(body.0),
  };
  let mut response = http::Response::new(body);
  *response.status_mut() = status;
  *response.headers_mut() = header_map;
  // The client may have gone away already; then there is nobody to tell.
  let _ = pending.reply.send(Ok(response));
  Ok(())
}

/// Secret values of the function an isolate runs, kept in `OpState`: text leaving the
/// isolate for the server log (console output, exception stacks) has them replaced.
#[derive(Debug, Default)]
pub struct Redactions(pub Vec<String>);

impl Redactions {
  /// `text` with every secret value replaced by `[redacted]`.
  pub fn apply<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
    let mut text = std::borrow::Cow::Borrowed(text);
    for secret in self.0.iter().filter(|s| !s.is_empty()) {
      if text.contains(secret.as_str()) {
        text = std::borrow::Cow::Owned(text.replace(secret.as_str(), "[redacted]"));
      }
    }
    text
  }
}

/// `text` with the secrets of the isolate's function replaced.
pub fn redact<'a>(state: &OpState, text: &'a str) -> std::borrow::Cow<'a, str> {
  match state.try_borrow::<Redactions>() {
    Some(redactions) => redactions.apply(text),
    None => std::borrow::Cow::Borrowed(text),
  }
}

/// Reports that the handler failed for this request.
#[op2(fast)]
fn op_dispatch_fail(
  state: &mut OpState,
  #[smi] id: u32,
  not_a_response: bool,
  #[string] detail: String,
) -> Result<(), DispatchError> {
  let detail = redact(state, &detail).into_owned();
  let in_flight = state.borrow_mut::<InFlight>();
  let pending = in_flight
    .pending
    .remove(&id)
    .ok_or(DispatchError::UnknownDispatch(id))?;
  in_flight.answered.push(pending.usage.clone());
  let kind = if not_a_response {
    FailureKind::NotAResponse
  } else {
    FailureKind::Exception
  };
  let _ = pending.reply.send(Err(HandlerFailure { kind, detail }));
  Ok(())
}

/// Counts a `fetch()` the handler of dispatch `id` made, while its response is pending. The
/// limit on subrequests is enforced in JS, where the request a `fetch()` belongs to is known
/// (`99_bootstrap.js`).
#[op2(fast)]
fn op_dispatch_subrequest(state: &mut OpState, #[smi] id: u32) {
  if let Some(pending) = state.borrow::<InFlight>().pending.get(&id) {
    pending.usage.subrequests.fetch_add(1, Ordering::Relaxed);
  }
}

/// Resolves once request `id` is over: `true` when it was cut short (the client went away,
/// or a limit such as the wall-clock one ended it), `false` when its response was sent in
/// full. Asked only when a handler reads `request.signal`.
#[op2]
async fn op_dispatch_cancelled(state: Rc<RefCell<OpState>>, #[smi] id: u32) -> bool {
  let ending = state
    .borrow()
    .borrow::<InFlight>()
    .endings
    .get(&id)
    .cloned();
  let Some(ending) = ending else {
    // Over and forgotten already.
    return false;
  };
  ending.ended().await;
  state
    .borrow_mut()
    .borrow_mut::<InFlight>()
    .endings
    .remove(&id);
  !ending.finished()
}

/// Calls between functions of one node (service bindings: `env.AUTH.fetch(request)`),
/// carried out in-process by the node. Put into `OpState` as `Arc<dyn ServiceDispatch>`.
pub trait ServiceDispatch: Send + Sync {
  /// Serves `request` with function `function` as the node serves any request (its limits,
  /// access record and usage), and answers with its response.
  fn call(
    &self,
    function: &str,
    request: http::Request<Body>,
  ) -> futures::future::LocalBoxFuture<'static, Result<http::Response<Body>, String>>;
}

/// The dispatcher of isolates outside a node (benches, tools): every call is refused.
#[derive(Debug, Default)]
pub struct NoServices;

impl ServiceDispatch for NoServices {
  fn call(
    &self,
    function: &str,
    _request: http::Request<Body>,
  ) -> futures::future::LocalBoxFuture<'static, Result<http::Response<Body>, String>> {
    let message = format!("no node to call {function:?} on: service bindings need a node");
    Box::pin(async move { Err(message) })
  }
}

/// The service bindings of the function an isolate runs: binding name → function name.
#[derive(Debug, Default)]
pub struct ServiceBindings(pub std::collections::BTreeMap<String, String>);

/// A service binding's answer, as JS sees it.
#[derive(ToV8)]
pub struct ServiceResponse {
  status: u32,
  headers: Vec<(ByteString, ByteString)>,
  body_rid: Option<u32>,
}

/// `env.NAME.fetch(...)`: sends a request to the function bound as `binding`, in-process.
/// The body is inline bytes or a stream resource; the answer's body comes back as a
/// resource JS reads as a stream.
#[op2]
#[allow(
  clippy::too_many_arguments,
  reason = "a request's parts as JS hands them over"
)]
async fn op_dispatch_service(
  state: Rc<RefCell<OpState>>,
  #[string] binding: String,
  #[string] method: String,
  #[string] url: String,
  #[scoped] headers: Vec<(ByteString, ByteString)>,
  #[buffer(copy)] body: Option<Vec<u8>>,
  #[smi] body_rid: Option<ResourceId>,
) -> Result<ServiceResponse, DispatchError> {
  let (call, resource) = {
    let mut state = state.borrow_mut();
    let function = state
      .try_borrow::<ServiceBindings>()
      .and_then(|bindings| bindings.0.get(&binding).cloned())
      .ok_or_else(|| DispatchError::Service(format!("no service is bound as {binding}")))?;
    let dispatch = state
      .try_borrow::<Arc<dyn ServiceDispatch>>()
      .cloned()
      .ok_or_else(|| DispatchError::Service("service bindings are not available here".into()))?;
    let resource = body_rid
      .map(|rid| state.resource_table.take_any(rid))
      .transpose()?;
    ((function, dispatch), resource)
  };
  let (function, dispatch) = call;
  let method = http::Method::from_bytes(method.as_bytes())
    .map_err(|err| DispatchError::Service(format!("method {method:?}: {err}")))?;
  let request_body = match (resource, body) {
    // A stream the handler wrote is pumped as the callee reads it; it ends when the callee
    // stops reading.
    (Some(resource), _) => stream_resource_body(resource, RequestEnd::default()),
    (None, Some(bytes)) => full_body(Bytes::from(bytes)),
    (None, None) => full_body(Bytes::new()),
  };
  let mut request = http::Request::new(request_body);
  *request.method_mut() = method;
  *request.uri_mut() = url
    .parse()
    .map_err(|err| DispatchError::Service(format!("URL {url:?}: {err}")))?;
  *request.headers_mut() = header_map(headers)
    .map_err(|InvalidHeader { name, reason }| DispatchError::InvalidHeader { name, reason })?;
  let response = dispatch
    .call(&function, request)
    .await
    .map_err(|err| DispatchError::Service(format!("service {binding} ({function}): {err}")))?;
  let (head, body) = response.into_parts();
  let headers = head
    .headers
    .iter()
    .map(|(name, value)| {
      (
        ByteString::from(name.as_str()),
        ByteString::from(value.as_bytes()),
      )
    })
    .collect();
  let body_rid = (!http_body::Body::is_end_stream(&body)).then(|| {
    state
      .borrow_mut()
      .resource_table
      .add(RequestBodyResource::new(body, RequestEnd::default()))
  });
  Ok(ServiceResponse {
    status: u32::from(head.status.as_u16()),
    headers,
    body_rid,
  })
}

/// A header that JS handed over and HTTP does not accept.
#[derive(Debug)]
pub struct InvalidHeader {
  pub name: String,
  pub reason: String,
}

/// A header list from JS (`[name, value]` byte strings) as a `HeaderMap`.
pub fn header_map(
  headers: Vec<(ByteString, ByteString)>,
) -> Result<http::HeaderMap, InvalidHeader> {
  // Room for the headers Outpost adds on the way out (request id, `Vary`, compression), so
  // that the map is not grown once per added header.
  let mut map = http::HeaderMap::with_capacity(headers.len() + 4);
  for (name, value) in headers {
    let invalid = |reason: String| InvalidHeader {
      name: String::from_utf8_lossy(&name).into_owned(),
      reason,
    };
    let name = http::HeaderName::from_bytes(&name).map_err(|e| invalid(e.to_string()))?;
    let value = http::HeaderValue::from_bytes(&value).map_err(|e| invalid(e.to_string()))?;
    map.append(name, value);
  }
  Ok(map)
}

/// A body that is already complete.
pub fn full_body(bytes: Bytes) -> Body {
  http_body_util::Full::new(bytes)
    .map_err(|never| match never {})
    .boxed_unsync()
}

/// Streams a JS `ReadableStream` resource out of the isolate. A local task reads the resource
/// and feeds a bounded channel, so a slow client pauses the JS producer instead of piling
/// chunks up in memory.
fn stream_resource_body(resource: Rc<dyn Resource>, end: RequestEnd) -> Body {
  let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(BODY_CHANNEL_CHUNKS);
  deno_core::unsync::spawn(async move {
    loop {
      let read = tokio::select! {
        read = resource.clone().read(RESPONSE_READ_CHUNK) => read,
        () = end.ended() => break,
        () = tx.closed() => break,
      };
      match read {
        Ok(chunk) if chunk.is_empty() => break,
        Ok(chunk) => {
          if tx
            .send(Ok(Frame::data(Bytes::copy_from_slice(&chunk))))
            .await
            .is_err()
          {
            break;
          }
        }
        Err(err) => {
          let _ = tx
            .send(Err(format!("response stream errored: {err}").into()))
            .await;
          break;
        }
      }
    }
    resource.close();
  });
  StreamBody::new(tokio_stream_from(rx)).boxed_unsync()
}

fn tokio_stream_from<T>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
  futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A request body exposed to JS as a readable resource (wrapped by `readableStreamForRid`).
struct RequestBodyResource {
  body: AsyncRefCell<RequestBodyReader>,
  cancel: CancelHandle,
  client_gone: RequestEnd,
}

struct RequestBodyReader {
  body: Body,
  /// Bytes of the last frame that did not fit into the reader's buffer.
  leftover: Bytes,
}

impl RequestBodyResource {
  fn new(body: Body, client_gone: RequestEnd) -> Self {
    Self {
      body: AsyncRefCell::new(RequestBodyReader {
        body,
        leftover: Bytes::new(),
      }),
      cancel: CancelHandle::default(),
      client_gone,
    }
  }
}

impl Resource for RequestBodyResource {
  fn name(&self) -> std::borrow::Cow<'_, str> {
    "outpostRequestBody".into()
  }

  fn read(self: Rc<Self>, limit: usize) -> AsyncResult<BufView> {
    Box::pin(async move {
      let mut reader = RcRef::map(&self, |r| &r.body).borrow_mut().await;
      let client_gone = self.client_gone.clone();
      let read = async {
        loop {
          if !reader.leftover.is_empty() {
            let n = limit.min(reader.leftover.len());
            return Ok(BufView::from(reader.leftover.split_to(n)));
          }
          let frame = tokio::select! {
            frame = reader.body.frame() => frame,
            () = client_gone.ended() => {
              return Err(JsErrorBox::generic("request body aborted: the client went away"));
            }
          };
          match frame {
            None => return Ok(BufView::empty()),
            Some(Err(err)) => {
              return Err(JsErrorBox::generic(format!(
                "request body read failed: {err}"
              )));
            }
            Some(Ok(frame)) => {
              if let Ok(data) = frame.into_data() {
                reader.leftover = data;
              }
            }
          }
        }
      };
      read
        .try_or_cancel(RcRef::map(&self, |r| &r.cancel))
        .await
        .map_err(JsErrorBox::from_err)
    })
  }

  fn close(self: Rc<Self>) {
    self.cancel.cancel();
  }
}
