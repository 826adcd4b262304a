//! The node's Prometheus metrics, served as text on the admin listener (`GET /metrics`).
//!
//! Labels are only ever the function, an outcome or error kind, a status class and an
//! isolate state: never a path, host or address, so the number of series stays bounded by
//! the number of functions. Request counters and histograms are updated as each request
//! completes ([`NodeMetrics::record`]); isolate counts, queue depth and cache counters are
//! read when scraped.

use std::sync::OnceLock;

use prometheus::{
  Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
  IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::cache::edge_cache::CacheStatsSnapshot;
use crate::isolate::code_cache::CodeCacheCounts;

/// Histogram buckets in seconds, from 50 µs (a warm hello-world) to 30 s (the default
/// wall-clock limit).
const BUCKETS: [f64; 18] = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
  2.5, 5.0, 10.0, 30.0,
];

/// A function as access records and metrics name it: its name, and its version when it is a
/// deployed one. Made once per routed function, so that naming it in a record copies
/// nothing, and holding the series its requests update, so that each is looked up (label
/// hashing, the vector's lock) once rather than on every request.
#[derive(Debug)]
pub struct FunctionIdentity {
  pub name: String,
  pub version: Option<String>,
  series: FunctionSeries,
}

impl FunctionIdentity {
  pub fn new(name: String, version: Option<String>) -> FunctionIdentity {
    FunctionIdentity {
      name,
      version,
      series: FunctionSeries::default(),
    }
  }
}

/// The series most requests of one function update, each taken from its vector on first use.
#[derive(Debug, Default)]
struct FunctionSeries {
  answered: OnceLock<IntCounter>,
  duration: OnceLock<Histogram>,
  cpu: OnceLock<Histogram>,
  warm: OnceLock<IntCounter>,
  cold: OnceLock<IntCounter>,
}

/// One completed request, as the metrics see it.
#[derive(Debug, Clone)]
pub struct Completed<'a> {
  /// `None` when no function was routed (a 404 or a malformed request).
  pub function: Option<&'a FunctionIdentity>,
  pub status: u16,
  /// What ended the request when it was not the function's own answer: the value of the
  /// `outpost-error` or `outpost-termination` header (`cpu-limit`, `overloaded`, ...).
  pub error: Option<&'a str>,
  pub wall_seconds: f64,
  /// CPU time in JS; `None` when the request never entered an isolate.
  pub cpu_seconds: Option<f64>,
  /// Whether the request was an isolate's first (`None`: no isolate was involved).
  pub cold: Option<bool>,
}

/// Every metric of the node.
pub struct NodeMetrics {
  registry: Registry,
  invocations: IntCounterVec,
  errors: IntCounterVec,
  duration: HistogramVec,
  cpu: HistogramVec,
  starts: IntCounterVec,
  isolates: IntGaugeVec,
  in_flight: IntGauge,
  throttled: IntCounterVec,
  queue_depth: IntGauge,
  cache: IntCounterVec,
  cache_size: IntGaugeVec,
  code_cache: IntCounterVec,
  lane_moves: IntCounter,
  forwarded: IntCounter,
  function_shards: IntGaugeVec,
}

/// What the scrape reads from the node at that moment.
pub struct NodeReading {
  /// Per function: (name, idle isolates, busy isolates).
  pub isolates: Vec<(String, usize, usize)>,
  /// Requests waiting for an admission slot.
  pub queued: usize,
  /// Requests in flight on isolates.
  pub in_flight: usize,
  /// Per function: how many shards have an isolate of it.
  pub shards: Vec<(String, usize)>,
  /// Functions moved from the shards to the slow lane so far.
  pub lane_moves: u64,
  /// Requests forwarded from the shard that took them to another so far.
  pub forwarded: u64,
  /// Cache counters per function.
  pub cache: Vec<(String, CacheStatsSnapshot)>,
  /// Code cache counters per function (its serving versions added up).
  pub code_caches: Vec<(String, CodeCacheCounts)>,
}

impl NodeMetrics {
  /// Registers every metric; `outpost_build_info` carries `version` and `config_hash`.
  pub fn new(version: &str, config_hash: &str) -> NodeMetrics {
    let registry = Registry::new();
    let counter = |name: &str, help: &str, labels: &[&str]| {
      let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
      registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
      metric
    };
    let histogram = |name: &str, help: &str| {
      let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
      let metric = HistogramVec::new(opts, &["function"]).expect("valid metric");
      registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
      metric
    };
    let gauges = |name: &str, help: &str, labels: &[&str]| {
      let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
      registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
      metric
    };
    let scraped_counter = |name: &str, help: &str| {
      let metric = IntCounter::new(name, help).expect("valid metric");
      registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
      metric
    };
    let gauge = |name: &str, help: &str| {
      let metric = IntGauge::new(name, help).expect("valid metric");
      registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
      metric
    };
    let build = IntGaugeVec::new(
      Opts::new(
        "outpost_build_info",
        "The running build and config; always 1",
      ),
      &["version", "config_hash"],
    )
    .expect("valid metric");
    build.with_label_values(&[version, config_hash]).set(1);
    registry.register(Box::new(build)).expect("unique metric");
    NodeMetrics {
      invocations: counter(
        "outpost_invocations_total",
        "Requests routed to a function, by version (deployed functions), outcome (ok, or the error kind) and status class",
        &["function", "version", "outcome", "status_class"],
      ),
      errors: counter(
        "outpost_errors_total",
        "Requests Outpost answered itself, by kind (no-route, overloaded, cpu-limit, handler-error, ...)",
        &["function", "kind"],
      ),
      duration: histogram(
        "outpost_request_duration_seconds",
        "Wall time from arrival to the end of the response body",
      ),
      cpu: histogram(
        "outpost_request_cpu_seconds",
        "CPU time spent in JS for a request",
      ),
      starts: counter(
        "outpost_isolate_requests_total",
        "Requests by whether they were their isolate's first (cold) or not (warm)",
        &["function", "start"],
      ),
      isolates: gauges(
        "outpost_isolates",
        "Isolates per function, idle or busy (serving at least one request)",
        &["function", "state"],
      ),
      in_flight: gauge(
        "outpost_requests_in_flight",
        "Requests handed to isolates and not yet answered",
      ),
      throttled: counter(
        "outpost_throttled_requests_total",
        "Requests turned away with 503 because the node or function was at its concurrency limit",
        &["function"],
      ),
      queue_depth: gauge(
        "outpost_queue_depth",
        "Requests waiting for a concurrency slot",
      ),
      cache: counter(
        "outpost_cache_events_total",
        "Shared cache events per function: hit, miss, store, refusal, eviction",
        &["function", "event"],
      ),
      code_cache: counter(
        "outpost_code_cache_events_total",
        "Modules compiled from a V8 code cache (used), caches refused by V8 or failing their file checks (rejected), caches made and kept (stored)",
        &["function", "event"],
      ),
      lane_moves: scraped_counter(
        "outpost_lane_moves_total",
        "Functions moved from the shards to the slow lane (their entries into JS ran long)",
      ),
      forwarded: scraped_counter(
        "outpost_forwarded_requests_total",
        "Requests handed to another shard than the one that took them (service-binding calls included), where their function has an isolate",
      ),
      function_shards: gauges(
        "outpost_function_shards",
        "Shards with an isolate of the function (0 while it has none, or runs in the slow lane)",
        &["function"],
      ),
      cache_size: gauges(
        "outpost_cache_size",
        "Shared cache contents per function: bytes and entries",
        &["function", "unit"],
      ),
      registry,
    }
  }

  /// Records a completed request.
  pub fn record(&self, request: &Completed) {
    let name = request.function.map_or("", |f| f.name.as_str());
    if let Some(kind) = request.error {
      self.errors.with_label_values(&[name, kind]).inc();
      if kind == "overloaded" {
        self.throttled.with_label_values(&[name]).inc();
      }
    }
    let Some(function) = request.function else {
      return;
    };
    let class = match request.status {
      100..=199 => "1xx",
      200..=299 => "2xx",
      300..=399 => "3xx",
      400..=499 => "4xx",
      _ => "5xx",
    };
    let version = function.version.as_deref().unwrap_or("");
    let series = &function.series;
    match (request.error, class) {
      (None, "2xx") => series
        .answered
        .get_or_init(|| {
          self
            .invocations
            .with_label_values(&[name, version, "ok", "2xx"])
        })
        .inc(),
      (error, class) => self
        .invocations
        .with_label_values(&[name, version, error.unwrap_or("ok"), class])
        .inc(),
    }
    series
      .duration
      .get_or_init(|| self.duration.with_label_values(&[name]))
      .observe(request.wall_seconds);
    if let Some(cpu) = request.cpu_seconds {
      series
        .cpu
        .get_or_init(|| self.cpu.with_label_values(&[name]))
        .observe(cpu);
    }
    if let Some(cold) = request.cold {
      let (series, start) = if cold {
        (&series.cold, "cold")
      } else {
        (&series.warm, "warm")
      };
      series
        .get_or_init(|| self.starts.with_label_values(&[name, start]))
        .inc();
    }
  }

  /// The text exposition (format 0.0.4) with the scrape-time readings applied.
  pub fn render(&self, reading: &NodeReading) -> String {
    for (function, idle, busy) in &reading.isolates {
      let set = |state: &str, count: usize| {
        self
          .isolates
          .with_label_values(&[function, state])
          .set(count as i64)
      };
      set("idle", *idle);
      set("busy", *busy);
    }
    self.queue_depth.set(reading.queued as i64);
    self.in_flight.set(reading.in_flight as i64);
    for (function, shards) in &reading.shards {
      self
        .function_shards
        .with_label_values(&[function])
        .set(*shards as i64);
    }
    for (counter, total) in [
      (&self.lane_moves, reading.lane_moves),
      (&self.forwarded, reading.forwarded),
    ] {
      counter.inc_by(total.saturating_sub(counter.get()));
    }
    for (function, stats) in &reading.cache {
      for (event, total) in [
        ("hit", stats.hits),
        ("miss", stats.misses),
        ("store", stats.stores),
        ("refusal", stats.refusals),
        ("eviction", stats.evictions),
      ] {
        advance(&self.cache.with_label_values(&[function, event]), total);
      }
      let size = |unit: &str, value: u64| {
        self
          .cache_size
          .with_label_values(&[function, unit])
          .set(value as i64)
      };
      size("bytes", stats.bytes);
      size("entries", stats.entries);
    }
    for (function, counts) in &reading.code_caches {
      for (event, total) in [
        ("used", counts.used),
        ("rejected", counts.rejected),
        ("stored", counts.stored),
      ] {
        advance(
          &self.code_cache.with_label_values(&[function, event]),
          total,
        );
      }
    }
    let mut text = Vec::new();
    let families = self.registry.gather();
    if let Err(err) = TextEncoder::new().encode(&families, &mut text) {
      tracing::warn!(error = %err, "cannot encode the metrics");
    }
    String::from_utf8(text).unwrap_or_default()
  }
}

/// Moves a counter that mirrors a cumulative total up to that total.
fn advance(counter: &IntCounter, total: u64) {
  let current = counter.get();
  if total > current {
    counter.inc_by(total - current);
  }
}

/// The content type of [`NodeMetrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
