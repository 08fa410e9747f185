//! Step 7: the connection to the SaaS API.
//!
//! The peer is the *vetted* `SocketAddr` (never a name pingora would look up itself), TLS is
//! always on, SNI is the host name and the certificate is verified against it. pingora turns
//! verification off when SNI is empty, so a peer is only ever built from a [`Vetted`] whose
//! `sni` is a validated, non-empty DNS name.
//!
//! Trust: the system's roots, plus `upstream.extra_ca_file` when set (a private CA, or the test
//! CA). pingora's connector takes a single CA file that *replaces* the system roots, so when an
//! extra CA is configured sluice writes one bundle of both at startup, hands it to pingora, and
//! deletes it once the connector has read it. Changing the extra CA needs a restart.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use pingora::protocols::tls::CaType;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509, parse_x509};

use crate::files::read_ca_file;
use crate::policy::Vetted;

/// `[upstream]`: how sluice talks to SaaS APIs.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub extra_ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool_size: usize,
}

/// A CA bundle file that removes itself when dropped.
pub struct CaBundle {
    path: PathBuf,
}

impl CaBundle {
    /// System roots plus the extra CA, written to a private temporary file.
    pub fn build(extra_ca_file: &Path) -> Result<CaBundle, String> {
        let mut ders = read_ca_file(extra_ca_file)?;
        let native = rustls_native_certs::load_native_certs()
            .map_err(|e| format!("cannot load the system's CA certificates: {e}"))?;
        ders.extend(native.into_iter().map(|c| c.to_vec()));

        let mut pem = String::new();
        for der in &ders {
            pem.push_str("-----BEGIN CERTIFICATE-----\n");
            let b64 = STANDARD.encode(der);
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
        }
        let path = std::env::temp_dir().join(format!(
            "sluice-ca-{}-{:016x}.pem",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("cannot write CA bundle {}: {e}", path.display()))?;
        file.write_all(pem.as_bytes())
            .map_err(|e| format!("cannot write CA bundle {}: {e}", path.display()))?;
        Ok(CaBundle { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CaBundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pingora peer for a vetted destination, with the connector's own TLS.
pub fn peer(vetted: &Vetted, settings: &Upstream, tls: &ConnectorTls) -> HttpPeer {
    debug_assert!(
        !vetted.sni().is_empty(),
        "an empty SNI disables verification"
    );
    let mut peer = HttpPeer::new(vetted.addr, true, vetted.sni().to_owned());
    let o = &mut peer.options;
    o.verify_cert = true;
    o.verify_hostname = true;
    o.connection_timeout = Some(settings.connect_timeout);
    o.total_connection_timeout = Some(settings.connect_timeout + settings.tls_handshake_timeout);
    o.read_timeout = Some(settings.read_timeout);
    o.write_timeout = Some(settings.write_timeout);
    o.idle_timeout = Some(settings.idle_timeout);
    o.ca.clone_from(&tls.ca);
    peer.client_cert_key.clone_from(&tls.client_cert);
    peer.group_key = tls.group_key;
    peer
}

/// The lowest TLS version a connector accepts from its upstream.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
pub enum TlsVersion {
    #[default]
    #[strum(serialize = "1.2")]
    V1_2,
    #[strum(serialize = "1.3")]
    V1_3,
}

/// `[connector.tls]` as written: paths relative to the config file.
#[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorTlsFile {
    /// PEM certificate chain (leaf first) presented to the upstream (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file` (PKCS#8, SEC1 or PKCS#1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// CA certificates trusted for this connector's upstreams, on top of the system roots and
    /// `upstream.extra_ca_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_ca_file: Option<PathBuf>,
    /// "1.2" (default) or "1.3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<crate::label::Choice<TlsVersion>>,
}

/// A connector's own upstream TLS: built once per config load, shared by every peer and by
/// sluice's own calls for the connector (OAuth token and revocation).
#[derive(Clone, Default)]
pub struct ConnectorTls {
    pub client_cert: Option<Arc<CertKey>>,
    /// The whole trust list for this connector (system roots, the global extra CA and its
    /// own): pingora's per-peer CA replaces the connector-wide roots.
    pub ca: Option<Arc<CaType>>,
    pub min_version: TlsVersion,
    /// Pools connections per TLS profile: a connection verified with this connector's trust,
    /// or authenticated with its client certificate, is never reused by another profile.
    pub group_key: u64,
    /// The same trust, client certificate and minimum version for sluice's own calls for this
    /// connector (OAuth token and revocation endpoints); `None`: the shared client.
    pub outbound: Option<crate::outbound::OutboundTls>,
}

impl std::fmt::Debug for ConnectorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ConnectorTls")
            .field("client_cert", &self.client_cert.is_some())
            .field("outbound", &self.outbound.is_some())
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field("min_version", &self.min_version)
            .finish()
    }
}

impl ConnectorTls {
    /// Read and check the files; errors name the key (relative to `[connector.tls]`).
    pub fn build(
        file: &ConnectorTlsFile,
        base: &Path,
        global_extra_ca: Option<&Path>,
    ) -> Result<Self, Vec<(String, String)>> {
        use std::hash::{Hash, Hasher};
        let mut errors = Vec::new();
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let min_version = match &file.min_version {
            None => TlsVersion::default(),
            Some(choice) => choice.get().unwrap_or_else(|e| {
                errors.push(("min_version".to_owned(), e));
                TlsVersion::default()
            }),
        };
        let mut profile = std::collections::hash_map::DefaultHasher::new();
        min_version.hash(&mut profile);
        let client_cert = match (&file.client_cert_file, &file.client_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => match read_cert_key(&resolve(cert), &resolve(key)) {
                Ok((chain, key)) => {
                    chain.hash(&mut profile);
                    Some(Arc::new(CertKey::new(chain, key)))
                }
                Err(e) => {
                    errors.push(("client_cert_file".to_owned(), e));
                    None
                }
            },
            (Some(_), None) => {
                errors.push((
                    "client_key_file".to_owned(),
                    "client_cert_file needs client_key_file".to_owned(),
                ));
                None
            }
            (None, Some(_)) => {
                errors.push((
                    "client_cert_file".to_owned(),
                    "client_key_file needs client_cert_file".to_owned(),
                ));
                None
            }
        };
        let own_ca = file.extra_ca_file.as_deref().map(resolve);
        let roots = match trust_list(own_ca.as_deref(), global_extra_ca) {
            Ok(ders) => ders,
            Err(e) => {
                errors.push(("extra_ca_file".to_owned(), e));
                Vec::new()
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let ca = own_ca.is_some().then(|| {
            roots.hash(&mut profile);
            let certs: Vec<WrappedX509> = roots
                .iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
            Arc::<CaType>::from(certs.into_boxed_slice())
        });
        let custom = client_cert.is_some() || ca.is_some() || min_version != TlsVersion::V1_2;
        let outbound = if custom {
            let client = client_cert
                .as_ref()
                .map(|k| (chain_ders(k), k.key().as_slice()));
            let built = crate::outbound::OutboundTls::for_connector(
                &roots,
                client.as_ref().map(|(chain, key)| (chain.as_slice(), *key)),
                min_version == TlsVersion::V1_3,
            );
            Some(built.map_err(|e| vec![("client_cert_file".to_owned(), e)])?)
        } else {
            None
        };
        Ok(Self {
            client_cert,
            ca,
            min_version,
            // 0 is pingora's default group: connectors without their own TLS share it.
            group_key: if custom { profile.finish() | 1 } else { 0 },
            outbound,
        })
    }

    /// Whether a connection that negotiated `version` (rustls' name, e.g. `TLSv1_2`) may
    /// carry this connector's requests.
    pub fn accepts(&self, version: &str) -> bool {
        match self.min_version {
            TlsVersion::V1_2 => true,
            TlsVersion::V1_3 => version == "TLSv1_3",
        }
    }
}

/// Every certificate must parse as X.509 before pingora sees it (pingora panics on one that
/// does not).
fn checked_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let ders = read_ca_file(path)?;
    for der in &ders {
        if x509_parser::parse_x509_certificate(der).is_err() {
            return Err(format!(
                "{} holds a certificate that does not parse",
                path.display()
            ));
        }
    }
    Ok(ders)
}

/// The client certificate chain and its key, checked the way pingora will use them (rustls
/// accepts the pair, so the handshake cannot fail on them later).
fn read_cert_key(cert: &Path, key: &Path) -> Result<(Vec<Vec<u8>>, Vec<u8>), String> {
    let chain = checked_certs(cert)?;
    let pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let private = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("{} is not PEM: {e}", key.display()))?
        .ok_or_else(|| format!("{} holds no private key", key.display()))?;
    let key_der = private.secret_der().to_vec();
    let certs = chain
        .iter()
        .map(|c| rustls::pki_types::CertificateDer::from(c.clone()))
        .collect();
    rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_client_auth_cert(certs, private)
        .map_err(|e| {
            format!(
                "{} and {} do not make a client certificate: {e}",
                cert.display(),
                key.display()
            )
        })?;
    Ok((chain, key_der))
}

/// The DER certificates of a client certificate chain, leaf first.
fn chain_ders(key: &CertKey) -> Vec<Vec<u8>> {
    std::iter::once(key.leaf())
        .chain(key.intermediates())
        .map(|c| c.borrow_raw_cert().clone())
        .collect()
}

/// The connector's own CA (when it has one), the global extra CA and the system roots.
fn trust_list(own: Option<&Path>, global_extra_ca: Option<&Path>) -> Result<Vec<Vec<u8>>, String> {
    let mut ders = match own {
        Some(own) => checked_certs(own)?,
        None => Vec::new(),
    };
    if let Some(global) = global_extra_ca {
        ders.extend(checked_certs(global)?);
    }
    let native = rustls_native_certs::load_native_certs()
        .map_err(|e| format!("cannot load the system's CA certificates: {e}"))?;
    ders.extend(
        native
            .into_iter()
            .map(|c| c.to_vec())
            .filter(|der| x509_parser::parse_x509_certificate(der).is_ok()),
    );
    Ok(ders)
}
