//! The shared edge cache through the Cache API: shared across isolates and threads, split
//! by namespace and `Vary`, governed by the HTTP caching rules.

use crate::support::{Outpost, functions_config, http1};

/// A handler that drives the Cache API from query parameters and reports what happened.
const CACHER: &str = r#"
const isolate = crypto.randomUUID();
export default {
  async fetch(request) {
    const url = new URL(request.url);
    const q = url.searchParams;
    const key = `https://cache.test/${q.get("key") ?? "k"}`;
    const cache = q.has("cache") ? await caches.open(q.get("cache")) : caches.default;
    const keyRequest = new Request(key, { headers: { "accept-language": q.get("lang") ?? "en" } });
    try {
      switch (url.pathname) {
        case "/hold":
          console.log(`holding ${isolate}`);
          await new Promise((resolve) => setTimeout(resolve, 1500));
          return new Response(isolate);
        case "/put": {
          const headers = { "cache-control": q.get("cc") ?? "max-age=60" };
          if (q.has("vary")) headers.vary = q.get("vary");
          if (q.has("cookie")) headers["set-cookie"] = "id=1";
          const body = "x".repeat(Number(q.get("size") ?? 0)) + (q.get("value") ?? "");
          const response = new Response(body, { headers });
          await cache.put(q.has("method") ? new Request(key, { method: q.get("method") }) : keyRequest, response);
          return new Response(`${isolate} put; bodyUsed=${response.bodyUsed}`);
        }
        case "/match": {
          const first = await cache.match(keyRequest);
          if (first === undefined) return new Response(`${isolate} miss`);
          const second = await cache.match(keyRequest);
          return new Response(`${isolate} ${await first.text()}|${await second.text()}|age=${first.headers.get("age")}`);
        }
        case "/delete":
          return new Response(`${isolate} deleted=${await cache.delete(keyRequest)}`);
        case "/bad-url":
          await cache.match("not a url");
          return new Response("no error");
      }
    } catch (error) {
      return new Response(`${isolate} ${error.name}: ${error.message}`);
    }
    return new Response("unknown path", { status: 404 });
  },
};
"#;

fn server() -> Outpost {
  Outpost::start(
    &functions_config(
      "[cache]\nmax_entry_bytes = \"64KiB\"",
      &[
        (
          "a",
          "cacher.js",
          "routes = [\"a.test/\"]\npool = { prewarm = 2, isolate_concurrency = 1 }",
        ),
        ("b", "cacher.js", "routes = [\"b.test/\"]"),
      ],
    ),
    &[("cacher.js", CACHER)],
  )
}

async fn get(outpost: &Outpost, host: &str, path: &str) -> String {
  let response = http1()
    .get(outpost.url(path))
    .header("host", host)
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 200, "{host}{path}");
  response.text().await.unwrap()
}

/// The text after the isolate id.
fn outcome(body: &str) -> &str {
  body.split_once(' ').map_or(body, |(_, rest)| rest)
}

fn isolate(body: &str) -> &str {
  body.split_once(' ').map_or(body, |(id, _)| id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_shared_across_isolates_and_threads_but_not_namespaces() {
  let outpost = server();
  let put = get(&outpost, "a.test", "/put?value=shared").await;
  assert_eq!(outcome(&put), "put; bodyUsed=true");
  // Hold the isolate that stored the entry, so the next request goes to the other one,
  // which runs on another thread.
  let url = outpost.url("/hold");
  let hold = tokio::spawn(async move {
    http1()
      .get(url)
      .header("host", "a.test")
      .send()
      .await
      .unwrap()
      .text()
      .await
      .unwrap()
  });
  tokio::task::block_in_place(|| outpost.wait_for_log(&format!("holding {}", isolate(&put))));
  let matched = get(&outpost, "a.test", "/match").await;
  assert_ne!(
    isolate(&matched),
    isolate(&put),
    "matched from another isolate"
  );
  assert_eq!(outcome(&matched), "shared|shared|age=0");
  assert_eq!(hold.await.unwrap(), isolate(&put));

  // Another function, same URL: its own namespace.
  assert_eq!(outcome(&get(&outpost, "b.test", "/match").await), "miss");
  // Another cache of the same function.
  assert_eq!(
    outcome(&get(&outpost, "a.test", "/match?cache=other").await),
    "miss"
  );
  assert_eq!(
    outcome(&get(&outpost, "a.test", "/delete").await),
    "deleted=true"
  );
  assert_eq!(outcome(&get(&outpost, "a.test", "/match").await), "miss");
}

#[tokio::test]
async fn the_caching_rules_decide_what_is_stored() {
  let outpost = server();
  // Refused responses are not stored, and put still resolves.
  for refused in [
    "/put?key=nostore&cc=no-store",
    "/put?key=private&cc=private,max-age=60",
    "/put?key=cookie&cookie=1",
    "/put?key=big&size=70000",
  ] {
    assert_eq!(
      outcome(&get(&outpost, "b.test", refused).await),
      "put; bodyUsed=true",
      "{refused}"
    );
    let key = refused
      .split("key=")
      .nth(1)
      .unwrap()
      .split('&')
      .next()
      .unwrap();
    assert_eq!(
      outcome(&get(&outpost, "b.test", &format!("/match?key={key}")).await),
      "miss",
      "{refused}"
    );
  }
  outpost.wait_for_log("not cached: the body is larger than cache.max_entry_bytes");

  // Vary splits entries.
  get(
    &outpost,
    "b.test",
    "/put?key=v&vary=accept-language&lang=en&value=en",
  )
  .await;
  get(
    &outpost,
    "b.test",
    "/put?key=v&vary=accept-language&lang=nl&value=nl",
  )
  .await;
  assert_eq!(
    outcome(&get(&outpost, "b.test", "/match?key=v&lang=en").await),
    "en|en|age=0"
  );
  assert_eq!(
    outcome(&get(&outpost, "b.test", "/match?key=v&lang=nl").await),
    "nl|nl|age=0"
  );
  assert_eq!(
    outcome(&get(&outpost, "b.test", "/match?key=v&lang=de").await),
    "miss"
  );

  // Bad input throws TypeErrors.
  let body = get(&outpost, "b.test", "/put?key=post&method=POST").await;
  assert!(
    outcome(&body).starts_with(
      "TypeError: Failed to execute 'put' on 'Cache': only GET requests can be cached"
    ),
    "{body}"
  );
  let body = get(&outpost, "b.test", "/bad-url").await;
  assert!(outcome(&body).starts_with("TypeError"), "{body}");
}
