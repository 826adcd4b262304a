//! Hop-by-hop headers (RFC 9110 section 7.6.1): they describe one connection, so they are
//! removed from requests before handlers see them and from responses before they are sent.

use http::HeaderMap;
use http::header::{
  CONNECTION, HeaderName, PROXY_AUTHENTICATE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

/// Headers that are always connection-specific.
static HOP_BY_HOP: [HeaderName; 9] = [
  CONNECTION,
  TE,
  TRAILER,
  TRANSFER_ENCODING,
  UPGRADE,
  HeaderName::from_static("keep-alive"),
  HeaderName::from_static("proxy-connection"),
  HeaderName::from_static("proxy-authorization"),
  HeaderName::from_static("http2-settings"),
];

/// Removes hop-by-hop headers from a request, including any named in `Connection`.
/// `TE: trailers` is the one TE value that survives, as HTTP/2 allows.
pub fn strip_request(headers: &mut HeaderMap) {
  strip(headers);
}

/// Removes hop-by-hop headers from a handler's response; `Proxy-Authenticate` is one too.
pub fn strip_response(headers: &mut HeaderMap) {
  strip(headers);
  headers.remove(PROXY_AUTHENTICATE);
}

fn strip(headers: &mut HeaderMap) {
  // Most messages have none: one look at each header instead of a lookup of each name.
  if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
    return;
  }
  let named: Vec<HeaderName> = headers
    .get_all(CONNECTION)
    .iter()
    .filter_map(|v| v.to_str().ok())
    .flat_map(|v| v.split(','))
    .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
    .collect();
  for name in named {
    headers.remove(name);
  }
  let keep_te_trailers = headers
    .get(TE)
    .and_then(|v| v.to_str().ok())
    .is_some_and(|v| {
      v.split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
    });
  for name in &HOP_BY_HOP {
    headers.remove(name);
  }
  if keep_te_trailers {
    headers.insert(TE, http::HeaderValue::from_static("trailers"));
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn removes_hop_by_hop_and_connection_named_headers() {
    let mut headers = HeaderMap::new();
    for (name, value) in [
      ("connection", "keep-alive, x-private"),
      ("keep-alive", "timeout=5"),
      ("x-private", "secret"),
      ("transfer-encoding", "chunked"),
      ("upgrade", "websocket"),
      ("te", "trailers, deflate"),
      ("host", "example.com"),
      ("x-kept", "yes"),
    ] {
      headers.append(HeaderName::from_static(name), value.parse().unwrap());
    }
    strip_request(&mut headers);
    let mut names: Vec<_> = headers.keys().map(|k| k.as_str().to_string()).collect();
    names.sort();
    assert_eq!(names, ["host", "te", "x-kept"]);
    assert_eq!(headers["te"], "trailers");
  }
}
