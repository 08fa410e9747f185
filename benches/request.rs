//! Micro-benchmarks for step 1–2 of the request path: the request target, the routing and
//! framing headers, and the caller's token. pingora's own HTTP/1 parsing is not ours to
//! bench here; it is inside the load bench's numbers (benches/load.sh).
//!
//! `cargo bench --bench request`. Results are in BENCHMARKS.md.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use sluice::fastmap::FastMap as HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use sluice::caller::{Caller, Callers, WorkspaceScope, token_hash};
use sluice::request::{check_framing, check_header_values, parse_target, routing_headers};

const TOKEN: &str = "sluice-bench-caller-token-0123456789abcdef0123456789abcdef";

/// The headers an app sends through HTTP_PROXY: what `requests` or reqwest send, plus ours.
fn app_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("host", "api.hubapi.com"),
        ("user-agent", "python-requests/2.32.3"),
        ("accept-encoding", "gzip, deflate"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("x-connector", "hubspot"),
        ("x-workspace", "ws_42"),
        ("content-type", "application/json"),
        ("content-length", "27"),
    ] {
        h.insert(n, HeaderValue::from_static(v));
    }
    h.insert(
        "proxy-authorization",
        HeaderValue::from_str(&format!("Bearer {TOKEN}")).unwrap(),
    );
    h
}

fn request_target(c: &mut Criterion) {
    let headers = app_headers();
    let mut g = c.benchmark_group("request target");
    g.bench_function("absolute-form", |b| {
        b.iter(|| {
            black_box(parse_target(
                black_box(b"http://api.hubapi.com/crm/v3/objects/contacts?limit=10&archived=false"),
                &headers,
            ))
        })
    });
    g.bench_function("origin-form + Host", |b| {
        b.iter(|| {
            black_box(parse_target(
                black_box(b"/crm/v3/objects/contacts?limit=10&archived=false"),
                &headers,
            ))
        })
    });
    g.finish();
}

fn header_checks(c: &mut Criterion) {
    let headers = app_headers();
    let head = b"POST http://api.hubapi.com/crm/v3/objects/contacts HTTP/1.1\r\nhost: api.hubapi.com\r\ncontent-length: 27\r\n\r\n";
    let mut g = c.benchmark_group("request headers (10 headers)");
    g.bench_function("routing headers", |b| {
        b.iter(|| black_box(routing_headers(black_box(&headers)).unwrap()))
    });
    g.bench_function("CR/LF/NUL in values", |b| {
        b.iter(|| black_box(check_header_values(black_box(&headers))))
    });
    g.bench_function("framing", |b| {
        b.iter(|| black_box(check_framing(black_box(&headers), Some(head))))
    });
    g.finish();
}

fn caller_auth(c: &mut Criterion) {
    let mut map = HashMap::default();
    for i in 0..1000 {
        map.insert(
            token_hash(format!("other-token-{i}").as_bytes()),
            Arc::new(Caller {
                name: format!("app-{i}"),
                scope: WorkspaceScope::All,
            }),
        );
    }
    map.insert(
        token_hash(TOKEN.as_bytes()),
        Arc::new(Caller {
            name: "billing".into(),
            scope: WorkspaceScope::All,
        }),
    );
    let callers = Callers::new(map, false);
    let bearer = format!("Bearer {TOKEN}");
    let basic = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("billing:{TOKEN}")
        )
    );
    let mut g = c.benchmark_group("caller auth (1,001 callers)");
    g.bench_function("Bearer", |b| {
        b.iter(|| {
            black_box(
                callers
                    .authenticate(Some(black_box(bearer.as_bytes())))
                    .unwrap(),
            )
        })
    });
    g.bench_function("Basic", |b| {
        b.iter(|| {
            black_box(
                callers
                    .authenticate(Some(black_box(basic.as_bytes())))
                    .unwrap(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, request_target, header_checks, caller_auth);
criterion_main!(benches);
