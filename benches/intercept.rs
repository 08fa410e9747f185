//! Micro-benchmarks for TLS interception: what a new host costs (minting its leaf: a P-256
//! key pair and a signature by sluice's CA) against what every later tunnel to it costs (the
//! cached leaf).
//!
//! `cargo bench --bench intercept`. Results are in BENCHMARKS.md.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::intercept::{Minter, init_ca};

fn minter(dir: &std::path::Path) -> Minter {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    init_ca(&cert, &key).unwrap();
    Minter::load(&cert, &key, Duration::from_secs(24 * 3600), 10_000).unwrap()
}

fn leaves(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let m = minter(dir.path());
    let mut g = c.benchmark_group("interception leaf");
    g.bench_function(
        "mint a new host's certificate (P-256 key + CA signature)",
        |b| b.iter(|| black_box(m.mint(black_box("api.hubapi.com")).unwrap())),
    );
    assert!(m.resolve_name("api.hubapi.com").is_some());
    g.bench_function("cached certificate for a known host", |b| {
        b.iter(|| black_box(m.resolve_name(black_box("api.hubapi.com")).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, leaves);
criterion_main!(benches);
