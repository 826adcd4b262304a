//! Shards: many functions on one shard, placement of hot and long-tail functions, requests
//! forwarded between shards, the slow lane for CPU-heavy functions, and drains, reloads and
//! deploys that reach every shard.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::deploy::{cli, function_dir};
use crate::support::{Outpost, functions_config, http1, scrape, scrape_until, value};

const ADMIN_AND_JSON_LOG: &str = "[admin]\naddress = \"127.0.0.1:0\"\n[log]\nformat = \"json\"";

/// Each isolate draws its own id when its module is evaluated; `?hold=MS` answers late.
const WHOAMI: &str = r#"
const isolate = crypto.randomUUID();
export default {
  async fetch(request) {
    const hold = Number(new URL(request.url).searchParams.get("hold") ?? 0);
    if (hold > 0) {
      console.log("holding");
      await new Promise((r) => setTimeout(r, hold));
    }
    return new Response(isolate);
  },
};
"#;

/// A client that opens a new connection for every request: the kernel spreads connections
/// over the shards' sockets, so a few dozen of them reach every shard.
fn new_connection_each_time() -> reqwest::Client {
  reqwest::Client::builder()
    .http1_only()
    .pool_max_idle_per_host(0)
    .build()
    .unwrap()
}

/// The access records written so far (the JSON log on stdout): request id → the record.
fn access_records(outpost: &Outpost) -> BTreeMap<String, serde_json::Value> {
  outpost
    .stdout()
    .lines()
    .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
    .filter(|record| record["target"] == "outpost::access")
    .map(|record| (record["request_id"].as_str().unwrap().to_string(), record))
    .collect()
}

/// The shards that took the requests of `function` so far, per its access records.
fn shards_that_took(outpost: &Outpost, function: &str) -> BTreeSet<u64> {
  access_records(outpost)
    .values()
    .filter(|record| record["function"] == function)
    .map(|record| {
      record["shard"]
        .as_u64()
        .expect("access records name the shard")
    })
    .collect()
}

/// GETs `path` on host `host`.
async fn send(
  client: &reqwest::Client,
  outpost: &Outpost,
  host: &str,
  path: &str,
) -> reqwest::Response {
  client
    .get(outpost.url(path))
    .header("host", host)
    .send()
    .await
    .unwrap()
}

/// GETs `path` on host `host`, which must answer 200; returns the body and the request id.
async fn get(
  client: &reqwest::Client,
  outpost: &Outpost,
  host: &str,
  path: &str,
) -> (String, String) {
  let response = send(client, outpost, host, path).await;
  assert_eq!(response.status(), 200, "{host}{path}");
  let id = response.headers()["outpost-request-id"]
    .to_str()
    .unwrap()
    .to_string();
  (response.text().await.unwrap(), id)
}

#[tokio::test]
async fn one_shard_serves_fifty_functions_on_a_handful_of_threads() {
  let files: Vec<(String, String)> = (0..50)
    .map(|i| {
      (
        format!("f{i}.js"),
        format!("export default {{ fetch: () => new Response('f{i}') }};"),
      )
    })
    .collect();
  let functions: Vec<(String, String, String)> = (0..50)
    .map(|i| {
      (
        format!("f{i}"),
        format!("f{i}.js"),
        format!("routes = [\"f{i}.test/\"]"),
      )
    })
    .collect();
  let functions: Vec<(&str, &str, &str)> = functions
    .iter()
    .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
    .collect();
  let files: Vec<(&str, &str)> = files
    .iter()
    .map(|(a, b)| (a.as_str(), b.as_str()))
    .collect();
  let outpost = Outpost::start_on_shards(
    1,
    &functions_config("[admin]\naddress = \"127.0.0.1:0\"", &functions),
    &files,
  );
  let client = http1();
  for _ in 0..2 {
    for i in 0..50 {
      let (body, _) = get(&client, &outpost, &format!("f{i}.test"), "/").await;
      assert_eq!(body, format!("f{i}"));
    }
  }
  let metrics = scrape(&outpost).await;
  for i in 0..50 {
    let function = format!("f{i}");
    assert_eq!(
      value(
        &metrics,
        "outpost_function_shards",
        &[("function", &function)]
      ),
      Some(1.0),
      "{function} has its isolate on the one shard"
    );
  }
  // Fifty functions' isolates share the shard's thread: no thread per isolate.
  let tasks = std::fs::read_dir(format!("/proc/{}/task", outpost.pid()))
    .unwrap()
    .map(|task| {
      std::fs::read_to_string(task.unwrap().path().join("comm"))
        .unwrap()
        .trim()
        .to_string()
    })
    .collect::<Vec<_>>();
  assert!(tasks.len() <= 1 + 8, "{} threads: {tasks:?}", tasks.len());
  assert_eq!(
    tasks
      .iter()
      .filter(|name| name.starts_with("shard-"))
      .count(),
    1,
    "{tasks:?}"
  );
}

#[tokio::test]
async fn a_request_for_a_function_on_another_shard_is_forwarded_there() {
  // On a loaded machine a debug build's entries can run past slow_lane_entry_ms and move the
  // function to the slow lane (a new isolate): this test is about forwarding, not lanes.
  let outpost = Outpost::start_on_shards(
    2,
    &functions_config(
      &format!("{ADMIN_AND_JSON_LOG}\n[server]\nslow_lane_entry_ms = 0"),
      &[(
        "single",
        "whoami.js",
        "routes = [\"/\"]\npool = { max_isolates = 1 }",
      )],
    ),
    &[("whoami.js", WHOAMI)],
  );
  let client = new_connection_each_time();
  let mut isolates = BTreeSet::new();
  for _ in 0..24 {
    isolates.insert(get(&client, &outpost, "any.test", "/").await.0);
  }
  assert_eq!(
    isolates.len(),
    1,
    "one isolate served all: {isolates:?}\n{}",
    outpost.logs()
  );
  assert_eq!(
    shards_that_took(&outpost, "single"),
    [0, 1].into(),
    "both shards took requests"
  );
  let metrics = scrape(&outpost).await;
  assert_eq!(
    value(
      &metrics,
      "outpost_function_shards",
      &[("function", "single")]
    ),
    Some(1.0)
  );
  let forwarded = value(&metrics, "outpost_forwarded_requests_total", &[]).unwrap();
  assert!(
    (1.0..24.0).contains(&forwarded),
    "the requests the other shard took were forwarded: {forwarded}"
  );
}

#[tokio::test]
async fn a_hot_function_spreads_to_every_shard_and_a_cold_one_stays_on_one() {
  let outpost = Outpost::start_on_shards(
    2,
    &functions_config(
      ADMIN_AND_JSON_LOG,
      &[
        ("hot", "whoami.js", "routes = [\"hot.test/\"]"),
        ("cold", "whoami.js", "routes = [\"cold.test/\"]"),
      ],
    ),
    &[("whoami.js", WHOAMI)],
  );
  // The long tail: a few requests a second, over new connections (so on both shards).
  let client = new_connection_each_time();
  for _ in 0..16 {
    get(&client, &outpost, "cold.test", "/").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
  }
  // Hot: hundreds a second, from four clients, for more than a second.
  let until = Instant::now() + Duration::from_millis(1500);
  let clients = (0..4).map(|_| {
    let client = new_connection_each_time();
    let outpost = &outpost;
    async move {
      while Instant::now() < until {
        get(&client, outpost, "hot.test", "/").await;
      }
    }
  });
  futures::future::join_all(clients).await;
  assert_eq!(shards_that_took(&outpost, "cold"), [0, 1].into());
  assert_eq!(shards_that_took(&outpost, "hot"), [0, 1].into());
  let metrics = scrape(&outpost).await;
  let shards = |function: &str| {
    value(
      &metrics,
      "outpost_function_shards",
      &[("function", function)],
    )
  };
  assert_eq!(
    shards("hot"),
    Some(2.0),
    "the hot function is on every shard"
  );
  assert_eq!(shards("cold"), Some(1.0), "the cold function stays on one");
}

/// A busy loop of `?ms=` milliseconds per request.
const HOG: &str = r#"
export default {
  fetch(request) {
    const ms = Number(new URL(request.url).searchParams.get("ms") ?? 10);
    if (ms > 100) console.log("hogging");
    const end = performance.now() + ms;
    while (performance.now() < end) {}
    return new Response("hog");
  },
};
"#;

/// One lane move, counted: `function` has left the shard, its neighbour is still there.
async fn assert_moved_to_the_slow_lane(outpost: &Outpost, function: &str) {
  let metrics = scrape_until(outpost, |metrics| {
    value(metrics, "outpost_lane_moves_total", &[]) == Some(1.0)
  })
  .await;
  assert_eq!(value(&metrics, "outpost_lane_moves_total", &[]), Some(1.0));
  assert_eq!(
    value(
      &metrics,
      "outpost_function_shards",
      &[("function", function)]
    ),
    Some(0.0),
    "{function} left the shard"
  );
  assert_eq!(
    value(
      &metrics,
      "outpost_function_shards",
      &[("function", "neighbour")]
    ),
    Some(1.0)
  );
}

// Multi-threaded: the hog's request runs on while the test waits for the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hog_moves_to_the_slow_lane_and_its_neighbour_keeps_answering_meanwhile() {
  let outpost = Outpost::start_on_shards(
    1,
    &functions_config(
      "[admin]\naddress = \"127.0.0.1:0\"",
      &[
        (
          "hog",
          "hog.js",
          "routes = [\"hog.test/\"]\nlimits = { cpu_ms = 10000 }",
        ),
        ("neighbour", "hello.js", "routes = [\"neighbour.test/\"]"),
      ],
    ),
    &[
      ("hog.js", HOG),
      (
        "hello.js",
        "export default { fetch: () => new Response('hello') };",
      ),
    ],
  );
  let client = http1();
  // Entries of 10 ms, past `server.slow_lane_entry_ms` (2 ms): the hog moves.
  for _ in 0..12 {
    assert_eq!(get(&client, &outpost, "hog.test", "/?ms=10").await.0, "hog");
  }
  outpost.wait_for_log("function moved to the slow lane");
  assert_moved_to_the_slow_lane(&outpost, "hog").await;

  // A three-second entry of the hog no longer holds the shard: the neighbour answers while
  // it runs.
  let hog = {
    let client = client.clone();
    let url = outpost.url("/?ms=3000");
    tokio::spawn(async move {
      let response = client
        .get(url)
        .header("host", "hog.test")
        .send()
        .await
        .unwrap();
      response.text().await.unwrap()
    })
  };
  outpost.wait_for_log("hogging");
  assert_eq!(
    get(&client, &outpost, "neighbour.test", "/").await.0,
    "hello"
  );
  assert!(
    !hog.is_finished(),
    "the neighbour answered while the hog ran"
  );
  assert_eq!(hog.await.unwrap(), "hog");
}

/// Killed at its CPU limit on the first request of a fresh isolate (never a warm-up entry),
/// a function leaves the shards at once instead of holding a shard for its whole limit on
/// every request.
#[tokio::test]
async fn a_function_killed_at_its_cpu_limit_moves_to_the_slow_lane() {
  let outpost = Outpost::start_on_shards(
    1,
    &functions_config(
      "[admin]\naddress = \"127.0.0.1:0\"",
      &[
        (
          "spin",
          "spin.js",
          "routes = [\"spin.test/\"]\nlimits = { cpu_ms = 20 }",
        ),
        ("neighbour", "hello.js", "routes = [\"neighbour.test/\"]"),
      ],
    ),
    &[
      ("spin.js", "export default { fetch() { for (;;) {} } };"),
      (
        "hello.js",
        "export default { fetch: () => new Response('hello') };",
      ),
    ],
  );
  let client = http1();
  let spin = || async {
    let response = send(&client, &outpost, "spin.test", "/").await;
    (
      response.status(),
      response.headers().get("outpost-termination").cloned(),
    )
  };
  let (status, termination) = spin().await;
  assert_eq!(status, 503);
  assert_eq!(
    termination.unwrap(),
    "cpu-limit",
    "the spin was killed at its limit"
  );
  outpost.wait_for_log("terminated at the CPU limit");
  assert_moved_to_the_slow_lane(&outpost, "spin").await;
  // Still limited in the slow lane.
  let (status, termination) = spin().await;
  assert_eq!(status, 503);
  assert_eq!(termination.unwrap(), "cpu-limit");
  assert_eq!(
    get(&client, &outpost, "neighbour.test", "/").await.0,
    "hello"
  );
}

#[tokio::test]
async fn sigterm_drains_the_requests_in_flight_on_every_shard() {
  let mut outpost = Outpost::start_on_shards(
    2,
    &functions_config(
      "[log]\nformat = \"json\"",
      &[("slow", "whoami.js", "routes = [\"/\"]")],
    ),
    &[("whoami.js", WHOAMI)],
  );
  let client = new_connection_each_time();
  let requests: Vec<_> = (0..16)
    .map(|_| {
      let request = client.get(outpost.url("/?hold=1500")).send();
      tokio::spawn(async move {
        let response = request.await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
      })
    })
    .collect();
  let deadline = Instant::now() + Duration::from_secs(10);
  while outpost.logs().matches("holding").count() < 16 {
    assert!(Instant::now() < deadline, "the requests never all arrived");
    tokio::time::sleep(Duration::from_millis(20)).await;
  }
  outpost.signal("TERM");
  for request in requests {
    let (status, _) = request.await.unwrap();
    assert_eq!(
      status, 200,
      "a request in flight was answered during the drain"
    );
  }
  assert!(outpost.wait_exit(Duration::from_secs(20)).success());
  assert_eq!(shards_that_took(&outpost, "slow"), [0, 1].into());
}

/// Requests sent to `host` and `path` until `stop`, over new connections from four clients: (when it
/// was sent, the body, the request id) of each, and the failures.
struct Load {
  seen: Arc<Mutex<Vec<(Instant, String, String)>>>,
  failures: Arc<Mutex<Vec<String>>>,
  stop: Arc<AtomicBool>,
  tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
  fn start(outpost: &Outpost, host: &'static str, path: &str) -> Load {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = (0..4)
      .map(|_| {
        let (seen, failures, stop, url) = (
          seen.clone(),
          failures.clone(),
          stop.clone(),
          outpost.url(path),
        );
        tokio::spawn(async move {
          let client = new_connection_each_time();
          while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            let outcome = match client.get(&url).header("host", host).send().await {
              Ok(response) if response.status() == 200 => {
                let id = response.headers()["outpost-request-id"]
                  .to_str()
                  .unwrap()
                  .to_string();
                response
                  .text()
                  .await
                  .map(|body| (body, id))
                  .map_err(|e| e.to_string())
              }
              Ok(response) => Err(format!("{} {:?}", response.status(), response.text().await)),
              Err(err) => Err(err.to_string()),
            };
            match outcome {
              Ok((body, id)) => seen.lock().unwrap().push((sent, body, id)),
              Err(err) => failures.lock().unwrap().push(err),
            }
          }
        })
      })
      .collect();
    Load {
      seen,
      failures,
      stop,
      tasks,
    }
  }

  /// Stops the load; the (sent, body, request id) of every answer.
  async fn stop(self) -> Vec<(Instant, String, String)> {
    self.stop.store(true, Ordering::Relaxed);
    for task in self.tasks {
      task.await.unwrap();
    }
    let failures = self.failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    self.seen.lock().unwrap().clone()
  }
}

/// The shards that answered requests sent from `after` on, and what they answered.
fn answers_after(
  outpost: &Outpost,
  seen: &[(Instant, String, String)],
  after: Instant,
) -> (BTreeSet<u64>, BTreeSet<String>) {
  // A record is written when its response body ends, which may be just after the client
  // has read it: wait until every answered request has one.
  let deadline = Instant::now() + Duration::from_secs(10);
  let records = loop {
    let records = access_records(outpost);
    let missing = seen
      .iter()
      .filter(|(_, _, id)| !records.contains_key(id))
      .count();
    if missing == 0 {
      break records;
    }
    assert!(
      Instant::now() < deadline,
      "{missing} answered requests have no access record"
    );
    std::thread::sleep(Duration::from_millis(20));
  };
  let later = seen.iter().filter(|(sent, _, _)| *sent >= after);
  let shards = later
    .clone()
    .map(|(_, _, id)| records[id]["shard"].as_u64().unwrap())
    .collect();
  (shards, later.map(|(_, body, _)| body.clone()).collect())
}

#[tokio::test]
async fn a_reload_and_a_deploy_switch_versions_on_every_shard_with_no_failed_request() {
  let data = tempfile::tempdir().unwrap();
  let config = |entry: &str| {
    functions_config(
      &format!(
        "[admin]\naddress = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[log]\nformat = \"json\"",
        data.path().display()
      ),
      &[("site", entry, "routes = [\"site.test/\"]")],
    )
  };
  let outpost = Outpost::start_on_shards(
    2,
    &config("v1.js"),
    &[
      (
        "v1.js",
        "export default { fetch: () => new Response('v1') };",
      ),
      (
        "v2.js",
        "export default { fetch: () => new Response('v2') };",
      ),
    ],
  );
  let admin = format!("http://{}", outpost.admin.unwrap());

  // A reload of the config file.
  let load = Load::start(&outpost, "site.test", "/");
  tokio::time::sleep(Duration::from_millis(500)).await;
  std::fs::write(outpost.dir().join("outpost.toml"), config("v2.js")).unwrap();
  let reload = http1()
    .post(format!("{admin}/reload"))
    .send()
    .await
    .unwrap();
  assert_eq!(reload.status(), 200);
  let reloaded = Instant::now();
  tokio::time::sleep(Duration::from_millis(700)).await;
  let seen = load.stop().await;
  let (shards, bodies) = answers_after(&outpost, &seen, Instant::now() - Duration::from_secs(3600));
  assert_eq!(shards, [0, 1].into(), "both shards served before and after");
  assert_eq!(bodies, ["v1".to_string(), "v2".to_string()].into());
  let (shards, bodies) = answers_after(&outpost, &seen, reloaded);
  assert_eq!(shards, [0, 1].into());
  assert_eq!(
    bodies,
    ["v2".to_string()].into(),
    "every shard serves the reloaded code"
  );

  // A deploy through the admin API.
  let v1 = function_dir(outpost.dir(), "d1", "d1");
  let v2 = function_dir(outpost.dir(), "d2", "d2");
  cli(&outpost, &["deploy", v1.to_str().unwrap(), "--name", "api"]).await;
  let load = Load::start(&outpost, "any.test", "/api/");
  tokio::time::sleep(Duration::from_millis(500)).await;
  cli(&outpost, &["deploy", v2.to_str().unwrap(), "--name", "api"]).await;
  let deployed = Instant::now();
  tokio::time::sleep(Duration::from_millis(700)).await;
  let seen = load.stop().await;
  let (shards, bodies) = answers_after(&outpost, &seen, Instant::now() - Duration::from_secs(3600));
  assert_eq!(shards, [0, 1].into());
  assert_eq!(bodies, ["d1".to_string(), "d2".to_string()].into());
  let (shards, bodies) = answers_after(&outpost, &seen, deployed);
  assert_eq!(shards, [0, 1].into());
  assert_eq!(
    bodies,
    ["d2".to_string()].into(),
    "every shard serves the new version"
  );
}
