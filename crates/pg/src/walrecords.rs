//! The records of one WAL segment, read for what point-in-time recovery needs: where
//! transactions ended (commit or abort, with their time and top-level xid) and where restore
//! points are (`pg_create_restore_point`, with their name and time).
//!
//! # Format (PostgreSQL 13 to 18)
//!
//! The record header, the block reference headers and the main data of commit, abort and
//! restore-point records have the same layout in all six releases (`access/xlogrecord.h`,
//! `access/xact.h` and `catalog/pg_control.h` of each), except where noted:
//!
//! - A full-page image's `bimg_info` flags: in 13 and 14 `0x02` means compressed (pglz); from
//!   15 on `0x02` means "apply at replay" and `0x04 | 0x08 | 0x10` mean pglz, lz4 and zstd
//!   compression. A compressed image with a hole carries a 2-byte hole length.
//! - `XLR_BLOCK_ID_TOPLEVEL_XID` (252) is skipped wherever it appears.
//! - Commit and abort records carry dropped statistics (`XACT_XINFO_HAS_DROPPED_STATS`) from
//!   15 on; each `xl_xact_stats_item` is 12 bytes in 15 to 17 (`kind, dboid, objoid`) and 16
//!   in 18 (the object id became two 32-bit halves).
//!
//! The test suite decodes real records of each release (tests/fixtures/wal_records) and checks
//! the scanner against `pg_waldump` on WAL of a live PostgreSQL 15.
//!
//! A segment is a run of pages (`xlp_xlog_blcksz`, 8 KiB). Each page starts with a header: the
//! long one (40 bytes) on the segment's first page, a short one (24 bytes) on the others. Its
//! `xlp_pageaddr` is the page's own WAL position and `xlp_rem_len` the bytes of a record
//! continued from the page before (flag `XLP_FIRST_IS_CONTRECORD`). Records are 8-byte aligned
//! and may cross pages (their 24-byte header too: only `xl_tot_len` is sure to be on the
//! record's first page) and segments.
//!
//! A record: `xl_tot_len u32, xl_xid u32, xl_prev u64, xl_info u8, xl_rmid u8, 2 bytes pad,
//! xl_crc u32`, then the block reference headers, the main-data header (id 255 + u8 length,
//! or 254 + u32 length) and the block data; the main data is the record's last bytes. The CRC
//! (CRC-32C) covers the bytes after the header, then the header up to `xl_crc`.
//!
//! # Where a segment's valid WAL ends
//!
//! Segments are recycled, so after the last record written (a WAL switch, or a `.partial`
//! file's end) the bytes may be an older segment's. The scan stops, as PostgreSQL's reader
//! does, at the first page whose header does not carry this page's address, at a record whose
//! `xl_prev` does not point to the record before it, or whose CRC does not match, and after an
//! `XLOG_SWITCH` record.
//!
//! # Records across segment boundaries
//!
//! A record that starts in segment N and ends in N+1 cannot be decoded from either alone. The
//! scan of N keeps the first bytes of such a record when it may be one of the records looked
//! for ([`SplitRecord`]), and the scan of N+1 keeps the first bytes of the continuation at its
//! start ([`SplitHead`]); [`join_split`] decodes the record from the two. Both are capped at
//! [`MAX_SPLIT_BYTES`]: transaction ends and restore points are small records.
//!
//! The scan is a walk over the record headers with a hardware CRC-32C of every record: a few
//! milliseconds for a 16 MiB segment (measured by `bench/archive.sh` through `archive-push`).

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{PgError, Result};
use crate::lsn::Lsn;
use crate::wal::{WalPageHeader, LONG_PAGE_HEADER_SIZE};

/// Resource manager of XLOG records (checkpoints, switches, restore points).
pub const RM_XLOG_ID: u8 = 0;
/// Resource manager of transaction records (commit, abort, prepare).
pub const RM_XACT_ID: u8 = 1;

const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLR_RMGR_INFO_MASK: u8 = 0xF0;

const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLOG_XACT_HAS_INFO: u8 = 0x80;

const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILENODES: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const SHORT_PAGE_HEADER_SIZE: usize = 24;
const RECORD_HEADER_SIZE: usize = 24;
/// `offsetof(XLogRecord, xl_crc)`: the header bytes the CRC covers.
const CRC_OFFSET: usize = 20;

const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const XLR_MAX_BLOCK_ID: u8 = 32;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// PostgreSQL 15 and later: pglz, lz4 or zstd compressed image.
const BKPIMAGE_COMPRESSED_MASK: u8 = 0x04 | 0x08 | 0x10;
/// PostgreSQL 13 and 14: `BKPIMAGE_IS_COMPRESSED` (pglz).
const BKPIMAGE_IS_COMPRESSED_13: u8 = 0x02;

/// Whether pgkeep reads the records of this major version's WAL (13 to 18).
pub fn reads_records_of(major: u32) -> bool {
    crate::control::is_supported_major(major)
}

/// The `bimg_info` bits that mark a compressed full-page image in this major version's WAL.
fn compressed_image_bits(major: u32) -> u8 {
    if major <= 14 {
        BKPIMAGE_IS_COMPRESSED_13
    } else {
        BKPIMAGE_COMPRESSED_MASK
    }
}

/// Size of one `xl_xact_stats_item` in this major version's commit and abort records.
fn dropped_stats_item_size(major: u32) -> usize {
    if major >= 18 {
        16
    } else {
        12
    }
}

/// `MAXFNAMELEN`: the size of a restore point's name field.
const RESTORE_POINT_NAME_LEN: usize = 64;

/// Bytes kept of a record split between two segments, on each side of the boundary.
pub const MAX_SPLIT_BYTES: usize = 1024;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The end of a transaction: a commit or abort record (also of a prepared transaction).
/// Recovery to `recovery_target_xid` stops at this record; recovery to a time stops at the
/// first such record whose time is after the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XactEnd {
    /// Where the record starts.
    pub lsn: Lsn,
    /// The top-level transaction id (the prepared one for `COMMIT PREPARED`).
    pub xid: u32,
    /// `xact_time`: microseconds since 2000-01-01 UTC (PostgreSQL's `TimestampTz`).
    pub time: i64,
    /// Commit (true) or abort.
    pub commit: bool,
}

/// A restore point (`XLOG_RESTORE_POINT`): what `recovery_target_name` stops at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestorePoint {
    /// Where the record starts.
    pub lsn: Lsn,
    /// `rp_time`, microseconds since 2000-01-01 UTC.
    pub time: i64,
    /// `rp_name`.
    pub name: String,
}

/// A record of interest found in WAL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WalEvent {
    /// A transaction ended.
    XactEnd(XactEnd),
    /// A restore point.
    RestorePoint(RestorePoint),
}

impl WalEvent {
    /// Where the record starts.
    pub fn lsn(&self) -> Lsn {
        match self {
            WalEvent::XactEnd(x) => x.lsn,
            WalEvent::RestorePoint(r) => r.lsn,
        }
    }
}

/// The first bytes of a record that starts in this segment and continues in the next one,
/// kept when the record may be a transaction end or a restore point (or its header is cut, so
/// nobody can tell yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRecord {
    /// Where the record starts.
    pub lsn: Lsn,
    /// `xl_tot_len`.
    pub total_len: u32,
    /// Bytes of the record inside this segment.
    pub in_segment: u32,
    /// The first `min(in_segment, MAX_SPLIT_BYTES)` bytes, page headers removed.
    #[serde(with = "hex_bytes")]
    pub prefix: Vec<u8>,
}

/// The start of a record continued from the previous segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitHead {
    /// `xlp_rem_len` of the first page: the record's bytes in this segment and later ones.
    pub rem_len: u32,
    /// The first `min(rem_len, MAX_SPLIT_BYTES)` of them, page headers removed.
    #[serde(with = "hex_bytes")]
    pub bytes: Vec<u8>,
}

/// What [`scan_segment`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// Major version of the WAL format.
    pub pg_major: u32,
    /// The segment's first LSN.
    pub start: Lsn,
    /// End of the last valid record (the segment's end when a record continues past it).
    pub end: Lsn,
    /// Records that start in this segment and were read whole.
    pub records: u64,
    /// Whether an `XLOG_SWITCH` record ended the segment's WAL.
    pub switched: bool,
    /// Transaction ends and restore points, in WAL order.
    pub events: Vec<WalEvent>,
    /// A record of interest continuing into the next segment.
    pub tail: Option<SplitRecord>,
    /// The continuation of a record from the previous segment.
    pub head: Option<SplitHead>,
}

/// Reads the records of one WAL segment (PostgreSQL 13 to 18) and returns its transaction
/// ends and restore points. `source` names the segment in errors. Fails only when the first
/// page is not a WAL segment header or the version is not supported; the valid WAL ending
/// before the segment does is not an error (see the module documentation).
pub fn scan_segment(data: &[u8], source: &Path) -> Result<SegmentScan> {
    let h = WalPageHeader::parse(data, source)?;
    let major = h.major_version().unwrap_or(0);
    if !reads_records_of(major) {
        return Err(PgError::UnsupportedVersion {
            subject: format!("the WAL segment {}", source.display()),
            found: format!(
                "WAL of {} (page magic {:#06X})",
                if major == 0 {
                    "a PostgreSQL release pgkeep does not know".to_string()
                } else {
                    format!("PostgreSQL {major}")
                },
                h.magic,
            ),
        });
    }
    let page = h.block_size as usize;
    let len = data.len().min(h.seg_size as usize) / page * page;
    let s = Scanner {
        data: &data[..len],
        page,
        magic: h.magic,
        start: h.page_addr.0,
    };
    let mut out = SegmentScan {
        pg_major: major,
        start: h.page_addr,
        end: h.page_addr,
        records: 0,
        switched: false,
        events: Vec::new(),
        tail: None,
        head: None,
    };
    let mut pos = LONG_PAGE_HEADER_SIZE;
    if h.info & XLP_FIRST_IS_CONTRECORD != 0 && h.rem_len > 0 {
        let rem = h.rem_len as usize;
        let mut bytes = Vec::with_capacity(rem.min(MAX_SPLIT_BYTES));
        match s.walk(pos, rem, rem, |p| {
            let room = MAX_SPLIT_BYTES - bytes.len();
            bytes.extend_from_slice(&p[..p.len().min(room)]);
        }) {
            Walk::Complete(end) => pos = align8(end),
            // The record goes on past this segment: nothing starts here.
            Walk::PastEnd => {
                out.head = Some(SplitHead {
                    rem_len: h.rem_len,
                    bytes,
                });
                out.end = Lsn(s.start + len as u64);
                return Ok(out);
            }
            Walk::Torn => return Ok(out),
        }
        out.head = Some(SplitHead {
            rem_len: h.rem_len,
            bytes,
        });
    }
    out.end = Lsn(s.start + pos as u64);
    let mut prev: Option<u64> = None;
    loop {
        if pos >= len {
            break;
        }
        if pos.is_multiple_of(page) {
            // A record starts at the top of a page: its header must be valid and announce no
            // continuation.
            match s.page_info(pos / page) {
                Some((info, _)) if info & XLP_FIRST_IS_CONTRECORD == 0 => {}
                _ => break,
            }
            pos += SHORT_PAGE_HEADER_SIZE;
        }
        let lsn = s.start + pos as u64;
        let tot_len = u32_at(s.data, pos) as usize;
        if tot_len < RECORD_HEADER_SIZE {
            // Zeros (never-written space) or garbage: the end of valid WAL.
            break;
        }
        let mut hdr = [0u8; RECORD_HEADER_SIZE];
        let mut got = 0;
        let head_walk = s.walk(pos, RECORD_HEADER_SIZE, tot_len, |p| {
            hdr[got..got + p.len()].copy_from_slice(p);
            got += p.len();
        });
        let header_complete = !matches!(head_walk, Walk::PastEnd | Walk::Torn);
        if matches!(head_walk, Walk::Torn) {
            break;
        }
        let rec_prev = u64::from_ne_bytes(hdr[8..16].try_into().unwrap());
        if header_complete {
            let chained = match prev {
                Some(p) => rec_prev == p,
                // The first record read: only "before it" can be checked (0 for the very first
                // record of a cluster).
                None => rec_prev < lsn,
            };
            if !chained {
                break;
            }
        }
        let (info, rmid) = (hdr[16], hdr[17]);
        let wanted = !header_complete || interesting(rmid, info);
        let mut body = Vec::new();
        let mut crc = 0u32;
        let mut seen = 0usize;
        let walk = s.walk(pos, tot_len, tot_len, |p| {
            // CRC over everything after the header; the header is added last.
            let skip = RECORD_HEADER_SIZE.saturating_sub(seen).min(p.len());
            crc = crc32c::crc32c_append(crc, &p[skip..]);
            if wanted {
                body.extend_from_slice(p);
            }
            seen += p.len();
        });
        match walk {
            Walk::Torn => break,
            Walk::PastEnd => {
                if wanted {
                    body.truncate(MAX_SPLIT_BYTES);
                    out.tail = Some(SplitRecord {
                        lsn: Lsn(lsn),
                        total_len: tot_len as u32,
                        in_segment: seen as u32,
                        prefix: body,
                    });
                }
                out.end = Lsn(s.start + len as u64);
                break;
            }
            Walk::Complete(end) => {
                let crc = crc32c::crc32c_append(crc, &hdr[..CRC_OFFSET]);
                if crc != u32::from_ne_bytes(hdr[20..24].try_into().unwrap()) {
                    break;
                }
                out.records += 1;
                out.end = Lsn(s.start + end as u64);
                if wanted {
                    let view = View::whole(&body);
                    if let Some(e) = decode(Lsn(lsn), &view, major) {
                        out.events.push(e);
                    }
                }
                if rmid == RM_XLOG_ID && info & XLR_RMGR_INFO_MASK == XLOG_SWITCH {
                    // The rest of the segment is padding.
                    out.switched = true;
                    break;
                }
                prev = Some(lsn);
                pos = align8(end);
            }
        }
    }
    Ok(out)
}

/// Decodes the record split between two consecutive segments from the first one's
/// [`SplitRecord`] and the second one's [`SplitHead`]. `None` when it is not a transaction end
/// or restore point, when the kept bytes do not reach the fields needed, or when the two do
/// not belong together (the head's length does not continue the record).
pub fn join_split(tail: &SplitRecord, head: &SplitHead, pg_major: u32) -> Option<WalEvent> {
    let total = tail.total_len as usize;
    let in_seg = tail.in_segment as usize;
    if in_seg + head.rem_len as usize != total {
        return None;
    }
    let joined;
    let view = if tail.prefix.len() == in_seg {
        let mut v = tail.prefix.clone();
        v.extend_from_slice(&head.bytes);
        joined = v;
        View {
            total,
            pieces: [(0, &joined[..]), (0, &[][..])],
        }
    } else {
        View {
            total,
            pieces: [(0, &tail.prefix[..]), (in_seg, &head.bytes[..])],
        }
    };
    decode(tail.lsn, &view, pg_major)
}

fn interesting(rmid: u8, info: u8) -> bool {
    match rmid {
        RM_XACT_ID => matches!(
            info & XLOG_XACT_OPMASK,
            XLOG_XACT_COMMIT
                | XLOG_XACT_ABORT
                | XLOG_XACT_COMMIT_PREPARED
                | XLOG_XACT_ABORT_PREPARED
        ),
        RM_XLOG_ID => info & XLR_RMGR_INFO_MASK == XLOG_RESTORE_POINT,
        _ => false,
    }
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().unwrap())
}

enum Walk {
    /// The bytes ended at this position inside the segment.
    Complete(usize),
    /// They go on past the segment's end.
    PastEnd,
    /// A continuation page is missing or does not continue them: not valid WAL.
    Torn,
}

struct Scanner<'a> {
    data: &'a [u8],
    page: usize,
    magic: u16,
    start: u64,
}

impl Scanner<'_> {
    /// `(xlp_info, xlp_rem_len)` of page `n` when its header is this segment's page `n`.
    fn page_info(&self, n: usize) -> Option<(u16, u32)> {
        let o = n * self.page;
        if o + SHORT_PAGE_HEADER_SIZE > self.data.len() {
            return None;
        }
        let b = &self.data[o..];
        let magic = u16::from_ne_bytes([b[0], b[1]]);
        let addr = u64::from_ne_bytes(b[8..16].try_into().unwrap());
        if magic != self.magic || addr != self.start + o as u64 {
            return None;
        }
        Some((u16::from_ne_bytes([b[2], b[3]]), u32_at(b, 16)))
    }

    /// Feeds the first `len` bytes of a record starting at `pos` to `f`, page by page,
    /// skipping and checking the headers of continuation pages (their `xlp_rem_len` counts the
    /// record's remaining bytes, `total` at `pos`).
    fn walk(&self, mut pos: usize, len: usize, total: usize, mut f: impl FnMut(&[u8])) -> Walk {
        let mut left = len;
        loop {
            if pos >= self.data.len() {
                // Nothing of it here: a continuation at the top of a file shorter than its
                // first page (a torn copy) starts past the whole pages read.
                return Walk::PastEnd;
            }
            let page_end = (pos / self.page + 1) * self.page;
            let take = left.min(page_end - pos);
            f(&self.data[pos..pos + take]);
            left -= take;
            pos += take;
            if left == 0 {
                return Walk::Complete(pos);
            }
            if pos >= self.data.len() {
                return Walk::PastEnd;
            }
            match self.page_info(pos / self.page) {
                Some((info, rem))
                    if info & XLP_FIRST_IS_CONTRECORD != 0
                        && rem as usize == total - (len - left) => {}
                _ => return Walk::Torn,
            }
            pos += SHORT_PAGE_HEADER_SIZE;
        }
    }
}

/// Up to two known pieces of a record: `(offset in the record, bytes)`.
struct View<'a> {
    total: usize,
    pieces: [(usize, &'a [u8]); 2],
}

impl<'a> View<'a> {
    fn whole(b: &'a [u8]) -> Self {
        View {
            total: b.len(),
            pieces: [(0, b), (0, &[][..])],
        }
    }

    fn at(&self, off: usize, len: usize) -> Option<&'a [u8]> {
        if off + len > self.total {
            return None;
        }
        self.pieces.iter().find_map(|&(start, b)| {
            (off >= start && off + len <= start + b.len())
                .then(|| &b[off - start..off - start + len])
        })
    }

    fn u8(&self, off: usize) -> Option<u8> {
        self.at(off, 1).map(|b| b[0])
    }
    fn u32(&self, off: usize) -> Option<u32> {
        self.at(off, 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    }
    fn i64(&self, off: usize) -> Option<i64> {
        self.at(off, 8)
            .map(|b| i64::from_ne_bytes(b.try_into().unwrap()))
    }
}

/// Offset and length of a record's main data, from its block reference headers (laid out as
/// in `major`'s WAL).
fn main_data(v: &View<'_>, major: u32) -> Option<(usize, usize)> {
    let compressed = compressed_image_bits(major);
    let mut pos = RECORD_HEADER_SIZE;
    // At most one header per block id plus the special ones: a bound that also stops a walk
    // over garbage.
    for _ in 0..(XLR_MAX_BLOCK_ID as usize + 4) {
        if pos >= v.total {
            return None;
        }
        let id = v.u8(pos)?;
        let len = match id {
            // The main-data header comes last; the main data is the record's last bytes.
            XLR_BLOCK_ID_DATA_SHORT => v.u8(pos + 1)? as usize,
            XLR_BLOCK_ID_DATA_LONG => v.u32(pos + 1)? as usize,
            XLR_BLOCK_ID_ORIGIN => {
                pos += 3;
                continue;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                pos += 5;
                continue;
            }
            b if b <= XLR_MAX_BLOCK_ID => {
                let flags = v.u8(pos + 1)?;
                pos += 4;
                if flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let bimg_info = v.u8(pos + 4)?;
                    pos += 5;
                    if bimg_info & BKPIMAGE_HAS_HOLE != 0 && bimg_info & compressed != 0 {
                        pos += 2;
                    }
                }
                if flags & BKPBLOCK_SAME_REL == 0 {
                    pos += 12;
                }
                pos += 4;
                continue;
            }
            _ => return None,
        };
        return (len <= v.total - RECORD_HEADER_SIZE).then(|| (v.total - len, len));
    }
    None
}

/// The event a transaction-end or restore-point record describes.
fn decode(lsn: Lsn, v: &View<'_>, major: u32) -> Option<WalEvent> {
    let info = v.u8(16)?;
    let rmid = v.u8(17)?;
    if !interesting(rmid, info) {
        return None;
    }
    let (off, len) = main_data(v, major)?;
    if rmid == RM_XLOG_ID {
        if len < 8 + RESTORE_POINT_NAME_LEN {
            return None;
        }
        let time = v.i64(off)?;
        let raw = v.at(off + 8, RESTORE_POINT_NAME_LEN)?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        return Some(WalEvent::RestorePoint(RestorePoint {
            lsn,
            time,
            name: String::from_utf8_lossy(&raw[..end]).into_owned(),
        }));
    }
    if len < 8 {
        return None;
    }
    let op = info & XLOG_XACT_OPMASK;
    let commit = matches!(op, XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED);
    let time = v.i64(off)?;
    let xid = if matches!(op, XLOG_XACT_COMMIT | XLOG_XACT_ABORT) {
        v.u32(4)?
    } else {
        prepared_xid(v, off, info, commit, major)?
    };
    Some(WalEvent::XactEnd(XactEnd {
        lsn,
        xid,
        time,
        commit,
    }))
}

/// The prepared transaction's xid of `COMMIT PREPARED` / `ABORT PREPARED`: the optional parts
/// of the main data after `xact_time`, in PostgreSQL's order, up to `xl_xact_twophase`.
fn prepared_xid(v: &View<'_>, off: usize, info: u8, commit: bool, major: u32) -> Option<u32> {
    if info & XLOG_XACT_HAS_INFO == 0 {
        return None;
    }
    let xinfo = v.u32(off + 8)?;
    let mut p = off + 12;
    let count = |p: usize| v.u32(p).map(|n| n as usize);
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        p += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        p += 4 + 4 * count(p)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILENODES != 0 {
        p += 4 + 12 * count(p)?;
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        p += 4 + dropped_stats_item_size(major) * count(p)?;
    }
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        p += 4 + 16 * count(p)?;
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
        return None;
    }
    v.u32(p)
}

/// Converts a PostgreSQL `TimestampTz` (microseconds since 2000-01-01 UTC) to Unix
/// microseconds.
pub fn pg_time_to_unix_micros(t: i64) -> i64 {
    t.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

/// Converts Unix microseconds to a PostgreSQL `TimestampTz`.
pub fn unix_micros_to_pg_time(t: i64) -> i64 {
    t.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// Version of the [`SegmentSummary`] layout.
pub const SUMMARY_FORMAT: u32 = 1;

/// What point-in-time recovery needs to know of one segment, small enough to store beside it:
/// the span of its transaction-end times, the xids that ended in it (as runs), its restore
/// points, and the pieces of records split across its boundaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    /// [`SUMMARY_FORMAT`].
    pub format: u32,
    /// Major version of the WAL format.
    pub pg_major: u32,
    /// The segment's first LSN.
    pub start: Lsn,
    /// End of its valid WAL.
    pub end: Lsn,
    /// Records read.
    pub records: u64,
    /// Whether a WAL switch ended it.
    pub switched: bool,
    /// Transaction ends in it (commits and aborts).
    pub xact_ends: u64,
    /// Earliest transaction-end time (PostgreSQL `TimestampTz`).
    pub min_xact_time: Option<i64>,
    /// Latest transaction-end time.
    pub max_xact_time: Option<i64>,
    /// Top-level xids whose transaction ended here, as sorted inclusive runs `[first, last]`.
    pub xids: Vec<[u32; 2]>,
    /// Restore points, in WAL order.
    pub restore_points: Vec<RestorePoint>,
    /// A record of interest continuing into the next segment.
    pub tail: Option<SplitRecord>,
    /// The continuation of a record from the previous segment.
    pub head: Option<SplitHead>,
}

impl SegmentSummary {
    /// Summarises a scan.
    pub fn from_scan(scan: &SegmentScan) -> Self {
        let mut xids: Vec<u32> = Vec::new();
        let (mut min_t, mut max_t) = (None::<i64>, None::<i64>);
        let mut restore_points = Vec::new();
        let mut xact_ends = 0;
        for e in &scan.events {
            match e {
                WalEvent::XactEnd(x) => {
                    xact_ends += 1;
                    xids.push(x.xid);
                    min_t = Some(min_t.map_or(x.time, |m| m.min(x.time)));
                    max_t = Some(max_t.map_or(x.time, |m| m.max(x.time)));
                }
                WalEvent::RestorePoint(r) => restore_points.push(r.clone()),
            }
        }
        xids.sort_unstable();
        xids.dedup();
        let mut runs: Vec<[u32; 2]> = Vec::new();
        for x in xids {
            match runs.last_mut() {
                Some(r) if r[1].checked_add(1) == Some(x) => r[1] = x,
                _ => runs.push([x, x]),
            }
        }
        SegmentSummary {
            format: SUMMARY_FORMAT,
            pg_major: scan.pg_major,
            start: scan.start,
            end: scan.end,
            records: scan.records,
            switched: scan.switched,
            xact_ends,
            min_xact_time: min_t,
            max_xact_time: max_t,
            xids: runs,
            restore_points,
            tail: scan.tail.clone(),
            head: scan.head.clone(),
        }
    }

    /// Scans and summarises a segment.
    pub fn of_segment(data: &[u8], source: &Path) -> Result<Self> {
        Ok(Self::from_scan(&scan_segment(data, source)?))
    }

    /// Whether a transaction with top-level xid `xid` ended in this segment.
    pub fn has_xid(&self, xid: u32) -> bool {
        let i = self.xids.partition_point(|r| r[1] < xid);
        self.xids.get(i).is_some_and(|r| r[0] <= xid)
    }

    /// The lowest and highest xid that ended here.
    pub fn xid_span(&self) -> Option<(u32, u32)> {
        Some((self.xids.first()?[0], self.xids.last()?[1]))
    }
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(b.len() * 2);
        for x in b {
            out.push_str(&format!("{x:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        // By bytes, not by string slices: a multi-byte character in a stored summary must be
        // an error, not a slice through the middle of it (a panic).
        s.as_bytes()
            .chunks_exact(2)
            .map(|p| match (nibble(p[0]), nibble(p[1])) {
                (Some(h), Some(l)) => Ok(h << 4 | l),
                _ => Err(serde::de::Error::custom("not a hex digit")),
            })
            .collect()
    }

    fn nibble(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::XLP_LONG_HEADER;

    const PAGE: usize = 8192;
    const SEG: usize = 1 << 20;
    const MAGIC: u16 = 0xD110;
    /// WAL position of the first written segment (not 0: the first record's xl_prev must
    /// point before it).
    const BASE: u64 = 16 << 20;

    /// Writes WAL the way PostgreSQL lays it out: page headers, 8-byte aligned records that
    /// cross pages and segments, `xl_prev` chaining and the record CRC.
    struct WalWriter {
        buf: Vec<u8>,
        pos: usize,
        prev: u64,
        magic: u16,
    }

    impl WalWriter {
        fn new(segments: usize) -> Self {
            Self::with_magic(MAGIC, segments)
        }

        fn with_magic(magic: u16, segments: usize) -> Self {
            let mut w = WalWriter {
                buf: vec![0u8; segments * SEG],
                pos: 0,
                prev: BASE - 0x100,
                magic,
            };
            w.page_header(0);
            w
        }

        fn page_header(&mut self, rem_len: usize) {
            let o = self.pos;
            let long = o.is_multiple_of(SEG);
            let mut info = if long { XLP_LONG_HEADER } else { 0 };
            if rem_len > 0 {
                info |= XLP_FIRST_IS_CONTRECORD;
            }
            let b = &mut self.buf[o..];
            b[0..2].copy_from_slice(&self.magic.to_ne_bytes());
            b[2..4].copy_from_slice(&info.to_ne_bytes());
            b[4..8].copy_from_slice(&1u32.to_ne_bytes());
            b[8..16].copy_from_slice(&(BASE + o as u64).to_ne_bytes());
            b[16..20].copy_from_slice(&(rem_len as u32).to_ne_bytes());
            if long {
                b[24..32].copy_from_slice(&7u64.to_ne_bytes());
                b[32..36].copy_from_slice(&(SEG as u32).to_ne_bytes());
                b[36..40].copy_from_slice(&(PAGE as u32).to_ne_bytes());
                self.pos += LONG_PAGE_HEADER_SIZE;
            } else {
                self.pos += SHORT_PAGE_HEADER_SIZE;
            }
        }

        /// Appends a record (`rec` holds the whole record; its header's xl_tot_len, xl_prev
        /// and xl_crc are filled in here). Returns its LSN.
        fn append(&mut self, mut rec: Vec<u8>) -> u64 {
            if self.pos.is_multiple_of(PAGE) {
                self.page_header(0);
            }
            let lsn = BASE + self.pos as u64;
            let n = rec.len() as u32;
            rec[0..4].copy_from_slice(&n.to_ne_bytes());
            rec[8..16].copy_from_slice(&self.prev.to_ne_bytes());
            let crc = crc32c::crc32c(&rec[RECORD_HEADER_SIZE..]);
            let crc = crc32c::crc32c_append(crc, &rec[..CRC_OFFSET]);
            rec[20..24].copy_from_slice(&crc.to_ne_bytes());
            let mut off = 0;
            while off < rec.len() {
                if self.pos.is_multiple_of(PAGE) {
                    self.page_header(rec.len() - off);
                }
                let room = PAGE - self.pos % PAGE;
                let take = room.min(rec.len() - off);
                self.buf[self.pos..self.pos + take].copy_from_slice(&rec[off..off + take]);
                self.pos += take;
                off += take;
            }
            self.pos = align8(self.pos);
            self.prev = lsn;
            lsn
        }

        fn segment(&self, n: usize) -> &[u8] {
            &self.buf[n * SEG..(n + 1) * SEG]
        }
    }

    fn header(rmid: u8, info: u8, xid: u32) -> Vec<u8> {
        let mut h = vec![0u8; RECORD_HEADER_SIZE];
        h[4..8].copy_from_slice(&xid.to_ne_bytes());
        h[16] = info;
        h[17] = rmid;
        h
    }

    fn with_main(mut rec: Vec<u8>, main: &[u8]) -> Vec<u8> {
        if main.len() < 256 {
            rec.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, main.len() as u8]);
        } else {
            rec.push(XLR_BLOCK_ID_DATA_LONG);
            rec.extend_from_slice(&(main.len() as u32).to_ne_bytes());
        }
        rec.extend_from_slice(main);
        rec
    }

    fn commit(xid: u32, time: i64) -> Vec<u8> {
        with_main(
            header(RM_XACT_ID, XLOG_XACT_COMMIT, xid),
            &time.to_ne_bytes(),
        )
    }

    fn abort(xid: u32, time: i64) -> Vec<u8> {
        with_main(
            header(RM_XACT_ID, XLOG_XACT_ABORT, xid),
            &time.to_ne_bytes(),
        )
    }

    fn commit_prepared(prepared_xid: u32, time: i64) -> Vec<u8> {
        commit_prepared_of(15, prepared_xid, time)
    }

    /// A `COMMIT PREPARED` as `major` writes it: dropped statistics from 15 on, with that
    /// release's item size (given here by hand, not by the function under test).
    fn commit_prepared_of(major: u32, prepared_xid: u32, time: i64) -> Vec<u8> {
        let mut m = time.to_ne_bytes().to_vec();
        let mut xinfo = XACT_XINFO_HAS_DBINFO
            | XACT_XINFO_HAS_SUBXACTS
            | XACT_XINFO_HAS_RELFILENODES
            | XACT_XINFO_HAS_INVALS
            | XACT_XINFO_HAS_TWOPHASE;
        if major >= 15 {
            xinfo |= XACT_XINFO_HAS_DROPPED_STATS;
        }
        m.extend_from_slice(&xinfo.to_ne_bytes());
        m.extend_from_slice(&[1u8; 8]); // dbinfo
        m.extend_from_slice(&2u32.to_ne_bytes()); // two subxacts
        m.extend_from_slice(&[0xEE; 8]);
        m.extend_from_slice(&1u32.to_ne_bytes()); // one dropped relation
        m.extend_from_slice(&[0xBB; 12]);
        if major >= 15 {
            m.extend_from_slice(&2u32.to_ne_bytes()); // two dropped stats items
            let item = match major {
                15..=17 => 12,
                _ => 16,
            };
            m.extend(std::iter::repeat_n(0xDDu8, 2 * item));
        }
        m.extend_from_slice(&1u32.to_ne_bytes()); // one invalidation message
        m.extend_from_slice(&[0xCC; 16]);
        m.extend_from_slice(&prepared_xid.to_ne_bytes());
        // The record's own xid is not the prepared one.
        with_main(
            header(
                RM_XACT_ID,
                XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_HAS_INFO,
                0,
            ),
            &m,
        )
    }

    fn restore_point(name: &str, time: i64) -> Vec<u8> {
        let mut m = time.to_ne_bytes().to_vec();
        let mut n = [0u8; RESTORE_POINT_NAME_LEN];
        n[..name.len()].copy_from_slice(name.as_bytes());
        m.extend_from_slice(&n);
        with_main(header(RM_XLOG_ID, XLOG_RESTORE_POINT, 0), &m)
    }

    /// A heap-like record: one block reference with a full-page image and `data` bytes of
    /// block data, and a small main data part.
    fn filler(xid: u32, data: usize) -> Vec<u8> {
        filler_of(15, xid, data, true)
    }

    /// [`filler`] as `major` writes it: the image has a hole and is to be applied at replay,
    /// compressed or not (a compressed one with a hole carries a hole length). The flag
    /// values are each release's, written out by hand.
    fn filler_of(major: u32, xid: u32, data: usize, compressed: bool) -> Vec<u8> {
        let mut r = header(10, 0x00, xid);
        r.push(0); // block id 0
        r.push(BKPBLOCK_HAS_IMAGE | 0x20);
        r.extend_from_slice(&(data as u16).to_ne_bytes());
        r.extend_from_slice(&100u16.to_ne_bytes()); // image length
        r.extend_from_slice(&0u16.to_ne_bytes()); // hole offset
                                                  // 13, 14: HAS_HOLE 0x01, IS_COMPRESSED 0x02, APPLY 0x04.
                                                  // 15 on: HAS_HOLE 0x01, APPLY 0x02, COMPRESS_PGLZ 0x04, _LZ4 0x08, _ZSTD 0x10.
        r.push(match (major <= 14, compressed) {
            (true, true) => 0x07,
            (true, false) => 0x05,
            (false, true) => 0x0B, // lz4
            (false, false) => 0x03,
        });
        if compressed {
            r.extend_from_slice(&4000u16.to_ne_bytes());
        }
        r.extend_from_slice(&[9u8; 12]); // relfilenode
        r.extend_from_slice(&3u32.to_ne_bytes()); // block number
        r.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, 3]);
        r.extend_from_slice(&[0xAB; 100]); // image
        r.extend(std::iter::repeat_n(0x5Au8, data));
        r.extend_from_slice(&[1, 2, 3]); // main data
        r
    }

    fn switch() -> Vec<u8> {
        header(RM_XLOG_ID, XLOG_SWITCH, 0)
    }

    fn scan(b: &[u8]) -> SegmentScan {
        scan_segment(b, Path::new("test")).unwrap()
    }

    fn xacts(s: &SegmentScan) -> Vec<(u64, u32, i64, bool)> {
        s.events
            .iter()
            .filter_map(|e| match e {
                WalEvent::XactEnd(x) => Some((x.lsn.0, x.xid, x.time, x.commit)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn finds_commits_aborts_prepared_and_restore_points_across_pages() {
        let mut w = WalWriter::new(1);
        let mut want = Vec::new();
        for i in 0..200u32 {
            // Fillers of varying sizes push records across page boundaries, headers included.
            w.append(filler(1000 + i, (i as usize * 37) % 9000));
            let t = 1_000_000 * i as i64;
            if i % 7 == 3 {
                want.push((w.append(abort(1000 + i, t)), 1000 + i, t, false));
            } else {
                want.push((w.append(commit(1000 + i, t)), 1000 + i, t, true));
            }
        }
        let t = 5_000_000_000;
        want.push((w.append(commit_prepared(77, t)), 77, t, true));
        let rp = w.append(restore_point("before_delete", 42));
        w.append(switch());
        // After a switch the rest is padding: a record written there must not count.
        w.append(commit(9999, 1));
        let s = scan(w.segment(0));
        assert!(s.switched);
        assert_eq!(xacts(&s), want);
        assert_eq!(
            s.events.last(),
            Some(&WalEvent::RestorePoint(RestorePoint {
                lsn: Lsn(rp),
                time: 42,
                name: "before_delete".into()
            }))
        );
        assert_eq!(s.records, 200 * 2 + 3);
        assert!(s.tail.is_none() && s.head.is_none());

        let sum = SegmentSummary::from_scan(&s);
        assert_eq!(sum.xact_ends, 201);
        assert_eq!(sum.min_xact_time, Some(0));
        assert_eq!(sum.max_xact_time, Some(t));
        assert_eq!(sum.xids, vec![[77, 77], [1000, 1199]]);
        assert!(sum.has_xid(77) && sum.has_xid(1000) && sum.has_xid(1199));
        assert!(!sum.has_xid(78) && !sum.has_xid(999) && !sum.has_xid(1200));
        assert!(!sum.has_xid(9999), "a record after the switch was counted");
        let json = serde_json::to_string(&sum).unwrap();
        assert_eq!(serde_json::from_str::<SegmentSummary>(&json).unwrap(), sum);
    }

    #[test]
    fn stops_at_a_bad_crc_a_broken_chain_or_a_recycled_page() {
        // A flipped byte inside a record: it and everything after it are not valid WAL.
        let mut w = WalWriter::new(1);
        w.append(commit(1, 10));
        let bad = w.append(commit(2, 20));
        w.append(commit(3, 30));
        let mut seg = w.segment(0).to_vec();
        seg[(bad - BASE) as usize + 30] ^= 1;
        let s = scan(&seg);
        assert_eq!(xacts(&s).len(), 1);
        assert_eq!(s.end, Lsn(bad - 6));

        // A record whose xl_prev does not point to the record before it.
        let mut w = WalWriter::new(1);
        w.append(commit(1, 10));
        w.prev = 0x4242;
        w.append(commit(2, 20));
        assert_eq!(xacts(&scan(w.segment(0))).len(), 1);

        // Old WAL of a recycled segment after the last written page: its page address is
        // the old one, so the scan stops at the page boundary.
        let mut w = WalWriter::new(1);
        while w.pos < PAGE - 100 {
            w.append(commit(5, 50));
        }
        let n = xacts(&scan(w.segment(0))).len();
        let mut seg = w.segment(0).to_vec();
        let mut old = WalWriter::new(1);
        for i in 0..400 {
            old.append(commit(900 + i, 1));
        }
        seg[PAGE..3 * PAGE].copy_from_slice(&old.segment(0)[PAGE..3 * PAGE]);
        seg[PAGE + 8..PAGE + 16].copy_from_slice(&(0xFF00_0000u64 + PAGE as u64).to_ne_bytes());
        assert_eq!(xacts(&scan(&seg)).len(), n);
    }

    #[test]
    fn a_record_split_between_segments_is_decoded_from_both_summaries() {
        for (name, build) in [
            ("commit", commit(4242, 777) as Vec<u8>),
            ("prepared", commit_prepared(4343, 888)),
            ("restore point", restore_point("split", 999)),
        ] {
            // Cut the record at every aligned offset near its start, header included (a
            // record starts 8-byte aligned, so 8 and 16 cut its header).
            for cut in [8usize, 16, 24, 32, 40, 64, 96] {
                if cut >= build.len() {
                    continue;
                }
                let mut w = WalWriter::new(2);
                while SEG - w.pos > PAGE {
                    w.append(filler(1, 3000));
                }
                if w.pos.is_multiple_of(PAGE) {
                    w.append(filler(1, 200));
                }
                // One filler inside the last page leaves exactly `cut` bytes.
                let over = filler(1, 0).len();
                w.append(filler(1, SEG - cut - w.pos - over));
                assert_eq!(SEG - w.pos, cut);
                let lsn = w.append(build.clone());
                w.append(commit(5, 5));
                let a = scan(w.segment(0));
                let b = scan(w.segment(1));
                let tail = a
                    .tail
                    .clone()
                    .unwrap_or_else(|| panic!("{name} cut {cut}: no tail"));
                assert_eq!(tail.lsn, Lsn(lsn), "{name} cut {cut}");
                let head = b.head.clone().expect("head");
                let e = join_split(&tail, &head, 15)
                    .unwrap_or_else(|| panic!("{name} cut {cut}: not decoded"));
                assert_eq!(e.lsn(), Lsn(lsn));
                match (&e, name) {
                    (WalEvent::XactEnd(x), "commit") => assert_eq!((x.xid, x.time), (4242, 777)),
                    (WalEvent::XactEnd(x), "prepared") => {
                        assert_eq!((x.xid, x.time), (4343, 888))
                    }
                    (WalEvent::RestorePoint(r), "restore point") => {
                        assert_eq!((r.name.as_str(), r.time), ("split", 999))
                    }
                    _ => panic!("{name}: {e:?}"),
                }
                // The record after it, in the second segment, is read normally.
                assert_eq!(xacts(&b).len(), 1, "{name} cut {cut}");
                // A head that belongs to another record is not joined.
                let mut other = head.clone();
                other.rem_len += 8;
                assert!(join_split(&tail, &other, 15).is_none());
            }
        }
    }

    #[test]
    fn uninteresting_split_records_keep_no_bytes() {
        let mut w = WalWriter::new(2);
        while SEG - w.pos > PAGE {
            w.append(filler(1, 5000));
        }
        w.append(filler(1, 8000));
        let a = scan(w.segment(0));
        assert!(a.tail.is_none(), "{:?}", a.tail.map(|t| t.lsn));
        let b = scan(w.segment(1));
        let head = b.head.expect("continuation");
        assert!(head.bytes.len() <= MAX_SPLIT_BYTES);
    }

    #[test]
    fn other_versions_are_refused_and_time_conversions() {
        for magic in [0xD101u16, 0xD121] {
            let mut w = WalWriter::new(1);
            w.buf[0..2].copy_from_slice(&magic.to_ne_bytes());
            let e = scan_segment(w.segment(0), Path::new("seg")).unwrap_err();
            assert!(matches!(e, PgError::UnsupportedVersion { .. }), "{e}");
            let m = e.to_string();
            assert!(
                m.contains("does not know") && m.contains("PostgreSQL 13 to 18"),
                "{m}"
            );
        }
        assert!(!reads_records_of(12) && !reads_records_of(19));
        assert_eq!(pg_time_to_unix_micros(0), 946_684_800_000_000);
        assert_eq!(unix_micros_to_pg_time(pg_time_to_unix_micros(123)), 123);
    }

    #[test]
    fn every_release_13_to_18_is_scanned_with_its_own_layouts() {
        for major in 13..=18u32 {
            let magic = crate::wal::magic_for_major_version(major).unwrap();
            let mut w = WalWriter::with_magic(magic, 1);
            let mut want = Vec::new();
            for i in 0..40u32 {
                w.append(filler_of(
                    major,
                    500 + i,
                    (i as usize * 331) % 9000,
                    i % 2 == 0,
                ));
                want.push((w.append(commit(500 + i, i as i64)), 500 + i, i as i64, true));
            }
            want.push((w.append(abort(600, 60)), 600, 60, false));
            want.push((w.append(commit_prepared_of(major, 77, 70)), 77, 70, true));
            let rp = w.append(restore_point("v", 80));
            let s = scan(w.segment(0));
            assert_eq!(s.pg_major, major);
            assert_eq!(xacts(&s), want, "PostgreSQL {major}");
            assert_eq!(s.events.last().map(|e| e.lsn()), Some(Lsn(rp)));
        }
    }

    /// Decodes one whole record as `major`'s.
    fn decode_as(rec: &[u8], major: u32) -> Option<WalEvent> {
        decode(Lsn(0), &View::whole(rec), major)
    }

    #[test]
    fn dropped_statistics_items_are_twelve_bytes_before_18_and_sixteen_in_18() {
        for major in 15..=18u32 {
            let rec = commit_prepared_of(major, 4711, 9);
            let got = |m| match decode_as(&rec, m) {
                Some(WalEvent::XactEnd(x)) => Some(x.xid),
                _ => None,
            };
            assert_eq!(got(major), Some(4711), "PostgreSQL {major}");
            // Read with the other item size, the prepared xid is not found.
            let other = if major == 18 { 17 } else { 18 };
            assert_ne!(got(other), Some(4711), "PostgreSQL {major} read as {other}");
        }
    }

    #[test]
    fn full_page_image_flags_of_13_and_14_differ_from_15_on() {
        for (major, other) in [(13, 15), (14, 16), (15, 14), (18, 13)] {
            for compressed in [false, true] {
                // A commit record with a block reference (none has one in practice, but the
                // walk over block headers is the same for every record).
                let f = filler_of(major, 1, 10, compressed);
                let blocks = &f[RECORD_HEADER_SIZE..f.len() - 100 - 10 - 5];
                let mut rec = header(RM_XACT_ID, XLOG_XACT_COMMIT, 31);
                rec.extend_from_slice(blocks);
                rec.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, 8]);
                rec.extend_from_slice(&[0xAB; 100]);
                rec.extend_from_slice(&[0x5A; 10]);
                rec.extend_from_slice(&1234i64.to_ne_bytes());
                let want = Some((Lsn(0), 31u32, 1234i64));
                let got = |m| match decode_as(&rec, m) {
                    Some(WalEvent::XactEnd(x)) => Some((x.lsn, x.xid, x.time)),
                    _ => None,
                };
                assert_eq!(got(major), want, "{major} compressed {compressed}");
                if !compressed {
                    // An image with a hole that is not compressed reads as compressed under
                    // the other family's flags, which then expects a hole length.
                    assert_ne!(got(other), want, "{major} read as {other}");
                }
            }
        }
    }

    /// Records written by each release (tests/fixtures/wal_records/records-N.hex, taken from
    /// its WAL after this SQL): `BEGIN; INSERT; COMMIT` (xid C), `BEGIN; INSERT; ROLLBACK`
    /// (C+1), `pg_create_restore_point('fixture-rp')`, `CREATE TABLE gone2` (P-1), and a
    /// prepared transaction that dropped gone2, committed with `COMMIT PREPARED` (xid P; its
    /// record carries dbinfo, a dropped relation, invalidations and, from 15 on, dropped
    /// statistics). T0 and T1 are the server's clock before and after, in Unix microseconds.
    const REAL: [(u32, u32, u32, i64, i64); 6] = [
        (13, 491, 494, 1796408316674058, 1796408316757824),
        (14, 739, 742, 1796408316950352, 1796408317030516),
        (15, 738, 741, 1796408317183813, 1796408317290719),
        (16, 747, 750, 1796408317427375, 1796408317525840),
        (17, 755, 758, 1796408317650886, 1796408317741927),
        (18, 769, 772, 1796408317891452, 1796408317985905),
    ];

    #[test]
    fn real_records_of_13_to_18_are_decoded() {
        for (major, c, p, t0, t1) in REAL {
            let path = format!(
                "{}/tests/fixtures/wal_records/records-{major}.hex",
                env!("CARGO_MANIFEST_DIR")
            );
            let text = std::fs::read_to_string(&path).unwrap();
            let recs: Vec<Vec<u8>> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| {
                    (0..l.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                        .collect()
                })
                .collect();
            // Intact as PostgreSQL wrote them: length and CRC.
            for r in &recs {
                assert_eq!(u32_at(r, 0) as usize, r.len(), "{major}");
                let crc = crc32c::crc32c(&r[RECORD_HEADER_SIZE..]);
                let crc = crc32c::crc32c_append(crc, &r[..CRC_OFFSET]);
                assert_eq!(crc, u32_at(r, 20), "{major}");
            }
            let events: Vec<WalEvent> = recs
                .iter()
                .map(|r| decode_as(r, major).unwrap_or_else(|| panic!("{major}: not decoded")))
                .collect();
            let xact = |e: &WalEvent| match e {
                WalEvent::XactEnd(x) => (x.xid, x.commit),
                _ => panic!("{major}: {e:?}"),
            };
            assert_eq!(xact(&events[0]), (c, true), "{major}");
            assert_eq!(xact(&events[1]), (c + 1, false), "{major}");
            match &events[2] {
                WalEvent::RestorePoint(r) => assert_eq!(r.name, "fixture-rp", "{major}"),
                e => panic!("{major}: {e:?}"),
            }
            assert_eq!(xact(&events[3]), (p - 1, true), "{major}");
            assert_eq!(xact(&events[4]), (p, true), "{major}");
            let mut last = unix_micros_to_pg_time(t0);
            for e in &events {
                let t = match e {
                    WalEvent::XactEnd(x) => x.time,
                    WalEvent::RestorePoint(r) => r.time,
                };
                assert!(
                    t >= last && t <= unix_micros_to_pg_time(t1),
                    "{major}: {e:?}"
                );
                last = t;
            }
            // Scanned inside a segment of that release, the same events come out.
            let mut w =
                WalWriter::with_magic(crate::wal::magic_for_major_version(major).unwrap(), 1);
            for r in &recs {
                w.append(r.clone());
            }
            let s = scan(w.segment(0));
            let strip = |e: &WalEvent| match e {
                WalEvent::XactEnd(x) => (x.xid, x.time, x.commit, String::new()),
                WalEvent::RestorePoint(r) => (0, r.time, true, r.name.clone()),
            };
            assert_eq!(
                s.events.iter().map(strip).collect::<Vec<_>>(),
                events.iter().map(strip).collect::<Vec<_>>(),
                "{major}"
            );
        }
    }
}
