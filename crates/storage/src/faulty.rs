//! Injected faults, for tests.
//!
//! [`Faulty`] wraps any storage and makes it misbehave on purpose: transient 503-like
//! failures, permanent failures after N operations, bodies cut short, flipped bits,
//! latency, and a SIGKILL of the whole process after N mutating operations (for the crash
//! loop tests that run the real binary, see [`wrap_from_env`]).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::crashpoint::kill_self;
use crate::{ErrorKind, ObjectMeta, Result, Storage, StorageError};

/// Test hook: when this variable holds a number N, [`wrap_from_env`] makes the process
/// SIGKILL itself once N mutating storage operations (put, put_if_absent, delete) have
/// completed. Crash-loop tests set it on the real binary; it has no other use, and release
/// builds ignore it (see [`crate::crashpoint`]).
pub const KILL_AFTER_OPS_ENV: &str = "PGKEEP_TEST_KILL_AFTER_OPS";

#[derive(Debug, Default)]
struct Plan {
    /// Fail this many upcoming calls with a Temporary (503-like) error.
    fail_next: u64,
    /// From this call index on (0-based, counting every call), fail with the kind.
    fail_after: Option<(u64, ErrorKind)>,
    /// Cut the body of this many upcoming gets/get_ranges to this many bytes.
    cut_next: u64,
    cut_to: usize,
    /// Flip one bit in this many upcoming gets/get_ranges.
    flip_next: u64,
    latency: Duration,
    kill_after_mutations: Option<u64>,
    /// Seconds added to every modification time the store reports (a store whose clock
    /// runs ahead, or behind when negative).
    clock_offset_secs: i64,
}

/// A storage decorator that injects faults; every knob is set through `&self` so a test
/// can change the plan while the storage is shared.
#[derive(Debug)]
pub struct Faulty<S> {
    inner: S,
    plan: Mutex<Plan>,
    calls: AtomicU64,
    mutations: AtomicU64,
    injected: AtomicU64,
}

impl<S: Storage> Faulty<S> {
    /// Wraps `inner`; without further calls it behaves exactly like `inner`.
    pub fn new(inner: S) -> Self {
        Faulty {
            inner,
            plan: Mutex::new(Plan::default()),
            calls: AtomicU64::new(0),
            mutations: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// The next `n` calls (any operation) fail with a [`ErrorKind::Temporary`] error that
    /// reads like an HTTP 503, without reaching the inner storage.
    pub fn fail_next(&self, n: u64) -> &Self {
        self.plan().fail_next = n;
        self
    }

    /// Every call from the `n`-th on (0-based over all calls made so far, so `n = 0`
    /// fails everything) fails with `kind` without reaching the inner storage.
    pub fn fail_after(&self, n: u64, kind: ErrorKind) -> &Self {
        self.plan().fail_after = Some((n, kind));
        self
    }

    /// The next `n` reads (get, get_range) lose their body after `keep` bytes, as with a
    /// connection dropped mid-body. Like a real backend noticing the short body against
    /// the announced length, the caller gets [`ErrorKind::Corrupt`].
    pub fn cut_next_reads(&self, n: u64, keep: usize) -> &Self {
        let mut p = self.plan();
        p.cut_next = n;
        p.cut_to = keep;
        self
    }

    /// The next `n` reads (get, get_range) return the data with one bit flipped (bit 0 of
    /// the middle byte) and no error: only a hash or MAC check can notice.
    pub fn flip_next_reads(&self, n: u64) -> &Self {
        self.plan().flip_next = n;
        self
    }

    /// Every call first sleeps `latency`.
    pub fn with_latency(&self, latency: Duration) -> &Self {
        self.plan().latency = latency;
        self
    }

    /// SIGKILLs the process once `n` mutating operations (put, put_if_absent, delete) have
    /// completed — right after the n-th returns, before its caller sees the result. With
    /// `n = 0` the first mutating call kills the process before it starts.
    pub fn kill_after_mutations(&self, n: u64) -> &Self {
        self.plan().kill_after_mutations = Some(n);
        self
    }

    /// Clears every planned fault.
    pub fn heal(&self) -> &Self {
        *self.plan() = Plan::default();
        self
    }

    /// Calls made so far (all operations).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Mutating operations completed so far.
    pub fn mutations(&self) -> u64 {
        self.mutations.load(Ordering::SeqCst)
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Makes the store's clock run `secs` seconds ahead of this host's (behind when
    /// negative): every modification time it reports is shifted by that much.
    pub fn with_clock_offset(&self, secs: i64) -> &Self {
        self.plan().clock_offset_secs = secs;
        self
    }

    fn shift(&self, mut m: ObjectMeta) -> ObjectMeta {
        let secs = self.plan().clock_offset_secs;
        m.last_modified += chrono::TimeDelta::seconds(secs);
        m
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Common entry of every call: latency, then the planned failures.
    async fn enter(&self, op: &str, key: &str, mutating: bool) -> Result<()> {
        let index = self.calls.fetch_add(1, Ordering::SeqCst);
        let (latency, failure) = {
            let mut p = self.plan();
            if mutating {
                if let Some(n) = p.kill_after_mutations {
                    if self.mutations.load(Ordering::SeqCst) >= n {
                        kill_self();
                    }
                }
            }
            let failure = if p.fail_next > 0 {
                p.fail_next -= 1;
                Some(StorageError::new(
                    ErrorKind::Temporary,
                    Some(key),
                    format!("{op} {key}: injected fault: 503 Service Unavailable"),
                ))
            } else {
                match p.fail_after {
                    Some((n, kind)) if index >= n => Some(StorageError::new(
                        kind,
                        Some(key),
                        format!("{op} {key}: injected fault ({kind:?}) after {n} calls"),
                    )),
                    _ => None,
                }
            };
            (p.latency, failure)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match failure {
            Some(e) => {
                self.injected.fetch_add(1, Ordering::SeqCst);
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn after_mutation(&self) {
        let done = self.mutations.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(n) = self.plan().kill_after_mutations {
            if done >= n {
                kill_self();
            }
        }
    }

    fn damage(&self, key: &str, data: Bytes, expected: usize) -> Result<Bytes> {
        let mut p = self.plan();
        if p.cut_next > 0 {
            p.cut_next -= 1;
            let keep = p.cut_to.min(data.len());
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(StorageError::new(
                ErrorKind::Corrupt,
                Some(key),
                format!(
                    "reading {key}: got {keep} bytes, expected {expected} (injected fault: \
                     body cut short)"
                ),
            ));
        }
        if p.flip_next > 0 && !data.is_empty() {
            p.flip_next -= 1;
            self.injected.fetch_add(1, Ordering::SeqCst);
            let mut v = data.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 1;
            return Ok(Bytes::from(v));
        }
        Ok(data)
    }
}

#[async_trait]
impl<S: Storage> Storage for Faulty<S> {
    async fn get(&self, key: &str) -> Result<Bytes> {
        self.enter("get", key, false).await?;
        let data = self.inner.get(key).await?;
        let len = data.len();
        self.damage(key, data, len)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.enter("get_range", key, false).await?;
        let expected = (range.end.saturating_sub(range.start)) as usize;
        let data = self.inner.get_range(key, range).await?;
        self.damage(key, data, expected)
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.enter("put", key, true).await?;
        let r = self.inner.put(key, data).await;
        self.after_mutation();
        r
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()> {
        self.enter("put_if_absent", key, true).await?;
        let r = self.inner.put_if_absent(key, data).await;
        self.after_mutation();
        r
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.enter("list", prefix, false).await?;
        let metas = self.inner.list(prefix).await?;
        Ok(metas.into_iter().map(|m| self.shift(m)).collect())
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        self.enter("head", key, false).await?;
        self.inner.head(key).await.map(|m| self.shift(m))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.enter("delete", key, true).await?;
        let r = self.inner.delete(key).await;
        self.after_mutation();
        r
    }

    fn location(&self) -> String {
        self.inner.location()
    }
}

/// Applies the crash-loop test hook: when [`KILL_AFTER_OPS_ENV`] (`PGKEEP_TEST_KILL_AFTER_OPS`)
/// is set to N, returns `s` wrapped so that the process SIGKILLs itself after N mutating
/// operations; otherwise returns `s` unchanged. The other storage hooks ([`CLOCK_OFFSET_ENV`],
/// [`LATENCY_ENV`]) are applied first, under the same rules. A value that is not a number is ignored
/// with a warning. Release builds ignore the variable (with a warning): only builds with
/// debug assertions, i.e. test builds, honour it, so it cannot fire in production by accident.
pub fn wrap_from_env(s: Arc<dyn Storage>) -> Arc<dyn Storage> {
    let s = latency_from_env(clock_offset_from_env(s));
    let Ok(value) = std::env::var(KILL_AFTER_OPS_ENV) else {
        return s;
    };
    if !crate::crashpoint::armed(KILL_AFTER_OPS_ENV) {
        return s;
    }
    match value.trim().parse::<u64>() {
        Ok(n) => {
            tracing::warn!("test hook {KILL_AFTER_OPS_ENV}={n}: will SIGKILL after {n} writes");
            let f = Faulty::new(s);
            f.kill_after_mutations(n);
            Arc::new(f)
        }
        Err(_) => {
            tracing::warn!("ignoring {KILL_AFTER_OPS_ENV}={value:?}: not a number");
            s
        }
    }
}

/// Test hook: when this variable holds a number of seconds, [`wrap_from_env`] makes the
/// store's clock run that far ahead of this host's (behind when negative), as a fake S3 with
/// an offset `Date` would. Like the kill hooks, only builds with debug assertions honour it.
pub const CLOCK_OFFSET_ENV: &str = "PGKEEP_TEST_STORE_CLOCK_OFFSET_SECS";

fn clock_offset_from_env(s: Arc<dyn Storage>) -> Arc<dyn Storage> {
    let Ok(value) = std::env::var(CLOCK_OFFSET_ENV) else {
        return s;
    };
    if !crate::crashpoint::armed(CLOCK_OFFSET_ENV) {
        return s;
    }
    match value.trim().parse::<i64>() {
        Ok(secs) => {
            let f = Faulty::new(s);
            f.with_clock_offset(secs);
            Arc::new(f)
        }
        Err(_) => {
            tracing::warn!("ignoring {CLOCK_OFFSET_ENV}={value:?}: not a number of seconds");
            s
        }
    }
}

/// Test hook: when this variable holds a number of milliseconds, [`wrap_from_env`] makes every
/// storage operation of the process first sleep that long, as a slow object store would. The
/// interruption tests use it so that a command is still in the middle of its work when a
/// SIGINT or SIGTERM lands. Like the kill hooks, only builds with debug assertions honour it.
pub const LATENCY_ENV: &str = "PGKEEP_TEST_STORE_LATENCY_MS";

fn latency_from_env(s: Arc<dyn Storage>) -> Arc<dyn Storage> {
    let Ok(value) = std::env::var(LATENCY_ENV) else {
        return s;
    };
    if !crate::crashpoint::armed(LATENCY_ENV) {
        return s;
    }
    match value.trim().parse::<u64>() {
        Ok(ms) => {
            tracing::warn!("test hook {LATENCY_ENV}={ms}: every storage operation waits {ms} ms");
            let f = Faulty::new(s);
            f.with_latency(Duration::from_millis(ms));
            Arc::new(f)
        }
        Err(_) => {
            tracing::warn!("ignoring {LATENCY_ENV}={value:?}: not a number of milliseconds");
            s
        }
    }
}
