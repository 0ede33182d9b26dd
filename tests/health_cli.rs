//! Issue 15 through the built binary, against real PostgreSQL clusters:
//! - run history: ok and failed runs are recorded with their exit code and message, shared
//!   through the repository, filtered by `history --kind/--limit`, bounded by `expire`, and no
//!   secret (passphrase, PGPASSWORD) ever appears in a record or an output (canaries);
//! - `check`: thresholds crossed by dumps the test made (a 1 s age limit and a short sleep),
//!   a dump that shrank by more than half, the Nagios codes 0/1/2/3 and the usual codes;
//! - `status`, `metrics` (checked by `promtool check metrics`), `metrics --output` written
//!   whole, the CloudWatch embedded metric format.

mod cli_support;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{promtool, sample, Sandbox};
use pgkeep_testing::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");
const PASS: &str = "canary-passphrase-7Qx2";
const PGPW: &str = "canary-pgpassword-3Kd9";

/// Writes a configuration file into the sandbox; returns its path.
fn config(s: &Sandbox, name: &str, body: &str) -> String {
    let p = s.path().join(name);
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

fn no_canary(what: &str, text: &str) {
    assert!(
        !text.contains(PASS) && !text.contains(PGPW),
        "a secret leaked into {what}:\n{text}"
    );
}

fn records(h: &serde_json::Value) -> Vec<serde_json::Value> {
    h["records"].as_array().unwrap().clone()
}

#[test]
fn history_records_ok_and_failed_runs_is_bounded_and_never_holds_secrets() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init"], &[("PGKEEP_PASSPHRASE", PASS)])
        .expect(0);
    let mut c = Cluster::new().unwrap();
    let conn = c.conninfo();
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let env = [
        ("PGKEEP_PASSPHRASE", PASS),
        ("PGKEEP_PG", conn.as_str()),
        ("PGPASSWORD", PGPW),
    ];

    let ok = s.run_repo(&["dump", "--db", "postgres"], &env).expect(0);
    no_canary("dump output", &(ok.stdout() + &ok.stderr()));
    c.stop().unwrap();
    // Against a stopped server: the runs fail, and their failure is recorded.
    let dump = s.run_repo(&["dump", "--db", "postgres"], &env);
    assert!(![0, 3].contains(&dump.code()), "{}", dump.stderr());
    let backup = s.run_repo(&["backup", "--pgdata", &pgdata], &env);
    assert!(![0, 3].contains(&backup.code()), "{}", backup.stderr());
    for r in [&dump, &backup] {
        no_canary("a failed run's output", &(r.stdout() + &r.stderr()));
        assert!(!r.stderr().contains("not recorded"), "{}", r.stderr());
    }

    let h = s.run_repo(&["--json", "history"], &env).expect(0);
    no_canary("history --json", &h.stdout());
    let recs = records(&h.json());
    assert_eq!(recs.len(), 3, "{recs:?}");
    let (first, failed_dump, failed_backup) = (&recs[0], &recs[1], &recs[2]);
    assert_eq!(first["kind"], "dump");
    assert_eq!(first["database"], "postgres");
    assert_eq!(first["result"], "ok");
    assert_eq!(first["exit_code"], 0);
    assert!(first["backup_id"].is_string(), "{first}");
    assert!(first["bytes_stored"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));
    assert!(!first["host"].as_str().unwrap().is_empty());
    for (rec, run, kind) in [
        (failed_dump, &dump, "dump"),
        (failed_backup, &backup, "backup"),
    ] {
        assert_eq!(rec["kind"], kind);
        assert_eq!(rec["result"], "failed");
        assert_eq!(rec["exit_code"], run.code());
        let msg = rec["error"].as_str().unwrap();
        assert!(
            !msg.is_empty() && run.stderr().contains(msg),
            "{rec}\n{}",
            run.stderr()
        );
        let started: chrono::DateTime<chrono::Utc> =
            rec["started"].as_str().unwrap().parse().unwrap();
        let ended: chrono::DateTime<chrono::Utc> = rec["ended"].as_str().unwrap().parse().unwrap();
        assert!(started <= ended);
    }
    // The records are sealed objects of their own under history/<cluster>/.
    let dir = s.repo().join("history/main");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 3);
    for f in &files {
        no_canary(
            "a record",
            &String::from_utf8_lossy(&std::fs::read(f.path()).unwrap()),
        );
    }
    let text = s.run_repo(&["history"], &env).expect(0).stdout();
    assert!(text.contains("failed") && text.contains("dump"), "{text}");
    no_canary("history", &text);

    let h = s
        .run_repo(
            &["--json", "history", "--kind", "dump", "--limit", "1"],
            &env,
        )
        .expect(0)
        .json();
    let recs = records(&h);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["result"], "failed");

    // The health check sees the failed runs: CRITICAL, naming them.
    let cfg = config(&s, "h.toml", "[health]\ncheck_archiving = false\n");
    let r = s
        .run_repo(&["--config", &cfg, "check", "--nagios"], &env)
        .expect(2);
    let line = r.stdout();
    assert!(line.starts_with("PGKEEP CRITICAL - "), "{line}");
    assert!(line.contains("last_run:dump:postgres: failed"), "{line}");
    assert!(line.contains("last_run:backup: failed"), "{line}");
    assert_eq!(line.lines().count(), 1, "{line}");
    no_canary("check --nagios", &line);

    // Bounded: records older than history_max_age go, the newest of each (kind, database)
    // stays, however old.
    std::thread::sleep(Duration::from_millis(1100));
    let cfg = config(&s, "e.toml", "[health]\nhistory_max_age = \"1s\"\n");
    let e = s
        .run_repo(
            &["--config", &cfg, "--json", "expire", "--keep-last", "5"],
            &env,
        )
        .expect(0)
        .json();
    assert_eq!(e["history"]["removed"], 1, "{e}");
    let recs = records(&s.run_repo(&["--json", "history"], &env).expect(0).json());
    let seen: Vec<(String, String)> = recs
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().into(),
                r["result"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = [("dump", "failed"), ("backup", "failed"), ("expire", "ok")];
    assert_eq!(
        seen,
        want.map(|(k, r)| (k.to_string(), r.to_string())),
        "{recs:?}"
    );
}

#[test]
fn check_judges_ages_and_a_shrunk_dump_with_nagios_and_usual_codes() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let c = Cluster::new().unwrap();
    c.sql("CREATE DATABASE app").unwrap();
    c.sql_db(
        "app",
        "CREATE TABLE big AS SELECT g, md5(g::text) AS t FROM generate_series(1, 50000) g",
    )
    .unwrap();
    let conn = c.conninfo();
    let env = [("PGKEEP_PG", conn.as_str())];
    s.run_repo(&["dump", "--db", "app"], &env).expect(0);

    let relaxed = config(
        &s,
        "relaxed.toml",
        "[health]\ncheck_archiving = false\ndump_warn_age = \"1h\"\n",
    );
    let r = s
        .run_repo(&["--config", &relaxed, "check", "--nagios"], &env)
        .expect(0);
    assert!(r.stdout().starts_with("PGKEEP OK - "), "{}", r.stdout());
    assert!(r.stdout().contains(" | "), "{}", r.stdout());
    assert!(
        r.stdout().contains("dump_age_seconds_app=") && r.stdout().contains("s;3600;180000"),
        "{}",
        r.stdout()
    );
    let r = s.run_repo(&["--config", &relaxed, "check"], &env).expect(0);
    assert!(
        r.stdout().contains("health of cluster main: OK"),
        "{}",
        r.stdout()
    );

    // Free space, with thresholds from PGKEEP_HEALTH_* over the file (the harness sets them
    // to 1 % so that a nearly full CI disk does not fail unrelated checks).
    let free_item = |j: &serde_json::Value| {
        j["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "repository_free_space")
            .cloned()
            .unwrap()
    };
    let full = [
        ("PGKEEP_PG", conn.as_str()),
        ("PGKEEP_HEALTH_FREE_SPACE_WARN", "100"),
    ];
    let j = s
        .run_repo(&["--config", &relaxed, "--json", "check"], &full)
        .expect(3)
        .json();
    assert_eq!(free_item(&j)["status"], "warning", "{j}");
    let full = [
        ("PGKEEP_PG", conn.as_str()),
        ("PGKEEP_HEALTH_FREE_SPACE_WARN", "100"),
        ("PGKEEP_HEALTH_FREE_SPACE_CRIT", "100"),
    ];
    let j = s
        .run_repo(&["--config", &relaxed, "--json", "check"], &full)
        .expect(1)
        .json();
    assert_eq!(free_item(&j)["status"], "critical", "{j}");

    // An age threshold crossed by the dump this test made.
    std::thread::sleep(Duration::from_millis(1100));
    let warn = config(
        &s,
        "warn.toml",
        "[health]\ncheck_archiving = false\ndump_warn_age = \"1s\"\n",
    );
    let r = s
        .run_repo(&["--config", &warn, "check", "--nagios"], &env)
        .expect(1);
    assert!(
        r.stdout().starts_with("PGKEEP WARNING - "),
        "{}",
        r.stdout()
    );
    assert!(r.stdout().contains("dump_age:app"), "{}", r.stdout());
    s.run_repo(&["--config", &warn, "check"], &env).expect(3);
    let j = s
        .run_repo(&["--config", &warn, "--json", "check"], &env)
        .expect(3)
        .json();
    assert_eq!(j["status"], "warning");
    let item = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "dump_age:app")
        .unwrap()
        .clone();
    assert_eq!(item["status"], "warning", "{item}");
    assert!(item["perf"]["value"].as_f64().unwrap() >= 1.0, "{item}");

    // Per cluster: [cluster.health] over [health].
    let crit = config(
        &s,
        "crit.toml",
        "[health]\ncheck_archiving = false\ndump_crit_age = \"1h\"\n\n\
         [[cluster]]\nname = \"main\"\n[cluster.health]\ndump_crit_age = \"1s\"\n",
    );
    let r = s
        .run_repo(&["--config", &crit, "check", "--nagios"], &env)
        .expect(2);
    assert!(
        r.stdout().starts_with("PGKEEP CRITICAL - "),
        "{}",
        r.stdout()
    );
    let r = s.run_repo(&["--config", &crit, "check"], &env).expect(1);
    assert!(r.stderr().contains("is not healthy"), "{}", r.stderr());

    // The check cannot run at all: UNKNOWN.
    let missing = s.path().join("no-such-repo");
    let r = s
        .run(
            &[
                "--repo",
                missing.to_str().unwrap(),
                "--config",
                &relaxed,
                "check",
                "--nagios",
            ],
            &env,
        )
        .expect(3);
    assert!(
        r.stdout().starts_with("PGKEEP UNKNOWN - "),
        "{}",
        r.stdout()
    );
    // So is a configuration that does not load (exit 2 without --nagios).
    let bad = config(&s, "bad.toml", "[health]\ndump_warn_age = \"soon\"\n");
    let r = s
        .run_repo(&["--config", &bad, "check", "--nagios"], &env)
        .expect(3);
    assert!(
        r.stdout().starts_with("PGKEEP UNKNOWN - "),
        "{}",
        r.stdout()
    );
    assert!(r.stdout().contains("dump_warn_age"), "{}", r.stdout());
    s.run_repo(&["--config", &bad, "check"], &env).expect(2);

    // The classic empty dump: the table emptied, the next dump is far smaller.
    c.sql_db("app", "TRUNCATE big").unwrap();
    s.run_repo(&["dump", "--db", "app"], &env).expect(0);
    let j = s
        .run_repo(&["--config", &relaxed, "--json", "check"], &env)
        .expect(1)
        .json();
    let item = j["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "dump_size:app")
        .unwrap()
        .clone();
    assert_eq!(item["status"], "critical", "{item}");
    assert!(item["perf"]["value"].as_f64().unwrap() > 50.0, "{item}");
    let r = s
        .run_repo(&["--config", &relaxed, "check", "--nagios"], &env)
        .expect(2);
    assert!(r.stdout().contains("dump_size:app"), "{}", r.stdout());
}

fn start_archiving(s: &Sandbox) -> Cluster {
    let command = format!(
        "{BIN} --config {} --repo {} archive-push %p",
        s.path().join("empty.toml").display(),
        s.repo().display()
    );
    Cluster::builder()
        .archive_command(&command)
        .start()
        .unwrap()
}

/// Switches WAL and waits until the server archived the segment.
fn switch_and_wait(c: &Cluster) {
    let last = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let archived = c
            .sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
            .unwrap();
        if archived >= last {
            return;
        }
        assert!(Instant::now() < deadline, "{last} not archived");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_and_metrics_of_an_archiving_cluster_pass_promtool() {
    let s = Sandbox::shared();
    let c = start_archiving(&s);
    let conn = c.conninfo();
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let env = [("PGKEEP_PG", conn.as_str())];
    let b = s
        .run_repo(&["--json", "backup", "--pgdata", &pgdata], &env)
        .expect(0)
        .json();
    let id = b["id"].as_str().unwrap().to_string();
    c.sql("CREATE TABLE t AS SELECT 1 AS x").unwrap();
    s.run_repo(&["dump", "--db", "postgres"], &env).expect(0);
    switch_and_wait(&c);

    // The whole check, archiving end to end included: healthy, the archiving fields as before.
    let j = s.run_repo(&["--json", "check"], &env).expect(0).json();
    assert_eq!(j["status"], "ok", "{j}");
    assert_eq!(j["arrived"], true, "{j}");

    let st = s.run_repo(&["--json", "status"], &env).expect(0).json();
    assert_eq!(st["backup"]["id"], id.as_str(), "{st}");
    assert_eq!(st["dumps"][0]["database"], "postgres", "{st}");
    let w = &st["recovery_window"];
    let earliest: chrono::DateTime<chrono::Utc> = w["earliest"].as_str().unwrap().parse().unwrap();
    let latest: chrono::DateTime<chrono::Utc> = w["latest"].as_str().unwrap().parse().unwrap();
    assert!(earliest <= latest, "{w}");
    assert!(st["wal_newest_segment"].is_string(), "{st}");
    assert!(st["repository_bytes"].as_u64().unwrap() > 0);
    let text = s.run_repo(&["status"], &env).expect(0).stdout();
    assert!(
        text.contains("recovery window") && text.contains(&id),
        "{text}"
    );

    let m = s.run_repo(&["metrics"], &env).expect(0).stdout();
    promtool(&m);
    let l = "{cluster=\"main\",kind=\"backup\",database=\"\"}";
    assert!(
        sample(&m, &format!("pgkeep_backup_size_bytes{l}")) > 1e6,
        "{m}"
    );
    assert!(sample(&m, &format!("pgkeep_backup_completed_timestamp_seconds{l}")) > 1.7e9);
    assert_eq!(
        sample(
            &m,
            "pgkeep_last_run_result{cluster=\"main\",kind=\"backup\",database=\"\",result=\"ok\"}"
        ),
        1.0
    );
    let end = sample(
        &m,
        "pgkeep_recovery_window_end_timestamp_seconds{cluster=\"main\"}",
    );
    assert!(
        (end - latest.timestamp() as f64).abs() < 1.0,
        "{end} {latest}"
    );
    assert!(sample(&m, "pgkeep_wal_archive_lag_bytes{cluster=\"main\"}") >= 0.0);
    assert_eq!(
        sample(
            &m,
            "pgkeep_run_failures_total{cluster=\"main\",kind=\"backup\"}"
        ),
        0.0
    );
    assert!(
        m.contains("# TYPE pgkeep_run_failures_total counter"),
        "{m}"
    );

    // --output: replaced whole, through a temporary that does not stay behind.
    let dir: PathBuf = s.path().join("textfile");
    std::fs::create_dir(&dir).unwrap();
    let out = dir.join("pgkeep.prom");
    std::fs::write(&out, "stale content").unwrap();
    let r = s
        .run_repo(&["metrics", "--output", out.to_str().unwrap()], &env)
        .expect(0);
    assert_eq!(r.stdout(), "");
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(
        written.starts_with("# HELP ") && written.ends_with('\n'),
        "{written}"
    );
    promtool(&written);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

    let cw = s
        .run_repo(&["metrics", "--format", "cloudwatch-json"], &env)
        .expect(0)
        .stdout();
    let doc: serde_json::Value = serde_json::from_str(cw.trim()).unwrap();
    assert_eq!(doc["_aws"]["CloudWatchMetrics"][0]["Namespace"], "pgkeep");
    assert_eq!(doc["cluster"], "main");
    assert!(doc["BackupAgeSeconds"].as_f64().unwrap() >= 0.0, "{doc}");
}

/// SIGTERM in the middle of a dump: exit 130, and the run is in the history as interrupted
/// (recorded after the command's work was dropped).
#[test]
fn an_interrupted_dump_is_recorded_as_interrupted() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let c = Cluster::new().unwrap();
    c.sql("CREATE DATABASE app").unwrap();
    c.sql_db(
        "app",
        "CREATE TABLE big AS SELECT g, md5(g::text) || md5((g + 1)::text) AS t \
         FROM generate_series(1, 2000000) g",
    )
    .unwrap();
    let conn = c.conninfo();
    let repo = s.repo();
    let child = Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
        .env("PGKEEP_PG", &conn)
        .args(["--repo", repo.to_str().unwrap(), "dump", "--db", "app"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h = s
        .run_repo(&["--json", "history", "--kind", "dump"], &[])
        .expect(0)
        .json();
    let recs = records(&h);
    assert_eq!(recs.len(), 1, "{h}");
    assert_eq!(recs[0]["result"], "interrupted");
    assert_eq!(recs[0]["exit_code"], 130);
    assert_eq!(recs[0]["database"], "app");
    assert_eq!(recs[0]["error"], "terminated");
    // No dump was saved: the interruption left nothing but the record.
    let list = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert_eq!(list["backups"].as_array().unwrap().len(), 0, "{list}");
}
