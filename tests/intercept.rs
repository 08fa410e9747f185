//! TLS interception: apps that insist on https:// URLs, unmodified, through `HTTPS_PROXY` and
//! sluice's CA. Real clients (curl, Python requests and httpx, Node's undici) against the
//! real TLS upstream; the upstream must see the injected credential and no internal header.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::*;

/// A caller scoped to ws_7 alone, so routing needs no header at all.
const SOLO_TOKEN: &str = "slc_test-solo-token-0011223344";

struct Intercepting {
    env: Env,
    gw: sluice::server::Running,
    ca: PathBuf,
}

/// sluice with a CA made by `sluice ca init` (the library call behind it) and `[interception]`.
async fn intercepting() -> Intercepting {
    intercepting_with("").await
}

/// [`intercepting`] with `more` appended to the config.
async fn intercepting_with(more: &str) -> Intercepting {
    let env = Env::new().await;
    let (ca, key) = (
        env.dir.path().join("sluice-ca.pem"),
        env.dir.path().join("sluice-ca.key"),
    );
    sluice::intercept::init_ca(&ca, &key).unwrap();
    let extra = format!(
        "[interception]\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\n\n[[caller]]\nname = \"solo\"\ntoken_sha256 = \"{}\"\nworkspaces = [\"ws_7\"]\n",
        ca.display(),
        key.display(),
        sha256_hex(SOLO_TOKEN)
    ) + more;
    // `saas` narrowed to the names these tests send it, so other.saas.test belongs to
    // `narrow` alone: a client with no routing header at all gets it inferred, with ws_7's
    // credential injected.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let text = env
        .config(listener.local_addr().unwrap().port(), "", &extra)
        .replace(
            "allowed_domains = [\"*.saas.test\"]",
            "allowed_domains = [\"api.saas.test\", \"private.saas.test\", \"wrongname.saas.test\"]",
        );
    let path = env.dir.path().join("intercept.toml");
    std::fs::write(&path, text).unwrap();
    let snapshot = sluice::config::Snapshot::load(&path).unwrap();
    let gw = sluice::server::serve(listener, snapshot).await.unwrap();
    put_credential(&gw, "ws_7", "narrow", true, &[("api_key", "key-of-ws-7")]).await;
    Intercepting { env, gw, ca }
}

impl Intercepting {
    /// `https://<host>:<upstream port><path>`.
    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.env.upstream.port())
    }

    fn proxy(&self, user: &str, token: &str) -> String {
        format!("http://{user}:{token}@{}", self.gw.addr)
    }

    /// The last request the upstream saw: the path, and that it carried ws_7's key and no
    /// internal header.
    fn upstream_saw(&self, target: &str) {
        let r = self
            .env
            .upstream
            .requests()
            .into_iter()
            .rfind(|r| r.target == target)
            .unwrap_or_else(|| panic!("the upstream never saw {target}"));
        assert_eq!(
            r.header("x-api-key"),
            Some("key-of-ws-7"),
            "{target}: injected"
        );
        for internal in [
            "x-connector",
            "x-workspace",
            "proxy-authorization",
            "x-sluice-error",
        ] {
            assert!(
                !r.has_header(internal),
                "{target}: {internal} reached the upstream"
            );
        }
    }
}

async fn run(program: &str, args: &[&str], env: &[(&str, String)]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_through_an_intercepted_tunnel() {
    let t = intercepting().await;
    let ca = t.ca.display().to_string();
    // Connector named on the CONNECT; workspace from the proxy URL's user name.
    let proxy = t.proxy("ws_7", APP_TOKEN);
    let curl = |more: Vec<String>| {
        let mut args: Vec<String> = ["-sS", "--cacert", &ca, "-x", &proxy]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend([
            "--proxy-header".to_string(),
            "X-Connector: narrow".to_string(),
        ]);
        args.extend(more);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run("curl", &args, &[]).await
        }
    };
    let (ok, out, err) = curl(vec![
        "-w".into(),
        "\n%{http_code}".into(),
        t.url("other.saas.test", "/curl?page=2"),
    ])
    .await;
    assert!(ok && out.ends_with("\n200"), "{out} {err}");
    t.upstream_saw("/curl?page=2");
    // Keep-alive: two URLs, one tunnel, one CONNECT.
    let (ok, out, err) = curl(vec![
        "-w".into(),
        "%{http_code}\n".into(),
        "-o".into(),
        "/dev/null".into(),
        t.url("other.saas.test", "/k1"),
        "-o".into(),
        "/dev/null".into(),
        t.url("other.saas.test", "/k2"),
    ])
    .await;
    assert!(ok && out == "200\n200\n", "{out} {err}");
    t.upstream_saw("/k2");
    assert_eq!(
        metric(
            &t.gw,
            "sluice_requests_total{class=\"forwarded\",connector=\"narrow\",outcome=\"ok\",status=\"2xx\"}"
        )
        .await,
        5,
        "two CONNECTs and three requests inside"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_and_httpx_with_only_environment_variables() {
    let t = intercepting().await;
    // No code change: HTTPS_PROXY and the CA bundle variables. The solo caller names the
    // workspace (its only one) and other.saas.test the connector (only `narrow` allows it).
    let script = r#"
import os, sys
url = sys.argv[1]
import requests
r = requests.get(url + "/py-requests")
print(r.status_code, r.headers.get("x-request-id") is not None)
import httpx
with httpx.Client() as c:
    r = c.get(url + "/py-httpx")
    print(r.status_code)
"#;
    let proxy = t.proxy("solo", SOLO_TOKEN);
    let ca = t.ca.display().to_string();
    let (ok, out, err) = run(
        "python3",
        &[
            "-c",
            script,
            &format!("https://other.saas.test:{}", t.env.upstream.port()),
        ],
        &[
            ("HTTPS_PROXY", proxy.clone()),
            ("https_proxy", proxy),
            ("REQUESTS_CA_BUNDLE", ca.clone()),
            ("SSL_CERT_FILE", ca),
            ("NO_PROXY", String::new()),
        ],
    )
    .await;
    assert!(ok, "{out} {err}");
    assert_eq!(out, "200 True\n200\n", "{err}");
    t.upstream_saw("/py-requests");
    t.upstream_saw("/py-httpx");
    for r in t.env.upstream.requests() {
        assert_eq!(
            r.sni.as_deref(),
            Some("other.saas.test"),
            "sluice's own verified TLS upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interception_refusals() {
    // An upstream whose certificate comes from a CA sluice does not trust.
    let rogue = Upstream::start(&TestCa::new("rogue CA"), &["untrusted.saas.test"]).await;
    let t = intercepting_with(&format!(
        "\n[[connector]]\nconnector_id = \"rogue\"\ndisplay_name = \"Rogue\"\nauth_type = \"none\"\nallowed_domains = [\"untrusted.saas.test\"]\nallowed_ports = [{}]\n",
        rogue.port()
    ))
    .await;
    let ca = t.ca.display().to_string();
    let curl = |url: String, proxy: String, extra: Vec<&'static str>| {
        let ca = ca.clone();
        async move {
            let mut args: Vec<String> = vec![
                "-sS".into(),
                "--cacert".into(),
                ca,
                "-x".into(),
                proxy,
                "-w".into(),
                "\n%{http_code}".into(),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            args.push(url);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run("curl", &args, &[]).await
        }
    };
    // No caller token: 407 on the CONNECT, curl gives up before TLS.
    let (ok, _, err) = curl(
        t.url("api.saas.test", "/x"),
        format!("http://{}", t.gw.addr),
        vec![],
    )
    .await;
    assert!(!ok && err.contains("407"), "{err}");
    // A host no connector allows, and one that resolves to a private address.
    let (ok, _, err) = curl(
        t.url("evil.example.com", "/x"),
        t.proxy("solo", SOLO_TOKEN),
        vec![],
    )
    .await;
    assert!(!ok && err.contains("403"), "{err}");
    let (ok, _, err) = curl(
        t.url("private.saas.test", "/x"),
        t.proxy("solo", SOLO_TOKEN),
        vec!["--proxy-header", "X-Connector: saas"],
    )
    .await;
    assert!(!ok && err.contains("403"), "{err}");
    assert_eq!(
        t.env.upstream.connections(),
        0,
        "refused tunnels open nothing upstream"
    );
    // The upstream's certificate is not for the name (wrongname.saas.test): sluice's own TLS
    // to the upstream fails, inside the intercepted tunnel, with sluice's JSON error.
    let (ok, out, err) = curl(
        t.url("wrongname.saas.test", "/x"),
        t.proxy("solo", SOLO_TOKEN),
        vec!["--proxy-header", "X-Connector: saas"],
    )
    .await;
    assert!(
        ok && out.ends_with("\n502") && out.contains("upstream_tls_failed"),
        "{out} {err}"
    );
    // Unknown CA on the upstream: the client's tunnel works, sluice's own TLS upstream is
    // refused (its certificate verification is not relaxed by interception).
    let (ok, out, err) = curl(
        format!("https://untrusted.saas.test:{}/x", rogue.port()),
        t.proxy("solo", SOLO_TOKEN),
        vec![],
    )
    .await;
    assert!(
        ok && out.ends_with("\n502") && out.contains("upstream_tls_failed"),
        "{out} {err}"
    );
    assert!(rogue.requests().is_empty() && rogue.connections() >= 1);
    // SNI, CONNECT authority and Host must agree: a raw client that asks for another name.
    let script = r#"
import socket, ssl, sys
gw_host, gw_port, authority, sni, ca, auth = sys.argv[1:7]
s = socket.create_connection((gw_host, int(gw_port)))
s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {auth}\r\nX-Connector: saas\r\n\r\n".encode())
head = b""
while b"\r\n\r\n" not in head:
    head += s.recv(1)
assert head.startswith(b"HTTP/1.1 200"), head
ctx = ssl.create_default_context(cafile=ca)
tls = ctx.wrap_socket(s, server_hostname=sni)
tls.sendall(f"GET /fronted HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode())
data = b""
while True:
    chunk = tls.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.split(b"\r\n")[0].decode(), "tunnel_host_mismatch" in data.decode())
"#;
    let port = t.env.upstream.port();
    let gw = t.gw.addr;
    let (ok, out, err) = run(
        "python3",
        &[
            "-c",
            script,
            &gw.ip().to_string(),
            &gw.port().to_string(),
            &format!("api.saas.test:{port}"),
            "wrongname.saas.test",
            &ca,
            &basic("solo", SOLO_TOKEN),
        ],
        &[],
    )
    .await;
    assert!(ok, "{out} {err}");
    assert_eq!(out.trim(), "HTTP/1.1 403 Forbidden True", "{err}");
    assert!(
        t.env
            .upstream
            .requests()
            .iter()
            .all(|r| r.target != "/fronted"),
        "a fronted request never leaves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_certificate_is_served_on_the_admin_listener() {
    let t = intercepting().await;
    let pem = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}/ca.pem", t.gw.admin_addr.unwrap()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(pem, std::fs::read_to_string(&t.ca).unwrap());
    assert!(!pem.contains("PRIVATE KEY"));
}

/// Where tests/run.sh installs undici (npm), outside the source tree.
fn node_modules() -> String {
    format!(
        "{}/target/test-node/node_modules",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// undici's `ProxyAgent` with its defaults: it tunnels `https://` *and* `http://` URLs
/// (CONNECT for both), trusting the CA through `NODE_EXTRA_CA_CERTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_undici_proxy_agent_with_its_defaults() {
    let t = intercepting().await;
    let script = r#"
const { ProxyAgent, request } = require('undici');
(async () => {
  const dispatcher = new ProxyAgent(process.env.HTTPS_PROXY);
  for (const url of process.argv.slice(1)) {
    const { statusCode, body } = await request(url, { dispatcher });
    await body.text();
    console.log(statusCode);
  }
  await dispatcher.close();
})().catch((e) => { console.error(e); process.exit(1); });
"#;
    let port = t.env.upstream.port();
    let (ok, out, err) = run(
        "node",
        &[
            "-e",
            script,
            &format!("https://other.saas.test:{port}/node-https"),
            &format!("http://other.saas.test:{port}/node-http"),
        ],
        &[
            ("NODE_PATH", node_modules()),
            ("HTTPS_PROXY", t.proxy("solo", SOLO_TOKEN)),
            ("NODE_EXTRA_CA_CERTS", t.ca.display().to_string()),
        ],
    )
    .await;
    assert!(ok, "{out} {err}");
    assert_eq!(out, "200\n200\n", "{err}");
    t.upstream_saw("/node-https");
    t.upstream_saw("/node-http");
}

/// Go's net/http: `HTTPS_PROXY` and `SSL_CERT_FILE`, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_net_http_with_https_proxy() {
    let t = intercepting().await;
    let program = t.env.dir.path().join("client.go");
    std::fs::write(
        &program,
        r#"package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
)

func main() {
	resp, err := http.Get(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	fmt.Println(resp.StatusCode)
}
"#,
    )
    .unwrap();
    let cache = t.env.dir.path().join("go-cache");
    let (ok, out, err) = run(
        "go",
        &[
            "run",
            &program.display().to_string(),
            &format!("https://other.saas.test:{}/go", t.env.upstream.port()),
        ],
        &[
            ("HTTPS_PROXY", t.proxy("solo", SOLO_TOKEN)),
            ("SSL_CERT_FILE", t.ca.display().to_string()),
            ("GOCACHE", cache.display().to_string()),
            ("GOFLAGS", "-mod=mod".to_string()),
            ("GO111MODULE", "off".to_string()),
        ],
    )
    .await;
    assert!(ok, "{out} {err}");
    assert_eq!(out, "200\n", "{err}");
    t.upstream_saw("/go");
}
