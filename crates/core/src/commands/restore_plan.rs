//! The plan of a physical restore, made before anything is written and printed by
//! `restore --dry-run`: which backup and why, what will be written, whether it fits on every
//! target file system, which WAL recovery needs and whether the archive holds it, where
//! recovery will stop, and how long the restore should take.
//!
//! # Where recovery stops by default
//!
//! Without a target, a restore recovers to the end of the archived WAL (pgBackRest's and
//! Barman's default): `recovery.signal` and `restore_command`, no target, along the latest
//! timeline. The plan says where that end is (the last archived segment and the last
//! transaction that ended in it), and calls a missing segment with archived WAL after it what
//! it is: a gap, where recovery will stop (a warning, exit 3, unless `--force`). A backup
//! with no archived WAL after it is restored as it is, without recovery settings.
//!
//! # Free space
//!
//! Each target file system (the data directory's and every tablespace location's, grouped by
//! device) must have room for what will be written: every file rounded up to the file
//! system's block size, a block per directory, the backup's own WAL, and two WAL segments for
//! a recovery that reads the archive (the segment being restored and the next one written).
//! `--delta` needs only the growth of files that already exist; `--force` counts what it
//! deletes as free. A restore that would not fit is refused before anything is written
//! (exit 1, both figures in the message).
//!
//! # Duration estimate
//!
//! Each completed restore appends its write speed (bytes written / seconds, with the
//! repository's id) to a small local file, `$XDG_STATE_HOME/pgkeep/restore-speed.jsonl` (else
//! `~/.local/state/pgkeep/…`): speed is a property of this host and that repository. The
//! estimate is the bytes to write at the median of the last restores from the same
//! repository; without any, the plan says "no estimate".

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use pgkeep_pg::recovery::{RecoveryTarget, TargetAction};
use pgkeep_repo::Repository;
use serde::{Deserialize, Serialize};

use crate::commands::pitr::{self, time_text, ArchiveEnd, ArchiveReach, PitrOptions};
use crate::commands::restore::RestoreOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{self, BackupManifest, EntryKind};
use crate::progress::human_bytes;

/// What the restore will do, worked out before anything is written.
#[derive(Debug, Clone, Serialize)]
pub struct RestorePlan {
    /// The backup restored.
    pub backup: String,
    /// Why this backup.
    pub selected_because: String,
    /// Its stop LSN (consistent from there).
    pub backup_stop_lsn: String,
    /// Its stop time.
    pub backup_stop_time: DateTime<Utc>,
    /// Its timeline.
    pub backup_timeline: u32,
    /// `fresh`, `delta` or `force`.
    pub mode: String,
    /// Regular files in the backup.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// WAL files stored with the backup (written to pg_wal).
    pub wal_files: u64,
    /// Their bytes.
    pub wal_bytes: u64,
    /// `--delta`: what is expected to differ.
    pub delta: Option<DeltaEstimate>,
    /// Bytes expected to be written (files and the backup's WAL).
    pub bytes_to_write: u64,
    /// Free space, per target file system.
    pub space: Vec<SpaceCheck>,
    /// Recovery: the WAL needed, the reachable window, where it stops.
    pub recovery: RecoveryPlan,
    /// How long the restore should take.
    pub estimate: DurationEstimate,
    /// Worth exit code 3 (a gap, unless `--force`).
    pub warnings: Vec<String>,
    /// For information.
    pub notes: Vec<String>,
    /// The recovery settings to write, `None` for none.
    #[serde(skip)]
    pub(crate) settings: Option<PitrOptions>,
}

/// `--delta`: the files of the backup that are already in the target, judged by size and
/// modification time (a restore sets each file's time to the backup's; PostgreSQL's writes
/// change it). Every present file is still compared chunk by chunk when restoring.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeltaEstimate {
    /// Files with the backup's size and time.
    pub files_expected_unchanged: u64,
    /// Their bytes.
    pub bytes_expected_unchanged: u64,
    /// Files missing, or with another size or time.
    pub files_expected_to_differ: u64,
    /// Their bytes (the backup's sizes).
    pub bytes_expected_to_differ: u64,
}

/// One target file system.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceCheck {
    /// The target locations on it (data directory, tablespace locations).
    pub locations: Vec<String>,
    /// Bytes the restore needs there.
    pub needed: u64,
    /// Bytes available there (with `--force`, including what it deletes).
    pub free: u64,
    /// `needed <= free`.
    pub fits: bool,
}

/// Recovery as the restored server will run it.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryPlan {
    /// `end_of_archive`, `backup_end` (`--target-immediate`), `target`, `standby`, or
    /// `none` (no recovery settings: the backup as it ended).
    pub kind: String,
    /// `recovery.signal`, `standby.signal` or none.
    pub signal: Option<String>,
    /// The WAL range recovery reads: the backup's start segment to the end.
    pub wal_first: String,
    /// Last segment recovery can read (the backup's own last one when nothing is archived).
    pub wal_last: String,
    /// Whether the archive holds every segment from the backup's end to the end of the
    /// archive (false: a gap).
    pub archive_complete: bool,
    /// The window a target may lie in: from the backup's stop LSN and time …
    pub window_from_lsn: String,
    /// … time …
    pub window_from_time: DateTime<Utc>,
    /// … to the end of the reachable WAL …
    pub window_to_lsn: String,
    /// … and its last transaction end.
    pub window_to_time: Option<DateTime<Utc>>,
    /// The end of the archive as recovery sees it.
    pub archive_end: Option<ArchiveEnd>,
    /// Where recovery will stop, in words.
    pub stops: String,
}

/// How long the restore should take.
#[derive(Debug, Clone, Serialize)]
pub struct DurationEstimate {
    /// Seconds, when earlier restores measured a speed.
    pub secs: Option<f64>,
    /// The speed used.
    pub bytes_per_sec: Option<f64>,
    /// Earlier restores it comes from.
    pub restores_measured: usize,
    /// In words.
    pub basis: String,
}

impl RestorePlan {
    /// The refusal of a restore that does not fit (exit 1), with both figures.
    pub fn space_refusal(&self) -> Option<Error> {
        let short: Vec<&SpaceCheck> = self.space.iter().filter(|s| !s.fits).collect();
        if short.is_empty() {
            return None;
        }
        let what: Vec<String> = short
            .iter()
            .map(|s| {
                format!(
                    "{} needs {} ({} bytes), has {} ({} bytes) free",
                    s.locations.join(", "),
                    human_bytes(s.needed),
                    s.needed,
                    human_bytes(s.free),
                    s.free
                )
            })
            .collect();
        Some(Error::with_hint(
            ErrorKind::Failure,
            format!(
                "not enough space to restore backup {}: {}",
                self.backup,
                what.join("; ")
            ),
            "free space there, restore elsewhere (--target-dir, --tablespace-map OLD=NEW), or use --delta over an earlier restore",
        ))
    }

    /// The lines said before anything is written: where recovery stops, and the warnings.
    pub fn headline(&self) -> Vec<String> {
        let mut v = vec![format!(
            "restoring backup {} ({}); recovery: {}",
            self.backup, self.selected_because, self.recovery.stops
        )];
        v.extend(self.warnings.iter().map(|w| format!("WARNING: {w}")));
        v.extend(self.notes.iter().map(|n| format!("note: {n}")));
        v
    }
}

impl fmt::Display for RestorePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "backup: {} ({}), ended at {} ({}) on timeline {}",
            self.backup,
            self.selected_because,
            self.backup_stop_lsn,
            time_text(self.backup_stop_time),
            self.backup_timeline
        )?;
        writeln!(
            f,
            "files: {} ({}) and {} WAL files ({}); to write: {} ({})",
            self.files,
            human_bytes(self.bytes),
            self.wal_files,
            human_bytes(self.wal_bytes),
            human_bytes(self.bytes_to_write),
            self.mode
        )?;
        if let Some(d) = &self.delta {
            writeln!(
                f,
                "delta: {} files ({}) expected to differ, {} ({}) expected unchanged (same size and time; compared chunk by chunk)",
                d.files_expected_to_differ,
                human_bytes(d.bytes_expected_to_differ),
                d.files_expected_unchanged,
                human_bytes(d.bytes_expected_unchanged)
            )?;
        }
        for s in &self.space {
            writeln!(
                f,
                "space: {}: needs {}, {} free{}",
                s.locations.join(", "),
                human_bytes(s.needed),
                human_bytes(s.free),
                if s.fits { "" } else { ": NOT ENOUGH" }
            )?;
        }
        let r = &self.recovery;
        writeln!(
            f,
            "WAL: {} to {}{}",
            r.wal_first,
            r.wal_last,
            match (&r.archive_end, r.archive_complete) {
                (None, _) => " (the backup's own WAL)".to_string(),
                (Some(_), true) => ", all of it in the backup or the archive".to_string(),
                (Some(e), false) => format!(
                    "; the archive misses {}",
                    e.gap.as_deref().unwrap_or("a segment")
                ),
            }
        )?;
        writeln!(
            f,
            "reachable window: {} ({}) to {} ({})",
            r.window_from_lsn,
            time_text(r.window_from_time),
            r.window_to_lsn,
            r.window_to_time
                .map(|t| format!("last transaction {}", time_text(t)))
                .unwrap_or_else(|| "no transaction after the backup".into())
        )?;
        writeln!(f, "recovery: {}", r.stops)?;
        writeln!(f, "duration: {}", self.estimate.basis)?;
        for w in &self.warnings {
            writeln!(f, "WARNING: {w}")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// Picks the backup (`latest`: the newest one, or with a target the newest that ends before
/// it) and says why; the target is checked later, in [`build`].
pub async fn select(repo: &Repository, opts: &RestoreOptions) -> Result<(BackupManifest, String)> {
    let id = if opts.id.is_empty() {
        "latest"
    } else {
        opts.id.as_str()
    };
    let (id, why) = match &opts.recovery {
        Some(p) => {
            let chosen = pitr::select_backup(repo, &opts.cluster, id, p).await?;
            let why = if id != "latest" {
                "named on the command line".to_string()
            } else if matches!(p.target, RecoveryTarget::End | RecoveryTarget::Immediate) {
                format!("the newest physical backup of cluster {}", opts.cluster)
            } else {
                "the newest backup that ends before the recovery target".to_string()
            };
            (chosen, why)
        }
        None if id == "latest" => (
            id.to_string(),
            format!("the newest physical backup of cluster {}", opts.cluster),
        ),
        None => (id.to_string(), "named on the command line".to_string()),
    };
    let m = manifest::load_physical(repo, &opts.cluster, &id).await?;
    Ok((m, why))
}

/// Inputs of [`build`] that `restore` has already worked out.
pub struct PlanInput<'a> {
    /// The backup.
    pub m: &'a BackupManifest,
    /// Why it was chosen.
    pub why: String,
    /// The data directory (absolute).
    pub target: &'a Path,
    /// Tablespace locations after relocation.
    pub ts: &'a BTreeMap<u32, PathBuf>,
    /// `fresh`, `delta` or `force`.
    pub mode: &'a str,
}

/// Makes the plan: checks the recovery target (exit 16/15), finds the end of the archive,
/// sizes the writes, checks the free space (the refusal is [`RestorePlan::space_refusal`]),
/// and estimates the duration. Reads only.
pub async fn build(
    repo: &Repository,
    opts: &RestoreOptions,
    input: PlanInput<'_>,
) -> Result<RestorePlan> {
    let m = input.m;
    let (recovery, settings, mut warnings, mut notes) = recovery_plan(repo, opts, m).await?;
    let files: Vec<&manifest::FileEntry> = m
        .files
        .iter()
        .filter(|f| f.kind == EntryKind::File)
        .collect();
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let wal_bytes: u64 = m.wal.iter().map(|w| w.size).sum();
    let delta = opts
        .delta
        .then(|| delta_estimate(m, input.target, input.ts));
    let bytes_to_write = delta.as_ref().map_or(bytes, |d| d.bytes_expected_to_differ) + wal_bytes;
    let slack = if settings.is_some() {
        2 * m.wal_segment_size as u64
    } else {
        0
    };
    let space = space_checks(m, input.target, input.ts, input.mode, slack)?;
    let estimate = estimate(opts.speed_log.as_deref(), &repo.config().id, bytes_to_write);
    if opts.force
        && recovery
            .archive_end
            .as_ref()
            .is_some_and(|e| e.gap.is_some())
    {
        // --force acknowledges the gap: it stays in the plan as a note.
        notes.append(&mut warnings);
    }
    Ok(RestorePlan {
        backup: m.id.clone(),
        selected_because: input.why,
        backup_stop_lsn: m.stop_lsn.clone(),
        backup_stop_time: m.stop_time,
        backup_timeline: m.timeline,
        mode: input.mode.to_string(),
        files: files.len() as u64,
        bytes,
        wal_files: m.wal.len() as u64,
        wal_bytes,
        delta,
        bytes_to_write,
        space,
        recovery,
        estimate,
        warnings,
        notes,
        settings,
    })
}

type RecoveryParts = (RecoveryPlan, Option<PitrOptions>, Vec<String>, Vec<String>);

/// The recovery part of the plan, the settings to write, warnings and notes.
async fn recovery_plan(
    repo: &Repository,
    opts: &RestoreOptions,
    m: &BackupManifest,
) -> Result<RecoveryParts> {
    let own_last = m
        .wal
        .iter()
        .map(|w| w.name.clone())
        .max()
        .unwrap_or_default();
    let own_first = m
        .wal
        .iter()
        .map(|w| w.name.clone())
        .min()
        .unwrap_or_default();
    let backup_end = format!(
        "at the backup's end, {} ({}), with the WAL stored in the backup",
        m.stop_lsn,
        time_text(m.stop_time)
    );
    let mut plan = RecoveryPlan {
        kind: "none".into(),
        signal: None,
        wal_first: own_first,
        wal_last: own_last,
        archive_complete: true,
        window_from_lsn: m.stop_lsn.clone(),
        window_from_time: m.stop_time,
        window_to_lsn: m.stop_lsn.clone(),
        window_to_time: None,
        archive_end: None,
        stops: backup_end.clone(),
    };
    let (mut warnings, mut notes) = (Vec::new(), Vec::new());
    let Some(p) = &opts.recovery else {
        return Ok((plan, None, warnings, notes));
    };
    let reach = ArchiveReach::load(repo, &opts.cluster).await?;
    reach.check(m, p).await?;
    let end = reach.end(m, p.timeline).await?;
    plan.wal_first = end.first_segment.clone();
    if let Some(l) = &end.last_segment {
        plan.wal_last = l.clone();
    }
    plan.archive_complete = end.gap.is_none();
    plan.window_to_lsn = end.end_lsn.clone();
    plan.window_to_time = end.last_xact_time;
    let action = |a: Option<TargetAction>| match a {
        Some(TargetAction::Promote) => "then promotes",
        Some(TargetAction::Shutdown) => "then shuts down",
        Some(TargetAction::Pause) | None => "then pauses (recovery_target_action = pause)",
    };
    let gap_text = |e: &ArchiveEnd| {
        format!(
            "the archive has a gap after backup {}: segment {} is missing, so recovery stops at {} ({}) although the archive goes on{}; \
             everything after that is lost unless the segment is found (see `pgkeep verify`); --force accepts this",
            m.id,
            e.gap.as_deref().unwrap_or("?"),
            e.end_lsn,
            e.last_xact_time
                .map(|t| format!("last transaction {}", time_text(t)))
                .unwrap_or_else(|| "no transaction after the backup".into()),
            e.archived_past_gap
                .as_deref()
                .map(|s| format!(" to {s}"))
                .unwrap_or_default()
        )
    };
    let mut settings = Some(p.clone());
    if p.standby {
        plan.kind = "standby".into();
        plan.signal = Some("standby.signal".into());
        plan.stops = format!(
            "never: the server stays a standby, replaying the archive{} (archived now: {})",
            if p.primary_conninfo.is_some() {
                " and then streaming from the primary"
            } else {
                ""
            },
            end.describe()
        );
        if end.gap.is_some() {
            if p.primary_conninfo.is_some() {
                notes.push(format!(
                    "{}; a standby streams what it misses from the primary while the primary still has it",
                    gap_text(&end)
                ));
            } else {
                warnings.push(format!(
                    "{}; without --primary-conninfo the standby waits at the gap",
                    gap_text(&end)
                ));
            }
        }
    } else {
        match &p.target {
            RecoveryTarget::End => {
                if end.last_segment.is_none() && end.gap.is_none() {
                    settings = None;
                    notes.push(format!(
                        "the archive holds no WAL after backup {}: it is restored as it ended, without recovery settings (archive WAL with `archive_command = 'pgkeep archive-push %p'` to recover further)",
                        m.id
                    ));
                } else {
                    plan.kind = "end_of_archive".into();
                    plan.signal = Some("recovery.signal".into());
                    plan.stops = format!(
                        "{}; then promotes; anything committed later was not archived and is lost",
                        end.describe()
                    );
                    if end.gap.is_some() {
                        warnings.push(gap_text(&end));
                    }
                }
            }
            RecoveryTarget::Immediate => {
                plan.kind = "backup_end".into();
                plan.signal = Some("recovery.signal".into());
                plan.stops = format!("{backup_end}, {}", action(p.action));
            }
            t => {
                plan.kind = "target".into();
                plan.signal = Some("recovery.signal".into());
                plan.stops = format!("at the target {}, {}", target_text(t), action(p.action));
            }
        }
    }
    if settings.is_some() {
        plan.archive_end = Some(end);
    }
    Ok((plan, settings, warnings, notes))
}

fn target_text(t: &RecoveryTarget) -> String {
    match t {
        RecoveryTarget::End => "end of WAL".into(),
        RecoveryTarget::Immediate => "immediate".into(),
        RecoveryTarget::Time(x) => format!("time {x}"),
        RecoveryTarget::Lsn(l) => format!("LSN {l}"),
        RecoveryTarget::Xid(x) => format!("xid {x}"),
        RecoveryTarget::Name(n) => format!("restore point {n:?}"),
    }
}

/// Where a file of the backup lands: tablespace files under their (relocated) location.
fn local_path(target: &Path, ts: &BTreeMap<u32, PathBuf>, path: &str) -> (PathBuf, Option<u32>) {
    if let Some(rest) = path.strip_prefix("pg_tblspc/") {
        if let Some((oid, sub)) = rest.split_once('/') {
            if let Some((oid, loc)) = oid.parse::<u32>().ok().and_then(|o| ts.get_key_value(&o)) {
                return (loc.join(sub), Some(*oid));
            }
        }
    }
    (target.join(path), None)
}

fn delta_estimate(m: &BackupManifest, target: &Path, ts: &BTreeMap<u32, PathBuf>) -> DeltaEstimate {
    let mut d = DeltaEstimate::default();
    for f in m.files.iter().filter(|f| f.kind == EntryKind::File) {
        let (p, _) = local_path(target, ts, &f.path);
        let same = std::fs::symlink_metadata(&p).is_ok_and(|meta| {
            meta.is_file()
                && meta.len() == f.size
                && meta.mtime() == f.mtime
                && meta.mtime_nsec() == f.mtime_nsec as i64
        });
        if same {
            d.files_expected_unchanged += 1;
            d.bytes_expected_unchanged += f.size;
        } else {
            d.files_expected_to_differ += 1;
            d.bytes_expected_to_differ += f.size;
        }
    }
    d
}

/// The file system of `p` (or of its nearest existing ancestor): device, bytes available to
/// this user, block size.
fn file_system(p: &Path) -> Result<(u64, u64, u64)> {
    let mut q = p.to_path_buf();
    let meta = loop {
        match std::fs::metadata(&q) {
            Ok(meta) => break meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && q.pop() => {}
            Err(e) => return Err(Error::io(format!("reading {}", q.display()), e)),
        }
    };
    let c = std::ffi::CString::new(q.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::usage(format!("{} has a NUL byte", q.display())))?;
    // SAFETY: statvfs(3) with a valid C string and a zeroed struct it fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io(
            format!("reading the free space of {}", q.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let block = (st.f_frsize as u64).max(512);
    Ok((meta.dev(), st.f_bavail as u64 * block, block))
}

/// Bytes a file of `size` takes in blocks of `block`.
fn blocks(size: u64, block: u64) -> u64 {
    size.div_ceil(block) * block
}

/// Bytes allocated to the files under `dir` (not following symlinks).
fn allocated_under(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            }
            total += meta.blocks() * 512;
        }
    }
    total
}

/// Free space against need, per target file system; see the module documentation.
fn space_checks(
    m: &BackupManifest,
    target: &Path,
    ts: &BTreeMap<u32, PathBuf>,
    mode: &str,
    recovery_slack: u64,
) -> Result<Vec<SpaceCheck>> {
    // Per location (None: the data directory): needed bytes.
    let mut locations: Vec<(Option<u32>, PathBuf)> = vec![(None, target.to_path_buf())];
    locations.extend(ts.iter().map(|(o, p)| (Some(*o), p.clone())));
    let mut fs: BTreeMap<u64, SpaceCheck> = BTreeMap::new();
    let mut block_of: BTreeMap<Option<u32>, (u64, u64)> = BTreeMap::new();
    for (oid, loc) in &locations {
        let (dev, free, block) = file_system(loc)?;
        block_of.insert(*oid, (dev, block));
        let freed = if mode == "force" && loc.is_dir() {
            allocated_under(loc)
        } else {
            0
        };
        let e = fs.entry(dev).or_insert(SpaceCheck {
            locations: Vec::new(),
            needed: 0,
            free,
            fits: true,
        });
        e.locations.push(loc.display().to_string());
        e.free += freed;
    }
    let mut need = |oid: Option<u32>, bytes: u64| {
        let (dev, _) = block_of[&oid];
        if let Some(e) = fs.get_mut(&dev) {
            e.needed += bytes;
        }
    };
    for f in &m.files {
        let (p, oid) = local_path(target, ts, &f.path);
        let block = block_of[&oid].1;
        match f.kind {
            EntryKind::File => {
                let mut n = blocks(f.size, block);
                if mode == "delta" {
                    let have = std::fs::symlink_metadata(&p)
                        .ok()
                        .filter(|meta| meta.is_file())
                        .map_or(0, |meta| meta.blocks() * 512);
                    n = n.saturating_sub(have);
                }
                need(oid, n);
            }
            EntryKind::Dir if mode != "delta" || !p.is_dir() => need(oid, block),
            _ => {}
        }
    }
    let block = block_of[&None].1;
    let wal: u64 = m.wal.iter().map(|w| blocks(w.size, block)).sum();
    need(None, wal + recovery_slack);
    let mut out: Vec<SpaceCheck> = fs.into_values().collect();
    for s in &mut out {
        s.fits = s.needed <= s.free;
    }
    Ok(out)
}

/// One line of the restore speed log.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SpeedRecord {
    at: DateTime<Utc>,
    repository: String,
    bytes: u64,
    secs: f64,
    mode: String,
}

/// Lines kept in the speed log.
const SPEED_LOG_KEEP: usize = 50;
/// Earlier restores the estimate takes the median of.
const SPEED_SAMPLES: usize = 5;
/// Restores smaller than this say little about speed (fixed costs dominate).
const SPEED_MIN_BYTES: u64 = 1 << 20;

/// The default speed log: `$XDG_STATE_HOME/pgkeep/restore-speed.jsonl`, else
/// `$HOME/.local/state/pgkeep/restore-speed.jsonl`; `None` without either.
pub fn default_speed_log() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        _ => {
            let home = std::env::var_os("HOME")?;
            Path::new(&home).join(".local/state")
        }
    };
    Some(base.join("pgkeep/restore-speed.jsonl"))
}

fn read_speeds(log: &Path) -> Vec<SpeedRecord> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn estimate(log: Option<&Path>, repository: &str, bytes: u64) -> DurationEstimate {
    let mut speeds: Vec<f64> = log
        .map(read_speeds)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.repository == repository && r.secs > 0.0 && r.bytes >= SPEED_MIN_BYTES)
        .map(|r| r.bytes as f64 / r.secs)
        .collect();
    speeds = speeds.split_off(speeds.len().saturating_sub(SPEED_SAMPLES));
    if speeds.is_empty() {
        return DurationEstimate {
            secs: None,
            bytes_per_sec: None,
            restores_measured: 0,
            basis: "no estimate: no earlier restore from this repository is recorded on this host"
                .into(),
        };
    }
    speeds.sort_by(|a, b| a.total_cmp(b));
    let speed = speeds[speeds.len() / 2];
    let secs = bytes as f64 / speed;
    DurationEstimate {
        secs: Some(secs),
        bytes_per_sec: Some(speed),
        restores_measured: speeds.len(),
        basis: format!(
            "about {secs:.0} s: {} at {}/s, the median speed of the last {} restores from this repository on this host (plus recovery, which depends on the WAL to replay)",
            human_bytes(bytes),
            human_bytes(speed as u64),
            speeds.len()
        ),
    }
}

/// Appends a completed restore's speed to the log (best effort: a failure is a log line, never
/// a failed restore). The file is 0600 in a 0700 directory.
pub fn record_speed(log: &Path, repository: &str, bytes: u64, secs: f64, mode: &str) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let write = || -> std::io::Result<()> {
        if let Some(dir) = log.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mut records = read_speeds(log);
        records.push(SpeedRecord {
            at: Utc::now(),
            repository: repository.to_string(),
            bytes,
            secs,
            mode: mode.to_string(),
        });
        let records = &records[records.len().saturating_sub(SPEED_LOG_KEEP)..];
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        // Written beside and renamed, so a crash never leaves half a log.
        let tmp = log.with_extension("jsonl.tmp");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))?;
        std::fs::rename(&tmp, log)
    };
    if let Err(e) = write() {
        tracing::warn!(
            "could not record the restore speed in {}: {e}",
            log.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_is_the_median_of_this_repositorys_recent_restores() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("state/pgkeep/restore-speed.jsonl");
        let e = estimate(Some(&log), "r1", 100 << 20);
        assert!(e.secs.is_none() && e.basis.starts_with("no estimate"));
        // Too small to count, another repository, then three of r1: 10, 20, 40 MiB/s.
        record_speed(&log, "r1", 1000, 1.0, "fresh");
        record_speed(&log, "r2", 100 << 20, 1.0, "fresh");
        for s in [10u64, 40, 20] {
            record_speed(&log, "r1", s << 20, 1.0, "fresh");
        }
        let e = estimate(Some(&log), "r1", 100 << 20);
        assert_eq!(e.restores_measured, 3);
        assert!((e.secs.unwrap() - 5.0).abs() < 1e-9, "{e:?}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for _ in 0..60 {
            record_speed(&log, "r1", 1 << 20, 1.0, "fresh");
        }
        assert_eq!(read_speeds(&log).len(), SPEED_LOG_KEEP);
    }

    #[test]
    fn blocks_round_up() {
        assert_eq!(blocks(0, 4096), 0);
        assert_eq!(blocks(1, 4096), 4096);
        assert_eq!(blocks(8192, 4096), 8192);
    }

    #[test]
    fn tablespace_files_land_in_their_location() {
        let ts: BTreeMap<u32, PathBuf> = [(16400, PathBuf::from("/ts/a"))].into();
        let t = Path::new("/data");
        assert_eq!(
            local_path(t, &ts, "pg_tblspc/16400/PG_15_1/5/1"),
            (PathBuf::from("/ts/a/PG_15_1/5/1"), Some(16400))
        );
        assert_eq!(
            local_path(t, &ts, "base/5/1"),
            (PathBuf::from("/data/base/5/1"), None)
        );
        assert_eq!(
            local_path(t, &ts, "pg_tblspc/16400"),
            (PathBuf::from("/data/pg_tblspc/16400"), None)
        );
    }
}
