//! CPU metering and the CPU limit.
//!
//! Every entry into JS on an isolate thread (each poll of its event loop) is bracketed by
//! [`CpuGuard::enter`] and [`CpuGuard::leave`], which read the thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`), once per entry: an entry is measured from the end of the
//! previous one, since the thread's CPU clock does not advance while it waits for work (the
//! little CPU the runtime spends between entries is counted with the next one). The time is
//! charged to the requests in flight and those answered during the entry, split evenly (see
//! `outpost_ext_dispatch::charge_entry`). The budget of an entry: with one request in flight,
//! what that request has left of its limit; with several, one limit each; with none, one
//! limit; plus one limit for every request taken off the queue during the entry, since its
//! handler may run in the same entry (see `drive_event_loop`). Code that never returns from JS (`while (true)
//! {}`) cannot be caught after the fact, so one [`CpuWatchdog`] thread watches every isolate
//! that is inside JS: it reads that thread's CPU clock and terminates the isolate once the
//! entry has used its budget. It sleeps until the earliest moment a budget could run out
//! (CPU time cannot pass faster than wall time), so it wakes rarely and on time.
//!
//! A function may also have a soft limit (`limits.soft_cpu_ms`), budgeted per entry by the
//! same rule. An entry past it does not stop: its isolate is marked retired, the pool sends
//! it no new requests, and it ends once the requests it has are answered.
//!
//! With `server.demote_long_entries`, an entry that has run `DEMOTE_AFTER` of CPU is moved
//! to `SCHED_IDLE` until it returns ([`ThreadPriority`]); the watchdog then also looks every
//! `DEMOTE_AFTER` while any isolate is inside JS, and naps when none is, woken by the next
//! entry.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use deno_core::v8;

/// Marks "not inside JS" in [`CpuGuard::entered_ns`].
const OUTSIDE_JS: u64 = u64::MAX;
/// How long the watchdog sleeps when no budget can run out sooner.
const IDLE_CHECK: Duration = Duration::from_millis(10);
/// An entry into JS that has run this long is demoted (see [`ThreadPriority`]).
const DEMOTE_AFTER: Duration = Duration::from_millis(1);

/// The scheduling policy of an isolate thread. An entry into JS that runs long (a handler
/// burning CPU) is demoted to `SCHED_IDLE` until it returns: it then runs only on a core
/// nothing else wants, so short entries of other isolates, and the server's own threads, get
/// a core first when they wake, and a tenant burning CPU delays its neighbours less.
/// Demotion is only used where the process may restore the policy afterwards
/// (`CAP_SYS_NICE` or `RLIMIT_NICE`); the watchdog probes that once at start.
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

  /// From the isolate thread, outside JS: back to normal priority if demoted.
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

/// The CPU state of one isolate, shared by its thread and the watchdog.
pub struct CpuGuard {
  clock: ThreadClock,
  /// Thread CPU time when the current entry into JS began, or [`OUTSIDE_JS`].
  entered_ns: AtomicU64,
  /// CPU time the current entry may use before the isolate is terminated.
  budget_ns: AtomicU64,
  /// CPU time the entry may use before the isolate is retired (`u64::MAX`: no soft limit).
  soft_budget_ns: AtomicU64,
  /// Past its soft limit: takes no new requests, finishes those it has.
  retired: AtomicBool,
  /// The CPU limit of one request: what a request joining mid-entry adds to the budget.
  per_request_ns: AtomicU64,
  /// The soft CPU limit of one request (`u64::MAX`: none).
  per_request_soft_ns: AtomicU64,
  /// Thread CPU time at the end of the previous entry: where the next one is measured from.
  /// Only the isolate thread uses it.
  last_ns: AtomicU64,
  terminated: AtomicBool,
  /// CPU time the entry had used when the watchdog terminated it.
  used_at_termination_ns: AtomicU64,
  isolate: v8::IsolateHandle,
  priority: ThreadPriority,
  watchdog: Arc<CpuWatchdog>,
}

impl CpuGuard {
  /// Registers the calling thread's isolate with the watchdog. Call on the isolate thread.
  pub fn new(isolate: v8::IsolateHandle, watchdog: &Arc<CpuWatchdog>) -> Arc<CpuGuard> {
    let clock = ThreadClock::current();
    let guard = Arc::new(CpuGuard {
      clock,
      entered_ns: AtomicU64::new(OUTSIDE_JS),
      budget_ns: AtomicU64::new(u64::MAX),
      soft_budget_ns: AtomicU64::new(u64::MAX),
      retired: AtomicBool::new(false),
      per_request_ns: AtomicU64::new(0),
      per_request_soft_ns: AtomicU64::new(u64::MAX),
      last_ns: AtomicU64::new(clock.now_ns()),
      terminated: AtomicBool::new(false),
      used_at_termination_ns: AtomicU64::new(0),
      isolate,
      priority: ThreadPriority::current(),
      watchdog: watchdog.clone(),
    });
    watchdog.register(&guard);
    guard
  }

  /// Sets the CPU limits of one request of the function this isolate runs.
  pub fn set_request_limits(&self, limit: Duration, soft_limit: Option<Duration>) {
    self.per_request_ns.store(nanos(limit), Ordering::Relaxed);
    self
      .per_request_soft_ns
      .store(soft_limit.map_or(u64::MAX, nanos), Ordering::Relaxed);
  }

  /// JS is about to run with `budget` CPU time to use, and `soft_budget` before the
  /// isolate is retired.
  pub fn enter(&self, budget: Duration, soft_budget: Option<Duration>) {
    // A demotion that raced with the end of the previous entry.
    self.priority.restore();
    let budget_ns = nanos(budget);
    self.budget_ns.store(budget_ns, Ordering::Relaxed);
    self
      .soft_budget_ns
      .store(soft_budget.map_or(u64::MAX, nanos), Ordering::Relaxed);
    self
      .entered_ns
      .store(self.last_ns.load(Ordering::Relaxed), Ordering::Release);
    // The watchdog naps when nothing is inside JS; an entry that may need it sooner (a
    // short budget, or demotion) wakes it, at most once per nap.
    let soon = budget.min(soft_budget.unwrap_or(budget)) < IDLE_CHECK || self.watchdog.demotion;
    // Read before the swap: every isolate thread enters here, and a swap on each entry would
    // bounce the flag's cache line between them.
    let napping = &self.watchdog.napping;
    if soon && napping.load(Ordering::Relaxed) && napping.swap(false, Ordering::Relaxed) {
      self.watchdog.wake();
    }
  }

  /// JS has returned; the CPU time this entry used.
  pub fn leave(&self) -> Duration {
    let now = self.clock.now_ns();
    self.entered_ns.store(OUTSIDE_JS, Ordering::Release);
    self.priority.restore();
    let last = self.last_ns.swap(now, Ordering::Relaxed);
    let used = now.saturating_sub(last);
    if used >= self.soft_budget_ns.load(Ordering::Relaxed) {
      self.retire();
    }
    Duration::from_nanos(used)
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

  /// Stops whatever JS runs now (for the module load timeout).
  pub fn terminate(&self) {
    self.isolate.terminate_execution();
  }

  /// Terminates the isolate if the current entry is over budget; otherwise the CPU time
  /// until it should be looked at again. Retires the isolate past its soft budget, and
  /// demotes a long entry when `demotion` is on. `None` when not inside JS.
  fn check(&self, demotion: bool) -> Option<Duration> {
    let entered = self.entered_ns.load(Ordering::Acquire);
    if entered == OUTSIDE_JS {
      return None;
    }
    let used = self.clock.now_ns().saturating_sub(entered);
    let budget = self.budget_ns.load(Ordering::Relaxed);
    let soft_budget = self.soft_budget_ns.load(Ordering::Relaxed);
    if used >= soft_budget {
      self.retire();
    }
    if used >= budget && self.entered_ns.load(Ordering::Acquire) == entered {
      self.used_at_termination_ns.store(used, Ordering::Relaxed);
      self.terminated.store(true, Ordering::Release);
      self.isolate.terminate_execution();
      return None;
    }
    let demote_after = nanos(DEMOTE_AFTER);
    if demotion && used >= demote_after {
      self.priority.demote();
    }
    // The nearest threshold still ahead: the budget, the soft budget, the demotion.
    let mut next_limit = budget;
    if used < soft_budget {
      next_limit = next_limit.min(soft_budget);
    }
    if demotion && used < demote_after {
      next_limit = next_limit.min(demote_after);
    }
    Some(Duration::from_nanos(next_limit.saturating_sub(used)))
  }
}

fn nanos(duration: Duration) -> u64 {
  u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl outpost_ext_dispatch::EntryBudget for CpuGuard {
  fn request_joined(&self) {
    if self.entered_ns.load(Ordering::Acquire) != OUTSIDE_JS {
      for (budget, extra) in [
        (&self.budget_ns, &self.per_request_ns),
        (&self.soft_budget_ns, &self.per_request_soft_ns),
      ] {
        let extra = extra.load(Ordering::Relaxed);
        let _ = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
          Some(b.saturating_add(extra))
        });
      }
    }
  }
}

/// The one thread that enforces CPU budgets for all isolates of a node.
pub struct CpuWatchdog {
  guards: Mutex<Vec<Weak<CpuGuard>>>,
  woken: Condvar,
  /// Whether long entries are demoted (see [`ThreadPriority`]).
  demotion: bool,
  /// Set while the watchdog sleeps with no isolate inside JS.
  napping: AtomicBool,
}

impl CpuWatchdog {
  /// Starts the watchdog thread; it ends when the last `Arc` is dropped. With `demote`,
  /// long entries are demoted where the process may do so.
  pub fn start(demote: bool) -> std::io::Result<Arc<CpuWatchdog>> {
    let demotion = demote && ThreadPriority::demotion_possible();
    if demote && !demotion {
      tracing::info!(
        "isolate threads running long entries are not demoted: restoring their priority needs CAP_SYS_NICE or RLIMIT_NICE"
      );
    }
    let watchdog = Arc::new(CpuWatchdog {
      guards: Mutex::default(),
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

  fn register(&self, guard: &Arc<CpuGuard>) {
    self
      .guards
      .lock()
      .expect("watchdog lock")
      .push(Arc::downgrade(guard));
  }

  fn wake(&self) {
    self.woken.notify_one();
  }

  fn run(watchdog: Weak<CpuWatchdog>) {
    loop {
      let Some(watchdog) = watchdog.upgrade() else {
        return;
      };
      let mut guards = watchdog.guards.lock().expect("watchdog lock");
      // Set before looking, so that an entry starting meanwhile wakes the watchdog.
      watchdog.napping.store(true, Ordering::Relaxed);
      let mut next = IDLE_CHECK;
      let mut inside_js = false;
      guards.retain(|guard| {
        let Some(guard) = guard.upgrade() else {
          return false;
        };
        if let Some(left) = guard.check(watchdog.demotion) {
          next = next.min(left);
          inside_js = true;
        }
        true
      });
      if inside_js {
        watchdog.napping.store(false, Ordering::Relaxed);
        // An entry that starts while this one runs does not wake the watchdog: look again
        // within a demotion delay.
        if watchdog.demotion {
          next = next.min(DEMOTE_AFTER);
        }
      }
      let wake_at = Instant::now() + next.max(Duration::from_micros(50));
      let timeout = wake_at.saturating_duration_since(Instant::now());
      let _ = watchdog
        .woken
        .wait_timeout(guards, timeout)
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
    let guard = CpuGuard::new(isolate.thread_safe_handle(), &watchdog);
    let limit = Duration::from_millis(500);
    let within = |left: Option<Duration>, threshold: Duration| {
      let left = left.expect("inside JS");
      assert!(
        left <= threshold && left > threshold.saturating_sub(Duration::from_millis(100)),
        "{left:?} to go, threshold {threshold:?}"
      );
    };
    // No soft limit: the hard one.
    guard.enter(limit, None);
    within(guard.check(false), limit);
    guard.leave();
    // A soft limit ahead of it.
    guard.enter(limit, Some(Duration::from_millis(300)));
    within(guard.check(false), Duration::from_millis(300));
    // Demotion ahead of both.
    within(guard.check(true), DEMOTE_AFTER);
    guard.leave();
    assert_eq!(guard.check(false), None, "outside JS");
    assert!(guard.terminated_for_cpu().is_none() && !guard.retired());
  }
}
