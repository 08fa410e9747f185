//! Config reload: the live snapshot rebuilt from the config file (SIGHUP, file changes) and
//! from the store's definitions (admin API changes, here or in another replica). A candidate
//! is validated whole before it is swapped in; a bad one leaves the old snapshot in force and
//! says why. Requests in flight keep the snapshot they started with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use super::{ConfigErrors, Definitions, Origin, Snapshot};
use crate::credential::store::CredentialStore;
use crate::label::Label;
use crate::telemetry::ReloadResult;

/// How often the config file is checked for changes.
const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The config file is read and hashed at least this often (in polls) even when its metadata
/// did not move.
const FULL_CHECK_POLLS: u32 = 30;

/// What the watcher compares before reading the file: device, inode (a rename or a symlink
/// swap changes it), size, and modification and change times in nanoseconds (ctime moves on
/// every write and cannot be set back by the writer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// Rebuilds the live snapshot: from the config file (SIGHUP, file changes) and from the
/// store's definitions (admin API changes, here or in another replica). Every candidate is
/// validated whole before it is swapped in; requests in flight keep the snapshot they had.
pub struct Reloader {
    config: Arc<ArcSwap<Snapshot>>,
    store: Option<Arc<dyn CredentialStore>>,
    /// Serialises rebuilds: a file reload and a definitions reload never interleave.
    rebuild: tokio::sync::Mutex<()>,
}

/// What a file reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileReload {
    Applied { restart_needed: Vec<&'static str> },
    Unchanged,
    Invalid(String),
}

/// Settings a running sluice cannot change: they are reported, and take effect on restart.
fn restart_needed(old: &Snapshot, new: &Snapshot) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listener.address != new.listener.address {
        changed.push("listener.address");
    }
    if old.listener.threads != new.listener.threads {
        changed.push("listener.threads");
    }
    if old.listener.dev_mode_unauthenticated != new.listener.dev_mode_unauthenticated {
        changed.push("listener.dev_mode_unauthenticated");
    }
    if old.upstream.extra_ca_file != new.upstream.extra_ca_file {
        changed.push("upstream.extra_ca_file");
    }
    if old.upstream.pool_size != new.upstream.pool_size {
        changed.push("upstream.pool_size");
    }
    if old.credentials.as_ref().map(|c| (&c.store, &c.keys))
        != new.credentials.as_ref().map(|c| (&c.store, &c.keys))
    {
        changed.push("credentials");
    }
    if old.interception != new.interception {
        changed.push("interception");
    }
    if old.admin.as_ref().map(|a| (a.address, a.token_sha256))
        != new.admin.as_ref().map(|a| (a.address, a.token_sha256))
    {
        changed.push("admin");
    }
    changed
}

/// The admin-API definitions a snapshot holds.
fn api_definitions(snap: &Snapshot) -> Definitions {
    let api = |o: &Origin| *o == Origin::Api;
    Definitions {
        connectors: snap
            .sources
            .connectors
            .values()
            .filter(|(o, _)| api(o))
            .map(|(_, c)| c.clone())
            .collect(),
        orgs: snap
            .sources
            .orgs
            .values()
            .filter(|(o, _)| api(o))
            .map(|(_, c)| c.clone())
            .collect(),
        workspaces: snap
            .sources
            .workspaces
            .values()
            .filter(|(o, _)| api(o))
            .map(|(_, c)| c.clone())
            .collect(),
    }
}

impl Reloader {
    pub fn new(config: Arc<ArcSwap<Snapshot>>, store: Option<Arc<dyn CredentialStore>>) -> Self {
        Self {
            config,
            store,
            rebuild: tokio::sync::Mutex::new(()),
        }
    }

    /// The store definitions are kept in (`None`: no `[credentials]`).
    pub fn store(&self) -> Option<&dyn CredentialStore> {
        self.store.as_deref()
    }

    /// The config file this reloader reads.
    pub fn source(&self) -> std::path::PathBuf {
        self.config.load().source.clone()
    }

    /// The text of the configuration in force.
    pub fn current_text(&self) -> Arc<str> {
        self.config.load().toml_text.clone()
    }

    /// Re-read the config file; swap in the result only when it is valid.
    pub async fn reload_file(&self) -> FileReload {
        let _serial = self.rebuild.lock().await;
        let current = self.config.load_full();
        let outcome = match tokio::fs::read_to_string(&current.source).await {
            Err(e) => {
                FileReload::Invalid(format!("{}: cannot read: {e}", current.source.display()))
            }
            Ok(text) if *text == *current.toml_text => FileReload::Unchanged,
            Ok(text) => {
                match Snapshot::from_toml_with(&text, &current.source, &api_definitions(&current)) {
                    Err(errors) => FileReload::Invalid(errors.to_string()),
                    Ok(mut next) => {
                        let restart_needed = restart_needed(&current, &next);
                        // What cannot change live keeps its running value.
                        next.listener.address = current.listener.address;
                        self.config.store(Arc::new(next));
                        FileReload::Applied { restart_needed }
                    }
                }
            }
        };
        let result = match &outcome {
            FileReload::Applied { restart_needed } => {
                info!(file = %current.source.display(), "configuration reloaded");
                if !restart_needed.is_empty() {
                    warn!(settings = ?restart_needed, "changed settings that take effect only after a restart");
                }
                ReloadResult::Ok
            }
            FileReload::Unchanged => ReloadResult::Unchanged,
            FileReload::Invalid(why) => {
                for line in why.lines() {
                    tracing::error!(reason = %line, "configuration reload refused; the previous configuration stays in force");
                }
                ReloadResult::Invalid
            }
        };
        crate::telemetry::METRICS
            .config_reloads
            .with_label_values(&[result.as_label()])
            .inc();
        outcome
    }

    /// The definitions currently in the store.
    pub async fn load(&self) -> Result<Definitions, String> {
        let Some(store) = &self.store else {
            return Ok(Definitions::default());
        };
        let mut defs = Definitions::default();
        for (kind, id, json) in store.list_definitions().await.map_err(|e| e.to_string())? {
            let bad = |e: String| format!("stored {kind} {id:?} does not parse: {e}");
            match kind.as_str() {
                "connector" => defs
                    .connectors
                    .push(crate::json::parse_json(&json).map_err(bad)?),
                "org" => defs.orgs.push(crate::json::parse_json(&json).map_err(bad)?),
                "workspace" => defs
                    .workspaces
                    .push(crate::json::parse_json(&json).map_err(bad)?),
                _ => warn!(kind, id, "ignoring a stored definition of unknown kind"),
            }
        }
        defs.connectors
            .sort_by(|a, b| a.connector_id.cmp(&b.connector_id));
        defs.orgs.sort_by(|a, b| a.org_id.cmp(&b.org_id));
        defs.workspaces
            .sort_by(|a, b| a.workspace_id.cmp(&b.workspace_id));
        Ok(defs)
    }

    /// The snapshot the current TOML text and `defs` make, or every reason it is invalid.
    pub fn build(&self, defs: &Definitions) -> Result<Snapshot, ConfigErrors> {
        let current = self.config.load();
        let mut next = Snapshot::from_toml_with(&current.toml_text, &current.source, defs)?;
        // The listener actually bound (tests bind port 0) is not the file's to change.
        next.listener.address = current.listener.address;
        Ok(next)
    }

    /// Reload definitions from the store and swap the snapshot.
    pub async fn reload(&self) -> Result<(), String> {
        let _serial = self.rebuild.lock().await;
        let defs = self.load().await?;
        let next = self.build(&defs).map_err(|e| e.to_string())?;
        self.config.store(Arc::new(next));
        info!("definitions reloaded from the store");
        Ok(())
    }

    /// Reload now, and keep retrying in the background while the store is unavailable.
    pub async fn reload_or_retry(self: &Arc<Self>) {
        if let Err(e) = self.reload().await {
            warn!(error = %e, "cannot load definitions from the store yet; retrying in the background");
            let me = self.clone();
            tokio::spawn(async move {
                let mut delay = std::time::Duration::from_millis(100);
                loop {
                    tokio::time::sleep(delay).await;
                    match me.reload().await {
                        Ok(()) => return,
                        Err(e) => warn!(error = %e, "still cannot load definitions"),
                    }
                    delay = (delay * 2).min(std::time::Duration::from_secs(5));
                }
            });
        }
    }
}

/// Reload the config file on SIGHUP, and when its content changes (polled, debounced: a new
/// content must be the same on two consecutive polls, so a half-written file is not tried).
/// Polling rather than inotify also follows atomic renames and Kubernetes' symlink swaps.
pub fn watch_config(reloader: Arc<Reloader>) {
    let on_hup = reloader.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; config reloads only on file changes");
                return;
            }
        };
        while hup.recv().await.is_some() {
            on_hup.reload_file().await;
        }
    });
    tokio::spawn(async move {
        let path = reloader.source();
        let digest = |text: &[u8]| -> [u8; 32] {
            use sha2::Digest;
            sha2::Sha256::digest(text).into()
        };
        let mut applied = digest(reloader.current_text().as_bytes());
        let mut candidate = None;
        // The file is read and hashed only when its metadata moved (or a candidate waits for
        // its second look), plus once every FULL_CHECK_POLLS polls in case a write kept size
        // and timestamps within the filesystem's timestamp granularity. Reading and hashing a
        // config of thousands of workspaces every second cost more than it needs to.
        let mut seen_meta = None;
        let mut polls_since_read = 0u32;
        loop {
            tokio::time::sleep(CONFIG_POLL).await;
            let meta = tokio::fs::metadata(&path)
                .await
                .ok()
                .map(|m| FileStamp::of(&m));
            polls_since_read += 1;
            if candidate.is_none()
                && meta.is_some()
                && meta == seen_meta
                && polls_since_read < FULL_CHECK_POLLS
            {
                continue;
            }
            let Ok(text) = tokio::fs::read(&path).await else {
                continue;
            };
            seen_meta = meta;
            polls_since_read = 0;
            let seen = digest(&text);
            if seen == applied {
                candidate = None;
            } else if candidate == Some(seen) {
                reloader.reload_file().await;
                // Tried once per content: an invalid file is not retried until it changes.
                applied = seen;
                candidate = None;
            } else {
                candidate = Some(seen);
            }
        }
    });
}
