//! Access records, Prometheus metrics, usage records and health endpoints.

use std::time::{Duration, Instant};

use crate::support::{
  Outpost, SendForText, access_record, admin_get, functions_config, http1, scrape_until, value,
};

const HANDLERS: &[(&str, &str)] = &[
  (
    "api.js",
    r#"export default { async fetch(request) {
      if (new URL(request.url).pathname.endsWith("/throw")) throw new Error("boom");
      if (request.method === "POST") await request.arrayBuffer();
      return new Response("api");
    } };"#,
  ),
  (
    "busy.js",
    // A fixed amount of work (not a wall-clock spin, which a loaded machine preempts).
    r#"export default { fetch() {
      let x = 1;
      for (let i = 0; i < 20_000_000; i++) x = (x * 31 + i) | 0;
      return new Response(`busy ${x !== 0}`);
    } };"#,
  ),
];

fn start(log: &str) -> Outpost {
  Outpost::start(
    &functions_config(
      &format!("[admin]\naddress = \"127.0.0.1:0\"\n{log}"),
      &[
        ("api", "api.js", r#"routes = ["api.test/"]"#),
        (
          "busy",
          "busy.js",
          r#"routes = ["busy.test/"]
limits = { cpu_ms = 2000 }"#,
        ),
      ],
    ),
    HANDLERS,
  )
}

async fn get(outpost: &Outpost, host: &str, path: &str) -> reqwest::Response {
  http1()
    .get(outpost.url(path))
    .header("host", host)
    .send()
    .await
    .unwrap()
}

#[tokio::test]
async fn metrics_parse_and_count_the_requests_sent() {
  let outpost = start("");
  for i in 0..7 {
    let response = get(&outpost, "api.test", &format!("/item/{i}")).await;
    assert_eq!(response.status(), 200);
  }
  assert_eq!(get(&outpost, "api.test", "/throw").await.status(), 500);
  assert_eq!(get(&outpost, "nowhere.test", "/").await.status(), 404);
  assert_eq!(get(&outpost, "nowhere.test", "/x").await.status(), 404);
  assert_eq!(get(&outpost, "busy.test", "/").await.status(), 200);

  let ok = [
    ("function", "api"),
    ("outcome", "ok"),
    ("status_class", "2xx"),
  ];
  let scrape = scrape_until(&outpost, |s| {
    value(s, "outpost_invocations_total", &ok) == Some(7.0)
      && value(
        s,
        "outpost_request_cpu_seconds_count",
        &[("function", "busy")],
      ) == Some(1.0)
  })
  .await;
  let v = |name: &str, labels: &[(&str, &str)]| value(&scrape, name, labels);
  assert_eq!(v("outpost_invocations_total", &ok), Some(7.0));
  assert_eq!(
    v(
      "outpost_invocations_total",
      &[
        ("function", "api"),
        ("outcome", "handler-error"),
        ("status_class", "5xx")
      ]
    ),
    Some(1.0)
  );
  assert_eq!(
    v(
      "outpost_errors_total",
      &[("function", ""), ("kind", "no-route")]
    ),
    Some(2.0)
  );
  assert_eq!(
    v(
      "outpost_errors_total",
      &[("function", "api"), ("kind", "handler-error")]
    ),
    Some(1.0)
  );
  assert_eq!(
    v(
      "outpost_request_duration_seconds_count",
      &[("function", "api")]
    ),
    Some(8.0)
  );
  // The busy handler's loop takes milliseconds of CPU.
  let busy_cpu = v("outpost_request_cpu_seconds_sum", &[("function", "busy")]).unwrap();
  assert!(busy_cpu >= 0.003, "busy CPU {busy_cpu}");
  // Every request reached an isolate: one per isolate was its first.
  let cold = v(
    "outpost_isolate_requests_total",
    &[("function", "api"), ("start", "cold")],
  );
  let warm = v(
    "outpost_isolate_requests_total",
    &[("function", "api"), ("start", "warm")],
  );
  assert_eq!(cold.unwrap_or(0.0) + warm.unwrap_or(0.0), 8.0);
  assert!(cold.unwrap_or(0.0) >= 1.0);
  assert_eq!(
    v(
      "outpost_isolates",
      &[("function", "api"), ("state", "idle")]
    ),
    Some(1.0)
  );
  assert_eq!(v("outpost_requests_in_flight", &[]), Some(0.0));
  assert_eq!(v("outpost_queue_depth", &[]), Some(0.0));
  assert!(
    v(
      "outpost_build_info",
      &[("version", env!("CARGO_PKG_VERSION"))]
    )
    .is_some()
  );
  // Bounded labels: nothing per path or client.
  for sample in &scrape.samples {
    for (key, label) in sample.labels.iter() {
      assert!(
        !label.contains('/') && !label.contains("127.0.0.1") && key != "path",
        "label {key}={label} on {}",
        sample.metric
      );
    }
  }
}

#[tokio::test]
async fn access_records_are_json_lines_with_request_ids() {
  let outpost = start("[log]\nformat = \"json\"\n");
  let response = http1()
    .post(outpost.url("/echo?q=1"))
    .header("host", "api.test")
    .body("0123456789")
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 200);
  let record = access_record(&outpost, &response);
  assert!(record["timestamp"].is_string(), "{record}");
  assert_eq!(record["level"], "INFO");
  assert_eq!(record["function"], "api");
  assert_eq!(record["host"], "api.test");
  assert_eq!(record["method"], "POST");
  assert_eq!(record["path"], "/echo");
  assert_eq!(record["status"], 200);
  assert_eq!(record["bytes_in"], 10);
  assert_eq!(record["bytes_out"], 3);
  assert_eq!(record["cold"], true);
  assert!(record["wall_ms"].as_f64().unwrap() > 0.0, "{record}");
  assert!(record["cpu_ms"].as_f64().unwrap() > 0.0, "{record}");
  assert!(record.get("termination").is_none(), "{record}");

  // A request no function answers has a record too, with why.
  let response = get(&outpost, "nowhere.test", "/").await;
  let record = access_record(&outpost, &response);
  assert_eq!(record["status"], 404);
  assert_eq!(record["termination"], "no-route");
  assert_eq!(record["function"], "");
}

#[tokio::test]
async fn usage_attributes_requests_and_cpu_to_each_function() {
  let outpost = start("");
  let started = std::time::SystemTime::now()
    .duration_since(std::time::UNIX_EPOCH)
    .unwrap()
    .as_secs();
  for _ in 0..3 {
    assert_eq!(get(&outpost, "api.test", "/").await.status(), 200);
  }
  for _ in 0..2 {
    assert_eq!(get(&outpost, "busy.test", "/").await.status(), 200);
  }
  let deadline = Instant::now() + Duration::from_secs(10);
  let usage = loop {
    let usage: serde_json::Value = admin_get(&outpost, &format!("/usage?since={started}"))
      .await
      .json()
      .await
      .unwrap();
    if usage["functions"]["busy"]["requests"] == 2 || Instant::now() > deadline {
      break usage;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
  };
  let api = &usage["functions"]["api"];
  let busy = &usage["functions"]["busy"];
  assert_eq!(api["requests"], 3, "{usage}");
  assert_eq!(busy["requests"], 2, "{usage}");
  assert_eq!(api["egress_bytes"], 9, "{usage}");
  let busy_cpu = busy["cpu_ms"].as_f64().unwrap();
  assert!(busy_cpu >= 6.0, "two loops of milliseconds each: {usage}");
  assert!(api["cpu_ms"].as_f64().unwrap() < busy_cpu, "{usage}");
  assert!(
    busy["wall_ms"].as_f64().unwrap() >= busy_cpu * 0.9,
    "{usage}"
  );
  assert!(usage["since"].as_u64().unwrap() <= started, "{usage}");

  // A time after these requests has none of them.
  let later: serde_json::Value = admin_get(&outpost, &format!("/usage?since={}", started + 120))
    .await
    .json()
    .await
    .unwrap();
  assert_eq!(later["functions"], serde_json::json!({}), "{later}");
  let bad = admin_get(&outpost, "/usage?since=yesterday").await;
  assert_eq!(bad.status(), 400);
  assert!(bad.text().await.unwrap().contains("unix seconds"));
}

#[tokio::test]
async fn readyz_turns_unready_while_draining_and_healthz_needs_no_token() {
  let mut outpost = Outpost::start(
    &functions_config(
      "[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n[server]\nshutdown_grace_s = 10\n",
      &[("slow", "slow.js", r#"routes = ["/"]"#)],
    ),
    &[(
      "slow.js",
      "export default { async fetch() { await new Promise((r) => setTimeout(r, 1500)); return new Response('done'); } };",
    )],
  );
  for path in ["/healthz", "/readyz"] {
    assert_eq!(admin_get(&outpost, path).await.status(), 200, "{path}");
  }
  assert_eq!(admin_get(&outpost, "/metrics").await.status(), 401);

  let slow = tokio::spawn(http1().get(outpost.url("/")).send());
  // Wait until the isolate has the request.
  let deadline = Instant::now() + Duration::from_secs(10);
  loop {
    let metrics = http1()
      .get(format!("http://{}/metrics", outpost.admin.unwrap()))
      .bearer_auth("s3cret")
      .text_of()
      .await;
    if metrics.contains("outpost_requests_in_flight 1") {
      break;
    }
    assert!(
      Instant::now() < deadline,
      "the request never reached the isolate:\n{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
  }
  outpost.signal("TERM");
  let deadline = Instant::now() + Duration::from_secs(5);
  let readyz = loop {
    let response = admin_get(&outpost, "/readyz").await;
    if response.status() == 503 || Instant::now() > deadline {
      break response;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
  };
  assert_eq!(readyz.status(), 503);
  assert!(readyz.text().await.unwrap().contains("draining"));
  assert_eq!(admin_get(&outpost, "/healthz").await.status(), 200);
  let response = slow.await.unwrap().unwrap();
  assert_eq!(response.status(), 200);
  assert_eq!(response.text().await.unwrap(), "done");
  assert!(outpost.wait_exit(Duration::from_secs(10)).success());
}

#[tokio::test]
async fn console_output_carries_the_request_id_and_is_capped_per_request() {
  let outpost = Outpost::start(
    &functions_config(
      "[log]\nconsole_bytes_per_request = 100\n",
      &[("chatty", "chatty.js", r#"routes = ["/"]"#)],
    ),
    &[(
      "chatty.js",
      r#"
console.log("loaded at top level");
export default {
  fetch(request) {
    const tag = new URL(request.url).searchParams.get("tag");
    // 30 bytes and a newline per line: three fit in 100 bytes, the fourth does not.
    for (let i = 0; i < 10; i++) console.log(`${tag} line ${i} `.padEnd(30, "."));
    return new Response("chatted");
  },
};
"#,
    )],
  );
  let mut ids = Vec::new();
  for tag in ["first", "second"] {
    let response = http1()
      .get(outpost.url(&format!("/?tag={tag}")))
      .send()
      .await
      .unwrap();
    ids.push(
      response.headers()["outpost-request-id"]
        .to_str()
        .unwrap()
        .to_string(),
    );
  }
  // The access record comes after all of the request's console output.
  let logs = outpost.wait_for_log(&format!("access request_id=\"{}\"", ids[1]));
  let console: Vec<&str> = logs
    .lines()
    .filter(|l| l.contains("outpost::console"))
    .collect();
  assert!(
    console
      .iter()
      .any(|l| l.contains("loaded at top level") && !l.contains("request_id")),
    "{logs}"
  );
  for (tag, id) in ["first", "second"].iter().zip(&ids) {
    let mine: Vec<&&str> = console
      .iter()
      .filter(|l| l.contains(&format!("request_id=\"{id}\"")))
      .collect();
    for i in 0..3 {
      let line = format!("{tag} line {i} ");
      assert!(
        mine
          .iter()
          .any(|l| l.contains(&line) && l.contains("function=\"chatty\"")),
        "{line:?} missing:\n{logs}"
      );
    }
    assert!(!logs.contains(&format!("{tag} line 3 ")), "{logs}");
    let notices = mine
      .iter()
      .filter(|l| l.contains("stopped at 100 bytes"))
      .count();
    assert_eq!(notices, 1, "{logs}");
  }
}

/// A stand-in OTLP/HTTP collector: keeps every JSON body posted to it.
async fn collector() -> (
  std::net::SocketAddr,
  std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
  use http_body_util::BodyExt;
  let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
  let address = listener.local_addr().unwrap();
  let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
  let sink = received.clone();
  tokio::spawn(async move {
    while let Ok((stream, _)) = listener.accept().await {
      let sink = sink.clone();
      tokio::spawn(async move {
        let service =
          hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let sink = sink.clone();
            async move {
              let body = request.into_body().collect().await.unwrap().to_bytes();
              if let Ok(json) = serde_json::from_slice(&body) {
                sink.lock().unwrap().push(json);
              }
              let ok = http_body_util::Full::new(bytes::Bytes::from_static(b"{}"));
              Ok::<_, std::convert::Infallible>(hyper::Response::new(ok))
            }
          });
        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
          .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
          .await;
      });
    }
  });
  (address, received)
}

#[tokio::test]
async fn request_spans_reach_an_otlp_collector_with_the_propagated_ids() {
  let (address, received) = collector().await;
  let outpost = Outpost::start(
    &functions_config(
      &format!(
        "[egress]\nallow_private = true\n[tracing]\notlp_endpoint = \"http://{address}/v1/traces\""
      ),
      &[("traced", "traced.js", r#"routes = ["/"]"#)],
    ),
    &[(
      "traced.js",
      r#"export default { async fetch(request) {
        const url = new URL(request.url);
        if (url.pathname === "/upstream") return new Response(request.headers.get("traceparent"));
        return fetch(`http://127.0.0.1:${url.port}/upstream`);
      } };"#,
    )],
  );
  let outbound = http1()
    .get(outpost.url("/call"))
    .header(
      "traceparent",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .text_of()
    .await;
  // The span id Outpost gave its hop, as the upstream saw it.
  let hop = outbound.split('-').nth(2).unwrap().to_string();

  let deadline = Instant::now() + Duration::from_secs(15);
  let spans = loop {
    let spans: Vec<serde_json::Value> = received
      .lock()
      .unwrap()
      .iter()
      .flat_map(|payload| {
        payload["resourceSpans"]
          .as_array()
          .cloned()
          .unwrap_or_default()
      })
      .flat_map(|resource| {
        resource["scopeSpans"]
          .as_array()
          .cloned()
          .unwrap_or_default()
      })
      .flat_map(|scope| scope["spans"].as_array().cloned().unwrap_or_default())
      .collect();
    if spans.len() >= 2 || Instant::now() > deadline {
      break spans;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
  };
  let find = |path: &str| {
    spans
      .iter()
      .find(|span| {
        span["attributes"]
          .as_array()
          .into_iter()
          .flatten()
          .any(|a| a["key"] == "url.path" && a["value"]["stringValue"] == path)
      })
      .unwrap_or_else(|| panic!("no span for {path}: {spans:?}"))
  };
  let call = find("/call");
  assert_eq!(
    call["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736",
    "{call}"
  );
  assert_eq!(call["parentSpanId"], "00f067aa0ba902b7", "{call}");
  assert_eq!(call["spanId"], hop.as_str(), "{call}");
  assert_eq!(call["name"], "outpost request");
  // The upstream request, served by Outpost too, is the next hop of the same trace.
  let upstream = find("/upstream");
  assert_eq!(upstream["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
  assert_eq!(upstream["parentSpanId"], hop.as_str(), "{upstream}");
}

/// With `[log] format = "json"`, stdout is one JSON object per line and nothing else: the
/// listening announcements included, and no event nests JSON inside a string.
#[tokio::test]
async fn the_json_log_is_json_lines_only_on_stdout() {
  let data = tempfile::tempdir().unwrap();
  let outpost = Outpost::start(
    &functions_config(
      &format!(
        "[admin]\naddress = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[log]\nformat = \"json\"\n",
        data.path().display()
      ),
      &[("api", "api.js", r#"routes = ["api.test/"]"#)],
    ),
    HANDLERS,
  );
  // A deploy logs an activation with the versions it serves.
  let dir = outpost.dir().join("deployed");
  std::fs::create_dir_all(&dir).unwrap();
  std::fs::write(
    dir.join("index.js"),
    "export default { fetch() { console.log('two\\nlines'); return new Response('d'); } };",
  )
  .unwrap();
  let admin = format!("http://{}", outpost.admin.unwrap());
  let output = tokio::task::spawn_blocking({
    let cwd = outpost.dir().to_path_buf();
    let dir = dir.display().to_string();
    move || crate::support::run_outpost(&["deploy", &dir, "--name", "dep", "--admin", &admin], &cwd)
  })
  .await
  .unwrap();
  assert!(output.0.success(), "{}", output.1);
  assert_eq!(http1().get(outpost.url("/dep/")).text_of().await, "d");
  assert_eq!(get(&outpost, "api.test", "/").await.status(), 200);
  let logs = outpost.wait_for_log("\"message\":\"activated\"");
  outpost.wait_for_log("two\\nlines");
  outpost.wait_for_log("\"message\":\"access\"");
  let stdout = outpost.stdout();
  let mut messages = Vec::new();
  for line in stdout.lines() {
    let event: serde_json::Value = serde_json::from_str(line)
      .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line:?}\n{logs}"));
    assert!(event.is_object(), "{line}");
    for (key, value) in event.as_object().unwrap() {
      if let Some(text) = value.as_str() {
        assert!(
          serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text).is_err(),
          "{key} nests JSON: {line}"
        );
      }
    }
    messages.push(event["message"].as_str().unwrap_or_default().to_string());
  }
  for expected in [
    "outpost listening",
    "outpost admin listening",
    "activated",
    "access",
  ] {
    assert!(
      messages.iter().any(|m| m == expected),
      "{expected}: {messages:?}"
    );
  }
  let activated = stdout
    .lines()
    .find(|l| l.contains("\"message\":\"activated\""))
    .unwrap();
  assert!(activated.contains("=100\""), "{activated}");
}

/// Console output in the log has no terminal colour codes and no frames of Outpost's own
/// scripts, and one call is one line, whatever it prints.
#[tokio::test]
async fn console_output_is_plain_one_line_per_call_without_internal_frames() {
  let outpost = Outpost::start_handler(
    "plain.js",
    r#"export default {
  async fetch(request) {
    console.log({ answer: 42, nested: { list: [1, "two"] } });
    console.log("first line\nsecond line");
    console.error(new Error("visible"));
    try {
      new Request("not a url");
    } catch (error) {
      console.error(error);
    }
    return new Response("logged");
  },
};"#,
  );
  assert_eq!(outpost.get_text("/").await, "logged");
  let logs = outpost.wait_for_log("outpost::access");
  let console: Vec<&str> = logs
    .lines()
    .filter(|l| l.contains("outpost::console"))
    .collect();
  assert_eq!(console.len(), 4, "one line per call:\n{logs}");
  assert!(!logs.contains('\u{1b}'), "no escape codes:\n{logs}");
  assert!(
    console[0].contains("{ answer: 42, nested: { list: [ 1, \"two\" ] } }"),
    "{logs}"
  );
  assert!(console[1].contains("first line\\nsecond line"), "{logs}");
  assert!(
    console[2].contains("Error: visible\\n    at Object.fetch (file://"),
    "{logs}"
  );
  assert!(console[3].contains("TypeError"), "{logs}");
  assert!(
    !logs.contains("ext:"),
    "internal frames are hidden:\n{logs}"
  );
}

/// `outpost tail NAME` follows one function's access records and console output as they
/// come, whatever the log level, and nothing of other functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_one_functions_records_and_console() {
  let outpost = Outpost::start(
    &functions_config(
      "[admin]\naddress = \"127.0.0.1:0\"\n[log]\nlevel = \"error\"",
      &[
        ("api", "api.js", r#"routes = ["api.test/"]"#),
        ("busy", "busy.js", r#"routes = ["busy.test/"]"#),
      ],
    ),
    &[
      (
        "api.js",
        "export default { fetch(request) { console.log('api says ' + new URL(request.url).pathname); return new Response('api'); } };",
      ),
      (
        "busy.js",
        "export default { fetch() { console.log('busy says hi'); return new Response('busy'); } };",
      ),
    ],
  );
  let admin = format!("http://{}", outpost.admin.unwrap());
  let mut tail = crate::support::outpost_command()
    .args(["tail", "api", "--admin", &admin])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
  let stdout = tail.stdout.take().unwrap();
  let (lines_tx, lines) = std::sync::mpsc::channel();
  std::thread::spawn(move || {
    use std::io::BufRead as _;
    for line in std::io::BufReader::new(stdout)
      .lines()
      .map_while(Result::ok)
    {
      let _ = lines_tx.send(line);
    }
  });
  // Until the tail is connected, requests may come before it: send until one shows.
  let deadline = Instant::now() + Duration::from_secs(10);
  let mut seen = Vec::new();
  while !seen.iter().any(|l: &String| l.contains("api says /first")) {
    assert!(Instant::now() < deadline, "{seen:?}");
    get(&outpost, "busy.test", "/").await;
    get(&outpost, "api.test", "/first").await;
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
      seen.push(line);
    }
  }
  seen.clear();
  let response = get(&outpost, "api.test", "/second").await;
  let id = response.headers()["outpost-request-id"]
    .to_str()
    .unwrap()
    .to_string();
  let deadline = Instant::now() + Duration::from_secs(10);
  while !seen.iter().any(|l| l.contains(" 200 GET api.test/second ")) {
    let line = lines
      .recv_timeout(deadline.saturating_duration_since(Instant::now()))
      .unwrap_or_else(|_| panic!("no access line: {seen:?}"));
    seen.push(line);
  }
  assert!(
    seen
      .iter()
      .any(|l| l.contains(&id) && l.contains("info") && l.contains("api says /second")),
    "{seen:?}"
  );
  assert!(seen.iter().all(|l| !l.contains("busy")), "{seen:?}");
  let _ = tail.kill();
  let _ = tail.wait();
}
