//! Step 9: which log records may be written at all. sluice's own records pass at every level;
//! everything else (pingora, hyper, redis, rustls, hickory …) is held to `INFO` and scrubbed.
//!
//! Why: below `INFO`, pingora prints what passes through it — the upstream request header
//! (`Authorization`, an injected `?api_key=`), response headers, body chunks, the raw bytes of
//! a malformed request (`Proxy-Authorization` included). No `SLUICE_LOG` filter can be trusted
//! to keep those out, so the ceiling is applied where third-party records enter, before any
//! filter or formatter sees them: `log` records through [`LogBridge`] (which replaces
//! tracing-log's `LogTracer`), `tracing` records through [`third_party_ceiling`]. Third-party
//! records at `INFO` and above still carry error chains, and some of pingora's put raw bytes in
//! an error's context (`buf: …`); [`scrub`] cuts those and any query string before the record
//! is dispatched.
//!
//! sluice's own records never carry a header value, a query string or a credential (the
//! canary tests in `tests/cli.rs` run every level, text and JSON).

use std::borrow::Cow;

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::layer::SubscriberExt;

use crate::logwriter::{BatchWriter, LogGuard, plain_fields};

/// Logs go to stderr in batches ([`crate::logwriter`]): a request only copies its lines into
/// its thread's buffer; a flusher thread writes them every `SLUICE_LOG_FLUSH_MS` (default
/// 100 ms) or when a buffer passes `SLUICE_LOG_BUFFER_KB` (default 64). Never lossy. `SLUICE_LOG` is the filter (default
/// `info`), `SLUICE_LOG_FORMAT=json` switches to JSON lines; third-party records are held to
/// the ceiling whatever the filter says. The returned guard writes out what is buffered when
/// dropped.
pub fn init() -> Result<LogGuard, String> {
    let filter = match std::env::var("SLUICE_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec)
            .map_err(|e| format!("SLUICE_LOG={spec:?} is not a log filter: {e}"))?,
        Err(_) => EnvFilter::new("info"),
    };
    let json = match std::env::var("SLUICE_LOG_FORMAT") {
        Ok(f) if f == "json" => true,
        Ok(f) if f == "text" || f.is_empty() => false,
        Ok(f) => return Err(format!("SLUICE_LOG_FORMAT must be text or json, not {f:?}")),
        Err(_) => false,
    };
    let (writer, guard) = BatchWriter::new(
        Box::new(std::io::stderr()),
        BatchWriter::batching_from_env()?,
    )
    .map_err(|e| format!("cannot start the log writer: {e}"))?;
    // Colours only for a terminal: log files and collectors get plain text, written without
    // the default formatter's per-field painting (same bytes, fewer instructions).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Access and audit lines of requests are encoded by hand, same bytes (crate::logline);
    // a terminal's coloured text keeps them on tracing's formatter.
    if json {
        crate::logline::install(writer.clone(), crate::logline::Format::Json);
    } else if !ansi {
        crate::logline::install(writer.clone(), crate::logline::Format::Text);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let installed = if json {
        tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .finish()
                .with(third_party_ceiling()),
        )
    } else if ansi {
        tracing::subscriber::set_global_default(builder.finish().with(third_party_ceiling()))
    } else {
        tracing::subscriber::set_global_default(
            builder
                .fmt_fields(plain_fields())
                .finish()
                .with(third_party_ceiling()),
        )
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))?;
    LogBridge::install().map_err(|e| format!("cannot install the log bridge: {e}"))?;
    Ok(guard)
}

/// The most verbose level a third-party record may have.
pub const THIRD_PARTY_CEILING: Level = Level::INFO;

/// sluice's own targets: the crate's modules and the `sluice::access`/`sluice::audit` lines.
pub fn is_own(target: &str) -> bool {
    target == "sluice" || target.starts_with("sluice::")
}

/// Whether a record with this target and level may be written at all.
pub fn admitted(target: &str, level: &Level) -> bool {
    is_own(target) || *level <= THIRD_PARTY_CEILING
}

/// A global filter for `tracing`-native third-party records (hyper, h2, hickory, …).
pub fn third_party_ceiling() -> FilterFn<impl Fn(&Metadata<'_>) -> bool + Clone> {
    tracing_subscriber::filter::filter_fn(|meta: &Metadata<'_>| {
        admitted(meta.target(), meta.level())
    })
}

/// Where raw bytes start in a third-party message: pingora's error contexts carry the
/// buffer that failed to parse as `buf: …`, and `log` lines print header values after these.
const RAW_MARKERS: &[&str] = &["buf:", "header value", "header:", "headers:", "body:"];

/// What a third-party message may say: cut at the first raw-data marker, every query string
/// (`?…` up to white space) and every credential-looking word after `Bearer`, `Basic` or
/// `Authorization` replaced by `[redacted]`.
pub fn scrub(message: &str) -> Cow<'_, str> {
    let lower = message.to_ascii_lowercase();
    let cut = RAW_MARKERS
        .iter()
        .filter_map(|m| lower.find(m).map(|i| i + m.len()))
        .min();
    let kept = match cut {
        Some(end) => &message[..end],
        None => message,
    };
    let needs_words = kept.contains('?')
        || ["bearer", "basic", "authorization"]
            .iter()
            .any(|w| lower[..kept.len()].contains(w));
    if cut.is_none() && !needs_words {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(kept.len() + 12);
    let mut redact_next = false;
    for (i, word) in kept.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let bare = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        let trigger = ["bearer", "basic", "authorization"]
            .iter()
            .any(|w| bare.eq_ignore_ascii_case(w));
        if std::mem::take(&mut redact_next) && !word.is_empty() {
            out.push_str("[redacted]");
            // `Authorization: Bearer <token>`: the scheme word passes the redaction on.
            redact_next = trigger;
            continue;
        }
        redact_next = trigger;
        match word.split_once('?') {
            Some((before, _)) => {
                out.push_str(before);
                out.push_str("?[redacted]");
            }
            None => out.push_str(word),
        }
    }
    if cut.is_some() {
        out.push_str(" [redacted]");
    }
    Cow::Owned(out)
}

/// The `log` facade's logger: third-party records (pingora logs through `log`) above the
/// ceiling are dropped here, the rest scrubbed and handed to `tracing` like `LogTracer` does.
pub struct LogBridge;

impl LogBridge {
    /// Install as the process's `log` logger, at most `INFO` (so pingora's debug formatting
    /// is skipped before it runs).
    pub fn install() -> Result<(), log::SetLoggerError> {
        log::set_logger(&LogBridge)?;
        log::set_max_level(log::LevelFilter::Info);
        Ok(())
    }
}

fn trace_level(level: log::Level) -> Level {
    match level {
        log::Level::Error => Level::ERROR,
        log::Level::Warn => Level::WARN,
        log::Level::Info => Level::INFO,
        log::Level::Debug => Level::DEBUG,
        log::Level::Trace => Level::TRACE,
    }
}

impl log::Log for LogBridge {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        admitted(meta.target(), &trace_level(meta.level()))
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = match record.args().as_str() {
            Some(literal) => Cow::Borrowed(literal),
            None => Cow::Owned(record.args().to_string()),
        };
        let scrubbed = scrub(&message);
        let _ = tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("{scrubbed}"))
                .metadata(record.metadata().clone())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "CANARY-9f8e7d";

    #[test]
    fn third_party_records_stop_at_info_own_records_do_not() {
        assert!(admitted("sluice::proxy", &Level::TRACE));
        assert!(admitted("sluice::access", &Level::DEBUG));
        assert!(admitted("sluice", &Level::TRACE));
        assert!(!admitted("sluicer", &Level::DEBUG));
        assert!(!admitted("pingora_proxy::proxy_h1", &Level::DEBUG));
        assert!(!admitted(
            "pingora_core::protocols::http::v1::body",
            &Level::TRACE
        ));
        assert!(!admitted("h2::codec", &Level::TRACE));
        assert!(admitted("pingora_core::server", &Level::INFO));
        assert!(admitted("pingora_proxy", &Level::ERROR));
    }

    /// pingora's own message shapes (0.9.1), with a canary where request data lands.
    #[test]
    fn scrub_removes_raw_buffers_queries_and_tokens() {
        let cases = [
            format!(
                "Fail to proxy: Downstream InvalidHTTPHeader context: buf: GET / HTTP/1.1\\r\\nProxy-Authorization: Basic {CANARY}\\r\\n cause: invalid header name"
            ),
            format!(
                "Fail to proxy: Upstream InvalidHTTPHeader context: buf: HTTP/1.1 200 OK\\r\\nSet-Cookie: s={CANARY}, status: 502, GET api.example.com/x request_id=1"
            ),
            format!("GET https://api.example.com/v1/x?api_key={CANARY} HTTP/1.1"),
            format!("invalid content-length header value {CANARY}"),
            format!("sending Authorization: Bearer {CANARY} upstream"),
            format!("proxy auth basic {CANARY}"),
        ];
        for case in &cases {
            let out = scrub(case);
            assert!(!out.contains(CANARY), "{case:?} scrubbed to {out:?}");
        }
        assert_eq!(
            scrub(&cases[0]),
            "Fail to proxy: Downstream InvalidHTTPHeader context: buf: [redacted]"
        );
        assert_eq!(
            scrub(&cases[2]),
            "GET https://api.example.com/v1/x?[redacted] HTTP/1.1"
        );
    }

    #[test]
    fn scrub_leaves_ordinary_messages_alone() {
        for m in [
            "Graceful shutdown: grace period 5s starts",
            "service 'sluice' exited.",
            "Fail to proxy: Upstream ConnectRefused context: Peer: addr: 127.0.0.1:1, status: 502",
        ] {
            assert!(matches!(scrub(m), Cow::Borrowed(_)), "{m}");
        }
    }
}
