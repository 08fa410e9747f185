//! Step 7, each upstream attempt: the retry's wait (or forced token refresh) first, the
//! breaker's say, the vetted peer; the request rewritten for the upstream; the attempt's
//! outcome told to the breaker; and whether another attempt follows (the connector's retry
//! policy, only for what is safe to send twice).

use http::header;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::{ErrorSource, ErrorType};
use tokio::time::Instant;

use super::Sluice;
use crate::credential::inject::with_query_param;
use crate::ctx::{NextAttempt, RequestState};
use crate::error::{ErrorCode, Refusal};
use crate::label::Label;
use crate::ratelimit::breaker::{Outcome, Pass};
use crate::ratelimit::headers::retry_after;
use crate::ratelimit::retry::{replay_safe, retryable_status};
use crate::request::stripped_names;
use crate::telemetry::{ConnectionUse, RetryReason};
use crate::upstream;

/// A pingora error that ends the attempt because sluice refused it; `fail_to_proxy` finds
/// the refusal in the error's cause and answers with it.
fn refused(what: &'static str, refusal: Refusal) -> Box<Error> {
    Error::because(ErrorType::InternalError, what, refusal)
}

impl Sluice {
    /// `upstream_peer`: the next attempt's peer, after what the retry decision asked for.
    pub(super) async fn next_peer(&self, ctx: &mut RequestState) -> Result<Box<HttpPeer>> {
        ctx.attempts += 1;
        match std::mem::take(&mut ctx.next) {
            NextAttempt::None => {}
            NextAttempt::After(delay) => tokio::time::sleep(delay).await,
            NextAttempt::RefreshToken => self.refresh_token(ctx).await?,
        }
        let (Some(vetted), Some(connector)) = (&ctx.vetted, &ctx.connector) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "no vetted destination for request",
            );
        };
        // While every breaker is at rest the attempt needs none (`Breakers` says why); once
        // one is not, the request looks its own up and keeps it for its retries.
        let pass = if ctx.breaker.is_none() && self.breakers.all_at_rest() {
            Pass::Allow
        } else {
            let breaker = ctx
                .breaker
                .get_or_insert_with(|| self.breakers.handle(vetted.connector(), vetted.sni()));
            // The first attempt follows the wait phase at once: its end is the breaker's
            // "now" (one clock read fewer per request). Retries read the clock.
            let now = match ctx.wait_done {
                Some(done) if ctx.attempts == 1 => Instant::from_std(done),
                _ => Instant::now(),
            };
            self.breakers.admit(breaker, now, &connector.breaker)
        };
        if let Pass::Reject(wait) = pass {
            let refusal = Refusal::new(
                ErrorCode::CircuitOpen,
                format!("{} is failing; its circuit breaker is open", vetted.sni()),
            )
            .with_retry_after(wait);
            return Err(refused("circuit open", refusal));
        }
        Ok(Box::new(upstream::peer(
            vetted,
            &ctx.snapshot.upstream,
            &connector.tls,
        )))
    }

    /// The retry after a 401: one forced refresh, then the request again.
    async fn refresh_token(&self, ctx: &mut RequestState) -> Result<()> {
        let Some(current) = ctx.oauth.clone() else {
            return Error::e_explain(ErrorType::InternalError, "forced refresh without a token");
        };
        match Box::pin(self.oauth_token(ctx, &current, true)).await {
            Ok((token, injecting)) => {
                ctx.oauth = Some(token);
                ctx.injecting = Some(injecting);
                Ok(())
            }
            Err(refusal) => Err(refused("forced token refresh failed", refusal)),
        }
    }

    /// Tell the upstream host's breaker how an attempt went.
    fn record(&self, ctx: &RequestState, outcome: Outcome) {
        let (Some(vetted), Some(connector)) = (&ctx.vetted, &ctx.connector) else {
            return;
        };
        let looked_up;
        let breaker = match &ctx.breaker {
            Some(breaker) => breaker,
            // Admitted without one, while every breaker was at rest: a success or a 429 on a
            // breaker at rest changes nothing. Anything else needs the breaker now.
            None if outcome != Outcome::Failure && self.breakers.all_at_rest() => return,
            None => {
                looked_up = self.breakers.handle(vetted.connector(), vetted.sni());
                &looked_up
            }
        };
        // The clock is read only when a failure opens the breaker (not for the usual success).
        self.breakers.record(
            breaker,
            (vetted.connector(), vetted.sni()),
            Instant::now,
            outcome,
            &connector.breaker,
        );
    }

    /// The breaker learns from every answered attempt: transient statuses fail, 429 is the
    /// bucket's business.
    pub(super) fn record_status(&self, ctx: &RequestState, status: http::StatusCode) {
        let outcome = match status.as_u16() {
            502..=504 => Outcome::Failure,
            429 => Outcome::Neutral,
            _ => Outcome::Success,
        };
        self.record(ctx, outcome);
    }

    /// The connector's retry policy decides whether attempt `ctx.attempts` gets a successor;
    /// when it does, the wait is kept for the next `upstream_peer` and the retry is counted.
    fn decide_retry(
        &self,
        ctx: &mut RequestState,
        retry_after: Option<std::time::Duration>,
        reason: RetryReason,
    ) -> bool {
        let Some(connector) = &ctx.connector else {
            return false;
        };
        let delay = connector.retry.next_delay(
            ctx.attempts,
            ctx.started.elapsed(),
            retry_after,
            rand::random::<f64>(),
        );
        let Some(delay) = delay else {
            return false;
        };
        crate::telemetry::METRICS
            .retries
            .with_label_values(&[connector.id.as_str(), reason.as_label()])
            .inc();
        ctx.next = NextAttempt::After(delay);
        true
    }

    /// `upstream_response_filter`: a transient status is retried when it is safe and the
    /// policy allows it; a 401 on an OAuth connector gets one forced refresh and one retry.
    pub(super) fn retry_on_response(
        &self,
        session: &Session,
        response: &ResponseHeader,
        ctx: &mut RequestState,
    ) -> Result<()> {
        let replay_truncated = session.as_downstream().retry_buffer_truncated();
        if retryable_status(response.status) {
            let req = session.req_header();
            let method = super::action::method(session, ctx);
            let safe = replay_safe(method, req.headers.contains_key("idempotency-key"))
                && !replay_truncated;
            let retry_after = retry_after(&response.headers, std::time::SystemTime::now());
            if safe && self.decide_retry(ctx, retry_after, RetryReason::Status) {
                let mut e = Error::explain(
                    ErrorType::Custom("upstream_retryable_status"),
                    format!("upstream answered {}: retrying", response.status.as_u16()),
                );
                e.set_retry(true);
                return Err(e);
            }
        }
        if response.status != http::StatusCode::UNAUTHORIZED
            || ctx.oauth.is_none()
            || ctx.oauth_retried
        {
            return Ok(());
        }
        let limit = ctx
            .connector
            .as_ref()
            .and_then(|c| c.oauth2.as_ref())
            .map_or(0, |o| o.replay_body_limit);
        if replay_truncated || session.body_bytes_read() > limit {
            // Not replayable: the 401 goes to the app as it is.
            return Ok(());
        }
        ctx.oauth_retried = true;
        ctx.next = NextAttempt::RefreshToken;
        let mut e = Error::explain(
            ErrorType::Custom("oauth_token_rejected"),
            "upstream answered 401: one forced token refresh and one retry",
        );
        e.set_retry(true);
        Err(e)
    }

    /// `error_while_proxy`: whether a broken exchange is tried again.
    pub(super) fn retry_on_error(
        &self,
        session: &Session,
        mut e: Box<Error>,
        ctx: &mut RequestState,
    ) -> Box<Error> {
        if e.root_cause().downcast_ref::<Refusal>().is_some() {
            // sluice refused the attempt itself (a TLS version below the connector's
            // minimum): another attempt would be refused the same way.
            ctx.next = NextAttempt::None;
            e.set_retry(false);
            return e;
        }
        if e.esource() == &ErrorSource::Downstream {
            // The app's side broke (a bad body, a closed connection): not the upstream's
            // fault, and nothing worth sending again.
            ctx.next = NextAttempt::None;
            e.set_retry(false);
            return e;
        }
        let truncated = session.as_ref().retry_buffer_truncated();
        let decided = ctx.next.is_decided();
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
            replay_safe(
                super::action::method(session, ctx),
                req.headers.contains_key("idempotency-key"),
            ) && !truncated
                && self.decide_retry(ctx, None, RetryReason::Io)
        };
        if !retry {
            ctx.next = NextAttempt::None;
        }
        e.set_retry(retry);
        e
    }

    /// `fail_to_connect`: nothing reached the upstream, so any method may be tried again,
    /// within the policy.
    pub(super) fn retry_on_connect_failure(
        &self,
        ctx: &mut RequestState,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.record(ctx, Outcome::Failure);
        let retry = self.decide_retry(ctx, None, RetryReason::Connect);
        e.set_retry(retry);
        e
    }
}

/// `upstream_request_filter`: origin-form with the injected query parameter, the vetted
/// `Host`, hop-by-hop and internal headers stripped, the injected headers last.
pub(super) fn rewrite_request(
    upstream_request: &mut RequestHeader,
    ctx: &RequestState,
) -> Result<()> {
    let (Some(vetted), Some(target)) = (&ctx.vetted, &ctx.target) else {
        return Error::e_explain(
            ErrorType::InternalError,
            "no vetted destination for request",
        );
    };
    let injected = ctx.injected();
    match injected.and_then(|i| i.query.as_ref()) {
        Some((name, value)) => {
            let path = with_query_param(&target.origin_form, name, value);
            upstream_request.set_raw_path(path.as_bytes())?;
        }
        None => upstream_request.set_raw_path(target.origin_form.as_bytes())?,
    }
    upstream_request.insert_header(header::HOST, vetted.host_header())?;
    for name in stripped_names(&upstream_request.headers) {
        upstream_request.remove_header(&name);
    }
    // Last, so an injected header replaces whatever the app sent under that name.
    if let Some(injected) = injected {
        for (name, value) in &injected.headers {
            upstream_request.insert_header(name.clone(), value.clone())?;
        }
    }
    Ok(())
}

/// `connected_to_upstream`: a connector that asks for TLS 1.3 sends nothing over a
/// connection that negotiated less (pingora's rustls connector offers 1.2 and 1.3 to every
/// peer; the version is checked here, after the handshake and before the request).
pub(super) fn check_tls_version(
    ctx: &RequestState,
    digest: Option<&pingora::protocols::Digest>,
) -> Result<()> {
    let Some(connector) = &ctx.connector else {
        return Ok(());
    };
    if connector.tls.min_version == crate::upstream::TlsVersion::V1_2 {
        return Ok(());
    }
    let version = digest
        .and_then(|d| d.ssl_digest.as_ref())
        .map_or("", |s| s.version.as_ref());
    if connector.tls.accepts(version) {
        return Ok(());
    }
    let host = ctx.vetted.as_ref().map_or("upstream", |v| v.sni());
    let refusal = Refusal::new(
        ErrorCode::UpstreamTlsFailed,
        format!(
            "{host} negotiated {}; connector {:?} requires TLS 1.3",
            if version.is_empty() {
                "no TLS version"
            } else {
                version
            },
            connector.id
        ),
    );
    Err(refused(
        "TLS version below the connector's minimum",
        refusal,
    ))
}

/// `connected_to_upstream`: `sluice_upstream_connections_total`, opened or reused.
pub(super) fn count_connection(ctx: &RequestState, reused: bool) {
    let how = if reused {
        ConnectionUse::Reused
    } else {
        ConnectionUse::Opened
    };
    if let Some(connector) = &ctx.connector {
        crate::telemetry::METRICS
            .upstream_connections
            .with_label_values(&[connector.id.as_str(), how.as_label()])
            .inc();
    }
}
