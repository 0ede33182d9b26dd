//! `pgkeep check`: the health of a cluster's backups, as a list of judged items.
//!
//! The items are computed from a [`snapshot::Snapshot`] (repository, history, local disks)
//! and, unless `[health] check_archiving = false`, from the end-to-end archiving check of
//! [`crate::commands::check`] (a WAL switch waited for in the repository). Each item is OK,
//! WARNING, CRITICAL or UNKNOWN against the thresholds of `[health]` ([`config`]).
//!
//! Exit codes: without `--nagios` the registry's (0; 3 with warnings; 1 when an item is
//! critical; the archiving check's own code — 13 for gaps, 15 for another cluster — when it
//! failed). With `--nagios`, the Nagios plugin codes of [`crate::error::nagios`].

pub mod config;
pub mod metrics;
pub mod snapshot;
pub mod status;

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::commands::archive::open_repository_fast;
use crate::commands::check::{check_archiving, ArchiveCheckOptions, ArchiveCheckReport};
use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};
use crate::history::{RunKind, RunResult};
use config::{HealthSettings, Limit};
use snapshot::{BackupPoint, Snapshot, Space};

/// The verdict of one item, and of the whole check (the worst item).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Fine.
    Ok,
    /// Worth a look.
    Warning,
    /// Act now.
    Critical,
    /// Could not be judged.
    Unknown,
}

impl HealthStatus {
    /// `OK`, `WARNING`, `CRITICAL`, `UNKNOWN`: the Nagios words.
    pub fn word(self) -> &'static str {
        match self {
            HealthStatus::Ok => "OK",
            HealthStatus::Warning => "WARNING",
            HealthStatus::Critical => "CRITICAL",
            HealthStatus::Unknown => "UNKNOWN",
        }
    }

    /// The Nagios plugin exit code.
    pub fn nagios_code(self) -> i32 {
        match self {
            HealthStatus::Ok => crate::error::nagios::OK,
            HealthStatus::Warning => crate::error::nagios::WARNING,
            HealthStatus::Critical => crate::error::nagios::CRITICAL,
            HealthStatus::Unknown => crate::error::nagios::UNKNOWN,
        }
    }

    /// Severity for the overall verdict: UNKNOWN counts between WARNING and CRITICAL.
    fn rank(self) -> u8 {
        match self {
            HealthStatus::Ok => 0,
            HealthStatus::Warning => 1,
            HealthStatus::Unknown => 2,
            HealthStatus::Critical => 3,
        }
    }
}

/// A measured value with its thresholds: a Nagios performance datum.
#[derive(Debug, Clone, Serialize)]
pub struct Perf {
    /// Label, e.g. `backup_age_seconds`.
    pub label: String,
    /// The value.
    pub value: f64,
    /// Nagios unit (`s`, `B`, `%`, `c` or empty).
    pub uom: &'static str,
    /// Warning threshold.
    pub warn: Option<f64>,
    /// Critical threshold.
    pub crit: Option<f64>,
}

/// One judged item.
#[derive(Debug, Clone, Serialize)]
pub struct HealthItem {
    /// Stable name, e.g. `backup_age`, `dump_age:app`, `last_run:backup`.
    pub name: String,
    /// Its verdict.
    pub status: HealthStatus,
    /// What was found, for humans.
    pub message: String,
    /// The measure, when there is one.
    pub perf: Option<Perf>,
}

impl HealthItem {
    fn new(name: impl Into<String>, status: HealthStatus, message: impl Into<String>) -> Self {
        HealthItem {
            name: name.into(),
            status,
            message: message.into(),
            perf: None,
        }
    }

    fn with_perf(mut self, label: String, value: f64, uom: &'static str) -> Self {
        self.perf = Some(Perf {
            label,
            value,
            uom,
            warn: None,
            crit: None,
        });
        self
    }

    fn thresholds(mut self, warn: Option<f64>, crit: Option<f64>) -> Self {
        if let Some(p) = &mut self.perf {
            p.warn = warn;
            p.crit = crit;
        }
        self
    }
}

/// Options of `pgkeep check`.
#[derive(Debug, Clone, Default)]
pub struct HealthOptions {
    /// The end-to-end archiving check's options.
    pub archive: ArchiveCheckOptions,
}

/// The archiving check's failure, kept to report it with its own kind and hint.
#[derive(Debug, Clone)]
struct ArchiveFailure {
    kind: ErrorKind,
    message: String,
    hint: Option<String>,
}

/// What `pgkeep check` found.
#[derive(Debug, Clone)]
pub struct HealthReport {
    /// Cluster name.
    pub cluster: String,
    /// The worst item's verdict.
    pub status: HealthStatus,
    /// Every item, in a stable order.
    pub items: Vec<HealthItem>,
    /// The end-to-end archiving check, when it ran and completed.
    pub archive: Option<ArchiveCheckReport>,
    archive_failure: Option<ArchiveFailure>,
}

impl Serialize for HealthReport {
    /// The archiving check's fields stay at the top level (as before `check` judged more than
    /// archiving), with `status` and `checks` beside them.
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let mut doc = match &self.archive {
            Some(a) => serde_json::to_value(a).map_err(S::Error::custom)?,
            None => serde_json::json!({}),
        };
        let map = doc.as_object_mut().expect("an object");
        map.insert("cluster".into(), self.cluster.clone().into());
        map.insert(
            "status".into(),
            serde_json::to_value(self.status).map_err(S::Error::custom)?,
        );
        map.insert(
            "checks".into(),
            serde_json::to_value(&self.items).map_err(S::Error::custom)?,
        );
        doc.serialize(s)
    }
}

impl fmt::Display for HealthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(a) = &self.archive {
            write!(f, "{a}")?;
            writeln!(f)?;
        }
        writeln!(
            f,
            "health of cluster {}: {}",
            self.cluster,
            self.status.word()
        )?;
        for i in &self.items {
            writeln!(f, "  {:<9} {:<26} {}", i.status.word(), i.name, i.message)?;
        }
        Ok(())
    }
}

impl Report for HealthReport {
    fn failure(&self) -> Option<Error> {
        if let Some(a) = &self.archive_failure {
            return Some(match &a.hint {
                Some(h) => Error::with_hint(a.kind, a.message.clone(), h.clone()),
                None => Error::new(a.kind, a.message.clone()),
            });
        }
        if let Some(e) = self.archive.as_ref().and_then(|a| a.failure()) {
            return Some(e);
        }
        let critical: Vec<String> = self
            .items
            .iter()
            .filter(|i| i.status == HealthStatus::Critical)
            .map(|i| format!("{}: {}", i.name, i.message))
            .collect();
        (!critical.is_empty()).then(|| {
            Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "cluster {} is not healthy: {}",
                    self.cluster,
                    critical.join("; ")
                ),
                "`pgkeep status` and `pgkeep history` show the details",
            )
        })
    }

    fn has_warnings(&self) -> bool {
        self.status != HealthStatus::Ok || self.archive.as_ref().is_some_and(|a| a.has_warnings())
    }
}

impl HealthReport {
    /// The one Nagios plugin line: `PGKEEP <STATUS> - <summary> | <perfdata>`.
    pub fn nagios_line(&self) -> String {
        let bad: Vec<String> = self
            .items
            .iter()
            .filter(|i| i.status != HealthStatus::Ok)
            .map(|i| format!("{}: {}", i.name, i.message))
            .collect();
        let summary = if bad.is_empty() {
            format!("cluster {}: {} checks ok", self.cluster, self.items.len())
        } else {
            format!("cluster {}: {}", self.cluster, bad.join("; "))
        };
        let perf: Vec<String> = self
            .items
            .iter()
            .filter_map(|i| i.perf.as_ref())
            .map(perf_text)
            .collect();
        // A `|` in the text would start the performance data early.
        let summary = summary.replace('|', "/").replace('\n', " ");
        format!(
            "PGKEEP {} - {summary} | {}",
            self.status.word(),
            perf.join(" ")
        )
    }
}

/// One performance datum: `'label'=value[uom];warn;crit`.
fn perf_text(p: &Perf) -> String {
    let num = |v: Option<f64>| v.map(|v| format!("{}", round3(v))).unwrap_or_default();
    let label = if p
        .label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        p.label.clone()
    } else {
        format!("'{}'", p.label.replace(['\'', '='], "_"))
    };
    format!(
        "{label}={}{};{};{}",
        round3(p.value),
        p.uom,
        num(p.warn),
        num(p.crit)
    )
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// `pgkeep check`: gathers, runs the archiving check when configured, judges.
pub async fn check(ctx: &Context, opts: &HealthOptions) -> Result<HealthReport> {
    let repo = open_repository_fast(ctx).await?;
    // Before the archiving check: its WAL switch would make the archive look fresh.
    let snap = snapshot::gather(ctx, &repo).await?;
    let settings = &ctx.settings.health;
    let (archive, archive_failure) = if settings.check_archiving {
        match check_archiving(ctx, &opts.archive).await {
            Ok(r) => (Some(r), None),
            Err(e) => {
                let (message, hint) = crate::history::split_message(&e.to_string());
                let kind = e.kind();
                (
                    None,
                    Some(ArchiveFailure {
                        kind,
                        message,
                        hint,
                    }),
                )
            }
        }
    } else {
        (None, None)
    };
    let mut items = judge(&snap, settings, archive.as_ref());
    if let Some(f) = &archive_failure {
        items.insert(
            0,
            HealthItem::new("wal_archiving", HealthStatus::Critical, f.message.clone()),
        );
    }
    let status = items
        .iter()
        .map(|i| i.status)
        .max_by_key(|s| s.rank())
        .unwrap_or(HealthStatus::Ok);
    Ok(HealthReport {
        cluster: snap.cluster.clone(),
        status,
        items,
        archive,
        archive_failure,
    })
}

/// Every item of the snapshot (and the archiving check, when it ran).
pub fn judge(
    snap: &Snapshot,
    s: &HealthSettings,
    archive: Option<&ArchiveCheckReport>,
) -> Vec<HealthItem> {
    let mut items = Vec::new();
    if let Some(a) = archive {
        items.push(archiving_item(a));
    }
    items.push(backup_age(snap, s));
    for (db, points) in &snap.dumps {
        items.push(dump_age(snap, s, db, points));
    }
    if let Some(i) = wal_age(snap, s, archive) {
        items.push(i);
    }
    items.extend(ready_item(snap, s, archive));
    items.extend(last_runs(snap, archive));
    if let Some(i) = size_item("backup_size", "physical backup", &snap.physical, s) {
        items.push(i);
    }
    for (db, points) in &snap.dumps {
        let what = format!("dump of {db}");
        items.extend(size_item(&format!("dump_size:{db}"), &what, points, s));
    }
    items.extend(duration_item("backup_duration", &snap.physical, s));
    for (db, points) in &snap.dumps {
        items.extend(duration_item(&format!("dump_duration:{db}"), points, s));
    }
    items.extend(space_item(
        "repository_free_space",
        snap.repo_space.as_ref(),
        s,
    ));
    items.extend(space_item("spool_free_space", snap.spool_space.as_ref(), s));
    items.push(locks_item(snap));
    items.extend(drill_item(snap, s));
    items
}

fn archiving_item(a: &ArchiveCheckReport) -> HealthItem {
    let (status, message) = match a.failure() {
        Some(e) => (
            HealthStatus::Critical,
            crate::history::split_message(&e.to_string()).0,
        ),
        None if a.failing => (
            HealthStatus::Warning,
            format!(
                "pg_stat_archiver shows a failure more recent than the last success ({})",
                a.last_failed_wal.as_deref().unwrap_or("?")
            ),
        ),
        // The archiving check's own warnings (exit 3 before `check` judged more) make the
        // item a warning, so `status` and the exit code agree.
        None if a.has_warnings() => (
            HealthStatus::Warning,
            a.warnings.first().cloned().unwrap_or_else(|| {
                format!(
                    "{} gap(s) in the WAL archive (no recovery window broken)",
                    a.gaps.len()
                )
            }),
        ),
        None => (
            HealthStatus::Ok,
            format!(
                "segment {} reached the repository in {:.1}s",
                a.switched_segment, a.waited_secs
            ),
        ),
    };
    HealthItem::new("wal_archiving", status, message).with_perf(
        "archiver_failed_count".into(),
        a.failed_count as f64,
        "c",
    )
}

/// Age against (warn, crit) limits.
fn judge_age(age: f64, warn: Limit, crit: Limit) -> HealthStatus {
    if crit.secs().is_some_and(|c| age > c) {
        HealthStatus::Critical
    } else if warn.secs().is_some_and(|w| age > w) {
        HealthStatus::Warning
    } else {
        HealthStatus::Ok
    }
}

fn age_secs(now: DateTime<Utc>, t: DateTime<Utc>) -> f64 {
    ((now - t).num_milliseconds() as f64 / 1000.0).max(0.0)
}

/// Human text for a number of seconds.
pub fn human_age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn backup_age(snap: &Snapshot, s: &HealthSettings) -> HealthItem {
    let (warn, crit) = (s.backup_warn_age, s.backup_crit_age);
    let newest = snap.physical.iter().rev().find_map(|b| b.stop_time);
    let Some(t) = newest else {
        // Not judged: a cluster backed up by dumps only, or one just set up. A backup that
        // was attempted and failed shows as `last_run:backup`.
        return HealthItem::new(
            "backup_age",
            HealthStatus::Ok,
            "no physical backup in the repository (not judged)",
        );
    };
    let age = age_secs(snap.now, t);
    HealthItem::new(
        "backup_age",
        judge_age(age, warn, crit),
        format!(
            "newest physical backup completed {} ago (warn {warn}, crit {crit})",
            human_age(age)
        ),
    )
    .with_perf("backup_age_seconds".into(), age, "s")
    .thresholds(warn.secs(), crit.secs())
}

fn dump_age(snap: &Snapshot, s: &HealthSettings, db: &str, points: &[BackupPoint]) -> HealthItem {
    let (warn, crit) = (s.dump_warn_age, s.dump_crit_age);
    let name = format!("dump_age:{db}");
    let Some(t) = points.iter().rev().find_map(|b| b.stop_time) else {
        return HealthItem::new(name, HealthStatus::Unknown, "dumps without a stop time");
    };
    let age = age_secs(snap.now, t);
    HealthItem::new(
        name,
        judge_age(age, warn, crit),
        format!(
            "newest dump of {db} completed {} ago (warn {warn}, crit {crit})",
            human_age(age)
        ),
    )
    .with_perf(format!("dump_age_seconds_{}", perf_safe(db)), age, "s")
    .thresholds(warn.secs(), crit.secs())
}

fn perf_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Age of the newest archived segment, measured before any WAL switch of this check.
fn wal_age(
    snap: &Snapshot,
    s: &HealthSettings,
    archive: Option<&ArchiveCheckReport>,
) -> Option<HealthItem> {
    let t = snap.wal.newest_time?;
    let age = age_secs(snap.now, t);
    let derived = archive
        .and_then(|a| a.archive_timeout_setting_secs)
        .filter(|&t| t > 0)
        .map(|t| Limit::After(std::time::Duration::from_secs(2 * t + 60)));
    let warn = s.wal_warn_age.or(derived).unwrap_or(Limit::Off);
    let crit = s.wal_crit_age;
    let status = judge_age(age, warn, crit);
    let message = format!(
        "newest archived WAL written {} ago (warn {warn}, crit {crit})",
        human_age(age)
    );
    Some(
        HealthItem::new("wal_age", status, message)
            .with_perf("wal_archive_age_seconds".into(), age, "s")
            .thresholds(warn.secs(), crit.secs()),
    )
}

/// Segments waiting: `.ready` files on the server and error verdicts in the spool.
fn ready_item(
    snap: &Snapshot,
    s: &HealthSettings,
    archive: Option<&ArchiveCheckReport>,
) -> Vec<HealthItem> {
    let mut out = Vec::new();
    if let Some(n) = archive.and_then(|a| a.ready_segments) {
        let n = n.max(0) as u64;
        let status = if n > s.ready_crit {
            HealthStatus::Critical
        } else if n > s.ready_warn {
            HealthStatus::Warning
        } else {
            HealthStatus::Ok
        };
        out.push(
            HealthItem::new(
                "wal_ready",
                status,
                format!("{n} WAL segments waiting to be archived (.ready)"),
            )
            .with_perf("wal_ready_segments".into(), n as f64, "")
            .thresholds(Some(s.ready_warn as f64), Some(s.ready_crit as f64)),
        );
    }
    if let Some(n) = snap.spool_errors {
        let status = if n > 0 {
            HealthStatus::Warning
        } else {
            HealthStatus::Ok
        };
        out.push(
            HealthItem::new(
                "spool_errors",
                status,
                format!("{n} failed pushes waiting in the archiving spool"),
            )
            .with_perf("spool_error_segments".into(), n as f64, ""),
        );
    }
    out
}

/// The newest run of each kind (and database) that the history knows: failed is critical,
/// interrupted a warning. `archive-push` records failures only, so its newest record stays a
/// failure after the cause is gone: it counts as resolved when the server's archiver has
/// succeeded since its last failure and the segment switched by this check arrived.
fn last_runs(snap: &Snapshot, archive: Option<&ArchiveCheckReport>) -> Vec<HealthItem> {
    let archiving_recovered = archive.is_some_and(|a| a.arrived && !a.failing);
    crate::history::newest_per_group(&snap.history)
        .into_iter()
        .filter(|((kind, _), _)| *kind != RunKind::Drill)
        .map(|((kind, db), r)| {
            let name = match &db {
                Some(d) => format!("last_run:{kind}:{d}"),
                None => format!("last_run:{kind}"),
            };
            let when = human_age(age_secs(snap.now, r.ended));
            let (status, message) = match r.result {
                RunResult::Ok => (HealthStatus::Ok, format!("ok {when} ago")),
                RunResult::Warning => (HealthStatus::Ok, format!("ok with warnings {when} ago")),
                RunResult::Interrupted => {
                    (HealthStatus::Warning, format!("interrupted {when} ago"))
                }
                RunResult::Failed if kind == RunKind::ArchivePush && archiving_recovered => (
                    HealthStatus::Ok,
                    format!(
                        "failed {when} ago (exit {}): {}; archiving has succeeded since",
                        r.exit_code,
                        r.error.as_deref().unwrap_or("no message")
                    ),
                ),
                RunResult::Failed => (
                    HealthStatus::Critical,
                    format!(
                        "failed {when} ago on {} (exit {}): {}",
                        r.host,
                        r.exit_code,
                        r.error.as_deref().unwrap_or("no message")
                    ),
                ),
            };
            HealthItem::new(name, status, message)
        })
        .collect()
}

/// How many previous runs the newest is compared with.
const COMPARE_WITH: usize = 5;

fn previous_mean(points: &[BackupPoint], f: impl Fn(&BackupPoint) -> Option<f64>) -> Option<f64> {
    let prev: Vec<f64> = points
        .iter()
        .rev()
        .skip(1)
        .take(COMPARE_WITH)
        .filter_map(f)
        .collect();
    (!prev.is_empty()).then(|| prev.iter().sum::<f64>() / prev.len() as f64)
}

/// The newest size against the mean of the previous ones: a big drop is the sign of an
/// empty or truncated dump.
fn size_item(
    name: &str,
    what: &str,
    points: &[BackupPoint],
    s: &HealthSettings,
) -> Option<HealthItem> {
    let newest = points.last()?;
    let mean = previous_mean(points, |p| Some(p.bytes as f64))?;
    if mean <= 0.0 {
        return None;
    }
    let drop = ((mean - newest.bytes as f64) / mean * 100.0).max(0.0);
    let status = if drop > s.size_drop_crit as f64 {
        HealthStatus::Critical
    } else if drop > s.size_drop_warn as f64 {
        HealthStatus::Warning
    } else {
        HealthStatus::Ok
    };
    Some(
        HealthItem::new(
            name,
            status,
            format!(
                "newest {what} {} is {} bytes, {drop:.0}% below the mean of the previous ones ({:.0}) (warn {}%, crit {}%)",
                newest.id, newest.bytes, mean, s.size_drop_warn, s.size_drop_crit
            ),
        )
        .with_perf(format!("{}_drop_percent", perf_safe(name)), drop, "%")
        .thresholds(Some(s.size_drop_warn as f64), Some(s.size_drop_crit as f64)),
    )
}

/// The newest duration against the previous ones (and an absolute limit, when set).
fn duration_item(name: &str, points: &[BackupPoint], s: &HealthSettings) -> Option<HealthItem> {
    let newest = points.last()?.duration_secs?;
    let mean = previous_mean(points, |p| p.duration_secs);
    // Under a minute, doubling is noise (a connection, a checkpoint), not a trend.
    let grown = mean
        .filter(|m| newest > 60.0 && newest > m * (1.0 + s.duration_growth_warn as f64 / 100.0));
    let over = s.duration_warn.secs().filter(|l| newest > *l);
    let status = if grown.is_some() || over.is_some() {
        HealthStatus::Warning
    } else {
        HealthStatus::Ok
    };
    let vs = mean
        .map(|m| format!(" (previous ones {m:.1}s on average)"))
        .unwrap_or_default();
    Some(
        HealthItem::new(name, status, format!("newest took {newest:.1}s{vs}"))
            .with_perf(format!("{}_seconds", perf_safe(name)), newest, "s")
            .thresholds(s.duration_warn.secs(), None),
    )
}

fn space_item(name: &str, space: Option<&Space>, s: &HealthSettings) -> Option<HealthItem> {
    let sp = space?;
    let pct = sp.free_percent();
    let status = if pct < s.free_space_crit as f64 {
        HealthStatus::Critical
    } else if pct < s.free_space_warn as f64 {
        HealthStatus::Warning
    } else {
        HealthStatus::Ok
    };
    Some(
        HealthItem::new(
            name,
            status,
            format!(
                "{:.1}% free ({} bytes) on the file system of {}",
                pct,
                sp.free_bytes,
                sp.path.display()
            ),
        )
        .with_perf(format!("{name}_percent"), pct, "%")
        .thresholds(
            Some(s.free_space_warn as f64),
            Some(s.free_space_crit as f64),
        ),
    )
}

fn locks_item(snap: &Snapshot) -> HealthItem {
    let stale: Vec<String> = snap
        .locks
        .iter()
        .filter(|l| l.stale)
        .map(|l| format!("{} (pid {} on {}, {})", l.id, l.pid, l.host, l.purpose))
        .collect();
    let item = if stale.is_empty() {
        HealthItem::new(
            "stale_locks",
            HealthStatus::Ok,
            format!("no stale lock ({} held)", snap.locks.len()),
        )
    } else {
        HealthItem::new(
            "stale_locks",
            HealthStatus::Warning,
            format!(
                "stale locks: {}; `pgkeep repo unlock` removes them",
                stale.join(", ")
            ),
        )
    };
    item.with_perf("stale_locks".into(), stale.len() as f64, "")
}

fn drill_item(snap: &Snapshot, s: &HealthSettings) -> Option<HealthItem> {
    let last = snap.history.iter().rev().find(|r| r.kind == RunKind::Drill);
    let Some(r) = last else {
        return (s.drill_max_age != Limit::Off).then(|| {
            HealthItem::new(
                "drill",
                HealthStatus::Warning,
                "no restore drill recorded yet",
            )
        });
    };
    let age = age_secs(snap.now, r.ended);
    let status = if r.result == RunResult::Failed {
        HealthStatus::Critical
    } else {
        judge_age(age, s.drill_max_age, Limit::Off)
    };
    Some(
        HealthItem::new(
            "drill",
            status,
            format!(
                "last restore drill {} {} ago{}",
                r.result.as_str(),
                human_age(age),
                r.rto_secs
                    .map(|s| format!(" (recovery time {s:.1} s)"))
                    .unwrap_or_default()
            ),
        )
        .with_perf("drill_age_seconds".into(), age, "s")
        .thresholds(s.drill_max_age.secs(), None),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: &str, bytes: u64, secs: f64) -> BackupPoint {
        BackupPoint {
            id: id.into(),
            start_time: None,
            stop_time: None,
            bytes,
            stored_bytes: 0,
            duration_secs: Some(secs),
        }
    }

    #[test]
    fn a_drop_over_half_is_critical() {
        let s = HealthSettings::default();
        let pts = vec![
            point("a", 1000, 1.0),
            point("b", 1100, 1.0),
            point("c", 400, 1.0),
        ];
        let i = size_item("dump_size:app", "dump of app", &pts, &s).unwrap();
        assert_eq!(i.status, HealthStatus::Critical, "{}", i.message);
        let pts = vec![point("a", 1000, 1.0), point("b", 700, 1.0)];
        let i = size_item("x", "x", &pts, &s).unwrap();
        assert_eq!(i.status, HealthStatus::Warning, "{}", i.message);
        let pts = vec![point("a", 1000, 1.0), point("b", 5000, 1.0)];
        let i = size_item("x", "x", &pts, &s).unwrap();
        assert_eq!(i.status, HealthStatus::Ok, "{}", i.message);
        assert!(size_item("x", "x", &pts[..1], &s).is_none());
    }

    #[test]
    fn durations_warn_when_twice_as_long_and_over_a_minute() {
        let s = HealthSettings::default();
        let pts = vec![point("a", 1, 100.0), point("b", 1, 250.0)];
        assert_eq!(
            duration_item("d", &pts, &s).unwrap().status,
            HealthStatus::Warning
        );
        let pts = vec![point("a", 1, 10.0), point("b", 1, 50.0)];
        assert_eq!(
            duration_item("d", &pts, &s).unwrap().status,
            HealthStatus::Ok
        );
    }

    #[test]
    fn the_nagios_line_has_one_line_and_perfdata() {
        let r = HealthReport {
            cluster: "main".into(),
            status: HealthStatus::Warning,
            items: vec![
                HealthItem::new("backup_age", HealthStatus::Warning, "old | very")
                    .with_perf("backup_age_seconds".into(), 12.5, "s")
                    .thresholds(Some(10.0), Some(20.0)),
            ],
            archive: None,
            archive_failure: None,
        };
        let line = r.nagios_line();
        assert_eq!(
            line,
            "PGKEEP WARNING - cluster main: backup_age: old / very | backup_age_seconds=12.5s;10;20"
        );
        assert_eq!(r.status.nagios_code(), 1);
    }
}
