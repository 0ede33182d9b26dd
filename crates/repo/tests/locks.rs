//! Lock staleness and refresh (design.md invariant 3, RELIABILITY row 24): staleness is judged
//! by the store's clock, a live holder keeps its lock fresh, and a holder that cannot refresh
//! fails before anyone may take its lock for stale.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgkeep_repo::lock::LockTiming;
use pgkeep_repo::{ErrorKind, InitOptions, LockKind, Repository, WriterOptions};
use pgkeep_storage::{ErrorKind as SErr, Faulty, LocalStorage, Storage};

fn local(dir: &std::path::Path) -> Arc<dyn Storage> {
    Arc::new(LocalStorage::new(dir).unwrap())
}

/// A lock object as another host's pgkeep writes it.
fn foreign_lock(host: &str, exclusive: bool, created: &str) -> bytes::Bytes {
    let f = serde_json::json!({
        "exclusive": exclusive, "scope": null, "purpose": "backup", "host": host,
        "pid": 4242u32, "created": created,
    });
    serde_json::to_vec(&f).unwrap().into()
}

/// Sets a local object's modification time `ago` in the past: for a local repository the file
/// system is the store, so this is the store's clock having stamped it then.
fn age_object(dir: &std::path::Path, key: &str, ago: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(dir.join(key))
        .unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

fn lock_ids(infos: &[pgkeep_repo::LockInfo]) -> Vec<String> {
    infos.iter().map(|l| l.id.clone()).collect()
}

async fn lock_keys(s: &dyn Storage) -> Vec<String> {
    let mut v: Vec<String> = s
        .list("locks/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    v.sort();
    v
}

/// The bug this reproduces: with no lock of its own to compare with, `repo unlock` measured a
/// lone lock's age against that lock's own time, so a lock left by a crash on another host
/// never looked stale.
#[tokio::test]
async fn a_lone_lock_of_another_host_not_refreshed_for_the_stale_age_is_stale_and_unlock_removes_it(
) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(local(dir.path()), InitOptions::default())
        .await
        .unwrap();
    let s = repo.storage().clone();
    assert_eq!(repo.lock_timing(), LockTiming::default());

    // Crashed on another host 31 minutes ago (default stale age: 30 minutes).
    let crashed = "locks/0000000000000000000000000000c0de";
    s.put(
        crashed,
        foreign_lock("db-2.elsewhere", true, "2026-01-01T00:00:00Z"),
    )
    .await
    .unwrap();
    age_object(dir.path(), crashed, Duration::from_secs(31 * 60));
    let listed = repo.list_locks().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0].stale,
        "31 minutes old by the store's clock: {listed:?}"
    );
    let removed = repo.unlock(false).await.unwrap();
    assert_eq!(lock_ids(&removed), ["0000000000000000000000000000c0de"]);
    assert!(
        lock_keys(s.as_ref()).await.is_empty(),
        "unlock left a lock or a clock probe"
    );

    // Refreshed 10 minutes ago: live, whatever its holder's clock wrote as `created` (days
    // off here). It blocks an exclusive lock, and unlock without --all keeps it.
    let live = "locks/00000000000000000000000000001eaf";
    s.put(
        live,
        foreign_lock("db-3.elsewhere", false, "2025-06-01T00:00:00Z"),
    )
    .await
    .unwrap();
    age_object(dir.path(), live, Duration::from_secs(10 * 60));
    assert!(!repo.list_locks().await.unwrap()[0].stale);
    assert!(repo.unlock(false).await.unwrap().is_empty());
    let err = repo
        .lock(LockKind::Exclusive, None, "expire")
        .await
        .expect_err("a live foreign lock did not block an exclusive lock");
    assert_eq!(err.kind(), ErrorKind::Locked);
    assert!(err.to_string().contains("db-3.elsewhere"), "{err}");
    assert_eq!(lock_keys(s.as_ref()).await, [live]);

    // Once it ages past the stale age it no longer blocks anyone.
    age_object(dir.path(), live, Duration::from_secs(30 * 60 + 5));
    let l = repo
        .lock(LockKind::Exclusive, None, "expire")
        .await
        .unwrap();
    l.release().await.unwrap();
    assert_eq!(lock_ids(&repo.unlock(false).await.unwrap()), [&live[6..]]);
}

/// The same on a real object store, whose clock stamps Last-Modified (to the second): a
/// lone lock turns stale once the store's clock has moved past the stale age.
#[tokio::test]
async fn on_seaweedfs_a_lone_lock_turns_stale_by_the_stores_clock() {
    let server = pgkeep_testing::s3::S3Server::start().await.unwrap();
    let repo = Repository::init(server.storage(), InitOptions::default())
        .await
        .unwrap();
    repo.set_lock_timing(LockTiming {
        refresh_every: Duration::from_secs(1),
        stale_after: Duration::from_secs(2),
    })
    .unwrap();
    let key = "locks/0000000000000000000000000000dead";
    repo.storage()
        .put(
            key,
            foreign_lock("db-2.elsewhere", true, "2026-01-01T00:00:00Z"),
        )
        .await
        .unwrap();
    assert!(!repo.list_locks().await.unwrap()[0].stale);
    assert!(repo.unlock(false).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(lock_ids(&repo.unlock(false).await.unwrap()), [&key[6..]]);
    assert!(lock_keys(repo.storage().as_ref()).await.is_empty());
}

const SHORT: LockTiming = LockTiming {
    refresh_every: Duration::from_millis(250),
    stale_after: Duration::from_millis(1500),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_holders_refresh_keeps_its_lock_fresh_and_replaces_the_object() {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), InitOptions::default())
        .await
        .unwrap();
    let holder = Repository::open(local(dir.path()), None).await.unwrap();
    holder.set_lock_timing(SHORT).unwrap();
    let observer = Repository::open(local(dir.path()), None).await.unwrap();
    observer.set_lock_timing(SHORT).unwrap();

    let lock = holder
        .lock(LockKind::Shared, Some("backup:main"), "backup")
        .await
        .unwrap();
    let first = lock.key();
    // Twice the stale age: without refreshes the lock would be stale by now.
    tokio::time::sleep(SHORT.stale_after * 2).await;

    let listed = observer.list_locks().await.unwrap();
    assert_eq!(listed.len(), 1, "old objects left behind: {listed:?}");
    assert!(!listed[0].stale, "a refreshed lock looks stale: {listed:?}");
    assert_ne!(format!("locks/{}", listed[0].id), first, "never refreshed");
    assert_eq!(format!("locks/{}", listed[0].id), lock.key());
    assert!(observer.unlock(false).await.unwrap().is_empty());
    let err = observer
        .lock(LockKind::Shared, Some("backup:main"), "backup")
        .await
        .expect_err("a second backup of the same cluster got the lock");
    assert_eq!(err.kind(), ErrorKind::Locked);
    lock.ensure_held().unwrap();
    holder.ensure_locks_held().unwrap();

    lock.release().await.unwrap();
    assert!(lock_keys(observer.storage().as_ref()).await.is_empty());
}

/// Decided behaviour: a holder whose refreshes keep failing stops trusting its lock one
/// refresh interval before others may call it stale (`LockTiming::holder_deadline`). From
/// then on `ensure_held` fails with a Locked-kind error, and the repository handle refuses to
/// write index files and manifests, so the run fails instead of committing data that a
/// process which removed the "stale" lock may have deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_cannot_refresh_its_lock_fails_before_others_may_call_it_stale() {
    let timing = LockTiming {
        refresh_every: Duration::from_millis(500),
        stale_after: Duration::from_secs(3),
    };
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), InitOptions::default())
        .await
        .unwrap();
    let faulty = Arc::new(Faulty::new(LocalStorage::new(dir.path()).unwrap()));
    let holder = Repository::open(faulty.clone(), None).await.unwrap();
    holder.set_lock_timing(timing).unwrap();
    let observer = Repository::open(local(dir.path()), None).await.unwrap();
    observer.set_lock_timing(timing).unwrap();

    let taken = Instant::now();
    let lock = holder
        .lock(LockKind::Shared, Some("backup:main"), "backup")
        .await
        .unwrap();
    // From now on every storage call of the holder fails, as with a store that went away.
    faulty.fail_after(faulty.calls(), SErr::Temporary);

    let lost_after = loop {
        if let Err(e) = lock.ensure_held() {
            assert_eq!(e.kind(), ErrorKind::Locked);
            assert!(e.to_string().contains(&lock.key()), "{e}");
            assert!(e.to_string().contains("HINT"), "{e}");
            break taken.elapsed();
        }
        assert!(
            taken.elapsed() < timing.stale_after,
            "the holder never gave up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // At that moment others still see a live lock: the holder stopped first.
    let seen = observer.list_locks().await.unwrap();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].stale,
        "others could call it stale before the holder gave up"
    );
    assert!(
        lost_after >= timing.holder_deadline() - Duration::from_millis(100),
        "gave up early, after {lost_after:?}"
    );
    assert!(faulty.injected() >= 2, "no refresh was attempted");

    // The store is back, but the run is over: no index file, no manifest.
    faulty.heal();
    let err = holder
        .save_manifest("main", "b1", &serde_json::json!({"label": "x"}))
        .await
        .expect_err("a manifest was saved after the lock was lost");
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    let w = holder.writer(WriterOptions::default());
    let w2 = w.clone();
    tokio::task::spawn_blocking(move || w2.ingest_bytes(&[7u8; 300_000]))
        .await
        .unwrap()
        .unwrap();
    let err = w
        .finish()
        .await
        .expect_err("an index file was written after the lock was lost");
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    assert!(observer.storage().list("index/").await.unwrap().is_empty());
    assert!(observer.list_manifests(None).await.unwrap().is_empty());

    // And the lock, not refreshed any more, turns stale for everyone else.
    tokio::time::sleep(
        timing.stale_after.saturating_sub(taken.elapsed()) + Duration::from_millis(300),
    )
    .await;
    assert!(observer.list_locks().await.unwrap()[0].stale);
    lock.release().await.unwrap();
    assert!(lock_keys(observer.storage().as_ref()).await.is_empty());
}

/// RELIABILITY row 24: a store whose clock runs an hour ahead of (or behind) this host's is
/// reported when a lock is taken, and does not make this host's own fresh lock look stale to
/// another process of this host, nor a conflicting lock be missed.
#[tokio::test]
async fn a_store_clock_an_hour_off_is_reported_and_locks_still_conflict() {
    let dir = tempfile::tempdir().unwrap();
    Repository::init(local(dir.path()), InitOptions::default())
        .await
        .unwrap();
    for offset in [3600i64, -3600] {
        let faulty = Arc::new(Faulty::new(LocalStorage::new(dir.path()).unwrap()));
        faulty.with_clock_offset(offset);
        let repo = Repository::open(faulty.clone(), None).await.unwrap();
        let lock = repo
            .lock(LockKind::Shared, Some("backup:main"), "backup")
            .await
            .unwrap();
        let skew = lock
            .store_clock_skew()
            .expect("skew reported")
            .num_seconds();
        assert!((skew - offset).abs() <= 2, "offset {offset}: found {skew}");
        // Judged by the same skewed store, the live lock is fresh and still conflicts.
        let e = repo
            .lock(LockKind::Shared, Some("backup:main"), "backup")
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
        lock.release().await.unwrap();
    }
    // An exact store clock: nothing to report.
    let repo = Repository::open(local(dir.path()), None).await.unwrap();
    let lock = repo.lock(LockKind::Shared, None, "check").await.unwrap();
    assert_eq!(lock.store_clock_skew(), None);
    lock.release().await.unwrap();
}

#[test]
fn clock_skew_allows_a_minute_around_the_write_and_signs_the_offset() {
    use chrono::{TimeDelta, TimeZone, Utc};
    let before = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
    let after = before + TimeDelta::seconds(2);
    let skew = |store| pgkeep_repo::clock_skew(before, after, store).map(|d| d.num_seconds());
    assert_eq!(skew(before + TimeDelta::seconds(1)), None);
    // Object stores truncate to whole seconds: a store second before the write is fine.
    assert_eq!(skew(before - TimeDelta::seconds(1)), None);
    assert_eq!(skew(after + TimeDelta::seconds(60)), None);
    assert_eq!(skew(after + TimeDelta::seconds(61)), Some(61));
    assert_eq!(skew(before - TimeDelta::seconds(3600)), Some(-3600));
}
