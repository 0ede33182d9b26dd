//! The manifest of a physical backup: the commit point that makes a backup exist.
//!
//! A manifest is stored by [`Repository::save_manifest`] under `backups/<cluster>/<id>` once
//! every blob it references is committed (write order: packs, index, manifest). It is JSON,
//! sealed like all metadata, and versioned by [`MANIFEST_FORMAT`]. It never holds a secret:
//! no connection string, no password, only what PostgreSQL and the file system told us.
//!
//! Every manifest kind (physical backups here, logical dumps elsewhere) shares the header
//! fields read by [`ManifestHeader`] (`format`, `kind`, `id`, `cluster`, `label`,
//! `start_time`, `stop_time`), so `list` can show all kinds without knowing them all.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use pgkeep_repo::{ManifestKey, Repository, StreamRef};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// Version of the physical manifest layout. Readers refuse newer versions.
pub const MANIFEST_FORMAT: u32 = 1;

/// `kind` of a physical backup manifest.
pub const KIND_PHYSICAL: &str = "physical";

/// Format of backup ids: a UTC timestamp to the second, e.g. `20261122T143107Z`.
pub const ID_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// The fields every manifest kind has; unknown fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestHeader {
    /// Layout version of this kind.
    pub format: u32,
    /// `physical`, or another kind (e.g. a logical dump).
    pub kind: String,
    /// Backup id (the manifest's key).
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// User label.
    #[serde(default)]
    pub label: Option<String>,
    /// When the backup started.
    #[serde(default)]
    pub start_time: Option<DateTime<Utc>>,
    /// When the backup ended.
    #[serde(default)]
    pub stop_time: Option<DateTime<Utc>>,
    /// PostgreSQL system identifier, as decimal text (when the kind records one).
    #[serde(default)]
    pub system_identifier: Option<String>,
    /// PostgreSQL major version (when the kind records one).
    #[serde(default)]
    pub pg_major: Option<u32>,
}

impl ManifestHeader {
    /// Refuses other kinds than physical and newer formats than this pgkeep reads.
    fn check_physical(&self) -> Result<()> {
        if self.kind != KIND_PHYSICAL {
            return Err(Error::usage(format!(
                "{} of cluster {} is a {} backup, not a physical one",
                self.id, self.cluster, self.kind
            )));
        }
        if self.format > MANIFEST_FORMAT {
            return Err(Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "backup {} has manifest format {}, this pgkeep reads up to {MANIFEST_FORMAT}",
                    self.id, self.format
                ),
                "upgrade pgkeep",
            ));
        }
        Ok(())
    }
}

/// What a manifest entry is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file; has a stream.
    File,
    /// A directory.
    Dir,
    /// A symbolic link; has a target.
    Symlink,
}

/// One file system entry of the data directory or a tablespace.
///
/// `path` is relative to the data directory with `/` separators; tablespace contents appear
/// under `pg_tblspc/<oid>/...` (through the tablespace's symlink).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative path.
    pub path: String,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Bytes stored (for files: the stream's size, which is what was read).
    #[serde(default)]
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time seen before reading, seconds since the epoch.
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    #[serde(default)]
    pub mtime_nsec: u32,
    /// Symlink target, as read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The content, for files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamRef>,
}

/// One tablespace: `pg_tblspc/<oid>` links to `location`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceEntry {
    /// The tablespace OID (the symlink's name).
    pub oid: u32,
    /// The directory the symlink pointed to at backup time.
    pub location: String,
}

/// One WAL file (segment or timeline history) stored with the backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WalEntry {
    /// File name in pg_wal, e.g. `000000010000000000000003`.
    pub name: String,
    /// Size of the file to restore; bytes past the stream are zeros. The last segment of a
    /// backup is stored only up to the WAL page holding the stop LSN: the rest of a recycled
    /// segment is stale WAL, and zeros are where recovery sees the end of WAL.
    pub size: u64,
    /// Its content (a prefix of the file).
    pub stream: StreamRef,
}

/// A data page whose checksum failed while it was read (read twice, failed twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageFailure {
    /// Relative path of the relation segment file.
    pub path: String,
    /// Block number inside the file (0-based).
    pub block: u32,
    /// Absolute block number in the relation (`segment * RELSEG_SIZE + block`).
    pub rel_block: u32,
    /// What was wrong, e.g. `checksum 0x1234 stored, 0x5678 computed`.
    pub reason: String,
}

/// Totals of one backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupTotals {
    /// Bytes of all files (the size a restore writes, WAL excluded).
    pub logical_bytes: u64,
    /// Regular files.
    pub files: u64,
    /// Directories and symlinks.
    pub other_entries: u64,
    /// Files not read because they were unchanged since the previous backup.
    pub files_skipped_unchanged: u64,
    /// Their bytes.
    pub bytes_skipped_unchanged: u64,
    /// Bytes actually read from the data directory.
    pub bytes_read: u64,
    /// WAL files stored with the backup and their bytes.
    pub wal_files: u64,
    /// Bytes of WAL stored with the backup.
    pub wal_bytes: u64,
    /// Plaintext bytes that were new to the repository.
    pub new_bytes: u64,
    /// Bytes uploaded (compressed and sealed, with pack headers).
    pub stored_bytes: u64,
}

/// The manifest of a physical backup (`kind = "physical"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupManifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// [`KIND_PHYSICAL`].
    pub kind: String,
    /// Backup id, see [`ID_FORMAT`].
    pub id: String,
    /// Cluster name in the repository.
    pub cluster: String,
    /// How it was taken: `local` (read from the data directory).
    pub method: String,
    /// User label.
    pub label: Option<String>,
    /// Host that took the backup.
    pub host: String,
    /// pgkeep version that wrote this manifest.
    pub tool_version: String,
    /// `pg_control`'s system identifier, decimal text (u64 does not survive every JSON reader).
    pub system_identifier: String,
    /// `server_version_num`, e.g. 150004.
    pub pg_version_num: u32,
    /// Major version, e.g. 15.
    pub pg_major: u32,
    /// Timeline of the backup's start.
    pub timeline: u32,
    /// WAL segment size of the cluster.
    pub wal_segment_size: u32,
    /// Whether the cluster has data page checksums.
    pub data_checksums: bool,
    /// Start LSN (PostgreSQL text form `X/X`).
    pub start_lsn: String,
    /// Stop LSN.
    pub stop_lsn: String,
    /// Wall-clock time just before `pg_backup_start` (the timestamp-safety reference of the
    /// next backup's unchanged-file check).
    pub start_time: DateTime<Utc>,
    /// Wall-clock time after `pg_backup_stop`.
    pub stop_time: DateTime<Utc>,
    /// Seconds from start to the manifest save.
    pub duration_secs: f64,
    /// The `backup_label` returned by `pg_backup_stop`.
    pub backup_label: String,
    /// The `tablespace_map` returned by `pg_backup_stop` (none without tablespaces).
    pub tablespace_map: Option<String>,
    /// Tablespaces.
    pub tablespaces: Vec<TablespaceEntry>,
    /// Files, directories and symlinks, sorted by path.
    pub files: Vec<FileEntry>,
    /// WAL from the start to the stop segment (and the timeline history file when > 1).
    pub wal: Vec<WalEntry>,
    /// Totals.
    pub totals: BackupTotals,
    /// Data pages whose checksum failed.
    pub page_checksum_failures: Vec<PageFailure>,
}

impl BackupManifest {
    /// Parses a manifest body, refusing other kinds and newer formats.
    pub fn from_value(value: serde_json::Value) -> Result<Self> {
        let header = ManifestHeader::deserialize(&value).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("manifest does not parse: {e}"),
            )
        })?;
        header.check_physical()?;
        serde_json::from_value(value).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("manifest of backup {} does not parse: {e}", header.id),
            )
        })
    }

    /// Parses a manifest body from its JSON text, as [`BackupManifest::from_value`] does,
    /// without building a JSON value of every file first (several times the typed size).
    pub fn from_slice(plain: &[u8]) -> Result<Self> {
        let header: ManifestHeader = serde_json::from_slice(plain).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("manifest does not parse: {e}"),
            )
        })?;
        header.check_physical()?;
        serde_json::from_slice(plain).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("manifest of backup {} does not parse: {e}", header.id),
            )
        })
    }

    /// Files by path.
    pub fn files_by_path(&self) -> BTreeMap<&str, &FileEntry> {
        self.files.iter().map(|f| (f.path.as_str(), f)).collect()
    }
}

/// A new backup id for `now`.
pub fn new_id(now: DateTime<Utc>) -> String {
    now.format(ID_FORMAT).to_string()
}

/// Whether `id` has the shape of a backup id (so ids of unknown shape never steer choices).
pub fn is_backup_id(id: &str) -> bool {
    chrono::NaiveDateTime::parse_from_str(id, ID_FORMAT).is_ok()
}

/// Every manifest key of `cluster`, sorted by id (oldest first).
pub async fn list_ids(repo: &Repository, cluster: &str) -> Result<Vec<String>> {
    let mut ids: Vec<String> = repo
        .list_manifests(Some(cluster))
        .await?
        .into_iter()
        .filter(|k: &ManifestKey| k.cluster == cluster)
        .map(|k| k.id)
        .collect();
    ids.sort();
    Ok(ids)
}

/// Manifests read at once by [`load_summaries`].
const SUMMARY_READS: usize = 8;

/// What choosing among backups needs of a body: for dumps `all` and the dumped databases'
/// names, for physical backups the WAL span (`timeline`, `start_lsn`, `stop_lsn`,
/// `wal_segment_size`).
#[derive(Debug, Deserialize, Serialize)]
struct ChoiceFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    all: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    databases: Option<Vec<DumpedName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeline: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stop_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wal_segment_size: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
struct DumpedName {
    name: String,
}

/// Like [`load_headers`], for commands that choose among many backups without reading
/// their contents (expire, copy): each body is reduced to the fields of `ChoiceFacts`
/// (`all`, `databases: [{"name"}]`, the WAL span) while it is parsed, and a few manifests are read at a time, so memory stays that of the
/// headers. A physical manifest lists every file with its blobs; sixty of them as JSON values
/// were most of expire's peak memory.
pub async fn load_summaries(
    repo: &Repository,
    cluster: &str,
) -> Result<Vec<(ManifestHeader, serde_json::Value)>> {
    load_reduced(repo, cluster, summary_of).await
}

/// Reduces a manifest's JSON text to its header and the part of its body a caller keeps.
type BodyReducer =
    fn(&[u8]) -> std::result::Result<(ManifestHeader, serde_json::Value), serde_json::Error>;

/// Every manifest of `cluster`, oldest first, each reduced by `reduce` from its JSON text as it
/// is read, [`SUMMARY_READS`] at a time: the whole bodies are never held together.
async fn load_reduced(
    repo: &Repository,
    cluster: &str,
    reduce: BodyReducer,
) -> Result<Vec<(ManifestHeader, serde_json::Value)>> {
    use futures::{StreamExt, TryStreamExt};
    let ids = list_ids(repo, cluster).await?;
    futures::stream::iter(ids)
        .map(|id| async move {
            let key = ManifestKey {
                cluster: cluster.to_string(),
                id: id.clone(),
            }
            .key();
            let plain = repo.get_sealed(&key, key.as_bytes()).await?;
            reduce(&plain).map_err(|e| {
                Error::new(
                    ErrorKind::Integrity,
                    format!("manifest {cluster}/{id} does not parse: {e}"),
                )
            })
        })
        .buffered(SUMMARY_READS)
        .try_collect()
        .await
}

/// A manifest body (JSON) reduced as [`load_summaries`] does: its header and the fields of
/// `ChoiceFacts`.
pub fn summary_of(
    plain: &[u8],
) -> std::result::Result<(ManifestHeader, serde_json::Value), serde_json::Error> {
    let h: ManifestHeader = serde_json::from_slice(plain)?;
    let f: ChoiceFacts = serde_json::from_slice(plain)?;
    Ok((h, serde_json::to_value(f).expect("facts serialize")))
}

/// Loads the headers of every manifest of `cluster`, oldest first, each with its body
/// except a physical manifest's file list: `files` is parsed past and left empty, so a
/// [`BackupManifest`] made from such a body has the WAL span, stored WAL and totals of the
/// backup but no files (load the chosen backup with [`load_physical`] for those). A few
/// manifests are read at a time. Choosing among backups needs no file list, and sixty
/// bodies of 80,000 files each as JSON values were most of a restore's peak memory.
pub async fn load_headers(
    repo: &Repository,
    cluster: &str,
) -> Result<Vec<(ManifestHeader, serde_json::Value)>> {
    load_reduced(repo, cluster, outline_of).await
}

/// A manifest body (JSON) as [`load_headers`] reduces it: its header, and the body with
/// `files` empty.
pub fn outline_of(
    plain: &[u8],
) -> std::result::Result<(ManifestHeader, serde_json::Value), serde_json::Error> {
    let body: BodyWithoutFiles = serde_json::from_slice(plain)?;
    let value = serde_json::Value::Object(body.0);
    let header = ManifestHeader::deserialize(&value)?;
    Ok((header, value))
}

/// A manifest body parsed with its `files` array skipped (and kept as an empty array, so the
/// body still has the field a [`BackupManifest`] requires).
struct BodyWithoutFiles(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for BodyWithoutFiles {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = BodyWithoutFiles;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a manifest object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut body = serde_json::Map::new();
                while let Some(key) = a.next_key::<String>()? {
                    let value = if key == "files" {
                        a.next_value::<serde::de::IgnoredAny>()?;
                        serde_json::Value::Array(Vec::new())
                    } else {
                        a.next_value()?
                    };
                    body.insert(key, value);
                }
                Ok(BodyWithoutFiles(body))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// The newest physical backup of `cluster`, if any.
pub async fn latest_physical(repo: &Repository, cluster: &str) -> Result<Option<BackupManifest>> {
    // Newest first: the newest manifest is nearly always physical, so one read.
    for id in list_ids(repo, cluster).await?.iter().rev() {
        let plain = repo.load_manifest_text(cluster, id).await?;
        let header: ManifestHeader = serde_json::from_slice(&plain).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("manifest {cluster}/{id} does not parse: {e}"),
            )
        })?;
        if header.kind == KIND_PHYSICAL {
            return Ok(Some(BackupManifest::from_slice(&plain)?));
        }
    }
    Ok(None)
}

/// Loads the physical backup `id_or_latest` (`latest` = the newest physical backup).
pub async fn load_physical(
    repo: &Repository,
    cluster: &str,
    id_or_latest: &str,
) -> Result<BackupManifest> {
    if id_or_latest == "latest" {
        return latest_physical(repo, cluster).await?.ok_or_else(|| {
            Error::with_hint(
                ErrorKind::Failure,
                format!("cluster {cluster} has no physical backup in this repository"),
                "take one with `pgkeep backup`, or check --cluster",
            )
        });
    }
    let plain = repo
        .load_manifest_text(cluster, id_or_latest)
        .await
        .map_err(|e| {
            if e.kind() == pgkeep_repo::ErrorKind::NotFound {
                Error::with_hint(
                    ErrorKind::Failure,
                    format!("backup {id_or_latest} of cluster {cluster} not found"),
                    "`pgkeep list` shows the backups",
                )
            } else {
                e.into()
            }
        })?;
    BackupManifest::from_slice(&plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_utc_timestamps_that_sort() {
        let t = DateTime::parse_from_rfc3339("2026-11-22T14:31:07.9+01:00").unwrap();
        let id = new_id(t.with_timezone(&Utc));
        assert_eq!(id, "20261122T133107Z");
        assert!(is_backup_id(&id));
        assert!(!is_backup_id("latest"));
        assert!(!is_backup_id("20261122T133107"));
        assert!("20261122T133107Z" < "20261122T133108Z");
    }

    #[test]
    fn other_kinds_and_newer_formats_are_refused() {
        let v = serde_json::json!({"format": 1, "kind": "logical", "id": "x", "cluster": "main"});
        let e = BackupManifest::from_value(v).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("logical"), "{e}");
        let v = serde_json::json!({"format": 99, "kind": "physical", "id": "x", "cluster": "main"});
        let e = BackupManifest::from_value(v).unwrap_err();
        assert!(e.to_string().contains("upgrade pgkeep"), "{e}");
    }

    /// Choosing a backup reads every manifest; a physical one's file list is parsed past, and
    /// what choosing needs (header, WAL span, stored WAL, totals) is kept.
    #[test]
    fn an_outline_keeps_the_wal_span_and_totals_and_drops_the_file_list() {
        let id = "20261205T093253Z";
        let blob = serde_json::json!({"id": "ab".repeat(32), "len": 8192});
        let file = |n: u32| {
            serde_json::json!({"path": format!("base/5/{n}"), "kind": "file", "size": 8192,
                "mode": 0o600, "mtime": 1, "stream": {"size": 8192, "blobs": [blob.clone()]}})
        };
        let body = serde_json::json!({
            "format": 1, "kind": "physical", "id": id, "cluster": "main", "method": "local",
            "label": null, "host": "h", "tool_version": "0", "system_identifier": "7",
            "pg_version_num": 150004, "pg_major": 15, "timeline": 2, "wal_segment_size": 16777216,
            "data_checksums": true, "start_lsn": "0/26000028", "stop_lsn": "0/26000100",
            "start_time": "2026-12-05T09:32:53Z", "stop_time": "2026-12-05T09:33:03Z",
            "duration_secs": 10.0, "backup_label": "START WAL LOCATION", "tablespace_map": null,
            "tablespaces": [],
            "files": (0..1000).map(file).collect::<Vec<_>>(),
            "wal": [{"name": "000000020000000000000026", "size": 16777216,
                     "stream": {"size": 8192, "blobs": [blob]}}],
            "totals": {"logical_bytes": 8192000, "files": 1000, "other_entries": 0,
                "files_skipped_unchanged": 0, "bytes_skipped_unchanged": 0, "bytes_read": 0,
                "wal_files": 1, "wal_bytes": 8192, "new_bytes": 0, "stored_bytes": 4096},
            "page_checksum_failures": []
        });
        let text = serde_json::to_vec(&body).unwrap();
        let full = BackupManifest::from_slice(&text).unwrap();
        assert_eq!(full.files.len(), 1000);

        let (header, outline) = outline_of(&text).unwrap();
        assert_eq!(
            (header.id.as_str(), header.kind.as_str()),
            (id, KIND_PHYSICAL)
        );
        assert_eq!(outline["files"], serde_json::json!([]));
        let m = BackupManifest::from_value(outline).unwrap();
        assert!(m.files.is_empty());
        assert_eq!((m.timeline, m.start_lsn.as_str()), (2, "0/26000028"));
        assert_eq!(m.stop_lsn, full.stop_lsn);
        assert_eq!(m.wal.len(), 1);
        assert_eq!(m.wal[0].stream, full.wal[0].stream);
        assert_eq!(m.totals.stored_bytes, 4096);
    }

    #[test]
    fn a_manifest_that_is_not_an_object_is_refused_by_the_outline_reader() {
        assert!(outline_of(b"[1, 2]").is_err());
        assert!(outline_of(b"{\"format\": 1, \"files\": [").is_err());
    }
}
