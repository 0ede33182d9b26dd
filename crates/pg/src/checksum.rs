//! PostgreSQL data page checksums (`pg_checksum_page`) and the page check a backup does.
//!
//! The algorithm: the page is read as rows of 32 native-endian `u32` words; 32 independent
//! FNV-1a-like lanes (each seeded with a fixed offset) absorb one column each, followed by two
//! rounds of zeros; the lanes are xor-folded, the block number is mixed in and the result is
//! reduced to 1..=65535. The `pd_checksum` field counts as zero while computing.

use crate::lsn::Lsn;

/// Data page size this crate checks (PostgreSQL's default BLCKSZ).
pub const BLCKSZ: usize = 8192;
/// Blocks per 1 GiB relation segment file with 8 KiB pages (RELSEG_SIZE).
pub const RELSEG_SIZE: u32 = 131072;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;

/// Lane seeds, fixed by PostgreSQL's on-disk format (storage/checksum_impl.h).
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

/// Byte offset of `pd_checksum` in the page header (after the 8-byte `pd_lsn`).
const PD_CHECKSUM: usize = 8;
/// Byte offset of `pd_upper`; a page with `pd_upper == 0` is "new" (never initialized).
const PD_UPPER: usize = 14;

#[inline(always)]
fn mix(sum: u32, value: u32) -> u32 {
    let t = sum ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

/// PostgreSQL's page checksum of `page` at absolute block number `blkno` (for segment file N of
/// a relation, `blkno = N * RELSEG_SIZE + block in file`). The stored `pd_checksum` is ignored.
///
/// Panics if the page length is not a non-zero multiple of 128 bytes.
pub fn pg_checksum_page(page: &[u8], blkno: u32) -> u16 {
    assert!(
        !page.is_empty() && page.len().is_multiple_of(4 * N_SUMS),
        "page size {} is not a multiple of 128",
        page.len()
    );
    let mut sums = BASE_OFFSETS;
    for (row_no, row) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, word) in row.chunks_exact(4).enumerate() {
            let mut w = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
            // pd_checksum is the upper or lower half of word 2 of row 0 depending on byte order;
            // zero exactly its two bytes.
            if row_no == 0 && j == PD_CHECKSUM / 4 {
                let mut bytes = w.to_ne_bytes();
                bytes[0] = 0;
                bytes[1] = 0;
                w = u32::from_ne_bytes(bytes);
            }
            sums[j] = mix(sums[j], w);
        }
    }
    let mut result = 0u32;
    for s in sums.iter_mut() {
        *s = mix(mix(*s, 0), 0);
        result ^= *s;
    }
    ((result ^ blkno) % 65535 + 1) as u16
}

/// The stored `pd_checksum` of a page.
pub fn stored_checksum(page: &[u8]) -> u16 {
    u16::from_ne_bytes([page[PD_CHECKSUM], page[PD_CHECKSUM + 1]])
}

/// The page's `pd_lsn`: two native-endian u32 halves (xlogid, xrecoff).
pub fn page_lsn(page: &[u8]) -> Lsn {
    let hi = u32::from_ne_bytes(page[0..4].try_into().unwrap());
    let lo = u32::from_ne_bytes(page[4..8].try_into().unwrap());
    Lsn(((hi as u64) << 32) | lo as u64)
}

/// Outcome of checking one page; see [`verify_page`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PageCheck {
    /// The stored checksum matches.
    Valid,
    /// An all-zero page (relation extended, page never written): valid, has no checksum.
    New,
    /// Not checked: the page was modified at or after the backup start (`pd_lsn >= start`), so
    /// a concurrent write may have torn it; WAL replay from the start LSN rewrites it anyway.
    Skipped { lsn: Lsn },
    /// The checksum does not match.
    Mismatch { stored: u16, computed: u16 },
    /// `pd_upper` is 0 (a "new" page) but the page is not all zeros.
    NewNotZero,
}

impl PageCheck {
    /// Whether the page is acceptable (valid, new or skipped).
    pub fn is_ok(&self) -> bool {
        !matches!(self, PageCheck::Mismatch { .. } | PageCheck::NewNotZero)
    }
}

/// Check one page of a relation file with data checksums on, as pg_basebackup does.
/// `blkno` is the absolute block number (see [`pg_checksum_page`]); `backup_start` is the
/// backup's start LSN. A failed page may be a torn read of a page being written: the caller
/// should read it again once and report it only if it fails again (as pg_basebackup does).
pub fn verify_page(page: &[u8], blkno: u32, backup_start: Lsn) -> PageCheck {
    let pd_upper = u16::from_ne_bytes([page[PD_UPPER], page[PD_UPPER + 1]]);
    if pd_upper == 0 {
        return if page.iter().all(|&b| b == 0) {
            PageCheck::New
        } else {
            PageCheck::NewNotZero
        };
    }
    let lsn = page_lsn(page);
    if lsn >= backup_start {
        return PageCheck::Skipped { lsn };
    }
    let stored = stored_checksum(page);
    let computed = pg_checksum_page(page, blkno);
    if stored == computed {
        PageCheck::Valid
    } else {
        PageCheck::Mismatch { stored, computed }
    }
}

/// Absolute block number of block `block_in_file` of segment file `segno` (`rel.N`).
pub fn absolute_block(segno: u32, block_in_file: u32) -> u32 {
    segno.wrapping_mul(RELSEG_SIZE).wrapping_add(block_in_file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(lsn: u64, upper: u16, fill: u8) -> Vec<u8> {
        let mut p = vec![fill; BLCKSZ];
        p[0..4].copy_from_slice(&((lsn >> 32) as u32).to_ne_bytes());
        p[4..8].copy_from_slice(&(lsn as u32).to_ne_bytes());
        p[PD_UPPER..PD_UPPER + 2].copy_from_slice(&upper.to_ne_bytes());
        p
    }

    fn stamp(p: &mut [u8], blkno: u32) {
        let c = pg_checksum_page(p, blkno);
        p[PD_CHECKSUM..PD_CHECKSUM + 2].copy_from_slice(&c.to_ne_bytes());
    }

    #[test]
    fn checksum_ignores_stored_field_and_depends_on_block() {
        let mut p = page_with(0x100, 100, 7);
        let c = pg_checksum_page(&p, 0);
        p[PD_CHECKSUM] = 0xAB;
        p[PD_CHECKSUM + 1] = 0xCD;
        assert_eq!(pg_checksum_page(&p, 0), c);
        assert_ne!(pg_checksum_page(&p, 1), c);
        assert_ne!(c, 0);
    }

    #[test]
    fn verify_outcomes() {
        let start = Lsn(0x1000);
        let mut p = page_with(0x500, 100, 3);
        stamp(&mut p, 42);
        assert_eq!(verify_page(&p, 42, start), PageCheck::Valid);
        assert!(matches!(
            verify_page(&p, 43, start),
            PageCheck::Mismatch { .. }
        ));
        let mut flipped = p.clone();
        flipped[5000] ^= 0x10;
        let r = verify_page(&flipped, 42, start);
        assert!(matches!(r, PageCheck::Mismatch { .. }) && !r.is_ok());

        // Modified after the backup start: not checked.
        let mut recent = page_with(0x2000, 100, 3);
        recent[6000] ^= 1;
        assert_eq!(
            verify_page(&recent, 0, start),
            PageCheck::Skipped { lsn: Lsn(0x2000) }
        );

        assert_eq!(verify_page(&vec![0u8; BLCKSZ], 9, start), PageCheck::New);
        let mut dirty_new = vec![0u8; BLCKSZ];
        dirty_new[4000] = 1;
        assert_eq!(verify_page(&dirty_new, 9, start), PageCheck::NewNotZero);
    }

    #[test]
    fn absolute_blocks() {
        assert_eq!(absolute_block(0, 5), 5);
        assert_eq!(absolute_block(2, 5), 2 * 131072 + 5);
    }
}
