//! A function's code: its module files, read from the function's directory and transpiled
//! once (TypeScript, TSX, JSX) with deno_ast, then shared by all of the function's isolates.
//!
//! The first isolate to import a module reads and transpiles it; later isolates (pool
//! growth) reuse that exact text, so one function never runs two versions of a file.
//! Transpiled output is also cached process-wide by content hash.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use deno_ast::{MediaType, ParseParams, SourceMapOption};
use deno_core::error::ModuleLoaderError;
use deno_core::{
  ModuleLoadOptions, ModuleLoadReferrer, ModuleLoadResponse, ModuleLoader, ModuleSource,
  ModuleSourceCode, ModuleSpecifier, ModuleType, RequestedModuleType, ResolutionKind,
};
use deno_error::{JsErrorBox, JsErrorClass as _};
use sha2::{Digest, Sha256};

/// Transpiled modules by the hash of their media type and source text, shared by all
/// functions of the process.
#[derive(Default)]
pub struct TranspileCache {
  entries: Mutex<HashMap<[u8; 32], Arc<Transpiled>>>,
}

/// JavaScript produced from one source file.
pub struct Transpiled {
  pub code: Arc<str>,
  pub source_map: Option<Arc<[u8]>>,
}

impl TranspileCache {
  /// Transpiles `text`, or returns the cached result for identical input.
  pub fn transpile(
    &self,
    specifier: &ModuleSpecifier,
    media_type: MediaType,
    text: &str,
  ) -> Result<Arc<Transpiled>, JsErrorBox> {
    let mut hasher = Sha256::new();
    hasher.update(media_type.as_ts_extension().as_bytes());
    hasher.update([0]);
    hasher.update(text.as_bytes());
    let key: [u8; 32] = hasher.finalize().into();
    if let Some(hit) = self.entries.lock().expect("transpile cache lock").get(&key) {
      return Ok(hit.clone());
    }
    let parsed = deno_ast::parse_module(ParseParams {
      specifier: specifier.clone(),
      text: text.into(),
      media_type,
      capture_tokens: false,
      scope_analysis: false,
      maybe_syntax: None,
    })
    .map_err(|diagnostic| JsErrorBox::new("SyntaxError", diagnostic.to_string()))?;
    let emitted = parsed
      .transpile(
        &deno_ast::TranspileOptions {
          imports_not_used_as_values: deno_ast::ImportsNotUsedAsValues::Remove,
          decorators: deno_ast::DecoratorsTranspileOption::Ecma,
          ..Default::default()
        },
        &deno_ast::TranspileModuleOptions { module_kind: None },
        &deno_ast::EmitOptions {
          source_map: SourceMapOption::Separate,
          inline_sources: true,
          ..Default::default()
        },
      )
      .map_err(|err| JsErrorBox::new("SyntaxError", err.to_string()))?
      .into_source();
    let transpiled = Arc::new(Transpiled {
      code: emitted.text.into(),
      source_map: emitted.source_map.map(|m| m.into_bytes().into()),
    });
    self
      .entries
      .lock()
      .expect("transpile cache lock")
      .insert(key, transpiled.clone());
    Ok(transpiled)
  }
}

/// The modules of one function, rooted at its entry file's directory.
pub struct FunctionCode {
  pub name: String,
  root: PathBuf,
  entry: ModuleSpecifier,
  modules: Mutex<HashMap<ModuleSpecifier, Arc<LoadedModule>>>,
  transpiler: Arc<TranspileCache>,
}

struct LoadedModule {
  module_type: ModuleType,
  code: Arc<str>,
  source_map: Option<Arc<[u8]>>,
}

impl FunctionCode {
  /// `entry` is the function's main module; imports may reach files in its directory and
  /// below, nothing else.
  pub fn new(name: &str, entry: &Path, transpiler: Arc<TranspileCache>) -> std::io::Result<Self> {
    let entry = std::fs::canonicalize(entry)?;
    let root = entry
      .parent()
      .map(Path::to_path_buf)
      .unwrap_or_else(|| PathBuf::from("/"));
    let entry = ModuleSpecifier::from_file_path(&entry).map_err(|()| {
      std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        "entry is not an absolute path",
      )
    })?;
    Ok(Self {
      name: name.into(),
      root,
      entry,
      modules: Mutex::default(),
      transpiler,
    })
  }

  pub fn entry(&self) -> &ModuleSpecifier {
    &self.entry
  }

  fn load(
    &self,
    specifier: &ModuleSpecifier,
    requested: &RequestedModuleType,
  ) -> Result<Arc<LoadedModule>, JsErrorBox> {
    if let Some(module) = self.modules.lock().expect("module map lock").get(specifier) {
      return Ok(module.clone());
    }
    let path = self.path_inside_root(specifier)?;
    let text = std::fs::read_to_string(&path).map_err(|err| {
      JsErrorBox::generic(format!("cannot read module {}: {err}", path.display()))
    })?;
    let media_type = MediaType::from_path(&path);
    let module = match (requested, media_type) {
      (RequestedModuleType::Json, _) => LoadedModule {
        module_type: ModuleType::Json,
        code: text.into(),
        source_map: None,
      },
      (_, MediaType::Json) => {
        return Err(JsErrorBox::type_error(format!(
          "{specifier} is JSON: import it with `with {{ type: \"json\" }}`"
        )));
      }
      (_, MediaType::JavaScript | MediaType::Mjs) => LoadedModule {
        module_type: ModuleType::JavaScript,
        code: text.into(),
        source_map: None,
      },
      (_, MediaType::TypeScript | MediaType::Mts | MediaType::Tsx | MediaType::Jsx) => {
        let transpiled = self.transpiler.transpile(specifier, media_type, &text)?;
        LoadedModule {
          module_type: ModuleType::JavaScript,
          code: transpiled.code.clone(),
          source_map: transpiled.source_map.clone(),
        }
      }
      (_, other) => {
        return Err(JsErrorBox::type_error(format!(
          "{specifier}: cannot import a {other} file; modules are .js, .mjs, .ts, .mts, .jsx, .tsx or .json"
        )));
      }
    };
    let module = Arc::new(module);
    // Another isolate may have raced us here; keep the first text so all isolates agree.
    Ok(
      self
        .modules
        .lock()
        .expect("module map lock")
        .entry(specifier.clone())
        .or_insert(module)
        .clone(),
    )
  }

  fn path_inside_root(&self, specifier: &ModuleSpecifier) -> Result<PathBuf, JsErrorBox> {
    let outside = || {
      JsErrorBox::type_error(format!(
        "cannot import {specifier}: function {:?} may only import files under {}",
        self.name,
        self.root.display()
      ))
    };
    if specifier.scheme() != "file" {
      return Err(outside());
    }
    // Decide on the path as written before touching the filesystem, so that a handler
    // cannot probe which files exist outside its directory; then again after resolving
    // symlinks, so that a link cannot lead outside.
    let path = specifier.to_file_path().map_err(|()| outside())?;
    if !deno_core::normalize_path(std::borrow::Cow::Borrowed(path.as_path()))
      .starts_with(&self.root)
    {
      return Err(outside());
    }
    let path = std::fs::canonicalize(&path).map_err(|err| {
      JsErrorBox::generic(format!(
        "cannot import {specifier}: {err}{}",
        extension_hint(&path)
      ))
    })?;
    if path.starts_with(&self.root) {
      Ok(path)
    } else {
      Err(outside())
    }
  }
}

/// For an import without a file extension that names no file, the file it probably meant:
/// `; did you mean "./lib.ts"? Imports name the file with its extension`.
fn extension_hint(path: &Path) -> String {
  if path.extension().is_some() {
    return String::new();
  }
  let Some(stem) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
    return String::new();
  };
  let candidates = [".ts", ".js", ".tsx", ".jsx", ".mts", ".mjs"]
    .iter()
    .map(|extension| format!("{stem}{extension}"))
    .chain(
      ["index.ts", "index.js"]
        .iter()
        .map(|index| format!("{stem}/{index}")),
    );
  for candidate in candidates {
    if path.with_file_name(&candidate).is_file() {
      return format!("; did you mean \"./{candidate}\"? Imports name the file with its extension");
    }
  }
  "; imports name the file with its extension (\"./lib.ts\")".into()
}

/// The `ModuleLoader` of an isolate. A blank isolate has no code yet; it serves modules of
/// the one function it is given, and nothing else, for the rest of its life.
#[derive(Default)]
pub struct FunctionModuleLoader {
  code: std::cell::OnceCell<Arc<FunctionCode>>,
}

impl FunctionModuleLoader {
  /// Binds the loader to its function. Fails if it already has one: an isolate never runs
  /// a second function's code.
  pub fn assign(&self, code: Arc<FunctionCode>) -> Result<(), Arc<FunctionCode>> {
    self.code.set(code)
  }

  fn code(&self) -> Result<&Arc<FunctionCode>, JsErrorBox> {
    self
      .code
      .get()
      .ok_or_else(|| JsErrorBox::generic("this isolate has not been given a function"))
  }
}

impl ModuleLoader for FunctionModuleLoader {
  fn resolve(
    &self,
    specifier: &str,
    referrer: &str,
    _kind: ResolutionKind,
  ) -> Result<ModuleSpecifier, ModuleLoaderError> {
    let resolved = deno_core::resolve_import(specifier, referrer).map_err(|err| {
      JsErrorBox::type_error(format!(
        "cannot resolve {specifier:?} from {referrer}: {err}. Outpost functions import files by relative path (\"./lib.ts\"); bundle packages into the function directory"
      ))
    })?;
    if resolved.scheme() != "file" {
      return Err(JsErrorBox::type_error(format!(
        "cannot import {resolved} from {referrer}: only files of the function itself can be imported"
      )));
    }
    Ok(resolved)
  }

  fn load(
    &self,
    specifier: &ModuleSpecifier,
    referrer: Option<&ModuleLoadReferrer>,
    options: ModuleLoadOptions,
  ) -> ModuleLoadResponse {
    let loaded = self
      .code()
      .and_then(|code| code.load(specifier, &options.requested_module_type))
      .map_err(|err| match referrer {
        // Which import asked for it, at file:line:col.
        Some(referrer) => JsErrorBox::new(
          err.get_class(),
          format!(
            "{} (imported at {}:{}:{})",
            err.get_message(),
            referrer.specifier,
            referrer.line_number,
            referrer.column_number
          ),
        ),
        None => err,
      })
      .map(|module| {
        ModuleSource::new(
          module.module_type.clone(),
          ModuleSourceCode::String(module.code.to_string().into()),
          specifier,
          None,
        )
      });
    ModuleLoadResponse::Sync(loaded)
  }

  fn get_source_map(&self, specifier: &str) -> Option<Cow<'_, [u8]>> {
    let specifier = ModuleSpecifier::parse(specifier).ok()?;
    let modules = self.code.get()?.modules.lock().expect("module map lock");
    let map = modules.get(&specifier)?.source_map.clone()?;
    Some(Cow::Owned(map.to_vec()))
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn transpiled_output_is_cached_by_content() {
    let cache = TranspileCache::default();
    let specifier = ModuleSpecifier::parse("file:///f/a.ts").unwrap();
    let other = ModuleSpecifier::parse("file:///g/b.ts").unwrap();
    let first = cache
      .transpile(
        &specifier,
        MediaType::TypeScript,
        "export const x: number = 1;",
      )
      .unwrap();
    assert!(first.code.contains("export const x = 1"), "{}", first.code);
    let same_text = cache
      .transpile(&other, MediaType::TypeScript, "export const x: number = 1;")
      .unwrap();
    assert!(
      Arc::ptr_eq(&first, &same_text),
      "identical content is transpiled once"
    );
    let changed = cache
      .transpile(
        &specifier,
        MediaType::TypeScript,
        "export const x: number = 2;",
      )
      .unwrap();
    assert!(!Arc::ptr_eq(&first, &changed));
  }

  #[test]
  fn syntax_errors_name_the_file_line_and_column() {
    let cache = TranspileCache::default();
    let specifier = ModuleSpecifier::parse("file:///f/bad.ts").unwrap();
    let err = cache
      .transpile(
        &specifier,
        MediaType::TypeScript,
        "const a = 1;\nconst b: = 2;\n",
      )
      .err()
      .unwrap();
    assert!(err.to_string().contains("file:///f/bad.ts:2:"), "{err}");
  }

  #[test]
  fn imports_stay_inside_the_function_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("fn")).unwrap();
    std::fs::write(dir.path().join("fn/main.js"), "").unwrap();
    std::fs::write(dir.path().join("fn/data.json"), "{}").unwrap();
    std::fs::write(dir.path().join("secret.js"), "").unwrap();
    let code = FunctionCode::new("f", &dir.path().join("fn/main.js"), Arc::default()).unwrap();
    let url = |p: &str| ModuleSpecifier::from_file_path(dir.path().join(p)).unwrap();

    let missing = code
      .load(&url("no-such-file.js"), &RequestedModuleType::None)
      .err()
      .unwrap();
    assert!(
      missing.to_string().contains("may only import files under"),
      "a missing file outside the directory looks like any other: {missing}"
    );
    let outside = code
      .load(&url("secret.js"), &RequestedModuleType::None)
      .err()
      .unwrap();
    assert!(
      outside.to_string().contains("may only import files under"),
      "{outside}"
    );
    let json = code
      .load(&url("fn/data.json"), &RequestedModuleType::None)
      .err()
      .unwrap();
    assert!(
      json.to_string().contains("with { type: \"json\" }"),
      "{json}"
    );
    let module = code
      .load(&url("fn/data.json"), &RequestedModuleType::Json)
      .unwrap();
    assert_eq!(module.module_type, ModuleType::Json);
  }
}
