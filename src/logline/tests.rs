//! The hand encoder against tracing-subscriber's own output, addresses and timestamps.

use super::*;
use crate::logwriter::{Batching, plain_fields};
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const ADDR: &str = "[2001:db8::1]:8443";
const V4: &str = "10.0.255.7:443";

/// The fields of a refused request's access line with every awkward value: quotes,
/// backslashes, newlines, terminal controls, non-ASCII, empty values, an IPv6 address.
fn fields(addr: &SocketAddr) -> Vec<(&'static Name, Value<'_>)> {
    vec![
        (name!("request_id"), Value::Bare("01J9Z8")),
        (name!("connector"), Value::Bare("hubspot")),
        (name!("workspace"), Value::Bare("")),
        (name!("caller"), Value::Quoted("app \"quoted\" \\ back")),
        (name!("method"), Value::Bare("GET")),
        (name!("host"), Value::Bare("api.hubapi.com")),
        (
            name!("path"),
            Value::Quoted("/a b\n\x1b[31m\u{7f}é\u{200b}"),
        ),
        (name!("status"), Value::U64(403)),
        (name!("outcome"), Value::Quoted("domain_not_allowed")),
        (name!("upstream"), Value::Addr(Some(*addr))),
        (name!("none"), Value::Addr(None)),
        (name!("reason"), Value::Bare("said \"no\"\t\\ here\u{1}")),
        (name!("duration_ms"), Value::U64(u64::MAX)),
        (name!("shown"), Value::Shown(addr)),
        (name!("v4"), Value::Addr(Some(V4.parse().unwrap()))),
    ]
}

/// The same event through tracing-subscriber, as `logging::init` configures it.
fn through_tracing(format: Format) -> String {
    let out = Shared::default();
    let (w, guard) = BatchWriter::new(
        Box::new(out.clone()),
        Batching {
            interval: Duration::ZERO,
            ..Batching::default()
        },
    )
    .unwrap();
    let addr: SocketAddr = ADDR.parse().unwrap();
    let emit = || {
        tracing::info!(target: "sluice::access", request_id = %"01J9Z8", connector = %"hubspot", workspace = %"", caller = "app \"quoted\" \\ back", method = %"GET", host = %"api.hubapi.com", path = "/a b\n\x1b[31m\u{7f}é\u{200b}", status = 403u16, outcome = "domain_not_allowed", upstream = %addr, none = %"", reason = %"said \"no\"\t\\ here\u{1}", duration_ms = u64::MAX, shown = %addr, v4 = %V4.parse::<SocketAddr>().unwrap());
    };
    let builder = tracing_subscriber::fmt().with_ansi(false).with_writer(w);
    match format {
        Format::Text => {
            tracing::subscriber::with_default(builder.fmt_fields(plain_fields()).finish(), emit)
        }
        Format::Json => {
            tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), emit)
        }
    }
    drop(guard);
    String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
}

fn by_hand(format: Format, now: SystemTime) -> String {
    let addr: SocketAddr = ADDR.parse().unwrap();
    let mut out = Vec::new();
    encode(&mut out, format, "sluice::access", now, &fields(&addr));
    String::from_utf8(out).unwrap()
}

/// Everything but the timestamp, which the two take at different instants.
fn without_timestamp(line: &str, format: Format) -> String {
    match format {
        Format::Text => line.split_once(' ').unwrap().1.to_string(),
        Format::Json => {
            let (head, rest) = line.split_once("\"timestamp\":\"").unwrap();
            format!("{head}{}", rest.split_once('"').unwrap().1)
        }
    }
}

#[test]
fn lines_are_byte_for_byte_what_tracing_writes() {
    for format in [Format::Text, Format::Json] {
        let theirs = through_tracing(format);
        let ours = by_hand(format, SystemTime::now());
        assert_eq!(
            without_timestamp(&ours, format),
            without_timestamp(&theirs, format),
            "{format:?}"
        );
        assert!(ours.ends_with('\n') && ours.matches('\n').count() == 1);
    }
}

/// The calendar arithmetic against the `time` crate's, around leap days, century
/// rules, the epoch and before it.
#[test]
fn addresses_are_written_as_display_writes_them() {
    for text in [
        "0.0.0.0:0",
        "255.255.255.255:65535",
        "1.10.100.9:80",
        "10.0.255.7:443",
        "99.9.199.200:9999",
        "8.8.8.8:10000",
        "[2001:db8::1]:8443",
    ] {
        let addr: SocketAddr = text.parse().unwrap();
        let mut out = b"x".to_vec();
        write_addr(&mut out, &addr);
        assert_eq!(out, format!("x{addr}").as_bytes(), "{text}");
    }
}

#[test]
fn timestamps_match_an_independent_calendar() {
    let instants = [
        0i64,
        -1,
        -86_400 * 365 - 7,
        -62_167_219_200, // 0000-01-01
        -62_167_219_201, // -0001-12-31T23:59:59
        951_782_400,     // 2000-02-29
        951_868_799,
        4_107_542_399, // 2100-02-28T23:59:59
        1_796_169_295,
        253_402_300_799, // 9999-12-31T23:59:59
    ];
    for secs in instants {
        for nanos in [0u32, 1_000, 999_999_999, 123_456_789] {
            let total = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
            let abs = total.unsigned_abs();
            let span = Duration::new((abs / 1_000_000_000) as u64, (abs % 1_000_000_000) as u32);
            let t = if total >= 0 {
                UNIX_EPOCH + span
            } else {
                UNIX_EPOCH - span
            };
            let mut ours = Vec::new();
            write_timestamp(&mut ours, t);
            let d = time::OffsetDateTime::from_unix_timestamp_nanos(total).unwrap();
            let year = match d.year() {
                y if y > 9999 => format!("+{y}"),
                y if y < 0 => format!("{y:05}"),
                y => format!("{y:04}"),
            };
            let theirs = format!(
                "{year}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second(),
                d.microsecond()
            );
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                theirs,
                "{secs}s {nanos}ns"
            );
        }
    }
}

#[test]
fn the_second_prefix_is_recomputed_when_the_second_changes() {
    let at = |s: u64, us: u64| {
        let mut out = Vec::new();
        write_timestamp(
            &mut out,
            UNIX_EPOCH + Duration::from_micros(s * 1_000_000 + us),
        );
        String::from_utf8(out).unwrap()
    };
    assert_eq!(at(59, 999_999), "1970-01-01T00:00:59.999999Z");
    assert_eq!(at(60, 0), "1970-01-01T00:01:00.000000Z");
    assert_eq!(at(60, 42), "1970-01-01T00:01:00.000042Z");
    assert_eq!(at(59, 1), "1970-01-01T00:00:59.000001Z");
    // Past the `time` crate's range: tracing-subscriber's sign convention.
    assert_eq!(at(253_402_300_800, 7), "+10000-01-01T00:00:00.000007Z");
}
