//! The WAL record scanner against real PostgreSQL 15 WAL, with `pg_waldump` as the oracle:
//! every commit, abort, commit/abort of a prepared transaction and restore point that
//! pg_waldump prints for the archived segments is found by `scan_segment` (plus
//! `join_split` at segment boundaries) at the same LSN with the same xid, time and name, and
//! nothing else is.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgkeep_pg::wal::WalFileName;
use pgkeep_pg::walrecords::{join_split, scan_segment, SegmentSummary, WalEvent};
use pgkeep_pg::Lsn;
use pgkeep_testing::cluster::{running_as_root, PG_BIN_DIR};
use pgkeep_testing::Cluster;

/// (LSN, what, xid, time in µs since 2000 or 0, name)
type Event = (Lsn, String, u32, i64, String);

fn ours(e: &WalEvent) -> Event {
    match e {
        WalEvent::XactEnd(x) => (
            x.lsn,
            if x.commit { "commit" } else { "abort" }.to_string(),
            x.xid,
            x.time,
            String::new(),
        ),
        WalEvent::RestorePoint(r) => (r.lsn, "restore point".into(), 0, r.time, r.name.clone()),
    }
}

/// `2026-01-02 18:32:30.123456 UTC` -> microseconds since 2000-01-01 UTC.
fn pg_time(s: &str) -> i64 {
    let s = s.trim().trim_end_matches(" UTC");
    let t = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .unwrap_or_else(|e| panic!("{s:?}: {e}"));
    t.and_utc().timestamp_micros() - 946_684_800_000_000
}

/// What pg_waldump prints for the same records.
fn waldump(dir: &Path, first: &str, last: &str) -> Vec<Event> {
    let out = Command::new(format!("{PG_BIN_DIR}/pg_waldump"))
        .arg("-p")
        .arg(dir)
        .args([first, last])
        .env("TZ", "UTC")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = Vec::new();
    for line in text.lines() {
        let field = |name: &str| {
            let i = line
                .find(name)
                .unwrap_or_else(|| panic!("{name} in {line}"))
                + name.len();
            line[i..].split(',').next().unwrap().trim().to_string()
        };
        let desc = &line[line.find("desc: ").unwrap() + 6..];
        let lsn: Lsn = field("lsn: ").parse().unwrap();
        let tx: u32 = field("tx: ").parse().unwrap();
        if line.starts_with("rmgr: Transaction") {
            let (kind, rest) = desc.split_once(' ').unwrap();
            let time_text = |r: &str| r.split(';').next().unwrap().to_string();
            let (what, xid, time) = match kind {
                "COMMIT" => ("commit", tx, pg_time(&time_text(rest))),
                "ABORT" => ("abort", tx, pg_time(&time_text(rest))),
                "COMMIT_PREPARED" | "ABORT_PREPARED" => {
                    let (x, r) = rest.split_once(": ").unwrap();
                    let what = if kind == "COMMIT_PREPARED" {
                        "commit"
                    } else {
                        "abort"
                    };
                    (what, x.parse().unwrap(), pg_time(&time_text(r)))
                }
                _ => continue,
            };
            v.push((lsn, what.to_string(), xid, time, String::new()));
        } else if line.starts_with("rmgr: XLOG") && desc.starts_with("RESTORE_POINT ") {
            // pg_waldump prints the name only; the time is compared through ours below.
            v.push((
                lsn,
                "restore point".into(),
                0,
                -1,
                desc["RESTORE_POINT ".len()..].to_string(),
            ));
        }
    }
    v
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(WalFileName::from_path(p), Ok(WalFileName::Segment(_))))
        .collect();
    v.sort();
    v
}

#[test]
fn scanner_agrees_with_pg_waldump_on_real_wal() {
    let c = Cluster::builder()
        .archive_command("cp %p ../archive/%f")
        .setting("max_prepared_transactions", "4")
        .init()
        .unwrap();
    let archive = c.dir().join("archive");
    std::fs::create_dir(&archive).unwrap();
    if running_as_root() {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&archive)
            .status()
            .unwrap();
    }
    let mut c = c;
    c.start().unwrap();
    c.sql("CREATE TABLE t (i int, s text)").unwrap();
    let start = pg_time(&c.sql("SELECT now() AT TIME ZONE 'UTC'").unwrap());
    // Commits of every size, aborts with an xid, a prepared transaction committed and one
    // rolled back, restore points, and bulk rows between them so records cross pages and
    // segments. A committed prepared transaction that drops a table carries dropped
    // relations and dropped statistics before the prepared xid the scanner reads.
    for round in 0..6 {
        let drop = if round >= 2 && round % 2 == 0 {
            format!("DROP TABLE p{};", round - 2)
        } else {
            String::new()
        };
        c.sql(&format!(
            "INSERT INTO t SELECT g, md5(g::text) || repeat('x', 200) FROM generate_series(1, 40000) g;
             BEGIN; INSERT INTO t VALUES ({round}, 'rolled back'); ROLLBACK;
             BEGIN; CREATE TABLE p{round} (i int); {drop} PREPARE TRANSACTION 'p{round}';
             {} PREPARED 'p{round}';
             SELECT pg_create_restore_point('rp {round}');",
            if round % 2 == 0 { "COMMIT" } else { "ROLLBACK" }
        ))
        .unwrap();
        c.pgbench(&[
            "-n",
            "-c",
            "2",
            "-t",
            "300",
            "-f",
            write_script(&c, "INSERT INTO t VALUES (1, 'x');")
                .to_str()
                .unwrap(),
        ])
        .unwrap();
    }
    let last = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(archive.join(&last))
        .map(|m| m.len())
        .unwrap_or(0)
        < 16 << 20
    {
        assert!(Instant::now() < deadline, "{last} not archived");
        std::thread::sleep(Duration::from_millis(50));
    }
    let segs = segments(&archive);
    assert!(segs.len() >= 4, "{segs:?}");

    let mut found: Vec<Event> = Vec::new();
    let mut summaries: Vec<SegmentSummary> = Vec::new();
    let mut joined = 0;
    for p in &segs {
        let data = std::fs::read(p).unwrap();
        let scan = scan_segment(&data, p).unwrap();
        let sum = SegmentSummary::from_scan(&scan);
        if let (Some(prev), Some(head)) = (summaries.last(), &sum.head) {
            if let Some(tail) = &prev.tail {
                if let Some(e) = join_split(tail, head, 15) {
                    found.push(ours(&e));
                    joined += 1;
                }
            }
        }
        found.extend(scan.events.iter().map(ours));
        summaries.push(sum);
    }
    found.sort();
    let first = segs[0].file_name().unwrap().to_str().unwrap();
    let mut want = waldump(&archive, first, &last);
    want.sort();
    assert!(
        want.len() > 3000,
        "pg_waldump printed {} events",
        want.len()
    );
    // pg_waldump does not print a restore point's time: take ours, and check it below.
    for w in want.iter_mut().filter(|w| w.1 == "restore point") {
        if let Some(f) = found.iter().find(|f| f.0 == w.0) {
            w.3 = f.3;
        }
    }
    if want != found {
        let a: BTreeSet<_> = want.iter().collect();
        let b: BTreeSet<_> = found.iter().collect();
        let missing: Vec<_> = a.difference(&b).take(5).collect();
        let extra: Vec<_> = b.difference(&a).take(5).collect();
        panic!(
            "{} events from pg_waldump, {} from the scanner ({joined} joined across segments); missing {missing:?}, extra {extra:?}",
            want.len(),
            found.len()
        );
    }
    // Restore point times lie within the run; their names are all there.
    let since = pg_time(&c.sql("SELECT now() AT TIME ZONE 'UTC'").unwrap());
    let names: Vec<&Event> = found.iter().filter(|e| e.1 == "restore point").collect();
    assert_eq!(names.len(), 6);
    for (i, e) in names.iter().enumerate() {
        assert_eq!(e.4, format!("rp {i}"));
        assert!(
            e.3 >= start && e.3 <= since,
            "{e:?} outside [{start}, {since}]"
        );
    }
    // Prepared transactions: both outcomes seen with the prepared xid (never 0).
    assert!(found.iter().all(|e| e.1 == "restore point" || e.2 != 0));
    // The summaries hold every xid that ended.
    for e in found.iter().filter(|e| e.1 != "restore point") {
        assert!(
            summaries.iter().any(|s| s.has_xid(e.2)),
            "xid {} not in any summary",
            e.2
        );
    }
}

fn write_script(c: &Cluster, sql: &str) -> PathBuf {
    let p = c.dir().join("script.sql");
    std::fs::write(&p, sql).unwrap();
    p
}
