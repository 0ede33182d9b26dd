//! Versioned, serde-typed objects of the repository format (see docs/design.md).

use chrono::{DateTime, Utc};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::id::{BlobId, Id, PackId};

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
    /// Whether a piece handed to `BlobWriter::ingest_reader_in_pieces` is stored as one blob
    /// (`true`) or cut by FastCDC within it (`false`, what repositories made before
    /// 2026-12-05 do, and what a `config` without the field means). Callers hand in pieces
    /// whose content never shifts inside them (a database file's fixed pages), where
    /// content-defined cuts find nothing to realign and cost 12% of a backup's CPU. Fixed
    /// for the life of a repository, like the sizes: changing it would give every piece new
    /// blob ids, so the next backup would store the data again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole_pieces: bool,
}

/// The parameters of new repositories. The minimum was 256 KiB before December 2026; 512 KiB
/// (restic's) spares the chunker a quarter of its scanning, for chunks a little larger (64 MiB
/// of `bench/ingest.sh`'s data: 53 chunks instead of 56). Pieces are stored whole since
/// 2026-12-05 (see [`ChunkerParams::whole_pieces`]).
impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 512 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
            whole_pieces: true,
        }
    }
}

/// Largest plaintext of one blob: the chunker's largest chunk (at most 16 MiB, see
/// [`RepoConfig::check`]) and a relation piece (`relation_chunk_size`, at most 16 MiB) are
/// never larger. Readers refuse larger lengths before allocating for them.
pub const MAX_BLOB_LEN: u32 = 16 << 20;

/// Pack sizes a repository may have. The command line offers 4..=128 MiB
/// (`repo init --pack-size`); 1 MiB is allowed so tests can make many packs from little
/// data. Above 128 MiB a pack is held in memory several times over by the writer's uploads.
pub const PACK_SIZE_LIMITS: std::ops::RangeInclusive<u64> = (1 << 20)..=(128 << 20);

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

impl RepoConfig {
    /// Checks the settings `init` writes and every later writer relies on: a zstd level in
    /// 1..=22, chunker sizes FastCDC accepts (it panics on others) with
    /// `64 KiB <= min < avg < max`, `min <= 1 MiB`, `avg <= 4 MiB`, `max <= 16 MiB`, and a
    /// pack size in [`PACK_SIZE_LIMITS`]. `config` is plaintext that nothing authenticates:
    /// it is checked when a repository is opened, not only when it is made.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=22).contains(&self.compression_level) {
            return Err(format!(
                "compression level {} is out of range 1..=22",
                self.compression_level
            ));
        }
        let c = self.chunker;
        if !(c.min < c.avg
            && c.avg < c.max
            && c.min >= 64 * 1024
            && c.min <= 1024 * 1024
            && c.avg <= 4 * 1024 * 1024
            && c.max <= MAX_BLOB_LEN)
        {
            return Err(format!("invalid chunker parameters {c:?}"));
        }
        if !PACK_SIZE_LIMITS.contains(&self.pack_size) {
            return Err(format!(
                "pack size {} bytes is out of range {}..={} bytes (1 MiB to 128 MiB)",
                self.pack_size,
                PACK_SIZE_LIMITS.start(),
                PACK_SIZE_LIMITS.end()
            ));
        }
        Ok(())
    }
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

/// Most memory a key file may ask Argon2id for: 1 GiB (the default is 19 MiB).
pub const MAX_KDF_MEMORY_KIB: u32 = 1 << 20;
/// Most Argon2id passes a key file may ask for (the default is 2).
pub const MAX_KDF_ITERATIONS: u32 = 16;
/// Most Argon2id lanes a key file may ask for (the default is 1).
pub const MAX_KDF_PARALLELISM: u32 = 16;

impl KdfParams {
    /// Refuses parameters outside the bounds above. Key files are read before anything
    /// authenticates them: unchecked, a damaged or hostile one could make the key derivation
    /// allocate terabytes or run for days (Argon2id's cost is `m_kib` KiB times `t` passes).
    pub fn check(&self) -> Result<(), String> {
        let ok = (1..=MAX_KDF_PARALLELISM).contains(&self.p)
            && (1..=MAX_KDF_ITERATIONS).contains(&self.t)
            && (8 * self.p..=MAX_KDF_MEMORY_KIB).contains(&self.m_kib);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "KDF parameters m_kib={} t={} p={} are out of bounds (p 1..={MAX_KDF_PARALLELISM}, \
                 t 1..={MAX_KDF_ITERATIONS}, m_kib 8*p..={MAX_KDF_MEMORY_KIB})",
                self.m_kib, self.t, self.p
            ))
        }
    }
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

/// Salt lengths a key file may carry (Argon2 needs at least 8 bytes; pgkeep writes 16).
const KEY_SALT_LEN: std::ops::RangeInclusive<usize> = 8..=64;

/// What unwrapping a key file's master key needs, decoded and checked by [`KeyFile::parse`].
#[derive(Debug, Clone)]
pub struct KeyMaterial {
    /// Argon2id parameters, within [`KdfParams::check`]'s bounds.
    pub kdf_params: KdfParams,
    /// The salt.
    pub salt: Vec<u8>,
    /// nonce || AES-256-GCM(master key) || tag.
    pub wrapped: Vec<u8>,
}

impl KeyFile {
    /// Parses a `keys/<id>` object and checks what the key derivation will be given: the
    /// argon2id KDF, parameters within [`KdfParams::check`]'s bounds, a hex salt of 8 to 64
    /// bytes and a hex wrapped key. The error says what is wrong.
    pub fn parse(raw: &[u8]) -> Result<(KeyFile, KeyMaterial), String> {
        let kf: KeyFile =
            serde_json::from_slice(raw).map_err(|e| format!("not a key file: {e}"))?;
        if kf.kdf != "argon2id" {
            return Err(format!("unknown KDF {:?} (pgkeep writes argon2id)", kf.kdf));
        }
        kf.kdf_params.check()?;
        let salt = hex::decode(&kf.salt).map_err(|e| format!("salt is not hex: {e}"))?;
        if !KEY_SALT_LEN.contains(&salt.len()) {
            return Err(format!("salt of {} bytes (8 to 64 expected)", salt.len()));
        }
        let wrapped =
            hex::decode(&kf.wrapped).map_err(|e| format!("wrapped key is not hex: {e}"))?;
        let material = KeyMaterial {
            kdf_params: kf.kdf_params,
            salt,
            wrapped,
        };
        Ok((kf, material))
    }
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

impl IndexFile {
    /// Checks what readers allocate or slice by: every blob's plaintext length is at most
    /// [`MAX_BLOB_LEN`] and its stored bytes lie inside its pack.
    pub fn check(&self) -> Result<(), String> {
        for p in &self.packs {
            for b in &p.blobs {
                if b.raw_length > MAX_BLOB_LEN {
                    return Err(format!(
                        "blob {} of pack {} has a plaintext length of {} bytes (at most {MAX_BLOB_LEN})",
                        b.id, p.id, b.raw_length
                    ));
                }
                if b.offset as u64 + b.length as u64 > p.size {
                    return Err(format!(
                        "blob {} extends past the end of pack {} ({} bytes)",
                        b.id, p.id, p.size
                    ));
                }
            }
        }
        Ok(())
    }
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

/// Walks a manifest's JSON as it is parsed and reports every blob reference: inside a
/// `blobs` array, an object of exactly `id` (a blob id) and `len`, the shape of a
/// [`StreamRef`]'s blobs. Everything else is skipped over. It finds
/// every blob that [`collect_stream_refs`] finds (which also requires the `size` beside
/// `blobs`); reporting more can only keep more.
pub(crate) struct BlobRefWalk<'f> {
    f: &'f mut dyn FnMut(BlobId),
    /// This value is an element of a `blobs` array.
    blob_ref: bool,
    /// This value is a `blobs` member.
    blob_list: bool,
}

impl<'f> BlobRefWalk<'f> {
    /// A walk of a whole manifest body that calls `f` with each blob id.
    pub(crate) fn new(f: &'f mut dyn FnMut(BlobId)) -> Self {
        BlobRefWalk {
            f,
            blob_ref: false,
            blob_list: false,
        }
    }
}

impl<'de> DeserializeSeed<'de> for BlobRefWalk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BlobRefWalk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON manifest")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> std::result::Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let f = self.f;
        while seq
            .next_element_seed(BlobRefWalk {
                f: &mut *f,
                blob_ref: self.blob_list,
                blob_list: false,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let f = self.f;
        let (mut id, mut len, mut other) = (None, false, false);
        while let Some(key) = map.next_key::<std::borrow::Cow<'_, str>>()? {
            match &*key {
                "id" if self.blob_ref => {
                    let v: serde_json::Value = map.next_value()?;
                    id = v.as_str().and_then(|s| s.parse::<Id>().ok());
                    other |= id.is_none();
                }
                "len" if self.blob_ref => {
                    let v: serde_json::Value = map.next_value()?;
                    len = v.is_u64();
                }
                k => {
                    other = true;
                    map.next_value_seed(BlobRefWalk {
                        f: &mut *f,
                        blob_ref: false,
                        blob_list: k == "blobs",
                    })?;
                }
            }
        }
        if let (Some(id), true, false) = (id, len, other) {
            f(id);
        }
        Ok(())
    }
}
