//! Progress of long commands (backup, restore), decoupled from how it is shown.
//!
//! Commands call a [`Progress`] from many threads at once; the CLI picks
//! [`TerminalProgress`] (indicatif bars: bytes, files, rate, ETA) on a terminal and
//! [`LogProgress`] (plain timestamped lines on stderr, every few seconds) otherwise. [`NoProgress`]
//! ignores everything.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A phase of a command, with its own totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the data directory into the repository.
    Backup,
    /// Copying the WAL of a backup.
    Wal,
    /// Comparing an existing directory with a backup (`restore --delta`).
    Compare,
    /// Writing files of a restore.
    Restore,
}

impl Phase {
    /// A short word for displays.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Backup => "backup",
            Phase::Wal => "wal",
            Phase::Compare => "compare",
            Phase::Restore => "restore",
        }
    }
}

/// Receives progress. Every method has an empty default; implementations must be cheap and
/// thread-safe (they are called from worker threads for every file).
pub trait Progress: Send + Sync {
    /// A phase begins with this much work (bytes, files) expected.
    fn begin(&self, _phase: Phase, _total_bytes: u64, _total_files: u64) {}
    /// Work done since the last call.
    fn advance(&self, _bytes: u64, _files: u64) {}
    /// A notable event (e.g. "pg_backup_stop", a warning), for humans.
    fn note(&self, _message: &str) {}
    /// The current phase ended.
    fn end(&self) {}
}

/// Shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Plain progress lines for a log or a pipe: one when a phase begins, at most one every
/// `interval` while it runs, one when it ends, and every note; each line is a UTC timestamp
/// and the text, with credentials masked ([`crate::secrets::redact`]).
///
/// The lines are written to stderr directly rather than through `tracing`: they are the
/// command's output for a user without a terminal (cron mail, a CI log), so the log level
/// (`warn` by default) must not swallow them; `-q` picks [`NoProgress`] instead.
pub struct LogProgress {
    interval: Duration,
    state: Mutex<LogState>,
    bytes: AtomicU64,
    files: AtomicU64,
    out: Mutex<Box<dyn std::io::Write + Send>>,
}

impl std::fmt::Debug for LogProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogProgress")
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct LogState {
    phase: Option<Phase>,
    total_bytes: u64,
    total_files: u64,
    started: Instant,
    last: Instant,
}

impl LogProgress {
    /// Lines on stderr, at most every `interval` while a phase runs.
    pub fn new(interval: Duration) -> Self {
        Self::to_writer(interval, Box::new(std::io::stderr()))
    }

    /// Lines written to `out` (for tests and embedding).
    pub fn to_writer(interval: Duration, out: Box<dyn std::io::Write + Send>) -> Self {
        let now = Instant::now();
        LogProgress {
            interval,
            state: Mutex::new(LogState {
                phase: None,
                total_bytes: 0,
                total_files: 0,
                started: now,
                last: now,
            }),
            bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            out: Mutex::new(out),
        }
    }

    fn line(&self, st: &LogState) -> String {
        let b = self.bytes.load(Ordering::Relaxed);
        let f = self.files.load(Ordering::Relaxed);
        let secs = st.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{}: {}/{} files, {}/{} ({}/s)",
            st.phase.map(Phase::name).unwrap_or("-"),
            f,
            st.total_files,
            human_bytes(b),
            human_bytes(st.total_bytes),
            human_bytes((b as f64 / secs) as u64)
        )
    }

    fn emit(&self, text: &str) {
        let ts = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
        let mut out = self.out.lock().unwrap();
        // A closed stderr must not fail the backup: progress is best effort.
        let _ = writeln!(out, "{ts} {}", crate::secrets::redact(text));
        let _ = out.flush();
    }
}

impl Progress for LogProgress {
    fn begin(&self, phase: Phase, total_bytes: u64, total_files: u64) {
        let mut st = self.state.lock().unwrap();
        st.phase = Some(phase);
        st.total_bytes = total_bytes;
        st.total_files = total_files;
        st.started = Instant::now();
        st.last = st.started;
        self.bytes.store(0, Ordering::Relaxed);
        self.files.store(0, Ordering::Relaxed);
        self.emit(&format!(
            "{}: {total_files} files, {} to go",
            phase.name(),
            human_bytes(total_bytes)
        ));
    }

    fn advance(&self, bytes: u64, files: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.files.fetch_add(files, Ordering::Relaxed);
        let Ok(mut st) = self.state.try_lock() else {
            return;
        };
        if st.last.elapsed() >= self.interval {
            st.last = Instant::now();
            self.emit(&self.line(&st));
        }
    }

    fn note(&self, message: &str) {
        self.emit(message);
    }

    fn end(&self) {
        let mut st = self.state.lock().unwrap();
        if st.phase.is_some() {
            self.emit(&format!("{} done", self.line(&st)));
        }
        st.phase = None;
    }
}

/// indicatif bars for a terminal: one bar per phase with bytes, files, rate and ETA.
pub struct TerminalProgress {
    bar: Mutex<Option<indicatif::ProgressBar>>,
    files: AtomicU64,
    total_files: AtomicU64,
}

impl Default for TerminalProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl TerminalProgress {
    /// Bars drawn on stderr.
    pub fn new() -> Self {
        TerminalProgress {
            bar: Mutex::new(None),
            files: AtomicU64::new(0),
            total_files: AtomicU64::new(0),
        }
    }
}

impl Progress for TerminalProgress {
    fn begin(&self, phase: Phase, total_bytes: u64, total_files: u64) {
        let bar = indicatif::ProgressBar::new(total_bytes);
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {msg} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(phase.name());
        bar.enable_steady_tick(Duration::from_millis(200));
        self.files.store(0, Ordering::Relaxed);
        self.total_files.store(total_files, Ordering::Relaxed);
        if let Some(old) = self.bar.lock().unwrap().replace(bar) {
            old.finish();
        }
    }

    fn advance(&self, bytes: u64, files: u64) {
        let done = self.files.fetch_add(files, Ordering::Relaxed) + files;
        if let Some(bar) = self.bar.lock().unwrap().as_ref() {
            bar.inc(bytes);
            if files > 0 {
                bar.set_message(format!(
                    "{done}/{} files",
                    self.total_files.load(Ordering::Relaxed)
                ));
            }
        }
    }

    fn note(&self, message: &str) {
        match self.bar.lock().unwrap().as_ref() {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    fn end(&self) {
        if let Some(bar) = self.bar.lock().unwrap().take() {
            bar.finish();
        }
    }
}

/// Progress counted by blocking worker threads and forwarded to the real sink by the async
/// side (so workers need no borrowed sink and the async runtime keeps running: lock refresh).
#[derive(Debug, Default)]
pub(crate) struct Counter {
    bytes: AtomicU64,
    files: AtomicU64,
    notes: Mutex<Vec<String>>,
}

impl Progress for Counter {
    fn advance(&self, bytes: u64, files: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.files.fetch_add(files, Ordering::Relaxed);
    }

    fn note(&self, message: &str) {
        self.notes.lock().unwrap().push(message.to_string());
    }
}

impl Counter {
    fn forward(&self, to: &dyn Progress, sent: &mut (u64, u64)) {
        let (b, f) = (
            self.bytes.load(Ordering::Relaxed),
            self.files.load(Ordering::Relaxed),
        );
        if b != sent.0 || f != sent.1 {
            to.advance(b - sent.0, f - sent.1);
            *sent = (b, f);
        }
        for n in std::mem::take(&mut *self.notes.lock().unwrap()) {
            to.note(&n);
        }
    }
}

/// Runs blocking `work` on tokio's blocking pool while forwarding what it counts to
/// `progress` every 100 ms.
pub(crate) async fn blocking_with_progress<T, F>(progress: &dyn Progress, work: F) -> T
where
    T: Send + 'static,
    F: FnOnce(std::sync::Arc<Counter>) -> T + Send + 'static,
{
    let counter = std::sync::Arc::new(Counter::default());
    let c = counter.clone();
    let mut handle = tokio::task::spawn_blocking(move || work(c));
    let mut sent = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let out = loop {
        tokio::select! {
            r = &mut handle => break r,
            _ = tick.tick() => counter.forward(progress, &mut sent),
        }
    };
    counter.forward(progress, &mut sent);
    match out {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("blocking task cancelled: {e}"),
    }
}

/// `1.5 GiB`-style sizes for humans.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_progress_writes_plain_lines_with_secrets_masked() {
        let buf = Buf::default();
        let p = LogProgress::to_writer(Duration::ZERO, Box::new(buf.clone()));
        p.note("connecting to host=db password=hunter2");
        p.begin(Phase::Backup, 3 << 20, 2);
        p.advance(1 << 20, 1);
        p.advance(2 << 20, 1);
        p.end();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains('\r') && !text.contains('\u{1b}'), "{text:?}");
        assert!(text.ends_with('\n'));
        assert!(
            lines[0].ends_with("connecting to host=db password=***"),
            "{text}"
        );
        assert!(
            lines[1].ends_with("backup: 2 files, 3.0 MiB to go"),
            "{text}"
        );
        assert!(
            lines[2].contains("backup: 1/2 files, 1.0 MiB/3.0 MiB"),
            "{text}"
        );
        assert!(
            lines
                .last()
                .unwrap()
                .contains("backup: 2/2 files, 3.0 MiB/3.0 MiB")
                && lines.last().unwrap().ends_with(" done"),
            "{text}"
        );
        // Each line starts with a UTC timestamp.
        for l in &lines {
            let ts = l.split(' ').next().unwrap();
            assert!(
                ts.len() == 20 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
                "{l}"
            );
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
