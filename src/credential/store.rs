//! Where sealed credential records live: one trait, two stores.
//!
//! * [`crate::credential::embedded::EmbeddedStore`]: redb, one file, one machine, no server.
//! * [`crate::credential::redis::RedisStore`]: Redis (or Redis Cluster) shared by replicas,
//!   which also carries cache invalidations between them over pub/sub.
//!
//! Stores hold only sealed records: a store dump reveals which workspaces use which connectors
//! and the names of their fields, never a value.

use std::borrow::Cow;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// The spec's settings record (`group = "connector"`, `name = connector_id`), plus what
/// sluice needs to manage it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub group: String,
    /// The connector id.
    pub name: String,
    pub workspace: String,
    pub value: RecordValue,
    /// The master key the ciphertext is sealed under.
    pub key_id: String,
    /// Incremented on every write.
    pub version: u64,
    /// Names of the configured fields (metadata; values are only in the ciphertext).
    pub fields: Vec<String>,
    /// Unix seconds.
    pub created_at: u64,
    pub updated_at: u64,
    /// OAuth 2.0 token state (non-secret): set for oauth2 connectors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<OAuthMeta>,
}

/// What sluice knows about an OAuth token without opening the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OAuthMeta {
    /// When the access token expires (unix seconds).
    pub expires_at: u64,
    /// The provider refused the refresh token (`invalid_grant`): no refresh is attempted
    /// until the workspace connects again.
    pub needs_reauthorization: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordValue {
    /// `false`: the workspace opted out of this connector.
    pub enabled: bool,
    /// base64(nonce ‖ AES-256-GCM ciphertext ‖ tag) of the JSON object of fields.
    pub encrypted_config: String,
}

impl CredentialRecord {
    pub fn connector(&self) -> &str {
        &self.name
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (Redis down, timeout). Requests may be served from cache.
    #[error("credential store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with something sluice cannot use.
    #[error("credential store error: {0}")]
    Corrupt(String),
}

/// The operations every store offers. Implementations must not block the async runtime.
#[async_trait]
pub trait CredentialStore: Send + Sync {
    /// The record for (workspace, connector), if any, as stored: its JSON.
    async fn get_encoded(
        &self,
        workspace: &str,
        connector: &str,
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// `true` when every read answers within the store's own deadline (an error, not a hang,
    /// when it runs out), so the vault need not set a second timer around it.
    fn bounds_reads(&self) -> bool {
        false
    }

    /// The record for (workspace, connector), if any.
    async fn get(
        &self,
        workspace: &str,
        connector: &str,
    ) -> Result<Option<CredentialRecord>, StoreError> {
        let bytes = self.get_encoded(workspace, connector).await?;
        bytes.map(|b| decode(&b)).transpose()
    }

    /// Insert or replace a record.
    async fn put(&self, record: &CredentialRecord) -> Result<(), StoreError>;

    /// Remove a record; `true` when one existed.
    async fn delete(&self, workspace: &str, connector: &str) -> Result<bool, StoreError>;

    /// Every record (admin listing, key rotation).
    async fn list(&self) -> Result<Vec<CredentialRecord>, StoreError>;

    /// Tell every other replica to drop its cached copy of (workspace, connector). Stores with
    /// a single process (embedded) have nobody to tell.
    async fn publish_invalidation(&self, _workspace: &str, _connector: &str) {}

    /// Definitions created through the admin API: (kind, id, JSON). Kinds are `connector`,
    /// `org` and `workspace`.
    async fn list_definitions(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError>;

    async fn put_definition(&self, kind: &str, id: &str, json: &[u8]) -> Result<(), StoreError>;

    async fn delete_definition(&self, kind: &str, id: &str) -> Result<bool, StoreError>;

    /// Tell every other replica to reload the definitions.
    async fn publish_definitions_changed(&self) {}

    /// Take the cross-replica lock for refreshing (workspace, connector)'s OAuth token.
    /// `Some(fence)`: held, with a fencing token that increases with every acquisition;
    /// `None`: another replica holds it. Single-process stores always grant it.
    async fn acquire_refresh_lock(
        &self,
        _workspace: &str,
        _connector: &str,
        _ttl: std::time::Duration,
    ) -> Result<Option<u64>, StoreError> {
        Ok(Some(0))
    }

    /// Write `record` only while `fence` still holds the refresh lock. `false`: lost it.
    async fn put_fenced(&self, record: &CredentialRecord, _fence: u64) -> Result<bool, StoreError> {
        self.put(record).await.map(|()| true)
    }

    /// Release the refresh lock if `fence` still holds it.
    async fn release_refresh_lock(&self, _workspace: &str, _connector: &str, _fence: u64) {}

    /// Keep a pending OAuth authorization (`state` → sealed payload) for `ttl`.
    async fn put_pending_authorization(
        &self,
        state: &str,
        payload: &[u8],
        ttl: std::time::Duration,
    ) -> Result<(), StoreError>;

    /// Take (and delete) a pending authorization: each `state` works once.
    async fn take_pending_authorization(&self, state: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

pub(crate) fn encode(record: &CredentialRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("a record serialises")
}

pub(crate) fn decode(bytes: &[u8]) -> Result<CredentialRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("undecodable record: {e}")))
}

/// What the request path needs of a stored record, borrowed from its JSON: a cold read
/// parses it without allocating a string per field. Other fields are skipped.
#[derive(Debug, Deserialize)]
pub(crate) struct RecordView<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    #[serde(borrow)]
    pub workspace: Cow<'a, str>,
    #[serde(borrow)]
    pub value: RecordValueView<'a>,
    #[serde(borrow)]
    pub key_id: Cow<'a, str>,
    pub version: u64,
    #[serde(default)]
    pub oauth: Option<OAuthMeta>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RecordValueView<'a> {
    pub enabled: bool,
    #[serde(borrow)]
    pub encrypted_config: Cow<'a, str>,
}

pub(crate) fn decode_view(bytes: &[u8]) -> Result<RecordView<'_>, StoreError> {
    // UTF-8 checked once for the whole record: `from_slice` checks every string it meets
    // with a call of its own (~17 per record, ~1,400 instructions per cold read).
    let corrupt =
        |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("undecodable record: {e}"));
    let text = std::str::from_utf8(bytes).map_err(|e| corrupt(&e))?;
    serde_json::from_str(text).map_err(|e| corrupt(&e))
}
