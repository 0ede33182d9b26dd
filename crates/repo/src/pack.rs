//! Packs: many sealed blobs in one object, with a sealed header at the end.
//!
//! Layout: `blob_0 .. blob_n || sealed header || header length (u32 LE) || "PGKP"`.
//! The header lists (id, offset, length, raw length) of every blob, so the index can be
//! rebuilt from packs alone. A pack's id is the BLAKE3 of all its bytes.
//!
//! A blob's plaintext before sealing is framed as one byte (0 = stored raw, 1 = zstd, 2 =
//! zstd delta) and the payload; raw storage is chosen when compression does not shrink the
//! chunk. A delta payload is the number of its bases (one byte), their ids, and a zstd frame
//! compressed against the bases' plaintexts, concatenated in that order, as its reference
//! prefix. Bases are full (raw or zstd) blobs: a delta never depends on another delta.
//!
//! The header's entries may be followed by a delta section (u32 count, then per delta blob
//! its id, one byte n and n base ids), so that an index rebuilt from packs alone still knows
//! every delta's bases.

use std::collections::HashMap;

use bytes::Bytes;

use crate::crypto::Sealer;
use crate::error::{RepoError, Result};
use crate::format::{IndexBlob, IndexDelta, MAX_BLOB_LEN};
use crate::id::{BlobId, Id, PackId};

const MAGIC: &[u8; 4] = b"PGKP";
const ENTRY_LEN: usize = 32 + 4 + 4 + 4;
const HEADER_AAD: &[u8] = b"pgkeep-pack-header";

const FRAME_RAW: u8 = 0;
const FRAME_ZSTD: u8 = 1;
const FRAME_ZSTD_DELTA: u8 = 2;

/// Most bases one delta blob names.
pub const MAX_DELTA_BASES: usize = 8;

/// A thread's joined-prefix buffer is freed after a use above twice this.
const MAX_PREFIX_KEPT: usize = 16 << 20;

thread_local! {
    static PREFIX: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Plaintexts of full blobs, by id: the reference prefixes delta blobs are decoded with.
pub type BasePlaintexts = HashMap<BlobId, Bytes>;

/// Bytes of one compressibility sample (see [`looks_incompressible`]).
const PROBE_SAMPLE: usize = 8 << 10;
/// Samples taken across a chunk before it is judged incompressible.
const PROBE_SAMPLES: usize = 4;

/// Whether `plain` is not worth compressing: each of [`PROBE_SAMPLES`] samples spread over
/// it shrinks by less than 3% under `compressor`. Already-compressed or encrypted data
/// (TOAST-compressed values, images, ciphertext) is common in databases; skipping zstd on
/// it cut the ingest's instructions by 19% on random data (callgrind, 32 MiB). A sample
/// that compresses ends the probe at once, so compressible data pays for about one sample
/// per chunk: 1.1% more instructions on `bench/ingest.sh`'s mixed data, whose chunks all
/// hold some text. Chunks under four samples are always compressed. A chunk whose only
/// redundancy is between samples far apart is misjudged and stored raw: that costs space,
/// never correctness.
fn looks_incompressible(compressor: &mut zstd::bulk::Compressor<'_>, plain: &[u8]) -> bool {
    if plain.len() < PROBE_SAMPLES * PROBE_SAMPLE {
        return false;
    }
    let mut buf = [0u8; PROBE_SAMPLE + 1024];
    let last = plain.len() - PROBE_SAMPLE;
    (0..PROBE_SAMPLES).all(|k| {
        let at = last * k / (PROBE_SAMPLES - 1);
        match compressor.compress_to_buffer(&plain[at..at + PROBE_SAMPLE], &mut buf[..]) {
            Ok(n) => n > PROBE_SAMPLE - PROBE_SAMPLE * 3 / 100,
            Err(_) => false,
        }
    })
}

/// Largest zstd block of a full blob: just under zstd's 128 KiB default, which switches off
/// zstd 1.5.7's block pre-splitter (it only splits blocks of the full 128 KiB). The splitter
/// sampled every block to look for a better cut: 5.8% of the ingest's instructions
/// (callgrind, 64 MiB of `bench/ingest.sh`'s mixed data) for 0.07% smaller packs. Blocks
/// are a compressor-side choice; any zstd decoder reads them.
const BLOB_BLOCK_MAX: u32 = 127 << 10;

/// The compressor [`encode_blob`] expects: zstd at `level` with [`BLOB_BLOCK_MAX`] blocks.
pub fn blob_compressor(level: i32) -> Result<zstd::bulk::Compressor<'static>> {
    let zerr = |e: std::io::Error| RepoError::Invalid(format!("zstd init failed: {e}"));
    let mut c = zstd::bulk::Compressor::new(level).map_err(zerr)?;
    c.set_parameter(zstd::zstd_safe::CParameter::MaxBlockSize(BLOB_BLOCK_MAX))
        .map_err(zerr)?;
    Ok(c)
}

/// Compresses and seals one blob (stored raw when compression would not shrink it, or
/// when [`looks_incompressible`] says so). `compressor` is reused per thread.
pub fn encode_blob(
    sealer: &Sealer,
    compressor: &mut zstd::bulk::Compressor<'_>,
    id: &BlobId,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    // Everything is built in `out` itself: compressed straight into its spare capacity (no
    // zeroing, no intermediate buffer), then sealed in place. Copies of a blob were a tenth of
    // the ingest's CPU.
    let start = out.len();
    let header = sealer.blob_header_len();
    if looks_incompressible(compressor, plain) {
        out.reserve(header + 1 + plain.len() + sealer.blob_overhead());
        out.resize(start + header, 0);
        out.push(FRAME_RAW);
        out.extend_from_slice(plain);
        sealer.seal_blob_in_place(id, out, start);
        return Ok(());
    }
    out.reserve(header + 1 + zstd::zstd_safe::compress_bound(plain.len()) + sealer.blob_overhead());
    out.resize(start + header, 0);
    out.push(FRAME_ZSTD);
    let mut dst = std::io::Cursor::new(&mut *out);
    dst.set_position((start + header + 1) as u64);
    let n = compressor
        .compress_to_buffer(plain, &mut dst)
        .map_err(|e| RepoError::Invalid(format!("zstd compression failed: {e}")))?;
    if n >= plain.len() {
        out.truncate(start + header);
        out.push(FRAME_RAW);
        out.extend_from_slice(plain);
    }
    sealer.seal_blob_in_place(id, out, start);
    Ok(())
}

/// Compresses `plain` against `prefix`, the concatenated plaintexts of `bases` (full blobs,
/// at most [`MAX_DELTA_BASES`]), and seals it as a delta blob into `out` (appended). Returns
/// false and leaves `out` as it was when the sealed delta would exceed `max_len` bytes.
#[allow(clippy::too_many_arguments)]
pub fn encode_delta_blob(
    sealer: &Sealer,
    level: i32,
    id: &BlobId,
    plain: &[u8],
    bases: &[BlobId],
    prefix: &[u8],
    max_len: usize,
    out: &mut Vec<u8>,
) -> Result<bool> {
    use zstd::zstd_safe::{CCtx, CParameter};
    if bases.is_empty() || bases.len() > MAX_DELTA_BASES {
        return Ok(false);
    }
    let zerr = |e: usize| {
        RepoError::Invalid(format!(
            "zstd delta compression failed: {}",
            zstd::zstd_safe::get_error_name(e)
        ))
    };
    // The window must reach from the chunk back to the start of the prefix; long-distance
    // matching finds the prefix's matches that level-3 hash tables (2^17 entries) forget.
    let window = (prefix.len() + plain.len())
        .next_power_of_two()
        .trailing_zeros();
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(zerr)?;
    cctx.set_parameter(CParameter::WindowLog(window.clamp(20, 27)))
        .map_err(zerr)?;
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
        .map_err(zerr)?;
    cctx.ref_prefix(prefix).map_err(zerr)?;
    let start = out.len();
    let header = sealer.blob_header_len();
    out.reserve(
        header
            + 2
            + 32 * bases.len()
            + zstd::zstd_safe::compress_bound(plain.len())
            + sealer.blob_overhead(),
    );
    out.resize(start + header, 0);
    out.push(FRAME_ZSTD_DELTA);
    out.push(bases.len() as u8);
    for b in bases {
        out.extend_from_slice(&b.0);
    }
    let at = out.len();
    let mut dst = std::io::Cursor::new(&mut *out);
    dst.set_position(at as u64);
    let n = cctx.compress2(&mut dst, plain).map_err(zerr)?;
    if at - start + n + sealer.blob_overhead() > max_len {
        out.truncate(start);
        return Ok(false);
    }
    sealer.seal_blob_in_place(id, out, start);
    Ok(true)
}

/// Opens, decompresses and verifies one stored blob. Never returns unverified bytes.
pub fn decode_blob(
    sealer: &Sealer,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    id: &BlobId,
    raw_length: u32,
    stored: &[u8],
    bases: &BasePlaintexts,
    where_: &str,
) -> Result<Vec<u8>> {
    // The length comes from an index or a pack header: checked before it is allocated.
    if raw_length > MAX_BLOB_LEN {
        return Err(RepoError::integrity(
            format!("blob {id} in {where_}"),
            format!("a plaintext length of {raw_length} bytes (blobs hold at most {MAX_BLOB_LEN})"),
        ));
    }
    let mut plain = vec![0u8; raw_length as usize];
    decode_blob_into(sealer, decompressor, id, stored, &mut plain, bases, where_)?;
    Ok(plain)
}

/// Opens, decompresses and verifies one stored blob into `dst`, which must be exactly its
/// raw length. A delta blob is decoded with its bases' plaintexts from `bases` (the caller
/// fetched them, see [`Index::bases_of`](crate::index::Index::bases_of)). On error `dst`
/// holds garbage that must not be used.
pub fn decode_blob_into(
    sealer: &Sealer,
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    id: &BlobId,
    stored: &[u8],
    dst: &mut [u8],
    bases: &BasePlaintexts,
    where_: &str,
) -> Result<()> {
    let raw_length = dst.len();
    let bad =
        |reason: &str| RepoError::integrity(format!("blob {} in {where_}", id), reason.to_string());
    let framed = sealer
        .open_blob(id, stored)
        .ok_or_else(|| bad("authentication failed (data altered or wrong key)"))?;
    let (flag, payload) = framed.split_first().ok_or_else(|| bad("empty blob"))?;
    let n = match *flag {
        FRAME_RAW => {
            if payload.len() == raw_length {
                dst.copy_from_slice(payload);
            }
            payload.len()
        }
        FRAME_ZSTD => decompressor
            .decompress_to_buffer(payload, dst)
            .map_err(|e| bad(&format!("zstd: {e}")))?,
        FRAME_ZSTD_DELTA => {
            let (ids, frame) = delta_parts(payload).ok_or_else(|| bad("bad delta header"))?;
            let mut parts = Vec::with_capacity(ids.len());
            for b in &ids {
                parts.push(bases.get(b).ok_or_else(|| {
                    bad(&format!(
                        "its delta base {b} is not available (missing from the index, or itself a delta)"
                    ))
                })?);
            }
            let zerr = |e: usize| bad(&format!("zstd: {}", zstd::zstd_safe::get_error_name(e)));
            let run = |prefix: &[u8], dst: &mut [u8]| {
                let mut dctx = zstd::zstd_safe::DCtx::create();
                dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(27))
                    .map_err(zerr)?;
                dctx.ref_prefix(prefix).map_err(zerr)?;
                dctx.decompress(dst, frame).map_err(zerr)
            };
            if parts.len() == 1 {
                run(parts[0], dst)?
            } else {
                // Joined in a buffer kept per thread: one memcpy per base, and no fresh
                // pages to fault in for every blob.
                PREFIX.with(|cell| {
                    let mut joined = cell.borrow_mut();
                    joined.clear();
                    for p in &parts {
                        joined.extend_from_slice(p);
                    }
                    let n = run(&joined, dst);
                    if joined.capacity() > 2 * MAX_PREFIX_KEPT {
                        *joined = Vec::new();
                    }
                    n
                })?
            }
        }
        other => return Err(bad(&format!("unknown frame type {other}"))),
    };
    if n != raw_length {
        return Err(bad(&format!("length {n} instead of {raw_length}")));
    }
    if sealer.blob_id(dst) != *id {
        return Err(bad("content does not match its id"));
    }
    Ok(())
}

/// The base ids and the zstd frame of a delta payload.
fn delta_parts(payload: &[u8]) -> Option<(Vec<BlobId>, &[u8])> {
    let (&n, rest) = payload.split_first()?;
    let n = n as usize;
    if n == 0 || n > MAX_DELTA_BASES || rest.len() < 32 * n {
        return None;
    }
    let ids = rest[..32 * n]
        .chunks_exact(32)
        .map(|c| Id(c.try_into().expect("32 bytes")))
        .collect();
    Some((ids, &rest[32 * n..]))
}

/// Accumulates sealed blobs into one pack.
#[derive(Default)]
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<IndexBlob>,
    deltas: Vec<IndexDelta>,
}

/// What a pack's header lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackHeader {
    /// Every blob, in pack order.
    pub blobs: Vec<IndexBlob>,
    /// The bases of the delta blobs among them.
    pub deltas: Vec<IndexDelta>,
}

impl PackWriter {
    /// An empty pack with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        PackWriter {
            buf: Vec::with_capacity(capacity),
            entries: Vec::new(),
            deltas: Vec::new(),
        }
    }

    /// Appends one sealed blob; `bases` are those of a delta blob (empty for a full one).
    pub fn add(&mut self, id: BlobId, sealed: &[u8], raw_length: u32, bases: &[BlobId]) {
        if !bases.is_empty() {
            self.deltas.push(IndexDelta {
                id,
                bases: bases.to_vec(),
            });
        }
        let offset = self.buf.len() as u32;
        self.buf.extend_from_slice(sealed);
        self.entries.push(IndexBlob {
            id,
            offset,
            length: sealed.len() as u32,
            raw_length,
        });
    }

    /// Bytes of blob data so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the header and returns (pack id, bytes, header).
    pub fn finish(mut self, sealer: &Sealer) -> (PackId, Vec<u8>, PackHeader) {
        let mut header = Vec::with_capacity(4 + self.entries.len() * ENTRY_LEN);
        header.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            header.extend_from_slice(&e.id.0);
            header.extend_from_slice(&e.offset.to_le_bytes());
            header.extend_from_slice(&e.length.to_le_bytes());
            header.extend_from_slice(&e.raw_length.to_le_bytes());
        }
        if !self.deltas.is_empty() {
            header.extend_from_slice(&(self.deltas.len() as u32).to_le_bytes());
            for d in &self.deltas {
                header.extend_from_slice(&d.id.0);
                header.push(d.bases.len() as u8);
                for b in &d.bases {
                    header.extend_from_slice(&b.0);
                }
            }
        }
        let sealed = sealer.seal_meta(HEADER_AAD, &header);
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(MAGIC);
        let id = Id(*blake3::hash(&self.buf).as_bytes());
        let header = PackHeader {
            blobs: self.entries,
            deltas: self.deltas,
        };
        (id, self.buf, header)
    }
}

/// Bytes at the end of a pack that give the header's length: u32 LE length, then the magic.
pub const TRAILER_LEN: u64 = 8;

/// Parses and verifies the header of a whole pack.
pub fn read_pack_header(sealer: &Sealer, pack: &[u8], name: &str) -> Result<PackHeader> {
    parse_pack_header(sealer, pack, pack.len() as u64, name)
}

/// The length of the sealed header, from the last [`TRAILER_LEN`] bytes of a pack.
pub fn header_len_from_trailer(trailer: &[u8], name: &str) -> Result<u64> {
    if trailer.len() != TRAILER_LEN as usize || &trailer[4..] != MAGIC {
        return Err(RepoError::integrity(
            format!("pack {name}"),
            "no pack trailer (truncated or not a pack)",
        ));
    }
    Ok(u32::from_le_bytes(trailer[..4].try_into().unwrap()) as u64)
}

/// Parses and verifies a pack header from `tail`, the last bytes of a pack of `pack_len`
/// bytes (the whole pack, or at least the header and trailer). Lets the index be rebuilt
/// from two range reads per pack instead of whole downloads.
pub fn parse_pack_header(
    sealer: &Sealer,
    tail: &[u8],
    pack_len: u64,
    name: &str,
) -> Result<PackHeader> {
    let bad = |r: &str| RepoError::integrity(format!("pack {name}"), r.to_string());
    let t = tail.len();
    if t < 8 || t as u64 > pack_len || &tail[t - 4..] != MAGIC {
        return Err(bad("no pack trailer (truncated or not a pack)"));
    }
    let hlen = u32::from_le_bytes(tail[t - 8..t - 4].try_into().unwrap()) as usize;
    if hlen + 8 > t {
        return Err(bad("header length out of range"));
    }
    // Where the header starts, as an offset in the tail and in the pack.
    let start_in_tail = t - 8 - hlen;
    let start = pack_len - (t - start_in_tail) as u64;
    let header = sealer
        .open_meta(HEADER_AAD, &tail[start_in_tail..t - 8])
        .ok_or_else(|| bad("header authentication failed"))?;
    if header.len() < 4 {
        return Err(bad("short header"));
    }
    let n = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    if header.len() < 4 + n * ENTRY_LEN {
        return Err(bad("header size does not match its entry count"));
    }
    let deltas = parse_delta_section(&header[4 + n * ENTRY_LEN..])
        .ok_or_else(|| bad("bad delta section in the header"))?;
    let mut out = Vec::with_capacity(n);
    for e in header[4..4 + n * ENTRY_LEN].chunks_exact(ENTRY_LEN) {
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let b = IndexBlob {
            id: Id(id),
            offset: u32::from_le_bytes(e[32..36].try_into().unwrap()),
            length: u32::from_le_bytes(e[36..40].try_into().unwrap()),
            raw_length: u32::from_le_bytes(e[40..44].try_into().unwrap()),
        };
        if b.offset as u64 + b.length as u64 > start {
            return Err(bad("blob extends past the data area"));
        }
        if b.raw_length > MAX_BLOB_LEN {
            return Err(bad("a blob's plaintext length is larger than any blob"));
        }
        out.push(b);
    }
    Ok(PackHeader { blobs: out, deltas })
}

/// The delta section after a header's entries (empty: none).
fn parse_delta_section(mut s: &[u8]) -> Option<Vec<IndexDelta>> {
    let mut out = Vec::new();
    if s.is_empty() {
        return Some(out);
    }
    let n = u32::from_le_bytes(s.get(..4)?.try_into().ok()?) as usize;
    s = &s[4..];
    for _ in 0..n {
        let id = Id(s.get(..32)?.try_into().ok()?);
        let k = *s.get(32)? as usize;
        if k == 0 || k > MAX_DELTA_BASES {
            return None;
        }
        let bases = s
            .get(33..33 + 32 * k)?
            .chunks_exact(32)
            .map(|c| Id(c.try_into().expect("32 bytes")))
            .collect();
        out.push(IndexDelta { id, bases });
        s = &s[33 + 32 * k..];
    }
    s.is_empty().then_some(out)
}

/// The storage key of a pack.
pub fn pack_key(id: &PackId) -> String {
    let h = id.to_hex();
    format!("packs/{}/{}", &h[..2], h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn roundtrip(sealer: Sealer) {
        let mut c = blob_compressor(3).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let blobs: Vec<Vec<u8>> = vec![
            vec![7u8; 100_000],
            (0..50_000u32)
                .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
                .collect(),
            vec![],
        ];
        // A new version of the second blob: a few bytes changed here and there.
        let mut changed = blobs[1].clone();
        for i in (0..changed.len()).step_by(20_000) {
            changed[i] ^= 0x5a;
        }
        let base = sealer.blob_id(&blobs[1]);
        let none = BasePlaintexts::new();
        let mut pw = PackWriter::with_capacity(1 << 20);
        for b in &blobs {
            let id = sealer.blob_id(b);
            let mut out = Vec::new();
            encode_blob(&sealer, &mut c, &id, b, &mut out).unwrap();
            pw.add(id, &out, b.len() as u32, &[]);
        }
        let delta_id = sealer.blob_id(&changed);
        let mut out = Vec::new();
        let stored = encode_delta_blob(
            &sealer,
            3,
            &delta_id,
            &changed,
            &[base],
            &blobs[1],
            changed.len() / 16,
            &mut out,
        )
        .unwrap();
        assert!(stored, "a 10-byte change did not make a small delta");
        assert!(out.len() < 2000, "delta of {} bytes", out.len());
        // A limit the delta cannot meet leaves `out` as it was.
        let mut none_out = vec![1u8, 2, 3];
        let too_small = encode_delta_blob(
            &sealer,
            3,
            &delta_id,
            &changed,
            &[base],
            &blobs[1],
            10,
            &mut none_out,
        )
        .unwrap();
        assert!(!too_small);
        assert_eq!(none_out, [1, 2, 3]);
        pw.add(delta_id, &out, changed.len() as u32, &[base]);

        let (pid, bytes, header) = pw.finish(&sealer);
        assert_eq!(pid.0, *blake3::hash(&bytes).as_bytes());
        let parsed = read_pack_header(&sealer, &bytes, "t").unwrap();
        assert_eq!(parsed, header);
        assert_eq!(
            parsed.deltas,
            [IndexDelta {
                id: delta_id,
                bases: vec![base]
            }]
        );
        let entries = &header.blobs;
        let stored_of = |e: &IndexBlob| &bytes[e.offset as usize..(e.offset + e.length) as usize];
        for (e, b) in entries.iter().zip(&blobs) {
            let plain = decode_blob(
                &sealer,
                &mut d,
                &e.id,
                e.raw_length,
                stored_of(e),
                &none,
                "t",
            )
            .unwrap();
            assert_eq!(&plain, b);
        }
        // The delta decodes with its base, and is refused without it or with another one.
        let e = entries[3];
        let with_base: BasePlaintexts = [(base, Bytes::from(blobs[1].clone()))].into();
        let plain = decode_blob(
            &sealer,
            &mut d,
            &e.id,
            e.raw_length,
            stored_of(&e),
            &with_base,
            "t",
        )
        .unwrap();
        assert_eq!(plain, changed);
        let err = decode_blob(
            &sealer,
            &mut d,
            &e.id,
            e.raw_length,
            stored_of(&e),
            &none,
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!("its delta base {base} is not available")),
            "{err}"
        );
        let wrong: BasePlaintexts = [(base, Bytes::from(blobs[0].clone()))].into();
        assert!(decode_blob(
            &sealer,
            &mut d,
            &e.id,
            e.raw_length,
            stored_of(&e),
            &wrong,
            "t"
        )
        .is_err());
        // A flipped byte in the first blob is caught.
        let e = entries[0];
        let mut stored = stored_of(&e).to_vec();
        let mid = stored.len() / 2;
        stored[mid] ^= 0x40;
        assert!(decode_blob(&sealer, &mut d, &e.id, e.raw_length, &stored, &none, "t").is_err());
        // A truncated pack is caught.
        assert!(read_pack_header(&sealer, &bytes[..bytes.len() - 3], "t").is_err());
    }

    #[test]
    fn a_pack_without_delta_blobs_has_no_delta_section() {
        let sealer = Sealer::Plain;
        let mut pw = PackWriter::with_capacity(1 << 10);
        pw.add(sealer.blob_id(b"x"), b"sealed", 1, &[]);
        let (_, bytes, header) = pw.finish(&sealer);
        assert!(header.deltas.is_empty());
        // count + one entry, nothing after it: the layout packs had before delta blobs.
        let hlen = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap());
        assert_eq!(hlen as usize, 4 + ENTRY_LEN + 32);
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn encoded(sealer: &Sealer, plain: &[u8]) -> Vec<u8> {
        let mut c = blob_compressor(3).unwrap();
        let mut out = Vec::new();
        encode_blob(sealer, &mut c, &sealer.blob_id(plain), plain, &mut out).unwrap();
        let mut d = zstd::bulk::Decompressor::new().unwrap();
        let back = decode_blob(
            sealer,
            &mut d,
            &sealer.blob_id(plain),
            plain.len() as u32,
            &out,
            &BasePlaintexts::new(),
            "t",
        )
        .unwrap();
        assert!(back == plain, "the blob did not decode to its plaintext");
        out
    }

    #[test]
    fn an_incompressible_chunk_is_stored_raw_without_compressing_it() {
        let sealer = Sealer::Plain;
        let plain = noise(1 << 20, 1);
        let mut c = blob_compressor(3).unwrap();
        assert!(looks_incompressible(&mut c, &plain));
        let out = encoded(&sealer, &plain);
        assert_eq!(out[sealer.blob_header_len()], FRAME_RAW);
        assert_eq!(
            out.len(),
            sealer.blob_header_len() + 1 + plain.len() + sealer.blob_overhead()
        );
    }

    #[test]
    fn a_chunk_random_at_its_start_but_compressible_further_on_is_compressed() {
        let sealer = Sealer::Encrypted(Box::new(MasterKey::generate()));
        // Random for its first 70%, then text: the first samples find nothing, a later one
        // does, so zstd runs on the whole chunk.
        let mut plain = noise(700 << 10, 2);
        while plain.len() < 1 << 20 {
            plain.extend_from_slice(b"INSERT INTO orders VALUES (42, 'new', 17.50, now());\n");
        }
        let mut c = blob_compressor(3).unwrap();
        assert!(!looks_incompressible(&mut c, &plain));
        let out = encoded(&sealer, &plain);
        assert!(
            out.len() < plain.len() * 3 / 4,
            "stored {} of {}",
            out.len(),
            plain.len()
        );
        // Chunks too small to sample are compressed as they always were.
        let small = vec![9u8; 3 * PROBE_SAMPLE];
        assert!(!looks_incompressible(&mut c, &small));
        assert!(encoded(&sealer, &small).len() < 1000);
    }

    #[test]
    fn pack_roundtrip_plain() {
        roundtrip(Sealer::Plain);
    }

    #[test]
    fn pack_roundtrip_encrypted() {
        roundtrip(Sealer::Encrypted(Box::new(MasterKey::generate())));
    }
}
