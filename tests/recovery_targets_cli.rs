//! Recovery targets and target actions checked the way a user would: by starting the restored
//! server and reading it (issue 18, item 8), on clusters that archive through
//! `pgkeep archive-push` and hold a whole cluster's worth of objects (several databases, a
//! table in template1, roles with a password, a tablespace, relocated by every restore):
//!
//! - `--target-immediate`: the restored cluster is the backup's consistent point, pg_dumpall
//!   for pg_dumpall; rows committed after the backup (and archived) are absent;
//! - `--target-action pause`: the server stays up in recovery, replay paused at the target,
//!   the data (read on the hot standby) is the cluster at the target; resuming promotes it;
//! - `--target-action shutdown`: the server stops by itself at the target, pg_controldata says
//!   "shut down in recovery", recovery.signal is kept; started again with the action set to
//!   promote, it holds the cluster at the target;
//! - `--target-timeline current`: after a restore promoted onto timeline 2 (archiving into the
//!   same repository) a restore of the timeline-1 backup replays timeline 1 to its end and
//!   holds timeline 1's data; promoted, it forks from timeline 1 onto the next free timeline
//!   (3: timeline 2 is taken), while the default (`latest`) follows timeline 2.

mod cli_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use cli_support::{
    assert_same_cluster, populate_whole_cluster, start_archiving, Sandbox, WholeCluster,
};
use pgkeep_testing::Cluster;

/// Switches WAL and waits until PostgreSQL reports the switched segment (not a history or
/// partial file) archived; fails with the server log when archive_command fails.
fn switch_and_wait(c: &Cluster) {
    let seg = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let row = c
            .sql("SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver")
            .unwrap();
        let (archived, failed) = row.split_once('|').unwrap();
        assert_eq!(failed, "0", "archive_command failed:\n{}", c.log_tail());
        if archived.len() == 24 && archived >= seg.as_str() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{seg} not archived:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `pgkeep backup` of `c`; returns the backup id.
fn backup(s: &Sandbox, c: &Cluster) -> String {
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let conn = c.conninfo();
    s.run_repo(
        &["--json", "backup", "--pgdata", &pgdata, "--pg", &conn],
        &[],
    )
    .expect(0)
    .json()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `pgkeep restore ID --target-dir <sandbox>/NAME ARGS`, the tablespace relocated beside it;
/// returns the target directory.
fn restore(s: &Sandbox, whole: &WholeCluster, id: &str, name: &str, args: &[&str]) -> PathBuf {
    let dir = s.path().join(name);
    let map = whole.tablespace_map(&s.path().join(format!("{name}-ts")));
    let mut all = vec![
        "restore",
        id,
        "--target-dir",
        dir.to_str().unwrap(),
        "--tablespace-map",
        &map,
    ];
    all.extend_from_slice(args);
    s.run_repo(&all, &[]).expect(0);
    dir
}

fn builder() -> pgkeep_testing::cluster::ClusterBuilder {
    Cluster::builder().start_timeout(Duration::from_secs(180))
}

/// Rows of `marks` by phase, e.g. `after the backup|999`.
fn phases(c: &Cluster) -> String {
    c.sql("SELECT phase, count(*) FROM marks GROUP BY phase ORDER BY phase")
        .unwrap()
}

fn wait_for(c: &Cluster, what: &str, mut ok: impl FnMut() -> bool) {
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

/// pg_controldata's "Database cluster state" of a data directory.
fn cluster_state(c: &Cluster) -> String {
    let out = Command::new(c.bin_dir().join("pg_controldata"))
        .arg("-D")
        .arg(c.pgdata())
        .env("LC_ALL", "C")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_controldata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Database cluster state:"))
        .unwrap_or_else(|| panic!("no cluster state in pg_controldata:\n{text}"))
        .trim()
        .to_string()
}

#[test]
fn target_immediate_pause_and_shutdown_do_what_they_say_on_the_restored_server() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let whole = populate_whole_cluster(&c, &s);
    c.sql(
        "CREATE TABLE marks (n int PRIMARY KEY, phase text NOT NULL);
         INSERT INTO marks SELECT g, 'before the backup' FROM generate_series(1, 100) g;",
    )
    .unwrap();
    let id = backup(&s, &c);
    // Nothing wrote since the backup ended: this is the cluster at its consistent point.
    let at_backup = c.pg_dumpall().unwrap();
    c.sql("INSERT INTO marks SELECT g, 'after the backup' FROM generate_series(101, 1000) g")
        .unwrap();
    c.sql_db(
        "whole_shop",
        "UPDATE orders SET total = total + 1 WHERE id % 3 = 0",
    )
    .unwrap();
    c.sql("SELECT pg_create_restore_point('rt')").unwrap();
    let at_target = c.pg_dumpall().unwrap();
    c.sql("INSERT INTO marks SELECT g, 'after the target' FROM generate_series(1001, 2000) g")
        .unwrap();
    c.sql_db("whole_stats", "DELETE FROM measures WHERE k % 2 = 0")
        .unwrap();
    switch_and_wait(&c);

    // --target-immediate: the backup as it ended, though the archive holds much more.
    let d = restore(
        &s,
        &whole,
        &id,
        "immediate",
        &["--target-immediate", "--target-action", "promote"],
    );
    let r = builder().start_existing(&d).unwrap();
    r.wait_until_promoted(Duration::from_secs(120)).unwrap();
    assert_eq!(phases(&r), "before the backup|100");
    assert_same_cluster(&at_backup, &r);
    let log = std::fs::read_to_string(r.log_path()).unwrap();
    assert!(
        log.contains("recovery stopping after reaching consistency"),
        "{log}"
    );
    drop(r);

    // --target-action pause: up, in recovery, paused at the target; the data is the target's.
    let d = restore(
        &s,
        &whole,
        &id,
        "pause",
        &["--target-name", "rt", "--target-action", "pause"],
    );
    let r = builder().start_existing(&d).unwrap();
    let version: u32 = r.sql("SHOW server_version_num").unwrap().parse().unwrap();
    let paused_query = if version >= 14_00_00 {
        "SELECT pg_get_wal_replay_pause_state()"
    } else {
        "SELECT CASE WHEN pg_is_wal_replay_paused() THEN 'paused' ELSE 'not paused' END"
    };
    wait_for(&r, "replay is paused at the target", || {
        r.sql(paused_query).unwrap() == "paused"
    });
    assert_eq!(r.sql("SELECT pg_is_in_recovery()").unwrap(), "t");
    assert_eq!(r.sql("SELECT pg_is_wal_replay_paused()").unwrap(), "t");
    assert_eq!(
        phases(&r),
        "after the backup|900\nbefore the backup|100",
        "paused at the restore point"
    );
    assert_same_cluster(&at_target, &r);
    // Still paused after all that reading: nothing moved on.
    assert_eq!(r.sql(paused_query).unwrap(), "paused");
    // Resuming at the target ends recovery: promoted, with the target's data.
    r.sql("SELECT pg_wal_replay_resume()").unwrap();
    r.wait_until_promoted(Duration::from_secs(120)).unwrap();
    assert_same_cluster(&at_target, &r);
    drop(r);

    // --target-action shutdown: the server stops by itself at the target.
    let d = restore(
        &s,
        &whole,
        &id,
        "shutdown",
        &["--target-name", "rt", "--target-action", "shutdown"],
    );
    let mut r = builder().adopt_existing(&d).unwrap();
    // It may stop before it ever accepts a connection: start then reports its exit.
    if let Err(e) = r.start() {
        assert!(
            format!("{e:#}").contains("exited during start-up (exit status: 0)"),
            "{e:#}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while r.is_running() {
        assert!(
            Instant::now() < deadline,
            "the server did not stop at its target:\n{}",
            r.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(r.log_path()).unwrap();
    assert!(
        log.contains("recovery stopping at restore point \"rt\"")
            && log.contains("shutdown at recovery target"),
        "{log}"
    );
    assert_eq!(cluster_state(&r), "shut down in recovery");
    assert!(
        d.join("recovery.signal").exists(),
        "recovery.signal is kept for the next start"
    );
    // The user's next step: the action set to promote, started again.
    let auto = d.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap();
    text.push_str("recovery_target_action = 'promote'\n");
    std::fs::write(&auto, text).unwrap();
    // The server has exited; this only lets go of the handle.
    r.stop().unwrap();
    r.start().unwrap();
    r.wait_until_promoted(Duration::from_secs(120)).unwrap();
    assert_eq!(phases(&r), "after the backup|900\nbefore the backup|100");
    assert_same_cluster(&at_target, &r);
}

#[test]
fn target_timeline_current_stays_on_the_backups_timeline_after_a_promotion_made_timeline_2() {
    let s = Sandbox::shared();
    let a = start_archiving(&s);
    let whole = populate_whole_cluster(&a, &s);
    a.sql("CREATE TABLE marks (n int PRIMARY KEY, phase text NOT NULL)")
        .unwrap();
    let b1 = backup(&s, &a);
    a.sql("INSERT INTO marks SELECT g, 'timeline 1 before the fork' FROM generate_series(1, 300) g; SELECT pg_create_restore_point('fork');")
        .unwrap();
    a.sql(
        "INSERT INTO marks SELECT g, 'timeline 1 after the fork' FROM generate_series(301, 500) g",
    )
    .unwrap();
    switch_and_wait(&a);

    // A restore promoted at the fork becomes timeline 2 and archives into the same repository.
    let d2 = restore(
        &s,
        &whole,
        &b1,
        "tl2",
        &["--target-name", "fork", "--target-action", "promote"],
    );
    let command = a.sql("SHOW archive_command").unwrap();
    let c2 = builder()
        .archive_command(&command)
        .start_existing(&d2)
        .unwrap();
    c2.wait_until_promoted(Duration::from_secs(120)).unwrap();
    c2.sql("INSERT INTO marks SELECT g, 'timeline 2' FROM generate_series(301, 900) g")
        .unwrap();
    switch_and_wait(&c2);
    assert_eq!(
        c2.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
            .unwrap(),
        "00000002"
    );
    assert!(s
        .repo()
        .join("wal/main/0000000200000000/00000002.history")
        .exists());

    // Timeline 1 goes on too.
    a.sql("INSERT INTO marks SELECT g, 'timeline 1 later' FROM generate_series(501, 700) g")
        .unwrap();
    a.sql_db("whole_shop", "DELETE FROM orders WHERE id > 2900")
        .unwrap();
    switch_and_wait(&a);
    let want_tl1 = a.pg_dumpall().unwrap();

    // current: timeline 1 to the end of its archive, pg_dumpall for pg_dumpall.
    let d3 = restore(
        &s,
        &whole,
        &b1,
        "current",
        &["--target-timeline", "current", "--target-action", "promote"],
    );
    let r = builder().start_existing(&d3).unwrap();
    r.wait_until_promoted(Duration::from_secs(120)).unwrap();
    assert_eq!(
        phases(&r),
        "timeline 1 after the fork|200\ntimeline 1 before the fork|300\ntimeline 1 later|200"
    );
    assert_same_cluster(&want_tl1, &r);
    // Promoted from timeline 1 onto a new timeline; 2 is taken in the archive, so 3.
    r.sql("CHECKPOINT").unwrap();
    assert_eq!(
        r.sql("SELECT timeline_id FROM pg_control_checkpoint()")
            .unwrap(),
        "3"
    );
    let history = std::fs::read_to_string(d3.join("pg_wal/00000003.history")).unwrap();
    assert!(
        history.starts_with("1\t"),
        "timeline 3 must fork from timeline 1: {history}"
    );
    drop(r);

    // The control: without --target-timeline the restore follows timeline 2.
    let d4 = restore(&s, &whole, &b1, "latest", &["--target-action", "promote"]);
    let r = builder().start_existing(&d4).unwrap();
    r.wait_until_promoted(Duration::from_secs(120)).unwrap();
    assert_eq!(
        phases(&r),
        "timeline 1 before the fork|300\ntimeline 2|600",
        "the default target timeline is the latest"
    );
    drop(c2);
}
