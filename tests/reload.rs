//! Hot reload under load: valid and invalid files, through SIGHUP and the file watch.

// Test and bench code: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

async fn wait_for(gw: &sluice::server::Running, series: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(gw, series).await < at_least {
        assert!(
            Instant::now() < deadline,
            "{series} never reached {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sighup() {
    let ok = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

const OK: &str = r#"sluice_config_reloads_total{result="ok"}"#;
const INVALID: &str = r#"sluice_config_reloads_total{result="invalid"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_no_request_and_bad_files_change_nothing() {
    let env = Env::new().await;
    let gw = env.start().await;
    let path = env.dir.path().join("sluice.toml");
    let original = std::fs::read_to_string(&path).unwrap();

    // Continuous load on the saas connector.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        let c = client(&gw, Some(("app", APP_TOKEN)));
        let url = env.url("api.saas.test", "/load");
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let r = c
                    .get(&url)
                    .header("X-Connector", "saas")
                    .header("X-Workspace", "ws_42")
                    .send()
                    .await;
                sent.fetch_add(1, Ordering::SeqCst);
                if !matches!(r, Ok(ref r) if r.status() == 200) {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };

    // Requests keep completing between (and across) every reload below.
    let more_requests = |n: usize| {
        let sent = sent.clone();
        async move {
            let target = sent.load(Ordering::SeqCst) + n;
            let deadline = Instant::now() + Duration::from_secs(20);
            while sent.load(Ordering::SeqCst) < target {
                assert!(Instant::now() < deadline, "the load stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    more_requests(5).await;
    let (mut ok, mut invalid) = (metric(&gw, OK).await, metric(&gw, INVALID).await);
    for round in 0..3 {
        // A valid change (a comment), by SIGHUP.
        std::fs::write(&path, format!("{original}\n# round {round}\n")).unwrap();
        sighup();
        ok += 1;
        wait_for(&gw, OK, ok).await;
        more_requests(3).await;
        // An invalid file: refused, the old configuration stays.
        std::fs::write(
            &path,
            original.replace(
                "allowed_domains = [\"*.saas.test\"]",
                "allowed_domains = [\"*\"]",
            ),
        )
        .unwrap();
        sighup();
        invalid += 1;
        wait_for(&gw, INVALID, invalid).await;
        more_requests(3).await;
    }
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert!(sent.load(Ordering::SeqCst) >= 23, "the load ran throughout");
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "no request failed across the reloads"
    );

    // A policy change, picked up by the file watch alone: the next request sees it.
    std::fs::write(
        &path,
        original.replace(
            "allowed_domains = [\"*.saas.test\"]",
            "allowed_domains = [\"other.saas.test\"]",
        ),
    )
    .unwrap();
    wait_for(&gw, OK, ok + 1).await;

    let resp = client(&gw, Some(("app", APP_TOKEN)))
        .get(env.url("api.saas.test", "/after"))
        .header("X-Connector", "saas")
        .header("X-Workspace", "ws_42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-sluice-error"], "domain_not_allowed");
}
