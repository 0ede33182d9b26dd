//! `pgkeep metrics`: the health figures as Prometheus text exposition (format 0.0.4, what
//! node_exporter's textfile collector reads), or as CloudWatch embedded metric format.
//!
//! Hand-formatted rather than through `prometheus-client`: that crate writes OpenMetrics
//! (`# EOF`, `# UNIT`, counters typed without their `_total`), which the textfile collector
//! and `promtool check metrics` read as a different format; the few lines below write
//! exactly the classic format, with label values escaped as it specifies.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use chrono::{DateTime, Utc};
use pgkeep_pg::{ConnParams, PgClient};
use pgkeep_repo::Repository;
use serde::Serialize;

use crate::commands::archive::{open_repository_fast, segment_size};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::health::snapshot::{self, BackupPoint, Snapshot};
use crate::health::status::{recovery_window, RecoveryWindow};
use crate::history::{newest_per_group, RunKind, RunResult};

/// One sample: a value with its labels.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Label pairs, in order.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

/// One metric family.
#[derive(Debug, Clone, Serialize)]
pub struct Family {
    /// Full name, `pgkeep_` prefix and unit suffix included.
    pub name: &'static str,
    /// `gauge` or `counter`.
    pub kind: &'static str,
    /// HELP text.
    pub help: &'static str,
    /// Samples.
    pub samples: Vec<Sample>,
}

/// Every family, in output order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Metrics {
    /// Families, each name once.
    pub families: Vec<Family>,
}

impl Metrics {
    fn add(&mut self, name: &'static str, kind: &'static str, help: &'static str) -> &mut Family {
        self.families.push(Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        });
        self.families.last_mut().expect("pushed")
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        for f in self.families.iter().filter(|f| !f.samples.is_empty()) {
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
            for s in &f.samples {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = writeln!(
                    out,
                    "{}{{{}}} {}",
                    f.name,
                    labels.join(","),
                    number(s.value)
                );
            }
        }
        out
    }
}

impl Family {
    fn push(&mut self, labels: Vec<(&'static str, String)>, value: f64) {
        self.samples.push(Sample { labels, value });
    }
}

/// Label value escaping of the text format: backslash, double quote, line feed.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

fn labels(cluster: &str, pairs: &[(&'static str, Option<&str>)]) -> Vec<(&'static str, String)> {
    let mut l = vec![("cluster", cluster.to_string())];
    for (k, v) in pairs {
        l.push((k, v.unwrap_or("").to_string()));
    }
    l
}

/// The WAL lag against the server, when a connection is configured and answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerLag {
    /// Bytes of WAL written by the server past the end of the newest archived segment.
    pub bytes: Option<u64>,
}

/// Builds the families from a snapshot (and the recovery window and server lag).
pub fn build(snap: &Snapshot, window: &RecoveryWindow, lag: ServerLag) -> Metrics {
    let mut m = Metrics::default();
    let c = snap.cluster.as_str();
    run_families(&mut m, snap);
    backup_families(&mut m, snap);
    let f = m.add(
        "pgkeep_wal_archive_lag_seconds",
        "gauge",
        "Seconds since the newest WAL object of the archive was written.",
    );
    if let Some(t) = snap.wal.newest_time {
        f.push(
            labels(c, &[]),
            (snap.now - t).num_milliseconds() as f64 / 1000.0,
        );
    }
    let f = m.add(
        "pgkeep_wal_archive_lag_bytes",
        "gauge",
        "Bytes of WAL the server wrote past the end of the newest archived segment.",
    );
    if let Some(b) = lag.bytes {
        f.push(labels(c, &[]), b as f64);
    }
    let f = m.add(
        "pgkeep_wal_archived_segments",
        "gauge",
        "Complete WAL segments in the archive.",
    );
    f.push(labels(c, &[]), snap.wal.segments as f64);
    let f = m.add(
        "pgkeep_recovery_window_start_timestamp_seconds",
        "gauge",
        "Earliest time point-in-time recovery can reach (end of the oldest physical backup).",
    );
    if let Some(t) = window.earliest {
        f.push(labels(c, &[]), ts(t));
    }
    let f = m.add(
        "pgkeep_recovery_window_end_timestamp_seconds",
        "gauge",
        "Latest time point-in-time recovery can reach (last transaction in gap-free archived WAL).",
    );
    if let Some(t) = window.latest {
        f.push(labels(c, &[]), ts(t));
    }
    repository_families(&mut m, snap);
    drill_families(&mut m, snap);
    let f = m.add(
        "pgkeep_metrics_generated_timestamp_seconds",
        "gauge",
        "When these metrics were computed.",
    );
    f.push(labels(c, &[]), ts(snap.now));
    m
}

fn run_families(m: &mut Metrics, snap: &Snapshot) {
    let c = snap.cluster.as_str();
    let newest = newest_per_group(&snap.history);
    let f = m.add(
        "pgkeep_last_run_result",
        "gauge",
        "Result of the newest recorded run per kind and database (1 for its result, 0 for the others).",
    );
    for ((kind, db), r) in &newest {
        for res in [
            RunResult::Ok,
            RunResult::Warning,
            RunResult::Failed,
            RunResult::Interrupted,
        ] {
            let mut l = labels(
                c,
                &[("kind", Some(kind.as_str())), ("database", db.as_deref())],
            );
            l.push(("result", res.as_str().to_string()));
            f.push(l, if r.result == res { 1.0 } else { 0.0 });
        }
    }
    let f = m.add(
        "pgkeep_last_run_timestamp_seconds",
        "gauge",
        "End time of the newest recorded run per kind and database.",
    );
    for ((kind, db), r) in &newest {
        let l = labels(
            c,
            &[("kind", Some(kind.as_str())), ("database", db.as_deref())],
        );
        f.push(l, ts(r.ended));
    }
    let f = m.add(
        "pgkeep_last_success_timestamp_seconds",
        "gauge",
        "End time of the newest successful run per kind and database.",
    );
    let mut success: BTreeMap<(RunKind, Option<String>), DateTime<Utc>> = BTreeMap::new();
    for r in snap
        .history
        .iter()
        .filter(|r| r.result != RunResult::Failed)
    {
        if r.result != RunResult::Interrupted {
            success.insert((r.kind, r.database.clone()), r.ended);
        }
    }
    for ((kind, db), t) in &success {
        let l = labels(
            c,
            &[("kind", Some(kind.as_str())), ("database", db.as_deref())],
        );
        f.push(l, ts(*t));
    }
    let f = m.add(
        "pgkeep_run_failures_total",
        "counter",
        "Failed runs per kind in the kept run history (expire compacts it: a drop is a counter reset).",
    );
    for kind in RunKind::ALL {
        let n = snap
            .history
            .iter()
            .filter(|r| r.kind == kind && r.result == RunResult::Failed)
            .count();
        f.push(labels(c, &[("kind", Some(kind.as_str()))]), n as f64);
    }
    let f = m.add(
        "pgkeep_storage_retries_total",
        "counter",
        "Storage requests retried after a temporary error (5xx, SlowDown, reset, timeout), per kind of run, in the kept run history (expire compacts it: a drop is a counter reset).",
    );
    for kind in RunKind::ALL {
        let n: u64 = snap
            .history
            .iter()
            .filter(|r| r.kind == kind)
            .filter_map(|r| r.storage_retries)
            .sum();
        f.push(labels(c, &[("kind", Some(kind.as_str()))]), n as f64);
    }
}

/// Newest physical backup (kind `backup`) and newest dump per database (kind `dump`).
fn newest_points(snap: &Snapshot) -> Vec<(&'static str, Option<&str>, &BackupPoint)> {
    let mut out = Vec::new();
    if let Some(b) = snap.physical.last() {
        out.push(("backup", None, b));
    }
    for (db, p) in &snap.dumps {
        if let Some(b) = p.last() {
            out.push(("dump", Some(db.as_str()), b));
        }
    }
    out
}

fn backup_families(m: &mut Metrics, snap: &Snapshot) {
    let c = snap.cluster.as_str();
    let newest = newest_points(snap);
    let lab =
        |kind: &'static str, db: Option<&str>| labels(c, &[("kind", Some(kind)), ("database", db)]);
    let f = m.add(
        "pgkeep_backup_completed_timestamp_seconds",
        "gauge",
        "Completion time of the newest physical backup, and of the newest dump per database.",
    );
    for (kind, db, b) in &newest {
        if let Some(t) = b.stop_time {
            f.push(lab(kind, *db), ts(t));
        }
    }
    let f = m.add(
        "pgkeep_backup_size_bytes",
        "gauge",
        "Size of the newest physical backup (data files) and dump (pg_dump archive) per database.",
    );
    for (kind, db, b) in &newest {
        f.push(lab(kind, *db), b.bytes as f64);
    }
    let f = m.add(
        "pgkeep_backup_duration_seconds",
        "gauge",
        "Duration of the newest physical backup and dump per database.",
    );
    for (kind, db, b) in &newest {
        if let Some(d) = b.duration_secs {
            f.push(lab(kind, *db), d);
        }
    }
    let f = m.add(
        "pgkeep_backups",
        "gauge",
        "Physical backups, and dumps per database, kept in the repository.",
    );
    f.push(lab("backup", None), snap.physical.len() as f64);
    for (db, p) in &snap.dumps {
        f.push(lab("dump", Some(db)), p.len() as f64);
    }
}

fn repository_families(m: &mut Metrics, snap: &Snapshot) {
    let c = snap.cluster.as_str();
    let f = m.add(
        "pgkeep_repository_size_bytes",
        "gauge",
        "Bytes stored in the repository per top-level prefix (packs, index, wal, ...).",
    );
    for (prefix, (_, bytes)) in &snap.repo.by_prefix {
        f.push(labels(c, &[("prefix", Some(prefix))]), *bytes as f64);
    }
    let f = m.add(
        "pgkeep_repository_objects",
        "gauge",
        "Objects in the repository per top-level prefix.",
    );
    for (prefix, (n, _)) in &snap.repo.by_prefix {
        f.push(labels(c, &[("prefix", Some(prefix))]), *n as f64);
    }
    let f = m.add(
        "pgkeep_repository_free_bytes",
        "gauge",
        "Free bytes on the file system of a local repository.",
    );
    if let Some(s) = &snap.repo_space {
        f.push(labels(c, &[]), s.free_bytes as f64);
    }
    let f = m.add(
        "pgkeep_repository_stale_locks",
        "gauge",
        "Stale locks in the repository.",
    );
    f.push(
        labels(c, &[]),
        snap.locks.iter().filter(|l| l.stale).count() as f64,
    );
}

fn drill_families(m: &mut Metrics, snap: &Snapshot) {
    let c = snap.cluster.as_str();
    let last = snap.history.iter().rev().find(|r| r.kind == RunKind::Drill);
    let f = m.add(
        "pgkeep_drill_last_timestamp_seconds",
        "gauge",
        "End time of the newest restore drill.",
    );
    if let Some(r) = last {
        f.push(labels(c, &[]), ts(r.ended));
    }
    let f = m.add(
        "pgkeep_drill_rto_seconds",
        "gauge",
        "Recovery time measured by the newest successful restore drill (restore, WAL replay and checks).",
    );
    let ok = snap
        .history
        .iter()
        .rev()
        .find(|r| r.kind == RunKind::Drill && r.result == RunResult::Ok);
    if let Some(r) = ok {
        f.push(
            labels(c, &[]),
            r.rto_secs.unwrap_or_else(|| r.duration_secs()),
        );
    }
}

/// The server's WAL position past the newest archived segment, when a connection is
/// configured (`cluster.pg`/`PGKEEP_PG`/`--pg`); `None` otherwise or when it fails (logged).
async fn server_lag(ctx: &Context, repo: &Repository, snap: &Snapshot) -> ServerLag {
    let Some(conninfo) = ctx.settings.cluster.pg.as_deref() else {
        return ServerLag::default();
    };
    let Some(newest) = snap
        .wal
        .newest_segment
        .as_deref()
        .and_then(|s| s.parse::<pgkeep_pg::wal::WalSegmentName>().ok())
    else {
        return ServerLag::default();
    };
    let lag = async {
        let seg_size = segment_size(repo, &snap.cluster).await.ok()?;
        let params = ConnParams::resolve(Some(conninfo)).ok()?;
        let client = PgClient::connect(&params).await.ok()?;
        let lsn: pgkeep_pg::Lsn = client
            .query_text(
                "reading the WAL position",
                "SELECT pg_current_wal_lsn()::text",
            )
            .await
            .ok()??
            .parse()
            .ok()?;
        let end = newest.next(seg_size).start_lsn(seg_size);
        Some(lsn.0.saturating_sub(end.0))
    };
    let bytes = tokio::time::timeout(std::time::Duration::from_secs(10), lag)
        .await
        .ok()
        .flatten();
    if bytes.is_none() {
        tracing::warn!(
            "metrics: the server's WAL position could not be read; lag in bytes left out"
        );
    }
    ServerLag { bytes }
}

/// Output formats of `pgkeep metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum MetricsFormat {
    /// Prometheus text exposition (node_exporter textfile collector).
    #[default]
    Prometheus,
    /// CloudWatch embedded metric format: one JSON document per line.
    CloudwatchJson,
}

/// Gathers the metrics of the context's cluster.
pub async fn gather(ctx: &Context) -> Result<(Snapshot, Metrics)> {
    let repo = open_repository_fast(ctx).await?;
    let snap = snapshot::gather(ctx, &repo).await?;
    let window = recovery_window(&repo, &snap).await.unwrap_or_else(|e| {
        tracing::warn!("metrics: recovery window of {}: {e}", snap.cluster);
        RecoveryWindow::default()
    });
    let lag = server_lag(ctx, &repo, &snap).await;
    let m = build(&snap, &window, lag);
    Ok((snap, m))
}

/// CloudWatch embedded metric format: the figures of the four classic alarms (backup age,
/// size drop, duration, time since the last drill) and the WAL lag, with the cluster as
/// dimension; the CloudWatch agent turns each line into metrics in namespace `pgkeep`.
pub fn to_cloudwatch(snap: &Snapshot, m: &Metrics) -> String {
    let now = snap.now;
    let age = |t: Option<DateTime<Utc>>| t.map(|t| (now - t).num_milliseconds() as f64 / 1000.0);
    let mut values: Vec<(&str, &str, Option<f64>)> = vec![
        (
            "BackupAgeSeconds",
            "Seconds",
            age(snap.physical.last().and_then(|b| b.stop_time)),
        ),
        (
            "OldestNewestDumpAgeSeconds",
            "Seconds",
            snap.dumps
                .values()
                .filter_map(|p| age(p.last().and_then(|b| b.stop_time)))
                .reduce(f64::max),
        ),
        (
            "SizeDropPercent",
            "Percent",
            std::iter::once(&snap.physical)
                .chain(snap.dumps.values())
                .filter_map(|p| size_drop(p))
                .reduce(f64::max),
        ),
        (
            "LastBackupDurationSeconds",
            "Seconds",
            std::iter::once(&snap.physical)
                .chain(snap.dumps.values())
                .filter_map(|p| p.last().and_then(|b| b.duration_secs))
                .reduce(f64::max),
        ),
        (
            "DrillAgeSeconds",
            "Seconds",
            age(snap
                .history
                .iter()
                .rev()
                .find(|r| r.kind == RunKind::Drill && r.result == RunResult::Ok)
                .map(|r| r.ended)),
        ),
        ("WalArchiveLagSeconds", "Seconds", age(snap.wal.newest_time)),
    ];
    let failures: f64 = m
        .families
        .iter()
        .filter(|f| f.name == "pgkeep_run_failures_total")
        .flat_map(|f| f.samples.iter().map(|s| s.value))
        .sum();
    values.push(("RecordedFailures", "Count", Some(failures)));
    let present: Vec<_> = values
        .iter()
        .filter_map(|(n, u, v)| v.map(|v| (*n, *u, v)))
        .collect();
    let mut doc = serde_json::json!({
        "_aws": {
            "Timestamp": now.timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": "pgkeep",
                "Dimensions": [["cluster"]],
                "Metrics": present.iter().map(|(n, u, _)| serde_json::json!({"Name": n, "Unit": u})).collect::<Vec<_>>(),
            }]
        },
        "cluster": snap.cluster,
    });
    for (n, _, v) in &present {
        doc[*n] = serde_json::json!(v);
    }
    format!("{doc}\n")
}

/// Drop of the newest size below the mean of the previous ones, percent (0 when it grew).
fn size_drop(points: &[BackupPoint]) -> Option<f64> {
    let (newest, prev) = points.split_last()?;
    let prev: Vec<f64> = prev.iter().rev().take(5).map(|p| p.bytes as f64).collect();
    if prev.is_empty() {
        return None;
    }
    let mean = prev.iter().sum::<f64>() / prev.len() as f64;
    (mean > 0.0).then(|| ((mean - newest.bytes as f64) / mean * 100.0).max(0.0))
}

/// Writes `text` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed over `path`, so the textfile collector never reads half a file.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "metrics".into());
    // A leading dot: the textfile collector reads only `*.prom`, never this temporary.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("writing metrics to {}", path.display()), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_and_empty_families_left_out() {
        let mut m = Metrics::default();
        m.add("pgkeep_x_bytes", "gauge", "X.")
            .push(vec![("database", "a\"b\\c\nd".to_string())], 1.5);
        m.add("pgkeep_empty", "gauge", "Nothing.");
        let text = m.to_prometheus();
        assert_eq!(
            text,
            "# HELP pgkeep_x_bytes X.\n# TYPE pgkeep_x_bytes gauge\npgkeep_x_bytes{database=\"a\\\"b\\\\c\\nd\"} 1.5\n"
        );
    }

    #[test]
    fn write_atomically_leaves_the_whole_file_and_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pgkeep.prom");
        write_atomically(&p, "a 1\n").unwrap();
        write_atomically(&p, "a 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a 2\n");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
