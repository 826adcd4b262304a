//! Handlers have no ambient authority: no Deno namespace, no files, environment, processes
//! or sockets. Each attempt must fail; the handler reports how.

use crate::support::Outpost;

const PROBE: &str = r#"
const attempts = {
  "Deno": () => Deno.readTextFileSync("/etc/passwd"),
  "globalThis.Deno": () => globalThis["De" + "no"].env.get("HOME"),
  "process": () => process.env.HOME,
  "require": () => require("fs"),
  "__bootstrap": () => globalThis.__bootstrap.core.ops,
  "import file": () => import("file:///etc/passwd"),
  "import node:fs": () => import("node:fs"),
  "import outside": () => import("../outside.js"),
  "import https": () => import("https://example.com/mod.js"),
  "fetch file": () => fetch("file:///etc/passwd"),
  "Function constructor": () => new Function("return Deno")(),
};

export default {
  async fetch() {
    const results = {};
    for (const [name, attempt] of Object.entries(attempts)) {
      try {
        await attempt();
        results[name] = "ALLOWED";
      } catch (error) {
        results[name] = `${error?.name}: ${error?.message}`;
      }
    }
    return Response.json(results);
  },
};
"#;

#[tokio::test]
async fn handlers_cannot_reach_files_environment_processes_or_deno() {
  let outpost = Outpost::start(
    &crate::support::functions_config("", &[("probe", "fn/probe.js", "routes = [\"/\"]")]),
    &[
      ("fn/probe.js", PROBE),
      ("outside.js", "export const secret = 1;"),
    ],
  );
  let results: serde_json::Value = serde_json::from_str(&outpost.get_text("/").await).unwrap();
  let results = results.as_object().unwrap();
  assert_eq!(results.len(), 11);
  for (attempt, outcome) in results {
    let outcome = outcome.as_str().unwrap();
    assert_ne!(outcome, "ALLOWED", "{attempt} succeeded");
  }
  assert!(
    results["import outside"]
      .as_str()
      .unwrap()
      .contains("may only import files under")
  );
  assert!(
    results["import file"]
      .as_str()
      .unwrap()
      .contains("may only import files under")
  );
  assert!(
    results["import node:fs"]
      .as_str()
      .unwrap()
      .contains("only files of the function")
  );
  assert!(
    results["Deno"]
      .as_str()
      .unwrap()
      .starts_with("ReferenceError")
  );
}
