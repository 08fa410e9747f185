//! When a failed attempt is tried again, and after how long.
//!
//! * **What.** Connect failures (nothing reached the upstream, so any method), and responses
//!   429, 502, 503, 504 for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE) or requests
//!   carrying `Idempotency-Key`. Never another 4xx; never a non-idempotent request once bytes
//!   reached the upstream; never a body larger than the replay buffer.
//! * **When.** Exponential backoff with full jitter (a random delay up to
//!   `min(max_delay, base × 2^retry)`), or the response's `Retry-After` when it is at most
//!   `retry_after_cap` (a longer one is relayed to the app instead).
//! * **How long.** At most `max_attempts` attempts and `budget` in all, from the request's
//!   start; a retry that would end past the budget is not made.

use std::time::Duration;

use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// `[connector.retry]` as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_cap_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_ms: Option<u64>,
}

/// A connector's validated retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: no retries).
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub retry_after_cap: Duration,
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            retry_after_cap: Duration::from_secs(5),
            budget: Duration::from_secs(15),
        }
    }
}

/// pingora counts attempts per request up to this; the policy stops earlier.
pub const MAX_ATTEMPTS: u32 = 10;

impl RetryPolicy {
    pub fn build(f: &RetryFile) -> Result<Self, Vec<(String, String)>> {
        let d = Self::default();
        let p = Self {
            max_attempts: f.max_attempts.unwrap_or(d.max_attempts),
            base_delay: f.base_delay_ms.map_or(d.base_delay, Duration::from_millis),
            max_delay: f.max_delay_ms.map_or(d.max_delay, Duration::from_millis),
            retry_after_cap: f
                .retry_after_cap_ms
                .map_or(d.retry_after_cap, Duration::from_millis),
            budget: f.budget_ms.map_or(d.budget, Duration::from_millis),
        };
        let mut errors = Vec::new();
        if !(1..=MAX_ATTEMPTS).contains(&p.max_attempts) {
            errors.push((
                "max_attempts".into(),
                format!("must be 1 to {MAX_ATTEMPTS}"),
            ));
        }
        if p.max_delay < p.base_delay {
            errors.push((
                "max_delay_ms".into(),
                "must be at least base_delay_ms".into(),
            ));
        }
        if errors.is_empty() {
            Ok(p)
        } else {
            Err(errors)
        }
    }

    /// The full-jitter backoff before retry number `retry` (1 = the first retry), given a
    /// uniform random `unit` in [0, 1).
    pub fn backoff(&self, retry: u32, unit: f64) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
        exp.min(self.max_delay).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The delay before the next attempt, or `None` when there must be none.
    /// `attempts`: made so far; `elapsed`: since the request started.
    pub fn next_delay(
        &self,
        attempts: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> Option<Duration> {
        if attempts >= self.max_attempts {
            return None;
        }
        let delay = match retry_after {
            Some(ra) if ra > self.retry_after_cap => return None,
            Some(ra) => ra,
            None => self.backoff(attempts, unit),
        };
        (elapsed + delay < self.budget).then_some(delay)
    }
}

/// Safe to send twice: idempotent by method, or made so by the app's `Idempotency-Key`.
pub fn replay_safe(method: &Method, has_idempotency_key: bool) -> bool {
    has_idempotency_key
        || matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
        )
}

/// Response statuses worth another attempt.
pub fn retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 1.0), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(400));
        assert_eq!(
            p.backoff(30, 1.0),
            Duration::from_secs(2),
            "capped at max_delay"
        );
        assert_eq!(
            p.backoff(3, 0.5),
            Duration::from_millis(200),
            "a uniform share of the cap"
        );
        assert_eq!(p.backoff(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn attempts_budget_and_retry_after() {
        let p = RetryPolicy::default();
        assert_eq!(
            p.next_delay(1, Duration::ZERO, None, 1.0),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            p.next_delay(3, Duration::ZERO, None, 1.0),
            None,
            "three attempts in all"
        );
        assert_eq!(
            p.next_delay(1, Duration::ZERO, Some(Duration::from_secs(3)), 1.0),
            Some(Duration::from_secs(3)),
            "Retry-After honoured"
        );
        assert_eq!(
            p.next_delay(1, Duration::ZERO, Some(Duration::from_secs(6)), 1.0),
            None,
            "beyond the cap: relayed"
        );
        assert_eq!(
            p.next_delay(1, Duration::from_millis(14_950), None, 1.0),
            None,
            "would end past the budget"
        );
    }

    #[test]
    fn what_is_safe_and_worth_retrying() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(replay_safe(&m, false), "{m}");
        }
        assert!(!replay_safe(&Method::POST, false));
        assert!(!replay_safe(&Method::PATCH, false));
        assert!(replay_safe(&Method::POST, true));
        for s in [429, 502, 503, 504] {
            assert!(retryable_status(StatusCode::from_u16(s).unwrap()));
        }
        for s in [200, 400, 401, 403, 404, 409, 500, 501] {
            assert!(!retryable_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }

    #[test]
    fn config_validation() {
        assert!(
            RetryPolicy::build(&RetryFile {
                max_attempts: Some(0),
                ..RetryFile::default()
            })
            .is_err()
        );
        assert!(
            RetryPolicy::build(&RetryFile {
                max_attempts: Some(11),
                ..RetryFile::default()
            })
            .is_err()
        );
        assert!(
            RetryPolicy::build(&RetryFile {
                base_delay_ms: Some(5000),
                ..RetryFile::default()
            })
            .is_err()
        );
        assert_eq!(
            RetryPolicy::build(&RetryFile::default()).unwrap(),
            RetryPolicy::default()
        );
    }
}
