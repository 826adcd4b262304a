//! OTLP export of one span per request (`[tracing] otlp_endpoint`; off unless set), with the
//! OpenTelemetry SDK: batched, sent over HTTP with the JSON encoding by a background thread.
//!
//! The span has the ids Outpost already uses for the request (`super::trace_context`): its
//! trace id, and as span id the id every outbound `fetch()` names as its parent, so exported
//! traces join up with what upstreams record. The SDK draws ids from an [`IdGenerator`];
//! Outpost's generator hands it the request's ids, set just before the span is built.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
  SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
  TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{
  BatchConfigBuilder, BatchSpanProcessor, IdGenerator, RandomIdGenerator, SdkTracer,
  SdkTracerProvider,
};
use serde::Deserialize;

/// `[tracing]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
  /// OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`; export is off
  /// without it.
  pub otlp_endpoint: Option<String>,
  /// `service.name` of the exported spans.
  pub service_name: Option<String>,
}

impl TracingConfig {
  /// Every value that cannot work, with the reason.
  pub fn problems(&self) -> Vec<(&'static str, String)> {
    match &self.otlp_endpoint {
      Some(endpoint) if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) => {
        vec![(
          "otlp_endpoint",
          format!("{endpoint:?} is not an http(s) URL, e.g. \"http://127.0.0.1:4318/v1/traces\""),
        )]
      }
      _ => Vec::new(),
    }
  }
}

/// How often batched spans are sent.
const EXPORT_EVERY: Duration = Duration::from_secs(1);

/// The exporter, owned by `main`: dropping it flushes what is batched.
pub struct OtlpExport {
  provider: SdkTracerProvider,
}

impl OtlpExport {
  /// Starts the exporter when `config` names an endpoint. Call it outside any tokio runtime:
  /// it sends from a thread of its own with a blocking HTTP client.
  pub fn start(config: &TracingConfig) -> Result<Option<OtlpExport>, String> {
    let Some(endpoint) = &config.otlp_endpoint else {
      return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
      .with_http()
      .with_protocol(Protocol::HttpJson)
      .with_endpoint(endpoint)
      .build()
      .map_err(|err| format!("tracing.otlp_endpoint {endpoint}: {err}"))?;
    let batches = BatchSpanProcessor::builder(exporter)
      .with_batch_config(
        BatchConfigBuilder::default()
          .with_scheduled_delay(EXPORT_EVERY)
          .build(),
      )
      .build();
    let resource = opentelemetry_sdk::Resource::builder()
      .with_service_name(
        config
          .service_name
          .clone()
          .unwrap_or_else(|| "outpost".into()),
      )
      .build();
    let provider = SdkTracerProvider::builder()
      .with_span_processor(batches)
      .with_id_generator(RequestIds)
      .with_resource(resource)
      .build();
    tracing::info!(endpoint, "exporting request spans over OTLP");
    Ok(Some(OtlpExport { provider }))
  }

  /// The tracer requests' spans are made with.
  pub fn tracer(&self) -> SdkTracer {
    self.provider.tracer("outpost")
  }
}

impl Drop for OtlpExport {
  fn drop(&mut self) {
    if let Err(err) = self.provider.shutdown() {
      tracing::warn!(error = %err, "OTLP export did not flush");
    }
  }
}

/// One finished request, as a span.
pub struct RequestSpan<'a> {
  pub trace_id: [u8; 16],
  pub span_id: [u8; 8],
  /// The caller's span, from its `traceparent`.
  pub parent: Option<[u8; 8]>,
  pub flags: u8,
  pub start: SystemTime,
  pub end: SystemTime,
  pub attributes: Vec<KeyValue>,
  pub name: &'a str,
}

/// Records `span` with `tracer`; the batch exporter sends it.
pub fn record(tracer: &SdkTracer, span: RequestSpan) {
  let parent = match span.parent {
    Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
      TraceId::from_bytes(span.trace_id),
      SpanId::from_bytes(parent),
      TraceFlags::new(span.flags),
      true,
      TraceState::default(),
    )),
    None => Context::new(),
  };
  let builder = tracer
    .span_builder(span.name.to_string())
    .with_kind(SpanKind::Server)
    .with_start_time(span.start)
    .with_attributes(span.attributes);
  ASSIGNED.with(|ids| ids.set(Some((span.trace_id, span.span_id))));
  let mut built = tracer.build_with_context(builder, &parent);
  ASSIGNED.with(|ids| ids.set(None));
  opentelemetry::trace::Span::end_with_timestamp(&mut built, span.end);
}

thread_local! {
  /// The ids the next span built on this thread is to have.
  static ASSIGNED: Cell<Option<([u8; 16], [u8; 8])>> = const { Cell::new(None) };
}

/// Hands the SDK the request's own ids (see the module docs), random ones otherwise.
#[derive(Debug)]
struct RequestIds;

impl IdGenerator for RequestIds {
  fn new_trace_id(&self) -> TraceId {
    ASSIGNED.with(Cell::get).map_or_else(
      || RandomIdGenerator::default().new_trace_id(),
      |(trace, _)| TraceId::from_bytes(trace),
    )
  }

  fn new_span_id(&self) -> SpanId {
    ASSIGNED.with(Cell::get).map_or_else(
      || RandomIdGenerator::default().new_span_id(),
      |(_, span)| SpanId::from_bytes(span),
    )
  }
}
