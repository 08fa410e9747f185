//! `[connector.rate_limit]`: the file's form and the validated pacing rules.

use std::time::Duration;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use super::headers::{HeaderSpec, ResetFormat};
use crate::label::Choice;

/// `[connector.rate_limit]` as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<Choice<BucketScope>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_wait_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_of_limit_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_format: Option<Choice<ResetFormat>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
}

/// `min_wait_ms` by default: the resolution of tokio's timer, which rounds every sleep up to
/// the next millisecond tick. A shorter wait would cost a timer and a wake-up of an idle
/// thread, and still end up to a millisecond late.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// The largest `min_wait_ms` accepted: beyond this it is no longer timer slack but a bigger
/// burst, which is what `capacity` is for.
const MAX_MIN_WAIT_MS: u64 = 100;

/// Whose calls a connector's bucket counts (`rate_limit.scope`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr, strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum BucketScope {
    /// One bucket per workspace: each tenant has its own budget at the API.
    Workspace,
    /// One bucket for the whole connector: the API limits the application.
    Application,
}

/// A connector's validated pacing rules.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Starting (capacity, per second); `None`: unlimited until headers say otherwise.
    pub initial: Option<(u32, f64)>,
    /// One bucket for every workspace of the connector.
    pub per_application: bool,
    pub max_wait: Duration,
    /// A turn due sooner than this is not waited for: the request goes at once, still
    /// counted against the bucket (see [`super::bucket::Bucket::admit_within`]).
    pub min_wait: Duration,
    pub queue_size: usize,
    pub headers: HeaderSpec,
    /// The bucket lives in Redis, shared by every replica.
    pub shared: bool,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            initial: None,
            per_application: false,
            max_wait: Duration::from_millis(1000),
            min_wait: MIN_WAIT,
            queue_size: 64,
            headers: HeaderSpec::default(),
            shared: false,
        }
    }
}

impl RateLimit {
    pub fn build(f: &RateLimitFile) -> Result<Self, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let d = RateLimit::default();
        let initial = match (f.capacity, f.per_second) {
            (Some(c), Some(r)) if c > 0 && r > 0.0 && r.is_finite() => Some((c, r)),
            (None, None) => None,
            _ => {
                errors.push((
                    "capacity".into(),
                    "set capacity (> 0) and per_second (> 0) together".into(),
                ));
                None
            }
        };
        let scope = f
            .scope
            .as_ref()
            .map_or(Ok(BucketScope::Workspace), Choice::get);
        let per_application = scope.unwrap_or_else(|e| {
            errors.push(("scope".into(), e));
            BucketScope::Workspace
        }) == BucketScope::Application;
        let reset_format = f
            .reset_format
            .as_ref()
            .map_or(Ok(ResetFormat::Auto), Choice::get)
            .unwrap_or_else(|e| {
                errors.push(("reset_format".into(), e));
                ResetFormat::Auto
            });
        let shared = f.shared.unwrap_or(false);
        if f.min_wait_ms.is_some_and(|ms| ms > MAX_MIN_WAIT_MS) {
            errors.push((
                "min_wait_ms".into(),
                format!("at most {MAX_MIN_WAIT_MS} (it widens every burst)"),
            ));
        }
        if shared && initial.is_none() {
            errors.push((
                "shared".into(),
                "a shared budget needs capacity and per_second".into(),
            ));
        }
        let mut header_name = |key: &str, n: &str| match HeaderName::from_bytes(n.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                errors.push((key.into(), format!("{n:?} is not a header name")));
                None
            }
        };
        let spec = HeaderSpec::default();
        let mut names = |key: &str, n: &Option<String>, default: &[HeaderName]| match n {
            None => default.to_vec(),
            Some(n) => header_name(key, n).into_iter().collect(),
        };
        let limit = names("limit_header", &f.limit_header, &spec.limit);
        let remaining = names("remaining_header", &f.remaining_header, &spec.remaining);
        let reset = names("reset_header", &f.reset_header, &spec.reset);
        let used_of_limit = f
            .used_of_limit_header
            .as_ref()
            .and_then(|n| header_name("used_of_limit_header", n));
        let rl = RateLimit {
            initial,
            per_application,
            max_wait: f.max_wait_ms.map_or(d.max_wait, Duration::from_millis),
            min_wait: f.min_wait_ms.map_or(d.min_wait, Duration::from_millis),
            queue_size: f.queue_size.unwrap_or(d.queue_size),
            headers: HeaderSpec {
                limit,
                remaining,
                reset,
                used_of_limit,
                reset_format,
            },
            shared,
        };
        if errors.is_empty() {
            Ok(rl)
        } else {
            Err(errors)
        }
    }
}
