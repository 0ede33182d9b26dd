//! `pgkeep notify test`, and the notification of a finished run (see pgkeep-notify).

use std::fmt;
use std::path::PathBuf;

use futures::future::BoxFuture;
use pgkeep_notify::{NotifyError, NotifyEvent, NotifyReport, RunResult};
use serde::Serialize;

use crate::config::Settings;
use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};
use crate::history::{self, RunObserver, RunRecord};

/// The report of `pgkeep notify test`: one delivery per channel; exit 1 when any failed.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct NotifyTestReport(pub NotifyReport);

impl fmt::Display for NotifyTestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Report for NotifyTestReport {
    fn failure(&self) -> Option<Error> {
        let failed = self.0.failed();
        (failed > 0).then(|| {
            Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "{failed} of {} notification channel(s) did not receive the test message",
                    self.0.deliveries.len()
                ),
                "see each channel's error above; check its URL, key or password source and that the receiver is reachable from this host",
            )
        })
    }
}

/// Sends a test message to every configured channel. Fails (exit 2) when none is configured.
pub async fn notify_test(ctx: &Context) -> Result<NotifyTestReport> {
    let host = pgkeep_repo::lock::hostname();
    match pgkeep_notify::notify_test(&ctx.settings.notify, &host).await {
        Ok(r) => Ok(NotifyTestReport(r)),
        Err(NotifyError::NoChannels) => Err(Error::usage_hint(
            "no notification channel is configured",
            "add a [[notify.webhook]], [[notify.slack]], [[notify.pagerduty]] or [[notify.email]] table to the config file (see docs/config.md)",
        )),
        Err(e) => Err(Error::new(ErrorKind::Failure, e.to_string())),
    }
}

/// Where the notification state lives for these settings (see
/// `pgkeep_notify::NotifyConfig::state_dir`).
pub fn state_dir(settings: &Settings) -> PathBuf {
    settings.notify.state_dir(|n| std::env::var(n).ok())
}

/// The event of a finished run, from its history record (already redacted): the same kind,
/// cluster, database, result, times, error and hint, and the byte counts as details.
pub fn event_of(record: &RunRecord) -> NotifyEvent {
    let result = match record.result {
        history::RunResult::Ok => RunResult::Ok,
        history::RunResult::Warning => RunResult::Warning,
        history::RunResult::Failed => RunResult::Failed,
        history::RunResult::Interrupted => RunResult::Interrupted,
    };
    let mut details = std::collections::BTreeMap::new();
    for (name, v) in [
        ("bytes_read", record.bytes_read),
        ("bytes_new", record.bytes_new),
        ("bytes_stored", record.bytes_stored),
    ] {
        if let Some(v) = v {
            details.insert(name.to_string(), v.to_string());
        }
    }
    if let Some(rto) = record.rto_secs {
        details.insert("rto_secs".to_string(), format!("{rto:.1}"));
    }
    if let Some(d) = &record.detail {
        details.insert("detail".to_string(), d.clone());
    }
    NotifyEvent {
        kind: record.kind.to_string(),
        cluster: record.cluster.clone(),
        database: record.database.clone(),
        result,
        exit_code: record.exit_code,
        message: record.error.clone(),
        hint: record.hint.clone(),
        host: record.host.clone(),
        started: record.started,
        ended: record.ended,
        backup_id: record.backup_id.clone(),
        details,
    }
}

/// Sends the notifications of every recorded run (the [`RunObserver`] the CLI and the
/// daemon give [`crate::history::recorded`]), so runs recorded in the history and runs
/// notified are the same, interrupted ones included.
pub struct NotifyObserver;

impl RunObserver for NotifyObserver {
    fn finished<'a>(
        &'a self,
        ctx: &'a Context,
        record: &'a RunRecord,
        _stored: bool,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            notify_after(ctx, &event_of(record)).await;
        })
    }
}

/// The observer for these settings: none without a configured channel.
pub fn observer(settings: &Settings) -> Option<Box<dyn RunObserver>> {
    (!settings.notify.is_empty()).then(|| Box::new(NotifyObserver) as Box<dyn RunObserver>)
}

/// Notifies about one finished run. Never fails: undelivered notices are warned about on
/// stderr (tracing) and kept for the next run.
pub async fn notify_after(ctx: &Context, event: &NotifyEvent) -> NotifyReport {
    pgkeep_notify::notify_run(&ctx.settings.notify, &state_dir(&ctx.settings), event).await
}
