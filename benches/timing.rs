//! Benchmark plumbing shared by the bench targets: every benchmark is a closure that does
//! one timed run and returns its duration (so set-up and tear-down stay outside the timing),
//! reported both as p50/p99 over a fixed sample and through criterion.

use std::time::{Duration, Instant};

use criterion::Criterion;

/// Prints p50 and p99 over `tail_samples` runs of `run` (criterion reports medians and
/// means, not tails), then hands `run` to criterion.
pub fn bench(
  c: &mut Criterion,
  name: &str,
  tail_samples: usize,
  mut run: impl FnMut() -> Duration,
) {
  let mut samples: Vec<Duration> = (0..tail_samples).map(|_| run()).collect();
  samples.sort();
  let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
  eprintln!(
    "{name}: n={tail_samples} p50={:.3} ms p99={:.3} ms",
    at(0.50).as_secs_f64() * 1e3,
    at(0.99).as_secs_f64() * 1e3
  );
  c.bench_function(name, |b| {
    b.iter_custom(|iterations| (0..iterations).map(|_| run()).sum())
  });
}

/// Times one call of `f`.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
  let started = Instant::now();
  let value = f();
  (value, started.elapsed())
}
