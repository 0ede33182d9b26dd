//! The in-memory index: which pack holds each blob.

use std::collections::HashMap;
use std::sync::Arc;

use crate::format::{IndexFile, IndexPack};
use crate::id::{BlobId, PackId};

/// Where one blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    /// Pack number in [`Index::packs`].
    pub pack: u32,
    /// Offset of the stored blob in the pack.
    pub offset: u32,
    /// Stored length.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
}

/// Blob id -> location, built from all index files.
#[derive(Debug, Default)]
pub struct Index {
    blobs: HashMap<BlobId, BlobLocation>,
    packs: Vec<(PackId, u64)>,
    pack_numbers: HashMap<PackId, u32>,
    /// The bases of every delta blob, for the location the index chose.
    bases: HashMap<BlobId, Arc<[BlobId]>>,
}

impl Index {
    /// Adds every pack of an index file. Later duplicates of a blob are ignored.
    pub fn add_file(&mut self, file: &IndexFile) {
        for p in &file.packs {
            self.add_pack(p);
        }
    }

    /// Adds one pack.
    pub fn add_pack(&mut self, p: &IndexPack) {
        let n = match self.pack_numbers.get(&p.id) {
            Some(n) => *n,
            None => {
                let n = self.packs.len() as u32;
                self.packs.push((p.id, p.size));
                self.pack_numbers.insert(p.id, n);
                n
            }
        };
        for b in &p.blobs {
            if let std::collections::hash_map::Entry::Vacant(v) = self.blobs.entry(b.id) {
                v.insert(BlobLocation {
                    pack: n,
                    offset: b.offset,
                    length: b.length,
                    raw_length: b.raw_length,
                });
                // The same plaintext may be stored in full in one pack and as a delta in
                // another: the bases are those of the copy the index reads.
                if let Some(d) = p.deltas.iter().find(|d| d.id == b.id) {
                    self.bases.insert(b.id, d.bases.clone().into());
                }
            }
        }
    }

    /// The bases of a delta blob; `None` for a full blob (or one not indexed).
    pub fn bases_of(&self, id: &BlobId) -> Option<Arc<[BlobId]>> {
        self.bases.get(id).cloned()
    }

    /// Number of delta blobs.
    pub fn delta_count(&self) -> usize {
        self.bases.len()
    }

    /// True when the blob is indexed.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.blobs.contains_key(id)
    }

    /// Where the blob is.
    pub fn get(&self, id: &BlobId) -> Option<BlobLocation> {
        self.blobs.get(id).copied()
    }

    /// Pack id and size of pack number `n`.
    pub fn pack(&self, n: u32) -> (PackId, u64) {
        self.packs[n as usize]
    }

    /// Every indexed pack with its size.
    pub fn packs(&self) -> &[(PackId, u64)] {
        &self.packs
    }

    /// Number of indexed blobs.
    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// Iterates over every (blob, location).
    pub fn iter(&self) -> impl Iterator<Item = (&BlobId, &BlobLocation)> {
        self.blobs.iter()
    }
}
