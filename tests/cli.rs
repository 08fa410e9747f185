//! The `sluice` binary: check-config, explain, and `run` as a real process.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_config_accepts_the_shipped_configs() {
    for file in ["config/sluice.example.toml", "config/compose.toml"] {
        let out = Command::new(SLUICE)
            .args(["check-config", &repo(file)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn check_config_prints_every_error_and_fails() {
    let out = Command::new(SLUICE)
        .args(["check-config", &repo("tests/fixtures/broken.toml")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "listener.dev_mode_unauthenticated",
        "egress.exception_cidrs[0]",
        "egress.exception_cidrs[1]",
        "dns.nameservers[0]",
        "dns.static_hosts.\"10.0.0.1\"",
        "connector[0].connector_id",
        "connector[0].display_name",
        "connector[0].auth_type",
        "connector[0].allowed_domains[0]",
        "connector[0].allowed_domains[1]",
        "connector[0].allowed_domains[2]",
        "connector[0].allowed_domains[3]",
        "connector[0].allowed_domains[4]",
        "connector[0].allowed_domains[5]",
        "connector[0].allowed_domains[6]",
        "connector[dup].actions[0].http_method",
        "connector[dup].actions[0].url_template",
        "connector[dup].actions[1].url_template",
        "connector[dup].connector_id",
        "org[o].allowed_domains",
        "workspace[0].org",
        "caller[0].token_sha256",
        "caller[0].workspaces",
    ] {
        assert!(
            stderr.contains(&format!("broken.toml: {key}: ")),
            "missing error for {key} in:\n{stderr}"
        );
    }
}

#[test]
fn check_config_names_file_and_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "[listener]\naddress = \"127.0.0.1:8080\"\ncolour = \"red\"\n",
    )
    .unwrap();
    let out = Command::new(SLUICE)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("typo.toml"), "{stderr}");
    assert!(stderr.contains("unknown field `colour`"), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_prints_each_check_and_the_verdict_without_sending() {
    let env = Env::new().await;
    let path = env.dir.path().join("explain.toml");
    std::fs::write(&path, env.config(18080, "", "")).unwrap();
    let port = env.upstream.port();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || Command::new(SLUICE).args(args).output().unwrap())
    };
    let base = |connector: &str, workspace: &str, url: String| {
        vec![
            "explain".into(),
            "--config".into(),
            path.display().to_string(),
            "--connector".into(),
            connector.into(),
            "--workspace".into(),
            workspace.into(),
            "--caller".into(),
            "app".into(),
            url,
        ]
    };

    let out = run(base(
        "saas",
        "ws_42",
        format!("http://API.saas.test:{port}/v1/x?secret=1"),
    ))
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for line in [
        "connector allowed_domains  api.saas.test matches *.saas.test",
        "org allowlist              api.saas.test matches api.saas.test",
        "resolve                    api.saas.test → 127.0.0.1",
        "127.0.0.1 is loopback, allowed by operator exception 127.0.0.1/32",
        "app may act for ws_42",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains(&format!("verdict: ALLOW  connect 127.0.0.1:{port}")),
        "{stdout}"
    );

    let out = run(base(
        "saas",
        "ws_42",
        format!("http://other.saas.test:{port}/"),
    ))
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("connector allowed_domains  other.saas.test matches *.saas.test"));
    assert!(
        stdout.contains("verdict: REFUSE 403 org_domain_not_allowed"),
        "{stdout}"
    );

    let out = run(base(
        "saas",
        "ws_7",
        format!("http://private.saas.test:{port}/"),
    ))
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("verdict: REFUSE 403 address_not_allowed"),
        "{stdout}"
    );
    assert!(stdout.contains("10.1.2.3, a private address"), "{stdout}");

    assert_eq!(
        env.upstream.connections(),
        0,
        "explain sends nothing upstream"
    );
}

/// Poll until the port accepts connections (the process is starting; there is no other signal).
fn wait_listening(port: u16, child: &mut std::process::Child) {
    if let Err(status) = try_wait_listening(port, child) {
        panic!("sluice exited early: {status}");
    }
}

/// [`wait_listening`], returning the exit status if sluice exits first.
fn try_wait_listening(
    port: u16,
    child: &mut std::process::Child,
) -> Result<(), std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(status);
        }
        assert!(Instant::now() < deadline, "sluice did not start listening");
        std::thread::yield_now();
    }
    Ok(())
}

/// A free loopback port (free when asked: another process may take it before sluice does).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const CANARY: &str = "CANARY-s3cr3t-9f8e7d";
/// Injected as a query parameter: characters that URL-encoding changes.
const QUERY_CANARY: &str = "QCANARY/s3cr3t+k=v&z";

/// Every form in which a secret could reach a log: raw, base64 (alone and as Basic
/// `name:secret`), URL-encoded.
fn secret_forms(secret: &str) -> Vec<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut forms = vec![
        secret.to_string(),
        b64.encode(secret),
        b64.encode(format!("app:{secret}")),
        percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
        form_urlencoded::byte_serialize(secret.as_bytes()).collect(),
    ];
    forms.sort();
    forms.dedup();
    forms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_and_never_logs_a_secret_info_json() {
    run_with_canaries("info", "json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_never_logs_a_secret_debug_text() {
    run_with_canaries("debug", "text").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_never_logs_a_secret_trace_json() {
    run_with_canaries("trace", "json").await;
}

/// Every module asked for by name, pingora's included: the ceiling still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_never_logs_a_secret_trace_text_every_target() {
    run_with_canaries(
        "trace,pingora_proxy=trace,pingora_core=trace,h2=trace,hyper=trace,rustls=trace",
        "text",
    )
    .await;
}

/// `sluice run` as a process with `SLUICE_LOG=level` and `SLUICE_LOG_FORMAT=format`: canary
/// secrets as stored credentials (header and query injected), OAuth client secret and tokens,
/// caller tokens in `Proxy-Authorization` (good and refused), in malformed requests and broken
/// bodies. None may appear in the log in any form.
async fn run_with_canaries(level: &str, format: &str) {
    let env = Env::new().await;
    let closed = free_port();
    let path = env.dir.path().join("run.toml");
    // OAuth too: a canary client secret, and canary tokens that are always due for refresh.
    {
        let mut m = env.upstream.oauth.lock().unwrap();
        m.token_prefix = format!("{CANARY}-");
        m.expires_in = Some(30);
    }
    let upstream_port = env.upstream.port();
    let extra = format!(
        "[[connector]]\nconnector_id = \"closed\"\ndisplay_name = \"Closed\"\nauth_type = \"none\"\nallowed_domains = [\"api.saas.test\"]\nallowed_ports = [{closed}]\n\
         [[connector]]\nconnector_id = \"q\"\ndisplay_name = \"Query key\"\nauth_type = \"api_key\"\nallowed_domains = [\"api.saas.test\"]\nallowed_ports = [{upstream_port}]\n\
         [connector.auth_schema]\nfields = [{{ name = \"api_key\", label = \"API key\", type = \"password\", required = true }}]\n\
         [connector.inject]\nquery = \"api_key\"\n{}",
        env.oauth_connectors(60_000, &format!("{CANARY}-client-secret"))
    );
    // The ports are free when chosen, but tests run in parallel and their connections take
    // ephemeral ports too: when sluice cannot bind one (the admin listener), it exits, and
    // the start is tried again on new ports.
    let mut attempt = 0;
    let (mut child, log, reader, port, admin_port) = loop {
        attempt += 1;
        let (port, admin_port) = (free_port(), free_port());
        let config = env.config(port, "", &extra).replace(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"127.0.0.1:{admin_port}\""),
        );
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(SLUICE)
            .args(["run", "--config"])
            .arg(&path)
            .env("SLUICE_LOG", level)
            .env("SLUICE_LOG_FORMAT", format)
            // Each line as it is logged, so a secret cannot hide in a batch cut off at kill.
            .env("SLUICE_LOG_FLUSH_MS", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Collect stderr as it is written.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (child, started) = tokio::task::spawn_blocking(move || {
            let started = try_wait_listening(port, &mut child);
            (child, started)
        })
        .await
        .unwrap();
        match started {
            Ok(()) => break (child, log, reader, port, admin_port),
            Err(status) => {
                reader.join().unwrap();
                // A startup that fails for another reason fails the same way three times.
                let text = log.lock().unwrap().clone();
                assert!(attempt < 3, "sluice exited early ({status}):\n{text}");
                eprintln!("sluice exited early ({status}); again on new ports. Its log:\n{text}");
            }
        }
    };

    let proxy = format!("http://127.0.0.1:{port}");
    let good = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(&proxy)
                .unwrap()
                .basic_auth("app", APP_TOKEN),
        )
        .build()
        .unwrap();
    let canary_auth = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(&proxy)
                .unwrap()
                .basic_auth("app", CANARY),
        )
        .build()
        .unwrap();
    let send = |c: &reqwest::Client, url: String, connector: &str, workspace: &str| {
        c.get(url)
            .header("X-Connector", connector.to_string())
            .header("X-Workspace", workspace.to_string())
            .header("X-Custom", CANARY)
            .send()
    };

    let ok = send(
        &good,
        env.url("api.saas.test", &format!("/v1/x?api_key={CANARY}")),
        "saas",
        "ws_42",
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), 200);
    let denied = send(&canary_auth, env.url("api.saas.test", "/"), "saas", "ws_42")
        .await
        .unwrap();
    assert_eq!(denied.status(), 407);
    assert!(!denied.text().await.unwrap().contains(CANARY));
    let failed = send(
        &good,
        format!("http://api.saas.test:{closed}/x?token={CANARY}"),
        "closed",
        "ws_7",
    )
    .await
    .unwrap();
    assert_eq!(failed.status(), 502);
    assert!(!failed.text().await.unwrap().contains(CANARY));
    let refused = send(
        &good,
        env.url("other.saas.test", &format!("/?k={CANARY}")),
        "saas",
        "ws_42",
    )
    .await
    .unwrap();
    assert_eq!(refused.status(), 403);
    assert!(!refused.text().await.unwrap().contains(CANARY));

    // The canary as a stored credential: set through the CLI (stdin), injected upstream.
    let admin = format!("http://127.0.0.1:{admin_port}");
    let set = credentials_set(&admin, "ws_7", "narrow", &format!("api_key={CANARY}\n")).await;
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert!(!String::from_utf8_lossy(&set.stdout).contains(CANARY));
    // A query-injected key: it exists only in the upstream request line, which pingora's
    // debug output prints.
    let set = credentials_set(&admin, "ws_7", "q", &format!("api_key={QUERY_CANARY}\n")).await;
    assert!(set.status.success());
    let queried = send(&good, env.url("api.saas.test", "/q?page=2"), "q", "ws_7")
        .await
        .unwrap();
    assert_eq!(queried.status(), 200);
    let last = env.upstream.requests().last().cloned().unwrap();
    let encoded: String = form_urlencoded::byte_serialize(QUERY_CANARY.as_bytes()).collect();
    assert_eq!(last.target, format!("/q?page=2&api_key={encoded}"));
    // Raw requests with the caller token (and canaries) where pingora's parser or body reader
    // fails: it keeps the raw bytes in its error context.
    let basic_canary = basic("app", CANARY);
    let raw_cases = [
        format!(
            "GET http://api.saas.test:{upstream_port}/ HTTP/1.1\r\nHost: api.saas.test:{upstream_port}\r\nProxy-Authorization: {basic_canary}\r\nX-Custom: {CANARY}\r\nBad Header Line\r\n\r\n"
        ),
        format!(
            "GET http://api.saas.test:{upstream_port}/ HTTP/1.1\r\nHost: api.saas.test:{upstream_port}\r\nProxy-Authorization: Bearer {APP_TOKEN}\r\nX-Custom: {CANARY}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
        ),
        format!(
            "PUT http://api.saas.test:{upstream_port}/upload HTTP/1.1\r\nHost: api.saas.test:{upstream_port}\r\nX-Connector: saas\r\nX-Workspace: ws_42\r\nProxy-Authorization: Bearer {APP_TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{CANARY}\r\nzz{CANARY}\r\n",
            CANARY.len()
        ),
        format!(
            "GET http://api.saas.test:{upstream_port}/?k={CANARY} HTTP/1.1\r\nHost: api.saas.test:{upstream_port}\r\nX-Connector: saas\r\nX-Workspace: ws_42\r\nProxy-Authorization: {basic_canary}\r\n\r\n"
        ),
    ];
    for request in raw_cases {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 4"), "{request:?}: {answer}");
        assert!(!answer.contains(CANARY), "{answer}");
    }
    let injected = send(&good, env.url("other.saas.test", "/k"), "narrow", "ws_7")
        .await
        .unwrap();
    assert_eq!(injected.status(), 200);
    assert!(!injected.text().await.unwrap().contains(CANARY));
    let last = env.upstream.requests().last().cloned().unwrap();
    assert_eq!(
        last.header("x-api-key"),
        Some(CANARY),
        "the upstream got exactly the credential"
    );
    let meta = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{admin}/admin/workspaces/ws_7/credentials/narrow"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(meta.contains("api_key") && !meta.contains(CANARY), "{meta}");

    // OAuth: connect (client credentials), then a request that refreshes first.
    let connected = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{admin}/admin/workspaces/ws_7/oauth/cc/connect"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(connected.status(), 200);
    assert!(!connected.text().await.unwrap().contains(CANARY));
    let oauthed = send(&good, env.url("api.saas.test", "/api/oauth"), "cc", "ws_7")
        .await
        .unwrap();
    assert_eq!(oauthed.status(), 200);
    assert!(!oauthed.text().await.unwrap().contains(CANARY));
    assert_eq!(
        env.upstream.oauth.lock().unwrap().token_calls,
        2,
        "connect, then a refresh"
    );
    let last = env.upstream.requests().last().cloned().unwrap();
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {CANARY}-at-2").as_str())
    );
    // Header values that try to forge log fields: every line must stay one JSON object.
    let forged = good
        .get(env.url("api.saas.test", "/forge-log"))
        .header("X-Connector", "saas\",\"forged\":\"1")
        .header("X-Workspace", "ws_42")
        .header("X-Request-Id", "r\",\"level\":\"ERROR\",\"forged\":\"1")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    let final_request = send(&good, env.url("other.saas.test", "/last"), "narrow", "ws_7")
        .await
        .unwrap();
    assert_eq!(final_request.status(), 200);

    // The audit line of the last request is written after its response: wait for it, then stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    let logged_last =
        |log: &str| log.contains("\"path\":\"/last\"") || log.contains("path=\"/last\"");
    while !logged_last(&log.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "the last request was never logged"
        );
        tokio::task::yield_now().await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    let stderr = log.lock().unwrap().clone();
    assert!(
        stderr.contains("sluice::access"),
        "access lines are logged:\n{stderr}"
    );
    assert!(stderr.contains("/v1/x"), "the path is logged:\n{stderr}");
    assert!(
        stderr.lines().any(|l| l.contains("sluice::audit")
            && l.contains("refused")
            && l.contains("other.saas.test")
            && l.contains("org_domain_not_allowed")),
        "a refused destination is audited with its host:\n{stderr}"
    );
    for secret in [CANARY, QUERY_CANARY, APP_TOKEN] {
        for form in secret_forms(secret) {
            assert!(
                !stderr.contains(&form),
                "SLUICE_LOG={level} {format}: {secret:?} reached the log as {form:?}:\n{stderr}"
            );
        }
    }
    if format == "json" {
        for line in stderr.lines() {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "not one JSON object: {line}"
            );
        }
    }
}

/// `sluice credentials set` with `lines` on stdin.
async fn credentials_set(
    admin: &str,
    workspace: &str,
    connector: &str,
    lines: &str,
) -> std::process::Output {
    let (admin, workspace, connector, lines) = (
        admin.to_string(),
        workspace.to_string(),
        connector.to_string(),
        lines.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut cli = Command::new(SLUICE)
            .args(["credentials", "--admin", &admin, "set", "--workspace"])
            .arg(&workspace)
            .arg("--connector")
            .arg(&connector)
            .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        cli.stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        cli.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_then_exits_zero() {
    sigterm_with_a_request_in_flight("shutdown_grace_ms = 3000\nshutdown_timeout_ms = 1000", 1000)
        .await;
}

/// pingora counts the grace period in whole seconds: 1100 ms must give a 1500 ms request its
/// time (rounded down it would be cut off after 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_in_milliseconds_is_rounded_up_not_down() {
    sigterm_with_a_request_in_flight("shutdown_grace_ms = 1100\nshutdown_timeout_ms = 300", 1500)
        .await;
}

/// Start `sluice run`, send a request taking `delay_ms` at the upstream, SIGTERM while it is
/// there: the request must finish with 200 and sluice must exit 0.
async fn sigterm_with_a_request_in_flight(listener_extra: &str, delay_ms: u64) {
    let env = Env::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = env.dir.path().join("term.toml");
    let config = env.config(port, listener_extra, "");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(SLUICE)
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = tokio::task::spawn_blocking(move || {
        wait_listening(port, &mut child);
        child
    })
    .await
    .unwrap();

    let c = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .basic_auth("app", APP_TOKEN),
        )
        .build()
        .unwrap();
    let target = format!("/delay/{delay_ms}");
    let url = env.url("api.saas.test", &target);
    let in_flight = tokio::spawn(async move {
        c.get(url)
            .header("X-Connector", "saas")
            .header("X-Workspace", "ws_42")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    // Wait until the request is at the upstream, then ask sluice to stop.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.upstream.requests().iter().any(|r| r.target == target) {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::task::yield_now().await;
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the request in flight finished"
    );
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "exit status {status}");
}
