//! Packs go up to object stores as multipart uploads whose parts run in parallel, and a failed
//! part leaves no pack behind (design.md invariant 1, RELIABILITY row 8), on a real
//! S3-compatible server (SeaweedFS).

use std::sync::Arc;

use object_store::ObjectStoreExt;
use pgkeep_repo::repository::DEFAULT_PACK_SIZE;
use pgkeep_repo::{CheckOptions, ErrorKind, InitOptions, Repository, StreamRef, WriterOptions};
use pgkeep_storage::conformance::pattern;
use pgkeep_storage::{ObjectStoreStorage, Storage, DEFAULT_MULTIPART_THRESHOLD, DEFAULT_PART_SIZE};
use pgkeep_testing::s3::{unique_prefix, S3Server};

async fn ingest(repo: &Repository, data: bytes::Bytes) -> pgkeep_repo::Result<StreamRef> {
    let w = repo.writer(WriterOptions::default());
    let w2 = w.clone();
    let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&data))
        .await
        .unwrap()?;
    w.finish().await?;
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_seaweedfs_packs_are_multipart_uploads_and_a_failed_part_leaves_no_pack() {
    // The point of the settings (checked when this test compiles): a default pack is above
    // the threshold, and parts respect S3's minimum part size.
    const { assert!((DEFAULT_MULTIPART_THRESHOLD as u64) < DEFAULT_PACK_SIZE) };
    const { assert!(DEFAULT_PART_SIZE >= 5 << 20) };

    let server = S3Server::start().await.unwrap();
    let raw = server.object_store(&server.bucket);
    let prefix = unique_prefix("mp");
    let storage: Arc<dyn Storage> = Arc::new(ObjectStoreStorage::new(
        raw.clone(),
        &prefix,
        server.url(&prefix),
    ));
    let repo = Repository::init(storage.clone(), InitOptions::default())
        .await
        .unwrap();
    // Incompressible: two full packs (>= 16 MiB each) and a smaller last one.
    let data = pattern(40 << 20, 7);
    let s = ingest(&repo, data.clone()).await.unwrap();

    // S3 (and SeaweedFS) mark an object assembled from N parts with an ETag ending in "-N";
    // one PUT gives a plain MD5 ETag.
    let mut multipart = 0;
    for m in storage.list("packs/").await.unwrap() {
        let path = object_store::path::Path::from(format!("{prefix}/{}", m.key));
        let etag = raw.head(&path).await.unwrap().e_tag.unwrap_or_default();
        let etag = etag.trim_matches('"');
        if m.size > DEFAULT_MULTIPART_THRESHOLD as u64 {
            let parts = m.size.div_ceil(DEFAULT_PART_SIZE as u64);
            assert!(
                etag.ends_with(&format!("-{parts}")),
                "pack {} of {} bytes was not uploaded in {parts} parts (ETag {etag})",
                m.key,
                m.size
            );
            multipart += 1;
        } else {
            assert!(
                !etag.contains('-'),
                "small pack {} went multipart: {etag}",
                m.key
            );
        }
    }
    assert!(multipart >= 2, "only {multipart} packs went multipart");
    let reopened = Repository::open(storage.clone(), None).await.unwrap();
    let mut out = Vec::new();
    reopened.read_stream(&s, &mut out).await.unwrap();
    assert!(
        out == data[..],
        "multipart packs did not read back identical"
    );
    let report = reopened
        .check(CheckOptions { read_data: true })
        .await
        .unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);

    // A part the server refuses (SeaweedFS enforces S3's 5 MiB minimum, so 1 MiB parts
    // fail) aborts the upload: the ingest fails, naming the pack, and no pack or index
    // object appears.
    let prefix = unique_prefix("mp-fail");
    let failing: Arc<dyn Storage> = Arc::new(
        ObjectStoreStorage::new(raw.clone(), &prefix, server.url(&prefix))
            .with_multipart(1 << 20, 1 << 20),
    );
    let repo = Repository::init(failing.clone(), InitOptions::default())
        .await
        .unwrap();
    let err = ingest(&repo, pattern(20 << 20, 8))
        .await
        .expect_err("an upload with parts below 5 MiB succeeded");
    assert_eq!(err.kind(), ErrorKind::Storage, "{err}");
    assert!(err.to_string().contains("packs/"), "{err}");
    let keys: Vec<String> = failing
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, ["config"], "a failed multipart upload left objects");
}
