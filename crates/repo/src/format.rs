//! Versioned, serde-typed objects of the repository format (see docs/design.md).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::{BlobId, PackId};

/// The repository format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Content-defined chunking parameters (FastCDC 2020), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkerParams {
    /// Smallest chunk.
    pub min: u32,
    /// Target average chunk size.
    pub avg: u32,
    /// Largest chunk.
    pub max: u32,
}

/// The parameters of new repositories. The minimum was 256 KiB before December 2026; 512 KiB
/// (restic's) spares the chunker a quarter of its scanning, for chunks a little larger (64 MiB
/// of `bench/ingest.sh`'s data: 53 chunks instead of 56).
impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 512 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
        }
    }
}

/// The `config` object: written once by `init`, plaintext, holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    /// Format version ([`FORMAT_VERSION`]).
    pub version: u32,
    /// Random repository id (hex).
    pub id: String,
    /// When the repository was created.
    pub created: DateTime<Utc>,
    /// Whether blobs and metadata are encrypted (AES-256-GCM, keys in `keys/`).
    pub encrypted: bool,
    /// zstd level used for blobs.
    pub compression_level: i32,
    /// Chunking parameters; fixed for the life of the repository so chunks dedupe.
    pub chunker: ChunkerParams,
    /// Target pack size in bytes.
    pub pack_size: u64,
}

/// Argon2id parameters of a key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Parallelism.
    pub p: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        // OWASP's recommended Argon2id setting (m = 19 MiB, t = 2): about 30 ms here, which keeps
        // `archive-push` start-up fast while making guessing costly.
        KdfParams {
            m_kib: 19 * 1024,
            t: 2,
            p: 1,
        }
    }
}

/// A `keys/<id>` object: the master key wrapped with a passphrase-derived key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Format version.
    pub version: u32,
    /// When the key was added.
    pub created: DateTime<Utc>,
    /// Host that added it.
    pub host: String,
    /// Always "argon2id".
    pub kdf: String,
    /// KDF parameters.
    pub kdf_params: KdfParams,
    /// Salt (hex).
    pub salt: String,
    /// nonce || AES-256-GCM(master key) || tag, hex.
    pub wrapped: String,
}

/// A `locks/<id>` object. Plaintext JSON; holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFile {
    /// Exclusive locks conflict with every other lock.
    pub exclusive: bool,
    /// Two locks with the same scope conflict even when shared (e.g. `backup:main`).
    pub scope: Option<String>,
    /// What the holder is doing.
    pub purpose: String,
    /// Host of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When the holder first took the lock (holder's clock; informative only).
    pub created: DateTime<Utc>,
}

/// One blob's place in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexBlob {
    /// The blob id.
    pub id: BlobId,
    /// Offset of the stored (sealed) blob in the pack.
    pub offset: u32,
    /// Stored length.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
}

/// The bases of one delta blob: full blobs whose plaintexts, concatenated in this order, are
/// the zstd reference prefix it was compressed against. A base is never itself a delta.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexDelta {
    /// The delta blob.
    pub id: BlobId,
    /// Its bases, in prefix order.
    pub bases: Vec<BlobId>,
}

/// One pack and its blobs, as listed in an index file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexPack {
    /// Pack id.
    pub id: PackId,
    /// Pack size in bytes.
    pub size: u64,
    /// Blobs in the pack.
    pub blobs: Vec<IndexBlob>,
    /// The bases of the pack's delta blobs (absent when it holds none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<IndexDelta>,
}

/// An `index/<id>` object (sealed, zstd-compressed JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexFile {
    /// Format version.
    pub version: u32,
    /// The packs this index file describes.
    pub packs: Vec<IndexPack>,
}

/// A reference to a byte stream stored as an ordered list of blobs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRef {
    /// Total length in bytes.
    pub size: u64,
    /// Blobs, in order.
    pub blobs: Vec<BlobRef>,
}

/// One blob of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobRef {
    /// The blob id.
    pub id: BlobId,
    /// Its plaintext length.
    pub len: u32,
}

/// Finds every [`StreamRef`] inside a JSON manifest body by shape (an object with exactly
/// `size` and `blobs`), so the repository can check references without knowing manifest types.
pub fn collect_stream_refs(value: &serde_json::Value, out: &mut Vec<StreamRef>) {
    match value {
        serde_json::Value::Object(map) => {
            if map.len() == 2 && map.contains_key("size") && map.contains_key("blobs") {
                if let Ok(s) = serde_json::from_value::<StreamRef>(value.clone()) {
                    out.push(s);
                    return;
                }
            }
            for v in map.values() {
                collect_stream_refs(v, out);
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                collect_stream_refs(v, out);
            }
        }
        _ => {}
    }
}
