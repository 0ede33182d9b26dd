//! Where a binary test's repository lives: local disk, SeaweedFS (S3) or Azurite (Azure),
//! reached the way a user reaches it: a configuration file with one `[[repository]]` (URL,
//! endpoint, addressing, `passphrase_file`) and the credentials in the environment only
//! (`AWS_*`, `AZURE_STORAGE_*`), never in the file, the URL or a command line.
//!
//! The PostgreSQL server runs `archive_command` and `restore_command` with its own
//! environment. A user puts the credentials there (a systemd `Environment=`/`EnvironmentFile=`,
//! `/etc/postgresql/<v>/<name>/environment`); here a wrapper script owned by the server user
//! stands for that environment: it exports the credentials and `exec`s the real binary with
//! the arguments it was given.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pgkeep_testing::azure::AzuriteServer;
use pgkeep_testing::cluster::running_as_root;
use pgkeep_testing::s3::{unique_prefix, S3Server};

pub const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

/// A repository passphrase (a test value).
pub const PASSPHRASE: &str = "backends test passphrase 5d0c";

pub fn chown_postgres(p: &Path) {
    if running_as_root() {
        let st = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// A running store to put repositories in.
pub enum Store {
    Local,
    S3(S3Server),
    Azure(AzuriteServer),
}

impl Store {
    pub fn local() -> Store {
        Store::Local
    }

    pub fn s3() -> Store {
        let rt = tokio::runtime::Runtime::new().unwrap();
        Store::S3(rt.block_on(S3Server::start()).unwrap())
    }

    pub fn azure() -> Store {
        let rt = tokio::runtime::Runtime::new().unwrap();
        Store::Azure(rt.block_on(AzuriteServer::start()).unwrap())
    }

    pub fn name(&self) -> &'static str {
        match self {
            Store::Local => "local",
            Store::S3(_) => "s3",
            Store::Azure(_) => "azure",
        }
    }

    /// The server's last log lines, for failure messages.
    pub fn log_tail(&self) -> String {
        match self {
            Store::Local => String::new(),
            Store::S3(s) => s.log_tail(),
            Store::Azure(a) => a.log_tail(),
        }
    }
}

/// One repository in a [`Store`], its configuration file and the wrapper that stands for the
/// server's environment. Everything lives in `dir` (mode 0711, so the server user reaches the
/// files it needs).
pub struct Repo {
    pub dir: tempfile::TempDir,
    /// The repository URL (a path for local disk).
    pub url: String,
    /// The configuration file: one `[[repository]]`, readable by the server user.
    pub config: PathBuf,
    /// The credentials a user puts in the environment (empty for local disk).
    pub creds: Vec<(String, String)>,
    /// `exec pgkeep "$@"` with [`Repo::creds`] exported; owned by the server user, 0700.
    pub wrapper: PathBuf,
    pub encrypted: bool,
}

impl Repo {
    /// A repository (not yet initialised) in `store`; `encrypted` puts a `passphrase_file` in
    /// the configuration.
    pub fn new(store: &Store, encrypted: bool) -> Repo {
        let dir = tempfile::Builder::new()
            .prefix("pgkeep-backends-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let mut toml = String::from("[[repository]]\nname = \"main\"\n");
        let (url, creds) = match store {
            Store::Local => {
                let p = dir.path().join("repo");
                (p.display().to_string(), Vec::new())
            }
            Store::S3(s) => {
                toml.push_str(&format!(
                    "endpoint = \"{}\"\nregion = \"{}\"\nforce_path_style = true\nallow_http = true\n",
                    s.endpoint, s.region
                ));
                (
                    s.url(&unique_prefix("cli")),
                    vec![
                        ("AWS_ACCESS_KEY_ID".to_string(), s.access_key.clone()),
                        ("AWS_SECRET_ACCESS_KEY".to_string(), s.secret_key.clone()),
                    ],
                )
            }
            Store::Azure(a) => {
                toml.push_str(&format!(
                    "endpoint = \"{}\"\nallow_http = true\nazure_account = \"{}\"\n",
                    a.endpoint, a.account
                ));
                (
                    format!("az://{}/{}", a.container, unique_prefix("cli")),
                    vec![(
                        "AZURE_STORAGE_ACCOUNT_KEY".to_string(),
                        a.account_key.clone(),
                    )],
                )
            }
        };
        toml.push_str(&format!("url = \"{url}\"\n"));
        if encrypted {
            let pass = dir.path().join("passphrase");
            std::fs::write(&pass, format!("{PASSPHRASE}\n")).unwrap();
            std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
            chown_postgres(&pass);
            toml.push_str(&format!("passphrase_file = \"{}\"\n", pass.display()));
        }
        let config = dir.path().join("pgkeep.toml");
        std::fs::write(&config, toml).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

        let wrapper = dir.path().join("pgkeep-with-env");
        let mut script = String::from("#!/bin/sh\n");
        for (k, v) in &creds {
            script.push_str(&format!("export {k}='{v}'\n"));
        }
        script.push_str(&format!("exec '{BIN}' \"$@\"\n"));
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o700)).unwrap();
        chown_postgres(&wrapper);
        Repo {
            dir,
            url,
            config,
            creds,
            wrapper,
            encrypted,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `pgkeep --config <file> ARGS` run by the test, with the credentials and `envs` in a
    /// clean environment.
    pub fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> crate::cli_support::Run {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
            .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
            .current_dir(self.path())
            .arg("--config")
            .arg(&self.config)
            .args(args);
        for (k, v) in &self.creds {
            cmd.env(k, v);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        crate::cli_support::Run(cmd.output().unwrap())
    }

    /// `repo init` (encrypted per the configuration); a local repository is then handed to
    /// the server user, who archives into it.
    pub fn init(&self) {
        self.init_with(&[]);
    }

    /// [`Repo::init`] with more `repo init` arguments (e.g. `--pack-size`).
    pub fn init_with(&self, extra: &[&str]) {
        let mut args = vec!["repo", "init"];
        if !self.encrypted {
            args.push("--no-encryption");
        }
        args.extend_from_slice(extra);
        self.run(&args, &[]).expect(0);
        if !self.url.contains("://") {
            chown_postgres(Path::new(&self.url));
        }
    }

    /// The `archive_command` a user writes: the binary (through the environment wrapper) with
    /// the configuration file.
    pub fn archive_command(&self) -> String {
        format!(
            "{} --config {} archive-push %p",
            self.wrapper.display(),
            self.config.display()
        )
    }

    /// After `pgkeep restore` wrote `restore_command` into `pgdata`: checks it runs this
    /// binary's `archive-get` with the configuration file and the repository, and makes the
    /// restored server run it with the credentials in its environment (the wrapper).
    pub fn give_restored_server_credentials(&self, pgdata: &Path) {
        let auto = pgdata.join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&auto).unwrap();
        let line = text
            .lines()
            .rfind(|l| l.starts_with("restore_command"))
            .unwrap_or_else(|| panic!("no restore_command in {}:\n{text}", auto.display()));
        assert!(
            line.contains(BIN)
                && line.contains(&self.config.display().to_string())
                && line.contains(&self.url)
                && line.contains("archive-get %f %p"),
            "{line}"
        );
        for (k, v) in &self.creds {
            assert!(
                !text.contains(v.as_str()),
                "{k} written into {}",
                auto.display()
            );
        }
        let text = text.replace(BIN, &self.wrapper.display().to_string());
        std::fs::write(&auto, text).unwrap();
    }
}
