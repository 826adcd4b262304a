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
