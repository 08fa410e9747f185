//! The Redis store, shared by every replica.
//!
//! Key layout (Redis Cluster safe: no command touches two keys):
//!
//! | key                                   | type   | holds                                   |
//! |---------------------------------------|--------|-----------------------------------------|
//! | `sluice:cred:{<workspace>}:<connector>` | string | the JSON record                         |
//! | `sluice:cred:{<workspace>}:connectors`  | set    | the workspace's connector ids (listing) |
//! | `sluice:cred:workspaces`                | set    | workspaces with any record (listing)    |
//!
//! | `sluice:oauth:{<workspace>}:<connector>:lock`  | string | refresh lock holder's fencing token |
//! | `sluice:oauth:{<workspace>}:<connector>:fence` | int    | fencing token counter                |
//! | `sluice:oauth:pending:<state>`          | string | a pending authorization (TTL)           |
//!
//! The `{<workspace>}` hash tag keeps one workspace's keys in one slot, so the fenced write (a
//! script over the lock and the record) is Cluster-safe. Listing tolerates index
//! entries whose record is gone (a delete between the two commands).
//!
//! Admin-API definitions live in one hash per kind, `sluice:defs:<kind>` (field = id, value =
//! JSON).
//!
//! Invalidations travel on the channel `sluice:cred:invalidate` as
//! `workspace/connector#origin`, or `!definitions` when definitions changed. `origin` names the
//! replica that wrote: it dropped its own copy already, so it ignores its own message (and
//! keeps the new copy it may have cached meanwhile, which an outage may need). A message
//! without `#origin` (an older replica) is always applied. After
//! the subscription reconnects, a replica may have missed messages, so it drops its whole
//! fresh cache.
//!
//! One server (`redis_url`) or a Redis Cluster (`redis_cluster`): [`conn::RedisConn`] is
//! either, and every command below works on both. In a cluster the client follows `MOVED` and
//! `ASK` and refreshes its slot map; the invalidation subscription connects to any one node
//! (a cluster carries `PUBLISH` to subscribers on every node) and moves to the next seed node
//! when its node goes away.
//!
//! The connection reconnects by itself; sluice also starts when Redis is down and connects
//! once it is up, answering `credential_store_unavailable` (or from cache) meanwhile.
//!
//! Every call is bounded by `credentials.read_timeout_ms` as a whole: while Redis is down the
//! connection manager would hold a command until it reconnects (seconds, then send it late),
//! so a caller gets `Unavailable` at the deadline instead and the command, dropped before it
//! was written, never reaches the Redis that comes back. (The cluster client drops a queued
//! command whose caller has gone, before sending it; its retries are few and short.) A record
//! and its workspace's index are written by one script (they share a slot), so the write is
//! all or nothing on a single server and on a cluster alike; the global workspace listing is
//! added to first, and listing tolerates a workspace whose records are not there.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::AsyncCommands;
use tracing::{info, warn};

use super::store::{CredentialRecord, CredentialStore, StoreError, decode, encode};

mod conn;
mod local;
pub use conn::{RedisConn, RedisTarget};

const CHANNEL: &str = "sluice:cred:invalidate";
const WORKSPACES: &str = "sluice:cred:workspaces";

fn record_key(workspace: &str, connector: &str) -> String {
    // Built by hand: every cold read makes one, and `format!` costs more than the copies.
    const PREFIX: &str = "sluice:cred:{";
    let mut key = String::with_capacity(PREFIX.len() + workspace.len() + connector.len() + 2);
    key.push_str(PREFIX);
    key.push_str(workspace);
    key.push_str("}:");
    key.push_str(connector);
    key
}

/// `GET key`, its buffers sized up front (`redis::cmd` grows them argument by argument).
fn get_cmd(key: &str) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(2, 3 + key.len());
    cmd.arg("GET").arg(key);
    cmd
}

fn lock_key(workspace: &str, connector: &str) -> String {
    format!("sluice:oauth:{{{workspace}}}:{connector}:lock")
}

fn fence_key(workspace: &str, connector: &str) -> String {
    format!("sluice:oauth:{{{workspace}}}:{connector}:fence")
}

/// Write the record only while the lock holds our fencing token.
const PUT_FENCED: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0";

/// A record and its workspace's index, in one step (one slot: the workspace's hash tag).
/// KEYS: record, index. ARGV: the record, the connector id.
const PUT_RECORD: &str = r"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1";

/// The record and its index entry gone, in one step. Returns how many records were deleted.
/// KEYS: record, index. ARGV: the connector id.
const DELETE_RECORD: &str = r"
local removed = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return removed";

/// Delete the lock only if it still holds our fencing token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

fn index_key(workspace: &str) -> String {
    format!("sluice:cred:{{{workspace}}}:connectors")
}

/// What another replica told this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation<'a> {
    /// One credential changed.
    Credential(&'a str, &'a str),
    /// Messages may have been missed: drop every fresh cache entry and reload definitions.
    Everything,
    /// Definitions changed: reload them.
    Definitions,
}

/// What a replica does when told something changed.
pub type Invalidator = Arc<dyn Fn(Invalidation<'_>) + Send + Sync>;

const DEFINITIONS_CHANGED: &str = "!definitions";

fn definitions_key(kind: &str) -> String {
    format!("sluice:defs:{kind}")
}

const DEFINITION_KINDS: [&str; 3] = ["connector", "org", "workspace"];

pub struct RedisStore {
    /// For the invalidation subscription: every URL given, tried in turn.
    pubsub: Vec<redis::Client>,
    /// This replica's name on the invalidation channel (random per process).
    origin: Arc<str>,
    conn: Arc<ArcSwapOption<RedisConn>>,
    /// Credential reads on the worker thread's own connection (one server only).
    local: Option<local::LocalReads>,
    /// Bounds every call: the connection manager's own reconnect backoff must not stall a
    /// request or an admin call while Redis is down.
    timeout: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

impl RedisStore {
    /// Connect, waiting at most `timeout`. When Redis is not reachable, keep trying in the
    /// background; operations fail as unavailable until the first connection succeeds.
    pub async fn new(target: &RedisTarget, timeout: Duration) -> Result<Self, String> {
        let pubsub = target.pubsub_clients()?;
        let conn = Arc::new(ArcSwapOption::empty());
        let store = Self {
            pubsub,
            origin: format!("{:016x}", rand::random::<u64>()).into(),
            conn: conn.clone(),
            local: local::LocalReads::new(target, timeout)?,
            timeout,
        };
        if let Ok(Ok(first)) = tokio::time::timeout(timeout, target.connect(timeout)).await {
            conn.store(Some(Arc::new(first)));
            return Ok(store);
        }
        warn!("redis not reachable at startup; serving from TOML definitions until it is");
        let target = target.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                match target.connect(timeout).await {
                    Ok(connected) => {
                        conn.store(Some(Arc::new(connected)));
                        info!("connected to redis");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "redis not reachable yet; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        Ok(store)
    }

    /// The current connection (a cheap clone), for other Redis users that share this one
    /// (the shared rate-limit budgets), or `Unavailable` before the first connection.
    pub fn conn(&self) -> Result<RedisConn, StoreError> {
        self.conn
            .load()
            .as_deref()
            .cloned()
            .ok_or_else(|| unavailable("not connected"))
    }

    /// Run `call` (one or more commands) within the store's timeout. At the deadline the
    /// future is dropped: a command still waiting for a connection is never sent.
    pub async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.bounded_from(tokio::time::Instant::now(), call).await
    }

    /// [`RedisStore::bounded`], for a call that started at `start` (a read that first tried
    /// the thread's own connection gives the shared one only what is left).
    async fn bounded_from<T>(
        &self,
        start: tokio::time::Instant,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout_at(start + self.timeout, call).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(unavailable(format_args!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Listen for invalidations from other replicas until the process ends.
    pub fn start_invalidation_listener(&self, on_invalidate: Invalidator) {
        let clients = self.pubsub.clone();
        let origin = self.origin.clone();
        tokio::spawn(async move {
            let mut first = true;
            // The seed nodes in turn: a cluster node that went away is replaced by the next.
            for client in clients.iter().cycle() {
                let mut pubsub = match client.get_async_pubsub().await {
                    Ok(p) => p,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                if pubsub.subscribe(CHANNEL).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                if !first {
                    // Messages may have been missed while disconnected.
                    on_invalidate(Invalidation::Everything);
                }
                first = false;
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if payload == DEFINITIONS_CHANGED {
                        on_invalidate(Invalidation::Definitions);
                        continue;
                    }
                    let (change, from) = match payload.rsplit_once('#') {
                        Some((change, from)) => (change, Some(from)),
                        None => (payload.as_str(), None),
                    };
                    if from == Some(&*origin) {
                        continue;
                    }
                    if let Some((ws, conn)) = change.split_once('/') {
                        on_invalidate(Invalidation::Credential(ws, conn));
                    }
                }
                warn!("redis invalidation subscription lost; resubscribing");
            }
        });
    }
}

#[async_trait]
impl CredentialStore for RedisStore {
    /// Every call goes through [`RedisStore::bounded`], which the vault's read timeout sets.
    fn bounds_reads(&self) -> bool {
        true
    }

    async fn get_encoded(
        &self,
        workspace: &str,
        connector: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = record_key(workspace, connector);
        // The thread's own connection first, within half the deadline; the shared one if it
        // has none or it failed, within what is left. One clock read and one timer on the
        // usual path: the local read's own timer bounds it (BENCHMARKS.md, ninth round). The
        // shared handle is cloned only when it is used.
        let start = tokio::time::Instant::now();
        if let Some(local) = &self.local
            && let Some(bytes) = local.get(&key, start).await
        {
            return Ok(bytes);
        }
        let mut conn = self.conn()?;
        self.bounded_from(start, get_cmd(&key).query_async(&mut conn))
            .await
    }

    async fn put(&self, record: &CredentialRecord) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        self.bounded(async move {
            // The listing first: a workspace listed without records is tolerated, a record
            // that no listing finds is not.
            let _: i64 = conn.sadd(WORKSPACES, &record.workspace).await?;
            let script = redis::Script::new(PUT_RECORD);
            let mut invocation = script.key(record_key(&record.workspace, &record.name));
            invocation
                .key(index_key(&record.workspace))
                .arg(encode(record))
                .arg(&record.name);
            invocation.invoke_async::<i64>(&mut conn).await.map(drop)
        })
        .await
    }

    async fn delete(&self, workspace: &str, connector: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let script = redis::Script::new(DELETE_RECORD);
        let mut invocation = script.key(record_key(workspace, connector));
        invocation.key(index_key(workspace)).arg(connector);
        let removed: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(removed > 0)
    }

    async fn list(&self) -> Result<Vec<CredentialRecord>, StoreError> {
        let mut conn = self.conn()?;
        let blobs = self
            .bounded(async move {
                let workspaces: Vec<String> = conn.smembers(WORKSPACES).await?;
                let mut blobs = Vec::new();
                for ws in workspaces {
                    let connectors: Vec<String> = conn.smembers(index_key(&ws)).await?;
                    for c in connectors {
                        let bytes: Option<Vec<u8>> = conn.get(record_key(&ws, &c)).await?;
                        blobs.extend(bytes);
                    }
                }
                Ok(blobs)
            })
            .await?;
        blobs.iter().map(|b| decode(b)).collect()
    }

    async fn list_definitions(&self) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let mut conn = self.conn()?;
        self.bounded(async move {
            let mut out = Vec::new();
            for kind in DEFINITION_KINDS {
                let all: std::collections::HashMap<String, Vec<u8>> =
                    conn.hgetall(definitions_key(kind)).await?;
                out.extend(
                    all.into_iter()
                        .map(|(id, json)| (kind.to_string(), id, json)),
                );
            }
            Ok(out)
        })
        .await
    }

    async fn put_definition(&self, kind: &str, id: &str, json: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        let _: i64 = self
            .bounded(conn.hset(definitions_key(kind), id, json))
            .await?;
        Ok(())
    }

    async fn delete_definition(&self, kind: &str, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let removed: i64 = self.bounded(conn.hdel(definitions_key(kind), id)).await?;
        Ok(removed > 0)
    }

    async fn publish_definitions_changed(&self) {
        if let Ok(mut conn) = self.conn() {
            let sent: Result<i64, _> = self
                .bounded(conn.publish(CHANNEL, DEFINITIONS_CHANGED))
                .await;
            if let Err(e) = sent {
                warn!(error = %e, "cannot publish a definitions change");
            }
        }
    }

    async fn acquire_refresh_lock(
        &self,
        workspace: &str,
        connector: &str,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let mut conn = self.conn()?;
        self.bounded(async move {
            let fence: u64 = conn.incr(fence_key(workspace, connector), 1).await?;
            let acquired: Option<String> = redis::cmd("SET")
                .arg(lock_key(workspace, connector))
                .arg(fence)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            Ok(acquired.map(|_| fence))
        })
        .await
    }

    async fn put_fenced(&self, record: &CredentialRecord, fence: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn()?;
        let script = redis::Script::new(PUT_FENCED);
        let mut invocation = script.key(lock_key(&record.workspace, &record.name));
        invocation
            .key(record_key(&record.workspace, &record.name))
            .arg(fence)
            .arg(encode(record));
        let written: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(written == 1)
    }

    async fn release_refresh_lock(&self, workspace: &str, connector: &str, fence: u64) {
        if let Ok(mut conn) = self.conn() {
            let script = redis::Script::new(RELEASE);
            let mut invocation = script.key(lock_key(workspace, connector));
            invocation.arg(fence);
            let _: Result<i64, _> = self.bounded(invocation.invoke_async(&mut conn)).await;
        }
    }

    async fn put_pending_authorization(
        &self,
        state: &str,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn()?;
        self.bounded(conn.pset_ex(
            format!("sluice:oauth:pending:{state}"),
            payload,
            ttl.as_millis() as u64,
        ))
        .await
    }

    async fn take_pending_authorization(&self, state: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn()?;
        self.bounded(
            redis::cmd("GETDEL")
                .arg(format!("sluice:oauth:pending:{state}"))
                .query_async(&mut conn),
        )
        .await
    }

    async fn publish_invalidation(&self, workspace: &str, connector: &str) {
        let Ok(mut conn) = self.conn() else {
            warn!(
                workspace,
                connector, "cannot publish a cache invalidation: redis not connected"
            );
            return;
        };
        let sent: Result<i64, _> = self
            .bounded(conn.publish(CHANNEL, format!("{workspace}/{connector}#{}", self.origin)))
            .await;
        if let Err(e) = sent {
            warn!(workspace, connector, error = %e, "cannot publish a cache invalidation");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_the_get_command() {
        assert_eq!(
            record_key("ws_42", "hubspot"),
            "sluice:cred:{ws_42}:hubspot"
        );
        assert_eq!(
            get_cmd("sluice:cred:{ws_42}:hubspot").get_packed_command(),
            b"*2\r\n$3\r\nGET\r\n$27\r\nsluice:cred:{ws_42}:hubspot\r\n"
        );
    }
}
