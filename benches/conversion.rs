//! Request and response conversion: one request through a warm isolate with no HTTP in the
//! way (a `DispatchRequest` in, the `http::Response` and its body out): bare, with 16
//! request headers the handler reads and 8 response headers, and with a 1 KiB body besides
//! that the handler reads and echoes. The difference is what converting headers and bodies between Rust and JS costs;
//! `header_map_16` times the Rust half of the response side alone.

use std::time::Duration;

mod serving;
mod spec;

use spec::bench_spec;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use deno_core::convert::ByteString;
use http_body_util::BodyExt;
use outpost::isolate::BlankIsolate;

const HANDLER: &str = r#"
export default {
  async fetch(request) {
    if (!request.headers.has("x-request-0")) return new Response("ok");
    let seen = 0;
    for (const [name, value] of request.headers) seen += name.length + value.length;
    const body = request.method === "POST" ? await request.arrayBuffer() : "ok";
    const headers = new Headers({ "content-type": "application/octet-stream", "x-seen": String(seen) });
    for (let i = 0; i < 6; i++) headers.set(`x-echo-${i}`, request.headers.get(`x-request-${i}`));
    return new Response(body, { headers });
  },
};
"#;

fn request_headers() -> http::HeaderMap {
  let mut headers = http::HeaderMap::new();
  headers.insert("host", "bench.local".parse().unwrap());
  headers.insert(
    "user-agent",
    "Mozilla/5.0 (X11; Linux x86_64) bench".parse().unwrap(),
  );
  headers.insert(
    "accept",
    "application/json, text/plain, */*".parse().unwrap(),
  );
  headers.insert("accept-encoding", "gzip, deflate, br".parse().unwrap());
  headers.insert("accept-language", "en-GB,en;q=0.9".parse().unwrap());
  headers.insert("content-type", "application/octet-stream".parse().unwrap());
  headers.insert(
    "cookie",
    "session=0123456789abcdef; theme=dark".parse().unwrap(),
  );
  headers.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
  headers.insert("x-forwarded-proto", "https".parse().unwrap());
  headers.insert(
    "traceparent",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
      .parse()
      .unwrap(),
  );
  for i in 0..6 {
    headers.insert(
      http::HeaderName::from_bytes(format!("x-request-{i}").as_bytes()).unwrap(),
      format!("value-{i}-abcdefghijklmnopqrstuvwxyz")
        .parse()
        .unwrap(),
    );
  }
  headers
}

fn benches(c: &mut Criterion) {
  outpost::init_v8();
  let tokio = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .unwrap();
  let _guard = tokio.enter();
  let dir = tempfile::tempdir().unwrap();
  let path = dir.path().join("echo.js");
  std::fs::write(&path, HANDLER).unwrap();
  let spec = bench_spec(&path);
  let local = tokio::task::LocalSet::new();
  let settings = serving::settings();
  let meter = serving::meter();
  let blank = BlankIsolate::new(&settings).unwrap();
  let (queue, _driver) = local.block_on(&tokio, serving::serve(blank, &spec, &meter));
  let headers = request_headers();
  let body = Bytes::from(vec![b'x'; 1024]);

  let round_trip = |with_headers: bool, with_body: bool| {
    local.block_on(&tokio, async {
      let response = serving::send(
        &queue,
        if with_body {
          http::Method::POST
        } else {
          http::Method::GET
        },
        "https://bench.local/convert?x=1",
        if with_headers {
          headers.clone()
        } else {
          http::HeaderMap::new()
        },
        with_body.then(|| outpost_ext_dispatch::full_body(body.clone())),
      )
      .await;
      let (parts, body) = response.into_parts();
      let bytes = body.collect().await.unwrap().to_bytes();
      assert_eq!(parts.status, 200);
      assert_eq!(bytes.len(), if with_body { 1024 } else { 2 });
    });
  };
  c.bench_function("dispatch_bare", |b| b.iter(|| round_trip(false, false)));
  c.bench_function("dispatch_16_headers", |b| {
    b.iter(|| round_trip(true, false))
  });
  c.bench_function("dispatch_16_headers_1k_body", |b| {
    b.iter(|| round_trip(true, true))
  });

  let list: Vec<(ByteString, ByteString)> = request_headers()
    .iter()
    .map(|(name, value)| {
      (
        ByteString::from(name.as_str()),
        ByteString::from(value.as_bytes()),
      )
    })
    .collect();
  c.bench_function("header_map_16", |b| {
    b.iter(|| outpost_ext_dispatch::header_map(list.clone()).unwrap())
  });
}

criterion_group! {
  name = conversion;
  config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(5));
  targets = benches
}
criterion_main!(conversion);
