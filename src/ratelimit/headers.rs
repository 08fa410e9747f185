//! Learning an API's rate limit from its response headers.
//!
//! Recognised, in this order of preference (a connector may name its own headers):
//!
//! | form | headers |
//! |---|---|
//! | IETF structured | `RateLimit: "default";r=50;t=30` with `RateLimit-Policy: "default";q=100;w=60`, and the older `RateLimit: limit=100, remaining=50, reset=30` |
//! | IETF draft | `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (delta seconds) |
//! | de facto | `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` |
//! | used/limit | e.g. Shopify's `X-Shopify-Shop-Api-Call-Limit: 32/40` (configured by name) |
//! | any | `Retry-After`: delta seconds or an HTTP-date |
//!
//! A reset value's unit is detected: at least 10^12 is epoch milliseconds; at least 10^9 is
//! epoch seconds (a delta that large would be over 31 years); anything smaller is a delta in
//! seconds. A connector can fix the format instead (`reset_format`). Garbage is ignored,
//! never an error: a header that does not parse contributes nothing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName};

/// What one response said about the limit. Every field is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Learned {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// When the window resets, from now.
    pub reset_after: Option<Duration>,
    /// `Retry-After`, from now.
    pub retry_after: Option<Duration>,
    /// The window length, when the policy states it.
    pub window: Option<Duration>,
}

impl Learned {
    pub fn is_empty(&self) -> bool {
        *self == Learned::default()
    }
}

/// How a connector's reset values are to be read (`reset_format`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[strum(serialize_all = "snake_case")]
pub enum ResetFormat {
    #[default]
    Auto,
    DeltaSeconds,
    #[strum(serialize = "delta_ms")]
    DeltaMillis,
    EpochSeconds,
    #[strum(serialize = "epoch_ms")]
    EpochMillis,
}

/// Which headers a connector's API uses, parsed once at config load (a lookup by a string
/// name would parse and validate the name again on every response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderSpec {
    pub limit: Vec<HeaderName>,
    pub remaining: Vec<HeaderName>,
    pub reset: Vec<HeaderName>,
    /// A `used/limit` header, e.g. Shopify's.
    pub used_of_limit: Option<HeaderName>,
    pub reset_format: ResetFormat,
}

const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

impl Default for HeaderSpec {
    fn default() -> Self {
        let names = |ietf: &'static str, de_facto: &'static str| {
            vec![
                HeaderName::from_static(ietf),
                HeaderName::from_static(de_facto),
            ]
        };
        Self {
            limit: names("ratelimit-limit", "x-ratelimit-limit"),
            remaining: names("ratelimit-remaining", "x-ratelimit-remaining"),
            reset: names("ratelimit-reset", "x-ratelimit-reset"),
            used_of_limit: None,
            reset_format: ResetFormat::Auto,
        }
    }
}

impl HeaderSpec {
    /// Whether the response has any header `learn` reads. Most responses have none: one pass
    /// over the few names a response has (standard ones compare by tag) is cheaper than a
    /// hashed lookup for each name `learn` would try.
    pub fn present_in(&self, headers: &HeaderMap) -> bool {
        headers.keys().any(|name| self.reads(name))
    }

    /// Whether `learn` reads a header of this name.
    fn reads(&self, name: &HeaderName) -> bool {
        name == http::header::RETRY_AFTER
            || name == RATELIMIT
            || name == RATELIMIT_POLICY
            || self.limit.contains(name)
            || self.remaining.contains(name)
            || self.reset.contains(name)
            || self.used_of_limit.as_ref() == Some(name)
    }
}

fn first_u64(headers: &HeaderMap, names: &[HeaderName]) -> Option<u64> {
    names.iter().find_map(|n| {
        let v = headers.get(n)?.to_str().ok()?.trim();
        // Some APIs send "100, 100;w=60": the first number counts.
        let digits: &str = v.split([',', ';', ' ']).next()?;
        digits.parse::<u64>().ok()
    })
}

fn reset_duration(value: u64, format: ResetFormat, now: SystemTime) -> Option<Duration> {
    let epoch = |at: Duration| {
        let now = now.duration_since(UNIX_EPOCH).ok()?;
        Some(at.saturating_sub(now))
    };
    match format {
        ResetFormat::DeltaSeconds => Some(Duration::from_secs(value)),
        ResetFormat::DeltaMillis => Some(Duration::from_millis(value)),
        ResetFormat::EpochSeconds => epoch(Duration::from_secs(value)),
        ResetFormat::EpochMillis => epoch(Duration::from_millis(value)),
        ResetFormat::Auto if value >= 1_000_000_000_000 => epoch(Duration::from_millis(value)),
        ResetFormat::Auto if value >= 1_000_000_000 => epoch(Duration::from_secs(value)),
        ResetFormat::Auto => Some(Duration::from_secs(value)),
    }
}

/// `Retry-After`: delta seconds or an HTTP-date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Parameters of a structured-field item: `"name";r=50;t=30` or `limit=100, remaining=5`.
fn sf_params(value: &str) -> impl Iterator<Item = (&str, u64)> {
    value.split([';', ',']).filter_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        Some((k.trim(), v.trim().trim_matches('"').parse::<u64>().ok()?))
    })
}

/// Everything the headers say.
pub fn learn(headers: &HeaderMap, spec: &HeaderSpec, now: SystemTime) -> Learned {
    if !spec.present_in(headers) {
        return Learned::default();
    }
    let mut l = Learned {
        retry_after: retry_after(headers, now),
        ..Learned::default()
    };
    // IETF structured fields.
    if let Some(v) = headers.get(RATELIMIT).and_then(|v| v.to_str().ok()) {
        for (k, n) in sf_params(v) {
            match k {
                "r" | "remaining" => l.remaining = Some(n),
                "t" | "reset" => l.reset_after = Some(Duration::from_secs(n)),
                "limit" => l.limit = Some(n),
                _ => {}
            }
        }
    }
    if let Some(v) = headers.get(RATELIMIT_POLICY).and_then(|v| v.to_str().ok()) {
        for (k, n) in sf_params(v) {
            match k {
                "q" => l.limit = l.limit.or(Some(n)),
                "w" => l.window = Some(Duration::from_secs(n)),
                _ => {}
            }
        }
    }
    // Separate headers (IETF draft, then de facto, or the connector's names).
    l.limit = l.limit.or_else(|| first_u64(headers, &spec.limit));
    l.remaining = l.remaining.or_else(|| first_u64(headers, &spec.remaining));
    if l.reset_after.is_none() {
        l.reset_after =
            first_u64(headers, &spec.reset).and_then(|v| reset_duration(v, spec.reset_format, now));
    }
    // used/limit.
    if let Some(name) = &spec.used_of_limit {
        if let Some((used, limit)) = headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once('/'))
            .and_then(|(u, t)| Some((u.trim().parse::<u64>().ok()?, t.trim().parse::<u64>().ok()?)))
        {
            l.limit = Some(limit);
            l.remaining = Some(limit.saturating_sub(used));
        }
    }
    // A remaining count above the limit is nonsense: believe the limit.
    if let (Some(limit), Some(rem)) = (l.limit, l.remaining) {
        l.remaining = Some(rem.min(limit));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::tests::headers;
    use http::HeaderValue;
    use proptest::prelude::*;

    const NOW: u64 = 1_800_000_000; // a fixed wall clock, 2027

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn learned(pairs: &[(&str, &str)]) -> Learned {
        learn(&headers(pairs), &HeaderSpec::default(), now())
    }

    #[test]
    fn de_facto_headers_and_reset_units() {
        let l = learned(&[
            ("X-RateLimit-Limit", "100"),
            ("X-RateLimit-Remaining", "7"),
            ("X-RateLimit-Reset", "30"),
        ]);
        assert_eq!(
            (l.limit, l.remaining, l.reset_after),
            (Some(100), Some(7), Some(Duration::from_secs(30)))
        );
        let epoch_s = (NOW + 45).to_string();
        assert_eq!(
            learned(&[("x-ratelimit-reset", &epoch_s)]).reset_after,
            Some(Duration::from_secs(45))
        );
        let epoch_ms = ((NOW + 2) * 1000 + 500).to_string();
        assert_eq!(
            learned(&[("x-ratelimit-reset", &epoch_ms)]).reset_after,
            Some(Duration::from_millis(2500))
        );
        let past = (NOW - 10).to_string();
        assert_eq!(
            learned(&[("x-ratelimit-reset", &past)]).reset_after,
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn ietf_forms() {
        let l = learned(&[
            ("RateLimit-Limit", "10"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", "5"),
        ]);
        assert_eq!(
            (l.limit, l.remaining, l.reset_after),
            (Some(10), Some(0), Some(Duration::from_secs(5)))
        );
        let l = learned(&[
            ("RateLimit", "\"default\";r=50;t=30"),
            ("RateLimit-Policy", "\"default\";q=100;w=60"),
        ]);
        assert_eq!(
            (l.limit, l.remaining, l.reset_after, l.window),
            (
                Some(100),
                Some(50),
                Some(Duration::from_secs(30)),
                Some(Duration::from_secs(60))
            )
        );
        let l = learned(&[("RateLimit", "limit=100, remaining=5, reset=12")]);
        assert_eq!(
            (l.limit, l.remaining, l.reset_after),
            (Some(100), Some(5), Some(Duration::from_secs(12)))
        );
    }

    #[test]
    fn retry_after_both_forms() {
        assert_eq!(
            learned(&[("Retry-After", "120")]).retry_after,
            Some(Duration::from_secs(120))
        );
        let date = httpdate::fmt_http_date(now() + Duration::from_secs(90));
        assert_eq!(
            learned(&[("Retry-After", &date)]).retry_after,
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn per_connector_names_and_used_of_limit() {
        let spec = HeaderSpec {
            limit: vec![HeaderName::from_static("x-ratelimit-limit")],
            remaining: vec![HeaderName::from_static("x-ratelimit-remaining")],
            reset: vec![HeaderName::from_static("x-ratelimit-reset")],
            used_of_limit: Some(HeaderName::from_static("x-shopify-shop-api-call-limit")),
            reset_format: ResetFormat::EpochSeconds,
        };
        let l = learn(
            &headers(&[("X-Shopify-Shop-Api-Call-Limit", "32/40")]),
            &spec,
            now(),
        );
        assert_eq!((l.limit, l.remaining), (Some(40), Some(8)));
        // GitHub: epoch seconds, lowercase names.
        let reset = (NOW + 60).to_string();
        let l = learn(
            &headers(&[
                ("x-ratelimit-limit", "5000"),
                ("x-ratelimit-remaining", "4999"),
                ("x-ratelimit-reset", &reset),
            ]),
            &spec,
            now(),
        );
        assert_eq!(
            (l.limit, l.remaining, l.reset_after),
            (Some(5000), Some(4999), Some(Duration::from_secs(60)))
        );
    }

    #[test]
    fn garbage_is_ignored() {
        for (k, v) in [
            ("x-ratelimit-limit", "lots"),
            ("x-ratelimit-remaining", "-1"),
            ("x-ratelimit-reset", "soon"),
            ("retry-after", "tomorrow"),
            ("ratelimit", "r=;t=x;;=="),
            ("ratelimit-policy", "\"\";q=;w=-4"),
        ] {
            assert!(learned(&[(k, v)]).is_empty(), "{k}: {v}");
        }
        let l = learned(&[("x-ratelimit-limit", "10"), ("x-ratelimit-remaining", "99")]);
        assert_eq!(l.remaining, Some(10), "remaining is capped at the limit");
    }

    proptest! {
        /// Arbitrary header values never panic, and never produce a reset beyond any
        /// timestamp's reach (u64 seconds).
        #[test]
        fn parsing_never_panics(values in proptest::collection::vec("[ -~]{0,40}", 8)) {
            let names = ["ratelimit", "ratelimit-policy", "ratelimit-limit", "ratelimit-remaining",
                         "x-ratelimit-reset", "retry-after", "x-shopify-shop-api-call-limit", "x-ratelimit-limit"];
            let mut h = HeaderMap::new();
            for (name, value) in names.iter().zip(&values) {
                if let Ok(v) = HeaderValue::from_str(value) {
                    h.insert(*name, v);
                }
            }
            let spec = HeaderSpec { used_of_limit: Some(HeaderName::from_static("x-shopify-shop-api-call-limit")), ..HeaderSpec::default() };
            let l = learn(&h, &spec, now());
            if let (Some(limit), Some(rem)) = (l.limit, l.remaining) {
                prop_assert!(rem <= limit);
            }
        }

        #[test]
        fn numeric_resets_are_classified(v in 0u64..u64::MAX) {
            let l = learn(&headers(&[("x-ratelimit-reset", &v.to_string())]), &HeaderSpec::default(), now());
            let d = l.reset_after.unwrap();
            if v < 1_000_000_000 {
                prop_assert_eq!(d, Duration::from_secs(v));
            } else {
                // An epoch: never longer than the distance from now to that epoch.
                prop_assert!(d <= Duration::from_secs(v.saturating_sub(NOW.min(v))) || v >= 1_000_000_000_000);
            }
        }
    }
}
