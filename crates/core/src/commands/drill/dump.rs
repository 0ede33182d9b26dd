//! `pgkeep drill --dump ID|latest --db NAME`: restores one database of a dump into a scratch
//! database of the server (`--pg`, else the cluster's connection), compares the row count
//! of every table with what the dump recorded, validates every foreign key, runs the
//! assertions of that database, and drops the scratch database, also on failure and on
//! SIGINT/SIGTERM.

use std::time::Instant;

use super::checks::{self, DrillCheck};
use super::DrillReport;
use crate::commands::restore_dump::{self, RestoreDumpOptions};
use crate::context::Context;
use crate::error::{Error, ErrorKind, Result};
use crate::progress::Progress;
use pgkeep_pg::client::{ConnParams, PgClient};

/// Options of a dump drill.
#[derive(Debug, Clone)]
pub struct DumpDrillOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// Dump id or `latest`.
    pub id: String,
    /// The database of the dump.
    pub db: String,
    /// Server to restore into (the cluster's connection string when `None`).
    pub conninfo: Option<String>,
}

/// `pgkeep_drill_<db>_<random>`, at most 63 bytes.
fn scratch_name(db: &str) -> String {
    use rand::Rng;
    let mut r = rand::rng();
    let tag: String = (0..8)
        .map(|_| char::from(b'a' + r.random_range(0..26u8)))
        .collect();
    let clean: String = db
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("pgkeep_drill_{clean}_{tag}")
}

/// Drops the scratch database when dropped (a task on the runtime, which the binary waits
/// for before it exits: `pgkeep_repo::cleanup`), unless [`ScratchDatabase::drop_now`] already did.
struct ScratchDatabase {
    params: ConnParams,
    name: String,
    dropped: bool,
}

impl ScratchDatabase {
    async fn drop_now(&mut self) -> std::result::Result<(), String> {
        self.dropped = true;
        drop_database(self.params.clone(), self.name.clone()).await
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        if !self.dropped {
            let (p, n) = (self.params.clone(), self.name.clone());
            pgkeep_repo::cleanup::spawn(async move {
                if let Err(e) = drop_database(p, n.clone()).await {
                    tracing::warn!("drill: could not drop the scratch database {n}: {e}");
                }
            });
        }
    }
}

async fn drop_database(params: ConnParams, name: String) -> std::result::Result<(), String> {
    let c = PgClient::connect(&params.with_dbname("postgres"))
        .await
        .map_err(|e| e.to_string())?;
    let ident = format!("\"{}\"", name.replace('"', "\"\""));
    // WITH (FORCE) (PostgreSQL 13+) ends sessions a killed check may have left.
    c.inner()
        .batch_execute(&format!("DROP DATABASE IF EXISTS {ident} WITH (FORCE)"))
        .await
        .map_err(|e| checks::pg_error_text(&e))
}

/// Runs a dump drill.
pub async fn drill_dump(
    ctx: &Context,
    opts: &DumpDrillOptions,
    progress: &dyn Progress,
) -> Result<DrillReport> {
    let params =
        ConnParams::resolve(opts.conninfo.as_deref()).map_err(crate::commands::backup::pg_error)?;
    let repo = ctx.open_repository().await?;
    let scratch = scratch_name(&opts.db);
    let mut report = DrillReport {
        kind: "dump".into(),
        cluster: opts.cluster.clone(),
        id: opts.id.clone(),
        database: Some(opts.db.clone()),
        target: format!("into scratch database {scratch} on {}", params.describe()),
        result: String::new(),
        restore_secs: 0.0,
        replay_secs: 0.0,
        check_secs: 0.0,
        rto_secs: 0.0,
        wal_bytes_replayed: 0,
        wal_segments_restored: 0,
        replay_end_lsn: None,
        last_transaction_time: None,
        server: None,
        scratch: scratch.clone(),
        checks: Vec::new(),
        leftovers_removed: Vec::new(),
        notes: Vec::new(),
    };
    let ropts = RestoreDumpOptions {
        cluster: opts.cluster.clone(),
        id: opts.id.clone(),
        conninfo: opts.conninfo.clone(),
        target_db: Some(scratch.clone()),
        source_db: Some(opts.db.clone()),
        create: true,
        no_safety_dump: true,
        jobs: 1,
        ..RestoreDumpOptions::default()
    };
    check_space(&repo, &ropts, &params, progress).await?;
    // From here on the scratch database may exist: the guard drops it whatever happens.
    let mut guard = ScratchDatabase {
        params: params.clone(),
        name: scratch.clone(),
        dropped: false,
    };
    progress.note(&format!(
        "drill: restoring dump {} of {} into {scratch}",
        opts.id, opts.db
    ));
    let restore_started = Instant::now();
    let restored = restore_dump::restore_dump(&repo, &ropts, progress).await?;
    report.restore_secs = restore_started.elapsed().as_secs_f64();
    report.id = restored.id.clone();
    report.server = restored.pg_restore.as_ref().map(|t| t.version.clone());
    let check_started = Instant::now();
    if let Some(d) = restored.databases.first() {
        report.checks.push(row_check(d));
    }
    match PgClient::connect(&params.with_dbname(&scratch)).await {
        Ok(c) => {
            report.checks.push(DrillCheck::ok(
                format!("connect:{scratch}"),
                "accepts connections",
            ));
            report.checks.push(foreign_keys(&c).await);
            for a in ctx
                .settings
                .drill
                .assertions_for(&opts.cluster)
                .filter(|a| a.database == opts.db)
            {
                report.checks.push(checks::assertion(&c, a).await);
            }
        }
        Err(e) => report.checks.push(DrillCheck::failed(
            format!("connect:{scratch}"),
            e.to_string(),
        )),
    }
    report.check_secs = check_started.elapsed().as_secs_f64();
    if let Err(e) = guard.drop_now().await {
        return Err(Error::with_hint(
            ErrorKind::Failure,
            format!("drill: could not drop the scratch database {scratch}: {e}"),
            format!("drop it by hand: DROP DATABASE \"{scratch}\""),
        ));
    }
    Ok(report.finish())
}

/// Refuses (exit 1, with both figures) a dump drill whose database, as big as it was when
/// dumped, would not fit where the server keeps its data, when that directory is on this
/// host; says nothing when it is not (a remote server).
async fn check_space(
    repo: &pgkeep_repo::Repository,
    ropts: &RestoreDumpOptions,
    params: &ConnParams,
    progress: &dyn Progress,
) -> Result<()> {
    let plan = restore_dump::restore_dump(
        repo,
        &RestoreDumpOptions {
            dry_run: true,
            ..ropts.clone()
        },
        &crate::progress::NoProgress,
    )
    .await?;
    let Some(needed) = plan.databases.first().map(|d| d.database_bytes) else {
        return Ok(());
    };
    let Ok(c) = PgClient::connect(&params.with_dbname("postgres")).await else {
        return Ok(());
    };
    let Ok(dir) = c.data_directory().await else {
        return Ok(());
    };
    let Some(space) = crate::health::snapshot::free_space(&dir) else {
        return Ok(());
    };
    if needed > space.free_bytes {
        return Err(Error::with_hint(
            ErrorKind::Failure,
            format!(
                "not enough space for the dump drill: the database was {} ({needed} bytes) when dumped, {} has {} ({} bytes) free",
                crate::progress::human_bytes(needed),
                dir.display(),
                crate::progress::human_bytes(space.free_bytes),
                space.free_bytes
            ),
            "free space there, or drill into another server with --pg CONNINFO",
        ));
    }
    progress.note(&format!(
        "drill: the database needs about {}, {} has {} free",
        crate::progress::human_bytes(needed),
        dir.display(),
        crate::progress::human_bytes(space.free_bytes)
    ));
    Ok(())
}

fn row_check(d: &restore_dump::RestoredDatabase) -> DrillCheck {
    if d.row_differences.is_empty() {
        return DrillCheck::ok(
            "rows",
            format!(
                "{} tables hold the rows the dump recorded",
                d.tables_checked
            ),
        );
    }
    let diffs: Vec<String> = d
        .row_differences
        .iter()
        .take(5)
        .map(|r| {
            format!(
                "{}.{}: {} rows, dump recorded {}",
                r.schema,
                r.table,
                r.found.map_or("no table".into(), |n| n.to_string()),
                r.expected.map_or("?".into(), |n| n.to_string())
            )
        })
        .collect();
    DrillCheck::failed(
        "rows",
        format!(
            "{} of {} tables differ: {}",
            d.row_differences.len(),
            d.tables_checked,
            diffs.join("; ")
        ),
    )
}

/// Validates every foreign key: those pg_restore created were checked as it added them;
/// those the dump marked NOT VALID are validated here (the scratch database is ours).
async fn foreign_keys(c: &PgClient) -> DrillCheck {
    let sql =
        "SELECT format('ALTER TABLE %s VALIDATE CONSTRAINT %I', conrelid::regclass, conname) \
               FROM pg_constraint WHERE contype = 'f' AND NOT convalidated";
    let not_valid = match checks::column(c, sql).await {
        Ok(v) => v,
        Err(e) => return DrillCheck::failed("foreign_keys", format!("listing them: {e}")),
    };
    for stmt in &not_valid {
        if let Err(e) = checks::first_value(c, stmt).await {
            return DrillCheck::failed("foreign_keys", format!("{stmt}: {e}"));
        }
    }
    let total = checks::first_value(c, "SELECT count(*) FROM pg_constraint WHERE contype = 'f'")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "?".into());
    DrillCheck::ok(
        "foreign_keys",
        format!(
            "{total} foreign keys hold ({} validated by the drill, the others as pg_restore added them)",
            not_valid.len()
        ),
    )
}
