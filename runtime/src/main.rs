//! The `outpost` command line: `serve` and `check`, and the admin API client commands
//! `deploy`, `versions`, `rollback` and `split`.

mod admin_client;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use outpost::config::{Config, LogConfig, LogFormat};
use outpost::function_code::{FunctionCode, TranspileCache};
use outpost::isolate::{FunctionSpec, check_function};
use outpost::otlp::OtlpExport;
use outpost::server::Node;

use crate::admin_client::{AdminArgs, AdminClient};

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
  /// Validate a config file and load every function without serving.
  Check {
    #[arg(long, short, conflicts_with = "handler")]
    config: Option<PathBuf>,
    handler: Option<PathBuf>,
  },
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
  /// Serve an earlier version again: the one before the current, or --to VERSION.
  Rollback {
    name: String,
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

/// Starts the server log as `[log]` says; `OUTPOST_LOG` overrides the level.
fn init_log(log: &LogConfig) {
  let filter = tracing_subscriber::EnvFilter::try_from_env("OUTPOST_LOG")
    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
  let builder = tracing_subscriber::fmt().with_env_filter(filter);
  match log.format {
    LogFormat::Text => builder
      .with_writer(std::io::stderr)
      .with_ansi(std::io::stderr().is_terminal())
      .init(),
    LogFormat::Json => builder
      .json()
      .flatten_event(true)
      .with_current_span(false)
      .with_writer(std::io::stdout)
      .init(),
  }
}

fn main() -> ExitCode {
  let cli = Cli::parse();
  if let Some(result) = admin_command(&cli.command) {
    return match result {
      Ok(output) => {
        #[allow(clippy::print_stdout, reason = "the command's output")]
        {
          println!("{}", output.trim_end());
        }
        ExitCode::SUCCESS
      }
      Err(err) => {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
      }
    };
  }
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
  let result = match cli.command {
    Command::Serve {
      config,
      handler,
      listen,
    } => load_config(config, handler, listen).and_then(|config| {
      init_log(&config.log);
      serve(config)
    }),
    Command::Deploy { .. }
    | Command::Versions { .. }
    | Command::Rollback { .. }
    | Command::Split { .. } => unreachable!("admin commands are handled above"),
    Command::Check { config, handler } => {
      load_config(config, handler, SocketAddr::from(([127, 0, 0, 1], 0))).and_then(|config| {
        init_log(&config.log);
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

/// Runs an admin API command; `None` for the commands that are not one.
fn admin_command(command: &Command) -> Option<anyhow::Result<String>> {
  let admin = match command {
    Command::Deploy { admin, .. }
    | Command::Versions { admin, .. }
    | Command::Rollback { admin, .. }
    | Command::Split { admin, .. } => admin,
    Command::Serve { .. } | Command::Check { .. } => return None,
  };
  let run = async {
    let client = AdminClient::new(admin)?;
    match command {
      Command::Deploy { dir, name, .. } => client.deploy(dir, name).await,
      Command::Versions { name, .. } => client.versions(name).await,
      Command::Rollback { name, to, .. } => client.rollback(name, to.as_deref()).await,
      Command::Split {
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
      Command::Serve { .. } | Command::Check { .. } => unreachable!("not an admin command"),
    }
  };
  let runtime = tokio::runtime::Builder::new_current_thread()
    .enable_all()
    .build();
  Some(match runtime {
    Ok(runtime) => runtime.block_on(run),
    Err(err) => Err(err.into()),
  })
}

fn load_config(
  config: Option<PathBuf>,
  handler: Option<PathBuf>,
  listen: SocketAddr,
) -> anyhow::Result<Config> {
  let config = match (config, handler) {
    (Some(path), _) => Config::load(&path)?,
    (None, Some(handler)) => Config::single_handler(&handler, listen)?,
    (None, None) => anyhow::bail!("give a config file (--config outpost.toml) or a handler file"),
  };
  Ok(config)
}

fn serve(config: Config) -> anyhow::Result<()> {
  // Started outside the runtime (it sends from a thread of its own); dropped after it, which
  // flushes the spans still batched.
  let export = OtlpExport::start(&config.tracing).map_err(anyhow::Error::msg)?;
  let tracer = export.as_ref().map(OtlpExport::tracer);
  let runtime = tokio::runtime::Builder::new_multi_thread()
    .enable_all()
    .build()
    .context("starting the tokio runtime")?;
  runtime.block_on(async {
    let node = Node::start_traced(&config, tracer).await?;
    if let Some(address) = node.admin_address() {
      #[allow(
        clippy::print_stdout,
        reason = "the listening addresses are the command's output"
      )]
      {
        println!("outpost admin listening on http://{address}");
      }
    }
    for listener in node.listeners() {
      let scheme = if listener.tls { "https" } else { "http" };
      #[allow(
        clippy::print_stdout,
        reason = "the listening addresses are the command's output"
      )]
      {
        println!("outpost listening on {scheme}://{}", listener.address);
      }
    }
    node.run(shutdown_signal()).await;
    anyhow::Ok(())
  })?;
  // Isolate threads still finishing waitUntil work end with the process.
  Ok(())
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
  let mut failures = 0;
  for listener in &config.listeners {
    if !listener.tls.is_empty()
      && let Err(err) = outpost::tls::server_config(&listener.tls)
    {
      eprintln!("listener {}: {err}", listener.address);
      failures += 1;
    }
  }
  for function in &config.functions {
    let result = FunctionCode::new(&function.name, &function.entry, transpiler.clone())
      .map_err(|err| err.to_string())
      .and_then(|code| {
        check_function(&FunctionSpec::new(config, function, code)).map_err(|err| err.to_string())
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
