//! Reloading a running node: SIGHUP and `POST /reload` re-read the config file and the
//! certificates; a config that does not load changes nothing.

use std::time::{Duration, Instant};

use crate::support::{Outpost, TestCa, admin_post, http1, peer_certificate, tls_node_config};

fn config(cert: &std::path::Path, key: &std::path::Path, entry: &str) -> String {
  tls_node_config(
    cert,
    key,
    &format!("\n[[functions]]\nname = \"site\"\nentry = \"{entry}\"\nroutes = [\"/\"]\n"),
  )
}

fn client(ca: &TestCa, outpost: &Outpost) -> reqwest::Client {
  reqwest::Client::builder()
    .tls_certs_only([ca.root()])
    .tls_info(true)
    .resolve("site.test", outpost.https[0])
    .build()
    .unwrap()
}

/// GETs `https://site.test/` with `client`: (served certificate, body).
async fn get(client: &reqwest::Client, outpost: &Outpost) -> (Vec<u8>, String) {
  let response = client
    .get(format!("https://site.test:{}/", outpost.https[0].port()))
    .send()
    .await
    .unwrap();
  (peer_certificate(&response), response.text().await.unwrap())
}

#[tokio::test]
async fn sighup_serves_a_renewed_certificate_to_new_handshakes_only() {
  let ca = TestCa::new();
  let certs = tempfile::tempdir().unwrap();
  let first = ca.leaf(certs.path(), "site", &["site.test"]);
  let outpost = Outpost::start(
    &config(&first.cert_path, &first.key_path, "site.js"),
    &[(
      "site.js",
      "export default { fetch: () => new Response('site') };",
    )],
  );
  let kept = client(&ca, &outpost);
  assert_eq!(
    get(&kept, &outpost).await,
    (first.der.clone(), "site".into())
  );

  // Renewed on disk (same paths), then SIGHUP.
  let renewed = ca.leaf(certs.path(), "site", &["site.test"]);
  assert_ne!(renewed.der, first.der);
  outpost.signal("HUP");
  outpost.wait_for_log("configuration reloaded");
  let fresh = client(&ca, &outpost);
  assert_eq!(get(&fresh, &outpost).await, (renewed.der, "site".into()));
  // The connection opened before keeps the certificate it was made with.
  assert_eq!(get(&kept, &outpost).await.0, first.der);
}

#[tokio::test]
async fn reload_applies_function_changes_and_rejects_a_broken_config() {
  let ca = TestCa::new();
  let certs = tempfile::tempdir().unwrap();
  let leaf = ca.leaf(certs.path(), "site", &["site.test"]);
  let outpost = Outpost::start(
    &config(&leaf.cert_path, &leaf.key_path, "v1.js"),
    &[
      (
        "v1.js",
        "export default { fetch: () => new Response('v1') };",
      ),
      (
        "v2.js",
        "export default { fetch: () => new Response('v2') };",
      ),
    ],
  );
  let https = client(&ca, &outpost);
  let reload = || async {
    let response = admin_post(&outpost, "/reload").await;
    let status = response.status().as_u16();
    (status, response.json::<serde_json::Value>().await.unwrap())
  };
  let config_file = outpost.dir().join("outpost.toml");

  // A config that does not validate changes nothing, by POST /reload or SIGHUP.
  std::fs::write(&config_file, "[[functions]]\nname = 3\n").unwrap();
  let (status, answer) = reload().await;
  assert_eq!(status, 400, "{answer}");
  assert!(
    answer["error"].as_str().unwrap().contains("outpost.toml"),
    "{answer}"
  );
  outpost.signal("HUP");
  outpost.wait_for_log("reload rejected, the running configuration stays");
  assert_eq!(get(&https, &outpost).await.1, "v1");

  // Nor does one whose certificate is missing.
  let missing = certs.path().join("missing.pem");
  std::fs::write(&config_file, config(&missing, &leaf.key_path, "v2.js")).unwrap();
  let (status, answer) = reload().await;
  assert_eq!(status, 400, "{answer}");
  assert!(
    answer["error"].as_str().unwrap().contains("missing.pem"),
    "{answer}"
  );
  assert_eq!(get(&https, &outpost).await.1, "v1");

  // A good one moves traffic to the new function code, with no failed request meanwhile.
  std::fs::write(
    &config_file,
    config(&leaf.cert_path, &leaf.key_path, "v2.js"),
  )
  .unwrap();
  let (status, answer) = reload().await;
  assert_eq!(status, 200, "{answer}");
  let deadline = Instant::now() + Duration::from_secs(10);
  while get(&https, &outpost).await.1 != "v2" {
    assert!(Instant::now() < deadline, "v2 never served");
    tokio::time::sleep(Duration::from_millis(20)).await;
  }
}

/// A reload whose functions include one that does not load is refused whole, by POST
/// /reload and SIGHUP alike: the pool that serves keeps serving, with no failed request, and
/// the node stays ready. Requests in flight across a good reload finish on the version they
/// started on.
#[tokio::test]
async fn a_reload_with_a_function_that_does_not_load_keeps_the_old_pool_serving() {
  let config = |entry: &str| {
    crate::support::functions_config(
      "[admin]\naddress = \"127.0.0.1:0\"",
      &[("site", entry, r#"routes = ["/"]"#)],
    )
  };
  let slow = |body: &str| {
    format!(
      "export default {{ async fetch(request) {{ if (new URL(request.url).pathname === '/slow') await new Promise((r) => setTimeout(r, 800)); return new Response('{body}'); }} }};"
    )
  };
  let (v1, v2) = (slow("v1"), slow("v2"));
  let outpost = Outpost::start(
    &config("v1.js"),
    &[
      ("v1.js", &v1),
      ("v2.js", &v2),
      (
        "broken.js",
        "export default { fetch() { return new Response('x'; } };",
      ),
    ],
  );
  let admin = format!("http://{}", outpost.admin.unwrap());
  let config_file = outpost.dir().join("outpost.toml");
  let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
  let load: Vec<_> = (0..3)
    .map(|_| {
      let (stop, url) = (stop.clone(), outpost.url("/"));
      tokio::spawn(async move {
        let client = http1();
        let mut bodies = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
          let response = client.get(&url).send().await.unwrap();
          assert_eq!(response.status(), 200);
          bodies.push(response.text().await.unwrap());
        }
        bodies
      })
    })
    .collect();

  std::fs::write(&config_file, config("broken.js")).unwrap();
  let response = http1()
    .post(format!("{admin}/reload"))
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 400);
  let answer: serde_json::Value = response.json().await.unwrap();
  let error = answer["error"].as_str().unwrap();
  assert!(
    error.contains("function \"site\" does not load") && error.contains("broken.js:1:"),
    "{answer}"
  );
  outpost.signal("HUP");
  outpost.wait_for_log("reload rejected, the running configuration stays");
  let ready = http1().get(format!("{admin}/readyz")).send().await.unwrap();
  assert_eq!(ready.status(), 200);

  // A request in flight when a good reload lands finishes on v1; later ones get v2.
  let in_flight = tokio::spawn({
    let url = outpost.url("/slow");
    async move { http1().get(url).send().await.unwrap().text().await.unwrap() }
  });
  tokio::time::sleep(Duration::from_millis(200)).await;
  std::fs::write(&config_file, config("v2.js")).unwrap();
  let response = http1()
    .post(format!("{admin}/reload"))
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 200);
  assert_eq!(in_flight.await.unwrap(), "v1");
  outpost.wait_for_text("/", "v2", "v2 never served").await;
  stop.store(true, std::sync::atomic::Ordering::Relaxed);
  for task in load {
    let bodies = task.await.unwrap();
    assert!(bodies.iter().all(|b| b == "v1" || b == "v2"), "{bodies:?}");
  }
}
