//! [`RoutedFunction`]: a function ready to take requests (for a deployed function, one
//! version of it): its pool of isolates, its limits and concurrency slots, and how it is
//! routed. And [`ConfiguredFunctions`], the `[[functions]]` of the config file, routed.

use std::sync::Arc;

use http::StatusCode;
use tokio::sync::Semaphore;

use crate::config::{Config, FunctionConfig};
use crate::error::Error;
use crate::isolate::FunctionSpec;
use crate::isolate::function_code::{FunctionCode, TranspileCache};
use crate::limits::Limits;
use crate::observe::metrics::FunctionIdentity;
use crate::observe::usage_ledger::UsageLedger;
use crate::router::Router;
use crate::shard::pool::{IsolatePool, PoolHost};

/// A function of the node (for a deployed function, one version of it): its pool, its
/// limits and its concurrency slots.
pub struct RoutedFunction {
  pub pool: Arc<IsolatePool>,
  pub limits: Limits,
  pub slots: Arc<Semaphore>,
  /// Whether its GET responses are cached in front of it.
  pub route_cache: bool,
  /// The status its routes answer when `[[overrides]]` switch it off on this node.
  pub disabled: Option<StatusCode>,
  /// Its name, and the deployed version this is (`None` for a function of the config
  /// file), as access records name it.
  pub identity: Arc<FunctionIdentity>,
}

impl RoutedFunction {
  pub fn new(
    pool: Arc<IsolatePool>,
    function: &FunctionConfig,
    version: Option<String>,
  ) -> RoutedFunction {
    RoutedFunction {
      identity: Arc::new(FunctionIdentity::new(pool.name().to_string(), version)),
      pool,
      limits: function.limits,
      slots: Arc::new(Semaphore::new(function.limits.max_concurrency)),
      route_cache: function.cache.enabled,
      disabled: function
        .disabled
        .and_then(|status| StatusCode::from_u16(status).ok()),
    }
  }

  /// The function's name (also its cache namespace).
  pub fn name(&self) -> &str {
    self.pool.name()
  }

  /// The deployed version, if it is one.
  pub fn version(&self) -> Option<&str> {
    self.identity.version.as_deref()
  }
}

/// The functions of the config file, routed.
pub struct ConfiguredFunctions {
  pub router: Router,
  pub functions: Vec<Arc<RoutedFunction>>,
}

impl ConfiguredFunctions {
  /// Starts every `[[functions]]` entry's pool (pre-warmed on the shards) and builds their
  /// router. A function whose module does not load is kept (its requests get 503); see
  /// [`ConfiguredFunctions::load_errors`].
  ///
  /// With `usage` (a reload), each function starts as many isolates as its recent traffic
  /// needs, not only `prewarm`.
  pub async fn start(
    config: &Config,
    pools: &Arc<PoolHost>,
    transpiler: &Arc<TranspileCache>,
    usage: Option<&UsageLedger>,
  ) -> Result<ConfiguredFunctions, Error> {
    let mut starts = Vec::new();
    for function in &config.functions {
      let code = FunctionCode::new(&function.name, &function.entry, transpiler.clone()).map_err(
        |source| Error::Entry {
          function: function.name.clone(),
          entry: function.entry.display().to_string(),
          source,
        },
      )?;
      let spec = FunctionSpec::new(config, function, code);
      let warm = usage.map_or(0, |usage| {
        pools.warm_for(usage, &function.name, &function.pool)
      });
      starts.push(IsolatePool::start(
        pools.clone(),
        spec,
        function.pool.clone(),
        warm,
      ));
    }
    let pools = futures::future::join_all(starts).await;
    let functions = pools
      .into_iter()
      .zip(&config.functions)
      .map(|(pool, function)| Arc::new(RoutedFunction::new(pool, function, None)))
      .collect();
    let router = Router::new(
      config
        .functions
        .iter()
        .enumerate()
        .flat_map(|(index, f)| f.routes.iter().map(move |r| (r.clone(), index))),
    );
    Ok(ConfiguredFunctions { router, functions })
  }

  /// `function "name" does not load: reason` for every function whose module does not load.
  pub fn load_errors(&self) -> Vec<String> {
    self
      .functions
      .iter()
      .filter_map(|f| {
        let error = f.pool.load_error()?;
        Some(format!("function {:?} does not load: {error}", f.name()))
      })
      .collect()
  }
}
