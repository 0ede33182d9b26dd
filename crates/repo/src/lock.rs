//! Repository locks: `locks/<id>` objects.
//!
//! - An exclusive lock conflicts with every other lock; shared locks coexist unless they name
//!   the same `scope` (a second `backup` of the same cluster conflicts with the first).
//! - A holder refreshes its lock every [`REFRESH_EVERY`] by writing a new object and deleting
//!   the old one (objects are write-once).
//! - A lock is stale when its holder is a dead process on this host, or when its object is
//!   older than [`STALE_AFTER`] by the store's clock: the age is measured against the
//!   modification time of the lock we just wrote, never against the local clock, so clock
//!   skew between hosts cannot make a live lock look stale.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use pgkeep_storage::{ErrorKind as SErr, ObjectMeta};
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::format::LockFile;
use crate::repository::Repository;

/// How often a held lock is refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5 * 60);
/// Age after which an unrefreshed lock is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

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
pub struct RepoLock {
    repo: Repository,
    key: Arc<Mutex<String>>,
    refresher: tokio::task::JoinHandle<()>,
    released: bool,
}

impl RepoLock {
    /// Releases the lock (deletes its object).
    pub async fn release(mut self) -> Result<()> {
        self.released = true;
        self.refresher.abort();
        let key = self.key.lock().unwrap().clone();
        self.repo.storage().delete(&key).await?;
        Ok(())
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.refresher.abort();
        let key = self.key.lock().unwrap().clone();
        let storage = self.repo.storage().clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                let _ = storage.delete(&key).await;
            });
        }
    }
}

impl Repository {
    /// Takes a lock, failing at once with [`RepoError::Locked`] naming the holder when a live
    /// conflicting lock exists.
    pub async fn lock(
        &self,
        kind: LockKind,
        scope: Option<&str>,
        purpose: &str,
    ) -> Result<RepoLock> {
        let file = LockFile {
            exclusive: kind == LockKind::Exclusive,
            scope: scope.map(str::to_owned),
            purpose: purpose.to_owned(),
            host: hostname(),
            pid: std::process::id(),
            created: Utc::now(),
        };
        let key = write_lock(self, &file).await?;
        let result = async {
            let locks = self.list_locks_from(Some(&key)).await?;
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
        let key = Arc::new(Mutex::new(key));
        let refresher = {
            let repo = self.clone();
            let key = key.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(REFRESH_EVERY).await;
                    match write_lock(&repo, &file).await {
                        Ok(new_key) => {
                            let old = std::mem::replace(&mut *key.lock().unwrap(), new_key);
                            let _ = repo.storage().delete(&old).await;
                        }
                        Err(e) => tracing::warn!("could not refresh the repository lock: {e}"),
                    }
                }
            })
        };
        Ok(RepoLock {
            repo: self.clone(),
            key,
            refresher,
            released: false,
        })
    }

    /// Lists locks with their staleness.
    pub async fn list_locks(&self) -> Result<Vec<LockInfo>> {
        self.list_locks_from(None).await
    }

    /// `reference`: a lock object we just wrote, whose mtime is the store's "now".
    async fn list_locks_from(&self, reference: Option<&str>) -> Result<Vec<LockInfo>> {
        let metas = self.storage().list("locks/").await?;
        let now = reference
            .and_then(|r| metas.iter().find(|m| m.key == r).map(|m| m.last_modified))
            .or_else(|| metas.iter().map(|m| m.last_modified).max())
            .unwrap_or_else(Utc::now);
        let me = hostname();
        let mut out = Vec::new();
        for m in metas {
            let ObjectMeta {
                key, last_modified, ..
            } = m;
            let raw = match self.storage().get(&key).await {
                Ok(r) => r,
                Err(e) if e.kind == SErr::NotFound => continue, // released meanwhile
                Err(e) => return Err(e.into()),
            };
            let id = key.trim_start_matches("locks/").to_string();
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
            let age = (now - last_modified).to_std().unwrap_or_default();
            let stale = (f.host == me && f.pid != std::process::id() && !pid_alive(f.pid))
                || age > STALE_AFTER;
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

    /// Removes stale locks, or every lock when `all`. Returns what was removed.
    pub async fn unlock(&self, all: bool) -> Result<Vec<LockInfo>> {
        let mut removed = Vec::new();
        for l in self.list_locks().await? {
            if all || l.stale {
                self.storage().delete(&format!("locks/{}", l.id)).await?;
                removed.push(l);
            }
        }
        Ok(removed)
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
