//! Runs one WPT test file in a fresh Outpost isolate: the production snapshot, extensions and
//! bootstrap (`outpost::isolate::BlankIsolate`), so the test sees exactly the globals a
//! handler sees. The runner only adds the WPT glue around the test's own scripts.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use deno_core::{JsRuntime, PollEventLoopOptions, serde_v8, v8};
use outpost::isolate::{BlankIsolate, IsolateSettings};
use outpost::limits::egress::EgressPolicy;
use serde::{Deserialize, Serialize};

use crate::suite::{self, TestFile};

/// Heap an isolate running a test may use (some suites build large test tables).
const MAX_HEAP: usize = 512 << 20;

const ENVIRONMENT_JS: &str = include_str!("../js/01_environment.js");
const REPORTER_JS: &str = include_str!("../js/02_reporter.js");

/// A subtest's status, as testharness.js numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "u8", into = "u8")]
pub enum SubtestStatus {
  Pass,
  Fail,
  Timeout,
  NotRun,
  PreconditionFailed,
}

impl From<u8> for SubtestStatus {
  fn from(status: u8) -> Self {
    match status {
      0 => SubtestStatus::Pass,
      1 => SubtestStatus::Fail,
      2 => SubtestStatus::Timeout,
      3 => SubtestStatus::NotRun,
      _ => SubtestStatus::PreconditionFailed,
    }
  }
}

impl From<SubtestStatus> for u8 {
  fn from(status: SubtestStatus) -> u8 {
    status as u8
  }
}

impl SubtestStatus {
  pub fn label(self) -> &'static str {
    match self {
      SubtestStatus::Pass => "PASS",
      SubtestStatus::Fail => "FAIL",
      SubtestStatus::Timeout => "TIMEOUT",
      SubtestStatus::NotRun => "NOTRUN",
      SubtestStatus::PreconditionFailed => "PRECONDITION_FAILED",
    }
  }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Subtest {
  pub name: String,
  pub status: SubtestStatus,
  pub message: Option<String>,
}

/// How the file as a whole went: whether its scripts ran and the harness completed.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", content = "message")]
pub enum HarnessOutcome {
  Ok,
  /// A script threw, or the harness reported an error.
  Error(String),
  /// The harness had not completed when the file's time was up.
  Timeout(String),
  /// The file's `global=` list has no scope like an isolate's.
  Skipped,
}

/// Everything one file produced.
#[derive(Debug, Clone, Serialize)]
pub struct FileResult {
  pub suite: &'static str,
  pub path: String,
  pub harness: HarnessOutcome,
  pub subtests: Vec<Subtest>,
  #[serde(skip)]
  pub elapsed: Duration,
}

/// `__wpt.finished`'s value.
#[derive(Deserialize)]
struct Completion {
  status: u8,
  message: Option<String>,
}

/// Runs `test` from `root` with `testharness` (the text of `resources/testharness.js`) on the
/// calling thread (which gets its own tokio runtime), giving it `timeout` of wall time.
pub fn run(root: &Path, testharness: &str, test: &TestFile, timeout: Duration) -> FileResult {
  let started = Instant::now();
  let mut result = FileResult {
    suite: test.suite,
    path: test.path.clone(),
    harness: HarnessOutcome::Ok,
    subtests: Vec::new(),
    elapsed: Duration::ZERO,
  };
  if !test.runs_here {
    result.harness = HarnessOutcome::Skipped;
    return result;
  }
  let tokio = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build();
  result.harness = match tokio {
    Ok(tokio) => {
      let running = run_in_isolate(root, testharness, test, timeout, &mut result.subtests);
      tokio.block_on(running)
    }
    Err(err) => HarnessOutcome::Error(format!("cannot start a tokio runtime: {err}")),
  };
  result.elapsed = started.elapsed();
  result
}

async fn run_in_isolate(
  root: &Path,
  testharness: &str,
  test: &TestFile,
  timeout: Duration,
  subtests: &mut Vec<Subtest>,
) -> HarnessOutcome {
  let settings = IsolateSettings {
    max_heap: MAX_HEAP,
    cache: None,
    services: Arc::new(outpost_ext_dispatch::NoServices),
    load_timeout: timeout,
  };
  let isolate = match BlankIsolate::new(&settings) {
    Ok(isolate) => isolate,
    Err(err) => return HarnessOutcome::Error(format!("cannot create the isolate: {err}")),
  };
  // One isolate on this thread and nothing else: it stays entered.
  let mut runtime = isolate.into_runtime();
  let runtime = &mut runtime;
  // What a function with default egress settings gets; deno_fetch needs permissions in state.
  match EgressPolicy::default().permissions() {
    Ok(permissions) => runtime.op_state().borrow_mut().put(permissions),
    Err(err) => return HarnessOutcome::Error(err.to_string()),
  }
  // A test that never yields is terminated; one that waits forever is timed out below.
  let (_disarm, armed) = mpsc::channel::<()>();
  let handle = runtime.v8_isolate().thread_safe_handle();
  let deadline = timeout + Duration::from_secs(1);
  let terminated = Arc::new(AtomicBool::new(false));
  let terminating = terminated.clone();
  std::thread::spawn(move || {
    if armed.recv_timeout(deadline) == Err(mpsc::RecvTimeoutError::Timeout) {
      terminating.store(true, Ordering::SeqCst);
      handle.terminate_execution();
    }
  });
  let spun = || HarnessOutcome::Timeout(format!("terminated after {deadline:?} without yielding"));

  let mut outcome = match load_scripts(root, testharness, test, runtime) {
    Ok(()) => HarnessOutcome::Ok,
    Err(err) => HarnessOutcome::Error(err),
  };
  let waited = if terminated.load(Ordering::SeqCst) {
    None
  } else {
    let finished = match runtime.execute_script("[wpt]", "__wpt.finished") {
      Ok(finished) => runtime.resolve(finished),
      Err(err) => return HarnessOutcome::Error(err.to_string()),
    };
    let options = PollEventLoopOptions::default();
    let waiting = runtime.with_event_loop_promise(finished, options);
    Some(tokio::time::timeout(timeout, waiting).await)
  };
  runtime.v8_isolate().cancel_terminate_execution();
  match read_subtests(runtime) {
    Ok(read) => *subtests = read,
    Err(err) => return HarnessOutcome::Error(format!("cannot read the results: {err}")),
  }
  let harness = match waited {
    _ if terminated.load(Ordering::SeqCst) => return spun(),
    None => return spun(),
    Some(Err(_)) => HarnessOutcome::Timeout(format!("not complete after {timeout:?}")),
    Some(Ok(Err(err))) => HarnessOutcome::Error(first_line(&err.to_string())),
    Some(Ok(Ok(completion))) => completion_outcome(runtime, completion),
  };
  // A script error outranks what the harness made of the tests that did load.
  if matches!(outcome, HarnessOutcome::Ok) {
    outcome = harness;
  }
  outcome
}

/// Runs the glue, the harness, the META scripts and the test, then tells the harness that
/// everything is loaded (the `install` event a service worker gets, since an isolate's
/// global scope is a `ServiceWorkerGlobalScope`). Returns the first script error.
fn load_scripts(
  root: &Path,
  testharness: &str,
  test: &TestFile,
  runtime: &mut JsRuntime,
) -> Result<(), String> {
  // A helper that cannot be read is an error of the file, but the harness still loads so
  // that the subtests that do not need it report.
  let mut first_error = None;
  let mut helpers = Vec::new();
  for script in &test.scripts {
    match suite::read(root, script) {
      Ok(source) => helpers.push((script.clone(), source)),
      Err(err) => {
        first_error.get_or_insert_with(|| err.to_string());
      }
    }
  }
  let mut sources: Vec<&str> = helpers.iter().map(|(_, s)| s.as_str()).collect();
  sources.push(&test.source);
  let fixtures = suite::fixtures(root, &test.path, &sources).map_err(|err| err.to_string())?;
  let config = serde_json::json!({ "url": test.url(), "fixtures": fixtures });
  let mut scripts = vec![
    (
      "[wpt-config]".to_string(),
      format!("globalThis.__wptConfig = {config};"),
    ),
    (
      "[wpt]/01_environment.js".to_string(),
      ENVIRONMENT_JS.to_string(),
    ),
  ];
  if let Some(title) = &test.title {
    scripts.push((
      "[wpt-title]".into(),
      format!("globalThis.META_TITLE = {};", json(title)),
    ));
  }
  scripts.push(("/resources/testharness.js".into(), testharness.to_string()));
  scripts.push(("[wpt]/02_reporter.js".into(), REPORTER_JS.to_string()));
  scripts.extend(helpers.into_iter().map(|(path, s)| (format!("/{path}"), s)));
  scripts.push((format!("/{}", test.path), test.source.clone()));
  for (name, source) in scripts {
    if let Err(err) = runtime.execute_script(format!("{}{name}", suite::ORIGIN), source) {
      first_error.get_or_insert_with(|| first_line(&err.to_string()));
    }
  }
  runtime
    .execute_script("[wpt]", r#"self.dispatchEvent(new Event("install"));"#)
    .map_err(|err| err.to_string())?;
  first_error.map_or(Ok(()), Err)
}

fn completion_outcome(
  runtime: &mut JsRuntime,
  completion: v8::Global<v8::Value>,
) -> HarnessOutcome {
  deno_core::scope!(scope, runtime);
  let value = v8::Local::new(scope, completion);
  match serde_v8::from_v8::<Completion>(scope, value) {
    Ok(Completion { status: 0, .. }) => HarnessOutcome::Ok,
    Ok(Completion { status: 2, message }) => {
      HarnessOutcome::Timeout(message.unwrap_or_else(|| "harness timeout".into()))
    }
    Ok(Completion { message, .. }) => {
      HarnessOutcome::Error(message.unwrap_or_else(|| "harness error".into()))
    }
    Err(err) => HarnessOutcome::Error(format!("unreadable harness status: {err}")),
  }
}

fn read_subtests(runtime: &mut JsRuntime) -> Result<Vec<Subtest>, String> {
  let subtests = runtime
    .execute_script("[wpt]", "__wpt.subtests")
    .map_err(|err| err.to_string())?;
  deno_core::scope!(scope, runtime);
  let value = v8::Local::new(scope, subtests);
  serde_v8::from_v8(scope, value).map_err(|err| err.to_string())
}

fn json(text: &str) -> String {
  serde_json::Value::String(text.to_string()).to_string()
}

/// The first line of an error, for one-line reports.
pub fn first_line(text: &str) -> String {
  text.lines().next().unwrap_or_default().trim().to_string()
}
