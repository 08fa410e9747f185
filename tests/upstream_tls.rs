//! Per-connector upstream TLS (`[connector.tls]`): a client certificate for mTLS upstreams, a
//! CA trusted by one connector only, and TLS 1.3 as a connector's minimum. Real rustls
//! upstreams that demand a client certificate, are signed by another CA, or speak only
//! TLS 1.2; the real gateway in between. Each test also checks that pooled connections are
//! never shared between connectors whose TLS differs.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

/// `GET https://api.saas.test:<port>/x` through the gateway for `connector`, as `app`/ws_7:
/// (status, error code).
async fn get(gw: &sluice::server::Running, connector: &str, port: u16) -> (u16, Option<String>) {
    get_path(gw, connector, port, "/x").await
}

async fn get_path(
    gw: &sluice::server::Running,
    connector: &str,
    port: u16,
    path: &str,
) -> (u16, Option<String>) {
    let resp = client(gw, Some(("app", APP_TOKEN)))
        .get(format!("http://api.saas.test:{port}{path}"))
        .header("x-connector", connector)
        .header("x-workspace", "ws_7")
        .send()
        .await
        .unwrap();
    let code = error_code(&resp);
    (resp.status().as_u16(), code)
}

/// An upstream that demands a client certificate from the partner's own CA, and the
/// certificate (PEM files, and the leaf's DER) sluice is to present.
struct Partner {
    upstream: Upstream,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    der: Vec<u8>,
}

impl Partner {
    async fn start(env: &Env, names: &[&str]) -> Self {
        let client_ca = TestCa::new("partner client CA");
        let (cert, key, der) = client_ca.issue_files(&["sluice.example"], env.dir.path(), "client");
        let (server_certs, server_key) = env.ca.issue(names);
        let verifier = WebPkiClientVerifier::builder(Arc::new(client_ca.roots()))
            .build()
            .unwrap();
        let upstream = Upstream::start_with_config(
            ServerConfig::builder()
                .with_client_cert_verifier(verifier)
                .with_single_cert(server_certs, server_key)
                .unwrap(),
        )
        .await;
        Self {
            upstream,
            cert,
            key,
            der,
        }
    }
}

fn connector(id: &str, port: u16, tls: &str) -> String {
    format!(
        r#"
[[connector]]
connector_id = "{id}"
display_name = "{id}"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
[connector.retry]
max_attempts = 1
{tls}
"#
    )
}

#[tokio::test]
async fn a_connector_presents_its_client_certificate_and_only_it_does() {
    let env = Env::new().await;
    let Partner {
        upstream: mtls,
        cert,
        key,
        der,
    } = Partner::start(&env, &["api.saas.test"]).await;
    let port = mtls.port();
    let tls = format!(
        "[connector.tls]\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
        cert.display(),
        key.display()
    );
    let extra = connector("partner", port, &tls) + &connector("plain", port, "");
    let gw = env.start_with("", &extra).await;

    assert_eq!(get(&gw, "partner", port).await.0, 200);
    let seen = mtls.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].client_cert.as_deref(), Some(der.as_slice()));

    // The same address and name without the certificate: refused by the upstream, and the
    // partner's pooled, authenticated connection is not lent to it.
    let (status, _) = get(&gw, "plain", port).await;
    assert_eq!(status, 502);
    assert_eq!(
        mtls.requests().len(),
        1,
        "a request went out without the certificate"
    );

    // The partner's connection is still reused for the partner.
    let before = mtls.connections();
    assert_eq!(get(&gw, "partner", port).await.0, 200);
    assert_eq!(mtls.connections(), before);
}

#[tokio::test]
async fn a_connector_trusts_its_own_ca_and_no_other_connector_does() {
    let env = Env::new().await;
    let private_ca = TestCa::new("partner private CA");
    let ca_file = env.dir.path().join("partner-ca.pem");
    std::fs::write(&ca_file, private_ca.pem()).unwrap();
    let (certs, key) = private_ca.issue(&["api.saas.test"]);
    let upstream = Upstream::start_with_config(
        ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
    .await;
    let port = upstream.port();
    let tls = format!("[connector.tls]\nextra_ca_file = \"{}\"", ca_file.display());
    let extra = connector("partner", port, &tls) + &connector("plain", port, "");
    let gw = env.start_with("", &extra).await;

    assert_eq!(get(&gw, "partner", port).await.0, 200);
    // Verified under the partner's trust only: the pooled connection is not reused here.
    let (status, code) = get(&gw, "plain", port).await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_tls_failed"))
    );
    assert_eq!(upstream.requests().len(), 1);
    // The global extra CA (the test CA) still counts for the partner: the default upstream.
    let own = env.upstream.port();
    let extra = connector("partner", own, &tls);
    let gw2 = env.start_with("", &extra).await;
    assert_eq!(get(&gw2, "partner", own).await.0, 200);
}

#[tokio::test]
async fn a_connector_that_requires_tls_1_3_sends_nothing_over_tls_1_2() {
    let env = Env::new().await;
    let (certs, key) = env.ca.issue(&["api.saas.test"]);
    let old = Upstream::start_with_config(
        ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap(),
    )
    .await;
    let (port, modern) = (old.port(), env.upstream.port());
    let strict = "[connector.tls]\nmin_version = \"1.3\"";
    let extra = connector("lenient", port, "")
        + &connector("strict", port, strict)
        + &connector("strict_modern", modern, strict);
    let gw = env.start_with("", &extra).await;

    assert_eq!(get(&gw, "lenient", port).await.0, 200);
    assert_eq!(old.requests()[0].tls_version.as_deref(), Some("TLSv1_2"));
    let (status, code) = get(&gw, "strict", port).await;
    assert_eq!(
        (status, code.as_deref()),
        (502, Some("upstream_tls_failed"))
    );
    assert_eq!(old.requests().len(), 1, "a request went out over TLS 1.2");

    assert_eq!(get(&gw, "strict_modern", modern).await.0, 200);
    let seen = env.upstream.requests();
    assert_eq!(seen.last().unwrap().tls_version.as_deref(), Some("TLSv1_3"));
}

#[tokio::test]
async fn bad_tls_settings_are_refused_at_load_with_their_key() {
    let env = Env::new().await;
    let other = TestCa::new("other");
    let (cert, _, _) = other.issue_files(&["a.example"], env.dir.path(), "a");
    let (_, wrong_key, _) = other.issue_files(&["b.example"], env.dir.path(), "b");
    let port = env.upstream.port();
    let cases = [
        (
            format!(
                "[connector.tls]\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"",
                cert.display(),
                wrong_key.display()
            ),
            "connector[x].tls.client_cert_file",
        ),
        (
            format!("[connector.tls]\nclient_cert_file = \"{}\"", cert.display()),
            "connector[x].tls.client_key_file",
        ),
        (
            "[connector.tls]\nmin_version = \"1.1\"".to_string(),
            "connector[x].tls.min_version",
        ),
        (
            format!(
                "[connector.tls]\nextra_ca_file = \"{}\"",
                wrong_key.display()
            ),
            "connector[x].tls.extra_ca_file",
        ),
    ];
    for (tls, key) in cases {
        let text = env.config(1, "", &connector("x", port, &tls));
        let path = env.dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let Err(errors) = sluice::config::Snapshot::load(&path) else {
            panic!("{key}: the config loaded");
        };
        let errors = errors.to_string();
        assert!(errors.contains(key), "{key}: {errors}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_connectors_token_calls_present_its_client_certificate_too() {
    let env = Env::new().await;
    // The partner's token endpoint and API both demand the client certificate.
    let Partner {
        upstream: mtls,
        cert,
        key,
        der,
    } = Partner::start(&env, &["api.saas.test", "auth.saas.test"]).await;
    let port = mtls.port();
    let secret = env.dir.path().join("partner.secret");
    std::fs::write(&secret, "partner-client-secret").unwrap();
    {
        let mut m = mtls.oauth.lock().unwrap();
        m.client_secret = "partner-client-secret".into();
        m.expires_in = Some(3600);
    }
    let extra = format!(
        r#"
[[connector]]
connector_id = "partner"
display_name = "Partner"
auth_type = "oauth2"
allowed_domains = ["api.saas.test", "auth.saas.test"]
allowed_ports = [{port}]
[connector.oauth2]
grant = "client_credentials"
token_url = "https://auth.saas.test:{port}/oauth/token"
client_id = "sluice-client"
client_secret_file = "{secret}"
client_auth = "client_secret_post"
[connector.tls]
client_cert_file = "{cert}"
client_key_file = "{key}"
min_version = "1.3"
"#,
        secret = secret.display(),
        cert = cert.display(),
        key = key.display()
    );
    let gw = env.start_with("", &extra).await;
    let (status, _, body) = Admin::new(&gw, Some(ADMIN_TOKEN))
        .call(
            reqwest::Method::POST,
            "/admin/workspaces/ws_7/oauth/partner/connect",
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get_path(&gw, "partner", port, "/api/data").await.0, 200);
    let seen = mtls.requests();
    let token_call = seen.iter().find(|r| r.target == "/oauth/token").unwrap();
    assert_eq!(token_call.client_cert.as_deref(), Some(der.as_slice()));
    assert_eq!(token_call.tls_version.as_deref(), Some("TLSv1_3"));
    let api_call = seen.iter().find(|r| r.target == "/api/data").unwrap();
    assert_eq!(api_call.client_cert.as_deref(), Some(der.as_slice()));
    assert_eq!(api_call.header("authorization"), Some("Bearer at-1"));
}
