//! Backups taken from a streaming replica, end to end with the real binary, on PostgreSQL 15:
//! a primary archiving through `pgkeep archive-push`, and a replica made from it with
//! `pg_basebackup -R` that streams from it.
//!
//! - under pgbench load on the primary, `pgkeep backup --pg <replica>` succeeds with both
//!   methods; each backup, restored to a restore point made on the primary after it, starts
//!   and its `pg_dumpall` equals the primary's at that point, for the whole cluster (several
//!   databases, template1, roles with a password hash; no tablespace: `--method basebackup`
//!   refuses clusters with tablespaces), and amcheck finds every table and index intact;
//! - a backup of the replica whose primary stops (immediate) while the backup waits for its
//!   WAL to be archived fails within its bound, says that the standby no longer streams from
//!   a primary, and leaves nothing listed;
//! - `pgkeep check`, which needs a WAL switch, against the replica: one clear error with a
//!   hint.

mod cli_support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli_support::{
    amcheck_all, assert_same_cluster, populate_whole_cluster_without_tablespace, Sandbox,
};
use pgkeep_testing::cluster::{running_as_root, StopMode, PG_BIN_DIR};
use pgkeep_testing::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

fn chown_postgres(p: &Path) {
    if running_as_root() {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// A sandbox with a plain repository that the server user can write (for archive-push).
fn sandbox() -> Sandbox {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(
        s.path().join("empty.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    chown_postgres(&s.repo());
    s
}

fn archive_command(s: &Sandbox) -> String {
    format!(
        "{BIN} --config {} --repo {} archive-push %p",
        s.path().join("empty.toml").display(),
        s.repo().display()
    )
}

/// `pgkeep ARGS` against `c` (`PGKEEP_PG`).
fn run_pg(s: &Sandbox, c: &Cluster, args: &[&str]) -> cli_support::Run {
    let conninfo = c.conninfo();
    s.run_repo(args, &[("PGKEEP_PG", conninfo.as_str())])
}

/// A streaming replica of `primary`: `pg_basebackup -R` into a directory of `holder`, then
/// started with `builder`'s settings. Waits until it streams.
fn replica_of(
    primary: &Cluster,
    builder: pgkeep_testing::cluster::ClusterBuilder,
    holder: &Path,
) -> Cluster {
    let data = holder.join("replica");
    let out = primary
        .client_command(&format!("{PG_BIN_DIR}/pg_basebackup"))
        .arg("-D")
        .arg(&data)
        .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_basebackup -R: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(data.join("standby.signal").exists());
    let r = builder.start_existing(&data).unwrap();
    wait_until(&r, "the replica streams", || {
        r.sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")
            .unwrap()
            == "1"
    });
    r
}

fn wait_until(c: &Cluster, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; log:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the replica has replayed everything the primary has written so far.
fn caught_up(primary: &Cluster, replica: &Cluster) {
    let lsn = primary.sql("SELECT pg_current_wal_lsn()").unwrap();
    wait_until(replica, "the replica caught up", || {
        replica
            .sql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'"))
            .unwrap()
            == "t"
    });
}

/// Switches WAL on the primary and waits until the switched segment is archived.
fn switch_and_wait(c: &Cluster) {
    let seg = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    wait_until(c, &format!("{seg} is archived"), || {
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
        archived.len() == 24 && archived >= seg.as_str()
    });
}

/// pgbench rounds on the primary until stopped; `stop` returns after the round in flight.
struct Load {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(c: &Cluster) -> Load {
        let env = c.env();
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let out = Command::new(format!("{PG_BIN_DIR}/pgbench"))
                    .envs(env.clone())
                    .args(["-n", "-c", "2", "-T", "1"])
                    .output()
                    .expect("pgbench");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        Load {
            stop,
            rounds,
            handle: Some(handle),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("load thread");
        }
        self.rounds.load(Ordering::SeqCst)
    }
}

/// Starts a restored data directory and waits until recovery reached its target and the
/// server was promoted.
fn start_promoted(dir: &Path) -> Cluster {
    let c = Cluster::builder()
        .start_timeout(Duration::from_secs(180))
        .start_existing(dir)
        .unwrap();
    c.wait_until_promoted(Duration::from_secs(120)).unwrap();
    c
}

fn listed_backups(s: &Sandbox) -> Vec<serde_json::Value> {
    s.run_repo(&["--json", "list"], &[]).expect(0).json()["backups"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn backups_of_a_streaming_replica_under_load_restore_to_the_primarys_data_at_a_restore_point() {
    let s = sandbox();
    // archive_timeout bounds how long the segment holding a standby backup's stop LSN stays
    // incomplete on the primary when the load is light (what a standby backup waits for).
    let primary = Cluster::builder()
        .archive_command(&archive_command(&s))
        .setting("archive_timeout", "10")
        .start()
        .unwrap();
    populate_whole_cluster_without_tablespace(&primary);
    primary.pgbench(&["-i", "-s", "2", "-q"]).unwrap();
    // No sequences in the data compared: PostgreSQL logs a sequence 32 values ahead, so a
    // recovered copy's sequence legitimately runs ahead of the original's.
    primary
        .sql("CREATE TABLE notes (id int PRIMARY KEY, note text); INSERT INTO notes SELECT g, 'before ' || g FROM generate_series(1, 1000) g;")
        .unwrap();
    let holder = tempfile::tempdir().unwrap();
    // The replica's settings mirror the primary's (pgkeep archives; a standby with
    // archive_mode = on archives nothing itself).
    let replica = replica_of(
        &primary,
        Cluster::builder()
            .archive_command(&archive_command(&s))
            .setting("archive_timeout", "10"),
        holder.path(),
    );
    caught_up(&primary, &replica);

    let mut load = Load::start(&primary);
    let replica_data = replica.pgdata().to_str().unwrap().to_string();
    let local = run_pg(
        &s,
        &replica,
        &[
            "--json",
            "backup",
            "--pgdata",
            &replica_data,
            "--label",
            "from the replica",
        ],
    )
    .expect(0)
    .json();
    let remote = run_pg(
        &s,
        &replica,
        &["--json", "backup", "--method", "basebackup"],
    )
    .expect(0)
    .json();
    let rounds = load.stop();
    assert!(
        rounds >= 2,
        "the load ran during the backups ({rounds} rounds)"
    );

    // The end point: a restore point on the primary after both backups, archived.
    primary
        .sql("INSERT INTO notes VALUES (1001, 'last'); SELECT pg_create_restore_point('after_standby_backups');")
        .unwrap();
    switch_and_wait(&primary);
    let want = primary.pg_dumpall().unwrap();
    assert!(
        want.contains("\tlast\n"),
        "the primary's dump lacks the last row"
    );

    for b in [&local, &remote] {
        let id = b["id"].as_str().unwrap();
        let dir = s.path().join(format!("restored-{id}"));
        s.run_repo(
            &[
                "restore",
                id,
                "--target-dir",
                dir.to_str().unwrap(),
                "--target-name",
                "after_standby_backups",
                "--target-action",
                "promote",
            ],
            &[],
        )
        .expect(0);
        let label = std::fs::read_to_string(dir.join("backup_label")).unwrap();
        assert!(label.contains("BACKUP FROM: standby"), "{id}: {label}");
        assert!(
            !dir.join("standby.signal").exists(),
            "{id}: the replica's standby.signal was restored"
        );
        let restored = start_promoted(&dir);
        eprintln!("backup {id} restored to the restore point: compared with the primary");
        assert_same_cluster(&want, &restored);
        // Taken under load: every page and index of the restore is intact.
        amcheck_all(&restored);
    }
    assert_eq!(listed_backups(&s).len(), 2);
}

#[test]
fn a_standby_backup_whose_primary_stops_while_it_waits_for_wal_fails_and_lists_nothing() {
    let s = sandbox();
    let mut primary = Cluster::builder()
        .archive_command(&archive_command(&s))
        .start()
        .unwrap();
    let holder = tempfile::tempdir().unwrap();
    let replica = replica_of(
        &primary,
        Cluster::builder().archive_command(&archive_command(&s)),
        holder.path(),
    );
    // Some WAL and a checkpoint after the replica was made: the backup's restartpoint on the
    // replica then puts its stop LSN into a segment the primary has not completed.
    primary
        .sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g; CHECKPOINT;")
        .unwrap();
    caught_up(&primary, &replica);

    // `pgkeep check` needs a WAL switch: against the replica, one clear error and a hint.
    let r = run_pg(&s, &replica, &["check"]).expect(1);
    let e = r.stderr();
    assert!(
        e.contains("is a standby")
            && e.contains("HINT: run `pgkeep check` with --pg naming the primary"),
        "{e}"
    );

    let started = Instant::now();
    let mut child = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_PG", replica.conninfo())
        .args(["--config", s.path().join("empty.toml").to_str().unwrap()])
        .args(["--repo", s.repo().to_str().unwrap()])
        .args(["backup", "--pgdata", replica.pgdata().to_str().unwrap()])
        .args(["--archive-timeout", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stderr = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        stderr.push_str(&line);
        stderr.push('\n');
        if line.contains("waiting for the backup's WAL to be archived") {
            break;
        }
    }
    assert!(
        stderr.contains("waiting for the backup's WAL"),
        "the backup did not reach its wait:\n{stderr}"
    );
    primary.stop_mode(StopMode::Immediate).unwrap();
    for line in lines {
        stderr.push_str(&line.unwrap());
        stderr.push('\n');
    }
    let status = child.wait().unwrap();
    let took = started.elapsed();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(90), "took {took:?}");
    assert!(
        stderr.contains("WAL not archived into this repository within 20s")
            && stderr.contains("a standby never completes a WAL segment itself")
            && stderr.contains("not streaming from a primary")
            && stderr.contains("HINT: on the primary, run SELECT pg_switch_wal()"),
        "{stderr}"
    );
    assert!(listed_backups(&s).is_empty(), "a failed backup is listed");
    drop(replica);
}
