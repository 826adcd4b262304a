//! The PROXY protocol (v1 text, v2 binary) on listeners with `proxy_protocol = true`: the
//! load balancer in front of the node states the client's address before the connection's
//! first byte. The header is parsed by the `ppp` crate; a connection whose header is missing
//! or malformed is closed (and logged), never served with a guessed address.

use std::net::SocketAddr;

use ppp::{v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::error::Error;

/// The v2 signature, the first 12 bytes of a binary header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, `\r\n` included.
const V1_MAX: usize = 107;

/// Reads the PROXY header off `stream`, and no byte more. Returns the client address it
/// states, or `None` when it states none (v1 `UNKNOWN`, v2 `LOCAL` or a non-IP family): the
/// connection's own peer stands then.
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, Error> {
  let malformed = |reason: String| Error::ProxyHeader(reason);
  let mut header = vec![0u8; V2_SIGNATURE.len()];
  stream
    .read_exact(&mut header)
    .await
    .map_err(|err| malformed(format!("the connection ended before a PROXY header: {err}")))?;
  if header == V2_SIGNATURE {
    let mut fixed = [0u8; 4];
    stream
      .read_exact(&mut fixed)
      .await
      .map_err(|err| malformed(format!("truncated v2 header: {err}")))?;
    let length = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    header.extend_from_slice(&fixed);
    let start = header.len();
    header.resize(start + length, 0);
    stream
      .read_exact(&mut header[start..])
      .await
      .map_err(|err| malformed(format!("truncated v2 header: {err}")))?;
    let parsed = v2::Header::try_from(header.as_slice())
      .map_err(|err| malformed(format!("invalid v2 header: {err}")))?;
    if parsed.command == v2::Command::Local {
      return Ok(None);
    }
    return Ok(match parsed.addresses {
      v2::Addresses::IPv4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
      v2::Addresses::IPv6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
      v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    });
  }
  if !header.starts_with(b"PROXY ") {
    return Err(malformed(format!(
      "expected a PROXY header, got {:?}",
      String::from_utf8_lossy(&header)
    )));
  }
  while !header.ends_with(b"\r\n") {
    if header.len() >= V1_MAX {
      return Err(malformed(format!("v1 header longer than {V1_MAX} bytes")));
    }
    let byte = stream
      .read_u8()
      .await
      .map_err(|err| malformed(format!("truncated v1 header: {err}")))?;
    header.push(byte);
  }
  let parsed = v1::Header::try_from(header.as_slice())
    .map_err(|err| malformed(format!("invalid v1 header: {err}")))?;
  Ok(match parsed.addresses {
    v1::Addresses::Tcp4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
    v1::Addresses::Tcp6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
    v1::Addresses::Unknown => None,
  })
}
