//! A circuit breaker per (connector, upstream host).
//!
//! Closed: requests pass; `failure_threshold` consecutive transient failures (connect
//! failures, broken exchanges, 502/503/504) open it. Open: requests fail fast with 503
//! `circuit_open` and `Retry-After` until `open_ms` has passed. Half-open: one request goes
//! through as a probe; its success closes the breaker, its failure opens it again. A probe
//! that never reports back (its client left) is replaced after `open_ms`. Other 4xx are the
//! caller's problem and count as successes (the upstream answered); 429s are the bucket's
//! business and change nothing. Time is passed in.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

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
}
