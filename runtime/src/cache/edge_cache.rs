//! The node's shared edge cache: one moka cache for every isolate on every thread, bounded
//! by bytes, with entries kept by HTTP freshness.
//!
//! Entries are keyed by namespace (the function: tenants never see each other's entries),
//! store (the Cache API's default cache, a named one, or route caching) and URL. One key
//! holds the variants a `Vary` header splits a URL into. Whether a response may be stored
//! and whether a stored one is fresh for a request are the RFC 9111 rules of
//! `http-cache-semantics`, evaluated as a shared cache, against a [`Clock`] (a test can
//! move time). A response with `Set-Cookie` is never stored: a shared cache must not hand
//! one client's cookie to another; nor is one that would be stale at once, unless
//! `stale-while-revalidate` or `stale-if-error` lets it be served. Conditional requests
//! (`If-None-Match`, `If-Modified-Since`) that a fresh entry satisfies get 304.
//!
//! Counters per namespace ([`CacheStats`]) are kept in one place for the metrics exporter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http_cache_semantics::{BeforeRequest, CacheOptions, CachePolicy};
use moka::notification::RemovalCause;
use outpost_ext_cache::{CacheName, CacheNamespace, CachedResponse, EdgeCache, StoreOutcome};
use serde::Serialize;

/// Where time comes from: the system clock, or a test's.
pub trait Clock: Send + Sync {
  fn now(&self) -> SystemTime;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
  fn now(&self) -> SystemTime {
    SystemTime::now()
  }
}

/// Which store of a namespace an entry belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Store {
  /// A cache of the Cache API.
  Api(CacheName),
  /// Responses cached in front of the function (`cache = { enabled = true }`).
  Route,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EntryKey {
  namespace: CacheNamespace,
  store: Store,
  /// The URL without its fragment.
  url: String,
}

/// One stored response.
struct Variant {
  policy: CachePolicy,
  status: http::StatusCode,
  headers: HeaderMap,
  /// When it stops being fresh (by the clock of the store).
  fresh_until: SystemTime,
  body: Bytes,
  /// From `Cache-Tag`, for purging by tag.
  tags: Vec<String>,
  /// `stale-while-revalidate` / `stale-if-error` of the response.
  stale: StaleExtensions,
  weight: usize,
}

/// The variants of one URL (one per set of `Vary` request header values).
type Variants = Arc<Vec<Arc<Variant>>>;

/// The RFC 5861 extensions of a response, which `http-cache-semantics` does not read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StaleExtensions {
  pub while_revalidate: Duration,
  pub if_error: Duration,
}

impl StaleExtensions {
  /// Reads `stale-while-revalidate=N` and `stale-if-error=N` from `Cache-Control`.
  pub fn from_headers(headers: &HeaderMap) -> StaleExtensions {
    let mut stale = StaleExtensions::default();
    for value in headers.get_all(http::header::CACHE_CONTROL) {
      let Ok(value) = value.to_str() else { continue };
      for directive in value.split(',') {
        let Some((name, seconds)) = directive.trim().split_once('=') else {
          continue;
        };
        let Ok(seconds) = seconds.trim().trim_matches('"').parse::<u64>() else {
          continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
          "stale-while-revalidate" => stale.while_revalidate = Duration::from_secs(seconds),
          "stale-if-error" => stale.if_error = Duration::from_secs(seconds),
          _ => {}
        }
      }
    }
    stale
  }
}

/// Counters of one namespace. `bytes` and `entries` are what it holds now.
#[derive(Debug, Default)]
pub struct CacheStats {
  pub hits: AtomicU64,
  pub misses: AtomicU64,
  pub stores: AtomicU64,
  pub refusals: AtomicU64,
  pub evictions: AtomicU64,
  pub bytes: AtomicU64,
  pub entries: AtomicU64,
}

/// A point-in-time copy of [`CacheStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheStatsSnapshot {
  pub hits: u64,
  pub misses: u64,
  pub stores: u64,
  pub refusals: u64,
  pub evictions: u64,
  pub bytes: u64,
  pub entries: u64,
}

impl CacheStats {
  fn snapshot(&self) -> CacheStatsSnapshot {
    let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    CacheStatsSnapshot {
      hits: read(&self.hits),
      misses: read(&self.misses),
      stores: read(&self.stores),
      refusals: read(&self.refusals),
      evictions: read(&self.evictions),
      bytes: read(&self.bytes),
      entries: read(&self.entries),
    }
  }

  fn count(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
  }
}

#[derive(Default)]
struct StatsByNamespace(Mutex<HashMap<CacheNamespace, Arc<CacheStats>>>);

impl StatsByNamespace {
  fn of(&self, namespace: &CacheNamespace) -> Arc<CacheStats> {
    self
      .0
      .lock()
      .expect("cache stats lock")
      .entry(namespace.clone())
      .or_default()
      .clone()
  }
}

/// What a lookup found.
pub enum Lookup {
  /// Fresh: serve it.
  Fresh(CachedResponse),
  /// Stale, but within `stale-while-revalidate`: serve it and refresh it in the background.
  StaleWhileRevalidate(CachedResponse),
  /// Stale (or absent); when within `stale-if-error`, the stale response to serve should
  /// the function fail.
  Miss { if_error: Option<CachedResponse> },
}

/// What to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
  /// Every entry of exactly this URL.
  Url(String),
  /// Every entry whose URL starts with this.
  Prefix(String),
  /// Every entry whose path and query are exactly this (`/a?b`), whatever its host.
  Path(String),
  /// Every entry whose path and query start with this, whatever its host.
  PathPrefix(String),
  /// Every entry with this `Cache-Tag`.
  Tag(String),
}

impl std::fmt::Display for Purge {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    match self {
      Purge::Url(url) | Purge::Path(url) => write!(f, "url {url}"),
      Purge::Prefix(prefix) | Purge::PathPrefix(prefix) => write!(f, "prefix {prefix}"),
      Purge::Tag(tag) => write!(f, "tag {tag}"),
    }
  }
}

/// The shared cache.
pub struct SharedCache {
  entries: moka::sync::Cache<EntryKey, Variants>,
  max_entry_bytes: usize,
  clock: Arc<dyn Clock>,
  stats: Arc<StatsByNamespace>,
}

/// Bytes a header map takes, roughly as sent.
fn header_bytes(headers: &HeaderMap) -> usize {
  headers
    .iter()
    .map(|(name, value)| name.as_str().len() + value.len() + 4)
    .sum()
}

fn cache_options() -> CacheOptions {
  CacheOptions {
    shared: true,
    ..CacheOptions::default()
  }
}

impl SharedCache {
  /// The cache `[cache]` describes, on the system clock.
  pub fn from_config(config: &crate::config::CacheConfig) -> SharedCache {
    SharedCache::new(
      config.max_bytes.as_u64(),
      usize::try_from(config.max_entry_bytes.as_u64()).unwrap_or(usize::MAX),
      Arc::new(SystemClock),
    )
  }

  /// A cache of at most `max_bytes`, taking entries of at most `max_entry_bytes`.
  pub fn new(max_bytes: u64, max_entry_bytes: usize, clock: Arc<dyn Clock>) -> SharedCache {
    let stats = Arc::new(StatsByNamespace::default());
    let listener_stats = stats.clone();
    let expiry_clock = clock.clone();
    let entries = moka::sync::Cache::builder()
      .max_capacity(max_bytes)
      .weigher(|key: &EntryKey, variants: &Variants| {
        let weight = key.url.len() + variants.iter().map(|v| v.weight).sum::<usize>();
        u32::try_from(weight).unwrap_or(u32::MAX)
      })
      .expire_after(KeepWhileUseful {
        clock: expiry_clock,
      })
      .eviction_listener(move |key: Arc<EntryKey>, variants: Variants, cause| {
        let stats = listener_stats.of(&key.namespace);
        let weight = key.url.len() + variants.iter().map(|v| v.weight).sum::<usize>();
        stats.bytes.fetch_sub(weight as u64, Ordering::Relaxed);
        stats.entries.fetch_sub(1, Ordering::Relaxed);
        if cause == RemovalCause::Size {
          CacheStats::count(&stats.evictions);
        }
      })
      .build();
    SharedCache {
      entries,
      max_entry_bytes,
      clock,
      stats,
    }
  }

  /// The counters of every namespace that has used the cache.
  pub fn stats(&self) -> Vec<(CacheNamespace, CacheStatsSnapshot)> {
    self.entries.run_pending_tasks();
    let by_namespace = self.stats.0.lock().expect("cache stats lock");
    let mut stats: Vec<_> = by_namespace
      .iter()
      .map(|(namespace, stats)| (namespace.clone(), stats.snapshot()))
      .collect();
    stats.sort_by(|a, b| a.0.0.cmp(&b.0.0));
    stats
  }

  fn key(namespace: &CacheNamespace, store: Store, request: &http::request::Parts) -> EntryKey {
    let url = request.uri.to_string();
    EntryKey {
      namespace: namespace.clone(),
      store,
      url,
    }
  }

  /// Looks `request` up in `store` of `namespace`.
  pub fn lookup_in(
    &self,
    namespace: &CacheNamespace,
    store: Store,
    request: &http::request::Parts,
  ) -> Lookup {
    let stats = self.stats.of(namespace);
    let now = self.clock.now();
    let variants = self.entries.get(&Self::key(namespace, store, request));
    let mut if_error = None;
    for variant in variants.iter().flat_map(|v| v.iter()) {
      match variant.policy.before_request(request, now) {
        BeforeRequest::Fresh(head) => {
          CacheStats::count(&stats.hits);
          return Lookup::Fresh(respond(request, head, &variant.body));
        }
        BeforeRequest::Stale { matches: true, .. } => {
          let staleness = now.duration_since(variant.fresh_until).unwrap_or_default();
          let head = variant.stale_head(now);
          if staleness < variant.stale.while_revalidate {
            CacheStats::count(&stats.hits);
            return Lookup::StaleWhileRevalidate(respond(request, head, &variant.body));
          }
          if staleness < variant.stale.if_error {
            if_error = Some(respond(request, head, &variant.body));
          }
        }
        BeforeRequest::Stale { matches: false, .. } => {}
      }
    }
    CacheStats::count(&stats.misses);
    Lookup::Miss { if_error }
  }

  /// The caching rules' verdict on storing `response` for `request` at `now`: its policy
  /// and stale extensions when it may be stored and served, else `None`.
  fn admit(
    request: &http::request::Parts,
    response: &http::response::Parts,
    now: SystemTime,
  ) -> Option<(CachePolicy, StaleExtensions)> {
    let policy = CachePolicy::new_options(request, response, now, cache_options());
    let stale = StaleExtensions::from_headers(&response.headers);
    let useful = !policy.time_to_live(now).is_zero()
      || !stale.while_revalidate.is_zero()
      || !stale.if_error.is_zero();
    let cookie = response.headers.contains_key(http::header::SET_COOKIE);
    (policy.is_storable() && useful && !cookie).then_some((policy, stale))
  }

  /// Whether `response` to `request` may be stored in `namespace` (before its body is
  /// read); a refusal is counted.
  pub fn storable(
    &self,
    namespace: &CacheNamespace,
    request: &http::request::Parts,
    response: &http::response::Parts,
  ) -> bool {
    let storable = Self::admit(request, response, self.clock.now()).is_some();
    if !storable {
      CacheStats::count(&self.stats.of(namespace).refusals);
    }
    storable
  }

  /// Stores `response` for `request` in `store` of `namespace`, replacing the variant the
  /// request selects.
  pub fn store_in(
    &self,
    namespace: &CacheNamespace,
    store: Store,
    request: &http::request::Parts,
    response: http::response::Parts,
    body: Bytes,
  ) -> StoreOutcome {
    let stats = self.stats.of(namespace);
    let now = self.clock.now();
    let policy = CachePolicy::new_options(request, &response, now, cache_options());
    let stale = StaleExtensions::from_headers(&response.headers);
    let useful = !policy.time_to_live(now).is_zero()
      || !stale.while_revalidate.is_zero()
      || !stale.if_error.is_zero();
    if !policy.is_storable() || !useful || response.headers.contains_key(http::header::SET_COOKIE) {
      CacheStats::count(&stats.refusals);
      return StoreOutcome::NotStorable;
    }
    let key = Self::key(namespace, store, request);
    let weight = body.len() + header_bytes(&response.headers) + header_bytes(&request.headers);
    if weight + key.url.len() > self.max_entry_bytes {
      CacheStats::count(&stats.refusals);
      tracing::warn!(
        namespace = %namespace.0,
        url = key.url,
        bytes = weight,
        max_entry_bytes = self.max_entry_bytes,
        "not cached: larger than cache.max_entry_bytes"
      );
      return StoreOutcome::TooLarge;
    }
    let tags = response
      .headers
      .get_all("cache-tag")
      .iter()
      .filter_map(|v| v.to_str().ok())
      .flat_map(|v| v.split(','))
      .map(|tag| tag.trim().to_string())
      .filter(|tag| !tag.is_empty())
      .collect();
    let variant = Arc::new(Variant {
      fresh_until: now + policy.time_to_live(now),
      policy,
      status: response.status,
      headers: response.headers,
      body,
      tags,
      stale,
      weight,
    });
    let mut variants: Vec<Arc<Variant>> = self
      .entries
      .get(&key)
      .map(|existing| {
        existing
          .iter()
          // Keep the variants this request does not select (other Vary values).
          .filter(|old| {
            matches!(
              old.policy.before_request(request, now),
              BeforeRequest::Stale { matches: false, .. }
            )
          })
          .cloned()
          .collect()
      })
      .unwrap_or_default();
    variants.push(variant);
    let total = key.url.len() + variants.iter().map(|v| v.weight).sum::<usize>();
    stats.bytes.fetch_add(total as u64, Ordering::Relaxed);
    stats.entries.fetch_add(1, Ordering::Relaxed);
    CacheStats::count(&stats.stores);
    self.entries.insert(key, Arc::new(variants));
    StoreOutcome::Stored
  }

  /// Removes every variant of `request`'s URL in `store` of `namespace`.
  pub fn delete_in(
    &self,
    namespace: &CacheNamespace,
    store: Store,
    request: &http::request::Parts,
  ) -> bool {
    self
      .entries
      .remove(&Self::key(namespace, store, request))
      .is_some()
  }

  /// Removes what `purge` selects, in `namespace` only or in all; how many URLs' entries
  /// were removed.
  pub fn purge(&self, namespace: Option<&CacheNamespace>, purge: &Purge) -> usize {
    let selected: Vec<Arc<EntryKey>> = self
      .entries
      .iter()
      .filter(|(key, variants)| {
        namespace.is_none_or(|n| *n == key.namespace)
          && match purge {
            Purge::Url(url) => key.url == *url,
            Purge::Prefix(prefix) => key.url.starts_with(prefix.as_str()),
            Purge::Path(path) => path_and_query(&key.url) == path,
            Purge::PathPrefix(prefix) => path_and_query(&key.url).starts_with(prefix.as_str()),
            Purge::Tag(tag) => variants.iter().any(|v| v.tags.iter().any(|t| t == tag)),
          }
      })
      .map(|(key, _)| key)
      .collect();
    selected
      .iter()
      .filter(|key| self.entries.remove(key.as_ref()).is_some())
      .count()
  }
}

/// `/path?query` of a full URL key (`https://host/path?query`).
fn path_and_query(url: &str) -> &str {
  let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
  after_scheme
    .find('/')
    .map_or("/", |slash| &after_scheme[slash..])
}

impl Variant {
  /// The head of the stored response served stale: `Age` as it is now.
  fn stale_head(&self, now: SystemTime) -> http::response::Parts {
    let (mut head, ()) = http::Response::new(()).into_parts();
    head.status = self.status;
    head.headers = self.headers.clone();
    if let Ok(age) = HeaderValue::from_str(&self.policy.age(now).as_secs().to_string()) {
      head.headers.insert(http::header::AGE, age);
    }
    head
  }
}

/// The response to serve from a stored head and body: 304 with no body when `request` is
/// conditional and the stored response satisfies it (RFC 9110 13.1).
fn respond(
  request: &http::request::Parts,
  mut head: http::response::Parts,
  body: &Bytes,
) -> CachedResponse {
  if not_modified(&request.headers, &head.headers) {
    head.status = http::StatusCode::NOT_MODIFIED;
    head.headers.remove(http::header::CONTENT_LENGTH);
    return CachedResponse {
      head,
      body: Bytes::new(),
    };
  }
  CachedResponse {
    head,
    body: body.clone(),
  }
}

/// Whether a conditional request is satisfied by a response with `response` headers:
/// `If-None-Match` (weak comparison) when present, else `If-Modified-Since`.
fn not_modified(request: &HeaderMap, response: &HeaderMap) -> bool {
  let request_tags: Vec<&str> = request
    .get_all(http::header::IF_NONE_MATCH)
    .iter()
    .filter_map(|v| v.to_str().ok())
    .flat_map(|v| v.split(','))
    .map(str::trim)
    .collect();
  if !request_tags.is_empty() {
    let Some(etag) = response
      .get(http::header::ETAG)
      .and_then(|v| v.to_str().ok())
    else {
      return false;
    };
    let weak = |tag: &str| tag.trim().trim_start_matches("W/").to_string();
    return request_tags
      .iter()
      .any(|tag| *tag == "*" || weak(tag) == weak(etag));
  }
  let date = |headers: &HeaderMap, name| {
    headers
      .get(name)
      .and_then(|v| v.to_str().ok())
      .and_then(|v| httpdate::parse_http_date(v).ok())
  };
  match (
    date(request, http::header::IF_MODIFIED_SINCE),
    date(response, http::header::LAST_MODIFIED),
  ) {
    (Some(since), Some(modified)) => modified <= since,
    _ => false,
  }
}

/// Keeps an entry while some variant may still be served: fresh, or stale within its
/// stale-while-revalidate / stale-if-error windows.
struct KeepWhileUseful {
  clock: Arc<dyn Clock>,
}

impl KeepWhileUseful {
  fn useful_for(&self, variants: &Variants) -> Duration {
    let now = self.clock.now();
    variants
      .iter()
      .map(|v| v.policy.time_to_live(now) + v.stale.while_revalidate.max(v.stale.if_error))
      .max()
      .unwrap_or_default()
  }
}

impl moka::Expiry<EntryKey, Variants> for KeepWhileUseful {
  fn expire_after_create(
    &self,
    _key: &EntryKey,
    value: &Variants,
    _created_at: std::time::Instant,
  ) -> Option<Duration> {
    Some(self.useful_for(value))
  }

  fn expire_after_update(
    &self,
    _key: &EntryKey,
    value: &Variants,
    _updated_at: std::time::Instant,
    _duration_until_expiry: Option<Duration>,
  ) -> Option<Duration> {
    Some(self.useful_for(value))
  }
}

impl EdgeCache for SharedCache {
  fn lookup(
    &self,
    namespace: &CacheNamespace,
    cache: &CacheName,
    request: &http::request::Parts,
  ) -> Option<CachedResponse> {
    // The Cache API serves fresh responses only, as in Workers.
    match self.lookup_in(namespace, Store::Api(cache.clone()), request) {
      Lookup::Fresh(response) => Some(response),
      Lookup::StaleWhileRevalidate(_) | Lookup::Miss { .. } => None,
    }
  }

  fn store(
    &self,
    namespace: &CacheNamespace,
    cache: &CacheName,
    request: &http::request::Parts,
    response: http::response::Parts,
    body: Bytes,
  ) -> StoreOutcome {
    self.store_in(
      namespace,
      Store::Api(cache.clone()),
      request,
      response,
      body,
    )
  }

  fn delete(
    &self,
    namespace: &CacheNamespace,
    cache: &CacheName,
    request: &http::request::Parts,
  ) -> bool {
    self.delete_in(namespace, Store::Api(cache.clone()), request)
  }

  fn max_entry_bytes(&self) -> usize {
    self.max_entry_bytes
  }

  fn refused_oversized(&self, namespace: &CacheNamespace, url: &str) {
    CacheStats::count(&self.stats.of(namespace).refusals);
    tracing::warn!(
      namespace = %namespace.0,
      url,
      max_entry_bytes = self.max_entry_bytes,
      "not cached: the body is larger than cache.max_entry_bytes"
    );
  }
}

#[cfg(test)]
mod tests {
  use std::sync::Mutex;

  use super::*;

  /// A clock the test moves.
  struct TestClock(Mutex<SystemTime>);

  impl TestClock {
    fn advance(&self, by: Duration) {
      *self.0.lock().unwrap() += by;
    }
  }

  impl Clock for TestClock {
    fn now(&self) -> SystemTime {
      *self.0.lock().unwrap()
    }
  }

  fn cache(max_bytes: u64, max_entry_bytes: usize) -> (SharedCache, Arc<TestClock>) {
    let clock = Arc::new(TestClock(Mutex::new(
      SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    )));
    (
      SharedCache::new(max_bytes, max_entry_bytes, clock.clone()),
      clock,
    )
  }

  fn get(url: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut request = http::Request::get(url);
    for (name, value) in headers {
      request = request.header(*name, *value);
    }
    request.body(()).unwrap().into_parts().0
  }

  fn response(headers: &[(&str, &str)]) -> http::response::Parts {
    let mut response = http::Response::builder();
    for (name, value) in headers {
      response = response.header(*name, *value);
    }
    response.body(()).unwrap().into_parts().0
  }

  fn ns(name: &str) -> CacheNamespace {
    CacheNamespace(name.into())
  }

  fn body_of(lookup: Lookup) -> Option<String> {
    match lookup {
      Lookup::Fresh(found) => Some(String::from_utf8(found.body.to_vec()).unwrap()),
      _ => None,
    }
  }

  #[test]
  fn entries_expire_by_their_freshness_on_the_cache_clock() {
    let (cache, clock) = cache(1 << 20, 1 << 16);
    let request = get("https://a.test/x", &[]);
    let stored = cache.store_in(
      &ns("f"),
      Store::Route,
      &request,
      response(&[("cache-control", "max-age=60")]),
      Bytes::from_static(b"one"),
    );
    assert_eq!(stored, StoreOutcome::Stored);
    clock.advance(Duration::from_secs(59));
    let Lookup::Fresh(found) = cache.lookup_in(&ns("f"), Store::Route, &request) else {
      panic!("fresh at 59 s");
    };
    assert_eq!(found.head.headers["age"], "59");
    clock.advance(Duration::from_secs(2));
    assert!(body_of(cache.lookup_in(&ns("f"), Store::Route, &request)).is_none());
    let stats = cache.stats();
    assert_eq!(stats[0].1.hits, 1);
    assert_eq!(stats[0].1.misses, 1);
  }

  #[test]
  fn namespaces_and_stores_do_not_see_each_other() {
    let (cache, _) = cache(1 << 20, 1 << 16);
    let request = get("https://a.test/x", &[]);
    let head = || response(&[("cache-control", "max-age=60")]);
    cache.store_in(
      &ns("a"),
      Store::Route,
      &request,
      head(),
      Bytes::from_static(b"a"),
    );
    assert_eq!(
      body_of(cache.lookup_in(&ns("a"), Store::Route, &request)).as_deref(),
      Some("a")
    );
    assert!(body_of(cache.lookup_in(&ns("b"), Store::Route, &request)).is_none());
    let api = Store::Api(CacheName::Default);
    assert!(body_of(cache.lookup_in(&ns("a"), api, &request)).is_none());
  }

  #[test]
  fn what_must_not_be_stored_is_refused() {
    let (cache, _) = cache(1 << 20, 64);
    let request = get("https://a.test/x", &[]);
    for headers in [
      &[("cache-control", "no-store")][..],
      &[("cache-control", "private, max-age=60")],
      &[("cache-control", "no-cache")],
      &[("cache-control", "max-age=60"), ("set-cookie", "id=1")],
      &[],
    ] {
      let outcome = cache.store_in(
        &ns("f"),
        Store::Route,
        &request,
        response(headers),
        Bytes::new(),
      );
      assert_eq!(outcome, StoreOutcome::NotStorable, "{headers:?}");
    }
    let outcome = cache.store_in(
      &ns("f"),
      Store::Route,
      &request,
      response(&[("cache-control", "max-age=60")]),
      Bytes::from(vec![0; 100]),
    );
    assert_eq!(outcome, StoreOutcome::TooLarge);
    assert!(body_of(cache.lookup_in(&ns("f"), Store::Route, &request)).is_none());
    assert_eq!(cache.stats()[0].1.refusals, 6);
    assert_eq!(cache.stats()[0].1.entries, 0);
  }

  #[test]
  fn vary_splits_entries_and_s_maxage_wins_for_a_shared_cache() {
    let (cache, clock) = cache(1 << 20, 1 << 16);
    let head = || {
      response(&[
        ("cache-control", "max-age=1, s-maxage=100"),
        ("vary", "accept-language"),
      ])
    };
    for language in ["en", "nl"] {
      let request = get("https://a.test/x", &[("accept-language", language)]);
      cache.store_in(
        &ns("f"),
        Store::Route,
        &request,
        head(),
        Bytes::from(language),
      );
    }
    clock.advance(Duration::from_secs(10));
    for language in ["en", "nl"] {
      let request = get("https://a.test/x", &[("accept-language", language)]);
      assert_eq!(
        body_of(cache.lookup_in(&ns("f"), Store::Route, &request)).as_deref(),
        Some(language)
      );
    }
    let other = get("https://a.test/x", &[("accept-language", "de")]);
    assert!(body_of(cache.lookup_in(&ns("f"), Store::Route, &other)).is_none());
  }

  #[test]
  fn conditional_requests_get_304_and_stale_responses_are_classified() {
    let (cache, clock) = cache(1 << 20, 1 << 16);
    let request = get("https://a.test/x", &[]);
    cache.store_in(
      &ns("f"),
      Store::Route,
      &request,
      response(&[
        (
          "cache-control",
          "max-age=10, stale-while-revalidate=20, stale-if-error=100",
        ),
        ("etag", "\"v1\""),
        ("last-modified", "Tue, 14 Nov 2023 00:00:00 GMT"),
      ]),
      Bytes::from_static(b"body"),
    );
    for headers in [
      &[("if-none-match", "W/\"v1\"")][..],
      &[("if-modified-since", "Wed, 15 Nov 2023 00:00:00 GMT")],
    ] {
      let Lookup::Fresh(found) =
        cache.lookup_in(&ns("f"), Store::Route, &get("https://a.test/x", headers))
      else {
        panic!("fresh");
      };
      assert_eq!(found.head.status, 304, "{headers:?}");
      assert!(found.body.is_empty());
    }
    let Lookup::Fresh(found) = cache.lookup_in(
      &ns("f"),
      Store::Route,
      &get("https://a.test/x", &[("if-none-match", "\"v2\"")]),
    ) else {
      panic!("fresh");
    };
    assert_eq!(found.head.status, 200);
    clock.advance(Duration::from_secs(15));
    assert!(matches!(
      cache.lookup_in(&ns("f"), Store::Route, &request),
      Lookup::StaleWhileRevalidate(_)
    ));
    clock.advance(Duration::from_secs(30));
    assert!(matches!(
      cache.lookup_in(&ns("f"), Store::Route, &request),
      Lookup::Miss { if_error: Some(_) }
    ));
    clock.advance(Duration::from_secs(100));
    assert!(matches!(
      cache.lookup_in(&ns("f"), Store::Route, &request),
      Lookup::Miss { if_error: None }
    ));
  }

  #[test]
  fn purges_by_url_prefix_and_tag_count_what_they_remove() {
    let (cache, _) = cache(1 << 20, 1 << 16);
    for (namespace, url, tags) in [
      ("a", "https://a.test/p/1", "red"),
      ("a", "https://a.test/p/2", "red, blue"),
      ("a", "https://a.test/q", "blue"),
      ("b", "https://a.test/p/1", "red"),
    ] {
      cache.store_in(
        &ns(namespace),
        Store::Route,
        &get(url, &[]),
        response(&[("cache-control", "max-age=60"), ("cache-tag", tags)]),
        Bytes::new(),
      );
    }
    assert_eq!(
      cache.purge(Some(&ns("a")), &Purge::Url("https://a.test/p/1".into())),
      1
    );
    assert_eq!(cache.purge(None, &Purge::Tag("blue".into())), 2);
    assert_eq!(
      cache.purge(None, &Purge::Prefix("https://a.test/p/".into())),
      1
    );
    assert_eq!(cache.stats().iter().map(|(_, s)| s.entries).sum::<u64>(), 0);
  }

  #[test]
  fn the_byte_bound_evicts() {
    let (cache, _) = cache(10_000, 2_000);
    for i in 0..20 {
      cache.store_in(
        &ns("f"),
        Store::Route,
        &get(&format!("https://a.test/{i}"), &[]),
        response(&[("cache-control", "max-age=60")]),
        Bytes::from(vec![0; 1_000]),
      );
    }
    let stats = cache.stats();
    assert!(stats[0].1.bytes <= 10_000, "{stats:?}");
    assert!(stats[0].1.evictions > 0, "{stats:?}");
  }
}
