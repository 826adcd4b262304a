//! Isolate start-up: creating a blank isolate from the snapshot until it can take a
//! function; the first request of a never-seen function on a pre-warmed blank isolate
//! (load + evaluate its module, then answer one request), for a hello world and for a
//! ~150 KB bundle, the latter also for a function whose code cache exists (a later isolate
//! of a known version); and a shard's view of a new isolate, taken from its spares until it
//! is ready to serve. Also the cost of CPU metering
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

  let bundle = framework_bundle();
  // (name, file, source, whether every run is of the same, known, code)
  let cases = [
    ("first_request_js", "hello.js", JS_HANDLER, false),
    ("first_request_ts", "hello.ts", TS_HANDLER, false),
    ("first_request_bundle", "bundle.js", bundle.as_str(), false),
    (
      "first_request_bundle_code_cache",
      "known.js",
      bundle.as_str(),
      true,
    ),
  ];
  for (name, file, source, known) in cases {
    let known = known.then(|| new_spec(dir.path(), file, source, 0));
    let mut index = 0;
    let mut first_request = || {
      index += 1;
      let spec = known
        .clone()
        .unwrap_or_else(|| new_spec(dir.path(), file, source, index));
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
    };
    if known.is_some() {
      // The version's first isolate compiles its modules and leaves their code cache.
      first_request();
    }
    timing::bench(c, name, 300, first_request);
    if let Some(spec) = &known {
      let counts = spec.code.caches.counts();
      assert!(
        counts.used > 0 && counts.rejected == 0,
        "{name} ran without its code cache: {counts:?}"
      );
    }
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

/// A stand-in for a bundled framework app, ~150 KB: a router, a few hundred components
/// (functions building markup from props) and a table of routes to them, of which a request
/// renders one. Generated, so the bench carries no third-party code.
fn framework_bundle() -> String {
  let mut js = String::from(
    "const escape = (s) => String(s).replace(/[&<>\"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '\"': '&quot;' })[c]);\n\
     class Router { constructor() { this.routes = new Map(); } add(path, view) { this.routes.set(path, view); return this; } match(path) { return this.routes.get(path) ?? this.routes.get('/'); } }\n\
     const router = new Router();\n",
  );
  for i in 0..320 {
    js.push_str(&format!(
      "function Component{i}(props) {{\n  const items = (props.items ?? [{i}, {j}, {k}]).map((item, n) => `<li data-n=\"${{n}}\">${{escape(item)}}</li>`);\n  const title = props.title ? escape(props.title) : 'component {i}';\n  if (props.compact) return `<section class=\"c{i}\">${{title}}</section>`;\n  return `<section class=\"c{i}\"><h2>${{title}}</h2><ul>${{items.join('')}}</ul></section>`;\n}}\nrouter.add('/page/{i}', (url) => Component{i}({{ title: url.searchParams.get('t'), items: [url.pathname] }}));\n",
      j = i * 7 % 13,
      k = i * 11 % 17,
    ));
  }
  js.push_str(
    "router.add('/', () => Component0({ title: 'home' }));\n\
     export default { fetch(request) { const url = new URL(request.url); return new Response(router.match(url.pathname)(url), { headers: { 'content-type': 'text/html' } }); } };\n",
  );
  js
}

criterion_group! {
  name = isolate;
  config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(10));
  targets = benches
}
criterion_main!(isolate);
