//! WAL archiving end to end with the real binary: a PostgreSQL 15 cluster whose
//! `archive_command` is `pgkeep archive-push %p` (run by the server as `postgres`), then
//! `pgkeep check`, `archive-get`, the refusals of `archive-push` (exit codes 0 with a warning,
//! 14, 15) and `verify` finding a segment deleted from the middle of the archive (exit 13).

mod cli_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cli_support::{listing, Sandbox};
use pgkeep_testing::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

/// `archive_command` calling the binary with the sandbox's config and repository; also
/// keeps a `cp` copy in `<cluster dir>/cp` to compare with what archive-get returns.
fn archive_command(s: &Sandbox) -> String {
    format!(
        "cp %p ../cp/%f && {BIN} --config {} --repo {} archive-push %p",
        s.path().join("empty.toml").display(),
        s.repo().display()
    )
}

fn start_archiving(s: &Sandbox) -> Cluster {
    let mut c = Cluster::builder()
        .archive_command(&archive_command(s))
        .init()
        .unwrap();
    let cp = c.dir().join("cp");
    std::fs::create_dir(&cp).unwrap();
    if pgkeep_testing::cluster::running_as_root() {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&cp)
            .status()
            .unwrap();
    }
    c.start().unwrap();
    c
}

/// Writes, switches WAL `n` times, and waits until PostgreSQL has archived the last one
/// (pg_stat_archiver), failing with the server log if it reports a failure.
fn switch_and_wait(c: &Cluster, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        c.sql(&format!(
            "CREATE TABLE IF NOT EXISTS t (i int); INSERT INTO t SELECT generate_series(1, {})",
            1000 * (i + 1)
        ))
        .unwrap();
        names.push(c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap());
    }
    let last = names.last().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = c
            .sql("SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver")
            .unwrap();
        let (archived, failed) = row.split_once('|').unwrap();
        assert_eq!(
            failed,
            "0",
            "archive_command failed; log:\n{}",
            c.log_tail()
        );
        if archived >= last.as_str() {
            return names;
        }
        assert!(
            Instant::now() < deadline,
            "{last} not archived; log:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pg_env(c: &Cluster) -> String {
    c.conninfo()
}

#[test]
fn a_cluster_archives_through_pgkeep_check_get_refusals_and_verify() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let conninfo = pg_env(&c);
    let pg = [("PGKEEP_PG", conninfo.as_str())];

    // check: switches WAL and sees the segment arrive.
    let r = s.run_repo(&["check"], &pg).expect(0);
    assert!(
        r.stdout().contains("reached the repository"),
        "{}",
        r.stdout()
    );
    let j = s.run_repo(&["--json", "check"], &pg).expect(0).json();
    assert_eq!(j["arrived"], true);
    assert!(j["last_archived_segment"].is_string(), "{j}");

    let names = switch_and_wait(&c, 3);
    let cp = c.dir().join("cp");

    // archive-get: the very bytes PostgreSQL archived, silently.
    let dest_dir = tempfile::tempdir().unwrap();
    for n in &names {
        let dest = dest_dir.path().join("RECOVERYXLOG");
        let r = s
            .run_repo(&["archive-get", n, dest.to_str().unwrap()], &[])
            .expect(0);
        assert_eq!(r.stdout(), "");
        assert!(
            std::fs::read(&dest).unwrap() == std::fs::read(cp.join(n)).unwrap(),
            "{n} differs"
        );
    }
    // A missing file: exit 1 and one line, as restore_command must behave.
    let r = s
        .run_repo(
            &[
                "archive-get",
                "0000000100000000000000EE",
                dest_dir.path().join("x").to_str().unwrap(),
            ],
            &[],
        )
        .expect(1);
    assert_eq!(r.stderr().lines().count(), 1, "{}", r.stderr());
    assert!(
        r.stderr().contains("0000000100000000000000EE"),
        "{}",
        r.stderr()
    );
    assert!(!dest_dir.path().join("x").exists());

    // The same segment again (a retry after a crash): exit 0, a warning, nothing written.
    let seg = &names[0];
    let before = listing(&s.repo());
    let r = s
        .run_repo(&["archive-push", cp.join(seg).to_str().unwrap()], &[])
        .expect(0);
    assert!(r.stderr().contains("already archived"), "{}", r.stderr());
    // Different content under that name: exit 14 naming it; the stored copy untouched.
    let scratch = tempfile::tempdir().unwrap();
    let mut data = std::fs::read(cp.join(seg)).unwrap();
    data[20_000] ^= 0xFF;
    let modified = scratch.path().join(seg);
    std::fs::write(&modified, &data).unwrap();
    let r = s
        .run_repo(&["archive-push", modified.to_str().unwrap()], &[])
        .expect(14);
    assert!(r.stderr().contains(seg.as_str()), "{}", r.stderr());
    // A segment of another initdb: exit 15, nothing written.
    let mut other = Cluster::new().unwrap();
    let other_seg = other
        .sql("SELECT pg_walfile_name(pg_switch_wal())")
        .unwrap();
    let foreign = scratch.path().join("foreign").join(&other_seg);
    std::fs::create_dir(foreign.parent().unwrap()).unwrap();
    std::fs::copy(other.pgdata().join("pg_wal").join(&other_seg), &foreign).unwrap();
    other.stop().unwrap();
    let r = s
        .run_repo(&["archive-push", foreign.to_str().unwrap()], &[])
        .expect(15);
    assert!(r.stderr().contains("system identifier"), "{}", r.stderr());
    // Nothing but the run history changed: each refusal is recorded there (issue 15), the
    // archive itself is untouched.
    let outside_history = |l: std::collections::BTreeMap<std::path::PathBuf, _>| {
        l.into_iter()
            .filter(|(p, _)| !p.starts_with("history"))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert!(
        outside_history(listing(&s.repo())) == outside_history(before),
        "a refused push wrote something"
    );
    let h = s
        .run_repo(&["--json", "history", "--kind", "archive-push"], &[])
        .expect(0)
        .json();
    let codes: Vec<i64> = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["exit_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, [14, 15], "{h}");

    // verify: clean; then a backup, more WAL, and a segment removed after the backup.
    s.run_repo(&["verify"], &[]).expect(0);
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let b = s
        .run_repo(&["--json", "backup", "--pgdata", &pgdata], &pg)
        .expect(0)
        .json();
    let id = b["id"].as_str().unwrap().to_string();
    let after = switch_and_wait(&c, 4);
    let r = s.run_repo(&["verify"], &[]).expect(0);
    assert!(r.stdout().contains(&id), "{}", r.stdout());
    let victim = &after[1];
    let victim_path: PathBuf = s.repo().join("wal/main").join(&victim[..16]).join(victim);
    std::fs::remove_file(&victim_path).unwrap();
    let r = s.run_repo(&["verify"], &[]).expect(13);
    assert!(
        r.stdout()
            .contains(&format!("GAP on timeline 1: {victim} .. {victim}")),
        "{}",
        r.stdout()
    );
    assert!(r.stdout().contains(&id), "{}", r.stdout());
    assert!(
        r.stderr().contains("break point-in-time recovery"),
        "{}",
        r.stderr()
    );
    let j = s.run_repo(&["--json", "verify"], &[]).expect(13).json();
    assert_eq!(j["gaps"][0]["breaks"][0], id.as_str());

    // check sees the same gap (RELIABILITY 15): the range, the backup whose window it cuts,
    // exit 13, although the switched segment still arrives.
    let r = s.run_repo(&["check"], &pg).expect(13);
    assert!(
        r.stdout()
            .contains(&format!("GAP on timeline 1: {victim} .. {victim}")),
        "{}",
        r.stdout()
    );
    assert!(
        r.stdout().contains("reached the repository"),
        "{}",
        r.stdout()
    );
    assert!(
        r.stderr()
            .contains("gaps that break point-in-time recovery")
            && r.stderr()
                .contains(&format!("{victim}..{victim} (breaks {id})")),
        "{}",
        r.stderr()
    );
    let j = s.run_repo(&["--json", "check"], &pg).expect(13).json();
    assert_eq!(j["gaps"][0]["first"], victim.as_str());
    assert_eq!(j["arrived"], true);
}

#[test]
fn check_fails_when_wal_does_not_reach_the_repository() {
    let s = Sandbox::shared();
    let c = Cluster::builder()
        .archive_command("/bin/true")
        .start()
        .unwrap();
    let conninfo = c.conninfo();
    let r = s
        .run_repo(
            &["check", "--archive-timeout", "2"],
            &[("PGKEEP_PG", conninfo.as_str())],
        )
        .expect(1);
    assert!(
        r.stderr().contains("did not reach the repository"),
        "{}",
        r.stderr()
    );
    assert!(
        r.stdout().contains("does not call `pgkeep archive-push`"),
        "{}",
        r.stdout()
    );

    // Archiving off: a clear failure before any switch.
    let off = Cluster::new().unwrap();
    let conninfo = off.conninfo();
    let r = s
        .run_repo(&["check"], &[("PGKEEP_PG", conninfo.as_str())])
        .expect(1);
    assert!(r.stderr().contains("archive_mode = off"), "{}", r.stderr());
}

#[test]
fn async_mode_pushes_in_the_background_and_acknowledges_only_stored_segments() {
    let s = Sandbox::shared();
    let spool = s.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    if pgkeep_testing::cluster::running_as_root() {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&spool)
            .status()
            .unwrap();
    }
    let command = format!(
        "{BIN} --config {} --repo {} archive-push --spool-dir {} %p",
        s.path().join("empty.toml").display(),
        s.repo().display(),
        spool.display()
    );
    let c = Cluster::builder()
        .archive_command(&command)
        .start()
        .unwrap();
    let names = switch_and_wait(&c, 6);
    // Every segment PostgreSQL counts as archived is in the repository, and reads back.
    let dest = tempfile::tempdir().unwrap();
    for n in &names {
        let p = s.repo().join("wal/main").join(&n[..16]).join(n);
        assert!(p.exists(), "{n} acknowledged but not stored");
        s.run_repo(
            &["archive-get", n, dest.path().join("x").to_str().unwrap()],
            &[],
        )
        .expect(0);
    }
    // The background pusher did the pushing (its lock and log are in the spool), and no
    // error verdict is left.
    assert!(spool.join("worker.lock").exists());
    let out = spool.join("out/main");
    let errors: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".error"))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    s.run_repo(&["verify"], &[]).expect(0);

    // archive-get with a spool directory: the first segment is fetched directly, the next
    // ones by the prefetcher in the background, then served from the spool.
    let gspool = tempfile::tempdir().unwrap();
    let gs = gspool.path().to_str().unwrap();
    let get = |n: &str| {
        let d = dest.path().join("RECOVERYXLOG");
        s.run_repo(
            &["archive-get", "--spool-dir", gs, n, d.to_str().unwrap()],
            &[],
        )
        .expect(0);
        std::fs::read(d).unwrap()
    };
    let direct = |n: &str| {
        let d = dest.path().join("direct");
        s.run_repo(&["archive-get", n, d.to_str().unwrap()], &[])
            .expect(0);
        std::fs::read(d).unwrap()
    };
    assert!(get(&names[0]) == direct(&names[0]));
    let spooled = gspool.path().join("in/main").join(&names[1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !spooled.exists() {
        assert!(Instant::now() < deadline, "nothing prefetched");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(get(&names[1]) == direct(&names[1]));
    assert!(!spooled.exists(), "a served segment leaves the spool");
    s.run_repo(
        &[
            "archive-get",
            "--spool-dir",
            gs,
            "0000000100000000000000EE",
            dest.path().join("y").to_str().unwrap(),
        ],
        &[],
    )
    .expect(1);
}

/// Rows in `items` of a restored data directory, started as a throwaway server.
fn restored_count(dir: &std::path::Path) -> String {
    let c = Cluster::builder()
        .start_timeout(Duration::from_secs(120))
        .start_existing(dir)
        .unwrap();
    c.wait_until_promoted(Duration::from_secs(120)).unwrap();
    c.sql("SELECT count(*) FROM items").unwrap()
}

#[test]
fn point_in_time_restore_to_name_lsn_time_and_xid_refuses_unreachable_targets() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let conninfo = c.conninfo();
    let pg = [("PGKEEP_PG", conninfo.as_str())];
    c.sql("CREATE TABLE items (id int)").unwrap();
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let b = s
        .run_repo(&["--json", "backup", "--pgdata", &pgdata], &pg)
        .expect(0)
        .json();
    let id = b["id"].as_str().unwrap().to_string();
    let xid = c
        .sql("BEGIN; INSERT INTO items SELECT generate_series(1, 100); SELECT txid_current(); COMMIT;")
        .unwrap();
    let time = c.sql("SELECT clock_timestamp()").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    c.sql("SELECT pg_create_restore_point('before_delete')")
        .unwrap();
    let lsn = c.sql("SELECT pg_current_wal_insert_lsn()").unwrap();
    c.sql("INSERT INTO items SELECT generate_series(101, 150)")
        .unwrap();
    c.sql("DELETE FROM items WHERE id <= 10").unwrap();
    switch_and_wait(&c, 1);

    let d1 = s.path().join("pitr-name");
    s.run_repo(
        &[
            "restore",
            "latest",
            "--target-dir",
            d1.to_str().unwrap(),
            "--target-name",
            "before_delete",
            "--target-action",
            "promote",
        ],
        &[],
    )
    .expect(0);
    assert!(d1.join("recovery.signal").exists());
    assert_eq!(restored_count(&d1), "100");

    let d2 = s.path().join("pitr-lsn");
    s.run_repo(
        &[
            "restore",
            &id,
            "--target-dir",
            d2.to_str().unwrap(),
            "--target-lsn",
            &lsn,
            "--target-action",
            "promote",
        ],
        &[],
    )
    .expect(0);
    assert_eq!(restored_count(&d2), "100");

    // The time just after the first 100 rows committed (PostgreSQL's timestamptz text), and
    // that transaction's id.
    for (flag, value, dir) in [
        ("--target-time", time.as_str(), "pitr-time"),
        ("--target-xid", xid.as_str(), "pitr-xid"),
    ] {
        let d = s.path().join(dir);
        s.run_repo(
            &[
                "restore",
                "latest",
                "--target-dir",
                d.to_str().unwrap(),
                flag,
                value,
                "--target-action",
                "promote",
            ],
            &[],
        )
        .expect(0);
        assert_eq!(restored_count(&d), "100", "{flag} {value}");
    }

    // The restored cluster, promoted onto timeline 2, archives into the same repository under
    // the same name: its history file and segments join the archive, nothing conflicts, and
    // verify sees both timelines without a gap.
    let d4 = s.path().join("pitr-tl2");
    s.run_repo(
        &[
            "restore",
            "latest",
            "--target-dir",
            d4.to_str().unwrap(),
            "--target-name",
            "before_delete",
            "--target-action",
            "promote",
        ],
        &[],
    )
    .expect(0);
    let mut c2 = Cluster::builder()
        .archive_command(&archive_command(&s))
        .adopt_existing(&d4)
        .unwrap();
    // archive_command copies to `../cp`, next to the data directory.
    let cp2 = d4.parent().unwrap().join("cp");
    std::fs::create_dir(&cp2).unwrap();
    if pgkeep_testing::cluster::running_as_root() {
        Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&cp2)
            .status()
            .unwrap();
    }
    c2.start().unwrap();
    // Regression: writing as soon as the server accepted connections failed with "read-only
    // transaction" when the promotion had not happened yet.
    c2.wait_until_promoted(Duration::from_secs(120)).unwrap();
    assert_eq!(c2.sql("SELECT count(*) FROM items").unwrap(), "100");
    let tl2 = switch_and_wait(&c2, 2);
    assert!(tl2.iter().all(|n| n.starts_with("00000002")), "{tl2:?}");
    assert!(s
        .repo()
        .join("wal/main/0000000200000000/00000002.history")
        .exists());
    let v = s.run_repo(&["--json", "verify"], &[]).expect(0).json();
    assert_eq!(v["gaps"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["timelines"].as_array().unwrap().len(), 2, "{v}");
    drop(c2);

    // Past the archive, and before the only backup: exit 16 with the window, nothing written.
    let d3 = s.path().join("pitr-refused");
    let r = s
        .run_repo(
            &[
                "restore",
                "latest",
                "--target-dir",
                d3.to_str().unwrap(),
                "--target-lsn",
                "FF/0",
            ],
            &[],
        )
        .expect(16);
    assert!(
        r.stderr().contains("reachable from this backup"),
        "{}",
        r.stderr()
    );
    let r = s
        .run_repo(
            &[
                "restore",
                "latest",
                "--target-dir",
                d3.to_str().unwrap(),
                "--target-time",
                "2000-01-01 00:00:00+00",
            ],
            &[],
        )
        .expect(16);
    assert!(r.stderr().contains(&id), "{}", r.stderr());
    assert!(!d3.exists());
}
