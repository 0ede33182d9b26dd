//! `pgkeep daemon` through the built binary, with second-granularity schedules on a real
//! cluster: it takes dumps and a backup within a bounded wait (recorded in the run history as
//! if run by hand), skips and records a run that falls due while the previous one is still
//! going, runs a missed run once at start-up, reloads on SIGHUP (and keeps the old
//! configuration when the new one is bad), and on SIGTERM exits 0 with its lock released;
//! one daemon serves two clusters backed up to two repositories.

mod cli_support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{start_archiving, Sandbox};

fn write_config(s: &Sandbox, conninfo: &str, schedules: &str) -> String {
    let p = s.path().join("daemon.toml");
    let text = format!(
        "[[repository]]\nname = \"local\"\nurl = \"{repo}\"\n\n\
         [[cluster]]\nname = \"main\"\nrepository = \"local\"\npg = \"{conninfo}\"\n\n\
         [daemon]\nstate_dir = \"{state}\"\nstop_timeout = \"20s\"\n\n{schedules}",
        repo = s.repo().display(),
        state = s.path().join("state").display(),
    );
    // Written beside and renamed: the daemon never reads half a file.
    let tmp = s.path().join("daemon.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p.display().to_string()
}

/// A running daemon and the file its stderr goes to (read when a wait times out, so a CI
/// failure shows what the daemon did).
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn start_daemon(s: &Sandbox, cfg: &str) -> Daemon {
    let log = s.path().join(format!(
        "daemon-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let child = Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
        .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
        .args(["--config", cfg, "-v", "daemon"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Daemon { child, log }
}

/// A session that holds an ACCESS EXCLUSIVE lock on `table` until released, so pg_dump of
/// that database waits. `hold` returns only once the lock is granted: a fixed head start
/// raced pg_dump on a loaded CI machine (pg_dump took its lock first and no run overlapped).
struct LockHolder {
    psql: Child,
    stdin: Option<ChildStdin>,
}

impl LockHolder {
    fn hold(c: &pgkeep_testing::Cluster, db: &str, table: &str) -> LockHolder {
        let mut psql = Command::new("psql")
            .args([&c.conninfo_db(db), "-qAt"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = psql.stdin.take().unwrap();
        writeln!(stdin, "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;").unwrap();
        stdin.flush().unwrap();
        let granted = format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_class r ON r.oid = l.relation \
             WHERE r.relname = '{table}' AND l.mode = 'AccessExclusiveLock' AND l.granted"
        );
        wait_for("the lock to be held", Duration::from_secs(30), || {
            c.sql_db(db, &granted).map(|n| n == "1").unwrap_or(false)
        });
        LockHolder {
            psql,
            stdin: Some(stdin),
        }
    }

    fn release(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "COMMIT;");
        }
        let _ = self.psql.wait();
    }
}

impl Drop for LockHolder {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.psql.kill();
            let _ = self.psql.wait();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// The run history as (kind, database, result, error).
fn history(s: &Sandbox, _cfg: &str) -> Vec<(String, String, String, String)> {
    // Not through the daemon's file: the test makes it bad on purpose.
    let r = s.run_repo(&["--json", "history"], &[]);
    if r.code() != 0 {
        return Vec::new();
    }
    r.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let t = |k: &str| r[k].as_str().unwrap_or("").to_string();
            (t("kind"), t("database"), t("result"), t("error"))
        })
        .collect()
}

fn count(h: &[(String, String, String, String)], kind: &str, db: &str, result: &str) -> usize {
    h.iter()
        .filter(|(k, d, r, _)| k == kind && d == db && r == result)
        .count()
}

/// Polls `ok` until it holds (true) or `limit` passes (false).
fn wait_until(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while !ok() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    true
}

fn wait_for(what: &str, limit: Duration, ok: impl FnMut() -> bool) {
    assert!(wait_until(limit, ok), "timed out waiting for {what}");
}

/// `wait_for`, with the daemon's log in the failure message.
fn wait_for_daemon(d: &Daemon, what: &str, limit: Duration, ok: impl FnMut() -> bool) {
    assert!(
        wait_until(limit, ok),
        "timed out waiting for {what}\ndaemon log:\n{}",
        d.log()
    );
}

fn stop(mut d: Daemon) -> (i32, String) {
    let child = &mut d.child;
    signal(child, "TERM");
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the daemon did not stop within 60 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.code().unwrap_or(-1), d.log())
}

fn no_locks(repo: &Path) -> bool {
    std::fs::read_dir(repo.join("locks"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

#[test]
fn a_daemon_runs_schedules_skips_overlaps_reloads_on_sighup_and_stops_on_sigterm() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    c.sql("CREATE DATABASE app").unwrap();
    c.sql_db("app", "CREATE TABLE t AS SELECT generate_series(1, 1000) g")
        .unwrap();
    c.sql("CREATE DATABASE slow").unwrap();
    c.sql_db("slow", "CREATE TABLE held (g int)").unwrap();
    let conn = c.conninfo();

    // A session holds a lock that pg_dump of `slow` waits for: its runs overlap until the
    // skip has been seen.
    let holder = LockHolder::hold(&c, "slow", "held");

    let schedules = "[[schedule]]\njob = \"dump\"\ncron = \"*/2 * * * * *\"\ncluster = \"main\"\ndb = \"app\"\n\n\
         [[schedule]]\njob = \"backup\"\ncron = \"*/5 * * * * *\"\ncluster = \"main\"\n\n\
         [[schedule]]\njob = \"dump\"\ncron = \"* * * * * *\"\ncluster = \"main\"\ndb = \"slow\"\n";
    let cfg = write_config(&s, &conn, schedules);
    let daemon = start_daemon(&s, &cfg);

    let mut last = Vec::new();
    let seen = wait_until(Duration::from_secs(120), || {
        last = history(&s, &cfg);
        count(&last, "dump", "app", "ok") >= 2
            && count(&last, "backup", "", "ok") >= 1
            && last.iter().any(|(k, d, r, e)| {
                k == "dump" && d == "slow" && r == "warning" && e.contains("skipped")
            })
    });
    assert!(
        seen,
        "timed out waiting for two dumps, a backup and a skipped run\nhistory: {last:?}\ndaemon log:\n{}",
        daemon.log()
    );
    holder.release();

    // SIGHUP with a bad file: refused, the old schedules go on.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{good}\n[[schedule]]\njob = \"dump\"\ncron = \"99 * * * * *\"\ndb = \"app\"\n"),
    )
    .unwrap();
    signal(&daemon.child, "HUP");
    std::thread::sleep(Duration::from_millis(500));
    let before = count(&history(&s, &cfg), "dump", "app", "ok");
    wait_for_daemon(
        &daemon,
        "a dump after the refused reload",
        Duration::from_secs(30),
        || count(&history(&s, &cfg), "dump", "app", "ok") > before,
    );

    // SIGHUP with a good file: only the `app` dump, now every second.
    write_config(
        &s,
        &conn,
        "[[schedule]]\nname = \"app-fast\"\njob = \"dump\"\ncron = \"* * * * * *\"\ncluster = \"main\"\ndb = \"app\"\n",
    );
    signal(&daemon.child, "HUP");
    let before = count(&history(&s, &cfg), "dump", "app", "ok");
    wait_for_daemon(
        &daemon,
        "dumps after the reload",
        Duration::from_secs(30),
        || count(&history(&s, &cfg), "dump", "app", "ok") >= before + 2,
    );

    let (code, log) = stop(daemon);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("configuration was not reloaded"), "{log}");
    assert!(
        log.contains("99 * * * * *"),
        "the refusal names the bad value: {log}"
    );
    assert!(log.contains("configuration reloaded: 1 schedules"), "{log}");
    assert!(log.contains("daemon: stopped"), "{log}");
    assert!(no_locks(&s.repo()), "a lock was left behind");
    s.run(&["--config", &cfg, "repo", "check"], &[]).expect(0);
    drop(c);
}

#[test]
fn a_run_missed_while_the_daemon_was_down_runs_once_at_start_up() {
    let s = Sandbox::shared();
    let c = pgkeep_testing::Cluster::new().unwrap();
    c.sql("CREATE DATABASE app").unwrap();
    let conn = c.conninfo();
    // Due at minute 0 of every hour: it does not fall due during the test by itself.
    let schedules = "[[schedule]]\nname = \"hourly\"\njob = \"dump\"\ncron = \"0 * * * *\"\ndb = \"app\"\n\n\
         [[schedule]]\nname = \"hourly-skip\"\njob = \"dump\"\ncron = \"0 * * * *\"\ndb = \"postgres\"\nmissed = \"skip\"\n";
    let cfg = write_config(&s, &conn, schedules);
    // The daemon last saw both schedules two hours ago.
    let state = s.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let two_hours_ago = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
    std::fs::write(
        state.join("daemon-schedules.json"),
        format!("{{\"hourly\": \"{two_hours_ago}\", \"hourly-skip\": \"{two_hours_ago}\"}}"),
    )
    .unwrap();
    let daemon = start_daemon(&s, &cfg);
    wait_for_daemon(&daemon, "the missed dump", Duration::from_secs(60), || {
        count(&history(&s, &cfg), "dump", "app", "ok") == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    let (code, log) = stop(daemon);
    assert_eq!(code, 0, "{log}");
    let h = history(&s, &cfg);
    assert_eq!(count(&h, "dump", "app", "ok"), 1, "{h:?}");
    assert_eq!(
        count(&h, "dump", "postgres", "ok"),
        0,
        "missed = \"skip\" ran: {h:?}"
    );
    assert!(log.contains("hourly missed a run"), "{log}");
}

#[test]
fn sigterm_interrupts_a_run_that_outlasts_stop_timeout_and_releases_its_lock() {
    let s = Sandbox::shared();
    let c = pgkeep_testing::Cluster::new().unwrap();
    c.sql("CREATE DATABASE slow").unwrap();
    c.sql_db("slow", "CREATE TABLE held (g int)").unwrap();
    let conn = c.conninfo();
    let holder = LockHolder::hold(&c, "slow", "held");
    let p = s.path().join("daemon.toml");
    let cfg = write_config(
        &s,
        &conn,
        "[[schedule]]\njob = \"dump\"\ncron = \"* * * * * *\"\ndb = \"slow\"\n",
    );
    // A second's patience on SIGTERM.
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("stop_timeout = \"20s\"", "stop_timeout = \"1s\"");
    std::fs::write(&p, text).unwrap();
    let daemon = start_daemon(&s, &cfg);
    // The dump is running (waiting for the lock) once it holds the repository lock.
    wait_for_daemon(
        &daemon,
        "the dump to start",
        Duration::from_secs(30),
        || !no_locks(&s.repo()),
    );
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let (code, log) = stop(daemon);
    assert_eq!(code, 0, "{log}");
    assert!(started.elapsed() < Duration::from_secs(30), "{log}");
    assert!(log.contains("interrupting dump-main-slow"), "{log}");
    assert!(no_locks(&s.repo()), "the interrupted dump left its lock");
    let h = history(&s, &cfg);
    assert!(
        h.iter()
            .any(|(k, d, r, _)| k == "dump" && d == "slow" && r == "interrupted"),
        "{h:?}"
    );
    drop(holder);
}

#[test]
fn one_daemon_runs_schedules_for_two_clusters_in_two_repositories() {
    let s = Sandbox::shared();
    let (a, b) = (
        pgkeep_testing::Cluster::new().unwrap(),
        pgkeep_testing::Cluster::new().unwrap(),
    );
    a.sql("CREATE DATABASE sales").unwrap();
    b.sql("CREATE DATABASE stock").unwrap();
    let other = s.path().join("other-repo");
    s.run(
        &[
            "--repo",
            other.to_str().unwrap(),
            "repo",
            "init",
            "--no-encryption",
        ],
        &[],
    )
    .expect(0);
    let p = s.path().join("two.toml");
    std::fs::write(
        &p,
        format!(
            "[[repository]]\nname = \"r1\"\nurl = \"{}\"\n\n\
             [[repository]]\nname = \"r2\"\nurl = \"{}\"\n\n\
             [[cluster]]\nname = \"shop\"\nrepository = \"r1\"\npg = \"{}\"\n\n\
             [[cluster]]\nname = \"depot\"\nrepository = \"r2\"\npg = \"{}\"\n\n\
             [daemon]\nstate_dir = \"{}\"\n\n\
             [[schedule]]\njob = \"dump\"\ncron = \"*/2 * * * * *\"\ncluster = \"shop\"\ndb = \"sales\"\n\n\
             [[schedule]]\njob = \"dump\"\ncron = \"*/2 * * * * *\"\ncluster = \"depot\"\ndb = \"stock\"\n",
            s.repo().display(),
            other.display(),
            a.conninfo(),
            b.conninfo(),
            s.path().join("state").display()
        ),
    )
    .unwrap();
    let cfg = p.to_str().unwrap().to_string();
    let daemon = start_daemon(&s, &cfg);
    let dumps = |repo: &Path, cluster: &str, db: &str| -> usize {
        let r = s.run(
            &[
                "--repo",
                repo.to_str().unwrap(),
                "--cluster",
                cluster,
                "--json",
                "history",
            ],
            &[],
        );
        if r.code() != 0 {
            return 0;
        }
        r.json()["records"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == "dump" && r["database"] == db && r["result"] == "ok")
            .count()
    };
    wait_for_daemon(
        &daemon,
        "a dump of each cluster, each in its repository",
        Duration::from_secs(60),
        || dumps(&s.repo(), "shop", "sales") >= 1 && dumps(&other, "depot", "stock") >= 1,
    );
    let (code, log) = stop(daemon);
    assert_eq!(code, 0, "{log}");
    // Nothing crossed over.
    assert_eq!(dumps(&s.repo(), "depot", "stock"), 0);
    assert_eq!(dumps(&other, "shop", "sales"), 0);
}
