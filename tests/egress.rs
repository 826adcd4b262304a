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

  // The access record counts them, with the bytes sent and the time and memory used.
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
  let record = logs
    .lines()
    .find(|l| l.contains(&needle) && l.contains("outpost::access"))
    .unwrap();
  let field = |name: &str| -> f64 {
    let value = record.split(&format!(" {name}=")).nth(1).expect(record);
    value.split(' ').next().unwrap().parse().expect(record)
  };
  assert_eq!(field("subrequests"), 2.0, "{record}");
  assert_eq!(field("bytes_out"), 13.0, "{record}");
  assert!(field("cpu_ms") > 0.0, "{record}");
  assert!(field("wall_ms") >= field("cpu_ms"), "{record}");
  assert!(field("heap_peak_bytes") > 1_000_000.0, "{record}");
}

/// W3C trace context reaches upstreams: continued from the client's `traceparent` (with a
/// new parent id: Outpost's hop), or started when there is none or it is invalid; a
/// `traceparent` the handler sets itself is kept.
#[tokio::test]
async fn traceparent_reaches_the_upstream() {
  let outpost = Outpost::start(
    &functions_config(
      "[egress]\nallow_private = true",
      &[("tracer", "tracer.js", "routes = [\"/\"]")],
    ),
    &[(
      "tracer.js",
      r#"
export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === "/upstream") {
      return Response.json({
        traceparent: request.headers.get("traceparent"),
        tracestate: request.headers.get("tracestate"),
      });
    }
    const upstream = `http://127.0.0.1:${url.port}/upstream`;
    const init = url.searchParams.has("own")
      ? { headers: { traceparent: "00-11111111111111111111111111111111-2222222222222222-00" } }
      : undefined;
    return fetch(upstream, init);
  },
};
"#,
    )],
  );
  let call = |traceparent: Option<&'static str>, query: &'static str| {
    let mut request = http1().get(outpost.url(&format!("/call{query}")));
    if let Some(traceparent) = traceparent {
      request = request
        .header("traceparent", traceparent)
        .header("tracestate", "congo=t61rcWkgMzE");
    }
    async move {
      let response = request.send().await.unwrap();
      assert_eq!(response.status(), 200);
      let request_id = response.headers()["outpost-request-id"]
        .to_str()
        .unwrap()
        .to_string();
      let seen: serde_json::Value = response.json().await.unwrap();
      (seen, request_id)
    }
  };
  let fields = |seen: &serde_json::Value| -> Vec<String> {
    seen["traceparent"]
      .as_str()
      .unwrap()
      .split('-')
      .map(str::to_string)
      .collect()
  };

  // Continued: same trace id and flags, Outpost's own parent id, the tracestate passed on.
  let (seen, _) = call(
    Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    "",
  )
  .await;
  let upstream = fields(&seen);
  assert_eq!(upstream[0], "00");
  assert_eq!(upstream[1], "4bf92f3577b34da6a3ce929d0e0e4736");
  assert_ne!(upstream[2], "00f067aa0ba902b7");
  assert_eq!(upstream[2].len(), 16);
  assert_eq!(upstream[3], "01");
  assert_eq!(seen["tracestate"], "congo=t61rcWkgMzE");

  // Started: a fresh trace, which the access record names.
  for traceparent in [
    None,
    Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
  ] {
    let (seen, request_id) = call(traceparent, "").await;
    let upstream = fields(&seen);
    assert_eq!(upstream[1].len(), 32, "{seen}");
    assert_ne!(upstream[1], "0".repeat(32));
    assert_eq!(seen["tracestate"], serde_json::Value::Null, "{seen}");
    let named = format!("trace_id=\"{}\"", upstream[1]);
    let logs = outpost.wait_for_log(&format!("request_id=\"{request_id}\" {named}"));
    assert!(logs.contains("outpost::access"), "{logs}");
  }

  // The handler's own header wins.
  let (seen, _) = call(None, "?own").await;
  assert_eq!(
    seen["traceparent"],
    "00-11111111111111111111111111111111-2222222222222222-00"
  );
}

/// A service binding calls another function of the node in-process: no socket (the binding's
/// URL names a host that resolves nowhere, and private egress stays off), one subrequest of
/// the caller, one request of the callee, one trace.
#[tokio::test]
async fn service_bindings_call_another_function_in_process() {
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[
        (
          "api",
          "api.js",
          "routes = [\"api.test/\"]\nservices = { AUTH = \"auth\" }\nenv = { GREETING = \"hi\" }",
        ),
        ("auth", "auth.js", "routes = [\"auth.test/\"]"),
      ],
    ),
    &[
      (
        "api.js",
        r#"export default {
  async fetch(request, env) {
    const answer = await env.AUTH.fetch("http://auth.internal/check?user=ann", {
      method: "POST",
      headers: { "x-token": "t0k" },
      body: "payload",
    });
    return new Response(`${env.GREETING} ${answer.status} ${answer.headers.get("x-auth")} ${await answer.text()} ${typeof env.AUTH}`);
  },
};"#,
      ),
      (
        "auth.js",
        r#"export default {
  async fetch(request) {
    const url = new URL(request.url);
    const body = await request.text();
    return new Response(`${request.method} ${url.host}${url.pathname}${url.search} ${request.headers.get("x-token")} ${body} ${request.headers.get("traceparent") !== null}`, {
      status: 201,
      headers: { "x-auth": "ok" },
    });
  },
};"#,
      ),
    ],
  );
  let response = http1()
    .get(outpost.url("/"))
    .header("host", "api.test")
    .send()
    .await
    .unwrap();
  let id = response.headers()["outpost-request-id"]
    .to_str()
    .unwrap()
    .to_string();
  assert_eq!(
    response.text().await.unwrap(),
    "hi 201 ok POST auth.internal/check?user=ann t0k payload true object"
  );
  outpost.wait_for_log(&format!("access request_id=\"{id}\""));
  let logs = outpost.wait_for_log("function=\"auth\" host=\"auth.internal\"");
  let caller = logs
    .lines()
    .find(|l| l.contains("outpost::access") && l.contains(&format!("request_id=\"{id}\"")))
    .unwrap_or_else(|| panic!("{logs}"));
  let callee = logs
    .lines()
    .find(|l| l.contains("outpost::access") && l.contains("function=\"auth\""))
    .unwrap();
  assert!(caller.contains("subrequests=1"), "{caller}");
  assert!(
    callee.contains("status=201") && callee.contains("method=\"POST\""),
    "{callee}"
  );
  let trace = |line: &str| {
    line
      .split("trace_id=")
      .nth(1)
      .unwrap()
      .split(' ')
      .next()
      .unwrap()
      .to_string()
  };
  assert_eq!(
    trace(caller),
    trace(callee),
    "one trace:\n{caller}\n{callee}"
  );
}

/// A function may reach a private address the operator permits (`[egress] private_allowed`)
/// when it lists it itself; other functions and other private addresses stay closed, and
/// listing one the operator does not permit is a config error.
#[tokio::test]
async fn a_private_upstream_opens_for_the_function_that_lists_it_when_the_node_permits_it() {
  let outpost = Outpost::start(
    &functions_config(
      "[egress]\nprivate_allowed = [\"127.0.0.1/32\"]",
      &[
        (
          "trusted",
          "fetcher.js",
          "routes = [\"trusted.test/\"]\negress = { allow = [\"127.0.0.1\", \"example.com\"] }",
        ),
        ("other", "fetcher.js", "routes = [\"/\"]"),
      ],
    ),
    &[("fetcher.js", FETCHER)],
  );
  let port = outpost.http[0].port().to_string();
  let get = |host: &'static str, target: &str| {
    let url = outpost.url(&format!("/fetch?to={}", target.replace("PORT", &port)));
    async move {
      http1()
        .get(url)
        .header("host", host)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
    }
  };
  assert_eq!(
    get("trusted.test", "http://127.0.0.1:PORT/").await,
    "fetched origin"
  );
  assert!(
    get("trusted.test", "http://127.0.0.2:PORT/")
      .await
      .contains("refused")
  );
  assert!(
    get("other.test", "http://127.0.0.1:PORT/")
      .await
      .contains("refused")
  );

  let dir = tempfile::tempdir().unwrap();
  std::fs::write(dir.path().join("fetcher.js"), FETCHER).unwrap();
  std::fs::write(
    dir.path().join("outpost.toml"),
    functions_config(
      "[egress]\nprivate_allowed = [\"127.0.0.1/32\"]",
      &[(
        "f",
        "fetcher.js",
        "routes = [\"/\"]\negress = { allow = [\"10.0.0.1\"] }",
      )],
    ),
  )
  .unwrap();
  let (status, output) =
    crate::support::run_outpost(&["check", "--config", "outpost.toml"], dir.path());
  assert!(!status.success());
  assert!(
    output.contains("functions[0].egress.allow[0]: \"10.0.0.1\" is a private address"),
    "{output}"
  );
}
