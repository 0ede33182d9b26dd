//! The `pgkeep` command line: parse, call pgkeep-core, print text or JSON, exit with the
//! code of the registry in `pgkeep_core::error`. No logic of its own.
//!
//! Spellings are a contract (ARCHITECTURE.md, "Command line").

use std::io::Write;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use pgkeep_core::commands::archive_async;
use pgkeep_core::commands::repo::{
    self, RepoCheckOptions, RepoInitOptions, RepoKeyRemoveOptions, RepoUnlockOptions,
};
use pgkeep_core::commands::{
    archive, backup, copy, drill, dump, expire, export_dump, list, mirror, notify, restore,
    restore_dump, restore_plan, verify,
};
use pgkeep_core::config::{Env, Overrides};
use pgkeep_core::error::ErrorReport;
use pgkeep_core::health::{self, metrics, status};
use pgkeep_core::history::{self, RunFacts, RunKind, RunObserver, RunStart};
use pgkeep_core::progress::{LogProgress, NoProgress, Progress, TerminalProgress};
use pgkeep_core::{Context, Error, ErrorKind, Report};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, EnvFilter};

/// PostgreSQL backup and recovery: physical backups, WAL archiving and point-in-time
/// recovery, logical dumps, into a deduplicated, compressed, optionally encrypted repository.
///
/// Exit codes: 0 ok, 1 failure, 2 usage or config, 3 done with warnings, 10 no or invalid
/// repository, 11 lock held, 12 wrong passphrase or key, 13 integrity error, 14 WAL conflict,
/// 15 cluster mismatch, 16 recovery target unreachable, 130 interrupted.
#[derive(Debug, Parser)]
#[command(name = "pgkeep", version, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Global {
    /// Configuration file [default: PGKEEP_CONFIG, else /etc/pgkeep/pgkeep.toml if present].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Repository: a directory, file:///path, s3://bucket/prefix, az://container/prefix or
    /// gs://bucket/prefix, without credentials [env: PGKEEP_REPO].
    #[arg(long, global = true, value_name = "URL")]
    repo: Option<String>,
    /// Cluster name [env: PGKEEP_CLUSTER] [default: main].
    #[arg(long, global = true, value_name = "NAME")]
    cluster: Option<String>,
    /// Wait this long (30s, 10m, 1h) for a conflicting repository lock to be released instead
    /// of failing at once with exit 11, e.g. a backup started while expire runs [env:
    /// PGKEEP_LOCK_WAIT] [default: 0].
    #[arg(long, global = true, value_name = "DURATION")]
    lock_wait: Option<String>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (-v info, -vv debug, -vvv trace) [env: PGKEEP_LOG].
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Only errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, inspect, check and unlock the repository; manage its keys.
    Repo {
        #[command(subcommand)]
        command: RepoCommand,
    },
    /// Take a physical base backup of the cluster.
    Backup(BackupArgs),
    /// List backups and dumps of the cluster, newest last.
    List,
    /// Show one backup or dump.
    Info {
        /// Backup or dump id, or `latest`.
        #[arg(value_name = "ID|latest")]
        id: String,
    },
    /// Restore a physical backup into a directory, optionally to a point in time.
    Restore(RestoreArgs),
    /// Archive one WAL segment or history file (archive_command = 'pgkeep archive-push %p').
    ArchivePush {
        /// Path of the WAL file (%p).
        #[arg(value_name = "PATH")]
        path: PathBuf,
        /// Asynchronous mode: acknowledge through this spool directory while a background
        /// pusher pushes every ready segment, in parallel [env: PGKEEP_SPOOL_DIR].
        #[arg(long, value_name = "DIR", env = "PGKEEP_SPOOL_DIR", hide_env = true)]
        spool_dir: Option<PathBuf>,
        /// Parallel pushes of the background pusher (asynchronous mode).
        #[arg(long, value_name = "N", default_value_t = archive_async::DEFAULT_JOBS)]
        jobs: usize,
    },
    /// The background pusher of asynchronous archive-push (started by it).
    #[command(hide = true)]
    ArchivePushWorker {
        /// The spool directory.
        #[arg(long, value_name = "DIR")]
        spool_dir: PathBuf,
        /// Parallel pushes.
        #[arg(long, value_name = "N", default_value_t = archive_async::DEFAULT_JOBS)]
        jobs: usize,
        /// The server's pg_wal directory.
        #[arg(value_name = "PG_WAL")]
        pg_wal: PathBuf,
    },
    /// Fetch one WAL file (restore_command = 'pgkeep archive-get %f %p').
    ArchiveGet {
        /// WAL file name (%f).
        #[arg(value_name = "WALNAME")]
        walname: String,
        /// Where to write it (%p).
        #[arg(value_name = "DEST")]
        dest: PathBuf,
        /// Asynchronous mode: prefetch the following segments in parallel into this spool
        /// directory [env: PGKEEP_SPOOL_DIR].
        #[arg(long, value_name = "DIR", env = "PGKEEP_SPOOL_DIR", hide_env = true)]
        spool_dir: Option<PathBuf>,
        /// Segments to prefetch (asynchronous mode).
        #[arg(long, value_name = "N", default_value_t = archive_async::DEFAULT_PREFETCH)]
        prefetch: u32,
    },
    /// The prefetcher of asynchronous archive-get (started by it).
    #[command(hide = true)]
    ArchiveGetPrefetch {
        /// The spool directory.
        #[arg(long, value_name = "DIR")]
        spool_dir: PathBuf,
        /// Segments to fetch.
        #[arg(long, value_name = "N", default_value_t = archive_async::DEFAULT_PREFETCH)]
        count: u32,
        /// The segment after which to fetch.
        #[arg(value_name = "SEGMENT")]
        after: String,
    },
    /// Take a logical dump of one database, or of all of them.
    Dump(DumpArgs),
    /// Restore a logical dump into a database.
    RestoreDump(RestoreDumpArgs),
    /// Write a logical dump out as a pg_dump file.
    ExportDump(ExportDumpArgs),
    /// Verify that backups can be restored.
    Verify {
        /// Also read and verify every byte.
        #[arg(long)]
        read_data: bool,
    },
    /// Run the [[schedule]] jobs of the configuration file and, with [daemon] listen, serve
    /// /metrics, /healthz, the JSON API and a dashboard. SIGHUP reloads, SIGTERM stops.
    Daemon,
    /// Write the files that run pgkeep unattended (systemd units, a cron.d file, Kubernetes
    /// manifests) from the configuration file; or shell completions, or the man pages.
    Generate(GenerateArgs),
    /// Prove that a backup restores: restore it into a scratch directory, replay WAL on a
    /// throwaway server, check every database, measure the recovery time, clean up.
    Drill(DrillArgs),
    /// Remove backups, dumps and WAL beyond the retention policy, then unused data.
    Expire(ExpireArgs),
    /// Pin a backup or dump: expire never removes it.
    Pin {
        /// Backup or dump id, or `latest`.
        #[arg(value_name = "ID|latest")]
        id: String,
    },
    /// Unpin a backup or dump.
    Unpin {
        /// Backup or dump id, or `latest`.
        #[arg(value_name = "ID|latest")]
        id: String,
    },
    /// Copy backups, dumps and WAL into a second repository, sending only what it lacks.
    Copy(CopyArgs),
    /// Check the health of the cluster's backups against the `[health]` thresholds, and its
    /// archiving end to end. Exit 0 healthy, 3 warnings, 1 critical (or the archiving
    /// check's own code); with --nagios 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    Check(CheckArgs),
    /// Show the state of backups and archiving: newest backups and dumps, the recovery
    /// window, WAL lag, the last failure and drill, repository size.
    Status,
    /// Print Prometheus metrics (or CloudWatch embedded metric format) of the cluster.
    Metrics(MetricsArgs),
    /// Show the recorded runs (backup, dump, archive-push failures, expire, verify), oldest first.
    History(HistoryArgs),
    /// Notifications ([notify] in the config file).
    Notify {
        #[command(subcommand)]
        command: NotifyCommand,
    },
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// What to generate: systemd, cron or k8s from the configuration file's [[schedule]] and
    /// [daemon]; completions for a shell; the man pages.
    #[arg(value_enum)]
    target: GenerateTarget,
    /// The shell (completions).
    #[arg(value_enum, required_if_eq("target", "completions"))]
    shell: Option<clap_complete::Shell>,
    /// Write the files into DIR (created when missing, mode 0644) instead of printing them.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Replace files of the --output directory that have other contents.
    #[arg(long, requires = "output")]
    force: bool,
    /// daemon: one `pgkeep daemon` runs every [[schedule]] (default of systemd and k8s);
    /// jobs: a timer, cron line or CronJob per [[schedule]] (cron's only mode).
    #[arg(long, value_enum)]
    mode: Option<GenerateMode>,
    /// The pgkeep executable the units and cron lines run [default: this one].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// The container image (k8s).
    #[arg(long, value_name = "IMAGE", default_value = pgkeep_daemon::generate::DEFAULT_IMAGE)]
    image: String,
    /// The user the jobs run as (systemd User=, the cron.d user field).
    #[arg(long, value_name = "USER", default_value = pgkeep_daemon::generate::DEFAULT_USER)]
    user: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GenerateTarget {
    Systemd,
    Cron,
    K8s,
    Completions,
    Man,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GenerateMode {
    Daemon,
    Jobs,
}

#[derive(Debug, Subcommand)]
enum NotifyCommand {
    /// Send a test message to every configured channel; exit 1 if any did not receive it.
    Test,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").args(["ids", "latest", "all"]).multiple(false)))]
struct CopyArgs {
    /// The target: a [[repository]] name of the configuration file, a path or a URL. Its
    /// passphrase comes from PGKEEP_TO_PASSPHRASE, PGKEEP_TO_PASSPHRASE_FILE or its
    /// configured passphrase_file.
    #[arg(long, value_name = "REPO2")]
    to: String,
    /// Backup or dump ids to copy.
    #[arg(value_name = "ID")]
    ids: Vec<String>,
    /// The newest physical backup and the newest dump of each database.
    #[arg(long)]
    latest: bool,
    /// Every backup and dump of the cluster.
    #[arg(long)]
    all: bool,
    /// Also the cluster's WAL archive (every object the target lacks).
    #[arg(long)]
    wal: bool,
}

impl CopyArgs {
    fn options(&self, ctx: &Context, target_location: String) -> Result<copy::CopyOptions, Error> {
        let selection = if self.all {
            copy::CopySelection::All
        } else if self.latest {
            copy::CopySelection::Latest
        } else if !self.ids.is_empty() {
            copy::CopySelection::Ids(self.ids.clone())
        } else if self.wal {
            copy::CopySelection::None
        } else {
            return Err(Error::usage_hint(
                "copy: nothing selected",
                "give backup ids, --latest, --all or --wal",
            ));
        };
        Ok(copy::CopyOptions {
            cluster: ctx.settings.cluster.name.clone(),
            selection,
            wal: self.wal,
            threads: ctx.settings.threads,
            target_location,
        })
    }
}

#[derive(Debug, Args)]
struct CheckArgs {
    #[command(flatten)]
    archive: pgkeep_core::commands::check::ArchiveCheckOptions,
    /// Print one Nagios plugin line with performance data and exit with the plugin's codes.
    #[arg(long, conflicts_with = "json")]
    nagios: bool,
}

#[derive(Debug, Args)]
struct MetricsArgs {
    /// Write to FILE atomically (temporary file and rename), e.g. in node_exporter's
    /// textfile collector directory, instead of stdout.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "prometheus")]
    format: metrics::MetricsFormat,
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// Only runs of this kind.
    #[arg(long, value_enum)]
    kind: Option<history::RunKind>,
    /// Only the newest N runs.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum RepoCommand {
    /// Create a repository. Encrypted by default: the passphrase comes from
    /// PGKEEP_PASSPHRASE, PGKEEP_PASSPHRASE_FILE or a prompt (asked twice); use
    /// --no-encryption for a plain repository. Fails (exit 1) when one already exists there.
    Init(RepoInitOptions),
    /// Show figures about the repository.
    Info,
    /// Check the repository's structure (and with --read-data every byte). Exit 13 on damage.
    Check(RepoCheckOptions),
    /// Remove stale locks (dead holders on this host, or not refreshed for 30 minutes).
    Unlock(RepoUnlockOptions),
    /// Rebuild the index from the pack headers, after `repo check` named a damaged or missing
    /// index file. Takes the exclusive lock; safe to interrupt and rerun.
    RepairIndex,
    /// Remove data that no backup or dump needs (expire runs this after removing backups).
    /// Takes the exclusive lock; safe to interrupt and rerun.
    Prune(PruneArgs),
    /// Add, list or remove passphrases (keys) of an encrypted repository.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Add a passphrase: PGKEEP_NEW_PASSPHRASE, PGKEEP_NEW_PASSPHRASE_FILE or a prompt (twice).
    Add,
    /// List the keys.
    List,
    /// Remove a key (not the one in use, not the last one).
    Remove(RepoKeyRemoveOptions),
}

#[derive(Debug, Args)]
struct PruneArgs {
    #[command(flatten)]
    gc: GcFlags,
    /// Show what would be removed, remove nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Garbage-collection settings shared by `repo prune` and `expire`.
#[derive(Debug, Args)]
struct GcFlags {
    /// Repack a pack when more than this share of it is unused (percent).
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    max_unused: f64,
    /// Packs younger than this stay whatever they hold, for a writer on another host whose
    /// lock went stale (e.g. 24h, 2d; 0 when certain nothing else writes).
    #[arg(long, value_name = "DURATION", default_value = "24h")]
    grace: String,
}

impl GcFlags {
    fn options(&self, dry_run: bool) -> Result<pgkeep_repo::PruneOptions, Error> {
        if !(0.0..=100.0).contains(&self.max_unused) {
            return Err(Error::usage(format!(
                "--max-unused {}: give a percentage from 0 to 100",
                self.max_unused
            )));
        }
        let grace = match self.grace.as_str() {
            "0" => std::time::Duration::ZERO,
            g => match g.parse::<pgkeep_core::retention::KeepWithin>() {
                Ok(w) if w.months == 0 => std::time::Duration::from_secs(w.hours * 3600),
                _ => {
                    return Err(Error::usage_hint(
                        format!("--grace {g:?} is not a duration in hours, days or weeks"),
                        "e.g. --grace 24h, --grace 2d, or --grace 0",
                    ))
                }
            },
        };
        Ok(pgkeep_repo::PruneOptions {
            max_unused: self.max_unused / 100.0,
            grace,
            dry_run,
        })
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExpireKind {
    /// Physical base backups (and the WAL archive).
    Physical,
    /// Logical dumps, per database.
    Dump,
}

/// Rules given on the command line replace the configured `[retention]` rules of the kinds
/// they apply to.
#[derive(Debug, Args)]
struct ExpireArgs {
    /// Only this kind of backup [default: each kind with its own rules].
    #[arg(long, value_enum)]
    kind: Option<ExpireKind>,
    /// Only the dumps of this database.
    #[arg(long, value_name = "NAME")]
    db: Option<String>,
    /// Keep the N newest.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// Keep the newest of each of the last N days (UTC) that have one.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// Keep the newest of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// Keep the newest of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep everything newer than this before the newest backup (e.g. 30d, 2w, 1y6m, 36h).
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Keep every backup with this label (repeatable).
    #[arg(long, value_name = "LABEL")]
    keep_label: Vec<String>,
    /// Keep continuous WAL only from the newest N kept physical backups on (older kept
    /// backups keep the WAL of their own start to stop).
    #[arg(long, value_name = "N")]
    keep_wal_for: Option<u32>,
    /// Show what would go and which rule keeps each backup; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Allow the rules to remove every backup of a cluster or database.
    #[arg(long)]
    allow_remove_all: bool,
    /// Garbage collection after the backups are removed.
    #[command(flatten)]
    gc: GcFlags,
}

impl ExpireArgs {
    fn policy(&self) -> Result<pgkeep_core::retention::RetentionPolicy, Error> {
        let p = pgkeep_core::retention::RetentionPolicy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within: match &self.keep_within {
                Some(w) => Some(w.parse().map_err(|e: Error| {
                    Error::usage_hint(
                        format!("--keep-within {w:?} is not a duration"),
                        e.to_string()
                            .lines()
                            .last()
                            .unwrap_or_default()
                            .trim_start_matches("HINT: ")
                            .to_string(),
                    )
                })?),
                None => None,
            },
            keep_label: self.keep_label.clone(),
        };
        p.validate()?;
        Ok(p)
    }

    fn options(&self, ctx: &Context) -> Result<expire::ExpireOptions, Error> {
        if self.keep_wal_for == Some(0) {
            return Err(Error::usage_hint(
                "--keep-wal-for 0 would keep no continuous WAL",
                "give at least 1, or leave it out to keep WAL from the oldest kept backup on",
            ));
        }
        let given = self.policy()?;
        let configured = &ctx.settings.retention;
        let pick = |c: &pgkeep_core::retention::RetentionPolicy| {
            if given.is_empty() {
                c.clone()
            } else {
                given.clone()
            }
        };
        Ok(expire::ExpireOptions {
            cluster: ctx.settings.cluster.name.clone(),
            kind: self.kind.map(|k| match k {
                ExpireKind::Physical => expire::BackupKind::Physical,
                ExpireKind::Dump => expire::BackupKind::Dump,
            }),
            db: self.db.clone(),
            physical: pick(&configured.physical),
            dump: pick(&configured.dump),
            keep_wal_for: self.keep_wal_for,
            dry_run: self.dry_run,
            allow_remove_all: self.allow_remove_all,
            prune: self.gc.options(self.dry_run)?,
            history_max_age: ctx.settings.health.history_max_age.duration(),
        })
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BackupMethod {
    /// Read the data directory directly (on the database host).
    Local,
    /// Stream `pg_basebackup -Ft -X fetch -D -` (from any host; no tablespaces).
    Basebackup,
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// Data directory [env: PGKEEP_PGDATA].
    #[arg(long, value_name = "DIR")]
    pgdata: Option<PathBuf>,
    /// libpq connection string, without password (use PGPASSWORD or ~/.pgpass) [env: PGKEEP_PG].
    #[arg(long, value_name = "CONNINFO")]
    pg: Option<String>,
    /// Free text stored with the backup.
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
    /// Read every file, even those unchanged since the previous backup.
    #[arg(long)]
    full_read: bool,
    /// How to read the cluster.
    #[arg(long, value_enum, default_value = "local")]
    method: BackupMethod,
    /// Pin the new backup: expire never removes it.
    #[arg(long)]
    pin: bool,
    /// When the cluster archives with `pgkeep archive-push`: how long to wait for the
    /// backup's WAL to reach the repository, in seconds (default 60; of a standby, its
    /// archive_timeout plus 30 when longer).
    #[arg(long, value_name = "SECS")]
    archive_timeout: Option<u64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").multiple(false).args(
    ["target_time", "target_lsn", "target_xid", "target_name", "target_immediate"]
)))]
struct RestoreArgs {
    /// Backup id, or `latest` (the newest physical backup).
    #[arg(value_name = "ID|latest")]
    id: String,
    /// Directory to restore into (created 0700 when missing).
    #[arg(long, value_name = "DIR")]
    target_dir: PathBuf,
    /// Restore over an existing data directory, rewriting only what differs.
    #[arg(long)]
    delta: bool,
    /// Restore into a non-empty directory.
    #[arg(long)]
    force: bool,
    /// Recover up to this time (timestamptz text or RFC 3339).
    #[arg(long, value_name = "T")]
    target_time: Option<String>,
    /// Recover up to this LSN.
    #[arg(long, value_name = "L")]
    target_lsn: Option<String>,
    /// Recover up to this transaction id.
    #[arg(long, value_name = "X")]
    target_xid: Option<String>,
    /// Recover up to this named restore point.
    #[arg(long, value_name = "N")]
    target_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long)]
    target_immediate: bool,
    /// What the server does when the target is reached.
    #[arg(long, value_enum)]
    target_action: Option<TargetAction>,
    /// Timeline to recover along: `latest`, `current` or a number [PostgreSQL's default:
    /// latest].
    #[arg(long, value_name = "TLI")]
    target_timeline: Option<String>,
    /// Restore the tablespace that was at OLD to NEW (repeatable).
    #[arg(long, value_name = "OLD=NEW")]
    tablespace_map: Vec<String>,
    /// Restore as a standby: standby.signal and restore_command, so that the copy follows
    /// the archive (and a primary, with --primary-conninfo) instead of being promoted.
    #[arg(long, conflicts_with_all = ["target", "target_action"])]
    standby: bool,
    /// primary_conninfo of the standby, without password (the server reads it from a
    /// passfile=... or its user's ~/.pgpass).
    #[arg(long, value_name = "CONNINFO", requires = "standby")]
    primary_conninfo: Option<String>,
    /// Print the plan (backup, sizes, free space, WAL, where recovery stops, duration) and
    /// write nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["db", "all"])))]
struct DumpArgs {
    /// libpq connection string, without password [env: PGKEEP_PG].
    #[arg(long, value_name = "CONNINFO")]
    pg: Option<String>,
    /// Database to dump.
    #[arg(long, value_name = "NAME")]
    db: Option<String>,
    /// Every database, and the globals (roles, tablespaces).
    #[arg(long)]
    all: bool,
    /// Free text stored with the dump.
    #[arg(long, value_name = "TEXT")]
    label: Option<String>,
    /// Pin the new dump: expire never removes it.
    #[arg(long)]
    pin: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").multiple(false).args(
    ["target_time", "target_lsn", "target_xid", "target_name", "dump"]
)))]
struct DrillArgs {
    /// Backup id, or `latest` (the newest physical backup) [default: latest].
    #[arg(value_name = "ID|latest", conflicts_with = "dump")]
    id: Option<String>,
    /// Replay up to this time (timestamptz text or RFC 3339) [default: the end of the
    /// archive].
    #[arg(long, value_name = "T")]
    target_time: Option<String>,
    /// Replay up to this LSN.
    #[arg(long, value_name = "L")]
    target_lsn: Option<String>,
    /// Replay up to this transaction id.
    #[arg(long, value_name = "X")]
    target_xid: Option<String>,
    /// Replay up to this named restore point.
    #[arg(long, value_name = "N")]
    target_name: Option<String>,
    /// Directory in which the scratch directory is made [default: [drill] scratch_dir,
    /// $TMPDIR, /var/tmp].
    #[arg(long, value_name = "DIR", conflicts_with = "dump")]
    scratch_dir: Option<PathBuf>,
    /// Drill a dump instead: restore it into a scratch database and compare.
    #[arg(long, value_name = "ID|latest", requires = "db")]
    dump: Option<String>,
    /// The database of the dump.
    #[arg(long, value_name = "NAME", requires = "dump")]
    db: Option<String>,
    /// Server the dump drill restores into, libpq connection string without password
    /// [env: PGKEEP_PG].
    #[arg(long, value_name = "CONNINFO", requires = "dump")]
    pg: Option<String>,
}

#[derive(Debug, Args)]
struct RestoreDumpArgs {
    /// Dump id, or `latest` (the newest dump).
    #[arg(value_name = "ID|latest")]
    id: String,
    /// libpq connection string, without password [env: PGKEEP_PG].
    #[arg(long, value_name = "CONNINFO")]
    pg: Option<String>,
    /// Database to restore into.
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    target_db: Option<String>,
    /// Which database of a `dump --all` to restore.
    #[arg(long, value_name = "NAME")]
    db: Option<String>,
    /// Restore a `dump --all` whole: roles, tablespaces and every database under its own name.
    #[arg(long, conflicts_with = "db")]
    all: bool,
    /// Do not dump a database holding objects into the repository before restoring over it.
    #[arg(long)]
    no_safety_dump: bool,
    /// Create the target database.
    #[arg(long)]
    create: bool,
    /// Drop objects before recreating them.
    #[arg(long)]
    clean: bool,
    /// Parallel pg_restore jobs.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    jobs: Option<u32>,
    /// Show what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Restore into a database that already holds objects.
    #[arg(long)]
    force: bool,
    /// Objects (and a created database) owned by the restoring role, as pg_restore
    /// --no-owner.
    #[arg(long)]
    no_owner: bool,
    /// Restore no privileges (GRANT/REVOKE), the database's own included, as pg_restore
    /// --no-acl.
    #[arg(long)]
    no_acl: bool,
    /// Restore only this schema (repeatable); created from the dump when the target lacks it.
    #[arg(long = "schema", value_name = "NAME")]
    schemas: Vec<String>,
    /// Leave this schema out (repeatable).
    #[arg(long = "exclude-schema", value_name = "NAME")]
    exclude_schemas: Vec<String>,
    /// Restore only this table, its definition and data (repeatable; with --schema, in those
    /// schemas only).
    #[arg(long = "table", value_name = "NAME")]
    tables: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DumpFormat {
    Custom,
    Plain,
}

#[derive(Debug, Args)]
struct ExportDumpArgs {
    /// Dump id, or `latest` (the newest dump).
    #[arg(value_name = "ID|latest")]
    id: String,
    /// File to write.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Which database of a `dump --all` to export.
    #[arg(long, value_name = "NAME")]
    db: Option<String>,
    /// pg_dump custom format (for pg_restore) or plain SQL.
    #[arg(long, value_enum, default_value = "custom")]
    format: DumpFormat,
}

impl Cli {
    /// The flags that override settings, the subcommand's included.
    fn overrides(&self) -> Overrides {
        let g = &self.global;
        let (pgdata, pg) = match &self.command {
            Command::Backup(b) => (b.pgdata.clone(), b.pg.clone()),
            Command::Dump(d) => (None, d.pg.clone()),
            Command::RestoreDump(r) => (None, r.pg.clone()),
            Command::Drill(d) => (None, d.pg.clone()),
            _ => (None, None),
        };
        let log_level = if g.quiet {
            Some("error")
        } else {
            match g.verbose {
                0 => None,
                1 => Some("info"),
                2 => Some("debug"),
                _ => Some("trace"),
            }
        };
        Overrides {
            config: g.config.clone(),
            repo: g.repo.clone(),
            cluster: g.cluster.clone(),
            pgdata,
            pg,
            compression_level: None,
            log_level: log_level.map(str::to_string),
            lock_wait: g.lock_wait.clone(),
        }
    }

    /// The history record this run will make, if it makes one.
    fn run_start(&self, ctx: &Context) -> Option<RunStart> {
        let cluster = &ctx.settings.cluster.name;
        let start = |kind| RunStart::now(kind, cluster, None);
        match &self.command {
            Command::Backup(_) => Some(start(RunKind::Backup)),
            Command::Dump(d) => Some(RunStart::now(RunKind::Dump, cluster, d.db.as_deref())),
            Command::ArchivePush { .. } => Some(start(RunKind::ArchivePush).failures_only()),
            Command::Expire(e) if !e.dry_run => Some(start(RunKind::Expire)),
            Command::Verify { .. } => Some(start(RunKind::Verify)),
            Command::Copy(_) => Some(start(RunKind::Copy)),
            Command::Drill(d) => Some(RunStart::now(RunKind::Drill, cluster, d.db.as_deref())),
            _ => None,
        }
    }
}

/// `copy`: opens both repositories (the target with its own passphrase sources) and copies.
async fn copy_run(ctx: &Context, c: &CopyArgs) -> Result<copy::CopyReport, Error> {
    let source = ctx.open_repository().await?;
    let target = ctx
        .open_other_repository(&c.to, &Env::from_process())
        .await?;
    let opts = c.options(ctx, target.storage().location())?;
    copy::copy(&source, &target, &opts).await
}

/// Who hears about every finished run: the notifications of `[notify]`, if any.
fn observer(ctx: &Context) -> Option<Box<dyn RunObserver>> {
    notify::observer(&ctx.settings)
}

/// Runs a command that leaves a history record (when `start` is given), prints its report
/// and returns its exit code. Recording never changes the code or hides the error.
async fn recorded<T, F>(
    ctx: &Context,
    start: Option<&RunStart>,
    json: bool,
    run: F,
) -> Result<i32, Error>
where
    T: Report + RunFacts,
    F: std::future::Future<Output = Result<T, Error>>,
{
    let report = match start {
        Some(s) => {
            let obs = observer(ctx);
            history::recorded(ctx, s.clone(), obs.as_deref(), run).await?
        }
        None => run.await?,
    };
    Ok(emit(json, &report))
}

/// The Nagios line of a check that could not run (no `|`: it would start performance data).
fn nagios_unknown(e: &Error) -> String {
    let (m, _) = history::split_message(&e.to_string());
    format!("PGKEEP UNKNOWN - {}", m.replace('|', "/"))
}

/// How long the binary waits, before it exits, for the clean-ups that dropped guards started
/// (see `pgkeep_repo::cleanup`): a lock release on a slow object store takes a few requests.
const CLEANUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits for the clean-ups started by dropped guards, saying on stderr when some did not end
/// in time (then a lock may be left behind, and the next run on this host ignores it as
/// stale).
async fn finish_cleanups() {
    let left = pgkeep_repo::cleanup::finish(CLEANUP_TIMEOUT).await;
    if left > 0 {
        eprintln!(
            "pgkeep: warning: {left} clean-up task(s) (lock releases) did not end within {} s; \
             HINT: a lock left behind is stale once this process has exited: `pgkeep repo unlock` removes it",
            CLEANUP_TIMEOUT.as_secs()
        );
    }
}

/// Records an interrupted run (SIGINT/SIGTERM) as far as the repository can be reached.
async fn record_interrupted(ctx: &Context, start: Option<&RunStart>, what: &str) {
    if let Some(s) = start {
        let code = ErrorKind::Interrupted.exit_code();
        let rec = s.finish_with(code, Some((what.to_string(), None)), Default::default());
        let obs = observer(ctx);
        history::finish_record(ctx, s, &rec, obs.as_deref()).await;
    }
}

/// Progress display: bars on a terminal, periodic log lines otherwise, nothing with -q.
fn progress(cli: &Cli) -> Box<dyn Progress> {
    use std::io::IsTerminal;
    if cli.global.quiet {
        Box::new(NoProgress)
    } else if std::io::stderr().is_terminal() {
        Box::new(TerminalProgress::new())
    } else {
        Box::new(LogProgress::new(std::time::Duration::from_secs(10)))
    }
}

/// Prints a report (text or JSON on stdout) and returns the exit code it calls for,
/// reporting its failure (if any) on stderr.
fn emit<R: Report>(json: bool, report: &R) -> i32 {
    let mut out = std::io::stdout().lock();
    let printed = if json {
        serde_json::to_string_pretty(report)
            .map_err(std::io::Error::other)
            .and_then(|s| writeln!(out, "{s}"))
    } else {
        write!(out, "{report}")
    };
    let flushed = out.flush();
    match printed.and(flushed) {
        // The reader stopped reading (`pgkeep list | head`): it chose to see less, the work
        // is done, so the report's own exit code stands, without a word on stderr.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            eprintln!("pgkeep: error: cannot write the output: {e}");
            return ErrorKind::Failure.exit_code();
        }
        Ok(()) => {}
    }
    if let Some(e) = report.failure() {
        eprint!(
            "{}",
            ErrorReport::from_anyhow(&anyhow::Error::from(e)).render()
        );
    }
    report.exit_code()
}

async fn run(cli: &Cli, ctx: &Context, start: Option<&RunStart>) -> Result<i32, Error> {
    let json = cli.global.json;
    match &cli.command {
        // main() runs the daemon before this (it handles its own signals).
        Command::Daemon => Ok(daemon_run(ctx, &Env::from_process()).await),
        Command::Generate(g) => generate_run(json, ctx, g),
        Command::Repo { command } => match command {
            RepoCommand::Init(o) => Ok(emit(json, &repo::repo_init(ctx, o).await?)),
            RepoCommand::Info => Ok(emit(json, &repo::repo_info(ctx).await?)),
            RepoCommand::Check(o) => Ok(emit(json, &repo::repo_check(ctx, o).await?)),
            RepoCommand::Unlock(o) => Ok(emit(json, &repo::repo_unlock(ctx, o).await?)),
            RepoCommand::RepairIndex => Ok(emit(json, &repo::repo_repair_index(ctx).await?)),
            RepoCommand::Prune(p) => {
                let opts = p.gc.options(p.dry_run)?;
                let r = ctx.open_repository().await?;
                Ok(emit(json, &expire::repo_prune(&r, &opts).await?))
            }
            RepoCommand::Key { command } => match command {
                KeyCommand::Add => Ok(emit(json, &repo::repo_key_add(ctx).await?)),
                KeyCommand::List => Ok(emit(json, &repo::repo_key_list(ctx).await?)),
                KeyCommand::Remove(o) => Ok(emit(json, &repo::repo_key_remove(ctx, o).await?)),
            },
        },
        Command::Backup(b) => recorded(ctx, start, json, backup_run(cli, ctx, b)).await,
        Command::List => {
            let repo = ctx.open_repository().await?;
            let opts = list::ListOptions {
                cluster: ctx.settings.cluster.name.clone(),
            };
            Ok(emit(json, &list::list(&repo, &opts).await?))
        }
        Command::Info { id } => {
            let repo = ctx.open_repository().await?;
            let opts = list::InfoOptions {
                cluster: ctx.settings.cluster.name.clone(),
                id: id.clone(),
            };
            Ok(emit(json, &list::info(&repo, &opts).await?))
        }
        Command::Restore(r) => {
            // No target: recovery to the end of the archive (or the backup as it ended when
            // nothing is archived after it).
            let recovery = Some(pitr_options(ctx, r)?);
            let tablespace_map = r
                .tablespace_map
                .iter()
                .map(|m| m.parse::<restore::TablespaceMapping>())
                .collect::<Result<Vec<_>, _>>()?;
            let repo = ctx.open_repository().await?;
            let opts = restore::RestoreOptions {
                cluster: ctx.settings.cluster.name.clone(),
                id: r.id.clone(),
                target_dir: r.target_dir.clone(),
                delta: r.delta,
                force: r.force,
                tablespace_map,
                threads: ctx.settings.threads,
                recovery,
                dry_run: r.dry_run,
                speed_log: restore_plan::default_speed_log(),
            };
            let report = restore::restore(&repo, &opts, progress(cli).as_ref()).await?;
            Ok(emit(json, &report))
        }
        Command::ArchivePush {
            path,
            spool_dir: Some(spool_dir),
            jobs,
        } => {
            let opts = archive_async::AsyncPushOptions {
                cluster: ctx.settings.cluster.name.clone(),
                spool_dir: spool_dir.clone(),
                jobs: *jobs,
                timeout: archive_async::DEFAULT_TIMEOUT,
            };
            let push = archive_async::push_async(ctx, &opts, path);
            recorded(ctx, start, json, push).await
        }
        Command::ArchivePush { path, .. } => {
            let opts = archive::ArchivePushOptions {
                cluster: ctx.settings.cluster.name.clone(),
                path: path.clone(),
            };
            recorded(ctx, start, json, archive::archive_push(ctx, &opts)).await
        }
        Command::ArchivePushWorker {
            spool_dir,
            jobs,
            pg_wal,
        } => {
            let opts = archive_async::WorkerOptions {
                cluster: ctx.settings.cluster.name.clone(),
                spool_dir: spool_dir.clone(),
                pg_wal: pg_wal.clone(),
                jobs: *jobs,
                idle_exit: archive_async::DEFAULT_IDLE_EXIT,
            };
            Ok(emit(json, &archive_async::push_worker(ctx, &opts).await?))
        }
        Command::ArchiveGet {
            walname,
            dest,
            spool_dir: Some(spool_dir),
            prefetch,
        } => {
            let opts = archive_async::AsyncGetOptions {
                cluster: ctx.settings.cluster.name.clone(),
                spool_dir: spool_dir.clone(),
                prefetch: *prefetch,
            };
            Ok(emit(
                json,
                &archive_async::get_async(ctx, &opts, walname, dest).await?,
            ))
        }
        Command::ArchiveGetPrefetch {
            spool_dir,
            count,
            after,
        } => {
            let opts = archive_async::AsyncGetOptions {
                cluster: ctx.settings.cluster.name.clone(),
                spool_dir: spool_dir.clone(),
                prefetch: *count,
            };
            let n = archive_async::prefetch(ctx, &opts, after).await?;
            tracing::info!("prefetched {n} segments after {after}");
            Ok(0)
        }
        Command::ArchiveGet { walname, dest, .. } => {
            let opts = archive::ArchiveGetOptions {
                cluster: ctx.settings.cluster.name.clone(),
                walname: walname.clone(),
                dest: dest.clone(),
            };
            Ok(emit(json, &archive::archive_get(ctx, &opts).await?))
        }
        Command::Check(c) => {
            let opts = health::HealthOptions {
                archive: c.archive.clone(),
            };
            if !c.nagios {
                return Ok(emit(json, &health::check(ctx, &opts).await?));
            }
            // One line and the plugin's codes, whatever happens: a check that cannot run
            // is UNKNOWN, not a failure with a registry code a monitor would misread.
            let (line, code) = match health::check(ctx, &opts).await {
                Ok(r) => (r.nagios_line(), r.status.nagios_code()),
                Err(e) => (nagios_unknown(&e), pgkeep_core::error::nagios::UNKNOWN),
            };
            let _ = writeln!(std::io::stdout(), "{line}");
            Ok(code)
        }
        Command::Status => Ok(emit(json, &status::status(ctx).await?)),
        Command::Metrics(m) => metrics_run(ctx, m).await,
        Command::History(h) => {
            let filter = history::HistoryFilter {
                kind: h.kind,
                limit: h.limit,
            };
            Ok(emit(json, &history::history(ctx, &filter).await?))
        }
        Command::Notify {
            command: NotifyCommand::Test,
        } => Ok(emit(json, &notify::notify_test(ctx).await?)),
        Command::Expire(e) => {
            let opts = e.options(ctx)?;
            let run = async {
                let repo = ctx.open_repository().await?;
                expire::expire(&repo, &opts).await
            };
            recorded(ctx, start, json, run).await
        }
        Command::Copy(c) => recorded(ctx, start, json, copy_run(ctx, c)).await,
        Command::Pin { id } | Command::Unpin { id } => {
            let pinned = matches!(cli.command, Command::Pin { .. });
            let repo = ctx.open_repository().await?;
            let c = &ctx.settings.cluster.name;
            Ok(emit(json, &expire::set_pin(&repo, c, id, pinned).await?))
        }
        Command::Verify { read_data } => {
            let opts = verify::VerifyOptions {
                read_data: *read_data,
                ..Default::default()
            };
            recorded(ctx, start, json, verify::verify(ctx, &opts)).await
        }
        Command::Dump(d) => recorded(ctx, start, json, dump_run(cli, ctx, d)).await,
        Command::Drill(d) => recorded(ctx, start, json, drill_run(cli, ctx, d)).await,
        Command::RestoreDump(r) => {
            use std::io::IsTerminal;
            let repo = ctx.open_repository().await?;
            let opts = restore_dump::RestoreDumpOptions {
                cluster: ctx.settings.cluster.name.clone(),
                id: r.id.clone(),
                conninfo: ctx.settings.cluster.pg.clone(),
                target_db: r.target_db.clone(),
                source_db: r.db.clone(),
                all: r.all,
                create: r.create,
                clean: r.clean,
                jobs: r.jobs.unwrap_or(1),
                dry_run: r.dry_run,
                force: r.force,
                no_safety_dump: r.no_safety_dump,
                no_owner: r.no_owner,
                no_acl: r.no_acl,
                schemas: r.schemas.clone(),
                exclude_schemas: r.exclude_schemas.clone(),
                tables: r.tables.clone(),
                interactive: std::io::stdin().is_terminal() && std::io::stderr().is_terminal(),
                temp_dir: None,
            };
            let report = restore_dump::restore_dump(&repo, &opts, progress(cli).as_ref()).await?;
            Ok(emit(json, &report))
        }
        Command::ExportDump(e) => {
            let repo = ctx.open_repository().await?;
            let opts = export_dump::ExportDumpOptions {
                cluster: ctx.settings.cluster.name.clone(),
                id: e.id.clone(),
                db: e.db.clone(),
                output: e.output.clone(),
                format: match e.format {
                    DumpFormat::Custom => export_dump::ExportFormat::Custom,
                    DumpFormat::Plain => export_dump::ExportFormat::Plain,
                },
            };
            let report = export_dump::export_dump(&repo, &opts, progress(cli).as_ref()).await?;
            Ok(emit(json, &report))
        }
    }
}

/// `backup`, and `--pin` once it is saved.
async fn backup_run(
    cli: &Cli,
    ctx: &Context,
    b: &BackupArgs,
) -> Result<backup::BackupReport, Error> {
    let repo = ctx.open_repository().await?;
    let c = &ctx.settings.cluster;
    let opts = backup::BackupOptions {
        cluster: c.name.clone(),
        pgdata: c.pgdata.clone(),
        conninfo: c.pg.clone(),
        label: b.label.clone(),
        full_read: b.full_read,
        threads: ctx.settings.threads,
        relation_chunk_size: ctx
            .settings
            .relation_chunk_size
            .unwrap_or(backup::DEFAULT_RELATION_CHUNK_SIZE),
        method: match b.method {
            BackupMethod::Local => backup::BackupMethod::Local,
            BackupMethod::Basebackup => backup::BackupMethod::Basebackup,
        },
        archive_timeout_secs: b.archive_timeout,
    };
    let report = backup::backup(&repo, &opts, progress(cli).as_ref()).await?;
    if b.pin {
        expire::set_pin(&repo, &opts.cluster, &report.id, true).await?;
    }
    mirror::copy_new_backup(ctx, &repo, &report.id).await?;
    Ok(report)
}

/// `dump`, and `--pin` once it is saved.
async fn dump_run(cli: &Cli, ctx: &Context, d: &DumpArgs) -> Result<dump::DumpReport, Error> {
    let repo = ctx.open_repository().await?;
    let opts = dump::DumpOptions {
        cluster: ctx.settings.cluster.name.clone(),
        conninfo: ctx.settings.cluster.pg.clone(),
        db: d.db.clone(),
        all: d.all,
        label: d.label.clone(),
        ..dump::DumpOptions::default()
    };
    let report = dump::dump(&repo, &opts, progress(cli).as_ref()).await?;
    if d.pin {
        expire::set_pin(&repo, &opts.cluster, &report.id, true).await?;
    }
    mirror::copy_new_backup(ctx, &repo, &report.id).await?;
    Ok(report)
}

/// `metrics`: to stdout, or atomically to `--output`.
async fn metrics_run(ctx: &Context, m: &MetricsArgs) -> Result<i32, Error> {
    let (snap, families) = metrics::gather(ctx).await?;
    let text = match m.format {
        metrics::MetricsFormat::Prometheus => families.to_prometheus(),
        metrics::MetricsFormat::CloudwatchJson => metrics::to_cloudwatch(&snap, &families),
    };
    match &m.output {
        Some(path) => metrics::write_atomically(path, &text)?,
        None => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(Error::io("writing the metrics to stdout", e));
                }
            }
        }
    }
    Ok(pgkeep_core::error::EXIT_OK)
}

/// The point-in-time recovery request of `restore` flags.
/// The recovery target of `--target-*` (none: the end of the archive).
fn recovery_target(
    time: Option<&str>,
    lsn: Option<&str>,
    xid: Option<&str>,
    name: Option<&str>,
    immediate: bool,
) -> Result<pgkeep_pg::recovery::RecoveryTarget, Error> {
    use pgkeep_core::commands::pitr;
    use pgkeep_pg::recovery::RecoveryTarget;
    Ok(if let Some(t) = time {
        pitr::parse_target_time(t)?;
        RecoveryTarget::Time(t.to_string())
    } else if let Some(l) = lsn {
        RecoveryTarget::Lsn(
            l.parse()
                .map_err(|e| Error::usage(format!("--target-lsn {l:?}: {e}")))?,
        )
    } else if let Some(x) = xid {
        if x.is_empty() || !x.chars().all(|c| c.is_ascii_digit()) {
            return Err(Error::usage(format!(
                "--target-xid {x:?} is not a transaction id (digits)"
            )));
        }
        RecoveryTarget::Xid(x.to_string())
    } else if let Some(n) = name {
        RecoveryTarget::Name(n.to_string())
    } else if immediate {
        RecoveryTarget::Immediate
    } else {
        RecoveryTarget::End
    })
}

/// `generate`: set-up files from the configuration file, or completions and man pages from
/// the command line's definitions.
fn generate_run(json: bool, ctx: &Context, g: &GenerateArgs) -> Result<i32, Error> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    use pgkeep_daemon::generate::{self as gen, GenerateReport, GeneratedFile, Mode, Target};
    if g.shell.is_some() && g.target != GenerateTarget::Completions {
        return Err(Error::usage(
            "generate: a shell is given only with completions",
        ));
    }
    let (target, mode, files, raw) = match g.target {
        GenerateTarget::Completions => {
            let shell = g.shell.unwrap_or(Shell::Bash);
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "pgkeep", &mut buf);
            let name = match shell {
                Shell::Bash => "pgkeep",
                Shell::Zsh => "_pgkeep",
                Shell::Fish => "pgkeep.fish",
                Shell::Elvish => "pgkeep.elv",
                Shell::PowerShell => "_pgkeep.ps1",
                _ => "pgkeep.completion",
            };
            let contents = String::from_utf8_lossy(&buf).into_owned();
            (
                "completions",
                None,
                vec![GeneratedFile {
                    name: name.into(),
                    contents,
                }],
                true,
            )
        }
        GenerateTarget::Man => {
            // pgkeep.1, then a page per subcommand (pgkeep-backup.1, pgkeep-repo-init.1, ...)
            // with --output; on stdout only pgkeep.1.
            fn pages(cmd: &clap::Command, out: &mut Vec<GeneratedFile>) -> std::io::Result<()> {
                let man = clap_mangen::Man::new(cmd.clone());
                let mut buf = Vec::new();
                man.render(&mut buf)?;
                out.push(GeneratedFile {
                    name: man.get_filename(),
                    contents: String::from_utf8_lossy(&buf).into_owned(),
                });
                let shown = |s: &&clap::Command| !s.is_hide_set() && s.get_name() != "help";
                for sub in cmd.get_subcommands().filter(shown) {
                    pages(sub, out)?;
                }
                Ok(())
            }
            let mut cmd = Cli::command();
            cmd.build();
            let mut files = Vec::new();
            pages(&cmd, &mut files).map_err(|e| Error::io("rendering the man pages", e))?;
            if g.output.is_none() {
                files.truncate(1);
            }
            ("man", None, files, true)
        }
        t => {
            let target = match t {
                GenerateTarget::Systemd => Target::Systemd,
                GenerateTarget::Cron => Target::Cron,
                _ => Target::K8s,
            };
            let mode = match g.mode {
                Some(GenerateMode::Daemon) => Mode::Daemon,
                Some(GenerateMode::Jobs) => Mode::Jobs,
                None => Mode::default_for(target),
            };
            let Some(config) = ctx.settings.config_file.clone() else {
                return Err(Error::usage_hint(
                    "pgkeep generate needs the configuration file with the [[schedule]] tables or [daemon]",
                    "give --config FILE (or PGKEEP_CONFIG), or write /etc/pgkeep/pgkeep.toml",
                ));
            };
            let absolute = |p: &std::path::Path, what: &str| {
                std::path::absolute(p).map_err(|e| Error::io(format!("resolving {what}"), e))
            };
            let file = pgkeep_core::config::ConfigFile::load(&config)?;
            let config_text = std::fs::read_to_string(&config)
                .map_err(|e| Error::io(format!("reading {}", config.display()), e))?;
            let binary = match &g.binary {
                Some(b) => absolute(b, "--binary")?,
                None => {
                    std::env::current_exe().map_err(|e| Error::io("finding this executable", e))?
                }
            };
            let opts = gen::GenerateOptions {
                target,
                mode,
                binary,
                config_path: absolute(&config, "the configuration file")?,
                config_text,
                image: g.image.clone(),
                user: g.user.clone(),
            };
            let files = gen::generate(&file, &opts)?;
            let name = match target {
                Target::Systemd => "systemd",
                Target::Cron => "cron",
                Target::K8s => "k8s",
            };
            (name, Some(mode), files, false)
        }
    };
    let report = match &g.output {
        None => GenerateReport::printed(target, mode, files, raw),
        Some(dir) => {
            let entries = gen::write_files(dir, &files, g.force)?;
            let next_steps = match (target, mode) {
                ("systemd", Some(m)) => gen::next_steps(Target::Systemd, m, dir, &files),
                ("cron", Some(m)) => gen::next_steps(Target::Cron, m, dir, &files),
                ("k8s", Some(m)) => gen::next_steps(Target::K8s, m, dir, &files),
                ("man", _) => vec![format!(
                    "next: install -m 0644 {}/*.1 /usr/local/share/man/man1/ && mandb -q",
                    dir.display()
                )],
                _ => match files.first().map(|f| f.name.as_str()) {
                    Some("pgkeep") => vec![
                        "next: install it as /usr/share/bash-completion/completions/pgkeep".into(),
                    ],
                    Some("_pgkeep") => vec![
                        "next: install it as /usr/local/share/zsh/site-functions/_pgkeep".into(),
                    ],
                    Some("pgkeep.fish") => vec![
                        "next: install it as /usr/share/fish/vendor_completions.d/pgkeep.fish"
                            .into(),
                    ],
                    _ => Vec::new(),
                },
            };
            GenerateReport {
                target: target.to_string(),
                mode,
                output: Some(dir.clone()),
                files: entries,
                raw,
                next_steps,
            }
        }
    };
    Ok(emit(json, &report))
}

/// `daemon`: needs the configuration file (the schedules are there).
async fn daemon_run(ctx: &Context, env: &Env) -> i32 {
    let json = false;
    let Some(config) = ctx.settings.config_file.clone() else {
        return fail(
            json,
            Error::usage_hint(
                "pgkeep daemon needs a configuration file with [[schedule]] tables or [daemon] listen",
                "give --config FILE (or PGKEEP_CONFIG), or write /etc/pgkeep/pgkeep.toml",
            ),
        );
    };
    let opts = pgkeep_daemon::DaemonOptions {
        config,
        env: env.clone(),
    };
    match pgkeep_daemon::run(&opts).await {
        Ok(()) => 0,
        Err(e) => fail(json, e),
    }
}

/// `drill`: a physical drill, or a dump drill with `--dump`.
async fn drill_run(cli: &Cli, ctx: &Context, d: &DrillArgs) -> Result<drill::DrillReport, Error> {
    let cluster = ctx.settings.cluster.name.clone();
    if let (Some(id), Some(db)) = (&d.dump, &d.db) {
        let opts = drill::dump::DumpDrillOptions {
            cluster,
            id: id.clone(),
            db: db.clone(),
            conninfo: ctx.settings.cluster.pg.clone(),
        };
        return drill::dump::drill_dump(ctx, &opts, progress(cli).as_ref()).await;
    }
    let opts = drill::DrillOptions {
        cluster,
        id: d.id.clone().unwrap_or_else(|| "latest".into()),
        target: recovery_target(
            d.target_time.as_deref(),
            d.target_lsn.as_deref(),
            d.target_xid.as_deref(),
            d.target_name.as_deref(),
            false,
        )?,
        scratch_dir: d.scratch_dir.clone(),
        threads: ctx.settings.threads,
    };
    drill::drill(ctx, &opts, progress(cli).as_ref()).await
}

fn pitr_options(
    ctx: &Context,
    r: &RestoreArgs,
) -> Result<pgkeep_core::commands::pitr::PitrOptions, Error> {
    use pgkeep_core::commands::pitr;
    use pgkeep_pg::recovery::{TargetAction as Action, TargetTimeline};
    let target = recovery_target(
        r.target_time.as_deref(),
        r.target_lsn.as_deref(),
        r.target_xid.as_deref(),
        r.target_name.as_deref(),
        r.target_immediate,
    )?;
    let action = r.target_action.map(|a| match a {
        TargetAction::Promote => Action::Promote,
        TargetAction::Pause => Action::Pause,
        TargetAction::Shutdown => Action::Shutdown,
    });
    let timeline = match r.target_timeline.as_deref() {
        None => None,
        Some("latest") => Some(TargetTimeline::Latest),
        Some("current") => Some(TargetTimeline::Current),
        Some(n) => Some(TargetTimeline::Id(n.parse().map_err(|_| {
            Error::usage(format!(
                "--target-timeline {n:?}: use latest, current or a timeline number"
            ))
        })?)),
    };
    if let Some(c) = &r.primary_conninfo {
        pgkeep_core::secrets::check_conninfo(c, "--primary-conninfo").map_err(|_| {
            Error::usage_hint(
                "--primary-conninfo: the connection string holds a password, which is refused (it would show in the process list and in postgresql.auto.conf)",
                "remove it and put the password in the standby server user's ~/.pgpass, or name a file with passfile=... in the connection string",
            )
        })?;
    }
    Ok(pitr::PitrOptions {
        target,
        action,
        timeline,
        restore_command: pitr::restore_command_for(ctx)?,
        standby: r.standby,
        primary_conninfo: r.primary_conninfo.clone(),
    })
}

/// Prints an error on stderr (and as the JSON document with `--json`); returns its code.
fn fail(json: bool, err: Error) -> i32 {
    fail_report(json, &ErrorReport::from_anyhow(&anyhow::Error::from(err)))
}

fn fail_report(json: bool, report: &ErrorReport) -> i32 {
    if json {
        let doc = serde_json::json!({ "error": report });
        // Not println!: it panics when the reader has gone; the error is on stderr anyway.
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        );
    }
    eprint!("{}", report.render());
    report.exit_code
}

/// A writer for log lines that masks credentials, as a last line of defence.
struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = pgkeep_core::secrets::redact(&String::from_utf8_lossy(buf));
        std::io::stderr().lock().write_all(text.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The log filter for a level: pgkeep's crates at `level`, other crates no chattier than
/// `warn` (their debug output may quote requests; ours is written to be safe).
fn filter(level: &str) -> EnvFilter {
    let others = match level {
        "off" | "error" => level,
        _ => "warn",
    };
    let spec = format!(
        "{others},pgkeep={level},pgkeep_core={level},pgkeep_repo={level},pgkeep_storage={level},pgkeep_pg={level},pgkeep_notify={level}"
    );
    EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("warn"))
}

fn main() {
    let cli = Cli::parse();
    let json = cli.global.json;
    let env = Env::from_process();
    let flags = cli.overrides();

    // Logging starts before the configuration is read (it may warn) at the level the flags
    // or PGKEEP_LOG give, and is switched to the configured level once known.
    let early = flags
        .log_level
        .clone()
        .or_else(|| env.get(pgkeep_core::config::env::LOG))
        .unwrap_or_else(|| pgkeep_core::config::DEFAULT_LOG_LEVEL.to_string());
    let (layer, handle) = reload::Layer::new(filter(&early.to_ascii_lowercase()));
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(|| RedactingStderr)
                .with_target(false)
                .with_ansi(false),
        )
        .init();

    // Completions and man pages come from the command-line definitions alone: a broken or
    // missing configuration file must not stand in their way.
    let standalone = matches!(
        &cli.command,
        Command::Generate(g) if matches!(g.target, GenerateTarget::Completions | GenerateTarget::Man)
    );
    let loaded = if standalone {
        pgkeep_core::config::Settings::resolve(None, &Env::default(), &Overrides::default())
            .map(|s| Context::new(s, Default::default()))
    } else {
        Context::load(&flags, &env)
    };
    let ctx = match loaded {
        Ok(ctx) => ctx,
        // A monitor reads exit 2 as CRITICAL: a check that cannot even start is UNKNOWN.
        Err(e) if matches!(&cli.command, Command::Check(c) if c.nagios) => {
            println!("{}", nagios_unknown(&e));
            std::process::exit(pgkeep_core::error::nagios::UNKNOWN)
        }
        Err(e) => std::process::exit(fail(json, e)),
    };
    let _ = handle.reload(filter(&ctx.settings.log_level));

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(ctx.settings.threads.max(2))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => std::process::exit(fail(json, Error::io("starting the async runtime", e))),
    };
    if matches!(cli.command, Command::Daemon) {
        // The daemon handles its own signals (SIGHUP reloads; SIGTERM ends it with 0).
        let code = runtime.block_on(daemon_run(&ctx, &env));
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        std::process::exit(code);
    }
    let code = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| Error::io("installing the SIGTERM handler", e));
        let terminated = async {
            match term.as_mut() {
                Ok(t) => {
                    t.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        let start = cli.run_start(&ctx);
        let interrupted = tokio::select! {
            // Signals first: Ctrl-C on a terminal also stops the children (pg_dump,
            // pg_basebackup), and the command failing of that in the same wake-up is the
            // interruption (130), not a failure of its own (1).
            biased;
            _ = tokio::signal::ctrl_c() => "interrupted",
            _ = terminated => "terminated",
            r = run(&cli, &ctx, start.as_ref()) => {
                let code = match r {
                    Ok(code) => code,
                    Err(e) => fail(json, e),
                };
                // An error path may have dropped a lock without releasing it.
                finish_cleanups().await;
                return code;
            }
        };
        // The command's future is dropped: its guards have started their clean-ups (lock
        // releases, children killed), which run while the record of the run is written.
        tokio::join!(
            record_interrupted(&ctx, start.as_ref(), interrupted),
            finish_cleanups()
        );
        fail(json, Error::new(ErrorKind::Interrupted, interrupted))
    });
    // Blocking work the dropped future left (file reads and writes) gets a moment to stop.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}
