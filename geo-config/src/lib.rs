//! `geo-config`: who this Outpost node is — its point of presence (PoP), region and place —
//! as read from the `[node]` table of `outpost.toml`; the region hierarchy (`[[regions]]`,
//! [`regions`]); per-function settings by PoP or region (`[[overrides]]`, [`overrides`]);
//! and where each request's client is (`[geo]`, [`client`], from headers or MaxMind
//! databases, [`maxmind`]). This crate has no V8
//! dependency; the runtime hands the identity to functions as `env.OUTPOST_POP` and
//! `env.OUTPOST_REGION`, and the client's place as `request.cf`.

pub mod client;
pub mod maxmind;
pub mod overrides;
pub mod regions;

use serde::Deserialize;

/// The `[node]` table: the identity of the PoP this node serves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeIdentity {
  /// PoP id, e.g. `ams1`: lowercase letters, digits and `-`.
  pub pop: String,
  /// Region name, e.g. `eu-west`.
  #[serde(default)]
  pub region: Option<String>,
  /// ISO 3166-1 alpha-2 country code, e.g. `NL`.
  #[serde(default)]
  pub country: Option<String>,
  #[serde(default)]
  pub city: Option<String>,
  #[serde(default)]
  pub latitude: Option<f64>,
  #[serde(default)]
  pub longitude: Option<f64>,
  /// Two-letter continent code: AF, AN, AS, EU, NA, OC or SA.
  #[serde(default)]
  pub continent: Option<String>,
  /// IANA time zone, e.g. `Europe/Amsterdam`.
  #[serde(default)]
  pub timezone: Option<String>,
}

/// One invalid field of a [`NodeIdentity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityProblem {
  pub field: &'static str,
  pub message: String,
}

const CONTINENTS: [&str; 7] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA"];

/// Names of the environment variables that carry the node identity into functions.
pub const ENV_POP: &str = "OUTPOST_POP";
pub const ENV_REGION: &str = "OUTPOST_REGION";

impl NodeIdentity {
  /// Every problem with the identity; empty when it is valid.
  pub fn problems(&self) -> Vec<IdentityProblem> {
    let mut problems = Vec::new();
    let mut problem = |field, message: String| problems.push(IdentityProblem { field, message });
    let is_id = |s: &str| {
      !s.is_empty()
        && s.len() <= 32
        && s
          .bytes()
          .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if !is_id(&self.pop) {
      problem(
        "pop",
        format!(
          "{:?} is not a PoP id: use 1-32 of a-z, 0-9 and '-', e.g. \"ams1\"",
          self.pop
        ),
      );
    }
    if let Some(region) = &self.region
      && !is_id(region)
    {
      problem(
        "region",
        format!("{region:?} is not a region name: use 1-32 of a-z, 0-9 and '-', e.g. \"eu-west\""),
      );
    }
    if let Some(country) = &self.country
      && !(country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase()))
    {
      problem(
        "country",
        format!("{country:?} is not an ISO 3166-1 alpha-2 code such as \"NL\""),
      );
    }
    if let Some(latitude) = self.latitude
      && !(-90.0..=90.0).contains(&latitude)
    {
      problem("latitude", format!("{latitude} is outside -90..=90"));
    }
    if let Some(longitude) = self.longitude
      && !(-180.0..=180.0).contains(&longitude)
    {
      problem("longitude", format!("{longitude} is outside -180..=180"));
    }
    if self.latitude.is_some() != self.longitude.is_some() {
      problem(
        "latitude",
        "give latitude and longitude together, or neither".into(),
      );
    }
    if let Some(continent) = &self.continent
      && !CONTINENTS.contains(&continent.as_str())
    {
      problem(
        "continent",
        format!("{continent:?} is not one of {}", CONTINENTS.join(", ")),
      );
    }
    problems
  }

  /// The variables every function's `env` receives from the node identity.
  pub fn env_vars(&self) -> Vec<(&'static str, String)> {
    let mut vars = vec![(ENV_POP, self.pop.clone())];
    if let Some(region) = &self.region {
      vars.push((ENV_REGION, region.clone()));
    }
    vars
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn parse(text: &str) -> NodeIdentity {
    toml::from_str(text).unwrap()
  }

  #[test]
  fn valid_identity_has_no_problems_and_exports_env() {
    let node = parse(
      "pop = \"ams1\"\nregion = \"eu-west\"\ncountry = \"NL\"\nlatitude = 52.37\nlongitude = 4.90\ncontinent = \"EU\"\n",
    );
    assert_eq!(node.problems(), []);
    assert_eq!(
      node.env_vars(),
      [
        (ENV_POP, "ams1".to_string()),
        (ENV_REGION, "eu-west".to_string())
      ]
    );
  }

  #[test]
  fn every_problem_is_reported() {
    let node = parse("pop = \"AMS 1\"\ncountry = \"nl\"\nlatitude = 95.0\ncontinent = \"XX\"\n");
    let fields: Vec<_> = node.problems().iter().map(|p| p.field).collect();
    assert_eq!(
      fields,
      ["pop", "country", "latitude", "latitude", "continent"]
    );
  }

  #[test]
  fn unknown_keys_are_rejected() {
    let err = toml::from_str::<NodeIdentity>("pop = \"ams1\"\nlat = 1.0\n").unwrap_err();
    assert!(err.message().contains("unknown field `lat`"), "{err}");
  }
}
