//! Step 5 of the request path: the workspace's credential for the connector.
//!
//! [`Vault`] joins the keyring (sealing), a [`store::CredentialStore`] (where sealed records
//! live) and one moka cache (the synchronous one: nothing in it waits on I/O). Each entry is
//! the last answer that loaded successfully for its (workspace, connector), and is
//!
//! * *fresh* for `cache_ttl` after it loaded (and until [`Vault::invalidate_all_fresh`]):
//!   requests are answered from it;
//! * then *stale* until `max_staleness`, when moka drops it: a request reloads it from the
//!   store, and is answered from the stale copy only when the store is unavailable, so a Redis
//!   outage does not fail requests whose credentials were seen recently.
//!
//! (Until issue 14's tenth round these were two caches, `fresh` and `last_good`, and every
//! cold request paid a second insert, ~3.5k instructions; BENCHMARKS.md.) Concurrent misses
//! for one key share a single store read ([`flight`]).
//!
//! After a store read fails, the vault counts the store as down for `outage_backoff`: a miss
//! with a stale entry is answered from it at once instead of paying the read timeout again on
//! every request. Misses without one still try the store (nothing else could answer them), and
//! any successful read ends the back-off.
//!
//! A write or delete through this process (the write side is in `write.rs`) invalidates both
//! locally and, on Redis, tells every other replica through pub/sub.

pub mod crypto;
pub mod embedded;
mod flight;
pub mod inject;
pub mod oauth;
pub mod redis;
pub mod secret;
mod setup;
pub mod store;
mod write;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use tracing::{error, warn};

pub use setup::{
    Credentials, KeySource, Store, StoreKind, build_vault, create_key_file, load_keyring,
};
pub use write::Metadata;

use crate::error::{ErrorCode, Refusal};
use crate::fastmap::{Pair, pair_key};
use crate::label::Label;
use crate::telemetry::{CacheResult, StoreFailure};
use crypto::{Keyring, OpenError};
use inject::{Injected, Injection};
use secret::SecretFields;
use store::{CredentialStore, StoreError};

/// An opened credential.
#[derive(Debug)]
pub struct Connected {
    pub fields: SecretFields,
    /// The record version it was read from (OAuth refreshes key on it).
    pub version: u64,
    pub oauth: Option<store::OAuthMeta>,
    /// The first rendering of `fields`, and the rules it was made under.
    rendered: OnceLock<Rendered>,
}

/// `fields` rendered under one connector's injection rules. Holding the rules keeps them
/// alive, so a reload's new rules can never be mistaken for these by address.
struct Rendered {
    rules: Arc<Injection>,
    injected: Injected,
}

/// What [`Connected::render`] made.
pub enum Rendering {
    /// Kept on the credential: [`Connected::kept`] reads it for as long as the credential is
    /// held.
    Kept,
    /// Made for this request only (the kept rendering is under other rules).
    Owned(Injected),
}

/// Says which rules, never what was rendered.
impl std::fmt::Debug for Rendered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendered").finish_non_exhaustive()
    }
}

impl Connected {
    pub fn new(fields: SecretFields, version: u64, oauth: Option<store::OAuthMeta>) -> Self {
        Connected {
            fields,
            version,
            oauth,
            rendered: OnceLock::new(),
        }
    }

    /// What `rules` inject for this credential. The first rendering is kept on the
    /// credential, and the requests after read it in place (no copy, no reference count)
    /// until the credential leaves the cache. Rules from a later reload are told apart by
    /// `Arc` identity and rendered per request until then. A failed rendering (a field
    /// missing) is not kept.
    pub fn render(&self, rules: &Arc<Injection>) -> Result<Rendering, String> {
        if self.keeps(rules) {
            return Ok(Rendering::Kept);
        }
        let injected = rules.render(&self.fields)?;
        match self.rendered.set(Rendered {
            rules: rules.clone(),
            injected,
        }) {
            Ok(()) => Ok(Rendering::Kept),
            // Kept already: under other rules, or by a request that rendered at the same time.
            Err(mine) => Ok(Rendering::Owned(mine.injected)),
        }
    }

    /// Whether the kept rendering was made under `rules`.
    fn keeps(&self, rules: &Arc<Injection>) -> bool {
        self.rendered
            .get()
            .is_some_and(|r| Arc::ptr_eq(&r.rules, rules))
    }

    /// The kept rendering, once [`Self::render`] said [`Rendering::Kept`].
    pub fn kept(&self) -> Option<&Injected> {
        self.rendered.get().map(|r| &r.injected)
    }
}

/// A workspace's relation to a connector, as the request path sees it.
#[derive(Debug)]
pub enum TenantState {
    Connected(Connected),
    /// The workspace switched this connector off (`enabled: false`).
    OptedOut,
    /// No credential stored.
    Unconfigured,
}

/// What `/readyz` reports about the credential store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreHealth {
    Reachable,
    ServingFromCache,
    Unreachable,
}

/// Why the vault could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record exists but does not open (missing key, tampering, copied record).
    #[error("credential for {workspace}/{connector} cannot be opened: {reason}")]
    Unreadable {
        workspace: String,
        connector: String,
        reason: OpenError,
    },
    /// A write was refused (bad field values, unknown fields).
    #[error("{0}")]
    Invalid(String),
}

/// The one mapping from a vault failure to what the app is told.
impl From<VaultError> for Refusal {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Store(_) => Refusal::new(
                ErrorCode::CredentialStoreUnavailable,
                "the credential store is unavailable and no cached credential can be used",
            ),
            VaultError::Unreadable {
                workspace,
                connector,
                ..
            } => Refusal::new(
                ErrorCode::CredentialUnreadable,
                format!(
                    "the stored credential for workspace {workspace:?} and connector {connector:?} cannot be opened"
                ),
            ),
            VaultError::Invalid(m) => Refusal::new(ErrorCode::Internal, m),
        }
    }
}

/// Cache and timeout settings.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    pub cache_capacity: u64,
    pub cache_ttl: Duration,
    pub max_staleness: Duration,
    pub read_timeout: Duration,
    /// After a failed store read, serve `last_good` entries without asking the store for
    /// this long.
    pub outage_backoff: Duration,
}

type Key = crate::fastmap::PairKey;

/// What a load gives every request that waited for it.
type Loaded = Result<Arc<TenantState>, Arc<VaultError>>;

/// A lookup the cache could not answer fresh: [`Vault::reload`] it.
pub struct Miss {
    /// The entry that is no longer fresh, if any: the answer while the store is unavailable.
    stale: Option<Arc<TenantState>>,
}

/// A cache entry: the answer, and until when it is fresh.
#[derive(Clone)]
struct Cached {
    state: Arc<TenantState>,
    /// `cache_ttl` after the loading request started (on the clock the requests pass in).
    fresh_until: Instant,
    generation: u64,
}

pub struct Vault {
    store: Arc<dyn CredentialStore>,
    keyring: Keyring,
    /// Entries live `max_staleness`; fresh for `cache_ttl` of it.
    cache: Cache<Key, Cached, crate::fastmap::CacheHasher>,
    cache_ttl: Duration,
    /// Entries cached under an older generation are stale ([`Vault::invalidate_all_fresh`]).
    generation: AtomicU64,
    /// Store reads in flight: concurrent misses for one key share one.
    loads: flight::Flights<Key, Loaded, crate::fastmap::CacheHasher>,
    /// Entries dropped one by one ([`Vault::invalidate_local`]) so far. A load that saw this
    /// change while it ran may hold what the store had before the write that caused the
    /// invalidation: it answers its waiters but leaves nothing in the cache.
    invalidations: AtomicU64,
    read_timeout: Duration,
    outage: Outage,
}

/// "The store failed a read recently": a deadline in milliseconds on the vault's own clock
/// (tokio's, so tests can pause it), 0 when the store is not known to be down. One atomic, no
/// lock: every request that misses reads it.
struct Outage {
    epoch: tokio::time::Instant,
    until_ms: AtomicU64,
    backoff: Duration,
}

impl Outage {
    fn new(backoff: Duration) -> Self {
        Self {
            epoch: tokio::time::Instant::now(),
            until_ms: AtomicU64::new(0),
            backoff,
        }
    }

    fn now_ms(&self) -> u64 {
        // +1: a deadline of 0 means "none", even in the first millisecond.
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn active(&self) -> bool {
        self.until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    fn begin(&self) {
        let backoff = u64::try_from(self.backoff.as_millis()).unwrap_or(u64::MAX);
        self.until_ms
            .store(self.now_ms().saturating_add(backoff), Ordering::Relaxed);
    }

    fn end(&self) {
        if self.until_ms.load(Ordering::Relaxed) != 0 {
            self.until_ms.store(0, Ordering::Relaxed);
        }
    }
}

impl Vault {
    pub fn new(
        store: Arc<dyn CredentialStore>,
        keyring: Keyring,
        settings: &VaultSettings,
    ) -> Self {
        Self {
            store,
            keyring,
            // Validation keeps max_staleness >= cache_ttl; the max is for callers that skip it.
            cache: Cache::builder()
                .max_capacity(settings.cache_capacity)
                .time_to_live(settings.max_staleness.max(settings.cache_ttl))
                .build_with_hasher(Default::default()),
            cache_ttl: settings.cache_ttl,
            generation: AtomicU64::new(0),
            loads: flight::Flights::new(),
            invalidations: AtomicU64::new(0),
            read_timeout: settings.read_timeout,
            outage: Outage::new(settings.outage_backoff),
        }
    }

    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Readiness: the store answers a read within the timeout; or, while it does not,
    /// credentials loaded within `max_staleness` are still being served.
    pub async fn health(&self) -> StoreHealth {
        let probe = tokio::time::timeout(
            self.read_timeout,
            self.store.get_encoded("_health", "_probe"),
        )
        .await;
        if matches!(probe, Ok(Ok(_))) {
            return StoreHealth::Reachable;
        }
        self.cache.run_pending_tasks();
        if self.cache.entry_count() > 0 {
            StoreHealth::ServingFromCache
        } else {
            StoreHealth::Unreachable
        }
    }

    /// The store behind the caches (definitions live there too).
    pub fn store(&self) -> &Arc<dyn CredentialStore> {
        &self.store
    }

    /// The tenant state for (workspace, connector), from cache or store.
    pub async fn lookup(
        &self,
        workspace: &str,
        connector: &str,
    ) -> Result<Arc<TenantState>, VaultError> {
        self.lookup_at(workspace, connector, Instant::now()).await
    }

    /// [`Self::lookup`], at `now`.
    pub async fn lookup_at(
        &self,
        workspace: &str,
        connector: &str,
        now: Instant,
    ) -> Result<Arc<TenantState>, VaultError> {
        match self.lookup_cached(workspace, connector, now) {
            Ok(state) => Ok(state),
            Err(miss) => Box::pin(self.reload(workspace, connector, miss, now)).await,
        }
    }

    /// The warm path, with no future to build: the fresh entry for (workspace, connector), or
    /// the [`Miss`] to [`Self::reload`] with. One cache read, by the borrowed names (no key is
    /// built). The request path passes the instant its request started, and reads no clock.
    pub fn lookup_cached(
        &self,
        workspace: &str,
        connector: &str,
        now: Instant,
    ) -> Result<Arc<TenantState>, Miss> {
        match self.cache.get(&(workspace, connector) as &dyn Pair) {
            Some(c) if self.is_fresh(&c, now) => {
                static HITS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
                    crate::telemetry::METRICS
                        .credential_cache
                        .with_label_values(&[CacheResult::Hit.as_label()])
                });
                HITS.inc();
                Ok(c.state)
            }
            other => Err(Miss {
                stale: other.map(|c| c.state),
            }),
        }
    }

    fn is_fresh(&self, cached: &Cached, now: Instant) -> bool {
        now < cached.fresh_until && cached.generation == self.generation.load(Ordering::Relaxed)
    }

    /// A miss: reload from the store. Concurrent misses for one key share one read
    /// ([`flight`]). Callers box this future: it holds the store read's, which is large, and
    /// a future is moved whole wherever it goes, so carried inline in the request's future
    /// every warm request would copy it (BENCHMARKS.md).
    pub async fn reload(
        &self,
        workspace: &str,
        connector: &str,
        Miss { stale }: Miss,
        now: Instant,
    ) -> Result<Arc<TenantState>, VaultError> {
        if self.outage.active() {
            if let Some(state) = stale {
                crate::telemetry::METRICS
                    .credential_cache
                    .with_label_values(&[CacheResult::Stale.as_label()])
                    .inc();
                return Ok(state);
            }
        }
        static MISSES: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
            crate::telemetry::METRICS
                .credential_cache
                .with_label_values(&[CacheResult::Miss.as_label()])
        });
        MISSES.inc();
        let key = pair_key(workspace, connector);
        // An invalidation of every entry while the load runs leaves what it loads stale.
        let generation = self.generation.load(Ordering::Relaxed);
        let loaded = self
            .loads
            .run(&key, || async {
                // A load that finished between this request's cache read and now has cached
                // its answer and left the map: read the cache again rather than the store.
                if let Some(c) = self.cache.get(&key).filter(|c| self.is_fresh(c, now)) {
                    return Ok(c.state);
                }
                let invalidations = self.invalidations.load(Ordering::SeqCst);
                let loaded = self.load(workspace, connector).await;
                match loaded {
                    // Cached before the waiters are answered, so the next miss finds it.
                    Ok(state) => {
                        let cached = Cached {
                            state: state.clone(),
                            fresh_until: now + self.cache_ttl,
                            generation,
                        };
                        self.cache.insert(key.clone(), cached);
                        // An entry dropped while this load read the store (a write here, or
                        // another instance's) may have been this one, and what was read may
                        // predate that write: take it out again. Checked after the insert, so
                        // an invalidation between the check and the insert cannot be missed
                        // (it counts before it drops; see `invalidate_local`).
                        if self.invalidations.load(Ordering::SeqCst) != invalidations {
                            self.cache.invalidate(&key);
                        }
                        Ok(state)
                    }
                    Err(e) => Err(Arc::new(e)),
                }
            })
            .await;
        match loaded {
            Ok(state) => Ok(state),
            Err(e) => match &*e {
                VaultError::Store(StoreError::Unavailable(reason)) => match stale {
                    Some(state) => {
                        warn!(workspace, connector, reason = %reason, backoff_ms = self.outage.backoff.as_millis() as u64, "credential store unavailable; serving cached credentials without asking it for the back-off");
                        crate::telemetry::METRICS
                            .credential_cache
                            .with_label_values(&[CacheResult::Stale.as_label()])
                            .inc();
                        Ok(state)
                    }
                    None => Err((*e).clone()),
                },
                other => Err(other.clone()),
            },
        }
    }

    async fn load(&self, workspace: &str, connector: &str) -> Result<Arc<TenantState>, VaultError> {
        let read = self.store.get_encoded(workspace, connector);
        // A store that bounds its own reads (Redis: by this same timeout) gets no second timer.
        let answer = if self.store.bounds_reads() {
            Ok(read.await)
        } else {
            tokio::time::timeout(self.read_timeout, read).await
        };
        let encoded = match answer {
            Ok(Ok(r)) => {
                self.outage.end();
                r
            }
            Ok(Err(e)) => {
                crate::telemetry::METRICS
                    .store_errors
                    .with_label_values(&[StoreFailure::Read.as_label()])
                    .inc();
                if matches!(e, StoreError::Unavailable(_)) {
                    self.outage.begin();
                }
                return Err(e.into());
            }
            Err(_) => {
                crate::telemetry::METRICS
                    .store_errors
                    .with_label_values(&[StoreFailure::Timeout.as_label()])
                    .inc();
                self.outage.begin();
                return Err(StoreError::Unavailable(format!(
                    "read timed out after {:?}",
                    self.read_timeout
                ))
                .into());
            }
        };
        let record = encoded.as_deref().map(store::decode_view).transpose()?;
        let state = match record {
            None => TenantState::Unconfigured,
            Some(r) if r.workspace != workspace || r.name != connector => {
                // A record moved to another (workspace, connector)'s key: never served as
                // that tenant's. It would not open under these names either; this says why.
                error!(workspace, connector, stored_as = %format_args!("{}/{}", r.workspace, r.name), "stored credential names another workspace or connector");
                return Err(VaultError::Unreadable {
                    workspace: workspace.to_string(),
                    connector: connector.to_string(),
                    reason: OpenError::Invalid,
                });
            }
            Some(r) if !r.value.enabled => TenantState::OptedOut,
            Some(r) => TenantState::Connected(Connected::new(
                self.open(workspace, connector, &r.key_id, &r.value.encrypted_config)?,
                r.version,
                r.oauth,
            )),
        };
        Ok(Arc::new(state))
    }

    /// Open a record stored under (workspace, connector): its ciphertext is bound to those
    /// names, so a record copied to another tenant's key does not open there.
    fn open(
        &self,
        workspace: &str,
        connector: &str,
        key_id: &str,
        sealed: &str,
    ) -> Result<SecretFields, VaultError> {
        let unreadable = |reason| {
            error!(workspace, connector, key_id, %reason, "stored credential does not open");
            VaultError::Unreadable {
                workspace: workspace.to_string(),
                connector: connector.to_string(),
                reason,
            }
        };
        let plain = self
            .keyring
            .open(workspace, connector, key_id, sealed)
            .map_err(unreadable)?;
        SecretFields::from_plaintext(&plain).map_err(|_| unreadable(OpenError::Invalid))
    }

    /// Drop a cached entry here (and nowhere else).
    pub async fn invalidate_local(&self, workspace: &str, connector: &str) {
        let key = pair_key(workspace, connector);
        // Counted first: a load in flight that checks after its insert sees the count or
        // has its entry dropped here.
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(&key);
    }

    /// Make every entry stale (after missing invalidations): each is reloaded on its next
    /// request, and kept as the fallback for an outage.
    pub fn invalidate_all_fresh(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
