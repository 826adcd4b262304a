//! HTTP/1.1, h2 over TLS with ALPN, h2c, SNI certificate selection and compression.

use std::io::Read;

use reqwest::Version;

use crate::support::{
  Outpost, TestCa, http1, peer_certificate, scrape_until, tls_node_config, value,
};

const ECHO_PROTOCOL: &str = r#"export default {
  fetch(request) {
    const host = request.headers.get("host");
    if (host !== new URL(request.url).host) return new Response("host header " + host + " != " + request.url);
    return new Response("via " + new URL(request.url).protocol + " " + (request.headers.get("x-test") ?? ""), {
      headers: { "content-type": "text/plain" },
    });
  },
};"#;

/// A server with a plain listener and a TLS listener holding certificates for a.test and
/// b.test.
fn tls_server(ca: &TestCa) -> (Outpost, Vec<u8>, Vec<u8>) {
  let certs = tempfile::tempdir().unwrap();
  let a = ca.leaf(certs.path(), "a", &["a.test"]);
  let b = ca.leaf(certs.path(), "b", &["b.test", "*.b.test"]);
  let config = format!(
    r#"
[server]
header_read_timeout_ms = 1000

[[listen]]
address = "127.0.0.1:0"

[[listen]]
address = "127.0.0.1:0"
tls = [ {{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }} ]

[[functions]]
name = "echo"
entry = "echo.js"
routes = ["/"]
"#,
    a.cert_path.display(),
    a.key_path.display(),
    b.cert_path.display(),
    b.key_path.display()
  );
  let outpost = Outpost::start(&config, &[("echo.js", ECHO_PROTOCOL)]);
  // The server has read the certificates; the directory can go.
  drop(certs);
  (outpost, a.der, b.der)
}

fn tls_client(ca: &TestCa, outpost: &Outpost) -> reqwest::ClientBuilder {
  let address = outpost.https[0];
  reqwest::Client::builder()
    .tls_certs_only([ca.root()])
    .tls_info(true)
    .resolve("a.test", address)
    .resolve("b.test", address)
    .resolve("www.b.test", address)
}

#[tokio::test]
async fn h2_over_tls_by_alpn_and_sni_picks_the_certificate() {
  let ca = TestCa::new();
  let (outpost, a_der, b_der) = tls_server(&ca);
  let port = outpost.https[0].port();
  let client = tls_client(&ca, &outpost).build().unwrap();

  let a = client
    .get(format!("https://a.test:{port}/x"))
    .header("x-test", "a")
    .send()
    .await
    .unwrap();
  assert_eq!(a.version(), Version::HTTP_2, "ALPN negotiates h2");
  assert_eq!(
    peer_certificate(&a),
    a_der,
    "SNI a.test gets a's certificate"
  );
  assert_eq!(a.text().await.unwrap(), "via https: a");

  let b = client
    .get(format!("https://www.b.test:{port}/"))
    .send()
    .await
    .unwrap();
  assert_eq!(
    peer_certificate(&b),
    b_der,
    "SNI www.b.test gets b's wildcard certificate"
  );

  let h1 = tls_client(&ca, &outpost).http1_only().build().unwrap();
  let b = h1
    .get(format!("https://b.test:{port}/"))
    .send()
    .await
    .unwrap();
  assert_eq!(b.version(), Version::HTTP_11);
  assert_eq!(peer_certificate(&b), b_der);
  assert_eq!(b.text().await.unwrap(), "via https: ");
}

#[tokio::test]
async fn plain_listener_speaks_http1_and_h2c() {
  let ca = TestCa::new();
  let (outpost, _, _) = tls_server(&ca);
  let h1 = http1().get(outpost.url("/")).send().await.unwrap();
  assert_eq!(h1.version(), Version::HTTP_11);
  assert_eq!(h1.text().await.unwrap(), "via http: ");
  let h2c = reqwest::Client::builder()
    .http2_prior_knowledge()
    .build()
    .unwrap();
  let response = h2c
    .get(outpost.url("/"))
    .header("x-test", "h2c")
    .send()
    .await
    .unwrap();
  assert_eq!(response.version(), Version::HTTP_2);
  assert_eq!(response.text().await.unwrap(), "via http: h2c");
}

#[tokio::test]
async fn brotli_and_gzip_by_accept_encoding() {
  let page = format!("<p>{}</p>", "compressible ".repeat(500));
  let handler = format!(
    "export default {{ fetch: (r) => new URL(r.url).pathname === '/png' \
       ? new Response(new Uint8Array(2000), {{ headers: {{ 'content-type': 'image/png' }} }}) \
       : new URL(r.url).pathname === '/pre' \
       ? new Response('already', {{ headers: {{ 'content-type': 'text/plain', 'content-encoding': 'identity' }} }}) \
       : new Response({page:?}, {{ headers: {{ 'content-type': 'text/html; charset=utf-8' }} }}) }};"
  );
  let outpost = Outpost::start_handler("page.js", &handler);
  let client = http1();
  let get = |path: &str, accept: &str| {
    client
      .get(outpost.url(path))
      .header("accept-encoding", accept)
      .send()
  };

  let br = get("/", "gzip, br").await.unwrap();
  assert_eq!(br.headers()["content-encoding"], "br");
  assert_eq!(br.headers()["vary"], "Accept-Encoding");
  let compressed = br.bytes().await.unwrap();
  assert!(
    compressed.len() < page.len() / 10,
    "{} bytes",
    compressed.len()
  );
  let mut decoded = String::new();
  brotli::Decompressor::new(&compressed[..], 4096)
    .read_to_string(&mut decoded)
    .unwrap();
  assert_eq!(decoded, page);

  let gzip = get("/", "gzip;q=1, br;q=0.5").await.unwrap();
  assert_eq!(gzip.headers()["content-encoding"], "gzip");
  let compressed = gzip.bytes().await.unwrap();
  let mut decoded = String::new();
  flate2::read::GzDecoder::new(&compressed[..])
    .read_to_string(&mut decoded)
    .unwrap();
  assert_eq!(decoded, page);

  let identity = get("/", "identity").await.unwrap();
  assert!(identity.headers().get("content-encoding").is_none());
  assert_eq!(identity.headers()["vary"], "Accept-Encoding");
  assert_eq!(identity.text().await.unwrap(), page);

  let png = get("/png", "br").await.unwrap();
  assert!(
    png.headers().get("content-encoding").is_none(),
    "images are not recompressed"
  );
  assert_eq!(png.bytes().await.unwrap().len(), 2000);

  let pre = get("/pre", "br").await.unwrap();
  assert_eq!(
    pre.headers()["content-encoding"],
    "identity",
    "a function's own encoding is kept"
  );
  assert_eq!(pre.text().await.unwrap(), "already");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_passed_through() {
  let outpost = Outpost::start_handler(
    "headers.js",
    r#"export default {
      fetch(request) {
        const seen = [...request.headers.keys()].join(",");
        return new Response(seen, { headers: { "connection": "x-secret", "x-secret": "1", "keep-alive": "timeout=1", "x-kept": "1" } });
      },
    };"#,
  );
  let response = http1()
    .get(outpost.url("/"))
    .header("connection", "x-private")
    .header("x-private", "p")
    .header("x-public", "q")
    .send()
    .await
    .unwrap();
  assert!(response.headers().get("x-secret").is_none());
  assert!(response.headers().get("keep-alive").is_none());
  assert_eq!(response.headers()["x-kept"], "1");
  let seen = response.text().await.unwrap();
  assert!(seen.contains("x-public"), "{seen}");
  assert!(!seen.contains("x-private"), "{seen}");
  assert!(!seen.contains("connection"), "{seen}");
}

#[tokio::test]
async fn a_wrong_content_length_from_the_handler_cannot_break_the_response() {
  let outpost = Outpost::start_handler(
    "length.js",
    r#"export default {
      fetch(request) {
        const body = new URL(request.url).pathname === "/stream"
          ? new Blob(["streamed body"]).stream()
          : "inline body";
        return new Response(body, { headers: { "content-length": "1000" } });
      },
    };"#,
  );
  for (path, expected) in [("/", "inline body"), ("/stream", "streamed body")] {
    let response = http1().get(outpost.url(path)).send().await.unwrap();
    if let Some(length) = response.headers().get("content-length") {
      assert_eq!(
        length.to_str().unwrap(),
        expected.len().to_string(),
        "{path}"
      );
    }
    assert_eq!(response.text().await.unwrap(), expected, "{path}");
  }
  let head = http1().head(outpost.url("/")).send().await.unwrap();
  assert_eq!(
    head.headers()["content-length"],
    "11",
    "HEAD reports the length GET would send"
  );
}

#[test]
fn a_client_that_never_finishes_the_tls_handshake_is_cut_off() {
  let ca = TestCa::new();
  let (outpost, _, _) = tls_server(&ca);
  let mut stream = std::net::TcpStream::connect(outpost.https[0]).unwrap();
  stream
    .set_read_timeout(Some(std::time::Duration::from_secs(10)))
    .unwrap();
  // Silence instead of a ClientHello: the handshake is bounded by header_read_timeout_ms.
  let mut buffer = [0u8; 64];
  let read = stream.read(&mut buffer);
  assert!(
    matches!(read, Ok(0))
      || read
        .as_ref()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
    "expected the server to close the connection, read {read:?}"
  );
}

/// A HEAD gets the head a GET gets, `content-length` included, and no body, on every
/// protocol. (hyper's HTTP/2 server sends the body anyway; h2 and nghttp2 clients then reset
/// the stream with PROTOCOL_ERROR.)
#[tokio::test]
async fn head_gets_the_length_and_no_body_on_every_protocol() {
  let ca = TestCa::new();
  let (outpost, _, _) = tls_server(&ca);
  let port = outpost.https[0].port();
  let h2c = reqwest::Client::builder()
    .http2_prior_knowledge()
    .build()
    .unwrap();
  let h2_tls = tls_client(&ca, &outpost).build().unwrap();
  let cases = [
    (http1(), outpost.url("/"), Version::HTTP_11, "via http: "),
    (h2c, outpost.url("/"), Version::HTTP_2, "via http: "),
    (
      h2_tls,
      format!("https://a.test:{port}/"),
      Version::HTTP_2,
      "via https: ",
    ),
  ];
  for (client, url, version, body) in cases {
    let get = client.get(&url).send().await.unwrap();
    assert_eq!(get.text().await.unwrap(), body);
    let head = client.head(&url).send().await.unwrap();
    assert_eq!(head.version(), version);
    assert_eq!(head.status(), 200, "{url} {version:?}");
    assert_eq!(
      head.headers()["content-length"],
      body.len().to_string().as_str(),
      "{url} {version:?}"
    );
    assert!(head.headers().contains_key("outpost-request-id"));
    assert_eq!(head.bytes().await.unwrap().len(), 0, "{url} {version:?}");
  }
}

/// `server.max_headers` is one limit for HTTP/1.1 and h2; a refused request gets an access
/// record with a request id either way.
#[tokio::test]
async fn the_header_count_limit_is_the_same_on_both_protocols_and_refusals_are_recorded() {
  let counter = r#"export default { fetch(request) { return new Response(String([...request.headers].length)); } };"#;
  let many = |request: reqwest::RequestBuilder| {
    (0..150).fold(request, |request, i| request.header(format!("x-h{i}"), "v"))
  };
  let h2c = || {
    reqwest::Client::builder()
      .http2_prior_knowledge()
      .build()
      .unwrap()
  };
  // The default: at most 100 lines.
  let strict = Outpost::start(
    &crate::support::functions_config("", &[("count", "count.js", r#"routes = ["/"]"#)]),
    &[("count.js", counter)],
  );
  let h1 = many(http1().get(strict.url("/"))).send().await.unwrap();
  assert_eq!(h1.status(), 431);
  let h2 = many(h2c().get(strict.url("/"))).send().await.unwrap();
  assert_eq!(h2.status(), 431);
  assert_eq!(h2.headers()["outpost-error"], "too-many-headers");
  let h2_id = h2.headers()["outpost-request-id"]
    .to_str()
    .unwrap()
    .to_string();
  assert!(h2.text().await.unwrap().contains("server.max_headers"));
  strict.wait_for_log(&format!("request_id=\"{h2_id}\""));
  let logs = strict.wait_for_log("termination=\"headers-too-large\"");
  let refusals: Vec<&str> = logs
    .lines()
    .filter(|l| l.contains("outpost::access") && l.contains("status=431"))
    .collect();
  assert_eq!(refusals.len(), 2, "one access record each:\n{logs}");
  assert!(
    refusals.iter().all(|l| l.contains("request_id=\"")),
    "{refusals:?}"
  );
  assert!(
    refusals
      .iter()
      .any(|l| l.contains("termination=\"headers-too-large\"")),
    "the HTTP/1.1 refusal is recorded: {refusals:?}"
  );
  // Raised: 150 lines pass on both protocols.
  let lenient = Outpost::start(
    &crate::support::functions_config(
      "[server]\nmax_headers = 200",
      &[("count", "count.js", r#"routes = ["/"]"#)],
    ),
    &[("count.js", counter)],
  );
  for client in [http1(), h2c()] {
    let response = many(client.get(lenient.url("/"))).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let seen: usize = response.text().await.unwrap().parse().unwrap();
    assert!(seen >= 150, "{seen}");
  }
}

/// A TLS handshake naming a host starts the isolate of the function it routes to before any
/// request arrives: none for a host that routes nowhere, and one however many handshakes
/// race for it.
#[tokio::test]
async fn a_tls_handshake_naming_a_host_prewarms_its_function() {
  let ca = TestCa::new();
  let certs = tempfile::tempdir().unwrap();
  let leaf = ca.leaf(certs.path(), "hosts", &["a.test", "nowhere.test"]);
  let config = tls_node_config(
    &leaf.cert_path,
    &leaf.key_path,
    "\n[[functions]]\nname = \"cold\"\nentry = \"echo.js\"\nroutes = [\"a.test/\"]\npool = { prewarm = 0 }\n",
  );
  let outpost = Outpost::start(&config, &[("echo.js", ECHO_PROTOCOL)]);
  let address = outpost.https[0];
  let handshake = |host: &'static str| {
    let connector = ca.connector();
    async move {
      let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
      let name = rustls::pki_types::ServerName::try_from(host).unwrap();
      connector.connect(name, tcp).await.unwrap()
    }
  };
  let idle = |scrape: &prometheus_parse::Scrape| {
    value(
      scrape,
      "outpost_isolates",
      &[("function", "cold"), ("state", "idle")],
    )
    .unwrap_or(0.0)
  };
  let prewarms = || outpost.logs().matches("pre-warming an isolate").count();

  // A host that routes nowhere starts nothing.
  let nowhere = handshake("nowhere.test").await;
  tokio::time::sleep(std::time::Duration::from_millis(300)).await;
  assert_eq!(prewarms(), 0, "{}", outpost.logs());
  assert_eq!(idle(&scrape_until(&outpost, |_| true).await), 0.0);

  // Eight handshakes at once, no request on any of them.
  let connections = futures::future::join_all((0..8).map(|_| handshake("a.test"))).await;
  let scrape = scrape_until(&outpost, |scrape| idle(scrape) >= 1.0).await;
  assert_eq!(
    idle(&scrape),
    1.0,
    "the handshakes started the function's isolate"
  );
  assert_eq!(prewarms(), 1, "{}", outpost.logs());

  // Once it has an isolate, handshakes start no other.
  let later = handshake("a.test").await;
  tokio::time::sleep(std::time::Duration::from_millis(300)).await;
  assert_eq!(prewarms(), 1, "{}", outpost.logs());
  assert_eq!(idle(&scrape_until(&outpost, |_| true).await), 1.0);
  drop((nowhere, connections, later));
}
