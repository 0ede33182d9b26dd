//! Helpers for the CLI tests: run the real `pgkeep` binary in a clean environment.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory with an empty config file, and the repository path inside it.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // An explicit (empty) config file, so /etc/pgkeep/pgkeep.toml of the machine never
        // leaks into a test.
        std::fs::write(dir.path().join("empty.toml"), "").unwrap();
        Sandbox { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The local repository location used by most tests.
    pub fn repo(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    /// `pgkeep ARGS` with only PATH, HOME, PGKEEP_CONFIG (the empty file) and `envs` set.
    pub fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgkeep"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env("PGKEEP_CONFIG", self.path().join("empty.toml"))
            // CI machines run with little free disk; the free-space check is tested on its
            // own (health_cli), every other `check` must not depend on the machine's disk.
            .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
            .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
            .current_dir(self.path())
            .args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Run(cmd.output().unwrap())
    }

    /// `pgkeep --repo <sandbox repo> ARGS`.
    pub fn run_repo(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let repo = self.repo();
        let mut all = vec!["--repo", repo.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run(&all, envs)
    }
}

/// The outcome of one run.
pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    /// Asserts the exit code, showing both streams when it differs.
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }

    /// stdout parsed as one JSON document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", self.stdout()))
    }
}

/// Every file under `root` with its bytes and modification time: a repository listing to
/// compare before and after a command that must not write.
pub fn listing(root: &Path) -> BTreeMap<PathBuf, (Vec<u8>, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    (Vec::new(), m.modified().unwrap()),
                );
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    (bytes, m.modified().unwrap()),
                );
            }
        }
    }
    out
}

impl Sandbox {
    /// A sandbox with a plain repository that the PostgreSQL server user can write (the
    /// archiver runs `pgkeep archive-push` as `postgres`).
    pub fn shared() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let s = Sandbox::new();
        s.run_repo(&["repo", "init", "--no-encryption"], &[])
            .expect(0);
        std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(
            s.path().join("empty.toml"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        if pgkeep_testing::cluster::running_as_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(s.repo())
                .status()
                .unwrap();
            assert!(st.success());
        }
        s
    }
}

/// A running cluster whose `archive_command` is `pgkeep archive-push` into the sandbox's
/// repository (which [`Sandbox::shared`] makes writable by the server user).
pub fn start_archiving(s: &Sandbox) -> pgkeep_testing::Cluster {
    let command = format!(
        "{} --config {} --repo {} archive-push %p",
        env!("CARGO_BIN_EXE_pgkeep"),
        s.path().join("empty.toml").display(),
        s.repo().display()
    );
    pgkeep_testing::Cluster::builder()
        .archive_command(&command)
        .start()
        .unwrap()
}

/// Switches WAL and waits until the server reports the switched segment archived
/// (pg_stat_archiver), failing with the server log when archive_command failed. Returns the
/// segment's name.
pub fn switch_and_wait(c: &pgkeep_testing::Cluster) -> String {
    use std::time::{Duration, Instant};
    let seg = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
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
        // The archiver works in name order, so a segment, `.partial` or `.backup` file at or
        // past `seg` means `seg` is archived (after a backup, `<seg>.<offset>.backup` comes
        // last). Timeline history files (`00000002.history`) say nothing about segments.
        if archived.len() >= 24 && archived[..24] >= *seg.as_str() {
            return seg;
        }
        assert!(
            Instant::now() < deadline,
            "{seg} not archived; log:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Checks `text` with `promtool check metrics` (Debian package prometheus).
pub fn promtool(text: &str) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the metrics sample whose line starts with `prefix` (name and labels).
pub fn sample(text: &str, prefix: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no sample {prefix}\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// What [`populate_whole_cluster`] made that a restore has to know about.
pub struct WholeCluster {
    /// The directory of tablespace `whole_ts` (inside the sandbox, owned by the server user).
    pub tablespace: PathBuf,
}

impl WholeCluster {
    /// The `--tablespace-map` value that restores `whole_ts` to `new` (the original directory
    /// is still the running source's, so every restore of these clusters relocates it).
    pub fn tablespace_map(&self, new: &Path) -> String {
        format!("{}={}", self.tablespace.display(), new.display())
    }
}

/// Names [`populate_whole_cluster`] creates; fixed, so two dumps of equal clusters are equal.
pub const WHOLE_DBS: [&str; 2] = ["whole_shop", "whole_stats"];

/// Fills `c` with what a whole-cluster comparison must see: a table in template1 (so the two
/// databases made after it carry it too), two extra databases with tables, indexes and data
/// (TOASTed values among them), a login role with a SCRAM password hash, a role granted to it
/// and privileges granted to that one, and tablespace `whole_ts` in a directory of the
/// sandbox holding a table and an index. Idempotent: a second call on the same cluster does
/// nothing. No sequences: PostgreSQL logs a sequence 32 values ahead, so a recovered copy's
/// sequence legitimately stands further on than its source's and pg_dumpall would differ.
pub fn populate_whole_cluster(c: &pgkeep_testing::Cluster, s: &Sandbox) -> WholeCluster {
    use std::os::unix::fs::PermissionsExt;
    let ts = s.path().join("whole-cluster-ts");
    let made = WholeCluster {
        tablespace: ts.clone(),
    };
    if c.sql("SELECT count(*) FROM pg_tablespace WHERE spcname = 'whole_ts'")
        .unwrap()
        == "1"
    {
        return made;
    }
    std::fs::create_dir_all(&ts).unwrap();
    // The server user must reach the directory: the sandbox is searchable by others (0711,
    // as Sandbox::shared makes it), the directory the server's own.
    let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
    std::fs::set_permissions(
        s.path(),
        std::fs::Permissions::from_mode((mode & 0o7777) | 0o711),
    )
    .unwrap();
    std::fs::set_permissions(&ts, std::fs::Permissions::from_mode(0o700)).unwrap();
    if pgkeep_testing::cluster::running_as_root() {
        let st = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&ts)
            .status()
            .unwrap();
        assert!(st.success(), "chown {}", ts.display());
    }
    populate(c, Some(&ts));
    made
}

/// [`populate_whole_cluster`] without the tablespace, for a cluster backed up with
/// `--method basebackup` (pg_basebackup writes a single stream only for a cluster without
/// tablespaces, so pgkeep refuses one with tablespaces). Idempotent too.
pub fn populate_whole_cluster_without_tablespace(c: &pgkeep_testing::Cluster) {
    if c.sql("SELECT count(*) FROM pg_roles WHERE rolname = 'whole_app'")
        .unwrap()
        == "1"
    {
        return;
    }
    populate(c, None);
}

fn populate(c: &pgkeep_testing::Cluster, ts: Option<&Path>) {
    let sql = |db: &str, q: &str| {
        c.sql_db(db, q)
            .unwrap_or_else(|e| panic!("populating the whole cluster ({db}): {e:#}"))
    };
    sql(
        "template1",
        "CREATE TABLE whole_template_note (k int PRIMARY KEY, note text NOT NULL);
         INSERT INTO whole_template_note SELECT g, 'from template1 ' || g FROM generate_series(1, 50) g;",
    );
    // Without the tablespace, its table lives in the database's default one.
    let (create_ts, in_ts, index_in_ts) = match ts {
        Some(dir) => (
            format!("CREATE TABLESPACE whole_ts LOCATION '{}';", dir.display()),
            " TABLESPACE whole_ts",
            " USING INDEX TABLESPACE whole_ts",
        ),
        None => (String::new(), "", ""),
    };
    sql(
        "postgres",
        &format!(
            "CREATE ROLE whole_app LOGIN PASSWORD 'whole cluster test password';
             CREATE ROLE whole_reader NOLOGIN;
             GRANT whole_reader TO whole_app;
             {create_ts}
             CREATE DATABASE whole_shop OWNER whole_app;
             CREATE DATABASE whole_stats;
             GRANT CONNECT ON DATABASE whole_stats TO whole_reader;"
        ),
    );
    sql(
        "whole_shop",
        &format!(
            "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, total numeric(12,2) NOT NULL, placed date NOT NULL);
         CREATE INDEX orders_customer ON orders (customer);
         INSERT INTO orders SELECT g, 'customer ' || (g % 97), g * 1.25, date '2026-01-01' + (g % 300) FROM generate_series(1, 3000) g;
         ALTER TABLE orders OWNER TO whole_app;
         GRANT SELECT ON orders TO whole_reader;
         CREATE TABLE archived_orders (id bigint PRIMARY KEY{index_in_ts}, body text NOT NULL){in_ts};
         INSERT INTO archived_orders SELECT g, (SELECT string_agg(md5(g::text || '/' || i), '') FROM generate_series(1, 256) i) FROM generate_series(1, 120) g;"
        ),
    );
    sql(
        "whole_stats",
        "CREATE TABLE measures (k int PRIMARY KEY, v float8 NOT NULL, doc jsonb NOT NULL);
         CREATE INDEX measures_v ON measures (v);
         INSERT INTO measures SELECT g, g / 7.0, jsonb_build_object('k', g, 'tag', 'm' || (g % 13)) FROM generate_series(1, 4000) g;
         GRANT SELECT ON measures TO whole_reader;",
    );
}

/// Makes two whole-cluster dumps comparable. Only what a correct restore legitimately changes
/// is rewritten, and only on the lines that carry it:
/// - a tablespace's LOCATION: the restore puts it where `--tablespace-map` says (the source's
///   directory is still in use), so the path differs by design; the tablespace itself, its
///   owner and everything stored in it are still compared;
///
/// Role lines (`ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…'`) are NOT rewritten: a physical restore
/// carries pg_authid byte for byte, so the password hashes must be equal, and a restore that
/// loses or changes one must fail here.
fn normalise_dumpall(dump: &str) -> String {
    dump.lines()
        .map(|l| {
            if l.starts_with("CREATE TABLESPACE ") {
                if let Some(at) = l.find(" LOCATION '") {
                    let rest = &l[at + " LOCATION '".len()..];
                    if let Some(end) = rest.find("';") {
                        return format!("{} LOCATION '<relocated>'{}", &l[..at], &rest[end + 1..]);
                    }
                }
            }
            l.to_string()
        })
        .flat_map(|l| [l, "\n".to_string()])
        .collect()
}

/// Asserts that `restored`'s `pg_dumpall` equals `want` (a `pg_dumpall` of the source at the
/// moment the restore should reproduce): every database including template1, roles with
/// their password hashes and memberships, tablespaces (apart from their relocated directory,
/// see `normalise_dumpall`), privileges and all rows. On a difference: the first differing
/// line, the database it is in, and the restored server's log.
pub fn assert_same_cluster(want: &str, restored: &pgkeep_testing::Cluster) {
    let got = restored
        .pg_dumpall()
        .unwrap_or_else(|e| panic!("pg_dumpall of the restored cluster: {e:#}"));
    assert!(
        want.contains("CREATE ROLE postgres;"),
        "the expected text is not a pg_dumpall:\n{}",
        &want[..want.len().min(2000)]
    );
    let (w, g) = (normalise_dumpall(want), normalise_dumpall(&got));
    let Some(diff) = pgkeep_testing::cluster::first_difference(&w, &g) else {
        return;
    };
    // Where the difference is: the last `\connect` before it names the database.
    let at = w.lines().zip(g.lines()).take_while(|(a, b)| a == b).count();
    let database = w
        .lines()
        .take(at + 1)
        .filter_map(|l| l.strip_prefix("\\connect "))
        .last()
        .map(|d| d.trim_start_matches("-reuse-previous=on ").to_string())
        .unwrap_or_else(|| "(globals: roles and tablespaces)".to_string());
    let databases = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("\\connect "))
            .map(str::to_string)
            .collect()
    };
    panic!(
        "the restored cluster differs from the source: pg_dumpall {diff}\n\
         in database {database}; the source's dump has {} lines and connects to {:?}, the \
         restored one {} lines and {:?}\nthe restored server's log:\n{}",
        w.lines().count(),
        databases(&w),
        g.lines().count(),
        databases(&g),
        restored.log_tail()
    );
}

/// Checks every table and index of every database of `c` with amcheck, and fails the test on
/// any error. PostgreSQL 14 and later: `pg_amcheck --all --heapallindexed --install-missing`
/// (heap pages, TOAST and every btree index, with each index checked against its table).
/// Older servers (amcheck has no heap check there), or no pg_amcheck installed: `CREATE
/// EXTENSION amcheck` and `bt_index_check(index, heapallindexed => true)` on every btree
/// index of every database. Writes (installs the extension): run it after the dump
/// comparison, on a promoted server.
pub fn amcheck_all(c: &pgkeep_testing::Cluster) {
    let sql = |db: &str, q: &str| {
        c.sql_db(db, q)
            .unwrap_or_else(|e| panic!("amcheck on {db}: {e:#}\nserver log:\n{}", c.log_tail()))
    };
    assert_eq!(
        sql("postgres", "SELECT pg_is_in_recovery()"),
        "f",
        "amcheck_all installs the amcheck extension: the server must be promoted first"
    );
    let version: u32 = sql("postgres", "SHOW server_version_num").parse().unwrap();
    let exe = c.client_program("pg_amcheck");
    if version >= 14_00_00 && exe.is_absolute() && exe.is_file() {
        let out = c
            .client_command(exe.to_str().unwrap())
            .args(["--all", "--heapallindexed", "--install-missing"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "{} --all --heapallindexed --install-missing found damage ({}):\n{}{}\nserver log:\n{}",
            exe.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            c.log_tail()
        );
        return;
    }
    let dbs = sql(
        "postgres",
        "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
    );
    let mut checked = 0;
    for db in dbs.lines() {
        let out = sql(
            db,
            "CREATE EXTENSION IF NOT EXISTS amcheck;
             SELECT c.oid::regclass, bt_index_check(c.oid, true)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_am a ON a.oid = c.relam
              WHERE a.amname = 'btree' AND c.relpersistence <> 't'
                AND i.indisvalid AND i.indisready
              ORDER BY c.oid;",
        );
        checked += out.lines().count();
    }
    assert!(checked > 0, "amcheck checked no index at all");
}
