//! Step 1 of the request path: what the app asked for, parsed strictly.
//!
//! Absolute-form (`GET http://api.example.com/v1/x HTTP/1.1`, what clients send through
//! `HTTP_PROXY`) and origin-form with `Host` (`GET /v1/x` + `Host: api.example.com`) yield the
//! same [`Target`]. Anything ambiguous is refused with 400 before any policy runs against it:
//! a proxy that guesses is a proxy that can be steered.
//!
//! pingora's HTTP/1 parser already refuses some of this (duplicate `Host`, `Host` differing from
//! the absolute-form authority byte for byte, userinfo, bad `Content-Length`, bare CR/LF) with a
//! bare 400 before sluice sees the request; the checks here repeat them so the policy never
//! depends on which layer caught what, and so `sluice explain` applies the same rules.

use http::HeaderMap;
use http::header::{self, HeaderName};
use smallvec::SmallVec;

use crate::error::{ErrorCode, Refusal};
use crate::names::{Host, is_identifier};

/// The app's routing headers.
pub const X_CONNECTOR: &str = "x-connector";
pub const X_WORKSPACE: &str = "x-workspace";
/// The same names parsed once: a lookup by `&str` parses the name on every call.
pub const X_CONNECTOR_NAME: HeaderName = HeaderName::from_static(X_CONNECTOR);
pub const X_WORKSPACE_NAME: HeaderName = HeaderName::from_static(X_WORKSPACE);

/// Where the app wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    /// The port in the URL, if any. `None` and `80` both mean 443 upstream.
    pub url_port: Option<u16>,
    /// Path and query as sent upstream in origin-form (always starts with `/`).
    pub origin_form: String,
}

impl Target {
    /// The upstream port: always TLS, so the plain-HTTP default 80 becomes 443.
    pub fn upstream_port(&self) -> u16 {
        match self.url_port {
            None | Some(80) => 443,
            Some(p) => p,
        }
    }

    /// The path without the query, for logs (query values may carry data).
    pub fn path(&self) -> &str {
        self.origin_form
            .split_once('?')
            .map_or(self.origin_form.as_str(), |(p, _)| p)
    }
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::InvalidTarget, message)
}

/// Parse the request target (`raw_path`, as on the request line) and the `Host` header.
pub fn parse_target(raw_target: &[u8], headers: &HeaderMap) -> Result<Target, Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::new(
            ErrorCode::HostMismatch,
            "more than one Host header",
        ));
    }
    let host_header = host_header
        .map(|h| std::str::from_utf8(h.as_bytes()).map_err(|_| invalid("Host header is not ASCII")))
        .transpose()?;
    let target =
        std::str::from_utf8(raw_target).map_err(|_| invalid("request target is not ASCII"))?;
    // A fold, not `all`: without the early exit the scan vectorises, and a clean target (every
    // one in practice) is read to its end either way.
    if target.is_empty() || !target.bytes().fold(true, |ok, b| ok & b.is_ascii_graphic()) {
        return Err(invalid(
            "request target has a control, space or non-ASCII byte",
        ));
    }
    if target.contains('#') {
        return Err(invalid("request target has a fragment"));
    }

    let (authority, origin_form) = if target.starts_with('/') {
        let authority =
            host_header.ok_or_else(|| invalid("origin-form request without a Host header"))?;
        (authority, target.to_string())
    } else if let Some((scheme, rest)) = split_scheme(target) {
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(Refusal::new(
                ErrorCode::UnsupportedScheme,
                "only http:// URLs are proxied (sluice itself speaks TLS upstream); https:// and CONNECT are not supported",
            ));
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if let Some(h) = host_header {
            if !h.eq_ignore_ascii_case(authority) {
                return Err(Refusal::new(
                    ErrorCode::HostMismatch,
                    "Host header disagrees with the request-target authority",
                ));
            }
        }
        let origin_form = match path.as_bytes().first() {
            None => "/".to_string(),
            Some(b'?') => format!("/{path}"),
            Some(_) => path.to_string(),
        };
        (authority, origin_form)
    } else {
        return Err(invalid(
            "request target is neither absolute-form nor origin-form",
        ));
    };

    let (host, url_port) = parse_authority(authority)?;
    Ok(Target {
        host,
        url_port,
        origin_form,
    })
}

/// `target.split_once("://")`, with the case every request takes (`http://`, in any case)
/// answered without a substring search.
fn split_scheme(target: &str) -> Option<(&str, &str)> {
    match target.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("http://") => {
            Some((&target[..4], &target[7..]))
        }
        _ => target.split_once("://"),
    }
}

/// `host[:port]`, strictly ([`crate::names::parse_authority`]), refused as an invalid request.
pub fn parse_authority(authority: &str) -> Result<(Host, Option<u16>), Refusal> {
    crate::names::parse_authority(authority).map_err(invalid)
}

/// `X-Connector` and `X-Workspace`: each present exactly once, an identifier (so never
/// comma-joined).
pub fn routing_headers(headers: &HeaderMap) -> Result<(&str, &str), Refusal> {
    let connector = single_identifier(headers, X_CONNECTOR, ErrorCode::MissingConnector)?;
    let workspace = single_identifier(headers, X_WORKSPACE, ErrorCode::MissingWorkspace)?;
    Ok((connector, workspace))
}

pub fn single_identifier<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
    missing: ErrorCode,
) -> Result<&'h str, Refusal> {
    let mut values = match name {
        X_CONNECTOR => headers.get_all(&X_CONNECTOR_NAME),
        X_WORKSPACE => headers.get_all(&X_WORKSPACE_NAME),
        other => headers.get_all(other),
    }
    .iter();
    let value = values
        .next()
        .ok_or_else(|| Refusal::new(missing, format!("the {name} header is required")))?;
    if values.next().is_some() {
        return Err(Refusal::new(
            ErrorCode::InvalidRoutingHeader,
            format!("{name} must appear exactly once"),
        ));
    }
    let bytes = value.as_bytes();
    if !is_identifier(bytes) {
        return Err(Refusal::new(
            ErrorCode::InvalidRoutingHeader,
            format!("{name} must be a single identifier (letters, digits, '_', '-', '.')"),
        ));
    }
    // is_identifier admits ASCII only, so this cannot fail.
    std::str::from_utf8(bytes).map_err(|_| Refusal::new(ErrorCode::InvalidRoutingHeader, name))
}

/// Header values must not carry CR, LF or NUL (pingora's parser refuses bare ones; this also
/// covers anything that slipped through obs-fold handling).
pub fn check_header_values(headers: &HeaderMap) -> Result<(), Refusal> {
    for (name, value) in headers {
        // A fold, not `any`: it vectorises, and a clean value is read whole either way.
        if value
            .as_bytes()
            .iter()
            .fold(false, |bad, &b| bad | matches!(b, b'\r' | b'\n' | 0))
        {
            return Err(Refusal::new(
                ErrorCode::MalformedRequest,
                format!("header {name} has a CR, LF or NUL byte"),
            ));
        }
    }
    Ok(())
}

/// Refuse requests whose body framing is ambiguous. pingora silently drops `Content-Length`
/// when `Transfer-Encoding` is present (RFC 9112 allows that); sluice refuses instead, because
/// the combination is the classic request-smuggling probe and no honest client sends it.
/// `raw_head` is the request head as received, before pingora's normalisation.
pub fn check_framing(headers: &HeaderMap, raw_head: Option<&[u8]>) -> Result<(), Refusal> {
    let ambiguous = || {
        Refusal::new(
            ErrorCode::AmbiguousFraming,
            "Content-Length and Transfer-Encoding together, or conflicting Content-Length values",
        )
    };
    let te = headers.contains_key(header::TRANSFER_ENCODING);
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        if te || lengths.any(|v| v != first) {
            return Err(ambiguous());
        }
    }
    if te && !only_chunked(headers) {
        return Err(Refusal::new(
            ErrorCode::AmbiguousFraming,
            "Transfer-Encoding must be exactly \"chunked\" (RFC 9112 §6.1): other or stacked codings are refused",
        ));
    }
    if te {
        if let Some(head) = raw_head {
            let has_cl = head.split(|&b| b == b'\n').skip(1).any(|line| {
                line.split(|&b| b == b':')
                    .next()
                    .is_some_and(|n| n.trim_ascii().eq_ignore_ascii_case(b"content-length"))
            });
            if has_cl {
                return Err(ambiguous());
            }
        }
    }
    Ok(())
}

/// A request's `Transfer-Encoding`, across all its header lines, is one coding: `chunked`.
/// RFC 9112 §6.1 requires `chunked` last and a 400 otherwise; sluice also refuses codings in
/// front of it (`identity, chunked`, `gzip, chunked`) and repeats: the upstream would have to
/// undo a coding sluice cannot see into, and front ends that disagree on such lists are how
/// requests get smuggled.
fn only_chunked(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','));
    matches!(
        (codings.next(), codings.next()),
        (Some(c), None) if c.trim_ascii().eq_ignore_ascii_case(b"chunked")
    )
}

/// The request head within `listener.max_header_count` fields and `max_header_bytes` bytes
/// (`head_bytes`: request line and header lines as received).
pub fn check_header_limits(
    headers: &HeaderMap,
    head_bytes: usize,
    max_count: usize,
    max_bytes: usize,
) -> Result<(), Refusal> {
    if headers.len() > max_count {
        return Err(Refusal::new(
            ErrorCode::HeadersTooLarge,
            format!(
                "{} header fields; at most {max_count} are accepted",
                headers.len()
            ),
        ));
    }
    if head_bytes > max_bytes {
        return Err(Refusal::new(
            ErrorCode::HeadersTooLarge,
            format!("the request head is {head_bytes} bytes; at most {max_bytes} are accepted"),
        ));
    }
    Ok(())
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and sluice's own request headers: never forwarded.
/// `Transfer-Encoding` is hop-by-hop too, but pingora re-frames the body itself from it, so it
/// is left for pingora to manage. Parsed names: removing by `&str` parses the name again on
/// every request.
pub static STRIPPED_REQUEST_HEADERS: [HeaderName; 10] = [
    HeaderName::from_static(X_CONNECTOR),
    HeaderName::from_static(X_WORKSPACE),
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Headers named in `Connection` that must survive anyway: removing them would break framing
/// or routing.
const PROTECTED: &[HeaderName] = &[
    header::HOST,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
];

/// The headers to take off a request before it goes upstream: those of
/// [`STRIPPED_REQUEST_HEADERS`] it carries and those it lists in `Connection`. One pass over
/// the names the request has (a handful), instead of a removal per stripped name (each a
/// hashed probe into pingora's two header maps, whether the header is there or not). Held
/// inline: a request through the gateway carries three of them (its routing headers).
pub fn stripped_names(headers: &HeaderMap) -> SmallVec<[HeaderName; 4]> {
    let mut out = SmallVec::new();
    let mut connection = false;
    for name in headers.keys() {
        if STRIPPED_REQUEST_HEADERS.contains(name) {
            connection |= name == header::CONNECTION;
            out.push(name.clone());
        }
    }
    if connection {
        for name in connection_listed(headers) {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// Every header the app listed in `Connection` (lowercased), except protected ones.
pub fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .filter(|name| !PROTECTED.contains(name))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests;
