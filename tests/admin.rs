//! The admin API and the CLI over it, against a running gateway.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::json;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const CANARY: &str = "CANARY-admin-4c2e1d";

async fn through_gateway(
    gw: &sluice::server::Running,
    url: String,
    connector: &str,
    workspace: &str,
) -> (u16, Option<String>) {
    let resp = client(gw, Some(("ops", OPS_TOKEN)))
        .get(url)
        .header("X-Connector", connector)
        .header("X-Workspace", workspace)
        .send()
        .await
        .unwrap();
    let code = resp
        .headers()
        .get("x-sluice-error")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_token() {
    let env = Env::new().await;
    let gw = env.start().await;
    for token in [None, Some("wrong"), Some(APP_TOKEN)] {
        let (status, code, body) = Admin::new(&gw, token)
            .call(Method::GET, "/admin/credentials", None)
            .await;
        assert_eq!(
            (status, code.as_deref()),
            (401, Some("admin_unauthorized")),
            "{token:?}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_in_and_only_metadata_comes_out() {
    let env = Env::new().await;
    let gw = env.start().await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    let path = "/admin/workspaces/ws_7/credentials/narrow";

    let (status, _, meta) = admin
        .call(
            Method::PUT,
            path,
            Some(json!({ "fields": { "api_key": CANARY } })),
        )
        .await;
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["enabled"], true);
    assert_eq!(meta["fields"], json!(["api_key"]));
    assert_eq!(meta["version"], 1);
    assert!(meta["key_id"].is_string() && meta["updated_at"].is_u64());

    let (status, _, got) = admin.call(Method::GET, path, None).await;
    assert_eq!(status, 200);
    let (_, _, list) = admin
        .call(Method::GET, "/admin/credentials?workspace=ws_7", None)
        .await;
    assert_eq!(list["credentials"].as_array().unwrap().len(), 1);
    for body in [&meta, &got, &list] {
        let text = body.to_string();
        assert!(
            !text.contains(CANARY) && !text.contains("CANARY"),
            "a value leaked: {text}"
        );
    }

    let (status, _) = through_gateway(&gw, env.url("other.saas.test", "/"), "narrow", "ws_7").await;
    assert_eq!(status, 200);
    assert_eq!(env.upstream.requests()[0].header("x-api-key"), Some(CANARY));

    let (status, _, _) = admin.call(Method::DELETE, path, None).await;
    assert_eq!(status, 200);
    let (status, code, _) = admin.call(Method::GET, path, None).await;
    assert_eq!((status, code.as_deref()), (404, Some("not_found")));
    let (status, code) =
        through_gateway(&gw, env.url("other.saas.test", "/"), "narrow", "ws_7").await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("credential_not_configured"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credential_writes_are_refused_and_echo_no_value() {
    let env = Env::new().await;
    let gw = env.start().await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    let cases = [
        (
            "/admin/workspaces/ws_7/credentials/narrow",
            json!({ "fields": { "nope": CANARY } }),
            400,
        ),
        (
            "/admin/workspaces/ws_7/credentials/narrow",
            json!({ "fields": {} }),
            400,
        ),
        (
            "/admin/workspaces/ws_7/credentials/narrow",
            json!({ "fields": { "api_key": format!("{CANARY}\r\nX-Evil: 1") } }),
            400,
        ),
        (
            "/admin/workspaces/ws_7/credentials/narrow",
            json!({ "fields": { "api_key": format!("{CANARY}\u{0}") } }),
            400,
        ),
        (
            "/admin/workspaces/ws_7/credentials/narrow",
            json!({ "colour": CANARY }),
            400,
        ),
        (
            "/admin/workspaces/ws_nope/credentials/narrow",
            json!({ "fields": { "api_key": CANARY } }),
            404,
        ),
        (
            "/admin/workspaces/ws_7/credentials/nope",
            json!({ "fields": { "api_key": CANARY } }),
            404,
        ),
        (
            "/admin/workspaces/ws_7/credentials/saas",
            json!({ "fields": { "api_key": CANARY } }),
            400,
        ),
    ];
    for (path, body, status) in cases {
        let (got, _, resp) = admin.call(Method::PUT, path, Some(body.clone())).await;
        assert_eq!(got, status, "{path} {body}: {resp}");
        assert!(!resp.to_string().contains(CANARY), "{resp}");
    }
    // A value that does not fit its field's declared type: refused, the field named by its
    // label, the value not echoed.
    let (got, _, resp) = admin
        .call(
            Method::PUT,
            "/admin/workspaces/ws_7/credentials/narrow",
            Some(
                json!({ "fields": { "api_key": "k", "instance_url": format!("{CANARY} no url") } }),
            ),
        )
        .await;
    assert_eq!(got, 400, "{resp}");
    let message = resp["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("Instance URL") && message.contains("URL"),
        "{resp}"
    );
    assert!(!resp.to_string().contains(CANARY), "{resp}");
    let (_, _, list) = admin.call(Method::GET, "/admin/credentials", None).await;
    assert_eq!(list["credentials"], json!([]), "nothing was stored");
    // Opting out needs no fields.
    let (status, _, meta) = admin
        .call(
            Method::PUT,
            "/admin/workspaces/ws_7/credentials/narrow",
            Some(json!({ "enabled": false })),
        )
        .await;
    assert_eq!((status, meta["enabled"].clone()), (200, json!(false)));
    let (status, code) =
        through_gateway(&gw, env.url("other.saas.test", "/"), "narrow", "ws_7").await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("workspace_opted_out"))
    );
}

/// Bodies that do not deserialize: the message names the field and the problem; serde's own
/// text (`invalid type: string "api_key=…"`) would quote the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_errors_name_the_field_never_the_value() {
    let env = Env::new().await;
    let gw = env.start().await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    let cred = "/admin/workspaces/ws_7/credentials/narrow";
    let cases = [
        (
            cred,
            Method::PUT,
            format!(r#"{{"fields": "api_key={CANARY}"}}"#),
            "wrong type, expected a map at `fields`",
        ),
        (
            cred,
            Method::PUT,
            format!(r#"{{"fields": {{"api_key": ["{CANARY}"]}}}}"#),
            "wrong type, expected a string at `fields.api_key`",
        ),
        (
            cred,
            Method::PUT,
            format!(r#"{{"enabled": "{CANARY}"}}"#),
            "wrong type, expected a boolean at `enabled`",
        ),
        (
            cred,
            Method::PUT,
            format!(r#"{{"fields": {{"{CANARY}": 1}}}}"#),
            "wrong type, expected a string at `fields.<name>`",
        ),
        (
            cred,
            Method::PUT,
            format!(r#"{{"fields": {{"api_key": "{CANARY}"}}, "{CANARY}": 1}}"#),
            "unknown field, expected `enabled` or `fields`",
        ),
        (
            cred,
            Method::PUT,
            format!(r#"{{"fields": {{"api_key": "{CANARY}"}}"#),
            "not valid JSON at line 1 column",
        ),
        (
            cred,
            Method::PUT,
            format!(r#"{{"fields": {{"api_key": "{CANARY}"}}}} {CANARY}"#),
            "not valid JSON at line 1 column",
        ),
        (
            "/admin/connector",
            Method::POST,
            format!(
                r#"{{"connector_id": "c1", "display_name": "C", "auth_type": "none", "allowed_domains": ["api.saas.test"], "allowed_ports": ["{CANARY}"]}}"#
            ),
            "at `allowed_ports[0]`",
        ),
        (
            "/admin/orgs/o1",
            Method::PUT,
            format!(r#"{{"allowed_domains": "{CANARY}"}}"#),
            "at `allowed_domains`",
        ),
    ];
    for (path, method, body, expected) in cases {
        let (status, code, text) = admin.call_raw(method, path, &body).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert_eq!(code.as_deref(), Some("invalid_request"), "{body}");
        assert!(
            !text.contains(CANARY),
            "{body}: the value came back: {text}"
        );
        assert!(text.contains(expected), "{body}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connectors_orgs_and_workspaces_through_the_api() {
    let env = Env::new().await;
    let gw = env.start().await;
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    let port = env.upstream.port();

    // The spec's shape, plus sluice's port and injection keys.
    let connector = json!({
        "connector_id": "crm",
        "display_name": "CRM",
        "auth_type": "api_key",
        "auth_schema": { "fields": [{ "name": "api_key", "label": "API Key", "type": "password", "required": true }] },
        "actions": [{ "action_id": "create-contact", "http_method": "POST", "url_template": "https://api.saas.test/v1/contacts", "body_schema": [{ "name": "Email", "label": "Email" }] }],
        "allowed_domains": ["*.saas.test"],
        "allowed_ports": [port],
        "enabled": true,
        "inject": { "header": "X-CRM-Key" }
    });
    let (status, _, created) = admin
        .call(Method::POST, "/admin/connector", Some(connector.clone()))
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["source"], "api");
    let (status, code, _) = admin
        .call(Method::POST, "/admin/connector", Some(connector.clone()))
        .await;
    assert_eq!((status, code.as_deref()), (409, Some("exists")));

    // A new org with an allowlist, and a workspace in it.
    let (status, _, _) = admin
        .call(
            Method::PUT,
            "/admin/orgs/initech",
            Some(json!({ "allowed_domains": ["api.saas.test"] })),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = admin
        .call(
            Method::PUT,
            "/admin/workspaces/ws_new",
            Some(json!({ "org": "initech" })),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, _) = admin
        .call(
            Method::PUT,
            "/admin/workspaces/ws_new/credentials/crm",
            Some(json!({ "fields": { "api_key": CANARY } })),
        )
        .await;
    assert_eq!(status, 200);

    let (status, _) = through_gateway(
        &gw,
        env.url("api.saas.test", "/v1/contacts"),
        "crm",
        "ws_new",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(env.upstream.requests()[0].header("x-crm-key"), Some(CANARY));
    let (status, code) =
        through_gateway(&gw, env.url("other.saas.test", "/"), "crm", "ws_new").await;
    assert_eq!(
        (status, code.as_deref()),
        (403, Some("org_domain_not_allowed")),
        "the API-made org allowlist applies"
    );

    // TOML entries are read-only; invalid changes are refused whole and change nothing.
    let (status, code, _) = admin
        .call(Method::DELETE, "/admin/connectors/saas", None)
        .await;
    assert_eq!((status, code.as_deref()), (409, Some("read_only")));
    let (status, code, _) = admin
        .call(
            Method::PUT,
            "/admin/orgs/acme",
            Some(json!({ "allowed_domains": null })),
        )
        .await;
    assert_eq!((status, code.as_deref()), (409, Some("read_only")));
    let mut bad = connector.clone();
    bad["allowed_domains"] = json!(["*"]);
    let (status, _, err) = admin
        .call(Method::PUT, "/admin/connectors/crm", Some(bad))
        .await;
    assert_eq!(status, 400);
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("allowed_domains[0]"),
        "{err}"
    );
    let (status, _, err) = admin
        .call(Method::DELETE, "/admin/orgs/initech", None)
        .await;
    assert_eq!(status, 400, "ws_new still belongs to initech: {err}");
    let (status, _) = through_gateway(&gw, env.url("api.saas.test", "/"), "crm", "ws_new").await;
    assert_eq!(
        status, 200,
        "the refused changes left the live config alone"
    );

    let (_, _, list) = admin.call(Method::GET, "/admin/connectors", None).await;
    let ids: Vec<&str> = list["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["connector_id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"crm") && ids.contains(&"saas"), "{ids:?}");

    let (status, _, _) = admin
        .call(Method::DELETE, "/admin/connectors/crm", None)
        .await;
    assert_eq!(status, 200);
    let (status, code) = through_gateway(&gw, env.url("api.saas.test", "/"), "crm", "ws_new").await;
    assert_eq!((status, code.as_deref()), (403, Some("unknown_connector")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_persist_across_restarts_and_reach_other_replicas() {
    let env = Env::new().await;
    let redis = RedisServer::start().await;
    let a = env.start_on_redis(&redis.url(), "").await;
    let b = env.start_on_redis(&redis.url(), "").await;
    redis.wait_for_subscribers(2).await;
    let port = env.upstream.port();
    let admin = Admin::new(&a, Some(ADMIN_TOKEN));
    let (status, _, body) = admin
        .call(
            Method::PUT,
            "/admin/workspaces/ws_api",
            Some(json!({ "org": "open" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = admin
        .call(
            Method::POST,
            "/admin/connector",
            Some(json!({
                "connector_id": "open_api", "display_name": "Open", "auth_type": "none",
                "allowed_domains": ["api.saas.test"], "allowed_ports": [port], "enabled": true
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");

    // Replica b learns of it through pub/sub.
    let changed = Instant::now();
    loop {
        let (status, _) =
            through_gateway(&b, env.url("api.saas.test", "/"), "open_api", "ws_api").await;
        if status == 200 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "replica b never saw the new connector"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A fresh instance loads it from the store at startup.
    drop(a);
    let c = env.start_on_redis(&redis.url(), "").await;
    let (status, _) =
        through_gateway(&c, env.url("api.saas.test", "/"), "open_api", "ws_api").await;
    assert_eq!(status, 200);
    let (_, _, got) = Admin::new(&c, Some(ADMIN_TOKEN))
        .call(Method::GET, "/admin/workspaces/ws_api", None)
        .await;
    assert_eq!(got["org"], "open");
    assert_eq!(got["source"], "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_lists_rotates_and_deletes_without_secrets_in_argv() {
    let env = Env::new().await;
    let gw = env.start().await;
    let base = format!("http://{}", gw.admin_addr.unwrap());
    let run = move |args: Vec<&'static str>, stdin: Option<String>| {
        let base = base.clone();
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(SLUICE)
                .arg("credentials")
                .args(["--admin", &base])
                .args(args)
                .env("SLUICE_ADMIN_TOKEN", ADMIN_TOKEN)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut input = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                input.write_all(s.as_bytes()).unwrap();
            }
            drop(input);
            child.wait_with_output().unwrap()
        })
    };

    let out = run(
        vec!["set", "--workspace", "ws_7", "--connector", "narrow"],
        Some(format!("api_key={CANARY}\n")),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("\"version\": 1") && !stdout.contains(CANARY),
        "{stdout}"
    );

    let (status, _) = through_gateway(&gw, env.url("other.saas.test", "/"), "narrow", "ws_7").await;
    assert_eq!(status, 200);
    assert_eq!(env.upstream.requests()[0].header("x-api-key"), Some(CANARY));

    let out = run(vec!["list"], None).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"narrow\"") && !stdout.contains(CANARY),
        "{stdout}"
    );

    let out = run(vec!["rotate-key"], None).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("\"already_current\": 1"),
        "{stdout}"
    );

    let out = run(
        vec!["delete", "--workspace", "ws_7", "--connector", "narrow"],
        None,
    )
    .await
    .unwrap();
    assert!(out.status.success());
    let out = run(
        vec!["delete", "--workspace", "ws_7", "--connector", "narrow"],
        None,
    )
    .await
    .unwrap();
    assert!(!out.status.success(), "a second delete reports not found");
}

#[test]
fn keygen_adds_a_new_active_key_and_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.keys");
    let keygen = |id: &str| {
        Command::new(SLUICE)
            .args(["keygen", "--id", id, "--out"])
            .arg(&path)
            .output()
            .unwrap()
    };
    assert!(keygen("k1").status.success());
    assert!(keygen("k2").status.success());
    assert!(!keygen("k2").status.success(), "ids are unique");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let ring = sluice::credential::crypto::Keyring::parse(&text).unwrap();
    assert_eq!(ring.active_id(), "k2");
    assert!(ring.has_key("k1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_is_valid_and_covers_every_route() {
    let env = Env::new().await;
    let gw = env.start().await;
    let (status, _, doc) = Admin::new(&gw, Some(ADMIN_TOKEN))
        .call(Method::GET, "/admin/openapi.json", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/admin/credentials", "get"),
        (
            "/admin/workspaces/{workspace}/credentials/{connector}",
            "get",
        ),
        (
            "/admin/workspaces/{workspace}/credentials/{connector}",
            "put",
        ),
        (
            "/admin/workspaces/{workspace}/credentials/{connector}",
            "delete",
        ),
        ("/admin/keys/rotate", "post"),
        ("/admin/connector", "post"),
        ("/admin/connectors", "get"),
        ("/admin/connectors/{connector}", "get"),
        ("/admin/connectors/{connector}", "put"),
        ("/admin/connectors/{connector}", "delete"),
        ("/admin/orgs", "get"),
        ("/admin/orgs/{org}", "put"),
        ("/admin/orgs/{org}", "delete"),
        ("/admin/workspaces", "get"),
        ("/admin/workspaces/{workspace}", "put"),
        ("/admin/workspaces/{workspace}", "delete"),
        ("/admin/openapi.json", "get"),
        ("/admin/oauth/start", "get"),
        ("/oauth/callback", "get"),
        (
            "/admin/workspaces/{workspace}/oauth/{connector}/connect",
            "post",
        ),
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
    }
    // A real validator from PyPI (tests/run.sh installs it).
    let text = doc.to_string();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new("python3")
            .args(["-c", "import json,sys; from openapi_spec_validator import validate; validate(json.load(sys.stdin))"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
