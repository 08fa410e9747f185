//! Connectors, org allowlists and workspaces through the admin API.
//!
//! A change is validated by building the whole snapshot it would produce (the TOML file plus
//! every stored definition plus the change); only a valid result is persisted and swapped in,
//! and other replicas are told to reload. Entries from the TOML file are read-only here.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Method, StatusCode};
use serde::Deserialize;
use tracing::{info, warn};

use super::{AdminState, ApiError, ApiResult, method_not_allowed, parse};
use crate::config::file::{ConnectorFile, OrgFile, WorkspaceFile};
use crate::config::{ConfigErrors, Definitions, Origin, Snapshot};
use crate::credential::store::CredentialStore;

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
                "ok"
            }
            FileReload::Unchanged => "unchanged",
            FileReload::Invalid(why) => {
                for line in why.lines() {
                    tracing::error!(reason = %line, "configuration reload refused; the previous configuration stays in force");
                }
                "invalid"
            }
        };
        crate::telemetry::METRICS
            .config_reloads
            .with_label_values(&[result])
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
                "connector" => defs.connectors.push(super::parse_json(&json).map_err(bad)?),
                "org" => defs.orgs.push(super::parse_json(&json).map_err(bad)?),
                "workspace" => defs.workspaces.push(super::parse_json(&json).map_err(bad)?),
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

/// `PUT /admin/orgs/{id}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgPut {
    allowed_domains: Option<Vec<String>>,
}

/// `PUT /admin/workspaces/{id}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspacePut {
    org: String,
}

#[derive(Clone, Copy)]
enum Kind {
    Connector,
    Org,
    Workspace,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Connector => "connector",
            Kind::Org => "org",
            Kind::Workspace => "workspace",
        }
    }
}

fn origin_of(snap: &Snapshot, kind: Kind, id: &str) -> Option<Origin> {
    match kind {
        Kind::Connector => snap.sources.connectors.get(id).map(|(o, _)| *o),
        Kind::Org => snap.sources.orgs.get(id).map(|(o, _)| *o),
        Kind::Workspace => snap.sources.workspaces.get(id).map(|(o, _)| *o),
    }
}

fn with_origin<T: serde::Serialize>(origin: Origin, value: &T) -> serde_json::Value {
    let mut v = serde_json::to_value(value).expect("definitions serialise");
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "source".into(),
            serde_json::to_value(origin).expect("serialises"),
        );
    }
    v
}

/// Apply `change` to the stored definitions, validate the result as a whole, then persist the
/// one changed entry and swap the snapshot in.
async fn apply(
    state: &AdminState,
    kind: Kind,
    id: &str,
    new: Option<Vec<u8>>,
    change: impl FnOnce(&mut Definitions),
) -> Result<(), ApiError> {
    let reloader = &state.reloader;
    if origin_of(&state.config.load(), kind, id) == Some(Origin::Toml) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "read_only",
            format!(
                "{} {id:?} is defined in the TOML file and is read-only here",
                kind.as_str()
            ),
        ));
    }
    let mut defs = reloader
        .load()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e))?;
    change(&mut defs);
    let next = reloader.build(&defs).map_err(|e| {
        let errors: Vec<String> = e
            .errors
            .iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect();
        ApiError::invalid(format!(
            "the change would make the configuration invalid: {}",
            errors.join("; ")
        ))
    })?;
    let store = reloader.store.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "no store",
        )
    })?;
    let persisted = match &new {
        Some(json) => store
            .put_definition(kind.as_str(), id, json)
            .await
            .map(|()| true),
        None => store.delete_definition(kind.as_str(), id).await,
    };
    let existed = persisted.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        )
    })?;
    if new.is_none() && !existed {
        return Err(ApiError::not_found(format!("no {} {id:?}", kind.as_str())));
    }
    state.config.store(Arc::new(next));
    store.publish_definitions_changed().await;
    info!(target: "sluice::audit", kind = kind.as_str(), id, change = if new.is_some() { "put" } else { "delete" }, "definition changed through the admin API");
    Ok(())
}

fn list<T: serde::Serialize>(name: &str, map: &BTreeMap<String, (Origin, T)>) -> ApiResult {
    let items: Vec<_> = map.values().map(|(o, v)| with_origin(*o, v)).collect();
    Ok((StatusCode::OK, serde_json::json!({ name: items })))
}

fn one<T: serde::Serialize>(
    kind: Kind,
    map: &BTreeMap<String, (Origin, T)>,
    id: &str,
) -> ApiResult {
    map.get(id)
        .map(|(o, v)| (StatusCode::OK, with_origin(*o, v)))
        .ok_or_else(|| ApiError::not_found(format!("no {} {id:?}", kind.as_str())))
}

/// Store `value` as the definition `id`, replacing any stored one.
async fn put<T: serde::Serialize>(
    state: &AdminState,
    kind: Kind,
    id: &str,
    value: &T,
    status: StatusCode,
    replace: impl FnOnce(&mut Definitions),
) -> ApiResult {
    let json = serde_json::to_vec(value).expect("definitions serialise");
    apply(state, kind, id, Some(json), replace).await?;
    Ok((status, with_origin(Origin::Api, value)))
}

async fn delete(
    state: &AdminState,
    kind: Kind,
    id: &str,
    remove: impl FnOnce(&mut Definitions),
) -> ApiResult {
    apply(state, kind, id, None, remove).await?;
    Ok((StatusCode::OK, serde_json::json!({ "deleted": true })))
}

pub(super) async fn route(
    state: &AdminState,
    method: &Method,
    segments: &[&str],
    body: &[u8],
) -> ApiResult {
    let snap = state.config.load_full();
    let sources = &snap.sources;
    match (method, segments) {
        // The spec's shape: POST /admin/connector creates.
        (&Method::POST, ["admin", "connector"]) => {
            let c: ConnectorFile = parse(body)?;
            let id = c.connector_id.clone();
            if sources.connectors.contains_key(&id) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "exists",
                    format!("connector {id:?} exists; PUT /admin/connectors/{id} replaces it"),
                ));
            }
            put(state, Kind::Connector, &id, &c, StatusCode::CREATED, |d| {
                d.connectors.push(c.clone())
            })
            .await
        }
        (&Method::GET, ["admin", "connectors"]) => list("connectors", &sources.connectors),
        (&Method::GET, ["admin", "orgs"]) => list("orgs", &sources.orgs),
        (&Method::GET, ["admin", "workspaces"]) => list("workspaces", &sources.workspaces),
        (&Method::GET, ["admin", "connectors", id]) => {
            one(Kind::Connector, &sources.connectors, id)
        }
        (&Method::GET, ["admin", "orgs", id]) => one(Kind::Org, &sources.orgs, id),
        (&Method::GET, ["admin", "workspaces", id]) => {
            one(Kind::Workspace, &sources.workspaces, id)
        }
        (&Method::PUT, ["admin", "connectors", id]) => {
            let c: ConnectorFile = parse(body)?;
            if c.connector_id != *id {
                return Err(ApiError::invalid(
                    "connector_id in the body must match the path",
                ));
            }
            put(state, Kind::Connector, id, &c, StatusCode::OK, |d| {
                d.connectors.retain(|x| x.connector_id != *id);
                d.connectors.push(c.clone());
            })
            .await
        }
        (&Method::PUT, ["admin", "orgs", id]) => {
            let p: OrgPut = parse(body)?;
            let org = OrgFile {
                org_id: id.to_string(),
                allowed_domains: p.allowed_domains,
            };
            put(state, Kind::Org, id, &org, StatusCode::OK, |d| {
                d.orgs.retain(|x| x.org_id != *id);
                d.orgs.push(org.clone());
            })
            .await
        }
        (&Method::PUT, ["admin", "workspaces", id]) => {
            let p: WorkspacePut = parse(body)?;
            let ws = WorkspaceFile {
                workspace_id: id.to_string(),
                org: p.org,
            };
            put(state, Kind::Workspace, id, &ws, StatusCode::OK, |d| {
                d.workspaces.retain(|x| x.workspace_id != *id);
                d.workspaces.push(ws.clone());
            })
            .await
        }
        (&Method::DELETE, ["admin", "connectors", id]) => {
            delete(state, Kind::Connector, id, |d| {
                d.connectors.retain(|x| x.connector_id != *id)
            })
            .await
        }
        (&Method::DELETE, ["admin", "orgs", id]) => {
            delete(state, Kind::Org, id, |d| d.orgs.retain(|x| x.org_id != *id)).await
        }
        (&Method::DELETE, ["admin", "workspaces", id]) => {
            delete(state, Kind::Workspace, id, |d| {
                d.workspaces.retain(|x| x.workspace_id != *id)
            })
            .await
        }
        (_, ["admin", "connectors" | "orgs" | "workspaces", _]) => Err(method_not_allowed()),
        _ => Err(ApiError::not_found("no such admin endpoint")),
    }
}
