//! Tenancy: `[[org]]`, `[[workspace]]` and `[[caller]]`, each checked against the ones
//! before it (a workspace's org exists, a caller's workspaces exist).

use std::collections::HashSet;
use std::sync::Arc;

use compact_str::CompactString;

use crate::fastmap::FastMap as HashMap;

use super::file::{CallerFile, OrgFile, WorkspaceFile};
use super::validate::{Errors, domain_list, sha256_hex};
use super::{Org, Workspace};
use crate::caller::{Caller, WorkspaceScope};
use crate::names::is_identifier;

/// `[[org]]`.
pub(super) fn orgs(errors: &mut Errors, raw: Vec<OrgFile>) -> HashMap<String, Org> {
    let mut orgs = HashMap::default();
    for (i, o) in raw.into_iter().enumerate() {
        let key = format!("org[{i}]");
        if !is_identifier(o.org_id.as_bytes()) {
            errors.push(
                format!("{key}.org_id"),
                format!("{:?} is not an identifier", o.org_id),
            );
        }
        let allowlist = o
            .allowed_domains
            .as_ref()
            .map(|d| domain_list(errors, &format!("org[{}].allowed_domains", o.org_id), d));
        let org = Org {
            id: o.org_id.clone(),
            allowlist,
        };
        if orgs.insert(o.org_id.clone(), org).is_some() {
            errors.push(
                format!("{key}.org_id"),
                format!("duplicate org_id {:?}", o.org_id),
            );
        }
    }
    orgs
}

/// `[[workspace]]`: each in an org that exists.
pub(super) fn workspaces(
    errors: &mut Errors,
    raw: Vec<WorkspaceFile>,
    orgs: &HashMap<String, Org>,
) -> HashMap<CompactString, Workspace> {
    let mut workspaces = HashMap::default();
    for (i, w) in raw.into_iter().enumerate() {
        let key = format!("workspace[{i}]");
        if !is_identifier(w.workspace_id.as_bytes()) {
            errors.push(
                format!("{key}.workspace_id"),
                format!("{:?} is not an identifier", w.workspace_id),
            );
        }
        if !orgs.contains_key(&w.org) {
            errors.push(
                format!("{key}.org"),
                format!("no [[org]] with org_id {:?}", w.org),
            );
        }
        let ws = Workspace {
            id: w.workspace_id.as_str().into(),
            org: w.org.into(),
        };
        if workspaces.insert(ws.id.clone(), ws).is_some() {
            errors.push(
                format!("{key}.workspace_id"),
                format!("duplicate workspace_id {:?}", w.workspace_id),
            );
        }
    }
    workspaces
}

/// `[[caller]]`: by the SHA-256 of their token, each token once.
pub(super) fn callers(
    errors: &mut Errors,
    raw: Vec<CallerFile>,
    workspaces: &HashMap<CompactString, Workspace>,
) -> HashMap<[u8; 32], Arc<Caller>> {
    let mut by_hash = HashMap::default();
    let mut names = HashSet::new();
    for (i, c) in raw.into_iter().enumerate() {
        let key = format!("caller[{i}]");
        if !is_identifier(c.name.as_bytes()) {
            errors.push(
                format!("{key}.name"),
                format!("{:?} is not an identifier", c.name),
            );
        } else if !names.insert(c.name.clone()) {
            errors.push(
                format!("{key}.name"),
                format!("duplicate caller {:?}", c.name),
            );
        }
        let hash = sha256_hex(&c.token_sha256);
        if hash.is_none() {
            errors.push(
                format!("{key}.token_sha256"),
                "must be 64 hex digits: the SHA-256 of the token (see `sluice caller-token`)",
            );
        }
        let scope = caller_scope(errors, &key, &c.workspaces, workspaces);
        if let Some(hash) = hash {
            let caller = Arc::new(Caller {
                name: c.name,
                scope,
            });
            if by_hash.insert(hash, caller).is_some() {
                errors.push(format!("{key}.token_sha256"), "two callers share one token");
            }
        }
    }
    by_hash
}

/// A caller's `workspaces`: `["*"]`, or workspaces that exist.
fn caller_scope(
    errors: &mut Errors,
    key: &str,
    listed: &[String],
    workspaces: &HashMap<CompactString, Workspace>,
) -> WorkspaceScope {
    if listed == ["*"] {
        return WorkspaceScope::All;
    }
    if listed.is_empty() {
        errors.push(
            format!("{key}.workspaces"),
            "must list workspaces, or [\"*\"] for all",
        );
    }
    for w in listed {
        if w == "*" {
            errors.push(format!("{key}.workspaces"), "\"*\" must be the only entry");
        } else if !workspaces.contains_key(w.as_str()) {
            errors.push(
                format!("{key}.workspaces"),
                format!("no [[workspace]] {w:?}"),
            );
        }
    }
    WorkspaceScope::Only(listed.iter().map(|w| w.as_str().into()).collect())
}
