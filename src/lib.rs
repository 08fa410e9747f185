//! sluice: an egress gateway for SaaS APIs, on pingora.
//!
//! `ARCHITECTURE.md` at the repository root has the request path, the module layers, the data
//! and error models, and how to add a connector feature. In request order:
//!
//! | module         | owns                                                                  |
//! |----------------|-----------------------------------------------------------------------|
//! | [`request`]    | 1. parse: request target, `Host`, routing headers, framing, stripping |
//! | [`caller`]     | 2. caller authentication and workspace scope                         |
//! | [`policy`]     | 3–4. connector, workspace, ports, allowlists, DNS, address classes    |
//! | [`credential`] | 5. sealed credentials: stores, keyring, cache, injection, OAuth       |
//! | [`ratelimit`]  | 6–8. pacing, shared budgets, circuit breakers, retry policy           |
//! | [`upstream`]   | 7. the pinned, verified TLS peer                                      |
//! | [`telemetry`]  | 9. metrics and their label enums                                      |
//! | [`logline`]    | 9. the access and audit line format                                   |
//! | [`logwriter`]  | 9. log lines to stderr in batches, off the request's thread            |
//! | [`logging`]    | 9. what may be logged: sluice's records, third-party ones held to INFO |
//! | [`proxy`]      | pingora's hooks, calling one phase module per step                    |
//! | [`ctx`]        | the per-request context                                               |
//! | [`action`]     | connector actions: URL template, inputs → the upstream request        |
//! | [`tunnel`]     | CONNECT: the tunnel's admission, requests inside it bound to it        |
//! | [`intercept`]  | TLS interception: sluice's CA, leaf certificates minted per SNI name  |
//! | [`outbound`]   | sluice's own HTTPS calls (OAuth), to vetted, pinned destinations      |
//! | [`config`]     | TOML → validated snapshot; reload                                     |
//! | [`error`]      | error codes → statuses and JSON bodies                                |
//! | [`label`]      | names of enums in config values, log fields and metric labels         |
//! | [`names`]      | host, authority and identifier grammar                                |
//! | [`files`]      | reading CA bundles and key files                                      |
//! | [`import`]     | `sluice connector import`: an OpenAPI 3.x document → a connector       |
//! | [`explain`]    | `sluice explain`: the policy decision for a URL, without sending      |
//! | [`server`]     | starting it: pingora `Server`, or a caller-bound listener             |
//! | [`admin`]      | the admin API: credentials, key rotation, connectors, orgs, workspaces |
//!
//! `unsafe` is forbidden in the library; the package denies it (`[lints]` in `Cargo.toml`),
//! and only the binary's global allocator (`src/allocator.rs`) is let off.

#![forbid(unsafe_code)]

pub mod action;
pub mod admin;
pub mod caller;
pub mod config;
pub mod credential;
pub mod ctx;
pub mod error;
pub mod explain;
pub mod fastmap;
pub mod files;
pub mod import;
pub mod intercept;
pub mod json;
pub mod label;
pub mod logging;
pub mod logline;
pub mod logwriter;
pub mod names;
pub mod outbound;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod request;
pub mod server;
pub mod telemetry;
pub mod tunnel;
pub mod upstream;
