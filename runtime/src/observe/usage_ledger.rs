//! Usage per function (and per version, for deployed functions) for billing: requests, CPU
//! and wall time, egress bytes and subrequests, added up per minute and kept for a day. Read as JSON from the admin
//! listener (`GET /usage?since=<unix seconds>`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::metrics::FunctionIdentity;

/// Minutes kept.
const RETAINED_MINUTES: u64 = 24 * 60;
/// Minutes of traffic a new version of a function is warmed for ([`UsageLedger::recent`]).
const RECENT_MINUTES: u64 = 5;

/// A function's traffic over the last few minutes, as warming a new version of it sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct RecentTraffic {
  pub requests_per_second: f64,
  /// Requests in flight on average (wall time served per second).
  pub in_flight: f64,
}

/// One function's usage over a span of time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct UsageTotals {
  pub requests: u64,
  pub cpu_ms: f64,
  pub wall_ms: f64,
  pub egress_bytes: u64,
  pub subrequests: u64,
}

/// What one request used.
#[derive(Debug, Clone, Copy)]
pub struct RequestCost {
  pub cpu: Duration,
  pub wall: Duration,
  pub egress_bytes: u64,
  pub subrequests: u64,
}

impl UsageTotals {
  fn add(&mut self, cost: &RequestCost) {
    self.requests += 1;
    self.cpu_ms += cost.cpu.as_secs_f64() * 1e3;
    self.wall_ms += cost.wall.as_secs_f64() * 1e3;
    self.egress_bytes += cost.egress_bytes;
    self.subrequests += cost.subrequests;
  }

  fn merge(&mut self, other: &UsageTotals) {
    self.requests += other.requests;
    self.cpu_ms += other.cpu_ms;
    self.wall_ms += other.wall_ms;
    self.egress_bytes += other.egress_bytes;
    self.subrequests += other.subrequests;
  }
}

/// The answer to `GET /usage`.
#[derive(Debug, Serialize)]
pub struct UsageReport {
  /// Unix seconds: the start of the first minute counted.
  pub since: u64,
  /// Unix seconds: now.
  pub until: u64,
  pub functions: BTreeMap<String, FunctionUsage>,
}

/// One function's totals, and for a deployed function, each version's.
#[derive(Debug, Default, Serialize)]
pub struct FunctionUsage {
  #[serde(flatten)]
  pub totals: UsageTotals,
  #[serde(skip_serializing_if = "BTreeMap::is_empty")]
  pub versions: BTreeMap<String, UsageTotals>,
}

/// Totals per routed function (a function of the config file, or one deployed version), by
/// the address of its identity: a request adds to its minute with one integer lookup. The
/// map holds the identity, so the address is not reused while it is a key.
type MinuteTotals = HashMap<usize, FunctionMinute>;

/// One routed function's requests in one minute.
struct FunctionMinute {
  function: Arc<FunctionIdentity>,
  totals: UsageTotals,
  /// When its first request in the minute completed.
  first: SystemTime,
}

/// Per-minute totals per function.
#[derive(Default)]
pub struct UsageLedger {
  minutes: Mutex<VecDeque<(u64, MinuteTotals)>>,
  /// Recent traffic per function from before a restart, and when it was recorded: what
  /// warming goes by until the function has traffic in this process.
  earlier: Mutex<HashMap<String, (RecentTraffic, SystemTime)>>,
}

/// Recent traffic per function at a moment, as a node keeps it over a restart.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct TrafficRecord {
  /// Unix seconds.
  pub at: u64,
  pub functions: BTreeMap<String, RecentTraffic>,
}

fn unix_seconds(time: SystemTime) -> u64 {
  time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl UsageLedger {
  /// Adds one completed request of `function` at `at`.
  pub fn record(&self, function: &Arc<FunctionIdentity>, cost: &RequestCost, at: SystemTime) {
    let minute = unix_seconds(at) / 60;
    let mut minutes = self.minutes.lock().expect("usage lock");
    if minutes.back().is_none_or(|(last, _)| *last < minute) {
      minutes.push_back((minute, HashMap::new()));
    }
    while minutes
      .front()
      .is_some_and(|(first, _)| first + RETAINED_MINUTES <= minute)
    {
      minutes.pop_front();
    }
    // A request that completes a little out of order lands in the newest minute not after it.
    let slot = minutes
      .iter_mut()
      .rev()
      .find(|(m, _)| *m <= minute)
      .map(|(_, totals)| totals);
    if let Some(totals) = slot {
      totals
        .entry(Arc::as_ptr(function) as usize)
        .or_insert_with(|| FunctionMinute {
          function: function.clone(),
          totals: UsageTotals::default(),
          first: at,
        })
        .totals
        .add(cost);
    }
  }

  /// `name`'s traffic, all its versions together, over the last [`RECENT_MINUTES`] before
  /// `now`, counted from its first request in them (at least a second); `None` when it had
  /// none.
  /// Before the function has had traffic in this process, what [`UsageLedger::remember`]
  /// was given, while that is recent.
  pub fn recent(&self, name: &str, now: SystemTime) -> Option<RecentTraffic> {
    self.recorded(name, now).or_else(|| {
      let earlier = self.earlier.lock().expect("usage lock");
      let (traffic, at) = earlier.get(name)?;
      let age = now.duration_since(*at).unwrap_or_default();
      (age < Duration::from_secs(RECENT_MINUTES * 60)).then_some(*traffic)
    })
  }

  /// Every function's recent traffic now (for [`UsageLedger::remember`] after a restart).
  pub fn record_recent(&self, now: SystemTime) -> TrafficRecord {
    let names: std::collections::BTreeSet<String> = {
      let minutes = self.minutes.lock().expect("usage lock");
      minutes
        .iter()
        .flat_map(|(_, totals)| totals.values().map(|minute| minute.function.name.clone()))
        .collect()
    };
    TrafficRecord {
      at: unix_seconds(now),
      functions: names
        .into_iter()
        .filter_map(|name| Some((name.clone(), self.recorded(&name, now)?)))
        .collect(),
    }
  }

  /// Takes the recent traffic a previous process recorded.
  pub fn remember(&self, record: TrafficRecord) {
    let at = UNIX_EPOCH + Duration::from_secs(record.at);
    let mut earlier = self.earlier.lock().expect("usage lock");
    for (name, traffic) in record.functions {
      earlier.insert(name, (traffic, at));
    }
  }

  fn recorded(&self, name: &str, now: SystemTime) -> Option<RecentTraffic> {
    let minutes = self.minutes.lock().expect("usage lock");
    let current = unix_seconds(now) / 60;
    let (mut requests, mut wall_ms, mut first) = (0, 0.0, None::<SystemTime>);
    for (_, totals) in minutes.iter().filter(|(m, _)| m + RECENT_MINUTES > current) {
      for minute in totals.values() {
        if minute.function.name == name && minute.totals.requests > 0 {
          requests += minute.totals.requests;
          wall_ms += minute.totals.wall_ms;
          first = Some(first.map_or(minute.first, |first| first.min(minute.first)));
        }
      }
    }
    let seconds = now
      .duration_since(first?)
      .unwrap_or_default()
      .as_secs_f64()
      .max(1.0);
    Some(RecentTraffic {
      requests_per_second: requests as f64 / seconds,
      in_flight: wall_ms / 1e3 / seconds,
    })
  }

  /// Totals per function from the minute containing `since` (unix seconds) until `now`.
  /// Usage older than a day is gone: `since` is raised to the oldest minute kept.
  pub fn since(&self, since: u64, now: SystemTime) -> UsageReport {
    let minutes = self.minutes.lock().expect("usage lock");
    let oldest_kept = (unix_seconds(now) / 60).saturating_sub(RETAINED_MINUTES - 1) * 60;
    let since = (since / 60 * 60).max(oldest_kept);
    let mut functions = BTreeMap::<String, FunctionUsage>::new();
    for (_, totals) in minutes.iter().filter(|(m, _)| m * 60 >= since) {
      for FunctionMinute {
        function, totals, ..
      } in totals.values()
      {
        let entry = functions.entry(function.name.clone()).or_default();
        entry.totals.merge(totals);
        if let Some(version) = &function.version {
          entry
            .versions
            .entry(version.clone())
            .or_default()
            .merge(totals);
        }
      }
    }
    UsageReport {
      since,
      until: unix_seconds(now),
      functions,
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn cost(cpu_ms: u64) -> RequestCost {
    RequestCost {
      cpu: Duration::from_millis(cpu_ms),
      wall: Duration::from_millis(cpu_ms * 2),
      egress_bytes: 100,
      subrequests: 1,
    }
  }

  fn function(name: &str, version: Option<&str>) -> Arc<FunctionIdentity> {
    Arc::new(FunctionIdentity::new(
      name.to_string(),
      version.map(str::to_string),
    ))
  }

  #[test]
  fn totals_per_function_from_the_minute_of_since() {
    let ledger = UsageLedger::default();
    let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let a = function("a", None);
    ledger.record(&a, &cost(2), t0);
    ledger.record(
      &function("b", Some("v1")),
      &cost(5),
      t0 + Duration::from_secs(10),
    );
    ledger.record(&a, &cost(3), t0 + Duration::from_secs(120));
    // The same function routed anew (a reload): counted together by name.
    ledger.record(
      &function("a", None),
      &cost(4),
      t0 + Duration::from_secs(121),
    );
    let now = t0 + Duration::from_secs(130);

    let all = ledger.since(0, now);
    assert_eq!(all.functions["a"].totals.requests, 3);
    assert_eq!(all.functions["a"].totals.cpu_ms, 9.0);
    assert_eq!(all.functions["a"].totals.wall_ms, 18.0);
    assert_eq!(all.functions["a"].totals.egress_bytes, 300);
    assert_eq!(all.functions["b"].totals.subrequests, 1);
    assert_eq!(all.functions["b"].versions["v1"].requests, 1);
    assert!(all.functions["a"].versions.is_empty());

    // From the minute of t0 + 120 s: only the later request of "a".
    let later = ledger.since(unix_seconds(t0) + 125, now);
    assert_eq!(later.since, (unix_seconds(t0) + 120) / 60 * 60);
    assert_eq!(later.functions.len(), 1);
    assert_eq!(later.functions["a"].totals.cpu_ms, 7.0);
  }

  #[test]
  fn recent_traffic_is_the_last_minutes_of_one_function_per_second() {
    let ledger = UsageLedger::default();
    let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000 / 60 * 60);
    let (v1, v2) = (function("a", Some("v1")), function("a", Some("v2")));
    // Long ago: outside the window.
    ledger.record(&v1, &cost(1000), t0);
    let start = t0 + Duration::from_secs(3600);
    for second in 0..10 {
      ledger.record(&v1, &cost(50), start + Duration::from_secs(second));
      ledger.record(&v2, &cost(50), start + Duration::from_secs(second));
    }
    ledger.record(&function("b", None), &cost(1), start);
    let now = start + Duration::from_secs(20);
    let recent = ledger.recent("a", now).unwrap();
    // 20 requests of 100 ms wall time each in the 20 s since the first of them.
    assert_eq!(recent.requests_per_second, 1.0);
    assert!((recent.in_flight - 0.1).abs() < 1e-9, "{recent:?}");
    assert_eq!(ledger.recent("c", now), None);
    assert_eq!(ledger.recent("a", now + Duration::from_secs(3600)), None);
  }

  #[test]
  fn recent_traffic_outlives_a_restart_for_a_few_minutes() {
    let before = UsageLedger::default();
    let start = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    for second in 0..10 {
      before.record(
        &function("a", Some("v1")),
        &cost(50),
        start + Duration::from_secs(second),
      );
    }
    let stopped = start + Duration::from_secs(10);
    let record = before.record_recent(stopped);
    let text = serde_json::to_string(&record).unwrap();

    let after = UsageLedger::default();
    after.remember(serde_json::from_str(&text).unwrap());
    let restarted = stopped + Duration::from_secs(30);
    assert_eq!(after.recent("a", restarted), before.recent("a", stopped));
    assert!(after.recent("a", restarted).is_some());
    assert_eq!(
      after.recent("a", stopped + Duration::from_secs(RECENT_MINUTES * 60)),
      None
    );
    // Traffic in this process takes over.
    after.record(&function("a", Some("v2")), &cost(1), restarted);
    assert_eq!(
      after.recent("a", restarted).unwrap().requests_per_second,
      1.0
    );
  }

  #[test]
  fn a_day_is_kept() {
    let ledger = UsageLedger::default();
    let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    ledger.record(&function("old", None), &cost(1), t0);
    let next_day = t0 + Duration::from_secs(RETAINED_MINUTES * 60);
    ledger.record(&function("new", None), &cost(1), next_day);
    let report = ledger.since(0, next_day);
    assert!(!report.functions.contains_key("old"), "{report:?}");
    assert_eq!(report.functions["new"].totals.requests, 1);
  }
}
