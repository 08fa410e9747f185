//! Address classes: which destinations are globally routable and which are special-purpose.
//!
//! The table is data: IANA's IPv4 and IPv6 Special-Purpose Address Registries
//! (iana.org/assignments/iana-ipv4-special-registry, …/iana-ipv6-special-registry) plus the
//! blocks attackers use (cloud metadata, CGNAT, multicast, reserved). More specific blocks come
//! first, so the first match is the longest prefix. `std`'s `is_global` is unstable and wrong for
//! this purpose; it is not used.
//!
//! IPv4-mapped (`::ffff:0:0/96`) and NAT64 well-known-prefix (`64:ff9b::/96`) addresses are
//! judged by the IPv4 address they embed: `::ffff:127.0.0.1` is loopback, `64:ff9b::8.8.8.8`
//! is public. Other IPv4-embedding forms (IPv4-compatible `::/96`, 6to4 `2002::/16`, Teredo in
//! `2001::/23`, NAT64 local-use `64:ff9b:1::/48`) are refused outright.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of address a destination is. The names double as log and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddrClass {
    Public,
    ThisNetwork,
    Private,
    SharedAddressSpace,
    Loopback,
    LinkLocal,
    IetfProtocol,
    Documentation,
    As112,
    Amt,
    Relay6to4,
    Benchmarking,
    Multicast,
    Reserved,
    Broadcast,
    Unspecified,
    Ipv4Compatible,
    Nat64LocalUse,
    DiscardOnly,
    DummyPrefix,
    SixToFour,
    Srv6Sid,
    UniqueLocal,
    SiteLocal,
}

impl AddrClass {
    pub const fn as_str(self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::ThisNetwork => "this_network",
            AddrClass::Private => "private",
            AddrClass::SharedAddressSpace => "shared_address_space",
            AddrClass::Loopback => "loopback",
            AddrClass::LinkLocal => "link_local",
            AddrClass::IetfProtocol => "ietf_protocol_assignment",
            AddrClass::Documentation => "documentation",
            AddrClass::As112 => "as112",
            AddrClass::Amt => "amt",
            AddrClass::Relay6to4 => "6to4_relay_anycast",
            AddrClass::Benchmarking => "benchmarking",
            AddrClass::Multicast => "multicast",
            AddrClass::Reserved => "reserved",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Ipv4Compatible => "ipv4_compatible",
            AddrClass::Nat64LocalUse => "nat64_local_use",
            AddrClass::DiscardOnly => "discard_only",
            AddrClass::DummyPrefix => "dummy_prefix",
            AddrClass::SixToFour => "6to4",
            AddrClass::Srv6Sid => "srv6_sid",
            AddrClass::UniqueLocal => "unique_local",
            AddrClass::SiteLocal => "site_local",
        }
    }

    pub fn is_public(self) -> bool {
        self == AddrClass::Public
    }
}

impl fmt::Display for AddrClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IPv4 special-purpose blocks: (network, prefix length, class). Specific before general.
pub const V4_BLOCKS: &[(u32, u8, AddrClass)] = &[
    (0x0000_0000, 8, AddrClass::ThisNetwork), // 0.0.0.0/8
    (0x0a00_0000, 8, AddrClass::Private),     // 10.0.0.0/8
    (0x6440_0000, 10, AddrClass::SharedAddressSpace), // 100.64.0.0/10
    (0x7f00_0000, 8, AddrClass::Loopback),    // 127.0.0.0/8
    (0xa9fe_0000, 16, AddrClass::LinkLocal),  // 169.254.0.0/16
    (0xac10_0000, 12, AddrClass::Private),    // 172.16.0.0/12
    (0xc000_0000, 24, AddrClass::IetfProtocol), // 192.0.0.0/24
    (0xc000_0200, 24, AddrClass::Documentation), // 192.0.2.0/24
    (0xc01f_c400, 24, AddrClass::As112),      // 192.31.196.0/24
    (0xc034_c100, 24, AddrClass::Amt),        // 192.52.193.0/24
    (0xc058_6300, 24, AddrClass::Relay6to4),  // 192.88.99.0/24
    (0xc0a8_0000, 16, AddrClass::Private),    // 192.168.0.0/16
    (0xc0af_3000, 24, AddrClass::As112),      // 192.175.48.0/24
    (0xc612_0000, 15, AddrClass::Benchmarking), // 198.18.0.0/15
    (0xc633_6400, 24, AddrClass::Documentation), // 198.51.100.0/24
    (0xcb00_7100, 24, AddrClass::Documentation), // 203.0.113.0/24
    (0xe000_0000, 4, AddrClass::Multicast),   // 224.0.0.0/4
    (0xffff_ffff, 32, AddrClass::Broadcast),  // 255.255.255.255/32 (inside 240/4)
    (0xf000_0000, 4, AddrClass::Reserved),    // 240.0.0.0/4
];

/// What an IPv6 block means: a class, or "judge the IPv4 address in the low 32 bits".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6Rule {
    Class(AddrClass),
    EmbedsIpv4,
}

/// IPv6 special-purpose blocks: (network, prefix length, rule). Specific before general.
pub const V6_BLOCKS: &[(u128, u8, V6Rule)] = &[
    (0, 128, V6Rule::Class(AddrClass::Unspecified)), // ::/128
    (1, 128, V6Rule::Class(AddrClass::Loopback)),    // ::1/128
    (0xffff_0000_0000, 96, V6Rule::EmbedsIpv4),      // ::ffff:0:0/96
    (0, 96, V6Rule::Class(AddrClass::Ipv4Compatible)), // ::/96
    (0x0064_ff9b << 96, 96, V6Rule::EmbedsIpv4),     // 64:ff9b::/96
    (
        0x0064_ff9b_0001 << 80,
        48,
        V6Rule::Class(AddrClass::Nat64LocalUse),
    ), // 64:ff9b:1::/48
    (0x0100 << 112, 64, V6Rule::Class(AddrClass::DiscardOnly)), // 100::/64
    (
        0x0100_0000_0000_0001 << 64,
        64,
        V6Rule::Class(AddrClass::DummyPrefix),
    ), // 100:0:0:1::/64
    (0x2001 << 112, 23, V6Rule::Class(AddrClass::IetfProtocol)), // 2001::/23
    (
        0x2001_0db8 << 96,
        32,
        V6Rule::Class(AddrClass::Documentation),
    ), // 2001:db8::/32
    (0x2002 << 112, 16, V6Rule::Class(AddrClass::SixToFour)), // 2002::/16
    (0x3fff << 112, 20, V6Rule::Class(AddrClass::Documentation)), // 3fff::/20
    (0x5f00 << 112, 16, V6Rule::Class(AddrClass::Srv6Sid)), // 5f00::/16
    (0xfc00 << 112, 7, V6Rule::Class(AddrClass::UniqueLocal)), // fc00::/7
    (0xfe80 << 112, 10, V6Rule::Class(AddrClass::LinkLocal)), // fe80::/10
    (0xfec0 << 112, 10, V6Rule::Class(AddrClass::SiteLocal)), // fec0::/10
    (0xff00 << 112, 8, V6Rule::Class(AddrClass::Multicast)), // ff00::/8
];

/// Classify an IPv4 address.
pub fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let bits = u32::from(ip);
    for &(net, len, class) in V4_BLOCKS {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        if bits & mask == net {
            return class;
        }
    }
    AddrClass::Public
}

/// Classify an IPv6 address; IPv4-mapped and NAT64 addresses by what they embed.
pub fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let bits = u128::from(ip);
    for &(net, len, rule) in V6_BLOCKS {
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        if bits & mask == net {
            return match rule {
                V6Rule::Class(class) => class,
                V6Rule::EmbedsIpv4 => classify_v4(Ipv4Addr::from(bits as u32)),
            };
        }
    }
    AddrClass::Public
}

/// Classify any address.
pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// The IPv4 address an IPv6 address embeds, for the forms judged by what they embed.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    V6_BLOCKS.iter().find_map(|&(net, len, rule)| {
        let mask = u128::MAX << (128 - len);
        (rule == V6Rule::EmbedsIpv4 && bits & mask == net).then(|| Ipv4Addr::from(bits as u32))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnetwork::IpNetwork;

    /// Marks the rows the reference says to judge by the IPv4 address they embed.
    const EMBEDS: &str = "embeds_ipv4";

    /// The reference document's table, written out independently of `V4_BLOCKS`/`V6_BLOCKS`.
    /// Every block is checked at both edges, and one address beyond each edge.
    const REFERENCE: &[(&str, &str)] = &[
        ("0.0.0.0/8", "this_network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared_address_space"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link_local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "ietf_protocol_assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.31.196.0/24", "as112"),
        ("192.52.193.0/24", "amt"),
        ("192.88.99.0/24", "6to4_relay_anycast"),
        ("192.168.0.0/16", "private"),
        ("192.175.48.0/24", "as112"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
        ("255.255.255.255/32", "broadcast"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "ipv4_compatible"),
        ("::ffff:0:0/96", EMBEDS),
        ("64:ff9b::/96", EMBEDS),
        ("64:ff9b:1::/48", "nat64_local_use"),
        ("100::/64", "discard_only"),
        ("100:0:0:1::/64", "dummy_prefix"),
        ("2001::/23", "ietf_protocol_assignment"),
        ("2001:db8::/32", "documentation"),
        ("2002::/16", "6to4"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "srv6_sid"),
        ("fc00::/7", "unique_local"),
        ("fe80::/10", "link_local"),
        ("fec0::/10", "site_local"),
        ("ff00::/8", "multicast"),
    ];

    fn step(ip: IpAddr, up: bool) -> Option<IpAddr> {
        match ip {
            IpAddr::V4(v) => {
                let b = u32::from(v);
                let n = if up {
                    b.checked_add(1)?
                } else {
                    b.checked_sub(1)?
                };
                Some(IpAddr::V4(n.into()))
            }
            IpAddr::V6(v) => {
                let b = u128::from(v);
                let n = if up {
                    b.checked_add(1)?
                } else {
                    b.checked_sub(1)?
                };
                Some(IpAddr::V6(n.into()))
            }
        }
    }

    /// The label the reference gives an address: the most specific listed block containing it,
    /// and for the embedding rows, the label of the embedded IPv4 address.
    fn reference_label(ip: IpAddr) -> &'static str {
        let label = REFERENCE
            .iter()
            .filter_map(|(cidr, label)| {
                let net: IpNetwork = cidr.parse().unwrap();
                net.contains(ip).then_some((net.prefix(), *label))
            })
            .max_by_key(|(prefix, _)| *prefix)
            .map(|(_, label)| label)
            .unwrap_or("public");
        match (label, ip) {
            (EMBEDS, IpAddr::V6(v6)) => {
                reference_label(IpAddr::V4(Ipv4Addr::from(u128::from(v6) as u32)))
            }
            _ => label,
        }
    }

    #[test]
    fn every_block_at_both_edges_and_beyond() {
        for (cidr, _) in REFERENCE {
            let net: IpNetwork = cidr.parse().unwrap();
            let (first, last) = (net.network(), net.broadcast());
            let beyond = [step(first, false), step(last, true)];
            for ip in [Some(first), Some(last)]
                .into_iter()
                .chain(beyond)
                .flatten()
            {
                assert_eq!(
                    classify(ip).as_str(),
                    reference_label(ip),
                    "{ip} (edge of {cidr})"
                );
            }
        }
    }

    #[test]
    fn every_listed_block_is_refused_at_its_edges() {
        for (cidr, label) in REFERENCE {
            let net: IpNetwork = cidr.parse().unwrap();
            for ip in [net.network(), net.broadcast()] {
                if *label != EMBEDS {
                    assert!(!classify(ip).is_public(), "{ip} in {cidr} must be refused");
                }
            }
        }
    }

    #[test]
    fn public_addresses() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:200::1",
            "2003::1",
            "64:ff9b::808:808",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(classify(ip.parse().unwrap()), AddrClass::Public, "{ip}");
        }
    }

    #[test]
    fn embedded_ipv4_is_judged_by_what_it_embeds() {
        for (ip, class) in [
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("::ffff:169.254.169.254", AddrClass::LinkLocal),
            ("::ffff:10.1.2.3", AddrClass::Private),
            ("64:ff9b::127.0.0.1", AddrClass::Loopback),
            ("64:ff9b::192.168.1.1", AddrClass::Private),
            ("64:ff9b::a9fe:a9fe", AddrClass::LinkLocal),
            ("::127.0.0.1", AddrClass::Ipv4Compatible),
            ("2002:7f00:1::1", AddrClass::SixToFour),
            (
                "2001:0:4136:e378:8000:63bf:3fff:fdd2",
                AddrClass::IetfProtocol,
            ),
            ("fd00:ec2::254", AddrClass::UniqueLocal),
        ] {
            assert_eq!(classify(ip.parse().unwrap()), class, "{ip}");
        }
    }

    #[test]
    fn metadata_endpoints_are_refused() {
        for ip in [
            "169.254.169.254",
            "169.254.170.2",
            "100.100.100.200",
            "fd00:ec2::254",
        ] {
            assert!(!classify(ip.parse().unwrap()).is_public(), "{ip}");
        }
    }
}
