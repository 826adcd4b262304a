//! Egress policy for outbound fetch. Every destination here is on loopback: the denials of
//! other private ranges are checked without traffic in the runtime's unit tests.

use crate::support::{Outpost, functions_config};

const FETCHER: &str = r#"
export default {
  async fetch(request) {
    const url = new URL(request.url);
    const target = url.searchParams.get("to");
    if (target === null) return new Response("origin");
    try {
      const response = await fetch(target.replace("PORT", url.port));
      return new Response("fetched " + (await response.text()));
    } catch (error) {
      return new Response(`${error.name}: ${error.message}`);
    }
  },
};
"#;

fn server(preamble: &str, function_lines: &str) -> Outpost {
  Outpost::start(
    &functions_config(
      preamble,
      &[(
        "fetcher",
        "fetcher.js",
        &format!("routes = [\"/\"]\n{function_lines}"),
      )],
    ),
    &[("fetcher.js", FETCHER)],
  )
}

#[tokio::test]
async fn loopback_is_refused_by_default_even_through_a_host_name() {
  let outpost = server("", "");
  for target in ["http://127.0.0.1:PORT/", "http://localhost:PORT/"] {
    let body = outpost.get_text(&format!("/fetch?to={target}")).await;
    assert!(
      body.starts_with("TypeError: fetch() to http://")
        && body.contains("refused by this node's egress policy"),
      "{target}: {body}"
    );
  }
}

#[tokio::test]
async fn the_operator_switch_allows_private_upstreams_and_function_lists_still_apply() {
  let open = server("[egress]\nallow_private = true", "");
  assert_eq!(
    open.get_text("/fetch?to=http://127.0.0.1:PORT/").await,
    "fetched origin"
  );
  assert_eq!(
    open.get_text("/fetch?to=http://localhost:PORT/").await,
    "fetched origin"
  );

  let denied = server(
    "[egress]\nallow_private = true",
    "egress = { deny = [\"localhost\"] }",
  );
  assert_eq!(
    denied.get_text("/fetch?to=http://127.0.0.1:PORT/").await,
    "fetched origin"
  );
  let body = denied.get_text("/fetch?to=http://localhost:PORT/").await;
  assert!(
    body.contains("refused by this node's egress policy"),
    "{body}"
  );

  let listed = server(
    "[egress]\nallow_private = true",
    "egress = { allow = [\"127.0.0.1\"] }",
  );
  assert_eq!(
    listed.get_text("/fetch?to=http://127.0.0.1:PORT/").await,
    "fetched origin"
  );
  let body = listed.get_text("/fetch?to=http://localhost:PORT/").await;
  assert!(
    body.contains("refused by this node's egress policy"),
    "{body}"
  );
}
