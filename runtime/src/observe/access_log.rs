//! One access record per request (tracing target `outpost::access`, at info), written when
//! the request is complete: after its response body has been sent (or dropped) and after
//! the isolate has charged the CPU time of the entry that answered it. The same moment
//! feeds the Prometheus metrics and the usage ledger, so the three always agree. Every
//! response, whoever made it (a function, the route cache, Outpost itself), goes out
//! through a [`MeteredBody`] that counts its bytes for the record.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Uri};
use http_body::Frame;
use outpost_ext_dispatch::{Body, BoxError, RequestId, RequestUsage, UsageObserver};

use opentelemetry::KeyValue;

use super::metrics::{Completed, FunctionIdentity, NodeMetrics};
use super::otlp::RequestSpan;
use super::trace_context::{TraceContext, TraceIdText};
use super::usage_ledger::{RequestCost, UsageLedger};

/// Where completed requests are counted.
pub struct Observers {
  pub metrics: NodeMetrics,
  pub usage: UsageLedger,
  /// Exports each request as a span, when `[tracing] otlp_endpoint` is set.
  pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
}

/// What the isolate side reports of a request it ran.
#[derive(Debug, Clone, Copy)]
struct IsolateUsage {
  cpu: Duration,
  heap_peak: usize,
  subrequests: u32,
}

/// The request a record is about, as the client sent it (shared, not copied: hyper's
/// method, URI and header values are reference-counted views of what it read).
pub struct RequestHead {
  pub method: Method,
  pub uri: Uri,
  /// The `Host` header; the URI's authority when it has one is used first.
  pub host: Option<HeaderValue>,
}

impl RequestHead {
  /// The host the client named: the URI's authority (HTTP/2's `:authority`, absolute-form),
  /// else the `Host` header.
  pub fn host(&self) -> Option<&str> {
    match self.uri.authority() {
      Some(authority) => Some(authority.as_str()),
      None => self.host.as_ref().and_then(|host| host.to_str().ok()),
    }
  }
}

#[derive(Debug, Default)]
struct Outcome {
  function: Option<Arc<FunctionIdentity>>,
  trace: Option<TraceContext>,
  status: u16,
  /// The `outpost-error` / `outpost-termination` value of a response Outpost made.
  error: Option<String>,
  cold: Option<bool>,
  isolate: Option<IsolateUsage>,
  /// The shard that took the request from the client.
  shard: Option<usize>,
}

/// A request's record, filled in while it is served. It is written when its last holder
/// releases it: the server once the response head is known, and (when the request reached
/// an isolate) the request's [`RequestUsage`] once complete.
pub struct AccessRecord {
  observers: Arc<Observers>,
  request_id: RequestId,
  /// `None` for a request the HTTP parser refused.
  head: Option<RequestHead>,
  arrived: Instant,
  /// The same moment by the wall clock, for exported spans.
  arrived_at: SystemTime,
  /// Request body bytes read so far.
  pub bytes_in: Arc<AtomicU64>,
  /// Response body bytes sent so far.
  bytes_out: AtomicU64,
  /// Nanoseconds from arrival to the end of the response body (0 until then).
  wall_ns: AtomicU64,
  outcome: Mutex<Outcome>,
  holders: AtomicU8,
}

impl AccessRecord {
  pub fn new(
    observers: Arc<Observers>,
    request_id: RequestId,
    head: Option<RequestHead>,
  ) -> Arc<AccessRecord> {
    Arc::new(AccessRecord {
      observers,
      request_id,
      head,
      arrived: Instant::now(),
      arrived_at: SystemTime::now(),
      bytes_in: Arc::default(),
      bytes_out: AtomicU64::new(0),
      wall_ns: AtomicU64::new(0),
      outcome: Mutex::default(),
      holders: AtomicU8::new(1),
    })
  }

  /// The request id.
  pub fn request_id(&self) -> RequestId {
    self.request_id
  }

  fn outcome(&self) -> std::sync::MutexGuard<'_, Outcome> {
    self.outcome.lock().expect("access record lock")
  }

  /// The function the request was routed to, and its version when it is a deployed one.
  pub fn set_function(&self, function: &Arc<FunctionIdentity>) {
    self.outcome().function = Some(function.clone());
  }

  /// Where the request is in its W3C trace.
  pub fn set_trace(&self, trace: &TraceContext) {
    self.outcome().trace = Some(trace.clone());
  }

  /// The shard that took the request from the client.
  pub fn set_shard(&self, shard: usize) {
    self.outcome().shard = Some(shard);
  }

  /// Whether the request was its isolate's first.
  pub fn set_cold(&self, cold: bool) {
    self.outcome().cold = Some(cold);
  }

  /// A [`RequestUsage`] whose completion is this record's second holder.
  pub fn usage(self: &Arc<Self>) -> RequestUsage {
    self.holders.fetch_add(1, Ordering::AcqRel);
    RequestUsage::observed_by(self.request_id, self.clone())
  }

  /// The server's part: the response's status and, for responses Outpost made, why. The
  /// returned body (the response's, metered) completes the record once it has been sent or
  /// dropped.
  pub fn respond(self: &Arc<Self>, status: u16, error: Option<&str>, body: Body) -> MeteredBody {
    {
      let mut outcome = self.outcome();
      outcome.status = status;
      outcome.error = error.map(str::to_string);
    }
    MeteredBody {
      inner: body,
      record: self.clone(),
    }
  }

  fn release(&self) {
    if self.holders.fetch_sub(1, Ordering::AcqRel) == 1 {
      self.write();
    }
  }

  fn write(&self) {
    let outcome = self.outcome();
    let isolate = outcome.isolate;
    let wall = Duration::from_nanos(self.wall_ns.load(Ordering::Relaxed));
    let bytes_out = self.bytes_out.load(Ordering::Relaxed);
    let function = outcome.function.as_deref().map(|f| f.name.as_str());
    let version = outcome
      .function
      .as_deref()
      .and_then(|f| f.version.as_deref());
    let trace_id = outcome.trace.as_ref().map(TraceContext::trace_id_hex);
    let (method, host, path) = match &self.head {
      Some(head) => (
        head.method.as_str(),
        head.host().unwrap_or(""),
        head.uri.path(),
      ),
      None => ("", "", ""),
    };
    tracing::info!(
      target: "outpost::access",
      request_id = self.request_id.as_str(),
      trace_id = trace_id.as_ref().map(TraceIdText::as_str),
      function = function.unwrap_or(""),
      version,
      host,
      method,
      path,
      status = outcome.status,
      wall_ms = wall.as_secs_f64() * 1e3,
      cpu_ms = isolate.map(|u| u.cpu.as_secs_f64() * 1e3),
      cold = outcome.cold,
      shard = outcome.shard,
      bytes_in = self.bytes_in.load(Ordering::Relaxed),
      bytes_out,
      subrequests = isolate.map_or(0, |u| u.subrequests),
      heap_peak_bytes = isolate.map(|u| u.heap_peak),
      termination = outcome.error.as_deref(),
      "access"
    );
    self.observers.metrics.record(&Completed {
      function: outcome.function.as_deref(),
      status: outcome.status,
      error: outcome.error.as_deref(),
      wall_seconds: wall.as_secs_f64(),
      cpu_seconds: isolate.map(|u| u.cpu.as_secs_f64()),
      cold: outcome.cold,
    });
    if let (Some(tracer), Some(trace)) = (&self.observers.tracer, &outcome.trace) {
      let mut attributes = vec![
        KeyValue::new("outpost.request_id", self.request_id.to_string()),
        KeyValue::new("http.request.method", method.to_string()),
        KeyValue::new("server.address", host.to_string()),
        KeyValue::new("url.path", path.to_string()),
        KeyValue::new("http.response.status_code", i64::from(outcome.status)),
      ];
      let optional = [
        ("outpost.function", function),
        ("outpost.version", version),
        ("outpost.termination", outcome.error.as_deref()),
      ];
      for (key, value) in optional {
        if let Some(value) = value {
          attributes.push(KeyValue::new(key, value.to_string()));
        }
      }
      if let Some(usage) = isolate {
        attributes.push(KeyValue::new(
          "outpost.cpu_ms",
          usage.cpu.as_secs_f64() * 1e3,
        ));
      }
      super::otlp::record(
        tracer,
        RequestSpan {
          trace_id: trace.trace_id,
          span_id: trace.span_id,
          parent: trace.parent,
          flags: trace.flags,
          start: self.arrived_at,
          end: self.arrived_at + wall,
          attributes,
          name: "outpost request",
        },
      );
    }
    // Every request routed to a function counts, those answered from the route cache
    // without entering JS included (their egress is billed like any other).
    if let Some(function) = &outcome.function {
      let cost = RequestCost {
        cpu: isolate.map_or(Duration::ZERO, |usage| usage.cpu),
        wall,
        egress_bytes: bytes_out,
        subrequests: isolate.map_or(0, |usage| u64::from(usage.subrequests)),
      };
      // Complete now: arrival plus the wall time (no second clock read).
      self
        .observers
        .usage
        .record(function, &cost, self.arrived_at + wall);
    }
  }
}

impl UsageObserver for AccessRecord {
  fn complete(&self, usage: &RequestUsage) {
    self.outcome().isolate = Some(IsolateUsage {
      cpu: usage.cpu(),
      heap_peak: usage.heap_peak(),
      subrequests: usage.subrequests(),
    });
    self.release();
  }
}

/// A response body on its way to the client: counts the bytes sent for the request's
/// record, and completes the record (with the wall-clock time) when dropped, that is once
/// the body has been sent or the client has gone.
pub struct MeteredBody {
  inner: Body,
  record: Arc<AccessRecord>,
}

impl http_body::Body for MeteredBody {
  type Data = Bytes;
  type Error = BoxError;

  fn poll_frame(
    mut self: Pin<&mut Self>,
    cx: &mut Context<'_>,
  ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let frame = Pin::new(&mut self.inner).poll_frame(cx);
    if let Poll::Ready(Some(Ok(frame))) = &frame
      && let Some(data) = frame.data_ref()
    {
      self
        .record
        .bytes_out
        .fetch_add(data.len() as u64, Ordering::Relaxed);
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

impl Drop for MeteredBody {
  fn drop(&mut self) {
    let wall = self.record.arrived.elapsed();
    self.record.wall_ns.store(
      u64::try_from(wall.as_nanos()).unwrap_or(u64::MAX).max(1),
      Ordering::Relaxed,
    );
    self.record.release();
  }
}
