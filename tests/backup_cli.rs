//! `pgkeep backup`, `list`, `info` and `restore` through the built binary.
//!
//! - RELIABILITY row 21 as a user who is not root (the checks only mean something then):
//!   a target owned by another user, or lacking read/write/search permission for this one, or
//!   holding postmaster.pid, is refused with exit 2 naming the directory and why, and nothing
//!   is written into it; an empty directory of one's own is restored into.

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
    if !pgkeep_testing::cluster::running_as_root() {
        eprintln!("skipped: needs root to act as two users");
        return;
    }
    let c = Cluster::new().unwrap();
    c.sql("create table t(v text); insert into t values ('row 21')")
        .unwrap();
    let u = AsServerUser::new();
    u.run(&["repo", "init", "--no-encryption"]).expect(0);
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    u.run(&["backup", "--pgdata", &pgdata, "--pg", &c.conninfo()])
        .expect(0);

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
    u.run(&["restore", "latest", "--target-dir", ok.to_str().unwrap()])
        .expect(0);
    assert!(ok.join("PG_VERSION").exists());
    let restored = Cluster::builder().start_existing(&ok).unwrap();
    assert_eq!(restored.sql("select v from t").unwrap(), "row 21");
}
