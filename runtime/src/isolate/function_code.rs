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
  SourceCodeCacheInfo,
};
use deno_error::{JsErrorBox, JsErrorClass as _};
use sha2::{Digest, Sha256};

use super::code_cache::{CodeCaches, source_hash};

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
  /// V8's code caches of the modules, for the isolates after the first.
  pub caches: CodeCaches,
}

struct LoadedModule {
  module_type: ModuleType,
  code: Arc<str>,
  source_map: Option<Arc<[u8]>>,
  /// What its code cache is kept under (JavaScript modules).
  source_hash: u64,
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
      caches: CodeCaches::default(),
    })
  }

  /// Keeps the modules' code caches in `file` as well as in memory (deployed versions),
  /// starting from what it holds.
  pub fn with_code_cache_file(mut self, file: PathBuf) -> Self {
    self.caches = CodeCaches::in_file(file, &self.name);
    self
  }

  pub fn entry(&self) -> &ModuleSpecifier {
    &self.entry
  }

  /// The code cache to compile `module` with, and the hash its new cache would be kept
  /// under; `None` for modules V8 keeps no cache of (JSON).
  fn code_cache_of(
    &self,
    specifier: &ModuleSpecifier,
    module: &LoadedModule,
  ) -> Option<SourceCodeCacheInfo> {
    (module.module_type == ModuleType::JavaScript).then(|| SourceCodeCacheInfo {
      hash: module.source_hash,
      data: self
        .caches
        .offer(specifier, module.source_hash)
        .map(|bytes| Cow::Owned(bytes.to_vec())),
    })
  }

  /// Whether `hash` is that of the text this code serves for `specifier`.
  fn serves(&self, specifier: &ModuleSpecifier, hash: u64) -> bool {
    self
      .modules
      .lock()
      .expect("module map lock")
      .get(specifier)
      .is_some_and(|module| module.source_hash == hash)
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
        source_hash: 0,
      },
      (_, MediaType::Json) => {
        return Err(JsErrorBox::type_error(format!(
          "{specifier} is JSON: import it with `with {{ type: \"json\" }}`"
        )));
      }
      (_, MediaType::JavaScript | MediaType::Mjs) => LoadedModule {
        module_type: ModuleType::JavaScript,
        source_hash: source_hash(&text),
        code: text.into(),
        source_map: None,
      },
      (_, MediaType::TypeScript | MediaType::Mts | MediaType::Tsx | MediaType::Jsx) => {
        let transpiled = self.transpiler.transpile(specifier, media_type, &text)?;
        LoadedModule {
          module_type: ModuleType::JavaScript,
          code: transpiled.code.clone(),
          source_map: transpiled.source_map.clone(),
          source_hash: source_hash(&transpiled.code),
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
  /// Modules given a code cache: V8 hands a new cache back only for those whose cache it
  /// refused.
  offered: std::cell::RefCell<std::collections::HashSet<ModuleSpecifier>>,
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
    let loaded = self.code().and_then(|code| {
      let module = code.load(specifier, &options.requested_module_type)?;
      let cache = code.code_cache_of(specifier, &module);
      if cache.as_ref().is_some_and(|cache| cache.data.is_some()) {
        self.offered.borrow_mut().insert(specifier.clone());
      }
      Ok(ModuleSource::new(
        module.module_type.clone(),
        ModuleSourceCode::String(module.code.to_string().into()),
        specifier,
        cache,
      ))
    });
    let loaded = loaded.map_err(|err| match referrer {
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
    });
    ModuleLoadResponse::Sync(loaded)
  }

  fn code_cache_ready(
    &self,
    specifier: ModuleSpecifier,
    hash: u64,
    code_cache: &[u8],
  ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
    if let Some(code) = self.code.get() {
      if self.offered.borrow_mut().remove(&specifier) {
        code.caches.refused(&code.name, &specifier);
      }
      if code.serves(&specifier, hash) {
        code.caches.store(specifier, hash, code_cache);
      }
    }
    Box::pin(std::future::ready(()))
  }

  /// A module's own `//# sourceMappingURL=file.map` (bundles that ship their maps), read
  /// from the function's directory when a stack is mapped; never from outside it.
  fn load_external_source_map(&self, source_map_url: &str) -> Option<Cow<'_, [u8]>> {
    let code = self.code.get()?;
    let specifier = ModuleSpecifier::parse(source_map_url).ok()?;
    let path = code.path_inside_root(&specifier).ok()?;
    std::fs::read(path).ok().map(Cow::Owned)
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

  /// Loads and evaluates `code`'s entry module in a fresh runtime, the way an isolate of
  /// the function does, and runs its event loop (where V8's new code caches are handed out).
  fn load_in_new_runtime(code: &Arc<FunctionCode>) {
    let loader = std::rc::Rc::new(FunctionModuleLoader::default());
    assert!(loader.assign(code.clone()).is_ok());
    let mut guest = crate::isolate::guest::Guest::new(deno_core::RuntimeOptions {
      module_loader: Some(loader),
      ..Default::default()
    })
    .unwrap();
    let tokio = tokio::runtime::Builder::new_current_thread()
      .enable_all()
      .build()
      .unwrap();
    guest.with(|runtime| {
      tokio.block_on(async {
        let module = runtime.load_main_es_module(code.entry()).await.unwrap();
        let evaluated = runtime.mod_evaluate(module);
        runtime
          .run_event_loop(deno_core::PollEventLoopOptions::default())
          .await
          .unwrap();
        evaluated.await.unwrap();
      });
    });
  }

  #[test]
  fn later_isolates_compile_from_the_first_ones_code_cache_and_a_refused_one_is_replaced() {
    use crate::isolate::code_cache::CodeCacheCounts;
    crate::init_v8();
    let dir = tempfile::tempdir().unwrap();
    let main =
      "export function area(r) { return Math.PI * r * r; }\nglobalThis.answer = area(2);\n";
    let other = "export const other = [1, 2, 3].map((n) => n * 2);\n";
    std::fs::write(dir.path().join("main.js"), main).unwrap();
    std::fs::write(dir.path().join("other.js"), other).unwrap();
    let counts = |used, rejected, stored| CodeCacheCounts {
      used,
      rejected,
      stored,
    };

    let code =
      Arc::new(FunctionCode::new("f", &dir.path().join("main.js"), Arc::default()).unwrap());
    load_in_new_runtime(&code);
    assert_eq!(
      code.caches.counts(),
      counts(0, 0, 1),
      "the first isolate compiles and keeps a cache"
    );
    load_in_new_runtime(&code);
    assert_eq!(
      code.caches.counts(),
      counts(1, 0, 1),
      "the second compiles from it"
    );

    // A cache of other source under this module's name and hash: V8 refuses it (its source
    // check), the module compiles from source, and the new cache replaces the bad one.
    let other_code =
      Arc::new(FunctionCode::new("g", &dir.path().join("other.js"), Arc::default()).unwrap());
    load_in_new_runtime(&other_code);
    let other_cache = other_code
      .caches
      .offer(other_code.entry(), source_hash(other))
      .unwrap();
    code
      .caches
      .store(code.entry().clone(), source_hash(main), &other_cache);
    load_in_new_runtime(&code);
    assert_eq!(code.caches.counts(), counts(1, 1, 3));
    load_in_new_runtime(&code);
    assert_eq!(
      code.caches.counts(),
      counts(2, 1, 3),
      "the replacement is used"
    );
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
