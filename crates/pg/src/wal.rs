//! WAL file names and WAL segment page headers.
//!
//! A segment name is 24 upper-case hex digits: timeline, "log" (the high 32 bits of the
//! segment's start LSN) and the segment number within that log. How a segment number splits into
//! log and seg depends on the segment size (`0x1_0000_0000 / seg_size` segments per log), so the
//! conversions to and from LSNs take the segment size.

use crate::error::{PgError, Result};
use crate::lsn::Lsn;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// PostgreSQL's default WAL segment size (16 MiB).
pub const DEFAULT_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;

/// The name of one WAL segment, e.g. `000000010000000A000000FE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalSegmentName {
    /// Timeline id (first 8 hex digits).
    pub timeline: u32,
    /// High 32 bits of the segment's start LSN (middle 8 hex digits).
    pub log: u32,
    /// Segment number within `log` (last 8 hex digits); below `0x1_0000_0000 / seg_size`.
    pub seg: u32,
}

fn check_seg_size(seg_size: u32) {
    // PostgreSQL allows powers of two from 1 MiB to 1 GiB; anything else is a caller bug.
    assert!(
        seg_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&seg_size),
        "invalid WAL segment size {seg_size}"
    );
}

fn segs_per_log(seg_size: u32) -> u64 {
    check_seg_size(seg_size);
    0x1_0000_0000u64 / seg_size as u64
}

impl WalSegmentName {
    /// The segment that contains `lsn` on `timeline`.
    pub fn from_lsn(lsn: Lsn, timeline: u32, seg_size: u32) -> Self {
        Self::from_segno(lsn.0 / seg_size as u64, timeline, seg_size)
    }

    /// The segment that holds the byte just before `lsn` (PostgreSQL's XLByteToPrevSeg): the
    /// last segment needed for WAL that ends exactly at `lsn`.
    pub fn from_end_lsn(lsn: Lsn, timeline: u32, seg_size: u32) -> Self {
        Self::from_segno(
            lsn.0.saturating_sub(1) / seg_size as u64,
            timeline,
            seg_size,
        )
    }

    /// The segment with absolute number `segno` (start LSN / segment size).
    pub fn from_segno(segno: u64, timeline: u32, seg_size: u32) -> Self {
        let per = segs_per_log(seg_size);
        WalSegmentName {
            timeline,
            log: (segno / per) as u32,
            seg: (segno % per) as u32,
        }
    }

    /// The absolute segment number.
    pub fn segno(&self, seg_size: u32) -> u64 {
        self.log as u64 * segs_per_log(seg_size) + self.seg as u64
    }

    /// The LSN of the segment's first byte.
    pub fn start_lsn(&self, seg_size: u32) -> Lsn {
        Lsn(self.segno(seg_size) * seg_size as u64)
    }

    /// The following segment on the same timeline.
    pub fn next(&self, seg_size: u32) -> Self {
        Self::from_segno(self.segno(seg_size) + 1, self.timeline, seg_size)
    }

    /// The previous segment on the same timeline, `None` for segment 0.
    pub fn prev(&self, seg_size: u32) -> Option<Self> {
        let n = self.segno(seg_size);
        (n > 0).then(|| Self::from_segno(n - 1, self.timeline, seg_size))
    }

    /// The archive directory key part: timeline and log, the first 16 hex digits.
    pub fn archive_dir(&self) -> String {
        format!("{:08X}{:08X}", self.timeline, self.log)
    }

    /// Every segment from the one containing `start` to the one holding the last byte before
    /// `end` (inclusive), on `timeline`: the WAL a backup from `start` to `end` needs.
    pub fn range(start: Lsn, end: Lsn, timeline: u32, seg_size: u32) -> Vec<WalSegmentName> {
        let first = start.0 / seg_size as u64;
        let last = (end.0.max(start.0 + 1) - 1) / seg_size as u64;
        (first..=last)
            .map(|n| Self::from_segno(n, timeline, seg_size))
            .collect()
    }
}

impl fmt::Display for WalSegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

fn hex8(s: &str, what: &'static str, whole: &str) -> Result<u32> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PgError::parse(what, whole, "expected 8 hex digits"));
    }
    u32::from_str_radix(s, 16).map_err(|e| PgError::parse(what, whole, e.to_string()))
}

impl FromStr for WalSegmentName {
    type Err = PgError;

    fn from_str(s: &str) -> Result<Self> {
        if s.len() != 24 || !s.is_ascii() {
            return Err(PgError::parse(
                "WAL segment name",
                s,
                "expected 24 hex digits",
            ));
        }
        let timeline = hex8(&s[0..8], "WAL segment name", s)?;
        if timeline == 0 {
            return Err(PgError::parse(
                "WAL segment name",
                s,
                "timeline 0 does not exist",
            ));
        }
        Ok(WalSegmentName {
            timeline,
            log: hex8(&s[8..16], "WAL segment name", s)?,
            seg: hex8(&s[16..24], "WAL segment name", s)?,
        })
    }
}

/// Any file name PostgreSQL hands to `archive_command` / asks of `restore_command`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WalFileName {
    /// `000000010000000000000003`
    Segment(WalSegmentName),
    /// `000000010000000000000003.partial`: the last, incomplete segment of an old timeline.
    Partial(WalSegmentName),
    /// `00000002.history`: the timeline history file of the given timeline.
    History(u32),
    /// `000000010000000000000003.00000028.backup`: backup history file (segment, start offset).
    Backup(WalSegmentName, u32),
}

impl WalFileName {
    /// The segment the name refers to (none for history files).
    pub fn segment(&self) -> Option<WalSegmentName> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::Backup(s, _) => {
                Some(*s)
            }
            WalFileName::History(_) => None,
        }
    }

    /// The timeline the file belongs to.
    pub fn timeline(&self) -> u32 {
        match self {
            WalFileName::History(t) => *t,
            other => other.segment().map(|s| s.timeline).unwrap_or(0),
        }
    }

    /// The archive directory key part: first 16 hex digits for segment-based names; for history
    /// files the timeline followed by eight zeros (they sort before the timeline's segments).
    pub fn archive_dir(&self) -> String {
        match self {
            WalFileName::History(t) => format!("{t:08X}00000000"),
            other => other.segment().expect("segment").archive_dir(),
        }
    }

    /// Parse a file name (no directory part).
    pub fn parse(name: &str) -> Result<Self> {
        name.parse()
    }

    /// Parse the file name part of a path (for `archive-push %p`).
    pub fn from_path(path: &Path) -> Result<Self> {
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
            PgError::parse("WAL file name", path.display().to_string(), "no file name")
        })?;
        name.parse()
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::History(t) => write!(f, "{t:08X}.history"),
            WalFileName::Backup(s, off) => write!(f, "{s}.{off:08X}.backup"),
        }
    }
}

impl FromStr for WalFileName {
    type Err = PgError;

    fn from_str(s: &str) -> Result<Self> {
        const WHAT: &str = "WAL file name";
        if let Some(tli) = s.strip_suffix(".history") {
            let t = hex8(tli, WHAT, s)?;
            if t == 0 {
                return Err(PgError::parse(WHAT, s, "timeline 0 does not exist"));
            }
            return Ok(WalFileName::History(t));
        }
        if let Some(seg) = s.strip_suffix(".partial") {
            return Ok(WalFileName::Partial(seg.parse()?));
        }
        if let Some(rest) = s.strip_suffix(".backup") {
            if rest.len() == 33 && rest.as_bytes()[24] == b'.' {
                return Ok(WalFileName::Backup(
                    rest[..24].parse()?,
                    hex8(&rest[25..], WHAT, s)?,
                ));
            }
            return Err(PgError::parse(WHAT, s, "expected SEGMENT.OFFSET.backup"));
        }
        if s.len() == 24 {
            return Ok(WalFileName::Segment(s.parse()?));
        }
        Err(PgError::parse(
            WHAT,
            s,
            "expected a 24-hex-digit segment, SEGMENT.partial, SEGMENT.OFFSET.backup or TLI.history",
        ))
    }
}

/// `xlp_info` flag: this page has the long header (first page of a segment).
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// Size of the long page header, `MAXALIGN(sizeof(XLogLongPageHeaderData))` on 64-bit.
pub const LONG_PAGE_HEADER_SIZE: usize = 40;

/// The long page header at the start of every WAL segment (`XLogLongPageHeaderData`), read in
/// the machine's native byte order (little-endian here; pgkeep does not read WAL of another
/// architecture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WalPageHeader {
    /// `xlp_magic`: the WAL format version, see [`major_version_for_magic`].
    pub magic: u16,
    /// `xlp_info` flag bits.
    pub info: u16,
    /// `xlp_tli`: timeline of the first record on the page.
    pub timeline: u32,
    /// `xlp_pageaddr`: WAL position of this page, i.e. the segment's start LSN.
    pub page_addr: Lsn,
    /// `xlp_rem_len`: bytes of a record continued from the previous segment.
    pub rem_len: u32,
    /// `xlp_sysid`: the cluster's system identifier (as in pg_control).
    pub system_identifier: u64,
    /// `xlp_seg_size`: WAL segment size.
    pub seg_size: u32,
    /// `xlp_xlog_blcksz`: WAL block size.
    pub block_size: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_ne_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_ne_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_ne_bytes(b[o..o + 8].try_into().unwrap())
}

impl WalPageHeader {
    /// Parse the first bytes of a WAL segment. `source` names the file in errors. Checks that
    /// the long-header flag is set and the sizes are plausible; the magic is returned as-is
    /// (check it with [`major_version_for_magic`]).
    pub fn parse(bytes: &[u8], source: &Path) -> Result<Self> {
        let bad = |reason: String| PgError::BadFile {
            what: "WAL segment",
            path: source.to_path_buf(),
            reason,
        };
        if bytes.len() < LONG_PAGE_HEADER_SIZE {
            return Err(bad(format!(
                "only {} bytes, a segment starts with a {LONG_PAGE_HEADER_SIZE}-byte header",
                bytes.len()
            )));
        }
        let h = WalPageHeader {
            magic: u16_at(bytes, 0),
            info: u16_at(bytes, 2),
            timeline: u32_at(bytes, 4),
            page_addr: Lsn(u64_at(bytes, 8)),
            rem_len: u32_at(bytes, 16),
            system_identifier: u64_at(bytes, 24),
            seg_size: u32_at(bytes, 32),
            block_size: u32_at(bytes, 36),
        };
        if h.magic & 0xFF00 != 0xD100 {
            return Err(bad(format!(
                "page magic {:#06X} is not a WAL magic",
                h.magic
            )));
        }
        if h.info & XLP_LONG_HEADER == 0 {
            return Err(bad(
                "first page has no long header (XLP_LONG_HEADER unset)".into()
            ));
        }
        if !h.seg_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&h.seg_size) {
            return Err(bad(format!("implausible segment size {}", h.seg_size)));
        }
        if !h.block_size.is_power_of_two() || !(1024..=65536).contains(&h.block_size) {
            return Err(bad(format!("implausible WAL block size {}", h.block_size)));
        }
        if !h.page_addr.0.is_multiple_of(h.seg_size as u64) {
            return Err(bad(format!(
                "page address {} is not at a segment start",
                h.page_addr
            )));
        }
        Ok(h)
    }

    /// Read and parse the header of a WAL segment file.
    pub fn read(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| PgError::io("opening", path, e))?;
        let mut buf = [0u8; LONG_PAGE_HEADER_SIZE];
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PgError::io("reading", path, e)),
            }
        }
        Self::parse(&buf[..n], path)
    }

    /// The segment this header says it starts (its page address and timeline).
    pub fn segment_name(&self) -> WalSegmentName {
        WalSegmentName::from_lsn(self.page_addr, self.timeline, self.seg_size)
    }

    /// The PostgreSQL major version that writes this magic, if known.
    pub fn major_version(&self) -> Option<u32> {
        major_version_for_magic(self.magic)
    }
}

/// `XLOG_PAGE_MAGIC` of each major version (from each release's xlog_internal.h; the test
/// suite checks each against the first WAL segment written by that release's initdb).
const MAGICS: &[(u16, u32)] = &[
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

/// The PostgreSQL major version whose WAL carries this page magic (13 to 18).
pub fn major_version_for_magic(magic: u16) -> Option<u32> {
    MAGICS.iter().find(|(m, _)| *m == magic).map(|(_, v)| *v)
}

/// The page magic of a major version (13 to 18).
pub fn magic_for_major_version(major: u32) -> Option<u16> {
    MAGICS.iter().find(|(_, v)| *v == major).map(|(m, _)| *m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u32 = DEFAULT_SEGMENT_SIZE;

    #[test]
    fn segment_name_round_trip() {
        let n: WalSegmentName = "000000010000000A000000FE".parse().unwrap();
        assert_eq!((n.timeline, n.log, n.seg), (1, 0xA, 0xFE));
        assert_eq!(n.to_string(), "000000010000000A000000FE");
        assert_eq!(n.archive_dir(), "000000010000000A");
        assert_eq!(n.next(SEG).to_string(), "000000010000000A000000FF");
        assert_eq!(
            n.next(SEG).next(SEG).to_string(),
            "000000010000000B00000000"
        );
        assert_eq!(
            n.next(SEG).next(SEG).prev(SEG).unwrap().to_string(),
            "000000010000000A000000FF"
        );
        let zero: WalSegmentName = "000000010000000000000000".parse().unwrap();
        assert_eq!(zero.prev(SEG), None);
    }

    #[test]
    fn segment_from_lsn_depends_on_size() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(
            WalSegmentName::from_lsn(lsn, 1, SEG).to_string(),
            "0000000100000016000000B3"
        );
        // 64 MiB segments: 64 per log.
        assert_eq!(
            WalSegmentName::from_lsn(lsn, 3, 64 << 20).to_string(),
            "00000003000000160000002C"
        );
        let n = WalSegmentName::from_lsn(lsn, 1, SEG);
        assert_eq!(n.start_lsn(SEG).to_string(), "16/B3000000");
        // An end LSN on a segment boundary belongs to the previous segment.
        let end: Lsn = "0/3000000".parse().unwrap();
        assert_eq!(
            WalSegmentName::from_end_lsn(end, 1, SEG).to_string(),
            "000000010000000000000002"
        );
        assert_eq!(
            WalSegmentName::from_lsn(end, 1, SEG).to_string(),
            "000000010000000000000003"
        );
    }

    #[test]
    fn range_covers_start_to_end() {
        let r = WalSegmentName::range(
            "0/2000028".parse().unwrap(),
            "0/4000100".parse().unwrap(),
            1,
            SEG,
        );
        let names: Vec<String> = r.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            names,
            [
                "000000010000000000000002",
                "000000010000000000000003",
                "000000010000000000000004"
            ]
        );
        let r = WalSegmentName::range(
            "0/2000028".parse().unwrap(),
            "0/3000000".parse().unwrap(),
            1,
            SEG,
        );
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn rejects_bad_segment_names() {
        for bad in [
            "",
            "00000001000000000000000",
            "0000000100000000000000001",
            "00000001000000000000000G",
            "000000000000000000000001",
            "00000001000000000000000é",
        ] {
            assert!(bad.parse::<WalSegmentName>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn wal_file_names() {
        let cases = [
            "000000010000000000000003",
            "000000010000000000000003.partial",
            "0000000A.history",
            "000000010000000000000003.00000028.backup",
        ];
        for c in cases {
            let p: WalFileName = c.parse().unwrap();
            assert_eq!(p.to_string(), c);
        }
        assert_eq!(
            "0000000A.history".parse::<WalFileName>().unwrap(),
            WalFileName::History(10)
        );
        assert_eq!(
            "0000000A.history"
                .parse::<WalFileName>()
                .unwrap()
                .archive_dir(),
            "0000000A00000000"
        );
        let b: WalFileName = "000000020000000100000003.00000028.backup".parse().unwrap();
        assert_eq!(b.archive_dir(), "0000000200000001");
        assert_eq!(b.timeline(), 2);
        for bad in [
            "00000000.history",
            "x.history",
            "000000010000000000000003.backup",
            "foo",
            "archive_status",
        ] {
            assert!(bad.parse::<WalFileName>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            WalFileName::from_path(Path::new("pg_wal/000000010000000000000003")).unwrap(),
            WalFileName::Segment("000000010000000000000003".parse().unwrap())
        );
    }

    fn header_bytes(magic: u16, info: u16, tli: u32, addr: u64, sysid: u64, seg: u32) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..2].copy_from_slice(&magic.to_ne_bytes());
        b[2..4].copy_from_slice(&info.to_ne_bytes());
        b[4..8].copy_from_slice(&tli.to_ne_bytes());
        b[8..16].copy_from_slice(&addr.to_ne_bytes());
        b[24..32].copy_from_slice(&sysid.to_ne_bytes());
        b[32..36].copy_from_slice(&seg.to_ne_bytes());
        b[36..40].copy_from_slice(&8192u32.to_ne_bytes());
        b
    }

    #[test]
    fn page_header_parse_and_checks() {
        let p = Path::new("x");
        let b = header_bytes(
            0xD110,
            XLP_LONG_HEADER,
            1,
            0x300_0000,
            7_000_000_000_000_000_001,
            SEG,
        );
        let h = WalPageHeader::parse(&b, p).unwrap();
        assert_eq!(h.system_identifier, 7_000_000_000_000_000_001);
        assert_eq!(h.major_version(), Some(15));
        assert_eq!(h.segment_name().to_string(), "000000010000000000000003");
        assert!(WalPageHeader::parse(&b[..39], p).is_err());
        let no_long = header_bytes(0xD110, 0, 1, 0x300_0000, 1, SEG);
        assert!(WalPageHeader::parse(&no_long, p).is_err());
        let bad_magic = header_bytes(0x1234, XLP_LONG_HEADER, 1, 0x300_0000, 1, SEG);
        assert!(WalPageHeader::parse(&bad_magic, p).is_err());
        let misaligned = header_bytes(0xD110, XLP_LONG_HEADER, 1, 0x300_2000, 1, SEG);
        assert!(WalPageHeader::parse(&misaligned, p).is_err());
        let bad_size = header_bytes(0xD110, XLP_LONG_HEADER, 1, 0x300_0000, 1, 12345);
        assert!(WalPageHeader::parse(&bad_size, p).is_err());
    }

    #[test]
    fn magics() {
        assert_eq!(major_version_for_magic(0xD110), Some(15));
        assert_eq!(major_version_for_magic(0xD106), Some(13));
        assert_eq!(major_version_for_magic(0xD116), Some(17));
        assert_eq!(major_version_for_magic(0xD118), Some(18));
        assert_eq!(major_version_for_magic(0xD101), None);
        assert_eq!(major_version_for_magic(0xD121), None);
        assert_eq!(magic_for_major_version(16), Some(0xD113));
    }

    #[test]
    fn segment_headers_written_by_13_to_18() {
        // tests/fixtures/wal_long_headers.txt: the first 40 bytes of a WAL segment of each
        // release's cluster, the same clusters as tests/fixtures/pg_control.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        let text = std::fs::read_to_string(format!("{dir}/wal_long_headers.txt")).unwrap();
        let mut seen = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(' ').collect();
            let major: u32 = f[0].parse().unwrap();
            let bytes: Vec<u8> = (0..f[2].len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&f[2][i..i + 2], 16).unwrap())
                .collect();
            let h = WalPageHeader::parse(&bytes, Path::new(f[1])).unwrap();
            assert_eq!(h.major_version(), Some(major), "{line}");
            assert_eq!(h.segment_name().to_string(), f[1]);
            assert_eq!((h.seg_size, h.block_size), (16 << 20, 8192));
            let control = std::fs::read(format!("{dir}/pg_control/pg_control-{major}")).unwrap();
            let control = crate::ControlFile::parse(&control, Path::new("pg_control")).unwrap();
            assert_eq!(h.system_identifier, control.system_identifier, "{major}");
            seen.push(major);
        }
        assert_eq!(seen, [13, 14, 15, 16, 17, 18]);
    }
}
