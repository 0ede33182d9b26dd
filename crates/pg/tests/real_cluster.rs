//! pg_control, page checksums, data directory rules, client connections and the dump runners
//! against real PostgreSQL 15 clusters.

use pgkeep_pg::checksum::{absolute_block, pg_checksum_page, verify_page, PageCheck, BLCKSZ};
use pgkeep_pg::client::{ConnParams, PgClient};
use pgkeep_pg::datadir::{self, EntryKind, ExcludeReason};
use pgkeep_pg::{dump, ControlFile, DbState, Lsn, PgError};
use pgkeep_testing::cluster::PG_BIN_DIR;
use pgkeep_testing::Cluster;
use std::collections::HashMap;
use std::process::Command;

fn controldata(c: &Cluster) -> HashMap<String, String> {
    let out = Command::new(format!("{PG_BIN_DIR}/pg_controldata"))
        .arg(c.pgdata())
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn check_against_controldata(c: &Cluster) -> ControlFile {
    let cf = ControlFile::read(c.pgdata()).unwrap();
    let cd = controldata(c);
    let f = |k: &str| {
        cd.get(k)
            .unwrap_or_else(|| panic!("no {k} in pg_controldata"))
            .clone()
    };
    assert_eq!(
        cf.system_identifier.to_string(),
        f("Database system identifier")
    );
    assert_eq!(
        cf.pg_control_version.to_string(),
        f("pg_control version number")
    );
    assert_eq!(cf.catalog_version.to_string(), f("Catalog version number"));
    assert_eq!(cf.state.as_controldata_str(), f("Database cluster state"));
    assert_eq!(cf.checkpoint.to_string(), f("Latest checkpoint location"));
    assert_eq!(
        cf.checkpoint_redo.to_string(),
        f("Latest checkpoint's REDO location")
    );
    assert_eq!(
        cf.checkpoint_timeline.to_string(),
        f("Latest checkpoint's TimeLineID")
    );
    assert_eq!(
        cf.checkpoint_prev_timeline.to_string(),
        f("Latest checkpoint's PrevTimeLineID")
    );
    assert_eq!(
        cf.checkpoint_next_oid.to_string(),
        f("Latest checkpoint's NextOID")
    );
    let next_xid = f("Latest checkpoint's NextXID"); // "epoch:xid"
    let (epoch, xid) = next_xid.split_once(':').unwrap();
    assert_eq!(cf.checkpoint_next_xid >> 32, epoch.parse::<u64>().unwrap());
    assert_eq!(
        cf.checkpoint_next_xid & 0xffff_ffff,
        xid.parse::<u64>().unwrap()
    );
    assert_eq!(
        if cf.checkpoint_full_page_writes {
            "on"
        } else {
            "off"
        },
        f("Latest checkpoint's full_page_writes")
    );
    assert_eq!(
        cf.min_recovery_point.to_string(),
        f("Minimum recovery ending location")
    );
    assert_eq!(
        cf.backup_start_point.to_string(),
        f("Backup start location")
    );
    assert_eq!(cf.backup_end_point.to_string(), f("Backup end location"));
    assert_eq!(cf.max_connections.to_string(), f("max_connections setting"));
    assert_eq!(cf.block_size.to_string(), f("Database block size"));
    assert_eq!(
        cf.relseg_size.to_string(),
        f("Blocks per segment of large relation")
    );
    assert_eq!(cf.wal_block_size.to_string(), f("WAL block size"));
    assert_eq!(cf.wal_segment_size.to_string(), f("Bytes per WAL segment"));
    assert_eq!(
        cf.data_checksum_version.to_string(),
        f("Data page checksum version")
    );
    assert_eq!(
        ["minimal", "replica", "logical"][cf.wal_level as usize],
        f("wal_level setting")
    );
    cf
}

#[test]
fn control_file_matches_pg_controldata() {
    let mut c = Cluster::builder()
        .setting("max_connections", "37")
        .start()
        .unwrap();
    let running = check_against_controldata(&c);
    assert_eq!(running.state, DbState::InProduction);
    assert_eq!(running.max_connections, 37);
    assert!(running.data_checksums());
    c.stop().unwrap();
    let stopped = check_against_controldata(&c);
    assert_eq!(stopped.state, DbState::ShutDown);
    assert!(stopped.checkpoint > running.checkpoint);

    let off = Cluster::builder().data_checksums(false).start().unwrap();
    let cf = check_against_controldata(&off);
    assert!(!cf.data_checksums());
    assert_ne!(cf.system_identifier, running.system_identifier);

    // A flipped byte is caught by the CRC.
    let mut bytes = std::fs::read(c.pgdata().join("global/pg_control")).unwrap();
    bytes[20] ^= 0x40;
    let e = ControlFile::parse(&bytes, std::path::Path::new("pg_control")).unwrap_err();
    assert!(matches!(e, PgError::ControlCrc { .. }), "{e}");
}

/// Check every page of every relation file of a stopped cluster.
fn verify_all_pages(pgdata: &std::path::Path) -> (usize, usize, Vec<String>) {
    let mut valid = 0;
    let mut new = 0;
    let mut bad = Vec::new();
    for e in datadir::walk(pgdata).unwrap().entries {
        let Some(rel) = e.relation_file() else {
            continue;
        };
        let data = std::fs::read(pgdata.join(&e.rel_path)).unwrap();
        assert_eq!(data.len() % BLCKSZ, 0, "{}", e.rel_path);
        for (i, page) in data.chunks(BLCKSZ).enumerate() {
            match verify_page(page, absolute_block(rel.segno, i as u32), Lsn(u64::MAX)) {
                PageCheck::Valid => valid += 1,
                PageCheck::New => new += 1,
                other => bad.push(format!("{} block {i}: {other:?}", e.rel_path)),
            }
        }
    }
    (valid, new, bad)
}

#[test]
fn page_checksums_of_a_real_cluster() {
    let mut c = Cluster::new().unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    let file = c
        .sql("select pg_relation_filepath('pgbench_accounts')")
        .unwrap();
    c.stop().unwrap();
    let (valid, _new, bad) = verify_all_pages(c.pgdata());
    assert!(bad.is_empty(), "{bad:?}");
    assert!(valid > 1000, "only {valid} pages checked");

    let path = c.pgdata().join(&file);
    let data = std::fs::read(&path).unwrap();
    let mut page = data[BLCKSZ * 3..BLCKSZ * 4].to_vec();
    assert_eq!(verify_page(&page, 3, Lsn(u64::MAX)), PageCheck::Valid);
    // Same page at another block number: the block number is part of the checksum.
    assert!(matches!(
        verify_page(&page, 4, Lsn(u64::MAX)),
        PageCheck::Mismatch { .. }
    ));
    page[4000] ^= 0x01;
    match verify_page(&page, 3, Lsn(u64::MAX)) {
        PageCheck::Mismatch { stored, computed } => {
            assert_ne!(stored, computed);
            assert_eq!(computed, pg_checksum_page(&page, 3));
        }
        other => panic!("flipped byte not detected: {other:?}"),
    }
    // A page modified after the backup start is skipped, not reported.
    assert!(matches!(
        verify_page(&page, 3, Lsn(1)),
        PageCheck::Skipped { .. }
    ));

    // PostgreSQL agrees: corrupt the page on disk and read it.
    let mut corrupted = data.clone();
    corrupted[BLCKSZ * 3 + 4000] ^= 0x01;
    std::fs::write(&path, &corrupted).unwrap();
    c.start().unwrap();
    // sum() reads the heap (count(*) could be answered by an index-only scan).
    let e = c
        .sql("select sum(abalance) from pgbench_accounts")
        .unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datadir_rules_on_a_real_cluster() {
    let c = Cluster::new().unwrap();
    let ts_dir = c.scratch_dir("ts1").unwrap();
    c.sql(&format!(
        "create tablespace ts1 location '{}'",
        ts_dir.display()
    ))
    .unwrap();
    c.sql("create table in_ts(i int) tablespace ts1; insert into in_ts values (1)")
        .unwrap();
    c.sql("create unlogged table unl(i int primary key); insert into unl values (1)")
        .unwrap();
    c.sql("create table plain(i int); insert into plain values (1); checkpoint")
        .unwrap();
    // A temporary table lives only as long as its session: keep one open.
    let session = PgClient::connect(&ConnParams::resolve(Some(&c.conninfo())).unwrap())
        .await
        .unwrap();
    session
        .inner()
        .batch_execute("create temp table tmp1(i int); insert into tmp1 values (1)")
        .await
        .unwrap();
    let temp_path = c.sql("select pg_relation_filepath(oid) from pg_class where relname = 'tmp1'");
    let temp_path = match temp_path {
        Ok(p) if !p.is_empty() => p,
        // pg_relation_filepath of another session's temp table is NULL on some versions; find
        // the file by name instead.
        _ => String::new(),
    };

    let l = datadir::walk(c.pgdata()).unwrap();
    let entry = |p: &str| l.entries.iter().find(|e| e.rel_path == p);
    let reason = |p: &str| {
        l.excluded
            .iter()
            .find(|e| e.rel_path == p)
            .map(|e| e.reason)
    };

    let plain = c.sql("select pg_relation_filepath('plain')").unwrap();
    let e = entry(&plain).expect("plain table file");
    assert!(e.is_relation && e.kind == EntryKind::File && e.size == 8192 && e.mode == 0o600);

    let unl = c.sql("select pg_relation_filepath('unl')").unwrap();
    assert_eq!(reason(&unl), Some(ExcludeReason::UnloggedFork));
    assert!(entry(&format!("{unl}_init")).unwrap().is_relation);
    let unl_idx = c.sql("select pg_relation_filepath('unl_pkey')").unwrap();
    assert_eq!(reason(&unl_idx), Some(ExcludeReason::UnloggedFork));
    assert!(entry(&format!("{unl_idx}_init")).is_some());

    let temps: Vec<_> = l
        .excluded
        .iter()
        .filter(|e| e.reason == ExcludeReason::TempRelation)
        .collect();
    assert!(!temps.is_empty(), "temp table file not seen");
    if !temp_path.is_empty() {
        assert_eq!(reason(&temp_path), Some(ExcludeReason::TempRelation));
    }

    let ts_oid = c
        .sql("select oid from pg_tablespace where spcname = 'ts1'")
        .unwrap();
    let link = entry(&format!("pg_tblspc/{ts_oid}")).unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    assert_eq!(link.link_target.as_deref(), Some(ts_dir.as_path()));
    let in_ts = c.sql("select pg_relation_filepath('in_ts')").unwrap();
    assert!(
        in_ts.starts_with(&format!("pg_tblspc/{ts_oid}/PG_15_")),
        "{in_ts}"
    );
    let e = entry(&in_ts).expect("tablespace relation file");
    assert!(e.is_relation);
    assert_eq!(e.tablespace, Some(ts_oid.parse().unwrap()));

    assert_eq!(reason("postmaster.pid"), Some(ExcludeReason::ServerFile));
    assert_eq!(reason("postmaster.opts"), Some(ExcludeReason::ServerFile));
    assert!(entry("pg_wal").unwrap().kind == EntryKind::Dir);
    assert!(entry("pg_wal/archive_status").is_some());
    assert!(l
        .entries
        .iter()
        .all(|e| !e.rel_path.starts_with("pg_wal/0")));
    assert!(l
        .excluded
        .iter()
        .any(|e| e.rel_path.starts_with("pg_wal/0")));
    assert!(entry("global/pg_control").is_some_and(|e| !e.is_relation));
    assert!(entry("PG_VERSION").is_some());
    drop(session);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_from_environment_and_pgpass() {
    let c = Cluster::new().unwrap();
    c.sql("alter user postgres password 'pw1'; create database shop")
        .unwrap();
    // Require passwords on TCP for this test; the socket stays trust.
    let hba = c.pgdata().join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).unwrap();
    text = text.replace(
        "host    all             all             127.0.0.1/32            trust",
        "host    all             all             127.0.0.1/32            scram-sha-256",
    );
    std::fs::write(&hba, text).unwrap();
    c.sql("select pg_reload_conf()").unwrap();

    let params = ConnParams::resolve_with(
        Some(&format!(
            "host=127.0.0.1 port={} user=postgres dbname=shop",
            c.port()
        )),
        &|_| None,
    )
    .unwrap();
    let e = PgClient::connect(&params).await.unwrap_err();
    assert!(matches!(e, PgError::Connect { .. }), "{e}");
    assert!(
        e.to_string().contains("127.0.0.1") && e.to_string().contains("HINT"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let pgpass = dir.path().join("pgpass");
    std::fs::write(&pgpass, format!("127.0.0.1:{}:*:postgres:pw1\n", c.port())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = c.port().to_string();
    let pgpass_s = pgpass.display().to_string();
    let env = move |k: &str| match k {
        "PGHOST" => Some("127.0.0.1".to_string()),
        "PGPORT" => Some(port.clone()),
        "PGUSER" => Some("postgres".to_string()),
        "PGDATABASE" => Some("shop".to_string()),
        "PGPASSFILE" => Some(pgpass_s.clone()),
        _ => None,
    };
    let params = ConnParams::resolve_with(None, &env).unwrap();
    let client = PgClient::connect(&params).await.unwrap();
    assert_eq!(
        client
            .query_text("db", "select current_database()::text")
            .await
            .unwrap()
            .as_deref(),
        Some("shop")
    );
    assert_eq!(client.server_version_num().await.unwrap() / 10000, 15);
    assert!(!client.is_in_recovery().await.unwrap());
    assert!(client.data_checksums().await.unwrap());
    let e = client
        .query_text("bad", "select * from nope")
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("nope") && !e.to_string().contains("pw1"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_and_restore_runners() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::new().unwrap();
    c.sql("create database src; create database dst; create role reader")
        .unwrap();
    c.sql_db(
        "src",
        "create table t(v text); insert into t select 'row ' || g from generate_series(1,1000) g",
    )
    .unwrap();
    let params = ConnParams::resolve(Some(&c.conninfo())).unwrap();
    let major: u32 = c
        .sql("show server_version_num")
        .unwrap()
        .parse::<u32>()
        .unwrap()
        / 10000;
    let tools = pgkeep_pg::tools::ClientTools::find(&pgkeep_pg::tools::ToolNeed {
        programs: &["pg_dump", "pg_dumpall", "pg_restore"],
        min_major: major,
        preferred_major: major,
        purpose: "the test server",
    })
    .unwrap();

    let mut d = dump::pg_dump(&tools, &params, "src", &[]).unwrap();
    let mut out = d.take_stdout().unwrap();
    let mut archive = Vec::new();
    out.read_to_end(&mut archive).await.unwrap();
    d.wait().await.unwrap();
    assert!(archive.starts_with(b"PGDMP"));

    let mut r = dump::pg_restore(&tools, &params, "dst", &[]).unwrap();
    let mut input = r.take_stdin().unwrap();
    input.write_all(&archive).await.unwrap();
    drop(input);
    r.wait().await.unwrap();
    assert_eq!(c.pg_dump("src").unwrap(), c.pg_dump("dst").unwrap());

    let mut g = dump::pg_dumpall_globals(&tools, &params).unwrap();
    let mut globals = String::new();
    g.take_stdout()
        .unwrap()
        .read_to_string(&mut globals)
        .await
        .unwrap();
    g.wait().await.unwrap();
    assert!(globals.contains("CREATE ROLE reader"), "{globals}");

    // Failures carry the tool's stderr.
    let mut bad = dump::pg_dump(&tools, &params, "no_such_db", &[]).unwrap();
    let mut sink = Vec::new();
    bad.take_stdout()
        .unwrap()
        .read_to_end(&mut sink)
        .await
        .unwrap();
    let e = bad.wait().await.unwrap_err();
    assert!(e.to_string().contains("no_such_db"), "{e}");
}
