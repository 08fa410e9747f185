//! `[[connector]]` validation: identity, auth type and credential form, allowed domains and
//! ports, actions, injection, OAuth, pacing, retries and the circuit breaker. Each connector's
//! problems are keyed `connector[<id>].<key>` (or `connector[<index>]` when the id is bad).

use std::collections::HashSet;

use crate::fastmap::FastMap as HashMap;
use std::path::Path;
use std::sync::Arc;

use super::file::{ActionFile, AuthFieldFile, ConnectorFile};
use super::validate::{Errors, domain_list};
use super::{Action, AuthField, BodyField, Connector};
use crate::action::UrlTemplate;
use crate::credential::inject::{AuthType, Injection};
use crate::credential::oauth::{ACCESS_TOKEN, OAuth2};
use crate::names::{is_identifier, parse_host};
use crate::policy::domain::DomainList;
use crate::ratelimit::RateLimit;
use crate::ratelimit::breaker::BreakerPolicy;
use crate::ratelimit::retry::RetryPolicy;
use crate::upstream::ConnectorTls;

/// Every connector in the file (and the store), by id.
pub(super) fn connectors(
    errors: &mut Errors,
    raw: Vec<ConnectorFile>,
    base: &Path,
    global_extra_ca: Option<&Path>,
) -> HashMap<String, Arc<Connector>> {
    let mut connectors = HashMap::default();
    for (i, c) in raw.into_iter().enumerate() {
        let key = if is_identifier(c.connector_id.as_bytes()) {
            format!("connector[{}]", c.connector_id)
        } else {
            errors.push(
                format!("connector[{i}].connector_id"),
                format!(
                    "{:?} is not an identifier (letters, digits, '_', '-', '.')",
                    c.connector_id
                ),
            );
            format!("connector[{i}]")
        };
        let id = c.connector_id.clone();
        if connectors
            .insert(
                id,
                Arc::new(connector(errors, &key, c, base, global_extra_ca)),
            )
            .is_some()
        {
            errors.push(format!("{key}.connector_id"), "duplicate connector_id");
        }
    }
    connectors
}

fn connector(
    errors: &mut Errors,
    key: &str,
    c: ConnectorFile,
    base: &Path,
    global_extra_ca: Option<&Path>,
) -> Connector {
    if c.display_name.trim().is_empty() {
        errors.push(format!("{key}.display_name"), "must not be empty");
    }
    let auth_type = c.auth_type.get().map_err(|e| {
        errors.push(format!("{key}.auth_type"), e);
    });
    let auth_fields = auth_fields(errors, key, c.auth_schema.fields);
    let allowed_domains = domain_list(
        errors,
        &format!("{key}.allowed_domains"),
        &c.allowed_domains,
    );
    let allowed_ports = c.allowed_ports.unwrap_or_else(|| vec![443]);
    if allowed_ports.is_empty() {
        errors.push(
            format!("{key}.allowed_ports"),
            "must list at least one port",
        );
    }
    if allowed_ports.contains(&0) {
        errors.push(format!("{key}.allowed_ports"), "0 is not a port");
    }
    let actions = actions(errors, key, c.actions, &allowed_domains);
    // An unknown auth type was reported above; its injection cannot be checked against it.
    let injection = match auth_type {
        Ok(auth_type) => {
            // OAuth credentials hold the fields sluice manages, not a form the workspace
            // fills in.
            let field_list: Vec<String> = if auth_type == AuthType::OAuth2 {
                vec![ACCESS_TOKEN.to_string()]
            } else {
                auth_fields.iter().map(|f| f.name.clone()).collect()
            };
            Injection::build(auth_type, &c.inject, &field_list).unwrap_or_else(|errs| {
                for e in errs {
                    errors.push(format!("{key}.inject"), e);
                }
                Injection::default()
            })
        }
        Err(()) => Injection::default(),
    };
    let oauth2 = match (&c.oauth2, auth_type) {
        (Some(o), Ok(AuthType::OAuth2)) => {
            match OAuth2::build(o, &allowed_domains, &allowed_ports, base) {
                Ok(o) => Some(Arc::new(o)),
                Err(errs) => {
                    push_all(errors, &format!("{key}.oauth2"), errs);
                    None
                }
            }
        }
        (None, Ok(AuthType::OAuth2)) => {
            errors.push(
                format!("{key}.oauth2"),
                "auth_type oauth2 needs an [connector.oauth2] section",
            );
            None
        }
        (Some(_), _) => {
            errors.push(format!("{key}.oauth2"), "only for auth_type = \"oauth2\"");
            None
        }
        (None, _) => None,
    };
    Connector {
        metrics: Default::default(),
        tls: section(errors, &format!("{key}.tls"), c.tls.as_ref(), |t| {
            ConnectorTls::build(t, base, global_extra_ca)
        }),
        breaker: section(
            errors,
            &format!("{key}.circuit_breaker"),
            c.circuit_breaker.as_ref(),
            BreakerPolicy::build,
        ),
        retry: section(
            errors,
            &format!("{key}.retry"),
            c.retry.as_ref(),
            RetryPolicy::build,
        ),
        rate_limit: section(
            errors,
            &format!("{key}.rate_limit"),
            c.rate_limit.as_ref(),
            RateLimit::build,
        ),
        oauth2,
        injection: Arc::new(injection),
        id: c.connector_id,
        display_name: c.display_name,
        auth_type: auth_type.unwrap_or(AuthType::None),
        auth_fields,
        actions,
        allowed_domains,
        allowed_ports,
        enabled: c.enabled,
    }
}

/// An optional sub-section built by its own module, which names its keys relative to it.
fn section<F, T: Default>(
    errors: &mut Errors,
    key: &str,
    file: Option<&F>,
    build: impl Fn(&F) -> Result<T, Vec<(String, String)>>,
) -> T {
    match file.map(build) {
        None => T::default(),
        Some(Ok(built)) => built,
        Some(Err(errs)) => {
            push_all(errors, key, errs);
            T::default()
        }
    }
}

fn push_all(errors: &mut Errors, key: &str, errs: Vec<(String, String)>) {
    for (k, e) in errs {
        errors.push(format!("{key}.{k}"), e);
    }
}

/// `auth_schema.fields`: the credential form; names are identifiers, each once.
fn auth_fields(errors: &mut Errors, key: &str, raw: Vec<AuthFieldFile>) -> Vec<AuthField> {
    let mut names = HashSet::new();
    let mut fields = Vec::new();
    for (j, f) in raw.into_iter().enumerate() {
        let fkey = format!("{key}.auth_schema.fields[{j}]");
        if !is_identifier(f.name.as_bytes()) {
            errors.push(
                format!("{fkey}.name"),
                format!("{:?} is not an identifier", f.name),
            );
        } else if !names.insert(f.name.clone()) {
            errors.push(
                format!("{fkey}.name"),
                format!("duplicate field {:?}", f.name),
            );
        }
        let field_type = f.field_type.get().unwrap_or_else(|e| {
            errors.push(format!("{fkey}.type"), e);
            super::FieldType::Text
        });
        fields.push(AuthField {
            name: f.name,
            label: f.label,
            field_type,
            required: f.required,
        });
    }
    fields
}

/// `actions[]`: ids unique, methods upper-case, URL templates HTTPS and inside the
/// connector's own domains.
fn actions(
    errors: &mut Errors,
    key: &str,
    raw: Vec<ActionFile>,
    allowed_domains: &DomainList,
) -> Vec<Action> {
    let mut ids = HashSet::new();
    let mut actions = Vec::new();
    for (j, a) in raw.into_iter().enumerate() {
        let akey = format!("{key}.actions[{j}]");
        if !is_identifier(a.action_id.as_bytes()) {
            errors.push(
                format!("{akey}.action_id"),
                format!("{:?} is not an identifier", a.action_id),
            );
        } else if !ids.insert(a.action_id.clone()) {
            errors.push(
                format!("{akey}.action_id"),
                format!("duplicate action {:?}", a.action_id),
            );
        }
        let method = match http::Method::from_bytes(a.http_method.as_bytes()) {
            Ok(m) if a.http_method.bytes().all(|b| b.is_ascii_uppercase()) => m,
            _ => {
                errors.push(
                    format!("{akey}.http_method"),
                    format!("{:?} is not an upper-case HTTP method", a.http_method),
                );
                http::Method::GET
            }
        };
        let url_template = match UrlTemplate::parse(&a.url_template) {
            Ok(t) => {
                check_literal_host(errors, &format!("{akey}.url_template"), &t, allowed_domains);
                t
            }
            Err(e) => {
                errors.push(format!("{akey}.url_template"), e);
                continue;
            }
        };
        actions.push(Action {
            action_id: a.action_id,
            http_method: method,
            url_template,
            body_schema: a
                .body_schema
                .into_iter()
                .map(|b| BodyField {
                    name: b.name,
                    label: b.label,
                    required: b.required,
                })
                .collect(),
        });
    }
    actions
}

/// When an action's host is literal (no `{placeholder}`), it must be one the connector allows:
/// a definition that contradicts itself is caught at load. A filled-in host is vetted per call.
fn check_literal_host(errors: &mut Errors, key: &str, url: &UrlTemplate, allowed: &DomainList) {
    let Some(authority) = url.literal_authority() else {
        return;
    };
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    match parse_host(host) {
        Ok(h) if allowed.matching(&h).is_some() => {}
        Ok(h) => errors.push(
            key,
            format!("host {h} is not in the connector's allowed_domains"),
        ),
        Err(e) => errors.push(key, e),
    }
}
