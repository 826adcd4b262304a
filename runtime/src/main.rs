//! The `outpost` command line: `serve` and `check`, and the admin API client commands
//! `deploy`, `versions`, `rollback` and `split`.

mod admin_client;

use std::io::IsTerminal;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::field::MakeExt as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use outpost::config::{Config, LogConfig, LogFormat};
use outpost::isolate::function_code::{FunctionCode, TranspileCache};
use outpost::isolate::{FunctionSpec, check_function};
use outpost::limits::cpu::CpuWatchdog;
use outpost::observe::otlp::OtlpExport;
use outpost::observe::tail::Tails;
use outpost::server::{Node, NodeServices};

use crate::admin_client::AdminCommand;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
  name = "outpost",
  version,
  about = "Edge function runtime: JS and TS handlers in pre-warmed V8 isolates"
)]
struct Cli {
  #[command(subcommand)]
  command: Command,
}

#[derive(Subcommand)]
enum Command {
  /// Serve functions: from a config file, or one handler file on every host and path.
  Serve {
    /// The config file (outpost.toml).
    #[arg(long, short, conflicts_with = "handler")]
    config: Option<PathBuf>,
    /// A single handler module (.js or .ts) to serve without a config file.
    handler: Option<PathBuf>,
    /// Address for the single-handler mode.
    #[arg(long, default_value = "127.0.0.1:8787", requires = "handler")]
    listen: SocketAddr,
  },
  /// Serve for development: reload on every save of a function's files or the config (the
  /// last good version keeps serving when a save does not load), show error details.
  Dev {
    /// A handler file, a function directory (its outpost.toml, else its index/main file), or
    /// nothing for the current directory.
    path: Option<PathBuf>,
    /// The config file (outpost.toml), instead of PATH.
    #[arg(long, short, conflicts_with = "path")]
    config: Option<PathBuf>,
    /// Address for a handler served without a config file.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// `request.cf` fields every request gets, as a PoP would set them:
    /// `country=DE,city=Berlin,...`.
    #[arg(long, default_value = "")]
    cf: String,
  },
  /// Start a function: a directory with a handler from a template, its types, a tsconfig.json
  /// and a README; `outpost dev DIR` serves it.
  Init {
    /// The new function's directory (created; default: the current directory).
    #[arg(default_value = ".")]
    dir: PathBuf,
    #[arg(long, value_enum, default_value = "hello")]
    template: outpost::ops::init::Template,
  },
  /// Write `outpost.d.ts` for a function: Outpost's types with its `env` (settings, secrets,
  /// service bindings) typed, from a config file or a deployable directory's manifest.json.
  Types {
    /// A function directory with a manifest.json.
    dir: Option<PathBuf>,
    /// The config file whose function to type.
    #[arg(long, short, conflicts_with = "dir")]
    config: Option<PathBuf>,
    /// Which function of the config (needed when it has several).
    #[arg(long)]
    function: Option<String>,
    /// Where to write it.
    #[arg(long, default_value = "outpost.d.ts")]
    out: PathBuf,
  },
  /// Validate a config file and load every function without serving.
  Check {
    #[arg(long, short, conflicts_with = "handler")]
    config: Option<PathBuf>,
    handler: Option<PathBuf>,
  },
  #[command(flatten)]
  Admin(AdminCommand),
}

/// Starts the server log as `[log]` says (`OUTPOST_LOG` overrides the level), with the
/// function tails beside it (they see access records and console output at any level).
/// Writes text with its line breaks escaped (`\r`, `\n`), so that one event stays one line,
/// without a copy of the text.
struct OneLine<'a, 'w>(&'a mut tracing_subscriber::fmt::format::Writer<'w>);

impl std::fmt::Write for OneLine<'_, '_> {
  fn write_str(&mut self, text: &str) -> std::fmt::Result {
    let mut rest = text;
    while let Some(at) = rest.find(['\r', '\n']) {
      self.0.write_str(&rest[..at])?;
      self.0.write_str(if rest.as_bytes()[at] == b'\r' {
        "\\r"
      } else {
        "\\n"
      })?;
      rest = &rest[at + 1..];
    }
    self.0.write_str(rest)
  }
}

fn init_log(log: &LogConfig, tails: &Tails) {
  use std::fmt::Write as _;
  use tracing_subscriber::Layer as _;
  use tracing_subscriber::layer::SubscriberExt as _;
  use tracing_subscriber::util::SubscriberInitExt as _;
  let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
  let output = match log.format {
    // One event per line: line breaks inside a message (a console.log of a stack, say) are
    // written as `\n`, as the JSON format escapes them.
    LogFormat::Text => tracing_subscriber::fmt::layer()
      .fmt_fields(
        tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
          if field.name() != "message" {
            write!(writer, "{}=", field.name())?;
          }
          write!(OneLine(writer), "{value:?}")
        })
        .delimited(" "),
      )
      .with_writer(std::io::stderr)
      .with_ansi(std::io::stderr().is_terminal())
      .with_filter(filter)
      .boxed(),
    LogFormat::Json => tracing_subscriber::fmt::layer()
      .json()
      .flatten_event(true)
      .with_current_span(false)
      .with_writer(std::io::stdout)
      .with_filter(filter)
      .boxed(),
  };
  tracing_subscriber::registry()
    .with(output)
    .with(tails.layer())
    .init();
}

fn main() -> ExitCode {
  let result = match Cli::parse().command {
    Command::Admin(command) => admin_client::run(&command).map(|output| {
      if !output.is_empty() {
        #[allow(clippy::print_stdout, reason = "the command's output")]
        {
          println!("{}", output.trim_end());
        }
      }
    }),
    Command::Serve {
      config,
      handler,
      listen,
    } => {
      prepare_engine();
      load_config(config, handler, listen).and_then(|config| run(config, Vec::new(), false))
    }
    Command::Dev {
      path,
      config,
      listen,
      cf,
    } => {
      prepare_engine();
      outpost::ops::dev::parse_cf(&cf)
        .map_err(anyhow::Error::from)
        .and_then(|request_cf| run(dev_config(path, config, listen)?, request_cf, true))
    }
    Command::Init { dir, template } => outpost::ops::init::init(&dir, template)
      .map(|written| {
        #[allow(clippy::print_stdout, reason = "the command's output")]
        {
          for path in written {
            println!("wrote {}", path.display());
          }
          println!("serve it with: outpost dev {}", dir.display());
        }
      })
      .map_err(anyhow::Error::from),
    Command::Types {
      dir,
      config,
      function,
      out,
    } => env_names(dir, config, function).and_then(|env| {
      std::fs::write(&out, outpost::ops::init::types(&env))
        .with_context(|| format!("writing {}", out.display()))?;
      #[allow(clippy::print_stdout, reason = "the command's output")]
      {
        println!("wrote {}", out.display());
      }
      Ok(())
    }),
    Command::Check { config, handler } => {
      prepare_engine();
      load_config(config, handler, SocketAddr::from(([127, 0, 0, 1], 0))).and_then(|config| {
        init_log(&config.log, &Tails::default());
        check(&config)
      })
    }
  };
  match result {
    Ok(()) => ExitCode::SUCCESS,
    Err(err) => {
      eprintln!("error: {err:#}");
      ExitCode::FAILURE
    }
  }
}

/// Readies the process to run isolates: clears the proxy environment and starts V8.
fn prepare_engine() {
  // Outbound fetch reads proxy settings from the process environment; tenants must not
  // inherit the operator's proxy.
  for var in [
    "ALL_PROXY",
    "all_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
  ] {
    // SAFETY: single-threaded at this point; no other thread reads the environment yet.
    unsafe { std::env::remove_var(var) };
  }
  outpost::init_v8();
}

fn load_config(
  config: Option<PathBuf>,
  handler: Option<PathBuf>,
  listen: SocketAddr,
) -> anyhow::Result<Config> {
  let mut config = match (config, handler) {
    (Some(path), _) => Config::load(&path)?,
    (None, Some(handler)) => Config::single_handler(&handler, listen)?,
    (None, None) => anyhow::bail!("give a config file (--config outpost.toml) or a handler file"),
  };
  // OUTPOST_SHARDS overrides `server.shards`, as OUTPOST_LOG overrides the log level.
  if let Ok(shards) = std::env::var("OUTPOST_SHARDS") {
    config.server.shards = shards
      .parse()
      .with_context(|| format!("OUTPOST_SHARDS={shards:?} is not a number of shards"))?;
  }
  Ok(config)
}

/// The `env` names of the function `outpost types` types: from `config`'s function (the one
/// called `function`, or its only one), or from `dir`'s manifest.json.
fn env_names(
  dir: Option<PathBuf>,
  config: Option<PathBuf>,
  function: Option<String>,
) -> anyhow::Result<outpost::ops::init::EnvNames> {
  use outpost::ops::init::EnvNames;
  if let Some(config) = config {
    let config = Config::load(&config)?;
    let names: Vec<&str> = config.functions.iter().map(|f| f.name.as_str()).collect();
    let chosen = match (&function, config.functions.as_slice()) {
      (Some(name), functions) => functions.iter().find(|f| &f.name == name),
      (None, [only]) => Some(only),
      (None, _) => None,
    }
    .with_context(|| {
      format!(
        "name one of the config's functions with --function: {}",
        names.join(", ")
      )
    })?;
    return Ok(EnvNames {
      text: chosen.env.keys().cloned().collect(),
      services: chosen.services.keys().cloned().collect(),
    });
  }
  let dir = dir.unwrap_or_else(|| PathBuf::from("."));
  let path = dir.join("manifest.json");
  let text = std::fs::read(&path).with_context(|| {
    format!(
      "reading {}: give a function directory with a manifest.json, or --config",
      path.display()
    )
  })?;
  let manifest: outpost::ops::deployments::Manifest = serde_json::from_slice(&text)
    .with_context(|| format!("{} is not a manifest", path.display()))?;
  Ok(EnvNames {
    text: manifest
      .env
      .keys()
      .chain(&manifest.secrets)
      .cloned()
      .collect(),
    services: manifest.services.keys().cloned().collect(),
  })
}

/// What `outpost dev` serves: `config`, or PATH (a handler file, or a directory with an
/// outpost.toml or an index/main module), with error details in Outpost's 500 bodies.
fn dev_config(
  path: Option<PathBuf>,
  config: Option<PathBuf>,
  listen: SocketAddr,
) -> anyhow::Result<Config> {
  const ENTRIES: [&str; 6] = [
    "index.ts",
    "index.js",
    "main.ts",
    "main.js",
    "handler.ts",
    "handler.js",
  ];
  let path = path.unwrap_or_else(|| PathBuf::from("."));
  let (config, handler) = match config {
    Some(config) => (Some(config), None),
    None if path.is_dir() && path.join("outpost.toml").is_file() => {
      (Some(path.join("outpost.toml")), None)
    }
    None if path.is_dir() => {
      let entry = ENTRIES
        .iter()
        .map(|name| path.join(name))
        .find(|entry| entry.is_file())
        .with_context(|| {
          format!(
            "{} has no outpost.toml and none of {}: give a handler file or a config",
            path.display(),
            ENTRIES.join(", ")
          )
        })?;
      (None, Some(entry))
    }
    None => (None, Some(path)),
  };
  let mut config = load_config(config, handler, listen)?;
  config.server.error_details = true;
  Ok(config)
}

/// Starts the log (with the function tails beside it) and serves `config`; `request_cf` and
/// `watch` are `outpost dev`'s.
fn run(config: Config, request_cf: Vec<(&'static str, String)>, watch: bool) -> anyhow::Result<()> {
  let tails = Tails::default();
  init_log(&config.log, &tails);
  serve_with(
    config,
    NodeServices {
      tails: Some(tails),
      request_cf,
      ..NodeServices::default()
    },
    watch,
  )
}

/// Serves until SIGTERM/SIGINT; with `watch` (`outpost dev`), reloads on file changes.
fn serve_with(config: Config, services: NodeServices, watch: bool) -> anyhow::Result<()> {
  // Started outside the runtime (it sends from a thread of its own); dropped after it, which
  // flushes the spans still batched.
  let export = OtlpExport::start(&config.tracing).map_err(anyhow::Error::msg)?;
  let tracer = export.as_ref().map(OtlpExport::tracer);
  // The shards serve HTTP and run JS on threads of their own; this runtime only runs the
  // admin API, signals, reloads and deploys.
  let runtime = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build()
    .context("starting the tokio runtime")?;
  let json = config.log.format == LogFormat::Json;
  runtime.block_on(async {
    let node = Node::start_with(&config, NodeServices { tracer, ..services }).await?;
    let stop_watching = tokio_util::sync::CancellationToken::new();
    if watch {
      let dirs = outpost::ops::dev::watched_dirs(&config);
      outpost::ops::dev::reload_on_change(&dirs, node.reloader(), stop_watching.clone())?;
      for dir in &dirs {
        announce(json, "outpost dev watching", &dir.display().to_string());
      }
    }
    if let Some(address) = node.admin_address() {
      announce(
        json,
        "outpost admin listening",
        &format!("http://{address}"),
      );
    }
    for listener in node.listeners() {
      let scheme = if listener.tls { "https" } else { "http" };
      announce(
        json,
        "outpost listening",
        &format!("{scheme}://{}", listener.address),
      );
    }
    node.run(shutdown_signal()).await;
    stop_watching.cancel();
    anyhow::Ok(())
  })?;
  // Isolate threads still finishing waitUntil work end with the process.
  Ok(())
}

/// Says where the node listens: `{what} on {url}` on stdout, or with the JSON log, a log
/// event (one JSON object on stdout, as every other line there) with the URL as `url`.
fn announce(json: bool, what: &str, url: &str) {
  if json {
    tracing::info!(target: "outpost::server", url, "{what}");
  } else {
    #[allow(
      clippy::print_stdout,
      reason = "the listening addresses are the command's output"
    )]
    {
      println!("{what} on {url}");
    }
  }
}

async fn shutdown_signal() {
  let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    .expect("installing the SIGTERM handler");
  tokio::select! {
    _ = tokio::signal::ctrl_c() => {}
    _ = terminate.recv() => {}
  }
}

fn check(config: &Config) -> anyhow::Result<()> {
  let transpiler = Arc::new(TranspileCache::default());
  let watchdog = CpuWatchdog::start(false).context("starting the CPU watchdog")?;
  let mut failures = 0;
  for listener in &config.listeners {
    if !listener.tls.is_empty()
      && let Err(err) = outpost::http::tls::server_config(&listener.tls)
    {
      eprintln!("listener {}: {err}", listener.address);
      failures += 1;
    }
  }
  for function in &config.functions {
    let result = FunctionCode::new(&function.name, &function.entry, transpiler.clone())
      .map_err(|err| err.to_string())
      .and_then(|code| {
        check_function(&FunctionSpec::new(config, function, code), &watchdog)
          .map_err(|err| err.to_string())
      });
    match result {
      Ok(()) => eprintln!("function {:?}: ok", function.name),
      Err(err) => {
        eprintln!("function {:?}: {err}", function.name);
        failures += 1;
      }
    }
  }
  anyhow::ensure!(failures == 0, "{failures} problem(s) found");
  Ok(())
}
