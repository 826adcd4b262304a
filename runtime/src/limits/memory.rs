//! The memory limit: V8 heap limits, and a near-heap-limit callback that terminates the
//! isolate instead of letting V8 abort the whole process.
//!
//! Isolates are created (blank, before their function is known) with the largest heap any
//! function may use. When V8 nears that limit it calls back; the callback marks the isolate,
//! terminates its JS and grants headroom so that V8 does not abort while the JS unwinds.
//! A function with a lower `memory_mb` is checked against its own limit after every entry
//! into JS. A terminated isolate is discarded.
//!
//! ArrayBuffer backing stores live outside the V8 heap, so heap limits do not bound them.
//! Each isolate gets a counting allocator ([`ArrayBufferBudget`]) capped at the same
//! number of bytes: past it, allocation fails and JS sees a `RangeError`, which a handler
//! may catch; memory stays bounded either way.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use deno_core::{JsRuntime, v8};

/// Memory state of one isolate, shared with the server side.
pub struct HeapGuard {
  exceeded: AtomicBool,
  /// Set once the near-heap-limit callback has raised V8's limit for a refused ArrayBuffer
  /// (see [`HeapGuard::install`]): from then on the heap is checked after every entry.
  raised: AtomicBool,
  buffers: Arc<ArrayBufferBudget>,
}

impl HeapGuard {
  /// Installs the near-heap-limit callback on `runtime`, whose ArrayBuffers are counted by
  /// `buffers`.
  ///
  /// V8 calls it in two cases. Near the heap limit, it must raise the limit or V8 aborts the
  /// process: the isolate is marked, terminated and given room to unwind. And as the last
  /// resort of an allocation that failed, which is also what an ArrayBuffer the budget
  /// refused goes through (`Heap::AllocateExternalBackingStore` →
  /// `CollectAllAvailableGarbage`): then the heap itself is fine, and the allocation must
  /// fail with a `RangeError` the handler can catch, as in browsers and Workers. A call
  /// right after a refusal is taken for the second case: the limit is raised a little (so
  /// that, were it the first case after all, V8 does not abort; the next call then
  /// terminates), up to twice the initial one, and the heap is held to the isolate's limit
  /// by the check after every entry instead.
  pub fn install(runtime: &mut JsRuntime, buffers: Arc<ArrayBufferBudget>) -> Arc<HeapGuard> {
    let guard = Arc::new(HeapGuard {
      exceeded: AtomicBool::new(false),
      raised: AtomicBool::new(false),
      buffers,
    });
    let marked = guard.clone();
    let isolate = runtime.v8_isolate().thread_safe_handle();
    runtime.add_near_heap_limit_callback(move |current, initial| {
      let headroom = (initial / 64).max(4 << 20);
      if marked.buffers.refused.swap(false, Ordering::AcqRel)
        && current.saturating_add(headroom) <= initial.saturating_mul(2)
      {
        marked.raised.store(true, Ordering::Release);
        return current + headroom;
      }
      marked.exceeded.store(true, Ordering::Release);
      isolate.terminate_execution();
      // Room for the JS to unwind; the isolate is dropped right after.
      current.saturating_mul(2)
    });
    guard
  }

  /// Whether V8's heap limit was raised past the isolate's own for a refused ArrayBuffer:
  /// the heap must then be checked after every entry into JS.
  pub fn raised(&self) -> bool {
    self.raised.load(Ordering::Acquire)
  }

  /// Whether the isolate was terminated for using more memory than allowed.
  pub fn exceeded(&self) -> bool {
    self.exceeded.load(Ordering::Acquire)
  }

  /// Memory the isolate holds now: V8 heap in use plus ArrayBuffer backing stores.
  pub fn memory_in_use(&self, runtime: &mut JsRuntime) -> usize {
    let heap = runtime.v8_isolate().get_heap_statistics().used_heap_size();
    heap.saturating_add(self.buffers.used())
  }

  /// Checks the heap against `limit` bytes (a function limit below the isolate's own);
  /// marks and terminates the isolate when it is over.
  pub fn check(&self, runtime: &mut JsRuntime, limit: usize) -> bool {
    let isolate = runtime.v8_isolate();
    let used = isolate.get_heap_statistics().used_heap_size();
    if used > limit || self.buffers.used() > limit {
      self.exceeded.store(true, Ordering::Release);
      isolate.terminate_execution();
    }
    self.exceeded()
  }
}

/// Counts the ArrayBuffer bytes of one isolate and refuses allocations past `limit`.
pub struct ArrayBufferBudget {
  used: AtomicUsize,
  limit: usize,
  /// Whether the latest allocation was refused; taken by the near-heap-limit callback.
  refused: AtomicBool,
}

impl ArrayBufferBudget {
  pub fn new(limit: usize) -> Arc<ArrayBufferBudget> {
    Arc::new(ArrayBufferBudget {
      used: AtomicUsize::new(0),
      limit,
      refused: AtomicBool::new(false),
    })
  }

  /// Bytes of ArrayBuffer backing stores alive now.
  pub fn used(&self) -> usize {
    self.used.load(Ordering::Relaxed)
  }

  /// The V8 allocator that counts against this budget.
  pub fn allocator(self: &Arc<Self>) -> v8::SharedRef<v8::Allocator> {
    static VTABLE: v8::RustAllocatorVtable<ArrayBufferBudget> = v8::RustAllocatorVtable {
      allocate,
      allocate_uninitialized,
      free,
      drop: drop_budget,
    };
    // SAFETY: the handle is a leaked `Arc` that `drop_budget` takes back when V8 drops the
    // allocator; the vtable's functions expect exactly that type.
    unsafe { v8::new_rust_allocator(Arc::into_raw(self.clone()), &VTABLE) }.make_shared()
  }

  fn reserve(&self, len: usize) -> bool {
    let reserved = self
      .used
      .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
        used.checked_add(len).filter(|total| *total <= self.limit)
      })
      .is_ok();
    // Whether the latest allocation was refused.
    self.refused.store(!reserved, Ordering::Release);
    reserved
  }

  fn release(&self, len: usize) {
    self.used.fetch_sub(len, Ordering::AcqRel);
  }
}

unsafe extern "C" fn allocate(budget: &ArrayBufferBudget, len: usize) -> *mut c_void {
  if !budget.reserve(len) {
    return std::ptr::null_mut();
  }
  // SAFETY: plain C allocation; V8 frees it through `free` below with the same length.
  let data = unsafe { libc::calloc(len.max(1), 1) };
  if data.is_null() {
    budget.release(len);
  }
  data
}

unsafe extern "C" fn allocate_uninitialized(budget: &ArrayBufferBudget, len: usize) -> *mut c_void {
  if !budget.reserve(len) {
    return std::ptr::null_mut();
  }
  // SAFETY: as in `allocate`.
  let data = unsafe { libc::malloc(len.max(1)) };
  if data.is_null() {
    budget.release(len);
  }
  data
}

unsafe extern "C" fn free(budget: &ArrayBufferBudget, data: *mut c_void, len: usize) {
  // SAFETY: `data` came from `allocate` or `allocate_uninitialized`.
  unsafe { libc::free(data) };
  budget.release(len);
}

unsafe extern "C" fn drop_budget(handle: *const ArrayBufferBudget) {
  // SAFETY: `handle` is the `Arc::into_raw` of `allocator()`, dropped exactly once by V8.
  drop(unsafe { Arc::from_raw(handle) });
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn the_budget_refuses_what_would_pass_the_limit_and_frees_what_is_released() {
    let budget = ArrayBufferBudget::new(100);
    assert!(budget.reserve(60));
    assert!(!budget.reserve(41));
    assert!(budget.reserve(40));
    assert_eq!(budget.used(), 100);
    budget.release(60);
    assert!(budget.reserve(50));
    assert_eq!(budget.used(), 90);
  }
}
