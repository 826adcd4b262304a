//! One isolate: an OS thread with a current-thread tokio runtime and a `JsRuntime` created
//! from the startup snapshot, running exactly one function's module.
//!
//! Lifecycle on the isolate thread:
//! 1. create the runtime from the snapshot ([`BlankIsolate::new`]) and hide Deno's internals;
//! 2. load and evaluate the function's module, find its handler and start the JS serve loop;
//! 3. report ready (or the load error) to whoever spawned it;
//! 4. drive the event loop ([`drive_event_loop`], metered and limited by `crate::cpu`) until the
//!    request channel closes and `waitUntil` work has finished; then drop the runtime.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deno_core::{JsRuntime, PollEventLoopOptions, RuntimeOptions, v8};
use outpost_ext_cache::{CacheNamespace, EdgeCache};
use outpost_ext_dispatch::{DispatchQueue, DispatchRequest, ServiceDispatch};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, FunctionConfig, ServerConfig};
use crate::cpu::{CpuGuard, CpuWatchdog};
use crate::egress::EgressPolicy;
use crate::error::Error;
use crate::function_code::{FunctionCode, FunctionModuleLoader};
use crate::limits::Limits;
use crate::memory::{ArrayBufferBudget, HeapGuard};
use crate::snapshot;

/// Requests that may wait in one isolate's channel before senders are held back.
const REQUEST_CHANNEL_CAPACITY: usize = 256;

/// What a function's isolate is created with.
#[derive(Clone)]
pub struct FunctionSpec {
  pub code: Arc<FunctionCode>,
  pub env: Arc<BTreeMap<String, String>>,
  pub egress: Arc<EgressPolicy>,
  /// CPU (see `crate::cpu`) and heap (see `crate::memory`) limits among them.
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

/// The server side's handle on a running isolate.
pub struct IsolateHandle {
  sender: mpsc::Sender<DispatchRequest>,
  cpu: Arc<CpuGuard>,
  heap: Arc<HeapGuard>,
  in_flight: Arc<AtomicUsize>,
  /// Set by the first request dispatched to the isolate.
  served: std::sync::atomic::AtomicBool,
  /// Milliseconds since `epoch` at the last request start or finish.
  last_active_ms: AtomicU64,
  epoch: Instant,
}

impl IsolateHandle {
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

  /// Requests currently dispatched to this isolate and not yet answered.
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

  /// Hands a request to the isolate. The returned guard counts it as in flight until it is
  /// dropped (when the response has been produced or the client went away).
  pub async fn dispatch(
    self: &Arc<Self>,
    request: DispatchRequest,
  ) -> Result<InFlightGuard, DispatchClosed> {
    self.in_flight.fetch_add(1, Ordering::Relaxed);
    self.touch();
    let guard = InFlightGuard {
      isolate: self.clone(),
      first: !self.served.swap(true, Ordering::Relaxed),
    };
    match self.sender.send(request).await {
      Ok(()) => Ok(guard),
      Err(returned) => Err(DispatchClosed(returned.0)),
    }
  }
}

/// The isolate's request channel is closed (it has shut down or died); the request comes
/// back to be sent elsewhere.
pub struct DispatchClosed(pub DispatchRequest);

/// Marks one request as in flight on an isolate.
pub struct InFlightGuard {
  isolate: Arc<IsolateHandle>,
  first: bool,
}

impl InFlightGuard {
  /// Whether this is the isolate's first request (a cold start).
  pub fn first(&self) -> bool {
    self.first
  }

  /// The isolate the request went to.
  pub fn isolate(&self) -> &IsolateHandle {
    &self.isolate
  }
}

impl Drop for InFlightGuard {
  fn drop(&mut self) {
    self.isolate.in_flight.fetch_sub(1, Ordering::Relaxed);
    self.isolate.touch();
  }
}

/// Starts isolate threads, and keeps `spares` blank isolates ready on threads of their own
/// so that a pool that grows, or a function seen for the first time, does not wait for an
/// isolate to be created from the snapshot: taking a spare costs only loading the function.
pub struct IsolateFactory {
  spares: usize,
  host: IsolateHost,
  /// How long loading a function's module may take before it is terminated.
  load_timeout: Duration,
  state: Mutex<SpareState>,
  /// Signalled whenever a spare thread has finished creating its isolate.
  announced: tokio::sync::Notify,
}

/// What every isolate thread of the node is given.
#[derive(Clone)]
struct IsolateHost {
  /// The heap limit isolates are created with: the largest any function may use.
  max_heap: usize,
  watchdog: Arc<CpuWatchdog>,
  /// The shared cache behind the Cache API.
  cache: Arc<dyn EdgeCache>,
  /// Calls between functions (service bindings).
  services: Arc<dyn ServiceDispatch>,
}

#[derive(Default)]
struct SpareState {
  ready: Vec<Spare>,
  /// Spare threads still creating their isolate.
  starting: usize,
}

/// A blank isolate waiting on its thread for a function.
struct Spare {
  sender: mpsc::Sender<DispatchRequest>,
  assign: oneshot::Sender<Assignment>,
}

/// A function for an isolate thread to take on, and where to say when it serves.
struct Assignment {
  spec: FunctionSpec,
  /// Gets the isolate's CPU and heap guards as loading begins: the server side needs them
  /// to tell why an isolate ended, and to terminate a load that overruns the timeout.
  loading: oneshot::Sender<(Arc<CpuGuard>, Arc<HeapGuard>)>,
  ready: oneshot::Sender<Result<(), Error>>,
}

/// How an isolate thread gets its function.
enum Start {
  Now(Assignment),
  /// Become a spare: `announce` is called once the blank isolate exists (with `true`), or
  /// failed (`false`); then wait for an assignment.
  Spare {
    announce: Box<dyn FnOnce(bool) + Send>,
    assigned: oneshot::Receiver<Assignment>,
  },
}

impl IsolateFactory {
  /// A factory keeping `server.spare_isolates` blank isolates ready (0: none; every isolate
  /// is created on demand), whose isolates may take `server.load_timeout_ms` to load their
  /// function and grow their heap to `max_heap` bytes, and reach `cache` through the Cache
  /// API. Starts the CPU watchdog.
  pub fn new(
    server: &ServerConfig,
    max_heap: usize,
    cache: Arc<dyn EdgeCache>,
    services: Arc<dyn ServiceDispatch>,
  ) -> Result<Arc<IsolateFactory>, Error> {
    let watchdog = CpuWatchdog::start(server.demote_long_entries)
      .map_err(|err| Error::IsolateThread(err.to_string()))?;
    let factory = Arc::new(IsolateFactory {
      spares: server.spare_isolates,
      host: IsolateHost {
        max_heap,
        watchdog,
        cache,
        services,
      },
      load_timeout: Duration::from_millis(server.load_timeout_ms),
      state: Mutex::default(),
      announced: tokio::sync::Notify::new(),
    });
    factory.refill();
    Ok(factory)
  }

  /// Waits until every spare thread started so far has created its isolate (or failed to).
  pub async fn spares_settled(&self) {
    loop {
      let announced = self.announced.notified();
      if self.state.lock().expect("spare lock").starting == 0 {
        return;
      }
      announced.await;
    }
  }

  /// Starts spare threads until `spares` are ready or starting.
  fn refill(self: &Arc<Self>) {
    let mut state = self.state.lock().expect("spare lock");
    while state.ready.len() + state.starting < self.spares {
      let (sender, receiver) = mpsc::channel(REQUEST_CHANNEL_CAPACITY);
      let (assign, assigned) = oneshot::channel();
      let factory = Arc::downgrade(self);
      let announce = Box::new(move |created: bool| {
        let Some(factory) = factory.upgrade() else {
          return;
        };
        let mut state = factory.state.lock().expect("spare lock");
        state.starting -= 1;
        if created {
          state.ready.push(Spare { sender, assign });
        }
        drop(state);
        factory.announced.notify_waiters();
      });
      let start = Start::Spare { announce, assigned };
      if let Err(err) = spawn_isolate_thread("isolate:spare", receiver, start, self.host.clone()) {
        tracing::warn!(error = %err, "cannot start a spare isolate");
        break;
      }
      state.starting += 1;
    }
  }

  /// Starts an isolate running `spec` — on a spare when one is ready — and waits until it
  /// serves or fails to load. Dropping every clone of the returned handle closes the
  /// isolate's channel and lets its thread end.
  pub async fn start(self: &Arc<Self>, spec: FunctionSpec) -> Result<Arc<IsolateHandle>, Error> {
    let started = Instant::now();
    let function = spec.code.name.clone();
    let (ready, is_ready) = oneshot::channel();
    let (loading, is_loading) = oneshot::channel();
    let mut assignment = Some(Assignment {
      spec,
      loading,
      ready,
    });
    let mut taken = None;
    while let Some(unsent) = assignment.take() {
      let spare = self.state.lock().expect("spare lock").ready.pop();
      let Some(spare) = spare else {
        assignment = Some(unsent);
        break;
      };
      match spare.assign.send(unsent) {
        Ok(()) => taken = Some(spare.sender),
        // That spare's thread is gone; try the next one.
        Err(returned) => assignment = Some(returned),
      }
    }
    let (sender, source) = match (taken, assignment) {
      (Some(sender), _) => (sender, "spare"),
      (None, Some(assignment)) => {
        let (sender, receiver) = mpsc::channel(REQUEST_CHANNEL_CAPACITY);
        spawn_isolate_thread(
          &format!("isolate:{function}"),
          receiver,
          Start::Now(assignment),
          self.host.clone(),
        )?;
        (sender, "snapshot")
      }
      (None, None) => unreachable!("an assignment is either sent or kept"),
    };
    self.refill();
    let exited = || Error::IsolateCreate("the isolate thread exited during startup".into());
    let Ok((cpu, heap)) = is_loading.await else {
      // The thread failed before loading began; its error, if any, is on `ready`.
      return Err(match is_ready.await {
        Ok(Err(err)) => err,
        _ => exited(),
      });
    };
    match tokio::time::timeout(self.load_timeout, is_ready).await {
      Ok(ready) => ready.map_err(|_| exited())??,
      Err(_) => {
        cpu.terminate();
        return Err(Error::FunctionLoad(format!(
          "the module did not finish loading within {:?} (a top-level loop or await that does not end?)",
          self.load_timeout
        )));
      }
    }
    tracing::info!(
      function,
      from = source,
      ready_ms = started.elapsed().as_secs_f64() * 1e3,
      "isolate ready"
    );
    Ok(Arc::new(IsolateHandle {
      sender,
      cpu,
      heap,
      in_flight: Arc::default(),
      served: std::sync::atomic::AtomicBool::new(false),
      last_active_ms: AtomicU64::new(0),
      epoch: Instant::now(),
    }))
  }
}

fn spawn_isolate_thread(
  name: &str,
  receiver: mpsc::Receiver<DispatchRequest>,
  start: Start,
  host: IsolateHost,
) -> Result<(), Error> {
  std::thread::Builder::new()
    .name(name.into())
    .spawn(move || run_isolate_thread(receiver, start, host))
    .map(drop)
    .map_err(|err| Error::IsolateThread(err.to_string()))
}

fn run_isolate_thread(receiver: mpsc::Receiver<DispatchRequest>, start: Start, host: IsolateHost) {
  let IsolateHost {
    max_heap,
    watchdog,
    cache,
    services,
  } = host;
  let tokio = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build();
  let (tokio, start) = match (tokio, start) {
    (Ok(tokio), start) => (tokio, start),
    (Err(err), Start::Now(assignment)) => {
      let _ = assignment
        .ready
        .send(Err(Error::IsolateCreate(err.to_string())));
      return;
    }
    (Err(err), Start::Spare { announce, .. }) => {
      tracing::warn!(error = %err, "cannot start a spare isolate");
      announce(false);
      return;
    }
  };
  tokio.block_on(async move {
    let blank = BlankIsolate::new(Some(receiver), max_heap, Some(cache));
    let (
      mut isolate,
      Assignment {
        spec,
        loading,
        ready,
      },
    ) = match (blank, start) {
      (Ok(isolate), Start::Now(assignment)) => (isolate, assignment),
      (Err(err), Start::Now(assignment)) => {
        let _ = assignment.ready.send(Err(err));
        return;
      }
      (Ok(isolate), Start::Spare { announce, assigned }) => {
        announce(true);
        // The factory dropped this spare (shutdown): nothing to run.
        let Ok(assignment) = assigned.await else {
          return;
        };
        (isolate, assignment)
      }
      (Err(err), Start::Spare { announce, .. }) => {
        tracing::warn!(error = %err, "cannot create a spare isolate");
        announce(false);
        return;
      }
    };
    let cpu = CpuGuard::new(isolate.runtime.v8_isolate().thread_safe_handle(), &watchdog);
    cpu.set_request_limits(spec.limits.cpu, spec.limits.soft_cpu);
    let budget: Arc<dyn outpost_ext_dispatch::EntryBudget> = cpu.clone();
    isolate.runtime.op_state().borrow_mut().put(budget);
    isolate.runtime.op_state().borrow_mut().put(services);
    let _ = loading.send((cpu.clone(), isolate.heap.clone()));
    let serving = match isolate.start_function(&spec).await {
      Ok(serving) => serving,
      Err(err) => {
        let _ = ready.send(Err(err));
        return;
      }
    };
    let _ = ready.send(Ok(()));
    // Functions allowed less heap than the isolate was created with are checked after
    // every entry into JS.
    let heap_check = (spec.limits.memory < max_heap).then_some(spec.limits.memory);
    let limits = EntryLimits {
      cpu: &cpu,
      cpu_limit: spec.limits.cpu,
      soft_cpu_limit: spec.limits.soft_cpu,
      heap: &isolate.heap,
      heap_check,
      isolate_heap: max_heap,
    };
    if let Err(err) = drive_event_loop(&mut isolate.runtime, serving, limits).await {
      tracing::error!(function = %spec.code.name, error = %err, "isolate event loop failed");
    }
  });
}

/// An isolate created from the snapshot, with Deno's internals hidden, that has not been
/// given a function yet. Once given one it runs that function only.
pub struct BlankIsolate {
  pub runtime: JsRuntime,
  heap: Arc<HeapGuard>,
  loader: Rc<FunctionModuleLoader>,
  /// `serve(namespace, env, maxSubrequests, consoleCap)` from the bootstrap JS.
  serve: v8::Global<v8::Function>,
}

impl BlankIsolate {
  /// Creates a blank isolate from the snapshot whose heap may grow to `max_heap` bytes.
  /// `receiver` is its request channel and `cache` the shared cache (none for load checks).
  pub fn new(
    receiver: Option<mpsc::Receiver<DispatchRequest>>,
    max_heap: usize,
    cache: Option<Arc<dyn EdgeCache>>,
  ) -> Result<BlankIsolate, Error> {
    let loader = Rc::new(FunctionModuleLoader::default());
    let buffers = ArrayBufferBudget::new(max_heap);
    let mut runtime = JsRuntime::try_new(RuntimeOptions {
      extensions: outpost_js::extensions(outpost_js::IsolateOptions {
        dispatch_queue: receiver.map(DispatchQueue::new),
        fetch: deno_fetch::Options {
          user_agent: concat!("Outpost/", env!("CARGO_PKG_VERSION")).into(),
          ..Default::default()
        },
        cache,
      }),
      startup_snapshot: Some(snapshot::SNAPSHOT),
      residual_lazy_js_sources: snapshot::RESIDUAL_LAZY_JS,
      residual_lazy_esm_sources: snapshot::RESIDUAL_LAZY_ESM,
      module_loader: Some(loader.clone()),
      create_params: Some(
        v8::CreateParams::default()
          .heap_limits(0, max_heap)
          .array_buffer_allocator(buffers.allocator()),
      ),
      ..Default::default()
    })
    .map_err(|err| Error::IsolateCreate(err.to_string()))?;
    let heap = HeapGuard::install(&mut runtime, buffers);
    // Read both entry points first: bootstrap() deletes globalThis.__outpost.
    let bootstrap = entry_point(&mut runtime, "bootstrap")?;
    let serve = entry_point(&mut runtime, "serve")?;
    // bootstrap() is synchronous; its call future is ready at once.
    futures::executor::block_on(runtime.call(&bootstrap))
      .map_err(|err| Error::IsolateCreate(format!("bootstrap failed: {err}")))?;
    Ok(BlankIsolate {
      runtime,
      heap,
      loader,
      serve,
    })
  }

  /// Loads and evaluates the function's module and starts the JS serve loop. Returns the
  /// serve loop's promise future, which settles when the isolate is done.
  pub async fn start_function(&mut self, spec: &FunctionSpec) -> Result<Serving, Error> {
    self
      .loader
      .assign(spec.code.clone())
      .map_err(|_| Error::IsolateCreate("this isolate already runs a function".into()))?;
    let runtime = &mut self.runtime;
    {
      // Before any of the function's code runs: `eval` and `new Function` only when its
      // limits allow them (V8 throws an EvalError otherwise).
      deno_core::scope!(scope, runtime);
      let context = scope.get_current_context();
      context.set_allow_generation_from_strings(spec.limits.allow_code_generation);
    }
    {
      let state = runtime.op_state();
      let mut state = state.borrow_mut();
      state.put(outpost_js::FunctionName(spec.code.name.clone()));
      state.put(CacheNamespace(spec.code.name.as_str().into()));
      state.put(spec.egress.permissions()?);
      state.put(outpost_ext_dispatch::Redactions(spec.secrets.to_vec()));
      state.put(outpost_ext_dispatch::ServiceBindings(
        spec.services.as_ref().clone(),
      ));
    }
    let module = runtime
      .load_main_es_module(spec.code.entry())
      .await
      .map_err(|err| Error::FunctionLoad(err.to_string()))?;
    // Fails, rather than waits forever, when a top-level await can no longer settle.
    let evaluation = runtime.mod_evaluate(module);
    runtime
      .with_event_loop_promise(Box::pin(evaluation), PollEventLoopOptions::default())
      .await
      .map_err(|err| Error::FunctionLoad(err.to_string()))?;
    let namespace = runtime
      .get_module_namespace(module)
      .map_err(|err| Error::FunctionLoad(err.to_string()))?;
    let arguments = {
      deno_core::scope!(scope, runtime);
      let namespace: v8::Local<v8::Value> = v8::Local::new(scope, namespace).into();
      let env = deno_core::serde_v8::to_v8(scope, spec.env.as_ref())
        .map_err(|err| Error::IsolateCreate(format!("env: {err}")))?;
      let max_subrequests = v8::Integer::new_from_unsigned(scope, spec.limits.max_subrequests);
      let console_bytes = v8::Number::new(scope, spec.console_bytes as f64);
      let services: Vec<&String> = spec.services.keys().collect();
      let services = deno_core::serde_v8::to_v8(scope, services)
        .map_err(|err| Error::IsolateCreate(format!("services: {err}")))?;
      [
        v8::Global::new(scope, namespace),
        v8::Global::new(scope, env),
        v8::Global::new(scope, v8::Local::<v8::Value>::from(max_subrequests)),
        v8::Global::new(scope, v8::Local::<v8::Value>::from(console_bytes)),
        v8::Global::new(scope, services),
      ]
    };
    // Called directly rather than through deno_core's call future: that future parks a
    // waker in a promise callback which is freed only when the promise settles, so every
    // isolate discarded with its serve loop still running would leak it (and with it the
    // tokio runtime handle the waker points to).
    deno_core::scope!(scope, runtime);
    v8::tc_scope!(let scope, scope);
    let serve = v8::Local::new(scope, &self.serve);
    let arguments: Vec<v8::Local<v8::Value>> =
      arguments.iter().map(|a| v8::Local::new(scope, a)).collect();
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
}

/// The JS serve loop's promise: settled once the isolate is done.
pub struct Serving(v8::Global<v8::Promise>);

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

/// Drives the isolate until its serve loop has finished. Once the function is loaded, every
/// entry into JS on this thread happens inside `poll_event_loop`; this is the seam where
/// CPU metering wraps each poll.
/// What bounds each entry into JS of a running isolate.
struct EntryLimits<'a> {
  cpu: &'a CpuGuard,
  cpu_limit: Duration,
  soft_cpu_limit: Option<Duration>,
  heap: &'a HeapGuard,
  /// A heap limit below the isolate's own, checked after every entry.
  heap_check: Option<usize>,
  /// The heap limit the isolate was created with.
  isolate_heap: usize,
}

async fn drive_event_loop(
  runtime: &mut JsRuntime,
  serving: Serving,
  limits: EntryLimits<'_>,
) -> Result<(), String> {
  let EntryLimits {
    cpu,
    cpu_limit,
    soft_cpu_limit,
    heap,
    heap_check,
    isolate_heap,
  } = limits;
  let options = PollEventLoopOptions::default();
  let op_state = runtime.op_state();
  poll_fn(|cx| {
    // With one request in flight, the entry may use what that request has left of its
    // limit. With several, the entry's time cannot be pinned on one of them (it is split
    // evenly for the usage records) and all of them may run in it, so it may use one limit
    // each: a handler that never yields is still stopped, and a request waiting on I/O is
    // not charged for its neighbours' work. Background work (none in flight) gets one
    // limit. Requests taken off the queue during the entry add one limit each. The soft
    // limit is budgeted the same way.
    let (in_flight, most) = outpost_ext_dispatch::cpu_in_flight(&op_state.borrow());
    let budget = |limit: Duration| match u32::try_from(in_flight) {
      Ok(1) => limit.saturating_sub(most),
      Ok(0) | Err(_) => limit,
      Ok(n) => limit * n,
    };
    cpu.enter(budget(cpu_limit), soft_cpu_limit.map(budget));
    let polled = runtime.poll_event_loop(cx, options);
    let used = cpu.leave();
    outpost_ext_dispatch::charge_entry(&mut op_state.borrow_mut(), used, || {
      heap.memory_in_use(runtime)
    });
    // A terminated isolate is finished even if V8 let some JS go on (deno_core resumes after
    // a termination caught in a microtask checkpoint): it is discarded, never polled again.
    if cpu.terminated_for_cpu().is_some() {
      return std::task::Poll::Ready(Err("terminated: CPU limit".to_string()));
    }
    // The isolate's own limit, once V8's was raised past it for a refused ArrayBuffer.
    let heap_check = heap_check.or(heap.raised().then_some(isolate_heap));
    if heap_check.is_some_and(|limit| heap.check(runtime, limit)) || heap.exceeded() {
      return std::task::Poll::Ready(Err("terminated: memory limit".to_string()));
    }
    if let Some(result) = serving.settled(runtime) {
      return std::task::Poll::Ready(result);
    }
    match polled {
      std::task::Poll::Ready(Err(err)) => std::task::Poll::Ready(Err(err.to_string())),
      // The loop has no more work but the serve promise is unsettled: nothing can settle it.
      std::task::Poll::Ready(Ok(())) => std::task::Poll::Ready(Ok(())),
      std::task::Poll::Pending => std::task::Poll::Pending,
    }
  })
  .await
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
pub fn check_function(spec: &FunctionSpec) -> Result<(), Error> {
  let tokio = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .map_err(|err| Error::IsolateCreate(err.to_string()))?;
  tokio.block_on(async {
    let mut isolate = BlankIsolate::new(None, spec.limits.memory, None)?;
    isolate.start_function(spec).await.map(drop)
  })
}
