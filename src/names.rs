//! Names sluice parses before anything else looks at them: identifiers, hosts, authorities.
//!
//! A leaf module (nothing in the crate below it), shared by the request parser, the caller
//! table, the config loader and the credential store, so that one grammar serves each kind of
//! name everywhere.
//!
//! Hosts: one strict grammar serves request hosts and allowlist patterns
//! ([`crate::policy::domain`]) alike, so a pattern can only be written in a form a request
//! host can take:
//!
//! * ASCII letters, digits and `-`; labels of 1–63 bytes that neither start nor end with `-`;
//!   253 bytes at most. Internationalised names must arrive as punycode A-labels. No `_`.
//! * Case-insensitive (stored lowercased); one trailing dot is ignored.
//! * A host whose last label is numeric (`10`, `0x7f`) is an IPv4 literal and must be canonical
//!   dotted-quad (`127.0.0.1`): decimal, octal, hex and short forms (`2130706433`, `0177.1`,
//!   `127.1`) are refused, because resolvers and libraries disagree about what they mean.
//! * IPv6 literals only in brackets (`[2001:db8::1]`), no zone identifiers.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Identifiers (connector, workspace, org, caller names, `X-Connector`/`X-Workspace` values):
/// 1–128 bytes of ASCII letters, digits, `_`, `-`, `.`, starting with a letter or digit.
pub fn is_identifier(s: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s[0].is_ascii_alphanumeric()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A request host after strict parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A DNS name, lowercased, without a trailing dot.
    Name(String),
    /// A canonical dotted-quad IPv4 literal.
    V4(Ipv4Addr),
    /// A bracketed IPv6 literal.
    V6(Ipv6Addr),
}

impl Host {
    /// The name as sent in SNI and `Host` (IPv6 in brackets).
    pub fn as_name(&self) -> Option<&str> {
        match self {
            Host::Name(n) => Some(n),
            _ => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::V4(ip) => write!(f, "{ip}"),
            Host::V6(ip) => write!(f, "[{ip}]"),
        }
    }
}

/// Parse a host as it appears in an authority (`Host` header or absolute-form target).
pub fn parse_host(raw: &str) -> Result<Host, String> {
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| "unterminated IPv6 literal".to_string())?;
        return inner
            .parse::<Ipv6Addr>()
            .map(Host::V6)
            .map_err(|_| "invalid IPv6 literal".to_string());
    }
    let name = parse_name(raw)?;
    let last_label = name
        .rfind('.')
        .map_or(name.as_str(), |dot| &name[dot + 1..]);
    if is_numeric_label(last_label) {
        return canonical_ipv4(&name)
            .map(Host::V4)
            .ok_or_else(|| format!("numeric host {raw:?} is not a canonical dotted-quad IPv4"));
    }
    Ok(Host::Name(name))
}

/// Validate and normalise a DNS name (lowercase, no trailing dot). Does not judge numeric forms.
pub(crate) fn parse_name(raw: &str) -> Result<String, String> {
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    if trimmed.is_empty() {
        return Err("empty host".into());
    }
    if trimmed.len() > MAX_NAME_LEN {
        return Err(format!("host longer than {MAX_NAME_LEN} bytes"));
    }
    // One pass over the bytes (every request's host comes through here); each label is
    // judged when its end is reached, by the checks below in this order.
    let bytes = trimmed.as_bytes();
    let (mut start, mut bad_byte) = (0, false);
    for end in 0..=bytes.len() {
        match bytes.get(end) {
            Some(b'.') | None => {}
            Some(&b) => {
                bad_byte |= !(b.is_ascii_alphanumeric() || b == b'-');
                continue;
            }
        }
        // `start` and `end` sit next to a '.' or at an end of the string: char boundaries.
        let label = &trimmed[start..end];
        if label.is_empty() {
            return Err(format!("empty label in {raw:?}"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("label longer than {MAX_LABEL_LEN} bytes in host"));
        }
        if bad_byte {
            return Err(format!(
                "host {raw:?} has a character outside letters, digits and '-'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
        start = end + 1;
    }
    Ok(trimmed.to_ascii_lowercase())
}

/// A label a URL parser would read as a number: all digits, or `0x` followed by hex digits.
pub(crate) fn is_numeric_label(label: &str) -> bool {
    let l = label.as_bytes();
    if l.len() >= 2 && l[0] == b'0' && (l[1] | 0x20) == b'x' {
        return l[2..].iter().all(u8::is_ascii_hexdigit);
    }
    !l.is_empty() && l.iter().all(u8::is_ascii_digit)
}

/// Exactly four decimal octets, 0–255, no leading zeros.
fn canonical_ipv4(name: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = name.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty()
            || part.len() > 3
            || (part.len() > 1 && part.starts_with('0'))
            || !part.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// `host[:port]`, strictly: no userinfo, no empty or non-decimal port, IPv6 only in brackets.
pub fn parse_authority(authority: &str) -> Result<(Host, Option<u16>), String> {
    if authority.contains('@') {
        return Err("userinfo in the authority is not allowed".into());
    }
    let (host, port) = if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or_else(|| "unterminated IPv6 literal".to_string())?;
        let (host, rest) = authority.split_at(close + 1);
        match rest {
            "" => (host, None),
            _ => (
                host,
                Some(
                    rest.strip_prefix(':')
                        .ok_or_else(|| "junk after IPv6 literal".to_string())?,
                ),
            ),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = port.map(parse_port).transpose()?;
    let host = parse_host(host)?;
    Ok((host, port))
}

fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty()
        || p.len() > 5
        || !p.bytes().all(|b| b.is_ascii_digit())
        || (p.len() > 1 && p.starts_with('0'))
    {
        return Err(format!("port {p:?} is not a decimal port number"));
    }
    match p.parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!("port {p} is out of range")),
    }
}
