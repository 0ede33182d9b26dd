//! Point-in-time recovery for `restore`: which backup a target needs, whether the target is
//! inside the window the backups and the WAL archive can reach, and the recovery settings
//! (`recovery.signal`, `restore_command = 'pgkeep archive-get %f %p'`, the target) written
//! into the restored data directory as its very last step.
//!
//! What is checked before anything is written (exit 16, the window in the message):
//! - every target: nothing earlier than the backup's end is reachable;
//! - `--target-lsn`: it must lie in [backup stop LSN, end of the last archived segment that
//!   follows the backup without a gap] (see [`recovery_window`]);
//! - `--target-time`: it must not be before the backup's stop time. Its upper end depends on
//!   commit times inside the WAL, which pgkeep does not read: PostgreSQL (13 and later) stops
//!   with "recovery ended before configured recovery target was reached" instead of
//!   promoting early, so a time past the archive fails loudly, not silently;
//! - `--target-xid`, `--target-name`: likewise left to PostgreSQL's own refusal.

use chrono::{DateTime, Utc};
use pgkeep_pg::recovery::{
    RecoveryConfig, RecoveryMode, RecoveryTarget, TargetAction, TargetTimeline,
};
use pgkeep_pg::Lsn;
use pgkeep_repo::Repository;
use serde::{Deserialize, Serialize};

use crate::commands::verify::recovery_window;
use crate::context::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{self, BackupManifest, KIND_PHYSICAL};

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

/// The `restore_command` for a restored cluster: this executable's `archive-get` with the
/// run's configuration file, repository and cluster. The server runs it with its own
/// environment: an encrypted repository needs `passphrase_file` in the configuration file.
pub fn restore_command_for(ctx: &Context) -> Result<String> {
    let exe = std::env::current_exe().map_err(|e| Error::io("finding the pgkeep executable", e))?;
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut cmd = quote(&exe.display().to_string());
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

fn unreachable(msg: String, window: Option<(Lsn, Lsn)>, hint: &str) -> Error {
    let w = window
        .map(|(a, b)| format!(" (reachable from this backup: {a} to {b})"))
        .unwrap_or_default();
    Error::with_hint(ErrorKind::TargetUnreachable, format!("{msg}{w}"), hint)
}

/// Resolves `latest` for a point-in-time restore: the newest physical backup that ends
/// before the target (by stop LSN for an LSN target, by stop time for a time target; the
/// newest backup otherwise). A given id is returned as is.
pub async fn select_backup(
    repo: &Repository,
    cluster: &str,
    id: &str,
    pitr: &PitrOptions,
) -> Result<String> {
    if id != "latest" {
        return Ok(id.to_string());
    }
    let mut best: Option<BackupManifest> = None;
    let mut oldest: Option<BackupManifest> = None;
    for (h, v) in manifest::load_headers(repo, cluster).await? {
        if h.kind != KIND_PHYSICAL {
            continue;
        }
        let m = BackupManifest::from_value(v)?;
        let fits = match &pitr.target {
            RecoveryTarget::Lsn(l) => m.stop_lsn.parse::<Lsn>().is_ok_and(|s| s <= *l),
            RecoveryTarget::Time(t) => parse_target_time(t).is_ok_and(|t| m.stop_time <= t),
            _ => true,
        };
        if oldest.is_none() {
            oldest = Some(m.clone());
        }
        if fits {
            best = Some(m);
        }
    }
    match (best, oldest) {
        (Some(m), _) => Ok(m.id),
        (None, Some(o)) => Err(unreachable(
            format!(
                "no backup of cluster {cluster} ends before the recovery target; the oldest, {}, ends at {} ({})",
                o.id, o.stop_lsn, o.stop_time
            ),
            None,
            "a target before the oldest backup's end cannot be reached",
        )),
        (None, None) => Err(Error::with_hint(
            ErrorKind::Failure,
            format!("cluster {cluster} has no physical backup in this repository"),
            "take one with `pgkeep backup`, or check --cluster",
        )),
    }
}

/// Checks the target against what backup `m` and the archive can reach (exit 16 with the
/// window when it cannot be reached). Reads only.
pub async fn preflight(
    repo: &Repository,
    cluster: &str,
    m: &BackupManifest,
    pitr: &PitrOptions,
) -> Result<()> {
    let stop: Lsn = m.stop_lsn.parse().map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("backup {}: stop LSN: {e}", m.id),
        )
    })?;
    match &pitr.target {
        RecoveryTarget::Lsn(l) => {
            let window = recovery_window(repo, cluster, m).await?;
            if *l < stop {
                return Err(unreachable(
                    format!(
                        "recovery target LSN {l} is before the end of backup {} ({stop})",
                        m.id
                    ),
                    Some(window),
                    "choose an older backup, or a later target",
                ));
            }
            if *l > window.1 {
                return Err(unreachable(
                    format!("recovery target LSN {l} is past the archived WAL"),
                    Some(window),
                    "latest reachable is the end of the window; check `pgkeep verify` for gaps",
                ));
            }
        }
        RecoveryTarget::Time(t) => {
            let t = parse_target_time(t)?;
            if t < m.stop_time {
                let window = recovery_window(repo, cluster, m).await?;
                return Err(unreachable(
                    format!(
                        "recovery target time {t} is before the end of backup {} ({})",
                        m.id, m.stop_time
                    ),
                    Some(window),
                    "choose an older backup (or `latest`, which picks one), or a later target",
                ));
            }
        }
        _ => {}
    }
    Ok(())
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
        mode: RecoveryMode::Recovery,
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
        })
        .unwrap();
        assert_eq!(
            c.target,
            RecoveryTarget::Time("2026-11-22 14:31:07.520000+00".into())
        );
    }
}
