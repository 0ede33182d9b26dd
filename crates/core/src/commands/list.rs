//! `pgkeep list` and `pgkeep info <ID|latest>`.

use std::fmt;

use chrono::{DateTime, Utc};
use pgkeep_repo::Repository;
use serde::{Deserialize, Serialize};

use crate::context::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{
    self, BackupManifest, BackupTotals, ManifestHeader, PageFailure, TablespaceEntry, KIND_PHYSICAL,
};
use crate::progress::human_bytes;

/// Options of `list`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListOptions {
    /// The cluster whose backups are listed.
    pub cluster: String,
}

/// One backup or dump in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct BackupSummary {
    /// Backup id.
    pub id: String,
    /// `physical`, or another manifest kind.
    pub kind: String,
    /// User label.
    pub label: Option<String>,
    /// Start time.
    pub start_time: Option<DateTime<Utc>>,
    /// Stop time.
    pub stop_time: Option<DateTime<Utc>>,
    /// Logical bytes (physical: data files; other kinds: what they record).
    pub logical_bytes: Option<u64>,
    /// Bytes new to the repository when it was taken.
    pub new_bytes: Option<u64>,
    /// Bytes it added to the repository (compressed and sealed): what keeping it costs.
    pub stored_bytes: Option<u64>,
    /// Start LSN (physical).
    pub start_lsn: Option<String>,
    /// Stop LSN (physical).
    pub stop_lsn: Option<String>,
    /// Data pages whose checksum failed (physical).
    pub page_checksum_failures: Option<usize>,
}

impl BackupSummary {
    fn from_header(h: &ManifestHeader, v: &serde_json::Value) -> Self {
        let totals = v.get("totals");
        let u = |k: &str| totals.and_then(|t| t.get(k)).and_then(|x| x.as_u64());
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        BackupSummary {
            id: h.id.clone(),
            kind: h.kind.clone(),
            label: h.label.clone(),
            start_time: h.start_time,
            stop_time: h.stop_time,
            logical_bytes: u("logical_bytes"),
            new_bytes: u("new_bytes"),
            stored_bytes: u("stored_bytes"),
            start_lsn: s("start_lsn"),
            stop_lsn: s("stop_lsn"),
            page_checksum_failures: v
                .get("page_checksum_failures")
                .and_then(|x| x.as_array())
                .map(|a| a.len()),
        }
    }
}

/// A manifest that could not be read back (failed authentication, did not parse).
#[derive(Debug, Clone, Serialize)]
pub struct DamagedManifest {
    /// Backup id (the object's name).
    pub id: String,
    /// Why it cannot be read.
    pub error: String,
}

/// What `list` found.
#[derive(Debug, Clone, Serialize)]
pub struct ListReport {
    /// The cluster.
    pub cluster: String,
    /// Backups and dumps, oldest first (newest last).
    pub backups: Vec<BackupSummary>,
    /// Manifests that exist but cannot be read: listed, not hidden, and exit 13.
    pub damaged: Vec<DamagedManifest>,
}

impl fmt::Display for ListReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.damaged {
            writeln!(f, "{:<18} DAMAGED: {}", d.id, d.error)?;
        }
        if self.backups.is_empty() {
            return writeln!(f, "no backups of cluster {}", self.cluster);
        }
        writeln!(
            f,
            "{:<18} {:<9} {:>10} {:>10} {:>8}  {:<22} label",
            "id", "kind", "size", "new", "secs", "stop lsn"
        )?;
        for b in &self.backups {
            let secs = match (b.start_time, b.stop_time) {
                (Some(a), Some(z)) => format!("{}", (z - a).num_seconds()),
                _ => "-".into(),
            };
            writeln!(
                f,
                "{:<18} {:<9} {:>10} {:>10} {:>8}  {:<22} {}",
                b.id,
                b.kind,
                b.logical_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
                b.new_bytes.map(human_bytes).unwrap_or_else(|| "-".into()),
                secs,
                b.stop_lsn.as_deref().unwrap_or("-"),
                b.label.as_deref().unwrap_or("")
            )?;
        }
        Ok(())
    }
}

impl Report for ListReport {
    fn failure(&self) -> Option<Error> {
        (!self.damaged.is_empty()).then(|| {
            let ids: Vec<&str> = self.damaged.iter().map(|d| d.id.as_str()).collect();
            Error::with_hint(
                ErrorKind::Integrity,
                format!(
                    "{} manifest(s) of cluster {} cannot be read: {}",
                    ids.len(),
                    self.cluster,
                    ids.join(", ")
                ),
                "the other backups are listed above and restore by id; run `pgkeep repo check --read-data` to see what else is damaged",
            )
        })
    }
}

/// Lists the backups and dumps of `opts.cluster`, newest last. A manifest that fails
/// authentication or does not parse is reported in `damaged` instead of failing the whole
/// listing: in a disaster the user must still see what else there is.
pub async fn list(repo: &Repository, opts: &ListOptions) -> Result<ListReport> {
    let ids = manifest::list_ids(repo, &opts.cluster).await?;
    let loads = ids.iter().map(|id| async move {
        let v = repo.load_manifest(&opts.cluster, id).await;
        (id, v)
    });
    let (mut backups, mut damaged) = (Vec::new(), Vec::new());
    for (id, v) in futures::future::join_all(loads).await {
        let parsed = match v {
            Ok(v) => serde_json::from_value::<ManifestHeader>(v.clone())
                .map(|h| (h, v))
                .map_err(|e| format!("does not parse: {e}")),
            Err(e) if e.kind() == pgkeep_repo::ErrorKind::Integrity => Err(e.to_string()),
            Err(e) => return Err(e.into()),
        };
        match parsed {
            Ok((h, v)) => backups.push(BackupSummary::from_header(&h, &v)),
            Err(error) => damaged.push(DamagedManifest {
                id: id.clone(),
                error: error.lines().next().unwrap_or_default().to_string(),
            }),
        }
    }
    Ok(ListReport {
        cluster: opts.cluster.clone(),
        backups,
        damaged,
    })
}

/// Options of `info`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InfoOptions {
    /// The cluster.
    pub cluster: String,
    /// A backup id or `latest` (the newest backup of any kind).
    pub id: String,
}

/// Details of one physical backup (the manifest without its file list).
#[derive(Debug, Clone, Serialize)]
pub struct PhysicalInfo {
    /// How it was taken.
    pub method: String,
    /// Host that took it.
    pub host: String,
    /// pgkeep version.
    pub tool_version: String,
    /// System identifier (decimal text).
    pub system_identifier: String,
    /// server_version_num.
    pub pg_version_num: u32,
    /// Timeline.
    pub timeline: u32,
    /// Start LSN.
    pub start_lsn: String,
    /// Stop LSN.
    pub stop_lsn: String,
    /// Seconds it took.
    pub duration_secs: f64,
    /// Whether the cluster has page checksums.
    pub data_checksums: bool,
    /// Tablespaces.
    pub tablespaces: Vec<TablespaceEntry>,
    /// WAL file names stored with it.
    pub wal: Vec<String>,
    /// Totals.
    pub totals: BackupTotals,
    /// Failed pages.
    pub page_checksum_failures: Vec<PageFailure>,
    /// The backup_label.
    pub backup_label: String,
}

/// What `info` found.
#[derive(Debug, Clone, Serialize)]
pub struct InfoReport {
    /// The cluster.
    pub cluster: String,
    /// The summary line's fields.
    pub backup: BackupSummary,
    /// Details when it is a physical backup.
    pub physical: Option<PhysicalInfo>,
    /// Details when it is a logical dump.
    pub dump: Option<crate::commands::dump::DumpDetails>,
}

impl fmt::Display for InfoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.backup;
        writeln!(
            f,
            "backup      {} ({}) of cluster {}",
            b.id, b.kind, self.cluster
        )?;
        if let Some(l) = &b.label {
            writeln!(f, "label       {l}")?;
        }
        if let (Some(a), Some(z)) = (b.start_time, b.stop_time) {
            writeln!(f, "time        {a} .. {z}")?;
        }
        if let Some(p) = &self.physical {
            writeln!(
                f,
                "method      {} on {} (pgkeep {})",
                p.method, p.host, p.tool_version
            )?;
            writeln!(
                f,
                "postgresql  {} system id {} timeline {}",
                p.pg_version_num, p.system_identifier, p.timeline
            )?;
            writeln!(f, "lsn         {} .. {}", p.start_lsn, p.stop_lsn)?;
            let t = &p.totals;
            writeln!(
                f,
                "size        {} in {} files; {} new, {} stored; {} files unchanged since the previous backup",
                human_bytes(t.logical_bytes),
                t.files,
                human_bytes(t.new_bytes),
                human_bytes(t.stored_bytes),
                t.files_skipped_unchanged
            )?;
            writeln!(
                f,
                "wal         {} files, {}",
                t.wal_files,
                human_bytes(t.wal_bytes)
            )?;
            writeln!(f, "duration    {:.1} s", p.duration_secs)?;
            for ts in &p.tablespaces {
                writeln!(f, "tablespace  {} -> {}", ts.oid, ts.location)?;
            }
            if !p.data_checksums {
                writeln!(f, "checksums   off (pages not verified)")?;
            }
            for pf in &p.page_checksum_failures {
                writeln!(
                    f,
                    "BAD PAGE    {} block {}: {}",
                    pf.path, pf.block, pf.reason
                )?;
            }
        }
        if let Some(d) = &self.dump {
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl Report for InfoReport {
    fn has_warnings(&self) -> bool {
        self.physical
            .as_ref()
            .is_some_and(|p| !p.page_checksum_failures.is_empty())
    }
}

/// Details of backup `opts.id` (`latest`: the newest backup of any kind).
pub async fn info(repo: &Repository, opts: &InfoOptions) -> Result<InfoReport> {
    let id = if opts.id == "latest" {
        manifest::list_ids(repo, &opts.cluster)
            .await?
            .pop()
            .ok_or_else(|| {
                Error::with_hint(
                    ErrorKind::Failure,
                    format!("cluster {} has no backup in this repository", opts.cluster),
                    "take one with `pgkeep backup`, or check --cluster",
                )
            })?
    } else {
        opts.id.clone()
    };
    let v = repo.load_manifest(&opts.cluster, &id).await.map_err(|e| {
        if e.kind() == pgkeep_repo::ErrorKind::NotFound {
            Error::with_hint(
                ErrorKind::Failure,
                format!("backup {id} of cluster {} not found", opts.cluster),
                "`pgkeep list` shows the backups",
            )
        } else {
            e.into()
        }
    })?;
    let header: ManifestHeader = serde_json::from_value(v.clone()).map_err(|e| {
        Error::new(
            ErrorKind::Integrity,
            format!("manifest of {id} does not parse: {e}"),
        )
    })?;
    let backup = BackupSummary::from_header(&header, &v);
    let dump = crate::commands::dump::DumpDetails::from_value(&v);
    let physical = if header.kind == KIND_PHYSICAL {
        let m = BackupManifest::from_value(v)?;
        Some(PhysicalInfo {
            method: m.method,
            host: m.host,
            tool_version: m.tool_version,
            system_identifier: m.system_identifier,
            pg_version_num: m.pg_version_num,
            timeline: m.timeline,
            start_lsn: m.start_lsn,
            stop_lsn: m.stop_lsn,
            duration_secs: m.duration_secs,
            data_checksums: m.data_checksums,
            tablespaces: m.tablespaces,
            wal: m.wal.into_iter().map(|w| w.name).collect(),
            totals: m.totals,
            page_checksum_failures: m.page_checksum_failures,
            backup_label: m.backup_label,
        })
    } else {
        None
    };
    Ok(InfoReport {
        cluster: opts.cluster.clone(),
        backup,
        physical,
        dump,
    })
}
