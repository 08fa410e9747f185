//! CONNECT tunnels with plain HTTP inside (what undici's ProxyAgent and `curl --proxytunnel`
//! do for http:// URLs): the CONNECT is authenticated and policy-checked before its 200, and
//! every request inside runs the whole request path bound to the tunnel.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A caller scoped to exactly one workspace, so a CONNECT needs no X-Workspace.
const SOLO_TOKEN: &str = "slc_test-solo-token-0011223344";

fn solo_caller() -> String {
    format!(
        "[[caller]]\nname = \"solo\"\ntoken_sha256 = \"{}\"\nworkspaces = [\"ws_7\"]\n",
        sha256_hex(SOLO_TOKEN)
    )
}

/// Open a tunnel: send `connect` (a whole CONNECT head) and read sluice's answer to it.
async fn open(gw: &sluice::server::Running, connect: &str) -> (TcpStream, Parsed) {
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(connect.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let n = tcp.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let parsed = responses(&buf);
            if let Some(first) = parsed.first() {
                let length = first
                    .header("content-length")
                    .and_then(|l| l.parse::<usize>().ok())
                    .unwrap_or(0);
                if first.body.len() >= length {
                    break;
                }
            }
        }
    })
    .await;
    assert!(answered.is_ok(), "no answer to the CONNECT");
    let mut parsed = responses(&buf);
    assert_eq!(parsed.len(), 1, "{parsed:?}");
    (tcp, parsed.remove(0))
}

/// Requests inside an open tunnel, the last with `Connection: close`; every response.
async fn inside(mut tcp: TcpStream, requests: &str) -> Vec<Parsed> {
    tcp.write_all(requests.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the tunnel neither answered nor closed");
    responses(&buf)
}

fn connect(authority: &str, headers: &str) -> String {
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{headers}\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_inside_a_tunnel_runs_the_whole_request_path() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    put_credential(&gw, "ws_7", "narrow", true, &[("api_key", "key-of-ws-7")]).await;
    let authority = format!("other.saas.test:{port}");
    let (tcp, answer) = open(
        &gw,
        &connect(
            &authority,
            &format!(
                "Proxy-Authorization: {}\r\nX-Connector: narrow\r\nX-Workspace: ws_7\r\n",
                basic("app", APP_TOKEN)
            ),
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        env.upstream.connections(),
        0,
        "a CONNECT alone opens nothing upstream"
    );
    // Two keep-alive requests inside, origin-form, no routing or proxy headers (as undici).
    let got = inside(
        tcp,
        &format!(
            "GET /t1?x=1 HTTP/1.1\r\nHost: {authority}\r\n\r\nPOST /t2 HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
        ),
    )
    .await;
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200], "{got:?}");
    let seen = env.upstream.requests();
    assert_eq!(seen.len(), 2);
    for (r, target) in seen.iter().zip(["/t1?x=1", "/t2"]) {
        assert_eq!(r.target, target);
        assert_eq!(r.header("x-api-key"), Some("key-of-ws-7"), "injected");
        assert_eq!(r.sni.as_deref(), Some("other.saas.test"));
        for internal in ["x-connector", "x-workspace", "proxy-authorization"] {
            assert!(!r.has_header(internal), "{internal} reached the upstream");
        }
    }
    assert_eq!(seen[1].body, b"hi");
    assert_eq!(
        metric(
            &gw,
            "sluice_requests_total{class=\"forwarded\",connector=\"narrow\",outcome=\"ok\",status=\"2xx\"}"
        )
        .await,
        3,
        "the CONNECT and both requests inside"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_proxytunnel_with_the_connector_inferred_and_the_callers_only_workspace() {
    let env = Env::new().await;
    let gw = env.start_with("", &solo_caller()).await;
    let port = env.upstream.port();
    // api.saas.test: only `saas` (enabled) allows it, and solo may act for ws_7 alone.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--proxytunnel", "-o", "-", "-w", "\n%{http_code}"])
        .arg("-x")
        .arg(format!("http://solo:{SOLO_TOKEN}@{}", gw.addr))
        .arg(format!("http://api.saas.test:{port}/curl"))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n200"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = env.upstream.requests().pop().unwrap();
    assert_eq!(r.target, "/curl");
    assert!(!r.has_header("proxy-authorization"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_get_the_json_error_and_open_nothing_upstream() {
    let env = Env::new().await;
    let gw = env.start_with("", &solo_caller()).await;
    let port = env.upstream.port();
    let app = format!("Proxy-Authorization: {}\r\n", basic("app", APP_TOKEN));
    let routed = format!("{app}X-Connector: saas\r\nX-Workspace: ws_42\r\n");
    // ws_7's org has no allowlist: its refusals come from DNS and the address policy.
    let open_org = format!("{app}X-Connector: saas\r\nX-Workspace: ws_7\r\n");
    let cases = [
        (
            "no caller token",
            connect(&format!("api.saas.test:{port}"), ""),
            407,
            Some("proxy_auth_required"),
        ),
        (
            "wrong caller token",
            connect(
                &format!("api.saas.test:{port}"),
                &format!("Proxy-Authorization: {}\r\n", basic("app", "nope")),
            ),
            407,
            Some("proxy_auth_required"),
        ),
        (
            "host no connector allows",
            connect(&format!("evil.example.com:{port}"), &app),
            403,
            Some("domain_not_allowed"),
        ),
        (
            "host two connectors allow",
            connect(
                &format!("other.saas.test:{port}"),
                &format!("{app}X-Workspace: ws_7\r\n"),
            ),
            403,
            Some("connector_ambiguous"),
        ),
        (
            "private address",
            connect(&format!("private.saas.test:{port}"), &open_org),
            403,
            Some("address_not_allowed"),
        ),
        (
            "cloud metadata",
            connect(&format!("metadata.saas.test:{port}"), &open_org),
            403,
            Some("address_not_allowed"),
        ),
        (
            "port not allowed",
            connect("api.saas.test:8443", &routed),
            403,
            Some("port_not_allowed"),
        ),
        (
            "org allowlist",
            connect(&format!("other.saas.test:{port}"), &routed),
            403,
            Some("org_domain_not_allowed"),
        ),
        (
            "workspace not permitted",
            connect(
                &format!("api.saas.test:{port}"),
                &format!("{app}X-Connector: saas\r\nX-Workspace: ws_other\r\n"),
            ),
            403,
            Some("workspace_not_permitted"),
        ),
        (
            "no workspace, caller has two",
            connect(
                &format!("api.saas.test:{port}"),
                &format!("{app}X-Connector: saas\r\n"),
            ),
            400,
            Some("missing_workspace"),
        ),
        (
            "Host disagrees with the CONNECT",
            format!(
                "CONNECT api.saas.test:{port} HTTP/1.1\r\nHost: other.saas.test:{port}\r\n{routed}\r\n"
            ),
            400,
            // pingora's parser refuses this itself (a bare 400).
            None,
        ),
        (
            "IP literal",
            connect(&format!("127.0.0.1:{port}"), &routed),
            403,
            Some("domain_not_allowed"),
        ),
        (
            "TLS inside (port 443)",
            connect("api.saas.test:443", &routed),
            405,
            Some("connect_not_supported"),
        ),
    ];
    for (name, request, status, code) in cases {
        let (_, answer) = open(&gw, &request).await;
        assert_eq!(answer.status, status, "{name}: {answer:?}");
        assert_eq!(answer.header("x-sluice-error"), code, "{name}");
        assert_eq!(answer.code().as_deref(), code, "{name}: {}", answer.body);
        if status == 407 {
            assert!(answer.header("proxy-authenticate").is_some(), "{name}");
        }
        assert_eq!(
            env.upstream.connections(),
            0,
            "{name}: the upstream saw a connection"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_inside_a_tunnel_cannot_leave_it() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    let routed = format!(
        "Proxy-Authorization: {}\r\nX-Connector: saas\r\nX-Workspace: ws_42\r\n",
        basic("app", APP_TOKEN)
    );
    let authority = format!("api.saas.test:{port}");
    let cases = [
        // Domain fronting: another host (allowed by the same connector) inside the tunnel.
        (
            format!(
                "GET /f HTTP/1.1\r\nHost: wrongname.saas.test:{port}\r\nConnection: close\r\n\r\n"
            ),
            403,
            "tunnel_host_mismatch",
        ),
        (
            format!(
                "GET http://other.saas.test:{port}/f HTTP/1.1\r\nHost: other.saas.test:{port}\r\nConnection: close\r\n\r\n"
            ),
            403,
            "tunnel_host_mismatch",
        ),
        (
            "GET /f HTTP/1.1\r\nHost: api.saas.test:1\r\nConnection: close\r\n\r\n".to_string(),
            403,
            "tunnel_host_mismatch",
        ),
        (
            format!(
                "GET /f HTTP/1.1\r\nHost: {authority}\r\nX-Workspace: ws_7\r\nConnection: close\r\n\r\n"
            ),
            400,
            "invalid_routing_header",
        ),
        (
            format!(
                "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            ),
            405,
            "connect_not_supported",
        ),
    ];
    for (request, status, code) in cases {
        let (tcp, answer) = open(&gw, &connect(&authority, &routed)).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        let got = inside(tcp, &request).await;
        assert_eq!(got.len(), 1, "{request:?}: {got:?}");
        assert_eq!(got[0].status, status, "{request:?}: {got:?}");
        assert_eq!(got[0].code().as_deref(), Some(code), "{request:?}");
    }
    assert_eq!(env.upstream.connections(), 0, "nothing left the tunnel");
}
