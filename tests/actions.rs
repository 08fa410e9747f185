//! Connector actions end to end: `POST /v1/actions/{connector}/{action_id}` on the proxy
//! listener, called by real clients (reqwest, curl), against the real gateway and a TLS
//! upstream that records what it received. The URL template, the inputs and the refusals are
//! tested exactly in `src/action/tests.rs`; here: the request the upstream sees, the
//! credential injected, the policy on a filled-in host, retries, and the JSON errors.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{Value, json};

const CANARY: &str = "sk_action_CANARY_9f8e7d6c5b4a";

fn crm(port: u16) -> String {
    format!(
        r#"
[[connector]]
connector_id = "crm"
display_name = "CRM"
auth_type = "api_key"
allowed_domains = ["api.saas.test", "*.saas.test"]
allowed_ports = [{port}]

[connector.auth_schema]
fields = [{{ name = "api_key", label = "API key", type = "password", required = true }}]

[connector.inject]
header = "X-API-Key"
format = "{{api_key}}"

[connector.retry]
max_attempts = 3
base_delay_ms = 10
max_delay_ms = 50

[[connector.actions]]
action_id = "create-contact"
http_method = "POST"
url_template = "https://api.saas.test:{port}/v1/contacts"
body_schema = [
  {{ name = "email", label = "Email", required = true }},
  {{ name = "name", label = "Name" }},
  {{ name = "tags", label = "Tags" }},
]

[[connector.actions]]
action_id = "update-contact"
http_method = "PATCH"
url_template = "https://api.saas.test:{port}/v1/contacts/{{contact_id}}"
body_schema = [{{ name = "email", label = "Email" }}]

[[connector.actions]]
action_id = "search"
http_method = "GET"
url_template = "https://api.saas.test:{port}/v1/search?v=2"
body_schema = [{{ name = "q", label = "Query", required = true }}, {{ name = "limit", label = "Limit" }}]

[[connector.actions]]
action_id = "ping-tenant"
http_method = "POST"
url_template = "https://{{tenant}}.saas.test:{port}/v1/ping"

[[connector.actions]]
action_id = "flaky-get"
http_method = "GET"
url_template = "https://api.saas.test:{port}/flaky/2/{{id}}"

[[connector.actions]]
action_id = "flaky-post"
http_method = "POST"
url_template = "https://api.saas.test:{port}/flaky/2/{{id}}"
"#
    )
}

async fn start(env: &Env) -> sluice::server::Running {
    let gw = env.start_with("", &crm(env.upstream.port())).await;
    put_credential(&gw, "ws_7", "crm", true, &[("api_key", CANARY)]).await;
    gw
}

/// A direct (not proxied) client: an action call is an API call to sluice itself.
fn direct() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap()
}

/// POST an action as `app` for ws_7; (status, error code header, JSON or text body).
async fn call(
    gw: &sluice::server::Running,
    path: &str,
    body: &str,
) -> (u16, Option<String>, Value) {
    let resp = direct()
        .post(format!("http://{}{path}", gw.addr))
        .header("proxy-authorization", format!("Bearer {APP_TOKEN}"))
        .header("x-workspace", "ws_7")
        .header("cookie", "session=app-secret-cookie")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let code = error_code(&resp);
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, code, json)
}

fn last_request(env: &Env) -> Recorded {
    env.upstream
        .requests()
        .pop()
        .expect("the upstream saw a request")
}

#[tokio::test]
async fn an_action_becomes_the_upstream_request_it_defines() {
    let env = Env::new().await;
    let gw = start(&env).await;

    let (status, _, _) = call(
        &gw,
        "/v1/actions/crm/create-contact",
        r#"{"email": "ada@example.com", "name": "Ada", "tags": ["a", "b"]}"#,
    )
    .await;
    assert_eq!(status, 200);
    let seen = last_request(&env);
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/v1/contacts");
    assert_eq!(seen.sni.as_deref(), Some("api.saas.test"));
    assert_eq!(seen.header("x-api-key"), Some(CANARY));
    assert_eq!(seen.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(
        body,
        json!({"email": "ada@example.com", "name": "Ada", "tags": ["a", "b"]})
    );
    // The app's own head does not go upstream: no auth, no routing, no cookie.
    for header in [
        "proxy-authorization",
        "authorization",
        "x-workspace",
        "cookie",
    ] {
        assert!(!seen.has_header(header), "{header} went upstream");
    }

    // A placeholder fills one path segment, encoded; the rest is the PATCH body.
    let (status, _, _) = call(
        &gw,
        "/v1/actions/crm/update-contact",
        r#"{"contact_id": "c/1?x", "email": "new@example.com"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let seen = last_request(&env);
    assert_eq!(seen.method, "PATCH");
    assert_eq!(seen.target, "/v1/contacts/c%2F1%3Fx");
    assert_eq!(
        serde_json::from_slice::<Value>(&seen.body).unwrap(),
        json!({"email": "new@example.com"})
    );

    // GET: the inputs go in the query, no body.
    let (status, _, _) = call(
        &gw,
        "/v1/actions/crm/search",
        r#"{"q": "hello world", "limit": 5}"#,
    )
    .await;
    assert_eq!(status, 200);
    let seen = last_request(&env);
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.target, "/v1/search?v=2&limit=5&q=hello%20world");
    assert!(seen.body.is_empty());
    assert!(!seen.has_header("content-length") || seen.header("content-length") == Some("0"));
}

#[tokio::test]
async fn curl_calls_an_action_with_authorization() {
    let env = Env::new().await;
    let gw = start(&env).await;
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Authorization: Bearer {APP_TOKEN}"),
            "-H",
            "X-Workspace: ws_7",
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"tenant": "other"}"#,
            &format!("http://{}/v1/actions/crm/ping-tenant", gw.addr),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{out:?}");
    let seen = last_request(&env);
    // The filled-in host is where the call went, with its own SNI.
    assert_eq!(seen.sni.as_deref(), Some("other.saas.test"));
    assert_eq!(seen.target, "/v1/ping");
    assert_eq!(seen.header("x-api-key"), Some(CANARY));
    assert!(!seen.has_header("authorization"));
}

#[tokio::test]
async fn a_filled_in_host_goes_through_the_whole_policy() {
    let env = Env::new().await;
    let gw = start(&env).await;
    // private.saas.test matches *.saas.test but resolves to 10.1.2.3.
    let (status, code, body) = call(
        &gw,
        "/v1/actions/crm/ping-tenant",
        r#"{"tenant": "private"}"#,
    )
    .await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("address_not_allowed"))
    );
    assert_eq!(body["error"]["code"], "address_not_allowed");
    assert!(env.upstream.requests().is_empty());
    // A value that tries to leave the label is refused before any lookup.
    let (status, code, _) = call(
        &gw,
        "/v1/actions/crm/ping-tenant",
        r#"{"tenant": "evil.example.com/x"}"#,
    )
    .await;
    assert_eq!(
        (status, code.as_deref()),
        (400, Some("action_input_invalid"))
    );
    assert!(env.upstream.requests().is_empty());
}

#[tokio::test]
async fn actions_are_retried_only_when_their_method_is_safe_to_send_twice() {
    let env = Env::new().await;
    let gw = start(&env).await;
    // GET: two 503s, then 200.
    let (status, _, _) = call(&gw, "/v1/actions/crm/flaky-get", r#"{"id": "g"}"#).await;
    assert_eq!(status, 200);
    let hits = |t: &str| {
        env.upstream
            .requests()
            .iter()
            .filter(|r| r.target == t)
            .count()
    };
    assert_eq!(hits("/flaky/2/g"), 3);
    // POST: the first 503 goes back to the app, and the body was sent once.
    let (status, _, _) = call(&gw, "/v1/actions/crm/flaky-post", r#"{"id": "p"}"#).await;
    assert_eq!(status, 503);
    assert_eq!(hits("/flaky/2/p"), 1);
}

#[tokio::test]
async fn bad_action_calls_get_json_errors_without_secrets() {
    let env = Env::new().await;
    let gw = start(&env).await;
    let cases: &[(&str, String, u16, &str)] = &[
        (
            "/v1/actions/crm/no-such-action",
            "{}".into(),
            404,
            "unknown_action",
        ),
        (
            "/v1/actions/nope/create-contact",
            "{}".into(),
            403,
            "unknown_connector",
        ),
        (
            "/v1/actions/crm/create-contact",
            r#"{"name": "Ada"}"#.into(),
            400,
            "action_input_invalid",
        ),
        (
            "/v1/actions/crm/create-contact",
            format!(r#"{{"email": "a@b.c", "{CANARY}": 1}}"#),
            400,
            "action_input_invalid",
        ),
        (
            "/v1/actions/crm/create-contact",
            format!(r#"{{"email": "{CANARY}"#),
            400,
            "action_input_invalid",
        ),
        (
            "/v1/actions/crm/create-contact",
            "[1]".into(),
            400,
            "action_input_invalid",
        ),
        (
            "/v1/actions/crm/create-contact",
            format!(r#"{{"email": "{}"}}"#, "x".repeat(70_000)),
            413,
            "request_body_too_large",
        ),
    ];
    for (path, body, status, code) in cases {
        let (got, header, json) = call(&gw, path, body).await;
        assert_eq!(
            (got, header.as_deref()),
            (*status, Some(*code)),
            "{path} {json}"
        );
        assert_eq!(json["error"]["code"], *code);
        assert!(!json.to_string().contains(CANARY), "{json}");
    }
    // Not POST, no caller, a workspace the caller may not act for.
    let url = format!("http://{}/v1/actions/crm/create-contact", gw.addr);
    let resp = direct()
        .get(&url)
        .header("proxy-authorization", format!("Bearer {APP_TOKEN}"))
        .header("x-workspace", "ws_7")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    let resp = direct()
        .post(&url)
        .header("x-workspace", "ws_7")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 407);
    let resp = direct()
        .post(&url)
        .header("proxy-authorization", format!("Bearer {APP_TOKEN}"))
        .header("x-workspace", "ws_other")
        .body(r#"{"email": "a@b.c"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert_eq!(resp.headers()["x-sluice-error"], "workspace_not_permitted");
    assert!(
        env.upstream.requests().is_empty(),
        "a refused call reached the upstream"
    );
}

#[tokio::test]
async fn a_proxied_request_on_the_action_path_is_still_proxied() {
    let env = Env::new().await;
    let gw = start(&env).await;
    // With X-Connector it is an ordinary proxied request whose upstream path happens to be
    // /v1/actions/…: it goes to the upstream as it is.
    let resp = client(&gw, Some(("app", APP_TOKEN)))
        .post(env.url("api.saas.test", "/v1/actions/crm/create-contact"))
        .header("x-connector", "crm")
        .header("x-workspace", "ws_7")
        .body("raw")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = last_request(&env);
    assert_eq!(seen.target, "/v1/actions/crm/create-contact");
    assert_eq!(seen.body, b"raw");
}
