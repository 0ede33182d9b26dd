//! The local state file (`notify-state.json`): the last outcome of every job, what was last
//! notified (for the dedup window), and notices that could not be delivered yet.
//!
//! Every read-modify-write happens under an exclusive `flock` on `notify-state.lock`, and the
//! file is replaced atomically (temporary file, fsync, rename), so concurrent runs
//! (archive-push every minute beside a nightly backup) neither lose updates nor read a torn
//! file. The lock is never held while messages are sent.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Trigger;
use crate::error::NotifyError;
use crate::event::{Notice, NotifyEvent, RunResult};

/// File name of the state, in the state directory.
pub const STATE_FILE: &str = "notify-state.json";
/// Undelivered notices kept per channel; the oldest go first.
pub const MAX_PENDING_PER_SINK: usize = 50;
/// Undelivered notices older than this are dropped (with a warning): news that old is no
/// longer worth a page.
pub const PENDING_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// What is remembered about one job (`kind/cluster[/database]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// Result of the last run.
    pub last_result: Option<RunResult>,
    /// End of the last run.
    pub last_run: Option<DateTime<Utc>>,
    /// First failed run of the current run of failures.
    pub failing_since: Option<DateTime<Utc>>,
    /// Failed runs in a row.
    pub failed_runs: u32,
    /// Per trigger: when it was last sent, and the fingerprint of what was sent.
    #[serde(default)]
    pub sent: BTreeMap<Trigger, Sent>,
}

/// The last notice of one trigger for one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    /// When.
    pub at: DateTime<Utc>,
    /// What (the error message, or the result): identical notices within the window are
    /// suppressed, a different error is news.
    pub fingerprint: String,
}

/// A notice that one channel has not received yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The channel's id (see `Sink::id`).
    pub sink: String,
    /// The notice.
    pub notice: Notice,
    /// Delivery attempts so far, over all runs.
    pub attempts: u32,
    /// When it was first tried.
    pub since: DateTime<Utc>,
    /// The last error (free of secrets).
    pub last_error: String,
}

/// The whole state file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Format version.
    #[serde(default = "one")]
    pub version: u32,
    /// Per job.
    #[serde(default)]
    pub jobs: BTreeMap<String, JobState>,
    /// Undelivered notices, oldest first.
    #[serde(default)]
    pub pending: Vec<Pending>,
}

fn one() -> u32 {
    1
}

/// The decision for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send this notice (to the channels whose `on` holds its trigger).
    Send(Box<Notice>),
    /// The same notice was sent at this time, within the dedup window.
    Suppressed(Trigger, DateTime<Utc>),
}

impl State {
    /// Records the run in its job's state and decides what to notify:
    /// - failed or interrupted: `failure`;
    /// - ok or warning after a failure: `recovery` (never suppressed: it closes an incident);
    /// - ok: `success`; warning: `warning`.
    ///
    /// A failure, success or warning whose fingerprint equals the last one sent for the job
    /// within `window` is suppressed.
    pub fn decide(&mut self, event: &NotifyEvent, window: Duration, id: String) -> Decision {
        let job = self.jobs.entry(event.key()).or_default();
        let was_failing = job.last_result.is_some_and(RunResult::is_failure);
        let failing_since = job.failing_since;
        let failed_before = job.failed_runs;
        job.last_result = Some(event.result);
        job.last_run = Some(event.ended);
        let (trigger, since, runs) = if event.result.is_failure() {
            job.failing_since = Some(failing_since.unwrap_or(event.ended));
            job.failed_runs = failed_before + 1;
            // Likewise, the first success or warning after failures is news again.
            job.sent.remove(&Trigger::Success);
            job.sent.remove(&Trigger::Warning);
            (Trigger::Failure, job.failing_since, job.failed_runs)
        } else {
            job.failing_since = None;
            job.failed_runs = 0;
            // A failure after a recovery is news, however soon it comes.
            job.sent.remove(&Trigger::Failure);
            let trigger = match event.result {
                _ if was_failing => Trigger::Recovery,
                RunResult::Warning => Trigger::Warning,
                _ => Trigger::Success,
            };
            (trigger, failing_since, failed_before)
        };
        let fingerprint = match &event.message {
            Some(m) => format!("{:?}: {m}", event.result),
            None => format!("{:?}", event.result),
        };
        if trigger != Trigger::Recovery {
            if let Some(last) = job.sent.get(&trigger) {
                let age = (event.ended - last.at).to_std().unwrap_or_default();
                if last.fingerprint == fingerprint && age < window {
                    return Decision::Suppressed(trigger, last.at);
                }
            }
        }
        job.sent.insert(
            trigger,
            Sent {
                at: event.ended,
                fingerprint,
            },
        );
        Decision::Send(Box::new(Notice {
            trigger,
            event: event.clone(),
            failing_since: since,
            failed_runs: runs,
            id,
        }))
    }

    /// Takes the pending notices of the given channels out of the state (to retry them now);
    /// drops, with a message each, those too old or of channels no longer configured.
    pub fn take_pending(
        &mut self,
        sinks: &[String],
        now: DateTime<Utc>,
    ) -> (Vec<Pending>, Vec<String>) {
        let mut taken = Vec::new();
        let mut dropped = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let age = (now - p.since).to_std().unwrap_or_default();
            if !sinks.contains(&p.sink) {
                dropped.push(format!(
                    "dropped an undelivered {} notice for {}: channel {} is no longer configured",
                    p.notice.trigger.name(),
                    p.notice.event.key(),
                    p.sink
                ));
            } else if age > PENDING_MAX_AGE {
                dropped.push(format!("dropped an undelivered {} notice for {} to {}: not delivered for {} (last error: {})", p.notice.trigger.name(), p.notice.event.key(), p.sink, humantime::format_duration(Duration::from_secs(age.as_secs())), p.last_error));
            } else {
                taken.push(p);
            }
        }
        (taken, dropped)
    }

    /// Keeps notices for a later run, at most [`MAX_PENDING_PER_SINK`] per channel.
    pub fn keep_pending(&mut self, items: Vec<Pending>) {
        self.pending.extend(items);
        self.pending.sort_by_key(|p| p.since);
        let mut per_sink: BTreeMap<String, usize> = BTreeMap::new();
        for p in self.pending.iter().rev() {
            *per_sink.entry(p.sink.clone()).or_default() += 1;
        }
        self.pending.retain(|p| {
            let n = per_sink.get_mut(&p.sink).expect("counted above");
            if *n > MAX_PENDING_PER_SINK {
                *n -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The state directory, locked: load, change and save the state while holding it.
pub struct StateStore {
    dir: PathBuf,
    lock: std::fs::File,
}

impl StateStore {
    /// Creates the directory (0700) if needed and takes the exclusive lock (waits for it).
    pub fn lock(dir: &Path) -> Result<Self, NotifyError> {
        let io = |what: &str, e| NotifyError::State(format!("{what} {}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create the state directory", e))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("notify-state.lock"))
            .map_err(|e| io("cannot open the lock file in", e))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own; released when the file is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(
                "cannot lock the state in",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(StateStore {
            dir: dir.to_path_buf(),
            lock,
        })
    }

    /// Path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the state; a missing file is an empty state. A damaged file is set aside
    /// (renamed `.damaged`) and replaced by an empty state, with a warning: losing dedup
    /// history must not stop notifications.
    pub fn load(&self) -> Result<(State, Option<String>), NotifyError> {
        let path = self.path();
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((State::default(), None))
            }
            Err(e) => {
                return Err(NotifyError::State(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        match serde_json::from_slice(&text) {
            Ok(s) => Ok((s, None)),
            Err(e) => {
                let aside = path.with_extension("json.damaged");
                let _ = std::fs::rename(&path, &aside);
                Ok((
                    State::default(),
                    Some(format!(
                        "state file {} was damaged ({e}); moved to {} and started afresh",
                        path.display(),
                        aside.display()
                    )),
                ))
            }
        }
    }

    /// Writes the state atomically (0600 temporary file, fsync, rename, fsync directory).
    pub fn save(&self, state: &State) -> Result<(), NotifyError> {
        let path = self.path();
        let tmp = self
            .dir
            .join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        let err =
            |e: std::io::Error| NotifyError::State(format!("cannot write {}: {e}", path.display()));
        let body = serde_json::to_vec_pretty(state).map_err(|e| err(std::io::Error::other(e)))?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&body).and_then(|_| f.sync_all()).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let _ = &self.lock;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ev(result: RunResult, minute: u32, msg: Option<&str>) -> NotifyEvent {
        let t = Utc.with_ymd_and_hms(2026, 12, 4, 3, minute, 0).unwrap();
        NotifyEvent {
            kind: "backup".into(),
            cluster: "main".into(),
            database: None,
            result,
            exit_code: if result.is_failure() { 1 } else { 0 },
            message: msg.map(str::to_string),
            hint: None,
            host: "db1".into(),
            started: t,
            ended: t,
            backup_id: None,
            details: BTreeMap::new(),
        }
    }

    fn trig(d: Decision) -> String {
        match d {
            Decision::Send(n) => format!("send {} runs={}", n.trigger.name(), n.failed_runs),
            Decision::Suppressed(t, _) => format!("suppressed {}", t.name()),
        }
    }

    #[test]
    fn failure_dedup_recovery_success_warning() {
        let mut s = State::default();
        let w = Duration::from_secs(3600);
        let d = |s: &mut State, e| trig(s.decide(&e, w, "id".into()));
        assert_eq!(d(&mut s, ev(RunResult::Ok, 0, None)), "send success runs=0");
        assert_eq!(
            d(&mut s, ev(RunResult::Failed, 1, Some("disk full"))),
            "send failure runs=1"
        );
        assert_eq!(
            d(&mut s, ev(RunResult::Failed, 2, Some("disk full"))),
            "suppressed failure"
        );
        // A different error is news, even within the window.
        assert_eq!(
            d(&mut s, ev(RunResult::Failed, 3, Some("no route"))),
            "send failure runs=3"
        );
        assert_eq!(
            d(&mut s, ev(RunResult::Interrupted, 4, Some("no route"))),
            "send failure runs=4"
        );
        assert_eq!(
            d(&mut s, ev(RunResult::Ok, 5, None)),
            "send recovery runs=4"
        );
        assert_eq!(
            d(&mut s, ev(RunResult::Interrupted, 5, Some("no route"))),
            "send failure runs=1"
        );
        assert_eq!(
            d(&mut s, ev(RunResult::Ok, 5, None)),
            "send recovery runs=1"
        );
        // The success right after the recovery is a plain success again.
        assert_eq!(d(&mut s, ev(RunResult::Ok, 6, None)), "send success runs=0");
        assert_eq!(d(&mut s, ev(RunResult::Ok, 7, None)), "suppressed success");
        assert_eq!(
            d(&mut s, ev(RunResult::Warning, 8, Some("slow"))),
            "send warning runs=0"
        );
        // After the window, the same failure is sent again as a reminder.
        assert_eq!(
            d(&mut s, ev(RunResult::Failed, 9, Some("disk full"))),
            "send failure runs=1"
        );
        let mut late = ev(RunResult::Failed, 9, Some("disk full"));
        late.ended += chrono::Duration::minutes(61);
        assert_eq!(d(&mut s, late), "send failure runs=2");
        // Jobs are independent.
        let mut other = ev(RunResult::Ok, 10, None);
        other.database = Some("app".into());
        assert_eq!(d(&mut s, other), "send success runs=0");
    }

    #[test]
    fn state_round_trips_atomically_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let sd = dir.path().join("state");
        let store = StateStore::lock(&sd).unwrap();
        let (mut s, warn) = store.load().unwrap();
        assert!(warn.is_none());
        s.decide(
            &ev(RunResult::Failed, 1, Some("x")),
            Duration::ZERO,
            "a".into(),
        );
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap().0, s);
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(&sd).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        std::fs::write(store.path(), "{not json").unwrap();
        let (s2, warn) = store.load().unwrap();
        assert_eq!(s2, State::default());
        assert!(warn.unwrap().contains("damaged"));
    }

    #[test]
    fn pending_is_bounded_and_dropped_for_unknown_sinks() {
        let mut s = State::default();
        let n = match s.decide(
            &ev(RunResult::Failed, 1, Some("x")),
            Duration::ZERO,
            "a".into(),
        ) {
            Decision::Send(n) => *n,
            _ => unreachable!(),
        };
        let now = n.event.ended;
        let p = |sink: &str, i: i64| Pending {
            sink: sink.into(),
            notice: n.clone(),
            attempts: 1,
            since: now + chrono::Duration::seconds(i),
            last_error: "down".into(),
        };
        s.keep_pending((0..60).map(|i| p("a", i)).chain([p("b", 0)]).collect());
        assert_eq!(s.pending.len(), MAX_PENDING_PER_SINK + 1);
        assert_eq!(
            s.pending
                .iter()
                .filter(|x| x.sink == "a")
                .map(|x| x.since)
                .min(),
            Some(now + chrono::Duration::seconds(10))
        );
        let (taken, dropped) = s.take_pending(&["a".into()], now);
        assert_eq!(taken.len(), MAX_PENDING_PER_SINK);
        assert_eq!(dropped.len(), 1);
        assert!(s.pending.is_empty());
    }
}
