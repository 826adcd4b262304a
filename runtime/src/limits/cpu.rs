//! CPU metering and the CPU limit.
//!
//! Every thread that runs JS (a shard, or a slow-lane isolate's own thread) has a
//! [`ThreadMeter`]. Every entry into JS on it (one poll of one isolate's event loop) is
//! bracketed by [`ThreadMeter::enter`] and [`ThreadMeter::leave`], which time it with the
//! monotonic clock (a vDSO read, a fraction of the cost of the thread's CPU clock, which is a
//! system call). An entry runs without blocking, so its time is the CPU time the isolate
//! used, short of preemption; the work a shard does between entries (HTTP for every tenant)
//! is no entry's. Only one isolate is inside JS on a thread at a time, so the time of an
//! entry is its isolate's; its [`CpuGuard`] says which isolate that is.
//!
//! The time is charged to the requests in flight on the isolate and those answered during the
//! entry, split evenly (see `outpost_ext_dispatch::charge_entry`). The budget of an entry:
//! with one request in flight, what that request has left of its limit; with several, one
//! limit each; with none, one limit; plus one limit for every request taken off the queue
//! during the entry, since its handler may run in the same entry (see `crate::isolate`). Code
//! that never returns from JS (`while (true) {}`) cannot be caught after the fact, so one
//! [`CpuWatchdog`] thread watches every meter. While an entry runs, the watchdog reads that
//! thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`) itself, off the hot path: the entry has used
//! the time from its start to the watchdog's first look at it, plus the thread's CPU time
//! since. It terminates the entry's isolate once the entry has used its budget. It sleeps
//! until the earliest moment a budget could run out (CPU time cannot pass faster than wall
//! time), and at most [`IDLE_CHECK`] otherwise; an entry wakes it only when its budget is
//! shorter than that (or on a demoting slow-lane thread), so a shard entering JS thousands of
//! times a second costs the watchdog nothing.
//!
//! A function may also have a soft limit (`limits.soft_cpu_ms`), budgeted per entry by the
//! same rule. An entry past it does not stop: its isolate is marked retired, the pool sends
//! it no new requests, and it ends once the requests it has are answered.
//!
//! On a slow-lane thread (`server.demote_long_entries`), an entry that has run
//! [`DEMOTE_AFTER`] of CPU is moved to `SCHED_IDLE` until it returns ([`ThreadPriority`]).
//! Shards are never demoted: they also serve HTTP and other tenants.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use deno_core::v8;

/// Marks "not inside JS" in [`ThreadMeter::entered_ns`].
const OUTSIDE_JS: u64 = u64::MAX;
/// How long the watchdog sleeps when no budget can run out sooner; also how late it may see
/// an entry that did not wake it.
pub const IDLE_CHECK: Duration = Duration::from_millis(10);
/// An entry into JS that has run this long on a demoting thread is demoted.
const DEMOTE_AFTER: Duration = Duration::from_millis(1);

/// The scheduling policy of a slow-lane isolate thread. An entry into JS that runs long (a
/// handler burning CPU) is demoted to `SCHED_IDLE` until it returns: it then runs only on a
/// core nothing else wants, so the shards get a core first when they wake. Demotion is only
/// used where the process may restore the policy afterwards (`CAP_SYS_NICE` or
/// `RLIMIT_NICE`); the watchdog probes that once at start.
struct ThreadPriority {
  tid: libc::pid_t,
  demoted: AtomicBool,
}

impl ThreadPriority {
  /// The calling thread's.
  fn current() -> ThreadPriority {
    ThreadPriority {
      // SAFETY: gettid has no preconditions.
      tid: unsafe { libc::gettid() },
      demoted: AtomicBool::new(false),
    }
  }

  fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is valid for the call; a thread id that is gone makes it fail.
    unsafe { libc::sched_setscheduler(tid, policy, &param) == 0 }
  }

  /// From the watchdog: the thread is running a long entry.
  fn demote(&self) {
    if !self.demoted.swap(true, Ordering::Relaxed) {
      Self::set_policy(self.tid, libc::SCHED_IDLE);
    }
  }

  /// From the thread itself, outside JS: back to normal priority if demoted.
  fn restore(&self) {
    if self.demoted.load(Ordering::Relaxed) && self.demoted.swap(false, Ordering::Relaxed) {
      Self::set_policy(self.tid, libc::SCHED_OTHER);
    }
  }

  /// Whether this process may demote a thread and restore it afterwards.
  fn demotion_possible() -> bool {
    std::thread::spawn(|| {
      let probe = ThreadPriority::current();
      Self::set_policy(probe.tid, libc::SCHED_IDLE)
        && Self::set_policy(probe.tid, libc::SCHED_OTHER)
    })
    .join()
    .unwrap_or(false)
  }
}

/// A thread's CPU clock.
#[derive(Debug, Clone, Copy)]
struct ThreadClock(libc::clockid_t);

impl ThreadClock {
  /// The clock of the calling thread, readable from any thread.
  fn current() -> ThreadClock {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_self() is the calling thread, alive for the call; `clock` is a valid
    // out-pointer.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    if rc == 0 {
      ThreadClock(clock)
    } else {
      ThreadClock(libc::CLOCK_THREAD_CPUTIME_ID)
    }
  }

  fn now_ns(self) -> u64 {
    let mut time = libc::timespec {
      tv_sec: 0,
      tv_nsec: 0,
    };
    // SAFETY: `time` is a valid out-pointer; an invalid clock id only makes the call fail.
    if unsafe { libc::clock_gettime(self.0, &mut time) } != 0 {
      return 0;
    }
    (time.tv_sec as u64) * 1_000_000_000 + time.tv_nsec as u64
  }
}

/// The CPU state of one thread that runs JS, shared by the thread and the watchdog.
pub struct ThreadMeter {
  clock: ThreadClock,
  /// Where entry times are measured from.
  epoch: Instant,
  /// When the current entry into JS began (nanoseconds since `epoch`), or [`OUTSIDE_JS`].
  entered_ns: AtomicU64,
  /// Counts entries: tells the watchdog a new entry from the one it looked at.
  entries: AtomicU64,
  /// CPU time the current entry may use before its isolate is terminated.
  budget_ns: AtomicU64,
  /// CPU time the entry may use before its isolate is retired (`u64::MAX`: no soft limit).
  soft_budget_ns: AtomicU64,
  /// The isolate of the current (or last) entry.
  current: Mutex<Option<Arc<CpuGuard>>>,
  /// The watchdog's first look at the current entry.
  seen: Mutex<Seen>,
  /// Long entries are demoted (slow-lane threads, when the process may).
  demote: bool,
  priority: ThreadPriority,
  watchdog: Arc<CpuWatchdog>,
}

/// When the watchdog first looked at an entry: its number, the monotonic time and the
/// thread's CPU time then.
#[derive(Default)]
struct Seen {
  entry: u64,
  at_ns: u64,
  cpu_ns: u64,
}

impl ThreadMeter {
  /// The meter of the calling thread, watched by `watchdog`. With `demote`, long entries on
  /// it are demoted (where the process may). Call on the thread it meters.
  pub fn for_this_thread(watchdog: &Arc<CpuWatchdog>, demote: bool) -> Arc<ThreadMeter> {
    let meter = Arc::new(ThreadMeter {
      clock: ThreadClock::current(),
      epoch: Instant::now(),
      entered_ns: AtomicU64::new(OUTSIDE_JS),
      entries: AtomicU64::new(0),
      budget_ns: AtomicU64::new(u64::MAX),
      soft_budget_ns: AtomicU64::new(u64::MAX),
      current: Mutex::new(None),
      seen: Mutex::default(),
      demote: demote && watchdog.demotion,
      priority: ThreadPriority::current(),
      watchdog: watchdog.clone(),
    });
    watchdog.register(&meter);
    meter
  }

  fn now_ns(&self) -> u64 {
    u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
  }

  /// The isolate of `guard` is about to run JS on this thread with `budget` CPU time to use,
  /// and `soft_budget` before it is retired.
  pub fn enter(&self, guard: &Arc<CpuGuard>, budget: Duration, soft_budget: Option<Duration>) {
    // A demotion that raced with the end of the previous entry.
    self.priority.restore();
    {
      let mut current = self.current.lock().expect("meter lock");
      if !current.as_ref().is_some_and(|c| Arc::ptr_eq(c, guard)) {
        *current = Some(guard.clone());
      }
    }
    self.budget_ns.store(nanos(budget), Ordering::Relaxed);
    self
      .soft_budget_ns
      .store(soft_budget.map_or(u64::MAX, nanos), Ordering::Relaxed);
    self.entries.fetch_add(1, Ordering::Relaxed);
    self.entered_ns.store(self.now_ns(), Ordering::Release);
    // The watchdog naps up to IDLE_CHECK and then sees this entry anyway; an entry that
    // needs it sooner wakes it, at most once per nap. The flag is read before the swap: a
    // swap on every entry would bounce its cache line between threads.
    let soon = budget.min(soft_budget.unwrap_or(budget)) < IDLE_CHECK || self.demote;
    let napping = &self.watchdog.napping;
    if soon && napping.load(Ordering::Relaxed) && napping.swap(false, Ordering::Relaxed) {
      self.watchdog.wake();
    }
  }

  /// JS has returned; the time this entry used. An entry past its soft budget retires its
  /// isolate.
  pub fn leave(&self) -> Duration {
    let now = self.now_ns();
    let entered = self.entered_ns.swap(OUTSIDE_JS, Ordering::AcqRel);
    self.priority.restore();
    let used = now.saturating_sub(entered);
    if used >= self.soft_budget_ns.load(Ordering::Relaxed)
      && let Some(guard) = self.current.lock().expect("meter lock").as_ref()
    {
      guard.retire();
    }
    Duration::from_nanos(used)
  }

  /// Adds `extra` to the budget of the current entry when it is `guard`'s.
  fn extend_entry(&self, guard: &CpuGuard, extra: u64, soft_extra: u64) {
    if self.entered_ns.load(Ordering::Acquire) == OUTSIDE_JS {
      return;
    }
    let current = self.current.lock().expect("meter lock");
    if !current
      .as_ref()
      .is_some_and(|c| std::ptr::eq(c.as_ref(), guard))
    {
      return;
    }
    for (budget, extra) in [(&self.budget_ns, extra), (&self.soft_budget_ns, soft_extra)] {
      let _ = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
        Some(b.saturating_add(extra))
      });
    }
  }

  /// Terminates the entry's isolate if the current entry is over budget; otherwise the CPU
  /// time until it should be looked at again. Retires the isolate past its soft budget, and
  /// demotes a long entry on a demoting thread. `None` when not inside JS.
  fn check(&self) -> Option<Duration> {
    let entered = self.entered_ns.load(Ordering::Acquire);
    if entered == OUTSIDE_JS {
      return None;
    }
    let entry = self.entries.load(Ordering::Relaxed);
    let guard = self.current.lock().expect("meter lock").clone()?;
    let (now, cpu) = (self.now_ns(), self.clock.now_ns());
    let used = {
      let mut seen = self.seen.lock().expect("meter lock");
      if seen.entry != entry {
        *seen = Seen {
          entry,
          at_ns: now,
          cpu_ns: cpu,
        };
      }
      // Until the first look, the entry ran without blocking: its time is its CPU time.
      seen.at_ns.saturating_sub(entered) + cpu.saturating_sub(seen.cpu_ns)
    };
    if self.entered_ns.load(Ordering::Acquire) != entered
      || self.entries.load(Ordering::Relaxed) != entry
    {
      // The entry ended meanwhile: the next one is looked at on the next pass.
      return Some(Duration::ZERO);
    }
    let budget = self.budget_ns.load(Ordering::Relaxed);
    let soft_budget = self.soft_budget_ns.load(Ordering::Relaxed);
    if used >= soft_budget {
      guard.retire();
    }
    if used >= budget {
      guard.terminate_for_cpu(used);
      return None;
    }
    let demote_after = nanos(DEMOTE_AFTER);
    if self.demote && used >= demote_after {
      self.priority.demote();
    }
    // The nearest threshold still ahead: the budget, the soft budget, the demotion.
    let mut next_limit = budget;
    if used < soft_budget {
      next_limit = next_limit.min(soft_budget);
    }
    if self.demote && used < demote_after {
      next_limit = next_limit.min(demote_after);
    }
    Some(Duration::from_nanos(next_limit.saturating_sub(used)))
  }
}

/// The CPU state of one isolate: its limits per request, and whether it was retired or
/// terminated. Shared by the thread it runs on, the watchdog and the server side.
pub struct CpuGuard {
  isolate: v8::IsolateHandle,
  /// The thread the isolate runs on.
  meter: Arc<ThreadMeter>,
  /// Past its soft limit: takes no new requests, finishes those it has.
  retired: AtomicBool,
  /// The CPU limit of one request: what a request joining mid-entry adds to the budget.
  per_request_ns: AtomicU64,
  /// The soft CPU limit of one request (`u64::MAX`: none).
  per_request_soft_ns: AtomicU64,
  terminated: AtomicBool,
  /// CPU time the entry had used when the watchdog terminated it.
  used_at_termination_ns: AtomicU64,
}

impl CpuGuard {
  /// The guard of an isolate running on `meter`'s thread.
  pub fn new(isolate: v8::IsolateHandle, meter: &Arc<ThreadMeter>) -> Arc<CpuGuard> {
    Arc::new(CpuGuard {
      isolate,
      meter: meter.clone(),
      retired: AtomicBool::new(false),
      per_request_ns: AtomicU64::new(0),
      per_request_soft_ns: AtomicU64::new(u64::MAX),
      terminated: AtomicBool::new(false),
      used_at_termination_ns: AtomicU64::new(0),
    })
  }

  /// Sets the CPU limits of one request of the function this isolate runs.
  pub fn set_request_limits(&self, limit: Duration, soft_limit: Option<Duration>) {
    self.per_request_ns.store(nanos(limit), Ordering::Relaxed);
    self
      .per_request_soft_ns
      .store(soft_limit.map_or(u64::MAX, nanos), Ordering::Relaxed);
  }

  /// Whether the isolate went past its soft CPU limit and should take no new requests.
  pub fn retired(&self) -> bool {
    self.retired.load(Ordering::Relaxed)
  }

  fn retire(&self) {
    self.retired.store(true, Ordering::Relaxed);
  }

  /// When the watchdog terminated this isolate for running past its CPU budget: the CPU
  /// time the entry had used by then.
  pub fn terminated_for_cpu(&self) -> Option<Duration> {
    self
      .terminated
      .load(Ordering::Acquire)
      .then(|| Duration::from_nanos(self.used_at_termination_ns.load(Ordering::Relaxed)))
  }

  fn terminate_for_cpu(&self, used_ns: u64) {
    self
      .used_at_termination_ns
      .store(used_ns, Ordering::Relaxed);
    self.terminated.store(true, Ordering::Release);
    self.isolate.terminate_execution();
  }

  /// Stops whatever JS runs now (for the module load timeout).
  pub fn terminate(&self) {
    self.isolate.terminate_execution();
  }
}

fn nanos(duration: Duration) -> u64 {
  u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl outpost_ext_dispatch::EntryBudget for CpuGuard {
  fn request_joined(&self) {
    self.meter.extend_entry(
      self,
      self.per_request_ns.load(Ordering::Relaxed),
      self.per_request_soft_ns.load(Ordering::Relaxed),
    );
  }
}

/// The one thread that enforces CPU budgets for every JS thread of a node.
pub struct CpuWatchdog {
  meters: Mutex<Vec<Weak<ThreadMeter>>>,
  woken: Condvar,
  /// Whether long entries may be demoted on demoting threads (see [`ThreadPriority`]).
  demotion: bool,
  /// Set while the watchdog sleeps with no thread inside JS.
  napping: AtomicBool,
}

impl CpuWatchdog {
  /// Starts the watchdog thread; it ends when the last `Arc` is dropped. With `demote`, long
  /// entries on slow-lane threads are demoted where the process may do so.
  pub fn start(demote: bool) -> std::io::Result<Arc<CpuWatchdog>> {
    let demotion = demote && ThreadPriority::demotion_possible();
    if demote && !demotion {
      tracing::info!(
        "slow-lane threads running long entries are not demoted: restoring their priority needs CAP_SYS_NICE or RLIMIT_NICE"
      );
    }
    let watchdog = Arc::new(CpuWatchdog {
      meters: Mutex::default(),
      woken: Condvar::new(),
      demotion,
      napping: AtomicBool::new(false),
    });
    let weak = Arc::downgrade(&watchdog);
    std::thread::Builder::new()
      .name("cpu-watchdog".into())
      .spawn(move || Self::run(weak))?;
    Ok(watchdog)
  }

  fn register(&self, meter: &Arc<ThreadMeter>) {
    self
      .meters
      .lock()
      .expect("watchdog lock")
      .push(Arc::downgrade(meter));
  }

  fn wake(&self) {
    self.woken.notify_one();
  }

  fn run(watchdog: Weak<CpuWatchdog>) {
    loop {
      let Some(watchdog) = watchdog.upgrade() else {
        return;
      };
      let mut meters = watchdog.meters.lock().expect("watchdog lock");
      // Set before looking, so that an entry starting meanwhile that needs the watchdog
      // soon wakes it.
      watchdog.napping.store(true, Ordering::Relaxed);
      let mut next = IDLE_CHECK;
      let mut inside_js = false;
      meters.retain(|meter| {
        let Some(meter) = meter.upgrade() else {
          return false;
        };
        if let Some(left) = meter.check() {
          next = next.min(left);
          inside_js = true;
          // An entry that starts while this one runs does not wake the watchdog: look again
          // within a demotion delay on a demoting thread.
          if meter.demote {
            next = next.min(DEMOTE_AFTER);
          }
        }
        true
      });
      if inside_js {
        watchdog.napping.store(false, Ordering::Relaxed);
      }
      let wake_at = Instant::now() + next.max(Duration::from_micros(50));
      let timeout = wake_at.saturating_duration_since(Instant::now());
      let _ = watchdog
        .woken
        .wait_timeout(meters, timeout)
        .expect("watchdog lock");
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn the_watchdog_looks_again_at_the_nearest_threshold_ahead() {
    crate::init_v8();
    let isolate = v8::Isolate::new(v8::CreateParams::default());
    let watchdog = CpuWatchdog::start(false).unwrap();
    let meter = ThreadMeter::for_this_thread(&watchdog, false);
    let guard = CpuGuard::new(isolate.thread_safe_handle(), &meter);
    let limit = Duration::from_millis(500);
    let within = |left: Option<Duration>, threshold: Duration| {
      let left = left.expect("inside JS");
      assert!(
        left <= threshold && left > threshold.saturating_sub(Duration::from_millis(100)),
        "{left:?} to go, threshold {threshold:?}"
      );
    };
    // No soft limit: the hard one.
    meter.enter(&guard, limit, None);
    within(meter.check(), limit);
    meter.leave();
    // A soft limit ahead of it.
    meter.enter(&guard, limit, Some(Duration::from_millis(300)));
    within(meter.check(), Duration::from_millis(300));
    // A request joining mid-entry adds its limit.
    guard.set_request_limits(Duration::from_millis(200), None);
    outpost_ext_dispatch::EntryBudget::request_joined(guard.as_ref());
    let left = meter.check().unwrap();
    assert!(left > Duration::from_millis(250), "{left:?}");
    meter.leave();
    assert_eq!(meter.check(), None, "outside JS");
    assert!(guard.terminated_for_cpu().is_none() && !guard.retired());
  }
}
