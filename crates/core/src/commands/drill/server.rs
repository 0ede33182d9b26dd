//! The throwaway PostgreSQL server of a drill: started on the restored scratch directory with
//! settings that cut it off from everything the production cluster uses (no TCP listener, a
//! unix socket inside the scratch directory, archive_mode off, no archive cleanup or recovery
//! end command), as the data directory's owner, and stopped, whatever happens, before the
//! scratch directory is removed.
//!
//! The postmaster is this process's child with a parent-death signal (SIGQUIT, PostgreSQL's
//! immediate shutdown): a drill killed with SIGKILL does not leave a server running. On a
//! normal end, an error, SIGINT or SIGTERM, [`ScratchServer`]'s drop stops it.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};

/// Settings the drill always gives the scratch server, on its command line (over every
/// configuration file, `postgresql.auto.conf` included); `[drill] settings` may not change
/// them.
pub const FORCED_SETTINGS: &[&str] = &[
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "data_directory",
    "hba_file",
    "ident_file",
    "archive_mode",
    "archive_command",
    "archive_library",
    "archive_cleanup_command",
    "recovery_end_command",
    "restore_command",
    "primary_conninfo",
    "primary_slot_name",
];

/// A user to run the server as (root may not run PostgreSQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl RunAs {
    /// `postgres` when this process runs as root (None otherwise: the server runs as this
    /// user, who owns what it restored).
    pub fn for_server() -> Result<Option<RunAs>> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let name = CString::new("postgres").expect("no NUL");
        // SAFETY: getpwnam with a valid C string; the fields are copied at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            return Err(Error::usage_hint(
                "the drill runs as root and there is no `postgres` user to start PostgreSQL as (it refuses to run as root)",
                "create the postgres user, or run the drill as the PostgreSQL server user",
            ));
        }
        // SAFETY: pw is a valid passwd entry.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Ok(Some(RunAs { uid, gid }))
    }

    /// Gives `path` and everything under it to this user (symlinks themselves, not their
    /// targets).
    pub fn chown_tree(&self, path: &Path) -> Result<()> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::usage(format!("{} has a NUL byte", path.display())))?;
        // SAFETY: lchown with a valid C string.
        if unsafe { libc::lchown(c.as_ptr(), self.uid, self.gid) } != 0 {
            return Err(Error::io(
                format!("giving {} to the server user", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(path)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            for e in entries {
                let e = e.map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                self.chown_tree(&e.path())?;
            }
        }
        Ok(())
    }
}

/// How to start the scratch server.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The `postgres` executable of the backup's major version.
    pub postgres: PathBuf,
    /// The restored data directory.
    pub pgdata: PathBuf,
    /// The scratch directory (socket, hba file, log live here).
    pub scratch: PathBuf,
    /// A free TCP port number, used only to name the unix socket.
    pub port: u16,
    /// `[drill] settings`, after the forced ones were refused in them.
    pub extra_settings: Vec<(String, String)>,
    /// Environment variables for the server (and so for its `restore_command`).
    pub env: Vec<(String, String)>,
    /// Whom to run it as.
    pub run_as: Option<RunAs>,
}

impl ServerSpec {
    /// The directory of the unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.scratch.join("socket")
    }

    /// The server's log (stderr and stdout).
    pub fn log_path(&self) -> PathBuf {
        self.scratch.join("server.log")
    }

    /// Writes the files the command line points at: a trust-for-local-sockets hba file (the
    /// socket is in a directory only the server user can enter), an empty ident file, and an
    /// empty `postgresql.conf` when the backup has none (a Debian-style cluster keeps it in
    /// /etc).
    pub fn prepare(&self) -> Result<()> {
        let write = |p: PathBuf, text: &str| {
            std::fs::write(&p, text).map_err(|e| Error::io(format!("writing {}", p.display()), e))
        };
        std::fs::create_dir_all(self.socket_dir())
            .map_err(|e| Error::io(format!("creating {}", self.socket_dir().display()), e))?;
        write(
            self.scratch.join("drill_hba.conf"),
            "# pgkeep drill: local socket only, inside the scratch directory\nlocal all all trust\n",
        )?;
        write(self.scratch.join("drill_ident.conf"), "")?;
        if !self.pgdata.join("postgresql.conf").exists() {
            write(self.pgdata.join("postgresql.conf"), "")?;
        }
        Ok(())
    }

    /// The `-c name=value` pairs of the command line, forced ones first, then the user's.
    pub fn settings(&self) -> Vec<(String, String)> {
        let p = |s: &Path| s.display().to_string();
        let mut v: Vec<(String, String)> = [
            ("data_directory", p(&self.pgdata)),
            ("port", self.port.to_string()),
            ("listen_addresses", String::new()),
            ("unix_socket_directories", p(&self.socket_dir())),
            ("hba_file", p(&self.scratch.join("drill_hba.conf"))),
            ("ident_file", p(&self.scratch.join("drill_ident.conf"))),
            ("archive_mode", "off".into()),
            ("archive_command", String::new()),
            ("archive_cleanup_command", String::new()),
            ("recovery_end_command", String::new()),
            ("primary_conninfo", String::new()),
            ("primary_slot_name", String::new()),
            // Without connections during recovery, a backup of a primary with larger
            // max_connections (and the like) than this host's settings still replays.
            ("hot_standby", "off".into()),
            ("ssl", "off".into()),
            ("logging_collector", "off".into()),
            ("log_destination", "stderr".into()),
            ("log_timezone", "UTC".into()),
            ("cluster_name", "pgkeep-drill".into()),
            ("synchronous_standby_names", String::new()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        v.extend(self.extra_settings.iter().cloned());
        v
    }
}

/// A running scratch server; dropping it stops the server (immediate shutdown).
#[derive(Debug)]
pub struct ScratchServer {
    child: Option<Child>,
    spec: ServerSpec,
    started: Instant,
}

/// What the log said while the server came up.
#[derive(Debug, Clone, Default)]
pub struct StartupLog {
    /// WAL segments (and history files) the server restored from the archive.
    pub segments_restored: u64,
    /// The `FATAL`/`PANIC` lines, if the server stopped.
    pub fatal: Vec<String>,
}

impl ScratchServer {
    /// Starts `postgres` on the scratch directory (does not wait for it).
    pub fn start(spec: &ServerSpec) -> Result<ScratchServer> {
        spec.prepare()?;
        if let Some(r) = spec.run_as {
            r.chown_tree(&spec.scratch)?;
        }
        let log = File::create(spec.log_path())
            .map_err(|e| Error::io(format!("creating {}", spec.log_path().display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| Error::io("duplicating the server log descriptor", e))?;
        let mut cmd = Command::new(&spec.postgres);
        cmd.arg("-D").arg(&spec.pgdata);
        for (k, v) in spec.settings() {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.scratch)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let run_as = spec.run_as;
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(r) = run_as {
                    let groups = [r.gid];
                    if libc::setgroups(1, groups.as_ptr()) != 0
                        || libc::setgid(r.gid) != 0
                        || libc::setuid(r.uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // After the uid change (which clears it): the postmaster shuts down at once
                // if this process dies, even by SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", spec.postgres.display()), e))?;
        Ok(ScratchServer {
            child: Some(child),
            spec: spec.clone(),
            started: Instant::now(),
        })
    }

    /// The libpq connection string of database `db` as `user`.
    pub fn conninfo(&self, user: &str, db: &str) -> String {
        let q = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
        format!(
            "host={} port={} user={} dbname={} connect_timeout=10 application_name=pgkeep-drill",
            q(&self.spec.socket_dir().display().to_string()),
            self.spec.port,
            q(user),
            q(db)
        )
    }

    /// Waits until the server has finished recovery and accepts connections (the status
    /// `ready` in `postmaster.pid`), calling `tick` with the log's account about once a
    /// second. A server that stops is an error with its FATAL lines: exit 16 when recovery
    /// ended before its target, exit 1 otherwise.
    pub async fn wait_ready(
        &mut self,
        timeout: Duration,
        tick: &dyn Fn(&StartupLog),
    ) -> Result<StartupLog> {
        let mut last_tick = Instant::now();
        loop {
            let log = self.read_log();
            if let Some(status) = self.try_exit()? {
                return Err(self.start_failure(status, &log));
            }
            if self.pid_status().as_deref() == Some("ready") {
                return Ok(log);
            }
            if self.started.elapsed() > timeout {
                return Err(Error::with_hint(
                    ErrorKind::Failure,
                    format!(
                        "drill: the scratch server did not finish recovery within {} ({} WAL segments restored so far)",
                        humantime::format_duration(timeout),
                        log.segments_restored
                    ),
                    "raise [drill] timeout, or look at the WAL volume to replay (pgkeep list, pgkeep check)",
                ));
            }
            if last_tick.elapsed() >= Duration::from_secs(1) {
                tick(&log);
                last_tick = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn try_exit(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c
                .try_wait()
                .map_err(|e| Error::io("waiting for the scratch server", e)),
            None => Ok(None),
        }
    }

    /// The status word of `postmaster.pid` (line 8: starting, ready, standby, stopping).
    fn pid_status(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.spec.pgdata.join("postmaster.pid")).ok()?;
        text.lines().nth(7).map(|l| l.trim().to_string())
    }

    /// What the server's log says so far.
    pub fn read_log(&self) -> StartupLog {
        let mut out = StartupLog::default();
        let Ok(f) = File::open(self.spec.log_path()) else {
            return out;
        };
        for line in BufReader::new(f).lines().map_while(|l| l.ok()) {
            if line.contains("restored log file") {
                out.segments_restored += 1;
            }
            if line.contains("FATAL:") || line.contains("PANIC:") {
                out.fatal.push(line);
            }
        }
        out
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let text = std::fs::read_to_string(self.spec.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn start_failure(&mut self, status: std::process::ExitStatus, log: &StartupLog) -> Error {
        self.child = None;
        let lines = if log.fatal.is_empty() {
            self.log_tail(5)
        } else {
            log.fatal.clone()
        };
        let text = lines.join("\n  ");
        if text.contains("recovery ended before configured recovery target was reached") {
            return Error::with_hint(
                ErrorKind::TargetUnreachable,
                format!("drill: recovery ended before the target was reached:\n  {text}"),
                "the archive does not hold the WAL up to the target; pick an earlier target (pgkeep list --wal shows what is archived)",
            );
        }
        Error::with_hint(
            ErrorKind::Failure,
            format!("drill: the scratch server stopped during start-up or recovery ({status}):\n  {text}"),
            "a setting of the backup's postgresql.conf may not fit this host (shared_buffers, shared_preload_libraries, include files): override it in [drill] settings",
        )
    }

    /// Stops the server with a fast shutdown (a checkpoint, then exit), or an immediate one
    /// after `grace`. Returns whether it was a clean fast shutdown.
    pub fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        signal(&child, libc::SIGINT);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop_immediately(&mut child);
        false
    }
}

impl Drop for ScratchServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_immediately(&mut child);
        }
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// SIGQUIT (immediate shutdown: the postmaster stops its children and exits), then SIGKILL
/// after five seconds.
fn stop_immediately(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child, libc::SIGQUIT);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A TCP port nobody listens on now (the server listens on no TCP port: the number only
/// names its socket file, which is in the scratch directory anyway).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("finding a free port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port", e))
}

/// A scratch directory, removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

/// Name prefix of scratch directories; a leftover of a killed drill is recognised by it and
/// by its `drill.pid` naming a process that is gone.
pub const SCRATCH_PREFIX: &str = "pgkeep-drill-";

impl ScratchDir {
    /// Creates `<parent>/pgkeep-drill-<random>` (0700), after removing leftovers of drills
    /// that were killed (their `drill.pid` names a process that no longer exists).
    pub fn create(parent: &Path) -> Result<(ScratchDir, Vec<PathBuf>)> {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("creating {}", parent.display()), e))?;
        let removed = remove_leftovers(parent);
        let suffix: String = {
            use rand::Rng;
            let mut r = rand::rng();
            (0..10)
                .map(|_| char::from(b'a' + r.random_range(0..26u8)))
                .collect()
        };
        let path = parent.join(format!("{SCRATCH_PREFIX}{suffix}"));
        std::fs::create_dir(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("securing {}", path.display()), e))?;
        std::fs::write(path.join("drill.pid"), std::process::id().to_string())
            .map_err(|e| Error::io(format!("writing {}/drill.pid", path.display()), e))?;
        Ok((ScratchDir { path }, removed))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::warn!(
                "drill: could not remove the scratch directory {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Removes `pgkeep-drill-*` directories of `parent` whose `drill.pid` names a process that
/// is gone (a drill killed with SIGKILL); returns what it removed.
fn remove_leftovers(parent: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return removed;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(SCRATCH_PREFIX) {
            continue;
        }
        let pid: Option<i32> = std::fs::read_to_string(e.path().join("drill.pid"))
            .ok()
            .and_then(|t| t.trim().parse().ok());
        // SAFETY: kill with signal 0 only checks that the process exists.
        let alive = pid.is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
        let server_alive = std::fs::read_to_string(e.path().join("pgdata/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            // SAFETY: as above.
            .is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
        if pid.is_some() && !alive && !server_alive && std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}
