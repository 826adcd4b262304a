//! [`Guest`]: a `JsRuntime` that is entered only while it is used, so that many of them can
//! live on one thread.
//!
//! rusty_v8 enters an isolate when it is created and exits it when it is dropped, and V8
//! needs the isolate in use to be the thread's current one. With several isolates on one
//! thread the safe discipline is: exit right after creation; enter around every use (event
//! loop polls, module loads, script runs, heap reads) and exit right after, never across an
//! `.await`; enter right before dropping (the drop exits it once more and disposes it).
//! `Guest` is the only way the rest of Outpost touches a runtime, so nothing breaks the rule.

use deno_core::{JsRuntime, RuntimeOptions};

/// A `JsRuntime` entered only inside [`Guest::with`].
pub struct Guest {
  runtime: Option<JsRuntime>,
}

impl Guest {
  /// Creates the runtime (on this thread, which it never leaves) and exits its isolate.
  pub fn new(options: RuntimeOptions) -> Result<Guest, deno_core::error::CoreError> {
    let mut runtime = JsRuntime::try_new(options)?;
    // SAFETY: the isolate was entered by its creation on this thread; nothing else entered
    // an isolate since (creation runs no task of the thread).
    unsafe { runtime.v8_isolate().exit() };
    Ok(Guest {
      runtime: Some(runtime),
    })
  }

  /// Runs `f` with the runtime entered; exits it afterwards, also when `f` panics.
  pub fn with<R>(&mut self, f: impl FnOnce(&mut JsRuntime) -> R) -> R {
    let runtime = self
      .runtime
      .as_mut()
      .expect("a guest has its runtime until dropped");
    // SAFETY: entered here and exited by `Exited` below on every path; isolates entered
    // inside `f` (none are) would be exited there too, so entries nest.
    unsafe { runtime.v8_isolate().enter() };
    struct Exited<'a>(&'a mut JsRuntime);
    impl Drop for Exited<'_> {
      fn drop(&mut self) {
        // SAFETY: entered in `with` on this thread, and still the current isolate.
        unsafe { self.0.v8_isolate().exit() };
      }
    }
    let entered = Exited(runtime);
    f(entered.0)
  }
}

impl Guest {
  /// For a thread that runs this one isolate and nothing else: the runtime, entered for the
  /// rest of its life (its drop exits it).
  pub fn into_entered(mut self) -> JsRuntime {
    let mut runtime = self
      .runtime
      .take()
      .expect("a guest has its runtime until dropped");
    // SAFETY: matched by the exit of the runtime's drop.
    unsafe { runtime.v8_isolate().enter() };
    runtime
  }
}

impl Drop for Guest {
  fn drop(&mut self) {
    if let Some(mut runtime) = self.runtime.take() {
      // SAFETY: dropping an OwnedIsolate exits it: enter it first, so the exit matches.
      unsafe { runtime.v8_isolate().enter() };
      drop(runtime);
    }
  }
}

#[cfg(test)]
mod tests {
  use std::cell::RefCell;
  use std::future::poll_fn;
  use std::rc::Rc;

  use deno_core::PollEventLoopOptions;

  use super::*;

  /// 50 runtimes on one thread: scripts run interleaved, timers of all of them run as local
  /// tasks of one current-thread runtime, each keeps its own state, and they are dropped in a
  /// scrambled order; five rounds. V8 aborts the process if the discipline is broken.
  #[test]
  fn fifty_runtimes_share_one_thread_and_drop_in_any_order() {
    crate::init_v8();
    let tokio = tokio::runtime::Builder::new_current_thread()
      .enable_all()
      .build()
      .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&tokio, async {
      for round in 0..5u64 {
        let guests: Vec<Rc<RefCell<Guest>>> = (0..50)
          .map(|_| Rc::new(RefCell::new(Guest::new(RuntimeOptions::default()).unwrap())))
          .collect();
        for (i, guest) in guests.iter().enumerate() {
          guest.borrow_mut().with(|rt| {
            rt.execute_script("init", format!("globalThis.me = {i}; globalThis.ticks = 0;"))
              .unwrap();
          });
        }
        for guest in &guests {
          guest.borrow_mut().with(|rt| {
            rt.execute_script(
              "timers",
              "for (let t = 0; t < 20; t++) Deno.core.createTimer(() => { globalThis.ticks++; }, 1 + (t % 5), undefined, false, true, false);",
            )
            .unwrap();
          });
        }
        let drivers: Vec<_> = guests
          .iter()
          .map(|guest| {
            let guest = guest.clone();
            tokio::task::spawn_local(async move {
              poll_fn(|cx| {
                guest
                  .borrow_mut()
                  .with(|rt| rt.poll_event_loop(cx, PollEventLoopOptions::default()))
              })
              .await
              .unwrap();
            })
          })
          .collect();
        for driver in drivers {
          driver.await.unwrap();
        }
        for (i, guest) in guests.iter().enumerate() {
          let state = guest.borrow_mut().with(|rt| {
            let value = rt
              .execute_script("check", "`${globalThis.me}/${globalThis.ticks}`")
              .unwrap();
            deno_core::scope!(scope, rt);
            let value = deno_core::v8::Local::new(scope, value);
            value.to_rust_string_lossy(scope)
          });
          assert_eq!(state, format!("{i}/20"), "round {round}");
        }
        // A scrambled order: neither creation order nor its reverse.
        let mut order: Vec<usize> = (0..guests.len()).collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ round;
        for i in (1..order.len()).rev() {
          seed ^= seed << 13;
          seed ^= seed >> 7;
          seed ^= seed << 17;
          order.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let mut slots: Vec<Option<Rc<RefCell<Guest>>>> = guests.into_iter().map(Some).collect();
        for i in order {
          drop(slots[i].take());
        }
      }
    });
  }
}
