//! `pgkeep verify [--read-data]`: can the backups be restored, and to which points in time?
//!
//! Lists the WAL archive per timeline and finds the gaps between the oldest physical
//! backup's start segment (or the timeline's first segment) and the newest archived segment.
//! Each gap is reported as a range with the backups whose point-in-time-recovery window it
//! cuts short. Every backup stores the WAL from its start to its stop, so a gap inside that
//! range does not make a backup unrestorable; a gap after its stop ends its PITR window.
//!
//! It also runs the repository's structural check (every pack an index names exists, every
//! blob a manifest names is indexed), so a backup with a missing pack is reported damaged.
//! `--read-data` makes that check read and verify every byte, and also reads and
//! authenticates every archived WAL file (segment headers must name their segment and carry
//! the cluster's identity).
//!
//! Exit 13 when a gap breaks a backup's window or anything fails verification; 3 when gaps
//! break nothing (warnings); else 0.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use futures::stream::{self, StreamExt};
use pgkeep_pg::wal::{WalFileName, WalPageHeader, WalSegmentName};
use pgkeep_pg::{Lsn, TimelineHistory};
use pgkeep_repo::{CheckOptions, Repository};
use serde::{Deserialize, Serialize};

use crate::commands::archive::{fetch, list_archive, load_identity, ArchiveListing};
use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{self, BackupManifest, KIND_PHYSICAL};

/// Options of `pgkeep verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct VerifyOptions {
    /// Also read and verify every byte of every backup and archived WAL file.
    #[cfg_attr(feature = "clap", arg(long))]
    pub read_data: bool,
    /// Also run the repository's structural check without reading data: every pack an index
    /// names exists, every blob a manifest names is indexed. `pgkeep verify` always sets it
    /// (a backup with a missing pack cannot be restored, whatever the archive holds); the
    /// health `check`, which must stay fast, does not. Needs a repository opened with its
    /// index.
    #[cfg_attr(feature = "clap", arg(skip))]
    #[serde(default)]
    pub structure: bool,
}

/// A run of missing segments on one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalGap {
    /// Timeline.
    pub timeline: u32,
    /// First missing segment.
    pub first: String,
    /// Last missing segment.
    pub last: String,
    /// Number of missing segments.
    pub count: u64,
    /// Backups whose recovery window this gap ends (ids).
    pub breaks: Vec<String>,
}

/// One line, as `check` and `verify` print it.
impl fmt::Display for WalGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GAP on timeline {}: {} .. {} ({} segment{} missing)",
            self.timeline,
            self.first,
            self.last,
            self.count,
            if self.count == 1 { "" } else { "s" }
        )?;
        if self.breaks.is_empty() {
            write!(f, "; breaks no backup's recovery window")
        } else {
            write!(
                f,
                "; breaks point-in-time recovery of {}",
                self.breaks.join(", ")
            )
        }
    }
}

/// One physical backup and how far recovery from it can go with the archive as it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupWindow {
    /// Backup id.
    pub id: String,
    /// Timeline of its start.
    pub timeline: u32,
    /// Start LSN.
    pub start_lsn: String,
    /// Stop LSN: the earliest recovery target it reaches.
    pub stop_lsn: String,
    /// How far its WAL reaches on its own timeline without a gap: the end of the last
    /// contiguous archived segment after its stop (at least the stop LSN).
    pub reachable_until: String,
    /// The first gap after its stop, if any (`first..last` on the timeline).
    pub broken_by: Option<String>,
    /// Its data failed verification (a missing pack; with `--read-data` also a damaged
    /// chunk), so it cannot be restored whatever the archive holds.
    pub damaged: bool,
}

/// The archive of one timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineSummary {
    /// Timeline.
    pub timeline: u32,
    /// First segment considered (oldest backup start, timeline start or first archived).
    pub first: Option<String>,
    /// Newest archived segment.
    pub last: Option<String>,
    /// Archived segments (complete ones).
    pub segments: usize,
    /// Whether a `.partial` segment closes it.
    pub partial: bool,
    /// Whether its history file is archived (timelines > 1).
    pub history: bool,
}

/// What `pgkeep verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Cluster name.
    pub cluster: String,
    /// WAL segment size used for the computation.
    pub wal_segment_size: u32,
    /// Per timeline.
    pub timelines: Vec<TimelineSummary>,
    /// Gaps, by timeline and position.
    pub gaps: Vec<WalGap>,
    /// Physical backups, oldest first, with their recovery windows.
    pub backups: Vec<BackupWindow>,
    /// With `--read-data`: archived WAL files read and verified.
    pub wal_files_read: Option<usize>,
    /// With `--read-data`: problems with archived WAL files.
    pub wal_problems: Vec<String>,
    /// With `--read-data`: the repository check.
    pub repository: Option<pgkeep_repo::CheckReport>,
    /// Things worth knowing that break nothing.
    pub warnings: Vec<String>,
}

impl VerifyReport {
    /// Gaps that end at least one backup's recovery window.
    pub fn breaking_gaps(&self) -> impl Iterator<Item = &WalGap> {
        self.gaps.iter().filter(|g| !g.breaks.is_empty())
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cluster {}", self.cluster)?;
        for t in &self.timelines {
            writeln!(
                f,
                "timeline {}: {} segments archived, {} .. {}{}",
                t.timeline,
                t.segments,
                t.first.as_deref().unwrap_or("-"),
                t.last.as_deref().unwrap_or("-"),
                if t.partial { " (+ .partial)" } else { "" }
            )?;
        }
        for g in &self.gaps {
            writeln!(f, "{g}")?;
        }
        for b in &self.backups {
            if b.damaged {
                writeln!(
                    f,
                    "backup {} (timeline {}): DAMAGED: its data fails verification and it cannot \
                     be restored (see the repository problems below)",
                    b.id, b.timeline
                )?;
                continue;
            }
            write!(
                f,
                "backup {} (timeline {}): recoverable from {} to {}",
                b.id, b.timeline, b.stop_lsn, b.reachable_until
            )?;
            match &b.broken_by {
                Some(g) => writeln!(f, ", cut short by the gap {g}")?,
                None => writeln!(f)?,
            }
        }
        if let Some(n) = self.wal_files_read {
            writeln!(f, "{n} archived WAL files read and verified")?;
        }
        for p in &self.wal_problems {
            writeln!(f, "WAL PROBLEM: {p}")?;
        }
        if let Some(r) = &self.repository {
            for p in &r.problems {
                writeln!(f, "REPOSITORY PROBLEM: {}: {}", p.object, p.message)?;
            }
            writeln!(
                f,
                "repository check: {} manifests, {} packs, {} blobs, {} bytes read: {}",
                r.manifests,
                r.packs,
                r.blobs,
                r.bytes_read,
                if r.is_ok() { "ok" } else { "DAMAGED" }
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if self.failure().is_none() {
            writeln!(f, "verify: ok")?;
        }
        Ok(())
    }
}

impl Report for VerifyReport {
    fn failure(&self) -> Option<Error> {
        let mut parts = Vec::new();
        let breaking: Vec<String> = self
            .breaking_gaps()
            .map(|g| format!("{}..{}", g.first, g.last))
            .collect();
        if !breaking.is_empty() {
            parts.push(format!(
                "WAL archive gap(s) {} break point-in-time recovery",
                breaking.join(", ")
            ));
        }
        if !self.wal_problems.is_empty() {
            parts.push(format!(
                "{} archived WAL file(s) failed verification",
                self.wal_problems.len()
            ));
        }
        if let Some(r) = &self.repository {
            if !r.is_ok() {
                parts.push(format!(
                    "the repository check found {} problem(s)",
                    r.problems.len()
                ));
            }
        }
        let wal_hint = !breaking.is_empty() || !self.wal_problems.is_empty();
        (!parts.is_empty()).then(|| {
            Error::with_hint(
                ErrorKind::Integrity,
                format!("verify of cluster {}: {}", self.cluster, parts.join("; ")),
                if wal_hint {
                    "a missing segment cannot be recreated unless pg_wal still holds it: take a new backup to start a clean recovery window"
                } else {
                    "a damaged backup cannot be repaired: take a new backup now, and find what removed or changed the repository's files (`pgkeep repo check --read-data` lists them)"
                },
            )
        })
    }

    fn has_warnings(&self) -> bool {
        !self.warnings.is_empty() || self.gaps.iter().any(|g| g.breaks.is_empty())
    }
}

/// A physical backup reduced to what the WAL analysis needs.
#[derive(Debug, Clone)]
pub struct BackupSpan {
    /// Backup id.
    pub id: String,
    /// Timeline of its start.
    pub timeline: u32,
    /// Start LSN.
    pub start: Lsn,
    /// Stop LSN.
    pub stop: Lsn,
}

impl BackupSpan {
    fn from_manifest(m: &BackupManifest) -> Result<Self> {
        let lsn = |s: &str| {
            s.parse::<Lsn>().map_err(|e| {
                Error::new(
                    ErrorKind::Integrity,
                    format!("backup {}: bad LSN {s:?}: {e}", m.id),
                )
            })
        };
        Ok(BackupSpan {
            id: m.id.clone(),
            timeline: m.timeline,
            start: lsn(&m.start_lsn)?,
            stop: lsn(&m.stop_lsn)?,
        })
    }
}

/// The gap analysis, separated from I/O so it can be tested on its own: `listing` is the
/// archive, `backups` the physical backups, `starts` where timelines > 1 begin (from their
/// history files).
pub fn analyse(
    listing: &ArchiveListing,
    backups: &[BackupSpan],
    starts: &BTreeMap<u32, Lsn>,
    seg_size: u32,
) -> (Vec<TimelineSummary>, Vec<WalGap>, Vec<BackupWindow>) {
    let mut present: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for s in &listing.segments {
        present
            .entry(s.timeline)
            .or_default()
            .insert(s.segno(seg_size));
    }
    let mut partial: BTreeMap<u32, u64> = BTreeMap::new();
    for s in &listing.partials {
        partial.insert(s.timeline, s.segno(seg_size));
    }
    let mut timelines: BTreeSet<u32> = present.keys().copied().collect();
    timelines.extend(backups.iter().map(|b| b.timeline));
    timelines.extend(partial.keys().copied());

    let name = |tli: u32, segno: u64| WalSegmentName::from_segno(segno, tli, seg_size).to_string();
    let mut summaries = Vec::new();
    let mut gaps = Vec::new();
    for &tli in &timelines {
        let have = present.get(&tli).cloned().unwrap_or_default();
        let has = |n: u64| have.contains(&n) || partial.get(&tli) == Some(&n);
        let mut first = have.iter().next().copied();
        let oldest_backup = backups
            .iter()
            .filter(|b| b.timeline == tli)
            .map(|b| b.start.0 / seg_size as u64)
            .min();
        if let Some(b) = oldest_backup {
            first = Some(first.map_or(b, |f| f.min(b)));
        }
        if let Some(start) = starts.get(&tli) {
            let s = start.0 / seg_size as u64;
            first = Some(first.map_or(s, |f| f.min(s)));
        }
        let last = have
            .iter()
            .next_back()
            .copied()
            .max(partial.get(&tli).copied());
        summaries.push(TimelineSummary {
            timeline: tli,
            first: first.map(|n| name(tli, n)),
            last: last.map(|n| name(tli, n)),
            segments: have.len(),
            partial: partial.contains_key(&tli),
            history: tli == 1 || listing.histories.contains(&tli),
        });
        let (Some(first), Some(last)) = (first, last) else {
            continue;
        };
        let mut n = first;
        while n <= last {
            if has(n) {
                n += 1;
                continue;
            }
            let a = n;
            while n <= last && !has(n) {
                n += 1;
            }
            let b = n - 1;
            // A gap ends the window of a backup on this timeline when it holds a segment
            // after the backup's stop segment (up to it, the backup carries its own WAL),
            // and of every backup on an earlier timeline (recovery into this one crosses it).
            let breaks = backups
                .iter()
                .filter(|bk| {
                    if bk.timeline == tli {
                        let stop_seg =
                            WalSegmentName::from_end_lsn(bk.stop, tli, seg_size).segno(seg_size);
                        b > stop_seg
                    } else {
                        bk.timeline < tli
                    }
                })
                .map(|bk| bk.id.clone())
                .collect();
            gaps.push(WalGap {
                timeline: tli,
                first: name(tli, a),
                last: name(tli, b),
                count: b - a + 1,
                breaks,
            });
        }
    }

    let windows = backups
        .iter()
        .map(|bk| {
            let have = present.get(&bk.timeline).cloned().unwrap_or_default();
            let stop_seg =
                WalSegmentName::from_end_lsn(bk.stop, bk.timeline, seg_size).segno(seg_size);
            let mut n = stop_seg + 1;
            while have.contains(&n) {
                n += 1;
            }
            let reach = if n == stop_seg + 1 {
                bk.stop
            } else {
                Lsn(n * seg_size as u64)
            };
            // The first gap after the stop on the backup's timeline (a missing segment
            // before the newest archived one).
            let newest = have.iter().next_back().copied();
            let broken_by = gaps
                .iter()
                .find(|g| {
                    let segno = |s: &str| {
                        s.parse::<WalSegmentName>()
                            .map(|w| w.segno(seg_size))
                            .unwrap_or(0)
                    };
                    g.timeline == bk.timeline
                        && newest.is_some_and(|l| n < l)
                        && (segno(&g.first)..=segno(&g.last)).contains(&n)
                })
                .map(|g| format!("{}..{}", g.first, g.last));
            BackupWindow {
                id: bk.id.clone(),
                timeline: bk.timeline,
                start_lsn: bk.start.to_string(),
                stop_lsn: bk.stop.to_string(),
                reachable_until: reach.to_string(),
                broken_by,
                damaged: false,
            }
        })
        .collect();
    (summaries, gaps, windows)
}

/// The WAL window a physical backup can recover to with the archive as it is now: from its
/// stop LSN (the earliest consistent point) to the end of the last archived segment that
/// follows it without a gap on its timeline (the backup's own WAL covers start to stop). A
/// point-in-time restore should refuse targets outside it (exit 16) and print it.
pub async fn recovery_window(
    repo: &Repository,
    cluster: &str,
    backup: &BackupManifest,
) -> Result<(Lsn, Lsn)> {
    let listing = list_archive(repo, cluster).await?;
    let span = BackupSpan::from_manifest(backup)?;
    let (_, _, windows) = analyse(
        &listing,
        std::slice::from_ref(&span),
        &BTreeMap::new(),
        backup.wal_segment_size,
    );
    let end: Lsn = windows[0]
        .reachable_until
        .parse()
        .map_err(|e| Error::new(ErrorKind::Failure, format!("reachable LSN: {e}")))?;
    Ok((span.stop, end))
}

/// `pgkeep verify`.
pub async fn verify(ctx: &Context, opts: &VerifyOptions) -> Result<VerifyReport> {
    let cluster = ctx.settings.cluster.name.clone();
    // With the index: the structural check compares it with the packs and manifests.
    let repo = ctx.open_repository().await?;
    let opts = VerifyOptions {
        structure: true,
        ..opts.clone()
    };
    verify_repository(&repo, &cluster, &opts).await
}

/// Library form of `pgkeep verify` on an open repository (open it with the index when
/// `read_data` is set).
pub async fn verify_repository(
    repo: &Repository,
    cluster: &str,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let identity = load_identity(repo, cluster).await?;
    let listing = list_archive(repo, cluster).await?;
    let mut backups = Vec::new();
    let mut seg_size = identity.as_ref().map(|i| i.wal_segment_size);
    for (h, v) in manifest::load_headers(repo, cluster).await? {
        if h.kind != KIND_PHYSICAL {
            continue;
        }
        let m = BackupManifest::from_value(v)?;
        seg_size.get_or_insert(m.wal_segment_size);
        backups.push(BackupSpan::from_manifest(&m)?);
    }
    let seg_size = seg_size.unwrap_or(pgkeep_pg::wal::DEFAULT_SEGMENT_SIZE);
    let mut warnings = Vec::new();

    // Where each later timeline begins, from its history file.
    let mut starts = BTreeMap::new();
    for &tli in &listing.histories {
        match fetch(repo, cluster, &WalFileName::History(tli)).await {
            Ok(Some(text)) => match TimelineHistory::parse(tli, &String::from_utf8_lossy(&text)) {
                Ok(h) => {
                    if let Some(e) = h.entries.last() {
                        starts.insert(tli, e.switchpoint);
                    }
                }
                Err(e) => warnings.push(format!("history file of timeline {tli}: {e}")),
            },
            Ok(None) => {}
            Err(e) => warnings.push(format!("history file of timeline {tli}: {e}")),
        }
    }
    let (timelines, gaps, mut windows) = analyse(&listing, &backups, &starts, seg_size);
    for t in &timelines {
        if !t.history {
            warnings.push(format!(
                "timeline {} has no history file in the archive (recovery onto it needs one)",
                t.timeline
            ));
        }
    }

    let (mut wal_files_read, mut wal_problems, mut repository) = (None, Vec::new(), None);
    if opts.read_data {
        let names: Vec<WalFileName> = listing
            .segments
            .iter()
            .map(|s| WalFileName::Segment(*s))
            .chain(listing.partials.iter().map(|s| WalFileName::Partial(*s)))
            .chain(listing.histories.iter().map(|t| WalFileName::History(*t)))
            .chain(
                listing
                    .backup_files
                    .iter()
                    .filter_map(|b| WalFileName::parse(b).ok()),
            )
            .collect();
        let total = names.len();
        let sysid = identity.as_ref().map(|i| i.system_identifier.clone());
        let results: Vec<Option<String>> = stream::iter(names)
            .map(|n| {
                let sysid = sysid.clone();
                async move {
                    match fetch(repo, cluster, &n).await {
                        Ok(Some(data)) => {
                            let is_seg =
                                matches!(n, WalFileName::Segment(_) | WalFileName::Partial(_));
                            if let (true, Some(id)) = (is_seg, sysid) {
                                match WalPageHeader::parse(
                                    &data,
                                    std::path::Path::new(&n.to_string()),
                                ) {
                                    Ok(h) if h.system_identifier.to_string() != id => {
                                        Some(format!(
                                            "{n}: system identifier {} is not the cluster's ({id})",
                                            h.system_identifier
                                        ))
                                    }
                                    Ok(_) => None,
                                    Err(e) => Some(format!("{n}: {e}")),
                                }
                            } else {
                                None
                            }
                        }
                        Ok(None) => Some(format!("{n}: listed but gone when read")),
                        Err(e) => Some(format!("{n}: {e}")),
                    }
                }
            })
            .buffer_unordered(4)
            .collect()
            .await;
        wal_problems = results.into_iter().flatten().collect();
        wal_problems.sort();
        wal_files_read = Some(total);
    }
    if opts.read_data || opts.structure {
        let check = repo
            .check(CheckOptions {
                read_data: opts.read_data,
            })
            .await?;
        for w in &mut windows {
            w.damaged = check
                .damaged_manifests
                .contains(&format!("{cluster}/{}", w.id));
        }
        repository = Some(check);
    }

    Ok(VerifyReport {
        cluster: cluster.to_string(),
        wal_segment_size: seg_size,
        timelines,
        gaps,
        backups: windows,
        wal_files_read,
        wal_problems,
        repository,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u32 = 16 << 20;

    fn seg(tli: u32, n: u64) -> WalSegmentName {
        WalSegmentName::from_segno(n, tli, SEG)
    }

    fn span(id: &str, tli: u32, start_seg: u64, stop_seg: u64) -> BackupSpan {
        BackupSpan {
            id: id.into(),
            timeline: tli,
            start: Lsn(start_seg * SEG as u64 + 0x28),
            stop: Lsn(stop_seg * SEG as u64 + 0x100),
        }
    }

    #[test]
    fn a_hole_after_a_backup_breaks_its_window_only() {
        let listing = ArchiveListing {
            segments: [2, 3, 4, 5, 7, 8, 9].iter().map(|&n| seg(1, n)).collect(),
            ..Default::default()
        };
        let backups = [span("old", 1, 2, 3), span("new", 1, 8, 8)];
        let (tls, gaps, windows) = analyse(&listing, &backups, &BTreeMap::new(), SEG);
        assert_eq!(tls.len(), 1);
        assert_eq!(
            gaps,
            vec![WalGap {
                timeline: 1,
                first: seg(1, 6).to_string(),
                last: seg(1, 6).to_string(),
                count: 1,
                breaks: vec!["old".into()],
            }]
        );
        assert_eq!(windows[0].reachable_until, "0/6000000");
        assert_eq!(
            windows[0].broken_by.as_deref(),
            Some("000000010000000000000006..000000010000000000000006")
        );
        assert_eq!(windows[1].reachable_until, "0/A000000");
        assert_eq!(windows[1].broken_by, None);
    }

    #[test]
    fn missing_start_and_backup_range_gaps() {
        // The archive starts after the backup's start: the segments up to its stop are in the
        // backup, the one after is not anywhere.
        let listing = ArchiveListing {
            segments: [6, 7].iter().map(|&n| seg(1, n)).collect(),
            ..Default::default()
        };
        let (_, gaps, _) = analyse(&listing, &[span("b", 1, 2, 4)], &BTreeMap::new(), SEG);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].first, seg(1, 2).to_string());
        assert_eq!(gaps[0].last, seg(1, 5).to_string());
        assert_eq!(gaps[0].breaks, vec!["b".to_string()]);
        // Missing only inside the backup's own range: reported, breaks nothing.
        let listing = ArchiveListing {
            segments: [2, 5, 6].iter().map(|&n| seg(1, n)).collect(),
            ..Default::default()
        };
        let (_, gaps, _) = analyse(&listing, &[span("b", 1, 2, 4)], &BTreeMap::new(), SEG);
        assert_eq!(gaps.len(), 1);
        assert!(gaps[0].breaks.is_empty());
    }

    #[test]
    fn timelines_are_separate_and_start_at_their_switchpoint() {
        let mut segments: Vec<_> = [2, 3, 4].iter().map(|&n| seg(1, n)).collect();
        segments.extend([5, 7].iter().map(|&n| seg(2, n)));
        let listing = ArchiveListing {
            segments,
            partials: vec![seg(1, 5)],
            histories: vec![2],
            ..Default::default()
        };
        let mut starts = BTreeMap::new();
        starts.insert(2, Lsn(4 * SEG as u64 + 0x500));
        let (tls, gaps, _) = analyse(&listing, &[span("b", 1, 2, 3)], &starts, SEG);
        assert_eq!(tls.len(), 2);
        assert!(tls[0].partial);
        let g: Vec<(u32, String, String)> = gaps
            .iter()
            .map(|g| (g.timeline, g.first.clone(), g.last.clone()))
            .collect();
        assert_eq!(
            g,
            vec![
                (2, seg(2, 4).to_string(), seg(2, 4).to_string()),
                (2, seg(2, 6).to_string(), seg(2, 6).to_string()),
            ]
        );
        assert_eq!(gaps[0].breaks, vec!["b".to_string()]);
    }
}
