//! `pgkeep backup`, `list`, `info` and `restore` through the built binary.
//!
//! - RELIABILITY row 21 as a user who is not root (the checks only mean something then):
//!   a target owned by another user, or lacking read/write/search permission for this one, or
//!   holding postmaster.pid, is refused with exit 2 naming the directory and why, and nothing
//!   is written into it; an empty directory of one's own is restored into, and the cluster
//!   started there is the source, pg_dumpall of the whole cluster for pg_dumpall (several
//!   databases, template1, roles, a relocated tablespace).

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_support::Run;
use pgkeep_testing::Cluster;

const PG_USER: &str = "postgres";

fn uid_gid(user: &str) -> (u32, u32) {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let out = Command::new("id").args(["-g", user]).output().unwrap();
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (uid, gid)
}

fn chown(p: &Path, user: &str) {
    let (u, g) = uid_gid(user);
    std::os::unix::fs::chown(p, Some(u), Some(g)).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A scratch directory owned by the PostgreSQL server user, with an empty config file, from
/// which `pgkeep` runs as that user (through `runuser`, with a clean environment).
struct AsServerUser {
    dir: tempfile::TempDir,
}

impl AsServerUser {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        chown(dir.path(), PG_USER);
        chmod(dir.path(), 0o700);
        let cfg = dir.path().join("empty.toml");
        std::fs::write(&cfg, "").unwrap();
        chown(&cfg, PG_USER);
        AsServerUser { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn repo(&self) -> PathBuf {
        self.path().join("repo")
    }

    /// `pgkeep --repo <repo> ARGS` as the server user.
    fn run(&self, args: &[&str]) -> Run {
        let home = format!("HOME={}", self.path().display());
        let cfg = format!("PGKEEP_CONFIG={}", self.path().join("empty.toml").display());
        let repo = self.repo();
        let out = Command::new("runuser")
            .args(["-u", PG_USER, "--", "env", "-i", "PATH=/usr/bin:/bin"])
            .args([home.as_str(), cfg.as_str()])
            .arg(env!("CARGO_BIN_EXE_pgkeep"))
            .args(["--repo", repo.to_str().unwrap()])
            .args(args)
            .current_dir(self.path())
            .output()
            .unwrap();
        Run(out)
    }
}

fn is_empty(p: &Path) -> bool {
    std::fs::read_dir(p).unwrap().next().is_none()
}

#[test]
fn restore_refuses_targets_of_other_users_without_rwx_or_with_postmaster_pid() {
    if !pgkeep_testing::cluster::require_root("acting as two users") {
        return;
    }
    let c = Cluster::new().unwrap();
    // The tablespace's directory lives in a sandbox of its own.
    let ts_holder = cli_support::Sandbox::new();
    let whole = cli_support::populate_whole_cluster(&c, &ts_holder);
    c.sql("create table t(v text); insert into t values ('row 21')")
        .unwrap();
    let u = AsServerUser::new();
    u.run(&["repo", "init", "--no-encryption"]).expect(0);
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    u.run(&["backup", "--pgdata", &pgdata, "--pg", &c.conninfo()])
        .expect(0);
    let want = c.pg_dumpall().unwrap();

    let mk = |name: &str, owner: &str, mode: u32| {
        let p = u.path().join(name);
        std::fs::create_dir(&p).unwrap();
        chown(&p, owner);
        chmod(&p, mode);
        p
    };
    // (directory, what the message must say)
    let refused = [
        (mk("owned-by-root", "root", 0o777), "owned by uid 0"),
        (mk("owned-by-nobody", "nobody", 0o777), "owned by uid"),
        (
            mk("read-only", PG_USER, 0o500),
            "not readable, writable and searchable",
        ),
        (
            mk("not-readable", PG_USER, 0o300),
            "not readable, writable and searchable",
        ),
    ];
    for (dir, why) in &refused {
        for extra in [&[][..], &["--force"][..], &["--delta"][..]] {
            let mut args = vec!["restore", "latest", "--target-dir", dir.to_str().unwrap()];
            args.extend_from_slice(extra);
            let r = u.run(&args).expect(2);
            let err = r.stderr();
            assert!(
                err.contains(dir.to_str().unwrap()) && err.contains(why),
                "{extra:?} {}: {err}",
                dir.display()
            );
            assert!(err.contains("HINT"), "{err}");
            assert!(is_empty(dir), "{} was written into", dir.display());
        }
    }

    // postmaster.pid in a directory of one's own: refused even with --force.
    let running = mk("with-pid", PG_USER, 0o700);
    std::fs::write(running.join("postmaster.pid"), "4242\n").unwrap();
    chown(&running.join("postmaster.pid"), PG_USER);
    for extra in [&[][..], &["--force"][..], &["--delta"][..]] {
        let mut args = vec![
            "restore",
            "latest",
            "--target-dir",
            running.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let err = u.run(&args).expect(2).stderr();
        assert!(
            err.contains("postmaster.pid") && err.contains("HINT"),
            "{err}"
        );
        let names: Vec<_> = std::fs::read_dir(&running)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["postmaster.pid"], "nothing else written");
    }

    // The control: an empty directory of one's own is restored into, and starts.
    let ok = mk("mine", PG_USER, 0o700);
    let ts_map = whole.tablespace_map(&u.path().join("mine-ts"));
    u.run(&[
        "restore",
        "latest",
        "--target-dir",
        ok.to_str().unwrap(),
        "--tablespace-map",
        &ts_map,
    ])
    .expect(0);
    assert!(ok.join("PG_VERSION").exists());
    let restored = Cluster::builder().start_existing(&ok).unwrap();
    assert_eq!(restored.sql("select v from t").unwrap(), "row 21");
    cli_support::assert_same_cluster(&want, &restored);
}

/// An LSN `X/Y` as a number, for ordering.
fn lsn(s: &str) -> u64 {
    let (hi, lo) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {s}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

fn time(v: &serde_json::Value) -> std::time::SystemTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time: {v}"));
    // RFC 3339 as chrono writes it: 2026-12-01T18:40:12.123456789Z
    let out = Command::new("date")
        .args(["-u", "-d", s, "+%s.%N"])
        .output()
        .unwrap();
    assert!(out.status.success(), "date cannot parse {s}");
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(secs)
}

#[test]
fn list_and_info_json_for_scripts_and_plain_progress_without_a_terminal() {
    let c = Cluster::new().unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();
    let s = cli_support::Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let conn = c.conninfo();

    // No terminal (stderr is a pipe): progress as plain lines, no bar drawing.
    let r = s
        .run_repo(&["backup", "--pgdata", &pgdata, "--pg", &conn], &[])
        .expect(0);
    let err = r.stderr();
    assert!(
        !err.contains('\r') && !err.contains('\u{1b}'),
        "control characters in the progress output: {err:?}"
    );
    assert!(err.ends_with('\n'), "whole lines: {err:?}");
    assert!(err.contains("pg_backup_start"), "{err}");
    assert!(err.contains("pg_backup_stop"), "{err}");
    let phase_lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("backup: ") && l.contains(" files, "))
        .collect();
    assert!(
        phase_lines.iter().any(|l| l.contains("done")),
        "a line for the end of the backup phase: {err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("wal: ") && l.contains("done")),
        "{err}"
    );
    assert!(
        r.stdout().contains(" of cluster main done"),
        "{}",
        r.stdout()
    );
    // -q: nothing but errors.
    let quiet = s
        .run_repo(&["-q", "backup", "--pgdata", &pgdata, "--pg", &conn], &[])
        .expect(0);
    assert_eq!(quiet.stderr(), "");

    c.sql("update pgbench_accounts set abalance = 1 where aid < 100")
        .unwrap();
    let third = s
        .run_repo(
            &[
                "-q", "--json", "backup", "--pgdata", &pgdata, "--pg", &conn, "--label", "nightly",
            ],
            &[],
        )
        .expect(0)
        .json();
    let id3 = third["id"].as_str().unwrap().to_string();

    let l = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert_eq!(l["cluster"], "main");
    let backups = l["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 3);
    let ids: Vec<&str> = backups.iter().map(|b| b["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "newest last");
    assert_eq!(ids[2], id3);
    let mut prev_stop = 0;
    for b in backups {
        assert_eq!(b["kind"], "physical", "{b}");
        let (start, stop) = (time(&b["start_time"]), time(&b["stop_time"]));
        assert!(start <= stop, "{b}");
        let (a, z) = (
            lsn(b["start_lsn"].as_str().unwrap()),
            lsn(b["stop_lsn"].as_str().unwrap()),
        );
        assert!(a < z && a > prev_stop, "{b}");
        prev_stop = z;
        assert!(b["logical_bytes"].as_u64().unwrap() > 20 << 20, "{b}");
        for k in ["new_bytes", "stored_bytes"] {
            assert!(b[k].as_u64().is_some(), "{k} in {b}");
        }
        assert_eq!(b["page_checksum_failures"], 0, "{b}");
    }
    assert_eq!(backups[2]["label"], "nightly");
    // The first backup stored the data; the later ones little of it.
    assert!(
        backups[2]["stored_bytes"].as_u64().unwrap() * 5
            < backups[0]["stored_bytes"].as_u64().unwrap(),
        "{l}"
    );
    let text = s.run_repo(&["list"], &[]).expect(0).stdout();
    for id in &ids {
        assert!(text.contains(id), "{text}");
    }

    let i = s
        .run_repo(&["--json", "info", "latest"], &[])
        .expect(0)
        .json();
    assert_eq!(i["backup"], backups[2], "info's summary is list's line");
    let p = &i["physical"];
    assert_eq!(p["start_lsn"], backups[2]["start_lsn"]);
    assert_eq!(p["stop_lsn"], backups[2]["stop_lsn"]);
    assert_eq!(p["timeline"], 1);
    assert_eq!(p["method"], "local");
    assert_eq!(
        p["system_identifier"].as_str().unwrap(),
        c.sql("select system_identifier from pg_control_system()")
            .unwrap()
    );
    assert!(p["totals"]["files"].as_u64().unwrap() > 100, "{p}");
    for k in [
        "logical_bytes",
        "bytes_read",
        "new_bytes",
        "stored_bytes",
        "wal_bytes",
    ] {
        assert!(p["totals"][k].as_u64().is_some(), "{k} in {p}");
    }
    assert!(!p["wal"].as_array().unwrap().is_empty(), "{p}");
    let first = s
        .run_repo(&["--json", "info", ids[0]], &[])
        .expect(0)
        .json();
    assert_eq!(first["backup"]["id"], ids[0]);
    assert!(!i.to_string().contains("conninfo") && !i.to_string().contains(&conn));
}
