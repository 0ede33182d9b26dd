//! `pgkeep status`: the screen a DBA reads in the morning, per cluster: newest backup and
//! dumps with ages and sizes, the recovery window, WAL lag, the last failure, the last
//! drill, repository size and growth. Reads the repository only (no server connection).

use std::fmt;

use chrono::{DateTime, Utc};
use pgkeep_repo::Repository;
use serde::Serialize;

use crate::commands::archive::open_repository_fast;
use crate::commands::pitr::ArchiveReach;
use crate::context::{Context, Report};
use crate::error::Result;
use crate::health::human_age;
use crate::health::snapshot::{self, BackupPoint, Snapshot};
use crate::history::{RunKind, RunRecord, RunResult};
use crate::manifest;
use crate::progress::human_bytes;

/// Where point-in-time recovery can go today.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoveryWindow {
    /// The earliest reachable time: the end of the oldest physical backup.
    pub earliest: Option<DateTime<Utc>>,
    /// The latest reachable time: the last transaction end in the WAL recovery from the
    /// newest backup can replay without a gap (else that backup's end).
    pub latest: Option<DateTime<Utc>>,
    /// The WAL position recovery from the newest backup reaches.
    pub latest_lsn: Option<String>,
    /// A missing segment that cuts the window short, if any.
    pub gap: Option<String>,
}

/// The recovery window of the snapshot's cluster, from what `restore` computes.
pub async fn recovery_window(repo: &Repository, snap: &Snapshot) -> Result<RecoveryWindow> {
    let mut w = RecoveryWindow {
        earliest: snap.physical.iter().find_map(|b| b.stop_time),
        ..Default::default()
    };
    let Some(newest) = snap.physical.last() else {
        return Ok(w);
    };
    w.latest = newest.stop_time;
    let m = manifest::load_physical(repo, &snap.cluster, &newest.id).await?;
    let reach = ArchiveReach::load(repo, &snap.cluster).await?;
    let end = reach.end(&m, None).await?;
    w.latest = end.last_xact_time.max(w.latest);
    w.latest_lsn = Some(end.end_lsn);
    w.gap = end.gap;
    Ok(w)
}

/// One line of the status: the newest backup (or dump of a database).
#[derive(Debug, Clone, Serialize)]
pub struct Newest {
    /// Database (dumps).
    pub database: Option<String>,
    /// Id.
    pub id: String,
    /// When it completed.
    pub completed: Option<DateTime<Utc>>,
    /// Seconds since then.
    pub age_secs: Option<f64>,
    /// Size (data files, or the pg_dump archive).
    pub bytes: u64,
    /// Seconds it took.
    pub duration_secs: Option<f64>,
    /// How many are kept.
    pub count: usize,
}

/// What `pgkeep status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Cluster name.
    pub cluster: String,
    /// When it was gathered.
    pub now: DateTime<Utc>,
    /// The newest physical backup.
    pub backup: Option<Newest>,
    /// The newest dump of each database.
    pub dumps: Vec<Newest>,
    /// The recovery window.
    pub recovery_window: RecoveryWindow,
    /// The newest archived segment.
    pub wal_newest_segment: Option<String>,
    /// Seconds since the newest WAL object was written (the WAL lag as the repository sees
    /// it; `check` measures it against the server).
    pub wal_lag_secs: Option<f64>,
    /// The newest failed run.
    pub last_failure: Option<RunRecord>,
    /// The newest drill.
    pub last_drill: Option<RunRecord>,
    /// Bytes of the whole repository.
    pub repository_bytes: u64,
    /// Objects in the repository.
    pub repository_objects: u64,
    /// Bytes the cluster's backups and dumps of the last 7 days added to the repository.
    pub growth_7d_bytes: u64,
}

fn newest(points: &[BackupPoint], db: Option<&str>, now: DateTime<Utc>) -> Option<Newest> {
    let b = points.last()?;
    Some(Newest {
        database: db.map(str::to_owned),
        id: b.id.clone(),
        completed: b.stop_time,
        age_secs: b
            .stop_time
            .map(|t| (now - t).num_milliseconds() as f64 / 1000.0),
        bytes: b.bytes,
        duration_secs: b.duration_secs,
        count: points.len(),
    })
}

/// Bytes stored by the backups and dumps that started in the last 7 days (each once).
fn growth_7d(snap: &Snapshot) -> u64 {
    let since = snap.now - chrono::Duration::days(7);
    let mut seen = std::collections::BTreeSet::new();
    snap.physical
        .iter()
        .chain(snap.dumps.values().flatten())
        .filter(|b| b.start_time.is_some_and(|t| t >= since))
        .filter(|b| seen.insert(b.id.clone()))
        .map(|b| b.stored_bytes)
        .sum()
}

/// Builds the status from a snapshot.
pub async fn status_of(repo: &Repository, snap: &Snapshot) -> StatusReport {
    let window = match recovery_window(repo, snap).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("recovery window of {}: {e}", snap.cluster);
            RecoveryWindow::default()
        }
    };
    StatusReport {
        cluster: snap.cluster.clone(),
        now: snap.now,
        backup: newest(&snap.physical, None, snap.now),
        dumps: snap
            .dumps
            .iter()
            .filter_map(|(db, p)| newest(p, Some(db), snap.now))
            .collect(),
        recovery_window: window,
        wal_newest_segment: snap.wal.newest_segment.clone(),
        wal_lag_secs: snap
            .wal
            .newest_time
            .map(|t| (snap.now - t).num_milliseconds() as f64 / 1000.0),
        last_failure: snap
            .history
            .iter()
            .rev()
            .find(|r| r.result == RunResult::Failed)
            .cloned(),
        last_drill: snap
            .history
            .iter()
            .rev()
            .find(|r| r.kind == RunKind::Drill)
            .cloned(),
        repository_bytes: snap.repo.bytes,
        repository_objects: snap.repo.objects,
        growth_7d_bytes: growth_7d(snap),
    }
}

/// `pgkeep status`.
pub async fn status(ctx: &Context) -> Result<StatusReport> {
    let repo = open_repository_fast(ctx).await?;
    let snap = snapshot::gather(ctx, &repo).await?;
    Ok(status_of(&repo, &snap).await)
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

fn line(f: &mut fmt::Formatter<'_>, what: &str, n: &Newest) -> fmt::Result {
    writeln!(
        f,
        "  {what:<22} {}  {} ago  {}  {}  ({} kept)",
        n.id,
        n.age_secs.map(human_age).unwrap_or_else(|| "?".into()),
        human_bytes(n.bytes),
        n.duration_secs
            .map(|d| format!("{d:.1}s"))
            .unwrap_or_else(|| "-".into()),
        n.count
    )
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cluster {}  ({})", self.cluster, when(Some(self.now)))?;
        match &self.backup {
            Some(b) => line(f, "physical backup", b)?,
            None => writeln!(f, "  {:<22} none", "physical backup")?,
        }
        for d in &self.dumps {
            let what = format!("dump {}", d.database.as_deref().unwrap_or("?"));
            line(f, &what, d)?;
        }
        let w = &self.recovery_window;
        writeln!(
            f,
            "  {:<22} {} .. {}{}",
            "recovery window",
            when(w.earliest),
            when(w.latest),
            w.gap
                .as_ref()
                .map(|g| format!("  (cut short by missing segment {g})"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  {:<22} {} ({} ago)",
            "newest archived WAL",
            self.wal_newest_segment.as_deref().unwrap_or("-"),
            self.wal_lag_secs
                .map(human_age)
                .unwrap_or_else(|| "-".into())
        )?;
        match &self.last_failure {
            Some(r) => writeln!(
                f,
                "  {:<22} {} {} on {}: {}",
                "last failure",
                r.kind,
                when(Some(r.ended)),
                r.host,
                r.error.as_deref().unwrap_or("-")
            )?,
            None => writeln!(f, "  {:<22} none recorded", "last failure")?,
        }
        match &self.last_drill {
            Some(r) => writeln!(
                f,
                "  {:<22} {} {}{}",
                "last drill",
                r.result.as_str(),
                when(Some(r.ended)),
                r.rto_secs
                    .map(|s| format!(", recovery time {s:.1} s"))
                    .unwrap_or_default()
            )?,
            None => writeln!(f, "  {:<22} none recorded", "last drill")?,
        }
        writeln!(
            f,
            "  {:<22} {} in {} objects; this cluster added {} in 7 days",
            "repository",
            human_bytes(self.repository_bytes),
            self.repository_objects,
            human_bytes(self.growth_7d_bytes)
        )
    }
}

impl Report for StatusReport {}
