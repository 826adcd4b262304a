//! Expected failures (`wpt/expectations/<suite>.json`) and the verdicts they give results.
//!
//! A file maps test paths (below the WPT root) to the subtests expected to fail there, each
//! with a one-line reason. The key `(harness)` stands for the file as a whole: a script that
//! throws, a harness error or a timeout.
//!
//! ```json
//! { "url/url-setters.any.js": { "Setting <a:b>.protocol = 'c'": "why it fails" } }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::WptError;
use crate::harness::{FileResult, HarnessOutcome, SubtestStatus, first_line};

/// The key for the file as a whole.
pub const HARNESS: &str = "(harness)";

/// Test path → subtest (or [`HARNESS`]) → reason.
pub type SuiteExpectations = BTreeMap<String, BTreeMap<String, String>>;

/// Expectation files, by suite name.
#[derive(Debug, Default)]
pub struct Expectations {
  dir: PathBuf,
  suites: BTreeMap<String, SuiteExpectations>,
}

impl Expectations {
  /// Reads `<dir>/<suite>.json` for each suite; a missing file expects every test to pass.
  pub fn load(dir: &Path, suites: &[&str]) -> Result<Expectations, WptError> {
    let mut loaded = BTreeMap::new();
    for suite in suites {
      let path = file(dir, suite);
      let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
        Err(source) => return Err(WptError::Read { path, source }),
      };
      let expectations: SuiteExpectations =
        serde_json::from_str(&text).map_err(|err| WptError::Expectations {
          path: path.clone(),
          reason: format!(
            "line {} column {}: {err} (expected {{\"test path\": {{\"subtest name\": \"reason\"}}}})",
            err.line(),
            err.column()
          ),
        })?;
      for (test, subtests) in &expectations {
        for (subtest, reason) in subtests {
          if reason.trim().is_empty() || reason.contains('\n') {
            return Err(WptError::Expectations {
              path: path.clone(),
              reason: format!(
                "{test:?} / {subtest:?}: the reason must be one non-empty line, say why it fails"
              ),
            });
          }
        }
      }
      loaded.insert(suite.to_string(), expectations);
    }
    Ok(Expectations {
      dir: dir.to_path_buf(),
      suites: loaded,
    })
  }

  fn expected(&self, suite: &str, path: &str) -> Option<&BTreeMap<String, String>> {
    self.suites.get(suite)?.get(path)
  }

  /// The verdicts for one file's results.
  pub fn judge(&self, result: &FileResult) -> Vec<Verdict> {
    let empty = BTreeMap::new();
    let expected = self.expected(result.suite, &result.path).unwrap_or(&empty);
    let mut verdicts = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (name, failure) in outcomes(result) {
      let kind = match (failure, expected.contains_key(&name)) {
        (None, false) => None,
        (None, true) => Some(VerdictKind::UnexpectedPass),
        (Some(_), true) => Some(VerdictKind::ExpectedFail),
        (Some(message), false) => Some(VerdictKind::UnexpectedFail(message)),
      };
      if let Some(kind) = kind {
        verdicts.push(Verdict {
          path: result.path.clone(),
          subtest: name.clone(),
          kind,
        });
      }
      seen.insert(name);
    }
    // Subtests that are expected to fail but did not run at all are stale entries, unless
    // the file could not complete (then later subtests may simply not have been reached).
    if matches!(result.harness, HarnessOutcome::Ok) {
      for name in expected.keys().filter(|name| !seen.contains(*name)) {
        verdicts.push(Verdict {
          path: result.path.clone(),
          subtest: name.clone(),
          kind: VerdictKind::Missing,
        });
      }
    }
    verdicts
  }

  /// Test paths with expectations that no run result covers: files absent from the WPT dir.
  pub fn not_run<'a>(
    &'a self,
    suite: &str,
    ran: &'a std::collections::BTreeSet<String>,
  ) -> impl Iterator<Item = &'a String> + 'a {
    self
      .suites
      .get(suite)
      .into_iter()
      .flat_map(|tests| tests.keys())
      .filter(|path| !ran.contains(*path))
  }

  /// Rewrites `suite`'s file to expect exactly the failures in `results`, keeping the reason
  /// of every failure already listed; new ones get their failure message as reason.
  /// Expectations of tests that did not run are kept.
  pub fn update(&self, suite: &str, results: &[&FileResult]) -> Result<PathBuf, WptError> {
    let mut updated = self.suites.get(suite).cloned().unwrap_or_default();
    for result in results {
      let old = updated.remove(&result.path).unwrap_or_default();
      let failing: BTreeMap<String, String> = outcomes(result)
        .into_iter()
        .filter_map(|(name, failure)| {
          let reason = old.get(&name).cloned().unwrap_or(failure?);
          Some((name, reason))
        })
        .collect();
      if !failing.is_empty() {
        updated.insert(result.path.clone(), failing);
      }
    }
    let path = file(&self.dir, suite);
    let mut text =
      serde_json::to_string_pretty(&updated).map_err(|err| WptError::Expectations {
        path: path.clone(),
        reason: err.to_string(),
      })?;
    text.push('\n');
    std::fs::write(&path, text).map_err(|source| WptError::Write {
      path: path.clone(),
      source,
    })?;
    Ok(path)
  }
}

/// Every subtest of a result, and [`HARNESS`] for the file, each with a one-line failure
/// message when it did not pass.
fn outcomes(result: &FileResult) -> Vec<(String, Option<String>)> {
  let harness = match &result.harness {
    HarnessOutcome::Ok | HarnessOutcome::Skipped => None,
    HarnessOutcome::Error(message) => Some(format!("ERROR: {}", first_line(message))),
    HarnessOutcome::Timeout(message) => Some(format!("TIMEOUT: {}", first_line(message))),
  };
  let subtests = result.subtests.iter().map(|subtest| {
    let failure = (subtest.status != SubtestStatus::Pass).then(|| {
      let message = subtest.message.as_deref().unwrap_or_default();
      let message = first_line(message);
      // Messages can quote whole bodies; a reason is one readable line.
      let message = match message.char_indices().nth(160) {
        Some((cut, _)) => format!("{}…", &message[..cut]),
        None => message,
      };
      format!("{}: {message}", subtest.status.label())
    });
    (subtest.name.clone(), failure)
  });
  std::iter::once((HARNESS.to_string(), harness))
    .chain(subtests)
    .collect()
}

fn file(dir: &Path, suite: &str) -> PathBuf {
  dir.join(format!("{suite}.json"))
}

/// A result that needs a word: anything but a pass nobody expected to fail.
#[derive(Debug, Clone)]
pub struct Verdict {
  pub path: String,
  pub subtest: String,
  pub kind: VerdictKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerdictKind {
  /// Listed as failing, and failed.
  ExpectedFail,
  /// Failed (with this message) and not listed.
  UnexpectedFail(String),
  /// Listed as failing, but passed: the expectations file must be updated.
  UnexpectedPass,
  /// Listed as failing, but the file has no such subtest any more.
  Missing,
}

impl VerdictKind {
  /// Whether this verdict fails the run.
  pub fn is_unexpected(&self) -> bool {
    !matches!(self, VerdictKind::ExpectedFail)
  }
}
