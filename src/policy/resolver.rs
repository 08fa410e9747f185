//! sluice's own DNS: a static host map (development and tests), then hickory-resolver.
//!
//! sluice resolves every name itself so that the addresses it vets are the addresses it dials.
//! A failure or timeout is final: there is no fallback to another resolver or to the system's
//! `getaddrinfo`. The system hosts file is not consulted (it maps `localhost` and friends, which
//! the address policy would refuse anyway, and it makes behaviour differ between machines).
//! Names are queried fully qualified, so no search domain is ever appended.

use crate::fastmap::FastMap as HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// Why a name did not resolve. Each maps to its own error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("no A or AAAA records")]
    NoRecords,
    #[error("resolver timed out after {0:?}")]
    Timeout(Duration),
    #[error("resolver error: {0}")]
    Failed(String),
}

/// How names are resolved; built from `[dns]` as part of a config snapshot.
pub struct Resolver {
    static_hosts: HashMap<String, Vec<IpAddr>>,
    dns: Option<TokioResolver>,
    timeout: Duration,
}

/// Resolver settings after validation.
pub struct ResolverSettings {
    /// Empty: read the system's resolver configuration (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub attempts: usize,
    /// Answer only from `static_hosts`; never send a query.
    pub static_only: bool,
    pub static_hosts: HashMap<String, Vec<IpAddr>>,
}

impl Resolver {
    pub fn new(settings: ResolverSettings) -> Result<Self, String> {
        let dns = if settings.static_only {
            None
        } else {
            Some(build_hickory(&settings)?)
        };
        Ok(Self {
            static_hosts: settings.static_hosts,
            dns,
            timeout: settings.timeout,
        })
    }

    /// Resolve a validated, lowercased name to every address it has.
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Some(addrs) = self.static_hosts.get(name) {
            return Ok(addrs.clone());
        }
        let Some(dns) = &self.dns else {
            return Err(DnsError::NoRecords);
        };
        // Boxed: hickory's lookup future is large, and a future is moved whole wherever it
        // goes; inline, every request's policy step would copy it (BENCHMARKS.md).
        Box::pin(self.query(dns, name)).await
    }

    async fn query(&self, dns: &TokioResolver, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        // Fully qualified: no search-domain expansion.
        let fqdn = format!("{name}.");
        match tokio::time::timeout(self.timeout, dns.lookup_ip(fqdn.as_str())).await {
            Err(_) => Err(DnsError::Timeout(self.timeout)),
            Ok(Err(e)) if e.is_no_records_found() => Err(DnsError::NoRecords),
            // hickory's own per-query timeout can fire before ours: same outcome either way.
            Ok(Err(hickory_resolver::net::NetError::Timeout)) => {
                Err(DnsError::Timeout(self.timeout))
            }
            Ok(Err(e)) => Err(DnsError::Failed(e.to_string())),
            Ok(Ok(answer)) => {
                let addrs: Vec<IpAddr> = answer.iter().collect();
                if addrs.is_empty() {
                    Err(DnsError::NoRecords)
                } else {
                    Ok(addrs)
                }
            }
        }
    }
}

fn build_hickory(settings: &ResolverSettings) -> Result<TokioResolver, String> {
    let (config, mut opts) = if settings.nameservers.is_empty() {
        let (system, opts) = hickory_resolver::system_conf::read_system_conf()
            .map_err(|e| format!("cannot read the system resolver configuration: {e}"))?;
        // Keep the system's nameservers, drop its search list and domain.
        let (_, _, servers) = system.into_parts();
        (ResolverConfig::from_parts(None, Vec::new(), servers), opts)
    } else {
        let servers = settings
            .nameservers
            .iter()
            .map(|addr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
            })
            .collect();
        (
            ResolverConfig::from_parts(None, Vec::new(), servers),
            ResolverOpts::default(),
        )
    };
    opts.timeout = settings.timeout;
    opts.attempts = settings.attempts;
    opts.use_hosts_file = ResolveHosts::Never;
    // Both families: every address a name has is vetted, not just the first family's.
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.ndots = 0;
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}
