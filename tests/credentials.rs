//! The credential vault end to end: injection per auth type, tenant states, both stores, two
//! replicas on one Redis, and a Redis outage in the middle of a test.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use sluice::credential::store::{CredentialRecord, CredentialStore, RecordValue, StoreError};

const CANARY: &str = "CANARY-cred-7f3a9b";

/// Connectors for every auth type, all pointing at the test upstream.
fn connectors(port: u16) -> String {
    format!(
        r#"
[[connector]]
connector_id = "bearer"
display_name = "Bearer"
auth_type = "bearer"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
[connector.auth_schema]
fields = [{{ name = "token", label = "Token" }}, {{ name = "org_id", label = "Org" }}]
[connector.inject]
headers = {{ "X-Organization-ID" = "{{org_id}}" }}

[[connector]]
connector_id = "basic"
display_name = "Basic"
auth_type = "basic"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
[connector.auth_schema]
fields = [{{ name = "username", label = "User" }}, {{ name = "password", label = "Password" }}]

[[connector]]
connector_id = "querykey"
display_name = "Query key"
auth_type = "api_key"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
[connector.auth_schema]
fields = [{{ name = "api_key", label = "Key" }}]
[connector.inject]
query = "api_key"
"#
    )
}

async fn call(
    gw: &sluice::server::Running,
    url: String,
    connector: &str,
    workspace: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, String) {
    let c = client(gw, Some(("ops", OPS_TOKEN)));
    let mut rb = c
        .get(url)
        .header("X-Connector", connector)
        .header("X-Workspace", workspace);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let code = resp
        .headers()
        .get("x-sluice-error")
        .map(|v| v.to_str().unwrap().to_string());
    (status, code, resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_auth_type_injects_exactly_the_credential() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(env.upstream.port())).await;
    put_credential(
        &gw,
        "ws_7",
        "bearer",
        true,
        &[("token", CANARY), ("org_id", "org-42")],
    )
    .await;
    put_credential(
        &gw,
        "ws_7",
        "basic",
        true,
        &[("username", "user"), ("password", CANARY)],
    )
    .await;
    put_credential(&gw, "ws_7", "querykey", true, &[("api_key", CANARY)]).await;
    put_credential(&gw, "ws_7", "narrow", true, &[("api_key", CANARY)]).await;

    // The app's own values under the injected names are replaced, never forwarded.
    let (status, _, body) = call(
        &gw,
        env.url("api.saas.test", "/bearer"),
        "bearer",
        "ws_7",
        &[
            ("Authorization", "Bearer app-own"),
            ("X-Organization-ID", "evil"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert!(!body.contains(CANARY));
    let (status, _, _) = call(
        &gw,
        env.url("api.saas.test", "/basic"),
        "basic",
        "ws_7",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, body) = call(
        &gw,
        env.url("api.saas.test", "/query?x=1&api_key=app-own"),
        "querykey",
        "ws_7",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(!body.contains(CANARY));
    let (status, _, _) = call(
        &gw,
        env.url("other.saas.test", "/header"),
        "narrow",
        "ws_7",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = call(&gw, env.url("api.saas.test", "/none"), "saas", "ws_7", &[]).await;
    assert_eq!(status, 200);

    let reqs = env.upstream.requests();
    assert_eq!(reqs.len(), 5);
    let bearer = &reqs[0];
    assert_eq!(
        bearer.header("authorization"),
        Some(format!("Bearer {CANARY}").as_str())
    );
    assert_eq!(bearer.header("x-organization-id"), Some("org-42"));
    assert_eq!(
        bearer
            .headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .count(),
        1,
        "exactly one Authorization header"
    );
    use base64::Engine;
    let expected = base64::engine::general_purpose::STANDARD.encode(format!("user:{CANARY}"));
    assert_eq!(
        reqs[1].header("authorization"),
        Some(format!("Basic {expected}").as_str())
    );
    assert_eq!(reqs[2].target, format!("/query?x=1&api_key={CANARY}"));
    assert!(!reqs[2].has_header("authorization"));
    assert_eq!(reqs[3].header("x-api-key"), Some(CANARY));
    assert!(
        !reqs[4].has_header("authorization"),
        "auth_type none injects nothing"
    );
}

/// (connector, class, outcome) each skipped-states case counts once.
const EXPECTED: [(&str, &str, &str); 4] = [
    ("bearer", "skipped", "credential_not_configured"),
    ("basic", "skipped", "workspace_opted_out"),
    ("off", "skipped", "connector_disabled"),
    ("bearer", "refused", "credential_incomplete"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_tenant_states_never_reach_the_upstream() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(env.upstream.port())).await;
    put_credential(
        &gw,
        "ws_7",
        "basic",
        false,
        &[("username", "u"), ("password", CANARY)],
    )
    .await;
    put_credential(&gw, "ws_7", "bearer", true, &[("token", CANARY)]).await;

    let series = |connector: &str, class: &str, code: &str| {
        format!(
            r#"sluice_requests_total{{class="{class}",connector="{connector}",outcome="{code}",status="4xx"}}"#
        )
    };
    let mut before = Vec::new();
    for (connector, class, code) in EXPECTED {
        before.push(metric(&gw, &series(connector, class, code)).await);
    }
    let cases = [
        ("bearer", "ws_other", 403, "credential_not_configured"),
        ("basic", "ws_7", 403, "workspace_opted_out"),
        ("off", "ws_7", 403, "connector_disabled"),
        ("bearer", "ws_7", 403, "credential_incomplete"),
    ];
    for (connector, workspace, status, code) in cases {
        let (got, got_code, body) = call(
            &gw,
            env.url("api.saas.test", "/"),
            connector,
            workspace,
            &[],
        )
        .await;
        assert_eq!(
            (got, got_code.as_deref()),
            (status, Some(code)),
            "{connector}/{workspace}: {body}"
        );
        assert!(!body.contains(CANARY), "{body}");
    }
    assert_eq!(env.upstream.connections(), 0);

    // Counted as skipped, not as failures; an incomplete credential is a refusal.
    for ((connector, class, code), before) in EXPECTED.iter().zip(before) {
        let after = metric(&gw, &series(connector, class, code)).await;
        assert_eq!(after - before, 1, "{connector} {code}");
    }
    let after = metrics_text(&gw).await;
    assert!(!after.contains(CANARY));
}

fn record(workspace: &str, connector: &str, version: u64) -> CredentialRecord {
    CredentialRecord {
        group: "connector".into(),
        name: connector.into(),
        workspace: workspace.into(),
        value: RecordValue {
            enabled: true,
            encrypted_config: format!("sealed-{workspace}-{connector}-{version}"),
        },
        key_id: "k1".into(),
        version,
        fields: vec!["api_key".into()],
        created_at: 1,
        updated_at: version,
        oauth: None,
    }
}

/// One suite, every store.
async fn store_suite(store: &dyn CredentialStore) {
    assert_eq!(store.get("ws_a", "c1").await.unwrap(), None);
    assert!(store.list().await.unwrap().is_empty());
    store.put(&record("ws_a", "c1", 1)).await.unwrap();
    store.put(&record("ws_a", "c2", 1)).await.unwrap();
    store.put(&record("ws_b", "c1", 1)).await.unwrap();
    assert_eq!(
        store.get("ws_a", "c1").await.unwrap(),
        Some(record("ws_a", "c1", 1))
    );
    store.put(&record("ws_a", "c1", 2)).await.unwrap();
    assert_eq!(
        store.get("ws_a", "c1").await.unwrap().unwrap().version,
        2,
        "put replaces"
    );
    let mut all: Vec<(String, String)> = store
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.workspace, r.name))
        .collect();
    all.sort();
    assert_eq!(
        all,
        [("ws_a", "c1"), ("ws_a", "c2"), ("ws_b", "c1")]
            .map(|(w, c)| (w.to_string(), c.to_string()))
    );
    assert!(store.delete("ws_a", "c1").await.unwrap());
    assert!(
        !store.delete("ws_a", "c1").await.unwrap(),
        "a second delete finds nothing"
    );
    assert_eq!(store.get("ws_a", "c1").await.unwrap(), None);
    assert_eq!(store.list().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_passes_one_suite() {
    use sluice::credential::redis::{RedisStore, RedisTarget};
    let dir = tempfile::tempdir().unwrap();
    let embedded =
        sluice::credential::embedded::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
    store_suite(&embedded).await;

    let redis = RedisServer::start().await;
    let single = RedisTarget::Single(redis.url());
    let store = RedisStore::new(&single, Duration::from_secs(1))
        .await
        .unwrap();
    store_suite(&store).await;

    let cluster = RedisCluster::start().await;
    let store = RedisStore::new(
        &RedisTarget::Cluster(cluster.nodes()),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    store_suite(&store).await;
}

/// Credential reads on one Redis server use the reading thread's own connection (a proxy
/// worker's, so the command is not handed to the background thread). When Redis restarts
/// under it, that connection is dropped and the read is answered through the shared one
/// within the same deadline; while Redis is down, a read fails at the deadline, not later.
#[tokio::test]
async fn reads_use_the_threads_own_connection_and_survive_a_restart() {
    use sluice::credential::redis::{RedisStore, RedisTarget};
    async fn clients(redis: &RedisServer) -> usize {
        let mut conn = redis.connection().await;
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .unwrap();
        // Not counting the connection that asked.
        list.lines().count() - 1
    }
    let mut redis = RedisServer::start().await;
    let timeout = Duration::from_millis(250);
    let store = RedisStore::new(&RedisTarget::Single(redis.url()), timeout)
        .await
        .unwrap();
    store.put(&record("ws_a", "c1", 1)).await.unwrap();
    assert_eq!(clients(&redis).await, 1, "the shared connection only");
    assert_eq!(
        store.get("ws_a", "c1").await.unwrap(),
        Some(record("ws_a", "c1", 1))
    );
    assert_eq!(
        clients(&redis).await,
        2,
        "the read opened this thread's own"
    );
    store.get("ws_a", "c1").await.unwrap();
    assert_eq!(clients(&redis).await, 2, "and the next read reuses it");

    // Restarted (empty): both connections are broken. The first write that succeeds shows
    // the shared one is back; the thread's own is still the broken one.
    redis.stop();
    redis.resume().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.put(&record("ws_a", "c1", 2)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the shared connection never came back"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        store.get("ws_a", "c1").await.unwrap(),
        Some(record("ws_a", "c1", 2)),
        "the broken connection of the thread is not waited on"
    );

    redis.stop();
    let started = Instant::now();
    let err = store.get("ws_a", "c1").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable(_)),
        "{err:?} with redis down"
    );
    // The margin is for a loaded CI machine, not for a reconnect back-off (seconds).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_copied_to_another_workspace_does_not_open() {
    let env = Env::new().await;
    let redis = RedisServer::start().await;
    let gw = env
        .start_on_redis(&redis.url(), &connectors(env.upstream.port()))
        .await;
    put_credential(&gw, "ws_42", "querykey", true, &[("api_key", CANARY)]).await;

    // An attacker with write access to Redis copies ws_42's record to ws_7.
    let mut conn = redis.connection().await;
    let raw: Vec<u8> = redis::cmd("GET")
        .arg("sluice:cred:{ws_42}:querykey")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut relabelled: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    relabelled["workspace"] = "ws_7".into();
    // Relabelled, its ciphertext (bound to ws_42) does not open; copied as it is, still
    // naming ws_42, the key it sits under decides whose it is. Failed reads are not cached.
    for copy in [relabelled.to_string().into_bytes(), raw.clone()] {
        let () = redis::cmd("SET")
            .arg("sluice:cred:{ws_7}:querykey")
            .arg(copy.as_slice())
            .query_async(&mut conn)
            .await
            .unwrap();
        let (status, code, body) =
            call(&gw, env.url("api.saas.test", "/"), "querykey", "ws_7", &[]).await;
        assert_eq!(
            (status, code.as_deref()),
            (500, Some("credential_unreadable")),
            "{body}"
        );
        assert!(!body.contains(CANARY));
    }
    assert_eq!(env.upstream.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_redis_see_a_change_within_a_second() {
    let env = Env::new().await;
    let redis = RedisServer::start().await;
    let extra = connectors(env.upstream.port());
    let a = env.start_on_redis(&redis.url(), &extra).await;
    let b = env.start_on_redis(&redis.url(), &extra).await;
    // Both replicas must be subscribed before anything changes, or the test measures startup.
    redis.wait_for_subscribers(2).await;

    put_credential(&a, "ws_7", "narrow", true, &[("api_key", "v1")]).await;
    let (status, _, _) = call(&b, env.url("other.saas.test", "/"), "narrow", "ws_7", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        env.upstream.requests()[0].header("x-api-key"),
        Some("v1"),
        "b cached v1"
    );

    // Change it through a; b's cache (TTL 30 s) must be invalidated over pub/sub.
    put_credential(&a, "ws_7", "narrow", true, &[("api_key", "v2")]).await;
    let changed = Instant::now();
    loop {
        let (status, _, _) = call(&b, env.url("other.saas.test", "/"), "narrow", "ws_7", &[]).await;
        assert_eq!(status, 200);
        let last = env
            .upstream
            .requests()
            .last()
            .unwrap()
            .header("x-api-key")
            .map(str::to_string);
        if last.as_deref() == Some("v2") {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "replica b still injected {last:?} a second after the change"
        );
    }

    // A delete through b reaches a too.
    b.vault
        .as_ref()
        .unwrap()
        .delete("ws_7", "narrow")
        .await
        .unwrap();
    let deleted = Instant::now();
    loop {
        let (status, code, _) =
            call(&a, env.url("other.saas.test", "/"), "narrow", "ws_7", &[]).await;
        if status == 403 {
            assert_eq!(code.as_deref(), Some("credential_not_configured"));
            break;
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(1),
            "replica a still served a deleted credential"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_serves_cached_credentials_and_recovers() {
    let env = Env::new().await;
    let mut redis = RedisServer::start().await;
    let gw = env
        .start_on_redis(&redis.url(), &connectors(env.upstream.port()))
        .await;
    put_credential(&gw, "ws_7", "narrow", true, &[("api_key", "never-loaded")]).await;
    let url = env.url("other.saas.test", "/");
    put_credential(
        &gw,
        "ws_other",
        "narrow",
        true,
        &[("api_key", "cached-key")],
    )
    .await;
    let (status, _, _) = call(&gw, url.clone(), "narrow", "ws_other", &[]).await;
    assert_eq!(status, 200, "loaded and cached while redis is up");

    redis.stop();
    // Expire the fresh cache now instead of waiting for its TTL; the stale fallback stays.
    gw.vault.as_ref().unwrap().invalidate_all_fresh();

    let (status, _, _) = call(&gw, url.clone(), "narrow", "ws_other", &[]).await;
    assert_eq!(
        status, 200,
        "a recently loaded credential is served while redis is down"
    );
    assert_eq!(
        env.upstream.requests().last().unwrap().header("x-api-key"),
        Some("cached-key")
    );

    let c = client(&gw, Some(("ops", OPS_TOKEN)));
    let resp = c
        .get(url.clone())
        .header("X-Connector", "narrow")
        .header("X-Workspace", "ws_7")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["x-sluice-error"],
        "credential_store_unavailable"
    );
    assert_eq!(resp.headers()["retry-after"], "1");

    // Redis comes back (empty: it kept nothing on disk). sluice reconnects by itself.
    redis.resume().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let vault = gw.vault.as_ref().unwrap();
    loop {
        let mut f = sluice::credential::secret::SecretFields::new();
        f.insert(
            "api_key",
            sluice::credential::secret::Secret::new("after-outage"),
        );
        if vault.put("ws_7", "narrow", true, &f).await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sluice did not reconnect to redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, _) = call(&gw, url, "narrow", "ws_7", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        env.upstream.requests().last().unwrap().header("x-api-key"),
        Some("after-outage")
    );
}

async fn probe(gw: &sluice::server::Running, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{}{path}", gw.admin_addr.unwrap()))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_store_and_the_cache() {
    let env = Env::new().await;
    let mut redis = RedisServer::start().await;
    let warm = env
        .start_on_redis(&redis.url(), &connectors(env.upstream.port()))
        .await;
    let cold = env
        .start_on_redis(&redis.url(), &connectors(env.upstream.port()))
        .await;
    let (status, body) = probe(&warm, "/readyz").await;
    assert_eq!(
        (status, body["credential_store"].as_str()),
        (200, Some("reachable"))
    );

    put_credential(&warm, "ws_7", "narrow", true, &[("api_key", "k")]).await;
    let (status, _, _) = call(
        &warm,
        env.url("other.saas.test", "/"),
        "narrow",
        "ws_7",
        &[],
    )
    .await;
    assert_eq!(status, 200, "a credential is now cached in `warm`");

    redis.stop();
    let (status, body) = probe(&warm, "/readyz").await;
    assert_eq!(
        (status, body["credential_store"].as_str()),
        (200, Some("unreachable; serving cached credentials"))
    );
    let (status, body) = probe(&cold, "/readyz").await;
    assert_eq!(
        (status, body["ready"].as_bool()),
        (503, Some(false)),
        "nothing cached to serve"
    );
    assert_eq!(probe(&cold, "/healthz").await.0, 200, "alive all the same");
}

/// With Redis killed, every admin call that needs the store answers 503 `store_unavailable`
/// within `credentials.read_timeout_ms` (250 ms here) instead of waiting on the client's
/// reconnects; and a write reported as failed does not land once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_fail_fast_while_redis_is_down_and_failed_writes_stay_failed() {
    use reqwest::Method;
    use serde_json::json;
    let env = Env::new().await;
    let mut redis = RedisServer::start().await;
    let gw = env
        .start_on_redis(&redis.url(), &connectors(env.upstream.port()))
        .await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    let path = "/admin/workspaces/ws_7/credentials/narrow";
    let (status, _, meta) = admin
        .call(
            Method::PUT,
            path,
            Some(json!({ "fields": { "api_key": "before" } })),
        )
        .await;
    assert_eq!(status, 200, "{meta}");

    redis.stop();
    let during = json!({ "fields": { "api_key": "during-outage" } });
    let calls = [
        (Method::PUT, path, Some(during.clone())),
        (Method::GET, path, None),
        (Method::GET, "/admin/credentials?workspace=ws_7", None),
        (Method::DELETE, path, None),
        (
            Method::PUT,
            "/admin/workspaces/ws_other/credentials/narrow",
            Some(during),
        ),
    ];
    for (method, p, body) in calls {
        let started = Instant::now();
        let (status, code, body) = admin.call(method.clone(), p, body).await;
        let took = started.elapsed();
        assert_eq!(
            (status, code.as_deref()),
            (503, Some("store_unavailable")),
            "{method} {p}: {body}"
        );
        assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
        // 250 ms read timeout; the margin is for a loaded CI machine, not for the client's
        // reconnect back-off (seconds), which is what this guards against.
        assert!(
            took < Duration::from_secs(2),
            "{method} {p} took {took:?} with redis down"
        );
    }

    // Redis comes back empty (no persistence). A later write through the same client is
    // ordered after anything it might still have queued, so once that one succeeds, a
    // queued write from the outage would be visible too.
    redis.resume().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _, _) = admin
            .call(
                Method::PUT,
                "/admin/workspaces/ws_42/credentials/narrow",
                Some(json!({ "fields": { "api_key": "after" } })),
            )
            .await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sluice did not reconnect to redis"
        );
        tokio::task::yield_now().await;
    }
    for p in [path, "/admin/workspaces/ws_other/credentials/narrow"] {
        let (status, _, body) = admin.call(Method::GET, p, None).await;
        assert_eq!(
            status, 404,
            "a write reported as failed took effect: {p} {body}"
        );
    }
    let mut conn = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*ws_other*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "outage write reached redis: {keys:?}");
}

/// After one failed read the store is not asked again for the back-off
/// (`credentials.outage_backoff_ms`): cached credentials past their TTL are served at once,
/// and the store-error counter moves once, not once per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_one_failed_read_stale_credentials_are_served_without_asking_the_store() {
    let env = Env::new().await;
    let mut redis = RedisServer::start().await;
    let gw = env
        .start_on_redis(
            &redis.url(),
            // Inside [credentials]: a back-off no loaded CI machine outlasts.
            &format!(
                "outage_backoff_ms = 60000\n{}",
                connectors(env.upstream.port())
            ),
        )
        .await;
    put_credential(
        &gw,
        "ws_other",
        "narrow",
        true,
        &[("api_key", "cached-key")],
    )
    .await;
    put_credential(&gw, "ws_7", "narrow", true, &[("api_key", "cached-too")]).await;
    let url = env.url("other.saas.test", "/");
    for ws in ["ws_other", "ws_7"] {
        let (status, _, _) = call(&gw, url.clone(), "narrow", ws, &[]).await;
        assert_eq!(status, 200, "{ws} loaded and cached while redis is up");
    }
    let stale = r#"sluice_credential_cache_total{result="stale"}"#;
    let (errors_before, stale_before) = (store_errors(&gw).await, metric(&gw, stale).await);

    redis.stop();
    gw.vault.as_ref().unwrap().invalidate_all_fresh();
    for ws in ["ws_other", "ws_7", "ws_other", "ws_7", "ws_other"] {
        let (status, _, _) = call(&gw, url.clone(), "narrow", ws, &[]).await;
        assert_eq!(status, 200, "{ws}: the stale copy is served");
    }
    assert_eq!(
        store_errors(&gw).await - errors_before,
        1,
        "the store was asked once, then left alone for the back-off"
    );
    assert_eq!(metric(&gw, stale).await - stale_before, 5);
}

async fn store_errors(gw: &sluice::server::Running) -> u64 {
    metric(gw, r#"sluice_credential_store_errors_total{store="read"}"#).await
        + metric(
            gw,
            r#"sluice_credential_store_errors_total{store="timeout"}"#,
        )
        .await
}
