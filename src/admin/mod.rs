//! The admin API: its own listener (loopback by default), one bearer token stored as a SHA-256.
//! Documented in `src/admin/openapi.json` (OpenAPI 3.1, also served at `GET /admin/openapi.json`); the `sluice credentials …` commands are a
//! client of it, so a running sluice is the only writer of its store and every change
//! invalidates the caches it should.
//!
//! Secret values go in (PUT) and never come out: reads return metadata only.

mod definitions;
mod oauth;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::caller::token_hash;
use crate::config::{FieldType, Snapshot};
use crate::credential::oauth::OAuthClient;
use crate::credential::secret::{Secret, SecretFields};
use crate::credential::{Vault, VaultError};
use crate::error::ERROR_HEADER;
use crate::json::parse_json;

pub use crate::config::reload::Reloader;

/// The OpenAPI 3.1 description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Largest request body the admin API reads.
const MAX_BODY: usize = 256 * 1024;

pub struct AdminState {
    pub config: Arc<ArcSwap<Snapshot>>,
    pub vault: Arc<Vault>,
    pub reloader: Arc<Reloader>,
    pub oauth: Arc<OAuthClient>,
    token_sha256: [u8; 32],
    /// Admin writes are serialised: they are rare, and a rebuild must see the previous one.
    write_lock: Mutex<()>,
}

impl AdminState {
    pub fn new(
        config: Arc<ArcSwap<Snapshot>>,
        vault: Arc<Vault>,
        reloader: Arc<Reloader>,
        oauth: Arc<OAuthClient>,
        token_sha256: [u8; 32],
    ) -> Self {
        Self {
            config,
            vault,
            reloader,
            oauth,
            token_sha256,
            write_lock: Mutex::new(()),
        }
    }
}

/// An admin API error: status, stable code, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Store(s) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                s.to_string(),
            ),
            VaultError::Invalid(m) => ApiError::invalid(m),
            VaultError::Unreadable { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "credential_unreadable",
                e.to_string(),
            ),
        }
    }
}

type ApiResult = Result<(StatusCode, serde_json::Value), ApiError>;

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let mut resp = json_response(
        e.status,
        &serde_json::json!({ "error": { "code": e.code, "message": e.message } }),
    );
    if let Ok(v) = header::HeaderValue::from_str(e.code) {
        resp.headers_mut().insert(ERROR_HEADER, v);
    }
    if e.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"sluice-admin\""),
        );
    }
    resp
}

/// Constant-time comparison of two hashes.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &AdminState, req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| same(&token_hash(token.trim().as_bytes()), &state.token_sha256))
}

async fn read_body(req: Request<Incoming>) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            ApiError::invalid(format!("request body unreadable or over {MAX_BODY} bytes"))
        })?;
    Ok(Zeroizing::new(body.to_bytes().to_vec()))
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    parse_json(body).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// `PUT …/credentials/{connector}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialPut {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    fields: BTreeMap<String, Zeroizing<String>>,
}

fn yes() -> bool {
    true
}

/// What a field type asks for, in an error message.
fn field_kind(t: FieldType) -> &'static str {
    match t {
        FieldType::Text | FieldType::Password => "text",
        FieldType::Url => "an http:// or https:// URL",
        FieldType::Email => "an email address",
        FieldType::Number => "a number",
    }
}

async fn put_credential(state: &AdminState, ws: &str, conn: &str, body: &[u8]) -> ApiResult {
    let put: CredentialPut = parse(body)?;
    let snap = state.config.load();
    let connector = snap
        .connectors
        .get(conn)
        .ok_or_else(|| ApiError::not_found(format!("no connector {conn:?}")))?;
    if !snap.workspaces.contains_key(ws) {
        return Err(ApiError::not_found(format!("no workspace {ws:?}")));
    }
    if !connector.injection.needs_credential() {
        return Err(ApiError::invalid(format!(
            "connector {conn:?} has auth_type none: there is nothing to store"
        )));
    }
    let mut fields = SecretFields::new();
    for (name, value) in put.fields {
        let Some(field) = connector.auth_fields.iter().find(|f| f.name == name) else {
            // The unknown name is not echoed: it may be a value typed into the wrong place.
            let known: Vec<&str> = connector
                .auth_fields
                .iter()
                .map(|f| f.name.as_str())
                .collect();
            return Err(ApiError::invalid(format!(
                "a field connector {conn:?} does not define (its fields: {})",
                known.join(", ")
            )));
        };
        // The value is not echoed either: it is a secret.
        if !field.field_type.accepts(&value) {
            return Err(ApiError::invalid(format!(
                "field {name:?} ({}) must be {}",
                field.label,
                field_kind(field.field_type)
            )));
        }
        fields.insert(name, Secret::new(value.as_str()));
    }
    if put.enabled {
        for f in connector.auth_fields.iter().filter(|f| f.required) {
            if fields.get(&f.name).is_none() {
                return Err(ApiError::invalid(format!(
                    "required field {:?} ({}) is missing",
                    f.name, f.label
                )));
            }
        }
    }
    let meta = state.vault.put(ws, conn, put.enabled, &fields).await?;
    info!(target: "sluice::audit", workspace = ws, connector = conn, version = meta.version, "credential written through the admin API");
    Ok((
        StatusCode::OK,
        serde_json::to_value(meta).expect("metadata serialises"),
    ))
}

async fn route(state: &AdminState, req: Request<Incoming>) -> ApiResult {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let writes = !matches!(method, Method::GET | Method::HEAD);
    let body = if writes {
        read_body(req).await?
    } else {
        Zeroizing::new(Vec::new())
    };
    let _guard = if writes {
        Some(state.write_lock.lock().await)
    } else {
        None
    };

    match (&method, segments.as_slice()) {
        (&Method::GET, ["admin", "credentials"]) => {
            let workspace = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("workspace="))
                .map(str::to_string);
            let all = state.vault.list().await?;
            let items: Vec<_> = all
                .into_iter()
                .filter(|m| workspace.as_deref().is_none_or(|w| m.workspace == w))
                .collect();
            Ok((StatusCode::OK, serde_json::json!({ "credentials": items })))
        }
        (_, ["admin", "workspaces", ws, "credentials", conn]) => match method {
            Method::GET => match state.vault.metadata(ws, conn).await? {
                Some(m) => Ok((StatusCode::OK, serde_json::to_value(m).expect("serialises"))),
                None => Err(ApiError::not_found(format!(
                    "no credential for {ws}/{conn}"
                ))),
            },
            Method::PUT => put_credential(state, ws, conn, &body).await,
            Method::DELETE => {
                // OAuth tokens are revoked at the provider (RFC 7009) before the record goes.
                let revoked = oauth::revoke_before_delete(state, ws, conn).await?;
                if state.vault.delete(ws, conn).await? {
                    info!(target: "sluice::audit", workspace = *ws, connector = *conn, ?revoked, "credential deleted through the admin API");
                    let mut body = serde_json::json!({ "deleted": true });
                    if let Some(r) = revoked {
                        body["revoked"] = r.into();
                    }
                    Ok((StatusCode::OK, body))
                } else {
                    Err(ApiError::not_found(format!(
                        "no credential for {ws}/{conn}"
                    )))
                }
            }
            _ => Err(method_not_allowed()),
        },
        (&Method::GET, ["admin", "openapi.json"]) => Ok((
            StatusCode::OK,
            serde_json::from_str(OPENAPI).expect("the bundled OpenAPI document is JSON"),
        )),
        (&Method::POST, ["admin", "workspaces", ws, "oauth", conn, "connect"]) => {
            oauth::connect(state, ws, conn).await
        }
        (&Method::POST, ["admin", "keys", "rotate"]) => {
            let (resealed, current) = state.vault.rotate().await?;
            info!(target: "sluice::audit", resealed, current, active_key = state.vault.keyring().active_id(), "credentials re-sealed to the active key");
            Ok((
                StatusCode::OK,
                serde_json::json!({
                    "active_key": state.vault.keyring().active_id(),
                    "resealed": resealed,
                    "already_current": current,
                }),
            ))
        }
        _ => definitions::route(state, &method, &segments, &body).await,
    }
}

fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
    )
}

async fn handle(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // Probes carry no secret and orchestrators hold no token.
    if req.method() == Method::GET && req.uri().path() == "/healthz" {
        return json_response(StatusCode::OK, &serde_json::json!({ "status": "alive" }));
    }
    if req.method() == Method::GET && req.uri().path() == "/readyz" {
        use crate::credential::StoreHealth;
        let (status, store) = match state.vault.health().await {
            StoreHealth::Reachable => (StatusCode::OK, "reachable"),
            StoreHealth::ServingFromCache => {
                (StatusCode::OK, "unreachable; serving cached credentials")
            }
            StoreHealth::Unreachable => (StatusCode::SERVICE_UNAVAILABLE, "unreachable"),
        };
        let snap = state.config.load();
        return json_response(
            status,
            &serde_json::json!({
                "ready": status == StatusCode::OK,
                "config": snap.source.display().to_string(),
                "credential_store": store,
            }),
        );
    }
    // Metrics carry no secret and scrapers rarely hold tokens: /metrics needs none.
    if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let mut resp = Response::new(Full::new(Bytes::from(crate::telemetry::METRICS.render())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return resp;
    }
    // The interception CA's certificate is public: apps fetch it to trust sluice.
    if req.method() == Method::GET && req.uri().path() == "/ca.pem" {
        let snap = state.config.load();
        let Some(i) = &snap.interception else {
            return error_response(&ApiError::not_found(
                "TLS interception is not configured ([interception])",
            ));
        };
        let mut resp = Response::new(Full::new(Bytes::from(i.ca_cert_pem.clone())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/x-pem-file"),
        );
        return resp;
    }
    // The OAuth callback is reached by the user's browser: the single-use state is its
    // credential, not the admin token.
    if req.method() == Method::GET && req.uri().path() == "/oauth/callback" {
        let query = req.uri().query().unwrap_or("").to_string();
        return match oauth::callback(&state, &query).await {
            Ok((status, body)) => json_response(status, &body),
            Err(e) => error_response(&e),
        };
    }
    if !authorized(&state, &req) {
        return error_response(&ApiError::new(
            StatusCode::UNAUTHORIZED,
            "admin_unauthorized",
            "missing or wrong admin token (Authorization: Bearer <token>)",
        ));
    }
    if req.method() == Method::GET && req.uri().path() == "/admin/oauth/start" {
        let query = req.uri().query().unwrap_or("").to_string();
        return match oauth::start(&state, &query).await {
            Ok((status, location, body)) => {
                let mut resp = json_response(status, &body);
                if let Ok(v) = header::HeaderValue::from_str(&location) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
                resp
            }
            Err(e) => error_response(&e),
        };
    }
    match route(&state, req).await {
        Ok((status, body)) => json_response(status, &body),
        Err(e) => error_response(&e),
    }
}

/// Serve the admin API on `listener` until the process ends.
pub fn spawn(listener: TcpListener, state: Arc<AdminState>) -> SocketAddr {
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    tokio::spawn(async move {
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(state, req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    info!(admin = %addr, "admin API listening");
    addr
}
