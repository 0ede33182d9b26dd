//! Clean-up work started by a guard's `Drop` that must finish before the process exits.
//!
//! A repository lock dropped without [`crate::RepoLock::release`] (an error path, or the
//! future of a command dropped on SIGINT/SIGTERM) can only start its release: `Drop` cannot
//! wait. Spawned as a plain task, that release would be dropped unfinished by the runtime's
//! shutdown, and the lock object left behind. Such work is spawned with [`spawn`], and the
//! binary calls [`finish`] before it exits.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinHandle;

static PENDING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

fn pending() -> std::sync::MutexGuard<'static, Vec<JoinHandle<()>>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns `work` on the current runtime and records it for [`finish`]. Returns false (and
/// does nothing) outside a runtime.
pub fn spawn<F>(work: F) -> bool
where
    F: Future<Output = ()> + Send + 'static,
{
    let Ok(h) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let mut p = pending();
    // A long-running process (the daemon) drops guards now and then: keep only live work.
    p.retain(|h| !h.is_finished());
    p.push(h.spawn(work));
    true
}

/// Waits until every piece of work given to [`spawn`] (including work it spawned in turn)
/// has finished, or `timeout` has passed. Returns how many were still running then.
pub async fn finish(timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let handles = std::mem::take(&mut *pending());
        if handles.is_empty() {
            return 0;
        }
        let mut left = handles.into_iter();
        while let Some(h) = left.next() {
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                return 1 + left.filter(|h| !h.is_finished()).count();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    // One test: the list of pending work is global to the process.
    #[tokio::test]
    async fn finish_waits_for_spawned_work_and_what_it_spawns_then_gives_up_at_the_timeout() {
        let done = Arc::new(AtomicU32::new(0));
        let d = done.clone();
        assert!(spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let d2 = d.clone();
            spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                d2.fetch_add(1, Ordering::SeqCst);
            });
            d.fetch_add(1, Ordering::SeqCst);
        }));
        finish(Duration::from_secs(10)).await;
        assert_eq!(done.load(Ordering::SeqCst), 2);

        spawn(std::future::pending());
        assert_eq!(finish(Duration::from_millis(50)).await, 1);
    }

    #[test]
    fn outside_a_runtime_nothing_is_spawned() {
        assert!(!spawn(async {}));
    }
}
