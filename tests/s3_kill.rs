//! SIGKILL loops on S3 (issue 18 item 3; RELIABILITY rows 1, 2 and 16): `dump`, `archive-push`
//! and `backup` of the built binary, with the repository on SeaweedFS, killed by the
//! PGKEEP_TEST_KILL_AFTER_OPS hook of pgkeep-storage after N completed storage writes, for
//! every N from 1 until the command completes under the hook.
//!
//! After every kill, what a user relies on: the process died by SIGKILL (so PostgreSQL or a
//! scheduler never sees success); `pgkeep repo check --read-data` exits 0; the killed dump or
//! backup is not listed unless its manifest (the commit point) was written, and once a kill
//! point lists it every later one does; the rerun succeeds. For `archive-push`, a killed push
//! is never acknowledged (no exit 0), its rerun succeeds, and `archive-get` returns the
//! segment's exact bytes — with the cluster's identity object among the writes (the first
//! push into a repository) and without (later pushes). The backup loop also waits until the
//! server is clean (no replication slot nor session left), and at the end the first backup
//! still restores to exactly its data.

#[path = "cli_support/backends.rs"]
mod backends;
mod cli_support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backends::{Repo, Store};
use cli_support::Run;
use pgkeep_storage::KILL_AFTER_OPS_ENV;
use pgkeep_testing::cluster::first_difference;
use pgkeep_testing::Cluster;

/// Every kill loop gives up past this many kill points: a command that never completes under
/// the hook is a failure, not a long run.
const MAX_KILLS: u64 = 60;

/// The smallest pack size `repo init` accepts, so a few MiB of new data is several uploads.
const PACK_SIZE: &str = "4MiB";

/// Replaces `r`'s rows in `db` with ~14 MiB of new random bytes (incompressible; a new
/// relation file), so the next run has several packs of data the repository has not seen.
fn refill(c: &Cluster, db: &str, round: u32) {
    c.sql_db(
        db,
        &format!(
            "TRUNCATE r; INSERT INTO r SELECT g, (SELECT decode(string_agg(md5(random()::text || x || {round}), ''), 'hex') \
             FROM generate_series(1, 64 + 0 * g) x) FROM generate_series(1, 14000) g"
        ),
    )
    .unwrap();
}

fn killed(r: &Run) -> bool {
    r.0.status.signal() == Some(9)
}

/// `ARGS` with the hook set to `n`.
fn run_killed(repo: &Repo, args: &[&str], envs: &[(&str, &str)], n: u64) -> Run {
    let n = n.to_string();
    let mut all = envs.to_vec();
    all.push((KILL_AFTER_OPS_ENV, n.as_str()));
    repo.run(args, &all)
}

/// `repo check --read-data` exits 0 and reports no problem.
fn check(repo: &Repo, what: &str) {
    let r = repo.run(&["--json", "repo", "check", "--read-data"], &[]);
    assert_eq!(
        r.code(),
        0,
        "{what}: repo check --read-data\n--- stdout\n{}\n--- stderr\n{}",
        r.stdout(),
        r.stderr()
    );
    assert_eq!(
        r.json()["problems"].as_array().map(|a| a.len()),
        Some(0),
        "{what}: {}",
        r.stdout()
    );
}

fn listed(repo: &Repo) -> Vec<String> {
    let l = repo.run(&["--json", "list"], &[]).expect(0).json();
    l["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Runs `args` killed after N writes for N = 1, 2, … until a run completes under the hook;
/// after each kill: the checks of the module documentation, then `rerun` (which must
/// succeed), then `after_kill(n)`. Returns the number of kills.
fn kill_loop(
    repo: &Repo,
    what: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    mut after_kill: impl FnMut(u64),
) -> u64 {
    let mut n = 1;
    let mut first_listed: Option<u64> = None;
    loop {
        let before = listed(repo);
        let r = run_killed(repo, args, envs, n);
        if !killed(&r) {
            // Fewer writes than N: completed under the hook.
            r.expect(0);
            break;
        }
        let after = listed(repo);
        if after.len() > before.len() {
            assert_eq!(after.len(), before.len() + 1, "{what} killed at {n}");
            first_listed.get_or_insert(n);
        } else {
            assert_eq!(after, before, "{what} killed at {n}");
            assert!(
                first_listed.is_none(),
                "{what} killed at {n} is not listed, but the one killed at {first_listed:?} was"
            );
        }
        check(repo, &format!("{what} killed after {n} writes"));
        after_kill(n);
        n += 1;
        assert!(n < MAX_KILLS, "{what} never completed under the hook");
    }
    let kills = n - 1;
    eprintln!(
        "{what}: killed after each of writes 1..={kills}; listed from kill {first_listed:?}; \
         completed under the hook with N = {n}"
    );
    kills
}

#[test]
fn dump_killed_after_every_storage_write_on_s3() {
    let started = Instant::now();
    let store = Store::s3();
    let repo = Repo::new(&store, false);
    repo.init_with(&["--pack-size", PACK_SIZE]);
    let c = Cluster::new().unwrap();
    c.sql("CREATE DATABASE shop").unwrap();
    c.sql_db(
        "shop",
        "CREATE TABLE r (id int PRIMARY KEY, b bytea) WITH (autovacuum_enabled = off)",
    )
    .unwrap();
    refill(&c, "shop", 0);
    let conninfo = c.conninfo();
    let pg = [("PGKEEP_PG", conninfo.as_str())];
    let args = ["-q", "dump", "--db", "shop"];
    let earlier = repo
        .run(&["--json", "dump", "--db", "shop"], &pg)
        .expect(0)
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let want = c.pg_dump("shop").unwrap();

    let mut round = 1;
    refill(&c, "shop", round);
    let kills = kill_loop(&repo, "dump", &args, &pg, |n| {
        let before = listed(&repo).len();
        repo.run(&args, &pg).expect(0);
        assert_eq!(listed(&repo).len(), before + 1, "rerun after kill {n}");
        round += 1;
        refill(&c, "shop", round);
    });
    assert!(kills >= 5, "only {kills} kill points");

    // The first dump still restores to exactly its database.
    repo.run(
        &[
            "-q",
            "restore-dump",
            &earlier,
            "--target-db",
            "shop_copy",
            "--create",
        ],
        &pg,
    )
    .expect(0);
    assert_eq!(
        first_difference(&want, &c.pg_dump("shop_copy").unwrap()),
        None,
        "restore-dump of the first dump"
    );
    eprintln!("dump loop: {:.1} s", started.elapsed().as_secs_f64());
}

/// `count` closed WAL segments of a running cluster, copied out of pg_wal as they close.
fn segments(c: &Cluster, dir: &Path, count: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    c.sql("CREATE TABLE w (id int, note text)").unwrap();
    (0..count)
        .map(|i| {
            c.sql(&format!(
                "INSERT INTO w SELECT g, md5(g::text || '{i}') FROM generate_series(1, 2000) g"
            ))
            .unwrap();
            let name = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
            let to = dir.join(&name);
            std::fs::copy(c.pgdata().join("pg_wal").join(&name), &to).unwrap();
            to
        })
        .collect()
}

/// `archive-get` of the segment at `path` returns its exact bytes.
fn assert_fetched_identical(repo: &Repo, path: &Path, what: &str) {
    let name = path.file_name().unwrap().to_str().unwrap();
    let dest = repo.path().join("fetched");
    let _ = std::fs::remove_file(&dest);
    repo.run(&["archive-get", name, dest.to_str().unwrap()], &[])
        .expect(0);
    assert!(
        std::fs::read(&dest).unwrap() == std::fs::read(path).unwrap(),
        "{what}: archive-get {name} returned other bytes"
    );
}

/// One push killed after `n` writes, then the checks and the rerun. Returns false when the
/// push completed under the hook.
fn push_killed(repo: &Repo, seg: &Path, n: u64, what: &str) -> bool {
    let p = seg.to_str().unwrap();
    let r = run_killed(repo, &["archive-push", p], &[], n);
    if !killed(&r) {
        r.expect(0);
        return false;
    }
    assert!(!r.0.status.success(), "{what}: a killed push acknowledged");
    check(repo, &format!("{what} killed after {n} writes"));
    // PostgreSQL retries the segment: the rerun stores it (or finds it stored).
    repo.run(&["archive-push", p], &[]).expect(0);
    assert_fetched_identical(repo, seg, what);
    true
}

#[test]
fn archive_push_killed_after_every_storage_write_on_s3() {
    let started = Instant::now();
    let store = Store::s3();
    let c = Cluster::builder()
        .setting("wal_keep_size", "512MB")
        .start()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let segs = segments(&c, &work.path().join("segs"), 8);

    // The first push into a repository: the cluster's identity is among the writes. A fresh
    // repository for each N.
    let mut first_kills = 0;
    for n in 1..MAX_KILLS {
        let repo = Repo::new(&store, false);
        repo.init();
        if !push_killed(&repo, &segs[0], n, "first push") {
            break;
        }
        first_kills = n;
    }
    assert!(
        first_kills >= 3,
        "first push: only {first_kills} kill points"
    );

    // Later pushes into one repository that knows the cluster: a new segment for each N.
    let repo = Repo::new(&store, false);
    repo.init();
    repo.run(&["archive-push", segs[0].to_str().unwrap()], &[])
        .expect(0);
    let mut later_kills = 0;
    for (i, seg) in segs[1..].iter().enumerate() {
        let n = i as u64 + 1;
        if !push_killed(&repo, seg, n, "later push") {
            break;
        }
        later_kills = n;
    }
    assert!(
        later_kills >= 2 && (later_kills as usize) < segs.len() - 1,
        "later pushes: {later_kills} kill points (out of segments before completing?)"
    );
    // A retried push of stored content writes nothing: completes with the hook at one write.
    let r = run_killed(&repo, &["archive-push", segs[1].to_str().unwrap()], &[], 1).expect(0);
    assert!(
        r.stderr()
            .contains("already archived with identical content"),
        "{}",
        r.stderr()
    );
    eprintln!(
        "archive-push: first push killed at 1..={first_kills}, later pushes at 1..={later_kills}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Waits until the server has no replication slot and no other client session: the killed
/// backup's connection is gone, with its temporary slot and its backup.
fn wait_server_clean(c: &Cluster, n: u64) {
    let t = Instant::now();
    loop {
        let slots = c.sql("SELECT count(*) FROM pg_replication_slots").unwrap();
        let sessions = c
            .sql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
            .unwrap();
        if slots == "0" && sessions == "0" {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "after the kill at {n}: {slots} replication slot(s), {sessions} other session(s) remain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn backup_killed_after_every_storage_write_on_s3() {
    let started = Instant::now();
    let store = Store::s3();
    let repo = Repo::new(&store, false);
    repo.init_with(&["--pack-size", PACK_SIZE]);
    // Each round writes ~14 MiB of WAL: keep pg_wal small.
    let c = Cluster::builder()
        .setting("max_wal_size", "64MB")
        .setting("min_wal_size", "32MB")
        .start()
        .unwrap();
    c.sql("CREATE TABLE r (id int PRIMARY KEY, b bytea) WITH (autovacuum_enabled = off)")
        .unwrap();
    refill(&c, "postgres", 0);
    let conninfo = c.conninfo();
    let pg = [("PGKEEP_PG", conninfo.as_str())];
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let args = ["-q", "backup", "--pgdata", pgdata.as_str()];
    let earlier = repo
        .run(&["--json", "backup", "--pgdata", &pgdata], &pg)
        .expect(0)
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let want = c.pg_dump("postgres").unwrap();

    let mut round = 1;
    refill(&c, "postgres", round);
    let kills = kill_loop(&repo, "backup", &args, &pg, |n| {
        wait_server_clean(&c, n);
        let before = listed(&repo).len();
        repo.run(&args, &pg).expect(0);
        assert_eq!(listed(&repo).len(), before + 1, "rerun after kill {n}");
        round += 1;
        refill(&c, "postgres", round);
    });
    assert!(kills >= 6, "only {kills} kill points");

    // The first backup still restores to exactly its data.
    let target = repo.path().join("restored");
    repo.run(
        &[
            "-q",
            "restore",
            &earlier,
            "--target-dir",
            target.to_str().unwrap(),
        ],
        &[],
    )
    .expect(0);
    let r = Cluster::builder().start_existing(&target).unwrap();
    assert_eq!(
        first_difference(&want, &r.pg_dump("postgres").unwrap()),
        None,
        "restore of the first backup"
    );
    eprintln!("backup loop: {:.1} s", started.elapsed().as_secs_f64());
}
