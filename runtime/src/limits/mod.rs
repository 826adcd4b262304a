//! Limits: CPU time per entry into JS ([`cpu`]), memory per isolate ([`memory`]), where
//! `fetch` may go ([`egress`]), and here the request limits: wall-clock time per request,
//! concurrency per function and node-wide, and the bounded queue in front of them.
//!
//! A request first needs a node-wide slot (`server.max_in_flight`) and a slot of its
//! function (`limits.max_concurrency`). When none is free it may wait in a queue of
//! `server.queue_depth` requests for up to `server.queue_timeout_ms`; past that it is turned
//! away with 503 and `Retry-After`, so memory stays bounded under overload.

pub mod cpu;
pub mod egress;
pub mod memory;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `limits = { ... }` on a function, or `[limits]` for the node-wide defaults. Keys left out
/// of a function's table take the node-wide value.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
  /// CPU time a request may use inside its isolate; past it the isolate is terminated and
  /// the request answered 503.
  pub cpu_ms: Option<u64>,
  /// CPU time a request may use before its isolate is retired: the isolate finishes the
  /// requests it has and takes no new ones; a fresh one replaces it. Off unless set.
  pub soft_cpu_ms: Option<u64>,
  /// Heap an isolate of the function may use; past it the isolate is terminated and the
  /// request answered 503.
  pub memory_mb: Option<usize>,
  /// Wall-clock time a request may take, response body included; 504 past it.
  pub wall_ms: Option<u64>,
  /// Requests of the function in flight at once, across all its isolates.
  pub max_concurrency: Option<usize>,
  /// `fetch()` calls one request's handler may make (0: none).
  pub max_subrequests: Option<u32>,
  /// Whether `eval` and `new Function` may compile code from strings (off, as in Workers).
  pub allow_code_generation: Option<bool>,
}

/// The limits in force for one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
  pub cpu: Duration,
  /// Below `cpu`, when set: a request past it retires its isolate.
  pub soft_cpu: Option<Duration>,
  /// Heap bytes.
  pub memory: usize,
  pub wall: Duration,
  pub max_concurrency: usize,
  pub max_subrequests: u32,
  /// `eval` and `new Function` work; off, they throw an `EvalError`.
  pub allow_code_generation: bool,
}

impl Limits {
  pub const DEFAULT_CPU_MS: u64 = 50;
  pub const DEFAULT_MEMORY_MB: usize = 128;
  pub const DEFAULT_WALL_MS: u64 = 30_000;
  pub const DEFAULT_MAX_CONCURRENCY: usize = 64;
  pub const DEFAULT_MAX_SUBREQUESTS: u32 = 50;

  /// The function's own values, else the node's, else the defaults.
  pub fn resolve(function: &LimitsConfig, node: &LimitsConfig) -> Limits {
    let cpu = Duration::from_millis(
      function
        .cpu_ms
        .or(node.cpu_ms)
        .unwrap_or(Self::DEFAULT_CPU_MS),
    );
    let soft_cpu = function
      .soft_cpu_ms
      .or(node.soft_cpu_ms)
      .map(Duration::from_millis)
      .filter(|soft| *soft < cpu);
    Limits {
      memory: function
        .memory_mb
        .or(node.memory_mb)
        .unwrap_or(Self::DEFAULT_MEMORY_MB)
        .saturating_mul(1024 * 1024),
      cpu,
      soft_cpu,
      wall: Duration::from_millis(
        function
          .wall_ms
          .or(node.wall_ms)
          .unwrap_or(Self::DEFAULT_WALL_MS),
      ),
      max_concurrency: function
        .max_concurrency
        .or(node.max_concurrency)
        .unwrap_or(Self::DEFAULT_MAX_CONCURRENCY),
      max_subrequests: function
        .max_subrequests
        .or(node.max_subrequests)
        .unwrap_or(Self::DEFAULT_MAX_SUBREQUESTS),
      allow_code_generation: function
        .allow_code_generation
        .or(node.allow_code_generation)
        .unwrap_or(false),
    }
  }
}

impl LimitsConfig {
  /// These values, with every value `over` sets taking the place of this one.
  pub fn overlay(&self, over: &LimitsConfig) -> LimitsConfig {
    LimitsConfig {
      cpu_ms: over.cpu_ms.or(self.cpu_ms),
      soft_cpu_ms: over.soft_cpu_ms.or(self.soft_cpu_ms),
      memory_mb: over.memory_mb.or(self.memory_mb),
      wall_ms: over.wall_ms.or(self.wall_ms),
      max_concurrency: over.max_concurrency.or(self.max_concurrency),
      max_subrequests: over.max_subrequests.or(self.max_subrequests),
      allow_code_generation: over.allow_code_generation.or(self.allow_code_generation),
    }
  }

  /// Every value that cannot work, with the reason.
  pub fn problems(&self) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if self.memory_mb.is_some_and(|mb| mb < 16) {
      problems.push(("memory_mb", "must be at least 16".to_string()));
    }
    if self.cpu_ms == Some(0) {
      problems.push(("cpu_ms", "must be at least 1".to_string()));
    }
    if self.soft_cpu_ms == Some(0) {
      problems.push(("soft_cpu_ms", "must be at least 1".to_string()));
    }
    if let (Some(soft), Some(hard)) = (self.soft_cpu_ms, self.cpu_ms)
      && soft >= hard
    {
      problems.push((
        "soft_cpu_ms",
        format!("must be below cpu_ms ({hard}): the soft limit retires an isolate before the hard limit terminates it"),
      ));
    }
    if self.wall_ms == Some(0) {
      problems.push(("wall_ms", "must be at least 1".to_string()));
    }
    if self.max_concurrency == Some(0) {
      problems.push(("max_concurrency", "must be at least 1".to_string()));
    }
    problems
  }
}

/// Node-wide admission: the in-flight cap and the bounded wait queue.
pub struct Admission {
  node: Arc<Semaphore>,
  waiting: AtomicUsize,
  queue_depth: usize,
  queue_timeout: Duration,
}

/// Slots held by a request until its response has been sent.
pub struct Admitted {
  _node: OwnedSemaphorePermit,
  _function: OwnedSemaphorePermit,
}

/// Why a request was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
  /// The queue was full when the request came.
  QueueFull,
  /// No slot came free within the queue timeout.
  QueueTimeout,
}

impl Admission {
  /// Requests waiting for a slot.
  pub fn waiting(&self) -> usize {
    self.waiting.load(Ordering::Relaxed)
  }

  pub fn new(max_in_flight: usize, queue_depth: usize, queue_timeout: Duration) -> Admission {
    Admission {
      node: Arc::new(Semaphore::new(max_in_flight)),
      waiting: AtomicUsize::new(0),
      queue_depth,
      queue_timeout,
    }
  }

  /// Takes a node slot and a slot of `function` (a function's `max_concurrency` semaphore),
  /// waiting in the queue when needed.
  pub async fn admit(&self, function: &Arc<Semaphore>) -> Result<Admitted, Rejection> {
    if let (Ok(node), Ok(own)) = (
      self.node.clone().try_acquire_owned(),
      function.clone().try_acquire_owned(),
    ) {
      return Ok(Admitted {
        _node: node,
        _function: own,
      });
    }
    if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_depth {
      self.waiting.fetch_sub(1, Ordering::AcqRel);
      return Err(Rejection::QueueFull);
    }
    let acquire = async {
      let node = self.node.clone().acquire_owned().await;
      let own = function.clone().acquire_owned().await;
      (node, own)
    };
    let result = tokio::time::timeout(self.queue_timeout, acquire).await;
    self.waiting.fetch_sub(1, Ordering::AcqRel);
    match result {
      Ok((Ok(node), Ok(own))) => Ok(Admitted {
        _node: node,
        _function: own,
      }),
      // The semaphores are never closed; a timeout is the only way to fail.
      _ => Err(Rejection::QueueTimeout),
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn function_values_override_node_values_which_override_defaults() {
    let node = LimitsConfig {
      cpu_ms: Some(20),
      soft_cpu_ms: Some(10),
      wall_ms: Some(5000),
      max_subrequests: Some(7),
      ..LimitsConfig::default()
    };
    let function = LimitsConfig {
      memory_mb: Some(64),
      max_concurrency: Some(3),
      ..LimitsConfig::default()
    };
    assert_eq!(
      Limits::resolve(&function, &node),
      Limits {
        memory: 64 * 1024 * 1024,
        cpu: Duration::from_millis(20),
        soft_cpu: Some(Duration::from_millis(10)),
        wall: Duration::from_millis(5000),
        max_concurrency: 3,
        max_subrequests: 7,
        allow_code_generation: false,
      }
    );
    let defaults = Limits::resolve(&LimitsConfig::default(), &LimitsConfig::default());
    assert_eq!(defaults.max_concurrency, Limits::DEFAULT_MAX_CONCURRENCY);
    assert_eq!(defaults.max_subrequests, Limits::DEFAULT_MAX_SUBREQUESTS);
    assert_eq!(defaults.soft_cpu, None);
  }

  #[test]
  fn a_soft_cpu_limit_must_be_below_the_hard_one() {
    let limits = LimitsConfig {
      cpu_ms: Some(20),
      soft_cpu_ms: Some(20),
      ..LimitsConfig::default()
    };
    let problems = limits.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "soft_cpu_ms");
    assert!(problems[0].1.contains("below cpu_ms (20)"), "{problems:?}");
    // A node-wide soft limit above a function's own hard limit never fires: it is dropped.
    let function = LimitsConfig {
      cpu_ms: Some(5),
      ..LimitsConfig::default()
    };
    let node = LimitsConfig {
      soft_cpu_ms: Some(10),
      ..LimitsConfig::default()
    };
    assert_eq!(Limits::resolve(&function, &node).soft_cpu, None);
  }

  #[tokio::test]
  async fn a_full_queue_turns_requests_away_and_a_freed_slot_admits_a_waiter() {
    let admission = Admission::new(10, 1, Duration::from_secs(5));
    let function = Arc::new(Semaphore::new(1));
    let first = admission.admit(&function).await.unwrap();
    // The second request waits in the one-place queue; a third finds the queue full.
    let waiter = {
      let function = function.clone();
      let admission = &admission;
      async move { admission.admit(&function).await }
    };
    let (second, third) = tokio::join!(waiter, async {
      tokio::task::yield_now().await;
      let third = admission.admit(&function).await;
      drop(first);
      third
    });
    assert_eq!(third.err(), Some(Rejection::QueueFull));
    assert!(second.is_ok());

    let admission = Admission::new(10, 4, Duration::from_millis(50));
    let busy = Arc::new(Semaphore::new(0));
    assert_eq!(
      admission.admit(&busy).await.err(),
      Some(Rejection::QueueTimeout)
    );
  }
}
