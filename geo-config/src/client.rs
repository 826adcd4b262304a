//! Where a client is (`[geo]`): its address and location, as handlers read them from
//! `request.cf`.
//!
//! The client address is the connecting peer's, unless that peer is a trusted proxy
//! (`trusted_peers`): then it is the rightmost address in `Forwarded` (or, without it,
//! `X-Forwarded-For`) that is not itself a trusted proxy. Geo headers (names configurable)
//! are believed only from trusted peers; from any other peer they are stripped before the
//! handler sees the request, so a client cannot claim to be elsewhere.

use std::net::IpAddr;

use std::sync::OnceLock;

use http::{HeaderMap, HeaderName};
use ipnet::IpNet;
use serde::Deserialize;

use crate::maxmind::GeoDatabases;

/// Where location data comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GeoSource {
  /// Headers set by a trusted upstream (CDN or load balancer).
  #[default]
  Headers,
  /// MaxMind City (and ASN) databases, looked up by the client address.
  Maxmind,
}

/// The `[geo]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeoConfig {
  pub source: GeoSource,
  /// The City database, for `source = "maxmind"` (relative to the config file).
  pub mmdb_city: Option<String>,
  /// The ASN database, optional with `source = "maxmind"`.
  pub mmdb_asn: Option<String>,
  /// Peers (CIDRs) whose forwarding and geo headers are believed.
  pub trusted_peers: Vec<IpNet>,
  pub country_header: String,
  pub region_header: String,
  pub region_code_header: String,
  pub city_header: String,
  pub postal_code_header: String,
  pub latitude_header: String,
  pub longitude_header: String,
  pub timezone_header: String,
  pub continent_header: String,
  pub asn_header: String,
  pub as_organization_header: String,
  /// Whether handlers see the client address as `request.cf.clientIp`.
  pub client_ip: bool,
  /// The geo header names, parsed once on first use.
  #[serde(skip)]
  parsed_headers: OnceLock<Vec<(&'static str, HeaderName)>>,
}

impl Default for GeoConfig {
  fn default() -> Self {
    let header = |name: &str| format!("x-client-{name}");
    GeoConfig {
      source: GeoSource::Headers,
      mmdb_city: None,
      mmdb_asn: None,
      trusted_peers: Vec::new(),
      country_header: header("country"),
      region_header: header("region"),
      region_code_header: header("region-code"),
      city_header: header("city"),
      postal_code_header: header("postal-code"),
      latitude_header: header("latitude"),
      longitude_header: header("longitude"),
      timezone_header: header("timezone"),
      continent_header: header("continent"),
      asn_header: header("asn"),
      as_organization_header: header("as-organization"),
      client_ip: true,
      parsed_headers: OnceLock::new(),
    }
  }
}

/// What is known of a request's client: `request.cf` fields by their Workers names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientGeo {
  pub fields: Vec<(&'static str, String)>,
}

impl GeoConfig {
  /// Every invalid setting, with the field.
  pub fn problems(&self) -> Vec<(&'static str, String)> {
    let mut problems: Vec<_> = self
      .headers()
      .into_iter()
      .filter(|(_, header)| http::HeaderName::from_bytes(header.as_bytes()).is_err())
      .map(|(field, header)| (field, format!("{header:?} is not a valid header name")))
      .collect();
    match self.source {
      GeoSource::Maxmind if self.mmdb_city.is_none() => problems.push((
        "mmdb_city",
        "source = \"maxmind\" needs mmdb_city = \"path/to/GeoLite2-City.mmdb\"".into(),
      )),
      GeoSource::Headers if self.mmdb_city.is_some() || self.mmdb_asn.is_some() => problems.push((
        "source",
        "mmdb_city/mmdb_asn are only read with source = \"maxmind\"".into(),
      )),
      _ => {}
    }
    problems
  }

  /// (`request.cf` field, header name) of every geo header.
  fn headers(&self) -> [(&'static str, &str); 11] {
    [
      ("country", &self.country_header),
      ("region", &self.region_header),
      ("regionCode", &self.region_code_header),
      ("city", &self.city_header),
      ("postalCode", &self.postal_code_header),
      ("latitude", &self.latitude_header),
      ("longitude", &self.longitude_header),
      ("timezone", &self.timezone_header),
      ("continent", &self.continent_header),
      ("asn", &self.asn_header),
      ("asOrganization", &self.as_organization_header),
    ]
  }

  /// The geo headers as header names (invalid ones, which validation reports, left out).
  fn header_names(&self) -> &[(&'static str, HeaderName)] {
    self.parsed_headers.get_or_init(|| {
      self
        .headers()
        .into_iter()
        .filter_map(|(field, header)| {
          Some((field, HeaderName::from_bytes(header.as_bytes()).ok()?))
        })
        .collect()
    })
  }

  pub fn is_trusted(&self, peer: IpAddr) -> bool {
    let peer = canonical(peer);
    self.trusted_peers.iter().any(|net| net.contains(&peer))
  }

  /// The client's address for a request from `peer` with `headers`.
  pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    if !self.is_trusted(peer) {
      return canonical(peer);
    }
    let forwarded = forwarded_for(headers);
    forwarded
      .iter()
      .rev()
      .copied()
      .find(|hop| !self.is_trusted(*hop))
      // Every hop is a trusted proxy: the leftmost is as far as the chain goes.
      .or_else(|| forwarded.first().copied())
      .unwrap_or(canonical(peer))
  }

  /// The client's location and address for a request from `peer`: from the geo headers
  /// of a trusted peer, or from `databases` (with `source = "maxmind"`). Strips geo headers
  /// from `headers` when the peer is not trusted.
  pub fn client(
    &self,
    peer: IpAddr,
    headers: &mut HeaderMap,
    databases: Option<&GeoDatabases>,
  ) -> ClientGeo {
    let trusted = self.is_trusted(peer);
    let mut geo = ClientGeo::default();
    let names = self.header_names();
    // From an untrusted peer, geo headers are removed; most requests carry none, which one
    // look at each of their headers tells (cheaper than a lookup of every geo header name).
    if !trusted
      && !headers
        .keys()
        .any(|name| names.iter().any(|(_, geo)| geo == name))
    {
      return self.client_without_headers(peer, headers, databases, geo);
    }
    for (field, header) in names {
      let field = *field;
      if !trusted {
        headers.remove(header);
        continue;
      }
      if self.source != GeoSource::Headers {
        continue;
      }
      if let Some(value) = headers.get(header).and_then(|v| v.to_str().ok()) {
        let value = value.trim();
        if !value.is_empty() {
          geo.fields.push((field, value.to_string()));
        }
      }
    }
    self.client_without_headers(peer, headers, databases, geo)
  }

  /// The rest of [`GeoConfig::client`] once the geo headers have been read or removed: the
  /// client's address, and what the databases know of it.
  fn client_without_headers(
    &self,
    peer: IpAddr,
    headers: &HeaderMap,
    databases: Option<&GeoDatabases>,
    mut geo: ClientGeo,
  ) -> ClientGeo {
    let client_ip = self.client_ip(peer, headers);
    if let (GeoSource::Maxmind, Some(databases)) = (self.source, databases) {
      geo.fields.extend(databases.lookup(client_ip));
    }
    if self.client_ip {
      geo.fields.push(("clientIp", client_ip.to_string()));
    }
    geo
  }
}

/// Every `request.cf` field Outpost fills (Workers names): the geo fields, the client's
/// address, and the PoP (`colo`, from `[node] pop`).
pub const REQUEST_CF_FIELDS: [&str; 13] = [
  "country",
  "region",
  "regionCode",
  "city",
  "postalCode",
  "latitude",
  "longitude",
  "timezone",
  "continent",
  "asn",
  "asOrganization",
  "clientIp",
  "colo",
];

/// IPv4-mapped IPv6 addresses as IPv4, so that `10.0.0.0/8` matches `::ffff:10.1.2.3`.
fn canonical(ip: IpAddr) -> IpAddr {
  match ip {
    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
    v4 => v4,
  }
}

/// The addresses a request passed through, client first: from `Forwarded` (`for=`), else
/// `X-Forwarded-For`. Entries that are not addresses (obfuscated ids, `unknown`) are skipped.
fn forwarded_for(headers: &HeaderMap) -> Vec<IpAddr> {
  let values = |name| {
    headers
      .get_all(name)
      .iter()
      .filter_map(|v| v.to_str().ok())
      .flat_map(|v| v.split(','))
      .map(str::trim)
      .collect::<Vec<_>>()
  };
  let forwarded: Vec<IpAddr> = values(http::header::FORWARDED)
    .into_iter()
    .flat_map(|element| element.split(';'))
    .filter_map(|pair| {
      let (name, value) = pair.split_once('=')?;
      name
        .trim()
        .eq_ignore_ascii_case("for")
        .then(|| value.trim())
    })
    .filter_map(parse_node)
    .collect();
  if !forwarded.is_empty() {
    return forwarded;
  }
  values(http::HeaderName::from_static("x-forwarded-for"))
    .into_iter()
    .filter_map(parse_node)
    .collect()
}

/// An address from a `Forwarded` node or an `X-Forwarded-For` entry: `1.2.3.4`,
/// `1.2.3.4:80`, `"[2001:db8::1]:80"`, `2001:db8::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
  let node = node.trim().trim_matches('"');
  if let Ok(ip) = node.parse::<IpAddr>() {
    return Some(canonical(ip));
  }
  if let Some(rest) = node.strip_prefix('[') {
    return rest.split(']').next()?.parse().ok().map(canonical);
  }
  let (host, _port) = node.rsplit_once(':')?;
  host.parse().ok().map(canonical)
}

#[cfg(test)]
mod tests {
  use super::*;

  fn config() -> GeoConfig {
    GeoConfig {
      trusted_peers: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
      ..GeoConfig::default()
    }
  }

  fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
      map.append(*name, value.parse().unwrap());
    }
    map
  }

  fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
  }

  #[test]
  fn forwarding_headers_count_only_from_trusted_peers() {
    let config = config();
    let spoofed = headers(&[("x-forwarded-for", "1.1.1.1")]);
    assert_eq!(
      config.client_ip(ip("203.0.113.9"), &spoofed),
      ip("203.0.113.9")
    );
    // From a trusted proxy: the rightmost hop that is not a trusted proxy.
    let chain = headers(&[("x-forwarded-for", "1.1.1.1, 198.51.100.7, 10.2.3.4")]);
    assert_eq!(config.client_ip(ip("10.0.0.1"), &chain), ip("198.51.100.7"));
    let forwarded = headers(&[(
      "forwarded",
      "for=\"[2001:db8::1]:443\";proto=https, for=10.9.9.9",
    )]);
    assert_eq!(
      config.client_ip(ip("::ffff:10.0.0.1"), &forwarded),
      ip("2001:db8::1")
    );
    assert_eq!(
      config.client_ip(ip("fd00::5"), &HeaderMap::new()),
      ip("fd00::5")
    );
  }

  #[test]
  fn geo_headers_are_read_from_trusted_peers_and_stripped_from_others() {
    let config = config();
    let sent = [
      ("x-client-country", "NL"),
      ("x-client-asn", "1136"),
      ("x-client-city", ""),
    ];
    let mut trusted = headers(&sent);
    let geo = config.client(ip("10.1.1.1"), &mut trusted, None);
    assert_eq!(
      geo.fields,
      [
        ("country", "NL".to_string()),
        ("asn", "1136".to_string()),
        ("clientIp", "10.1.1.1".to_string())
      ]
    );
    let mut untrusted = headers(&sent);
    let geo = config.client(ip("192.0.2.1"), &mut untrusted, None);
    assert_eq!(geo.fields, [("clientIp", "192.0.2.1".to_string())]);
    assert!(untrusted.is_empty(), "spoofed geo headers are stripped");
  }

  #[test]
  fn invalid_header_names_are_problems() {
    let config = GeoConfig {
      country_header: "x client".into(),
      ..GeoConfig::default()
    };
    assert_eq!(config.problems().len(), 1);
  }
}
