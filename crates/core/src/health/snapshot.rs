//! What the repository (and the local host) say about one cluster, gathered once and read
//! by `check`, `status` and `metrics`: the backups and dumps with their sizes and
//! durations, the run history, the WAL archive's newest segment, the repository's size,
//! locks and free space. Reads only; no server connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use pgkeep_repo::{LockInfo, Repository};
use serde::Serialize;

use crate::commands::archive::parse_wal_key;
use crate::commands::dump::KIND_DUMP;
use crate::context::Context;
use crate::error::Result;
use crate::history::{self, HistoryFilter, RunKind, RunRecord, RunResult};
use crate::manifest::{self, KIND_PHYSICAL};
use pgkeep_pg::wal::WalFileName;

/// One backup or one database of a dump, as the health figures need it.
#[derive(Debug, Clone, Serialize)]
pub struct BackupPoint {
    /// Backup or dump id.
    pub id: String,
    /// When it started.
    pub start_time: Option<DateTime<Utc>>,
    /// When it completed (the manifest's stop time).
    pub stop_time: Option<DateTime<Utc>>,
    /// Size compared between runs: data files of a physical backup, the pg_dump archive of
    /// one database.
    pub bytes: u64,
    /// Bytes the run added to the repository.
    pub stored_bytes: u64,
    /// Seconds it took.
    pub duration_secs: Option<f64>,
}

/// The WAL archive of the cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalState {
    /// Complete segments archived.
    pub segments: u64,
    /// Bytes of WAL objects in the repository.
    pub bytes: u64,
    /// The newest complete segment (highest timeline, then position).
    pub newest_segment: Option<String>,
    /// When the newest object of the archive was written (the store's clock).
    pub newest_time: Option<DateTime<Utc>>,
}

/// Size of the repository, by top-level prefix (`packs`, `index`, `wal`, ...).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepoSize {
    /// Every object.
    pub bytes: u64,
    /// Number of objects.
    pub objects: u64,
    /// Per top-level prefix: (objects, bytes).
    pub by_prefix: BTreeMap<String, (u64, u64)>,
}

/// Free space of a local file system.
#[derive(Debug, Clone, Serialize)]
pub struct Space {
    /// The directory asked about.
    pub path: PathBuf,
    /// Bytes available to an unprivileged user.
    pub free_bytes: u64,
    /// Size of the file system.
    pub total_bytes: u64,
}

impl Space {
    /// Free space in percent of the file system.
    pub fn free_percent(&self) -> f64 {
        if self.total_bytes == 0 {
            return 100.0;
        }
        self.free_bytes as f64 * 100.0 / self.total_bytes as f64
    }
}

/// Everything gathered about one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Cluster name.
    pub cluster: String,
    /// When it was gathered.
    pub now: DateTime<Utc>,
    /// Complete physical backups, oldest first.
    pub physical: Vec<BackupPoint>,
    /// Dumps per database, oldest first (a `dump --all` counts for each of its databases).
    pub dumps: BTreeMap<String, Vec<BackupPoint>>,
    /// The run history, oldest first.
    pub history: Vec<RunRecord>,
    /// The WAL archive.
    pub wal: WalState,
    /// The whole repository (all clusters).
    pub repo: RepoSize,
    /// Repository locks.
    pub locks: Vec<LockInfo>,
    /// Free space where a local repository lives.
    pub repo_space: Option<Space>,
    /// Free space where the archiving spool lives.
    pub spool_space: Option<Space>,
    /// Error verdicts waiting in the spool (`out/<cluster>/*.error`).
    pub spool_errors: Option<u64>,
}

impl Snapshot {
    /// The newest record of `kind` (and `database`).
    pub fn last_run(&self, kind: RunKind, database: Option<&str>) -> Option<&RunRecord> {
        self.history
            .iter()
            .rev()
            .find(|r| r.kind == kind && r.database.as_deref() == database)
    }

    /// The newest successful record of `kind` (and `database`).
    pub fn last_success(&self, kind: RunKind, database: Option<&str>) -> Option<&RunRecord> {
        self.history.iter().rev().find(|r| {
            r.kind == kind
                && r.database.as_deref() == database
                && matches!(r.result, RunResult::Ok | RunResult::Warning)
        })
    }
}

/// Gathers the snapshot of the context's cluster from an open repository.
pub async fn gather(ctx: &Context, repo: &Repository) -> Result<Snapshot> {
    let cluster = ctx.settings.cluster.name.clone();
    let headers = manifest::load_headers(repo, &cluster).await?;
    let (physical, dumps) = backup_points(&headers);
    let history = history::load(repo, &cluster, &HistoryFilter::default())
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let listing = repo.storage().list("").await?;
    let (wal, size) = sizes(&cluster, &listing);
    let locks = repo.list_locks().await?;
    let repo_url = ctx.repository()?.url.clone();
    let spool = ctx.settings.spool_dir.clone();
    Ok(Snapshot {
        cluster: cluster.clone(),
        now: Utc::now(),
        physical,
        dumps,
        history,
        wal,
        repo: size,
        locks,
        repo_space: local_path(&repo_url).and_then(|p| free_space(&p)),
        spool_space: spool.as_deref().and_then(free_space),
        spool_errors: spool.as_deref().map(|s| spool_error_count(s, &cluster)),
    })
}

type Points = (Vec<BackupPoint>, BTreeMap<String, Vec<BackupPoint>>);

fn backup_points(headers: &[(manifest::ManifestHeader, serde_json::Value)]) -> Points {
    let mut physical = Vec::new();
    let mut dumps: BTreeMap<String, Vec<BackupPoint>> = BTreeMap::new();
    let secs = |h: &manifest::ManifestHeader| match (h.start_time, h.stop_time) {
        (Some(a), Some(z)) => Some((z - a).num_milliseconds() as f64 / 1000.0),
        _ => None,
    };
    for (h, v) in headers {
        let total = |k: &str| {
            v.get("totals")
                .and_then(|t| t.get(k))
                .and_then(|x| x.as_u64())
                .unwrap_or(0)
        };
        if h.kind == KIND_PHYSICAL {
            physical.push(BackupPoint {
                id: h.id.clone(),
                start_time: h.start_time,
                stop_time: h.stop_time,
                bytes: total("logical_bytes"),
                stored_bytes: total("stored_bytes"),
                duration_secs: secs(h),
            });
        } else if h.kind == KIND_DUMP {
            let dbs = v.get("databases").and_then(|d| d.as_array());
            for db in dbs.into_iter().flatten() {
                let Some(name) = db.get("name").and_then(|n| n.as_str()) else {
                    continue;
                };
                let u = |k: &str| db.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
                dumps
                    .entry(name.to_string())
                    .or_default()
                    .push(BackupPoint {
                        id: h.id.clone(),
                        start_time: h.start_time,
                        stop_time: h.stop_time,
                        bytes: u("dump_bytes"),
                        stored_bytes: total("stored_bytes"),
                        duration_secs: db
                            .get("duration_secs")
                            .and_then(|x| x.as_f64())
                            .or_else(|| secs(h)),
                    });
            }
        }
    }
    (physical, dumps)
}

fn sizes(cluster: &str, listing: &[pgkeep_storage::ObjectMeta]) -> (WalState, RepoSize) {
    let mut wal = WalState::default();
    let mut size = RepoSize::default();
    let mut newest = None;
    for m in listing {
        size.bytes += m.size;
        size.objects += 1;
        let top = m.key.split('/').next().unwrap_or_default().to_string();
        let e = size.by_prefix.entry(top).or_default();
        e.0 += 1;
        e.1 += m.size;
        let Some(name) = parse_wal_key(cluster, &m.key) else {
            continue;
        };
        wal.bytes += m.size;
        wal.newest_time = wal.newest_time.max(Some(m.last_modified));
        if let WalFileName::Segment(s) = name {
            wal.segments += 1;
            newest = newest.max(Some(s));
        }
    }
    wal.newest_segment = newest.map(|s| s.to_string());
    (wal, size)
}

/// The directory of a local repository URL (a path or `file://`), else `None`.
fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(p) = url.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    (!url.contains("://")).then(|| PathBuf::from(url))
}

/// Free space of the file system holding `path` (statvfs), `None` when it cannot be asked.
pub fn free_space(path: &Path) -> Option<Space> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some(Space {
        path: path.to_path_buf(),
        free_bytes: st.f_bavail as u64 * frsize,
        total_bytes: st.f_blocks as u64 * frsize,
    })
}

fn spool_error_count(spool: &Path, cluster: &str) -> u64 {
    std::fs::read_dir(spool.join("out").join(cluster))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".error"))
                .count() as u64
        })
        .unwrap_or(0)
}
