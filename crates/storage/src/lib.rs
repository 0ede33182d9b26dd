//! Object storage for pgkeep.
//!
//! One trait, [`Storage`], over a flat namespace of keys (`packs/ab/abcd…`, `config`, …).
//! Backends: a local directory (the default), and S3 / S3-compatible, Azure Blob and GCS
//! through the `object_store` crate. Decorators wrap any backend: [`Retry`] (temporary
//! errors only, exponential backoff with jitter) and [`Faulty`] (tests: injected faults).
//!
//! This crate knows bytes and keys, nothing of repositories or PostgreSQL.
//!
//! Invariants every backend upholds (checked by the shared conformance suite):
//! - `put` and `put_if_absent` are atomic: a reader sees either no object or the whole
//!   object, never a partial or 0-byte one under the final key.
//! - `put_if_absent` succeeds for exactly one of several concurrent writers of a key; the
//!   others get [`ErrorKind::AlreadyExists`] and the stored object is untouched.
//! - Local files are created 0600 and directories 0700 whatever the process umask.
//! - `list(prefix)` has plain string-prefix semantics on every backend: `a/b` lists `a/b`,
//!   `a/b/x` and `a/bc/x`; pass `a/b/` to list one "directory" only. (object_store lists by
//!   path segments; [`ObjectStoreStorage`] lists the enclosing segment and filters.)
//! - A key must not also be the "directory" of another key (`a/b` and `a/b/c` cannot both
//!   exist), because a local file system cannot hold both.
//!
//! Entry points: [`open_storage`] turns a repository URL into a backend; [`LocalStorage`]
//! and [`ObjectStoreStorage`] are the backends; [`Retry`] and [`Faulty`] the decorators;
//! [`conformance`] the shared test suite every backend passes.

use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

mod aligned;
pub mod conformance;
pub mod crashpoint;
mod faulty;
mod local;
mod object;
mod redact;
mod requests;
mod retry;
mod url;

pub use crate::url::{open_storage, open_storage_unwrapped, StorageOptions};
pub use aligned::{AlignedBuf, DIRECT_IO_ALIGN};
pub use faulty::{wrap_from_env, Faulty, CLOCK_OFFSET_ENV, KILL_AFTER_OPS_ENV, LATENCY_ENV};
pub use local::LocalStorage;
pub use object::{ObjectStoreStorage, DEFAULT_MULTIPART_THRESHOLD, DEFAULT_PART_SIZE};
pub use redact::redact_url;
pub use requests::{global_request_counter, CountingConnector, RequestCounter};
pub use retry::{global_retry_counter, Retry, RetryPolicy};

/// What a storage error means for the caller; drives retries and exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The key does not exist.
    NotFound,
    /// `put_if_absent` found the key already present.
    AlreadyExists,
    /// A transient failure (HTTP 5xx, throttling, timeouts, connection resets); worth retrying.
    Temporary,
    /// Credentials refused or access denied (HTTP 401/403, EACCES). Never retried.
    PermissionDenied,
    /// No space left on the device or quota exhausted.
    StorageFull,
    /// The storage answered with data that does not match what was asked (short read, bad size).
    Corrupt,
    /// Bad configuration (URL, missing bucket, …).
    Config,
    /// Anything else, permanent.
    Other,
}

/// A storage failure. The message never holds credentials.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    /// What kind of failure this is.
    pub kind: ErrorKind,
    /// The key concerned, when there is one.
    pub key: Option<String>,
    /// Human text: what failed, on which object, with credentials redacted.
    pub message: String,
}

impl StorageError {
    /// Builds an error of `kind` about `key`.
    pub fn new(kind: ErrorKind, key: Option<&str>, message: impl Into<String>) -> Self {
        StorageError {
            kind,
            key: key.map(str::to_owned),
            message: message.into(),
        }
    }

    /// Shorthand for a not-found error on `key`.
    pub fn not_found(key: &str) -> Self {
        Self::new(
            ErrorKind::NotFound,
            Some(key),
            format!("object {key} not found"),
        )
    }

    /// True when retrying may help.
    pub fn is_temporary(&self) -> bool {
        self.kind == ErrorKind::Temporary
    }
}

/// Result alias for storage calls.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What a `head` or `list` says of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The full key, relative to the storage root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time, by the store's clock.
    pub last_modified: DateTime<Utc>,
}

/// The operations pgkeep needs from a place that keeps objects.
///
/// Keys are `/`-separated relative paths without leading slash. Implementations must be
/// cheap to share (`Arc<dyn Storage>`) and safe to call from many tasks at once.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// Reads a whole object.
    async fn get(&self, key: &str) -> Result<Bytes>;
    /// Reads `range` (byte offsets, end exclusive) of an object. Returns exactly
    /// `range.end - range.start` bytes or an error.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes>;
    /// Writes an object atomically, replacing any object under the key.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;
    /// Writes an object atomically only if the key is absent; otherwise fails with
    /// [`ErrorKind::AlreadyExists`] and leaves the stored object untouched.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()>;
    /// Lists every object whose key starts with `prefix` (recursively), in no set order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;
    /// Describes one object.
    async fn head(&self, key: &str) -> Result<ObjectMeta>;
    /// Deletes an object. Deleting an absent key is not an error.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Where this storage is, for messages: never holds credentials.
    fn location(&self) -> String;
}

/// A shared handle is a storage too, so decorators can wrap `Arc<dyn Storage>`.
#[async_trait]
impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    async fn get(&self, key: &str) -> Result<Bytes> {
        (**self).get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        (**self).get_range(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        (**self).put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()> {
        (**self).put_if_absent(key, data).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        (**self).list(prefix).await
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        (**self).head(key).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        (**self).delete(key).await
    }
    fn location(&self) -> String {
        (**self).location()
    }
}

/// Checks that `key` is a relative `/`-separated path without empty, `.` or `..` segments,
/// so that no backend can be led outside its root or prefix.
pub(crate) fn validate_key(key: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(StorageError::new(
            ErrorKind::Other,
            Some(key),
            format!("invalid object key {key:?}: {why} (this is a bug in the caller)"),
        ))
    };
    if key.is_empty() {
        return bad("empty key");
    }
    if key.contains('\0') {
        return bad("NUL byte");
    }
    for seg in key.split('/') {
        match seg {
            "" => return bad("empty path segment (leading, trailing or double '/')"),
            "." | ".." => return bad("'.' or '..' segment"),
            s if s.starts_with(".tmp-") => {
                return bad("segments starting with '.tmp-' are reserved")
            }
            _ => {}
        }
    }
    Ok(())
}

/// Checks a list prefix: empty, or a key-like string that may end with `/`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix.strip_suffix('/').unwrap_or(prefix))
}
