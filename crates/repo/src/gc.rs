//! Garbage collection: what `pgkeep expire` and `pgkeep repo prune` call
//! ([`Repository::prune`]).
//!
//! Liveness: every blob that a manifest in `backups/` references is live, and so is every
//! delta base of a live blob (invariant 8), and every blob of a pack younger than the grace
//! period (a writer whose lock went stale may have indexed it and not yet saved its manifest).
//! Everything else is removed, in the reverse of the write order (invariant 2), so that an
//! interrupted run leaves every kept manifest readable:
//!
//! 0. packs to repack (more than [`PruneOptions::max_unused`] of them unused) have their live
//!    blobs copied, as stored, into new packs, which are uploaded before anything names them;
//! 1. new index files are written that describe exactly what stays: the live blobs of the
//!    kept packs and of the new packs;
//! 2. the index files read at the start are deleted;
//! 3. packs that no new index file names are deleted: packs without a live blob, repacked
//!    packs, and packs that no index named at the start and that are older than the grace
//!    period.
//!
//! Until step 2 ends a blob may be indexed twice, in an old pack and a new one; both exist
//! until step 3, which starts only when no index file names the old packs any more, so
//! whichever copy a reader picks is there. A rerun after an interruption finishes the work:
//! it reads the index files that are left, prefers the newest copy of a blob, and removes the
//! rest.
//!
//! Blobs are copied as they are stored: a sealed blob is bound to its id (the associated data
//! of its AEAD seal, or the id recomputed from a plain blob's plaintext), not to its place, so
//! it moves to another pack without being opened, decompressed, compressed and sealed again.
//! The old pack's BLAKE3 is checked against its id before its bytes are copied, so a damaged
//! pack is never spread into a new one; it is left where it is for `check` to report.
//!
//! Memory: the in-memory index of the handle is dropped for the run (and read again at the
//! end), and the blobs are held in one sorted array of 48-byte entries plus one bit each for
//! liveness: about 50 bytes per blob (100 MiB for two million blobs), one pack being copied
//! and one being filled at a time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::de::DeserializeSeed;
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::format::{BlobRefWalk, IndexBlob, IndexDelta, IndexFile, IndexPack, FORMAT_VERSION};
use crate::id::{BlobId, Id, PackId};
use crate::index::Index;
use crate::pack::{pack_key, PackWriter};
use crate::repository::{ManifestKey, Repository};

/// Packs per new index file, and blobs: each file (and the memory to write it) stays a few
/// MiB.
const PACKS_PER_INDEX_FILE: usize = 2000;
const BLOBS_PER_INDEX_FILE: usize = 50_000;

/// Bytes of one blob's entry in a pack header.
const HEADER_ENTRY_LEN: u64 = 44;

/// Fixed bytes of a pack besides its entries: entry count, delta count, the seal of the
/// header (at most 32 bytes) and the trailer.
const PACK_FIXED_OVERHEAD: u64 = 4 + 4 + 32 + 8;

/// How [`Repository::prune`] works.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Fraction (0..=1) of a pack's bytes that may be unused before the pack is repacked
    /// (restic's `--max-unused` idea, per pack). Default 0.05.
    pub max_unused: f64,
    /// Packs younger than this (by the store's clock) are neither removed nor repacked, and
    /// their blobs stay indexed: they may belong to a backup running on another host.
    /// Default 24 hours.
    pub grace: Duration,
    /// Work out and report what would be removed, and change nothing.
    pub dry_run: bool,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            max_unused: 0.05,
            grace: Duration::from_secs(24 * 3600),
            dry_run: false,
        }
    }
}

/// What [`Repository::prune`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Manifests whose blobs were kept.
    pub manifests: u64,
    /// Blobs kept (referenced, delta bases of referenced blobs, or in young packs).
    pub blobs_live: u64,
    /// Indexed blobs no longer indexed.
    pub blobs_removed: u64,
    /// Packs in storage before.
    pub packs_total: u64,
    /// Indexed packs deleted: those without a live blob and those repacked (packs the
    /// index named but that were already gone only leave the index).
    pub packs_removed: u64,
    /// Packs whose live blobs were copied into new packs (counted in `packs_removed` too).
    pub packs_repacked: u64,
    /// Packs that no index named, older than the grace period, deleted.
    pub unindexed_packs_removed: u64,
    /// Packs that no index named, younger than the grace period, kept.
    pub unindexed_packs_kept: u64,
    /// New index files written.
    pub index_files_written: u64,
    /// Old index files deleted.
    pub index_files_removed: u64,
    /// Bytes of all packs in storage before.
    pub bytes_before: u64,
    /// Bytes of all packs in storage after (estimated with `dry_run`).
    pub bytes_after: u64,
    /// Bytes of live blobs copied into new packs.
    pub bytes_repacked: u64,
    /// Nothing was changed.
    pub dry_run: bool,
}

impl std::fmt::Display for PruneReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        writeln!(
            f,
            "{} manifest(s) keep {} blob(s); {verb} {} blob(s)",
            self.manifests, self.blobs_live, self.blobs_removed
        )?;
        writeln!(
            f,
            "packs: {} before, {verb} {} ({} repacked, {:.1} MiB copied), {verb} {} unindexed, kept {} unindexed within the grace period",
            self.packs_total,
            self.packs_removed,
            self.packs_repacked,
            mib(self.bytes_repacked),
            self.unindexed_packs_removed,
            self.unindexed_packs_kept
        )?;
        writeln!(
            f,
            "index files: {} written, {} removed",
            self.index_files_written, self.index_files_removed
        )?;
        write!(
            f,
            "storage: {:.1} MiB before, {:.1} MiB after{}",
            mib(self.bytes_before),
            mib(self.bytes_after),
            if self.dry_run {
                " (estimated; dry run, nothing changed)"
            } else {
                ""
            }
        )
    }
}

/// One indexed blob: 48 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id: BlobId,
    pack: u32,
    offset: u32,
    length: u32,
    raw_length: u32,
}

/// What becomes of an indexed pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Repack,
    Remove,
}

/// An indexed pack.
#[derive(Debug)]
struct PackRec {
    id: PackId,
    /// Size the index gives.
    size: u64,
    /// Size and modification time in storage; `None` when absent.
    stored: Option<(u64, DateTime<Utc>)>,
    young: bool,
    live_blobs: u64,
    live_bytes: u64,
    /// Estimated header bytes of its live blobs.
    live_header: u64,
    fate: Fate,
}

impl PackRec {
    /// Present in storage with the size the index gives.
    fn intact(&self) -> bool {
        self.stored.is_some_and(|(s, _)| s == self.size)
    }
}

/// Packs in storage: size and modification time (store's clock).
type StoredPacks = HashMap<PackId, (u64, DateTime<Utc>)>;

/// Everything the index files say, compactly, and which blobs are live.
#[derive(Default)]
struct Catalog {
    packs: Vec<PackRec>,
    pack_numbers: HashMap<PackId, u32>,
    /// Sorted by id, one entry per blob (once copies are chosen): the copy that is kept.
    entries: Vec<Entry>,
    /// Delta records as read (blob, pack number, bases), until copies are chosen.
    raw_deltas: Vec<(BlobId, u32, Box<[BlobId]>)>,
    /// The bases of the kept copy of each delta blob, sorted by id.
    deltas: Vec<(BlobId, Box<[BlobId]>)>,
    /// One bit per entry.
    live: Vec<u64>,
    /// Blobs of young packs: roots.
    young_roots: Vec<BlobId>,
    /// Copies dropped because the blob is indexed elsewhere too.
    duplicates: u64,
}

impl Catalog {
    fn find(&self, id: &BlobId) -> Option<usize> {
        self.entries.binary_search_by(|e| e.id.cmp(id)).ok()
    }

    fn is_live(&self, i: usize) -> bool {
        self.live[i / 64] & (1 << (i % 64)) != 0
    }

    /// Marks entry `i` live; true when it was not yet.
    fn mark(&mut self, i: usize) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        let new = self.live[w] & b == 0;
        self.live[w] |= b;
        new
    }

    fn bases_of(&self, id: &BlobId) -> Option<&[BlobId]> {
        let i = self.deltas.binary_search_by(|d| d.0.cmp(id)).ok()?;
        Some(&self.deltas[i].1)
    }

    fn add_file(&mut self, file: IndexFile, grace_start: DateTime<Utc>, stored: &StoredPacks) {
        for p in file.packs {
            let n = match self.pack_numbers.get(&p.id) {
                Some(n) => *n,
                None => {
                    let n = self.packs.len() as u32;
                    let st = stored.get(&p.id).copied();
                    self.packs.push(PackRec {
                        id: p.id,
                        size: p.size,
                        stored: st,
                        young: st.is_some_and(|(_, t)| t > grace_start),
                        live_blobs: 0,
                        live_bytes: 0,
                        live_header: 0,
                        fate: Fate::Keep,
                    });
                    self.pack_numbers.insert(p.id, n);
                    n
                }
            };
            let young = self.packs[n as usize].young;
            for b in &p.blobs {
                self.entries.push(Entry {
                    id: b.id,
                    pack: n,
                    offset: b.offset,
                    length: b.length,
                    raw_length: b.raw_length,
                });
                if young {
                    self.young_roots.push(b.id);
                }
            }
            for d in p.deltas {
                self.raw_deltas.push((d.id, n, d.bases.into()));
            }
        }
    }

    /// Keeps one copy of each blob: one in an intact pack, then in the newest pack (a
    /// repacked copy over its original, so an interrupted run is not redone), then the first
    /// read. The bases kept are those of that copy.
    fn choose_copies(&mut self) {
        let packs = &self.packs;
        let rank = |e: &Entry| {
            let p = &packs[e.pack as usize];
            (
                !p.intact(),
                std::cmp::Reverse(p.stored.map(|s| s.1)),
                e.pack,
            )
        };
        self.entries
            .sort_unstable_by(|a, b| a.id.cmp(&b.id).then_with(|| rank(a).cmp(&rank(b))));
        let before = self.entries.len();
        self.entries.dedup_by_key(|e| e.id);
        self.entries.shrink_to_fit();
        self.duplicates = (before - self.entries.len()) as u64;
        let mut raw = std::mem::take(&mut self.raw_deltas);
        raw.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
        raw.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let deltas = raw
            .into_iter()
            .filter(|(id, n, _)| self.find(id).is_some_and(|i| self.entries[i].pack == *n))
            .map(|(id, _, bases)| (id, bases))
            .collect();
        self.deltas = deltas;
        self.live = vec![0; self.entries.len().div_ceil(64)];
    }

    /// Marks the delta bases of live blobs live, until nothing changes (bases are full
    /// blobs, so one round adds them all and a second finds nothing new). Bases in no index
    /// go to `missing`.
    fn mark_bases(&mut self, missing: &mut Vec<(BlobId, String)>) {
        loop {
            let mut added = false;
            for k in 0..self.deltas.len() {
                let id = self.deltas[k].0;
                let live = self.find(&id).is_some_and(|i| self.is_live(i));
                if !live {
                    continue;
                }
                for j in 0..self.deltas[k].1.len() {
                    let base = self.deltas[k].1[j];
                    match self.find(&base) {
                        Some(b) => added |= self.mark(b),
                        None => missing.push((base, format!("a delta base of blob {id}"))),
                    }
                }
            }
            if !added {
                return;
            }
        }
    }

    /// Live entry numbers ordered by (pack, offset): each pack's live blobs in a run.
    fn live_by_pack(&self) -> Vec<u32> {
        let mut v: Vec<u32> = (0..self.entries.len())
            .filter(|&i| self.is_live(i))
            .map(|i| i as u32)
            .collect();
        v.sort_unstable_by_key(|&i| {
            let e = &self.entries[i as usize];
            (e.pack, e.offset)
        });
        v
    }

    /// The run of `by_pack` that belongs to pack `n`.
    fn run<'a>(&self, by_pack: &'a [u32], n: u32) -> &'a [u32] {
        let start = by_pack.partition_point(|&i| self.entries[i as usize].pack < n);
        let end = by_pack.partition_point(|&i| self.entries[i as usize].pack <= n);
        &by_pack[start..end]
    }

    /// The index entry of pack `n` listing its live blobs (`None` when it has none).
    fn index_pack(&self, by_pack: &[u32], n: u32) -> Option<IndexPack> {
        let run = self.run(by_pack, n);
        if run.is_empty() {
            return None;
        }
        let mut blobs = Vec::with_capacity(run.len());
        let mut deltas = Vec::new();
        for &i in run {
            let e = &self.entries[i as usize];
            blobs.push(IndexBlob {
                id: e.id,
                offset: e.offset,
                length: e.length,
                raw_length: e.raw_length,
            });
            if let Some(b) = self.bases_of(&e.id) {
                deltas.push(IndexDelta {
                    id: e.id,
                    bases: b.to_vec(),
                });
            }
        }
        let p = &self.packs[n as usize];
        Some(IndexPack {
            id: p.id,
            size: p.size,
            blobs,
            deltas,
        })
    }

    /// Adds up each pack's live blobs and decides its fate.
    fn decide(&mut self, max_unused: f64) {
        for i in 0..self.entries.len() {
            if !self.is_live(i) {
                continue;
            }
            let e = self.entries[i];
            let delta = self.bases_of(&e.id).map_or(0, |b| 33 + 32 * b.len() as u64);
            let p = &mut self.packs[e.pack as usize];
            p.live_blobs += 1;
            p.live_bytes += e.length as u64;
            p.live_header += HEADER_ENTRY_LEN + delta;
        }
        for p in &mut self.packs {
            p.fate = if p.stored.is_none() || (p.live_blobs == 0 && !p.young) {
                Fate::Remove
            } else if p.young || !p.intact() {
                Fate::Keep
            } else {
                let used = p.live_bytes + p.live_header + PACK_FIXED_OVERHEAD;
                let unused = p.size.saturating_sub(used);
                if unused as f64 > max_unused * p.size as f64 {
                    Fate::Repack
                } else {
                    Fate::Keep
                }
            };
        }
    }
}

impl Repository {
    /// Removes what no manifest in `backups/` needs: see the [module documentation](self)
    /// for what is live and the order of the removals. The caller holds the exclusive lock;
    /// without one (or with one that is lost) this fails before reading anything. Refuses,
    /// removing nothing, while an index file is damaged, a manifest cannot be read, or a
    /// blob that a manifest needs is in no index or in a missing pack: those need `repo
    /// check` and `repo repair-index`, and removing data first could make them worse.
    ///
    /// The handle's in-memory index is dropped during the run and read again at the end (when
    /// it was loaded): a handle from [`Repository::open_metadata_only`] prunes in the least
    /// memory.
    pub async fn prune(&self, opts: &PruneOptions) -> Result<PruneReport> {
        if !(0.0..=1.0).contains(&opts.max_unused) {
            return Err(RepoError::Invalid(format!(
                "max-unused {} is out of range: give a fraction from 0 to 1 (0.05 is 5%)",
                opts.max_unused
            )));
        }
        self.ensure_locks_held()?;
        if !self.holds_exclusive_lock() {
            return Err(RepoError::Invalid(
                "garbage collection needs the exclusive repository lock; take it first \
                 (Repository::lock with LockKind::Exclusive)"
                    .into(),
            ));
        }
        // The handle's index would double the memory of the run; it is read again at the
        // end, unless the handle was opened without it (`open_metadata_only`, the cheapest
        // way to prune).
        let loaded = !self.inner.index_files.read().unwrap().is_empty();
        *self.inner.index.write().unwrap() = Index::default();
        let result = self.prune_inner(opts).await;
        if !loaded {
            return result;
        }
        let reloaded = self.reload_index().await;
        let report = result?;
        reloaded?;
        Ok(report)
    }

    /// Reads the index again when the index files in storage are not those this handle
    /// loaded; true when it did. A writer calls it right after taking its lock: a prune that
    /// ran between opening the repository and taking the lock may have removed blobs the
    /// loaded index still lists, and a backup deduplicated against them would reference
    /// missing data. A prune that removes any indexed blob always replaces the index files,
    /// so an unchanged set means nothing the handle knows was removed. One listing when
    /// nothing changed.
    pub async fn reload_index_if_changed(&self) -> Result<bool> {
        let mut now: Vec<String> = self
            .storage()
            .list("index/")
            .await?
            .into_iter()
            .map(|m| m.key)
            .collect();
        let mut loaded = self.inner.index_files.read().unwrap().clone();
        now.sort();
        loaded.sort();
        if now == loaded {
            return Ok(false);
        }
        self.reload_index().await?;
        Ok(true)
    }

    async fn prune_inner(&self, opts: &PruneOptions) -> Result<PruneReport> {
        let mut report = PruneReport {
            dry_run: opts.dry_run,
            ..Default::default()
        };
        let storage = self.storage().clone();
        // Ages are judged by the store's clock, like locks.
        let now = self.store_now().await?;
        let grace = chrono::TimeDelta::from_std(opts.grace)
            .map_err(|_| RepoError::Invalid("grace period out of range".into()))?;
        let grace_start = now - grace;

        let mut stored: StoredPacks = HashMap::new();
        for m in storage.list("packs/").await? {
            let name = m.key.rsplit('/').next().unwrap_or_default();
            if let Ok(id) = name.parse::<Id>() {
                if m.key == pack_key(&id) {
                    stored.insert(id, (m.size, m.last_modified));
                }
            }
        }
        report.packs_total = stored.len() as u64;
        report.bytes_before = stored.values().map(|s| s.0).sum();

        let mut cat = Catalog::default();
        let mut old_index_files = Vec::new();
        for m in storage.list("index/").await? {
            let file = match self.read_index_file(&m.key).await {
                Ok(f) => f,
                Err(RepoError::Integrity { reason, .. }) => {
                    return Err(RepoError::integrity(
                        &m.key,
                        format!(
                            "index file is damaged ({reason}); prune removes nothing until \
                             `pgkeep repo repair-index` has rebuilt it, since the packs it \
                             describes would look unused"
                        ),
                    ))
                }
                Err(e) => return Err(e),
            };
            cat.add_file(file, grace_start, &stored);
            old_index_files.push(m.key);
        }
        cat.choose_copies();

        self.mark_live(&mut cat, &mut report).await?;
        cat.decide(opts.max_unused);
        let by_pack = cat.live_by_pack();
        report.blobs_live = by_pack.len() as u64;
        report.blobs_removed = (cat.entries.len() - by_pack.len()) as u64;

        let unindexed: Vec<(PackId, u64, bool)> = stored
            .iter()
            .filter(|(id, _)| !cat.pack_numbers.contains_key(*id))
            .map(|(id, (size, t))| (*id, *size, *t > grace_start))
            .collect();
        let rewrite = cat.duplicates > 0
            || report.blobs_removed > 0
            || cat.packs.iter().any(|p| p.fate != Fate::Keep);

        if opts.dry_run {
            return Ok(dry_run_report(report, &cat, &unindexed));
        }

        // 0. New packs for the live blobs of packs mostly unused.
        let (new_packs, new_ids) = self.repack(&mut cat, &by_pack, &mut report).await?;

        // 1. Index files describing what stays.
        let mut new_keys = HashSet::new();
        if rewrite {
            let mut batch = Vec::new();
            let kept =
                (0..cat.packs.len() as u32).filter(|&n| cat.packs[n as usize].fate == Fate::Keep);
            let packs = kept
                .filter_map(|n| cat.index_pack(&by_pack, n))
                .chain(new_packs.iter().cloned());
            let mut blobs = 0;
            for p in packs {
                blobs += p.blobs.len();
                batch.push(p);
                if batch.len() == PACKS_PER_INDEX_FILE || blobs >= BLOBS_PER_INDEX_FILE {
                    new_keys.insert(self.write_gc_index(std::mem::take(&mut batch)).await?);
                    blobs = 0;
                }
            }
            if !batch.is_empty() {
                new_keys.insert(self.write_gc_index(batch).await?);
            }
            report.index_files_written = new_keys.len() as u64;

            // 2. The old index files. One the same as a new one (a plain repository seals
            //    deterministically) is the new one.
            for key in old_index_files.iter().filter(|k| !new_keys.contains(*k)) {
                self.ensure_locks_held()?;
                storage.delete(key).await?;
                report.index_files_removed += 1;
            }
        }

        // 3. Packs that no index names any more. A new pack is never among them, even when
        //    it has the id of one (the same blobs packed again by a plain repository).
        let mut doomed: Vec<(PackId, u64)> = Vec::new();
        if rewrite {
            for p in &cat.packs {
                if let (Fate::Remove | Fate::Repack, Some((size, _))) = (p.fate, p.stored) {
                    doomed.push((p.id, size));
                    report.packs_removed += 1;
                }
            }
        }
        for (id, size, young) in &unindexed {
            if *young {
                report.unindexed_packs_kept += 1;
            } else {
                doomed.push((*id, *size));
                report.unindexed_packs_removed += 1;
            }
        }
        let mut removed_bytes = 0;
        for (id, size) in doomed.iter().filter(|(id, _)| !new_ids.contains(id)) {
            self.ensure_locks_held()?;
            storage.delete(&pack_key(id)).await?;
            removed_bytes += size;
        }
        let added: u64 = new_packs
            .iter()
            .filter(|p| !stored.contains_key(&p.id))
            .map(|p| p.size)
            .sum();
        report.bytes_after = report.bytes_before - removed_bytes + added;
        Ok(report)
    }

    /// Marks what every manifest references, the blobs of young packs, and their delta
    /// bases. Fails when a manifest cannot be read or a needed blob is not in an intact pack.
    async fn mark_live(&self, cat: &mut Catalog, report: &mut PruneReport) -> Result<()> {
        let mut missing: Vec<(BlobId, String)> = Vec::new();
        for m in self.list_manifests(None).await? {
            let mut mark = |id: BlobId| match cat.find(&id) {
                Some(i) => {
                    cat.mark(i);
                }
                None => missing.push((id, format!("referenced by {}", m.key()))),
            };
            match self.manifest_blobs(&m, &mut mark).await {
                Ok(()) => {}
                Err(RepoError::Storage(e)) => return Err(RepoError::Storage(e)),
                Err(e) => {
                    return Err(RepoError::integrity(
                        m.key(),
                        format!(
                            "manifest cannot be read ({e}); prune removes nothing while it \
                             cannot tell what a backup needs (delete the manifest if the \
                             backup is lost)"
                        ),
                    ))
                }
            }
            report.manifests += 1;
        }
        for id in std::mem::take(&mut cat.young_roots) {
            if let Some(i) = cat.find(&id) {
                cat.mark(i);
            }
        }
        cat.mark_bases(&mut missing);
        for i in 0..cat.entries.len() {
            let e = cat.entries[i];
            let p = &cat.packs[e.pack as usize];
            if cat.is_live(i) && !p.intact() {
                let why = if p.stored.is_none() {
                    "missing from storage"
                } else {
                    "not of the size the index gives"
                };
                missing.push((e.id, format!("in pack {} that is {why}", p.id)));
            }
        }
        if let Some((id, what)) = missing.first() {
            return Err(RepoError::integrity(
                "repository",
                format!(
                    "{} blob(s) that backups need are not available (blob {id}, {what}); \
                     prune removes nothing while it cannot account for every needed blob. \
                     `pgkeep repo check` names the damaged backups; `pgkeep repo \
                     repair-index` indexes packs whose index file was lost",
                    missing.len()
                ),
            ));
        }
        Ok(())
    }

    /// Calls `f` with every blob id a manifest references. The manifest is parsed as it is
    /// decompressed and never held as a JSON tree: a backup of a million blobs would take
    /// hundreds of MiB that way (see [`BlobRefWalk`]).
    async fn manifest_blobs(&self, m: &ManifestKey, f: &mut dyn FnMut(BlobId)) -> Result<()> {
        let key = m.key();
        let sealed = self.storage().get(&key).await?;
        let z = self
            .sealer()
            .open_meta(key.as_bytes(), &sealed)
            .ok_or_else(|| {
                RepoError::integrity(&key, "failed authentication (altered or truncated)")
            })?;
        drop(sealed);
        let bad = |e: String| RepoError::integrity(&key, e);
        let decoder = zstd::stream::read::Decoder::new(&z[..])
            .map_err(|e| bad(format!("does not decompress: {e}")))?;
        let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::with_capacity(
            1 << 16,
            decoder,
        ));
        BlobRefWalk::new(f)
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| bad(format!("manifest does not parse: {e}")))
    }

    /// Copies the live blobs of every pack to repack, as stored, into new packs and uploads
    /// them. A pack whose bytes do not match its id is kept as it is (with a warning).
    /// Returns the new packs' index entries and ids.
    async fn repack(
        &self,
        cat: &mut Catalog,
        by_pack: &[u32],
        report: &mut PruneReport,
    ) -> Result<(Vec<IndexPack>, HashSet<PackId>)> {
        let target = self.config().pack_size as usize;
        let mut out = Vec::new();
        let mut writer = PackWriter::with_capacity(target + (4 << 20));
        for n in 0..cat.packs.len() as u32 {
            if cat.packs[n as usize].fate != Fate::Repack {
                continue;
            }
            let id = cat.packs[n as usize].id;
            let data = self.storage().get(&pack_key(&id)).await?;
            let run = cat.run(by_pack, n);
            let fits = run.iter().all(|&i| {
                let e = &cat.entries[i as usize];
                e.offset as usize + e.length as usize <= data.len()
            });
            if !fits || blake3::hash(&data).as_bytes() != &id.0 {
                tracing::warn!(
                    "pack {} does not match its id; it is kept as it is, not repacked \
                     (`pgkeep repo check --read-data` tells what it damages)",
                    pack_key(&id)
                );
                cat.packs[n as usize].fate = Fate::Keep;
                continue;
            }
            for &i in run {
                let e = cat.entries[i as usize];
                let stored = &data[e.offset as usize..(e.offset + e.length) as usize];
                let bases = cat.bases_of(&e.id).unwrap_or(&[]);
                writer.add(e.id, stored, e.raw_length, bases);
                report.bytes_repacked += e.length as u64;
                if writer.len() >= target {
                    let full = std::mem::replace(
                        &mut writer,
                        PackWriter::with_capacity(target + (4 << 20)),
                    );
                    out.push(self.upload_pack(full).await?);
                }
            }
            report.packs_repacked += 1;
        }
        if !writer.is_empty() {
            out.push(self.upload_pack(writer).await?);
        }
        let ids = out.iter().map(|p| p.id).collect();
        Ok((out, ids))
    }

    /// Uploads a finished pack; its index entry.
    async fn upload_pack(&self, pack: PackWriter) -> Result<IndexPack> {
        let (id, bytes, header) = pack.finish(self.sealer());
        let size = bytes.len() as u64;
        self.ensure_locks_held()?;
        self.storage()
            .put(&pack_key(&id), Bytes::from(bytes))
            .await?;
        Ok(IndexPack {
            id,
            size,
            blobs: header.blobs,
            deltas: header.deltas,
        })
    }

    async fn write_gc_index(&self, packs: Vec<IndexPack>) -> Result<String> {
        self.store_index_file(&IndexFile {
            version: FORMAT_VERSION,
            packs,
        })
        .await
    }
}

/// The figures of a dry run: what the run would remove, with the new packs' sizes
/// estimated from the live blobs they would hold.
fn dry_run_report(
    mut report: PruneReport,
    cat: &Catalog,
    unindexed: &[(PackId, u64, bool)],
) -> PruneReport {
    let mut removed = 0;
    let mut added = 0;
    let rewrite = report.blobs_removed > 0
        || cat.duplicates > 0
        || cat.packs.iter().any(|p| p.fate != Fate::Keep);
    for p in &cat.packs {
        if p.fate == Fate::Keep || p.stored.is_none() || !rewrite {
            continue;
        }
        report.packs_removed += 1;
        removed += p.stored.map_or(0, |s| s.0);
        if p.fate == Fate::Repack {
            report.packs_repacked += 1;
            report.bytes_repacked += p.live_bytes;
            added += p.live_bytes + p.live_header;
        }
    }
    for (_, size, young) in unindexed {
        if *young {
            report.unindexed_packs_kept += 1;
        } else {
            report.unindexed_packs_removed += 1;
            removed += size;
        }
    }
    report.bytes_after = report.bytes_before - removed + added;
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::collect_stream_refs;

    /// The streaming walk finds exactly the blobs that `stream_refs` finds in a manifest
    /// with streams at several depths, in arrays, beside look-alikes that are not streams.
    #[test]
    fn the_streaming_walk_finds_the_blobs_of_every_stream_ref() {
        let id = |n: u8| Id([n; 32]).to_hex();
        let body = serde_json::json!({
            "id": id(99),
            "label": "blobs",
            "files": [
                {"path": "base/1", "data": {"size": 3, "blobs": [{"id": id(1), "len": 1}, {"id": id(2), "len": 2}]}},
                {"path": "base/2", "data": {"size": 0, "blobs": []}, "nested": {"deeper": [{"size": 5, "blobs": [{"id": id(3), "len": 5}]}]}}
            ],
            "wal": {"size": 1, "blobs": [{"id": id(4), "len": 1}]},
            "not_a_ref": {"blobs": [{"id": "zz", "len": 1}, {"id": id(5), "len": 1, "extra": true}, 7, null]},
            "numbers": [1.5, -3, true]
        });
        let mut want = Vec::new();
        let mut refs = Vec::new();
        collect_stream_refs(&body, &mut refs);
        for r in refs {
            want.extend(r.blobs.iter().map(|b| b.id));
        }
        let json = serde_json::to_vec(&body).unwrap();
        let mut got = Vec::new();
        let mut f = |id: BlobId| got.push(id);
        let mut de = serde_json::Deserializer::from_slice(&json);
        BlobRefWalk::new(&mut f).deserialize(&mut de).unwrap();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(got.len(), 4);
    }
}
