//! Host names and domain allowlists.
//!
//! Hosts follow the one grammar of [`crate::names`] (re-exported here), so a pattern can only
//! be written in a form a request host can take.
//!
//! Patterns: `api.example.com` matches exactly that host. `*.example.com` matches every name
//! *below* `example.com` at any depth (`a.example.com`, `a.b.example.com`) but **not** the apex
//! `example.com`: list the apex separately when it is wanted. A wildcard needs at least two
//! labels after it (`*.com` is refused), and `*` may only be the whole leftmost label.

use crate::fastmap::FastMap as HashMap;
use std::fmt;

pub use crate::names::{Host, parse_host};
use crate::names::{is_numeric_label, parse_name};

/// One allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    /// Matches this host only.
    Exact(String),
    /// `*.suffix`: matches names strictly below `suffix`, at any depth.
    Wildcard(String),
}

impl DomainPattern {
    /// Parse and validate a pattern written in config.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (wildcard, rest) = match raw.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        if rest.contains('*') || (!wildcard && raw.contains('*')) {
            return Err(format!(
                "{raw:?}: '*' is only allowed as the whole leftmost label, as in \"*.example.com\""
            ));
        }
        if rest.starts_with('[') || rest.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "{raw:?}: IP literals are not allowed in allowlists"
            ));
        }
        let name = parse_name(rest).map_err(|e| format!("{raw:?}: {e}"))?;
        if is_numeric_label(name.rsplit('.').next().unwrap_or_default()) {
            return Err(format!(
                "{raw:?}: IP literals are not allowed in allowlists"
            ));
        }
        if wildcard {
            if !name.contains('.') {
                return Err(format!(
                    "{raw:?}: a wildcard needs at least two labels after '*.' (it would match a whole top-level domain)"
                ));
            }
            Ok(DomainPattern::Wildcard(name))
        } else {
            Ok(DomainPattern::Exact(name))
        }
    }

    /// Does this pattern match `host` (already normalised by [`parse_host`])?
    pub fn matches(&self, host: &str) -> bool {
        match self {
            DomainPattern::Exact(name) => host == name,
            DomainPattern::Wildcard(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(n) => f.write_str(n),
            DomainPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// Lists up to this long are scanned; longer ones are looked up through hash indexes. A scan
/// of a few patterns is a handful of byte compares, cheaper than hashing even one suffix.
const SCAN_LIMIT: usize = 8;

/// A validated allowlist. A host matches when any pattern matches it; IP literals never match.
///
/// When several patterns match, the one reported is the exact name if listed, else the most
/// specific wildcard (the longest suffix), whatever the order they were written in. Long lists
/// (an org allowlist naming every connector's domains, say) are indexed: an exact lookup plus
/// one lookup per label of the host, independent of the list's length.
#[derive(Debug, Clone, Default)]
pub struct DomainList {
    patterns: Vec<DomainPattern>,
    /// Exact name → index in `patterns`; empty for short lists.
    exact: HashMap<String, usize>,
    /// Wildcard suffix → index in `patterns`; empty for short lists.
    wildcard: HashMap<String, usize>,
}

impl PartialEq for DomainList {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

impl Eq for DomainList {}

impl DomainList {
    pub fn new(patterns: Vec<DomainPattern>) -> Self {
        let mut exact = HashMap::default();
        let mut wildcard = HashMap::default();
        if patterns.len() > SCAN_LIMIT {
            for (i, p) in patterns.iter().enumerate() {
                // A duplicate keeps its first index; both are the same pattern.
                match p {
                    DomainPattern::Exact(n) => exact.entry(n.clone()).or_insert(i),
                    DomainPattern::Wildcard(s) => wildcard.entry(s.clone()).or_insert(i),
                };
            }
        }
        Self {
            patterns,
            exact,
            wildcard,
        }
    }

    /// The pattern matching `host`, if any (explain prints it): the exact entry, else the
    /// longest wildcard suffix.
    pub fn matching(&self, host: &Host) -> Option<&DomainPattern> {
        let name = host.as_name()?;
        if self.patterns.len() <= SCAN_LIMIT {
            return self.scan(name);
        }
        if let Some(&i) = self.exact.get(name) {
            return Some(&self.patterns[i]);
        }
        // Suffixes after each dot, longest first: `a.b.example.com` tries `b.example.com`,
        // `example.com`, `com`. Each has at least one label in front of it, as a wildcard needs.
        let mut rest = name;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(&i) = self.wildcard.get(rest) {
                return Some(&self.patterns[i]);
            }
        }
        None
    }

    /// The same answer as the index, by looking at every pattern.
    fn scan(&self, name: &str) -> Option<&DomainPattern> {
        let mut best: Option<&DomainPattern> = None;
        for p in &self.patterns {
            if !p.matches(name) {
                continue;
            }
            match (p, best) {
                (DomainPattern::Exact(_), _) => return Some(p),
                (DomainPattern::Wildcard(s), Some(DomainPattern::Wildcard(b)))
                    if s.len() <= b.len() => {}
                _ => best = Some(p),
            }
        }
        best
    }

    pub fn patterns(&self) -> &[DomainPattern] {
        &self.patterns
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn list(patterns: &[&str]) -> DomainList {
        DomainList::new(
            patterns
                .iter()
                .map(|p| DomainPattern::parse(p).unwrap())
                .collect(),
        )
    }

    fn allowed(patterns: &[&str], host: &str) -> bool {
        let host = parse_host(host).unwrap();
        list(patterns).matching(&host).is_some()
    }

    #[test]
    fn patterns_rejected_at_load() {
        for bad in [
            "*",
            "*.",
            "*foo.com",
            "a.*.foo.com",
            "foo.*",
            "*.*.foo.com",
            "**.foo.com",
            "",
            ".",
            "a..b.com",
            ".foo.com",
            "foo.com..",
            "10.0.0.1",
            "[::1]",
            "::1",
            "127.1",
            "0x7f.0.0.1",
            "*.com",
            "*.10",
            "-a.com",
            "a-.com",
            "a_b.com",
            "ex ample.com",
            "exämple.com",
        ] {
            assert!(
                DomainPattern::parse(bad).is_err(),
                "{bad:?} should be refused"
            );
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(DomainPattern::parse(&long_label).is_err());
    }

    #[test]
    fn patterns_accepted_and_normalised() {
        assert_eq!(
            DomainPattern::parse("API.HubSpot.com.").unwrap(),
            DomainPattern::Exact("api.hubspot.com".into())
        );
        assert_eq!(
            DomainPattern::parse("*.Example.co.uk").unwrap(),
            DomainPattern::Wildcard("example.co.uk".into())
        );
        assert!(DomainPattern::parse("xn--bcher-kva.example").is_ok());
    }

    #[test]
    fn wildcard_semantics() {
        let p = ["*.salesforce.com"];
        assert!(allowed(&p, "api.salesforce.com"));
        assert!(allowed(&p, "a.b.salesforce.com"), "any depth");
        assert!(!allowed(&p, "salesforce.com"), "apex is not matched");
        assert!(allowed(
            &["*.salesforce.com", "salesforce.com"],
            "salesforce.com"
        ));
    }

    #[test]
    fn case_and_trailing_dot() {
        let p = ["api.hubspot.com"];
        assert!(allowed(&p, "API.HUBSPOT.COM"));
        assert!(allowed(&p, "api.hubspot.com."));
        assert!(parse_host("api.hubspot.com..").is_err());
        assert!(allowed(&["*.hubspot.com"], "Api.HubSpot.Com."));
    }

    #[test]
    fn each_label_is_judged_in_order() {
        let err = |h: &str| parse_host(h).unwrap_err();
        assert!(err("a..b").starts_with("empty label"));
        assert!(err(".a").starts_with("empty label"));
        assert!(err(&format!("{}.com", "a".repeat(64))).starts_with("label longer"));
        // Length is judged before the characters, as the label ends.
        assert!(err(&format!("{}_.com", "a".repeat(64))).starts_with("label longer"));
        assert!(err("api_x.com").contains("character outside"));
        assert!(
            err("b\u{fc}cher.de").contains("character outside"),
            "IDNs arrive as A-labels"
        );
        assert!(err("ok.\u{fc}").contains("character outside"));
        assert!(err("-a.com").contains("starts or ends"));
        assert!(err("a.com-").contains("starts or ends"));
        assert_eq!(
            parse_host(&format!("{}.Example-1.COM.", "a".repeat(63))).unwrap(),
            Host::Name(format!("{}.example-1.com", "a".repeat(63)))
        );
        assert!(err(&format!("{}.com", "a.".repeat(125))).starts_with("host longer"));
    }

    #[test]
    fn look_alikes_do_not_match() {
        let p = ["*.hubspot.com", "api.stripe.com"];
        for host in [
            "evilhubspot.com",
            "hubspot.com.evil.com",
            "api.hubspot.com.evil.com",
            "api.hubspot.co",
            "hubspot.com-evil.com",
            "api-stripe.com",
            "api.stripe.com.evil",
            "xapi.stripe.com",
            "a.api.stripe.com",
        ] {
            assert!(!allowed(&p, host), "{host} must not match");
        }
    }

    #[test]
    fn ip_literals_never_match_allowlists() {
        let host = parse_host("93.184.216.34").unwrap();
        assert_eq!(host, Host::V4(Ipv4Addr::new(93, 184, 216, 34)));
        assert!(list(&["*.example.com"]).matching(&host).is_none());
    }

    #[test]
    fn numeric_hosts_must_be_canonical() {
        for bad in [
            "2130706433",
            "0x7f000001",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "127.1",
            "127.0.1",
            "127.000.000.001",
            "1.2.3.4.5",
            "256.0.0.1",
            "1.2.3.0x4",
            "example.0x10",
            "example.123",
            "01.2.3.4",
        ] {
            assert!(parse_host(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(
            parse_host("127.0.0.1").unwrap(),
            Host::V4(Ipv4Addr::LOCALHOST)
        );
        assert_eq!(
            parse_host("0.0.0.0").unwrap(),
            Host::V4(Ipv4Addr::UNSPECIFIED)
        );
        assert!(matches!(parse_host("123.example.com"), Ok(Host::Name(_))));
        assert!(matches!(parse_host("0x7f.example.com"), Ok(Host::Name(_))));
    }

    #[test]
    fn ipv6_literals() {
        assert_eq!(parse_host("[::1]").unwrap(), Host::V6(Ipv6Addr::LOCALHOST));
        assert!(parse_host("[fe80::1%25eth0]").is_err());
        assert!(parse_host("[::1").is_err());
        assert!(parse_host("::1").is_err());
    }

    #[test]
    fn most_specific_pattern_is_reported_whatever_the_order() {
        let host = parse_host("a.eu.example.com").unwrap();
        let l = list(&["*.example.com", "*.eu.example.com"]);
        assert_eq!(l.matching(&host).unwrap().to_string(), "*.eu.example.com");
        let l = list(&["*.example.com", "a.eu.example.com", "*.eu.example.com"]);
        assert_eq!(l.matching(&host).unwrap().to_string(), "a.eu.example.com");
    }

    /// Long lists go through the index; it must give exactly what a scan gives.
    #[test]
    fn indexed_lists_answer_as_a_scan_does() {
        let mut patterns: Vec<String> = (0..500)
            .map(|i| {
                if i % 2 == 0 {
                    format!("api{i}.saas{}.example", i % 7)
                } else {
                    format!("*.tenant{i}.saas{}.example", i % 7)
                }
            })
            .collect();
        patterns.extend(["*.saas3.example".into(), "saas3.example".into()]);
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let indexed = list(&refs);
        assert!(indexed.patterns().len() > SCAN_LIMIT);
        for host in [
            "api0.saas0.example",
            "api2.saas2.example",
            "x.api0.saas0.example",
            "api1.saas1.example",
            "x.tenant1.saas1.example",
            "x.y.tenant1.saas1.example",
            "tenant1.saas1.example",
            "saas3.example",
            "deep.x.saas3.example",
            "api3.saas3.example",
            "example",
            "evil.example",
            "tenant1.saas1.example.evil",
        ] {
            let h = parse_host(host).unwrap();
            assert_eq!(
                indexed.matching(&h),
                indexed.scan(host),
                "index and scan disagree on {host}"
            );
        }
        let hit = |h: &str| {
            indexed
                .matching(&parse_host(h).unwrap())
                .map(|p| p.to_string())
        };
        assert_eq!(
            hit("api4.saas4.example").as_deref(),
            Some("api4.saas4.example")
        );
        assert_eq!(
            hit("x.tenant1.saas1.example").as_deref(),
            Some("*.tenant1.saas1.example")
        );
        assert_eq!(hit("tenant1.saas1.example"), None, "apex of a wildcard");
        assert_eq!(
            hit("api1.saas1.example"),
            None,
            "odd entries are wildcards only"
        );
        assert_eq!(
            hit("deep.x.saas3.example").as_deref(),
            Some("*.saas3.example")
        );
        assert_eq!(hit("saas3.example").as_deref(), Some("saas3.example"));
    }

    proptest::proptest! {
        /// Random lists over a tiny alphabet, so hosts and patterns overlap often.
        #[test]
        fn index_and_scan_agree(
            patterns in proptest::collection::vec("(\\*\\.)?[ab]{1,2}(\\.[ab]{1,2}){1,3}", 9..40),
            hosts in proptest::collection::vec("[ab]{1,2}(\\.[ab]{1,2}){0,4}", 1..20),
        ) {
            let parsed: Vec<DomainPattern> =
                patterns.iter().filter_map(|p| DomainPattern::parse(p).ok()).collect();
            let l = DomainList::new(parsed);
            for h in &hosts {
                let host = parse_host(h).unwrap();
                proptest::prop_assert_eq!(l.matching(&host), l.scan(h));
            }
        }
    }

    #[test]
    fn length_limits() {
        let label63 = "a".repeat(63);
        let ok = format!("{label63}.{label63}.{label63}.{}", "b".repeat(61));
        assert_eq!(ok.len(), 253);
        assert!(parse_host(&ok).is_ok());
        assert!(
            parse_host(&format!("{ok}.")).is_ok(),
            "trailing dot not counted"
        );
        assert!(parse_host(&format!("a{ok}")).is_err());
        assert!(parse_host(&format!("{}.com", "a".repeat(64))).is_err());
    }
}
