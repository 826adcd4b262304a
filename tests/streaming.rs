//! Bodies stream both ways without being held whole; many requests at once.

use std::time::Instant;

use futures::StreamExt;

use crate::support::{Outpost, functions_config, http1};

const ECHO: &str = r#"let inFlight = 0, maxInFlight = 0;
export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === "/echo") {
      return new Response(request.body, { headers: { "content-type": "application/octet-stream" } });
    }
    if (url.pathname === "/slow") {
      inFlight += 1;
      maxInFlight = Math.max(maxInFlight, inFlight);
      await new Promise((resolve) => setTimeout(resolve, 50));
      inFlight -= 1;
      return new Response("slow " + url.search);
    }
    if (url.pathname === "/max") return new Response(String(maxInFlight));
    return new Response("ok");
  },
};"#;

const CHUNK: usize = 1024 * 1024;
const CHUNKS: usize = 50;

#[tokio::test]
async fn fifty_megabytes_stream_through_without_being_buffered() {
  let outpost = Outpost::start_handler("echo.js", ECHO);
  let client = http1();
  // Warm up so the baseline includes a served request.
  client
    .post(outpost.url("/echo"))
    .body(vec![1u8; CHUNK])
    .send()
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
  let baseline_kib = outpost.proc_status_kib("VmRSS");

  // The request body is produced lazily; record when the last chunk was handed over.
  let sent_all = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
  let sent = sent_all.clone();
  let body = futures::stream::iter(0..CHUNKS).map(move |i| {
    if i == CHUNKS - 1 {
      *sent.lock().unwrap() = Some(Instant::now());
    }
    Ok::<_, std::io::Error>(vec![(i % 251) as u8; CHUNK])
  });
  let response = client
    .post(outpost.url("/echo"))
    .body(reqwest::Body::wrap_stream(body))
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 200);
  let mut stream = response.bytes_stream();
  let (mut received, mut first_byte_at) = (0usize, None);
  while let Some(chunk) = stream.next().await {
    let chunk = chunk.unwrap();
    first_byte_at.get_or_insert_with(Instant::now);
    for (offset, byte) in chunk.iter().enumerate() {
      let position = received + offset;
      assert_eq!(*byte, ((position / CHUNK) % 251) as u8, "byte {position}");
    }
    received += chunk.len();
  }
  assert_eq!(received, CHUNK * CHUNKS);
  let sent_all = sent_all.lock().unwrap().expect("the whole body was sent");
  assert!(
    first_byte_at.unwrap() < sent_all,
    "response bytes arrived before the request body was fully sent"
  );
  let peak_kib = outpost.proc_status_kib("VmHWM");
  let growth_mib = peak_kib.saturating_sub(baseline_kib) / 1024;
  assert!(
    growth_mib < 25,
    "peak RSS grew by {growth_mib} MiB while streaming {} MiB",
    CHUNK * CHUNKS / (1024 * 1024)
  );
}

#[tokio::test]
async fn two_hundred_concurrent_requests() {
  // All 200 in flight at once: the function's concurrency limit is raised above them.
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[(
        "echo",
        "echo.js",
        "routes = [\"/\"]\nlimits = { max_concurrency = 256 }",
      )],
    ),
    &[("echo.js", ECHO)],
  );
  let client = http1();
  let requests = (0..200).map(|i| {
    let request = client.get(outpost.url(&format!("/slow?{i}"))).send();
    async move { (i, request.await.unwrap().text().await.unwrap()) }
  });
  let responses = futures::future::join_all(requests).await;
  for (i, body) in responses {
    assert_eq!(body, format!("slow ?{i}"));
  }
  // The handlers overlapped inside an isolate instead of running one after another.
  let max: usize = outpost.get_text("/max").await.parse().unwrap();
  assert!(
    max > 1,
    "at most {max} request(s) were in flight on an isolate at once"
  );
}

#[tokio::test]
async fn a_handler_stream_reaches_the_client_chunk_by_chunk() {
  let outpost = Outpost::start_handler(
    "held.js",
    r#"
let release;
const released = new Promise((resolve) => { release = resolve; });
export default {
  fetch(request) {
    if (new URL(request.url).pathname === "/release") {
      release();
      return new Response("released");
    }
    const encoder = new TextEncoder();
    const body = new ReadableStream({
      async start(controller) {
        controller.enqueue(encoder.encode("first;"));
        await released;
        controller.enqueue(encoder.encode("second"));
        controller.close();
      },
    });
    return new Response(body.pipeThrough(new TransformStream()));
  },
};
"#,
  );
  let response = http1().get(outpost.url("/held")).send().await.unwrap();
  let mut stream = response.bytes_stream();
  // The first chunk arrives while the handler still holds the stream open; a server that
  // buffered the body would never send it.
  let first = tokio::time::timeout(std::time::Duration::from_secs(20), stream.next())
    .await
    .expect("the first chunk arrives before the stream ends")
    .unwrap()
    .unwrap();
  assert_eq!(&first[..], b"first;");
  assert_eq!(outpost.get_text("/release").await, "released");
  let mut rest = Vec::new();
  while let Some(chunk) = stream.next().await {
    rest.extend_from_slice(&chunk.unwrap());
  }
  assert_eq!(rest, b"second");
}

#[tokio::test]
async fn a_fetch_response_is_proxied_through() {
  // The upstream is this node itself, on loopback: the operator switch allows it.
  let outpost = Outpost::start(
    &functions_config(
      "[egress]\nallow_private = true",
      &[("proxy", "proxy.js", "routes = [\"/\"]")],
    ),
    &[(
      "proxy.js",
      r#"
export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (url.pathname === "/origin") {
      return new Response("x".repeat(100000), { headers: { "x-origin": "yes" } });
    }
    const upstream = await fetch(new URL("/origin", url), { headers: { "accept-encoding": "identity" } });
    return upstream;
  },
};
"#,
    )],
  );

  let response = http1().get(outpost.url("/proxy")).send().await.unwrap();
  assert_eq!(response.status(), 200);
  assert_eq!(response.headers()["x-origin"], "yes");
  let body = response.text().await.unwrap();
  assert_eq!(body.len(), 100000);
  assert!(body.bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_handler_stream() {
  let outpost = Outpost::start_handler(
    "endless.js",
    r#"
let cancelled = 0;
export default {
  fetch(request) {
    if (new URL(request.url).pathname === "/cancelled") return new Response(String(cancelled));
    const chunk = new Uint8Array(16 * 1024);
    const body = new ReadableStream({
      pull(controller) { controller.enqueue(chunk); },
      cancel() { cancelled += 1; },
    });
    return new Response(body);
  },
};
"#,
  );
  let response = http1().get(outpost.url("/endless")).send().await.unwrap();
  let mut stream = response.bytes_stream();
  let mut received = 0;
  while received < 1024 * 1024 {
    received += stream.next().await.unwrap().unwrap().len();
  }
  drop(stream);
  // The endless stream is cancelled once the connection is gone, and the isolate serves on.
  outpost
    .wait_for_text(
      "/cancelled",
      "1",
      "the handler's stream was never cancelled",
    )
    .await;
}
