//! One module per command family.

pub mod archive;
pub mod archive_async;
pub mod backup;
pub mod backup_remote;
pub mod check;
pub mod copy;
pub mod drill;
pub mod dump;
pub mod expire;
pub mod export_dump;
pub mod list;
pub mod mirror;
pub mod notify;
pub mod pitr;
pub mod repo;
pub mod restore;
pub mod restore_dump;
pub mod restore_plan;
pub mod standby;
pub mod verify;
