//! Isolate start-up: creating a blank isolate from the snapshot until it can take a
//! function; the first request of a never-seen function on a pre-warmed blank isolate
//! (load + evaluate its module, then answer one request); and a pool's view of a new
//! isolate, taken from the spares until it is ready to serve. Also the cost of CPU metering
//! per entry into JS (one enter/leave pair), to compare with a warm request's cost.

use std::sync::Arc;
use std::time::Duration;

mod spec;
mod timing;

use criterion::{Criterion, criterion_group, criterion_main};
use deno_core::PollEventLoopOptions;
use outpost::config::{CacheConfig, ServerConfig};
use outpost::cpu::{CpuGuard, CpuWatchdog};
use outpost::edge_cache::SharedCache;
use outpost::isolate::{BlankIsolate, FunctionSpec, IsolateFactory};
use outpost_ext_dispatch::{DispatchRequest, RequestUsage};
use spec::{HEAP, bench_spec};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

const JS_HANDLER: &str =
  "export default { fetch: (r) => new Response('hello from ' + new URL(r.url).pathname) };";
const TS_HANDLER: &str = "export default { fetch: (r: Request): Response => new Response(`hello from ${new URL(r.url).pathname}`) };";

fn new_spec(dir: &std::path::Path, file: &str, source: &str, index: usize) -> FunctionSpec {
  // A fresh file each time: the function has never been seen.
  let path = dir.join(format!("{index}-{file}"));
  std::fs::write(&path, source).unwrap();
  bench_spec(&path)
}

/// A pre-warmed blank isolate and its request channel.
fn blank() -> (BlankIsolate, mpsc::Sender<DispatchRequest>) {
  let (sender, receiver) = mpsc::channel(8);
  (
    BlankIsolate::new(Some(receiver), HEAP, None).unwrap(),
    sender,
  )
}

/// Gives `isolate` the function and serves one GET through it.
async fn first_request(
  mut isolate: BlankIsolate,
  sender: mpsc::Sender<DispatchRequest>,
  spec: FunctionSpec,
) -> BlankIsolate {
  let serving = isolate.start_function(&spec).await.unwrap();
  let (reply, replied) = oneshot::channel();
  sender
    .send(DispatchRequest {
      method: http::Method::GET,
      url: "http://bench.local/first".into(),
      headers: http::HeaderMap::new(),
      body: None,
      cancel: CancellationToken::new(),
      finished: Arc::default(),
      reply,
      usage: Arc::new(RequestUsage::new("bench".into())),
      cf: Vec::new(),
      trace: None,
    })
    .await
    .unwrap();
  let response = isolate
    .runtime
    .with_event_loop_future(Box::pin(replied), PollEventLoopOptions::default())
    .await
    .unwrap()
    .unwrap();
  assert_eq!(response.status(), 200);
  drop(serving);
  isolate
}

fn benches(c: &mut Criterion) {
  outpost::init_v8();
  let tokio = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .unwrap();
  let _guard = tokio.enter();
  let dir = tempfile::tempdir().unwrap();

  // Isolates on one thread must be dropped in reverse order of creation: each one is
  // dropped right after it is timed, outside the timing.
  timing::bench(c, "isolate_from_snapshot", 500, || {
    timing::timed(|| BlankIsolate::new(None, HEAP, None).unwrap()).1
  });

  for (name, file, source) in [
    ("first_request_js", "hello.js", JS_HANDLER),
    ("first_request_ts", "hello.ts", TS_HANDLER),
  ] {
    let mut index = 0;
    timing::bench(c, name, 300, || {
      index += 1;
      let spec = new_spec(dir.path(), file, source, index);
      let (isolate, sender) = blank();
      timing::timed(|| tokio.block_on(first_request(isolate, sender, spec))).1
    });
  }

  let server = ServerConfig {
    spare_isolates: 1,
    ..ServerConfig::default()
  };
  let cache = Arc::new(SharedCache::from_config(&CacheConfig::default()));
  let factory = IsolateFactory::new(
    &server,
    HEAP,
    cache,
    Arc::new(outpost_ext_dispatch::NoServices),
  )
  .unwrap();
  let mut index = 0;
  timing::bench(c, "new_isolate_from_spare", 300, || {
    index += 1;
    let spec = new_spec(dir.path(), "spare.js", JS_HANDLER, index);
    // The refill happens between runs, outside the timing.
    tokio.block_on(factory.spares_settled());
    timing::timed(|| tokio.block_on(factory.start(spec)).unwrap()).1
  });

  // One enter/leave pair: the metering every entry into JS pays (one CPU clock read).
  let mut isolate = BlankIsolate::new(None, HEAP, None).unwrap();
  let watchdog = CpuWatchdog::start(false).unwrap();
  let guard = CpuGuard::new(isolate.runtime.v8_isolate().thread_safe_handle(), &watchdog);
  c.bench_function("cpu_metering_per_entry", |b| {
    b.iter(|| {
      guard.enter(Duration::from_millis(50), None);
      guard.leave()
    })
  });
}

criterion_group! {
  name = isolate;
  config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(10));
  targets = benches
}
criterion_main!(isolate);
