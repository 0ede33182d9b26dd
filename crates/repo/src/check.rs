//! `repo check`: structural checks, and with `read_data` a full read of every pack.

use std::collections::{HashMap, HashSet};

use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::id::{BlobId, Id, PackId};
use crate::pack::{decode_blob, pack_key, read_pack_header, BasePlaintexts};
use crate::repository::Repository;

/// A pack's id, the bytes read, each problem found (with the blob concerned, if any), and
/// whether every indexed blob was decoded and verified one by one.
type PackVerdict = (PackId, u64, Vec<(Option<BlobId>, String)>, bool);

/// What `check` does.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Also download every pack and verify every blob.
    pub read_data: bool,
}

/// One problem found: the object concerned and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckProblem {
    /// Object key or name.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

/// The result of `check`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Errors: the repository is damaged where these say.
    pub problems: Vec<CheckProblem>,
    /// Warnings: nothing is lost (e.g. unindexed packs left by an interrupted write).
    pub warnings: Vec<String>,
    /// Manifests (backups, dumps) that reference damaged or missing data.
    pub damaged_manifests: Vec<String>,
    /// Packs found in storage.
    pub packs: usize,
    /// Blobs indexed.
    pub blobs: usize,
    /// Index files read.
    pub index_files: usize,
    /// Manifests checked.
    pub manifests: usize,
    /// Bytes downloaded and verified (with `read_data`).
    pub bytes_read: u64,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, object: impl Into<String>, message: impl Into<String>) {
        self.problems.push(CheckProblem {
            object: object.into(),
            message: message.into(),
        });
    }
}

impl Repository {
    /// Checks the repository. Never modifies it.
    pub async fn check(&self, opts: CheckOptions) -> Result<CheckReport> {
        let mut r = CheckReport::default();
        let storage = self.storage().clone();

        // Packs present in storage.
        let mut stored: HashMap<PackId, u64> = HashMap::new();
        for m in storage.list("packs/").await? {
            let name = m.key.rsplit('/').next().unwrap_or_default();
            match name.parse::<Id>() {
                Ok(id) if m.key == pack_key(&id) => {
                    stored.insert(id, m.size);
                }
                _ => r
                    .warnings
                    .push(format!("unexpected object {} in packs/", m.key)),
            }
        }
        r.packs = stored.len();

        // Index files, each verified on its own so one bad file is named, not fatal.
        let mut indexed: HashMap<PackId, (u64, Vec<crate::format::IndexBlob>)> = HashMap::new();
        let mut blob_pack: HashMap<BlobId, PackId> = HashMap::new();
        // The bases of each delta blob, for the copy `blob_pack` names.
        let mut deltas: HashMap<BlobId, Vec<BlobId>> = HashMap::new();
        for m in storage.list("index/").await? {
            r.index_files += 1;
            match self.read_index_file(&m.key).await {
                Ok(f) => {
                    for p in f.packs {
                        for b in &p.blobs {
                            if let std::collections::hash_map::Entry::Vacant(v) =
                                blob_pack.entry(b.id)
                            {
                                v.insert(p.id);
                                if let Some(d) = p.deltas.iter().find(|d| d.id == b.id) {
                                    deltas.insert(b.id, d.bases.clone());
                                }
                            }
                        }
                        indexed.insert(p.id, (p.size, p.blobs));
                    }
                }
                Err(RepoError::Integrity { reason, .. }) => r.problem(
                    &m.key,
                    format!(
                        "index file is damaged: {reason}. HINT: `pgkeep repo repair-index` \
                         rebuilds the index from the packs"
                    ),
                ),
                Err(e) => r.problem(&m.key, e.to_string()),
            }
        }
        r.blobs = blob_pack.len();

        let mut bad_packs: HashSet<PackId> = HashSet::new();
        for (id, (size, _)) in &indexed {
            match stored.get(id) {
                None => {
                    r.problem(
                        pack_key(id),
                        "pack is in the index but missing from storage",
                    );
                    bad_packs.insert(*id);
                }
                Some(s) if s != size => {
                    r.problem(
                        pack_key(id),
                        format!("pack has {s} bytes, the index says {size} (truncated?)"),
                    );
                    bad_packs.insert(*id);
                }
                _ => {}
            }
        }
        let unindexed = stored.keys().filter(|p| !indexed.contains_key(p)).count();
        if unindexed > 0 {
            r.warnings.push(format!(
                "{unindexed} pack(s) are not in any index (left by an interrupted write); they are harmless and are removed by expire after a grace period"
            ));
        }

        // Every delta's bases are indexed full blobs (invariant 8).
        let mut bad_blobs: HashSet<BlobId> = HashSet::new();
        let mut delta_list: Vec<(&BlobId, &Vec<BlobId>)> = deltas.iter().collect();
        delta_list.sort();
        for (id, bases) in delta_list {
            for b in bases {
                let why = if !blob_pack.contains_key(b) {
                    "is in no index"
                } else if deltas.contains_key(b) {
                    "is itself a delta"
                } else {
                    continue;
                };
                r.problem(
                    format!("{} blob {id}", pack_key(&blob_pack[id])),
                    format!("its delta base {b} {why}: the blob cannot be decoded"),
                );
                bad_blobs.insert(*id);
            }
        }

        // Read every pack in full.
        if opts.read_data {
            let todo: Vec<(PackId, Vec<crate::format::IndexBlob>, Vec<BlobId>)> = indexed
                .iter()
                .filter(|(id, _)| !bad_packs.contains(id))
                .map(|(id, (_, b))| {
                    let bases: Vec<BlobId> = b
                        .iter()
                        .filter_map(|x| deltas.get(&x.id))
                        .flatten()
                        .copied()
                        .collect();
                    (*id, b.clone(), bases)
                })
                .collect();
            let results: Vec<PackVerdict> = stream::iter(todo)
                .map(|(id, blobs, bases)| {
                    let repo = self.clone();
                    async move {
                        let key = pack_key(&id);
                        let data = match repo.storage().get(&key).await {
                            Ok(d) => d,
                            Err(e) => return (id, 0, vec![(None, e.to_string())], false),
                        };
                        let n = data.len() as u64;
                        let sealer = repo.sealer().clone();
                        // An unreadable base shows as the failure of each delta blob on it.
                        let bases = repo.load_bases(&bases).await.unwrap_or_else(|e| {
                            tracing::warn!("delta bases of pack {id}: {e}");
                            BasePlaintexts::new()
                        });
                        let (found, each) = tokio::task::spawn_blocking(move || {
                            verify_pack(&sealer, &id, &data, &blobs, &bases)
                        })
                        .await
                        .unwrap_or_else(|e| {
                            (
                                vec![(None, format!("verification task failed: {e}"))],
                                false,
                            )
                        });
                        (id, n, found, each)
                    }
                })
                .buffer_unordered(4)
                .collect()
                .await;
            for (id, n, found, each_blob_checked) in results {
                r.bytes_read += n;
                for (blob, msg) in found {
                    match blob {
                        Some(b) => {
                            bad_blobs.insert(b);
                            r.problem(format!("{} blob {}", pack_key(&id), b), msg);
                        }
                        None => {
                            // A pack whose hash or header fails is a problem either way, but
                            // when each of its blobs was verified on its own, a backup is
                            // damaged only by the blobs that failed: restores read blobs by
                            // their index entries and verify each, so the intact ones serve.
                            if !each_blob_checked {
                                bad_packs.insert(id);
                            }
                            r.problem(pack_key(&id), msg);
                        }
                    }
                }
            }
        }

        // Manifests: every referenced blob must be indexed, in a present, undamaged pack.
        for m in self.list_manifests(None).await? {
            r.manifests += 1;
            let name = format!("{}/{}", m.cluster, m.id);
            let body = match self.load_manifest(&m.cluster, &m.id).await {
                Ok(b) => b,
                Err(e) => {
                    r.problem(m.key(), e.to_string());
                    r.damaged_manifests.push(name);
                    continue;
                }
            };
            let mut damaged = false;
            let mut reported = 0;
            let damage = |id: &BlobId| match blob_pack.get(id) {
                None => Some(format!("blob {id} that is in no index")),
                Some(p) if bad_packs.contains(p) => {
                    Some(format!("blob {id} in damaged or missing pack {p}"))
                }
                Some(_) if bad_blobs.contains(id) => Some(format!("damaged blob {id}")),
                _ => None,
            };
            for s in Repository::stream_refs(&body) {
                for b in &s.blobs {
                    // A delta blob is as good as its bases.
                    let why = damage(&b.id)
                        .map(|d| format!("references {d}"))
                        .or_else(|| {
                            deltas.get(&b.id)?.iter().find_map(|x| {
                                damage(x).map(|d| {
                                    format!("references blob {} whose delta base is {d}", b.id)
                                })
                            })
                        });
                    if let Some(msg) = why {
                        damaged = true;
                        if reported < 10 {
                            r.problem(m.key(), msg);
                        }
                        reported += 1;
                    }
                }
            }
            if reported > 10 {
                r.problem(
                    m.key(),
                    format!("... and {} more damaged references", reported - 10),
                );
            }
            if damaged {
                r.damaged_manifests.push(name);
            }
        }

        for l in self.list_locks().await? {
            if l.stale {
                r.warnings.push(format!(
                    "stale lock {} of {} pid {} ({}); `pgkeep repo unlock` removes it",
                    l.id, l.host, l.pid, l.purpose
                ));
            }
        }
        Ok(r)
    }
}

/// Checks a whole pack: its hash, its header against the index, and every indexed blob
/// (authenticated, decompressed, id recomputed). The flag says whether every blob was
/// decoded, so that per-blob verdicts are complete.
fn verify_pack(
    sealer: &crate::crypto::Sealer,
    id: &PackId,
    data: &[u8],
    indexed: &[crate::format::IndexBlob],
    bases: &BasePlaintexts,
) -> (Vec<(Option<BlobId>, String)>, bool) {
    let mut out = Vec::new();
    if blake3::hash(data).as_bytes() != &id.0 {
        out.push((
            None,
            "pack content does not match its id (altered or truncated)".to_string(),
        ));
    }
    let header = match read_pack_header(sealer, data, &id.to_hex()) {
        Ok(h) => h.blobs,
        Err(e) => {
            out.push((None, e.to_string()));
            // Fall back to the index's view so each blob is still checked and named.
            indexed.to_vec()
        }
    };
    let in_header: HashSet<BlobId> = header.iter().map(|b| b.id).collect();
    for b in indexed {
        if !in_header.contains(&b.id) {
            out.push((
                Some(b.id),
                "blob is in the index but not in the pack header".into(),
            ));
        }
    }
    let mut d = match zstd::bulk::Decompressor::new() {
        Ok(d) => d,
        Err(e) => return (vec![(None, format!("zstd init: {e}"))], false),
    };
    let name = format!("pack {id}");
    for b in indexed {
        let (s, e) = (b.offset as usize, b.offset as usize + b.length as usize);
        if e > data.len() {
            out.push((Some(b.id), "blob extends past the end of the pack".into()));
            continue;
        }
        if let Err(err) = decode_blob(
            sealer,
            &mut d,
            &b.id,
            b.raw_length,
            &data[s..e],
            bases,
            &name,
        ) {
            let msg = match err {
                RepoError::Integrity { reason, .. } => reason,
                other => other.to_string(),
            };
            out.push((Some(b.id), msg));
        }
    }
    (out, true)
}
