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
