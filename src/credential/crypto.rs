//! Sealing credentials: AES-256-GCM under a master key that never appears in the TOML.
//!
//! Each write uses a fresh random 96-bit nonce; the stored blob is `nonce ‖ ciphertext ‖ tag`,
//! base64-encoded. The associated data binds the ciphertext to its workspace, connector and key
//! id, so a record copied to another workspace or connector, or relabelled with another key id,
//! fails to open.
//!
//! Master keys carry ids. The *active* key seals every write; any configured key opens. They
//! come from a key file or an environment variable, in one format:
//!
//! ```text
//! # first key = active
//! k2026b:<base64 of 32 random bytes>
//! k2026a:<base64 of 32 random bytes>
//! ```
//!
//! (in the environment variable, entries may also be separated by commas). `sluice keygen`
//! writes such a line.

use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use smallvec::SmallVec;
use zeroize::Zeroizing;

use crate::names::is_identifier;

const NONCE_LEN: usize = 12;
const AAD_PREFIX: &[u8] = b"sluice-credential-v1";

/// Why a sealed credential could not be opened. Deliberately vague: no detail helps an attacker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed with key {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("ciphertext does not open (tampered, or bound to another workspace or connector)")]
    Invalid,
}

/// The configured master keys.
pub struct Keyring {
    active: String,
    ciphers: HashMap<String, Aes256Gcm>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.ciphers.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("key_ids", &ids)
            .finish()
    }
}

/// The associated data, built on the stack (a record's names fit; longer ones spill).
fn aad(workspace: &str, connector: &str, key_id: &str) -> SmallVec<[u8; 128]> {
    let mut aad = SmallVec::new();
    for part in [
        AAD_PREFIX,
        workspace.as_bytes(),
        connector.as_bytes(),
        key_id.as_bytes(),
    ] {
        aad.extend_from_slice(part);
        aad.push(0);
    }
    aad
}

impl Keyring {
    /// Parse key lines (see the module docs). The first key is the active one.
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let mut active = None;
        let mut ciphers = HashMap::new();
        for (i, entry) in text
            .split(['\n', ','])
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .enumerate()
        {
            let (id, b64) = entry
                .split_once(':')
                .ok_or_else(|| format!("key entry {} is not `id:base64`", i + 1))?;
            let (id, b64) = (id.trim(), b64.trim());
            if !is_identifier(id.as_bytes()) {
                return Err(format!("key entry {}: {id:?} is not a valid key id", i + 1));
            }
            let raw = Zeroizing::new(
                STANDARD
                    .decode(b64)
                    .map_err(|_| format!("key {id:?} is not valid base64"))?,
            );
            if raw.len() != 32 {
                return Err(format!("key {id:?} must be 32 bytes, not {}", raw.len()));
            }
            let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&raw));
            if ciphers.insert(id.to_string(), cipher).is_some() {
                return Err(format!("key id {id:?} appears twice"));
            }
            active.get_or_insert_with(|| id.to_string());
        }
        let active = active.ok_or_else(|| "no master key configured".to_string())?;
        Ok(Keyring { active, ciphers })
    }

    /// A new random key line, `id:base64`.
    pub fn generate_line(id: &str) -> Result<Zeroizing<String>, String> {
        if !is_identifier(id.as_bytes()) {
            return Err(format!("{id:?} is not a valid key id"));
        }
        let key = Zeroizing::new(rand::random::<[u8; 32]>());
        Ok(Zeroizing::new(format!("{id}:{}", STANDARD.encode(*key))))
    }

    pub fn active_id(&self) -> &str {
        &self.active
    }

    pub fn has_key(&self, id: &str) -> bool {
        self.ciphers.contains_key(id)
    }

    /// Seal `plaintext` for (workspace, connector) under the active key.
    /// Returns (key id, base64 blob).
    pub fn seal(&self, workspace: &str, connector: &str, plaintext: &[u8]) -> (String, String) {
        let cipher = &self.ciphers[&self.active];
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let aad = aad(workspace, connector, &self.active);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce_bytes),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut blob = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        blob.extend_from_slice(&nonce_bytes);
        blob.extend_from_slice(&ciphertext);
        (self.active.clone(), STANDARD.encode(blob))
    }

    /// Open a blob sealed for (workspace, connector) under `key_id`.
    pub fn open(
        &self,
        workspace: &str,
        connector: &str,
        key_id: &str,
        blob_b64: &str,
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let cipher = self
            .ciphers
            .get(key_id)
            .ok_or_else(|| OpenError::UnknownKey(key_id.to_string()))?;
        // Decoded into the buffer the plaintext ends up in: one allocation for the record,
        // opened in place (the nonce stays in front, out of the way).
        let mut blob = Zeroizing::new(STANDARD.decode(blob_b64).map_err(|_| OpenError::Invalid)?);
        if blob.len() < NONCE_LEN + 16 {
            return Err(OpenError::Invalid);
        }
        let nonce = *Nonce::from_slice(&blob[..NONCE_LEN]);
        let aad = aad(workspace, connector, key_id);
        let mut sealed = InPlace {
            buf: &mut blob,
            start: NONCE_LEN,
        };
        cipher
            .decrypt_in_place(&nonce, &aad, &mut sealed)
            .map_err(|_| OpenError::Invalid)?;
        blob.drain(..NONCE_LEN);
        Ok(blob)
    }
}

/// The part of a buffer after the nonce, as the `aead` crate's in-place buffer: decryption
/// drops the tag by truncating it.
struct InPlace<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl AsRef<[u8]> for InPlace<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl AsMut<[u8]> for InPlace<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..]
    }
}

impl aes_gcm::aead::Buffer for InPlace<'_> {
    fn extend_from_slice(&mut self, other: &[u8]) -> aes_gcm::aead::Result<()> {
        self.buf.extend_from_slice(other);
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        self.buf.truncate(self.start + len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(lines: &[&str]) -> Keyring {
        Keyring::parse(&lines.join("\n")).unwrap()
    }

    fn line(id: &str) -> String {
        Keyring::generate_line(id).unwrap().to_string()
    }

    #[test]
    fn seal_open_round_trip_with_fresh_nonces() {
        let k = ring(&[&line("k1")]);
        let (id, a) = k.seal("ws_42", "hubspot", b"secret");
        let (_, b) = k.seal("ws_42", "hubspot", b"secret");
        assert_eq!(id, "k1");
        assert_ne!(a, b, "a fresh nonce per write");
        assert_eq!(&*k.open("ws_42", "hubspot", "k1", &a).unwrap(), b"secret");
    }

    #[test]
    fn opens_in_place_whatever_the_lengths() {
        let k = ring(&[&line("k1")]);
        // Names past the associated data's inline room, an empty and a long plaintext.
        let long_ws = "w".repeat(200);
        for (ws, plain) in [("ws_42", &b""[..]), (long_ws.as_str(), &[7u8; 5000][..])] {
            let (id, blob) = k.seal(ws, "hubspot", plain);
            assert_eq!(&*k.open(ws, "hubspot", &id, &blob).unwrap(), plain);
        }
        // Shorter than a nonce and a tag, or not base64: refused, not a panic.
        for blob in ["", "AAAA", &STANDARD.encode([0u8; 27]), "not base64!"] {
            assert_eq!(
                k.open("ws_42", "hubspot", "k1", blob),
                Err(OpenError::Invalid)
            );
        }
    }

    #[test]
    fn a_record_bound_elsewhere_does_not_open() {
        let k = ring(&[&line("k1"), &line("k0")]);
        let (id, blob) = k.seal("ws_42", "hubspot", b"secret");
        assert_eq!(
            k.open("ws_7", "hubspot", &id, &blob),
            Err(OpenError::Invalid)
        );
        assert_eq!(
            k.open("ws_42", "stripe", &id, &blob),
            Err(OpenError::Invalid)
        );
        assert_eq!(
            k.open("ws_42", "hubspot", "k0", &blob),
            Err(OpenError::Invalid)
        );
        assert_eq!(
            k.open("ws_42", "hubspot", "nope", &blob),
            Err(OpenError::UnknownKey("nope".into()))
        );
        // Workspace/connector boundaries cannot be shifted: ("ws", "_42hubspot") ≠ ("ws_42", "hubspot").
        assert_eq!(
            k.open("ws", "_42hubspot", &id, &blob),
            Err(OpenError::Invalid)
        );
        let mut tampered = STANDARD.decode(&blob).unwrap();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            k.open("ws_42", "hubspot", &id, &STANDARD.encode(tampered)),
            Err(OpenError::Invalid)
        );
    }

    #[test]
    fn old_keys_still_open_after_rotation() {
        let old = line("k1");
        let before = ring(&[&old]);
        let (id, blob) = before.seal("w", "c", b"v");
        let after = ring(&[&line("k2"), &old]);
        assert_eq!(after.active_id(), "k2");
        assert_eq!(&*after.open("w", "c", &id, &blob).unwrap(), b"v");
        assert_eq!(after.seal("w", "c", b"v").0, "k2");
    }

    #[test]
    fn bad_key_material_is_refused() {
        assert!(Keyring::parse("").is_err());
        assert!(Keyring::parse("k1:notbase64!").is_err());
        assert!(Keyring::parse(&format!("k1:{}", STANDARD.encode([0u8; 16]))).is_err());
        assert!(Keyring::parse(&format!("{},{}", line("k1"), line("k1"))).is_err());
        assert!(Keyring::parse(&format!("bad id:{}", STANDARD.encode([0u8; 32]))).is_err());
        let env_style = format!("{}, {}", line("a"), line("b"));
        assert_eq!(Keyring::parse(&env_style).unwrap().active_id(), "a");
    }

    #[test]
    fn debug_shows_ids_only() {
        let l = line("k1");
        let k = ring(&[&l]);
        let dbg = format!("{k:?}");
        let material = l.split_once(':').unwrap().1;
        assert!(dbg.contains("k1") && !dbg.contains(material));
    }
}
