//! The security scheme of an OpenAPI document as sluice's auth: `auth_type`, the credential
//! form, the injection, or the OAuth settings.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{Ctx, METHODS};
use crate::config::file::AuthFieldFile;
use crate::credential::inject::{AuthType, InjectFile};

/// What a security scheme becomes: the auth type, the credential form, the injection, and
/// the OAuth settings.
pub(super) type Auth = (
    AuthType,
    Vec<AuthFieldFile>,
    InjectFile,
    Option<crate::credential::oauth::OAuth2File>,
);

impl Ctx<'_> {
    /// The first security scheme sluice can use, in the order the document names them: the
    /// top-level `security`, the operations' `security`, then every defined scheme.
    pub(super) fn security(&mut self, id: &str) -> Auth {
        let schemes = self
            .doc
            .pointer("/components/securitySchemes")
            .and_then(Value::as_object);
        let requirement_names = |list: Option<&Value>| -> Vec<String> {
            list.and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_object)
                .flat_map(|r| r.keys().cloned())
                .collect()
        };
        let mut candidates = requirement_names(self.doc.get("security"));
        for item in self
            .doc
            .get("paths")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            for method in METHODS {
                candidates.extend(requirement_names(
                    item.1.get(method).and_then(|op| op.get("security")),
                ));
            }
        }
        candidates.extend(schemes.into_iter().flat_map(|s| s.keys().cloned()));
        let mut seen = BTreeSet::new();
        for name in candidates {
            if !seen.insert(name.clone()) {
                continue;
            }
            let Some(scheme) = schemes.and_then(|s| s.get(&name)).map(|s| self.resolve(s)) else {
                self.notes
                    .push(format!("security scheme {name:?} is not defined; skipped"));
                continue;
            };
            if let Some(auth) = self.scheme_auth(id, &name, scheme) {
                return auth;
            }
        }
        self.notes
            .push("no usable security scheme: auth_type = \"none\"".into());
        (AuthType::None, Vec::new(), InjectFile::default(), None)
    }

    /// One security scheme as sluice's auth, or a note saying why it cannot be.
    fn scheme_auth(&mut self, id: &str, name: &str, scheme: &Value) -> Option<Auth> {
        let field = |name: &str, label: &str| AuthFieldFile {
            name: name.into(),
            label: label.into(),
            field_type: crate::config::FieldType::Password.into(),
            required: true,
        };
        let kind = scheme
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let location = scheme.get("in").and_then(Value::as_str).unwrap_or_default();
        let param = scheme
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let http = scheme
            .get("scheme")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let api_key = |inject: InjectFile| {
            (
                AuthType::ApiKey,
                vec![field("api_key", "API key")],
                InjectFile {
                    format: Some("{api_key}".into()),
                    ..inject
                },
                None,
            )
        };
        match (kind, location, http.as_str()) {
            ("apiKey", "header", _) if !param.is_empty() => Some(api_key(InjectFile {
                header: Some(param.into()),
                ..InjectFile::default()
            })),
            ("apiKey", "query", _) if !param.is_empty() => Some(api_key(InjectFile {
                query: Some(param.into()),
                ..InjectFile::default()
            })),
            ("http", _, "bearer") => Some((
                AuthType::Bearer,
                vec![field("token", "Bearer token")],
                InjectFile::default(),
                None,
            )),
            ("http", _, "basic") => Some((
                AuthType::Basic,
                vec![
                    AuthFieldFile {
                        field_type: crate::config::FieldType::Text.into(),
                        ..field("username", "Username")
                    },
                    field("password", "Password"),
                ],
                InjectFile::default(),
                None,
            )),
            ("oauth2", _, _) => self
                .oauth2(id, name, scheme)
                .map(|o| (AuthType::OAuth2, Vec::new(), InjectFile::default(), Some(o))),
            _ => {
                self.notes.push(format!(
                    "security scheme {name:?} ({kind} {location}{http}) has no sluice equivalent; skipped{}",
                    if kind == "mutualTLS" { " (a client certificate goes in [connector.tls])" } else { "" }
                ));
                None
            }
        }
    }

    /// An OAuth 2.0 scheme: client credentials if the document offers them, else the
    /// authorization code flow. The client's own settings are the operator's to fill in.
    fn oauth2(
        &mut self,
        id: &str,
        name: &str,
        scheme: &Value,
    ) -> Option<crate::credential::oauth::OAuth2File> {
        use crate::credential::oauth::Grant;
        let flows = scheme.get("flows")?;
        let (grant, flow) = if let Some(f) = flows.get("clientCredentials") {
            (Grant::ClientCredentials, f)
        } else if let Some(f) = flows.get("authorizationCode") {
            (Grant::AuthorizationCode, f)
        } else {
            self.notes.push(format!(
                "oauth2 scheme {name:?} has neither a clientCredentials nor an authorizationCode flow; skipped"
            ));
            return None;
        };
        let mut made_https = false;
        let mut url = |key: &str| {
            let u = flow.get(key).and_then(Value::as_str)?;
            Some(match u.strip_prefix("http://") {
                Some(rest) => {
                    made_https = true;
                    format!("https://{rest}")
                }
                None => u.to_owned(),
            })
        };
        let token_url = url("tokenUrl")?;
        let authorization_url = url("authorizationUrl");
        if made_https {
            self.notes.push(format!(
                "oauth2 scheme {name:?}: http:// endpoints made https://"
            ));
        }
        for u in [Some(&token_url), authorization_url.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Some(host) = u
                .strip_prefix("https://")
                .and_then(|r| r.split(['/', ':']).next())
            {
                self.domains.insert(host.to_ascii_lowercase());
            }
        }
        let env = format!(
            "SLUICE_{}_CLIENT_SECRET",
            id.to_ascii_uppercase().replace(['-', '.'], "_")
        );
        self.notes.push(format!(
            "oauth2: set client_id, and the client secret in ${env} (client_secret_env){}",
            if grant == Grant::AuthorizationCode {
                ", and redirect_uri"
            } else {
                ""
            }
        ));
        let scopes = flow
            .get("scopes")
            .and_then(Value::as_object)
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        let text = format!(
            "grant = {:?}\ntoken_url = {token_url:?}\nclient_id = \"REPLACE-client-id\"\nclient_secret_env = {env:?}\n",
            <&str>::from(grant)
        );
        let mut file: crate::credential::oauth::OAuth2File = toml::from_str(&text).ok()?;
        file.authorization_url = authorization_url;
        file.scopes = scopes;
        if grant == Grant::AuthorizationCode {
            file.redirect_uri = Some("https://sluice.example/oauth/callback".into());
        }
        Some(file)
    }
}
