//! BackupSession against real clusters: sane LSNs and backup_label, WAL pinned by the slot,
//! and a full round trip (copy by the datadir rules, WAL from pg_wal, recovery settings) that
//! PostgreSQL starts from.

use pgkeep_pg::client::{BackupLabel, BackupSession, ConnParams, PgClient};
use pgkeep_pg::datadir::{self, EntryKind};
use pgkeep_pg::recovery::{RecoveryConfig, RecoveryTarget, TargetAction};
use pgkeep_pg::wal::{WalPageHeader, WalSegmentName};
use pgkeep_pg::{ControlFile, Lsn};
use pgkeep_testing::cluster::{first_difference, PG_BIN_DIR};
use pgkeep_testing::Cluster;
use std::path::Path;

async fn connect(c: &Cluster) -> PgClient {
    PgClient::connect(&ConnParams::resolve(Some(&c.conninfo())).unwrap())
        .await
        .unwrap()
}

/// Produce WAL in several segments, then checkpoint twice: without something holding it, the
/// WAL before the last checkpoint is removed or recycled.
fn churn_wal(c: &Cluster) {
    c.sql("create table if not exists churn(i int)").unwrap();
    for _ in 0..5 {
        c.sql("insert into churn select generate_series(1,1000); select pg_switch_wal()")
            .unwrap();
    }
    c.sql("checkpoint").unwrap();
    c.sql("insert into churn values (1); select pg_switch_wal()")
        .unwrap();
    c.sql("checkpoint").unwrap();
}

fn segment_exists(c: &Cluster, seg: &WalSegmentName) -> bool {
    c.pgdata().join("pg_wal").join(seg.to_string()).exists()
}

fn small_wal_cluster() -> Cluster {
    Cluster::builder()
        .setting("min_wal_size", "32MB")
        .setting("max_wal_size", "64MB")
        .setting("wal_keep_size", "0")
        .start()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_stop_gives_lsns_and_label_and_pins_wal() {
    let c = small_wal_cluster();
    let seg_size = 16 << 20;

    // Control: a backup without the slot loses its first segment to checkpoints.
    {
        let raw = connect(&c).await;
        let lsn: String = raw
            .inner()
            .query_one("select pg_backup_start('unpinned', true)::text", &[])
            .await
            .unwrap()
            .get(0);
        let first = WalSegmentName::from_lsn(lsn.parse().unwrap(), 1, seg_size);
        assert!(segment_exists(&c, &first));
        churn_wal(&c);
        assert!(
            !segment_exists(&c, &first),
            "without a slot {first} should have been recycled; the test below would prove nothing"
        );
        raw.inner()
            .query_one("select lsn from pg_backup_stop(false)", &[])
            .await
            .unwrap();
    }

    let client = connect(&c).await;
    let info = client.server_info().await.unwrap();
    assert_eq!(info.major_version(), 15);
    assert_eq!(info.wal_segment_size, seg_size);
    assert!(info.data_checksums && !info.in_recovery);
    assert_eq!(
        info.data_directory.canonicalize().unwrap(),
        c.pgdata().canonicalize().unwrap()
    );
    let control = ControlFile::read(c.pgdata()).unwrap();
    assert_eq!(info.system_identifier, control.system_identifier);
    assert_eq!(
        client.system_identifier().await.unwrap(),
        control.system_identifier
    );

    let before: Lsn = c
        .sql("select pg_current_wal_lsn()")
        .unwrap()
        .parse()
        .unwrap();
    let mut session = BackupSession::start(client, "pgkeep test").await.unwrap();
    let start = session.start_info().clone();
    assert!(start.lsn >= before, "{} < {}", start.lsn, before);
    assert_eq!(start.timeline, 1);
    assert_eq!(
        c.sql(&format!(
            "select temporary, wal_status from pg_replication_slots where slot_name = '{}'",
            start.slot
        ))
        .unwrap(),
        "t|reserved"
    );

    churn_wal(&c);
    let stop = session.stop().await.unwrap();
    assert!(stop.lsn > start.lsn);
    let label = BackupLabel::parse(&stop.backup_label).unwrap();
    assert_eq!(label.start_lsn, start.lsn);
    assert_eq!(label.label, "pgkeep test");
    assert_eq!(label.start_timeline, 1);
    assert!(stop.tablespace_map.is_empty());

    // More checkpoints after the stop: the slot still holds everything from start to stop.
    churn_wal(&c);
    let needed = WalSegmentName::range(start.lsn, stop.lsn, start.timeline, seg_size);
    assert!(needed.len() >= 5, "{needed:?}");
    for seg in &needed {
        assert!(
            segment_exists(&c, seg),
            "{seg} was removed despite the slot"
        );
        let h = WalPageHeader::read(&c.pgdata().join("pg_wal").join(seg.to_string())).unwrap();
        assert_eq!(h.system_identifier, control.system_identifier);
        assert_eq!(h.major_version(), Some(15));
        assert_eq!(h.segment_name(), *seg);
    }
    session.finish().await.unwrap();
    assert_eq!(
        c.sql("select count(*) from pg_replication_slots").unwrap(),
        "0"
    );
    churn_wal(&c);
    assert!(!segment_exists(&c, &needed[0]), "the slot was not released");
}

/// Copy what the datadir rules include, like a backup would (files may change while read: WAL
/// replay repairs them).
fn copy_included(from: &Path, to: &Path) {
    let listing = datadir::walk(from).unwrap();
    std::fs::create_dir_all(to).unwrap();
    for e in &listing.entries {
        let dst = to.join(&e.rel_path);
        match e.kind {
            EntryKind::Dir => std::fs::create_dir_all(&dst).unwrap(),
            EntryKind::File => {
                std::fs::copy(from.join(&e.rel_path), &dst).unwrap();
            }
            EntryKind::Symlink => panic!("no tablespaces in this test: {}", e.rel_path),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_copy_restores_and_starts() {
    let c = Cluster::new().unwrap();
    c.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    c.sql("create unlogged table scratch(i int); insert into scratch values (1)")
        .unwrap();
    let mut session = BackupSession::start(connect(&c).await, "round trip")
        .await
        .unwrap();
    // Concurrent writes while the files are copied.
    let writer = {
        let env = c.env();
        std::thread::spawn(move || {
            let st = std::process::Command::new(format!("{PG_BIN_DIR}/pgbench"))
                .envs(env)
                .args(["-n", "-T", "2", "-c", "2"])
                .output()
                .unwrap();
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
        })
    };
    let target = tempfile::tempdir().unwrap();
    let restored = target.path().join("restored");
    copy_included(c.pgdata(), &restored);
    writer.join().unwrap();
    let stop = session.stop().await.unwrap();
    let start = session.start_info().clone();
    for seg in WalSegmentName::range(start.lsn, stop.lsn, start.timeline, 16 << 20) {
        std::fs::copy(
            c.pgdata().join("pg_wal").join(seg.to_string()),
            restored.join("pg_wal").join(seg.to_string()),
        )
        .unwrap();
    }
    session.finish().await.unwrap();
    std::fs::write(restored.join("backup_label"), &stop.backup_label).unwrap();
    RecoveryConfig {
        // Everything needed is in pg_wal; a failing restore_command makes PostgreSQL use it.
        restore_command: Some("false".into()),
        target: RecoveryTarget::Immediate,
        action: Some(TargetAction::Promote),
        ..Default::default()
    }
    .write(&restored)
    .unwrap();
    // The state at the stop LSN, for comparison: no writes after the backup in this test
    // except emptying the unlogged table, whose contents a restore does not keep.
    c.sql("truncate scratch").unwrap();
    let original = c.pg_dump("postgres").unwrap();

    let r = Cluster::builder().start_existing(&restored).unwrap();
    // Recovery ends at consistency (the stop LSN) and promotes.
    r.wait_until_promoted(std::time::Duration::from_secs(10))
        .unwrap();
    let copy = r.pg_dump("postgres").unwrap();
    assert_eq!(first_difference(&original, &copy), None);
    // The unlogged table exists, empty (reset from its init fork).
    assert_eq!(r.sql("select count(*) from scratch").unwrap(), "0");
}
