//! `global/pg_control` (PostgreSQL's `ControlFileData`).
//!
//! The layout handled is the one of pg_control version 1300 (PostgreSQL 13 to 16) on a 64-bit
//! little-endian machine; the test suite cross-checks every field against `pg_controldata` on a
//! real PostgreSQL 15 cluster. The CRC32C over the bytes before the `crc` field is verified.

use crate::error::{PgError, Result};
use crate::lsn::Lsn;
use std::path::Path;

/// pg_control version of PostgreSQL 13 to 16.
pub const PG_CONTROL_VERSION_1300: u32 = 1300;

/// Byte offsets in `ControlFileData` for version 1300 (natural alignment, 8-byte `int64`).
mod off {
    pub const SYSTEM_IDENTIFIER: usize = 0;
    pub const PG_CONTROL_VERSION: usize = 8;
    pub const CATALOG_VERSION: usize = 12;
    pub const STATE: usize = 16;
    pub const TIME: usize = 24;
    pub const CHECKPOINT: usize = 32;
    /// `CheckPoint checkPointCopy` starts here: redo (8), ThisTimeLineID (4), PrevTimeLineID (4).
    pub const CKP_REDO: usize = 40;
    pub const CKP_TLI: usize = 48;
    pub const CKP_PREV_TLI: usize = 52;
    pub const CKP_FULL_PAGE_WRITES: usize = 56;
    pub const CKP_NEXT_XID: usize = 64;
    pub const CKP_NEXT_OID: usize = 72;
    pub const CKP_TIME: usize = 104;
    pub const MIN_RECOVERY_POINT: usize = 136;
    pub const MIN_RECOVERY_POINT_TLI: usize = 144;
    pub const BACKUP_START_POINT: usize = 152;
    pub const BACKUP_END_POINT: usize = 160;
    pub const BACKUP_END_REQUIRED: usize = 168;
    pub const WAL_LEVEL: usize = 172;
    pub const WAL_LOG_HINTS: usize = 176;
    pub const MAX_CONNECTIONS: usize = 180;
    pub const BLCKSZ: usize = 216;
    pub const RELSEG_SIZE: usize = 220;
    pub const XLOG_BLCKSZ: usize = 224;
    pub const XLOG_SEG_SIZE: usize = 228;
    pub const DATA_CHECKSUM_VERSION: usize = 252;
    pub const CRC: usize = 288;
}

/// `DBState`: what the server was doing when it last wrote pg_control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbState {
    Startup,
    ShutDown,
    ShutDownInRecovery,
    ShuttingDown,
    InCrashRecovery,
    InArchiveRecovery,
    InProduction,
    /// A value this crate does not know.
    Unknown(u32),
}

impl DbState {
    fn from_raw(v: u32) -> Self {
        match v {
            0 => DbState::Startup,
            1 => DbState::ShutDown,
            2 => DbState::ShutDownInRecovery,
            3 => DbState::ShuttingDown,
            4 => DbState::InCrashRecovery,
            5 => DbState::InArchiveRecovery,
            6 => DbState::InProduction,
            other => DbState::Unknown(other),
        }
    }

    /// The wording `pg_controldata` prints for "Database cluster state".
    pub fn as_controldata_str(&self) -> &'static str {
        match self {
            DbState::Startup => "starting up",
            DbState::ShutDown => "shut down",
            DbState::ShutDownInRecovery => "shut down in recovery",
            DbState::ShuttingDown => "shutting down",
            DbState::InCrashRecovery => "in crash recovery",
            DbState::InArchiveRecovery => "in archive recovery",
            DbState::InProduction => "in production",
            DbState::Unknown(_) => "unrecognized status code",
        }
    }

    /// Whether the cluster was shut down cleanly (no recovery needed at the next start).
    pub fn is_clean_shutdown(&self) -> bool {
        matches!(self, DbState::ShutDown | DbState::ShutDownInRecovery)
    }
}

/// The fields of pg_control that pgkeep uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlFile {
    pub system_identifier: u64,
    pub pg_control_version: u32,
    pub catalog_version: u32,
    pub state: DbState,
    /// Last modification time of pg_control (seconds since the epoch).
    pub time: i64,
    /// Location of the latest checkpoint record.
    pub checkpoint: Lsn,
    /// REDO location of the latest checkpoint.
    pub checkpoint_redo: Lsn,
    /// Timeline of the latest checkpoint.
    pub checkpoint_timeline: u32,
    pub checkpoint_prev_timeline: u32,
    pub checkpoint_full_page_writes: bool,
    /// NextXID of the latest checkpoint (epoch in the high 32 bits).
    pub checkpoint_next_xid: u64,
    pub checkpoint_next_oid: u32,
    /// Time of the latest checkpoint (seconds since the epoch).
    pub checkpoint_time: i64,
    pub min_recovery_point: Lsn,
    pub min_recovery_point_timeline: u32,
    pub backup_start_point: Lsn,
    pub backup_end_point: Lsn,
    pub backup_end_required: bool,
    /// wal_level as a number: 0 minimal, 1 replica, 2 logical.
    pub wal_level: i32,
    pub wal_log_hints: bool,
    pub max_connections: i32,
    /// Data page size (BLCKSZ).
    pub block_size: u32,
    /// Blocks per relation segment file (RELSEG_SIZE).
    pub relseg_size: u32,
    pub wal_block_size: u32,
    pub wal_segment_size: u32,
    /// 0 when data checksums are off, else the checksum version (1).
    pub data_checksum_version: u32,
}

impl ControlFile {
    /// Read and verify `<pgdata>/global/pg_control`.
    pub fn read(pgdata: &Path) -> Result<Self> {
        let path = pgdata.join("global").join("pg_control");
        let bytes = std::fs::read(&path).map_err(|e| PgError::io("reading", &path, e))?;
        Self::parse(&bytes, &path)
    }

    /// Parse pg_control's bytes; `path` names the file in errors. Checks the version and CRC.
    pub fn parse(b: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| PgError::BadFile {
            what: "pg_control file",
            path: path.to_path_buf(),
            reason,
        };
        if b.len() < off::CRC + 4 {
            return Err(bad(format!("only {} bytes", b.len())));
        }
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        let i32_at = |o: usize| i32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap());
        let version = u32_at(off::PG_CONTROL_VERSION);
        if version != PG_CONTROL_VERSION_1300 {
            // A byte-swapped version means another architecture's file.
            if version.swap_bytes() == PG_CONTROL_VERSION_1300 {
                return Err(bad("written on a machine of the other byte order".into()));
            }
            return Err(PgError::Unsupported {
                what: "pg_control version",
                detail: format!(
                    "{} has version {version}; pgkeep reads version {PG_CONTROL_VERSION_1300} (PostgreSQL 13 to 16)",
                    path.display()
                ),
            });
        }
        let stored = u32_at(off::CRC);
        let computed = crc32c::crc32c(&b[..off::CRC]);
        if stored != computed {
            return Err(PgError::ControlCrc {
                path: path.to_path_buf(),
                stored,
                computed,
            });
        }
        Ok(ControlFile {
            system_identifier: u64_at(off::SYSTEM_IDENTIFIER),
            pg_control_version: version,
            catalog_version: u32_at(off::CATALOG_VERSION),
            state: DbState::from_raw(u32_at(off::STATE)),
            time: u64_at(off::TIME) as i64,
            checkpoint: Lsn(u64_at(off::CHECKPOINT)),
            checkpoint_redo: Lsn(u64_at(off::CKP_REDO)),
            checkpoint_timeline: u32_at(off::CKP_TLI),
            checkpoint_prev_timeline: u32_at(off::CKP_PREV_TLI),
            checkpoint_full_page_writes: b[off::CKP_FULL_PAGE_WRITES] != 0,
            checkpoint_next_xid: u64_at(off::CKP_NEXT_XID),
            checkpoint_next_oid: u32_at(off::CKP_NEXT_OID),
            checkpoint_time: u64_at(off::CKP_TIME) as i64,
            min_recovery_point: Lsn(u64_at(off::MIN_RECOVERY_POINT)),
            min_recovery_point_timeline: u32_at(off::MIN_RECOVERY_POINT_TLI),
            backup_start_point: Lsn(u64_at(off::BACKUP_START_POINT)),
            backup_end_point: Lsn(u64_at(off::BACKUP_END_POINT)),
            backup_end_required: b[off::BACKUP_END_REQUIRED] != 0,
            wal_level: i32_at(off::WAL_LEVEL),
            wal_log_hints: b[off::WAL_LOG_HINTS] != 0,
            max_connections: i32_at(off::MAX_CONNECTIONS),
            block_size: u32_at(off::BLCKSZ),
            relseg_size: u32_at(off::RELSEG_SIZE),
            wal_block_size: u32_at(off::XLOG_BLCKSZ),
            wal_segment_size: u32_at(off::XLOG_SEG_SIZE),
            data_checksum_version: u32_at(off::DATA_CHECKSUM_VERSION),
        })
    }

    /// Whether data page checksums are enabled.
    pub fn data_checksums(&self) -> bool {
        self.data_checksum_version != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..8].copy_from_slice(&7_194_000_000_000_000_123u64.to_ne_bytes());
        b[8..12].copy_from_slice(&1300u32.to_ne_bytes());
        b[12..16].copy_from_slice(&202209061u32.to_ne_bytes());
        b[16..20].copy_from_slice(&6u32.to_ne_bytes());
        b[32..40].copy_from_slice(&0x0100_0028u64.to_ne_bytes());
        b[48..52].copy_from_slice(&1u32.to_ne_bytes());
        b[216..220].copy_from_slice(&8192u32.to_ne_bytes());
        b[228..232].copy_from_slice(&(16u32 << 20).to_ne_bytes());
        b[252..256].copy_from_slice(&1u32.to_ne_bytes());
        let crc = crc32c::crc32c(&b[..288]);
        b[288..292].copy_from_slice(&crc.to_ne_bytes());
        b
    }

    #[test]
    fn parses_fields_and_checks_crc() {
        let b = sample();
        let c = ControlFile::parse(&b, Path::new("pg_control")).unwrap();
        assert_eq!(c.system_identifier, 7_194_000_000_000_000_123);
        assert_eq!(c.state, DbState::InProduction);
        assert_eq!(c.checkpoint.to_string(), "0/1000028");
        assert_eq!(c.checkpoint_timeline, 1);
        assert_eq!(c.block_size, 8192);
        assert_eq!(c.wal_segment_size, 16 << 20);
        assert!(c.data_checksums());

        let mut flipped = b.clone();
        flipped[100] ^= 1;
        let e = ControlFile::parse(&flipped, Path::new("pg_control")).unwrap_err();
        assert!(matches!(e, PgError::ControlCrc { .. }), "{e}");
        assert!(e.to_string().contains("pg_control"));

        // Bytes after the CRC (padding up to 8 KiB) are not covered.
        let mut tail = b.clone();
        tail[5000] = 9;
        assert!(ControlFile::parse(&tail, Path::new("pg_control")).is_ok());
    }

    #[test]
    fn rejects_other_versions_and_short_files() {
        let mut b = sample();
        b[8..12].copy_from_slice(&1700u32.to_ne_bytes());
        assert!(matches!(
            ControlFile::parse(&b, Path::new("p")).unwrap_err(),
            PgError::Unsupported { .. }
        ));
        assert!(ControlFile::parse(&b[..100], Path::new("p")).is_err());
    }
}
