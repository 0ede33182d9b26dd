//! What a backup of a standby does differently from one of a primary (both methods).
//!
//! PostgreSQL allows a base backup of a hot standby with the same non-exclusive API
//! (`pg_backup_start`/`pg_backup_stop`, or `pg_basebackup` against the standby); the
//! primary's connection is not needed. The differences, and what pgkeep does about each:
//!
//! - **The stop point.** On a standby, `pg_backup_stop` writes no end-of-backup record; it
//!   returns the standby's minimum recovery point, and a restore takes the end of the backup
//!   from the `minRecoveryPoint` of the *copied* `pg_control` (backup_label says
//!   `BACKUP FROM: standby`). That is only safe when `pg_control` is copied after every other
//!   file, so the local method reads it last (pg_basebackup's server does the same). The
//!   minimum recovery point never passes what the standby has replayed, and replayed WAL was
//!   flushed to its `pg_wal` first, so the backup's WAL up to the stop LSN is on disk when
//!   `pg_backup_stop` returns; [`check_stop`] still checks it (bounded), and that the standby
//!   stayed a standby on the backup's timeline.
//! - **The backup's own WAL.** As on a primary, a temporary physical replication slot, made
//!   on the standby itself (PostgreSQL allows slots on a standby), keeps the standby from
//!   recycling the WAL from the backup's start until the backup has stored it (segments a
//!   standby restored from an archive are kept in its `pg_wal` under their own names too).
//!   Should a segment be missing from `pg_wal` all the same, the local method takes it from
//!   this repository's archive ([`crate::commands::backup`]).
//! - **The archive.** A standby never completes a WAL segment on its own: `pg_switch_wal()`
//!   is refused during recovery and `pg_backup_stop` switches nothing, so the segment holding
//!   the stop LSN reaches the archive only once the *primary* fills or switches it (under
//!   load, or `archive_timeout`). When pgkeep archives the cluster, the backup still waits
//!   for every segment from its start to its stop, that one included, as a backup of a
//!   primary does (RELIABILITY 15: no success before the backup's own WAL is archived, so
//!   point-in-time recovery from it has no hole at its end). The wait is bounded (by
//!   default a minute, or the standby's `archive_timeout` plus 30 s when that is longer);
//!   when it runs out, [`wait_for_backup_wal`] says why in the standby's terms: whether the
//!   standby still streams from its primary (a primary that is gone or lags never completes
//!   the segment) and what to do (`pg_switch_wal()` on the primary). Nothing is committed
//!   then: a backup that would miss WAL is never listed.

use std::time::{Duration, Instant};

use pgkeep_pg::client::StandbyStatus;
use pgkeep_pg::{Lsn, PgClient, WalSegmentName};
use pgkeep_repo::Repository;

use crate::commands::backup::{pg_error, BackupOptions};
use crate::error::{Error, ErrorKind, Result};

/// The default bound on the wait for the backup's WAL in the archive (as for a primary).
const DEFAULT_ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// How long `check_stop` waits for the standby to have replayed the stop LSN. It normally
/// has at once (see the module documentation); this only bounds the unexpected.
const REPLAY_WAIT: Duration = Duration::from_secs(30);

/// How long a backup waits for its WAL to reach the archive: `--archive-timeout` when given;
/// else a minute, or on a standby its `archive_timeout` plus 30 s when that is longer (a
/// standby's settings usually mirror its primary's, whose `archive_timeout` bounds how long
/// a written segment stays incomplete).
pub(crate) async fn archive_wait(
    client: &PgClient,
    opts: &BackupOptions,
    standby: bool,
) -> Duration {
    if let Some(s) = opts.archive_timeout_secs {
        return Duration::from_secs(s);
    }
    if !standby {
        return DEFAULT_ARCHIVE_WAIT;
    }
    let secs = client
        .query_text(
            "reading archive_timeout",
            "SELECT setting FROM pg_settings WHERE name = 'archive_timeout'",
        )
        .await
        .ok()
        .flatten()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    DEFAULT_ARCHIVE_WAIT.max(Duration::from_secs(secs + 30))
}

/// After the backup stopped on a standby: it must still be a standby on the backup's
/// timeline, and have replayed (hence flushed to `pg_wal`) the WAL up to `stop`.
pub(crate) async fn check_stop(client: &PgClient, timeline: u32, stop: Lsn) -> Result<()> {
    let deadline = Instant::now() + REPLAY_WAIT;
    loop {
        let s = client.standby_status().await.map_err(pg_error)?;
        if !s.in_recovery {
            return Err(Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "{} was promoted during the backup: it is no longer the standby the backup started on",
                    client.target()
                ),
                "take the backup again; it now runs as a backup of a primary",
            ));
        }
        if s.min_recovery_timeline != 0 && s.min_recovery_timeline != timeline {
            return Err(Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "the standby {} moved from timeline {timeline} to timeline {} during the backup (was its primary promoted?)",
                    client.target(),
                    s.min_recovery_timeline
                ),
                "take the backup again: a backup's WAL must come from one timeline",
            ));
        }
        if s.replay_lsn.is_some_and(|r| r >= stop) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "the standby {} has not replayed the backup's stop LSN {stop} within {}s (replayed up to {}; {})",
                    client.target(),
                    REPLAY_WAIT.as_secs(),
                    s.replay_lsn.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
                    s.receiver_text()
                ),
                "check the standby's log and its replication from the primary, then back up again",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `segments` are in the archive of `cluster`
/// ([`crate::commands::archive::wait_for_wal_archived`]). `standby` is the connection to a
/// standby the backup was taken from, and the backup's stop LSN: a timeout then says what
/// the standby waits for and whether its primary still streams to it.
pub(crate) async fn wait_for_backup_wal(
    repo: &Repository,
    cluster: &str,
    segments: &[WalSegmentName],
    timeout: Duration,
    standby: Option<(&PgClient, Lsn)>,
) -> Result<()> {
    let waited =
        crate::commands::archive::wait_for_wal_archived(repo, cluster, segments, timeout).await;
    let (Err(e), Some((client, stop))) = (&waited, standby) else {
        return waited;
    };
    let Error::Other {
        kind: ErrorKind::Failure,
        message,
        ..
    } = e
    else {
        return waited;
    };
    let receiver = match client.standby_status().await {
        Ok(s) => status_text(&s),
        Err(err) => format!("its state could not be read: {err}"),
    };
    Err(Error::with_hint(
        ErrorKind::Failure,
        format!(
            "{message}. The backup was taken from the standby {} (stop LSN {stop}); a standby never completes a WAL segment itself, so the segment holding the stop LSN is archived only once the primary fills or switches it. Standby: {receiver}. Nothing was committed",
            client.target()
        ),
        "on the primary, run SELECT pg_switch_wal() (or set archive_timeout) so the segment is completed and archived, then back up again, or allow more time with --archive-timeout; if the primary is gone, promote the standby and back it up as the primary",
    ))
}

fn status_text(s: &StandbyStatus) -> String {
    let replayed = s
        .replay_lsn
        .map(|l| format!("replayed up to {l}; "))
        .unwrap_or_default();
    format!("{replayed}{}", s.receiver_text())
}
