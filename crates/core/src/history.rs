//! Run history: what every `backup`, `dump`, `archive-push` failure, `expire`, `verify` (and
//! later `copy`, `drill`, scheduled `check`) ended with, kept in the repository so that every
//! host sharing it sees the same history.
//!
//! A record is a small sealed object (JSON, compressed, encrypted like every piece of
//! metadata, the key as associated data) under
//! `history/<cluster>/<ended>-<kind>-<random>`, where `<ended>` is the end time in UTC to the
//! microsecond (`20261204T213000.123456Z`), so names sort by time, and `<random>` is 16 hex
//! digits, so two hosts finishing in the same microsecond never collide. A record is written
//! once (create-if-absent) and never changed; `expire` removes old ones (see
//! [`expire_history`]). Records never hold secrets: messages pass through
//! [`crate::secrets::redact`] and no connection string or passphrase is ever put in one.
//!
//! [`recorded`] is the one place commands are wrapped (the CLI now, the daemon later): it
//! runs the command, writes the record and hands it to a [`RunObserver`] (notifications).
//! Recording never changes the command's outcome: a failure to record is a warning on stderr.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use pgkeep_repo::Repository;
use serde::{Deserialize, Serialize};

use crate::commands::archive::open_repository_fast;
use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};

/// Layout version of a record. Readers skip records of a newer version.
pub const HISTORY_FORMAT: u32 = 1;
/// Default age after which `expire` removes records (the newest of each group stays).
pub const DEFAULT_HISTORY_MAX_AGE_DAYS: u64 = 90;
/// How long recording may take before it is given up (a warning): the command is done.
const RECORD_TIMEOUT: Duration = Duration::from_secs(20);
/// Time format of the first part of a record's name.
const NAME_TIME_FORMAT: &str = "%Y%m%dT%H%M%S%.6fZ";

/// Which command a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum RunKind {
    /// `pgkeep backup`.
    Backup,
    /// `pgkeep dump`.
    Dump,
    /// `pgkeep archive-push` (failures only, see [`RunStart::failures_only`]).
    ArchivePush,
    /// `pgkeep expire`.
    Expire,
    /// `pgkeep verify`.
    Verify,
    /// `pgkeep copy`.
    Copy,
    /// `pgkeep drill`.
    Drill,
    /// `pgkeep check` (recorded by the scheduler, not by interactive runs).
    Check,
}

impl RunKind {
    /// Every kind, in a stable order.
    pub const ALL: [RunKind; 8] = [
        RunKind::Backup,
        RunKind::Dump,
        RunKind::ArchivePush,
        RunKind::Expire,
        RunKind::Verify,
        RunKind::Copy,
        RunKind::Drill,
        RunKind::Check,
    ];

    /// The spelling in names, JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Backup => "backup",
            RunKind::Dump => "dump",
            RunKind::ArchivePush => "archive-push",
            RunKind::Expire => "expire",
            RunKind::Verify => "verify",
            RunKind::Copy => "copy",
            RunKind::Drill => "drill",
            RunKind::Check => "check",
        }
    }

    fn parse(s: &str) -> Option<RunKind> {
        RunKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for RunKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    /// Exit 0.
    Ok,
    /// Exit 3: done, with warnings.
    Warning,
    /// Any other exit code.
    Failed,
    /// Stopped by SIGINT or SIGTERM (exit 130).
    Interrupted,
}

impl RunResult {
    /// The result of an exit code.
    pub fn from_exit_code(code: i32) -> RunResult {
        match code {
            0 => RunResult::Ok,
            3 => RunResult::Warning,
            130 => RunResult::Interrupted,
            _ => RunResult::Failed,
        }
    }

    /// The spelling in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Ok => "ok",
            RunResult::Warning => "warning",
            RunResult::Failed => "failed",
            RunResult::Interrupted => "interrupted",
        }
    }
}

/// One finished run, as stored under `history/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// [`HISTORY_FORMAT`].
    pub format: u32,
    /// The command.
    pub kind: RunKind,
    /// Cluster name.
    pub cluster: String,
    /// The database, for a dump of one database (`None` for `dump --all` and other kinds).
    #[serde(default)]
    pub database: Option<String>,
    /// When the command started.
    pub started: DateTime<Utc>,
    /// When it ended.
    pub ended: DateTime<Utc>,
    /// How it ended.
    pub result: RunResult,
    /// The process exit code it had (or would have had, for a library caller).
    pub exit_code: i32,
    /// Bytes read from the cluster.
    #[serde(default)]
    pub bytes_read: Option<u64>,
    /// Bytes new to the repository (before compression).
    #[serde(default)]
    pub bytes_new: Option<u64>,
    /// Bytes added to the repository (compressed, sealed).
    #[serde(default)]
    pub bytes_stored: Option<u64>,
    /// The error's message (redacted), for failures and warnings.
    #[serde(default)]
    pub error: Option<String>,
    /// The error's hint (redacted).
    #[serde(default)]
    pub hint: Option<String>,
    /// The host that ran it.
    pub host: String,
    /// pgkeep's version.
    pub version: String,
    /// The backup or dump made, when one was (for a drill: the one drilled).
    #[serde(default)]
    pub backup_id: Option<String>,
    /// A drill's measured recovery time (restore, replay and checks), seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_secs: Option<f64>,
    /// What the run did, in one line (a drill: its checks and recovery time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Storage requests this process retried after a temporary error (HTTP 5xx, SlowDown,
    /// a reset or a timeout), when there were any: a store that needs retries shows here
    /// and in `pgkeep_storage_retries_total` before it fails outright. The count is the
    /// process's ([`pgkeep_repo::storage::global_retry_counter`]): one run per process for
    /// the CLI and the daemon's jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_retries: Option<u64>,
    /// HTTP requests this process sent to object storage, by method (`GET`, `PUT`, `POST`,
    /// `HEAD`, `DELETE`), when it sent any: what the run costs at a provider that bills per
    /// request. Counted on the wire ([`pgkeep_repo::storage::global_request_counter`]), so
    /// multipart steps, list pages and retries are included; writing this record (a second
    /// opening of the repository and one PUT) is not. Local repositories send none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_requests: Option<BTreeMap<String, u64>>,
}

impl RunRecord {
    /// Seconds from start to end.
    pub fn duration_secs(&self) -> f64 {
        (self.ended - self.started).num_milliseconds() as f64 / 1000.0
    }
}

/// Figures a finished command gives its record; reports implement it.
pub trait RunFacts {
    /// Bytes read, new and stored, and the backup id; `Default` when the kind has none.
    fn facts(&self) -> Facts {
        Facts::default()
    }
}

/// See [`RunFacts`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Facts {
    /// Bytes read from the cluster.
    pub bytes_read: Option<u64>,
    /// Bytes new to the repository.
    pub bytes_new: Option<u64>,
    /// Bytes stored.
    pub bytes_stored: Option<u64>,
    /// The backup or dump made.
    pub backup_id: Option<String>,
    /// A drill's recovery time, seconds.
    pub rto_secs: Option<f64>,
    /// One line on what the run did.
    pub detail: Option<String>,
}

/// What is known when a command starts: the kind, cluster and database of its record.
#[derive(Debug, Clone)]
pub struct RunStart {
    /// The command.
    pub kind: RunKind,
    /// Cluster name.
    pub cluster: String,
    /// The database (dump of one database).
    pub database: Option<String>,
    /// When it started.
    pub started: DateTime<Utc>,
    /// Record successes too (false for `archive-push`, see [`RunStart::failures_only`]).
    pub record_success: bool,
}

impl RunStart {
    /// A run starting now.
    pub fn now(kind: RunKind, cluster: &str, database: Option<&str>) -> RunStart {
        RunStart {
            kind,
            cluster: cluster.to_string(),
            database: database.map(str::to_owned),
            started: Utc::now(),
            record_success: true,
        }
    }

    /// Only failures (and warnings, interruptions) are recorded. For `archive-push`, which
    /// PostgreSQL runs for every 16 MiB of WAL: a record per success would be most of the
    /// history and a write per segment; the archive itself is the record of success (its
    /// newest segment's time is what `check` and `metrics` report).
    pub fn failures_only(mut self) -> RunStart {
        self.record_success = false;
        self
    }

    /// The record of this run ending now with `outcome`.
    pub fn finish<T: Report + RunFacts>(&self, outcome: &Result<T>) -> RunRecord {
        let (exit_code, message, facts) = match outcome {
            Ok(report) => {
                let msg = report.failure().map(|e| split_message(&e.to_string()));
                (report.exit_code(), msg, report.facts())
            }
            Err(e) => (
                e.exit_code(),
                Some(split_message(&e.to_string())),
                Facts::default(),
            ),
        };
        self.finish_with(exit_code, message, facts)
    }

    /// The record of this run ending now with `exit_code` (for callers without a report:
    /// an interrupted run, a daemon job).
    pub fn finish_with(
        &self,
        exit_code: i32,
        message: Option<(String, Option<String>)>,
        facts: Facts,
    ) -> RunRecord {
        let (error, hint) = match message {
            Some((m, h)) => (Some(m), h),
            None => (None, None),
        };
        RunRecord {
            format: HISTORY_FORMAT,
            kind: self.kind,
            cluster: self.cluster.clone(),
            database: self.database.clone(),
            started: self.started,
            ended: Utc::now().max(self.started),
            result: RunResult::from_exit_code(exit_code),
            exit_code,
            bytes_read: facts.bytes_read,
            bytes_new: facts.bytes_new,
            bytes_stored: facts.bytes_stored,
            error,
            hint,
            host: pgkeep_repo::lock::hostname(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            backup_id: facts.backup_id,
            rto_secs: facts.rto_secs,
            detail: facts.detail,
            storage_retries: Some(
                pgkeep_repo::storage::global_retry_counter()
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
            .filter(|&n| n > 0),
            storage_requests: Some(pgkeep_repo::storage::global_request_counter().by_method())
                .filter(|m| !m.is_empty()),
        }
    }

    /// Whether `record` is to be stored.
    pub fn wants(&self, record: &RunRecord) -> bool {
        self.record_success || record.result != RunResult::Ok
    }
}

/// A user message (`what failed`, then hints on `HINT: ` lines or after an inline ` HINT: `)
/// as (message, hint), both redacted: the same split as the error printed on stderr.
pub fn split_message(text: &str) -> (String, Option<String>) {
    let report = crate::error::ErrorReport::from_anyhow(&anyhow::Error::msg(text.to_string()));
    let hint = (!report.hints.is_empty()).then(|| report.hints.join(" "));
    (report.message, hint)
}

/// Called with every record once the command ended (stored or not): where notifications
/// plug in. Implementations must not fail the command: they log their own problems.
pub trait RunObserver: Send + Sync {
    /// The run ended; `stored` says whether the record reached the repository.
    fn finished<'a>(
        &'a self,
        ctx: &'a Context,
        record: &'a RunRecord,
        stored: bool,
    ) -> BoxFuture<'a, ()>;
}

/// Runs a command and records its outcome: the one wrapper the CLI and the daemon use.
///
/// The command's result is returned untouched; the record is written as far as the
/// repository can be reached (a failure to write it is a warning on stderr), then handed to
/// `observer`.
pub async fn recorded<T, F>(
    ctx: &Context,
    start: RunStart,
    observer: Option<&dyn RunObserver>,
    run: F,
) -> Result<T>
where
    T: Report + RunFacts,
    F: Future<Output = Result<T>>,
{
    let outcome = run.await;
    let record = start.finish(&outcome);
    finish_record(ctx, &start, &record, observer).await;
    outcome
}

/// Stores `record` if `start` wants it (warning on stderr when that fails) and tells
/// `observer`. Used by [`recorded`] and for runs that end without a result (interrupted).
pub async fn finish_record(
    ctx: &Context,
    start: &RunStart,
    record: &RunRecord,
    observer: Option<&dyn RunObserver>,
) {
    let stored = if start.wants(record) {
        match tokio::time::timeout(RECORD_TIMEOUT, store_in(ctx, record)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                warn_not_recorded(record, &e.to_string());
                false
            }
            Err(_) => {
                warn_not_recorded(record, "the repository did not answer in time");
                false
            }
        }
    } else {
        false
    };
    if let Some(o) = observer {
        o.finished(ctx, record, stored).await;
    }
}

fn warn_not_recorded(record: &RunRecord, why: &str) {
    let (why, _) = split_message(why);
    eprintln!(
        "pgkeep: warning: the {} run was not recorded in the history: {why}",
        record.kind
    );
}

/// A failed `archive-push` repeats every minute while its cause lasts (PostgreSQL retries
/// the segment): the same failure within this window of the newest recorded one is not
/// recorded again, so an outage of a day leaves one record an hour, not 1,440.
pub const REPEATED_FAILURE_WINDOW: chrono::Duration = chrono::Duration::hours(1);

async fn store_in(ctx: &Context, record: &RunRecord) -> Result<String> {
    let repo = open_repository_fast(ctx).await?;
    if record.kind == RunKind::ArchivePush && record.result != RunResult::Ok {
        let filter = HistoryFilter {
            kind: Some(RunKind::ArchivePush),
            limit: Some(1),
        };
        let newest = load(&repo, &record.cluster, &filter).await?;
        if let Some((key, last)) = newest.last() {
            if is_repeat(last, record) {
                return Ok(key.clone());
            }
        }
    }
    store(&repo, record).await
}

/// Whether `record` repeats `last`: the same failure, within [`REPEATED_FAILURE_WINDOW`].
fn is_repeat(last: &RunRecord, record: &RunRecord) -> bool {
    last.result == record.result
        && last.exit_code == record.exit_code
        && last.error == record.error
        && record.ended - last.ended < REPEATED_FAILURE_WINDOW
}

/// The prefix of a cluster's records.
pub fn prefix(cluster: &str) -> String {
    format!("history/{cluster}/")
}

/// The key of a new record (see the module documentation).
pub fn record_key(record: &RunRecord) -> String {
    format!(
        "{}{}-{}-{:016x}",
        prefix(&record.cluster),
        record.ended.format(NAME_TIME_FORMAT),
        record.kind.as_str(),
        rand::random::<u64>()
    )
}

/// Writes `record` as a new sealed object; returns its key.
pub async fn store(repo: &Repository, record: &RunRecord) -> Result<String> {
    crate::config::check_name("cluster name", &record.cluster)
        .map_err(|m| Error::new(ErrorKind::Usage, m))?;
    let key = record_key(record);
    let json = serde_json::to_vec(record).expect("a record serializes");
    repo.put_sealed_if_absent(&key, key.as_bytes(), &json)
        .await?;
    Ok(key)
}

/// The kind and end time a record's name tells, without reading it.
fn parse_key(cluster: &str, key: &str) -> Option<(DateTime<Utc>, RunKind)> {
    let rest = key.strip_prefix(&prefix(cluster))?;
    let (time, rest) = rest.split_once('-')?;
    let (kind, _) = rest.rsplit_once('-')?;
    let t = chrono::NaiveDateTime::parse_from_str(time, NAME_TIME_FORMAT).ok()?;
    Some((t.and_utc(), RunKind::parse(kind)?))
}

/// Which records to read.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    /// Only this kind.
    pub kind: Option<RunKind>,
    /// Only the newest N (after the other filters); `None`: all.
    pub limit: Option<usize>,
}

/// Records of `cluster` matching `filter`, oldest first, with their keys. Records that do
/// not open (damaged, newer format) are skipped with a warning in the log.
pub async fn load(
    repo: &Repository,
    cluster: &str,
    filter: &HistoryFilter,
) -> Result<Vec<(String, RunRecord)>> {
    let mut keys: Vec<(DateTime<Utc>, String)> = repo
        .storage()
        .list(&prefix(cluster))
        .await?
        .into_iter()
        .filter_map(|m| {
            let (t, kind) = parse_key(cluster, &m.key)?;
            filter.kind.is_none_or(|k| k == kind).then_some((t, m.key))
        })
        .collect();
    keys.sort();
    if let Some(n) = filter.limit {
        keys.drain(..keys.len().saturating_sub(n));
    }
    let reads = keys.iter().map(|(_, k)| read(repo, k));
    let bodies = futures::future::join_all(reads).await;
    Ok(keys
        .into_iter()
        .zip(bodies)
        .filter_map(|((_, k), r)| match r {
            Ok(rec) => Some((k, rec)),
            Err(e) => {
                tracing::warn!("history record {k} skipped: {e}");
                None
            }
        })
        .collect())
}

async fn read(repo: &Repository, key: &str) -> Result<RunRecord> {
    let plain = repo.get_sealed(key, key.as_bytes()).await?;
    let rec: RunRecord = serde_json::from_slice(&plain).map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("history record {key} does not parse: {e}"),
        )
    })?;
    if rec.format > HISTORY_FORMAT {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("history record {key} has format {}", rec.format),
        ));
    }
    Ok(rec)
}

/// The newest stored record of the same kind, cluster and database that ended before
/// `record`: what a notifier compares with to tell a recovery (first success after a
/// failure) or a repeated failure.
pub async fn previous(repo: &Repository, record: &RunRecord) -> Result<Option<RunRecord>> {
    let filter = HistoryFilter {
        kind: Some(record.kind),
        limit: None,
    };
    Ok(load(repo, &record.cluster, &filter)
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .rfind(|r| r.database == record.database && r.ended < record.ended))
}

/// The newest record of each (kind, database) among `records` (oldest first).
pub fn newest_per_group(records: &[RunRecord]) -> BTreeMap<(RunKind, Option<String>), &RunRecord> {
    let mut out = BTreeMap::new();
    for r in records {
        out.insert((r.kind, r.database.clone()), r);
    }
    out
}

/// What [`expire_history`] removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HistoryExpiry {
    /// Records older than this were candidates.
    pub older_than: Option<DateTime<Utc>>,
    /// Records removed (or, with a dry run, that would be).
    pub removed: usize,
    /// Records kept.
    pub kept: usize,
}

/// Removes the records of `cluster` that ended before `now - max_age`, except the newest of
/// each (kind, database): the last outcome of every job stays known however old it is (a
/// drill run once a year, a dump of a database no longer dumped). The caller holds the
/// exclusive lock (`expire` does).
pub async fn expire_history(
    repo: &Repository,
    cluster: &str,
    max_age: Duration,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<HistoryExpiry> {
    let cutoff = now - chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
    let all = load(repo, cluster, &HistoryFilter::default()).await?;
    // Oldest first, so the last key seen for a group is its newest record.
    let mut newest: BTreeMap<(RunKind, Option<String>), &str> = BTreeMap::new();
    for (key, rec) in &all {
        newest.insert((rec.kind, rec.database.clone()), key);
    }
    let mut out = HistoryExpiry {
        older_than: Some(cutoff),
        ..Default::default()
    };
    for (key, rec) in &all {
        let is_newest = newest.get(&(rec.kind, rec.database.clone())) == Some(&key.as_str());
        if rec.ended < cutoff && !is_newest {
            if !dry_run {
                repo.storage().delete(key).await?;
            }
            out.removed += 1;
        } else {
            out.kept += 1;
        }
    }
    Ok(out)
}

/// What `pgkeep history` shows.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryReport {
    /// Cluster name.
    pub cluster: String,
    /// Records, oldest first.
    pub records: Vec<RunRecord>,
}

impl fmt::Display for HistoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.records.is_empty() {
            return writeln!(f, "no recorded runs for cluster {}", self.cluster);
        }
        writeln!(
            f,
            "{:<20} {:<12} {:<12} {:<11} {:>8} {:<16} message",
            "ended (UTC)", "kind", "database", "result", "secs", "host"
        )?;
        for r in &self.records {
            writeln!(
                f,
                "{:<20} {:<12} {:<12} {:<11} {:>8.1} {:<16} {}",
                r.ended.format("%Y-%m-%d %H:%M:%S"),
                r.kind.as_str(),
                r.database.as_deref().unwrap_or("-"),
                r.result.as_str(),
                r.duration_secs(),
                r.host,
                r.error.as_deref().or(r.backup_id.as_deref()).unwrap_or("")
            )?;
        }
        Ok(())
    }
}

impl Report for HistoryReport {}

/// `pgkeep history`.
pub async fn history(ctx: &Context, filter: &HistoryFilter) -> Result<HistoryReport> {
    let repo = open_repository_fast(ctx).await?;
    let cluster = ctx.settings.cluster.name.clone();
    let records = load(&repo, &cluster, filter)
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    Ok(HistoryReport { cluster, records })
}

// Reports of the recorded commands.

impl RunFacts for crate::commands::backup::BackupReport {
    fn facts(&self) -> Facts {
        Facts {
            bytes_read: Some(self.totals.bytes_read),
            bytes_new: Some(self.totals.new_bytes),
            bytes_stored: Some(self.totals.stored_bytes),
            backup_id: Some(self.id.clone()),
            ..Facts::default()
        }
    }
}

impl RunFacts for crate::commands::dump::DumpReport {
    fn facts(&self) -> Facts {
        Facts {
            bytes_read: Some(self.totals.logical_bytes),
            bytes_new: Some(self.totals.new_bytes),
            bytes_stored: Some(self.totals.stored_bytes),
            backup_id: Some(self.id.clone()),
            ..Facts::default()
        }
    }
}

impl RunFacts for crate::commands::archive::ArchivePushReport {
    fn facts(&self) -> Facts {
        Facts {
            bytes_read: Some(self.bytes),
            ..Facts::default()
        }
    }
}

impl RunFacts for crate::commands::copy::CopyReport {
    fn facts(&self) -> Facts {
        Facts {
            bytes_read: Some(self.totals.bytes_read),
            bytes_new: Some(self.totals.bytes_new),
            ..Facts::default()
        }
    }
}

impl RunFacts for crate::commands::expire::ExpireReport {}
impl RunFacts for crate::commands::verify::VerifyReport {}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: RunKind, db: Option<&str>, ended: &str, result: RunResult) -> RunRecord {
        let t: DateTime<Utc> = ended.parse().unwrap();
        RunRecord {
            format: HISTORY_FORMAT,
            kind,
            cluster: "main".into(),
            database: db.map(str::to_owned),
            started: t - chrono::Duration::seconds(5),
            ended: t,
            result,
            exit_code: 0,
            bytes_read: None,
            bytes_new: None,
            bytes_stored: None,
            error: None,
            hint: None,
            host: "h".into(),
            version: "0".into(),
            backup_id: None,
            rto_secs: None,
            detail: None,
            storage_retries: None,
            storage_requests: None,
        }
    }

    #[test]
    fn a_repeated_archive_push_failure_within_the_window_is_a_repeat() {
        let mut a = rec(
            RunKind::ArchivePush,
            None,
            "2026-12-05T01:00:00Z",
            RunResult::Failed,
        );
        a.error = Some("disk full".into());
        let mut b = a.clone();
        b.ended = a.ended + chrono::Duration::minutes(59);
        assert!(is_repeat(&a, &b));
        b.ended = a.ended + chrono::Duration::minutes(61);
        assert!(!is_repeat(&a, &b), "an hour later it is recorded again");
        b.ended = a.ended + chrono::Duration::minutes(1);
        b.error = Some("permission denied".into());
        assert!(!is_repeat(&a, &b), "another failure is recorded");
    }

    #[test]
    fn keys_sort_by_time_and_tell_kind_and_time() {
        let a = rec(
            RunKind::Backup,
            None,
            "2026-12-04T21:30:00.5Z",
            RunResult::Ok,
        );
        let b = rec(
            RunKind::ArchivePush,
            None,
            "2026-12-04T21:30:01Z",
            RunResult::Failed,
        );
        let (ka, kb) = (record_key(&a), record_key(&b));
        assert!(ka < kb, "{ka} {kb}");
        assert!(
            ka.starts_with("history/main/20261204T213000.500000Z-backup-"),
            "{ka}"
        );
        assert_eq!(
            parse_key("main", &kb),
            Some((b.ended, RunKind::ArchivePush))
        );
        // Two records of the same instant still get two names.
        assert_ne!(record_key(&a), record_key(&a));
        assert_eq!(parse_key("other", &ka), None);
    }

    #[test]
    fn inline_hints_are_split_as_on_stderr() {
        let (m, h) = split_message("could not connect: refused. HINT: check --pg");
        assert_eq!(m, "could not connect: refused.");
        assert_eq!(h.as_deref(), Some("check --pg"));
    }

    #[test]
    fn messages_split_into_message_and_hint_and_are_redacted() {
        let (m, h) =
            split_message("cannot connect to host=/tmp password=hunter2\nHINT: start the server");
        assert!(!m.contains("hunter2"), "{m}");
        assert!(m.starts_with("cannot connect"), "{m}");
        assert_eq!(h.as_deref(), Some("start the server"));
    }

    #[test]
    fn results_follow_the_exit_code_registry() {
        assert_eq!(RunResult::from_exit_code(0), RunResult::Ok);
        assert_eq!(RunResult::from_exit_code(3), RunResult::Warning);
        assert_eq!(RunResult::from_exit_code(130), RunResult::Interrupted);
        assert_eq!(RunResult::from_exit_code(1), RunResult::Failed);
        assert_eq!(RunResult::from_exit_code(13), RunResult::Failed);
    }

    #[test]
    fn newest_per_group_keeps_one_per_kind_and_database() {
        let rs = vec![
            rec(
                RunKind::Dump,
                Some("a"),
                "2026-01-01T00:00:00Z",
                RunResult::Ok,
            ),
            rec(
                RunKind::Dump,
                Some("a"),
                "2026-01-02T00:00:00Z",
                RunResult::Failed,
            ),
            rec(
                RunKind::Dump,
                Some("b"),
                "2026-01-01T00:00:00Z",
                RunResult::Ok,
            ),
            rec(RunKind::Backup, None, "2026-01-01T00:00:00Z", RunResult::Ok),
        ];
        let n = newest_per_group(&rs);
        assert_eq!(n.len(), 3);
        assert_eq!(
            n[&(RunKind::Dump, Some("a".to_string()))].result,
            RunResult::Failed
        );
    }
}
