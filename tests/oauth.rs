//! OAuth 2.0 against a local TLS mock provider: client credentials, the authorization-code
//! flow with PKCE, refresh ahead of expiry, one refresh for many requests across replicas,
//! the 401 retry, rotated refresh tokens, invalid_grant, backoff, revocation and egress.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;

const CLIENT_SECRET: &str = "CANARY-client-secret-91b2";

fn connectors(env: &Env, skew_ms: u64) -> String {
    env.oauth_connectors(skew_ms, CLIENT_SECRET)
}

async fn get(
    gw: &sluice::server::Running,
    url: String,
    connector: &str,
) -> (u16, Option<String>, String) {
    let resp = client(gw, Some(("ops", OPS_TOKEN)))
        .get(url)
        .header("X-Connector", connector)
        .header("X-Workspace", "ws_7")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let code = resp
        .headers()
        .get("x-sluice-error")
        .map(|v| v.to_str().unwrap().to_string());
    (status, code, resp.text().await.unwrap())
}

fn calls(env: &Env) -> usize {
    env.upstream.oauth.lock().unwrap().token_calls
}

fn api_authorizations(env: &Env) -> Vec<String> {
    env.upstream
        .requests()
        .iter()
        .filter(|r| r.target.starts_with("/api/"))
        .map(|r| r.header("authorization").unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_connect_inject_and_refresh_ahead_of_expiry() {
    let env = Env::new().await;
    // Tokens live 30 s and are refreshed 60 s ahead: every use is due for a refresh.
    env.upstream.oauth.lock().unwrap().expires_in = Some(30);
    let gw = env.start_with("", &connectors(&env, 60_000)).await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));

    let (status, code, _) = get(&gw, env.url("api.saas.test", "/api/x"), "cc").await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("credential_not_configured")),
        "not connected yet"
    );
    let (status, _, body) = admin
        .call(
            Method::POST,
            "/admin/workspaces/ws_7/oauth/cc/connect",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls(&env), 1);
    {
        let m = env.upstream.oauth.lock().unwrap();
        assert_eq!(m.grants, ["client_credentials"]);
        assert_eq!(m.client_auth, ["post"]);
        assert!(
            m.params
                .contains(&("audience".into(), "https://api.saas.test".into()))
        );
        assert!(m.params.contains(&("scope".into(), "read write".into())));
    }

    let (status, _, body) = get(&gw, env.url("api.saas.test", "/api/x"), "cc").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls(&env), 2, "the due token was refreshed before use");
    assert_eq!(api_authorizations(&env), ["Bearer at-2"]);

    // With a long-lived token, no refresh.
    env.upstream.oauth.lock().unwrap().expires_in = Some(3600);
    let (status, _, _) = get(&gw, env.url("api.saas.test", "/api/x"), "cc").await;
    assert_eq!(status, 200);
    assert_eq!(calls(&env), 3);
    let (status, _, _) = get(&gw, env.url("api.saas.test", "/api/x"), "cc").await;
    assert_eq!(status, 200);
    assert_eq!(calls(&env), 3, "a fresh token is used as it is");

    let (_, _, meta) = admin
        .call(Method::GET, "/admin/workspaces/ws_7/credentials/cc", None)
        .await;
    assert_eq!(meta["needs_reauthorization"], false);
    assert!(meta["expires_at"].as_u64().unwrap() > sluice::credential::store::now_unix() + 3000);
    assert!(
        !meta.to_string().contains("at-"),
        "no token in metadata: {meta}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_expires_in_the_default_lifetime_applies() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(&env, 60_000)).await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    let before = sluice::credential::store::now_unix();
    let (status, _, body) = admin
        .call(
            Method::POST,
            "/admin/workspaces/ws_7/oauth/cc/connect",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let expires = body["expires_at"].as_u64().unwrap();
    assert!(
        (before + 7200..=before + 7202).contains(&expires),
        "default_lifetime_ms 7200000: {expires} vs {before}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_on_two_replicas_refresh_once() {
    let env = Env::new().await;
    let redis = RedisServer::start().await;
    env.upstream.oauth.lock().unwrap().expires_in = Some(30);
    let extra = connectors(&env, 60_000);
    let a = env.start_on_redis(&redis.url(), &extra).await;
    let b = env.start_on_redis(&redis.url(), &extra).await;
    redis.wait_for_subscribers(2).await;
    let (status, _, body) = Admin::new(&a, Some(ADMIN_TOKEN))
        .call(
            Method::POST,
            "/admin/workspaces/ws_7/oauth/cc/connect",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(calls(&env), 1);
    {
        // The stored token is due; the next one lives an hour. The endpoint is slow, so the
        // requests really do overlap the refresh.
        let mut m = env.upstream.oauth.lock().unwrap();
        m.expires_in = Some(3600);
        m.delay = Duration::from_millis(300);
    }
    let url = env.url("api.saas.test", "/api/burst");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let c = client(gw, Some(("ops", OPS_TOKEN)));
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            c.get(url)
                .header("X-Connector", "cc")
                .header("X-Workspace", "ws_7")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        calls(&env),
        2,
        "200 requests on 2 replicas caused exactly one refresh"
    );
    assert!(api_authorizations(&env).iter().all(|a| a == "Bearer at-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_forces_one_refresh_and_one_retry_with_the_body_replayed() {
    let env = Env::new().await;
    env.upstream.oauth.lock().unwrap().expires_in = Some(3600);
    let gw = env.start_with("", &connectors(&env, 60_000)).await;
    Admin::new(&gw, Some(ADMIN_TOKEN))
        .call(
            Method::POST,
            "/admin/workspaces/ws_7/oauth/cc/connect",
            None,
        )
        .await;
    assert_eq!(calls(&env), 1);

    // The provider revokes at-1 behind sluice's back: the API answers 401 to it.
    env.upstream.oauth.lock().unwrap().valid_access = Some("at-0-revoked".into());
    let resp = client(&gw, Some(("ops", OPS_TOKEN)))
        .post(env.url("api.saas.test", "/api/contacts"))
        .header("X-Connector", "cc")
        .header("X-Workspace", "ws_7")
        .body("{\"email\":\"a@example.com\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(calls(&env), 2, "exactly one forced refresh");
    let api: Vec<_> = env
        .upstream
        .requests()
        .into_iter()
        .filter(|r| r.target == "/api/contacts")
        .collect();
    assert_eq!(api.len(), 2, "the request was retried once");
    assert_eq!(api[0].header("authorization"), Some("Bearer at-1"));
    assert_eq!(api[1].header("authorization"), Some("Bearer at-2"));
    assert_eq!(api[1].body, api[0].body, "the body was replayed");
    assert_eq!(api[1].body, b"{\"email\":\"a@example.com\"}");

    // An API that refuses every token: one refresh, one retry, then the 401 goes to the app.
    env.upstream.oauth.lock().unwrap().reject_all_tokens = true;
    let (status, code, _) = get(&gw, env.url("api.saas.test", "/api/always401"), "cc").await;
    assert_eq!(
        (status, code),
        (401, None),
        "the upstream's own 401, relayed"
    );
    assert_eq!(calls(&env), 3);
    let api = env
        .upstream
        .requests()
        .iter()
        .filter(|r| r.target == "/api/always401")
        .count();
    assert_eq!(api, 2, "one retry, no second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_with_pkce_state_rotation_invalid_grant_and_revocation() {
    let env = Env::new().await;
    env.upstream.oauth.lock().unwrap().expires_in = Some(30); // always due: every use refreshes
    let gw = env.start_with("", &connectors(&env, 60_000)).await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));

    // Start: a redirect with PKCE S256 and a state.
    let (status, _, body) = admin
        .call(
            Method::GET,
            "/admin/oauth/start?workspace=ws_7&connector=ac",
            None,
        )
        .await;
    assert_eq!(status, 302, "{body}");
    let location = body["authorization_url"].as_str().unwrap().to_string();
    assert!(location.starts_with(&format!(
        "https://auth.saas.test:{}/oauth/authorize?",
        env.upstream.port()
    )));
    let q: std::collections::HashMap<String, String> =
        form_urlencoded::parse(location.split_once('?').unwrap().1.as_bytes())
            .into_owned()
            .collect();
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], "sluice-client");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["redirect_uri"], "http://127.0.0.1:9090/oauth/callback");
    let state = q["state"].clone();
    {
        let mut m = env.upstream.oauth.lock().unwrap();
        m.expected_code = Some("code-123".into());
        m.expected_challenge = Some(q["code_challenge"].clone());
        m.rotate_refresh = true;
    }

    // The callback needs no admin token, but a valid state: a forged one is refused.
    let anonymous = Admin::new(&gw, None);
    let (status, code, _) = anonymous
        .call(
            Method::GET,
            "/oauth/callback?state=forged&code=code-123",
            None,
        )
        .await;
    assert_eq!((status, code.as_deref()), (400, Some("invalid_state")));
    let callback = format!("/oauth/callback?state={state}&code=code-123");
    let (status, _, body) = anonymous.call(Method::GET, &callback, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["connected"], true);
    let (status, code, _) = anonymous.call(Method::GET, &callback, None).await;
    assert_eq!(
        (status, code.as_deref()),
        (400, Some("invalid_state")),
        "a state works once"
    );
    assert_eq!(
        calls(&env),
        1,
        "the code was exchanged once, with the PKCE verifier"
    );

    // Two refreshes in a row: each uses the refresh token the previous one rotated in.
    for expected in ["Bearer at-2", "Bearer at-3"] {
        let (status, _, body) = get(&gw, env.url("api.saas.test", "/api/me"), "ac").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(api_authorizations(&env).last().unwrap(), expected);
    }
    assert_eq!(
        env.upstream.oauth.lock().unwrap().grants,
        ["authorization_code", "refresh_token", "refresh_token"]
    );
    assert_eq!(
        env.upstream.oauth.lock().unwrap().client_auth,
        ["basic", "basic", "basic"]
    );

    // The provider refuses the refresh token: needs reauthorization, and no more attempts.
    env.upstream.oauth.lock().unwrap().valid_refresh = Some("rt-none".into());
    let (status, code, body) = get(&gw, env.url("api.saas.test", "/api/me"), "ac").await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("oauth_reauthorization_required")),
        "{body}"
    );
    let after = calls(&env);
    let (status, code, _) = get(&gw, env.url("api.saas.test", "/api/me"), "ac").await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("oauth_reauthorization_required"))
    );
    assert_eq!(
        calls(&env),
        after,
        "no refresh attempt while it needs reauthorization"
    );
    let (_, _, meta) = admin
        .call(Method::GET, "/admin/workspaces/ws_7/credentials/ac", None)
        .await;
    assert_eq!(meta["needs_reauthorization"], true);
    let series =
        r#"sluice_oauth_token_refreshes_total{connector="ac",result="needs_reauthorization"}"#;
    assert_eq!(metric(&gw, series).await, 1);

    // Disconnect: the tokens are revoked at the provider, then the record is deleted.
    let (status, _, body) = admin
        .call(
            Method::DELETE,
            "/admin/workspaces/ws_7/credentials/ac",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["revoked"], true);
    let revoked = env.upstream.oauth.lock().unwrap().revoked.clone();
    assert_eq!(
        revoked,
        [
            ("rt-3".to_string(), "refresh_token".to_string()),
            ("at-3".to_string(), "access_token".to_string())
        ]
    );
    let (status, code, _) = get(&gw, env.url("api.saas.test", "/api/me"), "ac").await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("credential_not_configured"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_token_failures_back_off_and_never_inject_an_expired_token() {
    let env = Env::new().await;
    env.upstream.oauth.lock().unwrap().expires_in = Some(0); // expired on arrival
    let gw = env.start_with("", &connectors(&env, 60_000)).await;
    Admin::new(&gw, Some(ADMIN_TOKEN))
        .call(
            Method::POST,
            "/admin/workspaces/ws_7/oauth/cc/connect",
            None,
        )
        .await;
    env.upstream.oauth.lock().unwrap().fail_next.extend([
        (503, "temporarily_unavailable"),
        (503, "temporarily_unavailable"),
    ]);

    let (status, code, body) = get(&gw, env.url("api.saas.test", "/api/x"), "cc").await;
    assert_eq!(
        (status, code.as_deref()),
        (503, Some("oauth_refresh_failed")),
        "{body}"
    );
    assert!(!body.contains(CLIENT_SECRET));
    let after_first = calls(&env);
    let (status, code, _) = get(&gw, env.url("api.saas.test", "/api/x"), "cc").await;
    assert_eq!(
        (status, code.as_deref()),
        (503, Some("oauth_refresh_failed"))
    );
    assert_eq!(
        calls(&env),
        after_first,
        "backing off: no second call right away"
    );
    assert!(
        api_authorizations(&env).is_empty(),
        "the expired token was never sent upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoints_obey_the_egress_policy() {
    let env = Env::new().await;
    let gw = env.start_with("", &connectors(&env, 60_000)).await;
    let (status, code, body) = Admin::new(&gw, Some(ADMIN_TOKEN))
        .call(
            Method::POST,
            "/admin/workspaces/ws_7/oauth/private_idp/connect",
            None,
        )
        .await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("egress_refused")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("address_not_allowed"),
        "{body}"
    );
    assert!(!body.to_string().contains(CLIENT_SECRET));
    assert_eq!(calls(&env), 0);

    // A token URL outside the connector's allowlist is refused when the config loads.
    let bad = connectors(&env, 60_000).replace(
        "token_url = \"https://privauth.saas.test",
        "token_url = \"https://evil.example.com",
    );
    let err = sluice::config::Snapshot::from_toml(
        &env.config(1, "", &bad),
        std::path::Path::new("x.toml"),
    )
    .err()
    .expect("refused");
    assert!(
        err.to_string()
            .contains("connector[private_idp].oauth2.token_url"),
        "{err}"
    );
}
