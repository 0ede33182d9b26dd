//! Asynchronous archiving failing the right way, with the real binary:
//!
//! - the spool directory set in the configuration file (`options.spool_dir`) makes a real
//!   cluster's `archive-push` asynchronous; while the repository cannot be written, the
//!   switched segment is never acknowledged to PostgreSQL (it stays `.ready`, is retried,
//!   and is not in the repository); once writable again it is archived;
//! - a WAL conflict (exit 14) or a segment of another cluster (exit 15) met by the background
//!   pusher is archive-push's own exit code, so PostgreSQL sees the failure and the operator
//!   the reason.

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cli_support::Sandbox;
use pgkeep_testing::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

fn sh(args: &[&str], p: &Path) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "{args:?} {}", p.display());
}

fn archiver(c: &Cluster) -> (String, i64, String) {
    let row = c
        .sql("SELECT coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver")
        .unwrap();
    let v: Vec<&str> = row.split('|').collect();
    (v[0].to_string(), v[1].parse().unwrap(), v[2].to_string())
}

fn wait_for(what: &str, c: &Cluster, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_unwritable_repository_never_acknowledges_a_segment_in_async_mode_from_the_config_file() {
    // The repository is made unwritable for the server user, which root is not.
    if !pgkeep_testing::cluster::require_root(
        "the repository is made unwritable for the server user only",
    ) {
        return;
    }
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let spool = s.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    sh(&["chown", "-R", "postgres:postgres"], &spool);
    sh(&["chown", "-R", "postgres:postgres"], &s.repo());
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let cfg = s.path().join("async.toml");
    std::fs::write(
        &cfg,
        format!("[options]\nspool_dir = \"{}\"\n", spool.display()),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = Cluster::builder()
        .archive_command(&format!(
            "{BIN} --config {} --repo {} archive-push %p",
            cfg.display(),
            s.repo().display()
        ))
        .start()
        .unwrap();
    let stored = |seg: &str| {
        s.repo()
            .join("wal/main")
            .join(&seg[..16])
            .join(seg)
            .exists()
    };

    // Writable: archived through the spool (the background pusher's lock is there).
    c.sql("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
        .unwrap();
    let first = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    wait_for("the first segment", &c, || archiver(&c).0 >= first);
    assert!(stored(&first));
    assert!(
        spool.join("worker.lock").exists(),
        "not archived asynchronously"
    );

    // Unwritable for the server user (still readable): the push fails, PostgreSQL retries,
    // and the segment is neither acknowledged nor stored.
    sh(&["chown", "-R", "root:root"], &s.repo());
    sh(&["chmod", "-R", "u=rwX,go=rX"], &s.repo());
    c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        .unwrap();
    let second = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    wait_for("a failed archive attempt", &c, || {
        let (_, failed, last_failed) = archiver(&c);
        failed >= 2 && last_failed == second
    });
    let (archived, _, _) = archiver(&c);
    assert!(
        archived < second,
        "{second} acknowledged while the repository was read-only"
    );
    assert!(!stored(&second));
    assert!(c
        .pgdata()
        .join("pg_wal/archive_status")
        .join(format!("{second}.ready"))
        .exists());

    // Writable again: PostgreSQL's retry archives it (a new segment wakes the archiver up
    // instead of its 60 s back-off).
    sh(&["chown", "-R", "postgres:postgres"], &s.repo());
    c.sql("INSERT INTO t SELECT generate_series(1, 10)")
        .unwrap();
    c.sql("SELECT pg_switch_wal()").unwrap();
    wait_for("the retried segment", &c, || archiver(&c).0 >= second);
    assert!(stored(&second));
    let dest = s.path().join("got");
    s.run_repo(&["archive-get", &second, dest.to_str().unwrap()], &[])
        .expect(0);
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 << 20);
}

/// A pg_wal-like directory holding `file` (copied) and its `.ready` marker.
fn ready_dir(root: &Path, src: &Path, modify: bool) -> PathBuf {
    let wal = root.join("pg_wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    let name = src.file_name().unwrap().to_str().unwrap();
    let mut data = std::fs::read(src).unwrap();
    if modify {
        data[50_000] ^= 0xFF;
    }
    let dst = wal.join(name);
    std::fs::write(&dst, data).unwrap();
    std::fs::write(
        wal.join("archive_status").join(format!("{name}.ready")),
        b"",
    )
    .unwrap();
    dst
}

#[test]
fn conflicts_and_foreign_segments_met_by_the_background_pusher_are_archive_push_exit_codes() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    // A real segment, archived synchronously.
    let mut a = Cluster::new().unwrap();
    a.sql("CREATE TABLE t (i int); INSERT INTO t SELECT generate_series(1, 1000)")
        .unwrap();
    let seg = a.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    // Copied at once: without archiving, the next checkpoint may recycle it.
    let src = s.path().join(&seg);
    std::fs::copy(a.pgdata().join("pg_wal").join(&seg), &src).unwrap();
    a.stop().unwrap();
    s.run_repo(&["archive-push", src.to_str().unwrap()], &[])
        .expect(0);

    // The same name with other content, pushed asynchronously: 14 from the pusher.
    let w1 = s.path().join("w1");
    let modified = ready_dir(&w1, &src, true);
    let spool1 = s.path().join("spool1");
    let r = s
        .run_repo(
            &[
                "archive-push",
                "--spool-dir",
                spool1.to_str().unwrap(),
                modified.to_str().unwrap(),
            ],
            &[],
        )
        .expect(14);
    assert!(r.stderr().contains("different content"), "{}", r.stderr());
    assert!(r.stderr().contains(&seg), "{}", r.stderr());

    // A segment of another initdb under this cluster's name: 15 from the pusher.
    let mut b = Cluster::new().unwrap();
    let other = b.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let w2 = s.path().join("w2");
    let foreign = ready_dir(&w2, &b.pgdata().join("pg_wal").join(&other), false);
    b.stop().unwrap();
    let spool2 = s.path().join("spool2");
    let r = s
        .run_repo(
            &[
                "archive-push",
                "--spool-dir",
                spool2.to_str().unwrap(),
                foreign.to_str().unwrap(),
            ],
            &[],
        )
        .expect(15);
    assert!(r.stderr().contains("system identifier"), "{}", r.stderr());
    // Neither left an acknowledgement behind.
    for sp in [&spool1, &spool2] {
        let oks: Vec<_> = std::fs::read_dir(sp.join("out/main"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ok"))
            .collect();
        assert!(oks.is_empty(), "{oks:?}");
    }
}
