//! Isolate start-up: creating a blank isolate from the snapshot until it can take a
//! function; the first request of a never-seen function on a pre-warmed blank isolate
//! (load + evaluate its module, then answer one request); and a shard's view of a new
//! isolate, taken from its spares until it is ready to serve. Also the cost of CPU metering
//! per entry into JS (one enter/leave pair), to compare with a warm request's cost.

use std::time::Duration;

mod serving;
mod spec;
mod timing;

use criterion::{Criterion, criterion_group, criterion_main};
use outpost::isolate::{BlankIsolate, FunctionSpec};
use outpost::limits::cpu::{CpuGuard, CpuWatchdog};
use outpost::shard::Shards;
use spec::bench_spec;

const JS_HANDLER: &str =
  "export default { fetch: (r) => new Response('hello from ' + new URL(r.url).pathname) };";
const TS_HANDLER: &str = "export default { fetch: (r: Request): Response => new Response(`hello from ${new URL(r.url).pathname}`) };";

fn new_spec(dir: &std::path::Path, file: &str, source: &str, index: usize) -> FunctionSpec {
  // A fresh file each time: the function has never been seen.
  let path = dir.join(format!("{index}-{file}"));
  std::fs::write(&path, source).unwrap();
  bench_spec(&path)
}

fn benches(c: &mut Criterion) {
  outpost::init_v8();
  let tokio = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .unwrap();
  let local = tokio::task::LocalSet::new();
  let _guard = tokio.enter();
  let dir = tempfile::tempdir().unwrap();
  let settings = serving::settings();
  let meter = serving::meter();

  // Each isolate is dropped right after it is timed, outside the timing.
  timing::bench(c, "isolate_from_snapshot", 500, || {
    timing::timed(|| BlankIsolate::new(&settings).unwrap()).1
  });

  for (name, file, source) in [
    ("first_request_js", "hello.js", JS_HANDLER),
    ("first_request_ts", "hello.ts", TS_HANDLER),
  ] {
    let mut index = 0;
    timing::bench(c, name, 300, || {
      index += 1;
      let spec = new_spec(dir.path(), file, source, index);
      let blank = BlankIsolate::new(&settings).unwrap();
      let ((queue, driver), elapsed) = timing::timed(|| {
        local.block_on(&tokio, async {
          let (queue, driver) = serving::serve(blank, &spec, &meter).await;
          let response = serving::send(
            &queue,
            http::Method::GET,
            "http://bench.local/first",
            http::HeaderMap::new(),
            None,
          )
          .await;
          assert_eq!(response.status(), 200);
          (queue, driver)
        })
      });
      // The isolate ends and is dropped outside the timing, before the next run starts.
      queue.close();
      local.block_on(&tokio, driver).unwrap();
      elapsed
    });
  }

  // A shard with one spare: the time from asking for an isolate of a new function until it
  // serves; the spare is refilled between runs, outside the timing.
  let shards = Shards::start(1, 1, settings.clone(), CpuWatchdog::start(false).unwrap()).unwrap();
  let mut index = 0;
  timing::bench(c, "new_isolate_from_spare", 300, || {
    index += 1;
    let spec = new_spec(dir.path(), "spare.js", JS_HANDLER, index);
    let pool = index as u64;
    tokio
      .block_on(shards.call_on(0, |shard| async move {
        while shard.spare_count() == 0 {
          tokio::time::sleep(Duration::from_millis(1)).await;
        }
      }))
      .unwrap();
    let elapsed = timing::timed(|| {
      tokio
        .block_on(shards.call_on(0, move |shard| async move {
          shard
            .start_isolate(pool, &spec, serving::Unwatched)
            .await
            .map(drop)
        }))
        .unwrap()
        .unwrap()
    })
    .1;
    tokio
      .block_on(shards.call_on(0, move |shard| async move { shard.close_pool(pool) }))
      .unwrap();
    elapsed
  });

  // One enter/leave pair: the metering every entry into JS pays (two monotonic clock reads).
  let mut isolate = BlankIsolate::new(&settings).unwrap().into_runtime();
  let guard = CpuGuard::new(isolate.v8_isolate().thread_safe_handle(), &meter);
  c.bench_function("cpu_metering_per_entry", |b| {
    b.iter(|| {
      meter.enter(&guard, Duration::from_millis(50), None);
      meter.leave()
    })
  });
}

criterion_group! {
  name = isolate;
  config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(10));
  targets = benches
}
criterion_main!(isolate);
