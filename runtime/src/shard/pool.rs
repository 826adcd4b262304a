//! `IsolatePool`: the isolates of one function across the node, on the shards or in the slow
//! lane. Tenants never share an isolate: every isolate of a pool runs that pool's function
//! and nothing else.
//!
//! **Placement.** A request is served on the shard that received it when the function has an
//! isolate there with fewer than `isolate_concurrency` requests in flight. Otherwise:
//! - the function has isolates here, all busy: another one is started here (up to
//!   `max_isolates` across the node), else the request waits on the least busy one;
//! - it has none here but some on another shard: a function that is hot (at least
//!   [`SPREAD_RATE`] requests a second across the node) gets an isolate here, from the
//!   shard's spares (up to `max_isolates`); any other is forwarded to the shard that has one.
//!   So a hot function ends up with an isolate on every shard its clients reach, and a
//!   long-tail function keeps one isolate on one shard;
//! - it has none anywhere: one is started here.
//!
//! `prewarm` isolates are started with the pool, spread over the shards from one picked by
//! the function's name, and always kept; isolates above them idle for `idle_timeout_s` are
//! evicted. A pool started for a function that has had traffic starts as many as that
//! traffic needs ([`isolates_for`]), and a TLS handshake naming a function's host may start
//! the isolate its request will need ([`IsolatePool::prewarm_here`]). An isolate past its soft CPU limit takes no new requests and ends once it has
//! answered those it has.
//!
//! **Lanes.** An entry into JS holds its shard, so a function whose entries run long must
//! not live there: when [`LANE_STRIKES`] of [`LANE_WINDOW`] entries that answered requests ran
//! past `server.slow_lane_entry_ms` per request answered (an isolate's first request does not
//! count), or once it passes its soft CPU limit, the function
//! moves to the slow lane (`super::lane`) for good (its next version starts on the shards
//! again): its shard isolates finish what they have and end.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use outpost_ext_dispatch::DispatchRequest;
use tokio::sync::Notify;

use super::lane::{LaneHost, SlowLane};
use super::{IsolateWatch, LocalIsolate, Shard, Shards};
use crate::config::PoolConfig;
use crate::error::Error;
use crate::isolate::code_cache::CodeCacheCounts;
use crate::isolate::{Entry, FunctionSpec, InFlightGuard, IsolateStatus};
use crate::observe::usage_ledger::{RecentTraffic, UsageLedger};

/// Requests a second across the node from which a function gets an isolate on every shard
/// that receives its requests.
pub const SPREAD_RATE: u64 = 20;
/// Entries that answered requests, looked at together: a function moves to the slow lane
/// when at least [`LANE_STRIKES`] of them ran long. (One long entry now and then is noise:
/// a shard preempted mid-entry; a function whose entries run long runs long in most.)
pub const LANE_WINDOW: u32 = 10;
/// Long entries in a window of [`LANE_WINDOW`] after which a function moves.
pub const LANE_STRIKES: u32 = 5;

/// What every pool of a node shares: the shards, the slow lane's settings and the count of
/// functions moved to it.
pub struct PoolHost {
  pub shards: Arc<Shards>,
  pub lane: LaneHost,
  /// An entry into JS past this much CPU time counts against the function (see the module
  /// docs); `None`: functions never move.
  pub slow_entry: Option<Duration>,
  /// Functions moved to the slow lane so far (`outpost_lane_moves_total`).
  pub lane_moves: AtomicU64,
  /// Requests forwarded to another shard so far (`outpost_forwarded_requests_total`).
  pub forwarded: AtomicU64,
  next_id: AtomicU64,
}

impl PoolHost {
  pub fn new(shards: Arc<Shards>, lane: LaneHost, slow_entry: Option<Duration>) -> PoolHost {
    PoolHost {
      shards,
      lane,
      slow_entry,
      lane_moves: AtomicU64::new(0),
      forwarded: AtomicU64::new(0),
      next_id: AtomicU64::new(1),
    }
  }

  /// How many isolates a pool of function `name` starting now should have at once: what its
  /// recent traffic in `usage` needs ([`isolates_for`]), or 0 without any.
  pub fn warm_for(&self, usage: &UsageLedger, name: &str, config: &PoolConfig) -> usize {
    usage.recent(name, SystemTime::now()).map_or(0, |traffic| {
      isolates_for(traffic, config, self.shards.count())
    })
  }
}

pub struct IsolatePool {
  id: u64,
  host: Arc<PoolHost>,
  spec: FunctionSpec,
  config: PoolConfig,
  /// Every isolate of the pool on a shard, with its shard, while it lives.
  isolates: Mutex<Vec<(usize, Arc<IsolateStatus>)>>,
  /// Isolates being started, per shard.
  starting: Mutex<Vec<usize>>,
  /// Signalled whenever an isolate start ends, started or not.
  started: Notify,
  /// Set when the module fails to load; the function is then not served.
  load_error: Mutex<Option<String>>,
  rate: RequestRate,
  /// Entries looked at in the current window, and how many of them ran long (see
  /// [`LANE_WINDOW`]).
  window: Mutex<(u32, u32)>,
  /// Set once the function has moved to the slow lane.
  lane: OnceLock<SlowLane>,
  closed: AtomicBool,
  /// Whether an isolate is being started ahead of a request (see `prewarm_here`).
  prewarming: AtomicBool,
}

impl IsolatePool {
  /// Creates the pool and starts its pre-warmed isolates on the shards; with `prewarm = 0`
  /// the module is still loaded once, in an isolate that is then let go, so that a module
  /// that does not load is known before traffic comes. A load error is recorded (and
  /// logged) rather than returned: see [`IsolatePool::load_error`].
  ///
  /// `warm` (from the function's recent traffic, see [`PoolHost::warm_for`]) starts more isolates
  /// than `prewarm` at once; those above `prewarm` are evicted when idle as any other.
  pub async fn start(
    host: Arc<PoolHost>,
    spec: FunctionSpec,
    config: PoolConfig,
    warm: usize,
  ) -> Arc<IsolatePool> {
    let shards = host.shards.count();
    let pool = Arc::new(IsolatePool {
      id: host.next_id.fetch_add(1, Ordering::Relaxed),
      spec,
      config,
      isolates: Mutex::default(),
      starting: Mutex::new(vec![0; shards]),
      started: Notify::new(),
      load_error: Mutex::default(),
      rate: RequestRate::default(),
      window: Mutex::new((0, 0)),
      lane: OnceLock::new(),
      closed: AtomicBool::new(false),
      prewarming: AtomicBool::new(false),
      host,
    });
    let first = home_shard(pool.name(), shards);
    let warm = warm.min(pool.config.max_isolates);
    if warm > pool.config.prewarm {
      tracing::info!(function = %pool.name(), isolates = warm, "warming isolates for recent traffic");
    }
    let starts = (0..pool.config.prewarm.max(warm).max(1)).map(|k| {
      let pool = pool.clone();
      async move {
        let shard = (first + k) % pool.host.shards.count();
        let start = pool.clone();
        let _ = pool
          .host
          .shards
          .call_on(shard, move |shard| async move {
            start.start_here(&shard).await.map(drop)
          })
          .await;
      }
    });
    futures::future::join_all(starts).await;
    if pool.config.prewarm == 0 && warm == 0 {
      pool.close_isolates();
    }
    pool
  }

  pub fn name(&self) -> &str {
    &self.spec.code.name
  }

  /// How its isolates used the code caches of its modules.
  pub fn code_cache_counts(&self) -> CodeCacheCounts {
    self.spec.code.caches.counts()
  }

  pub fn idle_timeout(&self) -> Duration {
    Duration::from_secs(self.config.idle_timeout_s)
  }

  /// The load error, if the function's module does not load.
  pub fn load_error(&self) -> Option<String> {
    self.load_error.lock().expect("pool lock").clone()
  }

  /// Whether the function moved to the slow lane.
  pub fn in_slow_lane(&self) -> bool {
    self.lane.get().is_some()
  }

  /// Hands a request to one of the function's isolates (see the module docs for which).
  /// `shard` is the shard the request came in on; `None` for a request from elsewhere (a
  /// service binding call), which goes to a shard that hosts the function.
  pub async fn dispatch(
    self: &Arc<Self>,
    shard: Option<&Rc<Shard>>,
    request: DispatchRequest,
  ) -> Result<InFlightGuard, Error> {
    if let Some(message) = self.load_error() {
      return Err(Error::FunctionFailed {
        function: self.name().into(),
        message,
      });
    }
    self.rate.tick();
    if let Some(lane) = self.lane.get() {
      return lane.dispatch(self, request).await;
    }
    match shard {
      Some(shard) => self.dispatch_here(shard, request, true).await,
      None => {
        let target = self
          .shard_with_isolates(None)
          .unwrap_or_else(|| home_shard(self.name(), self.host.shards.count()));
        self.forward(target, request).await
      }
    }
  }

  /// Serves `request` on `shard`, or forwards it (when `may_forward`) as placement says.
  async fn dispatch_here(
    self: &Arc<Self>,
    shard: &Rc<Shard>,
    mut request: DispatchRequest,
    may_forward: bool,
  ) -> Result<InFlightGuard, Error> {
    // Each round either hands the request over, or waits for an isolate to be started;
    // an isolate that closes meanwhile costs a round.
    for _ in 0..8 {
      if let Some(lane) = self.lane.get() {
        return lane.dispatch(self, request).await;
      }
      let least = shard.least_busy(self.id);
      let (_, starting_here) = shard.counts(self.id);
      let busy = |isolate: &LocalIsolate| {
        isolate.status.in_flight() + isolate.queue.len() >= self.config.isolate_concurrency
      };
      let isolate = match least {
        Some(isolate) if !busy(&isolate) => isolate,
        Some(isolate) if starting_here > 0 || !self.has_room() => isolate,
        Some(_) => match self.start_here(shard).await {
          Ok(isolate) => isolate,
          Err(err) => return Err(err),
        },
        None => {
          let elsewhere = self.shard_with_isolates(Some(shard.id));
          let spread = self.rate.per_second() >= SPREAD_RATE && self.has_room();
          match elsewhere {
            Some(target) if may_forward && !spread => {
              return self.forward(target, request).await;
            }
            _ if starting_here > 0 || !self.has_room() => {
              // An isolate is on its way (here or, at the maximum, anywhere): wait for it.
              let started = self.started.notified();
              if starting_here > 0 || self.starting_total() > 0 {
                started.await;
              } else if let Some(target) = elsewhere.filter(|_| may_forward) {
                return self.forward(target, request).await;
              } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
              }
              continue;
            }
            _ => self.start_here(shard).await?,
          }
        }
      };
      // Nothing runs between the push and `begin`: the isolate's task is on this thread.
      match isolate.queue.push(request) {
        Ok(()) => return Ok(isolate.status.begin()),
        Err(returned) => request = *returned,
      }
    }
    Err(Error::FunctionUnavailable {
      function: self.name().into(),
      message: "its isolates stopped while taking the request".into(),
    })
  }

  /// Sends `request` to shard `target` to be served there.
  async fn forward(
    self: &Arc<Self>,
    target: usize,
    request: DispatchRequest,
  ) -> Result<InFlightGuard, Error> {
    self.host.forwarded.fetch_add(1, Ordering::Relaxed);
    let pool = self.clone();
    self
      .host
      .shards
      .call_on(target, move |shard| async move {
        pool.dispatch_here(&shard, request, false).await
      })
      .await?
  }

  /// Starts an isolate on `shard` ahead of a request that is on its way (a TLS handshake
  /// named a host the function serves), when that request would start one anyway: the
  /// function has no isolate here or being started, none elsewhere it would be forwarded
  /// to, and room for one more. At most one pre-warm per function and shard, and `limit`
  /// per shard, are under way at once. Returns whether it started one.
  pub fn prewarm_here(self: &Arc<Self>, shard: &Rc<Shard>, limit: usize) -> bool {
    if self.load_error().is_some()
      || self.lane.get().is_some()
      || self.closed.load(Ordering::Acquire)
      || shard.counts(self.id) != (0, 0)
      || self.starting_total() > 0
      || !self.has_room()
    {
      return false;
    }
    let forwarded = self.shard_with_isolates(Some(shard.id)).is_some();
    if forwarded && self.rate.per_second() < SPREAD_RATE {
      return false;
    }
    if !shard.begin_prewarm(self.id, limit) {
      return false;
    }
    // Handshakes for the host may arrive on several shards at once: one of them pre-warms.
    if self.prewarming.swap(true, Ordering::AcqRel) {
      shard.end_prewarm(self.id);
      return false;
    }
    tracing::info!(function = %self.name(), shard = shard.id, "pre-warming an isolate for a TLS handshake naming its host");
    let (pool, shard) = (self.clone(), shard.clone());
    tokio::task::spawn_local(async move {
      // A failure is recorded as start_here records it; the request that follows meets it.
      let _ = pool.start_here(&shard).await;
      shard.end_prewarm(pool.id);
      pool.prewarming.store(false, Ordering::Release);
    });
    true
  }

  /// Whether the pool may have another isolate.
  fn has_room(&self) -> bool {
    let live = self.isolates.lock().expect("pool lock").len();
    live + self.starting_total() < self.config.max_isolates
  }

  fn starting_total(&self) -> usize {
    self.starting.lock().expect("pool lock").iter().sum()
  }

  /// The shard (not `except`) with the most of the pool's isolates, if any has one.
  fn shard_with_isolates(&self, except: Option<usize>) -> Option<usize> {
    let isolates = self.isolates.lock().expect("pool lock");
    let mut counts = vec![0usize; self.host.shards.count()];
    for (shard, status) in isolates.iter() {
      if !status.ended() && !status.retired() {
        counts[*shard] += 1;
      }
    }
    counts
      .iter()
      .enumerate()
      .filter(|(shard, count)| Some(*shard) != except && **count > 0)
      .max_by_key(|(_, count)| **count)
      .map(|(shard, _)| shard)
  }

  /// Starts an isolate of the function on `shard` (this thread) and waits until it serves.
  async fn start_here(self: &Arc<Self>, shard: &Rc<Shard>) -> Result<LocalIsolate, Error> {
    self.starting.lock().expect("pool lock")[shard.id] += 1;
    let watch = PoolWatch {
      pool: Arc::downgrade(self),
      shard: shard.id,
    };
    let started = shard.start_isolate(self.id, &self.spec, watch).await;
    self.starting.lock().expect("pool lock")[shard.id] -= 1;
    let result = match started {
      Ok(isolate) => {
        if self.closed.load(Ordering::Acquire) {
          shard.close_pool(self.id);
        }
        self
          .isolates
          .lock()
          .expect("pool lock")
          .push((shard.id, isolate.status.clone()));
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
    };
    self.started.notify_waiters();
    result
  }

  /// Moves the function to the slow lane (once): new requests go there, its isolates on the
  /// shards finish what they have and end.
  fn move_to_slow_lane(&self, why: &str) {
    let mut moved = false;
    self.lane.get_or_init(|| {
      moved = true;
      SlowLane::new(
        self.host.lane.clone(),
        self.spec.clone(),
        self.config.clone(),
      )
    });
    if moved {
      self.host.lane_moves.fetch_add(1, Ordering::Relaxed);
      tracing::info!(function = %self.name(), reason = why, "function moved to the slow lane");
      self.close_isolates_on_shards();
    }
  }

  /// Called on shard `shard` every eviction period: forgets isolates that ended or retired
  /// there, and closes idle ones above `prewarm` (idle past the timeout).
  pub fn sweep(&self, shard: &Shard) {
    let timeout = self.idle_timeout();
    let prewarm = self.config.prewarm;
    let mut live = self.isolate_counts().0 + self.isolate_counts().1;
    shard.sweep(self.id, |status| {
      let evict = live > prewarm && status.idle_for() >= timeout;
      if evict {
        live -= 1;
        tracing::debug!(function = %self.name(), shard = shard.id, "evicted an idle isolate");
      }
      evict
    });
    if let Some(lane) = self.lane.get() {
      lane.sweep(timeout, prewarm);
    }
  }

  /// (idle, busy) isolates: busy ones have at least one request in flight.
  pub fn isolate_counts(&self) -> (usize, usize) {
    let isolates = self.isolates.lock().expect("pool lock");
    let (mut idle, mut busy) = (0, 0);
    for (_, status) in isolates.iter().filter(|(_, s)| !s.ended()) {
      if status.in_flight() > 0 {
        busy += 1;
      } else {
        idle += 1;
      }
    }
    if let Some(lane) = self.lane.get() {
      let (lane_idle, lane_busy) = lane.isolate_counts();
      idle += lane_idle;
      busy += lane_busy;
    }
    (idle, busy)
  }

  /// Requests in flight on the pool's isolates.
  pub fn in_flight(&self) -> usize {
    let isolates = self.isolates.lock().expect("pool lock");
    let shards: usize = isolates.iter().map(|(_, s)| s.in_flight()).sum();
    shards + self.lane.get().map_or(0, SlowLane::in_flight)
  }

  /// Shard ids the pool has isolates on (`outpost_function_shards`).
  pub fn shards_hosting(&self) -> Vec<usize> {
    let isolates = self.isolates.lock().expect("pool lock");
    let mut shards: Vec<usize> = isolates
      .iter()
      .filter(|(_, s)| !s.ended())
      .map(|(shard, _)| *shard)
      .collect();
    shards.sort_unstable();
    shards.dedup();
    shards
  }

  /// Closes every isolate's queue; they finish their requests and `waitUntil` work, then
  /// end. The pool takes no more requests.
  pub fn close(&self) {
    self.closed.store(true, Ordering::Release);
    self.close_isolates();
  }

  fn close_isolates(&self) {
    self.close_isolates_on_shards();
    if let Some(lane) = self.lane.get() {
      lane.close();
    }
  }

  fn close_isolates_on_shards(&self) {
    let id = self.id;
    for shard in 0..self.host.shards.count() {
      self
        .host
        .shards
        .run_on(shard, move |shard| shard.close_pool(id));
    }
  }
}

impl Drop for IsolatePool {
  fn drop(&mut self) {
    // The function is no longer served: its isolates finish what they have and end.
    self.close_isolates();
  }
}

/// What a pool learns from each of its isolates on a shard.
struct PoolWatch {
  pool: Weak<IsolatePool>,
  shard: usize,
}

impl IsolateWatch for PoolWatch {
  fn entered(&mut self, status: &IsolateStatus, entry: Entry) {
    let Some(pool) = self.pool.upgrade() else {
      return;
    };
    if pool.lane.get().is_some() {
      return;
    }
    if status.retired() {
      tracing::info!(function = %pool.name(), shard = self.shard, "isolate retired: soft CPU limit");
      pool.move_to_slow_lane("soft CPU limit");
      return;
    }
    let Some(threshold) = pool.host.slow_entry else {
      return;
    };
    // An entry killed at the CPU limit held the shard for the whole limit. It is never an
    // isolate's warm-up (below) and its isolate is replaced, so the next one would be on its
    // first request again: without this, a function killed on every request would stay.
    if status.terminated_for_cpu().is_some() {
      pool.move_to_slow_lane("terminated at the CPU limit");
      return;
    }
    // The work of an entry per request it answered: an entry that answers many requests at
    // once (their timers fired together) is busy, not slow. An isolate's first request
    // compiles and warms up its code: not held against it.
    if entry.answered == 0 || status.answered() == 0 {
      return;
    }
    let per_request = entry.cpu / u32::try_from(entry.answered).unwrap_or(u32::MAX);
    let long = {
      let mut window = pool.window.lock().expect("pool lock");
      window.0 += 1;
      window.1 += u32::from(per_request >= threshold);
      let long = window.1;
      if window.0 >= LANE_WINDOW {
        *window = (0, 0);
      }
      long
    };
    if long >= LANE_STRIKES {
      pool.move_to_slow_lane("entries into JS past server.slow_lane_entry_ms");
    }
  }

  fn ended(self, status: &IsolateStatus, how: Result<(), String>) {
    let Some(pool) = self.pool.upgrade() else {
      return;
    };
    pool
      .isolates
      .lock()
      .expect("pool lock")
      .retain(|(_, s)| !std::ptr::eq(s.as_ref(), status));
    if let Err(reason) = how {
      tracing::error!(function = %pool.name(), shard = self.shard, %reason, "isolate ended");
    }
  }
}

/// The shard a function's first isolate goes to: spread by name.
/// Isolates a function needs to take `traffic` at once: enough for its requests in flight
/// (`isolate_concurrency` each), and one per shard when it is hot enough to spread to every
/// shard ([`SPREAD_RATE`]), within `max_isolates`.
fn isolates_for(traffic: RecentTraffic, config: &PoolConfig, shards: usize) -> usize {
  let for_load = (traffic.in_flight / config.isolate_concurrency.max(1) as f64).ceil() as usize;
  let for_spread = if traffic.requests_per_second >= SPREAD_RATE as f64 {
    shards
  } else {
    1
  };
  for_load.max(for_spread).min(config.max_isolates)
}

fn home_shard(name: &str, shards: usize) -> usize {
  use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
  (BuildHasherDefault::<DefaultHasher>::default().hash_one(name) % shards as u64) as usize
}

/// Requests counted per second, over the last whole second.
struct RequestRate {
  /// Where seconds are counted from.
  epoch: Instant,
  /// The second being counted (since `epoch`).
  second: AtomicU64,
  current: AtomicU64,
  /// The count of the second before.
  previous: AtomicU64,
}

impl Default for RequestRate {
  fn default() -> Self {
    RequestRate {
      epoch: Instant::now(),
      second: AtomicU64::new(0),
      current: AtomicU64::new(0),
      previous: AtomicU64::new(0),
    }
  }
}

impl RequestRate {
  fn now(&self) -> u64 {
    self.epoch.elapsed().as_secs()
  }

  fn tick(&self) {
    let now = self.now();
    let second = self.second.load(Ordering::Relaxed);
    if second != now
      && self
        .second
        .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
      let counted = self.current.swap(0, Ordering::Relaxed);
      self.previous.store(
        if now == second + 1 { counted } else { 0 },
        Ordering::Relaxed,
      );
    }
    self.current.fetch_add(1, Ordering::Relaxed);
  }

  /// Requests in the last whole second (or in this one, when it is already busier).
  fn per_second(&self) -> u64 {
    let now = self.now();
    let second = self.second.load(Ordering::Relaxed);
    let current = self.current.load(Ordering::Relaxed);
    match now.saturating_sub(second) {
      0 => self.previous.load(Ordering::Relaxed).max(current),
      1 => current,
      _ => 0,
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn traffic_sizes_a_new_version_by_requests_in_flight_and_spread() {
    let config = PoolConfig::default();
    let traffic = |requests_per_second, in_flight| RecentTraffic {
      requests_per_second,
      in_flight,
    };
    // 24 in flight at 16 per isolate: two.
    assert_eq!(isolates_for(traffic(1000.0, 24.0), &config, 2), 2);
    // More than max_isolates would take: capped.
    assert_eq!(
      isolates_for(traffic(1000.0, 100.0), &config, 2),
      config.max_isolates
    );
    // Hot but light: one per shard.
    assert_eq!(isolates_for(traffic(50.0, 0.5), &config, 3), 3);
    // Quiet: one.
    assert_eq!(isolates_for(traffic(1.0, 0.1), &config, 2), 1);
  }
}
