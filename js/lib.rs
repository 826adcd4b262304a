//! `outpost-js`: the bootstrap JS that wires the WinterTC globals and calls handlers, and the
//! one list of deno_core extensions that both the startup snapshot (`runtime/build.rs`) and
//! every isolate use. Keeping the list here is what keeps the two in step: a snapshot built
//! from one list and an isolate created from another fail with `ExtensionSnapshotMismatch`.

use std::rc::Rc;
use std::sync::Arc;

use deno_core::{Extension, OpState, op2};
use outpost_ext_dispatch::RequestQueue;

/// Everything an isolate's extensions are initialised with. `Default` is what the snapshot
/// is built with: no request queue.
#[derive(Default)]
pub struct IsolateOptions {
  /// Requests for this isolate; `None` while building the snapshot.
  pub dispatch_queue: Option<Rc<RequestQueue>>,
  /// Options for outbound `fetch` (user agent, DNS resolver, TLS roots).
  pub fetch: deno_fetch::Options,
  /// The node's shared cache, behind the Cache API; `None` while building the snapshot.
  pub cache: Option<Arc<dyn outpost_ext_cache::EdgeCache>>,
}

/// The extensions of every Outpost isolate, in load order.
pub fn extensions(options: IsolateOptions) -> Vec<Extension> {
  vec![
    deno_webidl::deno_webidl::init(),
    // Each isolate gets its own blob store and broadcast channel: sharing either would let
    // tenants see each other's blob URLs or messages.
    deno_web::deno_web::init(
      Arc::new(deno_web::BlobStore::default()),
      None,
      false,
      deno_web::InMemoryBroadcastChannel::default(),
    ),
    deno_fetch::deno_fetch::init(options.fetch),
    deno_crypto::deno_crypto::init(None),
    outpost_ext_dispatch::outpost_dispatch::init(options.dispatch_queue),
    outpost_ext_cache::outpost_cache::init(options.cache),
    outpost_bootstrap::init(),
  ]
}

/// Name of the function an isolate runs, put into `OpState` when the isolate takes on a
/// function; tags its console output.
pub struct FunctionName(pub String);

deno_core::extension!(
  outpost_bootstrap,
  deps = [
    deno_webidl,
    deno_web,
    deno_fetch,
    deno_crypto,
    outpost_dispatch,
    outpost_cache
  ],
  ops = [op_bootstrap_console],
  esm_entry_point = "ext:outpost_bootstrap/99_bootstrap.js",
  esm = ["99_bootstrap.js"],
  lazy_loaded_js = [
    // 23_request.js loads 22_http_client.js, which loads deno_net's TLS helpers for
    // Deno.createHttpClient. Handlers have no Deno namespace, so this stub only satisfies
    // the load; calling it throws.
    "ext:deno_net/02_tls.js" = "stubs/02_tls.js",
  ],
);

/// Writes one line of a handler's console output to the server log, tagged with the
/// function's name and the request id (empty outside a request), with the function's secret
/// values redacted. Levels follow deno's
/// Console: 0 debug, 1 log/info, 2 warn, 3 error.
#[op2(fast)]
fn op_bootstrap_console(
  state: &mut OpState,
  #[smi] level: u32,
  #[string] request_id: &str,
  #[string] message: &str,
) {
  let function = state
    .try_borrow::<FunctionName>()
    .map_or("<blank>", |f| f.0.as_str());
  let request_id = (!request_id.is_empty()).then_some(request_id);
  let message = outpost_ext_dispatch::redact(state, message);
  let message = message.strip_suffix('\n').unwrap_or(&message);
  match level {
    0 => tracing::debug!(target: "outpost::console", function, request_id, "{message}"),
    1 => tracing::info!(target: "outpost::console", function, request_id, "{message}"),
    2 => tracing::warn!(target: "outpost::console", function, request_id, "{message}"),
    _ => tracing::error!(target: "outpost::console", function, request_id, "{message}"),
  }
}
