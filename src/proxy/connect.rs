//! The CONNECT entry: a CONNECT ends in `request_filter` with `200` (the connection stays
//! open as the tunnel, its requests come next on it, bound to it) or sluice's refusal; the
//! tunnel then travels from request to request as the connection's context.

use std::sync::Arc;

use http::header;
use pingora::prelude::*;
use pingora::proxy::Session;

use super::{REQUEST_ID, Sluice, respond};
use crate::ctx::RequestState;
use crate::error::Refusal;
use crate::tunnel;

impl Sluice {
    /// Answer an admitted (or refused) CONNECT.
    pub(super) async fn answer_connect(
        &self,
        session: &mut Session,
        ctx: &mut RequestState,
        admitted: Result<(), Refusal>,
    ) -> Result<bool> {
        let now = Some(std::time::Instant::now());
        (ctx.credential_done, ctx.wait_done) = (now, now);
        if let Err(refusal) = admitted {
            let sent = respond::refuse(session, ctx, refusal).await;
            // A refused CONNECT never becomes a tunnel.
            ctx.tunnel = None;
            session.set_keepalive(None);
            return sent;
        }
        let mut resp = ResponseHeader::build(http::StatusCode::OK, Some(3))?;
        // No body follows a 2xx to CONNECT (RFC 9110 §9.3.6); the length only frames it for
        // pingora, which then reads the tunnel's first request.
        resp.insert_header(header::CONTENT_LENGTH, "0")?;
        resp.insert_header(REQUEST_ID, ctx.request_id.as_str())?;
        // After a 2xx the connection is the tunnel (RFC 9110 §9.3.6), whatever an HTTP/1.0
        // CONNECT (Python's http.client) or its Connection header says: pingora keeps a
        // connection only when the request's Connection header allows it, and undici's
        // CONNECT says `close`: the header is dropped first.
        session.req_header_mut().remove_header(&header::CONNECTION);
        session.set_keepalive(Some(60));
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(None, true).await?;
        Ok(true)
    }
}

/// The connection's context after a request: the tunnel, if this connection is one.
pub(super) fn persist(
    session: &Session,
    ctx: &RequestState,
) -> Option<Box<dyn std::any::Any + Send + Sync>> {
    let tunnel = ctx.tunnel.clone()?;
    // The CONNECT's own answer: what comes next decides the tunnel's kind (server.rs).
    if session.req_header().method == http::Method::CONNECT {
        return Some(Box::new(tunnel::Opened(tunnel)));
    }
    Some(Box::new(tunnel))
}

/// The next request on a tunnel's connection belongs to the tunnel.
pub(super) fn resume(ctx: &mut RequestState, prev: Box<dyn std::any::Any + Send + Sync>) {
    match prev.downcast::<Arc<tunnel::Tunnel>>() {
        Ok(tunnel) => ctx.tunnel = Some(*tunnel),
        Err(other) => {
            if let Ok(opened) = other.downcast::<tunnel::Opened>() {
                ctx.tunnel = Some(opened.0);
            }
        }
    }
}
