//! The one registry of error kinds and process exit codes.
//!
//! Every failure pgkeep reports ends as an [`ErrorKind`], and every kind has exactly one exit
//! code (the table is part of the command-line contract, see ARCHITECTURE.md):
//!
//! | code | kind                                   |
//! |------|----------------------------------------|
//! | 0    | ok                                     |
//! | 1    | [`ErrorKind::Failure`]                 |
//! | 2    | [`ErrorKind::Usage`] (usage or config) |
//! | 3    | [`ErrorKind::Warnings`] (done, warned) |
//! | 10   | [`ErrorKind::NoRepository`]            |
//! | 11   | [`ErrorKind::Locked`]                  |
//! | 12   | [`ErrorKind::WrongKey`]                |
//! | 13   | [`ErrorKind::Integrity`]               |
//! | 14   | [`ErrorKind::WalConflict`]             |
//! | 15   | [`ErrorKind::ClusterMismatch`]         |
//! | 16   | [`ErrorKind::TargetUnreachable`]       |
//! | 130  | [`ErrorKind::Interrupted`]             |
//!
//! Messages follow one shape: the first line says what failed and on which object or file;
//! further lines starting with `HINT: ` say what to do. They never hold secrets.

use pgkeep_repo::{ErrorKind as RepoErrorKind, RepoError};
use pgkeep_storage::{ErrorKind as StorageErrorKind, StorageError};
use serde::Serialize;

/// Exit code of a successful run.
pub const EXIT_OK: i32 = 0;

/// Exit codes of `pgkeep check --nagios`, the Nagios plugin convention, which replaces the
/// registry above for that one mode (monitoring systems read them, not people).
pub mod nagios {
    /// Every item is fine.
    pub const OK: i32 = 0;
    /// An item warns.
    pub const WARNING: i32 = 1;
    /// An item is critical, or the archiving check failed.
    pub const CRITICAL: i32 = 2;
    /// The check itself could not run (no repository, wrong passphrase, bad config).
    pub const UNKNOWN: i32 = 3;
}

/// What went wrong, at the granularity of exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Anything without a more precise kind (exit 1).
    Failure,
    /// A bad command line, configuration file or environment variable (exit 2).
    Usage,
    /// The command finished but reported warnings (exit 3).
    Warnings,
    /// No repository where one was expected, or it cannot be read as one (exit 10).
    NoRepository,
    /// Another process holds a conflicting repository lock (exit 11).
    Locked,
    /// Wrong or missing passphrase / key (exit 12).
    WrongKey,
    /// Data failed verification or a referenced object is missing (exit 13).
    Integrity,
    /// A WAL segment already archived with different content (exit 14).
    WalConflict,
    /// The PostgreSQL cluster is not the one the repository knows under that name (exit 15).
    ClusterMismatch,
    /// The recovery target cannot be reached with the backups and WAL available (exit 16).
    TargetUnreachable,
    /// Stopped by SIGINT / SIGTERM (exit 130).
    Interrupted,
}

impl ErrorKind {
    /// Every kind, in exit-code order (for tests and documentation).
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Failure,
        ErrorKind::Usage,
        ErrorKind::Warnings,
        ErrorKind::NoRepository,
        ErrorKind::Locked,
        ErrorKind::WrongKey,
        ErrorKind::Integrity,
        ErrorKind::WalConflict,
        ErrorKind::ClusterMismatch,
        ErrorKind::TargetUnreachable,
        ErrorKind::Interrupted,
    ];

    /// The process exit code of this kind. The mapping is a public contract: never change it.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Failure => 1,
            ErrorKind::Usage => 2,
            ErrorKind::Warnings => 3,
            ErrorKind::NoRepository => 10,
            ErrorKind::Locked => 11,
            ErrorKind::WrongKey => 12,
            ErrorKind::Integrity => 13,
            ErrorKind::WalConflict => 14,
            ErrorKind::ClusterMismatch => 15,
            ErrorKind::TargetUnreachable => 16,
            ErrorKind::Interrupted => 130,
        }
    }

    /// The stable snake_case name used in `--json` error documents.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Failure => "failure",
            ErrorKind::Usage => "usage",
            ErrorKind::Warnings => "warnings",
            ErrorKind::NoRepository => "no_repository",
            ErrorKind::Locked => "locked",
            ErrorKind::WrongKey => "wrong_key",
            ErrorKind::Integrity => "integrity",
            ErrorKind::WalConflict => "wal_conflict",
            ErrorKind::ClusterMismatch => "cluster_mismatch",
            ErrorKind::TargetUnreachable => "target_unreachable",
            ErrorKind::Interrupted => "interrupted",
        }
    }
}

impl From<RepoErrorKind> for ErrorKind {
    fn from(kind: RepoErrorKind) -> Self {
        match kind {
            RepoErrorKind::NotARepository => ErrorKind::NoRepository,
            // `repo init` over an existing repository: the command line is fine, the world is
            // not as the user thought. A plain failure, documented in docs/config.md.
            RepoErrorKind::AlreadyExists => ErrorKind::Failure,
            RepoErrorKind::WrongPassphrase | RepoErrorKind::PassphraseRequired => {
                ErrorKind::WrongKey
            }
            RepoErrorKind::Locked => ErrorKind::Locked,
            RepoErrorKind::Integrity => ErrorKind::Integrity,
            RepoErrorKind::NotFound => ErrorKind::Failure,
            RepoErrorKind::Storage => ErrorKind::Failure,
            RepoErrorKind::Invalid => ErrorKind::Failure,
        }
    }
}

impl From<StorageErrorKind> for ErrorKind {
    fn from(kind: StorageErrorKind) -> Self {
        match kind {
            StorageErrorKind::Corrupt => ErrorKind::Integrity,
            StorageErrorKind::Config => ErrorKind::Usage,
            StorageErrorKind::NotFound
            | StorageErrorKind::AlreadyExists
            | StorageErrorKind::Temporary
            | StorageErrorKind::PermissionDenied
            | StorageErrorKind::StorageFull
            | StorageErrorKind::Other => ErrorKind::Failure,
        }
    }
}

/// Kind of a repository error; a storage error inside it keeps its own, finer mapping
/// (a bad storage URL is a usage error even when it surfaces through the repository).
fn repo_error_kind(e: &RepoError) -> ErrorKind {
    match e {
        RepoError::Storage(s) => s.kind.into(),
        other => other.kind().into(),
    }
}

/// A pgkeep failure as the commands report it. `Display` is the user message: one line of
/// what failed, then `HINT: ` lines. Never holds secrets.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad command line, environment variable or setting (exit 2).
    #[error("{message}{}", hint_lines(hint))]
    Usage {
        /// What is wrong.
        message: String,
        /// What to do about it.
        hint: Option<String>,
    },
    /// A configuration file problem at `file:line:column` (exit 2).
    #[error("{file}:{line}:{column}: {message}{}", hint_lines(hint))]
    Config {
        /// The configuration file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the key.
        message: String,
        /// What to do about it.
        hint: Option<String>,
    },
    /// A command that this build parses but does not run yet (exit 1).
    #[error("`pgkeep {command}` is not implemented yet in this build")]
    NotImplemented {
        /// The command as typed, e.g. `backup`.
        command: String,
    },
    /// Any failure with an explicit kind, a message and an optional hint.
    #[error("{message}{}", hint_lines(hint))]
    Other {
        /// The kind, hence the exit code.
        kind: ErrorKind,
        /// What failed, on which object.
        message: String,
        /// What to do about it.
        hint: Option<String>,
    },
    /// A local file operation failed (exit 1).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, on which path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A repository failure, mapped through its [`pgkeep_repo::ErrorKind`].
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// A storage failure, mapped through its [`pgkeep_storage::ErrorKind`].
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn hint_lines(hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!("\nHINT: {h}"),
        None => String::new(),
    }
}

impl Error {
    /// A usage error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Error::Usage {
            message: message.into(),
            hint: None,
        }
    }

    /// A usage error with a hint (exit 2).
    pub fn usage_hint(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Usage {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// An error of an explicit kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error::Other {
            kind,
            message: message.into(),
            hint: None,
        }
    }

    /// An error of an explicit kind, with a hint.
    pub fn with_hint(kind: ErrorKind, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Error::Other {
            kind,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// A local I/O failure; `context` names the operation and the path.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Usage { .. } | Error::Config { .. } => ErrorKind::Usage,
            Error::NotImplemented { .. } => ErrorKind::Failure,
            Error::Other { kind, .. } => *kind,
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted => {
                ErrorKind::Interrupted
            }
            Error::Io { .. } => ErrorKind::Failure,
            Error::Repo(e) => repo_error_kind(e),
            Error::Storage(e) => e.kind.into(),
        }
    }

    /// The process exit code of this error.
    pub fn exit_code(&self) -> i32 {
        self.kind().exit_code()
    }
}

/// Result alias for core functions.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kind of an `anyhow::Error`: the first pgkeep error found walking its chain from the
/// outermost context inwards, else [`ErrorKind::Failure`]. Context strings added with
/// `anyhow::Context` do not change the kind.
pub fn classify(err: &anyhow::Error) -> ErrorKind {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<Error>() {
            return e.kind();
        }
        if let Some(e) = cause.downcast_ref::<RepoError>() {
            return repo_error_kind(e);
        }
        if let Some(e) = cause.downcast_ref::<StorageError>() {
            return e.kind.into();
        }
        #[cfg(feature = "clap")]
        if cause.downcast_ref::<clap::Error>().is_some() {
            return ErrorKind::Usage;
        }
    }
    ErrorKind::Failure
}

/// A failure as shown to users: the message lines and the hints, separated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorReport {
    /// Stable kind name (see [`ErrorKind::name`]).
    pub kind: &'static str,
    /// The exit code.
    pub exit_code: i32,
    /// The message: contexts then the cause, joined with `: `; secrets redacted.
    pub message: String,
    /// The `HINT: ` lines, without the prefix.
    pub hints: Vec<String>,
}

impl ErrorReport {
    /// Builds the report of `err`: kind by [`classify`], message from the whole chain (each
    /// level once: a transparent wrapper repeats its source's text, which is skipped), hints
    /// gathered from every level, everything passed through [`crate::secrets::redact`].
    pub fn from_anyhow(err: &anyhow::Error) -> Self {
        let kind = classify(err);
        let mut parts: Vec<String> = Vec::new();
        let mut hints: Vec<String> = Vec::new();
        let mut last_text: Option<String> = None;
        for cause in err.chain() {
            let text = cause.to_string();
            // thiserror's `transparent` and `{source}`-style messages repeat the inner text.
            if let Some(prev) = &last_text {
                if prev.contains(&text) {
                    continue;
                }
            }
            last_text = Some(text.clone());
            for line in text.lines() {
                let line = line.trim_end();
                // Some layers put the hint on the same line: "what failed. HINT: what to do".
                let (line, inline_hint) = match line.find(" HINT: ") {
                    Some(i) => (line[..i].trim_end(), Some(&line[i + 7..])),
                    None => (line, None),
                };
                if let Some(h) = inline_hint {
                    let h = crate::secrets::redact(h);
                    if !hints.contains(&h) {
                        hints.push(h);
                    }
                }
                if let Some(h) = line.strip_prefix("HINT: ") {
                    let h = crate::secrets::redact(h);
                    if !hints.contains(&h) {
                        hints.push(h);
                    }
                } else if !line.is_empty() {
                    parts.push(crate::secrets::redact(line));
                }
            }
        }
        ErrorReport {
            kind: kind.name(),
            exit_code: kind.exit_code(),
            message: parts.join(": "),
            hints,
        }
    }

    /// The text for stderr: `pgkeep: error: <message>` then one `HINT: ` line per hint.
    pub fn render(&self) -> String {
        let mut s = format!("pgkeep: error: {}\n", self.message);
        for h in &self.hints {
            s.push_str("HINT: ");
            s.push_str(h);
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_contract() {
        let table: Vec<(ErrorKind, i32, &str)> = vec![
            (ErrorKind::Failure, 1, "failure"),
            (ErrorKind::Usage, 2, "usage"),
            (ErrorKind::Warnings, 3, "warnings"),
            (ErrorKind::NoRepository, 10, "no_repository"),
            (ErrorKind::Locked, 11, "locked"),
            (ErrorKind::WrongKey, 12, "wrong_key"),
            (ErrorKind::Integrity, 13, "integrity"),
            (ErrorKind::WalConflict, 14, "wal_conflict"),
            (ErrorKind::ClusterMismatch, 15, "cluster_mismatch"),
            (ErrorKind::TargetUnreachable, 16, "target_unreachable"),
            (ErrorKind::Interrupted, 130, "interrupted"),
        ];
        assert_eq!(table.len(), ErrorKind::ALL.len());
        for (kind, code, name) in table {
            assert_eq!(kind.exit_code(), code, "{kind:?}");
            assert_eq!(kind.name(), name);
            assert_eq!(serde_json::to_value(kind).unwrap(), serde_json::json!(name));
        }
    }

    #[test]
    fn repo_kinds_map_to_exit_codes() {
        let table = [
            (RepoErrorKind::NotARepository, 10),
            (RepoErrorKind::AlreadyExists, 1),
            (RepoErrorKind::WrongPassphrase, 12),
            (RepoErrorKind::PassphraseRequired, 12),
            (RepoErrorKind::Locked, 11),
            (RepoErrorKind::Integrity, 13),
            (RepoErrorKind::NotFound, 1),
            (RepoErrorKind::Storage, 1),
            (RepoErrorKind::Invalid, 1),
        ];
        for (kind, code) in table {
            assert_eq!(ErrorKind::from(kind).exit_code(), code, "{kind:?}");
        }
    }

    #[test]
    fn storage_kinds_map_to_exit_codes() {
        let table = [
            (StorageErrorKind::NotFound, 1),
            (StorageErrorKind::AlreadyExists, 1),
            (StorageErrorKind::Temporary, 1),
            (StorageErrorKind::PermissionDenied, 1),
            (StorageErrorKind::StorageFull, 1),
            (StorageErrorKind::Corrupt, 13),
            (StorageErrorKind::Config, 2),
            (StorageErrorKind::Other, 1),
        ];
        for (kind, code) in table {
            let e = Error::from(StorageError::new(kind, Some("packs/ab/x"), "boom"));
            assert_eq!(e.exit_code(), code, "{kind:?}");
        }
    }

    #[test]
    fn repo_errors_convert_with_their_text() {
        let e = Error::from(RepoError::WrongPassphrase {
            location: "/srv/repo".into(),
        });
        assert_eq!(e.exit_code(), 12);
        assert_eq!(
            e.to_string(),
            "wrong passphrase or no matching key for the repository at /srv/repo\n\
             HINT: check PGKEEP_PASSPHRASE / PGKEEP_PASSPHRASE_FILE"
        );
        let e = Error::from(RepoError::Locked {
            holder: "host1 pid 42".into(),
        });
        assert_eq!(e.exit_code(), 11);
        // A storage error wrapped by the repository keeps the storage mapping.
        let e = Error::from(RepoError::Storage(StorageError::new(
            StorageErrorKind::Config,
            None,
            "bucket missing",
        )));
        assert_eq!(e.exit_code(), 2);
        let e = Error::from(RepoError::Storage(StorageError::new(
            StorageErrorKind::Corrupt,
            Some("packs/ab/cd"),
            "short read",
        )));
        assert_eq!(e.exit_code(), 13);
    }

    #[test]
    fn own_errors_have_exact_texts_and_codes() {
        let table: Vec<(Error, &str, i32)> = vec![
            (Error::usage("bad flag"), "bad flag", 2),
            (
                Error::usage_hint("bad flag", "use --x"),
                "bad flag\nHINT: use --x",
                2,
            ),
            (
                Error::Config {
                    file: "/etc/pgkeep/pgkeep.toml".into(),
                    line: 3,
                    column: 1,
                    message: "unknown key `x`".into(),
                    hint: None,
                },
                "/etc/pgkeep/pgkeep.toml:3:1: unknown key `x`",
                2,
            ),
            (
                Error::NotImplemented {
                    command: "backup".into(),
                },
                "`pgkeep backup` is not implemented yet in this build",
                1,
            ),
            (
                Error::with_hint(ErrorKind::WalConflict, "segment differs", "investigate"),
                "segment differs\nHINT: investigate",
                14,
            ),
            (
                Error::io(
                    "reading /x",
                    std::io::Error::new(std::io::ErrorKind::NotFound, "No such file"),
                ),
                "reading /x: No such file",
                1,
            ),
            (
                Error::io(
                    "reading /x",
                    std::io::Error::from(std::io::ErrorKind::Interrupted),
                ),
                "reading /x: operation interrupted",
                130,
            ),
        ];
        for (e, text, code) in table {
            assert_eq!(e.to_string(), text);
            assert_eq!(e.exit_code(), code, "{text}");
        }
    }

    #[test]
    fn classify_walks_the_anyhow_chain() {
        let plain = anyhow::anyhow!("something");
        assert_eq!(classify(&plain), ErrorKind::Failure);

        let e = anyhow::Error::from(RepoError::Integrity {
            object: "packs/ab/cd".into(),
            reason: "tag mismatch".into(),
        })
        .context("restoring base/1/1234");
        assert_eq!(classify(&e), ErrorKind::Integrity);

        let e = anyhow::Error::from(Error::new(ErrorKind::ClusterMismatch, "system id differs"))
            .context("archive-push");
        assert_eq!(classify(&e), ErrorKind::ClusterMismatch);

        let e = anyhow::Error::from(StorageError::new(StorageErrorKind::Config, None, "bad"))
            .context("opening");
        assert_eq!(classify(&e), ErrorKind::Usage);
    }

    #[test]
    fn error_report_joins_contexts_and_collects_hints() {
        let e = anyhow::Error::from(Error::from(RepoError::WrongPassphrase {
            location: "s3://bucket/prefix".into(),
        }))
        .context("opening the repository");
        let r = ErrorReport::from_anyhow(&e);
        assert_eq!(r.kind, "wrong_key");
        assert_eq!(r.exit_code, 12);
        assert_eq!(
            r.message,
            "opening the repository: wrong passphrase or no matching key for the repository at s3://bucket/prefix"
        );
        assert_eq!(
            r.hints,
            vec!["check PGKEEP_PASSPHRASE / PGKEEP_PASSPHRASE_FILE".to_string()]
        );
        assert_eq!(
            r.render(),
            "pgkeep: error: opening the repository: wrong passphrase or no matching key for the repository at s3://bucket/prefix\n\
             HINT: check PGKEEP_PASSPHRASE / PGKEEP_PASSPHRASE_FILE\n"
        );
    }

    #[test]
    fn error_report_splits_inline_hints() {
        let e = anyhow::Error::from(Error::from(StorageError::new(
            StorageErrorKind::Config,
            None,
            "unsupported repository URL scheme \"ftp\" in ftp://h/x. HINT: give a directory path",
        )));
        let r = ErrorReport::from_anyhow(&e);
        assert_eq!(r.exit_code, 2);
        assert_eq!(
            r.message,
            "unsupported repository URL scheme \"ftp\" in ftp://h/x."
        );
        assert_eq!(r.hints, vec!["give a directory path".to_string()]);
    }

    #[test]
    fn error_report_redacts_secrets() {
        let e = anyhow::anyhow!("cannot reach https://user:hunter2@example.com/x");
        let r = ErrorReport::from_anyhow(&e);
        assert!(!r.message.contains("hunter2"), "{}", r.message);
        assert_eq!(r.message, "cannot reach https://user:***@example.com/x");
    }
}
