//! `pgkeep daemon`: runs the `[[schedule]]` jobs of the configuration file and, when
//! `[daemon] listen` is set, serves `/metrics`, `/healthz`, `/api/...` and a dashboard.
//!
//! A layer above the commands: jobs are the `pgkeep` commands themselves (see
//! [`scheduler`]), and the listener reads the run history, health, status and metrics
//! through pgkeep-core like `pgkeep status` does.
//!
//! Signals: SIGHUP reloads the file (a bad one is refused and the old one kept); SIGTERM and
//! SIGINT stop taking new runs, give running ones `[daemon] stop_timeout` to end, then
//! interrupt them (SIGTERM: they end with exit 130, locks released, recorded as
//! interrupted), and the daemon exits 0.

pub mod generate;
pub mod http;
pub mod scheduler;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use pgkeep_core::config::{ConfigFile, Env};
use pgkeep_core::error::{Error, Result};
use scheduler::{children, Job};
use state::Shared;

/// Default of `[daemon] stop_timeout`.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long interrupted jobs get to end before they are killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(30);

/// Options of `pgkeep daemon`.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The configuration file (required: the schedules live there).
    pub config: PathBuf,
    /// The `PGKEEP_*` environment.
    pub env: Env,
}

/// The file, its jobs and its text (for the snapshot the jobs run with).
fn load(path: &std::path::Path) -> Result<(ConfigFile, Vec<Job>, String)> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::usage(format!("cannot read config file {}: {e}", path.display())))?;
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o077)
        .unwrap_or(0o077);
    let file = ConfigFile::parse(&text, path, mode)?;
    let jobs =
        scheduler::jobs_of(&file).map_err(|m| Error::usage(format!("{}: {m}", path.display())))?;
    if jobs.is_empty() && file.daemon.listen.is_none() {
        return Err(Error::usage_hint(
            format!(
                "{}: nothing for the daemon to do: no [[schedule]] and no [daemon] listen",
                path.display()
            ),
            "add [[schedule]] tables (job, cron, cluster, ...) or [daemon] listen = \"127.0.0.1:9187\"",
        ));
    }
    Ok((file, jobs, text))
}

/// One generation of schedule tasks (replaced on SIGHUP).
struct Generation {
    stop: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

fn start_generation(shared: &Arc<Shared>, jobs: &[Job], run_now: &[String]) -> Generation {
    scheduler::install(shared, jobs);
    let (stop, rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for j in jobs {
        tasks.spawn(scheduler::schedule_loop(
            shared.clone(),
            j.clone(),
            run_now.contains(&j.name),
            rx.clone(),
        ));
    }
    Generation { stop, tasks }
}

impl Generation {
    async fn end(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(opts: &DaemonOptions) -> Result<()> {
    let (file, jobs, text) = load(&opts.config)?;
    let mut hup =
        signal(SignalKind::hangup()).map_err(|e| Error::io("installing the SIGHUP handler", e))?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::io("installing the SIGTERM handler", e))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::io("installing the SIGINT handler", e))?;
    let shared = Shared::new(opts.config.clone(), opts.env.clone(), file);
    scheduler::write_snapshot(&shared, &text)?;
    let (http_stop, http_stop_rx) = watch::channel(false);
    let http = http::start(shared.clone(), http_stop_rx).await?;
    let due = scheduler::missed_at_start(&shared, &jobs);
    let mut generation = start_generation(&shared, &jobs, &due);
    tracing::info!(
        "daemon: {} schedules from {}{}",
        jobs.len(),
        opts.config.display(),
        shared
            .file()
            .daemon
            .listen
            .as_deref()
            .map(|l| format!("; listening on {l}"))
            .unwrap_or_default()
    );
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match load(&opts.config) {
                    Ok((file, jobs, text)) => {
                        generation.end().await;
                        shared.replace_file(file);
                        if let Err(e) = scheduler::write_snapshot(&shared, &text) {
                            tracing::error!("daemon: {e}");
                        }
                        generation = start_generation(&shared, &jobs, &[]);
                        tracing::info!("daemon: configuration reloaded: {} schedules", jobs.len());
                    }
                    Err(e) => tracing::error!(
                        "daemon: the configuration was not reloaded, the old one stays in force: {e}"
                    ),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("daemon: stopping: no new runs");
    generation.end().await;
    let stop_timeout = shared
        .file()
        .daemon
        .stop_timeout
        .and_then(|l| l.duration())
        .unwrap_or(DEFAULT_STOP_TIMEOUT);
    stop_children(stop_timeout).await;
    let _ = http_stop.send(true);
    if let Some(h) = http {
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }
    tracing::info!("daemon: stopped");
    Ok(())
}

/// Lets running jobs end for `timeout`, then interrupts them (SIGTERM), then kills what is
/// left after [`INTERRUPT_GRACE`].
async fn stop_children(timeout: Duration) {
    let running = || children().lock().expect("children").clone();
    let wait_empty = |limit: Duration| async move {
        let until = Instant::now() + limit;
        while !running().is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    if running().is_empty() {
        return;
    }
    tracing::info!(
        "daemon: waiting up to {} for {} running job(s) to end",
        humantime_secs(timeout),
        running().len()
    );
    wait_empty(timeout).await;
    for (name, pid) in running() {
        tracing::warn!("daemon: interrupting {name} (pid {pid})");
        // SAFETY: kill(2) on a child's pid.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    wait_empty(INTERRUPT_GRACE).await;
    for (name, pid) in running() {
        tracing::error!("daemon: killing {name} (pid {pid}): it did not stop");
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    wait_empty(Duration::from_secs(5)).await;
}

fn humantime_secs(d: Duration) -> String {
    format!("{} s", d.as_secs())
}
