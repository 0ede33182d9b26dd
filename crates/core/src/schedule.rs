//! `[daemon]` and `[[schedule]]` of the configuration file: what `pgkeep daemon` runs and
//! when, what it listens on, and the command line of each job (the daemon runs jobs as the
//! same `pgkeep` commands a user would type, so they record history and notify alike).

use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::health::config::Limit;

/// The jobs a schedule may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// `pgkeep backup`.
    Backup,
    /// `pgkeep dump --db NAME` or `--all`.
    Dump,
    /// `pgkeep expire`.
    Expire,
    /// `pgkeep verify`.
    Verify,
    /// `pgkeep drill`.
    Drill,
    /// `pgkeep copy --to REPO`.
    Copy,
    /// `pgkeep check`.
    Check,
}

impl JobKind {
    /// The command's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Dump => "dump",
            JobKind::Expire => "expire",
            JobKind::Verify => "verify",
            JobKind::Drill => "drill",
            JobKind::Copy => "copy",
            JobKind::Check => "check",
        }
    }
}

/// What to do about runs that fell due while the daemon was not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissedRuns {
    /// Run once at start-up (however many were missed), then follow the schedule.
    #[default]
    RunOnce,
    /// Wait for the next time the schedule gives.
    Skip,
}

/// `[daemon]` as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// `ADDR:PORT` of the HTTP listener (`/metrics`, `/healthz`, `/api/...`, the dashboard);
    /// off when absent. A bare `:PORT` listens on 127.0.0.1.
    pub listen: Option<String>,
    /// Basic-auth user name; with it, every request needs the password.
    pub user: Option<String>,
    /// File holding the basic-auth password (mode 0600 or stricter); else
    /// `PGKEEP_DAEMON_PASSWORD`.
    pub password_file: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Default missed-run policy of the schedules (default `run-once`).
    pub missed_runs: Option<MissedRuns>,
    /// On SIGTERM, how long running jobs may go on before they are interrupted (SIGTERM,
    /// which ends them with exit 130, locks released); default `5m`.
    pub stop_timeout: Option<Limit>,
    /// Where the daemon remembers when each schedule last fired (for missed runs); default
    /// the notification state directory.
    pub state_dir: Option<PathBuf>,
}

/// One `[[schedule]]`: a job, when, for which cluster, with the job's options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Its name in logs, the history of the daemon and the dashboard (default
    /// `<job>-<cluster>[-<db>]`).
    pub name: Option<String>,
    /// The job.
    pub job: JobKind,
    /// Cron syntax: five fields (minute hour day month weekday) or six with a leading
    /// seconds field; `@daily`, `@hourly` and the like; in UTC.
    pub cron: String,
    /// The cluster (default: the file's only `[[cluster]]`, else `main`).
    pub cluster: Option<String>,
    /// A random delay from zero to this before each run (e.g. `"10m"`), so that many hosts
    /// do not start at once.
    pub jitter: Option<Limit>,
    /// Missed-run policy of this schedule (over `[daemon] missed_runs`).
    pub missed: Option<MissedRuns>,
    /// `dump`, dump `drill`: the database.
    pub db: Option<String>,
    /// `dump`: every database and the globals.
    #[serde(default)]
    pub all: bool,
    /// `backup`, `dump`: a label.
    pub label: Option<String>,
    /// `backup`, `dump`: pin what it makes.
    #[serde(default)]
    pub pin: bool,
    /// `expire`: only this kind (`physical` or `dump`).
    pub kind: Option<String>,
    /// `verify`: read every byte.
    #[serde(default)]
    pub read_data: bool,
    /// `copy`: the second repository (name or URL).
    pub to: Option<String>,
    /// `copy`: also the WAL.
    #[serde(default)]
    pub wal: bool,
    /// `drill`: drill the newest dump of `db` instead of a physical backup.
    #[serde(default)]
    pub dump: bool,
}

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct CronSchedule(croner::Cron);

impl FromStr for CronSchedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        use croner::parser::{CronParser, Seconds, Year};
        CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(s)
            .map(CronSchedule)
            .map_err(|e| format!("cron {s:?}: {e}"))
    }
}

impl CronSchedule {
    /// The first time after `t` the schedule gives.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.find_next_occurrence(&t, false).ok()
    }
}

impl ScheduleConfig {
    /// Its name (see [`ScheduleConfig::name`]) for `cluster`.
    pub fn display_name(&self, cluster: &str) -> String {
        self.name.clone().unwrap_or_else(|| {
            let mut n = format!("{}-{cluster}", self.job.as_str());
            if let Some(db) = &self.db {
                n.push('-');
                n.push_str(db);
            } else if self.all {
                n.push_str("-all");
            }
            n
        })
    }

    /// Refuses what the job cannot run with; `Ok` with the parsed cron.
    pub fn validate(&self) -> Result<CronSchedule, String> {
        let cron: CronSchedule = self.cron.parse()?;
        let job = self.job.as_str();
        let no = |what: &str, set: bool| {
            if set {
                Err(format!("job {job}: {what} does not apply"))
            } else {
                Ok(())
            }
        };
        match self.job {
            JobKind::Dump if self.db.is_some() == self.all => {
                return Err("job dump: give db = \"NAME\" or all = true".into());
            }
            JobKind::Drill => {
                if self.dump && self.db.is_none() {
                    return Err("job drill with dump = true: give db = \"NAME\"".into());
                }
                no("all", self.all)?;
            }
            JobKind::Copy if self.to.is_none() => {
                return Err("job copy: give to = \"REPOSITORY\"".into());
            }
            JobKind::Expire => {
                if let Some(k) = &self.kind {
                    if k != "physical" && k != "dump" {
                        return Err(format!("job expire: kind {k:?} is not physical or dump"));
                    }
                }
            }
            _ => {}
        }
        if self.job != JobKind::Dump && self.job != JobKind::Expire && self.job != JobKind::Drill {
            no("db", self.db.is_some())?;
        }
        if !matches!(self.job, JobKind::Backup | JobKind::Dump) {
            no("label", self.label.is_some())?;
            no("pin", self.pin)?;
        }
        if self.job != JobKind::Dump {
            no("all", self.all)?;
        }
        if self.job != JobKind::Expire {
            no("kind", self.kind.is_some())?;
        }
        if self.job != JobKind::Verify {
            no("read_data", self.read_data)?;
        }
        if self.job != JobKind::Copy {
            no("to", self.to.is_some())?;
            no("wal", self.wal)?;
        }
        if self.job != JobKind::Drill {
            no("dump", self.dump)?;
        }
        Ok(cron)
    }

    /// The `pgkeep` arguments of one run, after the global `--config FILE --cluster NAME`.
    pub fn command_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![self.job.as_str().to_string()];
        let mut opt = |flag: &str, v: &Option<String>| {
            if let Some(v) = v {
                a.push(flag.to_string());
                a.push(v.clone());
            }
        };
        match self.job {
            JobKind::Drill if self.dump => {
                opt("--dump", &Some("latest".into()));
                opt("--db", &self.db);
            }
            JobKind::Copy => {
                opt("--to", &self.to);
            }
            _ => {
                opt("--db", &self.db);
                opt("--label", &self.label);
                opt("--kind", &self.kind);
            }
        }
        for (flag, on) in [
            ("--all", self.all),
            ("--pin", self.pin),
            ("--read-data", self.read_data),
        ] {
            if on {
                a.push(flag.to_string());
            }
        }
        if self.job == JobKind::Copy {
            a.push("--latest".into());
            if self.wal {
                a.push("--wal".into());
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(toml_text: &str) -> ScheduleConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn cron_with_and_without_seconds() {
        let t: DateTime<Utc> = "2026-12-05T01:00:00Z".parse().unwrap();
        let every_5s: CronSchedule = "*/5 * * * * *".parse().unwrap();
        assert_eq!(
            every_5s.next_after(t).unwrap().to_rfc3339(),
            "2026-12-05T01:00:05+00:00"
        );
        let nightly: CronSchedule = "30 2 * * *".parse().unwrap();
        assert_eq!(
            nightly.next_after(t).unwrap().to_rfc3339(),
            "2026-12-05T02:30:00+00:00"
        );
        assert!("61 * * * *".parse::<CronSchedule>().is_err());
        assert!("not cron".parse::<CronSchedule>().is_err());
    }

    #[test]
    fn job_options_become_the_commands_arguments() {
        let s = sched(
            "job = \"dump\"\ncron = \"0 3 * * *\"\ndb = \"app\"\nlabel = \"nightly\"\npin = true\n",
        );
        s.validate().unwrap();
        assert_eq!(
            s.command_args(),
            ["dump", "--db", "app", "--label", "nightly", "--pin"]
        );
        assert_eq!(s.display_name("main"), "dump-main-app");
        let c = sched("job = \"copy\"\ncron = \"@daily\"\nto = \"offsite\"\nwal = true\n");
        c.validate().unwrap();
        assert_eq!(
            c.command_args(),
            ["copy", "--to", "offsite", "--latest", "--wal"]
        );
        let d = sched("job = \"drill\"\ncron = \"@weekly\"\ndump = true\ndb = \"app\"\n");
        d.validate().unwrap();
        assert_eq!(
            d.command_args(),
            ["drill", "--dump", "latest", "--db", "app"]
        );
    }

    #[test]
    fn options_a_job_cannot_use_are_refused() {
        for (text, msg) in [
            ("job = \"dump\"\ncron = \"@daily\"\n", "job dump: give db"),
            (
                "job = \"backup\"\ncron = \"@daily\"\ndb = \"x\"\n",
                "job backup: db does not apply",
            ),
            ("job = \"copy\"\ncron = \"@daily\"\n", "job copy: give to"),
            (
                "job = \"verify\"\ncron = \"@daily\"\nwal = true\n",
                "job verify: wal does not apply",
            ),
            (
                "job = \"backup\"\ncron = \"99 * * * *\"\n",
                "cron \"99 * * * *\"",
            ),
        ] {
            let e = sched(text).validate().unwrap_err();
            assert!(e.starts_with(msg), "{text}: {e}");
        }
    }
}
