//! Protocol limits: request head size, request body size, and the header read timeout.

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
