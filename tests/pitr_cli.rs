//! Point-in-time recovery end to end with the real binary, on PostgreSQL 15 clusters that
//! archive through `pgkeep archive-push` (run by the server as `postgres`):
//!
//! - fidelity: a timestamped workload over several WAL segments, then a destructive statement;
//!   restores to the time, LSN and xid just before it and to a named restore point give the
//!   table row for row as it was (an encrypted repository: archive-push and the restored
//!   server's archive-get read the passphrase through `PGKEEP_PASSPHRASE_FILE`);
//! - `latest` with an xid or name target picks the backup that ends before the target;
//! - targets outside the reachable window are refused with exit 16 and the window in the
//!   target's terms: a time after the last archived commit, an unknown restore point, an xid
//!   that never ended, and anything past a segment deleted from the middle of the archive;
//! - timelines: restores promoted twice in a row (timelines 2 then 3) archive into the same
//!   repository; a restore of the timeline-1 backup with `--target-timeline 3` crosses both
//!   switches; a timeline that forked before a backup's end is refused with exit 15.

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cli_support::{
    amcheck_all, assert_same_cluster, populate_whole_cluster, switch_and_wait, Sandbox,
    WholeCluster,
};
use pgkeep_testing::cluster::{first_difference, running_as_root};
use pgkeep_testing::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");
const PASSPHRASE: &str = "pitr test passphrase 3b1f";

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

/// A sandbox with a repository the server user can write; encrypted when `encrypted`, with
/// the passphrase in a file only that user (and root) can read.
struct Setup {
    s: Sandbox,
    pass_file: PathBuf,
    encrypted: bool,
    /// Set by [`Setup::populate`]: every restore then relocates the tablespace.
    whole: Option<WholeCluster>,
}

impl Setup {
    fn new(encrypted: bool) -> Self {
        let s = Sandbox::new();
        let pass_file = s.path().join("passphrase");
        std::fs::write(&pass_file, format!("{PASSPHRASE}\n")).unwrap();
        std::fs::set_permissions(&pass_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_postgres(&pass_file);
        let st = Setup {
            s,
            pass_file,
            encrypted,
            whole: None,
        };
        if encrypted {
            st.run(&["repo", "init"]).expect(0);
        } else {
            st.run(&["repo", "init", "--no-encryption"]).expect(0);
        }
        std::fs::set_permissions(st.s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(
            st.s.path().join("empty.toml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        chown_postgres(&st.s.repo());
        st
    }

    /// Fills `c` with a whole cluster's objects (see `populate_whole_cluster`), whose
    /// tablespace every restore of this setup then relocates.
    fn populate(&mut self, c: &Cluster) {
        self.whole = Some(populate_whole_cluster(c, &self.s));
    }

    /// `--tablespace-map` to `<dir>-ts` when the cluster has the whole cluster's tablespace.
    fn ts_args(&self, dir: &Path) -> Vec<String> {
        match &self.whole {
            Some(w) => {
                let new = PathBuf::from(format!("{}-ts", dir.display()));
                vec!["--tablespace-map".into(), w.tablespace_map(&new)]
            }
            None => Vec::new(),
        }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        if self.encrypted {
            vec![("PGKEEP_PASSPHRASE_FILE", self.pass_file.to_str().unwrap())]
        } else {
            Vec::new()
        }
    }

    fn run(&self, args: &[&str]) -> cli_support::Run {
        self.s.run_repo(args, &self.env())
    }

    fn run_pg(&self, c: &Cluster, args: &[&str]) -> cli_support::Run {
        let conninfo = c.conninfo();
        let mut env = self.env();
        env.push(("PGKEEP_PG", conninfo.as_str()));
        self.s.run_repo(args, &env)
    }

    fn archive_command(&self) -> String {
        let pass = if self.encrypted {
            format!("PGKEEP_PASSPHRASE_FILE={} ", self.pass_file.display())
        } else {
            String::new()
        };
        format!(
            "{pass}{BIN} --config {} --repo {} archive-push %p",
            self.s.path().join("empty.toml").display(),
            self.s.repo().display()
        )
    }

    fn backup(&self, c: &Cluster) -> String {
        let pgdata = c.pgdata().to_str().unwrap().to_string();
        let b = self
            .run_pg(c, &["--json", "backup", "--pgdata", &pgdata])
            .expect(0)
            .json();
        b["id"].as_str().unwrap().to_string()
    }

    /// `restore ID --target-dir DIR ARGS --target-action promote`; returns the backup id the
    /// restore used.
    fn restore(&self, id: &str, dir: &Path, args: &[&str]) -> String {
        let ts = self.ts_args(dir);
        let mut all = vec![
            "--json",
            "restore",
            id,
            "--target-dir",
            dir.to_str().unwrap(),
        ];
        all.extend(ts.iter().map(String::as_str));
        all.extend_from_slice(args);
        all.extend_from_slice(&["--target-action", "promote"]);
        let r = self.run(&all).expect(0).json();
        r["id"].as_str().unwrap().to_string()
    }

    /// A restore that must be refused; returns stderr.
    fn refused(&self, code: i32, id: &str, args: &[&str]) -> String {
        let dir = self.s.path().join("refused");
        let ts = self.ts_args(&dir);
        let mut all = vec!["restore", id, "--target-dir", dir.to_str().unwrap()];
        all.extend(ts.iter().map(String::as_str));
        all.extend_from_slice(args);
        let r = self.run(&all).expect(code);
        assert!(!dir.exists(), "a refused restore wrote {}", dir.display());
        let ts_dir = self.s.path().join("refused-ts");
        assert!(
            !ts_dir.exists(),
            "a refused restore wrote {}",
            ts_dir.display()
        );
        r.stderr()
    }
}

/// Starts a restored data directory and waits until recovery reached its target and the
/// server was promoted.
fn start_promoted(dir: &Path, archive_command: Option<&str>) -> Cluster {
    let mut b = Cluster::builder().start_timeout(Duration::from_secs(180));
    if let Some(a) = archive_command {
        b = b.archive_command(a);
    }
    let c = b.start_existing(dir).unwrap();
    c.wait_until_promoted(Duration::from_secs(120)).unwrap();
    c
}

/// The table row for row: id, insertion time and the payload's hash, in id order.
fn rows(c: &Cluster) -> String {
    c.sql("SELECT id, at, md5(payload) FROM events ORDER BY id")
        .unwrap()
}

fn assert_same_rows(what: &str, want: &str, got: &str) {
    if let Some(d) = first_difference(want, got) {
        panic!(
            "{what}: restored rows differ ({} vs {} rows): {d}",
            want.lines().count(),
            got.lines().count()
        );
    }
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn pitr_fidelity_latest_selection_and_unreachable_targets_in_an_encrypted_repository() {
    let mut st = Setup::new(true);
    let c = Cluster::builder()
        .archive_command(&st.archive_command())
        .start()
        .unwrap();
    st.populate(&c);
    // Ids without a sequence: a recovered sequence stands up to 32 values further on than
    // its source's, and the whole-cluster dumps would differ for that alone.
    c.sql(
        "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), payload text NOT NULL);
         CREATE TABLE audit (note text); INSERT INTO audit VALUES ('kept');",
    )
    .unwrap();
    let b1 = st.backup(&c);

    // A timestamped workload over several seconds and WAL segments: each round a bulk
    // transaction and single-row ones, a pause, a WAL switch.
    let mut round_segments = Vec::new();
    for round in 0..5 {
        let base = round * 10_000;
        c.sql(&format!(
            "INSERT INTO events (id, payload) SELECT {base} + g, repeat(md5(g::text || '{round}'), 24) FROM generate_series(1, 3000) g;
             INSERT INTO events (id, payload) VALUES ({base} + 3001, 'single a {round}');
             INSERT INTO events (id, payload) VALUES ({base} + 3002, 'single b {round}');"
        ))
        .unwrap();
        std::thread::sleep(Duration::from_millis(400));
        round_segments.push(switch_and_wait(&c));
    }
    let xid = c
        .sql("BEGIN; INSERT INTO events (id, payload) VALUES (99999, 'last before the drop'); SELECT txid_current(); COMMIT;")
        .unwrap();
    let time = c.sql("SELECT clock_timestamp()").unwrap();
    let want = rows(&c);
    let want_all = c.pg_dumpall().unwrap();
    assert!(want.lines().count() > 15_000);
    // Commits after the target time must be clearly later than it.
    std::thread::sleep(Duration::from_millis(1100));
    c.sql("SELECT pg_create_restore_point('before_drop')")
        .unwrap();
    let lsn = c.sql("SELECT pg_current_wal_insert_lsn()").unwrap();
    c.sql("DELETE FROM events WHERE id % 2 = 0; DROP TABLE audit;")
        .unwrap();
    // A second backup after the destruction, and commits after it.
    let b2 = st.backup(&c);
    c.sql("INSERT INTO events (id, payload) SELECT 100000 + g, 'after' FROM generate_series(1, 100) g")
        .unwrap();
    switch_and_wait(&c);

    // Time, LSN, xid and name just before the destruction: the table as it was, row for row,
    // the dropped table back, and the whole cluster (every database, roles, the tablespace)
    // as it was then. `latest` picks the first backup: the second ends after.
    for (flag, value, dir) in [
        ("--target-time", time.as_str(), "pitr-time"),
        ("--target-lsn", lsn.as_str(), "pitr-lsn"),
        ("--target-xid", xid.as_str(), "pitr-xid"),
        ("--target-name", "before_drop", "pitr-name"),
    ] {
        let d = st.s.path().join(dir);
        let used = st.restore("latest", &d, &[flag, value]);
        assert_eq!(
            used, b1,
            "{flag} {value}: latest must pick the backup ending before it"
        );
        let r = start_promoted(&d, None);
        assert_same_rows(&format!("{flag} {value}"), &want, &rows(&r));
        assert_eq!(r.sql("SELECT note FROM audit").unwrap(), "kept", "{flag}");
        assert_same_cluster(&want_all, &r);
    }

    // Nothing of the WAL or its summaries is readable in the encrypted repository.
    let files = files_under(&st.s.repo());
    assert!(
        files
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".summary")),
        "no segment summary stored"
    );
    for p in &files {
        let data = std::fs::read(p).unwrap();
        assert!(
            !data.windows(11).any(|w| w == b"before_drop"),
            "{} holds a restore point name in plaintext",
            p.display()
        );
    }

    // Outside the window: exit 16, the window in the target's terms, nothing written.
    let future = c
        .sql("SELECT clock_timestamp() + interval '1 hour'")
        .unwrap();
    let e = st.refused(16, "latest", &["--target-time", &future]);
    assert!(
        e.contains("after the last transaction end") && e.contains("reachable from this backup: "),
        "{e}"
    );
    assert!(e.contains(&b2), "{e}");
    let e = st.refused(16, &b1, &["--target-name", "no_such_point"]);
    assert!(
        e.contains("no restore point named \"no_such_point\""),
        "{e}"
    );
    assert!(
        e.contains("\"before_drop\" at "),
        "the window's restore points: {e}"
    );
    st.refused(16, "latest", &["--target-name", "no_such_point"]);
    let e = st.refused(16, "latest", &["--target-xid", "3999999999"]);
    assert!(
        e.contains("transaction 3999999999 did not commit or abort"),
        "{e}"
    );
    assert!(e.contains("transactions ended there, xids "), "{e}");
    // The second backup ends after the restore point and the transaction.
    let e = st.refused(16, &b2, &["--target-name", "before_drop"]);
    assert!(e.contains(&b2), "{e}");
    st.refused(16, &b2, &["--target-xid", &xid]);
    st.refused(16, &b2, &["--target-time", &time]);

    // A segment deleted from the middle of the archive: targets past it are unreachable.
    let victim = &round_segments[2];
    let key =
        st.s.repo()
            .join("wal/main")
            .join(&victim[..16])
            .join(victim);
    std::fs::remove_file(&key).unwrap();
    for (flag, value) in [
        ("--target-time", time.as_str()),
        ("--target-lsn", lsn.as_str()),
        ("--target-xid", xid.as_str()),
        ("--target-name", "before_drop"),
    ] {
        let e = st.refused(16, &b1, &[flag, value]);
        assert!(
            e.contains(&format!("cut short by the missing segment {victim}")),
            "{flag}: {e}"
        );
    }
}

fn timeline_of(c: &Cluster) -> String {
    c.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        .unwrap()
}

#[test]
fn timelines_restored_twice_in_a_row_are_followed_and_a_fork_before_the_backup_is_refused() {
    let mut st = Setup::new(false);
    let a = Cluster::builder()
        .archive_command(&st.archive_command())
        .start()
        .unwrap();
    st.populate(&a);
    // No sequence: see the fidelity test.
    a.sql("CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), payload text NOT NULL)")
        .unwrap();
    let b1 = st.backup(&a);
    a.sql("INSERT INTO events (id, payload) SELECT g, 'timeline 1 ' || g FROM generate_series(1, 500) g")
        .unwrap();
    a.sql("SELECT pg_create_restore_point('p1')").unwrap();
    // The original cluster goes on writing on timeline 1 after p1.
    a.sql("INSERT INTO events (id, payload) SELECT 1000 + g, 'timeline 1 after p1 ' || g FROM generate_series(1, 300) g")
        .unwrap();
    switch_and_wait(&a);

    // First restore, promoted onto timeline 2, archiving into the same repository.
    let d2 = st.s.path().join("tl2");
    st.restore(&b1, &d2, &["--target-name", "p1"]);
    let c2 = start_promoted(&d2, Some(&st.archive_command()));
    assert_eq!(timeline_of(&c2), "00000002");
    c2.sql("INSERT INTO events (id, payload) SELECT 2000 + g, 'timeline 2 ' || g FROM generate_series(1, 400) g")
        .unwrap();
    c2.sql("SELECT pg_create_restore_point('p2')").unwrap();
    let want2 = rows(&c2);
    let want2_all = c2.pg_dumpall().unwrap();
    switch_and_wait(&c2);

    // Second restore of the same timeline-1 backup: the latest timeline is 2, where p2 is;
    // promoted, it becomes timeline 3 and archives too.
    let d3 = st.s.path().join("tl3");
    st.restore(&b1, &d3, &["--target-name", "p2"]);
    let c3 = start_promoted(&d3, Some(&st.archive_command()));
    assert_eq!(timeline_of(&c3), "00000003");
    assert_same_rows("p2 via timeline 2", &want2, &rows(&c3));
    assert_same_cluster(&want2_all, &c3);
    c3.sql("INSERT INTO events (id, payload) SELECT 3000 + g, 'timeline 3 ' || g FROM generate_series(1, 300) g")
        .unwrap();
    c3.sql("SELECT pg_create_restore_point('p3')").unwrap();
    let want3 = rows(&c3);
    let want3_all = c3.pg_dumpall().unwrap();
    switch_and_wait(&c3);
    drop(c2);
    assert!(st
        .s
        .repo()
        .join("wal/main/0000000300000000/00000003.history")
        .exists());

    // From the timeline-1 backup across both switches to a point on timeline 3.
    let d4 = st.s.path().join("tl3-again");
    let used = st.restore(
        "latest",
        &d4,
        &["--target-timeline", "3", "--target-name", "p3"],
    );
    assert_eq!(used, b1);
    let c4 = start_promoted(&d4, None);
    assert_same_rows("p3 via timelines 2 and 3", &want3, &rows(&c4));
    assert_same_cluster(&want3_all, &c4);
    drop(c4);

    // A backup of the original cluster, still on timeline 1 after the fork at p1: timelines
    // 2 and 3 forked before its end. Refused with exit 15 and the hint, explicitly or as the
    // latest timeline; `current` stays on timeline 1.
    let late = st.backup(&a);
    let e = st.refused(
        15,
        &late,
        &["--target-timeline", "2", "--target-name", "p2"],
    );
    assert!(
        e.contains("target timeline 2 forked from timeline 1 at")
            && e.contains(&format!("before the end of backup {late}"))
            && e.contains("HINT: was timeline 2 created by promoting"),
        "{e}"
    );
    // No target: recovery to the end of the latest timeline.
    let e = st.refused(15, &late, &["--target-action", "promote"]);
    assert!(
        e.contains("target timeline 3 forked from timeline 1"),
        "{e}"
    );
    st.refused(15, "latest", &["--target-name", "p3"]);
    // With the timeline named, `latest` passes over the backup that cannot reach it.
    let d5 = st.s.path().join("tl3-latest");
    let used = st.restore(
        "latest",
        &d5,
        &["--target-timeline", "3", "--target-name", "p3"],
    );
    assert_eq!(used, b1);
    let d6 = st.s.path().join("tl1-current");
    restore_run(&st, &late, &d6, &["--target-timeline", "current"]).expect(0);
    // A timeline with no history file in the archive is unreachable.
    st.refused(16, &b1, &["--target-timeline", "9"]);
}

/// TPC-B's invariant: every balance change is in the history, so the four sums agree.
fn assert_tpcb_invariant(what: &str, c: &Cluster) {
    let sums = c
        .sql(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || \
                    (SELECT sum(bbalance) FROM pgbench_branches) || ' ' || \
                    (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || \
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
        )
        .unwrap();
    let v: Vec<&str> = sums.split(' ').collect();
    assert!(
        v.len() == 4 && v.iter().all(|s| *s == v[0]),
        "{what}: balances disagree: {sums}"
    );
    let n = c.sql("SELECT count(*) FROM pgbench_history").unwrap();
    assert_ne!(n, "0", "{what}: no pgbench transaction was restored");
}

/// `restore ARGS` on the sandbox's repository, as the test's user.
fn restore_run(st: &Setup, id: &str, dir: &Path, args: &[&str]) -> cli_support::Run {
    let ts = st.ts_args(dir);
    let mut all = vec!["restore", id, "--target-dir", dir.to_str().unwrap()];
    all.extend(ts.iter().map(String::as_str));
    all.extend_from_slice(args);
    st.run(&all)
}

fn pgbench(c: &Cluster, transactions: &str) {
    c.pgbench(&["-n", "-c", "2", "-t", transactions]).unwrap();
}

#[test]
fn restore_without_target_replays_to_the_end_of_the_archive_after_a_crash() {
    let mut st = Setup::new(false);
    let mut c = Cluster::builder()
        .archive_command(&st.archive_command())
        .start()
        .unwrap();
    st.populate(&c);
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    st.backup(&c);
    pgbench(&c, "400");
    c.sql("SELECT pg_create_restore_point('mid')").unwrap();
    pgbench(&c, "400");
    let last = switch_and_wait(&c);
    let last_commit = c.sql("SELECT max(mtime) FROM pgbench_history").unwrap();
    // A crash: WAL written after the switch (none of it data) never reaches the archive.
    c.stop_mode(pgkeep_testing::cluster::StopMode::Immediate)
        .unwrap();

    // The plan first: nothing written, the end of the archive named.
    let d = st.s.path().join("dr");
    let plan = restore_run(&st, "latest", &d, &["--json", "--dry-run"])
        .expect(0)
        .json();
    assert!(!d.exists(), "--dry-run created the target directory");
    let p = &plan["plan"];
    assert_eq!(p["recovery"]["kind"], "end_of_archive", "{plan}");
    assert_eq!(p["recovery"]["archive_end"]["last_segment"], last.as_str());
    assert_eq!(p["recovery"]["archive_complete"], true);
    assert!(
        p["recovery"]["archive_end"]["last_xact_time"].is_string(),
        "{plan}"
    );
    assert!(
        p["estimate"]["secs"].is_null(),
        "an estimate without any restore: {plan}"
    );
    assert!(p["bytes_to_write"].as_u64().unwrap() > 10 << 20, "{plan}");
    assert!(p["space"][0]["fits"].as_bool().unwrap());

    // No target: to the end of the archive, said before writing.
    let r = restore_run(&st, "latest", &d, &[]).expect(0);
    assert!(
        r.stderr()
            .contains(&format!("last archived segment {last}")),
        "{}",
        r.stderr()
    );
    assert!(
        r.stdout().contains("recovery: recovery ends at"),
        "{}",
        r.stdout()
    );
    assert!(d.join("recovery.signal").exists());
    let auto = std::fs::read_to_string(d.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("restore_command = '") && !auto.contains("recovery_target"),
        "{auto}"
    );
    let copy = start_promoted(&d, None);
    assert_tpcb_invariant("restored copy", &copy);
    // The last pgbench transaction is there: nothing archived was left out.
    assert_eq!(
        copy.sql("SELECT max(mtime) FROM pgbench_history").unwrap(),
        last_commit
    );

    // The crashed primary after its own crash recovery holds exactly the same, in every
    // database; and the replayed copy is intact page by page.
    c.start().unwrap();
    assert_tpcb_invariant("crashed primary", &c);
    assert_same_cluster(&c.pg_dumpall().unwrap(), &copy);
    amcheck_all(&copy);
    drop(copy);

    // The restore recorded its speed: the next plan has an estimate.
    let plan = restore_run(
        &st,
        "latest",
        &st.s.path().join("dr2"),
        &["--json", "--dry-run", "--target-immediate"],
    )
    .expect(0)
    .json();
    assert!(
        plan["plan"]["estimate"]["secs"].as_f64().unwrap() > 0.0,
        "{plan}"
    );
    assert_eq!(plan["plan"]["recovery"]["kind"], "backup_end");
}

#[test]
fn restore_without_target_stops_at_a_gap_in_the_archive_and_says_so() {
    let mut st = Setup::new(false);
    let c = Cluster::builder()
        .archive_command(&st.archive_command())
        .start()
        .unwrap();
    st.populate(&c);
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    let b = st.backup(&c);
    pgbench(&c, "300");
    let before_gap = switch_and_wait(&c);
    let want = c.pg_dumpall().unwrap();
    pgbench(&c, "300");
    let victim = switch_and_wait(&c);
    pgbench(&c, "300");
    let newest = switch_and_wait(&c);
    std::fs::remove_file(
        st.s.repo()
            .join("wal/main")
            .join(&victim[..16])
            .join(&victim),
    )
    .unwrap();

    // The plan says it: a gap, not the end, exit 3; --force accepts it.
    let d = st.s.path().join("gap");
    let r = restore_run(&st, "latest", &d, &["--dry-run"]).expect(3);
    assert!(!d.exists());
    let out = r.stdout();
    assert!(
        out.contains(&format!("segment {victim} is missing"))
            && out.contains("GAP")
            && out.contains(&format!("last archived segment {before_gap}"))
            && out.contains(&format!("goes on to {newest}")),
        "{out}"
    );
    restore_run(&st, "latest", &d, &["--dry-run", "--force"]).expect(0);
    assert!(!d.exists());

    // The restore stops at the gap: the primary as it was when the segment before it was
    // switched, and exit 3.
    let r = restore_run(&st, &b, &d, &[]).expect(3);
    assert!(
        r.stderr()
            .contains("WARNING: the archive has a gap after backup"),
        "{}",
        r.stderr()
    );
    let copy = start_promoted(&d, None);
    assert_tpcb_invariant("restored to the gap", &copy);
    assert_same_cluster(&want, &copy);
    drop(copy);

    // An explicit target past the gap stays a refusal (exit 16), before anything is written.
    let lsn = c.sql("SELECT pg_current_wal_lsn()").unwrap();
    st.refused(16, &b, &["--target-lsn", &lsn]);
}

/// Waits until `standby` has replayed everything `primary` has written so far.
fn wait_replayed(primary: &Cluster, standby: &Cluster) {
    let lsn = primary.sql("SELECT pg_current_wal_lsn()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = standby
            .sql(&format!(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= '{lsn}', false)"
            ))
            .unwrap();
        if done == "t" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "standby did not replay up to {lsn}; log:\n{}",
            standby.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_standby_restored_with_standby_follows_its_primary_by_archive_and_streaming() {
    let mut st = Setup::new(true);
    let mut c = Cluster::builder()
        .archive_command(&st.archive_command())
        .start()
        .unwrap();
    st.populate(&c);
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    st.backup(&c);
    // WAL after the backup that only the archive has for the standby at its start.
    pgbench(&c, "300");
    switch_and_wait(&c);

    let conninfo = format!(
        "host={} port={} user=postgres application_name=pgkeep_standby",
        c.socket_dir().display(),
        c.port()
    );
    // Refusals first: a password, a conninfo without --standby, a standby with a target.
    let d = st.s.path().join("standby");
    let e = restore_run(
        &st,
        "latest",
        &d,
        &["--standby", "--primary-conninfo", "host=x password=hunter2"],
    )
    .expect(2)
    .stderr();
    assert!(
        e.contains("--primary-conninfo") && !e.contains("hunter2"),
        "{e}"
    );
    restore_run(&st, "latest", &d, &["--primary-conninfo", &conninfo]).expect(2);
    restore_run(&st, "latest", &d, &["--standby", "--target-immediate"]).expect(2);
    assert!(!d.exists());

    restore_run(
        &st,
        "latest",
        &d,
        &["--standby", "--primary-conninfo", &conninfo],
    )
    .expect(0);
    assert!(d.join("standby.signal").exists() && !d.join("recovery.signal").exists());
    let auto = std::fs::read_to_string(d.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("primary_conninfo = 'host=") && auto.contains("restore_command = '"),
        "{auto}"
    );
    let standby = Cluster::builder()
        .start_timeout(Duration::from_secs(180))
        .start_existing(&d)
        .unwrap();
    // Started from the archive …
    wait_replayed(&c, &standby);
    let log = std::fs::read_to_string(standby.log_path()).unwrap();
    assert!(
        log.contains("restored log file"),
        "not from the archive:\n{log}"
    );
    // … then streaming what the primary writes.
    pgbench(&c, "300");
    wait_replayed(&c, &standby);
    assert_eq!(
        standby
            .sql("SELECT status FROM pg_stat_wal_receiver")
            .unwrap(),
        "streaming"
    );
    assert_eq!(
        c.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pgkeep_standby'")
            .unwrap(),
        "1"
    );
    let want = c.pg_dumpall().unwrap();
    c.stop().unwrap();
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()").unwrap(), "t");
    assert_tpcb_invariant("standby", &standby);
    assert_same_cluster(&want, &standby);
}

/// Unmounts a test's tmpfs, whatever happens.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn dry_run_writes_nothing_and_a_restore_that_does_not_fit_is_refused_up_front() {
    if !pgkeep_testing::cluster::require_root("mounting a tmpfs") {
        return;
    }
    let st = Setup::new(false);
    // No archiving: the backup restores as it ended, with a note.
    let c = Cluster::builder().start().unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    st.backup(&c);

    let small = st.s.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st_mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st_mount.success(), "mount -t tmpfs failed");
    let _mounted = Mounted(small.clone());

    let d = small.join("dr");
    for args in [&["--dry-run"][..], &[]] {
        let r = restore_run(&st, "latest", &d, args).expect(1);
        let e = r.stderr();
        assert!(
            e.contains("not enough space to restore backup")
                && e.contains(&format!("{} needs ", d.display()))
                && e.contains(" free"),
            "{args:?}: {e}"
        );
        assert!(!d.exists(), "{args:?} wrote into the small file system");
    }
    // The dry run's JSON says the same, with both figures.
    let r = st.run(&[
        "--json",
        "restore",
        "latest",
        "--target-dir",
        d.to_str().unwrap(),
        "--dry-run",
    ]);
    assert_eq!(r.code(), 1);
    let plan = r.json();
    let space = &plan["plan"]["space"][0];
    assert_eq!(space["fits"], false);
    assert!(space["needed"].as_u64().unwrap() > space["free"].as_u64().unwrap());
    assert!(space["free"].as_u64().unwrap() <= 8 << 20);

    // Where it fits: the plan, nothing written, no estimate yet.
    let big = st.s.path().join("big");
    let r = restore_run(&st, "latest", &big, &["--dry-run"]).expect(0);
    assert!(!big.exists());
    let out = r.stdout();
    assert!(
        out.contains("nothing written (dry run)")
            && out.contains("no estimate")
            && out.contains("the archive holds no WAL after backup"),
        "{out}"
    );
    let r = restore_run(&st, "latest", &big, &[]).expect(0);
    assert!(r.stdout().contains("the archive holds no WAL after backup"));
    assert!(!big.join("recovery.signal").exists());
    // A delta plan over that restore: nothing expected to differ until a file changes.
    let plan = st
        .run(&[
            "--json",
            "restore",
            "latest",
            "--target-dir",
            big.to_str().unwrap(),
            "--delta",
            "--dry-run",
        ])
        .expect(0)
        .json();
    assert_eq!(
        plan["plan"]["delta"]["files_expected_to_differ"], 0,
        "{plan}"
    );
    assert!(
        plan["plan"]["estimate"]["secs"].as_f64().is_some(),
        "{plan}"
    );
    std::fs::write(big.join("PG_VERSION"), "15\n").unwrap();
    let plan = st
        .run(&[
            "--json",
            "restore",
            "latest",
            "--target-dir",
            big.to_str().unwrap(),
            "--delta",
            "--dry-run",
        ])
        .expect(0)
        .json();
    assert_eq!(
        plan["plan"]["delta"]["files_expected_to_differ"], 1,
        "{plan}"
    );
}
