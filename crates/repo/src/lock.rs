//! Repository locks: `locks/<id>` objects.
//!
//! - An exclusive lock conflicts with every other lock; shared locks coexist unless they name
//!   the same `scope` (a second `backup` of the same cluster conflicts with the first).
//! - A holder refreshes its lock every [`LockTiming::refresh_every`] (default
//!   [`REFRESH_EVERY`]) by writing a new object and deleting the old one (objects are
//!   write-once).
//! - A lock is stale when its holder is a dead process on this host, or when its object is
//!   older than [`LockTiming::stale_after`] (default [`STALE_AFTER`]) *by the store's clock*:
//!   the age is the difference between the lock object's modification time and the
//!   modification time of an object the asking process has just written (its own lock when it
//!   takes one, otherwise a short-lived `locks/clock-<random>` probe). Both times come from the
//!   store, so clock skew between hosts cannot make a live lock look stale, nor a dead one
//!   look fresh.
//! - A holder that cannot refresh stops trusting its lock [`LockTiming::holder_deadline`]
//!   after the start of its last successful write (default 25 minutes): from then on
//!   [`RepoLock::ensure_held`] and [`Repository::ensure_locks_held`] fail with
//!   [`RepoError::LockLost`], and the repository refuses to write index files and manifests
//!   through that handle. The margin of one refresh interval before others may call the lock
//!   stale leaves the holder time to stop; a run that lost its lock therefore fails instead of
//!   committing data that a concurrent removal may have taken away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use pgkeep_storage::{ErrorKind as SErr, ObjectMeta};
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::format::LockFile;
use crate::repository::Repository;

/// Skew between this host's clock and the store's beyond which taking a lock warns.
pub const CLOCK_SKEW_WARN: Duration = Duration::from_secs(60);

/// How far the store's clock (`store`, the modification time of an object written between
/// `local_before` and `local_after` by this host's clock) is from this host's: `None` within
/// [`CLOCK_SKEW_WARN`] of that interval (object stores keep whole seconds, so a second of slack
/// is normal), else the offset, positive when the store is ahead.
pub fn clock_skew(
    local_before: DateTime<Utc>,
    local_after: DateTime<Utc>,
    store: DateTime<Utc>,
) -> Option<chrono::TimeDelta> {
    let limit = chrono::TimeDelta::from_std(CLOCK_SKEW_WARN).expect("small");
    if store > local_after + limit {
        Some(store - local_after)
    } else if store < local_before - limit {
        Some(store - local_before)
    } else {
        None
    }
}

/// The warning printed when [`clock_skew`] finds an offset.
pub fn clock_skew_warning(skew: chrono::TimeDelta) -> String {
    let secs = skew.num_seconds();
    let (n, side) = if secs > 0 {
        (secs, "behind")
    } else {
        (-secs, "ahead of")
    };
    format!(
        "this host's clock is about {n} s {side} the repository storage's clock; backup ids,          backup times and recovery targets are taken from this host's clock, so check it          (timedatectl, NTP) and the storage's"
    )
}

/// How often a held lock is refreshed, by default.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// Age (by the store's clock) after which an unrefreshed lock is stale, by default.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// Name prefix (below `locks/`) of the probe objects written to read the store's clock; they
/// are not locks and listings skip them.
const CLOCK_PROBE_PREFIX: &str = "clock-";

/// When locks are refreshed and when they count as stale. The defaults suit production;
/// tests shorten both with [`Repository::set_lock_timing`].
///
/// Invariant: `refresh_every > 0` and `2 * refresh_every <= stale_after`, so a holder has at
/// least one refresh interval between giving up ([`LockTiming::holder_deadline`]) and the
/// moment others may take its lock for stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockTiming {
    /// Interval between two refreshes of a held lock.
    pub refresh_every: Duration,
    /// A lock whose object is older than this by the store's clock is stale.
    pub stale_after: Duration,
}

impl Default for LockTiming {
    fn default() -> Self {
        LockTiming {
            refresh_every: REFRESH_EVERY,
            stale_after: STALE_AFTER,
        }
    }
}

impl LockTiming {
    /// How long after the start of its last successful lock write a holder still trusts its
    /// lock: `stale_after - refresh_every`. The write started before the store stamped the
    /// object, so by then the object is younger than this by any clock running at the same
    /// rate, and others (who wait for `stale_after`) are one refresh interval away from
    /// calling it stale.
    pub fn holder_deadline(&self) -> Duration {
        self.stale_after.saturating_sub(self.refresh_every)
    }

    fn validate(&self) -> Result<()> {
        if self.refresh_every.is_zero() || self.refresh_every * 2 > self.stale_after {
            return Err(RepoError::Invalid(format!(
                "invalid lock timing {self:?}: the refresh interval must be positive and at most half the stale age"
            )));
        }
        Ok(())
    }
}

/// One lock held through a repository handle.
struct Held {
    key: String,
    /// Past this instant the holder no longer trusts the lock (see [`LockTiming::holder_deadline`]).
    trusted_until: Instant,
    /// When the last successful write of the lock started.
    written: Instant,
    /// Set once the deadline passed: a lost lock stays lost even if a late refresh succeeds,
    /// because the holder may already have reported the loss.
    lost: bool,
    /// An exclusive lock (garbage collection checks that it holds one).
    exclusive: bool,
}

/// What became of a refresh.
enum Refreshed {
    /// The new object replaces this old key.
    Replaced(String),
    /// The lock was released meanwhile.
    Released,
    /// The lock was already lost.
    Lost,
}

/// The locks held through one repository handle (shared by its clones), and the timing.
#[derive(Default)]
pub(crate) struct LockState {
    timing: Mutex<LockTiming>,
    /// How long [`Repository::lock`] waits for a conflicting lock to go (zero: fails at once).
    wait: Mutex<Duration>,
    held: Mutex<HashMap<u64, Held>>,
    next_slot: AtomicU64,
}

impl LockState {
    fn timing(&self) -> LockTiming {
        *self.timing.lock().unwrap()
    }

    fn insert(&self, key: String, written: Instant, timing: LockTiming, exclusive: bool) -> u64 {
        let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
        self.held.lock().unwrap().insert(
            slot,
            Held {
                key,
                trusted_until: written + timing.holder_deadline(),
                written,
                lost: false,
                exclusive,
            },
        );
        slot
    }

    fn key(&self, slot: u64) -> Option<String> {
        self.held.lock().unwrap().get(&slot).map(|h| h.key.clone())
    }

    fn remove(&self, slot: u64) -> Option<String> {
        self.held.lock().unwrap().remove(&slot).map(|h| h.key)
    }

    /// Records a successful refresh that started at `written`. A lock already past its
    /// deadline stays lost: the holder may have reported the loss already, so the new object
    /// must not make the lock look alive again (the caller removes it).
    fn refreshed(
        &self,
        slot: u64,
        new_key: String,
        written: Instant,
        timing: LockTiming,
    ) -> Refreshed {
        let mut held = self.held.lock().unwrap();
        let Some(h) = held.get_mut(&slot) else {
            return Refreshed::Released;
        };
        if h.lost || Instant::now() >= h.trusted_until {
            h.lost = true;
            return Refreshed::Lost;
        }
        h.trusted_until = written + timing.holder_deadline();
        h.written = written;
        Refreshed::Replaced(std::mem::replace(&mut h.key, new_key))
    }

    /// True when an exclusive lock is held and not lost.
    fn holds_exclusive(&self) -> bool {
        let now = Instant::now();
        let held = self.held.lock().unwrap();
        held.values()
            .any(|h| h.exclusive && !h.lost && now < h.trusted_until)
    }

    /// `Err(LockLost)` when the lock in `slot` (or any lock, with `None`) is past its deadline.
    fn ensure(&self, slot: Option<u64>) -> Result<()> {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap();
        for (s, h) in held.iter_mut() {
            if slot.is_some_and(|want| want != *s) {
                continue;
            }
            if h.lost || now >= h.trusted_until {
                h.lost = true;
                return Err(RepoError::LockLost {
                    lock: h.key.clone(),
                    secs: now.duration_since(h.written).as_secs(),
                });
            }
        }
        Ok(())
    }
}

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Coexists with other shared locks (of other scopes).
    Shared,
    /// Alone in the repository.
    Exclusive,
}

/// A lock as `repo unlock` and `repo info` show it.
#[derive(Debug, Clone, Serialize)]
pub struct LockInfo {
    /// Lock object id.
    pub id: String,
    /// Exclusive or shared.
    pub exclusive: bool,
    /// Conflict scope, if any.
    pub scope: Option<String>,
    /// What the holder does.
    pub purpose: String,
    /// Holder host.
    pub host: String,
    /// Holder pid.
    pub pid: u32,
    /// When the holder started.
    pub created: DateTime<Utc>,
    /// Last refresh by the store's clock.
    pub refreshed: DateTime<Utc>,
    /// Whether it is stale.
    pub stale: bool,
}

impl LockInfo {
    fn holder(&self) -> String {
        format!(
            "{} lock{} held by {} pid {} ({}, since {})",
            if self.exclusive {
                "an exclusive"
            } else {
                "a shared"
            },
            self.scope
                .as_ref()
                .map(|s| format!(" on {s}"))
                .unwrap_or_default(),
            self.host,
            self.pid,
            self.purpose,
            self.created.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into())
}

fn pid_alive(pid: u32) -> bool {
    // kill(pid, 0) checks existence without sending anything; EPERM still means it exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// A held lock. Refreshed in the background until [`RepoLock::release`] or drop.
///
/// When refreshing keeps failing until [`LockTiming::holder_deadline`] has passed, the lock
/// is lost: [`RepoLock::ensure_held`] fails, and so does every index or manifest write
/// through the repository handle that took it.
pub struct RepoLock {
    repo: Repository,
    slot: u64,
    refresher: tokio::task::JoinHandle<()>,
    released: bool,
    store_clock_skew: Option<chrono::TimeDelta>,
}

impl std::fmt::Debug for RepoLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoLock")
            .field("key", &self.key())
            .finish()
    }
}

impl RepoLock {
    /// Releases the lock (deletes its object).
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.refresher.abort();
        if let Some(key) = self.repo.inner.locks.remove(self.slot) {
            self.repo.storage().delete(&key).await?;
        }
        Ok(())
    }

    /// `Ok` while the lock is trusted; [`RepoError::LockLost`] once refreshing failed for
    /// longer than [`LockTiming::holder_deadline`]. Long-running work checks it before each
    /// step that must not happen without the lock (e.g. deleting data).
    pub fn ensure_held(&self) -> Result<()> {
        self.repo.inner.locks.ensure(Some(self.slot))
    }

    /// The storage key of the lock object now (it changes with every refresh).
    pub fn key(&self) -> String {
        self.repo.inner.locks.key(self.slot).unwrap_or_default()
    }

    /// The offset of the store's clock from this host's found when the lock was taken, when
    /// it exceeded [`CLOCK_SKEW_WARN`] (positive: the store is ahead). Taking the lock warned.
    pub fn store_clock_skew(&self) -> Option<chrono::TimeDelta> {
        self.store_clock_skew
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.refresher.abort();
        let Some(key) = self.repo.inner.locks.remove(self.slot) else {
            return;
        };
        let storage = self.repo.storage().clone();
        // Tracked, so that the binary waits for it before exiting (see crate::cleanup).
        crate::cleanup::spawn(async move {
            let _ = storage.delete(&key).await;
        });
    }
}

impl Repository {
    /// Changes when locks taken through this handle (and its clones) are refreshed and when
    /// locks count as stale. For tests and tools; production runs keep the defaults
    /// ([`REFRESH_EVERY`], [`STALE_AFTER`]), which every process must share to judge each
    /// other's locks alike. Fails when the timing breaks the [`LockTiming`] invariant.
    pub fn set_lock_timing(&self, timing: LockTiming) -> Result<()> {
        timing.validate()?;
        *self.inner.locks.timing.lock().unwrap() = timing;
        Ok(())
    }

    /// The lock timing of this handle.
    pub fn lock_timing(&self) -> LockTiming {
        self.inner.locks.timing()
    }

    /// `Ok` unless a lock taken through this handle is lost (see [`RepoLock::ensure_held`]).
    /// Index and manifest writes call it first, so a run that lost its lock cannot commit.
    pub fn ensure_locks_held(&self) -> Result<()> {
        self.inner.locks.ensure(None)
    }

    /// True when this handle (or a clone) holds an exclusive lock that is not lost: what
    /// anything that removes data requires (invariant 3).
    pub fn holds_exclusive_lock(&self) -> bool {
        self.inner.locks.holds_exclusive()
    }

    /// How long [`Repository::lock`] waits for a conflicting lock to be released before it
    /// fails with [`RepoError::Locked`]; zero (the default) fails at once. A backup and an
    /// expire started by cron in the same minute then run one after the other.
    pub fn set_lock_wait(&self, wait: Duration) {
        *self.inner.locks.wait.lock().unwrap() = wait;
    }

    /// Takes a lock. When a live conflicting lock exists, retries (every 0.2 s at first,
    /// backing off to 5 s) until the lock wait of [`Repository::set_lock_wait`] has passed,
    /// then fails with [`RepoError::Locked`] naming the holder.
    pub async fn lock(
        &self,
        kind: LockKind,
        scope: Option<&str>,
        purpose: &str,
    ) -> Result<RepoLock> {
        let wait = *self.inner.locks.wait.lock().unwrap();
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(200);
        let mut told = false;
        loop {
            match self.lock_once(kind, scope, purpose).await {
                Err(RepoError::Locked { holder }) if Instant::now() < deadline => {
                    if !told {
                        tracing::warn!("waiting up to {wait:?} for the lock held by {holder}");
                        told = true;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// One attempt of [`Repository::lock`].
    async fn lock_once(
        &self,
        kind: LockKind,
        scope: Option<&str>,
        purpose: &str,
    ) -> Result<RepoLock> {
        let timing = self.inner.locks.timing();
        let file = LockFile {
            exclusive: kind == LockKind::Exclusive,
            scope: scope.map(str::to_owned),
            purpose: purpose.to_owned(),
            host: hostname(),
            pid: std::process::id(),
            created: Utc::now(),
        };
        let written = Instant::now();
        let key = write_lock(self, &file).await?;
        let local_after = Utc::now();
        let mut skew = None;
        let result = async {
            // The lock just written carries the store's "now".
            let now = self.storage().head(&key).await?.last_modified;
            skew = clock_skew(file.created, local_after, now);
            if let Some(d) = skew {
                tracing::warn!("{}", clock_skew_warning(d));
            }
            let locks = self.list_locks_with_now(now, timing).await?;
            for l in locks
                .iter()
                .filter(|l| format!("locks/{}", l.id) != key && !l.stale)
            {
                let conflict = l.exclusive
                    || kind == LockKind::Exclusive
                    || (l.scope.is_some() && l.scope == file.scope);
                if conflict {
                    return Err(RepoError::Locked { holder: l.holder() });
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = self.storage().delete(&key).await;
            return Err(e);
        }
        let slot = self
            .inner
            .locks
            .insert(key, written, timing, kind == LockKind::Exclusive);
        let refresher = tokio::spawn(refresh_loop(self.clone(), slot, file, timing));
        Ok(RepoLock {
            repo: self.clone(),
            slot,
            refresher,
            released: false,
            store_clock_skew: skew,
        })
    }

    /// Lists locks with their staleness, judged by the store's clock (read by writing and
    /// removing a probe object). When the probe cannot be written (read-only credentials),
    /// the local clock stands in, with a warning, and `stale` is only an estimate.
    pub async fn list_locks(&self) -> Result<Vec<LockInfo>> {
        let timing = self.inner.locks.timing();
        match self.store_now().await {
            Ok(now) => self.list_locks_with_now(now, timing).await,
            Err(e) => {
                tracing::warn!(
                    "cannot read the store's clock ({e}); judging lock staleness by the local clock"
                );
                self.list_locks_with_now(Utc::now(), timing).await
            }
        }
    }

    /// The store's current time: the modification time of a probe object written now (and
    /// removed again).
    pub async fn store_now(&self) -> Result<DateTime<Utc>> {
        let mut id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        let key = format!("locks/{CLOCK_PROBE_PREFIX}{}", hex::encode(id));
        self.storage()
            .put_if_absent(&key, Bytes::from_static(b"pgkeep clock probe"))
            .await?;
        let head = self.storage().head(&key).await;
        if let Err(e) = self.storage().delete(&key).await {
            tracing::warn!("could not remove the clock probe {key}: {e}");
        }
        Ok(head?.last_modified)
    }

    async fn list_locks_with_now(
        &self,
        now: DateTime<Utc>,
        timing: LockTiming,
    ) -> Result<Vec<LockInfo>> {
        let metas = self.storage().list("locks/").await?;
        let me = hostname();
        let mut out = Vec::new();
        for m in metas {
            let ObjectMeta {
                key, last_modified, ..
            } = m;
            let id = key.trim_start_matches("locks/").to_string();
            if id.starts_with(CLOCK_PROBE_PREFIX) {
                continue; // another process reading the store's clock
            }
            let raw = match self.storage().get(&key).await {
                Ok(r) => r,
                Err(e) if e.kind == SErr::NotFound => continue, // released meanwhile
                Err(e) => return Err(e.into()),
            };
            let Ok(f) = serde_json::from_slice::<LockFile>(&raw) else {
                tracing::warn!(lock = %key, "unreadable lock object; treating it as stale");
                out.push(LockInfo {
                    id,
                    exclusive: true,
                    scope: None,
                    purpose: "unreadable".into(),
                    host: "?".into(),
                    pid: 0,
                    created: last_modified,
                    refreshed: last_modified,
                    stale: true,
                });
                continue;
            };
            // A lock stamped after `now` (a refresh racing this listing) has age zero.
            let age = (now - last_modified).to_std().unwrap_or_default();
            let stale = (f.host == me && f.pid != std::process::id() && !pid_alive(f.pid))
                || age > timing.stale_after;
            out.push(LockInfo {
                id,
                exclusive: f.exclusive,
                scope: f.scope,
                purpose: f.purpose,
                host: f.host,
                pid: f.pid,
                created: f.created,
                refreshed: last_modified,
                stale,
            });
        }
        out.sort_by_key(|a| a.created);
        Ok(out)
    }

    /// Removes stale locks, or every lock when `all`. Returns what was removed. Staleness is
    /// judged by the store's clock; when that cannot be read (the probe write fails), this
    /// fails rather than guess with the local clock.
    pub async fn unlock(&self, all: bool) -> Result<Vec<LockInfo>> {
        let timing = self.inner.locks.timing();
        let mut removed = Vec::new();
        let now = self.store_now().await?;
        for l in self.list_locks_with_now(now, timing).await? {
            if all || l.stale {
                self.storage().delete(&format!("locks/{}", l.id)).await?;
                removed.push(l);
            }
        }
        Ok(removed)
    }
}

/// Refreshes the lock in `slot` every `timing.refresh_every`; after a failure it retries
/// four times as often, and gives up once the lock is past its deadline (the holder then
/// sees [`RepoError::LockLost`]).
async fn refresh_loop(repo: Repository, slot: u64, file: LockFile, timing: LockTiming) {
    let retry_every = (timing.refresh_every / 4).max(Duration::from_millis(10));
    let mut failing = false;
    loop {
        tokio::time::sleep(if failing {
            retry_every
        } else {
            timing.refresh_every
        })
        .await;
        let started = Instant::now();
        match write_lock(&repo, &file).await {
            Ok(new_key) => {
                failing = false;
                let old = match repo
                    .inner
                    .locks
                    .refreshed(slot, new_key.clone(), started, timing)
                {
                    Refreshed::Replaced(old) => old,
                    Refreshed::Released | Refreshed::Lost => {
                        // Not ours to keep: released, or given up (a late success must not
                        // make a lost lock look alive again).
                        let _ = repo.storage().delete(&new_key).await;
                        return;
                    }
                };
                if let Err(e) = repo.storage().delete(&old).await {
                    // Harmless: the old object only looks like a second lock of ours until
                    // it turns stale.
                    tracing::warn!("could not remove the replaced lock object {old}: {e}");
                }
            }
            Err(e) => {
                failing = true;
                if let Err(lost) = repo.inner.locks.ensure(Some(slot)) {
                    tracing::error!("{lost} (last refresh error: {e})");
                    return;
                }
                tracing::warn!("could not refresh the repository lock (will retry): {e}");
            }
        }
    }
}

async fn write_lock(repo: &Repository, file: &LockFile) -> Result<String> {
    let mut id = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
    let key = format!("locks/{}", hex::encode(id));
    let body = serde_json::to_vec_pretty(file).expect("lock serializes");
    repo.storage()
        .put_if_absent(&key, Bytes::from(body))
        .await?;
    Ok(key)
}
