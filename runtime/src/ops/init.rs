//! `outpost init`: a function directory to start from, for one of a few templates: the
//! handler (`index.ts`), the types of what Outpost gives it (`outpost.d.ts`), a
//! `tsconfig.json` naming them, and a README with the commands to serve and try it.
//! `outpost dev DIR` serves it as written. And `outpost types`: that `outpost.d.ts` with the
//! function's own `env` (settings, secrets, service bindings) typed.

use std::path::{Path, PathBuf};

/// What the new function does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Template {
  /// Answers every path with where it was served.
  Hello,
  /// A JSON API routed with URLPattern.
  Router,
  /// Cache-through with `caches.default` and `Cache-Control`.
  Cache,
  /// Redirects by `request.cf.country`.
  Geo,
}

impl Template {
  fn handler(self) -> &'static str {
    match self {
      Template::Hello => include_str!("../../templates/hello.ts"),
      Template::Router => include_str!("../../templates/router.ts"),
      Template::Cache => include_str!("../../templates/cache.ts"),
      Template::Geo => include_str!("../../templates/geo.ts"),
    }
  }

  fn name(self) -> &'static str {
    match self {
      Template::Hello => "hello",
      Template::Router => "router",
      Template::Cache => "cache",
      Template::Geo => "geo",
    }
  }

  /// How to try it, for the README.
  fn requests(self, dir: &str) -> String {
    match self {
      Template::Hello => "curl http://127.0.0.1:8787/hello".into(),
      Template::Router => "curl http://127.0.0.1:8787/items/1\ncurl -X POST -d '{\"name\":\"second\"}' http://127.0.0.1:8787/items".into(),
      Template::Cache => "curl -i http://127.0.0.1:8787/page   # x-cache: miss, then hit".into(),
      Template::Geo => format!(
        "# with outpost dev {dir} --cf country=DE,city=Berlin:\ncurl -iL http://127.0.0.1:8787/"
      ),
    }
  }
}

/// Why `outpost init` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
  #[error(
    "{0} exists already: outpost init writes into a new or empty directory, and never over a file"
  )]
  Exists(PathBuf),
  #[error("cannot write {path}: {source}")]
  Write {
    path: PathBuf,
    source: std::io::Error,
  },
}

/// What a function's `env` holds beyond Outpost's own names, for [`types`].
#[derive(Debug, Default)]
pub struct EnvNames {
  /// `env` settings and secrets: text.
  pub text: Vec<String>,
  /// Service bindings: a `Fetcher` each (declared in `templates/outpost.d.ts`).
  pub services: Vec<String>,
}

/// `outpost.d.ts` with `env` typed: Outpost's declarations, then the function's `Env`.
pub fn types(env: &EnvNames) -> String {
  let mut text = include_str!("../../templates/outpost.d.ts").to_string();
  text.push_str("\n/** This function's `env` (written by `outpost types`). */\ninterface Env {\n");
  for name in &env.text {
    text.push_str(&format!("  {}: string;\n", property(name)));
  }
  for name in &env.services {
    text.push_str(&format!("  {}: Fetcher;\n", property(name)));
  }
  text.push_str("}\n");
  text
}

/// `name` as a property name: as it is when it is an identifier, quoted otherwise.
fn property(name: &str) -> String {
  let identifier = name
    .chars()
    .next()
    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
    && name
      .chars()
      .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
  if identifier {
    name.to_string()
  } else {
    format!("{name:?}")
  }
}

/// Writes the function directory `dir` (created if need be) from `template`; returns the
/// files written. Nothing is written when any of them exists.
pub fn init(dir: &Path, template: Template) -> Result<Vec<PathBuf>, InitError> {
  let name = dir
    .canonicalize()
    .unwrap_or_else(|_| dir.to_path_buf())
    .file_name()
    .map_or_else(
      || "function".to_string(),
      |n| n.to_string_lossy().into_owned(),
    );
  let shown = dir.display().to_string();
  let readme = include_str!("../../templates/README.md")
    .replace("{name}", &name)
    .replace("{template}", template.name())
    .replace("{dir}", &shown)
    .replace("{request}", &template.requests(&shown));
  let files = [
    ("index.ts", template.handler().to_string()),
    (
      "outpost.d.ts",
      include_str!("../../templates/outpost.d.ts").to_string(),
    ),
    (
      "tsconfig.json",
      include_str!("../../templates/tsconfig.json").to_string(),
    ),
    ("README.md", readme),
  ];
  if let Some(existing) = files
    .iter()
    .map(|(file, _)| dir.join(file))
    .find(|path| path.exists())
  {
    return Err(InitError::Exists(existing));
  }
  std::fs::create_dir_all(dir).map_err(|source| InitError::Write {
    path: dir.to_path_buf(),
    source,
  })?;
  files
    .into_iter()
    .map(|(file, text)| {
      let path = dir.join(file);
      std::fs::write(&path, text).map_err(|source| InitError::Write {
        path: path.clone(),
        source,
      })?;
      Ok(path)
    })
    .collect()
}
