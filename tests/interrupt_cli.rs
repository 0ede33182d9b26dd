//! Issue 18, item 3: SIGINT and SIGTERM in the middle of the work of `backup` (both methods),
//! `restore`, `dump`, `restore-dump`, `archive-push` (synchronous, and the asynchronous
//! foreground and background pusher), `expire` and `copy`, sent to the pgkeep process alone
//! (as a service manager does; pgkeep must stop its own children).
//!
//! To be sure the signal lands while the command works, every storage operation of the
//! interrupted run is slowed down by the `PGKEEP_TEST_STORE_LATENCY_MS` hook of pgkeep-storage,
//! and the signal is sent only once the command has visibly started (its lock object exists,
//! the server shows its backup or its pg_dump/pg_restore session, its process is pushing).
//!
//! After each signal, what a user relies on:
//! - exit 130 within [`interrupt::EXIT_BOUND`], saying so on stderr;
//! - the repository's `locks/` directory is empty, and a command needing the lock (the same
//!   command, or `repo prune --dry-run`, which takes the exclusive lock) runs at once;
//! - nothing half-made is listed (`list --json` shows no new entry, or only whole ones) and
//!   `repo check` passes (`--read-data` in this file too);
//! - the server is left as before: no replication slot, no session of pgkeep, pg_dump,
//!   pg_restore or pg_basebackup (a non-exclusive backup ends with its session), and the next
//!   backup, dump or restore succeeds;
//! - `archive-push`: the segment is not acknowledged to PostgreSQL, a retry stores it, and at
//!   no moment is a segment acknowledged that the repository does not hold.

mod cli_support;
#[path = "cli_support/interrupt.rs"]
mod interrupt;

use std::path::Path;
use std::time::{Duration, Instant};

use cli_support::Sandbox;
use interrupt::{assert_no_locks, eventually, lock_files, spawn, Sig, SIGNALS};
use pgkeep_storage::LATENCY_ENV;
use pgkeep_testing::Cluster;

/// The storage latency of the interrupted runs: long enough that every command is still at
/// work a second after it visibly started, short enough for its clean-up after the signal.
const SLOW: (&str, &str) = (LATENCY_ENV, "400");

/// The latency of the interrupted backups: with 4 uploads in flight, their ~18 packs take
/// some 5 s in backup mode.
const BACKUP_SLOW: (&str, &str) = (LATENCY_ENV, "1000");

/// How long a command may take to start its work under [`SLOW`].
const START_BOUND: Duration = Duration::from_secs(60);

/// Sessions on the server other than the caller's own: client backends and WAL senders, as
/// `backend_type:application_name:state` (empty when there are none).
fn sessions(c: &Cluster) -> String {
    c.sql(
        "select coalesce(string_agg(backend_type || ':' || application_name || ':' || coalesce(state, ''), ', '), '') \
         from pg_stat_activity where pid <> pg_backend_pid() \
         and backend_type in ('client backend', 'walsender')",
    )
    .unwrap()
}

fn slots(c: &Cluster) -> String {
    c.sql("select coalesce(string_agg(slot_name || ':' || active::text, ', '), '') from pg_replication_slots")
        .unwrap()
}

/// Asserts that the server has, within a few seconds, no replication slot and no other
/// session: the interrupted run's connections are gone, and with them its backup (a
/// non-exclusive backup ends with its session) and its temporary slot.
fn assert_server_clean(c: &Cluster, what: &str) {
    let clean = eventually(Duration::from_secs(10), || {
        sessions(c).is_empty() && slots(c).is_empty()
    });
    assert!(
        clean,
        "{what}: the server still has sessions [{}] and replication slots [{}]",
        sessions(c),
        slots(c)
    );
}

/// `program` runs for this cluster now (so that [`assert_no_tool_left`] looks for the right
/// processes).
fn assert_tool_runs(c: &Cluster, program: &str, what: &str) {
    let env = format!("PGHOST={}", c.socket_dir().display());
    assert!(
        !interrupt::tool_processes(program, &env).is_empty(),
        "{what}: no {program} found running before the signal"
    );
}

/// No `program` that pgkeep started for this cluster runs any more.
fn assert_no_tool_left(c: &Cluster, program: &str, what: &str) {
    let env = format!("PGHOST={}", c.socket_dir().display());
    let gone = eventually(Duration::from_secs(2), || {
        interrupt::tool_processes(program, &env).is_empty()
    });
    assert!(
        gone,
        "{what}: {program} still runs: {:?}",
        interrupt::tool_processes(program, &env)
    );
}

/// Ids in `list --json`, oldest first.
fn listed(s: &Sandbox, repo: &Path) -> Vec<String> {
    let r = s
        .run(&["--repo", repo.to_str().unwrap(), "--json", "list"], &[])
        .expect(0);
    r.json()["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// `repo check` (with `--read-data` when asked) passes with no problem.
fn assert_repo_checks(s: &Sandbox, repo: &Path, read_data: bool, what: &str) {
    let mut args = vec!["--repo", repo.to_str().unwrap(), "--json", "repo", "check"];
    if read_data {
        args.push("--read-data");
    }
    let r = s.run(&args, &[]);
    assert_eq!(
        r.code(),
        0,
        "{what}: repo check\n{}\n{}",
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

/// The exclusive lock is free: `repo prune --dry-run` (which takes it) runs at once.
fn assert_exclusive_lock_free(s: &Sandbox, repo: &Path, what: &str) {
    let t = Instant::now();
    let r = s.run(
        &[
            "--repo",
            repo.to_str().unwrap(),
            "repo",
            "prune",
            "--dry-run",
        ],
        &[],
    );
    assert_eq!(r.code(), 0, "{what}: repo prune --dry-run: {}", r.stderr());
    assert!(
        !r.stderr().contains("stale"),
        "{what}: the next run met a stale lock: {}",
        r.stderr()
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "{what}: repo prune --dry-run took {:?}",
        t.elapsed()
    );
}

/// What every interrupted run against a local repository must leave: no lock, the exclusive
/// lock free at once, the same listing as before, a repository that checks clean.
fn assert_repository_as_before(s: &Sandbox, repo: &Path, before: &[String], what: &str) {
    assert_no_locks(repo, what);
    assert_exclusive_lock_free(s, repo, what);
    assert_eq!(listed(s, repo), before, "{what}: a new entry is listed");
    assert_repo_checks(s, repo, false, what);
}

fn backup_args(c: &Cluster, method: &str) -> Vec<String> {
    vec![
        "--repo".into(),
        "REPO".into(),
        "backup".into(),
        "--pgdata".into(),
        c.pgdata().display().to_string(),
        "--pg".into(),
        c.conninfo(),
        "--method".into(),
        method.into(),
    ]
}

fn with_repo<'a>(args: &'a [String], repo: &'a str) -> Vec<&'a str> {
    args.iter()
        .map(|a| if a == "REPO" { repo } else { a.as_str() })
        .collect()
}

/// Rows of ~1 KiB of random bytes (incompressible): ~70 MiB, some 18 packs of 4 MiB that an
/// interrupted backup is still uploading (under [`SLOW`]) when the signal lands.
fn random_table(c: &Cluster, rows: u32) {
    c.sql(&format!(
        "create table r(id int, b bytea) with (autovacuum_enabled = off); \
         insert into r select g, (select decode(string_agg(md5(random()::text || x), ''), 'hex') \
         from generate_series(1, 63 + 0 * g) x) from generate_series(1, {rows}) g"
    ))
    .unwrap();
}

#[test]
fn backup_interrupted_in_backup_mode_exits_130_ends_the_backup_and_lists_nothing() {
    let c = Cluster::builder()
        .setting("max_wal_size", "64MB")
        .start()
        .unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    let s = Sandbox::new();
    s.run_repo(
        &["repo", "init", "--no-encryption", "--pack-size", "4MiB"],
        &[],
    )
    .expect(0);
    let repo = s.repo();
    let repo_s = repo.to_str().unwrap().to_string();
    // A first backup: the interrupted ones must leave exactly this listed. Then data it does
    // not have, which every interrupted backup has to upload.
    let local = backup_args(&c, "local");
    s.run(&with_repo(&local, &repo_s), &[]).expect(0);
    let before = listed(&s, &repo);
    assert_eq!(before.len(), 1);
    random_table(&c, 60_000);

    for (sig, method) in [
        (Sig::Int, "local"),
        (Sig::Term, "local"),
        (Sig::CtrlC, "local"),
        (Sig::Term, "basebackup"),
        (Sig::Int, "basebackup"),
        (Sig::CtrlC, "basebackup"),
    ] {
        let what = format!("backup --method {method}, {sig:?}");
        let args = backup_args(&c, method);
        let mut run = spawn(&s, &with_repo(&args, &repo_s), &[BACKUP_SLOW]);
        let progress = run.stderr_path();
        run.wait_until("in backup mode", START_BOUND, || {
            // The file phase has begun: pg_backup_start has returned (local), pg_basebackup
            // streams (basebackup).
            std::fs::read_to_string(&progress)
                .unwrap_or_default()
                .contains("backup: ")
                && !lock_files(&repo).is_empty()
                && (method == "local"
                    || c.sql(
                        "select count(*) from pg_stat_progress_basebackup \
                         where phase = 'streaming database files'",
                    )
                    .unwrap()
                        == "1")
        });
        if method == "basebackup" {
            assert_tool_runs(&c, "pg_basebackup", &what);
        }
        let ended = run.interrupt(sig).expect_interrupted(&what);
        if method == "local" {
            // The signal landed in backup mode: pg_backup_stop was never reached.
            assert!(
                ended.stderr.contains("pg_backup_start on")
                    && !ended.stderr.contains("pg_backup_stop"),
                "{what}: not interrupted in backup mode:\n{}",
                ended.stderr
            );
        }
        assert_server_clean(&c, &what);
        assert_no_tool_left(&c, "pg_basebackup", &what);
        assert_repository_as_before(&s, &repo, &before, &what);
    }

    // The next backup starts at once and completes; everything reads back.
    let t = Instant::now();
    s.run(&with_repo(&local, &repo_s), &[]).expect(0);
    eprintln!("next backup: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(listed(&s, &repo).len(), 2);
    assert_no_locks(&repo, "after the next backup");
    assert_server_clean(&c, "after the next backup");
    assert_repo_checks(&s, &repo, true, "after the interrupted backups");
}

#[test]
fn dump_interrupted_while_pg_dump_runs_exits_130_stops_pg_dump_and_lists_nothing() {
    // pgbench rows compress into a single pack, which pgkeep takes in faster than pg_dump
    // writes: pg_dump could end before the signal. ~100 MiB of incompressible rows in 4 MiB
    // packs, each upload a second long, keep pg_dump blocked on its pipe for seconds.
    let c = Cluster::new().unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    random_table(&c, 100_000);
    let s = Sandbox::new();
    s.run_repo(
        &["repo", "init", "--no-encryption", "--pack-size", "4MiB"],
        &[],
    )
    .expect(0);
    let repo = s.repo();
    let pg = c.conninfo();
    s.run_repo(&["dump", "--db", "postgres", "--pg", &pg], &[])
        .expect(0);
    let before = listed(&s, &repo);
    assert_eq!(before.len(), 1);
    for sig in [Sig::Int, Sig::Term, Sig::CtrlC] {
        let what = format!("dump, {sig:?}");
        let repo_s = repo.to_str().unwrap();
        let mut run = spawn(
            &s,
            &["--repo", repo_s, "dump", "--db", "postgres", "--pg", &pg],
            &[BACKUP_SLOW],
        );
        let env = format!("PGHOST={}", c.socket_dir().display());
        run.wait_until("dumping", START_BOUND, || {
            c.sql(
                "select count(*) from pg_stat_activity where application_name = 'pg_dump' \
                 and state is not null",
            )
            .unwrap()
                != "0"
                && !lock_files(&repo).is_empty()
                && !interrupt::tool_processes("pg_dump", &env).is_empty()
        });
        std::thread::sleep(Duration::from_millis(500));
        assert_tool_runs(&c, "pg_dump", &what);
        run.interrupt(sig).expect_interrupted(&what);
        assert_server_clean(&c, &what);
        assert_no_tool_left(&c, "pg_dump", &what);
        assert_repository_as_before(&s, &repo, &before, &what);
    }
    // The next dump starts at once and completes.
    s.run_repo(&["dump", "--db", "postgres", "--pg", &pg], &[])
        .expect(0);
    assert_eq!(listed(&s, &repo).len(), 2);
    assert_no_locks(&repo, "after the next dump");
}

#[test]
fn restore_interrupted_while_writing_exits_130_frees_its_lock_and_leaves_a_marked_directory() {
    let c = Cluster::new().unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    random_table(&c, 40_000);
    let s = Sandbox::new();
    s.run_repo(
        &["repo", "init", "--no-encryption", "--pack-size", "4MiB"],
        &[],
    )
    .expect(0);
    let repo = s.repo();
    let repo_s = repo.to_str().unwrap().to_string();
    s.run(&with_repo(&backup_args(&c, "local"), &repo_s), &[])
        .expect(0);
    let dump = c.pg_dump("postgres").unwrap();
    let before = listed(&s, &repo);
    let work = tempfile::tempdir().unwrap();
    for sig in SIGNALS {
        let what = format!("restore, {sig:?}");
        let target = work.path().join(format!("{sig:?}"));
        let t = target.to_str().unwrap();
        let mut run = spawn(
            &s,
            &["--repo", &repo_s, "restore", "latest", "--target-dir", t],
            &[SLOW],
        );
        run.wait_until("writing files", START_BOUND, || {
            target.join("pgkeep.restore-incomplete").exists()
                && target.join("base").exists()
                && !lock_files(&repo).is_empty()
        });
        std::thread::sleep(Duration::from_millis(500));
        run.interrupt(sig).expect_interrupted(&what);
        assert_repository_as_before(&s, &repo, &before, &what);
        // Nothing half-made: the directory says it is incomplete, and lacks what would let
        // PostgreSQL start it.
        assert!(target.join("pgkeep.restore-incomplete").exists(), "{what}");
        assert!(!target.join("backup_label").exists(), "{what}");
        assert!(!target.join("global/pg_control").exists(), "{what}");
        // A plain rerun is refused; --delta completes it, at once.
        let r = s.run_repo(&["restore", "latest", "--target-dir", t], &[]);
        assert_eq!(r.code(), 2, "{what}: {}", r.stderr());
        assert!(r.stderr().contains("incomplete restore"), "{}", r.stderr());
        s.run_repo(&["restore", "latest", "--target-dir", t, "--delta"], &[])
            .expect(0);
        assert!(!target.join("pgkeep.restore-incomplete").exists());
        assert_no_locks(&repo, &what);
    }
    // The completed restore starts with the backed-up data.
    let target = work.path().join(format!("{:?}", Sig::Term));
    let restored = Cluster::builder().start_existing(&target).unwrap();
    assert_eq!(
        pgkeep_testing::cluster::first_difference(&dump, &restored.pg_dump("postgres").unwrap()),
        None
    );
}

fn database_exists(c: &Cluster, db: &str) -> bool {
    c.sql(&format!(
        "select count(*) from pg_database where datname = '{db}'"
    ))
    .unwrap()
        == "1"
}

#[test]
fn restore_dump_interrupted_while_pg_restore_runs_exits_130_and_leaves_no_database_behind() {
    let c = Cluster::new().unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    random_table(&c, 40_000);
    let s = Sandbox::new();
    s.run_repo(
        &["repo", "init", "--no-encryption", "--pack-size", "4MiB"],
        &[],
    )
    .expect(0);
    let repo = s.repo();
    let repo_s = repo.to_str().unwrap().to_string();
    let pg = c.conninfo();
    s.run_repo(&["dump", "--db", "postgres", "--pg", &pg], &[])
        .expect(0);
    let before = listed(&s, &repo);
    for sig in [Sig::Int, Sig::Term, Sig::CtrlC] {
        let what = format!("restore-dump --create, {sig:?}");
        let db = format!("restored_{sig:?}").to_lowercase();
        let args = [
            "--repo",
            &repo_s,
            "restore-dump",
            "latest",
            "--pg",
            &pg,
            "--target-db",
            &db,
            "--create",
        ];
        let mut run = spawn(&s, &args, &[SLOW]);
        run.wait_until("restoring", START_BOUND, || {
            c.sql(
                "select count(*) from pg_stat_activity where application_name = 'pg_restore' \
                 and state is not null",
            )
            .unwrap()
                != "0"
                && !lock_files(&repo).is_empty()
        });
        std::thread::sleep(Duration::from_millis(500));
        assert_tool_runs(&c, "pg_restore", &what);
        run.interrupt(sig).expect_interrupted(&what);
        assert_server_clean(&c, &what);
        assert_no_tool_left(&c, "pg_restore", &what);
        assert_repository_as_before(&s, &repo, &before, &what);
        // The database this run created, half restored, is gone: the same command again
        // restores it (a database left behind would refuse `--create`).
        assert!(
            !database_exists(&c, &db),
            "{what}: the half-restored database {db} is left"
        );
        s.run(&args, &[]).expect(0);
        assert_eq!(
            c.sql_db(&db, "select count(*) from r").unwrap(),
            "40000",
            "{what}"
        );
    }

    // Into an existing database: pg_restore's single transaction is rolled back, the
    // database is as it was.
    let what = "restore-dump into an existing database, SIGINT";
    c.sql("create database existing").unwrap();
    c.sql_db(
        "existing",
        "create table keep as select generate_series(1, 3) i",
    )
    .unwrap();
    let args = [
        "--repo",
        &repo_s,
        "restore-dump",
        "latest",
        "--pg",
        &pg,
        "--target-db",
        "existing",
        "--force",
        "--no-safety-dump",
    ];
    let mut run = spawn(&s, &args, &[SLOW]);
    run.wait_until("restoring", START_BOUND, || {
        c.sql(
            "select count(*) from pg_stat_activity where application_name = 'pg_restore' \
             and state is not null",
        )
        .unwrap()
            != "0"
    });
    std::thread::sleep(Duration::from_millis(500));
    run.interrupt(Sig::Int).expect_interrupted(what);
    assert_server_clean(&c, what);
    assert_repository_as_before(&s, &repo, &before, what);
    assert_eq!(
        c.sql_db(
            "existing",
            "select string_agg(table_name, ',' order by table_name) from information_schema.tables \
             where table_schema = 'public'"
        )
        .unwrap(),
        "keep",
        "{what}: the database changed"
    );
    assert_eq!(
        c.sql_db("existing", "select sum(i) from keep").unwrap(),
        "6"
    );
}

// ---------------------------------------------------------------------------------------------
// archive-push

/// The storage latency of an interrupted `archive-push` attempt (and of PostgreSQL's retry
/// that follows at once): opening the repository, checking the cluster's identity, the
/// existence check, the upload and the summary take one each.
const PUSH_LATENCY_MS: u32 = 2000;

/// A cluster archiving into a shared sandbox repository through a wrapper script that gives
/// `archive-push` the latency written in a file (so the test slows down one attempt and lets
/// the retry run at full speed); asynchronous when `spool` is given (`options.spool_dir`).
struct Archiving {
    s: Sandbox,
    c: Cluster,
    latency: std::path::PathBuf,
    spool: Option<std::path::PathBuf>,
    config: std::path::PathBuf,
}

impl Archiving {
    fn start(asynchronous: bool) -> Archiving {
        use std::os::unix::fs::PermissionsExt;
        let s = Sandbox::shared();
        let latency = s.path().join("latency");
        std::fs::write(&latency, "0").unwrap();
        let config = s.path().join("archive.toml");
        let spool = asynchronous.then(|| s.path().join("spool"));
        match &spool {
            Some(sp) => {
                std::fs::create_dir(sp).unwrap();
                chown_postgres(sp);
                std::fs::write(
                    &config,
                    format!("[options]\nspool_dir = \"{}\"\n", sp.display()),
                )
                .unwrap();
            }
            None => std::fs::write(&config, "").unwrap(),
        }
        let script = s.path().join("push.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nPGKEEP_TEST_STORE_LATENCY_MS=$(cat {}) exec {} --config {} --repo {} archive-push \"$1\"\n",
                latency.display(),
                env!("CARGO_BIN_EXE_pgkeep"),
                config.display(),
                s.repo().display()
            ),
        )
        .unwrap();
        for (f, mode) in [(&latency, 0o644), (&config, 0o644), (&script, 0o755)] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let c = Cluster::builder()
            .archive_command(&format!("{} %p", script.display()))
            .start()
            .unwrap();
        c.sql("create table t(i int)").unwrap();
        Archiving {
            s,
            c,
            latency,
            spool,
            config,
        }
    }

    fn set_latency(&self, ms: u32) {
        std::fs::write(&self.latency, ms.to_string()).unwrap();
    }

    /// Writes some WAL and switches: the name of the segment PostgreSQL now archives, and a
    /// copy of it (to compare with what the repository returns).
    fn next_segment(&self) -> (String, Vec<u8>) {
        self.c
            .sql("insert into t select generate_series(1, 10000)")
            .unwrap();
        let seg = self
            .c
            .sql("select pg_walfile_name(pg_switch_wal())")
            .unwrap();
        let data = std::fs::read(self.c.pgdata().join("pg_wal").join(&seg)).unwrap();
        (seg, data)
    }

    fn stored(&self, seg: &str) -> bool {
        self.s
            .repo()
            .join("wal/main")
            .join(&seg[..16])
            .join(seg)
            .exists()
    }

    /// Whether PostgreSQL counts `seg` as archived.
    fn acknowledged(&self, seg: &str) -> bool {
        let last = self
            .c
            .sql("select coalesce(last_archived_wal, '') from pg_stat_archiver")
            .unwrap();
        last.as_str() >= seg
            || self
                .c
                .pgdata()
                .join("pg_wal/archive_status")
                .join(format!("{seg}.done"))
                .exists()
    }

    /// The invariant, checked at every poll: acknowledged implies stored (read in this order,
    /// since a push stores before it acknowledges).
    fn assert_never_acknowledged_unstored(&self, seg: &str) {
        if self.acknowledged(seg) {
            assert!(
                self.stored(seg),
                "{seg} was acknowledged to PostgreSQL but the repository does not hold it"
            );
        }
    }

    /// Waits (up to `timeout`) until `seg` is acknowledged, checking the invariant meanwhile;
    /// then the repository returns exactly `data` for it.
    fn wait_archived(&self, seg: &str, data: &[u8], timeout: Duration) {
        let t = Instant::now();
        loop {
            self.assert_never_acknowledged_unstored(seg);
            if self.acknowledged(seg) {
                break;
            }
            assert!(
                t.elapsed() < timeout,
                "{seg} not archived after {timeout:?}; log:\n{}",
                self.c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let dest = self.s.path().join(format!("got-{seg}"));
        self.s
            .run_repo(&["archive-get", seg, dest.to_str().unwrap()], &[])
            .expect(0);
        assert!(std::fs::read(&dest).unwrap() == data, "{seg}: other bytes");
        std::fs::remove_file(&dest).unwrap();
    }

    /// The `archive-push` process PostgreSQL runs for `seg` (the foreground, not a pusher),
    /// waiting for it (checking the invariant) up to `timeout`.
    fn pusher_of(&self, seg: &str, timeout: Duration) -> u32 {
        let repo = self.s.repo().display().to_string();
        let t = Instant::now();
        loop {
            self.assert_never_acknowledged_unstored(seg);
            let found = interrupt::processes(|l| {
                l.contains(&repo)
                    && l.contains(" archive-push ")
                    && l.ends_with(&format!("pg_wal/{seg}"))
            });
            if let Some((pid, _)) = found.first() {
                return *pid;
            }
            assert!(
                t.elapsed() < timeout,
                "no archive-push of {seg}; log:\n{}",
                self.c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Signals an archive-push process that PostgreSQL started (not a child of the test):
    /// its exit, within the bound, is read from the server log.
    fn interrupt_pusher(&self, pid: u32, sig: Sig, seg: &str, what: &str) {
        let failures_before = self.exit_130_lines();
        let t = Instant::now();
        sig.send(pid);
        while interrupt::alive(pid) {
            assert!(
                t.elapsed() < interrupt::EXIT_BOUND,
                "{what}: archive-push still runs {:?} after the signal",
                t.elapsed()
            );
            self.assert_never_acknowledged_unstored(seg);
            std::thread::sleep(Duration::from_millis(5));
        }
        let exited = t.elapsed();
        // PostgreSQL logs the exit code (and, reading 130 as a signal, restarts its archiver).
        let logged = eventually(Duration::from_secs(10), || {
            self.exit_130_lines() > failures_before
        });
        assert!(
            logged,
            "{what}: no 'exit code 130' in the server log:\n{}",
            self.c.log_tail()
        );
        eprintln!(
            "{what}: archive-push exit 130 {:.2} s after the signal",
            exited.as_secs_f64()
        );
    }

    fn exit_130_lines(&self) -> usize {
        std::fs::read_to_string(self.c.log_path())
            .unwrap_or_default()
            .matches("archive command failed with exit code 130")
            .count()
    }
}

fn chown_postgres(p: &Path) {
    let st = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn archive_push_interrupted_mid_push_is_not_acknowledged_and_the_retry_stores_the_segment() {
    if !pgkeep_testing::cluster::require_root("the server runs archive-push as `postgres`") {
        return;
    }
    let a = Archiving::start(false);
    // Interrupted while it opens the repository and checks the cluster's identity, before
    // the upload; then right after the upload, before the segment's summary is written and
    // before the exit that would acknowledge it.
    for (sig, stored) in [
        (Sig::Int, false),
        (Sig::Term, false),
        (Sig::Term, true),
        (Sig::Int, true),
    ] {
        let what = format!("archive-push, SIG{sig:?}, segment stored: {stored}");
        a.set_latency(PUSH_LATENCY_MS);
        let (seg, data) = a.next_segment();
        let pid = a.pusher_of(&seg, START_BOUND);
        let seen = Instant::now();
        loop {
            let ready = if stored {
                // Only a file test while the window is open: the signal must land before
                // the summary is written and the process exits.
                a.stored(&seg)
            } else {
                a.assert_never_acknowledged_unstored(&seg);
                seen.elapsed() > Duration::from_secs(1)
            };
            if ready {
                break;
            }
            assert!(interrupt::alive(pid), "{what}: archive-push ended first");
            std::thread::sleep(Duration::from_millis(2));
        }
        a.interrupt_pusher(pid, sig, &seg, &what);
        // PostgreSQL's retry is as slow as this attempt was: it cannot have acknowledged the
        // segment yet.
        assert!(!a.acknowledged(&seg), "{what}: {seg} acknowledged");
        assert_eq!(a.stored(&seg), stored, "{what}");
        a.set_latency(0);
        assert_no_locks(&a.s.repo(), &what);
        // PostgreSQL retries; the retry stores it.
        a.wait_archived(&seg, &data, Duration::from_secs(90));
    }
    assert_repo_checks(&a.s, &a.s.repo(), false, "after the interrupted pushes");
}

impl Archiving {
    fn spool(&self) -> &Path {
        self.spool.as_deref().expect("asynchronous")
    }

    fn ok_file(&self, seg: &str) -> std::path::PathBuf {
        self.spool().join("out/main").join(format!("{seg}.ok"))
    }

    /// Background pushers of this spool (started by a foreground `archive-push`).
    fn workers(&self) -> Vec<u32> {
        let spool = self.spool().display().to_string();
        interrupt::processes(|l| l.contains(" archive-push-worker ") && l.contains(&spool))
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }

    /// Stops the pushers a foreground started (idle ones linger 30 s): SIGTERM, which must
    /// end them at once, their lock free.
    fn stop_workers(&self) {
        for pid in self.workers() {
            Sig::Term.send(pid);
        }
        assert!(
            eventually(interrupt::EXIT_BOUND, || self.workers().is_empty()),
            "background pushers still run after SIGTERM"
        );
        assert!(!interrupt::flock_held(&self.spool().join("worker.lock")));
    }
}

#[test]
fn async_archive_push_and_its_pusher_interrupted_acknowledge_nothing_unstored() {
    if !pgkeep_testing::cluster::require_root("the server runs archive-push as `postgres`") {
        return;
    }
    let a = Archiving::start(true);
    let (uid, gid) = interrupt::user_ids("postgres");
    let pg_wal = std::fs::canonicalize(a.c.pgdata().join("pg_wal")).unwrap();
    let repo_s = a.s.repo().display().to_string();
    // Warm up: asynchronous archiving works (through the spool: the pusher's lock is there).
    let (seg, data) = a.next_segment();
    a.wait_archived(&seg, &data, Duration::from_secs(60));
    assert!(a.spool().join("worker.lock").exists(), "not asynchronous");

    // 1. The background pusher interrupted in the middle of its push. The test starts it
    // itself (as the server user, as a foreground would) to see its exit code.
    // Once right after its upload (the summary and the .ok still to write), once earlier.
    for (sig, stored) in [(Sig::Int, true), (Sig::Term, false)] {
        let what = format!("archive-push-worker, SIG{sig:?}, segment stored: {stored}");
        a.stop_workers();
        a.set_latency(PUSH_LATENCY_MS);
        let spool_s = a.spool().display().to_string();
        let args = [
            "--config",
            a.config.to_str().unwrap(),
            "--repo",
            &repo_s,
            "--cluster",
            "main",
            "archive-push-worker",
            "--spool-dir",
            &spool_s,
            pg_wal.to_str().unwrap(),
        ];
        let lock = a.spool().join("worker.lock");
        // PostgreSQL's archiver may start a pusher of its own between `stop_workers` and this
        // one (it retries at once): then this one finds the lock taken and exits 0 at once.
        // Start again until this one is the pusher holding the lock (the only one running).
        let mut attempts = 0;
        let mut worker = loop {
            attempts += 1;
            let mut w = interrupt::spawn_with(
                &a.s,
                &args,
                &[(LATENCY_ENV, &PUSH_LATENCY_MS.to_string())],
                |cmd| {
                    use std::os::unix::process::CommandExt;
                    cmd.uid(uid).gid(gid);
                },
            );
            let mine = w.pid();
            let holds = eventually(START_BOUND, || {
                w.child.try_wait().unwrap().is_some()
                    || (interrupt::flock_held(&lock) && a.workers() == vec![mine])
            });
            if holds && w.child.try_wait().unwrap().is_none() {
                break w;
            }
            assert!(
                attempts < 5,
                "{what}: the test's pusher never held the lock:\n{}",
                w.stderr()
            );
            let _ = w.child.kill();
            let _ = w.child.wait();
            a.stop_workers();
        };
        let (seg, data) = a.next_segment();
        // The foreground PostgreSQL started waits for the pusher's verdict.
        a.pusher_of(&seg, START_BOUND);
        let seen = Instant::now();
        worker.wait_until("pushing", START_BOUND, || {
            if stored {
                // Only a file test while the window (the summary's write) is open.
                a.stored(&seg)
            } else {
                a.assert_never_acknowledged_unstored(&seg);
                seen.elapsed() > Duration::from_millis(2 * PUSH_LATENCY_MS as u64)
            }
        });
        worker.interrupt(sig).expect_interrupted(&what);
        assert_eq!(a.stored(&seg), stored, "{what}");
        // The foreground starts another pusher as soon as the lock is free; it is as slow as
        // this one, so it cannot have acknowledged the segment yet.
        assert!(!a.ok_file(&seg).exists(), "{what}: {seg} has an .ok");
        assert!(!a.acknowledged(&seg), "{what}: {seg} acknowledged");
        a.set_latency(0);
        // The foreground starts another pusher as soon as the lock is free: the lock is
        // free, or held by that one.
        assert!(
            !interrupt::flock_held(&lock) || !a.workers().is_empty(),
            "{what}: the pusher's lock is held by no pusher"
        );
        assert_no_locks(&a.s.repo(), &what);
        // The waiting foreground starts another pusher, which stores it.
        a.wait_archived(&seg, &data, Duration::from_secs(90));
    }

    // 2. The foreground interrupted while it waits for the pusher: PostgreSQL sees 130, and
    // its retry collects the verdict of the pusher, which went on.
    for sig in SIGNALS {
        let what = format!("archive-push --spool-dir, SIG{sig:?}");
        a.stop_workers();
        a.set_latency(PUSH_LATENCY_MS);
        let (seg, data) = a.next_segment();
        let pid = a.pusher_of(&seg, START_BOUND);
        let seen = Instant::now();
        while seen.elapsed() < Duration::from_secs(1) {
            a.assert_never_acknowledged_unstored(&seg);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!a.workers().is_empty(), "{what}: no pusher started");
        a.interrupt_pusher(pid, sig, &seg, &what);
        assert!(!a.acknowledged(&seg), "{what}: {seg} acknowledged");
        a.set_latency(0);
        a.wait_archived(&seg, &data, Duration::from_secs(90));
    }
    a.stop_workers();
    assert_no_locks(&a.s.repo(), "after the asynchronous pushes");
    assert_repo_checks(&a.s, &a.s.repo(), false, "after the asynchronous pushes");
}

// ---------------------------------------------------------------------------------------------
// expire and copy

/// Replaces the random table's rows (new bytes the repository has not seen).
fn refill(c: &Cluster, rows: u32) {
    c.sql(&format!(
        "truncate r; insert into r select g, (select decode(string_agg(md5(random()::text || x), ''), 'hex') \
         from generate_series(1, 63 + 0 * g) x) from generate_series(1, {rows}) g"
    ))
    .unwrap();
}

/// Manifests of the sandbox repository's cluster `main`.
fn manifest_count(repo: &Path) -> usize {
    std::fs::read_dir(repo.join("backups/main"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with(".tmp-"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn expire_interrupted_while_removing_exits_130_and_leaves_only_whole_dumps_listed() {
    let c = Cluster::new().unwrap();
    random_table(&c, 1);
    let s = Sandbox::new();
    s.run_repo(
        &["repo", "init", "--no-encryption", "--pack-size", "4MiB"],
        &[],
    )
    .expect(0);
    let repo = s.repo();
    let repo_s = repo.to_str().unwrap().to_string();
    let pg = c.conninfo();
    let expire = [
        "--repo",
        &repo_s,
        "expire",
        "--kind",
        "dump",
        "--keep-last",
        "1",
        "--grace",
        "0",
    ];
    // Once while it removes manifests, once in its garbage collection after them.
    for (sig, in_gc) in [(Sig::Int, false), (Sig::Term, true)] {
        let what = format!("expire, SIG{sig:?}, in the garbage collection: {in_gc}");
        // Four dumps of different data (each ~12 MiB of its own packs); three to remove.
        for _ in 0..4 {
            refill(&c, 12_000);
            s.run_repo(&["dump", "--db", "postgres", "--pg", &pg], &[])
                .expect(0);
        }
        let before = listed(&s, &repo);
        let newest = before.last().unwrap().clone();
        let manifests = manifest_count(&repo);
        let mut run = spawn(&s, &expire, &[SLOW]);
        run.wait_until("removing", START_BOUND, || {
            let removed = manifests - manifest_count(&repo);
            !lock_files(&repo).is_empty() && if in_gc { removed == 3 } else { removed >= 1 }
        });
        if in_gc {
            // The manifests are gone; packs and index files are next.
            std::thread::sleep(Duration::from_millis(600));
        }
        run.interrupt(sig).expect_interrupted(&what);
        assert_no_locks(&repo, &what);
        assert_exclusive_lock_free(&s, &repo, &what);
        // What is listed is whole: a subset of before with the newest kept, all of it
        // readable.
        let after = listed(&s, &repo);
        assert!(after.iter().all(|id| before.contains(id)), "{what}");
        assert!(after.contains(&newest), "{what}: the newest dump is gone");
        assert!(
            after.len() < before.len(),
            "{what}: interrupted before any removal"
        );
        assert_repo_checks(&s, &repo, true, &what);
        // The rerun finishes the work.
        s.run(&expire, &[]).expect(0);
        assert_eq!(listed(&s, &repo), vec![newest.clone()], "{what}");
        assert_repo_checks(&s, &repo, false, &what);
    }
}

#[test]
fn copy_interrupted_mid_transfer_exits_130_frees_both_locks_and_the_rerun_completes() {
    let c = Cluster::new().unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    random_table(&c, 20_000);
    let s = Sandbox::new();
    s.run_repo(
        &["repo", "init", "--no-encryption", "--pack-size", "4MiB"],
        &[],
    )
    .expect(0);
    let repo = s.repo();
    let repo_s = repo.to_str().unwrap().to_string();
    let pg = c.conninfo();
    s.run(&with_repo(&backup_args(&c, "local"), &repo_s), &[])
        .expect(0);
    s.run_repo(&["dump", "--db", "postgres", "--pg", &pg], &[])
        .expect(0);
    let source_list = listed(&s, &repo);
    let second = s.path().join("second");
    let second_s = second.to_str().unwrap().to_string();
    s.run(
        &[
            "--repo",
            &second_s,
            "repo",
            "init",
            "--no-encryption",
            "--pack-size",
            "4MiB",
        ],
        &[],
    )
    .expect(0);
    let copy = ["--repo", &repo_s, "copy", "--to", &second_s, "--all"];
    for sig in SIGNALS {
        let what = format!("copy, SIG{sig:?}");
        let target_before = listed(&s, &second);
        let packs_before = interrupt::count_files(&second.join("packs"));
        // Both repositories are slowed down: a shorter latency does.
        let mut run = spawn(&s, &copy, &[(LATENCY_ENV, "150")]);
        run.wait_until("copying", START_BOUND, || {
            !lock_files(&repo).is_empty()
                && !lock_files(&second).is_empty()
                && interrupt::count_files(&second.join("packs")) > packs_before
        });
        run.interrupt(sig).expect_interrupted(&what);
        assert_no_locks(&repo, &format!("{what} (source)"));
        assert_no_locks(&second, &format!("{what} (target)"));
        assert_exclusive_lock_free(&s, &repo, &what);
        assert_exclusive_lock_free(&s, &second, &what);
        assert_eq!(listed(&s, &repo), source_list, "{what}: the source changed");
        // The target lists only whole copies, and checks clean.
        let after = listed(&s, &second);
        assert!(
            after.iter().all(|id| source_list.contains(id)) && after.len() < source_list.len(),
            "{what}: {after:?}"
        );
        assert!(after.len() >= target_before.len(), "{what}");
        assert_repo_checks(&s, &second, false, &what);
    }
    // The rerun completes the copy; everything reads back.
    let r = s.run(&copy, &[]).expect(0);
    assert!(
        r.stderr().is_empty() || !r.stderr().contains("stale"),
        "{}",
        r.stderr()
    );
    assert_eq!(listed(&s, &second), source_list);
    assert_no_locks(&repo, "after the rerun");
    assert_no_locks(&second, "after the rerun");
    assert_repo_checks(&s, &second, true, "the completed copy");
}
