//! Retries end to end against a scripted upstream. Backoff arithmetic is tested exactly in
//! `src/ratelimit/retry.rs`; here the delays are short and only outcomes are asserted.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn connectors(port: u16, closed: u16) -> String {
    format!(
        r#"
[[connector]]
connector_id = "retrying"
display_name = "Retries"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}, {closed}]
[connector.retry]
max_attempts = 3
base_delay_ms = 10
max_delay_ms = 50

[[connector]]
connector_id = "fragile"
display_name = "Opens after two failures"
auth_type = "none"
allowed_domains = ["api.saas.test", "other.saas.test"]
allowed_ports = [{port}]
[connector.retry]
max_attempts = 1
[connector.circuit_breaker]
failure_threshold = 2
open_ms = 60000
"#
    )
}

fn hits(env: &Env, target: &str) -> usize {
    env.upstream
        .requests()
        .iter()
        .filter(|r| r.target == target)
        .count()
}

async fn send(
    gw: &sluice::server::Running,
    method: reqwest::Method,
    url: String,
    idempotency_key: bool,
) -> (u16, Option<String>) {
    let mut rb = client(gw, Some(("ops", OPS_TOKEN)))
        .request(method, url)
        .header("X-Connector", "retrying")
        .header("X-Workspace", "ws_7")
        .body("payload");
    if idempotency_key {
        rb = rb.header("Idempotency-Key", "k-123");
    }
    let r = rb.send().await.unwrap();
    let code = r
        .headers()
        .get("x-sluice-error")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_on_transient_statuses() {
    let env = Env::new().await;
    let gw = env
        .start_with("", &connectors(env.upstream.port(), 1))
        .await;
    use reqwest::Method;
    // Two 503s, then 200: three attempts.
    let (status, _) = send(
        &gw,
        Method::GET,
        env.url("api.saas.test", "/flaky/2/get"),
        false,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(hits(&env, "/flaky/2/get"), 3);
    // PUT replays its body.
    let (status, _) = send(
        &gw,
        Method::PUT,
        env.url("api.saas.test", "/flaky/1/put"),
        false,
    )
    .await;
    assert_eq!(status, 200);
    let puts: Vec<_> = env
        .upstream
        .requests()
        .into_iter()
        .filter(|r| r.target == "/flaky/1/put")
        .collect();
    assert_eq!(puts.len(), 2);
    assert!(puts.iter().all(|r| r.body == b"payload"));
    // Still failing after the attempt limit: the last answer is relayed.
    let (status, code) = send(
        &gw,
        Method::GET,
        env.url("api.saas.test", "/flaky/9/exhaust"),
        false,
    )
    .await;
    assert_eq!((status, code), (503, None));
    assert_eq!(hits(&env, "/flaky/9/exhaust"), 3, "max_attempts = 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_and_client_errors_are_not_retried() {
    let env = Env::new().await;
    let gw = env
        .start_with("", &connectors(env.upstream.port(), 1))
        .await;
    use reqwest::Method;
    let (status, _) = send(
        &gw,
        Method::POST,
        env.url("api.saas.test", "/flaky/1/post"),
        false,
    )
    .await;
    assert_eq!(status, 503, "a POST reached the upstream: never sent twice");
    assert_eq!(hits(&env, "/flaky/1/post"), 1);
    let (status, _) = send(
        &gw,
        Method::POST,
        env.url("api.saas.test", "/flaky/1/keyed"),
        true,
    )
    .await;
    assert_eq!(status, 200, "an Idempotency-Key makes it safe");
    assert_eq!(hits(&env, "/flaky/1/keyed"), 2);
    for code in [400, 404, 409, 500] {
        let path = format!("/status/{code}");
        let (status, _) = send(&gw, Method::GET, env.url("api.saas.test", &path), false).await;
        assert_eq!(status, code);
        assert_eq!(hits(&env, &path), 1, "{code} is not retried");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_then_reported() {
    let env = Env::new().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = env
        .start_with("", &connectors(env.upstream.port(), closed))
        .await;
    let series = r#"sluice_retries_total{connector="retrying",reason="connect"}"#;
    let before = metric(&gw, series).await;
    // Even a POST: nothing reached the upstream.
    let (status, code) = send(
        &gw,
        reqwest::Method::POST,
        format!("http://api.saas.test:{closed}/x"),
        false,
    )
    .await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_connect_failed"))
    );
    assert_eq!(
        metric(&gw, series).await - before,
        2,
        "three attempts: two retries"
    );
}

async fn fragile(
    gw: &sluice::server::Running,
    url: String,
) -> (u16, Option<String>, Option<String>) {
    let r = client(gw, Some(("ops", OPS_TOKEN)))
        .get(url)
        .header("X-Connector", "fragile")
        .header("X-Workspace", "ws_7")
        .send()
        .await
        .unwrap();
    let h = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), h("x-sluice-error"), h("retry-after"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_open_the_circuit_and_client_errors_do_not() {
    let env = Env::new().await;
    let gw = env
        .start_with("", &connectors(env.upstream.port(), 1))
        .await;
    // 4xx are the caller's problem: they never open the breaker (other.saas.test's breaker).
    for _ in 0..4 {
        let (status, code, _) = fragile(&gw, env.url("other.saas.test", "/status/404")).await;
        assert_eq!((status, code), (404, None));
    }
    assert_eq!(hits(&env, "/status/404"), 4);
    // Two 503s in a row from api.saas.test open its breaker.
    for _ in 0..2 {
        let (status, code, _) = fragile(&gw, env.url("api.saas.test", "/status/503")).await;
        assert_eq!((status, code), (503, None), "the upstream's own 503");
    }
    let (status, code, retry) = fragile(&gw, env.url("api.saas.test", "/fast-fail")).await;
    assert_eq!((status, code.as_deref()), (503, Some("circuit_open")));
    assert!((59..=60).contains(&retry.unwrap().parse::<u64>().unwrap()));
    assert_eq!(
        hits(&env, "/fast-fail"),
        0,
        "failed fast, without touching the upstream"
    );
    assert_eq!(
        metric(&gw, r#"sluice_circuits_open{connector="fragile"}"#).await,
        1
    );
    // The breaker is per host: other.saas.test still passes.
    let (status, _, _) = fragile(&gw, env.url("other.saas.test", "/ok")).await;
    assert_eq!(status, 200);
}
