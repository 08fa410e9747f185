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

use crate::caller::Caller;
use crate::config::Snapshot;
use crate::error::{ErrorCode, Refusal};
use crate::request::{Target, parse_target, routing_headers};
use address::{AddrClass, classify, embedded_ipv4};
use domain::Host;
use resolver::DnsError;

/// A destination that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vetted {
    pub connector: String,
    pub workspace: String,
    pub org: String,
    /// The address to connect to: one of the resolved addresses, all of which were vetted.
    pub addr: SocketAddr,
    /// The host name sent as SNI and verified against the certificate. Never empty.
    pub sni: String,
    /// The `Host` header sent upstream (`name`, or `name:port` off 443).
    pub host_header: String,
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
pub async fn evaluate<O: Observer>(
    snap: &Snapshot,
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
        snap,
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
pub async fn evaluate_routed<O: Observer>(
    snap: &Snapshot,
    caller: Option<&Caller>,
    connector_id: &str,
    workspace_id: &str,
    raw_target: &[u8],
    headers: &HeaderMap,
    target: &mut Option<Target>,
    obs: &mut O,
) -> Result<Vetted, Refusal> {
    let connector = snap.connectors.get(connector_id).ok_or_else(|| {
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

    let workspace = snap.workspaces.get(workspace_id).ok_or_else(|| {
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
    obs.passed(Check::Workspace, || {
        format!("{} in org {}", workspace.id, workspace.org)
    });

    let target: &Target = target.insert(parse_target(raw_target, headers)?);
    obs.passed(Check::Target, || {
        format!("host {}, path {}", target.host, target.path())
    });

    let dest = vet_destination(
        snap,
        connector,
        &workspace.org,
        &target.host,
        target.upstream_port(),
        obs,
    )
    .await?;
    Ok(Vetted {
        connector: connector.id.clone(),
        workspace: workspace.id.clone(),
        org: workspace.org.clone(),
        sni: dest.sni,
        host_header: dest.host_header,
        addr: dest.addr,
    })
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
pub async fn vet_destination<O: Observer>(
    snap: &Snapshot,
    connector: &crate::config::Connector,
    org_id: &str,
    host: &Host,
    port: u16,
    obs: &mut O,
) -> Result<Destination, Refusal> {
    let connector_id = connector.id.as_str();
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

    let org = snap.orgs.get(org_id);
    match org.and_then(|o| o.allowlist.as_ref()) {
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

    let addrs = snap.resolver.resolve(name).await.map_err(|e| match e {
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
        match exception_for(snap, ip) {
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
    if is_own_listener(snap, addr) {
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

    let host_header = if port == 443 {
        name.clone()
    } else {
        format!("{name}:{port}")
    };
    Ok(Destination {
        sni: name.clone(),
        host_header,
        addr,
    })
}

/// The operator exception covering `ip` (or the IPv4 address it embeds), if any.
fn exception_for(snap: &Snapshot, ip: IpAddr) -> Option<&ipnetwork::IpNetwork> {
    let embedded = match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    snap.exception_cidrs
        .iter()
        .find(|net| net.contains(ip) || embedded.is_some_and(|e| net.contains(e)))
}

/// Is `addr` sluice's own listening socket? An unspecified listener (`0.0.0.0`, `::`) listens
/// on every local address; sluice cannot list those without enumerating interfaces, so it
/// treats loopback and unspecified destinations on the listener's port as itself. Every other
/// local address is special-purpose or public, and public local addresses on the listener's
/// port remain a known gap (documented in the README).
fn is_own_listener(snap: &Snapshot, addr: SocketAddr) -> bool {
    let listen = snap.listener.address;
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
