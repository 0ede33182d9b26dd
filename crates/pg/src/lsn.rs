//! Log sequence numbers.

use crate::error::{PgError, Result};
use std::fmt;
use std::str::FromStr;

/// A WAL position (PostgreSQL's `XLogRecPtr`). Text form is PostgreSQL's `%X/%X`: the high and
/// low 32 bits in upper-case hex without leading zeros, e.g. `16/B374D848`. Serialized as that
/// text so manifests stay readable and comparable with `pg_controldata` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid LSN `0/0`.
    pub const INVALID: Lsn = Lsn(0);

    /// Whether this is `0/0`.
    pub fn is_invalid(self) -> bool {
        self.0 == 0
    }

    /// Offset of this position inside its WAL segment.
    pub fn segment_offset(self, seg_size: u32) -> u32 {
        (self.0 % seg_size as u64) as u32
    }

    /// Bytes from `earlier` to `self` (0 when `earlier` is later).
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// `self + n`, or `None` on overflow.
    pub fn checked_add(self, n: u64) -> Option<Lsn> {
        self.0.checked_add(n).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = PgError;

    fn from_str(s: &str) -> Result<Lsn> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| {
            PgError::parse("LSN", s, "expected HIGH/LOW in hex, e.g. 16/B374D848")
        })?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(PgError::parse(
                    "LSN",
                    s,
                    "each half must be 1 to 8 hex digits",
                ));
            }
            u32::from_str_radix(p, 16).map_err(|e| PgError::parse("LSN", s, e.to_string()))
        };
        Ok(Lsn(((part(hi)? as u64) << 32) | part(lo)? as u64))
    }
}

impl std::ops::Add<u64> for Lsn {
    type Output = Lsn;
    fn add(self, rhs: u64) -> Lsn {
        Lsn(self.0 + rhs)
    }
}

impl std::ops::Sub<u64> for Lsn {
    type Output = Lsn;
    fn sub(self, rhs: u64) -> Lsn {
        Lsn(self.0 - rhs)
    }
}

impl std::ops::Sub<Lsn> for Lsn {
    type Output = u64;
    /// Distance in bytes; panics in debug builds if `rhs > self` (use [`Lsn::bytes_since`]).
    fn sub(self, rhs: Lsn) -> u64 {
        self.0 - rhs.0
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Lsn {
        Lsn(v)
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Lsn, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_round_trip() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::INVALID);
        assert_eq!(Lsn(0x1_0000_0000).to_string(), "1/0");
        assert_eq!("0/3000028".parse::<Lsn>().unwrap().to_string(), "0/3000028");
        assert_eq!("ffffffff/ffffffff".parse::<Lsn>().unwrap().0, u64::MAX);
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "16",
            "/1",
            "1/",
            "G/1",
            "1/123456789",
            "1/2/3",
            " 1/2",
            "-1/2",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn arithmetic_and_order() {
        let a = Lsn(0x100);
        assert_eq!(a + 0x10, Lsn(0x110));
        assert_eq!(Lsn(0x110) - a, 0x10);
        assert_eq!(a.bytes_since(Lsn(0x200)), 0);
        assert!(Lsn(0x1_0000_0000) > Lsn(0xFFFF_FFFF));
        assert_eq!(Lsn(0x0300_0028).segment_offset(16 << 20), 0x28);
        assert_eq!(Lsn(u64::MAX).checked_add(1), None);
    }

    #[test]
    fn serde_uses_text() {
        let l = Lsn(0x16_B374_D848);
        let j = serde_json::to_string(&l).unwrap();
        assert_eq!(j, "\"16/B374D848\"");
        assert_eq!(serde_json::from_str::<Lsn>(&j).unwrap(), l);
        assert!(serde_json::from_str::<Lsn>("\"zz\"").is_err());
    }
}
