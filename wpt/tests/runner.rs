//! Tests of the `outpost-wpt` binary, run as a process: verdicts and exit codes on a tiny
//! fake WPT tree, and the real suites against the project's expectations.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The WPT copy the runner reads (`OUTPOST_WPT_DIR`, or `../shared/wpt` beside the
/// project), whose harness the fake tree borrows.
fn shared_wpt() -> PathBuf {
  let dir = std::env::var_os("OUTPOST_WPT_DIR").map_or_else(
    || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/wpt"),
    PathBuf::from,
  );
  assert!(
    dir.join("resources/testharness.js").is_file(),
    "the WPT files are expected in {} (OUTPOST_WPT_DIR, or ../shared/wpt beside the project)",
    dir.display()
  );
  dir
}

fn runner(args: &[&str]) -> Output {
  Command::new(env!("CARGO_BIN_EXE_outpost-wpt"))
    .args(args)
    .output()
    .expect("start outpost-wpt")
}

fn stdout(output: &Output) -> String {
  String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A WPT root with the real harness and a `url/` suite of the given files, plus an
/// expectations dir holding `url.json` = `expectations`.
fn fake_tree(files: &[(&str, &str)], expectations: serde_json::Value) -> tempfile::TempDir {
  let dir = tempfile::tempdir().expect("temp dir");
  let root = dir.path();
  std::fs::create_dir_all(root.join("resources")).unwrap();
  std::fs::copy(
    shared_wpt().join("resources/testharness.js"),
    root.join("resources/testharness.js"),
  )
  .unwrap();
  for (path, source) in files {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, source).unwrap();
  }
  std::fs::create_dir_all(root.join("expectations")).unwrap();
  std::fs::write(root.join("expectations/url.json"), expectations.to_string()).unwrap();
  dir
}

fn run_fake(tree: &tempfile::TempDir, extra: &[&str]) -> Output {
  let root = tree.path().to_str().unwrap();
  let expectations = tree.path().join("expectations");
  let mut args = vec![
    "--wpt-dir",
    root,
    "--expectations",
    expectations.to_str().unwrap(),
    "--suite",
    "url",
    "--timeout",
    "2",
  ];
  args.extend_from_slice(extra);
  runner(&args)
}

const PASS: &str =
  r#"test(() => assert_equals(new URL("http://a/b/../c").pathname, "/c"), "resolves dots");"#;
const FAIL: &str = r#"test(() => assert_equals(1 + 1, 3), "arithmetic is off");"#;

#[test]
fn expected_results_exit_zero_and_count_in_the_table() {
  let tree = fake_tree(
    &[
      ("url/pass.any.js", PASS),
      ("url/fail.any.js", FAIL),
      // META scripts, titles and JSON fixtures, as upstream tests use them.
      (
        "url/meta.any.js",
        "// META: script=resources/helper.js\n\
         promise_test(async () => {\n\
           assert_equals(helperValue, 42);\n\
           const data = await fetch_json(\"resources/data.json\");\n\
           assert_array_equals(data, [1, 2]);\n\
         }, \"helper and fixture\");",
      ),
      ("url/resources/helper.js", "var helperValue = 42;"),
      ("url/resources/data.json", "[1, 2]"),
      // Written for documents only: skipped, not failed.
      (
        "url/window-only.any.js",
        "// META: global=window\ntest(() => assert_true(false), \"never runs\");",
      ),
    ],
    serde_json::json!({ "url/fail.any.js": { "arithmetic is off": "a known failure" } }),
  );
  let output = run_fake(&tree, &[]);
  let out = stdout(&output);
  assert_eq!(output.status.code(), Some(0), "{out}");
  let row = out
    .lines()
    .find(|l| l.starts_with("url "))
    .expect("a url row");
  let cells: Vec<&str> = row.split_whitespace().collect();
  // suite, files, incomplete, passed, "/", total, rate, expected, unexpected
  assert_eq!(
    cells,
    ["url", "3", "0", "2", "/", "3", "66.7%", "1", "0"],
    "{out}"
  );
}

#[test]
fn an_unexpected_pass_fails_the_run_and_says_to_update() {
  let tree = fake_tree(
    &[("url/pass.any.js", PASS)],
    serde_json::json!({ "url/pass.any.js": { "resolves dots": "thought broken" } }),
  );
  let output = run_fake(&tree, &[]);
  let out = stdout(&output);
  assert_eq!(output.status.code(), Some(1), "{out}");
  assert!(
    out.contains(r#"url/pass.any.js / "resolves dots": unexpected pass"#),
    "{out}"
  );
}

#[test]
fn unexpected_failures_harness_errors_and_timeouts_fail_the_run() {
  let tree = fake_tree(
    &[
      ("url/fail.any.js", FAIL),
      (
        "url/throws.any.js",
        "test(() => {}, \"fine\");\nthrow new Error(\"broken file\");",
      ),
      (
        "url/hangs.any.js",
        "promise_test(() => new Promise(() => setInterval(() => {}, 100)), \"waits forever\");",
      ),
      (
        "url/spins.any.js",
        "test(() => { while (true) {} }, \"never yields\");",
      ),
    ],
    serde_json::json!({}),
  );
  let output = run_fake(&tree, &[]);
  let out = stdout(&output);
  assert_eq!(output.status.code(), Some(1), "{out}");
  for expected in [
    r#"url/fail.any.js / "arithmetic is off": unexpected failure: FAIL: assert_equals: expected 3 but got 2"#,
    r#"url/throws.any.js / "(harness)": unexpected failure: ERROR: Error: broken file"#,
    r#"url/hangs.any.js / "(harness)": unexpected failure: TIMEOUT: not complete after 2s"#,
    r#"url/spins.any.js / "(harness)": unexpected failure: TIMEOUT: terminated after 3s"#,
  ] {
    assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
  }
}

#[test]
fn update_records_failures_and_keeps_known_reasons() {
  let tree = fake_tree(
    &[
      ("url/fail.any.js", FAIL),
      (
        "url/more.any.js",
        r#"test(() => assert_true(false, "nope"), "new failure");"#,
      ),
    ],
    serde_json::json!({ "url/fail.any.js": { "arithmetic is off": "a known failure" } }),
  );
  let output = run_fake(&tree, &["--update"]);
  assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
  let written = std::fs::read_to_string(tree.path().join("expectations/url.json")).unwrap();
  let written: serde_json::Value = serde_json::from_str(&written).unwrap();
  assert_eq!(
    written,
    serde_json::json!({
      "url/fail.any.js": { "arithmetic is off": "a known failure" },
      "url/more.any.js": { "new failure": "FAIL: assert_true: nope expected true got false" },
    })
  );
  // The updated file now matches the run.
  assert_eq!(run_fake(&tree, &[]).status.code(), Some(0));
}

#[test]
fn bad_inputs_exit_two_with_what_to_fix() {
  let tree = fake_tree(
    &[("url/pass.any.js", PASS)],
    serde_json::json!({ "url/pass.any.js": { "resolves dots": "" } }),
  );
  let output = run_fake(&tree, &[]);
  let err = String::from_utf8_lossy(&output.stderr);
  assert_eq!(output.status.code(), Some(2), "{err}");
  assert!(
    err.contains("url.json") && err.contains("one non-empty line"),
    "{err}"
  );

  let output = runner(&["--wpt-dir", tree.path().join("url").to_str().unwrap()]);
  let err = String::from_utf8_lossy(&output.stderr);
  assert_eq!(output.status.code(), Some(2), "{err}");
  assert!(err.contains("no resources/testharness.js"), "{err}");

  let output = runner(&["--suite", "nope"]);
  let err = String::from_utf8_lossy(&output.stderr);
  assert_eq!(output.status.code(), Some(2), "{err}");
  assert!(err.contains("unknown suite \"nope\""), "{err}");
}

/// The real run: every suite in `../shared/wpt` against `wpt/expectations`.
#[test]
fn upstream_suites_match_their_expectations() {
  shared_wpt();
  let output = runner(&[]);
  let out = stdout(&output);
  // Shown by `cargo test -- --nocapture`, and on failure.
  eprintln!("{out}");
  assert_eq!(output.status.code(), Some(0), "{out}");
  assert!(out.contains("total"), "{out}");
}
