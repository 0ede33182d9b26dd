//! The version matrix: PostgreSQL 13 to 18, end to end through the built binary, one test per
//! major version. The servers come from the cache of `scripts/install-deps.sh`; each archives
//! through `pgkeep archive-push`. For each version:
//!
//! - a backup taken under pgbench load restores (replaying the archive to its end, tablespaces
//!   relocated) to a cluster whose `pg_dumpall` equals the source's: several databases, a
//!   table in template1, roles with memberships, privileges and a password hash, a tablespace
//!   holding a database and another holding a table; the tablespaces are where the restore
//!   put them, and amcheck finds every table and index intact;
//! - point-in-time restores to a time, a restore point and an LSN land on the exact row counts
//!   of those moments, and on the whole cluster as it was then;
//! - `dump` and `restore-dump` round trip a database, with a pg_dump that serves the server
//!   (its own major when installed, else a newer one), named in the report; with none that fits
//!   the dump is refused (exit 2) with a hint;
//! - every pushed WAL segment has its summary in the repository.
//!
//! A version whose binaries are missing FAILS with the fix (run scripts/install-deps.sh).
//! `PGKEEP_VERSIONS=15,16` narrows the matrix on purpose; the other versions then say that
//! they were skipped and why.

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{amcheck_all, assert_same_cluster, populate_whole_cluster, Sandbox};
use pgkeep_testing::cluster::{first_difference, running_as_root, versioned_bin_dir};
use pgkeep_testing::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

/// Narrows the matrix, e.g. `PGKEEP_VERSIONS=15,16`.
const VERSIONS_ENV: &str = "PGKEEP_VERSIONS";

/// Whether `major` is in the matrix of this run; says so on stderr when it is not.
fn selected(major: u32) -> bool {
    let Ok(list) = std::env::var(VERSIONS_ENV) else {
        return true;
    };
    let chosen: Vec<u32> = list
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{VERSIONS_ENV}={list}: {v:?} is not a major version"))
        })
        .collect();
    if chosen.contains(&major) {
        return true;
    }
    eprintln!("PostgreSQL {major}: SKIPPED, not in {VERSIONS_ENV}={list}");
    false
}

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

/// Variables that choose PostgreSQL installations, passed on to the binary (the sandbox
/// clears the environment).
fn pg_env() -> Vec<(&'static str, String)> {
    ["PGKEEP_PG_BIN", "PGKEEP_PG_CACHE"]
        .into_iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k, v)))
        .collect()
}

/// A sandbox with a plain repository the server user can write.
struct Setup {
    s: Sandbox,
}

impl Setup {
    fn new() -> Self {
        let st = Setup { s: Sandbox::new() };
        st.run(&["repo", "init", "--no-encryption"]).expect(0);
        std::fs::set_permissions(st.s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(
            st.s.path().join("empty.toml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        chown_postgres(&st.s.repo());
        st
    }

    fn run_env(&self, args: &[&str], extra: &[(&str, &str)]) -> cli_support::Run {
        let env = pg_env();
        let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(extra);
        self.s.run_repo(args, &all)
    }

    fn run(&self, args: &[&str]) -> cli_support::Run {
        self.run_env(args, &[])
    }

    fn run_pg(&self, c: &Cluster, args: &[&str]) -> cli_support::Run {
        self.run_env(args, &[("PGKEEP_PG", &c.conninfo())])
    }

    fn archive_command(&self) -> String {
        format!(
            "{BIN} --config {} --repo {} archive-push %p",
            self.s.path().join("empty.toml").display(),
            self.s.repo().display()
        )
    }

    /// `restore latest` into `dir` with `args`, each tablespace moved from `.0` to `.1`.
    fn restore(&self, dir: &Path, ts: &[(&Path, &Path)], args: &[&str]) {
        let maps: Vec<String> = ts
            .iter()
            .map(|(old, new)| format!("{}={}", old.display(), new.display()))
            .collect();
        let mut all = vec!["restore", "latest", "--target-dir", dir.to_str().unwrap()];
        for m in &maps {
            all.extend_from_slice(&["--tablespace-map", m]);
        }
        all.extend_from_slice(args);
        self.run(&all).expect(0);
    }
}

/// Switches WAL and waits until the switched segment is archived; fails with the server log
/// when archive_command fails.
fn switch_and_wait(c: &Cluster) {
    let seg = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
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
        if archived.len() == 24 && archived >= seg.as_str() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{seg} not archived; log:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a restored data directory with the server of `major` and waits for the promotion
/// that ends recovery.
fn start_promoted(major: u32, dir: &Path) -> Cluster {
    let c = Cluster::builder()
        .version(major)
        .start_timeout(Duration::from_secs(120))
        .start_existing(dir)
        .unwrap();
    c.wait_until_promoted(Duration::from_secs(60)).unwrap();
    c
}

fn events(c: &Cluster) -> String {
    c.sql_db("shop", "SELECT count(*) FROM events").unwrap()
}

/// Files under `root`, recursively.
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

/// Whether some Debian-installed pg_dump is of major `major` or later.
fn debian_pg_dump_at_least(major: u32) -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|m| m >= major)
                && e.path().join("bin/pg_dump").is_file()
        })
}

/// The whole matrix case for one major version; see the module documentation.
fn version_case(major: u32) {
    if !selected(major) {
        return;
    }
    if let Err(e) = versioned_bin_dir(major) {
        panic!(
            "PostgreSQL {major} is part of the version matrix but not installed: {e:#}\n\
             (to run only some versions on purpose, set {VERSIONS_ENV}, e.g. {VERSIONS_ENV}=15)"
        );
    }
    let started = Instant::now();
    let st = Setup::new();
    let c = Cluster::builder()
        .version(major)
        .archive_command(&st.archive_command())
        .start()
        .unwrap();
    let version_num: u32 = c.sql("SHOW server_version_num").unwrap().parse().unwrap();
    assert_eq!(
        version_num / 10000,
        major,
        "the server runs the chosen major"
    );

    // Several databases, roles, a tablespace holding one of them; and the whole-cluster set
    // (template1, a password, a tablespace holding a table).
    let whole = populate_whole_cluster(&c, &st.s);
    let ts = c.scratch_dir("ts").unwrap();
    c.sql(&format!(
        "CREATE ROLE app LOGIN; CREATE ROLE reader NOLOGIN; GRANT reader TO app;
         CREATE TABLESPACE fast LOCATION '{}';
         CREATE DATABASE shop OWNER app; CREATE DATABASE stats TABLESPACE fast;",
        ts.display()
    ))
    .unwrap();
    c.sql_db(
        "shop",
        // No sequence: PostgreSQL logs sequences 32 values ahead, so after any recovery
        // they stand further on than in the source, and pg_dumpall would differ for that.
        "CREATE TABLE events (id bigint PRIMARY KEY, batch int NOT NULL, payload text NOT NULL);
         ALTER TABLE events OWNER TO app; GRANT SELECT ON events TO reader;
         INSERT INTO events SELECT g, 0, md5(g::text) FROM generate_series(1, 1000) g;",
    )
    .unwrap();
    c.sql_db(
        "stats",
        "CREATE TABLE m (k int PRIMARY KEY, v float8);
         INSERT INTO m SELECT g, g / 7.0 FROM generate_series(1, 5000) g;",
    )
    .unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();

    // A backup while pgbench writes.
    let load = c
        .client_command("pgbench")
        .args(["-n", "-c", "2", "-T", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let b = st
        .run_pg(&c, &["--json", "backup", "--pgdata", &pgdata])
        .expect(0)
        .json();
    assert!(b["id"].is_string(), "{b}");
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pgbench load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // PITR targets between batches of 1000 rows: a time, a restore point, an LSN.
    let batch = |n: u32| {
        c.sql_db(
            "shop",
            &format!("INSERT INTO events SELECT {n} * 1000 + g, {n}, md5(g::text) FROM generate_series(1, 1000) g"),
        )
        .unwrap();
    };
    batch(1);
    let at_time = events(&c);
    let time = c.sql("SELECT clock_timestamp()").unwrap();
    let all_at_time = c.pg_dumpall().unwrap();
    // The next commit must be clearly after the target time.
    std::thread::sleep(Duration::from_millis(1100));
    batch(2);
    let at_point = events(&c);
    c.sql("SELECT pg_create_restore_point('matrix_point')")
        .unwrap();
    let all_at_point = c.pg_dumpall().unwrap();
    batch(3);
    let at_lsn = events(&c);
    let lsn = c.sql("SELECT pg_current_wal_insert_lsn()").unwrap();
    let all_at_lsn = c.pg_dumpall().unwrap();
    batch(4);
    switch_and_wait(&c);
    let source_dumpall = c.pg_dumpall().unwrap();
    assert!(
        source_dumpall.contains("CREATE ROLE app;") && source_dumpall.contains("fast"),
        "the source has roles and the tablespace"
    );

    // Replayed to the end of the archive: pg_dumpall equal to the source's (the tablespace
    // location is the one the restore was asked for).
    let work = st.s.path().join("restores");
    std::fs::create_dir_all(&work).unwrap();
    chown_postgres(&work);
    let full = work.join("full");
    let full_ts = work.join("full_ts");
    let full_whole_ts = work.join("full_whole_ts");
    // No target but an action: recovery through the archive to its end, promoted there
    // (restore's default is the same replay to the end of the archive).
    st.restore(
        &full,
        &[(&ts, &full_ts), (&whole.tablespace, &full_whole_ts)],
        &["--target-action", "promote"],
    );
    let r = start_promoted(major, &full);
    let facts = "SELECT (SELECT count(*) FROM pgbench_history), (SELECT sum(abalance) FROM pgbench_accounts), pg_current_wal_lsn()";
    eprintln!(
        "PostgreSQL {major}: source (history rows, balance, lsn): {}; restored: {}",
        c.sql(facts).unwrap(),
        r.sql(facts).unwrap()
    );
    assert_same_cluster(&source_dumpall, &r);
    // The tablespaces are where the restore was asked to put them.
    assert_eq!(
        r.sql("SELECT spcname || '=' || pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname IN ('fast', 'whole_ts') ORDER BY spcname")
            .unwrap(),
        format!("fast={}\nwhole_ts={}", full_ts.display(), full_whole_ts.display()),
        "PostgreSQL {major}"
    );
    assert_eq!(events(&r), events(&c));
    // Taken under load: every page and index of the restore is intact.
    amcheck_all(&r);
    drop(r);

    // Point in time: exact row counts.
    for (flag, value, want, want_all, name) in [
        (
            "--target-time",
            time.as_str(),
            &at_time,
            &all_at_time,
            "time",
        ),
        (
            "--target-name",
            "matrix_point",
            &at_point,
            &all_at_point,
            "name",
        ),
        ("--target-lsn", lsn.as_str(), &at_lsn, &all_at_lsn, "lsn"),
    ] {
        let dir = work.join(name);
        let dir_ts = work.join(format!("{name}_ts"));
        let dir_whole_ts = work.join(format!("{name}_whole_ts"));
        st.restore(
            &dir,
            &[(&ts, &dir_ts), (&whole.tablespace, &dir_whole_ts)],
            &[flag, value, "--target-action", "promote"],
        );
        let r = start_promoted(major, &dir);
        assert_eq!(
            &events(&r),
            want,
            "PostgreSQL {major}: {flag} {value} restored the wrong number of rows"
        );
        assert_same_cluster(want_all, &r);
    }

    drill_to_restore_point(&st, &c, major, &at_point);
    dump_round_trip(&st, &c, major);
    wal_summaries(&st, &c, major);
    eprintln!(
        "PostgreSQL {major}: matrix case passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// `drill --target-name` on a scratch server of this major (the tablespace moved into the
/// scratch directory): every check passes, the assertion sees the rows of that moment, and
/// nothing is left behind.
fn drill_to_restore_point(st: &Setup, c: &Cluster, major: u32, at_point: &str) {
    let parent = st.s.path().join("drills");
    std::fs::create_dir_all(&parent).unwrap();
    let cfg = st.s.path().join("drill.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[drill.assert]]\nname = \"events\"\ndatabase = \"shop\"\n\
             query = \"SELECT count(*) FROM events\"\nexpected = \"{at_point}\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = st.run_pg(
        c,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--json",
            "drill",
            "--target-name",
            "matrix_point",
            "--scratch-dir",
            parent.to_str().unwrap(),
        ],
    );
    assert_eq!(
        r.code(),
        0,
        "PostgreSQL {major} drill: {}\n{}",
        r.stdout(),
        r.stderr()
    );
    let j = r.json();
    assert!(
        j["server"]
            .as_str()
            .unwrap()
            .contains(&format!(") {major}.")),
        "PostgreSQL {major}: the drill ran another major: {j:#}"
    );
    let names: Vec<&str> = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"assert:events"), "{names:?}");
    assert!(
        names.contains(&"amcheck") || names.contains(&"read:stats"),
        "PostgreSQL {major}: neither amcheck nor a full read: {names:?}"
    );
    assert_eq!(std::fs::read_dir(&parent).unwrap().count(), 0);
}

/// `dump` and `restore-dump` of one database, with the pg_dump named in the reports; no
/// fitting pg_dump is refused with exit 2.
fn dump_round_trip(st: &Setup, c: &Cluster, major: u32) {
    let d = st
        .run_pg(c, &["--json", "dump", "--db", "shop"])
        .expect(0)
        .json();
    let used = &d["pg_dump"];
    let used_major = used["major"].as_u64().unwrap() as u32;
    assert!(used_major >= major, "{used}");
    let own = versioned_bin_dir(major).unwrap().join("pg_dump");
    if own.is_file() || Path::new(&format!("/usr/lib/postgresql/{major}/bin/pg_dump")).is_file() {
        assert_eq!(
            used_major, major,
            "the server's own major is preferred: {used}"
        );
    }
    let path = used["path"].as_str().unwrap();
    assert!(
        path.ends_with("/pg_dump") && Path::new(path).is_file(),
        "{used}"
    );
    assert!(
        used["version"]
            .as_str()
            .unwrap()
            .starts_with("pg_dump (PostgreSQL) "),
        "{used}"
    );
    let id = d["id"].as_str().unwrap().to_string();
    let text = st.run_pg(c, &["dump", "--db", "stats"]).expect(0).stdout();
    assert!(text.contains(&format!("pg_dump: {path} (")), "{text}");

    let r = st
        .run_pg(
            c,
            &[
                "--json",
                "restore-dump",
                &id,
                "--target-db",
                "shop_copy",
                "--create",
            ],
        )
        .expect(0)
        .json();
    assert!(
        r["pg_restore"]["major"].as_u64().unwrap() as u32 >= used_major,
        "{r}"
    );
    assert_eq!(
        first_difference(
            &c.pg_dump("shop").unwrap(),
            &c.pg_dump("shop_copy").unwrap()
        ),
        None,
        "PostgreSQL {major}: the restored dump differs from its source"
    );

    // No pg_dump that serves this server: refused before anything runs, with the fix.
    if !debian_pg_dump_at_least(major) {
        let empty = st.s.path().join("no-pg-cache");
        std::fs::create_dir_all(&empty).unwrap();
        let refused = st.s.run_repo(
            &["dump", "--db", "shop"],
            &[
                ("PGKEEP_PG", &c.conninfo()),
                ("PGKEEP_PG_CACHE", empty.to_str().unwrap()),
                ("PATH", "/usr/bin:/bin"),
            ],
        );
        let e = refused.expect(2).stderr();
        assert!(
            e.contains(&format!("needs PostgreSQL {major} or newer")) && e.contains("HINT"),
            "{e}"
        );
    }
}

/// Every segment archive-push stored has its summary beside it.
fn wal_summaries(st: &Setup, c: &Cluster, major: u32) {
    // The newest segment PostgreSQL archived (switch_and_wait left a segment there).
    let last = c
        .sql("SELECT last_archived_wal FROM pg_stat_archiver")
        .unwrap();
    let files = files_under(&st.s.repo().join("wal/main"));
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let segments: Vec<&String> = names
        .iter()
        .filter(|n| n.len() == 24 && n.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert!(
        segments.len() >= 3 && segments.contains(&&last),
        "PostgreSQL {major}: segments stored {segments:?}, the last archived {last}"
    );
    let missing: Vec<&&String> = segments
        .iter()
        .filter(|s| !names.contains(&format!("{s}.summary")))
        .collect();
    assert!(
        missing.is_empty(),
        "PostgreSQL {major}: no WAL summary for {missing:?}"
    );
}

#[test]
fn postgres_13_backup_under_load_pitr_dump_and_wal_summaries() {
    version_case(13);
}

#[test]
fn postgres_14_backup_under_load_pitr_dump_and_wal_summaries() {
    version_case(14);
}

#[test]
fn postgres_15_backup_under_load_pitr_dump_and_wal_summaries() {
    version_case(15);
}

#[test]
fn postgres_16_backup_under_load_pitr_dump_and_wal_summaries() {
    version_case(16);
}

#[test]
fn postgres_17_backup_under_load_pitr_dump_and_wal_summaries() {
    version_case(17);
}

#[test]
fn postgres_18_backup_under_load_pitr_dump_and_wal_summaries() {
    version_case(18);
}
