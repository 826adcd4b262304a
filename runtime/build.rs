//! Builds Outpost's startup snapshot: every isolate is created from it.
//!
//! The snapshot holds the extension JS of `outpost_js::extensions` with the Web API scripts
//! already evaluated and the global scope installed. Lazy extension scripts the snapshot did
//! not evaluate are embedded as "residual" sources (sorted by specifier, as deno_core looks
//! them up by binary search) so that a later `loadExtScript` still finds them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use deno_core::snapshot::{CreateSnapshotOptions, create_snapshot};
use deno_core::{Extension, ExtensionFileSource, ExtensionFileSourceCode};

fn main() {
  let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
  let extensions = outpost_js::extensions(outpost_js::IsolateOptions::default());
  let lazy_js = file_paths(&extensions, |ext| &ext.lazy_loaded_js_files);
  let lazy_esm = file_paths(&extensions, |ext| &ext.lazy_loaded_esm_files);

  let output = create_snapshot(
    CreateSnapshotOptions {
      cargo_manifest_dir: env!("CARGO_MANIFEST_DIR"),
      startup_snapshot: None,
      skip_op_registration: false,
      extensions,
      extension_transpiler: None,
      with_runtime_cb: None,
    },
    None,
  )
  .unwrap_or_else(|err| panic!("creating the startup snapshot failed: {err}"));

  std::fs::write(out_dir.join("OUTPOST_SNAPSHOT.bin"), &output.output)
    .expect("writing the snapshot into OUT_DIR");
  for path in &output.files_loaded_during_snapshot {
    println!("cargo:rerun-if-changed={}", path.display());
  }
  for (_, path) in lazy_js.iter().chain(&lazy_esm) {
    println!("cargo:rerun-if-changed={}", path.display());
  }

  let consumed = &output.consumed_lazy_specifiers;
  write_residual_table(&out_dir.join("residual_lazy_js.rs"), &lazy_js, consumed);
  write_residual_table(&out_dir.join("residual_lazy_esm.rs"), &lazy_esm, consumed);
}

/// The specifier and on-disk path of each file an extension list declares in one category.
fn file_paths(
  extensions: &[Extension],
  files: impl Fn(&Extension) -> &[ExtensionFileSource],
) -> Vec<(String, PathBuf)> {
  let mut paths: Vec<(String, PathBuf)> = extensions
    .iter()
    .flat_map(|ext| files(ext).iter())
    .map(|file| match &file.code {
      ExtensionFileSourceCode::LoadedFromFsDuringSnapshot(path) => {
        (file.specifier.to_string(), PathBuf::from(path))
      }
      other => panic!(
        "{}: expected a file loaded at snapshot time, got {other:?}",
        file.specifier
      ),
    })
    .collect();
  paths.sort();
  paths
}

/// Writes `&[(specifier, include_str!(path)), ...]` for the files the snapshot did not consume.
fn write_residual_table(target: &Path, files: &[(String, PathBuf)], consumed: &[String]) {
  let mut table = String::from("&[\n");
  for (specifier, path) in files {
    if consumed.iter().any(|c| c == specifier) {
      continue;
    }
    writeln!(
      table,
      "  ({specifier:?}, include_str!({:?})),",
      path.display().to_string()
    )
    .expect("writing to a String");
  }
  table.push(']');
  std::fs::write(target, table).expect("writing a residual source table into OUT_DIR");
}
