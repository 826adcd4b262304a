//! Bodies stream both ways without being held whole; many requests at once.

use std::time::Instant;

use futures::StreamExt;

use crate::support::{Outpost, http1};

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
  let outpost = Outpost::start_handler("echo.js", ECHO);
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
