//! Retrying temporary failures.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use crate::{ObjectMeta, Result, Storage};

/// How [`Retry`] retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff base: before retry `n` (1-based) we sleep a uniformly random time in
    /// `[0, min(max_delay, base_delay * 2^(n-1))]` ("full jitter").
    pub base_delay: Duration,
    /// Upper bound of one sleep.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The random sleep before retry number `retry` (1-based).
    fn delay(&self, retry: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(
            1u32.checked_shl(retry.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let cap = exp.min(self.max_delay);
        let nanos = cap.as_nanos().min(u64::MAX as u128) as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// The process-wide retry counter that [`crate::open_storage`] wires into every [`Retry`]
/// it builds; exported as a metric by the daemon.
pub fn global_retry_counter() -> Arc<AtomicU64> {
    static COUNTER: OnceLock<Arc<AtomicU64>> = OnceLock::new();
    COUNTER.get_or_init(|| Arc::new(AtomicU64::new(0))).clone()
}

/// Retries calls that fail with [`crate::ErrorKind::Temporary`], with exponential backoff
/// and full jitter. Every other kind (NotFound, PermissionDenied, AlreadyExists, Corrupt,
/// …) is returned at once: retrying them cannot help and would hide the cause.
///
/// Note for `put_if_absent`: if a first attempt was applied but its answer lost, the retry
/// sees `AlreadyExists` — callers that care (WAL push) compare the stored content.
#[derive(Debug)]
pub struct Retry<S> {
    inner: S,
    policy: RetryPolicy,
    counter: Arc<AtomicU64>,
}

impl<S: Storage> Retry<S> {
    /// Wraps `inner` with `policy` and a fresh retry counter.
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Retry {
            inner,
            policy,
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Counts retries into `counter` (shared, e.g. with a metrics registry).
    pub fn with_counter(mut self, counter: Arc<AtomicU64>) -> Self {
        self.counter = counter;
        self
    }

    /// The retry counter (retries, not first attempts).
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.counter.clone()
    }

    /// Retries done so far through this counter.
    pub fn retries(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn run<T, F, Fut>(&self, op: &str, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 1;
        loop {
            match call().await {
                Err(e) if e.is_temporary() && attempt < self.policy.max_attempts.max(1) => {
                    let delay = self.policy.delay(attempt);
                    tracing::warn!(
                        "{op} on {} failed (attempt {attempt} of {}), retrying in {delay:?}: {e}",
                        self.inner.location(),
                        self.policy.max_attempts
                    );
                    self.counter.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl<S: Storage> Storage for Retry<S> {
    async fn get(&self, key: &str) -> Result<Bytes> {
        self.run("get", || self.inner.get(key)).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.run("get_range", || self.inner.get_range(key, range.clone()))
            .await
    }
    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.run("put", || self.inner.put(key, data.clone())).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()> {
        self.run("put_if_absent", || {
            self.inner.put_if_absent(key, data.clone())
        })
        .await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.run("list", || self.inner.list(prefix)).await
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        self.run("head", || self.inner.head(key)).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.run("delete", || self.inner.delete(key)).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(300),
        };
        for n in 1..40 {
            let d = p.delay(n);
            assert!(d <= Duration::from_millis(300), "retry {n}: {d:?}");
        }
        assert!(p.delay(1) <= Duration::from_millis(100));
        // Jitter: 50 draws are not all equal.
        let draws: std::collections::HashSet<_> = (0..50).map(|_| p.delay(3)).collect();
        assert!(draws.len() > 1);
    }
}
