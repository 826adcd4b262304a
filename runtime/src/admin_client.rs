//! The CLI's client of the admin API (`outpost deploy | versions | rollback | split`); part
//! of the binary, not the library.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// The commands that talk to a node's admin API.
#[derive(Debug, clap::Subcommand)]
pub enum AdminCommand {
  /// Upload a function's directory as a new version and serve it.
  Deploy {
    /// The directory: its modules and a manifest.json (made when missing).
    dir: PathBuf,
    #[arg(long)]
    name: String,
    #[command(flatten)]
    admin: AdminArgs,
  },
  /// List a deployed function's versions and their weights.
  Versions {
    name: String,
    #[command(flatten)]
    admin: AdminArgs,
  },
  /// Serve again what served before the current activation, or --to VERSION.
  Rollback {
    /// The deployed function.
    name: String,
    /// The version to serve (100%) instead of the previous activation.
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
  },
  /// Split traffic between versions: `outpost split api a1b2c3=95 d4e5f6=5`.
  Split {
    name: String,
    #[arg(required = true)]
    weights: Vec<String>,
    /// Keep each client on one version by this request header.
    #[arg(long, conflicts_with = "sticky_cookie")]
    sticky_header: Option<String>,
    /// Keep each client on one version by this cookie.
    #[arg(long)]
    sticky_cookie: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
  },
}

/// Runs `command` against the admin API; returns what to print.
pub fn run(command: &AdminCommand) -> anyhow::Result<String> {
  let admin = match command {
    AdminCommand::Deploy { admin, .. }
    | AdminCommand::Versions { admin, .. }
    | AdminCommand::Rollback { admin, .. }
    | AdminCommand::Split { admin, .. } => admin,
  };
  let run = async {
    let client = AdminClient::new(admin)?;
    match command {
      AdminCommand::Deploy { dir, name, .. } => client.deploy(dir, name).await,
      AdminCommand::Versions { name, .. } => client.versions(name).await,
      AdminCommand::Rollback { name, to, .. } => client.rollback(name, to.as_deref()).await,
      AdminCommand::Split {
        name,
        weights,
        sticky_header,
        sticky_cookie,
        ..
      } => {
        let sticky = match (sticky_header, sticky_cookie) {
          (Some(header), _) => Some(serde_json::json!({ "header": header })),
          (None, Some(cookie)) => Some(serde_json::json!({ "cookie": cookie })),
          (None, None) => None,
        };
        client.split(name, weights, sticky).await
      }
    }
  };
  tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()?
    .block_on(run)
}

/// Where the admin API is and how to authenticate to it.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
  /// The admin listener's URL.
  #[arg(long, env = "OUTPOST_ADMIN", default_value = "http://127.0.0.1:9901")]
  admin: String,
  /// A file whose first line is the bearer token (else `OUTPOST_TOKEN`).
  #[arg(long)]
  token_file: Option<PathBuf>,
}

/// A connection to one node's admin API.
pub struct AdminClient {
  base: String,
  token: Option<String>,
  http: reqwest::Client,
}

impl AdminClient {
  pub fn new(args: &AdminArgs) -> anyhow::Result<AdminClient> {
    let token = match &args.token_file {
      Some(file) => {
        let text = std::fs::read_to_string(file)
          .with_context(|| format!("reading the token file {}", file.display()))?;
        text.lines().next().map(|line| line.trim().to_string())
      }
      None => std::env::var("OUTPOST_TOKEN").ok(),
    };
    Ok(AdminClient {
      base: args.admin.trim_end_matches('/').to_string(),
      token,
      http: reqwest::Client::new(),
    })
  }

  /// Sends a request and returns the JSON answer; an error status becomes an error with the
  /// node's message.
  async fn call(
    &self,
    method: reqwest::Method,
    path: &str,
    body: Option<reqwest::Body>,
  ) -> anyhow::Result<Value> {
    let url = format!("{}{path}", self.base);
    let mut request = self.http.request(method.clone(), &url);
    if let Some(token) = &self.token {
      request = request.bearer_auth(token);
    }
    if let Some(body) = body {
      request = request.body(body);
    }
    let response = request.send().await.with_context(|| {
      format!("{method} {url} (is the admin listener there? --admin, OUTPOST_ADMIN)")
    })?;
    let status = response.status();
    let value: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
      let message = value["error"].as_str().unwrap_or("no message");
      bail!("{method} {url}: {status}: {message}");
    }
    Ok(value)
  }

  /// Uploads `dir` as a new version of `name` and serves it.
  pub async fn deploy(&self, dir: &Path, name: &str) -> anyhow::Result<String> {
    let bundle = bundle(dir)?;
    let answer = self
      .call(
        reqwest::Method::PUT,
        &format!("/functions/{name}?activate=true"),
        Some(bundle.into()),
      )
      .await?;
    let version = answer["version"].as_str().unwrap_or_default();
    let new = if answer["created"] == true {
      "new"
    } else {
      "already stored"
    };
    Ok(format!(
      "deployed {name} version {version} ({new}), serving 100%{}",
      warnings(&answer)
    ))
  }

  async fn version_list(&self, name: &str) -> anyhow::Result<Vec<Value>> {
    let answer = self
      .call(
        reqwest::Method::GET,
        &format!("/functions/{name}/versions"),
        None,
      )
      .await?;
    Ok(answer["versions"].as_array().cloned().unwrap_or_default())
  }

  /// The versions of `name`, oldest first, one per line.
  pub async fn versions(&self, name: &str) -> anyhow::Result<String> {
    let mut out = format!(
      "{:<14} {:<29} {:<29} {:>6}  entry\n",
      "version", "uploaded", "last served", "weight"
    );
    for version in self.version_list(name).await? {
      out.push_str(&format!(
        "{:<14} {:<29} {:<29} {:>5}%  {}\n",
        version["version"].as_str().unwrap_or_default(),
        human_time(version["created"].as_u64()),
        human_time(version["last_served"].as_u64()),
        version["weight"].as_u64().unwrap_or_default(),
        version["entry"].as_str().unwrap_or_default(),
      ));
    }
    Ok(out)
  }

  /// Serves `to`, or without it what served before the current activation.
  pub async fn rollback(&self, name: &str, to: Option<&str>) -> anyhow::Result<String> {
    let body = match to {
      Some(to) => serde_json::json!({ "to": to }).to_string(),
      None => String::new(),
    };
    let answer = self
      .call(
        reqwest::Method::POST,
        &format!("/functions/{name}/rollback"),
        Some(body.into()),
      )
      .await?;
    Ok(format!(
      "{name} now serves {}{}",
      shares(&answer["versions"]),
      warnings(&answer)
    ))
  }

  /// Splits traffic by `version=weight` pairs, optionally sticky.
  pub async fn split(
    &self,
    name: &str,
    weights: &[String],
    sticky: Option<Value>,
  ) -> anyhow::Result<String> {
    let mut versions = serde_json::Map::new();
    for pair in weights {
      let (version, weight) = pair
        .split_once('=')
        .with_context(|| format!("{pair:?}: give VERSION=WEIGHT, e.g. 3f2a9c1d0b7e=95"))?;
      let weight: u32 = weight
        .parse()
        .with_context(|| format!("{pair:?}: the weight must be a whole number"))?;
      versions.insert(version.to_string(), weight.into());
    }
    let body = serde_json::json!({ "versions": versions, "sticky": sticky }).to_string();
    let answer = self
      .call(
        reqwest::Method::POST,
        &format!("/functions/{name}/split"),
        Some(body.into()),
      )
      .await?;
    Ok(format!(
      "{name} now serves {}{}",
      shares(&answer["versions"]),
      warnings(&answer)
    ))
  }
}

/// `version a1b2 95%, version c3d4 5%` from a `{"version": weight}` object.
fn shares(versions: &Value) -> String {
  versions
    .as_object()
    .map(|versions| {
      versions
        .iter()
        .map(|(version, weight)| format!("version {version} {}%", weight.as_u64().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
    })
    .unwrap_or_default()
}

/// The answer's warnings, one `warning:` line each (with a leading newline), or nothing.
fn warnings(answer: &Value) -> String {
  answer["warnings"]
    .as_array()
    .into_iter()
    .flatten()
    .filter_map(Value::as_str)
    .map(|warning| format!("\nwarning: {warning}"))
    .collect()
}

/// Unix seconds as `Mon, 07 Dec 2026 18:31:42 GMT`, or `-`.
fn human_time(seconds: Option<u64>) -> String {
  seconds.map_or_else(
    || "-".to_string(),
    |seconds| {
      httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
    },
  )
}

/// The files of `dir` as a tar. Without a `manifest.json` one is made naming the first of
/// `index.ts`, `index.js`, `index.mjs`, `index.tsx` and `index.jsx` present.
fn bundle(dir: &Path) -> anyhow::Result<Vec<u8>> {
  anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
  let mut builder = tar::Builder::new(Vec::new());
  builder.follow_symlinks(false);
  builder
    .append_dir_all(".", dir)
    .with_context(|| format!("packing {}", dir.display()))?;
  if !dir.join("manifest.json").is_file() {
    let entry = ["index.ts", "index.js", "index.mjs", "index.tsx", "index.jsx"]
      .into_iter()
      .find(|name| dir.join(name).is_file())
      .with_context(|| {
        format!(
          "{} has no manifest.json and no index.ts/index.js: add a manifest.json like {{\"entry\": \"main.ts\"}}",
          dir.display()
        )
      })?;
    let manifest = serde_json::json!({ "entry": entry }).to_string();
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, "manifest.json", manifest.as_bytes())?;
  }
  Ok(builder.into_inner()?)
}
