//! pgkeep-pg: PostgreSQL knowledge for pgkeep.
//!
//! LSNs ([`lsn`]), WAL file names and segment headers ([`wal`]), timeline history files
//! ([`timeline`]), the control file ([`control`]), data page checksums ([`checksum`]), what a
//! base backup copies from a data directory ([`datadir`]), connections and the backup API
//! ([`client`]), recovery settings for restores ([`recovery`]) and the pg_dump/pg_restore
//! runners ([`dump`]), and the records of a WAL segment that point-in-time recovery needs
//! ([`walrecords`]), and TLS with libpq's `sslmode` semantics ([`tls`]). This crate knows
//! nothing of chunks, packs or encryption.

pub mod archive;
pub mod checksum;
pub mod client;
pub mod control;
pub mod datadir;
pub mod dump;
pub mod error;
pub mod lsn;
pub mod recovery;
pub mod timeline;
pub mod tls;
pub mod tools;
pub mod wal;
pub mod walrecords;

pub use checksum::{pg_checksum_page, verify_page, PageCheck};
pub use client::{
    conninfo_has_password, BackupLabel, BackupSession, BackupStart, BackupStop, ConnParams,
    PgClient, ServerInfo,
};
pub use control::{ControlFile, DbState};
pub use datadir::{DataDirEntry, DataDirListing, EntryKind};
pub use error::{PgError, Result};
pub use lsn::Lsn;
pub use recovery::{RecoveryConfig, RecoveryMode, RecoveryTarget, TargetAction, TargetTimeline};
pub use timeline::{TimelineHistory, TimelineHistoryEntry};
pub use tls::{SslMode, SslParams};
pub use wal::{WalFileName, WalPageHeader, WalSegmentName};
