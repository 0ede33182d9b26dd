//! `repo repair-index`: rebuilds the index from the pack headers (RELIABILITY row 13).
//!
//! Every pack carries a sealed header listing its blobs (see [`crate::pack`]), so the index
//! is redundant: what a damaged index file described can be read back from the packs. The
//! order keeps the repository usable at every step, whatever interrupts it:
//! 1. read every index file; the packs named by the good ones are covered;
//! 2. read the header of every other pack in storage (two range reads each);
//! 3. write new index files for those packs;
//! 4. only then delete the damaged index files.
//!
//! Interrupted before 4, the repository holds the new index files beside the damaged ones,
//! which are skipped on load; a rerun finds every pack covered and only deletes. The caller
//! holds the exclusive lock, so no writer adds packs meanwhile.

use std::collections::HashSet;

use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::format::{IndexFile, IndexPack, FORMAT_VERSION};
use crate::id::{Id, PackId};
use crate::pack::{header_len_from_trailer, pack_key, parse_pack_header, PackHeader, TRAILER_LEN};
use crate::repository::Repository;
use pgkeep_storage::ErrorKind as SErr;

/// Packs per new index file: keeps each file a few MiB at most.
const PACKS_PER_INDEX_FILE: usize = 2000;

/// What `repair_index` did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// Index files that failed verification and were removed.
    pub removed_index_files: Vec<String>,
    /// New index files written.
    pub written_index_files: Vec<String>,
    /// Packs whose headers were read (not covered by a good index file).
    pub packs_scanned: usize,
    /// Packs added to the index from their headers.
    pub packs_indexed: usize,
    /// Blobs those packs hold.
    pub blobs_indexed: usize,
    /// Packs whose header could not be read or verified, with why; they stay out of the
    /// index (`repo check --read-data` names what depends on them).
    pub unreadable_packs: Vec<(String, String)>,
}

impl Repository {
    /// Rebuilds the index from pack headers: see the [module documentation](self). The caller
    /// must hold the exclusive lock (it refuses when a lock of this handle is lost). Fails on
    /// storage errors, leaving the repository as usable as before.
    pub async fn repair_index(&self) -> Result<RepairReport> {
        self.ensure_locks_held()?;
        let storage = self.storage().clone();
        let mut report = RepairReport::default();

        let mut covered: HashSet<PackId> = HashSet::new();
        let mut damaged = Vec::new();
        for m in storage.list("index/").await? {
            match self.read_index_file(&m.key).await {
                Ok(f) => covered.extend(f.packs.iter().map(|p| p.id)),
                Err(RepoError::Integrity { .. }) => damaged.push(m.key),
                Err(e) => return Err(e),
            }
        }

        let mut todo = Vec::new();
        for m in storage.list("packs/").await? {
            let name = m.key.rsplit('/').next().unwrap_or_default();
            match name.parse::<Id>() {
                Ok(id) if m.key == pack_key(&id) && !covered.contains(&id) => {
                    todo.push((id, m.size))
                }
                _ => {}
            }
        }
        report.packs_scanned = todo.len();
        let headers: Vec<(PackId, u64, Result<PackHeader>)> = stream::iter(todo)
            .map(|(id, size)| async move { (id, size, self.read_header(&id, size).await) })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut packs = Vec::new();
        for (id, size, blobs) in headers {
            match blobs {
                Ok(h) => packs.push(IndexPack {
                    id,
                    size,
                    blobs: h.blobs,
                    deltas: h.deltas,
                }),
                Err(RepoError::Integrity { reason, .. }) => {
                    tracing::warn!("pack {} left out of the index: {reason}", pack_key(&id));
                    report.unreadable_packs.push((pack_key(&id), reason));
                }
                Err(e) => return Err(e),
            }
        }
        packs.sort_by_key(|p| p.id);
        report.packs_indexed = packs.len();
        report.blobs_indexed = packs.iter().map(|p| p.blobs.len()).sum();

        // New index files first: until the damaged ones are gone both are there, and loading
        // skips the damaged ones.
        while !packs.is_empty() {
            let rest = packs.split_off(packs.len().min(PACKS_PER_INDEX_FILE));
            let key = self
                .write_index_file(IndexFile {
                    version: FORMAT_VERSION,
                    packs,
                })
                .await?;
            report.written_index_files.push(key);
            packs = rest;
        }
        for key in damaged {
            self.ensure_locks_held()?;
            storage.delete(&key).await?;
            report.removed_index_files.push(key);
        }
        report.unreadable_packs.sort();
        self.reload_index().await?;
        Ok(report)
    }

    /// The verified header of one pack, from two range reads (trailer, then header).
    async fn read_header(&self, id: &PackId, size: u64) -> Result<PackHeader> {
        let key = pack_key(id);
        let name = id.to_hex();
        if size < TRAILER_LEN {
            return Err(RepoError::integrity(
                format!("pack {name}"),
                format!("{size} bytes is too short for a pack"),
            ));
        }
        let range_err = |e: pgkeep_storage::StorageError| match e.kind {
            // Shorter than it listed, or gone: the pack itself is the problem.
            SErr::Corrupt | SErr::NotFound => {
                RepoError::integrity(format!("pack {name}"), e.message)
            }
            _ => RepoError::Storage(e),
        };
        let trailer = self
            .storage()
            .get_range(&key, size - TRAILER_LEN..size)
            .await
            .map_err(range_err)?;
        let hlen = header_len_from_trailer(&trailer, &name)?;
        if hlen + TRAILER_LEN > size {
            return Err(RepoError::integrity(
                format!("pack {name}"),
                "header length out of range",
            ));
        }
        let tail = self
            .storage()
            .get_range(&key, size - TRAILER_LEN - hlen..size)
            .await
            .map_err(range_err)?;
        parse_pack_header(self.sealer(), &tail, size, &name)
    }
}
