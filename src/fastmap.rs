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
