//! Inputs the fuzz targets of fuzz/ (issue 18, hostile bytes) found to make pgkeep's
//! PostgreSQL-side parsers panic, each now a clean error.

use pgkeep_pg::walrecords::SegmentSummary;

/// A summary as stored beside an archived segment, with `bytes` as the continuation's hex.
fn summary_with_head_bytes(hex: &str) -> String {
    format!(
        r#"{{"format":1,"pg_major":18,"start":"0/2000000","end":"0/200A000","records":1,
            "switched":false,"xact_ends":0,"min_xact_time":null,"max_xact_time":null,"xids":[],
            "restore_points":[],"tail":null,"head":{{"rem_len":4,"bytes":"{hex}"}}}}"#
    )
}

#[test]
fn a_segment_summary_with_a_multibyte_character_in_its_hex_is_an_error_not_a_panic() {
    // Found by the wal_record target: the hex was sliced two bytes at a time as a string,
    // through the middle of the two-byte 'ٔ'.
    let ok: SegmentSummary = serde_json::from_str(&summary_with_head_bytes("3f00")).unwrap();
    assert_eq!(ok.head.unwrap().bytes, [0x3f, 0]);
    for hex in ["3f00000\u{654}0ef03000", "+f00", "zz00"] {
        let e = serde_json::from_str::<SegmentSummary>(&summary_with_head_bytes(hex)).unwrap_err();
        assert!(e.to_string().contains("hex"), "{hex}: {e}");
    }
}

/// The long page header of a segment of `major`: magic, info, timeline 1, page address
/// 0/2000000, `rem_len`, system id, 16 MiB segments, 8 KiB pages.
fn long_header(info: u16, rem_len: u32) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0..2].copy_from_slice(&0xD110u16.to_ne_bytes()); // PostgreSQL 15
    h[2..4].copy_from_slice(&info.to_ne_bytes());
    h[4..8].copy_from_slice(&1u32.to_ne_bytes());
    h[8..16].copy_from_slice(&0x0200_0000u64.to_ne_bytes());
    h[16..20].copy_from_slice(&rem_len.to_ne_bytes());
    h[24..32].copy_from_slice(&7_194_000_000_000_000_123u64.to_ne_bytes());
    h[32..36].copy_from_slice(&(16u32 << 20).to_ne_bytes());
    h[36..40].copy_from_slice(&8192u32.to_ne_bytes());
    h
}

#[test]
fn a_segment_shorter_than_a_page_that_starts_with_a_continuation_is_scanned_not_a_panic() {
    use pgkeep_pg::walrecords::scan_segment;
    // XLP_LONG_HEADER | XLP_FIRST_IS_CONTRECORD, 100 bytes of a record continued from the
    // previous segment, and the file ends before its first page does (a torn copy).
    let mut data = long_header(0x0003, 100);
    data.resize(200, 0xAB);
    let scan = scan_segment(&data, std::path::Path::new("000000010000000000000002")).unwrap();
    assert!(scan.events.is_empty());
    assert_eq!(scan.records, 0);
    assert!(scan.end.0 <= 0x0200_0000 + 200);
}
