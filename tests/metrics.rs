//! `/metrics` in the Prometheus text format, read back with a real parser (Python's
//! prometheus_client, as `promtool check metrics` would).

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

/// Parse the exposition with prometheus_client; returns every sample as (name, labels, value).
fn parse(text: String) -> Vec<(String, serde_json::Value, f64)> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the exposition does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<(String, serde_json::Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    rows
}

fn value(samples: &[(String, serde_json::Value, f64)], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[*k] == *v))
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_parses_and_counts_what_happened() {
    let env = Env::new().await;
    let gw = env.start().await;
    put_credential(
        &gw,
        "ws_7",
        "narrow",
        true,
        &[("api_key", "CANARY-metrics")],
    )
    .await;
    let c = client(&gw, Some(("ops", OPS_TOKEN)));
    for _ in 0..3 {
        let r = c
            .get(env.url("other.saas.test", "/m"))
            .header("X-Connector", "narrow")
            .header("X-Workspace", "ws_7")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let r = c
        .get(env.url("evil.test", "/"))
        .header("X-Connector", "narrow")
        .header("X-Workspace", "ws_7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let text = metrics_text(&gw).await;
    assert!(!text.contains("CANARY"), "no secret in a metric");
    let samples = parse(text);
    let narrow = ("connector", "narrow");
    assert_eq!(
        value(
            &samples,
            "sluice_requests_total",
            &[narrow, ("class", "forwarded")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "sluice_requests_total",
            &[narrow, ("outcome", "domain_not_allowed")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "sluice_request_duration_seconds_count",
            &[narrow, ("class", "forwarded")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "sluice_upstream_duration_seconds_count",
            &[narrow]
        ),
        3.0
    );
    assert_eq!(
        value(
            &samples,
            "sluice_upstream_connections_total",
            &[narrow, ("connection", "opened")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "sluice_upstream_connections_total",
            &[narrow, ("connection", "reused")]
        ),
        2.0
    );
    assert_eq!(
        value(
            &samples,
            "sluice_credential_cache_total",
            &[("result", "miss")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "sluice_credential_cache_total",
            &[("result", "hit")]
        ),
        2.0
    );
    assert_eq!(value(&samples, "sluice_rate_limit_queue_depth", &[]), 0.0);
    // No workspace label anywhere: tenants are followed in the logs, not in series.
    assert!(samples.iter().all(|(_, l, _)| l.get("workspace").is_none()));
}
