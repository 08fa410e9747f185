use super::*;
use crate::names::Host;

fn action(method: Method, template: &str, fields: &[(&str, bool)]) -> Action {
    Action {
        action_id: "act".into(),
        http_method: method,
        url_template: UrlTemplate::parse(template).expect("valid template"),
        body_schema: fields
            .iter()
            .map(|(name, required)| BodyField {
                name: (*name).into(),
                label: name.to_uppercase(),
                required: *required,
            })
            .collect(),
    }
}

fn body_json(built: &Built) -> Value {
    serde_json::from_slice(built.body.as_ref().expect("a body")).expect("JSON body")
}

#[test]
fn placeholders_fill_the_url_and_the_rest_is_the_body() {
    let a = action(
        Method::PATCH,
        "https://api.example.com/v1/contacts/{id}?mode=full",
        &[("id", true), ("email", true), ("note", false)],
    );
    let built = a
        .build(br#"{"id": "c 1/../x", "email": "a@b.example", "note": null}"#)
        .expect("built");
    assert_eq!(built.method, Method::PATCH);
    assert_eq!(built.target.host, Host::Name("api.example.com".into()));
    assert_eq!(built.target.url_port, None);
    assert_eq!(
        built.target.origin_form,
        "/v1/contacts/c%201%2F..%2Fx?mode=full"
    );
    assert_eq!(
        body_json(&built),
        serde_json::json!({"email": "a@b.example"})
    );
}

#[test]
fn bodiless_methods_send_the_rest_as_query_parameters() {
    let a = action(
        Method::GET,
        "https://api.example.com/v1/search",
        &[("q", true), ("limit", false)],
    );
    let built = a.build(br#"{"q": "a&b=c", "limit": 10}"#).expect("built");
    assert_eq!(built.body, None);
    assert_eq!(built.target.origin_form, "/v1/search?limit=10&q=a%26b%3Dc");
    let nested = a.build(br#"{"q": {"x": 1}}"#).unwrap_err();
    assert_eq!(nested.code, ErrorCode::ActionInputInvalid);
}

#[test]
fn host_placeholders_are_one_label_and_ports_are_kept() {
    let a = action(
        Method::POST,
        "https://{tenant}.example.com:8443/v1/x",
        &[("tenant", true)],
    );
    let built = a.build(br#"{"tenant": "acme-1"}"#).expect("built");
    assert_eq!(built.target.host, Host::Name("acme-1.example.com".into()));
    assert_eq!(built.target.url_port, Some(8443));
    assert_eq!(body_json(&built), serde_json::json!({}));
    for bad in [
        r#"{"tenant": "evil.com/x"}"#,
        r#"{"tenant": "a.b"}"#,
        r#"{"tenant": ""}"#,
    ] {
        let e = a.build(bad.as_bytes()).unwrap_err();
        assert_eq!(e.code, ErrorCode::ActionInputInvalid, "{bad}");
        assert!(!e.message.contains("evil"), "{}", e.message);
    }
}

#[test]
fn missing_unknown_and_malformed_inputs_are_refused_without_their_values() {
    let a = action(
        Method::POST,
        "https://api.example.com/v1/{id}",
        &[("email", true)],
    );
    let missing = a.build(br#"{"id": "1"}"#).unwrap_err();
    assert_eq!(missing.code, ErrorCode::ActionInputInvalid);
    assert!(missing.message.contains("\"email\""), "{}", missing.message);
    let missing_placeholder = a.build(br#"{"email": "x@y.z"}"#).unwrap_err();
    assert!(
        missing_placeholder.message.contains("\"id\""),
        "{}",
        missing_placeholder.message
    );
    let dots = a.build(br#"{"id": "..", "email": "x@y.z"}"#).unwrap_err();
    assert_eq!(dots.code, ErrorCode::ActionInputInvalid);

    let canary = "sk_live_CANARY123";
    let unknown = a
        .build(format!(r#"{{"id": "1", "email": "x@y.z", "{canary}": 1}}"#).as_bytes())
        .unwrap_err();
    assert!(
        unknown.message.contains("unknown input"),
        "{}",
        unknown.message
    );
    assert!(!unknown.message.contains(canary), "{}", unknown.message);
    let broken = a
        .build(format!(r#"{{"id": "{canary}"#).as_bytes())
        .unwrap_err();
    assert!(!broken.message.contains(canary), "{}", broken.message);
    let not_object = a.build(b"[1, 2]").unwrap_err();
    assert_eq!(not_object.code, ErrorCode::ActionInputInvalid);
}

#[test]
fn an_empty_body_is_no_inputs() {
    let a = action(Method::DELETE, "https://api.example.com/v1/all", &[]);
    let built = a.build(b"").expect("built");
    assert_eq!(built.target.origin_form, "/v1/all");
    assert_eq!(built.body, None);
    let post = action(Method::POST, "https://api.example.com/v1/ping", &[]);
    assert_eq!(
        post.build(b"  ").expect("built").body.as_deref(),
        Some(&b"{}"[..])
    );
}

#[test]
fn templates_are_checked_when_parsed() {
    for bad in [
        "http://api.example.com/",
        "https://api.example.com/{id",
        "https://api.example.com/id}",
        "https://api.example.com/{}",
        "https://api.example.com/{a b}",
        "https://api.example.com/x#frag",
        "https://api.example.com/a b",
    ] {
        assert!(UrlTemplate::parse(bad).is_err(), "{bad}");
    }
    let t = UrlTemplate::parse("https://{t}.example.com/v1/{a}/{b}?x={c}").expect("valid");
    assert_eq!(t.placeholders().collect::<Vec<_>>(), ["t", "a", "b", "c"]);
    assert_eq!(t.literal_authority(), None);
    let literal = UrlTemplate::parse("https://api.example.com:8443/v1").expect("valid");
    assert_eq!(literal.literal_authority(), Some("api.example.com:8443"));
}

#[test]
fn only_the_action_path_parses() {
    assert_eq!(
        parse_path("/v1/actions/hubspot/create-contact"),
        Some(("hubspot", "create-contact"))
    );
    assert_eq!(parse_path("/v1/actions/hubspot"), None);
    assert_eq!(parse_path("/v2/actions/a/b"), None);
}
