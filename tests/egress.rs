//! Egress policy for outbound fetch. Every destination here is on loopback: the denials of
//! other private ranges are checked without traffic in the runtime's unit tests.

use crate::support::{Outpost, functions_config, http1};

const FETCHER: &str = r#"
export default {
  async fetch(request) {
    const url = new URL(request.url);
    const target = url.searchParams.get("to");
    if (target === null) return new Response("origin");
    try {
      const response = await fetch(target.replace("PORT", url.port));
      return new Response("fetched " + (await response.text()));
    } catch (error) {
      return new Response(`${error.name}: ${error.message}`);
    }
  },
};
"#;

fn server(preamble: &str, function_lines: &str) -> Outpost {
  Outpost::start(
    &functions_config(
      preamble,
      &[(
        "fetcher",
        "fetcher.js",
        &format!("routes = [\"/\"]\n{function_lines}"),
      )],
    ),
    &[("fetcher.js", FETCHER)],
  )
}

#[tokio::test]
async fn loopback_is_refused_by_default_even_through_a_host_name() {
  let outpost = server("", "");
  for target in ["http://127.0.0.1:PORT/", "http://localhost:PORT/"] {
    let body = outpost.get_text(&format!("/fetch?to={target}")).await;
    assert!(
      body.starts_with("TypeError: fetch() to http://")
        && body.contains("refused by this node's egress policy"),
      "{target}: {body}"
    );
  }
}

#[tokio::test]
async fn the_operator_switch_allows_private_upstreams_and_function_lists_still_apply() {
  let open = server("[egress]\nallow_private = true", "");
  assert_eq!(
    open.get_text("/fetch?to=http://127.0.0.1:PORT/").await,
    "fetched origin"
  );
  assert_eq!(
    open.get_text("/fetch?to=http://localhost:PORT/").await,
    "fetched origin"
  );

  let denied = server(
    "[egress]\nallow_private = true",
    "egress = { deny = [\"localhost\"] }",
  );
  assert_eq!(
    denied.get_text("/fetch?to=http://127.0.0.1:PORT/").await,
    "fetched origin"
  );
  let body = denied.get_text("/fetch?to=http://localhost:PORT/").await;
  assert!(
    body.contains("refused by this node's egress policy"),
    "{body}"
  );

  let listed = server(
    "[egress]\nallow_private = true",
    "egress = { allow = [\"127.0.0.1\"] }",
  );
  assert_eq!(
    listed.get_text("/fetch?to=http://127.0.0.1:PORT/").await,
    "fetched origin"
  );
  let body = listed.get_text("/fetch?to=http://localhost:PORT/").await;
  assert!(
    body.contains("refused by this node's egress policy"),
    "{body}"
  );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_may_make_its_own_number_of_subrequests() {
  let outpost = Outpost::start(
    &functions_config(
      "[egress]\nallow_private = true",
      &[(
        "fanout",
        "fanout.js",
        "routes = [\"/\"]\nlimits = { max_subrequests = 3 }",
      )],
    ),
    &[(
      "fanout.js",
      r#"
let topLevel;
try {
  await fetch("http://127.0.0.1:1/");
} catch (error) {
  topLevel = `${error.name}: ${error.message}`;
}
export default {
  async fetch(request, env, ctx) {
    const url = new URL(request.url);
    if (url.pathname === "/origin") return new Response("origin");
    if (url.pathname === "/top-level") return new Response(topLevel);
    const origin = `http://127.0.0.1:${url.port}/origin`;
    const count = Number(url.searchParams.get("count"));
    const results = [];
    for (let i = 0; i < count; i++) {
      // Alternate direct calls with calls from a timer: both belong to this request.
      const call = i % 2 === 0
        ? fetch(origin)
        : new Promise((resolve) => setTimeout(resolve, 1)).then(() => fetch(origin));
      try {
        results.push(await (await call).text());
      } catch (error) {
        results.push(`${error.name}: ${error.message}`);
      }
    }
    return new Response(results.join("\n"));
  },
};
"#,
    )],
  );
  let body = outpost.get_text("/top-level").await;
  assert!(
    body.starts_with("TypeError: fetch() is only allowed while handling a request"),
    "{body}"
  );
  let body = outpost.get_text("/fanout?count=4").await;
  let lines: Vec<&str> = body.lines().collect();
  assert_eq!(lines[..3], ["origin"; 3], "{body}");
  assert!(
    lines[3].starts_with("TypeError: fetch() refused: this request has made 3 subrequests"),
    "{body}"
  );
  // The count is per request: the next one starts from zero, also while another is open.
  let (a, b) = tokio::join!(
    outpost.get_text("/fanout?count=3"),
    outpost.get_text("/fanout?count=3")
  );
  assert_eq!(a, "origin\norigin\norigin");
  assert_eq!(b, "origin\norigin\norigin");

  // The usage record counts them, with the bytes sent and the time and memory used.
  let response = http1()
    .get(outpost.url("/fanout?count=2"))
    .send()
    .await
    .unwrap();
  let id = response.headers()["outpost-request-id"]
    .to_str()
    .unwrap()
    .to_string();
  assert_eq!(response.text().await.unwrap(), "origin\norigin");
  let needle = format!("request_id=\"{id}\"");
  let logs = tokio::task::block_in_place(|| outpost.wait_for_log(&needle));
  let record = logs.lines().find(|l| l.contains(&needle)).unwrap();
  let field = |name: &str| -> u64 {
    let value = record.split(&format!(" {name}=")).nth(1).expect(record);
    value.split(' ').next().unwrap().parse().expect(record)
  };
  assert_eq!(field("subrequests"), 2, "{record}");
  assert_eq!(field("egress_bytes"), 13, "{record}");
  assert!(field("cpu_us") > 0, "{record}");
  assert!(field("wall_us") >= field("cpu_us"), "{record}");
  assert!(field("heap_peak_bytes") > 1_000_000, "{record}");
}
