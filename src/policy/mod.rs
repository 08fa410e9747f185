//! Steps 3–4 of the request path: may this request leave, and to which address exactly?
//!
//! [`evaluate`] is the whole decision, in the order the checks must run. It reads only the
//! config snapshot, the request head and the resolver's answer, and returns either the
//! [`Vetted`] destination or the first [`Refusal`]. The proxy and `sluice explain` both call it;
//! explain passes an [`Observer`] that prints each check, the proxy passes `()`, which costs
//! nothing (detail strings are built lazily, only for observers that want them).

pub mod address;
pub mod domain;
pub mod resolver;

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

use ipnetwork::IpNetwork;

use crate::caller::Caller;
use crate::error::{ErrorCode, Refusal};
use crate::request::{Target, parse_target, routing_headers};
use address::{AddrClass, classify, embedded_ipv4};
use domain::{DomainList, Host};
use resolver::{DnsError, Resolver};

/// What the policy reads of the configuration, and nothing more: the config snapshot
/// implements it (`config::Snapshot`), tests and tools can implement it over anything.
pub trait Rules: Sync {
    /// The connector's routing rules, if it exists.
    fn connector(&self, id: &str) -> Option<ConnectorRules<'_>>;
    /// The org a workspace belongs to, if the workspace exists.
    fn workspace_org(&self, workspace: &str) -> Option<&str>;
    /// The org's own allowlist (`None`: the org adds no restriction, or there is no such org).
    fn org_allowlist(&self, org: &str) -> Option<&DomainList>;
    /// The egress settings every destination is held to.
    fn egress(&self) -> Egress<'_>;
}

/// A connector as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectorRules<'a> {
    pub id: &'a str,
    pub display_name: &'a str,
    pub enabled: bool,
    pub allowed_domains: &'a DomainList,
    pub allowed_ports: &'a [u16],
}

/// Resolution and the address policy's inputs.
#[derive(Clone, Copy)]
pub struct Egress<'a> {
    pub resolver: &'a Resolver,
    /// Operator exceptions to the special-purpose address policy.
    pub exception_cidrs: &'a [IpNetwork],
    /// sluice's own proxy listener (never a destination).
    pub listener: SocketAddr,
}

/// A destination that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vetted {
    /// The address to connect to: one of the resolved addresses, all of which were vetted.
    pub addr: SocketAddr,
    /// The connector, workspace, org, SNI name and `Host` header, back to back: one
    /// allocation per request instead of five (`ends` marks where each stops).
    text: String,
    ends: [usize; 5],
}

impl Vetted {
    fn new(
        connector: &str,
        workspace: &str,
        org: &str,
        name: &str,
        port: u16,
        addr: SocketAddr,
    ) -> Self {
        let mut port_text = itoa::Buffer::new();
        let port_text = port_text.format(port);
        let mut text = String::with_capacity(
            connector.len() + workspace.len() + org.len() + 2 * name.len() + 1 + port_text.len(),
        );
        let mut ends = [0; 5];
        for (end, part) in ends.iter_mut().zip([connector, workspace, org, name]) {
            text.push_str(part);
            *end = text.len();
        }
        text.push_str(name);
        if port != 443 {
            text.push(':');
            text.push_str(port_text);
        }
        ends[4] = text.len();
        Vetted { addr, text, ends }
    }

    fn part(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }

    pub fn connector(&self) -> &str {
        self.part(0)
    }

    pub fn workspace(&self) -> &str {
        self.part(1)
    }

    pub fn org(&self) -> &str {
        self.part(2)
    }

    /// The host name sent as SNI and verified against the certificate. Never empty.
    pub fn sni(&self) -> &str {
        self.part(3)
    }

    /// The `Host` header sent upstream (`name`, or `name:port` off 443).
    pub fn host_header(&self) -> &str {
        self.part(4)
    }
}

/// The checks, in order. Their names are what explain prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Caller,
    RoutingHeaders,
    Connector,
    Workspace,
    Target,
    Port,
    ConnectorDomains,
    OrgDomains,
    Resolve,
    Address,
    SelfAddress,
    Pinned,
}

impl Check {
    pub const fn as_str(self) -> &'static str {
        match self {
            Check::Caller => "caller",
            Check::RoutingHeaders => "routing headers",
            Check::Connector => "connector",
            Check::Workspace => "workspace",
            Check::Target => "target",
            Check::Port => "port",
            Check::ConnectorDomains => "connector allowed_domains",
            Check::OrgDomains => "org allowlist",
            Check::Resolve => "resolve",
            Check::Address => "address",
            Check::SelfAddress => "not sluice itself",
            Check::Pinned => "pinned",
        }
    }
}

/// Receives each passed check. `detail` is only called by observers that print it.
pub trait Observer {
    fn passed(&mut self, check: Check, detail: impl FnOnce() -> String);
}

/// The proxy's observer: does nothing.
impl Observer for () {
    #[inline]
    fn passed(&mut self, _: Check, _: impl FnOnce() -> String) {}
}

/// Decide. `caller` is `None` only for `sluice explain` without `--caller`. Once the target
/// parses it is left in `target`, whatever the verdict, so refusals can be logged with the
/// destination that was asked for.
pub async fn evaluate<R: Rules + ?Sized, O: Observer>(
    rules: &R,
    caller: Option<&Caller>,
    raw_target: &[u8],
    headers: &HeaderMap,
    target: &mut Option<Target>,
    obs: &mut O,
) -> Result<Vetted, Refusal> {
    let (connector_id, workspace_id) = routing_headers(headers)?;
    obs.passed(Check::RoutingHeaders, || {
        format!("X-Connector: {connector_id}, X-Workspace: {workspace_id}")
    });
    evaluate_routed(
        rules,
        caller,
        connector_id,
        workspace_id,
        raw_target,
        headers,
        target,
        obs,
    )
    .await
}

/// [`evaluate`] once the connector and workspace are known (from the routing headers, or from
/// the CONNECT tunnel a request arrived in).
#[allow(clippy::too_many_arguments)]
pub async fn evaluate_routed<R: Rules + ?Sized, O: Observer>(
    rules: &R,
    caller: Option<&Caller>,
    connector_id: &str,
    workspace_id: &str,
    raw_target: &[u8],
    headers: &HeaderMap,
    target: &mut Option<Target>,
    obs: &mut O,
) -> Result<Vetted, Refusal> {
    let (connector, org) = routed(rules, caller, connector_id, workspace_id, obs)?;
    let target: &Target = target.insert(parse_target(raw_target, headers)?);
    vet_target(rules, connector, org, workspace_id, target, obs).await
}

/// [`evaluate_routed`] for a target sluice built itself (a connector action's filled URL):
/// the same checks, in the same order, without parsing a request line.
pub async fn evaluate_built<R: Rules + ?Sized, O: Observer>(
    rules: &R,
    caller: Option<&Caller>,
    connector_id: &str,
    workspace_id: &str,
    built: Target,
    target: &mut Option<Target>,
    obs: &mut O,
) -> Result<Vetted, Refusal> {
    let (connector, org) = routed(rules, caller, connector_id, workspace_id, obs)?;
    let target: &Target = target.insert(built);
    vet_target(rules, connector, org, workspace_id, target, obs).await
}

/// The connector exists and is enabled, the workspace exists, the caller may act for it.
fn routed<'r, R: Rules + ?Sized, O: Observer>(
    rules: &'r R,
    caller: Option<&Caller>,
    connector_id: &str,
    workspace_id: &str,
    obs: &mut O,
) -> Result<(ConnectorRules<'r>, &'r str), Refusal> {
    let connector = rules.connector(connector_id).ok_or_else(|| {
        Refusal::new(
            ErrorCode::UnknownConnector,
            format!("no connector {connector_id:?}"),
        )
    })?;
    if !connector.enabled {
        return Err(Refusal::new(
            ErrorCode::ConnectorDisabled,
            format!("connector {connector_id:?} is disabled"),
        ));
    }
    obs.passed(Check::Connector, || {
        format!("{} ({}), enabled", connector.id, connector.display_name)
    });

    let org = rules.workspace_org(workspace_id).ok_or_else(|| {
        Refusal::new(
            ErrorCode::UnknownWorkspace,
            format!("no workspace {workspace_id:?}"),
        )
    })?;
    match caller {
        Some(c) if !c.scope.permits(workspace_id) => {
            return Err(Refusal::new(
                ErrorCode::WorkspaceNotPermitted,
                format!(
                    "caller {:?} may not act for workspace {workspace_id:?}",
                    c.name
                ),
            ));
        }
        Some(c) => obs.passed(Check::Caller, || {
            format!("{} may act for {workspace_id}", c.name)
        }),
        None => obs.passed(Check::Caller, || "not checked (no --caller given)".into()),
    }
    obs.passed(Check::Workspace, || format!("{workspace_id} in org {org}"));
    Ok((connector, org))
}

/// The parsed target's destination vetted, and the verdict.
async fn vet_target<R: Rules + ?Sized, O: Observer>(
    rules: &R,
    connector: ConnectorRules<'_>,
    org: &str,
    workspace_id: &str,
    target: &Target,
    obs: &mut O,
) -> Result<Vetted, Refusal> {
    obs.passed(Check::Target, || {
        format!("host {}, path {}", target.host, target.path())
    });

    let port = target.upstream_port();
    let (name, addr) = vet_address(rules, connector, org, &target.host, port, obs).await?;
    Ok(Vetted::new(
        connector.id,
        workspace_id,
        org,
        name,
        port,
        addr,
    ))
}

/// Where a vetted connection goes: the pinned address, the SNI/certificate name, the `Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub addr: SocketAddr,
    pub sni: String,
    pub host_header: String,
}

/// The destination half of the policy, shared by app traffic and sluice's own calls (OAuth
/// token, revocation): port allowed → connector allowlist → org allowlist → resolve → every
/// address outside the special-purpose blocks → not sluice itself → pin one address.
pub async fn vet_destination<R: Rules + ?Sized, O: Observer>(
    rules: &R,
    connector: ConnectorRules<'_>,
    org_id: &str,
    host: &Host,
    port: u16,
    obs: &mut O,
) -> Result<Destination, Refusal> {
    let (name, addr) = vet_address(rules, connector, org_id, host, port, obs).await?;
    let host_header = if port == 443 {
        name.to_owned()
    } else {
        format!("{name}:{port}")
    };
    Ok(Destination {
        sni: name.to_owned(),
        host_header,
        addr,
    })
}

/// [`vet_destination`]'s checks: the host's name and the one address to connect to.
async fn vet_address<'h, R: Rules + ?Sized, O: Observer>(
    rules: &R,
    connector: ConnectorRules<'_>,
    org_id: &str,
    host: &'h Host,
    port: u16,
    obs: &mut O,
) -> Result<(&'h str, SocketAddr), Refusal> {
    let connector_id = connector.id;
    if !connector.allowed_ports.contains(&port) {
        return Err(Refusal::new(
            ErrorCode::PortNotAllowed,
            format!("port {port} is not allowed for connector {connector_id:?}"),
        ));
    }
    obs.passed(Check::Port, || format!("https upstream on port {port}"));

    let name = match host {
        Host::Name(name) => name,
        ip => {
            let class = match ip {
                Host::V4(v4) => classify(IpAddr::V4(*v4)),
                Host::V6(v6) => classify(IpAddr::V6(*v6)),
                Host::Name(_) => unreachable!(),
            };
            return Err(Refusal::new(
                ErrorCode::DomainNotAllowed,
                format!("IP literal {ip} ({class}) never matches an allowlist: use a host name"),
            ));
        }
    };
    let pattern = connector.allowed_domains.matching(host).ok_or_else(|| {
        Refusal::new(
            ErrorCode::DomainNotAllowed,
            format!("host {name} is not in connector {connector_id:?}'s allowed_domains"),
        )
    })?;
    obs.passed(Check::ConnectorDomains, || {
        format!("{name} matches {pattern}")
    });

    match rules.org_allowlist(org_id) {
        Some(list) => {
            let pattern = list.matching(host).ok_or_else(|| {
                Refusal::new(
                    ErrorCode::OrgDomainNotAllowed,
                    format!("host {name} is not in org {org_id:?}'s allowlist"),
                )
            })?;
            obs.passed(Check::OrgDomains, || format!("{name} matches {pattern}"));
        }
        None => obs.passed(Check::OrgDomains, || {
            format!("org {org_id} has no allowlist")
        }),
    }

    let egress = rules.egress();
    let addrs = egress.resolver.resolve(name).await.map_err(|e| match e {
        DnsError::Timeout(_) => {
            Refusal::new(ErrorCode::DnsTimeout, format!("resolving {name} timed out"))
        }
        other => Refusal::new(
            ErrorCode::DnsFailure,
            format!("resolving {name} failed: {other}"),
        ),
    })?;
    obs.passed(Check::Resolve, || {
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        format!("{name} → {}", list.join(", "))
    });

    for &ip in &addrs {
        let class = classify(ip);
        if class.is_public() {
            obs.passed(Check::Address, || format!("{ip} is public"));
            continue;
        }
        match exception_for(egress.exception_cidrs, ip) {
            Some(net) => obs.passed(Check::Address, || {
                format!("{ip} is {class}, allowed by operator exception {net}")
            }),
            None => {
                return Err(Refusal::new(
                    ErrorCode::AddressNotAllowed,
                    format!("{name} resolves to {ip}, a {class} address"),
                ));
            }
        }
    }

    // Every address passed; connect to the first, and only to it.
    let addr = SocketAddr::new(addrs[0], port);
    if is_own_listener(egress.listener, addr) {
        return Err(Refusal::new(
            ErrorCode::SelfConnection,
            format!("{name}:{port} is sluice's own listener"),
        ));
    }
    obs.passed(Check::SelfAddress, || {
        format!("{addr} is not sluice's listener")
    });
    obs.passed(Check::Pinned, || {
        format!("connect to {addr}, SNI and certificate name {name}")
    });
    Ok((name, addr))
}

/// The operator exception covering `ip` (or the IPv4 address it embeds), if any.
fn exception_for(exceptions: &[IpNetwork], ip: IpAddr) -> Option<&IpNetwork> {
    let embedded = match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    exceptions
        .iter()
        .find(|net| net.contains(ip) || embedded.is_some_and(|e| net.contains(e)))
}

/// Is `addr` sluice's own listening socket? An unspecified listener (`0.0.0.0`, `::`) listens
/// on every local address; sluice cannot list those without enumerating interfaces, so it
/// treats loopback and unspecified destinations on the listener's port as itself. Every other
/// local address is special-purpose or public, and public local addresses on the listener's
/// port remain a known gap (documented in the README).
fn is_own_listener(listen: SocketAddr, addr: SocketAddr) -> bool {
    if addr.port() != listen.port() {
        return false;
    }
    let ip = match addr.ip() {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    ip == listen.ip()
        || (listen.ip().is_unspecified()
            && (ip.is_loopback() || ip.is_unspecified() || classify(ip) == AddrClass::Loopback))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vetted_parts_read_back_as_given() {
        let addr: SocketAddr = "203.0.113.7:8443".parse().unwrap();
        let v = Vetted::new("hubspot", "ws_42", "acme", "api.hubapi.com", 8443, addr);
        assert_eq!(
            (v.connector(), v.workspace(), v.org(), v.sni()),
            ("hubspot", "ws_42", "acme", "api.hubapi.com")
        );
        assert_eq!(v.host_header(), "api.hubapi.com:8443");
        assert_eq!(v.addr, addr);
        // The default port is left out of Host.
        let v = Vetted::new("c", "w", "o", "h.example", 443, addr);
        assert_eq!((v.sni(), v.host_header()), ("h.example", "h.example"));
    }
}
