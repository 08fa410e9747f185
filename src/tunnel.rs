//! CONNECT tunnels, first part: plain HTTP inside a tunnel (what Node's undici `ProxyAgent`
//! does even for `http://` URLs: `CONNECT host:80`, then origin-form requests inside).
//!
//! A CONNECT is authenticated and policy-checked before its `200`: the caller (407 otherwise),
//! the connector (`X-Connector` on the CONNECT, or the one connector whose `allowed_domains`
//! match the host; several → 403 `connector_ambiguous`), the workspace (`X-Workspace`, or the
//! caller's only workspace), the port, both allowlists, DNS and every resolved address — the
//! same [`crate::policy`] checks as any request, so a refusal opens no upstream connection.
//! The admitted [`Tunnel`] is kept as the connection's context (pingora's
//! `persist_connection_context`): every request inside runs the whole request path again
//! (policy, credential, pacing, retries, logs) under the tunnel's caller, connector and
//! workspace, and must name the tunnel's host (domain fronting is refused).
//!
//! What follows the 200 decides the tunnel's kind ([`crate::server`] looks at the first byte):
//! a TLS handshake is intercepted ([`crate::intercept`], when `[interception]` is configured;
//! without it `CONNECT host:443` is refused up front with 405 `connect_not_supported`), and
//! anything else is plain HTTP. Either way requests go upstream over sluice's own verified TLS,
//! to the CONNECT's port (80 means 443, as in a URL).

use std::sync::Arc;

use compact_str::CompactString;
use http::HeaderMap;

use crate::caller::{Caller, WorkspaceScope};
use crate::config::Snapshot;
use crate::error::{ErrorCode, Refusal};
use crate::policy::domain::Host;
use crate::policy::{self, Vetted};
use crate::request::{Target, X_CONNECTOR, X_WORKSPACE, parse_authority};

/// What a CONNECT was admitted for; every request inside the tunnel is bound to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    pub caller: Arc<Caller>,
    pub connector: String,
    pub workspace: String,
    pub host: Host,
    /// The CONNECT's port.
    pub port: u16,
    /// Set once sluice intercepted TLS inside the tunnel: the name the client asked for (SNI).
    pub tls_sni: Option<String>,
}

/// The connection context right after a CONNECT's 200: the tunnel, before its first byte
/// told whether TLS (to intercept) or plain HTTP follows. [`crate::server`] decides.
pub struct Opened(pub Arc<Tunnel>);

/// An optional routing header on the CONNECT: present once and an identifier, or absent.
fn optional_routing<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<Option<&'h str>, Refusal> {
    if !headers.contains_key(name) {
        return Ok(None);
    }
    let missing = match name {
        X_CONNECTOR => ErrorCode::MissingConnector,
        _ => ErrorCode::MissingWorkspace,
    };
    crate::request::single_identifier(headers, name, missing).map(Some)
}

/// The one enabled connector whose `allowed_domains` match `host` (a disabled connector
/// allows nothing, so it is no candidate).
pub fn infer_connector<'s>(snap: &'s Snapshot, host: &Host) -> Result<&'s str, Refusal> {
    let mut matching = snap
        .connectors
        .values()
        .filter(|c| c.enabled && c.allowed_domains.matching(host).is_some());
    match (matching.next(), matching.next()) {
        (Some(c), None) => Ok(c.id.as_str()),
        (None, _) => Err(Refusal::new(
            ErrorCode::DomainNotAllowed,
            format!("no connector's allowed_domains match {host}"),
        )),
        (Some(a), Some(b)) => Err(Refusal::new(
            ErrorCode::ConnectorAmbiguous,
            format!(
                "{host} is allowed by several connectors ({}, {}, …): name one with X-Connector on the CONNECT",
                a.id, b.id
            ),
        )),
    }
}

/// The caller's only workspace, when it is scoped to exactly one.
fn only_workspace(caller: &Caller) -> Option<&str> {
    match &caller.scope {
        WorkspaceScope::Only(set) if set.len() == 1 => set.iter().next().map(CompactString::as_str),
        _ => None,
    }
}

/// Admit a CONNECT (its authority-form target in `raw_target`) for `caller`: the tunnel and
/// the destination it was vetted for, or the first refusal. `target` receives the parsed
/// destination for the logs.
pub async fn admit_connect(
    snap: &Snapshot,
    caller: Arc<Caller>,
    user_workspace: Option<&str>,
    raw_target: &[u8],
    headers: &HeaderMap,
    target: &mut Option<Target>,
) -> Result<(Tunnel, Vetted), Refusal> {
    let authority = std::str::from_utf8(raw_target)
        .ok()
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidTarget,
                "CONNECT needs an authority-form target (host:port)",
            )
        })?;
    let (host, port) = parse_authority(authority)?;
    let port =
        port.ok_or_else(|| Refusal::new(ErrorCode::InvalidTarget, "CONNECT target has no port"))?;
    if port == 443 && snap.interception.is_none() {
        return Err(Refusal::new(
            ErrorCode::ConnectNotSupported,
            "CONNECT to port 443 carries TLS, and TLS interception is not configured ([interception]): send plain http:// URLs through the proxy",
        ));
    }
    let connector = match optional_routing(headers, X_CONNECTOR)? {
        Some(c) => c,
        None => infer_connector(snap, &host)?,
    };
    // Precedence: X-Workspace, then the proxy URL's user name, then the caller's only one.
    let workspace = match optional_routing(headers, X_WORKSPACE)? {
        Some(w) => w,
        None => user_workspace.or_else(|| only_workspace(&caller)).ok_or_else(|| {
            Refusal::new(
                ErrorCode::MissingWorkspace,
                "the CONNECT names no workspace: send X-Workspace, use the workspace as the proxy URL's user name (http://ws:TOKEN@sluice), or a caller scoped to one workspace",
            )
        })?,
    };
    // The same checks as `http://host:port/` (the CONNECT's Host header, if any, must agree).
    let url = format!("http://{authority}/");
    let vetted = policy::evaluate_routed(
        snap,
        Some(&caller),
        connector,
        workspace,
        url.as_bytes(),
        headers,
        target,
        &mut (),
    )
    .await?;
    let tunnel = Tunnel {
        caller,
        connector: vetted.connector().to_owned(),
        workspace: vetted.workspace().to_owned(),
        host,
        port,
        tls_sni: None,
    };
    Ok((tunnel, vetted))
}

/// A request inside `tunnel` must go where the CONNECT said: same host, same port (a `Host`
/// without a port means 80).
pub fn check_inside(tunnel: &Tunnel, target: &Target) -> Result<(), Refusal> {
    if let Some(sni) = &tunnel.tls_sni {
        if !matches!(&tunnel.host, Host::Name(n) if n == sni) {
            return Err(Refusal::new(
                ErrorCode::TunnelHostMismatch,
                format!(
                    "TLS inside a tunnel to {} asked for {sni:?} (SNI)",
                    tunnel.host
                ),
            ));
        }
    }
    // A Host without a port means the scheme's default: 443 inside TLS, 80 in plain HTTP.
    let default = if tunnel.tls_sni.is_some() { 443 } else { 80 };
    let port = target.url_port.unwrap_or(default);
    if target.host != tunnel.host || port != tunnel.port {
        return Err(Refusal::new(
            ErrorCode::TunnelHostMismatch,
            format!(
                "the request names {}:{port} inside a tunnel to {}:{}",
                target.host, tunnel.host, tunnel.port
            ),
        ));
    }
    Ok(())
}
