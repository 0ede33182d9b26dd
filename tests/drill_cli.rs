//! `pgkeep drill` through the built binary, on a real cluster that archives into the
//! repository:
//! - a drill of a backup taken under load replays the archive to its end on a throwaway
//!   server and passes every check (amcheck or a full read, assertions), reports the
//!   recovery time split into restore, replay and checks, leaves no scratch directory and no
//!   server, pushes nothing into the production archive, and lands in the run history where
//!   `check`, `status` and `metrics` see it;
//! - an assertion that does not hold fails the drill with exit 1 and names it;
//! - PITR drills to a time and to a restore point stop there;
//! - a dump drill restores into a scratch database, compares rows, validates foreign keys,
//!   and drops it;
//! - a flipped byte in a pack the backup uses fails the drill with exit 13;
//! - a drill stopped by SIGTERM mid-way exits 130 and leaves no server and no scratch
//!   directory.

mod cli_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{start_archiving, switch_and_wait, Sandbox};

fn config(s: &Sandbox, name: &str, text: &str) -> String {
    let p = s.path().join(name);
    std::fs::write(&p, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p.display().to_string()
}

/// The scratch parent of the sandbox (traversable by the server user).
fn scratch_parent(s: &Sandbox) -> PathBuf {
    let p = s.path().join("scratch");
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn leftovers(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes whose command line mentions `needle` (a server left on a scratch directory).
fn processes_with(needle: &str) -> Vec<String> {
    let out = Command::new("ps")
        .args(["-eo", "pid,args"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(needle) && !l.contains("ps -eo"))
        .map(str::to_string)
        .collect()
}

fn check_named<'a>(j: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
}

fn archived_count(c: &pgkeep_testing::Cluster) -> String {
    c.sql("SELECT archived_count FROM pg_stat_archiver")
        .unwrap()
}

fn wal_listing(s: &Sandbox) -> Vec<String> {
    let mut v: Vec<String> = cli_support::listing(&s.repo().join("wal"))
        .into_keys()
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_drill_of_a_backup_under_load_replays_the_archive_and_passes_every_check() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    c.sql("CREATE DATABASE app").unwrap();
    c.sql_db(
        "app",
        "CREATE TABLE orders (id int PRIMARY KEY, note text); \
         INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 20000) g; \
         CREATE INDEX ON orders (note)",
    )
    .unwrap();
    let conn = c.conninfo();
    let env = [("PGKEEP_PG", conn.as_str())];
    // Writes while the backup runs, then more after it: the drill must replay them.
    let writer = {
        let conn_app = c.conninfo_db("app");
        std::thread::spawn(move || {
            for i in 0..40 {
                let st = Command::new("psql")
                    .args([&conn_app, "-qAtc"])
                    .arg(format!(
                        "INSERT INTO orders SELECT g, 'load' FROM generate_series({}, {}) g",
                        100_000 + i * 500,
                        100_000 + i * 500 + 499
                    ))
                    .status()
                    .unwrap();
                assert!(st.success());
            }
        })
    };
    s.run_repo(&["backup"], &env).expect(0);
    writer.join().unwrap();
    c.sql_db(
        "app",
        "INSERT INTO orders VALUES (999999, 'after the backup')",
    )
    .unwrap();
    switch_and_wait(&c);
    let rows = c.sql_db("app", "SELECT count(*) FROM orders").unwrap();

    let parent = scratch_parent(&s);
    let cfg = config(
        &s,
        "drill.toml",
        &format!(
            "[drill]\nscratch_dir = \"{}\"\n\n\
             [[drill.assert]]\nname = \"orders restored\"\ndatabase = \"app\"\n\
             query = \"SELECT count(*) FROM orders\"\nexpected = {rows}\n\n\
             [[drill.assert]]\ndatabase = \"app\"\n\
             query = \"SELECT count(*) > 0 FROM orders WHERE note = 'after the backup'\"\nexpected = true\n",
            parent.display()
        ),
    );
    let archived_before = archived_count(&c);
    let wal_before = wal_listing(&s);

    let j = s
        .run_repo(&["--config", &cfg, "--json", "drill"], &env)
        .expect(0)
        .json();
    assert_eq!(j["result"], "ok", "{j:#}");
    assert_eq!(j["kind"], "physical");
    for phase in ["restore_secs", "replay_secs", "check_secs"] {
        assert!(j[phase].as_f64().unwrap() > 0.0, "{phase}: {j:#}");
    }
    let rto = j["rto_secs"].as_f64().unwrap();
    let sum = j["restore_secs"].as_f64().unwrap()
        + j["replay_secs"].as_f64().unwrap()
        + j["check_secs"].as_f64().unwrap();
    assert!((rto - sum).abs() < 0.01, "{j:#}");
    assert!(j["wal_bytes_replayed"].as_u64().unwrap() > 1 << 20, "{j:#}");
    assert!(j["wal_segments_restored"].as_u64().unwrap() >= 1, "{j:#}");
    for name in ["recovery", "wal_end", "connect:app", "connect:postgres"] {
        let check = check_named(&j, name).unwrap_or_else(|| panic!("no {name}: {j:#}"));
        assert_eq!(check["status"], "ok", "{check}");
    }
    // amcheck where installed, else a full read of each database.
    let amcheck = check_named(&j, "amcheck");
    let read = check_named(&j, "read:app");
    assert!(
        amcheck.is_some_and(|c| c["status"] == "ok") || read.is_some_and(|c| c["status"] == "ok"),
        "{j:#}"
    );
    assert_eq!(
        check_named(&j, "assert:orders restored").unwrap()["status"],
        "ok"
    );

    // Nothing left behind, nothing pushed into the production archive.
    assert_eq!(leftovers(&parent), Vec::<String>::new());
    assert_eq!(
        processes_with(parent.to_str().unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(archived_count(&c), archived_before);
    assert_eq!(wal_listing(&s), wal_before);

    // The run history, check, status and metrics know it.
    let h = s.run_repo(&["--json", "history"], &[]).expect(0).json();
    let drill = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|r| r["kind"] == "drill")
        .unwrap_or_else(|| panic!("{h:#}"))
        .clone();
    assert_eq!(drill["result"], "ok", "{drill}");
    assert!(drill["rto_secs"].as_f64().unwrap() > 0.0, "{drill}");
    assert!(
        drill["detail"].as_str().unwrap().contains("checks passed"),
        "{drill}"
    );
    let chk = s
        .run_repo(
            &["--json", "check"],
            &[
                ("PGKEEP_PG", conn.as_str()),
                ("PGKEEP_HEALTH_DRILL_MAX_AGE", "1d"),
            ],
        )
        .json();
    let item = chk["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "drill")
        .unwrap_or_else(|| panic!("{chk:#}"))
        .clone();
    assert_eq!(item["status"], "ok", "{item}");
    assert!(
        item["message"].as_str().unwrap().contains("recovery time"),
        "{item}"
    );
    let st = s.run_repo(&["status"], &env).expect(0).stdout();
    assert!(
        st.contains("last drill") && st.contains("recovery time"),
        "{st}"
    );
    let m = s.run_repo(&["metrics"], &env).expect(0).stdout();
    assert!(m.contains("pgkeep_drill_rto_seconds"), "{m}");

    // An assertion that does not hold fails with exit 1 and is named.
    let bad = config(
        &s,
        "bad.toml",
        &format!(
            "[drill]\nscratch_dir = \"{}\"\n\n[[drill.assert]]\nname = \"no orders lost\"\n\
             database = \"app\"\nquery = \"SELECT count(*) FROM orders\"\nexpected = 1\n",
            parent.display()
        ),
    );
    let r = s.run_repo(&["--config", &bad, "drill"], &env).expect(1);
    assert!(
        r.stdout().contains("FAILED   assert:no orders lost"),
        "{}",
        r.stdout()
    );
    assert!(
        r.stderr().contains("drill of ") && r.stderr().contains("failed: assert:no orders lost"),
        "{}",
        r.stderr()
    );
    assert_eq!(leftovers(&parent), Vec::<String>::new());
    let h = s.run_repo(&["--json", "history"], &[]).expect(0).json();
    let last = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|r| r["kind"] == "drill")
        .unwrap()
        .clone();
    assert_eq!(last["result"], "failed", "{last}");
    assert_eq!(last["exit_code"], 1, "{last}");
}

#[test]
fn drills_to_a_time_and_to_a_restore_point_stop_there() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let conn = c.conninfo();
    let env = [("PGKEEP_PG", conn.as_str())];
    c.sql("CREATE TABLE t (id int, at timestamptz DEFAULT clock_timestamp())")
        .unwrap();
    s.run_repo(&["backup"], &env).expect(0);
    c.sql("INSERT INTO t (id) VALUES (1)").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let target = c.sql("SELECT clock_timestamp()").unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    c.sql("INSERT INTO t (id) VALUES (2)").unwrap();
    c.sql("SELECT pg_create_restore_point('before_three')")
        .unwrap();
    c.sql("INSERT INTO t (id) VALUES (3)").unwrap();
    switch_and_wait(&c);

    let parent = scratch_parent(&s);
    let cfg = config(
        &s,
        "drill.toml",
        &format!(
            "[drill]\nscratch_dir = \"{}\"\n\n\
             [[drill.assert]]\nname = \"rows\"\ndatabase = \"postgres\"\n\
             query = \"SELECT string_agg(id::text, ',' ORDER BY id) FROM t\"\nexpected = \"1\"\n",
            parent.display()
        ),
    );
    let j = s
        .run_repo(
            &[
                "--config",
                &cfg,
                "--json",
                "drill",
                "--target-time",
                &target,
            ],
            &env,
        )
        .expect(0)
        .json();
    assert_eq!(
        check_named(&j, "target_time").unwrap()["status"],
        "ok",
        "{j:#}"
    );
    assert_eq!(
        check_named(&j, "assert:rows").unwrap()["status"],
        "ok",
        "{j:#}"
    );
    let last = j["last_transaction_time"].as_str().unwrap();
    assert!(!last.is_empty(), "{j:#}");
    // The drill's restore recorded its speed: a restore plan now has an estimate.
    let dry = s.path().join("dry-run-target");
    let plan = s
        .run_repo(
            &[
                "--json",
                "restore",
                "latest",
                "--dry-run",
                "--target-dir",
                dry.to_str().unwrap(),
            ],
            &[],
        )
        .expect(0)
        .json();
    assert!(
        plan["plan"]["estimate"]["secs"].as_f64().unwrap_or(0.0) > 0.0,
        "no estimate after a drill: {plan}"
    );

    let cfg2 = config(
        &s,
        "drill2.toml",
        &format!(
            "[drill]\nscratch_dir = \"{}\"\n\n\
             [[drill.assert]]\nname = \"rows\"\ndatabase = \"postgres\"\n\
             query = \"SELECT string_agg(id::text, ',' ORDER BY id) FROM t\"\nexpected = \"1,2\"\n",
            parent.display()
        ),
    );
    let j = s
        .run_repo(
            &[
                "--config",
                &cfg2,
                "--json",
                "drill",
                "--target-name",
                "before_three",
            ],
            &env,
        )
        .expect(0)
        .json();
    assert_eq!(j["result"], "ok", "{j:#}");
    // A restore point that was never created cannot be reached: exit 16.
    let r = s.run_repo(
        &["--config", &cfg2, "drill", "--target-name", "no_such_point"],
        &env,
    );
    assert_eq!(r.code(), 16, "{}\n{}", r.stdout(), r.stderr());
    assert_eq!(leftovers(&parent), Vec::<String>::new());
}

#[test]
fn a_dump_drill_restores_into_a_scratch_database_compares_rows_and_drops_it() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let c = pgkeep_testing::Cluster::new().unwrap();
    c.sql("CREATE DATABASE shop").unwrap();
    c.sql_db(
        "shop",
        "CREATE TABLE customers (id int PRIMARY KEY); \
         CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers); \
         INSERT INTO customers SELECT generate_series(1, 100); \
         INSERT INTO orders SELECT g, 1 + g % 100 FROM generate_series(1, 5000) g; \
         ALTER TABLE orders ADD CONSTRAINT later FOREIGN KEY (customer) REFERENCES customers NOT VALID",
    )
    .unwrap();
    let conn = c.conninfo();
    let env = [("PGKEEP_PG", conn.as_str())];
    s.run_repo(&["dump", "--db", "shop"], &env).expect(0);
    let cfg = config(
        &s,
        "drill.toml",
        "[[drill.assert]]\nname = \"orders\"\ndatabase = \"shop\"\n\
         query = \"SELECT count(*) FROM orders\"\nexpected = 5000\n",
    );
    let j = s
        .run_repo(
            &[
                "--config", &cfg, "--json", "drill", "--dump", "latest", "--db", "shop",
            ],
            &env,
        )
        .expect(0)
        .json();
    assert_eq!(j["kind"], "dump");
    assert_eq!(j["result"], "ok", "{j:#}");
    let rows = check_named(&j, "rows").unwrap();
    assert_eq!(rows["status"], "ok", "{rows}");
    assert!(
        rows["detail"].as_str().unwrap().starts_with("2 tables"),
        "{rows}"
    );
    let fk = check_named(&j, "foreign_keys").unwrap();
    assert_eq!(fk["status"], "ok", "{fk}");
    assert!(
        fk["detail"]
            .as_str()
            .unwrap()
            .contains("1 validated by the drill"),
        "{fk}"
    );
    assert_eq!(check_named(&j, "assert:orders").unwrap()["status"], "ok");
    // The scratch database is gone; the source is untouched.
    let dbs = c
        .sql("SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database")
        .unwrap();
    assert!(!dbs.contains("pgkeep_drill"), "{dbs}");
    assert_eq!(
        c.sql_db("shop", "SELECT count(*) FROM orders").unwrap(),
        "5000"
    );
    let h = s.run_repo(&["--json", "history"], &[]).expect(0).json();
    let rec = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "drill")
        .unwrap()
        .clone();
    assert_eq!(rec["database"], "shop", "{rec}");
    assert_eq!(rec["result"], "ok", "{rec}");
}

#[test]
fn a_drill_of_a_backup_with_a_flipped_byte_in_a_pack_fails_with_exit_13() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let conn = c.conninfo();
    let env = [("PGKEEP_PG", conn.as_str())];
    c.sql("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 50000) g")
        .unwrap();
    // The sandbox's repository is shared with other tests: damage a pack this backup wrote.
    let packs_dir = s.repo().join("packs");
    let before = if packs_dir.exists() {
        cli_support::listing(&packs_dir)
    } else {
        Default::default()
    };
    s.run_repo(&["backup"], &env).expect(0);
    // Flip one byte in the middle of the largest pack the backup wrote.
    let packs = cli_support::listing(&s.repo().join("packs"));
    let (pack, _) = packs
        .iter()
        .filter(|(name, _)| !before.contains_key(*name))
        .max_by_key(|(_, (bytes, _))| bytes.len())
        .expect("the backup wrote a pack");
    let path = s.repo().join("packs").join(pack);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let parent = scratch_parent(&s);
    let r = s.run_repo(&["drill", "--scratch-dir", parent.to_str().unwrap()], &env);
    assert_eq!(r.code(), 13, "{}\n{}", r.stdout(), r.stderr());
    assert_eq!(leftovers(&parent), Vec::<String>::new());
}

#[test]
fn a_drill_stopped_by_sigterm_leaves_no_server_and_no_scratch_directory() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let conn = c.conninfo();
    c.sql("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g")
        .unwrap();
    s.run_repo(&["backup"], &[("PGKEEP_PG", conn.as_str())])
        .expect(0);
    switch_and_wait(&c);
    let parent = scratch_parent(&s);
    // Stop it at several points: during the restore, while the server runs.
    for delay_ms in [300u64, 1500, 3000] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pgkeep"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", s.path())
            .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
            .env("PGKEEP_PG", &conn)
            .args([
                "--repo",
                s.repo().to_str().unwrap(),
                "drill",
                "--scratch-dir",
            ])
            .arg(&parent)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let st = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let started = Instant::now();
        let status = child.wait().unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        // 130, or 0 when the drill was already over.
        assert!(
            matches!(status.code(), Some(130) | Some(0)),
            "after {delay_ms} ms: {status:?}"
        );
        assert_eq!(
            leftovers(&parent),
            Vec::<String>::new(),
            "after {delay_ms} ms"
        );
        assert_eq!(
            processes_with(parent.to_str().unwrap()),
            Vec::<String>::new(),
            "after {delay_ms} ms"
        );
    }
    // The lock is released: another command runs at once.
    s.run_repo(&["repo", "check"], &[]).expect(0);
}

/// Unmounts a test's tmpfs, whatever happens.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_drill_that_does_not_fit_is_refused_before_anything_is_written() {
    if !pgkeep_testing::cluster::require_root("mounting a tmpfs") {
        return;
    }
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let conn = c.conninfo();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    s.run_repo(&["backup"], &[("PGKEEP_PG", conn.as_str())])
        .expect(0);
    let small = s.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mount -t tmpfs failed");
    let _mounted = Mounted(small.clone());
    let started = Instant::now();
    let r = s
        .run_repo(
            &["drill", "--scratch-dir", small.to_str().unwrap()],
            &[("PGKEEP_PG", conn.as_str())],
        )
        .expect(1);
    let e = r.stderr();
    assert!(
        e.contains("not enough space to restore backup")
            && e.contains(" needs ")
            && e.contains(" free"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(leftovers(&small), Vec::<String>::new());
}
