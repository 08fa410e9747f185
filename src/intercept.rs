//! TLS interception inside CONNECT tunnels: sluice's own CA, and leaf certificates minted on
//! demand for the name the client asks for (SNI).
//!
//! An app that insists on `https://` URLs opens `CONNECT host:port` and then speaks TLS to
//! what it thinks is the API. sluice answers that handshake itself, with a leaf certificate
//! for the SNI name (ECDSA P-256, short-lived, cached in a bounded LRU), signed by the CA that
//! `sluice ca init` made and the app was told to trust. Every request inside then runs the
//! same path as plain traffic (policy, credential injection, pacing, retries, logs), and
//! sluice makes its own verified TLS connection upstream.
//!
//! The CA key never enters the TOML: the config names the file (0600), read once at startup.
//! The leaf's issuer is rebuilt from [`ca_params`], so the CA must be one `sluice ca init`
//! made; [`Minter::load`] proves the pair by minting a leaf and verifying it against the CA
//! certificate before any traffic.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;

/// The CA's subject: fixed, so the issuer of every leaf can be rebuilt from the key alone.
pub fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "sluice TLS interception CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "sluice");
    // Leaves only: no intermediate below this CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// `sluice ca init`: a new CA (ECDSA P-256, ten years) written to `cert` (PEM) and `key`
/// (PKCS#8 PEM, mode 0600). Refuses to overwrite either file.
pub fn init_ca(cert: &Path, key: &Path) -> Result<(), String> {
    for path in [cert, key] {
        if path.exists() {
            return Err(format!("{} exists; not overwriting it", path.display()));
        }
    }
    let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = ca_params();
    let now = time_now();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(3650);
    let ca = params.self_signed(&pair).map_err(|e| e.to_string())?;
    let key_pem = zeroize::Zeroizing::new(pair.serialize_pem());
    crate::files::create_secret_file(key, key_pem.as_bytes())?;
    if let Some(dir) = cert.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(cert, ca.pem()).map_err(|e| format!("cannot write {}: {e}", cert.display()))
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Mints and caches leaf certificates; the TLS server's certificate resolver.
pub struct Minter {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    lifetime: Duration,
    cache: moka::sync::Cache<String, Arc<CertifiedKey>>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("lifetime", &self.lifetime)
            .field("cached", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// Read the CA (certificate and key files), and prove they belong together.
    pub fn load(
        cert: &Path,
        key: &Path,
        lifetime: Duration,
        capacity: u64,
    ) -> Result<Self, String> {
        let cert_pem =
            std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
        let ca_der = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| format!("{} holds no PEM certificate", cert.display()))?;
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read_to_string(key)
                .map_err(|e| format!("cannot read {}: {e}", key.display()))?,
        );
        let pair = KeyPair::from_pem(&key_pem)
            .map_err(|e| format!("{} is not a PEM private key: {e}", key.display()))?;
        let minter = Self {
            issuer: Issuer::new(ca_params(), pair),
            ca_der,
            lifetime,
            // Entries are dropped well before their certificate expires.
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(lifetime / 2)
                .build(),
        };
        minter.self_check().map_err(|e| {
            format!(
                "{} and {} do not form a sluice CA (make one with `sluice ca init`): {e}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(minter)
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// A leaf for `name`, minted now (not cached).
    pub fn mint(&self, name: &str) -> Result<CertifiedKey, String> {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params =
            CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
        params.distinguished_name.push(DnType::CommonName, name);
        let now = time_now();
        // A little backdating for clients whose clocks run behind.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after =
            now + time::Duration::try_from(self.lifetime).map_err(|e| e.to_string())?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&pair, &self.issuer)
            .map_err(|e| e.to_string())?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pair.serialize_der()));
        let signer =
            rustls::crypto::ring::sign::any_ecdsa_type(&key_der).map_err(|e| e.to_string())?;
        Ok(CertifiedKey::new(
            vec![leaf.der().clone(), self.ca_der.clone()],
            signer,
        ))
    }

    /// Mint a leaf and verify it as a client would, against the CA certificate alone.
    fn self_check(&self) -> Result<(), String> {
        let name = "self-check.sluice.invalid";
        let leaf = self.mint(name)?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_der.clone())
            .map_err(|e| format!("the CA certificate does not parse: {e}"))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &[],
                &ServerName::try_from(name).map_err(|e| e.to_string())?,
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The (cached) leaf for a host name; `None` for anything but a valid host name.
    pub fn resolve_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        crate::policy::domain::parse_host(name)
            .ok()
            .filter(|h| matches!(h, crate::policy::domain::Host::Name(_)))?;
        self.cache
            .try_get_with(name.to_string(), || self.mint(name).map(Arc::new))
            .ok()
    }
}

/// The TLS server config for one intercepted handshake: HTTP/1.1 only, TLS 1.2 and 1.3,
/// certificates from `resolver`. Without SNI the resolver has no name: the handshake fails.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minter(dir: &Path) -> Minter {
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        init_ca(&cert, &key).unwrap();
        Minter::load(&cert, &key, Duration::from_secs(3600), 10).unwrap()
    }

    #[test]
    fn init_writes_a_0600_key_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let _ = minter(dir.path());
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(init_ca(&dir.path().join("ca.pem"), &dir.path().join("other.key")).is_err());
    }

    #[test]
    fn a_key_from_another_ca_is_refused_at_load() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let _ = minter(a.path());
        let _ = minter(b.path());
        let err = Minter::load(
            &a.path().join("ca.pem"),
            &b.path().join("ca.key"),
            Duration::from_secs(3600),
            10,
        )
        .unwrap_err();
        assert!(err.contains("do not form a sluice CA"), "{err}");
    }

    #[test]
    fn leaves_name_the_host_and_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let m = minter(dir.path());
        let leaf = m.mint("api.example.com").unwrap();
        assert_eq!(leaf.cert.len(), 2);
        assert_eq!(&leaf.cert[1], m.ca_der());
    }
}
