//! A small byte mutator for the stable harness: the classic havoc moves of AFL and libFuzzer
//! (bit flips, interesting integers, arithmetic, inserted, deleted and repeated ranges,
//! dictionary tokens, splices with another input), stacked one to eight at a time. Without
//! coverage feedback it only explores near the corpus; the libFuzzer runs go further.

use rand::rngs::StdRng;
use rand::{Rng, RngCore};

/// Integers that sit on the edges parsers get wrong.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    16,
    24,
    32,
    40,
    64,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4096,
    8192,
    32767,
    32768,
    65535,
    65536,
    1 << 20,
    1 << 24,
    16 << 20,
    1 << 30,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    1 << 32,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Applies one to eight random mutations to `data`, keeping it at most `max_len` bytes.
/// `other` is another input to splice from; `dict` holds tokens to insert or overwrite with.
pub fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]], max_len: usize) {
    let n = 1 << rng.random_range(0..4);
    for _ in 0..n {
        one(rng, data, other, dict);
    }
    data.truncate(max_len);
}

fn pos(rng: &mut StdRng, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        rng.random_range(0..len)
    }
}

fn one(rng: &mut StdRng, data: &mut Vec<u8>, other: &[u8], dict: &[&[u8]]) {
    let len = data.len();
    match rng.random_range(0..14) {
        0 if len > 0 => {
            let p = pos(rng, len);
            data[p] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let p = pos(rng, len);
            data[p] = rng.random();
        }
        2 if len > 0 => {
            // An interesting integer of 1, 2, 4 or 8 bytes, either byte order.
            let w = 1 << rng.random_range(0..4);
            let p = pos(rng, len);
            let v = INTERESTING[rng.random_range(0..INTERESTING.len())];
            let bytes = if rng.random() {
                v.to_le_bytes()
            } else {
                (v << (64 - 8 * w)).to_be_bytes()
            };
            let end = (p + w).min(len);
            data[p..end].copy_from_slice(&bytes[..end - p]);
        }
        3 if len >= 4 => {
            // Small arithmetic on a little-endian u32 (lengths, counts, offsets).
            let p = pos(rng, len - 3);
            let v = u32::from_le_bytes(data[p..p + 4].try_into().expect("4 bytes"));
            let d = rng.random_range(1..=35u32);
            let v = if rng.random() {
                v.wrapping_add(d)
            } else {
                v.wrapping_sub(d)
            };
            data[p..p + 4].copy_from_slice(&v.to_le_bytes());
        }
        4 => {
            let p = pos(rng, len + 1);
            let mut ins = vec![0u8; rng.random_range(1..=16)];
            rng.fill_bytes(&mut ins);
            data.splice(p..p, ins);
        }
        5 => {
            // A run of one byte: long strings, zero pages.
            let p = pos(rng, len + 1);
            let b = if rng.random() { 0 } else { rng.random() };
            let n = rng.random_range(1..=512);
            data.splice(p..p, std::iter::repeat_n(b, n));
        }
        6 if len > 0 => {
            let p = pos(rng, len);
            let n = rng.random_range(1..=(len - p).min(64));
            data.drain(p..p + n);
        }
        7 if len > 0 => {
            // A copy of one range, inserted elsewhere (repeated entries, fields).
            let p = pos(rng, len);
            let n = rng.random_range(1..=(len - p).min(256));
            let chunk = data[p..p + n].to_vec();
            let at = pos(rng, len + 1);
            data.splice(at..at, chunk);
        }
        8 if len > 0 => {
            let p = pos(rng, len);
            data.truncate(p);
        }
        9 if !other.is_empty() => {
            // Splice: a prefix of this input and a suffix of the other.
            let p = pos(rng, len + 1);
            let q = pos(rng, other.len());
            data.truncate(p);
            data.extend_from_slice(&other[q..]);
        }
        10 | 11 if !dict.is_empty() => {
            let t = dict[rng.random_range(0..dict.len())];
            let p = pos(rng, len + 1);
            if rng.random() || p + t.len() > len {
                data.splice(p..p, t.iter().copied());
            } else {
                data[p..p + t.len()].copy_from_slice(t);
            }
        }
        12 if len > 1 => {
            // Swap two bytes.
            let (a, b) = (pos(rng, len), pos(rng, len));
            data.swap(a, b);
        }
        13 if len > 0 => {
            // A printable byte: keeps text inputs text.
            let p = pos(rng, len);
            data[p] = rng.random_range(0x20..0x7f);
        }
        _ => {
            let p = pos(rng, len + 1);
            data.insert(p, rng.random());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mutations_change_inputs_and_respect_the_length_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let seed = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n".to_vec();
        let mut changed = 0;
        for _ in 0..1000 {
            let mut d = seed.clone();
            mutate(&mut rng, &mut d, b"other", &[b"LABEL: "], 100);
            assert!(d.len() <= 100);
            changed += usize::from(d != seed);
        }
        assert!(
            changed > 900,
            "only {changed} of 1000 mutations changed the input"
        );
    }
}
