//! A token bucket as GCRA (generic cell rate algorithm) with reservations.
//!
//! State is one instant, the theoretical arrival time (`tat`). A request may go when
//! `tat - tolerance <= now`; each admitted request pushes `tat` one emission interval on. A
//! request that would have to wait is given a reservation (its own future start time) if the
//! wait is within `max_wait` and the queue has room; reservations are handed out under the
//! bucket's own lock in arrival order, so waiters are released first-in first-out. A waiter
//! that gives up returns its slot.
//!
//! Turns are handed out ahead, so on time they are spaced by the interval; but timers that
//! fire late fire together. After the thread stalled (a busy or descheduled vCPU), every
//! waiter whose turn passed during the stall would go at once, a burst the API never
//! allowed. So a second cursor, `sent`, spaces what is actually released
//! ([`Bucket::release`]): a waiter released later than timer jitter explains counts from
//! the moment it goes, not from its turn, and the next one waits its interval after it.
//!
//! A hold the API asked for (a 429, or nothing remaining until a reset) keeps back the waiters
//! already queued too, not only new requests: none is released into it ([`Bucket::release`]).
//!
//! Time is passed in: the bucket never reads a clock, so tests are exact.

use std::time::Duration;

use tokio::time::Instant;

use super::headers::Learned;

/// What the bucket says to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go now.
    Now,
    /// A reservation: go after this long (the caller holds a queue place meanwhile).
    After(Duration),
    /// Refused: the wait would exceed the maximum. Retry after this long.
    TooLong(Duration),
    /// Refused: the queue is full. Retry after this long.
    QueueFull(Duration),
}

#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: u32,
    interval: Duration,
    tolerance: Duration,
    tat: Instant,
    /// The theoretical arrival time of what was actually sent: `tat` for requests that went
    /// (or were released), never for reservations still waiting.
    sent: Instant,
    /// The end of the last hold the API asked for ([`Self::observe`]); nothing is released
    /// before it.
    held: Instant,
    queued: usize,
}

/// A waiter released less than this late still counts from its own turn, so timer jitter
/// does not add up to a slower rate: tokio ends a sleep on the millisecond tick after its
/// deadline, and `epoll_wait`'s millisecond timeout can add another. After a stall, this
/// much of the backlog goes at once (3 requests at 1,000/s).
const SLACK: Duration = Duration::from_millis(2);

impl Bucket {
    /// `capacity` requests at once, refilled at `per_second`.
    pub fn new(capacity: u32, per_second: f64, now: Instant) -> Self {
        let capacity = capacity.max(1);
        let interval = Duration::from_secs_f64(1.0 / per_second.max(1e-9))
            .min(Duration::from_secs(86_400 * 365));
        Self {
            capacity,
            interval,
            tolerance: interval * (capacity - 1),
            tat: now,
            sent: now,
            held: now,
            queued: 0,
        }
    }

    /// A bucket for a limit learned from headers: `limit` per `window`.
    pub fn learned(limit: u64, window: Duration, now: Instant) -> Self {
        let limit = limit.clamp(1, u32::MAX as u64) as u32;
        let per_second = limit as f64 / window.as_secs_f64().max(1.0);
        Self::new(limit, per_second, now)
    }

    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Admit one request at `now`.
    pub fn admit(&mut self, now: Instant, max_wait: Duration, queue_size: usize) -> Admission {
        self.admit_within(now, Duration::ZERO, max_wait, queue_size)
    }

    /// Admit one request at `now`, letting it go at once if its turn is less than `early`
    /// away. It still takes its interval, so the long-run rate is unchanged; a burst can be
    /// at most `early / interval` requests larger than `capacity` (timer slack: a sleep that
    /// short would end on the timer's next tick anyway, up to a tick late).
    pub fn admit_within(
        &mut self,
        now: Instant,
        early: Duration,
        max_wait: Duration,
        queue_size: usize,
    ) -> Admission {
        let tat = self.next().max(now);
        if self.due_within(now, early) {
            self.tat = tat + self.interval;
            self.sent = self.sent.max(now) + self.interval;
            return Admission::Now;
        }
        let wait = self.time_to_token(now);
        if wait > max_wait {
            return Admission::TooLong(wait);
        }
        if self.queued >= queue_size {
            return Admission::QueueFull(wait);
        }
        self.tat = tat + self.interval;
        self.queued += 1;
        Admission::After(wait)
    }

    /// How long until a token is free (zero: now). Reserves nothing.
    pub fn time_to_token(&self, now: Instant) -> Duration {
        let allow_at = self
            .next()
            .max(now)
            .checked_sub(self.tolerance)
            .unwrap_or(now);
        allow_at.saturating_duration_since(now)
    }

    /// Where a new request lines up: behind every reservation (`tat`), and behind what was
    /// actually sent when a stall pushed that later ([`Self::release`]).
    fn next(&self) -> Instant {
        self.tat.max(self.sent)
    }

    /// A waiter whose turn was `turn` asks to go at `now` (less than `early` ahead of the
    /// sending order is on time, as in [`Self::admit_within`]). `Err(wait)`: not yet; ask
    /// again after `wait`. Waiters on time go unless the API asked for a hold meanwhile;
    /// ones released together after a stall go one interval apart (beyond `capacity`).
    pub fn release(
        &mut self,
        turn: Instant,
        now: Instant,
        early: Duration,
    ) -> Result<(), Duration> {
        let allow_at = self
            .sent
            .checked_sub(self.tolerance)
            .unwrap_or(now)
            .max(self.held);
        let wait = allow_at.saturating_duration_since(now);
        if !wait.is_zero() && wait >= early {
            return Err(wait);
        }
        let late_beyond_slack = now.checked_sub(SLACK).unwrap_or(now);
        // A hold's end is the turn of the first waiter it kept back.
        self.sent = self.sent.max(turn).max(self.held).max(late_beyond_slack) + self.interval;
        Ok(())
    }

    /// A token is there now, or due sooner than `early`.
    pub fn due_within(&self, now: Instant, early: Duration) -> bool {
        let wait = self.time_to_token(now);
        wait.is_zero() || wait < early
    }

    /// How long the `n`-th waiter from now would wait, one interval per waiter ahead.
    pub fn estimate(&self, now: Instant, ahead: usize) -> Duration {
        self.time_to_token(now) + self.interval * ahead as u32
    }

    /// A reservation was used: its waiter leaves the queue.
    pub fn leave_queue(&mut self) {
        self.queued = self.queued.saturating_sub(1);
    }

    /// A waiter gave up before its turn: it leaves the queue and returns its slot.
    pub fn cancel(&mut self, now: Instant) {
        self.leave_queue();
        self.tat = self.tat.checked_sub(self.interval).unwrap_or(now).max(now);
    }

    /// Hold every request until `until` (a 429, or no requests remaining until a reset).
    fn hold_until(&mut self, until: Instant) {
        self.tat = self.tat.max(until + self.tolerance);
        self.held = self.held.max(until);
    }

    /// Bring the bucket to the server's view after a response.
    pub fn observe(&mut self, now: Instant, learned: &Learned, too_many_requests: bool) {
        if let Some(after) = learned.retry_after {
            self.hold_until(now + after);
            return;
        }
        match (learned.remaining, learned.reset_after) {
            (Some(0), Some(reset)) => self.hold_until(now + reset),
            (Some(0), None) => self.hold_until(now + self.interval),
            (Some(remaining), _) if !too_many_requests => {
                // Exactly `remaining` requests may go at once from here.
                let remaining = remaining.min(self.capacity as u64) as u32;
                let queued = self.queued as u32;
                self.tat = now + self.interval * (self.capacity - remaining).saturating_add(queued);
                // The server has room again: a hold it asked for earlier is over.
                self.held = self.held.min(now);
            }
            _ if too_many_requests => {
                let wait = learned.reset_after.unwrap_or(self.interval);
                self.hold_until(now + wait);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_paced_in_order() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 10.0, t0);
        let waits: Vec<Admission> = (0..15)
            .map(|_| b.admit(t0, Duration::from_secs(5), 100))
            .collect();
        assert!(
            waits[..10].iter().all(|a| *a == Admission::Now),
            "{waits:?}"
        );
        for (i, a) in waits[10..].iter().enumerate() {
            assert_eq!(
                *a,
                Admission::After(ms(100 * (i as u64 + 1))),
                "FIFO: each waits one interval more"
            );
        }
        assert_eq!(b.queued(), 5);
    }

    #[test]
    fn fifty_against_ten_per_second() {
        let t0 = Instant::now();
        // Paced: a 5 s maximum wait admits all 50.
        let mut b = Bucket::new(10, 10.0, t0);
        let r: Vec<_> = (0..50)
            .map(|_| b.admit(t0, Duration::from_secs(5), 100))
            .collect();
        assert_eq!(r.iter().filter(|a| **a == Admission::Now).count(), 10);
        assert_eq!(
            r.iter()
                .filter(|a| matches!(a, Admission::After(_)))
                .count(),
            40
        );
        assert_eq!(r[49], Admission::After(ms(4000)));
        // Refused: a 1 s maximum wait admits 10 now and 10 paced; 30 are told when to retry.
        let mut b = Bucket::new(10, 10.0, t0);
        let r: Vec<_> = (0..50)
            .map(|_| b.admit(t0, Duration::from_secs(1), 100))
            .collect();
        assert_eq!(r.iter().filter(|a| **a == Admission::Now).count(), 10);
        assert_eq!(
            r.iter()
                .filter(|a| matches!(a, Admission::After(_)))
                .count(),
            10
        );
        assert_eq!(
            r.iter()
                .filter(|a| matches!(a, Admission::TooLong(_)))
                .count(),
            30
        );
        // A full queue answers at once.
        let mut b = Bucket::new(1, 1.0, t0);
        assert_eq!(b.admit(t0, Duration::from_secs(60), 2), Admission::Now);
        assert_eq!(
            b.admit(t0, Duration::from_secs(60), 2),
            Admission::After(ms(1000))
        );
        assert_eq!(
            b.admit(t0, Duration::from_secs(60), 2),
            Admission::After(ms(2000))
        );
        assert_eq!(
            b.admit(t0, Duration::from_secs(60), 2),
            Admission::QueueFull(ms(3000))
        );
    }

    #[test]
    fn refills_with_time() {
        let t0 = Instant::now();
        let mut b = Bucket::new(2, 1.0, t0);
        assert_eq!(b.admit(t0, Duration::ZERO, 0), Admission::Now);
        assert_eq!(b.admit(t0, Duration::ZERO, 0), Admission::Now);
        assert_eq!(b.admit(t0, Duration::ZERO, 0), Admission::TooLong(ms(1000)));
        assert_eq!(
            b.admit(t0 + ms(999), Duration::ZERO, 0),
            Admission::TooLong(ms(1))
        );
        assert_eq!(b.admit(t0 + ms(1000), Duration::ZERO, 0), Admission::Now);
        // Idle for long: back to a full burst, never more.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.admit(later, Duration::ZERO, 0), Admission::Now);
        assert_eq!(b.admit(later, Duration::ZERO, 0), Admission::Now);
        assert!(matches!(
            b.admit(later, Duration::ZERO, 0),
            Admission::TooLong(_)
        ));
    }

    #[test]
    fn a_turn_due_within_min_wait_goes_at_once_but_still_counts() {
        let t0 = Instant::now();
        // 1,000 per second, no burst: one interval is exactly 1 ms.
        let mut b = Bucket::new(1, 1000.0, t0);
        let early = ms(1);
        let at = |us| t0 + Duration::from_micros(us);
        assert_eq!(b.admit_within(at(0), early, ms(100), 8), Admission::Now);
        // Due 0.6 ms from now: shorter than min_wait, so it goes; the bucket moves on anyway.
        assert_eq!(b.admit_within(at(400), early, ms(100), 8), Admission::Now);
        // Due 1.6 ms from now (the last one took its interval): a real wait, not shortened.
        assert_eq!(
            b.admit_within(at(400), early, ms(100), 8),
            Admission::After(Duration::from_micros(1600))
        );
        assert_eq!(b.queued(), 1, "only the real wait holds a queue place");
        // Exactly min_wait away is a wait.
        let mut b = Bucket::new(1, 1000.0, t0);
        assert_eq!(b.admit_within(at(0), early, ms(100), 8), Admission::Now);
        assert_eq!(
            b.admit_within(at(0), early, ms(100), 8),
            Admission::After(ms(1))
        );
        // Over a run the rate is the configured one: 1,000 requests offered over 10 ms (one
        // every 10 µs) admit 10 at once, plus 1 from the slack; the rest would have to wait.
        let mut b = Bucket::new(1, 1000.0, t0);
        let now_count = (0..1000)
            .map(|i| b.admit_within(at(i * 10), early, Duration::ZERO, 0))
            .filter(|a| *a == Admission::Now)
            .count();
        assert_eq!(now_count, 11);
    }

    #[test]
    fn a_waiter_that_leaves_returns_its_slot() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1, 1.0, t0);
        assert_eq!(b.admit(t0, Duration::from_secs(10), 1), Admission::Now);
        assert_eq!(
            b.admit(t0, Duration::from_secs(10), 1),
            Admission::After(ms(1000))
        );
        assert!(matches!(
            b.admit(t0, Duration::from_secs(10), 1),
            Admission::QueueFull(_)
        ));
        b.cancel(t0);
        assert_eq!(
            b.admit(t0, Duration::from_secs(10), 1),
            Admission::After(ms(1000)),
            "the place and the slot are free again"
        );
    }

    #[test]
    fn follows_remaining_down_to_zero_then_holds_until_reset() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 10.0, t0);
        let seen = |remaining, reset| Learned {
            remaining: Some(remaining),
            reset_after: Some(Duration::from_secs(reset)),
            limit: Some(10),
            ..Learned::default()
        };
        b.observe(t0, &seen(2, 30), false);
        assert_eq!(b.admit(t0, Duration::ZERO, 0), Admission::Now);
        assert_eq!(b.admit(t0, Duration::ZERO, 0), Admission::Now);
        assert!(
            matches!(b.admit(t0, Duration::ZERO, 0), Admission::TooLong(_)),
            "the server's 2 are used"
        );
        b.observe(t0, &seen(0, 30), false);
        assert_eq!(
            b.admit(t0 + Duration::from_secs(29), Duration::ZERO, 0),
            Admission::TooLong(Duration::from_secs(1))
        );
        assert_eq!(
            b.admit(t0 + Duration::from_secs(30), Duration::ZERO, 0),
            Admission::Now,
            "released at the reset"
        );
    }

    #[test]
    fn too_many_requests_and_retry_after_hold_the_bucket() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 100.0, t0);
        b.observe(
            t0,
            &Learned {
                retry_after: Some(Duration::from_secs(120)),
                ..Learned::default()
            },
            true,
        );
        assert_eq!(
            b.admit(t0, Duration::ZERO, 0),
            Admission::TooLong(Duration::from_secs(120))
        );
        let mut b = Bucket::new(100, 100.0, t0);
        b.observe(t0, &Learned::default(), true);
        assert!(
            matches!(b.admit(t0, Duration::ZERO, 0), Admission::TooLong(_)),
            "a bare 429 empties the bucket"
        );
    }

    /// One token at 1,000/s, five waiters behind the first request: turns at 1..=5 ms.
    fn five_waiting(t0: Instant) -> (Bucket, Vec<Instant>) {
        let mut b = Bucket::new(1, 1000.0, t0);
        assert_eq!(b.admit(t0, ms(100), 64), Admission::Now);
        let turns = (1..=5)
            .map(|i| {
                assert_eq!(b.admit(t0, ms(100), 64), Admission::After(ms(i)));
                t0 + ms(i)
            })
            .collect();
        (b, turns)
    }

    #[test]
    fn waiters_on_time_go_even_when_their_timers_jitter() {
        let t0 = Instant::now();
        let (mut b, turns) = five_waiting(t0);
        // Timers end on the tick after the deadline, and epoll may add one: up to two
        // ticks late, unevenly.
        let late = [1900, 100, 1999, 0, 500];
        for (turn, late_us) in turns.iter().zip(late) {
            let now = *turn + Duration::from_micros(late_us);
            assert_eq!(
                b.release(*turn, now, Duration::ZERO),
                Ok(()),
                "{late_us} µs late"
            );
        }
    }

    #[test]
    fn waiters_released_together_after_a_stall_go_one_interval_apart() {
        let t0 = Instant::now();
        let (mut b, turns) = five_waiting(t0);
        // The thread stalled until 30 ms: every waiter's timer fires at once.
        let mut now = t0 + ms(30);
        let answers: Vec<_> = turns.iter().map(|t| b.release(*t, now, ms(1))).collect();
        assert_eq!(
            answers,
            [Ok(()), Ok(()), Ok(()), Err(ms(1)), Err(ms(1))],
            "two ticks of slack, then the interval"
        );
        for turn in &turns[3..] {
            now += ms(1);
            assert_eq!(b.release(*turn, now, ms(1)), Ok(()));
        }
        // A new request queues behind what was actually sent, not behind the old turns.
        assert_eq!(b.admit(now, ms(100), 64), Admission::After(ms(1)));
    }
}
