//! The `sluice` command line. Thin: every subcommand calls into the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::{Parser, Subcommand};
use sluice::config::Snapshot;

#[derive(Parser)]
#[command(name = "sluice", version, about = "An egress gateway for SaaS APIs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, default_value = "config/sluice.toml")]
        config: PathBuf,
    },
    /// Validate a config file; print every error, exit non-zero on any.
    CheckConfig { file: PathBuf },
    /// Print each policy check for a URL, the resolved addresses and the verdict. Sends nothing
    /// upstream.
    Explain {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        connector: String,
        #[arg(long)]
        workspace: String,
        /// Also check that this caller may act for the workspace.
        #[arg(long)]
        caller: Option<String>,
        /// The URL as the app would send it, e.g. http://api.hubspot.com/crm/v3/objects
        url: String,
    },
    /// Generate a caller token and the `token_sha256` to put in the config.
    CallerToken,
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("SLUICE_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            init_logging();
            let snapshot = match Snapshot::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match sluice::server::run(snapshot) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { file } => match Snapshot::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{} error(s)", e.errors.len());
                ExitCode::FAILURE
            }
        },
        Command::Explain {
            config,
            connector,
            workspace,
            caller,
            url,
        } => {
            let snapshot = match Snapshot::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            let (report, allowed) = runtime.block_on(sluice::explain::explain(
                &snapshot,
                caller.as_deref(),
                &connector,
                &workspace,
                &url,
            ));
            print!("{report}");
            if allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Command::CallerToken => {
            let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
            let token = format!("slc_{token}");
            let hash = hex::encode(sluice::caller::token_hash(token.as_bytes()));
            println!("token:        {token}");
            println!("token_sha256: {hash}");
            println!("(give the token to the app; put only token_sha256 in the [[caller]] entry)");
            ExitCode::SUCCESS
        }
    }
}
