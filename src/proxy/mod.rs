//! The pingora `ProxyHttp` implementation. Each hook is a few lines that call the phase module
//! owning that step of the request path (ARCHITECTURE.md), in request order:
//!
//! | module         | hooks                                              | step                    |
//! |----------------|----------------------------------------------------|-------------------------|
//! | [`admit`]      | `request_filter` (first half)                      | 1–4: parse, caller, policy (incl. DNS); the connector resolved once |
//! | [`action`]     | `request_filter`, `request_body_filter`, `upstream_request_filter` | 1–4 for a connector action call; its request built |
//! | [`connect`]    | `request_filter` for CONNECT, connection context    | the tunnel's admission  |
//! | [`credential`] | `request_filter`, `upstream_peer` (forced refresh) | 5: credential, OAuth    |
//! | [`pace`]       | `request_filter` (last), `upstream_response_filter` | 6: buckets; 8: learning |
//! | [`attempt`]    | `upstream_peer`, `upstream_request_filter`, retries, breaker | 7: each attempt |
//! | [`respond`]    | `response_filter`, `fail_to_proxy`                 | sluice's own answers, pingora errors mapped |
//! | [`log`]        | `logging`                                          | 9: access and audit lines, metrics |

mod action;
mod admit;
mod attempt;
mod connect;
mod credential;
mod log;
mod pace;
mod respond;

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::header::HeaderName;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::config::Snapshot;
use crate::credential::Vault;
use crate::credential::oauth::OAuthClient;
use crate::ctx::RequestCtx;
use crate::error::{ERROR_HEADER, Refusal};
use crate::ratelimit::shared::SharedBudget;
use crate::ratelimit::{Breakers, Limiter};

const REQUEST_ID: &str = "x-request-id";
/// The same names parsed once, for lookups and removals on every request.
const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID);
const ERROR_HEADER_NAME: HeaderName = HeaderName::from_static(ERROR_HEADER);

/// The gateway. Cheap to share: the config lives behind an `ArcSwap`.
pub struct Sluice {
    config: Arc<ArcSwap<Snapshot>>,
    vault: Option<Arc<Vault>>,
    oauth: Arc<OAuthClient>,
    limiter: Limiter,
    breakers: Breakers,
}

impl Sluice {
    pub fn new(
        config: Arc<ArcSwap<Snapshot>>,
        vault: Option<Arc<Vault>>,
        oauth: Arc<OAuthClient>,
        shared_budgets: Option<Arc<crate::credential::redis::RedisStore>>,
    ) -> Self {
        Self {
            config,
            vault,
            oauth,
            limiter: Limiter::new(shared_budgets.map(SharedBudget::new)),
            breakers: Breakers::default(),
        }
    }

    /// Steps 5–6 for an admitted request that is not a CONNECT: the credential rendered, the
    /// call paced. `Ok(false)`: the client left while waiting for its turn.
    async fn prepare(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        admitted: Result<(), Refusal>,
    ) -> Result<bool, Refusal> {
        let credential = match admitted {
            Ok(()) => self.credential(ctx).await,
            Err(refusal) => Err(refusal),
        };
        ctx.credential_done = Some(std::time::Instant::now());
        let paced = match credential {
            Ok(()) => self.pace(session, ctx).await,
            Err(refusal) => Err(refusal),
        };
        // `pace` marks a request that went straight through (no second clock read).
        if paced != Ok(false) && ctx.wait_done.is_none() {
            ctx.wait_done = Some(std::time::Instant::now());
        }
        paced
    }
}

#[async_trait]
impl ProxyHttp for Sluice {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.config.load_full())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let connect = admit::start(session, ctx);
        let admitted = if !connect && action::is_call(session, ctx) {
            self.admit_action(session, ctx).await?
        } else {
            self.admit(session, ctx).await
        };
        ctx.policy_done = Some(std::time::Instant::now());
        if connect {
            return self.answer_connect(session, ctx, admitted).await;
        }
        match self.prepare(session, ctx, admitted).await {
            Ok(true) => Ok(false),
            Ok(false) => Err(pace::client_left()),
            Err(refusal) => respond::refuse(session, ctx, refusal).await,
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        self.next_peer(ctx).await
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(call) = &ctx.action {
            action::rewrite_head(upstream_request, call)?;
        }
        attempt::rewrite_request(upstream_request, ctx)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        action::body_filter(ctx, body, end_of_stream);
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        attempt::count_connection(ctx, reused);
        attempt::check_tls_version(ctx, digest)
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.record_status(ctx, upstream_response.status);
        self.learn(ctx, upstream_response).await;
        self.retry_on_response(session, upstream_response, ctx)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        self.retry_on_error(session, e.more_context(format!("Peer: {peer}")), ctx)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        self.retry_on_connect_failure(ctx, e)
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        respond::strip_upstream_headers(upstream_response, ctx)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        respond::fail(session, e, ctx).await
    }

    fn persist_connection_context(
        &self,
        session: &Session,
        ctx: &RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        connect::persist(session, ctx)
    }

    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        prev: Box<dyn std::any::Any + Send + Sync>,
    ) {
        connect::resume(ctx, prev);
    }

    /// What pingora's own error log lines say about a request: never the query string (it
    /// may carry credentials or personal data), never a header value.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        log::summary(session, ctx)
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        log::request_done(session, ctx);
    }
}
