//! Garbage collection ([`Repository::prune`], invariant 3): what no manifest needs goes,
//! everything a kept manifest needs stays readable, on local disk and on SeaweedFS, whatever
//! interrupts it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use pgkeep_repo::{
    BlobId, CheckOptions, ChunkerParams, ErrorKind, InitOptions, LockKind, PruneOptions,
    PruneReport, Repository, StreamRef, WriterOptions,
};
use pgkeep_storage::conformance::pattern;
use pgkeep_storage::{LocalStorage, Storage};
use pgkeep_testing::s3::S3Server;

/// Small chunks (64..256 KiB) in 1 MiB packs, so a few MiB make many packs of many blobs.
fn small_packs() -> InitOptions {
    InitOptions {
        chunker: ChunkerParams {
            min: 64 << 10,
            avg: 128 << 10,
            max: 256 << 10,
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
