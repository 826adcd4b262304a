//! The function spec the isolate benches run: generous limits, so a bench measures the
//! runtime and never a limit.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outpost::isolate::FunctionSpec;
use outpost::isolate::function_code::{FunctionCode, TranspileCache};
use outpost::limits::{Limits, LimitsConfig};

/// Heap limit of the benchmarked isolates: Outpost's default.
pub const HEAP: usize = 128 * 1024 * 1024;

/// A spec running the module at `path`, with a transpile cache of its own (so a function at a
/// new path has never been seen).
pub fn bench_spec(path: &Path) -> FunctionSpec {
  let code = FunctionCode::new("bench", path, Arc::new(TranspileCache::default())).unwrap();
  FunctionSpec {
    code: Arc::new(code),
    env: Arc::default(),
    egress: Arc::default(),
    limits: Limits {
      cpu: Duration::from_secs(10),
      memory: HEAP,
      ..Limits::resolve(&LimitsConfig::default(), &LimitsConfig::default())
    },
    console_bytes: 64 * 1024,
    secrets: Arc::default(),
    services: Arc::default(),
  }
}
