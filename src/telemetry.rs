//! Step 9: metrics. Prometheus text format, served at `GET /metrics` on the admin listener.
//!
//! Labels are bounded: `connector` is a configured connector id (or `""` when the request named
//! none that exists), `outcome` is an error code or `ok`, and every other label takes the
//! values of one of the enums below (`as_label`), whose names also write the help text. No
//! workspace label: tenants are counted through logs, not series.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use strum::VariantNames;

/// A connector's handles for the series that every forwarded 2xx request updates, resolved
/// on the first such request: `with_label_values` hashes the label values and takes the
/// vector's lock on every call, three times per request.
#[derive(Clone, Default)]
pub struct ConnectorMetrics(std::sync::OnceLock<ForwardedSeries>);

#[derive(Clone)]
pub struct ForwardedSeries {
    /// `sluice_requests_total{connector, outcome="ok", class="forwarded", status="2xx"}`.
    pub requests_ok_2xx: prometheus::IntCounter,
    /// `sluice_request_duration_seconds{connector, class="forwarded"}`.
    pub request_seconds: prometheus::Histogram,
    /// `sluice_upstream_duration_seconds{connector}`.
    pub upstream_seconds: prometheus::Histogram,
}

impl ConnectorMetrics {
    /// The handles of connector `id` (the id of the connector holding them).
    pub fn forwarded(&self, id: &str) -> &ForwardedSeries {
        self.0.get_or_init(|| {
            use crate::label::Label;
            let forwarded = OutcomeClass::Forwarded.as_label();
            ForwardedSeries {
                requests_ok_2xx: METRICS
                    .requests
                    .with_label_values(&[id, "ok", forwarded, "2xx"]),
                request_seconds: METRICS.request_seconds.with_label_values(&[id, forwarded]),
                upstream_seconds: METRICS.upstream_seconds.with_label_values(&[id]),
            }
        })
    }
}

impl std::fmt::Debug for ConnectorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectorMetrics")
    }
}

/// How a request ended: the `class` label, the access line's `outcome_class` and the audit
/// line's `decision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum OutcomeClass {
    /// Sent upstream (whatever the upstream answered).
    Forwarded,
    /// Not ours to handle (no connector named, interception off): refused without a policy
    /// decision.
    Skipped,
    /// Refused by policy, credentials, pacing or the upstream path.
    Refused,
}

/// `sluice_oauth_token_refreshes_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum RefreshResult {
    Ok,
    NeedsReauthorization,
    Unavailable,
    Rejected,
    Policy,
}

/// `sluice_rate_limit_waits_total{result}`: how a queued request's wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum WaitResult {
    Released,
    /// The client went away while waiting.
    Left,
    /// Refused: it would have been held past `max_wait_ms` (spaced out after a stall, or in a
    /// per-application bucket a response held longer than the wait estimated at admission).
    Expired,
}

/// `sluice_retries_total{reason}`: what failed on the attempt that gets a successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum RetryReason {
    Connect,
    Status,
    Io,
}

/// `sluice_credential_cache_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum CacheResult {
    /// A fresh cached credential.
    Hit,
    /// A cached credential served because the store is unavailable.
    Stale,
    /// The store was asked.
    Miss,
}

/// `sluice_credential_store_errors_total{store}`: how a store read failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum StoreFailure {
    Read,
    Timeout,
}

/// `sluice_upstream_connections_total{connection}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum ConnectionUse {
    Opened,
    Reused,
}

/// `sluice_config_reloads_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum ReloadResult {
    Ok,
    Unchanged,
    /// Refused: the old configuration stays.
    Invalid,
}

/// `help` followed by the label's values, so the text cannot drift from the code.
fn help<T: VariantNames>(help: &str) -> String {
    format!("{help} ({}).", T::VARIANTS.join(", "))
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub token_refreshes: IntCounterVec,
    pub rate_limit_waits: IntCounterVec,
    pub retries: IntCounterVec,
    pub circuit_transitions: IntCounterVec,
    pub rate_limit_fallbacks: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub upstream_seconds: HistogramVec,
    pub credential_cache: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub upstream_connections: IntCounterVec,
    pub queue_depth: IntGauge,
    pub circuits_open: prometheus::IntGaugeVec,
}

/// Seconds; from 1 ms to 60 s.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let registry = Registry::new();
    let requests = IntCounterVec::new(
        Opts::new(
            "sluice_requests_total",
            format!(
                "Requests by connector, outcome code, class ({}) and HTTP status class (1xx…5xx).",
                OutcomeClass::VARIANTS.join(", ")
            ),
        ),
        &["connector", "outcome", "class", "status"],
    )
    .expect("valid metric");
    let token_refreshes = IntCounterVec::new(
        Opts::new(
            "sluice_oauth_token_refreshes_total",
            help::<RefreshResult>("OAuth token refreshes by connector and result"),
        ),
        &["connector", "result"],
    )
    .expect("valid metric");
    let rate_limit_waits = IntCounterVec::new(
        Opts::new(
            "sluice_rate_limit_waits_total",
            help::<WaitResult>(
                "Requests that waited in a rate-limit queue, by connector and result",
            ),
        ),
        &["connector", "result"],
    )
    .expect("valid metric");
    let retries = IntCounterVec::new(
        Opts::new(
            "sluice_retries_total",
            help::<RetryReason>("Upstream retries by connector and reason"),
        ),
        &["connector", "reason"],
    )
    .expect("valid metric");
    let circuit_transitions = IntCounterVec::new(
        Opts::new(
            "sluice_circuit_transitions_total",
            // The values are `ratelimit::BreakerState`'s; its tests hold this text to them
            // (naming it here would make telemetry, a leaf, import rate limiting).
            "Circuit breaker state changes by connector and new state (closed, open, half_open).",
        ),
        &["connector", "to"],
    )
    .expect("valid metric");
    let rate_limit_fallbacks = IntCounterVec::new(
        Opts::new(
            "sluice_rate_limit_fallbacks_total",
            "Shared (Redis) rate-limit budgets that were unreachable, so the local bucket decided.",
        ),
        &["connector"],
    )
    .expect("valid metric");
    let config_reloads = IntCounterVec::new(
        Opts::new(
            "sluice_config_reloads_total",
            help::<ReloadResult>(
                "Config file reloads by result; on invalid the old configuration stays",
            ),
        ),
        &["result"],
    )
    .expect("valid metric");
    let request_seconds = HistogramVec::new(
        HistogramOpts::new(
            "sluice_request_duration_seconds",
            help::<OutcomeClass>("Whole requests through sluice, by connector and class"),
        )
        .buckets(BUCKETS.to_vec()),
        &["connector", "class"],
    )
    .expect("valid metric");
    let upstream_seconds = HistogramVec::new(
        HistogramOpts::new(
            "sluice_upstream_duration_seconds",
            "Time from the first upstream attempt to the end of the request, by connector.",
        )
        .buckets(BUCKETS.to_vec()),
        &["connector"],
    )
    .expect("valid metric");
    let credential_cache = counter(
        "sluice_credential_cache_total",
        &help::<CacheResult>(
            "Credential lookups by result: a fresh cached credential, one served stale because the store is unavailable, or the store asked",
        ),
        &["result"],
    );
    let store_errors = counter(
        "sluice_credential_store_errors_total",
        &help::<StoreFailure>("Credential store reads that failed, by how"),
        &["store"],
    );
    let upstream_connections = counter(
        "sluice_upstream_connections_total",
        &help::<ConnectionUse>("Upstream connections used, by connector and whether pooled"),
        &["connector", "connection"],
    );
    let queue_depth = IntGauge::new(
        "sluice_rate_limit_queue_depth",
        "Requests waiting in rate-limit queues in this process.",
    )
    .expect("valid metric");
    registry
        .register(Box::new(queue_depth.clone()))
        .expect("registered once");
    let circuits_open = prometheus::IntGaugeVec::new(
        Opts::new(
            "sluice_circuits_open",
            "Circuit breakers open (or probing) per connector, across its upstream hosts.",
        ),
        &["connector"],
    )
    .expect("valid metric");
    registry
        .register(Box::new(circuits_open.clone()))
        .expect("registered once");
    for h in [&request_seconds, &upstream_seconds] {
        registry
            .register(Box::new(h.clone()))
            .expect("registered once");
    }
    for m in [
        &credential_cache,
        &store_errors,
        &upstream_connections,
        &config_reloads,
        &rate_limit_fallbacks,
        &requests,
        &token_refreshes,
        &rate_limit_waits,
        &retries,
        &circuit_transitions,
    ] {
        registry
            .register(Box::new(m.clone()))
            .expect("registered once");
    }
    Metrics {
        registry,
        requests,
        token_refreshes,
        rate_limit_waits,
        retries,
        circuit_transitions,
        rate_limit_fallbacks,
        config_reloads,
        request_seconds,
        upstream_seconds,
        credential_cache,
        store_errors,
        upstream_connections,
        queue_depth,
        circuits_open,
    }
});

impl Metrics {
    /// Every metric name sluice exports (histograms without their suffixes).
    pub fn names(&self) -> Vec<String> {
        use prometheus::core::Collector;
        let collectors: [&dyn Collector; 14] = [
            &self.requests,
            &self.token_refreshes,
            &self.rate_limit_waits,
            &self.retries,
            &self.circuit_transitions,
            &self.rate_limit_fallbacks,
            &self.config_reloads,
            &self.request_seconds,
            &self.upstream_seconds,
            &self.credential_cache,
            &self.store_errors,
            &self.upstream_connections,
            &self.queue_depth,
            &self.circuits_open,
        ];
        collectors
            .iter()
            .flat_map(|c| c.desc().into_iter().map(|d| d.fq_name.clone()))
            .collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every query of the Grafana dashboard names metrics sluice exports.
    #[test]
    fn the_dashboard_queries_existing_metrics() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../config/grafana-dashboard.json")).unwrap();
        let names = METRICS.names();
        let mut checked = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if !word.starts_with("sluice_") {
                        continue;
                    }
                    let base = word
                        .trim_end_matches("_bucket")
                        .trim_end_matches("_count")
                        .trim_end_matches("_sum");
                    assert!(
                        names.iter().any(|n| n == base),
                        "{word} in {expr:?} is not exported"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 14, "every panel queries sluice metrics");
    }
}
