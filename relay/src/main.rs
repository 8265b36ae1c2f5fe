//! The bussig-relay command: arguments, logging, the runtime, and the signals that stop it. The
//! relay itself is the library (`lib.rs`).
//!
//! Exit status: 0 after a clean shutdown (or `--check` passing), 1 when a server cannot be reached
//! at start, 2 when the configuration is wrong or does not fit the servers it names.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bussig_relay::{Config, LogFormat, StartError};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

const CONFIG_ENV: &str = "BUSSIG_RELAY_CONFIG";
const DEFAULT_CONFIG: &str = "bussig-relay.toml";

const USAGE: &str = "usage: bussig-relay [--config FILE] [--check]

Moves messages from bussig queues to NATS JetStream and from JetStream consumers into bussig
(see the README's \"Relay to NATS JetStream\").

  --config FILE   the TOML configuration (default: $BUSSIG_RELAY_CONFIG, else bussig-relay.toml)
  --check         check the configuration, the queues and the streams, then exit
  --version       print the version

Environment: DATABASE_URL, NATS_URL and BUSSIG_RELAY_METRICS_ADDRESS override the file;
RUST_LOG sets the log level (default info).";

struct Arguments {
    config: PathBuf,
    check: bool,
}

/// None when the arguments asked for help or the version, which are printed here.
fn parse_arguments() -> Result<Option<Arguments>, StartError> {
    let mut config = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
    let mut check = false;
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--config" | "-c") => {
                let path = args.next().ok_or_else(|| {
                    StartError::Usage(format!("--config needs a file\n\n{USAGE}"))
                })?;
                config = Some(PathBuf::from(path));
            }
            Some("--check") => check = true,
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(None);
            }
            Some("--version" | "-V") => {
                println!("bussig-relay {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            _ => {
                return Err(StartError::Usage(format!(
                    "unknown argument {}\n\n{USAGE}",
                    arg.to_string_lossy()
                )))
            }
        }
    }
    Ok(Some(Arguments {
        config: config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)),
        check,
    }))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn signalled() {
    let mut terminate = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let received = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    info!(signal = received, "signal received");
}

async fn start(arguments: Arguments) -> Result<(), StartError> {
    let config = Config::load(&arguments.config, |name| std::env::var(name).ok())?;
    init_logging(config.log_format);
    bussig_relay::run(Arc::new(config), arguments.check, signalled()).await
}

fn main() -> ExitCode {
    let arguments = match parse_arguments() {
        Ok(Some(arguments)) => arguments,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bussig-relay: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    match runtime.block_on(start(arguments)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("bussig-relay: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
