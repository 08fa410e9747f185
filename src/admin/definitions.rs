//! Connectors, org allowlists and workspaces through the admin API.
//!
//! A change is validated by building the whole snapshot it would produce (the TOML file plus
//! every stored definition plus the change); only a valid result is persisted and swapped in,
//! and other replicas are told to reload. Entries from the TOML file are read-only here.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, StatusCode};
use serde::Deserialize;
use tracing::info;

use super::{AdminState, ApiError, ApiResult, method_not_allowed, parse};
use crate::config::file::{ConnectorFile, OrgFile, WorkspaceFile};
use crate::config::{Definitions, Origin, Snapshot};

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
    let store = reloader.store().ok_or_else(|| {
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
