//! `pgkeep notify test`, and the notification of a finished run (see pgkeep-notify).

use std::fmt;
use std::path::PathBuf;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use pgkeep_notify::{NotifyError, NotifyEvent, NotifyReport, RunResult};
use serde::Serialize;

use crate::config::Settings;
use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, ErrorReport, Result};

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

/// The event of a finished command: its exit code decides the result (0 ok, 3 warning,
/// 130 interrupted, anything else failed); the error report (already redacted) gives the
/// message and hint.
pub fn run_event(
    kind: &str,
    cluster: &str,
    database: Option<String>,
    exit_code: i32,
    error: Option<&ErrorReport>,
    started: SystemTime,
) -> NotifyEvent {
    let result = match exit_code {
        0 => RunResult::Ok,
        3 => RunResult::Warning,
        130 => RunResult::Interrupted,
        _ => RunResult::Failed,
    };
    NotifyEvent {
        kind: kind.to_string(),
        cluster: cluster.to_string(),
        database,
        result,
        exit_code,
        message: error.map(|e| e.message.clone()),
        hint: error
            .filter(|e| !e.hints.is_empty())
            .map(|e| e.hints.join(" ")),
        host: pgkeep_repo::lock::hostname(),
        started: DateTime::<Utc>::from(started),
        ended: Utc::now(),
        backup_id: None,
        details: Default::default(),
    }
}

/// Notifies about one finished run. Never fails: undelivered notices are warned about on
/// stderr (tracing) and kept for the next run.
pub async fn notify_after(ctx: &Context, event: &NotifyEvent) -> NotifyReport {
    pgkeep_notify::notify_run(&ctx.settings.notify, &state_dir(&ctx.settings), event).await
}
