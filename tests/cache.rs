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
  // Function a has two isolates (`prewarm = 2`): with two shards, one on each, and a new
  // connection lands on either; with one, the least busy answers. Hold one, and ask until the
  // isolate that did not store the entry answers.
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
  tokio::task::block_in_place(|| outpost.wait_for_log("holding "));
  let mut matched = None;
  for _ in 0..64 {
    let answer = get(&outpost, "a.test", "/match").await;
    if isolate(&answer) != isolate(&put) {
      matched = Some(answer);
      break;
    }
    assert_eq!(outcome(&answer), "shared|shared|age=0");
  }
  let matched = matched.expect("another isolate answered");
  assert_eq!(outcome(&matched), "shared|shared|age=0");
  hold.await.unwrap();

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

/// A function behind route caching; counts how often it is entered.
const ORIGIN: &str = r#"
let calls = 0;
export default {
  fetch(request) {
    calls++;
    const url = new URL(request.url);
    if (request.headers.get("x-fail") === "1") return new Response("down", { status: 500 });
    return new Response(`calls=${calls}`, {
      headers: {
        "cache-control": url.searchParams.get("cc") ?? "max-age=60",
        "etag": '"v1"',
        "cache-tag": url.searchParams.get("tag") ?? "none",
      },
    });
  },
};
"#;

fn route_cached(admin: &str) -> Outpost {
  Outpost::start(
    &functions_config(
      &format!("[admin]\naddress = \"127.0.0.1:0\"\n{admin}"),
      &[(
        "origin",
        "origin.js",
        "routes = [\"/\"]\ncache = { enabled = true }",
      )],
    ),
    &[("origin.js", ORIGIN)],
  )
}

/// (outpost-cache header, body) of a GET.
async fn cached_get(outpost: &Outpost, path: &str, headers: &[(&str, &str)]) -> (String, String) {
  let mut request = http1().get(outpost.url(path));
  for (name, value) in headers {
    request = request.header(*name, *value);
  }
  let response = request.send().await.unwrap();
  let how = response
    .headers()
    .get("outpost-cache")
    .map_or("-".to_string(), |v| v.to_str().unwrap().to_string());
  let status = response.status().as_u16();
  let body = response.text().await.unwrap();
  (how, format!("{status} {body}"))
}

async fn admin_post(
  outpost: &Outpost,
  path: &str,
  body: &str,
  token: Option<&str>,
) -> (u16, String) {
  let mut request = http1()
    .post(format!("http://{}{path}", outpost.admin.unwrap()))
    .body(body.to_string());
  if let Some(token) = token {
    request = request.bearer_auth(token);
  }
  let response = request.send().await.unwrap();
  (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn route_caching_serves_hits_without_entering_js_and_purges_by_url_prefix_and_tag() {
  let outpost = route_cached("");
  let miss = cached_get(&outpost, "/a?tag=red", &[]).await;
  assert_eq!(miss, ("MISS".into(), "200 calls=1".into()));
  let hit = cached_get(&outpost, "/a?tag=red", &[]).await;
  assert_eq!(hit, ("HIT".into(), "200 calls=1".into()));
  // A conditional request the cached response satisfies: 304 from the cache.
  let not_modified = cached_get(&outpost, "/a?tag=red", &[("if-none-match", "\"v1\"")]).await;
  assert_eq!(not_modified, ("HIT".into(), "304 ".into()));
  // What must not be stored is not.
  assert_eq!(cached_get(&outpost, "/b?cc=no-store", &[]).await.0, "MISS");
  assert_eq!(cached_get(&outpost, "/b?cc=no-store", &[]).await.0, "MISS");

  let base = outpost.url("");
  let purge = format!(r#"{{"url": "{base}/a?tag=red"}}"#);
  assert_eq!(
    admin_post(&outpost, "/cache/purge", &purge, None).await,
    (200, "{\"purged\":1}\n".into())
  );
  assert_eq!(cached_get(&outpost, "/a?tag=red", &[]).await.0, "MISS");
  cached_get(&outpost, "/c?tag=red", &[]).await;
  cached_get(&outpost, "/d?tag=blue", &[]).await;
  assert_eq!(
    admin_post(&outpost, "/cache/purge", r#"{"tag": "red"}"#, None).await,
    (200, "{\"purged\":2}\n".into())
  );
  let prefix = format!(r#"{{"prefix": "{base}/d", "function": "origin"}}"#);
  assert_eq!(
    admin_post(&outpost, "/cache/purge", &prefix, None).await,
    (200, "{\"purged\":1}\n".into())
  );
  let (status, error) = admin_post(
    &outpost,
    "/cache/purge",
    r#"{"url": "a", "tag": "b"}"#,
    None,
  )
  .await;
  assert_eq!(status, 400, "{error}");
  assert!(error.contains("exactly one of"), "{error}");

  let stats = http1()
    .get(format!("http://{}/cache/stats", outpost.admin.unwrap()))
    .send()
    .await
    .unwrap()
    .json::<serde_json::Value>()
    .await
    .unwrap();
  let origin = &stats["functions"]["origin"];
  assert_eq!(origin["hits"], 2, "{stats}");
  assert_eq!(origin["entries"], 0, "{stats}");
  assert!(origin["refusals"].as_u64().unwrap() >= 2, "{stats}");
}

#[tokio::test]
async fn stale_responses_are_served_while_revalidating_and_when_the_function_fails() {
  let outpost = route_cached("token = \"secret\"");
  // max-age=0 with stale-while-revalidate: stored, and every later hit is stale.
  let swr = "/s?cc=max-age%3D0%2C%20stale-while-revalidate%3D600";
  assert_eq!(
    cached_get(&outpost, swr, &[]).await,
    ("MISS".into(), "200 calls=1".into())
  );
  assert_eq!(
    cached_get(&outpost, swr, &[]).await,
    ("STALE".into(), "200 calls=1".into())
  );
  // The background request refreshes the entry.
  let mut refreshed = false;
  for _ in 0..100 {
    let (how, body) = cached_get(&outpost, swr, &[]).await;
    assert_eq!(how, "STALE");
    if body != "200 calls=1" {
      refreshed = true;
      break;
    }
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
  }
  assert!(refreshed, "the stale entry was never refreshed");

  let sie = "/e?cc=max-age%3D0%2C%20stale-if-error%3D600";
  let (how, stored) = cached_get(&outpost, sie, &[]).await;
  assert_eq!(how, "MISS");
  // The function fails: the stale response stands in.
  assert_eq!(
    cached_get(&outpost, sie, &[("x-fail", "1")]).await,
    ("STALE".into(), stored)
  );

  // With a token, the admin listener wants it.
  let (status, _) = admin_post(&outpost, "/cache/purge", r#"{"tag": "none"}"#, None).await;
  assert_eq!(status, 401);
  let (status, body) = admin_post(
    &outpost,
    "/cache/purge",
    r#"{"tag": "none"}"#,
    Some("secret"),
  )
  .await;
  assert_eq!((status, body.as_str()), (200, "{\"purged\":2}\n"));
}

/// Route-cache HITs are billed like any response: their bytes are in the access record and
/// in `/usage`. A HEAD is answered from the stored GET without entering JS.
#[tokio::test]
async fn hits_count_their_egress_and_head_is_answered_from_the_cache() {
  let outpost = route_cached("");
  assert_eq!(
    cached_get(&outpost, "/e", &[]).await,
    ("MISS".into(), "200 calls=1".into())
  );
  let hit = http1().get(outpost.url("/e")).send().await.unwrap();
  assert_eq!(hit.headers()["outpost-cache"], "HIT");
  let id = hit.headers()["outpost-request-id"]
    .to_str()
    .unwrap()
    .to_string();
  assert_eq!(hit.text().await.unwrap(), "calls=1");
  let logs = outpost.wait_for_log(&format!("request_id=\"{id}\""));
  let record = logs
    .lines()
    .find(|l| l.contains(&format!("request_id=\"{id}\"")) && l.contains("outpost::access"))
    .unwrap();
  assert!(record.contains("bytes_out=7"), "{record}");

  let head = http1().head(outpost.url("/e")).send().await.unwrap();
  assert_eq!(head.status(), 200);
  assert_eq!(head.headers()["outpost-cache"], "HIT");
  assert_eq!(head.headers()["content-length"], "7");
  assert_eq!(head.bytes().await.unwrap().len(), 0);
  // Neither the HIT nor the HEAD entered JS.
  assert_eq!(
    cached_get(&outpost, "/e?other", &[]).await,
    ("MISS".into(), "200 calls=2".into())
  );

  // The MISS, the HIT and the last MISS sent 7 bytes each; the HEAD none.
  let admin = format!("http://{}", outpost.admin.unwrap());
  let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
  loop {
    let usage: serde_json::Value = http1()
      .get(format!("{admin}/usage"))
      .send()
      .await
      .unwrap()
      .json()
      .await
      .unwrap();
    let origin = &usage["functions"]["origin"];
    if origin["requests"] == 4 {
      assert_eq!(origin["egress_bytes"], 21, "{usage}");
      break;
    }
    assert!(std::time::Instant::now() < deadline, "{usage}");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
  }
}

/// A purge may name a path instead of a full URL: every host's entry of that path goes. A
/// purge that removes nothing says why.
#[tokio::test]
async fn purge_by_path_reaches_every_host_and_an_empty_purge_says_why() {
  let outpost = route_cached("");
  for host in ["a.test", "b.test"] {
    let response = http1()
      .get(outpost.url("/p?x=1"))
      .header("host", host)
      .send()
      .await
      .unwrap();
    assert_eq!(response.headers()["outpost-cache"], "MISS");
  }
  let (status, answer) = admin_post(
    &outpost,
    "/cache/purge",
    r#"{"url": "/p?x=1", "function": "origin"}"#,
    None,
  )
  .await;
  assert_eq!((status, answer.as_str()), (200, "{\"purged\":2}\n"));
  let (status, answer) = admin_post(&outpost, "/cache/purge", r#"{"url": "/p?x=1"}"#, None).await;
  assert_eq!(status, 200);
  let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
  assert_eq!(answer["purged"], 0);
  assert!(
    answer["reason"]
      .as_str()
      .unwrap()
      .contains("has the path and query /p?x=1"),
    "{answer}"
  );
  let (status, answer) = admin_post(&outpost, "/cache/purge", r#"{"prefix": "p"}"#, None).await;
  assert_eq!(status, 400, "{answer}");
  assert!(answer.contains("path starting with /"), "{answer}");
}
