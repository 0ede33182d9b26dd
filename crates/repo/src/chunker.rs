//! Content-defined chunk boundaries: FastCDC 2020 with normalization level 1 and the
//! unseeded gear table, exactly as `fastcdc::v2020::FastCDC` cuts, four bytes per step.
//!
//! The crate's loop takes two bytes per step, and each step's hash waits on the one before
//! through a shift and two additions. Here the hash advances four bytes with one shift and
//! one addition of a sum computed off that chain, and the four intermediate hashes are
//! tested beside it. The cut points are the crate's (tested against it below and in the
//! writer's tests): repositories written before this dedupe against what is written now.

use fastcdc::v2020::{get_gear_with_seed, logarithm2, MASKS};

use crate::format::ChunkerParams;

/// Finds the end of the next chunk; built once per writer.
pub(crate) struct Chunker {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
}

impl Chunker {
    /// A chunker for `p` (as validated by `Repository::init`: 64 KiB <= min < avg < max).
    pub(crate) fn new(p: ChunkerParams) -> Self {
        Self::with_sizes(p.min, p.avg, p.max)
    }

    fn with_sizes(min: u32, avg: u32, max: u32) -> Self {
        // As fastcdc's `with_level_and_seed(.., Normalization::Level1, 0)`.
        let bits = logarithm2(avg) as usize;
        let (gear, gear_ls) = get_gear_with_seed(0);
        Chunker {
            min: min as usize,
            avg: avg as usize,
            max: max as usize,
            mask_s: MASKS[bits + 1],
            mask_l: MASKS[bits - 1],
            gear,
            gear_ls,
        }
    }

    /// Length of the chunk at the start of `source` (all of it when it is at most `min`).
    pub(crate) fn cut(&self, source: &[u8]) -> usize {
        let mut remaining = source.len();
        if remaining <= self.min {
            return remaining;
        }
        let mut center = self.avg;
        if remaining > self.max {
            remaining = self.max;
        } else if remaining < center {
            center = remaining;
        }
        // Steps are counted in byte pairs, as in the crate: the hash starts at byte
        // 2 * (min / 2), and an odd last byte before `center` or `remaining` is not hashed.
        let mut pair = self.min / 2;
        let mut hash = 0u64;
        if let Some(end) = self.scan(source, &mut pair, center / 2, &mut hash, self.mask_s) {
            return end;
        }
        if let Some(end) = self.scan(source, &mut pair, remaining / 2, &mut hash, self.mask_l) {
            return end;
        }
        remaining
    }

    /// Hashes the pairs `*pair..end` of `source` under `mask` (`mask << 1` after the first
    /// byte of a pair, which the crate's tables shift by one); the cut, if one is found.
    #[inline(always)]
    fn scan(
        &self,
        source: &[u8],
        pair: &mut usize,
        end: usize,
        hash: &mut u64,
        mask: u64,
    ) -> Option<usize> {
        let (gear, gear_ls) = (&*self.gear, &*self.gear_ls);
        let mask_ls = mask << 1;
        let mut h = *hash;
        let mut p = *pair;
        let bytes = &source[..2 * end];
        while p + 2 <= end {
            let a = 2 * p;
            let b: &[u8; 4] = bytes[a..a + 4].try_into().unwrap();
            let (g0, g1) = (gear_ls[b[0] as usize], gear[b[1] as usize]);
            let (g2, g3) = (gear_ls[b[2] as usize], gear[b[3] as usize]);
            let t01 = g0.wrapping_add(g1);
            let h1 = (h << 2).wrapping_add(g0);
            let h2 = (h << 2).wrapping_add(t01);
            let h3 = (h << 4).wrapping_add(t01 << 2).wrapping_add(g2);
            let h4 = (h << 4).wrapping_add((t01 << 2).wrapping_add(g2.wrapping_add(g3)));
            if (h1 & mask_ls == 0) | (h2 & mask == 0) | (h3 & mask_ls == 0) | (h4 & mask == 0) {
                return Some(if h1 & mask_ls == 0 {
                    a
                } else if h2 & mask == 0 {
                    a + 1
                } else if h3 & mask_ls == 0 {
                    a + 2
                } else {
                    a + 3
                });
            }
            h = h4;
            p += 2;
        }
        if p < end {
            let a = 2 * p;
            h = (h << 2).wrapping_add(gear_ls[bytes[a] as usize]);
            if h & mask_ls == 0 {
                return Some(a);
            }
            h = h.wrapping_add(gear[bytes[a + 1] as usize]);
            if h & mask == 0 {
                return Some(a + 1);
            }
            p += 1;
        }
        *pair = p;
        *hash = h;
        None
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, RngCore, SeedableRng};

    use super::*;

    /// Every cut, for small and default sizes, odd and even lengths and bounds, random data
    /// and long runs (cut at the maximum), is where the crate's `FastCDC::cut` puts it.
    #[test]
    fn cuts_are_where_the_fastcdc_crate_cuts() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let sizes = [
            (64, 256, 1024),
            (65, 257, 1025),
            (1000, 4096, 9999),
            (256 << 10, 1 << 20, 4 << 20),
            (512 << 10, 1 << 20, 4 << 20),
        ];
        let mut cuts = 0usize;
        for (min, avg, max) in sizes {
            let ours = Chunker::with_sizes(min, avg, max);
            for round in 0..6 {
                let len = rng.random_range(0..(24 * max as usize)) + round;
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                if round % 2 == 1 {
                    let at = rng.random_range(0..len.max(1));
                    let run = rng.random_range(0..(3 * max as usize));
                    for b in data.iter_mut().skip(at).take(run) {
                        *b = 0;
                    }
                }
                let theirs = fastcdc::v2020::FastCDC::new(&data, min, avg, max);
                let mut pos = 0;
                while pos < len {
                    let want = theirs.cut(pos, len - pos).1 - pos;
                    let got = ours.cut(&data[pos..]);
                    assert_eq!(got, want, "sizes {min}/{avg}/{max}, {len} bytes, at {pos}");
                    pos += got;
                    cuts += 1;
                }
            }
        }
        assert!(cuts > 500, "only {cuts} cuts compared");
    }
}
