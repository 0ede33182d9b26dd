//! Full disks (issue 18 item 5, RELIABILITY row 5), with the built binary on real, small
//! file systems (tmpfs mounted as root, unmounted even when a test panics):
//!
//! - a local repository that fills during `backup`, and during `dump`: a clean failure, exit
//!   code 1, naming the path and saying what to do; no temporary file left, no empty object,
//!   the failed run not listed, no lock left; the earlier backup still restores to its data,
//!   `repo check --read-data` passes; once the file system is larger, the rerun succeeds;
//! - a spool directory of asynchronous archiving that fills under WAL traffic: PostgreSQL is
//!   never told a segment is archived unless the repository holds it; the archiver's error
//!   says the spool is out of space; once space is freed, archiving catches up without a gap
//!   and `check` judges the recorded failure resolved;
//! - a restore target too small: refused before anything is written (exit 1, both figures);
//!   a target that fills during the restore: a clean failure, the directory left marked
//!   incomplete (no backup_label, no pg_control, no recovery.signal), the plain rerun refused
//!   (exit 2, naming --delta), and `--delta` after freeing space restores the exact data.

mod cli_support;
#[path = "cli_support/tmpfs.rs"]
mod tmpfs;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::Sandbox;
use pgkeep_testing::cluster::{first_difference, require_root};
use pgkeep_testing::Cluster;
use tmpfs::Tmpfs;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");
const MIB: u64 = 1 << 20;

/// Runs `pgkeep --repo REPO ARGS` like [`Sandbox::run`].
fn run_at(s: &Sandbox, repo: &Path, args: &[&str], envs: &[(&str, &str)]) -> cli_support::Run {
    let mut all = vec!["--repo", repo.to_str().unwrap()];
    all.extend_from_slice(args);
    s.run(&all, envs)
}

/// Every path under `root` (files and directories), recursively.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// What a failed write must not leave in a repository: temporary files, empty objects, locks.
fn assert_no_debris(repo: &Path) {
    for p in walk(repo) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.starts_with(".tmp-") && !name.contains(".pgkeep-"),
            "temporary file left: {}",
            p.display()
        );
        if p.is_file() {
            assert!(
                std::fs::metadata(&p).unwrap().len() > 0,
                "empty object under a final name: {}",
                p.display()
            );
        }
    }
    let locks: Vec<_> = std::fs::read_dir(repo.join("locks"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(locks.is_empty(), "locks left behind: {locks:?}");
}

/// The ids listed by `list --json`, with their kinds.
fn listed(s: &Sandbox, repo: &Path) -> Vec<(String, String)> {
    run_at(s, repo, &["--json", "list"], &[]).expect(0).json()["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["kind"].as_str().unwrap().to_string(),
                b["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Replaces table `r` in `db` with ~`mib` MiB of random (incompressible) bytes, rows of
/// ~1 KiB stored inline.
fn random_table(c: &Cluster, db: &str, mib: u64) {
    c.sql_db(
        db,
        &format!(
            "DROP TABLE IF EXISTS r; CREATE TABLE r (id int, b bytea); \
             INSERT INTO r SELECT g, (SELECT decode(string_agg(md5(random()::text || x || g), ''), 'hex') \
             FROM generate_series(1, 63) x) FROM generate_series(1, {}) g",
            mib * 1000
        ),
    )
    .unwrap();
}

/// A fingerprint of table `r`'s content.
fn fingerprint(c: &Cluster, db: &str) -> String {
    c.sql_db(
        db,
        "SELECT count(*) || ':' || md5(string_agg(md5(b), '' ORDER BY id)) FROM r",
    )
    .unwrap()
}

/// The failure every out-of-space write must give: exit 1, the path (below `fs`), the
/// system's reason, and what to do.
fn assert_clean_enospc(r: &cli_support::Run, fs: &Path, what: &str) {
    let err = r.stderr();
    eprintln!("{what}:\n{err}");
    assert_eq!(r.code(), 1, "{what}: exit code\n{err}");
    assert!(
        err.contains("No space left on device"),
        "{what}: the reason\n{err}"
    );
    assert!(
        err.contains(fs.to_str().unwrap()),
        "{what}: the path\n{err}"
    );
    assert!(
        err.contains("HINT: ") && err.contains("free space"),
        "{what}: what to do\n{err}"
    );
    assert!(!err.contains("panicked"), "{what}: a panic\n{err}");
}

#[test]
fn a_repository_that_fills_during_a_backup_fails_cleanly_and_the_next_backup_succeeds() {
    if !require_root("the repository is on a tmpfs mounted for the test") {
        return;
    }
    let c = Cluster::new().unwrap();
    c.sql("CREATE TABLE kept (i int); INSERT INTO kept SELECT generate_series(1, 5000)")
        .unwrap();
    let fs = Tmpfs::mount(256);
    let repo = fs.path().join("repo");
    let s = Sandbox::new();
    run_at(&s, &repo, &["repo", "init", "--no-encryption"], &[]).expect(0);
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let conninfo = c.conninfo();
    let backup = [
        "backup",
        "--pgdata",
        pgdata.as_str(),
        "--pg",
        conninfo.as_str(),
    ];
    run_at(&s, &repo, &backup, &[]).expect(0);
    let first = listed(&s, &repo);
    assert_eq!(first.len(), 1);
    let dumpall = c.pg_dumpall().unwrap();

    // ~60 MiB of new incompressible data into a repository with 24 MiB to spare.
    let size = fs.used().div_ceil(MIB) + 24;
    fs.resize(size);
    random_table(&c, "postgres", 60);
    let r = run_at(&s, &repo, &backup, &[]);
    assert_clean_enospc(&r, fs.path(), "backup into a full repository");
    assert!(fs.free() < 24 * MIB, "the file system did fill");
    assert_no_debris(&repo);
    assert_eq!(listed(&s, &repo), first, "the failed backup is not listed");
    run_at(&s, &repo, &["repo", "check", "--read-data"], &[]).expect(0);

    // The earlier backup restores to exactly its data.
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("first");
    run_at(
        &s,
        &repo,
        &[
            "restore",
            &first[0].1,
            "--target-dir",
            target.to_str().unwrap(),
        ],
        &[],
    )
    .expect(0);
    let restored = Cluster::builder().start_existing(&target).unwrap();
    assert_eq!(
        first_difference(&dumpall, &restored.pg_dumpall().unwrap()),
        None
    );
    drop(restored);

    // With room again, the next backup succeeds, restores, and the repository checks clean.
    fs.resize(512);
    run_at(&s, &repo, &backup, &[]).expect(0);
    let now = listed(&s, &repo);
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now[0], first[0]);
    assert_no_debris(&repo);
    run_at(&s, &repo, &["repo", "check", "--read-data"], &[]).expect(0);
    let second = work.path().join("second");
    run_at(
        &s,
        &repo,
        &[
            "restore",
            "latest",
            "--target-dir",
            second.to_str().unwrap(),
        ],
        &[],
    )
    .expect(0);
    let restored = Cluster::builder().start_existing(&second).unwrap();
    assert_eq!(
        fingerprint(&restored, "postgres"),
        fingerprint(&c, "postgres")
    );
}

/// Waits (bounded) until no session of `application_name` is connected to `c`.
fn wait_no_session(c: &Cluster, application_name: &str) {
    let t = Instant::now();
    loop {
        let n = c
            .sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application_name}'"
            ))
            .unwrap();
        if n == "0" {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{n} {application_name} session(s) still connected after the failure"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_repository_that_fills_during_a_dump_fails_cleanly_and_the_rerun_succeeds() {
    if !require_root("the repository is on a tmpfs mounted for the test") {
        return;
    }
    let c = Cluster::new().unwrap();
    c.sql("CREATE DATABASE shop").unwrap();
    c.sql_db(
        "shop",
        "CREATE TABLE orders (id int); INSERT INTO orders SELECT generate_series(1, 1000)",
    )
    .unwrap();
    let fs = Tmpfs::mount(64);
    let repo = fs.path().join("repo");
    let s = Sandbox::new();
    run_at(&s, &repo, &["repo", "init", "--no-encryption"], &[]).expect(0);
    let conninfo = c.conninfo();
    let pg = [("PGKEEP_PG", conninfo.as_str())];
    run_at(&s, &repo, &["dump", "--db", "shop"], &pg).expect(0);
    let first = listed(&s, &repo);
    assert_eq!(first.len(), 1);

    let size = fs.used().div_ceil(MIB) + 12;
    fs.resize(size);
    random_table(&c, "shop", 30);
    let r = run_at(&s, &repo, &["dump", "--db", "shop"], &pg);
    assert_clean_enospc(&r, fs.path(), "dump into a full repository");
    assert_no_debris(&repo);
    assert_eq!(listed(&s, &repo), first, "the failed dump is not listed");
    wait_no_session(&c, "pg_dump");
    run_at(&s, &repo, &["repo", "check", "--read-data"], &[]).expect(0);

    fs.resize(256);
    let d = run_at(&s, &repo, &["--json", "dump", "--db", "shop"], &pg)
        .expect(0)
        .json();
    let id = d["id"].as_str().unwrap().to_string();
    let now = listed(&s, &repo);
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(now[1].1, id);
    assert_no_debris(&repo);
    run_at(&s, &repo, &["repo", "check", "--read-data"], &[]).expect(0);
    // The rerun's dump holds the data.
    run_at(
        &s,
        &repo,
        &["restore-dump", &id, "--target-db", "shop_copy", "--create"],
        &pg,
    )
    .expect(0);
    assert_eq!(fingerprint(&c, "shop_copy"), fingerprint(&c, "shop"));
}

fn chown_postgres(p: &Path) {
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

/// `(last_archived_wal, failed_count, last_failed_wal)`.
fn archiver(c: &Cluster) -> (String, i64, String) {
    let row = c
        .sql("SELECT coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver")
        .unwrap();
    let v: Vec<&str> = row.split('|').collect();
    (v[0].to_string(), v[1].parse().unwrap(), v[2].to_string())
}

/// Every segment PostgreSQL counts as archived (`.done` in archive_status, and
/// last_archived_wal) is in the repository, with the bytes still in pg_wal when it is there.
fn assert_acknowledged_are_stored(s: &Sandbox, c: &Cluster, check_bytes: bool) -> usize {
    let status = c.pgdata().join("pg_wal/archive_status");
    let mut done: Vec<String> = std::fs::read_dir(&status)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".done")
                .map(str::to_string)
        })
        .filter(|n| n.len() == 24)
        .collect();
    let last = archiver(c).0;
    if !last.is_empty() && !done.contains(&last) {
        done.push(last);
    }
    for seg in &done {
        let stored = s.repo().join("wal/main").join(&seg[..16]).join(seg);
        assert!(
            stored.exists(),
            "{seg} acknowledged to PostgreSQL but not in the repository; log:\n{}",
            c.log_tail()
        );
        if check_bytes {
            let dest = s.path().join("got");
            s.run_repo(&["archive-get", seg, dest.to_str().unwrap()], &[])
                .expect(0);
            if let Ok(orig) = std::fs::read(c.pgdata().join("pg_wal").join(seg)) {
                assert!(std::fs::read(&dest).unwrap() == orig, "{seg} differs");
            }
        }
    }
    done.len()
}

fn wait_for(what: &str, c: &Cluster, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out ({limit:?}) waiting for {what}; log:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn switch(c: &Cluster, round: u32) -> String {
    c.sql(&format!(
        "INSERT INTO t SELECT generate_series(1, {round}000)"
    ))
    .unwrap();
    c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap()
}

#[test]
fn a_full_spool_never_acknowledges_an_unstored_segment_and_archiving_catches_up() {
    if !require_root("the spool is on a tmpfs mounted for the test") {
        return;
    }
    let s = Sandbox::shared();
    let fs = Tmpfs::mount(2);
    let spool = fs.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    chown_postgres(&spool);
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
    c.sql("CREATE TABLE t (i int)").unwrap();
    let first = switch(&c, 1);
    wait_for("the first segment", &c, Duration::from_secs(90), || {
        archiver(&c).0 >= first
    });
    assert!(
        spool.join("worker.lock").exists(),
        "archived asynchronously"
    );

    // The spool's file system full: WAL keeps coming, PostgreSQL keeps asking.
    let filler = fs.fill("filler");
    let before = archiver(&c).1;
    let mut switched = Vec::new();
    for round in 2..5 {
        switched.push(switch(&c, round));
        assert_acknowledged_are_stored(&s, &c, false);
    }
    let t = Instant::now();
    wait_for(
        "archive-push failing on the full spool",
        &c,
        Duration::from_secs(60),
        || {
            assert_acknowledged_are_stored(&s, &c, false);
            archiver(&c).1 >= before + 2
        },
    );
    eprintln!("failures seen after {:?}", t.elapsed());
    let (archived, _, failed_wal) = archiver(&c);
    assert!(
        archived < switched[0],
        "{} acknowledged while the spool was full",
        switched[0]
    );
    assert_eq!(failed_wal, switched[0]);
    assert!(c
        .pgdata()
        .join("pg_wal/archive_status")
        .join(format!("{}.ready", switched[0]))
        .exists());
    // The reason reaches the server log, where the operator looks.
    let log = std::fs::read_to_string(c.log_path()).unwrap();
    let reason = log
        .lines()
        .find(|l| l.contains("pgkeep: error:") && l.contains(spool.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no error naming the spool in the server log:\n{log}"));
    assert!(
        reason.contains("No space left on device"),
        "the reason is said: {reason}"
    );
    assert!(!log.contains("panicked"), "{log}");

    // Space freed: archiving catches up (a new segment wakes the archiver up instead of its
    // 60 s back-off), no more failures, no gap.
    std::fs::remove_file(&filler).unwrap();
    let last = switch(&c, 5);
    let t = Instant::now();
    wait_for(
        "archiving to catch up after space was freed",
        &c,
        Duration::from_secs(60),
        || archiver(&c).0 >= last,
    );
    eprintln!("caught up {:?} after space was freed", t.elapsed());
    let failures = archiver(&c).1;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(archiver(&c).1, failures, "failed_count stopped growing");
    let n = assert_acknowledged_are_stored(&s, &c, true);
    assert!(n >= 5, "{n} segments acknowledged");
    for seg in switched.iter().chain([&first, &last]) {
        assert!(
            s.repo()
                .join("wal/main")
                .join(&seg[..16])
                .join(seg)
                .exists(),
            "{seg} stored"
        );
    }
    let conninfo = c.conninfo();
    let r = s
        .run_repo(&["check"], &[("PGKEEP_PG", conninfo.as_str())])
        .expect(0);
    assert!(!r.stdout().contains("GAP"), "{}", r.stdout());
    // The failure is on record, and judged resolved now that archiving works again.
    assert!(
        r.stdout().contains("cannot write in the spool directory")
            && r.stdout().contains("archiving has succeeded since"),
        "{}",
        r.stdout()
    );
    s.run_repo(&["repo", "check", "--read-data"], &[]).expect(0);
}

#[test]
fn a_restore_target_too_small_is_refused_and_one_that_fills_midway_is_completed_by_delta() {
    if !require_root("the restore target is on a tmpfs mounted for the test") {
        return;
    }
    let src = Cluster::new().unwrap();
    src.pgbench(&["-i", "-s", "5", "-q"]).unwrap();
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let pgdata = src.pgdata().to_str().unwrap().to_string();
    s.run_repo(
        &["backup", "--pgdata", &pgdata, "--pg", &src.conninfo()],
        &[],
    )
    .expect(0);
    let dumpall = src.pg_dumpall().unwrap();

    // Too small: refused before anything is written, with both figures.
    let fs = Tmpfs::mount(16);
    let target = fs.path().join("data");
    let used = fs.used();
    let r = s
        .run_repo(
            &[
                "restore",
                "latest",
                "--target-dir",
                target.to_str().unwrap(),
            ],
            &[],
        )
        .expect(1);
    let err = r.stderr();
    assert!(
        err.contains("not enough space")
            && err.contains(target.to_str().unwrap())
            && err.contains("needs")
            && err.contains("free")
            && err.contains("HINT: "),
        "{err}"
    );
    assert!(!target.exists(), "nothing written");
    assert_eq!(fs.used(), used);

    // Room for the restore, but the space goes while it runs: the restore is stopped once it
    // has started writing, the file system filled, and the restore resumed.
    let plan = s
        .run_repo(
            &[
                "--json",
                "restore",
                "latest",
                "--target-dir",
                target.to_str().unwrap(),
                "--dry-run",
            ],
            &[],
        )
        .json();
    let needed = plan["plan"]["space"][0]["needed"]
        .as_u64()
        .unwrap_or_else(|| panic!("plan.space[0].needed in {plan}"));
    fs.resize(needed.div_ceil(MIB) + 32);
    let mut child = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
        .args(["--repo", s.repo().to_str().unwrap(), "restore", "latest"])
        .arg("--target-dir")
        .arg(&target)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let marker = target.join("pgkeep.restore-incomplete");
    let t = Instant::now();
    while !marker.exists() {
        assert!(child.try_wait().unwrap().is_none(), "restore ended early");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "restore did not start"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = child.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success())
    };
    signal("-STOP");
    let filler = fs.fill("filler");
    signal("-CONT");
    let out = child.wait_with_output().unwrap();
    let r = cli_support::Run(out);
    assert_clean_enospc(&r, &target, "restore into a file system that filled");
    assert!(marker.exists(), "marked incomplete");
    for f in ["backup_label", "global/pg_control", "recovery.signal"] {
        assert!(!target.join(f).exists(), "{f} written by a failed restore");
    }

    // The plain rerun is refused, saying what to do; --delta once space is freed completes it.
    let r = s
        .run_repo(
            &[
                "restore",
                "latest",
                "--target-dir",
                target.to_str().unwrap(),
            ],
            &[],
        )
        .expect(2);
    assert!(
        r.stderr().contains("incomplete restore") && r.stderr().contains("--delta"),
        "{}",
        r.stderr()
    );
    std::fs::remove_file(&filler).unwrap();
    s.run_repo(
        &[
            "restore",
            "latest",
            "--target-dir",
            target.to_str().unwrap(),
            "--delta",
        ],
        &[],
    )
    .expect(0);
    assert!(!marker.exists());
    let restored = Cluster::builder().start_existing(&target).unwrap();
    assert_eq!(
        first_difference(&dumpall, &restored.pg_dumpall().unwrap()),
        None
    );
}
