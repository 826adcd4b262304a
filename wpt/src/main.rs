//! `outpost-wpt`: runs upstream Web Platform Tests inside Outpost isolates and checks the
//! results against `wpt/expectations/<suite>.json`.
//!
//! Each test file runs in a fresh isolate created exactly as a function's (see [`harness`]).
//! The run fails (exit 1) on any unexpected failure and on any unexpected pass, which means
//! the expectations must be updated (`--update`). Problems with the inputs exit 2.

mod error;
mod expectations;
mod harness;
mod report;
mod suite;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::error::WptError;
use crate::expectations::{Expectations, Verdict, VerdictKind};
use crate::harness::FileResult;
use crate::report::SuiteRow;
use crate::suite::{SUITES, TestFile};

/// Runs Web Platform Tests inside Outpost isolates.
#[derive(Debug, Parser)]
#[command(name = "outpost-wpt")]
struct Args {
  /// The WPT root to read tests from (never copied). Default: `../shared/wpt` beside the
  /// project.
  #[arg(long, value_name = "DIR", env = "OUTPOST_WPT_DIR")]
  wpt_dir: Option<PathBuf>,
  /// Where the expectation files are. Default: `wpt/expectations` in the project.
  #[arg(long, value_name = "DIR")]
  expectations: Option<PathBuf>,
  /// Run only this suite (repeatable). Default: all of them.
  #[arg(long = "suite", value_name = "NAME")]
  suites: Vec<String>,
  /// Test files to run at once. Default: the number of CPUs.
  #[arg(long)]
  jobs: Option<usize>,
  /// Wall time per test file in seconds; files marked `timeout=long` get six times as much.
  #[arg(long, default_value_t = 10)]
  timeout: u64,
  /// Rewrite the expectation files to match this run (reasons of known failures are kept).
  #[arg(long)]
  update: bool,
  /// Write the per-suite table as Markdown to this file (needs a run of every suite).
  #[arg(long, value_name = "FILE")]
  markdown: Option<PathBuf>,
  /// Write every file's and subtest's result as JSON to this file.
  #[arg(long, value_name = "FILE")]
  json: Option<PathBuf>,
  /// Print one line per test file.
  #[arg(long, short)]
  verbose: bool,
  /// Run only test files whose path contains one of these.
  filters: Vec<String>,
}

fn main() -> ExitCode {
  let args = Args::parse();
  match run(&args) {
    Ok(code) => code,
    Err(err) => {
      eprintln!("outpost-wpt: {err}");
      ExitCode::from(2)
    }
  }
}

fn project_dir() -> &'static Path {
  Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &Args) -> Result<ExitCode, WptError> {
  let root = args
    .wpt_dir
    .clone()
    .unwrap_or_else(|| project_dir().join("../../shared/wpt"));
  let root = root.canonicalize().unwrap_or(root);
  let Ok(testharness) = suite::read(&root, "resources/testharness.js") else {
    return Err(WptError::NotWpt(root));
  };
  let suites = selected_suites(&args.suites)?;
  if args.markdown.is_some() && (suites.len() != SUITES.len() || !args.filters.is_empty()) {
    return Err(WptError::PartialTable);
  }
  let expectations_dir = args
    .expectations
    .clone()
    .unwrap_or_else(|| project_dir().join("expectations"));
  let names: Vec<&str> = suites.iter().map(|(name, _)| *name).collect();
  let expectations = Expectations::load(&expectations_dir, &names)?;

  let mut tests = Vec::new();
  for (name, folder) in &suites {
    let found = suite::discover(&root, name, folder)?;
    tests.extend(found.into_iter().filter(|test| {
      args.filters.is_empty() || args.filters.iter().any(|f| test.path.contains(f.as_str()))
    }));
  }
  let jobs = args
    .jobs
    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    .max(1);
  let started = Instant::now();
  let results = run_all(&root, &testharness, &tests, jobs, args, &expectations);

  let mut out = std::io::stdout().lock();
  let mut rows = Vec::new();
  let mut unexpected: Vec<Verdict> = Vec::new();
  for (name, folder) in &suites {
    let mut row = SuiteRow::new(name, folder);
    let mut ran = BTreeSet::new();
    for result in results.iter().filter(|r| r.suite == *name) {
      let verdicts = expectations.judge(result);
      row.add(result, &verdicts);
      unexpected.extend(verdicts.into_iter().filter(|v| v.kind.is_unexpected()));
      ran.insert(result.path.clone());
    }
    if args.filters.is_empty() {
      for path in expectations.not_run(name, &ran) {
        let _ = writeln!(
          out,
          "note: {path} has expectations but is not in {}",
          root.display()
        );
      }
    }
    rows.push(row);
  }
  if !unexpected.is_empty() {
    let _ = writeln!(out, "\nunexpected results:");
    for verdict in &unexpected {
      let _ = writeln!(out, "  {}", describe(verdict));
    }
  }
  let _ = writeln!(
    out,
    "\n{}\n{} files in {:.1}s with {jobs} jobs, WPT from {}",
    report::text(&rows),
    results.len(),
    started.elapsed().as_secs_f64(),
    root.display()
  );

  if let Some(path) = &args.json {
    let text = serde_json::to_string_pretty(&results).unwrap_or_default();
    write(path, &text)?;
  }
  if let Some(path) = &args.markdown {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    // "Mon, 23 Nov 2026 22:10:00 GMT" → "23 Nov 2026".
    let date = date.get(5..16).unwrap_or(&date);
    let shown = if args.wpt_dir.is_none() {
      "../shared/wpt".to_string()
    } else {
      root.display().to_string()
    };
    write(path, &report::markdown(&rows, date, &shown))?;
    let _ = writeln!(out, "wrote {}", path.display());
  }
  if args.update {
    for name in &names {
      let suite_results: Vec<&FileResult> = results.iter().filter(|r| r.suite == *name).collect();
      let path = expectations.update(name, &suite_results)?;
      let _ = writeln!(out, "updated {}", path.display());
    }
    return Ok(ExitCode::SUCCESS);
  }
  Ok(if unexpected.is_empty() {
    ExitCode::SUCCESS
  } else {
    let _ = writeln!(
      out,
      "FAILED: {} unexpected results. Fix the runtime, or record the change with --update and \
       give each new failure a reason.",
      unexpected.len()
    );
    ExitCode::FAILURE
  })
}

fn selected_suites(wanted: &[String]) -> Result<Vec<(&'static str, &'static str)>, WptError> {
  if wanted.is_empty() {
    return Ok(SUITES.to_vec());
  }
  wanted
    .iter()
    .map(|name| {
      SUITES
        .iter()
        .find(|(suite, _)| suite == name)
        .copied()
        .ok_or_else(|| {
          let all: Vec<&str> = SUITES.iter().map(|(suite, _)| *suite).collect();
          WptError::UnknownSuite(name.clone(), all.join(", "))
        })
    })
    .collect()
}

/// Runs every test on `jobs` threads, printing files with unexpected results as they finish.
/// Returns the results in the order of `tests`.
fn run_all(
  root: &Path,
  testharness: &str,
  tests: &[TestFile],
  jobs: usize,
  args: &Args,
  expectations: &Expectations,
) -> Vec<FileResult> {
  outpost::init_v8();
  let next = AtomicUsize::new(0);
  let (done, finished) = std::sync::mpsc::channel();
  let mut results: BTreeMap<usize, FileResult> = BTreeMap::new();
  std::thread::scope(|scope| {
    for _ in 0..jobs.min(tests.len()) {
      let done = done.clone();
      let next = &next;
      scope.spawn(move || {
        loop {
          let index = next.fetch_add(1, Ordering::Relaxed);
          let Some(test) = tests.get(index) else { break };
          let factor = if test.long { 6 } else { 1 };
          let timeout = Duration::from_secs(args.timeout * factor);
          if done
            .send((index, harness::run(root, testharness, test, timeout)))
            .is_err()
          {
            break;
          }
        }
      });
    }
    drop(done);
    let mut out = std::io::stdout();
    for (index, result) in finished {
      let verdicts = expectations.judge(&result);
      let surprises = verdicts.iter().filter(|v| v.kind.is_unexpected()).count();
      if args.verbose || surprises > 0 {
        let passed = result
          .subtests
          .iter()
          .filter(|s| s.status == harness::SubtestStatus::Pass)
          .count();
        let _ = writeln!(
          out,
          "{:<60} {:>5}/{:<5} {:>6.2}s{}",
          result.path,
          passed,
          result.subtests.len(),
          result.elapsed.as_secs_f64(),
          if surprises > 0 {
            format!("  {surprises} unexpected")
          } else {
            String::new()
          }
        );
      }
      results.insert(index, result);
    }
  });
  results.into_values().collect()
}

fn describe(verdict: &Verdict) -> String {
  let what = match &verdict.kind {
    VerdictKind::UnexpectedFail(message) => format!("unexpected failure: {message}"),
    VerdictKind::UnexpectedPass => "unexpected pass: remove it from the expectations".into(),
    VerdictKind::Missing => {
      "listed as failing but the file has no such subtest: remove it from the expectations".into()
    }
    VerdictKind::ExpectedFail => "expected failure".into(),
  };
  format!("{} / {:?}: {what}", verdict.path, verdict.subtest)
}

fn write(path: &Path, text: &str) -> Result<(), WptError> {
  std::fs::write(path, text).map_err(|source| WptError::Write {
    path: path.to_path_buf(),
    source,
  })
}
