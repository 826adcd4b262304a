//! The memory limit: heap and ArrayBuffer bombs are stopped without harming the process.

use crate::support::{Outpost, functions_config, http1};

const BOMB: &str = r#"
const isolate = crypto.randomUUID();
export default {
  fetch(request) {
    const path = new URL(request.url).pathname;
    if (path === "/heap") {
      const hoard = [];
      for (;;) hoard.push(new Array(1e6).fill(1));
    }
    if (path === "/buffers") {
      const hoard = [];
      for (;;) hoard.push(new ArrayBuffer(4 << 20));
    }
    return new Response(isolate);
  },
};
"#;

#[tokio::test]
async fn two_hundred_bombs_are_stopped_and_the_process_stays_bounded() {
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[(
        "bomb",
        "bomb.js",
        "routes = [\"/\"]\nlimits = { memory_mb = 64, cpu_ms = 60000 }",
      )],
    ),
    &[("bomb.js", BOMB)],
  );
  let before = outpost.get_text("/").await;
  let mut rss_after_warmup = 0;
  for round in 0..200 {
    let heap = round % 2 == 0;
    let path = if heap { "/heap" } else { "/buffers" };
    let response = http1().get(outpost.url(path)).send().await.unwrap();
    let status = response.status();
    let termination = response
      .headers()
      .get("outpost-termination")
      .map(|v| v.to_str().unwrap().to_string());
    let body = response.text().await.unwrap();
    if heap {
      // A heap past its limit: the isolate is terminated and discarded.
      assert_eq!(status, 503, "round {round}: {body}");
      assert_eq!(
        termination.as_deref(),
        Some("memory-limit"),
        "round {round}"
      );
    } else {
      // ArrayBuffers past the limit: the allocation is refused with a RangeError, which
      // the bomb does not catch (500), unless the heap ran out first (503).
      assert!(
        status == 500 || termination.as_deref() == Some("memory-limit"),
        "round {round}: {status} {body}"
      );
    }
    if round == 9 {
      rss_after_warmup = outpost.proc_status_kib("VmRSS");
    }
  }
  let rss_after = outpost.proc_status_kib("VmRSS");
  eprintln!("RSS after 10 bombs: {rss_after_warmup} KiB; after 200: {rss_after} KiB");
  // Each bomb grows a heap or its buffers to 64 MiB. 190 more bombs that each left theirs
  // behind would add gigabytes; allocator caching and an isolate still being dropped stay
  // well below 192 MiB.
  assert!(
    rss_after < rss_after_warmup + 192 * 1024,
    "RSS went from {rss_after_warmup} KiB after 10 bombs to {rss_after} KiB after 200"
  );
  let after = outpost.get_text("/").await;
  assert_ne!(before, after, "a fresh isolate serves after the bombs");
}

#[tokio::test]
async fn a_function_allowed_less_than_others_is_held_to_its_own_limit() {
  let grower = r#"
const hoard = [];
export default {
  async fetch() {
    // About 1 MiB per step, yielding to the event loop in between.
    for (let step = 0; step < 96; step++) {
      hoard.push(new Array(131072).fill(step));
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
    return new Response("grew");
  },
};
"#;
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[
        (
          "small",
          "small.js",
          "routes = [\"/small\"]\nlimits = { memory_mb = 32, cpu_ms = 60000 }",
        ),
        (
          "big",
          "big.js",
          "routes = [\"/big\"]\nlimits = { memory_mb = 256, cpu_ms = 60000 }",
        ),
      ],
    ),
    &[("small.js", grower), ("big.js", grower)],
  );
  let small = http1().get(outpost.url("/small")).send().await.unwrap();
  assert_eq!(small.status(), 503);
  assert_eq!(small.headers()["outpost-termination"], "memory-limit");
  assert_eq!(outpost.get_text("/big").await, "grew");
}

/// ArrayBuffers count against the memory limit. One the limit cannot hold is refused with a
/// `RangeError` the handler catches, as in browsers and Workers: the isolate, and every other
/// request on it, carries on.
#[tokio::test]
async fn array_buffers_count_against_the_memory_limit_and_a_refusal_is_catchable() {
  let buffers = r#"
const isolate = crypto.randomUUID();
export default {
  fetch(request) {
    const mib = Number(new URL(request.url).searchParams.get("mib"));
    try {
      return new Response(`${isolate} allocated ${new ArrayBuffer(mib * 1024 * 1024).byteLength >> 20} MiB`);
    } catch (error) {
      return new Response(`${isolate} ${error.name}: ${error.message}`);
    }
  },
};
"#;
  // Refusing an allocation costs V8 several garbage collections: kept on the shards
  // (`slow_lane_entry_ms = 0`), so that an isolate that changes is one that was terminated.
  let outpost = Outpost::start(
    &functions_config(
      "[server]\nslow_lane_entry_ms = 0",
      &[(
        "buffers",
        "buffers.js",
        "routes = [\"/\"]\nlimits = { memory_mb = 64 }",
      )],
    ),
    &[("buffers.js", buffers)],
  );
  let first = outpost.get_text("/?mib=32").await;
  let (isolate, allocated) = first.split_once(' ').unwrap();
  assert_eq!(allocated, "allocated 32 MiB");
  // More than the function may use, again and again: refused inside JS, never granted.
  for mib in [100, 65, 4096, 100, 100, 100] {
    let response = http1()
      .get(outpost.url(&format!("/?mib={mib}")))
      .send()
      .await
      .unwrap();
    assert_eq!(response.status(), 200, "{mib} MiB");
    let body = response.text().await.unwrap();
    assert_eq!(
      body,
      format!("{isolate} RangeError: Array buffer allocation failed"),
      "{mib} MiB"
    );
  }
  // Freed buffers are given back: the same isolate can allocate again.
  assert_eq!(
    outpost.get_text("/?mib=48").await,
    format!("{isolate} allocated 48 MiB")
  );
}
