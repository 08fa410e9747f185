//! The TOML file as written: serde structs that reject unknown keys and carry no meaning yet.
//! `config::validate` turns them into a [`super::Snapshot`]. Every key is documented in
//! `config/sluice.example.toml`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::FieldType;
use crate::credential::Store;
use crate::credential::inject::AuthType;
use crate::label::Choice;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listener: ListenerFile,
    #[serde(default)]
    pub upstream: UpstreamFile,
    #[serde(default)]
    pub dns: DnsFile,
    #[serde(default)]
    pub egress: EgressFile,
    #[serde(default, rename = "connector")]
    pub connectors: Vec<ConnectorFile>,
    #[serde(default, rename = "org")]
    pub orgs: Vec<OrgFile>,
    #[serde(default, rename = "workspace")]
    pub workspaces: Vec<WorkspaceFile>,
    #[serde(default, rename = "caller")]
    pub callers: Vec<CallerFile>,
    pub credentials: Option<CredentialsFile>,
    pub admin: Option<AdminFile>,
    pub interception: Option<InterceptionFile>,
}

/// `[interception]`: TLS interception inside CONNECT tunnels.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterceptionFile {
    pub ca_cert_file: PathBuf,
    pub ca_key_file: PathBuf,
    pub leaf_lifetime_hours: Option<u64>,
    pub cache_capacity: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    #[serde(default = "default_admin_address")]
    pub address: String,
    pub token_sha256: String,
}

fn default_admin_address() -> String {
    "127.0.0.1:9090".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    pub store: Choice<Store>,
    pub path: Option<PathBuf>,
    pub redis_url: Option<String>,
    /// A Redis Cluster's seed nodes (`redis://host:port`), instead of `redis_url`.
    pub redis_cluster: Option<Vec<String>>,
    pub key_file: Option<PathBuf>,
    pub key_env: Option<String>,
    #[serde(default)]
    pub create_key_file_if_missing: bool,
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: u64,
    #[serde(default = "default_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    #[serde(default = "default_max_staleness_ms")]
    pub max_staleness_ms: u64,
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
    #[serde(default = "default_outage_backoff_ms")]
    pub outage_backoff_ms: u64,
}

fn default_cache_capacity() -> u64 {
    10_000
}
fn default_cache_ttl_ms() -> u64 {
    30_000
}
fn default_max_staleness_ms() -> u64 {
    300_000
}
fn default_read_timeout_ms() -> u64 {
    250
}
fn default_outage_backoff_ms() -> u64 {
    1_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    pub address: String,
    #[serde(default)]
    pub dev_mode_unauthenticated: bool,
    pub threads: Option<usize>,
    pub shutdown_grace_ms: Option<u64>,
    pub shutdown_timeout_ms: Option<u64>,
    pub upgrade_sock: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub max_header_count: Option<usize>,
    pub max_header_bytes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamFile {
    pub extra_ca_file: Option<PathBuf>,
    pub connect_timeout_ms: u64,
    pub tls_handshake_timeout_ms: u64,
    pub read_timeout_ms: u64,
    pub write_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub pool_size: usize,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        Self {
            extra_ca_file: None,
            connect_timeout_ms: 5_000,
            tls_handshake_timeout_ms: 10_000,
            read_timeout_ms: 60_000,
            write_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            pool_size: 128,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsFile {
    pub nameservers: Vec<String>,
    pub timeout_ms: u64,
    pub attempts: usize,
    pub static_only: bool,
    pub static_hosts: BTreeMap<String, Vec<String>>,
}

impl Default for DnsFile {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout_ms: 2_000,
            attempts: 2,
            static_only: false,
            static_hosts: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressFile {
    pub exception_cidrs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorFile {
    pub connector_id: String,
    pub display_name: String,
    pub auth_type: Choice<AuthType>,
    #[serde(default)]
    pub auth_schema: AuthSchemaFile,
    #[serde(default)]
    pub actions: Vec<ActionFile>,
    pub allowed_domains: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_ports: Option<Vec<u16>>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(
        default,
        skip_serializing_if = "crate::credential::inject::InjectFile::is_empty"
    )]
    pub inject: crate::credential::inject::InjectFile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<crate::credential::oauth::OAuth2File>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<crate::ratelimit::RateLimitFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::ratelimit::retry::RetryFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<crate::ratelimit::breaker::BreakerFile>,
    /// The connector's own upstream TLS: client certificate, extra CA, minimum version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::upstream::ConnectorTlsFile>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSchemaFile {
    #[serde(default)]
    pub fields: Vec<AuthFieldFile>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFieldFile {
    pub name: String,
    pub label: String,
    #[serde(rename = "type", default = "text")]
    pub field_type: Choice<FieldType>,
    #[serde(default)]
    pub required: bool,
}

fn text() -> Choice<FieldType> {
    FieldType::Text.into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActionFile {
    pub action_id: String,
    pub http_method: String,
    pub url_template: String,
    #[serde(default)]
    pub body_schema: Vec<BodyFieldFile>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BodyFieldFile {
    pub name: String,
    pub label: String,
    /// An action call without this input is refused (400 `action_input_invalid`).
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OrgFile {
    pub org_id: String,
    pub allowed_domains: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceFile {
    pub workspace_id: String,
    pub org: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerFile {
    pub name: String,
    pub token_sha256: String,
    pub workspaces: Vec<String>,
}
