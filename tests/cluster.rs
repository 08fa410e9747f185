//! sluice on a real 3-master Redis Cluster (spawned by the harness): credential writes through
//! one replica reported as they happened and seen by another within a second, one OAuth
//! refresh for 200 concurrent requests on two replicas, a shared budget held across replicas,
//! and a master restarted under load.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::json;

/// One cluster test at a time: each runs three redis-servers and two gateways on a 2-core
/// machine, and a cluster starved of CPU answers late (a shared budget then falls back to
/// local buckets by design, which is not what these tests measure).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Twelve workspaces whose records land on every master (their hash tags are spread over the
/// three slot ranges; the test checks it).
fn workspaces() -> Vec<String> {
    (0..12).map(|i| format!("ws_c{i}")).collect()
}

fn workspace_config() -> String {
    workspaces()
        .iter()
        .map(|w| format!("[[workspace]]\nworkspace_id = \"{w}\"\norg = \"open\"\n"))
        .collect()
}

/// A proxied request for `workspace` on `narrow` (api_key in X-API-Key): (status, error code,
/// the key the upstream saw).
async fn call(
    gw: &sluice::server::Running,
    env: &Env,
    workspace: &str,
) -> (u16, Option<String>, Option<String>) {
    let path = format!("/c/{workspace}/{}", rand_suffix());
    let resp = client(gw, Some(("ops", OPS_TOKEN)))
        .get(env.url("other.saas.test", &path))
        .header("x-connector", "narrow")
        .header("x-workspace", workspace)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let code = error_code(&resp);
    let seen = env
        .upstream
        .requests()
        .into_iter()
        .find(|r| r.target == path)
        .and_then(|r| r.header("x-api-key").map(str::to_string));
    (status, code, seen)
}

fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// 200 requests at once for ws_7 on `connector`, alternating between two replicas: their
/// statuses.
async fn burst(
    a: &sluice::server::Running,
    b: &sluice::server::Running,
    url: String,
    connector: &'static str,
) -> Vec<u16> {
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = client(if i % 2 == 0 { a } else { b }, Some(("ops", OPS_TOKEN)));
            let url = url.clone();
            tokio::spawn(async move {
                let resp = c
                    .get(url)
                    .header("x-connector", connector)
                    .header("x-workspace", "ws_7")
                    .send()
                    .await
                    .unwrap();
                resp.status().as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

async fn put(admin: &Admin, workspace: &str, key: &str) -> u16 {
    let (status, _, body) = admin
        .call(
            Method::PUT,
            &format!("/admin/workspaces/{workspace}/credentials/narrow"),
            Some(json!({ "fields": { "api_key": key } })),
        )
        .await;
    assert!(
        status == 200 || status == 201,
        "{workspace}: {status} {body}"
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_replica_are_reported_as_they_happened_and_seen_by_the_other() {
    let _serial = SERIAL.lock().await;
    let env = Env::new().await;
    let cluster = RedisCluster::start().await;
    let a = env
        .start_on_cluster(&cluster, "", &workspace_config())
        .await;
    let b = env
        .start_on_cluster(&cluster, "", &workspace_config())
        .await;
    cluster.wait_for_subscribers(2).await;
    let admin = Admin::new(&a, Some(ADMIN_TOKEN));

    // Every write answers success (before: 503 "Moved" for two slots in three, although the
    // write had taken effect on the first node's slots), on every master.
    let mut owners = HashSet::new();
    for ws in workspaces() {
        put(&admin, &ws, &format!("v1-{ws}")).await;
        owners.insert(cluster.owner(&format!("sluice:cred:{{{ws}}}:narrow")).await);
    }
    assert_eq!(owners.len(), 3, "the records span every master");
    let (status, _, list) = admin.call(Method::GET, "/admin/credentials", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["credentials"].as_array().unwrap().len(), 12, "{list}");

    for ws in workspaces() {
        assert_eq!(
            call(&b, &env, &ws).await,
            (200, None, Some(format!("v1-{ws}")))
        );
    }

    // A change through a reaches b's cache within a second; so does a delete.
    for ws in ["ws_c0", "ws_c5", "ws_c11"] {
        put(&admin, ws, "v2").await;
        let changed = Instant::now();
        while call(&b, &env, ws).await.2.as_deref() != Some("v2") {
            assert!(
                changed.elapsed() < Duration::from_secs(1),
                "{ws}: b still has v1"
            );
        }
    }
    let (status, _, _) = admin
        .call(
            Method::DELETE,
            "/admin/workspaces/ws_c3/credentials/narrow",
            None,
        )
        .await;
    assert!(status == 200 || status == 204, "{status}");
    let deleted = Instant::now();
    loop {
        let (status, code, _) = call(&b, &env, "ws_c3").await;
        if status == 403 {
            assert_eq!(code.as_deref(), Some("credential_not_configured"));
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "b still served a deleted credential"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_that_move_are_followed_for_listing_reads_and_writes() {
    let _serial = SERIAL.lock().await;
    let env = Env::new().await;
    let cluster = RedisCluster::start().await;
    let gw = env
        .start_on_cluster(&cluster, "", &workspace_config())
        .await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    for ws in workspaces() {
        put(&admin, &ws, &format!("v1-{ws}")).await;
    }
    // The global listing key and one workspace's slot move to other masters while sluice
    // runs with the old slot map.
    for key in ["sluice:cred:workspaces", "sluice:cred:{ws_c1}:narrow"] {
        let before = cluster.owner(key).await;
        let after = cluster.move_slot_of(key).await;
        assert_ne!(before, after);
        assert_eq!(cluster.owner(key).await, after);
    }
    let (status, _, list) = admin.call(Method::GET, "/admin/credentials", None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["credentials"].as_array().unwrap().len(), 12, "{list}");
    assert_eq!(
        call(&gw, &env, "ws_c1").await,
        (200, None, Some("v1-ws_c1".into()))
    );
    put(&admin, "ws_c1", "v2").await;
    assert_eq!(call(&gw, &env, "ws_c1").await.2.as_deref(), Some("v2"));
    let (status, _, _) = admin
        .call(
            Method::DELETE,
            "/admin/workspaces/ws_c1/credentials/narrow",
            None,
        )
        .await;
    assert!(status == 200 || status == 204, "{status}");
    let (_, _, list) = admin.call(Method::GET, "/admin/credentials", None).await;
    assert_eq!(list["credentials"].as_array().unwrap().len(), 11, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_with_an_expired_token_refresh_once_on_a_cluster() {
    let _serial = SERIAL.lock().await;
    let env = Env::new().await;
    let cluster = RedisCluster::start().await;
    env.upstream.oauth.lock().unwrap().expires_in = Some(30);
    let extra = env.oauth_connectors(60_000, "CANARY-cluster-client-secret");
    let slow_ok = "read_timeout_ms = 2000";
    let a = env.start_on_cluster(&cluster, slow_ok, &extra).await;
    let b = env.start_on_cluster(&cluster, slow_ok, &extra).await;
    cluster.wait_for_subscribers(2).await;
    let (status, _, body) = Admin::new(&a, Some(ADMIN_TOKEN))
        .call(
            Method::POST,
            "/admin/workspaces/ws_7/oauth/cc/connect",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    {
        // The stored token is due (30 s left, refreshed 60 s ahead); the endpoint is slow so
        // the requests overlap the refresh.
        let mut m = env.upstream.oauth.lock().unwrap();
        assert_eq!(m.token_calls, 1);
        m.expires_in = Some(3600);
        m.delay = Duration::from_millis(300);
    }
    let statuses = burst(&a, &b, env.url("api.saas.test", "/api/burst"), "cc").await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        env.upstream.oauth.lock().unwrap().token_calls,
        2,
        "one refresh for 200 requests on two replicas"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shared_budget_holds_across_replicas_on_a_cluster() {
    let _serial = SERIAL.lock().await;
    let env = Env::new().await;
    let cluster = RedisCluster::start().await;
    let extra = format!(
        r#"
[[connector]]
connector_id = "budget"
display_name = "One budget for every replica"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{}]
[connector.rate_limit]
capacity = 100
per_second = 0.001
max_wait_ms = 0
shared = true
"#,
        env.upstream.port()
    );
    // 200 requests at once on a debug build with two cores: give Redis more than the default
    // 250 ms to answer, or a late answer falls back to local buckets (by design).
    let slow_ok = "read_timeout_ms = 2000";
    let a = env.start_on_cluster(&cluster, slow_ok, &extra).await;
    let b = env.start_on_cluster(&cluster, slow_ok, &extra).await;
    let statuses = burst(&a, &b, env.url("api.saas.test", "/budget"), "budget").await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        (95..=105).contains(&admitted),
        "{admitted} admitted: one budget of 100 across two replicas, within 5 %"
    );
    let fallbacks = metric(
        &a,
        r#"sluice_rate_limit_fallbacks_total{connector="budget"}"#,
    )
    .await
        + metric(
            &b,
            r#"sluice_rate_limit_fallbacks_total{connector="budget"}"#,
        )
        .await;
    assert_eq!(fallbacks, 0, "every decision was the cluster's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_restarted_under_load_keeps_cached_credentials_serving_and_recovers() {
    let _serial = SERIAL.lock().await;
    let env = Env::new().await;
    let mut cluster = RedisCluster::start().await;
    // A short cache, so requests go to the store during the outage and are served stale.
    let gw = env
        .start_on_cluster(
            &cluster,
            "cache_ttl_ms = 50\nmax_staleness_ms = 600000\noutage_backoff_ms = 200\nread_timeout_ms = 500",
            &workspace_config(),
        )
        .await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    for ws in workspaces() {
        put(&admin, &ws, &format!("k-{ws}")).await;
        assert_eq!(call(&gw, &env, &ws).await.0, 200);
    }
    let victim = cluster.owner("sluice:cred:{ws_c0}:narrow").await;
    let on_victim: Vec<String> = {
        let mut v = Vec::new();
        for ws in workspaces() {
            if cluster.owner(&format!("sluice:cred:{{{ws}}}:narrow")).await == victim {
                v.push(ws);
            }
        }
        v
    };

    // Load: every workspace in turn, until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, client) = (stop.clone(), client(&gw, Some(("ops", OPS_TOKEN))));
        let url = env.url("other.saas.test", "/load");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for ws in workspaces().iter().cycle() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let resp = client
                    .get(&url)
                    .header("x-connector", "narrow")
                    .header("x-workspace", ws)
                    .send()
                    .await
                    .unwrap();
                let code = error_code(&resp);
                statuses.push((ws.clone(), resp.status().as_u16(), code));
            }
            statuses
        })
    };

    let stale = r#"sluice_credential_cache_total{result="stale"}"#;
    let before = metric(&gw, stale).await;
    cluster.stop(victim);
    // The outage is seen: credentials from the dead master are served stale.
    let outage = Instant::now();
    while metric(&gw, stale).await == before {
        assert!(
            outage.elapsed() < Duration::from_secs(20),
            "no stale credential was served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.resume(victim).await;
    cluster.wait_ok().await;

    // Recovery without restarting sluice: a write to the restarted master's slots is accepted
    // and served.
    let ws = &on_victim[0];
    let recovered = Instant::now();
    loop {
        let (status, _, _) = admin
            .call(
                Method::PUT,
                &format!("/admin/workspaces/{ws}/credentials/narrow"),
                Some(json!({ "fields": { "api_key": "after-restart" } })),
            )
            .await;
        if status == 200 || status == 201 {
            break;
        }
        assert_eq!(status, 503, "a failed write says the store is unavailable");
        assert!(
            recovered.elapsed() < Duration::from_secs(20),
            "the store never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served = Instant::now();
    while call(&gw, &env, ws).await.2.as_deref() != Some("after-restart") {
        assert!(
            served.elapsed() < Duration::from_secs(5),
            "the new credential is not served"
        );
    }

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = load.await.unwrap();
    assert!(
        statuses.len() > 12,
        "the load ran through the restart: {}",
        statuses.len()
    );
    assert!(
        statuses.iter().all(|(_, s, _)| *s == 200),
        "every request under load was served: {:?}",
        statuses
            .iter()
            .filter(|(_, s, _)| *s != 200)
            .collect::<Vec<_>>()
    );
}
