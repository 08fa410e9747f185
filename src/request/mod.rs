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

use crate::error::{ErrorCode, Refusal};
use crate::names::{Host, is_identifier};

/// The app's routing headers.
pub const X_CONNECTOR: &str = "x-connector";
pub const X_WORKSPACE: &str = "x-workspace";

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
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
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
    } else if let Some((scheme, rest)) = target.split_once("://") {
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
    let mut values = headers.get_all(name).iter();
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
        if value
            .as_bytes()
            .iter()
            .any(|&b| matches!(b, b'\r' | b'\n' | 0))
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
/// hashed probe into pingora's two header maps, whether the header is there or not).
pub fn stripped_names(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut out = Vec::new();
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
mod tests {
    use super::*;
    use http::HeaderValue;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn target(raw: &str, host: Option<&str>) -> Result<Target, Refusal> {
        let h = match host {
            Some(v) => headers(&[("host", v)]),
            None => HeaderMap::new(),
        };
        parse_target(raw.as_bytes(), &h)
    }

    #[test]
    fn absolute_and_origin_form_agree() {
        let a = target("http://api.example.com/v1/x?q=1", Some("api.example.com")).unwrap();
        let b = target("/v1/x?q=1", Some("api.example.com")).unwrap();
        let c = target("HTTP://API.Example.com./v1/x?q=1", None).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.host, Host::Name("api.example.com".into()));
        assert_eq!(a.origin_form, "/v1/x?q=1");
        assert_eq!(a.upstream_port(), 443);
        assert_eq!(a.path(), "/v1/x");
    }

    #[test]
    fn ports() {
        assert_eq!(
            target("http://h.example.com:80/", None)
                .unwrap()
                .upstream_port(),
            443
        );
        assert_eq!(
            target("http://h.example.com:443/", None)
                .unwrap()
                .upstream_port(),
            443
        );
        assert_eq!(
            target("http://h.example.com:8443/", None)
                .unwrap()
                .upstream_port(),
            8443
        );
        assert_eq!(
            target("http://h.example.com", None).unwrap().origin_form,
            "/"
        );
        assert_eq!(
            target("http://h.example.com?a=b", None)
                .unwrap()
                .origin_form,
            "/?a=b"
        );
        for bad in [
            "0", "65536", "99999", "", "08443", "+443", "44 3", "0x1bb", "443a",
        ] {
            let err = target(&format!("http://h.example.com:{bad}/"), None).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidTarget, "port {bad:?}");
        }
    }

    #[test]
    fn ip_literals() {
        assert_eq!(
            target("http://93.184.216.34/", None).unwrap().host,
            Host::V4(Ipv4Addr::new(93, 184, 216, 34))
        );
        let v6 = target("http://[2606:4700::1]:8443/", None).unwrap();
        assert_eq!(
            v6.host,
            Host::V6("2606:4700::1".parse::<Ipv6Addr>().unwrap())
        );
        assert_eq!(v6.url_port, Some(8443));
    }

    #[test]
    fn refusals() {
        let cases: &[(&str, Option<&str>, ErrorCode)] = &[
            (
                "https://api.example.com/",
                None,
                ErrorCode::UnsupportedScheme,
            ),
            ("ftp://api.example.com/", None, ErrorCode::UnsupportedScheme),
            (
                "http://user:pw@api.example.com/",
                None,
                ErrorCode::InvalidTarget,
            ),
            (
                "http://api.example.com/",
                Some("other.example.com"),
                ErrorCode::HostMismatch,
            ),
            ("/x", None, ErrorCode::InvalidTarget),
            ("*", Some("api.example.com"), ErrorCode::InvalidTarget),
            ("api.example.com:443", None, ErrorCode::InvalidTarget),
            ("http://2130706433/", None, ErrorCode::InvalidTarget),
            ("http://0x7f.0.0.1/", None, ErrorCode::InvalidTarget),
            ("http://0177.0.0.1/", None, ErrorCode::InvalidTarget),
            ("http://127.1/", None, ErrorCode::InvalidTarget),
            ("http://a..example.com/", None, ErrorCode::InvalidTarget),
            ("http://[::1/", None, ErrorCode::InvalidTarget),
            ("http:///x", None, ErrorCode::InvalidTarget),
            (
                "http://api.example.com/#frag",
                None,
                ErrorCode::InvalidTarget,
            ),
            ("/x", Some("api.example.com:"), ErrorCode::InvalidTarget),
            ("/x", Some("user@api.example.com"), ErrorCode::InvalidTarget),
        ];
        for (raw, host, code) in cases {
            let err = target(raw, *host).unwrap_err();
            assert_eq!(err.code, *code, "{raw} (Host {host:?}): {err}");
        }
        let long = format!("http://{}.com/", "a".repeat(64));
        assert_eq!(
            target(&long, None).unwrap_err().code,
            ErrorCode::InvalidTarget
        );
        let two_hosts = headers(&[("host", "a.example.com"), ("host", "b.example.com")]);
        assert_eq!(
            parse_target(b"/x", &two_hosts).unwrap_err().code,
            ErrorCode::HostMismatch
        );
    }

    #[test]
    fn routing_header_rules() {
        let ok = headers(&[("x-connector", "hubspot"), ("x-workspace", "ws_42")]);
        assert_eq!(routing_headers(&ok).unwrap(), ("hubspot", "ws_42"));
        let cases: &[(&[(&str, &str)], ErrorCode)] = &[
            (&[("x-workspace", "ws_42")], ErrorCode::MissingConnector),
            (&[("x-connector", "hubspot")], ErrorCode::MissingWorkspace),
            (
                &[
                    ("x-connector", "a"),
                    ("x-connector", "b"),
                    ("x-workspace", "w"),
                ],
                ErrorCode::InvalidRoutingHeader,
            ),
            (
                &[("x-connector", "a,b"), ("x-workspace", "w")],
                ErrorCode::InvalidRoutingHeader,
            ),
            (
                &[("x-connector", "a"), ("x-workspace", "w 1")],
                ErrorCode::InvalidRoutingHeader,
            ),
            (
                &[("x-connector", ""), ("x-workspace", "w")],
                ErrorCode::InvalidRoutingHeader,
            ),
        ];
        for (h, code) in cases {
            assert_eq!(
                routing_headers(&headers(h)).unwrap_err().code,
                *code,
                "{h:?}"
            );
        }
    }

    #[test]
    fn framing() {
        let both = headers(&[("content-length", "3"), ("transfer-encoding", "chunked")]);
        assert!(check_framing(&both, None).is_err());
        let two = headers(&[("content-length", "3"), ("content-length", "4")]);
        assert!(check_framing(&two, None).is_err());
        let te = headers(&[("transfer-encoding", "chunked")]);
        assert!(check_framing(&te, None).is_ok());
        let raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            check_framing(&te, Some(raw)).unwrap_err().code,
            ErrorCode::AmbiguousFraming
        );
    }

    #[test]
    fn transfer_encoding_is_one_chunked_coding_or_refused() {
        let ok: &[&[&str]] = &[&["chunked"], &["Chunked"], &[" chunked "]];
        for values in ok {
            let pairs: Vec<_> = values.iter().map(|v| ("transfer-encoding", *v)).collect();
            assert!(check_framing(&headers(&pairs), None).is_ok(), "{values:?}");
        }
        let refused: &[&[&str]] = &[
            &["identity, chunked"],
            &["identity", "chunked"],
            &["gzip, chunked"],
            &["chunked, chunked"],
            &["chunked", "chunked"],
            &["chunked, identity"],
            &["chunked,"],
            &["identity"],
            &["gzip"],
            &[""],
            &["chunkedx"],
        ];
        for values in refused {
            let pairs: Vec<_> = values.iter().map(|v| ("transfer-encoding", *v)).collect();
            assert_eq!(
                check_framing(&headers(&pairs), None).unwrap_err().code,
                ErrorCode::AmbiguousFraming,
                "{values:?}"
            );
        }
    }

    #[test]
    fn header_limits() {
        let h = headers(&[("a", "1"), ("b", "2"), ("b", "3")]);
        assert!(check_header_limits(&h, 100, 3, 100).is_ok());
        let over = check_header_limits(&h, 100, 2, 100).unwrap_err();
        assert_eq!(over.code, ErrorCode::HeadersTooLarge);
        assert_eq!(over.code.status().as_u16(), 431);
        assert!(check_header_limits(&h, 101, 3, 100).is_err());
    }

    #[test]
    fn stripped_names_are_the_routing_hop_and_connection_listed_headers_present() {
        let h = headers(&[
            ("host", "api.example.com"),
            ("x-connector", "hubspot"),
            ("X-Workspace", "ws_1"),
            ("proxy-authorization", "Bearer t"),
            ("accept", "application/json"),
            ("connection", "keep-alive, X-Secret-Hop, content-length"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
        ]);
        let mut names: Vec<String> = stripped_names(&h)
            .iter()
            .map(|n| n.as_str().to_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "connection",
                "keep-alive",
                "proxy-authorization",
                "te",
                "x-connector",
                "x-secret-hop",
                "x-workspace"
            ]
        );
        let plain = headers(&[("host", "a.example.com"), ("accept", "*/*")]);
        assert!(stripped_names(&plain).is_empty());
    }

    #[test]
    fn connection_listed_headers_except_framing() {
        let h = headers(&[
            ("connection", "close, X-Secret-Hop, content-length"),
            ("connection", "te"),
        ]);
        let names: Vec<_> = connection_listed(&h)
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["close", "x-secret-hop", "te"]);
    }
}
