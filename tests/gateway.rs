//! The gateway end to end: real sluice on an ephemeral port, a real TLS upstream, real clients.

mod common;

use common::*;

fn routed(
    rb: reqwest::RequestBuilder,
    connector: &str,
    workspace: &str,
) -> reqwest::RequestBuilder {
    rb.header("X-Connector", connector)
        .header("X-Workspace", workspace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_absolute_form_with_reqwest() {
    let env = Env::new().await;
    let gw = env.start().await;
    let client = client(&gw, Some(("app", APP_TOKEN)));
    let resp = routed(
        client.get(env.url("api.saas.test", "/v1/things?limit=2")),
        "saas",
        "ws_42",
    )
    .header("X-Request-Id", "req-abc-123")
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-abc-123");
    assert!(resp.headers().get("x-sluice-error").is_none());
    assert_eq!(resp.text().await.unwrap(), r#"{"ok":true}"#);

    let reqs = env.upstream.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.target, "/v1/things?limit=2", "origin-form upstream");
    assert_eq!(
        r.header("host"),
        Some(format!("api.saas.test:{}", env.upstream.port()).as_str())
    );
    assert_eq!(r.sni.as_deref(), Some("api.saas.test"));
    for internal in [
        "x-connector",
        "x-workspace",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(!r.has_header(internal), "{internal} leaked upstream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_form_behaves_like_absolute_form() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    for target in [
        format!("http://api.saas.test:{port}/v1/x?q=1"),
        "/v1/x?q=1".to_string(),
    ] {
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: api.saas.test:{port}\r\nX-Connector: saas\r\nX-Workspace: ws_42\r\nProxy-Authorization: Bearer {APP_TOKEN}\r\nConnection: close\r\n\r\n"
        );
        let resp = raw(&gw, req.as_bytes()).await;
        assert_eq!(resp.status, 200, "{target}: {}", resp.head);
    }
    let reqs = env.upstream.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].target, reqs[1].target);
    assert_eq!(reqs[0].header("host"), reqs[1].header("host"));
    assert_eq!(reqs[0].target, "/v1/x?q=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_curl_works() {
    let env = Env::new().await;
    let gw = env.start().await;
    let (proxy, url) = (
        format!("http://{}", gw.addr),
        env.url("api.saas.test", "/curl"),
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "-x", &proxy, "--proxy-user"])
            .arg(format!("app:{APP_TOKEN}"))
            .args(["-H", "X-Connector: saas", "-H", "X-Workspace: ws_42", &url])
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), r#"{"ok":true}"#);
    let r = &env.upstream.requests()[0];
    assert_eq!(r.target, "/curl");
    // curl sends Proxy-Connection: Keep-Alive to proxies; it must not reach the upstream.
    assert!(!r.has_header("proxy-connection"));
    assert!(!r.has_header("proxy-authorization"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_works() {
    let env = Env::new().await;
    let gw = env.start().await;
    let script = format!(
        r#"
import requests
r = requests.post({url:?}, json={{"email": "a@example.com"}},
    headers={{"X-Connector": "saas", "X-Workspace": "ws_7"}},
    proxies={{"http": "http://app:{token}@{proxy}"}}, timeout=20)
print(r.status_code)
print(r.text)
"#,
        url = env.url("api.saas.test", "/contacts"),
        token = APP_TOKEN,
        proxy = gw.addr,
    );
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .expect("python3 is installed")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["200", r#"{"ok":true}"#]
    );
    let r = &env.upstream.requests()[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.target, "/contacts");
    assert_eq!(r.body, br#"{"email": "a@example.com"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_and_connection_listed_headers_are_stripped() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    let body = "hello=world";
    let req = format!(
        "POST http://api.saas.test:{port}/hop HTTP/1.1\r\nHost: api.saas.test:{port}\r\nX-Connector: saas\r\nX-Workspace: ws_42\r\nProxy-Authorization: {auth}\r\nProxy-Connection: keep-alive\r\nConnection: close, X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Keep: yes\r\nContent-Length: {len}\r\n\r\n{body}",
        auth = basic("app", APP_TOKEN),
        len = body.len(),
    );
    let resp = raw(&gw, req.as_bytes()).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let r = &env.upstream.requests()[0];
    for gone in [
        "x-hop-secret",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
        "proxy-authorization",
        "x-connector",
        "x-workspace",
    ] {
        assert!(
            !r.has_header(gone),
            "{gone} reached the upstream: {:?}",
            r.headers
        );
    }
    assert_eq!(r.header("x-keep"), Some("yes"));
    assert_eq!(r.body, body.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_relayed_not_followed_and_error_header_cannot_be_forged() {
    let env = Env::new().await;
    let gw = env.start().await;
    let client = client(&gw, Some(("app", APP_TOKEN)));
    let resp = routed(
        client.get(env.url("api.saas.test", "/redirect")),
        "saas",
        "ws_42",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(
        resp.headers()["location"],
        "https://elsewhere.example/landing"
    );
    assert_eq!(
        env.upstream.requests().len(),
        1,
        "the redirect was not followed"
    );

    let resp = routed(
        client.get(env.url("api.saas.test", "/forge")),
        "saas",
        "ws_42",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-sluice-error").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_upstream_connections_are_reused() {
    let env = Env::new().await;
    let gw = env.start().await;
    let client = client(&gw, Some(("app", APP_TOKEN)));
    let ok =
        r#"sluice_requests_total{class="forwarded",connector="saas",outcome="ok",status="2xx"}"#;
    for i in 1..=5 {
        let resp = routed(
            client.get(env.url("api.saas.test", "/again")),
            "saas",
            "ws_42",
        )
        .send()
        .await
        .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        // pingora puts the upstream connection back in the pool just after the response's
        // last byte went out, so a client this quick can ask again in between and, rightly,
        // get a second connection. The request is counted after the connection is back:
        // wait for that, then send the next.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while metric(&gw, ok).await < i {
            assert!(
                std::time::Instant::now() < deadline,
                "request {i} never counted"
            );
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(env.upstream.requests().len(), 5);
    assert_eq!(
        env.upstream.connections(),
        1,
        "one pooled TLS connection for five requests"
    );
}

/// A request the refusal table sends: either through reqwest (well-formed HTTP) or raw bytes.
enum Send {
    Get {
        url: String,
        connector: Option<&'static str>,
        workspace: Option<&'static str>,
        auth: Option<(&'static str, &'static str)>,
    },
    Raw(String),
}

fn get(url: String, connector: &'static str, workspace: &'static str) -> Send {
    Send::Get {
        url,
        connector: Some(connector),
        workspace: Some(workspace),
        auth: Some(("app", APP_TOKEN)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_code_and_the_upstream_sees_no_connection() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    let gw_port = gw.addr.port();
    let auth = basic("app", APP_TOKEN);
    // A raw request: `head` (request line, maybe Host), then the routing and credential headers
    // every case shares, then `tail` (more headers, the blank line, any body).
    let with_routing = |head: String, tail: String| {
        Send::Raw(format!(
            "{head}\r\nX-Connector: saas\r\nX-Workspace: ws_42\r\nProxy-Authorization: {auth}\r\n{tail}"
        ))
    };
    let raw_full = Send::Raw;

    // (name, request, status, code). `None` as code: pingora's HTTP/1 parser refuses the request
    // before sluice sees it, with a bare 400 (see README, "Errors").
    let cases: Vec<(&str, Send, u16, Option<&str>)> = vec![
        (
            "no credentials",
            Send::Get {
                url: env.url("api.saas.test", "/"),
                connector: Some("saas"),
                workspace: Some("ws_42"),
                auth: None,
            },
            407,
            Some("proxy_auth_required"),
        ),
        (
            "wrong token",
            Send::Get {
                url: env.url("api.saas.test", "/"),
                connector: Some("saas"),
                workspace: Some("ws_42"),
                auth: Some(("app", "canary-not-the-token")),
            },
            407,
            Some("proxy_auth_required"),
        ),
        (
            "token of another caller name",
            Send::Get {
                url: env.url("api.saas.test", "/"),
                connector: Some("saas"),
                workspace: Some("ws_42"),
                auth: Some(("ops", APP_TOKEN)),
            },
            407,
            Some("proxy_auth_required"),
        ),
        (
            "missing X-Connector",
            Send::Get {
                url: env.url("api.saas.test", "/"),
                connector: None,
                workspace: Some("ws_42"),
                auth: Some(("app", APP_TOKEN)),
            },
            400,
            Some("missing_connector"),
        ),
        (
            "missing X-Workspace",
            Send::Get {
                url: env.url("api.saas.test", "/"),
                connector: Some("saas"),
                workspace: None,
                auth: Some(("app", APP_TOKEN)),
            },
            400,
            Some("missing_workspace"),
        ),
        (
            "duplicate X-Connector",
            with_routing(
                format!("GET http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"),
                "X-Connector: saas\r\nConnection: close\r\n\r\n".into(),
            ),
            400,
            Some("invalid_routing_header"),
        ),
        (
            "comma-joined X-Workspace",
            raw_full(format!(
                "GET http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}\r\nX-Connector: saas\r\nX-Workspace: ws_42, ws_7\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
            )),
            400,
            Some("invalid_routing_header"),
        ),
        (
            "unknown connector",
            get(env.url("api.saas.test", "/"), "nope", "ws_42"),
            403,
            Some("unknown_connector"),
        ),
        (
            "disabled connector",
            get(env.url("api.saas.test", "/"), "off", "ws_42"),
            403,
            Some("connector_disabled"),
        ),
        (
            "unknown workspace",
            get(env.url("api.saas.test", "/"), "saas", "ws_nope"),
            403,
            Some("unknown_workspace"),
        ),
        (
            "workspace outside caller scope",
            get(env.url("api.saas.test", "/"), "saas", "ws_other"),
            403,
            Some("workspace_not_permitted"),
        ),
        (
            "port not allowed",
            get("http://api.saas.test:8081/".into(), "saas", "ws_42"),
            403,
            Some("port_not_allowed"),
        ),
        (
            "domain not allowed",
            get(env.url("api.evil.test", "/"), "saas", "ws_7"),
            403,
            Some("domain_not_allowed"),
        ),
        (
            "look-alike suffix",
            get(env.url("api.saas.test.evil.test", "/"), "saas", "ws_7"),
            403,
            Some("domain_not_allowed"),
        ),
        (
            "look-alike prefix",
            get(env.url("evilsaas.test", "/"), "saas", "ws_7"),
            403,
            Some("domain_not_allowed"),
        ),
        (
            "connector allows, org refuses",
            get(env.url("other.saas.test", "/"), "saas", "ws_42"),
            403,
            Some("org_domain_not_allowed"),
        ),
        (
            "org allows, connector refuses",
            get(env.url("api.saas.test", "/"), "narrow", "ws_42"),
            403,
            Some("domain_not_allowed"),
        ),
        (
            "IP literal",
            get(format!("http://127.0.0.1:{port}/"), "saas", "ws_7"),
            403,
            Some("domain_not_allowed"),
        ),
        (
            "private address",
            get(env.url("private.saas.test", "/"), "saas", "ws_7"),
            403,
            Some("address_not_allowed"),
        ),
        (
            "cloud metadata address",
            get(env.url("metadata.saas.test", "/"), "saas", "ws_7"),
            403,
            Some("address_not_allowed"),
        ),
        (
            "one of several addresses private",
            get(env.url("mixed.saas.test", "/"), "saas", "ws_7"),
            403,
            Some("address_not_allowed"),
        ),
        (
            "IPv4-mapped private",
            get(env.url("mapped.saas.test", "/"), "saas", "ws_7"),
            403,
            Some("address_not_allowed"),
        ),
        (
            "DNS failure",
            get(env.url("nxdomain.saas.test", "/"), "saas", "ws_7"),
            502,
            Some("dns_failure"),
        ),
        (
            "sluice's own listener",
            get(format!("http://self.saas.test:{gw_port}/"), "saas", "ws_42"),
            403,
            Some("self_connection"),
        ),
        (
            "https scheme",
            with_routing(format!("GET https://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Connection: close\r\n\r\n".into()),
            400,
            Some("unsupported_scheme"),
        ),
        (
            "ftp scheme",
            with_routing(format!("GET ftp://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Connection: close\r\n\r\n".into()),
            400,
            Some("unsupported_scheme"),
        ),
        (
            "decimal IPv4 host",
            with_routing(format!("GET http://2130706433:{port}/ HTTP/1.1\r\nHost: 2130706433:{port}"), "Connection: close\r\n\r\n".into()),
            400,
            Some("invalid_target"),
        ),
        (
            "hex IPv4 host",
            with_routing(format!("GET http://0x7f.0.0.1:{port}/ HTTP/1.1\r\nHost: 0x7f.0.0.1:{port}"), "Connection: close\r\n\r\n".into()),
            400,
            Some("invalid_target"),
        ),
        (
            "octal IPv4 host",
            with_routing(format!("GET http://0177.0.0.1:{port}/ HTTP/1.1\r\nHost: 0177.0.0.1:{port}"), "Connection: close\r\n\r\n".into()),
            400,
            Some("invalid_target"),
        ),
        (
            "short IPv4 host",
            with_routing(format!("GET http://127.1:{port}/ HTTP/1.1\r\nHost: 127.1:{port}"), "Connection: close\r\n\r\n".into()),
            400,
            Some("invalid_target"),
        ),
        (
            "over-long label",
            raw_full(format!(
                "GET http://{label}.saas.test:{port}/ HTTP/1.1\r\nHost: {label}.saas.test:{port}\r\nX-Connector: saas\r\nX-Workspace: ws_42\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n",
                label = "a".repeat(64)
            )),
            400,
            Some("invalid_target"),
        ),
        (
            "port out of range",
            with_routing("GET http://api.saas.test:99999/ HTTP/1.1\r\nHost: api.saas.test:99999".to_string(), "Connection: close\r\n\r\n".into()),
            400,
            None,
        ),
        (
            "port zero",
            with_routing("GET http://api.saas.test:0/ HTTP/1.1\r\nHost: api.saas.test:0".to_string(), "Connection: close\r\n\r\n".into()),
            400,
            Some("invalid_target"),
        ),
        (
            "Host differs from authority",
            with_routing(format!("GET http://api.saas.test:{port}/ HTTP/1.1\r\nHost: other.saas.test:{port}"), "Connection: close\r\n\r\n".into()),
            400,
            None,
        ),
        (
            "duplicate Host",
            with_routing(format!("GET /x HTTP/1.1\r\nHost: api.saas.test:{port}\r\nHost: other.saas.test:{port}"), "Connection: close\r\n\r\n".into()),
            400,
            None,
        ),
        (
            "userinfo in authority",
            with_routing(format!("GET http://u:p@api.saas.test:{port}/ HTTP/1.1"), "Connection: close\r\n\r\n".into()),
            400,
            None,
        ),
        (
            "origin-form without Host",
            with_routing("GET /x HTTP/1.0".to_string(), "\r\n".into()),
            400,
            Some("invalid_target"),
        ),
        (
            "Content-Length with Transfer-Encoding",
            with_routing(format!("POST http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Content-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".into()),
            400,
            Some("ambiguous_framing"),
        ),
        (
            "Transfer-Encoding identity, chunked",
            with_routing(format!("POST http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Transfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
            400,
            Some("ambiguous_framing"),
        ),
        (
            "Transfer-Encoding identity then chunked on two lines",
            with_routing(format!("POST http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
            400,
            Some("ambiguous_framing"),
        ),
        (
            "Transfer-Encoding gzip, chunked",
            with_routing(format!("POST http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
            400,
            Some("ambiguous_framing"),
        ),
        (
            "Transfer-Encoding chunked twice",
            with_routing(format!("POST http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
            400,
            Some("ambiguous_framing"),
        ),
        (
            // pingora's parser refuses a request whose final coding is not chunked itself.
            "Transfer-Encoding chunked, identity (chunked not last)",
            with_routing(format!("POST http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Transfer-Encoding: chunked, identity\r\n\r\nhello".into()),
            400,
            None,
        ),
        (
            "101 header fields (the default limit is 100)",
            with_routing(format!("GET http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), format!("{}\r\n", (0..97).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect::<String>())),
            431,
            Some("request_headers_too_large"),
        ),
        (
            "a 61 KiB request head (the default limit is 60 KiB)",
            with_routing(format!("GET http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), format!("X-Big: {}\r\n\r\n", "a".repeat(61 * 1024))),
            431,
            Some("request_headers_too_large"),
        ),
        (
            "conflicting Content-Length",
            with_routing(format!("POST http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "Content-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello".into()),
            400,
            None,
        ),
        (
            "NUL in a header value",
            with_routing(format!("GET http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "X-Bad: a\0b\r\nConnection: close\r\n\r\n".into()),
            400,
            None,
        ),
        (
            "bare CR in a header value",
            with_routing(format!("GET http://api.saas.test:{port}/ HTTP/1.1\r\nHost: api.saas.test:{port}"), "X-Bad: a\rInjected: b\r\nConnection: close\r\n\r\n".into()),
            400,
            None,
        ),
        (
            "CONNECT",
            with_routing("CONNECT api.saas.test:443 HTTP/1.1\r\nHost: api.saas.test:443".to_string(), "\r\n".into()),
            405,
            Some("connect_not_supported"),
        ),
    ];

    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{}", gw.addr)).unwrap())
        .build()
        .unwrap();
    for (name, send, status, code) in cases {
        let (got_status, got_header, body, request_id, proxy_auth) = match send {
            Send::Get {
                url,
                connector,
                workspace,
                auth,
            } => {
                let mut rb = client.get(&url);
                if let Some(c) = connector {
                    rb = rb.header("X-Connector", c);
                }
                if let Some(w) = workspace {
                    rb = rb.header("X-Workspace", w);
                }
                if let Some((n, t)) = auth {
                    rb = rb.header("Proxy-Authorization", basic(n, t));
                }
                let resp = rb.send().await.unwrap_or_else(|e| panic!("{name}: {e}"));
                let h = resp.headers().clone();
                (
                    resp.status().as_u16(),
                    h.get("x-sluice-error")
                        .map(|v| v.to_str().unwrap().to_string()),
                    resp.text().await.unwrap(),
                    h.get("x-request-id")
                        .map(|v| v.to_str().unwrap().to_string()),
                    h.get_all("proxy-authenticate").iter().count(),
                )
            }
            Send::Raw(text) => {
                let resp = raw(&gw, text.as_bytes()).await;
                let pa = resp
                    .head
                    .lines()
                    .filter(|l| l.to_ascii_lowercase().starts_with("proxy-authenticate:"))
                    .count();
                (
                    resp.status,
                    resp.header("x-sluice-error"),
                    resp.body.clone(),
                    resp.header("x-request-id"),
                    pa,
                )
            }
        };
        assert_eq!(got_status, status, "{name}: body {body}");
        if let Some(code) = code {
            assert_eq!(got_header.as_deref(), Some(code), "{name}: error header");
            let v: serde_json::Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{name}: {e}: {body}"));
            assert_eq!(v["error"]["code"], code, "{name}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{name}"
            );
            assert_eq!(
                v["error"]["request_id"].as_str(),
                request_id.as_deref(),
                "{name}: request id"
            );
            assert!(
                !body.contains(APP_TOKEN) && !body.contains("canary"),
                "{name}: secret in body"
            );
        }
        if status == 407 {
            assert_eq!(
                proxy_auth, 2,
                "{name}: Proxy-Authenticate offers Bearer and Basic"
            );
        }
        assert_eq!(
            env.upstream.connections(),
            0,
            "{name}: the upstream saw a connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_name_mismatch_and_unknown_ca_are_502() {
    let env = Env::new().await;
    // A second upstream whose certificate comes from a CA sluice does not trust.
    let rogue_ca = TestCa::new("rogue CA");
    let rogue = Upstream::start(&rogue_ca, &["untrusted.saas.test"]).await;
    let gw = env
        .start_with(
            "",
            &format!(
                r#"
[[connector]]
connector_id = "rogue"
display_name = "Rogue"
auth_type = "none"
allowed_domains = ["untrusted.saas.test"]
allowed_ports = [{}]
"#,
                rogue.port()
            ),
        )
        .await;
    let client = client(&gw, Some(("ops", OPS_TOKEN)));

    // The upstream's certificate names api/other.saas.test, not wrongname.saas.test.
    let resp = routed(
        client.get(env.url("wrongname.saas.test", "/")),
        "saas",
        "ws_42",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-sluice-error"], "upstream_tls_failed");
    assert!(
        env.upstream.requests().is_empty(),
        "no request after a failed handshake"
    );

    let resp = routed(
        client.get(format!("http://untrusted.saas.test:{}/", rogue.port())),
        "rogue",
        "ws_7",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-sluice-error"], "upstream_tls_failed");
    assert!(rogue.requests().is_empty());
    assert!(
        rogue.connections() >= 1,
        "the handshake was attempted against the vetted address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_502() {
    let env = Env::new().await;
    // A port nothing listens on: bind, note it, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = env
        .start_with(
            "",
            &format!(
                r#"
[[connector]]
connector_id = "closed"
display_name = "Closed"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{closed}]
"#
            ),
        )
        .await;
    let client = client(&gw, Some(("ops", OPS_TOKEN)));
    let resp = routed(
        client.get(format!("http://api.saas.test:{closed}/")),
        "closed",
        "ws_7",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-sluice-error"], "upstream_connect_failed");
}

/// An upstream that accepts TCP and never answers the ClientHello: the handshake deadline
/// (`upstream.tls_handshake_timeout_ms`) fires, and the README's table calls that
/// `upstream_tls_failed`, not a connect failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_upstream_tls_failed() {
    let env = Env::new().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            open.push(sock);
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let text = env
        .config(
            port,
            "",
            &format!(
                r#"
[[connector]]
connector_id = "stalled"
display_name = "Stalled"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{stalled}]
"#
            ),
        )
        .replace(
            "connect_timeout_ms = 2000",
            "connect_timeout_ms = 400\ntls_handshake_timeout_ms = 300",
        );
    let gw = env.serve_text(listener, "stalled.toml", &text).await;
    let client = client(&gw, Some(("ops", OPS_TOKEN)));
    let resp = routed(
        client.get(format!("http://api.saas.test:{stalled}/")),
        "stalled",
        "ws_7",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-sluice-error"], "upstream_tls_failed");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_tls_failed", "{body}");
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_scope_all_and_dev_mode() {
    let env = Env::new().await;
    let gw = env.start().await;
    let ops = client(&gw, Some(("ops", OPS_TOKEN)));
    let resp = routed(ops.get(env.url("api.saas.test", "/")), "saas", "ws_other")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "workspaces = [\"*\"] reaches every workspace"
    );

    let dev = env.start_with("dev_mode_unauthenticated = true", "").await;
    let anon = client(&dev, None);
    let resp = routed(anon.get(env.url("api.saas.test", "/")), "saas", "ws_other")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "dev mode admits requests without credentials"
    );
    let wrong = client(&dev, Some(("app", "wrong")));
    let resp = routed(wrong.get(env.url("api.saas.test", "/")), "saas", "ws_42")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        407,
        "presented credentials are still checked in dev mode"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nameserver_is_a_dns_timeout_not_a_fallback() {
    // A real UDP socket that receives queries and never answers: hickory, not the static map,
    // handles this name, and sluice must refuse rather than try anything else.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ns = silent.local_addr().unwrap();
    let queries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = queries.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while silent.recv_from(&mut buf).await.is_ok() {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let env = Env::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = env
        .config(listener.local_addr().unwrap().port(), "", "")
        .replace(
            "[dns]\nstatic_only = true",
            &format!("[dns]\nstatic_only = false\nnameservers = [\"{ns}\"]\ntimeout_ms = 300\nattempts = 1"),
        );
    let path = env.dir.path().join("dns.toml");
    std::fs::write(&path, config).unwrap();
    let snapshot = sluice::config::Snapshot::load(&path).unwrap();
    let gw = sluice::server::serve(listener, snapshot).await.unwrap();

    let client = client(&gw, Some(("ops", OPS_TOKEN)));
    let resp = routed(
        client.get(env.url("unmapped.saas.test", "/")),
        "saas",
        "ws_7",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-sluice-error"], "dns_timeout");
    assert!(
        queries.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the query went to the configured nameserver"
    );
    assert_eq!(env.upstream.connections(), 0);

    // Names in the static map are still answered from it, without a query.
    let resp = routed(client.get(env.url("api.saas.test", "/")), "saas", "ws_7")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_bodies_are_streamed_through() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    let req = format!(
        "PUT http://api.saas.test:{port}/upload HTTP/1.1\r\nHost: api.saas.test:{port}\r\nX-Connector: saas\r\nX-Workspace: ws_42\r\nProxy-Authorization: Bearer {APP_TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    );
    let resp = raw(&gw, req.as_bytes()).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let r = &env.upstream.requests()[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.body, b"hello world");
}
