//! Client geolocation per request: reading a trusted upstream's geo headers, and looking an
//! address up in MaxMind City and ASN databases (built here, 1000 networks each).

use std::net::IpAddr;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use geo_config::client::{GeoConfig, GeoSource};
use geo_config::maxmind::GeoDatabases;
use maxminddb_writer::Database;
use maxminddb_writer::metadata::IpVersion;
use maxminddb_writer::paths::IpAddrWithMask;

fn write_database(path: &std::path::Path, kind: &str, record: serde_json::Value) {
  let mut db = Database::default();
  db.metadata.ip_version = IpVersion::V6;
  db.metadata.database_type = kind.into();
  db.metadata.languages = vec!["en".into()];
  db.metadata.binary_format_major_version = 2;
  let data = db.insert_value(record).unwrap();
  for i in 0..1000u32 {
    let [a, b, c, _] = (0x0A00_0000 + (i << 8)).to_be_bytes();
    let network = format!("::{a}.{b}.{c}.0/120");
    db.insert_node(network.parse::<IpAddrWithMask>().unwrap(), data);
  }
  let file = std::fs::File::create(path).unwrap();
  db.write_to(std::io::BufWriter::new(file)).unwrap();
}

fn benches(c: &mut Criterion) {
  let peer: IpAddr = "10.0.0.1".parse().unwrap();
  let mut headers_config = GeoConfig::default();
  headers_config.trusted_peers = vec!["10.0.0.0/8".parse().unwrap()];
  let mut headers = http::HeaderMap::new();
  for (name, value) in [
    ("x-client-country", "NL"),
    ("x-client-city", "Amsterdam"),
    ("x-client-asn", "1136"),
    ("x-forwarded-for", "198.51.100.7"),
  ] {
    headers.insert(name, value.parse().unwrap());
  }
  c.bench_function("geo_from_headers", |b| {
    b.iter_batched(
      || headers.clone(),
      |mut headers| headers_config.client(peer, &mut headers, None),
      BatchSize::SmallInput,
    )
  });

  let dir = tempfile::tempdir().unwrap();
  let city = dir.path().join("city.mmdb");
  let asn = dir.path().join("asn.mmdb");
  write_database(
    &city,
    "GeoLite2-City",
    serde_json::json!({
      "city": { "names": { "en": "Amsterdam" } },
      "country": { "iso_code": "NL" },
      "location": { "latitude": 52.37, "longitude": 4.89, "time_zone": "Europe/Amsterdam" },
    }),
  );
  write_database(
    &asn,
    "GeoLite2-ASN",
    serde_json::json!({ "autonomous_system_organization": "KPN B.V." }),
  );
  let databases = GeoDatabases::open(&city, Some(&asn)).unwrap();
  let mut maxmind_config = GeoConfig::default();
  maxmind_config.source = GeoSource::Maxmind;
  let client: IpAddr = "10.1.2.3".parse().unwrap();
  let empty = http::HeaderMap::new();
  assert!(
    databases.lookup(client).len() > 3,
    "the address is in the database"
  );
  c.bench_function("geo_from_maxmind", |b| {
    b.iter_batched(
      || empty.clone(),
      |mut headers| maxmind_config.client(client, &mut headers, Some(&databases)),
      BatchSize::SmallInput,
    )
  });
}

criterion_group! {
  name = geo;
  config = Criterion::default().sample_size(50);
  targets = benches
}
criterion_main!(geo);
