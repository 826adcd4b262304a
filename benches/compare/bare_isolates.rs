//! The memory floor for `benches/compare/run.sh`: bare deno_core runtimes (no extensions, a
//! minimal snapshot) on one thread, each entered only while it is used, with nothing of
//! Outpost around them. Prints the process RSS with one runtime and with N, and the RSS each
//! additional runtime adds.
//!
//!   bare_isolates N

use std::time::Duration;

use deno_core::{JsRuntime, JsRuntimeForSnapshot, RuntimeOptions};

fn rss_kib() -> u64 {
  let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
  status
    .lines()
    .find_map(|line| line.strip_prefix("VmRSS:"))
    .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
    .expect("VmRSS in /proc/self/status")
}

/// A runtime from the snapshot that has run a line of JS and is no longer entered.
fn runtime(snapshot: &'static [u8], index: usize) -> JsRuntime {
  let mut runtime = JsRuntime::new(RuntimeOptions {
    startup_snapshot: Some(snapshot),
    ..Default::default()
  });
  runtime
    .execute_script("<floor>", format!("globalThis.index = {index};"))
    .expect("a line of JS runs");
  // SAFETY: the isolate was entered by its creation and is not used again; the runtimes are
  // never dropped (the process exits), so the reverse-order drop rule never applies.
  unsafe { runtime.v8_isolate().exit() };
  runtime
}

/// RSS once it has stopped changing for a second.
fn settled_rss_kib() -> u64 {
  let mut last = 0;
  for _ in 0..30 {
    std::thread::sleep(Duration::from_millis(500));
    let now = rss_kib();
    if now == last {
      break;
    }
    last = now;
  }
  last
}

#[expect(
  clippy::print_stdout,
  reason = "the figures on stdout are the program's output"
)]
fn main() {
  let count: usize = match std::env::args().nth(1).map(|n| n.parse()) {
    Some(Ok(n)) if n > 1 => n,
    _ => {
      eprintln!("usage: bare_isolates N   (N > 1 runtimes)");
      std::process::exit(2);
    }
  };
  let snapshot: &'static [u8] =
    Box::leak(JsRuntimeForSnapshot::new(RuntimeOptions::default()).snapshot());
  let mut runtimes = vec![runtime(snapshot, 0)];
  let one = settled_rss_kib();
  runtimes.extend((1..count).map(|index| runtime(snapshot, index)));
  let all = settled_rss_kib();
  let per = (all - one) as f64 / (count - 1) as f64 / 1024.0;
  println!("runtimes={count} rss_one_kib={one} rss_all_kib={all} per_runtime_mib={per:.2}");
  // Exit without dropping the runtimes (see `runtime`).
  std::process::exit(0);
}
