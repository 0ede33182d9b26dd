//! pgkeep-core: the commands as library functions joining the repository and PostgreSQL.
//!
//! Each command takes typed options (`<Name>Options`, clap-derivable behind the `clap`
//! feature) and a [`context::Context`] (resolved settings and passphrase sources) and returns
//! a serde-serializable report that also implements `Display` for humans. Failures are
//! [`error::Error`]s whose kind decides the process exit code.

pub mod commands;
pub mod config;
pub mod context;
pub mod error;
pub mod health;
pub mod history;
pub mod manifest;
pub mod progress;
pub mod retention;
pub mod schedule;
pub mod secrets;

pub use context::{Context, Report};
pub use error::{Error, ErrorKind, Result};
