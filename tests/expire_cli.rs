//! `pgkeep expire`, `pin`/`unpin` and `repo prune` through the built binary, on a real
//! cluster that archives its WAL into the repository:
//! - the dry run decides and changes nothing; no rule at all, or rules that would remove every
//!   backup, are refused with exit 2;
//! - labels, pins and `--keep-last` keep exactly the backups they name, the rest goes with
//!   the WAL only it needed, and garbage collection gives the space back;
//! - afterwards `repo check --read-data` and `verify` pass, every kept backup restores to its
//!   own row count, and a point in time between two kept backups is still reachable.

mod cli_support;

use std::time::Duration;

use cli_support::{start_archiving, switch_and_wait, Sandbox};
use pgkeep_testing::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

/// Restores `id` (to `target`, given as flags) into a new directory, starts it and counts.
fn restored_count(s: &Sandbox, id: &str, target: &[&str], dir: &str) -> String {
    let d = s.path().join(dir);
    let mut args = vec!["restore", id, "--target-dir", d.to_str().unwrap()];
    args.extend_from_slice(target);
    args.extend_from_slice(&["--target-action", "promote"]);
    s.run_repo(&args, &[]).expect(0);
    let c = Cluster::builder()
        .start_timeout(Duration::from_secs(120))
        .start_existing(&d)
        .unwrap();
    c.wait_until_promoted(Duration::from_secs(120)).unwrap();
    c.sql("SELECT count(*) FROM items").unwrap()
}

fn ids_of(list: &serde_json::Value, kind: &str) -> Vec<String> {
    list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["kind"] == kind)
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

fn archived_segments(s: &Sandbox) -> Vec<String> {
    let mut out = Vec::new();
    let root = s.repo().join("wal/main");
    for dir in std::fs::read_dir(&root).unwrap().flatten() {
        if !dir.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            // Segments and backup history files: what expire removes.
            if name.len() == 24 || name.ends_with(".backup") {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn expire_keeps_labelled_pinned_and_last_backups_and_everything_kept_still_restores() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let pg = [("PGKEEP_PG", c.conninfo())];
    let pg: Vec<(&str, &str)> = pg.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    c.sql("CREATE TABLE items (id int)").unwrap();

    // Four backups of a growing table (ids are to the second), a restore point between the
    // third and the fourth, and two dumps.
    let mut counts = Vec::new();
    let mut between = String::new();
    for (i, label) in ["nightly", "before-upgrade", "nightly", "nightly"]
        .iter()
        .enumerate()
    {
        c.sql(&format!(
            "INSERT INTO items SELECT generate_series(1, {})",
            100 * (i + 1)
        ))
        .unwrap();
        switch_and_wait(&c);
        s.run_repo(&["backup", "--pgdata", &pgdata, "--label", label], &pg)
            .expect(0);
        counts.push(c.sql("SELECT count(*) FROM items").unwrap());
        if i == 2 {
            c.sql("INSERT INTO items SELECT generate_series(1, 7)")
                .unwrap();
            c.sql("SELECT pg_create_restore_point('between')").unwrap();
            between = c.sql("SELECT count(*) FROM items").unwrap();
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(between, "607");
    for _ in 0..2 {
        s.run_repo(&["dump", "--db", "postgres"], &pg).expect(0);
        std::thread::sleep(Duration::from_millis(1100));
    }
    switch_and_wait(&c);
    let list = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    let physical = ids_of(&list, "physical");
    let dumps = ids_of(&list, "dump");
    assert_eq!((physical.len(), dumps.len()), (4, 2));
    let segments_before = archived_segments(&s);

    // No rule: refused, and so is a dry run of rules that would remove every backup.
    let r = s.run_repo(&["expire"], &[]).expect(2);
    assert!(r.stderr().contains("no retention rule"), "{}", r.stderr());
    let r = s
        .run_repo(
            &[
                "expire",
                "--kind",
                "physical",
                "--keep-label",
                "no-such",
                "--dry-run",
            ],
            &[],
        )
        .expect(2);
    assert!(
        r.stderr()
            .contains("would remove every one of the 4 physical backups"),
        "{}",
        r.stderr()
    );
    assert!(r.stderr().contains("--allow-remove-all"), "{}", r.stderr());

    // A dry run reports each backup's fate and the rule that keeps it, and changes nothing.
    let dry = s
        .run_repo(&["--json", "expire", "--keep-last", "1", "--dry-run"], &[])
        .expect(0)
        .json();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["removed"].as_array().unwrap().len(), 3 + 1);
    let first = &dry["groups"][0];
    assert_eq!(first["kind"], "physical");
    assert_eq!(first["decisions"][0]["reasons"][0], "last");
    assert_eq!(s.run_repo(&["--json", "list"], &[]).expect(0).json(), list);
    assert_eq!(archived_segments(&s), segments_before);

    // The third backup is pinned; the second has the kept label; the fourth is the last.
    s.run_repo(&["pin", &physical[2]], &[]).expect(0);
    let r = s
        .run_repo(
            &[
                "--json",
                "expire",
                "--kind",
                "physical",
                "--keep-last",
                "1",
                "--keep-label",
                "before-upgrade",
                "--grace",
                "0",
                "--max-unused",
                "0",
            ],
            &[],
        )
        .expect(0)
        .json();
    assert_eq!(r["removed"], serde_json::json!([physical[0]]));
    let reasons: Vec<&serde_json::Value> = r["groups"][0]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["reasons"])
        .collect();
    assert_eq!(
        reasons,
        [
            &serde_json::json!(["last"]),
            &serde_json::json!(["pinned"]),
            &serde_json::json!(["label before-upgrade"]),
            &serde_json::json!([]),
        ]
    );
    // The WAL before the oldest kept backup is gone, the rest is still there.
    let removed_wal = r["wal"]["files_removed"].as_u64().unwrap();
    assert!(removed_wal >= 1, "{r}");
    let segments_after = archived_segments(&s);
    assert_eq!(
        segments_after.len() as u64 + removed_wal,
        segments_before.len() as u64
    );
    let keep_from = r["wal"]["keep_from"].as_str().unwrap();
    assert!(segments_after.iter().all(|n| n[8..24] >= keep_from[8..]));
    assert!(
        r["prune"]["bytes_after"].as_u64() < r["prune"]["bytes_before"].as_u64(),
        "{r}"
    );

    // Dumps: only the newest of the database stays.
    let r = s
        .run_repo(
            &["--json", "expire", "--kind", "dump", "--keep-last", "1"],
            &[],
        )
        .expect(0)
        .json();
    assert_eq!(r["removed"], serde_json::json!([dumps[0]]));
    assert_eq!(r["groups"][0]["database"], "postgres");

    let list = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert_eq!(ids_of(&list, "physical"), physical[1..].to_vec());
    assert_eq!(ids_of(&list, "dump"), dumps[1..].to_vec());
    s.run_repo(&["repo", "check", "--read-data"], &[]).expect(0);
    s.run_repo(&["verify"], &[]).expect(0);
    s.run_repo(&["repo", "prune", "--max-unused", "0"], &[])
        .expect(0);
    s.run_repo(&["repo", "check", "--read-data"], &[]).expect(0);

    // Every kept backup restores to its own data; a point between two kept backups is
    // reachable through the kept WAL.
    for (i, id) in physical.iter().enumerate().skip(1) {
        let n = restored_count(&s, id, &["--target-immediate"], &format!("r{i}"));
        assert_eq!(n, counts[i], "backup {id}");
    }
    let n = restored_count(&s, &physical[1], &["--target-name", "between"], "pitr");
    assert_eq!(n, between);

    // Unpinned, the third backup is no longer protected from a rule that would take it.
    s.run_repo(&["unpin", &physical[2]], &[]).expect(0);
    let r = s
        .run_repo(
            &[
                "--json",
                "expire",
                "--kind",
                "physical",
                "--keep-last",
                "1",
                "--dry-run",
            ],
            &[],
        )
        .expect(0)
        .json();
    assert_eq!(r["removed"].as_array().unwrap().len(), 2);
}

/// Copies a directory tree (the repository before expire, restored before each kill).
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let _ = std::fs::remove_dir_all(to);
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn expire_killed_after_every_storage_write_leaves_every_kept_dump_whole_and_the_rerun_finishes() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let c = Cluster::builder().start().unwrap();
    let pg = c.conninfo();
    let env = [("PGKEEP_PG", pg.as_str())];
    let mut ids = Vec::new();
    for round in 0..4 {
        // Each dump differs from the one before by new rows, so old packs hold data that
        // only the expired dumps reference and some packs are partly used.
        c.sql(&format!(
            "CREATE TABLE IF NOT EXISTS t (id int, v text); \
             INSERT INTO t SELECT g, md5(g::text || '{round}') FROM generate_series(1, 40000) g"
        ))
        .unwrap();
        let j = s
            .run_repo(&["--json", "dump", "--db", "postgres"], &env)
            .expect(0)
            .json();
        ids.push(j["id"].as_str().unwrap().to_string());
    }
    let (gone, kept) = ids.split_at(2);
    // What a user gets back from each kept dump, before anything is removed.
    let export = |id: &str, name: &str| -> Vec<u8> {
        let out = s.path().join(name);
        let _ = std::fs::remove_file(&out);
        s.run_repo(&["export-dump", id, "--output", out.to_str().unwrap()], &[])
            .expect(0);
        std::fs::read(&out).unwrap()
    };
    let reference: Vec<Vec<u8>> = kept.iter().map(|id| export(id, "ref.dump")).collect();
    let pristine = s.path().join("pristine");
    copy_tree(&s.repo(), &pristine);
    let expire = [
        "expire",
        "--kind",
        "dump",
        "--keep-last",
        "2",
        "--grace",
        "0",
    ];

    let mut kills = 0;
    for n in 1u64.. {
        copy_tree(&pristine, &s.repo());
        let k = n.to_string();
        let r = s.run_repo(&expire, &[(pgkeep_storage::KILL_AFTER_OPS_ENV, k.as_str())]);
        if std::os::unix::process::ExitStatusExt::signal(&r.0.status) != Some(9) {
            r.expect(0);
            break;
        }
        kills += 1;
        // Killed: the repository checks clean and every kept dump is whole, byte for byte.
        s.run_repo(&["repo", "check", "--read-data"], &[]).expect(0);
        for (id, want) in kept.iter().zip(&reference) {
            assert!(
                export(id, "after-kill.dump") == *want,
                "kill at {n}: dump {id} changed"
            );
        }
        // The rerun finishes the work: the expired dumps are gone, the kept ones still whole.
        s.run_repo(&expire, &[]).expect(0);
        s.run_repo(&["repo", "check", "--read-data"], &[]).expect(0);
        let list = s.run_repo(&["--json", "list"], &[]).expect(0).json();
        let left = ids_of(&list, "dump");
        assert_eq!(left, kept, "kill at {n}: after the rerun");
        for (id, want) in kept.iter().zip(&reference) {
            assert!(
                export(id, "after-rerun.dump") == *want,
                "kill at {n}: dump {id} changed"
            );
        }
        assert!(n < 300, "expire never completed");
    }
    assert!(
        kills >= 5,
        "only {kills} kill points: expire wrote too little to test"
    );
    let list = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert_eq!(ids_of(&list, "dump"), kept);
    assert!(gone.iter().all(|id| !ids_of(&list, "dump").contains(id)));
}

/// `--lock-wait`: a prune started while another process holds the exclusive lock fails at
/// once with exit 11 by default, and with `--lock-wait` waits for the lock and then runs; a
/// wait that runs out is exit 11 too, and a bad duration exit 2.
#[test]
fn lock_wait_lets_a_command_wait_for_a_conflicting_lock_instead_of_failing() {
    use std::time::Instant;
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let storage: std::sync::Arc<dyn pgkeep_storage::Storage> =
        std::sync::Arc::new(pgkeep_storage::LocalStorage::new(s.repo()).unwrap());
    let repo = rt
        .block_on(pgkeep_repo::Repository::open(storage, None))
        .unwrap();
    let held = rt
        .block_on(repo.lock(pgkeep_repo::LockKind::Exclusive, None, "holder"))
        .unwrap();

    let r = s.run_repo(&["repo", "prune"], &[]).expect(11);
    assert!(r.stderr().contains("holder"), "{}", r.stderr());
    let started = Instant::now();
    s.run_repo(&["--lock-wait", "1s", "repo", "prune"], &[])
        .expect(11);
    assert!(started.elapsed() >= Duration::from_secs(1));
    let r = s
        .run_repo(&["--lock-wait", "soon", "repo", "prune"], &[])
        .expect(2);
    assert!(r.stderr().contains("--lock-wait"), "{}", r.stderr());

    let mut cmd = std::process::Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
        .env("PGKEEP_LOCK_WAIT", "30s")
        .args(["--repo", s.repo().to_str().unwrap(), "repo", "prune"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let started = Instant::now();
    let child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    rt.block_on(held.release()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(String::from_utf8_lossy(&out.stderr).contains("waiting up to"));
}

/// `pgkeep ARGS` as a child process of its own, waiting for locks up to two minutes.
fn spawn_pgkeep(s: &Sandbox, args: &[&str], pg: &str) -> std::process::Child {
    std::process::Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
        .env("PGKEEP_LOCK_WAIT", "120s")
        .env("PGKEEP_PG", pg)
        .args(["--repo", s.repo().to_str().unwrap()])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_backup_process_running_beside_an_expire_process_loses_nothing() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let conn = c.conninfo();
    c.sql("CREATE TABLE items (id int, pad text)").unwrap();
    for round in 0..2 {
        c.sql(&format!(
            "INSERT INTO items SELECT g, repeat(md5(g::text), 8) FROM generate_series(1, 60000) g; \
             UPDATE items SET pad = md5(pad) WHERE id % 3 = {round}"
        ))
        .unwrap();
        s.run_repo(&["backup"], &[("PGKEEP_PG", conn.as_str())])
            .expect(0);
    }
    // Either order: the expire first, or the backup first.
    for (round, expire_first) in [(0, false), (1, true)] {
        c.sql("UPDATE items SET pad = md5(pad) WHERE id % 2 = 0")
            .unwrap();
        let rows = c
            .sql("SELECT count(*), sum(length(pad)) FROM items")
            .unwrap();
        let expire = ["expire", "--keep-last", "1"];
        let (first, second): (&[&str], &[&str]) = if expire_first {
            (&expire, &["--json", "backup"])
        } else {
            (&["--json", "backup"], &expire)
        };
        let a = spawn_pgkeep(&s, first, &conn);
        std::thread::sleep(Duration::from_millis(150));
        let b = spawn_pgkeep(&s, second, &conn);
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        for (what, out) in [(first, &a), (second, &b)] {
            assert!(
                out.status.success(),
                "{what:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let backup_out = if expire_first { &b } else { &a };
        let made: serde_json::Value = serde_json::from_slice(&backup_out.stdout).unwrap();
        let id = made["id"].as_str().unwrap().to_string();
        // The new backup survived whichever ran first, and everything left reads back.
        let list = s.run_repo(&["--json", "list"], &[]).expect(0).json();
        assert!(ids_of(&list, "physical").contains(&id), "{list}");
        s.run_repo(&["repo", "check", "--read-data"], &[]).expect(0);
        let d = s.path().join(format!("beside-{round}"));
        s.run_repo(
            &[
                "restore",
                &id,
                "--target-dir",
                d.to_str().unwrap(),
                "--target-immediate",
                "--target-action",
                "promote",
            ],
            &[],
        )
        .expect(0);
        let r = Cluster::builder()
            .start_timeout(Duration::from_secs(120))
            .start_existing(&d)
            .unwrap();
        r.wait_until_promoted(Duration::from_secs(120)).unwrap();
        assert_eq!(
            r.sql("SELECT count(*), sum(length(pad)) FROM items")
                .unwrap(),
            rows,
            "round {round}"
        );
    }
}
