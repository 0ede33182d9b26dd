//! A corrupted or deleted index file (RELIABILITY row 13): the repository still opens, `check`
//! names the damaged file and the backups it leaves unreadable, `repair_index` rebuilds the
//! index from the pack headers, and every backup restores again. A repair interrupted before
//! it removed the damaged file leaves a usable repository, and a rerun finishes it.

use std::sync::Arc;

use pgkeep_repo::{
    BlobId, CheckOptions, InitOptions, KdfParams, LockKind, Repository, StreamRef, WriterOptions,
};
use pgkeep_storage::conformance::pattern;
use pgkeep_storage::{LocalStorage, Storage};

async fn backup(repo: &Repository, id: &str, data: &[u8]) -> StreamRef {
    // One index file per pack, so a damaged file loses some packs and not others.
    let w = repo.writer(WriterOptions {
        index_every_packs: 1,
        uploads: 1,
        ..Default::default()
    });
    let (w2, data) = (w.clone(), data.to_vec());
    let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&data))
        .await
        .unwrap()
        .unwrap();
    w.finish().await.unwrap();
    repo.save_manifest("main", id, &serde_json::json!({ "data": s }))
        .await
        .unwrap();
    s
}

async fn restore(repo: &Repository, s: &StreamRef) -> pgkeep_repo::Result<Vec<u8>> {
    let mut out = Vec::new();
    repo.read_stream(s, &mut out).await?;
    Ok(out)
}

async fn open(storage: &Arc<dyn Storage>) -> Repository {
    Repository::open(storage.clone(), Some("pw")).await.unwrap()
}

async fn index_keys(storage: &Arc<dyn Storage>) -> Vec<String> {
    let mut v: Vec<String> = storage
        .list("index/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_deleted_index_file_is_rebuilt_from_pack_headers_and_backups_restore() {
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let opts = InitOptions {
        passphrase: Some("pw".into()),
        kdf: KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        },
        pack_size: 1 << 20,
        ..Default::default()
    };
    let repo = Repository::init(storage.clone(), opts).await.unwrap();
    let (a, b) = (pattern(5 << 20, 1).to_vec(), pattern(4 << 20, 2).to_vec());
    let sa = backup(&repo, "a", &a).await;
    let sb = backup(&repo, "b", &b).await;
    let keys = index_keys(&storage).await;
    // How many packs 9 MiB makes varies with the order the parallel compressors hand blobs
    // to the packer (5 to 7 here); the test needs two files to lose and one that stays.
    assert!(keys.len() >= 3, "expected an index file per pack: {keys:?}");

    // The index file that lists backup a's first blob, and the one that lists b's.
    let mut damaged_key = None;
    let mut deleted_key = None;
    for k in &keys {
        if index_file_lists(&storage, k, &sa.blobs[0].id).await {
            damaged_key = Some(k.clone());
        }
        if index_file_lists(&storage, k, &sb.blobs[0].id).await {
            deleted_key = Some(k.clone());
        }
    }
    let (damaged_key, deleted_key) = (damaged_key.unwrap(), deleted_key.unwrap());
    assert_ne!(damaged_key, deleted_key);
    let original = storage.get(&damaged_key).await.unwrap();
    let mut bad = original.to_vec();
    bad[original.len() / 2] ^= 0x01;
    storage.delete(&damaged_key).await.unwrap();
    storage.put(&damaged_key, bad.into()).await.unwrap();
    storage.delete(&deleted_key).await.unwrap();

    // Still opens; the damaged file is named, the backups that lost blobs are named.
    let repo = open(&storage).await;
    let damaged = repo.damaged_index_files();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    assert_eq!(damaged[0].0, damaged_key);
    let report = repo.check(CheckOptions::default()).await.unwrap();
    let named = report
        .problems
        .iter()
        .find(|p| p.object == damaged_key)
        .expect("check does not name the damaged index file");
    assert!(named.message.contains("repair-index"), "{}", named.message);
    assert_eq!(report.damaged_manifests, ["main/a", "main/b"]);
    assert!(
        restore(&repo, &sa).await.is_err(),
        "a restored without its index"
    );

    let lock = repo
        .lock(LockKind::Exclusive, None, "repo repair-index")
        .await
        .unwrap();
    let fixed = repo.repair_index().await.unwrap();
    lock.release().await.unwrap();
    assert_eq!(
        fixed.removed_index_files,
        std::slice::from_ref(&damaged_key)
    );
    assert_eq!(fixed.written_index_files.len(), 1);
    assert!(fixed.packs_indexed >= 2, "{fixed:?}");
    assert_eq!(fixed.packs_scanned, fixed.packs_indexed);
    assert!(fixed.unreadable_packs.is_empty(), "{fixed:?}");
    // Only the packs the two lost files described were read, not every pack.
    assert!(fixed.packs_scanned < keys.len(), "{fixed:?}");

    let repo = open(&storage).await;
    assert!(repo.damaged_index_files().is_empty());
    let report = repo.check(CheckOptions { read_data: true }).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(restore(&repo, &sa).await.unwrap(), a);
    assert_eq!(restore(&repo, &sb).await.unwrap(), b);

    // A repair interrupted between writing the new index and removing the damaged file (put
    // the damaged file back): usable, the backups restore, check names only the damaged
    // file, and a rerun reads no pack and removes it.
    let mut bad = original.to_vec();
    bad.truncate(original.len() - 3);
    storage.put(&damaged_key, bad.into()).await.unwrap();
    let repo = open(&storage).await;
    assert_eq!(restore(&repo, &sa).await.unwrap(), a);
    let report = repo.check(CheckOptions::default()).await.unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(report.damaged_manifests.is_empty());
    let lock = repo
        .lock(LockKind::Exclusive, None, "repo repair-index")
        .await
        .unwrap();
    let rerun = repo.repair_index().await.unwrap();
    lock.release().await.unwrap();
    assert_eq!(rerun.packs_scanned, 0, "{rerun:?}");
    assert!(rerun.written_index_files.is_empty());
    assert_eq!(rerun.removed_index_files, [damaged_key]);
    let repo = open(&storage).await;
    assert!(repo
        .check(CheckOptions { read_data: true })
        .await
        .unwrap()
        .is_ok());
}

/// Whether the index file `key` lists `blob`: a scratch copy of the repository holding only
/// that index file answers (index files are sealed; this reads them as the repository does).
async fn index_file_lists(storage: &Arc<dyn Storage>, key: &str, blob: &BlobId) -> bool {
    let scratch = tempfile::tempdir().unwrap();
    let copy: Arc<dyn Storage> = Arc::new(LocalStorage::new(scratch.path()).unwrap());
    let keys = storage
        .list("keys/")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key);
    for k in keys.chain(["config".to_string(), key.to_string()]) {
        copy.put(&k, storage.get(&k).await.unwrap()).await.unwrap();
    }
    Repository::open(copy, Some("pw"))
        .await
        .unwrap()
        .has_blob(blob)
}
