//! Micro-benchmarks for step 6 of the request path: taking a token from a bucket, and learning
//! from the API's rate-limit headers on the way back.
//!
//! `cargo bench --bench ratelimit`. Results are in BENCHMARKS.md.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue};
use sluice::ratelimit::bucket::{Admission, Bucket};
use sluice::ratelimit::headers::{HeaderSpec, learn};
use sluice::ratelimit::{Decision, Limiter, RateLimit, RateLimitFile, bucket_key};

fn bucket_take(c: &mut Criterion) {
    let start = Instant::now();
    let mut g = c.benchmark_group("bucket");
    // A bucket that always has a token: the common case, the request goes at once.
    let mut bucket = Bucket::new(1_000_000, 1e9, start);
    let mut now = start;
    g.bench_function("take (token available)", |b| {
        b.iter(|| {
            now += Duration::from_micros(1);
            let a = bucket.admit(black_box(now), Duration::from_secs(1), 64);
            debug_assert_eq!(a, Admission::Now);
            black_box(a)
        })
    });
    g.finish();

    let limiter = Limiter::new(None);
    let rl = RateLimit::build(&RateLimitFile {
        capacity: Some(1_000_000),
        per_second: Some(1e9),
        ..Default::default()
    })
    .unwrap();
    let key = bucket_key(&rl, "hubspot", "ws_42");
    let mut now = start;
    c.bench_function("limiter admit (bucket lookup + take)", |b| {
        b.iter(|| {
            now += Duration::from_micros(1);
            let d = limiter
                .admit(&key, &rl, black_box("ws_42"), now)
                .now_or_never()
                .expect("a local bucket decides at once");
            assert!(matches!(d, Decision::Go));
        })
    });
}

fn header_learning(c: &mut Criterion) {
    let spec = HeaderSpec::default();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut headers = HeaderMap::new();
    for (n, v) in [
        ("content-type", "application/json;charset=utf-8"),
        ("date", "Sun, 22 Nov 2026 10:00:00 GMT"),
        (
            "x-hubspot-correlation-id",
            "4b1e6d0c-9d7b-4a8e-8a39-0f1f7b3e9a11",
        ),
        ("x-hubspot-ratelimit-daily", "250000"),
        ("x-ratelimit-limit", "100"),
        ("x-ratelimit-remaining", "42"),
        ("x-ratelimit-reset", "7"),
        ("vary", "Accept-Encoding"),
    ] {
        headers.insert(n, HeaderValue::from_static(v));
    }
    let mut plain = HeaderMap::new();
    plain.insert("content-type", HeaderValue::from_static("application/json"));
    plain.insert("content-length", HeaderValue::from_static("11"));

    let mut g = c.benchmark_group("header learning");
    g.bench_function("X-RateLimit-* present", |b| {
        b.iter(|| black_box(learn(black_box(&headers), &spec, now)))
    });
    g.bench_function("no rate-limit headers", |b| {
        b.iter(|| black_box(learn(black_box(&plain), &spec, now)))
    });
    let learned = learn(&headers, &spec, now);
    assert!(!learned.is_empty());
    let start = Instant::now();
    let mut bucket = Bucket::new(100, 10.0, start);
    let mut t = start;
    g.bench_function("learn + bucket observe", |b| {
        b.iter(|| {
            t += Duration::from_micros(1);
            let l = learn(black_box(&headers), &spec, now);
            bucket.observe(t, &l, false);
        })
    });
    g.finish();
}

criterion_group!(benches, bucket_take, header_learning);
criterion_main!(benches);
