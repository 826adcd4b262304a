//! Client locations from MaxMind databases (`[geo] source = "maxmind"`): a City database
//! and optionally an ASN database, memory-mapped, read with the `maxminddb` crate.

use std::net::IpAddr;
use std::path::Path;

use maxminddb::{Mmap, Reader, geoip2};

/// The opened databases.
pub struct GeoDatabases {
  city: Reader<Mmap>,
  asn: Option<Reader<Mmap>>,
}

impl std::fmt::Debug for GeoDatabases {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    f.debug_struct("GeoDatabases")
      .field("city", &self.city.metadata().database_type)
      .field(
        "asn",
        &self.asn.as_ref().map(|a| &a.metadata().database_type),
      )
      .finish()
  }
}

fn open(path: &Path) -> Result<Reader<Mmap>, String> {
  // SAFETY: the file must not change while it is mapped. Databases are replaced the way
  // MaxMind's own updater does it, by writing a new file and renaming it over the old one,
  // which leaves this mapping on the old file.
  unsafe { Reader::open_mmap(path) }.map_err(|err| format!("cannot open {}: {err}", path.display()))
}

impl GeoDatabases {
  pub fn open(city: &Path, asn: Option<&Path>) -> Result<GeoDatabases, String> {
    Ok(GeoDatabases {
      city: open(city)?,
      asn: asn.map(open).transpose()?,
    })
  }

  /// `request.cf` fields for `ip`; empty where the databases know nothing of it.
  pub fn lookup(&self, ip: IpAddr) -> Vec<(&'static str, String)> {
    let mut fields = Vec::new();
    let city = self
      .city
      .lookup(ip)
      .ok()
      .and_then(|found| found.decode::<geoip2::City>().ok().flatten());
    if let Some(city) = city {
      let mut put = |name, value: Option<&str>| {
        if let Some(value) = value {
          fields.push((name, value.to_string()));
        }
      };
      put("country", city.country.iso_code);
      put("city", city.city.names.english);
      put("continent", city.continent.code);
      put("postalCode", city.postal.code);
      put("timezone", city.location.time_zone);
      if let Some(subdivision) = city.subdivisions.first() {
        put("region", subdivision.names.english);
        put("regionCode", subdivision.iso_code);
      }
      if let (Some(latitude), Some(longitude)) = (city.location.latitude, city.location.longitude) {
        fields.push(("latitude", latitude.to_string()));
        fields.push(("longitude", longitude.to_string()));
      }
    }
    let asn = self.asn.as_ref().and_then(|reader| {
      reader
        .lookup(ip)
        .ok()
        .and_then(|found| found.decode::<geoip2::Asn>().ok().flatten())
    });
    if let Some(asn) = asn {
      if let Some(number) = asn.autonomous_system_number {
        fields.push(("asn", number.to_string()));
      }
      if let Some(organization) = asn.autonomous_system_organization {
        fields.push(("asOrganization", organization.to_string()));
      }
    }
    fields
  }
}
