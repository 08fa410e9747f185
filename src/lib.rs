//! sluice: an egress gateway for SaaS APIs, on pingora.
//!
//! # Layout
//!
//! The modules follow a request through the gateway (DESIGN.md §2):
//!
//! | module         | owns                                                                  |
//! |----------------|-----------------------------------------------------------------------|
//! | [`request`]    | 1. parse: request target, `Host`, routing headers, framing, stripping |
//! | [`caller`]     | 2. caller authentication and workspace scope                         |
//! | [`policy`]     | 3–4. connector, workspace, ports, allowlists, DNS, address classes    |
//! | [`credential`] | 5. sealed credentials: stores, keyring, cache, injection              |
//! | [`ratelimit`]  | 6. pacing: buckets learned from response headers, bounded FIFO wait   |
//! | [`upstream`]   | 7. the pinned, verified TLS peer                                      |
//! | [`intercept`]  | TLS interception: sluice's CA, leaf certificates minted per SNI name  |
//! | [`tunnel`]     | CONNECT: the tunnel's admission, requests inside it bound to it        |
//! | [`proxy`]      | pingora phase wiring                                                  |
//! | [`ctx`]        | the per-request context                                               |
//! | [`error`]      | error codes → statuses and JSON bodies                                |
//! | [`config`]     | TOML → validated snapshot                                             |
//! | [`outbound`]   | sluice's own HTTPS calls (OAuth), to vetted, pinned destinations      |
//! | [`explain`]    | `sluice explain`: the policy decision for a URL, without sending      |
//! | [`server`]     | starting it: pingora `Server`, or a caller-bound listener             |
//! | [`telemetry`]  | 9. metrics                                                            |
//! | [`logging`]    | 9. what may be logged: sluice's records, third-party ones held to INFO |
//! | [`logwriter`]  | 9. log lines to stderr in batches, off the request's thread            |
//! | [`admin`]      | the admin API: credentials, key rotation, connectors, orgs, workspaces |

#![forbid(unsafe_code)]

pub mod admin;
pub mod caller;
pub mod config;
pub mod credential;
pub mod ctx;
pub mod error;
pub mod explain;
pub mod files;
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
