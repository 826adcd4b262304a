//! `outpost check`, config errors, and graceful shutdown.

use std::time::Duration;

use crate::support::{Outpost, http1, run_outpost, write_files};

#[test]
fn check_reports_every_config_error_with_its_location() {
  let dir = tempfile::tempdir().unwrap();
  write_files(
    dir.path(),
    &[(
      "outpost.toml",
      "[[listen]]\naddress = \"127.0.0.1:99999\"\n\n[[functions]]\nname = \"api\"\nentry = \"missing.ts\"\nroutes = [\"example.com\"]\n",
    )],
  );
  let (status, output) = run_outpost(&["check", "--config", "outpost.toml"], dir.path());
  assert!(!status.success());
  assert!(
    output.contains("outpost.toml:2:11: listen[0].address"),
    "{output}"
  );
  assert!(
    output.contains("outpost.toml:6:9: functions[0].entry: file not found"),
    "{output}"
  );
  assert!(
    output.contains("outpost.toml:7:11: functions[0].routes[0]: route \"example.com\" has no path"),
    "{output}"
  );
}

#[test]
fn unknown_keys_are_rejected_with_their_location() {
  let dir = tempfile::tempdir().unwrap();
  write_files(
    dir.path(),
    &[(
      "outpost.toml",
      "[[listen]]\naddress = \"127.0.0.1:0\"\nport = 80\n",
    )],
  );
  let (status, output) = run_outpost(&["serve", "--config", "outpost.toml"], dir.path());
  assert!(!status.success());
  assert!(output.contains("outpost.toml:3:1"), "{output}");
  assert!(output.contains("unknown field `port`"), "{output}");
}

#[test]
fn check_loads_functions_and_reports_load_errors() {
  let dir = tempfile::tempdir().unwrap();
  write_files(
    dir.path(),
    &[
      (
        "outpost.toml",
        "[[listen]]\naddress = \"127.0.0.1:0\"\n\n[[functions]]\nname = \"good\"\nentry = \"good.ts\"\nroutes = [\"/\"]\n\n[[functions]]\nname = \"nohandler\"\nentry = \"nohandler.js\"\nroutes = [\"/x\"]\n",
      ),
      (
        "good.ts",
        "export default { fetch: (_r: Request): Response => new Response('ok') };",
      ),
      ("nohandler.js", "export const answer = 42;"),
    ],
  );
  let (status, output) = run_outpost(&["check", "--config", "outpost.toml"], dir.path());
  assert!(!status.success(), "{output}");
  assert!(output.contains("function \"good\": ok"), "{output}");
  assert!(
    output.contains("function \"nohandler\": ") && output.contains("no fetch handler"),
    "{output}"
  );

  let (status, output) = run_outpost(&["check", "good.ts"], dir.path());
  assert!(status.success(), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
  let mut outpost = Outpost::start_handler(
    "slow.js",
    "export default { async fetch() { console.log('handler started'); await new Promise((r) => setTimeout(r, 1000)); return new Response('finished'); } };",
  );
  let url = outpost.url("/");
  let in_flight =
    tokio::spawn(async move { http1().get(url).send().await.unwrap().text().await.unwrap() });
  // Signal only once the handler is running, so the request is surely in flight.
  tokio::task::block_in_place(|| outpost.wait_for_log("handler started"));
  outpost.signal("TERM");
  assert_eq!(in_flight.await.unwrap(), "finished");
  let status = tokio::task::spawn_blocking(move || {
    let status = outpost.wait_exit(Duration::from_secs(20));
    (status, outpost)
  })
  .await
  .unwrap();
  assert!(status.0.success(), "exit status {:?}", status.0);
  let refused = http1().get(status.1.url("/")).send().await;
  assert!(refused.is_err(), "the listener is closed after shutdown");
}

/// Without a config file, SIGHUP re-reads the handler file; the process never dies of it.
#[tokio::test]
async fn sighup_reloads_a_single_handler_and_never_kills_the_process() {
  let mut outpost = Outpost::start_handler(
    "handler.js",
    "export default { fetch: () => new Response('one') };",
  );
  assert_eq!(outpost.get_text("/").await, "one");
  std::fs::write(
    outpost.dir().join("handler.js"),
    "export default { fetch: () => new Response('two') };",
  )
  .unwrap();
  outpost.signal("HUP");
  outpost.wait_for_log("configuration reloaded");
  assert_eq!(outpost.get_text("/").await, "two");
  // A broken save is refused; the handler that serves stays.
  std::fs::write(outpost.dir().join("handler.js"), "export default {").unwrap();
  outpost.signal("HUP");
  outpost.wait_for_log("reload rejected");
  assert_eq!(outpost.get_text("/").await, "two");
  assert!(outpost.try_exit().is_none(), "the process is still running");
}

/// Every problem of a config file in one run, each at its key: type errors, unknown keys,
/// values out of range, certificates that do not load; and imports that name no file say
/// where they are and what was probably meant.
/// A TypeScript module that throws while loading: `outpost check` names the `.ts` line and
/// column of the throw, not the transpiled JavaScript's.
#[test]
fn check_points_a_typescript_load_error_at_the_ts_source() {
  let dir = tempfile::tempdir().unwrap();
  write_files(
    dir.path(),
    &[(
      "h.ts",
      "interface A { x: number }\n\nconst a: A = { x: 1 };\nif (a.x === 1) throw new Error(\"top-level failure\");\nexport default { fetch: () => new Response(\"\") };\n",
    )],
  );
  let (status, output) = run_outpost(&["check", "h.ts"], dir.path());
  assert!(!status.success());
  assert!(output.contains("top-level failure"), "{output}");
  assert!(output.contains("h.ts:4:22"), "{output}");
}

#[test]
fn check_reports_every_problem_at_its_key_in_one_run() {
  let dir = tempfile::tempdir().unwrap();
  write_files(
    dir.path(),
    &[
      (
        "outpost.toml",
        r#"[server]
compression = true
max_header_bytes = 100
shutdown_grace_s = "soon"

[log]
format = "xml"

[[listen]]
address = "127.0.0.1:0"
tls = [ { cert = "bad.pem", key = "bad.key" } ]

[[functions]]
name = "api"
entry = "api.ts"
routes = ["/"]
limits = { cpu_ms = "fast" }
colour = "blue"

[[functions]]
name = "other"
entry = "other.js"
routes = ["/other"]
"#,
      ),
      ("bad.pem", "not a certificate"),
      ("bad.key", "not a key"),
      (
        "api.ts",
        "import { helper } from \"./helper\";\nexport default { fetch: () => new Response(helper()) };",
      ),
      ("helper.ts", "export const helper = () => 'h';"),
      (
        "other.js",
        "import \"./gone.js\";\nexport default { fetch: () => new Response('o') };",
      ),
    ],
  );
  let (status, output) = run_outpost(&["check", "--config", "outpost.toml"], dir.path());
  assert!(!status.success(), "{output}");
  for expected in [
    "outpost.toml:4:20: server.shutdown_grace_s: invalid type: string \"soon\"",
    "outpost.toml:7:10: log.format: unknown variant `xml`",
    "outpost.toml:17:21: functions[0].limits.cpu_ms: invalid type: string \"fast\"",
    "outpost.toml:18:1: functions[0].colour: unknown field `colour`",
    "outpost.toml:3:20: server.max_header_bytes: 100 is below the minimum of 8192 bytes",
    "outpost.toml:11:18: listen[0].tls[0].cert: bad.pem: cannot read certificates",
  ] {
    assert!(
      output.contains(expected),
      "{expected:?} missing from:\n{output}"
    );
  }
  assert!(!output.contains("<toml>"), "{output}");

  // The config fixed, the imports are what is left.
  write_files(
    dir.path(),
    &[(
      "outpost.toml",
      "[[listen]]\naddress = \"127.0.0.1:0\"\n\n[[functions]]\nname = \"api\"\nentry = \"api.ts\"\nroutes = [\"/\"]\n\n[[functions]]\nname = \"other\"\nentry = \"other.js\"\nroutes = [\"/other\"]\n",
    )],
  );
  let (status, output) = run_outpost(&["check", "--config", "outpost.toml"], dir.path());
  assert!(!status.success(), "{output}");
  assert!(
    output.contains("did you mean \"./helper.ts\"? Imports name the file with its extension")
      && output.contains("api.ts:1:"),
    "{output}"
  );
  assert!(
    output.contains("gone.js")
      && output.contains("(imported at file://")
      && output.contains("other.js:1:"),
    "{output}"
  );
}

/// During the drain new connections are refused while requests in flight go on; past
/// `server.shutdown_grace_s` the rest are cut off and the process exits 0. SIGINT drains as
/// SIGTERM does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_refuses_new_connections_and_ends_at_the_grace_period() {
  for signal in ["TERM", "INT"] {
    let mut outpost = Outpost::start(
      &crate::support::functions_config(
        "[server]\nshutdown_grace_s = 4",
        &[("slow", "slow.js", r#"routes = ["/"]"#)],
      ),
      &[(
        "slow.js",
        "export default { async fetch(request) { const ms = Number(new URL(request.url).searchParams.get('ms')); console.log('handler started ' + ms); await new Promise((r) => setTimeout(r, ms)); return new Response('finished'); } };",
      )],
    );
    let address = outpost.http[0];
    let short = tokio::spawn({
      let url = outpost.url("/?ms=1500");
      async move { http1().get(url).send().await.unwrap().text().await }
    });
    let long = tokio::spawn({
      let url = outpost.url("/?ms=20000");
      async move { http1().get(url).send().await?.text().await }
    });
    tokio::task::block_in_place(|| {
      outpost.wait_for_log("handler started 1500");
      outpost.wait_for_log("handler started 20000");
    });
    let signalled = std::time::Instant::now();
    outpost.signal(signal);
    tokio::task::block_in_place(|| outpost.wait_for_log("listeners closed"));
    // Draining: no new connection is accepted, though requests are still in flight.
    let refused = tokio::net::TcpStream::connect(address).await;
    assert!(
      refused.is_err(),
      "{signal}: a connection was accepted while draining"
    );
    assert_eq!(short.await.unwrap().unwrap(), "finished", "{signal}");
    // The long request is cut off at the grace period, and the process exits 0.
    assert!(
      long.await.unwrap().is_err(),
      "{signal}: the long request was not cut off"
    );
    let status = tokio::task::block_in_place(|| outpost.wait_exit(Duration::from_secs(10)));
    let took = signalled.elapsed();
    assert!(status.success(), "{signal}: {status:?}");
    assert!(
      took >= Duration::from_millis(3900) && took < Duration::from_secs(15),
      "{signal}: exited after {took:?}"
    );
  }
}

/// `outpost types` writes Outpost's declarations with the function's own `env` typed, from a
/// config's function or a bundle's manifest.json, as TypeScript that parses.
#[test]
fn types_name_the_functions_env_settings_secrets_and_services() {
  let dir = tempfile::tempdir().unwrap();
  write_files(
    dir.path(),
    &[
      ("a.js", "export default { fetch: () => new Response('') };"),
      (
        "outpost.toml",
        "[[listen]]\naddress = \"127.0.0.1:0\"\n\n[[functions]]\nname = \"api\"\nentry = \"a.js\"\nroutes = [\"/\"]\nenv = { GREETING = \"hi\", \"x-odd\" = \"1\" }\nservices = { AUTH = \"auth\" }\n\n[[functions]]\nname = \"auth\"\nentry = \"a.js\"\nroutes = [\"auth.test/\"]\n",
      ),
      (
        "bundle/manifest.json",
        r#"{"entry": "a.js", "env": {"MODE": "prod"}, "secrets": ["TOKEN"], "services": {"USERS": "users"}}"#,
      ),
    ],
  );
  let parses = |text: &str| {
    deno_ast::parse_module(deno_ast::ParseParams {
      specifier: deno_ast::ModuleSpecifier::parse("file:///outpost.d.ts").unwrap(),
      text: text.into(),
      media_type: deno_ast::MediaType::Dts,
      capture_tokens: false,
      scope_analysis: false,
      maybe_syntax: None,
    })
    .unwrap_or_else(|err| panic!("{err}\n{text}"));
  };

  let (status, output) = run_outpost(&["types", "--config", "outpost.toml"], dir.path());
  assert!(!status.success());
  assert!(output.contains("--function: api, auth"), "{output}");

  let (status, output) = run_outpost(
    &[
      "types",
      "--config",
      "outpost.toml",
      "--function",
      "api",
      "--out",
      "api.d.ts",
    ],
    dir.path(),
  );
  assert!(status.success(), "{output}");
  let text = std::fs::read_to_string(dir.path().join("api.d.ts")).unwrap();
  parses(&text);
  for line in [
    "  GREETING: string;",
    "  \"x-odd\": string;",
    "  AUTH: Fetcher;",
    "interface IncomingRequestCfProperties",
  ] {
    assert!(text.contains(line), "{line:?} in:\n{text}");
  }

  let (status, output) = run_outpost(&["types", "bundle", "--out", "bundle.d.ts"], dir.path());
  assert!(status.success(), "{output}");
  let text = std::fs::read_to_string(dir.path().join("bundle.d.ts")).unwrap();
  parses(&text);
  for line in ["  MODE: string;", "  TOKEN: string;", "  USERS: Fetcher;"] {
    assert!(text.contains(line), "{line:?} in:\n{text}");
  }
}
