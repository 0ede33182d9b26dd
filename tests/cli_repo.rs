//! `pgkeep repo ...` end to end: the real binary on a local repository in a temp dir.

mod cli_support;

use cli_support::{listing, Sandbox};

const PASS: (&str, &str) = ("PGKEEP_PASSPHRASE", "correct horse battery staple");

#[test]
fn init_plain_then_info_and_check_as_json() {
    let s = Sandbox::new();
    let r = s
        .run_repo(
            &[
                "repo",
                "init",
                "--no-encryption",
                "--compression-level",
                "7",
            ],
            &[],
        )
        .expect(0);
    assert!(
        r.stdout().starts_with("created a plain repository "),
        "{}",
        r.stdout()
    );

    let info = s
        .run_repo(&["--json", "repo", "info"], &[])
        .expect(0)
        .json();
    assert_eq!(info["encrypted"], false);
    assert_eq!(info["compression_level"], 7);
    assert_eq!(info["keys"], 0);
    assert_eq!(info["manifests"], 0);
    assert!(info["id"].as_str().unwrap().len() >= 16);

    let check = s
        .run_repo(&["--json", "repo", "check"], &[])
        .expect(0)
        .json();
    assert_eq!(check["ok"], true);
    assert_eq!(check["read_data"], false);
    assert_eq!(check["problems"], serde_json::json!([]));
    let check = s
        .run_repo(&["--json", "repo", "check", "--read-data"], &[])
        .expect(0)
        .json();
    assert_eq!(check["read_data"], true);

    // Files 0600, directories 0700.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.repo()), 0o700);
    assert_eq!(mode(&s.repo().join("config")), 0o600);
}

/// `repo init --pack-size` is stored in the repository's config; sizes outside 4..=128 MiB
/// are refused (exit 2) before anything is written.
#[test]
fn init_pack_size_is_validated_and_stored() {
    let s = Sandbox::new();
    for bad in ["2MiB", "129M", "16GB", "0"] {
        let r = s
            .run_repo(
                &["repo", "init", "--no-encryption", "--pack-size", bad],
                &[],
            )
            .expect(2);
        assert!(r.stderr().contains("--pack-size"), "{bad}: {}", r.stderr());
        assert!(
            !s.repo().join("config").exists(),
            "{bad} created a repository"
        );
    }
    let r = s
        .run_repo(
            &["repo", "init", "--no-encryption", "--pack-size", "32MiB"],
            &[],
        )
        .expect(0);
    assert!(r.stdout().contains("packs of 32 MiB"), "{}", r.stdout());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.repo().join("config")).unwrap()).unwrap();
    assert_eq!(config["pack_size"], 32 << 20);
    let info = s
        .run_repo(&["--json", "repo", "info"], &[])
        .expect(0)
        .json();
    assert_eq!(info["pack_size"], 32 << 20);

    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let info = s
        .run_repo(&["--json", "repo", "info"], &[])
        .expect(0)
        .json();
    assert_eq!(info["pack_size"], 16 << 20, "default pack size");
}

#[test]
fn init_encrypted_needs_a_passphrase_source() {
    let s = Sandbox::new();
    // No passphrase, no terminal, no --no-encryption: refused, nothing created.
    let r = s.run_repo(&["repo", "init"], &[]).expect(2);
    assert_eq!(
        r.stderr(),
        "pgkeep: error: no passphrase for the new repository\n\
         HINT: set PGKEEP_PASSPHRASE or PGKEEP_PASSPHRASE_FILE, run on a terminal to be asked, or pass --no-encryption for a plain repository\n"
    );
    assert!(!s.repo().join("config").exists());
    // Both a passphrase and --no-encryption: ambiguous, refused.
    s.run_repo(&["repo", "init", "--no-encryption"], &[PASS])
        .expect(2);

    let r = s.run_repo(&["repo", "init"], &[PASS]).expect(0);
    assert!(
        r.stdout().starts_with("created an encrypted repository "),
        "{}",
        r.stdout()
    );
    assert!(!r.stdout().contains(PASS.1) && !r.stderr().contains(PASS.1));
    let info = s
        .run_repo(&["--json", "repo", "info"], &[PASS])
        .expect(0)
        .json();
    assert_eq!(info["encrypted"], true);
    assert_eq!(info["keys"], 1);
    assert_eq!(info["compression_level"], 3);

    // A second init over it fails with exit 1 and changes nothing.
    let before = listing(&s.repo());
    let r = s.run_repo(&["repo", "init"], &[PASS]).expect(1);
    assert!(
        r.stderr()
            .starts_with("pgkeep: error: a pgkeep repository already exists at "),
        "{}",
        r.stderr()
    );
    assert_eq!(before, listing(&s.repo()));
}

#[test]
fn passphrase_file_is_read() {
    let s = Sandbox::new();
    let f = s.path().join("pass");
    std::fs::write(&f, "from a file\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fenv = ("PGKEEP_PASSPHRASE_FILE", f.to_str().unwrap());
    s.run_repo(&["repo", "init"], &[fenv]).expect(0);
    s.run_repo(&["repo", "info"], &[("PGKEEP_PASSPHRASE", "from a file")])
        .expect(0);
    s.run_repo(&["repo", "info"], &[fenv]).expect(0);
}

#[test]
fn wrong_or_missing_passphrase_exits_12_and_writes_nothing() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init"], &[PASS]).expect(0);
    let before = listing(&s.repo());
    let wrong = ("PGKEEP_PASSPHRASE", "not the passphrase");
    let commands: [&[&str]; 7] = [
        &["repo", "info"],
        &["repo", "check"],
        &["repo", "check", "--read-data"],
        &["repo", "unlock", "--all"],
        &["repo", "key", "list"],
        &["repo", "key", "add"],
        &["repo", "key", "remove", "00"],
    ];
    for args in commands {
        let r = s
            .run_repo(args, &[wrong, ("PGKEEP_NEW_PASSPHRASE", "another one")])
            .expect(12);
        assert!(
            r.stderr().starts_with(
                "pgkeep: error: wrong passphrase or no matching key for the repository at "
            ),
            "{args:?}: {}",
            r.stderr()
        );
        assert!(!r.stderr().contains("not the passphrase"));
        assert_eq!(
            before,
            listing(&s.repo()),
            "{args:?} changed the repository"
        );
    }
    // No passphrase at all (and no terminal): exit 12 too, with a hint.
    let r = s.run_repo(&["repo", "info"], &[]).expect(12);
    assert!(
        r.stderr()
            .contains("is encrypted and no passphrase was given"),
        "{}",
        r.stderr()
    );
    assert!(r.stderr().contains("\nHINT: "), "{}", r.stderr());
    assert_eq!(before, listing(&s.repo()));

    // --json: one JSON document on stdout describing the error.
    let r = s.run_repo(&["--json", "repo", "info"], &[wrong]).expect(12);
    let doc = r.json();
    assert_eq!(doc["error"]["kind"], "wrong_key");
    assert_eq!(doc["error"]["exit_code"], 12);
}

#[test]
fn keys_can_be_added_listed_and_removed() {
    let s = Sandbox::new();
    let old = ("PGKEEP_PASSPHRASE", "old passphrase");
    let new = ("PGKEEP_PASSPHRASE", "new passphrase");
    s.run_repo(&["repo", "init"], &[old]).expect(0);

    // The new passphrase must come from somewhere.
    s.run_repo(&["repo", "key", "add"], &[old]).expect(2);
    let added = s
        .run_repo(
            &["--json", "repo", "key", "add"],
            &[old, ("PGKEEP_NEW_PASSPHRASE", "new passphrase")],
        )
        .expect(0)
        .json();
    let new_id = added["added"]["id"].as_str().unwrap().to_string();

    let keys = s
        .run_repo(&["--json", "repo", "key", "list"], &[new])
        .expect(0)
        .json();
    let keys = keys["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 2);
    let current: Vec<&str> = keys
        .iter()
        .filter(|k| k["current"] == true)
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(current, vec![new_id.as_str()]);
    let old_id = keys
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .find(|id| *id != new_id)
        .unwrap()
        .to_string();

    // The key in use cannot be removed.
    let r = s
        .run_repo(&["repo", "key", "remove", &new_id], &[new])
        .expect(1);
    assert!(r.stderr().contains("is the one in use"), "{}", r.stderr());

    // Remove the old key while opened with the new one (by a unique prefix).
    let r = s
        .run_repo(&["--json", "repo", "key", "remove", &old_id[..8]], &[new])
        .expect(0);
    assert_eq!(r.json()["removed"]["id"], old_id.as_str());

    s.run_repo(&["repo", "info"], &[new]).expect(0);
    s.run_repo(&["repo", "info"], &[old]).expect(12);
    let keys = s
        .run_repo(&["--json", "repo", "key", "list"], &[new])
        .expect(0)
        .json();
    assert_eq!(keys["keys"].as_array().unwrap().len(), 1);

    // A plain repository has no keys to add.
    let p = Sandbox::new();
    p.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    p.run_repo(&["repo", "key", "add"], &[("PGKEEP_NEW_PASSPHRASE", "x")])
        .expect(2);
}

#[test]
fn no_repository_exits_10_and_unconfigured_exits_2() {
    let s = Sandbox::new();
    std::fs::create_dir(s.repo()).unwrap();
    for args in [
        &["repo", "info"][..],
        &["repo", "check"],
        &["repo", "unlock"],
        &["repo", "key", "list"],
    ] {
        let r = s.run_repo(args, &[]).expect(10);
        assert!(
            r.stderr()
                .starts_with("pgkeep: error: no pgkeep repository at "),
            "{}",
            r.stderr()
        );
        assert!(
            r.stderr()
                .contains("\nHINT: create one with `pgkeep repo init`"),
            "{}",
            r.stderr()
        );
    }
    // Nothing was created by looking.
    assert_eq!(std::fs::read_dir(s.repo()).unwrap().count(), 0);

    let r = s.run(&["repo", "info"], &[]).expect(2);
    assert_eq!(
        r.stderr(),
        "pgkeep: error: no repository given\n\
         HINT: use --repo URL, set PGKEEP_REPO, or add a [[repository]] to the config file (see docs/config.md)\n"
    );
    // PGKEEP_REPO is the same as --repo.
    let repo = s.repo();
    s.run(
        &["repo", "info"],
        &[("PGKEEP_REPO", repo.to_str().unwrap())],
    )
    .expect(10);
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

fn write_lock(repo: &std::path::Path, id: &str, pid: u32, exclusive: bool) {
    let body = serde_json::json!({
        "exclusive": exclusive,
        "scope": null,
        "purpose": "test holder",
        "host": hostname(),
        "pid": pid,
        "created": "2026-01-01T00:00:00Z",
    });
    std::fs::create_dir_all(repo.join("locks")).unwrap();
    std::fs::write(
        repo.join("locks").join(id),
        serde_json::to_vec(&body).unwrap(),
    )
    .unwrap();
}

#[test]
fn unlock_removes_stale_locks_only_unless_all() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);

    // A dead holder on this host (stale), and a live one: this test process.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let stale = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let live = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    write_lock(&s.repo(), stale, dead_pid, true);
    write_lock(&s.repo(), live, std::process::id(), true);

    // A live exclusive lock blocks commands that lock: exit 11 naming the holder.
    let r = s.run_repo(&["repo", "check"], &[]).expect(11);
    assert!(
        r.stderr()
            .starts_with("pgkeep: error: repository is locked by an exclusive lock held by "),
        "{}",
        r.stderr()
    );
    assert!(
        r.stderr().contains(&format!("pid {}", std::process::id())),
        "{}",
        r.stderr()
    );

    let info = s
        .run_repo(&["--json", "repo", "info"], &[])
        .expect(0)
        .json();
    assert_eq!(info["locks"], 2);

    let r = s
        .run_repo(&["--json", "repo", "unlock"], &[])
        .expect(0)
        .json();
    let removed: Vec<&str> = r["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    let remaining: Vec<&str> = r["remaining"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(removed, vec![stale]);
    assert_eq!(remaining, vec![live]);
    assert!(!s.repo().join("locks").join(stale).exists());
    assert!(s.repo().join("locks").join(live).exists());

    let r = s.run_repo(&["repo", "unlock", "--all"], &[]).expect(0);
    assert!(
        r.stdout().contains("1 lock(s) removed, 0 kept"),
        "{}",
        r.stdout()
    );
    assert!(!s.repo().join("locks").join(live).exists());
    s.run_repo(&["repo", "check"], &[]).expect(0);
}

#[test]
fn check_warns_about_a_group_readable_repository() {
    use std::os::unix::fs::PermissionsExt;
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    std::fs::set_permissions(s.repo(), std::fs::Permissions::from_mode(0o750)).unwrap();
    let r = s
        .run_repo(&["--json", "repo", "check"], &[])
        .expect(0)
        .json();
    let warnings = r["warnings"].as_array().unwrap();
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .unwrap()
            .contains("is accessible by group or others (mode bits 050)")),
        "{warnings:?}"
    );
}

/// RELIABILITY row 24: a storage whose clock is an hour off this host's is reported (exit 0,
/// a warning naming both clocks) by any command that takes a lock.
#[test]
fn a_store_clock_an_hour_ahead_is_warned_about() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let r = s
        .run_repo(
            &["repo", "check"],
            &[(pgkeep_storage::CLOCK_OFFSET_ENV, "3600")],
        )
        .expect(0);
    assert!(
        r.stderr().contains(
            "this host's clock is about 3600 s behind the repository storage's clock; \
             backup ids, backup times and recovery targets are taken from this host's clock"
        ) || r
            .stderr()
            .contains("this host's clock is about 3599 s behind"),
        "{}",
        r.stderr()
    );
    let r = s.run_repo(&["repo", "check"], &[]).expect(0);
    assert!(!r.stderr().contains("clock"), "{}", r.stderr());
}

#[test]
fn secrets_never_reach_stdout_or_stderr_even_at_trace_level() {
    let s = Sandbox::new();
    let canary = ("PGKEEP_PASSPHRASE", "CANARY-old-7f3a");
    let new = ("PGKEEP_NEW_PASSPHRASE", "CANARY-new-91bc");
    let runs = [
        s.run_repo(&["-vvv", "repo", "init"], &[canary]),
        s.run_repo(&["-vvv", "--json", "repo", "info"], &[canary]),
        s.run_repo(&["-vvv", "repo", "check", "--read-data"], &[canary]),
        s.run_repo(&["-vvv", "--json", "repo", "key", "add"], &[canary, new]),
        s.run_repo(&["-vvv", "repo", "key", "list"], &[new]),
        s.run_repo(
            &["-vvv", "repo", "info"],
            &[("PGKEEP_PASSPHRASE", "CANARY-wrong-00")],
        ),
    ];
    for (i, r) in runs.iter().enumerate() {
        let all = format!("{}{}", r.stdout(), r.stderr());
        assert!(!all.contains("CANARY"), "run {i} leaked a secret:\n{all}");
    }
    assert_eq!(runs[5].code(), 12);
    // Nor does any repository object hold one in plain text.
    for (path, (bytes, _)) in listing(&s.repo()) {
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains("CANARY"),
            "{} holds a secret",
            path.display()
        );
    }
}

/// `pgkeep ... | head` used to end with "cannot write the output: Broken pipe" and exit 1
/// although the command had done its work.
#[test]
fn a_reader_that_stops_reading_does_not_turn_a_success_into_an_error() {
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    // A pipe whose reading end is closed before pgkeep writes: every write fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let repo = s.repo();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", s.path())
        .env("PGKEEP_CONFIG", s.path().join("empty.toml"))
        .args(["--repo", repo.to_str().unwrap(), "--json", "repo", "info"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}
