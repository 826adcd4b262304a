//! Shards: HTTP and JavaScript on the same threads.
//!
//! A shard is one OS thread with a current-thread tokio runtime. It accepts connections on
//! its own `SO_REUSEPORT` sockets, runs hyper for them (see `crate::http`), and hosts the
//! isolates of many functions, entered only while they run (`crate::isolate::guest`). A
//! request whose function has an isolate on the receiving shard reaches it on the same
//! thread: the request is pushed onto the isolate's queue and its serve loop woken with a
//! local waker, and the answer comes back the same way, with no channel to another thread, no
//! eventfd or futex wake-up in between. Each isolate's event loop is a task of its shard.
//!
//! Which shards host a function, and when a request is forwarded to another shard instead,
//! is [`pool`]'s business. Functions whose entries into JS run long leave the shards for the
//! slow lane ([`lane`]): isolates on threads of their own, behind a channel.
//!
//! Work reaches a shard from other threads as a [`ShardJob`] (a closure run on the shard)
//! over a channel: forwarded requests, pre-warming, closing a function's isolates.

pub mod lane;
pub mod pool;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;

use outpost_ext_dispatch::RequestQueue;
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::isolate::{BlankIsolate, Entry, FunctionSpec, Isolate, IsolateSettings, IsolateStatus};
use crate::limits::cpu::{CpuWatchdog, ThreadMeter};

/// How long nothing may arrive on a shard before a spare isolate is created there.
const SPARE_QUIET: std::time::Duration = std::time::Duration::from_millis(10);
/// How long a spare waits for a quiet moment at most.
const SPARE_PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);

/// Work for a shard, run on its thread.
pub type ShardJob = Box<dyn FnOnce(&Rc<Shard>) + Send>;

/// The node's shards, reachable from any thread.
pub struct Shards {
  senders: Vec<mpsc::UnboundedSender<ShardJob>>,
}

impl std::fmt::Debug for Shards {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    write!(f, "Shards({})", self.senders.len())
  }
}

impl Shards {
  /// Starts `count` shard threads, each keeping `spares` blank isolates ready. Returns once
  /// every shard runs and has created its first spares.
  pub fn start(
    count: usize,
    spares: usize,
    settings: IsolateSettings,
    watchdog: Arc<CpuWatchdog>,
  ) -> Result<Arc<Shards>, Error> {
    let mut senders = Vec::with_capacity(count);
    let mut started = Vec::with_capacity(count);
    for id in 0..count {
      let (sender, receiver) = mpsc::unbounded_channel();
      let (ready, is_ready) = std::sync::mpsc::channel();
      let settings = settings.clone();
      let watchdog = watchdog.clone();
      std::thread::Builder::new()
        .name(format!("shard-{id}"))
        .spawn(move || run_shard(id, spares, settings, watchdog, receiver, ready))
        .map_err(|err| Error::IsolateThread(err.to_string()))?;
      senders.push(sender);
      started.push(is_ready);
    }
    for is_ready in started {
      is_ready
        .recv()
        .map_err(|_| Error::IsolateThread("a shard thread ended while starting".into()))??;
    }
    Ok(Arc::new(Shards { senders }))
  }

  /// How many shards there are.
  pub fn count(&self) -> usize {
    self.senders.len()
  }

  /// Runs `job` on shard `id` (its thread), after what was sent to it before.
  pub fn run_on(&self, id: usize, job: impl FnOnce(&Rc<Shard>) + Send + 'static) {
    // A shard whose thread is gone (the process is ending) drops the job.
    let _ = self.senders[id % self.senders.len()].send(Box::new(job));
  }

  /// Runs the future `task` makes on shard `id` and waits for its result.
  pub async fn call_on<R, F>(
    &self,
    id: usize,
    task: impl FnOnce(Rc<Shard>) -> F + Send + 'static,
  ) -> Result<R, Error>
  where
    R: Send + 'static,
    F: Future<Output = R> + 'static,
  {
    let (reply, replied) = oneshot::channel();
    self.run_on(id, move |shard| {
      let shard = shard.clone();
      tokio::task::spawn_local(async move {
        let _ = reply.send(task(shard).await);
      });
    });
    replied
      .await
      .map_err(|_| Error::IsolateThread(format!("shard {id} has stopped")))
  }
}

/// One shard, seen from its own thread.
pub struct Shard {
  pub id: usize,
  settings: IsolateSettings,
  /// The CPU meter of this thread: every entry into JS here is metered on it.
  meter: Arc<ThreadMeter>,
  /// Blank isolates waiting for a function.
  spares: RefCell<Vec<BlankIsolate>>,
  /// How many spares to keep.
  spare_target: usize,
  /// Whether a refill of the spares is under way.
  refilling: Cell<bool>,
  /// Connections and requests this shard has taken so far: the spare refill waits for a
  /// moment when it stops moving.
  arrivals: Cell<u64>,
  /// Isolates of each function on this shard, by pool id.
  pools: RefCell<HashMap<u64, LocalPool>>,
  /// Pools whose isolate is being started here ahead of a request (`IsolatePool::prewarm_here`).
  prewarming: RefCell<std::collections::HashSet<u64>>,
}

/// The isolates of one function on one shard.
#[derive(Default)]
struct LocalPool {
  isolates: Vec<LocalIsolate>,
  /// Isolates being started here for the function.
  starting: usize,
}

/// A serving isolate of this shard, as dispatch sees it; the isolate itself belongs to its
/// event-loop task.
#[derive(Clone)]
pub struct LocalIsolate {
  pub queue: Rc<RequestQueue>,
  pub status: Arc<IsolateStatus>,
}

impl LocalIsolate {
  /// Whether it may take a new request.
  fn open(&self) -> bool {
    !self.status.ended() && !self.status.retired() && !self.queue.is_closed()
  }
}

impl Shard {
  /// The meter of this shard's thread.
  pub fn meter(&self) -> &Arc<ThreadMeter> {
    &self.meter
  }

  /// The least busy open isolate of pool `id` here, with its requests in flight.
  pub fn least_busy(&self, id: u64) -> Option<LocalIsolate> {
    let pools = self.pools.borrow();
    pools
      .get(&id)?
      .isolates
      .iter()
      .filter(|i| i.open())
      .min_by_key(|i| i.status.in_flight() + i.queue.len())
      .cloned()
  }

  /// Marks pool `id` as pre-warming here, unless it already is or `limit` pre-warms are
  /// under way; returns whether it was marked.
  pub fn begin_prewarm(&self, id: u64, limit: usize) -> bool {
    let mut prewarming = self.prewarming.borrow_mut();
    prewarming.len() < limit && prewarming.insert(id)
  }

  pub fn end_prewarm(&self, id: u64) {
    self.prewarming.borrow_mut().remove(&id);
  }

  /// Open isolates of pool `id` here, and those being started.
  pub fn counts(&self, id: u64) -> (usize, usize) {
    self.pools.borrow().get(&id).map_or((0, 0), |pool| {
      (
        pool.isolates.iter().filter(|i| i.open()).count(),
        pool.starting,
      )
    })
  }

  /// Starts an isolate of `spec` here for pool `id`, from a spare when one is ready, and
  /// waits until it serves (or fails to load). `watch` sees each entry into JS (its CPU
  /// time) and how the isolate ends.
  pub async fn start_isolate(
    self: &Rc<Self>,
    id: u64,
    spec: &FunctionSpec,
    watch: impl IsolateWatch + 'static,
  ) -> Result<LocalIsolate, Error> {
    self.pools.borrow_mut().entry(id).or_default().starting += 1;
    let started = std::time::Instant::now();
    let spare = self.spares.borrow_mut().pop();
    let (blank, from) = match spare {
      Some(blank) => (Ok(blank), "spare"),
      None => (BlankIsolate::new(&self.settings), "snapshot"),
    };
    self.refill_spares();
    let loaded = match blank {
      Ok(blank) => {
        blank
          .start_function(spec, &self.meter, self.settings.load_timeout)
          .await
      }
      Err(err) => Err(err),
    };
    let mut pools = self.pools.borrow_mut();
    let pool = pools.entry(id).or_default();
    pool.starting -= 1;
    let isolate = loaded?;
    tracing::info!(
      function = spec.code.name.as_str(),
      from,
      shard = self.id,
      ready_ms = started.elapsed().as_secs_f64() * 1e3,
      "isolate ready"
    );
    let local = LocalIsolate {
      queue: isolate.queue().clone(),
      status: IsolateStatus::new(&isolate),
    };
    pool.isolates.push(local.clone());
    drop(pools);
    tokio::task::spawn_local(drive(isolate, local.status.clone(), watch));
    Ok(local)
  }

  /// Closes the queues of pool `id`'s isolates here (they finish what they have, then end)
  /// and forgets them.
  pub fn close_pool(&self, id: u64) {
    if let Some(pool) = self.pools.borrow_mut().remove(&id) {
      for isolate in pool.isolates {
        isolate.queue.close();
      }
    }
  }

  /// Forgets the isolates of pool `id` that ended or retired (closing the queues of the
  /// retired ones), and closes the idle ones `evict` picks; returns how many are left open.
  pub fn sweep(&self, id: u64, mut evict: impl FnMut(&IsolateStatus) -> bool) -> usize {
    let mut pools = self.pools.borrow_mut();
    let Some(pool) = pools.get_mut(&id) else {
      return 0;
    };
    pool.isolates.retain(|isolate| {
      let keep = isolate.open() && !(isolate.status.in_flight() == 0 && evict(&isolate.status));
      if !keep {
        isolate.queue.close();
      }
      keep
    });
    let open = pool.isolates.len();
    if open == 0 && pool.starting == 0 {
      pools.remove(&id);
    }
    open
  }

  /// Blank isolates ready for a function here.
  pub fn spare_count(&self) -> usize {
    self.spares.borrow().len()
  }

  /// Pool ids with isolates here.
  pub fn pool_ids(&self) -> Vec<u64> {
    self.pools.borrow().keys().copied().collect()
  }

  /// Counts a connection or request that arrived here.
  pub fn arrived(&self) {
    self.arrivals.set(self.arrivals.get() + 1);
  }

  /// Creates spares up to the target, one at a time, each at a quiet moment: creating one
  /// blocks the thread for a few milliseconds, and a request that arrives meanwhile (often
  /// the first request of the function that just took the spare) waits for it. So each
  /// waits until [`SPARE_QUIET`] passes with nothing arriving on the shard, or at most
  /// [`SPARE_PATIENCE`] on a shard that is never quiet.
  fn refill_spares(self: &Rc<Self>) {
    if self.refilling.get() || self.spares.borrow().len() >= self.spare_target {
      return;
    }
    self.refilling.set(true);
    let shard = self.clone();
    tokio::task::spawn_local(async move {
      while shard.spares.borrow().len() < shard.spare_target {
        let deadline = tokio::time::Instant::now() + SPARE_PATIENCE;
        loop {
          let seen = shard.arrivals.get();
          tokio::time::sleep(SPARE_QUIET).await;
          if shard.arrivals.get() == seen || tokio::time::Instant::now() >= deadline {
            break;
          }
        }
        match BlankIsolate::new(&shard.settings) {
          Ok(blank) => shard.spares.borrow_mut().push(blank),
          Err(err) => {
            tracing::warn!(shard = shard.id, error = %err, "cannot create a spare isolate");
            break;
          }
        }
      }
      shard.refilling.set(false);
    });
  }
}

/// What the owner of an isolate learns from its event-loop task.
pub trait IsolateWatch {
  /// An entry into JS ended.
  fn entered(&mut self, status: &IsolateStatus, entry: Entry);
  /// The isolate ended: its serve loop finished (`Ok`), or a limit or an error ended it.
  fn ended(self, status: &IsolateStatus, how: Result<(), String>);
}

/// The event-loop task of one isolate: every poll is one metered entry into JS. Ends when
/// the isolate is done; the isolate is dropped here, on its thread.
pub async fn drive(mut isolate: Isolate, status: Arc<IsolateStatus>, mut watch: impl IsolateWatch) {
  let ended = poll_fn(|cx| {
    let (polled, entry) = isolate.poll_entry(cx);
    watch.entered(&status, entry);
    polled
  })
  .await;
  isolate.queue().close();
  status.end();
  watch.ended(&status, ended);
  drop(isolate);
}

/// The runtime of a thread that hosts isolates (a shard or a slow-lane isolate): current-thread,
/// its isolates' event loops are local tasks on it.
fn thread_runtime() -> Result<tokio::runtime::Runtime, Error> {
  tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .map_err(|err| Error::IsolateThread(err.to_string()))
}

/// A shard thread: its runtime, its spares, and the jobs sent to it until the node stops.
fn run_shard(
  id: usize,
  spares: usize,
  settings: IsolateSettings,
  watchdog: Arc<CpuWatchdog>,
  mut jobs: mpsc::UnboundedReceiver<ShardJob>,
  ready: std::sync::mpsc::Sender<Result<(), Error>>,
) {
  let runtime = match thread_runtime() {
    Ok(runtime) => runtime,
    Err(err) => {
      let _ = ready.send(Err(err));
      return;
    }
  };
  tokio::task::LocalSet::new().block_on(&runtime, async move {
    let shard = Rc::new(Shard {
      id,
      meter: ThreadMeter::for_this_thread(&watchdog, false),
      spares: RefCell::new(Vec::with_capacity(spares)),
      spare_target: spares,
      refilling: Cell::new(false),
      arrivals: Cell::new(0),
      pools: RefCell::default(),
      prewarming: RefCell::default(),
      settings,
    });
    // The first spares exist before the shard takes traffic.
    for _ in 0..spares {
      match BlankIsolate::new(&shard.settings) {
        Ok(blank) => shard.spares.borrow_mut().push(blank),
        Err(err) => {
          let _ = ready.send(Err(err));
          return;
        }
      }
    }
    let _ = ready.send(Ok(()));
    while let Some(job) = jobs.recv().await {
      job(&shard);
    }
  });
}
