//! How a credential is attached to the upstream request, per connector.
//!
//! | auth_type | default                                                               |
//! |-----------|-----------------------------------------------------------------------|
//! | `none`    | nothing; no credential is looked up                                   |
//! | `api_key` | `inject.header` *or* `inject.query` (one is required), `format` default `{api_key}` |
//! | `bearer`  | `Authorization: Bearer {token}` (`header`/`format` overridable)        |
//! | `oauth2`  | `Authorization: Bearer {access_token}` (the token lifecycle is the OAuth issue's) |
//! | `basic`   | `Authorization: Basic base64({username}:{password})`                  |
//!
//! plus `inject.headers`, extra header templates filled from credential fields (the spec's
//! "internal parameters", e.g. `X-Organization-ID = "{org_id}"`). Templates are checked at load:
//! every `{field}` must be in `auth_schema.fields`. Injected headers replace anything the app
//! sent under the same name and are marked sensitive; an injected query parameter replaces any
//! the app sent under that name and lives only in the upstream request line, never in a log.
//! Header names go upstream spelled as configured (`X-Organization-ID`), the defaults as
//! `Authorization`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use smallvec::SmallVec;
use zeroize::Zeroizing;

use super::secret::{self, Secret, SecretFields};
use crate::label::Label;

/// How a connector authenticates to its upstream (`auth_type`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum AuthType {
    None,
    ApiKey,
    Basic,
    Bearer,
    #[strum(serialize = "oauth2")]
    OAuth2,
}

/// RFC 3986 unreserved characters stay as they are; everything else is percent-encoded.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(String),
}

/// `"Bearer {token}"`: literal text and `{field}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(text: &str, fields: &[String]) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{text:?}: unclosed '{{'"))?;
            let name = &rest[open + 1..open + close];
            if !fields.iter().any(|f| f == name) {
                return Err(format!(
                    "{text:?}: {{{name}}} is not a field of auth_schema.fields"
                ));
            }
            parts.push(Part::Field(name.to_string()));
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?}: unmatched '}}'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if text.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(format!("{text:?}: control characters are not allowed"));
        }
        Ok(Self { parts })
    }

    /// Fill the template. `Err(field)` names a field the credential lacks.
    pub fn render(&self, fields: &SecretFields) -> Result<Zeroizing<String>, String> {
        // Each piece found once, then the string sized before it is filled: a buffer that
        // grew would leave a copy of the secret behind, unwiped, in the block it moved out of.
        let pieces = self
            .parts
            .iter()
            .map(|part| match part {
                Part::Literal(l) => Ok(l.as_str()),
                Part::Field(name) => fields
                    .get(name)
                    .map(Secret::expose)
                    .ok_or_else(|| name.clone()),
            })
            .collect::<Result<SmallVec<[&str; 4]>, String>>()?;
        let mut out = Zeroizing::new(String::with_capacity(pieces.iter().map(|p| p.len()).sum()));
        for piece in pieces {
            out.push_str(piece);
        }
        Ok(out)
    }
}

/// A validated header name as it goes upstream: the operator's spelling, or `Authorization`.
/// pingora keeps a `Bytes` name as the header's case without a copy, where a `HeaderName`
/// outside its short list of titled names (`authorization` is not on it) is copied into a new
/// buffer on every insert.
pub type WireName = Bytes;

const AUTHORIZATION: WireName = Bytes::from_static(b"Authorization");

/// Where the primary credential goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    Header(WireName),
    Query(String),
}

/// A connector's validated injection rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Injection {
    primary: Option<(Placement, Template)>,
    basic: bool,
    headers: Vec<(WireName, Template)>,
}

/// What to add to one upstream request. Kept on the cached credential and read by every
/// request for it: the usual single header is held inline (no separate heap block to reach).
#[derive(Default)]
pub struct Injected {
    pub headers: SmallVec<[(WireName, HeaderValue); 1]>,
    pub query: Option<(String, Zeroizing<String>)>,
}

impl std::fmt::Debug for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injected")
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("query", &self.query.as_ref().map(|(n, _)| n))
            .finish()
    }
}

/// The `[connector.inject]` table as written.
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct InjectFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
}

impl InjectFile {
    pub fn is_empty(&self) -> bool {
        self.header.is_none()
            && self.query.is_none()
            && self.format.is_none()
            && self.headers.is_empty()
    }
}

impl Injection {
    /// Validate a connector's injection rules against its auth type and fields.
    pub fn build(
        auth_type: AuthType,
        file: &InjectFile,
        fields: &[String],
    ) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let header_name =
            |name: &str, errors: &mut Vec<String>| match HeaderName::from_bytes(name.as_bytes()) {
                Ok(_) => Some(WireName::copy_from_slice(name.as_bytes())),
                Err(_) => {
                    errors.push(format!("{name:?} is not a header name"));
                    None
                }
            };
        let template = |text: &str, errors: &mut Vec<String>| match Template::parse(text, fields) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(e);
                None
            }
        };
        let mut primary = None;
        let mut basic = false;
        match auth_type {
            AuthType::None
                if file.header.is_some()
                    || file.query.is_some()
                    || file.format.is_some()
                    || !file.headers.is_empty() =>
            {
                errors.push("auth_type \"none\" injects nothing: remove [inject]".into());
            }
            AuthType::Basic => {
                if file.header.is_some() || file.query.is_some() || file.format.is_some() {
                    errors.push("auth_type \"basic\" always sends Authorization: Basic; only inject.headers may be set".into());
                }
                for f in ["username", "password"] {
                    if !fields.iter().any(|x| x == f) {
                        errors.push(format!(
                            "auth_type \"basic\" needs a {f:?} field in auth_schema.fields"
                        ));
                    }
                }
                basic = true;
            }
            AuthType::ApiKey | AuthType::Bearer | AuthType::OAuth2 => {
                let (default_header, default_format) = match auth_type {
                    AuthType::ApiKey => (None, "{api_key}"),
                    AuthType::Bearer => (Some(AUTHORIZATION), "Bearer {token}"),
                    _ => (Some(AUTHORIZATION), "Bearer {access_token}"),
                };
                let placement = match (&file.header, &file.query) {
                    (Some(_), Some(_)) => {
                        errors.push("set inject.header or inject.query, not both".into());
                        None
                    }
                    (Some(h), None) => header_name(h, &mut errors).map(Placement::Header),
                    (None, Some(q)) if auth_type == AuthType::ApiKey => {
                        if q.is_empty()
                            || q.bytes()
                                .any(|b| !(b.is_ascii_alphanumeric() || b"-._~".contains(&b)))
                        {
                            errors
                                .push(format!("inject.query {q:?} must be a plain parameter name"));
                            None
                        } else {
                            Some(Placement::Query(q.clone()))
                        }
                    }
                    (None, Some(_)) => {
                        errors.push(format!(
                            "auth_type {:?} sends a header; inject.query is only for api_key",
                            auth_type.as_label()
                        ));
                        None
                    }
                    (None, None) => match default_header {
                        Some(h) => Some(Placement::Header(h)),
                        None => {
                            errors.push(
                                "auth_type \"api_key\" needs inject.header or inject.query".into(),
                            );
                            None
                        }
                    },
                };
                let format = file.format.as_deref().unwrap_or(default_format);
                if let (Some(p), Some(t)) = (placement, template(format, &mut errors)) {
                    primary = Some((p, t));
                }
            }
            AuthType::None => {}
        }
        let mut headers = Vec::new();
        for (name, text) in &file.headers {
            if let (Some(h), Some(t)) =
                (header_name(name, &mut errors), template(text, &mut errors))
            {
                headers.push((h, t));
            }
        }
        if errors.is_empty() {
            Ok(Self {
                primary,
                basic,
                headers,
            })
        } else {
            Err(errors)
        }
    }

    /// Whether this connector needs a credential at all.
    pub fn needs_credential(&self) -> bool {
        self.primary.is_some() || self.basic || !self.headers.is_empty()
    }

    /// Render everything for one request. `Err` names what is missing or unusable (a field
    /// name, never a value).
    pub fn render(&self, fields: &SecretFields) -> Result<Injected, String> {
        let mut out = Injected::default();
        let missing = |f: String| format!("the credential has no field {f:?}");
        if self.basic {
            let user = fields
                .get("username")
                .ok_or_else(|| missing("username".into()))?;
            let pass = fields
                .get("password")
                .ok_or_else(|| missing("password".into()))?;
            let pair = Zeroizing::new(format!("{}:{}", user.expose(), pass.expose()));
            let value = Zeroizing::new(format!("Basic {}", STANDARD.encode(pair.as_bytes())));
            out.headers
                .push((AUTHORIZATION, secret::header_value(&value)?));
        }
        if let Some((placement, template)) = &self.primary {
            let value = template.render(fields).map_err(missing)?;
            match placement {
                Placement::Header(h) => {
                    out.headers.push((h.clone(), secret::header_value(&value)?))
                }
                Placement::Query(q) => out.query = Some((q.clone(), value)),
            }
        }
        for (h, template) in &self.headers {
            let value = template.render(fields).map_err(missing)?;
            out.headers.push((h.clone(), secret::header_value(&value)?));
        }
        Ok(out)
    }
}

/// `origin_form` with every `name=…` parameter the app sent removed and `name=value` appended.
pub fn with_query_param(origin_form: &str, name: &str, value: &str) -> Zeroizing<String> {
    let (path, query) = origin_form.split_once('?').unwrap_or((origin_form, ""));
    let mut out = Zeroizing::new(String::with_capacity(
        origin_form.len() + name.len() + value.len() * 3 + 2,
    ));
    out.push_str(path);
    let mut sep = '?';
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if percent_decode_str(key).decode_utf8_lossy() == name {
            continue;
        }
        out.push(sep);
        out.push_str(pair);
        sep = '&';
    }
    out.push(sep);
    out.push_str(name);
    out.push('=');
    out.extend(utf8_percent_encode(value, QUERY_VALUE));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> SecretFields {
        let mut f = SecretFields::new();
        for (k, v) in pairs {
            f.insert(*k, Secret::new(*v));
        }
        f
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn file(
        header: Option<&str>,
        query: Option<&str>,
        format: Option<&str>,
        headers: &[(&str, &str)],
    ) -> InjectFile {
        InjectFile {
            header: header.map(Into::into),
            query: query.map(Into::into),
            format: format.map(Into::into),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn bearer_defaults_and_extra_headers() {
        let inj = Injection::build(
            AuthType::Bearer,
            &file(None, None, None, &[("X-Organization-ID", "{org_id}")]),
            &names(&["token", "org_id"]),
        )
        .unwrap();
        let out = inj
            .render(&fields(&[("token", "t0k"), ("org_id", "42")]))
            .unwrap();
        assert_eq!(out.headers[0].0, "Authorization");
        assert_eq!(out.headers[0].1, "Bearer t0k");
        assert!(out.headers[0].1.is_sensitive());
        assert_eq!(out.headers[1].0, "X-Organization-ID");
        assert_eq!(out.headers[1].1, "42");
    }

    #[test]
    fn rendered_values_are_shared_not_copied_at_any_length() {
        let inj = Injection::build(
            AuthType::Bearer,
            &file(None, None, None, &[]),
            &names(&["token"]),
        )
        .unwrap();
        // Inline, at the inline limit, and past it (a long JWT).
        for len in [3, secret::INLINE_HEADER_VALUE - "Bearer ".len(), 2000] {
            let token = "t".repeat(len);
            let out = inj.render(&fields(&[("token", &token)])).unwrap();
            let value = &out.headers[0].1;
            assert_eq!(value.as_bytes(), format!("Bearer {token}").as_bytes());
            assert!(value.is_sensitive());
            // What each request inserts is a reference to the same bytes.
            let per_request = value.clone();
            assert_eq!(per_request.as_bytes().as_ptr(), value.as_bytes().as_ptr());
        }
        // A value a header cannot carry is still refused, inline or not.
        for bad in ["a\nb".to_string(), format!("{}\n", "t".repeat(2000))] {
            assert!(inj.render(&fields(&[("token", &bad)])).is_err());
        }
    }

    #[test]
    fn a_credential_renders_once_per_set_of_rules() {
        use crate::credential::{Connected, Rendering};
        use std::sync::Arc;
        let build = || {
            Arc::new(
                Injection::build(AuthType::Bearer, &InjectFile::default(), &names(&["token"]))
                    .unwrap(),
            )
        };
        let rules = build();
        let c = Connected::new(fields(&[("token", "t0k")]), 1, None);
        assert!(c.kept().is_none());
        assert!(matches!(c.render(&rules), Ok(Rendering::Kept)));
        let kept = c.kept().unwrap() as *const Injected;
        assert_eq!(c.kept().unwrap().headers[0].1, "Bearer t0k");
        // The next request under the same rules reads the same rendering.
        assert!(matches!(c.render(&rules), Ok(Rendering::Kept)));
        assert!(std::ptr::eq(kept, c.kept().unwrap()));
        // A reload's rules are new rules, even when they read the same: rendered for the
        // request, and the kept rendering stays as it was.
        let Ok(Rendering::Owned(again)) = c.render(&build()) else {
            panic!("rendered per request under new rules")
        };
        assert_eq!(again.headers[0].1, "Bearer t0k");
        assert!(std::ptr::eq(kept, c.kept().unwrap()));
        // A credential missing the field fails every time; nothing is kept.
        let c = Connected::new(fields(&[("other", "x")]), 1, None);
        assert!(c.render(&rules).is_err());
        assert!(c.kept().is_none());
        // Debug never shows what was rendered.
        let c = Connected::new(fields(&[("token", "canary-9f2")]), 1, None);
        c.render(&rules).unwrap();
        assert!(!format!("{c:?}").contains("canary-9f2"));
    }

    #[test]
    fn basic_and_api_key_placements() {
        let basic = Injection::build(
            AuthType::Basic,
            &InjectFile::default(),
            &names(&["username", "password"]),
        )
        .unwrap();
        let out = basic
            .render(&fields(&[("username", "u"), ("password", "p:w")]))
            .unwrap();
        assert_eq!(
            out.headers[0].1,
            format!("Basic {}", STANDARD.encode("u:p:w"))
        );

        let q = Injection::build(
            AuthType::ApiKey,
            &file(None, Some("api_key"), None, &[]),
            &names(&["api_key"]),
        )
        .unwrap();
        let out = q.render(&fields(&[("api_key", "a b&c")])).unwrap();
        let (name, value) = out.query.unwrap();
        assert_eq!((name.as_str(), value.as_str()), ("api_key", "a b&c"));

        let h = Injection::build(
            AuthType::ApiKey,
            &file(Some("X-API-Key"), None, Some("Key {api_key}"), &[]),
            &names(&["api_key"]),
        )
        .unwrap();
        assert_eq!(
            h.render(&fields(&[("api_key", "k")])).unwrap().headers[0].1,
            "Key k"
        );
    }

    #[test]
    fn config_errors() {
        let f = names(&["api_key"]);
        assert!(
            Injection::build(AuthType::ApiKey, &InjectFile::default(), &f).is_err(),
            "needs a placement"
        );
        assert!(
            Injection::build(
                AuthType::ApiKey,
                &file(Some("X-K"), Some("k"), None, &[]),
                &f
            )
            .is_err()
        );
        assert!(
            Injection::build(
                AuthType::ApiKey,
                &file(Some("X-K"), None, Some("{nope}"), &[]),
                &f
            )
            .is_err()
        );
        assert!(
            Injection::build(
                AuthType::ApiKey,
                &file(Some("bad header"), None, None, &[]),
                &f
            )
            .is_err()
        );
        assert!(
            Injection::build(AuthType::Bearer, &InjectFile::default(), &f).is_err(),
            "no token field"
        );
        assert!(
            Injection::build(
                AuthType::Bearer,
                &file(None, Some("k"), None, &[]),
                &names(&["token"])
            )
            .is_err()
        );
        assert!(Injection::build(AuthType::Basic, &InjectFile::default(), &f).is_err());
        assert!(
            Injection::build(
                AuthType::None,
                &file(None, None, None, &[("X-A", "{api_key}")]),
                &f
            )
            .is_err()
        );
        assert!(
            !Injection::build(AuthType::None, &InjectFile::default(), &[])
                .unwrap()
                .needs_credential()
        );
    }

    #[test]
    fn missing_field_is_named_not_valued() {
        let inj =
            Injection::build(AuthType::Bearer, &InjectFile::default(), &names(&["token"])).unwrap();
        let err = inj
            .render(&fields(&[("other", "secret-value")]))
            .unwrap_err();
        assert!(err.contains("token") && !err.contains("secret-value"));
    }

    #[test]
    fn query_param_replaces_the_apps() {
        assert_eq!(
            &*with_query_param("/v1/x", "api_key", "k"),
            "/v1/x?api_key=k"
        );
        assert_eq!(
            &*with_query_param(
                "/v1/x?a=1&api_key=evil&b=2&api%5Fkey=evil2",
                "api_key",
                "k/+"
            ),
            "/v1/x?a=1&b=2&api_key=k%2F%2B"
        );
    }
}
