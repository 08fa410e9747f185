//! `sluice connector import`: an OpenAPI 3.x document (YAML or JSON) becomes a connector
//! definition, the same `[[connector]]` the TOML file and the admin API take.
//!
//! | OpenAPI                         | connector                                                  |
//! |---------------------------------|------------------------------------------------------------|
//! | `servers[].url` (and per path or operation) | `allowed_domains` (their hosts), `allowed_ports`, the actions' base URL; variables take their defaults |
//! | `securitySchemes` (the one `security` names first) | `auth_type`, `auth_schema`, `inject` (or `oauth2`) |
//! | each operation                  | an action: `operationId` → `action_id`, method, path → `url_template` (`{param}` placeholders) |
//! | query parameters                | `body_schema` fields (bodiless methods send them as the query); required ones of a body method become `?name={name}` |
//! | a JSON request body's object properties | `body_schema` fields, `required` from the schema |
//!
//! What cannot be carried over (cookie or header parameters, non-JSON bodies, an OpenID
//! Connect or mutual-TLS scheme, OAuth client settings) is listed in the import's notes, never
//! silently dropped. The result is checked by sluice's own validation before it is printed.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::config::file::{ActionFile, AuthSchemaFile, BodyFieldFile, ConnectorFile};
use crate::names::is_identifier;

/// The definition and what the import could not carry over.
#[derive(Debug)]
pub struct Imported {
    pub connector: ConnectorFile,
    pub notes: Vec<String>,
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Parse a document: JSON when it starts with `{`, else YAML.
pub fn parse_document(text: &str) -> Result<Value, String> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| format!("not valid YAML: {e}"))
    }
}

/// Build the connector `id` from an OpenAPI 3.x document.
pub fn import(doc: &Value, id: &str) -> Result<Imported, String> {
    let version = doc
        .get("openapi")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !version.starts_with("3.") {
        return Err(format!(
            "not an OpenAPI 3.x document (openapi: {version:?}); Swagger 2.0 is not supported"
        ));
    }
    if !is_identifier(id.as_bytes()) {
        return Err(format!("--id {id:?} is not an identifier"));
    }
    let mut ctx = Ctx {
        doc,
        notes: Vec::new(),
        domains: BTreeSet::new(),
        ports: BTreeSet::new(),
    };
    let root_servers = ctx.servers(doc.get("servers"), "servers")?;
    let Some(base) = root_servers.first().cloned() else {
        return Err("the document has no absolute https:// (or http://) server URL".into());
    };
    let (auth_type, fields, inject, oauth2) = ctx.security(id);
    let actions = ctx.actions(&base)?;
    let display_name = doc
        .pointer("/info/title")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())
        .unwrap_or(id)
        .to_owned();
    let mut ports: Vec<u16> = ctx.ports.iter().copied().collect();
    ports.sort_unstable();
    let connector = ConnectorFile {
        connector_id: id.to_owned(),
        display_name,
        auth_type: auth_type.into(),
        auth_schema: AuthSchemaFile { fields },
        actions,
        allowed_domains: ctx.domains.iter().cloned().collect(),
        allowed_ports: (ports != [443]).then_some(ports),
        enabled: true,
        inject,
        oauth2,
        rate_limit: None,
        retry: None,
        circuit_breaker: None,
        tls: None,
    };
    Ok(Imported {
        connector,
        notes: ctx.notes,
    })
}

struct Ctx<'a> {
    doc: &'a Value,
    notes: Vec<String>,
    domains: BTreeSet<String>,
    ports: BTreeSet<u16>,
}

/// A server's base URL, made https://, its host and port recorded.
#[derive(Clone)]
struct Base {
    /// `https://host[:port]/base/path`, without a trailing `/`.
    url: String,
}

impl<'a> Ctx<'a> {
    /// `$ref`s inside the document (`#/components/...`), followed until a value.
    fn resolve(&self, mut value: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(target) = value.get("$ref").and_then(Value::as_str) else {
                return value;
            };
            match target.strip_prefix('#').and_then(|p| self.doc.pointer(p)) {
                Some(next) => value = next,
                None => return value,
            }
        }
        value
    }

    /// The usable (absolute) servers of a `servers` list, variables filled with defaults.
    fn servers(&mut self, list: Option<&Value>, at: &str) -> Result<Vec<Base>, String> {
        let mut out = Vec::new();
        for server in list.and_then(Value::as_array).into_iter().flatten() {
            let Some(template) = server.get("url").and_then(Value::as_str) else {
                continue;
            };
            let mut url = template.to_owned();
            if let Some(vars) = server.get("variables").and_then(Value::as_object) {
                for (name, var) in vars {
                    let default = var
                        .get("default")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    url = url.replace(&format!("{{{name}}}"), default);
                }
            }
            let rest = if let Some(rest) = url.strip_prefix("https://") {
                rest
            } else if let Some(rest) = url.strip_prefix("http://") {
                self.notes.push(format!(
                    "{at}: {template} is http://; sluice calls upstreams over https only"
                ));
                rest
            } else {
                self.notes
                    .push(format!("{at}: {template} is not absolute; skipped"));
                continue;
            };
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let (host, port) = match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h,
                    p.parse::<u16>()
                        .map_err(|_| format!("{at}: bad port in {template}"))?,
                ),
                None => (authority, 443),
            };
            if host.is_empty() || host.contains(['{', '}']) {
                self.notes
                    .push(format!("{at}: {template} has no usable host; skipped"));
                continue;
            }
            let host = host.to_ascii_lowercase();
            let port = if port == 80 { 443 } else { port };
            self.domains.insert(host.clone());
            self.ports.insert(port);
            let authority = if port == 443 {
                host
            } else {
                format!("{host}:{port}")
            };
            out.push(Base {
                url: format!("https://{authority}{}", path.trim_end_matches('/')),
            });
        }
        Ok(out)
    }

    /// Every operation as an action, in path order.
    fn actions(&mut self, base: &Base) -> Result<Vec<ActionFile>, String> {
        let mut actions = Vec::new();
        let mut ids = BTreeSet::new();
        let Some(paths) = self.doc.get("paths").and_then(Value::as_object) else {
            return Ok(actions);
        };
        for (path, item) in paths {
            let item = self.resolve(item);
            let path_base = self
                .servers(item.get("servers"), &format!("paths.{path}.servers"))?
                .into_iter()
                .next()
                .unwrap_or_else(|| base.clone());
            for method in METHODS {
                let Some(op) = item.get(method) else {
                    continue;
                };
                let op_base = self
                    .servers(op.get("servers"), &format!("{method} {path}: servers"))?
                    .into_iter()
                    .next()
                    .unwrap_or_else(|| path_base.clone());
                let action = self.action(&op_base, path, method, item, op);
                let mut action_id = action.action_id.clone();
                let mut n = 2;
                while !ids.insert(action_id.clone()) {
                    action_id = format!("{}-{n}", action.action_id);
                    n += 1;
                }
                actions.push(ActionFile {
                    action_id,
                    ..action
                });
            }
        }
        Ok(actions)
    }

    fn action(
        &mut self,
        base: &Base,
        path: &str,
        method: &str,
        item: &Value,
        op: &Value,
    ) -> ActionFile {
        let at = format!("{} {path}", method.to_ascii_uppercase());
        let action_id = op
            .get("operationId")
            .and_then(Value::as_str)
            .map(identifier)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| {
                identifier(&format!("{method}{}", path.replace(['/', '{', '}'], "-")))
            });
        // Path-level parameters, overridden by the operation's (same name and location).
        let mut params: BTreeMap<(String, String), &Value> = BTreeMap::new();
        for list in [item.get("parameters"), op.get("parameters")] {
            for p in list.and_then(Value::as_array).into_iter().flatten() {
                let p = self.resolve(p);
                let (Some(name), Some(loc)) = (
                    p.get("name").and_then(Value::as_str),
                    p.get("in").and_then(Value::as_str),
                ) else {
                    continue;
                };
                params.insert((loc.to_owned(), name.to_owned()), p);
            }
        }
        let bodiless = matches!(method, "get" | "head" | "delete" | "options" | "trace");
        let mut url_path = path.to_owned();
        let mut body_schema: Vec<BodyFieldFile> = Vec::new();
        let mut query_placeholders = Vec::new();
        let mut skipped = Vec::new();
        for ((loc, name), p) in &params {
            let required = p.get("required").and_then(Value::as_bool).unwrap_or(false);
            match loc.as_str() {
                "path" => {
                    let placeholder = identifier(name);
                    if &placeholder != name {
                        url_path =
                            url_path.replace(&format!("{{{name}}}"), &format!("{{{placeholder}}}"));
                    }
                }
                "query" if bodiless => body_schema.push(BodyFieldFile {
                    name: name.clone(),
                    label: label(p, name),
                    required,
                }),
                "query" if required => query_placeholders.push(identifier(name)),
                _ => skipped.push(format!("{loc} parameter {name:?}")),
            }
        }
        if let Some(body) = op.get("requestBody").map(|b| self.resolve(b)) {
            self.body_fields(&at, body, &mut body_schema, &mut skipped);
        }
        let placeholders: BTreeSet<String> = url_path
            .split('{')
            .skip(1)
            .filter_map(|s| s.split_once('}').map(|(n, _)| n.to_owned()))
            .chain(query_placeholders.iter().cloned())
            .collect();
        // A body field named like a placeholder would fill the URL instead: the URL wins.
        body_schema.retain(|f| {
            let clash = placeholders.contains(&f.name);
            if clash {
                skipped.push(format!(
                    "body field {:?} (same name as a URL placeholder)",
                    f.name
                ));
            }
            !clash
        });
        let mut url_template = format!("{}{url_path}", base.url);
        for (i, q) in query_placeholders.iter().enumerate() {
            url_template.push(if i == 0 && !url_template.contains('?') {
                '?'
            } else {
                '&'
            });
            url_template.push_str(&format!("{q}={{{q}}}"));
        }
        if !skipped.is_empty() {
            self.notes.push(format!(
                "{at} ({action_id}): not carried over: {}",
                skipped.join(", ")
            ));
        }
        ActionFile {
            action_id,
            http_method: method.to_ascii_uppercase(),
            url_template,
            body_schema,
        }
    }

    /// The top-level properties of a JSON request body's object schema.
    fn body_fields(
        &mut self,
        at: &str,
        body: &Value,
        fields: &mut Vec<BodyFieldFile>,
        skipped: &mut Vec<String>,
    ) {
        let content = body.get("content").and_then(Value::as_object);
        let json = content.and_then(|c| {
            c.iter()
                .find(|(t, _)| *t == "application/json" || t.ends_with("+json"))
                .map(|(_, v)| v)
        });
        let Some(schema) = json.and_then(|j| j.get("schema")) else {
            if let Some(c) = content.filter(|c| !c.is_empty()) {
                let types: Vec<&str> = c.keys().map(String::as_str).collect();
                skipped.push(format!("a request body of {}", types.join(", ")));
            }
            return;
        };
        let body_required = body
            .get("required")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (properties, required) = self.object(schema);
        if properties.is_empty() {
            skipped.push(format!(
                "a JSON body that is not an object with properties ({at})"
            ));
            return;
        }
        for (name, prop) in properties {
            if fields.iter().any(|f| f.name == name) {
                continue;
            }
            fields.push(BodyFieldFile {
                label: label(self.resolve(prop), &name),
                required: body_required && required.contains(&name),
                name,
            });
        }
    }

    /// An object schema's properties (in order) and required names, through `$ref`, `allOf`
    /// (all required), `anyOf` and `oneOf` (none required).
    fn object(&self, schema: &'a Value) -> (Vec<(String, &'a Value)>, BTreeSet<String>) {
        let schema = self.resolve(schema);
        let mut properties: Vec<(String, &Value)> = Vec::new();
        let mut required: BTreeSet<String> = schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        for part in schema
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (p, r) = self.object(part);
            properties.extend(p);
            required.extend(r);
        }
        // Alternatives: any of their properties may be sent, none is required by all of them.
        for key in ["anyOf", "oneOf"] {
            for part in schema
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for (name, prop) in self.object(part).0 {
                    if !properties.iter().any(|(n, _)| *n == name) {
                        properties.push((name, prop));
                    }
                }
            }
        }
        if let Some(own) = schema.get("properties").and_then(Value::as_object) {
            properties.extend(own.iter().map(|(k, v)| (k.clone(), v)));
        }
        (properties, required)
    }
}

/// A name as an identifier (`is_identifier`): other characters become `-`.
fn identifier(raw: &str) -> String {
    let mut out: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    out = out
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    out.truncate(128);
    out
}

/// A field's label: its title, else the first line of its description, else its name.
fn label(schema: &Value, name: &str) -> String {
    let text = schema
        .get("title")
        .or_else(|| schema.get("description"))
        .or_else(|| schema.pointer("/schema/title"))
        .and_then(Value::as_str)
        .and_then(|t| t.lines().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or(name);
    let mut label: String = text.chars().take(80).collect();
    if label.len() < text.len() {
        label.push('…');
    }
    label
}

/// The definition as TOML (one `[[connector]]`).
pub fn to_toml(connector: &ConnectorFile) -> Result<String, String> {
    #[derive(serde::Serialize)]
    struct File<'a> {
        connector: [&'a ConnectorFile; 1],
    }
    toml::to_string(&File {
        connector: [connector],
    })
    .map_err(|e| format!("cannot write TOML: {e}"))
}

/// The definition as the admin API's JSON.
pub fn to_json(connector: &ConnectorFile) -> Result<String, String> {
    serde_json::to_string_pretty(connector).map_err(|e| format!("cannot write JSON: {e}"))
}

mod security;
#[cfg(test)]
mod tests;

/// The definition through sluice's own validation, as a config with only this connector.
/// OAuth client settings are the operator's to fill in (the notes say so): their placeholders
/// are not held against the import.
pub fn check(connector: &ConnectorFile) -> Result<(), String> {
    let text = format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n\n[credentials]\nstore = \"embedded\"\npath = \"imported.redb\"\nkey_env = \"SLUICE_IMPORT_CHECK\"\n\n{}",
        to_toml(connector)?
    );
    match crate::config::Snapshot::from_toml(&text, std::path::Path::new("imported.toml")) {
        Ok(_) => Ok(()),
        Err(e) => {
            let problems: Vec<String> = e
                .errors
                .iter()
                .filter(|e| !e.key.contains(".oauth2.client_secret"))
                .map(|e| format!("{}: {}", e.key, e.message))
                .collect();
            if problems.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "the imported definition does not validate: {}",
                    problems.join("; ")
                ))
            }
        }
    }
}
