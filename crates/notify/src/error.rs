//! Errors of the notifier. Messages never hold a secret: not a URL with a token, not a
//! routing key, not a password.

/// What can go wrong outside of one channel's delivery (which is reported per channel).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The state file or its directory cannot be read, locked or written.
    #[error("notification state: {0}")]
    State(String),
    /// No channel is configured (for `pgkeep notify test`).
    #[error("no notification channel is configured")]
    NoChannels,
}
