//! The response compression paths: a 64 KiB HTML body compressed as it streams, with brotli
//! and with gzip (as `Accept-Encoding` negotiates them), body collected to the end.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use outpost::http::compression::{Encoding, compress_response};
use outpost_ext_dispatch::full_body;

fn page() -> Bytes {
  let row = "<tr><td>outpost</td><td>edge</td><td>42</td></tr>\n";
  Bytes::from(row.repeat(64 * 1024 / row.len()))
}

fn benches(c: &mut Criterion) {
  let tokio = tokio::runtime::Builder::new_current_thread()
    .build()
    .unwrap();
  let body = page();
  let mut group = c.benchmark_group("compress_64k_html");
  group.throughput(Throughput::Bytes(body.len() as u64));
  for (name, encoding) in [("brotli", Encoding::Brotli), ("gzip", Encoding::Gzip)] {
    group.bench_function(name, |b| {
      b.iter(|| {
        let mut response = http::Response::builder()
          .header("content-type", "text/html")
          .body(full_body(body.clone()))
          .unwrap();
        compress_response(&mut response, Some(encoding), false);
        let compressed = tokio
          .block_on(response.into_body().collect())
          .unwrap()
          .to_bytes();
        assert!(compressed.len() < body.len() / 4);
        compressed
      })
    });
  }
  group.finish();
}

criterion_group! {
  name = compression;
  config = Criterion::default().sample_size(30);
  targets = benches
}
criterion_main!(compression);
