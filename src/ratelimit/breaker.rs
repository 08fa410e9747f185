//! A circuit breaker per (connector, upstream host).
//!
//! Closed: requests pass; `failure_threshold` consecutive transient failures (connect
//! failures, broken exchanges, 502/503/504) open it. Open: requests fail fast with 503
//! `circuit_open` and `Retry-After` until `open_ms` has passed. Half-open: one request goes
//! through as a probe; its success closes the breaker, its failure opens it again. A probe
//! that never reports back (its client left) is replaced after `open_ms`. Other 4xx are the
//! caller's problem and count as successes (the upstream answered); 429s are the bucket's
//! business and change nothing. Time is passed in.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::warn;

use crate::fastmap::{Pair, PairKey};

/// `[connector.circuit_breaker]` as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    pub failure_threshold: u32,
    pub open_for: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(30),
        }
    }
}

impl BreakerPolicy {
    pub fn build(f: &BreakerFile) -> Result<Self, Vec<(String, String)>> {
        let d = Self::default();
        let p = Self {
            failure_threshold: f.failure_threshold.unwrap_or(d.failure_threshold),
            open_for: f.open_ms.map_or(d.open_for, Duration::from_millis),
        };
        let mut errors = Vec::new();
        if p.failure_threshold == 0 {
            errors.push(("failure_threshold".into(), "must be at least 1".into()));
        }
        if p.open_for.is_zero() {
            errors.push(("open_ms".into(), "must be greater than 0".into()));
        }
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_since: Instant },
}

/// The breaker's state; `as_label` (`closed`, `open`, `half_open`) names it in logs and
/// metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::VariantNames)]
#[strum(serialize_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// What the breaker says to one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Allow,
    /// Allowed as the half-open probe.
    Probe,
    /// Fail fast; retry after this long.
    Reject(Duration),
}

/// How an attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
    /// A 429: neither.
    Neutral,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: State::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Closed with no failure counted, as a new breaker starts: admission is `Allow` and a
    /// success changes nothing, so an attempt may skip a breaker at rest altogether.
    pub fn at_rest(&self) -> bool {
        matches!(self.state, State::Closed { failures: 0 })
    }

    pub fn admit(&mut self, now: Instant, policy: &BreakerPolicy) -> Pass {
        match self.state {
            State::Closed { .. } => Pass::Allow,
            State::Open { until } if now < until => Pass::Reject(until - now),
            State::Open { .. } => {
                self.state = State::HalfOpen { probe_since: now };
                Pass::Probe
            }
            State::HalfOpen { probe_since }
                if now.duration_since(probe_since) < policy.open_for =>
            {
                Pass::Reject(policy.open_for - now.duration_since(probe_since))
            }
            State::HalfOpen { .. } => {
                // The previous probe never reported: send another.
                self.state = State::HalfOpen { probe_since: now };
                Pass::Probe
            }
        }
    }

    /// Record an attempt's outcome; returns (old, new) state when it changed. `now` is asked
    /// for only when a failure opens the breaker.
    pub fn record(
        &mut self,
        now: impl FnOnce() -> Instant,
        outcome: Outcome,
        policy: &BreakerPolicy,
    ) -> Option<(BreakerState, BreakerState)> {
        let before = self.state();
        self.state = match (self.state, outcome) {
            (_, Outcome::Neutral) => self.state,
            (_, Outcome::Success) => State::Closed { failures: 0 },
            (State::Closed { failures }, Outcome::Failure)
                if failures + 1 >= policy.failure_threshold =>
            {
                State::Open {
                    until: now() + policy.open_for,
                }
            }
            (State::Closed { failures }, Outcome::Failure) => State::Closed {
                failures: failures + 1,
            },
            (State::HalfOpen { .. }, Outcome::Failure) => State::Open {
                until: now() + policy.open_for,
            },
            (open @ State::Open { .. }, Outcome::Failure) => open,
        };
        (self.state() != before).then(|| (before, self.state()))
    }
}

/// Every circuit breaker in the process, per (connector, upstream host).
///
/// Nearly always every breaker is at rest ([`Breaker::at_rest`]: closed, no failure
/// counted), and then an attempt needs none: admission is `Allow` and a success changes
/// nothing. `unsettled` counts the breakers that are not at rest; while it is zero the request
/// path skips the map, which was a cache read per request ([`Breakers::all_at_rest`]). A
/// breaker is counted when an outcome takes it out of rest, and uncounted when one brings it
/// back or when the map lets it go (idle for an hour, or over capacity).
pub struct Breakers {
    map: moka::sync::Cache<PairKey, BreakerHandle, crate::fastmap::CacheHasher>,
    unsettled: Arc<AtomicUsize>,
}

/// One breaker in the map, with its part in [`Breakers`]' count.
#[derive(Default)]
pub struct Tracked {
    breaker: Breaker,
    /// Counted in `unsettled` (not at rest, and still in the map).
    counted: bool,
    /// Let go by the map: a request that still holds it is the last to use it, and what it
    /// records there no longer counts, changes the open-circuits gauge or is reported.
    dropped: bool,
}

/// One (connector, upstream host)'s breaker. A request that needs it looks it up once and
/// keeps it for every later attempt's admission and outcome.
pub type BreakerHandle = Arc<Mutex<Tracked>>;

fn lock_tracked(handle: &BreakerHandle) -> std::sync::MutexGuard<'_, Tracked> {
    // A breaker's state is a small enum replaced whole: a panic elsewhere cannot tear it.
    handle
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Default for Breakers {
    fn default() -> Self {
        Self::with_capacity(100_000)
    }
}

impl Breakers {
    fn with_capacity(capacity: u64) -> Self {
        let unsettled = Arc::new(AtomicUsize::new(0));
        let count = unsettled.clone();
        let map = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .time_to_idle(Duration::from_secs(3600))
            .eviction_listener(move |key: Arc<PairKey>, handle: BreakerHandle, _cause| {
                let mut t = lock_tracked(&handle);
                if t.counted {
                    count.fetch_sub(1, Ordering::AcqRel);
                    t.counted = false;
                }
                if t.breaker.state() != BreakerState::Closed {
                    // It was counted open in the gauge; nothing will close it now.
                    crate::telemetry::METRICS
                        .circuits_open
                        .with_label_values(&[key.0.as_str()])
                        .dec();
                }
                t.dropped = true;
            })
            .build_with_hasher(Default::default());
        Self { map, unsettled }
    }

    /// Every breaker is at rest: an attempt admitted now needs none, and its success needs
    /// none either. A failure racing with this read is the same as the attempt having
    /// started a moment earlier.
    pub fn all_at_rest(&self) -> bool {
        self.unsettled.load(Ordering::Acquire) == 0
    }

    /// How many breakers are not at rest.
    #[cfg(test)]
    fn unsettled(&self) -> usize {
        self.unsettled.load(Ordering::Acquire)
    }

    /// The breaker for (connector, host), created at rest on first use.
    pub fn handle(&self, connector: &str, host: &str) -> BreakerHandle {
        self.map
            .get_with_by_ref(&(connector, host) as &dyn Pair, BreakerHandle::default)
    }

    /// The breaker's say on an attempt starting at `now`.
    pub fn admit(&self, handle: &BreakerHandle, now: Instant, policy: &BreakerPolicy) -> Pass {
        lock_tracked(handle).breaker.admit(now, policy)
    }

    /// Record an attempt's outcome on (connector, host)'s breaker; a change of state is
    /// logged and counted in the metrics (not for a breaker the map has let go: it is no
    /// longer the host's). `now` is asked for only when a failure opens it.
    pub fn record(
        &self,
        handle: &BreakerHandle,
        (connector, host): (&str, &str),
        now: impl FnOnce() -> Instant,
        outcome: Outcome,
        policy: &BreakerPolicy,
    ) {
        let changed = {
            let mut t = lock_tracked(handle);
            let changed = t.breaker.record(now, outcome, policy);
            if t.dropped {
                return;
            }
            let at_rest = t.breaker.at_rest();
            if t.counted == at_rest {
                if at_rest {
                    self.unsettled.fetch_sub(1, Ordering::AcqRel);
                } else {
                    self.unsettled.fetch_add(1, Ordering::AcqRel);
                }
                t.counted = !at_rest;
            }
            changed
        };
        let Some((from, to)) = changed else {
            return;
        };
        use crate::label::Label;
        use BreakerState::Closed;
        warn!(connector = %connector, host = %host, state = to.as_label(), "circuit breaker changed state");
        let metrics = &crate::telemetry::METRICS;
        metrics
            .circuit_transitions
            .with_label_values(&[connector, to.as_label()])
            .inc();
        // "Open" in the gauge means not closed: open or probing.
        let open = metrics.circuits_open.with_label_values(&[connector]);
        match (from, to) {
            (Closed, _) => open.inc(),
            (_, Closed) => open.dec(),
            _ => {}
        }
    }

    /// Let every breaker go (tests: the map's removal path, as an idle expiry takes it).
    #[cfg(test)]
    fn drop_all(&self) {
        self.map.invalidate_all();
        self.map.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use strum::VariantNames;

    use super::*;
    use crate::label::Label;

    /// The metric's help text lists exactly the states the breaker has.
    #[test]
    fn the_transitions_help_names_every_state() {
        use prometheus::core::Collector;
        let desc = crate::telemetry::METRICS.circuit_transitions.desc();
        let help = &desc[0].help;
        let listed = format!("({}).", BreakerState::VARIANTS.join(", "));
        assert!(help.ends_with(&listed), "{help} should end with {listed}");
    }

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failure_threshold: 3,
            open_for: Duration::from_secs(30),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let (p, t0) = (policy(), Instant::now());
        let mut b = Breaker::default();
        b.record(|| t0, Outcome::Failure, &p);
        b.record(|| t0, Outcome::Failure, &p);
        b.record(|| t0, Outcome::Success, &p);
        b.record(|| t0, Outcome::Failure, &p);
        b.record(|| t0, Outcome::Failure, &p);
        assert_eq!(
            b.admit(t0, &p),
            Pass::Allow,
            "a success in between reset the count"
        );
        b.record(|| t0, Outcome::Neutral, &p);
        assert_eq!(
            b.record(|| t0, Outcome::Failure, &p)
                .map(|(_, to)| to.as_label()),
            Some("open")
        );
        assert_eq!(
            b.admit(t0 + Duration::from_secs(10), &p),
            Pass::Reject(Duration::from_secs(20))
        );
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let (p, t0) = (policy(), Instant::now());
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.record(|| t0, Outcome::Failure, &p);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1, &p), Pass::Probe);
        assert_eq!(b.state().as_label(), "half_open");
        assert!(
            matches!(b.admit(t1, &p), Pass::Reject(_)),
            "only one probe at a time"
        );
        // The probe fails: open again for a full period.
        assert_eq!(
            b.record(|| t1, Outcome::Failure, &p)
                .map(|(_, to)| to.as_label()),
            Some("open")
        );
        assert_eq!(
            b.admit(t1 + Duration::from_secs(29), &p),
            Pass::Reject(Duration::from_secs(1))
        );
        // The next probe succeeds: closed.
        let t2 = t1 + Duration::from_secs(30);
        assert_eq!(b.admit(t2, &p), Pass::Probe);
        assert_eq!(
            b.record(|| t2, Outcome::Success, &p)
                .map(|(_, to)| to.as_label()),
            Some("closed")
        );
        assert_eq!(b.admit(t2, &p), Pass::Allow);
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_open_period() {
        let (p, t0) = (policy(), Instant::now());
        let mut b = Breaker::default();
        for _ in 0..3 {
            b.record(|| t0, Outcome::Failure, &p);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admit(t1, &p), Pass::Probe);
        assert!(matches!(
            b.admit(t1 + Duration::from_secs(29), &p),
            Pass::Reject(_)
        ));
        assert_eq!(b.admit(t1 + Duration::from_secs(30), &p), Pass::Probe);
    }

    #[test]
    fn config_validation() {
        assert!(
            BreakerPolicy::build(&BreakerFile {
                failure_threshold: Some(0),
                open_ms: None
            })
            .is_err()
        );
        assert!(
            BreakerPolicy::build(&BreakerFile {
                failure_threshold: None,
                open_ms: Some(0)
            })
            .is_err()
        );
        assert_eq!(
            BreakerPolicy::build(&BreakerFile::default()).unwrap(),
            BreakerPolicy::default()
        );
    }

    fn open_gauge(connector: &str) -> i64 {
        crate::telemetry::METRICS
            .circuits_open
            .with_label_values(&[connector])
            .get()
    }

    #[test]
    fn breakers_count_only_what_is_not_at_rest() {
        let breakers = Breakers::default();
        let policy = BreakerPolicy {
            failure_threshold: 2,
            open_for: Duration::from_secs(30),
        };
        let t0 = Instant::now();
        let at = |s: u64| move || t0 + Duration::from_secs(s);
        let (a, b) = (("brk-count", "a.test"), ("brk-count", "b.test"));
        assert!(breakers.all_at_rest());

        // Successes and 429s on breakers at rest change nothing.
        let ha = breakers.handle(a.0, a.1);
        breakers.record(&ha, a, at(0), Outcome::Success, &policy);
        breakers.record(&ha, a, at(0), Outcome::Neutral, &policy);
        assert_eq!(breakers.unsettled(), 0);

        // One failure takes a breaker out of rest, though it is still closed.
        breakers.record(&ha, a, at(0), Outcome::Failure, &policy);
        assert_eq!(breakers.unsettled(), 1);
        assert!(!breakers.all_at_rest());
        let hb = breakers.handle(b.0, b.1);
        breakers.record(&hb, b, at(0), Outcome::Failure, &policy);
        assert_eq!(breakers.unsettled(), 2);

        // A second failure opens a: counted once, and in the gauge.
        breakers.record(&ha, a, at(1), Outcome::Failure, &policy);
        assert_eq!(breakers.unsettled(), 2);
        assert_eq!(open_gauge("brk-count"), 1);
        assert!(matches!(
            breakers.admit(&ha, t0 + Duration::from_secs(2), &policy),
            Pass::Reject(_)
        ));
        // The same breaker is found again by (connector, host).
        assert!(Arc::ptr_eq(&ha, &breakers.handle(a.0, a.1)));

        // b's success brings it back to rest; a's probe succeeding closes it.
        breakers.record(&hb, b, at(2), Outcome::Success, &policy);
        assert_eq!(breakers.unsettled(), 1);
        assert_eq!(
            breakers.admit(&ha, t0 + Duration::from_secs(40), &policy),
            Pass::Probe
        );
        breakers.record(&ha, a, at(40), Outcome::Success, &policy);
        assert_eq!(breakers.unsettled(), 0);
        assert!(breakers.all_at_rest());
        assert_eq!(open_gauge("brk-count"), 0);
    }

    #[test]
    fn a_breaker_the_map_lets_go_is_uncounted_and_leaves_the_gauge() {
        let breakers = Breakers::default();
        let policy = BreakerPolicy {
            failure_threshold: 1,
            open_for: Duration::from_secs(30),
        };
        let t0 = Instant::now();
        let key = ("brk-drop", "a.test");
        let held = breakers.handle(key.0, key.1);
        breakers.record(&held, key, || t0, Outcome::Failure, &policy);
        assert_eq!(breakers.unsettled(), 1);
        assert_eq!(open_gauge("brk-drop"), 1);

        // Idle expiry or capacity takes it out of the map: it no longer holds anything back.
        breakers.drop_all();
        assert!(breakers.all_at_rest());
        assert_eq!(open_gauge("brk-drop"), 0);

        // A request still holding it records its outcome there, and nothing is counted twice.
        breakers.record(&held, key, || t0, Outcome::Success, &policy);
        breakers.record(&held, key, || t0, Outcome::Failure, &policy);
        assert_eq!(breakers.unsettled(), 0);
        assert_eq!(open_gauge("brk-drop"), 0);

        // The host's next breaker starts at rest.
        let fresh = breakers.handle(key.0, key.1);
        assert!(!Arc::ptr_eq(&held, &fresh));
        assert!(lock_tracked(&fresh).breaker.at_rest());
    }
}
