//! Versioned deploys through the admin API and the CLI: hot swap under load, rollback,
//! canary splits, restarts and kill -9 in the middle of a deploy.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::{
  Outpost, SendForText, admin_post, functions_config, http1, run_outpost, scrape_until, value,
};

/// A node with the deploy API on, keeping deployments in `data` (outside its own temporary
/// directory, so a second node can be started on them).
fn node(data: &Path) -> Outpost {
  Outpost::start(
    &functions_config(
      &format!(
        "[admin]\naddress = \"127.0.0.1:0\"\ndata_dir = \"{}\"",
        data.display()
      ),
      &[("static", "static.js", r#"routes = ["static.test/"]"#)],
    ),
    &[(
      "static.js",
      "export default { fetch: () => new Response('static') };",
    )],
  )
}

/// A function directory answering `body`.
pub fn function_dir(root: &Path, name: &str, body: &str) -> std::path::PathBuf {
  let dir = root.join(name);
  std::fs::create_dir_all(&dir).unwrap();
  std::fs::write(
    dir.join("index.js"),
    format!("export default {{ fetch: () => new Response({body:?}) }};"),
  )
  .unwrap();
  dir
}

/// Runs an `outpost` admin command against `outpost`; returns its output, or panics.
pub async fn cli(outpost: &Outpost, args: &[&str]) -> String {
  let admin = format!("http://{}", outpost.admin.unwrap());
  let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
  full.extend(["--admin".to_string(), admin]);
  let cwd = outpost.dir().to_path_buf();
  let (status, output) = tokio::task::spawn_blocking(move || {
    let args: Vec<&str> = full.iter().map(String::as_str).collect();
    run_outpost(&args, &cwd)
  })
  .await
  .unwrap();
  assert!(status.success(), "outpost {args:?} failed: {output}");
  output
}

/// Runs an `outpost` admin command that must fail; returns its output.
async fn cli_fails(outpost: &Outpost, args: &[&str]) -> String {
  let admin = format!("http://{}", outpost.admin.unwrap());
  let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
  full.extend(["--admin".to_string(), admin]);
  let cwd = outpost.dir().to_path_buf();
  let (status, output) = tokio::task::spawn_blocking(move || {
    let args: Vec<&str> = full.iter().map(String::as_str).collect();
    run_outpost(&args, &cwd)
  })
  .await
  .unwrap();
  assert!(!status.success(), "outpost {args:?} succeeded: {output}");
  output
}

/// `/api/` until it answers `expected`.
async fn wait_for(outpost: &Outpost, expected: &str) {
  outpost
    .wait_for_text(
      "/api/",
      expected,
      &format!("/api/ never answered {expected:?}"),
    )
    .await;
}

fn version_of(output: &str) -> String {
  output
    .split("version ")
    .nth(1)
    .and_then(|rest| rest.split_whitespace().next())
    .unwrap_or_else(|| panic!("no version in {output:?}"))
    .to_string()
}

#[tokio::test]
async fn deploys_and_rollbacks_under_load_fail_no_request() {
  let data = tempfile::tempdir().unwrap();
  let outpost = Arc::new(node(data.path()));
  let v1 = function_dir(outpost.dir(), "v1", "v1");
  let v2 = function_dir(outpost.dir(), "v2", "v2");
  cli(&outpost, &["deploy", v1.to_str().unwrap(), "--name", "api"]).await;
  wait_for(&outpost, "v1").await;

  let stop = Arc::new(AtomicBool::new(false));
  let failures = Arc::new(AtomicUsize::new(0));
  // (when the request was sent, what answered it)
  let seen = Arc::new(std::sync::Mutex::new(Vec::<(Instant, String)>::new()));
  let mut load = Vec::new();
  for _ in 0..4 {
    let (stop, failures, seen, url) = (
      stop.clone(),
      failures.clone(),
      seen.clone(),
      outpost.url("/api/"),
    );
    load.push(tokio::spawn(async move {
      let client = http1();
      while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        match client.get(&url).send().await {
          Ok(response) if response.status() == 200 => match response.text().await {
            Ok(body) => seen.lock().unwrap().push((sent, body)),
            Err(err) => {
              eprintln!("failed body: {err:?}");
              failures.fetch_add(1, Ordering::Relaxed);
            }
          },
          other => {
            let what = match other {
              Ok(response) => format!("{} {:?}", response.status(), response.text().await),
              Err(err) => format!("{err:?}"),
            };
            eprintln!("failed request: {what}");
            failures.fetch_add(1, Ordering::Relaxed);
          }
        }
      }
    }));
  }
  tokio::time::sleep(Duration::from_millis(200)).await;
  let deployed = cli(&outpost, &["deploy", v2.to_str().unwrap(), "--name", "api"]).await;
  let v2_serving = Instant::now();
  assert!(deployed.contains("(new)"), "{deployed}");
  wait_for(&outpost, "v2").await;
  tokio::time::sleep(Duration::from_millis(200)).await;
  let rollback_started = Instant::now();
  let rolled = cli(&outpost, &["rollback", "api"]).await;
  let v1_serving = Instant::now();
  assert!(rolled.contains("now serves version"), "{rolled}");
  wait_for(&outpost, "v1").await;
  tokio::time::sleep(Duration::from_millis(200)).await;
  stop.store(true, Ordering::Relaxed);
  for task in load {
    task.await.unwrap();
  }
  assert_eq!(failures.load(Ordering::Relaxed), 0);
  // Once an activation has returned, every request sent after it is answered by the new
  // version: traffic moved in one step and never went back.
  let seen = seen.lock().unwrap().clone();
  let answers = |from: Instant, until: Instant| -> std::collections::BTreeSet<String> {
    seen
      .iter()
      .filter(|(sent, _)| *sent >= from && *sent < until)
      .map(|(_, body)| body.clone())
      .collect()
  };
  let far = Instant::now() + Duration::from_secs(3600);
  assert_eq!(
    answers(v2_serving, rollback_started),
    ["v2".to_string()].into()
  );
  assert_eq!(answers(v1_serving, far), ["v1".to_string()].into());
  assert!(seen.len() > 20, "{} requests", seen.len());

  let versions = cli(&outpost, &["versions", "api"]).await;
  assert_eq!(versions.lines().count(), 3, "{versions}");
  assert!(versions.contains("100%"), "{versions}");
}

#[tokio::test]
async fn a_ninety_ten_split_lands_within_tolerance_and_sticky_clients_stay() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let mut versions = Vec::new();
  for body in ["a", "b"] {
    let dir = function_dir(outpost.dir(), body, body);
    let deployed = cli(
      &outpost,
      &["deploy", dir.to_str().unwrap(), "--name", "api"],
    )
    .await;
    versions.push(version_of(&deployed));
  }
  let [a, b] = [&versions[0], &versions[1]];
  cli(
    &outpost,
    &["split", "api", &format!("{a}=90"), &format!("{b}=10")],
  )
  .await;
  let client = http1();
  let mut b_count = 0;
  for _ in 0..2000 {
    if client.get(outpost.url("/api/")).text_of().await == "b" {
      b_count += 1;
    }
  }
  // 10% of 2000 is 200; the binomial spread is about 13.
  assert!(
    (140..=260).contains(&b_count),
    "{b_count} of 2000 went to b"
  );
  // Usage and metrics are per version (read once the last request is accounted).
  let admin = format!("http://{}", outpost.admin.unwrap());
  let deadline = std::time::Instant::now() + Duration::from_secs(10);
  let usage = loop {
    let usage: serde_json::Value = client
      .get(format!("{admin}/usage"))
      .send()
      .await
      .unwrap()
      .json()
      .await
      .unwrap();
    if usage["functions"]["api"]["requests"] == 2000 || std::time::Instant::now() > deadline {
      break usage;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
  };
  let per_version = &usage["functions"]["api"]["versions"];
  assert_eq!(per_version[&b]["requests"], b_count, "{usage}");
  assert_eq!(per_version[&a]["requests"], 2000 - b_count, "{usage}");
  let metrics = client.get(format!("{admin}/metrics")).text_of().await;
  let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string()))).unwrap();
  let invocations = |version: &str| -> f64 {
    scrape
      .samples
      .iter()
      .filter(|s| s.metric == "outpost_invocations_total")
      .filter(|s| {
        s.labels.get("function") == Some("api")
          && s.labels.get("version") == Some(version)
          && s.labels.get("outcome") == Some("ok")
      })
      .map(|s| match s.value {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
        _ => 0.0,
      })
      .sum()
  };
  assert_eq!(invocations(b), f64::from(b_count), "{metrics}");
  assert_eq!(invocations(a), f64::from(2000 - b_count), "{metrics}");

  cli(
    &outpost,
    &[
      "split",
      "api",
      &format!("{a}=50"),
      &format!("{b}=50"),
      "--sticky-header",
      "x-user",
    ],
  )
  .await;
  for user in ["alice", "bob", "carol"] {
    let mut bodies = std::collections::BTreeSet::new();
    for _ in 0..30 {
      let response = client
        .get(outpost.url("/api/"))
        .header("x-user", user)
        .send()
        .await
        .unwrap();
      bodies.insert(response.text().await.unwrap());
    }
    assert_eq!(bodies.len(), 1, "{user} saw {bodies:?}");
  }
}

/// `outpost` is killed with -9 at several points of a deploy of v2 over a serving v1; each
/// restart must serve exactly one of the two, list only complete versions, and agree with
/// itself: the version listed at 100% is the one that answers.
#[tokio::test]
async fn kill_nine_during_a_deploy_restarts_consistent() {
  let data = tempfile::tempdir().unwrap();
  let work = tempfile::tempdir().unwrap();
  let v1 = function_dir(work.path(), "v1", "v1");
  {
    let outpost = node(data.path());
    cli(&outpost, &["deploy", v1.to_str().unwrap(), "--name", "api"]).await;
    wait_for(&outpost, "v1").await;
  }
  // Kill points: after fixed delays, and at the moment the upload's temporary directory
  // appears (mid-write) or the new version's directory appears (stored, not yet active).
  let points = [
    KillAt::Delay(50),
    KillAt::Delay(150),
    KillAt::Delay(300),
    KillAt::Delay(600),
    KillAt::Appears(".tmp-"),
    KillAt::Appears("stored"),
    KillAt::Activated,
    KillAt::Delay(1500),
  ];
  let mut outcomes = Vec::new();
  let mut serving_before = "v1".to_string();
  for (round, point) in points.into_iter().enumerate() {
    let outpost = node(data.path());
    // A bundle with a few MiB of data, so the upload takes a while.
    let v2 = function_dir(work.path(), &format!("v2-{round}"), &format!("v2-{round}"));
    std::fs::write(v2.join("padding.bin"), vec![round as u8; 4 << 20]).unwrap();
    let admin = format!("http://{}", outpost.admin.unwrap());
    let versions_dir = data.path().join("functions/api/versions");
    let before = std::fs::read_dir(&versions_dir)
      .unwrap()
      .filter_map(Result::ok)
      .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
      .count();
    let active_file = data.path().join("functions/api/active.json");
    let active_before = std::fs::read(&active_file).unwrap();
    let mut deploy = crate::support::outpost_command()
      .args([
        "deploy",
        v2.to_str().unwrap(),
        "--name",
        "api",
        "--admin",
        &admin,
      ])
      .stdout(std::process::Stdio::null())
      .stderr(std::process::Stdio::null())
      .spawn()
      .unwrap();
    match point {
      KillAt::Delay(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
      KillAt::Activated => {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::read(&active_file).unwrap() == active_before {
          assert!(
            std::time::Instant::now() < deadline,
            "round {round}: never activated"
          );
          std::thread::sleep(Duration::from_micros(200));
        }
      }
      KillAt::Appears(what) => {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
          let names: Vec<String> = std::fs::read_dir(&versions_dir)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
          let hit = match what {
            ".tmp-" => names.iter().any(|n| n.starts_with(".tmp-")),
            _ => names.iter().filter(|n| !n.starts_with(".tmp-")).count() > before,
          };
          if hit || std::time::Instant::now() > deadline {
            break;
          }
          std::thread::sleep(Duration::from_micros(200));
        }
      }
    }
    outpost.signal("KILL");
    let _ = deploy.wait();
    drop(outpost);

    let outpost = node(data.path());
    let answer = outpost.get_text("/api/").await;
    let versions: serde_json::Value = http1()
      .get(format!(
        "http://{}/functions/api/versions",
        outpost.admin.unwrap()
      ))
      .send()
      .await
      .unwrap()
      .json()
      .await
      .unwrap();
    let listed = versions["versions"].as_array().unwrap();
    outcomes.push((point, answer.clone(), listed.len()));
    eprintln!(
      "kill at {point:?}: serving {answer}, {} versions",
      listed.len()
    );
    let serving: Vec<&serde_json::Value> = listed.iter().filter(|v| v["weight"] == 100).collect();
    assert_eq!(serving.len(), 1, "round {round}: {versions}");
    assert!(
      answer == serving_before || answer == format!("v2-{round}"),
      "round {round}: answered {answer:?}, before the deploy {serving_before:?}"
    );
    // Every listed version is complete: each serves when activated.
    for version in listed {
      let version = version["version"].as_str().unwrap();
      cli(&outpost, &["rollback", "api", "--to", version]).await;
      let body = outpost.get_text("/api/").await;
      assert!(
        body == "v1" || body.starts_with("v2-"),
        "round {round}: {version} answered {body:?}"
      );
    }
    cli(
      &outpost,
      &[
        "rollback",
        "api",
        "--to",
        serving[0]["version"].as_str().unwrap(),
      ],
    )
    .await;
    let leftovers: Vec<_> = std::fs::read_dir(data.path().join("functions/api/versions"))
      .unwrap()
      .filter_map(Result::ok)
      .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
      .collect();
    assert!(leftovers.is_empty(), "round {round}: {leftovers:?}");
    serving_before = answer;
  }
  // Whatever the timing: a kill mid-upload loses the deploy, a kill once the activation is
  // recorded keeps it.
  for (round, (point, answer, _)) in outcomes.iter().enumerate() {
    let deployed = format!("v2-{round}");
    match point {
      KillAt::Appears(".tmp-") | KillAt::Appears("stored") => {
        assert_ne!(*answer, deployed, "{outcomes:?}")
      }
      KillAt::Activated => assert_eq!(*answer, deployed, "{outcomes:?}"),
      _ => {}
    }
  }
}

#[derive(Debug, Clone, Copy)]
enum KillAt {
  Delay(u64),
  /// A `.tmp-` directory, or ("stored") one more complete version than before the deploy.
  Appears(&'static str),
  /// `active.json` names the new version.
  Activated,
}

#[tokio::test]
async fn secrets_reach_env_and_never_the_logs_or_admin_answers() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let admin = format!("http://{}", outpost.admin.unwrap());
  let dir = outpost.dir().join("secretive");
  std::fs::create_dir_all(&dir).unwrap();
  std::fs::write(
    dir.join("manifest.json"),
    r#"{"entry": "index.js", "secrets": ["API_KEY"]}"#,
  )
  .unwrap();
  std::fs::write(
    dir.join("index.js"),
    r#"export default { async fetch(request, env, ctx) {
      console.log(`the key is ${env.API_KEY}`);
      ctx.waitUntil(Promise.reject(new Error(`waitUntil saw ${env.API_KEY}`)));
      if (new URL(request.url).pathname.endsWith("/throw")) throw new Error(`failed with ${env.API_KEY}`);
      return new Response(`length ${env.API_KEY.length}`);
    } };"#,
  )
  .unwrap();
  let deploy = || {
    let args = [
      "deploy",
      dir.to_str().unwrap(),
      "--name",
      "api",
      "--admin",
      &admin,
    ]
    .map(str::to_string);
    let cwd = outpost.dir().to_path_buf();
    move || {
      let args: Vec<&str> = args.iter().map(String::as_str).collect();
      run_outpost(&args, &cwd)
    }
  };
  // Not set yet: the version is stored but cannot serve.
  let (status, output) = tokio::task::spawn_blocking(deploy()).await.unwrap();
  assert!(
    !status.success() && output.contains("needs secret API_KEY"),
    "{output}"
  );

  let client = http1();
  let first = "s3cr3t-Zeta-9876";
  let response = client
    .put(format!("{admin}/functions/api/secrets/API_KEY"))
    .body(first)
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 200);
  let answer = response.text().await.unwrap();
  assert!(!answer.contains(first), "{answer}");
  let (status, output) = tokio::task::spawn_blocking(deploy()).await.unwrap();
  assert!(status.success(), "{output}");
  assert_eq!(outpost.get_text("/api/").await, "length 16");
  assert_eq!(
    http1()
      .get(outpost.url("/api/throw"))
      .send()
      .await
      .unwrap()
      .status(),
    500
  );

  // A new value restarts the serving version with it.
  let second = "n3w-Value-4321";
  client
    .put(format!("{admin}/functions/api/secrets/API_KEY"))
    .body(second)
    .send()
    .await
    .unwrap();
  outpost
    .wait_for_text("/api/", "length 14", "the new secret never served")
    .await;

  let names = client
    .get(format!("{admin}/functions/api/secrets"))
    .send()
    .await
    .unwrap();
  assert_eq!(
    names.json::<serde_json::Value>().await.unwrap()["secrets"],
    serde_json::json!(["API_KEY"])
  );
  for path in [
    "/functions",
    "/functions/api/versions",
    "/metrics",
    "/usage",
  ] {
    let text = client.get(format!("{admin}{path}")).text_of().await;
    assert!(
      !text.contains(first) && !text.contains(second),
      "{path}: {text}"
    );
  }
  let logs = outpost.wait_for_log("waitUntil saw [redacted]");
  assert!(logs.contains("the key is [redacted]"), "{logs}");
  assert!(logs.contains("failed with [redacted]"), "{logs}");
  assert!(!logs.contains(first) && !logs.contains(second), "{logs}");

  use std::os::unix::fs::PermissionsExt;
  let mode = std::fs::metadata(data.path().join("functions/api/secrets.json"))
    .unwrap()
    .permissions()
    .mode();
  assert_eq!(mode & 0o777, 0o600);
  let bad = client
    .put(format!("{admin}/functions/api/secrets/lower-case"))
    .body("x")
    .send()
    .await
    .unwrap();
  assert_eq!(bad.status(), 400);
}

/// Off loopback the admin API needs a token: a config without one does not start, and with
/// one every request but the health checks must carry it.
#[tokio::test]
async fn off_loopback_the_admin_api_refuses_requests_without_the_token() {
  let data = tempfile::tempdir().unwrap();
  let config = |token: &str| {
    functions_config(
      &format!(
        "[admin]\naddress = \"0.0.0.0:0\"\n{token}data_dir = \"{}\"",
        data.path().display()
      ),
      &[("static", "static.js", r#"routes = ["static.test/"]"#)],
    )
  };
  let dir = tempfile::tempdir().unwrap();
  std::fs::write(
    dir.path().join("static.js"),
    "export default { fetch: () => new Response('s') };",
  )
  .unwrap();
  std::fs::write(dir.path().join("outpost.toml"), config("")).unwrap();
  let (status, output) = run_outpost(&["check", "--config", "outpost.toml"], dir.path());
  assert!(
    !status.success() && output.contains("admin.token"),
    "{output}"
  );

  let outpost = Outpost::start(
    &config("token = \"t0ken\"\n"),
    &[(
      "static.js",
      "export default { fetch: () => new Response('s') };",
    )],
  );
  // Reached over loopback, but bound to every address.
  let admin = format!("http://127.0.0.1:{}", outpost.admin.unwrap().port());
  for path in ["/functions", "/metrics", "/usage", "/cache/stats"] {
    let response = http1().get(format!("{admin}{path}")).send().await.unwrap();
    assert_eq!(response.status(), 401, "{path}");
  }
  let response = http1()
    .put(format!("{admin}/functions/api"))
    .body("x")
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 401);
  assert_eq!(
    http1()
      .get(format!("{admin}/healthz"))
      .send()
      .await
      .unwrap()
      .status(),
    200
  );
  let response = http1()
    .get(format!("{admin}/functions"))
    .bearer_auth("t0ken")
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 200);
}

/// An upload whose module does not load is refused and not kept: it is not listed, and a
/// rollback goes back to the version that served before, never to it.
#[tokio::test]
async fn a_refused_upload_is_not_kept_and_rollback_returns_to_what_served() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let v1 = function_dir(outpost.dir(), "v1", "v1");
  let v2 = function_dir(outpost.dir(), "v2", "v2");
  let broken = outpost.dir().join("broken");
  std::fs::create_dir_all(&broken).unwrap();
  std::fs::write(
    broken.join("index.js"),
    "export default { fetch() { return new Response('x'; } };",
  )
  .unwrap();
  cli(&outpost, &["deploy", v1.to_str().unwrap(), "--name", "api"]).await;
  cli(&outpost, &["deploy", v2.to_str().unwrap(), "--name", "api"]).await;
  wait_for(&outpost, "v2").await;
  let refused = cli_fails(
    &outpost,
    &["deploy", broken.to_str().unwrap(), "--name", "api"],
  )
  .await;
  assert!(
    refused.contains("422") && refused.contains("does not load"),
    "{refused}"
  );
  // Not stored: a plain upload (no activation) is refused the same way.
  let response = http1()
    .put(format!("http://{}/functions/api", outpost.admin.unwrap()))
    .body(bundle_of(&broken))
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 422);
  let versions = cli(&outpost, &["versions", "api"]).await;
  assert_eq!(
    versions.lines().count(),
    3,
    "header, v1 and v2 only:\n{versions}"
  );
  assert!(versions.contains("GMT"), "times are readable: {versions}");
  assert_eq!(outpost.get_text("/api/").await, "v2");

  let rolled = cli(&outpost, &["rollback", "api"]).await;
  assert!(rolled.contains("now serves version"), "{rolled}");
  wait_for(&outpost, "v1").await;
  // Again: back to what served before, v2.
  cli(&outpost, &["rollback", "api"]).await;
  wait_for(&outpost, "v2").await;
}

/// The tar `outpost deploy` would upload for `dir` (an index.js and a manifest naming it).
fn bundle_of(dir: &Path) -> Vec<u8> {
  let mut builder = tar::Builder::new(Vec::new());
  builder.append_dir_all(".", dir).unwrap();
  let manifest = br#"{"entry": "index.js"}"#;
  let mut header = tar::Header::new_gnu();
  header.set_size(manifest.len() as u64);
  header.set_mode(0o644);
  header.set_cksum();
  builder
    .append_data(&mut header, "manifest.json", &manifest[..])
    .unwrap();
  builder.into_inner().unwrap()
}

/// Split weights are percentages: they must add up to 100.
#[tokio::test]
async fn split_weights_must_add_up_to_one_hundred() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let mut versions = Vec::new();
  for body in ["a", "b"] {
    let dir = function_dir(outpost.dir(), body, body);
    let deployed = cli(
      &outpost,
      &["deploy", dir.to_str().unwrap(), "--name", "api"],
    )
    .await;
    versions.push(version_of(&deployed));
  }
  let [a, b] = [&versions[0], &versions[1]];
  for weights in [
    vec![format!("{a}=60"), format!("{b}=50")],
    vec![format!("{a}=101")],
  ] {
    let mut args = vec!["split", "api"];
    args.extend(weights.iter().map(String::as_str));
    let output = cli_fails(&outpost, &args).await;
    assert!(output.contains("must add up to 100"), "{output}");
  }
  let output = cli(
    &outpost,
    &["split", "api", &format!("{a}=70"), &format!("{b}=30")],
  )
  .await;
  assert!(
    output.contains(&format!("version {a} 70%")) && output.contains(&format!("version {b} 30%")),
    "{output}"
  );
}

/// A deployed route that a configured route takes entirely is reported with the deploy: the
/// version would serve nothing through it.
#[tokio::test]
async fn a_deploy_whose_route_a_configured_route_shadows_is_warned_about() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let dir = function_dir(outpost.dir(), "hidden", "hidden");
  std::fs::write(
    dir.join("manifest.json"),
    r#"{"entry": "index.js", "routes": ["static.test/docs/", "other.test/"]}"#,
  )
  .unwrap();
  let output = cli(
    &outpost,
    &["deploy", dir.to_str().unwrap(), "--name", "docs"],
  )
  .await;
  let warnings: Vec<&str> = output
    .lines()
    .filter(|l| l.starts_with("warning:"))
    .collect();
  assert_eq!(warnings.len(), 1, "{output}");
  assert!(
    warnings[0].contains("\"static.test/docs/\" is shadowed by route \"static.test/\" of configured function \"static\""),
    "{output}"
  );
  // The route no configured route covers serves.
  let response = http1()
    .get(outpost.url("/"))
    .header("host", "other.test")
    .send()
    .await
    .unwrap();
  assert_eq!(response.text().await.unwrap(), "hidden");
}

/// One rule for function names, config file and deploy API alike, with one error text.
#[tokio::test]
async fn function_names_follow_one_rule_in_the_config_and_the_deploy_api() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let long = "a".repeat(64);
  for name in ["my_fn", long.as_str(), "-api"] {
    let response = http1()
      .put(format!(
        "http://{}/functions/{name}",
        outpost.admin.unwrap()
      ))
      .body("x")
      .send()
      .await
      .unwrap();
    assert_eq!(response.status(), 400, "{name}");
    let error = response.text().await.unwrap();
    assert!(
      error.contains("is not a valid function name: use 1 to 63 of a-z, 0-9 and -"),
      "{error}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f.js"), "export default {};").unwrap();
    std::fs::write(
      dir.path().join("outpost.toml"),
      functions_config("", &[(name, "f.js", r#"routes = ["/"]"#)]),
    )
    .unwrap();
    let (status, output) = run_outpost(&["check", "--config", "outpost.toml"], dir.path());
    assert!(!status.success());
    assert!(
      output.contains("is not a valid function name: use 1 to 63 of a-z, 0-9 and -"),
      "{output}"
    );
  }
}

/// The config file wins: a deployed function may not take a configured one's name, and a
/// configured route is matched before a deployed one.
#[tokio::test]
async fn the_config_file_wins_names_and_routes() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let admin = format!("http://{}", outpost.admin.unwrap());
  let dir = function_dir(outpost.dir(), "clash", "deployed");
  let response = http1()
    .put(format!("{admin}/functions/static?activate=true"))
    .body(bundle_of(&dir))
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 409);
  assert!(response.text().await.unwrap().contains("config file"));
  std::fs::write(
    dir.join("manifest.json"),
    r#"{"entry": "index.js", "routes": ["static.test/", "deployed.test/"]}"#,
  )
  .unwrap();
  cli(
    &outpost,
    &["deploy", dir.to_str().unwrap(), "--name", "mine"],
  )
  .await;
  let get = |host: &'static str| {
    let url = outpost.url("/");
    async move {
      http1()
        .get(url)
        .header("host", host)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
    }
  };
  assert_eq!(get("static.test").await, "static");
  assert_eq!(get("deployed.test").await, "deployed");
}

/// `DELETE /functions/{name}` (and `outpost delete`) stops serving a function and removes it;
/// a deleted secret is gone from the list, and a version that needs it no longer starts.
/// `concurrency` GETs of `path` at once, all answered.
async fn at_once(outpost: &Outpost, path: &str, concurrency: usize) {
  let client = http1();
  let requests = (0..concurrency).map(|_| client.get(outpost.url(path)).send());
  for response in futures::future::join_all(requests).await {
    assert_eq!(response.unwrap().status(), 200);
  }
}

/// A new version starts as many isolates as its function's recent traffic needs (48 requests
/// in flight for a second at 16 per isolate: at least two), not only `prewarm`; a function without traffic starts
/// `prewarm`; a reload warms the config file's functions the same way.
#[tokio::test]
async fn a_new_version_is_warmed_for_the_functions_recent_traffic() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let slow = |body: &str| {
    format!(
      "export default {{ fetch: async () => {{ await new Promise((r) => setTimeout(r, 1000)); return new Response({body:?}); }} }};"
    )
  };
  let dir = |name: &str, body: &str| {
    let dir = outpost.dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("index.js"), slow(body)).unwrap();
    dir
  };
  let (v1, v2) = (dir("v1", "v1"), dir("v2", "v2"));
  let warmed = || {
    outpost
      .logs()
      .lines()
      .filter(|line| line.contains("warming isolates for recent traffic"))
      .map(str::to_string)
      .collect::<Vec<_>>()
  };
  cli(&outpost, &["deploy", v1.to_str().unwrap(), "--name", "api"]).await;
  wait_for(&outpost, "v1").await;
  assert_eq!(
    warmed(),
    Vec::<String>::new(),
    "no traffic yet: prewarm only"
  );

  at_once(&outpost, "/api/", 48).await;
  cli(&outpost, &["deploy", v2.to_str().unwrap(), "--name", "api"]).await;
  wait_for(&outpost, "v2").await;
  let lines = warmed();
  assert_eq!(lines.len(), 1, "{lines:?}");
  assert!(
    lines[0].contains("function=api") && !lines[0].contains("isolates=1"),
    "{lines:?}"
  );

  // The configured function: traffic, then a reload of the unchanged config.
  let mut client_config = std::fs::read_to_string(outpost.dir().join("outpost.toml")).unwrap();
  client_config = client_config.replace("static.test/", "/static/");
  std::fs::write(outpost.dir().join("outpost.toml"), &client_config).unwrap();
  std::fs::write(outpost.dir().join("static.js"), slow("static")).unwrap();
  let reload = || async {
    let response = admin_post(&outpost, "/reload").await;
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
  };
  reload().await;
  at_once(&outpost, "/static/", 48).await;
  reload().await;
  let lines = warmed();
  assert!(
    lines.iter().any(|line| line.contains("function=static")),
    "{lines:?}"
  );
}

/// A node with a data_dir records its recent traffic when it shuts down; restarted, it starts
/// its versions warmed for that traffic.
#[tokio::test]
async fn a_restarted_node_warms_for_the_traffic_it_had() {
  let data = tempfile::tempdir().unwrap();
  let work = tempfile::tempdir().unwrap();
  let dir = work.path().join("api");
  std::fs::create_dir_all(&dir).unwrap();
  std::fs::write(
    dir.join("index.js"),
    "export default { fetch: async () => { await new Promise((r) => setTimeout(r, 1000)); return new Response(\"v1\"); } };",
  )
  .unwrap();
  {
    let mut outpost = node(data.path());
    cli(
      &outpost,
      &["deploy", dir.to_str().unwrap(), "--name", "api"],
    )
    .await;
    wait_for(&outpost, "v1").await;
    at_once(&outpost, "/api/", 48).await;
    outpost.signal("TERM");
    assert!(outpost.wait_exit(Duration::from_secs(30)).success());
  }
  assert!(data.path().join("traffic.json").is_file());
  let outpost = node(data.path());
  wait_for(&outpost, "v1").await;
  let logs = outpost.logs();
  assert!(
    logs
      .lines()
      .any(|line| line.contains("warming isolates for recent traffic")
        && line.contains("function=api")),
    "{logs}"
  );
}

/// The code cache counts of `api` once `ready` holds for them: (used, rejected, stored).
async fn code_cache_counts(
  outpost: &Outpost,
  ready: impl Fn((f64, f64, f64)) -> bool,
) -> (f64, f64, f64) {
  let counts = |scrape: &prometheus_parse::Scrape| {
    let event = |event| {
      value(
        scrape,
        "outpost_code_cache_events_total",
        &[("function", "api"), ("event", event)],
      )
      .unwrap_or(0.0)
    };
    (event("used"), event("rejected"), event("stored"))
  };
  counts(&scrape_until(outpost, |scrape| ready(counts(scrape))).await)
}

/// A deployed version's modules are compiled once: V8's code cache is kept in `data_dir`,
/// and the isolates of a restarted node compile from it. A damaged file is ignored (and
/// said so), the modules compile from source, and a good file replaces it.
#[tokio::test]
async fn a_deployed_versions_code_cache_outlives_a_restart_and_a_damaged_one_is_replaced() {
  let data = tempfile::tempdir().unwrap();
  let work = tempfile::tempdir().unwrap();
  let v1 = function_dir(work.path(), "v1", "v1");
  let written = |file: &Path| {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.is_file() && Instant::now() < deadline {
      std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read(file).unwrap_or_else(|err| panic!("{}: {err}", file.display()))
  };
  let file = {
    let outpost = node(data.path());
    let output = cli(&outpost, &["deploy", v1.to_str().unwrap(), "--name", "api"]).await;
    wait_for(&outpost, "v1").await;
    let (used, rejected, stored) =
      code_cache_counts(&outpost, |(_, _, stored)| stored >= 1.0).await;
    assert_eq!(
      (used, rejected),
      (0.0, 0.0),
      "nothing to use on a first deploy"
    );
    assert!(stored >= 1.0);
    data.path().join(format!(
      "functions/api/code-cache/{}.bin",
      version_of(&output)
    ))
  };
  let kept = written(&file);

  {
    let outpost = node(data.path());
    wait_for(&outpost, "v1").await;
    let (used, rejected, stored) = code_cache_counts(&outpost, |(used, _, _)| used >= 1.0).await;
    assert!(
      used >= 1.0,
      "the restarted node's isolates compile from the file"
    );
    assert_eq!(
      (rejected, stored),
      (0.0, 0.0),
      "V8 took the cache: none made anew"
    );
  }

  let mut damaged = kept.clone();
  let middle = damaged.len() / 2;
  damaged[middle] ^= 0xff;
  std::fs::write(&file, &damaged).unwrap();
  {
    let outpost = node(data.path());
    wait_for(&outpost, "v1").await;
    outpost.wait_for_log("code cache file ignored");
    let (used, rejected, stored) = code_cache_counts(&outpost, |(_, rejected, stored)| {
      rejected >= 1.0 && stored >= 1.0
    })
    .await;
    assert_eq!(used, 0.0);
    assert!(
      rejected >= 1.0 && stored >= 1.0,
      "rejected {rejected}, stored {stored}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read(&file).unwrap() == damaged && Instant::now() < deadline {
      tokio::time::sleep(Duration::from_millis(20)).await;
    }
  }
  assert_ne!(
    written(&file),
    damaged,
    "a new file replaced the damaged one"
  );
  let outpost = node(data.path());
  wait_for(&outpost, "v1").await;
  let (used, rejected, _) = code_cache_counts(&outpost, |(used, _, _)| used >= 1.0).await;
  assert_eq!((used >= 1.0, rejected), (true, 0.0));
}

#[tokio::test]
async fn functions_and_secrets_can_be_deleted() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let admin = format!("http://{}", outpost.admin.unwrap());
  let dir = function_dir(outpost.dir(), "api", "api");
  std::fs::write(
    dir.join("manifest.json"),
    r#"{"entry": "index.js", "secrets": ["TOKEN"]}"#,
  )
  .unwrap();
  let cwd = outpost.dir().to_path_buf();
  let put_secret = tokio::task::spawn_blocking({
    let (admin, cwd) = (admin.clone(), cwd.clone());
    move || {
      let mut child = crate::support::outpost_command()
        .args(["secret", "put", "api", "TOKEN", "--admin", &admin])
        .current_dir(&cwd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
      use std::io::Write as _;
      child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
      child.wait_with_output().unwrap()
    }
  })
  .await
  .unwrap();
  assert!(put_secret.status.success());
  cli(
    &outpost,
    &["deploy", dir.to_str().unwrap(), "--name", "api"],
  )
  .await;
  wait_for(&outpost, "api").await;
  assert_eq!(
    cli(&outpost, &["secret", "list", "api"]).await.trim(),
    "TOKEN"
  );
  let listing = cli(&outpost, &["functions"]).await;
  assert!(
    listing.contains("api") && listing.contains("deployed"),
    "{listing}"
  );

  cli(&outpost, &["secret", "delete", "api", "TOKEN"]).await;
  assert_eq!(cli(&outpost, &["secret", "list", "api"]).await.trim(), "");
  // The serving version keeps what it started with; a version that needs the secret can
  // no longer start.
  assert_eq!(outpost.get_text("/api/").await, "api");
  std::fs::write(
    dir.join("index.js"),
    "export default { fetch: () => new Response('api 2') };",
  )
  .unwrap();
  let refused = cli_fails(
    &outpost,
    &["deploy", dir.to_str().unwrap(), "--name", "api"],
  )
  .await;
  assert!(refused.contains("secret TOKEN"), "{refused}");
  assert_eq!(outpost.get_text("/api/").await, "api");

  cli(&outpost, &["delete", "api"]).await;
  let gone = http1().get(outpost.url("/api/")).send().await.unwrap();
  assert_eq!(gone.status(), 404);
  let versions = http1()
    .get(format!("{admin}/functions/api/versions"))
    .send()
    .await
    .unwrap();
  assert_eq!(versions.status(), 404);
  assert!(!data.path().join("functions/api").exists());
}

/// Links never lead out of a function: a bundle holding one is refused, and a configured
/// function cannot import through one.
#[tokio::test]
async fn symlinks_in_bundles_and_function_directories_are_refused() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let admin = format!("http://{}", outpost.admin.unwrap());
  let mut builder = tar::Builder::new(Vec::new());
  let mut header = tar::Header::new_gnu();
  header.set_entry_type(tar::EntryType::Symlink);
  header.set_size(0);
  header.set_mode(0o777);
  header.set_cksum();
  builder
    .append_link(&mut header, "index.js", "/etc/passwd")
    .unwrap();
  let manifest = br#"{"entry": "index.js"}"#;
  let mut header = tar::Header::new_gnu();
  header.set_size(manifest.len() as u64);
  header.set_mode(0o644);
  header.set_cksum();
  builder
    .append_data(&mut header, "manifest.json", &manifest[..])
    .unwrap();
  let response = http1()
    .put(format!("{admin}/functions/linked"))
    .body(builder.into_inner().unwrap())
    .send()
    .await
    .unwrap();
  assert_eq!(response.status(), 400);
  assert!(
    response
      .text()
      .await
      .unwrap()
      .contains("not a regular file"),
    "links are refused"
  );

  let outside = tempfile::tempdir().unwrap();
  std::fs::write(
    outside.path().join("secret.js"),
    "export const secret = 'leaked';",
  )
  .unwrap();
  let served = Outpost::start_with(
    &functions_config("", &[("linker", "fn/index.js", r#"routes = ["/"]"#)]),
    &[(
      "fn/index.js",
      "import { secret } from './lib/secret.js';\nexport default { fetch: () => new Response(secret) };",
    )],
    |dir| {
      std::fs::create_dir_all(dir.join("fn/lib")).unwrap();
      std::os::unix::fs::symlink(
        outside.path().join("secret.js"),
        dir.join("fn/lib/secret.js"),
      )
      .unwrap();
    },
  );
  let response = http1().get(served.url("/")).send().await.unwrap();
  assert_eq!(response.status(), 503);
  assert!(!response.text().await.unwrap().contains("leaked"));
  let logs = served.wait_for_log("function failed to load");
  assert!(logs.contains("may only import files under"), "{logs}");
}

/// A request in flight when a deploy or a rollback moves traffic finishes on the version it
/// started on; the requests after it go to the new one.
#[tokio::test]
async fn requests_in_flight_finish_on_the_version_they_started_on() {
  let data = tempfile::tempdir().unwrap();
  let outpost = node(data.path());
  let slow = |name: &str| {
    let dir = outpost.dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
      dir.join("index.js"),
      format!(
        "export default {{ async fetch(request) {{ if (new URL(request.url).pathname.endsWith('/slow')) await new Promise((r) => setTimeout(r, 1000)); return new Response('{name}'); }} }};"
      ),
    )
    .unwrap();
    dir
  };
  let (v1, v2) = (slow("v1"), slow("v2"));
  cli(&outpost, &["deploy", v1.to_str().unwrap(), "--name", "api"]).await;
  wait_for(&outpost, "v1").await;
  for (switch, from, to) in [
    (
      vec!["deploy", v2.to_str().unwrap(), "--name", "api"],
      "v1",
      "v2",
    ),
    (vec!["rollback", "api"], "v2", "v1"),
  ] {
    let in_flight = tokio::spawn({
      let url = outpost.url("/api/slow");
      async move { http1().get(url).send().await.unwrap().text().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cli(&outpost, &switch).await;
    assert_eq!(outpost.get_text("/api/").await, to);
    assert_eq!(in_flight.await.unwrap(), from, "{switch:?}");
  }
}
