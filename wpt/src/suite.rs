//! Which WPT files make up each suite, and what a test file asks for in its `// META:` lines.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use regex::Regex;

use crate::error::WptError;

/// The suites the runner knows: name (also the name of its expectations file) and the
/// folder below the WPT root whose `*.any.js` files it runs.
pub const SUITES: &[(&str, &str)] = &[
  ("url", "url"),
  ("encoding", "encoding"),
  ("fetch-api", "fetch/api"),
  ("streams", "streams"),
  ("compression", "compression"),
  ("dom-events", "dom/events"),
  ("dom-abort", "dom/abort"),
  ("timers", "html/webappapis/timers"),
  ("base64", "html/webappapis/atob"),
  ("structured-clone", "html/webappapis/structured-clone"),
  ("FileAPI", "FileAPI"),
  ("xhr-formdata", "xhr/formdata"),
  ("urlpattern", "urlpattern"),
  ("hr-time", "hr-time"),
  ("console", "console"),
  ("WebCryptoAPI", "WebCryptoAPI"),
];

/// One test file and what its META lines ask for.
#[derive(Debug, Clone)]
pub struct TestFile {
  pub suite: &'static str,
  /// Path below the WPT root, with `/` separators: `url/url-setters.any.js`.
  pub path: String,
  /// Helper scripts to run first, as paths below the WPT root, in order.
  pub scripts: Vec<String>,
  /// `// META: timeout=long`.
  pub long: bool,
  /// `// META: title=...`.
  pub title: Option<String>,
  /// Whether the file's `global=` list has a scope like ours (a worker or a shell); files
  /// written for `window` only are skipped.
  pub runs_here: bool,
  /// The file's text, read once when it was found.
  pub source: String,
}

/// The test files of `suite` under `root`, sorted by path. A suite whose folder is missing
/// has none.
pub fn discover(root: &Path, suite: &'static str, folder: &str) -> Result<Vec<TestFile>, WptError> {
  let mut paths = Vec::new();
  collect(root, &root.join(folder), &mut paths)?;
  paths.sort();
  paths
    .into_iter()
    .map(|path| {
      let source = read(root, &path)?;
      Ok(TestFile::parse(suite, path, source))
    })
    .collect()
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), WptError> {
  let entries = match std::fs::read_dir(dir) {
    Ok(entries) => entries,
    Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
    Err(source) => {
      return Err(WptError::Read {
        path: dir.to_path_buf(),
        source,
      });
    }
  };
  for entry in entries {
    let entry = entry.map_err(|source| WptError::Read {
      path: dir.to_path_buf(),
      source,
    })?;
    let path = entry.path();
    let name = entry.file_name();
    let name = name.to_string_lossy();
    if path.is_dir() {
      // Helpers and data, not tests.
      if name != "resources" && name != "support" {
        collect(root, &path, out)?;
      }
    } else if name.ends_with(".any.js") {
      let relative = path.strip_prefix(root).unwrap_or(&path);
      out.push(relative.to_string_lossy().replace('\\', "/"));
    }
  }
  Ok(())
}

/// Reads a file below the WPT root.
pub fn read(root: &Path, path: &str) -> Result<String, WptError> {
  let full = root.join(path);
  std::fs::read_to_string(&full).map_err(|source| WptError::Read { path: full, source })
}

impl TestFile {
  /// Reads the `// META: key=value` lines at the top of `source`.
  pub fn parse(suite: &'static str, path: String, source: String) -> TestFile {
    let mut file = TestFile {
      suite,
      scripts: Vec::new(),
      long: false,
      title: None,
      runs_here: true,
      path,
      source: String::new(),
    };
    let metas = source
      .lines()
      .map(str::trim)
      .take_while(|line| line.is_empty() || line.starts_with("//"))
      .filter_map(|line| line.strip_prefix("// META:"))
      .filter_map(|meta| meta.trim().split_once('='));
    for (key, value) in metas {
      match key.trim() {
        "script" => file.scripts.push(resolve(&file.path, value.trim())),
        "timeout" => file.long = value.trim() == "long",
        "title" => file.title = Some(value.trim().to_string()),
        // The default (`window,dedicatedworker`) and every list naming a worker, shell or
        // shadow realm include a scope like an isolate's.
        "global" => file.runs_here = value.split(',').any(|global| global.trim() != "window"),
        // Variants select subsets of the same subtests through `location.search`; the
        // runner leaves it empty, which runs all of them at once.
        _ => {}
      }
    }
    file.source = source;
    file
  }

  /// The URL the test is given as `location`: on WPT's own host name, like the WPT server.
  pub fn url(&self) -> String {
    format!("{ORIGIN}/{}", self.path)
  }
}

/// The origin tests see as their own.
pub const ORIGIN: &str = "http://web-platform.test";

/// Resolves `reference` (as in a META line or a `fetch()`) against the file at `base`, both
/// below the WPT root. `None` for references that leave the root.
pub fn resolve_path(base: &str, reference: &str) -> Option<String> {
  let mut parts: Vec<&str> = if reference.starts_with('/') {
    Vec::new()
  } else {
    let mut parts: Vec<&str> = base.split('/').collect();
    parts.pop();
    parts
  };
  for part in reference.split('/') {
    match part {
      "" | "." => {}
      ".." => {
        parts.pop()?;
      }
      part => parts.push(part),
    }
  }
  Some(parts.join("/"))
}

fn resolve(base: &str, reference: &str) -> String {
  resolve_path(base, reference).unwrap_or_else(|| reference.to_string())
}

/// `.json` files named by string literals in the given sources, resolved against the test
/// file: what tests load with `fetch_json()` or `fetch()`. They are handed to the isolate up
/// front, since a test's `fetch()` runs outside any request and Outpost refuses that.
pub fn fixtures(
  root: &Path,
  test_path: &str,
  sources: &[&str],
) -> Result<BTreeMap<String, String>, WptError> {
  static JSON_LITERAL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r#"["']([A-Za-z0-9_./-]+\.json)["']"#).expect("valid regex"));
  let mut fixtures = BTreeMap::new();
  for source in sources {
    for literal in JSON_LITERAL.captures_iter(source) {
      let Some(path) = resolve_path(test_path, &literal[1]) else {
        continue;
      };
      if !fixtures.contains_key(&format!("/{path}")) && root.join(&path).is_file() {
        let text = read(root, &path)?;
        fixtures.insert(format!("/{path}"), text);
      }
    }
  }
  Ok(fixtures)
}
