//! Helpers for the CLI tests: run the real `pgkeep` binary in a clean environment.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory with an empty config file, and the repository path inside it.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // An explicit (empty) config file, so /etc/pgkeep/pgkeep.toml of the machine never
        // leaks into a test.
        std::fs::write(dir.path().join("empty.toml"), "").unwrap();
        Sandbox { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The local repository location used by most tests.
    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// `pgkeep ARGS` with only PATH, HOME, PGKEEP_CONFIG (the empty file) and `envs` set.
    pub fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgkeep"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env("PGKEEP_CONFIG", self.path().join("empty.toml"))
            // CI machines run with little free disk; the free-space check is tested on its
            // own (health_cli), every other `check` must not depend on the machine's disk.
            .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
            .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
            .current_dir(self.path())
            .args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Run(cmd.output().unwrap())
    }

    /// `pgkeep --repo <sandbox repo> ARGS`.
    pub fn run_repo(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let repo = self.repo();
        let mut all = vec!["--repo", repo.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run(&all, envs)
    }
}

/// The outcome of one run.
pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    /// Asserts the exit code, showing both streams when it differs.
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }

    /// stdout parsed as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", self.stdout()))
    }
}

/// Every file under `root` with its bytes and modification time: a repository listing to
/// compare before and after a command that must not write.
pub fn listing(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    (Vec::new(), m.modified().unwrap()),
                );
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    (bytes, m.modified().unwrap()),
                );
            }
        }
    }
    out
}

impl Sandbox {
    /// A sandbox with a plain repository that the PostgreSQL server user can write (the
    /// archiver runs `pgkeep archive-push` as `postgres`).
    pub fn shared() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let s = Sandbox::new();
        s.run_repo(&["repo", "init", "--no-encryption"], &[])
            .expect(0);
        std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(
            s.path().join("empty.toml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        if pgkeep_testing::cluster::running_as_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(s.repo())
                .status()
                .unwrap();
            assert!(st.success());
        }
        s
    }
}

/// A running cluster whose `archive_command` is `pgkeep archive-push` into the sandbox's
/// repository (which [`Sandbox::shared`] makes writable by the server user).
pub fn start_archiving(s: &Sandbox) -> pgkeep_testing::Cluster {
    let command = format!(
        "{} --config {} --repo {} archive-push %p",
        env!("CARGO_BIN_EXE_pgkeep"),
        s.path().join("empty.toml").display(),
        s.repo().display()
    );
    pgkeep_testing::Cluster::builder()
        .archive_command(&command)
        .start()
        .unwrap()
}

/// Switches WAL and waits until the server archived the segment (pg_stat_archiver), failing
/// with the server log when the archive_command failed.
pub fn switch_and_wait(c: &pgkeep_testing::Cluster) {
    use std::time::{Duration, Instant};
    let last = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = c
            .sql("SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver")
            .unwrap();
        let (archived, failed) = row.split_once('|').unwrap();
        assert_eq!(failed, "0", "archive_command failed:\n{}", c.log_tail());
        if archived >= last.as_str() {
            return;
        }
        assert!(Instant::now() < deadline, "{last} not archived");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks `text` with `promtool check metrics` (Debian package prometheus).
pub fn promtool(text: &str) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the metrics sample whose line starts with `prefix` (name and labels).
pub fn sample(text: &str, prefix: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix}\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}
