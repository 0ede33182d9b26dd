//! Throwaway PostgreSQL clusters for tests.
//!
//! A [`Cluster`] owns a temporary directory holding its data directory (unless it was started on
//! an existing one), its unix socket directory and its server log. The server listens on
//! 127.0.0.1 and on a socket inside that directory, so clusters of parallel tests never share a
//! socket. Dropping a `Cluster` stops the server and removes the directory, unless the
//! `PGKEEP_KEEP_TEST_DIRS` variable is set (then the path is printed for a post-mortem).
//!
//! PostgreSQL refuses to run as root. When the test process is root, the directories are chowned
//! to `postgres` and `initdb`/`postgres` run through `runuser -u postgres --`. Client tools
//! (psql, pg_dump, pgbench) run as the test user and connect as the database user `postgres`
//! (trust authentication).
//!
//! [`ClusterBuilder::version`] picks a major version: its server binaries come from the cache
//! of `scripts/install-deps.sh` ([`versioned_bin_dir`]), and client tools the server's own
//! directory lacks from the newest installation there (the PostgreSQL 18 client tools serve
//! every older server).

use anyhow::{anyhow, bail, Context, Result};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Names a directory of PostgreSQL server binaries to use instead of the newest installed.
pub const PG_BIN_ENV: &str = "PGKEEP_PG_BIN";

/// The PostgreSQL server binaries (initdb, postgres, pg_ctl, pgbench, pg_controldata) the
/// tests use: see [`pg_bin_dir`]. Displays as that directory, so
/// `format!("{PG_BIN_DIR}/pgbench")` names a binary.
pub const PG_BIN_DIR: PgBinDir = PgBinDir;

/// The type of [`PG_BIN_DIR`]: resolved once, on first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgBinDir;

impl std::fmt::Display for PgBinDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match pg_bin_dir() {
            Ok(p) => write!(f, "{}", p.display()),
            // Keeps the command's "not found" error pointing at the cause.
            Err(_) => write!(f, "/usr/lib/postgresql/NO-SERVER-INSTALLED/bin"),
        }
    }
}

/// The directory of PostgreSQL server binaries: `$PGKEEP_PG_BIN` when set, else the newest
/// major version under `/usr/lib/postgresql/<major>/bin` (Debian's layout) that holds a
/// `postgres` binary. Resolved once per process. Fails with the fix when there is none.
pub fn pg_bin_dir() -> Result<&'static Path> {
    static DIR: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        find_pg_bin_dir(
            std::env::var_os(PG_BIN_ENV),
            Path::new("/usr/lib/postgresql"),
        )
    })
    .as_deref()
    .map_err(|e| anyhow!("{e}"))
}

fn find_pg_bin_dir(
    from_env: Option<std::ffi::OsString>,
    root: &Path,
) -> std::result::Result<PathBuf, String> {
    if let Some(dir) = from_env.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        return if dir.join("postgres").is_file() {
            Ok(dir)
        } else {
            Err(format!(
                "{PG_BIN_ENV}={} holds no `postgres` binary. HINT: point it at a PostgreSQL \
                 server's bin directory, or unset it to use the newest under {}",
                dir.display(),
                root.display()
            ))
        };
    }
    // Version-ordered, not string-ordered: 9.6 < 10 < 15 < 16.
    let version =
        |name: &str| -> Option<Vec<u32>> { name.split('.').map(|p| p.parse().ok()).collect() };
    let newest = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bin = e.path().join("bin");
            (bin.join("postgres").is_file()).then_some((version(&name)?, bin))
        })
        .max();
    newest.map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "no PostgreSQL server found under {}/<major>/bin. HINT: run scripts/install-deps.sh \
             (apt-get install postgresql), or set {PG_BIN_ENV} to a server's bin directory",
            root.display()
        )
    })
}

/// Names the cache directory of `scripts/install-deps.sh` (PostgreSQL 13 to 18, one
/// `<major>/bin` each).
pub const PG_CACHE_ENV: &str = "PGKEEP_PG_CACHE";

/// The cache directory of `scripts/install-deps.sh` when [`PG_CACHE_ENV`] is not set.
pub const DEFAULT_PG_CACHE: &str = "/var/cache/pgkeep/pg";

/// The cache directory of `scripts/install-deps.sh`.
pub fn pg_cache_dir() -> PathBuf {
    std::env::var_os(PG_CACHE_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_CACHE))
}

/// The server binaries of PostgreSQL `major`: `<cache>/<major>/bin` (see [`pg_cache_dir`]),
/// else Debian's `/usr/lib/postgresql/<major>/bin`. Fails with the fix when neither holds a
/// `postgres` binary.
pub fn versioned_bin_dir(major: u32) -> Result<PathBuf> {
    let cache = pg_cache_dir().join(major.to_string()).join("bin");
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    for dir in [&cache, &debian] {
        if dir.join("postgres").is_file() {
            return Ok(dir.clone());
        }
    }
    bail!(
        "no PostgreSQL {major} server: neither {} nor {} holds `postgres`. HINT: run \
         scripts/install-deps.sh (it installs PostgreSQL 13 to 18 into {}; {PG_CACHE_ENV} moves it)",
        cache.display(),
        debian.display(),
        pg_cache_dir().display()
    )
}

/// The newest installation of `program` of major `min_major` or later, in the install-deps
/// cache or Debian's directories.
fn newest_client(program: &str, min_major: u32) -> Option<PathBuf> {
    [pg_cache_dir(), PathBuf::from("/usr/lib/postgresql")]
        .iter()
        .flat_map(|root| std::fs::read_dir(root).into_iter().flatten().flatten())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let path = e.path().join("bin").join(program);
            (major >= min_major && path.is_file()).then_some((major, path))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, p)| p)
}

/// Operating-system user that runs the server when the tests run as root.
const PG_OS_USER: &str = "postgres";

/// How long `start` waits for the server to accept connections (recovery of a restored copy
/// replays WAL first, so this is generous).
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(120);

/// How a server is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: roll back sessions, write a shutdown checkpoint. The data directory is clean.
    Fast,
    /// SIGQUIT: no checkpoint; the next start runs crash recovery (a simulated crash).
    Immediate,
}

/// Options for a new or existing cluster. Start from [`Cluster::builder`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    major: Option<u32>,
    checksums: bool,
    settings: Vec<(String, String)>,
    port: Option<u16>,
    start_timeout: Duration,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        ClusterBuilder {
            major: None,
            checksums: true,
            settings: Vec::new(),
            port: None,
            start_timeout: DEFAULT_START_TIMEOUT,
        }
    }
}

impl ClusterBuilder {
    /// Run this major version of PostgreSQL (see [`versioned_bin_dir`]) instead of the
    /// default server ([`pg_bin_dir`]).
    pub fn version(mut self, major: u32) -> Self {
        self.major = Some(major);
        self
    }

    /// The server binaries this builder runs.
    fn bin_dir(&self) -> Result<PathBuf> {
        match self.major {
            Some(m) => versioned_bin_dir(m),
            None => Ok(pg_bin_dir()?.to_path_buf()),
        }
    }

    /// Turn data page checksums on (the default) or off at initdb time.
    pub fn data_checksums(mut self, on: bool) -> Self {
        self.checksums = on;
        self
    }

    /// Add a server setting, passed as `-c key=value` on every start (so it also applies to a
    /// restored copy started with [`ClusterBuilder::start_existing`]).
    pub fn setting(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }

    /// Listen on this port instead of a free one chosen at start. A chosen port is not retried
    /// when it is taken.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Turn WAL archiving on with this `archive_command` (`%p`/`%f` as in PostgreSQL).
    pub fn archive_command(self, command: &str) -> Self {
        self.setting("archive_mode", "on")
            .setting("archive_command", command)
    }

    /// Set `restore_command` (for a restored copy that fetches WAL from an archive).
    pub fn restore_command(self, command: &str) -> Self {
        self.setting("restore_command", command)
    }

    /// How long a start waits for the server to accept connections.
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Run initdb into a new temporary directory without starting the server.
    pub fn init(self) -> Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("pgkeep-cluster-")
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        let root = dir.path().to_path_buf();
        let pgdata = root.join("data");
        let bin_dir = self.bin_dir()?;
        prepare_private_dirs(&root)?;
        let mut cmd = pg_command(&bin_dir, "initdb");
        cmd.arg("--no-sync").arg("-D").arg(&pgdata).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if self.checksums {
            cmd.arg("--data-checksums");
        }
        let out = cmd.output().context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed in {}: {}{}",
                pgdata.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Cluster::assemble(dir, pgdata, bin_dir, self))
    }

    /// Run initdb and start the server.
    pub fn start(self) -> Result<Cluster> {
        let mut c = self.init()?;
        c.start()?;
        Ok(c)
    }

    /// Take an existing data directory (e.g. produced by a restore), make it usable by the
    /// server user (chown to `postgres` when root, mode 0700, parent directories traversable),
    /// and start a server on it. The data directory stays the caller's: it is not removed on drop.
    pub fn start_existing(self, pgdata: &Path) -> Result<Cluster> {
        let mut c = self.adopt_existing(pgdata)?;
        c.start()?;
        Ok(c)
    }

    /// Like [`ClusterBuilder::start_existing`] without starting the server.
    pub fn adopt_existing(self, pgdata: &Path) -> Result<Cluster> {
        let pgdata = pgdata
            .canonicalize()
            .with_context(|| format!("data directory {}", pgdata.display()))?;
        if !pgdata.join("PG_VERSION").is_file() {
            bail!(
                "{} is not a PostgreSQL data directory (no PG_VERSION)",
                pgdata.display()
            );
        }
        let bin_dir = self.bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("pgkeep-cluster-")
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        prepare_private_dirs(dir.path())?;
        make_usable_by_server(&pgdata)?;
        // A copy of a running cluster carries its postmaster.pid; PostgreSQL would refuse to
        // start if the pid in it belongs to a live process.
        let _ = std::fs::remove_file(pgdata.join("postmaster.pid"));
        Ok(Cluster::assemble(dir, pgdata, bin_dir, self))
    }
}

/// A throwaway PostgreSQL cluster; see the module documentation.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    pgdata: PathBuf,
    bin_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    fixed_port: bool,
    opts: ClusterBuilder,
    child: Option<Child>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("pgdata", &self.pgdata)
            .field("port", &self.port)
            .field("running", &self.child.is_some())
            .finish()
    }
}

impl Cluster {
    /// Options for a new cluster (checksums on, free port).
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// A started cluster with the default options.
    pub fn new() -> Result<Cluster> {
        Cluster::builder().start()
    }

    fn assemble(
        dir: tempfile::TempDir,
        pgdata: PathBuf,
        bin_dir: PathBuf,
        opts: ClusterBuilder,
    ) -> Cluster {
        let root = dir.path().to_path_buf();
        Cluster {
            dir: Some(dir),
            pgdata,
            bin_dir,
            socket_dir: root.join("sock"),
            log_path: root.join("server.log"),
            port: opts.port.unwrap_or(0),
            fixed_port: opts.port.is_some(),
            opts,
            child: None,
        }
    }

    /// The data directory.
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// The directory of the server binaries this cluster runs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The major version chosen with [`ClusterBuilder::version`], if any.
    pub fn major(&self) -> Option<u32> {
        self.opts.major
    }

    /// The client tool `program` for this cluster: the server's own directory's, else (for a
    /// cluster of a chosen major) the newest installed one of that major or later, else the
    /// bare name, found on PATH.
    pub fn client_program(&self, program: &str) -> PathBuf {
        let own = self.bin_dir.join(program);
        if own.is_file() {
            return own;
        }
        self.opts
            .major
            .and_then(|m| newest_client(program, m))
            .unwrap_or_else(|| PathBuf::from(program))
    }

    /// The TCP port (and the socket's port number). 0 before the first start with a free port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The unix socket directory (inside the cluster's temporary directory).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server log file (stderr of the postmaster).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The cluster's temporary directory (holds socket dir and log; the data directory too for
    /// clusters made by initdb). Tests may put scratch files here: it is removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/"))
    }

    /// Whether the server was started by this helper and has not been stopped.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// A libpq conninfo string for the `postgres` database as user `postgres` over the socket.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir.display(),
            self.port
        )
    }

    /// Like [`Cluster::conninfo`] for another database.
    pub fn conninfo_db(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={}",
            self.socket_dir.display(),
            self.port,
            db
        )
    }

    /// libpq environment variables (PGHOST, PGPORT, PGUSER, PGDATABASE) for client tools.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), self.socket_dir.display().to_string()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
            ("PGDATABASE".into(), "postgres".into()),
        ]
    }

    /// A command for a client tool with this cluster's libpq environment (and no PGPASSWORD or
    /// PGSERVICE leaking in from the test's environment). A bare name is looked up with
    /// [`Cluster::client_program`].
    pub fn client_command(&self, program: &str) -> Command {
        let mut cmd = if program.contains('/') {
            Command::new(program)
        } else {
            Command::new(self.client_program(program))
        };
        for v in ["PGPASSWORD", "PGSERVICE", "PGOPTIONS", "PGPASSFILE"] {
            cmd.env_remove(v);
        }
        cmd.envs(self.env());
        cmd
    }

    /// Start the server and wait until it accepts connections. With a free port, a port taken
    /// between choosing and binding is retried with another one.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("cluster {} is already running", self.pgdata.display());
        }
        let attempts = if self.fixed_port { 1 } else { 5 };
        let mut last_err = None;
        for _ in 0..attempts {
            if !self.fixed_port {
                self.port = free_port()?;
            }
            match self.start_once() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
                    let port_taken = log.contains("could not bind")
                        || log.contains("Address already in use")
                        || log.contains("could not create any TCP/IP sockets");
                    last_err = Some(e);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("server did not start")))
    }

    fn start_once(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.socket_dir)?;
        chown_to_server_user(&self.socket_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        chown_to_server_user(&self.log_path)?;
        let mut cmd = pg_command(&self.bin_dir, "postgres");
        cmd.arg("-D")
            .arg(&self.pgdata)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.socket_dir.display()
            ))
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "logging_collector=off"])
            .args(["-c", "fsync=off"]);
        for (k, v) in &self.opts.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("spawning postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + self.opts.start_timeout;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "postgres on {} exited during start-up ({status}); log tail:\n{}",
                    self.pgdata.display(),
                    self.log_tail()
                );
            }
            if self.pid_file_status().as_deref() == Some("ready")
                || self.pid_file_status().as_deref() == Some("standby")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.stop_mode(StopMode::Immediate);
                bail!(
                    "postgres on {} not ready after {:?}; log tail:\n{}",
                    self.pgdata.display(),
                    self.opts.start_timeout,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The status word of postmaster.pid (line 8: "starting", "ready", "standby", "stopping").
    fn pid_file_status(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.pgdata.join("postmaster.pid")).ok()?;
        text.lines().nth(7).map(|s| s.trim().to_string())
    }

    fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.pgdata.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stop the server with a fast shutdown.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_mode(StopMode::Fast)
    }

    /// Stop the server. Signals the postmaster itself (its pid from postmaster.pid), since
    /// `runuser` in between does not forward every signal.
    pub fn stop_mode(&mut self, mode: StopMode) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let sig = match mode {
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        };
        let pid = self.postmaster_pid().unwrap_or(child.id() as i32);
        // SAFETY: kill(2) with a pid read from our own server's pid file.
        unsafe {
            libc::kill(pid, sig);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                bail!("postgres on {} did not stop in time", self.pgdata.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // The postmaster removes its pid file last; wait for it so a copy taken right after a
        // stop is clean.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pgdata.join("postmaster.pid").exists() && Instant::now() < deadline {
            if mode == StopMode::Immediate {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Stop (fast) and start again, on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let fixed = self.fixed_port;
        self.fixed_port = true;
        let r = self.start();
        self.fixed_port = fixed;
        r
    }

    /// Waits until recovery has ended and the server was promoted (`pg_is_in_recovery()` is
    /// false). A restored server accepts read-only connections (hot standby) before it reaches
    /// its recovery target, so a test that writes or counts must wait for this first. Fails
    /// with the server log's tail after `timeout`.
    pub fn wait_until_promoted(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.sql("SELECT pg_is_in_recovery()")? != "f" {
            if Instant::now() >= deadline {
                bail!(
                    "the server on {} was not promoted within {timeout:?}; log:\n{}",
                    self.pgdata.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Run SQL through `psql -XAtq` on the `postgres` database; returns stdout without the
    /// trailing newline (rows on lines, columns separated by `|`).
    pub fn sql(&self, query: &str) -> Result<String> {
        self.sql_db("postgres", query)
    }

    /// Run SQL on the given database. The text is fed to psql as a script, so several
    /// statements run one by one (CREATE DATABASE and VACUUM work; no implicit transaction);
    /// the first error stops it.
    pub fn sql_db(&self, db: &str, query: &str) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .client_command("psql")
            .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", db, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running psql")?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let script = format!("{query}\n");
        // A writer thread: psql may fill its stdout pipe before reading all of a long script.
        let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
        let out = child.wait_with_output().context("running psql")?;
        let _ = writer.join();
        if !out.status.success() {
            bail!(
                "psql on port {} failed: {}\nquery: {query}",
                self.port,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut s = String::from_utf8(out.stdout).context("psql output is not UTF-8")?;
        while s.ends_with('\n') {
            s.pop();
        }
        Ok(s)
    }

    /// Run pgbench with these arguments (e.g. `["-i", "-s", "1"]`) against the `postgres`
    /// database; returns its stdout.
    pub fn pgbench(&self, args: &[&str]) -> Result<String> {
        let out = self
            .client_command("pgbench")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running pgbench")?;
        if !out.status.success() {
            bail!(
                "pgbench {:?} failed: {}",
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A plain-text `pg_dump` of one database, for comparing two clusters' contents. The
    /// `\restrict`/`\unrestrict` lines (a random key per run since PostgreSQL 15.14) are
    /// removed so two dumps of equal data compare equal.
    pub fn pg_dump(&self, db: &str) -> Result<String> {
        let out = self
            .client_command("pg_dump")
            .args(["--no-sync", "-d", db])
            .stdin(Stdio::null())
            .output()
            .context("running pg_dump")?;
        if !out.status.success() {
            bail!(
                "pg_dump of {db} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8(out.stdout).context("pg_dump output is not UTF-8")?;
        Ok(strip_restrict_lines(&text))
    }

    /// A plain-text `pg_dumpall` (roles, tablespaces and every database).
    pub fn pg_dumpall(&self) -> Result<String> {
        let out = self
            .client_command("pg_dumpall")
            .args(["--no-sync"])
            .stdin(Stdio::null())
            .output()
            .context("running pg_dumpall")?;
        if !out.status.success() {
            bail!(
                "pg_dumpall failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8(out.stdout).context("pg_dumpall output is not UTF-8")?;
        Ok(strip_restrict_lines(&text))
    }

    /// A new empty directory inside the cluster's temporary directory that the server user can
    /// use (e.g. a tablespace location or an archive directory). Removed on drop.
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir().join(name);
        std::fs::create_dir_all(&p)?;
        chown_to_server_user(&p)?;
        Ok(p)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop_mode(StopMode::Immediate);
        if std::env::var_os("PGKEEP_KEEP_TEST_DIRS").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!(
                    "PGKEEP_KEEP_TEST_DIRS: keeping cluster dir {} (data {})",
                    d.keep().display(),
                    self.pgdata.display()
                );
            }
        }
    }
}

/// Remove psql's `\restrict KEY` / `\unrestrict KEY` lines, whose key is random per dump.
pub fn strip_restrict_lines(dump: &str) -> String {
    dump.lines()
        .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
        .flat_map(|l| [l, "\n"])
        .collect()
}

/// The first line where two dumps differ, with its line number, or `None` when equal. For
/// assertion messages that do not print whole dumps.
pub fn first_difference(a: &str, b: &str) -> Option<String> {
    let (mut la, mut lb) = (a.lines(), b.lines());
    let mut n = 0usize;
    loop {
        n += 1;
        match (la.next(), lb.next()) {
            (None, None) => return None,
            (x, y) if x == y => continue,
            (x, y) => return Some(format!("line {n}: {x:?} != {y:?}")),
        }
    }
}

/// Whether this process runs as root (then the server runs as `postgres`).
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips root-only tests on purpose when set to `1`.
pub const SKIP_ROOT_TESTS_ENV: &str = "PGKEEP_SKIP_ROOT_TESTS";

/// For a test that needs root (`why`): true when it runs as root. Otherwise the test FAILS,
/// unless [`SKIP_ROOT_TESTS_ENV`]`=1` asks to skip it, which is said on stderr: a test that
/// cannot run must not pass silently.
pub fn require_root(why: &str) -> bool {
    if running_as_root() {
        return true;
    }
    if std::env::var(SKIP_ROOT_TESTS_ENV).as_deref() == Ok("1") {
        eprintln!("SKIPPED ({SKIP_ROOT_TESTS_ENV}=1): this test needs root: {why}");
        return false;
    }
    panic!(
        "this test needs root ({why}); run the tests as root, or set {SKIP_ROOT_TESTS_ENV}=1 to skip it on purpose"
    )
}

/// A command for a server binary of `bin_dir`, wrapped in `runuser -u postgres --` when root.
fn pg_command(bin_dir: &Path, bin: &str) -> Command {
    let path = bin_dir.join(bin);
    let mut cmd = if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_OS_USER, "--"]).arg(&path);
        c
    } else {
        Command::new(path)
    };
    // Keep the server's locale and environment predictable.
    cmd.env("LC_ALL", "C");
    cmd
}

/// Make the cluster's own temporary directory private to the server user.
fn prepare_private_dirs(root: &Path) -> Result<()> {
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
    chown_to_server_user(root)
}

fn server_uid_gid() -> Result<(u32, u32)> {
    let name = std::ffi::CString::new(PG_OS_USER).unwrap();
    // SAFETY: getpwnam with a valid C string; the result is read immediately.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("user {PG_OS_USER} does not exist (install the postgresql package)");
    }
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}

fn chown_to_server_user(p: &Path) -> Result<()> {
    if !running_as_root() {
        return Ok(());
    }
    let (uid, gid) = server_uid_gid()?;
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .with_context(|| format!("chown {} to {PG_OS_USER}", p.display()))
}

/// Prepare an existing data directory for the server: owner `postgres` (recursively, when
/// root), mode 0700, and every ancestor directory traversable by the server user.
fn make_usable_by_server(pgdata: &Path) -> Result<()> {
    std::fs::set_permissions(pgdata, std::fs::Permissions::from_mode(0o700))?;
    if !running_as_root() {
        return Ok(());
    }
    let st = Command::new("chown")
        .args(["-R", "-h", &format!("{PG_OS_USER}:{PG_OS_USER}")])
        .arg(pgdata)
        .status()
        .context("running chown -R")?;
    if !st.success() {
        bail!("chown -R {} failed", pgdata.display());
    }
    // Tablespace symlinks point outside the data directory; their targets need the owner too.
    if let Ok(rd) = std::fs::read_dir(pgdata.join("pg_tblspc")) {
        for e in rd.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let _ = Command::new("chown")
                    .args(["-R", &format!("{PG_OS_USER}:{PG_OS_USER}")])
                    .arg(&target)
                    .status();
                allow_traversal(&target)?;
            }
        }
    }
    allow_traversal(pgdata)
}

/// Add the search (x) bit for others on the ancestors of `p` that are below the system temp
/// directory (tempfile makes them 0700 root), so the server user can reach `p`.
fn allow_traversal(p: &Path) -> Result<()> {
    let tmp = std::env::temp_dir()
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("/tmp"));
    let mut cur = p.parent();
    while let Some(dir) = cur {
        if !dir.starts_with(&tmp) || dir == tmp {
            break;
        }
        let meta = std::fs::metadata(dir)?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(
                dir,
                std::fs::Permissions::from_mode((mode & 0o7777) | 0o711),
            )?;
        }
        cur = dir.parent();
    }
    Ok(())
}

/// A port that was free a moment ago: bind 127.0.0.1:0 and release it. Racy by nature; `start`
/// retries with another port when the server cannot bind.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// Copy a directory tree (files, directories, symlinks as symlinks) preserving modes. For tests
/// that copy a stopped cluster's data directory.
pub fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .context("running cp -a")?;
    if !st.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_installed_server_is_chosen_unless_pgkeep_pg_bin_says_otherwise() {
        let root = tempfile::tempdir().unwrap();
        let install = |major: &str| {
            let bin = root.path().join(major).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("postgres"), b"").unwrap();
            bin
        };
        assert!(find_pg_bin_dir(None, root.path())
            .unwrap_err()
            .contains("HINT"));
        install("9.6");
        let v15 = install("15");
        // A client-only major (no server binary) does not count.
        std::fs::create_dir_all(root.path().join("17/bin")).unwrap();
        assert_eq!(find_pg_bin_dir(None, root.path()).unwrap(), v15);
        let v16 = install("16");
        assert_eq!(find_pg_bin_dir(None, root.path()).unwrap(), v16);
        assert_eq!(
            find_pg_bin_dir(Some(v15.clone().into()), root.path()).unwrap(),
            v15
        );
        let err = find_pg_bin_dir(Some("/nonexistent".into()), root.path()).unwrap_err();
        assert!(err.contains("PGKEEP_PG_BIN=/nonexistent"), "{err}");
        // The real machine: whatever it is, it names a directory with a server.
        assert!(PathBuf::from(PG_BIN_DIR.to_string())
            .join("postgres")
            .is_file());
    }

    #[test]
    fn a_missing_major_names_the_install_script() {
        let e = versioned_bin_dir(99).unwrap_err().to_string();
        assert!(
            e.contains("PostgreSQL 99") && e.contains("scripts/install-deps.sh"),
            "{e}"
        );
    }

    #[test]
    fn starts_and_answers_queries() -> Result<()> {
        let c = Cluster::builder().setting("work_mem", "7MB").start()?;
        assert_eq!(c.sql("select 1+1")?, "2");
        assert_eq!(c.sql("show work_mem")?, "7MB");
        assert_eq!(c.sql("show data_checksums")?, "on");
        assert!(c.port() > 0);
        assert!(c.pgdata().join("PG_VERSION").exists());
        assert!(c.sql("select * from no_such_table").is_err());
        Ok(())
    }

    #[test]
    fn checksums_off_and_restart_keep_data() -> Result<()> {
        let mut c = Cluster::builder().data_checksums(false).start()?;
        assert_eq!(c.sql("show data_checksums")?, "off");
        c.sql("create table t(i int); insert into t select generate_series(1,10)")?;
        let port = c.port();
        c.restart()?;
        assert_eq!(c.port(), port);
        assert_eq!(c.sql("select sum(i) from t")?, "55");
        Ok(())
    }

    #[test]
    fn copy_of_a_stopped_cluster_starts() -> Result<()> {
        let mut a = Cluster::new()?;
        a.sql("create table t(v text); insert into t values ('hello')")?;
        a.pgbench(&["-i", "-s", "1", "-q"])?;
        let dump_a = a.pg_dump("postgres")?;
        a.stop()?;
        let target = tempfile::tempdir()?;
        let copy = target.path().join("restored");
        copy_tree(a.pgdata(), &copy)?;
        let b = Cluster::builder().start_existing(&copy)?;
        assert_ne!(b.port(), 0);
        assert_eq!(b.sql("select v from t")?, "hello");
        let dump_b = b.pg_dump("postgres")?;
        assert_eq!(first_difference(&dump_a, &dump_b), None);
        assert!(dump_a.contains("hello") && !dump_a.contains("\\restrict"));
        // Both running at once on different ports and sockets.
        a.start()?;
        assert_ne!(a.port(), b.port());
        assert_eq!(a.sql("select count(*) from pgbench_branches")?, "1");
        Ok(())
    }

    #[test]
    fn drop_removes_the_directory() -> Result<()> {
        let c = Cluster::new()?;
        let dir = c.dir().to_path_buf();
        assert!(dir.exists());
        drop(c);
        if std::env::var_os("PGKEEP_KEEP_TEST_DIRS").is_none() {
            assert!(!dir.exists());
        }
        Ok(())
    }
}
