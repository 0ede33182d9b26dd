//! The in-memory index: which pack holds each blob.

use std::collections::HashMap;

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
            self.blobs.entry(b.id).or_insert(BlobLocation {
                pack: n,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
            });
        }
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
