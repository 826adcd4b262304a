//! One isolate: a `JsRuntime` created from the startup snapshot that runs exactly one
//! function's module, and is entered only while it runs ([`Guest`]).
//!
//! Lifecycle, all on the thread the isolate lives on (a shard, or a slow-lane thread):
//! 1. create the runtime from the snapshot and hide Deno's internals ([`BlankIsolate::new`]);
//!    blank isolates wait as spares;
//! 2. load and evaluate the function's module, find its handler and start the JS serve loop
//!    ([`BlankIsolate::start_function`]), metered like any entry into JS;
//! 3. serve: each poll of its event loop is one entry into JS, metered and limited by
//!    `crate::limits` ([`Isolate::poll_entry`]); requests reach it through its
//!    [`RequestQueue`], pushed on the same thread;
//! 4. end when its queue is closed and `waitUntil` work has finished, or when a limit
//!    terminates it; then the runtime is dropped.

pub mod code_cache;
pub mod function_code;
pub mod guest;
pub mod snapshot;

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use deno_core::{JsRuntime, PollEventLoopOptions, RuntimeOptions, v8};
use outpost_ext_cache::{CacheNamespace, EdgeCache};
use outpost_ext_dispatch::{RequestQueue, ServiceDispatch};

use crate::config::{Config, FunctionConfig};
use crate::error::Error;
use crate::limits::Limits;
use crate::limits::cpu::{CpuGuard, ThreadMeter};
use crate::limits::egress::EgressPolicy;
use crate::limits::memory::{ArrayBufferBudget, HeapGuard};
use function_code::{FunctionCode, FunctionModuleLoader};
use guest::Guest;

/// What a function's isolate is created with.
#[derive(Clone)]
pub struct FunctionSpec {
  pub code: Arc<FunctionCode>,
  pub env: Arc<BTreeMap<String, String>>,
  pub egress: Arc<EgressPolicy>,
  /// CPU and heap limits among them (see `crate::limits`).
  pub limits: Limits,
  /// Console output one request may write (`log.console_bytes_per_request`).
  pub console_bytes: usize,
  /// Values of the secrets in `env`, redacted from what the isolate logs.
  pub secrets: Arc<Vec<String>>,
  /// Service bindings: `env` name → the function it calls.
  pub services: Arc<BTreeMap<String, String>>,
}

impl FunctionSpec {
  /// The spec of a configured function whose code has been found.
  pub fn new(config: &Config, function: &FunctionConfig, code: FunctionCode) -> FunctionSpec {
    FunctionSpec {
      code: Arc::new(code),
      env: Arc::new(config.handler_env(function)),
      egress: Arc::new(config.egress_policy(function)),
      limits: function.limits,
      console_bytes: config.log.console_bytes_per_request,
      secrets: Arc::default(),
      services: Arc::new(function.services.clone()),
    }
  }
}

/// What every isolate of a node is created with.
#[derive(Clone)]
pub struct IsolateSettings {
  /// The heap limit of every isolate: the largest any function may use; smaller limits are
  /// checked per function.
  pub max_heap: usize,
  /// The shared cache behind the Cache API (none for load checks and tools).
  pub cache: Option<Arc<dyn EdgeCache>>,
  /// Calls between functions (service bindings).
  pub services: Arc<dyn ServiceDispatch>,
  /// How long loading a function's module may take, in CPU and in wall-clock time.
  pub load_timeout: Duration,
}

/// An isolate created from the snapshot, with Deno's internals hidden, that has not been
/// given a function yet. Once given one it runs that function only.
pub struct BlankIsolate {
  guest: Guest,
  heap: Arc<HeapGuard>,
  loader: Rc<FunctionModuleLoader>,
  /// `serve(namespace, env, maxSubrequests, consoleCap, services)` from the bootstrap JS.
  serve: v8::Global<v8::Function>,
  queue: Rc<RequestQueue>,
  max_heap: usize,
}

impl BlankIsolate {
  /// Creates a blank isolate from the snapshot, on this thread (which it never leaves).
  pub fn new(settings: &IsolateSettings) -> Result<BlankIsolate, Error> {
    let loader = Rc::new(FunctionModuleLoader::default());
    let buffers = ArrayBufferBudget::new(settings.max_heap);
    let queue = Rc::new(RequestQueue::default());
    let mut guest = Guest::new(RuntimeOptions {
      extensions: outpost_js::extensions(outpost_js::IsolateOptions {
        dispatch_queue: Some(queue.clone()),
        fetch: deno_fetch::Options {
          user_agent: concat!("Outpost/", env!("CARGO_PKG_VERSION")).into(),
          ..Default::default()
        },
        cache: settings.cache.clone(),
      }),
      startup_snapshot: Some(snapshot::SNAPSHOT),
      residual_lazy_js_sources: snapshot::RESIDUAL_LAZY_JS,
      residual_lazy_esm_sources: snapshot::RESIDUAL_LAZY_ESM,
      module_loader: Some(loader.clone()),
      create_params: Some(
        v8::CreateParams::default()
          .heap_limits(0, settings.max_heap)
          .array_buffer_allocator(buffers.allocator()),
      ),
      ..Default::default()
    })
    .map_err(|err| Error::IsolateCreate(err.to_string()))?;
    let (heap, serve) = guest.with(|runtime| {
      let heap = HeapGuard::install(runtime, buffers);
      runtime
        .op_state()
        .borrow_mut()
        .put(settings.services.clone());
      // Read both entry points first: bootstrap() deletes globalThis.__outpost.
      let bootstrap = entry_point(runtime, "bootstrap")?;
      let serve = entry_point(runtime, "serve")?;
      call(runtime, &bootstrap, &[])
        .map_err(|err| Error::IsolateCreate(format!("bootstrap failed: {err}")))?;
      Ok::<_, Error>((heap, serve))
    })?;
    Ok(BlankIsolate {
      guest,
      heap,
      loader,
      serve,
      queue,
      max_heap: settings.max_heap,
    })
  }

  /// For tools that run one isolate on a thread and nothing else (the WPT runner): the
  /// runtime, entered for the rest of its life.
  pub fn into_runtime(self) -> JsRuntime {
    self.guest.into_entered()
  }

  /// Gives the isolate its function: loads and evaluates the module (each step an entry
  /// into JS metered on `meter`, the whole within the load timeout), finds its handler and
  /// starts the JS serve loop. Returns the serving isolate.
  pub async fn start_function(
    mut self,
    spec: &FunctionSpec,
    meter: &Arc<ThreadMeter>,
    load_timeout: Duration,
  ) -> Result<Isolate, Error> {
    self
      .loader
      .assign(spec.code.clone())
      .map_err(|_| Error::IsolateCreate("this isolate already runs a function".into()))?;
    let cpu = self.guest.with(|runtime| {
      // Before any of the function's code runs: `eval` and `new Function` only when its
      // limits allow them (V8 throws an EvalError otherwise).
      {
        deno_core::scope!(scope, runtime);
        let context = scope.get_current_context();
        context.set_allow_generation_from_strings(spec.limits.allow_code_generation);
      }
      let cpu = CpuGuard::new(runtime.v8_isolate().thread_safe_handle(), meter);
      cpu.set_request_limits(spec.limits.cpu, spec.limits.soft_cpu);
      let state = runtime.op_state();
      let mut state = state.borrow_mut();
      let budget: Arc<dyn outpost_ext_dispatch::EntryBudget> = cpu.clone();
      state.put(budget);
      state.put(outpost_js::FunctionName(spec.code.name.clone()));
      state.put(CacheNamespace(spec.code.name.as_str().into()));
      state.put(spec.egress.permissions()?);
      state.put(outpost_ext_dispatch::Redactions(spec.secrets.to_vec()));
      state.put(outpost_ext_dispatch::ServiceBindings(
        spec.services.as_ref().clone(),
      ));
      Ok::<_, Error>(cpu)
    })?;
    let loading = self.load(spec, meter, &cpu, load_timeout);
    let serving = match tokio::time::timeout(load_timeout, loading).await {
      Ok(serving) => serving?,
      Err(_) => {
        return Err(Error::FunctionLoad(format!(
          "the module did not finish loading within {load_timeout:?} (a top-level loop or await that does not end?)"
        )));
      }
    };
    // Functions allowed less heap than the isolate was created with are checked after
    // every entry into JS.
    let heap_check = (spec.limits.memory < self.max_heap).then_some(spec.limits.memory);
    Ok(Isolate {
      guest: self.guest,
      heap: self.heap,
      queue: self.queue,
      serving,
      limits: EntryLimits {
        cpu,
        meter: meter.clone(),
        cpu_limit: spec.limits.cpu,
        soft_cpu_limit: spec.limits.soft_cpu,
        heap_check,
        isolate_heap: self.max_heap,
      },
    })
  }

  /// Loads and evaluates the module and calls `serve()`; every step is an entry into JS on
  /// `meter` with the load timeout as its CPU budget, so a module that never yields is
  /// terminated.
  async fn load(
    &mut self,
    spec: &FunctionSpec,
    meter: &Arc<ThreadMeter>,
    cpu: &Arc<CpuGuard>,
    load_timeout: Duration,
  ) -> Result<Serving, Error> {
    let failed = |message: String| {
      if cpu.terminated_for_cpu().is_some() {
        Error::FunctionLoad(format!(
          "the module did not finish loading within {load_timeout:?} of CPU (a top-level loop that does not end?)"
        ))
      } else {
        Error::FunctionLoad(message)
      }
    };
    let guest = &mut self.guest;
    // Our module loader answers synchronously: the module graph loads within one poll.
    let module = metered(guest, meter, cpu, load_timeout, |runtime| {
      let mut loading = Box::pin(runtime.load_main_es_module(spec.code.entry()));
      let waker = futures::task::noop_waker();
      match loading.as_mut().poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(result) => result.map_err(|err| err.to_string()),
        Poll::Pending => Err("the module graph did not load at once".to_string()),
      }
    })
    .map_err(failed)?;
    // Evaluation, and a top-level await: polled with the event loop until settled (deno_core
    // fails it at once when it can no longer settle).
    // The module's top-level code runs right here, inside mod_evaluate.
    let mut evaluation = metered(guest, meter, cpu, load_timeout, |runtime| {
      Box::pin(runtime.mod_evaluate(module))
    });
    poll_fn(|cx| {
      metered(guest, meter, cpu, load_timeout, |runtime| {
        if let Poll::Ready(result) = evaluation.as_mut().poll(cx) {
          return Poll::Ready(result);
        }
        match runtime.poll_event_loop(cx, PollEventLoopOptions::default()) {
          Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
          _ => evaluation.as_mut().poll(cx),
        }
      })
    })
    .await
    .map_err(|err| failed(err.to_string()))?;
    let serve = &self.serve;
    metered(guest, meter, cpu, load_timeout, |runtime| {
      start_serving(runtime, serve, module, spec)
    })
    .map_err(|err| match err {
      Error::FunctionLoad(message) => failed(message),
      other => other,
    })
  }
}

/// Runs `f` as one entry into JS of `guest`'s isolate, metered on `meter` with `budget`.
fn metered<R>(
  guest: &mut Guest,
  meter: &ThreadMeter,
  cpu: &Arc<CpuGuard>,
  budget: Duration,
  f: impl FnOnce(&mut JsRuntime) -> R,
) -> R {
  guest.with(|runtime| {
    meter.enter(cpu, budget, None);
    let result = f(runtime);
    meter.leave();
    result
  })
}

/// Finds the handler in the module's namespace and calls `serve()`, which starts the JS
/// serve loop; returns its promise. Called directly rather than through deno_core's call
/// future: that future parks a waker in a promise callback that is freed only when the
/// promise settles, so every isolate discarded with its serve loop still running would leak
/// it (and with it whatever the waker points to).
fn start_serving(
  runtime: &mut JsRuntime,
  serve: &v8::Global<v8::Function>,
  module: deno_core::ModuleId,
  spec: &FunctionSpec,
) -> Result<Serving, Error> {
  let namespace = runtime
    .get_module_namespace(module)
    .map_err(|err| Error::FunctionLoad(err.to_string()))?;
  deno_core::scope!(scope, runtime);
  v8::tc_scope!(let scope, scope);
  let namespace: v8::Local<v8::Value> = v8::Local::new(scope, namespace).into();
  let env = deno_core::serde_v8::to_v8(scope, spec.env.as_ref())
    .map_err(|err| Error::IsolateCreate(format!("env: {err}")))?;
  let max_subrequests = v8::Integer::new_from_unsigned(scope, spec.limits.max_subrequests);
  let console_bytes = v8::Number::new(scope, spec.console_bytes as f64);
  let services: Vec<&String> = spec.services.keys().collect();
  let services = deno_core::serde_v8::to_v8(scope, services)
    .map_err(|err| Error::IsolateCreate(format!("services: {err}")))?;
  let arguments = [
    namespace,
    env,
    max_subrequests.into(),
    console_bytes.into(),
    services,
  ];
  let serve = v8::Local::new(scope, serve);
  let this = v8::undefined(scope).into();
  let Some(returned) = serve.call(scope, this, &arguments) else {
    // serve() throws synchronously when the module has no handler.
    let exception = scope
      .exception()
      .unwrap_or_else(|| v8::undefined(scope).into());
    let error = deno_core::error::JsError::from_v8_exception(scope, exception);
    return Err(Error::FunctionLoad(error.to_string()));
  };
  let promise = v8::Local::<v8::Promise>::try_from(returned)
    .map_err(|_| Error::IsolateCreate("serve() did not return a promise".into()))?;
  Ok(Serving(v8::Global::new(scope, promise)))
}

/// Calls `function` synchronously (for `bootstrap()`), turning an exception into its text.
fn call(
  runtime: &mut JsRuntime,
  function: &v8::Global<v8::Function>,
  arguments: &[v8::Local<v8::Value>],
) -> Result<(), String> {
  deno_core::scope!(scope, runtime);
  v8::tc_scope!(let scope, scope);
  let function = v8::Local::new(scope, function);
  let this = v8::undefined(scope).into();
  match function.call(scope, this, arguments) {
    Some(_) => Ok(()),
    None => {
      let exception = scope
        .exception()
        .unwrap_or_else(|| v8::undefined(scope).into());
      Err(deno_core::error::JsError::from_v8_exception(scope, exception).to_string())
    }
  }
}

/// The JS serve loop's promise: settled once the isolate is done.
struct Serving(v8::Global<v8::Promise>);

impl Serving {
  /// `None` while the serve loop runs; then whether it ended cleanly.
  fn settled(&self, runtime: &mut JsRuntime) -> Option<Result<(), String>> {
    deno_core::scope!(scope, runtime);
    let promise = v8::Local::new(scope, &self.0);
    match promise.state() {
      v8::PromiseState::Pending => None,
      v8::PromiseState::Fulfilled => Some(Ok(())),
      v8::PromiseState::Rejected => {
        let reason = promise.result(scope);
        Some(Err(
          deno_core::error::JsError::from_v8_exception(scope, reason).to_string(),
        ))
      }
    }
  }
}

/// What bounds each entry into JS of a serving isolate.
struct EntryLimits {
  cpu: Arc<CpuGuard>,
  /// The thread the isolate runs on.
  meter: Arc<ThreadMeter>,
  cpu_limit: Duration,
  soft_cpu_limit: Option<Duration>,
  /// A heap limit below the isolate's own, checked after every entry.
  heap_check: Option<usize>,
  /// The heap limit the isolate was created with.
  isolate_heap: usize,
}

/// A serving isolate: a function's module loaded, its serve loop waiting for requests.
pub struct Isolate {
  guest: Guest,
  heap: Arc<HeapGuard>,
  queue: Rc<RequestQueue>,
  serving: Serving,
  limits: EntryLimits,
}

impl Isolate {
  /// Where its requests go.
  pub fn queue(&self) -> &Rc<RequestQueue> {
    &self.queue
  }

  /// Its CPU state (retired, terminated).
  pub fn cpu(&self) -> &Arc<CpuGuard> {
    &self.limits.cpu
  }

  /// Its memory state (terminated for memory).
  pub fn heap(&self) -> &Arc<HeapGuard> {
    &self.heap
  }

  /// One entry into JS: polls the event loop, metered and limited. Ready when the isolate
  /// is done: its serve loop ended (`Ok`), or a limit or an error ended it (`Err`, with the
  /// reason); it must then be dropped, never polled again. Also says what the entry did.
  pub fn poll_entry(&mut self, cx: &mut Context<'_>) -> (Poll<Result<(), String>>, Entry) {
    let Isolate {
      guest,
      heap,
      serving,
      limits,
      ..
    } = self;
    guest.with(|runtime| {
      let op_state = runtime.op_state();
      // With one request in flight, the entry may use what that request has left of its
      // limit. With several, the entry's time cannot be pinned on one of them (it is split
      // evenly for the usage records) and all of them may run in it, so it may use one
      // limit each: a handler that never yields is still stopped, and a request waiting on
      // I/O is not charged for its neighbours' work. Background work (none in flight) gets
      // one limit. Requests taken off the queue during the entry add one limit each. The
      // soft limit is budgeted the same way.
      let (in_flight, most) = outpost_ext_dispatch::cpu_in_flight(&op_state.borrow());
      let budget = |limit: Duration| match u32::try_from(in_flight) {
        Ok(1) => limit.saturating_sub(most),
        Ok(0) | Err(_) => limit,
        Ok(n) => limit * n,
      };
      limits.meter.enter(
        &limits.cpu,
        budget(limits.cpu_limit),
        limits.soft_cpu_limit.map(budget),
      );
      let polled = runtime.poll_event_loop(cx, PollEventLoopOptions::default());
      let used = limits.meter.leave();
      let answered = outpost_ext_dispatch::charge_entry(&mut op_state.borrow_mut(), used, || {
        heap.memory_in_use(runtime)
      });
      let used = Entry {
        cpu: used,
        answered,
      };
      // A terminated isolate is finished even if V8 let some JS go on (deno_core resumes
      // after a termination caught in a microtask checkpoint): it is discarded.
      if limits.cpu.terminated_for_cpu().is_some() {
        return (Poll::Ready(Err("terminated: CPU limit".to_string())), used);
      }
      // The isolate's own limit too, once V8's was raised past it for a refused ArrayBuffer.
      let heap_check = limits
        .heap_check
        .or(heap.raised().then_some(limits.isolate_heap));
      if heap_check.is_some_and(|limit| heap.check(runtime, limit)) || heap.exceeded() {
        return (
          Poll::Ready(Err("terminated: memory limit".to_string())),
          used,
        );
      }
      // Once the serve loop has ended (every request answered, waitUntil work done), the
      // isolate is done when its event loop is: response bodies may still be streaming.
      match serving.settled(runtime) {
        Some(Err(err)) => return (Poll::Ready(Err(err)), used),
        Some(Ok(())) if polled.is_pending() => return (Poll::Pending, used),
        Some(Ok(())) => return (Poll::Ready(Ok(())), used),
        None => {}
      }
      let outcome = match polled {
        Poll::Ready(Err(err)) => Poll::Ready(Err(err.to_string())),
        // The loop has no more work but the serve promise is unsettled: nothing can settle it.
        Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
        Poll::Pending => Poll::Pending,
      };
      (outcome, used)
    })
  }
}

/// What one entry into JS did.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
  /// The CPU time it used.
  pub cpu: Duration,
  /// The requests answered during it.
  pub answered: usize,
}

/// The state of a serving isolate that the server side reads: why it ended, how busy it is,
/// when it was last used. Lives as long as anyone holds it, the isolate itself may be gone.
pub struct IsolateStatus {
  cpu: Arc<CpuGuard>,
  heap: Arc<HeapGuard>,
  in_flight: AtomicUsize,
  /// Requests it has finished.
  answered: AtomicU64,
  /// Set by the first request given to the isolate.
  served: AtomicBool,
  /// Set once the isolate has ended (its serve loop finished or a limit ended it).
  ended: AtomicBool,
  /// Milliseconds since `epoch` at the last request start or finish.
  last_active_ms: AtomicU64,
  epoch: Instant,
}

impl IsolateStatus {
  pub fn new(isolate: &Isolate) -> Arc<IsolateStatus> {
    Arc::new(IsolateStatus {
      cpu: isolate.cpu().clone(),
      heap: isolate.heap().clone(),
      in_flight: AtomicUsize::new(0),
      answered: AtomicU64::new(0),
      served: AtomicBool::new(false),
      ended: AtomicBool::new(false),
      last_active_ms: AtomicU64::new(0),
      epoch: Instant::now(),
    })
  }

  /// When the isolate was terminated for running past its CPU budget: the CPU time the
  /// terminated entry into JS had used.
  pub fn terminated_for_cpu(&self) -> Option<Duration> {
    self.cpu.terminated_for_cpu()
  }

  /// Whether the isolate was terminated for using more memory than allowed.
  pub fn terminated_for_memory(&self) -> bool {
    self.heap.exceeded()
  }

  /// Whether the isolate went past its soft CPU limit: it takes no new requests.
  pub fn retired(&self) -> bool {
    self.cpu.retired()
  }

  /// Whether the isolate has ended.
  pub fn ended(&self) -> bool {
    self.ended.load(Ordering::Acquire)
  }

  /// Marks the isolate as ended.
  pub fn end(&self) {
    self.ended.store(true, Ordering::Release);
  }

  /// Requests it has finished.
  pub fn answered(&self) -> u64 {
    self.answered.load(Ordering::Relaxed)
  }

  /// Requests given to this isolate and not yet answered.
  pub fn in_flight(&self) -> usize {
    self.in_flight.load(Ordering::Relaxed)
  }

  /// How long this isolate has had no request start or finish.
  pub fn idle_for(&self) -> Duration {
    let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
    self.epoch.elapsed().saturating_sub(last)
  }

  fn touch(&self) {
    let now = self.epoch.elapsed().as_millis() as u64;
    self.last_active_ms.store(now, Ordering::Relaxed);
  }

  /// Counts a request as in flight on this isolate until the guard is dropped.
  pub fn begin(self: &Arc<Self>) -> InFlightGuard {
    self.in_flight.fetch_add(1, Ordering::Relaxed);
    self.touch();
    InFlightGuard {
      first: !self.served.swap(true, Ordering::Relaxed),
      isolate: self.clone(),
    }
  }
}

/// Marks one request as in flight on an isolate.
pub struct InFlightGuard {
  isolate: Arc<IsolateStatus>,
  first: bool,
}

impl InFlightGuard {
  /// Whether this is the isolate's first request (a cold start).
  pub fn first(&self) -> bool {
    self.first
  }

  /// The isolate the request went to.
  pub fn isolate(&self) -> &IsolateStatus {
    &self.isolate
  }
}

impl Drop for InFlightGuard {
  fn drop(&mut self) {
    self.isolate.in_flight.fetch_sub(1, Ordering::Relaxed);
    self.isolate.answered.fetch_add(1, Ordering::Relaxed);
    self.isolate.touch();
  }
}

/// Reads `globalThis.__outpost[name]`, published by the bootstrap JS in the snapshot.
fn entry_point(runtime: &mut JsRuntime, name: &str) -> Result<v8::Global<v8::Function>, Error> {
  deno_core::scope!(scope, runtime);
  let missing = || Error::IsolateCreate(format!("the snapshot has no __outpost.{name}"));
  let context = scope.get_current_context();
  let global = context.global(scope);
  let key = v8::String::new(scope, "__outpost").ok_or_else(missing)?;
  let outpost = global
    .get(scope, key.into())
    .and_then(|v| v8::Local::<v8::Object>::try_from(v).ok())
    .ok_or_else(missing)?;
  let key = v8::String::new(scope, name).ok_or_else(missing)?;
  let function = outpost
    .get(scope, key.into())
    .and_then(|v| v8::Local::<v8::Function>::try_from(v).ok())
    .ok_or_else(missing)?;
  Ok(v8::Global::new(scope, function))
}

/// Loads a function in a throwaway isolate to check that it would serve (`outpost check`).
pub fn check_function(
  spec: &FunctionSpec,
  watchdog: &Arc<crate::limits::cpu::CpuWatchdog>,
) -> Result<(), Error> {
  let tokio = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .map_err(|err| Error::IsolateCreate(err.to_string()))?;
  let settings = IsolateSettings {
    max_heap: spec.limits.memory,
    cache: None,
    services: Arc::new(outpost_ext_dispatch::NoServices),
    load_timeout: Duration::from_secs(10),
  };
  tokio.block_on(async {
    let meter = ThreadMeter::for_this_thread(watchdog, false);
    let isolate = BlankIsolate::new(&settings)?;
    isolate
      .start_function(spec, &meter, settings.load_timeout)
      .await
      .map(drop)
  })
}
