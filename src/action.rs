//! Connector actions (seed 003's executor): `POST /v1/actions/{connector}/{action_id}` with a
//! JSON object of the action's inputs becomes one upstream request. The URL template's
//! `{placeholders}` are filled from the inputs of the same name, the remaining inputs are the
//! JSON body (or, for methods without a body, the query), and the result goes through the same
//! policy, credential, pacing and retries as any proxied request (`proxy::action`).
//!
//! This module is the pure half: the template, the input checks and the request they build.
//! Nothing here reads the network, the config or a credential.

use bytes::Bytes;
use http::Method;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::{Map, Value};

use crate::error::{ErrorCode, Refusal};
use crate::names::is_identifier;
use crate::request::{Target, parse_authority};

/// The path prefix of action calls on the proxy listener.
pub const PATH_PREFIX: &str = "/v1/actions/";

/// The largest request body an action call may send: the inputs are read whole before the
/// upstream call (the URL depends on them), and kept for a retry. pingora's retry buffer holds
/// this much.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;

/// Everything but RFC 3986's unreserved characters is percent-encoded in a path segment or a
/// query value: a value cannot add a `/`, `?`, `&`, `=` or `#` of its own.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One input of an action (the spec's `body_schema[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyField {
    pub name: String,
    pub label: String,
    /// A call without it is refused (400 `action_input_invalid`). Placeholders of the URL
    /// template are always required.
    pub required: bool,
}

/// Where in the URL a template part stands: each place has its own rules for a filled value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// `https://{tenant}.example.com`: one DNS label of letters, digits and `-`.
    Authority,
    /// A path segment: percent-encoded, never `.` or `..`.
    Path,
    /// A query value: percent-encoded.
    Query,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(String, Place),
}

/// A parsed `url_template`: `https://` + literal text and `{field}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    text: String,
    parts: Vec<Part>,
}

impl UrlTemplate {
    /// Parse a template; the error says what is wrong with it (config validation).
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix("https://") else {
            return Err(format!("{text:?} must start with https://"));
        };
        let mut parts = vec![Part::Literal("https://".to_owned())];
        let mut place = Place::Authority;
        let mut literal = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' => {
                    let close = rest[i..]
                        .find('}')
                        .ok_or_else(|| format!("{text:?} has a `{{` without its `}}`"))?;
                    let name = &rest[i + 1..i + close];
                    if !is_identifier(name.as_bytes()) || name.contains('{') {
                        return Err(format!(
                            "{text:?}: placeholder {{{name}}} is not an identifier"
                        ));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(name.to_owned(), place));
                    // Skip the name and the closing brace.
                    for _ in 0..close {
                        chars.next();
                    }
                }
                '}' => return Err(format!("{text:?} has a `}}` without its `{{`")),
                '#' => return Err(format!("{text:?} has a fragment")),
                c if c.is_whitespace() || c.is_control() => {
                    return Err(format!("{text:?} has white space or a control character"));
                }
                _ => {
                    if c == '/' && place == Place::Authority {
                        place = Place::Path;
                    } else if c == '?' && place != Place::Query {
                        place = Place::Query;
                    }
                    literal.push(c);
                }
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Self {
            text: text.to_owned(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal host, when the authority has no placeholder (checked against the
    /// connector's `allowed_domains` at load).
    pub fn literal_authority(&self) -> Option<&str> {
        let authority = self.text["https://".len()..]
            .split(['/', '?'])
            .next()
            .unwrap_or_default();
        (!authority.contains('{')).then_some(authority)
    }

    /// The placeholders' names, in order.
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(name, _) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }
}

/// An action org admins can pick (the spec's `actions[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub action_id: String,
    pub http_method: Method,
    pub url_template: UrlTemplate,
    pub body_schema: Vec<BodyField>,
}

/// The upstream request an action call becomes, before the policy vets its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub method: Method,
    pub target: Target,
    /// The JSON body (methods that carry one), or `None`.
    pub body: Option<Bytes>,
}

/// `/v1/actions/{connector}/{action_id}` → the two ids; `None` for any other path.
pub fn parse_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix(PATH_PREFIX)?;
    let (connector, action) = rest.split_once('/')?;
    Some((connector, action))
}

/// Whether the method's inputs go in the query rather than a body.
fn bodiless(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS
    )
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::ActionInputInvalid, message)
}

/// An input's name as it may appear in an error: names from the request are echoed only when
/// they look like schema names (a token pasted as a key must not come back).
fn shown(name: &str) -> &str {
    if is_identifier(name.as_bytes())
        && name.len() <= 64
        && !name.bytes().any(|b| b.is_ascii_digit())
    {
        name
    } else {
        "<name>"
    }
}

/// A scalar input as text; objects, arrays and null cannot fill a URL.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

impl Action {
    /// Build the upstream request from the call's body (a JSON object of inputs; an empty body
    /// is `{}`). Refusals say which input is wrong, never its value.
    pub fn build(&self, input: &[u8]) -> Result<Built, Refusal> {
        let mut inputs: Map<String, Value> = if input.iter().all(u8::is_ascii_whitespace) {
            Map::new()
        } else {
            crate::json::parse_json::<Value>(input)
                .map_err(|e| invalid(format!("the body must be a JSON object of inputs: {e}")))
                .and_then(|v| match v {
                    Value::Object(map) => Ok(map),
                    _ => Err(invalid("the body must be a JSON object of inputs")),
                })?
        };
        for name in inputs.keys() {
            let known = self.body_schema.iter().any(|f| &f.name == name)
                || self.url_template.placeholders().any(|p| p == name);
            if !known {
                return Err(invalid(format!(
                    "unknown input {:?} for action {:?}",
                    shown(name),
                    self.action_id
                )));
            }
        }
        for field in self.body_schema.iter().filter(|f| f.required) {
            if inputs.get(&field.name).is_none_or(Value::is_null) {
                return Err(invalid(format!(
                    "missing required input {:?} ({})",
                    field.name, field.label
                )));
            }
        }
        let url = self.fill(&mut inputs)?;
        let rest = &url["https://".len()..];
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let (host, url_port) = parse_authority(authority)?;
        let mut origin_form = match path.as_bytes().first() {
            None => "/".to_owned(),
            Some(b'?') => format!("/{path}"),
            Some(_) => path.to_owned(),
        };
        inputs.retain(|_, v| !v.is_null());
        let body = if bodiless(&self.http_method) {
            append_query(&mut origin_form, &inputs)?;
            None
        } else {
            Some(Bytes::from(Value::Object(inputs).to_string()))
        };
        Ok(Built {
            method: self.http_method.clone(),
            target: Target {
                host,
                // `Target`'s convention: no port means 443.
                url_port: url_port.filter(|&p| p != 443),
                origin_form,
            },
            body,
        })
    }

    /// The URL with every placeholder filled; the inputs used are taken out of `inputs`.
    fn fill(&self, inputs: &mut Map<String, Value>) -> Result<String, Refusal> {
        let mut url = String::with_capacity(self.url_template.text.len() + 32);
        let mut used = Vec::new();
        for part in &self.url_template.parts {
            let (name, place) = match part {
                Part::Literal(text) => {
                    url.push_str(text);
                    continue;
                }
                Part::Field(name, place) => (name, *place),
            };
            let value = inputs
                .get(name)
                .ok_or_else(|| invalid(format!("missing required input {name:?} (in the URL)")))?;
            let text = scalar(value).filter(|t| !t.is_empty()).ok_or_else(|| {
                invalid(format!(
                    "input {name:?} fills the URL: it must be a non-empty string, number or boolean"
                ))
            })?;
            match place {
                Place::Authority => {
                    if text.len() > 63
                        || !text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    {
                        return Err(invalid(format!(
                            "input {name:?} fills the host: it must be one DNS label (letters, digits, -)"
                        )));
                    }
                    url.push_str(&text);
                }
                Place::Path => {
                    if text == "." || text == ".." {
                        return Err(invalid(format!(
                            "input {name:?} fills a path segment: it cannot be . or .."
                        )));
                    }
                    url.extend(utf8_percent_encode(&text, COMPONENT));
                }
                Place::Query => url.extend(utf8_percent_encode(&text, COMPONENT)),
            }
            used.push(name.as_str());
        }
        for name in used {
            inputs.remove(name);
        }
        Ok(url)
    }
}

/// The remaining inputs of a bodiless method as query parameters (scalars only).
fn append_query(origin_form: &mut String, inputs: &Map<String, Value>) -> Result<(), Refusal> {
    for (name, value) in inputs {
        let text = scalar(value).ok_or_else(|| {
            invalid(format!(
                "input {:?} goes in the query: it must be a string, number or boolean",
                shown(name)
            ))
        })?;
        origin_form.push(if origin_form.contains('?') { '&' } else { '?' });
        origin_form.extend(utf8_percent_encode(name, COMPONENT));
        origin_form.push('=');
        origin_form.extend(utf8_percent_encode(&text, COMPONENT));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
