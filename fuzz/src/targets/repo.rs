//! What pgkeep reads back from a repository: packs, blobs, index files, key files and the
//! `config` and lock objects.
//!
//! Sealed objects are opened with the plain sealer, whose "seal" is a BLAKE3 trailer anyone
//! can compute: in a plain repository, whoever can write to the store can forge them, so
//! what lies behind the seal is parsed from hostile bytes too. Targets with a mode byte
//! (`pack`, `index_file`) take either the object as stored (even) or the plaintext behind
//! the seal (odd), which the target seals first so that mutations reach the parser behind it.

use std::borrow::Cow;
use std::sync::OnceLock;

use bytes::Bytes;
use pgkeep_repo::crypto::{derive_kek, unwrap_master, Sealer};
use pgkeep_repo::format::{KeyFile, LockFile, MAX_BLOB_LEN};
use pgkeep_repo::index::Index;
use pgkeep_repo::pack::{
    decode_blob, header_len_from_trailer, parse_pack_header, read_pack_header, BasePlaintexts,
    PackHeader, MAX_DELTA_BASES, TRAILER_LEN,
};
use pgkeep_repo::repository::{parse_config, parse_index_file};
use pgkeep_repo::Id;

/// The associated data of a pack header (pack.rs) and of an index file (repository.rs): the
/// corpus test `sealed_plaintext_modes_reach_the_parser` fails if these drift.
pub const PACK_HEADER_AAD: &[u8] = b"pgkeep-pack-header";
/// See [`PACK_HEADER_AAD`].
pub const INDEX_AAD: &[u8] = b"pgkeep-index";

/// The plaintext every delta base named in a fuzzed blob or pack stands for; the corpus's
/// delta blobs were compressed against it, so they decode.
pub fn delta_base() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        // Text-like, compressible, not trivial: a table's rows.
        (0..4000u32)
            .flat_map(|i| {
                format!(
                    "{i}\tcustomer {}\t{}.{:02}\n",
                    i * 7919 % 1000,
                    i % 97,
                    i % 100
                )
                .into_bytes()
            })
            .collect()
    })
}

/// Bases for every delta base id `ids` names, all standing for [`delta_base`].
fn bases_for<'a>(ids: impl Iterator<Item = &'a Id>) -> BasePlaintexts {
    let base = Bytes::from_static(delta_base());
    ids.map(|id| (*id, base.clone())).collect()
}

/// The base ids a stored delta blob names (its frame byte 2, a count, then the ids).
fn delta_ids(stored: &[u8]) -> Vec<Id> {
    match stored {
        [2, n, rest @ ..] => rest
            .chunks_exact(32)
            .take((*n as usize).min(MAX_DELTA_BASES))
            .map(|c| Id(c.try_into().expect("32 bytes")))
            .collect(),
        _ => Vec::new(),
    }
}

/// A pack object. Even mode byte: the pack as stored. Odd: `u16 LE n`, `n` bytes of blob data,
/// then the header's plaintext (`u32 count`, entries, delta section), sealed and framed here.
/// Both header readers must agree (the whole object, and the trailer-then-tail reads of
/// `repo repair-index`); every blob the header lists is decoded.
pub fn pack(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let bytes: Cow<[u8]> = if mode & 1 == 0 {
        Cow::Borrowed(rest)
    } else {
        Cow::Owned(assemble_pack(rest))
    };
    let sealer = Sealer::Plain;
    let whole = read_pack_header(&sealer, &bytes, "fuzz");
    if bytes.len() as u64 >= TRAILER_LEN {
        let size = bytes.len() as u64;
        if let Ok(hlen) = header_len_from_trailer(&bytes[bytes.len() - 8..], "fuzz") {
            if hlen + TRAILER_LEN <= size {
                let tail = &bytes[(size - TRAILER_LEN - hlen) as usize..];
                let by_tail = parse_pack_header(&sealer, tail, size, "fuzz");
                match (&whole, &by_tail) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "the two header readers disagree"),
                    (Err(_), Err(_)) => {}
                    _ => panic!(
                        "one header reader accepts what the other refuses: whole {:?}, tail {:?}",
                        whole.as_ref().map(|_| ()),
                        by_tail.as_ref().map(|_| ())
                    ),
                }
            }
        }
    }
    let Ok(header) = whole else {
        return false;
    };
    decode_listed(&sealer, &bytes, &header);
    true
}

fn assemble_pack(rest: &[u8]) -> Vec<u8> {
    let n = match rest {
        [a, b, ..] => u16::from_le_bytes([*a, *b]) as usize,
        _ => 0,
    };
    let rest = rest.get(2..).unwrap_or_default();
    let (blobs, header) = rest.split_at(n.min(rest.len()));
    let mut out = blobs.to_vec();
    let sealed = Sealer::Plain.seal_meta(PACK_HEADER_AAD, header);
    out.extend_from_slice(&sealed);
    out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    out.extend_from_slice(b"PGKP");
    out
}

/// Decodes the blobs a parsed header lists, as `repo check --read-data` does.
fn decode_listed(sealer: &Sealer, pack: &[u8], header: &PackHeader) {
    let mut d = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    let bases = bases_for(header.deltas.iter().flat_map(|d| d.bases.iter()));
    for b in header.blobs.iter().take(32) {
        let (s, e) = (b.offset as usize, b.offset as usize + b.length as usize);
        assert!(
            e <= pack.len(),
            "a parsed header lists a blob past the pack's end"
        );
        let _ = decode_blob(
            sealer,
            &mut d,
            &b.id,
            b.raw_length,
            &pack[s..e],
            &bases,
            "fuzz",
        );
    }
}

/// One stored blob: its 32-byte id, its plaintext length (u32 LE), then the blob as a plain
/// repository stores it (frame byte, payload). Decoded as the reader does; a delta's bases all
/// stand for [`delta_base`]. Accepted blobs must have the length and id they claim.
pub fn blob(data: &[u8]) -> bool {
    if data.len() < 36 {
        return false;
    }
    let id = Id(data[..32].try_into().expect("32 bytes"));
    let raw_length = u32::from_le_bytes(data[32..36].try_into().expect("4 bytes"));
    let stored = &data[36..];
    let bases = bases_for(delta_ids(stored).iter());
    let sealer = Sealer::Plain;
    let mut d = zstd::bulk::Decompressor::new().expect("zstd decompressor");
    match decode_blob(&sealer, &mut d, &id, raw_length, stored, &bases, "fuzz") {
        Ok(plain) => {
            assert_eq!(plain.len(), raw_length as usize);
            assert!(raw_length <= MAX_BLOB_LEN);
            assert_eq!(sealer.blob_id(&plain), id, "a blob decoded to another id");
            true
        }
        Err(_) => false,
    }
}

/// An index file. Even mode byte: the object as stored (sealed zstd JSON). Odd: its JSON,
/// compressed and sealed here. An accepted file is loaded into an index, whose locations
/// must respect the bounds the readers rely on.
pub fn index_file(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let raw: Cow<[u8]> = if mode & 1 == 0 {
        Cow::Borrowed(rest)
    } else {
        let z = zstd::bulk::compress(rest, 1).expect("zstd compresses");
        Cow::Owned(Sealer::Plain.seal_meta(INDEX_AAD, &z))
    };
    let Ok(file) = parse_index_file(&Sealer::Plain, "index/fuzz", &raw) else {
        return false;
    };
    let mut index = Index::default();
    index.add_file(&file);
    for (id, loc) in index.iter() {
        let (_, size) = index.pack(loc.pack);
        assert!(
            loc.raw_length <= MAX_BLOB_LEN,
            "an index accepted a huge blob"
        );
        assert!(loc.offset as u64 + loc.length as u64 <= size);
        let _ = index.bases_of(id);
    }
    true
}

/// A `keys/<id>` object, as opening an encrypted repository reads it. Accepted files must
/// carry KDF parameters within the bounds; cheap ones are run with the passphrase `fuzz` (the
/// corpus's small key files unwrap with it).
pub fn key_file(data: &[u8]) -> bool {
    let Ok((_, k)) = KeyFile::parse(data) else {
        return false;
    };
    assert!(k.kdf_params.check().is_ok());
    let p = k.kdf_params;
    if p.m_kib <= 1024 && p.t <= 2 && p.p <= 2 {
        let kek = derive_kek("fuzz", &k.salt, p).expect("checked parameters derive");
        let _ = unwrap_master(&kek, &k.wrapped);
    }
    true
}

/// The `config` object (JSON) as opening a repository reads it, and a lock object. An
/// accepted configuration's chunker must be one FastCDC takes: it is run over a buffer.
pub fn repo_config(data: &[u8]) -> bool {
    let _ = serde_json::from_slice::<LockFile>(data);
    let Ok(config) = parse_config(data, "fuzz") else {
        return false;
    };
    let c = config.chunker;
    let buf = delta_base();
    let cut: usize = fastcdc::v2020::FastCDC::new(buf, c.min, c.avg, c.max)
        .map(|chunk| chunk.length)
        .sum();
    assert_eq!(cut, buf.len());
    true
}
