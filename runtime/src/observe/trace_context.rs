//! W3C Trace Context (`traceparent`, `tracestate`). A request that arrives with a valid
//! `traceparent` continues that trace; any other starts a new one. Outpost is one hop of the
//! trace: it gets a span id of its own, and every `fetch()` the handler makes carries
//! `traceparent` = the trace id, Outpost's span id and the flags, plus the incoming
//! `tracestate`, unless the handler set those headers itself.

use http::HeaderMap;
use http::header::HeaderName;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// One request's place in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
  pub trace_id: [u8; 16],
  /// The span id of this hop: the parent of every outbound `fetch()`.
  pub span_id: [u8; 8],
  /// The caller's span, when the request continued a trace.
  pub parent: Option<[u8; 8]>,
  pub flags: u8,
  pub tracestate: Option<String>,
}

impl TraceContext {
  /// Continues the trace of `headers`' `traceparent` when it is valid, or starts one.
  pub fn from_headers(headers: &HeaderMap) -> TraceContext {
    let incoming = headers
      .get(TRACEPARENT)
      .and_then(|v| v.to_str().ok())
      .and_then(parse_traceparent);
    match incoming {
      Some((trace_id, parent, flags)) => TraceContext {
        trace_id,
        span_id: new_span_id(),
        parent: Some(parent),
        flags,
        // tracestate is only meaningful with the traceparent it came with.
        tracestate: headers
          .get(TRACESTATE)
          .and_then(|v| v.to_str().ok())
          .map(str::to_string),
      },
      None => TraceContext {
        trace_id: nonzero(rand::random),
        span_id: new_span_id(),
        parent: None,
        // A trace Outpost starts is sampled: its records are kept.
        flags: 0x01,
        tracestate: None,
      },
    }
  }

  /// The `traceparent` of this hop's outbound requests.
  pub fn outbound_traceparent(&self) -> String {
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
    // Each id fills exactly the digits between the dashes: these cannot fail.
    let _ = hex::encode_to_slice(self.trace_id, &mut text[3..35]);
    let _ = hex::encode_to_slice(self.span_id, &mut text[36..52]);
    let _ = hex::encode_to_slice([self.flags], &mut text[53..55]);
    String::from_utf8_lossy(&text).into_owned()
  }

  /// The trace id as 32 lowercase hex digits (kept inline: made for every access record).
  pub fn trace_id_hex(&self) -> TraceIdText {
    let mut text = [0u8; 32];
    let _ = hex::encode_to_slice(self.trace_id, &mut text);
    TraceIdText(text)
  }
}

/// A trace id as text: 32 lowercase hex digits.
pub struct TraceIdText([u8; 32]);

impl TraceIdText {
  pub fn as_str(&self) -> &str {
    // Hex digits only, by construction.
    std::str::from_utf8(&self.0).unwrap_or_default()
  }
}

fn new_span_id() -> [u8; 8] {
  nonzero(rand::random)
}

/// A random id that is not all zeros (which the spec reserves as invalid).
fn nonzero<const N: usize>(random: impl Fn() -> [u8; N]) -> [u8; N] {
  loop {
    let id = random();
    if id.iter().any(|b| *b != 0) {
      return id;
    }
  }
}

/// `version-traceid-parentid-flags`, lowercase hex. Version 00 must have exactly four
/// fields; later versions may append fields, which are ignored. Version ff and all-zero ids
/// are invalid.
fn parse_traceparent(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
  let mut fields = value.trim().split('-');
  let version = fields.next()?;
  let trace_id = fields.next()?;
  let parent_id = fields.next()?;
  let flags = fields.next()?;
  let version = decode::<1>(version)?[0];
  if version == 0xff || (version == 0 && fields.next().is_some()) {
    return None;
  }
  let trace_id = decode::<16>(trace_id)?;
  let parent_id = decode::<8>(parent_id)?;
  let flags = decode::<1>(flags)?[0];
  if trace_id.iter().all(|b| *b == 0) || parent_id.iter().all(|b| *b == 0) {
    return None;
  }
  Some((trace_id, parent_id, flags))
}

/// Exactly `2 * N` lowercase hex digits.
fn decode<const N: usize>(text: &str) -> Option<[u8; N]> {
  let digits = text.as_bytes();
  if digits.len() != 2 * N {
    return None;
  }
  let value = |d: u8| match d {
    b'0'..=b'9' => Some(d - b'0'),
    b'a'..=b'f' => Some(d - b'a' + 10),
    _ => None,
  };
  let mut out = [0u8; N];
  for (i, pair) in digits.chunks(2).enumerate() {
    out[i] = value(pair[0])? << 4 | value(pair[1])?;
  }
  Some(out)
}

#[cfg(test)]
mod tests {
  use super::*;

  fn headers(traceparent: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", traceparent.parse().unwrap());
    headers.insert("tracestate", "congo=t61rcWkgMzE".parse().unwrap());
    headers
  }

  #[test]
  fn a_valid_traceparent_is_continued_with_a_new_span() {
    let context = TraceContext::from_headers(&headers(
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ));
    assert_eq!(
      context.trace_id_hex().as_str(),
      "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(context.flags, 1);
    assert_eq!(context.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
    let outbound = context.outbound_traceparent();
    assert!(
      outbound.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
      "{outbound}"
    );
    assert!(!outbound.contains("00f067aa0ba902b7"), "{outbound}");
    assert!(outbound.ends_with("-01"), "{outbound}");
    // A later version with an extra field is read by its first four.
    let context = TraceContext::from_headers(&headers(
      "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra",
    ));
    assert_eq!(
      context.trace_id_hex().as_str(),
      "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(context.flags, 0);
  }

  #[test]
  fn invalid_traceparents_start_a_new_trace_without_their_tracestate() {
    for invalid in [
      "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
      "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
      "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
      "garbage",
    ] {
      let context = TraceContext::from_headers(&headers(invalid));
      assert_ne!(
        context.trace_id_hex().as_str(),
        "4bf92f3577b34da6a3ce929d0e0e4736",
        "{invalid}"
      );
      assert_eq!(context.tracestate, None, "{invalid}");
      assert_eq!(context.flags, 1);
      let outbound = context.outbound_traceparent();
      assert_eq!(
        parse_traceparent(&outbound).map(|(id, ..)| id),
        Some(context.trace_id)
      );
    }
    let a = TraceContext::from_headers(&HeaderMap::new());
    let b = TraceContext::from_headers(&HeaderMap::new());
    assert_ne!(a.trace_id, b.trace_id);
  }
}
