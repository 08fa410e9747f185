//! Concurrent misses for one key share one load.
//!
//! The vault used to get this from moka's `try_get_with` on an async cache. Its value
//! initializer costs ~6k instructions per cold request (a waiter map of its own with epoch-based
//! reclamation, an async read-write lock, a second cache read), ~3 % of a cold request's
//! instructions (BENCHMARKS.md, tenth round). Here a load in flight is one entry in a sharded
//! map (dashmap, already in the tree through pingora's connection pool), and its result is a
//! `tokio::sync::OnceCell` that every caller for that key awaits:
//!
//! * the first caller runs the load; the others wait for its result, error included (one
//!   failed store read answers every request that was waiting on it, as before);
//! * a caller cancelled while it runs the load (its client went away) hands the load to the
//!   next waiter, which starts it again: `OnceCell::get_or_init`'s own rule;
//! * once a load finishes it leaves the map, so the next miss reads the store again.
//!
//! The map's shard lock is held only to find or insert the entry and to remove it, never
//! across an await, and only on a miss: a warm request never touches it.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::OnceCell;

pub(super) struct Flights<K, V, S> {
    map: DashMap<K, Arc<OnceCell<V>>, S>,
}

impl<K, V, S> Flights<K, V, S>
where
    K: Eq + Hash + Clone,
    V: Clone,
    S: BuildHasher + Clone + Default,
{
    pub(super) fn new() -> Self {
        Self {
            map: DashMap::with_hasher(S::default()),
        }
    }

    /// `load`'s result for `key`: run here, or shared with the caller already running it.
    pub(super) async fn run<F, Fut>(&self, key: &K, load: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let flight = self.map.entry(key.clone()).or_default().clone();
        let value = flight.get_or_init(load).await.clone();
        // Whichever caller gets here first retires the flight; a newer one (after a retire)
        // is not this one and stays.
        self.map.remove_if(key, |_, f| Arc::ptr_eq(f, &flight));
        value
    }

    /// Loads in flight (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    type Map = Flights<u32, Result<u32, String>, std::hash::RandomState>;

    #[tokio::test]
    async fn concurrent_callers_share_one_load_and_its_error() {
        let flights = Arc::new(Map::new());
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let callers: Vec<_> = (0..10)
            .map(|_| {
                let (flights, loads, gate) = (flights.clone(), loads.clone(), gate.clone());
                tokio::spawn(async move {
                    flights
                        .run(&7, || async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            gate.notified().await;
                            Err::<u32, _>("store down".to_string())
                        })
                        .await
                })
            })
            .collect();
        // Every caller has joined the one flight before the load may finish.
        while Arc::strong_count(&flights.map.get(&7).map(|f| f.clone()).unwrap_or_default()) < 12 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for c in callers {
            assert_eq!(c.await.unwrap(), Err("store down".to_string()));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(flights.len(), 0, "a finished load leaves the map");
        // The next miss loads again.
        assert_eq!(flights.run(&7, || async { Ok(1) }).await, Ok(1));
    }

    #[tokio::test]
    async fn a_cancelled_loader_hands_the_load_to_a_waiter() {
        let flights = Arc::new(Map::new());
        let started = Arc::new(Notify::new());
        let first = {
            let (flights, started) = (flights.clone(), started.clone());
            tokio::spawn(async move {
                flights
                    .run(&1, || async move {
                        started.notify_one();
                        std::future::pending::<Result<u32, String>>().await
                    })
                    .await
            })
        };
        started.notified().await;
        let second = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(&1, || async { Ok(2) }).await })
        };
        // The second caller is waiting on the first's load when the first is cancelled.
        while Arc::strong_count(&flights.map.get(&1).map(|f| f.clone()).unwrap()) < 4 {
            tokio::task::yield_now().await;
        }
        first.abort();
        assert_eq!(second.await.unwrap(), Ok(2));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn different_keys_do_not_wait_for_each_other() {
        let flights = Map::new();
        let slow = flights.run(&1, std::future::pending);
        let fast = flights.run(&2, || async { Ok(2) });
        tokio::pin!(slow);
        // Biased: the slow load starts (and enters the map) before the fast one is polled.
        tokio::select! {
            biased;
            _ = &mut slow => unreachable!("never finishes"),
            v = fast => assert_eq!(v, Ok(2)),
        }
        assert_eq!(flights.len(), 1, "the slow load is still in flight");
    }
}
