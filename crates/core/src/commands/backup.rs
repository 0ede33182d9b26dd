//! `pgkeep backup` (method `local`): a consistent physical backup of a running cluster whose
//! data directory this host can read.
//!
//! Steps, in order:
//! 1. a shared repository lock scoped to `backup:<cluster>` (a second backup of the same
//!    cluster fails at once with exit 11 naming the holder; other clusters, WAL pushes and
//!    restores go on);
//! 2. connect; check the server and the data directory are the same cluster, and that the
//!    cluster is the one earlier backups under this name came from (exit 15 otherwise);
//! 3. `pg_backup_start` (fast checkpoint) after a temporary replication slot pins the WAL;
//! 4. walk the data directory and tablespaces (PostgreSQL's exclusions, see
//!    `pgkeep_pg::datadir`) and read the files on N threads into one [`BlobWriter`],
//!    verifying page checksums of relation files as they stream by. Files unchanged since the
//!    previous backup are not read (see [`unchanged_since`]) unless `full_read`;
//!    `global/pg_control` is read last;
//! 5. `pg_backup_stop`; copy the WAL from the start to the stop segment out of `pg_wal`
//!    (pinned by the slot; a segment not there is taken from this repository's archive) into
//!    the repository, so the backup restores without an archive;
//! 6. finish the writer (packs, then index); when pgkeep archives the cluster, wait until
//!    the backup's WAL is archived; then save the manifest: the commit point.
//!
//! The server may be a standby: [`crate::commands::standby`] says what differs.
//!
//! A failure anywhere before step 6 leaves no manifest: the backup does not exist, and the
//! blobs already uploaded are reused by the next run.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use pgkeep_pg::checksum::{absolute_block, BLCKSZ};
use pgkeep_pg::datadir::{self, DataDirEntry};
use pgkeep_pg::{
    BackupSession, ConnParams, ControlFile, Lsn, PageCheck, PgClient, PgError, WalFileName,
    WalSegmentName,
};
use pgkeep_repo::{BlobWriter, LockKind, Repository, StreamRef, WriterOptions};
use serde::{Deserialize, Serialize};

use crate::context::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{
    self, BackupManifest, BackupTotals, EntryKind, FileEntry, PageFailure, TablespaceEntry,
    WalEntry, KIND_PHYSICAL, MANIFEST_FORMAT,
};
use crate::progress::{human_bytes, Counter, Phase, Progress};

/// A file is only trusted unchanged when its mtime is older than the previous backup's start
/// by at least this much: file systems keep coarse timestamps (a write in the same tick as the
/// previous read leaves the mtime as it was), and clocks step.
pub const MTIME_SAFETY_MARGIN: Duration = Duration::from_secs(5);

/// The `relation_chunk_size` the CLI uses when no setting gives one (see
/// [`BackupOptions::relation_chunk_size`]; chosen by `bench/compare.sh`, README "Benchmarks").
pub const DEFAULT_RELATION_CHUNK_SIZE: u32 = 1 << 20;

/// The control file, relative to the data directory.
const PG_CONTROL: &str = "global/pg_control";

/// Read size for data files: a multiple of the page size.
const READ_BLOCK: usize = 1024 * 1024;

/// Options of `backup`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// Data directory; default: the server's `data_directory`.
    pub pgdata: Option<PathBuf>,
    /// libpq conninfo laid over the PG* environment. Never stored; refused with a password.
    #[serde(skip_serializing)]
    pub conninfo: Option<String>,
    /// User label.
    pub label: Option<String>,
    /// Read every file, even those unchanged since the previous backup.
    pub full_read: bool,
    /// Reader threads; 0 = one per core.
    pub threads: usize,
    /// Chunking of relation files: 0 = the repository's content-defined chunks (like every
    /// other file); N = cut them at every N bytes (a multiple of 8192) before the
    /// content-defined chunker sees them. Pages never move inside a relation file, so aligned
    /// pieces bound what one changed page costs (content-defined chunks of very regular data
    /// grow to the chunker's maximum, 4 MiB) at the price of more blobs in the index.
    #[serde(default)]
    pub relation_chunk_size: u32,
    /// When the cluster archives its WAL with `pgkeep archive-push`, how long to wait after
    /// `pg_backup_stop` for the backup's WAL to reach the archive (the backup fails, without
    /// a manifest, if it does not). None = 60 s (of a standby: its `archive_timeout` plus
    /// 30 s when longer, see [`crate::commands::standby`]). Ignored when another tool archives.
    #[serde(default)]
    pub archive_timeout_secs: Option<u64>,
    /// How the cluster is read: its data directory on this host, or `pg_basebackup`'s stream
    /// (see [`crate::commands::backup_remote`]).
    #[serde(default)]
    pub method: BackupMethod,
}

/// How `backup` reads the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupMethod {
    /// Read the data directory directly (on the database host).
    #[default]
    Local,
    /// Ingest the tar stream of `pg_basebackup` (from any host that can connect).
    Basebackup,
}

/// What `backup` did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// The new backup's id.
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// Label.
    pub label: Option<String>,
    /// Start LSN.
    pub start_lsn: String,
    /// Stop LSN.
    pub stop_lsn: String,
    /// Timeline.
    pub timeline: u32,
    /// The previous backup whose unchanged files were reused, if any.
    pub previous: Option<String>,
    /// Totals (as in the manifest).
    pub totals: BackupTotals,
    /// Failed pages.
    pub page_checksum_failures: Vec<PageFailure>,
    /// Warnings (each also shown as it happened).
    pub warnings: Vec<String>,
    /// Seconds.
    pub duration_secs: f64,
}

impl fmt::Display for BackupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        writeln!(
            f,
            "backup {} of cluster {} done in {:.1} s (lsn {} .. {}, timeline {})",
            self.id, self.cluster, self.duration_secs, self.start_lsn, self.stop_lsn, self.timeline
        )?;
        writeln!(
            f,
            "{} in {} files ({} read, {} files unchanged since {}), {} WAL files ({}); {} new, {} stored",
            human_bytes(t.logical_bytes),
            t.files,
            human_bytes(t.bytes_read),
            t.files_skipped_unchanged,
            self.previous.as_deref().unwrap_or("-"),
            t.wal_files,
            human_bytes(t.wal_bytes),
            human_bytes(t.new_bytes),
            human_bytes(t.stored_bytes)
        )?;
        for w in &self.warnings {
            writeln!(f, "WARNING: {w}")?;
        }
        Ok(())
    }
}

impl Report for BackupReport {
    fn has_warnings(&self) -> bool {
        !self.warnings.is_empty()
    }
}

/// A pgkeep-pg error as a core error (the kind follows what went wrong).
pub(crate) fn pg_error(e: PgError) -> Error {
    let kind = match &e {
        PgError::Conninfo(_) | PgError::SslConfig { .. } => ErrorKind::Usage,
        // A release pgkeep does not handle is a cluster that does not fit (exit 15).
        PgError::UnsupportedVersion { .. } => ErrorKind::ClusterMismatch,
        _ => ErrorKind::Failure,
    };
    let text = e.to_string();
    match text.split_once(". HINT: ") {
        Some((message, hint)) if kind == ErrorKind::ClusterMismatch => {
            Error::with_hint(kind, message, hint)
        }
        _ => Error::new(kind, text),
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

fn split_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            // Before 1970: floor to whole seconds.
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - n)
            }
        }
    }
}

/// Whether a file can be taken from the previous backup without reading it: same size, same
/// mtime to the nanosecond, and that mtime older than the previous backup's start minus
/// [`MTIME_SAFETY_MARGIN`]. Any write after the previous backup read the file moves the mtime
/// to at least that start, so it cannot match an mtime older than it; the margin covers file
/// systems whose timestamps are coarse and clocks that step back a little.
///
/// What it cannot see: a file rewritten with the same size and then given back an mtime older
/// than the margin (`touch -d`, a copy tool preserving times). PostgreSQL never does that;
/// `full_read` reads every file regardless. `crates/core/tests/physical_more.rs` pins both.
pub fn unchanged_since(
    prev: &FileEntry,
    prev_start: DateTime<Utc>,
    size: u64,
    mtime: i64,
    mtime_nsec: u32,
) -> bool {
    let limit = prev_start.timestamp() - MTIME_SAFETY_MARGIN.as_secs() as i64;
    prev.kind == EntryKind::File
        && prev.stream.is_some()
        && prev.size == size
        && prev.mtime == mtime
        && prev.mtime_nsec == mtime_nsec
        && mtime < limit
}

/// Whether `archive_command` runs `pgkeep archive-push`: a word whose file name is `pgkeep`
/// and a word `archive-push`. (Matching "pgkeep" anywhere took another tool's command whose
/// paths merely contain the word, e.g. `pgbackrest --config=/srv/pgkeep-test/... archive-push`,
/// for ours, and the backup then waited for WAL that never comes.)
pub(crate) fn pgkeep_archives(archive_command: &str) -> bool {
    let words: Vec<&str> = archive_command
        .split(|c: char| {
            c.is_whitespace() || c == ';' || c == '&' || c == '|' || c == '\'' || c == '"'
        })
        .filter(|w| !w.is_empty())
        .collect();
    words.iter().any(|w| w.rsplit('/').next() == Some("pgkeep")) && words.contains(&"archive-push")
}

/// Takes a physical backup of the cluster `opts.cluster`; see the module documentation.
/// Exit codes: 11 when another backup of this cluster runs, 15 when the server is another
/// cluster than the earlier backups under this name, 3 (via the report) with bad pages.
pub async fn backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    if let Some(c) = &opts.conninfo {
        if pgkeep_pg::conninfo_has_password(c) {
            return Err(Error::usage_hint(
                "the connection string holds a password",
                "give it through PGPASSWORD or ~/.pgpass: command lines show in the process list",
            ));
        }
    }
    if !opts.relation_chunk_size.is_multiple_of(BLCKSZ as u32) {
        return Err(Error::usage(format!(
            "relation chunk size {} is not a multiple of the page size {BLCKSZ}",
            opts.relation_chunk_size
        )));
    }
    let lock = repo
        .lock(
            LockKind::Shared,
            Some(&format!("backup:{}", opts.cluster)),
            "backup",
        )
        .await?;
    // A prune may have run between opening the repository and taking the lock: the backup
    // must not deduplicate against blobs it removed.
    let result = match repo.reload_index_if_changed().await {
        Err(e) => Err(e.into()),
        Ok(_) => match opts.method {
            BackupMethod::Local => run(repo, opts, progress).await,
            BackupMethod::Basebackup => super::backup_remote::run(repo, opts, progress).await,
        },
    };
    if let Err(e) = lock.release().await {
        tracing::warn!("could not release the repository lock: {e}");
    }
    result
}

async fn run(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let started = Instant::now();
    let params = ConnParams::resolve(opts.conninfo.as_deref()).map_err(pg_error)?;
    let client = PgClient::connect(&params).await.map_err(pg_error)?;
    let info = client.server_info().await.map_err(pg_error)?;
    info.ensure_supported(client.target()).map_err(pg_error)?;
    // A standby is backed up in place, as PostgreSQL allows: see `super::standby` for what
    // differs (stop point, pg_control last, the wait for the archive).
    let standby = info.in_recovery;
    let pgdata = opts
        .pgdata
        .clone()
        .unwrap_or_else(|| info.data_directory.clone());
    let control = ControlFile::read(&pgdata).map_err(|e| {
        if matches!(e, PgError::UnsupportedVersion { .. }) {
            return pg_error(e);
        }
        Error::with_hint(
            ErrorKind::Usage,
            format!("cannot read the data directory {}: {e}", pgdata.display()),
            "run on the database host as a user that can read the data directory, or give --pgdata",
        )
    })?;
    if control.major_version() != info.major_version() {
        return Err(Error::with_hint(
            ErrorKind::ClusterMismatch,
            format!(
                "the data directory {} is PostgreSQL {} but the server at {} runs PostgreSQL {}; nothing was backed up",
                pgdata.display(),
                control.major_version(),
                client.target(),
                info.major_version()
            ),
            "give --pgdata the data directory of the server that --pg reaches (SHOW data_directory on it), or point --pg at the server of that data directory",
        ));
    }
    if control.system_identifier != info.system_identifier {
        return Err(Error::with_hint(
            ErrorKind::ClusterMismatch,
            format!(
                "the data directory {} (system identifier {}) is not the cluster of the server at {} (system identifier {})",
                pgdata.display(),
                control.system_identifier,
                client.target(),
                info.system_identifier
            ),
            "check --pgdata and --pg",
        ));
    }

    // Identity against earlier backups of this cluster name; the previous physical backup.
    let headers = manifest::load_headers(repo, &opts.cluster).await?;
    if let Some((h, _)) = headers
        .iter()
        .rev()
        .find(|(h, _)| h.system_identifier.is_some())
    {
        let sysid = h.system_identifier.clone().unwrap_or_default();
        let major_differs = h.pg_major.is_some_and(|m| m != info.major_version());
        if sysid != info.system_identifier.to_string() || major_differs {
            return Err(Error::with_hint(
                ErrorKind::ClusterMismatch,
                format!(
                    "the server at {} (system identifier {}, PostgreSQL {}) is not the cluster backed up as {:?} (backup {}: system identifier {}, PostgreSQL {})",
                    client.target(),
                    info.system_identifier,
                    info.major_version(),
                    opts.cluster,
                    h.id,
                    sysid,
                    h.pg_major.map(|m| m.to_string()).unwrap_or_else(|| "?".into())
                ),
                "use another --cluster name for this server, or check --pg",
            ));
        }
    }
    let previous: Option<BackupManifest> =
        match headers.iter().rev().find(|(h, _)| h.kind == KIND_PHYSICAL) {
            Some((h, _)) => Some(manifest::load_physical(repo, &opts.cluster, &h.id).await?),
            None => None,
        };
    let newest_id = headers
        .iter()
        .map(|(h, _)| h.id.clone())
        .filter(|i| manifest::is_backup_id(i))
        .max();
    let id = choose_id(newest_id.as_deref()).await?;

    // Start.
    let start_time = Utc::now();
    let label = opts
        .label
        .clone()
        .unwrap_or_else(|| format!("pgkeep backup {id}"));
    progress.note(&format!(
        "backup {id}: pg_backup_start on {}",
        client.target()
    ));
    let mut session = BackupSession::start(client, &label)
        .await
        .map_err(pg_error)?;
    let start = session.start_info().clone();

    // Walk and read.
    let pd = pgdata.clone();
    let listing = tokio::task::spawn_blocking(move || datadir::walk(&pd))
        .await
        .map_err(|e| Error::new(ErrorKind::Failure, format!("walk task failed: {e}")))?
        .map_err(pg_error)?;
    let prev_files: HashMap<String, FileEntry> = match (&previous, opts.full_read) {
        (Some(p), false) => p
            .files
            .iter()
            .map(|f| (f.path.clone(), f.clone()))
            .collect(),
        _ => HashMap::new(),
    };
    let prev_start = previous.as_ref().map(|p| p.start_time);
    let mut files: Vec<Option<FileEntry>> = Vec::with_capacity(listing.entries.len());
    let mut to_read: Vec<(usize, DataDirEntry)> = Vec::new();
    let mut tablespaces = Vec::new();
    let mut totals = BackupTotals::default();
    for e in listing.entries {
        let (mtime, mtime_nsec) = split_time(e.mtime);
        let mut fe = FileEntry {
            path: e.rel_path.clone(),
            kind: match e.kind {
                datadir::EntryKind::File => EntryKind::File,
                datadir::EntryKind::Dir => EntryKind::Dir,
                datadir::EntryKind::Symlink => EntryKind::Symlink,
            },
            size: if e.kind == datadir::EntryKind::File {
                e.size
            } else {
                0
            },
            mode: e.mode,
            mtime,
            mtime_nsec,
            target: e.link_target.as_ref().map(|t| t.display().to_string()),
            stream: None,
        };
        match e.kind {
            datadir::EntryKind::Symlink => {
                if let (Some(oid), Some(t)) = (e.tablespace, &e.link_target) {
                    if e.rel_path == format!("pg_tblspc/{oid}") {
                        tablespaces.push(TablespaceEntry {
                            oid,
                            location: t.display().to_string(),
                        });
                    }
                }
                totals.other_entries += 1;
            }
            datadir::EntryKind::Dir => totals.other_entries += 1,
            datadir::EntryKind::File => {
                let reuse = match (prev_files.get(&e.rel_path), prev_start) {
                    (Some(p), Some(ps)) if unchanged_since(p, ps, e.size, mtime, mtime_nsec) => {
                        p.stream.clone()
                    }
                    _ => None,
                };
                if let Some(s) = reuse {
                    totals.files_skipped_unchanged += 1;
                    totals.bytes_skipped_unchanged += s.size;
                    fe.stream = Some(s);
                } else {
                    to_read.push((files.len(), e));
                }
            }
        }
        files.push(Some(fe));
    }

    let writer = repo.writer(WriterOptions::default());
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    } else {
        opts.threads
    };
    let verify = info.data_checksums && info.block_size as usize == BLCKSZ;
    let relation_chunk = opts.relation_chunk_size;
    // Largest first, so the last thread is not left alone with a 1 GiB segment.
    to_read.sort_by_key(|job| std::cmp::Reverse(job.1.size));
    let total_bytes: u64 = to_read.iter().map(|(_, e)| e.size).sum();
    progress.begin(Phase::Backup, total_bytes, to_read.len() as u64);
    // pg_control is read after every other file. On a standby, the minimum recovery point
    // in the copy is where a restore considers the backup consistent, so it must cover every
    // page copied before (pg_basebackup's server sends it last for the same reason); on a
    // primary the order does not matter.
    let control_job = to_read
        .iter()
        .position(|(_, e)| e.rel_path == PG_CONTROL)
        .map(|k| to_read.remove(k));
    let read_result = {
        let (w, pd, start_lsn) = (writer.clone(), pgdata.clone(), start.lsn);
        crate::progress::blocking_with_progress(progress, move |counter| {
            let cfg = ReadConfig {
                verify,
                start_lsn,
                relation_chunk: relation_chunk as usize,
            };
            let mut o = read_files(&w, &pd, to_read, threads, &cfg, &counter)?;
            if let Some(job) = control_job {
                let last = read_files(&w, &pd, vec![job], 1, &cfg, &counter)?;
                o.streams.extend(last.streams);
                o.failures.extend(last.failures);
            }
            Ok(o)
        })
        .await
    };
    progress.end();
    let outcome = match read_result {
        Ok(o) => o,
        Err(e) => {
            // Abandon the writer's pipeline; the session's drop aborts the backup on the server.
            let _ = writer.finish().await;
            return Err(e);
        }
    };
    for (i, r) in outcome.streams {
        match r {
            Some(s) => {
                totals.bytes_read += s.size;
                if let Some(f) = files[i].as_mut() {
                    f.size = s.size;
                    f.stream = Some(s);
                }
            }
            // Vanished while the backup ran (a dropped relation, a finished temp file): the
            // WAL replayed at restore accounts for it.
            None => files[i] = None,
        }
    }
    let mut warnings = Vec::new();
    for pf in &outcome.failures {
        warnings.push(format!(
            "page verification failed in {} block {} (relation block {}): {}",
            pf.path, pf.block, pf.rel_block, pf.reason
        ));
    }

    // Stop, then the WAL the backup needs.
    progress.note("pg_backup_stop");
    let stop = match session.stop().await {
        Ok(s) => s,
        Err(e) => {
            // Stop the writer's threads (and keep what it stored for the next run).
            let _ = writer.finish().await;
            return Err(pg_error(e));
        }
    };
    if standby {
        if let Err(e) = super::standby::check_stop(session.client(), start.timeline, stop.lsn).await
        {
            let _ = writer.finish().await;
            return Err(e);
        }
    }
    let seg_size = info.wal_segment_size;
    let mut wal_names: Vec<String> =
        WalSegmentName::range(start.lsn, stop.lsn, start.timeline, seg_size)
            .iter()
            .map(|s| s.to_string())
            .collect();
    if start.timeline > 1 {
        let hist = format!("{:08X}.history", start.timeline);
        if pgdata.join("pg_wal").join(&hist).exists() {
            wal_names.insert(0, hist);
        }
    }
    let wal_dir = pgdata.join("pg_wal");
    let wal_total: u64 = wal_names.len() as u64 * seg_size as u64;
    progress.begin(Phase::Wal, wal_total, wal_names.len() as u64);
    // The last segment is only written up to the stop LSN; what follows in a recycled file is
    // old WAL nobody needs. Only the part up to the end of the WAL page holding the stop LSN
    // is stored; a restore fills the rest with zeros (what a fresh segment holds, and where
    // recovery sees the end of WAL), so each backup does not add 16 MiB of stale WAL.
    let last_segment = WalSegmentName::from_end_lsn(stop.lsn, start.timeline, seg_size).to_string();
    let page = control.wal_block_size.max(1) as u64;
    let keep_in_last = (stop.lsn.segment_offset(seg_size) as u64).div_ceil(page) * page;
    let wal_result = {
        let (w, dir, names) = (writer.clone(), wal_dir.clone(), wal_names.clone());
        let (rt, r, cluster) = (
            tokio::runtime::Handle::current(),
            repo.clone(),
            opts.cluster.clone(),
        );
        crate::progress::blocking_with_progress(progress, move |counter| -> Result<Vec<WalEntry>> {
            let mut out = Vec::new();
            for name in names {
                let p = dir.join(&name);
                let cant = |e: std::io::Error| {
                    Error::new(
                        ErrorKind::Failure,
                        format!(
                            "WAL file {} needed by the backup cannot be read: {e}",
                            p.display()
                        ),
                    )
                };
                let keep = if name == last_segment && keep_in_last > 0 {
                    keep_in_last
                } else {
                    u64::MAX
                };
                let (size, s) = match File::open(&p) {
                    Ok(f) => {
                        let size = f.metadata().map_err(cant)?.len();
                        (size, w.ingest_reader(&mut f.take(keep.min(size)))?)
                    }
                    // Not in pg_wal, although the slot pins it: whatever removed it (an
                    // operator, a tool managing pg_wal), the copy in this repository's
                    // archive is the same WAL (checked against the cluster on the way in).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let data = rt
                            .block_on(archived_wal(&r, &cluster, &name))?
                            .ok_or_else(|| cant(e))?;
                        let size = data.len() as u64;
                        let part = &data[..keep.min(size) as usize];
                        (size, w.ingest_bytes(part)?)
                    }
                    Err(e) => return Err(cant(e)),
                };
                counter.advance(s.size, 1);
                out.push(WalEntry {
                    name,
                    size,
                    stream: s,
                });
            }
            Ok(out)
        })
        .await
    };
    progress.end();
    let wal = match wal_result {
        Ok(w) => w,
        Err(e) => {
            let _ = writer.finish().await;
            return Err(e);
        }
    };
    totals.wal_files = wal.len() as u64;
    totals.wal_bytes = wal.iter().map(|w| w.stream.size).sum();

    // Commit: packs and index, then the manifest.
    let stats = writer.finish().await?;
    session.check_slot().await.map_err(pg_error)?;
    // Point-in-time recovery from this backup needs its WAL in this repository's archive too
    // (RELIABILITY 15): when pgkeep archives this cluster, wait for it before committing.
    let archive_mode = session
        .client()
        .setting("archive_mode")
        .await
        .map_err(pg_error)?;
    let archive_command = session
        .client()
        .setting("archive_command")
        .await
        .map_err(pg_error)?;
    if archive_mode != "off" && pgkeep_archives(&archive_command) {
        progress.note("waiting for the backup's WAL to be archived");
        let segments = WalSegmentName::range(start.lsn, stop.lsn, start.timeline, seg_size);
        let timeout = super::standby::archive_wait(session.client(), opts, standby).await;
        let on_standby = standby.then(|| (session.client(), stop.lsn));
        super::standby::wait_for_backup_wal(repo, &opts.cluster, &segments, timeout, on_standby)
            .await?;
    }
    if let Err(e) = session.finish().await {
        // The slot is temporary: it goes with the connection anyway.
        tracing::warn!("{e}");
    }
    let files: Vec<FileEntry> = files.into_iter().flatten().collect();
    totals.files = files.iter().filter(|f| f.kind == EntryKind::File).count() as u64;
    totals.logical_bytes = files
        .iter()
        .filter(|f| f.kind == EntryKind::File)
        .map(|f| f.size)
        .sum();
    totals.new_bytes = stats.bytes_new;
    totals.stored_bytes = stats.stored_bytes;
    let m = BackupManifest {
        format: MANIFEST_FORMAT,
        kind: KIND_PHYSICAL.into(),
        id: id.clone(),
        cluster: opts.cluster.clone(),
        method: "local".into(),
        label: opts.label.clone(),
        host: pgkeep_repo::lock::hostname(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        system_identifier: info.system_identifier.to_string(),
        pg_version_num: info.version_num,
        pg_major: info.major_version(),
        timeline: start.timeline,
        wal_segment_size: seg_size,
        data_checksums: info.data_checksums,
        start_lsn: start.lsn.to_string(),
        stop_lsn: stop.lsn.to_string(),
        start_time,
        stop_time: stop.time,
        duration_secs: started.elapsed().as_secs_f64(),
        backup_label: stop.backup_label,
        tablespace_map: (!stop.tablespace_map.is_empty()).then_some(stop.tablespace_map),
        tablespaces,
        files,
        wal,
        totals,
        page_checksum_failures: outcome.failures,
    };
    repo.save_manifest(&opts.cluster, &id, &m).await?;
    for w in &warnings {
        progress.note(&format!("WARNING: {w}"));
    }
    Ok(BackupReport {
        id,
        cluster: opts.cluster.clone(),
        label: opts.label.clone(),
        start_lsn: m.start_lsn,
        stop_lsn: m.stop_lsn,
        timeline: m.timeline,
        previous: previous.map(|p| p.id),
        totals: m.totals,
        page_checksum_failures: m.page_checksum_failures,
        warnings,
        duration_secs: m.duration_secs,
    })
}

/// A WAL file of the backup from this repository's archive (`None` when it is not there).
async fn archived_wal(repo: &Repository, cluster: &str, name: &str) -> Result<Option<Vec<u8>>> {
    let Ok(file) = WalFileName::parse(name) else {
        return Ok(None);
    };
    crate::commands::archive::fetch(repo, cluster, &file).await
}

/// A backup id newer than every existing one: the current UTC second. When the newest id is
/// this very second (back-to-back backups), waits for the next; when it is later, the clock
/// is behind the one that made it: refuse.
pub(crate) async fn choose_id(newest: Option<&str>) -> Result<String> {
    for _ in 0..3 {
        let id = manifest::new_id(Utc::now());
        match newest {
            Some(n) if id.as_str() == n => {
                let ms = 1000 - Utc::now().timestamp_subsec_millis().min(999) as u64;
                tokio::time::sleep(Duration::from_millis(ms + 5)).await;
            }
            Some(n) if id.as_str() < n => {
                return Err(Error::with_hint(
                    ErrorKind::Failure,
                    format!("the new backup id {id} would not be newer than the newest existing backup {n}"),
                    "is there clock skew? check this host's clock (timedatectl, NTP) against the host that took that backup",
                ));
            }
            _ => return Ok(id),
        }
    }
    Err(Error::new(
        ErrorKind::Failure,
        "could not choose a backup id newer than the newest one",
    ))
}

struct ReadOutcome {
    /// (index in the file list, stream; None when the file vanished).
    streams: Vec<(usize, Option<StreamRef>)>,
    failures: Vec<PageFailure>,
}

/// How data files are read.
struct ReadConfig {
    /// Verify page checksums of relation files.
    verify: bool,
    /// The backup's start LSN (pages at or after it are not verified).
    start_lsn: Lsn,
    /// See [`BackupOptions::relation_chunk_size`].
    relation_chunk: usize,
}

/// Reads `jobs` on `threads` threads into `writer`.
fn read_files(
    writer: &BlobWriter,
    pgdata: &Path,
    jobs: Vec<(usize, DataDirEntry)>,
    threads: usize,
    cfg: &ReadConfig,
    counter: &Counter,
) -> Result<ReadOutcome> {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(ReadOutcome {
        streams: Vec::with_capacity(jobs.len()),
        failures: Vec::new(),
    });
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                if first_error.lock().unwrap().is_some() {
                    break;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some((i, e)) = jobs.get(k) else { break };
                match read_one(writer, pgdata, e, cfg, counter) {
                    Ok((stream, failures)) => {
                        let mut o = out.lock().unwrap();
                        o.streams.push((*i, stream));
                        o.failures.extend(failures);
                        counter.advance(0, 1);
                    }
                    Err(err) => {
                        let mut slot = first_error.lock().unwrap();
                        if slot.is_none() {
                            *slot = Some(err);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let mut o = out.into_inner().unwrap();
    o.failures
        .sort_by(|a, b| (&a.path, a.block).cmp(&(&b.path, b.block)));
    Ok(o)
}

fn read_one(
    writer: &BlobWriter,
    pgdata: &Path,
    e: &DataDirEntry,
    cfg: &ReadConfig,
    counter: &Counter,
) -> Result<(Option<StreamRef>, Vec<PageFailure>)> {
    let p = pgdata.join(&e.rel_path);
    let file = match File::open(&p) {
        Ok(f) => f,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok((None, Vec::new())),
        Err(err) => return Err(io_err("opening", &p, err)),
    };
    let segno = if cfg.verify {
        e.relation_file().map(|r| r.segno)
    } else {
        None
    };
    let mut reader = PageReader {
        file,
        buf: vec![0; READ_BLOCK],
        pos: 0,
        len: 0,
        offset: 0,
        segno,
        start_lsn: cfg.start_lsn,
        failures: Vec::new(),
        path: &e.rel_path,
        counter,
        error: None,
    };
    let res = if e.is_relation && cfg.relation_chunk > 0 {
        writer.ingest_reader_in_pieces(&mut reader, cfg.relation_chunk)
    } else {
        writer.ingest_reader(&mut reader)
    };
    if let Some(err) = reader.error.take() {
        return Err(io_err("reading", &p, err));
    }
    let s = res
        .map_err(|err| Error::new(ErrorKind::Failure, format!("storing {}: {err}", e.rel_path)))?;
    Ok((Some(s), reader.failures))
}

/// Reads a file in page-aligned blocks, checking each complete page of a relation file as it
/// passes (`segno` is `Some` for relation files when the cluster has checksums). A page that
/// fails is read again once: a concurrent write can tear a read, and the second read then
/// sees the whole page (it replaces the torn one in the backup).
struct PageReader<'a> {
    file: File,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
    /// File offset of `buf[0]`.
    offset: u64,
    segno: Option<u32>,
    start_lsn: Lsn,
    failures: Vec<PageFailure>,
    path: &'a str,
    counter: &'a Counter,
    /// The real I/O error (the chunker only passes its text on).
    error: Option<std::io::Error>,
}

impl PageReader<'_> {
    fn fill(&mut self) -> std::io::Result<()> {
        self.offset += self.len as u64;
        self.pos = 0;
        self.len = 0;
        while self.len < self.buf.len() {
            match self.file.read(&mut self.buf[self.len..]) {
                Ok(0) => break,
                Ok(n) => self.len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if let Some(segno) = self.segno {
            let pages = self.len / BLCKSZ;
            for k in 0..pages {
                let block = (self.offset / BLCKSZ as u64) as u32 + k as u32;
                let rel_block = absolute_block(segno, block);
                let range = k * BLCKSZ..(k + 1) * BLCKSZ;
                let check =
                    pgkeep_pg::verify_page(&self.buf[range.clone()], rel_block, self.start_lsn);
                if check.is_ok() {
                    continue;
                }
                let mut again = vec![0u8; BLCKSZ];
                let reread = self
                    .file
                    .read_exact_at(&mut again, self.offset + (k * BLCKSZ) as u64)
                    .is_ok();
                let check2 = if reread {
                    pgkeep_pg::verify_page(&again, rel_block, self.start_lsn)
                } else {
                    check
                };
                if check2.is_ok() {
                    self.buf[range].copy_from_slice(&again);
                    continue;
                }
                let reason = match check2 {
                    PageCheck::Mismatch { stored, computed } => {
                        format!("checksum 0x{stored:04x} stored, 0x{computed:04x} computed")
                    }
                    PageCheck::NewNotZero => {
                        "page header says new but the page is not all zeros".into()
                    }
                    other => format!("{other:?}"),
                };
                self.counter.note(&format!(
                    "WARNING: page verification failed in {} block {}: {reason}",
                    self.path, block
                ));
                self.failures.push(PageFailure {
                    path: self.path.to_string(),
                    block,
                    rel_block,
                    reason,
                });
            }
        }
        Ok(())
    }
}

impl Read for PageReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.len {
            if let Err(e) = self.fill() {
                let copy = std::io::Error::new(e.kind(), e.to_string());
                self.error = Some(e);
                return Err(copy);
            }
            if self.len == 0 {
                return Ok(0);
            }
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.counter.advance(n as u64, 0);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: u64, mtime: i64, nsec: u32) -> FileEntry {
        FileEntry {
            path: "base/1/1".into(),
            kind: EntryKind::File,
            size,
            mode: 0o600,
            mtime,
            mtime_nsec: nsec,
            target: None,
            stream: Some(StreamRef::default()),
        }
    }

    #[test]
    fn unchanged_needs_size_mtime_and_the_safety_margin() {
        let start = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let old = 1_000_000 - 60;
        assert!(unchanged_since(&entry(8192, old, 5), start, 8192, old, 5));
        assert!(
            !unchanged_since(&entry(8192, old, 5), start, 16384, old, 5),
            "size"
        );
        assert!(
            !unchanged_since(&entry(8192, old, 5), start, 8192, old, 6),
            "nanoseconds"
        );
        assert!(
            !unchanged_since(&entry(8192, old, 5), start, 8192, old + 1, 5),
            "seconds"
        );
        // Modified in the same second as the previous backup's start, or within the margin:
        // must be read again even though size and mtime match.
        for t in [1_000_000, 999_999, 1_000_000 - 5] {
            assert!(
                !unchanged_since(&entry(8192, t, 0), start, 8192, t, 0),
                "mtime {t}"
            );
        }
        assert!(unchanged_since(
            &entry(8192, 1_000_000 - 6, 0),
            start,
            8192,
            1_000_000 - 6,
            0
        ));
        let mut no_stream = entry(8192, old, 0);
        no_stream.stream = None;
        assert!(!unchanged_since(&no_stream, start, 8192, old, 0));
    }

    #[test]
    fn pgkeep_archiving_is_recognised_by_its_words() {
        assert!(pgkeep_archives("pgkeep archive-push %p"));
        assert!(pgkeep_archives(
            "/usr/local/bin/pgkeep --repo /r --cluster main archive-push \"%p\""
        ));
        assert!(pgkeep_archives("test ! -f x && pgkeep archive-push %p"));
        assert!(!pgkeep_archives(
            "pgbackrest --config=/tmp/pgkeep-bench/pgbackrest.conf --stanza=x archive-push %p"
        ));
        assert!(!pgkeep_archives("cp %p /archive/pgkeep/%f"));
    }

    #[test]
    fn times_split_into_seconds_and_nanoseconds() {
        assert_eq!(split_time(UNIX_EPOCH + Duration::new(5, 7)), (5, 7));
        assert_eq!(
            split_time(UNIX_EPOCH - Duration::new(1, 500)),
            (-2, 999_999_500)
        );
    }
}
