//! `sluice connector import` on real public OpenAPI documents (tests/fixtures/openapi, from the
//! npm package @readme/oas-examples): the real binary prints a definition that sluice's own
//! config loader and admin API accept, with one action per operation. Then a document pointed
//! at the test upstream is imported, loaded through the admin API, and its action called.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::*;
use reqwest::Method;
use serde_json::Value;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Run the import: (exit ok, stdout, stderr).
fn import(spec: &Path, id: &str, format: &str) -> (bool, String, String) {
    let out = std::process::Command::new(SLUICE)
        .args(["connector", "import"])
        .arg(spec)
        .args(["--id", id, "--format", format])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/openapi")
        .join(name)
}

/// Operations in the document, counted independently of the importer (python's yaml).
fn operations(spec: &Path) -> usize {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import json,sys\ntext=open(sys.argv[1]).read()\ntry:\n import yaml; d=yaml.safe_load(text)\nexcept ImportError:\n d=json.loads(text)\nprint(sum(1 for p in d['paths'].values() for m in p if m in sys.argv[2].split(',')))",
        ])
        .arg(spec)
        .arg(METHODS.join(","))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn real_documents_import_into_definitions_sluice_loads() {
    let dir = tempfile::tempdir().unwrap();
    for (file, auth, domain) in [
        ("readme.yaml", "bearer", "api.readme.com"),
        ("petstore.yaml", "api_key", "petstore.swagger.io"),
        ("security.yaml", "api_key", "httpbin.org"),
        ("petstore-3.0.json", "api_key", "petstore.swagger.io"),
    ] {
        let spec = fixture(file);
        let (ok, toml, notes) = import(&spec, "imported", "toml");
        assert!(ok, "{file}: {notes}");
        // The printed definition, as an operator pastes it into the config file.
        let config = format!(
            "[listener]\naddress = \"127.0.0.1:0\"\n\n[credentials]\nstore = \"embedded\"\npath = \"x.redb\"\nkey_env = \"SLUICE_TEST_KEYS\"\n\n{toml}"
        );
        let path = dir.path().join(format!("{file}.toml"));
        std::fs::write(&path, config).unwrap();
        let snapshot = sluice::config::Snapshot::load(&path)
            .unwrap_or_else(|e| panic!("{file}: the imported definition does not load: {e}"));
        let connector = &snapshot.connectors["imported"];
        assert_eq!(<&str>::from(connector.auth_type), auth, "{file}");
        assert!(
            connector
                .allowed_domains
                .matching(&sluice::names::parse_host(domain).unwrap())
                .is_some(),
            "{file}: {domain} allowed"
        );
        assert_eq!(
            connector.actions.len(),
            operations(&spec),
            "{file}: one action per operation"
        );
        for action in &connector.actions {
            assert!(
                action
                    .url_template
                    .as_str()
                    .starts_with(&format!("https://{domain}/")),
                "{file}: {}",
                action.url_template.as_str()
            );
        }
    }
}

#[test]
fn the_readme_api_becomes_its_actions() {
    let (ok, json, _) = import(&fixture("readme.yaml"), "readme", "json");
    assert!(ok);
    let def: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(def["display_name"], "ReadMe API");
    assert_eq!(def["auth_type"], "bearer");
    assert_eq!(
        def["allowed_domains"],
        serde_json::json!(["api.readme.com"])
    );
    let action = def["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["action_id"] == "createAPIKey")
        .unwrap();
    assert_eq!(action["http_method"], "POST");
    assert_eq!(
        action["url_template"],
        "https://api.readme.com/v2/projects/{subdomain}/apikeys"
    );
    // A body method's optional inputs are its JSON body fields.
    assert!(
        !action["body_schema"].as_array().unwrap().is_empty(),
        "{action}"
    );
}

#[test]
fn bad_documents_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let swagger = dir.path().join("swagger.yaml");
    std::fs::write(&swagger, "swagger: '2.0'\ninfo: {title: old}\npaths: {}\n").unwrap();
    let (ok, out, err) = import(&swagger, "old", "toml");
    assert!(!ok && out.is_empty());
    assert!(err.contains("Swagger 2.0"), "{err}");
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, "openapi: [").unwrap();
    let (ok, _, err) = import(&broken, "x", "toml");
    assert!(!ok && err.contains("not valid YAML"), "{err}");
    let (ok, _, err) = import(&fixture("readme.yaml"), "not an id", "toml");
    assert!(!ok && err.contains("identifier"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_action_is_loaded_through_the_admin_api_and_called() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    let spec = env.dir.path().join("notes.yaml");
    std::fs::write(
        &spec,
        format!(
            r#"
openapi: 3.1.0
info: {{ title: Notes }}
servers: [ {{ url: "https://api.saas.test:{port}/v1" }} ]
security: [ {{ key: [] }} ]
paths:
  /notebooks/{{notebook}}/notes:
    post:
      operationId: createNote
      parameters: [ {{ name: notebook, in: path, required: true, schema: {{ type: string }} }} ]
      requestBody:
        required: true
        content:
          application/json:
            schema:
              type: object
              required: [text]
              properties: {{ text: {{ type: string }}, pinned: {{ type: boolean }} }}
components:
  securitySchemes:
    key: {{ type: apiKey, in: header, name: X-Notes-Key }}
"#
        ),
    )
    .unwrap();
    let (ok, json, notes) = import(&spec, "notes", "json");
    assert!(ok, "{notes}");
    let admin = Admin::new(&gw, Some(ADMIN_TOKEN));
    let definition: Value = serde_json::from_str(&json).unwrap();
    let (status, _, body) = admin
        .call(Method::POST, "/admin/connector", Some(definition))
        .await;
    assert_eq!(status, 201, "{body}");
    put_credential(&gw, "ws_7", "notes", true, &[("api_key", "notes-key-1")]).await;

    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = |body: &'static str| {
        client
            .post(format!("http://{}/v1/actions/notes/createNote", gw.addr))
            .header("authorization", format!("Bearer {APP_TOKEN}"))
            .header("x-workspace", "ws_7")
            .body(body)
            .send()
    };
    let resp = call(r#"{"notebook": "inbox", "text": "hello"}"#)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let seen = env.upstream.requests().pop().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("POST", "/v1/notebooks/inbox/notes")
    );
    assert_eq!(seen.header("x-notes-key"), Some("notes-key-1"));
    assert_eq!(
        serde_json::from_slice::<Value>(&seen.body).unwrap(),
        serde_json::json!({"text": "hello"})
    );
    // The schema's required field is enforced.
    let resp = call(r#"{"notebook": "inbox", "pinned": true}"#)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
}
