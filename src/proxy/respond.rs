//! sluice's own answers: the JSON error response for a refusal, and every pingora failure
//! mapped to sluice's error model (the README's error table). Also the headers an
//! upstream response may not carry to the app.

use bytes::Bytes;
use http::header;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, Session};
use pingora::{ErrorSource, ErrorType};
use tracing::warn;

use super::{ERROR_HEADER_NAME, REQUEST_ID, REQUEST_ID_NAME};
use crate::ctx::RequestState;
use crate::error::{ERROR_HEADER, ErrorCode, Refusal};

/// Answer with `refusal` from `request_filter`: the request ends here (`Ok(true)`).
pub(super) async fn refuse(
    session: &mut Session,
    ctx: &mut RequestState,
    refusal: Refusal,
) -> Result<bool> {
    let sent = respond(session, ctx, &refusal).await;
    ctx.refusal = Some(refusal);
    sent.map(|()| true)
}

/// `response_filter`: only sluice may name an error code (an upstream cannot forge one) or
/// ask for proxy credentials; the app gets its request id back.
pub(super) fn strip_upstream_headers(
    upstream_response: &mut ResponseHeader,
    ctx: &RequestState,
) -> Result<()> {
    // One pass over the response's few names (standard ones compare by tag) instead of a
    // hashed probe into pingora's two header maps per name, present or not.
    let (mut error, mut authenticate, mut request_id) = (false, false, false);
    for name in upstream_response.headers.keys() {
        error |= *name == ERROR_HEADER_NAME;
        authenticate |= *name == header::PROXY_AUTHENTICATE;
        request_id |= *name == REQUEST_ID_NAME;
    }
    if error {
        upstream_response.remove_header(&ERROR_HEADER_NAME);
    }
    if authenticate {
        upstream_response.remove_header(&header::PROXY_AUTHENTICATE);
    }
    // The id is an identifier or sluice's hex: always a valid header value.
    let id = http::HeaderValue::from_str(&ctx.request_id)
        .or_err(ErrorType::InternalError, "request id as a header value")?;
    // Named by the `&'static str`: pingora keeps it as the name's case without a copy (a
    // `HeaderName` it would copy into a new buffer on every response).
    if request_id {
        upstream_response.insert_header(REQUEST_ID, id)?;
    } else {
        upstream_response.append_header(REQUEST_ID, id)?;
    }
    Ok(())
}

/// `fail_to_proxy`: the refusal a later phase decided (carried as the error's cause), or
/// the failure mapped; written unless the upstream's response already started.
pub(super) async fn fail(session: &mut Session, e: &Error, ctx: &mut RequestState) -> FailToProxy {
    let refusal = match e.root_cause().downcast_ref::<Refusal>() {
        Some(decided) => decided.clone(),
        None => refusal_for(e, ctx),
    };
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

/// Write sluice's own JSON error response.
pub(super) async fn respond(
    session: &mut Session,
    ctx: &RequestState,
    refusal: &Refusal,
) -> Result<()> {
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
fn refusal_for(e: &Error, ctx: &RequestState) -> Refusal {
    use ErrorType::*;
    let host = ctx.vetted.as_ref().map_or("upstream", |v| v.sni());
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
