//! Step 9: where log lines go. Per-thread buffers, written out in batches by one thread.
//!
//! Every request writes two lines (access and audit). Writing each with its own `write` costs a
//! syscall per line on the request's thread; handing each to a writer thread over a channel
//! (tracing-appender) costs a wake-up per line instead, and that thread's receive loop spins
//! with `sched_yield` on the very core the proxy runs on (BENCHMARKS.md measured both). Here a
//! line is copied into its thread's buffer and nothing else happens: no syscall, no wake-up,
//! no lock another request thread takes. The flusher thread writes every buffer out every
//! `interval` (default 100 ms, `SLUICE_LOG_FLUSH_MS`), or as soon as one buffer passes
//! `high_water` (default 64 KiB, `SLUICE_LOG_BUFFER_KB`), the way nginx's
//! `access_log … buffer=64k flush=1s` does.
//!
//! Guarantees:
//! * a line is never split and never dropped: when the output stalls and a buffer reaches
//!   `max_buffered`, the request thread that filled it writes it out itself and waits (as a
//!   full queue would make it wait), so memory stays bounded;
//! * lines of one thread keep their order; lines of different threads written in the same
//!   batch are grouped per thread (each carries its own timestamp);
//! * dropping the [`LogGuard`] writes out everything buffered (on shutdown); a process killed
//!   with SIGKILL loses at most the last `interval` of lines.
//!
//! `interval = 0` writes each line at once, on the thread that logs it.

use std::cell::Cell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::Duration;

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::Writer;

/// How the writer batches.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// The longest a line waits in a buffer; zero writes every line at once.
    pub interval: Duration,
    /// A buffer this full wakes the flusher before the interval is up.
    pub high_water: usize,
    /// A buffer this full is written by the thread that filled it (the output is stalled).
    pub max_buffered: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(100),
            high_water: 64 * 1024,
            max_buffered: 4 * 1024 * 1024,
        }
    }
}

struct Inner {
    /// One buffer per thread slot; a thread always appends to the same one.
    shards: Box<[Mutex<Vec<u8>>]>,
    /// The output. The flusher holds it for a whole batch, so batches never interleave.
    out: Mutex<Box<dyn Write + Send>>,
    batching: Batching,
    flusher: OnceLock<Thread>,
    /// Set by the first thread to pass the high-water mark, cleared by the flusher.
    wake_requested: AtomicBool,
    stopping: AtomicBool,
}

/// Thread slots are handed out in turn; threads beyond the number of shards share them.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn slot() -> usize {
    SLOT.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT_SLOT.fetch_add(1, Ordering::Relaxed));
        }
        s.get()
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a log buffer leaves bytes, not broken invariants: keep logging.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn append(&self, line: &[u8]) -> io::Result<()> {
        if self.batching.interval.is_zero() {
            return lock(&self.out).write_all(line);
        }
        let shard = &self.shards[slot() % self.shards.len()];
        let mut buf = lock(shard);
        buf.extend_from_slice(line);
        let len = buf.len();
        drop(buf);
        if len >= self.batching.max_buffered {
            // The flusher is behind: write this shard out here. The output lock is taken
            // first and the shard emptied under it, as the flusher does: bytes leave a shard
            // only while the output is held, so no later line of a thread sharing this shard
            // can be written before an earlier one. (Taking the batch before waiting for the
            // output let the flusher write the shard's newer lines first.)
            let mut out = lock(&self.out);
            let batch = std::mem::take(&mut *lock(shard));
            return out.write_all(&batch);
        }
        if len >= self.batching.high_water && !self.wake_requested.swap(true, Ordering::AcqRel) {
            if let Some(flusher) = self.flusher.get() {
                flusher.unpark();
            }
        }
        Ok(())
    }

    /// Write out every buffer, in shard order, as one batch.
    fn flush_all(&self) {
        let mut out = lock(&self.out);
        let mut spare = Vec::new();
        for shard in &self.shards {
            {
                let mut buf = lock(shard);
                if buf.is_empty() {
                    continue;
                }
                // Swap in the previous (emptied) batch, so buffers keep their capacity.
                std::mem::swap(&mut *buf, &mut spare);
            }
            // Nowhere to report a failed log write; the lines are dropped, the gateway serves.
            let _ = out.write_all(&spare);
            spare.clear();
        }
        let _ = out.flush();
    }

    fn run_flusher(&self) {
        loop {
            std::thread::park_timeout(self.batching.interval);
            let stopping = self.stopping.load(Ordering::Acquire);
            self.wake_requested.store(false, Ordering::Release);
            self.flush_all();
            if stopping {
                return;
            }
        }
    }
}

/// A `MakeWriter` for tracing-subscriber that batches lines (see the module docs).
#[derive(Clone)]
pub struct BatchWriter {
    inner: Arc<Inner>,
}

/// Writes out what is buffered and stops the flusher when dropped.
pub struct LogGuard {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// A writer to `out` and the guard that flushes it; starts the flusher thread unless
    /// `interval` is zero.
    pub fn new(out: Box<dyn Write + Send>, batching: Batching) -> io::Result<(Self, LogGuard)> {
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get() * 2);
        let inner = Arc::new(Inner {
            shards: (0..shards)
                .map(|_| Mutex::new(Vec::with_capacity(batching.high_water.min(64 * 1024))))
                .collect(),
            out: Mutex::new(out),
            batching,
            flusher: OnceLock::new(),
            wake_requested: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        let flusher = if batching.interval.is_zero() {
            None
        } else {
            let run = inner.clone();
            let handle = std::thread::Builder::new()
                .name("sluice-log".into())
                .spawn(move || run.run_flusher())?;
            let _ = inner.flusher.set(handle.thread().clone());
            Some(handle)
        };
        let guard = LogGuard {
            inner: inner.clone(),
            flusher,
        };
        Ok((Self { inner }, guard))
    }

    /// Append one whole line (the access-line encoder's way in; `tracing` records come
    /// through [`MakeWriter`]). Same guarantees as every other line.
    pub fn append(&self, line: &[u8]) -> io::Result<()> {
        self.inner.append(line)
    }

    /// Batching from `SLUICE_LOG_FLUSH_MS` (milliseconds; 0 writes every line at once) and
    /// `SLUICE_LOG_BUFFER_KB` (the high-water mark in KiB, 4 to 2048: a buffer this full is
    /// written before the interval is up).
    pub fn batching_from_env() -> Result<Batching, String> {
        Self::batching_from(|name| std::env::var(name).ok())
    }

    fn batching_from(var: impl Fn(&str) -> Option<String>) -> Result<Batching, String> {
        let mut batching = Batching::default();
        if let Some(ms) = var("SLUICE_LOG_FLUSH_MS") {
            let ms: u64 = ms.parse().ok().filter(|ms| *ms <= 60_000).ok_or_else(|| {
                format!("SLUICE_LOG_FLUSH_MS must be 0..=60000 milliseconds, not {ms:?}")
            })?;
            batching.interval = Duration::from_millis(ms);
        }
        if let Some(kb) = var("SLUICE_LOG_BUFFER_KB") {
            let kb: usize = kb
                .parse()
                .ok()
                .filter(|kb| (4..=2048).contains(kb))
                .ok_or_else(|| format!("SLUICE_LOG_BUFFER_KB must be 4..=2048 KiB, not {kb:?}"))?;
            batching.high_water = kb * 1024;
        }
        Ok(batching)
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.inner.stopping.store(true, Ordering::Release);
        match self.flusher.take() {
            Some(handle) => {
                handle.thread().unpark();
                // The flusher writes out the last batch before it returns.
                let _ = handle.join();
            }
            None => self.inner.flush_all(),
        }
    }
}

/// One event's writer: tracing-subscriber formats a whole line, then makes one `write_all`.
pub struct LineWriter<'a>(&'a Inner);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.inner)
    }
}

/// The text format's fields exactly as tracing-subscriber's default writes them with colours
/// off — `name=value` (`{:?}`) separated by single spaces, the message bare with terminal
/// controls escaped, a leading `r#` dropped, the `log.*` fields of bridged `log` records
/// skipped — without its painting: the default visitor formats every field name and `=`
/// through nu-ansi-term even when colours are off, which callgrind counted as about a third of
/// an access line's cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

/// Builds the field formatter for tracing-subscriber's `fmt().fmt_fields(…)`.
pub fn plain_fields() -> PlainFields {
    PlainFields
}

/// One event's fields being written (see [`PlainFields`]).
pub struct PlainVisitor<'a> {
    writer: Writer<'a>,
    empty: bool,
    result: fmt::Result,
}

impl<'a> MakeVisitor<Writer<'a>> for PlainFields {
    type Visitor = PlainVisitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> PlainVisitor<'a> {
        PlainVisitor {
            writer,
            empty: true,
            result: Ok(()),
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        // A space before every field but the first one written.
        let pad = if std::mem::take(&mut self.empty) {
            ""
        } else {
            " "
        };
        self.result = match name {
            "message" => self
                .writer
                .write_str(pad)
                .and_then(|()| write!(EscapeControls(&mut self.writer), "{value:?}")),
            name => write!(
                self.writer,
                "{pad}{}={value:?}",
                name.strip_prefix("r#").unwrap_or(name)
            ),
        };
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// Escapes what a terminal would act on (ESC, BEL, BS, FF, DEL, C1 controls), as
/// tracing-subscriber does for messages.
struct EscapeControls<W>(W);

impl<W: fmt::Write> fmt::Write for EscapeControls<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            match ch {
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => {
                    write!(self.0, "\\x{:02x}", ch as u32)?
                }
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", ch as u32)?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An output the test can read while the writer holds it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).unwrap()
        }

        /// Wait (bounded) until the output holds `n` lines.
        fn wait_for_lines(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.text().lines().count() < n {
                assert!(Instant::now() < deadline, "only {:?} written", self.text());
                std::thread::yield_now();
            }
        }
    }

    fn writer(batching: Batching) -> (BatchWriter, LogGuard, Shared) {
        let out = Shared::default();
        let (w, guard) = BatchWriter::new(Box::new(out.clone()), batching).unwrap();
        (w, guard, out)
    }

    fn log(w: &BatchWriter, line: &str) {
        w.make_writer().write_all(line.as_bytes()).unwrap();
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn every_line_once_whole_and_in_order_per_thread() {
        let (w, guard, out) = writer(Batching {
            interval: Duration::from_millis(1),
            high_water: 512,
            max_buffered: 4096,
        });
        std::thread::scope(|s| {
            for t in 0..8 {
                let w = &w;
                s.spawn(move || {
                    for i in 0..2000 {
                        log(w, &format!("thread={t} line={i} {}\n", "x".repeat(i % 97)));
                    }
                });
            }
        });
        drop(guard);
        let text = out.text();
        let mut next = [0usize; 8];
        for line in text.lines() {
            let mut words = line.split(' ');
            let t: usize = words.next().unwrap()["thread=".len()..].parse().unwrap();
            let i: usize = words.next().unwrap()["line=".len()..].parse().unwrap();
            assert_eq!(i, next[t], "thread {t}'s lines out of order");
            assert_eq!(
                words.next().unwrap(),
                "x".repeat(i % 97),
                "a line was split"
            );
            next[t] += 1;
        }
        assert_eq!(next, [2000; 8]);
    }

    #[test]
    fn a_quiet_line_is_written_within_the_interval() {
        let (w, _guard, out) = writer(Batching {
            interval: Duration::from_millis(20),
            high_water: 1 << 20,
            max_buffered: 1 << 24,
        });
        log(&w, "one\n");
        out.wait_for_lines(1);
        assert_eq!(out.text(), "one\n");
    }

    #[test]
    fn a_full_buffer_wakes_the_flusher_before_the_interval() {
        let (w, _guard, out) = writer(Batching {
            interval: HOUR,
            high_water: 100,
            max_buffered: 1 << 24,
        });
        for i in 0..9 {
            log(&w, &format!("line {i}\n"));
        }
        assert_eq!(
            out.text(),
            "",
            "below the high-water mark nothing is written yet"
        );
        for i in 9..20 {
            log(&w, &format!("line {i}\n"));
        }
        out.wait_for_lines(11);
    }

    #[test]
    fn a_stalled_flusher_makes_the_logging_thread_write() {
        let (w, guard, out) = writer(Batching {
            interval: HOUR,
            high_water: usize::MAX,
            max_buffered: 64,
        });
        for i in 0..10 {
            log(&w, &format!("line {i}\n"));
        }
        // 10 lines of 7 bytes passed 64 bytes at the tenth: written before `log` returned.
        assert_eq!(out.text().lines().count(), 10);
        log(&w, "tail\n");
        assert_eq!(
            out.text().lines().count(),
            10,
            "the next line is buffered again"
        );
        drop(guard);
        assert!(out.text().ends_with("line 9\ntail\n"));
    }

    #[test]
    fn interval_zero_writes_every_line_at_once() {
        let (w, _guard, out) = writer(Batching {
            interval: Duration::ZERO,
            ..Batching::default()
        });
        log(&w, "now\n");
        assert_eq!(out.text(), "now\n");
    }

    /// Formats the same events with tracing-subscriber's default fields and with
    /// `plain_fields`; the lines must be identical after the timestamp.
    #[test]
    fn plain_fields_write_what_the_default_writes_without_colours() {
        fn lines(plain: bool) -> Vec<String> {
            let (w, guard, out) = writer(Batching {
                interval: HOUR,
                ..Batching::default()
            });
            let builder = tracing_subscriber::fmt().with_ansi(false).with_writer(w);
            let emit = || {
                let addr: std::net::SocketAddr = "127.0.0.1:443".parse().unwrap();
                tracing::info!(target: "sluice::access", request_id = %"r1", connector = "c\"x", status = 200u16, upstream = %addr, r#type = "t", path = "/a b\x1b[31m");
                tracing::warn!(cidr = %addr, "exception \x1b[2J for {addr} \u{9b}x");
                tracing::info!("");
                // What a `log` record bridged by tracing-log carries (pingora logs through `log`).
                tracing::info!(
                    log.target = "pingora_core::server",
                    log.line = 7u32,
                    "exiting now"
                );
                tracing::info!(log.target = "pingora_core::server", ready = true);
                tracing::error!(error = ?std::io::Error::other("e"), "failed");
            };
            if plain {
                tracing::subscriber::with_default(
                    builder.fmt_fields(plain_fields()).finish(),
                    emit,
                );
            } else {
                tracing::subscriber::with_default(builder.finish(), emit);
            }
            drop(guard);
            out.text()
                .lines()
                .map(|l| l.split_once(' ').unwrap().1.to_string())
                .collect()
        }
        let (default, plain) = (lines(false), lines(true));
        assert_eq!(default.len(), 6);
        assert_eq!(plain, default);
        assert!(
            plain[1].contains("\\x1b[2J"),
            "terminal controls escaped: {}",
            plain[1]
        );
    }

    #[test]
    fn lines_through_tracing_reach_the_output_on_drop() {
        let (w, guard, out) = writer(Batching {
            interval: HOUR,
            ..Batching::default()
        });
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(w)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "sluice::access", request_id = "r1", "one");
            tracing::info!(target: "sluice::audit", request_id = "r1", "two");
        });
        assert_eq!(out.text(), "");
        drop(guard);
        let text = out.text();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains("sluice::access") && lines[0].contains("request_id=\"r1\""));
        assert!(lines[1].contains("sluice::audit"));
    }

    #[test]
    fn batching_settings_are_checked() {
        let from = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            BatchWriter::batching_from(|name| {
                vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
            })
        };
        let d = from(&[]).unwrap();
        assert_eq!(
            (d.interval, d.high_water),
            (Duration::from_millis(100), 64 * 1024)
        );
        let b = from(&[
            ("SLUICE_LOG_FLUSH_MS", "1000"),
            ("SLUICE_LOG_BUFFER_KB", "1024"),
        ])
        .unwrap();
        assert_eq!(
            (b.interval, b.high_water, b.max_buffered),
            (Duration::from_secs(1), 1024 * 1024, 4 * 1024 * 1024)
        );
        for bad in ["0", "3", "2049", "64k", ""] {
            let e = from(&[("SLUICE_LOG_BUFFER_KB", bad)]).unwrap_err();
            assert!(e.contains("SLUICE_LOG_BUFFER_KB must be 4..=2048"), "{e}");
        }
        assert!(from(&[("SLUICE_LOG_FLUSH_MS", "60001")]).is_err());
    }
}
