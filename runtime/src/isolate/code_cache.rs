//! V8 code caches of a function's modules, per version of its code: the first isolate to
//! compile a module hands V8's cache of it here, and every later isolate of the same code
//! compiles the module from that cache instead of from source. Kept in memory for the
//! functions of the config file, and also in a file for deployed versions, so that a node
//! restart or a new isolate after an idle eviction does not compile again.
//!
//! V8 checks a cache against its own version, its flags and the startup snapshot, and refuses
//! one that does not match (the module then compiles normally and a fresh cache replaces
//! it). It does not check the bytes themselves in release builds, so a file is only trusted
//! when its header names this V8 and this snapshot and each entry's SHA-256 matches.
//!
//! File layout (`functions/<name>/code-cache/<version>.bin` under `data_dir`):
//! `MAGIC`, then a header (V8 version, SHA-256 of the startup snapshot), then entries of
//! (specifier, source hash, cache bytes, SHA-256 of the bytes); lengths are little-endian
//! `u32`, the source hash a little-endian `u64`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use deno_core::ModuleSpecifier;
use sha2::{Digest, Sha256};

const MAGIC: &[u8] = b"outpost code cache 1\n";

/// One module's cache: for which source text (its hash) and V8's bytes.
#[derive(Clone)]
struct Entry {
  source_hash: u64,
  bytes: Arc<[u8]>,
}

/// How a function's code caches have been used, summed over its isolates.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CodeCacheCounts {
  /// Modules compiled from a cache V8 accepted.
  pub used: u64,
  /// Caches refused: by V8 (another V8, other flags or snapshot, bytes that do not fit the
  /// source), or a file that failed its checks. The module compiled from source.
  pub rejected: u64,
  /// Caches made by compiling a module from source and kept.
  pub stored: u64,
}

/// The code caches of one function's code (one version of it).
#[derive(Default)]
pub struct CodeCaches {
  entries: Mutex<HashMap<ModuleSpecifier, Entry>>,
  /// Where the caches of a deployed version are kept; `None` keeps them in memory only.
  file: Option<PathBuf>,
  /// Serialises writes of `file`.
  writing: Arc<Mutex<()>>,
  offered: AtomicU64,
  rejected: AtomicU64,
  stored: AtomicU64,
  /// Whether a rejection has been logged (once per version).
  told: AtomicBool,
}

impl CodeCaches {
  /// Caches kept in `file` too, starting from what it holds when it passes its checks. A
  /// file that does not is ignored (logged, counted as rejected) and later overwritten.
  pub fn in_file(file: PathBuf, function: &str) -> CodeCaches {
    let caches = CodeCaches {
      file: Some(file),
      ..CodeCaches::default()
    };
    let Some(path) = &caches.file else {
      return caches;
    };
    match std::fs::read(path) {
      Ok(contents) => match decode(&contents) {
        Ok(entries) => *caches.entries.lock().expect("code cache lock") = entries,
        Err(problem) => {
          caches.rejected.fetch_add(1, Ordering::Relaxed);
          caches.told.store(true, Ordering::Relaxed);
          tracing::warn!(
            function,
            path = %path.display(),
            problem,
            "code cache file ignored; the modules compile from source and a new file replaces it"
          );
        }
      },
      Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
      Err(err) => tracing::warn!(
        function,
        path = %path.display(),
        error = %err,
        "cannot read the code cache file; the modules compile from source"
      ),
    }
    caches
  }

  /// The cache for `specifier` when there is one for this exact source, counted as offered.
  pub fn offer(&self, specifier: &ModuleSpecifier, source_hash: u64) -> Option<Arc<[u8]>> {
    let entries = self.entries.lock().expect("code cache lock");
    let entry = entries
      .get(specifier)
      .filter(|entry| entry.source_hash == source_hash)?;
    self.offered.fetch_add(1, Ordering::Relaxed);
    Some(entry.bytes.clone())
  }

  /// V8 refused the cache offered for `specifier`; logged once per version.
  pub fn refused(&self, function: &str, specifier: &ModuleSpecifier) {
    self.rejected.fetch_add(1, Ordering::Relaxed);
    if !self.told.swap(true, Ordering::Relaxed) {
      tracing::warn!(
        function,
        module = %specifier,
        "V8 refused the code cache (made by another V8, with other flags or snapshot, or damaged); the module compiled from source and a new cache replaces it"
      );
    }
  }

  /// Keeps a cache V8 made of `specifier` (source `source_hash`), in place of any older
  /// one; for a deployed version, the file is rewritten in the background.
  pub fn store(&self, specifier: ModuleSpecifier, source_hash: u64, bytes: &[u8]) {
    let snapshot = {
      let mut entries = self.entries.lock().expect("code cache lock");
      entries.insert(
        specifier,
        Entry {
          source_hash,
          bytes: bytes.into(),
        },
      );
      self.file.as_ref().map(|_| entries.clone())
    };
    self.stored.fetch_add(1, Ordering::Relaxed);
    if let (Some(path), Some(entries)) = (self.file.clone(), snapshot) {
      let writing = self.writing.clone();
      // A cache is made once per module and version: a thread of its own keeps the file
      // write off the isolate's thread.
      let spawned = std::thread::Builder::new()
        .name("outpost-code-cache".into())
        .spawn(move || {
          let _serial = writing.lock().expect("code cache write lock");
          if let Err(err) = write(&path, &encode(&entries)) {
            tracing::warn!(path = %path.display(), error = %err, "cannot write the code cache file");
          }
        });
      if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start the code cache writer");
      }
    }
  }

  pub fn counts(&self) -> CodeCacheCounts {
    let rejected = self.rejected.load(Ordering::Relaxed);
    CodeCacheCounts {
      used: self
        .offered
        .load(Ordering::Relaxed)
        .saturating_sub(rejected),
      rejected,
      stored: self.stored.load(Ordering::Relaxed),
    }
  }
}

/// The hash a cache is kept under: of the exact text given to V8.
pub fn source_hash(code: &str) -> u64 {
  let digest = Sha256::digest(code.as_bytes());
  u64::from_le_bytes(digest[..8].try_into().unwrap_or_default())
}

/// What this build's caches are only valid for: its V8 and its startup snapshot.
fn header() -> &'static [u8] {
  static HEADER: OnceLock<Vec<u8>> = OnceLock::new();
  HEADER.get_or_init(|| {
    let mut header = Vec::new();
    put(&mut header, deno_core::v8::V8::get_version().as_bytes());
    header.extend_from_slice(&Sha256::digest(super::snapshot::SNAPSHOT));
    header
  })
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
  let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
  out.extend_from_slice(&length.to_le_bytes());
  out.extend_from_slice(bytes);
}

fn encode(entries: &HashMap<ModuleSpecifier, Entry>) -> Vec<u8> {
  let mut out = MAGIC.to_vec();
  out.extend_from_slice(header());
  for (specifier, entry) in entries {
    put(&mut out, specifier.as_str().as_bytes());
    out.extend_from_slice(&entry.source_hash.to_le_bytes());
    put(&mut out, &entry.bytes);
    out.extend_from_slice(&Sha256::digest(&entry.bytes));
  }
  out
}

/// Reads a cache file back, or says why it cannot be used.
fn decode(contents: &[u8]) -> Result<HashMap<ModuleSpecifier, Entry>, &'static str> {
  let mut rest = contents
    .strip_prefix(MAGIC)
    .ok_or("not an Outpost code cache file")?;
  rest = rest
    .strip_prefix(header())
    .ok_or("made by another V8 or another build of Outpost")?;
  let mut entries = HashMap::new();
  while !rest.is_empty() {
    let specifier = take_counted(&mut rest)?;
    let source_hash = u64::from_le_bytes(take(&mut rest, 8)?.try_into().map_err(|_| TRUNCATED)?);
    let bytes = take_counted(&mut rest)?;
    let digest = take(&mut rest, 32)?;
    if Sha256::digest(bytes).as_slice() != digest {
      return Err("damaged: an entry's checksum does not match");
    }
    let specifier = std::str::from_utf8(specifier)
      .ok()
      .and_then(|s| ModuleSpecifier::parse(s).ok())
      .ok_or("damaged: an entry names no module")?;
    entries.insert(
      specifier,
      Entry {
        source_hash,
        bytes: bytes.into(),
      },
    );
  }
  Ok(entries)
}

const TRUNCATED: &str = "damaged: truncated";

fn take<'a>(rest: &mut &'a [u8], length: usize) -> Result<&'a [u8], &'static str> {
  if rest.len() < length {
    return Err(TRUNCATED);
  }
  let (taken, left) = rest.split_at(length);
  *rest = left;
  Ok(taken)
}

fn take_counted<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], &'static str> {
  let length = u32::from_le_bytes(take(rest, 4)?.try_into().map_err(|_| TRUNCATED)?);
  take(rest, usize::try_from(length).map_err(|_| TRUNCATED)?)
}

/// Writes `contents` to `path` through a temporary file and a rename, so that a crash
/// leaves the old file or the new one, never half of one.
fn write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
  if let Some(dir) = path.parent() {
    std::fs::create_dir_all(dir)?;
  }
  let temporary = path.with_extension("tmp");
  std::fs::write(&temporary, contents)?;
  std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
  use super::*;

  fn entries() -> HashMap<ModuleSpecifier, Entry> {
    let mut entries = HashMap::new();
    entries.insert(
      ModuleSpecifier::parse("file:///f/main.js").unwrap(),
      Entry {
        source_hash: 7,
        bytes: vec![1, 2, 3, 4].into(),
      },
    );
    entries
  }

  #[test]
  fn a_file_reads_back_what_was_written_and_refuses_damage() {
    let encoded = encode(&entries());
    let decoded = decode(&encoded).unwrap();
    let entry = &decoded[&ModuleSpecifier::parse("file:///f/main.js").unwrap()];
    assert_eq!((entry.source_hash, &*entry.bytes), (7, &[1u8, 2, 3, 4][..]));

    let mut damaged = encoded.clone();
    let at = damaged.len() - 33;
    damaged[at] ^= 0xff;
    assert_eq!(
      decode(&damaged).err(),
      Some("damaged: an entry's checksum does not match")
    );
    assert_eq!(
      decode(&encoded[..encoded.len() - 1]).err(),
      Some("damaged: truncated")
    );
    let mut other_v8 = encoded.clone();
    other_v8[MAGIC.len() + 4] ^= 0xff;
    assert_eq!(
      decode(&other_v8).err(),
      Some("made by another V8 or another build of Outpost")
    );
    assert_eq!(
      decode(b"something else").err(),
      Some("not an Outpost code cache file")
    );
  }
}
