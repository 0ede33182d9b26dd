//! RELIABILITY row 1 for `pgkeep backup` itself: the built binary SIGKILLed after N storage
//! writes (the PGKEEP_TEST_KILL_AFTER_OPS hook of pgkeep-storage), for N across the whole
//! backup: the lock, pack uploads before and after the first index file, the final index, the
//! manifest.
//!
//! What a user relies on, after every kill: no manifest appears unless the manifest itself was
//! written (then the backup is whole); `pgkeep repo check` exits 0; the server is left clean
//! (the temporary replication slot and the backup end with the killed session: no
//! pg_backup_stop needed); the next backup succeeds, and once an index file was written
//! before the kill it uploads less than a backup of the same new data into a repository that
//! has none of it (the chunks uploaded and indexed are reused). At the end, the earlier backup
//! and the last one restore to exactly their data, and `repo check --read-data` is clean.

mod cli_support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli_support::{Run, Sandbox};
use pgkeep_repo::{InitOptions, Repository};
use pgkeep_storage::{LocalStorage, Storage, KILL_AFTER_OPS_ENV};
use pgkeep_testing::cluster::first_difference;
use pgkeep_testing::Cluster;

/// Small packs, so a backup of a few tens of MiB is many uploads; the writer writes an index
/// file every 32 packs (its default), so a kill past that point leaves indexed chunks.
const PACK_SIZE: u64 = 1 << 20;
/// Rows of ~1 KiB of random bytes (incompressible): ~100 MiB on disk, some 50 packs (two
/// 1 MiB relation pieces each), so the writer's index file after 32 packs comes well before
/// the end. 60,000 rows made 45 packs while FastCDC cut the pieces smaller, and only ~33 once
/// pieces were stored whole: the first index file then came with the last packs and no kill
/// fell between it and the manifest.
const ROWS: u32 = 85_000;

/// Replaces the table's content with new random bytes (a new relation file: TRUNCATE gives
/// it a new relfilenode), so each backup has ~100 MiB of data the repository has not seen.
fn refill(c: &Cluster, round: u32) {
    c.sql(&format!(
        "truncate r; insert into r select g, (select decode(string_agg(md5(random()::text || x || {round}), ''), 'hex') \
         from generate_series(1, 63 + 0 * g) x) from generate_series(1, {ROWS}) g"
    ))
    .unwrap();
}

/// Objects under `dir`: files, not counting the local backend's temporary files (`.tmp-…`,
/// which a kill in the middle of a write leaves and the storage never lists).
fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

fn manifests(s: &Sandbox) -> Vec<String> {
    let l = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    l["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until the server has no replication slot and no other client session: the killed
/// backup's connection is gone, taking its temporary slot and its backup with it.
fn wait_server_clean(c: &Cluster) {
    let t = Instant::now();
    loop {
        let slots = c.sql("select count(*) from pg_replication_slots").unwrap();
        let sessions = c
            .sql(
                "select count(*) from pg_stat_activity \
                 where backend_type = 'client backend' and pid <> pg_backend_pid()",
            )
            .unwrap();
        if slots == "0" && sessions == "0" {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "after the kill: {slots} replication slot(s), {sessions} other session(s) remain"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn backup_args(c: &Cluster) -> Vec<String> {
    vec![
        "backup".into(),
        "--pgdata".into(),
        c.pgdata().display().to_string(),
        "--pg".into(),
        c.conninfo(),
    ]
}

fn run_backup(s: &Sandbox, c: &Cluster, json: bool, envs: &[(&str, &str)]) -> Run {
    let mut args: Vec<String> = vec!["-q".into()];
    if json {
        args.push("--json".into());
    }
    args.extend(backup_args(c));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    s.run_repo(&a, envs)
}

fn stored_bytes(r: &Run) -> u64 {
    r.json()["totals"]["stored_bytes"].as_u64().unwrap()
}

#[test]
fn backup_killed_at_every_stage_leaves_a_usable_repository_and_a_clean_server() {
    // Each round writes ~100 MiB of WAL: keep pg_wal small on a shared disk.
    let src = Cluster::builder()
        .setting("max_wal_size", "64MB")
        .setting("min_wal_size", "32MB")
        .start()
        .unwrap();
    src.sql("create table r(id int, b bytea) with (autovacuum_enabled = off)")
        .unwrap();
    let s = Sandbox::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(s.repo()).unwrap());
        Repository::init(
            storage,
            InitOptions {
                pack_size: PACK_SIZE,
                ..InitOptions::default()
            },
        )
        .await
        .unwrap();
    });

    // The earlier backup that every kill must leave intact.
    refill(&src, 0);
    run_backup(&s, &src, false, &[]).expect(0);
    let dump0 = src.pg_dump("postgres").unwrap();
    let earlier = manifests(&s);
    assert_eq!(earlier.len(), 1);

    // What a backup of one round of new data stores when the repository has none of it.
    let cold_repo = Sandbox::new();
    cold_repo
        .run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);

    let mut cold: Option<u64> = None;
    let mut n: u64 = 1;
    let mut round = 0;
    let mut kills = 0;
    let mut reused_after_index = 0;
    let mut completed_at = None;
    let mut tried = std::collections::BTreeSet::new();
    let mut extra: Vec<u64> = Vec::new();
    loop {
        round += 1;
        refill(&src, round);
        tried.insert(n);
        let before = manifests(&s);
        let indexes_before = count_files(&s.repo().join("index"));
        let kill = n.to_string();
        let r = run_backup(&s, &src, false, &[(KILL_AFTER_OPS_ENV, kill.as_str())]);
        let killed = r.0.status.signal() == Some(9);
        if !killed {
            // More writes than N: the backup finished before the hook fired.
            r.expect(0);
            completed_at.get_or_insert(n);
        } else {
            kills += 1;
            wait_server_clean(&src);
            let after = manifests(&s);
            let index_written = count_files(&s.repo().join("index")) > indexes_before;
            if after.len() > before.len() {
                // Killed after the manifest (the commit point) was written: the backup is
                // whole; the repository check and the final restore prove it.
                assert_eq!(after.len(), before.len() + 1, "kill at {n}");
                assert!(index_written, "a manifest without its index (kill at {n})");
            }
            let check = s.run_repo(&["--json", "repo", "check"], &[]).expect(0);
            assert_eq!(
                check.json()["problems"].as_array().map(|a| a.len()),
                Some(0),
                "kill at {n}: {}",
                check.stdout()
            );

            // The next backup of the same state: succeeds; stores less than a cold one once
            // indexed chunks were left behind.
            let rerun = run_backup(&s, &src, true, &[]).expect(0);
            let stored = stored_bytes(&rerun);
            // Measured once: every round's new data is the same size.
            let cold = *cold.get_or_insert_with(|| {
                stored_bytes(&run_backup(&cold_repo, &src, true, &[]).expect(0))
            });
            eprintln!(
                "kill after {n} writes: index written {index_written}, rerun stored {stored} \
                 bytes, a backup of the same data into a repository without it {cold}"
            );
            if index_written && after.len() == before.len() {
                assert!(
                    stored * 2 < cold,
                    "kill at {n}: the rerun stored {stored} bytes, cold {cold}: chunks not reused"
                );
                reused_after_index += 1;
            }
        }
        // The next N: the first writes, a few pack uploads, then every third write from
        // around the first index file (after 32 packs) on, and the last ones before
        // completion always.
        if let Some(done) = completed_at {
            if extra.is_empty() {
                extra = (done.saturating_sub(3)..done)
                    .filter(|k| *k > 0 && !tried.contains(k))
                    .collect();
                extra.reverse();
            }
            match extra.pop() {
                Some(k) => n = k,
                None => break,
            }
        } else {
            n = match n {
                1 => 2,
                2..=30 => n + 11,
                _ => n + 3,
            };
        }
        assert!(round < 60, "the backup never completed under the hook");
    }
    eprintln!("{kills} kills; completed at {completed_at:?}");
    assert!(kills >= 7, "only {kills} kill points");
    assert!(
        reused_after_index >= 1,
        "no kill left an index behind: the test did not exercise reuse"
    );

    // Each killed run left its lock; they are stale (dead pids on this host), blocked nothing
    // above, and `repo unlock` removes them.
    assert!(count_files(&s.repo().join("locks")) >= 1);
    s.run_repo(&["repo", "unlock"], &[]).expect(0);
    assert_eq!(count_files(&s.repo().join("locks")), 0);

    // The earlier backup still restores to exactly its data, as does the last one; the data
    // of every backup reads back.
    s.run_repo(&["repo", "check", "--read-data"], &[]).expect(0);
    let dump_last = src.pg_dump("postgres").unwrap();
    let work = tempfile::tempdir().unwrap();
    for (id, dump) in [(earlier[0].as_str(), &dump0), ("latest", &dump_last)] {
        let target = work.path().join(id);
        s.run_repo(
            &[
                "-q",
                "restore",
                id,
                "--target-dir",
                target.to_str().unwrap(),
            ],
            &[],
        )
        .expect(0);
        let c = Cluster::builder().start_existing(&target).unwrap();
        assert_eq!(
            first_difference(dump, &c.pg_dump("postgres").unwrap()),
            None,
            "restore of {id}"
        );
    }
}
