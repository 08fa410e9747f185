//! Step 6: the call paced by its connector's token bucket (go, wait in the fair queue, or
//! refuse with `Retry-After`); step 8: every upstream response teaches the bucket what the
//! API's rate-limit headers said.

use std::time::Duration;

use pingora::ErrorType;
use pingora::prelude::*;
use pingora::proxy::Session;
use tokio::time::Instant;

use super::Sluice;
use crate::config::Connector;
use crate::ctx::RequestState;
use crate::error::{ErrorCode, Refusal};
use crate::label::Label;
use crate::ratelimit::headers::learn;
use crate::ratelimit::{Decision, bucket_key};
use crate::telemetry::WaitResult;

impl Sluice {
    /// Take a token from the bucket, wait for one in the queue, or refuse.
    /// `Ok(false)`: the client left while waiting.
    pub(super) async fn pace(
        &self,
        session: &mut Session,
        ctx: &mut RequestState,
    ) -> Result<bool, Refusal> {
        let (Some(vetted), Some(connector)) = (&ctx.vetted, &ctx.connector) else {
            return Ok(true);
        };
        let rl = &connector.rate_limit;
        // The wait phase starts where the credential phase ended: that instant is its "now".
        let now = ctx
            .credential_done
            .map_or_else(Instant::now, Instant::from_std);
        let key = bucket_key(rl, vetted.connector(), vetted.workspace());
        let decision = self.limiter.admit(&key, rl, vetted.workspace(), now).await;
        ctx.paced = true;
        match decision {
            Decision::Go => {
                // No wait: the wait phase ends where the credential phase did.
                ctx.wait_done = ctx.credential_done;
                Ok(true)
            }
            // Boxed: waiting holds the body-read future; inline, every request would copy it.
            other => Box::pin(wait_for_turn(session, connector, other)).await,
        }
    }

    /// Step 8: the response's rate-limit headers (and a 429) adjust the bucket it drew from.
    pub(super) async fn learn(&self, ctx: &RequestState, response: &ResponseHeader) {
        let (true, Some(vetted), Some(connector)) = (ctx.paced, &ctx.vetted, &ctx.connector) else {
            return;
        };
        let rl = &connector.rate_limit;
        let too_many = response.status == http::StatusCode::TOO_MANY_REQUESTS;
        // Most responses say nothing about the limit: no clock read, no bucket lookup.
        if !too_many && !rl.headers.present_in(&response.headers) {
            return;
        }
        let learned = learn(&response.headers, &rl.headers, std::time::SystemTime::now());
        let key = bucket_key(rl, vetted.connector(), vetted.workspace());
        self.limiter
            .observe(&key, rl, &learned, too_many, Instant::now())
            .await;
    }
}

/// The error that ends a request whose client left while it waited: nobody to answer, and
/// the access line says `client_closed`.
pub(super) fn client_left() -> Box<Error> {
    Error::explain(
        ErrorType::ConnectionClosed,
        "client left while waiting for the rate limit",
    )
    .into_down()
}

fn rate_limited(connector: &Connector, retry_after: Duration) -> Refusal {
    Refusal::new(
        ErrorCode::RateLimited,
        format!("connector {:?} is at its rate limit", connector.id),
    )
    .with_retry_after(retry_after)
}

/// When the bucket did not say go: refuse, or wait for the request's turn (a fair-queue
/// turn or a bucket slot). `Ok(false)`: the client left while waiting.
async fn wait_for_turn(
    session: &mut Session,
    connector: &Connector,
    decision: Decision,
) -> Result<bool, Refusal> {
    // Dropping the turn or the ticket (the client left, or its max_wait was up) gives its
    // place and its slot to the next waiter.
    let waited = match decision {
        Decision::Go => return Ok(true),
        Decision::Refuse(wait) => return Err(rate_limited(connector, wait)),
        Decision::Turn(mut turn) => {
            let _leave = DepthGuard::enter();
            until_turn(session, turn.wait()).await
        }
        Decision::Wait(mut ticket) => {
            let _leave = DepthGuard::enter();
            let waited = until_turn(session, ticket.turn()).await;
            if let Some(Ok(())) = waited {
                ticket.used();
            }
            waited
        }
    };
    match waited {
        None => {
            count_wait(connector, WaitResult::Left);
            Ok(false)
        }
        Some(Err(retry_after)) => {
            count_wait(connector, WaitResult::Expired);
            Err(rate_limited(connector, retry_after))
        }
        Some(Ok(())) => {
            count_wait(connector, WaitResult::Released);
            Ok(true)
        }
    }
}

/// Wait for `turn`, or until the client leaves. Without a body to read, a closed connection
/// is visible while waiting. `None`: the client left.
async fn until_turn(
    session: &mut Session,
    turn: impl std::future::Future<Output = Result<(), Duration>>,
) -> Option<Result<(), Duration>> {
    if session.is_body_empty() {
        tokio::select! {
            waited = turn => Some(waited),
            _ = session.read_body_or_idle(true) => None,
        }
    } else {
        Some(turn.await)
    }
}

/// A waited request's end in `sluice_rate_limit_waits_total`: `left`, `expired` or `released`.
fn count_wait(connector: &Connector, how: WaitResult) {
    crate::telemetry::METRICS
        .rate_limit_waits
        .with_label_values(&[connector.id.as_str(), how.as_label()])
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
