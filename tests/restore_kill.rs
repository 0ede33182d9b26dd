//! RELIABILITY row 4: `pgkeep restore` killed with SIGKILL midway (no chance to clean up).
//!
//! What a user relies on: the half-written directory is marked incomplete (the marker is
//! there; neither backup_label nor global/pg_control, so PostgreSQL refuses to start it); a
//! plain rerun is refused with exit 2 naming the incomplete restore; a rerun with `--delta`
//! completes it, and the cluster starts with exactly the backed-up data: pg_dumpall of the
//! whole cluster (several databases, template1, roles, a relocated tablespace) equal to the
//! source's.

mod cli_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cli_support::{assert_same_cluster, populate_whole_cluster, Sandbox};
use pgkeep_testing::Cluster;

const MARKER: &str = "pgkeep.restore-incomplete";

/// Bytes of regular files under `dir` (symlinks not followed); 0 when it does not exist.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_dir() {
            n += bytes_under(&e.path());
        } else if m.is_file() {
            n += m.len();
        }
    }
    n
}

#[test]
fn restore_killed_midway_is_marked_refused_and_completed_by_delta() {
    let src = Cluster::new().unwrap();
    let s = Sandbox::new();
    let whole = populate_whole_cluster(&src, &s);
    src.pgbench(&["-i", "-s", "10", "-q"]).unwrap();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let pgdata = src.pgdata().to_str().unwrap().to_string();
    s.run_repo(
        &["backup", "--pgdata", &pgdata, "--pg", &src.conninfo()],
        &[],
    )
    .expect(0);
    let dump = src.pg_dumpall().unwrap();
    let total = s
        .run_repo(&["--json", "info", "latest"], &[])
        .expect(0)
        .json()["backup"]["logical_bytes"]
        .as_u64()
        .expect("logical_bytes in info --json");
    assert!(
        total > 100 << 20,
        "a backup large enough to kill midway: {total}"
    );

    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("t");
    let ts_map = whole.tablespace_map(&work.path().join("t-ts"));
    let repo = s.repo();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
        .args(["--repo", repo.to_str().unwrap(), "-q", "restore", "latest"])
        .arg("--target-dir")
        .arg(&target)
        .args(["--tablespace-map", &ts_map])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once a fifth of the data is written: files are being written, the completing ones
    // (pg_control, backup_label) are not yet.
    let t = Instant::now();
    let written = loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "restore ended ({st}) before it could be killed midway; written {} of {total}",
                bytes_under(&target)
            );
        }
        let b = bytes_under(&target);
        if target.join(MARKER).exists() && b > total / 5 {
            break b;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "restore made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    // Child::kill is SIGKILL on Unix: no handler runs, nothing is cleaned up.
    child.kill().unwrap();
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(9), "killed, not finished: {st}");
    eprintln!("killed after {written} of {total} bytes");

    assert!(target.join(MARKER).exists(), "marked incomplete");
    assert!(!target.join("backup_label").exists());
    assert!(!target.join("global/pg_control").exists());
    assert!(bytes_under(&target) < total, "the restore did not finish");
    // PostgreSQL refuses the directory.
    let refused = Cluster::builder()
        .start_timeout(Duration::from_secs(20))
        .start_existing(&target);
    assert!(refused.is_err(), "PostgreSQL must not start a half restore");

    // A plain rerun: refused (exit 2), saying why, writing nothing.
    let r = s.run_repo(
        &[
            "restore",
            "latest",
            "--target-dir",
            target.to_str().unwrap(),
            "--tablespace-map",
            &ts_map,
        ],
        &[],
    );
    r.expect(2);
    let r = s.run_repo(
        &[
            "restore",
            "latest",
            "--target-dir",
            target.to_str().unwrap(),
            "--tablespace-map",
            &ts_map,
        ],
        &[],
    );
    assert!(r.stderr().contains("incomplete restore"), "{}", r.stderr());
    assert!(r.stderr().contains("--delta"), "{}", r.stderr());
    assert!(target.join(MARKER).exists());

    // --delta completes it; the cluster starts with the backed-up data.
    s.run_repo(
        &[
            "restore",
            "latest",
            "--target-dir",
            target.to_str().unwrap(),
            "--tablespace-map",
            &ts_map,
            "--delta",
        ],
        &[],
    )
    .expect(0);
    assert!(!target.join(MARKER).exists());
    assert!(target.join("backup_label").exists());
    let restored = Cluster::builder().start_existing(&target).unwrap();
    assert_same_cluster(&dump, &restored);
}
