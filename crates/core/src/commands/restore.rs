//! `pgkeep restore <ID|latest> --target-dir DIR [--delta] [--force] [--tablespace-map OLD=NEW]`.
//!
//! Order of work, chosen so that an interrupted restore can never be started by mistake:
//! 1. every check (manifest, target, tablespace locations, the recovery target, free space:
//!    the plan of [`crate::commands::restore_plan`], all `--dry-run` does) before anything is
//!    written;
//! 2. the marker `pgkeep.restore-incomplete` is written first, and any `backup_label`,
//!    `tablespace_map` and `global/pg_control` already in the target are removed: without
//!    pg_control PostgreSQL refuses to start the directory;
//! 3. directories, tablespace symlinks, then files in parallel (`--delta`: only the chunks
//!    whose content differs are rewritten, entries absent from the backup are deleted);
//! 4. the WAL stored with the backup into `pg_wal`;
//! 5. last: `global/pg_control`, `tablespace_map`, `backup_label`, a file system sync, and
//!    only then the marker's removal.
//!
//! Ownership is the caller's business: files are created by the running user (the CLI or a
//! test chowns the directory to the server's user afterwards).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, StreamExt};
use pgkeep_repo::{BlobRef, LockKind, Repository, StreamRef};
use serde::{Deserialize, Serialize};

use crate::commands::restore_plan::{self, RestorePlan};
use crate::context::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{self, BackupManifest, EntryKind, FileEntry};
use crate::progress::{human_bytes, Phase, Progress};

/// Name of the marker file of a restore in progress (in the target directory).
pub const INCOMPLETE_MARKER: &str = "pgkeep.restore-incomplete";

/// Written last, in this order, so their presence means "the restore completed".
const PG_CONTROL: &str = "global/pg_control";

/// A tablespace relocation: the tablespace that was at `old` is restored to `new`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceMapping {
    /// Location at backup time.
    pub old: String,
    /// Location to restore to (absolute).
    pub new: String,
}

impl std::str::FromStr for TablespaceMapping {
    type Err = Error;

    /// Parses `OLD=NEW` (both absolute paths).
    fn from_str(s: &str) -> Result<Self> {
        let (old, new) = s.split_once('=').ok_or_else(|| {
            Error::usage_hint(
                format!("--tablespace-map {s:?}: expected OLD=NEW"),
                "e.g. --tablespace-map /srv/ts1=/restore/ts1",
            )
        })?;
        for p in [old, new] {
            if !p.starts_with('/') {
                return Err(Error::usage(format!(
                    "--tablespace-map {s:?}: {p:?} is not an absolute path"
                )));
            }
        }
        Ok(TablespaceMapping {
            old: old.trim_end_matches('/').to_string(),
            new: new.trim_end_matches('/').to_string(),
        })
    }
}

/// Options of `restore`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestoreOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// Backup id, or `latest` (the newest physical backup).
    pub id: String,
    /// Directory to restore into; created (0700) when absent.
    pub target_dir: PathBuf,
    /// Restore over an existing directory, rewriting only what differs and deleting what the
    /// backup does not have.
    pub delta: bool,
    /// Empty the target directory (and tablespace locations) first.
    pub force: bool,
    /// Tablespace relocations.
    pub tablespace_map: Vec<TablespaceMapping>,
    /// Files restored (or compared) at once; 0 = one per core, at least 4.
    pub threads: usize,
    /// Recovery (target, action, timeline, standby, restore_command). The CLI always sets
    /// it: with [`RecoveryTarget::End`](pgkeep_pg::recovery::RecoveryTarget::End), the
    /// restored cluster recovers to the end of the archive (or is restored as it ended when
    /// nothing is archived after the backup). `None` restores the backup as it is, without
    /// recovery settings and without looking at the archive.
    #[serde(default)]
    pub recovery: Option<crate::commands::pitr::PitrOptions>,
    /// Make the plan (see [`crate::commands::restore_plan`]) and write nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Where completed restores record their speed, for the duration estimate; `None`
    /// records nothing (and the plan has no estimate).
    #[serde(default)]
    pub speed_log: Option<PathBuf>,
}

/// What `restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The cluster.
    pub cluster: String,
    /// The backup restored.
    pub id: String,
    /// Where.
    pub target_dir: String,
    /// `fresh`, `delta` or `force`.
    pub mode: String,
    /// Files written (wholly or partly).
    pub files_written: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Files found identical (delta).
    pub files_unchanged: u64,
    /// Bytes found identical (delta).
    pub bytes_unchanged: u64,
    /// Entries deleted because the backup does not have them (delta).
    pub entries_removed: u64,
    /// WAL files written to pg_wal.
    pub wal_files: u64,
    /// Tablespaces as restored: oid and location.
    pub tablespaces: Vec<manifest::TablespaceEntry>,
    /// The backup's stop LSN (the restored cluster is consistent from there).
    pub stop_lsn: String,
    /// Seconds.
    pub duration_secs: f64,
    /// `--dry-run`: nothing was written; the plan is the report.
    pub dry_run: bool,
    /// The plan, made before anything was written.
    pub plan: RestorePlan,
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dry_run {
            writeln!(
                f,
                "plan for restoring backup {} of cluster {} into {} ({}); nothing written (dry run)",
                self.id, self.cluster, self.target_dir, self.mode
            )?;
            return write!(f, "{}", self.plan);
        }
        writeln!(
            f,
            "restored backup {} of cluster {} into {} ({}) in {:.1} s",
            self.id, self.cluster, self.target_dir, self.mode, self.duration_secs
        )?;
        writeln!(
            f,
            "{} files written ({}), {} unchanged ({}), {} removed, {} WAL files",
            self.files_written,
            human_bytes(self.bytes_written),
            self.files_unchanged,
            human_bytes(self.bytes_unchanged),
            self.entries_removed,
            self.wal_files
        )?;
        for t in &self.tablespaces {
            writeln!(f, "tablespace {} at {}", t.oid, t.location)?;
        }
        writeln!(f, "recovery: {}", self.plan.recovery.stops)?;
        for w in &self.plan.warnings {
            writeln!(f, "WARNING: {w}")?;
        }
        for n in &self.plan.notes {
            writeln!(f, "note: {n}")?;
        }
        writeln!(
            f,
            "start PostgreSQL on it (owned by its server user); it is consistent once WAL up to {} is replayed",
            self.stop_lsn
        )
    }
}

impl Report for RestoreReport {
    /// A dry run of a restore that would not fit: exit 1 after the plan.
    fn failure(&self) -> Option<Error> {
        if self.dry_run {
            self.plan.space_refusal()
        } else {
            None
        }
    }

    /// A gap in the archive (unless `--force`).
    fn has_warnings(&self) -> bool {
        !self.plan.warnings.is_empty()
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

/// Restores a physical backup into `opts.target_dir`; see the module documentation.
/// Refuses (exit 2, before writing anything) a non-empty target without `--delta`/`--force`,
/// and always a directory holding `postmaster.pid`.
pub async fn restore(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    // A shared lock: removal of data (expire, prune) needs the exclusive one, so nothing this
    // restore reads disappears under it.
    let lock = repo.lock(LockKind::Shared, None, "restore").await?;
    let mut marked = None;
    let result = run(repo, opts, progress, &mut marked).await;
    if let Err(e) = lock.release().await {
        tracing::warn!("could not release the repository lock: {e}");
    }
    match (result, marked) {
        (Err(e), Some(target)) if target.join(INCOMPLETE_MARKER).exists() => {
            Err(left_incomplete(e, &target))
        }
        (result, _) => result,
    }
}

/// A failure after the target was marked incomplete: the message says so and what to do
/// (e.g. a full file system or a store that stopped answering: remove the cause, then
/// `--delta` keeps what was written).
fn left_incomplete(e: Error, target: &Path) -> Error {
    Error::with_hint(
        e.kind(),
        e.to_string(),
        format!(
            "{} is left marked incomplete ({INCOMPLETE_MARKER}): do not start PostgreSQL on it. \
             Remove the cause named above (free space on a full file system, wait for an \
             unreachable store), then run the restore again with --delta",
            target.display()
        ),
    )
}

/// `marked`: set to the target once its incomplete marker is written.
async fn run(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    marked: &mut Option<PathBuf>,
) -> Result<RestoreReport> {
    let started = Instant::now();
    if opts.delta && opts.force {
        return Err(Error::usage("--delta and --force exclude each other"));
    }
    // The backup (a recovery target picks `latest` among those that end before it); the
    // target is checked, with everything else, in the plan below, before anything is written.
    let (m, why) = restore_plan::select(repo, opts).await?;
    let target = absolute(&opts.target_dir)?;

    // Tablespace locations after relocation.
    let mut ts_locations: BTreeMap<u32, PathBuf> = BTreeMap::new();
    for map in &opts.tablespace_map {
        if !m
            .tablespaces
            .iter()
            .any(|t| t.location.trim_end_matches('/') == map.old)
        {
            let known: Vec<&str> = m.tablespaces.iter().map(|t| t.location.as_str()).collect();
            return Err(Error::usage_hint(
                format!(
                    "--tablespace-map: backup {} has no tablespace at {}",
                    m.id, map.old
                ),
                format!(
                    "its tablespaces are at: {}",
                    if known.is_empty() {
                        "(none)".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }
    for t in &m.tablespaces {
        let old = t.location.trim_end_matches('/');
        let loc = opts
            .tablespace_map
            .iter()
            .find(|map| map.old == old)
            .map(|map| PathBuf::from(&map.new))
            .unwrap_or_else(|| PathBuf::from(&t.location));
        if loc.starts_with(&target) {
            return Err(Error::usage_hint(
                format!(
                    "tablespace {} would be restored to {}, inside the target directory",
                    t.oid,
                    loc.display()
                ),
                "relocate it with --tablespace-map OLD=NEW outside the data directory",
            ));
        }
        ts_locations.insert(t.oid, loc);
    }

    // Checks before any write.
    check_target(&target, "target directory", opts, true)?;
    for loc in ts_locations.values() {
        check_target(loc, "tablespace location", opts, false)?;
    }
    let mode = if opts.delta {
        "delta"
    } else if opts.force {
        "force"
    } else {
        "fresh"
    };
    let plan = restore_plan::build(
        repo,
        opts,
        restore_plan::PlanInput {
            m: &m,
            why,
            target: &target,
            ts: &ts_locations,
            mode,
        },
    )
    .await?;
    let mut report = RestoreReport {
        cluster: m.cluster.clone(),
        id: m.id.clone(),
        target_dir: target.display().to_string(),
        mode: mode.into(),
        files_written: 0,
        bytes_written: 0,
        files_unchanged: 0,
        bytes_unchanged: 0,
        entries_removed: 0,
        wal_files: 0,
        tablespaces: ts_locations
            .iter()
            .map(|(oid, loc)| manifest::TablespaceEntry {
                oid: *oid,
                location: loc.display().to_string(),
            })
            .collect(),
        stop_lsn: m.stop_lsn.clone(),
        duration_secs: 0.0,
        dry_run: opts.dry_run,
        plan,
    };
    if opts.dry_run {
        report.duration_secs = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    if let Some(e) = report.plan.space_refusal() {
        return Err(e);
    }
    for line in report.plan.headline() {
        progress.note(&line);
    }

    // From here on, the target is ours.
    create_private_dir(&target)?;
    let marker = target.join(INCOMPLETE_MARKER);
    *marked = Some(target.clone());
    write_file_synced(
        &marker,
        format!(
            "pgkeep restore of backup {} (cluster {}) started at {} has not completed.\n\
             Do not start PostgreSQL on this directory; run the restore again with --delta or --force.\n",
            m.id,
            m.cluster,
            chrono::Utc::now().to_rfc3339()
        )
        .as_bytes(),
        0o600,
    )?;
    for name in ["backup_label", "tablespace_map", PG_CONTROL] {
        remove_if_exists(&target.join(name))?;
    }
    if opts.force {
        empty_dir(&target, &[INCOMPLETE_MARKER])?;
        for loc in ts_locations.values() {
            if loc.exists() {
                empty_dir(loc, &[])?;
            }
        }
    }

    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(4)
    } else {
        opts.threads
    };

    let m = Arc::new(m);
    let ts_locations = Arc::new(ts_locations);

    // Delta: what is there already, and what of it differs.
    let mut plan: Vec<WriteJob> = Vec::new();
    let mut unchanged: Vec<usize> = Vec::new();
    if opts.delta {
        let (local, removed) = {
            let (t, m2, ts) = (target.clone(), m.clone(), ts_locations.clone());
            tokio::task::spawn_blocking(move || delta_prepare(&t, &m2, &ts))
                .await
                .map_err(|e| Error::new(ErrorKind::Failure, format!("delta task failed: {e}")))??
        };
        report.entries_removed = removed;
        prepare_tree(&target, &m, &ts_locations)?;
        plan = delta_compare(&target, &m, local, repo, threads, progress).await?;
        let planned: BTreeSet<usize> = plan.iter().map(|j| j.index).collect();
        for (i, f) in m.files.iter().enumerate() {
            if f.kind == EntryKind::File && !planned.contains(&i) {
                report.files_unchanged += 1;
                report.bytes_unchanged += f.size;
                unchanged.push(i);
            }
        }
    } else {
        prepare_tree(&target, &m, &ts_locations)?;
        for (i, f) in m.files.iter().enumerate() {
            if f.kind == EntryKind::File {
                plan.push(WriteJob {
                    index: i,
                    path: f.path.clone(),
                    ranges: None,
                });
            }
        }
    }

    // Files, pg_control held back.
    let (last, plan): (Vec<WriteJob>, Vec<WriteJob>) =
        plan.into_iter().partition(|j| j.path == PG_CONTROL);
    let total_bytes: u64 = plan.iter().map(|j| j.bytes(&m)).sum();
    progress.begin(Phase::Restore, total_bytes, plan.len() as u64);
    let counted = Arc::new(AtomicU64::new(0));
    {
        let work = write_work(repo, &m, &plan);
        let mut results = stream::iter(work)
            .map(|w| {
                let (target, m, counted) = (&target, &m, counted.clone());
                async move {
                    match w {
                        WriteWork::One(job) => {
                            Ok((write_job(repo, target, m, job, counted).await?, 1))
                        }
                        WriteWork::Batch(jobs) => {
                            write_batch(repo, target, m, &jobs, counted).await
                        }
                    }
                }
            })
            .buffer_unordered(files_in_flight(threads));
        let mut shown = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                r = results.next() => match r {
                    Some(r) => {
                        let (bytes, files): (u64, u64) = r?;
                        report.bytes_written += bytes;
                        report.files_written += files;
                        progress.advance(0, files);
                    }
                    None => break,
                },
                _ = tick.tick() => {}
            }
            let now = counted.load(Ordering::Relaxed);
            progress.advance(now - shown, 0);
            shown = now;
        }
    }
    progress.end();
    // Unchanged files in delta mode keep their content; bring modes and times in line.
    for &i in &unchanged {
        let f = &m.files[i];
        set_mode_and_mtime(&target.join(&f.path), f)?;
    }

    // WAL into pg_wal.
    let wal_dir = target.join("pg_wal");
    create_private_dir(&wal_dir)?;
    create_private_dir(&wal_dir.join("archive_status"))?;
    let mut wal_writes = stream::iter(m.wal.iter())
        .map(|w| {
            let p = wal_dir.join(&w.name);
            async move {
                let sink = Arc::new(FileSink::create(
                    &p,
                    0o600,
                    w.stream.size,
                    Arc::new(AtomicU64::new(0)),
                )?);
                repo.read_stream_at(&w.stream, 0, sink.clone())
                    .await
                    .map_err(|e| with_file(e, &format!("pg_wal/{}", w.name)))?;
                // The backup stores only the used part of its last segment: zero-fill it.
                if w.size > w.stream.size {
                    sink.file
                        .set_len(w.size)
                        .map_err(|e| io_err("extending", &p, e))?;
                }
                sink.start_writeback();
                Ok::<(), Error>(())
            }
        })
        .buffer_unordered(files_in_flight(threads));
    while let Some(r) = wal_writes.next().await {
        r?;
        report.wal_files += 1;
    }
    drop(wal_writes);

    // Directory modes (after their contents were written) and times.
    for f in m.files.iter().filter(|f| f.kind == EntryKind::Dir) {
        let p = target.join(&f.path);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode & 0o7777))
            .map_err(|e| io_err("setting the mode of", &p, e))?;
    }

    // The completing files, then the sync, then the marker's removal.
    for job in &last {
        report.bytes_written +=
            write_job(repo, &target, &m, job, Arc::new(AtomicU64::new(0))).await?;
        report.files_written += 1;
    }
    // The stored map names the locations at backup time; write the relocated ones.
    if m.tablespace_map.is_some() {
        let mut text = String::new();
        for (oid, loc) in ts_locations.iter() {
            text.push_str(&format!(
                "{oid} {}\n",
                escape_map_path(&loc.display().to_string())
            ));
        }
        write_file_synced(&target.join("tablespace_map"), text.as_bytes(), 0o600)?;
    }
    write_file_synced(
        &target.join("backup_label"),
        m.backup_label.as_bytes(),
        0o600,
    )?;
    // Recovery settings last of all: an interrupted restore never carries a target.
    if let Some(p) = &report.plan.settings {
        crate::commands::pitr::write_recovery(&target, p)?;
    }
    sync_fs(&target)?;
    for loc in ts_locations.values() {
        sync_fs(loc)?;
    }
    std::fs::remove_file(&marker).map_err(|e| io_err("removing", &marker, e))?;
    sync_dir(&target)?;

    report.duration_secs = started.elapsed().as_secs_f64();
    if let Some(log) = &opts.speed_log {
        restore_plan::record_speed(
            log,
            &repo.config().id,
            report.bytes_written,
            report.duration_secs,
            mode,
        );
    }
    Ok(report)
}

/// `tablespace_map` escapes newlines, carriage returns and backslashes with a backslash.
fn escape_map_path(p: &str) -> String {
    let mut s = String::with_capacity(p.len());
    for c in p.chars() {
        if matches!(c, '\n' | '\r' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        let cwd =
            std::env::current_dir().map_err(|e| Error::io("reading the current directory", e))?;
        Ok(cwd.join(p))
    }
}

/// Refuses a target that PostgreSQL runs on, a non-empty one without --delta/--force, and one
/// this user cannot write.
fn check_target(dir: &Path, what: &str, opts: &RestoreOptions, is_data_dir: bool) -> Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("reading", dir, e)),
    };
    if !meta.is_dir() {
        return Err(Error::usage(format!(
            "{what} {} exists and is not a directory",
            dir.display()
        )));
    }
    if is_data_dir && dir.join("postmaster.pid").exists() {
        return Err(Error::usage_hint(
            format!("{what} {} holds postmaster.pid: a PostgreSQL server may be running on it", dir.display()),
            "stop that server first; if none runs, remove postmaster.pid and use --delta or --force",
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 && meta.uid() != euid {
        return Err(Error::usage_hint(
            format!(
                "{what} {} is owned by uid {}, not by this user (uid {euid})",
                dir.display(),
                meta.uid()
            ),
            "run the restore as the user that owns it (the PostgreSQL server user), or chown it to this user",
        ));
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::usage(format!("{what} {} has a NUL byte", dir.display())))?;
    // SAFETY: access(2) with a valid C string.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK | libc::X_OK) } != 0 {
        return Err(Error::usage_hint(
            format!(
                "{what} {} is not readable, writable and searchable by this user",
                dir.display()
            ),
            format!("give its owner full access (chmod u+rwx {})", dir.display()),
        ));
    }
    let non_empty = std::fs::read_dir(dir)
        .map_err(|e| io_err("reading", dir, e))?
        .next()
        .is_some();
    if non_empty && !opts.delta && !opts.force {
        let incomplete = dir.join(INCOMPLETE_MARKER).exists();
        return Err(Error::usage_hint(
            format!(
                "{what} {} is not empty{}",
                dir.display(),
                if incomplete { " (it holds an incomplete restore)" } else { "" }
            ),
            "use --delta to restore over it (rewrites only what differs, deletes what the backup does not have), or --force to empty it first",
        ));
    }
    Ok(())
}

/// Creates `dir` (and missing parents) and makes `dir` itself 0700.
fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io_err("setting the mode of", dir, e))
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", p, e)),
    }
}

/// Removes everything inside `dir` except the names in `keep`; symlinks are removed, never
/// followed.
fn empty_dir(dir: &Path, keep: &[&str]) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| io_err("reading", dir, e))? {
        let e = e.map_err(|e| io_err("reading", dir, e))?;
        if keep.iter().any(|k| e.file_name() == *k) {
            continue;
        }
        let p = e.path();
        let ft = e.file_type().map_err(|e| io_err("reading", &p, e))?;
        if ft.is_dir() {
            std::fs::remove_dir_all(&p).map_err(|e| io_err("removing", &p, e))?;
        } else {
            std::fs::remove_file(&p).map_err(|e| io_err("removing", &p, e))?;
        }
    }
    Ok(())
}

fn create_truncated(p: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(p)
        .map_err(|e| io_err("creating", p, e))
}

fn write_file_synced(p: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = create_truncated(p, mode)?;
    f.write_all(data).map_err(|e| io_err("writing", p, e))?;
    f.sync_all().map_err(|e| io_err("syncing", p, e))
}

fn sync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("syncing", p, e))
}

/// One `syncfs(2)` for the file system holding `p`: cheaper than a sync per file.
fn sync_fs(p: &Path) -> Result<()> {
    let f = File::open(p).map_err(|e| io_err("opening", p, e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs on an open descriptor.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io_err(
            "syncing the file system of",
            p,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn mtime_of(f: &FileEntry) -> SystemTime {
    if f.mtime >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(f.mtime as u64, f.mtime_nsec)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

fn set_mode_and_mtime(p: &Path, f: &FileEntry) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(p)
        .map_err(|e| io_err("opening", p, e))?;
    file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
        .map_err(|e| io_err("setting the mode of", p, e))?;
    file.set_modified(mtime_of(f))
        .map_err(|e| io_err("setting the time of", p, e))
}

/// Directories and symlinks of the backup (parents first: the manifest is sorted by path),
/// tablespace links pointing to their (relocated) locations.
fn prepare_tree(target: &Path, m: &BackupManifest, ts: &BTreeMap<u32, PathBuf>) -> Result<()> {
    for loc in ts.values() {
        create_private_dir(loc)?;
    }
    for f in &m.files {
        let p = target.join(&f.path);
        match f.kind {
            EntryKind::Dir => match std::fs::symlink_metadata(&p) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    std::fs::remove_file(&p).map_err(|e| io_err("removing", &p, e))?;
                    std::fs::create_dir(&p).map_err(|e| io_err("creating", &p, e))?;
                }
                Err(_) => std::fs::create_dir(&p).map_err(|e| io_err("creating", &p, e))?,
            },
            EntryKind::Symlink => {
                let want = tablespace_oid(&f.path)
                    .and_then(|oid| ts.get(&oid).cloned())
                    .or_else(|| f.target.as_ref().map(PathBuf::from))
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::Integrity,
                            format!("symlink {} has no target in the manifest", f.path),
                        )
                    })?;
                match std::fs::symlink_metadata(&p) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        if std::fs::read_link(&p).ok().as_deref() == Some(want.as_path()) {
                            continue;
                        }
                        std::fs::remove_file(&p).map_err(|e| io_err("removing", &p, e))?;
                    }
                    Ok(meta) if meta.is_dir() => {
                        std::fs::remove_dir_all(&p).map_err(|e| io_err("removing", &p, e))?
                    }
                    Ok(_) => std::fs::remove_file(&p).map_err(|e| io_err("removing", &p, e))?,
                    Err(_) => {}
                }
                std::os::unix::fs::symlink(&want, &p)
                    .map_err(|e| io_err("creating symlink", &p, e))?;
            }
            EntryKind::File => {
                // A directory where the backup has a file goes (delta over a different tree).
                if let Ok(meta) = std::fs::symlink_metadata(&p) {
                    if meta.is_dir() {
                        std::fs::remove_dir_all(&p).map_err(|e| io_err("removing", &p, e))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `pg_tblspc/<oid>` → oid.
fn tablespace_oid(path: &str) -> Option<u32> {
    let rest = path.strip_prefix("pg_tblspc/")?;
    if rest.contains('/') {
        return None;
    }
    rest.parse().ok()
}

/// A file to write: all of it, or only some byte ranges (delta).
struct WriteJob {
    index: usize,
    path: String,
    /// `None`: write the whole stream (truncating). `Some`: runs of blobs `[from, to)` to write
    /// in place, then set the length.
    ranges: Option<Vec<(usize, usize)>>,
}

impl WriteJob {
    fn bytes(&self, m: &BackupManifest) -> u64 {
        let f = &m.files[self.index];
        match (&self.ranges, &f.stream) {
            (None, _) => f.size,
            (Some(r), Some(s)) => r
                .iter()
                .map(|(a, b)| s.blobs[*a..*b].iter().map(|x| x.len as u64).sum::<u64>())
                .sum(),
            (Some(_), None) => 0,
        }
    }
}

/// Files written at once: more than cores, since small files spend their time waiting on
/// storage round trips rather than CPU (memory stays bounded by the repository's limit on
/// range reads in flight).
fn files_in_flight(threads: usize) -> usize {
    (threads * 2).max(4)
}

/// A restored file, written by position from the threads that decode its blobs.
///
/// Whole pages go through a second descriptor opened with `O_DIRECT`: a restore writes each
/// byte once and PostgreSQL reads few of them soon, so copying them into the page cache only
/// cost CPU (a third of a restore's), serialised writers on the inode lock, and left every
/// page to be flushed at the end. The partial pages at either end of a range go through the
/// page cache (they are never written directly, so the two paths never share a page). Where
/// the file system refuses direct I/O, everything goes through the page cache.
struct FileSink {
    file: File,
    direct: Option<File>,
    /// Set when a direct write was refused: the rest goes through the page cache.
    direct_refused: std::sync::atomic::AtomicBool,
    path: PathBuf,
    /// Bytes written, summed over every sink of a phase, for progress display.
    counted: Arc<AtomicU64>,
}

/// Writes smaller than this go through the page cache: direct I/O waits for the device.
const DIRECT_MIN: usize = 256 << 10;

/// Gives a new file its final size with its blocks allocated before the out-of-order writes
/// start. A direct write past the end of a file (or into a hole) takes the inode's lock
/// exclusively, waits for the device and, on ext4, puts the inode on the orphan list through
/// the journal, so parallel direct writes into a growing file ran one at a time and a restore
/// sat idle for a quarter of a second at a time; into allocated blocks they run in parallel.
/// Best effort: where the file system cannot preallocate, the writes extend the file as
/// before (and report a full disk themselves).
fn preallocate(file: &File, size: u64) {
    use std::os::fd::AsRawFd;
    if size < DIRECT_MIN as u64 {
        return;
    }
    // SAFETY: fallocate on an open descriptor; a failure leaves the file as it was or with
    // some blocks allocated, both of which the writes that follow handle.
    unsafe {
        libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t);
    }
}

impl FileSink {
    /// A new file of `size` bytes (zeros until written).
    fn create(p: &Path, mode: u32, size: u64, counted: Arc<AtomicU64>) -> Result<FileSink> {
        let file = create_truncated(p, mode)?;
        preallocate(&file, size);
        // A file smaller than one direct write never uses the second descriptor: do not
        // open it (batches of small files would hold two descriptors each).
        Ok(Self::with(file, p, counted, size >= DIRECT_MIN as u64))
    }

    fn open(p: &Path, counted: Arc<AtomicU64>) -> Result<FileSink> {
        let file = OpenOptions::new()
            .write(true)
            .open(p)
            .map_err(|e| io_err("opening", p, e))?;
        Ok(Self::with(file, p, counted, true))
    }

    fn with(file: File, p: &Path, counted: Arc<AtomicU64>, direct: bool) -> FileSink {
        let direct = direct
            .then(|| {
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(p)
                    .ok()
            })
            .flatten();
        FileSink {
            file,
            direct,
            direct_refused: std::sync::atomic::AtomicBool::new(false),
            path: p.to_path_buf(),
            counted,
        }
    }

    /// Starts writing the file's dirty pages back now, without waiting: the final sync of
    /// the restore then finds little left to flush, instead of flushing everything at the
    /// end after all the CPU work is done.
    fn start_writeback(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range on an open descriptor; a failure only loses the hint.
        unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    /// Writes the whole pages of `data` (at `offset`) directly when it can; returns the part
    /// of `data` (head and tail) left to write through the page cache.
    fn write_direct<'a>(&self, offset: u64, data: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        const ALIGN: usize = pgkeep_repo::storage::DIRECT_IO_ALIGN;
        let direct = match &self.direct {
            Some(d) if data.len() >= DIRECT_MIN && !self.direct_refused.load(Ordering::Relaxed) => {
                d
            }
            _ => return (data, &[]),
        };
        let head = (ALIGN - (offset as usize % ALIGN)) % ALIGN;
        let body = (data.len() - head) / ALIGN * ALIGN;
        let middle = &data[head..head + body];
        if middle.is_empty() || !(middle.as_ptr() as usize).is_multiple_of(ALIGN) {
            return (data, &[]);
        }
        match direct.write_all_at(middle, offset + head as u64) {
            Ok(()) => (&data[..head], &data[head + body..]),
            Err(_) => {
                // EINVAL from a file system without direct I/O, or anything else: the page
                // cache path writes it all and reports a real error itself.
                self.direct_refused.store(true, Ordering::Relaxed);
                (data, &[])
            }
        }
    }
}

impl pgkeep_repo::PositionalSink for FileSink {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let named = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))
        };
        let (head, tail) = self.write_direct(offset, data);
        if !head.is_empty() {
            self.file.write_all_at(head, offset).map_err(named)?;
        }
        if !tail.is_empty() {
            let at = offset + (data.len() - tail.len()) as u64;
            self.file.write_all_at(tail, at).map_err(named)?;
        }
        self.counted.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

async fn write_job(
    repo: &Repository,
    target: &Path,
    m: &BackupManifest,
    job: &WriteJob,
    counted: Arc<AtomicU64>,
) -> Result<u64> {
    let f = &m.files[job.index];
    let p = target.join(&f.path);
    let empty = StreamRef::default();
    let stream = f.stream.as_ref().unwrap_or(&empty);
    let mut written = 0u64;
    let sink = match &job.ranges {
        None => {
            let sink = Arc::new(FileSink::create(&p, 0o600, stream.size, counted)?);
            written += repo
                .read_stream_at(stream, 0, sink.clone())
                .await
                .map_err(|e| with_file(e, &f.path))?;
            sink
        }
        Some(ranges) => {
            let sink = Arc::new(FileSink::open(&p, counted)?);
            let offsets = blob_offsets(&stream.blobs);
            for &(a, b) in ranges {
                let sub = StreamRef {
                    size: stream.blobs[a..b].iter().map(|x| x.len as u64).sum(),
                    blobs: stream.blobs[a..b].to_vec(),
                };
                written += repo
                    .read_stream_at(&sub, offsets[a], sink.clone())
                    .await
                    .map_err(|e| with_file(e, &f.path))?;
            }
            sink.file
                .set_len(stream.size)
                .map_err(|e| io_err("truncating", &p, e))?;
            sink
        }
    };
    finish_file(&sink, f, &p)?;
    Ok(written)
}

/// A written file: its write-back started, its mode and time set.
fn finish_file(sink: &FileSink, f: &FileEntry, p: &Path) -> Result<()> {
    sink.start_writeback();
    let file = &sink.file;
    file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o7777))
        .map_err(|e| io_err("setting the mode of", p, e))?;
    file.set_modified(mtime_of(f))
        .map_err(|e| io_err("setting the time of", p, e))?;
    Ok(())
}

/// Files up to this size are restored in batches whose range reads are planned together
/// ([`Repository::read_streams_at`]): hundreds of small files then cost a few requests
/// instead of one or more each.
const SMALL_FILE: u64 = 1 << 20;
/// Files per batch (each holds a descriptor while its batch runs).
const BATCH_FILES: usize = 64;

/// What one restore task writes: a file on its own, or a batch of small ones.
enum WriteWork<'a> {
    One(&'a WriteJob),
    Batch(Vec<&'a WriteJob>),
}

/// Splits the jobs into work: the larger files alone, largest first (so that a big relation
/// file does not start last and run alone), then the small whole files in batches of
/// neighbours in the packs.
fn write_work<'a>(
    repo: &Repository,
    m: &BackupManifest,
    plan: &'a [WriteJob],
) -> Vec<WriteWork<'a>> {
    let (small, mut large): (Vec<&WriteJob>, Vec<&WriteJob>) = plan
        .iter()
        .partition(|j| j.ranges.is_none() && j.bytes(m) <= SMALL_FILE);
    large.sort_by_key(|j| std::cmp::Reverse(j.bytes(m)));
    let empty = StreamRef::default();
    let streams: Vec<&StreamRef> = small
        .iter()
        .map(|j| m.files[j.index].stream.as_ref().unwrap_or(&empty))
        .collect();
    let ordered: Vec<&WriteJob> = repo
        .order_by_location(&streams)
        .into_iter()
        .map(|i| small[i])
        .collect();
    let mut work: Vec<WriteWork> = large.into_iter().map(WriteWork::One).collect();
    work.extend(
        ordered
            .chunks(BATCH_FILES)
            .map(|c| WriteWork::Batch(c.to_vec())),
    );
    work
}

/// Restores a batch of small whole files with shared range reads. Returns the bytes and the
/// files written.
async fn write_batch(
    repo: &Repository,
    target: &Path,
    m: &BackupManifest,
    jobs: &[&WriteJob],
    counted: Arc<AtomicU64>,
) -> Result<(u64, u64)> {
    let mut sinks = Vec::with_capacity(jobs.len());
    let mut targets = Vec::with_capacity(jobs.len());
    for job in jobs {
        let f = &m.files[job.index];
        let stream = f.stream.clone().unwrap_or_default();
        let sink = Arc::new(FileSink::create(
            &target.join(&f.path),
            0o600,
            stream.size,
            counted.clone(),
        )?);
        targets.push(pgkeep_repo::StreamTarget {
            stream,
            base: 0,
            sink: sink.clone(),
        });
        sinks.push(sink);
    }
    let written = repo
        .read_streams_at(&targets)
        .await
        .map_err(|e| with_file(e.error, &m.files[jobs[e.target].index].path))?;
    for (job, sink) in jobs.iter().zip(&sinks) {
        let f = &m.files[job.index];
        finish_file(sink, f, &target.join(&f.path))?;
    }
    Ok((written.iter().sum(), jobs.len() as u64))
}

/// A repository error while restoring a file, with the file named (which relation file a
/// damaged chunk hits matters to the user).
fn with_file(e: pgkeep_repo::RepoError, path: &str) -> Error {
    let kind: ErrorKind = match &e {
        pgkeep_repo::RepoError::Storage(s) => s.kind.into(),
        other => other.kind().into(),
    };
    Error::new(kind, format!("restoring {path}: {e}"))
}

fn blob_offsets(blobs: &[BlobRef]) -> Vec<u64> {
    let mut out = Vec::with_capacity(blobs.len() + 1);
    let mut o = 0u64;
    for b in blobs {
        out.push(o);
        o += b.len as u64;
    }
    out.push(o);
    out
}

/// What the target holds: relative path → (is regular file, size).
type Inventory = HashMap<String, (bool, u64)>;

/// Walks the target (and the tablespace locations the backup will use, under
/// `pg_tblspc/<oid>`), deletes what the backup does not have, and returns what is left.
fn delta_prepare(
    target: &Path,
    m: &BackupManifest,
    ts: &BTreeMap<u32, PathBuf>,
) -> Result<(Inventory, u64)> {
    let wanted: BTreeMap<&str, EntryKind> =
        m.files.iter().map(|f| (f.path.as_str(), f.kind)).collect();
    let mut found: Vec<(String, PathBuf, std::fs::FileType, u64)> = Vec::new();
    walk_local(target, "", &mut found)?;
    for (oid, loc) in ts {
        if loc.is_dir() {
            walk_local(loc, &format!("pg_tblspc/{oid}"), &mut found)?;
        }
    }
    let mut inventory = Inventory::new();
    let mut removed = 0u64;
    let mut dirs_to_remove: BTreeSet<PathBuf> = BTreeSet::new();
    for (rel, abs, ft, size) in found {
        if rel == INCOMPLETE_MARKER {
            continue;
        }
        let keep = match wanted.get(rel.as_str()) {
            Some(EntryKind::File) => ft.is_file(),
            Some(EntryKind::Dir) => ft.is_dir(),
            Some(EntryKind::Symlink) => ft.is_symlink(),
            None => false,
        };
        if keep || (wanted.contains_key(rel.as_str()) && ft.is_dir()) {
            // Kept, or a directory where the backup has something else: prepare_tree fixes it.
            if ft.is_file() {
                inventory.insert(rel, (true, size));
            }
            continue;
        }
        if ft.is_dir() {
            dirs_to_remove.insert(abs);
        } else {
            std::fs::remove_file(&abs).map_err(|e| io_err("removing", &abs, e))?;
            removed += 1;
        }
    }
    // Deepest first.
    for d in dirs_to_remove.iter().rev() {
        match std::fs::remove_dir_all(d) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", d, e)),
        }
    }
    Ok((inventory, removed))
}

/// Lists `dir` recursively into `out` as (relative path, absolute path, type, size). Symlinks
/// are never followed; the tablespace locations are walked separately by the caller.
fn walk_local(
    dir: &Path,
    rel: &str,
    out: &mut Vec<(String, PathBuf, std::fs::FileType, u64)>,
) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| io_err("reading", dir, e))? {
        let e = e.map_err(|e| io_err("reading", dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let r = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let p = e.path();
        let meta = std::fs::symlink_metadata(&p).map_err(|e| io_err("reading", &p, e))?;
        let ft = meta.file_type();
        out.push((r.clone(), p.clone(), ft, meta.len()));
        if ft.is_dir() {
            walk_local(&p, &r, out)?;
        }
    }
    Ok(())
}

/// Compares the files present in the target with the backup, chunk by chunk (the blob id of
/// each local chunk against the manifest's), on `threads` threads. Returns the writes needed.
async fn delta_compare(
    target: &Path,
    m: &Arc<BackupManifest>,
    local: Inventory,
    repo: &Repository,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Vec<WriteJob>> {
    let mut to_compare: Vec<usize> = Vec::new();
    let mut jobs: Vec<WriteJob> = Vec::new();
    for (i, f) in m.files.iter().enumerate() {
        if f.kind != EntryKind::File {
            continue;
        }
        match local.get(&f.path) {
            Some((true, _)) => to_compare.push(i),
            _ => jobs.push(WriteJob {
                index: i,
                path: f.path.clone(),
                ranges: None,
            }),
        }
    }
    let total: u64 = to_compare
        .iter()
        .map(|&i| local.get(&m.files[i].path).map(|x| x.1).unwrap_or(0))
        .sum();
    progress.begin(Phase::Compare, total, to_compare.len() as u64);
    // Files are compared in pieces, several at once even within one file: a cold read of one
    // file at a time ran at a third of what the device gives to four streams, and one big
    // relation file dominated the whole comparison.
    let mut pieces: Vec<ComparePiece> = Vec::new();
    for &i in &to_compare {
        let blobs = m.files[i].stream.as_ref().map_or(0, |s| s.blobs.len());
        let lens = m.files[i]
            .stream
            .as_ref()
            .map(|s| &s.blobs[..])
            .unwrap_or(&[]);
        let mut from = 0usize;
        let mut bytes = 0u64;
        for (k, b) in lens.iter().enumerate() {
            bytes += b.len as u64;
            if bytes >= COMPARE_PIECE {
                pieces.push(ComparePiece {
                    file: i,
                    from,
                    to: k + 1,
                });
                from = k + 1;
                bytes = 0;
            }
        }
        if from < blobs || blobs == 0 {
            pieces.push(ComparePiece {
                file: i,
                from,
                to: blobs,
            });
        }
    }
    // Largest files' pieces first, so the tail of the work is small pieces.
    pieces.sort_by_key(|p| std::cmp::Reverse(local.get(&m.files[p.file].path).map_or(0, |x| x.1)));
    let workers = (threads * 4).clamp(4, 16);
    let sealer = repo.sealer().clone();
    let (m2, target) = (m.clone(), target.to_path_buf());
    let local_lens: HashMap<usize, u64> = to_compare
        .iter()
        .map(|&i| (i, local.get(&m.files[i].path).map_or(0, |x| x.1)))
        .collect();
    let results: Vec<Result<(ComparePiece, Vec<bool>)>> =
        crate::progress::blocking_with_progress(progress, move |counter| {
            let next = AtomicUsize::new(0);
            let results = Mutex::new(Vec::new());
            std::thread::scope(|s| {
                for _ in 0..workers {
                    s.spawn(|| loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(piece) = pieces.get(k) else { break };
                        let f = &m2.files[piece.file];
                        let r = compare_piece(&target.join(&f.path), f, piece, &sealer, &*counter)
                            .map(|d| (*piece, d));
                        results.lock().unwrap().push(r);
                    });
                }
            });
            results.into_inner().unwrap()
        })
        .await;
    progress.end();
    let mut differs: HashMap<usize, Vec<bool>> = HashMap::new();
    for r in results {
        let (piece, d) = r?;
        let v = differs.entry(piece.file).or_insert_with(|| {
            vec![
                false;
                m.files[piece.file]
                    .stream
                    .as_ref()
                    .map_or(0, |s| s.blobs.len())
            ]
        });
        v[piece.from..piece.to].copy_from_slice(&d);
    }
    for &i in &to_compare {
        let f = &m.files[i];
        let size = f.stream.as_ref().map_or(0, |s| s.size);
        let d = differs.remove(&i).unwrap_or_default();
        if let Some(ranges) = differing_runs(&d, local_lens[&i] == size) {
            jobs.push(WriteJob {
                index: i,
                path: f.path.clone(),
                ranges: Some(ranges),
            });
        }
    }
    Ok(jobs)
}

/// Bytes of one file compared by one worker at a time.
const COMPARE_PIECE: u64 = 32 << 20;

/// Blobs `[from, to)` of file `file` of the manifest.
#[derive(Debug, Clone, Copy)]
struct ComparePiece {
    file: usize,
    from: usize,
    to: usize,
}

/// Whether each blob of `piece` differs from the local file's bytes at its place (a local
/// file too short to hold it differs).
fn compare_piece(
    p: &Path,
    f: &FileEntry,
    piece: &ComparePiece,
    sealer: &pgkeep_repo::crypto::Sealer,
    progress: &dyn Progress,
) -> Result<Vec<bool>> {
    let empty = StreamRef::default();
    let stream = f.stream.as_ref().unwrap_or(&empty);
    let file = File::open(p).map_err(|e| io_err("opening", p, e))?;
    let mut offset: u64 = stream.blobs[..piece.from]
        .iter()
        .map(|b| b.len as u64)
        .sum();
    let mut out = Vec::with_capacity(piece.to - piece.from);
    let mut buf = Vec::new();
    for b in &stream.blobs[piece.from..piece.to] {
        buf.resize(b.len as usize, 0);
        let same = match file.read_exact_at(&mut buf, offset) {
            Ok(()) => sealer.blob_id(&buf) == b.id,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
            Err(e) => return Err(io_err("reading", p, e)),
        };
        progress.advance(b.len as u64, 0);
        out.push(!same);
        offset += b.len as u64;
    }
    if piece.to == stream.blobs.len() {
        progress.advance(0, 1);
    }
    Ok(out)
}

/// `None` when no blob differs and the local file has the backup's length; otherwise the
/// runs of blobs to write (none when only the length differs: the file is then truncated).
fn differing_runs(differs: &[bool], same_len: bool) -> Option<Vec<(usize, usize)>> {
    if !differs.iter().any(|d| *d) && same_len {
        return None;
    }
    let mut runs = Vec::new();
    let mut i = 0;
    while i < differs.len() {
        if differs[i] {
            let start = i;
            while i < differs.len() && differs[i] {
                i += 1;
            }
            runs.push((start, i));
        } else {
            i += 1;
        }
    }
    Some(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges written out of order, at unaligned offsets, small and large, as the reader hands
    /// them (congruent to their offset modulo the page size), give back the exact bytes,
    /// with direct I/O and without it.
    #[test]
    fn file_sink_writes_exact_bytes_through_direct_io_and_the_page_cache() {
        use pgkeep_repo::storage::{AlignedBuf, DIRECT_IO_ALIGN};
        use pgkeep_repo::PositionalSink;
        let dir = tempfile::tempdir().unwrap();
        let total = (9 << 20) + 12345;
        let data: Vec<u8> = (0..total)
            .map(|i| (i as u32).wrapping_mul(2654435761).rotate_right(11) as u8)
            .collect();
        // Cut points: unaligned, with ranges below and above DIRECT_MIN.
        let cuts = [
            0usize,
            100,
            4096,
            5000,
            (1 << 20) + 7,
            (3 << 20) + 4096,
            (3 << 20) + 8000,
            (8 << 20) + 1,
            total,
        ];
        for refuse in [false, true] {
            let p = dir.path().join(format!("f{refuse}"));
            let sink = FileSink::create(
                &p,
                0o600,
                if refuse { 0 } else { total as u64 },
                Arc::new(AtomicU64::new(0)),
            )
            .unwrap();
            sink.direct_refused.store(refuse, Ordering::Relaxed);
            let mut ranges: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
            ranges.reverse();
            ranges.swap(1, 4);
            for (a, b) in ranges {
                let pad = a % DIRECT_IO_ALIGN;
                let mut buf = AlignedBuf::new(pad + (b - a));
                buf.as_mut_slice()[pad..].copy_from_slice(&data[a..b]);
                sink.write_at(a as u64, &buf.as_slice()[pad..]).unwrap();
            }
            assert_eq!(
                sink.counted.load(Ordering::Relaxed),
                total as u64,
                "bytes counted"
            );
            if !refuse {
                // The test's temp dir is on a file system with direct I/O (ext4 here).
                assert!(sink.direct.is_some(), "no O_DIRECT descriptor");
                assert!(
                    !sink.direct_refused.load(Ordering::Relaxed),
                    "direct I/O refused"
                );
            }
            drop(sink);
            assert!(
                std::fs::read(&p).unwrap() == data,
                "refused direct I/O: {refuse}"
            );
        }
    }

    #[test]
    fn differing_runs_group_adjacent_blobs_and_length_alone_needs_a_truncate() {
        assert_eq!(differing_runs(&[false, false], true), None);
        assert_eq!(differing_runs(&[false, false], false), Some(vec![]));
        assert_eq!(
            differing_runs(&[true, true, false, true, false, true], true),
            Some(vec![(0, 2), (3, 4), (5, 6)])
        );
        assert_eq!(differing_runs(&[], false), Some(vec![]));
    }

    #[test]
    fn tablespace_mappings_parse() {
        let m: TablespaceMapping = "/a/b/=/c".parse().unwrap();
        assert_eq!(
            m,
            TablespaceMapping {
                old: "/a/b".into(),
                new: "/c".into()
            }
        );
        assert_eq!(
            "a=/c".parse::<TablespaceMapping>().unwrap_err().exit_code(),
            2
        );
        assert_eq!(
            "/a".parse::<TablespaceMapping>().unwrap_err().exit_code(),
            2
        );
    }

    #[test]
    fn map_paths_are_escaped() {
        assert_eq!(escape_map_path("/a b/c"), "/a b/c");
        assert_eq!(escape_map_path("/a\\b\nc"), "/a\\\\b\\\nc");
    }

    #[test]
    fn tablespace_links_are_recognised() {
        assert_eq!(tablespace_oid("pg_tblspc/16400"), Some(16400));
        assert_eq!(tablespace_oid("pg_tblspc/16400/PG_15"), None);
        assert_eq!(tablespace_oid("base/1"), None);
    }
}
