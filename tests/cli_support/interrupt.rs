//! Helpers for the interruption tests: start `pgkeep` in the background, wait until it is
//! visibly at work, send it SIGINT or SIGTERM, and time its exit.

#![allow(dead_code)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::cli_support::Sandbox;

/// How long an interrupted command may take to exit after the signal.
pub const EXIT_BOUND: Duration = Duration::from_secs(15);

/// The signals a user (Ctrl-C) or a service manager (stop) sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGINT to pgkeep alone (`kill -INT`).
    Int,
    /// SIGTERM to pgkeep alone (a service manager's stop).
    Term,
    /// SIGINT to pgkeep's whole process group, its children too: Ctrl-C on a terminal.
    CtrlC,
}

/// Both, in the order the tests use them.
pub const SIGNALS: [Sig; 2] = [Sig::Int, Sig::Term];

impl Sig {
    fn name(self) -> &'static str {
        match self {
            Sig::Int | Sig::CtrlC => "INT",
            Sig::Term => "TERM",
        }
    }

    /// Sends this signal to the process `pid` (started by [`spawn`], so the leader of its own
    /// process group): to it alone, as a service manager's SIGTERM reaches pgkeep alone (and
    /// pgkeep must stop its children), or for [`Sig::CtrlC`] to its group.
    pub fn send(self, pid: u32) {
        let target = match self {
            Sig::CtrlC => format!("-{pid}"),
            _ => pid.to_string(),
        };
        let st = Command::new("kill")
            .args(["-s", self.name(), "--", &target])
            .status()
            .unwrap();
        assert!(st.success(), "kill -s {} {target}", self.name());
    }
}

/// A `pgkeep` started in the background, its output going to files in the sandbox.
pub struct Running {
    pub child: Child,
    pub what: String,
    out: PathBuf,
    err: PathBuf,
    pub started: Instant,
}

/// How an interrupted run ended.
pub struct Ended {
    pub status: ExitStatus,
    /// From the signal to the exit.
    pub after_signal: Duration,
    pub stdout: String,
    pub stderr: String,
}

impl Ended {
    /// Asserts exit 130 within [`EXIT_BOUND`] of the signal, and the word of it on stderr.
    pub fn expect_interrupted(self, what: &str) -> Self {
        assert_eq!(
            self.status.code(),
            Some(130),
            "{what}: exit status {:?} (signal {:?}), not 130\n--- stdout\n{}\n--- stderr\n{}",
            self.status.code(),
            self.status.signal(),
            self.stdout,
            self.stderr
        );
        assert!(
            self.after_signal < EXIT_BOUND,
            "{what}: exited {:?} after the signal",
            self.after_signal
        );
        assert!(
            self.stderr.contains("interrupted") || self.stderr.contains("terminated"),
            "{what}: stderr does not say why it stopped:\n{}",
            self.stderr
        );
        eprintln!(
            "{what}: exit 130 {:.2} s after the signal",
            self.after_signal.as_secs_f64()
        );
        self
    }
}

/// `pgkeep ARGS` in the background with the environment of [`Sandbox::run`] plus `envs`.
pub fn spawn(s: &Sandbox, args: &[&str], envs: &[(&str, &str)]) -> Running {
    spawn_with(s, args, envs, |_| {})
}

/// [`spawn`], with `adjust` applied to the command last (to run it as another user, say).
pub fn spawn_with(
    s: &Sandbox,
    args: &[&str],
    envs: &[(&str, &str)],
    adjust: impl FnOnce(&mut Command),
) -> Running {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let out = s.path().join(format!("bg-{n}.out"));
    let err = s.path().join(format!("bg-{n}.err"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgkeep"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
        .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
        .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
        .current_dir(s.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // Its own process group, which Sig::CtrlC signals as a terminal would.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    adjust(&mut cmd);
    Running {
        child: cmd.spawn().unwrap(),
        what: args.join(" "),
        out,
        err,
        started: Instant::now(),
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Where its stderr goes (progress lines are there), to read while it runs.
    pub fn stderr_path(&self) -> PathBuf {
        self.err.clone()
    }

    /// Waits until `ready()` holds while the command still runs; fails when it ends first or
    /// after `timeout`.
    pub fn wait_until(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "`pgkeep {}` ended ({st}) before {what}: it could not be interrupted at work\n{}",
                    self.what,
                    self.stderr()
                );
            }
            if ready() {
                eprintln!(
                    "`pgkeep {}`: {what} after {:.2} s",
                    self.what,
                    self.started.elapsed().as_secs_f64()
                );
                return;
            }
            if self.started.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "`pgkeep {}`: not {what} after {timeout:?}\n{}",
                    self.what,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `sig` and waits for the exit (SIGKILL and a failure after twice [`EXIT_BOUND`]).
    pub fn interrupt(mut self, sig: Sig) -> Ended {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "`pgkeep {}` ended before the signal",
            self.what
        );
        let t = Instant::now();
        sig.send(self.pid());
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > 2 * EXIT_BOUND {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "`pgkeep {}` still running {:?} after SIG{}; killed\n{}",
                    self.what,
                    t.elapsed(),
                    sig.name(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ended {
            status,
            after_signal: t.elapsed(),
            stdout: std::fs::read_to_string(&self.out).unwrap_or_default(),
            stderr: self.stderr(),
        }
    }
}

/// The objects under `locks/` of a local repository (none when it has no such directory).
pub fn lock_files(repo: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(repo.join("locks")) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that the repository's `locks/` directory is empty: the interrupted run released
/// its lock itself (a stale lock would be ignored by the next run on this host, so the
/// directory is the proof, not the next run).
pub fn assert_no_locks(repo: &Path, what: &str) {
    let left = lock_files(repo);
    assert!(
        left.is_empty(),
        "{what}: locks left in {}: {left:?}",
        repo.display()
    );
}

/// Processes whose command line (arguments joined by spaces) satisfies `matches`.
pub fn processes(matches: impl Fn(&str) -> bool) -> Vec<(u32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw)
            .split('\0')
            .filter(|a| !a.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        // Zombies have an empty command line; they are gone for our purpose.
        if !line.is_empty() && matches(&line) {
            v.push((pid, line));
        }
    }
    v
}

/// Polls `cond` every 20 ms for up to `timeout`; false when it never held.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live processes running `program` (the file name of their executable argument) whose
/// environment holds `env_entry` (`NAME=value`): a client tool pgkeep started for one
/// cluster (pgkeep gives its children the cluster's PGHOST), whatever else runs on the host.
pub fn tool_processes(program: &str, env_entry: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let Some(exe) = raw.split(|b| *b == 0).next() else {
            continue;
        };
        if !exe.ends_with(format!("/{program}").as_bytes()) && exe != program.as_bytes() {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == env_entry.as_bytes()) {
            v.push(pid);
        }
    }
    v
}

/// Whether a process with this id is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

/// Whether some process holds the flock on `file` (`flock -n`, util-linux).
pub fn flock_held(file: &Path) -> bool {
    let st = Command::new("flock")
        .args(["-n", "-E", "99"])
        .arg(file)
        .arg("true")
        .status()
        .unwrap();
    match st.code() {
        Some(0) => false,
        Some(99) => true,
        other => panic!("flock -n {}: {other:?}", file.display()),
    }
}

/// The uid and gid of a user (`id -u`, `id -g`).
pub fn user_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        assert!(out.status.success(), "id {flag} {user}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// Files under `dir` (recursively), not counting the local backend's temporary files.
pub fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}
