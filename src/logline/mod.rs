//! Step 9: the access and audit lines, encoded by hand.
//!
//! Every request writes two lines. Through `tracing`'s formatter each field goes through a
//! visitor, `fmt::Arguments` and a `dyn fmt::Write`, and the timestamp is a calendar
//! conversion plus seven formatted integers: callgrind counted ~24k instructions per request
//! for the two lines, as much as the rest of sluice's own work (BENCHMARKS.md). Here a line is
//! written field by field into one pre-sized per-thread buffer, the timestamp's
//! `YYYY-MM-DDTHH:MM:SS.` prefix is formatted once per second per thread, and the finished line
//! goes to the same batching writer (`logwriter`) as every other record, so the
//! never-split, never-dropped guarantees are the writer's, unchanged.
//!
//! The bytes are exactly what tracing-subscriber writes for the same fields (text with colours
//! off, or JSON with `flatten_event`); a unit test formats the same fields both ways and
//! compares. The `SLUICE_LOG` filter still decides whether a line is written
//! ([`enabled`] asks `tracing` per target); when the encoder is not installed (a terminal with
//! colours, or a process that never called [`crate::logging::init`]) the lines go through
//! `tracing` as before.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::logwriter::BatchWriter;

/// One field's value, named after how `tracing` records it.
#[derive(Clone, Copy)]
pub enum Value<'a> {
    /// `name = %value`: text writes it bare, JSON as a string.
    Bare(&'a str),
    /// `name = value` with a `&str`: text writes it `Debug`-quoted, JSON as a string.
    Quoted(&'a str),
    /// An unsigned integer.
    U64(u64),
    /// `name = %addr` of an optional address: empty when absent.
    Addr(Option<SocketAddr>),
    /// `name = %value` of anything else: formatted, then written as [`Value::Bare`].
    Shown(&'a dyn std::fmt::Display),
}

/// Room for a field's name with its punctuation (`,"name":`).
const NAME_ROOM: usize = 24;

/// A field's name as each format writes it in front of the value, made at compile time by
/// [`name!`]: one copy per field instead of a separator, the name and `=` (in JSON, a comma,
/// the quoted name and a colon). Kept in fixed-size arrays so the copy is a few register
/// moves, not a `memcpy` call (a line has twenty of them).
pub struct Name {
    /// ` name=` (the line's first field goes without the space), zero-padded.
    text: [u8; NAME_ROOM],
    text_len: usize,
    /// `,"name":`, zero-padded.
    json: [u8; NAME_ROOM],
    json_len: usize,
}

impl Name {
    /// Use [`name!`], which makes it at compile time: a name either format would have to
    /// escape (anything but ASCII letters, digits and `_`), or one too long, does not compile.
    #[doc(hidden)]
    pub const fn new(name: &str) -> Self {
        let b = name.as_bytes();
        assert!(
            !b.is_empty() && b.len() + 4 <= NAME_ROOM,
            "a log field name is 1 to 20 bytes"
        );
        let mut text = [0u8; NAME_ROOM];
        let mut json = [0u8; NAME_ROOM];
        text[0] = b' ';
        json[0] = b',';
        json[1] = b'"';
        let mut i = 0;
        while i < b.len() {
            assert!(
                b[i].is_ascii_alphanumeric() || b[i] == b'_',
                "a log field name is letters, digits and '_'"
            );
            text[1 + i] = b[i];
            json[2 + i] = b[i];
            i += 1;
        }
        text[1 + i] = b'=';
        json[2 + i] = b'"';
        json[3 + i] = b':';
        Name {
            text,
            text_len: b.len() + 2,
            json,
            json_len: b.len() + 4,
        }
    }

    /// Append `bytes[..len]`: the whole array is copied (its size is known, so no call) and
    /// the padding cut off again.
    #[inline]
    fn put(out: &mut Vec<u8>, bytes: &[u8; NAME_ROOM], len: usize) {
        let end = out.len() + len;
        out.extend_from_slice(bytes);
        out.truncate(end);
    }
}

/// A field's [`Name`] from a literal, checked and laid out at compile time.
macro_rules! name {
    ($name:literal) => {{
        const NAME: $crate::logline::Name = $crate::logline::Name::new($name);
        &NAME
    }};
}
pub(crate) use name;

/// The output format: tracing-subscriber's text (colours off) or JSON lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

struct Sink {
    writer: BatchWriter,
    format: Format,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Route access and audit lines through the encoder, to `writer` in `format`. Called once, by
/// [`crate::logging::init`]; a second call is ignored.
pub fn install(writer: BatchWriter, format: Format) {
    let _ = SINK.set(Sink { writer, format });
}

/// Which line: each has its own target, so `SLUICE_LOG=sluice::audit=off` still works.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    Access,
    Audit,
}

impl Line {
    pub const fn target(self) -> &'static str {
        match self {
            Line::Access => "sluice::access",
            Line::Audit => "sluice::audit",
        }
    }
}

/// Whether the filter lets this line through (an `INFO` record of its target).
pub fn enabled(line: Line) -> bool {
    match line {
        Line::Access => tracing::enabled!(target: "sluice::access", tracing::Level::INFO),
        Line::Audit => tracing::enabled!(target: "sluice::audit", tracing::Level::INFO),
    }
}

/// Write one line, if the filter lets it through.
pub fn emit(line: Line, fields: &[(&Name, Value<'_>)]) {
    emit_at(line, SystemTime::now(), fields);
}

/// [`emit`] with the line's timestamp given: a request's access and audit lines share one
/// clock read.
pub fn emit_at(line: Line, now: SystemTime, fields: &[(&Name, Value<'_>)]) {
    if !enabled(line) {
        return;
    }
    match SINK.get() {
        Some(sink) => BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            encode(&mut buf, sink.format, line.target(), now, fields);
            // Nowhere to report a failed log write; the gateway serves on.
            let _ = sink.writer.append(&buf);
        }),
        None => {
            // Not installed: the same fields as one `tracing` message (a terminal, a test).
            let mut text = Vec::with_capacity(256);
            write_text_fields(&mut text, fields);
            let text = String::from_utf8_lossy(&text);
            match line {
                Line::Access => tracing::info!(target: "sluice::access", "{text}"),
                Line::Audit => tracing::info!(target: "sluice::audit", "{text}"),
            }
        }
    }
}

thread_local! {
    /// The line being encoded; kept between lines, so its capacity is allocated once.
    static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// The timestamp's prefix up to the fraction (`2026-12-02T18:54:55.`) and its second.
    static SECOND: RefCell<(i64, Vec<u8>)> = const { RefCell::new((i64::MIN, Vec::new())) };
}

/// The whole line, newline included, as tracing-subscriber would write it.
pub fn encode(
    out: &mut Vec<u8>,
    format: Format,
    target: &str,
    now: SystemTime,
    fields: &[(&Name, Value<'_>)],
) {
    match format {
        Format::Text => {
            write_timestamp(out, now);
            out.extend_from_slice(b"  INFO ");
            out.extend_from_slice(target.as_bytes());
            out.extend_from_slice(b": ");
            write_text_fields(out, fields);
        }
        Format::Json => {
            out.extend_from_slice(b"{\"timestamp\":\"");
            write_timestamp(out, now);
            out.extend_from_slice(b"\",\"level\":\"INFO\"");
            for (name, value) in fields {
                Name::put(out, &name.json, name.json_len);
                match value {
                    Value::Bare(s) | Value::Quoted(s) => json_str(out, s),
                    Value::U64(n) => {
                        out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes())
                    }
                    Value::Addr(addr) => {
                        out.push(b'"');
                        // An address's text has nothing JSON escapes.
                        if let Some(a) = addr {
                            write_addr(out, a);
                        }
                        out.push(b'"');
                    }
                    Value::Shown(v) => json_str(out, &v.to_string()),
                }
            }
            out.extend_from_slice(b",\"target\":");
            json_str(out, target);
            out.push(b'}');
        }
    }
    out.push(b'\n');
}

fn write_text_fields(out: &mut Vec<u8>, fields: &[(&Name, Value<'_>)]) {
    for (i, (name, value)) in fields.iter().enumerate() {
        if i == 0 {
            out.extend_from_slice(&name.text[1..name.text_len]);
        } else {
            Name::put(out, &name.text, name.text_len);
        }
        match value {
            Value::Bare(s) => out.extend_from_slice(s.as_bytes()),
            Value::Quoted(s) => debug_str(out, s),
            Value::U64(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
            Value::Addr(Some(a)) => write_addr(out, a),
            Value::Addr(None) => {}
            Value::Shown(v) => {
                let _ = write!(out, "{v}");
            }
        }
    }
}

/// An address as its `Display` writes it; IPv4 (every upstream in practice) laid out in a
/// stack buffer and appended with one copy, without the formatting machinery (which costs
/// more than the rest of the line).
fn write_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            // `255.255.255.255:65535` is 21 bytes.
            let mut buf = [0u8; 21];
            let mut n = 0;
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    buf[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    buf[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + octet % 10;
                n += 1;
            }
            buf[n] = b':';
            n += 1;
            let mut port = a.port();
            let digits = match port {
                0..=9 => 1,
                10..=99 => 2,
                100..=999 => 3,
                1000..=9999 => 4,
                _ => 5,
            };
            for k in (n..n + digits).rev() {
                buf[k] = b'0' + (port % 10) as u8;
                port /= 10;
            }
            out.extend_from_slice(&buf[..n + digits]);
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// `{:?}` of a `str`: printable ASCII without `"` or `\` is copied between quotes; anything
/// else takes the standard library's escaping, so the bytes are always `Debug`'s.
fn debug_str(out: &mut Vec<u8>, s: &str) {
    // Folds, not `all`: they vectorise, and a clean value (nearly every one) is read whole
    // either way.
    if s.bytes().fold(true, |ok, b| {
        ok & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    }) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// A JSON string, escaped as serde_json escapes it (the formatter tracing-subscriber uses).
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'))
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail, and a str always serializes.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// `2026-12-02T18:54:55.123456Z`, tracing-subscriber's `SystemTime` format (microseconds,
/// UTC); the part before the fraction is formatted once per second per thread.
fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let (secs, micros) = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_micros()),
        Err(e) => {
            // Before 1970: whole seconds down, the fraction counted up from there.
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, (1_000_000_000 - n) / 1_000)
            }
        }
    };
    SECOND.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0 != secs {
            cell.1.clear();
            civil_prefix(&mut cell.1, secs);
            cell.0 = secs;
        }
        out.extend_from_slice(&cell.1);
    });
    let mut frac = [b'0'; 6];
    let mut m = micros;
    for d in frac.iter_mut().rev() {
        *d = b'0' + (m % 10) as u8;
        m /= 10;
    }
    out.extend_from_slice(&frac);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS.` for seconds since the epoch (proleptic Gregorian, UTC), the year
/// written as tracing-subscriber writes it (`+` above 9999, five places with the sign below 0).
fn civil_prefix(out: &mut Vec<u8>, secs: i64) {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = if year > 9999 {
        write!(out, "+{year}")
    } else if year < 0 {
        write!(out, "{year:05}")
    } else {
        write!(out, "{year:04}")
    };
    let _ = write!(
        out,
        "-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    );
}

#[cfg(test)]
mod tests;
