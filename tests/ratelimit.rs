//! Pacing end to end: configured buckets, limits learned from response headers, 429s.
//! Bucket, queue and wait arithmetic are tested exactly (time passed in) in
//! `src/ratelimit`; these tests use limits whose outcomes do not depend on timing.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

fn connectors(port: u16) -> String {
    format!(
        r#"
[[connector]]
connector_id = "tight"
display_name = "Ten, then almost nothing"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
[connector.rate_limit]
capacity = 10
per_second = 0.001
max_wait_ms = 0

[[connector]]
connector_id = "paced"
display_name = "Twenty per second, one at a time"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
[connector.rate_limit]
capacity = 1
per_second = 20
max_wait_ms = 5000
queue_size = 16

[[connector]]
connector_id = "learner"
display_name = "Limits from headers only"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
[connector.rate_limit]
max_wait_ms = 0

[[connector]]
connector_id = "shop"
display_name = "Shopify-style, shared by workspaces"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
[connector.rate_limit]
scope = "application"
used_of_limit_header = "X-Shopify-Shop-Api-Call-Limit"
max_wait_ms = 0
"#
    )
}

async fn call(
    gw: &sluice::server::Running,
    env: &Env,
    path: &str,
    connector: &str,
    workspace: &str,
) -> (u16, Option<String>, Option<String>) {
    let resp = client(gw, Some(("ops", OPS_TOKEN)))
        .get(env.url("api.saas.test", path))
        .header("X-Connector", connector)
        .header("X-Workspace", workspace)
        .send()
        .await
        .unwrap();
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    (
        resp.status().as_u16(),
        h("x-sluice-error"),
        h("retry-after"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_fifty_against_ten_gets_ten_through_and_forty_told_when_to_retry() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(env.upstream.port())).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let c = client(&gw, Some(("ops", OPS_TOKEN)));
        let url = env.url("api.saas.test", "/burst");
        tasks.push(tokio::spawn(async move {
            let r = c
                .get(url)
                .header("X-Connector", "tight")
                .header("X-Workspace", "ws_7")
                .send()
                .await
                .unwrap();
            let code = r
                .headers()
                .get("x-sluice-error")
                .map(|v| v.to_str().unwrap().to_string());
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (r.status().as_u16(), code, retry)
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert_eq!(results.len(), 50, "none lost");
    assert_eq!(results.iter().filter(|r| r.0 == 200).count(), 10);
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(refused.len(), 40);
    assert!(
        refused
            .iter()
            .all(|r| r.1.as_deref() == Some("rate_limited") && r.2.is_some_and(|s| s >= 1))
    );
    assert_eq!(
        env.upstream.requests().len(),
        10,
        "refused requests never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_rate_wait_their_turn_instead_of_failing() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(env.upstream.port())).await;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let c = client(&gw, Some(("ops", OPS_TOKEN)));
        let url = env.url("api.saas.test", "/paced");
        tasks.push(tokio::spawn(async move {
            c.get(url)
                .header("X-Connector", "paced")
                .header("X-Workspace", "ws_7")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            200,
            "queued, then released (waits of at most 250 ms against a 5 s maximum)"
        );
    }
    assert_eq!(env.upstream.requests().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remaining_zero_holds_requests_until_the_reset() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(env.upstream.port())).await;
    // Unlimited until the API speaks.
    for _ in 0..3 {
        assert_eq!(call(&gw, &env, "/free", "learner", "ws_7").await.0, 200);
    }
    assert_eq!(
        call(&gw, &env, "/rl/remaining0", "learner", "ws_7").await.0,
        200
    );
    let (status, code, retry) = call(&gw, &env, "/next", "learner", "ws_7").await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!(
        (3590..=3600).contains(&retry),
        "held until the reset an hour away: {retry}"
    );
    assert!(!env.upstream.requests().iter().any(|r| r.target == "/next"));
    // Per workspace by default: another workspace is not held.
    assert_eq!(call(&gw, &env, "/next", "learner", "ws_other").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_header_form_is_learned_end_to_end() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(env.upstream.port())).await;
    // Each form, in its own workspace's bucket: after it, that workspace is held for an hour.
    for (path, workspace) in [
        ("/rl/ietf", "ws_7"),
        ("/rl/structured", "ws_42"),
        ("/rl/503-date", "ws_other"),
    ] {
        let status = call(&gw, &env, path, "learner", workspace).await.0;
        assert!(status == 200 || status == 503, "{path}: {status}");
        let (status, code, retry) = call(&gw, &env, "/held", "learner", workspace).await;
        assert_eq!(
            (status, code.as_deref()),
            (429, Some("rate_limited")),
            "{path}"
        );
        let retry: u64 = retry.unwrap().parse().unwrap();
        assert!(
            (3590..=3600).contains(&retry),
            "{path}: Retry-After {retry}"
        );
    }
    assert!(!env.upstream.requests().iter().any(|r| r.target == "/held"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_is_relayed_and_holds_the_bucket_for_retry_after() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(env.upstream.port())).await;
    let (status, code, retry) = call(&gw, &env, "/rl/429", "learner", "ws_7").await;
    assert_eq!(
        (status, code, retry.as_deref()),
        (429, None, Some("120")),
        "the upstream's own 429"
    );
    let (status, code, retry) = call(&gw, &env, "/after", "learner", "ws_7").await;
    assert_eq!((status, code.as_deref()), (429, Some("rate_limited")));
    assert!((119..=120).contains(&retry.unwrap().parse::<u64>().unwrap()));
    assert!(!env.upstream.requests().iter().any(|r| r.target == "/after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_of_limit_header_drains_a_bucket_shared_by_every_workspace() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(env.upstream.port())).await;
    assert_eq!(call(&gw, &env, "/rl/shopify", "shop", "ws_7").await.0, 200);
    let (status, code, _) = call(&gw, &env, "/more", "shop", "ws_other").await;
    assert_eq!(
        (status, code.as_deref()),
        (429, Some("rate_limited")),
        "40/40 used: the application's bucket is empty for every workspace"
    );
}

const SHARED: &str = r#"
[[connector]]
connector_id = "budget"
display_name = "One budget for every replica"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [PORT]
[connector.rate_limit]
capacity = 10
per_second = 0.001
max_wait_ms = 0
shared = true
"#;

async fn budget(gw: &sluice::server::Running, env: &Env) -> u16 {
    call(gw, env, "/budget", "budget", "ws_7").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_budget_is_one_bucket_across_replicas() {
    let env = Env::new().await;
    let redis = RedisServer::start().await;
    let extra = SHARED.replace("PORT", &env.upstream.port().to_string());
    let a = env.start_on_redis(&redis.url(), &extra).await;
    let b = env.start_on_redis(&redis.url(), &extra).await;
    let mut ok = 0;
    for i in 0..30 {
        let gw = if i % 2 == 0 { &a } else { &b };
        if budget(gw, &env).await == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "ten in all, not ten per replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_shared_budget_falls_back_to_the_local_bucket_and_says_so() {
    let env = Env::new().await;
    let mut redis = RedisServer::start().await;
    let extra = SHARED.replace("PORT", &env.upstream.port().to_string());
    let gw = env.start_on_redis(&redis.url(), &extra).await;
    redis.stop();
    let series = r#"sluice_rate_limit_fallbacks_total{connector="budget"}"#;
    let before = metric(&gw, series).await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(budget(&gw, &env).await);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "the local bucket still paces: {statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 2);
    assert!(
        metric(&gw, series).await - before >= 12,
        "every decision fell back and was counted"
    );
}
