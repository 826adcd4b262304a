//! Functions deployed through the admin API, beside those of `[[functions]]`.
//!
//! A deploy uploads a bundle (a tar, optionally gzipped, of module files and a
//! `manifest.json`) that becomes an immutable version named by the hash of its contents.
//! Activating sets which versions serve, with weights for a canary split and optionally a
//! sticky header or cookie. A version's isolates are warmed before traffic moves to it;
//! requests in flight finish on the version they started on, whose pool is freed after.
//!
//! On disk, under `[admin] data_dir`:
//!
//! ```text
//! functions/<name>/versions/<version>/   the bundle's files and version.json
//! functions/<name>/active.json           what serves: [{version, weight}], sticky
//! functions/<name>/history.json          the activations that served, newest last
//! functions/<name>/secrets.json          secret values by name, mode 0600
//! ```
//!
//! A version is stored only once its module has loaded (in an isolate that is then let
//! go), so every stored version is one a rollback can go back to.
//!
//! Secrets are set one by one through the API and given to the versions whose manifest
//! names them, as `env.NAME`; setting one restarts the serving versions that use it. Their
//! values never leave the node: the API lists only names, and what isolates log (console
//! output, exception stacks) has them redacted.
//!
//! Every write is crash-safe: a version is written to a temporary directory, each file and
//! the directory are fsynced, then it is renamed into place and the parent fsynced;
//! `active.json` is written beside itself, fsynced and renamed over the old one. A version is
//! always complete before any `active.json` names it, so a node killed at any point restarts
//! serving exactly what was last activated. Leftover temporary directories are removed at
//! start.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::config::{Config, FunctionConfig, PoolConfig, RouteCacheConfig};
use crate::isolate::FunctionSpec;
use crate::isolate::function_code::{FunctionCode, TranspileCache};
use crate::limits::egress::EgressConfig;
use crate::limits::{Limits, LimitsConfig};
use crate::node::DeployedFunctions;
use crate::node::function::RoutedFunction;
use crate::observe::access_log::Observers;
use crate::router::{RoutePattern, Router};
use crate::shard::pool::{IsolatePool, PoolHost};

/// Largest bundle accepted, compressed or not, and largest it may unpack to.
pub const MAX_BUNDLE_BYTES: usize = 64 << 20;

/// Why a deploy operation failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
  #[error("{0}")]
  BadRequest(String),
  #[error("{0}")]
  NotFound(String),
  #[error("{0}")]
  Conflict(String),
  /// The version's module does not load.
  #[error("{0}")]
  Unloadable(String),
  #[error("{what}: {source}")]
  Io {
    what: String,
    source: std::io::Error,
  },
}

impl DeployError {
  pub fn status(&self) -> u16 {
    match self {
      DeployError::BadRequest(_) => 400,
      DeployError::NotFound(_) => 404,
      DeployError::Conflict(_) => 409,
      DeployError::Unloadable(_) => 422,
      DeployError::Io { .. } => 500,
    }
  }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeployError {
  let what = what.into();
  move |source| DeployError::Io { what, source }
}

/// `manifest.json` at the root of a bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
  /// The module to run, a path inside the bundle.
  pub entry: String,
  #[serde(default)]
  pub env: BTreeMap<String, String>,
  #[serde(default)]
  pub limits: LimitsConfig,
  /// Routes as in `[[functions]]`; without them the function is served at `/<name>/`.
  #[serde(default)]
  pub routes: Vec<String>,
  /// Names of secrets (set with `PUT /functions/{name}/secrets/{NAME}`) given as `env.NAME`.
  #[serde(default)]
  pub secrets: Vec<String>,
  /// Service bindings: `env` name → the function on this node it calls in-process.
  #[serde(default)]
  pub services: BTreeMap<String, String>,
}

/// `version.json` inside a stored version.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VersionRecord {
  /// Unix seconds of the upload.
  created: u64,
  /// Nanoseconds past `created`: orders uploads made within one second.
  #[serde(default)]
  created_ns: u32,
  manifest: Manifest,
}

/// Which versions serve, as stored in `active.json` and taken by activate/split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Activation {
  /// Version → weight (relative; `{v1: 95, v2: 5}`).
  pub versions: BTreeMap<String, u32>,
  /// Keeps a client on one version by the value of this header or cookie.
  #[serde(default)]
  pub sticky: Option<Sticky>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Sticky {
  Header(String),
  Cookie(String),
}

/// A stored version, as `GET /functions/{name}/versions` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
  pub version: String,
  /// Unix seconds of the upload.
  pub created: u64,
  #[serde(skip)]
  created_ns: u32,
  pub entry: String,
  /// Its weight in the active split (0: not serving).
  pub weight: u32,
  /// Unix seconds of the latest activation that served it, if any did.
  pub last_served: Option<u64>,
}

/// One activation that served, as `history.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Served {
  /// Unix seconds and nanoseconds of the activation.
  at: u64,
  at_ns: u32,
  activation: Activation,
}

/// Activations kept in `history.json`.
const HISTORY_KEPT: usize = 32;

/// One serving version of a deployed function.
struct LiveVersion {
  version: String,
  weight: u32,
  function: Arc<RoutedFunction>,
}

/// A deployed function as it serves now.
struct LiveFunction {
  name: String,
  routes: Vec<String>,
  versions: Vec<LiveVersion>,
  sticky: Option<Sticky>,
}

/// The deployed functions and their routes, swapped whole on every change.
#[derive(Default)]
struct LiveTable {
  router: Option<Router>,
  functions: Vec<Arc<LiveFunction>>,
}

impl LiveTable {
  /// The serving versions of `name`.
  fn versions_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a LiveVersion> + 'a {
    self
      .functions
      .iter()
      .filter(move |f| f.name == name)
      .flat_map(|f| f.versions.iter())
  }
}

/// Where, under `data_dir`, the traffic at the last shutdown is kept.
const TRAFFIC_FILE: &str = "traffic.json";

/// The deployed functions of a node.
pub struct Deployments {
  dir: PathBuf,
  config: Arc<Config>,
  pools: Arc<PoolHost>,
  transpiler: Arc<TranspileCache>,
  /// The node's metrics and usage: a version being activated is warmed for the function's
  /// recent traffic.
  observers: Arc<Observers>,
  live: ArcSwap<LiveTable>,
  /// One change (upload, activation, deletion) at a time.
  changes: tokio::sync::Mutex<()>,
}

impl Deployments {
  /// Opens `dir` (creating it), removes what interrupted writes left, and starts serving
  /// every function's active versions.
  pub async fn open(
    dir: &Path,
    config: Arc<Config>,
    pools: Arc<PoolHost>,
    transpiler: Arc<TranspileCache>,
    observers: Arc<Observers>,
  ) -> Result<Arc<Deployments>, DeployError> {
    let functions = dir.join("functions");
    std::fs::create_dir_all(&functions).map_err(io(format!("creating {}", functions.display())))?;
    // The traffic the node had when it last stopped: what its versions are warmed for now.
    match std::fs::read(dir.join(TRAFFIC_FILE)) {
      Ok(text) => match serde_json::from_slice(&text) {
        Ok(record) => observers.usage.remember(record),
        Err(err) => {
          tracing::warn!(file = TRAFFIC_FILE, error = %err, "ignoring the recorded traffic")
        }
      },
      Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
      Err(err) => {
        tracing::warn!(file = TRAFFIC_FILE, error = %err, "cannot read the recorded traffic")
      }
    }
    let deployments = Arc::new(Deployments {
      dir: dir.to_path_buf(),
      config,
      pools,
      transpiler,
      observers,
      live: ArcSwap::default(),
      changes: tokio::sync::Mutex::new(()),
    });
    let mut live = Vec::new();
    for entry in read_dir(&functions)? {
      let name = entry.file_name().to_string_lossy().into_owned();
      let function_dir = entry.path();
      let versions = function_dir.join("versions");
      for leftover in read_dir(&versions).unwrap_or_default() {
        if leftover.file_name().to_string_lossy().starts_with(".tmp-") {
          tracing::info!(path = %leftover.path().display(), "removing an interrupted upload");
          let _ = std::fs::remove_dir_all(leftover.path());
        }
      }
      let _ = std::fs::remove_file(function_dir.join("active.json.tmp"));
      let Some(activation) = deployments.stored_activation(&name)? else {
        continue;
      };
      match deployments.start_function(&name, &activation, &[]).await {
        Ok(function) => live.push(Arc::new(function)),
        Err(err) => tracing::error!(function = name, error = %err, "deployed function not served"),
      }
    }
    deployments.publish(live)?;
    Ok(deployments)
  }

  fn function_dir(&self, name: &str) -> PathBuf {
    self.dir.join("functions").join(name)
  }

  fn version_dir(&self, name: &str, version: &str) -> PathBuf {
    self.function_dir(name).join("versions").join(version)
  }

  /// Records every function's recent traffic in `data_dir`, for the next start to warm by
  /// (at shutdown).
  pub fn record_traffic(&self) {
    let record = self.observers.usage.record_recent(SystemTime::now());
    let written = serde_json::to_vec(&record)
      .map_err(std::io::Error::other)
      .and_then(|text| replace_file(&self.dir, TRAFFIC_FILE, &text));
    if let Err(err) = written {
      tracing::warn!(file = TRAFFIC_FILE, error = %err, "cannot record the traffic");
    }
  }

  /// The function serving `host` + `path`, and for a split, the version for this request.
  pub(crate) fn route(
    &self,
    host: &str,
    path: &str,
    headers: &http::HeaderMap,
  ) -> Option<Arc<RoutedFunction>> {
    let table = self.live.load();
    let index = table.router.as_ref()?.route(host, path)?;
    pick_version(table.functions.get(index)?, headers)
  }

  /// The deployed functions some route of which matches `host`, each in the version that
  /// serves requests without a sticky choice.
  pub(crate) fn for_host(&self, host: &str) -> Vec<Arc<RoutedFunction>> {
    let table = self.live.load();
    let Some(router) = table.router.as_ref() else {
      return Vec::new();
    };
    router
      .for_host(host)
      .into_iter()
      .filter_map(|index| pick_version(table.functions.get(index)?, &http::HeaderMap::new()))
      .collect()
  }

  /// The deployed function called `name`, and for a split, the version for this request.
  pub(crate) fn named(&self, name: &str, headers: &http::HeaderMap) -> Option<Arc<RoutedFunction>> {
    let table = self.live.load();
    pick_version(table.functions.iter().find(|f| f.name == name)?, headers)
  }

  /// Stores a bundle as a version of `name` (a no-op when that exact content is stored).
  /// Returns the version and whether it is new.
  pub async fn upload(&self, name: &str, bundle: &[u8]) -> Result<(String, bool), DeployError> {
    self.check_name(name)?;
    let files = unpack(bundle)?;
    let manifest = manifest(&files)?;
    route_patterns(name, &manifest)?;
    if let Some((field, message)) = manifest.limits.problems().first() {
      return Err(DeployError::BadRequest(format!(
        "bundle: manifest.json limits.{field}: {message}"
      )));
    }
    let version = version_of(&files);
    let _change = self.changes.lock().await;
    let target = self.version_dir(name, &version);
    if target.join("version.json").is_file() {
      return Ok((version, false));
    }
    let versions = self.function_dir(name).join("versions");
    std::fs::create_dir_all(&versions).map_err(io(format!("creating {}", versions.display())))?;
    let uploaded = SystemTime::now()
      .duration_since(UNIX_EPOCH)
      .unwrap_or_default();
    let temporary = versions.join(format!(".tmp-{version}-{}", uploaded.as_nanos()));
    let record = VersionRecord {
      created: uploaded.as_secs(),
      created_ns: uploaded.subsec_nanos(),
      manifest: manifest.clone(),
    };
    let record = serde_json::to_vec_pretty(&record).unwrap_or_default();
    let write = || -> std::io::Result<()> {
      for (path, contents) in files.iter().chain([&("version.json".to_string(), record)]) {
        let file = temporary.join(path);
        if let Some(parent) = file.parent() {
          std::fs::create_dir_all(parent)?;
        }
        write_synced(&file, contents)?;
      }
      sync_dirs(&temporary)
    };
    if let Err(err) = write() {
      let _ = std::fs::remove_dir_all(&temporary);
      return Err(io(format!("storing version {version} of {name}"))(err));
    }
    // Refused uploads are not kept: a stored version is one that loads.
    if let Err(err) = self.check_loads(name, &temporary, &manifest).await {
      let _ = std::fs::remove_dir_all(&temporary);
      return Err(err);
    }
    let place = || -> std::io::Result<()> {
      std::fs::rename(&temporary, &target)?;
      sync_dir(&versions)
    };
    if let Err(err) = place() {
      let _ = std::fs::remove_dir_all(&temporary);
      return Err(io(format!("storing version {version} of {name}"))(err));
    }
    tracing::info!(function = name, version, "version stored");
    Ok((version, true))
  }

  /// Makes `activation` what serves `name`: warms the versions that do not serve yet, then
  /// moves traffic in one step and records it. The versions that stop serving finish their
  /// requests in flight and are freed.
  pub async fn activate(&self, name: &str, activation: Activation) -> Result<(), DeployError> {
    self.check_name(name)?;
    if activation.versions.is_empty() || activation.versions.values().all(|w| *w == 0) {
      return Err(DeployError::BadRequest(
        "name at least one version with a weight above 0".into(),
      ));
    }
    let total: u64 = activation.versions.values().map(|w| u64::from(*w)).sum();
    if total != 100 {
      return Err(DeployError::BadRequest(format!(
        "the weights are percentages and must add up to 100; these add up to {total}"
      )));
    }
    let _change = self.changes.lock().await;
    for version in activation.versions.keys() {
      if !self
        .version_dir(name, version)
        .join("version.json")
        .is_file()
      {
        return Err(DeployError::NotFound(format!(
          "function {name:?} has no version {version:?}; GET /functions/{name}/versions lists them"
        )));
      }
    }
    let current = self.live.load();
    let reuse: Vec<(String, Arc<RoutedFunction>)> = current
      .versions_of(name)
      .map(|v| (v.version.clone(), v.function.clone()))
      .collect();
    let function = self.start_function(name, &activation, &reuse).await?;
    let state = serde_json::to_vec_pretty(&activation).unwrap_or_default();
    replace_file(&self.function_dir(name), "active.json", &state)
      .map_err(io(format!("recording the activation of {name}")))?;
    self.record_served(name, &activation)?;
    self.publish_replacing(&current, function)?;
    tracing::info!(
      function = name,
      versions = weights_text(&activation.versions),
      "activated"
    );
    Ok(())
  }

  /// Serves again what served before the current activation (the whole split, as it was),
  /// or with `to`, that version alone. Returns what serves now.
  pub async fn rollback(&self, name: &str, to: Option<&str>) -> Result<Activation, DeployError> {
    self.check_name(name)?;
    let activation = match to {
      Some(version) => Activation {
        versions: [(version.to_string(), 100)].into(),
        sticky: None,
      },
      None => {
        let current = self.stored_activation(name)?.map(|a| a.versions);
        self
          .history(name)?
          .into_iter()
          .rev()
          .map(|served| served.activation)
          .find(|activation| Some(&activation.versions) != current.as_ref())
          .ok_or_else(|| {
            DeployError::NotFound(format!(
              "function {name:?} has served no other version to go back to; name one with --to"
            ))
          })?
      }
    };
    self.activate(name, activation.clone()).await?;
    Ok(activation)
  }

  fn history(&self, name: &str) -> Result<Vec<Served>, DeployError> {
    let path = self.function_dir(name).join("history.json");
    match std::fs::read(&path) {
      Ok(text) => serde_json::from_slice(&text).map_err(|err| DeployError::Io {
        what: format!("reading {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, err),
      }),
      Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
      Err(err) => Err(io(format!("reading {}", path.display()))(err)),
    }
  }

  /// Appends `activation` to the function's history (crash-safe, as `active.json`).
  fn record_served(&self, name: &str, activation: &Activation) -> Result<(), DeployError> {
    let mut history = self.history(name)?;
    let now = SystemTime::now()
      .duration_since(UNIX_EPOCH)
      .unwrap_or_default();
    history.push(Served {
      at: now.as_secs(),
      at_ns: now.subsec_nanos(),
      activation: activation.clone(),
    });
    let excess = history.len().saturating_sub(HISTORY_KEPT);
    history.drain(..excess);
    replace_file(
      &self.function_dir(name),
      "history.json",
      &serde_json::to_vec_pretty(&history).unwrap_or_default(),
    )
    .map_err(io(format!("recording the history of {name}")))
  }

  /// The routes a deployed function serves, when it is deployed.
  pub fn routes_of(&self, name: &str) -> Option<Vec<String>> {
    let table = self.live.load();
    let function = table.functions.iter().find(|f| f.name == name)?;
    Some(function.routes.clone())
  }

  /// Sets secret `key` of `name`. Serving versions that use it restart with the new value
  /// (warmed before traffic moves, as on activation).
  pub async fn set_secret(&self, name: &str, key: &str, value: &str) -> Result<(), DeployError> {
    self.check_name(name)?;
    check_secret_name(key)?;
    {
      let _change = self.changes.lock().await;
      let mut secrets = self.secrets(name)?;
      secrets.insert(key.to_string(), value.to_string());
      self.store_secrets(name, &secrets)?;
    }
    tracing::info!(function = name, secret = key, "secret set");
    self.restart_users_of(name, key).await
  }

  /// Removes secret `key` of `name`; versions that need it can no longer start.
  pub async fn delete_secret(&self, name: &str, key: &str) -> Result<(), DeployError> {
    self.check_name(name)?;
    check_secret_name(key)?;
    let _change = self.changes.lock().await;
    let mut secrets = self.secrets(name)?;
    if secrets.remove(key).is_none() {
      return Err(DeployError::NotFound(format!(
        "function {name:?} has no secret {key}"
      )));
    }
    self.store_secrets(name, &secrets)?;
    tracing::info!(function = name, secret = key, "secret deleted");
    Ok(())
  }

  /// The names of `name`'s secrets.
  pub fn secret_names(&self, name: &str) -> Result<Vec<String>, DeployError> {
    self.check_name(name)?;
    Ok(self.secrets(name)?.into_keys().collect())
  }

  fn secrets(&self, name: &str) -> Result<BTreeMap<String, String>, DeployError> {
    let path = self.function_dir(name).join("secrets.json");
    match std::fs::read(&path) {
      Ok(text) => serde_json::from_slice(&text).map_err(|err| DeployError::Io {
        what: format!("reading {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, err),
      }),
      Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
      Err(err) => Err(io(format!("reading {}", path.display()))(err)),
    }
  }

  fn store_secrets(
    &self,
    name: &str,
    secrets: &BTreeMap<String, String>,
  ) -> Result<(), DeployError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = self.function_dir(name);
    let what = || format!("storing the secrets of {name}");
    std::fs::create_dir_all(&dir).map_err(io(what()))?;
    let temporary = dir.join("secrets.json.tmp");
    let write = || -> std::io::Result<()> {
      let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
      file.write_all(&serde_json::to_vec(secrets).unwrap_or_default())?;
      file.sync_all()?;
      std::fs::rename(&temporary, dir.join("secrets.json"))?;
      sync_dir(&dir)
    };
    write().map_err(io(what()))
  }

  /// Restarts the serving versions of `name` whose manifest names secret `key`.
  async fn restart_users_of(&self, name: &str, key: &str) -> Result<(), DeployError> {
    let Some(activation) = self.stored_activation(name)? else {
      return Ok(());
    };
    let _change = self.changes.lock().await;
    let uses = |version: &str| {
      read_record(&self.version_dir(name, version))
        .is_ok_and(|record| record.manifest.secrets.iter().any(|s| s == key))
    };
    if !activation.versions.keys().any(|v| uses(v)) {
      return Ok(());
    }
    let current = self.live.load();
    let reuse: Vec<(String, Arc<RoutedFunction>)> = current
      .versions_of(name)
      .filter(|v| !uses(&v.version))
      .map(|v| (v.version.clone(), v.function.clone()))
      .collect();
    let function = self.start_function(name, &activation, &reuse).await?;
    self.publish_replacing(&current, function)
  }

  /// Stops serving `name` and removes its versions.
  pub async fn delete(&self, name: &str) -> Result<(), DeployError> {
    self.check_name(name)?;
    let _change = self.changes.lock().await;
    let function_dir = self.function_dir(name);
    if !function_dir.exists() {
      return Err(DeployError::NotFound(format!(
        "no deployed function {name:?}"
      )));
    }
    // Unrecorded first, then unrouted, then removed: a crash in between leaves a function
    // that does not serve, never one that half-serves.
    let _ = std::fs::remove_file(function_dir.join("active.json"));
    sync_dir(&function_dir).map_err(io(format!("deleting {name}")))?;
    let functions = self
      .live
      .load()
      .functions
      .iter()
      .filter(|f| f.name != name)
      .cloned()
      .collect();
    self.publish(functions)?;
    std::fs::remove_dir_all(&function_dir).map_err(io(format!("deleting {name}")))?;
    tracing::info!(function = name, "deleted");
    Ok(())
  }

  /// The stored versions of `name`, oldest first.
  pub fn versions(&self, name: &str) -> Result<Vec<VersionInfo>, DeployError> {
    self.check_name(name)?;
    let versions = self.function_dir(name).join("versions");
    if !versions.is_dir() {
      return Err(DeployError::NotFound(format!(
        "no deployed function {name:?}"
      )));
    }
    let active = self.stored_activation(name)?.unwrap_or(Activation {
      versions: BTreeMap::new(),
      sticky: None,
    });
    let history = self.history(name)?;
    let mut list = Vec::new();
    for entry in read_dir(&versions)? {
      let version = entry.file_name().to_string_lossy().into_owned();
      if version.starts_with(".tmp-") {
        continue;
      }
      let record = read_record(&entry.path())?;
      let last_served = history
        .iter()
        .rev()
        .find(|served| {
          served
            .activation
            .versions
            .get(&version)
            .is_some_and(|w| *w > 0)
        })
        .map(|served| served.at);
      list.push(VersionInfo {
        weight: active.versions.get(&version).copied().unwrap_or(0),
        version,
        created: record.created,
        created_ns: record.created_ns,
        entry: record.manifest.entry,
        last_served,
      });
    }
    list.sort_by_key(|v| (v.created, v.created_ns));
    Ok(list)
  }

  /// Every deployed function: name, routes and serving versions with weights.
  pub fn list(&self) -> Vec<serde_json::Value> {
    let table = self.live.load();
    let mut list: Vec<serde_json::Value> = table
      .functions
      .iter()
      .map(|f| {
        let versions: BTreeMap<&str, u32> = f
          .versions
          .iter()
          .map(|v| (v.version.as_str(), v.weight))
          .collect();
        serde_json::json!({
          "name": f.name,
          "source": "deployed",
          "routes": f.routes,
          "versions": versions,
          "sticky": f.sticky,
        })
      })
      .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    list
  }

  /// The pools of every deployed version that serves, for metrics.
  pub(crate) fn serving(&self) -> Vec<Arc<RoutedFunction>> {
    let table = self.live.load();
    table
      .functions
      .iter()
      .flat_map(|f| f.versions.iter().map(|v| v.function.clone()))
      .collect()
  }

  fn check_name(&self, name: &str) -> Result<(), DeployError> {
    crate::config::check_function_name(name).map_err(DeployError::BadRequest)?;
    if self.config.functions.iter().any(|f| f.name == name) {
      return Err(DeployError::Conflict(format!(
        "function {name:?} is defined in the config file, which wins over deployments; deploy under another name"
      )));
    }
    Ok(())
  }

  fn stored_activation(&self, name: &str) -> Result<Option<Activation>, DeployError> {
    let path = self.function_dir(name).join("active.json");
    let text = match std::fs::read(&path) {
      Ok(text) => text,
      Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
      Err(err) => return Err(io(format!("reading {}", path.display()))(err)),
    };
    serde_json::from_slice(&text)
      .map(Some)
      .map_err(|err| DeployError::Io {
        what: format!("reading {}", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, err),
      })
  }

  /// Starts (or reuses from `reuse`) a warm pool for every version of `activation`.
  async fn start_function(
    &self,
    name: &str,
    activation: &Activation,
    reuse: &[(String, Arc<RoutedFunction>)],
  ) -> Result<LiveFunction, DeployError> {
    let mut versions = Vec::new();
    let mut routes = Vec::new();
    for (version, weight) in &activation.versions {
      let dir = self.version_dir(name, version);
      let record = read_record(&dir)?;
      routes = served_routes(name, &record.manifest);
      let function = match reuse.iter().find(|(v, _)| v == version) {
        Some((_, function)) => function.clone(),
        None => {
          self
            .start_version(name, version, &dir, &record.manifest)
            .await?
        }
      };
      versions.push(LiveVersion {
        version: version.clone(),
        weight: *weight,
        function,
      });
    }
    Ok(LiveFunction {
      name: name.to_string(),
      routes,
      versions,
      sticky: activation.sticky.clone(),
    })
  }

  async fn start_version(
    &self,
    name: &str,
    version: &str,
    dir: &Path,
    manifest: &Manifest,
  ) -> Result<Arc<RoutedFunction>, DeployError> {
    let stored = self.secrets(name)?;
    let mut secrets = BTreeMap::new();
    for key in &manifest.secrets {
      let value = stored.get(key).ok_or_else(|| {
        DeployError::Unloadable(format!(
          "the manifest needs secret {key}, which is not set: PUT /functions/{name}/secrets/{key}"
        ))
      })?;
      secrets.insert(key.clone(), value.clone());
    }
    // Its modules' code caches are kept beside the function's versions.
    let code_cache = self
      .function_dir(name)
      .join("code-cache")
      .join(format!("{version}.bin"));
    let (function, spec) = self.version_spec(name, dir, manifest, secrets, Some(code_cache))?;
    let warm = self
      .pools
      .warm_for(&self.observers.usage, name, &function.pool);
    let pool = IsolatePool::start(self.pools.clone(), spec, function.pool.clone(), warm).await;
    if let Some(err) = pool.load_error() {
      return Err(DeployError::Unloadable(format!(
        "the version's module does not load: {err}"
      )));
    }
    Ok(Arc::new(RoutedFunction::new(
      pool,
      &function,
      Some(version.to_string()),
    )))
  }

  /// Loads the version in `dir` once, in an isolate that is then let go: its module must
  /// load and have a handler. Module top-level code has no `env`, so secrets that are not
  /// set yet do not matter here.
  async fn check_loads(
    &self,
    name: &str,
    dir: &Path,
    manifest: &Manifest,
  ) -> Result<(), DeployError> {
    let secrets = manifest
      .secrets
      .iter()
      .map(|key| (key.clone(), String::new()))
      .collect();
    let (function, spec) = self.version_spec(name, dir, manifest, secrets, None)?;
    let pool = IsolatePool::start(self.pools.clone(), spec, function.pool.clone(), 0).await;
    pool.close();
    match pool.load_error() {
      Some(err) => Err(DeployError::Unloadable(format!(
        "the version's module does not load: {err}"
      ))),
      None => Ok(()),
    }
  }

  /// What a version in `dir` runs as, with `secrets` added to its `env`.
  fn version_spec(
    &self,
    name: &str,
    dir: &Path,
    manifest: &Manifest,
    secrets: BTreeMap<String, String>,
    code_cache: Option<PathBuf>,
  ) -> Result<(FunctionConfig, FunctionSpec), DeployError> {
    let routes = route_patterns(name, manifest)?;
    let function = FunctionConfig {
      name: name.to_string(),
      entry: dir.join(&manifest.entry),
      routes,
      env: manifest.env.clone(),
      pool: PoolConfig::default(),
      egress: EgressConfig::default(),
      limits: Limits::resolve(&manifest.limits, &self.config.limits),
      cache: RouteCacheConfig::default(),
      disabled: None,
      services: manifest.services.clone(),
    };
    let mut code = FunctionCode::new(name, &function.entry, self.transpiler.clone())
      .map_err(|err| DeployError::Unloadable(format!("{}: {err}", manifest.entry)))?;
    if let Some(file) = code_cache {
      code = code.with_code_cache_file(file);
    }
    let mut spec = FunctionSpec::new(&self.config, &function, code);
    let mut env = (*spec.env).clone();
    env.extend(secrets.clone());
    spec.env = Arc::new(env);
    spec.secrets = Arc::new(secrets.into_values().filter(|v| !v.is_empty()).collect());
    Ok((function, spec))
  }

  /// Publishes `current` with `function` in place of its namesake.
  fn publish_replacing(
    &self,
    current: &LiveTable,
    function: LiveFunction,
  ) -> Result<(), DeployError> {
    let mut functions: Vec<Arc<LiveFunction>> = current
      .functions
      .iter()
      .filter(|f| f.name != function.name)
      .cloned()
      .collect();
    functions.push(Arc::new(function));
    self.publish(functions)
  }

  fn publish(&self, functions: Vec<Arc<LiveFunction>>) -> Result<(), DeployError> {
    let mut routes = Vec::new();
    for (index, function) in functions.iter().enumerate() {
      for route in &function.routes {
        let pattern = RoutePattern::parse(route).map_err(|err| {
          DeployError::BadRequest(format!("route {route:?} of {}: {err}", function.name))
        })?;
        routes.push((pattern, index));
      }
    }
    let router = (!routes.is_empty()).then(|| Router::new(routes));
    self.live.store(Arc::new(LiveTable { router, functions }));
    Ok(())
  }
}

/// The version of `function` a request with `headers` goes to: by weight, or for a sticky
/// split, by the hash of its header or cookie.
fn pick_version(function: &LiveFunction, headers: &http::HeaderMap) -> Option<Arc<RoutedFunction>> {
  let total: u64 = function.versions.iter().map(|v| u64::from(v.weight)).sum();
  if total == 0 {
    return None;
  }
  // A fixed-key hash: a sticky client lands on the same version on every node.
  let key = function
    .sticky
    .as_ref()
    .and_then(|sticky| sticky_value(sticky, headers))
    .map(|value| {
      std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(value)
    });
  let mut point = key.unwrap_or_else(rand::random) % total;
  for version in &function.versions {
    if point < u64::from(version.weight) {
      return Some(version.function.clone());
    }
    point -= u64::from(version.weight);
  }
  None
}

/// `version=weight` pairs for the log: `a1b2c3=95 d4e5f6=5`.
fn weights_text(versions: &BTreeMap<String, u32>) -> String {
  versions
    .iter()
    .map(|(version, weight)| format!("{version}={weight}"))
    .collect::<Vec<_>>()
    .join(" ")
}

impl DeployedFunctions for Deployments {
  fn route(
    &self,
    host: &str,
    path: &str,
    headers: &http::HeaderMap,
  ) -> Option<Arc<RoutedFunction>> {
    Deployments::route(self, host, path, headers)
  }

  fn named(&self, name: &str, headers: &http::HeaderMap) -> Option<Arc<RoutedFunction>> {
    Deployments::named(self, name, headers)
  }

  fn serving(&self) -> Vec<Arc<RoutedFunction>> {
    Deployments::serving(self)
  }

  fn for_host(&self, host: &str) -> Vec<Arc<RoutedFunction>> {
    Deployments::for_host(self, host)
  }

  fn routes_of(&self, name: &str) -> Option<Vec<String>> {
    Deployments::routes_of(self, name)
  }
}

/// Secret names are environment variable names: A-Z, 0-9 and _, not starting with a digit.
fn check_secret_name(key: &str) -> Result<(), DeployError> {
  let valid = !key.is_empty()
    && key.len() <= 128
    && key
      .bytes()
      .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    && !key.as_bytes()[0].is_ascii_digit();
  if valid {
    Ok(())
  } else {
    Err(DeployError::BadRequest(format!(
      "{key:?} is not a secret name: use A-Z, 0-9 and _, not starting with a digit"
    )))
  }
}

/// The manifest's routes, or without any, `/<name>/`.
fn served_routes(name: &str, manifest: &Manifest) -> Vec<String> {
  if manifest.routes.is_empty() {
    vec![format!("/{name}/")]
  } else {
    manifest.routes.clone()
  }
}

fn route_patterns(name: &str, manifest: &Manifest) -> Result<Vec<RoutePattern>, DeployError> {
  served_routes(name, manifest)
    .iter()
    .map(|route| {
      RoutePattern::parse(route)
        .map_err(|err| DeployError::BadRequest(format!("manifest routes: {route:?}: {err}")))
    })
    .collect()
}

fn sticky_value<'a>(sticky: &Sticky, headers: &'a http::HeaderMap) -> Option<&'a str> {
  match sticky {
    Sticky::Header(name) => headers.get(name.as_str())?.to_str().ok(),
    Sticky::Cookie(name) => headers
      .get_all(http::header::COOKIE)
      .iter()
      .filter_map(|v| v.to_str().ok())
      .flat_map(|v| v.split(';'))
      .filter_map(|pair| pair.trim().split_once('='))
      .find(|(key, _)| key == name)
      .map(|(_, value)| value),
  }
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, DeployError> {
  let entries = match std::fs::read_dir(dir) {
    Ok(entries) => entries,
    Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
    Err(err) => return Err(io(format!("reading {}", dir.display()))(err)),
  };
  entries
    .collect::<Result<Vec<_>, _>>()
    .map_err(io(format!("reading {}", dir.display())))
}

fn read_record(dir: &Path) -> Result<VersionRecord, DeployError> {
  let path = dir.join("version.json");
  let text = std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
  serde_json::from_slice(&text).map_err(|err| DeployError::Io {
    what: format!("reading {}", path.display()),
    source: std::io::Error::new(std::io::ErrorKind::InvalidData, err),
  })
}

/// Replaces `dir/name` with `contents` so that a crash leaves the old file or the new one:
/// written beside it as `name.tmp`, fsynced, renamed over it, and the directory fsynced.
fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
  let temporary = dir.join(format!("{name}.tmp"));
  write_synced(&temporary, contents)?;
  std::fs::rename(&temporary, dir.join(name))?;
  sync_dir(dir)
}

fn write_synced(path: &Path, contents: &[u8]) -> std::io::Result<()> {
  let mut file = std::fs::File::create(path)?;
  file.write_all(contents)?;
  file.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
  std::fs::File::open(dir)?.sync_all()
}

/// Fsyncs `dir` and every directory below it.
fn sync_dirs(dir: &Path) -> std::io::Result<()> {
  for entry in std::fs::read_dir(dir)? {
    let entry = entry?;
    if entry.file_type()?.is_dir() {
      sync_dirs(&entry.path())?;
    }
  }
  sync_dir(dir)
}

/// The files of a bundle (a tar, gzipped or not), checked: relative paths that stay inside
/// it, regular files and directories only, within [`MAX_BUNDLE_BYTES`].
pub fn unpack(bundle: &[u8]) -> Result<Vec<(String, Vec<u8>)>, DeployError> {
  let bad = |message: String| DeployError::BadRequest(format!("bundle: {message}"));
  let reader: Box<dyn Read + '_> = if bundle.starts_with(&[0x1f, 0x8b]) {
    Box::new(flate2::read::GzDecoder::new(bundle))
  } else {
    Box::new(bundle)
  };
  let mut archive = tar::Archive::new(reader.take(MAX_BUNDLE_BYTES as u64 + 1));
  let entries = archive
    .entries()
    .map_err(|err| bad(format!("not a tar archive: {err}")))?;
  let mut files = Vec::new();
  let mut total = 0usize;
  for entry in entries {
    let mut entry = entry.map_err(|err| bad(format!("not a tar archive: {err}")))?;
    let path = entry
      .path()
      .map_err(|err| bad(format!("unreadable path: {err}")))?
      .into_owned();
    let kind = entry.header().entry_type();
    if kind.is_dir() {
      continue;
    }
    if !kind.is_file() {
      return Err(bad(format!(
        "{} is not a regular file (links and devices are not accepted)",
        path.display()
      )));
    }
    let safe = !path.as_os_str().is_empty()
      && path
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !safe {
      return Err(bad(format!(
        "{} leaves the bundle: paths must be relative, without ..",
        path.display()
      )));
    }
    let name: PathBuf = path
      .components()
      .filter(|c| *c != Component::CurDir)
      .collect();
    let name = name.to_string_lossy().replace('\\', "/");
    if name == "version.json" || name.starts_with(".tmp-") {
      return Err(bad(format!("{name} is a name Outpost keeps for itself")));
    }
    let mut contents = Vec::new();
    entry
      .read_to_end(&mut contents)
      .map_err(|err| bad(format!("{name}: {err}")))?;
    total += contents.len();
    if total > MAX_BUNDLE_BYTES {
      return Err(bad(format!(
        "unpacks to more than {} MiB",
        MAX_BUNDLE_BYTES >> 20
      )));
    }
    files.push((name, contents));
  }
  files.sort();
  files.dedup_by(|a, b| a.0 == b.0);
  Ok(files)
}

/// The bundle's `manifest.json`, checked against its files.
fn manifest(files: &[(String, Vec<u8>)]) -> Result<Manifest, DeployError> {
  let bad = |message: String| DeployError::BadRequest(format!("bundle: {message}"));
  let (_, text) = files
    .iter()
    .find(|(path, _)| path == "manifest.json")
    .ok_or_else(|| {
      bad(
        "no manifest.json at its root; it names the entry module: {\"entry\": \"index.ts\"}".into(),
      )
    })?;
  let manifest: Manifest =
    serde_json::from_slice(text).map_err(|err| bad(format!("manifest.json: {err}")))?;
  for key in &manifest.secrets {
    check_secret_name(key).map_err(|err| bad(format!("manifest.json secrets: {err}")))?;
  }
  for (binding, target) in &manifest.services {
    crate::config::check_binding_name(binding)
      .and_then(|()| crate::config::check_function_name(target))
      .map_err(|err| bad(format!("manifest.json services.{binding}: {err}")))?;
  }
  let entry = manifest.entry.trim_start_matches("./");
  if !files.iter().any(|(path, _)| path == entry) {
    return Err(bad(format!(
      "manifest.json names entry {:?}, which is not in the bundle",
      manifest.entry
    )));
  }
  Ok(Manifest {
    entry: entry.to_string(),
    ..manifest
  })
}

/// The content hash naming a version: its files' paths and contents.
fn version_of(files: &[(String, Vec<u8>)]) -> String {
  let mut hash = sha2::Sha256::new();
  for (path, contents) in files {
    hash.update((path.len() as u64).to_le_bytes());
    hash.update(path.as_bytes());
    hash.update((contents.len() as u64).to_le_bytes());
    hash.update(contents);
  }
  hash.finalize()[..6]
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect()
}

#[cfg(test)]
mod tests {
  use super::*;

  fn tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, contents) in files {
      let mut header = tar::Header::new_gnu();
      header.set_size(contents.len() as u64);
      header.set_mode(0o644);
      header.set_entry_type(tar::EntryType::Regular);
      // set_path refuses "..": write the raw name to test what a hostile archive holds.
      let name = &mut header.as_old_mut().name;
      name[..path.len()].copy_from_slice(path.as_bytes());
      header.set_cksum();
      builder.append(&header, contents.as_bytes()).unwrap();
    }
    builder.into_inner().unwrap()
  }

  #[test]
  fn bundles_unpack_and_hash_by_content() {
    let files = unpack(&tar(&[
      ("manifest.json", r#"{"entry": "./index.js"}"#),
      ("./index.js", "export default {}"),
    ]))
    .unwrap();
    assert_eq!(manifest(&files).unwrap().entry, "index.js");
    let same = unpack(&tar(&[
      ("index.js", "export default {}"),
      ("manifest.json", r#"{"entry": "./index.js"}"#),
    ]))
    .unwrap();
    assert_eq!(version_of(&files), version_of(&same));
    let other = unpack(&tar(&[
      ("manifest.json", r#"{"entry": "./index.js"}"#),
      ("index.js", "export default { }"),
    ]))
    .unwrap();
    assert_ne!(version_of(&files), version_of(&other));
  }

  #[test]
  fn hostile_or_incomplete_bundles_are_refused_with_the_reason() {
    let message = |bundle: Vec<u8>| match unpack(&bundle).and_then(|files| manifest(&files)) {
      Err(DeployError::BadRequest(message)) => message,
      other => panic!("{other:?}"),
    };
    assert!(message(tar(&[("../evil.js", "x")])).contains("leaves the bundle"));
    assert!(message(tar(&[("/etc/passwd", "x")])).contains("leaves the bundle"));
    assert!(message(tar(&[("index.js", "x")])).contains("no manifest.json"));
    assert!(message(tar(&[("manifest.json", r#"{"entry": "main.ts"}"#)])).contains("main.ts"));
    assert!(message(tar(&[("manifest.json", r#"{"entri": "x"}"#)])).contains("unknown field"));
    assert!(message(b"not a tar at all, just text that is long enough".repeat(20)).contains("tar"));
  }
}
