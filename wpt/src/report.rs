//! The per-suite table, as text for the terminal and as the Markdown of
//! `docs/conformance.md`.

use std::fmt::Write as _;

use crate::expectations::{Verdict, VerdictKind};
use crate::harness::{FileResult, HarnessOutcome, SubtestStatus};

/// One suite's counts.
#[derive(Debug, Default, Clone)]
pub struct SuiteRow {
  pub suite: String,
  pub folder: String,
  /// Test files run (not counting skipped ones).
  pub files: usize,
  /// Files written for `window` only.
  pub skipped: usize,
  /// Files whose harness did not complete cleanly (a script threw, an error, a timeout).
  pub incomplete: usize,
  pub passed: usize,
  pub subtests: usize,
  pub expected_failures: usize,
  pub unexpected: usize,
}

impl SuiteRow {
  pub fn new(suite: &str, folder: &str) -> SuiteRow {
    SuiteRow {
      suite: suite.into(),
      folder: folder.into(),
      ..SuiteRow::default()
    }
  }

  pub fn add(&mut self, result: &FileResult, verdicts: &[Verdict]) {
    match result.harness {
      HarnessOutcome::Skipped => {
        self.skipped += 1;
        return;
      }
      HarnessOutcome::Ok => {}
      HarnessOutcome::Error(_) | HarnessOutcome::Timeout(_) => self.incomplete += 1,
    }
    self.files += 1;
    self.subtests += result.subtests.len();
    self.passed += result
      .subtests
      .iter()
      .filter(|s| s.status == SubtestStatus::Pass)
      .count();
    for verdict in verdicts {
      if verdict.kind == VerdictKind::ExpectedFail {
        self.expected_failures += 1;
      } else {
        self.unexpected += 1;
      }
    }
  }

  fn rate(&self) -> String {
    if self.subtests == 0 {
      return "–".into();
    }
    format!("{:.1}%", self.passed as f64 * 100.0 / self.subtests as f64)
  }
}

/// The sum of all rows.
pub fn total(rows: &[SuiteRow]) -> SuiteRow {
  let mut total = SuiteRow::new("total", "");
  for row in rows {
    total.files += row.files;
    total.skipped += row.skipped;
    total.incomplete += row.incomplete;
    total.passed += row.passed;
    total.subtests += row.subtests;
    total.expected_failures += row.expected_failures;
    total.unexpected += row.unexpected;
  }
  total
}

/// A fixed-width table for the terminal.
pub fn text(rows: &[SuiteRow]) -> String {
  let mut out = String::new();
  let _ = writeln!(
    out,
    "{:<18} {:>6} {:>11} {:>19} {:>7} {:>9} {:>10}",
    "suite", "files", "incomplete", "subtests passed", "rate", "expected", "unexpected"
  );
  let total = total(rows);
  for row in rows.iter().chain([&total]) {
    let _ = writeln!(
      out,
      "{:<18} {:>6} {:>11} {:>19} {:>7} {:>9} {:>10}",
      row.suite,
      row.files,
      row.incomplete,
      format!("{} / {}", row.passed, row.subtests),
      row.rate(),
      row.expected_failures,
      row.unexpected
    );
  }
  out
}

/// The Markdown page: how to regenerate it, then the table.
pub fn markdown(rows: &[SuiteRow], date: &str, wpt_dir: &str) -> String {
  let mut out = String::new();
  let _ = writeln!(out, "# Web Platform Tests conformance\n");
  let _ = writeln!(
    out,
    "Upstream WPT files run inside Outpost isolates (the production snapshot, extensions and \
     globals) by the runner in `wpt/`. Every subtest that fails is listed, with the reason, in \
     `wpt/expectations/<suite>.json`; the test command fails when a result differs from them.\n"
  );
  let _ = writeln!(
    out,
    "Generated on {date} from the WPT files in `{wpt_dir}` by:\n\n```sh\ncargo run --release -p outpost-wpt -- --markdown docs/conformance.md\n```\n"
  );
  let _ = writeln!(
    out,
    "| suite | WPT folder | files | incomplete files | subtests passed | pass rate |"
  );
  let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
  let total = total(rows);
  for row in rows.iter().chain([&total]) {
    let folder = if row.folder.is_empty() {
      String::new()
    } else {
      format!("`{}`", row.folder)
    };
    let _ = writeln!(
      out,
      "| {} | {} | {} | {} | {} / {} | {} |",
      row.suite,
      folder,
      row.files,
      row.incomplete,
      row.passed,
      row.subtests,
      row.rate()
    );
  }
  let _ = writeln!(
    out,
    "\n*Incomplete files* threw while loading, reported a harness error or timed out; their \
     subtests that did run are counted. Files written for `window` only are not run."
  );
  out
}
