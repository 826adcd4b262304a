//! Reloading a running node: SIGHUP and `POST /reload` re-read the config file and the
//! certificates; a config that does not load changes nothing.

use std::time::{Duration, Instant};

use crate::support::{Outpost, TestCa, http1, peer_certificate};

fn config(cert: &std::path::Path, key: &std::path::Path, entry: &str) -> String {
  format!(
    r#"
[admin]
address = "127.0.0.1:0"

[[listen]]
address = "127.0.0.1:0"
tls = [ {{ cert = "{}", key = "{}" }} ]

[[functions]]
name = "site"
entry = "{entry}"
routes = ["/"]
"#,
    cert.display(),
    key.display()
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
  let admin = format!("http://{}", outpost.admin.unwrap());
  let reload = || async {
    let response = http1()
      .post(format!("{admin}/reload"))
      .send()
      .await
      .unwrap();
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
