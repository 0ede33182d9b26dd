//! `pgkeep backup --method basebackup`: a physical backup of a cluster whose data directory
//! this host cannot read, through the replication protocol, into the same manifest format as
//! the local method (a restore cannot tell them apart, except by `method`).
//!
//! How, and why this way:
//! 1. a SQL connection is held for the whole backup; on it, a temporary physical replication
//!    slot reserving WAL immediately. A physical slot's restart point is the last checkpoint's
//!    redo, at or before the backup's start, so from here on the server keeps every WAL
//!    segment the backup needs, whatever `wal_keep_size` or `archive_command` say;
//! 2. `pg_basebackup -Ft -X fetch -D - -c fast` writes one tar stream to stdout. `-X fetch`
//!    appends the WAL from the start to the end of the backup to that stream (under
//!    `pg_wal/`), so the backup restores on its own. (`-X stream` cannot write to stdout, and
//!    `-X none` would leave the WAL to an archive we may not own; fetch mode's documented risk,
//!    WAL removed before the end of the backup, is what the slot of step 1 rules out.) The
//!    stream ends with pg_basebackup's `backup_manifest`, whose WAL range gives the stop LSN;
//! 3. each tar entry is ingested as it passes: `backup_label` (sent first by the server) and
//!    `tablespace_map` go into the manifest, files become [`FileEntry`]s, WAL files
//!    [`WalEntry`]s (the last segment stored only up to the stop LSN, as the local method
//!    does), `backup_manifest` is read and not kept;
//! 4. the slot is checked (not lost) and dropped; packs, index, then the manifest.
//!
//! The server may be a standby: the slot is then made on the standby, `-X fetch` takes the
//! WAL from the standby's own pg_wal, and the server sends `global/pg_control` last, which a
//! standby backup needs; [`crate::commands::standby`] checks the stop point and explains the
//! wait for the archive. `standby.signal` and the other files the local method leaves out
//! are dropped from the stream.
//!
//! Clusters with tablespaces are refused: `-D -` carries a single tar stream, and
//! pg_basebackup refuses to put more than one tablespace on stdout. Page checksums are
//! verified by the server (which re-reads torn pages); its warnings become
//! [`PageFailure`]s and exit 3, like the local method. Files are always read in full (the
//! server sends them all); unchanged content still costs no storage (deduplication).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use pgkeep_pg::checksum::absolute_block;
use pgkeep_pg::datadir::RelFileName;
use pgkeep_pg::{ConnParams, ControlFile, Lsn, PgClient, WalFileName, WalSegmentName};
use pgkeep_repo::{BlobWriter, Repository, StreamRef, WriterOptions};

use crate::commands::backup::{choose_id, pg_error, BackupOptions, BackupReport};
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{
    self, BackupManifest, BackupTotals, EntryKind, FileEntry, PageFailure, WalEntry, KIND_PHYSICAL,
    MANIFEST_FORMAT,
};
use crate::progress::{Counter, Phase, Progress};

/// The name of pg_basebackup's own manifest inside the tar stream (not part of the data
/// directory we restore).
const PG_MANIFEST: &str = "backup_manifest";

/// Takes the backup; called by [`crate::commands::backup::backup`] under its lock.
pub(crate) async fn run(
    repo: &Repository,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let started = Instant::now();
    if opts.pgdata.is_some() {
        tracing::debug!("--pgdata is ignored by --method basebackup");
    }
    let params = ConnParams::resolve(opts.conninfo.as_deref()).map_err(pg_error)?;
    let client = PgClient::connect(&params).await.map_err(pg_error)?;
    let info = client.server_info().await.map_err(pg_error)?;
    info.ensure_supported(client.target()).map_err(pg_error)?;
    // pg_basebackup backs a standby up as it does a primary (the slot below is made on the
    // standby, and `-X fetch` takes the WAL from the standby's pg_wal); see
    // `super::standby` for the checks after it and the wait for the archive.
    let standby = info.in_recovery;
    let tablespaces = client
        .query_text(
            "counting tablespaces",
            "SELECT string_agg(spcname, ', ' ORDER BY spcname) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')",
        )
        .await
        .map_err(pg_error)?;
    if let Some(names) = tablespaces.filter(|t| !t.is_empty()) {
        return Err(Error::usage_hint(
            format!(
                "--method basebackup cannot back up {}: it has tablespaces ({names}), and pg_basebackup writes only a cluster without tablespaces to a single stream",
                client.target()
            ),
            "run pgkeep on the database host with --method local (the default), which backs up tablespaces",
        ));
    }

    // Identity against earlier backups of this cluster name (as the local method).
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
    let newest_id = headers
        .iter()
        .map(|(h, _)| h.id.clone())
        .filter(|i| manifest::is_backup_id(i))
        .max();
    let id = choose_id(newest_id.as_deref()).await?;
    let label = opts
        .label
        .clone()
        .unwrap_or_else(|| format!("pgkeep backup {id}"));

    // Pin the WAL before the backup's checkpoint.
    let slot = format!(
        "pgkeep_bb_{}_{:x}",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or(0) & 0xffff_ffff_ffff
    );
    client
        .inner()
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true, true)",
            &[&slot],
        )
        .await
        .map_err(|e| {
            Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "creating the temporary replication slot that pins the backup's WAL on {}: {e}",
                    client.target()
                ),
                "the user needs the REPLICATION attribute (or superuser), and max_replication_slots must leave one free",
            )
        })?;
    let estimate: u64 = client
        .query_text(
            "estimating the cluster size",
            "SELECT sum(pg_database_size(oid))::bigint::text FROM pg_database",
        )
        .await
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);

    let start_time = Utc::now();
    progress.note(&format!(
        "backup {id}: pg_basebackup from {}",
        client.target()
    ));
    let program = pg_basebackup_program(info.major_version());
    let mut cmd = Command::new(&program);
    // Settings from the caller's environment must not redirect the child elsewhere; the
    // password goes through the environment, never the arguments (process list).
    for v in [
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGPASSWORD",
        "PGOPTIONS",
        "PGHOSTADDR",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(params.libpq_env());
    if params.application_name.is_none() {
        cmd.env("PGAPPNAME", "pgkeep");
    }
    cmd.args([
        "--format=tar",
        "--wal-method=fetch",
        "--pgdata=-",
        "--checkpoint=fast",
        "--manifest-checksums=NONE",
        "--no-password",
    ])
    .arg(format!("--label={label}"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().map_err(|e| {
        Error::with_hint(
            ErrorKind::Failure,
            format!("cannot start {program}: {e}"),
            "install the PostgreSQL client tools (pg_basebackup) or put them on PATH",
        )
    })?;

    let writer = repo.writer(WriterOptions::default());
    let cfg = StreamConfig {
        relation_chunk: opts.relation_chunk_size as usize,
        seg_size: info.wal_segment_size,
    };
    progress.begin(Phase::Backup, estimate, 0);
    let w = writer.clone();
    let program2 = program.clone();
    let cancelled = Arc::new(AtomicBool::new(false));
    let _cancel = CancelOnDrop(cancelled.clone());
    let outcome = crate::progress::blocking_with_progress(progress, move |counter| {
        ingest_child(child, &program2, &w, &cfg, &counter, cancelled)
    })
    .await;
    progress.end();
    let s = match outcome {
        Ok(s) => s,
        Err(e) => {
            // Stop the writer's threads; what it stored is reused by the next run. Dropping
            // the connection drops the slot.
            let _ = writer.finish().await;
            return Err(e);
        }
    };
    let stop_time = Utc::now();

    // The stream must be the cluster we asked about, and carry the WAL it needs.
    let fail = |msg: String| Error::new(ErrorKind::Failure, msg);
    let control = s.control.as_ref().ok_or_else(|| {
        fail(format!(
            "{program}'s stream had no global/pg_control: not a data directory"
        ))
    });
    let check = control.and_then(|c| {
        if c.system_identifier != info.system_identifier {
            return Err(Error::new(
                ErrorKind::ClusterMismatch,
                format!(
                    "{program} streamed cluster {} but the SQL connection reached cluster {}; check --pg and the libpq environment",
                    c.system_identifier, info.system_identifier
                ),
            ));
        }
        Ok(())
    });
    let label_fields = s
        .backup_label
        .as_deref()
        .ok_or_else(|| fail(format!("{program}'s stream had no backup_label")))
        .and_then(|l| pgkeep_pg::BackupLabel::parse(l).map_err(pg_error));
    let (start_lsn, timeline) = match (check, label_fields) {
        (Ok(()), Ok(l)) => (l.start_lsn, l.start_timeline),
        (Err(e), _) | (_, Err(e)) => {
            let _ = writer.finish().await;
            return Err(e);
        }
    };
    let stop_lsn = s.stop_lsn;
    let mut wal = s.wal;
    let have: std::collections::BTreeSet<&str> = wal.iter().map(|w| w.name.as_str()).collect();
    let missing: Vec<String> = WalSegmentName::range(start_lsn, stop_lsn, timeline, cfg.seg_size)
        .iter()
        .map(|n| n.to_string())
        .filter(|n| !have.contains(n.as_str()))
        .collect();
    if !missing.is_empty() {
        let _ = writer.finish().await;
        return Err(fail(format!(
            "{program}'s stream lacks WAL the backup needs ({}); nothing was committed",
            missing.join(", ")
        )));
    }
    wal.sort_by_key(|w| (!w.name.ends_with(".history"), w.name.clone()));
    if standby {
        if let Err(e) = super::standby::check_stop(&client, timeline, stop_lsn).await {
            let _ = writer.finish().await;
            return Err(e);
        }
    }

    let stats = writer.finish().await?;
    let lost = client
        .query_text(
            "checking the backup's replication slot",
            &format!(
                "SELECT coalesce(wal_status, 'gone') FROM pg_replication_slots WHERE slot_name = '{slot}'"
            ),
        )
        .await
        .map_err(pg_error)?;
    if lost.as_deref() != Some("reserved") && lost.as_deref() != Some("extended") {
        return Err(fail(format!(
            "the backup's replication slot {slot} on {} is {}: WAL the backup needs may be gone",
            client.target(),
            lost.unwrap_or_else(|| "gone".into())
        )));
    }
    // PITR needs this backup's WAL in the archive too (RELIABILITY 15): when pgkeep archives
    // the cluster, wait for it before committing, as the local method does.
    let archive_mode = client.setting("archive_mode").await.map_err(pg_error)?;
    let archive_command = client.setting("archive_command").await.map_err(pg_error)?;
    if archive_mode != "off" && crate::commands::backup::pgkeep_archives(&archive_command) {
        progress.note("waiting for the backup's WAL to be archived");
        let segments = WalSegmentName::range(start_lsn, stop_lsn, timeline, cfg.seg_size);
        let timeout = super::standby::archive_wait(&client, opts, standby).await;
        let on_standby = standby.then_some((&client, stop_lsn));
        super::standby::wait_for_backup_wal(repo, &opts.cluster, &segments, timeout, on_standby)
            .await?;
    }
    if let Err(e) = client
        .inner()
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
    {
        // Temporary: it goes with the connection anyway.
        tracing::warn!("dropping the replication slot {slot}: {e}");
    }

    let mut files = s.files;
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut totals = BackupTotals {
        files: files.iter().filter(|f| f.kind == EntryKind::File).count() as u64,
        other_entries: files.iter().filter(|f| f.kind != EntryKind::File).count() as u64,
        bytes_read: s.bytes_read,
        wal_files: wal.len() as u64,
        wal_bytes: wal.iter().map(|w| w.stream.size).sum(),
        new_bytes: stats.bytes_new,
        stored_bytes: stats.stored_bytes,
        ..BackupTotals::default()
    };
    totals.logical_bytes = files
        .iter()
        .filter(|f| f.kind == EntryKind::File)
        .map(|f| f.size)
        .sum();
    let mut warnings = s.warnings;
    for pf in &s.failures {
        warnings.push(format!(
            "page verification failed in {} block {} (relation block {}): {}",
            pf.path, pf.block, pf.rel_block, pf.reason
        ));
    }
    let m = BackupManifest {
        format: MANIFEST_FORMAT,
        kind: KIND_PHYSICAL.into(),
        id: id.clone(),
        cluster: opts.cluster.clone(),
        method: "basebackup".into(),
        label: opts.label.clone(),
        host: pgkeep_repo::lock::hostname(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        system_identifier: info.system_identifier.to_string(),
        pg_version_num: info.version_num,
        pg_major: info.major_version(),
        timeline,
        wal_segment_size: cfg.seg_size,
        data_checksums: info.data_checksums,
        start_lsn: start_lsn.to_string(),
        stop_lsn: stop_lsn.to_string(),
        start_time,
        stop_time,
        duration_secs: started.elapsed().as_secs_f64(),
        backup_label: s.backup_label.unwrap_or_default(),
        tablespace_map: s.tablespace_map.filter(|t| !t.is_empty()),
        tablespaces: Vec::new(),
        files,
        wal,
        totals,
        page_checksum_failures: s.failures,
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
        previous: None,
        totals: m.totals,
        page_checksum_failures: m.page_checksum_failures,
        warnings,
        duration_secs: m.duration_secs,
    })
}

/// The pg_basebackup of the server's major version when installed in Debian's layout (an
/// older pg_basebackup refuses a newer server), else the one on PATH.
fn pg_basebackup_program(major: u32) -> String {
    let p = format!("/usr/lib/postgresql/{major}/bin/pg_basebackup");
    if Path::new(&p).exists() {
        p
    } else {
        "pg_basebackup".into()
    }
}

#[derive(Clone, Copy)]
struct StreamConfig {
    /// See [`BackupOptions::relation_chunk_size`].
    relation_chunk: usize,
    seg_size: u32,
}

/// What the tar stream held.
#[derive(Default)]
struct Streamed {
    files: Vec<FileEntry>,
    wal: Vec<WalEntry>,
    backup_label: Option<String>,
    tablespace_map: Option<String>,
    control: Option<ControlFile>,
    stop_lsn: Lsn,
    bytes_read: u64,
    failures: Vec<PageFailure>,
    warnings: Vec<String>,
}

/// Reads the child's tar stream into `writer`, then waits for it. On any failure of ours the
/// child is killed (the server then aborts the backup).
/// Set when the backup's future is dropped (SIGINT/SIGTERM end the command that way): the
/// thread reading pg_basebackup's stream, which the drop cannot stop, then fails its next
/// read and kills the child, instead of letting it stream on until the process exits.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A reader that fails once `cancelled` is set.
struct Cancellable<R> {
    inner: R,
    cancelled: Arc<AtomicBool>,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the backup was interrupted"));
        }
        self.inner.read(buf)
    }
}

fn ingest_child(
    mut child: Child,
    program: &str,
    writer: &BlobWriter,
    cfg: &StreamConfig,
    counter: &Counter,
    cancelled: Arc<AtomicBool>,
) -> Result<Streamed> {
    let stdout = Cancellable {
        inner: child.stdout.take().expect("piped stdout"),
        cancelled,
    };
    let stderr = child.stderr.take().expect("piped stderr");
    // Drain stderr on its own thread so a chatty child never blocks on a full pipe.
    let err_thread = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines() {
            match line {
                Ok(l) => lines.push(l),
                Err(_) => break,
            }
        }
        lines
    });
    let parsed = parse_stream(stdout, writer, cfg, counter);
    if parsed.is_err() {
        let _ = child.kill();
    }
    let status = child.wait();
    let stderr_lines = err_thread.join().unwrap_or_default();
    let mut s = match parsed {
        Ok(s) => s,
        Err(e) => {
            // When the child failed first, its message is the cause; ours is a consequence.
            if let Ok(st) = &status {
                if !st.success() && !stderr_lines.is_empty() {
                    return Err(tool_error(program, &st.to_string(), &stderr_lines));
                }
            }
            return Err(e);
        }
    };
    let (failures, warnings, checksum_error) = scan_stderr(&stderr_lines);
    let status = status.map_err(|e| Error::io(format!("waiting for {program}"), e))?;
    // A cluster with bad pages: the server sends everything, then fails the backup with
    // "checksum error occurred". The stream is complete (its manifest arrived), so, like the
    // local method, the backup is kept and the pages reported (exit 3).
    let complete_with_bad_pages = checksum_error && s.stop_lsn != Lsn(0) && !failures.is_empty();
    if !status.success() && !complete_with_bad_pages {
        return Err(tool_error(program, &status.to_string(), &stderr_lines));
    }
    if s.stop_lsn == Lsn(0) {
        return Err(Error::new(
            ErrorKind::Failure,
            format!("{program}'s stream ended without its backup_manifest (no stop LSN)"),
        ));
    }
    s.failures = failures;
    s.warnings = warnings;
    Ok(s)
}

fn tool_error(program: &str, status: &str, stderr: &[String]) -> Error {
    let tail: Vec<&str> = stderr
        .iter()
        .rev()
        .take(8)
        .rev()
        .map(|s| s.as_str())
        .collect();
    Error::new(
        ErrorKind::Failure,
        format!("{program} failed ({status}): {}", tail.join(" / ")),
    )
}

/// Page failures (as the server reported them), other warnings, and whether the server
/// ended the backup with a checksum error.
fn scan_stderr(lines: &[String]) -> (Vec<PageFailure>, Vec<String>, bool) {
    let mut failures = Vec::new();
    let mut warnings = Vec::new();
    let mut checksum_error = false;
    for l in lines {
        if let Some(f) = parse_checksum_warning(l) {
            failures.push(f);
        } else if l.contains("checksum error occurred")
            || l.contains("checksum verification failure during base backup")
        {
            checksum_error = true;
        } else if let Some(w) = l.strip_prefix("WARNING:") {
            warnings.push(w.trim().to_string());
        }
    }
    (failures, warnings, checksum_error)
}

/// `WARNING:  checksum verification failed in file "./base/5/16384", block 1: calculated D68
/// but expected 9518`.
fn parse_checksum_warning(line: &str) -> Option<PageFailure> {
    let rest = line
        .split_once("checksum verification failed in file \"")?
        .1;
    let (path, rest) = rest.split_once('"')?;
    let path = path.trim_start_matches("./").to_string();
    let rest = rest.strip_prefix(", block ")?;
    let (block, rest) = rest.split_once(':')?;
    let block: u32 = block.trim().parse().ok()?;
    let rest = rest.trim().strip_prefix("calculated ")?;
    let (calc, expected) = rest.split_once(" but expected ")?;
    let calc = u16::from_str_radix(calc.trim(), 16).ok()?;
    let expected = u16::from_str_radix(expected.trim(), 16).ok()?;
    let name = path.rsplit('/').next().unwrap_or("");
    let segno = RelFileName::parse(name).map(|r| r.segno).unwrap_or(0);
    Some(PageFailure {
        rel_block: absolute_block(segno, block),
        path,
        block,
        reason: format!("checksum 0x{expected:04x} stored, 0x{calc:04x} computed"),
    })
}

/// Whether `path` (relative, `/`-separated) is a relation file: under `global/` or
/// `base/<oid>/`, named like one.
fn is_relation_path(path: &str) -> bool {
    let Some((dir, name)) = path.rsplit_once('/') else {
        return false;
    };
    let rel_dir = dir == "global"
        || dir
            .strip_prefix("base/")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    rel_dir && RelFileName::parse(name).is_some()
}

/// Counts bytes as they pass.
struct Counting<'a, R> {
    inner: R,
    counter: &'a Counter,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.advance(n as u64, 0);
        Ok(n)
    }
}

fn bad_stream(e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Failure,
        format!("reading pg_basebackup's tar stream: {e}"),
    )
}

fn store(e: pgkeep_repo::RepoError, what: &str) -> Error {
    Error::new(ErrorKind::Failure, format!("storing {what}: {e}"))
}

/// The stop LSN from pg_basebackup's `backup_manifest` (`WAL-Ranges`, last `End-LSN`).
fn stop_lsn_from_manifest(bytes: &[u8]) -> Result<Lsn> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(bad_stream)?;
    let end = v
        .get("WAL-Ranges")
        .and_then(|r| r.as_array())
        .and_then(|r| r.last())
        .and_then(|r| r.get("End-LSN"))
        .and_then(|e| e.as_str())
        .ok_or_else(|| bad_stream("backup_manifest has no WAL-Ranges End-LSN"))?;
    end.parse().map_err(pg_error)
}

/// The whole content of a (small) entry.
fn read_all<R: Read>(entry: &mut R, size: u64, counter: &Counter) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size.min(1 << 30) as usize);
    Counting {
        inner: entry,
        counter,
    }
    .read_to_end(&mut buf)
    .map_err(bad_stream)?;
    Ok(buf)
}

/// Parses the tar stream entry by entry, storing contents as they pass.
fn parse_stream<R: Read>(
    input: R,
    writer: &BlobWriter,
    cfg: &StreamConfig,
    counter: &Counter,
) -> Result<Streamed> {
    let mut s = Streamed::default();
    // The newest WAL segment, held back until the next one arrives or the stream ends: only
    // then is it known whether it is the last (stored up to the stop LSN only).
    let mut pending: Option<(String, Vec<u8>)> = None;
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries().map_err(bad_stream)? {
        let mut entry = entry.map_err(bad_stream)?;
        let path = entry
            .path()
            .map_err(bad_stream)?
            .to_string_lossy()
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let header = entry.header();
        let mode = header.mode().map_err(bad_stream)? & 0o7777;
        let mtime = header.mtime().map_err(bad_stream)? as i64;
        let etype = header.entry_type();
        let size = header.size().map_err(bad_stream)?;
        if etype.is_dir() {
            s.files.push(FileEntry {
                path,
                kind: EntryKind::Dir,
                size: 0,
                mode,
                mtime,
                mtime_nsec: 0,
                target: None,
                stream: None,
            });
            continue;
        }
        if etype.is_symlink() {
            let target = entry
                .link_name()
                .map_err(bad_stream)?
                .map(|t| t.to_string_lossy().into_owned());
            s.files.push(FileEntry {
                path,
                kind: EntryKind::Symlink,
                size: 0,
                mode,
                mtime,
                mtime_nsec: 0,
                target,
                stream: None,
            });
            continue;
        }
        if !etype.is_file() {
            return Err(bad_stream(format!(
                "entry {path} has unexpected type {etype:?}"
            )));
        }
        match path.as_str() {
            "backup_label" => {
                s.backup_label =
                    Some(String::from_utf8_lossy(&read_all(&mut entry, size, counter)?).into());
                continue;
            }
            "tablespace_map" => {
                s.tablespace_map =
                    Some(String::from_utf8_lossy(&read_all(&mut entry, size, counter)?).into());
                continue;
            }
            PG_MANIFEST => {
                s.stop_lsn = stop_lsn_from_manifest(&read_all(&mut entry, size, counter)?)?;
                continue;
            }
            _ => {}
        }
        if pgkeep_pg::datadir::EXCLUDED_TOP_FILES.contains(&path.as_str()) {
            // What the local method leaves out too: on a standby, standby.signal (a restore
            // decides the recovery mode) and the backup_label.old of the pg_basebackup
            // that made it.
            read_all(&mut entry, size, counter)?;
            continue;
        }
        if let Some(name) = path.strip_prefix("pg_wal/") {
            if name.contains('/') {
                // archive_status: the restored cluster decides for itself.
                read_all(&mut entry, size, counter)?;
                continue;
            }
            if WalFileName::parse(name).is_err() {
                return Err(bad_stream(format!("unexpected file in pg_wal: {name}")));
            }
            let data = read_all(&mut entry, size, counter)?;
            if let Some((n, d)) = pending.take() {
                s.wal.push(store_wal(writer, n, &d, None)?);
            }
            pending = Some((name.to_string(), data));
            continue;
        }
        let stream = if path == "global/pg_control" {
            let data = read_all(&mut entry, size, counter)?;
            s.control = Some(ControlFile::parse(&data, Path::new(&path)).map_err(pg_error)?);
            writer.ingest_bytes(&data).map_err(|e| store(e, &path))?
        } else {
            let mut r = Counting {
                inner: &mut entry,
                counter,
            };
            if cfg.relation_chunk > 0 && is_relation_path(&path) {
                writer.ingest_reader_in_pieces(&mut r, cfg.relation_chunk)
            } else {
                writer.ingest_reader(&mut r)
            }
            .map_err(|e| store(e, &path))?
        };
        if stream.size != size {
            return Err(bad_stream(format!(
                "{path}: {} bytes read, the header said {size}",
                stream.size
            )));
        }
        s.bytes_read += stream.size;
        counter.advance(0, 1);
        s.files.push(FileEntry {
            path,
            kind: EntryKind::File,
            size,
            mode,
            mtime,
            mtime_nsec: 0,
            target: None,
            stream: Some(stream),
        });
    }
    if let Some((n, d)) = pending.take() {
        // The last segment: only up to the WAL page holding the stop LSN (a restore fills
        // the rest with zeros), as the local method stores it.
        let keep = if s.stop_lsn != Lsn(0) {
            // Same log and segment number; the timeline is the segment's own.
            let last = WalSegmentName::from_end_lsn(s.stop_lsn, 1, cfg.seg_size).to_string();
            let page = s
                .control
                .as_ref()
                .map(|c| c.wal_block_size.max(1))
                .unwrap_or(8192) as u64;
            let is_last = n.len() == 24 && last.len() == 24 && n[8..] == last[8..];
            is_last.then(|| (s.stop_lsn.segment_offset(cfg.seg_size) as u64).div_ceil(page) * page)
        } else {
            None
        };
        s.wal
            .push(store_wal(writer, n, &d, keep.filter(|k| *k > 0))?);
    }
    Ok(s)
}

fn store_wal(
    writer: &BlobWriter,
    name: String,
    data: &[u8],
    keep: Option<u64>,
) -> Result<WalEntry> {
    let part = match keep {
        Some(k) => &data[..(k as usize).min(data.len())],
        None => data,
    };
    let stream: StreamRef = writer.ingest_bytes(part).map_err(|e| store(e, &name))?;
    Ok(WalEntry {
        name,
        size: data.len() as u64,
        stream,
    })
}
