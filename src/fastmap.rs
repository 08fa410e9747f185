//! Hash maps for the request path.
//!
//! Every proxied request looks up its connector, workspace, org and caller, and probes the
//! allowlists, by short keys in maps built from the config. std's default hasher (SipHash-1-3)
//! was the largest single cost of those lookups; foldhash is several times cheaper on short
//! keys and still seeded randomly per process. These maps are only read on the request path
//! (their keys come from the config, not from requests), so flooding is not a concern here.

use compact_str::CompactString;

/// A `HashMap` with foldhash's per-process random seed.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` with foldhash's per-process random seed.
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The hasher of the moka caches read on every request (credentials, buckets, breakers).
/// Their keys are config-checked (connector, workspace) pairs; foldhash's quality variant is
/// still seeded per process and mixes more than the fast one.
pub type CacheHasher = foldhash::quality::RandomState;

/// A map key of two names (workspace or connector, and connector or host), owned in the map
/// as a [`PairKey`] and probed with a borrowed `(&str, &str)`: the request path looks up its
/// credential, bucket and breaker without building the key (std's `Borrow` cannot lend a
/// tuple of owned strings as a tuple of `&str`s; a trait object can). Both forms hash as
/// `(String, String)` does.
pub trait Pair: Sync {
    fn first(&self) -> &str;
    fn second(&self) -> &str;
}

/// The owned form of a [`Pair`]. Names of up to 24 bytes (typical workspace and connector ids;
/// longer ones spill to the heap) live inside the key itself: a lookup that lands on a key
/// compares it without a further pointer chase to a separate heap string. With a thousand
/// workspaces read in turn, those chases were cache misses on every request (BENCHMARKS.md).
pub type PairKey = (CompactString, CompactString);

/// A [`PairKey`] from borrowed names.
pub fn pair_key(first: &str, second: &str) -> PairKey {
    (CompactString::from(first), CompactString::from(second))
}

impl Pair for PairKey {
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

impl<'a> std::borrow::Borrow<dyn Pair + 'a> for PairKey {
    fn borrow(&self) -> &(dyn Pair + 'a) {
        self
    }
}

/// As `(String, String)` and [`PairKey`] hash: each `str` in order.
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
    type Owned = PairKey;
    fn to_owned(&self) -> PairKey {
        pair_key(self.first(), self.second())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn a_borrowed_pair_hashes_and_compares_as_the_owned_one() {
        let s = CacheHasher::default();
        let owned = pair_key("hubspot", "ws_42");
        // The owned key hashes as two `String`s would (std's tuple of `str` hashing).
        assert_eq!(
            s.hash_one(&owned),
            s.hash_one(("hubspot".to_string(), "ws_42".to_string()))
        );
        let borrowed: &dyn Pair = &("hubspot", "ws_42");
        assert_eq!(s.hash_one(&owned), s.hash_one(borrowed));
        assert!(borrowed == std::borrow::Borrow::<dyn Pair>::borrow(&owned));
        // The boundary between the two strings counts: ("ab", "c") is not ("a", "bc").
        let shifted: &dyn Pair = &("hubspo", "tws_42");
        assert_ne!(s.hash_one(&owned), s.hash_one(shifted));
        assert!(shifted != borrowed);

        let cache: moka::sync::Cache<PairKey, u32, CacheHasher> =
            moka::sync::Cache::builder().build_with_hasher(CacheHasher::default());
        cache.insert(owned.clone(), 7);
        assert_eq!(cache.get(borrowed), Some(7));
        assert_eq!(cache.get(shifted), None);
        assert_eq!(cache.get_with_by_ref(shifted, || 8), 8);
        assert_eq!(cache.get(&pair_key("hubspo", "tws_42")), Some(8));
        // A name longer than the inline 24 bytes is kept on the heap, and still matches.
        let long = "a_workspace_id_longer_than_twenty_four_bytes";
        cache.insert(pair_key(long, "hubspot"), 9);
        assert_eq!(cache.get(&(long, "hubspot") as &dyn Pair), Some(9));
    }
}
