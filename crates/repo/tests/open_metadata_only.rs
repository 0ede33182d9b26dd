//! `Repository::open_metadata_only`: the fast open path of `archive-push` / `archive-get`.
//! It must read no index, yet authenticate exactly like `open`.

use std::sync::Arc;

use pgkeep_repo::{ErrorKind, InitOptions, KdfParams, Repository, WriterOptions};
use pgkeep_storage::{LocalStorage, Storage};

fn local(dir: &std::path::Path) -> Arc<dyn Storage> {
    Arc::new(LocalStorage::new(dir).unwrap())
}

fn encrypted() -> InitOptions {
    InitOptions {
        passphrase: Some("correct horse".into()),
        kdf: KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        },
        ..InitOptions::default()
    }
}

#[tokio::test]
async fn metadata_only_open_skips_the_index_and_still_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::init(local(dir.path()), encrypted())
        .await
        .unwrap();
    let w = repo.writer(WriterOptions::default());
    let data = vec![7u8; 3 << 20];
    let stream = tokio::task::spawn_blocking({
        let w = w.clone();
        move || w.ingest_bytes(&data)
    })
    .await
    .unwrap()
    .unwrap();
    w.finish().await.unwrap();
    let blob = stream.blobs[0].id;
    repo.put_sealed_if_absent("wal/main/x", b"wal/main/x", b"payload")
        .await
        .unwrap();

    // The full open sees the blob; the light one does not (it read no index file)...
    let full = Repository::open(local(dir.path()), Some("correct horse"))
        .await
        .unwrap();
    assert!(full.has_blob(&blob));
    let light = Repository::open_metadata_only(local(dir.path()), Some("correct horse"))
        .await
        .unwrap();
    assert!(!light.has_blob(&blob));
    // ...but reads and writes sealed objects with the same key, and can load the index later.
    assert_eq!(
        light.get_sealed("wal/main/x", b"wal/main/x").await.unwrap(),
        b"payload"
    );
    light
        .put_sealed_if_absent("wal/main/y", b"wal/main/y", b"second")
        .await
        .unwrap();
    assert_eq!(
        full.get_sealed("wal/main/y", b"wal/main/y").await.unwrap(),
        b"second"
    );
    light.reload_index().await.unwrap();
    assert!(light.has_blob(&blob));

    // Same refusals as `open`.
    let e = Repository::open_metadata_only(local(dir.path()), Some("wrong"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WrongPassphrase);
    let e = Repository::open_metadata_only(local(dir.path()), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PassphraseRequired);
    let empty = tempfile::tempdir().unwrap();
    let e = Repository::open_metadata_only(local(empty.path()), None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotARepository);
}
