//! Hot-path micro-benchmarks for the policy step (step 3–4 of the request path), each against
//! a naive baseline where one exists.
//!
//! `cargo bench --bench policy`. Results, and the machine they ran on, are in BENCHMARKS.md.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::net::IpAddr;
use std::path::Path;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderValue};
use ipnetwork::IpNetwork;
use sluice::config::Snapshot;
use sluice::policy::address::classify;
use sluice::policy::domain::{DomainList, DomainPattern, parse_host};
use sluice::policy::evaluate;

const ADDRS: &[&str] = &[
    "8.8.8.8",
    "10.1.2.3",
    "169.254.169.254",
    "203.0.113.7",
    "2606:4700:4700::1111",
    "::ffff:127.0.0.1",
    "fd00:ec2::254",
];

/// The baseline: the reference table as a list of parsed networks, checked one by one.
const BLOCKS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.31.196.0/24",
    "192.52.193.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "192.175.48.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:0:0/96",
    "::/96",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "2002::/16",
    "3fff::/20",
    "5f00::/16",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
];

fn address_classification(c: &mut Criterion) {
    let addrs: Vec<IpAddr> = ADDRS.iter().map(|a| a.parse().unwrap()).collect();
    let nets: Vec<IpNetwork> = BLOCKS.iter().map(|b| b.parse().unwrap()).collect();
    let mut g = c.benchmark_group("classify 7 addresses");
    g.bench_function("sluice table", |b| {
        b.iter(|| {
            for ip in &addrs {
                black_box(classify(black_box(*ip)));
            }
        })
    });
    g.bench_function("naive ipnetwork list", |b| {
        b.iter(|| {
            for ip in &addrs {
                black_box(nets.iter().any(|n| n.contains(black_box(*ip))));
            }
        })
    });
    g.finish();
}

/// One exact name and one wildcard per connector, as an org allowlist naming every
/// connector's domains would hold them.
fn patterns(connectors: usize) -> Vec<String> {
    (0..connectors)
        .flat_map(|i| {
            [
                format!("api.saas{i}.example"),
                format!("*.tenants.saas{i}.example"),
            ]
        })
        .collect()
}

const PROBES: &[(&str, &str)] = &[
    ("exact, last listed", "api.saas9999.example"),
    ("wildcard, 2 deep", "eu1.acme.tenants.saas5000.example"),
    ("miss", "api.evil.example"),
];

fn allowlist_matching(c: &mut Criterion) {
    let raw = patterns(10_000);
    let parsed: Vec<DomainPattern> = raw
        .iter()
        .map(|p| DomainPattern::parse(p).unwrap())
        .collect();
    let indexed = DomainList::new(parsed.clone());
    let mut g = c.benchmark_group("allowlist of 10,000 connectors (20,000 patterns)");
    for (label, host) in PROBES {
        let h = parse_host(host).unwrap();
        let name = h.as_name().unwrap();
        g.bench_with_input(BenchmarkId::new("sluice index", label), &h, |b, h| {
            b.iter(|| black_box(indexed.matching(black_box(h))))
        });
        g.bench_with_input(
            BenchmarkId::new("naive linear scan", label),
            name,
            |b, n| b.iter(|| black_box(parsed.iter().find(|p| p.matches(black_box(n))))),
        );
    }
    g.finish();

    let small = DomainList::new(
        [
            "api.hubapi.com",
            "*.salesforce.com",
            "*.my.salesforce.com",
            "api.stripe.com",
        ]
        .iter()
        .map(|p| DomainPattern::parse(p).unwrap())
        .collect(),
    );
    let hosts: Vec<_> = [
        "api.stripe.com",
        "eu12.my.salesforce.com",
        "evil.example.com",
    ]
    .iter()
    .map(|h| parse_host(h).unwrap())
    .collect();
    c.bench_function("allowlist of 4 patterns, 3 hosts", |b| {
        b.iter(|| {
            for h in &hosts {
                black_box(small.matching(black_box(h)));
            }
        })
    });
}

/// A config with `n` connectors and an org allowlist naming all of their domains.
fn snapshot(n: usize) -> Snapshot {
    let mut toml = String::from(
        r#"
[listener]
address = "127.0.0.1:18080"

[dns]
static_only = true

[dns.static_hosts]
"api.saas0.example" = ["93.184.216.34"]
"#,
    );
    for i in 0..n {
        toml.push_str(&format!(
            "\n[[connector]]\nconnector_id = \"saas{i}\"\ndisplay_name = \"SaaS {i}\"\nauth_type = \"none\"\nallowed_domains = [\"api.saas{i}.example\", \"*.tenants.saas{i}.example\"]\n"
        ));
    }
    let org: Vec<String> = patterns(n).iter().map(|p| format!("{p:?}")).collect();
    toml.push_str(&format!(
        "\n[[org]]\norg_id = \"acme\"\nallowed_domains = [{}]\n\n[[workspace]]\nworkspace_id = \"ws_42\"\norg = \"acme\"\n",
        org.join(", ")
    ));
    Snapshot::from_toml(&toml, Path::new("bench.toml")).expect("bench config is valid")
}

/// The whole decision for one request, in a config of 3 and of 10,000 connectors: the cost
/// must not grow with the number of connectors.
fn policy_evaluate(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.saas0.example"));
    headers.insert("x-connector", HeaderValue::from_static("saas0"));
    headers.insert("x-workspace", HeaderValue::from_static("ws_42"));
    headers.insert("accept", HeaderValue::from_static("application/json"));
    let target = b"http://api.saas0.example/crm/v3/objects/contacts?limit=10";
    let mut g = c.benchmark_group("policy evaluate (static DNS)");
    for n in [3, 10_000] {
        let snap = snapshot(n);
        g.bench_function(
            BenchmarkId::from_parameter(format!("{n} connectors")),
            |b| {
                b.iter(|| {
                    let mut parsed = None;
                    let verdict = evaluate(
                        &snap,
                        None,
                        black_box(target),
                        &headers,
                        &mut parsed,
                        &mut (),
                    )
                    .now_or_never()
                    .expect("static DNS answers without waiting");
                    black_box(verdict.expect("allowed"))
                })
            },
        );
    }
    g.finish();
}

fn host_parsing(c: &mut Criterion) {
    c.bench_function("parse_host", |b| {
        b.iter(|| black_box(parse_host(black_box("API.eu12.My.Salesforce.com."))))
    });
}

criterion_group!(
    benches,
    address_classification,
    allowlist_matching,
    policy_evaluate,
    host_parsing
);
criterion_main!(benches);
