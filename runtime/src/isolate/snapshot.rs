//! The startup snapshot built by `build.rs`, and the lazy extension sources it did not
//! evaluate.

/// V8 startup snapshot with the extension JS of `outpost_js::extensions` evaluated.
pub static SNAPSHOT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/OUTPOST_SNAPSHOT.bin"));

/// Lazy scripts not consumed while building the snapshot, sorted by specifier.
pub static RESIDUAL_LAZY_JS: &[(&str, &str)] =
  include!(concat!(env!("OUT_DIR"), "/residual_lazy_js.rs"));

/// Lazy ES modules not consumed while building the snapshot, sorted by specifier.
pub static RESIDUAL_LAZY_ESM: &[(&str, &str)] =
  include!(concat!(env!("OUT_DIR"), "/residual_lazy_esm.rs"));
