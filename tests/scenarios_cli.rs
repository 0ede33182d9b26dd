//! RELIABILITY.md scenarios through the binary that no other test file holds: a pack deleted
//! under a backup (row 12), a damaged manifest and an altered `config` (row 13), and the
//! binary under `umask 000` (row 26). Each is named after what it reproduces.

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_support::Sandbox;

const PASSPHRASE: &str = "scenario passphrase 5d1e";

/// An encrypted repository in the sandbox with one physical backup and one dump of a small
/// cluster; returns the cluster and the backup's id.
fn backed_up(s: &Sandbox) -> (pgkeep_testing::Cluster, String) {
    let c = pgkeep_testing::Cluster::new().unwrap();
    c.sql("CREATE TABLE t AS SELECT g, md5(g::text) m FROM generate_series(1, 50000) g")
        .unwrap();
    let env = [("PGKEEP_PASSPHRASE", PASSPHRASE)];
    s.run_repo(&["repo", "init"], &env).expect(0);
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let b = s
        .run_repo(
            &[
                "--json",
                "backup",
                "--pgdata",
                &pgdata,
                "--pg",
                &c.conninfo(),
            ],
            &env,
        )
        .expect(0);
    let id = b.json()["id"].as_str().unwrap().to_string();
    s.run_repo(&["dump", "--pg", &c.conninfo(), "--db", "postgres"], &env)
        .expect(0);
    (c, id)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn verify_names_a_deleted_pack_and_marks_the_backup_it_breaks_damaged() {
    let s = Sandbox::new();
    let (_c, id) = backed_up(&s);
    let env = [("PGKEEP_PASSPHRASE", PASSPHRASE)];
    s.run_repo(&["verify"], &env).expect(0);
    // The biggest pack holds the backup's data files.
    let pack = files_under(&s.repo().join("packs"))
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let pack_id = pack.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::remove_file(&pack).unwrap();

    // Before: `verify` looked at the WAL only and said "verify: ok".
    let v = s.run_repo(&["--json", "verify"], &env).expect(13);
    let j = v.json();
    let backup = j["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id.as_str())
        .unwrap();
    assert_eq!(backup["damaged"], true, "{j}");
    let problems = j["repository"]["problems"].to_string();
    assert!(
        problems.contains(&pack_id),
        "the missing pack is named: {problems}"
    );
    let text = s.run_repo(&["verify"], &env).expect(13);
    assert!(
        text.stdout()
            .contains(&format!("backup {id} (timeline 1): DAMAGED")),
        "{}",
        text.stdout()
    );
    assert!(
        text.stderr()
            .contains("a damaged backup cannot be repaired"),
        "the hint is about the backup, not about WAL: {}",
        text.stderr()
    );
    // Plain `repo check`, without reading data, names it too.
    let c = s.run_repo(&["repo", "check"], &env).expect(13);
    assert!(c.stdout().contains(&pack_id), "{}", c.stdout());
    assert!(
        c.stdout().contains(&format!("damaged: main/{id}")),
        "{}",
        c.stdout()
    );
}

#[test]
fn a_flipped_byte_in_a_manifest_is_named_and_list_still_shows_the_other_backups() {
    let s = Sandbox::new();
    let (_c, id) = backed_up(&s);
    let env = [("PGKEEP_PASSPHRASE", PASSPHRASE)];
    let listed = s.run_repo(&["--json", "list"], &env).expect(0).json();
    let dump_id = listed["backups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] != "physical")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let manifest = s.repo().join("backups/main").join(&id);
    let mut bytes = std::fs::read(&manifest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&manifest, &bytes).unwrap();

    // Before: one damaged manifest made `list` fail as a whole and hid every other backup.
    let l = s.run_repo(&["--json", "list"], &env).expect(13);
    let j = l.json();
    assert_eq!(j["damaged"][0]["id"], id.as_str(), "{j}");
    assert!(
        j["damaged"][0]["error"]
            .as_str()
            .unwrap()
            .contains("failed authentication"),
        "{j}"
    );
    let ids: Vec<&str> = j["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![dump_id.as_str()], "the dump is still listed");
    let text = s.run_repo(&["list"], &env).expect(13);
    assert!(
        text.stdout().contains(&format!("{id:<18} DAMAGED: ")),
        "{}",
        text.stdout()
    );
    assert!(text.stderr().contains("restore by id"), "{}", text.stderr());

    // Every reader names the manifest with exit 13, and restore writes nothing.
    let target = s.path().join("restored");
    for args in [
        vec!["repo", "check"],
        vec!["verify"],
        vec!["info", id.as_str()],
        vec![
            "restore",
            id.as_str(),
            "--target-dir",
            target.to_str().unwrap(),
        ],
    ] {
        let r = s.run_repo(&args, &env).expect(13);
        let all = format!("{}{}", r.stdout(), r.stderr());
        assert!(
            all.contains(&format!("backups/main/{id}")),
            "{args:?}: {all}"
        );
    }
    assert!(!target.exists(), "a refused restore created its target");
    // The dump still restores its data elsewhere: `info` of it works.
    s.run_repo(&["info", &dump_id], &env).expect(0);
}

#[test]
fn a_config_altered_to_say_plain_is_refused_by_every_command_with_exit_13() {
    let s = Sandbox::new();
    let (c, _id) = backed_up(&s);
    let env = [("PGKEEP_PASSPHRASE", PASSPHRASE)];
    let config = s.repo().join("config");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"encrypted\": true", "\"encrypted\": false"),
    )
    .unwrap();
    let before: Vec<_> = files_under(&s.repo());
    // Before: `backup` ran and stored this cluster's files in plaintext.
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    for args in [
        vec!["repo", "info"],
        vec!["list"],
        vec!["backup", "--pgdata", &pgdata, "--pg", &c.conninfo()],
    ] {
        let r = s.run_repo(&args, &env).expect(13);
        assert!(
            r.stderr().contains(
                "it says the repository is not encrypted, but the repository holds 1 key file(s)"
            ),
            "{args:?}: {}",
            r.stderr()
        );
    }
    assert_eq!(before, files_under(&s.repo()), "a refused command wrote");
    // A truncated config is "no repository" (10), with the reason.
    std::fs::write(&config, &text[..text.len() / 2]).unwrap();
    let r = s.run_repo(&["list"], &env).expect(10);
    assert!(
        r.stderr().contains("its `config` object is unreadable"),
        "{}",
        r.stderr()
    );
}

#[test]
fn the_binary_under_umask_000_creates_0600_files_and_0700_directories() {
    let s = Sandbox::new();
    let c = pgkeep_testing::Cluster::new().unwrap();
    c.sql("CREATE TABLE t AS SELECT generate_series(1, 1000) g")
        .unwrap();
    let pgkeep = env!("CARGO_BIN_EXE_pgkeep");
    let repo = s.repo();
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let wal = std::fs::read_dir(c.pgdata().join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().len() == 24)
        .unwrap();
    let steps: Vec<Vec<String>> = vec![
        vec!["repo".into(), "init".into()],
        vec![
            "backup".into(),
            "--pgdata".into(),
            pgdata.clone(),
            "--pg".into(),
            c.conninfo(),
        ],
        vec![
            "dump".into(),
            "--pg".into(),
            c.conninfo(),
            "--db".into(),
            "postgres".into(),
        ],
        vec!["archive-push".into(), wal.to_str().unwrap().into()],
    ];
    for step in &steps {
        let out = Command::new("sh")
            .arg("-c")
            .arg("umask 000; exec \"$@\"")
            .arg("sh")
            .arg(pgkeep)
            .args(["--repo", repo.to_str().unwrap()])
            .args(step)
            .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
            .env("PGKEEP_PASSPHRASE", PASSPHRASE)
            .env("HOME", s.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{step:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut checked = 0;
    let mut walk = vec![repo.clone()];
    while let Some(d) = walk.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "directory {} is {mode:o}", d.display());
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk.push(p);
            } else {
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "file {} is {mode:o}", p.display());
                checked += 1;
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} files: the steps stored little"
    );
}

#[test]
fn repo_check_warns_about_a_group_readable_config_file() {
    let s = Sandbox::new();
    let env = [("PGKEEP_PASSPHRASE", PASSPHRASE)];
    s.run_repo(&["repo", "init"], &env).expect(0);
    let cfg = s.path().join("empty.toml");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = s.run_repo(&["repo", "check"], &env).expect(0);
    assert!(
        r.stdout().contains(&format!(
            "config file {} is accessible by group or others (mode bits 044); run `chmod 600 {}`",
            cfg.display(),
            cfg.display()
        )),
        "{}",
        r.stdout()
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = s.run_repo(&["repo", "check"], &env).expect(0);
    assert!(
        !r.stdout().contains("accessible by group"),
        "{}",
        r.stdout()
    );
}

/// The archiver runs as `postgres`; a key file root made (0600) beside one `postgres` can read
/// used to fail every `archive-push` with "permission denied" although the readable key
/// matched.
#[test]
fn a_key_file_this_user_cannot_read_does_not_hide_one_that_matches() {
    if !pgkeep_testing::cluster::require_root("running pgkeep as postgres beside a root key") {
        return;
    }
    let s = Sandbox::new();
    let root_pass = [("PGKEEP_PASSPHRASE", PASSPHRASE)];
    s.run_repo(&["repo", "init"], &root_pass).expect(0);
    let roots_key = files_under(&s.repo().join("keys")).remove(0);
    s.run_repo(
        &["repo", "key", "add"],
        &[
            root_pass[0],
            ("PGKEEP_NEW_PASSPHRASE", "the archiver's passphrase"),
        ],
    )
    .expect(0);
    let chown = |args: &[&str], path: &Path| {
        assert!(Command::new("chown")
            .args(args)
            .arg(path)
            .status()
            .unwrap()
            .success());
    };
    chown(&["-R", "postgres"], s.path());
    chown(&["root"], &roots_key);
    let as_postgres = |pass: &str| {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(env!("CARGO_BIN_EXE_pgkeep"))
            .args(["--repo", s.repo().to_str().unwrap(), "--json", "list"])
            .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
            .env("PGKEEP_PASSPHRASE", pass)
            .output()
            .unwrap()
    };
    let ok = as_postgres("the archiver's passphrase");
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Only the unreadable key would match: the error is the permission, not "wrong passphrase".
    let denied = as_postgres(PASSPHRASE);
    let err = String::from_utf8_lossy(&denied.stderr).to_string();
    assert_eq!(denied.status.code(), Some(1), "{err}");
    assert!(err.to_lowercase().contains("permission"), "{err}");
    assert!(!err.contains(PASSPHRASE), "{err}");
}
