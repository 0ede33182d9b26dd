//! Runners for pg_dump, pg_dumpall and pg_restore as tokio child processes.
//!
//! Connection parameters reach the children through the libpq environment
//! ([`ConnParams::libpq_env`]), never through arguments, so a password does not show in the
//! process list. Each child's stderr is captured and becomes the error message on failure.

use crate::client::ConnParams;
use crate::error::{PgError, Result};
use std::process::Stdio;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// A running client tool.
#[derive(Debug)]
pub struct ToolChild {
    program: String,
    child: Child,
    stderr: tokio::task::JoinHandle<String>,
}

fn base_command(program: &str, params: &ConnParams) -> Command {
    let mut cmd = Command::new(program);
    // Settings from the caller's environment must not redirect the child elsewhere.
    for v in [
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGPASSWORD",
        "PGOPTIONS",
        "PGHOSTADDR",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(params.libpq_env());
    cmd.kill_on_drop(true);
    cmd
}

fn spawn(program: &str, mut cmd: Command, stdin: bool, stdout: bool) -> Result<ToolChild> {
    cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(if stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| PgError::Tool {
        program: program.to_string(),
        status: "not started".into(),
        stderr: format!("{e} (HINT: install the PostgreSQL client tools or put them on PATH)"),
    })?;
    let mut err = child.stderr.take().expect("piped stderr");
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s).await;
        s
    });
    Ok(ToolChild {
        program: program.to_string(),
        child,
        stderr,
    })
}

impl ToolChild {
    /// The child's stdout (for pg_dump / pg_dumpall); take it once.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's stdin (for pg_restore); take it once and drop it to signal end of input.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Wait for the child; an unsuccessful exit becomes [`PgError::Tool`] with its stderr.
    /// Returns the stderr text (warnings) on success.
    pub async fn wait(mut self) -> Result<String> {
        drop(self.child.stdin.take());
        let status = self.child.wait().await.map_err(|e| PgError::Tool {
            program: self.program.clone(),
            status: "wait failed".into(),
            stderr: e.to_string(),
        })?;
        let stderr = self.stderr.await.unwrap_or_default();
        if !status.success() {
            return Err(PgError::Tool {
                program: self.program,
                status: status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(stderr)
    }

    /// Kill the child (e.g. when the consumer of its output failed).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Start `pg_dump -Fc -Z0` of database `db`, writing the archive to stdout. Compression is off
/// so that day-to-day dumps deduplicate; the repository compresses.
pub fn pg_dump(params: &ConnParams, db: &str, extra_args: &[&str]) -> Result<ToolChild> {
    let mut cmd = base_command("pg_dump", params);
    cmd.env("PGDATABASE", db)
        .args(["--format=custom", "--compress=0", "--no-sync"])
        .args(extra_args);
    spawn("pg_dump", cmd, false, true)
}

/// Start `pg_dumpall --globals-only` (roles and tablespaces as SQL text) to stdout.
pub fn pg_dumpall_globals(params: &ConnParams) -> Result<ToolChild> {
    let mut cmd = base_command("pg_dumpall", params);
    cmd.args(["--globals-only", "--no-sync"]);
    spawn("pg_dumpall", cmd, false, true)
}

/// Start `pg_restore` reading a custom-format archive from stdin into database `db`
/// (`extra_args` e.g. `--clean`, `--create`, `--single-transaction`).
pub fn pg_restore(params: &ConnParams, db: &str, extra_args: &[&str]) -> Result<ToolChild> {
    let mut cmd = base_command("pg_restore", params);
    cmd.arg(format!("--dbname={db}"))
        .arg("--exit-on-error")
        .args(extra_args);
    spawn("pg_restore", cmd, true, false)
}

/// Start `pg_restore -f - ` turning a custom-format archive on stdin into SQL text on stdout
/// (no connection; for exporting a dump as plain SQL).
pub fn pg_restore_to_sql(extra_args: &[&str]) -> Result<ToolChild> {
    let mut cmd = Command::new("pg_restore");
    cmd.args(["--file=-"]).args(extra_args).kill_on_drop(true);
    spawn("pg_restore", cmd, true, true)
}
