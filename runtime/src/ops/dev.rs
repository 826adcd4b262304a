//! `outpost dev`: a node for a function author. It serves like `outpost serve`, and reloads
//! when a file of a function or the config changes (a watch on their directories), through
//! the same reload as SIGHUP: requests in flight finish on the old version, and a change
//! that does not load leaves the last good version serving while the error (with its
//! file:line:col) is printed. `--cf` gives every request the `request.cf` fields a PoP would.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio_util::sync::CancellationToken;

use super::admin::Reload;
use crate::config::Config;

/// How long a burst of file events (an editor's save is several) is let settle before the
/// reload.
const SETTLE: Duration = Duration::from_millis(30);

/// Files whose change reloads: modules, JSON imports and configs.
const WATCHED_EXTENSIONS: [&str; 9] = [
  "js", "mjs", "ts", "mts", "jsx", "tsx", "json", "toml", "map",
];

/// Why `outpost dev` cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
  #[error(
    "--cf {0:?}: expected fields as name=value separated by commas, e.g. --cf country=DE,city=Berlin"
  )]
  MalformedCf(String),
  #[error("--cf: {0:?} is not a request.cf field Outpost fills; the fields are: {fields}", fields = geo_config::client::REQUEST_CF_FIELDS.join(", "))]
  UnknownCfField(String),
  #[error("cannot watch {path}: {source}")]
  Watch {
    path: PathBuf,
    source: notify::Error,
  },
}

/// Parses `--cf name=value,name=value` into `request.cf` fields.
pub fn parse_cf(text: &str) -> Result<Vec<(&'static str, String)>, DevError> {
  text
    .split(',')
    .filter(|pair| !pair.trim().is_empty())
    .map(|pair| {
      let (name, value) = pair
        .split_once('=')
        .ok_or_else(|| DevError::MalformedCf(text.to_string()))?;
      let name = name.trim();
      let field = geo_config::client::REQUEST_CF_FIELDS
        .iter()
        .find(|field| **field == name)
        .ok_or_else(|| DevError::UnknownCfField(name.to_string()))?;
      Ok((*field, value.trim().to_string()))
    })
    .collect()
}

/// The directories whose files a change of reloads `config`: the config file's (or the
/// handler's), and each function's entry directory outside it.
pub fn watched_dirs(config: &Config) -> Vec<PathBuf> {
  let mut dirs: Vec<PathBuf> = Vec::new();
  let home = config
    .file
    .as_deref()
    .or(config.handler.as_ref().map(|(entry, _)| entry.as_path()))
    .and_then(Path::parent);
  let entries = config
    .functions
    .iter()
    .filter_map(|function| function.entry.parent());
  for dir in home.into_iter().chain(entries) {
    let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    if !dirs.iter().any(|watched| dir.starts_with(watched)) {
      dirs.retain(|watched| !watched.starts_with(&dir));
      dirs.push(dir);
    }
  }
  dirs
}

/// Watches `dirs` and reloads through `reload` after each change (until `stop`).
pub fn reload_on_change(
  dirs: &[PathBuf],
  reload: Arc<dyn Reload>,
  stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, DevError> {
  let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
  let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
    if let Ok(event) = event
      && !event.kind.is_access()
    {
      for path in event.paths {
        let _ = changed.send(path);
      }
    }
  })
  .map_err(|source| DevError::Watch {
    path: PathBuf::new(),
    source,
  })?;
  for dir in dirs {
    watcher
      .watch(dir, RecursiveMode::Recursive)
      .map_err(|source| DevError::Watch {
        path: dir.clone(),
        source,
      })?;
  }
  Ok(tokio::spawn(async move {
    // The watcher lives as long as the task.
    let _watcher = watcher;
    loop {
      let first = tokio::select! {
        () = stop.cancelled() => return,
        path = changes.recv() => match path {
          Some(path) => path,
          None => return,
        },
      };
      tokio::time::sleep(SETTLE).await;
      let mut paths = vec![first];
      while let Ok(path) = changes.try_recv() {
        paths.push(path);
      }
      let Some(changed) = paths.into_iter().find(|path| watched(path)) else {
        continue;
      };
      let trigger = format!("change of {}", changed.display());
      match reload.reload(&trigger).await {
        Ok(_) => tracing::info!(file = %changed.display(), "reloaded"),
        Err(errors) => {
          tracing::error!(file = %changed.display(), "the change does not load; the last good version keeps serving");
          #[allow(
            clippy::print_stderr,
            reason = "the author's terminal: the error as the compiler wrote it, lines and all"
          )]
          {
            eprintln!("\n{errors}\n");
          }
        }
      }
    }
  }))
}

fn watched(path: &Path) -> bool {
  let hidden = path
    .file_name()
    .and_then(|name| name.to_str())
    .is_some_and(|name| name.starts_with('.') || name.ends_with('~'));
  !hidden
    && path
      .extension()
      .and_then(|extension| extension.to_str())
      .is_some_and(|extension| WATCHED_EXTENSIONS.contains(&extension))
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn cf_fields_are_checked_by_name() {
    assert_eq!(
      parse_cf("country=DE, city=Berlin").unwrap(),
      vec![
        ("country", "DE".to_string()),
        ("city", "Berlin".to_string())
      ]
    );
    let unknown = parse_cf("planet=Mars").unwrap_err().to_string();
    assert!(
      unknown.contains("\"planet\"") && unknown.contains("country"),
      "{unknown}"
    );
    assert!(matches!(parse_cf("country"), Err(DevError::MalformedCf(_))));
  }

  #[test]
  fn only_module_and_config_files_reload() {
    assert!(watched(Path::new("/f/handler.ts")));
    assert!(watched(Path::new("/f/outpost.toml")));
    assert!(!watched(Path::new("/f/.handler.ts.swp")));
    assert!(!watched(Path::new("/f/handler.ts~")));
    assert!(!watched(Path::new("/f/notes.txt")));
  }
}
