//! `pgkeep drill`: proves that a backup restores, and measures how long it takes.
//!
//! A physical drill restores a backup into a scratch directory, starts a throwaway server of
//! the backup's major version on it (see [`server`]), lets it replay WAL from the repository
//! to the target (or to the end of the archive), runs the checks of [`checks`], stops the
//! server and removes the scratch directory, also on failure and on SIGINT/SIGTERM. The
//! report splits the recovery time into restore, replay and checks. A dump drill
//! ([`dump`]) restores a dump into a scratch database and compares it with what the dump
//! recorded.

pub mod checks;
pub mod config;
pub mod dump;
pub mod server;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::commands::pitr::{self, PitrOptions};
use crate::commands::restore::{self, RestoreOptions, TablespaceMapping};
use crate::commands::restore_plan;
use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};
use crate::history::{Facts, RunFacts};
use crate::progress::{human_bytes, Progress};
use checks::{CheckStatus, DrillCheck};
use pgkeep_pg::lsn::Lsn;
use pgkeep_pg::recovery::{RecoveryTarget, TargetAction};
use pgkeep_pg::tools::{ClientTools, ToolNeed};
use server::{RunAs, ScratchDir, ScratchServer, ServerSpec};

/// Default of `[drill] timeout`: start-up and replay.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Options of a physical drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// Backup id or `latest`.
    pub id: String,
    /// Where to stop replaying; [`RecoveryTarget::End`]: the end of the archive.
    pub target: RecoveryTarget,
    /// Overrides `[drill] scratch_dir`.
    pub scratch_dir: Option<PathBuf>,
    /// Files restored at once.
    pub threads: usize,
}

/// What a drill found.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    /// `physical` or `dump`.
    pub kind: String,
    /// The cluster.
    pub cluster: String,
    /// The backup or dump drilled.
    pub id: String,
    /// The database (dump drills).
    pub database: Option<String>,
    /// The target, in words.
    pub target: String,
    /// `ok` or `failed`.
    pub result: String,
    /// Seconds restoring files (or the dump).
    pub restore_secs: f64,
    /// Seconds from the server's start to the end of recovery (physical).
    pub replay_secs: f64,
    /// Seconds running the checks.
    pub check_secs: f64,
    /// The recovery time measured: restore, replay and checks.
    pub rto_secs: f64,
    /// WAL replayed after the backup's start (physical): bytes.
    pub wal_bytes_replayed: u64,
    /// WAL segments the server fetched from the repository.
    pub wal_segments_restored: u64,
    /// Where replay ended (physical).
    pub replay_end_lsn: Option<String>,
    /// The newest transaction replayed (physical; `None` when none after the backup).
    pub last_transaction_time: Option<String>,
    /// The server binaries used.
    pub server: Option<String>,
    /// The scratch directory (removed) or database (dropped).
    pub scratch: String,
    /// Every check, in order.
    pub checks: Vec<DrillCheck>,
    /// Scratch directories of killed drills removed before this one.
    pub leftovers_removed: Vec<String>,
    /// For information.
    pub notes: Vec<String>,
}

impl DrillReport {
    fn failed_checks(&self) -> Vec<&DrillCheck> {
        self.checks
            .iter()
            .filter(|c| c.status == CheckStatus::Failed)
            .collect()
    }

    /// Ends the report: the result from the checks and the total time.
    fn finish(mut self) -> Self {
        self.result = if self.failed_checks().is_empty() {
            "ok".into()
        } else {
            "failed".into()
        };
        self.rto_secs = self.restore_secs + self.replay_secs + self.check_secs;
        self
    }

    /// One line: what was checked and the recovery time (the history record's detail).
    pub fn summary(&self) -> String {
        let ok = self
            .checks
            .iter()
            .filter(|c| c.status == CheckStatus::Ok)
            .count();
        format!(
            "{} drill of {}: {} of {} checks passed; RTO {:.1} s (restore {:.1} s, replay {:.1} s, checks {:.1} s)",
            self.kind,
            self.id,
            ok,
            self.checks.len(),
            self.rto_secs,
            self.restore_secs,
            self.replay_secs,
            self.check_secs
        )
    }
}

impl fmt::Display for DrillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "drill of {} {} of cluster {}{} ({}): {}",
            if self.kind == "dump" {
                "dump"
            } else {
                "backup"
            },
            self.id,
            self.cluster,
            self.database
                .as_deref()
                .map(|d| format!(", database {d}"))
                .unwrap_or_default(),
            self.target,
            if self.result == "ok" { "OK" } else { "FAILED" }
        )?;
        writeln!(
            f,
            "recovery time {:.1} s: restore {:.1} s, replay {:.1} s, checks {:.1} s",
            self.rto_secs, self.restore_secs, self.replay_secs, self.check_secs
        )?;
        if self.kind == "physical" {
            writeln!(
                f,
                "WAL replayed: {} ({} segments from the repository), to {}{}",
                human_bytes(self.wal_bytes_replayed),
                self.wal_segments_restored,
                self.replay_end_lsn.as_deref().unwrap_or("?"),
                self.last_transaction_time
                    .as_deref()
                    .map(|t| format!(", last transaction at {t}"))
                    .unwrap_or_default()
            )?;
        }
        for c in &self.checks {
            let s = match c.status {
                CheckStatus::Ok => "OK",
                CheckStatus::Failed => "FAILED",
                CheckStatus::Skipped => "SKIPPED",
            };
            writeln!(f, "  {s:<8} {:<24} {}", c.name, c.detail)?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

impl Report for DrillReport {
    /// The first failed check names the failure: exit 13 when the archive's WAL could not be
    /// replayed to its end, 1 otherwise.
    fn failure(&self) -> Option<Error> {
        let failed = self.failed_checks();
        let first = failed.first()?;
        let kind = if first.name == "wal_end" {
            ErrorKind::Integrity
        } else {
            ErrorKind::Failure
        };
        let names: Vec<&str> = failed.iter().map(|c| c.name.as_str()).collect();
        Some(Error::with_hint(
            kind,
            format!(
                "drill of {} failed: {} ({})",
                self.id,
                names.join(", "),
                first.detail
            ),
            "the backup does not restore as it should: look at the failed checks above, then run `pgkeep repo check --read-data`",
        ))
    }
}

impl RunFacts for DrillReport {
    fn facts(&self) -> Facts {
        Facts {
            backup_id: Some(self.id.clone()),
            rto_secs: Some(self.rto_secs),
            detail: Some(self.summary()),
            ..Facts::default()
        }
    }
}

/// The target in words.
fn target_text(t: &RecoveryTarget) -> String {
    match t {
        RecoveryTarget::End => "to the end of the archive".into(),
        RecoveryTarget::Immediate => "to the end of the backup".into(),
        RecoveryTarget::Time(x) => format!("to time {x}"),
        RecoveryTarget::Lsn(x) => format!("to LSN {x}"),
        RecoveryTarget::Xid(x) => format!("to transaction {x}"),
        RecoveryTarget::Name(x) => format!("to restore point {x}"),
    }
}

/// The `postgres` of the backup's major version (a drill must replay with the same major).
async fn server_binaries(major: u32) -> Result<ClientTools> {
    let tools = tokio::task::spawn_blocking(move || {
        ClientTools::find(&ToolNeed {
            programs: &["postgres"],
            min_major: major,
            preferred_major: major,
            purpose: "the drill's scratch server",
        })
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Failure, format!("finding PostgreSQL: {e}")))?;
    match tools {
        Ok(t) if t.major == major => Ok(t),
        other => Err(Error::with_hint(
            ErrorKind::Failure,
            format!(
                "drill: no PostgreSQL {major} server binaries (postgres) found{}",
                match other {
                    Ok(t) => format!("; found only {} in {}", t.version, t.bin_dir.display()),
                    Err(e) => format!(": {e}"),
                }
            ),
            format!("a backup of PostgreSQL {major} replays only with PostgreSQL {major}: install its server package, or set PGKEEP_PG_BIN to its bin directory"),
        )),
    }
}

/// The `restore_command` of the scratch server: this executable's `archive-get` with this
/// run's configuration file, repository and cluster. The passphrase goes to the server's
/// environment (see [`server_env`]), never into the command.
fn restore_command(ctx: &Context) -> Result<String> {
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

/// The scratch server's extra environment: the passphrase this run was given, so that its
/// `restore_command` opens the repository whoever the server runs as (a root-only
/// passphrase file is not readable by `postgres`).
fn server_env(ctx: &Context) -> Vec<(String, String)> {
    let mut env = vec![("PGKEEP_LOG".to_string(), "warn".to_string())];
    if let Some(p) = ctx.passphrases.given() {
        env.push((
            crate::secrets::ENV_PASSPHRASE.to_string(),
            p.expose().to_string(),
        ));
    }
    env
}

/// The roles to try for the checks, in order.
fn user_candidates(ctx: &Context) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(u) = &ctx.settings.drill.user {
        v.push(u.clone());
    }
    if let Some(u) = ctx
        .settings
        .cluster
        .pg
        .as_deref()
        .and_then(|c| pgkeep_pg::client::ConnParams::resolve(Some(c)).ok())
        .map(|p| p.user)
    {
        v.push(u);
    }
    v.push("postgres".into());
    if let Ok(u) = std::env::var("USER") {
        v.push(u);
    }
    v.dedup();
    v
}

/// Runs a physical drill.
pub async fn drill(
    ctx: &Context,
    opts: &DrillOptions,
    progress: &dyn Progress,
) -> Result<DrillReport> {
    let cfg = &ctx.settings.drill;
    let repo = ctx.open_repository().await?;
    let pitr_opts = PitrOptions {
        target: opts.target.clone(),
        action: (!matches!(opts.target, RecoveryTarget::End)).then_some(TargetAction::Promote),
        timeline: None,
        restore_command: restore_command(ctx)?,
        standby: false,
        primary_conninfo: None,
    };
    let mut ropts = RestoreOptions {
        cluster: opts.cluster.clone(),
        id: opts.id.clone(),
        threads: opts.threads,
        recovery: Some(pitr_opts),
        // A drill is a restore on this host: its speed feeds the estimate of the next
        // `restore --dry-run`, as a restore's does.
        speed_log: restore_plan::default_speed_log(),
        ..RestoreOptions::default()
    };
    let (m, _) = restore_plan::select(&repo, &ropts).await?;
    let bins = server_binaries(m.pg_major).await?;
    let run_as = RunAs::for_server()?;

    let parent = opts
        .scratch_dir
        .clone()
        .unwrap_or_else(|| cfg.scratch_parent());
    let (scratch, leftovers) = ScratchDir::create(&parent)?;
    let pgdata = scratch.path().join("pgdata");
    ropts.id = m.id.clone();
    ropts.target_dir = pgdata.clone();
    ropts.tablespace_map = m
        .tablespaces
        .iter()
        .map(|t| TablespaceMapping {
            old: t.location.trim_end_matches('/').to_string(),
            new: scratch
                .path()
                .join("tablespaces")
                .join(t.oid.to_string())
                .display()
                .to_string(),
        })
        .collect();
    let mut report = DrillReport {
        kind: "physical".into(),
        cluster: opts.cluster.clone(),
        id: m.id.clone(),
        database: None,
        target: target_text(&opts.target),
        result: String::new(),
        restore_secs: 0.0,
        replay_secs: 0.0,
        check_secs: 0.0,
        rto_secs: 0.0,
        wal_bytes_replayed: 0,
        wal_segments_restored: 0,
        replay_end_lsn: None,
        last_transaction_time: None,
        server: Some(bins.version.clone()),
        scratch: scratch.path().display().to_string(),
        checks: Vec::new(),
        leftovers_removed: leftovers.iter().map(|p| p.display().to_string()).collect(),
        notes: Vec::new(),
    };

    progress.note(&format!(
        "drill: restoring backup {} into {}",
        m.id,
        pgdata.display()
    ));
    let restored = restore::restore(&repo, &ropts, progress).await?;
    report.restore_secs = restored.duration_secs;
    drop(repo);

    let spec = ServerSpec {
        postgres: bins.path("postgres"),
        pgdata: pgdata.clone(),
        scratch: scratch.path().to_path_buf(),
        port: server::free_port()?,
        extra_settings: cfg.settings.clone().into_iter().collect(),
        env: server_env(ctx),
        run_as,
    };
    progress.note("drill: starting the scratch server; it replays WAL from the repository");
    let replay_started = Instant::now();
    let mut srv = ScratchServer::start(&spec)?;
    let timeout = cfg
        .timeout
        .and_then(|l| l.duration())
        .unwrap_or(DEFAULT_TIMEOUT);
    let log = srv
        .wait_ready(timeout, &|l| {
            progress.note(&format!(
                "drill: replaying WAL, {} segments restored from the repository",
                l.segments_restored
            ))
        })
        .await?;
    report.replay_secs = replay_started.elapsed().as_secs_f64();
    report.wal_segments_restored = log.segments_restored;

    let check_started = Instant::now();
    progress.note("drill: the server is up; checking every database");
    run_checks(
        ctx,
        &srv,
        &spec,
        &bins,
        &m,
        &restored,
        &opts.target,
        &mut report,
    )
    .await;
    report.check_secs = check_started.elapsed().as_secs_f64();
    if !srv.stop(Duration::from_secs(60)) {
        report
            .notes
            .push("the scratch server did not stop within 60 s and was stopped immediately".into());
    }
    drop(srv);
    drop(scratch);
    Ok(report.finish())
}

/// Connects as the first role that exists.
async fn connect_any(
    srv: &ScratchServer,
    users: &[String],
) -> Result<(pgkeep_pg::client::PgClient, String)> {
    let mut last = None;
    for u in users {
        match checks::connect(&srv.conninfo(u, "postgres")).await {
            Ok(c) => return Ok((c, u.clone())),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::with_hint(
        ErrorKind::Failure,
        format!(
            "drill: could not connect to the scratch server as any of {}: {}",
            users.join(", "),
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
        "name a superuser of the cluster in [drill] user",
    ))
}

#[allow(clippy::too_many_arguments)]
async fn run_checks(
    ctx: &Context,
    srv: &ScratchServer,
    spec: &ServerSpec,
    bins: &ClientTools,
    m: &crate::manifest::BackupManifest,
    restored: &restore::RestoreReport,
    target: &RecoveryTarget,
    report: &mut DrillReport,
) {
    let (c, user) = match connect_any(srv, &user_candidates(ctx)).await {
        Ok(x) => x,
        Err(e) => {
            report
                .checks
                .push(DrillCheck::failed("connect", e.to_string()));
            return;
        }
    };
    replay_checks(&c, m, restored, target, report).await;
    let dbs = match checks::databases(&c).await {
        Ok(d) => d,
        Err(e) => {
            report
                .checks
                .push(DrillCheck::failed("connect", e.to_string()));
            return;
        }
    };
    let mut clients = Vec::new();
    for db in &dbs {
        match checks::connect(&srv.conninfo(&user, db)).await {
            Ok(cl) => {
                report.checks.push(DrillCheck::ok(
                    format!("connect:{db}"),
                    "accepts connections",
                ));
                clients.push((db.clone(), cl));
            }
            Err(e) => report
                .checks
                .push(DrillCheck::failed(format!("connect:{db}"), e.to_string())),
        }
    }
    let amcheck = if ctx.settings.drill.amcheck.unwrap_or(true) {
        checks::amcheck(
            &bins.bin_dir,
            &c,
            &spec.socket_dir(),
            spec.port,
            &user,
            spec.run_as,
        )
        .await
    } else {
        None
    };
    match amcheck {
        Some(check) => report.checks.push(check),
        None => {
            for (db, cl) in &clients {
                report.checks.push(checks::read_every_table(cl, db).await);
            }
        }
    }
    for a in ctx.settings.drill.assertions_for(&report.cluster) {
        match clients.iter().find(|(db, _)| *db == a.database) {
            Some((_, cl)) => report.checks.push(checks::assertion(cl, a).await),
            None => report.checks.push(DrillCheck::failed(
                format!("assert:{}", a.display_name()),
                format!("database {} is not in the restored cluster", a.database),
            )),
        }
    }
}

/// Where replay ended against what was asked: the end of the archive reached (else the WAL
/// there could not be replayed), a time target not overshot.
async fn replay_checks(
    c: &pgkeep_pg::client::PgClient,
    m: &crate::manifest::BackupManifest,
    restored: &restore::RestoreReport,
    target: &RecoveryTarget,
    report: &mut DrillReport,
) {
    let row = checks::first_value(
        c,
        "SELECT pg_last_wal_replay_lsn()::text || ' ' || coalesce(pg_last_xact_replay_timestamp()::text, '')",
    )
    .await;
    let text = match row {
        Ok(Some(t)) => t,
        _ => {
            report.checks.push(DrillCheck::failed(
                "recovery",
                "pg_last_wal_replay_lsn() returned nothing: the server did not recover",
            ));
            return;
        }
    };
    let (lsn_text, time_text) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    let replay_lsn: Option<Lsn> = lsn_text.parse().ok();
    let start: Option<Lsn> = m.start_lsn.parse().ok();
    if let (Some(end), Some(start)) = (replay_lsn, start) {
        report.wal_bytes_replayed = end.bytes_since(start);
    }
    report.replay_end_lsn = Some(lsn_text.to_string());
    report.last_transaction_time = (!time_text.is_empty()).then(|| time_text.to_string());
    report.checks.push(DrillCheck::ok(
        "recovery",
        format!(
            "recovered {} and accepts connections; replay ended at {lsn_text}",
            target_text(target)
        ),
    ));
    if let (RecoveryTarget::End, Some(end)) = (target, replay_lsn) {
        report.checks.push(end_check(m, restored, end));
    }
    if let RecoveryTarget::Time(t) = target {
        report.checks.push(time_check(t, time_text));
    }
}

/// The segment number of a WAL file name (timeline ignored).
fn segment_number(name: &str, seg_size: u32) -> Option<u64> {
    if name.len() < 24 {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some(log * (0x1_0000_0000 / seg_size as u64) + seg)
}

fn end_check(
    m: &crate::manifest::BackupManifest,
    restored: &restore::RestoreReport,
    end: Lsn,
) -> DrillCheck {
    let seg_size = m.wal_segment_size.max(1 << 20);
    let last = restored
        .plan
        .recovery
        .archive_end
        .as_ref()
        .and_then(|a| a.last_segment.clone());
    let Some(last) = last else {
        return DrillCheck::ok(
            "wal_end",
            "nothing archived after the backup: recovered to the backup's end",
        );
    };
    let reached = (end.0.saturating_sub(1)) / seg_size as u64;
    match segment_number(&last, seg_size) {
        Some(want) if reached >= want => DrillCheck::ok(
            "wal_end",
            format!("replayed to the end of the archive (segment {last})"),
        ),
        Some(_) => DrillCheck::failed(
            "wal_end",
            format!(
                "replay stopped at {end}, before the last archived segment {last}: a segment in between could not be restored from the repository (see archive-get's errors in the server log)"
            ),
        ),
        None => DrillCheck::skipped("wal_end", format!("cannot read segment name {last}")),
    }
}

fn time_check(target: &str, last: &str) -> DrillCheck {
    let Ok(target_t) = pitr::parse_target_time(target) else {
        return DrillCheck::skipped("target_time", format!("cannot read the target {target}"));
    };
    if last.is_empty() {
        return DrillCheck::ok(
            "target_time",
            "no transaction replayed after the backup, so none after the target",
        );
    }
    match pitr::parse_target_time(last) {
        Ok(t) if t <= target_t => DrillCheck::ok(
            "target_time",
            format!("newest transaction replayed at {last}, not after the target {target}"),
        ),
        Ok(_) => DrillCheck::failed(
            "target_time",
            format!("a transaction of {last} was replayed, after the target {target}"),
        ),
        Err(_) => DrillCheck::skipped(
            "target_time",
            format!("cannot read the replayed transaction time {last:?}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_numbers_of_wal_names() {
        assert_eq!(
            segment_number("000000010000000000000003", 16 << 20),
            Some(3)
        );
        assert_eq!(
            segment_number("0000000200000001000000FF", 16 << 20),
            Some(256 + 255)
        );
        assert_eq!(segment_number("short", 16 << 20), None);
    }

    #[test]
    fn a_time_target_is_overshot_only_by_a_later_transaction() {
        let t = "2026-12-05 01:00:00+00";
        assert_eq!(
            time_check(t, "2026-12-05 00:59:59.9+00").status,
            CheckStatus::Ok
        );
        assert_eq!(
            time_check(t, "2026-12-05 01:00:00+00").status,
            CheckStatus::Ok
        );
        assert_eq!(
            time_check(t, "2026-12-05 01:00:01+00").status,
            CheckStatus::Failed
        );
        assert_eq!(time_check(t, "").status, CheckStatus::Ok);
    }
}
