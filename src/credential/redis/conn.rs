//! One Redis, or a Redis Cluster, behind one connection type. Every command the store and the
//! shared budgets send goes through [`RedisConn`]: a single server's connection manager, or
//! the `redis` crate's cluster client, which follows `MOVED`/`ASK` redirects and refreshes its
//! slot map when slots move or a master fails over.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// Where the store lives (`[credentials]`: `redis_url`, or `redis_cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a proxy in front of several).
    Single(String),
    /// A Redis Cluster: seed nodes; the rest is discovered from them.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Clients for the invalidation subscription: one per URL, tried in turn. In a cluster,
    /// `PUBLISH` reaches subscribers on every node, so any one node will do.
    pub(super) fn pubsub_clients(&self) -> Result<Vec<redis::Client>, String> {
        let urls: &[String] = match self {
            Self::Single(url) => std::slice::from_ref(url),
            Self::Cluster(nodes) => nodes,
        };
        urls.iter()
            .map(|u| redis::Client::open(u.as_str()).map_err(|e| format!("invalid redis url: {e}")))
            .collect()
    }

    /// Connect once, within the connection and response timeouts.
    pub(super) async fn connect(&self, timeout: Duration) -> RedisResult<RedisConn> {
        match self {
            Self::Single(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout)
                    .set_max_delay(2_000);
                let client = redis::Client::open(url.as_str())?;
                Ok(RedisConn::Single(
                    client.get_connection_manager_with_config(config).await?,
                ))
            }
            Self::Cluster(nodes) => {
                // Redirects and retries stay well inside the store's deadline (every call is
                // bounded by it): a few quick retries, then the caller hears about it.
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(4)
                    .min_retry_wait(10)
                    .max_retry_wait(100)
                    .build()?;
                Ok(RedisConn::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

/// A connection to the store: cheap to clone, shared by every request.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
