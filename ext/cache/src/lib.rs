//! `outpost_cache`: the deno_core extension that gives handlers the Cache API —
//! `caches.default`, `await caches.open(name)`, and `match` / `put` / `delete` on them — on
//! the node's shared edge cache.
//!
//! The cache itself is a host service behind the [`EdgeCache`] trait, put into `OpState`
//! by the runtime (as `Arc<dyn EdgeCache>`), which owns storage, eviction and the HTTP
//! caching rules. Which tenant a call belongs to is never up to JS: the runtime puts the
//! isolate's [`CacheNamespace`] into `OpState` when the isolate takes on its function, and
//! every op keys its entries by it. `01_cache.js` turns `Request` and `Response` objects
//! into heads and bytes and back.

use std::sync::Arc;

use bytes::Bytes;
use deno_core::convert::{ByteString, Uint8Array};
use deno_core::{OpState, ToV8, op2};
use outpost_ext_dispatch::InvalidHeader;

/// The tenant a cache call belongs to (the function's name): entries of one namespace are
/// invisible to every other.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheNamespace(pub Arc<str>);

/// Which cache of a namespace: `caches.default`, or one opened by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CacheName {
  Default,
  Named(Arc<str>),
}

/// A response found in the cache: its head (with `Age` set) and its body.
#[derive(Debug)]
pub struct CachedResponse {
  pub head: http::response::Parts,
  pub body: Bytes,
}

/// What became of a `put`. Refusals are not errors: like Workers, `put` resolves and
/// nothing is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
  Stored,
  /// The HTTP caching rules forbid storing it (`no-store`, `private`, `Set-Cookie`, ...).
  NotStorable,
  /// Its body and headers are larger than the cache takes for one entry.
  TooLarge,
}

/// The node's shared cache, as isolates see it.
pub trait EdgeCache: Send + Sync {
  /// A fresh response stored for `request`, or `None`. A conditional request that the
  /// stored response satisfies gets a 304 head with an empty body.
  fn lookup(
    &self,
    namespace: &CacheNamespace,
    cache: &CacheName,
    request: &http::request::Parts,
  ) -> Option<CachedResponse>;

  /// Stores `response` for `request` when the caching rules allow it.
  fn store(
    &self,
    namespace: &CacheNamespace,
    cache: &CacheName,
    request: &http::request::Parts,
    response: http::response::Parts,
    body: Bytes,
  ) -> StoreOutcome;

  /// Removes what is stored for `request`; whether anything was.
  fn delete(
    &self,
    namespace: &CacheNamespace,
    cache: &CacheName,
    request: &http::request::Parts,
  ) -> bool;

  /// The most bytes one entry may take: `put` stops reading a body past it.
  fn max_entry_bytes(&self) -> usize;

  /// Counts a `put` refused because its body grew past [`EdgeCache::max_entry_bytes`]
  /// while it was read, and logs it.
  fn refused_oversized(&self, namespace: &CacheNamespace, url: &str);
}

/// Errors the cache ops raise into JS.
#[derive(Debug, thiserror::Error, deno_error::JsError)]
pub enum CacheError {
  #[class(type)]
  #[error("the Cache API is only available to a function's handler")]
  NoNamespace,
  #[class(type)]
  #[error("invalid cache request URL {0:?}: {1}")]
  InvalidUrl(String, String),
  #[class(type)]
  #[error("invalid header {name:?}: {reason}")]
  InvalidHeader { name: String, reason: String },
  #[class(range)]
  #[error("invalid response status {0}")]
  InvalidStatus(u32),
}

deno_core::extension!(
  outpost_cache,
  deps = [deno_webidl, deno_web, deno_fetch],
  ops = [
    op_cache_match,
    op_cache_put,
    op_cache_delete,
    op_cache_max_entry_bytes,
    op_cache_refuse_oversized
  ],
  esm = ["01_cache.js"],
  options = { cache: Option<Arc<dyn EdgeCache>> },
  state = |state, options| {
    if let Some(cache) = options.cache {
      state.put(cache);
    }
  },
);

/// A header list as it crosses into and out of JS.
type HeaderList = Vec<(ByteString, ByteString)>;

/// A cached response as JS gets it.
#[derive(ToV8)]
pub struct CacheMatch {
  status: u32,
  headers: HeaderList,
  body: Uint8Array,
}

fn cache_and_namespace(
  state: &OpState,
) -> Result<(Arc<dyn EdgeCache>, CacheNamespace), CacheError> {
  let cache = state
    .try_borrow::<Arc<dyn EdgeCache>>()
    .ok_or(CacheError::NoNamespace)?;
  let namespace = state
    .try_borrow::<CacheNamespace>()
    .ok_or(CacheError::NoNamespace)?;
  Ok((cache.clone(), namespace.clone()))
}

fn cache_name(name: Option<String>) -> CacheName {
  name.map_or(CacheName::Default, |name| CacheName::Named(name.into()))
}

fn header_map(headers: HeaderList) -> Result<http::HeaderMap, CacheError> {
  outpost_ext_dispatch::header_map(headers)
    .map_err(|InvalidHeader { name, reason }| CacheError::InvalidHeader { name, reason })
}

/// The head of a GET request for `url` with `headers`.
fn request_head(url: &str, headers: HeaderList) -> Result<http::request::Parts, CacheError> {
  let uri: http::Uri = url
    .parse()
    .map_err(|err: http::uri::InvalidUri| CacheError::InvalidUrl(url.into(), err.to_string()))?;
  let (mut parts, ()) = http::Request::get(uri)
    .body(())
    .map_err(|err| CacheError::InvalidUrl(url.into(), err.to_string()))?
    .into_parts();
  parts.headers = header_map(headers)?;
  Ok(parts)
}

/// `cache.match()`: the stored response for a GET of `url`, or `null`.
#[op2]
fn op_cache_match(
  state: &mut OpState,
  #[string] cache: Option<String>,
  #[string] url: String,
  #[scoped] headers: HeaderList,
) -> Result<Option<CacheMatch>, CacheError> {
  let (store, namespace) = cache_and_namespace(state)?;
  let request = request_head(&url, headers)?;
  let Some(found) = store.lookup(&namespace, &cache_name(cache), &request) else {
    return Ok(None);
  };
  let headers = found
    .head
    .headers
    .iter()
    .map(|(name, value)| {
      (
        ByteString::from(name.as_str()),
        ByteString::from(value.as_bytes()),
      )
    })
    .collect();
  Ok(Some(CacheMatch {
    status: u32::from(found.head.status.as_u16()),
    headers,
    body: Uint8Array::from(found.body.to_vec()),
  }))
}

/// `cache.put()`, once JS has read the body: whether it was stored.
#[op2]
fn op_cache_put(
  state: &mut OpState,
  #[string] cache: Option<String>,
  #[string] url: String,
  #[scoped] request_headers: HeaderList,
  #[smi] status: u32,
  #[scoped] response_headers: HeaderList,
  #[buffer] body: &[u8],
) -> Result<bool, CacheError> {
  let (store, namespace) = cache_and_namespace(state)?;
  let request = request_head(&url, request_headers)?;
  let status = u16::try_from(status)
    .ok()
    .and_then(|s| http::StatusCode::from_u16(s).ok())
    .ok_or(CacheError::InvalidStatus(status))?;
  let (mut response, ()) = http::Response::new(()).into_parts();
  response.status = status;
  response.headers = header_map(response_headers)?;
  let outcome = store.store(
    &namespace,
    &cache_name(cache),
    &request,
    response,
    Bytes::copy_from_slice(body),
  );
  Ok(outcome == StoreOutcome::Stored)
}

/// `cache.delete()`: whether anything was stored for a GET of `url`.
#[op2]
fn op_cache_delete(
  state: &mut OpState,
  #[string] cache: Option<String>,
  #[string] url: String,
  #[scoped] headers: HeaderList,
) -> Result<bool, CacheError> {
  let (store, namespace) = cache_and_namespace(state)?;
  let request = request_head(&url, headers)?;
  Ok(store.delete(&namespace, &cache_name(cache), &request))
}

/// The most body bytes `put` reads before it gives up on storing a response.
#[op2(fast)]
#[number]
fn op_cache_max_entry_bytes(state: &mut OpState) -> Result<u64, CacheError> {
  let (store, _) = cache_and_namespace(state)?;
  Ok(store.max_entry_bytes() as u64)
}

/// Reports a `put` whose body grew past the entry limit while it was read.
#[op2(fast)]
fn op_cache_refuse_oversized(state: &mut OpState, #[string] url: &str) -> Result<(), CacheError> {
  let (store, namespace) = cache_and_namespace(state)?;
  store.refused_oversized(&namespace, url);
  Ok(())
}
