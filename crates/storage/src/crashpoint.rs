//! Test hooks that SIGKILL the process, for the crash-loop tests that run the real binary.
//!
//! Two hooks, each set by an environment variable:
//! - [`KILL_AFTER_OPS_ENV`](crate::KILL_AFTER_OPS_ENV) (`PGKEEP_TEST_KILL_AFTER_OPS=N`): after
//!   N completed mutating storage operations, between two writes (see
//!   [`wrap_from_env`](crate::wrap_from_env)).
//! - [`KILL_AT_ENV`] (`PGKEEP_TEST_KILL_AT=<point>:<k>`): *inside* a write, at the k-th time
//!   (from 1) the process reaches `<point>`:
//!   - `before-rename`: a local write whose temporary file is written and fsynced, before it is
//!     renamed to its final name;
//!   - `mid-multipart`: a multipart upload with at least one part stored, before it is
//!     completed.
//!
//! **Armed only in builds with debug assertions** (`cargo build`, `cargo test`): a release build
//! (`cargo build --release`, `cargo install`, what users run) ignores both variables and logs a
//! warning if one is set, so a stray variable in a production environment cannot kill a backup.
//! The test builds that run the binary are debug builds, so the crash tests keep working.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// `PGKEEP_TEST_KILL_AT=<point>:<k>`: see the module documentation.
pub const KILL_AT_ENV: &str = "PGKEEP_TEST_KILL_AT";

/// True when this build honours the kill hooks (it has debug assertions).
pub const HOOKS_ARMED: bool = cfg!(debug_assertions);

/// A place inside a write where [`KILL_AT_ENV`] can kill the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillPoint {
    /// Local write: temp file complete and fsynced, not yet renamed (`before-rename`).
    BeforeRename,
    /// Object store: a multipart upload with a part stored, not yet completed
    /// (`mid-multipart`).
    MidMultipart,
}

impl KillPoint {
    fn parse(s: &str) -> Option<KillPoint> {
        match s {
            "before-rename" => Some(KillPoint::BeforeRename),
            "mid-multipart" => Some(KillPoint::MidMultipart),
            _ => None,
        }
    }
}

struct Plan {
    point: KillPoint,
    at: u64,
    seen: AtomicU64,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let value = std::env::var(KILL_AT_ENV).ok()?;
        if !armed(KILL_AT_ENV) {
            return None;
        }
        let parsed = value.split_once(':').and_then(|(p, k)| {
            Some((KillPoint::parse(p.trim())?, k.trim().parse::<u64>().ok()?))
        });
        match parsed {
            Some((point, at)) if at > 0 => {
                tracing::warn!("test hook {KILL_AT_ENV}={value}: will SIGKILL at {point:?} #{at}");
                Some(Plan {
                    point,
                    at,
                    seen: AtomicU64::new(0),
                })
            }
            _ => {
                tracing::warn!(
                    "ignoring {KILL_AT_ENV}={value:?}: expected before-rename:<k> or mid-multipart:<k>, k >= 1"
                );
                None
            }
        }
    })
    .as_ref()
}

/// Whether a hook variable that is set may act: only in builds with debug assertions. Warns
/// when a release build meets one.
pub(crate) fn armed(var: &str) -> bool {
    if !HOOKS_ARMED {
        tracing::warn!("ignoring the test hook {var}: release builds never honour it");
    }
    HOOKS_ARMED
}

/// Called by the backends at each [`KillPoint`]; kills the process when the plan says so.
pub(crate) fn reached(point: KillPoint) {
    if let Some(p) = plan() {
        if p.point == point && p.seen.fetch_add(1, Ordering::SeqCst) + 1 == p.at {
            kill_self();
        }
    }
}

/// SIGKILLs this process.
pub(crate) fn kill_self() -> ! {
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught; if it somehow returned, never let the operation proceed.
    std::process::abort();
}
