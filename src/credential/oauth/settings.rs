//! `[connector.oauth2]`: the file section, its validation, and the settings it builds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::credential::secret::Secret;
use crate::label::Choice;
use crate::names::parse_authority;
use crate::policy::domain::{DomainList, Host};

/// `[connector.oauth2]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2File {
    pub grant: Choice<Grant>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_url: Option<String>,
    pub token_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation_url: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub token_params: BTreeMap<String, String>,
    #[serde(default = "default_client_auth")]
    pub client_auth: Choice<ClientAuth>,
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    #[serde(default = "default_skew")]
    pub refresh_skew_ms: u64,
    #[serde(default = "default_lifetime")]
    pub default_lifetime_ms: u64,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_replay")]
    pub replay_body_limit: usize,
}

fn default_client_auth() -> Choice<ClientAuth> {
    ClientAuth::Basic.into()
}
fn default_skew() -> u64 {
    60_000
}
fn default_lifetime() -> u64 {
    3_600_000
}
fn default_timeout() -> u64 {
    10_000
}
fn default_replay() -> usize {
    64 * 1024
}

/// pingora's request-body retry buffer: larger bodies cannot be replayed after a 401.
pub const MAX_REPLAY: usize = 64 * 1024;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum Grant {
    AuthorizationCode,
    ClientCredentials,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
pub enum ClientAuth {
    /// HTTP Basic with the client id and secret (RFC 6749 §2.3.1).
    #[strum(serialize = "client_secret_basic")]
    Basic,
    /// `client_id` and `client_secret` in the form body.
    #[strum(serialize = "client_secret_post")]
    Post,
}

/// An `https://` URL sluice calls itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    pub raw: String,
    pub host: Host,
    pub port: u16,
    /// Path and query, origin-form.
    pub path: String,
}

impl HttpsUrl {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let rest = raw
            .strip_prefix("https://")
            .ok_or_else(|| format!("{raw:?} must be an https:// URL"))?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let (host, port) = parse_authority(authority).map_err(|e| format!("{raw:?}: {e}"))?;
        if path.contains('#') || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "{raw:?} has a fragment or a character that needs escaping"
            ));
        }
        let path = match path.as_bytes().first() {
            None => "/".to_string(),
            Some(b'?') => format!("/{path}"),
            Some(_) => path.to_string(),
        };
        Ok(Self {
            raw: raw.to_string(),
            host,
            port: port.unwrap_or(443),
            path,
        })
    }
}

/// A connector's validated OAuth settings.
#[derive(Debug)]
pub struct OAuth2 {
    pub grant: Grant,
    pub authorization_url: Option<HttpsUrl>,
    pub token_url: HttpsUrl,
    pub revocation_url: Option<HttpsUrl>,
    pub scopes: Vec<String>,
    pub token_params: BTreeMap<String, String>,
    pub client_auth: ClientAuth,
    pub client_id: String,
    pub client_secret: Secret,
    pub redirect_uri: Option<String>,
    pub refresh_skew: Duration,
    pub default_lifetime: Duration,
    pub timeout: Duration,
    pub replay_body_limit: usize,
}

impl OAuth2 {
    /// Validate `[connector.oauth2]` against the connector's allowlist and ports, and read the
    /// client secret from its file or environment variable.
    pub fn build(
        file: &OAuth2File,
        allowed: &DomainList,
        ports: &[u16],
        base: &Path,
    ) -> Result<Self, Vec<(String, String)>> {
        let mut errors: Vec<(String, String)> = Vec::new();
        let url =
            |key: &str, raw: &str, errors: &mut Vec<(String, String)>| match HttpsUrl::parse(raw) {
                Ok(u) if allowed.matching(&u.host).is_none() => {
                    errors.push((
                        key.into(),
                        format!("host {} is not in the connector's allowed_domains", u.host),
                    ));
                    None
                }
                Ok(u) if !ports.contains(&u.port) => {
                    errors.push((
                        key.into(),
                        format!("port {} is not in the connector's allowed_ports", u.port),
                    ));
                    None
                }
                Ok(u) => Some(u),
                Err(e) => {
                    errors.push((key.into(), e));
                    None
                }
            };
        let grant = file.grant.get().unwrap_or_else(|e| {
            errors.push(("grant".into(), e));
            Grant::ClientCredentials
        });
        let token_url = url("token_url", &file.token_url, &mut errors);
        let authorization_url = file
            .authorization_url
            .as_deref()
            .and_then(|u| url("authorization_url", u, &mut errors));
        let revocation_url = file
            .revocation_url
            .as_deref()
            .and_then(|u| url("revocation_url", u, &mut errors));
        if grant == Grant::AuthorizationCode {
            if file.authorization_url.is_none() {
                errors.push((
                    "authorization_url".into(),
                    "required for grant authorization_code".into(),
                ));
            }
            match &file.redirect_uri {
                Some(r) if r.starts_with("https://") || r.starts_with("http://") => {}
                _ => errors.push((
                    "redirect_uri".into(),
                    "required for grant authorization_code: the URL of sluice's /oauth/callback as the browser reaches it".into(),
                )),
            }
        }
        let client_auth = file.client_auth.get().unwrap_or_else(|e| {
            errors.push(("client_auth".into(), e));
            ClientAuth::Basic
        });
        if file.client_id.is_empty() {
            errors.push(("client_id".into(), "must not be empty".into()));
        }
        let client_secret = read_client_secret(file, base, &mut errors);
        if file.replay_body_limit > MAX_REPLAY {
            errors.push((
                "replay_body_limit".into(),
                format!("at most {MAX_REPLAY} bytes (pingora's retry buffer)"),
            ));
        }
        for (key, ms) in [
            ("refresh_skew_ms", file.refresh_skew_ms),
            ("default_lifetime_ms", file.default_lifetime_ms),
            ("timeout_ms", file.timeout_ms),
        ] {
            if ms == 0 {
                errors.push((key.into(), "must be greater than 0".into()));
            }
        }
        match (errors.is_empty(), token_url, client_secret) {
            (true, Some(token_url), Some(client_secret)) => Ok(Self {
                grant,
                authorization_url,
                token_url,
                revocation_url,
                scopes: file.scopes.clone(),
                token_params: file.token_params.clone(),
                client_auth,
                client_id: file.client_id.clone(),
                client_secret,
                redirect_uri: file.redirect_uri.clone(),
                refresh_skew: Duration::from_millis(file.refresh_skew_ms),
                default_lifetime: Duration::from_millis(file.default_lifetime_ms),
                timeout: Duration::from_millis(file.timeout_ms),
                replay_body_limit: file.replay_body_limit,
            }),
            _ => Err(errors),
        }
    }

    pub(super) fn basic_auth(&self) -> Option<HeaderValue> {
        (self.client_auth == ClientAuth::Basic).then(|| {
            // RFC 6749 §2.3.1: form-encode id and secret before joining them.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            let pair = Zeroizing::new(format!(
                "{}:{}",
                enc(&self.client_id),
                enc(self.client_secret.expose())
            ));
            HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair.as_bytes())))
                .expect("base64 is a valid header value")
        })
    }
}

/// The client secret from its file (relative to the config's directory) or environment
/// variable: exactly one of them, never the secret itself in the config.
fn read_client_secret(
    file: &OAuth2File,
    base: &Path,
    errors: &mut Vec<(String, String)>,
) -> Option<Secret> {
    match (&file.client_secret_file, &file.client_secret_env) {
        (Some(path), None) => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base.join(path)
            };
            match std::fs::read_to_string(&path) {
                Ok(s) => Some(Secret::new(s.trim())),
                Err(e) => {
                    errors.push((
                        "client_secret_file".into(),
                        format!("cannot read {}: {e}", path.display()),
                    ));
                    None
                }
            }
        }
        (None, Some(var)) => match std::env::var(var) {
            Ok(s) => Some(Secret::new(s.trim())),
            Err(_) => {
                errors.push((
                    "client_secret_env".into(),
                    format!("environment variable {var} is not set"),
                ));
                None
            }
        },
        _ => {
            errors.push((
                "client_secret_file".into(),
                "set exactly one of client_secret_file and client_secret_env (never the secret itself)".into(),
            ));
            None
        }
    }
}
