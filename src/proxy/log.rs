//! Step 9: the access line and the audit line for every request (also refused ones), and the
//! request metrics. Label values are only configured connector ids, error codes and fixed
//! classes; routing headers are logged only when they are identifiers (no log forging).

use http::header::HeaderName;
use pingora::proxy::Session;

use crate::ctx::RequestState;
use crate::label::Label;
use crate::logline::{self, Line, Value, name};
use crate::names::{Host, is_identifier};
use crate::request::{X_CONNECTOR_NAME, X_WORKSPACE_NAME};
use crate::telemetry::OutcomeClass;

/// What pingora's own error log lines say about a request: never the query string (it may
/// carry credentials or personal data), never a header value.
pub(super) fn summary(session: &Session, ctx: &RequestState) -> String {
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

/// Milliseconds between two phase marks (0 when the phase did not happen).
fn phase_ms(from: Option<std::time::Instant>, to: Option<std::time::Instant>) -> u64 {
    match (from, to) {
        (Some(a), Some(b)) => b.saturating_duration_since(a).as_millis() as u64,
        _ => 0,
    }
}

/// How the request ended, for the `outcome_class` field and label.
fn outcome_class(ctx: &RequestState) -> OutcomeClass {
    match &ctx.refusal {
        None => OutcomeClass::Forwarded,
        Some(r) if r.code.is_skip() => OutcomeClass::Skipped,
        Some(_) => OutcomeClass::Refused,
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// `logging`: the lines and the metrics.
pub(super) fn request_done(session: &Session, ctx: &RequestState) {
    let req = session.req_header();
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let code = ctx.refusal.as_ref().map_or("ok", |r| r.code.as_str());
    let outcome_class = outcome_class(ctx).as_label();
    // Identifiers are ASCII, so the `&str` borrows the header: nothing is copied.
    let routed = |name: &HeaderName| {
        req.headers
            .get(name)
            .filter(|v| is_identifier(v.as_bytes()))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let (connector, workspace) = match &ctx.vetted {
        Some(v) => (v.connector(), v.workspace()),
        None => (routed(&X_CONNECTOR_NAME), routed(&X_WORKSPACE_NAME)),
    };
    let upstream = ctx.vetted.as_ref().map(|v| v.addr);
    let host = match ctx.target.as_ref().map(|t| &t.host) {
        Some(Host::Name(name)) => Value::Bare(name),
        Some(literal) => Value::Shown(literal),
        None => Value::Bare(""),
    };
    let path = ctx.target.as_ref().map_or("", |t| t.path());
    let phase = |from, to| Value::U64(phase_ms(from, to));
    // One clock read for every duration below.
    let now = std::time::Instant::now();
    let total = now.saturating_duration_since(ctx.started);
    let upstream_since = ctx.wait_done.filter(|_| ctx.attempts > 0);
    let wall = std::time::SystemTime::now();
    logline::emit_at(
        Line::Access,
        wall,
        &[
            (name!("request_id"), Value::Bare(&ctx.request_id)),
            (name!("connector"), Value::Bare(connector)),
            (name!("workspace"), Value::Bare(workspace)),
            (
                name!("caller"),
                Value::Quoted(ctx.caller.as_ref().map_or("", |c| c.name.as_str())),
            ),
            // An action call logs the method its upstream request used.
            (
                name!("method"),
                Value::Bare(super::action::method(session, ctx).as_str()),
            ),
            (name!("host"), host),
            (name!("path"), Value::Quoted(path)),
            (name!("status"), Value::U64(status.into())),
            (name!("outcome"), Value::Quoted(code)),
            (name!("outcome_class"), Value::Quoted(outcome_class)),
            (name!("upstream"), Value::Addr(upstream)),
            (
                name!("org"),
                Value::Quoted(ctx.vetted.as_ref().map_or("", |v| v.org())),
            ),
            (
                name!("retries"),
                Value::U64(ctx.attempts.saturating_sub(1).into()),
            ),
            (
                name!("policy_ms"),
                phase(Some(ctx.started), ctx.policy_done),
            ),
            (
                name!("credential_ms"),
                phase(ctx.policy_done, ctx.credential_done),
            ),
            (name!("wait_ms"), phase(ctx.credential_done, ctx.wait_done)),
            (name!("upstream_ms"), phase(upstream_since, Some(now))),
            (name!("duration_ms"), Value::U64(total.as_millis() as u64)),
        ],
    );
    // Only configured connector ids become label values: the admitted connector, or (for a
    // request refused before that) a routing header naming one.
    let connector_label = match &ctx.connector {
        Some(c) => c.id.as_str(),
        None => ctx
            .snapshot
            .connectors
            .get_key_value(connector)
            .map_or("", |(k, _)| k.as_str()),
    };
    let upstream_seconds = upstream_since.map(|s| now.saturating_duration_since(s).as_secs_f64());
    let status_class = status_class(status);
    match &ctx.connector {
        // The common case: series resolved once per connector.
        Some(c) if ctx.refusal.is_none() && status_class == "2xx" => {
            let series = c.metrics.forwarded(&c.id);
            series.requests_ok_2xx.inc();
            series.request_seconds.observe(total.as_secs_f64());
            if let Some(s) = upstream_seconds {
                series.upstream_seconds.observe(s);
            }
        }
        _ => {
            let metrics = &crate::telemetry::METRICS;
            metrics
                .requests
                .with_label_values(&[connector_label, code, outcome_class, status_class])
                .inc();
            metrics
                .request_seconds
                .with_label_values(&[connector_label, outcome_class])
                .observe(total.as_secs_f64());
            if let Some(s) = upstream_seconds {
                metrics
                    .upstream_seconds
                    .with_label_values(&[connector_label])
                    .observe(s);
            }
        }
    }
    audit(ctx, wall, outcome_class, host, upstream);
}

/// The audit line: the decision, why a refusal, where an allowed request went (and the action
/// an action call ran).
fn audit(
    ctx: &RequestState,
    wall: std::time::SystemTime,
    outcome_class: &str,
    host: Value<'_>,
    upstream: Option<std::net::SocketAddr>,
) {
    let id = (name!("request_id"), Value::Bare(&ctx.request_id));
    if let Some(r) = &ctx.refusal {
        logline::emit_at(
            Line::Audit,
            wall,
            &[
                id,
                (name!("decision"), Value::Quoted(outcome_class)),
                (name!("host"), host),
                (name!("code"), Value::Quoted(r.code.as_str())),
                (name!("reason"), Value::Bare(&r.message)),
            ],
        );
    } else if ctx.vetted.is_some() {
        let action = super::action::action_id(ctx);
        let allowed = [
            id,
            (name!("decision"), Value::Quoted("allowed")),
            (name!("host"), host),
            (name!("upstream"), Value::Addr(upstream)),
            (name!("action"), Value::Quoted(action.unwrap_or_default())),
        ];
        let fields = if action.is_some() {
            &allowed[..]
        } else {
            &allowed[..4]
        };
        logline::emit_at(Line::Audit, wall, fields);
    }
}
