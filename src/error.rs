//! The error model: every refusal sluice makes has one [`ErrorCode`], and this file is the one
//! place that maps a code to an HTTP status and renders the JSON body.
//!
//! Codes are stable API: apps branch on them and operators alert on them. They double as log and
//! metric labels, so they are `&'static str` and carry no request data. The human message may
//! name the host or connector, never a credential.

use std::fmt;

use bytes::Bytes;
use http::StatusCode;

/// Header naming the error code on every response sluice itself makes. It is stripped from
/// upstream responses so a client can trust it came from sluice.
pub const ERROR_HEADER: &str = "x-sluice-error";

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident => ($code:literal, $status:literal), )*) => {
        /// Why sluice refused or failed a request. One variant per stable code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in declaration order (the README's table follows it).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The stable wire name of this code.
            pub const fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The HTTP status sluice answers with.
            pub fn status(self) -> StatusCode {
                let code: u16 = match self { $(ErrorCode::$variant => $status,)* };
                StatusCode::from_u16(code).expect("status codes in the table are valid")
            }
        }
    };
}

error_codes! {
    /// The request is not well-formed HTTP/1.1 for a proxy (framing, header values).
    MalformedRequest => ("malformed_request", 400),
    /// `Content-Length` and `Transfer-Encoding` disagree or both appear, or
    /// `Transfer-Encoding` is anything but a single `chunked` (RFC 9112 §6.1).
    AmbiguousFraming => ("ambiguous_framing", 400),
    /// More header fields, or a larger request head, than `listener.max_header_count` /
    /// `listener.max_header_bytes` allow.
    HeadersTooLarge => ("request_headers_too_large", 431),
    /// The client stopped sending its request body before the read timeout.
    RequestTimeout => ("request_timeout", 408),
    /// The client closed the connection before the exchange ended. Nothing can be sent: this
    /// code only appears in logs and metrics (nginx's 499).
    ClientClosed => ("client_closed", 499),
    /// `X-Connector` missing.
    MissingConnector => ("missing_connector", 400),
    /// `X-Workspace` missing.
    MissingWorkspace => ("missing_workspace", 400),
    /// `X-Connector` or `X-Workspace` repeated, comma-joined or not an identifier.
    InvalidRoutingHeader => ("invalid_routing_header", 400),
    /// Request target or `Host` cannot be parsed strictly (bad host, port, numeric form).
    InvalidTarget => ("invalid_target", 400),
    /// Absolute-form target with a scheme other than `http`.
    UnsupportedScheme => ("unsupported_scheme", 400),
    /// Two `Host` headers, or `Host` disagrees with the absolute-form authority.
    HostMismatch => ("host_mismatch", 400),
    /// `CONNECT` to port 443 (TLS inside: interception is not built yet), or a CONNECT inside
    /// a tunnel.
    ConnectNotSupported => ("connect_not_supported", 405),
    /// A CONNECT without `X-Connector` whose host several connectors allow.
    ConnectorAmbiguous => ("connector_ambiguous", 403),
    /// A request inside a CONNECT tunnel names another host or port than the CONNECT did.
    TunnelHostMismatch => ("tunnel_host_mismatch", 403),
    /// No or wrong `Proxy-Authorization`.
    ProxyAuthRequired => ("proxy_auth_required", 407),
    /// `X-Connector` (or an action call's path) names no configured connector.
    UnknownConnector => ("unknown_connector", 403),
    /// An action call (`POST /v1/actions/{connector}/{action_id}`) names an action the
    /// connector does not define.
    UnknownAction => ("unknown_action", 404),
    /// An action call with another method than `POST`.
    ActionMethodNotAllowed => ("method_not_allowed", 405),
    /// An action call's inputs: not a JSON object, a required input missing, an unknown
    /// input, or a value that cannot fill its place in the URL.
    ActionInputInvalid => ("action_input_invalid", 400),
    /// An action call's body is larger than its limit (64 KiB).
    RequestBodyTooLarge => ("request_body_too_large", 413),
    /// The connector exists but the platform switched it off.
    ConnectorDisabled => ("connector_disabled", 403),
    /// `X-Workspace` names no configured workspace.
    UnknownWorkspace => ("unknown_workspace", 403),
    /// The authenticated caller may not act for this workspace.
    WorkspaceNotPermitted => ("workspace_not_permitted", 403),
    /// The upstream port is not among the connector's allowed ports.
    PortNotAllowed => ("port_not_allowed", 403),
    /// The host does not match the connector's `allowed_domains`.
    DomainNotAllowed => ("domain_not_allowed", 403),
    /// The host does not match the workspace's org allowlist.
    OrgDomainNotAllowed => ("org_domain_not_allowed", 403),
    /// Skipped: the workspace has no credential stored for this connector.
    CredentialNotConfigured => ("credential_not_configured", 403),
    /// Skipped: the workspace opted out of this connector (`enabled: false`).
    WorkspaceOptedOut => ("workspace_opted_out", 403),
    /// The stored credential lacks a field the connector injects.
    CredentialIncomplete => ("credential_incomplete", 403),
    /// The provider refused the refresh token (`invalid_grant`): the workspace must connect
    /// again. No refresh is attempted until it does.
    OAuthReauthorizationRequired => ("oauth_reauthorization_required", 403),
    /// A resolved address (or IP literal) is in a special-purpose block.
    AddressNotAllowed => ("address_not_allowed", 403),
    /// The destination is sluice's own listener.
    SelfConnection => ("self_connection", 403),
    /// The name did not resolve (NXDOMAIN, no A/AAAA, resolver error).
    DnsFailure => ("dns_failure", 502),
    /// The resolver did not answer in time.
    DnsTimeout => ("dns_timeout", 502),
    /// TCP connect to the vetted address failed.
    UpstreamConnectFailed => ("upstream_connect_failed", 502),
    /// TLS handshake or certificate verification with the upstream failed.
    UpstreamTlsFailed => ("upstream_tls_failed", 502),
    /// The upstream broke the HTTP exchange.
    UpstreamProtocolError => ("upstream_protocol_error", 502),
    /// The API's rate limit: the wait would exceed the connector's maximum, or its queue is
    /// full. `Retry-After` says when to try again.
    RateLimited => ("rate_limited", 429),
    /// The credential store cannot be reached and nothing usable is cached.
    CredentialStoreUnavailable => ("credential_store_unavailable", 503),
    /// The access token expired (or was rejected) and a new one could not be had now.
    OAuthRefreshFailed => ("oauth_refresh_failed", 503),
    /// The upstream host is failing: its circuit breaker is open (with `Retry-After`).
    CircuitOpen => ("circuit_open", 503),
    /// The stored credential does not open (missing master key, tampered or copied record).
    CredentialUnreadable => ("credential_unreadable", 500),
    /// The upstream did not answer in time.
    UpstreamTimeout => ("upstream_timeout", 504),
    /// A bug in sluice; the message says no more than that.
    Internal => ("internal_error", 500),
}

impl ErrorCode {
    /// The spec's "silently skipped" outcomes: nothing was wrong, the tenant or platform chose
    /// not to call. Counted and logged as skipped, not as failures.
    pub fn is_skip(self) -> bool {
        matches!(
            self,
            ErrorCode::ConnectorDisabled
                | ErrorCode::WorkspaceOptedOut
                | ErrorCode::CredentialNotConfigured
        )
    }

    /// Seconds for `Retry-After`, where waiting can help.
    pub fn retry_after(self) -> Option<u32> {
        match self {
            ErrorCode::CredentialStoreUnavailable => Some(1),
            ErrorCode::OAuthRefreshFailed => Some(5),
            _ => None,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: its code plus a message for humans. The message must never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// `Retry-After` seconds, when this refusal knows better than its code's default.
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        // Whole seconds, rounded up, at least 1.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The JSON body `{"error":{"code","message","request_id"}}`.
    pub fn body(&self, request_id: &str) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "code": self.code.as_str(),
                "message": self.message,
                "request_id": request_id,
            }
        });
        Bytes::from(body.to_string())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate code {code}");
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code} is not snake_case"
            );
        }
    }

    #[test]
    fn readme_table_lists_every_code_with_its_status() {
        let readme = include_str!("../README.md");
        for code in ErrorCode::ALL {
            let row = format!("| {} | `{}` |", code.status().as_u16(), code.as_str());
            assert!(readme.contains(&row), "README error table lacks {row}");
        }
    }

    #[test]
    fn body_is_the_documented_shape() {
        let r = Refusal::new(ErrorCode::DomainNotAllowed, "host \"x\" not allowed");
        let v: serde_json::Value = serde_json::from_slice(&r.body("req-1")).unwrap();
        assert_eq!(v["error"]["code"], "domain_not_allowed");
        assert_eq!(v["error"]["message"], "host \"x\" not allowed");
        assert_eq!(v["error"]["request_id"], "req-1");
        assert_eq!(ErrorCode::DomainNotAllowed.status(), StatusCode::FORBIDDEN);
    }
}
