//! Per-function settings by PoP or region (`[[overrides]]`).
//!
//! Precedence, most specific first: an override for this node's PoP, then one for its
//! region, then for each ancestor region in turn (nearest first), then the function's own
//! settings. Env vars merge key by key and limits field by field, the more specific value
//! winning; `enabled` comes from the most specific override that sets it. Two overrides of
//! one function at the same PoP or region are an error: which should win is not written
//! down anywhere.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::regions::RegionTree;

/// One `[[overrides]]` entry. `L` is the type of a `limits` table (the runtime's).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override<L> {
  /// The PoP it applies to; or
  #[serde(default)]
  pub pop: Option<String>,
  /// the region it applies to (and every region below it).
  #[serde(default)]
  pub region: Option<String>,
  /// The function it changes.
  pub function: String,
  #[serde(default)]
  pub env: BTreeMap<String, String>,
  #[serde(default)]
  pub limits: Option<L>,
  /// `false` switches the function's routes off here.
  #[serde(default)]
  pub enabled: Option<bool>,
  /// What a switched-off function answers here (default 404).
  #[serde(default)]
  pub disabled_status: Option<u16>,
}

/// A problem with one `[[overrides]]` entry, by its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideProblem {
  pub index: usize,
  pub field: &'static str,
  pub message: String,
}

/// The overrides that apply to one function on this node, merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied<'a, L> {
  pub env: BTreeMap<String, String>,
  /// Limits tables, least specific first: overlay them in this order.
  pub limits: Vec<&'a L>,
  pub enabled: bool,
  pub disabled_status: u16,
}

impl<L> Override<L> {
  fn scope(&self) -> String {
    match (&self.pop, &self.region) {
      (Some(pop), _) => format!("PoP {pop:?}"),
      (None, Some(region)) => format!("region {region:?}"),
      (None, None) => "nowhere".into(),
    }
  }

  /// How specific it is on a node at `pop` whose region ancestry is `ancestry` (nearest
  /// first): 0 for the PoP, 1 for the region, 2 for its parent...; `None` when it does not
  /// apply.
  fn rank(&self, pop: &str, ancestry: &[&str]) -> Option<usize> {
    match (&self.pop, &self.region) {
      (Some(p), _) => (p == pop).then_some(0),
      (None, Some(region)) => ancestry
        .iter()
        .position(|r| r == region)
        .map(|depth| depth + 1),
      (None, None) => None,
    }
  }
}

/// Every problem with `overrides`, all at once: each must name exactly one of `pop` or
/// `region`, a declared region, a configured function, and a 4xx/5xx `disabled_status`; no two
/// may set the same function at the same PoP or region.
pub fn problems<L>(
  overrides: &[Override<L>],
  regions: &RegionTree,
  functions: &[&str],
) -> Vec<OverrideProblem> {
  let mut problems = Vec::new();
  let mut problem = |index, field, message: String| {
    problems.push(OverrideProblem {
      index,
      field,
      message,
    })
  };
  for (index, entry) in overrides.iter().enumerate() {
    match (&entry.pop, &entry.region) {
      (Some(_), Some(_)) | (None, None) => problem(
        index,
        "pop",
        "name exactly one of pop = \"...\" or region = \"...\"".into(),
      ),
      (None, Some(region)) if !regions.contains(region) => problem(
        index,
        "region",
        format!("region {region:?} is not declared in [[regions]]"),
      ),
      _ => {}
    }
    if !functions.contains(&entry.function.as_str()) {
      problem(
        index,
        "function",
        format!(
          "no function is called {:?}; configured: {}",
          entry.function,
          functions.join(", ")
        ),
      );
    }
    if let Some(status) = entry.disabled_status
      && !(400..=599).contains(&status)
    {
      problem(
        index,
        "disabled_status",
        format!("{status} is not a 4xx or 5xx status"),
      );
    }
    let earlier = overrides[..index].iter().position(|other| {
      other.function == entry.function && other.pop == entry.pop && other.region == entry.region
    });
    if let Some(earlier) = earlier {
      problem(
        index,
        "function",
        format!(
          "overlaps overrides[{earlier}]: both set function {:?} at {}; merge them into one",
          entry.function,
          entry.scope()
        ),
      );
    }
  }
  problems
}

/// The overrides of `function` on a node at `pop` in `region`, merged by precedence.
pub fn apply<'a, L>(
  overrides: &'a [Override<L>],
  regions: &RegionTree,
  pop: &str,
  region: Option<&str>,
  function: &str,
) -> Applied<'a, L> {
  let ancestry = region
    .and_then(|region| regions.ancestry(region))
    .unwrap_or_default();
  let mut matching: Vec<(usize, &Override<L>)> = overrides
    .iter()
    .filter(|o| o.function == function)
    .filter_map(|o| Some((o.rank(pop, &ancestry)?, o)))
    .collect();
  // Least specific first, so that more specific values overwrite.
  matching.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
  let mut applied = Applied {
    env: BTreeMap::new(),
    limits: Vec::new(),
    enabled: true,
    disabled_status: 404,
  };
  for (_, entry) in matching {
    applied
      .env
      .extend(entry.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    applied.limits.extend(entry.limits.as_ref());
    if let Some(enabled) = entry.enabled {
      applied.enabled = enabled;
    }
    if let Some(status) = entry.disabled_status {
      applied.disabled_status = status;
    }
  }
  applied
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::regions::RegionConfig;

  fn tree() -> RegionTree {
    let region = |name: &str, parent: Option<&str>| RegionConfig {
      name: name.into(),
      parent: parent.map(Into::into),
    };
    RegionTree::new(&[region("eu", None), region("eu-west", Some("eu"))]).unwrap()
  }

  fn parse(text: &str) -> Vec<Override<u32>> {
    #[derive(Deserialize)]
    struct File {
      overrides: Vec<Override<u32>>,
    }
    toml::from_str::<File>(text).unwrap().overrides
  }

  #[test]
  fn the_pop_beats_the_region_which_beats_its_parent() {
    let overrides = parse(
      r#"
[[overrides]]
region = "eu"
function = "api"
env = { A = "eu", B = "eu", C = "eu" }
limits = 1
enabled = false

[[overrides]]
pop = "ams1"
function = "api"
env = { A = "ams1" }
limits = 3
enabled = true

[[overrides]]
region = "eu-west"
function = "api"
env = { A = "eu-west", B = "eu-west" }
limits = 2

[[overrides]]
pop = "fra1"
function = "api"
env = { A = "fra1" }
"#,
    );
    assert_eq!(problems(&overrides, &tree(), &["api"]), []);
    let applied = apply(&overrides, &tree(), "ams1", Some("eu-west"), "api");
    let env: Vec<_> = applied
      .env
      .iter()
      .map(|(k, v)| (k.as_str(), v.as_str()))
      .collect();
    assert_eq!(env, [("A", "ams1"), ("B", "eu-west"), ("C", "eu")]);
    assert_eq!(applied.limits, [&1, &2, &3]);
    assert!(applied.enabled);
    // Another PoP in the same region: the region's values; enabled from "eu".
    let applied = apply(&overrides, &tree(), "lon1", Some("eu-west"), "api");
    assert_eq!(applied.env["A"], "eu-west");
    assert!(!applied.enabled);
    // Another function: nothing applies.
    assert_eq!(
      apply(&overrides, &tree(), "ams1", Some("eu-west"), "web")
        .limits
        .len(),
      0
    );
  }

  #[test]
  fn every_problem_is_reported() {
    let overrides = parse(
      r#"
[[overrides]]
region = "us"
function = "api"

[[overrides]]
pop = "ams1"
region = "eu"
function = "nope"

[[overrides]]
pop = "ams1"
function = "api"
disabled_status = 200

[[overrides]]
pop = "ams1"
function = "api"
"#,
    );
    let found: Vec<_> = problems(&overrides, &tree(), &["api"])
      .into_iter()
      .map(|p| (p.index, p.field))
      .collect();
    assert_eq!(
      found,
      [
        (0, "region"),
        (1, "pop"),
        (1, "function"),
        (2, "disabled_status"),
        (3, "function")
      ]
    );
  }
}
