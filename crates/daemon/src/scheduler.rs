//! The scheduler: one task per `[[schedule]]` that sleeps until the cron expression's next
//! time, then starts the job as the `pgkeep` command a user would type (this executable,
//! `--config FILE --cluster NAME <job> <options>`), so a scheduled run is the same code,
//! records the same history and sends the same notifications as one run by hand.
//!
//! One run of a schedule at a time: a run still going when the next is due is skipped, and
//! the skip is recorded in the run history (a warning, notified like one). Runs that fell due
//! while the daemon was down are run once at start-up, or skipped (`missed`). The times
//! each schedule last fired are kept in a small state file for that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::state::{JobRun, ScheduleStatus, Shared};
use pgkeep_core::config::ConfigFile;
use pgkeep_core::history::{self, RunKind, RunStart};
use pgkeep_core::schedule::{CronSchedule, JobKind, MissedRuns, ScheduleConfig};

/// A schedule ready to run: its configuration, parsed cron, cluster and name.
#[derive(Debug, Clone)]
pub struct Job {
    /// As configured.
    pub config: ScheduleConfig,
    /// Parsed.
    pub cron: CronSchedule,
    /// The cluster it runs for.
    pub cluster: String,
    /// Its unique name.
    pub name: String,
    /// Its missed-run policy.
    pub missed: MissedRuns,
}

/// The jobs of a configuration file; names must be unique.
pub fn jobs_of(file: &ConfigFile) -> Result<Vec<Job>, String> {
    let default_cluster = if file.clusters.len() == 1 {
        file.clusters[0].name.clone()
    } else {
        "main".to_string()
    };
    let mut jobs: Vec<Job> = Vec::new();
    for sc in &file.schedules {
        let cron = sc.validate()?;
        let cluster = sc
            .cluster
            .clone()
            .unwrap_or_else(|| default_cluster.clone());
        let name = sc.display_name(&cluster);
        if jobs.iter().any(|j| j.name == name) {
            return Err(format!(
                "two [[schedule]] entries are named {name:?}: give one of them name = \"...\""
            ));
        }
        jobs.push(Job {
            missed: sc.missed.or(file.daemon.missed_runs).unwrap_or_default(),
            config: sc.clone(),
            cron,
            cluster,
            name,
        });
    }
    Ok(jobs)
}

/// The daemon's state directory: `[daemon] state_dir`, else the notification state
/// directory.
fn state_dir(shared: &Shared) -> PathBuf {
    let file = shared.file();
    file.daemon.state_dir.clone().unwrap_or_else(|| {
        file.notify
            .state_dir(|n| std::env::var(n).ok().or_else(|| shared.env.get(n)))
    })
}

/// Where the daemon keeps the time each schedule last fired.
pub fn state_file(shared: &Shared) -> PathBuf {
    state_dir(shared).join("daemon-schedules.json")
}

/// The copy of the configuration in force that jobs run with (`--config`): after a refused
/// reload the file on disk is bad, and the jobs must still run with the one in force.
pub fn snapshot_path(shared: &Shared) -> PathBuf {
    state_dir(shared).join("daemon-config.toml")
}

/// Writes [`snapshot_path`] (0600, replaced atomically).
pub fn write_snapshot(shared: &Shared, text: &str) -> pgkeep_core::error::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = snapshot_path(shared);
    let io = |e| pgkeep_core::error::Error::io(format!("writing {}", path.display()), e);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io)?;
    }
    let tmp = path.with_extension("toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)
}

fn read_fired(path: &Path) -> BTreeMap<String, DateTime<Utc>> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_fired(path: &Path, fired: &BTreeMap<String, DateTime<Utc>>) {
    let result = (|| -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(fired).unwrap_or_default())?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        tracing::warn!("daemon: could not write {}: {e}", path.display());
    }
}

/// Records that `name` fired at `due`.
fn note_fired(shared: &Shared, name: &str, due: DateTime<Utc>) {
    let path = state_file(shared);
    let mut fired = read_fired(&path);
    fired.insert(name.to_string(), due);
    write_fired(&path, &fired);
}

/// The schedules' state for a new set of jobs, keeping what is known of those that stay.
pub fn install(shared: &Shared, jobs: &[Job]) {
    let now = Utc::now();
    shared.update(|s| {
        let old = std::mem::take(&mut s.schedules);
        s.schedules = jobs
            .iter()
            .map(|j| {
                let prev = old.iter().find(|o| o.name == j.name);
                ScheduleStatus {
                    name: j.name.clone(),
                    job: j.config.job,
                    cluster: j.cluster.clone(),
                    db: j.config.db.clone(),
                    cron: j.config.cron.clone(),
                    command: j.config.command_args(),
                    next_run: j.cron.next_after(now),
                    running: prev.and_then(|p| p.running.clone()),
                    last: prev.and_then(|p| p.last.clone()),
                    skipped: prev.map_or(0, |p| p.skipped),
                }
            })
            .collect();
    });
}

/// The jobs that missed a run while the daemon was down and run once now; every job gets a
/// baseline in the state file so the next downtime is measured from here.
pub fn missed_at_start(shared: &Shared, jobs: &[Job]) -> Vec<String> {
    let path = state_file(shared);
    let mut fired = read_fired(&path);
    let now = Utc::now();
    let mut due = Vec::new();
    for j in jobs {
        match fired.get(&j.name) {
            Some(last) => {
                let missed = j.cron.next_after(*last).is_some_and(|t| t <= now);
                if missed {
                    match j.missed {
                        MissedRuns::RunOnce => {
                            tracing::info!(
                                "daemon: {} missed a run while the daemon was down (last fired {last}); running it once now",
                                j.name
                            );
                            due.push(j.name.clone());
                        }
                        MissedRuns::Skip => tracing::info!(
                            "daemon: {} missed a run while the daemon was down; skipped (missed = \"skip\")",
                            j.name
                        ),
                    }
                    fired.insert(j.name.clone(), now);
                }
            }
            None => {
                fired.insert(j.name.clone(), now);
            }
        }
    }
    write_fired(&path, &fired);
    due
}

/// Runs one schedule until `stop` turns true: sleeps to each due time and starts the job,
/// or records a skip when its previous run is still going. `run_now` starts one run first
/// (a missed run).
pub async fn schedule_loop(
    shared: Arc<Shared>,
    job: Job,
    run_now: bool,
    mut stop: watch::Receiver<bool>,
) {
    if run_now {
        fire(&shared, &job, Utc::now());
    }
    loop {
        let now = Utc::now();
        let Some(next) = job.cron.next_after(now) else {
            tracing::warn!(
                "daemon: {} has no later time; it will not run again",
                job.name
            );
            return;
        };
        shared.update_schedule(&job.name, |s| s.next_run = Some(next));
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        fire(&shared, &job, next);
    }
}

/// Starts a run of `job` due at `due` in its own task, or records a skip.
fn fire(shared: &Arc<Shared>, job: &Job, due: DateTime<Utc>) {
    note_fired(shared, &job.name, due);
    let busy = shared
        .state()
        .schedules
        .iter()
        .find(|s| s.name == job.name)
        .and_then(|s| s.running.clone());
    if let Some(r) = busy {
        tracing::warn!(
            "daemon: {} is due but its run started at {} is still going: skipped",
            job.name,
            r.started
        );
        let now = Utc::now();
        shared.update_schedule(&job.name, |s| {
            s.skipped += 1;
            s.last = Some(JobRun {
                started: now,
                ended: Some(now),
                exit_code: None,
                result: "skipped".into(),
                output_tail: format!("the run started at {} was still going", r.started),
            });
        });
        let (shared, job) = (shared.clone(), job.clone());
        tokio::spawn(async move { record_skip(&shared, &job, r.started).await });
        return;
    }
    let started = Utc::now();
    shared.update_schedule(&job.name, |s| {
        s.running = Some(JobRun {
            started,
            ended: None,
            exit_code: None,
            result: "running".into(),
            output_tail: String::new(),
        })
    });
    let (shared, job) = (shared.clone(), job.clone());
    tokio::spawn(async move { run_job(shared, job).await });
}

/// The kind of history record a job's skip is filed under.
fn run_kind(job: JobKind) -> Option<RunKind> {
    Some(match job {
        JobKind::Backup => RunKind::Backup,
        JobKind::Dump => RunKind::Dump,
        JobKind::Expire => RunKind::Expire,
        JobKind::Verify => RunKind::Verify,
        JobKind::Drill => RunKind::Drill,
        JobKind::Copy => RunKind::Copy,
        JobKind::Check => return None,
    })
}

/// A skipped run in the cluster's run history: a warning (exit 3) saying why, notified like
/// any warning.
async fn record_skip(shared: &Shared, job: &Job, running_since: DateTime<Utc>) {
    let Some(kind) = run_kind(job.config.job) else {
        return;
    };
    let ctx = match shared.context(&job.cluster) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("daemon: recording the skip of {}: {e}", job.name);
            return;
        }
    };
    let start = RunStart::now(kind, &job.cluster, job.config.db.as_deref());
    let rec = start.finish_with(
        pgkeep_core::error::ErrorKind::Warnings.exit_code(),
        Some((
            format!(
                "scheduled run of {} skipped: the run started at {running_since} is still going",
                job.name
            ),
            Some("a run takes longer than the schedule allows: space the schedule out, or look at why it is slow".into()),
        )),
        Default::default(),
    );
    let obs = pgkeep_core::commands::notify::observer(&ctx.settings);
    history::finish_record(&ctx, &start, &rec, obs.as_deref()).await;
}

/// Process ids of the jobs running now, so that SIGTERM can reach them.
pub type Children = Arc<std::sync::Mutex<BTreeMap<String, u32>>>;

/// The running children of every daemon in this process (one in practice).
pub fn children() -> &'static Children {
    static C: std::sync::OnceLock<Children> = std::sync::OnceLock::new();
    C.get_or_init(Default::default)
}

/// Runs `job` as a child `pgkeep` and records how it ended.
async fn run_job(shared: Arc<Shared>, job: Job) {
    if let Some(j) = job.config.jitter.and_then(|l| l.duration()) {
        use rand::Rng;
        let ms = rand::rng().random_range(0..=j.as_millis().min(u64::MAX as u128) as u64);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let started = Utc::now();
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("pgkeep"));
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--config")
        .arg(snapshot_path(&shared))
        .arg("--cluster")
        .arg(&job.cluster)
        .args(job.config.command_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    tracing::info!(
        "daemon: {} starts: pgkeep {}",
        job.name,
        job.config.command_args().join(" ")
    );
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            finish(
                &shared,
                &job,
                started,
                None,
                format!("could not start pgkeep: {e}"),
            );
            return;
        }
    };
    if let Some(pid) = child.id() {
        children()
            .lock()
            .expect("children")
            .insert(job.name.clone(), pid);
    }
    let mut stderr = child.stderr.take();
    let mut err = Vec::new();
    let read = async {
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut err).await;
        }
    };
    let (status, ()) = tokio::join!(child.wait(), read);
    children().lock().expect("children").remove(&job.name);
    let code = status.ok().and_then(|s| s.code());
    let text = String::from_utf8_lossy(&err);
    let tail: String = text
        .lines()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    finish(&shared, &job, started, code, tail);
}

fn finish(shared: &Shared, job: &Job, started: DateTime<Utc>, code: Option<i32>, tail: String) {
    let result = match code {
        Some(0) => "ok",
        Some(3) => "warning",
        Some(130) => "interrupted",
        _ => "failed",
    };
    let ended = Utc::now();
    let secs = (ended - started).num_milliseconds() as f64 / 1000.0;
    match code {
        Some(0) => tracing::info!("daemon: {} ended ok in {secs:.1} s", job.name),
        _ => tracing::warn!(
            "daemon: {} ended {result} (exit {}) in {secs:.1} s: {}",
            job.name,
            code.map_or("by signal".to_string(), |c| c.to_string()),
            tail.lines().last().unwrap_or("")
        ),
    }
    shared.update_schedule(&job.name, |s| {
        s.running = None;
        s.last = Some(JobRun {
            started,
            ended: Some(ended),
            exit_code: code,
            result: result.into(),
            output_tail: tail,
        });
    });
}
