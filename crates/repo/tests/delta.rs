//! Delta blobs (invariant 8): a new version of a stream whose chunks all changed a little is
//! stored as deltas against the old version's chunks, reads back byte-identical, survives an
//! index rebuilt from the packs, never chains deltas, and a lost base is reported by `check`
//! for every backup that needs it.

use std::collections::HashSet;
use std::sync::Arc;

use pgkeep_repo::{CheckOptions, InitOptions, LockKind, Repository, StreamRef, WriterOptions};
use pgkeep_storage::conformance::pattern;
use pgkeep_storage::{LocalStorage, Storage};
use pgkeep_testing::s3::S3Server;

/// Ingests `data` as a new version of `parent`; returns the stream and the writer's figures.
async fn ingest(
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

async fn packs(storage: &Arc<dyn Storage>) -> HashSet<String> {
    let list = storage.list("packs/").await.unwrap();
    list.into_iter().map(|m| m.key).collect()
}

/// `data` with one byte in every 64 KiB changed and 1000 bytes inserted at a third: every
/// 1 MiB chunk differs, so deduplication alone stores it all again.
fn edited(data: &[u8], seed: u8) -> Vec<u8> {
    let mut v = data.to_vec();
    for i in (0..v.len()).step_by(64 << 10) {
        v[i] ^= seed;
    }
    let at = v.len() / 3;
    v.splice(at..at, std::iter::repeat_n(seed, 1000));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_every_chunk_changed_a_little_is_stored_as_small_deltas() {
    let dir = tempfile::tempdir().unwrap();
    small_deltas_read_back_and_lost_bases_are_reported(Arc::new(
        LocalStorage::new(dir.path()).unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_seaweedfs_deltas_read_back_and_lost_bases_are_reported() {
    let server = S3Server::start().await.unwrap();
    small_deltas_read_back_and_lost_bases_are_reported(server.storage()).await;
}

async fn small_deltas_read_back_and_lost_bases_are_reported(storage: Arc<dyn Storage>) {
    let repo = Repository::init(storage.clone(), InitOptions::default())
        .await
        .unwrap();
    // Random data: nothing but a delta can make a changed chunk small.
    let v1 = pattern(12 << 20, 7).to_vec();
    let v2 = edited(&v1, 0x5a);
    let v3 = edited(&v2, 0x33);

    let (s1, st1) = ingest(&repo, &v1, None).await;
    assert_eq!(st1.blobs_delta, 0);
    repo.save_manifest("main", "v1", &serde_json::json!({ "data": s1 }))
        .await
        .unwrap();
    let packs_v1 = packs(&storage).await;

    let (s2, st2) = ingest(&repo, &v2, Some(&s1)).await;
    assert_eq!(
        st2.blobs_dedup, 0,
        "the edit left a chunk unchanged: {st2:?}"
    );
    assert_eq!(st2.blobs_delta, st2.blobs_new, "{st2:?}");
    assert!(
        st2.stored_bytes < v2.len() as u64 / 20,
        "v2 took {} bytes for {} new: {st2:?}",
        st2.stored_bytes,
        v2.len()
    );
    repo.save_manifest("main", "v2", &serde_json::json!({ "data": s2 }))
        .await
        .unwrap();
    // A version of a version: its bases are v1's full blobs, never v2's deltas.
    let (s3, st3) = ingest(&repo, &v3, Some(&s2)).await;
    assert!(st3.blobs_delta > 0, "{st3:?}");
    assert!(st3.stored_bytes < v3.len() as u64 / 10, "{st3:?}");
    repo.save_manifest("main", "v3", &serde_json::json!({ "data": s3 }))
        .await
        .unwrap();

    let repo = Repository::open(storage.clone(), None).await.unwrap();
    assert_eq!(read(&repo, &s1).await.unwrap(), v1);
    assert_eq!(read(&repo, &s2).await.unwrap(), v2);
    assert_eq!(read(&repo, &s3).await.unwrap(), v3);
    let report = repo.check(CheckOptions { read_data: true }).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);

    // The index rebuilt from the pack headers alone knows every delta's bases.
    for m in storage.list("index/").await.unwrap() {
        storage.delete(&m.key).await.unwrap();
    }
    let repo = Repository::open(storage.clone(), None).await.unwrap();
    let lock = repo
        .lock(LockKind::Exclusive, None, "repo repair-index")
        .await
        .unwrap();
    repo.repair_index().await.unwrap();
    lock.release().await.unwrap();
    let repo = Repository::open(storage.clone(), None).await.unwrap();
    assert_eq!(read(&repo, &s2).await.unwrap(), v2);
    assert_eq!(read(&repo, &s3).await.unwrap(), v3);
    assert!(repo
        .check(CheckOptions { read_data: true })
        .await
        .unwrap()
        .is_ok());

    // Losing v1's packs loses the bases of v2 and v3, though none of their own packs is
    // touched: check says so without reading data, and reading them fails.
    for k in &packs_v1 {
        storage.delete(k).await.unwrap();
    }
    let repo = Repository::open(storage.clone(), None).await.unwrap();
    let report = repo.check(CheckOptions::default()).await.unwrap();
    assert_eq!(
        report.damaged_manifests,
        ["main/v1", "main/v2", "main/v3"],
        "{:?}",
        report.problems
    );
    let named = report
        .problems
        .iter()
        .find(|p| p.object.contains("v2"))
        .expect("v2 not named");
    assert!(
        named.message.contains("whose delta base is"),
        "{}",
        named.message
    );
    // As for any blob of a missing pack, the error names the pack.
    let err = read(&repo, &s2).await.unwrap_err().to_string();
    assert!(packs_v1.iter().any(|k| err.contains(k.as_str())), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrelated_data_against_a_parent_is_stored_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let repo = Repository::init(storage.clone(), InitOptions::default())
        .await
        .unwrap();
    let a = pattern(4 << 20, 1).to_vec();
    let b = pattern(4 << 20, 2).to_vec();
    let (sa, _) = ingest(&repo, &a, None).await;
    let (sb, st) = ingest(&repo, &b, Some(&sa)).await;
    // No delta halves a chunk of other random data: stored in full, as without a parent.
    assert_eq!(st.blobs_delta, 0, "{st:?}");
    assert_eq!(read(&repo, &sb).await.unwrap(), b);
}
