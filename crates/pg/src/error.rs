//! The error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong in pgkeep-pg. Messages name the file, connection or value
/// concerned and end with a hint where one helps. They never contain a password: connection
/// errors are described by host/port/user/database only.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// A text value (LSN, WAL file name, history line, setting) could not be parsed.
    #[error("invalid {what} {value:?}: {reason}")]
    Parse {
        what: &'static str,
        value: String,
        reason: String,
    },

    /// An I/O error on a file or directory.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A binary file (pg_control, WAL segment) has an unexpected layout or content.
    #[error("{} is not a valid {what}: {reason}", path.display())]
    BadFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },

    /// pg_control's stored CRC does not match its content.
    #[error("{}: CRC mismatch (stored {stored:08x}, computed {computed:08x}); the control file is corrupt or was read while being written. HINT: if the server is running, retry; otherwise the cluster needs pg_resetwal or a restore", path.display())]
    ControlCrc {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },

    /// A format or server version this crate does not handle.
    #[error("unsupported {what}: {detail}")]
    Unsupported { what: &'static str, detail: String },

    /// A cluster, server or WAL of a PostgreSQL release pgkeep does not handle: `subject` is
    /// the data directory, file or server, `found` the release seen (and the format number
    /// that told it).
    #[error("{subject} is {found}; pgkeep supports PostgreSQL 13 to 18. HINT: nothing was read or written; use a cluster of a supported release, or this release's own pg_basebackup / pg_dump")]
    UnsupportedVersion { subject: String, found: String },

    /// Connecting to the server failed.
    #[error("could not connect to PostgreSQL at {target}: {reason}. HINT: check --pg / PGHOST, PGPORT, PGUSER, PGDATABASE and that the server is running")]
    Connect { target: String, reason: String },

    /// A TLS failure while connecting: the server offers no TLS where it is required, its
    /// certificate is not trusted or does not name the host, or the handshake failed.
    #[error("could not connect to PostgreSQL at {target}: {reason}. HINT: {hint}")]
    Tls {
        target: String,
        reason: String,
        hint: String,
    },

    /// The TLS settings are unusable: a bad value, a missing or unreadable certificate or key
    /// file, an unsupported setting. A configuration mistake (exit 2 in the CLI).
    #[error("{message}. HINT: {hint}")]
    SslConfig { message: String, hint: String },

    /// A query failed on an established connection.
    #[error("{what} failed on {target}: {reason}")]
    Query {
        what: &'static str,
        target: String,
        reason: String,
    },

    /// The connection string itself is unusable (syntax, or a password in it).
    #[error("invalid connection string: {0}")]
    Conninfo(String),

    /// A PostgreSQL client program (pg_dump, pg_restore, ...) failed.
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: String,
        status: String,
        stderr: String,
    },

    /// No installed client tool can serve the server (or read the archive) at hand.
    #[error("no {program} that can serve {purpose}: it needs PostgreSQL {min_major} or newer; found: {found}. HINT: install the PostgreSQL {min_major} (or newer) client tools (e.g. postgresql-client-{min_major}), or set PGKEEP_PG_BIN to their bin directory")]
    NoClientTools {
        program: String,
        purpose: String,
        min_major: u32,
        found: String,
    },

    /// WAL needed by a backup was lost before it could be copied.
    #[error("{0}")]
    WalLost(String),
}

/// Result alias for this crate.
pub type Result<T, E = PgError> = std::result::Result<T, E>;

impl PgError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        PgError::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parse(
        what: &'static str,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        PgError::Parse {
            what,
            value: value.into(),
            reason: reason.into(),
        }
    }
}
