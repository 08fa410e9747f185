//! Validation, section by section: each row is a file fragment and the error it must produce
//! (key and part of the message), or `None` when the fragment is valid.

use std::path::Path;

use super::*;

/// A valid file's start: a listener, and DNS that never leaves the process.
const BASE: &str = r#"
[listener]
address = "127.0.0.1:18080"

[dns]
static_only = true
"#;

const ORG_AND_WORKSPACE: &str = r#"
[[org]]
org_id = "o"

[[workspace]]
workspace_id = "w"
org = "o"
"#;

const CREDENTIALS: &str = r#"
[credentials]
store = "embedded"
path = "/tmp/sluice-config-test.redb"
key_env = "SLUICE_TEST_KEYS"
"#;

fn load(fragment: &str) -> Result<Snapshot, ConfigErrors> {
    load_text(&format!("{BASE}{ORG_AND_WORKSPACE}{fragment}"))
}

fn load_text(text: &str) -> Result<Snapshot, ConfigErrors> {
    Snapshot::from_toml(text, Path::new("/tmp/sluice-config-test.toml"))
}

type Row<'a> = (&'a str, Option<(&'a str, &'a str)>);

/// Every row: `None` loads; `Some((key, message))` fails with an error for `key` whose
/// message contains `message`. Rows are fragments added to a valid file.
fn check(section: &str, rows: &[Row<'_>]) {
    check_with(section, rows, load);
}

fn check_with(
    section: &str,
    rows: &[Row<'_>],
    load: impl Fn(&str) -> Result<Snapshot, ConfigErrors>,
) {
    for (fragment, want) in rows {
        match (want, load(fragment)) {
            (None, Ok(_)) => {}
            (None, Err(e)) => panic!("{section}: {fragment}\nshould load, got:\n{e}"),
            (Some((key, _)), Ok(_)) => {
                panic!("{section}: {fragment}\nshould fail on {key}, but loaded")
            }
            (Some((key, message)), Err(e)) => assert!(
                e.errors
                    .iter()
                    .any(|x| x.key == *key && x.message.contains(message)),
                "{section}: {fragment}\nwanted {key}: …{message}…, got:\n{e}"
            ),
        }
    }
}

/// A connector with the given auth type and extra lines (in its table).
fn connector(auth_type: &str, extra: &str) -> String {
    format!(
        r#"
[[connector]]
connector_id = "c"
display_name = "C"
auth_type = "{auth_type}"
allowed_domains = ["api.example.com"]
{extra}
"#
    )
}

#[test]
fn listener() {
    // These replace BASE's [listener].
    let listener =
        |lines: &str| load_text(&format!("[listener]\n{lines}\n[dns]\nstatic_only = true\n"));
    let rows: &[Row<'_>] = &[
        ("address = \"127.0.0.1:1\"", None),
        (
            "address = \"localhost:1\"",
            Some(("listener.address", "is not an IP:port")),
        ),
        (
            "address = \"0.0.0.0:1\"\ndev_mode_unauthenticated = true",
            Some(("listener.dev_mode_unauthenticated", "loopback")),
        ),
        (
            "address = \"127.0.0.1:1\"\nthreads = 0",
            Some(("listener.threads", "at least 1")),
        ),
        (
            "address = \"127.0.0.1:1\"\nmax_header_count = 257",
            Some(("listener.max_header_count", "1..=256")),
        ),
        (
            "address = \"127.0.0.1:1\"\nmax_header_bytes = 1023",
            Some(("listener.max_header_bytes", "1024..=")),
        ),
    ];
    check_with("listener", rows, listener);
}

#[test]
fn upstream_egress_and_dns() {
    check(
        "upstream/egress/dns",
        &[
            ("[upstream]\nconnect_timeout_ms = 1", None),
            (
                "[upstream]\nread_timeout_ms = 0",
                Some(("upstream.read_timeout_ms", "greater than 0")),
            ),
            (
                "[upstream]\nextra_ca_file = \"/nonexistent/ca.pem\"",
                Some(("upstream.extra_ca_file", "")),
            ),
            ("[egress]\nexception_cidrs = [\"10.1.0.0/16\"]", None),
            (
                "[egress]\nexception_cidrs = [\"::/0\"]",
                Some(("egress.exception_cidrs[0]", "off entirely")),
            ),
            (
                "[egress]\nexception_cidrs = [\"10.0.0.0/33\"]",
                Some(("egress.exception_cidrs[0]", "10.0.0.0/33")),
            ),
        ],
    );
    // These replace BASE's [dns].
    let dns = |lines: &str| {
        load_text(&format!(
            "[listener]\naddress = \"127.0.0.1:1\"\n[dns]\nstatic_only = true\n{lines}"
        ))
    };
    let rows: &[Row<'_>] = &[
        ("nameservers = [\"10.0.0.53\", \"[::1]:5353\"]", None),
        (
            "nameservers = [\"dns.google\"]",
            Some(("dns.nameservers[0]", "not an IP")),
        ),
        ("timeout_ms = 0", Some(("dns.timeout_ms", "greater than 0"))),
        ("attempts = 0", Some(("dns.attempts", "at least 1"))),
        (
            "[dns.static_hosts]\n\"api.example.com\" = [\"10.0.0.1\"]",
            None,
        ),
        (
            "[dns.static_hosts]\n\"10.0.0.1\" = [\"10.0.0.1\"]",
            Some(("dns.static_hosts.\"10.0.0.1\"", "not an IP literal")),
        ),
        (
            "[dns.static_hosts]\n\"a.example.com\" = []",
            Some(("dns.static_hosts.\"a.example.com\"", "at least one")),
        ),
        (
            "[dns.static_hosts]\n\"a.example.com\" = [\"nope\"]",
            Some(("dns.static_hosts.\"a.example.com\"[0]", "not an IP")),
        ),
    ];
    check_with("dns", rows, dns);
}

#[test]
fn connector_choices_report_the_written_value_and_the_allowed_ones() {
    check(
        "connector",
        &[
            (&connector("none", ""), None),
            (
                &connector("magic", ""),
                Some((
                    "connector[c].auth_type",
                    "\"magic\" is not one of none, api_key, basic, bearer, oauth2",
                )),
            ),
            (
                &format!(
                    "{CREDENTIALS}{}",
                    connector(
                        "bearer",
                        "[[connector.auth_schema.fields]]\nname = \"token\"\nlabel = \"T\"\ntype = \"secret\""
                    )
                ),
                Some((
                    "connector[c].auth_schema.fields[0].type",
                    "\"secret\" is not one of text, password, url, email, number",
                )),
            ),
            (
                &connector("none", "[connector.rate_limit]\nscope = \"galaxy\""),
                Some((
                    "connector[c].rate_limit.scope",
                    "\"galaxy\" is not one of workspace, application",
                )),
            ),
            (
                &connector(
                    "none",
                    "[connector.rate_limit]\nreset_format = \"fortnights\"",
                ),
                Some((
                    "connector[c].rate_limit.reset_format",
                    "one of auto, delta_seconds, delta_ms, epoch_seconds, epoch_ms",
                )),
            ),
            (
                &format!(
                    "{CREDENTIALS}{}",
                    connector(
                        "oauth2",
                        "[connector.oauth2]\ngrant = \"password\"\ntoken_url = \"https://api.example.com/t\"\nclient_id = \"x\"\nclient_auth = \"jwt\"\nclient_secret_env = \"S\""
                    )
                ),
                Some((
                    "connector[c].oauth2.grant",
                    "\"password\" is not one of authorization_code, client_credentials",
                )),
            ),
            (
                &format!(
                    "{CREDENTIALS}{}",
                    connector(
                        "oauth2",
                        "[connector.oauth2]\ngrant = \"client_credentials\"\ntoken_url = \"https://api.example.com/t\"\nclient_id = \"x\"\nclient_auth = \"jwt\"\nclient_secret_env = \"S\""
                    )
                ),
                Some((
                    "connector[c].oauth2.client_auth",
                    "\"jwt\" is not one of client_secret_basic, client_secret_post",
                )),
            ),
        ],
    );
}

#[test]
fn connector_rules() {
    check(
        "connector",
        &[
            (
                &connector("none", "allowed_ports = []"),
                Some(("connector[c].allowed_ports", "at least one")),
            ),
            (
                &connector("none", "allowed_ports = [0]"),
                Some(("connector[c].allowed_ports", "0 is not a port")),
            ),
            (
                &connector(
                    "bearer",
                    "[[connector.auth_schema.fields]]\nname = \"token\"\nlabel = \"T\"",
                ),
                Some(("credentials", "inject credentials")),
            ),
            (
                &connector("none", "[connector.inject]\nheader = \"X-Key\""),
                Some(("connector[c].inject", "injects nothing")),
            ),
            (
                &connector(
                    "none",
                    "[connector.oauth2]\ngrant = \"client_credentials\"\ntoken_url = \"https://api.example.com/t\"\nclient_id = \"x\"",
                ),
                Some(("connector[c].oauth2", "only for auth_type")),
            ),
            (
                &format!("{CREDENTIALS}{}", connector("oauth2", "")),
                Some(("connector[c].oauth2", "needs an [connector.oauth2]")),
            ),
            (
                &connector(
                    "none",
                    "[connector.rate_limit]\ncapacity = 5\nper_second = 1.0\nshared = true",
                ),
                Some(("connector[c].rate_limit.shared", "lives in Redis")),
            ),
            (
                &connector("none", "[connector.rate_limit]\nmin_wait_ms = 100"),
                None,
            ),
            (
                &connector("none", "[connector.rate_limit]\nmin_wait_ms = 101"),
                Some(("connector[c].rate_limit.min_wait_ms", "at most 100")),
            ),
            (
                &connector("none", "[connector.retry]\nmax_attempts = 0"),
                Some(("connector[c].retry.max_attempts", "")),
            ),
            (
                &connector("none", "[connector.circuit_breaker]\nfailure_threshold = 0"),
                Some((
                    "connector[c].circuit_breaker.failure_threshold",
                    "at least 1",
                )),
            ),
            (
                &connector(
                    "none",
                    "[[connector.actions]]\naction_id = \"a\"\nhttp_method = \"POST\"\nurl_template = \"https://api.example.com/{id}\"",
                ),
                None,
            ),
            (
                &connector(
                    "none",
                    "[[connector.actions]]\naction_id = \"a\"\nhttp_method = \"post\"\nurl_template = \"https://api.example.com/\"",
                ),
                Some(("connector[c].actions[0].http_method", "upper-case")),
            ),
            (
                &connector(
                    "none",
                    "[[connector.actions]]\naction_id = \"a\"\nhttp_method = \"GET\"\nurl_template = \"https://evil.example.net/\"",
                ),
                Some((
                    "connector[c].actions[0].url_template",
                    "not in the connector's allowed_domains",
                )),
            ),
            (
                &connector(
                    "none",
                    "[[connector.actions]]\naction_id = \"a\"\nhttp_method = \"GET\"\nurl_template = \"https://api.example.com/{id\"",
                ),
                Some(("connector[c].actions[0].url_template", "without its `}`")),
            ),
            (
                &connector(
                    "none",
                    "[[connector.actions]]\naction_id = \"a\"\nhttp_method = \"POST\"\nurl_template = \"https://{tenant}.example.com/x\"\nbody_schema = [{ name = \"email\", label = \"Email\", required = true }]",
                ),
                None,
            ),
            (
                &format!("{}{}", connector("none", ""), connector("none", "")),
                Some(("connector[c].connector_id", "duplicate")),
            ),
        ],
    );
}

#[test]
fn orgs_workspaces_and_callers() {
    let token = "0".repeat(64);
    check(
        "org/workspace/caller",
        &[
            (
                "[[org]]\norg_id = \"o\"",
                Some(("org[1].org_id", "duplicate org_id")),
            ),
            (
                "[[org]]\norg_id = \"p\"\nallowed_domains = []",
                Some(("org[p].allowed_domains", "at least one domain")),
            ),
            (
                "[[workspace]]\nworkspace_id = \"v\"\norg = \"nope\"",
                Some(("workspace[1].org", "no [[org]]")),
            ),
            (
                &format!(
                    "[[caller]]\nname = \"app\"\ntoken_sha256 = \"{token}\"\nworkspaces = [\"w\"]"
                ),
                None,
            ),
            (
                &format!(
                    "[[caller]]\nname = \"app\"\ntoken_sha256 = \"{token}\"\nworkspaces = [\"*\"]"
                ),
                None,
            ),
            (
                "[[caller]]\nname = \"app\"\ntoken_sha256 = \"abc\"\nworkspaces = [\"w\"]",
                Some(("caller[0].token_sha256", "64 hex digits")),
            ),
            (
                &format!(
                    "[[caller]]\nname = \"app\"\ntoken_sha256 = \"{token}\"\nworkspaces = [\"*\", \"w\"]"
                ),
                Some(("caller[0].workspaces", "only entry")),
            ),
            (
                &format!("[[caller]]\nname = \"app\"\ntoken_sha256 = \"{token}\"\nworkspaces = []"),
                Some(("caller[0].workspaces", "must list")),
            ),
            (
                &format!(
                    "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{token}\"\nworkspaces = [\"w\"]\n[[caller]]\nname = \"b\"\ntoken_sha256 = \"{token}\"\nworkspaces = [\"w\"]"
                ),
                Some(("caller[1].token_sha256", "share one token")),
            ),
        ],
    );
}

#[test]
fn credentials_admin_and_interception() {
    let admin_token = "a".repeat(64);
    check(
        "credentials/admin/interception",
        &[
            (CREDENTIALS, None),
            (
                "[credentials]\nstore = \"postgres\"\nkey_env = \"K\"",
                Some((
                    "credentials.store",
                    "\"postgres\" is not one of embedded, redis",
                )),
            ),
            (
                "[credentials]\nstore = \"embedded\"\nkey_env = \"K\"",
                Some(("credentials.path", "needs a database file path")),
            ),
            (
                "[credentials]\nstore = \"redis\"\nredis_url = \"http://x\"\nkey_env = \"K\"",
                Some(("credentials.redis_url", "redis://")),
            ),
            (
                "[credentials]\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1/\"\npath = \"/tmp/x\"\nkey_env = \"K\"",
                Some(("credentials.path", "only used by the embedded store")),
            ),
            (
                "[credentials]\nstore = \"redis\"\nredis_cluster = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\nkey_env = \"K\"",
                None,
            ),
            (
                "[credentials]\nstore = \"redis\"\nredis_url = \"redis+cluster://127.0.0.1:7000,127.0.0.1:7001/\"\nkey_env = \"K\"",
                None,
            ),
            (
                "[credentials]\nstore = \"redis\"\nredis_url = \"redis+cluster:///\"\nkey_env = \"K\"",
                Some(("credentials.redis_url", "at least one host:port")),
            ),
            (
                "[credentials]\nstore = \"redis\"\nredis_cluster = []\nkey_env = \"K\"",
                Some(("credentials.redis_cluster", "at least one seed node")),
            ),
            (
                "[credentials]\nstore = \"redis\"\nredis_url = \"redis://a/\"\nredis_cluster = [\"redis://b:1\"]\nkey_env = \"K\"",
                Some(("credentials.redis_cluster", "not both")),
            ),
            (
                "[credentials]\nstore = \"embedded\"\npath = \"/tmp/x\"\nredis_cluster = [\"redis://b:1\"]\nkey_env = \"K\"",
                Some(("credentials.redis_cluster", "only used by the redis store")),
            ),
            (
                "[credentials]\nstore = \"embedded\"\npath = \"/tmp/x\"",
                Some(("credentials", "exactly one of key_file and key_env")),
            ),
            (
                "[credentials]\nstore = \"embedded\"\npath = \"/tmp/x\"\nkey_env = \"K\"\ncache_ttl_ms = 60000\nmax_staleness_ms = 1000",
                Some(("credentials.max_staleness_ms", "at least cache_ttl_ms")),
            ),
            (
                &format!(
                    "{CREDENTIALS}[admin]\naddress = \"127.0.0.1:19090\"\ntoken_sha256 = \"{admin_token}\""
                ),
                None,
            ),
            (
                &format!(
                    "[admin]\naddress = \"127.0.0.1:19090\"\ntoken_sha256 = \"{admin_token}\""
                ),
                Some(("admin", "needs [credentials]")),
            ),
            (
                &format!(
                    "{CREDENTIALS}[admin]\naddress = \"127.0.0.1:18080\"\ntoken_sha256 = \"{admin_token}\""
                ),
                Some(("admin.address", "must differ")),
            ),
            (
                "[interception]\nca_cert_file = \"/nonexistent/ca.pem\"\nca_key_file = \"/nonexistent/ca.key\"",
                Some(("interception.ca_cert_file", "sluice ca init")),
            ),
        ],
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let e = load(&format!(
        "{}[[caller]]\nname = \"x\"\ntoken_sha256 = \"abc\"\nworkspaces = [\"w\"]",
        connector("magic", "allowed_ports = [0]")
    ))
    .err()
    .expect("broken");
    let keys: Vec<&str> = e.errors.iter().map(|x| x.key.as_str()).collect();
    for key in [
        "connector[c].auth_type",
        "connector[c].allowed_ports",
        "caller[0].token_sha256",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
}

#[test]
fn field_types_check_written_values() {
    let rows = [
        (FieldType::Text, "", true),
        (FieldType::Password, "any thing", true),
        (FieldType::Url, "https://crm.example/api", true),
        (FieldType::Url, "http://10.0.0.1:8080", true),
        (FieldType::Url, "crm.example", false),
        (FieldType::Url, "https://", false),
        (FieldType::Url, "https:///path", false),
        (FieldType::Url, "https://a b", false),
        (FieldType::Email, "ops@crm.example", true),
        (FieldType::Email, "ops@localhost", false),
        (FieldType::Email, "@crm.example", false),
        (FieldType::Email, "a@b@c.example", false),
        (FieldType::Number, "12345", true),
        (FieldType::Number, "-1.5", true),
        (FieldType::Number, "NaN", false),
        (FieldType::Number, "12a", false),
    ];
    for (t, value, ok) in rows {
        assert_eq!(t.accepts(value), ok, "{t:?} {value:?}");
    }
}

#[test]
fn definitions_serialize_back_as_written() {
    // The admin API shows a definition as its JSON: choices are their names again.
    let text = connector("oauth2", "");
    let raw: file::FileConfig =
        toml::from_str(&format!("{BASE}{text}")).expect("parses without validation");
    let json = serde_json::to_value(&raw.connectors[0]).unwrap();
    assert_eq!(json["auth_type"], "oauth2");
    let unknown: file::FileConfig =
        toml::from_str(&format!("{BASE}{}", connector("magic", ""))).unwrap();
    assert_eq!(
        serde_json::to_value(&unknown.connectors[0]).unwrap()["auth_type"],
        "magic"
    );
}

#[test]
fn a_redis_cluster_is_named_by_a_list_or_one_url() {
    use crate::credential::redis::RedisTarget;
    let target = |store: &str| {
        let snapshot = load(&format!(
            "[credentials]\nstore = \"redis\"\n{store}\nkey_env = \"K\""
        ))
        .unwrap_or_else(|e| panic!("{store}: {e}"));
        match snapshot.credentials.map(|c| c.store) {
            Some(crate::credential::StoreKind::Redis { target }) => target,
            other => panic!("{store}: {other:?}"),
        }
    };
    let nodes = vec![
        "redis://u:p@10.0.0.1:7000".to_string(),
        "redis://u:p@10.0.0.2:7001".into(),
    ];
    assert_eq!(
        target("redis_url = \"redis+cluster://u:p@10.0.0.1:7000,10.0.0.2:7001/\""),
        RedisTarget::Cluster(nodes.clone())
    );
    assert_eq!(
        target(&format!(
            "redis_cluster = [\"{}\", \"{}\"]",
            nodes[0], nodes[1]
        )),
        RedisTarget::Cluster(nodes)
    );
    assert_eq!(
        target("redis_url = \"redis://10.0.0.1:6379/\""),
        RedisTarget::Single("redis://10.0.0.1:6379/".into())
    );
}
