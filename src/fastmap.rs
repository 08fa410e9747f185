//! Hash maps for the request path.
//!
//! Every proxied request looks up its connector, workspace, org and caller, and probes the
//! allowlists, by short keys in maps built from the config. std's default hasher (SipHash-1-3)
//! was the largest single cost of those lookups; foldhash is several times cheaper on short
//! keys and still seeded randomly per process. These maps are only read on the request path
//! (their keys come from the config, not from requests), so flooding is not a concern here.

/// A `HashMap` with foldhash's per-process random seed.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` with foldhash's per-process random seed.
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The hasher of the moka caches read on every request (credentials, buckets, breakers).
/// Their keys are config-checked (connector, workspace) pairs; foldhash's quality variant is
/// still seeded per process and mixes more than the fast one.
pub type CacheHasher = foldhash::quality::RandomState;

/// A map key of two strings, owned in the map as `(String, String)` and probed with a
/// borrowed `(&str, &str)`: the request path looks up its bucket and breaker without
/// building the key's two `String`s (std's `Borrow` cannot lend a tuple of `String`s as a
/// tuple of `&str`s; a trait object can). Both forms hash as the owned tuple does.
pub trait Pair: Sync {
    fn first(&self) -> &str;
    fn second(&self) -> &str;
}

impl Pair for (String, String) {
    fn first(&self) -> &str {
        &self.0
    }
    fn second(&self) -> &str {
        &self.1
    }
}

impl Pair for (&str, &str) {
    fn first(&self) -> &str {
        self.0
    }
    fn second(&self) -> &str {
        self.1
    }
}

impl<'a> std::borrow::Borrow<dyn Pair + 'a> for (String, String) {
    fn borrow(&self) -> &(dyn Pair + 'a) {
        self
    }
}

/// As `(String, String)` hashes: each `str` in order.
impl std::hash::Hash for dyn Pair + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.first().hash(state);
        self.second().hash(state);
    }
}

impl PartialEq for dyn Pair + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.first() == other.first() && self.second() == other.second()
    }
}

impl Eq for dyn Pair + '_ {}

impl ToOwned for dyn Pair + '_ {
    type Owned = (String, String);
    fn to_owned(&self) -> (String, String) {
        (self.first().to_owned(), self.second().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn a_borrowed_pair_hashes_and_compares_as_the_owned_one() {
        let s = CacheHasher::default();
        let owned = ("hubspot".to_string(), "ws_42".to_string());
        let borrowed: &dyn Pair = &("hubspot", "ws_42");
        assert_eq!(s.hash_one(&owned), s.hash_one(borrowed));
        assert!(borrowed == std::borrow::Borrow::<dyn Pair>::borrow(&owned));
        // The boundary between the two strings counts: ("ab", "c") is not ("a", "bc").
        let shifted: &dyn Pair = &("hubspo", "tws_42");
        assert_ne!(s.hash_one(&owned), s.hash_one(shifted));
        assert!(shifted != borrowed);

        let cache: moka::sync::Cache<(String, String), u32, CacheHasher> =
            moka::sync::Cache::builder().build_with_hasher(CacheHasher::default());
        cache.insert(owned.clone(), 7);
        assert_eq!(cache.get(borrowed), Some(7));
        assert_eq!(cache.get(shifted), None);
        assert_eq!(cache.get_with_by_ref(shifted, || 8), 8);
        assert_eq!(
            cache.get(&("hubspo".to_string(), "tws_42".to_string())),
            Some(8)
        );
    }
}
