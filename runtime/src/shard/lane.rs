//! The slow lane: isolates of CPU-heavy functions on threads of their own, so that their long
//! entries into JS never hold a shard (see `super::pool` for when a function moves here).
//!
//! Each isolate has an OS thread with a current-thread runtime; requests reach it over a
//! channel (a message per request, the answer coming back through the request's own
//! oneshot), and a task on that thread pushes them onto the isolate's queue. Long entries
//! are demoted to `SCHED_IDLE` while they run (`server.demote_long_entries`), so the shards
//! get a core first.

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_ext_dispatch::DispatchRequest;
use tokio::sync::{mpsc, oneshot};

use super::pool::IsolatePool;
use super::{IsolateWatch, drive, thread_runtime};
use crate::config::PoolConfig;
use crate::error::Error;
use crate::isolate::{
  BlankIsolate, Entry, FunctionSpec, InFlightGuard, IsolateSettings, IsolateStatus,
};
use crate::limits::cpu::{CpuWatchdog, ThreadMeter};

/// What slow-lane isolates are created with.
#[derive(Clone)]
pub struct LaneHost {
  pub settings: IsolateSettings,
  pub watchdog: Arc<CpuWatchdog>,
  /// Demote long entries (`server.demote_long_entries`).
  pub demote: bool,
}

/// A function's isolates in the slow lane.
pub struct SlowLane {
  host: LaneHost,
  spec: FunctionSpec,
  config: PoolConfig,
  isolates: Mutex<Vec<LaneIsolate>>,
  /// Serialises isolate start-ups so a burst of requests starts one isolate, not many.
  growth: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct LaneIsolate {
  sender: mpsc::UnboundedSender<DispatchRequest>,
  status: Arc<IsolateStatus>,
}

impl SlowLane {
  pub fn new(host: LaneHost, spec: FunctionSpec, config: PoolConfig) -> SlowLane {
    SlowLane {
      host,
      spec,
      config,
      isolates: Mutex::default(),
      growth: tokio::sync::Mutex::new(()),
    }
  }

  /// Hands a request to the least busy isolate, starting another (up to `max_isolates`)
  /// when all are busy.
  pub async fn dispatch(
    &self,
    pool: &IsolatePool,
    mut request: DispatchRequest,
  ) -> Result<InFlightGuard, Error> {
    for _ in 0..4 {
      let isolate = match self.pick() {
        (Some(isolate), false) => isolate,
        (least, true) => {
          let _growing = self.growth.lock().await;
          match (self.pick(), least) {
            ((_, true), _) => self.start(pool.name()).await?,
            ((Some(isolate), false), _) => isolate,
            ((None, false), Some(isolate)) => isolate,
            ((None, false), None) => self.start(pool.name()).await?,
          }
        }
        (None, false) => self.start(pool.name()).await?,
      };
      let guard = isolate.status.begin();
      match isolate.sender.send(request) {
        Ok(()) => return Ok(guard),
        Err(returned) => {
          request = returned.0;
          self.remove(&isolate.status);
        }
      }
    }
    Err(Error::FunctionUnavailable {
      function: pool.name().into(),
      message: "its slow-lane isolates stopped while taking the request".into(),
    })
  }

  /// The least busy open isolate, and whether another should be started.
  fn pick(&self) -> (Option<LaneIsolate>, bool) {
    let mut isolates = self.isolates.lock().expect("lane lock");
    isolates.retain(|i| !i.status.ended() && !i.status.retired());
    let least = isolates
      .iter()
      .min_by_key(|i| i.status.in_flight())
      .cloned();
    let busy = least
      .as_ref()
      .is_none_or(|i| i.status.in_flight() >= self.config.isolate_concurrency);
    (least, busy && isolates.len() < self.config.max_isolates)
  }

  fn remove(&self, status: &Arc<IsolateStatus>) {
    self
      .isolates
      .lock()
      .expect("lane lock")
      .retain(|i| !Arc::ptr_eq(&i.status, status));
  }

  /// Starts an isolate of the function on a thread of its own and waits until it serves.
  async fn start(&self, function: &str) -> Result<LaneIsolate, Error> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let (ready, is_ready) = oneshot::channel();
    let host = self.host.clone();
    let spec = self.spec.clone();
    std::thread::Builder::new()
      .name(format!("lane:{function}"))
      .spawn(move || run_lane_isolate(host, spec, receiver, ready))
      .map_err(|err| Error::IsolateThread(err.to_string()))?;
    let status = is_ready
      .await
      .map_err(|_| Error::IsolateCreate("the slow-lane thread ended while starting".into()))??;
    tracing::info!(function, "isolate ready in the slow lane");
    let isolate = LaneIsolate { sender, status };
    self
      .isolates
      .lock()
      .expect("lane lock")
      .push(isolate.clone());
    Ok(isolate)
  }

  /// Lets idle isolates above `prewarm` go (idle past `timeout`).
  pub fn sweep(&self, timeout: Duration, prewarm: usize) {
    let mut isolates = self.isolates.lock().expect("lane lock");
    let mut live = isolates.len();
    isolates.retain(|i| {
      let evict = live > prewarm && i.status.in_flight() == 0 && i.status.idle_for() >= timeout;
      if evict {
        live -= 1;
      }
      !evict && !i.status.ended()
    });
  }

  /// (idle, busy) isolates.
  pub fn isolate_counts(&self) -> (usize, usize) {
    let isolates = self.isolates.lock().expect("lane lock");
    let busy = isolates.iter().filter(|i| i.status.in_flight() > 0).count();
    (isolates.len() - busy, busy)
  }

  /// Requests in flight on the lane's isolates.
  pub fn in_flight(&self) -> usize {
    let isolates = self.isolates.lock().expect("lane lock");
    isolates.iter().map(|i| i.status.in_flight()).sum()
  }

  /// Lets every isolate go: they finish what they have, then their threads end.
  pub fn close(&self) {
    self.isolates.lock().expect("lane lock").clear();
  }
}

/// Logs how a slow-lane isolate ended.
struct LaneWatch(String);

impl IsolateWatch for LaneWatch {
  fn entered(&mut self, _: &IsolateStatus, _: Entry) {}

  fn ended(self, _: &IsolateStatus, how: Result<(), String>) {
    if let Err(reason) = how {
      tracing::error!(function = %self.0, %reason, "slow-lane isolate ended");
    }
  }
}

/// A slow-lane isolate's thread: creates the isolate, moves requests from the channel onto
/// its queue, drives it until it is done.
fn run_lane_isolate(
  host: LaneHost,
  spec: FunctionSpec,
  mut requests: mpsc::UnboundedReceiver<DispatchRequest>,
  ready: oneshot::Sender<Result<Arc<IsolateStatus>, Error>>,
) {
  let runtime = match thread_runtime() {
    Ok(runtime) => runtime,
    Err(err) => {
      let _ = ready.send(Err(err));
      return;
    }
  };
  tokio::task::LocalSet::new().block_on(&runtime, async move {
    let meter = ThreadMeter::for_this_thread(&host.watchdog, host.demote);
    let started = match BlankIsolate::new(&host.settings) {
      Ok(blank) => {
        blank
          .start_function(&spec, &meter, host.settings.load_timeout)
          .await
      }
      Err(err) => Err(err),
    };
    let isolate = match started {
      Ok(isolate) => isolate,
      Err(err) => {
        let _ = ready.send(Err(err));
        return;
      }
    };
    let status = IsolateStatus::new(&isolate);
    let _ = ready.send(Ok(status.clone()));
    let queue: Rc<_> = isolate.queue().clone();
    tokio::task::spawn_local(async move {
      while let Some(request) = requests.recv().await {
        if queue.push(request).is_err() {
          break;
        }
      }
      queue.close();
    });
    drive(isolate, status, LaneWatch(spec.code.name.clone())).await;
  });
}
