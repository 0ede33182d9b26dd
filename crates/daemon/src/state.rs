//! What the scheduler and the HTTP listener share: the configuration in force, a
//! [`Context`] per cluster built from it, and the state of every schedule (next run, the
//! run going on, the last one).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::Serialize;

use pgkeep_core::config::{ConfigFile, Env, Overrides, Settings};
use pgkeep_core::context::Context;
use pgkeep_core::error::Result;
use pgkeep_core::schedule::JobKind;
use pgkeep_core::secrets::Passphrases;

/// One run of a job, as the daemon saw it (the command records its own history).
#[derive(Debug, Clone, Serialize)]
pub struct JobRun {
    /// When it started (after the jitter delay).
    pub started: DateTime<Utc>,
    /// When it ended; `None` while it runs.
    pub ended: Option<DateTime<Utc>>,
    /// Its exit code; `None` while it runs or when it was killed by a signal.
    pub exit_code: Option<i32>,
    /// `ok`, `warning`, `failed`, `interrupted`, `skipped`, or `running`.
    pub result: String,
    /// The end of what it printed on stderr (already redacted by the command).
    pub output_tail: String,
}

/// The state of one `[[schedule]]`.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleStatus {
    /// Its name (unique in the file).
    pub name: String,
    /// The job.
    pub job: JobKind,
    /// The cluster.
    pub cluster: String,
    /// The database, for dumps and dump drills.
    pub db: Option<String>,
    /// The cron expression.
    pub cron: String,
    /// The `pgkeep` arguments of a run.
    pub command: Vec<String>,
    /// When it runs next; `None` when the expression gives no later time.
    pub next_run: Option<DateTime<Utc>>,
    /// The run going on.
    pub running: Option<JobRun>,
    /// The last finished (or skipped) run.
    pub last: Option<JobRun>,
    /// Runs skipped since the daemon started because the previous one was still going.
    pub skipped: u64,
}

/// The daemon's state as the API shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DaemonState {
    /// When the daemon started.
    pub started: Option<DateTime<Utc>>,
    /// When the configuration was last (re)loaded.
    pub loaded: Option<DateTime<Utc>>,
    /// Every schedule, in file order.
    pub schedules: Vec<ScheduleStatus>,
}

/// Shared by the scheduler and the listener.
#[derive(Debug)]
pub struct Shared {
    /// The configuration file.
    pub config_path: PathBuf,
    /// The daemon's `PGKEEP_*` environment.
    pub env: Env,
    file: RwLock<Arc<ConfigFile>>,
    state: RwLock<DaemonState>,
}

impl Shared {
    /// Shared state over a loaded file.
    pub fn new(config_path: PathBuf, env: Env, file: ConfigFile) -> Arc<Shared> {
        Arc::new(Shared {
            config_path,
            env,
            file: RwLock::new(Arc::new(file)),
            state: RwLock::new(DaemonState {
                started: Some(Utc::now()),
                loaded: Some(Utc::now()),
                schedules: Vec::new(),
            }),
        })
    }

    /// The configuration in force.
    pub fn file(&self) -> Arc<ConfigFile> {
        self.file.read().expect("config lock").clone()
    }

    /// Puts a new configuration in force (SIGHUP).
    pub fn replace_file(&self, file: ConfigFile) {
        *self.file.write().expect("config lock") = Arc::new(file);
        self.update(|s| s.loaded = Some(Utc::now()));
    }

    /// A copy of the state.
    pub fn state(&self) -> DaemonState {
        self.state.read().expect("state lock").clone()
    }

    /// Changes the state.
    pub fn update<R>(&self, f: impl FnOnce(&mut DaemonState) -> R) -> R {
        f(&mut self.state.write().expect("state lock"))
    }

    /// Changes the schedule named `name`, if it is still configured.
    pub fn update_schedule(&self, name: &str, f: impl FnOnce(&mut ScheduleStatus)) {
        self.update(|s| {
            if let Some(st) = s.schedules.iter_mut().find(|x| x.name == name) {
                f(st)
            }
        })
    }

    /// The clusters the file names (its `[[cluster]]` entries, else `main`).
    pub fn clusters(&self) -> Vec<String> {
        let f = self.file();
        if f.clusters.is_empty() {
            vec!["main".to_string()]
        } else {
            f.clusters.iter().map(|c| c.name.clone()).collect()
        }
    }

    /// The context of `cluster` under the configuration in force, as `pgkeep --config FILE
    /// --cluster NAME` would have it.
    pub fn context(&self, cluster: &str) -> Result<Context> {
        let file = self.file();
        let flags = Overrides {
            config: Some(self.config_path.clone()),
            cluster: Some(cluster.to_string()),
            ..Overrides::default()
        };
        let settings = Settings::resolve(Some(&file), &self.env, &flags)?;
        let passphrase_file = settings
            .repository
            .as_ref()
            .and_then(|r| r.passphrase_file.clone());
        let passphrases = Passphrases::from_env(&self.env, passphrase_file.as_deref())?;
        Ok(Context::new(settings, passphrases))
    }
}
