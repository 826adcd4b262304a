//! The CLI's client of the admin API (`outpost deploy | versions | rollback | split | delete |
//! functions | secret | tail`); part of the binary, not the library.

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
    /// The function's name (1 to 63 of a-z, 0-9 and -).
    #[arg(long)]
    name: String,
    #[command(flatten)]
    admin: AdminArgs,
  },
  /// List a deployed function's versions and their weights.
  Versions {
    /// The deployed function.
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
    /// The deployed function.
    name: String,
    /// VERSION=PERCENT pairs adding up to 100.
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
  /// Stop serving a deployed function and remove its versions and secrets.
  Delete {
    /// The deployed function.
    name: String,
    #[command(flatten)]
    admin: AdminArgs,
  },
  /// List the node's functions: configured and deployed, with routes and versions.
  Functions {
    #[command(flatten)]
    admin: AdminArgs,
  },
  /// Set, list or delete a deployed function's secrets.
  Secret {
    #[command(subcommand)]
    action: SecretAction,
  },
  /// Follow a function's access records and console output as they come (Ctrl-C ends it).
  Tail {
    /// The function (configured or deployed).
    name: String,
    /// Print each line as the JSON object the node sends.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    admin: AdminArgs,
  },
}

/// `outpost secret ...`.
#[derive(Debug, clap::Subcommand)]
pub enum SecretAction {
  /// Set secret KEY of function NAME; the value is read from standard input (so it stays
  /// out of the shell's history), or from --value-file. Serving versions that use it restart.
  Put {
    /// The deployed function.
    name: String,
    /// The secret's name: A-Z, 0-9 and _, not starting with a digit.
    key: String,
    /// Read the value from this file instead of standard input (a trailing newline is
    /// dropped either way).
    #[arg(long)]
    value_file: Option<PathBuf>,
    #[command(flatten)]
    admin: AdminArgs,
  },
  /// List the names of a function's secrets (values never leave the node).
  List {
    /// The deployed function.
    name: String,
    #[command(flatten)]
    admin: AdminArgs,
  },
  /// Delete secret KEY of function NAME.
  Delete {
    /// The deployed function.
    name: String,
    /// The secret's name.
    key: String,
    #[command(flatten)]
    admin: AdminArgs,
  },
}

/// Runs `command` against the admin API; returns what to print (`tail` prints as it goes).
pub fn run(command: &AdminCommand) -> anyhow::Result<String> {
  let admin = match command {
    AdminCommand::Deploy { admin, .. }
    | AdminCommand::Versions { admin, .. }
    | AdminCommand::Rollback { admin, .. }
    | AdminCommand::Split { admin, .. }
    | AdminCommand::Delete { admin, .. }
    | AdminCommand::Functions { admin }
    | AdminCommand::Tail { admin, .. } => admin,
    AdminCommand::Secret { action } => match action {
      SecretAction::Put { admin, .. }
      | SecretAction::List { admin, .. }
      | SecretAction::Delete { admin, .. } => admin,
    },
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
      AdminCommand::Delete { name, .. } => {
        client
          .call(reqwest::Method::DELETE, &format!("/functions/{name}"), None)
          .await?;
        Ok(format!("deleted {name}"))
      }
      AdminCommand::Functions { .. } => client.functions().await,
      AdminCommand::Secret { action } => client.secret(action).await,
      AdminCommand::Tail { name, json, .. } => client.tail(name, *json).await,
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

  /// Every function of the node, one per line.
  pub async fn functions(&self) -> anyhow::Result<String> {
    let answer = self.call(reqwest::Method::GET, "/functions", None).await?;
    let mut out = format!("{:<24} {:<9} {:<40} versions\n", "name", "source", "routes");
    for function in answer["functions"].as_array().into_iter().flatten() {
      let routes = function["routes"]
        .as_array()
        .map(|routes| {
          routes
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" ")
        })
        .unwrap_or_default();
      out.push_str(&format!(
        "{:<24} {:<9} {:<40} {}\n",
        function["name"].as_str().unwrap_or_default(),
        function["source"].as_str().unwrap_or_default(),
        routes,
        shares(&function["versions"]),
      ));
    }
    Ok(out)
  }

  /// `outpost secret put|list|delete`.
  pub async fn secret(&self, action: &SecretAction) -> anyhow::Result<String> {
    match action {
      SecretAction::Put {
        name,
        key,
        value_file,
        ..
      } => {
        let value = match value_file {
          Some(file) => {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
          }
          None => std::io::read_to_string(std::io::stdin())
            .context("reading the secret's value from standard input")?,
        };
        let value = value.strip_suffix('\n').unwrap_or(&value);
        let value = value.strip_suffix('\r').unwrap_or(value).to_string();
        self
          .call(
            reqwest::Method::PUT,
            &format!("/functions/{name}/secrets/{key}"),
            Some(value.into()),
          )
          .await?;
        Ok(format!("secret {key} of {name} set"))
      }
      SecretAction::List { name, .. } => {
        let answer = self
          .call(
            reqwest::Method::GET,
            &format!("/functions/{name}/secrets"),
            None,
          )
          .await?;
        Ok(
          answer["secrets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        )
      }
      SecretAction::Delete { name, key, .. } => {
        self
          .call(
            reqwest::Method::DELETE,
            &format!("/functions/{name}/secrets/{key}"),
            None,
          )
          .await?;
        Ok(format!("secret {key} of {name} deleted"))
      }
    }
  }

  /// Prints function `name`'s access records and console lines as they come.
  pub async fn tail(&self, name: &str, json: bool) -> anyhow::Result<String> {
    let url = format!("{}/functions/{name}/tail", self.base);
    let mut request = self.http.get(&url);
    if let Some(token) = &self.token {
      request = request.bearer_auth(token);
    }
    let mut response = request.send().await.with_context(|| {
      format!("GET {url} (is the admin listener there? --admin, OUTPOST_ADMIN)")
    })?;
    let status = response.status();
    if !status.is_success() {
      let value: Value = response.json().await.unwrap_or(Value::Null);
      bail!(
        "GET {url}: {status}: {}",
        value["error"].as_str().unwrap_or("no message")
      );
    }
    let mut pending = Vec::new();
    while let Some(chunk) = response.chunk().await.context("reading the tail")? {
      pending.extend_from_slice(&chunk);
      while let Some(end) = pending.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = pending.drain(..=end).collect();
        let line = String::from_utf8_lossy(&line);
        let shown = if json {
          line.trim_end().to_string()
        } else {
          tail_line(line.trim_end())
        };
        #[allow(clippy::print_stdout, reason = "the command's output, as it comes")]
        {
          println!("{shown}");
        }
      }
    }
    Ok(String::new())
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

/// A tail's JSON line for people: `time status method host/path wall cpu id` for an access
/// record, `time level id message` for console output.
fn tail_line(line: &str) -> String {
  let Ok(event) = serde_json::from_str::<Value>(line) else {
    return line.to_string();
  };
  let text = |key: &str| event[key].as_str().unwrap_or_default().to_string();
  let number = |key: &str| event[key].as_f64().unwrap_or_default();
  match event["kind"].as_str() {
    Some("access") => format!(
      "{} {} {} {}{} {:.1}ms cpu {:.2}ms {}{}",
      text("time"),
      event["status"],
      text("method"),
      text("host"),
      text("path"),
      number("wall_ms"),
      number("cpu_ms"),
      text("request_id"),
      event["termination"]
        .as_str()
        .map(|t| format!(" ({t})"))
        .unwrap_or_default(),
    ),
    Some("console") => format!(
      "{} {:<5} {} {}",
      text("time"),
      text("level"),
      event["request_id"].as_str().unwrap_or("-"),
      text("message"),
    ),
    Some("missed") => format!("... {} lines missed (too slow to keep up)", event["lines"]),
    _ => line.to_string(),
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
