//! Per-PoP and per-region configuration: `[[overrides]]` reach handlers by precedence, and a
//! function switched off at this PoP answers its configured status.

use crate::support::{Outpost, http1};

const CONFIG: &str = r#"
[node]
pop = "ams1"
region = "eu-west"

[[regions]]
name = "eu"

[[regions]]
name = "eu-west"
parent = "eu"

[[listen]]
address = "127.0.0.1:0"

[[functions]]
name = "api"
entry = "env.js"
routes = ["/api"]
env = { GREETING = "hello", ORIGIN = "https://origin.example", LEVEL = "function" }

[[functions]]
name = "lawful"
entry = "env.js"
routes = ["/lawful"]

[[overrides]]
region = "eu"
function = "api"
env = { ORIGIN = "https://eu.origin.example", LEVEL = "eu" }

[[overrides]]
pop = "ams1"
function = "api"
env = { GREETING = "hallo" }

[[overrides]]
region = "eu-west"
function = "api"
env = { LEVEL = "eu-west" }

[[overrides]]
region = "eu"
function = "lawful"
enabled = false
disabled_status = 451
"#;

const ENV: &str = r#"
export default {
  fetch: (request, env) =>
    new Response([env.GREETING, env.ORIGIN, env.LEVEL, env.OUTPOST_POP, env.OUTPOST_REGION].join(" ")),
};
"#;

#[tokio::test]
async fn overrides_apply_by_precedence_and_switch_functions_off() {
  let outpost = Outpost::start(CONFIG, &[("env.js", ENV)]);
  assert_eq!(
    outpost.get_text("/api").await,
    "hallo https://eu.origin.example eu-west ams1 eu-west"
  );
  let response = http1().get(outpost.url("/lawful")).send().await.unwrap();
  assert_eq!(response.status(), 451);
  assert_eq!(response.headers()["outpost-error"], "disabled-here");
}

const CF: &str = r#"
export default {
  fetch: (request) =>
    Response.json({ cf: request.cf, header: request.headers.get("x-client-country") }),
};
"#;

async fn cf_of(outpost: &Outpost) -> serde_json::Value {
  http1()
    .get(outpost.url("/"))
    .header("x-client-country", "NL")
    .header("x-client-city", "Amsterdam")
    .header("x-client-asn", "1136")
    .header("x-forwarded-for", "198.51.100.7")
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap()
}

fn geo_server(geo: &str) -> Outpost {
  let config = format!(
    "[node]\npop = \"ams1\"\n\n{geo}\n\n[[listen]]\naddress = \"127.0.0.1:0\"\n\n[[functions]]\nname = \"cf\"\nentry = \"cf.js\"\nroutes = [\"/\"]\n"
  );
  Outpost::start(&config, &[("cf.js", CF)])
}

#[tokio::test]
async fn request_cf_believes_geo_headers_only_from_trusted_peers() {
  // The test client is on loopback: trusted here...
  let trusted = geo_server("[geo]\ntrusted_peers = [\"127.0.0.0/8\", \"::1/128\"]");
  let seen = cf_of(&trusted).await;
  assert_eq!(
    seen["cf"],
    serde_json::json!({
      "country": "NL",
      "city": "Amsterdam",
      "asn": 1136,
      "clientIp": "198.51.100.7",
      "colo": "ams1",
    })
  );
  assert_eq!(seen["header"], "NL");
  // ...and not here: its geo headers are stripped and its forwarding header ignored.
  let untrusted = geo_server("");
  let seen = cf_of(&untrusted).await;
  assert_eq!(
    seen["cf"],
    serde_json::json!({ "clientIp": "127.0.0.1", "colo": "ams1" })
  );
  assert_eq!(seen["header"], serde_json::Value::Null);
}

/// Sends `preface` then a GET on a new connection; the response, or "" when the server
/// closed the connection without one.
fn raw_get(address: std::net::SocketAddr, preface: &[u8]) -> String {
  use std::io::{Read, Write};
  let mut stream = std::net::TcpStream::connect(address).unwrap();
  stream
    .set_read_timeout(Some(std::time::Duration::from_secs(10)))
    .unwrap();
  let mut request = preface.to_vec();
  request.extend_from_slice(b"GET / HTTP/1.1\r\nHost: proxied\r\nConnection: close\r\n\r\n");
  // The server may close before it has read everything we sent.
  let _ = stream.write_all(&request);
  let mut response = Vec::new();
  let _ = stream.read_to_end(&mut response);
  String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_names_the_client_and_a_malformed_header_closes_the_connection() {
  let config = "[node]\npop = \"ams1\"\n\n[[listen]]\naddress = \"127.0.0.1:0\"\nproxy_protocol = true\n\n[[functions]]\nname = \"cf\"\nentry = \"cf.js\"\nroutes = [\"/\"]\n";
  let outpost = Outpost::start(config, &[("cf.js", CF)]);
  let address = outpost.http[0];
  let v2 = ppp::v2::Builder::with_addresses(
    ppp::v2::Version::Two | ppp::v2::Command::Proxy,
    ppp::v2::Protocol::Stream,
    (
      "[2001:db8::7]:5555"
        .parse::<std::net::SocketAddr>()
        .unwrap(),
      "[2001:db8::1]:80".parse::<std::net::SocketAddr>().unwrap(),
    ),
  )
  .build()
  .unwrap();
  let (v1, v2, bad, none) = tokio::task::spawn_blocking(move || {
    (
      raw_get(address, b"PROXY TCP4 198.51.100.7 10.0.0.1 5555 80\r\n"),
      raw_get(address, &v2),
      raw_get(address, b"PROXY TCP4 not-an-address\r\n"),
      raw_get(address, b""),
    )
  })
  .await
  .unwrap();
  assert!(v1.starts_with("HTTP/1.1 200"), "{v1}");
  assert!(v1.contains(r#""clientIp":"198.51.100.7""#), "{v1}");
  assert!(v2.contains(r#""clientIp":"2001:db8::7""#), "{v2}");
  assert_eq!(bad, "", "a malformed header gets no response");
  assert_eq!(none, "", "a connection without a header gets no response");
  outpost.wait_for_log("closing a connection with a malformed PROXY header");
}

/// Writes a MaxMind City database and an ASN database (IPv6 trees, IPv4 under ::/96) into
/// `dir`: 198.51.100.0/24 is Amsterdam, 2001:db8::/32 is Tokyo.
fn write_databases(dir: &std::path::Path) {
  use maxminddb_writer::Database;
  use maxminddb_writer::metadata::IpVersion;
  use maxminddb_writer::paths::IpAddrWithMask;

  #[derive(serde::Serialize)]
  struct Asn {
    autonomous_system_number: u32,
    autonomous_system_organization: &'static str,
  }

  let network = |text: &str| text.parse::<IpAddrWithMask>().unwrap();
  let new_db = |kind: &str| {
    let mut db = Database::default();
    db.metadata.ip_version = IpVersion::V6;
    db.metadata.database_type = kind.into();
    db.metadata.languages = vec!["en".into()];
    db.metadata.binary_format_major_version = 2;
    db
  };

  let mut city = new_db("GeoLite2-City");
  let amsterdam = city
    .insert_value(serde_json::json!({
      "city": { "names": { "en": "Amsterdam" } },
      "continent": { "code": "EU" },
      "country": { "iso_code": "NL" },
      "location": { "latitude": 52.37, "longitude": 4.89, "time_zone": "Europe/Amsterdam" },
      "postal": { "code": "1012" },
      "subdivisions": [{ "iso_code": "NH", "names": { "en": "North Holland" } }],
    }))
    .unwrap();
  let tokyo = city
    .insert_value(serde_json::json!({
      "city": { "names": { "en": "Tokyo" } },
      "continent": { "code": "AS" },
      "country": { "iso_code": "JP" },
    }))
    .unwrap();
  city.insert_node(network("::198.51.100.0/120"), amsterdam);
  city.insert_node(network("2001:db8::/32"), tokyo);
  let file = std::fs::File::create(dir.join("city.mmdb")).unwrap();
  city.write_to(std::io::BufWriter::new(file)).unwrap();

  let mut asn = new_db("GeoLite2-ASN");
  let provider = asn
    .insert_value(Asn {
      autonomous_system_number: 1136,
      autonomous_system_organization: "KPN B.V.",
    })
    .unwrap();
  asn.insert_node(network("::198.51.100.0/120"), provider);
  let file = std::fs::File::create(dir.join("asn.mmdb")).unwrap();
  asn.write_to(std::io::BufWriter::new(file)).unwrap();
}

#[tokio::test]
async fn maxmind_databases_locate_ipv4_and_ipv6_clients() {
  let config = "[node]\npop = \"ams1\"\n\n[geo]\nsource = \"maxmind\"\nmmdb_city = \"city.mmdb\"\nmmdb_asn = \"asn.mmdb\"\ntrusted_peers = [\"127.0.0.0/8\"]\n\n[[listen]]\naddress = \"127.0.0.1:0\"\n\n[[functions]]\nname = \"cf\"\nentry = \"cf.js\"\nroutes = [\"/\"]\n";
  let outpost = Outpost::start_with(config, &[("cf.js", CF)], write_databases);
  let cf = |client: &'static str| {
    let url = outpost.url("/");
    async move {
      let seen: serde_json::Value = http1()
        .get(url)
        // From a trusted peer; the header's country is not believed with source = maxmind.
        .header("x-forwarded-for", client)
        .header("x-client-country", "US")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
      seen["cf"].clone()
    }
  };
  assert_eq!(
    cf("198.51.100.7").await,
    serde_json::json!({
      "country": "NL",
      "city": "Amsterdam",
      "continent": "EU",
      "postalCode": "1012",
      "timezone": "Europe/Amsterdam",
      "region": "North Holland",
      "regionCode": "NH",
      "latitude": "52.37",
      "longitude": "4.89",
      "asn": 1136,
      "asOrganization": "KPN B.V.",
      "clientIp": "198.51.100.7",
      "colo": "ams1",
    })
  );
  assert_eq!(
    cf("2001:db8::1").await,
    serde_json::json!({
      "country": "JP",
      "city": "Tokyo",
      "continent": "AS",
      "clientIp": "2001:db8::1",
      "colo": "ams1",
    })
  );
  // An address neither database knows: only the address and the PoP.
  assert_eq!(
    cf("192.0.2.1").await,
    serde_json::json!({ "clientIp": "192.0.2.1", "colo": "ams1" })
  );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_settings_reload_under_load_and_a_broken_reload_is_rejected() {
  let config = |geo: &str| {
    format!(
      "[node]\npop = \"ams1\"\n\n[geo]\n{geo}\n\n[[listen]]\naddress = \"127.0.0.1:0\"\n\n[[functions]]\nname = \"cf\"\nentry = \"cf.js\"\nroutes = [\"/\"]\n"
    )
  };
  let trusting = config("trusted_peers = [\"127.0.0.0/8\"]");
  let outpost = Outpost::start(&trusting, &[("cf.js", CF)]);
  let file = outpost.dir().join("outpost.toml");
  let country = || async { cf_of(&outpost).await["cf"]["country"].clone() };
  assert_eq!(country().await, "NL");

  // Load throughout: every request must succeed.
  let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
  let load: Vec<_> = (0..4)
    .map(|_| {
      let (url, stop) = (outpost.url("/"), stop.clone());
      tokio::spawn(async move {
        let client = http1();
        let (mut ok, mut failed) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
          match client.get(&url).send().await {
            Ok(response) if response.status() == 200 => ok += 1,
            _ => failed += 1,
          }
        }
        (ok, failed)
      })
    })
    .collect();

  // SIGHUP applies a valid change. The file's modification time is put back, so that the
  // file watcher cannot be what applies it: only the signal can.
  let rewrite_unseen = |text: &str| {
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::fs::write(&file, text).unwrap();
    std::fs::File::options()
      .write(true)
      .open(&file)
      .unwrap()
      .set_modified(before)
      .unwrap();
  };
  rewrite_unseen(&config("trusted_peers = []"));
  outpost.signal("HUP");
  tokio::task::block_in_place(|| outpost.wait_for_log("configuration reloaded trigger=\"SIGHUP\""));
  assert_eq!(country().await, serde_json::Value::Null);
  let logs = outpost.logs();
  assert!(
    !logs.contains("geo configuration reloaded"),
    "the watcher did not apply it:\n{logs}"
  );
  rewrite_unseen(&trusting);
  outpost.signal("HUP");
  tokio::task::block_in_place(|| {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while outpost
      .logs()
      .matches("configuration reloaded trigger=\"SIGHUP\"")
      .count()
      < 2
    {
      assert!(std::time::Instant::now() < deadline, "{}", outpost.logs());
      std::thread::sleep(std::time::Duration::from_millis(20));
    }
  });
  assert_eq!(country().await, "NL");

  // A broken file is rejected, and the current settings (which trust the client, unlike
  // the defaults) stay.
  std::fs::write(&file, config("trusted_peers = [\"not-a-cidr\"]")).unwrap();
  outpost.signal("HUP");
  tokio::task::block_in_place(|| outpost.wait_for_log("reload rejected"));
  assert_eq!(country().await, "NL");

  // A changed file is picked up without a signal.
  std::fs::write(&file, config("trusted_peers = []")).unwrap();
  let mut reloaded = false;
  for _ in 0..100 {
    if country().await == serde_json::Value::Null {
      reloaded = true;
      break;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
  }
  assert!(reloaded, "the file change was not picked up");
  assert!(
    outpost
      .logs()
      .contains("geo configuration reloaded trigger=\"a file changed\"")
  );

  stop.store(true, std::sync::atomic::Ordering::Relaxed);
  let (mut ok, mut failed) = (0, 0);
  for task in load {
    let (o, f) = task.await.unwrap();
    ok += o;
    failed += f;
  }
  assert!(ok > 0);
  assert_eq!(
    failed,
    0,
    "{failed} of {} requests failed during reloads",
    ok + failed
  );
}
