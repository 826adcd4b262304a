//! The node as a whole: built from a config, run until shutdown, reloaded on SIGHUP.
//!
//! This is where the layers are wired: the shards (`crate::shard`) with the isolates of the
//! node's functions, the node's state (`crate::node`), the HTTP front on every shard
//! (`crate::http`), and beside it, on a small runtime of its own, the admin API and the
//! deployments (`crate::ops`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::edge_cache::SharedCache;
use crate::config::{Config, ServerConfig};
use crate::error::Error;
use crate::http::{ConnectionSettings, Listener};
use crate::isolate::IsolateSettings;
use crate::isolate::function_code::TranspileCache;
use crate::limits::cpu::CpuWatchdog;
use crate::limits::{Admission, Limits};
use crate::node::call::RequestIds;
use crate::node::function::ConfiguredFunctions;
use crate::node::geo::{ClientGeo, LiveGeo};
use crate::node::services::ServiceCalls;
use crate::node::{DeployedFunctions, NodeState};
use crate::observe::access_log::Observers;
use crate::observe::metrics::NodeMetrics;
use crate::observe::tail::Tails;
use crate::observe::usage_ledger::UsageLedger;
use crate::ops::admin::{self, Admin, Reload};
use crate::ops::deployments::Deployments;
use crate::shard::Shards;
use crate::shard::lane::LaneHost;
use crate::shard::pool::PoolHost;

/// What the process gives the node beyond its config.
#[derive(Default)]
pub struct NodeServices {
  /// Exports each request as a span (see `crate::observe::otlp`).
  pub tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
  /// Function tails (`GET /functions/{name}/tail`), fed by the process's log.
  pub tails: Option<Tails>,
  /// `request.cf` fields every request gets, over what `[geo]` says (`outpost dev --cf`).
  pub request_cf: Vec<(&'static str, String)>,
}

/// A running node: functions loaded on the shards, listeners bound.
pub struct Node {
  state: Arc<NodeState>,
  shards: Arc<Shards>,
  listeners: Vec<Arc<Listener>>,
  /// The admin listener and its token, when `[admin]` is configured.
  admin: Option<(TcpListener, Option<String>)>,
  deployments: Option<Arc<Deployments>>,
  reloader: Arc<NodeReload>,
  server: ServerConfig,
}

/// A bound listener's address and whether it speaks TLS.
#[derive(Debug, Clone, Copy)]
pub struct ListenerInfo {
  pub address: SocketAddr,
  pub tls: bool,
}

impl Node {
  /// Loads every function (pre-warming its isolates) and binds every listener.
  pub async fn start(config: &Config) -> Result<Node, Error> {
    Node::start_with(config, NodeServices::default()).await
  }

  /// As [`Node::start`], with what the process wired up around the node.
  pub async fn start_with(config: &Config, services: NodeServices) -> Result<Node, Error> {
    let NodeServices {
      tracer,
      tails,
      request_cf,
    } = services;
    let transpiler = Arc::new(TranspileCache::default());
    // Isolates are created before their function is known, with the largest heap any
    // function may use; smaller limits are checked per function.
    let max_heap = config
      .functions
      .iter()
      .map(|f| f.limits.memory)
      .max()
      .unwrap_or(Limits::DEFAULT_MEMORY_MB * 1024 * 1024);
    let cache = Arc::new(SharedCache::from_config(&config.cache));
    let service_calls = Arc::new(ServiceCalls::default());
    let settings = IsolateSettings {
      max_heap,
      cache: Some(cache.clone()),
      services: service_calls.clone(),
      load_timeout: Duration::from_millis(config.server.load_timeout_ms),
    };
    let watchdog = CpuWatchdog::start(config.server.demote_long_entries)
      .map_err(|err| Error::IsolateThread(err.to_string()))?;
    let shard_count = config.server.shard_count();
    let shards = Shards::start(
      shard_count,
      config.server.spare_isolates,
      settings.clone(),
      watchdog.clone(),
    )?;
    tracing::info!(shards = shard_count, "shards started");
    let pools = Arc::new(PoolHost::new(
      shards.clone(),
      LaneHost {
        settings,
        watchdog,
        demote: config.server.demote_long_entries,
      },
      (config.server.slow_lane_entry_ms > 0)
        .then(|| Duration::from_millis(config.server.slow_lane_entry_ms)),
    ));
    let observers = Arc::new(Observers {
      metrics: NodeMetrics::new(env!("CARGO_PKG_VERSION"), &config_hash(config)),
      usage: UsageLedger::default(),
      tracer,
    });
    let deployments = match config.admin.as_ref().and_then(|a| a.data_dir.as_ref()) {
      None => None,
      Some(dir) => Some(
        Deployments::open(
          dir,
          Arc::new(config.clone()),
          pools.clone(),
          transpiler.clone(),
          observers.clone(),
        )
        .await
        .map_err(|err| Error::Deployments(err.to_string()))?,
      ),
    };
    // With a data_dir, the ledger holds the traffic recorded at the last shutdown by now.
    let configured =
      ConfiguredFunctions::start(config, &pools, &transpiler, Some(&observers.usage)).await?;
    let listeners = config
      .listeners
      .iter()
      .map(|listener| Listener::bind(listener, shard_count).map(Arc::new))
      .collect::<Result<Vec<_>, _>>()?;
    let geo = Arc::new(LiveGeo::new(ClientGeo::open(config)?));
    let admin = match &config.admin {
      None => None,
      Some(admin) => {
        let listener = TcpListener::bind(admin.address)
          .await
          .map_err(|source| Error::Bind {
            address: admin.address,
            source,
          })?;
        Some((listener, admin.token.clone()))
      }
    };
    let state = Arc::new(NodeState {
      configured: ArcSwap::from_pointee(configured),
      pools,
      transpiler,
      admission: Admission::new(
        config.server.max_in_flight,
        config.server.queue_depth,
        Duration::from_millis(config.server.queue_timeout_ms),
      ),
      error_details: config.server.error_details,
      max_headers: config.server.max_headers,
      max_body_bytes: config.server.max_body_bytes,
      request_ids: RequestIds::default(),
      cache,
      revalidating: std::sync::Mutex::default(),
      geo,
      pop: config.node.as_ref().map(|node| node.pop.clone()),
      request_cf,
      observers,
      draining: AtomicBool::new(false),
      deployments: deployments.clone().map(|d| d as Arc<dyn DeployedFunctions>),
      tails,
    });
    let _ = service_calls.node.set(Arc::downgrade(&state));
    let reloader = Arc::new(NodeReload {
      state: state.clone(),
      config_file: config.file.clone(),
      handler: config.handler.clone(),
      certificates: config
        .listeners
        .iter()
        .zip(&listeners)
        .filter_map(|(configured, bound)| Some((configured.address, bound.tls.clone()?)))
        .collect(),
      listen: config.listeners.iter().map(|l| l.address).collect(),
    });
    Ok(Node {
      state,
      shards,
      listeners,
      admin,
      deployments,
      reloader,
      server: config.server.clone(),
    })
  }

  /// What re-reads the config (or handler file) and applies it, as SIGHUP does.
  pub fn reloader(&self) -> Arc<dyn crate::ops::admin::Reload> {
    self.reloader.clone()
  }

  /// The admin listener's address, when there is one.
  pub fn admin_address(&self) -> Option<SocketAddr> {
    self.admin.as_ref()?.0.local_addr().ok()
  }

  pub fn listeners(&self) -> Vec<ListenerInfo> {
    self
      .listeners
      .iter()
      .map(|l| ListenerInfo {
        address: l.address,
        tls: l.tls.is_some(),
      })
      .collect()
  }

  /// Serves until `shutdown` resolves; then stops accepting on every shard, lets in-flight
  /// requests finish within the grace period, and returns.
  pub async fn run(self, shutdown: impl Future<Output = ()>) {
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    let acceptors = TaskTracker::new();
    let settings = ConnectionSettings::new(&self.server);
    for shard in 0..self.shards.count() {
      let (state, listeners, settings) =
        (self.state.clone(), self.listeners.clone(), settings.clone());
      let (connections, acceptors, stop) = (connections.clone(), acceptors.clone(), stop.clone());
      self.shards.run_on(shard, move |shard| {
        if let Err(err) = crate::http::serve_on(
          shard,
          state,
          &listeners,
          &settings,
          &connections,
          &acceptors,
          &stop,
        ) {
          tracing::error!(shard = shard.id, error = %err, "the shard cannot serve");
        }
      });
    }
    let evictor = tokio::spawn(evict_idle_isolates(self.state.clone(), self.shards.clone()));
    // The admin listener outlives the drain, so `/readyz` can say the node is draining.
    let admin_stop = CancellationToken::new();
    if let Some((listener, token)) = self.admin {
      let admin = Arc::new(Admin {
        node: self.state.clone(),
        token,
        deployments: self.deployments.clone(),
        reload: self.reloader.clone(),
      });
      tokio::spawn(admin::serve(listener, admin, admin_stop.clone()));
    }
    if let Some(file) = self.reloader.config_file.clone() {
      tokio::spawn(self.state.geo.clone().watch(file, stop.clone()));
    }
    // Also without a config file: SIGHUP then re-reads the handler file (and never ends the
    // process, as its default action would).
    tokio::spawn(reload_on_hangup(self.reloader.clone(), stop.clone()));
    shutdown.await;
    self.state.draining.store(true, Ordering::Relaxed);
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    // Every connection is told to finish what it has and close.
    stop.cancel();
    acceptors.close();
    acceptors.wait().await;
    tracing::info!("listeners closed: new connections are refused");
    evictor.abort();
    connections.close();
    match tokio::time::timeout(
      Duration::from_secs(self.server.shutdown_grace_s),
      connections.wait(),
    )
    .await
    {
      Ok(()) => tracing::info!("all connections closed"),
      Err(_) => tracing::warn!(
        grace_s = self.server.shutdown_grace_s,
        "grace period over; closing the remaining connections"
      ),
    }
    if let Some(deployments) = &self.deployments {
      deployments.record_traffic();
    }
    for function in self.state.serving() {
      function.pool.close();
    }
    admin_stop.cancel();
  }
}

/// A short hash of the config file's text (`outpost_build_info`'s `config_hash`), so a
/// fleet's scrapes show which nodes run which config.
fn config_hash(config: &Config) -> String {
  use sha2::Digest;
  let Some(text) = config
    .file
    .as_ref()
    .and_then(|file| std::fs::read(file).ok())
  else {
    return "none".into();
  };
  let digest = sha2::Sha256::digest(&text);
  digest[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks for idle isolates at half the shortest idle timeout (between 250 ms and 5 s), so
/// an isolate is evicted at most half a timeout late; each shard sweeps its own.
async fn evict_idle_isolates(state: Arc<NodeState>, shards: Arc<Shards>) {
  let shortest = state
    .serving()
    .iter()
    .map(|f| f.pool.idle_timeout())
    .min()
    .unwrap_or(Duration::from_secs(10));
  let period = (shortest / 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
  let mut interval = tokio::time::interval(period);
  loop {
    interval.tick().await;
    for function in state.serving() {
      for shard in 0..shards.count() {
        let pool = function.pool.clone();
        shards.run_on(shard, move |shard| pool.sweep(shard));
      }
    }
  }
}

/// What a reload re-reads and applies.
struct NodeReload {
  state: Arc<NodeState>,
  /// The config file, re-read on reload (and for `[geo]` when its files change).
  config_file: Option<std::path::PathBuf>,
  /// The handler file and address of the single-handler default, re-read on reload.
  handler: Option<(std::path::PathBuf, SocketAddr)>,
  /// Each TLS listener's address and current certificates.
  certificates: Vec<(SocketAddr, Arc<ArcSwap<rustls::ServerConfig>>)>,
  /// The `[[listen]]` addresses the node was started with.
  listen: Vec<SocketAddr>,
}

impl NodeReload {
  /// Re-reads the config file and applies what can change while serving: the functions of
  /// `[[functions]]` (new pools are warmed on the shards before they take traffic; requests
  /// in flight finish on the old ones), listeners' certificates (new handshakes use them;
  /// open connections keep theirs) and `[geo]`. Nothing changes unless all of it loads, the
  /// functions' modules included. Returns notes on changes that need a restart.
  async fn reload(&self, trigger: &str) -> Result<Vec<String>, String> {
    let state = &self.state;
    let config = match (&self.config_file, &self.handler) {
      (Some(file), _) => Config::load(file),
      (None, Some((entry, address))) => Config::single_handler(entry, *address),
      (None, None) => {
        return Err("this node has no config file or handler file to reload".into());
      }
    }
    .map_err(|errors| errors.to_string())?;
    let geo = ClientGeo::open(&config).map_err(|err| err.to_string())?;
    let mut notes = Vec::new();
    let mut certificates = Vec::new();
    for (index, (address, live)) in self.certificates.iter().enumerate() {
      let listener = config
        .listeners
        .iter()
        .filter(|l| !l.tls.is_empty())
        .nth(index)
        .filter(|l| l.address == *address);
      match listener {
        Some(listener) => {
          let tls = crate::http::tls::server_config(&listener.tls)
            .map_err(|err| format!("listener {address}: {err}"))?;
          certificates.push((live.clone(), tls));
        }
        None => notes.push(format!(
          "TLS listener {address} is not the same in the new config: listener changes apply at restart"
        )),
      }
    }
    let addresses: Vec<SocketAddr> = config.listeners.iter().map(|l| l.address).collect();
    if addresses != self.listen {
      notes.push("[[listen]] entries changed: listener changes apply at restart".into());
    }
    let configured = ConfiguredFunctions::start(
      &config,
      &state.pools,
      &state.transpiler,
      Some(&state.observers.usage),
    )
    .await
    .map_err(|err| err.to_string())?;
    // A function that does not load would replace a working pool with one that answers
    // 503: the whole reload is refused instead, as a deploy of such a version is.
    let failed = configured.load_errors();
    if !failed.is_empty() {
      return Err(failed.join("\n"));
    }
    for (live, tls) in certificates {
      live.store(tls);
    }
    state.geo.replace(geo);
    state.configured.store(Arc::new(configured));
    notes.push(
      "[server], [cache], [limits] defaults of deployed functions and [admin] apply at restart"
        .into(),
    );
    tracing::info!(trigger, "configuration reloaded");
    Ok(notes)
  }
}

impl Reload for NodeReload {
  fn reload<'a>(
    &'a self,
    trigger: &'a str,
  ) -> futures::future::BoxFuture<'a, Result<Vec<String>, String>> {
    Box::pin(NodeReload::reload(self, trigger))
  }
}

/// Reloads on SIGHUP until `stop`.
async fn reload_on_hangup(reloader: Arc<NodeReload>, stop: CancellationToken) {
  let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
    Ok(hangup) => hangup,
    Err(err) => {
      tracing::warn!(error = %err, "no SIGHUP handler: reload with POST /reload");
      return;
    }
  };
  loop {
    tokio::select! {
      _ = hangup.recv() => {
        if let Err(errors) = reloader.reload("SIGHUP").await {
          tracing::error!("reload rejected, the running configuration stays:\n{errors}");
        }
      }
      () = stop.cancelled() => return,
    }
  }
}
