//! Secret values: zeroized when dropped, and never printable. `Debug` and `Display` both say
//! `[redacted]`, so a secret that ends up in a log macro or an error message by mistake shows
//! nothing. The only way to the bytes is [`Secret::expose`], which is greppable.

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use zeroize::{Zeroize, Zeroizing};

/// One secret string.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret itself. Call sites are the places a secret leaves sluice's keeping.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A secret read straight into its zeroizing wrapper (a credential record's fields).
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A workspace's credential for one connector: field name → secret value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretFields(BTreeMap<String, Secret>);

impl SecretFields {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, value: Secret) {
        self.0.insert(name.into(), value);
    }

    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.0.get(name)
    }

    /// Field names (not secret).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The plaintext that gets sealed: a JSON object, in a buffer that zeroizes on drop.
    pub fn to_plaintext(&self) -> Zeroizing<Vec<u8>> {
        let size: usize = self
            .0
            .iter()
            .map(|(k, v)| k.len() + v.expose().len() + 8)
            .sum();
        let mut out = Zeroizing::new(Vec::with_capacity(size + 2));
        let view: BTreeMap<&str, &str> = self
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect();
        serde_json::to_writer(&mut *out, &view).expect("a map of strings serialises");
        out
    }

    /// Parse what [`Self::to_plaintext`] produced.
    pub fn from_plaintext(plain: &[u8]) -> Result<Self, String> {
        // UTF-8 checked once, not string by string (see `store::decode_view`).
        std::str::from_utf8(plain)
            .ok()
            .and_then(|text| serde_json::from_str(text).ok())
            .map(Self)
            .ok_or_else(|| "credential plaintext is not a JSON object of strings".to_string())
    }
}

impl fmt::Debug for SecretFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "[redacted]")))
            .finish()
    }
}

/// A rendered credential as a header value. Its bytes are owned by a [`SecretBytes`], which
/// every request's copy of the header shares (a `Bytes` reference, no copy) and which wipes
/// them when the last copy is dropped.
pub fn header_value(value: &str) -> Result<HeaderValue, String> {
    let mut v = HeaderValue::from_maybe_shared(Bytes::from_owner(SecretBytes::new(value)))
        .map_err(|_| "value is not a valid header value".to_string())?;
    v.set_sensitive(true);
    Ok(v)
}

/// Up to this many bytes of a rendered value are kept inline in [`SecretBytes`].
pub const INLINE_HEADER_VALUE: usize = 232;

/// The bytes behind a rendered credential's `HeaderValue`. `Bytes::from_owner` puts the
/// owner in the same heap block as the reference count every request's clone increments,
/// so a value of up to [`INLINE_HEADER_VALUE`] bytes (API keys, most bearer tokens) is read
/// from that one block when the request is written, not from a second one. Both forms are
/// zeroed on drop; what pingora copies into its write buffer is outside this.
#[expect(
    clippy::large_enum_variant,
    reason = "the inline variant is the point: the bytes share the reference count's block"
)]
enum SecretBytes {
    Inline {
        len: u8,
        buf: [u8; INLINE_HEADER_VALUE],
    },
    Heap(Zeroizing<Box<[u8]>>),
}

impl SecretBytes {
    fn new(value: &str) -> Self {
        let bytes = value.as_bytes();
        match u8::try_from(bytes.len()) {
            Ok(len) if bytes.len() <= INLINE_HEADER_VALUE => {
                let mut buf = [0; INLINE_HEADER_VALUE];
                buf[..bytes.len()].copy_from_slice(bytes);
                SecretBytes::Inline { len, buf }
            }
            _ => SecretBytes::Heap(Zeroizing::new(bytes.into())),
        }
    }
}

impl AsRef<[u8]> for SecretBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            SecretBytes::Inline { len, buf } => &buf[..usize::from(*len)],
            SecretBytes::Heap(b) => b,
        }
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        if let SecretBytes::Inline { buf, .. } = self {
            buf.zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("canary-123");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:?}"), "[redacted]");
        let mut f = SecretFields::new();
        f.insert("api_key", s);
        let dbg = format!("{f:?}");
        assert!(dbg.contains("api_key") && !dbg.contains("canary"), "{dbg}");
    }

    #[test]
    fn plaintext_round_trip() {
        let mut f = SecretFields::new();
        f.insert("api_key", Secret::new("k\"ey"));
        f.insert("org_id", Secret::new("42"));
        let back = SecretFields::from_plaintext(&f.to_plaintext()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn plaintext_must_be_an_object_of_strings() {
        for bad in [
            &b"[]"[..],
            b"{\"a\": 1}",
            b"{\"a\": null}",
            b"not json",
            b"",
        ] {
            assert!(SecretFields::from_plaintext(bad).is_err(), "{bad:?}");
        }
    }
}
