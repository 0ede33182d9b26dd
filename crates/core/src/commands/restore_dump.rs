//! `pgkeep restore-dump <ID|latest> --target-db NAME`: a logical dump back into a database,
//! in a way that cannot destroy data by accident.
//!
//! Before anything is changed:
//! - a target that exists and holds objects is only restored over with `force`, or after
//!   the user typed its name on a terminal (`interactive`); otherwise the run is refused
//!   (exit 2) with a hint;
//! - a target with other sessions is refused (exit 1) unless `force`, which terminates them;
//! - such a target is first dumped into the repository as a safety dump labelled
//!   [`SAFETY_LABEL`] (unless `no_safety_dump`), and a failed safety dump stops the restore.
//!
//! A database this restore creates gets the dump's own properties, under whatever name it
//! is restored: encoding and locale at `CREATE DATABASE`, then owner, comment and privileges
//! before the contents, and last (so that none gets in the restore's way) the settings of
//! the database and of roles in it, the connection limit and the template flag. pg_restore
//! applies none of these without `--create`, and with it only under the archive's name.
//! With `all` the existing databases (a fresh cluster's `postgres`) get them too, except
//! encoding and locale, whose differences are warnings. What cannot be applied (a role
//! missing on the target) is a warning; a setting's value never appears in the report.
//!
//! The archive is piped from the repository into `pg_restore --single-transaction
//! --exit-on-error` (so a failing restore leaves the target as it was). `jobs > 1` needs a
//! seekable file: only then is the archive written to a temporary file (mode 0600, removed
//! afterwards), and the report says so. Either way the archive's data goes to pg_restore
//! with its row-sized pieces merged ([`pgkeep_pg::archive`]), so that the server's COPY gets
//! 64 KiB messages, not one per row. Afterwards the target's per-table row counts are
//! compared with those recorded at dump time (exact ones by `count(*)`, estimates after an
//! ANALYZE of those tables); differences are warnings (exit 3). `dry_run` prints the target, the objects (`pg_restore --list`), the size and the
//! checks it would run, and touches nothing (not even the repository's locks).

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use pgkeep_pg::archive::Rechunker;
use pgkeep_pg::dump::{DatabaseProperties, PropertyStatement};
use pgkeep_pg::tools::ClientTools;
use pgkeep_pg::{ConnParams, PgClient};
use pgkeep_repo::{LockKind, Repository};
use serde::{Deserialize, Serialize};

use crate::commands::dump::{
    self, connect_db, feed_archive, feed_stdin, load_dump, load_properties, pg_err, quote_ident,
    read_into, refuse_password, sql_err, sql_text, wait_tool, DumpManifest, DumpOptions,
    DumpedDatabase, ToolUsed, SAFETY_LABEL,
};
use crate::commands::export_dump::create_private;
use crate::context::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::{human_bytes, NoProgress, Progress};

/// Relative difference tolerated between an estimated row count and the restored table's
/// estimate (both come from sampling).
const ESTIMATE_TOLERANCE: f64 = 0.10;

/// Options of `restore-dump`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestoreDumpOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// Dump id or `latest` (the newest dump).
    pub id: String,
    /// libpq conninfo of the target server. Never stored; refused with a password.
    #[serde(skip_serializing)]
    pub conninfo: Option<String>,
    /// Database to restore into (not with `all`).
    pub target_db: Option<String>,
    /// Which database of a multi-database dump (default: its only one).
    pub source_db: Option<String>,
    /// Restore a `--all` dump whole: the globals (roles, tablespaces) and every database
    /// under its own name, creating those that do not exist.
    pub all: bool,
    /// Create the target database (from template0). With `clean`, an existing target is
    /// dropped and created again.
    pub create: bool,
    /// Drop the dump's objects in the target before recreating them.
    pub clean: bool,
    /// Parallel pg_restore jobs (more than 1 writes a temporary file).
    pub jobs: u32,
    /// Show what would be done, change nothing.
    pub dry_run: bool,
    /// Restore over a database holding objects without asking; terminate its sessions.
    pub force: bool,
    /// Skip the safety dump of a target that holds objects.
    pub no_safety_dump: bool,
    /// Leave ownership to the restoring role (pg_restore `--no-owner`), the database's own
    /// owner included.
    pub no_owner: bool,
    /// Restore no privileges (pg_restore `--no-acl`), the database's own included.
    pub no_acl: bool,
    /// Restore only the objects of these schemas (pg_restore `--schema`). Unlike
    /// pg_restore, a schema the target lacks is created from the dump (with its owner,
    /// comment and privileges) rather than failing the restore.
    pub schemas: Vec<String>,
    /// Leave out the objects of these schemas, and the schemas themselves.
    pub exclude_schemas: Vec<String>,
    /// Restore only these tables (their definition and data; pg_restore `--table`), of the
    /// selected schemas when `schemas` is given. Their schemas are created when missing.
    pub tables: Vec<String>,
    /// Whether the user may be asked on the terminal (the CLI sets it when stdin and stderr
    /// are terminals).
    #[serde(skip)]
    pub interactive: bool,
    /// Directory for the temporary file of a parallel restore (default: the system's).
    pub temp_dir: Option<PathBuf>,
}

/// A table whose row count after the restore differs from the dump's.
#[derive(Debug, Clone, Serialize)]
pub struct RowDifference {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Rows recorded at dump time.
    pub expected: Option<i64>,
    /// Rows found after the restore (None: the table is missing).
    pub found: Option<i64>,
    /// Whether both are exact counts (false: estimates compared within 10%).
    pub exact: bool,
}

/// One database of a restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredDatabase {
    /// Database name in the dump.
    pub source: String,
    /// Database restored into.
    pub target: String,
    /// Whether the target existed before.
    pub existed: bool,
    /// Objects (relations, functions, types) the target held before.
    pub objects_before: u64,
    /// Whether it was (or would be) created.
    pub created: bool,
    /// Whether it was (or would be) dropped first.
    pub dropped: bool,
    /// The database's own properties (owner, encoding, locale, privileges, settings,
    /// comment) that were (or would be) applied, in words; `None` when none are (a restore
    /// into an existing database without `--all`, or a dump that did not record them).
    pub properties: Option<String>,
    /// Why properties could not be applied, one line each (also among the warnings).
    pub property_warnings: Vec<String>,
    /// Id of the safety dump taken of it (or, on a dry run, `would be taken`).
    pub safety_dump: Option<String>,
    /// Other sessions found on it.
    pub sessions: u64,
    /// Sessions terminated (with force).
    pub sessions_terminated: u64,
    /// Archive bytes.
    pub dump_bytes: u64,
    /// `pg_database_size` at dump time.
    pub database_bytes: u64,
    /// Whether the archive went through a temporary file (parallel restore).
    pub temp_file: bool,
    /// pg_restore jobs.
    pub jobs: u32,
    /// Objects in the archive by type (`pg_restore --list`), on a dry run.
    pub objects: BTreeMap<String, u64>,
    /// The checks run (or that would run).
    pub checks: Vec<String>,
    /// Tables whose row count was compared.
    pub tables_checked: usize,
    /// Tables whose count differs.
    pub row_differences: Vec<RowDifference>,
    /// What pg_restore printed although it succeeded.
    pub pg_restore_warnings: Option<String>,
    /// Seconds.
    pub duration_secs: f64,
}

/// What `restore-dump` did (or would do).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreDumpReport {
    /// The dump restored.
    pub id: String,
    /// Cluster name in the repository.
    pub cluster: String,
    /// Its label.
    pub label: Option<String>,
    /// Whether nothing was changed.
    pub dry_run: bool,
    /// Whether the globals were (or would be) restored.
    pub globals: bool,
    /// Errors psql reported while running the globals script (other than roles that
    /// already exist).
    pub globals_errors: Vec<String>,
    /// The databases.
    pub databases: Vec<RestoredDatabase>,
    /// The pg_restore that ran (or would run); psql of the same directory runs the globals.
    pub pg_restore: Option<ToolUsed>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// Seconds.
    pub duration_secs: f64,
}

impl fmt::Display for RestoreDumpReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would restore"
        } else {
            "restored"
        };
        writeln!(
            f,
            "{}dump {} ({}) of cluster {}{}",
            if self.dry_run { "DRY RUN: " } else { "" },
            self.id,
            self.label.as_deref().unwrap_or("no label"),
            self.cluster,
            if self.dry_run {
                String::new()
            } else {
                format!(" in {:.1} s", self.duration_secs)
            }
        )?;
        if self.globals {
            writeln!(f, "  globals (roles, tablespaces): {verb}")?;
        }
        for d in &self.databases {
            writeln!(
                f,
                "  {verb} {} -> {} ({} archive of a {} database){}{}{}",
                d.source,
                d.target,
                human_bytes(d.dump_bytes),
                human_bytes(d.database_bytes),
                if d.created { ", created" } else { "" },
                if d.dropped { ", dropped first" } else { "" },
                if d.jobs > 1 {
                    format!(", {} jobs through a temporary file", d.jobs)
                } else {
                    String::new()
                }
            )?;
            if d.existed {
                writeln!(
                    f,
                    "    target existed with {} objects, {} other sessions{}",
                    d.objects_before,
                    d.sessions,
                    if d.sessions_terminated > 0 {
                        format!(" ({} terminated)", d.sessions_terminated)
                    } else {
                        String::new()
                    }
                )?;
            }
            if let Some(s) = &d.safety_dump {
                writeln!(f, "    safety dump: {s} (label {SAFETY_LABEL})")?;
            }
            if let Some(pr) = &d.properties {
                writeln!(f, "    database properties: {pr}")?;
            }
            if !d.objects.is_empty() {
                let list: Vec<String> = d.objects.iter().map(|(k, v)| format!("{v} {k}")).collect();
                writeln!(f, "    objects: {}", list.join(", "))?;
            }
            for c in &d.checks {
                writeln!(f, "    check: {c}")?;
            }
            if !self.dry_run {
                writeln!(
                    f,
                    "    row counts: {} tables compared, {} differ",
                    d.tables_checked,
                    d.row_differences.len()
                )?;
            }
        }
        if let Some(t) = &self.pg_restore {
            writeln!(f, "  pg_restore: {t}")?;
        }
        for w in &self.warnings {
            writeln!(f, "WARNING: {w}")?;
        }
        Ok(())
    }
}

impl Report for RestoreDumpReport {
    fn has_warnings(&self) -> bool {
        !self.warnings.is_empty()
    }
}

/// Restores a dump; see the module documentation.
pub async fn restore_dump(
    repo: &Repository,
    opts: &RestoreDumpOptions,
    progress: &dyn Progress,
) -> Result<RestoreDumpReport> {
    refuse_password(opts.conninfo.as_deref())?;
    if opts.all && opts.target_db.is_some() {
        return Err(Error::usage_hint(
            "--all restores every database under its own name; --target-db does not apply",
            "restore one database with --db NAME --target-db NAME",
        ));
    }
    if !opts.all && opts.target_db.as_deref().is_none_or(str::is_empty) {
        return Err(Error::usage_hint(
            "no target database",
            "give --target-db NAME (with --create when it does not exist yet)",
        ));
    }
    let params = ConnParams::resolve(opts.conninfo.as_deref()).map_err(pg_err)?;
    let started = Instant::now();
    let lock = if opts.dry_run {
        None
    } else {
        Some(repo.lock(LockKind::Shared, None, "restore-dump").await?)
    };
    let result = run(repo, &params, opts, progress, started).await;
    if let Some(lock) = lock {
        if let Err(e) = lock.release().await {
            tracing::warn!("could not release the repository lock: {e}");
        }
    }
    result
}

async fn run(
    repo: &Repository,
    params: &ConnParams,
    opts: &RestoreDumpOptions,
    progress: &dyn Progress,
    started: Instant,
) -> Result<RestoreDumpReport> {
    let m = load_dump(repo, &opts.cluster, &opts.id).await?;
    let sources: Vec<&DumpedDatabase> = if opts.all {
        if !m.all {
            return Err(Error::usage_hint(
                format!("dump {} is of one database, not a --all dump", m.id),
                "restore it with --target-db NAME",
            ));
        }
        m.databases.iter().collect()
    } else {
        vec![m.database(opts.source_db.as_deref())?]
    };
    let mut report = RestoreDumpReport {
        id: m.id.clone(),
        cluster: m.cluster.clone(),
        label: m.label.clone(),
        dry_run: opts.dry_run,
        globals: opts.all && m.globals.is_some(),
        globals_errors: Vec::new(),
        databases: Vec::new(),
        pg_restore: None,
        warnings: Vec::new(),
        duration_secs: 0.0,
    };
    progress.note(&format!(
        "restoring dump {} ({})",
        m.id,
        m.label.as_deref().unwrap_or("no label")
    ));

    // Plan every database before changing anything, so a refusal leaves everything as it was.
    let mut plans = Vec::new();
    for src in &sources {
        let target = if opts.all {
            src.name.clone()
        } else {
            opts.target_db.clone().unwrap_or_default()
        };
        let props = load_properties(repo, src).await?;
        plans.push(plan(params, src, props, &target, opts).await?);
    }
    let tools = restore_tools(&m, plans.first().map(|p| p.target_version)).await?;
    report.pg_restore = Some(ToolUsed::of(&tools, "pg_restore"));
    if opts.dry_run {
        for (src, p) in sources.iter().zip(plans) {
            report
                .databases
                .push(dry_run(repo, &tools, params, src, p, opts).await?);
        }
        report.duration_secs = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    for p in &plans {
        confirm(p, opts).await?;
    }
    if opts.all {
        if let Some(g) = &m.globals {
            progress.note("restoring the globals (roles, tablespaces)");
            report.globals_errors = restore_globals(repo, &tools, params, g).await?;
            for e in &report.globals_errors {
                report.warnings.push(format!("globals: {e}"));
            }
        }
    }
    for (src, p) in sources.iter().zip(plans) {
        let d = restore_one(repo, &tools, params, &m, src, p, opts, progress).await?;
        for diff in &d.row_differences {
            report.warnings.push(format!(
                "{}: table {}.{} has {} rows, the dump recorded {}{}",
                d.target,
                diff.schema,
                diff.table,
                diff.found
                    .map_or("no table, so no".to_string(), |n| n.to_string()),
                diff.expected.map_or("?".to_string(), |n| n.to_string()),
                if diff.exact { "" } else { " (estimates)" }
            ));
        }
        if let Some(w) = &d.pg_restore_warnings {
            report
                .warnings
                .push(format!("pg_restore into {}: {w}", d.target));
        }
        report.warnings.extend(d.property_warnings.iter().cloned());
        report.databases.push(d);
    }
    report.duration_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The pg_restore (and psql) for restoring `m` into a server of `target_version`
/// (`server_version_num`; `None` when nothing is planned): the server's own major, else the
/// newest, and never older than the pg_dump that wrote the archive (an older pg_restore
/// cannot read a newer archive).
async fn restore_tools(m: &DumpManifest, target_version: Option<u32>) -> Result<ClientTools> {
    let archive_major = pgkeep_pg::tools::major_of(&m.pg_dump_version).unwrap_or(0);
    let server_major = target_version.map_or(archive_major, |v| v / 10000);
    let purpose = match target_version {
        Some(_) => format!(
            "the PostgreSQL {server_major} server with an archive of {}",
            m.pg_dump_version
        ),
        None => format!("an archive of {}", m.pg_dump_version),
    };
    dump::client_tools(
        &["pg_restore", "psql"],
        server_major.max(archive_major),
        server_major,
        purpose,
    )
    .await
}

/// What is known about one target before anything changes.
struct Plan {
    target: String,
    maintenance_db: String,
    existed: bool,
    objects_before: u64,
    sessions: Vec<(i32, String)>,
    create: bool,
    drop: bool,
    /// `server_version_num` of the target server.
    target_version: u32,
    /// The dump's properties of this database (None: an older dump without them).
    props: Option<DatabaseProperties>,
    /// Whether they are applied: to a database this restore creates, and with `--all` to
    /// the existing ones too (a cluster restored whole, e.g. a fresh cluster's `postgres`).
    apply_props: bool,
    /// The dump's tablespace, when the target server has none of that name.
    missing_tablespace: Option<String>,
    /// How an existing target's encoding or locale differs from the dump's (they cannot be
    /// changed on an existing database).
    locale_differences: Vec<String>,
}

impl Plan {
    /// Whether restoring touches a database that holds something (confirmation, safety dump).
    fn over_existing(&self) -> bool {
        self.existed && self.objects_before > 0
    }
}

/// Objects of the connected database outside the system schemas.
const OBJECTS_SQL: &str = "
SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%')
     + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))
     + (SELECT count(*) FROM pg_namespace n
         WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'public')
           AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%')";

async fn plan(
    params: &ConnParams,
    src: &DumpedDatabase,
    props: Option<DatabaseProperties>,
    target: &str,
    opts: &RestoreDumpOptions,
) -> Result<Plan> {
    // Work on the target from another database: it may have to be dropped.
    let maintenance_db = if target == "postgres" {
        "template1"
    } else {
        "postgres"
    };
    let admin = connect_db(params, maintenance_db).await?;
    let existed = admin
        .inner()
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&target])
        .await
        .map_err(|e| sql_err("looking the target database up", admin.target(), &e))?
        .is_some();
    let (mut objects_before, mut sessions) = (0u64, Vec::new());
    if existed {
        let t = connect_db(params, target).await?;
        objects_before = t
            .inner()
            .query_one(OBJECTS_SQL, &[])
            .await
            .map_err(|e| sql_err("counting the objects of the target", t.target(), &e))?
            .get::<_, i64>(0) as u64;
        drop(t);
        sessions = other_sessions(&admin, params, target).await?;
    }
    let (create, drop) = match (existed, opts.create || opts.all, opts.clean) {
        (false, true, _) => (true, false),
        (false, false, _) => {
            return Err(Error::usage_hint(
                format!("the target database {target:?} does not exist"),
                "add --create to create it",
            ))
        }
        // --all restores into existing (e.g. a fresh cluster's empty `postgres`) databases.
        (true, _, _) if opts.all => (false, false),
        (true, true, true) => (true, true),
        (true, true, false) => return Err(Error::usage_hint(
            format!("the target database {target:?} already exists"),
            "leave out --create to restore into it, or add --clean as well to drop and recreate it",
        )),
        (true, false, _) => (false, false),
    };
    tracing::debug!(
        "restore plan for {} -> {target}: existed {existed}, {objects_before} objects",
        src.name
    );
    let target_version = admin
        .inner()
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .map_err(|e| sql_err("reading the server version", admin.target(), &e))?
        .get::<_, i32>(0) as u32;
    let apply_props = props.is_some() && (create || opts.all);
    let mut missing_tablespace = None;
    let mut locale_differences = Vec::new();
    if let (true, Some(pr)) = (apply_props, &props) {
        if let (true, Some(ts)) = (create, &pr.tablespace) {
            let found = admin
                .inner()
                .query_opt("SELECT 1 FROM pg_tablespace WHERE spcname = $1", &[ts])
                .await
                .map_err(|e| sql_err("looking the tablespace up", admin.target(), &e))?;
            if found.is_none() {
                missing_tablespace = Some(ts.clone());
            }
        }
        if !create {
            let now = DatabaseProperties::read(&admin, target, target_version)
                .await
                .map_err(pg_err)?;
            locale_differences = pr.locale_differences(&now);
        }
    }
    Ok(Plan {
        target: target.to_string(),
        maintenance_db: maintenance_db.to_string(),
        existed,
        objects_before,
        sessions,
        create,
        drop,
        target_version,
        props,
        apply_props,
        missing_tablespace,
        locale_differences,
    })
}

/// Other client sessions connected to `db` (pid, application name). Autovacuum workers do
/// not count: they give way to the restore's locks, and DROP DATABASE stops them.
///
/// Our own connections to the target (the object count just before, a safety dump's
/// pg_dump) end asynchronously on the server: a session under one of our application names
/// is given up to [`OWN_SESSION_GRACE`] to go before it counts.
async fn other_sessions(
    admin: &PgClient,
    params: &ConnParams,
    db: &str,
) -> Result<Vec<(i32, String)>> {
    let ours = [
        params.application_name.as_deref().unwrap_or("pgkeep"),
        "pg_dump",
    ];
    let deadline = Instant::now() + OWN_SESSION_GRACE;
    loop {
        let sessions: Vec<(i32, String)> = admin
            .inner()
            .query(
                "SELECT pid, coalesce(nullif(application_name, ''), usename::text, '?') FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                &[&db],
            )
            .await
            .map_err(|e| sql_err("listing sessions", admin.target(), &e))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if Instant::now() >= deadline || !sessions.iter().any(|(_, a)| ours.contains(&a.as_str())) {
            return Ok(sessions);
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// How long a session that may be one of ours that is closing is waited for.
const OWN_SESSION_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Asks (or refuses) before touching a database that holds objects, and refuses a target in
/// use without force.
async fn confirm(p: &Plan, opts: &RestoreDumpOptions) -> Result<()> {
    if !p.over_existing() || opts.force {
        return Ok(());
    }
    if !p.sessions.is_empty() {
        let apps: Vec<&str> = p.sessions.iter().map(|(_, a)| a.as_str()).collect();
        return Err(Error::with_hint(
            ErrorKind::Failure,
            format!(
                "the target database {:?} is in use by {} other session(s) ({})",
                p.target,
                p.sessions.len(),
                apps.join(", ")
            ),
            "stop the applications using it, or add --force to terminate their sessions",
        ));
    }
    if !opts.interactive {
        return Err(Error::usage_hint(
            format!(
                "the target database {:?} already holds {} objects; restoring over it needs a confirmation",
                p.target, p.objects_before
            ),
            "run on a terminal to confirm, add --force (a safety dump is still taken unless --no-safety-dump), or restore into a new database with --create",
        ));
    }
    let target = p.target.clone();
    let objects = p.objects_before;
    let safety = !opts.no_safety_dump;
    let answer = tokio::task::spawn_blocking(move || {
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "The database {target:?} holds {objects} objects; the restore will change it{}.\nType its name to go on: ",
            if safety { " (a safety dump is taken first)" } else { " and NO safety dump is taken" }
        );
        let _ = err.flush();
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        line.trim() == target
    })
    .await
    .unwrap_or(false);
    if answer {
        Ok(())
    } else {
        Err(Error::usage_hint(
            format!(
                "restore into {:?} not confirmed; nothing was changed",
                p.target
            ),
            "type the database name exactly, or use --force",
        ))
    }
}

/// The archive's table of contents, `pg_restore --list` with `args` (e.g. a selection).
async fn toc_list(
    repo: &Repository,
    tools: &ClientTools,
    src: &DumpedDatabase,
    args: &[String],
) -> Result<String> {
    let mut all = vec!["--list".to_string()];
    all.extend(args.iter().cloned());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut child = pgkeep_pg::dump::pg_restore_to_sql(tools, &refs).map_err(pg_err)?;
    let stdout = child
        .take_stdout()
        .ok_or_else(|| Error::new(ErrorKind::Failure, "pg_restore's stdout is not a pipe"))?;
    let fd = stdout
        .into_owned_fd()
        .map_err(|e| Error::io("taking the pipe of pg_restore", e))?;
    let reader = tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s);
        s
    });
    // pg_restore stops reading after the table of contents: a broken pipe here is expected.
    let _ = feed_stdin(repo, &src.stream, &mut child, &NoProgress).await;
    let text = reader.await.unwrap_or_default();
    wait_tool(child, &format!("listing database {}", src.name)).await?;
    Ok(text)
}

/// Object types of a `pg_restore --list` text, counted.
fn count_objects(list: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in list.lines() {
        if line.starts_with(';') || line.trim().is_empty() {
            continue;
        }
        // `<dump id>; <catalog oid> <oid> <TYPE WORDS> <schema> <name> <owner>`
        let Some((_, rest)) = line.split_once("; ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().skip(2).collect();
        let kind: Vec<&str> = words
            .iter()
            .take_while(|w| w.chars().all(|c| c.is_ascii_uppercase()))
            .copied()
            .collect();
        if !kind.is_empty() {
            *out.entry(kind.join(" ")).or_insert(0) += 1;
        }
    }
    out
}

/// Whether a selection (`--schema`, `--exclude-schema`, `--table`) narrows the restore.
fn selective(opts: &RestoreDumpOptions) -> bool {
    !opts.schemas.is_empty() || !opts.exclude_schemas.is_empty() || !opts.tables.is_empty()
}

/// pg_restore's own selection arguments.
fn selection_args(opts: &RestoreDumpOptions) -> Vec<String> {
    let mut a = Vec::new();
    a.extend(opts.schemas.iter().map(|s| format!("--schema={s}")));
    a.extend(
        opts.exclude_schemas
            .iter()
            .map(|s| format!("--exclude-schema={s}")),
    );
    a.extend(opts.tables.iter().map(|t| format!("--table={t}")));
    a
}

/// Whether the restore brings table `schema.table` (pg_restore's rules: every condition
/// given must hold).
fn table_selected(opts: &RestoreDumpOptions, schema: &str, table: &str) -> bool {
    (opts.schemas.is_empty() || opts.schemas.iter().any(|s| s == schema))
        && !opts.exclude_schemas.iter().any(|s| s == schema)
        && (opts.tables.is_empty() || opts.tables.iter().any(|t| t == table))
}

/// The schemas a selective restore needs that the target lacks: the chosen ones, and those
/// of the chosen tables.
fn schemas_to_create(
    opts: &RestoreDumpOptions,
    src: &DumpedDatabase,
    existing: &[String],
) -> Vec<String> {
    let mut want: Vec<String> = opts.schemas.clone();
    if !opts.tables.is_empty() {
        for t in &src.tables {
            if table_selected(opts, &t.schema, &t.table) && !want.contains(&t.schema) {
                want.push(t.schema.clone());
            }
        }
    }
    want.retain(|s| !existing.contains(s) && !opts.exclude_schemas.contains(s));
    want
}

/// The pg_restore use-list (`--use-list`) of a selective restore: the entries pg_restore's
/// own selection picks, plus the SCHEMA entries (and their comments and privileges) of
/// `create_schemas`, which `pg_restore --schema` leaves out so that a restore into a
/// database without them fails. Lines are copied from pg_restore's own list, in its order,
/// so nothing is parsed but the entry type.
async fn use_list(
    repo: &Repository,
    tools: &ClientTools,
    src: &DumpedDatabase,
    opts: &RestoreDumpOptions,
    create_schemas: &[String],
) -> Result<String> {
    let full = toc_list(repo, tools, src, &[]).await?;
    let chosen = toc_list(repo, tools, src, &selection_args(opts)).await?;
    let chosen: std::collections::HashSet<&str> = chosen
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .collect();
    let mut out = String::new();
    for line in full.lines() {
        let wanted =
            chosen.contains(line) || create_schemas.iter().any(|s| is_schema_entry(line, s));
        // pg_restore --exclude-schema still creates the (empty) schema itself.
        let excluded = opts
            .exclude_schemas
            .iter()
            .any(|s| is_schema_entry(line, s));
        if wanted && !excluded {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Whether a `pg_restore --list` line is the SCHEMA entry of `schema`, or its comment or
/// privileges: after `<dump id>; <catalog oid> <oid> ` come `SCHEMA - name owner`,
/// `COMMENT - SCHEMA name owner`, `ACL - SCHEMA name owner`.
fn is_schema_entry(line: &str, schema: &str) -> bool {
    let Some((_, rest)) = line.split_once("; ") else {
        return false;
    };
    let entry = rest.splitn(3, ' ').nth(2).unwrap_or("");
    [
        format!("SCHEMA - {schema} "),
        format!("COMMENT - SCHEMA {schema} "),
        format!("ACL - SCHEMA {schema} "),
    ]
    .iter()
    .any(|p| entry.starts_with(p.as_str()))
}

/// Schemas of the connected database.
async fn schema_names(client: &PgClient) -> Result<Vec<String>> {
    Ok(client
        .inner()
        .query("SELECT nspname::text FROM pg_namespace", &[])
        .await
        .map_err(|e| sql_err("listing schemas", client.target(), &e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

fn checks_for(p: &Plan, src: &DumpedDatabase, opts: &RestoreDumpOptions) -> Vec<String> {
    let mut c = Vec::new();
    if p.over_existing() {
        c.push(format!(
            "target {:?} holds {} objects: {}",
            p.target,
            p.objects_before,
            if opts.force {
                "going ahead (--force)"
            } else {
                "confirmation on a terminal, else refused"
            }
        ));
        if !p.sessions.is_empty() {
            c.push(format!(
                "{} other session(s) on the target: {}",
                p.sessions.len(),
                if opts.force {
                    "terminated (--force)"
                } else {
                    "refused"
                }
            ));
        }
        c.push(if opts.no_safety_dump {
            "no safety dump (--no-safety-dump)".to_string()
        } else {
            format!(
                "safety dump of {:?} labelled {SAFETY_LABEL} first",
                p.target
            )
        });
    }
    if p.drop {
        c.push(format!("drop database {:?}", p.target));
    }
    if p.create {
        c.push(match &p.props {
            Some(pr) => format!(
                "create database {:?} from template0 with encoding {}, {} locale {}{}",
                p.target,
                pr.encoding,
                pr.locale_provider,
                locale_words(pr),
                match (&pr.tablespace, &p.missing_tablespace) {
                    (_, Some(t)) => format!(
                        ", in the default tablespace (the target server has no tablespace {t:?})"
                    ),
                    (Some(t), None) => format!(", tablespace {t}"),
                    (None, None) => String::new(),
                }
            ),
            None => format!(
                "create database {:?} from template0 with the server's defaults (this dump did not record the database's properties)",
                p.target
            ),
        });
    }
    for d in &p.locale_differences {
        c.push(format!(
            "existing database {:?} keeps its {d}: encoding and locale cannot change on an existing database",
            p.target
        ));
    }
    if let (true, Some(pr)) = (p.apply_props, &p.props) {
        c.push(format!(
            "then apply the database's properties: {}",
            describe_properties(pr, opts)
        ));
    }
    c.push(if opts.jobs > 1 {
        format!(
            "pg_restore --jobs {} from a temporary file (mode 0600) of {}",
            opts.jobs,
            human_bytes(src.dump_bytes)
        )
    } else {
        "pg_restore --single-transaction from a pipe (no local file)".to_string()
    });
    if opts.clean {
        c.push("pg_restore --clean --if-exists".into());
    }
    if opts.no_owner {
        c.push("pg_restore --no-owner: objects owned by the restoring role".into());
    }
    if opts.no_acl {
        c.push("pg_restore --no-acl: no privileges restored".into());
    }
    if selective(opts) {
        let mut what = Vec::new();
        if !opts.schemas.is_empty() {
            what.push(format!("schemas {}", opts.schemas.join(", ")));
        }
        if !opts.tables.is_empty() {
            what.push(format!("tables {}", opts.tables.join(", ")));
        }
        if !opts.exclude_schemas.is_empty() {
            what.push(format!("not schemas {}", opts.exclude_schemas.join(", ")));
        }
        c.push(format!(
            "only {} (schemas the target lacks are created from the dump)",
            what.join("; ")
        ));
    }
    let tables: Vec<_> = src
        .tables
        .iter()
        .filter(|t| table_selected(opts, &t.schema, &t.table))
        .collect();
    let exact = tables.iter().filter(|t| t.exact).count();
    c.push(format!(
        "compare row counts of {} tables ({} exact by count(*), {} estimated after ANALYZE of those tables)",
        tables.len(),
        exact,
        tables.len() - exact
    ));
    c
}

fn summary(p: &Plan, src: &DumpedDatabase, opts: &RestoreDumpOptions) -> RestoredDatabase {
    RestoredDatabase {
        source: src.name.clone(),
        target: p.target.clone(),
        existed: p.existed,
        objects_before: p.objects_before,
        created: p.create,
        dropped: p.drop,
        properties: p
            .props
            .as_ref()
            .filter(|_| p.apply_props)
            .map(|pr| describe_properties(pr, opts)),
        property_warnings: Vec::new(),
        safety_dump: None,
        sessions: p.sessions.len() as u64,
        sessions_terminated: 0,
        dump_bytes: src.dump_bytes,
        database_bytes: src.database_bytes,
        temp_file: opts.jobs > 1,
        jobs: opts.jobs.max(1),
        objects: BTreeMap::new(),
        checks: checks_for(p, src, opts),
        tables_checked: 0,
        row_differences: Vec::new(),
        pg_restore_warnings: None,
        duration_secs: 0.0,
    }
}

async fn dry_run(
    repo: &Repository,
    tools: &ClientTools,
    params: &ConnParams,
    src: &DumpedDatabase,
    p: Plan,
    opts: &RestoreDumpOptions,
) -> Result<RestoredDatabase> {
    let mut d = summary(&p, src, opts);
    d.objects = if selective(opts) {
        let existing = if p.existed {
            schema_names(&connect_db(params, &p.target).await?).await?
        } else {
            vec!["public".to_string()]
        };
        let create = schemas_to_create(opts, src, &existing);
        count_objects(&use_list(repo, tools, src, opts, &create).await?)
    } else {
        count_objects(&toc_list(repo, tools, src, &[]).await?)
    };
    if p.over_existing() && !opts.no_safety_dump {
        d.safety_dump = Some("would be taken".into());
    }
    Ok(d)
}

async fn restore_globals(
    repo: &Repository,
    tools: &ClientTools,
    params: &ConnParams,
    globals: &pgkeep_repo::StreamRef,
) -> Result<Vec<String>> {
    // The script is psql input (roles, tablespaces). Like the usual `psql -f globals.sql`
    // it goes on after an error: in a fresh cluster the bootstrap role already exists.
    let mut cmd = tokio::process::Command::new(tools.path("psql"));
    for v in [
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGPASSWORD",
        "PGOPTIONS",
        "PGHOSTADDR",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(params.with_dbname("postgres").libpq_env())
        .args(["-X", "-q", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        Error::with_hint(
            ErrorKind::Failure,
            format!("cannot run psql: {e}"),
            "install the PostgreSQL client tools or put them on PATH",
        )
    })?;
    let stdin = child.stdin.take().expect("piped stdin");
    let fd = stdin
        .into_owned_fd()
        .map_err(|e| Error::io("taking the pipe to psql", e))?;
    let mut stderr = child.stderr.take().expect("piped stderr");
    let err_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut s).await;
        s
    });
    let fed = read_into(repo, globals, std::fs::File::from(fd), &NoProgress).await;
    drop(fed?);
    let status = child
        .wait()
        .await
        .map_err(|e| Error::io("waiting for psql", e))?;
    let stderr = err_task.await.unwrap_or_default();
    if !status.success() {
        return Err(Error::new(
            ErrorKind::Failure,
            format!(
                "psql running the globals script failed ({status}): {}",
                stderr.trim()
            ),
        ));
    }
    Ok(stderr
        .lines()
        .filter(|l| l.contains("ERROR:") && !l.contains("already exists"))
        .map(|l| l.trim().to_string())
        .collect())
}

#[allow(clippy::too_many_arguments)]
async fn restore_one(
    repo: &Repository,
    tools: &ClientTools,
    params: &ConnParams,
    m: &DumpManifest,
    src: &DumpedDatabase,
    p: Plan,
    opts: &RestoreDumpOptions,
    progress: &dyn Progress,
) -> Result<RestoredDatabase> {
    let started = Instant::now();
    let mut d = summary(&p, src, opts);
    // 1. Safety dump of what is about to change.
    if p.over_existing() && !opts.no_safety_dump {
        progress.note(&format!("safety dump of {:?}", p.target));
        let dopts = DumpOptions {
            cluster: opts.cluster.clone(),
            db: Some(p.target.clone()),
            label: Some(SAFETY_LABEL.into()),
            ..DumpOptions::default()
        };
        let safety = dump::dump_locked(repo, params, &dopts, progress)
            .await
            .map_err(|e| {
                Error::with_hint(
                    e.kind(),
                    format!(
                        "the safety dump of {:?} failed, so nothing was restored: {e}",
                        p.target
                    ),
                    "fix the cause, or restore without it with --no-safety-dump",
                )
            })?;
        d.safety_dump = Some(safety.0.id);
    }
    // 2. Sessions, drop, create.
    let admin = connect_rw(params, &p.maintenance_db).await?;
    if p.existed && (p.over_existing() || p.drop) {
        let now = other_sessions(&admin, params, &p.target).await?;
        if !now.is_empty() && !opts.force {
            return Err(Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "the target database {:?} is in use by {} other session(s)",
                    p.target,
                    now.len()
                ),
                "stop the applications using it, or add --force to terminate their sessions",
            ));
        }
        for (pid, _) in &now {
            let ok: bool = admin
                .inner()
                .query_one("SELECT pg_terminate_backend($1)", &[pid])
                .await
                .map_err(|e| sql_err("terminating a session", admin.target(), &e))?
                .get(0);
            if ok {
                d.sessions_terminated += 1;
            }
        }
    }
    let q = quote_ident(&p.target);
    // Set once this run created the target: until the contents are in, dropping it (an
    // error, or SIGINT/SIGTERM dropping this future) drops the database too.
    let mut created: Option<CreatedDatabase> = None;
    if p.drop {
        let sql = if opts.force {
            format!("DROP DATABASE {q} WITH (FORCE)")
        } else {
            format!("DROP DATABASE {q}")
        };
        admin.inner().batch_execute(&sql).await.map_err(|e| {
            sql_err(
                &format!("dropping database {:?}", p.target),
                admin.target(),
                &e,
            )
        })?;
    }
    if p.create {
        let sql = match &p.props {
            Some(pr) => pr
                .create_sql(&p.target, p.target_version, p.missing_tablespace.is_none())
                .map_err(|e| Error::new(ErrorKind::Failure, e.to_string()))?,
            None => format!("CREATE DATABASE {q} TEMPLATE template0"),
        };
        admin.inner().batch_execute(&sql).await.map_err(|e| {
            let what = format!("creating database {:?}", p.target);
            match &p.props {
                Some(pr) => Error::with_hint(
                    ErrorKind::Failure,
                    format!("{what} failed on {}: {}", admin.target(), sql_text(&e)),
                    format!(
                        "the dump's database has encoding {}, {} locale {}: the target server must offer that locale (`locale -a` on its machine), or create the database yourself and restore into it without --create",
                        pr.encoding,
                        pr.locale_provider,
                        locale_words(pr)
                    ),
                ),
                None => sql_err(&what, admin.target(), &e),
            }
        })?;
        created = Some(CreatedDatabase {
            params: params.clone(),
            maintenance_db: p.maintenance_db.clone(),
            name: p.target.clone(),
            kept: false,
        });
        if let Some(t) = &p.missing_tablespace {
            d.property_warnings.push(format!(
                "{}: created in the default tablespace: the target server has no tablespace {t:?}",
                p.target
            ));
        }
        if p.props.is_none() {
            d.property_warnings.push(format!(
                "{}: created with the server's defaults: dump {} did not record the database's owner, encoding, locale, privileges and settings (it was taken by an older pgkeep)",
                p.target, m.id
            ));
        }
    }
    for diff in &p.locale_differences {
        d.property_warnings.push(format!(
            "{}: the existing database keeps its {diff}",
            p.target
        ));
    }
    if let (true, Some(pr)) = (p.apply_props, &p.props) {
        let stmts = pr.early_statements(&p.target, opts.no_owner, opts.no_acl);
        apply_statements(&admin, &stmts, &mut d.property_warnings).await;
    }
    drop(admin);
    // 3. pg_restore.
    let what = format!("dump {} into database {:?}", m.id, p.target);
    let mut args: Vec<String> = vec!["--no-password".into()];
    if opts.clean && !p.create {
        args.push("--clean".into());
        args.push("--if-exists".into());
    }
    if opts.no_owner {
        args.push("--no-owner".into());
    }
    if opts.no_acl {
        args.push("--no-acl".into());
    }
    let dir = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut _list_guard = None;
    if selective(opts) {
        let existing = schema_names(&connect_db(params, &p.target).await?).await?;
        let create = schemas_to_create(opts, src, &existing);
        let list = use_list(repo, tools, src, opts, &create).await?;
        // Object names only, but still private: 0600, removed afterwards.
        let path = dir.join(format!(
            "pgkeep-restore-{}-{}.list",
            m.id,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        _list_guard = Some(RemoveOnDrop(path.clone()));
        let mut f = create_private(&path)?;
        f.write_all(list.as_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        drop(f);
        args.push(format!("--use-list={}", path.display()));
    }
    progress.note(&format!("pg_restore {} -> {}", src.name, p.target));
    let through_psql = needs_script(tools, p.target_version);
    let warnings = if opts.jobs > 1 && through_psql {
        return Err(Error::usage_hint(
            format!(
                "--jobs needs pg_restore to connect, and {} cannot restore into PostgreSQL {} (it sets transaction_timeout, which that server lacks)",
                tools.version,
                p.target_version / 10000
            ),
            "leave out --jobs, or install the client tools of the server's major version",
        ));
    } else if opts.jobs > 1 {
        let path = dir.join(format!(
            "pgkeep-restore-{}-{}.dump",
            m.id,
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let guard = RemoveOnDrop(path.clone());
        progress.note(&format!(
            "parallel restore needs a seekable file: writing {} to {} (mode 0600, removed afterwards)",
            human_bytes(src.dump_bytes),
            path.display()
        ));
        let file = Rechunker::new(create_private(&path)?);
        let (file, _) = read_into(repo, &src.stream, file, progress)
            .await?
            .finish()
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        file.sync_all().ok();
        drop(file);
        args.push(format!("--jobs={}", opts.jobs));
        args.push(path.display().to_string());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = pgkeep_pg::dump::pg_restore(tools, params, &p.target, &refs).map_err(pg_err)?;
        let w = wait_tool(child, &what).await;
        drop(guard);
        w?
    } else if through_psql {
        args.push("--single-transaction".into());
        restore_through_psql(repo, tools, params, &p.target, &args, src, progress, &what).await?
    } else {
        args.push("--single-transaction".into());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child =
            pgkeep_pg::dump::pg_restore(tools, params, &p.target, &refs).map_err(pg_err)?;
        let fed = feed_archive(repo, &src.stream, &mut child, progress).await;
        // pg_restore's verdict first: when it fails, our broken pipe is only the symptom.
        let w = wait_tool(child, &what).await?;
        fed?;
        w
    };
    // The contents are in: what follows (checks, late settings) no longer undoes it.
    if let Some(c) = created.take() {
        c.keep();
    }
    let warnings = warnings.trim();
    if !warnings.is_empty() {
        d.pg_restore_warnings = Some(warnings.to_string());
    }
    // 4. Compare row counts: exact ones with count(*); estimates with the planner's, after
    // an ANALYZE of just those tables. The others are left to autovacuum, which analyzes a
    // freshly loaded table within a minute: a whole-database ANALYZE here cost as much as
    // a tenth of the restore (bench/dump.sh).
    let t = connect_rw(params, &p.target).await?;
    for tr in src
        .tables
        .iter()
        .filter(|t| table_selected(opts, &t.schema, &t.table))
    {
        let name = dump::qualified(&tr.schema, &tr.table);
        let found: Option<i64> = if tr.exact {
            let sql = format!("SELECT count(*) FROM ONLY {name}");
            t.inner()
                .query_one(sql.as_str(), &[])
                .await
                .ok()
                .map(|r| r.get(0))
        } else {
            // A failure shows as a missing table below.
            let _ = t.inner().batch_execute(&format!("ANALYZE {name}")).await;
            t.inner()
                .query_opt(
                    "SELECT c.reltuples::float8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                    &[&tr.schema, &tr.table],
                )
                .await
                .map_err(|e| sql_err("reading table estimates", t.target(), &e))?
                .map(|r| r.get::<_, f64>(0).round() as i64)
        };
        d.tables_checked += 1;
        let differs = match (tr.rows, found) {
            (_, None) => true,
            (Some(e), Some(f)) if tr.exact => e != f,
            (Some(e), Some(f)) => {
                let (e, f) = (e as f64, f as f64);
                (e - f).abs() > ESTIMATE_TOLERANCE * e.max(f).max(1.0)
            }
            (None, Some(_)) => false,
        };
        if differs {
            d.row_differences.push(RowDifference {
                schema: tr.schema.clone(),
                table: tr.table.clone(),
                expected: tr.rows,
                found,
                exact: tr.exact,
            });
        }
    }
    drop(t);
    // 5. What could get in the restore's way last: settings, connection limit, template.
    if let (true, Some(pr)) = (p.apply_props, &p.props) {
        let admin = connect_rw(params, &p.maintenance_db).await?;
        apply_statements(
            &admin,
            &pr.late_statements(&p.target),
            &mut d.property_warnings,
        )
        .await;
    }
    d.duration_secs = started.elapsed().as_secs_f64();
    Ok(d)
}

/// A connection on which writes work even when the role's or database's
/// default_transaction_read_only is on (restoring a cluster whose roles have it, say).
/// The session setting pg_restore 17 and later open every restore with.
const TRANSACTION_TIMEOUT_LINE: &[u8] = b"SET transaction_timeout = 0;\n";

/// Whether a restore with `tools` into a server of `target_version` must go through a script:
/// pg_restore 17 and later begin with `SET transaction_timeout = 0`, which servers before 17
/// reject, so a dump that only a newer pg_restore can read (written by a newer pg_dump, the
/// only one that served the server) could never be restored into its own server otherwise.
fn needs_script(tools: &ClientTools, target_version: u32) -> bool {
    tools.major >= 17 && target_version < 170000
}

/// `pg_restore -f - ARGS | psql`, without the `SET transaction_timeout` line (see
/// [`needs_script`]); COPY data is passed on untouched. Returns what psql printed.
#[allow(clippy::too_many_arguments)]
async fn restore_through_psql(
    repo: &Repository,
    tools: &ClientTools,
    params: &ConnParams,
    target: &str,
    args: &[String],
    src: &DumpedDatabase,
    progress: &dyn Progress,
    what: &str,
) -> Result<String> {
    progress.note(&format!(
        "{} sets transaction_timeout, which the server lacks: its script goes through psql without that line",
        tools.version
    ));
    let refs: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--no-password")
        .collect();
    let mut restore = pgkeep_pg::dump::pg_restore_to_sql(tools, &refs).map_err(pg_err)?;
    let mut psql = pgkeep_pg::dump::psql_script(tools, params, target).map_err(pg_err)?;
    let script = restore
        .take_stdout()
        .ok_or_else(|| Error::new(ErrorKind::Failure, "pg_restore's stdout is not a pipe"))?
        .into_owned_fd()
        .map_err(|e| Error::io("taking the pipe of pg_restore", e))?;
    let input = psql
        .take_stdin()
        .ok_or_else(|| Error::new(ErrorKind::Failure, "psql's stdin is not a pipe"))?
        .into_owned_fd()
        .map_err(|e| Error::io("taking the pipe to psql", e))?;
    let filter = tokio::task::spawn_blocking(move || {
        drop_line_outside_copy(
            std::io::BufReader::new(std::fs::File::from(script)),
            std::fs::File::from(input),
            TRANSACTION_TIMEOUT_LINE,
        )
    });
    let fed = feed_archive(repo, &src.stream, &mut restore, progress).await;
    let restored = wait_tool(restore, what).await;
    let copied = filter
        .await
        .map_err(|e| Error::new(ErrorKind::Failure, format!("script filter failed: {e}")))?;
    // psql's verdict first: it holds the server's error; broken pipes are symptoms.
    let warnings = wait_tool(psql, what).await?;
    restored?;
    copied.map_err(|e| Error::io("passing the restore script to psql", e))?;
    fed?;
    Ok(warnings)
}

/// Copies a psql script from `input` to `out` without the lines equal to `line`, except
/// inside COPY data (between `COPY ... FROM stdin;` and `\.`), which is copied as it is.
fn drop_line_outside_copy(
    mut input: impl BufRead,
    mut out: impl Write,
    line: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut in_copy = false;
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if in_copy {
            in_copy = buf.as_slice() != b"\\.\n";
        } else if buf.starts_with(b"COPY ") && buf.ends_with(b"FROM stdin;\n") {
            in_copy = true;
        } else if buf.as_slice() == line {
            continue;
        }
        out.write_all(&buf)?;
    }
    out.flush()
}

async fn connect_rw(params: &ConnParams, db: &str) -> Result<PgClient> {
    let c = connect_db(params, db).await?;
    c.inner()
        .batch_execute("SET default_transaction_read_only = off")
        .await
        .map_err(|e| sql_err("preparing the session", c.target(), &e))?;
    Ok(c)
}

/// Runs each statement; a failure (a role missing on the target, a setting this server
/// does not know) becomes a warning naming what could not be done, with any setting value
/// masked, and the rest still runs.
async fn apply_statements(
    admin: &PgClient,
    stmts: &[PropertyStatement],
    warnings: &mut Vec<String>,
) {
    for st in stmts {
        if let Err(e) = admin.inner().batch_execute(&st.sql).await {
            // A statement run under SET ROLE must not leave the session in that role.
            let _ = admin.inner().batch_execute("RESET ROLE").await;
            let mut why = sql_text(&e);
            if let Some(secret) = &st.secret {
                why = why.replace(secret.as_str(), "***");
            }
            warnings.push(format!("could not {}: {why}", st.what));
        }
    }
}

/// `LC_COLLATE/LC_CTYPE` and the provider's locale, in words.
fn locale_words(pr: &DatabaseProperties) -> String {
    let mut s = if pr.collate == pr.ctype {
        pr.collate.clone()
    } else {
        format!("{} (LC_COLLATE) / {} (LC_CTYPE)", pr.collate, pr.ctype)
    };
    if let Some(l) = &pr.provider_locale {
        s.push_str(&format!(", {} locale {l}", pr.locale_provider));
    }
    s
}

/// What applying `pr` does, in words (setting names, never their values).
fn describe_properties(pr: &DatabaseProperties, opts: &RestoreDumpOptions) -> String {
    let mut parts = Vec::new();
    parts.push(if opts.no_owner {
        format!(
            "owner left to the restoring role (--no-owner; was {})",
            pr.owner
        )
    } else {
        format!("owner {}", pr.owner)
    });
    parts.push(format!(
        "encoding {}, locale {}",
        pr.encoding,
        locale_words(pr)
    ));
    match (&pr.grants, opts.no_acl) {
        (_, true) => parts.push("privileges skipped (--no-acl)".into()),
        (Some(g), false) => parts.push(format!("{} privileges", g.len())),
        (None, false) => parts.push("default privileges".into()),
    }
    let names = pr.setting_names();
    if !names.is_empty() {
        parts.push(format!("settings {}", names.join(", ")));
    }
    if pr.connection_limit != -1 {
        parts.push(format!("connection limit {}", pr.connection_limit));
    }
    if pr.comment.is_some() {
        parts.push("comment".into());
    }
    if pr.is_template {
        parts.push("template".into());
    }
    parts.join("; ")
}

/// A database this restore created and has not filled yet. Dropped without
/// [`CreatedDatabase::keep`] (the restore failed, or the command was interrupted), it drops
/// the database, through a clean-up the binary waits for before it exits
/// (`pgkeep_repo::cleanup`): as `--single-transaction` leaves an existing target as it was,
/// a restore that does not complete leaves no half-restored database behind, and the same
/// command can be run again.
struct CreatedDatabase {
    params: ConnParams,
    maintenance_db: String,
    name: String,
    kept: bool,
}

impl CreatedDatabase {
    /// The restore completed: the database stays.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for CreatedDatabase {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let (params, maintenance, name) = (
            self.params.clone(),
            self.maintenance_db.clone(),
            self.name.clone(),
        );
        pgkeep_repo::cleanup::spawn(async move {
            let sql = format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&name)
            );
            let dropped = match connect_rw(&params, &maintenance).await {
                // WITH (FORCE): pg_restore's session may not have ended yet.
                Ok(c) => c
                    .inner()
                    .batch_execute(&sql)
                    .await
                    .map_err(|e| sql_text(&e)),
                Err(e) => Err(e.to_string()),
            };
            match dropped {
                Ok(()) => tracing::warn!(
                    "the restore did not complete: the database {name:?} it created was dropped"
                ),
                Err(e) => tracing::warn!(
                    "the restore did not complete, and the database {name:?} it created could not be dropped: {e}; HINT: drop it by hand (DROP DATABASE) before restoring again with --create"
                ),
            }
        });
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transaction_timeout_line_is_dropped_but_never_from_copy_data() {
        let script = "SET statement_timeout = 0;\nSET transaction_timeout = 0;\n\
            COPY public.t (v) FROM stdin;\nSET transaction_timeout = 0;\n\\.\n\
            \\connect x\nSET transaction_timeout = 0;\nSELECT 1;\n";
        let mut out = Vec::new();
        drop_line_outside_copy(script.as_bytes(), &mut out, TRANSACTION_TIMEOUT_LINE).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "SET statement_timeout = 0;\n\
             COPY public.t (v) FROM stdin;\nSET transaction_timeout = 0;\n\\.\n\
             \\connect x\nSELECT 1;\n"
        );
    }
}
