//! One isolate: an OS thread with a current-thread tokio runtime and a `JsRuntime` created
//! from the startup snapshot, running exactly one function's module.
//!
//! Lifecycle on the isolate thread:
//! 1. create the runtime from the snapshot ([`BlankIsolate::new`]) and hide Deno's internals;
//! 2. load and evaluate the function's module, find its handler and start the JS serve loop;
//! 3. report ready (or the load error) to whoever spawned it;
//! 4. drive the event loop ([`drive_event_loop`], where CPU metering hooks in) until the
//!    request channel closes and `waitUntil` work has finished; then drop the runtime.

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deno_core::{JsRuntime, PollEventLoopOptions, RuntimeOptions, v8};
use deno_permissions::{
  Permissions, PermissionsContainer, PermissionsOptions, RuntimePermissionDescriptorParser,
};
use outpost_ext_dispatch::{DispatchQueue, DispatchRequest};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::function_code::{FunctionCode, FunctionModuleLoader};
use crate::snapshot;

/// Requests that may wait in one isolate's channel before senders are held back.
const REQUEST_CHANNEL_CAPACITY: usize = 256;

/// What a function's isolate is created with.
#[derive(Clone)]
pub struct FunctionSpec {
  pub code: Arc<FunctionCode>,
  pub env: Arc<BTreeMap<String, String>>,
}

/// The server side's handle on a running isolate.
pub struct IsolateHandle {
  sender: mpsc::Sender<DispatchRequest>,
  in_flight: Arc<AtomicUsize>,
  /// Milliseconds since `epoch` at the last request start or finish.
  last_active_ms: AtomicU64,
  epoch: Instant,
}

impl IsolateHandle {
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
}

impl Drop for InFlightGuard {
  fn drop(&mut self) {
    self.isolate.in_flight.fetch_sub(1, Ordering::Relaxed);
    self.isolate.touch();
  }
}

/// Starts an isolate thread for `spec` and waits until it serves or fails to load.
/// Dropping every clone of the returned handle closes the channel and lets the thread end.
pub async fn spawn_isolate(spec: FunctionSpec) -> Result<Arc<IsolateHandle>, Error> {
  let (ready_tx, ready_rx) = oneshot::channel();
  let (sender, receiver) = mpsc::channel(REQUEST_CHANNEL_CAPACITY);
  let thread_name = format!("isolate:{}", spec.code.name);
  std::thread::Builder::new()
    .name(thread_name)
    .spawn(move || run_isolate_thread(spec, receiver, ready_tx))
    .map_err(|err| Error::IsolateThread(err.to_string()))?;
  ready_rx
    .await
    .map_err(|_| Error::IsolateCreate("the isolate thread exited during startup".into()))??;
  let epoch = Instant::now();
  Ok(Arc::new(IsolateHandle {
    sender,
    in_flight: Arc::default(),
    last_active_ms: AtomicU64::new(0),
    epoch,
  }))
}

fn run_isolate_thread(
  spec: FunctionSpec,
  receiver: mpsc::Receiver<DispatchRequest>,
  ready: oneshot::Sender<Result<(), Error>>,
) {
  let tokio = match tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
  {
    Ok(rt) => rt,
    Err(err) => {
      let _ = ready.send(Err(Error::IsolateCreate(err.to_string())));
      return;
    }
  };
  tokio.block_on(async move {
    let mut isolate = match BlankIsolate::new(Some(receiver)) {
      Ok(isolate) => isolate,
      Err(err) => {
        let _ = ready.send(Err(err));
        return;
      }
    };
    let serving = match isolate.start_function(&spec).await {
      Ok(serving) => serving,
      Err(err) => {
        let _ = ready.send(Err(err));
        return;
      }
    };
    let _ = ready.send(Ok(()));
    if let Err(err) = drive_event_loop(&mut isolate.runtime, serving).await {
      tracing::error!(function = %spec.code.name, error = %err, "isolate event loop failed");
    }
  });
}

/// An isolate created from the snapshot, with Deno's internals hidden, that has not been
/// given a function yet. Once given one it runs that function only.
pub struct BlankIsolate {
  pub runtime: JsRuntime,
  loader: Rc<FunctionModuleLoader>,
  /// `serve(namespace, env)` from the bootstrap JS.
  serve: v8::Global<v8::Function>,
}

impl BlankIsolate {
  /// Creates a blank isolate from the snapshot. `receiver` is its request channel (none for
  /// load checks).
  pub fn new(receiver: Option<mpsc::Receiver<DispatchRequest>>) -> Result<BlankIsolate, Error> {
    let loader = Rc::new(FunctionModuleLoader::default());
    let mut runtime = JsRuntime::try_new(RuntimeOptions {
      extensions: outpost_js::extensions(outpost_js::IsolateOptions {
        dispatch_queue: receiver.map(DispatchQueue::new),
        fetch: deno_fetch::Options {
          user_agent: concat!("Outpost/", env!("CARGO_PKG_VERSION")).into(),
          ..Default::default()
        },
      }),
      startup_snapshot: Some(snapshot::SNAPSHOT),
      residual_lazy_js_sources: snapshot::RESIDUAL_LAZY_JS,
      residual_lazy_esm_sources: snapshot::RESIDUAL_LAZY_ESM,
      module_loader: Some(loader.clone()),
      ..Default::default()
    })
    .map_err(|err| Error::IsolateCreate(err.to_string()))?;
    runtime.op_state().borrow_mut().put(outbound_permissions()?);
    // Read both entry points first: bootstrap() deletes globalThis.__outpost.
    let bootstrap = entry_point(&mut runtime, "bootstrap")?;
    let serve = entry_point(&mut runtime, "serve")?;
    // bootstrap() is synchronous; its call future is ready at once.
    futures::executor::block_on(runtime.call(&bootstrap))
      .map_err(|err| Error::IsolateCreate(format!("bootstrap failed: {err}")))?;
    Ok(BlankIsolate {
      runtime,
      loader,
      serve,
    })
  }

  /// Loads and evaluates the function's module and starts the JS serve loop. Returns the
  /// serve loop's promise future, which settles when the isolate is done.
  pub async fn start_function(&mut self, spec: &FunctionSpec) -> Result<ServeFuture, Error> {
    self
      .loader
      .assign(spec.code.clone())
      .map_err(|_| Error::IsolateCreate("this isolate already runs a function".into()))?;
    let runtime = &mut self.runtime;
    runtime
      .op_state()
      .borrow_mut()
      .put(outpost_js::FunctionName(spec.code.name.clone()));
    let module = runtime
      .load_main_es_module(spec.code.entry())
      .await
      .map_err(|err| Error::FunctionLoad(err.to_string()))?;
    let evaluation = runtime.mod_evaluate(module);
    runtime
      .with_event_loop_future(Box::pin(evaluation), PollEventLoopOptions::default())
      .await
      .map_err(|err| Error::FunctionLoad(err.to_string()))?;
    let namespace = runtime
      .get_module_namespace(module)
      .map_err(|err| Error::FunctionLoad(err.to_string()))?;
    let (namespace, env) = {
      deno_core::scope!(scope, runtime);
      let namespace: v8::Local<v8::Value> = v8::Local::new(scope, namespace).into();
      let env = deno_core::serde_v8::to_v8(scope, spec.env.as_ref())
        .map_err(|err| Error::IsolateCreate(format!("env: {err}")))?;
      (
        v8::Global::new(scope, namespace),
        v8::Global::new(scope, env),
      )
    };
    let mut serving = Box::pin(runtime.call_with_args(&self.serve, &[namespace, env]));
    // serve() throws synchronously when the module has no handler.
    if let std::task::Poll::Ready(Err(err)) = futures::poll!(&mut serving) {
      return Err(Error::FunctionLoad(err.to_string()));
    }
    Ok(serving)
  }
}

/// Handlers may reach the network through `fetch` and nothing else: no files, environment,
/// subprocesses, FFI or system information.
fn outbound_permissions() -> Result<PermissionsContainer, Error> {
  let parser = Arc::new(RuntimePermissionDescriptorParser::new(
    sys_traits::impls::RealSys,
  ));
  let permissions = Permissions::from_options(
    parser.as_ref(),
    &PermissionsOptions {
      allow_net: Some(Vec::new()),
      prompt: false,
      ..Default::default()
    },
  )
  .map_err(|err| Error::IsolateCreate(format!("permissions: {err}")))?;
  Ok(PermissionsContainer::new(parser, permissions))
}

pub type ServeFuture = std::pin::Pin<
  Box<dyn Future<Output = Result<v8::Global<v8::Value>, Box<deno_core::error::JsError>>>>,
>;

/// Drives the isolate until its serve loop has finished. Every entry into JS on this thread
/// happens inside `poll_event_loop`; this is the seam where CPU metering wraps each poll.
async fn drive_event_loop(runtime: &mut JsRuntime, mut serving: ServeFuture) -> Result<(), String> {
  let options = PollEventLoopOptions::default();
  poll_fn(|cx| {
    let polled = runtime.poll_event_loop(cx, options);
    if let std::task::Poll::Ready(result) = serving.as_mut().poll(cx) {
      return std::task::Poll::Ready(result.map(drop).map_err(|e| e.to_string()));
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
    let mut isolate = BlankIsolate::new(None)?;
    isolate.start_function(spec).await.map(drop)
  })
}
