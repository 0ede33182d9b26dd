//! pgkeep-notify: tells people when backups fail, and when they work again.
//!
//! Channels: generic webhooks (JSON, HMAC-SHA256 signed), Slack incoming webhooks, PagerDuty
//! Events API v2 and e-mail over SMTP, configured in `[notify]` ([`NotifyConfig`]).
//!
//! After every run the caller builds a [`NotifyEvent`] and calls [`notify_run`], which
//! 1. records the run in a small local state file and decides what it means for its job
//!    (`kind/cluster[/database]`): failure, recovery (first success after a failure),
//!    success or warning — suppressing an identical notice sent within `dedup_window`;
//! 2. sends it to every channel whose `on` list holds that trigger, with timeouts and
//!    retries with backoff, after first retrying what earlier runs could not deliver;
//! 3. keeps what still could not be delivered for the next run.
//!
//! It never fails: problems are reported in the [`NotifyReport`] and logged as warnings, so
//! the command's own outcome and exit code stay as they were. docs/design.md describes the
//! state file, the dedup rules and the webhook signature.

pub mod config;
pub mod error;
pub mod event;
pub mod send;
pub mod state;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use config::{NotifyConfig, Trigger};
pub use error::NotifyError;
pub use event::{Notice, NotifyEvent, RunResult};
pub use send::{sign, Channel};

use send::{Sender, Sink};
use state::{Decision, Pending, StateStore};

/// The outcome of one delivery to one channel.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// The channel's name (`name`, else `<channel>[N]`).
    pub sink: String,
    /// Its kind.
    pub channel: Channel,
    /// Where it goes, without secrets: `scheme://host:port` or the SMTP server and recipients.
    pub target: String,
    /// What was sent.
    pub event: Trigger,
    /// The job (`kind/cluster[/database]`).
    pub job: String,
    /// True when the receiver accepted it.
    pub delivered: bool,
    /// Attempts made in this run.
    pub attempts: u32,
    /// Why it was not delivered (free of secrets).
    pub error: Option<String>,
    /// True when it is kept in the state file for the next run.
    pub kept_for_retry: bool,
    /// True when it is a notice of an earlier run, retried now.
    pub earlier: bool,
}

/// What [`notify_run`] or [`notify_test`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NotifyReport {
    /// The job of the event (none for a test).
    pub job: Option<String>,
    /// What the run meant: the trigger decided (none when nothing is configured).
    pub trigger: Option<Trigger>,
    /// Set when the notice was suppressed: when the identical one was sent.
    pub suppressed_since: Option<DateTime<Utc>>,
    /// Every delivery attempted.
    pub deliveries: Vec<Delivery>,
    /// Notices waiting in the state file for a later run, after this one.
    pub pending: usize,
    /// Problems beside deliveries (state file, dropped notices).
    pub warnings: Vec<String>,
}

impl NotifyReport {
    /// Deliveries that failed.
    pub fn failed(&self) -> usize {
        self.deliveries.iter().filter(|d| !d.delivered).count()
    }
}

impl fmt::Display for NotifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(t), Some(at)) = (self.trigger, self.suppressed_since) {
            writeln!(
                f,
                "{} notice suppressed: the same was sent at {} (dedup window)",
                t.name(),
                at.format("%Y-%m-%d %H:%M:%S UTC")
            )?;
        }
        for d in &self.deliveries {
            let what = if d.earlier {
                format!("{} (earlier)", d.event.name())
            } else {
                d.event.name().to_string()
            };
            match &d.error {
                None => writeln!(
                    f,
                    "{:<16} {:<10} delivered  {what} to {}",
                    d.sink,
                    d.channel_name(),
                    d.target
                )?,
                Some(e) => writeln!(
                    f,
                    "{:<16} {:<10} FAILED     {what} to {}: {e}{}",
                    d.sink,
                    d.channel_name(),
                    d.target,
                    if d.kept_for_retry {
                        " (kept for the next run)"
                    } else {
                        ""
                    }
                )?,
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}

impl Delivery {
    fn channel_name(&self) -> &'static str {
        match self.channel {
            Channel::Webhook => "webhook",
            Channel::Slack => "slack",
            Channel::Pagerduty => "pagerduty",
            Channel::Email => "email",
        }
    }
}

fn notice_id(now: DateTime<Utc>) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}-{}",
        now.timestamp_nanos_opt().unwrap_or_default(),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Records `event` in the state under `state_dir` and notifies the channels that want it
/// (see the crate documentation). Never fails and never panics on a channel's account:
/// everything that went wrong is in the report's deliveries and warnings, and logged with
/// `tracing::warn!`. Nothing happens, and no state is written, when no channel is configured.
pub async fn notify_run(
    config: &NotifyConfig,
    state_dir: &Path,
    event: &NotifyEvent,
) -> NotifyReport {
    let mut report = NotifyReport {
        job: Some(event.key()),
        ..Default::default()
    };
    if config.is_empty() {
        return report;
    }
    let sinks = send::sinks(config);
    let ids: Vec<String> = sinks.iter().map(|s| s.id.clone()).collect();
    let (decision, earlier) = match decide(config, state_dir, event, &ids, &mut report) {
        Ok(v) => v,
        Err(e) => {
            // Without state there is no dedup, but a failure must still be told.
            report
                .warnings
                .push(format!("{e}; notifying without dedup"));
            let n = Notice {
                trigger: if event.result.is_failure() {
                    Trigger::Failure
                } else {
                    Trigger::Success
                },
                event: event.clone(),
                failing_since: None,
                failed_runs: 0,
                id: notice_id(Utc::now()),
            };
            (Decision::Send(Box::new(n)), Vec::new())
        }
    };
    let new = match decision {
        Decision::Send(n) => {
            report.trigger = Some(n.trigger);
            Some(*n)
        }
        Decision::Suppressed(t, at) => {
            report.trigger = Some(t);
            report.suppressed_since = Some(at);
            None
        }
    };
    let (deliveries, keep) = deliver_all(config, &sinks, earlier, new.as_ref()).await;
    report.deliveries = deliveries;
    match StateStore::lock(state_dir).and_then(|s| {
        let (mut st, _) = s.load()?;
        st.keep_pending(keep);
        s.save(&st)?;
        Ok(st.pending.len())
    }) {
        Ok(n) => report.pending = n,
        Err(e) => report
            .warnings
            .push(format!("undelivered notices are lost: {e}")),
    }
    log_problems(&report);
    report
}

/// Under the state lock: decide about the event, take out the notices earlier runs could not
/// deliver (to this run's channels), save.
fn decide(
    config: &NotifyConfig,
    dir: &Path,
    event: &NotifyEvent,
    ids: &[String],
    report: &mut NotifyReport,
) -> Result<(Decision, Vec<Pending>), NotifyError> {
    let store = StateStore::lock(dir)?;
    let (mut state, warning) = store.load()?;
    report.warnings.extend(warning);
    let now = Utc::now();
    let decision = state.decide(event, config.dedup_window(), notice_id(now));
    let (earlier, dropped) = state.take_pending(ids, now);
    report.warnings.extend(dropped);
    store.save(&state)?;
    Ok((decision, earlier))
}

/// Delivers, per channel in order (earlier notices first, so a failure never arrives after
/// its recovery), channels in parallel. Once a channel fails with a temporary error, its
/// remaining notices are kept without trying: the receiver is down.
async fn deliver_all(
    config: &NotifyConfig,
    sinks: &[Sink<'_>],
    earlier: Vec<Pending>,
    new: Option<&Notice>,
) -> (Vec<Delivery>, Vec<Pending>) {
    let sender = Sender::new(config);
    let mut queues: BTreeMap<usize, Vec<Pending>> = BTreeMap::new();
    for p in earlier {
        if let Some(i) = sinks.iter().position(|s| s.id == p.sink) {
            queues.entry(i).or_default().push(p);
        }
    }
    let now = Utc::now();
    for (i, s) in sinks.iter().enumerate() {
        if let Some(n) = new.filter(|n| s.on.contains(&n.trigger)) {
            queues.entry(i).or_default().push(Pending {
                sink: s.id.clone(),
                notice: n.clone(),
                attempts: 0,
                since: now,
                last_error: String::new(),
            });
        }
    }
    let runs = queues
        .into_iter()
        .map(|(i, q)| deliver_queue(&sender, &sinks[i], q, new));
    let mut deliveries = Vec::new();
    let mut keep = Vec::new();
    for (d, k) in futures::future::join_all(runs).await {
        deliveries.extend(d);
        keep.extend(k);
    }
    (deliveries, keep)
}

async fn deliver_queue(
    sender: &Sender,
    sink: &Sink<'_>,
    queue: Vec<Pending>,
    new: Option<&Notice>,
) -> (Vec<Delivery>, Vec<Pending>) {
    let mut deliveries = Vec::new();
    let mut keep = Vec::new();
    let mut down: Option<String> = None;
    for mut p in queue {
        let earlier = new.is_none_or(|n| n.id != p.notice.id);
        let (attempts, failure) = match &down {
            Some(e) => (
                0,
                Some(send::Failure {
                    message: e.clone(),
                    retryable: true,
                }),
            ),
            None => sender.deliver(sink, &p.notice).await,
        };
        let mut d = Delivery {
            sink: sink.id.clone(),
            channel: sink.channel,
            target: sink.target.clone(),
            event: p.notice.trigger,
            job: p.notice.event.key(),
            delivered: failure.is_none(),
            attempts,
            error: None,
            kept_for_retry: false,
            earlier,
        };
        if let Some(f) = failure {
            d.error = Some(f.message.clone());
            if f.retryable {
                down.get_or_insert_with(|| f.message.clone());
                d.kept_for_retry = true;
                p.attempts += attempts;
                p.last_error = f.message;
                keep.push(p);
            }
        }
        deliveries.push(d);
    }
    (deliveries, keep)
}

fn log_problems(report: &NotifyReport) {
    for d in report.deliveries.iter().filter(|d| !d.delivered) {
        let after = if d.kept_for_retry {
            "; kept and retried on the next run"
        } else {
            "; not retried (the receiver refused it)"
        };
        tracing::warn!(
            "notification: {} notice for {} to {} ({}) not delivered: {}{after}",
            d.event.name(),
            d.job,
            d.sink,
            d.target,
            d.error.as_deref().unwrap_or("?")
        );
    }
    for w in &report.warnings {
        tracing::warn!("notification: {w}");
    }
}

/// `pgkeep notify test`: sends a test notice to every configured channel, whatever its
/// `on`, without touching the state. Fails only when no channel is configured; per-channel
/// failures are in the report (see [`NotifyReport::failed`]).
pub async fn notify_test(config: &NotifyConfig, host: &str) -> Result<NotifyReport, NotifyError> {
    if config.is_empty() {
        return Err(NotifyError::NoChannels);
    }
    let sinks = send::sinks(config);
    let notice = Notice {
        trigger: Trigger::Test,
        event: NotifyEvent::test(host),
        failing_since: None,
        failed_runs: 0,
        id: notice_id(Utc::now()),
    };
    let sender = Sender::new(config);
    let runs = sinks.iter().map(|s| {
        deliver_queue(
            &sender,
            s,
            vec![Pending {
                sink: s.id.clone(),
                notice: notice.clone(),
                attempts: 0,
                since: Utc::now(),
                last_error: String::new(),
            }],
            Some(&notice),
        )
    });
    let mut report = NotifyReport {
        trigger: Some(Trigger::Test),
        ..Default::default()
    };
    for (d, _) in futures::future::join_all(runs).await {
        report.deliveries.extend(d.into_iter().map(|mut d| {
            d.kept_for_retry = false;
            d
        }));
    }
    Ok(report)
}
