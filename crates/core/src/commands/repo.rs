//! `pgkeep repo init | info | check | unlock | repair-index | key add|list|remove`.
//!
//! Each function takes the run's [`Context`] and its typed options and returns a
//! serializable report. Nothing is written before the repository opened with the right key:
//! a wrong passphrase fails with exit 12 and leaves the repository as it was.

use std::fmt;
use std::path::Path;

use chrono::{DateTime, Utc};
use pgkeep_repo::{
    CheckOptions, CheckReport, InitOptions, KeyInfo, LockInfo, LockKind, RepairReport, RepoInfo,
    Repository,
};
use serde::{Deserialize, Serialize};

use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};
use crate::secrets::{group_other_bits, ENV_PASSPHRASE, ENV_PASSPHRASE_FILE};

// ---------------------------------------------------------------------------------------------
// repo init

/// Options of `repo init`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RepoInitOptions {
    /// zstd level of the new repository, 1..=22 [default: PGKEEP_COMPRESSION_LEVEL, the
    /// config file's compression_level, else 3].
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=22))
    )]
    pub compression_level: Option<i32>,
    /// Target size of the repository's packs, fixed at creation: 4MiB to 128MiB (suffixes
    /// K/KiB, M/MiB; a plain number is bytes) [default: 16MiB]. Larger packs mean fewer objects
    /// and requests; smaller ones lose less to an interrupted upload.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "SIZE", value_parser = parse_pack_size)
    )]
    pub pack_size: Option<u64>,
    /// Create a plain, unencrypted repository. Without this flag the repository is
    /// encrypted with the passphrase from PGKEEP_PASSPHRASE, PGKEEP_PASSPHRASE_FILE or a
    /// prompt (asked twice); with none of these, init fails.
    #[cfg_attr(feature = "clap", arg(long))]
    pub no_encryption: bool,
}

/// Pack sizes `repo init --pack-size` accepts. Below 4 MiB, per-object costs of object stores
/// dominate; the repository layer's own ceiling is 128 MiB.
pub const PACK_SIZES: std::ops::RangeInclusive<u64> = (4 << 20)..=(128 << 20);

/// Parses `--pack-size`: bytes, or a number with `K`/`KiB` or `M`/`MiB`, within [`PACK_SIZES`].
pub fn parse_pack_size(v: &str) -> std::result::Result<u64, String> {
    let lower = v.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("kib").or(lower.strip_suffix('k')) {
        (n, 1u64 << 10)
    } else if let Some(n) = lower.strip_suffix("mib").or(lower.strip_suffix('m')) {
        (n, 1 << 20)
    } else {
        (lower.as_str(), 1)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not a size such as 16MiB, 32M or 16777216"))?;
    check_pack_size(n.saturating_mul(mult))
}

fn check_pack_size(bytes: u64) -> std::result::Result<u64, String> {
    if PACK_SIZES.contains(&bytes) {
        Ok(bytes)
    } else {
        Err(format!(
            "{bytes} bytes is out of range 4MiB..=128MiB ({}..={})",
            PACK_SIZES.start(),
            PACK_SIZES.end()
        ))
    }
}

/// What `repo init` made.
#[derive(Debug, Clone, Serialize)]
pub struct RepoInitReport {
    /// Where (no credentials).
    pub location: String,
    /// Repository id.
    pub id: String,
    /// Format version.
    pub version: u32,
    /// Whether it is encrypted.
    pub encrypted: bool,
    /// zstd level.
    pub compression_level: i32,
    /// Target pack size in bytes.
    pub pack_size: u64,
}

impl fmt::Display for RepoInitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "created {} repository {} at {} (format {}, compression level {}, packs of {} MiB)",
            if self.encrypted {
                "an encrypted"
            } else {
                "a plain"
            },
            self.id,
            self.location,
            self.version,
            self.compression_level,
            self.pack_size as f64 / (1 << 20) as f64
        )?;
        if self.encrypted {
            writeln!(
                f,
                "keep the passphrase safe: without it the backups in this repository cannot be read"
            )?;
        }
        Ok(())
    }
}

impl Report for RepoInitReport {}

/// Creates a repository at the configured location. Encrypted unless
/// `opts.no_encryption`; fails with exit 2 when encryption is wanted and no passphrase source
/// exists, or when `--no-encryption` meets a given passphrase; with exit 1 (kind
/// `AlreadyExists` of the repository layer) when a repository is already there.
pub async fn repo_init(ctx: &Context, opts: &RepoInitOptions) -> Result<RepoInitReport> {
    let settings = ctx.repository()?;
    let compression_level = opts.compression_level.unwrap_or(settings.compression_level);
    if !(1..=22).contains(&compression_level) {
        return Err(Error::usage(format!(
            "--compression-level: {compression_level} is out of range 1..=22"
        )));
    }
    let pack_size = match opts.pack_size {
        Some(n) => check_pack_size(n).map_err(|e| Error::usage(format!("--pack-size: {e}")))?,
        None => pgkeep_repo::repository::DEFAULT_PACK_SIZE,
    };
    let passphrase = if opts.no_encryption {
        if ctx.passphrases.is_given() {
            return Err(Error::usage_hint(
                "--no-encryption was given but so was a passphrase",
                format!("unset {ENV_PASSPHRASE} / {ENV_PASSPHRASE_FILE} for a plain repository, or drop --no-encryption"),
            ));
        }
        None
    } else {
        match ctx.passphrases.for_init()? {
            Some(p) => Some(p),
            None => {
                return Err(Error::usage_hint(
                    "no passphrase for the new repository",
                    format!("set {ENV_PASSPHRASE} or {ENV_PASSPHRASE_FILE}, run on a terminal to be asked, or pass --no-encryption for a plain repository"),
                ))
            }
        }
    };
    let storage = ctx.open_storage()?;
    let repo = Repository::init(
        storage,
        InitOptions {
            passphrase: passphrase.as_ref().map(|p| p.expose().to_string()),
            compression_level,
            pack_size,
            ..InitOptions::default()
        },
    )
    .await?;
    let c = repo.config();
    Ok(RepoInitReport {
        location: repo.storage().location(),
        id: c.id.clone(),
        version: c.version,
        encrypted: c.encrypted,
        compression_level: c.compression_level,
        pack_size: c.pack_size,
    })
}

// ---------------------------------------------------------------------------------------------
// repo info

/// What `repo info` shows: the repository layer's figures and its locks.
#[derive(Debug, Clone, Serialize)]
pub struct RepoInfoReport {
    /// Figures.
    #[serde(flatten)]
    pub info: RepoInfo,
    /// Locks present.
    pub lock_list: Vec<LockInfo>,
}

impl fmt::Display for RepoInfoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.info;
        writeln!(f, "repository {} at {}", i.id, i.location)?;
        writeln!(f, "  format version     {}", i.version)?;
        writeln!(
            f,
            "  encrypted          {}",
            if i.encrypted { "yes" } else { "no" }
        )?;
        writeln!(f, "  compression level  {}", i.compression_level)?;
        writeln!(
            f,
            "  pack size          {} MiB",
            i.pack_size as f64 / (1 << 20) as f64
        )?;
        writeln!(f, "  backups and dumps  {}", i.manifests)?;
        writeln!(
            f,
            "  data               {} blobs, {} bytes raw, {} packs, {} bytes stored",
            i.blobs, i.blob_raw_bytes, i.packs, i.pack_bytes
        )?;
        writeln!(f, "  index files        {}", i.index_files)?;
        writeln!(f, "  keys               {}", i.keys)?;
        writeln!(f, "  locks              {}", i.locks)?;
        for l in &self.lock_list {
            writeln!(f, "    {}", lock_line(l))?;
        }
        Ok(())
    }
}

impl Report for RepoInfoReport {}

fn lock_line(l: &LockInfo) -> String {
    format!(
        "{} {}{} by {} pid {} ({}), since {}{}",
        &l.id[..l.id.len().min(12)],
        if l.exclusive { "exclusive" } else { "shared" },
        l.scope
            .as_ref()
            .map(|s| format!(" on {s}"))
            .unwrap_or_default(),
        l.host,
        l.pid,
        l.purpose,
        l.created.format("%Y-%m-%d %H:%M:%S UTC"),
        if l.stale { ", stale" } else { "" }
    )
}

/// Figures about the repository. Reads only.
pub async fn repo_info(ctx: &Context) -> Result<RepoInfoReport> {
    let repo = ctx.open_repository().await?;
    let info = repo.info().await?;
    let lock_list = repo.list_locks().await?;
    Ok(RepoInfoReport { info, lock_list })
}

// ---------------------------------------------------------------------------------------------
// repo check

/// Options of `repo check`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RepoCheckOptions {
    /// Also download every pack and verify every blob (reads the whole repository).
    #[cfg_attr(feature = "clap", arg(long))]
    pub read_data: bool,
}

/// What `repo check` found. Exit 13 when there are problems; warnings alone exit 0.
#[derive(Debug, Clone, Serialize)]
pub struct RepoCheckReport {
    /// Where (no credentials).
    pub location: String,
    /// Whether every pack was read.
    pub read_data: bool,
    /// True when no problem was found.
    pub ok: bool,
    /// The repository layer's findings, plus warnings about file modes.
    #[serde(flatten)]
    pub check: CheckReport,
}

impl fmt::Display for RepoCheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.check;
        for p in &c.problems {
            writeln!(f, "error: {}: {}", p.object, p.message)?;
        }
        for m in &c.damaged_manifests {
            writeln!(f, "damaged: {m}")?;
        }
        for w in &c.warnings {
            writeln!(f, "warning: {w}")?;
        }
        writeln!(
            f,
            "checked {} packs, {} blobs, {} index files, {} backups and dumps{}: {}",
            c.packs,
            c.blobs,
            c.index_files,
            c.manifests,
            if self.read_data {
                format!(", read {} bytes", c.bytes_read)
            } else {
                String::new()
            },
            if self.ok {
                "no problems".to_string()
            } else {
                format!(
                    "{} problem{}",
                    c.problems.len(),
                    if c.problems.len() == 1 { "" } else { "s" }
                )
            }
        )
    }
}

impl Report for RepoCheckReport {
    fn failure(&self) -> Option<Error> {
        if self.ok {
            return None;
        }
        let n = self.check.problems.len();
        Some(Error::with_hint(
            ErrorKind::Integrity,
            format!(
                "repository check found {n} problem{} at {}",
                if n == 1 { "" } else { "s" },
                self.location
            ),
            if self.check.damaged_manifests.is_empty() {
                "see the errors above".to_string()
            } else {
                format!(
                    "{} backups or dumps are damaged; take a new backup now",
                    self.check.damaged_manifests.len()
                )
            },
        ))
    }
}

/// Checks the repository under a shared lock (so no concurrent removal confuses it). Also
/// warns when a local repository's directory, or the config file, is accessible by group or
/// others.
pub async fn repo_check(ctx: &Context, opts: &RepoCheckOptions) -> Result<RepoCheckReport> {
    let repo = ctx.open_repository().await?;
    let lock = repo.lock(LockKind::Shared, None, "repo check").await?;
    let result = repo
        .check(CheckOptions {
            read_data: opts.read_data,
        })
        .await;
    lock.release().await?;
    let mut check = result?;
    if let Some(dir) = local_path(&ctx.repository()?.url) {
        let bits = group_other_bits(Path::new(&dir));
        if bits != 0 {
            check.warnings.push(format!(
                "repository directory {dir} is accessible by group or others (mode bits {bits:03o}); run `chmod 700 {dir}`"
            ));
        }
    }
    if let Some(cfg) = &ctx.settings.config_file {
        let bits = group_other_bits(cfg);
        if bits != 0 {
            check.warnings.push(format!(
                "config file {} is accessible by group or others (mode bits {bits:03o}); run `chmod 600 {}`",
                cfg.display(),
                cfg.display()
            ));
        }
    }
    Ok(RepoCheckReport {
        location: repo.storage().location(),
        read_data: opts.read_data,
        ok: check.is_ok(),
        check,
    })
}

/// The directory of a local repository URL (a path or `file:///path`), else `None`.
fn local_path(url: &str) -> Option<String> {
    match url.find("://") {
        None => Some(url.to_string()),
        Some(_) => url.strip_prefix("file://").map(str::to_string),
    }
}

// ---------------------------------------------------------------------------------------------
// repo unlock

/// Options of `repo unlock`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RepoUnlockOptions {
    /// Remove every lock, not only stale ones. Only when no pgkeep process uses the
    /// repository: removing a live lock lets a concurrent removal damage a running backup.
    #[cfg_attr(feature = "clap", arg(long))]
    pub all: bool,
}

/// What `repo unlock` removed and what is left.
#[derive(Debug, Clone, Serialize)]
pub struct RepoUnlockReport {
    /// Locks removed.
    pub removed: Vec<LockInfo>,
    /// Locks still present (live).
    pub remaining: Vec<LockInfo>,
}

impl fmt::Display for RepoUnlockReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for l in &self.removed {
            writeln!(f, "removed {}", lock_line(l))?;
        }
        for l in &self.remaining {
            writeln!(f, "kept    {}", lock_line(l))?;
        }
        writeln!(
            f,
            "{} lock(s) removed, {} kept",
            self.removed.len(),
            self.remaining.len()
        )
    }
}

impl Report for RepoUnlockReport {}

/// Removes stale locks (holder dead on this host, or not refreshed for 30 minutes), or
/// every lock with `all`.
pub async fn repo_unlock(ctx: &Context, opts: &RepoUnlockOptions) -> Result<RepoUnlockReport> {
    let repo = ctx.open_repository().await?;
    let removed = repo.unlock(opts.all).await?;
    let remaining = repo.list_locks().await?;
    Ok(RepoUnlockReport { removed, remaining })
}

// ---------------------------------------------------------------------------------------------
// repo repair-index

/// What `repo repair-index` did. Exit 3 when some pack could not be read.
#[derive(Debug, Clone, Serialize)]
pub struct RepoRepairIndexReport {
    /// Where (no credentials).
    pub location: String,
    /// The repository layer's account.
    #[serde(flatten)]
    pub repair: RepairReport,
}

impl fmt::Display for RepoRepairIndexReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.repair;
        for k in &r.written_index_files {
            writeln!(f, "wrote   {k}")?;
        }
        for k in &r.removed_index_files {
            writeln!(f, "removed {k} (damaged)")?;
        }
        for (p, why) in &r.unreadable_packs {
            writeln!(f, "warning: {p} left out of the index: {why}")?;
        }
        writeln!(
            f,
            "read the headers of {} pack(s) no index covered, indexed {} pack(s) with {} blob(s), removed {} damaged index file(s)",
            r.packs_scanned,
            r.packs_indexed,
            r.blobs_indexed,
            r.removed_index_files.len()
        )
    }
}

impl Report for RepoRepairIndexReport {
    fn has_warnings(&self) -> bool {
        !self.repair.unreadable_packs.is_empty()
    }
}

/// Rebuilds the index from the pack headers under the exclusive lock: new index files for
/// every pack no good index file covers, then the damaged index files are removed.
pub async fn repo_repair_index(ctx: &Context) -> Result<RepoRepairIndexReport> {
    let repo = ctx.open_repository().await?;
    let lock = repo
        .lock(LockKind::Exclusive, None, "repo repair-index")
        .await?;
    let result = repo.repair_index().await;
    lock.release().await?;
    Ok(RepoRepairIndexReport {
        location: repo.storage().location(),
        repair: result?,
    })
}

// ---------------------------------------------------------------------------------------------
// repo key add | list | remove

/// A key as the key commands show it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyView {
    /// Key id (hex).
    pub id: String,
    /// When it was added.
    pub created: DateTime<Utc>,
    /// Host that added it.
    pub host: String,
    /// Whether this key opened the repository in this run.
    pub current: bool,
}

impl From<KeyInfo> for KeyView {
    fn from(k: KeyInfo) -> Self {
        KeyView {
            id: k.id,
            created: k.created,
            host: k.host,
            current: k.current,
        }
    }
}

impl fmt::Display for KeyView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}{}",
            self.id,
            self.created.format("%Y-%m-%d %H:%M:%S UTC"),
            self.host,
            if self.current { " (current)" } else { "" }
        )
    }
}

/// What `repo key add` added.
#[derive(Debug, Clone, Serialize)]
pub struct RepoKeyAddReport {
    /// The new key.
    pub added: KeyView,
}

impl fmt::Display for RepoKeyAddReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "added key {}", self.added.id)
    }
}

impl Report for RepoKeyAddReport {}

/// Adds a passphrase (a new wrapping of the master key; no data is rewritten). The current
/// passphrase opens the repository; the new one comes from `PGKEEP_NEW_PASSPHRASE(_FILE)` or
/// a prompt asked twice, and must differ from the current one.
pub async fn repo_key_add(ctx: &Context) -> Result<RepoKeyAddReport> {
    let repo = ctx.open_repository().await?;
    if !repo.config().encrypted {
        return Err(Error::usage(format!(
            "the repository at {} is not encrypted; it has no keys",
            repo.storage().location()
        )));
    }
    let new = ctx.passphrases.new_key()?;
    if let Some(cur) = ctx.passphrases.given() {
        if cur.expose() == new.expose() {
            return Err(Error::usage(
                "the new passphrase is the same as the current one",
            ));
        }
    }
    let lock = repo.lock(LockKind::Shared, None, "repo key add").await?;
    let result = repo.add_key(new.expose()).await;
    lock.release().await?;
    Ok(RepoKeyAddReport {
        added: result?.into(),
    })
}

/// What `repo key list` shows.
#[derive(Debug, Clone, Serialize)]
pub struct RepoKeyListReport {
    /// Keys, oldest first.
    pub keys: Vec<KeyView>,
}

impl fmt::Display for RepoKeyListReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for k in &self.keys {
            writeln!(f, "{k}")?;
        }
        Ok(())
    }
}

impl Report for RepoKeyListReport {}

/// Lists the keys. Reads only.
pub async fn repo_key_list(ctx: &Context) -> Result<RepoKeyListReport> {
    let repo = ctx.open_repository().await?;
    let keys = repo
        .list_keys()
        .await?
        .into_iter()
        .map(KeyView::from)
        .collect();
    Ok(RepoKeyListReport { keys })
}

/// Options of `repo key remove`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct RepoKeyRemoveOptions {
    /// Key id, or a unique prefix of it (see `repo key list`).
    #[cfg_attr(feature = "clap", arg(value_name = "ID"))]
    pub id: String,
}

/// What `repo key remove` removed.
#[derive(Debug, Clone, Serialize)]
pub struct RepoKeyRemoveReport {
    /// The removed key.
    pub removed: KeyView,
}

impl fmt::Display for RepoKeyRemoveReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "removed key {}", self.removed.id)
    }
}

impl Report for RepoKeyRemoveReport {}

/// Removes a key under the exclusive lock. Refuses the key in use and the last key.
pub async fn repo_key_remove(
    ctx: &Context,
    opts: &RepoKeyRemoveOptions,
) -> Result<RepoKeyRemoveReport> {
    if opts.id.is_empty() {
        return Err(Error::usage("repo key remove: the key id is empty"));
    }
    let repo = ctx.open_repository().await?;
    let lock = repo
        .lock(LockKind::Exclusive, None, "repo key remove")
        .await?;
    let result = repo.remove_key(&opts.id).await;
    lock.release().await?;
    Ok(RepoKeyRemoveReport {
        removed: result?.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_sizes_parse_with_units_and_stay_in_range() {
        assert_eq!(parse_pack_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_pack_size("4m"), Ok(4 << 20));
        assert_eq!(parse_pack_size(" 131072K "), Ok(128 << 20));
        assert_eq!(parse_pack_size("8388608"), Ok(8 << 20));
        for bad in ["3MiB", "129MiB", "", "16GB", "x", "-4MiB"] {
            assert!(parse_pack_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_pack_size("1M").unwrap_err().contains("4MiB..=128MiB"));
    }
}
