//! `IsolatePool`: the isolates of one function. Tenants never share an isolate: every
//! isolate in a pool runs that pool's function and nothing else.
//!
//! The pool keeps `prewarm` isolates ready, sends each request to the isolate with the fewest
//! requests in flight, starts another isolate (up to `max_isolates`) when every isolate
//! already has `isolate_concurrency` requests in flight, and evicts isolates above `prewarm`
//! that have been idle for `idle_timeout_s`. An isolate past its soft CPU limit is taken
//! out of the pool (it finishes what it has) and replaced on demand.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_ext_dispatch::DispatchRequest;

use crate::config::PoolConfig;
use crate::error::Error;
use crate::isolate::{FunctionSpec, InFlightGuard, IsolateFactory, IsolateHandle};

pub struct IsolatePool {
  factory: Arc<IsolateFactory>,
  spec: FunctionSpec,
  config: PoolConfig,
  isolates: Mutex<Vec<Arc<IsolateHandle>>>,
  /// Set when the module fails to load; the function is then not served.
  load_error: Mutex<Option<String>>,
  /// Serialises isolate start-ups so a burst of requests starts one isolate, not many.
  growth: tokio::sync::Mutex<()>,
}

impl IsolatePool {
  /// Creates the pool and starts its pre-warmed isolates; with `prewarm = 0` the module is
  /// still loaded once, in an isolate that is then let go, so that a module that does not
  /// load is known before traffic comes. A load error is recorded (and logged) rather than
  /// returned: see [`IsolatePool::load_error`].
  pub async fn start(
    factory: Arc<IsolateFactory>,
    spec: FunctionSpec,
    config: PoolConfig,
  ) -> Arc<IsolatePool> {
    let pool = Arc::new(IsolatePool {
      factory,
      spec,
      config,
      isolates: Mutex::default(),
      load_error: Mutex::default(),
      growth: tokio::sync::Mutex::new(()),
    });
    // Failures are logged by add_isolate; a load error is kept for the requests to come.
    let starts = (0..pool.config.prewarm.max(1)).map(|_| pool.add_isolate());
    futures::future::join_all(starts).await;
    if pool.config.prewarm == 0 {
      pool.close();
    }
    pool
  }

  pub fn name(&self) -> &str {
    &self.spec.code.name
  }

  pub fn idle_timeout(&self) -> Duration {
    Duration::from_secs(self.config.idle_timeout_s)
  }

  /// The load error, if the function's module does not load.
  pub fn load_error(&self) -> Option<String> {
    self.load_error.lock().expect("pool lock").clone()
  }

  async fn add_isolate(&self) -> Result<Arc<IsolateHandle>, Error> {
    match self.factory.start(self.spec.clone()).await {
      Ok(isolate) => {
        self
          .isolates
          .lock()
          .expect("pool lock")
          .push(isolate.clone());
        Ok(isolate)
      }
      Err(Error::FunctionLoad(message)) => {
        let mut load_error = self.load_error.lock().expect("pool lock");
        if load_error.is_none() {
          tracing::error!(function = %self.name(), "function failed to load: {message}");
        }
        *load_error = Some(message.clone());
        Err(Error::FunctionFailed {
          function: self.name().into(),
          message,
        })
      }
      Err(err) => {
        tracing::warn!(function = %self.name(), error = %err, "starting an isolate failed");
        Err(Error::FunctionUnavailable {
          function: self.name().into(),
          message: err.to_string(),
        })
      }
    }
  }

  /// The least busy isolate, and whether the pool should grow. Retired isolates (past
  /// their soft CPU limit) leave the pool here: the requests they have keep them alive
  /// until answered, then their threads end.
  fn pick(&self) -> (Option<Arc<IsolateHandle>>, bool) {
    let mut isolates = self.isolates.lock().expect("pool lock");
    isolates.retain(|isolate| {
      let retired = isolate.retired();
      if retired {
        tracing::info!(function = %self.spec.code.name, "isolate retired: soft CPU limit");
      }
      !retired
    });
    let least = isolates.iter().min_by_key(|i| i.in_flight()).cloned();
    let busy = least
      .as_ref()
      .is_none_or(|i| i.in_flight() >= self.config.isolate_concurrency);
    (least, busy && isolates.len() < self.config.max_isolates)
  }

  /// Hands a request to one of the function's isolates.
  pub async fn dispatch(&self, mut request: DispatchRequest) -> Result<InFlightGuard, Error> {
    if let Some(message) = self.load_error() {
      return Err(Error::FunctionFailed {
        function: self.name().into(),
        message,
      });
    }
    // A dead isolate is removed and the request retried once on another.
    for _ in 0..2 {
      let isolate = match self.pick() {
        (_, true) => {
          let _growing = self.growth.lock().await;
          match self.pick() {
            (_, true) => self.add_isolate().await?,
            (Some(isolate), false) => isolate,
            (None, false) => unreachable!("an empty pool below its maximum grows"),
          }
        }
        (Some(isolate), false) => isolate,
        (None, false) => unreachable!("an empty pool below its maximum grows"),
      };
      match isolate.dispatch(request).await {
        Ok(guard) => return Ok(guard),
        Err(closed) => {
          request = closed.0;
          self.remove(&isolate);
        }
      }
    }
    Err(Error::FunctionUnavailable {
      function: self.name().into(),
      message: "isolates stopped while taking the request".into(),
    })
  }

  fn remove(&self, isolate: &Arc<IsolateHandle>) {
    self
      .isolates
      .lock()
      .expect("pool lock")
      .retain(|i| !Arc::ptr_eq(i, isolate));
  }

  /// Drops isolates above `prewarm` that have been idle past the timeout. Their threads end
  /// once pending `waitUntil` work is done.
  pub fn evict_idle(&self) -> usize {
    let timeout = self.idle_timeout();
    let mut isolates = self.isolates.lock().expect("pool lock");
    let before = isolates.len();
    let mut keep = isolates.len();
    isolates.retain(|isolate| {
      let evict =
        keep > self.config.prewarm && isolate.in_flight() == 0 && isolate.idle_for() >= timeout;
      if evict {
        keep -= 1;
      }
      !evict
    });
    let evicted = before - isolates.len();
    if evicted > 0 {
      tracing::debug!(function = %self.spec.code.name, evicted, "evicted idle isolates");
    }
    evicted
  }

  /// (idle, busy) isolates: busy ones have at least one request in flight.
  pub fn isolate_counts(&self) -> (usize, usize) {
    let isolates = self.isolates.lock().expect("pool lock");
    let busy = isolates.iter().filter(|i| i.in_flight() > 0).count();
    (isolates.len() - busy, busy)
  }

  /// Requests in flight on the pool's isolates.
  pub fn in_flight(&self) -> usize {
    let isolates = self.isolates.lock().expect("pool lock");
    isolates.iter().map(|i| i.in_flight()).sum()
  }

  /// Closes every isolate's request channel; their threads finish in-flight work and exit.
  pub fn close(&self) {
    self.isolates.lock().expect("pool lock").clear();
  }
}
