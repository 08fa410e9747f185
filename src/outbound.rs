//! sluice's own outbound HTTPS calls (OAuth token and revocation endpoints).
//!
//! They obey the same egress policy as app traffic: the caller vets the URL with
//! [`crate::policy::vet_destination`] and hands over the resulting [`Destination`]; this client
//! connects to that pinned address only, sends the host name as SNI and verifies the
//! certificate against it with the same trust as the proxy (system roots plus
//! `upstream.extra_ca_file`). Responses are bounded in time and size.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::policy::Destination;

/// Largest response body read from a token endpoint.
const MAX_RESPONSE: usize = 1024 * 1024;

/// Why an outbound call failed. Messages carry no request or response content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("connect to {0} failed")]
    Connect(String),
    #[error("TLS with {0} failed (certificate or handshake)")]
    Tls(String),
    #[error("{0} timed out")]
    Timeout(String),
    #[error("HTTP exchange with {0} failed")]
    Http(String),
}

/// The TLS trust for outbound calls, built once.
#[derive(Clone)]
pub struct OutboundTls {
    connector: TlsConnector,
}

impl OutboundTls {
    pub fn new(extra_ca_file: Option<&Path>) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs()
            .map_err(|e| format!("cannot load the system's CA certificates: {e}"))?;
        roots.add_parsable_certificates(
            native.into_iter().map(|c| CertificateDer::from(c.to_vec())),
        );
        if let Some(path) = extra_ca_file {
            for der in crate::files::read_ca_file(path)? {
                roots
                    .add(CertificateDer::from(der))
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        let config = ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// A connector's own trust and client certificate (`[connector.tls]`), for its token and
    /// revocation calls: `roots` (DER) replace the shared ones, `client` is a certificate
    /// chain and its key, `tls13_only` holds the call to TLS 1.3.
    pub fn for_connector(
        roots: &[Vec<u8>],
        client: Option<(&[Vec<u8>], &[u8])>,
        tls13_only: bool,
    ) -> Result<Self, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut store = RootCertStore::empty();
        store.add_parsable_certificates(roots.iter().map(|d| CertificateDer::from(d.clone())));
        let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
            &[&rustls::version::TLS13]
        } else {
            rustls::DEFAULT_VERSIONS
        };
        let builder =
            ClientConfig::builder_with_protocol_versions(versions).with_root_certificates(store);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => {
                let chain = chain
                    .iter()
                    .map(|c| CertificateDer::from(c.clone()))
                    .collect();
                let key = rustls::pki_types::PrivateKeyDer::try_from(key.to_vec())
                    .map_err(|e| format!("client key: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate: {e}"))?
            }
        };
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// POST a form to `path` at the vetted destination. Returns status and body.
    pub async fn post_form(
        &self,
        dest: &Destination,
        path: &str,
        form: &[(&str, &str)],
        basic_auth: Option<HeaderValue>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), OutboundError> {
        let host = dest.sni.clone();
        let body = {
            let mut form_body = form_urlencoded::Serializer::new(String::new());
            for (k, v) in form {
                form_body.append_pair(k, v);
            }
            zeroize::Zeroizing::new(form_body.finish())
        };
        let exchange = async {
            let tcp = TcpStream::connect(dest.addr)
                .await
                .map_err(|_| OutboundError::Connect(host.clone()))?;
            let name =
                ServerName::try_from(host.clone()).map_err(|_| OutboundError::Tls(host.clone()))?;
            let tls = self
                .connector
                .connect(name, tcp)
                .await
                .map_err(|_| OutboundError::Tls(host.clone()))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|_| OutboundError::Http(host.clone()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(path)
                .header(header::HOST, &dest.host_header)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(header::ACCEPT, "application/json")
                .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
                .map_err(|_| OutboundError::Http(host.clone()))?;
            if let Some(mut auth) = basic_auth {
                auth.set_sensitive(true);
                req.headers_mut().insert(header::AUTHORIZATION, auth);
            }
            let resp = sender
                .send_request(req)
                .await
                .map_err(|_| OutboundError::Http(host.clone()))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|_| OutboundError::Http(host.clone()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| OutboundError::Timeout(dest.sni.clone()))?
    }
}
