//! Fair turns for workspaces sharing a per-application bucket.
//!
//! When the bucket has a token and nobody waits, a request goes at once. Otherwise it joins
//! its workspace's FIFO queue, and one dispatcher task per bucket hands each new token to the
//! next workspace in round-robin order, so a workspace with a hundred waiting requests cannot
//! starve one with a single request. The queue bound and the maximum wait apply to the
//! bucket as a whole (estimated from the number of waiters ahead), and a waiter is held no
//! longer than `max_wait` after it was admitted: a response that holds the bucket (a 429, or
//! nothing remaining until a reset) can keep the tokens away longer than the estimate said,
//! and such a waiter is refused at its deadline ([`Turn::wait`]). A waiter whose client left
//! (or that was refused) is skipped and its place freed; the token goes to the next in turn.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::bucket::{Admission, Bucket};

#[derive(Default)]
struct Waiting {
    /// Workspaces with waiters, in turn order.
    order: VecDeque<String>,
    queues: HashMap<String, VecDeque<oneshot::Sender<()>>>,
    dispatching: bool,
}

impl Waiting {
    /// Drop waiters whose client left; returns how many remain.
    fn purge(&mut self) -> usize {
        for q in self.queues.values_mut() {
            q.retain(|tx| !tx.is_closed());
        }
        self.queues.retain(|_, q| !q.is_empty());
        let queues = &self.queues;
        self.order.retain(|ws| queues.contains_key(ws));
        self.queues.values().map(VecDeque::len).sum()
    }

    /// The next live waiter in round-robin order.
    fn next(&mut self) -> Option<oneshot::Sender<()>> {
        while let Some(ws) = self.order.pop_front() {
            let Some(q) = self.queues.get_mut(&ws) else {
                continue;
            };
            while let Some(tx) = q.pop_front() {
                if tx.is_closed() {
                    continue;
                }
                if q.is_empty() {
                    self.queues.remove(&ws);
                } else {
                    self.order.push_back(ws);
                }
                return Some(tx);
            }
            self.queues.remove(&ws);
        }
        None
    }
}

/// A place in a fair queue, until a token is handed to it or its `max_wait` is up.
pub struct Turn {
    rx: oneshot::Receiver<()>,
    /// Admission plus `max_wait`.
    deadline: Instant,
    bucket: Arc<FairBucket>,
}

impl Turn {
    /// Wait for a token. `Err(retry_after)`: none came by the deadline (the bucket is held
    /// longer than the wait estimated at admission), or the queue went away; the place is
    /// given up, and a token handed to it meanwhile goes to the next waiter.
    pub async fn wait(&mut self) -> Result<(), Duration> {
        match tokio::time::timeout_at(self.deadline, &mut self.rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Duration::from_secs(1)),
            Err(_) => {
                // No token can arrive after this; one that arrived just now is used.
                self.rx.close();
                if self.rx.try_recv().is_ok() {
                    return Ok(());
                }
                Err(self.bucket.time_to_token(Instant::now()))
            }
        }
    }
}

/// A per-application bucket with fair turns. `None`: unlimited (nothing configured or
/// learned yet).
pub struct FairBucket {
    state: Mutex<(Option<Bucket>, Waiting)>,
    /// A token due sooner than this counts as there (`rate_limit.min_wait_ms`).
    min_wait: Duration,
}

/// What a request must do.
pub enum FairDecision {
    Go,
    /// Wait for this turn (dropping it gives the place up).
    Wait(Turn),
    /// 429 with this `Retry-After`.
    Refuse(Duration),
}

impl FairBucket {
    /// Tokens due sooner than `min_wait` are handed out at once (see
    /// [`Bucket::admit_within`]).
    pub fn new(bucket: Option<Bucket>, min_wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((bucket, Waiting::default())),
            min_wait,
        })
    }

    /// Learn from a response (see [`super::Limiter::observe`]).
    pub fn observe(
        &self,
        now: Instant,
        learned: &super::headers::Learned,
        too_many_requests: bool,
    ) {
        let mut guard = self.state.lock().expect("fair lock");
        let bucket = &mut guard.0;
        if bucket.is_none() {
            *bucket = super::first_bucket(learned, too_many_requests, now);
        }
        if let Some(b) = bucket.as_mut() {
            b.observe(now, learned, too_many_requests);
        }
    }

    /// How long until the bucket has a token (zero without a bucket).
    fn time_to_token(&self, now: Instant) -> Duration {
        let guard = self.state.lock().expect("fair lock");
        guard
            .0
            .as_ref()
            .map_or(Duration::ZERO, |b| b.time_to_token(now))
    }

    pub fn queued(&self) -> usize {
        self.state
            .lock()
            .expect("fair lock")
            .1
            .queues
            .values()
            .map(VecDeque::len)
            .sum()
    }

    /// Admit one request of `workspace`.
    pub fn admit(
        self: &Arc<Self>,
        workspace: &str,
        now: Instant,
        max_wait: Duration,
        queue_size: usize,
    ) -> FairDecision {
        let mut guard = self.state.lock().expect("fair lock");
        let (bucket, waiting) = &mut *guard;
        let Some(bucket) = bucket.as_mut() else {
            return FairDecision::Go;
        };
        let ahead = waiting.purge();
        if ahead == 0
            && bucket.admit_within(now, self.min_wait, Duration::ZERO, 0) == Admission::Now
        {
            return FairDecision::Go;
        }
        let estimate = bucket.estimate(now, ahead);
        if ahead >= queue_size || estimate > max_wait {
            return FairDecision::Refuse(estimate);
        }
        let (tx, rx) = oneshot::channel();
        let q = waiting.queues.entry(workspace.to_string()).or_default();
        if q.is_empty() {
            waiting.order.push_back(workspace.to_string());
        }
        q.push_back(tx);
        if !waiting.dispatching {
            waiting.dispatching = true;
            let me = self.clone();
            tokio::spawn(async move { me.dispatch().await });
        }
        FairDecision::Wait(Turn {
            rx,
            deadline: now + max_wait,
            bucket: self.clone(),
        })
    }

    /// Hand out tokens as they come, one workspace at a time, until nobody waits.
    async fn dispatch(self: Arc<Self>) {
        loop {
            let wait = {
                let mut guard = self.state.lock().expect("fair lock");
                let (bucket, waiting) = &mut *guard;
                if waiting.purge() == 0 {
                    waiting.dispatching = false;
                    return;
                }
                let now = Instant::now();
                match bucket.as_ref() {
                    Some(b) if !b.due_within(now, self.min_wait) => b.time_to_token(now),
                    _ => Duration::ZERO,
                }
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let mut guard = self.state.lock().expect("fair lock");
            let (bucket, waiting) = &mut *guard;
            let now = Instant::now();
            match bucket.as_mut() {
                // The limit went away: everyone may go.
                None => {
                    while let Some(tx) = waiting.next() {
                        let _ = tx.send(());
                    }
                }
                Some(bucket) if bucket.due_within(now, self.min_wait) => {
                    if let Some(tx) = waiting.next() {
                        bucket.admit_within(now, self.min_wait, Duration::ZERO, 0);
                        // A receiver dropped since `next` looked gives the token back.
                        if tx.send(()).is_err() {
                            bucket.cancel(now);
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_token_due_within_min_wait_is_handed_out_at_once() {
        let t0 = Instant::now();
        let min_wait = Duration::from_millis(1);
        // 1,000 per second, no burst.
        let fair = FairBucket::new(Some(Bucket::new(1, 1000.0, t0)), min_wait);
        let max_wait = Duration::from_secs(1);
        assert!(matches!(fair.admit("a", t0, max_wait, 8), FairDecision::Go));
        // The next token is due 0.4 ms from now: no wait.
        tokio::time::advance(Duration::from_micros(600)).await;
        let soon = Instant::now();
        assert!(matches!(
            fair.admit("b", soon, max_wait, 8),
            FairDecision::Go
        ));
        // The one after is 1.4 ms away: it waits its turn, released by the dispatcher.
        let FairDecision::Wait(mut turn) = fair.admit("c", soon, max_wait, 8) else {
            panic!("a real wait");
        };
        turn.wait().await.unwrap();
        assert!(
            Instant::now() >= t0 + Duration::from_millis(2),
            "released at its turn"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn workspaces_take_turns() {
        let fair = FairBucket::new(Some(Bucket::new(1, 10.0, Instant::now())), Duration::ZERO);
        let now = Instant::now();
        assert!(matches!(
            fair.admit("a", now, Duration::from_secs(10), 100),
            FairDecision::Go
        ));
        // Workspace a floods the queue, then b asks once.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for ws in ["a", "a", "a", "a", "a", "b"] {
            let FairDecision::Wait(mut turn) = fair.admit(ws, now, Duration::from_secs(10), 100)
            else {
                panic!("queued");
            };
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                turn.wait().await.unwrap();
                order.lock().unwrap().push(ws);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["a", "b", "a", "a", "a", "a"],
            "b's turn comes second"
        );
        assert_eq!(fair.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn released_at_the_bucket_rate_and_bounded() {
        let fair = FairBucket::new(Some(Bucket::new(1, 10.0, Instant::now())), Duration::ZERO);
        let t0 = Instant::now();
        assert!(matches!(
            fair.admit("a", t0, Duration::from_millis(250), 2),
            FairDecision::Go
        ));
        let FairDecision::Wait(mut first) = fair.admit("a", t0, Duration::from_millis(250), 2)
        else {
            panic!()
        };
        let FairDecision::Wait(mut second) = fair.admit("b", t0, Duration::from_millis(250), 2)
        else {
            panic!()
        };
        assert!(
            matches!(
                fair.admit("c", t0, Duration::from_millis(250), 2),
                FairDecision::Refuse(_)
            ),
            "queue full"
        );
        first.wait().await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(100), "one interval");
        second.wait().await.unwrap();
        assert_eq!(t0.elapsed(), Duration::from_millis(200), "two intervals");
        // Beyond the maximum wait: refused at once.
        let now = Instant::now();
        let FairDecision::Wait(_w1) = fair.admit("a", now, Duration::from_millis(150), 10) else {
            panic!()
        };
        assert!(matches!(
            fair.admit("a", now, Duration::from_millis(150), 10),
            FairDecision::Refuse(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_leaves_frees_its_place_and_turn() {
        let fair = FairBucket::new(Some(Bucket::new(1, 10.0, Instant::now())), Duration::ZERO);
        let t0 = Instant::now();
        assert!(matches!(
            fair.admit("a", t0, Duration::from_secs(1), 1),
            FairDecision::Go
        ));
        let FairDecision::Wait(gone) = fair.admit("a", t0, Duration::from_secs(1), 1) else {
            panic!()
        };
        assert!(matches!(
            fair.admit("b", t0, Duration::from_secs(1), 1),
            FairDecision::Refuse(_)
        ));
        drop(gone);
        let FairDecision::Wait(mut b) = fair.admit("b", t0, Duration::from_secs(1), 1) else {
            panic!("the place was freed");
        };
        b.wait().await.unwrap();
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(100),
            "b got the next token"
        );
    }

    /// A 429 that holds the bucket for a minute does not hold the waiters for a minute: each is
    /// refused when its `max_wait` is up, told when a token is due, and its place is freed.
    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_refused_when_a_hold_outlasts_its_max_wait() {
        let ms = Duration::from_millis;
        let fair = FairBucket::new(Some(Bucket::new(1, 10.0, Instant::now())), Duration::ZERO);
        let t0 = Instant::now();
        assert!(matches!(fair.admit("a", t0, ms(500), 8), FairDecision::Go));
        let FairDecision::Wait(mut turn) = fair.admit("b", t0, ms(500), 8) else {
            panic!("queued: one interval is within max_wait");
        };
        // The API answers the first request 429, Retry-After 60 s.
        let held = super::super::headers::Learned {
            retry_after: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        fair.observe(t0, &held, true);
        let retry_after = turn.wait().await.expect_err("refused at its deadline");
        assert_eq!(t0.elapsed(), ms(500), "held exactly max_wait");
        assert_eq!(retry_after, Duration::from_secs(60) - ms(500));
        drop(turn);
        // Its place was freed: a queue of one takes the next waiter.
        assert!(matches!(
            fair.admit("c", Instant::now(), Duration::from_secs(120), 1),
            FairDecision::Wait(_)
        ));
    }
}
