//! Test harness: real parts on ephemeral loopback ports.
//!
//! * [`TestCa`]: a CA made at test time with rcgen, issuing server certificates.
//! * [`Upstream`]: a real TLS HTTP/1.1 server playing the SaaS API. It counts accepted TCP
//!   connections and records every request exactly as received.
//! * [`Env`]: one CA, one upstream, and sluice itself started in-process on `127.0.0.1:0` with a
//!   config that routes `*.saas.test` to the upstream through the static DNS map.
//!
//! `Env::new().await.start().await` reads like what it does.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used)]
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sluice::config::Snapshot;
use sluice::server::{Running, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// The caller token the default config accepts for caller `app` (scoped to ws_42 and ws_7).
pub const APP_TOKEN: &str = "slc_test-app-token-0123456789abcdef";
/// The admin API's token in the default config.
pub const ADMIN_TOKEN: &str = "slc_test-admin-token-5555aaaa";
/// A token for caller `ops`, allowed every workspace.
pub const OPS_TOKEN: &str = "slc_test-ops-token-fedcba9876543210";

pub fn sha256_hex(s: &str) -> String {
    hex::encode(sluice::caller::token_hash(s.as_bytes()))
}

pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names`, signed by this CA.
    pub fn issue(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A certificate for `names` as PEM files in `dir` (`<stem>.pem`, `<stem>.key`): what an
    /// operator hands sluice as a client certificate.
    pub fn issue_files(
        &self,
        names: &[&str],
        dir: &std::path::Path,
        stem: &str,
    ) -> (PathBuf, PathBuf, Vec<u8>) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path, cert.der().to_vec())
    }

    /// The CA as a rustls trust store (for an upstream that verifies client certificates).
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        roots
    }
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The request target exactly as on the request line.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub sni: Option<String>,
    /// The client certificate sluice presented (DER), when the upstream asked for one.
    pub client_cert: Option<Vec<u8>>,
    /// The TLS version negotiated, as rustls names it (`TLSv1_3`).
    pub tls_version: Option<String>,
}

/// What the upstream knows of a connection, recorded with each request on it.
#[derive(Debug, Clone)]
struct ConnInfo {
    sni: Option<String>,
    client_cert: Option<Vec<u8>>,
    tls_version: Option<String>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn has_header(&self, name: &str) -> bool {
        self.header(name).is_some()
    }
}

/// The OAuth provider the upstream also plays (`/oauth/token`, `/oauth/revoke`), and the rule
/// its protected API (`/api/…`) applies: only the last access token issued is accepted.
#[derive(Default)]
pub struct OAuthMock {
    /// Token endpoint calls, all grants.
    pub token_calls: usize,
    /// `grant_type` of each call.
    pub grants: Vec<String>,
    /// How each call authenticated the client: "basic", "post" or "none".
    pub client_auth: Vec<String>,
    /// Tokens issued so far (access tokens are `at-N`, refresh tokens `rt-N`).
    pub issued: usize,
    /// `expires_in` of the next responses; `None` omits it.
    pub expires_in: Option<u64>,
    /// Issue a new refresh token on each refresh, and refuse the old one afterwards.
    pub rotate_refresh: bool,
    /// The refresh token the provider accepts (`None`: any).
    pub valid_refresh: Option<String>,
    /// The access token the API accepts.
    pub valid_access: Option<String>,
    /// Scripted answers for the next calls: (status, OAuth error code).
    pub fail_next: std::collections::VecDeque<(u16, &'static str)>,
    /// Latency of the token endpoint.
    pub delay: Duration,
    /// The authorization code and PKCE challenge a code exchange must match.
    pub expected_code: Option<String>,
    pub expected_challenge: Option<String>,
    /// The client secret the provider expects.
    pub client_secret: String,
    /// Revocation requests: (token, token_type_hint).
    pub revoked: Vec<(String, String)>,
    /// Extra parameters seen on token calls (e.g. audience).
    pub params: Vec<(String, String)>,
    /// The API refuses every token, even freshly issued ones.
    pub reject_all_tokens: bool,
    /// Prefix of every token issued (a canary, in the log test).
    pub token_prefix: String,
}

/// A TLS upstream playing the SaaS API.
pub struct Upstream {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    pub oauth: Arc<Mutex<OAuthMock>>,
}

impl Upstream {
    pub async fn start(ca: &TestCa, names: &[&str]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (certs, key) = ca.issue(names);
        let config = ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::start_with_config(config).await
    }

    /// An upstream with its own TLS settings (client certificates, versions).
    pub async fn start_with_config(config: ServerConfig) -> Self {
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let oauth = Arc::new(Mutex::new(OAuthMock::default()));
        let (conns, reqs, mock) = (connections.clone(), requests.clone(), oauth.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let reqs = reqs.clone();
                let mock = mock.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let session = tls.get_ref().1;
                    let sni = session.server_name().map(str::to_string);
                    let client_cert = session
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec());
                    let tls_version = session.protocol_version().map(|v| format!("{v:?}"));
                    let conn = ConnInfo {
                        sni,
                        client_cert,
                        tls_version,
                    };
                    let service = service_fn(move |req| {
                        let reqs = reqs.clone();
                        let conn = conn.clone();
                        let mock = mock.clone();
                        async move { Ok::<_, Infallible>(respond(req, conn, reqs, mock).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            connections,
            requests,
            oauth,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

/// The scripted API: `/redirect` answers 302, `/forge` tries to forge sluice's error header,
/// everything else answers 200 with a small JSON body.
async fn respond(
    req: Request<Incoming>,
    conn: ConnInfo,
    reqs: Arc<Mutex<Vec<Recorded>>>,
    mock: Arc<Mutex<OAuthMock>>,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let target = req.uri().to_string();
    let path = req.uri().path().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let recorded = Recorded {
        method,
        target,
        headers,
        body,
        sni: conn.sni,
        client_cert: conn.client_cert,
        tls_version: conn.tls_version,
    };
    let seen_before = {
        let mut all = reqs.lock().unwrap();
        let n = all.iter().filter(|r| r.target == recorded.target).count();
        all.push(recorded.clone());
        n
    };
    // `/flaky/<n>/…`: 503 for the first n requests to this exact target, then 200.
    // `/status/<code>`: always that status.
    let mut parts = path.trim_start_matches('/').split('/');
    match (
        parts.next(),
        parts.next().and_then(|n| n.parse::<u16>().ok()),
    ) {
        (Some("flaky"), Some(n)) if seen_before < n as usize => {
            return Response::builder()
                .status(503)
                .body(Full::new(Bytes::from_static(b"{\"flaky\":true}")))
                .unwrap();
        }
        (Some("status"), Some(code)) => {
            return Response::builder()
                .status(code)
                .body(Full::new(Bytes::new()))
                .unwrap();
        }
        // `/delay/<ms>`: answer 200 after that long (a slow API).
        (Some("delay"), Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
        }
        _ => {}
    }
    let builder = Response::builder().header("content-type", "application/json");
    if path == "/oauth/token" {
        let delay = mock.lock().unwrap().delay;
        tokio::time::sleep(delay).await;
        let (status, body) = token_endpoint(&mut mock.lock().unwrap(), &recorded);
        return builder
            .status(status)
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
    }
    if path == "/oauth/revoke" {
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(&recorded.body)
                .into_owned()
                .collect();
        mock.lock().unwrap().revoked.push((
            form.get("token").cloned().unwrap_or_default(),
            form.get("token_type_hint").cloned().unwrap_or_default(),
        ));
        return builder.status(200).body(Full::new(Bytes::new())).unwrap();
    }
    if path.starts_with("/api/") {
        let (valid, reject_all) = {
            let m = mock.lock().unwrap();
            (m.valid_access.clone(), m.reject_all_tokens)
        };
        let presented = recorded
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "));
        if reject_all || valid.is_none() || presented != valid.as_deref() {
            return builder
                .status(401)
                .header("www-authenticate", "Bearer error=\"invalid_token\"")
                .body(Full::new(Bytes::from_static(
                    b"{\"error\":\"invalid_token\"}",
                )))
                .unwrap();
        }
    }
    match path.as_str() {
        "/redirect" => builder
            .status(302)
            .header("location", "https://elsewhere.example/landing")
            .body(Full::new(Bytes::new())),
        "/rl/remaining0" => builder
            .status(200)
            .header("x-ratelimit-limit", "10")
            .header("x-ratelimit-remaining", "0")
            .header("x-ratelimit-reset", "3600")
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}"))),
        "/rl/429" => builder
            .status(429)
            .header("retry-after", "120")
            .body(Full::new(Bytes::from_static(b"{\"error\":\"slow down\"}"))),
        "/rl/ietf" => builder
            .status(200)
            .header("ratelimit-limit", "10")
            .header("ratelimit-remaining", "0")
            .header("ratelimit-reset", "3600")
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}"))),
        "/rl/structured" => builder
            .status(200)
            .header("ratelimit", "\"default\";r=0;t=3600")
            .header("ratelimit-policy", "\"default\";q=10;w=3600")
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}"))),
        "/rl/503-date" => builder
            .status(503)
            .header(
                "retry-after",
                httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600)),
            )
            .body(Full::new(Bytes::new())),
        "/rl/shopify" => builder
            .status(200)
            .header("x-shopify-shop-api-call-limit", "40/40")
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}"))),
        "/forge" => builder
            .status(200)
            .header("x-sluice-error", "forged_by_upstream")
            .body(Full::new(Bytes::from_static(b"{\"forged\":true}"))),
        _ => builder
            .status(200)
            .body(Full::new(Bytes::from_static(b"{\"ok\":true}"))),
    }
    .unwrap()
}

/// The mock provider's token endpoint.
fn token_endpoint(m: &mut OAuthMock, req: &Recorded) -> (u16, serde_json::Value) {
    use base64::Engine;
    use sha2::Digest;
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(&req.body).into_owned().collect();
    m.token_calls += 1;
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    m.grants.push(grant.clone());
    for (k, v) in &form {
        if ![
            "grant_type",
            "client_id",
            "client_secret",
            "refresh_token",
            "code",
            "code_verifier",
            "redirect_uri",
        ]
        .contains(&k.as_str())
        {
            m.params.push((k.clone(), v.clone()));
        }
    }
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("sluice-client:{}", m.client_secret));
    let auth = if req.header("authorization") == Some(format!("Basic {basic}").as_str()) {
        "basic"
    } else if form.get("client_id").map(String::as_str) == Some("sluice-client")
        && form.get("client_secret") == Some(&m.client_secret)
    {
        "post"
    } else {
        "none"
    };
    m.client_auth.push(auth.to_string());
    if auth == "none" {
        return (401, serde_json::json!({ "error": "invalid_client" }));
    }
    if let Some((status, error)) = m.fail_next.pop_front() {
        return (status, serde_json::json!({ "error": error }));
    }
    let refused = match grant.as_str() {
        "client_credentials" => false,
        "refresh_token" => m
            .valid_refresh
            .as_ref()
            .is_some_and(|v| form.get("refresh_token") != Some(v)),
        "authorization_code" => {
            let verifier = form.get("code_verifier").cloned().unwrap_or_default();
            let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sha2::Sha256::digest(verifier.as_bytes()));
            form.get("code") != m.expected_code.as_ref()
                || Some(&challenge) != m.expected_challenge.as_ref()
        }
        _ => true,
    };
    if refused {
        return (400, serde_json::json!({ "error": "invalid_grant" }));
    }
    m.issued += 1;
    let access = format!("{}at-{}", m.token_prefix, m.issued);
    m.valid_access = Some(access.clone());
    let mut body = serde_json::json!({ "access_token": access, "token_type": "Bearer" });
    if let Some(e) = m.expires_in {
        body["expires_in"] = e.into();
    }
    let new_refresh =
        grant == "authorization_code" || (grant == "refresh_token" && m.rotate_refresh);
    if new_refresh {
        let refresh = format!("{}rt-{}", m.token_prefix, m.issued);
        body["refresh_token"] = refresh.clone().into();
        m.valid_refresh = Some(refresh);
    }
    (200, body)
}

/// Everything one test needs.
pub struct Env {
    pub ca: TestCa,
    pub upstream: Upstream,
    pub dir: tempfile::TempDir,
    pub ca_file: PathBuf,
}

impl Env {
    pub async fn new() -> Self {
        // Logs go to the test's captured output; SLUICE_LOG=debug shows pingora's too.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .try_init();
        let ca = TestCa::new("sluice test CA");
        let upstream =
            Upstream::start(&ca, &["api.saas.test", "other.saas.test", "auth.saas.test"]).await;
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        Self {
            ca,
            upstream,
            dir,
            ca_file,
        }
    }

    /// The default config: `gateway_port` is where sluice will listen, `extra` is appended.
    pub fn config(&self, gateway_port: u16, listener_extra: &str, extra: &str) -> String {
        self.config_with_store(gateway_port, listener_extra, extra, None)
    }

    /// The default config, with the credential store on Redis when `redis_url` is given.
    pub fn config_with_store(
        &self,
        gateway_port: u16,
        listener_extra: &str,
        extra: &str,
        redis_url: Option<&str>,
    ) -> String {
        let port = self.upstream.port();
        let dir = self.dir.path().display();
        let store = match redis_url {
            Some(url) => format!("store = \"redis\"\nredis_url = \"{url}\""),
            None => format!("store = \"embedded\"\npath = \"{dir}/store-{gateway_port}.redb\""),
        };
        format!(
            r#"
[listener]
address = "127.0.0.1:{gateway_port}"
threads = 1
upgrade_sock = "{dir}/upgrade-{gateway_port}.sock"
pid_file = "{dir}/sluice-{gateway_port}.pid"
{listener_extra}

[upstream]
extra_ca_file = "{ca}"
connect_timeout_ms = 2000
read_timeout_ms = 5000

[dns]
static_only = true

[dns.static_hosts]
"api.saas.test" = ["127.0.0.1"]
"other.saas.test" = ["127.0.0.1"]
"wrongname.saas.test" = ["127.0.0.1"]
"self.saas.test" = ["127.0.0.1"]
"private.saas.test" = ["10.1.2.3"]
"metadata.saas.test" = ["169.254.169.254"]
"mixed.saas.test" = ["127.0.0.1", "192.168.1.10"]
"mapped.saas.test" = ["::ffff:10.0.0.1"]
"untrusted.saas.test" = ["127.0.0.1"]
"auth.saas.test" = ["127.0.0.1"]
"privauth.saas.test" = ["10.9.9.9"]

[egress]
exception_cidrs = ["127.0.0.1/32"]

[[connector]]
connector_id = "saas"
display_name = "The SaaS"
auth_type = "none"
allowed_domains = ["*.saas.test"]
allowed_ports = [443, {port}, {gateway_port}]

[[connector]]
connector_id = "narrow"
display_name = "Narrow"
auth_type = "api_key"
allowed_domains = ["other.saas.test"]
allowed_ports = [{port}]

[connector.auth_schema]
fields = [
  {{ name = "api_key", label = "API key", type = "password", required = true }},
  {{ name = "instance_url", label = "Instance URL", type = "url", required = false }},
]

[connector.inject]
header = "X-API-Key"
format = "{{api_key}}"

[[connector]]
connector_id = "off"
display_name = "Switched off"
auth_type = "none"
allowed_domains = ["api.saas.test"]
allowed_ports = [{port}]
enabled = false

[[org]]
org_id = "acme"
allowed_domains = ["api.saas.test", "wrongname.saas.test", "self.saas.test", "*.untrusted.test"]

[[org]]
org_id = "open"

[[workspace]]
workspace_id = "ws_42"
org = "acme"

[[workspace]]
workspace_id = "ws_7"
org = "open"

[[workspace]]
workspace_id = "ws_other"
org = "open"

[[caller]]
name = "app"
token_sha256 = "{app}"
workspaces = ["ws_42", "ws_7"]

[[caller]]
name = "ops"
token_sha256 = "{ops}"
workspaces = ["*"]

[admin]
address = "127.0.0.1:0"
token_sha256 = "{admin}"

[credentials]
{store}
key_file = "{dir}/master.keys"
create_key_file_if_missing = true

{extra}
"#,
            ca = self.ca_file.display(),
            app = sha256_hex(APP_TOKEN),
            ops = sha256_hex(OPS_TOKEN),
            admin = sha256_hex(ADMIN_TOKEN),
        )
    }

    /// Start sluice with the default config plus `extra` (appended) and `listener_extra`
    /// (inside `[listener]`).
    pub async fn start_with(&self, listener_extra: &str, extra: &str) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = self.config(port, listener_extra, extra);
        self.serve_text(listener, "sluice.toml", &text).await
    }

    /// Write `text` to `file` in the test's directory and serve it on `listener`: for a config
    /// the defaults above cannot express.
    pub async fn serve_text(&self, listener: TcpListener, file: &str, text: &str) -> Running {
        let path = self.dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let snapshot = Snapshot::load(&path).unwrap_or_else(|e| panic!("test config: {e}"));
        serve(listener, snapshot).await.unwrap()
    }

    /// Start sluice with its credentials on the given Redis, plus `extra`.
    pub async fn start_on_redis(&self, redis_url: &str, extra: &str) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = self.config_with_store(port, "", extra, Some(redis_url));
        self.serve_text(listener, &format!("sluice-{port}.toml"), &text)
            .await
    }

    pub async fn start(&self) -> Running {
        self.start_with("", "").await
    }

    /// Start sluice with its credentials on a Redis Cluster, plus `extra`; `credentials_extra`
    /// goes inside `[credentials]` (cache settings).
    pub async fn start_on_cluster(
        &self,
        cluster: &RedisCluster,
        credentials_extra: &str,
        extra: &str,
    ) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let marker = "redis://cluster-marker/";
        let nodes: Vec<String> = cluster.nodes().iter().map(|n| format!("{n:?}")).collect();
        let text = self
            .config_with_store(port, "", extra, Some(marker))
            .replace(
                &format!("redis_url = \"{marker}\""),
                &format!(
                    "redis_cluster = [{}]\n{credentials_extra}",
                    nodes.join(", ")
                ),
            );
        self.serve_text(listener, &format!("sluice-{port}.toml"), &text)
            .await
    }

    /// Two OAuth connectors on the mock provider (`cc`: client credentials, `ac`: authorization
    /// code), plus `private_idp`, whose token endpoint resolves to a private address.
    pub fn oauth_connectors(&self, skew_ms: u64, client_secret: &str) -> String {
        let env = self;
        let port = env.upstream.port();
        let secret = env.dir.path().join("client.secret");
        std::fs::write(&secret, client_secret).unwrap();
        env.upstream.oauth.lock().unwrap().client_secret = client_secret.into();
        format!(
            r#"
[[connector]]
connector_id = "cc"
display_name = "Client credentials"
auth_type = "oauth2"
allowed_domains = ["api.saas.test", "auth.saas.test", "privauth.saas.test"]
allowed_ports = [{port}]
[connector.oauth2]
grant = "client_credentials"
token_url = "https://auth.saas.test:{port}/oauth/token"
revocation_url = "https://auth.saas.test:{port}/oauth/revoke"
client_id = "sluice-client"
client_secret_file = "{secret}"
client_auth = "client_secret_post"
scopes = ["read", "write"]
token_params = {{ audience = "https://api.saas.test" }}
refresh_skew_ms = {skew_ms}
default_lifetime_ms = 7200000

[[connector]]
connector_id = "ac"
display_name = "Authorization code"
auth_type = "oauth2"
allowed_domains = ["api.saas.test", "auth.saas.test"]
allowed_ports = [{port}]
[connector.oauth2]
grant = "authorization_code"
authorization_url = "https://auth.saas.test:{port}/oauth/authorize"
token_url = "https://auth.saas.test:{port}/oauth/token"
revocation_url = "https://auth.saas.test:{port}/oauth/revoke"
client_id = "sluice-client"
client_secret_file = "{secret}"
redirect_uri = "http://127.0.0.1:9090/oauth/callback"
refresh_skew_ms = {skew_ms}

[[connector]]
connector_id = "private_idp"
display_name = "Token endpoint on a private address"
auth_type = "oauth2"
allowed_domains = ["api.saas.test", "privauth.saas.test"]
allowed_ports = [{port}]
[connector.oauth2]
grant = "client_credentials"
token_url = "https://privauth.saas.test:{port}/oauth/token"
client_id = "sluice-client"
client_secret_file = "{secret}"
"#,
            secret = secret.display()
        )
    }

    /// `http://<host>:<upstream port><path>`: the URL an app sends through the proxy.
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.upstream.port())
    }
}

/// A reqwest client that uses the gateway as its HTTP proxy, authenticated as `user`.
pub fn client(gateway: &Running, user: Option<(&str, &str)>) -> reqwest::Client {
    let mut proxy = reqwest::Proxy::http(format!("http://{}", gateway.addr)).unwrap();
    if let Some((name, token)) = user {
        proxy = proxy.basic_auth(name, token);
    }
    reqwest::Client::builder()
        .proxy(proxy)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The error code sluice put on a response (`X-Sluice-Error`), if any.
pub fn error_code(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("x-sluice-error")
        .map(|v| v.to_str().unwrap().to_string())
}

/// A parsed raw HTTP response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The `error.code` of sluice's JSON body.
    pub fn code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v["error"]["code"].as_str().map(str::to_string)
    }
}

/// Send raw bytes to the gateway and read the response until the connection closes.
pub async fn raw(gateway: &Running, request: &[u8]) -> RawResponse {
    let mut tcp = TcpStream::connect(gateway.addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if response_complete(&buf) {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "gateway did not answer in time");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// A response with a Content-Length is complete once that many body bytes arrived.
fn response_complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .is_some_and(|n| body.len() >= n)
}

/// Basic credentials for the `Proxy-Authorization` header.
pub fn basic(name: &str, token: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{name}:{token}"))
    )
}

/// A connection to the redis-server at `url` once it answers PING (it may be starting).
async fn connect_when_up(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let pong: Result<String, _> = redis::cmd("PING").query_async(&mut c).await;
            if pong.is_ok() {
                return c;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "redis-server at {url} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real `redis-server` on its own port, for the length of a test. `stop` and `start` let a
/// test take it away and bring it back on the same port.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.resume().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)start on the same port and wait until it answers PING.
    pub async fn resume(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (tests/run.sh installs it)");
        self.child = Some(child);
        connect_when_up(&self.url()).await;
    }

    /// Kill the server (as an outage would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait until `n` sluice replicas subscribe to the invalidation channel, so a test
    /// measures propagation, not startup.
    pub async fn wait_for_subscribers(&self, n: i64) {
        let mut conn = self.connection().await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("sluice:cred:invalidate")
                .query_async(&mut conn)
                .await
                .unwrap();
            if subscribers >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replicas never subscribed"
            );
            tokio::task::yield_now().await;
        }
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Store fields for (workspace, connector) through the gateway's own vault.
pub async fn put_credential(
    gw: &Running,
    workspace: &str,
    connector: &str,
    enabled: bool,
    fields: &[(&str, &str)],
) {
    let mut f = sluice::credential::secret::SecretFields::new();
    for (k, v) in fields {
        f.insert(*k, sluice::credential::secret::Secret::new(*v));
    }
    gw.vault
        .as_ref()
        .expect("the gateway has a vault")
        .put(workspace, connector, enabled, &f)
        .await
        .unwrap();
}

/// A client for the admin API of `gw`, authenticated unless `token` is None.
pub struct Admin {
    pub base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Admin {
    pub fn new(gw: &Running, token: Option<&str>) -> Self {
        Self {
            base: format!(
                "http://{}",
                gw.admin_addr.expect("the gateway runs the admin API")
            ),
            client: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            token: token.map(str::to_string),
        }
    }

    /// `body` sent as it is (not necessarily JSON): (status, error code header, response text)
    pub async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &str,
    ) -> (u16, Option<String>, String) {
        self.send(method, path, Some(body.to_string())).await
    }

    /// (status, error code header, JSON body)
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, Option<String>, serde_json::Value) {
        let (status, code, text) = self.send(method, path, body.map(|b| b.to_string())).await;
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, code, json)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<String>,
    ) -> (u16, Option<String>, String) {
        let mut rb = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let code = resp
            .headers()
            .get("x-sluice-error")
            .map(|v| v.to_str().unwrap().to_string());
        (status, code, resp.text().await.unwrap())
    }
}

/// The value of one series on the gateway's `/metrics` (0 when absent), e.g.
/// `sluice_retries_total{connector="x",reason="connect"}` (labels in alphabetical order).
pub async fn metric(gw: &Running, series: &str) -> u64 {
    let text = metrics_text(gw).await;
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// The whole `/metrics` page.
pub async fn metrics_text(gw: &Running) -> String {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!(
            "http://{}/metrics",
            gw.admin_addr.expect("admin listener")
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One parsed response off a connection that may carry several.
#[derive(Debug)]
pub struct Parsed {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Parsed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v["error"]["code"].as_str().map(str::to_string)
    }
}

/// Split what a connection delivered into responses (each framed by Content-Length, or by the
/// end of the connection when it has none).
pub fn responses(mut bytes: &[u8]) -> Vec<Parsed> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let rest = &bytes[end + 4..];
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length = head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        });
        let n = length.unwrap_or(rest.len()).min(rest.len());
        out.push(Parsed {
            status,
            head,
            body: String::from_utf8_lossy(&rest[..n]).into_owned(),
        });
        bytes = &rest[n..];
    }
    out
}

/// Write `request` (all at once), optionally half-close, and read until the gateway closes.
pub async fn exchange(gw: &Running, request: &[u8], half_close: bool) -> Vec<Parsed> {
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    if half_close {
        tcp.shutdown().await.unwrap();
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the gateway neither answered nor closed");
    responses(&buf)
}

/// A real 3-master Redis Cluster (`redis-server --cluster-enabled yes`, then
/// `redis-cli --cluster create`) on free loopback ports, for the length of a test. Each node
/// keeps its data (append-only file) and its cluster identity (nodes.conf) in its own
/// directory, so `stop` and `resume` are a master's restart, not a new node.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    bus_ports: Vec<u16>,
    dir: tempfile::TempDir,
    children: Vec<Option<std::process::Child>>,
}

impl RedisCluster {
    pub async fn start() -> Self {
        // Hold every listener until all six ports are chosen, so none is chosen twice. The
        // cluster bus port is given explicitly (port + 10000 may not exist).
        let held: Vec<std::net::TcpListener> = (0..6)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(held);
        let mut cluster = Self {
            ports: ports[..3].to_vec(),
            bus_ports: ports[3..].to_vec(),
            dir: tempfile::tempdir().unwrap(),
            children: vec![None, None, None],
        };
        for i in 0..3 {
            cluster.resume(i).await;
        }
        let out = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli is installed (tests/run.sh installs redis-server)");
        assert!(out.status.success(), "cluster create: {out:?}");
        cluster.wait_ok().await;
        cluster
    }

    /// The seed nodes, as `[credentials] redis_cluster` takes them.
    pub fn nodes(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// (Re)start node `i` with its own data and identity, and wait until it answers PING.
    pub async fn resume(&mut self, i: usize) {
        let (port, bus) = (self.ports[i], self.bus_ports[i]);
        let dir = self.dir.path().join(format!("node-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args([
                "--cluster-port",
                &bus.to_string(),
                "--cluster-node-timeout",
                "1000",
            ])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (tests/run.sh installs it)");
        self.children[i] = Some(child);
        let mut conn = self.node(i).await;
        let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        assert_eq!(pong, "PONG");
    }

    /// Kill node `i` (a master's crash).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A plain connection to node `i` (retried while it starts).
    pub async fn node(&self, i: usize) -> redis::aio::MultiplexedConnection {
        connect_when_up(&format!("redis://127.0.0.1:{}/", self.ports[i])).await
    }

    /// Wait until every running node says `cluster_state:ok` and knows all three masters.
    pub async fn wait_ok(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut ok = true;
            for i in (0..3).filter(|&i| self.children[i].is_some()) {
                let mut conn = self.node(i).await;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                ok &= info.contains("cluster_state:ok") && info.contains("cluster_size:3");
            }
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the cluster never became ok"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Which node holds `key`'s slot now.
    pub async fn owner(&self, key: &str) -> usize {
        for i in (0..3).filter(|&i| self.children[i].is_some()) {
            let mut conn = self.node(i).await;
            let slot = keyslot(&mut conn, key).await;
            // Slot ranges start at the ninth field of the node's own line in CLUSTER NODES.
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await
                .unwrap();
            let myself = nodes.lines().find(|l| l.contains("myself")).unwrap();
            let owns = myself.split_whitespace().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<i64>(), hi.parse::<i64>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            });
            if owns {
                return i;
            }
        }
        panic!("no running node owns {key}");
    }

    /// Move `key`'s slot, keys included, to another master, as `redis-cli --cluster reshard`
    /// does (IMPORTING/MIGRATING, MIGRATE, then SETSLOT NODE everywhere). Returns the new
    /// owner.
    pub async fn move_slot_of(&self, key: &str) -> usize {
        let from = self.owner(key).await;
        let to = (from + 1) % 3;
        let mut src = self.node(from).await;
        let mut dst = self.node(to).await;
        let slot = keyslot(&mut src, key).await;
        let id = |c: &mut redis::aio::MultiplexedConnection| {
            let mut c = c.clone();
            async move {
                redis::cmd("CLUSTER")
                    .arg("MYID")
                    .query_async::<String>(&mut c)
                    .await
                    .unwrap()
            }
        };
        let (src_id, dst_id) = (id(&mut src).await, id(&mut dst).await);
        let setslot = |state: &'static str, node: String| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(node);
            cmd
        };
        let _: () = setslot("IMPORTING", src_id)
            .query_async(&mut dst)
            .await
            .unwrap();
        let _: () = setslot("MIGRATING", dst_id.clone())
            .query_async(&mut src)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut src)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.ports[to])
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut src)
                .await
                .unwrap();
        }
        for i in 0..3 {
            let mut conn = self.node(i).await;
            let _: () = setslot("NODE", dst_id.clone())
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        to
    }

    /// Subscribers of sluice's invalidation channel, over every running node (PUBSUB NUMSUB
    /// is per node in a cluster).
    pub async fn wait_for_subscribers(&self, n: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut total = 0;
            for i in (0..3).filter(|&i| self.children[i].is_some()) {
                let mut conn = self.node(i).await;
                let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg("sluice:cred:invalidate")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                total += subscribers;
            }
            if total >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "replicas never subscribed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The cluster slot of `key`.
async fn keyslot(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.stop(i);
        }
    }
}
