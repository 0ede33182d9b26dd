//! The pgkeep repository: where backups, dumps and WAL live.
//!
//! A repository stores byte streams as content-defined chunks ("blobs", FastCDC, ~1 MiB),
//! deduplicated by id, compressed with zstd, sealed with AES-256-GCM when encrypted, packed
//! into packs of ~16 MiB and indexed; manifests (typed by the caller, stored as JSON) are the
//! commit points. It knows nothing of PostgreSQL. See docs/design.md for the format and the
//! invariants every part upholds.

pub mod check;
mod chunker;
pub mod cleanup;
pub mod copy;
pub mod crypto;
pub mod error;
pub mod format;
pub mod gc;
pub mod id;
pub mod index;
pub mod lock;
pub mod pack;
pub mod reader;
pub mod repair;
pub mod repository;
pub mod writer;

pub use check::{CheckOptions, CheckProblem, CheckReport};
pub use copy::{BlobTranslation, CopyStats};
pub use error::{ErrorKind, RepoError, Result};
pub use format::{BlobRef, ChunkerParams, KdfParams, RepoConfig, StreamRef};
pub use gc::{PruneOptions, PruneReport};
pub use id::{BlobId, Id, PackId};
pub use lock::{clock_skew, LockInfo, LockKind, RepoLock, CLOCK_SKEW_WARN};
pub use pgkeep_storage as storage;
pub use reader::{PositionalSink, StreamTarget, StreamsError};
pub use repair::RepairReport;
pub use repository::{InitOptions, KeyInfo, ManifestKey, RepoInfo, Repository};
pub use writer::{BlobWriter, WriteStats, WriterOptions};
