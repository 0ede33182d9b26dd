//! Asynchronous `archive-push`: a spool directory and a background pusher.
//!
//! With a spool directory, `archive-push PATH` does not push the file itself. It looks in
//! `<spool>/out/<cluster>/` for the pusher's verdict on that file:
//! - `<name>.ok` (written only once the object is durable in the repository) whose recorded
//!   size and modification time match the file: remove it and exit 0;
//! - `<name>.error`: remove it and fail with the recorded exit code and message (PostgreSQL
//!   retries later, and the pusher tries again);
//! - neither: make sure the pusher runs (spawning it when its lock is free), wait, look again;
//!   after the timeout fail with exit 1 so PostgreSQL retries.
//!
//! The pusher (`pgkeep archive-push-worker`, started detached) holds `<spool>/worker.lock`
//! (flock), opens the repository once, and pushes every file PostgreSQL has marked ready
//! (`pg_wal/archive_status/*.ready`) with `jobs` pushes in parallel, ahead of PostgreSQL
//! asking for them one by one. It exits after `idle_exit` without work. A segment is
//! acknowledged to PostgreSQL only through an `.ok` written after the push succeeded, so the
//! durability guarantee is the synchronous one; the gain is the start-up cost paid once and
//! the parallelism.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures::stream::{self, StreamExt};
use pgkeep_pg::wal::WalFileName;
use serde::{Deserialize, Serialize};

use crate::commands::archive::{
    open_repository_fast, push_file, write_atomically, write_restored, ArchivePushReport,
    PushOutcome,
};
use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};

/// Default number of parallel pushes of the background pusher.
pub const DEFAULT_JOBS: usize = 4;
/// Default wait of the foreground for the pusher's verdict on its file.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the pusher stays without work before it exits.
pub const DEFAULT_IDLE_EXIT: Duration = Duration::from_secs(30);

/// Options of the asynchronous mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AsyncPushOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// The spool directory (local, writable by the server user).
    pub spool_dir: PathBuf,
    /// Parallel pushes of the background pusher.
    pub jobs: usize,
    /// How long the foreground waits for its file.
    pub timeout: Duration,
}

fn out_dir(spool: &Path, cluster: &str) -> PathBuf {
    spool.join("out").join(cluster)
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", p.display()), e)
}

/// `size mtime_ns` of a file: how an `.ok` is tied to the very file that was pushed.
fn stamp(path: &Path) -> Result<String> {
    let m = std::fs::metadata(path).map_err(|e| io_err("reading the metadata of", path, e))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{} {mtime}", m.len()))
}

/// Tries to take the pusher's lock without waiting; `None` when another process holds it.
fn try_lock(spool: &Path) -> Result<Option<File>> {
    let p = spool.join("worker.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| io_err("opening", &p, e))?;
    // SAFETY: flock on a descriptor we own; released when `f` is closed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(Some(f))
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(io_err("locking", &p, e))
        }
    }
}

/// How the foreground starts the pusher: this executable with the run's repository,
/// configuration file and cluster (the environment, passphrase sources included, is
/// inherited).
fn spawn_worker(ctx: &Context, opts: &AsyncPushOptions, pg_wal: &Path) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the pgkeep executable", e))?;
    let mut cmd = Command::new(exe);
    if let Some(c) = &ctx.settings.config_file {
        cmd.arg("--config").arg(c);
    }
    cmd.arg("--repo")
        .arg(&ctx.repository()?.url)
        .arg("--cluster")
        .arg(&opts.cluster)
        .arg("archive-push-worker")
        .arg("--spool-dir")
        .arg(&opts.spool_dir)
        .arg("--jobs")
        .arg(opts.jobs.to_string())
        .arg(pg_wal);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(opts.spool_dir.join("worker.log"))
        .map_err(|e| io_err("opening", &opts.spool_dir.join("worker.log"), e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: signals meant for the archiver do not stop it mid-push.
        .process_group(0);
    cmd.spawn()
        .map_err(|e| Error::io("starting the background pusher", e))?;
    Ok(())
}

/// Fails at once when nothing can be written in the spool (a full file system, a quota, a
/// permission): the pusher records its verdicts there, so no segment could be acknowledged,
/// and waiting for the timeout would only hide the reason from the server log.
fn probe_spool(out: &Path, spool: &Path) -> Result<()> {
    use std::io::Write;
    let probe = out.join(format!(".probe-{}", std::process::id()));
    let written = std::fs::File::create(&probe).and_then(|mut f| f.write_all(b"probe\n"));
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| {
        Error::with_hint(
            ErrorKind::Failure,
            format!(
                "cannot write in the spool directory {}: {e}",
                spool.display()
            ),
            "free space on its file system (or fix its permissions); until then no WAL file \
             is acknowledged to PostgreSQL, which keeps it and retries",
        )
    })
}

/// The foreground of asynchronous `archive-push PATH`.
pub async fn push_async(
    ctx: &Context,
    opts: &AsyncPushOptions,
    path: &Path,
) -> Result<ArchivePushReport> {
    let started = Instant::now();
    let name = WalFileName::from_path(path)
        .map_err(|e| Error::usage(format!("{}: {e}", path.display())))?;
    let file_stamp = stamp(path)?;
    let out = out_dir(&opts.spool_dir, &opts.cluster);
    std::fs::create_dir_all(&out).map_err(|e| io_err("creating", &out, e))?;
    let pg_wal = std::fs::canonicalize(path.parent().unwrap_or(Path::new(".")))
        .map_err(|e| io_err("resolving", path, e))?;
    let ok = out.join(format!("{name}.ok"));
    let err = out.join(format!("{name}.error"));
    let global_err = out.join("global.error");
    probe_spool(&out, &opts.spool_dir)?;
    let mut delay = Duration::from_millis(5);
    let mut spawned_at: Option<Instant> = None;
    loop {
        if let Ok(text) = std::fs::read_to_string(&ok) {
            let _ = std::fs::remove_file(&ok);
            let (recorded, outcome) = text.trim().split_once('|').unwrap_or((text.trim(), ""));
            if recorded == file_stamp {
                return Ok(ArchivePushReport {
                    file: name.to_string(),
                    key: crate::commands::archive::wal_key(&opts.cluster, &name),
                    outcome: if outcome == "already_archived" {
                        PushOutcome::AlreadyArchived
                    } else {
                        PushOutcome::Stored
                    },
                    bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
                    elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
                    // The background pusher scanned it.
                    scan_ms: None,
                });
            }
            // The verdict was about another file of that name (an older one): push again.
            tracing::warn!("stale acknowledgement for {name} in the spool; pushing it again");
        }
        for e in [&err, &global_err] {
            if let Ok(text) = std::fs::read_to_string(e) {
                let _ = std::fs::remove_file(e);
                let (code, message) = text.split_once('\n').unwrap_or(("1", &text));
                let kind = ErrorKind::ALL
                    .into_iter()
                    .find(|k| k.exit_code().to_string() == code.trim())
                    .unwrap_or(ErrorKind::Failure);
                return Err(Error::new(kind, message.trim_end().to_string()));
            }
        }
        if started.elapsed() >= opts.timeout {
            return Err(Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "WAL file {name} was not archived by the background pusher within {}s",
                    opts.timeout.as_secs()
                ),
                format!(
                    "see {} ; PostgreSQL will retry",
                    opts.spool_dir.join("worker.log").display()
                ),
            ));
        }
        // Start the pusher when nobody holds its lock (at most every 2 s from here).
        if spawned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
            if let Some(lock) = try_lock(&opts.spool_dir)? {
                drop(lock);
                spawn_worker(ctx, opts, &pg_wal)?;
                spawned_at = Some(Instant::now());
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Options of the background pusher.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// The spool directory.
    pub spool_dir: PathBuf,
    /// The server's `pg_wal` directory (where `archive_status/*.ready` are).
    pub pg_wal: PathBuf,
    /// Parallel pushes.
    pub jobs: usize,
    /// Exit after this long without work.
    pub idle_exit: Duration,
}

/// What the pusher did before it exited.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkerReport {
    /// Whether another pusher held the lock (this one did nothing).
    pub already_running: bool,
    /// Files pushed (or found already archived).
    pub pushed: usize,
    /// Files that failed.
    pub failed: usize,
}

impl std::fmt::Display for WorkerReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "background pusher: {} pushed, {} failed{}",
            self.pushed,
            self.failed,
            if self.already_running {
                " (another pusher was running)"
            } else {
                ""
            }
        )
    }
}

impl Report for WorkerReport {}

/// Whether the verdict was recorded.
fn write_verdict(path: &Path, text: &str) -> bool {
    match write_atomically(path, text.as_bytes()) {
        Ok(()) => true,
        Err(e) => {
            tracing::error!("cannot write {}: {e}", path.display());
            false
        }
    }
}

/// Files PostgreSQL has marked ready for archiving, history files first, then in name order
/// (the order PostgreSQL archives in).
fn ready_files(pg_wal: &Path) -> Result<Vec<String>> {
    let status = pg_wal.join("archive_status");
    let rd = std::fs::read_dir(&status).map_err(|e| io_err("listing", &status, e))?;
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".ready").map(str::to_string)
        })
        .filter(|n| WalFileName::parse(n).is_ok())
        .collect();
    v.sort_by_key(|n| (!n.ends_with(".history"), n.clone()));
    Ok(v)
}

/// The background pusher (`pgkeep archive-push-worker`).
pub async fn push_worker(ctx: &Context, opts: &WorkerOptions) -> Result<WorkerReport> {
    let mut report = WorkerReport::default();
    std::fs::create_dir_all(&opts.spool_dir).map_err(|e| io_err("creating", &opts.spool_dir, e))?;
    let Some(_lock) = try_lock(&opts.spool_dir)? else {
        report.already_running = true;
        return Ok(report);
    };
    let out = out_dir(&opts.spool_dir, &opts.cluster);
    std::fs::create_dir_all(&out).map_err(|e| io_err("creating", &out, e))?;
    let repo = match open_repository_fast(ctx).await {
        Ok(r) => r,
        Err(e) => {
            write_verdict(
                &out.join("global.error"),
                &format!("{}\n{e}", e.exit_code()),
            );
            return Err(e);
        }
    };
    // cluster.copy_to: a segment is acknowledged only when every repository holds it.
    let copies = match crate::commands::mirror::open_copies(ctx).await {
        Ok(c) => c,
        Err(e) => {
            write_verdict(
                &out.join("global.error"),
                &format!("{}\n{e}", e.exit_code()),
            );
            return Err(e);
        }
    };
    let _ = std::fs::remove_file(out.join("global.error"));
    let mut idle_since = Instant::now();
    // Names pushed by this pusher: PostgreSQL renames `.ready` only after the foreground
    // collected the `.ok`, so without this a file would be pushed twice.
    let mut done = std::collections::HashSet::new();
    loop {
        let todo: Vec<String> = ready_files(&opts.pg_wal)?
            .into_iter()
            .filter(|n| {
                !done.contains(n)
                    && !out.join(format!("{n}.ok")).exists()
                    && !out.join(format!("{n}.error")).exists()
            })
            .collect();
        if todo.is_empty() {
            if idle_since.elapsed() >= opts.idle_exit {
                return Ok(report);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let results: Vec<(String, bool)> = stream::iter(todo)
            .map(|n| {
                let (repo, out, copies) = (repo.clone(), out.clone(), copies.clone());
                let path = opts.pg_wal.join(&n);
                let cluster = opts.cluster.clone();
                async move {
                    let file_stamp = stamp(&path);
                    let pushed = match push_file(&repo, &cluster, &path).await {
                        Ok(r) if !copies.is_empty() => {
                            match crate::commands::archive::WalFileContent::read(&path) {
                                Ok(c) => crate::commands::mirror::push_to_copies(
                                    &copies, &cluster, &path, &c,
                                )
                                .await
                                .map(|()| r),
                                Err(e) => Err(e),
                            }
                        }
                        other => other,
                    };
                    match (file_stamp, pushed) {
                        (Ok(s), Ok(r)) => {
                            let outcome = match r.outcome {
                                PushOutcome::Stored => "stored",
                                PushOutcome::AlreadyArchived => "already_archived",
                            };
                            // Not recorded (a full spool): not done, pushed (found
                            // archived) and recorded again on a later round.
                            let recorded = write_verdict(
                                &out.join(format!("{n}.ok")),
                                &format!("{s}|{outcome}"),
                            );
                            (n, recorded)
                        }
                        (Err(e), _) | (_, Err(e)) => {
                            tracing::error!("pushing {n}: {e}");
                            write_verdict(
                                &out.join(format!("{n}.error")),
                                &format!("{}\n{e}", e.exit_code()),
                            );
                            (n, false)
                        }
                    }
                }
            })
            .buffer_unordered(opts.jobs.max(1))
            .collect()
            .await;
        let any_failed = results.iter().any(|(_, ok)| !ok);
        for (n, ok) in results {
            if ok {
                report.pushed += 1;
                done.insert(n);
            } else {
                report.failed += 1;
            }
        }
        if any_failed {
            // A verdict that could not be recorded is retried: not in a busy loop.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        idle_since = Instant::now();
        // Files the foreground never collected (PostgreSQL stopped, or archived them some
        // other way) would pile up: drop verdicts whose .ready is gone and that are old.
        sweep(&out, &opts.pg_wal);
    }
}

fn sweep(out: &Path, pg_wal: &Path) {
    let Ok(rd) = std::fs::read_dir(out) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(base) = n.strip_suffix(".ok") else {
            continue;
        };
        let ready = pg_wal.join("archive_status").join(format!("{base}.ready"));
        let old = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|d| d > Duration::from_secs(600));
        if old && !ready.exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// archive-get with prefetch

/// How many segments the prefetcher fetches ahead of the one PostgreSQL asked for.
pub const DEFAULT_PREFETCH: u32 = 8;

fn in_dir(spool: &Path, cluster: &str) -> PathBuf {
    spool.join("in").join(cluster)
}

/// Options of `archive-get` with a spool directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AsyncGetOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// The spool directory.
    pub spool_dir: PathBuf,
    /// Segments to fetch ahead.
    pub prefetch: u32,
}

/// `archive-get WALNAME DEST` with prefetch: a segment already fetched (and verified) by
/// the prefetcher is moved into place; otherwise it is fetched now. Either way, for a
/// segment, a detached prefetcher then fetches the following ones in parallel, so recovery
/// does not wait for one round trip per segment. Files in the spool are only ever verified
/// copies of write-once objects, so a prefetched file is always the right content.
pub async fn get_async(
    ctx: &Context,
    opts: &AsyncGetOptions,
    walname: &str,
    dest: &Path,
) -> Result<crate::commands::archive::ArchiveGetReport> {
    use crate::commands::archive::{get_file, missing_error, ArchiveGetReport};
    let started = Instant::now();
    let name = WalFileName::parse(walname).map_err(|e| Error::usage(e.to_string()))?;
    let dir = in_dir(&opts.spool_dir, &opts.cluster);
    std::fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
    // Recovery moves forward: what is older than the file asked for will not be asked again.
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.len() == 24 && n.as_str() < walname && n[..8] == walname[..8.min(walname.len())] {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let spooled = dir.join(walname);
    let report = if spooled.exists() {
        let bytes = std::fs::metadata(&spooled).map(|m| m.len()).unwrap_or(0);
        // A move when the spool is on the same file system (no copy); a copy otherwise.
        if std::fs::rename(&spooled, dest).is_err() {
            let data = std::fs::read(&spooled).map_err(|e| io_err("reading", &spooled, e))?;
            write_restored(dest, &data)?;
            let _ = std::fs::remove_file(&spooled);
        }
        ArchiveGetReport {
            file: walname.to_string(),
            dest: dest.to_path_buf(),
            bytes,
            elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        }
    } else {
        let repo = open_repository_fast(ctx).await?;
        match get_file(&repo, &opts.cluster, &name, dest).await? {
            Some(r) => r,
            None => return Err(missing_error(&opts.cluster, walname)),
        }
    };
    if let WalFileName::Segment(_) = name {
        if opts.prefetch > 0 {
            if let Some(lock) = try_lock_named(&opts.spool_dir, "prefetch.lock")? {
                drop(lock);
                spawn_prefetcher(ctx, opts, walname)?;
            }
        }
    }
    Ok(report)
}

fn try_lock_named(spool: &Path, file: &str) -> Result<Option<File>> {
    let p = spool.join(file);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| io_err("opening", &p, e))?;
    // SAFETY: flock on a descriptor we own; released when `f` is closed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(io_err("locking", &p, e))
    }
}

fn spawn_prefetcher(ctx: &Context, opts: &AsyncGetOptions, after: &str) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the pgkeep executable", e))?;
    let mut cmd = Command::new(exe);
    if let Some(c) = &ctx.settings.config_file {
        cmd.arg("--config").arg(c);
    }
    let log_path = opts.spool_dir.join("prefetch.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io_err("opening", &log_path, e))?;
    cmd.arg("--repo")
        .arg(&ctx.repository()?.url)
        .arg("--cluster")
        .arg(&opts.cluster)
        .arg("archive-get-prefetch")
        .arg("--spool-dir")
        .arg(&opts.spool_dir)
        .arg("--count")
        .arg(opts.prefetch.to_string())
        .arg(after)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0);
    cmd.spawn()
        .map_err(|e| Error::io("starting the prefetcher", e))?;
    Ok(())
}

/// The prefetcher (`pgkeep archive-get-prefetch`): fetches the `count` segments after
/// `after` that are not spooled yet, in parallel, into `<spool>/in/<cluster>/`, verified,
/// each written atomically. Stops at the first segment the archive does not have.
pub async fn prefetch(ctx: &Context, opts: &AsyncGetOptions, after: &str) -> Result<usize> {
    use crate::commands::archive::fetch;
    let Some(_lock) = try_lock_named(&opts.spool_dir, "prefetch.lock")? else {
        return Ok(0);
    };
    let first: pgkeep_pg::wal::WalSegmentName = after
        .parse()
        .map_err(|e: pgkeep_pg::PgError| Error::usage(e.to_string()))?;
    let repo = open_repository_fast(ctx).await?;
    let seg_size = crate::commands::archive::segment_size(&repo, &opts.cluster).await?;
    let dir = in_dir(&opts.spool_dir, &opts.cluster);
    std::fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
    let mut names = Vec::new();
    let mut s = first;
    for _ in 0..opts.prefetch {
        s = s.next(seg_size);
        names.push(s);
    }
    let fetched: Vec<bool> = stream::iter(names)
        .map(|s| {
            let (repo, dir) = (repo.clone(), dir.clone());
            let cluster = opts.cluster.clone();
            async move {
                let path = dir.join(s.to_string());
                if path.exists() {
                    return true;
                }
                match fetch(&repo, &cluster, &WalFileName::Segment(s)).await {
                    Ok(Some(data)) => write_restored(&path, &data).is_ok(),
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!("prefetching {s}: {e}");
                        false
                    }
                }
            }
        })
        .buffered(4)
        .collect()
        .await;
    Ok(fetched.iter().take_while(|ok| **ok).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_files_in_archiving_order() {
        let d = tempfile::tempdir().unwrap();
        let st = d.path().join("archive_status");
        std::fs::create_dir(&st).unwrap();
        for n in [
            "000000020000000000000005.ready",
            "00000002.history.ready",
            "000000020000000000000004.ready",
            "000000020000000000000003.done",
            "garbage.ready",
        ] {
            std::fs::write(st.join(n), b"").unwrap();
        }
        assert_eq!(
            ready_files(d.path()).unwrap(),
            [
                "00000002.history",
                "000000020000000000000004",
                "000000020000000000000005"
            ]
        );
    }

    #[test]
    fn one_lock_holder_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let a = try_lock(d.path()).unwrap();
        assert!(a.is_some());
        assert!(try_lock(d.path()).unwrap().is_none());
        drop(a);
        assert!(try_lock(d.path()).unwrap().is_some());
    }
}
