//! Serving a function on the bench's own thread, as a shard does: the isolate's event loop
//! is a local task (run the bench inside a `LocalSet`), requests go through its queue.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use outpost::isolate::{BlankIsolate, Entry, FunctionSpec, IsolateSettings, IsolateStatus};
use outpost::limits::cpu::{CpuWatchdog, ThreadMeter};
use outpost::shard::{IsolateWatch, drive};
use outpost_ext_dispatch::{
  Body, DispatchRequest, RequestEnd, RequestId, RequestQueue, RequestUsage,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::spec::HEAP;

/// What the bench isolates are created with: no cache, no service bindings.
pub fn settings() -> IsolateSettings {
  IsolateSettings {
    max_heap: HEAP,
    cache: None,
    services: Arc::new(outpost_ext_dispatch::NoServices),
    load_timeout: Duration::from_secs(10),
  }
}

/// The CPU meter of the bench's thread.
pub fn meter() -> Arc<ThreadMeter> {
  ThreadMeter::for_this_thread(&CpuWatchdog::start(false).unwrap(), false)
}

/// Nobody watches a bench isolate's entries.
pub struct Unwatched;

impl IsolateWatch for Unwatched {
  fn entered(&mut self, _: &IsolateStatus, _: Entry) {}
  fn ended(self, _: &IsolateStatus, _: Result<(), String>) {}
}

/// Gives `blank` the function and starts its event loop as a local task; returns its queue
/// and the task, which ends (and drops the isolate) once the queue is closed.
pub async fn serve(
  blank: BlankIsolate,
  spec: &FunctionSpec,
  meter: &Arc<ThreadMeter>,
) -> (Rc<RequestQueue>, JoinHandle<()>) {
  let isolate = blank
    .start_function(spec, meter, Duration::from_secs(10))
    .await
    .unwrap();
  let queue = isolate.queue().clone();
  let status = IsolateStatus::new(&isolate);
  (
    queue,
    tokio::task::spawn_local(drive(isolate, status, Unwatched)),
  )
}

/// Sends one request through `queue` and waits for the response.
pub async fn send(
  queue: &RequestQueue,
  method: http::Method,
  url: &str,
  headers: http::HeaderMap,
  body: Option<Body>,
) -> http::Response<Body> {
  let (reply, replied) = oneshot::channel();
  let request = DispatchRequest {
    method,
    url: url.into(),
    headers,
    body,
    end: RequestEnd::default(),
    reply,
    usage: Arc::new(RequestUsage::new(RequestId::new(0, 0))),
    cf: Vec::new(),
    trace: None,
  };
  assert!(queue.push(request).is_ok(), "the isolate has ended");
  replied.await.unwrap().unwrap()
}
