//! What is notified: one finished run ([`NotifyEvent`]) and the decision made about it
//! ([`Notice`]), with the texts every channel sends.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Trigger;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunResult {
    /// Completed.
    Ok,
    /// Completed with warnings.
    Warning,
    /// Failed.
    Failed,
    /// Stopped by a signal.
    Interrupted,
}

impl RunResult {
    /// True for `failed` and `interrupted`.
    pub fn is_failure(self) -> bool {
        matches!(self, RunResult::Failed | RunResult::Interrupted)
    }
}

/// One finished run of a command, as the notifier sees it. The caller fills it from its own
/// record of the run; every text in it must already be free of secrets (pgkeep's error
/// reports are redacted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyEvent {
    /// The command: `backup`, `dump`, `archive-push`, `expire`, `verify`, ...
    pub kind: String,
    /// Cluster name.
    pub cluster: String,
    /// Database, for per-database jobs (dumps).
    pub database: Option<String>,
    /// How it ended.
    pub result: RunResult,
    /// The process exit code.
    pub exit_code: i32,
    /// The error's message (first line of the error report).
    pub message: Option<String>,
    /// The error's hint (what to do).
    pub hint: Option<String>,
    /// Host the run happened on.
    pub host: String,
    /// Start of the run.
    pub started: DateTime<Utc>,
    /// End of the run.
    pub ended: DateTime<Utc>,
    /// The backup or dump made, if any.
    pub backup_id: Option<String>,
    /// Anything else worth showing (sizes, durations), shown in key order.
    #[serde(default)]
    pub details: BTreeMap<String, String>,
}

impl NotifyEvent {
    /// The job this run belongs to: `kind/cluster[/database]`. State, dedup and the
    /// PagerDuty incident are per job.
    pub fn key(&self) -> String {
        match &self.database {
            Some(db) => format!("{}/{}/{}", self.kind, self.cluster, db),
            None => format!("{}/{}", self.kind, self.cluster),
        }
    }

    /// The test event of `pgkeep notify test`.
    pub fn test(host: &str) -> Self {
        let now = Utc::now();
        NotifyEvent {
            kind: "notify-test".into(),
            cluster: "-".into(),
            database: None,
            result: RunResult::Ok,
            exit_code: 0,
            message: Some("test message from `pgkeep notify test`".into()),
            hint: None,
            host: host.to_string(),
            started: now,
            ended: now,
            backup_id: None,
            details: BTreeMap::new(),
        }
    }
}

/// A decided notification: the event, why it is sent, and what the job's history says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// Why it is sent.
    pub trigger: Trigger,
    /// The run.
    pub event: NotifyEvent,
    /// For a recovery or a repeated failure: when the job started failing.
    pub failing_since: Option<DateTime<Utc>>,
    /// For a recovery or a repeated failure: failed runs in a row (this one included for a
    /// failure).
    pub failed_runs: u32,
    /// A unique id, the same on every retry of this notice (receivers may drop duplicates).
    pub id: String,
}

impl Notice {
    /// The one-line summary: the subject of a mail, the title of a page.
    pub fn summary(&self) -> String {
        let e = &self.event;
        let what = match self.trigger {
            Trigger::Failure if e.result == RunResult::Interrupted => "INTERRUPTED",
            Trigger::Failure => "FAILED",
            Trigger::Recovery => "RECOVERED",
            Trigger::Success => "OK",
            Trigger::Warning => "WARNING",
            Trigger::Test => return format!("[pgkeep] TEST: notifications from {} work", e.host),
        };
        let db = e
            .database
            .as_ref()
            .map(|d| format!(" database {d}"))
            .unwrap_or_default();
        format!(
            "[pgkeep] {what}: {} of cluster {}{db} on {}",
            e.kind, e.cluster, e.host
        )
    }

    /// The full text: what happened, where, the error and its hint, and what to do.
    pub fn text(&self) -> String {
        let e = &self.event;
        let mut t = String::new();
        let _ = writeln!(t, "{}", self.headline());
        let took = (e.ended - e.started).num_seconds().max(0) as u64;
        let _ = writeln!(
            t,
            "Started {}, ended {} (took {}), exit code {}.",
            e.started.format("%Y-%m-%d %H:%M:%S UTC"),
            e.ended.format("%Y-%m-%d %H:%M:%S UTC"),
            humantime::format_duration(std::time::Duration::from_secs(took)),
            e.exit_code
        );
        if let Some(id) = &e.backup_id {
            let _ = writeln!(t, "Backup: {id}");
        }
        if let Some(m) = &e.message {
            let _ = writeln!(t, "\nError: {m}");
        }
        if let Some(h) = &e.hint {
            let _ = writeln!(t, "HINT: {h}");
        }
        for (k, v) in &e.details {
            let _ = writeln!(t, "{k}: {v}");
        }
        if let Some(todo) = self.what_to_do() {
            let _ = writeln!(t, "\nWhat to do: {todo}");
        }
        t
    }

    fn headline(&self) -> String {
        let e = &self.event;
        let job = match &e.database {
            Some(d) => format!("pgkeep {} of cluster {} (database {d})", e.kind, e.cluster),
            None => format!("pgkeep {} of cluster {}", e.kind, e.cluster),
        };
        let since = self
            .failing_since
            .map(|s| s.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_else(|| "?".into());
        match self.trigger {
            Trigger::Failure if self.failed_runs > 1 => format!(
                "{job} failed on host {} ({} failed runs in a row since {since}).",
                e.host, self.failed_runs
            ),
            Trigger::Failure => format!("{job} failed on host {}.", e.host),
            Trigger::Recovery => format!(
                "{job} works again on host {}, after {} failed run(s) since {since}.",
                e.host, self.failed_runs
            ),
            Trigger::Success => format!("{job} succeeded on host {}.", e.host),
            Trigger::Warning => format!("{job} completed with warnings on host {}.", e.host),
            Trigger::Test => format!(
                "This is a test from `pgkeep notify test` on host {}: this channel receives pgkeep's notifications.",
                e.host
            ),
        }
    }

    fn what_to_do(&self) -> Option<String> {
        let e = &self.event;
        match self.trigger {
            Trigger::Failure | Trigger::Warning => Some(format!(
                "{}run `pgkeep --cluster {} {}` by hand on {} with -v to see the whole error, and `pgkeep check` for the state of backups and archiving. Until a run succeeds, the newest restorable backup is older than planned.",
                if e.hint.is_some() { "follow the HINT above; " } else { "" },
                e.cluster,
                e.kind,
                e.host
            )),
            Trigger::Recovery => Some("nothing; the incident (if any) is resolved.".into()),
            Trigger::Success | Trigger::Test => None,
        }
    }

    /// The PagerDuty dedup key: stable per job, the same for trigger and resolve.
    pub fn dedup_key(&self) -> String {
        format!("pgkeep/{}", self.event.key())
    }

    /// The body of a generic webhook (and the custom details of a page).
    pub fn webhook_json(&self) -> serde_json::Value {
        let e = &self.event;
        serde_json::json!({
            "version": 1,
            "id": self.id,
            "event": self.trigger.name(),
            "summary": self.summary(),
            "text": self.text(),
            "kind": e.kind,
            "cluster": e.cluster,
            "database": e.database,
            "result": e.result,
            "exit_code": e.exit_code,
            "message": e.message,
            "hint": e.hint,
            "host": e.host,
            "started": e.started,
            "ended": e.ended,
            "backup_id": e.backup_id,
            "failing_since": self.failing_since,
            "failed_runs": self.failed_runs,
            "details": e.details,
        })
    }
}
