//! The node: the functions it serves and what every request needs, shared by the HTTP front
//! (`crate::http`), the admin API and deployments (`crate::ops`) and the shards.
//!
//! [`NodeState`] routes a request to a [`RoutedFunction`] (the config file's functions
//! first, then the deployed ones), and [`call`] hands it to the function's isolates and
//! turns what comes back into the response.

pub mod call;
pub mod function;
pub mod geo;
pub mod hop_by_hop;
pub mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;

use crate::cache::edge_cache::SharedCache;
use crate::isolate::code_cache::CodeCacheCounts;
use crate::isolate::function_code::TranspileCache;
use crate::limits::Admission;
use crate::observe::access_log::Observers;
use crate::observe::metrics::NodeReading;
use crate::observe::tail::Tails;
use crate::router::{Overlap, RoutePattern};
use crate::shard::pool::PoolHost;
use call::RequestIds;
use function::{ConfiguredFunctions, RoutedFunction};
use geo::LiveGeo;

/// The functions deployed through the admin API, as the node routes to them (implemented
/// by `crate::ops::deployments`).
pub trait DeployedFunctions: Send + Sync {
  /// The function serving `host` + `path`, and for a split, the version for this request.
  fn route(&self, host: &str, path: &str, headers: &http::HeaderMap)
  -> Option<Arc<RoutedFunction>>;
  /// The deployed function called `name`, and for a split, the version for this request.
  fn named(&self, name: &str, headers: &http::HeaderMap) -> Option<Arc<RoutedFunction>>;
  /// The functions some route of which matches `host`, each in the version that serves
  /// requests without a sticky choice.
  fn for_host(&self, host: &str) -> Vec<Arc<RoutedFunction>>;
  /// Every serving version.
  fn serving(&self) -> Vec<Arc<RoutedFunction>>;
  /// The routes of deployed function `name`, when it is deployed.
  fn routes_of(&self, name: &str) -> Option<Vec<String>>;
}

/// What the node's request path and operations share.
pub struct NodeState {
  /// The `[[functions]]` of the config file and their routes; replaced whole on reload.
  pub configured: ArcSwap<ConfiguredFunctions>,
  /// Where functions' isolates live: the shards and the slow lane.
  pub pools: Arc<PoolHost>,
  pub transpiler: Arc<TranspileCache>,
  pub admission: Admission,
  /// Whether 5xx bodies carry load errors and handler stacks (`server.error_details`).
  pub error_details: bool,
  /// Most header lines a request may have (`server.max_headers`).
  pub max_headers: usize,
  pub max_body_bytes: u64,
  pub request_ids: RequestIds,
  /// The shared cache: the Cache API's and route caching's.
  pub cache: Arc<SharedCache>,
  /// URLs (by namespace) whose cached response is being refreshed in the background.
  pub revalidating: std::sync::Mutex<std::collections::HashSet<String>>,
  /// Trusted peers, geo headers and MaxMind databases; replaced on reload.
  pub geo: Arc<LiveGeo>,
  /// This node's PoP: `request.cf.colo`.
  pub pop: Option<String>,
  /// `request.cf` fields every request gets, over what `[geo]` says (`outpost dev --cf`).
  pub request_cf: Vec<(&'static str, String)>,
  /// Metrics and usage, fed by every request's access record.
  pub observers: Arc<Observers>,
  /// Set once shutdown has begun: `/readyz` answers 503 while connections drain.
  pub draining: AtomicBool,
  /// Functions deployed through the admin API, when `[admin] data_dir` is set.
  pub deployments: Option<Arc<dyn DeployedFunctions>>,
  /// Live tails of functions' access records and console output.
  pub tails: Option<Tails>,
}

impl NodeState {
  /// The function for `host` + `path`: a `[[functions]]` route first, then a deployed one.
  pub fn route(
    &self,
    host: &str,
    path: &str,
    headers: &http::HeaderMap,
  ) -> Option<Arc<RoutedFunction>> {
    let configured = self.configured.load();
    if let Some(index) = configured.router.route(host, path) {
      return configured.functions.get(index).cloned();
    }
    self.deployments.as_ref()?.route(host, path, headers)
  }

  /// The functions requests for `host` may reach (at any path): those a TLS handshake
  /// naming `host` pre-warms.
  pub fn functions_for_host(&self, host: &str) -> Vec<Arc<RoutedFunction>> {
    let configured = self.configured.load();
    let mut functions: Vec<Arc<RoutedFunction>> = configured
      .router
      .for_host(host)
      .into_iter()
      .filter_map(|index| configured.functions.get(index).cloned())
      .collect();
    if let Some(deployments) = &self.deployments {
      functions.extend(deployments.for_host(host));
    }
    functions
  }

  /// The names of the `[[functions]]` of the config file.
  pub fn configured_names(&self) -> Vec<String> {
    let configured = self.configured.load();
    configured
      .functions
      .iter()
      .map(|f| f.name().to_string())
      .collect()
  }

  /// Configured functions whose module does not load.
  pub fn unavailable(&self) -> Vec<String> {
    let configured = self.configured.load();
    configured
      .functions
      .iter()
      .filter(|f| f.pool.load_error().is_some())
      .map(|f| f.name().to_string())
      .collect()
  }

  /// Warnings for the routes of deployed function `name` that a configured route, matched
  /// first, takes every request of: through them the function serves nothing. (Routes that
  /// share some requests with configured ones are ordinary routing and not warned about.)
  pub fn shadowed_routes(&self, name: &str) -> Vec<String> {
    let Some(routes) = self.deployments.as_ref().and_then(|d| d.routes_of(name)) else {
      return Vec::new();
    };
    let configured = self.configured.load();
    let mut warnings = Vec::new();
    for route in routes {
      let Ok(deployed) = RoutePattern::parse(&route) else {
        continue;
      };
      for (pattern, index) in configured.router.patterns() {
        let owner = configured.functions.get(*index).map_or("?", |f| f.name());
        if pattern.overlap(&deployed) != Overlap::All {
          continue;
        }
        let warning = format!(
          "route {route:?} is shadowed by route \"{pattern}\" of configured function {owner:?}, which is matched first: no request reaches {name:?} through it"
        );
        tracing::warn!(function = name, "{warning}");
        warnings.push(warning);
      }
    }
    warnings
  }

  /// The function called `name` (for a deployed one with a split, the version for a request
  /// with `headers`): what a service binding calls.
  pub fn function_named(
    &self,
    name: &str,
    headers: &http::HeaderMap,
  ) -> Option<Arc<RoutedFunction>> {
    let configured = self.configured.load();
    if let Some(function) = configured.functions.iter().find(|f| f.name() == name) {
      return Some(function.clone());
    }
    self.deployments.as_ref()?.named(name, headers)
  }

  /// Every function that serves: the configured ones and each serving deployed version.
  pub fn serving(&self) -> Vec<Arc<RoutedFunction>> {
    let mut serving = self.configured.load().functions.clone();
    if let Some(deployments) = &self.deployments {
      serving.extend(deployments.serving());
    }
    serving
  }

  /// What a metrics scrape reads from the node now.
  pub fn reading(&self) -> NodeReading {
    // Isolates per function name: the versions of a deployed function add up.
    let mut isolates = BTreeMap::<String, (usize, usize)>::new();
    let mut shards = BTreeMap::<String, BTreeSet<usize>>::new();
    let mut code_caches = BTreeMap::<String, CodeCacheCounts>::new();
    let mut in_flight = 0;
    for function in self.serving() {
      let counts = function.pool.code_cache_counts();
      let total = code_caches.entry(function.name().to_string()).or_default();
      total.used += counts.used;
      total.rejected += counts.rejected;
      total.stored += counts.stored;
      let (idle, busy) = function.pool.isolate_counts();
      let counts = isolates.entry(function.name().to_string()).or_default();
      counts.0 += idle;
      counts.1 += busy;
      shards
        .entry(function.name().to_string())
        .or_default()
        .extend(function.pool.shards_hosting());
      in_flight += function.pool.in_flight();
    }
    NodeReading {
      isolates: isolates
        .into_iter()
        .map(|(name, (idle, busy))| (name, idle, busy))
        .collect(),
      shards: shards
        .into_iter()
        .map(|(name, hosting)| (name, hosting.len()))
        .collect(),
      queued: self.admission.waiting(),
      in_flight,
      code_caches: code_caches.into_iter().collect(),
      lane_moves: self
        .pools
        .lane_moves
        .load(std::sync::atomic::Ordering::Relaxed),
      forwarded: self
        .pools
        .forwarded
        .load(std::sync::atomic::Ordering::Relaxed),
      cache: self
        .cache
        .stats()
        .into_iter()
        .map(|(namespace, stats)| (namespace.0.to_string(), stats))
        .collect(),
    }
  }
}
