//! Garbage collection ([`Repository::prune`], invariant 3): what no manifest needs goes,
//! everything a kept manifest needs stays readable, on local disk and on SeaweedFS, whatever
//! interrupts it.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pgkeep_repo::{
    BlobId, CheckOptions, ChunkerParams, ErrorKind, InitOptions, LockKind, PruneOptions,
    PruneReport, Repository, StreamRef, WriterOptions,
};
use pgkeep_storage::conformance::pattern;
use pgkeep_storage::{LocalStorage, ObjectMeta, Storage};
use pgkeep_testing::s3::S3Server;

/// Small chunks (64..256 KiB) in 1 MiB packs, so a few MiB make many packs of many blobs.
fn small_packs() -> InitOptions {
    InitOptions {
        chunker: ChunkerParams {
            min: 64 << 10,
            avg: 128 << 10,
            max: 256 << 10,
            whole_pieces: true,
        },
        pack_size: 1 << 20,
        ..Default::default()
    }
}

fn no_grace() -> PruneOptions {
    PruneOptions {
        grace: Duration::ZERO,
        ..Default::default()
    }
}

fn local(dir: &std::path::Path) -> Arc<dyn Storage> {
    Arc::new(LocalStorage::new(dir).unwrap())
}

/// Ingests `data` (as a new version of `parent` when given) with one writer.
async fn ingest(repo: &Repository, data: &[u8], parent: Option<&StreamRef>) -> StreamRef {
    ingest_stats(repo, data, parent).await.0
}

async fn ingest_stats(
    repo: &Repository,
    data: &[u8],
    parent: Option<&StreamRef>,
) -> (StreamRef, pgkeep_repo::WriteStats) {
    let w = repo.writer(WriterOptions::default());
    let (w2, data, parent) = (w.clone(), data.to_vec(), parent.cloned());
    let s = tokio::task::spawn_blocking(move || {
        w2.ingest_reader_against(&mut &data[..], parent.as_ref())
    })
    .await
    .unwrap()
    .unwrap();
    (s, w.finish().await.unwrap())
}

async fn read(repo: &Repository, s: &StreamRef) -> pgkeep_repo::Result<Vec<u8>> {
    let mut out = Vec::new();
    repo.read_stream(s, &mut out).await?;
    Ok(out)
}

async fn save(repo: &Repository, id: &str, s: &StreamRef) {
    repo.save_manifest("main", id, &serde_json::json!({ "data": s }))
        .await
        .unwrap();
}

/// Prunes under the exclusive lock, as `expire` and `repo prune` do.
async fn prune(repo: &Repository, opts: PruneOptions) -> PruneReport {
    let lock = repo.lock(LockKind::Exclusive, None, "prune").await.unwrap();
    let r = repo.prune(&opts).await.unwrap();
    lock.release().await.unwrap();
    r
}

async fn keys(storage: &Arc<dyn Storage>, prefix: &str) -> HashSet<String> {
    let list = storage.list(prefix).await.unwrap();
    list.into_iter().map(|m| m.key).collect()
}

fn ids(streams: &[&StreamRef]) -> HashSet<BlobId> {
    streams
        .iter()
        .flat_map(|s| s.blobs.iter().map(|b| b.id))
        .collect()
}

/// What a user checks after a prune: a freshly opened repository passes `check --read-data`,
/// every kept backup reads back byte-identical, and the index holds exactly their blobs (and
/// `extra`, e.g. delta bases).
async fn assert_kept_exactly(
    storage: &Arc<dyn Storage>,
    kept: &[(&StreamRef, &[u8])],
    extra: usize,
) -> Repository {
    let repo = Repository::open(storage.clone(), None).await.unwrap();
    let report = repo.check(CheckOptions { read_data: true }).await.unwrap();
    assert!(report.is_ok(), "check after prune: {:?}", report.problems);
    for (s, data) in kept {
        let back = read(&repo, s).await.unwrap();
        assert!(back == *data, "a kept stream differs after prune");
    }
    let live = ids(&kept.iter().map(|k| k.0).collect::<Vec<_>>());
    assert!(live.iter().all(|id| repo.has_blob(id)));
    assert_eq!(repo.info().await.unwrap().blobs, live.len() + extra);
    repo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_after_deleting_manifests_removes_exactly_the_unreachable_blobs() {
    let dir = tempfile::tempdir().unwrap();
    removes_exactly_the_unreachable_blobs(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_seaweedfs_prune_after_deleting_manifests_removes_exactly_the_unreachable_blobs() {
    let server = S3Server::start().await.unwrap();
    removes_exactly_the_unreachable_blobs(server.storage()).await;
}

/// Three backups, the third sharing half of the first; the first two are deleted.
async fn removes_exactly_the_unreachable_blobs(storage: Arc<dyn Storage>) {
    let repo = Repository::init(storage.clone(), small_packs())
        .await
        .unwrap();
    let a = pattern(4 << 20, 1).to_vec();
    let b = pattern(3 << 20, 2).to_vec();
    let mut c = a[..2 << 20].to_vec();
    c.extend_from_slice(&pattern(2 << 20, 3));
    let (sa, sb) = (ingest(&repo, &a, None).await, ingest(&repo, &b, None).await);
    let sc = ingest(&repo, &c, None).await;
    for (id, s) in [("a", &sa), ("b", &sb), ("c", &sc)] {
        save(&repo, id, s).await;
    }
    let before = repo.info().await.unwrap();

    // Without the exclusive lock prune refuses, and removes nothing.
    let err = repo.prune(&no_grace()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    let shared = repo.lock(LockKind::Shared, None, "backup").await.unwrap();
    assert!(repo.prune(&no_grace()).await.is_err());
    shared.release().await.unwrap();
    assert_eq!(repo.info().await.unwrap().blobs, before.blobs);

    repo.delete_manifest("main", "a").await.unwrap();
    repo.delete_manifest("main", "b").await.unwrap();
    let dead = ids(&[&sa, &sb]).difference(&ids(&[&sc])).count();
    let dry = prune(
        &repo,
        PruneOptions {
            dry_run: true,
            ..no_grace()
        },
    )
    .await;
    assert_eq!(dry.blobs_removed, dead as u64);
    assert_eq!(repo.info().await.unwrap().blobs, before.blobs, "dry run");

    let r = prune(&repo, no_grace()).await;
    assert_eq!(r.manifests, 1);
    assert_eq!(r.blobs_removed, dead as u64, "{r}");
    assert_eq!(r.blobs_live, ids(&[&sc]).len() as u64);
    assert!(r.packs_removed > 0 && r.bytes_after < r.bytes_before, "{r}");
    assert_eq!(
        (dry.packs_removed, dry.packs_repacked),
        (r.packs_removed, r.packs_repacked)
    );
    let reopened = assert_kept_exactly(&storage, &[(&sc, &c)], 0).await;
    // The deleted backups are gone for good: their own blobs are no longer indexed.
    assert!(read(&reopened, &sb).await.is_err());
    // Stored bytes now are about the live data (random data: stored ~ raw).
    let stored: u64 = storage
        .list("packs/")
        .await
        .unwrap()
        .iter()
        .map(|m| m.size)
        .sum();
    assert_eq!(stored, r.bytes_after);
    assert!(stored < (c.len() as u64) * 21 / 20, "{stored} bytes kept");

    // A second run finds nothing to do and writes nothing.
    let index_before = keys(&storage, "index/").await;
    let again = prune(&reopened, no_grace()).await;
    assert_eq!(
        (
            again.blobs_removed,
            again.packs_removed,
            again.index_files_written
        ),
        (0, 0, 0),
        "{again}"
    );
    assert_eq!(keys(&storage, "index/").await, index_before);

    // Deleting the last backup empties the repository of packs.
    reopened.delete_manifest("main", "c").await.unwrap();
    let last = prune(&reopened, no_grace()).await;
    assert_eq!(last.blobs_live, 0);
    assert!(keys(&storage, "packs/").await.is_empty());
    assert_kept_exactly(&storage, &[], 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_used_pack_is_repacked_above_the_threshold_and_not_below() {
    let dir = tempfile::tempdir().unwrap();
    repack_above_threshold_only(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_seaweedfs_a_partly_used_pack_is_repacked_above_the_threshold_and_not_below() {
    let server = S3Server::start().await.unwrap();
    repack_above_threshold_only(server.storage()).await;
}

/// One pack holds a kept stream (~880 KiB) and a deleted one (~110 KiB): about 11% of it is
/// unused. At 20% it stays as it is; at 5% its live blobs move to a new pack and it goes.
async fn repack_above_threshold_only(storage: Arc<dyn Storage>) {
    let repo = Repository::init(storage.clone(), small_packs())
        .await
        .unwrap();
    let keep = pattern(880 << 10, 11).to_vec();
    let drop = pattern(110 << 10, 12).to_vec();
    let w = repo.writer(WriterOptions::default());
    let (w2, k2, d2) = (w.clone(), keep.clone(), drop.clone());
    let (sk, sd) = tokio::task::spawn_blocking(move || {
        (w2.ingest_bytes(&k2).unwrap(), w2.ingest_bytes(&d2).unwrap())
    })
    .await
    .unwrap();
    w.finish().await.unwrap();
    let packs = keys(&storage, "packs/").await;
    assert_eq!(packs.len(), 1, "both streams in one pack");
    save(&repo, "keep", &sk).await;
    save(&repo, "drop", &sd).await;
    repo.delete_manifest("main", "drop").await.unwrap();

    let lenient = prune(
        &repo,
        PruneOptions {
            max_unused: 0.2,
            ..no_grace()
        },
    )
    .await;
    assert_eq!(lenient.packs_repacked, 0, "{lenient}");
    assert_eq!(lenient.packs_removed, 0, "{lenient}");
    assert_eq!(lenient.blobs_removed, sd.blobs.len() as u64);
    assert_eq!(
        keys(&storage, "packs/").await,
        packs,
        "the pack stays as it is"
    );
    assert_kept_exactly(&storage, &[(&sk, &keep)], 0).await;

    let strict = prune(
        &repo,
        PruneOptions {
            max_unused: 0.05,
            ..no_grace()
        },
    )
    .await;
    assert_eq!(
        (
            strict.packs_repacked,
            strict.packs_removed,
            strict.blobs_removed
        ),
        (1, 1, 0),
        "{strict}"
    );
    let now = keys(&storage, "packs/").await;
    assert_eq!(now.len(), 1);
    assert!(now.is_disjoint(&packs), "the old pack is replaced");
    assert!(strict.bytes_after < strict.bytes_before);
    assert!(strict.bytes_repacked >= keep.len() as u64);
    assert_kept_exactly(&storage, &[(&sk, &keep)], 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_bases_of_a_kept_backup_stay_when_the_backup_that_stored_them_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    delta_bases_stay(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_seaweedfs_delta_bases_of_a_kept_backup_stay() {
    let server = S3Server::start().await.unwrap();
    delta_bases_stay(server.storage()).await;
}

/// `data` with one byte in every 64 KiB changed: every chunk differs a little, so the new
/// version is stored as deltas against the old one's chunks.
fn edited(data: &[u8], seed: u8) -> Vec<u8> {
    let mut v = data.to_vec();
    for i in (0..v.len()).step_by(64 << 10) {
        v[i] ^= seed;
    }
    v
}

/// v2 is stored as deltas against v1; v1's manifest is deleted. Every base v2 needs stays,
/// in a pack that is not repacked away; deleting v2 too leaves nothing.
async fn delta_bases_stay(storage: Arc<dyn Storage>) {
    let repo = Repository::init(storage.clone(), InitOptions::default())
        .await
        .unwrap();
    let v1 = pattern(8 << 20, 21).to_vec();
    let v2 = edited(&v1, 0x5a);
    let s1 = ingest(&repo, &v1, None).await;
    let (s2, st2) = ingest_stats(&repo, &v2, Some(&s1)).await;
    assert_eq!(
        st2.blobs_delta,
        s2.blobs.len() as u64,
        "v2 is stored as deltas"
    );
    save(&repo, "v1", &s1).await;
    save(&repo, "v2", &s2).await;
    assert!(
        s2.blobs.iter().all(|b| !s1.blobs.contains(b)),
        "every chunk changed"
    );
    let stored = keys(&storage, "packs/").await;

    repo.delete_manifest("main", "v1").await.unwrap();
    let r = prune(&repo, no_grace()).await;
    // Every chunk of v1 is a base of v2's delta at the same place: nothing may go.
    assert_eq!(r.blobs_removed, 0, "{r}");
    assert_eq!(r.blobs_live, (s1.blobs.len() + s2.blobs.len()) as u64);
    assert_eq!(keys(&storage, "packs/").await, stored);
    // v2 reads back (its deltas decode with their bases), check passes, and the index holds
    // v2's blobs and v1's as bases.
    assert_kept_exactly(&storage, &[(&s2, &v2)], s1.blobs.len()).await;

    repo.delete_manifest("main", "v2").await.unwrap();
    let r = prune(&repo, no_grace()).await;
    assert_eq!(
        r.blobs_removed,
        (s1.blobs.len() + s2.blobs.len()) as u64,
        "{r}"
    );
    assert!(keys(&storage, "packs/").await.is_empty());
}

/// A storage whose listings report chosen objects as two days old, as a store would for
/// packs written the day before yesterday.
#[derive(Debug)]
struct Aged {
    inner: Arc<dyn Storage>,
    old: Mutex<HashSet<String>>,
}

impl Aged {
    fn age(&self, keys: impl IntoIterator<Item = String>) {
        self.old.lock().unwrap().extend(keys);
    }

    fn shift(&self, mut m: ObjectMeta) -> ObjectMeta {
        if self.old.lock().unwrap().contains(&m.key) {
            m.last_modified -= chrono::TimeDelta::days(2);
        }
        m
    }
}

#[async_trait]
impl Storage for Aged {
    async fn get(&self, key: &str) -> pgkeep_storage::Result<Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> pgkeep_storage::Result<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn put(&self, key: &str, data: Bytes) -> pgkeep_storage::Result<()> {
        self.inner.put(key, data).await
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> pgkeep_storage::Result<()> {
        self.inner.put_if_absent(key, data).await
    }
    async fn list(&self, prefix: &str) -> pgkeep_storage::Result<Vec<ObjectMeta>> {
        let list = self.inner.list(prefix).await?;
        Ok(list.into_iter().map(|m| self.shift(m)).collect())
    }
    async fn head(&self, key: &str) -> pgkeep_storage::Result<ObjectMeta> {
        self.inner.head(key).await.map(|m| self.shift(m))
    }
    async fn delete(&self, key: &str) -> pgkeep_storage::Result<()> {
        self.inner.delete(key).await
    }
    fn location(&self) -> String {
        self.inner.location()
    }
}

/// Ingests `data` and deletes the index files its writer wrote, as a writer killed (or still
/// running on another host) leaves its packs: stored, in no index. Returns the packs.
async fn unindexed(repo: &Repository, storage: &Arc<dyn Storage>, data: &[u8]) -> HashSet<String> {
    let (packs, index) = (keys(storage, "packs/").await, keys(storage, "index/").await);
    ingest(repo, data, None).await;
    for k in keys(storage, "index/").await.difference(&index) {
        storage.delete(k).await.unwrap();
    }
    keys(storage, "packs/")
        .await
        .difference(&packs)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packs_younger_than_the_grace_period_stay_and_older_unindexed_ones_go() {
    let dir = tempfile::tempdir().unwrap();
    grace_period(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_seaweedfs_packs_younger_than_the_grace_period_stay_and_older_unindexed_ones_go() {
    let server = S3Server::start().await.unwrap();
    grace_period(server.storage()).await;
}

/// With the default 24 h grace: an unindexed pack of two days ago goes, a fresh one stays,
/// and so do the blobs of a fresh indexed pack that no manifest names (yet). Two days later
/// both go.
async fn grace_period(inner: Arc<dyn Storage>) {
    let aged = Arc::new(Aged {
        inner,
        old: Mutex::default(),
    });
    let storage: Arc<dyn Storage> = aged.clone();
    let repo = Repository::init(storage.clone(), small_packs())
        .await
        .unwrap();
    let k = pattern(2 << 20, 31).to_vec();
    let sk = ingest(&repo, &k, None).await;
    save(&repo, "k", &sk).await;
    aged.age(keys(&storage, "packs/").await);
    let old_orphans = unindexed(&repo, &storage, &pattern(1 << 20, 32)).await;
    aged.age(old_orphans.clone());
    let young_orphans = unindexed(&repo, &storage, &pattern(1 << 20, 33)).await;
    let d = pattern(1 << 20, 34).to_vec();
    let sd = ingest(&repo, &d, None).await;
    assert!(!old_orphans.is_empty() && !young_orphans.is_empty());

    let repo = Repository::open(storage.clone(), None).await.unwrap();
    let r = prune(&repo, PruneOptions::default()).await;
    assert_eq!(r.unindexed_packs_removed, old_orphans.len() as u64, "{r}");
    assert_eq!(r.unindexed_packs_kept, young_orphans.len() as u64, "{r}");
    assert_eq!(r.blobs_removed, 0, "{r}");
    let now = keys(&storage, "packs/").await;
    assert!(now.is_disjoint(&old_orphans));
    assert!(now.is_superset(&young_orphans));
    // The fresh, unreferenced stream stays indexed: its manifest may be on its way.
    let reopened = assert_kept_exactly(&storage, &[(&sk, &k)], sd.blobs.len()).await;
    assert_eq!(read(&reopened, &sd).await.unwrap(), d);

    aged.age(keys(&storage, "packs/").await);
    let r = prune(&reopened, PruneOptions::default()).await;
    assert_eq!(r.unindexed_packs_removed, young_orphans.len() as u64, "{r}");
    assert_eq!(r.blobs_removed, sd.blobs.len() as u64, "{r}");
    assert_kept_exactly(&storage, &[(&sk, &k)], 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_on_another_handle_loses_nothing_to_a_concurrent_prune() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_writer(local(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_seaweedfs_a_writer_on_another_handle_loses_nothing_to_a_concurrent_prune() {
    let server = S3Server::start().await.unwrap();
    concurrent_writer(server.storage()).await;
}

/// Takes a lock, waiting while another process holds a conflicting one.
async fn lock_waiting(repo: &Repository, kind: LockKind) -> pgkeep_repo::RepoLock {
    for _ in 0..1000 {
        match repo.lock(kind, Some("backup:main"), "test").await {
            Ok(l) => return l,
            Err(e) if e.kind() == ErrorKind::Locked => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    panic!("lock not obtained in 20 s");
}

/// A backup on a second handle, under its shared lock, and a prune under the exclusive lock,
/// started at once: one waits for the other, and nothing is lost. Then a writer that lost
/// its lock (committed its index, not yet its manifest) while the prune ran: its fresh pack
/// is within the grace period, so its blobs stay and its manifest is complete. Without the
/// grace period the same writer's backup would be damaged, which `check` sees.
async fn concurrent_writer(storage: Arc<dyn Storage>) {
    let repo = Repository::init(storage.clone(), small_packs())
        .await
        .unwrap();
    let base = pattern(2 << 20, 41).to_vec();
    let sbase = ingest(&repo, &base, None).await;
    save(&repo, "base", &sbase).await;
    let sold = ingest(&repo, &pattern(2 << 20, 42), None).await;
    save(&repo, "old", &sold).await;
    repo.delete_manifest("main", "old").await.unwrap();

    let writer = Repository::open(storage.clone(), None).await.unwrap();
    let held = writer
        .lock(LockKind::Shared, Some("backup:main"), "backup")
        .await
        .unwrap();
    let err = repo
        .lock(LockKind::Exclusive, None, "prune")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Locked, "{err}");
    held.release().await.unwrap();

    let new = pattern(3 << 20, 43).to_vec();
    let order = AtomicUsize::new(0);
    let backup = async {
        let l = lock_waiting(&writer, LockKind::Shared).await;
        // A writer reads the index again once it holds its lock if a prune ran meanwhile.
        writer.reload_index_if_changed().await.unwrap();
        let s = ingest(&writer, &new, None).await;
        save(&writer, "new", &s).await;
        l.release().await.unwrap();
        (s, order.fetch_add(1, Ordering::SeqCst))
    };
    let gc = async {
        let l = lock_waiting(&repo, LockKind::Exclusive).await;
        let r = repo.prune(&no_grace()).await.unwrap();
        l.release().await.unwrap();
        (r, order.fetch_add(1, Ordering::SeqCst))
    };
    let ((snew, backup_done), (r, gc_done)) = tokio::join!(backup, gc);
    assert_eq!(r.blobs_removed, sold.blobs.len() as u64, "{r}");
    assert_kept_exactly(&storage, &[(&sbase, &base), (&snew, &new)], 0).await;
    // The pruning handle wrote the index itself, so it has nothing to reload unless the
    // backup saved its index after the prune (the lock order is up to the scheduler).
    assert_eq!(
        repo.reload_index_if_changed().await.unwrap(),
        backup_done > gc_done
    );
    assert!(!repo.reload_index_if_changed().await.unwrap());
    // A handle opened before a prune sees that the index files changed, and reloads.
    let stale = Repository::open(storage.clone(), None).await.unwrap();
    assert!(stale.has_blob(&snew.blobs[0].id));
    repo.delete_manifest("main", "new").await.unwrap();
    prune(&repo, no_grace()).await;
    assert!(stale.has_blob(&snew.blobs[0].id), "stale until reloaded");
    assert!(stale.reload_index_if_changed().await.unwrap());
    assert!(!stale.has_blob(&snew.blobs[0].id));
    assert!(!stale.reload_index_if_changed().await.unwrap());
    let snew = ingest(&repo, &new, None).await;
    save(&repo, "new", &snew).await;

    let late = pattern(1 << 20, 44).to_vec();
    let writer = Repository::open(storage.clone(), None).await.unwrap();
    let slate = ingest(&writer, &late, None).await;
    let r = prune(&repo, PruneOptions::default()).await;
    assert_eq!(r.blobs_removed, 0, "{r}");
    save(&writer, "late", &slate).await;
    assert_kept_exactly(
        &storage,
        &[(&sbase, &base), (&snew, &new), (&slate, &late)],
        0,
    )
    .await;

    let lost = pattern(1 << 20, 45).to_vec();
    let slost = ingest(&writer, &lost, None).await;
    let r = prune(&repo, no_grace()).await;
    assert_eq!(r.blobs_removed, slost.blobs.len() as u64, "{r}");
    save(&writer, "lost", &slost).await;
    let fresh = Repository::open(storage.clone(), None).await.unwrap();
    let check = fresh.check(CheckOptions::default()).await.unwrap();
    assert_eq!(check.damaged_manifests, vec!["main/lost".to_string()]);
}

/// Set in the child of a crash loop: the repository URL to prune.
const CHILD_URL: &str = "PGKEEP_GC_TEST_CHILD_URL";
/// Set with [`CHILD_URL`] for an encrypted repository.
const CHILD_PASSPHRASE: &str = "PGKEEP_GC_TEST_CHILD_PASSPHRASE";

/// The child of a crash loop: opens the repository through `open_storage` (which applies the
/// SIGKILL hook of `PGKEEP_TEST_KILL_AFTER_OPS`) and prunes it under the exclusive lock.
async fn crash_child(url: &str) {
    let opts = pgkeep_storage::StorageOptions {
        endpoint: std::env::var("AWS_ENDPOINT").ok(),
        force_path_style: Some(true),
        allow_http: true,
        ..Default::default()
    };
    let storage = pgkeep_storage::open_storage(url, &opts).unwrap();
    let pass = std::env::var(CHILD_PASSPHRASE).ok();
    let repo = Repository::open(storage, pass.as_deref()).await.unwrap();
    prune(&repo, no_grace()).await;
    std::process::exit(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_killed_after_every_storage_write_leaves_every_kept_backup_readable() {
    if let Ok(url) = std::env::var(CHILD_URL) {
        return crash_child(&url).await;
    }
    let root = tempfile::tempdir().unwrap();
    let place = |n: &str| {
        let dir = root.path().join(n);
        std::fs::create_dir_all(&dir).unwrap();
        (local(&dir), dir.to_str().unwrap().to_string())
    };
    crash_loop(
        place,
        "prune_killed_after_every_storage_write_leaves_every_kept_backup_readable",
        None,
        vec![],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_seaweedfs_prune_killed_after_every_storage_write_leaves_every_kept_backup_readable() {
    if let Ok(url) = std::env::var(CHILD_URL) {
        return crash_child(&url).await;
    }
    let server = S3Server::start().await.unwrap();
    let base = pgkeep_testing::s3::unique_prefix("gc-crash");
    let place = |n: &str| {
        let prefix = format!("{base}-{n}");
        (server.storage_with_prefix(&prefix), server.url(&prefix))
    };
    crash_loop(
        place,
        "on_seaweedfs_prune_killed_after_every_storage_write_leaves_every_kept_backup_readable",
        Some("pw"),
        server.env(),
    )
    .await;
}

/// Copies every object of `from` into `to`.
async fn copy_all(from: &Arc<dyn Storage>, to: &Arc<dyn Storage>) {
    for m in from.list("").await.unwrap() {
        to.put(&m.key, from.get(&m.key).await.unwrap())
            .await
            .unwrap();
    }
}

/// A freshly opened repository passes `check --read-data` and every kept backup reads back
/// byte-identical.
async fn assert_readable(
    storage: &Arc<dyn Storage>,
    passphrase: Option<&str>,
    kept: &[(&StreamRef, &[u8])],
    when: &str,
) -> Repository {
    let repo = Repository::open(storage.clone(), passphrase).await.unwrap();
    let report = repo.check(CheckOptions { read_data: true }).await.unwrap();
    assert!(report.is_ok(), "{when}: {:?}", report.problems);
    for (s, data) in kept {
        let back = read(&repo, s).await.unwrap();
        assert!(back == *data, "{when}: a kept backup differs");
    }
    repo
}

/// From one starting repository, copied afresh each time, kills a prune (SIGKILL, in a
/// child process) after its 0th, 1st, 2nd, ... storage write until a run completes. After
/// every kill a freshly opened repository passes `check --read-data` and every kept backup
/// reads back byte-identical; a rerun then completes, after which the index holds exactly
/// the kept backups' blobs, no unindexed pack is left and a further run finds nothing to do.
/// The prune has everything to do: packs to remove, a pack to repack, an unindexed pack to
/// remove, the index to rewrite. `place(name)` gives a fresh storage and its URL.
async fn crash_loop(
    place: impl Fn(&str) -> (Arc<dyn Storage>, String),
    test_name: &str,
    passphrase: Option<&str>,
    env: Vec<(String, String)>,
) {
    use std::os::unix::process::ExitStatusExt;
    let (storage, _) = place("start");
    let opts = InitOptions {
        passphrase: passphrase.map(str::to_owned),
        kdf: pgkeep_repo::KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        },
        ..small_packs()
    };
    let repo = Repository::init(storage.clone(), opts).await.unwrap();
    let a = pattern(3 << 20, 51).to_vec();
    let mut c = a[..(3 << 20) / 2].to_vec();
    c.extend_from_slice(&pattern(1 << 20, 52));
    let d = pattern(1 << 20, 53).to_vec();
    let (sa, sc, sd) = (
        ingest(&repo, &a, None).await,
        ingest(&repo, &c, None).await,
        ingest(&repo, &d, None).await,
    );
    let sb = ingest(&repo, &pattern(2 << 20, 55), None).await;
    for (id, s) in [("a", &sa), ("b", &sb), ("c", &sc), ("d", &sd)] {
        save(&repo, id, s).await;
    }
    unindexed(&repo, &storage, &pattern(1 << 20, 54)).await;
    repo.delete_manifest("main", "a").await.unwrap();
    repo.delete_manifest("main", "b").await.unwrap();
    let kept: [(&StreamRef, &[u8]); 2] = [(&sc, &c), (&sd, &d)];
    let plan = prune(
        &repo,
        PruneOptions {
            dry_run: true,
            ..no_grace()
        },
    )
    .await;
    assert!(
        plan.packs_repacked >= 1 && plan.packs_removed > plan.packs_repacked,
        "{plan}"
    );
    assert_eq!(plan.unindexed_packs_removed, 1, "{plan}");
    // Lock, clock probe (2), a new pack, an index file, the old index files (one per
    // writer: 4), the packs removed, the lock's release.
    let writes = 1 + 2 + 1 + 1 + 4 + plan.packs_removed + plan.unindexed_packs_removed + 1;

    let mut kills = 0;
    for n in 0u64.. {
        assert!(n < 300, "the prune never completed");
        let (copy, url) = place(&format!("kill-{n}"));
        copy_all(&storage, &copy).await;
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test_name, "--nocapture"])
            .env(CHILD_URL, &url)
            .envs(passphrase.map(|p| (CHILD_PASSPHRASE, p)))
            .envs(env.iter().cloned())
            .env(pgkeep_storage::KILL_AFTER_OPS_ENV, n.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        let when = format!("killed after {n} writes");
        let repo = assert_readable(&copy, passphrase, &kept, &when).await;
        if status.success() {
            break;
        }
        assert_eq!(status.signal(), Some(libc::SIGKILL), "n={n}: {status:?}");
        kills += 1;
        let rerun = prune(&repo, no_grace()).await;
        assert_eq!(rerun.manifests, 2, "{when}: {rerun}");
        let repo = assert_readable(&copy, passphrase, &kept, &format!("rerun {when}")).await;
        let live = ids(&[&sc, &sd]);
        assert_eq!(repo.info().await.unwrap().blobs, live.len(), "{when}");
        let report = repo.check(CheckOptions::default()).await.unwrap();
        assert!(
            report
                .warnings
                .iter()
                .all(|w| !w.contains("not in any index")),
            "{when}: {:?}",
            report.warnings
        );
        let again = prune(&repo, no_grace()).await;
        assert_eq!(
            (
                again.blobs_removed,
                again.packs_removed,
                again.index_files_written
            ),
            (0, 0, 0),
            "{when}: {again}"
        );
    }
    assert!(
        kills >= writes,
        "{kills} kills, expected at least {writes}: the prune wrote too little"
    );
}

/// Set in the child of the memory test: the repository directory.
const MEMORY_CHILD_DIR: &str = "PGKEEP_GC_TEST_MEMORY_CHILD_DIR";

/// Peak resident memory of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A repository of two million blobs (in 20 000 packs of 100) whose one backup references
/// half of them: prune, from a handle opened without its index as `expire` does, keeps its
/// peak memory well under 300 MiB (measured in a child process of its own). The packs are
/// stand-ins of the indexed sizes (prune reads no pack it keeps or removes whole), half of
/// them already gone; the manifest alone is 90 MiB of JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_of_two_million_blobs_stays_well_under_300_mib() {
    if let Ok(dir) = std::env::var(MEMORY_CHILD_DIR) {
        let repo = Repository::open_metadata_only(local(std::path::Path::new(&dir)), None)
            .await
            .unwrap();
        let r = prune(&repo, no_grace()).await;
        println!("REPORT {}", serde_json::to_string(&r).unwrap());
        println!("PEAK {}", peak_rss());
        std::process::exit(0);
    }
    use std::fmt::Write;
    let dir = tempfile::tempdir().unwrap();
    let storage = local(dir.path());
    let repo = Repository::init(storage.clone(), InitOptions::default())
        .await
        .unwrap();
    const PACKS: u32 = 20_000;
    const PER_PACK: u32 = 100;
    let blob = |p: u32, b: u32| {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&p.to_le_bytes());
        id[4..8].copy_from_slice(&b.to_le_bytes());
        pgkeep_repo::Id(id)
    };
    let pack_id = |p: u32| {
        let mut id = [0xa5u8; 32];
        id[..4].copy_from_slice(&p.to_le_bytes());
        pgkeep_repo::Id(id)
    };
    let pack_size = (PER_PACK * 10 + 100) as u64;
    let mut manifest = String::from(r#"{"data":{"size":0,"blobs":["#);
    for file in 0..PACKS / 1000 {
        let mut packs = Vec::new();
        for p in file * 1000..(file + 1) * 1000 {
            let blobs: Vec<serde_json::Value> = (0..PER_PACK)
                .map(|b| {
                    serde_json::json!({"id": blob(p, b).to_hex(), "offset": b * 10, "length": 10, "raw_length": 10})
                })
                .collect();
            packs.push(
                serde_json::json!({"id": pack_id(p).to_hex(), "size": pack_size, "blobs": blobs}),
            );
            // Even packs exist and their blobs are live; odd ones are gone and dead.
            if p % 2 == 0 {
                let hex = pack_id(p).to_hex();
                let d = dir.path().join("packs").join(&hex[..2]);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(d.join(&hex), vec![0u8; pack_size as usize]).unwrap();
                for b in 0..PER_PACK {
                    if p > 0 || b > 0 {
                        manifest.push(',');
                    }
                    write!(manifest, r#"{{"id":"{}","len":10}}"#, blob(p, b).to_hex()).unwrap();
                }
            }
        }
        let json = serde_json::to_vec(&serde_json::json!({"version": 1, "packs": packs})).unwrap();
        let z = zstd::bulk::compress(&json, 3).unwrap();
        let sealed = repo.sealer().seal_meta(b"pgkeep-index", &z);
        let key = format!("index/{}", blake3::hash(&sealed).to_hex());
        storage.put(&key, sealed.into()).await.unwrap();
    }
    manifest.push_str("]}}");
    repo.put_sealed_if_absent("backups/main/big", b"backups/main/big", manifest.as_bytes())
        .await
        .unwrap();
    drop(manifest);

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "prune_of_two_million_blobs_stays_well_under_300_mib",
            "--nocapture",
        ])
        .env(MEMORY_CHILD_DIR, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .to_string()
    };
    let report: serde_json::Value = serde_json::from_str(&field("REPORT ")).unwrap();
    let half = (PACKS * PER_PACK / 2) as u64;
    assert_eq!(report["blobs_live"], half);
    assert_eq!(report["blobs_removed"], half);
    let peak: u64 = field("PEAK ").trim().parse().unwrap();
    eprintln!("peak resident memory of the prune: {} MiB", peak >> 20);
    assert!(peak < 200 << 20, "prune peaked at {} MiB", peak >> 20);
}
