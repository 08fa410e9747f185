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
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use pingora::upstreams::peer::HttpPeer;

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

/// The pingora peer for a vetted destination.
pub fn peer(vetted: &Vetted, settings: &Upstream) -> HttpPeer {
    debug_assert!(!vetted.sni.is_empty(), "an empty SNI disables verification");
    let mut peer = HttpPeer::new(vetted.addr, true, vetted.sni.clone());
    let o = &mut peer.options;
    o.verify_cert = true;
    o.verify_hostname = true;
    o.connection_timeout = Some(settings.connect_timeout);
    o.total_connection_timeout = Some(settings.connect_timeout + settings.tls_handshake_timeout);
    o.read_timeout = Some(settings.read_timeout);
    o.write_timeout = Some(settings.write_timeout);
    o.idle_timeout = Some(settings.idle_timeout);
    peer
}
