//! Egress policy: which hosts a function's outbound `fetch` may reach.
//!
//! Loopback, private, link-local, shared, multicast and metadata addresses are denied by
//! default. deno_fetch checks IP-literal URLs before connecting and every resolved address of
//! a host name before connecting to it, so a name that resolves (or re-resolves) into a
//! denied range is refused too. A function may narrow its reach with an `allow` list and add
//! a `deny` list; the operator switch `[egress] allow_private = true` lifts the default
//! denial (for tests against loopback upstreams). Between the two, the operator may name
//! private addresses in `[egress] private_allowed` that a function may then reach by listing
//! them (as addresses or CIDR blocks) in its own `allow` list: only that function, only
//! those addresses.

use std::sync::Arc;

use deno_permissions::{
  Host, NetDescriptor, NetDescriptorParseError, Permissions, PermissionsContainer,
  RuntimePermissionDescriptorParser,
};
use serde::Deserialize;

use crate::error::Error;

/// Address ranges no function may reach unless the operator allows private egress.
pub const PRIVATE_NETWORKS: [&str; 14] = [
  "0.0.0.0/8",
  "10.0.0.0/8",
  "100.64.0.0/10",
  "127.0.0.0/8",
  "169.254.0.0/16",
  "172.16.0.0/12",
  "192.168.0.0/16",
  "224.0.0.0/4",
  "240.0.0.0/4",
  "::/128",
  "::1/128",
  "fc00::/7",
  "fe80::/10",
  "ff00::/8",
];

/// Node-wide egress settings (`[egress]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeEgressConfig {
  /// Lets functions reach loopback and private addresses. For tests and trusted setups.
  pub allow_private: bool,
  /// Private addresses and CIDR blocks a function may reach when its own `allow` list
  /// names them.
  pub private_allowed: Vec<String>,
}

impl NodeEgressConfig {
  /// Every entry of `private_allowed` that is not an address or CIDR block.
  pub fn problems(&self) -> Vec<(String, String)> {
    self
      .private_allowed
      .iter()
      .enumerate()
      .filter(|(_, entry)| network(entry).is_none())
      .map(|(i, entry)| {
        (
          format!("private_allowed[{i}]"),
          format!("{entry:?} is not an IP address or CIDR block, e.g. \"10.1.0.0/16\""),
        )
      })
      .collect()
  }
}

/// A function's own lists (`egress = { allow = [...], deny = [...] }`): host names (with
/// `*.` for subdomains), IPs or CIDR blocks, each optionally with `:port`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
  /// When not empty, the only destinations the function may reach.
  pub allow: Vec<String>,
  pub deny: Vec<String>,
}

impl EgressConfig {
  /// Every entry that is not a valid destination, and every private address in `allow`
  /// that the node does not let functions reach, with the reason.
  pub fn problems(&self, node: &NodeEgressConfig) -> Vec<(String, String)> {
    let lists = [("allow", &self.allow), ("deny", &self.deny)];
    let mut problems: Vec<(String, String)> = lists
      .into_iter()
      .flat_map(|(list, entries)| entries.iter().enumerate().map(move |(i, e)| (list, i, e)))
      .filter_map(|(list, i, entry)| {
        destination(entry).err().map(|err| {
          (
            format!("{list}[{i}]"),
            format!("{entry:?} is not a host, host:port, IP or CIDR block ({err})"),
          )
        })
      })
      .collect();
    if !node.allow_private {
      let permitted: Vec<ipnet::IpNet> = node
        .private_allowed
        .iter()
        .filter_map(|e| network(e))
        .collect();
      for (i, entry) in self.allow.iter().enumerate() {
        let Some(wanted) = network(entry) else {
          continue;
        };
        let private = private_networks().any(|p| overlaps(&p, &wanted));
        if private && !permitted.iter().any(|p| p.contains(&wanted)) {
          problems.push((
            format!("allow[{i}]"),
            format!(
              "{entry:?} is a private address: a function may reach it only when the node's [egress] private_allowed includes it"
            ),
          ));
        }
      }
    }
    problems
  }
}

/// The resolved policy of one function on this node.
#[derive(Debug, Clone)]
pub struct EgressPolicy {
  allow: Vec<String>,
  deny: Vec<String>,
}

impl EgressPolicy {
  pub fn new(function: &EgressConfig, node: &NodeEgressConfig) -> EgressPolicy {
    let mut deny = function.deny.clone();
    if !node.allow_private {
      // The private ranges, less the private addresses this function lists in `allow` that
      // the node permits (deny lists win over allow lists, so they must be cut out).
      let permitted: Vec<ipnet::IpNet> = node
        .private_allowed
        .iter()
        .filter_map(|e| network(e))
        .collect();
      let opened: Vec<ipnet::IpNet> = function
        .allow
        .iter()
        .filter_map(|e| network(e))
        .filter(|wanted| permitted.iter().any(|p| p.contains(wanted)))
        .collect();
      for private in private_networks() {
        let mut left = vec![private];
        for hole in &opened {
          left = left.into_iter().flat_map(|n| subtract(n, *hole)).collect();
        }
        deny.extend(left.iter().map(ToString::to_string));
      }
    }
    EgressPolicy {
      allow: function.allow.clone(),
      deny,
    }
  }

  /// The permissions an isolate running the function gets: network access as this policy
  /// says, and nothing else (no files, environment, subprocesses, FFI or system info).
  pub fn permissions(&self) -> Result<PermissionsContainer, Error> {
    let parse = |entries: &[String]| {
      entries
        .iter()
        .map(|entry| destination(entry))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| Error::IsolateCreate(format!("egress policy: {err}")))
    };
    let mut permissions = Permissions::none_without_prompt();
    // deno_permissions reads an empty list as "every host": an empty allow list grants
    // every host (a non-empty one only those), so an empty deny list must be no list.
    let deny = if self.deny.is_empty() {
      None
    } else {
      Some(parse(&self.deny)?)
    };
    permissions.net = Permissions::new_unary(Some(parse(&self.allow)?), deny, false);
    let parser = Arc::new(RuntimePermissionDescriptorParser::new(
      sys_traits::impls::RealSys,
    ));
    Ok(PermissionsContainer::new(parser, permissions))
  }
}

fn private_networks() -> impl Iterator<Item = ipnet::IpNet> {
  PRIVATE_NETWORKS
    .iter()
    .map(|n| n.parse().expect("the private networks are CIDR blocks"))
}

/// The address or CIDR block an entry names (an address with a port names that address).
fn network(entry: &str) -> Option<ipnet::IpNet> {
  if let Ok(network) = entry.parse::<ipnet::IpNet>() {
    return Some(network);
  }
  let address = entry
    .parse::<std::net::IpAddr>()
    .ok()
    .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))?;
  Some(ipnet::IpNet::from(address))
}

fn overlaps(a: &ipnet::IpNet, b: &ipnet::IpNet) -> bool {
  a.contains(b) || b.contains(a)
}

/// `network` without `hole`: the blocks covering what is left.
fn subtract(network: ipnet::IpNet, hole: ipnet::IpNet) -> Vec<ipnet::IpNet> {
  if !overlaps(&network, &hole) {
    return vec![network];
  }
  if hole.contains(&network) {
    return Vec::new();
  }
  network
    .subnets(network.prefix_len() + 1)
    .map(|halves| halves.flat_map(|half| subtract(half, hole)).collect())
    .unwrap_or_default()
}

/// Parses one list entry. CIDR blocks are taken first: deno's host parser reads the first
/// `:` of an IPv6 block as a port separator.
fn destination(entry: &str) -> Result<NetDescriptor, NetDescriptorParseError> {
  match entry.parse::<ipnet::IpNet>() {
    Ok(network) => Ok(NetDescriptor(Host::IpSubnet(network), None)),
    Err(_) => NetDescriptor::parse_for_list(entry),
  }
}

impl Default for EgressPolicy {
  /// The policy of a function with no lists on a node with default settings.
  fn default() -> Self {
    EgressPolicy::new(&EgressConfig::default(), &NodeEgressConfig::default())
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn private_ranges_are_denied_by_default_and_listed_entries_are_validated() {
    let policy = EgressPolicy::default();
    assert!(policy.deny.iter().any(|d| d == "169.254.0.0/16"));
    let open = EgressPolicy::new(
      &EgressConfig::default(),
      &NodeEgressConfig {
        allow_private: true,
        ..NodeEgressConfig::default()
      },
    );
    assert!(open.deny.is_empty());
    let loopback = deno_core::url::Url::parse("http://127.0.0.1:8080/").unwrap();
    let mut permissions = open.permissions().unwrap();
    assert!(permissions.check_net_url(&loopback, "fetch()").is_ok());
    for entry in PRIVATE_NETWORKS {
      destination(entry).unwrap();
    }
    let config = EgressConfig {
      allow: vec![
        "api.example.com".into(),
        "*.example.org:443".into(),
        "10.1.0.0/16".into(),
      ],
      deny: vec!["not a host".into()],
    };
    let problems = config.problems(&NodeEgressConfig {
      allow_private: false,
      private_allowed: vec!["10.0.0.0/8".into()],
    });
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "deny[0]");
    policy.permissions().unwrap();
  }

  /// Checks decisions without any network traffic: these are the checks deno_fetch makes
  /// before connecting (URL) and after resolving a host name (each address).
  #[test]
  fn default_policy_denies_private_destinations_before_connecting() {
    let url = |u: &str| deno_core::url::Url::parse(u).unwrap();
    let mut permissions = EgressPolicy::default().permissions().unwrap();
    for denied in [
      "http://127.0.0.1:8080/",
      "http://10.0.0.1/",
      "http://169.254.169.254/latest/meta-data",
      "http://192.168.1.1/",
      "http://[::1]/",
      "http://[fd00::1]/",
      "http://[::ffff:127.0.0.1]/",
      // 0.0.0.0/8 reaches loopback on Linux.
      "http://0.0.0.0:8080/",
      "http://0.1.2.3/",
      // Carrier-grade NAT, the rest of RFC 1918, multicast and reserved ranges.
      "http://100.64.0.1/",
      "http://100.127.255.254/",
      "http://172.16.0.1/",
      "http://172.31.255.254/",
      "http://224.0.0.1/",
      "http://239.255.255.250/",
      "http://240.0.0.1/",
      "http://[fe80::1]/",
      "http://[ff02::1]/",
    ] {
      assert!(
        permissions.check_net_url(&url(denied), "fetch()").is_err(),
        "{denied}"
      );
    }
    assert!(
      permissions
        .check_net_url(&url("https://example.com/"), "fetch()")
        .is_ok()
    );
    let resolved: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    assert!(
      permissions
        .check_net_resolved(&resolved, 80, "fetch()")
        .is_err()
    );
    for resolved in ["0.0.0.0", "100.64.0.1", "172.20.0.1", "224.0.0.251"] {
      let resolved: std::net::IpAddr = resolved.parse().unwrap();
      assert!(
        permissions
          .check_net_resolved(&resolved, 80, "fetch()")
          .is_err(),
        "{resolved}"
      );
    }
    // Just outside the private ranges: allowed.
    for public in ["100.128.0.1", "172.32.0.1", "11.0.0.1"] {
      assert!(
        permissions
          .check_net_url(&url(&format!("http://{public}/")), "fetch()")
          .is_ok(),
        "{public}"
      );
    }
    let public: std::net::IpAddr = "93.184.215.14".parse().unwrap();
    assert!(
      permissions
        .check_net_resolved(&public, 443, "fetch()")
        .is_ok()
    );

    let function = EgressConfig {
      allow: vec!["api.example.com".into(), "*.example.org".into()],
      deny: vec!["bad.example.org".into()],
    };
    let mut permissions = EgressPolicy::new(&function, &NodeEgressConfig::default())
      .permissions()
      .unwrap();
    assert!(
      permissions
        .check_net_url(&url("https://api.example.com/x"), "fetch()")
        .is_ok()
    );
    assert!(
      permissions
        .check_net_url(&url("https://cdn.example.org/"), "fetch()")
        .is_ok()
    );
    assert!(
      permissions
        .check_net_url(&url("https://bad.example.org/"), "fetch()")
        .is_err()
    );
    assert!(
      permissions
        .check_net_url(&url("https://example.com/"), "fetch()")
        .is_err()
    );
  }

  /// A private address opens for one function only when the node permits it and the
  /// function lists it; the rest of its range stays closed.
  #[test]
  fn a_function_reaches_a_private_address_only_when_the_node_permits_it() {
    let url = |u: &str| deno_core::url::Url::parse(u).unwrap();
    let node = NodeEgressConfig {
      allow_private: false,
      private_allowed: vec!["10.1.0.0/16".into()],
    };
    let listing = EgressConfig {
      allow: vec!["10.1.2.3:8080".into(), "api.example.com".into()],
      deny: Vec::new(),
    };
    assert!(listing.problems(&node).is_empty());
    let mut permissions = EgressPolicy::new(&listing, &node).permissions().unwrap();
    assert!(
      permissions
        .check_net_url(&url("http://10.1.2.3:8080/"), "fetch()")
        .is_ok()
    );
    for closed in [
      "http://10.1.2.4:8080/",
      "http://10.0.0.1:8080/",
      "http://127.0.0.1:8080/",
    ] {
      assert!(
        permissions.check_net_url(&url(closed), "fetch()").is_err(),
        "{closed}"
      );
    }
    // Another function on the same node, not listing it, cannot reach it.
    let mut other = EgressPolicy::new(&EgressConfig::default(), &node)
      .permissions()
      .unwrap();
    assert!(
      other
        .check_net_url(&url("http://10.1.2.3:8080/"), "fetch()")
        .is_err()
    );
    // Listing one the node does not permit is a config error.
    let outside = EgressConfig {
      allow: vec!["192.168.1.1".into()],
      deny: Vec::new(),
    };
    let problems = outside.problems(&node);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].1.contains("private_allowed"), "{problems:?}");
    assert_eq!(
      subtract(
        "10.0.0.0/8".parse().unwrap(),
        "10.1.2.3/32".parse().unwrap()
      )
      .len(),
      24
    );
  }
}
