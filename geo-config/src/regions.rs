//! The region hierarchy (`[[regions]]`): each region may name a parent, e.g. `eu` > `eu-west`;
//! PoPs sit in a region through `[node] region`.

use std::collections::HashMap;

use serde::Deserialize;

/// One `[[regions]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
  pub name: String,
  #[serde(default)]
  pub parent: Option<String>,
}

/// A problem with one `[[regions]]` entry, by its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionProblem {
  pub index: usize,
  pub field: &'static str,
  pub message: String,
}

/// The validated hierarchy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionTree {
  parents: HashMap<String, Option<String>>,
}

impl RegionTree {
  /// Builds the hierarchy; every problem at once (duplicate names, unknown parents, cycles).
  pub fn new(regions: &[RegionConfig]) -> Result<RegionTree, Vec<RegionProblem>> {
    let mut problems = Vec::new();
    let mut parents = HashMap::new();
    for (index, region) in regions.iter().enumerate() {
      if parents
        .insert(region.name.clone(), region.parent.clone())
        .is_some()
      {
        problems.push(RegionProblem {
          index,
          field: "name",
          message: format!("region {:?} is declared twice", region.name),
        });
      }
    }
    for (index, region) in regions.iter().enumerate() {
      if let Some(parent) = &region.parent
        && !parents.contains_key(parent)
      {
        problems.push(RegionProblem {
          index,
          field: "parent",
          message: format!(
            "region {:?} names parent {parent:?}, which is not declared in [[regions]]",
            region.name
          ),
        });
      }
    }
    let tree = RegionTree { parents };
    if problems.is_empty() {
      for (index, region) in regions.iter().enumerate() {
        if tree.ancestry(&region.name).is_none() {
          problems.push(RegionProblem {
            index,
            field: "parent",
            message: format!("region {:?} is its own ancestor (a cycle)", region.name),
          });
        }
      }
    }
    if problems.is_empty() {
      Ok(tree)
    } else {
      Err(problems)
    }
  }

  /// Whether no region is declared.
  pub fn is_empty(&self) -> bool {
    self.parents.is_empty()
  }

  pub fn contains(&self, region: &str) -> bool {
    self.parents.contains_key(region)
  }

  /// `region` and its ancestors, nearest first; `None` on a cycle. An undeclared region
  /// stands alone.
  pub fn ancestry<'a>(&'a self, region: &'a str) -> Option<Vec<&'a str>> {
    let mut chain = vec![region];
    let mut current = region;
    while let Some(Some(parent)) = self.parents.get(current) {
      if chain.contains(&parent.as_str()) {
        return None;
      }
      chain.push(parent);
      current = parent;
    }
    Some(chain)
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn region(name: &str, parent: Option<&str>) -> RegionConfig {
    RegionConfig {
      name: name.into(),
      parent: parent.map(Into::into),
    }
  }

  #[test]
  fn ancestry_runs_from_the_region_up() {
    let tree = RegionTree::new(&[
      region("eu", None),
      region("eu-west", Some("eu")),
      region("ams", Some("eu-west")),
    ])
    .unwrap();
    assert_eq!(tree.ancestry("ams").unwrap(), ["ams", "eu-west", "eu"]);
  }

  #[test]
  fn duplicates_unknown_parents_and_cycles_are_rejected() {
    let problems = RegionTree::new(&[
      region("eu", None),
      region("eu", None),
      region("x", Some("nope")),
    ])
    .unwrap_err();
    let found: Vec<_> = problems.iter().map(|p| (p.index, p.field)).collect();
    assert_eq!(found, [(1, "name"), (2, "parent")]);
    let problems = RegionTree::new(&[region("a", Some("b")), region("b", Some("a"))]).unwrap_err();
    assert_eq!(problems.len(), 2);
    assert!(problems[0].message.contains("cycle"));
  }
}
