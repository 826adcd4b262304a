//! The shared edge cache on its own (no HTTP, no JS): a fresh hit, a miss, and storing a
//! 1 KiB response, as route caching and the Cache API call them.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use outpost::cache::edge_cache::{Lookup, SharedCache, Store, SystemClock};
use outpost_ext_cache::CacheNamespace;

fn request(url: &str) -> http::request::Parts {
  http::Request::get(url)
    .header("accept-encoding", "br")
    .body(())
    .unwrap()
    .into_parts()
    .0
}

fn response() -> http::response::Parts {
  http::Response::builder()
    .header("cache-control", "max-age=3600")
    .header("content-type", "text/plain")
    .body(())
    .unwrap()
    .into_parts()
    .0
}

fn benches(c: &mut Criterion) {
  let cache = SharedCache::new(256 << 20, 16 << 20, Arc::new(SystemClock));
  let namespace = CacheNamespace("bench".into());
  let body = Bytes::from(vec![b'x'; 1024]);
  let hit = request("https://bench.test/hit");
  cache.store_in(&namespace, Store::Route, &hit, response(), body.clone());
  c.bench_function("cache_hit_1k", |b| {
    b.iter(|| {
      let Lookup::Fresh(found) = cache.lookup_in(&namespace, Store::Route, &hit) else {
        panic!("the entry is fresh");
      };
      found
    })
  });
  let miss = request("https://bench.test/miss");
  c.bench_function("cache_miss", |b| {
    b.iter(|| cache.lookup_in(&namespace, Store::Route, &miss))
  });
  let mut index = 0u64;
  c.bench_function("cache_store_1k", |b| {
    b.iter(|| {
      index += 1;
      let request = request(&format!("https://bench.test/store/{}", index % 10_000));
      cache.store_in(&namespace, Store::Route, &request, response(), body.clone())
    })
  });
}

criterion_group! {
  name = cache;
  config = Criterion::default().sample_size(50);
  targets = benches
}
criterion_main!(cache);
