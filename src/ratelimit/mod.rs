//! Step 6 of the request path: pace each call to the API's limit.
//!
//! One bucket per (connector, workspace), or per connector when the connector says its limit
//! is per application. A bucket's starting capacity and rate come from
//! `[connector.rate_limit]`; without them and before any header was seen, requests are not
//! held back. Every response teaches the bucket ([`headers::learn`]): `Remaining` brings it to
//! the server's view, zero remaining or a 429 holds requests until the reset or `Retry-After`.
//! A request that must wait queues (FIFO, bounded by `queue_size`) up to `max_wait`; beyond
//! that, or with a full queue, it gets 429 `rate_limited` with `Retry-After` at once. A turn
//! due sooner than `min_wait` is not waited for ([`bucket::Bucket::admit_within`]). A waiter
//! that a stall re-spaced past its `max_wait` is refused the same way when that shows
//! ([`Ticket::turn`]), not held longer than the operator allowed.
//!
//! Each bucket has its own lock, held only for the arithmetic (never across an await).

pub mod breaker;
pub mod bucket;
pub mod fair;
pub mod headers;
pub mod retry;
mod settings;
pub mod shared;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::fastmap::{Pair, PairKey};

pub use breaker::{BreakerHandle, Breakers};
use bucket::{Admission, Bucket};
use headers::Learned;
pub use settings::{BucketScope, RateLimit, RateLimitFile};
use shared::{Adjust, SharedBudget};

/// Which bucket a request draws from: (connector, workspace), the workspace empty for a
/// per-application bucket. The maps own it as a [`PairKey`] and are probed
/// with this borrowed pair ([`Pair`]): nothing is allocated per request.
pub fn bucket_key<'a>(
    rl: &RateLimit,
    connector: &'a str,
    workspace: &'a str,
) -> (&'a str, &'a str) {
    let ws = if rl.per_application { "" } else { workspace };
    (connector, ws)
}

/// The bucket a first sight of a limit creates: that size over its window (or a minute); a
/// bare 429 or `Retry-After` makes a one-per-second bucket to hold.
pub(crate) fn first_bucket(
    learned: &Learned,
    too_many_requests: bool,
    now: Instant,
) -> Option<Bucket> {
    let limit = learned.limit.or(learned.remaining.map(|r| r.max(1)));
    let window = learned
        .window
        .or(learned.reset_after)
        .filter(|w| !w.is_zero())
        .unwrap_or(Duration::from_secs(60));
    match limit {
        Some(limit) => Some(Bucket::learned(limit, window, now)),
        None if too_many_requests || learned.retry_after.is_some() => {
            Some(Bucket::learned(1, Duration::from_secs(1), now))
        }
        None => None,
    }
}

/// Every bucket in the process, and the Redis store for shared budgets.
pub struct Limiter {
    buckets: moka::sync::Cache<PairKey, Arc<Mutex<Option<Bucket>>>, crate::fastmap::CacheHasher>,
    /// Per-application buckets: workspaces waiting take turns.
    fair: moka::sync::Cache<PairKey, Arc<fair::FairBucket>, crate::fastmap::CacheHasher>,
    /// Waiters per shared bucket in this replica (the queue bound is per replica).
    queues: moka::sync::Cache<PairKey, Arc<AtomicUsize>, crate::fastmap::CacheHasher>,
    shared: Option<SharedBudget>,
    /// Connectors without a configured limit whose API has taught a bucket (`observe`).
    /// Until a connector is here its requests skip the bucket lookup: one read of this small
    /// set (no lock, no cache bookkeeping) instead of a cache miss per request. Never
    /// shrinks; it holds at most every connector id ever configured.
    taught: arc_swap::ArcSwap<crate::fastmap::FastSet<String>>,
    /// After a failed Redis call, local buckets decide until then (no timeout per request).
    shared_down_until: Mutex<Option<Instant>>,
}

/// How long a Redis failure sends shared budgets to the local buckets before trying again.
const SHARED_RETRY_AFTER: Duration = Duration::from_secs(1);

impl Default for Limiter {
    fn default() -> Self {
        Self::new(None)
    }
}

/// GCRA parameters of a (capacity, per second) bucket: emission interval and burst tolerance.
fn gcra(capacity: u32, per_second: f64) -> (Duration, Duration) {
    let interval = Duration::from_secs_f64(1.0 / per_second.max(1e-9));
    (interval, interval * capacity.max(1).saturating_sub(1))
}

fn shared_key(key: &dyn Pair) -> String {
    format!("sluice:rl:{{{}:{}}}", key.first(), key.second())
}

enum Place {
    Local {
        bucket: Arc<Mutex<Option<Bucket>>>,
        /// `min_wait`: how early a release still counts as on time.
        early: Duration,
        /// Admission plus `max_wait`: the longest this waiter may be held.
        deadline: Instant,
    },
    Shared {
        redis: SharedBudget,
        key: String,
        interval: Duration,
        tolerance: Duration,
        queued: Arc<AtomicUsize>,
    },
}

/// A queue place; dropping it before [`Ticket::used`] gives the place and its slot back (the
/// client went away).
pub struct Ticket {
    place: Place,
    used: bool,
    /// When this place's turn comes.
    turn: Instant,
}

impl Ticket {
    /// Wait for this place's turn. A local bucket may hold it longer: waiters whose turns
    /// passed while the thread stalled go one interval apart, not all at once
    /// ([`Bucket::release`]). `Err(wait)`: that spacing would hold this waiter past its
    /// `max_wait`, so it is refused now, as it would have been at admission (`wait`: when a
    /// token is due; dropping the ticket gives its slot back).
    pub async fn turn(&mut self) -> Result<(), Duration> {
        let mut at = self.turn;
        loop {
            tokio::time::sleep_until(at).await;
            let Place::Local {
                bucket,
                early,
                deadline,
            } = &self.place
            else {
                return Ok(());
            };
            let now = Instant::now();
            let released = match bucket.lock().expect("bucket lock").as_mut() {
                Some(b) => b.release(self.turn, now, *early),
                None => Ok(()),
            };
            match released {
                Ok(()) => return Ok(()),
                Err(wait) if now + wait > *deadline => return Err(wait),
                Err(wait) => at = now + wait,
            }
        }
    }

    pub fn used(mut self) {
        self.used = true;
        match &self.place {
            Place::Local { bucket, .. } => {
                if let Some(b) = bucket.lock().expect("bucket lock").as_mut() {
                    b.leave_queue();
                }
            }
            Place::Shared { queued, .. } => {
                queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.used {
            return;
        }
        match &self.place {
            Place::Local { bucket, .. } => {
                if let Some(b) = bucket.lock().expect("bucket lock").as_mut() {
                    b.cancel(Instant::now());
                }
            }
            Place::Shared {
                redis,
                key,
                interval,
                tolerance,
                queued,
            } => {
                queued.fetch_sub(1, Ordering::SeqCst);
                let (redis, key, interval, tolerance) =
                    (redis.clone(), key.clone(), *interval, *tolerance);
                tokio::spawn(async move {
                    let _ = redis
                        .adjust(&key, Adjust::Give, interval.as_millis() as u64, tolerance)
                        .await;
                });
            }
        }
    }
}

/// What a request must do.
pub enum Decision {
    Go,
    /// Wait for the ticket's turn ([`Ticket::turn`]); dropping it gives the place up.
    Wait(Ticket),
    /// Wait for this workspace's turn (per-application buckets); dropping it gives the
    /// place up.
    Turn(fair::Turn),
    /// 429 with this `Retry-After`.
    Refuse(Duration),
}

impl Limiter {
    pub fn new(shared: Option<SharedBudget>) -> Self {
        Self {
            // Idle buckets are forgotten (and relearned); the bound keeps memory flat.
            buckets: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build_with_hasher(Default::default()),
            queues: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build_with_hasher(Default::default()),
            fair: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build_with_hasher(Default::default()),
            shared,
            taught: Default::default(),
            shared_down_until: Mutex::new(None),
        }
    }

    /// Record that `connector`'s API taught a bucket, before the bucket exists: a request
    /// that finds the bucket has seen this first.
    fn mark_taught(&self, connector: &str) {
        if self.taught.load().contains(connector) {
            return;
        }
        self.taught.rcu(|set| {
            let mut set = crate::fastmap::FastSet::clone(set);
            set.insert(connector.to_owned());
            set
        });
    }

    fn bucket(&self, key: &dyn Pair, rl: &RateLimit, now: Instant) -> Arc<Mutex<Option<Bucket>>> {
        self.buckets.get_with_by_ref(key, || {
            Arc::new(Mutex::new(rl.initial.map(|(c, r)| Bucket::new(c, r, now))))
        })
    }

    fn fair_bucket(&self, key: &dyn Pair, rl: &RateLimit, now: Instant) -> Arc<fair::FairBucket> {
        self.fair.get_with_by_ref(key, || {
            fair::FairBucket::new(rl.initial.map(|(c, r)| Bucket::new(c, r, now)), rl.min_wait)
        })
    }

    /// The Redis store and GCRA parameters, when this bucket is shared and Redis is not
    /// known to be down.
    fn shared_params(
        &self,
        key: &dyn Pair,
        rl: &RateLimit,
    ) -> Option<(&SharedBudget, Duration, Duration)> {
        let redis = self.shared.as_ref().filter(|_| rl.shared)?;
        let down_until = *self.shared_down_until.lock().expect("lock");
        if down_until.is_some_and(|until| Instant::now() < until) {
            Self::count_fallback(key);
            return None;
        }
        let (capacity, per_second) = rl.initial?;
        let (interval, tolerance) = gcra(capacity, per_second);
        Some((redis, interval, tolerance))
    }

    fn count_fallback(key: &dyn Pair) {
        crate::telemetry::METRICS
            .rate_limit_fallbacks
            .with_label_values(&[key.first()])
            .inc();
    }

    /// A Redis call failed: count it, say so, and let local buckets decide for a while.
    fn fell_back(&self, key: &dyn Pair, error: &dyn std::fmt::Display) {
        warn!(connector = %key.first(), error = %error, "shared rate-limit budget unreachable; using this replica's bucket");
        Self::count_fallback(key);
        *self.shared_down_until.lock().expect("lock") = Some(Instant::now() + SHARED_RETRY_AFTER);
    }

    /// Admit one request of `workspace` at `now`.
    pub async fn admit(
        &self,
        key: &dyn Pair,
        rl: &RateLimit,
        workspace: &str,
        now: Instant,
    ) -> Decision {
        if let Some((redis, interval, tolerance)) = self.shared_params(key, rl) {
            // Boxed: the Redis script's future is large, and carried inline every request
            // would copy it, shared budget or not (BENCHMARKS.md).
            let shared = Box::pin(self.admit_shared(key, rl, redis, interval, tolerance)).await;
            if let Some(decision) = shared {
                return decision;
            }
        }
        if rl.per_application {
            return match self.fair_bucket(key, rl, now).admit(
                workspace,
                now,
                rl.max_wait,
                rl.queue_size,
            ) {
                fair::FairDecision::Go => Decision::Go,
                fair::FairDecision::Wait(turn) => Decision::Turn(turn),
                fair::FairDecision::Refuse(wait) => Decision::Refuse(wait),
            };
        }
        let bucket = match rl.initial {
            // No limit configured: a bucket exists only once a response taught one (`observe`
            // creates it). Until then there is nothing to pace, and no entry is made per
            // workspace on the way in; until the connector's API taught any, not even a
            // lookup. (Buckets left from a limit since removed from the config are not
            // consulted until the API teaches one: the operator removed the limit.)
            None if !self.taught.load().contains(key.first()) => return Decision::Go,
            None => match self.buckets.get(key) {
                Some(bucket) => bucket,
                None => return Decision::Go,
            },
            Some(_) => self.bucket(key, rl, now),
        };
        let admission = match bucket.lock().expect("bucket lock").as_mut() {
            None => return Decision::Go,
            Some(b) => b.admit_within(now, rl.min_wait, rl.max_wait, rl.queue_size),
        };
        match admission {
            Admission::Now => Decision::Go,
            Admission::After(wait) => Decision::Wait(Ticket {
                place: Place::Local {
                    bucket,
                    early: rl.min_wait,
                    deadline: now + rl.max_wait,
                },
                used: false,
                turn: now + wait,
            }),
            Admission::TooLong(wait) | Admission::QueueFull(wait) => Decision::Refuse(wait),
        }
    }

    /// The shared (Redis GCRA) budget's answer; `None` when Redis is unreachable and this
    /// replica's own bucket decides instead.
    async fn admit_shared(
        &self,
        key: &dyn Pair,
        rl: &RateLimit,
        redis: &SharedBudget,
        interval: Duration,
        tolerance: Duration,
    ) -> Option<Decision> {
        let skey = shared_key(key);
        match redis.admit(&skey, interval, tolerance, rl.max_wait).await {
            // Redis answers in whole milliseconds: a wait under `min_wait` goes at once, its
            // slot already taken.
            Ok(wait) if wait >= 0 && (wait as u128) < rl.min_wait.as_millis().max(1) => {
                Some(Decision::Go)
            }
            Ok(wait) if wait < 0 => {
                Some(Decision::Refuse(Duration::from_millis(wait.unsigned_abs())))
            }
            Ok(wait) => {
                let wait = Duration::from_millis(wait as u64);
                let queued = self
                    .queues
                    .get_with_by_ref(key, || Arc::new(AtomicUsize::new(0)));
                if queued.fetch_add(1, Ordering::SeqCst) >= rl.queue_size {
                    queued.fetch_sub(1, Ordering::SeqCst);
                    let _ = redis
                        .adjust(&skey, Adjust::Give, interval.as_millis() as u64, tolerance)
                        .await;
                    return Some(Decision::Refuse(wait));
                }
                let place = Place::Shared {
                    redis: redis.clone(),
                    key: skey,
                    interval,
                    tolerance,
                    queued,
                };
                Some(Decision::Wait(Ticket {
                    place,
                    used: false,
                    turn: Instant::now() + wait,
                }))
            }
            Err(e) => {
                self.fell_back(key, &e);
                None
            }
        }
    }

    /// Learn from a response (the local bucket always; the shared one too, best effort).
    pub async fn observe(
        &self,
        key: &dyn Pair,
        rl: &RateLimit,
        learned: &Learned,
        too_many_requests: bool,
        now: Instant,
    ) {
        if learned.is_empty() && !too_many_requests {
            return;
        }
        if let Some((redis, interval, tolerance)) = self.shared_params(key, rl) {
            let capacity = rl.initial.map_or(1, |(c, _)| c as u64);
            let hold = learned.retry_after.or(match learned.remaining {
                Some(0) => Some(learned.reset_after.unwrap_or(interval)),
                _ if too_many_requests => Some(learned.reset_after.unwrap_or(interval)),
                _ => None,
            });
            let adjusted = match (hold, learned.remaining) {
                // Boxed, as in `admit`: the script's future is large.
                (Some(hold), _) => {
                    Box::pin(redis.adjust(
                        &shared_key(key),
                        Adjust::Hold,
                        hold.as_millis() as u64,
                        tolerance,
                    ))
                    .await
                }
                (None, Some(remaining)) => {
                    let used = capacity.saturating_sub(remaining.min(capacity));
                    Box::pin(redis.adjust(
                        &shared_key(key),
                        Adjust::Set,
                        (interval * used as u32).as_millis() as u64,
                        tolerance,
                    ))
                    .await
                }
                (None, None) => Ok(()),
            };
            if let Err(e) = adjusted {
                self.fell_back(key, &e);
            }
        }
        if rl.per_application {
            self.fair_bucket(key, rl, now)
                .observe(now, learned, too_many_requests);
            return;
        }
        if rl.initial.is_none() {
            self.mark_taught(key.first());
        }
        let bucket = self.bucket(key, rl, now);
        let mut guard = bucket.lock().expect("bucket lock");
        if guard.is_none() {
            *guard = first_bucket(learned, too_many_requests, now);
        }
        if let Some(b) = guard.as_mut() {
            b.observe(now, learned, too_many_requests);
        }
    }

    /// Requests waiting in every bucket (for the queue-depth metric).
    pub fn queued(&self) -> usize {
        let local: usize = self
            .buckets
            .iter()
            .map(|(_, b)| b.lock().map_or(0, |g| g.as_ref().map_or(0, Bucket::queued)))
            .sum();
        let shared: usize = self
            .queues
            .iter()
            .map(|(_, q)| q.load(Ordering::SeqCst))
            .sum();
        local + shared
    }
}

#[cfg(test)]
mod tests;
