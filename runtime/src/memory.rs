//! The memory limit: V8 heap limits, and a near-heap-limit callback that terminates the
//! isolate instead of letting V8 abort the whole process.
//!
//! Isolates are created (blank, before their function is known) with the largest heap any
//! function may use. When V8 nears that limit it calls back; the callback marks the isolate,
//! terminates its JS and grants headroom so that V8 does not abort while the JS unwinds.
//! A function with a lower `memory_mb` is checked against its own limit after every entry
//! into JS. A terminated isolate is discarded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deno_core::JsRuntime;

/// Memory state of one isolate, shared with the server side.
#[derive(Default)]
pub struct HeapGuard {
  exceeded: AtomicBool,
}

impl HeapGuard {
  /// Installs the near-heap-limit callback on `runtime`.
  pub fn install(runtime: &mut JsRuntime) -> Arc<HeapGuard> {
    let guard = Arc::new(HeapGuard::default());
    let marked = guard.clone();
    let isolate = runtime.v8_isolate().thread_safe_handle();
    runtime.add_near_heap_limit_callback(move |current, _initial| {
      marked.exceeded.store(true, Ordering::Release);
      isolate.terminate_execution();
      // Room for the JS to unwind; the isolate is dropped right after.
      current.saturating_mul(2)
    });
    guard
  }

  /// Whether the isolate was terminated for using more memory than allowed.
  pub fn exceeded(&self) -> bool {
    self.exceeded.load(Ordering::Acquire)
  }

  /// Checks the heap against `limit` bytes (a function limit below the isolate's own);
  /// marks and terminates the isolate when it is over.
  pub fn check(&self, runtime: &mut JsRuntime, limit: usize) -> bool {
    let isolate = runtime.v8_isolate();
    let used = isolate.get_heap_statistics().used_heap_size();
    if used > limit {
      self.exceeded.store(true, Ordering::Release);
      isolate.terminate_execution();
    }
    self.exceeded()
  }
}
