//! What PostgreSQL and its tools wrote: WAL segments and records, pg_control, backup_label,
//! timeline history files, pg_dump custom-format archives and WAL file names.

use std::io::Write;
use std::path::Path;

use pgkeep_pg::archive::Rechunker;
use pgkeep_pg::walrecords::{
    join_split, scan_segment, SegmentSummary, SplitHead, SplitRecord, WalEvent, MAX_SPLIT_BYTES,
};
use pgkeep_pg::{
    BackupLabel, ControlFile, Lsn, TimelineHistory, WalFileName, WalPageHeader, WalSegmentName,
};

/// A WAL segment (or its first pages), as `archive-push` and point-in-time recovery read it.
/// A scan must stay inside the segment and report events inside what it read.
pub fn wal_segment(data: &[u8]) -> bool {
    let path = Path::new("000000010000000000000001");
    let Ok(h) = WalPageHeader::parse(data, path) else {
        return false;
    };
    let _ = (h.segment_name(), h.major_version());
    let Ok(scan) = scan_segment(data, path) else {
        return false;
    };
    let limit = scan.start.0 + data.len().min(h.seg_size as usize) as u64;
    assert!(
        scan.start <= scan.end && scan.end.0 <= limit,
        "scan end outside the segment"
    );
    for e in &scan.events {
        assert!(
            e.lsn() >= scan.start && e.lsn() < scan.end,
            "an event outside the scan"
        );
    }
    if let Some(t) = &scan.tail {
        assert!(t.prefix.len() <= MAX_SPLIT_BYTES);
    }
    if let Some(hd) = &scan.head {
        assert!(hd.bytes.len() <= MAX_SPLIT_BYTES);
    }
    let summary = SegmentSummary::from_scan(&scan);
    let json = serde_json::to_string(&summary).expect("a summary serializes");
    let back: SegmentSummary = serde_json::from_str(&json).expect("a summary reads back");
    assert_eq!(back, summary);
    true
}

const MAJORS: [u32; 6] = [13, 14, 15, 16, 17, 18];

/// One WAL record's bytes, or stored segment summaries.
///
/// Even mode byte: a major-version byte, a split byte, then a record (header included), cut
/// in two at the split point as a segment boundary would cut it and joined back by
/// `join_split`. When both sides are kept whole the answer must not depend on where the cut
/// was. Odd: the JSON of a segment summary, or of two consecutive ones, as stored beside the
/// archived WAL; their split record is joined.
pub fn wal_record(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    if mode & 1 == 1 {
        return summaries(rest);
    }
    let [sel, split, rec @ ..] = rest else {
        return false;
    };
    let major = MAJORS[*sel as usize % MAJORS.len()];
    let k = *split as usize * rec.len() / 255;
    let joined = split_at(rec, k, major);
    // A cut that keeps both sides whole (each at most MAX_SPLIT_BYTES) sees the whole record:
    // any two such cuts must give the same answer.
    let whole = |k: usize| k <= MAX_SPLIT_BYTES && rec.len() - k <= MAX_SPLIT_BYTES;
    let reference = rec.len().min(MAX_SPLIT_BYTES);
    if whole(k) && whole(reference) {
        let expected = split_at(rec, reference, major);
        assert_eq!(
            joined, expected,
            "the answer depends on where the record was cut"
        );
    }
    joined.is_some()
}

/// `join_split` of `rec` cut after `k` bytes, with what a scan keeps of each side.
fn split_at(rec: &[u8], k: usize, major: u32) -> Option<WalEvent> {
    let tail = SplitRecord {
        lsn: Lsn(0x0100_0000),
        total_len: rec.len() as u32,
        in_segment: k as u32,
        prefix: rec[..k.min(MAX_SPLIT_BYTES)].to_vec(),
    };
    let rem = &rec[k..];
    let head = SplitHead {
        rem_len: rem.len() as u32,
        bytes: rem[..rem.len().min(MAX_SPLIT_BYTES)].to_vec(),
    };
    join_split(&tail, &head, major)
}

fn summaries(json: &[u8]) -> bool {
    let list: Vec<SegmentSummary> = match serde_json::from_slice::<SegmentSummary>(json) {
        Ok(s) => vec![s],
        Err(_) => match serde_json::from_slice(json) {
            Ok(v) => v,
            Err(_) => return false,
        },
    };
    for s in &list {
        let _ = (s.has_xid(s.xids.first().map_or(0, |r| r[1])), s.xid_span());
        if let (Some(t), Some(h)) = (&s.tail, &s.head) {
            let _ = join_split(t, h, s.pg_major);
        }
    }
    for w in list.windows(2) {
        if let (Some(t), Some(h)) = (&w[0].tail, &w[1].head) {
            let _ = join_split(t, h, w[0].pg_major);
        }
    }
    true
}

/// Where each pg_control layout keeps its CRC (control.rs: 288, and 292 from version 1800).
fn crc_offset(b: &[u8]) -> usize {
    match b
        .get(8..12)
        .map(|v| u32::from_ne_bytes(v.try_into().expect("4 bytes")))
    {
        Some(1800) => 292,
        _ => 288,
    }
}

/// A pg_control file. Even mode byte: as read. Odd: its CRC is made right first (where the
/// version's layout keeps it), so that mutations reach the fields behind the check.
pub fn pg_control(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let mut b = rest.to_vec();
    if mode & 1 == 1 {
        let at = crc_offset(&b);
        if b.len() >= at + 4 {
            let crc = crc32c::crc32c(&b[..at]);
            b[at..at + 4].copy_from_slice(&crc.to_ne_bytes());
        }
    }
    let Ok(c) = ControlFile::parse(&b, Path::new("global/pg_control")) else {
        return false;
    };
    let _ = (
        c.major_version(),
        c.state.as_controldata_str(),
        c.data_checksums(),
    );
    true
}

/// A backup_label file's text, as `backup --method basebackup` reads pg_basebackup's.
pub fn backup_label(data: &[u8]) -> bool {
    BackupLabel::parse(&String::from_utf8_lossy(data)).is_ok()
}

/// A timeline history file: the timeline its name gives (u32 LE), then its text. What is
/// accepted must read back the same from the text pgkeep would write for it.
pub fn timeline_history(data: &[u8]) -> bool {
    if data.len() < 4 {
        return false;
    }
    let tli = u32::from_le_bytes(data[..4].try_into().expect("4 bytes"));
    let text = String::from_utf8_lossy(&data[4..]);
    let Ok(h) = TimelineHistory::parse(tli, &text) else {
        return false;
    };
    let tls = h.timelines();
    for e in &h.entries {
        let _ = (h.timeline_at(e.switchpoint), h.switchpoint_of(e.timeline));
    }
    let _ = (h.timeline_at(Lsn(u64::MAX)), tls);
    let again = TimelineHistory::parse(tli, &h.to_text()).expect("pgkeep's own text parses");
    assert_eq!(again, h, "a history does not survive its own text");
    true
}

/// A pg_dump custom-format archive, through the rechunker restore-dump streams it with. The
/// output must not depend on how the input was cut into writes, and rechunking its own output
/// must change nothing.
pub fn dump_archive(data: &[u8]) -> bool {
    let (one, stats) = rechunk(data, &[data.len().max(1)]);
    // Writes of the sizes pg_dump's pipe might hand over: from the input's own bytes.
    let sizes: Vec<usize> = data.iter().take(16).map(|&b| 1 + b as usize * 37).collect();
    let (cut, cut_stats) = rechunk(data, &sizes);
    assert!(
        one == cut,
        "the output depends on how the input was cut into writes"
    );
    assert_eq!(stats, cut_stats);
    let (twice, _) = rechunk(&one, &[one.len().max(1)]);
    assert!(twice == one, "rechunking the rechunker's output changed it");
    if !stats.understood {
        return false;
    }
    true
}

fn rechunk(data: &[u8], sizes: &[usize]) -> (Vec<u8>, pgkeep_pg::archive::RechunkStats) {
    let mut r = Rechunker::new(Vec::new());
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        r.write_all(&rest[..n]).expect("writing to a Vec");
        rest = &rest[n..];
        i += 1;
    }
    r.finish().expect("finishing into a Vec")
}

/// A WAL file name as found in pg_wal or listed in a repository (`wal/<cluster>/<dir>/<name>`).
pub fn wal_file_name(data: &[u8]) -> bool {
    let Ok(s) = std::str::from_utf8(data) else {
        return false;
    };
    let _ = s.parse::<WalSegmentName>();
    let _ = s.parse::<Lsn>();
    let key = pgkeep_core::commands::archive::parse_wal_key("main", s);
    match WalFileName::parse(s) {
        Ok(n) => {
            let _ = (n.to_string(), n.archive_dir(), key);
            true
        }
        Err(_) => key.is_some(),
    }
}
