//! The runner's error type: problems with its inputs, as opposed to test failures.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WptError {
  #[error("cannot read {path}: {source}")]
  Read {
    path: PathBuf,
    source: std::io::Error,
  },
  #[error("cannot write {path}: {source}")]
  Write {
    path: PathBuf,
    source: std::io::Error,
  },
  #[error("{path}: {reason}")]
  Expectations { path: PathBuf, reason: String },
  #[error("{0} has no resources/testharness.js: is it a WPT checkout? Point --wpt-dir at one")]
  NotWpt(PathBuf),
  #[error("--markdown writes the table of a full run: drop --suite and the file filters")]
  PartialTable,
  #[error("unknown suite {0:?}; the suites are: {1}")]
  UnknownSuite(String, String),
}
