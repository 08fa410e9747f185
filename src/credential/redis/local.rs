//! Credential reads on the proxy worker's own thread.
//!
//! The store's shared connection is driven by a task on the runtime that made it, the
//! background one. A proxy worker that reads through it hands each command to the `sluice-bg`
//! thread and back. In the load bench's cold set-up that cost two context switches per read,
//! and the background thread used about a seventh of the CPU. So each worker thread keeps its
//! own plain multiplexed connection for `GET`s (one server only; a cluster's client routes by
//! slot and stays shared). Its driver task runs on the worker's runtime.
//!
//! A thread's connection is never waited on past half the store's deadline. If it fails
//! (Redis restarted, or a connect was refused or timed out), it is dropped at once. The thread
//! then reads through the shared connection for [`BACKOFF`] before it tries to connect again,
//! so an unreachable Redis costs at most one extra connect attempt per thread per back-off.
//! The read falls back to the shared connection within what is left of the same deadline, so
//! the caller sees exactly what it saw before: a value, or `Unavailable` at the deadline.

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

use super::RedisTarget;

/// How long a thread reads through the shared connection after its own failed.
const BACKOFF: Duration = Duration::from_secs(2);

enum State {
    Ready(MultiplexedConnection),
    /// Failed; read through the shared connection until then.
    Waiting(Instant),
}

struct Entry {
    /// The store this connection belongs to. A store that was dropped (tests make several)
    /// leaves a dead `Weak`, and the next insert on the thread prunes it.
    store: Weak<()>,
    state: State,
}

thread_local! {
    static CONNS: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

/// One store's per-thread read connections.
pub(super) struct LocalReads {
    client: redis::Client,
    config: redis::AsyncConnectionConfig,
    /// Identifies this store in each thread's list; alive as long as the store.
    token: Arc<()>,
    /// At most this long on a thread's own connection (connect included), before falling back.
    budget: Duration,
}

impl LocalReads {
    /// `None` for a cluster, whose reads stay on the shared cluster client.
    pub(super) fn new(target: &RedisTarget, timeout: Duration) -> Result<Option<Self>, String> {
        let RedisTarget::Single(url) = target else {
            return Ok(None);
        };
        let client =
            redis::Client::open(url.as_str()).map_err(|e| format!("invalid redis url: {e}"))?;
        let budget = timeout / 2;
        // No response timeout of the connection's own: `get` bounds connect and read by the
        // budget already, and a second timer per read costs as much as the rest of the wait.
        let config = redis::AsyncConnectionConfig::new().set_connection_timeout(budget);
        Ok(Some(Self {
            client,
            config,
            token: Arc::new(()),
            budget,
        }))
    }

    /// `GET key` on this thread's connection, given until `start` plus half the store's
    /// deadline. `None` when there is none to use, or it failed (it is dropped, and the thread
    /// waits [`BACKOFF`] before connecting again): the caller then reads through the shared
    /// connection.
    pub(super) async fn get(&self, key: &str, start: Instant) -> Option<Option<Vec<u8>>> {
        let conn = match self.lookup() {
            Some(State::Ready(conn)) => Some(conn),
            // The clock is read only by a thread that is waiting out its back-off.
            Some(State::Waiting(until)) if start < until => return None,
            _ => None,
        };
        let read = tokio::time::timeout_at(start + self.budget, async {
            let mut conn = match conn {
                Some(conn) => conn,
                None => {
                    let conn = self
                        .client
                        .get_multiplexed_async_connection_with_config(&self.config)
                        .await?;
                    self.set(State::Ready(conn.clone()));
                    conn
                }
            };
            super::get_cmd(key)
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
        })
        .await;
        match read {
            Ok(Ok(value)) => Some(value),
            _ => {
                self.set(State::Waiting(Instant::now() + BACKOFF));
                None
            }
        }
    }

    fn lookup(&self) -> Option<State> {
        let me = Arc::as_ptr(&self.token);
        CONNS.with_borrow(|conns| {
            conns
                .iter()
                .find(|e| e.store.as_ptr() == me)
                .map(|e| match &e.state {
                    State::Ready(conn) => State::Ready(conn.clone()),
                    State::Waiting(until) => State::Waiting(*until),
                })
        })
    }

    fn set(&self, state: State) {
        let me = Arc::as_ptr(&self.token);
        CONNS.with_borrow_mut(|conns| {
            conns.retain(|e| e.store.strong_count() > 0 && e.store.as_ptr() != me);
            conns.push(Entry {
                store: Arc::downgrade(&self.token),
                state,
            });
        });
    }
}
