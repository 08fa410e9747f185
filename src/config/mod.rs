//! Configuration: `sluice.toml` → [`file::FileConfig`] (strict serde) → [`Snapshot`] (validated,
//! typed, immutable).
//!
//! A snapshot is built completely off the hot path and then published whole; a request holds the
//! `Arc<Snapshot>` it started with. Validation collects every problem it finds, each naming the
//! key it is about, so `sluice check-config` can print them all at once. Relative paths in the
//! file are resolved against the directory the file is in.

pub mod file;
pub mod reload;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;

use crate::caller::{Caller, Callers, WorkspaceScope};
use crate::credential::VaultSettings;
use crate::credential::inject::Injection;
pub use crate::credential::{Credentials, KeySource, StoreKind};
use crate::names::{Host, is_identifier, parse_host};
use crate::policy::domain::{DomainList, DomainPattern};
use crate::policy::resolver::{Resolver, ResolverSettings};
use crate::policy::{ConnectorRules, Egress, Rules};
pub use crate::upstream::Upstream;
use file::FileConfig;

/// How a connector authenticates to its upstream. Injection arrives with the credential vault;
/// for now the type is parsed and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    None,
    ApiKey,
    Basic,
    Bearer,
    OAuth2,
}

impl AuthType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => AuthType::None,
            "api_key" => AuthType::ApiKey,
            "basic" => AuthType::Basic,
            "bearer" => AuthType::Bearer,
            "oauth2" => AuthType::OAuth2,
            _ => return None,
        })
    }
}

/// One field of the credential form a workspace fills in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthField {
    pub name: String,
    pub label: String,
    pub field_type: String,
    pub required: bool,
}

/// An action org admins can pick (the spec's `actions[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub action_id: String,
    pub http_method: http::Method,
    pub url_template: String,
    pub body_schema: Vec<(String, String)>,
}

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
    /// How the workspace's credential is attached upstream.
    pub injection: Injection,
    /// `auth_type = "oauth2"`: endpoints, client and token lifecycle settings.
    pub oauth2: Option<Arc<crate::credential::oauth::OAuth2>>,
    /// Pacing: initial bucket, scope, wait limits, which headers to learn from.
    pub rate_limit: crate::ratelimit::RateLimit,
    /// Which failures are tried again, when, and for how long.
    pub retry: crate::ratelimit::retry::RetryPolicy,
    /// When an upstream host is failing, fail fast for a while.
    pub breaker: crate::ratelimit::breaker::BreakerPolicy,
}

/// An org and its optional allowlist (`None`: the org adds no restriction).
#[derive(Debug, Clone)]
pub struct Org {
    pub id: String,
    pub allowlist: Option<DomainList>,
}

/// A workspace (tenant) and the org it belongs to.
#[derive(Debug, Clone)]
pub struct Workspace {
    pub id: String,
    pub org: String,
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
    /// Shared: a request keeps its connector (`RequestCtx::connector`) without a lookup.
    pub connectors: HashMap<String, Arc<Connector>>,
    pub orgs: HashMap<String, Org>,
    pub workspaces: HashMap<String, Workspace>,
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
        let mut snap = validate(raw, path, base).map_err(fail)?;
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

struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            message: message.into(),
        });
    }
}

fn duration_ms(errors: &mut Errors, key: &str, ms: u64) -> Duration {
    if ms == 0 {
        errors.push(key, "must be greater than 0");
    }
    Duration::from_millis(ms)
}

fn domain_list(errors: &mut Errors, key: &str, raw: &[String]) -> DomainList {
    if raw.is_empty() {
        errors.push(
            key,
            "must list at least one domain (an empty list would refuse every request)",
        );
    }
    let mut patterns = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        match DomainPattern::parse(p) {
            Ok(p) => patterns.push(p),
            Err(e) => errors.push(format!("{key}[{i}]"), e),
        }
    }
    DomainList::new(patterns)
}

fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn validate(raw: FileConfig, source: &Path, base: &Path) -> Result<Snapshot, Vec<ConfigError>> {
    let mut errors = Errors(Vec::new());

    // [listener]
    let address = match raw.listener.address.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            errors.push(
                "listener.address",
                format!("{:?} is not an IP:port address", raw.listener.address),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    if raw.listener.dev_mode_unauthenticated && !address.ip().is_loopback() {
        errors.push(
            "listener.dev_mode_unauthenticated",
            format!(
                "only allowed when listener.address is a loopback address, not {}",
                address.ip()
            ),
        );
    }
    let threads = raw.listener.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if threads == 0 {
        errors.push("listener.threads", "must be at least 1");
    }
    let max_header_count = raw
        .listener
        .max_header_count
        .unwrap_or(DEFAULT_MAX_HEADER_COUNT);
    if !(1..=PARSER_MAX_HEADER_COUNT).contains(&max_header_count) {
        errors.push(
            "listener.max_header_count",
            format!("must be 1..={PARSER_MAX_HEADER_COUNT} (pingora's parser limit)"),
        );
    }
    let max_header_bytes = raw
        .listener
        .max_header_bytes
        .unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if !(1024..=PARSER_MAX_HEADER_BYTES).contains(&max_header_bytes) {
        errors.push(
            "listener.max_header_bytes",
            format!("must be 1024..={PARSER_MAX_HEADER_BYTES} (pingora's parser limit)"),
        );
    }
    let listener = Listener {
        address,
        dev_mode_unauthenticated: raw.listener.dev_mode_unauthenticated,
        threads,
        shutdown_grace: Duration::from_millis(raw.listener.shutdown_grace_ms.unwrap_or(30_000)),
        shutdown_timeout: Duration::from_millis(raw.listener.shutdown_timeout_ms.unwrap_or(5_000)),
        upgrade_sock: raw.listener.upgrade_sock.as_ref().map_or_else(
            || PathBuf::from("/tmp/sluice_upgrade.sock"),
            |p| resolve_path(base, p),
        ),
        pid_file: raw.listener.pid_file.as_ref().map_or_else(
            || PathBuf::from("/tmp/sluice.pid"),
            |p| resolve_path(base, p),
        ),
        max_header_count,
        max_header_bytes,
    };

    // [upstream]
    let u = &raw.upstream;
    let extra_ca_file = u.extra_ca_file.as_ref().map(|p| resolve_path(base, p));
    if let Some(path) = &extra_ca_file {
        if let Err(e) = crate::files::read_ca_file(path) {
            errors.push("upstream.extra_ca_file", e);
        }
    }
    let upstream = Upstream {
        extra_ca_file,
        connect_timeout: duration_ms(
            &mut errors,
            "upstream.connect_timeout_ms",
            u.connect_timeout_ms,
        ),
        tls_handshake_timeout: duration_ms(
            &mut errors,
            "upstream.tls_handshake_timeout_ms",
            u.tls_handshake_timeout_ms,
        ),
        read_timeout: duration_ms(&mut errors, "upstream.read_timeout_ms", u.read_timeout_ms),
        write_timeout: duration_ms(&mut errors, "upstream.write_timeout_ms", u.write_timeout_ms),
        idle_timeout: duration_ms(&mut errors, "upstream.idle_timeout_ms", u.idle_timeout_ms),
        pool_size: u.pool_size,
    };

    // [egress]
    let mut exception_cidrs = Vec::new();
    for (i, c) in raw.egress.exception_cidrs.iter().enumerate() {
        match c.parse::<IpNetwork>() {
            Ok(net) if net.prefix() == 0 => errors.push(
                format!("egress.exception_cidrs[{i}]"),
                format!("{c:?} would switch the address policy off entirely"),
            ),
            Ok(net) => exception_cidrs.push(net),
            Err(e) => errors.push(
                format!("egress.exception_cidrs[{i}]"),
                format!("{c:?}: {e}"),
            ),
        }
    }

    // [dns]
    let d = &raw.dns;
    let mut nameservers = Vec::new();
    for (i, ns) in d.nameservers.iter().enumerate() {
        let parsed = ns
            .parse::<SocketAddr>()
            .or_else(|_| ns.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)));
        match parsed {
            Ok(a) => nameservers.push(a),
            Err(_) => errors.push(
                format!("dns.nameservers[{i}]"),
                format!("{ns:?} is not an IP or IP:port"),
            ),
        }
    }
    let mut static_hosts = HashMap::new();
    for (name, ips) in &d.static_hosts {
        let key = format!("dns.static_hosts.{name:?}");
        let host = match parse_host(name) {
            Ok(Host::Name(n)) => n,
            Ok(_) => {
                errors.push(&key, "must be a host name, not an IP literal");
                continue;
            }
            Err(e) => {
                errors.push(&key, e);
                continue;
            }
        };
        if ips.is_empty() {
            errors.push(&key, "must map to at least one address");
        }
        let mut addrs = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            match ip.parse::<IpAddr>() {
                Ok(ip) => addrs.push(ip),
                Err(_) => errors.push(
                    format!("{key}[{i}]"),
                    format!("{ip:?} is not an IP address"),
                ),
            }
        }
        static_hosts.insert(host, addrs);
    }
    let dns_timeout = duration_ms(&mut errors, "dns.timeout_ms", d.timeout_ms);
    if d.attempts == 0 {
        errors.push("dns.attempts", "must be at least 1");
    }

    // [[connector]]
    let mut connectors = HashMap::new();
    for (i, c) in raw.connectors.into_iter().enumerate() {
        let key = if is_identifier(c.connector_id.as_bytes()) {
            format!("connector[{}]", c.connector_id)
        } else {
            errors.push(
                format!("connector[{i}].connector_id"),
                format!(
                    "{:?} is not an identifier (letters, digits, '_', '-', '.')",
                    c.connector_id
                ),
            );
            format!("connector[{i}]")
        };
        if c.display_name.trim().is_empty() {
            errors.push(format!("{key}.display_name"), "must not be empty");
        }
        let auth_type = AuthType::parse(&c.auth_type).unwrap_or_else(|| {
            errors.push(
                format!("{key}.auth_type"),
                format!(
                    "{:?} is not one of none, api_key, basic, bearer, oauth2",
                    c.auth_type
                ),
            );
            AuthType::None
        });
        let mut field_names = HashSet::new();
        let mut auth_fields = Vec::new();
        for (j, f) in c.auth_schema.fields.into_iter().enumerate() {
            let fkey = format!("{key}.auth_schema.fields[{j}]");
            if !is_identifier(f.name.as_bytes()) {
                errors.push(
                    format!("{fkey}.name"),
                    format!("{:?} is not an identifier", f.name),
                );
            } else if !field_names.insert(f.name.clone()) {
                errors.push(
                    format!("{fkey}.name"),
                    format!("duplicate field {:?}", f.name),
                );
            }
            if !matches!(
                f.field_type.as_str(),
                "text" | "password" | "url" | "email" | "number"
            ) {
                errors.push(
                    format!("{fkey}.type"),
                    format!(
                        "{:?} is not one of text, password, url, email, number",
                        f.field_type
                    ),
                );
            }
            auth_fields.push(AuthField {
                name: f.name,
                label: f.label,
                field_type: f.field_type,
                required: f.required,
            });
        }
        let allowed_domains = domain_list(
            &mut errors,
            &format!("{key}.allowed_domains"),
            &c.allowed_domains,
        );
        let allowed_ports = c.allowed_ports.unwrap_or_else(|| vec![443]);
        if allowed_ports.is_empty() {
            errors.push(
                format!("{key}.allowed_ports"),
                "must list at least one port",
            );
        }
        if allowed_ports.contains(&0) {
            errors.push(format!("{key}.allowed_ports"), "0 is not a port");
        }
        let mut action_ids = HashSet::new();
        let mut actions = Vec::new();
        for (j, a) in c.actions.into_iter().enumerate() {
            let akey = format!("{key}.actions[{j}]");
            if !is_identifier(a.action_id.as_bytes()) {
                errors.push(
                    format!("{akey}.action_id"),
                    format!("{:?} is not an identifier", a.action_id),
                );
            } else if !action_ids.insert(a.action_id.clone()) {
                errors.push(
                    format!("{akey}.action_id"),
                    format!("duplicate action {:?}", a.action_id),
                );
            }
            let method = match http::Method::from_bytes(a.http_method.as_bytes()) {
                Ok(m) if a.http_method.bytes().all(|b| b.is_ascii_uppercase()) => m,
                _ => {
                    errors.push(
                        format!("{akey}.http_method"),
                        format!("{:?} is not an upper-case HTTP method", a.http_method),
                    );
                    http::Method::GET
                }
            };
            check_url_template(
                &mut errors,
                &format!("{akey}.url_template"),
                &a.url_template,
                &allowed_domains,
            );
            actions.push(Action {
                action_id: a.action_id,
                http_method: method,
                url_template: a.url_template,
                body_schema: a
                    .body_schema
                    .into_iter()
                    .map(|b| (b.name, b.label))
                    .collect(),
            });
        }
        // OAuth credentials hold the fields sluice manages, not a form the workspace fills in.
        let field_list: Vec<String> = if c.auth_type == "oauth2" {
            vec![crate::credential::oauth::ACCESS_TOKEN.to_string()]
        } else {
            auth_fields.iter().map(|f| f.name.clone()).collect()
        };
        let injection = match Injection::build(&c.auth_type, &c.inject, &field_list) {
            Ok(i) => i,
            Err(errs) => {
                for e in errs {
                    errors.push(format!("{key}.inject"), e);
                }
                Injection::default()
            }
        };
        let allowed_ports_for_oauth = allowed_ports.clone();
        let oauth2 = match (&c.oauth2, c.auth_type.as_str()) {
            (Some(o), "oauth2") => {
                match crate::credential::oauth::OAuth2::build(
                    o,
                    &allowed_domains,
                    &allowed_ports_for_oauth,
                    base,
                ) {
                    Ok(o) => Some(Arc::new(o)),
                    Err(errs) => {
                        for (k, e) in errs {
                            errors.push(format!("{key}.oauth2.{k}"), e);
                        }
                        None
                    }
                }
            }
            (None, "oauth2") => {
                errors.push(
                    format!("{key}.oauth2"),
                    "auth_type oauth2 needs an [connector.oauth2] section",
                );
                None
            }
            (Some(_), _) => {
                errors.push(format!("{key}.oauth2"), "only for auth_type = \"oauth2\"");
                None
            }
            (None, _) => None,
        };
        let rate_limit = match c
            .rate_limit
            .as_ref()
            .map(crate::ratelimit::RateLimit::build)
        {
            None => crate::ratelimit::RateLimit::default(),
            Some(Ok(rl)) => rl,
            Some(Err(errs)) => {
                for (k, e) in errs {
                    errors.push(format!("{key}.rate_limit.{k}"), e);
                }
                crate::ratelimit::RateLimit::default()
            }
        };
        let retry = match c
            .retry
            .as_ref()
            .map(crate::ratelimit::retry::RetryPolicy::build)
        {
            None => crate::ratelimit::retry::RetryPolicy::default(),
            Some(Ok(r)) => r,
            Some(Err(errs)) => {
                for (k, e) in errs {
                    errors.push(format!("{key}.retry.{k}"), e);
                }
                crate::ratelimit::retry::RetryPolicy::default()
            }
        };
        let breaker = match c
            .circuit_breaker
            .as_ref()
            .map(crate::ratelimit::breaker::BreakerPolicy::build)
        {
            None => crate::ratelimit::breaker::BreakerPolicy::default(),
            Some(Ok(b)) => b,
            Some(Err(errs)) => {
                for (k, e) in errs {
                    errors.push(format!("{key}.circuit_breaker.{k}"), e);
                }
                crate::ratelimit::breaker::BreakerPolicy::default()
            }
        };
        let connector = Connector {
            breaker,
            retry,
            rate_limit,
            oauth2,
            injection,
            id: c.connector_id.clone(),
            display_name: c.display_name,
            auth_type,
            auth_fields,
            actions,
            allowed_domains,
            allowed_ports,
            enabled: c.enabled,
        };
        if connectors
            .insert(c.connector_id.clone(), Arc::new(connector))
            .is_some()
        {
            errors.push(format!("{key}.connector_id"), "duplicate connector_id");
        }
    }

    // [[org]]
    let mut orgs = HashMap::new();
    for (i, o) in raw.orgs.into_iter().enumerate() {
        let key = format!("org[{i}]");
        if !is_identifier(o.org_id.as_bytes()) {
            errors.push(
                format!("{key}.org_id"),
                format!("{:?} is not an identifier", o.org_id),
            );
        }
        let allowlist = o.allowed_domains.as_ref().map(|d| {
            domain_list(
                &mut errors,
                &format!("org[{}].allowed_domains", o.org_id),
                d,
            )
        });
        let org = Org {
            id: o.org_id.clone(),
            allowlist,
        };
        if orgs.insert(o.org_id.clone(), org).is_some() {
            errors.push(
                format!("{key}.org_id"),
                format!("duplicate org_id {:?}", o.org_id),
            );
        }
    }

    // [[workspace]]
    let mut workspaces = HashMap::new();
    for (i, w) in raw.workspaces.into_iter().enumerate() {
        let key = format!("workspace[{i}]");
        if !is_identifier(w.workspace_id.as_bytes()) {
            errors.push(
                format!("{key}.workspace_id"),
                format!("{:?} is not an identifier", w.workspace_id),
            );
        }
        if !orgs.contains_key(&w.org) {
            errors.push(
                format!("{key}.org"),
                format!("no [[org]] with org_id {:?}", w.org),
            );
        }
        let ws = Workspace {
            id: w.workspace_id.clone(),
            org: w.org,
        };
        if workspaces.insert(w.workspace_id.clone(), ws).is_some() {
            errors.push(
                format!("{key}.workspace_id"),
                format!("duplicate workspace_id {:?}", w.workspace_id),
            );
        }
    }

    // [[caller]]
    let mut by_hash = HashMap::new();
    let mut caller_names = HashSet::new();
    for (i, c) in raw.callers.into_iter().enumerate() {
        let key = format!("caller[{i}]");
        if !is_identifier(c.name.as_bytes()) {
            errors.push(
                format!("{key}.name"),
                format!("{:?} is not an identifier", c.name),
            );
        } else if !caller_names.insert(c.name.clone()) {
            errors.push(
                format!("{key}.name"),
                format!("duplicate caller {:?}", c.name),
            );
        }
        let hash = match hex::decode(&c.token_sha256) {
            Ok(bytes) if bytes.len() == 32 => {
                let mut h = [0u8; 32];
                h.copy_from_slice(&bytes);
                Some(h)
            }
            _ => {
                errors.push(
                    format!("{key}.token_sha256"),
                    "must be 64 hex digits: the SHA-256 of the token (see `sluice caller-token`)",
                );
                None
            }
        };
        let scope = if c.workspaces == ["*"] {
            WorkspaceScope::All
        } else {
            if c.workspaces.is_empty() {
                errors.push(
                    format!("{key}.workspaces"),
                    "must list workspaces, or [\"*\"] for all",
                );
            }
            for w in &c.workspaces {
                if w == "*" {
                    errors.push(format!("{key}.workspaces"), "\"*\" must be the only entry");
                } else if !workspaces.contains_key(w) {
                    errors.push(
                        format!("{key}.workspaces"),
                        format!("no [[workspace]] {w:?}"),
                    );
                }
            }
            WorkspaceScope::Only(c.workspaces.iter().cloned().collect())
        };
        if let Some(hash) = hash {
            let caller = Arc::new(Caller {
                name: c.name,
                scope,
            });
            if by_hash.insert(hash, caller).is_some() {
                errors.push(format!("{key}.token_sha256"), "two callers share one token");
            }
        }
    }

    // [credentials]
    let credentials = raw.credentials.as_ref().map(|c| {
        let store = match c.store.as_str() {
            "embedded" => match &c.path {
                Some(p) => StoreKind::Embedded {
                    path: resolve_path(base, p),
                },
                None => {
                    errors.push(
                        "credentials.path",
                        "the embedded store needs a database file path",
                    );
                    StoreKind::Embedded {
                        path: PathBuf::new(),
                    }
                }
            },
            "redis" => match &c.redis_url {
                Some(u) if u.starts_with("redis://") || u.starts_with("rediss://") => {
                    StoreKind::Redis { url: u.clone() }
                }
                _ => {
                    errors.push(
                        "credentials.redis_url",
                        "the redis store needs redis_url = \"redis://host:port/\"",
                    );
                    StoreKind::Redis { url: String::new() }
                }
            },
            other => {
                errors.push(
                    "credentials.store",
                    format!("{other:?} is not one of embedded, redis"),
                );
                StoreKind::Embedded {
                    path: PathBuf::new(),
                }
            }
        };
        if c.store != "embedded" && c.path.is_some() {
            errors.push("credentials.path", "only used by the embedded store");
        }
        if c.store != "redis" && c.redis_url.is_some() {
            errors.push("credentials.redis_url", "only used by the redis store");
        }
        let keys = match (&c.key_file, &c.key_env) {
            (Some(p), None) => KeySource::File {
                path: resolve_path(base, p),
                create_if_missing: c.create_key_file_if_missing,
            },
            (None, Some(v)) if !v.is_empty() => KeySource::Env(v.clone()),
            _ => {
                errors.push(
                    "credentials",
                    "set exactly one of key_file and key_env (master keys never live in this file)",
                );
                KeySource::Env(String::new())
            }
        };
        if c.create_key_file_if_missing && c.key_file.is_none() {
            errors.push(
                "credentials.create_key_file_if_missing",
                "only applies with key_file",
            );
        }
        if c.cache_capacity == 0 {
            errors.push("credentials.cache_capacity", "must be at least 1");
        }
        let vault = VaultSettings {
            cache_capacity: c.cache_capacity,
            cache_ttl: duration_ms(&mut errors, "credentials.cache_ttl_ms", c.cache_ttl_ms),
            max_staleness: duration_ms(
                &mut errors,
                "credentials.max_staleness_ms",
                c.max_staleness_ms,
            ),
            read_timeout: duration_ms(
                &mut errors,
                "credentials.read_timeout_ms",
                c.read_timeout_ms,
            ),
            outage_backoff: duration_ms(
                &mut errors,
                "credentials.outage_backoff_ms",
                c.outage_backoff_ms,
            ),
        };
        if vault.max_staleness < vault.cache_ttl {
            errors.push(
                "credentials.max_staleness_ms",
                "must be at least cache_ttl_ms",
            );
        }
        Credentials { store, keys, vault }
    });
    let on_redis = matches!(
        credentials.as_ref().map(|c| &c.store),
        Some(StoreKind::Redis { .. })
    );
    for c in connectors
        .values()
        .filter(|c| c.rate_limit.shared && !on_redis)
    {
        errors.push(
            format!("connector[{}].rate_limit.shared", c.id),
            "a shared budget lives in Redis: it needs [credentials] store = \"redis\"",
        );
    }
    if credentials.is_none() {
        let mut needing: Vec<&str> = connectors
            .values()
            .filter(|c| c.injection.needs_credential())
            .map(|c| c.id.as_str())
            .collect();
        needing.sort();
        if !needing.is_empty() {
            errors.push(
                "credentials",
                format!("connectors {needing:?} inject credentials, so a [credentials] section is required"),
            );
        }
    }

    // [admin]
    let admin = raw.admin.as_ref().and_then(|a| {
        let address = match a.address.parse::<SocketAddr>() {
            Ok(addr) => addr,
            Err(_) => {
                errors.push(
                    "admin.address",
                    format!("{:?} is not an IP:port address", a.address),
                );
                return None;
            }
        };
        if address == listener.address {
            errors.push("admin.address", "must differ from listener.address");
        }
        let token_sha256 = match hex::decode(&a.token_sha256) {
            Ok(b) if b.len() == 32 => {
                let mut h = [0u8; 32];
                h.copy_from_slice(&b);
                h
            }
            _ => {
                errors.push(
                    "admin.token_sha256",
                    "must be 64 hex digits: the SHA-256 of the admin token (see `sluice token`)",
                );
                return None;
            }
        };
        if credentials.is_none() {
            errors.push(
                "admin",
                "the admin API manages stored credentials and definitions: it needs [credentials]",
            );
        }
        Some(Admin {
            address,
            token_sha256,
        })
    });

    // [interception]
    let interception = raw.interception.as_ref().and_then(|i| {
        let ca_cert_file = resolve_path(base, &i.ca_cert_file);
        let ca_key_file = resolve_path(base, &i.ca_key_file);
        let hours = i.leaf_lifetime_hours.unwrap_or(24);
        if !(1..=24 * 30).contains(&hours) {
            errors.push("interception.leaf_lifetime_hours", "must be 1..=720");
        }
        let cache_capacity = i.cache_capacity.unwrap_or(1000);
        if cache_capacity == 0 {
            errors.push("interception.cache_capacity", "must be at least 1");
        }
        let ca_cert_pem = match std::fs::read_to_string(&ca_cert_file) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => pem,
            Ok(_) => {
                errors.push(
                    "interception.ca_cert_file",
                    format!("{} holds no PEM certificate", ca_cert_file.display()),
                );
                return None;
            }
            Err(e) => {
                errors.push(
                    "interception.ca_cert_file",
                    format!(
                        "cannot read {}: {e} (make the CA with `sluice ca init`)",
                        ca_cert_file.display()
                    ),
                );
                return None;
            }
        };
        if let Err(e) = std::fs::metadata(&ca_key_file) {
            errors.push(
                "interception.ca_key_file",
                format!("cannot read {}: {e}", ca_key_file.display()),
            );
            return None;
        }
        Some(Interception {
            ca_cert_file,
            ca_key_file,
            ca_cert_pem,
            leaf_lifetime: Duration::from_secs(hours * 3600),
            cache_capacity,
        })
    });

    // The resolver is only built for an otherwise valid file: it may read system files.
    if !errors.0.is_empty() {
        return Err(errors.0);
    }
    let resolver = Resolver::new(ResolverSettings {
        nameservers,
        timeout: dns_timeout,
        attempts: d.attempts,
        static_only: d.static_only,
        static_hosts,
    })
    .map_err(|e| {
        vec![ConfigError {
            key: "dns".into(),
            message: e,
        }]
    })?;

    Ok(Snapshot {
        source: source.to_path_buf(),
        callers: Callers::new(by_hash, listener.dev_mode_unauthenticated),
        listener,
        upstream,
        exception_cidrs,
        connectors,
        orgs,
        workspaces,
        resolver,
        credentials,
        admin,
        interception,
        sources: Sources::default(),
        toml_text: Arc::from(""),
    })
}

/// An action's URL must be HTTPS, and when its host is literal (no `{placeholder}`), the host
/// must be one the connector allows: a definition that contradicts itself is caught at load.
fn check_url_template(errors: &mut Errors, key: &str, url: &str, allowed: &DomainList) {
    let Some(rest) = url.strip_prefix("https://") else {
        errors.push(key, format!("{url:?} must start with https://"));
        return;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('{') {
        return;
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    match parse_host(host) {
        Ok(h) if allowed.matching(&h).is_some() => {}
        Ok(h) => errors.push(
            key,
            format!("host {h} is not in the connector's allowed_domains"),
        ),
        Err(e) => errors.push(key, e),
    }
}
