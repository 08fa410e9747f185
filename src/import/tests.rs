use super::*;
use crate::credential::inject::AuthType;

fn doc(yaml: &str) -> Value {
    parse_document(yaml).expect("the test document parses")
}

#[test]
fn servers_security_and_operations_become_a_connector() {
    let d = doc(r##"
openapi: 3.1.0
info: { title: Widgets }
servers:
  - url: https://{region}.widgets.example/v2/
    variables: { region: { default: eu } }
  - url: https://api.widgets.example:8443
security: [ { key: [] } ]
paths:
  /widgets/{widget id}:
    parameters:
      - { name: widget id, in: path, required: true }
    get:
      operationId: getWidget
      parameters:
        - { name: expand, in: query }
        - { name: X-Trace, in: header }
    patch:
      operationId: update widget
      parameters:
        - { name: dry_run, in: query, required: true }
      requestBody:
        required: true
        content:
          application/json:
            schema: { $ref: "#/components/schemas/Widget" }
  /upload:
    post:
      requestBody:
        content: { multipart/form-data: { schema: { type: object } } }
components:
  securitySchemes:
    key: { type: apiKey, in: header, name: X-Widget-Key }
  schemas:
    Widget:
      allOf:
        - { $ref: "#/components/schemas/Base" }
        - type: object
          required: [colour]
          properties:
            colour: { type: string, title: Colour }
            widget id: { type: string }
    Base:
      type: object
      required: [name]
      properties: { name: { type: string, description: "The name.\nMore." } }
"##);
    let Imported {
        connector: c,
        notes,
    } = import(&d, "widgets").expect("imported");
    assert_eq!(c.display_name, "Widgets");
    assert_eq!(
        c.allowed_domains,
        ["api.widgets.example", "eu.widgets.example"]
    );
    assert_eq!(c.allowed_ports, Some(vec![443, 8443]));
    assert_eq!(c.auth_type.get(), Ok(AuthType::ApiKey));
    assert_eq!(c.inject.header.as_deref(), Some("X-Widget-Key"));
    let ids: Vec<&str> = c.actions.iter().map(|a| a.action_id.as_str()).collect();
    assert_eq!(ids, ["post-upload", "getWidget", "update-widget"]);
    let get = &c.actions[1];
    assert_eq!(get.http_method, "GET");
    assert_eq!(
        get.url_template,
        "https://eu.widgets.example/v2/widgets/{widget-id}"
    );
    assert_eq!(get.body_schema.len(), 1);
    assert_eq!(get.body_schema[0].name, "expand");
    let patch = &c.actions[2];
    assert_eq!(
        patch.url_template,
        "https://eu.widgets.example/v2/widgets/{widget-id}?dry_run={dry_run}"
    );
    let fields: Vec<(&str, &str, bool)> = patch
        .body_schema
        .iter()
        .map(|f| (f.name.as_str(), f.label.as_str(), f.required))
        .collect();
    assert_eq!(
        fields,
        [
            ("name", "The name.", true),
            ("colour", "Colour", true),
            ("widget id", "widget id", false)
        ]
    );
    let notes = notes.join("\n");
    assert!(notes.contains("header parameter \"X-Trace\""), "{notes}");
    assert!(notes.contains("multipart/form-data"), "{notes}");
    check(&c).expect("the definition validates");
}

#[test]
fn unsupported_schemes_are_skipped_for_the_next_usable_one() {
    let d = doc(r#"
openapi: 3.0.3
info: { title: T }
servers: [ { url: "http://legacy.example/api" } ]
paths:
  /things:
    get:
      security: [ { cookie: [] }, { oauth: [] } ]
components:
  securitySchemes:
    cookie: { type: apiKey, in: cookie, name: sid }
    oauth:
      type: oauth2
      flows:
        clientCredentials:
          tokenUrl: https://auth.legacy.example/token
          scopes: { read: Read }
"#);
    let Imported {
        connector: c,
        notes,
    } = import(&d, "legacy").expect("imported");
    assert_eq!(c.auth_type.get(), Ok(AuthType::OAuth2));
    let oauth = c.oauth2.as_ref().expect("oauth2 settings");
    assert_eq!(oauth.token_url, "https://auth.legacy.example/token");
    assert_eq!(oauth.scopes, ["read"]);
    assert_eq!(c.allowed_domains, ["auth.legacy.example", "legacy.example"]);
    assert_eq!(
        c.actions[0].url_template,
        "https://legacy.example/api/things"
    );
    let notes = notes.join("\n");
    assert!(notes.contains("http://"), "{notes}");
    assert!(notes.contains("\"cookie\""), "{notes}");
    assert!(notes.contains("client_id"), "{notes}");
    check(&c).expect("validates but for the client settings");
}

#[test]
fn what_is_not_openapi_3_is_refused() {
    assert!(import(&doc("swagger: '2.0'\ninfo: {title: x}\n"), "x").is_err());
    let no_server = doc("openapi: 3.1.0\ninfo: {title: x}\nservers: [ {url: /v1} ]\n");
    assert!(import(&no_server, "x").unwrap_err().contains("server"));
    let d = doc("openapi: 3.1.0\ninfo: {title: x}\nservers: [ {url: 'https://a.example'} ]\n");
    assert!(import(&d, "not an id").is_err());
    assert!(parse_document("{ not json").is_err());
}
