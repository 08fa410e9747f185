//! Connector actions on the proxy listener: `POST /v1/actions/{connector}/{action_id}` with
//! `X-Workspace` and a JSON object of inputs. Admission here replaces steps 1–4 of a proxied
//! request (the caller, the action, its inputs read whole, the filled URL vetted by the same
//! policy); steps 5–9 are the proxied request's own: the credential, pacing, each attempt and
//! its retries, the logs. The upstream request is rebuilt from the action
//! ([`rewrite_request`]), never from the app's head.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use pingora::prelude::*;
use pingora::proxy::Session;

use super::Sluice;
use super::admit::check_head;
use crate::action::{self, MAX_INPUT_BYTES};
use crate::ctx::{ActionCall, RequestState};
use crate::error::{ErrorCode, Refusal};
use crate::policy;
use crate::request::{X_CONNECTOR, X_WORKSPACE, single_identifier};

/// The app's headers an action's upstream request keeps; every other one is dropped (the
/// request is the action's, not the app's: no cookies, no auth, no forwarding headers).
const KEPT_HEADERS: [HeaderName; 5] = [
    header::ACCEPT,
    header::ACCEPT_LANGUAGE,
    header::USER_AGENT,
    HeaderName::from_static("idempotency-key"),
    HeaderName::from_static("x-request-id"),
];

/// A body declared over the limit, up to this size, is read and dropped before the 413.
const DRAIN_LIMIT: u64 = 1024 * 1024;

/// Whether this request is an action call: origin-form on the action path, outside any
/// tunnel, and without `X-Connector` (a proxied request names its connector in that header;
/// an action call names it in the path).
pub(super) fn is_call(session: &Session, ctx: &RequestState) -> bool {
    let req = session.req_header();
    ctx.tunnel.is_none()
        && req.raw_path().starts_with(action::PATH_PREFIX.as_bytes())
        && !req.headers.contains_key(X_CONNECTOR)
}

impl Sluice {
    /// Steps 1–4 of an action call. The outer error is pingora's (the body could not be read:
    /// mapped like any broken body); the inner one is sluice's refusal.
    pub(super) async fn admit_action(
        &self,
        session: &mut Session,
        ctx: &mut RequestState,
    ) -> Result<Result<(), Refusal>> {
        let (connector_id, action) = match route(session, ctx) {
            Ok(routed) => routed,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let input = match read_input(session).await? {
            Ok(input) => input,
            Err(refusal) => return Ok(Err(refusal)),
        };
        Ok(self
            .vet_action(session, ctx, &connector_id, &action, &input)
            .await)
    }

    /// The inputs built into the upstream request, and its destination vetted.
    async fn vet_action(
        &self,
        session: &Session,
        ctx: &mut RequestState,
        connector_id: &str,
        action: &action::Action,
        input: &[u8],
    ) -> Result<(), Refusal> {
        let built = action.build(input)?;
        let workspace = single_identifier(
            &session.req_header().headers,
            X_WORKSPACE,
            ErrorCode::MissingWorkspace,
        )?;
        let vetted = policy::evaluate_built(
            &*ctx.snapshot,
            ctx.caller.as_deref(),
            connector_id,
            workspace,
            built.target,
            &mut ctx.target,
            &mut (),
        )
        .await?;
        ctx.action = Some(ActionCall {
            action_id: action.action_id.clone(),
            method: built.method,
            body: built.body,
        });
        super::admit::admitted(ctx, vetted)
    }
}

/// The head checked, the caller authenticated and allowed this workspace, the connector and
/// its action found; all before the body is read.
fn route(session: &Session, ctx: &mut RequestState) -> Result<(String, action::Action), Refusal> {
    check_head(session, ctx)?;
    let req = session.req_header();
    // An action call is an API call to sluice itself, so `Authorization` works as well as
    // `Proxy-Authorization` (which wins when both are sent). Neither goes upstream.
    let auth = req
        .headers
        .get(header::PROXY_AUTHORIZATION)
        .or_else(|| req.headers.get(header::AUTHORIZATION))
        .map(|v| v.as_bytes());
    let (caller, _) = ctx.snapshot.callers.authenticate_with_workspace(auth)?;
    ctx.caller = Some(caller.clone());
    if req.method != http::Method::POST {
        return Err(Refusal::new(
            ErrorCode::ActionMethodNotAllowed,
            "actions are called with POST",
        ));
    }
    let workspace = single_identifier(&req.headers, X_WORKSPACE, ErrorCode::MissingWorkspace)?;
    if !caller.scope.permits(workspace) {
        return Err(Refusal::new(
            ErrorCode::WorkspaceNotPermitted,
            format!(
                "caller {:?} may not act for workspace {workspace:?}",
                caller.name
            ),
        ));
    }
    let path = std::str::from_utf8(req.raw_path())
        .ok()
        .map(|p| p.split_once('?').map_or(p, |(path, _)| path))
        .and_then(action::parse_path);
    let Some((connector_id, action_id)) = path else {
        return Err(Refusal::new(
            ErrorCode::UnknownAction,
            "an action call is POST /v1/actions/{connector}/{action_id}",
        ));
    };
    let connector = ctx.snapshot.connectors.get(connector_id).ok_or_else(|| {
        Refusal::new(
            ErrorCode::UnknownConnector,
            format!("no connector {:?}", shown(connector_id)),
        )
    })?;
    let action = connector
        .actions
        .iter()
        .find(|a| a.action_id == action_id)
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::UnknownAction,
                format!(
                    "connector {:?} has no action {:?}",
                    connector.id,
                    shown(action_id)
                ),
            )
        })?;
    Ok((connector.id.clone(), action.clone()))
}

/// An id from the path, echoed only when it is an identifier.
fn shown(id: &str) -> &str {
    if crate::names::is_identifier(id.as_bytes()) {
        id
    } else {
        "<invalid>"
    }
}

/// The whole body, at most [`MAX_INPUT_BYTES`]. It is kept in pingora's retry buffer as it is
/// read, so the proxy phase finds the body done and the replacement is sent on every attempt
/// ([`body_filter`]).
async fn read_input(session: &mut Session) -> Result<Result<Bytes, Refusal>> {
    let too_large = || {
        Refusal::new(
            ErrorCode::RequestBodyTooLarge,
            format!("an action call's body is at most {MAX_INPUT_BYTES} bytes"),
        )
    };
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > MAX_INPUT_BYTES as u64) {
        // Read what was sent (up to a bound) so the client, still writing it, gets the 413
        // rather than a reset; a larger body just gets the connection closed after it.
        if declared <= DRAIN_LIMIT {
            let _ = session.drain_request_body().await;
        }
        return Ok(Err(too_large()));
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session.write_continue_response().await?;
    }
    session.as_downstream_mut().enable_retry_buffering();
    let mut input = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if input.len() + chunk.len() > MAX_INPUT_BYTES {
            return Ok(Err(too_large()));
        }
        input.extend_from_slice(&chunk);
    }
    Ok(Ok(input.freeze()))
}

/// `request_body_filter`: an action call sends its own body (or none), on every attempt.
pub(super) fn body_filter(ctx: &RequestState, body: &mut Option<Bytes>, end_of_stream: bool) {
    if let Some(call) = &ctx.action {
        *body = if end_of_stream {
            call.body.clone()
        } else {
            // Not the end yet: nothing to send (an empty chunk is skipped, `None` would end it).
            Some(Bytes::new())
        };
    }
}

/// `upstream_request_filter` for an action call: its method, and of the app's headers only
/// [`KEPT_HEADERS`]; the body's type and length. The caller's path, `Host`, and injection are
/// set after this by the common rewrite.
pub(super) fn rewrite_head(upstream_request: &mut RequestHeader, call: &ActionCall) -> Result<()> {
    upstream_request.set_method(call.method.clone());
    let dropped: Vec<HeaderName> = upstream_request
        .headers
        .keys()
        .filter(|name| !KEPT_HEADERS.contains(name))
        .cloned()
        .collect();
    for name in &dropped {
        upstream_request.remove_header(name);
    }
    if let Some(body) = &call.body {
        upstream_request.insert_header(header::CONTENT_TYPE, "application/json")?;
        upstream_request.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    }
    Ok(())
}

/// The action's call, shared with the retry logic: the method the upstream sees.
pub(super) fn method<'a>(session: &'a Session, ctx: &'a RequestState) -> &'a http::Method {
    ctx.action
        .as_ref()
        .map_or(&session.req_header().method, |call| &call.method)
}

/// The action id of the call, if it is one (the audit line names it).
pub(super) fn action_id(ctx: &RequestState) -> Option<&str> {
    ctx.action.as_ref().map(|c| c.action_id.as_str())
}
