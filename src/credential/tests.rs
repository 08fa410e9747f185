//! The vault against the real embedded store: cold misses, invalidation, rotation.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use store::CredentialRecord;

/// The real embedded store, counting reads.
struct Counting {
    inner: embedded::EmbeddedStore,
    reads: AtomicUsize,
    /// A read takes a permit after reading, before it answers: a test holding every permit
    /// keeps reads in flight with what they read.
    gate: tokio::sync::Semaphore,
}

const GATE_PERMITS: u32 = 1000;

#[async_trait::async_trait]
impl CredentialStore for Counting {
    async fn get_encoded(&self, w: &str, c: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = self.inner.get_encoded(w, c).await;
        self.reads.fetch_add(1, Ordering::SeqCst);
        drop(self.gate.acquire().await);
        read
    }
    /// Writes read the record they replace: not a request's read, neither counted nor held.
    async fn get(&self, w: &str, c: &str) -> Result<Option<CredentialRecord>, StoreError> {
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
        gate: tokio::sync::Semaphore::new(GATE_PERMITS as usize),
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

#[test]
fn the_read_path_view_reads_what_the_full_record_wrote() {
    let record = CredentialRecord {
        group: "connector".into(),
        name: "c\"1".into(),
        workspace: "ws".into(),
        value: store::RecordValue {
            enabled: true,
            encrypted_config: "c2VhbGVk".into(),
        },
        key_id: "k1".into(),
        version: 7,
        fields: vec!["access_token".into()],
        created_at: 1,
        updated_at: 2,
        oauth: Some(store::OAuthMeta {
            expires_at: 99,
            needs_reauthorization: false,
        }),
    };
    let bytes = store::encode(&record);
    let view = store::decode_view(&bytes).unwrap();
    // An escaped name is unescaped (owned); the rest is borrowed from the JSON.
    assert_eq!(
        (&*view.workspace, &*view.name, &*view.key_id),
        ("ws", "c\"1", "k1")
    );
    assert!(matches!(view.name, std::borrow::Cow::Owned(_)));
    assert!(matches!(
        view.value.encrypted_config,
        std::borrow::Cow::Borrowed(_)
    ));
    assert_eq!(
        (view.value.enabled, view.version, view.oauth),
        (true, 7, record.oauth)
    );
    assert!(matches!(
        store::decode_view(b"{\"name\":1}"),
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn an_entry_past_its_ttl_or_invalidated_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, store) = vault(dir.path());
    vault.put("ws", "c", true, &fields("k")).await.unwrap();
    let reads = || store.reads.load(Ordering::SeqCst);
    let start = reads();
    let now = std::time::Instant::now();
    vault.lookup_at("ws", "c", now).await.unwrap();
    vault.lookup_at("ws", "c", now).await.unwrap();
    assert_eq!(reads() - start, 1, "the second lookup is a cache hit");
    // Past cache_ttl (60 s) the entry is stale: the next lookup reads the store, once.
    let later = now + Duration::from_secs(61);
    vault.lookup_at("ws", "c", later).await.unwrap();
    vault.lookup_at("ws", "c", later).await.unwrap();
    assert_eq!(reads() - start, 2);
    // Missed invalidations make every entry stale at once.
    vault.invalidate_all_fresh();
    vault.lookup_at("ws", "c", later).await.unwrap();
    vault.lookup_at("ws", "c", later).await.unwrap();
    assert_eq!(reads() - start, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_read_before_a_write_does_not_cache_the_old_value() {
    let dir = tempfile::tempdir().unwrap();
    let (vault, store) = vault(dir.path());
    vault
        .put("ws", "c", true, &fields("old-key"))
        .await
        .unwrap();
    let value = |state: &TenantState| match state {
        TenantState::Connected(f) => f.fields.get("api_key").unwrap().expose().to_string(),
        other => panic!("{other:?}"),
    };

    // A miss reads "old-key" and is held before it answers.
    let closed = store.gate.acquire_many(GATE_PERMITS).await.unwrap();
    let before = store.reads.load(Ordering::SeqCst);
    let in_flight = tokio::spawn({
        let vault = vault.clone();
        async move { vault.lookup("ws", "c").await }
    });
    while store.reads.load(Ordering::SeqCst) == before {
        tokio::task::yield_now().await;
    }
    // The key is replaced (and the entry invalidated) while that read is in flight.
    vault
        .put("ws", "c", true, &fields("new-key"))
        .await
        .unwrap();
    drop(closed);
    // The request that started before the write gets what it read...
    assert_eq!(value(&in_flight.await.unwrap().unwrap()), "old-key");
    // ...but the next one reads the new key, not a cached copy of the old.
    assert_eq!(value(&vault.lookup("ws", "c").await.unwrap()), "new-key");
}
