//! The `sluice` command line. Thin: every subcommand calls into the library.

mod allocator;

/// mimalloc, called the way its own `malloc` is (src/allocator.rs says why).
#[global_allocator]
static GLOBAL: allocator::MiMalloc = allocator::MiMalloc;

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
        /// Take over the listening sockets of a running sluice (zero-downtime upgrade: start
        /// this, then send SIGQUIT to the old process).
        #[arg(long)]
        upgrade: bool,
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
    /// Generate a token (for a caller or the admin API) and the `token_sha256` to configure.
    #[command(visible_alias = "caller-token")]
    Token,
    /// Make a master key: print `id:base64`, or with --out add it to a key file as the new
    /// active key (older keys stay, so existing records still open until `rotate-key`).
    Keygen {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The TLS interception CA (`[interception]`).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Connector definitions.
    Connector {
        #[command(subcommand)]
        command: ConnectorCommand,
    },
    /// Manage workspace credentials through a running sluice's admin API. The admin token is
    /// read from SLUICE_ADMIN_TOKEN or --token-file, never from the command line.
    Credentials {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        command: CredentialsCommand,
    },
}

#[derive(Subcommand)]
enum ConnectorCommand {
    /// Print a connector definition made from an OpenAPI 3.x document (YAML or JSON):
    /// servers -> allowed_domains, the security scheme -> auth, operations -> actions. What
    /// could not be carried over is listed on stderr. The definition is validated first.
    Import {
        /// The OpenAPI document.
        spec: PathBuf,
        /// The connector_id to give it.
        #[arg(long)]
        id: String,
        /// `toml` (a `[[connector]]` for the config file) or `json` (the admin API's body for
        /// PUT /admin/connectors/{id}).
        #[arg(long, default_value = "toml")]
        format: String,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a new CA for TLS interception: an ECDSA P-256 certificate (PEM) and its key
    /// (PKCS#8 PEM, mode 0600). Refuses to overwrite either file. Name both in
    /// `[interception]`; apps trust the certificate (also served at GET /ca.pem).
    Init {
        #[arg(long, default_value = "data/ca.pem")]
        cert: PathBuf,
        #[arg(long, default_value = "data/ca.key")]
        key: PathBuf,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
    /// The admin API's base URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// A file holding the admin token (else SLUICE_ADMIN_TOKEN).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Store a workspace's credential. Secret fields are read from a terminal prompt, or from
    /// stdin as `name=value` lines; never from the command line.
    Set {
        #[arg(long)]
        workspace: String,
        #[arg(long)]
        connector: String,
        /// Store the workspace as opted out (`enabled: false`).
        #[arg(long)]
        disabled: bool,
    },
    /// List stored credentials (metadata only).
    List {
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Delete a workspace's credential.
    Delete {
        #[arg(long)]
        workspace: String,
        #[arg(long)]
        connector: String,
    },
    /// Re-seal every stored credential under the active master key, while sluice serves.
    RotateKey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, upgrade } => {
            let _log_guard = match sluice::logging::init() {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let snapshot = match Snapshot::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match sluice::server::run(snapshot, upgrade) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca {
            command: CaCommand::Init { cert, key },
        } => match sluice::intercept::init_ca(&cert, &key) {
            Ok(()) => {
                println!(
                    "CA certificate: {}\nCA key (0600): {}",
                    cert.display(),
                    key.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice: {e}");
                ExitCode::FAILURE
            }
        },
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
        Command::Token => {
            let token = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
            let token = format!("slc_{token}");
            let hash = hex::encode(sluice::caller::token_hash(token.as_bytes()));
            println!("token:        {token}");
            println!("token_sha256: {hash}");
            println!("(give the token to its holder; put only token_sha256 in the config)");
            ExitCode::SUCCESS
        }
        Command::Keygen { id, out } => match keygen(id, out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice keygen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Connector { command } => connector(command),
        Command::Credentials { admin, command } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            match runtime.block_on(credentials(admin, command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("sluice credentials: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn connector(command: ConnectorCommand) -> ExitCode {
    let ConnectorCommand::Import { spec, id, format } = command;
    match import(&spec, &id, &format) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice connector import: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `sluice connector import`: the definition as text; notes go to stderr.
fn import(spec: &std::path::Path, id: &str, format: &str) -> Result<String, String> {
    use sluice::import;
    let text = std::fs::read_to_string(spec)
        .map_err(|e| format!("cannot read {}: {e}", spec.display()))?;
    let doc = import::parse_document(&text).map_err(|e| format!("{}: {e}", spec.display()))?;
    let imported = import::import(&doc, id)?;
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    import::check(&imported.connector)?;
    match format {
        "toml" => import::to_toml(&imported.connector),
        "json" => import::to_json(&imported.connector),
        other => Err(format!("--format {other:?}: toml or json")),
    }
}

fn keygen(id: Option<String>, out: Option<PathBuf>) -> Result<(), String> {
    use sluice::credential::crypto::Keyring;
    let id = id.unwrap_or_else(|| format!("k{}", sluice::credential::store::now_unix()));
    let line = Keyring::generate_line(&id)?;
    let Some(path) = out else {
        println!("{}", &*line);
        return Ok(());
    };
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        writeln!(f, "# sluice master keys: the first is active.\n{}", &*line)
            .map_err(|e| e.to_string())?;
        eprintln!("wrote {} with active key {id}", path.display());
        return Ok(());
    }
    let old = zeroize::Zeroizing::new(
        std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let existing = Keyring::parse(&old).map_err(|e| format!("{}: {e}", path.display()))?;
    if existing.has_key(&id) {
        return Err(format!("{} already has a key {id:?}", path.display()));
    }
    // Comments first, then the new active key, then the old keys in their order.
    let (comments, keys): (Vec<&str>, Vec<&str>) = old
        .lines()
        .filter(|l| !l.trim().is_empty())
        .partition(|l| l.trim_start().starts_with('#'));
    let mut text = zeroize::Zeroizing::new(String::new());
    for l in comments {
        text.push_str(l);
        text.push('\n');
    }
    text.push_str(&line);
    text.push('\n');
    for l in keys {
        text.push_str(l);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
        f.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    eprintln!(
        "added key {id} to {} as the active key; restart sluice, then run `sluice credentials rotate-key`",
        path.display()
    );
    Ok(())
}

fn admin_token(args: &AdminArgs) -> Result<zeroize::Zeroizing<String>, String> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        None => std::env::var("SLUICE_ADMIN_TOKEN")
            .map_err(|_| "set SLUICE_ADMIN_TOKEN or pass --token-file".to_string())?,
    };
    Ok(zeroize::Zeroizing::new(token.trim().to_string()))
}

/// Read `name=value` lines from stdin, or prompt for each of the connector's fields.
async fn read_fields(
    client: &reqwest::Client,
    base: &str,
    connector: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    use std::io::{BufRead, IsTerminal};
    let mut fields = serde_json::Map::new();
    if std::io::stdin().is_terminal() {
        let def: serde_json::Value = client
            .get(format!("{base}/admin/connectors/{connector}"))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .error_for_status()
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let schema = def["auth_schema"]["fields"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for f in schema {
            let name = f["name"].as_str().unwrap_or_default().to_string();
            let label = f["label"].as_str().unwrap_or(&name).to_string();
            let value = rpassword::prompt_password(format!("{label} ({name}): "))
                .map_err(|e| e.to_string())?;
            if !value.is_empty() {
                fields.insert(name, serde_json::Value::String(value));
            }
        }
    } else {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| e.to_string())?;
            if line.trim().is_empty() {
                continue;
            }
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| "stdin lines must be name=value".to_string())?;
            fields.insert(
                name.trim().to_string(),
                serde_json::Value::String(value.to_string()),
            );
        }
    }
    Ok(fields)
}

async fn credentials(args: AdminArgs, command: CredentialsCommand) -> Result<(), String> {
    let token = admin_token(&args)?;
    let mut headers = reqwest::header::HeaderMap::new();
    let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", &*token))
        .map_err(|_| "the admin token is not a valid header value".to_string())?;
    auth.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, auth);
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let base = args.admin.trim_end_matches('/').to_string();
    let request = match command {
        CredentialsCommand::Set {
            workspace,
            connector,
            disabled,
        } => {
            let fields = read_fields(&client, &base, &connector).await?;
            client
                .put(format!(
                    "{base}/admin/workspaces/{workspace}/credentials/{connector}"
                ))
                .json(&serde_json::json!({ "enabled": !disabled, "fields": fields }))
        }
        CredentialsCommand::List { workspace } => {
            let mut url = format!("{base}/admin/credentials");
            if let Some(w) = workspace {
                url.push_str(&format!("?workspace={w}"));
            }
            client.get(url)
        }
        CredentialsCommand::Delete {
            workspace,
            connector,
        } => client.delete(format!(
            "{base}/admin/workspaces/{workspace}/credentials/{connector}"
        )),
        CredentialsCommand::RotateKey => client.post(format!("{base}/admin/keys/rotate")),
    };
    let resp = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {base}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    let pretty = serde_json::from_str::<serde_json::Value>(&body)
        .map(|v| serde_json::to_string_pretty(&v).expect("serialises"))
        .unwrap_or(body);
    if status.is_success() {
        println!("{pretty}");
        Ok(())
    } else {
        Err(format!("{status}: {pretty}"))
    }
}
