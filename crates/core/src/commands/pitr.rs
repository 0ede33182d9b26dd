//! Point-in-time recovery for `restore`: which backup a target needs, whether the target is
//! inside the window the backups and the WAL archive can reach, and the recovery settings
//! (`recovery.signal`, `restore_command = 'pgkeep archive-get %f %p'`, the target) written
//! into the restored data directory as its very last step.
//!
//! # The reachable window
//!
//! Recovery from a backup starts at its start LSN, is consistent at its stop LSN, and goes on
//! through the archive along the target timeline's history until the first missing segment.
//! Before anything is written, the target is checked against that window (exit 16, the window
//! in the target's own terms in the message), the way PostgreSQL 13+ would judge it at the end
//! of a long replay ("recovery ended before configured recovery target was reached"):
//! - `--target-lsn`: in [stop LSN, end of the last contiguous archived segment];
//! - `--target-time`: not before the backup's stop time, and some transaction must end after
//!   it in the window (recovery stops *before* the first commit or abort later than the
//!   target; with none, it runs off the end of the archive). The window is printed as
//!   [backup stop time, last transaction end];
//! - `--target-xid`: the transaction must end (commit or abort) in the window; one that ended
//!   between the backup's start and stop stops recovery before it is consistent;
//! - `--target-name`: the first restore point of that name after the backup's start must lie
//!   after its stop (PostgreSQL stops at the first one).
//!
//! Time, xid and name are answered from the per-segment summaries `archive-push` stores
//! ([`SegmentSummary`]); a segment without one is read and scanned. Reads go newest first for
//! time and xid targets (the usual targets are recent, so a reachable one is found after a few
//! reads) and oldest first for names; an unreachable target reads every summary of the
//! window, in parallel.
//!
//! # Timelines
//!
//! The target timeline is PostgreSQL's: `latest` (the default) is the highest timeline whose
//! history files follow the backup's timeline one by one, `current` the backup's own. Its
//! history file must list the backup's timeline with a switchpoint at or after the backup's
//! stop LSN; a timeline that forked earlier cannot be reached from this backup (exit 15, as
//! pgBackRest refuses it). The window then follows the history: segment by segment, the file
//! of the newest timeline of the path that has begun by then, which is the file PostgreSQL asks
//! `restore_command` for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};
use pgkeep_pg::recovery::{
    RecoveryConfig, RecoveryMode, RecoveryTarget, TargetAction, TargetTimeline,
};
use pgkeep_pg::wal::{WalFileName, WalSegmentName};
use pgkeep_pg::walrecords::{
    join_split, pg_time_to_unix_micros, scan_segment, unix_micros_to_pg_time, SegmentSummary,
    WalEvent,
};
use pgkeep_pg::{Lsn, TimelineHistory};
use pgkeep_repo::Repository;
use serde::{Deserialize, Serialize};

use crate::commands::archive::{fetch, list_archive, segment_summary, summarize_bytes};
use crate::context::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{self, BackupManifest, KIND_PHYSICAL};

/// Summaries read at once.
const PARALLEL_READS: usize = 16;
/// Segments looked at per round of reads.
const BATCH: usize = 64;

/// What a point-in-time restore asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitrOptions {
    /// The recovery target.
    pub target: RecoveryTarget,
    /// What the server does at the target (PostgreSQL's default: pause).
    pub action: Option<TargetAction>,
    /// Timeline to follow (PostgreSQL's default: latest).
    pub timeline: Option<TargetTimeline>,
    /// The `restore_command` to write (see [`restore_command_for`]).
    pub restore_command: String,
    /// Write `standby.signal` instead of `recovery.signal`: the restored cluster stays in
    /// recovery and follows the archive (and the primary, with `primary_conninfo`).
    #[serde(default)]
    pub standby: bool,
    /// `primary_conninfo` of a standby; never holds a password (refused by the CLI: the
    /// server reads it from a passfile or the server user's `.pgpass`).
    #[serde(default)]
    pub primary_conninfo: Option<String>,
}

/// Parses a target time: PostgreSQL's timestamptz text (`2026-11-22 14:31:07.52+00`,
/// offsets `+01`, `+0130`, `+01:30`) or RFC 3339. A time without an offset is refused: its
/// meaning would depend on the server's time zone.
pub fn parse_target_time(s: &str) -> Result<DateTime<Utc>> {
    let t = s.trim();
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    // PostgreSQL prints offsets as +HH, +HHMM or +HH:MM; chrono's %#z takes all three.
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z"] {
        if let Ok(d) = DateTime::parse_from_str(t, f) {
            return Ok(d.with_timezone(&Utc));
        }
    }
    Err(Error::usage_hint(
        format!("--target-time {s:?} is not a time with a UTC offset"),
        "write it as PostgreSQL prints timestamptz (2026-11-22 14:31:07.52+00) or RFC 3339 (2026-11-22T14:31:07Z)",
    ))
}

/// The repository settings a run may take from the environment that are not secrets and that
/// `archive-get` needs to reach the repository: [`restore_command_for`] passes them on.
const PASSED_ON_SETTINGS: [&str; 10] = [
    crate::config::env::REPOSITORY,
    crate::config::env::REPO_ENDPOINT,
    crate::config::env::REPO_REGION,
    crate::config::env::REPO_FORCE_PATH_STYLE,
    crate::config::env::REPO_ALLOW_HTTP,
    crate::config::env::REPO_AZURE_USE_EMULATOR,
    crate::config::env::REPO_AZURE_ACCOUNT,
    crate::config::env::REPO_RETRY_MAX_ATTEMPTS,
    crate::config::env::REPO_RETRY_BASE_DELAY_MS,
    crate::config::env::REPO_REQUEST_TIMEOUT_SECS,
];

/// The `restore_command` for a restored cluster: this executable's `archive-get` with the
/// run's configuration file, repository and cluster, and the repository settings this run took
/// from `PGKEEP_REPO_*` variables (endpoint, region, addressing, account, …: none is a
/// secret), so the restored server reaches the same repository whatever its environment. The
/// server runs it with its own environment, which must hold the store's credentials; an
/// encrypted repository needs `passphrase_file` in the configuration file, or
/// `PGKEEP_PASSPHRASE_FILE` set for this run (its path, never the passphrase, is passed on in
/// the command).
pub fn restore_command_for(ctx: &Context) -> Result<String> {
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the pgkeep executable", e))?;
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut cmd = String::new();
    for var in PASSED_ON_SETTINGS {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            cmd.push_str(&format!("{var}={} ", quote(&v.to_string_lossy())));
        }
    }
    if let Some(f) = std::env::var_os(crate::secrets::ENV_PASSPHRASE_FILE) {
        cmd.push_str(&format!(
            "{}={} ",
            crate::secrets::ENV_PASSPHRASE_FILE,
            quote(&f.to_string_lossy())
        ));
    } else if std::env::var_os(crate::secrets::ENV_PASSPHRASE).is_some() {
        tracing::warn!(
            "the passphrase comes from {} and is not passed on to the restored server's restore_command; an encrypted repository needs passphrase_file in the configuration file or {}",
            crate::secrets::ENV_PASSPHRASE,
            crate::secrets::ENV_PASSPHRASE_FILE
        );
    }
    cmd.push_str(&quote(&exe.display().to_string()));
    if let Some(c) = &ctx.settings.config_file {
        cmd.push_str(&format!(" --config {}", quote(&c.display().to_string())));
    }
    cmd.push_str(&format!(
        " --repo {} --cluster {} archive-get %f %p",
        quote(&ctx.repository()?.url),
        quote(&ctx.settings.cluster.name)
    ));
    Ok(cmd)
}

fn unreachable(msg: String, window: Option<String>, hint: &str) -> Error {
    let w = window
        .map(|w| format!(" (reachable from this backup: {w})"))
        .unwrap_or_default();
    Error::with_hint(ErrorKind::TargetUnreachable, format!("{msg}{w}"), hint)
}

/// PostgreSQL's timestamptz text in UTC, as the messages print times.
pub fn time_text(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// A WAL `TimestampTz` as text.
fn pg_time_text(t: i64) -> String {
    DateTime::from_timestamp_micros(pg_time_to_unix_micros(t))
        .map(time_text)
        .unwrap_or_else(|| format!("(timestamp {t})"))
}

/// The 32 bits PostgreSQL compares `recovery_target_xid` with: it accepts a 64-bit
/// `txid_current()` value and keeps the low half, as here.
fn target_xid(x: &str) -> Result<u32> {
    x.trim().parse::<u64>().map(|v| v as u32).map_err(|_| {
        Error::usage(format!(
            "--target-xid {x:?} is not a transaction id (digits)"
        ))
    })
}

fn stop_of(m: &BackupManifest) -> Result<(Lsn, Lsn)> {
    let lsn = |s: &str| {
        s.parse::<Lsn>().map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("backup {}: bad LSN {s:?}: {e}", m.id),
            )
        })
    };
    Ok((lsn(&m.start_lsn)?, lsn(&m.stop_lsn)?))
}

/// The timelines recovery from a backup goes through, oldest first, with the segment number
/// where each begins (the segment holding its parent's switchpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelinePath {
    /// The timeline recovery ends on.
    pub target: u32,
    /// `(timeline, first segment number)`; the first is the backup's timeline, from 0.
    pub steps: Vec<(u32, u64)>,
}

impl TimelinePath {
    /// The timeline whose file holds segment number `segno` on this path.
    pub fn timeline_of(&self, segno: u64) -> u32 {
        self.steps
            .iter()
            .rev()
            .find(|(_, begin)| *begin <= segno)
            .map(|(t, _)| *t)
            .unwrap_or(self.steps[0].0)
    }

    /// The file PostgreSQL reads for segment number `segno`.
    pub fn segment(&self, segno: u64, seg_size: u32) -> WalSegmentName {
        WalSegmentName::from_segno(segno, self.timeline_of(segno), seg_size)
    }
}

/// Resolves the target timeline of a recovery from `backup` and the path to it, from the
/// history files in `histories` (timeline -> parsed history). Exit 15 for a timeline that
/// does not descend from the backup's, or forked from it before the backup's end; 16 for a
/// timeline the archive has no history file of.
pub fn timeline_path(
    backup: &BackupManifest,
    requested: Option<TargetTimeline>,
    histories: &BTreeMap<u32, TimelineHistory>,
    seg_size: u32,
) -> Result<TimelinePath> {
    let (_, stop) = stop_of(backup)?;
    let b = backup.timeline;
    let target = match requested {
        Some(TargetTimeline::Current) => b,
        Some(TargetTimeline::Id(n)) => n,
        // PostgreSQL's findNewestTimeLine: history files probed one by one from the backup's
        // timeline up.
        None | Some(TargetTimeline::Latest) => {
            let mut t = b;
            while histories.contains_key(&(t + 1)) {
                t += 1;
            }
            t
        }
    };
    if target == b {
        return Ok(TimelinePath {
            target,
            steps: vec![(b, 0)],
        });
    }
    let forked_hint = format!(
        "was timeline {target} created by promoting a restored copy or a standby by accident, or was the backup taken after timeline {target} began? \
         Restore with --target-timeline current to stay on timeline {b}, or choose a backup of timeline {target}'s own history"
    );
    if target < b {
        return Err(Error::with_hint(
            ErrorKind::ClusterMismatch,
            format!(
                "target timeline {target} is older than timeline {b} of backup {}: recovery cannot go back to it",
                backup.id
            ),
            forked_hint,
        ));
    }
    let Some(h) = histories.get(&target) else {
        return Err(Error::with_hint(
            ErrorKind::TargetUnreachable,
            format!("target timeline {target} has no history file ({target:08X}.history) in the archive"),
            "`pgkeep verify` lists the archived timelines; --target-timeline current stays on the backup's timeline",
        ));
    };
    let Some(i) = h.entries.iter().position(|e| e.timeline == b) else {
        let line: Vec<String> = h.timelines().iter().map(|t| t.to_string()).collect();
        return Err(Error::with_hint(
            ErrorKind::ClusterMismatch,
            format!(
                "target timeline {target} does not descend from timeline {b} of backup {} (its history is timeline {})",
                backup.id,
                line.join(" -> ")
            ),
            forked_hint,
        ));
    };
    let switchpoint = h.entries[i].switchpoint;
    if switchpoint < stop {
        return Err(Error::with_hint(
            ErrorKind::ClusterMismatch,
            format!(
                "target timeline {target} forked from timeline {b} at {switchpoint}, before the end of backup {} ({stop}): recovery from this backup cannot follow it",
                backup.id
            ),
            forked_hint,
        ));
    }
    let seg = |l: Lsn| l.0 / seg_size as u64;
    let mut steps = vec![(b, 0)];
    for j in i + 1..h.entries.len() {
        steps.push((h.entries[j].timeline, seg(h.entries[j - 1].switchpoint)));
    }
    steps.push((target, seg(h.entries.last().expect("entry").switchpoint)));
    Ok(TimelinePath { target, steps })
}

/// What recovery from one backup can read, along one timeline path.
#[derive(Debug, Clone)]
pub struct Window {
    /// The path.
    pub path: TimelinePath,
    /// The backup's start LSN: where replay begins.
    pub start: Lsn,
    /// The backup's stop LSN: the earliest target.
    pub stop: Lsn,
    /// End of the last segment reachable without a gap (at least `stop`).
    pub end: Lsn,
    /// Segments from the backup's start to its stop (exclusive of the one holding `stop`).
    pub before: Vec<WalSegmentName>,
    /// Segments from the one holding `stop` to the end of the window.
    pub after: Vec<WalSegmentName>,
    /// The first missing segment, when the archive goes on after it.
    pub gap: Option<WalSegmentName>,
}

impl Window {
    fn lsn_text(&self) -> String {
        let gap = self
            .gap
            .map(|g| format!(", cut short by the missing segment {g}"))
            .unwrap_or_default();
        format!("{} to {}{gap}", self.stop, self.end)
    }
}

/// Where recovery to the end of the archive stops: what `restore` says before writing
/// anything when no target is given (everything committed after `last_xact_time` is lost).
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveEnd {
    /// The timeline recovery ends on.
    pub timeline: u32,
    /// The first segment replay reads (the one holding the backup's start).
    pub first_segment: String,
    /// The segment holding the backup's stop LSN.
    pub backup_end_segment: String,
    /// The last segment recovery can read from the archive without a gap; `None` when the
    /// archive holds nothing from the backup's end on.
    pub last_segment: Option<String>,
    /// Archived segments from the one holding the backup's stop to the end.
    pub segments: u64,
    /// The end of the WAL recovery can reach.
    pub end_lsn: String,
    /// The last transaction end (commit or abort) in that WAL after the backup's stop, from
    /// the segment summaries; `None` when none ended there or the WAL format is not read.
    pub last_xact_time: Option<DateTime<Utc>>,
    /// False when the backup's WAL format is not one pgkeep reads (no transaction times).
    pub xact_times_known: bool,
    /// The missing segment that cuts the archive short, when the archive goes on after it.
    pub gap: Option<String>,
    /// With a gap: the newest archived segment on the path past it, and the last transaction
    /// end in that segment (what the gap costs).
    pub archived_past_gap: Option<String>,
    /// Transaction end in `archived_past_gap`.
    pub last_xact_time_past_gap: Option<DateTime<Utc>>,
}

impl ArchiveEnd {
    /// One line for humans: the end, and what lies past it.
    pub fn describe(&self) -> String {
        let when = match (self.last_xact_time, self.xact_times_known) {
            (Some(t), _) => format!("last transaction ended {}", time_text(t)),
            (None, true) => "no transaction ended after the backup".to_string(),
            (None, false) => "transaction times unknown for this WAL format".to_string(),
        };
        let last = match &self.last_segment {
            Some(s) => format!("last archived segment {s}"),
            None => "no archived WAL after the backup".to_string(),
        };
        let mut text = format!(
            "recovery ends at {} on timeline {} ({last}, {when})",
            self.end_lsn, self.timeline
        );
        if let Some(g) = &self.gap {
            text.push_str(&format!(
                "; this is a GAP, not the end of the archive: segment {g} is missing"
            ));
            if let Some(p) = &self.archived_past_gap {
                text.push_str(&format!(" and the archive goes on to {p}"));
                if let Some(t) = self.last_xact_time_past_gap {
                    text.push_str(&format!(" (transactions until {})", time_text(t)));
                }
            }
        }
        text
    }
}

/// The archive of one cluster as point-in-time recovery reads it: which segments exist, the
/// timeline histories, and the segment summaries read so far (kept for the run).
pub struct ArchiveReach<'r> {
    repo: &'r Repository,
    cluster: String,
    present: HashSet<WalSegmentName>,
    histories: BTreeMap<u32, TimelineHistory>,
    summaries: Mutex<HashMap<WalSegmentName, Arc<SegmentSummary>>>,
    events: Mutex<HashMap<WalSegmentName, Arc<Vec<WalEvent>>>>,
}

impl<'r> ArchiveReach<'r> {
    /// Lists the archive and reads every history file (one list call, one read per timeline).
    pub async fn load(repo: &'r Repository, cluster: &str) -> Result<Self> {
        let listing = list_archive(repo, cluster).await?;
        let mut histories = BTreeMap::new();
        for &tli in &listing.histories {
            let Some(text) = fetch(repo, cluster, &WalFileName::History(tli)).await? else {
                continue;
            };
            let h = TimelineHistory::parse(tli, &String::from_utf8_lossy(&text)).map_err(|e| {
                Error::new(
                    ErrorKind::Integrity,
                    format!("history file of timeline {tli} in the archive of {cluster}: {e}"),
                )
            })?;
            histories.insert(tli, h);
        }
        Ok(ArchiveReach {
            repo,
            cluster: cluster.to_string(),
            present: listing.segments.into_iter().collect(),
            histories,
            summaries: Mutex::new(HashMap::new()),
            events: Mutex::new(HashMap::new()),
        })
    }

    /// The window of recovery from `m` towards the requested timeline.
    pub fn window(&self, m: &BackupManifest, timeline: Option<TargetTimeline>) -> Result<Window> {
        let (start, stop) = stop_of(m)?;
        let seg_size = m.wal_segment_size;
        let path = timeline_path(m, timeline, &self.histories, seg_size)?;
        let start_seg = start.0 / seg_size as u64;
        let first = stop.0 / seg_size as u64;
        let mut n = first;
        while self.present.contains(&path.segment(n, seg_size)) {
            n += 1;
        }
        let end = if n == first {
            stop
        } else {
            Lsn((n * seg_size as u64).max(stop.0))
        };
        let gap = self
            .present
            .iter()
            .any(|s| {
                let k = s.segno(seg_size);
                k > n && path.timeline_of(k) == s.timeline
            })
            .then(|| path.segment(n, seg_size));
        Ok(Window {
            start,
            stop,
            end,
            before: (start_seg..first)
                .map(|k| path.segment(k, seg_size))
                .collect(),
            after: (first..n).map(|k| path.segment(k, seg_size)).collect(),
            gap,
            path,
        })
    }

    /// Where recovery from `m` to the end of the archive stops along the requested timeline
    /// (exit 15 for a timeline that forked before the backup's end, 16 for one without a
    /// history file). Reads the summaries of the last segments.
    pub async fn end(
        &self,
        m: &BackupManifest,
        timeline: Option<TargetTimeline>,
    ) -> Result<ArchiveEnd> {
        let w = self.window(m, timeline)?;
        let seg_size = m.wal_segment_size;
        let known = Self::content_readable(m);
        let last_xact_time = if known {
            self.latest_xact_end(m, &w, None)
                .await?
                .and_then(|t| DateTime::from_timestamp_micros(pg_time_to_unix_micros(t)))
        } else {
            None
        };
        let (mut past, mut past_time) = (None, None);
        if w.gap.is_some() {
            let end_seg = w.end.0 / seg_size as u64;
            past = self
                .present
                .iter()
                .filter(|s| {
                    let k = s.segno(seg_size);
                    k > end_seg && w.path.timeline_of(k) == s.timeline
                })
                .max_by_key(|s| s.segno(seg_size))
                .copied();
            if let (Some(p), true) = (past, known) {
                past_time = self
                    .summary(m, p)
                    .await?
                    .max_xact_time
                    .and_then(|t| DateTime::from_timestamp_micros(pg_time_to_unix_micros(t)));
            }
        }
        Ok(ArchiveEnd {
            timeline: w.path.target,
            first_segment: w
                .path
                .segment(w.start.0 / seg_size as u64, seg_size)
                .to_string(),
            backup_end_segment: w
                .path
                .segment(w.stop.0 / seg_size as u64, seg_size)
                .to_string(),
            last_segment: w.after.last().map(|s| s.to_string()),
            segments: w.after.len() as u64,
            end_lsn: w.end.to_string(),
            last_xact_time,
            xact_times_known: known,
            gap: w.gap.map(|g| g.to_string()),
            archived_past_gap: past.map(|s| s.to_string()),
            last_xact_time_past_gap: past_time,
        })
    }

    /// A segment's bytes: from the archive, else from the backup's own WAL.
    async fn segment_bytes(&self, m: &BackupManifest, seg: WalSegmentName) -> Result<Vec<u8>> {
        if let Some(d) = fetch(self.repo, &self.cluster, &WalFileName::Segment(seg)).await? {
            return Ok(d);
        }
        let name = seg.to_string();
        let Some(w) = m.wal.iter().find(|w| w.name == name) else {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "WAL segment {seg} is neither in the archive of {} nor in backup {}",
                    self.cluster, m.id
                ),
            ));
        };
        let mut out = Vec::with_capacity(w.size as usize);
        self.repo.read_stream(&w.stream, &mut out).await?;
        out.resize(w.size as usize, 0);
        Ok(out)
    }

    async fn summary(
        &self,
        m: &BackupManifest,
        seg: WalSegmentName,
    ) -> Result<Arc<SegmentSummary>> {
        if let Some(s) = self.summaries.lock().unwrap().get(&seg) {
            return Ok(s.clone());
        }
        let s = match segment_summary(self.repo, &self.cluster, &seg).await? {
            Some(s) => s,
            None => summarize_bytes(&self.segment_bytes(m, seg).await?, &seg)?,
        };
        let s = Arc::new(s);
        self.summaries.lock().unwrap().insert(seg, s.clone());
        Ok(s)
    }

    /// Every event of a segment with its LSN (the summary keeps xids without positions).
    async fn events(&self, m: &BackupManifest, seg: WalSegmentName) -> Result<Arc<Vec<WalEvent>>> {
        if let Some(e) = self.events.lock().unwrap().get(&seg) {
            return Ok(e.clone());
        }
        let data = self.segment_bytes(m, seg).await?;
        let scan = scan_segment(&data, std::path::Path::new(&seg.to_string())).map_err(|e| {
            Error::new(
                ErrorKind::Failure,
                format!("reading WAL segment {seg}: {e}"),
            )
        })?;
        let e = Arc::new(scan.events);
        self.events.lock().unwrap().insert(seg, e.clone());
        Ok(e)
    }

    /// Summaries of `segs[lo..hi]` and of the segment after it (for the record split across
    /// the boundary), read in parallel.
    async fn batch(
        &self,
        m: &BackupManifest,
        segs: &[WalSegmentName],
        lo: usize,
        hi: usize,
    ) -> Result<Vec<Arc<SegmentSummary>>> {
        let upto = (hi + 1).min(segs.len());
        stream::iter(segs[lo..upto].iter().copied())
            .map(|s| self.summary(m, s))
            .buffered(PARALLEL_READS)
            .try_collect()
            .await
    }

    /// The record split between `a` and the segment after it, when it is an event.
    fn joined(a: &SegmentSummary, b: Option<&Arc<SegmentSummary>>) -> Option<WalEvent> {
        join_split(a.tail.as_ref()?, b?.head.as_ref()?, a.pg_major)
    }

    /// Checks `pitr`'s target against what `m` and the archive reach. `Ok` when reachable;
    /// exit 16 (the window in the message) when not, 15 for an unreachable timeline.
    pub async fn check(&self, m: &BackupManifest, pitr: &PitrOptions) -> Result<()> {
        let w = self.window(m, pitr.timeline)?;
        match &pitr.target {
            RecoveryTarget::Lsn(l) => {
                if *l < w.stop {
                    return Err(unreachable(
                        format!(
                            "recovery target LSN {l} is before the end of backup {} ({})",
                            m.id, w.stop
                        ),
                        Some(w.lsn_text()),
                        "choose an older backup (or `latest`, which picks one), or a later target",
                    ));
                }
                if *l > w.end {
                    return Err(unreachable(
                        format!("recovery target LSN {l} is past the archived WAL"),
                        Some(w.lsn_text()),
                        "latest reachable is the end of the window; check `pgkeep verify` for gaps",
                    ));
                }
                Ok(())
            }
            RecoveryTarget::Time(t) => self.check_time(m, &w, parse_target_time(t)?).await,
            RecoveryTarget::Xid(x) => self.check_xid(m, &w, target_xid(x)?).await,
            RecoveryTarget::Name(n) => self.check_name(m, &w, n).await,
            RecoveryTarget::End | RecoveryTarget::Immediate => Ok(()),
        }
    }

    fn content_readable(m: &BackupManifest) -> bool {
        pgkeep_pg::walrecords::reads_records_of(m.pg_major)
    }

    async fn check_time(&self, m: &BackupManifest, w: &Window, t: DateTime<Utc>) -> Result<()> {
        if t < m.stop_time {
            return Err(unreachable(
                format!(
                    "recovery target time {} is before the end of backup {} ({})",
                    time_text(t),
                    m.id,
                    time_text(m.stop_time)
                ),
                Some(w.lsn_text()),
                "choose an older backup (or `latest`, which picks one), or a later target",
            ));
        }
        if !Self::content_readable(m) {
            return Ok(());
        }
        let target = unix_micros_to_pg_time(t.timestamp_micros());
        let latest = self.latest_xact_end(m, w, Some(target)).await?;
        if latest.is_some_and(|l| l > target) {
            return Ok(());
        }
        let window = match latest {
            Some(l) => format!(
                "{} to {}, the last transaction end in the archived WAL; WAL {}",
                time_text(m.stop_time),
                pg_time_text(l),
                w.lsn_text()
            ),
            None => format!(
                "no transaction ended in the archived WAL after its end; WAL {}",
                w.lsn_text()
            ),
        };
        Err(unreachable(
            format!(
                "recovery target time {} is after the last transaction end that backup {} can reach",
                time_text(t),
                m.id
            ),
            Some(window),
            "recovery stops before the first commit or abort later than the target; with none, PostgreSQL would run off the end of the archive. \
             Choose an earlier time, or check `pgkeep verify` for gaps and `pgkeep check` for archiving",
        ))
    }

    /// The latest transaction end (commit or abort) after the backup's stop LSN in the window,
    /// as a WAL `TimestampTz`. Reads summaries newest first, a batch at a time, and stops at
    /// the first batch that holds a transaction end later than `above` (with `None`: at the
    /// first batch that holds any: transaction ends follow WAL order, so later segments hold
    /// the later ones).
    async fn latest_xact_end(
        &self,
        m: &BackupManifest,
        w: &Window,
        above: Option<i64>,
    ) -> Result<Option<i64>> {
        let segs = &w.after;
        let mut latest: Option<i64> = None;
        let note = |lsn: Lsn, time: i64, latest: &mut Option<i64>| {
            if lsn >= w.stop {
                *latest = Some(latest.map_or(time, |l| l.max(time)));
            }
        };
        // Newest first: a reachable target is decided by the last segments.
        let mut hi = segs.len();
        while hi > 0 {
            let lo = hi.saturating_sub(BATCH);
            let sums = self.batch(m, segs, lo, hi).await?;
            for i in lo..hi {
                let s = &sums[i - lo];
                if i == 0 && w.stop.segment_offset(m.wal_segment_size) > 0 {
                    // The segment holding the stop LSN: only what comes after it counts.
                    if s.max_xact_time.is_some() {
                        for e in self.events(m, segs[0]).await?.iter() {
                            if let WalEvent::XactEnd(x) = e {
                                note(x.lsn, x.time, &mut latest);
                            }
                        }
                    }
                } else if let Some(mx) = s.max_xact_time {
                    note(s.end, mx, &mut latest);
                }
                if i + 1 < segs.len() {
                    if let Some(WalEvent::XactEnd(x)) = Self::joined(s, sums.get(i - lo + 1)) {
                        note(x.lsn, x.time, &mut latest);
                    }
                }
            }
            match (latest, above) {
                (Some(l), Some(a)) if l > a => return Ok(latest),
                (Some(_), None) => return Ok(latest),
                _ => {}
            }
            hi = lo;
        }
        Ok(latest)
    }

    async fn check_xid(&self, m: &BackupManifest, w: &Window, xid: u32) -> Result<()> {
        if !Self::content_readable(m) {
            return Ok(());
        }
        let all: Vec<WalSegmentName> = w.before.iter().chain(&w.after).copied().collect();
        let mut hi = all.len();
        while hi > 0 {
            let lo = hi.saturating_sub(BATCH);
            let sums = self.batch(m, &all, lo, hi).await?;
            for i in (lo..hi).rev() {
                let s = &sums[i - lo];
                let mut at = None;
                if i + 1 < all.len() {
                    if let Some(WalEvent::XactEnd(x)) = Self::joined(s, sums.get(i - lo + 1)) {
                        at = (x.xid == xid).then_some(x.lsn);
                    }
                }
                if at.is_none() && s.has_xid(xid) {
                    at = self.events(m, all[i]).await?.iter().find_map(|e| match e {
                        WalEvent::XactEnd(x) if x.xid == xid => Some(x.lsn),
                        _ => None,
                    });
                }
                let Some(lsn) = at else { continue };
                if lsn < w.stop {
                    return Err(unreachable(
                        format!(
                            "transaction {xid} ended at {lsn}, before the end of backup {} ({}): recovery would stop before the backup is consistent",
                            m.id, w.stop
                        ),
                        Some(w.lsn_text()),
                        "choose an older backup (or `latest`, which picks one)",
                    ));
                }
                return Ok(());
            }
            hi = lo;
        }
        // Not found: every summary of the window has been read; say what it holds.
        let (mut lo_x, mut hi_x, mut n) = (None::<u32>, None::<u32>, 0u64);
        for s in &w.after {
            let s = self.summary(m, *s).await?;
            if let Some((a, b)) = s.xid_span() {
                lo_x = Some(lo_x.map_or(a, |v| v.min(a)));
                hi_x = Some(hi_x.map_or(b, |v| v.max(b)));
            }
            n += s.xact_ends;
        }
        let held = match (lo_x, hi_x) {
            (Some(a), Some(b)) => format!("{n} transactions ended there, xids {a} to {b}"),
            _ => "no transaction ended there".to_string(),
        };
        Err(unreachable(
            format!(
                "transaction {xid} did not commit or abort in the WAL that backup {} can reach",
                m.id
            ),
            Some(format!("WAL {}; {held}", w.lsn_text())),
            "check the xid (txid_current() of the transaction), or whether its WAL was archived (`pgkeep verify`)",
        ))
    }

    async fn check_name(&self, m: &BackupManifest, w: &Window, name: &str) -> Result<()> {
        if !Self::content_readable(m) {
            return Ok(());
        }
        let all: Vec<WalSegmentName> = w.before.iter().chain(&w.after).copied().collect();
        let mut seen: Vec<(Lsn, i64, String)> = Vec::new();
        let mut lo = 0;
        while lo < all.len() {
            let hi = (lo + BATCH).min(all.len());
            let sums = self.batch(m, &all, lo, hi).await?;
            for i in lo..hi {
                let s = &sums[i - lo];
                let mut points: Vec<(Lsn, i64, String)> = s
                    .restore_points
                    .iter()
                    .map(|r| (r.lsn, r.time, r.name.clone()))
                    .collect();
                if i + 1 < all.len() {
                    if let Some(WalEvent::RestorePoint(r)) = Self::joined(s, sums.get(i - lo + 1)) {
                        points.push((r.lsn, r.time, r.name));
                    }
                }
                // Replay starts at the backup's start: a restore point before it is not seen.
                for (lsn, time, n) in points.into_iter().filter(|p| p.0 >= w.start) {
                    if n == name {
                        if lsn < w.stop {
                            return Err(unreachable(
                                format!(
                                    "the first restore point named {name:?} after the start of backup {} is at {lsn}, before the backup's end ({}): recovery would stop there before it is consistent",
                                    m.id, w.stop
                                ),
                                Some(w.lsn_text()),
                                "choose an older backup (or `latest`, which picks one)",
                            ));
                        }
                        return Ok(());
                    }
                    if lsn >= w.stop {
                        seen.push((lsn, time, n));
                    }
                }
            }
            lo = hi;
        }
        let listed = if seen.is_empty() {
            "no restore point there".to_string()
        } else {
            let shown: Vec<String> = seen
                .iter()
                .rev()
                .take(10)
                .rev()
                .map(|(l, t, n)| format!("{n:?} at {l} ({})", pg_time_text(*t)))
                .collect();
            format!(
                "restore points there: {}{}",
                shown.join(", "),
                if seen.len() > 10 {
                    " (the 10 latest)"
                } else {
                    ""
                }
            )
        };
        Err(unreachable(
            format!(
                "no restore point named {name:?} in the WAL that backup {} can reach",
                m.id
            ),
            Some(format!("WAL {}; {listed}", w.lsn_text())),
            "restore points are made with pg_create_restore_point(); check the name, or whether its WAL was archived (`pgkeep verify`)",
        ))
    }
}

/// Resolves `latest` for a point-in-time restore: the newest physical backup that ends
/// before the target (by stop LSN for an LSN target, by stop time for a time target, by
/// where the transaction ended or the restore point is for xid and name targets; the newest
/// backup otherwise). With an explicit `--target-timeline N`, backups that cannot reach
/// timeline N are passed over. A given id is returned as is.
pub async fn select_backup(
    repo: &Repository,
    cluster: &str,
    id: &str,
    pitr: &PitrOptions,
) -> Result<String> {
    if id != "latest" {
        return Ok(id.to_string());
    }
    let mut backups: Vec<BackupManifest> = Vec::new();
    for (h, v) in manifest::load_headers(repo, cluster).await? {
        if h.kind == KIND_PHYSICAL {
            backups.push(BackupManifest::from_value(v)?);
        }
    }
    backups.sort_by(|a, b| a.stop_time.cmp(&b.stop_time).then(a.id.cmp(&b.id)));
    let Some(oldest) = backups.first().cloned() else {
        return Err(Error::with_hint(
            ErrorKind::Failure,
            format!("cluster {cluster} has no physical backup in this repository"),
            "take one with `pgkeep backup`, or check --cluster",
        ));
    };
    let reach = ArchiveReach::load(repo, cluster).await?;
    let explicit_timeline = matches!(pitr.timeline, Some(TargetTimeline::Id(_)));
    let mut first_error: Option<Error> = None;
    for m in backups.iter().rev() {
        if explicit_timeline {
            match reach.window(m, pitr.timeline) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::ClusterMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        let fits = match &pitr.target {
            RecoveryTarget::Lsn(l) => m.stop_lsn.parse::<Lsn>().is_ok_and(|s| s <= *l),
            RecoveryTarget::Time(t) => parse_target_time(t).is_ok_and(|t| m.stop_time <= t),
            RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => match reach.check(m, pitr).await {
                Ok(()) => true,
                // Maybe before this backup's end: an older one may reach it.
                Err(e) if e.kind() == ErrorKind::TargetUnreachable => {
                    first_error.get_or_insert(e);
                    false
                }
                Err(e) => return Err(e),
            },
            RecoveryTarget::End | RecoveryTarget::Immediate => true,
        };
        if fits {
            return Ok(m.id.clone());
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Err(unreachable(
        format!(
            "no backup of cluster {cluster} ends before the recovery target{}; the oldest, {}, ends at {} ({})",
            match pitr.timeline {
                Some(TargetTimeline::Id(n)) => format!(" on the way to timeline {n}"),
                _ => String::new(),
            },
            oldest.id,
            oldest.stop_lsn,
            time_text(oldest.stop_time)
        ),
        None,
        "a target before the oldest backup's end cannot be reached",
    ))
}

/// Checks the target against what backup `m` and the archive can reach (exit 16 with the
/// window when it cannot be reached, 15 for a timeline it cannot follow). Reads only.
pub async fn preflight(
    repo: &Repository,
    cluster: &str,
    m: &BackupManifest,
    pitr: &PitrOptions,
) -> Result<()> {
    ArchiveReach::load(repo, cluster)
        .await?
        .check(m, pitr)
        .await
}

/// The recovery configuration to write into the restored data directory.
pub fn recovery_config(pitr: &PitrOptions) -> Result<RecoveryConfig> {
    let target = match &pitr.target {
        // Normalised so PostgreSQL reads exactly the instant that was checked.
        RecoveryTarget::Time(t) => RecoveryTarget::Time(
            parse_target_time(t)?
                .format("%Y-%m-%d %H:%M:%S%.6f+00")
                .to_string(),
        ),
        other => other.clone(),
    };
    Ok(RecoveryConfig {
        mode: if pitr.standby {
            RecoveryMode::Standby
        } else {
            RecoveryMode::Recovery
        },
        primary_conninfo: pitr.primary_conninfo.clone(),
        restore_command: Some(pitr.restore_command.clone()),
        target,
        inclusive: None,
        action: pitr.action,
        timeline: pitr.timeline,
    })
}

/// Writes `recovery.signal` and the settings (the last step of a restore).
pub fn write_recovery(pgdata: &std::path::Path, pitr: &PitrOptions) -> Result<()> {
    recovery_config(pitr)?
        .write(pgdata)
        .map_err(|e| Error::new(ErrorKind::Failure, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_times() {
        let want = DateTime::parse_from_rfc3339("2026-11-22T14:31:07.52Z")
            .unwrap()
            .with_timezone(&Utc);
        for s in [
            "2026-11-22 14:31:07.52+00",
            "2026-11-22 15:31:07.52+01",
            "2026-11-22 16:01:07.52+01:30",
            "2026-11-22T14:31:07.52Z",
            "2026-11-22T14:31:07.52+00:00",
        ] {
            assert_eq!(parse_target_time(s).unwrap(), want, "{s}");
        }
        let e = parse_target_time("2026-11-22 14:31:07").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let c = recovery_config(&PitrOptions {
            target: RecoveryTarget::Time("2026-11-22 15:31:07.52+01".into()),
            action: Some(TargetAction::Promote),
            timeline: None,
            restore_command: "pgkeep archive-get %f %p".into(),
            standby: false,
            primary_conninfo: None,
        })
        .unwrap();
        assert_eq!(
            c.target,
            RecoveryTarget::Time("2026-11-22 14:31:07.520000+00".into())
        );
    }
}
