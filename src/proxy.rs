//! The pingora `ProxyHttp` implementation: phase wiring only. Each phase calls into the module
//! that owns that step of the request path (DESIGN.md §2).
//!
//! | phase                     | step                                                   |
//! |---------------------------|--------------------------------------------------------|
//! | `new_ctx`                 | take one config snapshot for the request's whole life  |
//! | `request_filter`          | 1–4: parse, caller, connector, policy (incl. DNS)      |
//! | `upstream_peer`           | 7: the vetted address, TLS, SNI = host name            |
//! | `upstream_request_filter` | 7: origin-form, `Host`, internal/hop-by-hop stripped   |
//! | `response_filter`         | strip sluice's error header from upstream responses    |
//! | `fail_to_proxy`           | map upstream failures to error codes                   |
//! | `logging`                 | 9: the access line                                     |

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};
use tracing::warn;

use crate::config::Snapshot;
use crate::credential::inject::{Injected, with_query_param};
use crate::credential::oauth::{OAuthClient, Scope, TokenError};
use crate::credential::{Connected, TenantState, Vault, VaultError};
use crate::ctx::RequestCtx;
use crate::error::{ERROR_HEADER, ErrorCode, Refusal};
use crate::logline::{self, Line, Value};
use crate::names::is_identifier;
use crate::policy::{self, Vetted};
use crate::ratelimit::breaker::{Outcome, Pass};
use crate::ratelimit::headers::{learn, retry_after};
use crate::ratelimit::retry::{replay_safe, retryable_status};
use crate::ratelimit::{Breakers, Decision, Limiter, bucket_key};
use crate::request::parse_target;
use crate::request::{
    STRIPPED_REQUEST_HEADERS, X_CONNECTOR, X_WORKSPACE, check_framing, check_header_limits,
    check_header_values, connection_listed,
};
use crate::tunnel;
use crate::upstream;
use std::time::Duration;
use tokio::time::Instant;

const REQUEST_ID: &str = "x-request-id";
/// The same names parsed once, for lookups and removals on every request.
const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID);
const ERROR_HEADER_NAME: HeaderName = HeaderName::from_static(ERROR_HEADER);
const X_CONNECTOR_NAME: HeaderName = HeaderName::from_static(X_CONNECTOR);
const X_WORKSPACE_NAME: HeaderName = HeaderName::from_static(X_WORKSPACE);

/// The gateway. Cheap to share: the config lives behind an `ArcSwap`.
pub struct Sluice {
    config: Arc<ArcSwap<Snapshot>>,
    vault: Option<Arc<Vault>>,
    oauth: Arc<OAuthClient>,
    limiter: Limiter,
    breakers: Breakers,
}

fn token_refusal(e: TokenError) -> Refusal {
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
            limiter: Limiter::new(shared_budgets.map(crate::ratelimit::shared::SharedBudget::new)),
            breakers: Breakers::default(),
        }
    }

    /// Tell the upstream host's breaker how an attempt went.
    fn record(&self, ctx: &RequestCtx, outcome: Outcome) {
        let (Some(vetted), Some(breaker)) = (&ctx.vetted, &ctx.breaker) else {
            return;
        };
        let Some(connector) = ctx.snapshot.connectors.get(&vetted.connector) else {
            return;
        };
        let changed = breaker.lock().expect("breaker lock").record(
            Instant::now(),
            outcome,
            &connector.breaker,
        );
        if let Some((from, to)) = changed {
            tracing::warn!(connector = %vetted.connector, host = %vetted.sni, state = to, "circuit breaker changed state");
            let metrics = &crate::telemetry::METRICS;
            metrics
                .circuit_transitions
                .with_label_values(&[connector.id.as_str(), to])
                .inc();
            // "Open" in the gauge means not closed: open or probing.
            let open = metrics
                .circuits_open
                .with_label_values(&[connector.id.as_str()]);
            match (from, to) {
                ("closed", _) => open.inc(),
                (_, "closed") => open.dec(),
                _ => {}
            }
        }
    }

    /// Step 6: take a token from the bucket, wait for one in the queue, or refuse.
    /// `Ok(false)`: the client left while waiting.
    async fn pace(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool, Refusal> {
        let Some(vetted) = &ctx.vetted else {
            return Ok(true);
        };
        let Some(connector) = ctx.snapshot.connectors.get(&vetted.connector) else {
            return Ok(true);
        };
        let rl = &connector.rate_limit;
        let key = bucket_key(rl, &vetted.connector, &vetted.workspace);
        let decision = self
            .limiter
            .admit(&key, rl, &vetted.workspace, Instant::now())
            .await;
        ctx.bucket = Some(key);
        match decision {
            Decision::Go => Ok(true),
            // Boxed: waiting holds the body-read future; inline, every request would copy it.
            other => Box::pin(wait_for_turn(session, connector, vetted, other)).await,
        }
    }

    /// A (forced, after a 401) token for an OAuth connector, rendered for injection.
    async fn oauth_token(
        &self,
        ctx: &RequestCtx,
        vetted: &Vetted,
        current: &Connected,
        force: bool,
    ) -> Result<(Arc<Connected>, Injected), Refusal> {
        let snap = &ctx.snapshot;
        let (Some(connector), Some(vault)) = (snap.connectors.get(&vetted.connector), &self.vault)
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
            rules: &**snap,
            vault,
            connector: connector.rules(),
            oauth: oauth2,
            workspace: &vetted.workspace,
            org: &vetted.org,
        };
        let token = self
            .oauth
            .token(&scope, current, force)
            .await
            .map_err(token_refusal)?;
        let injected = connector
            .injection
            .render(&token.fields)
            .map_err(|m| Refusal::new(ErrorCode::CredentialIncomplete, m))?;
        Ok((token, injected))
    }

    /// Step 5: the workspace's credential, rendered into what gets injected (and, for OAuth,
    /// the token state it came from).
    async fn credential(
        &self,
        ctx: &RequestCtx,
        vetted: &Vetted,
    ) -> Result<(Option<Injected>, Option<Arc<Connected>>), Refusal> {
        let Some(connector) = ctx.snapshot.connectors.get(&vetted.connector) else {
            return Err(Refusal::new(
                ErrorCode::Internal,
                "connector vanished from the snapshot",
            ));
        };
        if !connector.injection.needs_credential() {
            return Ok((None, None));
        }
        let vault = self.vault.as_ref().ok_or_else(|| {
            Refusal::new(ErrorCode::Internal, "no credential store is configured")
        })?;
        let (ws, conn) = (vetted.workspace.as_str(), vetted.connector.as_str());
        let state = vault.lookup(ws, conn).await.map_err(|e| match e {
            VaultError::Store(_) => Refusal::new(
                ErrorCode::CredentialStoreUnavailable,
                "the credential store is unavailable and no cached credential can be used",
            ),
            VaultError::Unreadable { .. } => Refusal::new(
                ErrorCode::CredentialUnreadable,
                format!("the stored credential for workspace {ws:?} and connector {conn:?} cannot be opened"),
            ),
            VaultError::Invalid(m) => Refusal::new(ErrorCode::Internal, m),
        })?;
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
                let (token, injected) = Box::pin(self.oauth_token(ctx, vetted, c, false)).await?;
                Ok((Some(injected), Some(token)))
            }
            TenantState::Connected(c) => connector
                .injection
                .render(&c.fields)
                .map(|i| (Some(i), None))
                .map_err(|m| Refusal::new(ErrorCode::CredentialIncomplete, m)),
        }
    }

    /// Steps 1–4. Returns the vetted destination or the first refusal.
    async fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Result<Vetted, Refusal> {
        let req = session.req_header();
        let connect = req.method == http::Method::CONNECT;
        if connect && ctx.tunnel.is_some() {
            return Err(Refusal::new(
                ErrorCode::ConnectNotSupported,
                "a CONNECT inside a CONNECT tunnel",
            ));
        }
        let head_bytes = session
            .as_downstream()
            .as_http1()
            .map_or(0, |h1| h1.get_headers_raw_bytes().len());
        let listener = &ctx.snapshot.listener;
        check_header_limits(
            &req.headers,
            head_bytes,
            listener.max_header_count,
            listener.max_header_bytes,
        )?;
        check_header_values(&req.headers)?;
        // The raw head is only needed (and only copied) when Transfer-Encoding is present.
        let raw_head = req
            .headers
            .contains_key(header::TRANSFER_ENCODING)
            .then(|| {
                session
                    .as_downstream()
                    .as_http1()
                    .map(|h1| h1.get_headers_raw_bytes())
            })
            .flatten();
        check_framing(&req.headers, raw_head.as_deref())?;

        // Inside a tunnel every request acts as the caller that opened it (clients do not
        // repeat Proxy-Authorization there; one that does is not asked twice).
        let (caller, user_workspace) = match &ctx.tunnel {
            Some(t) => (t.caller.clone(), None),
            None => {
                let auth = req
                    .headers
                    .get(header::PROXY_AUTHORIZATION)
                    .map(|v| v.as_bytes());
                ctx.snapshot.callers.authenticate_with_workspace(auth)?
            }
        };
        ctx.caller = Some(caller.clone());

        if connect {
            let (tunnel, vetted) = tunnel::admit_connect(
                &ctx.snapshot,
                caller,
                user_workspace.as_deref(),
                req.raw_path(),
                &req.headers,
                &mut ctx.target,
            )
            .await?;
            ctx.tunnel = Some(Arc::new(tunnel));
            return Ok(vetted);
        }
        match ctx.tunnel.clone() {
            Some(t) => {
                // The tunnel decided the connector and workspace; routing headers inside it
                // may repeat them, not change them. And it goes where the CONNECT said.
                for (name, bound) in [(X_CONNECTOR, &t.connector), (X_WORKSPACE, &t.workspace)] {
                    if req
                        .headers
                        .get(name)
                        .is_some_and(|v| v.as_bytes() != bound.as_bytes())
                    {
                        return Err(Refusal::new(
                            ErrorCode::InvalidRoutingHeader,
                            format!(
                                "{name} inside a tunnel opened for connector {:?}, workspace {:?}",
                                t.connector, t.workspace
                            ),
                        ));
                    }
                }
                let target = ctx
                    .target
                    .insert(parse_target(req.raw_path(), &req.headers)?);
                tunnel::check_inside(&t, target)?;
                policy::evaluate_routed(
                    &*ctx.snapshot,
                    Some(&caller),
                    &t.connector,
                    &t.workspace,
                    req.raw_path(),
                    &req.headers,
                    &mut ctx.target,
                    &mut (),
                )
                .await
            }
            None => {
                policy::evaluate(
                    &*ctx.snapshot,
                    Some(&caller),
                    req.raw_path(),
                    &req.headers,
                    &mut ctx.target,
                    &mut (),
                )
                .await
            }
        }
    }
}

/// The request id: the app's `X-Request-Id` when it is a sane identifier, else a fresh one.
fn request_id(session: &Session) -> String {
    match session.req_header().headers.get(&REQUEST_ID_NAME) {
        Some(v) if is_identifier(v.as_bytes()) => {
            String::from_utf8_lossy(v.as_bytes()).into_owned()
        }
        _ => format!("{:032x}", rand::random::<u128>()),
    }
}

/// Step 6 when the bucket did not say go: refuse, or wait for the request's turn (a
/// fair-queue turn or a bucket slot). `Ok(false)`: the client left while waiting.
async fn wait_for_turn(
    session: &mut Session,
    connector: &crate::config::Connector,
    vetted: &Vetted,
    decision: Decision,
) -> Result<bool, Refusal> {
    match decision {
        Decision::Go => Ok(true),
        Decision::Refuse(wait) => Err(Refusal::new(
            ErrorCode::RateLimited,
            format!("connector {:?} is at its rate limit", vetted.connector),
        )
        .with_retry_after(wait)),
        Decision::Turn(mut turn) => {
            let _leave = DepthGuard::enter();
            let released = if session.is_body_empty() {
                tokio::select! {
                    r = &mut turn => r.is_ok(),
                    _ = session.read_body_or_idle(true) => {
                        // Dropping the receiver frees the place and the turn.
                        count_wait(connector, "left");
                        return Ok(false);
                    }
                }
            } else {
                turn.await.is_ok()
            };
            if !released {
                return Err(Refusal::new(
                    ErrorCode::RateLimited,
                    format!("connector {:?} is at its rate limit", vetted.connector),
                )
                .with_retry_after(Duration::from_secs(1)));
            }
            count_wait(connector, "released");
            Ok(true)
        }
        Decision::Wait(wait, ticket) => {
            let _leave = DepthGuard::enter();
            // Without a body to read, a closed connection is visible while waiting: the
            // waiter then leaves and its place and slot go to the next.
            let left = if session.is_body_empty() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => false,
                    _ = session.read_body_or_idle(true) => true,
                }
            } else {
                tokio::time::sleep(wait).await;
                false
            };
            if left {
                drop(ticket);
                count_wait(connector, "left");
                return Ok(false);
            }
            ticket.used();
            count_wait(connector, "released");
            Ok(true)
        }
    }
}

/// A waited request's end in `sluice_rate_limit_waits_total`: `left` or `released`.
fn count_wait(connector: &crate::config::Connector, how: &str) {
    crate::telemetry::METRICS
        .rate_limit_waits
        .with_label_values(&[connector.id.as_str(), how])
        .inc();
}

/// Counts a request in the queue-depth gauge while it waits, however the wait ends.
struct DepthGuard(&'static prometheus::IntGauge);

impl DepthGuard {
    fn enter() -> Self {
        let depth = &crate::telemetry::METRICS.queue_depth;
        depth.inc();
        Self(depth)
    }
}

impl Drop for DepthGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Milliseconds between two phase marks (0 when the phase did not happen).
fn phase_ms(from: Option<std::time::Instant>, to: Option<std::time::Instant>) -> u64 {
    match (from, to) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_millis() as u64,
        _ => 0,
    }
}

impl Sluice {
    /// A CONNECT ends in `request_filter`: `200` and the connection stays open as the tunnel
    /// (its requests come next on it, bound to the tunnel), or sluice's refusal.
    async fn answer_connect(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        admitted: Result<Vetted, Refusal>,
    ) -> Result<bool> {
        let now = Some(std::time::Instant::now());
        (ctx.credential_done, ctx.wait_done) = (now, now);
        match admitted {
            Ok(vetted) => {
                ctx.vetted = Some(vetted);
                let mut resp = ResponseHeader::build(http::StatusCode::OK, Some(3))?;
                // No body follows a 2xx to CONNECT (RFC 9110 §9.3.6); the length only frames
                // it for pingora, which then reads the tunnel's first request.
                resp.insert_header(header::CONTENT_LENGTH, "0")?;
                resp.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
                // After a 2xx the connection is the tunnel (RFC 9110 §9.3.6), whatever an
                // HTTP/1.0 CONNECT (Python's http.client) or its Connection header says:
                // pingora keeps a connection only when the request's Connection header
                // allows it, and undici's CONNECT says `close`: the header is dropped first.
                session.req_header_mut().remove_header(&header::CONNECTION);
                session.set_keepalive(Some(60));
                session.write_response_header(Box::new(resp), false).await?;
                session.write_response_body(None, true).await?;
                Ok(true)
            }
            Err(refusal) => {
                let sent = respond(session, ctx, &refusal).await;
                ctx.refusal = Some(refusal);
                // A refused CONNECT never becomes a tunnel.
                ctx.tunnel = None;
                session.set_keepalive(None);
                sent.map(|()| true)
            }
        }
    }
}

/// Write sluice's own JSON error response.
async fn respond(session: &mut Session, ctx: &RequestCtx, refusal: &Refusal) -> Result<()> {
    let body: Bytes = refusal.body(&ctx.request_id);
    let mut resp = ResponseHeader::build(refusal.code.status(), Some(6))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(ERROR_HEADER, refusal.code.as_str())?;
    resp.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
    if let Some(seconds) = refusal
        .retry_after
        .or(refusal.code.retry_after().map(u64::from))
    {
        resp.insert_header(header::RETRY_AFTER, seconds.to_string())?;
    }
    if refusal.code == ErrorCode::ProxyAuthRequired {
        resp.append_header(header::PROXY_AUTHENTICATE, "Bearer realm=\"sluice\"")?;
        resp.append_header(header::PROXY_AUTHENTICATE, "Basic realm=\"sluice\"")?;
    }
    // After a malformed request the connection's state cannot be trusted; after any refusal
    // with an unread body, reusing it would need draining that body. Close in both cases.
    if refusal.code.status() == http::StatusCode::BAD_REQUEST
        || refusal.code == ErrorCode::ConnectNotSupported
        || !session.is_body_empty()
    {
        session.set_keepalive(None);
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Map a failure on the app's side of the exchange (pingora's downstream errors). Every
/// pingora error type is placed: framing the request broke (400), a body that stopped coming
/// (408), the app went away (nothing to answer: [`ErrorCode::ClientClosed`], logged).
fn downstream_refusal(e: &Error) -> Refusal {
    use ErrorType::*;
    let (code, what) = match e.etype() {
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade => (
            ErrorCode::MalformedRequest,
            "the request is not valid HTTP/1.1",
        ),
        // pingora's body parser: a chunk size that is not hex, a chunk without its CRLF,
        // broken trailers, a body shorter than its Content-Length.
        Custom("InvalidChunk") => (
            ErrorCode::MalformedRequest,
            "the request body's chunked framing is broken",
        ),
        Custom("InvalidTrailerEnd") => (
            ErrorCode::MalformedRequest,
            "the request body's trailers are broken",
        ),
        Custom("PrematureBodyEnd") => (
            ErrorCode::MalformedRequest,
            "the request body ended before its declared length",
        ),
        ReadTimedout => (
            ErrorCode::RequestTimeout,
            "the request body stopped arriving",
        ),
        ConnectionClosed | ReadError | WriteError | WriteTimedout | AcceptError | SocketError
        | TLSHandshakeFailure | TLSHandshakeTimedout | HandshakeError => {
            (ErrorCode::ClientClosed, "the client closed the connection")
        }
        ConnectTimedout | ConnectRefused | ConnectNoRoute | TLSWantX509Lookup | InvalidCert
        | ConnectError | BindError | ConnectProxyFailure | HTTPStatus(_) | FileOpenError
        | FileCreateError | FileReadError | FileWriteError | InternalError | UnknownError
        | Custom(_) | CustomCode(..) => (ErrorCode::Internal, "internal error"),
    };
    Refusal::new(code, format!("{what} ({})", e.etype().as_str()))
}

/// pingora reports every connect deadline as `ConnectTimedout` and tells them apart only in
/// the context text. The TCP connect's reads "timeout 5s connecting to server …"; the TLS
/// handshake's, which pingora's rustls connector also bounds by `connection_timeout`, reads
/// "connecting to server …, timeout 5s"; the total one (connect + `tls_handshake_timeout_ms`,
/// src/upstream.rs) reads "…, total-connection timeout 15s" and can only fire once TCP is up,
/// because the TCP deadline is shorter. So ", timeout " or "total-connection timeout" means
/// the handshake stalled (a peer's Display holds neither). `tests/gateway.rs` pins the
/// wording with an upstream that accepts and never answers the ClientHello. Error path only:
/// the rendering allocates.
fn tls_handshake_stalled(e: &Error) -> bool {
    let text = e.to_string();
    text.contains(", timeout ") || text.contains("total-connection timeout")
}

/// Map a pingora failure to sluice's error model.
fn refusal_for(e: &Error, ctx: &RequestCtx) -> Refusal {
    use ErrorType::*;
    let host = ctx.vetted.as_ref().map_or("upstream", |v| v.sni.as_str());
    if e.esource() == &ErrorSource::Downstream {
        return downstream_refusal(e);
    }
    let (code, what) = match e.etype() {
        ConnectTimedout if tls_handshake_stalled(e) => {
            (ErrorCode::UpstreamTlsFailed, "TLS handshake timed out")
        }
        ConnectTimedout => (ErrorCode::UpstreamConnectFailed, "connect timed out"),
        ConnectRefused | ConnectNoRoute | ConnectError | BindError | SocketError
        | ConnectProxyFailure => (ErrorCode::UpstreamConnectFailed, "connect failed"),
        TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError
        | TLSWantX509Lookup => (
            ErrorCode::UpstreamTlsFailed,
            "TLS handshake or certificate verification failed",
        ),
        ReadTimedout | WriteTimedout => (ErrorCode::UpstreamTimeout, "upstream timed out"),
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 | H2Downgrade | ReadError
        | WriteError | ConnectionClosed => (
            ErrorCode::UpstreamProtocolError,
            "upstream broke the HTTP exchange",
        ),
        _ => (ErrorCode::Internal, "internal error"),
    };
    Refusal::new(
        code,
        format!("{what} ({}) talking to {host}", e.etype().as_str()),
    )
}

impl Sluice {
    /// The connector's retry policy decides whether attempt `ctx.attempts` gets a successor;
    /// when it does, the wait is kept for `upstream_peer` and the retry is counted.
    fn decide_retry(
        &self,
        ctx: &mut RequestCtx,
        retry_after: Option<std::time::Duration>,
        reason: &str,
    ) -> bool {
        let Some(connector) = ctx
            .vetted
            .as_ref()
            .and_then(|v| ctx.snapshot.connectors.get(&v.connector))
        else {
            return false;
        };
        match connector.retry.next_delay(
            ctx.attempts,
            ctx.started.elapsed(),
            retry_after,
            rand::random::<f64>(),
        ) {
            Some(delay) => {
                crate::telemetry::METRICS
                    .retries
                    .with_label_values(&[connector.id.as_str(), reason])
                    .inc();
                ctx.retry_delay = Some(delay);
                true
            }
            None => false,
        }
    }
}

#[async_trait]
impl ProxyHttp for Sluice {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.config.load_full())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Requests pipelined behind this one (RFC 9112 §9.3.2) are kept and served in order
        // on this connection, each through its own pass (caller, policy, credential).
        // Without this pingora drops them and closes the connection after the first
        // response, which still said keep-alive.
        // Not for a CONNECT: what follows it is the tunnel (maybe TLS), never a request to
        // stash; bytes sent before its 200 close the connection instead.
        let connect = session.req_header().method == http::Method::CONNECT;
        session.as_downstream_mut().set_pipelining_enabled(!connect);
        ctx.request_id = request_id(session);
        let admitted = self.admit(session, ctx).await;
        ctx.policy_done = Some(std::time::Instant::now());
        if connect {
            return self.answer_connect(session, ctx, admitted).await;
        }
        let admitted = match admitted {
            Ok(vetted) => match self.credential(ctx, &vetted).await {
                Ok((injected, oauth)) => {
                    ctx.injected = injected;
                    ctx.oauth = oauth;
                    ctx.vetted = Some(vetted);
                    Ok(())
                }
                Err(refusal) => {
                    ctx.vetted = Some(vetted);
                    Err(refusal)
                }
            },
            Err(refusal) => Err(refusal),
        };
        ctx.credential_done = Some(std::time::Instant::now());
        let admitted = match admitted {
            Ok(()) => match self.pace(session, ctx).await {
                Ok(true) => Ok(()),
                Ok(false) => {
                    return Err(Error::explain(
                        ErrorType::ConnectionClosed,
                        "client left while waiting for the rate limit",
                    )
                    .into_down());
                }
                Err(refusal) => Err(refusal),
            },
            Err(refusal) => Err(refusal),
        };
        ctx.wait_done = Some(std::time::Instant::now());
        match admitted {
            Ok(()) => Ok(false),
            Err(refusal) => {
                let sent = respond(session, ctx, &refusal).await;
                ctx.refusal = Some(refusal);
                sent.map(|()| true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        if let Some(delay) = ctx.retry_delay.take() {
            tokio::time::sleep(delay).await;
        }
        if std::mem::take(&mut ctx.oauth_force) {
            // The retry after a 401: one forced refresh, then the request again.
            let (Some(vetted), Some(current)) = (ctx.vetted.clone(), ctx.oauth.clone()) else {
                return Error::e_explain(
                    ErrorType::InternalError,
                    "forced refresh without a token",
                );
            };
            match Box::pin(self.oauth_token(ctx, &vetted, &current, true)).await {
                Ok((token, injected)) => {
                    ctx.oauth = Some(token);
                    ctx.injected = Some(injected);
                }
                Err(refusal) => {
                    ctx.pending_refusal = Some(refusal);
                    return Error::e_explain(
                        ErrorType::InternalError,
                        "forced token refresh failed",
                    );
                }
            }
        }
        let vetted = ctx.vetted.as_ref().ok_or_else(|| {
            Error::explain(
                ErrorType::InternalError,
                "no vetted destination for request",
            )
        })?;
        if let Some(connector) = ctx.snapshot.connectors.get(&vetted.connector) {
            let breaker = ctx.breaker.get_or_insert_with(|| {
                self.breakers
                    .handle(&(vetted.connector.clone(), vetted.sni.clone()))
            });
            let pass = breaker
                .lock()
                .expect("breaker lock")
                .admit(Instant::now(), &connector.breaker);
            if let Pass::Reject(wait) = pass {
                ctx.pending_refusal = Some(
                    Refusal::new(
                        ErrorCode::CircuitOpen,
                        format!("{} is failing; its circuit breaker is open", vetted.sni),
                    )
                    .with_retry_after(wait),
                );
                return Error::e_explain(ErrorType::InternalError, "circuit open");
            }
        }
        Ok(Box::new(upstream::peer(vetted, &ctx.snapshot.upstream)))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let (Some(vetted), Some(target)) = (&ctx.vetted, &ctx.target) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "no vetted destination for request",
            );
        };
        match ctx.injected.as_ref().and_then(|i| i.query.as_ref()) {
            Some((name, value)) => {
                let path = with_query_param(&target.origin_form, name, value);
                upstream_request.set_raw_path(path.as_bytes())?;
            }
            None => upstream_request.set_raw_path(target.origin_form.as_bytes())?,
        }
        upstream_request.insert_header(header::HOST, vetted.host_header.as_str())?;
        for name in connection_listed(&upstream_request.headers) {
            upstream_request.remove_header(&name);
        }
        for name in &STRIPPED_REQUEST_HEADERS {
            upstream_request.remove_header(name);
        }
        // Last, so an injected header replaces whatever the app sent under that name.
        if let Some(injected) = &ctx.injected {
            for (name, value) in &injected.headers {
                upstream_request.insert_header(name.clone(), value.clone())?;
            }
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(v) = &ctx.vetted {
            if let Some((id, _)) = ctx.snapshot.connectors.get_key_value(&v.connector) {
                crate::telemetry::METRICS
                    .upstream_connections
                    .with_label_values(&[id.as_str(), if reused { "reused" } else { "opened" }])
                    .inc();
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The breaker learns from every attempt: transient statuses fail, 429 is the bucket's.
        let status = upstream_response.status;
        self.record(
            ctx,
            match status.as_u16() {
                502..=504 => Outcome::Failure,
                429 => Outcome::Neutral,
                _ => Outcome::Success,
            },
        );
        // Step 8: every response teaches the bucket.
        if let (Some(key), Some(connector)) = (
            &ctx.bucket,
            ctx.vetted
                .as_ref()
                .and_then(|v| ctx.snapshot.connectors.get(&v.connector)),
        ) {
            let rl = &connector.rate_limit;
            let learned = learn(
                &upstream_response.headers,
                &rl.headers,
                std::time::SystemTime::now(),
            );
            let too_many = upstream_response.status == http::StatusCode::TOO_MANY_REQUESTS;
            self.limiter
                .observe(key, rl, &learned, too_many, Instant::now())
                .await;
        }
        // Transient statuses: another attempt when it is safe and the policy allows it.
        if retryable_status(upstream_response.status) {
            let req = session.req_header();
            let safe = replay_safe(&req.method, req.headers.contains_key("idempotency-key"))
                && !session.as_downstream().retry_buffer_truncated();
            let retry_after = retry_after(&upstream_response.headers, std::time::SystemTime::now());
            if safe && self.decide_retry(ctx, retry_after, "status") {
                let mut e = Error::explain(
                    ErrorType::Custom("upstream_retryable_status"),
                    format!(
                        "upstream answered {}: retrying",
                        upstream_response.status.as_u16()
                    ),
                );
                e.set_retry(true);
                return Err(e);
            }
        }
        if upstream_response.status != http::StatusCode::UNAUTHORIZED
            || ctx.oauth.is_none()
            || ctx.oauth_retried
        {
            return Ok(());
        }
        let limit = ctx
            .vetted
            .as_ref()
            .and_then(|v| ctx.snapshot.connectors.get(&v.connector))
            .and_then(|c| c.oauth2.as_ref())
            .map_or(0, |o| o.replay_body_limit);
        let replayable =
            !session.as_downstream().retry_buffer_truncated() && session.body_bytes_read() <= limit;
        if !replayable {
            // The 401 goes to the app as it is.
            return Ok(());
        }
        ctx.oauth_retried = true;
        ctx.oauth_force = true;
        let mut e = Error::explain(
            ErrorType::Custom("oauth_token_rejected"),
            "upstream answered 401: one forced token refresh and one retry",
        );
        e.set_retry(true);
        Err(e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let _ = client_reused;
        let mut e = e.more_context(format!("Peer: {peer}"));
        if e.esource() == &ErrorSource::Downstream {
            // The app's side broke (a bad body, a closed connection): not the upstream's
            // fault, and nothing worth sending again.
            ctx.retry_delay = None;
            e.set_retry(false);
            return e;
        }
        let truncated = session.as_ref().retry_buffer_truncated();
        let decided = ctx.oauth_force || ctx.retry_delay.is_some();
        if !decided && e.esource() == &ErrorSource::Upstream {
            // A broken exchange (reset, timeout): the host is failing.
            self.record(ctx, Outcome::Failure);
        }
        let retry = if decided {
            // Decided already (a 401 with OAuth, or a retryable status): the upstream
            // answered without processing, so the replay is safe while the body is buffered.
            !truncated
        } else {
            // Broken mid-exchange: only requests that are safe to send twice.
            let req = session.req_header();
            replay_safe(&req.method, req.headers.contains_key("idempotency-key"))
                && !truncated
                && self.decide_retry(ctx, None, "io")
        };
        if !retry {
            ctx.retry_delay = None;
        }
        e.set_retry(retry);
        e
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.record(ctx, Outcome::Failure);
        // Nothing reached the upstream: any method may be tried again, within the policy.
        let retry = self.decide_retry(ctx, None, "connect");
        e.set_retry(retry);
        e
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Only sluice may name an error code: an upstream cannot forge one.
        upstream_response.remove_header(&ERROR_HEADER_NAME);
        upstream_response.remove_header(&header::PROXY_AUTHENTICATE);
        upstream_response.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let refusal = ctx
            .pending_refusal
            .take()
            .unwrap_or_else(|| refusal_for(e, ctx));
        if refusal.code == ErrorCode::ClientClosed {
            // Nobody to answer; the access line still says what happened.
            ctx.refusal = Some(refusal);
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let status = refusal.code.status().as_u16();
        // Once the upstream's response has started, its status cannot be taken back: the
        // connection is aborted (not reused) and the access line names the real outcome.
        if session.response_written().is_none() {
            if let Err(write_err) = respond(session, ctx, &refusal).await {
                warn!(request_id = %ctx.request_id, error = %write_err, "could not send error response");
            }
        }
        ctx.refusal = Some(refusal);
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    fn persist_connection_context(
        &self,
        session: &Session,
        ctx: &RequestCtx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        let tunnel = ctx.tunnel.clone()?;
        // The CONNECT's own answer: what comes next decides the tunnel's kind (server.rs).
        if session.req_header().method == http::Method::CONNECT {
            return Some(Box::new(tunnel::Opened(tunnel)));
        }
        Some(Box::new(tunnel))
    }

    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
        prev: Box<dyn std::any::Any + Send + Sync>,
    ) {
        match prev.downcast::<Arc<tunnel::Tunnel>>() {
            Ok(tunnel) => ctx.tunnel = Some(*tunnel),
            Err(other) => {
                if let Ok(opened) = other.downcast::<tunnel::Opened>() {
                    ctx.tunnel = Some(opened.0);
                }
            }
        }
    }

    /// What pingora's own error log lines say about a request: never the query string (it
    /// may carry credentials or personal data), never a header value.
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let method = &session.req_header().method;
        match &ctx.target {
            Some(t) => format!(
                "{method} {}{} request_id={}",
                t.host,
                t.path(),
                ctx.request_id
            ),
            None => format!("{method} request_id={}", ctx.request_id),
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let req = session.req_header();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let code = ctx.refusal.as_ref().map_or("ok", |r| r.code.as_str());
        let outcome_class = match &ctx.refusal {
            None => "forwarded",
            Some(r) if r.code.is_skip() => "skipped",
            Some(_) => "refused",
        };
        // Routing headers are logged only when they are identifiers (no log forging).
        // Identifiers are ASCII, so the `&str` borrows the header: nothing is copied.
        let routed = |name: &HeaderName| {
            req.headers
                .get(name)
                .filter(|v| is_identifier(v.as_bytes()))
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let (connector, workspace) = match &ctx.vetted {
            Some(v) => (v.connector.as_str(), v.workspace.as_str()),
            None => (routed(&X_CONNECTOR_NAME), routed(&X_WORKSPACE_NAME)),
        };
        let upstream = ctx.vetted.as_ref().map(|v| v.addr);
        let host = match ctx.target.as_ref().map(|t| &t.host) {
            Some(crate::policy::domain::Host::Name(name)) => Value::Bare(name),
            Some(literal) => Value::Shown(literal),
            None => Value::Bare(""),
        };
        let path = ctx.target.as_ref().map_or("", |t| t.path());
        let phase = |from, to| Value::U64(phase_ms(from, to));
        logline::emit(
            Line::Access,
            &[
                ("request_id", Value::Bare(&ctx.request_id)),
                ("connector", Value::Bare(connector)),
                ("workspace", Value::Bare(workspace)),
                (
                    "caller",
                    Value::Quoted(ctx.caller.as_ref().map_or("", |c| c.name.as_str())),
                ),
                ("method", Value::Bare(req.method.as_str())),
                ("host", host),
                ("path", Value::Quoted(path)),
                ("status", Value::U64(status.into())),
                ("outcome", Value::Quoted(code)),
                ("outcome_class", Value::Quoted(outcome_class)),
                ("upstream", Value::Addr(upstream)),
                (
                    "org",
                    Value::Quoted(ctx.vetted.as_ref().map_or("", |v| v.org.as_str())),
                ),
                ("retries", Value::U64(ctx.attempts.saturating_sub(1).into())),
                ("policy_ms", phase(Some(ctx.started), ctx.policy_done)),
                ("credential_ms", phase(ctx.policy_done, ctx.credential_done)),
                ("wait_ms", phase(ctx.credential_done, ctx.wait_done)),
                (
                    "upstream_ms",
                    phase(
                        ctx.wait_done.filter(|_| ctx.attempts > 0),
                        Some(std::time::Instant::now()),
                    ),
                ),
                (
                    "duration_ms",
                    Value::U64(ctx.started.elapsed().as_millis() as u64),
                ),
            ],
        );
        // Only configured connector ids become label values.
        let connector_label = ctx
            .snapshot
            .connectors
            .get_key_value(connector)
            .map_or("", |(k, _)| k.as_str());
        let metrics = &crate::telemetry::METRICS;
        let status_class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        metrics
            .requests
            .with_label_values(&[connector_label, code, outcome_class, status_class])
            .inc();
        metrics
            .request_seconds
            .with_label_values(&[connector_label, outcome_class])
            .observe(ctx.started.elapsed().as_secs_f64());
        if let (Some(start), true) = (ctx.wait_done, ctx.attempts > 0) {
            metrics
                .upstream_seconds
                .with_label_values(&[connector_label])
                .observe(start.elapsed().as_secs_f64());
        }
        if let Some(r) = &ctx.refusal {
            logline::emit(
                Line::Audit,
                &[
                    ("request_id", Value::Bare(&ctx.request_id)),
                    ("decision", Value::Quoted(outcome_class)),
                    ("host", host),
                    ("code", Value::Quoted(r.code.as_str())),
                    ("reason", Value::Bare(&r.message)),
                ],
            );
        } else if ctx.vetted.is_some() {
            logline::emit(
                Line::Audit,
                &[
                    ("request_id", Value::Bare(&ctx.request_id)),
                    ("decision", Value::Quoted("allowed")),
                    ("host", host),
                    ("upstream", Value::Addr(upstream)),
                ],
            );
        }
    }
}
