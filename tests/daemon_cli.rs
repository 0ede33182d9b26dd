//! `pgkeep daemon` through the built binary, with second-granularity schedules on a real
//! cluster: it takes dumps and a backup within a bounded wait (recorded in the run history as
//! if run by hand), skips and records a run that falls due while the previous one is still
//! going, runs a missed run once at start-up, reloads on SIGHUP (and keeps the old
//! configuration when the new one is bad), and on SIGTERM exits 0 with its lock released;
//! one daemon serves two clusters backed up to two repositories.

mod cli_support;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
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

fn start_daemon(s: &Sandbox, cfg: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
        .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
        .args(["--config", cfg, "-v", "daemon"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
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

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn stop(mut child: Child) -> (i32, String) {
    signal(&child, "TERM");
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
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().unwrap_or(-1), err)
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

    // A session holds a lock that pg_dump of `slow` waits for: its runs overlap.
    let holder = Command::new("psql")
        .args([&c.conninfo_db("slow"), "-qAt", "-c"])
        .arg("BEGIN; LOCK TABLE held IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(8); COMMIT;")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let schedules = "[[schedule]]\njob = \"dump\"\ncron = \"*/2 * * * * *\"\ncluster = \"main\"\ndb = \"app\"\n\n\
         [[schedule]]\njob = \"backup\"\ncron = \"*/5 * * * * *\"\ncluster = \"main\"\n\n\
         [[schedule]]\njob = \"dump\"\ncron = \"* * * * * *\"\ncluster = \"main\"\ndb = \"slow\"\n";
    let cfg = write_config(&s, &conn, schedules);
    let daemon = start_daemon(&s, &cfg);

    wait_for(
        "two dumps, a backup and a skipped run",
        Duration::from_secs(120),
        || {
            let h = history(&s, &cfg);
            count(&h, "dump", "app", "ok") >= 2
                && count(&h, "backup", "", "ok") >= 1
                && h.iter().any(|(k, d, r, e)| {
                    k == "dump" && d == "slow" && r == "warning" && e.contains("skipped")
                })
        },
    );
    let mut holder = holder;
    let _ = holder.wait();

    // SIGHUP with a bad file: refused, the old schedules go on.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{good}\n[[schedule]]\njob = \"dump\"\ncron = \"99 * * * * *\"\ndb = \"app\"\n"),
    )
    .unwrap();
    signal(&daemon, "HUP");
    std::thread::sleep(Duration::from_millis(500));
    let before = count(&history(&s, &cfg), "dump", "app", "ok");
    wait_for(
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
    signal(&daemon, "HUP");
    let before = count(&history(&s, &cfg), "dump", "app", "ok");
    wait_for("dumps after the reload", Duration::from_secs(30), || {
        count(&history(&s, &cfg), "dump", "app", "ok") >= before + 2
    });

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
    wait_for("the missed dump", Duration::from_secs(60), || {
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
    let mut holder = Command::new("psql")
        .args([&c.conninfo_db("slow"), "-qAt", "-c"])
        .arg("BEGIN; LOCK TABLE held IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60); COMMIT;")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
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
    wait_for("the dump to start", Duration::from_secs(30), || {
        !no_locks(&s.repo())
    });
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
    let _ = holder.kill();
    let _ = holder.wait();
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
    wait_for(
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
