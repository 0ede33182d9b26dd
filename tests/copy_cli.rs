//! `pgkeep copy --to REPO2` through the built binary, from a plain repository that a real
//! cluster archives into, to an encrypted second repository with its own pack size and
//! compression level:
//! - refusals: nothing selected, the source itself as target (exit 2), a missing or wrong
//!   target passphrase (exit 12);
//! - the copy of the newest backup and dump with the WAL, after which the second repository
//!   alone restores the cluster to the end of the archive and the dump to its rows, and passes
//!   `repo check --read-data`; a rerun reads and writes nothing;
//! - a later incremental copy reads from the source only what changed (the blob translation);
//! - the target's own expire removes a copy there and nothing in the source;
//! - a copy SIGKILLed after every storage write leaves a target that checks clean, and the
//!   rerun completes it;
//! - the target's passphrase appears in no output.

mod cli_support;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cli_support::{start_archiving, switch_and_wait, Sandbox};
use pgkeep_storage::KILL_AFTER_OPS_ENV;
use pgkeep_testing::Cluster;

const CANARY: &str = "second-repo-canary-passphrase";

/// A second, encrypted repository with a smaller pack size and another compression level.
fn init_second(s: &Sandbox, name: &str) -> (PathBuf, PathBuf) {
    let repo = s.path().join(name);
    let pass = s.path().join(format!("{name}.pass"));
    std::fs::write(&pass, format!("{CANARY}\n")).unwrap();
    let pass_s = pass.to_str().unwrap();
    s.run(
        &[
            "--repo",
            repo.to_str().unwrap(),
            "repo",
            "init",
            "--pack-size",
            "4MiB",
            "--compression-level",
            "9",
        ],
        &[("PGKEEP_PASSPHRASE_FILE", pass_s)],
    )
    .expect(0);
    (repo, pass)
}

/// `pgkeep --repo <source> copy ARGS` with the target's passphrase file.
fn copy(s: &Sandbox, pass: &Path, args: &[&str], extra: &[(&str, &str)]) -> cli_support::Run {
    let mut all = vec!["copy"];
    all.extend_from_slice(args);
    let mut env = vec![("PGKEEP_TO_PASSPHRASE_FILE", pass.to_str().unwrap())];
    env.extend_from_slice(extra);
    s.run_repo(&all, &env)
}

/// `pgkeep --repo <second> ARGS` with its passphrase.
fn on_second(s: &Sandbox, repo: &Path, pass: &Path, args: &[&str]) -> cli_support::Run {
    let mut all = vec!["--repo", repo.to_str().unwrap()];
    all.extend_from_slice(args);
    s.run(&all, &[("PGKEEP_PASSPHRASE_FILE", pass.to_str().unwrap())])
}

fn assert_no_canary(r: &cli_support::Run) {
    assert!(!r.stdout().contains(CANARY), "passphrase in stdout");
    assert!(!r.stderr().contains(CANARY), "passphrase in stderr");
}

fn chown_postgres(paths: &[&Path]) {
    if pgkeep_testing::cluster::running_as_root() {
        for p in paths {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(p)
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
}

#[test]
fn a_second_repository_made_by_copy_restores_the_cluster_and_the_dump_on_its_own() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let pg = c.conninfo();
    let pg_env = [("PGKEEP_PG", pg.as_str())];
    c.sql("CREATE DATABASE shop").unwrap();
    c.sql_db(
        "shop",
        "CREATE TABLE items AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 50000) g",
    )
    .unwrap();
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let b1 = s
        .run_repo(&["--json", "backup", "--pgdata", &pgdata], &pg_env)
        .expect(0)
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let d1 = s
        .run_repo(&["--json", "dump", "--db", "shop"], &pg_env)
        .expect(0)
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    c.sql_db(
        "shop",
        "INSERT INTO items SELECT g, md5(g::text) FROM generate_series(50001, 60000) g",
    )
    .unwrap();
    switch_and_wait(&c);
    let (second, pass) = init_second(&s, "second");
    let to = second.to_str().unwrap();

    // Refusals, each before anything is written.
    let r = copy(&s, &pass, &["--to", to], &[]).expect(2);
    assert!(
        r.stderr().contains("copy: nothing selected"),
        "{}",
        r.stderr()
    );
    let same = s.repo();
    let r = copy(&s, &pass, &["--to", same.to_str().unwrap(), "--all"], &[]).expect(2);
    assert!(
        r.stderr()
            .contains("the target is the source repository itself"),
        "{}",
        r.stderr()
    );
    let r = s.run_repo(&["copy", "--to", to, "--all"], &[]).expect(12);
    assert!(
        r.stderr().contains("PGKEEP_TO_PASSPHRASE_FILE"),
        "{}",
        r.stderr()
    );
    let wrong = s.path().join("wrong.pass");
    std::fs::write(&wrong, "not it\n").unwrap();
    copy(&s, &wrong, &["--to", to, "--all"], &[]).expect(12);
    let r = on_second(&s, &second, &pass, &["--json", "list"]).expect(0);
    assert_eq!(r.json()["backups"].as_array().unwrap().len(), 0);

    // The copy: the newest backup and dump, and the WAL.
    let r = copy(&s, &pass, &["--json", "--to", to, "--latest", "--wal"], &[]).expect(0);
    assert_no_canary(&r);
    let j = r.json();
    let ids: Vec<&str> = j["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b1.as_str(), d1.as_str()], "{j}");
    assert!(j["backups"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["copied"] == true));
    assert_eq!(j["backups"][1]["database"], "shop");
    assert!(j["wal"]["copied"].as_u64().unwrap() >= 2, "{j}");
    assert!(j["totals"]["blobs_new"].as_u64().unwrap() > 0, "{j}");

    // Again: the target has it all, nothing is read or written.
    let j = copy(&s, &pass, &["--json", "--to", to, "--latest", "--wal"], &[])
        .expect(0)
        .json();
    assert!(
        j["backups"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["copied"] == false),
        "{j}"
    );
    assert_eq!(j["totals"]["bytes_read"], 0, "{j}");
    assert_eq!(j["wal"]["copied"], 0, "{j}");

    on_second(&s, &second, &pass, &["repo", "check", "--read-data"]).expect(0);

    // The second repository alone: the physical backup replayed to the end of the copied
    // archive has all 60000 rows; the dump restores its 50000.
    chown_postgres(&[&second, &pass]);
    let restored = s.path().join("restored");
    on_second(
        &s,
        &second,
        &pass,
        &[
            "restore",
            "latest",
            "--target-dir",
            restored.to_str().unwrap(),
        ],
    )
    .expect(0);
    {
        let r = Cluster::builder()
            .start_timeout(Duration::from_secs(120))
            .start_existing(&restored)
            .unwrap();
        r.wait_until_promoted(Duration::from_secs(120)).unwrap();
        assert_eq!(
            r.sql_db("shop", "SELECT count(*) FROM items").unwrap(),
            "60000"
        );
    }
    let r = s.run(
        &[
            "--repo",
            to,
            "restore-dump",
            &d1,
            "--pg",
            &pg,
            "--target-db",
            "shop_copy",
            "--create",
        ],
        &[("PGKEEP_PASSPHRASE_FILE", pass.to_str().unwrap())],
    );
    r.expect(0);
    assert_eq!(
        c.sql_db("shop_copy", "SELECT count(*), sum(id) FROM items")
            .unwrap(),
        "50000|1250025000"
    );

    // An incremental copy: after 1% of the rows change, a new backup's copy reads from the
    // source only what the target lacks.
    c.sql_db("shop", "UPDATE items SET v = 'changed' WHERE id <= 600")
        .unwrap();
    let b2 = s
        .run_repo(&["--json", "backup", "--pgdata", &pgdata], &pg_env)
        .expect(0)
        .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let j = copy(&s, &pass, &["--json", "--to", to, &b2], &[])
        .expect(0)
        .json();
    let st = &j["backups"][0]["stats"];
    let (blobs, read) = (
        st["blobs"].as_u64().unwrap(),
        st["blobs_read"].as_u64().unwrap(),
    );
    // Exactly the blobs the target lacked are read (the changed pages and the backup's own
    // WAL), far fewer than the backup references.
    assert_eq!(st["blobs_new"].as_u64().unwrap(), read, "{j}");
    assert!(
        read > 0 && read * 3 < blobs,
        "read {read} of {blobs} blobs: {j}"
    );

    // The target's own retention: expire there leaves the source alone.
    on_second(
        &s,
        &second,
        &pass,
        &["expire", "--kind", "physical", "--keep-last", "1"],
    )
    .expect(0);
    let there = on_second(&s, &second, &pass, &["--json", "list"])
        .expect(0)
        .json();
    let there: Vec<&str> = there["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert!(
        !there.contains(&b1.as_str()) && there.contains(&b2.as_str()),
        "{there:?}"
    );
    let here = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert_eq!(here["backups"].as_array().unwrap().len(), 3, "{here}");
    // The source's run history has the copies, the refused ones failed, and no passphrase.
    let h = s
        .run_repo(&["--json", "history", "--kind", "copy"], &[])
        .expect(0);
    assert_no_canary(&h);
    let results: Vec<String> = h.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        results.iter().filter(|r| *r == "ok").count(),
        3,
        "{results:?}"
    );
    assert!(results.iter().any(|r| r == "failed"), "{results:?}");
    on_second(&s, &second, &pass, &["repo", "check", "--read-data"]).expect(0);
}

#[test]
fn a_copy_killed_after_every_storage_write_leaves_a_clean_target_and_the_rerun_completes_it() {
    let s = Sandbox::shared();
    let c = Cluster::builder().start().unwrap();
    let pg = c.conninfo();
    c.sql("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
        .unwrap();
    s.run_repo(&["dump", "--db", "postgres"], &[("PGKEEP_PG", pg.as_str())])
        .expect(0);
    let (second, pass) = init_second(&s, "killed");
    let to = second.to_str().unwrap();
    let mut kills = 0;
    let mut n = 1u64;
    loop {
        let k = n.to_string();
        let r = copy(
            &s,
            &pass,
            &["--to", to, "--all"],
            &[(KILL_AFTER_OPS_ENV, &k)],
        );
        if r.0.status.signal() != Some(9) {
            r.expect(0);
            break;
        }
        kills += 1;
        // What a kill left is consistent: no manifest without its blobs.
        on_second(&s, &second, &pass, &["repo", "check"]).expect(0);
        n += 1;
        assert!(n < 200, "the copy never completed");
    }
    assert!(
        kills >= 4,
        "only {kills} kill points: the test did not exercise the copy"
    );
    on_second(&s, &second, &pass, &["repo", "unlock"]).expect(0);
    on_second(&s, &second, &pass, &["repo", "check", "--read-data"]).expect(0);
    // The copied dump restores to the source's rows.
    s.run(
        &[
            "--repo",
            to,
            "restore-dump",
            "latest",
            "--pg",
            &pg,
            "--target-db",
            "copied",
            "--create",
        ],
        &[("PGKEEP_PASSPHRASE_FILE", pass.to_str().unwrap())],
    )
    .expect(0);
    assert_eq!(
        c.sql_db("copied", "SELECT count(*) FROM t").unwrap(),
        "100000"
    );
}

/// Files under `root` whose path contains `needle`.
fn files_named(root: &Path, needle: &str) -> usize {
    cli_support::listing(root)
        .keys()
        .filter(|p| p.to_string_lossy().contains(needle))
        .count()
}

#[test]
fn copy_to_writes_backups_dumps_and_wal_to_both_repositories_and_a_segment_waits_for_both() {
    copy_to_case(false);
}

#[test]
fn copy_to_with_the_async_pusher_acknowledges_a_segment_only_when_both_hold_it() {
    copy_to_case(true);
}

/// `cluster.copy_to`, with archive-push synchronous or through a spool (`options.spool_dir`).
fn copy_to_case(async_push: bool) {
    use std::os::unix::fs::PermissionsExt;
    let s = Sandbox::shared();
    let spool = s.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    chown_postgres(&[&spool]);
    let options = if async_push {
        format!("[options]\nspool_dir = \"{}\"\n\n", spool.display())
    } else {
        String::new()
    };
    let second = s.path().join("second");
    s.run(
        &[
            "--repo",
            second.to_str().unwrap(),
            "repo",
            "init",
            "--no-encryption",
        ],
        &[],
    )
    .expect(0);
    chown_postgres(&[&second]);
    let cfg = s.path().join("both.toml");
    std::fs::write(
        &cfg,
        format!(
            "{options}[[repository]]\nname = \"first\"\nurl = \"{}\"\n\n\
             [[repository]]\nname = \"second\"\nurl = \"{}\"\n\n\
             [[cluster]]\nname = \"main\"\nrepository = \"first\"\ncopy_to = [\"second\"]\n",
            s.repo().display(),
            second.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let c = Cluster::builder()
        .archive_command(&format!(
            "{} --config {cfg_s} archive-push %p",
            env!("CARGO_BIN_EXE_pgkeep")
        ))
        .start()
        .unwrap();
    c.sql("CREATE TABLE t AS SELECT generate_series(1, 10000) g")
        .unwrap();
    let conn = c.conninfo();
    let env = [("PGKEEP_PG", conn.as_str())];
    let with_cfg = |args: &[&str]| {
        let mut all = vec!["--config", cfg_s];
        all.extend_from_slice(args);
        s.run(&all, &env)
    };
    let b = with_cfg(&["--json", "backup"]).expect(0).json();
    let d = with_cfg(&["--json", "dump", "--db", "postgres"])
        .expect(0)
        .json();
    let ids = |repo: &Path| -> Vec<String> {
        let j = s
            .run(&["--repo", repo.to_str().unwrap(), "--json", "list"], &[])
            .expect(0)
            .json();
        j["backups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    };
    let want = vec![
        b["id"].as_str().unwrap().to_string(),
        d["id"].as_str().unwrap().to_string(),
    ];
    assert_eq!(ids(&s.repo()), want);
    assert_eq!(ids(&second), want, "the second repository has both");
    // The backup and dump ran as this user; the archiver runs as the server's.
    chown_postgres(&[&s.repo(), &second]);
    s.run(
        &[
            "--repo",
            second.to_str().unwrap(),
            "repo",
            "check",
            "--read-data",
        ],
        &[],
    )
    .expect(0);

    // WAL: a switched segment reaches both before PostgreSQL counts it archived.
    let seg = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    switch_wait_archived(&c, &seg);
    // The segment and its summary, in both.
    assert_eq!(files_named(&s.repo().join("wal"), &seg), 2);
    assert_eq!(
        files_named(&second.join("wal"), &seg),
        2,
        "the copy holds {seg}"
    );

    // The second repository unwritable: the segment is not acknowledged, the error says
    // which repository failed; once it is back, the segment is archived in both.
    std::fs::set_permissions(&second, std::fs::Permissions::from_mode(0o000)).unwrap();
    let failed_before: i64 = c
        .sql("SELECT failed_count FROM pg_stat_archiver")
        .unwrap()
        .parse()
        .unwrap();
    c.sql("INSERT INTO t SELECT generate_series(1, 1000)")
        .unwrap();
    let seg2 = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let failed: i64 = c
            .sql("SELECT failed_count FROM pg_stat_archiver")
            .unwrap()
            .parse()
            .unwrap();
        if failed > failed_before {
            break;
        }
        assert!(std::time::Instant::now() < until, "no archive failure");
        std::thread::sleep(Duration::from_millis(100));
    }
    let archived = c
        .sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        .unwrap();
    assert!(
        archived < seg2,
        "{seg2} was acknowledged without the second repository"
    );
    assert!(
        c.log_tail().contains("copy repository \"second\""),
        "{}",
        c.log_tail()
    );
    // PostgreSQL retried it; the same failure is recorded once in the history.
    std::thread::sleep(Duration::from_secs(3));
    let h = s
        .run_repo(&["--json", "history", "--kind", "archive-push"], &[])
        .expect(0)
        .json();
    let recs = h["records"].as_array().unwrap();
    if !async_push {
        assert_eq!(recs.len(), 1, "{h}");
    }
    assert!(
        recs.iter().any(|r| r["error"]
            .as_str()
            .unwrap_or("")
            .contains("copy repository \"second\"")),
        "{h}"
    );
    std::fs::set_permissions(&second, std::fs::Permissions::from_mode(0o700)).unwrap();
    let seg3 = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    switch_wait_archived(&c, &seg3);
    for name in [&seg2, &seg3] {
        assert_eq!(files_named(&second.join("wal"), name), 2, "{name}");
    }
}

/// Waits (60 s) until `seg` is archived, waking the archiver with switches.
fn switch_wait_archived(c: &Cluster, seg: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let archived = c
            .sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
            .unwrap();
        if archived.as_str() >= seg {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "{seg} not archived:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
