//! Target parsing, routing headers, framing and header limits.

use super::*;
use http::HeaderValue;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A header map from name/value pairs, in order (shared with other modules' tests).
pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
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
    let raw =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length : 3\r\nTransfer-Encoding: chunked\r\n\r\n";
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
