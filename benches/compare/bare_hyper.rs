//! The ceiling for `benches/compare/run.sh`: hyper on a multi-threaded tokio runtime serving
//! the three comparison endpoints with no JavaScript at all.
//!
//!   bare_hyper 127.0.0.1:PORT

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

type Body = BoxBody<Bytes, hyper::Error>;

/// 256 KiB in 16 chunks, as the JS handlers stream it.
const CHUNK: usize = 16 * 1024;
const CHUNKS: usize = 16;

async fn serve(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
  let full = |bytes: Bytes| Full::new(bytes).map_err(|never| match never {}).boxed();
  let response = match request.uri().path() {
    "/hello" => Response::new(full(Bytes::from_static(b"Hello, world!"))),
    "/echo" => {
      let body = request.into_body().collect().await.map(|b| b.to_bytes());
      // Parse and serialise again, as the JS handlers do.
      match body
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
      {
        Some(value) => Response::builder()
          .header("content-type", "application/json")
          .body(full(serde_json::to_vec(&value).unwrap_or_default().into()))
          .unwrap_or_default(),
        None => Response::builder()
          .status(400)
          .body(full(Bytes::new()))
          .unwrap_or_default(),
      }
    }
    "/stream" => {
      let chunk = Bytes::from(vec![b'x'; CHUNK]);
      let frames = futures::stream::iter(
        (0..CHUNKS).map(move |_| Ok::<_, hyper::Error>(Frame::data(chunk.clone()))),
      );
      Response::new(BodyExt::boxed(StreamBody::new(frames)))
    }
    _ => Response::builder()
      .status(404)
      .body(full(Bytes::new()))
      .unwrap_or_default(),
  };
  Ok(response)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
  let address = std::env::args()
    .nth(1)
    .unwrap_or_else(|| "127.0.0.1:8080".into());
  let listener = tokio::net::TcpListener::bind(&address).await?;
  loop {
    let (stream, _) = listener.accept().await?;
    tokio::spawn(async move {
      let service = hyper::service::service_fn(serve);
      let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
    });
  }
}
