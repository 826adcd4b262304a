//! Response compression: brotli or gzip by `Accept-Encoding`, streamed chunk by chunk.
//!
//! A response is compressed when the client accepts an encoding we have, its content type
//! is compressible, the function set no `Content-Encoding`, and it is not a 204/304/HEAD
//! response. Every eligible response gets `Vary: Accept-Encoding`, compressed or not, so
//! caches keep the variants apart.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, VARY};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use outpost_ext_dispatch::{Body, BoxError};

/// Brotli quality for dynamic responses: fast enough to stream, clearly smaller than gzip.
const BROTLI_QUALITY: u32 = 4;
const BROTLI_WINDOW: u32 = 22;
const GZIP_LEVEL: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
  Brotli,
  Gzip,
}

impl Encoding {
  fn token(self) -> &'static str {
    match self {
      Encoding::Brotli => "br",
      Encoding::Gzip => "gzip",
    }
  }
}

/// Picks the encoding from an `Accept-Encoding` value: the highest q-value wins, brotli
/// before gzip on a tie; `q=0` refuses an encoding, `*` stands for any not listed.
pub fn negotiate(accept_encoding: &HeaderMap) -> Option<Encoding> {
  let mut best: Option<(Encoding, f32)> = None;
  let (mut br, mut gzip, mut star) = (None, None, None);
  for value in accept_encoding.get_all(ACCEPT_ENCODING) {
    let Ok(value) = value.to_str() else { continue };
    for item in value.split(',') {
      let mut parts = item.split(';');
      let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
      let q = parts
        .filter_map(|p| {
          p.trim()
            .strip_prefix("q=")
            .and_then(|q| q.trim().parse::<f32>().ok())
        })
        .next()
        .unwrap_or(1.0);
      match coding.as_str() {
        "br" => br = Some(q),
        "gzip" | "x-gzip" => gzip = Some(q),
        "*" => star = Some(q),
        _ => {}
      }
    }
  }
  for (encoding, q) in [
    (Encoding::Brotli, br.or(star)),
    (Encoding::Gzip, gzip.or(star)),
  ] {
    if let Some(q) = q
      && q > 0.0
      && best.is_none_or(|(_, bq)| q > bq)
    {
      best = Some((encoding, q));
    }
  }
  best.map(|(encoding, _)| encoding)
}

fn is_compressible(content_type: &str) -> bool {
  let mime = content_type
    .split(';')
    .next()
    .unwrap_or("")
    .trim()
    .to_ascii_lowercase();
  mime.starts_with("text/")
    || mime.ends_with("+json")
    || mime.ends_with("+xml")
    || matches!(
      mime.as_str(),
      "application/json"
        | "application/javascript"
        | "application/x-javascript"
        | "application/xml"
        | "application/wasm"
        | "application/manifest+json"
        | "image/svg+xml"
    )
}

/// Compresses `response` in place with `encoding` (what [`negotiate`] chose for the
/// request) when it is eligible (see the module docs).
pub fn compress_response(response: &mut Response<Body>, encoding: Option<Encoding>, is_head: bool) {
  let headers = response.headers();
  let eligible = !headers.contains_key(CONTENT_ENCODING)
    && headers
      .get(CONTENT_TYPE)
      .and_then(|v| v.to_str().ok())
      .is_some_and(is_compressible)
    && !matches!(
      response.status(),
      StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
    )
    && !response.status().is_informational();
  if !eligible {
    return;
  }
  let headers = response.headers_mut();
  let already_varies = headers
    .get_all(VARY)
    .iter()
    .filter_map(|v| v.to_str().ok())
    .flat_map(|v| v.split(','))
    .any(|v| v.trim().eq_ignore_ascii_case("accept-encoding") || v.trim() == "*");
  if !already_varies {
    headers.append(VARY, HeaderValue::from_static("Accept-Encoding"));
  }
  let Some(encoding) = encoding else {
    return;
  };
  if is_head || response.body().is_end_stream() {
    return;
  }
  let headers = response.headers_mut();
  headers.remove(CONTENT_LENGTH);
  headers.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding.token()));
  let body = std::mem::replace(
    response.body_mut(),
    outpost_ext_dispatch::full_body(Bytes::new()),
  );
  *response.body_mut() = CompressedBody::new(body, encoding).boxed_unsync();
}

enum Encoder {
  Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
  Gzip(flate2::write::GzEncoder<Vec<u8>>),
}

impl Encoder {
  fn new(encoding: Encoding) -> Encoder {
    match encoding {
      Encoding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
        Vec::new(),
        16 * 1024,
        BROTLI_QUALITY,
        BROTLI_WINDOW,
      ))),
      Encoding::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::new(GZIP_LEVEL),
      )),
    }
  }

  /// Compresses a chunk and flushes, so what the handler streamed leaves without waiting.
  fn write(&mut self, data: &[u8]) -> std::io::Result<Bytes> {
    let output = match self {
      Encoder::Brotli(w) => {
        w.write_all(data)?;
        w.flush()?;
        w.get_mut()
      }
      Encoder::Gzip(w) => {
        w.write_all(data)?;
        w.flush()?;
        w.get_mut()
      }
    };
    Ok(Bytes::from(std::mem::take(output)))
  }

  fn finish(self) -> std::io::Result<Bytes> {
    Ok(Bytes::from(match self {
      Encoder::Brotli(w) => w.into_inner(),
      Encoder::Gzip(w) => w.finish()?,
    }))
  }
}

/// A body compressed on the fly as it streams.
struct CompressedBody {
  inner: Body,
  encoder: Option<Encoder>,
}

impl CompressedBody {
  fn new(inner: Body, encoding: Encoding) -> CompressedBody {
    CompressedBody {
      inner,
      encoder: Some(Encoder::new(encoding)),
    }
  }
}

impl http_body::Body for CompressedBody {
  type Data = Bytes;
  type Error = BoxError;

  fn poll_frame(
    self: Pin<&mut Self>,
    cx: &mut Context<'_>,
  ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    let this = self.get_mut();
    loop {
      let Some(encoder) = this.encoder.as_mut() else {
        return Poll::Ready(None);
      };
      match Pin::new(&mut this.inner).poll_frame(cx) {
        Poll::Pending => return Poll::Pending,
        Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
        Poll::Ready(Some(Ok(frame))) => {
          // Trailers cannot follow a compressed stream we have not finished; drop them.
          let Ok(data) = frame.into_data() else {
            continue;
          };
          match encoder.write(&data) {
            Ok(out) if out.is_empty() => continue,
            Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
            Err(err) => return Poll::Ready(Some(Err(err.into()))),
          }
        }
        Poll::Ready(None) => {
          let encoder = this.encoder.take().expect("checked above");
          return Poll::Ready(match encoder.finish() {
            Ok(out) if out.is_empty() => None,
            Ok(out) => Some(Ok(Frame::data(out))),
            Err(err) => Some(Err(err.into())),
          });
        }
      }
    }
  }

  fn is_end_stream(&self) -> bool {
    self.encoder.is_none()
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn accept(value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ACCEPT_ENCODING, value.parse().unwrap());
    h
  }

  #[test]
  fn negotiation_follows_q_values() {
    assert_eq!(
      negotiate(&accept("gzip, deflate, br")),
      Some(Encoding::Brotli)
    );
    assert_eq!(negotiate(&accept("gzip")), Some(Encoding::Gzip));
    assert_eq!(
      negotiate(&accept("br;q=0.5, gzip;q=0.8")),
      Some(Encoding::Gzip)
    );
    assert_eq!(negotiate(&accept("br;q=0, gzip;q=0")), None);
    assert_eq!(negotiate(&accept("*")), Some(Encoding::Brotli));
    assert_eq!(negotiate(&accept("identity")), None);
    assert_eq!(negotiate(&HeaderMap::new()), None);
  }

  #[test]
  fn compressible_types() {
    assert!(is_compressible("text/html; charset=utf-8"));
    assert!(is_compressible("application/json"));
    assert!(is_compressible("application/ld+json"));
    assert!(!is_compressible("image/png"));
    assert!(!is_compressible("application/octet-stream"));
  }
}
