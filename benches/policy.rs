//! Hot-path micro-benchmarks for the policy step, each against a naive baseline.
//!
//! `cargo bench --bench policy`. Results and the machine they ran on go in BENCHMARKS.md
//! (the full set, and the load bench against nginx, come with the benchmarks issue).

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use ipnetwork::IpNetwork;
use sluice::policy::address::classify;
use sluice::policy::domain::{DomainList, DomainPattern, parse_host};

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
    let mut g = c.benchmark_group("classify");
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

fn allowlist_matching(c: &mut Criterion) {
    let list = DomainList::new(
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
    c.bench_function("allowlist match (4 patterns, 3 hosts)", |b| {
        b.iter(|| {
            for h in &hosts {
                black_box(list.matching(black_box(h)));
            }
        })
    });
    c.bench_function("parse_host", |b| {
        b.iter(|| black_box(parse_host(black_box("API.eu12.My.Salesforce.com."))))
    });
}

criterion_group!(benches, address_classification, allowlist_matching);
criterion_main!(benches);
