//! `[credentials]` as validated, and building what it describes: the keyring, the store and the
//! vault. Config calls these builders; nothing here reads the config snapshot.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;
use zeroize::Zeroizing;

use super::crypto::Keyring;
use super::store::now_unix;
use super::{Vault, VaultSettings, embedded, redis};

/// `[credentials] store`: which kind of store.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum Store {
    /// redb, one file on this machine.
    Embedded,
    /// A Redis server, or a Redis Cluster, shared by every replica.
    Redis,
}

/// Where sealed credentials live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Embedded { path: PathBuf },
    Redis { target: redis::RedisTarget },
}

/// Where the master keys come from (never the TOML itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File {
        path: PathBuf,
        create_if_missing: bool,
    },
    Env(String),
}

/// `[credentials]`.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub store: StoreKind,
    pub keys: KeySource,
    pub vault: VaultSettings,
}

/// Read the master keys from where the config says.
pub fn load_keyring(source: &KeySource) -> Result<Keyring, String> {
    match source {
        KeySource::Env(var) => {
            let text = Zeroizing::new(
                std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?,
            );
            Keyring::parse(&text).map_err(|e| format!("{var}: {e}"))
        }
        KeySource::File {
            path,
            create_if_missing,
        } => {
            if *create_if_missing && !path.exists() {
                create_key_file(path)?;
                warn!(path = %path.display(), "created a new master key file (credentials.create_key_file_if_missing); back it up: without it the stored credentials cannot be opened");
            }
            check_key_file_mode(path);
            let text = Zeroizing::new(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?,
            );
            Keyring::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
        }
    }
}

/// Write a new key file holding one fresh key, readable by its owner only.
pub fn create_key_file(path: &Path) -> Result<(), String> {
    let line = Keyring::generate_line(&format!("k{}", now_unix()))?;
    let text = Zeroizing::new(format!(
        "# sluice master keys: the first is active. Keep this file secret and backed up.\n{}\n",
        &*line
    ));
    crate::files::create_secret_file(path, text.as_bytes()).map_err(|e| format!("key file: {e}"))
}

fn check_key_file_mode(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            warn!(path = %path.display(), "the master key file is readable by group or others; chmod 600 it");
        }
    }
}

/// The vault the config describes, and the Redis store behind it when there is one (its
/// invalidation listener is started by the server, which knows what to do on each message).
pub async fn build_vault(
    creds: &Credentials,
) -> Result<(Arc<Vault>, Option<Arc<redis::RedisStore>>), String> {
    let keyring = load_keyring(&creds.keys)?;
    match &creds.store {
        StoreKind::Embedded { path } => {
            let store = Arc::new(embedded::EmbeddedStore::open(path)?);
            Ok((Arc::new(Vault::new(store, keyring, &creds.vault)), None))
        }
        StoreKind::Redis { target } => {
            let store = Arc::new(redis::RedisStore::new(target, creds.vault.read_timeout).await?);
            let vault = Arc::new(Vault::new(store.clone(), keyring, &creds.vault));
            Ok((vault, Some(store)))
        }
    }
}
