//! One module per command family.

pub mod backup;
pub mod list;
pub mod repo;
pub mod restore;
