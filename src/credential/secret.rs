//! Secret values: zeroized when dropped, and never printable. `Debug` and `Display` both say
//! `[redacted]`, so a secret that ends up in a log macro or an error message by mistake shows
//! nothing. The only way to the bytes is [`Secret::expose`], which is greppable.

use std::collections::BTreeMap;
use std::fmt;

use zeroize::Zeroizing;

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
        let map: BTreeMap<String, String> = serde_json::from_slice(plain)
            .map_err(|_| "credential plaintext is not a JSON object of strings".to_string())?;
        Ok(Self(
            map.into_iter().map(|(k, v)| (k, Secret::new(v))).collect(),
        ))
    }
}

impl fmt::Debug for SecretFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "[redacted]")))
            .finish()
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
}
