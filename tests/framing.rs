//! Request framing on the app's side: broken bodies, header limits, pipelined requests.
//! Real gateway, real TLS upstream, raw TCP clients (the defects live below what reqwest sends).

mod common;

use common::*;

fn head(
    method: &str,
    port: u16,
    path: &str,
    connector: &str,
    workspace: &str,
    token: &str,
) -> String {
    format!(
        "{method} http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-Connector: {connector}\r\nX-Workspace: {workspace}\r\nProxy-Authorization: Bearer {token}\r\n",
        host = if connector == "narrow" {
            "other.saas.test"
        } else {
            "api.saas.test"
        },
    )
}

const REFUSED_MALFORMED: &str = "sluice_requests_total{class=\"refused\",connector=\"saas\",outcome=\"malformed_request\",status=\"4xx\"}";
const LOGGED_OK_WITHOUT_STATUS: &str =
    "sluice_requests_total{class=\"forwarded\",connector=\"saas\",outcome=\"ok\",status=\"none\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_is_answered_400_never_retried_and_logged_as_malformed() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    // (name, method, body after the head). GET and PUT are replay-safe: a broken body must not
    // make sluice send the request again.
    let cases = [
        ("bad chunk size first", "PUT", "zz\r\nhello\r\n0\r\n\r\n"),
        (
            "bad chunk size after a good chunk",
            "PUT",
            "5\r\nhello\r\nzz\r\nx\r\n0\r\n\r\n",
        ),
        ("chunk without its CRLF", "POST", "5\r\nhelloXX0\r\n\r\n"),
        ("on a GET", "GET", "zz\r\n"),
    ];
    for (i, (name, method, body)) in cases.iter().enumerate() {
        let request = format!(
            "{}Transfer-Encoding: chunked\r\n\r\n{body}",
            head(method, port, "/upload", "saas", "ws_42", APP_TOKEN)
        );
        let got = exchange(&gw, request.as_bytes(), false).await;
        assert_eq!(got.len(), 1, "{name}: {got:?}");
        assert_eq!(got[0].status, 400, "{name}: {got:?}");
        assert_eq!(
            got[0].header("x-sluice-error"),
            Some("malformed_request"),
            "{name}"
        );
        assert_eq!(
            got[0].code().as_deref(),
            Some("malformed_request"),
            "{name}"
        );
        assert_eq!(got[0].header("connection"), Some("close"), "{name}");
        assert_eq!(
            metric(&gw, REFUSED_MALFORMED).await,
            i as u64 + 1,
            "{name}: counted (and logged) as malformed_request"
        );
    }
    assert_eq!(metric(&gw, LOGGED_OK_WITHOUT_STATUS).await, 0);
    assert_eq!(
        metric(
            &gw,
            "sluice_retries_total{connector=\"saas\",reason=\"io\"}"
        )
        .await,
        0,
        "a broken request body is never retried"
    );
    let uploads: Vec<_> = env
        .upstream
        .requests()
        .into_iter()
        .filter(|r| r.target == "/upload")
        .collect();
    assert!(uploads.len() <= cases.len(), "one attempt each at most");
    // The harness records a request whose body broke off with an empty body.
    assert!(
        uploads.iter().all(|r| r.body.is_empty()),
        "the upstream never received a whole body: {uploads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_mid_body_is_logged_as_client_closed_not_ok() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    let request = format!(
        "{}Content-Length: 10\r\n\r\nhello",
        head("PUT", port, "/short", "saas", "ws_42", APP_TOKEN)
    );
    // The client stops sending (FIN) five bytes short.
    let got = exchange(&gw, request.as_bytes(), true).await;
    assert!(got.is_empty(), "nothing to answer a closed client: {got:?}");
    assert_eq!(
        metric(
            &gw,
            "sluice_requests_total{class=\"refused\",connector=\"saas\",outcome=\"client_closed\",status=\"none\"}"
        )
        .await,
        1
    );
    assert_eq!(metric(&gw, LOGGED_OK_WITHOUT_STATUS).await, 0);
    assert_eq!(
        metric(
            &gw,
            "sluice_retries_total{connector=\"saas\",reason=\"io\"}"
        )
        .await,
        0,
        "a PUT whose client left is not sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_are_configurable_and_answered_431() {
    let env = Env::new().await;
    let gw = env
        .start_with("max_header_count = 8\nmax_header_bytes = 2048", "")
        .await;
    let port = env.upstream.port();
    // Host, X-Connector, X-Workspace, Proxy-Authorization and `extra` more.
    let with = |extra: usize, value_len: usize| {
        let mut r = head("GET", port, "/limits", "saas", "ws_42", APP_TOKEN);
        for i in 0..extra {
            r.push_str(&format!("X-F{i}: {}\r\n", "v".repeat(value_len)));
        }
        r.push_str("Connection: close\r\n\r\n");
        r
    };
    // 4 + 3 + Connection = 8 fields: at the limit.
    let at_limit = exchange(&gw, with(3, 10).as_bytes(), false).await;
    assert_eq!(at_limit[0].status, 200, "{at_limit:?}");
    let over = exchange(&gw, with(4, 10).as_bytes(), false).await;
    assert_eq!(over[0].status, 431, "{over:?}");
    assert_eq!(over[0].code().as_deref(), Some("request_headers_too_large"));
    assert_eq!(over[0].header("content-type"), Some("application/json"));
    let big = exchange(&gw, with(1, 2048).as_bytes(), false).await;
    assert_eq!(big[0].status, 431, "{big:?}");
    assert_eq!(big[0].code().as_deref(), Some("request_headers_too_large"));
    assert_eq!(
        env.upstream
            .requests()
            .iter()
            .filter(|r| r.target == "/limits")
            .count(),
        1,
        "only the request within the limits went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_outside_the_parser_range_are_refused_at_load() {
    for (listener, key) in [
        ("max_header_count = 0", "listener.max_header_count"),
        ("max_header_count = 257", "listener.max_header_count"),
        ("max_header_bytes = 100", "listener.max_header_bytes"),
        ("max_header_bytes = 2000000", "listener.max_header_bytes"),
    ] {
        let env = Env::new().await;
        let text = env.config(1, listener, "");
        let path = env.dir.path().join("limits.toml");
        std::fs::write(&path, text).unwrap();
        let err = sluice::config::Snapshot::load(&path)
            .err()
            .unwrap_or_else(|| panic!("{listener} was accepted"))
            .to_string();
        assert!(err.contains(key), "{listener}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_served_in_order_each_with_its_own_credential() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    put_credential(&gw, "ws_7", "narrow", true, &[("api_key", "key-of-ws-7")]).await;
    put_credential(
        &gw,
        "ws_other",
        "narrow",
        true,
        &[("api_key", "key-of-ws-other")],
    )
    .await;
    // Four requests in one write: two workspaces' credentials, a refusal in the middle (which
    // keeps the connection), and a last one that closes it.
    let get = |path, connector, workspace, token| {
        format!(
            "{}\r\n",
            head("GET", port, path, connector, workspace, token)
        )
    };
    let pipelined = [
        get("/p1", "narrow", "ws_7", APP_TOKEN),
        get("/p2", "narrow", "ws_other", OPS_TOKEN),
        get("/p3", "narrow", "ws_42", APP_TOKEN),
        format!(
            "{}Connection: close\r\n\r\n",
            head("GET", port, "/p4", "saas", "ws_42", APP_TOKEN)
        ),
    ]
    .concat();
    let got = exchange(&gw, pipelined.as_bytes(), false).await;
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 403, 200], "{got:?}");
    assert_eq!(got[2].code().as_deref(), Some("org_domain_not_allowed"));
    let seen: Vec<(String, Option<String>)> = env
        .upstream
        .requests()
        .iter()
        .map(|r| (r.target.clone(), r.header("x-api-key").map(str::to_string)))
        .collect();
    assert_eq!(
        seen,
        [
            ("/p1".to_string(), Some("key-of-ws-7".to_string())),
            ("/p2".to_string(), Some("key-of-ws-other".to_string())),
            ("/p4".to_string(), None),
        ],
        "in order, each with its own workspace's credential"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_request_behind_a_body_is_served_too() {
    let env = Env::new().await;
    let gw = env.start().await;
    let port = env.upstream.port();
    let pipelined = [
        format!(
            "{}Content-Length: 5\r\n\r\nhello",
            head("POST", port, "/b1", "saas", "ws_42", APP_TOKEN)
        ),
        format!(
            "{}Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            head("PUT", port, "/b2", "saas", "ws_42", APP_TOKEN)
        ),
        format!(
            "{}Connection: close\r\n\r\n",
            head("GET", port, "/b3", "saas", "ws_42", APP_TOKEN)
        ),
    ]
    .concat();
    let got = exchange(&gw, pipelined.as_bytes(), false).await;
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200], "{got:?}");
    let seen: Vec<(String, Vec<u8>)> = env
        .upstream
        .requests()
        .iter()
        .map(|r| (r.target.clone(), r.body.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/b1".to_string(), b"hello".to_vec()),
            ("/b2".to_string(), b"abc".to_vec()),
            ("/b3".to_string(), Vec::new()),
        ]
    );
}
