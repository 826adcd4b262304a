//! Routing: `host` (exact, `*.example.com`, or any) plus a path prefix picks a function.
//!
//! When several routes match, the most specific wins: an exact host beats a wildcard host
//! (a longer wildcard suffix beats a shorter one), which beats a path-only route; among
//! routes with equally specific hosts the longest path prefix wins. A path prefix matches
//! whole segments: `/api` matches `/api` and `/api/x` but not `/apix`; `/api/` matches
//! everything under `/api/`.

/// Which hosts a route applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
  Any,
  /// `*.example.com`: stored as `.example.com`; matches subdomains, not the apex.
  Wildcard(String),
  Exact(String),
}

/// One entry of a function's `routes`, e.g. `api.example.com/`, `*.example.com/v1/` or
/// `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePattern {
  pub host: HostPattern,
  pub path: String,
}

impl RoutePattern {
  /// Parses a route; the error says what is wrong and what a valid route looks like.
  pub fn parse(route: &str) -> Result<RoutePattern, String> {
    let (host, path) = match route.find('/') {
      Some(0) => ("", route),
      Some(i) => (&route[..i], &route[i..]),
      None => {
        return Err(format!(
          "route {route:?} has no path: write {route:?} followed by a path prefix, e.g. \"{route}/\""
        ));
      }
    };
    if path.contains(['?', '#', '*']) {
      return Err(format!(
        "route {route:?}: the path part is a plain prefix; '?', '#' and '*' are not allowed in it"
      ));
    }
    let host = host.to_ascii_lowercase();
    let host = if host.is_empty() {
      HostPattern::Any
    } else if let Some(suffix) = host.strip_prefix("*.") {
      check_host(suffix, route)?;
      HostPattern::Wildcard(format!(".{suffix}"))
    } else {
      check_host(&host, route)?;
      HostPattern::Exact(host)
    };
    Ok(RoutePattern {
      host,
      path: path.to_string(),
    })
  }

  fn matches(&self, host: &str, path: &str) -> bool {
    self.matches_host(host) && self.matches_path(path)
  }

  fn matches_host(&self, host: &str) -> bool {
    match &self.host {
      HostPattern::Any => true,
      HostPattern::Exact(h) => h == host,
      HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
    }
  }

  fn matches_path(&self, path: &str) -> bool {
    path.starts_with(&self.path)
      && (self.path.ends_with('/')
        || matches!(path.as_bytes().get(self.path.len()), None | Some(b'/')))
  }

  /// How many of the requests `other` matches this route also matches: all of them, some,
  /// or none. (Where this route is looked at first, that is what it takes from `other`.)
  pub fn overlap(&self, other: &RoutePattern) -> Overlap {
    use HostPattern::{Any, Exact, Wildcard};
    let host_covers = match (&self.host, &other.host) {
      (Any, _) => true,
      (Wildcard(mine), Wildcard(theirs)) => theirs.ends_with(mine.as_str()),
      (Wildcard(_), Exact(host)) => self.matches_host(host),
      (Exact(mine), Exact(theirs)) => mine == theirs,
      (Wildcard(_) | Exact(_), Any) | (Exact(_), Wildcard(_)) => false,
    };
    let hosts_meet = host_covers
      || match (&self.host, &other.host) {
        (_, Any) => true,
        (Exact(host), Wildcard(_)) => other.matches_host(host),
        (Wildcard(mine), Wildcard(theirs)) => mine.ends_with(theirs.as_str()),
        _ => false,
      };
    let path_covers = self.matches_path(&other.path);
    let paths_meet = path_covers || other.matches_path(&self.path);
    match (host_covers && path_covers, hosts_meet && paths_meet) {
      (true, _) => Overlap::All,
      (false, true) => Overlap::Some,
      (false, false) => Overlap::None,
    }
  }

  /// Orders routes from most to least specific.
  fn specificity(&self) -> (u8, usize, usize) {
    let (host_rank, host_len) = match &self.host {
      HostPattern::Exact(h) => (2, h.len()),
      HostPattern::Wildcard(s) => (1, s.len()),
      HostPattern::Any => (0, 0),
    };
    (host_rank, host_len, self.path.len())
  }
}

/// See [`RoutePattern::overlap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
  All,
  Some,
  None,
}

impl std::fmt::Display for RoutePattern {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    match &self.host {
      HostPattern::Any => {}
      HostPattern::Exact(host) => f.write_str(host)?,
      HostPattern::Wildcard(suffix) => write!(f, "*{suffix}")?,
    }
    f.write_str(&self.path)
  }
}

fn check_host(host: &str, route: &str) -> Result<(), String> {
  let valid = !host.is_empty()
    && host.split('.').all(|label| {
      !label.is_empty()
        && label
          .bytes()
          .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
  if valid {
    Ok(())
  } else {
    Err(format!(
      "route {route:?}: {host:?} is not a host name; use e.g. \"api.example.com/\" or \"*.example.com/\" (no port, no scheme)"
    ))
  }
}

/// Maps requests to function indices.
#[derive(Debug, Default)]
pub struct Router {
  /// Sorted from most to least specific, so the first match wins.
  routes: Vec<(RoutePattern, usize)>,
}

impl Router {
  pub fn new(routes: impl IntoIterator<Item = (RoutePattern, usize)>) -> Router {
    let mut routes: Vec<_> = routes.into_iter().collect();
    routes.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.specificity()));
    Router { routes }
  }

  /// Every route with the index it maps to.
  pub fn patterns(&self) -> impl Iterator<Item = &(RoutePattern, usize)> {
    self.routes.iter()
  }

  /// The function for a request's host (port and trailing dot ignored) and path.
  pub fn route(&self, host: &str, path: &str) -> Option<usize> {
    let host = normalized_host(host);
    self
      .routes
      .iter()
      .find(|(pattern, _)| pattern.matches(&host, path))
      .map(|(_, function)| *function)
  }

  /// The functions some route of which matches `host` (at any path), each once, in routing
  /// order.
  pub fn for_host(&self, host: &str) -> Vec<usize> {
    let host = normalized_host(host);
    let mut functions = Vec::new();
    for (pattern, function) in &self.routes {
      if pattern.matches_host(&host) && !functions.contains(function) {
        functions.push(*function);
      }
    }
    functions
  }
}

/// A host as routes name it: no port, no trailing dot, lower case (most clients send it in
/// lower case already: no copy for them).
fn normalized_host(host: &str) -> std::borrow::Cow<'_, str> {
  let host = host_without_port(host).trim_end_matches('.');
  if host.bytes().any(|b| b.is_ascii_uppercase()) {
    std::borrow::Cow::Owned(host.to_ascii_lowercase())
  } else {
    std::borrow::Cow::Borrowed(host)
  }
}

fn host_without_port(host: &str) -> &str {
  if host.starts_with('[') {
    // IPv6 literal: "[::1]:8080"
    return host.split(']').next().map_or(host, |h| &host[..=h.len()]);
  }
  host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
  use super::*;

  fn router(routes: &[(&str, usize)]) -> Router {
    Router::new(
      routes
        .iter()
        .map(|(r, f)| (RoutePattern::parse(r).unwrap(), *f)),
    )
  }

  #[test]
  fn most_specific_route_wins() {
    let r = router(&[
      ("/", 0),
      ("/health", 1),
      ("example.com/api/", 2),
      ("api.example.com/", 3),
      ("*.example.com/", 4),
      ("example.com/", 5),
    ]);
    assert_eq!(r.route("other.org", "/x"), Some(0));
    assert_eq!(r.route("other.org", "/health"), Some(1));
    assert_eq!(r.route("other.org", "/healthz"), Some(0));
    assert_eq!(r.route("example.com:8443", "/api/users"), Some(2));
    assert_eq!(r.route("example.com", "/apix"), Some(5));
    assert_eq!(r.route("API.example.com", "/health"), Some(3));
    assert_eq!(r.route("www.example.com", "/"), Some(4));
  }

  #[test]
  fn unmatched_is_none() {
    let r = router(&[("api.example.com/", 0), ("/v1/", 1)]);
    assert_eq!(r.route("example.com", "/"), None);
    assert_eq!(r.route("example.com", "/v1"), None);
    assert_eq!(r.route("[::1]:80", "/v1/x"), Some(1));
  }

  #[test]
  fn a_host_reaches_the_functions_routed_under_it_at_any_path() {
    let r = router(&[
      ("example.com/api/", 2),
      ("example.com/", 5),
      ("*.example.com/", 4),
      ("example.com/static/", 5),
      ("other.org/", 6),
    ]);
    assert_eq!(r.for_host("Example.COM:443"), vec![5, 2]);
    assert_eq!(r.for_host("www.example.com"), vec![4]);
    assert_eq!(r.for_host("nowhere.test"), Vec::<usize>::new());
    let catch_all = router(&[("/", 0), ("api.test/", 1)]);
    assert_eq!(catch_all.for_host("api.test"), vec![1, 0]);
  }

  #[test]
  fn overlap_tells_whether_a_route_takes_all_some_or_none_of_another() {
    let overlap = |first: &str, then: &str| {
      RoutePattern::parse(first)
        .unwrap()
        .overlap(&RoutePattern::parse(then).unwrap())
    };
    assert_eq!(overlap("/", "example.com/api/"), Overlap::All);
    assert_eq!(overlap("/api", "/api/v1/"), Overlap::All);
    assert_eq!(overlap("/api/", "/api"), Overlap::Some);
    assert_eq!(overlap("/apix", "/api"), Overlap::None);
    assert_eq!(overlap("*.example.com/", "a.example.com/x"), Overlap::All);
    assert_eq!(overlap("*.example.com/", "*.a.example.com/"), Overlap::All);
    assert_eq!(overlap("*.example.com/", "example.com/"), Overlap::None);
    assert_eq!(overlap("a.example.com/", "*.example.com/"), Overlap::Some);
    assert_eq!(overlap("example.com/", "/"), Overlap::Some);
    assert_eq!(overlap("example.com/v1/", "/v1/users"), Overlap::Some);
    assert_eq!(overlap("example.com/v1/", "other.org/"), Overlap::None);
    assert_eq!(
      RoutePattern::parse("*.example.com/v1").unwrap().to_string(),
      "*.example.com/v1"
    );
  }

  #[test]
  fn bad_routes_are_explained() {
    assert!(
      RoutePattern::parse("example.com")
        .unwrap_err()
        .contains("has no path")
    );
    assert!(
      RoutePattern::parse("http://x/")
        .unwrap_err()
        .contains("not a host name")
    );
    assert!(
      RoutePattern::parse("/a*")
        .unwrap_err()
        .contains("plain prefix")
    );
  }
}
