//! Protocol limits: request head size, request body size, the header read timeout and the
//! connection idle timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{Outpost, functions_config, http1};

const READER: &str = r#"export default {
  async fetch(request) {
    const body = await request.text();
    return new Response("read " + body.length);
  },
};"#;

fn server() -> Outpost {
  Outpost::start(
    &functions_config(
      "[server]\nmax_body_bytes = 1000\nmax_header_bytes = 8192\nheader_read_timeout_ms = 500",
      &[("reader", "reader.js", "routes = [\"/\"]")],
    ),
    &[("reader.js", READER)],
  )
}

#[tokio::test]
async fn bodies_over_the_limit_get_413_with_or_without_a_length() {
  let outpost = server();
  let client = http1();
  let ok = client
    .post(outpost.url("/"))
    .body(vec![b'a'; 1000])
    .send()
    .await
    .unwrap();
  assert_eq!(ok.text().await.unwrap(), "read 1000");

  let declared = client
    .post(outpost.url("/"))
    .body(vec![b'a'; 1001])
    .send()
    .await
    .unwrap();
  assert_eq!(declared.status(), 413);
  assert_eq!(declared.headers()["outpost-error"], "body-too-large");

  // No Content-Length: the limit trips while the body streams in.
  let chunks = futures::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 400])));
  let streamed = client
    .post(outpost.url("/"))
    .body(reqwest::Body::wrap_stream(chunks))
    .send()
    .await
    .unwrap();
  assert_eq!(streamed.status(), 413);
}

#[tokio::test]
async fn a_request_head_over_the_limit_gets_431() {
  let outpost = server();
  let response = http1()
    .get(outpost.url("/"))
    .header("x-large", "b".repeat(20_000))
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 431);
}

#[test]
fn a_client_that_dribbles_its_headers_is_cut_off() {
  let outpost = server();
  let mut stream = TcpStream::connect(outpost.http[0]).unwrap();
  stream
    .set_read_timeout(Some(Duration::from_secs(10)))
    .unwrap();
  stream
    .write_all(b"GET / HTTP/1.1\r\nHost: slow\r\n")
    .unwrap();
  let started = Instant::now();
  // Keep sending a header byte at a time, never finishing the head.
  let mut closed = false;
  while started.elapsed() < Duration::from_secs(8) {
    std::thread::sleep(Duration::from_millis(100));
    if stream.write_all(b"X-Slow: 1\r\n").is_err() {
      closed = true;
      break;
    }
    let mut buffer = [0u8; 256];
    stream.set_nonblocking(true).unwrap();
    let read = stream.read(&mut buffer);
    stream.set_nonblocking(false).unwrap();
    match read {
      Ok(0) => {
        closed = true;
        break;
      }
      // hyper may answer 408 before closing.
      Ok(_) => {}
      Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
      Err(_) => {
        closed = true;
        break;
      }
    }
  }
  assert!(
    closed,
    "the connection was still open after {:?}",
    started.elapsed()
  );
}

const SLOW: &str = r#"export default {
  async fetch(request) {
    const path = new URL(request.url).pathname;
    if (path === "/hold") {
      console.log("holding");
      await new Promise((resolve) => setTimeout(resolve, 1000));
      return new Response("held");
    }
    if (path === "/never") {
      await new Promise(() => {});
    }
    if (path === "/trickle") {
      let timer;
      const body = new ReadableStream({
        start(controller) {
          timer = setInterval(() => controller.enqueue(new TextEncoder().encode(".")), 50);
        },
        cancel() { clearInterval(timer); },
      });
      return new Response(body);
    }
    return new Response("quick");
  },
};"#;

fn slow_server(preamble: &str, limits: &str) -> Outpost {
  Outpost::start(
    &functions_config(
      preamble,
      &[(
        "slow",
        "slow.js",
        &format!("routes = [\"/\"]\nlimits = {limits}"),
      )],
    ),
    &[("slow.js", SLOW)],
  )
}

#[tokio::test]
async fn the_wall_clock_limit_answers_504_and_ends_streaming_responses() {
  let outpost = slow_server("", "{ wall_ms = 500 }");
  let client = http1();
  let never = client.get(outpost.url("/never")).send().await.unwrap();
  assert_eq!(never.status(), 504);
  assert_eq!(never.headers()["outpost-termination"], "timeout");
  assert_eq!(outpost.get_text("/").await, "quick");

  // A response that streams forever is cut at the limit.
  let trickle = client.get(outpost.url("/trickle")).send().await.unwrap();
  assert_eq!(trickle.status(), 200);
  let ended = tokio::time::timeout(Duration::from_secs(20), trickle.bytes()).await;
  assert!(ended.is_ok(), "the endless response was never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_concurrency_limit_and_queue_requests_get_503_with_retry_after() {
  let outpost = slow_server(
    "[server]\nqueue_depth = 1\nqueue_timeout_ms = 5000",
    "{ max_concurrency = 1 }",
  );
  let client = http1();
  let url = outpost.url("/hold");
  let first = tokio::spawn(client.get(&url).send());
  tokio::task::block_in_place(|| outpost.wait_for_log("holding"));
  // The function's one slot is taken: one more request may wait, the next is turned away.
  // Which of the two arrives first is up to the scheduler, so only the pair is checked.
  let (second, third) = tokio::join!(client.get(&url).send(), async {
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.get(&url).send().await
  });
  let mut statuses = Vec::new();
  for response in [second.unwrap(), third.unwrap()] {
    statuses.push(response.status().as_u16());
    if response.status() == 503 {
      assert_eq!(response.headers()["retry-after"], "1");
      assert_eq!(response.headers()["outpost-error"], "overloaded");
    } else {
      assert_eq!(
        response.text().await.unwrap(),
        "held",
        "the queued request is served"
      );
    }
  }
  statuses.sort();
  assert_eq!(statuses, [200, 503]);
  assert_eq!(first.await.unwrap().unwrap().status(), 200);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
  let outpost = server();
  let mut stream = TcpStream::connect(outpost.http[0]).unwrap();
  stream
    .write_all(b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n")
    .unwrap();
  stream
    .set_read_timeout(Some(Duration::from_secs(10)))
    .unwrap();
  let mut buffer = [0u8; 4096];
  let read = stream.read(&mut buffer).unwrap();
  assert!(buffer[..read].starts_with(b"HTTP/1.1 200"));
  // Waiting for the next request head counts against the header read timeout (500 ms).
  let started = Instant::now();
  let read = stream.read(&mut buffer);
  assert!(
    matches!(read, Ok(0)) || read.is_err(),
    "expected the server to close the idle connection, read {read:?}"
  );
  assert!(
    started.elapsed() < Duration::from_secs(9),
    "closed only after {:?}",
    started.elapsed()
  );
}

/// Frame types an HTTP/2 server sent on `stream` until it closed the connection. Pings are
/// acknowledged, as any client does (hyper's graceful GOAWAY waits for the ack).
fn h2_frames_until_close(stream: &mut TcpStream) -> Vec<u8> {
  const PING: u8 = 6;
  const ACK: u8 = 1;
  stream
    .set_read_timeout(Some(Duration::from_secs(10)))
    .unwrap();
  let mut received = Vec::new();
  let mut types = Vec::new();
  let mut buffer = [0u8; 4096];
  loop {
    match stream.read(&mut buffer) {
      Ok(0) => break,
      Ok(n) => received.extend_from_slice(&buffer[..n]),
      Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
      Err(err) => panic!("the connection was not closed: {err}; frames: {types:?}"),
    }
    while received.len() >= 9 {
      let length = u32::from_be_bytes([0, received[0], received[1], received[2]]) as usize;
      if received.len() < 9 + length {
        break;
      }
      let frame: Vec<u8> = received.drain(..9 + length).collect();
      types.push(frame[3]);
      if frame[3] == PING && frame[4] & ACK == 0 {
        let mut ack = frame.clone();
        ack[4] = ACK;
        let _ = stream.write_all(&ack);
      }
    }
  }
  types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_slow_requests_are_not() {
  const GOAWAY: u8 = 7;
  let outpost = Outpost::start(
    &functions_config(
      "[server]\nidle_timeout_ms = 300",
      &[("slow", "slow.js", "routes = [\"/\"]")],
    ),
    &[(
      "slow.js",
      "export default { async fetch() { await new Promise((r) => setTimeout(r, 1000)); return new Response('slow'); } };",
    )],
  );
  // A request in flight keeps its connection open past the idle timeout.
  let h2 = reqwest::Client::builder()
    .http2_prior_knowledge()
    .build()
    .unwrap();
  let response = h2.get(outpost.url("/")).send().await.unwrap();
  assert_eq!(response.version(), reqwest::Version::HTTP_2);
  assert_eq!(response.text().await.unwrap(), "slow");

  // An HTTP/2 connection that never sends a request gets GOAWAY, then is closed.
  let address = outpost.http[0];
  let (frames, open_for) = tokio::task::spawn_blocking(move || {
    let mut stream = TcpStream::connect(address).unwrap();
    let opened = Instant::now();
    stream
      .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
      .unwrap();
    let frames = h2_frames_until_close(&mut stream);
    (frames, opened.elapsed())
  })
  .await
  .unwrap();
  assert!(frames.contains(&GOAWAY), "frames: {frames:?}");
  assert!(
    open_for >= Duration::from_millis(300),
    "closed after {open_for:?}"
  );
}

/// HTTP/2 abuse limits: a client opening streams and resetting them before they are served
/// (the rapid-reset flood) past `server.h2_max_pending_resets` gets GOAWAY with
/// ENHANCE_YOUR_CALM; streams past `server.h2_max_concurrent_streams` wait their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_resets_and_concurrent_streams_are_bounded() {
  const GOAWAY: u8 = 7;
  const ENHANCE_YOUR_CALM: u32 = 0xb;
  let outpost = Outpost::start(
    &functions_config(
      "[server]\nh2_max_pending_resets = 5\nh2_max_concurrent_streams = 2",
      &[("counted", "counted.js", "routes = [\"/\"]")],
    ),
    &[(
      "counted.js",
      "let now = 0, most = 0;\nexport default { async fetch(request) { if (new URL(request.url).pathname === '/most') return new Response(String(most)); now++; most = Math.max(most, now); await new Promise((r) => setTimeout(r, 200)); now--; return new Response('ok'); } };",
    )],
  );
  let address = outpost.http[0];
  let goaway = tokio::task::spawn_blocking(move || {
    let mut stream = TcpStream::connect(address).unwrap();
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0".to_vec();
    for i in 0..200u32 {
      let id = (2 * i + 1).to_be_bytes();
      // HEADERS (END_STREAM | END_HEADERS): GET http / (static table entries 2, 6, 4).
      flood.extend_from_slice(&[0, 0, 3, 1, 0x5, id[0] & 0x7f, id[1], id[2], id[3]]);
      flood.extend_from_slice(&[0x82, 0x86, 0x84]);
      // RST_STREAM (CANCEL).
      flood.extend_from_slice(&[0, 0, 4, 3, 0, id[0] & 0x7f, id[1], id[2], id[3], 0, 0, 0, 8]);
    }
    let _ = stream.write_all(&flood);
    stream
      .set_read_timeout(Some(Duration::from_secs(10)))
      .unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
      match stream.read(&mut buffer) {
        Ok(0) | Err(_) => break,
        Ok(n) => received.extend_from_slice(&buffer[..n]),
      }
    }
    // The error code of the GOAWAY frame, if one came.
    let mut offset = 0;
    while received.len() >= offset + 9 {
      let length = u32::from_be_bytes([
        0,
        received[offset],
        received[offset + 1],
        received[offset + 2],
      ]) as usize;
      if received[offset + 3] == GOAWAY && received.len() >= offset + 9 + 8 {
        let code = &received[offset + 9 + 4..offset + 9 + 8];
        return Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
      }
      offset += 9 + length;
    }
    None
  })
  .await
  .unwrap();
  assert_eq!(goaway, Some(ENHANCE_YOUR_CALM));

  // Six requests at once on one HTTP/2 connection: at most two run at a time.
  let h2 = reqwest::Client::builder()
    .http2_prior_knowledge()
    .build()
    .unwrap();
  let started = Instant::now();
  let requests: Vec<_> = (0..6)
    .map(|_| {
      let (h2, url) = (h2.clone(), outpost.url("/"));
      tokio::spawn(async move { h2.get(url).send().await.unwrap().text().await.unwrap() })
    })
    .collect();
  for request in requests {
    assert_eq!(request.await.unwrap(), "ok");
  }
  assert!(
    started.elapsed() >= Duration::from_millis(550),
    "{:?}",
    started.elapsed()
  );
  assert_eq!(
    h2.get(outpost.url("/most"))
      .send()
      .await
      .unwrap()
      .text()
      .await
      .unwrap(),
    "2"
  );
}

/// `server.max_in_flight` bounds the whole node, across functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_wide_in_flight_limit_turns_requests_away_across_functions() {
  let outpost = Outpost::start(
    &functions_config(
      "[server]\nmax_in_flight = 2\nqueue_depth = 0",
      &[
        ("a", "slow.js", "routes = [\"a.test/\"]"),
        ("b", "slow.js", "routes = [\"b.test/\"]"),
      ],
    ),
    &[("slow.js", SLOW)],
  );
  let client = http1();
  let hold = |host: &'static str| {
    let (client, url) = (client.clone(), outpost.url("/hold"));
    tokio::spawn(async move { client.get(url).header("host", host).send().await.unwrap() })
  };
  let (first, second) = (hold("a.test"), hold("b.test"));
  tokio::task::block_in_place(|| {
    let deadline = Instant::now() + Duration::from_secs(10);
    while outpost.logs().matches("holding").count() < 2 {
      assert!(Instant::now() < deadline, "{}", outpost.logs());
      std::thread::sleep(Duration::from_millis(20));
    }
  });
  let third = client
    .get(outpost.url("/"))
    .header("host", "a.test")
    .send()
    .await
    .unwrap();
  assert_eq!(third.status(), 503);
  assert_eq!(third.headers()["outpost-error"], "overloaded");
  assert_eq!(first.await.unwrap().status(), 200);
  assert_eq!(second.await.unwrap().status(), 200);
  // With the two done, there is room again.
  let after = client
    .get(outpost.url("/"))
    .header("host", "b.test")
    .send()
    .await
    .unwrap();
  assert_eq!(after.status(), 200);
}
