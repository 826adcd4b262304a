//! Warm hello-world round trip through the full server: a keep-alive HTTP/1.1 (and h2c)
//! client on loopback, routing, dispatch to a pre-warmed isolate, and the response back.

use std::time::Duration;

mod timing;

use criterion::{Criterion, criterion_group, criterion_main};
use outpost::config::Config;
use outpost::server::Node;

const HANDLER: &str =
  "export default { fetch: (r) => new Response('hello from ' + new URL(r.url).pathname) };";

fn benches(c: &mut Criterion) {
  outpost::init_v8();
  let tokio = tokio::runtime::Builder::new_multi_thread()
    .enable_all()
    .build()
    .unwrap();
  let dir = tempfile::tempdir().unwrap();
  let entry = dir.path().join("hello.js");
  std::fs::write(&entry, HANDLER).unwrap();
  let config = Config::single_handler(&entry, "127.0.0.1:0".parse().unwrap()).unwrap();
  let node = tokio.block_on(Node::start(&config)).unwrap();
  let address = node.listeners()[0].address;
  tokio.spawn(node.run(std::future::pending()));
  let url = format!("http://{address}/bench");

  for (name, client) in [
    (
      "warm_round_trip_http1",
      reqwest::Client::builder().http1_only().build().unwrap(),
    ),
    (
      "warm_round_trip_h2c",
      reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap(),
    ),
  ] {
    let get = || async {
      let body = client
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
      assert_eq!(&body[..], b"hello from /bench");
    };
    timing::bench(c, name, 2000, || timing::timed(|| tokio.block_on(get())).1);
  }
}

criterion_group! {
  name = server;
  config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(10));
  targets = benches
}
criterion_main!(server);
