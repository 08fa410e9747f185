//! OAuth connect and disconnect through the admin listener.
//!
//! * `GET /admin/oauth/start?workspace=W&connector=C` (admin token): redirects (302) to the
//!   provider with PKCE (S256) and a `state` that is random, single-use, expires after ten
//!   minutes and is bound to (W, C). The verifier is kept sealed in the store under that state.
//! * `GET /oauth/callback?state=…&code=…` (no admin token: the user's browser comes here; the
//!   state is the credential): takes the state (once), exchanges the code, stores the tokens.
//! * `POST /admin/workspaces/{W}/oauth/{C}/connect` (admin token): client-credentials grant.
//! * Deleting an OAuth credential revokes its tokens at the provider first (RFC 7009).

use std::time::Duration;

use http::StatusCode;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{AdminState, ApiError, ApiResult};
use crate::config::{Connector, Snapshot};
use crate::credential::oauth::{
    Grant, OAuth2, Pending, Scope, TokenError, authorization_redirect, pkce_pair,
};

/// How long a started authorization may take to come back.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// The AAD "workspace" pending authorizations are sealed under.
const PENDING_SCOPE: &str = "_oauth_pending";

#[derive(Serialize, Deserialize)]
struct SealedPending {
    key_id: String,
    blob: String,
}

fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::NeedsReauthorization => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "the provider refused the grant",
        ),
        TokenError::Policy(m) => ApiError::new(StatusCode::FORBIDDEN, "egress_refused", m),
        TokenError::Vault(v) => v.into(),
        TokenError::Unavailable(m) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "token_endpoint_unavailable", m)
        }
        TokenError::Rejected(m) => {
            ApiError::new(StatusCode::BAD_GATEWAY, "token_endpoint_rejected", m)
        }
    }
}

/// The connector's OAuth settings and the workspace's org, or why not.
fn oauth_target<'s>(
    snap: &'s Snapshot,
    workspace: &str,
    connector: &str,
) -> Result<(&'s Connector, &'s OAuth2, &'s str), ApiError> {
    let ws = snap
        .workspaces
        .get(workspace)
        .ok_or_else(|| ApiError::not_found(format!("no workspace {workspace:?}")))?;
    let c = snap
        .connectors
        .get(connector)
        .ok_or_else(|| ApiError::not_found(format!("no connector {connector:?}")))?;
    let oauth = c.oauth2.as_deref().ok_or_else(|| {
        ApiError::invalid(format!("connector {connector:?} is not an OAuth connector"))
    })?;
    Ok((c, oauth, ws.org.as_str()))
}

fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `GET /admin/oauth/start`.
pub(super) async fn start(
    state: &AdminState,
    query: &str,
) -> Result<(StatusCode, String, serde_json::Value), ApiError> {
    let workspace = query_param(query, "workspace")
        .ok_or_else(|| ApiError::invalid("workspace is required"))?;
    let connector = query_param(query, "connector")
        .ok_or_else(|| ApiError::invalid("connector is required"))?;
    let snap = state.config.load_full();
    let (_, oauth, _) = oauth_target(&snap, &workspace, &connector)?;
    if oauth.grant != Grant::AuthorizationCode {
        return Err(ApiError::invalid(
            "this connector uses client_credentials: POST …/connect instead",
        ));
    }
    let oauth_state = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        rand::random::<[u8; 32]>(),
    );
    let (verifier, challenge) = pkce_pair();
    let pending = Pending {
        workspace: workspace.clone(),
        connector: connector.clone(),
        verifier: verifier.to_string(),
    };
    let plain = zeroize::Zeroizing::new(serde_json::to_vec(&pending).expect("serialises"));
    let (key_id, blob) = state
        .vault
        .keyring()
        .seal(PENDING_SCOPE, &oauth_state, &plain);
    let sealed = serde_json::to_vec(&SealedPending { key_id, blob }).expect("serialises");
    state
        .vault
        .store()
        .put_pending_authorization(&oauth_state, &sealed, PENDING_TTL)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            )
        })?;
    let location =
        authorization_redirect(oauth, &oauth_state, &challenge).expect("validated at load");
    info!(target: "sluice::audit", workspace, connector, "OAuth authorization started");
    Ok((
        StatusCode::FOUND,
        location.clone(),
        serde_json::json!({ "authorization_url": location }),
    ))
}

/// `GET /oauth/callback`.
pub(super) async fn callback(state: &AdminState, query: &str) -> ApiResult {
    let oauth_state =
        query_param(query, "state").ok_or_else(|| ApiError::invalid("state is missing"))?;
    let invalid_state = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_state",
            "unknown, expired or already used state",
        )
    };
    let sealed = state
        .vault
        .store()
        .take_pending_authorization(&oauth_state)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            )
        })?
        .ok_or_else(invalid_state)?;
    let sealed: SealedPending = serde_json::from_slice(&sealed).map_err(|_| invalid_state())?;
    let plain = state
        .vault
        .keyring()
        .open(PENDING_SCOPE, &oauth_state, &sealed.key_id, &sealed.blob)
        .map_err(|_| invalid_state())?;
    let pending: Pending = serde_json::from_slice(&plain).map_err(|_| invalid_state())?;
    if let Some(error) = query_param(query, "error") {
        // The provider's code only: its description is user-influenced text.
        let error: String = error
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "authorization_denied",
            format!("the provider answered {error}"),
        ));
    }
    let code = query_param(query, "code").ok_or_else(|| ApiError::invalid("code is missing"))?;
    let snap = state.config.load_full();
    let (connector, oauth, org) = oauth_target(&snap, &pending.workspace, &pending.connector)?;
    let scope = Scope {
        rules: &*snap,
        vault: &state.vault,
        connector: connector.rules(),
        oauth,
        workspace: &pending.workspace,
        org,
        tls: connector.tls.outbound.as_ref(),
    };
    let meta = state
        .oauth
        .exchange_code(&scope, &code, &pending.verifier)
        .await
        .map_err(token_error)?;
    Ok((
        StatusCode::OK,
        serde_json::json!({ "connected": true, "workspace": pending.workspace, "connector": pending.connector, "expires_at": meta.expires_at }),
    ))
}

/// `POST /admin/workspaces/{W}/oauth/{C}/connect`.
pub(super) async fn connect(state: &AdminState, workspace: &str, connector: &str) -> ApiResult {
    let snap = state.config.load_full();
    let (c, oauth, org) = oauth_target(&snap, workspace, connector)?;
    if oauth.grant != Grant::ClientCredentials {
        return Err(ApiError::invalid(
            "this connector uses authorization_code: GET /admin/oauth/start",
        ));
    }
    let scope = Scope {
        rules: &*snap,
        vault: &state.vault,
        connector: c.rules(),
        oauth,
        workspace,
        org,
        tls: c.tls.outbound.as_ref(),
    };
    let meta = state
        .oauth
        .connect_client_credentials(&scope)
        .await
        .map_err(token_error)?;
    Ok((
        StatusCode::OK,
        serde_json::json!({ "connected": true, "workspace": workspace, "connector": connector, "expires_at": meta.expires_at }),
    ))
}

/// Revoke an OAuth credential's tokens before it is deleted. `None`: not an OAuth connector
/// or nothing stored; `Some(revoked)` otherwise.
pub(super) async fn revoke_before_delete(
    state: &AdminState,
    workspace: &str,
    connector: &str,
) -> Result<Option<bool>, ApiError> {
    let snap = state.config.load_full();
    let Ok((c, oauth, org)) = oauth_target(&snap, workspace, connector) else {
        return Ok(None);
    };
    let Some((_, current)) = state.vault.read_through(workspace, connector).await? else {
        return Ok(None);
    };
    let scope = Scope {
        rules: &*snap,
        vault: &state.vault,
        connector: c.rules(),
        oauth,
        workspace,
        org,
        tls: c.tls.outbound.as_ref(),
    };
    let revoked = match state.oauth.revoke(&scope, &current.fields).await {
        Ok(all) => all,
        Err(e) => {
            tracing::warn!(workspace, connector, error = %e, "token revocation not possible");
            false
        }
    };
    Ok(Some(revoked))
}
