//! Files sluice reads or writes with care: CA bundles (PEM) and key material (0600, never
//! overwritten). A leaf module: nothing in the crate below it.

use std::path::Path;

/// Read a PEM file and return its certificates (DER), or why it is unusable.
pub fn read_ca_file(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut pem.as_slice())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

/// Create `path` (and its directory) holding `contents`, readable by its owner only (0600).
/// Never overwrites: an existing file is an error. For key material: master keys, the
/// interception CA's key.
pub fn create_secret_file(path: &Path, contents: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?
        .write_all(contents)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
