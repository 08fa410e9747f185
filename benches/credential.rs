//! Micro-benchmarks for step 5 of the request path: opening a sealed credential (AES-256-GCM),
//! the cache hit every warm request takes instead, and rendering what gets injected.
//!
//! `cargo bench --bench credential`. Results are in BENCHMARKS.md.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::credential::crypto::Keyring;
use sluice::credential::embedded::EmbeddedStore;
use sluice::credential::inject::{AuthType, InjectFile, Injection};
use sluice::credential::secret::{Secret, SecretFields};
use sluice::credential::{TenantState, Vault, VaultSettings};

fn fields() -> SecretFields {
    let mut f = SecretFields::new();
    f.insert(
        "access_token",
        Secret::new("pat-na1-0b3e2f0c-5a1d-4c1e-9f0a-2b7c8d9e0f1a-canary"),
    );
    f.insert("portal_id", Secret::new("4242424"));
    f
}

fn keyring() -> Keyring {
    Keyring::parse(&Keyring::generate_line("k1").unwrap()).unwrap()
}

fn open_sealed(c: &mut Criterion) {
    let ring = keyring();
    let plain = fields().to_plaintext();
    let (key_id, blob) = ring.seal("ws_42", "hubspot", &plain);
    let mut g = c.benchmark_group("credential open");
    g.bench_function("AES-256-GCM open (base64 blob)", |b| {
        b.iter(|| {
            black_box(
                ring.open("ws_42", "hubspot", &key_id, black_box(&blob))
                    .unwrap(),
            )
        })
    });
    g.bench_function("open + parse fields", |b| {
        b.iter(|| {
            let p = ring
                .open("ws_42", "hubspot", &key_id, black_box(&blob))
                .unwrap();
            black_box(SecretFields::from_plaintext(&p).unwrap())
        })
    });
    g.finish();
}

fn cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("bench.redb")).unwrap();
    let vault = Vault::new(
        Arc::new(store),
        keyring(),
        &VaultSettings {
            cache_capacity: 10_000,
            cache_ttl: Duration::from_secs(3600),
            max_staleness: Duration::from_secs(3600),
            read_timeout: Duration::from_secs(1),
            outage_backoff: Duration::from_secs(1),
        },
    );
    rt.block_on(async {
        vault
            .put("ws_42", "hubspot", true, &fields())
            .await
            .unwrap();
        // Other tenants in the cache, so the hit is not into a one-entry map.
        for i in 0..1000 {
            vault
                .put(&format!("ws_{i}"), "stripe", true, &fields())
                .await
                .unwrap();
            vault.lookup(&format!("ws_{i}"), "stripe").await.unwrap();
        }
        vault.lookup("ws_42", "hubspot").await.unwrap();
    });
    c.bench_function("credential lookup, cache hit", |b| {
        b.to_async(&rt).iter(|| async {
            let state = vault.lookup(black_box("ws_42"), "hubspot").await.unwrap();
            assert!(matches!(*state, TenantState::Connected(_)));
            black_box(state)
        })
    });
}

fn render_injection(c: &mut Criterion) {
    let names = vec!["access_token".to_string(), "portal_id".to_string()];
    let file = InjectFile {
        format: Some("Bearer {access_token}".into()),
        headers: [("X-HubSpot-Portal".to_string(), "{portal_id}".to_string())].into(),
        ..Default::default()
    };
    let inject = Injection::build(AuthType::Bearer, &file, &names).unwrap();
    let basic = Injection::build(
        AuthType::Basic,
        &InjectFile::default(),
        &["username".into(), "password".into()],
    )
    .unwrap();
    let mut basic_fields = SecretFields::new();
    basic_fields.insert("username", Secret::new("sk_live_canary"));
    basic_fields.insert("password", Secret::new(""));
    let f = fields();
    let mut g = c.benchmark_group("inject render");
    g.bench_function("bearer + one extra header", |b| {
        b.iter(|| black_box(inject.render(black_box(&f)).unwrap()))
    });
    g.bench_function("basic", |b| {
        b.iter(|| black_box(basic.render(black_box(&basic_fields)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, open_sealed, cache_hit, render_injection);
criterion_main!(benches);
