//! The live `[geo]` settings and MaxMind databases, swapped atomically on reload.
//!
//! Requests read whatever is current when they arrive (a lock-free `ArcSwap` load), so a
//! reload never blocks or fails a request in flight. A reload is triggered by SIGHUP, or by
//! a change of the modification time of the config file, its `geo_file` or a database
//! file (checked every second). It re-reads the whole config file and validates it as at start; if that fails,
//! or a database does not open, the current settings stay and the reason is logged. Only
//! `[geo]` and the databases are applied: other changes take effect at restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use geo_config::client::GeoConfig;
use geo_config::maxmind::GeoDatabases;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::Error;

/// How often the files are checked for changes.
const POLL: Duration = Duration::from_secs(1);

/// One consistent set of geo settings and databases.
#[derive(Debug)]
pub struct ClientGeo {
  pub config: GeoConfig,
  pub databases: Option<GeoDatabases>,
  /// The files whose change triggers a reload: the config file, the `geo_file`, the
  /// databases.
  watched: Vec<PathBuf>,
}

impl ClientGeo {
  /// The settings of `[geo]` in `config`, with its databases opened.
  pub fn open(config: &Config) -> Result<ClientGeo, Error> {
    let geo = &config.geo;
    let databases = match &geo.mmdb_city {
      None => None,
      Some(city) => {
        let asn = geo.mmdb_asn.as_deref().map(Path::new);
        Some(GeoDatabases::open(Path::new(city), asn).map_err(Error::GeoDatabase)?)
      }
    };
    let watched = [&config.file, &config.geo_file]
      .into_iter()
      .flatten()
      .cloned()
      .chain(
        [&geo.mmdb_city, &geo.mmdb_asn]
          .into_iter()
          .flatten()
          .map(PathBuf::from),
      )
      .collect();
    Ok(ClientGeo {
      config: geo.clone(),
      databases,
      watched,
    })
  }
}

/// The current [`ClientGeo`], replaced whole on reload.
pub struct LiveGeo(ArcSwap<ClientGeo>);

impl LiveGeo {
  pub fn new(geo: ClientGeo) -> LiveGeo {
    LiveGeo(ArcSwap::from_pointee(geo))
  }

  pub fn current(&self) -> arc_swap::Guard<Arc<ClientGeo>> {
    self.0.load()
  }

  /// Replaces the settings (a whole-config reload did).
  pub fn replace(&self, geo: ClientGeo) {
    self.0.store(Arc::new(geo));
  }

  /// Reloads from `file` when a watched file (the config, `geo_file`, a database) changes,
  /// until `stop`. SIGHUP reloads everything, these included (`crate::server`).
  pub async fn watch(self: Arc<Self>, file: PathBuf, stop: CancellationToken) {
    let mut seen = modified(&self.current().watched);
    let mut poll = tokio::time::interval(POLL);
    loop {
      tokio::select! {
        _ = poll.tick() => {
          let now = modified(&self.current().watched);
          if now != seen {
            self.reload(&file, "a file changed");
          }
        }
        () = stop.cancelled() => return,
      }
      seen = modified(&self.current().watched);
    }
  }

  fn reload(&self, file: &Path, why: &str) {
    let geo = Config::load(file)
      .map_err(|errors| errors.to_string())
      .and_then(|config| ClientGeo::open(&config).map_err(|err| err.to_string()));
    match geo {
      Ok(geo) => {
        self.0.store(Arc::new(geo));
        tracing::info!(trigger = why, "geo configuration reloaded");
      }
      Err(errors) => tracing::error!(
        trigger = why,
        "geo reload rejected, the current configuration stays:\n{errors}"
      ),
    }
  }
}

/// Modification times of `files` (`None` for one that cannot be read).
fn modified(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
  files
    .iter()
    .map(|file| std::fs::metadata(file).and_then(|m| m.modified()).ok())
    .collect()
}
