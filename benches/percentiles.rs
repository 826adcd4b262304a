//! Tail latencies for the bench output: criterion reports medians and means, not p99.

use std::time::{Duration, Instant};

/// Runs `sample` `n` times and prints p50 and p99 of the durations it returns.
pub fn report(name: &str, n: usize, mut sample: impl FnMut() -> Duration) {
  let mut samples: Vec<Duration> = (0..n).map(|_| sample()).collect();
  samples.sort();
  let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
  eprintln!(
    "{name}: n={n} p50={:.3} ms p99={:.3} ms",
    at(0.50).as_secs_f64() * 1e3,
    at(0.99).as_secs_f64() * 1e3
  );
}

/// Times one call of `f`.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
  let started = Instant::now();
  let value = f();
  (value, started.elapsed())
}
