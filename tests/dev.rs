//! `outpost dev`: every save of a function's files is served, a save that does not load
//! leaves the last good version serving with the error printed, `--cf` sets `request.cf`.

use crate::support::{Outpost, run_outpost};

fn handler(version: &str) -> String {
  format!(
    "export default {{ fetch: (request: Request): Response => new Response(`{version} ${{request.cf.country}} ${{request.cf.city}}`) }};\n"
  )
}

#[tokio::test]
async fn dev_serves_each_save_and_keeps_the_last_good_version_through_a_broken_one() {
  let dir = tempfile::tempdir().unwrap();
  let file = dir.path().join("handler.ts");
  std::fs::write(&file, handler("v1")).unwrap();
  let path = dir.path().display().to_string();
  let outpost = Outpost::start_dev(
    dir,
    &[
      &path,
      "--listen",
      "127.0.0.1:0",
      "--cf",
      "country=DE,city=Berlin",
    ],
  );
  assert_eq!(outpost.get_text("/").await, "v1 DE Berlin");

  std::fs::write(&file, handler("v2")).unwrap();
  outpost
    .wait_for_text("/", "v2 DE Berlin", "the save of v2 was never served")
    .await;

  // A save that does not compile: the error names the file, line and column; v2 serves on.
  std::fs::write(&file, "export default {\n  fetch(: Request) {}\n};\n").unwrap();
  let logs = outpost.wait_for_log("the change does not load");
  assert!(logs.contains("handler.ts:2:"), "{logs}");
  assert_eq!(outpost.get_text("/").await, "v2 DE Berlin");

  std::fs::write(&file, handler("v3")).unwrap();
  outpost
    .wait_for_text("/", "v3 DE Berlin", "the fixed save was never served")
    .await;
}

#[test]
fn dev_refuses_a_request_cf_field_outpost_does_not_fill() {
  let dir = tempfile::tempdir().unwrap();
  std::fs::write(
    dir.path().join("index.js"),
    "export default { fetch: () => new Response('') };",
  )
  .unwrap();
  let (status, output) = run_outpost(&["dev", ".", "--cf", "planet=Mars"], dir.path());
  assert!(!status.success());
  assert!(
    output.contains("\"planet\" is not a request.cf field") && output.contains("country"),
    "{output}"
  );
}

/// Every `outpost init` template serves under `outpost dev` as written, and answers what its
/// README says; a second init into the same directory writes nothing.
#[tokio::test]
async fn every_init_template_serves_under_dev() {
  for (template, path, expected) in [
    ("hello", "/hello", "Hello from /hello at this machine"),
    ("router", "/items/1", r#"{"id":"1","name":"first"}"#),
    ("cache", "/page", "rendered /page"),
    ("geo", "/", "Welcome to the DE page (you are in Berlin)"),
  ] {
    let dir = tempfile::tempdir().unwrap();
    let (status, output) = run_outpost(&["init", "fn", "--template", template], dir.path());
    assert!(status.success(), "{template}: {output}");
    let (again, refused) = run_outpost(&["init", "fn", "--template", template], dir.path());
    assert!(
      !again.success() && refused.contains("exists already"),
      "{refused}"
    );
    let function = dir.path().join("fn").display().to_string();
    let outpost = Outpost::start_dev(
      dir,
      &[
        &function,
        "--listen",
        "127.0.0.1:0",
        "--cf",
        "country=DE,city=Berlin",
      ],
    );
    let body = outpost.get_text(path).await;
    assert!(body.contains(expected), "{template}: {body}");
  }
}
