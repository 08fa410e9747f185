//! The batching writer and the plain field formatter.

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
            tracing::subscriber::with_default(builder.fmt_fields(plain_fields()).finish(), emit);
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
