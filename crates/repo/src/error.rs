//! Errors of the repository layer.

use pgkeep_storage::StorageError;

/// What a repository error means, so the caller can choose an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No repository at this location, or its `config` is unreadable.
    NotARepository,
    /// `init` found a repository already there.
    AlreadyExists,
    /// No key of the repository opens with the passphrase given.
    WrongPassphrase,
    /// The repository is encrypted and no passphrase was given.
    PassphraseRequired,
    /// Another process holds a conflicting lock, or this process lost its own.
    Locked,
    /// Data failed authentication or hashing, or a referenced object is missing.
    Integrity,
    /// A named thing (manifest, key, blob) does not exist.
    NotFound,
    /// The storage failed (see the source error's kind).
    Storage,
    /// A request that cannot be honoured (bad argument, unsupported format version, ...).
    Invalid,
}

/// A repository failure. `Display` is the message for users, with a HINT where one helps.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// See [`ErrorKind::NotARepository`].
    #[error("no pgkeep repository at {location}: {reason}\nHINT: create one with `pgkeep repo init`, or check --repo / PGKEEP_REPO")]
    NotARepository { location: String, reason: String },
    /// See [`ErrorKind::AlreadyExists`].
    #[error("a pgkeep repository already exists at {location}\nHINT: use it as it is, or choose another location")]
    AlreadyExists { location: String },
    /// See [`ErrorKind::WrongPassphrase`].
    #[error("wrong passphrase or no matching key for the repository at {location}\nHINT: check PGKEEP_PASSPHRASE / PGKEEP_PASSPHRASE_FILE")]
    WrongPassphrase { location: String },
    /// See [`ErrorKind::PassphraseRequired`].
    #[error("the repository at {location} is encrypted and no passphrase was given\nHINT: set PGKEEP_PASSPHRASE or PGKEEP_PASSPHRASE_FILE, or run on a terminal to be asked")]
    PassphraseRequired { location: String },
    /// See [`ErrorKind::Locked`].
    #[error("repository is locked by {holder}\nHINT: wait for it to finish; if that process is gone, `pgkeep repo unlock` removes stale locks")]
    Locked { holder: String },
    /// A lock held by this process could not be refreshed in time (kind
    /// [`ErrorKind::Locked`]): the run must stop before other processes may take the lock for
    /// stale.
    #[error("the repository lock {lock} could not be refreshed for {secs} s; stopping before other processes may take it for stale and remove data this run depends on\nHINT: check the connection to the store (see the warnings before this error), then run the command again")]
    LockLost { lock: String, secs: u64 },
    /// See [`ErrorKind::Integrity`].
    #[error("integrity error in {object}: {reason}\nHINT: run `pgkeep repo check --read-data` to see what is damaged")]
    Integrity { object: String, reason: String },
    /// See [`ErrorKind::NotFound`].
    #[error("{what} not found")]
    NotFound { what: String },
    /// See [`ErrorKind::Invalid`].
    #[error("{0}")]
    Invalid(String),
    /// See [`ErrorKind::Storage`].
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl RepoError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RepoError::NotARepository { .. } => ErrorKind::NotARepository,
            RepoError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            RepoError::WrongPassphrase { .. } => ErrorKind::WrongPassphrase,
            RepoError::PassphraseRequired { .. } => ErrorKind::PassphraseRequired,
            RepoError::Locked { .. } | RepoError::LockLost { .. } => ErrorKind::Locked,
            RepoError::Integrity { .. } => ErrorKind::Integrity,
            RepoError::NotFound { .. } => ErrorKind::NotFound,
            RepoError::Invalid(_) => ErrorKind::Invalid,
            RepoError::Storage(e) if e.kind == pgkeep_storage::ErrorKind::Corrupt => {
                ErrorKind::Integrity
            }
            RepoError::Storage(_) => ErrorKind::Storage,
        }
    }

    pub(crate) fn integrity(object: impl Into<String>, reason: impl Into<String>) -> Self {
        RepoError::Integrity {
            object: object.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias for repository calls.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;
