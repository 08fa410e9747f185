//! `FileConfig` → [`Snapshot`]: every section checked, every problem collected with the key
//! it is about (so `sluice check-config` prints them all at once), relative paths resolved
//! against the file's directory. One function per section, in the file's order; connectors
//! ([`super::connector`]) and orgs, workspaces and callers ([`super::tenants`]) have their own
//! modules.

use crate::fastmap::FastMap as HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;

use super::file::{
    AdminFile, CredentialsFile, DnsFile, EgressFile, FileConfig, InterceptionFile, ListenerFile,
    UpstreamFile,
};
use super::{
    Admin, ConfigError, Connector, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_HEADER_COUNT,
    Interception, Listener, PARSER_MAX_HEADER_BYTES, PARSER_MAX_HEADER_COUNT, Snapshot, Sources,
    connector, tenants,
};
use crate::caller::Callers;
use crate::credential::redis::RedisTarget;
use crate::credential::{Credentials, KeySource, Store, StoreKind, VaultSettings};
use crate::names::{Host, parse_host};
use crate::policy::domain::{DomainList, DomainPattern};
use crate::policy::resolver::{Resolver, ResolverSettings};
use crate::upstream::Upstream;

/// The problems found so far.
pub(super) struct Errors(pub(super) Vec<ConfigError>);

impl Errors {
    pub(super) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            key: key.into(),
            message: message.into(),
        });
    }
}

pub(super) fn validate(
    raw: FileConfig,
    source: &Path,
    base: &Path,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut errors = Errors(Vec::new());
    let e = &mut errors;
    let listener = listener(e, &raw.listener, base);
    let upstream = upstream(e, &raw.upstream, base);
    let exception_cidrs = egress(e, &raw.egress);
    let dns = dns(e, &raw.dns);
    let connectors =
        connector::connectors(e, raw.connectors, base, upstream.extra_ca_file.as_deref());
    let orgs = tenants::orgs(e, raw.orgs);
    let workspaces = tenants::workspaces(e, raw.workspaces, &orgs);
    let callers = tenants::callers(e, raw.callers, &workspaces);
    let credentials = raw.credentials.as_ref().map(|c| credentials(e, c, base));
    needs_of_connectors(e, &connectors, credentials.as_ref());
    let admin = raw
        .admin
        .as_ref()
        .and_then(|a| admin(e, a, &listener, credentials.is_some()));
    let interception = raw
        .interception
        .as_ref()
        .and_then(|i| interception(e, i, base));

    // The resolver is only built for an otherwise valid file: it may read system files.
    if !errors.0.is_empty() {
        return Err(errors.0);
    }
    let resolver = Resolver::new(dns).map_err(|e| {
        vec![ConfigError {
            key: "dns".into(),
            message: e,
        }]
    })?;
    Ok(Snapshot {
        source: source.to_path_buf(),
        callers: Callers::new(callers, listener.dev_mode_unauthenticated),
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

fn duration_ms(errors: &mut Errors, key: &str, ms: u64) -> Duration {
    if ms == 0 {
        errors.push(key, "must be greater than 0");
    }
    Duration::from_millis(ms)
}

pub(super) fn domain_list(errors: &mut Errors, key: &str, raw: &[String]) -> DomainList {
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

/// The SHA-256 a token is checked against: 64 hex digits.
pub(super) fn sha256_hex(text: &str) -> Option<[u8; 32]> {
    let mut h = [0u8; 32];
    hex::decode_to_slice(text, &mut h).ok()?;
    Some(h)
}

/// `[listener]`.
fn listener(errors: &mut Errors, l: &ListenerFile, base: &Path) -> Listener {
    let address = match l.address.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            errors.push(
                "listener.address",
                format!("{:?} is not an IP:port address", l.address),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    if l.dev_mode_unauthenticated && !address.ip().is_loopback() {
        errors.push(
            "listener.dev_mode_unauthenticated",
            format!(
                "only allowed when listener.address is a loopback address, not {}",
                address.ip()
            ),
        );
    }
    let threads = l.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    if threads == 0 {
        errors.push("listener.threads", "must be at least 1");
    }
    let max_header_count = l.max_header_count.unwrap_or(DEFAULT_MAX_HEADER_COUNT);
    if !(1..=PARSER_MAX_HEADER_COUNT).contains(&max_header_count) {
        errors.push(
            "listener.max_header_count",
            format!("must be 1..={PARSER_MAX_HEADER_COUNT} (pingora's parser limit)"),
        );
    }
    let max_header_bytes = l.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
    if !(1024..=PARSER_MAX_HEADER_BYTES).contains(&max_header_bytes) {
        errors.push(
            "listener.max_header_bytes",
            format!("must be 1024..={PARSER_MAX_HEADER_BYTES} (pingora's parser limit)"),
        );
    }
    let path_or = |p: &Option<PathBuf>, default: &str| {
        p.as_ref()
            .map_or_else(|| PathBuf::from(default), |p| resolve_path(base, p))
    };
    Listener {
        address,
        dev_mode_unauthenticated: l.dev_mode_unauthenticated,
        threads,
        shutdown_grace: Duration::from_millis(l.shutdown_grace_ms.unwrap_or(30_000)),
        shutdown_timeout: Duration::from_millis(l.shutdown_timeout_ms.unwrap_or(5_000)),
        upgrade_sock: path_or(&l.upgrade_sock, "/tmp/sluice_upgrade.sock"),
        pid_file: path_or(&l.pid_file, "/tmp/sluice.pid"),
        max_header_count,
        max_header_bytes,
    }
}

/// `[upstream]`.
fn upstream(errors: &mut Errors, u: &UpstreamFile, base: &Path) -> Upstream {
    let extra_ca_file = u.extra_ca_file.as_ref().map(|p| resolve_path(base, p));
    if let Some(path) = &extra_ca_file {
        if let Err(e) = crate::files::read_ca_file(path) {
            errors.push("upstream.extra_ca_file", e);
        }
    }
    let mut ms = |key: &str, value| duration_ms(errors, &format!("upstream.{key}"), value);
    Upstream {
        extra_ca_file,
        connect_timeout: ms("connect_timeout_ms", u.connect_timeout_ms),
        tls_handshake_timeout: ms("tls_handshake_timeout_ms", u.tls_handshake_timeout_ms),
        read_timeout: ms("read_timeout_ms", u.read_timeout_ms),
        write_timeout: ms("write_timeout_ms", u.write_timeout_ms),
        idle_timeout: ms("idle_timeout_ms", u.idle_timeout_ms),
        pool_size: u.pool_size,
    }
}

/// `[egress]`: exceptions to the special-purpose address policy; never all of it.
fn egress(errors: &mut Errors, eg: &EgressFile) -> Vec<IpNetwork> {
    let mut exception_cidrs = Vec::new();
    for (i, c) in eg.exception_cidrs.iter().enumerate() {
        let key = format!("egress.exception_cidrs[{i}]");
        match c.parse::<IpNetwork>() {
            Ok(net) if net.prefix() == 0 => errors.push(
                key,
                format!("{c:?} would switch the address policy off entirely"),
            ),
            Ok(net) => exception_cidrs.push(net),
            Err(e) => errors.push(key, format!("{c:?}: {e}")),
        }
    }
    exception_cidrs
}

/// `[dns]`: the resolver's settings (the resolver itself is built last).
fn dns(errors: &mut Errors, d: &DnsFile) -> ResolverSettings {
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
    let mut static_hosts = HashMap::default();
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
    let timeout = duration_ms(errors, "dns.timeout_ms", d.timeout_ms);
    if d.attempts == 0 {
        errors.push("dns.attempts", "must be at least 1");
    }
    ResolverSettings {
        nameservers,
        timeout,
        attempts: d.attempts,
        static_only: d.static_only,
        static_hosts,
    }
}

/// `redis_url` (one server) or `redis_cluster` (a cluster's seed nodes): exactly one.
fn redis_target(errors: &mut Errors, c: &CredentialsFile) -> RedisTarget {
    let is_url = |u: &str| u.starts_with("redis://") || u.starts_with("rediss://");
    match (&c.redis_url, &c.redis_cluster) {
        // `redis+cluster://[user:pass@]host:port,host:port[/]`: the seed nodes in one URL.
        (Some(u), None) if u.starts_with("redis+cluster://") => {
            let rest = &u["redis+cluster://".len()..];
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let nodes: Vec<String> = hosts
                .trim_end_matches('/')
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                errors.push(
                    "credentials.redis_url",
                    "redis+cluster:// needs at least one host:port",
                );
            }
            RedisTarget::Cluster(nodes)
        }
        (Some(u), None) if is_url(u) => RedisTarget::Single(u.clone()),
        (None, Some(nodes)) if !nodes.is_empty() && nodes.iter().all(|n| is_url(n)) => {
            RedisTarget::Cluster(nodes.clone())
        }
        (None, Some(_)) => {
            errors.push(
                "credentials.redis_cluster",
                "list at least one seed node, each \"redis://host:port\"",
            );
            RedisTarget::Cluster(Vec::new())
        }
        (Some(_), Some(_)) => {
            errors.push(
                "credentials.redis_cluster",
                "set redis_url (one server) or redis_cluster (a cluster), not both",
            );
            RedisTarget::Single(String::new())
        }
        (_, None) => {
            errors.push(
                "credentials.redis_url",
                "the redis store needs redis_url = \"redis://host:port/\" (or redis_cluster)",
            );
            RedisTarget::Single(String::new())
        }
    }
}

/// `[credentials]`: the store, the master keys, the cache.
fn credentials(errors: &mut Errors, c: &CredentialsFile, base: &Path) -> Credentials {
    let chosen = c
        .store
        .get()
        .map_err(|e| errors.push("credentials.store", e));
    let store = match (chosen, &c.path) {
        (Ok(Store::Embedded), Some(p)) => StoreKind::Embedded {
            path: resolve_path(base, p),
        },
        (Ok(Store::Embedded), None) => {
            errors.push(
                "credentials.path",
                "the embedded store needs a database file path",
            );
            StoreKind::Embedded {
                path: PathBuf::new(),
            }
        }
        (Ok(Store::Redis), _) => StoreKind::Redis {
            target: redis_target(errors, c),
        },
        (Err(()), _) => StoreKind::Embedded {
            path: PathBuf::new(),
        },
    };
    if chosen != Ok(Store::Embedded) && c.path.is_some() {
        errors.push("credentials.path", "only used by the embedded store");
    }
    if chosen != Ok(Store::Redis) {
        if c.redis_url.is_some() {
            errors.push("credentials.redis_url", "only used by the redis store");
        }
        if c.redis_cluster.is_some() {
            errors.push("credentials.redis_cluster", "only used by the redis store");
        }
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
    let mut ms = |key: &str, value| duration_ms(errors, &format!("credentials.{key}"), value);
    let vault = VaultSettings {
        cache_capacity: c.cache_capacity,
        cache_ttl: ms("cache_ttl_ms", c.cache_ttl_ms),
        max_staleness: ms("max_staleness_ms", c.max_staleness_ms),
        read_timeout: ms("read_timeout_ms", c.read_timeout_ms),
        outage_backoff: ms("outage_backoff_ms", c.outage_backoff_ms),
    };
    if vault.max_staleness < vault.cache_ttl {
        errors.push(
            "credentials.max_staleness_ms",
            "must be at least cache_ttl_ms",
        );
    }
    Credentials { store, keys, vault }
}

/// What connectors need of the rest of the file: a shared budget needs Redis, injecting a
/// credential needs a store.
fn needs_of_connectors(
    errors: &mut Errors,
    connectors: &HashMap<String, Arc<Connector>>,
    credentials: Option<&Credentials>,
) {
    let on_redis = matches!(credentials.map(|c| &c.store), Some(StoreKind::Redis { .. }));
    let mut shared: Vec<&str> = connectors
        .values()
        .filter(|c| c.rate_limit.shared && !on_redis)
        .map(|c| c.id.as_str())
        .collect();
    shared.sort();
    for id in shared {
        errors.push(
            format!("connector[{id}].rate_limit.shared"),
            "a shared budget lives in Redis: it needs [credentials] store = \"redis\"",
        );
    }
    if credentials.is_some() {
        return;
    }
    let mut needing: Vec<&str> = connectors
        .values()
        .filter(|c| c.injection.needs_credential())
        .map(|c| c.id.as_str())
        .collect();
    needing.sort();
    if !needing.is_empty() {
        errors.push(
            "credentials",
            format!(
                "connectors {needing:?} inject credentials, so a [credentials] section is required"
            ),
        );
    }
}

/// `[admin]`: its own address, a token hash, and a credential store to manage.
fn admin(
    errors: &mut Errors,
    a: &AdminFile,
    listener: &Listener,
    has_credentials: bool,
) -> Option<Admin> {
    let Ok(address) = a.address.parse::<SocketAddr>() else {
        errors.push(
            "admin.address",
            format!("{:?} is not an IP:port address", a.address),
        );
        return None;
    };
    if address == listener.address {
        errors.push("admin.address", "must differ from listener.address");
    }
    let Some(token_sha256) = sha256_hex(&a.token_sha256) else {
        errors.push(
            "admin.token_sha256",
            "must be 64 hex digits: the SHA-256 of the admin token (see `sluice token`)",
        );
        return None;
    };
    if !has_credentials {
        errors.push(
            "admin",
            "the admin API manages stored credentials and definitions: it needs [credentials]",
        );
    }
    Some(Admin {
        address,
        token_sha256,
    })
}

/// `[interception]`: the CA's files must be there (the key is read at startup, not here).
fn interception(errors: &mut Errors, i: &InterceptionFile, base: &Path) -> Option<Interception> {
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
}
