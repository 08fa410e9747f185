//! Step 5: the workspace's credential, rendered into what gets injected; for OAuth
//! connectors, a token that is not expired (refreshed first when it is, or when forced after
//! an upstream 401).

use std::sync::Arc;

use super::Sluice;
use crate::credential::oauth::Scope;
use crate::credential::{Connected, Rendering, TenantState};
use crate::ctx::{Injecting, RequestState};
use crate::error::{ErrorCode, Refusal};

impl Sluice {
    /// Step 5: sets `ctx.injected` (and `ctx.oauth`, the token state it came from).
    pub(super) async fn credential(&self, ctx: &mut RequestState) -> Result<(), Refusal> {
        let (Some(vetted), Some(connector)) = (&ctx.vetted, &ctx.connector) else {
            return Err(Refusal::new(
                ErrorCode::Internal,
                "credential before admission",
            ));
        };
        if !connector.injection.needs_credential() {
            return Ok(());
        }
        let vault = self.vault.as_ref().ok_or_else(|| {
            Refusal::new(ErrorCode::Internal, "no credential store is configured")
        })?;
        let (ws, conn) = (vetted.workspace(), vetted.connector());
        let state = match vault.lookup_cached(ws, conn, ctx.started) {
            Ok(state) => state,
            // Boxed, so a warm request's future does not carry the store read's (Vault::reload).
            Err(miss) => Box::pin(vault.reload(ws, conn, miss, ctx.started))
                .await
                .map_err(Refusal::from)?,
        };
        match &*state {
            TenantState::Unconfigured => Err(Refusal::new(
                ErrorCode::CredentialNotConfigured,
                format!("workspace {ws:?} has no credential for connector {conn:?}"),
            )),
            TenantState::OptedOut => Err(Refusal::new(
                ErrorCode::WorkspaceOptedOut,
                format!("workspace {ws:?} opted out of connector {conn:?}"),
            )),
            TenantState::Connected(c) if connector.oauth2.is_some() => {
                // Boxed: the token client's future is large (see `Vault::lookup`).
                let (token, injecting) = Box::pin(self.oauth_token(ctx, c, false)).await?;
                ctx.injecting = Some(injecting);
                ctx.oauth = Some(token);
                Ok(())
            }
            TenantState::Connected(c) => {
                // A kept rendering is read in place from the cached credential the context
                // now holds.
                let rendering = c.render(&connector.injection);
                ctx.injecting = Some(injecting(rendering, || Injecting::Kept(state.clone()))?);
                Ok(())
            }
        }
    }

    /// A token for an OAuth connector (refreshed when `force`, after a 401), rendered for
    /// injection.
    pub(super) async fn oauth_token(
        &self,
        ctx: &RequestState,
        current: &Connected,
        force: bool,
    ) -> Result<(Arc<Connected>, Injecting), Refusal> {
        let (Some(vetted), Some(connector), Some(vault)) =
            (&ctx.vetted, &ctx.connector, &self.vault)
        else {
            return Err(Refusal::new(
                ErrorCode::Internal,
                "connector or vault missing",
            ));
        };
        let Some(oauth2) = &connector.oauth2 else {
            return Err(Refusal::new(ErrorCode::Internal, "not an OAuth connector"));
        };
        let scope = Scope {
            rules: &*ctx.snapshot,
            vault,
            connector: connector.rules(),
            oauth: oauth2,
            workspace: vetted.workspace(),
            org: vetted.org(),
            tls: connector.tls.outbound.as_ref(),
        };
        let token = self
            .oauth
            .token(&scope, current, force)
            .await
            .map_err(Refusal::from)?;
        let rendering = token.render(&connector.injection);
        let injecting = injecting(rendering, || Injecting::KeptOnToken(token.clone()))?;
        Ok((token, injecting))
    }
}

/// Where the request reads its injection: `kept` (the credential that keeps the rendering),
/// or the rendering made for it alone.
fn injecting(
    rendering: Result<Rendering, String>,
    kept: impl FnOnce() -> Injecting,
) -> Result<Injecting, Refusal> {
    match rendering.map_err(|m| Refusal::new(ErrorCode::CredentialIncomplete, m))? {
        Rendering::Kept => Ok(kept()),
        Rendering::Owned(injected) => Ok(Injecting::Owned(injected)),
    }
}
