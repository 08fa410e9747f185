//! Steps 1–4: the request's head checked, the caller authenticated, the policy decided (DNS
//! included), and the connector resolved once for the rest of the request.

use std::sync::Arc;

use http::header;
use pingora::proxy::Session;

use super::{REQUEST_ID_NAME, Sluice};
use crate::caller::Caller;
use crate::ctx::{RequestId, RequestState};
use crate::error::{ErrorCode, Refusal};
use crate::names::is_identifier;
use crate::policy::{self, Vetted};
use crate::request::{
    X_CONNECTOR, X_WORKSPACE, check_framing, check_header_limits, check_header_values, parse_target,
};
use crate::tunnel::{self, Tunnel};

/// The request's first moment: its id, and whether requests pipelined behind it are kept.
/// Returns whether it is a CONNECT.
pub(super) fn start(session: &mut Session, ctx: &mut RequestState) -> bool {
    // Requests pipelined behind this one (RFC 9112 §9.3.2) are kept and served in order on
    // this connection, each through its own pass (caller, policy, credential). Without this
    // pingora drops them and closes the connection after the first response, which still
    // said keep-alive. Not for a CONNECT: what follows it is the tunnel (maybe TLS), never a
    // request to stash; bytes sent before its 200 close the connection instead.
    let connect = session.req_header().method == http::Method::CONNECT;
    session.as_downstream_mut().set_pipelining_enabled(!connect);
    ctx.request_id = request_id(session);
    connect
}

/// The request id: the app's `X-Request-Id` when it is a sane identifier, else a fresh one.
fn request_id(session: &Session) -> RequestId {
    let app = session
        .req_header()
        .headers
        .get(&REQUEST_ID_NAME)
        .map(|v| v.as_bytes())
        .filter(|v| is_identifier(v))
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| RequestId::from(v).ok());
    app.unwrap_or_else(|| hex_id(rand::random::<u128>()))
}

/// `format!("{:032x}", n)` without the formatting machinery (every request without an id of
/// its own makes one), and without a heap block.
fn hex_id(n: u128) -> RequestId {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = RequestId::new();
    for i in 0..32 {
        id.push(char::from(HEX[((n >> (124 - 4 * i)) & 0xf) as usize]));
    }
    id
}

impl Sluice {
    /// Steps 1–4. On success `ctx.vetted` and `ctx.connector` are set (and, for a CONNECT,
    /// `ctx.tunnel`); otherwise the first refusal.
    pub(super) async fn admit(
        &self,
        session: &Session,
        ctx: &mut RequestState,
    ) -> Result<(), Refusal> {
        check_head(session, ctx)?;
        let req = session.req_header();
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
        let vetted = if req.method == http::Method::CONNECT {
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
            vetted
        } else {
            match ctx.tunnel.clone() {
                Some(t) => inside_tunnel(session, ctx, &t, &caller).await?,
                None => {
                    policy::evaluate(
                        &*ctx.snapshot,
                        Some(&caller),
                        req.raw_path(),
                        &req.headers,
                        &mut ctx.target,
                        &mut (),
                    )
                    .await?
                }
            }
        };
        admitted(ctx, vetted)
    }
}

/// The verdict kept: the vetted destination, and its connector resolved by name, once; every
/// later step reads the connector from the context.
pub(super) fn admitted(ctx: &mut RequestState, vetted: Vetted) -> Result<(), Refusal> {
    let connector = ctx.snapshot.connectors.get(vetted.connector()).cloned();
    ctx.connector = Some(connector.ok_or_else(|| {
        Refusal::new(ErrorCode::Internal, "connector vanished from the snapshot")
    })?);
    ctx.vetted = Some(vetted);
    Ok(())
}

/// Step 1: limits, header values and framing, before anything reads the head.
pub(super) fn check_head(session: &Session, ctx: &RequestState) -> Result<(), Refusal> {
    let req = session.req_header();
    if req.method == http::Method::CONNECT && ctx.tunnel.is_some() {
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
    check_framing(&req.headers, raw_head.as_deref())
}

/// A request inside a tunnel: the tunnel decided the connector and workspace; routing headers
/// may repeat them, not change them. And it goes where the CONNECT said.
async fn inside_tunnel(
    session: &Session,
    ctx: &mut RequestState,
    t: &Tunnel,
    caller: &Caller,
) -> Result<Vetted, Refusal> {
    let req = session.req_header();
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
    tunnel::check_inside(t, target)?;
    policy::evaluate_routed(
        &*ctx.snapshot,
        Some(caller),
        &t.connector,
        &t.workspace,
        req.raw_path(),
        &req.headers,
        &mut ctx.target,
        &mut (),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::hex_id;

    #[test]
    fn hex_id_is_fixed_width_lowercase_hex_as_format_writes_it() {
        for n in [
            0u128,
            1,
            0xabc,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            assert_eq!(hex_id(n).as_str(), format!("{n:032x}"));
        }
    }
}
