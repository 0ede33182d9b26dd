//! `pgkeep check`: is the cluster's WAL really reaching this repository?
//!
//! Connects to the cluster, checks that archiving is on and that the server is the cluster
//! the repository knows under this name, forces a WAL switch (`pg_switch_wal()`, after a
//! restore point so there is something to switch), and waits, bounded, for the switched
//! segment to appear in the repository. Reports the archive's last segment and the lag
//! between the server's current WAL position and the end of that segment, and the gaps in the
//! archive (the analysis of `pgkeep verify`, without reading data): each as a range, with the
//! backups whose point-in-time-recovery window it cuts short.
//!
//! Exit codes: 0 when the segment arrived and no gap breaks a recovery window; 13 when a gap
//! does (RELIABILITY row 15); 1 when archiving is off or the segment did not arrive in time
//! (naming `pg_stat_archiver`'s last failure); 3 when gaps break nothing; 15 when the server
//! is another cluster than the one archived under the name; 10/12 for the repository as usual.

use std::fmt;
use std::time::{Duration, Instant};

use pgkeep_pg::wal::{WalFileName, WalSegmentName};
use pgkeep_pg::{ConnParams, Lsn, PgClient};
use serde::{Deserialize, Serialize};

use crate::commands::archive::{
    is_archived, list_archive, load_identity, open_repository_fast, ClusterIdentity,
};
use crate::commands::backup::pg_error;
use crate::commands::verify::{verify_repository, BackupWindow, VerifyOptions, WalGap};
use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};

/// Default bound on the wait for the switched segment.
pub const DEFAULT_ARCHIVE_TIMEOUT_SECS: u64 = 60;

/// Options of `pgkeep check`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct ArchiveCheckOptions {
    /// How long to wait for the switched WAL segment to reach the repository, in seconds.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "SECS", default_value_t = DEFAULT_ARCHIVE_TIMEOUT_SECS)
    )]
    pub archive_timeout: u64,
}

impl Default for ArchiveCheckOptions {
    fn default() -> Self {
        ArchiveCheckOptions {
            archive_timeout: DEFAULT_ARCHIVE_TIMEOUT_SECS,
        }
    }
}

/// What `pgkeep check` found.
#[derive(Debug, Clone, Serialize)]
pub struct ArchiveCheckReport {
    /// Cluster name.
    pub cluster: String,
    /// The server checked (`host=... port=...`, no password).
    pub server: String,
    /// The server's system identifier.
    pub system_identifier: String,
    /// `archive_mode`.
    pub archive_mode: String,
    /// `archive_command`.
    pub archive_command: String,
    /// The segment completed by `pg_switch_wal()` and waited for.
    pub switched_segment: String,
    /// Whether it reached the repository in time.
    pub arrived: bool,
    /// Seconds waited for it.
    pub waited_secs: f64,
    /// The newest segment in the archive (after the wait).
    pub last_archived_segment: Option<String>,
    /// The server's WAL position at the end of the check.
    pub current_lsn: String,
    /// Bytes of WAL between the end of the last archived segment and `current_lsn`.
    pub lag_bytes: Option<u64>,
    /// `pg_stat_archiver.last_failed_wal`, when any.
    pub last_failed_wal: Option<String>,
    /// `pg_stat_archiver.failed_count`.
    pub failed_count: i64,
    /// Whether `pg_stat_archiver` shows a failure more recent than the last success.
    pub failing: bool,
    /// The server's `archive_timeout`, in seconds (0: off).
    pub archive_timeout_setting_secs: Option<u64>,
    /// Segments marked `.ready` in `pg_wal/archive_status` (waiting to be archived), when the
    /// role may read that directory (superuser or pg_monitor).
    pub ready_segments: Option<i64>,
    /// Gaps in the archive (missing segments), by timeline and position.
    pub gaps: Vec<WalGap>,
    /// Physical backups with how far their recovery windows reach.
    pub backups: Vec<BackupWindow>,
    /// Problems worth attention that did not fail the check.
    pub warnings: Vec<String>,
    #[serde(skip)]
    timeout_secs: u64,
}

impl fmt::Display for ArchiveCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cluster {}: server {} (system identifier {})",
            self.cluster, self.server, self.system_identifier
        )?;
        writeln!(
            f,
            "archive_mode = {}, archive_command = {:?}",
            self.archive_mode, self.archive_command
        )?;
        if self.arrived {
            writeln!(
                f,
                "switched WAL segment {} reached the repository in {:.1}s",
                self.switched_segment, self.waited_secs
            )?;
        } else {
            writeln!(
                f,
                "switched WAL segment {} did NOT reach the repository within {}s",
                self.switched_segment, self.timeout_secs
            )?;
        }
        match &self.last_archived_segment {
            Some(s) => writeln!(
                f,
                "last archived segment {s}; lag {} behind {}",
                self.lag_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "unknown".into()),
                self.current_lsn
            )?,
            None => writeln!(f, "the archive holds no segment yet")?,
        }
        if let Some(w) = &self.last_failed_wal {
            writeln!(
                f,
                "pg_stat_archiver: {} failure(s), last failed {w}",
                self.failed_count
            )?;
        }
        for g in &self.gaps {
            writeln!(f, "{g}")?;
        }
        for b in self.backups.iter().filter(|b| b.broken_by.is_some()) {
            writeln!(
                f,
                "backup {} (timeline {}): recoverable only from {} to {}",
                b.id, b.timeline, b.stop_lsn, b.reachable_until
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

impl Report for ArchiveCheckReport {
    fn failure(&self) -> Option<Error> {
        let breaking: Vec<String> = self
            .gaps
            .iter()
            .filter(|g| !g.breaks.is_empty())
            .map(|g| format!("{}..{} (breaks {})", g.first, g.last, g.breaks.join(", ")))
            .collect();
        if !breaking.is_empty() {
            // The more lasting problem: WAL that is gone. Arriving or not is said too.
            return Some(Error::with_hint(
                ErrorKind::Integrity,
                format!(
                    "the WAL archive of cluster {} has gaps that break point-in-time recovery: {}{}",
                    self.cluster,
                    breaking.join("; "),
                    if self.arrived {
                        String::new()
                    } else {
                        format!(
                            "; and WAL segment {} did not reach the repository within {}s",
                            self.switched_segment, self.timeout_secs
                        )
                    }
                ),
                "a missing segment cannot be recreated unless pg_wal still holds it (push it with `pgkeep archive-push`): take a new backup to start a clean recovery window",
            ));
        }
        if self.arrived {
            return None;
        }
        let failed = match &self.last_failed_wal {
            Some(w) => format!(
                " (pg_stat_archiver: last failed {w}, {} failures)",
                self.failed_count
            ),
            None => String::new(),
        };
        Some(Error::with_hint(
            ErrorKind::Failure,
            format!(
                "WAL segment {} did not reach the repository within {}s{failed}",
                self.switched_segment, self.timeout_secs
            ),
            "check archive_command (it must run `pgkeep archive-push %p` with this repository and --cluster) and the server log",
        ))
    }

    fn has_warnings(&self) -> bool {
        !self.warnings.is_empty() || !self.gaps.is_empty()
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
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

async fn text(client: &PgClient, what: &'static str, sql: &str) -> Result<String> {
    Ok(client
        .query_text(what, sql)
        .await
        .map_err(pg_error)?
        .unwrap_or_default())
}

/// `archive_timeout` (seconds) and the count of `.ready` files, each `None` when the server
/// does not say (an unprivileged role may not list `pg_wal/archive_status`).
async fn archiver_backlog(client: &PgClient) -> (Option<u64>, Option<i64>) {
    let timeout = client
        .inner()
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'archive_timeout'",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.try_get::<_, i64>(0).ok())
        .map(|v| v.max(0) as u64);
    let ready = client
        .inner()
        .query_one(
            "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.try_get::<_, i64>(0).ok());
    (timeout, ready)
}

/// `pgkeep check`.
pub async fn check_archiving(
    ctx: &Context,
    opts: &ArchiveCheckOptions,
) -> Result<ArchiveCheckReport> {
    let cluster = ctx.settings.cluster.name.clone();
    let conninfo = ctx.settings.cluster.pg.clone();
    let repo = open_repository_fast(ctx).await?;
    let params = ConnParams::resolve(conninfo.as_deref()).map_err(pg_error)?;
    let client = PgClient::connect(&params).await.map_err(pg_error)?;
    let info = client.server_info().await.map_err(pg_error)?;
    info.ensure_supported(client.target()).map_err(pg_error)?;
    let server = client.target().to_string();
    let mut warnings = Vec::new();
    // First of all: a standby's settings (archive_mode may well be off there) would only
    // mislead, and the check needs a WAL switch, which PostgreSQL refuses during recovery.
    if info.in_recovery {
        return Err(Error::with_hint(
            ErrorKind::Failure,
            format!(
                "{server} is a standby (in recovery): `pgkeep check` forces a WAL switch, which only a primary can do"
            ),
            "run `pgkeep check` with --pg naming the primary; a standby can be backed up (`pgkeep backup --pg` with the standby), its WAL is archived by the primary",
        ));
    }

    // The identity recorded by earlier pushes or backups must be this server's.
    let found = ClusterIdentity::new(
        info.system_identifier,
        info.major_version(),
        info.wal_segment_size,
        "check",
    );
    if let Some(recorded) = load_identity(&repo, &cluster).await? {
        if recorded.system_identifier != found.system_identifier
            || recorded.pg_major != found.pg_major
        {
            return Err(Error::with_hint(
                ErrorKind::ClusterMismatch,
                format!(
                    "the server at {server} (system identifier {}, PostgreSQL {}) is not the cluster archived as {cluster:?} (system identifier {}, PostgreSQL {})",
                    found.system_identifier, found.pg_major, recorded.system_identifier, recorded.pg_major
                ),
                "check --pg and --cluster",
            ));
        }
    }

    let archive_mode = client.setting("archive_mode").await.map_err(pg_error)?;
    let archive_command = client.setting("archive_command").await.map_err(pg_error)?;
    let archive_library = client.setting("archive_library").await.unwrap_or_default();
    if archive_mode == "off" {
        return Err(Error::with_hint(
            ErrorKind::Failure,
            format!("archiving is off on {server} (archive_mode = off)"),
            "set archive_mode = on and archive_command = 'pgkeep archive-push %p' (archive_mode needs a restart)",
        ));
    }
    if archive_command.trim().is_empty() && archive_library.trim().is_empty() {
        return Err(Error::with_hint(
            ErrorKind::Failure,
            format!("archive_command is empty on {server}: WAL is not archived anywhere"),
            "set archive_command = 'pgkeep archive-push %p' and reload",
        ));
    }
    if !archive_command.contains("archive-push") {
        warnings.push(format!(
            "archive_command {archive_command:?} does not call `pgkeep archive-push`"
        ));
    }

    // Something to switch away from, then the switch. pg_switch_wal returns the end of the
    // completed segment; pg_walfile_name maps an end position to the segment holding it.
    text(
        &client,
        "creating a restore point",
        "SELECT pg_create_restore_point('pgkeep check')::text",
    )
    .await?;
    let switched = text(
        &client,
        "switching WAL",
        "SELECT pg_walfile_name(pg_switch_wal())",
    )
    .await?;
    let seg: WalSegmentName = switched.parse().map_err(|e| {
        Error::new(
            ErrorKind::Failure,
            format!("pg_walfile_name returned {switched:?}: {e}"),
        )
    })?;

    let started = Instant::now();
    let timeout = Duration::from_secs(opts.archive_timeout);
    let mut delay = Duration::from_millis(50);
    let arrived = loop {
        if is_archived(&repo, &cluster, &WalFileName::Segment(seg)).await? {
            break true;
        }
        if started.elapsed() >= timeout {
            break false;
        }
        tokio::time::sleep(delay.min(timeout.saturating_sub(started.elapsed()))).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    };
    let waited_secs = started.elapsed().as_secs_f64();

    let current: Lsn = text(
        &client,
        "reading the WAL position",
        "SELECT pg_current_wal_lsn()::text",
    )
    .await?
    .parse()
    .map_err(|e| Error::new(ErrorKind::Failure, format!("pg_current_wal_lsn: {e}")))?;
    let row = client
        .inner()
        .query_one(
            "SELECT last_failed_wal, failed_count, \
             last_failed_time > coalesce(last_archived_time, '-infinity') AS failing \
             FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|e| Error::new(ErrorKind::Failure, format!("reading pg_stat_archiver: {e}")))?;
    let last_failed_wal: Option<String> = row.get(0);
    let failed_count: i64 = row.get(1);
    let failing: Option<bool> = row.get(2);
    if arrived && failing == Some(true) {
        warnings.push(format!(
            "pg_stat_archiver shows a failure more recent than the last success ({})",
            last_failed_wal.as_deref().unwrap_or("?")
        ));
    }

    let (archive_timeout_setting_secs, ready_segments) = archiver_backlog(&client).await;
    let listing = list_archive(&repo, &cluster).await?;
    let last = listing.last_segment();
    // The gap analysis of `verify` (a listing and the manifests; no data read).
    let analysis = verify_repository(&repo, &cluster, &VerifyOptions::default()).await?;
    warnings.extend(analysis.warnings.iter().cloned());
    let seg_size = info.wal_segment_size;
    let lag_bytes = last.map(|l| {
        let end = l.next(seg_size).start_lsn(seg_size);
        current.0.saturating_sub(end.0)
    });
    Ok(ArchiveCheckReport {
        cluster,
        server,
        system_identifier: info.system_identifier.to_string(),
        archive_mode,
        archive_command,
        switched_segment: seg.to_string(),
        arrived,
        waited_secs,
        last_archived_segment: last.map(|s| s.to_string()),
        current_lsn: current.to_string(),
        lag_bytes,
        last_failed_wal,
        failed_count,
        failing: failing == Some(true),
        archive_timeout_setting_secs,
        ready_segments,
        gaps: analysis.gaps,
        backups: analysis.backups,
        warnings,
        timeout_secs: opts.archive_timeout,
    })
}
