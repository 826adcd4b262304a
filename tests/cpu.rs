//! The CPU limit: runaway handlers are terminated near the limit; their function carries
//! on in a fresh isolate.

use crate::support::{Outpost, functions_config, http1};

const HOG: &str = r#"
const isolate = crypto.randomUUID();
export default {
  async fetch(request) {
    const path = new URL(request.url).pathname;
    if (path === "/spin") while (true) {}
    if (path === "/microtasks") for (;;) await null;
    if (path === "/burn") {
      const end = performance.now() + 10;
      while (performance.now() < end) {}
    }
    return new Response(isolate);
  },
};
"#;

/// A function burning CPU on purpose: kept on the shards (`slow_lane_entry_ms = 0`), so that
/// an isolate that changes is one that was terminated, not one that moved lanes.
fn server() -> Outpost {
  Outpost::start(
    &functions_config(
      "[server]\nslow_lane_entry_ms = 0",
      &[(
        "hog",
        "hog.js",
        "routes = [\"/\"]\nlimits = { cpu_ms = 50 }",
      )],
    ),
    &[("hog.js", HOG)],
  )
}

/// The CPU time the body of a cpu-limit 503 says the isolate had used, in microseconds.
fn used_us(body: &str) -> u64 {
  let after = body.split("terminated after ").nth(1).expect(body);
  after.split(' ').next().unwrap().parse().expect(body)
}

#[tokio::test]
async fn runaway_handlers_are_terminated_near_the_limit_and_replaced() {
  let outpost = server();
  let before = outpost.get_text("/").await;
  for path in ["/spin", "/microtasks"] {
    let response = http1().get(outpost.url(path)).send().await.unwrap();
    assert_eq!(response.status(), 503, "{path}");
    assert_eq!(response.headers()["outpost-termination"], "cpu-limit");
    let used = used_us(&response.text().await.unwrap());
    assert!(
      (50_000..=60_000).contains(&used),
      "{path}: terminated after {used} us"
    );
  }
  // The function carries on, in a new isolate.
  let after = outpost.get_text("/").await;
  assert_ne!(before, after);
}

#[tokio::test]
async fn work_within_the_limit_is_not_cut_and_does_not_add_up_across_requests() {
  let outpost = server();
  let first = outpost.get_text("/burn").await;
  // Ten requests of 10 ms each: 100 ms in all, twice the per-request limit.
  for _ in 0..10 {
    assert_eq!(
      outpost.get_text("/burn").await,
      first,
      "same isolate, never terminated"
    );
  }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_on_io_is_not_charged_for_its_neighbours() {
  let outpost = Outpost::start(
    &functions_config(
      "[server]\nslow_lane_entry_ms = 0",
      &[(
        "shared",
        "shared.js",
        // One isolate: the neighbours share it with the waiting request.
        "routes = [\"/\"]\nlimits = { cpu_ms = 50 }\npool = { max_isolates = 1 }",
      )],
    ),
    &[(
      "shared.js",
      r#"
let release;
const released = new Promise((resolve) => { release = resolve; });
export default {
  async fetch(request) {
    const path = new URL(request.url).pathname;
    if (path === "/wait") {
      console.log("waiting");
      await released;
      // Alone again after the timer: only its own CPU counts against its limit now.
      await new Promise((resolve) => setTimeout(resolve, 50));
      const end = performance.now() + 5;
      while (performance.now() < end) {}
      return new Response("waited");
    }
    if (path === "/release") release();
    const end = performance.now() + 10;
    while (performance.now() < end) {}
    return new Response("burned");
  },
};
"#,
    )],
  );
  let url = outpost.url("/wait");
  let waiting = tokio::spawn(async move { http1().get(url).send().await.unwrap() });
  tokio::task::block_in_place(|| outpost.wait_for_log("waiting"));
  // 200 ms of CPU in all from neighbours, four times the limit, while /wait is in flight.
  for _ in 0..20 {
    assert_eq!(outpost.get_text("/burn").await, "burned");
  }
  assert_eq!(outpost.get_text("/release").await, "burned");
  let waited = waiting.await.unwrap();
  assert_eq!(waited.status(), 200);
  assert_eq!(waited.text().await.unwrap(), "waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_burning_cpu_does_not_stop_its_neighbour() {
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[
        ("hog", "hog.js", "routes = [\"hog.test/\"]"),
        ("healthy", "healthy.js", "routes = [\"/\"]"),
      ],
    ),
    &[
      (
        "hog.js",
        "export default { fetch() { const end = performance.now() + 40; while (performance.now() < end) {} return new Response('burned'); } };",
      ),
      (
        "healthy.js",
        "export default { fetch: () => new Response('hello') };",
      ),
    ],
  );
  let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
  let hogs: Vec<_> = (0..4)
    .map(|_| {
      let (url, stop) = (outpost.url("/"), stop.clone());
      tokio::spawn(async move {
        let client = http1();
        let mut burned = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
          let response = client
            .get(&url)
            .header("host", "hog.test")
            .send()
            .await
            .unwrap();
          assert_eq!(response.text().await.unwrap(), "burned");
          burned += 1;
        }
        burned
      })
    })
    .collect();
  // Generous on purpose: the tight figure is a benchmark, not a test.
  let client = reqwest::Client::builder()
    .timeout(std::time::Duration::from_secs(5))
    .build()
    .unwrap();
  for _ in 0..100 {
    let response = client.get(outpost.url("/")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "hello");
  }
  stop.store(true, std::sync::atomic::Ordering::Relaxed);
  let mut burned = 0;
  for hog in hogs {
    burned += hog.await.unwrap();
  }
  assert!(burned > 0, "the hog was served too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_soft_limit_an_isolate_finishes_its_requests_and_is_replaced() {
  // Not demoted: a SCHED_IDLE isolate spinning by the clock on a machine busy with other
  // tests can get almost no CPU, and so never reach the soft limit.
  let outpost = Outpost::start(
    &functions_config(
      "[server]\ndemote_long_entries = false",
      &[(
        "soft",
        "soft.js",
        "routes = [\"/\"]\nlimits = { cpu_ms = 1000, soft_cpu_ms = 20 }\npool = { max_isolates = 4, isolate_concurrency = 8 }",
      )],
    ),
    &[(
      "soft.js",
      r#"
const isolate = crypto.randomUUID();
export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === "/slow") {
      console.log("slow request started");
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
    const end = performance.now() + Number(url.searchParams.get("burn_ms") ?? 0);
    while (performance.now() < end) {}
    return new Response(isolate);
  },
};
"#,
    )],
  );
  let first = outpost.get_text("/?burn_ms=2").await;
  assert_eq!(
    outpost.get_text("/?burn_ms=2").await,
    first,
    "below the soft limit the isolate stays"
  );
  let url = outpost.url("/slow");
  let slow = tokio::spawn(async move { http1().get(url).send().await.unwrap() });
  tokio::task::block_in_place(|| outpost.wait_for_log("slow request started"));
  // Past the soft limit, below the hard one: answered in full, by the same isolate. With
  // /slow in flight too, the entry's soft budget is two limits (40 ms). The handler spins by
  // the clock: 400 ms of spinning is well past 40 ms of CPU even on a machine busy enough to
  // give it a fifth of a core, and cannot reach the 1000 ms hard limit.
  let response = http1()
    .get(outpost.url("/?burn_ms=400"))
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 200);
  assert_eq!(response.text().await.unwrap(), first);
  // New requests go to a fresh isolate...
  let next = outpost.get_text("/").await;
  assert_ne!(
    next,
    first,
    "a retired isolate takes no new requests; logs:\n{}",
    outpost.logs()
  );
  // ...while the retired one finishes the request it had.
  let slow = slow.await.unwrap();
  assert_eq!(slow.status(), 200);
  assert_eq!(slow.text().await.unwrap(), first);
  outpost.wait_for_log("isolate retired: soft CPU limit");
}
