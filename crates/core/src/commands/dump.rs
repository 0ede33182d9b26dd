//! `pgkeep dump --db NAME | --all`: logical dumps streamed into the repository.
//!
//! Each database is dumped with `pg_dump --format=custom --compress=0` (compression is the
//! repository's, so that a day's dump deduplicates against yesterday's) and its stdout is
//! chunked straight into a [`BlobWriter`]: no dump file is ever written to local disk.
//! `--all` dumps, like pg_dumpall, every database that accepts connections (template1 and
//! user templates included, template0 never) and `pg_dumpall --globals-only` (roles,
//! tablespaces). Each database's own properties (owner, encoding, locale, privileges,
//! settings, comment: what pg_restore only restores with `--create`) are read from the
//! catalogs and stored beside its archive, so that `restore-dump` can apply them under any
//! target name.
//!
//! Per-table row counts are taken inside the very snapshot pg_dump dumps (exported with
//! `pg_export_snapshot()` and given to pg_dump with `--snapshot`), so a restore can be checked
//! against exact numbers even while the database is being written to. Tables larger than
//! [`DumpOptions::exact_count_max_bytes`] get the planner's estimate instead (`exact: false`).
//!
//! A dump exists if and only if its manifest (kind [`KIND_DUMP`]) exists: the manifest is
//! saved last, after the writer committed every blob, and only when every pg_dump exited 0.
//! A failed pg_dump (missing database, permission denied, server stopped mid-way) leaves no
//! manifest, and an error naming the database with pg_dump's own message.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgkeep_pg::archive::Rechunker;
use pgkeep_pg::dump::{DatabaseProperties, ToolChild};
use pgkeep_pg::tools::{ClientTools, ToolNeed};
use pgkeep_pg::{ConnParams, PgClient, PgError};
use pgkeep_repo::{BlobWriter, LockKind, Repository, StreamRef, WriterOptions};
use serde::{Deserialize, Serialize};

use crate::context::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{self, ManifestHeader};
use crate::progress::{human_bytes, Counter, Phase, Progress};

/// `kind` of a logical dump manifest.
pub const KIND_DUMP: &str = "dump";

/// Version of the dump manifest layout. Readers refuse newer versions.
pub const DUMP_FORMAT: u32 = 1;

/// Label of the safety dump `restore-dump` takes of a database before replacing it.
pub const SAFETY_LABEL: &str = "pre-restore";

/// Default size limit for exact row counts (bigger tables get the planner's estimate).
pub const DEFAULT_EXACT_COUNT_MAX_BYTES: u64 = 1 << 30;

/// Options of `dump`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// libpq conninfo laid over the PG* environment. Never stored; refused with a password.
    #[serde(skip_serializing)]
    pub conninfo: Option<String>,
    /// The database to dump (ignored with `all`).
    pub db: Option<String>,
    /// Every database plus the globals.
    pub all: bool,
    /// User label (`daily`, `weekly`, free text).
    pub label: Option<String>,
    /// Tables whose main fork is larger than this get an estimated row count.
    pub exact_count_max_bytes: u64,
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            cluster: "main".into(),
            conninfo: None,
            db: None,
            all: false,
            label: None,
            exact_count_max_bytes: DEFAULT_EXACT_COUNT_MAX_BYTES,
        }
    }
}

/// Row count of one table at dump time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRows {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Rows: exact `count(*)` in the dump's snapshot, or the planner's estimate
    /// (`reltuples / relpages` times the pages now; None when the table was never analyzed).
    pub rows: Option<i64>,
    /// Whether `rows` is an exact count (false: planner estimate of a table too big to count).
    pub exact: bool,
}

/// One database in a dump.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpedDatabase {
    /// Database name.
    pub name: String,
    /// `pg_database_size` at dump time.
    pub database_bytes: u64,
    /// Bytes of the pg_dump custom-format archive (the stream's size).
    pub dump_bytes: u64,
    /// The archive, exactly as pg_dump wrote it.
    pub stream: StreamRef,
    /// Seconds pg_dump ran.
    pub duration_secs: f64,
    /// Whether the row counts were taken in pg_dump's own snapshot (false when the server
    /// could not export one, e.g. a standby; then they may differ under concurrent writes).
    pub counts_in_dump_snapshot: bool,
    /// Per-table row counts (user tables; extension-owned tables excluded).
    pub tables: Vec<TableRows>,
    /// The database's own properties ([`DatabaseProperties`] as JSON): owner, encoding and
    /// locale, privileges, settings, comment. A stream, sealed like the archive, rather than
    /// manifest fields: setting values may be secrets. Absent in dumps of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<StreamRef>,
    /// What pg_dump printed on stderr although it succeeded (warnings), if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_dump_warnings: Option<String>,
}

/// Totals of one dump. `logical_bytes` and `new_bytes` are the names `list` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DumpTotals {
    /// Bytes of every archive (and the globals script).
    pub logical_bytes: u64,
    /// Sum of `pg_database_size` of the dumped databases.
    pub database_bytes: u64,
    /// Plaintext bytes new to the repository.
    pub new_bytes: u64,
    /// Bytes uploaded (compressed, sealed, with pack headers).
    pub stored_bytes: u64,
}

/// The manifest of a logical dump (`kind = "dump"`). Never holds a secret: no connection
/// string, no password; the globals script's role passwords are inside the (sealed) stream,
/// exactly as `pg_dumpall` wrote them, never in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpManifest {
    /// [`DUMP_FORMAT`].
    pub format: u32,
    /// [`KIND_DUMP`].
    pub kind: String,
    /// Dump id (same shape as backup ids, see [`manifest::ID_FORMAT`]).
    pub id: String,
    /// Cluster name in the repository.
    pub cluster: String,
    /// User label.
    pub label: Option<String>,
    /// Host that took the dump.
    pub host: String,
    /// pgkeep version that wrote this manifest.
    pub tool_version: String,
    /// `server_version` of the server, e.g. `15.18 (Debian 15.18-0+deb12u1)`.
    pub server_version: String,
    /// `server_version_num`.
    pub server_version_num: u32,
    /// Major version of the server.
    pub pg_major: u32,
    /// `pg_dump --version`, e.g. `pg_dump (PostgreSQL) 15.18`.
    pub pg_dump_version: String,
    /// The server's system identifier when readable (decimal text). Deliberately not the
    /// header's `system_identifier`: a dump may be taken of any server (a safety dump of a
    /// restore target, say), and must not take part in the physical backups' identity check.
    pub server_system_identifier: Option<String>,
    /// Whether this is a `--all` dump.
    pub all: bool,
    /// `pg_dumpall --globals-only` output (roles, tablespaces), with `all`.
    pub globals: Option<StreamRef>,
    /// The databases, in dump order.
    pub databases: Vec<DumpedDatabase>,
    /// When the dump started.
    pub start_time: DateTime<Utc>,
    /// When the last pg_dump ended.
    pub stop_time: DateTime<Utc>,
    /// Seconds from start to the manifest save.
    pub duration_secs: f64,
    /// Totals.
    pub totals: DumpTotals,
}

impl DumpManifest {
    /// Parses a manifest body, refusing other kinds and newer formats.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let header: ManifestHeader = serde_json::from_value(value.clone()).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("manifest does not parse: {e}"),
            )
        })?;
        if header.kind != KIND_DUMP {
            return Err(Error::usage_hint(
                format!(
                    "{} of cluster {} is a {} backup, not a logical dump",
                    header.id, header.cluster, header.kind
                ),
                "`pgkeep list` shows the kind of each backup; physical backups restore with `pgkeep restore`",
            ));
        }
        if header.format > DUMP_FORMAT {
            return Err(Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "dump {} has manifest format {}, this pgkeep reads up to {DUMP_FORMAT}",
                    header.id, header.format
                ),
                "upgrade pgkeep",
            ));
        }
        serde_json::from_value(value).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("manifest of dump {} does not parse: {e}", header.id),
            )
        })
    }

    /// The database `name` of this dump; with `None`, the only one (an error naming the
    /// choices when there are several).
    pub fn database(&self, name: Option<&str>) -> Result<&DumpedDatabase> {
        let names = || {
            self.databases
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            Some(n) => self.databases.iter().find(|d| d.name == n).ok_or_else(|| {
                Error::usage_hint(
                    format!("dump {} holds no database {n:?}", self.id),
                    format!("it holds: {}", names()),
                )
            }),
            None if self.databases.len() == 1 => Ok(&self.databases[0]),
            None => Err(Error::usage_hint(
                format!(
                    "dump {} holds {} databases ({})",
                    self.id,
                    self.databases.len(),
                    names()
                ),
                "choose one with --db NAME (or restore them all with --all)",
            )),
        }
    }
}

/// Loads the dump `id_or_latest` (`latest` = the newest dump of the cluster).
pub async fn load_dump(
    repo: &Repository,
    cluster: &str,
    id_or_latest: &str,
) -> Result<DumpManifest> {
    if id_or_latest == "latest" {
        let ids = manifest::list_ids(repo, cluster).await?;
        for id in ids.iter().rev() {
            let v = repo.load_manifest(cluster, id).await?;
            if v.get("kind").and_then(|k| k.as_str()) == Some(KIND_DUMP) {
                return DumpManifest::from_value(v);
            }
        }
        return Err(Error::with_hint(
            ErrorKind::Failure,
            format!("cluster {cluster} has no dump in this repository"),
            "take one with `pgkeep dump --db NAME`, or check --cluster",
        ));
    }
    let v = repo
        .load_manifest(cluster, id_or_latest)
        .await
        .map_err(|e| {
            if e.kind() == pgkeep_repo::ErrorKind::NotFound {
                Error::with_hint(
                    ErrorKind::Failure,
                    format!("dump {id_or_latest} of cluster {cluster} not found"),
                    "`pgkeep list` shows the backups and dumps",
                )
            } else {
                e.into()
            }
        })?;
    DumpManifest::from_value(v)
}

/// What `info` shows of a dump: the manifest without its stream references.
#[derive(Debug, Clone, Serialize)]
pub struct DumpDetails {
    /// Host that took it.
    pub host: String,
    /// pgkeep version.
    pub tool_version: String,
    /// `server_version`.
    pub server_version: String,
    /// `pg_dump --version`.
    pub pg_dump_version: String,
    /// Whether it is a `--all` dump (with the globals).
    pub all: bool,
    /// Seconds.
    pub duration_secs: f64,
    /// Totals.
    pub totals: DumpTotals,
    /// Per database: sizes and row counts.
    pub databases: Vec<DatabaseDetails>,
}

/// A database of [`DumpDetails`].
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseDetails {
    /// Name.
    pub name: String,
    /// `pg_database_size` at dump time.
    pub database_bytes: u64,
    /// Archive bytes.
    pub dump_bytes: u64,
    /// Whether counts were taken in pg_dump's snapshot.
    pub counts_in_dump_snapshot: bool,
    /// Row counts.
    pub tables: Vec<TableRows>,
}

impl DumpDetails {
    /// Details of a dump manifest body (`None` when it is not a readable dump).
    pub fn from_value(v: &serde_json::Value) -> Option<Self> {
        let m = DumpManifest::from_value(v.clone()).ok()?;
        Some(DumpDetails {
            host: m.host,
            tool_version: m.tool_version,
            server_version: m.server_version,
            pg_dump_version: m.pg_dump_version,
            all: m.all,
            duration_secs: m.duration_secs,
            totals: m.totals,
            databases: m
                .databases
                .into_iter()
                .map(|d| DatabaseDetails {
                    name: d.name,
                    database_bytes: d.database_bytes,
                    dump_bytes: d.dump_bytes,
                    counts_in_dump_snapshot: d.counts_in_dump_snapshot,
                    tables: d.tables,
                })
                .collect(),
        })
    }
}

impl fmt::Display for DumpDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "taken on    {} (pgkeep {}) with {}, server {}",
            self.host, self.tool_version, self.pg_dump_version, self.server_version
        )?;
        let t = &self.totals;
        writeln!(
            f,
            "size        {} of archives{} from {} of databases; {} new, {} stored; {:.1} s",
            human_bytes(t.logical_bytes),
            if self.all { " and globals" } else { "" },
            human_bytes(t.database_bytes),
            human_bytes(t.new_bytes),
            human_bytes(t.stored_bytes),
            self.duration_secs
        )?;
        for d in &self.databases {
            writeln!(
                f,
                "database    {} ({} archive, {} database, {} tables{})",
                d.name,
                human_bytes(d.dump_bytes),
                human_bytes(d.database_bytes),
                d.tables.len(),
                if d.counts_in_dump_snapshot {
                    ""
                } else {
                    ", counts outside the dump snapshot"
                }
            )?;
            for t in &d.tables {
                writeln!(
                    f,
                    "  {}.{}: {} rows{}",
                    t.schema,
                    t.table,
                    t.rows.map_or("?".to_string(), |n| n.to_string()),
                    if t.exact { "" } else { " (estimate)" }
                )?;
            }
        }
        Ok(())
    }
}

/// What `dump` did.
#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    /// The new dump's id.
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// Label.
    pub label: Option<String>,
    /// Per database: name, sizes, tables.
    pub databases: Vec<DumpedDatabaseSummary>,
    /// Whether the globals were dumped.
    pub globals: bool,
    /// Totals.
    pub totals: DumpTotals,
    /// Seconds.
    pub duration_secs: f64,
    /// The pg_dump that ran.
    pub pg_dump: ToolUsed,
    /// Warnings pg_dump printed.
    pub warnings: Vec<String>,
}

/// A client tool a command ran, as chosen for the server (see [`pgkeep_pg::tools`]).
#[derive(Debug, Clone, Serialize)]
pub struct ToolUsed {
    /// Its path.
    pub path: String,
    /// The first line of its `--version`.
    pub version: String,
    /// Its major version.
    pub major: u32,
}

impl ToolUsed {
    /// `program` of the chosen `tools`.
    pub fn of(tools: &ClientTools, program: &str) -> Self {
        ToolUsed {
            path: tools.display(program),
            version: tools.version.clone(),
            major: tools.major,
        }
    }
}

impl fmt::Display for ToolUsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.path, self.version)
    }
}

/// A database of a [`DumpReport`].
#[derive(Debug, Clone, Serialize)]
pub struct DumpedDatabaseSummary {
    /// Database name.
    pub name: String,
    /// `pg_database_size`.
    pub database_bytes: u64,
    /// Archive bytes.
    pub dump_bytes: u64,
    /// User tables.
    pub tables: usize,
    /// Seconds.
    pub duration_secs: f64,
}

impl fmt::Display for DumpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dump {} of cluster {} done in {:.1} s: {} database(s){}, {} of archives from {} of databases; {} new, {} stored",
            self.id,
            self.cluster,
            self.duration_secs,
            self.databases.len(),
            if self.globals { " and the globals" } else { "" },
            human_bytes(self.totals.logical_bytes),
            human_bytes(self.totals.database_bytes),
            human_bytes(self.totals.new_bytes),
            human_bytes(self.totals.stored_bytes),
        )?;
        for d in &self.databases {
            writeln!(
                f,
                "  {:<24} {:>10} archive from {:>10}, {} tables, {:.1} s",
                d.name,
                human_bytes(d.dump_bytes),
                human_bytes(d.database_bytes),
                d.tables,
                d.duration_secs
            )?;
        }
        writeln!(f, "  pg_dump: {}", self.pg_dump)?;
        for w in &self.warnings {
            writeln!(f, "WARNING: {w}")?;
        }
        Ok(())
    }
}

impl Report for DumpReport {
    fn has_warnings(&self) -> bool {
        !self.warnings.is_empty()
    }
}

/// A pgkeep-pg error as a core error.
pub(crate) fn pg_err(e: PgError) -> Error {
    let kind = match &e {
        // No suitable pg_dump/pg_restore is a matter of the host's setup (install the tools
        // or point PGKEEP_PG_BIN at them), found before anything ran: a retry as it is would
        // fail the same way, so it is not the "failure" of a run.
        PgError::Conninfo(_) | PgError::SslConfig { .. } | PgError::NoClientTools { .. } => {
            ErrorKind::Usage
        }
        // A release pgkeep does not handle is a cluster that does not fit (exit 15).
        PgError::UnsupportedVersion { .. } => ErrorKind::ClusterMismatch,
        _ => ErrorKind::Failure,
    };
    let text = e.to_string();
    match text.split_once(". HINT: ") {
        Some((message, hint)) if kind == ErrorKind::ClusterMismatch => {
            Error::with_hint(kind, message, hint)
        }
        _ => Error::new(kind, text),
    }
}

/// Refuses a conninfo holding a password (it would show in the process list).
pub(crate) fn refuse_password(conninfo: Option<&str>) -> Result<()> {
    if conninfo.is_some_and(pgkeep_pg::conninfo_has_password) {
        return Err(Error::usage_hint(
            "the connection string holds a password",
            "give it through PGPASSWORD or ~/.pgpass: command lines show in the process list",
        ));
    }
    Ok(())
}

/// Text of a tokio-postgres error: the server's message when there is one.
pub(crate) fn sql_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// A query failure on `target` as a core error.
pub(crate) fn sql_err(what: &str, target: &str, e: &tokio_postgres::Error) -> Error {
    Error::new(
        ErrorKind::Failure,
        format!("{what} failed on {target}: {}", sql_text(e)),
    )
}

/// `"schema"."table"` with identifier quoting.
pub(crate) fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

/// An SQL identifier in double quotes.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Chooses the client tools for a job (see [`pgkeep_pg::tools`]): `programs` from one
/// installation of at least `min_major`, the `preferred_major` when there is one.
pub(crate) async fn client_tools(
    programs: &'static [&'static str],
    min_major: u32,
    preferred_major: u32,
    purpose: String,
) -> Result<ClientTools> {
    let tools = tokio::task::spawn_blocking(move || {
        ClientTools::find(&ToolNeed {
            programs,
            min_major,
            preferred_major,
            purpose: &purpose,
        })
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Failure, format!("looking for pg_dump: {e}")))?
    .map_err(pg_err)?;
    tracing::info!(
        "using {} from {} for {programs:?}",
        tools.version,
        tools.bin_dir.display()
    );
    Ok(tools)
}

/// Bytes at the start of an archive stored as their own blob (see [`ingest_stdout`]).
const HEAD_BYTES: usize = 4096;

/// A reader that counts what passes through it.
struct Counted<R> {
    inner: R,
    counter: Arc<Counter>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.advance(n as u64, 0);
        Ok(n)
    }
}

/// Chunks the stdout of `child` into `writer` until EOF, on tokio's blocking pool, reporting
/// bytes to `progress`. The child is not waited for.
pub(crate) async fn ingest_stdout(
    writer: &BlobWriter,
    child: &mut ToolChild,
    progress: &dyn Progress,
    parent: Option<&StreamRef>,
) -> Result<StreamRef> {
    // The parent's head blob is left out: the rest of the archive lines up with the rest.
    let parent_rest = parent.and_then(|p| {
        let head = p.blobs.first()?;
        (head.len as usize == HEAD_BYTES).then(|| StreamRef {
            size: p.size - head.len as u64,
            blobs: p.blobs[1..].to_vec(),
        })
    });
    let stdout = child
        .take_stdout()
        .ok_or_else(|| Error::new(ErrorKind::Failure, "the child's stdout is not a pipe"))?;
    // A blocking file: the chunker is synchronous and runs on its own thread.
    let fd = stdout
        .into_owned_fd()
        .map_err(|e| Error::io("taking the pipe of pg_dump", e))?;
    let w = writer.clone();
    crate::progress::blocking_with_progress(progress, move |counter| {
        let mut r = Counted {
            inner: File::from(fd),
            counter,
        };
        // The archive's first bytes hold pg_dump's start time: stored as a blob of their own,
        // so the content-defined chunks of everything after them match yesterday's.
        let mut head = Vec::with_capacity(HEAD_BYTES);
        (&mut r)
            .take(HEAD_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| {
                pgkeep_repo::RepoError::Invalid(format!("reading the input failed: {e}"))
            })?;
        let mut stream = w.ingest_bytes(&head)?;
        if head.len() == HEAD_BYTES {
            let rest = w.ingest_reader_against(&mut r, parent_rest.as_ref())?;
            stream.size += rest.size;
            stream.blobs.extend(rest.blobs);
        }
        Ok::<_, pgkeep_repo::RepoError>(stream)
    })
    .await
    .map_err(Error::from)
}

/// A writer that counts what passes through it.
struct CountedWriter<W> {
    inner: W,
    counter: Arc<Counter>,
}

impl<W: Write> Write for CountedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.counter.advance(n as u64, 0);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads `stream` from the repository into `out` on tokio's blocking pool (the writes may
/// block, e.g. on a pipe to pg_restore), reporting bytes to `progress`; returns `out` so the
/// caller decides when it is closed.
pub(crate) async fn read_into<W: Write + Send + 'static>(
    repo: &Repository,
    stream: &StreamRef,
    out: W,
    progress: &dyn Progress,
) -> Result<W> {
    let (repo, stream) = (repo.clone(), stream.clone());
    let handle = tokio::runtime::Handle::current();
    crate::progress::blocking_with_progress(progress, move |counter| {
        let mut w = CountedWriter {
            inner: out,
            counter,
        };
        handle
            .block_on(repo.read_stream(&stream, &mut w))
            .map(|_| w.inner)
    })
    .await
    .map_err(Error::from)
}

/// Feeds `stream` into the stdin of `child` and closes it (end of input). The child is not
/// waited for: a write error (the child exited early) is returned for the caller to weigh
/// against the child's own verdict.
pub(crate) async fn feed_stdin(
    repo: &Repository,
    stream: &StreamRef,
    child: &mut ToolChild,
    progress: &dyn Progress,
) -> Result<()> {
    let file = read_into(repo, stream, stdin_file(child)?, progress).await?;
    drop(file);
    Ok(())
}

/// Like [`feed_stdin`], for a custom-format archive going to pg_restore: its data pieces are
/// merged on the way ([`Rechunker`]), which spares the server a CopyData message per row.
pub(crate) async fn feed_archive(
    repo: &Repository,
    stream: &StreamRef,
    child: &mut ToolChild,
    progress: &dyn Progress,
) -> Result<()> {
    let w = Rechunker::new(stdin_file(child)?);
    let w = read_into(repo, stream, w, progress).await?;
    w.finish()
        .map_err(|e| Error::io("writing the archive to pg_restore", e))?;
    Ok(())
}

fn stdin_file(child: &mut ToolChild) -> Result<File> {
    let stdin = child
        .take_stdin()
        .ok_or_else(|| Error::new(ErrorKind::Failure, "the child's stdin is not a pipe"))?;
    let fd = stdin
        .into_owned_fd()
        .map_err(|e| Error::io("taking the pipe to pg_restore", e))?;
    Ok(File::from(fd))
}

/// Waits for a dump tool and turns its failure into an error naming `what`.
pub(crate) async fn wait_tool(child: ToolChild, what: &str) -> Result<String> {
    child.wait().await.map_err(|e| match e {
        PgError::Tool {
            program,
            status,
            stderr,
        } => Error::with_hint(
            ErrorKind::Failure,
            format!("{program} of {what} failed ({status}): {stderr}"),
            "nothing was recorded for this run; fix the cause above and run it again",
        ),
        other => pg_err(other),
    })
}

/// Picks an id newer than `newest` (ids are seconds; wait for the next second on a tie).
pub(crate) async fn choose_id(newest: Option<&str>) -> Result<String> {
    for _ in 0..3 {
        let id = manifest::new_id(Utc::now());
        match newest {
            Some(n) if id.as_str() == n => {
                let ms = 1000 - Utc::now().timestamp_subsec_millis().min(999) as u64;
                tokio::time::sleep(Duration::from_millis(ms + 5)).await;
            }
            Some(n) if id.as_str() < n => {
                return Err(Error::with_hint(
                    ErrorKind::Failure,
                    format!("the new dump id {id} would not be newer than the newest existing backup {n}"),
                    "is there clock skew? check this host's clock against the host that took that backup",
                ));
            }
            _ => return Ok(id),
        }
    }
    Err(Error::new(
        ErrorKind::Failure,
        "could not choose a dump id newer than the newest one",
    ))
}

/// Takes a logical dump; see the module documentation.
pub async fn dump(
    repo: &Repository,
    opts: &DumpOptions,
    progress: &dyn Progress,
) -> Result<DumpReport> {
    refuse_password(opts.conninfo.as_deref())?;
    if !opts.all && opts.db.as_deref().is_none_or(str::is_empty) {
        return Err(Error::usage_hint(
            "no database to dump",
            "give --db NAME, or --all for every database and the globals",
        ));
    }
    let params = ConnParams::resolve(opts.conninfo.as_deref()).map_err(pg_err)?;
    let lock = repo.lock(LockKind::Shared, None, "dump").await?;
    // A prune may have run between opening the repository and taking the lock: the dump
    // must not deduplicate against (or delta-encode on) blobs it removed.
    let result = match repo.reload_index_if_changed().await {
        Err(e) => Err(e.into()),
        Ok(_) => dump_locked(repo, &params, opts, progress).await,
    };
    if let Err(e) = lock.release().await {
        tracing::warn!("could not release the repository lock: {e}");
    }
    let (m, tools) = result?;
    let mut warnings = Vec::new();
    for d in &m.databases {
        if let Some(w) = &d.pg_dump_warnings {
            warnings.push(format!("pg_dump of {}: {w}", d.name));
        }
    }
    Ok(DumpReport {
        id: m.id.clone(),
        cluster: m.cluster.clone(),
        label: m.label.clone(),
        databases: m
            .databases
            .iter()
            .map(|d| DumpedDatabaseSummary {
                name: d.name.clone(),
                database_bytes: d.database_bytes,
                dump_bytes: d.dump_bytes,
                tables: d.tables.len(),
                duration_secs: d.duration_secs,
            })
            .collect(),
        globals: m.globals.is_some(),
        totals: m.totals.clone(),
        duration_secs: m.duration_secs,
        pg_dump: ToolUsed::of(&tools, "pg_dump"),
        warnings,
    })
}

/// The dump itself, under a lock the caller holds (`restore-dump` calls it for the safety
/// dump). Returns the saved manifest and the tools that made it.
pub(crate) async fn dump_locked(
    repo: &Repository,
    params: &ConnParams,
    opts: &DumpOptions,
    progress: &dyn Progress,
) -> Result<(DumpManifest, ClientTools)> {
    let started = Instant::now();
    let start_time = Utc::now();
    // The first connection answers for the server; with --all it goes to the maintenance
    // database (the one of --pg / PGDATABASE), else straight to the database to dump so that
    // a missing database is named at once.
    let first_db = if opts.all {
        params.dbname.clone()
    } else {
        opts.db.clone().unwrap_or_default()
    };
    let client = connect_db(params, &first_db).await?;
    let version = client
        .inner()
        .query_one(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int4",
            &[],
        )
        .await
        .map_err(|e| sql_err("reading the server version", client.target(), &e))?;
    let server_version: String = version.get(0);
    let server_version_num = version.get::<_, i32>(1) as u32;
    // pg_control_system() needs pg_read_server_files-like rights on some setups: optional.
    let sysid = client
        .inner()
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get::<_, String>(0));
    let databases: Vec<String> = if opts.all {
        client
            .inner()
            .query(
                // Like pg_dumpall: every database that accepts connections, template1 and
                // user templates included (template0 is never changed; datconnlimit -2
                // marks a database left invalid by an interrupted DROP), template1 first.
                "SELECT datname FROM pg_database WHERE datallowconn AND datname <> 'template0' AND datconnlimit <> -2 ORDER BY datname <> 'template1', datname",
                &[],
            )
            .await
            .map_err(|e| sql_err("listing databases", client.target(), &e))?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        vec![first_db.clone()]
    };
    // pg_dump refuses servers newer than itself: the server's own major, else the newest.
    let major = server_version_num / 10000;
    let tools = client_tools(
        &["pg_dump", "pg_dumpall"],
        major,
        major,
        format!("the PostgreSQL {major} server at {}", client.target()),
    )
    .await?;
    drop(client);
    let pg_dump_version = tools.version.clone();

    let previous = previous_dumps(repo, &opts.cluster).await;
    let writer = repo.writer(WriterOptions::default());
    let result = async {
        let mut dumped = Vec::new();
        let globals = if opts.all {
            progress.note("pg_dumpall --globals-only");
            let mut child = pgkeep_pg::dump::pg_dumpall_globals(&tools, params).map_err(pg_err)?;
            let parent = previous.globals.as_ref();
            let stream = match ingest_stdout(&writer, &mut child, progress, parent).await {
                Ok(s) => s,
                Err(e) => {
                    child.kill().await;
                    return Err(e);
                }
            };
            wait_tool(child, "the globals").await?;
            Some(stream)
        } else {
            None
        };
        for db in &databases {
            let parent = previous.databases.get(db);
            dumped.push(
                dump_one(
                    &writer,
                    &tools,
                    params,
                    db,
                    server_version_num,
                    opts,
                    progress,
                    parent,
                )
                .await?,
            );
        }
        Ok::<_, Error>((globals, dumped))
    }
    .await;
    let (globals, dumped) = match result {
        Ok(v) => v,
        Err(e) => {
            // Flush what was stored (reused by the next run); no manifest: no dump.
            let _ = writer.finish().await;
            return Err(e);
        }
    };
    let stats = writer.finish().await?;
    let stop_time = Utc::now();

    let headers = manifest::load_headers(repo, &opts.cluster).await?;
    let newest = headers
        .iter()
        .map(|(h, _)| h.id.clone())
        .filter(|i| manifest::is_backup_id(i))
        .max();
    let id = choose_id(newest.as_deref()).await?;
    let totals = DumpTotals {
        logical_bytes: dumped.iter().map(|d| d.dump_bytes).sum::<u64>()
            + globals.as_ref().map_or(0, |g| g.size),
        database_bytes: dumped.iter().map(|d| d.database_bytes).sum(),
        new_bytes: stats.bytes_new,
        stored_bytes: stats.stored_bytes,
    };
    let m = DumpManifest {
        format: DUMP_FORMAT,
        kind: KIND_DUMP.into(),
        id: id.clone(),
        cluster: opts.cluster.clone(),
        label: opts.label.clone(),
        host: pgkeep_repo::lock::hostname(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        server_version,
        server_version_num,
        pg_major: server_version_num / 10000,
        pg_dump_version,
        server_system_identifier: sysid,
        all: opts.all,
        globals,
        databases: dumped,
        start_time,
        stop_time,
        duration_secs: started.elapsed().as_secs_f64(),
        totals,
    };
    repo.save_manifest(&opts.cluster, &id, &m).await?;
    Ok((m, tools))
}

/// Connects to database `db` of the server of `params`.
pub(crate) async fn connect_db(params: &ConnParams, db: &str) -> Result<PgClient> {
    PgClient::connect(&params.with_dbname(db))
        .await
        .map_err(|e| match e {
            PgError::Connect { target, reason } => Error::with_hint(
                ErrorKind::Failure,
                format!("cannot connect to database {db:?} ({target}): {reason}"),
                "check the database name (`psql -l` lists them), --pg / PGHOST, PGPORT, PGUSER and that the server is running",
            ),
            other => pg_err(other),
        })
}

/// User tables of the connected database with their main fork size and estimate. The
/// estimate is the planner's: the density of the last VACUUM/ANALYZE times the table's size
/// now, so that rows loaded since (autovacuum has not been by yet) are counted too; NULL for
/// a table never analyzed.
const TABLES_SQL: &str = "
SELECT n.nspname::text, c.relname::text, pg_relation_size(c.oid),
       CASE WHEN c.reltuples < 0 THEN NULL
            WHEN c.relpages > 0 THEN c.reltuples::float8 / c.relpages
                 * (pg_relation_size(c.oid) / current_setting('block_size')::float8)
            ELSE c.reltuples::float8 END,
       has_table_privilege(c.oid, 'SELECT')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence <> 't'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2";

/// Row counts of every user table through `client`, inside its open transaction (the
/// exported snapshot). Each count runs under a savepoint: a failing count must not abort the
/// transaction, or the snapshot pg_dump is importing would vanish with it. Tables that are too
/// big, unreadable for this role, or whose count failed get the planner's estimate.
async fn count_rows(
    client: &PgClient,
    max_exact_bytes: u64,
    in_transaction: bool,
) -> Result<Vec<TableRows>> {
    let rows = client
        .inner()
        .query(TABLES_SQL, &[])
        .await
        .map_err(|e| sql_err("listing tables", client.target(), &e))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let (schema, table): (String, String) = (r.get(0), r.get(1));
        let size: i64 = r.get(2);
        let estimate: Option<f64> = r.get(3);
        let readable: bool = r.get(4);
        let mut exact = None;
        if readable && size as u64 <= max_exact_bytes {
            let count = format!("SELECT count(*) FROM ONLY {}", qualified(&schema, &table));
            let sql = if in_transaction {
                format!("SAVEPOINT pgkeep_count; {count}; RELEASE SAVEPOINT pgkeep_count")
            } else {
                count
            };
            match client.inner().simple_query(&sql).await {
                Ok(msgs) => {
                    exact = msgs.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            row.get(0).and_then(|v| v.parse::<i64>().ok())
                        }
                        _ => None,
                    })
                }
                Err(e) => {
                    tracing::warn!(
                        "counting the rows of {schema}.{table} failed ({}); recording the estimate",
                        sql_text(&e)
                    );
                    if in_transaction {
                        let _ = client
                            .inner()
                            .batch_execute("ROLLBACK TO SAVEPOINT pgkeep_count")
                            .await;
                    }
                }
            }
        }
        out.push(TableRows {
            schema,
            table,
            rows: exact.or(estimate.map(|e| e.round() as i64)),
            exact: exact.is_some(),
        });
    }
    Ok(out)
}

/// Reads `db`'s properties through `client` and stores them as a stream of their own.
async fn store_properties(
    writer: &BlobWriter,
    client: &PgClient,
    db: &str,
    server_version_num: u32,
) -> Result<StreamRef> {
    let props = DatabaseProperties::read(client, db, server_version_num)
        .await
        .map_err(pg_err)?;
    let json = serde_json::to_vec(&props).expect("properties serialize");
    let w = writer.clone();
    tokio::task::spawn_blocking(move || w.ingest_bytes(&json))
        .await
        .map_err(|e| Error::new(ErrorKind::Failure, format!("storing task failed: {e}")))?
        .map_err(Error::from)
}

/// Reads the properties stored by [`store_properties`] (`None` for dumps without them).
pub(crate) async fn load_properties(
    repo: &Repository,
    d: &DumpedDatabase,
) -> Result<Option<DatabaseProperties>> {
    let Some(stream) = &d.properties else {
        return Ok(None);
    };
    let bytes = read_into(repo, stream, Vec::new(), &crate::progress::NoProgress).await?;
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!(
                "the stored properties of database {:?} do not parse: {e}",
                d.name
            ),
        )
    })
}

/// The archives of the newest earlier dumps of a cluster, per database: a new dump is
/// stored as deltas against them where its chunks changed.
#[derive(Default)]
struct PreviousDumps {
    databases: std::collections::HashMap<String, StreamRef>,
    globals: Option<StreamRef>,
}

/// How many earlier dumps are looked through for a database's previous archive.
const PREVIOUS_DUMPS_SEARCHED: usize = 8;

/// Finds [`PreviousDumps`]. A manifest that cannot be read is passed over: it only costs
/// the deltas.
async fn previous_dumps(repo: &Repository, cluster: &str) -> PreviousDumps {
    let mut out = PreviousDumps::default();
    let Ok(ids) = manifest::list_ids(repo, cluster).await else {
        return out;
    };
    let mut searched = 0;
    for id in ids.iter().rev() {
        let Ok(v) = repo.load_manifest(cluster, id).await else {
            continue;
        };
        if v.get("kind").and_then(|k| k.as_str()) != Some(KIND_DUMP) {
            continue;
        }
        let Ok(m) = DumpManifest::from_value(v) else {
            continue;
        };
        for d in m.databases {
            out.databases.entry(d.name).or_insert(d.stream);
        }
        if out.globals.is_none() {
            out.globals = m.globals;
        }
        searched += 1;
        if searched == PREVIOUS_DUMPS_SEARCHED {
            break;
        }
    }
    out
}

/// Dumps one database into `writer`, as deltas against `parent` (its previous archive)
/// where that pays.
#[allow(clippy::too_many_arguments)]
async fn dump_one(
    writer: &BlobWriter,
    tools: &ClientTools,
    params: &ConnParams,
    db: &str,
    server_version_num: u32,
    opts: &DumpOptions,
    progress: &dyn Progress,
    parent: Option<&StreamRef>,
) -> Result<DumpedDatabase> {
    let started = Instant::now();
    let client = connect_db(params, db).await?;
    let size: i64 = client
        .inner()
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await
        .map_err(|e| sql_err("reading the database size", client.target(), &e))?
        .get(0);
    // Outside the snapshot transaction below: a failing query there would abort it, and
    // with it the snapshot pg_dump imports.
    let properties = store_properties(writer, &client, db, server_version_num).await?;
    // Export a snapshot so the row counts are those of the dump itself.
    let snapshot = match client
        .inner()
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
    {
        Ok(()) => match client
            .inner()
            .query_one("SELECT pg_export_snapshot()", &[])
            .await
        {
            Ok(r) => Some(r.get::<_, String>(0)),
            Err(e) => {
                tracing::info!(
                    "no exported snapshot on {} ({}); counting rows separately",
                    client.target(),
                    sql_text(&e)
                );
                let _ = client.inner().batch_execute("ROLLBACK").await;
                None
            }
        },
        Err(e) => {
            return Err(sql_err(
                "starting the snapshot transaction",
                client.target(),
                &e,
            ))
        }
    };
    let snap_arg = snapshot.as_ref().map(|s| format!("--snapshot={s}"));
    let args: Vec<&str> = snap_arg.iter().map(String::as_str).collect();
    progress.note(&format!("pg_dump of {db}"));
    progress.begin(Phase::Backup, size.max(0) as u64, 1);
    let mut child = pgkeep_pg::dump::pg_dump(tools, params, db, &args).map_err(pg_err)?;
    // The archive streams in while the counts run in the same snapshot on our connection.
    let (ingest, counts) = tokio::join!(
        ingest_stdout(writer, &mut child, progress, parent),
        count_rows(&client, opts.exact_count_max_bytes, snapshot.is_some())
    );
    progress.end();
    let stream = match ingest {
        Ok(s) => s,
        Err(e) => {
            // The repository side failed: stop pg_dump rather than let it block on a full pipe.
            child.kill().await;
            return Err(e);
        }
    };
    // pg_dump's verdict first: its message says why (a counting error is then a symptom).
    let warnings = wait_tool(child, &format!("database {db:?}")).await?;
    let tables = counts?;
    if snapshot.is_some() {
        let _ = client.inner().batch_execute("COMMIT").await;
    }
    let warnings = warnings.trim();
    Ok(DumpedDatabase {
        name: db.to_string(),
        database_bytes: size.max(0) as u64,
        dump_bytes: stream.size,
        stream,
        duration_secs: started.elapsed().as_secs_f64(),
        counts_in_dump_snapshot: snapshot.is_some(),
        tables,
        properties: Some(properties),
        pg_dump_warnings: (!warnings.is_empty()).then(|| warnings.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(qualified("public", "a\"b"), "\"public\".\"a\"\"b\"");
    }

    #[test]
    fn other_kinds_and_newer_formats_are_refused() {
        let v = serde_json::json!({"format": 1, "kind": "physical", "id": "x", "cluster": "main"});
        let e = DumpManifest::from_value(v).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("pgkeep restore"), "{e}");
        let v = serde_json::json!({"format": 99, "kind": "dump", "id": "x", "cluster": "main"});
        let e = DumpManifest::from_value(v).unwrap_err();
        assert!(e.to_string().contains("upgrade pgkeep"), "{e}");
    }
}
