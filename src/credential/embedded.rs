//! The embedded store: redb, a single-file, crash-safe, pure-Rust database. For one machine and
//! development; nothing to run beside sluice. redb is synchronous, so every operation runs on
//! tokio's blocking pool and the request path never blocks on disk.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};

use super::store::{CredentialRecord, CredentialStore, StoreError, decode, encode};

const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
/// Admin-API definitions keyed `kind/id`.
const DEFINITIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("definitions");

/// Records keyed `workspace/connector` (neither identifier can contain `/`).
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Pending OAuth authorizations live only in memory: one process, minutes of life.
    pending: moka::sync::Cache<String, Arc<Vec<u8>>>,
    /// Refresh locks: key → (fencing token, expiry). One process, so memory is the truth.
    locks: std::sync::Mutex<std::collections::HashMap<String, (u64, std::time::Instant)>>,
    fences: std::sync::atomic::AtomicU64,
}

fn key(workspace: &str, connector: &str) -> String {
    format!("{workspace}/{connector}")
}

fn failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {e}"))
}

impl EmbeddedStore {
    /// Open (or create) the database file. Only one process may hold it open.
    pub fn open(path: &Path) -> Result<Self, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let db = Database::create(path)
            .map_err(|e| format!("cannot open the embedded store {}: {e}", path.display()))?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.open_table(CREDENTIALS).map_err(|e| e.to_string())?;
        txn.open_table(DEFINITIONS).map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())?;
        Ok(Self {
            db: Arc::new(db),
            pending: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(std::time::Duration::from_secs(3600))
                .build(),
            locks: std::sync::Mutex::new(std::collections::HashMap::new()),
            fences: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Insert or replace `key` in `table`, in its own transaction.
    async fn insert(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(failed)?;
            {
                let mut t = txn.open_table(table).map_err(failed)?;
                t.insert(key.as_str(), value.as_slice()).map_err(failed)?;
            }
            txn.commit().map_err(failed)
        })
        .await
    }

    /// Remove `key` from `table`; `true` when it existed.
    async fn remove(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
        key: String,
    ) -> Result<bool, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(failed)?;
            let existed = {
                let mut t = txn.open_table(table).map_err(failed)?;
                let removed = t.remove(key.as_str()).map_err(failed)?;
                removed.is_some()
            };
            txn.commit().map_err(failed)?;
            Ok(existed)
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || op(&db))
            .await
            .map_err(failed)?
    }
}

#[async_trait]
impl CredentialStore for EmbeddedStore {
    async fn get_encoded(
        &self,
        workspace: &str,
        connector: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let k = key(workspace, connector);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(failed)?;
            let table = txn.open_table(CREDENTIALS).map_err(failed)?;
            let value = table.get(k.as_str()).map_err(failed)?;
            Ok(value.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn put(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        self.insert(
            CREDENTIALS,
            key(&record.workspace, &record.name),
            encode(record),
        )
        .await
    }

    async fn delete(&self, workspace: &str, connector: &str) -> Result<bool, StoreError> {
        self.remove(CREDENTIALS, key(workspace, connector)).await
    }

    async fn list_definitions(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(failed)?;
            let table = txn.open_table(DEFINITIONS).map_err(failed)?;
            let mut out = Vec::new();
            for item in table.iter().map_err(failed)? {
                let (k, v) = item.map_err(failed)?;
                if let Some((kind, id)) = k.value().split_once('/') {
                    out.push((kind.to_string(), id.to_string(), v.value().to_vec()));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn put_definition(&self, kind: &str, id: &str, json: &[u8]) -> Result<(), StoreError> {
        self.insert(DEFINITIONS, key(kind, id), json.to_vec()).await
    }

    async fn delete_definition(&self, kind: &str, id: &str) -> Result<bool, StoreError> {
        self.remove(DEFINITIONS, key(kind, id)).await
    }

    async fn acquire_refresh_lock(
        &self,
        workspace: &str,
        connector: &str,
        ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        let now = std::time::Instant::now();
        let mut locks = self.locks.lock().expect("lock table");
        let k = key(workspace, connector);
        if locks.get(&k).is_some_and(|(_, until)| *until > now) {
            return Ok(None);
        }
        let fence = self
            .fences
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        locks.insert(k, (fence, now + ttl));
        Ok(Some(fence))
    }

    async fn put_fenced(&self, record: &CredentialRecord, fence: u64) -> Result<bool, StoreError> {
        let held = {
            let locks = self.locks.lock().expect("lock table");
            locks
                .get(&key(&record.workspace, &record.name))
                .is_some_and(|(f, until)| *f == fence && *until > std::time::Instant::now())
        };
        if !held {
            return Ok(false);
        }
        self.put(record).await.map(|()| true)
    }

    async fn release_refresh_lock(&self, workspace: &str, connector: &str, fence: u64) {
        let mut locks = self.locks.lock().expect("lock table");
        let k = key(workspace, connector);
        if locks.get(&k).is_some_and(|(f, _)| *f == fence) {
            locks.remove(&k);
        }
    }

    async fn put_pending_authorization(
        &self,
        state: &str,
        payload: &[u8],
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        // The cache's own TTL bounds memory; the payload carries its own deadline too.
        let mut stamped = (std::time::SystemTime::now() + ttl)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .to_be_bytes()
            .to_vec();
        stamped.extend_from_slice(payload);
        self.pending.insert(state.to_string(), Arc::new(stamped));
        Ok(())
    }

    async fn take_pending_authorization(&self, state: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(stamped) = self.pending.remove(state) else {
            return Ok(None);
        };
        let (deadline, payload) = stamped.split_at(8);
        let deadline = u64::from_be_bytes(deadline.try_into().expect("8 bytes"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(u64::MAX, |d| d.as_millis() as u64);
        Ok((now <= deadline).then(|| payload.to_vec()))
    }

    async fn list(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        self.blocking(|db| {
            let txn = db.begin_read().map_err(failed)?;
            let table = txn.open_table(CREDENTIALS).map_err(failed)?;
            let mut out = Vec::new();
            for item in table.iter().map_err(failed)? {
                let (_, v) = item.map_err(failed)?;
                out.push(decode(v.value())?);
            }
            Ok(out)
        })
        .await
    }
}
