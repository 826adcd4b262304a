//! The isolate pool: growth under load, idle eviction, and one function per isolate.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::{Outpost, functions_config, http1};

/// Each isolate draws its own id when the module is evaluated.
const WHOAMI: &str = r#"
const isolate = crypto.randomUUID();
export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.searchParams.has("hold")) await new Promise((r) => setTimeout(r, 300));
    if (url.searchParams.has("leak")) globalThis.secret = "from " + isolate;
    return new Response(JSON.stringify({ isolate, secret: globalThis.secret ?? null }));
  },
};
"#;

async fn isolates_serving(outpost: &Outpost, path: &str, concurrent: usize) -> HashSet<String> {
  let client = http1();
  let requests = (0..concurrent).map(|_| {
    let request = client.get(outpost.url(path)).send();
    async move {
      let json: serde_json::Value = request.await.unwrap().json().await.unwrap();
      json["isolate"].as_str().unwrap().to_string()
    }
  });
  futures::future::join_all(requests)
    .await
    .into_iter()
    .collect()
}

#[tokio::test]
async fn pool_grows_to_its_maximum_under_load_and_evicts_idle_isolates() {
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[(
        "whoami",
        "whoami.js",
        "routes = [\"/\"]\npool = { prewarm = 1, max_isolates = 3, idle_timeout_s = 1, isolate_concurrency = 1 }",
      )],
    ),
    &[("whoami.js", WHOAMI)],
  );
  let first = isolates_serving(&outpost, "/?hold", 6).await;
  assert_eq!(
    first.len(),
    3,
    "six held requests spread over the maximum of three isolates"
  );

  // Past the idle timeout the two extra isolates are evicted; the pre-warmed one stays.
  tokio::time::sleep(Duration::from_millis(3500)).await;
  let second = isolates_serving(&outpost, "/?hold", 3).await;
  assert_eq!(second.len(), 3);
  let survivors = second.intersection(&first).count();
  assert_eq!(
    survivors, 1,
    "only the pre-warmed isolate survives; first {first:?} second {second:?}"
  );
}

#[tokio::test]
async fn functions_never_share_an_isolate() {
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[
        ("tenant-a", "a/whoami.js", r#"routes = ["a.test/"]"#),
        ("tenant-b", "b/whoami.js", r#"routes = ["b.test/"]"#),
      ],
    ),
    &[("a/whoami.js", WHOAMI), ("b/whoami.js", WHOAMI)],
  );
  let client = http1();
  let get = |host: &'static str, path: &'static str| {
    let request = client.get(outpost.url(path)).header("host", host).send();
    async move {
      request
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap()
    }
  };
  let a = get("a.test", "/?leak").await;
  let b = get("b.test", "/").await;
  assert_ne!(a["isolate"], b["isolate"]);
  assert_eq!(
    a["secret"],
    format!("from {}", a["isolate"].as_str().unwrap())
  );
  assert_eq!(
    b["secret"],
    serde_json::Value::Null,
    "tenant b cannot see tenant a's globals"
  );
}

#[tokio::test]
async fn new_isolates_come_from_the_spares() {
  let outpost = Outpost::start(
    &functions_config(
      "[server]\nspare_isolates = 1",
      &[(
        "lazy",
        "whoami.js",
        "routes = [\"/\"]\npool = { prewarm = 0, max_isolates = 2, isolate_concurrency = 1 }",
      )],
    ),
    &[("whoami.js", WHOAMI)],
  );
  // The module was loaded once at start, in an isolate that was let go; no isolate runs
  // the function now: the first request takes the spare, which is refilled.
  let started = outpost.wait_for_log("isolate ready").len();
  assert_eq!(isolates_serving(&outpost, "/", 1).await.len(), 1);
  let logs = outpost.wait_for_log("isolate ready");
  let line = logs[started..]
    .lines()
    .find(|l| l.contains("isolate ready"))
    .unwrap_or_else(|| panic!("no isolate started for the request:\n{logs}"));
  assert!(
    line.contains("from=\"spare\"") && line.contains("function=\"lazy\""),
    "{line}"
  );
}
