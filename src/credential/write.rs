//! The vault's write side, for the admin API and the CLI: store, replace and delete records,
//! list them without values, and re-seal everything under a new key. Every write seals under
//! the active key and invalidates the record in every replica's cache.

use std::time::Duration;

use super::store::{self, CredentialRecord, RecordValue, StoreError, now_unix};
use super::{Connected, SecretFields, Vault, VaultError};

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
                let fields =
                    self.open(workspace, connector, &r.key_id, &r.value.encrypted_config)?;
                let connected = Connected::new(fields, r.version, r.oauth);
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
        Ok(Some(Connected::new(
            fields.clone(),
            record.version,
            Some(meta),
        )))
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
        let fields = self.open(workspace, connector, &r.key_id, &r.value.encrypted_config)?;
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
