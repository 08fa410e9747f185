//! OAuth 2.0: the token lifecycle for `auth_type = "oauth2"` connectors.
//!
//! * **Grants.** `authorization_code` (connect flow through the admin listener, PKCE S256,
//!   single-use expiring `state`) and `client_credentials` (machine to machine).
//! * **Refresh** ahead of expiry by `refresh_skew_ms`; a token response without `expires_in`
//!   lives `default_lifetime_ms`. A rotated refresh token is written to the store *before* the
//!   new access token is used. Concurrent requests share one refresh: in a process through a
//!   single-flight cache keyed by the record version, across replicas through the store's
//!   refresh lock with a fencing token (a stale holder cannot overwrite a newer token).
//! * **Failures.** `invalid_grant` marks the credential `needs_reauthorization` and stops
//!   refreshing until the workspace connects again. Transient failures back off exponentially.
//!   An expired access token is never injected.
//! * **Egress.** Token, revocation and code-exchange calls go through
//!   [`crate::policy::vet_destination`] like app traffic: HTTPS, both allowlists, address
//!   checks, pinned address.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::StatusCode;
use moka::future::Cache;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use zeroize::Zeroizing;

mod settings;

pub use settings::{ClientAuth, Grant, HttpsUrl, MAX_REPLAY, OAuth2, OAuth2File};

use super::secret::{Secret, SecretFields};
use super::store::{OAuthMeta, now_unix};
use super::{Connected, Vault, VaultError};
use crate::error::{ErrorCode, Refusal};
use crate::label::Label;
use crate::outbound::{OutboundError, OutboundTls};
use crate::policy::{ConnectorRules, Destination, Rules, vet_destination};
use crate::telemetry::RefreshResult;

/// Why a token could not be had. Messages never carry a token or secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the provider refused the grant (invalid_grant): the workspace must connect again")]
    NeedsReauthorization,
    #[error("token endpoint unavailable: {0}")]
    Unavailable(String),
    #[error("token endpoint refused the request: {0}")]
    Rejected(String),
    #[error("the token endpoint is not an allowed destination: {0}")]
    Policy(String),
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// The one mapping from a token failure to what the app is told. A store failure is the
/// vault's refusal; any other vault failure means no valid token could be had.
impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::NeedsReauthorization => Refusal::new(
                ErrorCode::OAuthReauthorizationRequired,
                "the provider refused the refresh token: the workspace must connect this connector again",
            ),
            TokenError::Vault(VaultError::Store(_)) => Refusal::new(
                ErrorCode::CredentialStoreUnavailable,
                "the credential store is unavailable",
            ),
            other => Refusal::new(
                ErrorCode::OAuthRefreshFailed,
                format!("no valid access token: {other}"),
            ),
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Zeroizing<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<Zeroizing<String>>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
}

/// Fields sluice keeps for an OAuth credential.
pub const ACCESS_TOKEN: &str = "access_token";
pub const REFRESH_TOKEN: &str = "refresh_token";

type Key = (String, String, u64);

/// Everything a token operation is about: which workspace, which connector, under which
/// policy rules (the request's config snapshot), with which vault.
pub struct Scope<'a> {
    pub rules: &'a dyn Rules,
    pub vault: &'a Vault,
    pub connector: ConnectorRules<'a>,
    pub oauth: &'a OAuth2,
    pub workspace: &'a str,
    pub org: &'a str,
    /// The connector's own TLS for its token calls (`[connector.tls]`), else the shared one.
    pub tls: Option<&'a OutboundTls>,
}

/// Token calls, refresh coordination and backoff for every OAuth connector.
pub struct OAuthClient {
    tls: OutboundTls,
    /// One refresh per (workspace, connector, record version), shared by every waiter.
    inflight: Cache<Key, Arc<Connected>>,
    /// Until when refreshing (workspace, connector) backs off, and the current delay.
    backoff: moka::sync::Cache<(String, String), (Instant, Duration)>,
}

/// `code_verifier` and its S256 `code_challenge` (RFC 7636).
pub fn pkce_pair() -> (Zeroizing<String>, String) {
    let verifier = Zeroizing::new(URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()));
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

impl OAuthClient {
    pub fn new(tls: OutboundTls) -> Self {
        Self {
            tls,
            inflight: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(30))
                .build(),
            backoff: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
        }
    }

    /// Vet `url` for (connector, workspace's org) exactly like app traffic.
    async fn destination(&self, sc: &Scope<'_>, url: &HttpsUrl) -> Result<Destination, TokenError> {
        vet_destination(sc.rules, sc.connector, sc.org, &url.host, url.port, &mut ())
            .await
            .map_err(|r| TokenError::Policy(format!("{}: {}", r.code, r.message)))
    }

    /// POST to the token endpoint and parse the answer into sealed-ready fields.
    async fn token_request(
        &self,
        sc: &Scope<'_>,
        mut form: Vec<(&str, &str)>,
        previous_refresh: Option<&Secret>,
    ) -> Result<(SecretFields, OAuthMeta), TokenError> {
        let oauth = sc.oauth;
        let dest = self.destination(sc, &oauth.token_url).await?;
        let scope = oauth.scopes.join(" ");
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        for (k, v) in &oauth.token_params {
            form.push((k, v));
        }
        if oauth.client_auth == ClientAuth::Post {
            form.push(("client_id", &oauth.client_id));
            form.push(("client_secret", oauth.client_secret.expose()));
        }
        let (status, body) = sc
            .tls
            .unwrap_or(&self.tls)
            .post_form(
                &dest,
                &oauth.token_url.path,
                &form,
                oauth.basic_auth(),
                oauth.timeout,
            )
            .await
            .map_err(|e: OutboundError| TokenError::Unavailable(e.to_string()))?;
        if status.is_success() {
            let t: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
                TokenError::Unavailable("token response is not the expected JSON".into())
            })?;
            if t.token_type
                .as_deref()
                .is_some_and(|tt| !tt.eq_ignore_ascii_case("bearer"))
            {
                return Err(TokenError::Rejected("token_type is not Bearer".into()));
            }
            let lifetime = t
                .expires_in
                .map_or(oauth.default_lifetime, Duration::from_secs);
            let mut fields = SecretFields::new();
            fields.insert(ACCESS_TOKEN, Secret::new(t.access_token.as_str()));
            // A rotated refresh token replaces the old one; otherwise the old one stays.
            match (t.refresh_token, previous_refresh) {
                (Some(new), _) => fields.insert(REFRESH_TOKEN, Secret::new(new.as_str())),
                (None, Some(old)) => fields.insert(REFRESH_TOKEN, old.clone()),
                (None, None) => {}
            }
            let meta = OAuthMeta {
                expires_at: now_unix() + lifetime.as_secs(),
                needs_reauthorization: false,
            };
            return Ok((fields, meta));
        }
        let error = serde_json::from_slice::<ErrorResponse>(&body)
            .map(|e| e.error)
            .unwrap_or_default();
        match (status, error.as_str()) {
            (StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED, "invalid_grant") => {
                Err(TokenError::NeedsReauthorization)
            }
            (s, _) if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                Err(TokenError::Unavailable(format!("HTTP {}", s.as_u16())))
            }
            // Only the provider's error code, never its description (it may echo input).
            (s, e) => Err(TokenError::Rejected(format!(
                "HTTP {} {}",
                s.as_u16(),
                if e.is_empty() { "(no error code)" } else { e }
            ))),
        }
    }

    /// An access token for this request: the stored one while it is fresh, otherwise (or
    /// when `force`, after a 401) a refreshed one. Never an expired token.
    pub async fn token(
        &self,
        sc: &Scope<'_>,
        current: &Connected,
        force: bool,
    ) -> Result<Arc<Connected>, TokenError> {
        let (oauth, connector, workspace) = (sc.oauth, sc.connector, sc.workspace);
        let meta = current.oauth.unwrap_or(OAuthMeta {
            expires_at: 0,
            needs_reauthorization: false,
        });
        if meta.needs_reauthorization {
            return Err(TokenError::NeedsReauthorization);
        }
        let now = now_unix();
        let fresh = meta.expires_at > now + oauth.refresh_skew.as_secs();
        let unexpired = meta.expires_at > now;
        if fresh && !force {
            return Ok(Arc::new(Connected::new(
                current.fields.clone(),
                current.version,
                current.oauth,
            )));
        }
        let backoff_key = (workspace.to_string(), connector.id.to_owned());
        if let Some((until, _)) = self.backoff.get(&backoff_key) {
            if Instant::now() < until {
                return if unexpired && !force {
                    Ok(Arc::new(Connected::new(
                        current.fields.clone(),
                        current.version,
                        current.oauth,
                    )))
                } else {
                    Err(TokenError::Unavailable(
                        "backing off after token endpoint failures".into(),
                    ))
                };
            }
        }
        let key = (
            workspace.to_string(),
            connector.id.to_owned(),
            current.version,
        );
        let result = self
            .inflight
            .try_get_with(key, self.refresh(sc, current.version))
            .await
            .map_err(|e| (*e).clone());
        match &result {
            Ok(_) => self.backoff.invalidate(&backoff_key),
            Err(TokenError::Unavailable(reason)) => {
                let delay = self
                    .backoff
                    .get(&backoff_key)
                    .map_or(Duration::from_secs(1), |(_, d)| {
                        (d * 2).min(Duration::from_secs(60))
                    });
                warn!(workspace, connector = %connector.id, %reason, backoff_s = delay.as_secs(), "token refresh failed; backing off");
                self.backoff
                    .insert(backoff_key, (Instant::now() + delay, delay));
                // Within the skew window the current token is still good.
                if unexpired && !force {
                    return Ok(Arc::new(Connected::new(
                        current.fields.clone(),
                        current.version,
                        current.oauth,
                    )));
                }
            }
            Err(_) => {}
        }
        result
    }

    /// Refresh under the store's lock. `seen` is the version the caller holds: if the store
    /// already has a newer one, another request or replica refreshed and that result is used.
    async fn refresh(&self, sc: &Scope<'_>, seen: u64) -> Result<Arc<Connected>, TokenError> {
        let (vault, connector, oauth, workspace) = (sc.vault, sc.connector, sc.oauth, sc.workspace);
        let store = vault.store();
        let lock_ttl = oauth.timeout * 2 + Duration::from_secs(1);
        let deadline = Instant::now() + lock_ttl + oauth.timeout;
        loop {
            match store
                .acquire_refresh_lock(workspace, connector.id, lock_ttl)
                .await
                .map_err(|e| TokenError::Unavailable(e.to_string()))?
            {
                Some(fence) => {
                    let outcome = self.refresh_locked(sc, seen, fence).await;
                    store
                        .release_refresh_lock(workspace, connector.id, fence)
                        .await;
                    return outcome;
                }
                None => {
                    // Another replica is refreshing: wait for its result in the store.
                    if let Some((r, c)) = vault.read_through(workspace, connector.id).await? {
                        if r.version > seen {
                            if r.oauth.is_some_and(|o| o.needs_reauthorization) {
                                return Err(TokenError::NeedsReauthorization);
                            }
                            return Ok(Arc::new(c));
                        }
                    }
                    if Instant::now() > deadline {
                        return Err(TokenError::Unavailable(
                            "another replica's refresh did not finish".into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn refresh_locked(
        &self,
        sc: &Scope<'_>,
        seen: u64,
        fence: u64,
    ) -> Result<Arc<Connected>, TokenError> {
        let (vault, connector, oauth, workspace) = (sc.vault, sc.connector, sc.oauth, sc.workspace);
        let Some((record, current)) = vault.read_through(workspace, connector.id).await? else {
            return Err(TokenError::Rejected("the credential was removed".into()));
        };
        if record.version > seen {
            // Someone refreshed while this request waited for the lock.
            if record.oauth.is_some_and(|o| o.needs_reauthorization) {
                return Err(TokenError::NeedsReauthorization);
            }
            return Ok(Arc::new(current));
        }
        let refresh = current.fields.get(REFRESH_TOKEN).cloned();
        let result = match (oauth.grant, &refresh) {
            (_, Some(rt)) => {
                let form = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", rt.expose()),
                ];
                self.token_request(sc, form, Some(rt)).await
            }
            (Grant::ClientCredentials, None) => {
                self.token_request(sc, vec![("grant_type", "client_credentials")], None)
                    .await
            }
            (Grant::AuthorizationCode, None) => Err(TokenError::NeedsReauthorization),
        };
        match result {
            Ok((fields, meta)) => {
                // Persist first (the refresh token may have rotated), then use.
                let written = vault
                    .put_oauth(workspace, connector.id, &fields, meta, Some(fence))
                    .await?
                    .ok_or_else(|| {
                        TokenError::Unavailable("lost the refresh lock before writing".into())
                    })?;
                info!(target: "sluice::audit", workspace, connector = %connector.id, expires_at = meta.expires_at, "OAuth token refreshed");
                crate::telemetry::METRICS
                    .token_refreshes
                    .with_label_values(&[connector.id, RefreshResult::Ok.as_label()])
                    .inc();
                Ok(Arc::new(written))
            }
            Err(TokenError::NeedsReauthorization) => {
                let meta = OAuthMeta {
                    expires_at: record.oauth.map_or(0, |o| o.expires_at),
                    needs_reauthorization: true,
                };
                vault
                    .put_oauth(workspace, connector.id, &current.fields, meta, Some(fence))
                    .await?;
                warn!(target: "sluice::audit", workspace, connector = %connector.id, "OAuth refresh refused (invalid_grant): credential needs reauthorization");
                crate::telemetry::METRICS
                    .token_refreshes
                    .with_label_values(&[
                        connector.id,
                        RefreshResult::NeedsReauthorization.as_label(),
                    ])
                    .inc();
                Err(TokenError::NeedsReauthorization)
            }
            Err(e) => {
                let result = match &e {
                    TokenError::Unavailable(_) => RefreshResult::Unavailable,
                    TokenError::Policy(_) => RefreshResult::Policy,
                    _ => RefreshResult::Rejected,
                };
                crate::telemetry::METRICS
                    .token_refreshes
                    .with_label_values(&[connector.id, result.as_label()])
                    .inc();
                Err(e)
            }
        }
    }

    /// Client-credentials connect: fetch the first token and store it.
    pub async fn connect_client_credentials(
        &self,
        sc: &Scope<'_>,
    ) -> Result<OAuthMeta, TokenError> {
        let form = vec![("grant_type", "client_credentials")];
        let (fields, meta) = self.token_request(sc, form, None).await?;
        self.store_connected(sc, &fields, meta).await
    }

    /// Authorization-code exchange (the callback), with the PKCE verifier.
    pub async fn exchange_code(
        &self,
        sc: &Scope<'_>,
        code: &str,
        verifier: &str,
    ) -> Result<OAuthMeta, TokenError> {
        let redirect = sc.oauth.redirect_uri.clone().unwrap_or_default();
        let form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect.as_str()),
            ("code_verifier", verifier),
        ];
        let (fields, meta) = self.token_request(sc, form, None).await?;
        self.store_connected(sc, &fields, meta).await
    }

    /// A (re)connected workspace: store its tokens and forget any backoff.
    async fn store_connected(
        &self,
        sc: &Scope<'_>,
        fields: &SecretFields,
        meta: OAuthMeta,
    ) -> Result<OAuthMeta, TokenError> {
        sc.vault
            .put_oauth(sc.workspace, sc.connector.id, fields, meta, None)
            .await?;
        self.backoff
            .invalidate(&(sc.workspace.to_string(), sc.connector.id.to_owned()));
        info!(target: "sluice::audit", workspace = sc.workspace, connector = %sc.connector.id, "OAuth connected");
        Ok(meta)
    }

    /// RFC 7009: revoke the refresh token, then the access token. Best effort per token;
    /// returns whether every configured revocation succeeded.
    pub async fn revoke(&self, sc: &Scope<'_>, fields: &SecretFields) -> Result<bool, TokenError> {
        let (oauth, connector) = (sc.oauth, sc.connector);
        let Some(url) = &oauth.revocation_url else {
            return Ok(true);
        };
        let dest = self.destination(sc, url).await?;
        let mut all_ok = true;
        for (name, hint) in [
            (REFRESH_TOKEN, "refresh_token"),
            (ACCESS_TOKEN, "access_token"),
        ] {
            let Some(token) = fields.get(name) else {
                continue;
            };
            let mut form = vec![("token", token.expose()), ("token_type_hint", hint)];
            if oauth.client_auth == ClientAuth::Post {
                form.push(("client_id", &oauth.client_id));
                form.push(("client_secret", oauth.client_secret.expose()));
            }
            match sc
                .tls
                .unwrap_or(&self.tls)
                .post_form(&dest, &url.path, &form, oauth.basic_auth(), oauth.timeout)
                .await
            {
                Ok((s, _)) if s.is_success() => {}
                Ok((s, _)) => {
                    warn!(connector = %connector.id, status = s.as_u16(), hint, "token revocation refused");
                    all_ok = false;
                }
                Err(e) => {
                    warn!(connector = %connector.id, error = %e, hint, "token revocation failed");
                    all_ok = false;
                }
            }
        }
        Ok(all_ok)
    }
}

/// What a pending authorization remembers between start and callback (sealed in the store).
#[derive(Serialize, Deserialize)]
pub struct Pending {
    pub workspace: String,
    pub connector: String,
    pub verifier: String,
}

/// The provider URL the start endpoint redirects to.
pub fn authorization_redirect(oauth: &OAuth2, state: &str, challenge: &str) -> Option<String> {
    let base = oauth.authorization_url.as_ref()?;
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("response_type", "code")
        .append_pair("client_id", &oauth.client_id)
        .append_pair(
            "redirect_uri",
            oauth.redirect_uri.as_deref().unwrap_or_default(),
        )
        .append_pair("state", state)
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256");
    if !oauth.scopes.is_empty() {
        q.append_pair("scope", &oauth.scopes.join(" "));
    }
    for (k, v) in &oauth.token_params {
        q.append_pair(k, v);
    }
    let sep = if base.raw.contains('?') { '&' } else { '?' };
    Some(format!("{}{sep}{}", base.raw, q.finish()))
}

#[cfg(test)]
mod tests;
