//! Starting the real `outpost` binary on 127.0.0.1:0 and talking to it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `outpost serve` process with its own scratch directory.
pub struct Outpost {
  child: Child,
  dir: tempfile::TempDir,
  /// Plain (HTTP/1.1 + h2c) listener addresses, in config order.
  pub http: Vec<SocketAddr>,
  /// TLS listener addresses, in config order.
  pub https: Vec<SocketAddr>,
  /// The admin listener's address, when `[admin]` is configured.
  pub admin: Option<SocketAddr>,
  logs: Arc<Mutex<String>>,
  /// What the process wrote to stdout alone.
  stdout: Arc<Mutex<String>>,
}

/// Files of a test project: (relative path, contents).
pub type Files<'a> = &'a [(&'a str, &'a str)];

pub fn write_files(dir: &Path, files: Files<'_>) {
  for (path, contents) in files {
    let path = dir.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
  }
}

/// `outpost.toml` text: `preamble` (e.g. a `[node]` table), one plain listener on
/// 127.0.0.1:0, and one `[[functions]]` table per (name, entry, further lines such as
/// `routes = ["/"]`).
pub fn functions_config(preamble: &str, functions: &[(&str, &str, &str)]) -> String {
  let mut config = format!("{preamble}\n[[listen]]\naddress = \"127.0.0.1:0\"\n");
  for (name, entry, rest) in functions {
    config.push_str(&format!(
      "\n[[functions]]\nname = \"{name}\"\nentry = \"{entry}\"\n{rest}\n"
    ));
  }
  config
}

/// A config with an admin listener and one TLS listener serving `cert` and `key`, then
/// `functions` (TOML) as written.
pub fn tls_node_config(cert: &Path, key: &Path, functions: &str) -> String {
  format!(
    "[admin]\naddress = \"127.0.0.1:0\"\n\n[[listen]]\naddress = \"127.0.0.1:0\"\ntls = [ {{ cert = \"{}\", key = \"{}\" }} ]\n{functions}",
    cert.display(),
    key.display()
  )
}

/// A command running the `outpost` binary under test. It is killed when the test process
/// ends, whatever way it ends: a server left behind would keep a core busy for the tests
/// that follow.
pub fn outpost_command() -> Command {
  use std::os::unix::process::CommandExt as _;
  let mut command = Command::new(outpost_bin());
  // SAFETY: prctl is async-signal-safe and touches nothing of the parent's memory.
  unsafe {
    command.pre_exec(|| {
      if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
        return Err(std::io::Error::last_os_error());
      }
      Ok(())
    });
  }
  command
}

/// The `outpost` binary under test: this build's, or the one `OUTPOST_BIN` names (to run the
/// tests against another build, e.g. to see a new test fail on the code before a fix).
pub fn outpost_bin() -> &'static str {
  static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
  BINARY.get_or_init(|| {
    std::env::var("OUTPOST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_outpost").to_string())
  })
}

impl Outpost {
  /// Writes `files` and `outpost.toml` into a new directory and serves it.
  pub fn start(config: &str, files: Files<'_>) -> Outpost {
    Outpost::start_with(config, files, |_| {})
  }

  /// As [`Outpost::start`], after `prepare` has written more files (binary ones, say) into
  /// the directory.
  pub fn start_with(config: &str, files: Files<'_>, prepare: impl FnOnce(&Path)) -> Outpost {
    Outpost::start_configured(config, files, prepare, None)
  }

  /// As [`Outpost::start`] on exactly `shards` shards, whatever `OUTPOST_SHARDS` the tests
  /// run with.
  pub fn start_on_shards(shards: usize, config: &str, files: Files<'_>) -> Outpost {
    Outpost::start_configured(config, files, |_| {}, Some(shards))
  }

  fn start_configured(
    config: &str,
    files: Files<'_>,
    prepare: impl FnOnce(&Path),
    shards: Option<usize>,
  ) -> Outpost {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), files);
    prepare(dir.path());
    std::fs::write(dir.path().join("outpost.toml"), config).unwrap();
    let args = [
      "serve".to_string(),
      "--config".to_string(),
      dir.path().join("outpost.toml").display().to_string(),
    ];
    Outpost::spawn(dir, &args, config.matches("[[listen]]").count(), shards)
  }

  /// Serves one handler file with no config (the embedded default).
  pub fn start_handler(file_name: &str, source: &str) -> Outpost {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &[(file_name, source)]);
    let args = [
      "serve".to_string(),
      dir.path().join(file_name).display().to_string(),
      "--listen".to_string(),
      "127.0.0.1:0".to_string(),
    ];
    Outpost::spawn(dir, &args, 1, None)
  }

  /// Runs `outpost dev` with `args` in `dir` (which it keeps), on one plain listener.
  pub fn start_dev(dir: tempfile::TempDir, args: &[&str]) -> Outpost {
    let args: Vec<String> = std::iter::once("dev")
      .chain(args.iter().copied())
      .map(str::to_string)
      .collect();
    Outpost::spawn(dir, &args, 1, None)
  }

  fn spawn(
    dir: tempfile::TempDir,
    args: &[String],
    listeners: usize,
    shards: Option<usize>,
  ) -> Outpost {
    let mut command = outpost_command();
    if let Some(shards) = shards {
      command.env("OUTPOST_SHARDS", shards.to_string());
    }
    let mut child = command
      .args(args)
      .env("OUTPOST_LOG", "info,outpost::usage=debug")
      .stdin(Stdio::null())
      .stdout(Stdio::piped())
      .stderr(Stdio::piped())
      .spawn()
      .unwrap();
    let logs = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = logs.clone();
    std::thread::spawn(move || {
      for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        let mut logs = sink.lock().unwrap();
        logs.push_str(&line);
        logs.push('\n');
      }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let sink = logs.clone();
    let stdout_text = Arc::new(Mutex::new(String::new()));
    let stdout_sink = stdout_text.clone();
    // Stdout carries the listening addresses, and the log when it is JSON: read to the end.
    std::thread::spawn(move || {
      for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let _ = tx.send(line.clone());
        for text in [&sink, &stdout_sink] {
          let mut text = text.lock().unwrap();
          text.push_str(&line);
          text.push('\n');
        }
      }
    });
    let (mut http, mut https, mut admin) = (Vec::new(), Vec::new(), None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.len() + https.len() < listeners {
      let remaining = deadline.saturating_duration_since(Instant::now());
      let line = rx.recv_timeout(remaining).unwrap_or_else(|_| {
        panic!(
          "outpost did not report its listeners; logs:\n{}",
          logs.lock().unwrap()
        )
      });
      // With the JSON log the announcement is a log event: {"message": ..., "url": ...}.
      let line = match serde_json::from_str::<serde_json::Value>(&line) {
        Ok(event) => match (event["message"].as_str(), event["url"].as_str()) {
          (Some(message), Some(url)) => format!("{message} on {url}"),
          _ => continue,
        },
        Err(_) => line,
      };
      if let Some(address) = line.strip_prefix("outpost admin listening on http://") {
        admin = Some(address.parse().unwrap());
        continue;
      }
      let Some(url) = line.strip_prefix("outpost listening on ") else {
        continue;
      };
      if let Some(address) = url.strip_prefix("https://") {
        https.push(address.parse().unwrap());
      } else if let Some(address) = url.strip_prefix("http://") {
        http.push(address.parse().unwrap());
      }
    }
    Outpost {
      child,
      dir,
      http,
      https,
      admin,
      logs,
      stdout: stdout_text,
    }
  }

  /// `http://127.0.0.1:PORT{path}` on the first plain listener.
  pub fn url(&self, path: &str) -> String {
    format!("http://{}{path}", self.http[0])
  }

  /// GETs `path` over HTTP/1.1 and returns the body text.
  pub async fn get_text(&self, path: &str) -> String {
    http1()
      .get(self.url(path))
      .send()
      .await
      .unwrap()
      .text()
      .await
      .unwrap()
  }

  /// GETs `path` until its body is `expected`; fails with `what` after 10 s. For effects a
  /// handler applies after its response has been sent.
  pub async fn wait_for_text(&self, path: &str, expected: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while self.get_text(path).await != expected {
      assert!(Instant::now() < deadline, "{what}");
      tokio::time::sleep(Duration::from_millis(20)).await;
    }
  }

  pub fn pid(&self) -> u32 {
    self.child.id()
  }

  /// Everything the server logged so far.
  pub fn logs(&self) -> String {
    self.logs.lock().unwrap().clone()
  }

  /// What the server wrote to stdout so far.
  pub fn stdout(&self) -> String {
    self.stdout.lock().unwrap().clone()
  }

  /// The directory the server was started in (its config file is `outpost.toml`).
  pub fn dir(&self) -> &Path {
    self.dir.path()
  }

  /// Waits until the log contains `needle` (logs are written asynchronously).
  pub fn wait_for_log(&self, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
      let logs = self.logs();
      if logs.contains(needle) {
        return logs;
      }
      assert!(
        Instant::now() < deadline,
        "log never contained {needle:?}; logs:\n{logs}"
      );
      std::thread::sleep(Duration::from_millis(20));
    }
  }

  pub fn signal(&self, signal: &str) {
    let status = Command::new("kill")
      .args([&format!("-{signal}"), &self.pid().to_string()])
      .status()
      .unwrap();
    assert!(status.success());
  }

  /// The exit status, if the process has exited.
  pub fn try_exit(&mut self) -> Option<ExitStatus> {
    self.child.try_wait().unwrap()
  }

  /// Waits for the process to exit on its own.
  pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
      if let Some(status) = self.child.try_wait().unwrap() {
        return status;
      }
      assert!(
        Instant::now() < deadline,
        "outpost did not exit within {timeout:?}"
      );
      std::thread::sleep(Duration::from_millis(20));
    }
  }

  /// A field of /proc/PID/status in KiB, e.g. "VmHWM" (peak RSS) or "VmRSS".
  pub fn proc_status_kib(&self, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
    status
      .lines()
      .find_map(|l| l.strip_prefix(&format!("{field}:")))
      .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
      .unwrap_or_else(|| panic!("{field} not in /proc status"))
  }
}

impl Drop for Outpost {
  fn drop(&mut self) {
    let _ = self.child.kill();
    let _ = self.child.wait();
  }
}

/// Runs `outpost` to completion with `args` and returns (exit status, stdout + stderr).
pub fn run_outpost(args: &[&str], cwd: &Path) -> (ExitStatus, String) {
  let mut child = outpost_command()
    .args(args)
    .current_dir(cwd)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
  let mut output = String::new();
  child
    .stdout
    .take()
    .unwrap()
    .read_to_string(&mut output)
    .unwrap();
  child
    .stderr
    .take()
    .unwrap()
    .read_to_string(&mut output)
    .unwrap();
  (child.wait().unwrap(), output)
}

/// GETs `path` on the admin listener.
pub async fn admin_get(outpost: &Outpost, path: &str) -> reqwest::Response {
  http1()
    .get(format!("http://{}{path}", outpost.admin.unwrap()))
    .send()
    .await
    .unwrap()
}

/// POSTs to the admin listener with no body (`/reload`, say).
pub async fn admin_post(outpost: &Outpost, path: &str) -> reqwest::Response {
  http1()
    .post(format!("http://{}{path}", outpost.admin.unwrap()))
    .send()
    .await
    .unwrap()
}

/// Scrapes `/metrics` and parses it with a Prometheus text-format parser.
pub async fn scrape(outpost: &Outpost) -> prometheus_parse::Scrape {
  let response = admin_get(outpost, "/metrics").await;
  assert_eq!(response.status(), 200);
  let content_type = response.headers()["content-type"]
    .to_str()
    .unwrap()
    .to_string();
  assert!(
    content_type.starts_with("text/plain; version=0.0.4"),
    "{content_type}"
  );
  let text = response.text().await.unwrap();
  let lines = text.lines().map(|l| Ok(l.to_string()));
  prometheus_parse::Scrape::parse(lines).unwrap_or_else(|err| panic!("{err}:\n{text}"))
}

/// The value of the sample of `name` whose labels include all of `labels`.
pub fn value(
  scrape: &prometheus_parse::Scrape,
  name: &str,
  labels: &[(&str, &str)],
) -> Option<f64> {
  scrape
    .samples
    .iter()
    .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    .map(|s| match s.value {
      prometheus_parse::Value::Counter(v)
      | prometheus_parse::Value::Gauge(v)
      | prometheus_parse::Value::Untyped(v) => v,
      prometheus_parse::Value::Histogram(ref buckets) => buckets.last().map_or(0.0, |b| b.count),
      prometheus_parse::Value::Summary(_) => f64::NAN,
    })
}

/// Scrapes until `ready` holds: requests are counted once their isolate has charged them,
/// just after the response arrives.
pub async fn scrape_until(
  outpost: &Outpost,
  ready: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
  let deadline = Instant::now() + Duration::from_secs(10);
  loop {
    let scrape = scrape(outpost).await;
    if ready(&scrape) || Instant::now() > deadline {
      return scrape;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
  }
}

/// The JSON access record of `response`'s request, once written (just after the response:
/// when the request is complete).
pub fn access_record(outpost: &Outpost, response: &reqwest::Response) -> serde_json::Value {
  let request_id = response.headers()["outpost-request-id"].to_str().unwrap();
  let needle = format!("\"message\":\"access\",\"request_id\":\"{request_id}\"");
  let logs = outpost.wait_for_log(&needle);
  let line = logs
    .lines()
    .find(|l| l.contains(&needle) && l.contains("\"target\":\"outpost::access\""))
    .unwrap_or_else(|| panic!("no access record for {request_id}:\n{logs}"));
  serde_json::from_str(line).unwrap()
}

/// A plain HTTP/1.1 client.
pub fn http1() -> reqwest::Client {
  reqwest::Client::builder().http1_only().build().unwrap()
}

/// A test certificate authority and leaf certificates it signs.
pub struct TestCa {
  issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate written to disk.
pub struct Leaf {
  pub cert_path: PathBuf,
  pub key_path: PathBuf,
  pub der: Vec<u8>,
}

impl TestCa {
  pub fn new() -> TestCa {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
      .distinguished_name
      .push(rcgen::DnType::CommonName, "Outpost test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    TestCa {
      issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
    }
  }

  /// Issues a certificate for `names`, written as `{stem}.pem` / `{stem}.key` into `dir`.
  pub fn leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> Leaf {
    let params =
      rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &self.issuer).unwrap();
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Leaf {
      cert_path,
      key_path,
      der: cert.der().to_vec(),
    }
  }

  pub fn root(&self) -> reqwest::Certificate {
    reqwest::Certificate::from_der(self.issuer.der()).unwrap()
  }

  /// A TLS client (rustls) that trusts this CA only.
  pub fn connector(&self) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(self.issuer.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
      rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
  }
}

/// Sends a request and reads its body as text, failing the test on any error.
pub trait SendForText {
  async fn text_of(self) -> String;
}

impl SendForText for reqwest::RequestBuilder {
  async fn text_of(self) -> String {
    self.send().await.unwrap().text().await.unwrap()
  }
}

/// The certificate the server presented (the client must be built with `tls_info(true)`).
pub fn peer_certificate(response: &reqwest::Response) -> Vec<u8> {
  response
    .extensions()
    .get::<reqwest::tls::TlsInfo>()
    .and_then(|info| info.peer_certificate())
    .expect("TLS info")
    .to_vec()
}
