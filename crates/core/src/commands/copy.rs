//! `pgkeep copy --to REPO2 [IDs | --latest | --all] [--wal]`: second copies of backups, dumps
//! and WAL in another repository.
//!
//! The target is another repository with its own backend, passphrase, compression and chunk
//! parameters (made by `repo init`). Blobs are copied through [`pgkeep_repo::copy`]: only the
//! blobs the target lacks are read and sent, and a copy interrupted at any point is finished
//! by a rerun (manifests the target has are skipped; blobs it indexed are not sent again).
//! The target's own `expire` rules apply there: copies are ordinary backups of the target.
//!
//! Locks: a shared lock on the source (a prune there is refused meanwhile, exit 11, so
//! nothing being read disappears) and a shared lock on the target (a writer, like a backup).
//! Pins stay with the source: the target decides its own.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;

use pgkeep_repo::copy::{copy_manifest, copy_sealed_object, sum_stats};
use pgkeep_repo::{BlobTranslation, CopyStats, LockKind, Repository};
use serde::Serialize;

use crate::commands::archive::wal_prefix;
use crate::commands::dump::KIND_DUMP;
use crate::commands::expire::dump_database;
use crate::context::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{self, ManifestHeader, KIND_PHYSICAL};

/// Which backups to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopySelection {
    /// These ids.
    Ids(Vec<String>),
    /// The newest physical backup and the newest dump of each database.
    Latest,
    /// Every backup and dump of the cluster.
    All,
    /// No backup (only WAL, with `wal`).
    None,
}

/// Options of `copy`.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Cluster name in both repositories.
    pub cluster: String,
    /// What to copy.
    pub selection: CopySelection,
    /// Also copy the cluster's WAL archive (every object the target lacks).
    pub wal: bool,
    /// Compression/encryption threads of the target's writer (0: one per core).
    pub threads: usize,
    /// Where the copies go, for the report (a location without credentials).
    pub target_location: String,
}

/// One backup or dump copied (or found already there).
#[derive(Debug, Clone, Serialize)]
pub struct CopiedBackup {
    /// Backup id.
    pub id: String,
    /// `physical` or `dump`.
    pub kind: String,
    /// The dumped database, for dumps of one database.
    pub database: Option<String>,
    /// False when the target had it already (nothing read or written).
    pub copied: bool,
    /// What the copy read and stored (zero when skipped).
    pub stats: CopyStats,
}

/// WAL objects copied.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalCopy {
    /// Objects (segments, summaries, history files, the identity) written to the target.
    pub copied: u64,
    /// Objects the target had already.
    pub present: u64,
    /// Plaintext bytes copied.
    pub bytes: u64,
}

/// What `copy` did.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    /// Cluster name.
    pub cluster: String,
    /// Target location (no credentials).
    pub target: String,
    /// The backups, oldest first.
    pub backups: Vec<CopiedBackup>,
    /// WAL, when `--wal` was given.
    pub wal: Option<WalCopy>,
    /// Totals over the backups.
    pub totals: CopyStats,
    /// Wall time in seconds.
    pub elapsed_secs: f64,
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "copy of cluster {} to {}", self.cluster, self.target)?;
        for b in &self.backups {
            let what = match &b.database {
                Some(db) => format!("{} of {db}", b.kind),
                None => b.kind.clone(),
            };
            if b.copied {
                writeln!(
                    f,
                    "  {}  {what:<16} copied: {} blobs, {} new ({} bytes)",
                    b.id, b.stats.blobs, b.stats.blobs_new, b.stats.bytes_new
                )?;
            } else {
                writeln!(f, "  {}  {what:<16} already in the target", b.id)?;
            }
        }
        if self.backups.is_empty() {
            writeln!(f, "  no backups selected")?;
        }
        if let Some(w) = &self.wal {
            writeln!(
                f,
                "  WAL: {} objects copied ({} bytes), {} already there",
                w.copied, w.bytes, w.present
            )?;
        }
        write!(
            f,
            "read {} bytes from the source, {} bytes new to the target, in {:.1} s",
            self.totals.bytes_read, self.totals.bytes_new, self.elapsed_secs
        )
    }
}

impl Report for CopyReport {}

/// Copies the selected backups (and WAL) of `opts.cluster` from `source` into `target`.
pub async fn copy(
    source: &Repository,
    target: &Repository,
    opts: &CopyOptions,
) -> Result<CopyReport> {
    let started = Instant::now();
    if source.config().id == target.config().id {
        return Err(Error::with_hint(
            ErrorKind::Usage,
            "copy: the target is the source repository itself",
            "give --to a second repository (a [[repository]] name or a URL)",
        ));
    }
    let scope = format!("copy:{}", opts.cluster);
    let src_lock = source
        .lock(LockKind::Shared, Some(&scope), "copy (source)")
        .await?;
    let dst_lock = target
        .lock(LockKind::Shared, Some(&scope), "copy (target)")
        .await?;
    let result = copy_locked(source, target, opts).await;
    let released = (src_lock.release().await, dst_lock.release().await);
    let (backups, wal) = result?;
    released.0?;
    released.1?;
    Ok(CopyReport {
        cluster: opts.cluster.clone(),
        target: opts.target_location.clone(),
        totals: sum_stats(backups.iter().map(|b| &b.stats)),
        backups,
        wal,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

async fn copy_locked(
    source: &Repository,
    target: &Repository,
    opts: &CopyOptions,
) -> Result<(Vec<CopiedBackup>, Option<WalCopy>)> {
    let headers = manifest::load_summaries(source, &opts.cluster).await?;
    let selected = select(&headers, &opts.selection, &opts.cluster)?;
    // WAL first: a copied physical backup is then restorable with its WAL in the target
    // (a backup's own start-to-stop WAL is in its manifest either way).
    let wal = if opts.wal {
        Some(copy_wal(source, target, &opts.cluster).await?)
    } else {
        None
    };
    let mut translation = BlobTranslation::load(source, target).await?;
    let mut out = Vec::new();
    for h in selected {
        let body = &headers
            .iter()
            .find(|(x, _)| x.id == h.id)
            .expect("selected")
            .1;
        let database = (h.kind == KIND_DUMP).then(|| dump_database(body)).flatten();
        let stats = copy_manifest(
            source,
            target,
            opts.threads,
            &mut translation,
            &opts.cluster,
            &h.id,
        )
        .await?;
        if let Some(s) = &stats {
            tracing::info!(
                "copied {} {}: {} blobs read, {} new to the target",
                h.kind,
                h.id,
                s.blobs_read,
                s.blobs_new
            );
        }
        out.push(CopiedBackup {
            id: h.id.clone(),
            kind: h.kind.clone(),
            database,
            copied: stats.is_some(),
            stats: stats.unwrap_or_default(),
        });
    }
    Ok((out, wal))
}

/// The headers to copy, oldest first.
fn select<'a>(
    headers: &'a [(ManifestHeader, serde_json::Value)],
    selection: &CopySelection,
    cluster: &str,
) -> Result<Vec<&'a ManifestHeader>> {
    let known = |h: &ManifestHeader| h.kind == KIND_PHYSICAL || h.kind == KIND_DUMP;
    match selection {
        CopySelection::None => Ok(Vec::new()),
        CopySelection::All => Ok(headers
            .iter()
            .map(|(h, _)| h)
            .filter(|h| known(h))
            .collect()),
        CopySelection::Ids(ids) => ids
            .iter()
            .map(|id| {
                headers
                    .iter()
                    .map(|(h, _)| h)
                    .find(|h| &h.id == id)
                    .ok_or_else(|| {
                        Error::with_hint(
                            ErrorKind::Usage,
                            format!("copy: no backup {id} of cluster {cluster} in the source"),
                            "see `pgkeep list` for the ids",
                        )
                    })
            })
            .collect(),
        CopySelection::Latest => {
            // Newest per group: the physical backups, and the dumps of each database.
            let mut newest: BTreeMap<(String, Option<String>, bool), &ManifestHeader> =
                BTreeMap::new();
            for (h, body) in headers.iter().filter(|(h, _)| known(h)) {
                let all = body.get("all").and_then(|v| v.as_bool()).unwrap_or(false);
                let db = (h.kind == KIND_DUMP && !all)
                    .then(|| dump_database(body))
                    .flatten();
                newest.insert((h.kind.clone(), db, all), h); // oldest first: the last wins
            }
            let mut v: Vec<&ManifestHeader> = newest.into_values().collect();
            v.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(v)
        }
    }
}

/// Copies every object below `wal/<cluster>/` that the target lacks.
async fn copy_wal(source: &Repository, target: &Repository, cluster: &str) -> Result<WalCopy> {
    use futures::{StreamExt, TryStreamExt};
    let prefix = wal_prefix(cluster);
    let (src, dst) = tokio::try_join!(
        source.storage().list(&prefix),
        target.storage().list(&prefix)
    )
    .map_err(pgkeep_repo::RepoError::from)?;
    let have: std::collections::HashSet<String> = dst.into_iter().map(|m| m.key).collect();
    let mut report = WalCopy::default();
    let mut todo: Vec<String> = Vec::new();
    for m in src {
        if have.contains(&m.key) {
            report.present += 1;
        } else {
            todo.push(m.key);
        }
    }
    // The identity first (a push into the target compares against it), then in name order,
    // so an interrupted copy leaves a prefix of the archive, not scattered segments.
    todo.sort_by_key(|k| (!k.ends_with("/identity"), k.clone()));
    let results: Vec<(bool, u64)> = futures::stream::iter(todo)
        .map(|key| async move {
            let copied = copy_sealed_object(source, target, &key).await?;
            Ok::<_, Error>((copied.is_some(), copied.unwrap_or(0)))
        })
        .buffered(4)
        .try_collect()
        .await?;
    for (copied, n) in results {
        if copied {
            report.copied += 1;
            report.bytes += n;
        } else {
            report.present += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(id: &str, kind: &str) -> ManifestHeader {
        serde_json::from_value(serde_json::json!({
            "format": 1, "kind": kind, "id": id, "cluster": "main"
        }))
        .unwrap()
    }

    fn dump_body(db: &str) -> serde_json::Value {
        serde_json::json!({ "databases": [ { "name": db } ] })
    }

    #[test]
    fn latest_is_the_newest_physical_backup_and_the_newest_dump_of_each_database() {
        let headers = vec![
            (
                header("20260101T000000Z", KIND_PHYSICAL),
                serde_json::json!({}),
            ),
            (header("20260101T010000Z", KIND_DUMP), dump_body("shop")),
            (
                header("20260102T000000Z", KIND_PHYSICAL),
                serde_json::json!({}),
            ),
            (header("20260102T010000Z", KIND_DUMP), dump_body("crm")),
            (header("20260103T010000Z", KIND_DUMP), dump_body("shop")),
        ];
        let got: Vec<&str> = select(&headers, &CopySelection::Latest, "main")
            .unwrap()
            .iter()
            .map(|h| h.id.as_str())
            .collect();
        assert_eq!(
            got,
            ["20260102T000000Z", "20260102T010000Z", "20260103T010000Z"]
        );
    }

    #[test]
    fn an_unknown_id_is_refused_with_the_cluster_named() {
        let headers = vec![(
            header("20260101T000000Z", KIND_PHYSICAL),
            serde_json::json!({}),
        )];
        let e = select(&headers, &CopySelection::Ids(vec!["nope".into()]), "main").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        assert_eq!(
            e.to_string(),
            "copy: no backup nope of cluster main in the source\nHINT: see `pgkeep list` for the ids"
        );
    }
}
