//! Configuration: one TOML file, `PGKEEP_*` environment variables and command-line flags.
//!
//! Precedence, per setting: flags > environment > file > built-in defaults. The file is the
//! one given by `--config FILE`, else `PGKEEP_CONFIG`, else `/etc/pgkeep/pgkeep.toml` when it
//! exists, else none. Everything is checked at load time, before any repository or cluster is
//! touched: unknown keys and bad values fail with exit 2 and `FILE:LINE:COLUMN: key: what`.
//! docs/config.md documents the schema and the variable for every key.
//!
//! ```toml
//! [options]
//! threads = 4
//! log_level = "info"
//!
//! [[repository]]
//! name = "main"
//! url = "s3://backups/pgkeep"
//! endpoint = "http://127.0.0.1:8333"
//! region = "us-east-1"
//! force_path_style = true
//! allow_http = true
//! compression_level = 3
//!
//! [[cluster]]
//! name = "main"
//! pgdata = "/var/lib/postgresql/15/main"
//! pg = "host=/var/run/postgresql user=postgres"
//! repository = "main"
//! ```

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::commands::drill::config::DrillConfig;
use crate::error::{Error, Result};
use crate::health::config::{HealthConfig, HealthSettings};
use crate::retention::RetentionPolicy;
use crate::schedule::{DaemonConfig, ScheduleConfig};
use crate::secrets::{check_conninfo, check_repo_url, group_other_bits, is_secret_name};

/// Where the configuration file is looked for when neither `--config` nor `PGKEEP_CONFIG`
/// names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pgkeep/pgkeep.toml";
/// Default cluster name (`--cluster`).
pub const DEFAULT_CLUSTER: &str = "main";
/// Default zstd level of a new repository.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 3;
/// Default log level.
pub const DEFAULT_LOG_LEVEL: &str = "warn";
/// Accepted log levels, quietest first.
pub const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
/// Accepted compression levels (zstd).
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<i32> = 1..=22;
/// Accepted thread counts.
pub const THREADS: std::ops::RangeInclusive<usize> = 1..=256;

/// A snapshot of environment variables, so resolution is a pure function (and tests never
/// touch the process environment).
#[derive(Debug, Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    /// Every variable of this process whose name starts with `PGKEEP_` (values that are not
    /// UTF-8 are dropped).
    pub fn from_process() -> Self {
        Env(std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| k.starts_with("PGKEEP_"))
            .collect())
    }

    /// An environment made of the given pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Env(pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    /// The value of `name`, if set and not empty (an empty variable counts as unset).
    fn non_empty(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.is_empty())
    }
}

/// Names of the environment variables, one per setting (see docs/config.md).
pub mod env {
    /// Configuration file path.
    pub const CONFIG: &str = "PGKEEP_CONFIG";
    /// `repository.url` of the selected repository (also `--repo`).
    pub const REPO: &str = "PGKEEP_REPO";
    /// Which `[[repository]]` to use, by name (overrides `cluster.repository`).
    pub const REPOSITORY: &str = "PGKEEP_REPOSITORY";
    /// `repository.endpoint`.
    pub const REPO_ENDPOINT: &str = "PGKEEP_REPO_ENDPOINT";
    /// `repository.region`.
    pub const REPO_REGION: &str = "PGKEEP_REPO_REGION";
    /// `repository.force_path_style`.
    pub const REPO_FORCE_PATH_STYLE: &str = "PGKEEP_REPO_FORCE_PATH_STYLE";
    /// `repository.allow_http`.
    pub const REPO_ALLOW_HTTP: &str = "PGKEEP_REPO_ALLOW_HTTP";
    /// `repository.azure_use_emulator`.
    pub const REPO_AZURE_USE_EMULATOR: &str = "PGKEEP_REPO_AZURE_USE_EMULATOR";
    /// `repository.azure_account`.
    pub const REPO_AZURE_ACCOUNT: &str = "PGKEEP_REPO_AZURE_ACCOUNT";
    /// `repository.retry_max_attempts`.
    pub const REPO_RETRY_MAX_ATTEMPTS: &str = "PGKEEP_REPO_RETRY_MAX_ATTEMPTS";
    /// `repository.retry_base_delay_ms`.
    pub const REPO_RETRY_BASE_DELAY_MS: &str = "PGKEEP_REPO_RETRY_BASE_DELAY_MS";
    /// `repository.request_timeout_secs`.
    pub const REPO_REQUEST_TIMEOUT_SECS: &str = "PGKEEP_REPO_REQUEST_TIMEOUT_SECS";
    /// `repository.storage_class`.
    pub const REPO_STORAGE_CLASS: &str = "PGKEEP_REPO_STORAGE_CLASS";
    /// `repository.sse`.
    pub const REPO_SSE: &str = "PGKEEP_REPO_SSE";
    /// `repository.sse_kms_key_id`.
    pub const REPO_SSE_KMS_KEY_ID: &str = "PGKEEP_REPO_SSE_KMS_KEY_ID";
    /// `repository.sse_bucket_key`.
    pub const REPO_SSE_BUCKET_KEY: &str = "PGKEEP_REPO_SSE_BUCKET_KEY";
    /// `repository.compression_level` (also `repo init --compression-level`).
    pub const COMPRESSION_LEVEL: &str = "PGKEEP_COMPRESSION_LEVEL";
    /// `repository.passphrase_file` (same variable as the secrets module reads).
    pub const PASSPHRASE_FILE: &str = "PGKEEP_PASSPHRASE_FILE";
    /// Selected cluster name (also `--cluster`).
    pub const CLUSTER: &str = "PGKEEP_CLUSTER";
    /// How long to wait for a repository lock (also `--lock-wait`).
    pub const LOCK_WAIT: &str = "PGKEEP_LOCK_WAIT";
    /// `cluster.pgdata` of the selected cluster (also `--pgdata`).
    pub const PGDATA: &str = "PGKEEP_PGDATA";
    /// `cluster.pg` of the selected cluster (also `--pg`).
    pub const PG: &str = "PGKEEP_PG";
    /// `options.threads`.
    pub const THREADS: &str = "PGKEEP_THREADS";
    /// `options.log_level` (also `-v` / `-q`).
    pub const LOG: &str = "PGKEEP_LOG";
    /// `options.relation_chunk_size`.
    pub const RELATION_CHUNK_SIZE: &str = "PGKEEP_RELATION_CHUNK_SIZE";
    /// `options.spool_dir` (also read by `archive-push` / `archive-get --spool-dir`).
    pub const SPOOL_DIR: &str = "PGKEEP_SPOOL_DIR";
    /// `notify.state_dir`.
    pub const NOTIFY_STATE_DIR: &str = "PGKEEP_NOTIFY_STATE_DIR";
    /// `notify.dedup_window`.
    pub const NOTIFY_DEDUP_WINDOW: &str = "PGKEEP_NOTIFY_DEDUP_WINDOW";
    /// Prefix of the `[health]` keys: `PGKEEP_HEALTH_BACKUP_WARN_AGE=26h` sets
    /// `backup_warn_age`, over the file's `[health]` and the cluster's own.
    pub const HEALTH_PREFIX: &str = "PGKEEP_HEALTH_";
}

// ---------------------------------------------------------------------------------------------
// The file, as written. Spanned fields keep their position for messages about values.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    options: RawOptions,
    #[serde(default)]
    repository: Vec<RawRepository>,
    #[serde(default)]
    cluster: Vec<RawCluster>,
    #[serde(default)]
    retention: RawRetention,
    /// `[notify]`: parsed and checked by pgkeep-notify (unknown keys and bad values carry
    /// their position like everything else here).
    #[serde(default)]
    notify: pgkeep_notify::NotifyConfig,
    #[serde(default)]
    health: HealthConfig,
    #[serde(default)]
    drill: DrillConfig,
    #[serde(default)]
    daemon: DaemonConfig,
    #[serde(default)]
    schedule: Vec<ScheduleConfig>,
}

/// `[retention]` (and `[cluster.retention]`): one policy per kind of backup.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetention {
    physical: Option<Spanned<RetentionPolicy>>,
    dump: Option<Spanned<RetentionPolicy>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    threads: Option<Spanned<i64>>,
    log_level: Option<Spanned<String>>,
    relation_chunk_size: Option<Spanned<toml::Value>>,
    spool_dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRepository {
    name: Spanned<String>,
    url: Spanned<String>,
    endpoint: Option<Spanned<String>>,
    region: Option<String>,
    force_path_style: Option<bool>,
    allow_http: Option<bool>,
    azure_use_emulator: Option<bool>,
    azure_account: Option<String>,
    retry_max_attempts: Option<Spanned<i64>>,
    retry_base_delay_ms: Option<Spanned<i64>>,
    request_timeout_secs: Option<Spanned<i64>>,
    storage_class: Option<Spanned<String>>,
    sse: Option<Spanned<String>>,
    sse_kms_key_id: Option<Spanned<String>>,
    sse_bucket_key: Option<bool>,
    compression_level: Option<Spanned<i64>>,
    passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Spanned<String>,
    pgdata: Option<PathBuf>,
    pg: Option<Spanned<String>>,
    repository: Option<Spanned<String>>,
    retention: Option<RawRetention>,
    health: Option<HealthConfig>,
    #[serde(default)]
    copy_to: Vec<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// The file, validated.

/// A validated configuration file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// `[options]`.
    pub options: FileOptions,
    /// `[[repository]]` entries, names unique.
    pub repositories: Vec<RepositoryConfig>,
    /// `[[cluster]]` entries, names unique, each referencing a defined repository (if any).
    pub clusters: Vec<ClusterConfig>,
    /// `[retention]`: the policies of every cluster, unless its own `retention` overrides them.
    pub retention: RetentionConfig,
    /// `[notify]`: notification channels (secrets only as their source, never the value).
    pub notify: pgkeep_notify::NotifyConfig,
    /// `[health]`: thresholds of `check`, unless a cluster's own `health` overrides them.
    pub health: HealthConfig,
    /// `[drill]` and `[[drill.assert]]`.
    pub drill: DrillConfig,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[[schedule]]`, in file order.
    pub schedules: Vec<ScheduleConfig>,
}

/// Retention policies per kind of backup (`[retention.physical]`, `[retention.dump]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetentionConfig {
    /// Physical base backups of a cluster.
    pub physical: RetentionPolicy,
    /// Logical dumps, applied to each database's dumps on its own.
    pub dump: RetentionPolicy,
}

impl RetentionConfig {
    /// `other`'s rules over `self`'s, per kind.
    pub fn overlay(&self, other: &RetentionConfig) -> RetentionConfig {
        RetentionConfig {
            physical: self.physical.overlay(&other.physical),
            dump: self.dump.overlay(&other.dump),
        }
    }
}

/// `[options]` of the file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileOptions {
    /// Worker threads for ingest and restore.
    pub threads: Option<usize>,
    /// One of [`LOG_LEVELS`].
    pub log_level: Option<String>,
    /// How backups cut relation files, see [`check_relation_chunk_size`].
    pub relation_chunk_size: Option<u32>,
    /// Asynchronous WAL archiving: the spool directory, see [`check_spool_dir`].
    pub spool_dir: Option<PathBuf>,
}

/// Storage settings of a repository, passed to the storage layer as
/// `pgkeep_storage::StorageOptions` (same names; `None` = the storage layer's default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageSettings {
    /// Custom endpoint (S3-compatible servers, Azurite, GCS-compatible), `http(s)://`.
    pub endpoint: Option<String>,
    /// Region (S3).
    pub region: Option<String>,
    /// Path-style addressing (S3-compatible servers); `None` = object_store's default.
    pub force_path_style: Option<bool>,
    /// Allow plain-HTTP endpoints.
    pub allow_http: bool,
    /// Azure: talk to the Azurite emulator.
    pub azure_use_emulator: bool,
    /// Azure storage account name (not a secret).
    pub azure_account: Option<String>,
    /// Attempts per operation for temporary failures, the first included.
    pub retry_max_attempts: Option<u32>,
    /// Base of the exponential backoff, milliseconds.
    pub retry_base_delay_ms: Option<u64>,
    /// Timeout of one HTTP request, seconds.
    pub request_timeout_secs: Option<u64>,
    /// Storage class of the packs (the bulk of the data), e.g. `STANDARD_IA`; metadata keeps
    /// the bucket's default, see [`check_storage_class`].
    pub storage_class: Option<String>,
    /// S3 server-side encryption, see [`check_sse`].
    pub sse: Option<String>,
    /// S3 SSE-KMS key id or ARN.
    pub sse_kms_key_id: Option<String>,
    /// S3 SSE-KMS with a Bucket Key.
    pub sse_bucket_key: Option<bool>,
}

/// One `[[repository]]`.
#[derive(Debug, Clone, Serialize)]
pub struct RepositoryConfig {
    /// Unique name, referenced by `cluster.repository` and `PGKEEP_REPOSITORY`.
    pub name: String,
    /// A path, `file://`, `s3://`, `az://` or `gs://` URL, without credentials.
    pub url: String,
    /// Storage settings.
    pub storage: StorageSettings,
    /// zstd level used by `repo init` (1..=22).
    pub compression_level: Option<i32>,
    /// A file whose first line is the passphrase.
    pub passphrase_file: Option<PathBuf>,
}

/// One `[[cluster]]`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterConfig {
    /// Unique name (a repository path segment).
    pub name: String,
    /// The data directory.
    pub pgdata: Option<PathBuf>,
    /// libpq connection string without password.
    pub pg: Option<String>,
    /// Name of the repository this cluster is backed up to.
    pub repository: Option<String>,
    /// Its own retention rules, over those of `[retention]`.
    pub retention: RetentionConfig,
    /// Its own health thresholds, over those of `[health]`.
    pub health: HealthConfig,
    /// `[[repository]]` names that `backup`, `dump` and `archive-push` also write to.
    pub copy_to: Vec<String>,
}

/// Line and column (1-based) of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> Error {
        let (line, column) = line_col(self.text, span.start);
        Error::Config {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
            hint: None,
        }
    }

    /// Converts a toml error: position from its span; the key named when toml's message does
    /// not already name it (type errors name only the expected type).
    fn toml_error(&self, e: &toml::de::Error) -> Error {
        let msg = e.message().trim_end().to_string();
        let Some(span) = e.span() else {
            return Error::Config {
                file: self.file.to_string(),
                line: 1,
                column: 1,
                message: msg,
                hint: None,
            };
        };
        let names_key = ["unknown field", "missing field", "duplicate key"]
            .iter()
            .any(|p| msg.starts_with(p));
        let message = match (names_key, self.key_at(span.start)) {
            (false, Some(key)) => format!("{key}: {msg}"),
            (true, _) => match self.table_at(span.start, msg.starts_with("missing field")) {
                Some(table) => format!("{msg} in [{table}]"),
                None => msg,
            },
            (false, None) => msg,
        };
        self.error(span, message)
    }

    /// The dotted key whose value is at `offset`: the enclosing table header plus the text
    /// before `=` on that line.
    fn key_at(&self, offset: usize) -> Option<String> {
        let line_start = self.text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line = &self.text[line_start..offset];
        let eq = line.find('=')?;
        let key = line[..eq].trim().trim_matches(|c| c == '"' || c == '\'');
        if key.is_empty() {
            return None;
        }
        Some(match self.table_at(offset, false) {
            Some(table) => format!("{table}.{key}"),
            None => key.to_string(),
        })
    }

    /// The name of the table header (`[options]`, `[[repository]]`) that `offset` is in:
    /// the last header line above the line of `offset`, or, with `own_line`, that line too
    /// (a "missing field" error points at the header of the incomplete table).
    fn table_at(&self, offset: usize, own_line: bool) -> Option<String> {
        let end = if own_line {
            self.text[offset..]
                .find('\n')
                .map(|i| offset + i)
                .unwrap_or(self.text.len())
        } else {
            self.text[..offset].rfind('\n').unwrap_or(0)
        };
        self.text[..end].lines().rev().find_map(|l| {
            let l = l.trim();
            if l.starts_with('[') {
                Some(l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
            } else {
                None
            }
        })
    }
}

/// Where secret-looking keys are in a parsed document (dotted paths).
fn secret_keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if is_secret_name(k) {
            out.push(path.clone());
        }
        match v {
            toml::Value::Table(t) => secret_keys(t, &path, out),
            toml::Value::Array(items) => {
                for item in items {
                    if let toml::Value::Table(t) = item {
                        secret_keys(t, &path, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Checks a repository or cluster name: it becomes a path segment in the repository.
pub fn check_name(what: &str, name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {what} {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// Checks a repository location: a non-empty path, or a URL with scheme file, s3, az or gs
/// and, for object stores, a bucket/container.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    if url.trim().is_empty() {
        return Err("the repository location is empty".into());
    }
    let Some(i) = url.find("://") else {
        return Ok(());
    };
    let scheme = &url[..i];
    let rest = &url[i + 3..];
    match scheme {
        "file" => {
            if rest.starts_with('/') {
                Ok(())
            } else {
                Err(format!(
                    "file URL must hold an absolute path (file:///...), got {url:?}"
                ))
            }
        }
        "s3" | "az" | "azure" | "gs" => {
            let bucket = rest.split(['/', '?']).next().unwrap_or("");
            if bucket.is_empty() || bucket.contains('@') {
                Err(format!("{scheme}:// URL has no bucket or container name"))
            } else {
                Ok(())
            }
        }
        other => Err(format!(
            "unsupported URL scheme {other:?}: use a path, file://, s3://, az:// or gs://"
        )),
    }
}

fn check_endpoint(endpoint: &str) -> std::result::Result<(), String> {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        Ok(())
    } else {
        Err("endpoint must start with http:// or https://".into())
    }
}

fn check_compression(level: i64) -> std::result::Result<i32, String> {
    if (*COMPRESSION_LEVELS.start() as i64..=*COMPRESSION_LEVELS.end() as i64).contains(&level) {
        Ok(level as i32)
    } else {
        Err(format!("{level} is out of range 1..=22"))
    }
}

fn check_threads(n: i64) -> std::result::Result<usize, String> {
    if (*THREADS.start() as i64..=*THREADS.end() as i64).contains(&n) {
        Ok(n as usize)
    } else {
        Err(format!("{n} is out of range 1..=256"))
    }
}

/// Largest fixed piece for relation files: blobs stay well below the pack size.
pub const MAX_RELATION_CHUNK_SIZE: u32 = 16 << 20;

/// A lock wait: a duration such as `30s`, `10m`, `1h` (`0`: do not wait), at most a day.
pub fn check_lock_wait(v: &str) -> std::result::Result<std::time::Duration, String> {
    let d = if v.trim() == "0" {
        std::time::Duration::ZERO
    } else {
        humantime::parse_duration(v.trim())
            .map_err(|e| format!("{v:?} is not a duration ({e}); e.g. 30s, 10m, 1h"))?
    };
    if d > std::time::Duration::from_secs(86_400) {
        return Err(format!("{v:?} is longer than a day"));
    }
    Ok(d)
}

/// A storage class: letters, digits and `_` (`STANDARD_IA`, `GLACIER_IR`, `INTELLIGENT_TIERING`,
/// Azure's `Cool`, GCS's `NEARLINE`), at most 64. The provider checks the value itself.
pub fn check_storage_class(v: &str) -> std::result::Result<String, String> {
    let ok =
        !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "{v:?} is not a storage class (letters, digits and '_', e.g. STANDARD_IA)"
        ))
    }
}

/// S3 server-side encryption modes.
pub const SSE_MODES: [&str; 3] = ["AES256", "aws:kms", "aws:kms:dsse"];

/// One of [`SSE_MODES`].
pub fn check_sse(v: &str) -> std::result::Result<String, String> {
    if SSE_MODES.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(format!(
            "{v:?} is not a server-side encryption mode: use AES256 (SSE-S3), aws:kms (SSE-KMS) or aws:kms:dsse"
        ))
    }
}

/// The SSE settings together: a KMS key or a Bucket Key only with a KMS mode.
fn check_sse_combination(s: &StorageSettings) -> std::result::Result<(), String> {
    let kms = matches!(s.sse.as_deref(), Some("aws:kms") | Some("aws:kms:dsse"));
    if (s.sse_kms_key_id.is_some() || s.sse_bucket_key.is_some()) && !kms {
        return Err(
            "sse_kms_key_id and sse_bucket_key need sse = \"aws:kms\" or \"aws:kms:dsse\""
                .to_string(),
        );
    }
    Ok(())
}

/// `options.relation_chunk_size` / `PGKEEP_RELATION_CHUNK_SIZE`: `cdc` or `0` (relation files
/// are chunked content-defined like every file), or a size in bytes (suffixes `K`/`KiB`,
/// `M`/`MiB`), a multiple of the 8 KiB page, at most 16 MiB: relation files are cut into
/// aligned pieces of that size, each stored as one blob (in repositories made before
/// 2026-12-05, cut by FastCDC within it: `ChunkerParams::whole_pieces`).
pub fn check_relation_chunk_size(v: &str) -> std::result::Result<u32, String> {
    let t = v.trim();
    if t.eq_ignore_ascii_case("cdc") {
        return Ok(0);
    }
    let lower = t.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("kib").or(lower.strip_suffix('k')) {
        (n, 1024u64)
    } else if let Some(n) = lower.strip_suffix("mib").or(lower.strip_suffix('m')) {
        (n, 1024 * 1024)
    } else {
        (lower.as_str(), 1)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not `cdc` or a size such as 262144, 256KiB or 1MiB"))?;
    let bytes = n.saturating_mul(mult);
    if bytes != 0 && (bytes % 8192 != 0 || bytes > MAX_RELATION_CHUNK_SIZE as u64) {
        return Err(format!(
            "{v:?} is not 0 or a multiple of 8192 up to {MAX_RELATION_CHUNK_SIZE}"
        ));
    }
    Ok(bytes as u32)
}

/// `options.spool_dir` / `PGKEEP_SPOOL_DIR`: the spool directory of asynchronous
/// `archive-push` (and prefetching `archive-get`). Absolute: archive_command runs in the data
/// directory, where a relative path would land.
pub fn check_spool_dir(v: &str) -> std::result::Result<PathBuf, String> {
    let p = Path::new(v);
    if v.is_empty() || !p.is_absolute() {
        return Err(format!("{v:?} is not an absolute path"));
    }
    Ok(p.to_path_buf())
}

fn check_log_level(level: &str) -> std::result::Result<String, String> {
    let l = level.to_ascii_lowercase();
    if LOG_LEVELS.contains(&l.as_str()) {
        Ok(l)
    } else {
        Err(format!(
            "{level:?} is not one of off, error, warn, info, debug, trace"
        ))
    }
}

impl ConfigFile {
    /// Reads and validates the file at `path`. Fails with exit 2 when it cannot be read, does
    /// not parse, has an unknown key or a bad value, or holds secrets while being accessible
    /// by group or others.
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::usage(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Self::parse(&text, path, group_other_bits(path))
    }

    /// Validates `text` as the content of `path`, whose permission bits for group and
    /// others are `group_other_bits` (`mode & 0o077`).
    pub fn parse(text: &str, path: &Path, group_other_bits: u32) -> Result<ConfigFile> {
        let file = path.display().to_string();
        let src = Source { file: &file, text };

        // Syntax first, then secrets (before the schema: a secret under an unknown key is
        // still a secret on disk), then the schema.
        let doc: toml::Table = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
        let mut secrets = Vec::new();
        secret_keys(&doc, "", &mut secrets);
        if let Some(toml::Value::Table(notify)) = doc.get("notify") {
            secrets.extend(pgkeep_notify::config::inline_secret_keys(notify));
        }
        if !secrets.is_empty() && group_other_bits != 0 {
            return Err(Error::usage_hint(
                format!(
                    "config file {file} holds secrets ({}) and is accessible by group or others (mode bits {group_other_bits:03o})",
                    secrets.join(", ")
                ),
                format!("run `chmod 600 {file}`"),
            ));
        }
        let raw: RawFile = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
        Self::validate(raw, &src, path)
    }

    fn validate(raw: RawFile, src: &Source<'_>, path: &Path) -> Result<ConfigFile> {
        let mut cfg = ConfigFile {
            path: path.to_path_buf(),
            ..Default::default()
        };
        if let Some(t) = raw.options.threads {
            let n = check_threads(*t.get_ref())
                .map_err(|m| src.error(t.span(), format!("options.threads: {m}")))?;
            cfg.options.threads = Some(n);
        }
        if let Some(l) = raw.options.log_level {
            let level = check_log_level(l.get_ref())
                .map_err(|m| src.error(l.span(), format!("options.log_level: {m}")))?;
            cfg.options.log_level = Some(level);
        }
        if let Some(c) = raw.options.relation_chunk_size {
            let text = match c.get_ref() {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let n = check_relation_chunk_size(&text)
                .map_err(|m| src.error(c.span(), format!("options.relation_chunk_size: {m}")))?;
            cfg.options.relation_chunk_size = Some(n);
        }
        if let Some(d) = raw.options.spool_dir {
            let p = check_spool_dir(d.get_ref())
                .map_err(|m| src.error(d.span(), format!("options.spool_dir: {m}")))?;
            cfg.options.spool_dir = Some(p);
        }

        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for r in raw.repository {
            let name = r.name.get_ref().clone();
            check_name("repository name", &name)
                .map_err(|m| src.error(r.name.span(), format!("repository.name: {m}")))?;
            if let Some(first) = seen.get(&name) {
                return Err(src.error(
                    r.name.span(),
                    format!("repository.name: duplicate repository name {name:?} (first defined at line {first})"),
                ));
            }
            seen.insert(name.clone(), line_col(src.text, r.name.span().start).0);
            let url = r.url.get_ref().clone();
            check_repo_url(&url, "repository.url").map_err(|e| at(src, r.url.span(), e))?;
            check_url(&url).map_err(|m| src.error(r.url.span(), format!("repository.url: {m}")))?;
            if let Some(ep) = &r.endpoint {
                check_endpoint(ep.get_ref())
                    .map_err(|m| src.error(ep.span(), format!("repository.endpoint: {m}")))?;
                check_repo_url(ep.get_ref(), "repository.endpoint")
                    .map_err(|e| at(src, ep.span(), e))?;
            }
            let compression_level = match &r.compression_level {
                Some(l) => Some(check_compression(*l.get_ref()).map_err(|m| {
                    src.error(l.span(), format!("repository.compression_level: {m}"))
                })?),
                None => None,
            };
            let positive = |v: &Option<Spanned<i64>>, key: &str, max: i64| match v {
                Some(v) if !(1..=max).contains(v.get_ref()) => Err(src.error(
                    v.span(),
                    format!(
                        "repository.{key}: {} is out of range 1..={max}",
                        v.get_ref()
                    ),
                )),
                Some(v) => Ok(Some(*v.get_ref())),
                None => Ok(None),
            };
            let retry_max_attempts =
                positive(&r.retry_max_attempts, "retry_max_attempts", 100)?.map(|v| v as u32);
            let retry_base_delay_ms =
                positive(&r.retry_base_delay_ms, "retry_base_delay_ms", 60_000)?.map(|v| v as u64);
            let request_timeout_secs =
                positive(&r.request_timeout_secs, "request_timeout_secs", 86_400)?
                    .map(|v| v as u64);
            let checked =
                |v: &Option<Spanned<String>>,
                 key: &str,
                 check: fn(&str) -> std::result::Result<String, String>| {
                    match v {
                        Some(v) => check(v.get_ref())
                            .map(Some)
                            .map_err(|m| src.error(v.span(), format!("repository.{key}: {m}"))),
                        None => Ok(None),
                    }
                };
            let storage = StorageSettings {
                endpoint: r.endpoint.map(Spanned::into_inner),
                region: r.region,
                force_path_style: r.force_path_style,
                allow_http: r.allow_http.unwrap_or(false),
                azure_use_emulator: r.azure_use_emulator.unwrap_or(false),
                azure_account: r.azure_account,
                retry_max_attempts,
                retry_base_delay_ms,
                request_timeout_secs,
                storage_class: checked(&r.storage_class, "storage_class", check_storage_class)?,
                sse: checked(&r.sse, "sse", check_sse)?,
                sse_kms_key_id: r.sse_kms_key_id.map(Spanned::into_inner),
                sse_bucket_key: r.sse_bucket_key,
            };
            check_sse_combination(&storage)
                .map_err(|m| src.error(r.name.span(), format!("repository {name:?}: {m}")))?;
            cfg.repositories.push(RepositoryConfig {
                name,
                url,
                storage,
                compression_level,
                passphrase_file: r.passphrase_file,
            });
        }

        let mut seen_clusters: BTreeMap<String, usize> = BTreeMap::new();
        for c in raw.cluster {
            let name = c.name.get_ref().clone();
            check_name("cluster name", &name)
                .map_err(|m| src.error(c.name.span(), format!("cluster.name: {m}")))?;
            if let Some(first) = seen_clusters.get(&name) {
                return Err(src.error(
                    c.name.span(),
                    format!("cluster.name: duplicate cluster name {name:?} (first defined at line {first})"),
                ));
            }
            seen_clusters.insert(name.clone(), line_col(src.text, c.name.span().start).0);
            if let Some(pg) = &c.pg {
                check_conninfo(pg.get_ref(), "cluster.pg").map_err(|e| at(src, pg.span(), e))?;
            }
            if let Some(r) = &c.repository {
                if !seen.contains_key(r.get_ref()) {
                    let known: Vec<&str> = seen.keys().map(String::as_str).collect();
                    return Err(src.error(
                        r.span(),
                        format!(
                            "cluster.repository: unknown repository {:?} (defined: {})",
                            r.get_ref(),
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                }
            }
            for t in &c.copy_to {
                let own = c.repository.as_ref().map(|r| r.get_ref());
                if !seen.contains_key(t.get_ref()) || own == Some(t.get_ref()) {
                    let known: Vec<&str> = seen.keys().map(String::as_str).collect();
                    return Err(src.error(
                        t.span(),
                        format!(
                            "cluster.copy_to: {:?} is {} (defined: {})",
                            t.get_ref(),
                            if own == Some(t.get_ref()) {
                                "the cluster's own repository"
                            } else {
                                "not a [[repository]] of this file"
                            },
                            known.join(", ")
                        ),
                    ));
                }
            }
            let retention = match c.retention {
                Some(r) => check_retention(r, src, "cluster.retention")?,
                None => RetentionConfig::default(),
            };
            cfg.clusters.push(ClusterConfig {
                copy_to: c.copy_to.into_iter().map(Spanned::into_inner).collect(),
                name,
                pgdata: c.pgdata,
                pg: c.pg.map(Spanned::into_inner),
                repository: c.repository.map(Spanned::into_inner),
                retention,
                health: c.health.unwrap_or_default(),
            });
        }
        cfg.retention = check_retention(raw.retention, src, "retention")?;
        cfg.notify = raw.notify;
        cfg.health = raw.health;
        raw.drill
            .validate()
            .map_err(|m| Error::usage(format!("{}: {m}", path.display())))?;
        cfg.drill = raw.drill;
        for (i, sc) in raw.schedule.iter().enumerate() {
            let at = format!("{}: [[schedule]] number {}", path.display(), i + 1);
            sc.validate()
                .map_err(|m| match nth_table_header(src.text, "schedule", i) {
                    Some(start) => {
                        src.error(start..start, format!("[[schedule]] number {}: {m}", i + 1))
                    }
                    None => Error::usage(format!("{at}: {m}")),
                })?;
            if let Some(c) = &sc.cluster {
                if !cfg.clusters.is_empty() && cfg.cluster(c).is_none() {
                    return Err(Error::usage(format!(
                        "{at}: cluster {c:?} is not a [[cluster]] of the file"
                    )));
                }
            }
        }
        cfg.daemon = raw.daemon;
        cfg.schedules = raw.schedule;
        Ok(cfg)
    }

    /// The repository named `name`.
    pub fn repository(&self, name: &str) -> Option<&RepositoryConfig> {
        self.repositories.iter().find(|r| r.name == name)
    }

    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }
}

/// The byte offset of the `n`-th (from 0) `[[name]]` header line in `text`, so that an error
/// found after deserializing (a bad cron) can still name the file's line.
fn nth_table_header(text: &str, name: &str, n: usize) -> Option<usize> {
    let mut offset = 0;
    let mut seen = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        let inner = t
            .strip_prefix("[[")
            .and_then(|r| r.split("]]").next())
            .map(str::trim);
        if inner == Some(name) {
            if seen == n {
                return Some(offset + (line.len() - line.trim_start().len()));
            }
            seen += 1;
        }
        offset += line.len();
    }
    None
}

/// Validates a `[retention]` table: counts of 0 are refused with the key's position.
fn check_retention(raw: RawRetention, src: &Source<'_>, table: &str) -> Result<RetentionConfig> {
    let mut out = RetentionConfig::default();
    for (kind, policy, slot) in [
        ("physical", raw.physical, &mut out.physical),
        ("dump", raw.dump, &mut out.dump),
    ] {
        if let Some(p) = policy {
            p.get_ref().validate().map_err(|e| {
                let first = e.to_string();
                let first = first.lines().next().unwrap_or_default().replace("--", "");
                src.error(
                    p.span(),
                    format!("{table}.{kind}: {}", first.replace('-', "_")),
                )
            })?;
            *slot = p.into_inner();
        }
    }
    Ok(out)
}

/// Puts a position on an error produced by a shared check (secrets refusals).
fn at(src: &Source<'_>, span: Range<usize>, e: Error) -> Error {
    match e {
        Error::Usage { message, hint } => {
            let (line, column) = line_col(src.text, span.start);
            Error::Config {
                file: src.file.to_string(),
                line,
                column,
                message,
                hint,
            }
        }
        other => other,
    }
}

/// Which configuration file to read: `--config`, else `PGKEEP_CONFIG`, else the default path
/// when it exists. The flag's or variable's file must exist.
pub fn config_path(flag: Option<&Path>, env: &Env) -> Result<Option<PathBuf>> {
    config_path_with_default(flag, env, Path::new(DEFAULT_CONFIG_PATH))
}

fn config_path_with_default(
    flag: Option<&Path>,
    env: &Env,
    default: &Path,
) -> Result<Option<PathBuf>> {
    let (path, what) = match (flag, env.non_empty(env::CONFIG)) {
        (Some(p), _) => (p.to_path_buf(), "--config"),
        (None, Some(p)) => (PathBuf::from(p), env::CONFIG),
        (None, None) => {
            return Ok(default.exists().then(|| default.to_path_buf()));
        }
    };
    if !path.is_file() {
        return Err(Error::usage(format!(
            "{what}: config file {} does not exist or is not a file",
            path.display()
        )));
    }
    Ok(Some(path))
}

// ---------------------------------------------------------------------------------------------
// Effective settings.

/// Values given on the command line (the highest precedence). `None` = not given.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--repo URL`.
    pub repo: Option<String>,
    /// `--cluster NAME`.
    pub cluster: Option<String>,
    /// `--pgdata DIR`.
    pub pgdata: Option<PathBuf>,
    /// `--pg CONNINFO`.
    pub pg: Option<String>,
    /// `repo init --compression-level N`.
    pub compression_level: Option<i32>,
    /// Log level from `-v` / `-q`.
    pub log_level: Option<String>,
    /// `--lock-wait DURATION`.
    pub lock_wait: Option<String>,
}

/// The repository to use, after precedence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepositorySettings {
    /// Name of the `[[repository]]` it came from, if any.
    pub name: Option<String>,
    /// Location: a path or a URL without credentials.
    pub url: String,
    /// Storage settings.
    pub storage: StorageSettings,
    /// zstd level for `repo init`.
    pub compression_level: i32,
    /// Passphrase file from the config file (the variables take precedence, see secrets).
    pub passphrase_file: Option<PathBuf>,
}

/// The cluster to work on, after precedence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterSettings {
    /// Its name (default `main`).
    pub name: String,
    /// Its data directory, if known.
    pub pgdata: Option<PathBuf>,
    /// Its connection string (no password), if known.
    pub pg: Option<String>,
    /// Repositories (names) that `backup`, `dump` and `archive-push` also write to
    /// (`cluster.copy_to`).
    pub copy_to: Vec<String>,
}

/// Every setting of one run, after precedence (flags > environment > file > defaults).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// The configuration file read, if any.
    pub config_file: Option<PathBuf>,
    /// The repository, when one is configured by any source.
    pub repository: Option<RepositorySettings>,
    /// The cluster.
    pub cluster: ClusterSettings,
    /// Worker threads.
    pub threads: usize,
    /// Log level, one of [`LOG_LEVELS`].
    pub log_level: String,
    /// How backups cut relation files (see [`check_relation_chunk_size`]); `None` = the
    /// backup command's default.
    pub relation_chunk_size: Option<u32>,
    /// Spool directory of asynchronous archiving (`None`: synchronous).
    pub spool_dir: Option<PathBuf>,
    /// How long to wait for a conflicting repository lock (`--lock-wait`, `PGKEEP_LOCK_WAIT`;
    /// zero: fail at once with exit 11).
    pub lock_wait: std::time::Duration,
    /// Names of the file's repositories (for the hint when none was selected).
    pub configured_repositories: Vec<String>,
    /// The file's repositories, for commands that use a second one (`copy --to NAME`).
    pub file_repositories: Vec<RepositoryConfig>,
    /// Retention policies of the cluster: `[retention]` with the cluster's own over them.
    pub retention: RetentionConfig,
    /// `[notify]` with `PGKEEP_NOTIFY_*` over it.
    pub notify: pgkeep_notify::NotifyConfig,
    /// Health thresholds of the cluster: `[health]` with the cluster's own over them, and
    /// the defaults for keys set nowhere.
    pub health: HealthSettings,
    /// `[drill]` of the file.
    pub drill: DrillConfig,
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8)
}

fn env_parse<T>(
    env: &Env,
    name: &str,
    check: impl Fn(&str) -> std::result::Result<T, String>,
) -> Result<Option<T>> {
    match env.non_empty(name) {
        Some(v) => check(&v)
            .map(Some)
            .map_err(|m| Error::usage(format!("{name}: {m}"))),
        None => Ok(None),
    }
}

fn parse_bool(v: &str) -> std::result::Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "{v:?} is not a boolean (true/false, yes/no, on/off, 1/0)"
        )),
    }
}

fn parse_int(v: &str) -> std::result::Result<i64, String> {
    v.trim()
        .parse::<i64>()
        .map_err(|_| format!("{v:?} is not an integer"))
}

/// `[notify]` of the file with `PGKEEP_NOTIFY_STATE_DIR` and `PGKEEP_NOTIFY_DEDUP_WINDOW`
/// over it.
fn resolve_notify(file: Option<&ConfigFile>, env: &Env) -> Result<pgkeep_notify::NotifyConfig> {
    let mut notify = file.map(|f| f.notify.clone()).unwrap_or_default();
    if let Some(d) = env.non_empty(env::NOTIFY_STATE_DIR) {
        notify.state_dir = Some(PathBuf::from(d));
    }
    if let Some(w) = env_parse(
        env,
        env::NOTIFY_DEDUP_WINDOW,
        pgkeep_notify::config::parse_duration,
    )? {
        notify.dedup_window = Some(w);
    }
    Ok(notify)
}

/// `PGKEEP_HEALTH_<KEY>` variables as a [`HealthConfig`]: each value is read as a TOML value
/// (`26h` as a string, `10` as a number, `false` as a boolean) and checked as the same key of
/// `[health]` would be; a variable that names no key is refused, so a typo is not ignored.
fn health_from_env(env: &Env) -> Result<HealthConfig> {
    let mut table = toml::Table::new();
    for (name, value) in env.0.range(env::HEALTH_PREFIX.to_string()..) {
        let Some(key) = name.strip_prefix(env::HEALTH_PREFIX) else {
            break;
        };
        if value.is_empty() {
            continue;
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let one = toml::Table::from_iter([(key.to_ascii_lowercase(), parsed.clone())]);
        HealthConfig::deserialize(toml::Value::Table(one)).map_err(|e| {
            Error::usage_hint(
                format!("{name}: {}", e.message()),
                "PGKEEP_HEALTH_<KEY> takes the keys of [health] (see docs/config.md)",
            )
        })?;
        table.insert(key.to_ascii_lowercase(), parsed);
    }
    HealthConfig::deserialize(toml::Value::Table(table))
        .map_err(|e| Error::usage(format!("{}*: {}", env::HEALTH_PREFIX, e.message())))
}

impl Settings {
    /// Finds and reads the configuration file, then resolves every setting. Nothing outside
    /// the file is read or touched.
    pub fn load(flags: &Overrides, env: &Env) -> Result<Settings> {
        let file = match config_path(flags.config.as_deref(), env)? {
            Some(p) => Some(ConfigFile::load(&p)?),
            None => None,
        };
        Self::resolve(file.as_ref(), env, flags)
    }

    /// Resolves every setting from an already validated file, the environment and the flags.
    ///
    /// The repository is chosen by `PGKEEP_REPOSITORY`, else the cluster's `repository`,
    /// else the only `[[repository]]` of the file; `--repo` / `PGKEEP_REPO` replace its URL
    /// (or stand alone). The cluster is `--cluster`, else `PGKEEP_CLUSTER`, else `main`.
    pub fn resolve(file: Option<&ConfigFile>, env: &Env, flags: &Overrides) -> Result<Settings> {
        let file_name = file
            .map(|f| f.path.display().to_string())
            .unwrap_or_default();

        // Cluster.
        let (cluster_name, cluster_src) = match (&flags.cluster, env.non_empty(env::CLUSTER)) {
            (Some(c), _) => (c.clone(), "--cluster"),
            (None, Some(c)) => (c, env::CLUSTER),
            (None, None) => (DEFAULT_CLUSTER.to_string(), "--cluster"),
        };
        check_name("cluster name", &cluster_name)
            .map_err(|m| Error::usage(format!("{cluster_src}: {m}")))?;
        let file_cluster = file.and_then(|f| f.cluster(&cluster_name));

        // Which configured repository.
        let file_repo = match env.non_empty(env::REPOSITORY) {
            Some(name) => match file.and_then(|f| f.repository(&name)) {
                Some(r) => Some(r),
                None => {
                    return Err(Error::usage(if file.is_some() {
                        format!(
                            "{}: no repository named {name:?} in {file_name}",
                            env::REPOSITORY
                        )
                    } else {
                        format!(
                            "{}: no repository named {name:?}: no config file",
                            env::REPOSITORY
                        )
                    }))
                }
            },
            None => match (file_cluster.and_then(|c| c.repository.as_deref()), file) {
                (Some(name), Some(f)) => f.repository(name),
                (None, Some(f)) if f.repositories.len() == 1 => f.repositories.first(),
                _ => None,
            },
        };

        // Location.
        let url = match (&flags.repo, env.non_empty(env::REPO)) {
            (Some(u), _) => Some((u.clone(), "--repo")),
            (None, Some(u)) => Some((u, env::REPO)),
            (None, None) => file_repo.map(|r| (r.url.clone(), "repository.url")),
        };
        let repository = match url {
            None => None,
            Some((url, src)) => {
                check_repo_url(&url, src)?;
                check_url(&url).map_err(|m| Error::usage(format!("{src}: {m}")))?;
                let mut storage = file_repo.map(|r| r.storage.clone()).unwrap_or_default();
                if let Some(ep) = env.non_empty(env::REPO_ENDPOINT) {
                    check_endpoint(&ep)
                        .map_err(|m| Error::usage(format!("{}: {m}", env::REPO_ENDPOINT)))?;
                    check_repo_url(&ep, env::REPO_ENDPOINT)?;
                    storage.endpoint = Some(ep);
                }
                if let Some(region) = env.non_empty(env::REPO_REGION) {
                    storage.region = Some(region);
                }
                if let Some(b) = env_parse(env, env::REPO_FORCE_PATH_STYLE, parse_bool)? {
                    storage.force_path_style = Some(b);
                }
                if let Some(b) = env_parse(env, env::REPO_ALLOW_HTTP, parse_bool)? {
                    storage.allow_http = b;
                }
                if let Some(b) = env_parse(env, env::REPO_AZURE_USE_EMULATOR, parse_bool)? {
                    storage.azure_use_emulator = b;
                }
                if let Some(a) = env.non_empty(env::REPO_AZURE_ACCOUNT) {
                    storage.azure_account = Some(a);
                }
                let range = |max: i64| {
                    move |v: &str| {
                        let n = parse_int(v)?;
                        if (1..=max).contains(&n) {
                            Ok(n)
                        } else {
                            Err(format!("{n} is out of range 1..={max}"))
                        }
                    }
                };
                if let Some(n) = env_parse(env, env::REPO_RETRY_MAX_ATTEMPTS, range(100))? {
                    storage.retry_max_attempts = Some(n as u32);
                }
                if let Some(n) = env_parse(env, env::REPO_RETRY_BASE_DELAY_MS, range(60_000))? {
                    storage.retry_base_delay_ms = Some(n as u64);
                }
                if let Some(n) = env_parse(env, env::REPO_REQUEST_TIMEOUT_SECS, range(86_400))? {
                    storage.request_timeout_secs = Some(n as u64);
                }
                if let Some(c) = env_parse(env, env::REPO_STORAGE_CLASS, check_storage_class)? {
                    storage.storage_class = Some(c);
                }
                if let Some(m) = env_parse(env, env::REPO_SSE, check_sse)? {
                    storage.sse = Some(m);
                }
                if let Some(k) = env.non_empty(env::REPO_SSE_KMS_KEY_ID) {
                    storage.sse_kms_key_id = Some(k);
                }
                if let Some(b) = env_parse(env, env::REPO_SSE_BUCKET_KEY, parse_bool)? {
                    storage.sse_bucket_key = Some(b);
                }
                check_sse_combination(&storage).map_err(|m| Error::usage(format!("{src}: {m}")))?;
                let compression_level = match flags.compression_level {
                    Some(l) => check_compression(l as i64)
                        .map_err(|m| Error::usage(format!("--compression-level: {m}")))?,
                    None => match env_parse(env, env::COMPRESSION_LEVEL, |v| {
                        check_compression(parse_int(v)?)
                    })? {
                        Some(l) => l,
                        None => file_repo
                            .and_then(|r| r.compression_level)
                            .unwrap_or(DEFAULT_COMPRESSION_LEVEL),
                    },
                };
                Some(RepositorySettings {
                    name: file_repo.map(|r| r.name.clone()),
                    url,
                    storage,
                    compression_level,
                    passphrase_file: file_repo.and_then(|r| r.passphrase_file.clone()),
                })
            }
        };

        // Cluster details.
        let pgdata = flags
            .pgdata
            .clone()
            .or_else(|| env.non_empty(env::PGDATA).map(PathBuf::from))
            .or_else(|| file_cluster.and_then(|c| c.pgdata.clone()));
        let pg = match (&flags.pg, env.non_empty(env::PG)) {
            (Some(pg), _) => Some((pg.clone(), "--pg")),
            (None, Some(pg)) => Some((pg, env::PG)),
            (None, None) => file_cluster
                .and_then(|c| c.pg.clone())
                .map(|pg| (pg, "cluster.pg")),
        };
        if let Some((pg, src)) = &pg {
            check_conninfo(pg, src)?;
        }

        let threads = match env_parse(env, env::THREADS, |v| check_threads(parse_int(v)?))? {
            Some(n) => n,
            None => file
                .and_then(|f| f.options.threads)
                .unwrap_or_else(default_threads),
        };
        let log_level = match &flags.log_level {
            Some(l) => check_log_level(l).map_err(|m| Error::usage(format!("log level: {m}")))?,
            None => match env_parse(env, env::LOG, check_log_level)? {
                Some(l) => l,
                None => file
                    .and_then(|f| f.options.log_level.clone())
                    .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string()),
            },
        };

        let relation_chunk_size =
            match env_parse(env, env::RELATION_CHUNK_SIZE, check_relation_chunk_size)? {
                Some(n) => Some(n),
                None => file.and_then(|f| f.options.relation_chunk_size),
            };
        let lock_wait = match &flags.lock_wait {
            Some(v) => check_lock_wait(v).map_err(|m| Error::usage(format!("--lock-wait: {m}")))?,
            None => env_parse(env, env::LOCK_WAIT, check_lock_wait)?.unwrap_or_default(),
        };
        let spool_dir = match env_parse(env, env::SPOOL_DIR, check_spool_dir)? {
            Some(p) => Some(p),
            None => file.and_then(|f| f.options.spool_dir.clone()),
        };

        let notify = resolve_notify(file, env)?;
        Ok(Settings {
            notify,
            config_file: file.map(|f| f.path.clone()),
            repository,
            cluster: ClusterSettings {
                name: cluster_name,
                pgdata,
                pg: pg.map(|(pg, _)| pg),
                copy_to: file_cluster.map(|c| c.copy_to.clone()).unwrap_or_default(),
            },
            threads,
            log_level,
            relation_chunk_size,
            spool_dir,
            lock_wait,
            configured_repositories: file
                .map(|f| f.repositories.iter().map(|r| r.name.clone()).collect())
                .unwrap_or_default(),
            file_repositories: file.map(|f| f.repositories.clone()).unwrap_or_default(),
            retention: file
                .map(|f| {
                    let own = file_cluster
                        .map(|c| c.retention.clone())
                        .unwrap_or_default();
                    f.retention.overlay(&own)
                })
                .unwrap_or_default(),
            health: {
                let from_file = file
                    .map(|f| {
                        let own = file_cluster.map(|c| c.health.clone()).unwrap_or_default();
                        f.health.overlay(&own)
                    })
                    .unwrap_or_default();
                HealthSettings::from(&from_file.overlay(&health_from_env(env)?))
            },
            drill: file.map(|f| f.drill.clone()).unwrap_or_default(),
        })
    }

    /// A second repository (`copy --to`): a `[[repository]]` of the file by name, else a
    /// path or URL (without credentials; storage defaults, credentials from the provider's
    /// environment variables as for `--repo`).
    pub fn other_repository(&self, name_or_url: &str) -> Result<RepositorySettings> {
        if let Some(r) = self
            .file_repositories
            .iter()
            .find(|r| r.name == name_or_url)
        {
            return Ok(RepositorySettings {
                name: Some(r.name.clone()),
                url: r.url.clone(),
                storage: r.storage.clone(),
                compression_level: r.compression_level.unwrap_or(DEFAULT_COMPRESSION_LEVEL),
                passphrase_file: r.passphrase_file.clone(),
            });
        }
        check_repo_url(name_or_url, "--to")?;
        check_url(name_or_url).map_err(|m| {
            Error::usage_hint(
                format!("--to: {m}"),
                "give the name of a [[repository]] of the configuration file, a path or a URL",
            )
        })?;
        Ok(RepositorySettings {
            name: None,
            url: name_or_url.to_string(),
            storage: StorageSettings::default(),
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            passphrase_file: None,
        })
    }

    /// The repository, or a usage error (exit 2) saying how to give one.
    pub fn require_repository(&self) -> Result<&RepositorySettings> {
        self.repository.as_ref().ok_or_else(|| {
            if self.configured_repositories.len() > 1 {
                Error::usage_hint(
                    format!(
                        "no repository selected for cluster {:?} among {}",
                        self.cluster.name,
                        self.configured_repositories.join(", ")
                    ),
                    "set the cluster's `repository` in the config file, or PGKEEP_REPOSITORY=NAME, or use --repo URL",
                )
            } else {
                Error::usage_hint(
                    "no repository given",
                    "use --repo URL, set PGKEEP_REPO, or add a [[repository]] to the config file (see docs/config.md)",
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[options]
threads = 4
log_level = "INFO"

[[repository]]
name = "main"
url = "/var/lib/pgkeep"
compression_level = 5

[[repository]]
name = "offsite"
url = "s3://backups/pgkeep"
endpoint = "http://127.0.0.1:8333"
region = "us-east-1"
force_path_style = true
allow_http = true

[[cluster]]
name = "main"
pgdata = "/var/lib/postgresql/15/main"
pg = "host=/var/run/postgresql user=postgres"
repository = "main"

[[cluster]]
name = "reports"
repository = "offsite"
"#;

    fn parse(text: &str) -> Result<ConfigFile> {
        ConfigFile::parse(text, Path::new("/etc/pgkeep/pgkeep.toml"), 0)
    }

    #[test]
    fn storage_class_and_sse_parse_and_bad_values_are_refused_with_their_position() {
        let ok = r#"
[[repository]]
name = "offsite"
url = "s3://backups/pgkeep"
storage_class = "STANDARD_IA"
sse = "aws:kms"
sse_kms_key_id = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd"
sse_bucket_key = true
"#;
        let c = parse(ok).unwrap();
        let st = &c.repositories[0].storage;
        assert_eq!(st.storage_class.as_deref(), Some("STANDARD_IA"));
        assert_eq!(st.sse.as_deref(), Some("aws:kms"));
        assert_eq!(st.sse_bucket_key, Some(true));
        // The variables override the file, and are checked the same way.
        let env = Env::from_pairs([(env::REPO_SSE, "AES256"), (env::REPO_SSE_KMS_KEY_ID, "")]);
        let s = Settings::resolve(Some(&c), &env, &Overrides::default()).unwrap_err();
        assert_eq!(
            s.to_string(),
            "repository.url: sse_kms_key_id and sse_bucket_key need sse = \"aws:kms\" or \"aws:kms:dsse\""
        );

        let bad = ok.replace("aws:kms\"", "KMS\"");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("pgkeep.toml:6:")
                && e.contains("repository.sse: \"KMS\" is not a server-side encryption mode"),
            "{e}"
        );
        let bad = ok.replace("STANDARD_IA", "standard ia");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("pgkeep.toml:5:") && e.contains("repository.storage_class"),
            "{e}"
        );
        let bad = ok.replace("sse = \"aws:kms\"\n", "");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("sse_kms_key_id and sse_bucket_key need sse"),
            "{e}"
        );
    }

    #[test]
    fn retention_per_kind_with_a_cluster_override_and_zero_counts_refused_with_position() {
        let text = r#"
[retention.physical]
keep_daily = 7
keep_weekly = 4
[retention.dump]
keep_last = 3
keep_within = "30d"

[[cluster]]
name = "main"
[cluster.retention.physical]
keep_daily = 30

[[cluster]]
name = "reports"
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.retention.physical.keep_weekly, Some(4));
        assert_eq!(c.retention.dump.keep_within.unwrap().hours, 30 * 24);
        let env = Env::default();
        let flags = |name: &str| Overrides {
            cluster: Some(name.into()),
            ..Default::default()
        };
        let main = Settings::resolve(Some(&c), &env, &flags("main")).unwrap();
        assert_eq!(main.retention.physical.keep_daily, Some(30));
        assert_eq!(main.retention.physical.keep_weekly, Some(4));
        assert_eq!(main.retention.dump.keep_last, Some(3));
        let reports = Settings::resolve(Some(&c), &env, &flags("reports")).unwrap();
        assert_eq!(reports.retention.physical.keep_daily, Some(7));

        let e = parse("[retention.physical]\nkeep_daily = 0\n").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .contains("pgkeep.toml:1:1: retention.physical: keep_daily 0 keeps nothing"),
            "{e}"
        );
        let e = parse("[retention.dump]\nkeep_dayly = 3\n").unwrap_err();
        assert!(e.to_string().contains("keep_dayly"), "{e}");
        let e = parse("[retention.dump]\nkeep_within = \"3x\"\n").unwrap_err();
        assert!(e.to_string().contains("not a duration"), "{e}");
    }

    #[test]
    fn good_file_parses() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.options.threads, Some(4));
        assert_eq!(c.options.log_level.as_deref(), Some("info"));
        assert_eq!(c.repositories.len(), 2);
        assert_eq!(c.repositories[0].compression_level, Some(5));
        assert_eq!(
            c.repositories[1].storage,
            StorageSettings {
                endpoint: Some("http://127.0.0.1:8333".into()),
                region: Some("us-east-1".into()),
                force_path_style: Some(true),
                allow_http: true,
                ..Default::default()
            }
        );
        assert_eq!(c.clusters[1].repository.as_deref(), Some("offsite"));
        assert!(parse("").unwrap().repositories.is_empty());
    }

    /// Every rejection, with its exact message (file:line:column: key: what).
    #[test]
    fn bad_files_are_rejected_with_exact_messages() {
        let f = "/etc/pgkeep/pgkeep.toml";
        let table: Vec<(&str, String)> = vec![
            (
                "[options]\nthreds = 4\n",
                format!("{f}:2:1: unknown field `threds`, expected one of `threads`, `log_level`, `relation_chunk_size`, `spool_dir` in [options]"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"/x\"\ncompresion_level = 3\n",
                format!("{f}:4:1: unknown field `compresion_level`, expected one of `name`, `url`, `endpoint`, `region`, `force_path_style`, `allow_http`, `azure_use_emulator`, `azure_account`, `retry_max_attempts`, `retry_base_delay_ms`, `request_timeout_secs`, `storage_class`, `sse`, `sse_kms_key_id`, `sse_bucket_key`, `compression_level`, `passphrase_file` in [repository]"),
            ),
            (
                "[general]\nx = 1\n",
                format!("{f}:1:2: unknown field `general`, expected one of `options`, `repository`, `cluster`, `retention`, `notify`, `health`, `drill`, `daemon`, `schedule`"),
            ),
            (
                "[options]\nthreads = \"four\"\n",
                format!("{f}:2:11: options.threads: invalid type: string \"four\", expected i64"),
            ),
            ("[options]\nthreads = 0\n", format!("{f}:2:11: options.threads: 0 is out of range 1..=256")),
            (
                "[options]\nlog_level = \"loud\"\n",
                format!("{f}:2:13: options.log_level: \"loud\" is not one of off, error, warn, info, debug, trace"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"/x\"\ncompression_level = 23\n",
                format!("{f}:4:21: repository.compression_level: 23 is out of range 1..=22"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"/x\"\ncompression_level = 0\n",
                format!("{f}:4:21: repository.compression_level: 0 is out of range 1..=22"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"ftp://host/x\"\n",
                format!("{f}:3:7: repository.url: unsupported URL scheme \"ftp\": use a path, file://, s3://, az:// or gs://"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"s3:///x\"\n",
                format!("{f}:3:7: repository.url: s3:// URL has no bucket or container name"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"file://relative\"\n",
                format!("{f}:3:7: repository.url: file URL must hold an absolute path (file:///...), got \"file://relative\""),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"\"\n",
                format!("{f}:3:7: repository.url: the repository location is empty"),
            ),
            (
                "[[repository]]\nname = \"a\"\n",
                format!("{f}:1:1: missing field `url` in [repository]"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"/x\"\n[[repository]]\nname = \"a\"\nurl = \"/y\"\n",
                format!("{f}:5:8: repository.name: duplicate repository name \"a\" (first defined at line 2)"),
            ),
            (
                "[[repository]]\nname = \"a b\"\nurl = \"/x\"\n",
                format!("{f}:2:8: repository.name: invalid repository name \"a b\": use 1 to 64 letters, digits, '-', '_' or '.'"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"/x\"\nendpoint = \"127.0.0.1:8333\"\n",
                format!("{f}:4:12: repository.endpoint: endpoint must start with http:// or https://"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"s3://KEY:SECRETX@bucket/p\"\n",
                format!("{f}:3:7: repository.url: the repository URL holds credentials, which is refused (they would show in the process list, logs or files)\nHINT: remove them and use the AWS_* variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or an instance role"),
            ),
            (
                "[[repository]]\nname = \"a\"\nurl = \"/x\"\n[[cluster]]\nname = \"main\"\nrepository = \"b\"\n",
                format!("{f}:6:14: cluster.repository: unknown repository \"b\" (defined: a)"),
            ),
            (
                "[[cluster]]\nname = \"main\"\n[[cluster]]\nname = \"main\"\n",
                format!("{f}:4:8: cluster.name: duplicate cluster name \"main\" (first defined at line 2)"),
            ),
            (
                "[[cluster]]\nname = \"main\"\npg = \"host=db password=SECRETX\"\n",
                format!("{f}:3:6: cluster.pg: the connection string holds a password, which is refused (it would show in the process list, logs or files)\nHINT: remove it and give the password through PGPASSWORD or ~/.pgpass (or PGPASSFILE)"),
            ),
            (
                "[options\n",
                format!("{f}:1:9: unclosed table, expected `]`"),
            ),
            // RELIABILITY.md row 27: a bad cron and a negative retention, at load.
            (
                "[[schedule]]\njob = \"dump\"\ncron = \"0 3 * * *\"\ndb = \"a\"\n\n  [[ schedule ]]\njob = \"dump\"\ncron = \"61 * * * *\"\ndb = \"a\"\n",
                format!("{f}:6:3: [[schedule]] number 2: cron \"61 * * * *\": Component error: Number out of bounds."),
            ),
            (
                "[retention.physical]\nkeep_daily = -1\n",
                format!("{f}:2:14: retention.physical.keep_daily: invalid value: integer `-1`, expected u32"),
            ),
        ];
        for (text, expected) in table {
            let e = parse(text).expect_err(text);
            assert_eq!(e.to_string(), expected, "for {text:?}");
            assert_eq!(e.exit_code(), 2, "{text}");
            assert!(!e.to_string().contains("SECRETX"));
        }
    }

    #[test]
    fn secrets_need_a_private_file() {
        let text = "[[repository]]\nname = \"a\"\nurl = \"/x\"\nwebhook_token = \"SECRETX\"\n";
        let e = ConfigFile::parse(text, Path::new("/etc/p.toml"), 0o044).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config file /etc/p.toml holds secrets (repository.webhook_token) and is accessible by group or others (mode bits 044)\n\
             HINT: run `chmod 600 /etc/p.toml`"
        );
        assert_eq!(e.exit_code(), 2);
        // Private: the secret check passes and the schema check names the unknown key.
        let e = ConfigFile::parse(text, Path::new("/etc/p.toml"), 0).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/etc/p.toml:4:1: unknown field `webhook_token`"),
            "{e}"
        );
        // A file *naming* where a secret is, is not a secret.
        let text =
            "[[repository]]\nname = \"a\"\nurl = \"/x\"\npassphrase_file = \"/etc/pgkeep/pass\"\n";
        assert!(ConfigFile::parse(text, Path::new("/etc/p.toml"), 0o044).is_ok());
    }

    #[test]
    fn load_reads_modes_from_disk() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgkeep.toml");
        std::fs::write(&p, "[options]\npassword = \"x\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ConfigFile::load(&p).unwrap_err();
        assert!(
            e.to_string().contains("holds secrets (options.password)"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = ConfigFile::load(&p).unwrap_err();
        assert!(e.to_string().contains("unknown field `password`"), "{e}");
        let e = ConfigFile::load(&dir.path().join("missing.toml")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn config_path_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        let d = dir.path().join("default.toml");
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let env_b = Env::from_pairs([(env::CONFIG, b.to_str().unwrap())]);
        assert_eq!(
            config_path_with_default(Some(&a), &env_b, &d).unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            config_path_with_default(None, &env_b, &d).unwrap(),
            Some(b.clone())
        );
        assert_eq!(
            config_path_with_default(None, &Env::default(), &d).unwrap(),
            None
        );
        std::fs::write(&d, "").unwrap();
        assert_eq!(
            config_path_with_default(None, &Env::default(), &d).unwrap(),
            Some(d.clone())
        );
        let missing = dir.path().join("missing.toml");
        let e = config_path_with_default(Some(&missing), &Env::default(), &d).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "--config: config file {} does not exist or is not a file",
                missing.display()
            )
        );
    }

    #[test]
    fn precedence_flags_env_file_defaults() {
        let file = parse(GOOD).unwrap();
        // File only: cluster main -> repository main.
        let s = Settings::resolve(Some(&file), &Env::default(), &Overrides::default()).unwrap();
        let r = s.repository.as_ref().unwrap();
        assert_eq!(r.name.as_deref(), Some("main"));
        assert_eq!(r.url, "/var/lib/pgkeep");
        assert_eq!(r.compression_level, 5);
        assert_eq!(s.cluster.name, "main");
        assert_eq!(
            s.cluster.pgdata.as_deref(),
            Some(Path::new("/var/lib/postgresql/15/main"))
        );
        assert_eq!(s.threads, 4);
        assert_eq!(s.log_level, "info");

        // Environment beats the file.
        let env = Env::from_pairs([
            (env::CLUSTER, "reports"),
            (env::COMPRESSION_LEVEL, "9"),
            (env::THREADS, "2"),
            (env::LOG, "debug"),
            (env::REPO_REGION, "eu-west-1"),
            (env::PG, "host=other"),
        ]);
        let s = Settings::resolve(Some(&file), &env, &Overrides::default()).unwrap();
        let r = s.repository.as_ref().unwrap();
        assert_eq!(r.name.as_deref(), Some("offsite"));
        assert_eq!(r.url, "s3://backups/pgkeep");
        assert_eq!(r.compression_level, 9);
        assert_eq!(r.storage.region.as_deref(), Some("eu-west-1"));
        assert_eq!(r.storage.force_path_style, Some(true));
        assert_eq!(s.cluster.name, "reports");
        assert_eq!(s.cluster.pg.as_deref(), Some("host=other"));
        assert_eq!((s.threads, s.log_level.as_str()), (2, "debug"));

        // Flags beat the environment.
        let flags = Overrides {
            repo: Some("/tmp/r".into()),
            cluster: Some("main".into()),
            compression_level: Some(1),
            log_level: Some("error".into()),
            pg: Some("host=flag".into()),
            ..Default::default()
        };
        let s = Settings::resolve(Some(&file), &env, &flags).unwrap();
        let r = s.repository.as_ref().unwrap();
        assert_eq!((r.url.as_str(), r.compression_level), ("/tmp/r", 1));
        assert_eq!(s.cluster.name, "main");
        assert_eq!(s.cluster.pg.as_deref(), Some("host=flag"));
        assert_eq!(s.log_level, "error");

        // PGKEEP_REPOSITORY picks a configured repository by name.
        let env = Env::from_pairs([(env::REPOSITORY, "offsite")]);
        let s = Settings::resolve(Some(&file), &env, &Overrides::default()).unwrap();
        assert_eq!(s.repository.unwrap().url, "s3://backups/pgkeep");

        // Two repositories and a cluster that names none: nothing is guessed.
        let s = Settings::resolve(
            Some(&file),
            &Env::from_pairs([(env::CLUSTER, "other")]),
            &Overrides::default(),
        )
        .unwrap();
        assert!(s.repository.is_none());
        assert_eq!(
            s.require_repository().unwrap_err().to_string(),
            "no repository selected for cluster \"other\" among main, offsite\n\
             HINT: set the cluster's `repository` in the config file, or PGKEEP_REPOSITORY=NAME, or use --repo URL"
        );

        // Defaults.
        let s = Settings::resolve(None, &Env::default(), &Overrides::default()).unwrap();
        assert!(s.repository.is_none());
        assert_eq!(s.cluster.name, "main");
        assert_eq!(s.log_level, "warn");
        assert!(s.threads >= 1);
        assert_eq!(s.require_repository().unwrap_err().exit_code(), 2);
        let s = Settings::resolve(
            None,
            &Env::from_pairs([(env::REPO, "/r")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            s.repository.unwrap().compression_level,
            DEFAULT_COMPRESSION_LEVEL
        );
    }

    #[test]
    fn bad_environment_values_are_rejected() {
        let file = parse(GOOD).unwrap();
        let table: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (vec![(env::COMPRESSION_LEVEL, "30")], "PGKEEP_COMPRESSION_LEVEL: 30 is out of range 1..=22"),
            (vec![(env::COMPRESSION_LEVEL, "x")], "PGKEEP_COMPRESSION_LEVEL: \"x\" is not an integer"),
            (vec![(env::THREADS, "0")], "PGKEEP_THREADS: 0 is out of range 1..=256"),
            (vec![(env::LOG, "chatty")], "PGKEEP_LOG: \"chatty\" is not one of off, error, warn, info, debug, trace"),
            (vec![(env::REPO_ALLOW_HTTP, "maybe")], "PGKEEP_REPO_ALLOW_HTTP: \"maybe\" is not a boolean (true/false, yes/no, on/off, 1/0)"),
            (vec![(env::REPO, "ftp://x/y")], "PGKEEP_REPO: unsupported URL scheme \"ftp\": use a path, file://, s3://, az:// or gs://"),
            (vec![(env::CLUSTER, "../etc")], "PGKEEP_CLUSTER: invalid cluster name \"../etc\": use 1 to 64 letters, digits, '-', '_' or '.'"),
            (vec![(env::REPOSITORY, "nope")], "PGKEEP_REPOSITORY: no repository named \"nope\" in /etc/pgkeep/pgkeep.toml"),
            (vec![(env::REPO_ENDPOINT, "localhost:9000")], "PGKEEP_REPO_ENDPOINT: endpoint must start with http:// or https://"),
        ];
        for (pairs, expected) in table {
            let e = Settings::resolve(Some(&file), &Env::from_pairs(pairs), &Overrides::default())
                .unwrap_err();
            assert_eq!(e.to_string(), expected);
            assert_eq!(e.exit_code(), 2);
        }
        let e = Settings::resolve(
            None,
            &Env::from_pairs([(env::PG, "password=SECRETX")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e
            .to_string()
            .starts_with("PGKEEP_PG: the connection string holds a password"));
        let flags = Overrides {
            repo: Some("s3://K:SECRETX@b/p".into()),
            ..Default::default()
        };
        let e = Settings::resolve(None, &Env::default(), &flags).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("--repo: the repository URL holds credentials"));
        assert!(!e.to_string().contains("SECRETX"));
    }

    #[test]
    fn notify_section_parses_with_positions_and_private_secrets() {
        let f = "/etc/pgkeep/pgkeep.toml";
        let c = parse(
            "[notify]\ndedup_window = \"2h\"\n[[notify.webhook]]\nurl = \"http://127.0.0.1:9/h\"\n",
        )
        .unwrap();
        assert_eq!(c.notify.webhook[0].url, "http://127.0.0.1:9/h");
        assert_eq!(
            c.notify.dedup_window(),
            std::time::Duration::from_secs(7200)
        );
        let cases = [
            ("[[notify.webhook]]\nurl = \"http://x\"\nuri = 1\n", format!("{f}:3:1: unknown field `uri`")),
            ("[notify]\ndedup_window = \"soon\"\n", format!("{f}:2:16: notify.dedup_window: \"soon\" is not a duration")),
            ("[notify]\n\n[[notify.slack]]\nname = \"x\"\n", format!("{f}:3:1: notify.slack: give webhook_url, webhook_url_env or webhook_url_file")),
            ("[[notify.email]]\nsmtp_host = \"h\"\nfrom = \"a@b\"\nto = [\"c@d\"]\ntls = \"ssl\"\n", format!("{f}:5:7: notify.email.tls: unknown variant `ssl`")),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.starts_with(&want), "{text}\n got: {e}\nwant: {want}");
        }
        // An inline Slack URL is a secret: the file must be private; the value never shows.
        let text =
            "[[notify.slack]]\nwebhook_url = \"https://hooks.slack.com/services/T/B/CANARY\"\n";
        let e = ConfigFile::parse(text, Path::new(f), 0o044)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds secrets (notify.slack.webhook_url)"),
            "{e}"
        );
        assert!(!e.contains("CANARY"), "{e}");
        let e = ConfigFile::parse(
            "[[notify.pagerduty]]\nrouting_key = \"CANARY\"\n",
            Path::new(f),
            0o004,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("holds secrets (notify.pagerduty.routing_key)") && !e.contains("CANARY"),
            "{e}"
        );
        let private = ConfigFile::parse(text, Path::new(f), 0).unwrap();
        assert!(!serde_json::to_string(&private).unwrap().contains("CANARY"));
        // Variables over the file.
        let env = Env::from_pairs([
            ("PGKEEP_NOTIFY_STATE_DIR", "/s"),
            ("PGKEEP_NOTIFY_DEDUP_WINDOW", "5m"),
        ]);
        let s = Settings::resolve(Some(&private), &env, &Overrides::default()).unwrap();
        assert_eq!(s.notify.state_dir, Some(PathBuf::from("/s")));
        assert_eq!(s.notify.dedup_window(), std::time::Duration::from_secs(300));
        let env = Env::from_pairs([("PGKEEP_NOTIFY_DEDUP_WINDOW", "often")]);
        let e = Settings::resolve(Some(&private), &env, &Overrides::default()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("PGKEEP_NOTIFY_DEDUP_WINDOW: \"often\" is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn health_variables_override_the_file_key_by_key_and_refuse_unknown_keys() {
        let file = parse("[health]\nbackup_warn_age = \"2h\"\nfree_space_warn = 20\n").unwrap();
        let env = Env::from_pairs([
            ("PGKEEP_HEALTH_FREE_SPACE_WARN", "3"),
            ("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1"),
            ("PGKEEP_HEALTH_CHECK_ARCHIVING", "false"),
            ("PGKEEP_HEALTH_DUMP_WARN_AGE", "3d"),
        ]);
        let s = Settings::resolve(Some(&file), &env, &Overrides::default()).unwrap();
        assert_eq!(s.health.free_space_warn, 3);
        assert_eq!(s.health.free_space_crit, 1);
        assert!(!s.health.check_archiving);
        assert_eq!(s.health.dump_warn_age.to_string(), "3d");
        assert_eq!(s.health.backup_warn_age.to_string(), "2h", "file key kept");
        for (var, value, message) in [
            (
                "PGKEEP_HEALTH_FREE_SPACE_WARM",
                "3",
                "PGKEEP_HEALTH_FREE_SPACE_WARM: unknown field `free_space_warm`",
            ),
            (
                "PGKEEP_HEALTH_FREE_SPACE_WARN",
                "0",
                "PGKEEP_HEALTH_FREE_SPACE_WARN: 0 is not a percentage from 1 to 100",
            ),
            (
                "PGKEEP_HEALTH_BACKUP_WARN_AGE",
                "soon",
                "PGKEEP_HEALTH_BACKUP_WARN_AGE: \"soon\" is not a duration",
            ),
        ] {
            let env = Env::from_pairs([(var, value)]);
            let e = Settings::resolve(Some(&file), &env, &Overrides::default()).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(e.to_string().starts_with(message), "{e}");
            assert!(e.to_string().contains("HINT: PGKEEP_HEALTH_<KEY>"), "{e}");
        }
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("é\nx", 1 + 2), (2, 1));
    }

    #[test]
    fn relation_chunk_sizes_parse() {
        assert_eq!(check_relation_chunk_size("cdc"), Ok(0));
        assert_eq!(check_relation_chunk_size("0"), Ok(0));
        assert_eq!(check_relation_chunk_size("262144"), Ok(256 << 10));
        assert_eq!(check_relation_chunk_size("128KiB"), Ok(128 << 10));
        assert_eq!(check_relation_chunk_size("1M"), Ok(1 << 20));
        assert!(check_relation_chunk_size("1000").is_err());
        assert!(check_relation_chunk_size("32MiB").is_err());
        assert!(check_relation_chunk_size("big").is_err());
        let c = ConfigFile::parse(
            "[options]\nrelation_chunk_size = \"1MiB\"\n",
            Path::new("/x.toml"),
            0,
        )
        .unwrap();
        assert_eq!(c.options.relation_chunk_size, Some(1 << 20));
        let e = ConfigFile::parse(
            "[options]\nrelation_chunk_size = 1000\n",
            Path::new("/x.toml"),
            0,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/x.toml:2:23: options.relation_chunk_size"),
            "{e}"
        );
    }

    #[test]
    fn spool_dir_must_be_absolute_in_file_and_environment() {
        let c = ConfigFile::parse(
            "[options]\nspool_dir = \"/var/spool/pgkeep\"\n",
            Path::new("/x.toml"),
            0,
        )
        .unwrap();
        assert_eq!(
            c.options.spool_dir.as_deref(),
            Some(Path::new("/var/spool/pgkeep"))
        );
        let e = ConfigFile::parse(
            "[options]\nspool_dir = \"spool\"\n",
            Path::new("/x.toml"),
            0,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/x.toml:2:13: options.spool_dir: \"spool\" is not an absolute path"
        );
        assert_eq!(e.exit_code(), 2);
        let s = Settings::resolve(Some(&c), &Env::default(), &Overrides::default()).unwrap();
        assert_eq!(s.spool_dir.as_deref(), Some(Path::new("/var/spool/pgkeep")));
        // The environment wins over the file, and is checked the same way.
        let env = Env::from_pairs([(env::SPOOL_DIR, "/run/pgkeep")]);
        let s = Settings::resolve(Some(&c), &env, &Overrides::default()).unwrap();
        assert_eq!(s.spool_dir.as_deref(), Some(Path::new("/run/pgkeep")));
        let env = Env::from_pairs([(env::SPOOL_DIR, "rel")]);
        let e = Settings::resolve(Some(&c), &env, &Overrides::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "PGKEEP_SPOOL_DIR: \"rel\" is not an absolute path"
        );
    }
}
