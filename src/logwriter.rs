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
mod tests;
