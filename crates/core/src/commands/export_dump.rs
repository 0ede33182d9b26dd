//! `pgkeep export-dump <ID|latest> --output FILE [--format custom|plain]`: nothing is locked
//! in. `custom` writes the stored archive itself, byte for byte what pg_dump wrote, so any
//! `pg_restore` reads it; `plain` turns it into SQL through `pg_restore --file=-` (no
//! connection needed).
//!
//! The file is written under a temporary name next to the output (mode 0600, whatever the
//! umask), synced, then renamed over the output: a reader never sees a partial file, and a
//! failure leaves no file behind.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use pgkeep_repo::{LockKind, Repository};
use serde::{Deserialize, Serialize};

use crate::commands::dump::{
    client_tools, feed_stdin, load_dump, pg_err, read_into, wait_tool, ToolUsed,
};
use crate::context::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{human_bytes, NoProgress, Progress};

/// Output format of `export-dump`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// pg_dump's custom format, for `pg_restore`.
    #[default]
    Custom,
    /// Plain SQL, for `psql`.
    Plain,
}

/// Options of `export-dump`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportDumpOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// Dump id or `latest` (the newest dump).
    pub id: String,
    /// Which database of a `--all` dump (needed when it holds several).
    pub db: Option<String>,
    /// The file to write.
    pub output: PathBuf,
    /// Custom or plain.
    pub format: ExportFormat,
}

/// What `export-dump` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct ExportDumpReport {
    /// The dump.
    pub id: String,
    /// The database exported.
    pub database: String,
    /// The file written.
    pub output: PathBuf,
    /// Its format.
    pub format: ExportFormat,
    /// Bytes written.
    pub bytes: u64,
    /// The pg_restore that turned the archive into SQL (plain format only).
    pub pg_restore: Option<ToolUsed>,
    /// Seconds.
    pub duration_secs: f64,
}

impl fmt::Display for ExportDumpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "exported database {} of dump {} to {} ({}, {}) in {:.1} s",
            self.database,
            self.id,
            self.output.display(),
            match self.format {
                ExportFormat::Custom => "pg_dump custom format",
                ExportFormat::Plain => "plain SQL",
            },
            human_bytes(self.bytes),
            self.duration_secs
        )?;
        if let Some(t) = &self.pg_restore {
            writeln!(f, "  pg_restore: {t}")?;
        }
        Ok(())
    }
}

impl Report for ExportDumpReport {}

/// A file being written under a temporary name; removed on drop unless committed.
struct TempFile {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates a new file with mode 0600 (set explicitly: the umask could only narrow it, and
/// a surprising umask must not make it unreadable for its owner).
pub(crate) fn create_private(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e))?;
    Ok(f)
}

/// Exports a dump; see the module documentation.
pub async fn export_dump(
    repo: &Repository,
    opts: &ExportDumpOptions,
    progress: &dyn Progress,
) -> Result<ExportDumpReport> {
    let started = Instant::now();
    let lock = repo.lock(LockKind::Shared, None, "export-dump").await?;
    let result = export_locked(repo, opts, progress).await;
    if let Err(e) = lock.release().await {
        tracing::warn!("could not release the repository lock: {e}");
    }
    let (id, database, bytes, pg_restore) = result?;
    Ok(ExportDumpReport {
        id,
        database,
        output: opts.output.clone(),
        format: opts.format,
        bytes,
        pg_restore,
        duration_secs: started.elapsed().as_secs_f64(),
    })
}

async fn export_locked(
    repo: &Repository,
    opts: &ExportDumpOptions,
    progress: &dyn Progress,
) -> Result<(String, String, u64, Option<ToolUsed>)> {
    let m = load_dump(repo, &opts.cluster, &opts.id).await?;
    let db = m.database(opts.db.as_deref())?;
    let out = &opts.output;
    let name = out
        .file_name()
        .ok_or_else(|| Error::usage(format!("--output {} is not a file name", out.display())))?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if out.is_dir() {
        return Err(Error::usage_hint(
            format!("--output {} is a directory", out.display()),
            "give a file name",
        ));
    }
    let tmp_path = dir.join(format!(
        ".{}.pgkeep-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp_path);
    let mut tmp = TempFile {
        path: tmp_path.clone(),
        committed: false,
    };
    // A pg_restore older than the pg_dump that wrote the archive cannot read it.
    let tools = match opts.format {
        ExportFormat::Custom => None,
        ExportFormat::Plain => {
            let major = pgkeep_pg::tools::major_of(&m.pg_dump_version).unwrap_or(0);
            let purpose = format!("an archive of {}", m.pg_dump_version);
            Some(client_tools(&["pg_restore"], major, major, purpose).await?)
        }
    };
    let file = create_private(&tmp_path)?;
    let file = match &tools {
        None => read_into(repo, &db.stream, file, progress).await?,
        Some(tools) => {
            let mut child = pgkeep_pg::dump::pg_restore_to_sql(tools, &[]).map_err(pg_err)?;
            let stdout = child.take_stdout().ok_or_else(|| {
                Error::new(ErrorKind::Failure, "pg_restore's stdout is not a pipe")
            })?;
            let fd = stdout
                .into_owned_fd()
                .map_err(|e| Error::io("taking the pipe of pg_restore", e))?;
            let copy = tokio::task::spawn_blocking(move || {
                let mut file = file;
                let mut src = File::from(fd);
                std::io::copy(&mut src, &mut file).map(|_| file)
            });
            let fed = feed_stdin(repo, &db.stream, &mut child, &NoProgress).await;
            let copied = copy
                .await
                .map_err(|e| Error::new(ErrorKind::Failure, format!("copy task failed: {e}")))?;
            wait_tool(child, &format!("dump {} (database {})", m.id, db.name)).await?;
            fed?;
            copied.map_err(|e| Error::io(format!("writing {}", tmp_path.display()), e))?
        }
    };
    let bytes = finish_file(file, &tmp_path, out)?;
    tmp.committed = true;
    let used = tools.map(|t| ToolUsed::of(&t, "pg_restore"));
    Ok((m.id.clone(), db.name.clone(), bytes, used))
}

/// Syncs `file`, renames it from `tmp` to `out` and syncs the directory; returns its size.
fn finish_file(mut file: File, tmp: &Path, out: &Path) -> Result<u64> {
    file.flush()
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
    let bytes = file
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", tmp.display()), e))?
        .len();
    drop(file);
    std::fs::rename(tmp, out).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), out.display()),
            e,
        )
    })?;
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(bytes)
}
