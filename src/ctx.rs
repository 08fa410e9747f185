//! The per-request context (pingora's `CTX`): everything one request accumulates on its way
//! through the phases. Later steps (credential, pacing, retries) add their state here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::caller::Caller;
use crate::config::{Connector, Snapshot};
use crate::credential::inject::Injected;
use crate::credential::{Connected, TenantState};
use crate::error::Refusal;
use crate::policy::Vetted;
use crate::request::Target;

/// Where a request's injection lives: read in place from the credential that keeps it, or
/// owned by the request.
pub enum Injecting {
    /// Kept on this cached credential ([`Connected::kept`]).
    Kept(Arc<TenantState>),
    /// Kept on this OAuth token's state.
    KeptOnToken(Arc<Connected>),
    /// Rendered for this request only.
    Owned(Injected),
}

impl Injecting {
    pub fn get(&self) -> Option<&Injected> {
        match self {
            Injecting::Kept(state) => match &**state {
                TenantState::Connected(c) => c.kept(),
                _ => None,
            },
            Injecting::KeptOnToken(token) => token.kept(),
            Injecting::Owned(injected) => Some(injected),
        }
    }
}

/// The retry state: what the next upstream attempt does before connecting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NextAttempt {
    /// No retry decided (the first attempt, or the last one failed for good).
    #[default]
    None,
    /// A retry after a transient failure, once this backoff has passed.
    After(Duration),
    /// The retry after an upstream 401 on an OAuth connector: one forced refresh first.
    RefreshToken,
}

impl NextAttempt {
    pub fn is_decided(self) -> bool {
        self != Self::None
    }
}

/// A connector action call (`POST /v1/actions/…`): what the upstream request is made of.
#[derive(Debug, Clone)]
pub struct ActionCall {
    pub action_id: String,
    /// The action's method (the app's request was a POST to sluice).
    pub method: http::Method,
    /// The JSON body sent upstream on every attempt; `None` for methods without one.
    pub body: Option<bytes::Bytes>,
}

/// pingora's `CTX`: a handle on the request's [`RequestState`], which lives on the heap.
///
/// pingora keeps the `CTX` by value inside its per-request future, and that future is built on
/// the stack and then moved into a box: every byte of it is copied once per request. Held by
/// value, the state made the future about 1.7 KB larger (callgrind: 15.2k against the floor's
/// 13.4k bytes of that copy); behind a box it costs one small allocation instead. Fields are
/// reached through `Deref`, so `ctx.snapshot` reads as before.
pub struct RequestCtx(Box<RequestState>);

impl std::ops::Deref for RequestCtx {
    type Target = RequestState;

    fn deref(&self) -> &RequestState {
        &self.0
    }
}

impl std::ops::DerefMut for RequestCtx {
    fn deref_mut(&mut self) -> &mut RequestState {
        &mut self.0
    }
}

/// A request id: sluice's 32 hex digits, or the app's identifier.
pub type RequestId = arrayvec::ArrayString<128>;

/// Everything one request accumulates on its way through the phases (see [`RequestCtx`]).
pub struct RequestState {
    /// The config this request was admitted under, for its whole life (a reload does not
    /// change a request in flight).
    pub snapshot: Arc<Snapshot>,
    /// Accepted from a well-formed `X-Request-Id`, or generated; returned to the app. Held
    /// inline: an identifier is at most 128 bytes ([`crate::names::is_identifier`]).
    pub request_id: RequestId,
    pub started: Instant,
    /// Phase boundaries, for the access line's timings.
    pub policy_done: Option<Instant>,
    pub credential_done: Option<Instant>,
    pub wait_done: Option<Instant>,
    pub caller: Option<Arc<Caller>>,
    /// Where the app asked to go, once the target parsed (also for refused requests).
    pub target: Option<Target>,
    /// Set when every policy check passed; the only source of the upstream peer.
    pub vetted: Option<Vetted>,
    /// The vetted connector, resolved once at admission; every later step reads it here.
    pub connector: Option<Arc<Connector>>,
    /// What to inject upstream, rendered from the workspace's credential before connecting
    /// ([`RequestState::injected`] reads it).
    pub injecting: Option<Injecting>,
    /// Upstream attempts made so far.
    pub attempts: u32,
    /// What the next attempt must do first, once a retry was decided.
    pub next: NextAttempt,
    /// The circuit breaker of the vetted (connector, host), once the first attempt looked it up.
    pub breaker: Option<crate::ratelimit::BreakerHandle>,
    /// The request drew from its rate-limit bucket (its response teaches it).
    pub paced: bool,
    /// OAuth connectors: the token state injected, kept for a forced refresh after a 401.
    pub oauth: Option<Arc<Connected>>,
    /// An upstream 401 asked for one forced refresh and one retry already (it is only one).
    pub oauth_retried: bool,
    /// Set when sluice answered the request itself.
    pub refusal: Option<Refusal>,
    /// The CONNECT tunnel this connection is (from the CONNECT itself, then carried from
    /// request to request as the connection's context).
    pub tunnel: Option<Arc<crate::tunnel::Tunnel>>,
    /// Set for a connector action call, once its inputs built the upstream request.
    pub action: Option<ActionCall>,
}

impl RequestState {
    /// What to inject upstream, if the credential step set anything.
    pub fn injected(&self) -> Option<&Injected> {
        self.injecting.as_ref().and_then(Injecting::get)
    }
}

impl RequestCtx {
    pub fn new(snapshot: Arc<Snapshot>) -> Self {
        Self(Box::new(RequestState {
            snapshot,
            request_id: RequestId::new(),
            started: Instant::now(),
            policy_done: None,
            credential_done: None,
            wait_done: None,
            caller: None,
            target: None,
            vetted: None,
            connector: None,
            injecting: None,
            attempts: 0,
            next: NextAttempt::None,
            breaker: None,
            paced: false,
            oauth: None,
            oauth_retried: false,
            refusal: None,
            tunnel: None,
            action: None,
        }))
    }
}
