//! Step 5 of the request path: the workspace's credential for the connector.
//!
//! [`Vault`] joins the keyring (sealing), a [`store::CredentialStore`] (where sealed records
//! live) and two moka caches:
//!
//! * `fresh`, bounded by capacity and `cache_ttl`: what requests read. Concurrent misses for
//!   one key share a single store read (`try_get_with`).
//! * `last_good`, bounded by `max_staleness`: the last answer that loaded successfully. Used
//!   only when the store is unavailable, so a Redis outage does not fail requests whose
//!   credentials were seen recently.
//!
//! After a store read fails, the vault counts the store as down for `outage_backoff`: a miss
//! with a `last_good` entry is answered from it at once instead of paying the read timeout
//! again on every request. Misses without one still try the store (nothing else could answer
//! them), and any successful read ends the back-off.
//!
//! A write or delete through this process invalidates both locally and, on Redis, tells every
//! other replica through pub/sub.

pub mod crypto;
pub mod embedded;
pub mod inject;
pub mod oauth;
pub mod redis;
pub mod secret;
mod setup;
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use moka::future::Cache;
use tracing::{error, warn};

pub use setup::{
    Credentials, KeySource, Store, StoreKind, build_vault, create_key_file, load_keyring,
};

use crate::error::{ErrorCode, Refusal};
use crate::label::Label;
use crate::telemetry::{CacheResult, StoreFailure};
use crypto::{Keyring, OpenError};
use secret::SecretFields;
use store::{CredentialRecord, CredentialStore, RecordValue, StoreError, now_unix};

/// An opened credential.
#[derive(Debug)]
pub struct Connected {
    pub fields: SecretFields,
    /// The record version it was read from (OAuth refreshes key on it).
    pub version: u64,
    pub oauth: Option<store::OAuthMeta>,
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

type Key = (String, String);

pub struct Vault {
    store: Arc<dyn CredentialStore>,
    keyring: Keyring,
    fresh: Cache<Key, Arc<TenantState>>,
    last_good: Cache<Key, Arc<TenantState>>,
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

/// What the admin API and CLI may see of a record: never a value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Metadata {
    pub workspace: String,
    pub connector: String,
    pub enabled: bool,
    pub fields: Vec<String>,
    pub key_id: String,
    pub version: u64,
    pub created_at: u64,
    pub updated_at: u64,
    /// OAuth connectors: when the access token expires (unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// OAuth connectors: the provider refused the refresh token; connect again.
    pub needs_reauthorization: bool,
}

impl From<&CredentialRecord> for Metadata {
    fn from(r: &CredentialRecord) -> Self {
        Metadata {
            workspace: r.workspace.clone(),
            connector: r.name.clone(),
            enabled: r.value.enabled,
            fields: r.fields.clone(),
            key_id: r.key_id.clone(),
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
            expires_at: r.oauth.map(|o| o.expires_at),
            needs_reauthorization: r.oauth.is_some_and(|o| o.needs_reauthorization),
        }
    }
}

/// Field values must be usable in a header: no control characters (CR, LF and NUL above all).
fn check_value(name: &str, value: &str) -> Result<(), VaultError> {
    if value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(VaultError::Invalid(format!(
            "field {name:?} contains a control character (CR, LF, NUL, …)"
        )));
    }
    Ok(())
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
            fresh: Cache::builder()
                .max_capacity(settings.cache_capacity)
                .time_to_live(settings.cache_ttl)
                .build(),
            last_good: Cache::builder()
                .max_capacity(settings.cache_capacity)
                .time_to_live(settings.max_staleness)
                .build(),
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
        let probe =
            tokio::time::timeout(self.read_timeout, self.store.get("_health", "_probe")).await;
        if matches!(probe, Ok(Ok(_))) {
            return StoreHealth::Reachable;
        }
        self.last_good.run_pending_tasks().await;
        if self.last_good.entry_count() > 0 {
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
        let key = (workspace.to_string(), connector.to_string());
        // The warm path: one cache read. Misses go through `try_get_with`, which lets one
        // caller load while the others for the same key wait for its result.
        if let Some(state) = self.fresh.get(&key).await {
            static HITS: LazyLock<prometheus::IntCounter> = LazyLock::new(|| {
                crate::telemetry::METRICS
                    .credential_cache
                    .with_label_values(&[CacheResult::Hit.as_label()])
            });
            HITS.inc();
            return Ok(state);
        }
        // Boxed: the store read's future is large, and a future is moved whole wherever it
        // goes, so carried inline every warm request would copy it (BENCHMARKS.md).
        Box::pin(self.lookup_miss(key)).await
    }

    async fn lookup_miss(&self, key: (String, String)) -> Result<Arc<TenantState>, VaultError> {
        let (workspace, connector) = (key.0.as_str(), key.1.as_str());
        if self.outage.active() {
            if let Some(state) = self.last_good.get(&key).await {
                crate::telemetry::METRICS
                    .credential_cache
                    .with_label_values(&[CacheResult::Stale.as_label()])
                    .inc();
                return Ok(state);
            }
        }
        crate::telemetry::METRICS
            .credential_cache
            .with_label_values(&[CacheResult::Miss.as_label()])
            .inc();
        match self
            .fresh
            .try_get_with_by_ref(&key, self.load(workspace, connector))
            .await
        {
            Ok(state) => {
                // Only successful loads refresh the fallback; a cache hit costs nothing here.
                Ok(state)
            }
            Err(e) => match &*e {
                VaultError::Store(StoreError::Unavailable(reason)) => {
                    match self.last_good.get(&key).await {
                        Some(state) => {
                            warn!(workspace, connector, reason = %reason, backoff_ms = self.outage.backoff.as_millis() as u64, "credential store unavailable; serving cached credentials without asking it for the back-off");
                            crate::telemetry::METRICS
                                .credential_cache
                                .with_label_values(&[CacheResult::Stale.as_label()])
                                .inc();
                            Ok(state)
                        }
                        None => Err((*e).clone()),
                    }
                }
                other => Err(other.clone()),
            },
        }
    }

    async fn load(&self, workspace: &str, connector: &str) -> Result<Arc<TenantState>, VaultError> {
        let record =
            match tokio::time::timeout(self.read_timeout, self.store.get(workspace, connector))
                .await
            {
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
        let state = match record {
            None => TenantState::Unconfigured,
            Some(r) if !r.value.enabled => TenantState::OptedOut,
            Some(r) => TenantState::Connected(Connected {
                fields: self.open(&r)?,
                version: r.version,
                oauth: r.oauth,
            }),
        };
        let state = Arc::new(state);
        self.last_good
            .insert(
                (workspace.to_string(), connector.to_string()),
                state.clone(),
            )
            .await;
        Ok(state)
    }

    fn open(&self, r: &CredentialRecord) -> Result<SecretFields, VaultError> {
        let unreadable = |reason| {
            error!(workspace = %r.workspace, connector = %r.name, key_id = %r.key_id, %reason, "stored credential does not open");
            VaultError::Unreadable {
                workspace: r.workspace.clone(),
                connector: r.name.clone(),
                reason,
            }
        };
        let plain = self
            .keyring
            .open(&r.workspace, &r.name, &r.key_id, &r.value.encrypted_config)
            .map_err(unreadable)?;
        SecretFields::from_plaintext(&plain).map_err(|_| unreadable(OpenError::Invalid))
    }

    /// Drop a cached entry here (and nowhere else).
    pub async fn invalidate_local(&self, workspace: &str, connector: &str) {
        let key = (workspace.to_string(), connector.to_string());
        self.fresh.invalidate(&key).await;
        self.last_good.invalidate(&key).await;
    }

    /// Drop every fresh entry (after missing invalidations). The stale fallback stays.
    pub fn invalidate_all_fresh(&self) {
        self.fresh.invalidate_all();
    }

    async fn invalidate_everywhere(&self, workspace: &str, connector: &str) {
        self.invalidate_local(workspace, connector).await;
        self.store.publish_invalidation(workspace, connector).await;
    }

    /// The next version of (workspace, connector)'s record: `fields` sealed under the active
    /// key, version and timestamps carried on from the stored one.
    async fn sealed_record(
        &self,
        workspace: &str,
        connector: &str,
        enabled: bool,
        fields: &SecretFields,
        oauth: Option<store::OAuthMeta>,
    ) -> Result<CredentialRecord, VaultError> {
        let existing = self.store.get(workspace, connector).await?;
        let (key_id, blob) = self
            .keyring
            .seal(workspace, connector, &fields.to_plaintext());
        let now = now_unix();
        Ok(CredentialRecord {
            group: "connector".into(),
            name: connector.into(),
            workspace: workspace.into(),
            value: RecordValue {
                enabled,
                encrypted_config: blob,
            },
            key_id,
            version: existing.as_ref().map_or(1, |r| r.version + 1),
            fields: fields.names().map(str::to_string).collect(),
            created_at: existing.as_ref().map_or(now, |r| r.created_at),
            updated_at: now,
            oauth,
        })
    }

    /// Store (or replace) a workspace's credential. Values are validated, sealed under the
    /// active key, and every cache is invalidated.
    pub async fn put(
        &self,
        workspace: &str,
        connector: &str,
        enabled: bool,
        fields: &SecretFields,
    ) -> Result<Metadata, VaultError> {
        for name in fields.names() {
            check_value(name, fields.get(name).map_or("", |s| s.expose()))?;
        }
        let record = self
            .sealed_record(workspace, connector, enabled, fields, None)
            .await?;
        self.store.put(&record).await?;
        // The store answered: no reason to keep serving stale copies in its place.
        self.outage.end();
        self.invalidate_everywhere(workspace, connector).await;
        Ok(Metadata::from(&record))
    }

    /// The record as stored now, bypassing the caches (OAuth refreshes re-check under the lock).
    pub async fn read_through(
        &self,
        workspace: &str,
        connector: &str,
    ) -> Result<Option<(CredentialRecord, Connected)>, VaultError> {
        match self.store.get(workspace, connector).await? {
            Some(r) if r.value.enabled => {
                let fields = self.open(&r)?;
                let connected = Connected {
                    fields,
                    version: r.version,
                    oauth: r.oauth,
                };
                Ok(Some((r, connected)))
            }
            _ => Ok(None),
        }
    }

    /// Store OAuth tokens (sealed) and their metadata. With `fence`, only while that fencing
    /// token holds the refresh lock (`Ok(None)`: the lock was lost, nothing written).
    pub async fn put_oauth(
        &self,
        workspace: &str,
        connector: &str,
        fields: &SecretFields,
        meta: store::OAuthMeta,
        fence: Option<u64>,
    ) -> Result<Option<Connected>, VaultError> {
        let record = self
            .sealed_record(workspace, connector, true, fields, Some(meta))
            .await?;
        let written = match fence {
            Some(f) => self.store.put_fenced(&record, f).await?,
            None => self.store.put(&record).await.map(|()| true)?,
        };
        if !written {
            return Ok(None);
        }
        self.invalidate_everywhere(workspace, connector).await;
        Ok(Some(Connected {
            fields: fields.clone(),
            version: record.version,
            oauth: Some(meta),
        }))
    }

    /// Delete a workspace's credential; `true` when one existed.
    pub async fn delete(&self, workspace: &str, connector: &str) -> Result<bool, VaultError> {
        let existed = self.store.delete(workspace, connector).await?;
        self.invalidate_everywhere(workspace, connector).await;
        Ok(existed)
    }

    pub async fn metadata(
        &self,
        workspace: &str,
        connector: &str,
    ) -> Result<Option<Metadata>, VaultError> {
        Ok(self
            .store
            .get(workspace, connector)
            .await?
            .as_ref()
            .map(Metadata::from))
    }

    pub async fn list(&self) -> Result<Vec<Metadata>, VaultError> {
        let mut all: Vec<Metadata> = self
            .store
            .list()
            .await?
            .iter()
            .map(Metadata::from)
            .collect();
        all.sort_by(|a, b| (&a.workspace, &a.connector).cmp(&(&b.workspace, &b.connector)));
        Ok(all)
    }

    /// Re-seal every record not under the active key. Safe while serving: each record is
    /// rewritten whole, and the old key still opens anything not yet rewritten.
    /// Returns (re-sealed, already current).
    pub async fn rotate(&self) -> Result<(usize, usize), VaultError> {
        let (mut resealed, mut current) = (0, 0);
        for listed in self.store.list().await? {
            if listed.key_id == self.keyring.active_id() {
                current += 1;
                continue;
            }
            let (ws, conn) = (listed.workspace.clone(), listed.name.clone());
            // Under the same fenced lock OAuth refreshes take, so a refresh (in any replica)
            // cannot land between this read and this write and be overwritten.
            let fence = self.lock_for_rewrite(&ws, &conn).await?;
            let outcome = self.reseal(&ws, &conn, fence).await;
            self.store.release_refresh_lock(&ws, &conn, fence).await;
            match outcome? {
                true => resealed += 1,
                false => current += 1,
            }
        }
        Ok((resealed, current))
    }

    /// The refresh lock for (workspace, connector), waiting up to ten seconds for a holder.
    async fn lock_for_rewrite(&self, workspace: &str, connector: &str) -> Result<u64, VaultError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(fence) = self
                .store
                .acquire_refresh_lock(workspace, connector, Duration::from_secs(30))
                .await?
            {
                return Ok(fence);
            }
            if std::time::Instant::now() > deadline {
                return Err(StoreError::Unavailable(format!(
                    "{workspace}/{connector} stayed locked by a refresh"
                ))
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Re-read and re-seal one record under the active key while `fence` holds its lock.
    /// `false`: it was already current (or gone) by then.
    async fn reseal(
        &self,
        workspace: &str,
        connector: &str,
        fence: u64,
    ) -> Result<bool, VaultError> {
        let Some(r) = self.store.get(workspace, connector).await? else {
            return Ok(false);
        };
        if r.key_id == self.keyring.active_id() {
            return Ok(false);
        }
        let fields = self.open(&r)?;
        let (key_id, blob) = self
            .keyring
            .seal(workspace, connector, &fields.to_plaintext());
        let record = CredentialRecord {
            key_id,
            value: RecordValue {
                enabled: r.value.enabled,
                encrypted_config: blob,
            },
            version: r.version + 1,
            updated_at: now_unix(),
            ..r
        };
        if !self.store.put_fenced(&record, fence).await? {
            return Err(StoreError::Unavailable("lost the lock while re-sealing".into()).into());
        }
        self.invalidate_everywhere(workspace, connector).await;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The real embedded store, counting reads.
    struct Counting {
        inner: embedded::EmbeddedStore,
        reads: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl CredentialStore for Counting {
        async fn get(&self, w: &str, c: &str) -> Result<Option<CredentialRecord>, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.inner.get(w, c).await
        }
        async fn put(&self, r: &CredentialRecord) -> Result<(), StoreError> {
            self.inner.put(r).await
        }
        async fn delete(&self, w: &str, c: &str) -> Result<bool, StoreError> {
            self.inner.delete(w, c).await
        }
        async fn list(&self) -> Result<Vec<CredentialRecord>, StoreError> {
            self.inner.list().await
        }
        async fn list_definitions(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
            self.inner.list_definitions().await
        }
        async fn put_definition(&self, k: &str, id: &str, json: &[u8]) -> Result<(), StoreError> {
            self.inner.put_definition(k, id, json).await
        }
        async fn delete_definition(&self, k: &str, id: &str) -> Result<bool, StoreError> {
            self.inner.delete_definition(k, id).await
        }
        async fn put_pending_authorization(
            &self,
            s: &str,
            p: &[u8],
            t: Duration,
        ) -> Result<(), StoreError> {
            self.inner.put_pending_authorization(s, p, t).await
        }
        async fn take_pending_authorization(&self, s: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.take_pending_authorization(s).await
        }
    }

    fn vault(dir: &std::path::Path) -> (Arc<Vault>, Arc<Counting>) {
        let store = Arc::new(Counting {
            inner: embedded::EmbeddedStore::open(&dir.join("s.redb")).unwrap(),
            reads: AtomicUsize::new(0),
        });
        let keys = Keyring::parse(&Keyring::generate_line("k1").unwrap()).unwrap();
        let settings = VaultSettings {
            cache_capacity: 100,
            cache_ttl: Duration::from_secs(60),
            max_staleness: Duration::from_secs(600),
            read_timeout: Duration::from_secs(5),
            outage_backoff: Duration::from_secs(1),
        };
        (Arc::new(Vault::new(store.clone(), keys, &settings)), store)
    }

    fn fields(v: &str) -> SecretFields {
        let mut f = SecretFields::new();
        f.insert("api_key", secret::Secret::new(v));
        f
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_hundred_concurrent_cold_misses_read_the_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, store) = vault(dir.path());
        vault.put("ws", "c", true, &fields("k")).await.unwrap();
        let before = store.reads.load(Ordering::SeqCst);
        let lookups: Vec<_> = (0..100)
            .map(|_| {
                let vault = vault.clone();
                tokio::spawn(async move { vault.lookup("ws", "c").await })
            })
            .collect();
        for l in lookups {
            assert!(matches!(
                &*l.await.unwrap().unwrap(),
                TenantState::Connected(_)
            ));
        }
        assert_eq!(store.reads.load(Ordering::SeqCst) - before, 1);
    }

    #[tokio::test]
    async fn writes_invalidate_and_metadata_never_holds_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, _) = vault(dir.path());
        assert!(matches!(
            &*vault.lookup("ws", "c").await.unwrap(),
            TenantState::Unconfigured
        ));
        let meta = vault
            .put("ws", "c", true, &fields("canary-v1"))
            .await
            .unwrap();
        assert_eq!(
            (meta.version, meta.fields.clone(), meta.key_id.as_str()),
            (1, vec!["api_key".to_string()], "k1")
        );
        assert!(!serde_json::to_string(&meta).unwrap().contains("canary"));
        match &*vault.lookup("ws", "c").await.unwrap() {
            TenantState::Connected(f) => {
                assert_eq!(f.fields.get("api_key").unwrap().expose(), "canary-v1")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            vault
                .put("ws", "c", false, &fields("v2"))
                .await
                .unwrap()
                .version,
            2
        );
        assert!(matches!(
            &*vault.lookup("ws", "c").await.unwrap(),
            TenantState::OptedOut
        ));
        assert!(vault.delete("ws", "c").await.unwrap());
        assert!(matches!(
            &*vault.lookup("ws", "c").await.unwrap(),
            TenantState::Unconfigured
        ));
    }

    #[tokio::test]
    async fn control_characters_are_refused_at_write() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, store) = vault(dir.path());
        for bad in ["a\r\nX-Injected: 1", "a\nb", "a\0b"] {
            assert!(matches!(
                vault.put("ws", "c", true, &fields(bad)).await,
                Err(VaultError::Invalid(_))
            ));
        }
        assert!(
            store.list().await.unwrap().is_empty(),
            "nothing was written"
        );
    }

    #[tokio::test]
    async fn rotation_reseals_everything_under_the_active_key() {
        let dir = tempfile::tempdir().unwrap();
        let old = Keyring::generate_line("old").unwrap();
        let store: Arc<dyn CredentialStore> =
            Arc::new(embedded::EmbeddedStore::open(&dir.path().join("r.redb")).unwrap());
        let settings = VaultSettings {
            cache_capacity: 10,
            cache_ttl: Duration::from_secs(60),
            max_staleness: Duration::from_secs(60),
            read_timeout: Duration::from_secs(5),
            outage_backoff: Duration::from_secs(1),
        };
        let before = Vault::new(store.clone(), Keyring::parse(&old).unwrap(), &settings);
        before.put("ws", "a", true, &fields("x")).await.unwrap();
        before.put("ws", "b", false, &fields("y")).await.unwrap();

        let new = Keyring::generate_line("new").unwrap();
        let after = Vault::new(
            store.clone(),
            Keyring::parse(&format!("{}\n{}", &*new, &*old)).unwrap(),
            &settings,
        );
        assert_eq!(after.rotate().await.unwrap(), (2, 0));
        assert_eq!(after.rotate().await.unwrap(), (0, 2), "idempotent");
        for m in after.list().await.unwrap() {
            assert_eq!(m.key_id, "new");
            assert_eq!(m.version, 2);
        }
        // Only the new key is needed now.
        let only_new = Vault::new(store, Keyring::parse(&new).unwrap(), &settings);
        assert!(matches!(
            &*only_new.lookup("ws", "a").await.unwrap(),
            TenantState::Connected(_)
        ));
        assert!(matches!(
            &*only_new.lookup("ws", "b").await.unwrap(),
            TenantState::OptedOut
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_never_overwrites_a_refresh_holding_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn CredentialStore> =
            Arc::new(embedded::EmbeddedStore::open(&dir.path().join("r.redb")).unwrap());
        let settings = VaultSettings {
            cache_capacity: 10,
            cache_ttl: Duration::from_secs(60),
            max_staleness: Duration::from_secs(60),
            read_timeout: Duration::from_secs(5),
            outage_backoff: Duration::from_secs(1),
        };
        let old = Keyring::generate_line("old").unwrap();
        let new = Keyring::generate_line("new").unwrap();
        let before = Vault::new(store.clone(), Keyring::parse(&old).unwrap(), &settings);
        before.put("ws", "c", true, &fields("v1")).await.unwrap();

        // A refresh holds the lock when rotation starts.
        let fence = store
            .acquire_refresh_lock("ws", "c", Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        let after = Arc::new(Vault::new(
            store.clone(),
            Keyring::parse(&format!("{}\n{}", &*new, &*old)).unwrap(),
            &settings,
        ));
        let rotation = tokio::spawn({
            let after = after.clone();
            async move { after.rotate().await }
        });
        // The refresh writes v2 under its fence, then lets go.
        let meta = store::OAuthMeta {
            expires_at: 0,
            needs_reauthorization: false,
        };
        assert!(
            before
                .put_oauth("ws", "c", &fields("v2"), meta, Some(fence))
                .await
                .unwrap()
                .is_some()
        );
        store.release_refresh_lock("ws", "c", fence).await;
        assert_eq!(rotation.await.unwrap().unwrap(), (1, 0));

        let only_new = Vault::new(store, Keyring::parse(&new).unwrap(), &settings);
        match &*only_new.lookup("ws", "c").await.unwrap() {
            TenantState::Connected(c) => {
                assert_eq!(
                    c.fields.get("api_key").unwrap().expose(),
                    "v2",
                    "the refresh survived"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
