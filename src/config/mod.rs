//! Configuration: `sluice.toml` → [`file::FileConfig`] (strict serde) → [`Snapshot`] (validated,
//! typed, immutable).
//!
//! A snapshot is built completely off the hot path and then published whole; a request holds the
//! `Arc<Snapshot>` it started with. Validation collects every problem it finds, each naming the
//! key it is about, so `sluice check-config` can print them all at once. Relative paths in the
//! file are resolved against the directory the file is in.

mod connector;
pub mod file;
pub mod reload;
mod tenants;
#[cfg(test)]
mod tests;
mod validate;

use crate::fastmap::FastMap as HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use ipnetwork::IpNetwork;

use crate::caller::Callers;
pub use crate::credential::inject::AuthType;
use crate::credential::inject::Injection;
pub use crate::credential::{Credentials, KeySource, Store, StoreKind};
use crate::policy::domain::DomainList;
use crate::policy::resolver::Resolver;
use crate::policy::{ConnectorRules, Egress, Rules};
pub use crate::upstream::Upstream;
use file::FileConfig;

/// The kind of value a credential form field holds (`auth_schema.fields[].type`); the admin
/// API checks a written value against it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum FieldType {
    Text,
    Password,
    Url,
    Email,
    Number,
}

impl FieldType {
    /// Whether a written value is of this kind. Text and passwords are anything; the others
    /// are checked loosely (a provider's own rules are stricter), enough to catch a value
    /// typed into the wrong field.
    pub fn accepts(self, value: &str) -> bool {
        match self {
            Self::Text | Self::Password => true,
            Self::Url => {
                ["https://", "http://"].iter().any(|scheme| {
                    value
                        .strip_prefix(scheme)
                        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
                }) && !value.contains(char::is_whitespace)
            }
            Self::Email => {
                value.split_once('@').is_some_and(|(local, domain)| {
                    !local.is_empty() && domain.contains('.') && !domain.contains('@')
                }) && !value.contains(char::is_whitespace)
            }
            Self::Number => value.parse::<f64>().is_ok_and(f64::is_finite),
        }
    }
}

/// One field of the credential form a workspace fills in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthField {
    pub name: String,
    pub label: String,
    pub field_type: FieldType,
    pub required: bool,
}

pub use crate::action::{Action, BodyField};

/// A connector definition.
#[derive(Debug, Clone)]
pub struct Connector {
    pub id: String,
    pub display_name: String,
    pub auth_type: AuthType,
    pub auth_fields: Vec<AuthField>,
    pub actions: Vec<Action>,
    pub allowed_domains: DomainList,
    pub allowed_ports: Vec<u16>,
    pub enabled: bool,
    /// How the workspace's credential is attached upstream. Shared: a credential keeps its
    /// rendering under these rules, told apart from a reload's by `Arc` identity
    /// ([`Connected::render`]).
    ///
    /// [`Connected::render`]: crate::credential::Connected::render
    pub injection: Arc<Injection>,
    /// `auth_type = "oauth2"`: endpoints, client and token lifecycle settings.
    pub oauth2: Option<Arc<crate::credential::oauth::OAuth2>>,
    /// Pacing: initial bucket, scope, wait limits, which headers to learn from.
    pub rate_limit: crate::ratelimit::RateLimit,
    /// Which failures are tried again, when, and for how long.
    pub retry: crate::ratelimit::retry::RetryPolicy,
    /// When an upstream host is failing, fail fast for a while.
    pub breaker: crate::ratelimit::breaker::BreakerPolicy,
    /// `[connector.tls]`: client certificate, extra CA, minimum TLS version.
    pub tls: crate::upstream::ConnectorTls,
    /// Metric handles for its forwarded requests, resolved once.
    pub metrics: crate::telemetry::ConnectorMetrics,
}

/// An org and its optional allowlist (`None`: the org adds no restriction).
#[derive(Debug, Clone)]
pub struct Org {
    pub id: String,
    pub allowlist: Option<DomainList>,
}

/// A workspace (tenant) and the org it belongs to. Every request looks its workspace up;
/// ids of up to 24 bytes are kept inline, in the map's own slot, so that lookup reads no
/// separate heap string (`fastmap::PairKey` says why).
#[derive(Debug, Clone)]
pub struct Workspace {
    pub id: CompactString,
    pub org: CompactString,
}

/// `[listener]`.
#[derive(Debug, Clone)]
pub struct Listener {
    pub address: SocketAddr,
    pub dev_mode_unauthenticated: bool,
    pub threads: usize,
    /// After SIGTERM, sluice stops accepting and gives requests in flight this long (pingora
    /// waits the whole period, then stops its runtimes; whatever is still running is cut).
    pub shutdown_grace: Duration,
    /// The limit for the final step (stopping runtimes and blocking work).
    pub shutdown_timeout: Duration,
    /// Where a new sluice picks up the listening sockets in a zero-downtime upgrade.
    pub upgrade_sock: PathBuf,
    pub pid_file: PathBuf,
    /// Most header fields a request may carry (431 beyond).
    pub max_header_count: usize,
    /// Largest request head (request line and header lines) in bytes (431 beyond).
    pub max_header_bytes: usize,
}

/// Header limits: Envoy's defaults (100 headers, 60 KiB). pingora's HTTP/1 parser has hard
/// limits of its own (256 header fields, 1 MiB of head): past those it answers a bare 400
/// itself, so sluice's limits may not exceed them.
pub const DEFAULT_MAX_HEADER_COUNT: usize = 100;
pub const DEFAULT_MAX_HEADER_BYTES: usize = 60 * 1024;
pub const PARSER_MAX_HEADER_COUNT: usize = 256;
pub const PARSER_MAX_HEADER_BYTES: usize = 1_048_575;

/// Connectors, orgs and workspaces created through the admin API and persisted in the store.
/// They are merged with the TOML file's and validated with it; ids may not clash with the
/// file's (the file's entries are read-only through the API).
#[derive(Debug, Clone, Default)]
pub struct Definitions {
    pub connectors: Vec<file::ConnectorFile>,
    pub orgs: Vec<file::OrgFile>,
    pub workspaces: Vec<file::WorkspaceFile>,
}

/// Where a definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Toml,
    Api,
}

/// Every definition as written, for the admin API to show.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub connectors: std::collections::BTreeMap<String, (Origin, file::ConnectorFile)>,
    pub orgs: std::collections::BTreeMap<String, (Origin, file::OrgFile)>,
    pub workspaces: std::collections::BTreeMap<String, (Origin, file::WorkspaceFile)>,
}

/// A validated, immutable configuration. Requests share it through an `Arc`.
pub struct Snapshot {
    /// The file this came from (for messages).
    pub source: PathBuf,
    pub listener: Listener,
    pub upstream: Upstream,
    /// Operator exceptions to the special-purpose address policy.
    pub exception_cidrs: Vec<IpNetwork>,
    /// Shared: a request keeps its connector (`RequestState::connector`) without a lookup.
    pub connectors: HashMap<String, Arc<Connector>>,
    pub orgs: HashMap<String, Org>,
    pub workspaces: HashMap<CompactString, Workspace>,
    pub callers: Callers,
    pub resolver: Resolver,
    /// `None` when no connector needs a credential and `[credentials]` is absent.
    pub credentials: Option<Credentials>,
    /// `None`: no admin listener.
    pub admin: Option<Admin>,
    /// `None`: TLS inside CONNECT tunnels is refused.
    pub interception: Option<Interception>,
    /// The definitions as written, with their origin.
    pub sources: Sources,
    /// The TOML text this snapshot was built from (to rebuild with new definitions).
    pub toml_text: Arc<str>,
}

/// `[interception]`: where sluice's CA lives (the key is read at startup, never kept here)
/// and how leaves are minted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    pub ca_cert_file: PathBuf,
    pub ca_key_file: PathBuf,
    /// The CA certificate as PEM, served at `GET /ca.pem`.
    pub ca_cert_pem: String,
    pub leaf_lifetime: Duration,
    pub cache_capacity: u64,
}

/// `[admin]`: the admin API's listener and the SHA-256 of its bearer token.
#[derive(Debug, Clone)]
pub struct Admin {
    pub address: SocketAddr,
    pub token_sha256: [u8; 32],
}

/// One validation problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

/// Every problem found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}: {}", self.file.display(), e.key, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Snapshot {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Snapshot, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.to_path_buf(),
            errors: vec![ConfigError {
                key: "(file)".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Self::from_toml(&text, path)
    }

    /// Parse and validate TOML text that came from `path` (relative paths resolve against its
    /// directory).
    pub fn from_toml(text: &str, path: &Path) -> Result<Snapshot, ConfigErrors> {
        Self::from_toml_with(text, path, &Definitions::default())
    }

    /// The TOML text merged with definitions from the store.
    pub fn from_toml_with(
        text: &str,
        path: &Path,
        defs: &Definitions,
    ) -> Result<Snapshot, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            file: path.to_path_buf(),
            errors,
        };
        let mut raw: FileConfig = toml::from_str(text).map_err(|e| {
            fail(vec![ConfigError {
                key: parse_error_key(&e, text),
                message: e.message().to_string(),
            }])
        })?;
        let sources = merge(&mut raw, defs).map_err(fail)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut snap = validate::validate(raw, path, base).map_err(fail)?;
        snap.sources = sources;
        snap.toml_text = Arc::from(text);
        Ok(snap)
    }

    /// The address classes the operator has let through, for the startup warning.
    pub fn exception_warnings(&self) -> impl Iterator<Item = &IpNetwork> {
        self.exception_cidrs.iter()
    }
}

impl Connector {
    /// What the policy checks of this connector.
    pub fn rules(&self) -> ConnectorRules<'_> {
        ConnectorRules {
            id: &self.id,
            display_name: &self.display_name,
            enabled: self.enabled,
            allowed_domains: &self.allowed_domains,
            allowed_ports: &self.allowed_ports,
        }
    }
}

/// The policy's narrow view of a snapshot.
impl Rules for Snapshot {
    fn connector(&self, id: &str) -> Option<ConnectorRules<'_>> {
        self.connectors.get(id).map(|c| c.rules())
    }

    fn workspace_org(&self, workspace: &str) -> Option<&str> {
        self.workspaces.get(workspace).map(|w| w.org.as_str())
    }

    fn org_allowlist(&self, org: &str) -> Option<&DomainList> {
        self.orgs.get(org).and_then(|o| o.allowlist.as_ref())
    }

    fn egress(&self) -> Egress<'_> {
        Egress {
            resolver: &self.resolver,
            exception_cidrs: &self.exception_cidrs,
            listener: self.listener.address,
        }
    }
}

/// Append the store's definitions to the file's, refusing ids the file already defines.
fn merge(raw: &mut FileConfig, defs: &Definitions) -> Result<Sources, Vec<ConfigError>> {
    let mut sources = Sources::default();
    let mut errors = Vec::new();
    merge_kind(
        &mut raw.connectors,
        &defs.connectors,
        &mut sources.connectors,
        "connector",
        |c| &c.connector_id,
        &mut errors,
    );
    merge_kind(
        &mut raw.orgs,
        &defs.orgs,
        &mut sources.orgs,
        "org",
        |o| &o.org_id,
        &mut errors,
    );
    merge_kind(
        &mut raw.workspaces,
        &defs.workspaces,
        &mut sources.workspaces,
        "workspace",
        |w| &w.workspace_id,
        &mut errors,
    );
    if errors.is_empty() {
        Ok(sources)
    } else {
        Err(errors)
    }
}

/// One kind of definition: record the file's entries, then append the store's, each id once.
fn merge_kind<T: Clone>(
    file: &mut Vec<T>,
    stored: &[T],
    sources: &mut std::collections::BTreeMap<String, (Origin, T)>,
    kind: &str,
    id: impl Fn(&T) -> &String,
    errors: &mut Vec<ConfigError>,
) {
    for item in file.iter() {
        sources.insert(id(item).clone(), (Origin::Toml, item.clone()));
    }
    for item in stored {
        if sources
            .insert(id(item).clone(), (Origin::Api, item.clone()))
            .is_some()
        {
            errors.push(ConfigError {
                key: format!("{kind}[{}]", id(item)),
                message: "defined in the TOML file, which the admin API cannot change".into(),
            });
        }
        file.push(item.clone());
    }
}

/// Name the place a parse error points at: `line N, column M` (serde errors from unknown keys
/// name the key in the message itself).
fn parse_error_key(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {col}")
        }
        None => "(parse)".into(),
    }
}
