//! What every command receives: the resolved settings and the passphrase sources, with the
//! shared steps of opening storage and the repository.

use std::fmt;
use std::sync::Arc;

use pgkeep_repo::{ErrorKind as RepoErrorKind, Repository};
use pgkeep_storage::{Storage, StorageOptions};
use serde::Serialize;

use crate::config::{Env, Overrides, RepositorySettings, Settings};
use crate::error::{Error, ErrorKind, Result};
use crate::secrets::Passphrases;

/// The context of one run.
#[derive(Debug, Clone)]
pub struct Context {
    /// Every setting, after precedence.
    pub settings: Settings,
    /// Where passphrases come from.
    pub passphrases: Passphrases,
}

impl Context {
    /// A context from parts (tests, embedding).
    pub fn new(settings: Settings, passphrases: Passphrases) -> Self {
        Context {
            settings,
            passphrases,
        }
    }

    /// Loads the configuration file, resolves the settings and the passphrase sources from
    /// `env` and `flags`. Touches nothing but the files it reads.
    pub fn load(flags: &Overrides, env: &Env) -> Result<Self> {
        let settings = Settings::load(flags, env)?;
        let passphrase_file = settings
            .repository
            .as_ref()
            .and_then(|r| r.passphrase_file.clone());
        let passphrases = Passphrases::from_env(env, passphrase_file.as_deref())?;
        Ok(Context {
            settings,
            passphrases,
        })
    }

    /// The repository settings, or a usage error (exit 2) saying how to give them.
    pub fn repository(&self) -> Result<&RepositorySettings> {
        self.settings.require_repository()
    }

    /// The storage options of the repository, for `pgkeep_storage::open_storage`.
    pub fn storage_options(&self) -> Result<StorageOptions> {
        Ok(storage_options_of(self.repository()?))
    }

    /// Opens the repository's storage (with retries for temporary errors).
    pub fn open_storage(&self) -> Result<Arc<dyn Storage>> {
        let r = self.repository()?;
        Ok(pgkeep_storage::open_storage(
            &r.url,
            &storage_options_of(r),
        )?)
    }

    /// Opens the repository. The passphrase given by the environment or a file is used as
    /// is; otherwise the repository is opened without one and, only if it turns out to be
    /// encrypted, the user is prompted on a terminal. Reads only: a wrong passphrase fails
    /// with exit 12 and writes nothing.
    pub async fn open_repository(&self) -> Result<Repository> {
        let repo = open_repository_at(self.repository()?, &self.passphrases).await?;
        repo.set_lock_wait(self.settings.lock_wait);
        Ok(repo)
    }

    /// Opens a second repository (`copy --to NAME|URL`) with its own passphrase sources
    /// (see [`Passphrases::for_target`]).
    pub async fn open_other_repository(&self, name_or_url: &str, env: &Env) -> Result<Repository> {
        let r = self.settings.other_repository(name_or_url)?;
        let p = Passphrases::for_target(env, r.passphrase_file.as_deref())?;
        let repo = open_repository_at(&r, &p)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::WrongKey if !p.is_given() => Error::with_hint(
                    ErrorKind::WrongKey,
                    format!("the target repository {} is encrypted", r.url),
                    "set PGKEEP_TO_PASSPHRASE_FILE (or the repository's passphrase_file)",
                ),
                _ => e,
            })?;
        repo.set_lock_wait(self.settings.lock_wait);
        Ok(repo)
    }
}

/// Storage options from a repository's settings.
pub fn storage_options_of(r: &RepositorySettings) -> StorageOptions {
    let s = &r.storage;
    let mut o = StorageOptions {
        endpoint: s.endpoint.clone(),
        region: s.region.clone(),
        force_path_style: s.force_path_style,
        allow_http: s.allow_http,
        azure_use_emulator: s.azure_use_emulator,
        azure_account: s.azure_account.clone(),
        storage_class: s.storage_class.clone(),
        // The class is for the bulk of the data; metadata that is small, read on every run
        // or rewritten (config, keys, locks, index, manifests, WAL) keeps the bucket's default,
        // since infrequent-access classes bill a minimum size and every read.
        storage_class_prefixes: vec!["packs/".to_string()],
        sse: s.sse.clone(),
        sse_kms_key_id: s.sse_kms_key_id.clone(),
        sse_bucket_key: s.sse_bucket_key,
        ..StorageOptions::default()
    };
    if let Some(n) = s.retry_max_attempts {
        o.retry_max_attempts = n;
    }
    if let Some(n) = s.retry_base_delay_ms {
        o.retry_base_delay_ms = n;
    }
    if let Some(n) = s.request_timeout_secs {
        o.request_timeout_secs = n;
    }
    o
}

/// Opens the repository `r` with the passphrase sources `p` (see
/// [`Context::open_repository`]).
pub async fn open_repository_at(r: &RepositorySettings, p: &Passphrases) -> Result<Repository> {
    let storage = pgkeep_storage::open_storage(&r.url, &storage_options_of(r))?;
    if p.is_given() {
        let pass = p.current()?;
        return Ok(Repository::open(storage, pass.as_ref().map(|s| s.expose())).await?);
    }
    match Repository::open(storage.clone(), None).await {
        Err(e) if e.kind() == RepoErrorKind::PassphraseRequired && p.has_source() => {
            let pass = p.current()?;
            Ok(Repository::open(storage, pass.as_ref().map(|s| s.expose())).await?)
        }
        other => Ok(other?),
    }
}

/// What a command returns: JSON for `--json`, `Display` for humans, and what the run's exit
/// code is once the report is printed.
pub trait Report: Serialize + fmt::Display {
    /// An error to report after printing (e.g. `repo check` found damage: exit 13).
    fn failure(&self) -> Option<Error> {
        None
    }

    /// True when the command completed with warnings worth exit code 3.
    fn has_warnings(&self) -> bool {
        false
    }

    /// The exit code: the failure's, else 3 with warnings, else 0.
    fn exit_code(&self) -> i32 {
        match self.failure() {
            Some(e) => e.exit_code(),
            None if self.has_warnings() => ErrorKind::Warnings.exit_code(),
            None => crate::error::EXIT_OK,
        }
    }
}
