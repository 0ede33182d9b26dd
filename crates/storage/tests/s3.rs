//! The conformance suite and S3-specific behaviour against a real SeaweedFS server.

use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use pgkeep_storage::{conformance, open_storage, ErrorKind, ObjectStoreStorage, Storage};
use pgkeep_testing::s3::{unique_prefix, S3Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seaweedfs_conformance() {
    let server = S3Server::start().await.expect("start SeaweedFS");
    conformance::run_all(server.storage()).await;
    // Two storages on different prefixes of one bucket do not see each other.
    let a = server.storage();
    let b = server.storage();
    a.put("k", Bytes::from_static(b"a")).await.unwrap();
    assert!(b.list("").await.unwrap().is_empty());
    assert_eq!(b.get("k").await.unwrap_err().kind, ErrorKind::NotFound);
}

/// Two servers at once (each with its own ports), and the second bucket works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_side_by_side() {
    let (one, two) = tokio::join!(S3Server::start(), S3Server::start());
    let (one, two) = (one.expect("first server"), two.expect("second server"));
    assert_ne!(one.endpoint, two.endpoint);
    let s1 = one.storage_with_prefix("p");
    let s2 = two.storage_with_prefix("p");
    s1.put("k", Bytes::from_static(b"one")).await.unwrap();
    assert_eq!(s2.get("k").await.unwrap_err().kind, ErrorKind::NotFound);
    let other = ObjectStoreStorage::new(one.object_store(&one.buckets[1]), "p", "second bucket");
    other.put("k", Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(&s1.get("k").await.unwrap()[..], b"one");
}

/// Wrong credentials: PermissionDenied, not retried into a storm, and the message names
/// bucket and key but holds no credential value (RELIABILITY rows 7 and 25).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_permission_denied_without_secrets() {
    let server = S3Server::start().await.expect("start SeaweedFS");
    let canary_secret = "CANARY-SECRET-d41d8cd98f00b204e9800998ecf8427e";
    let store = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&server.endpoint)
        .with_allow_http(true)
        .with_region(&server.region)
        .with_bucket_name(&server.bucket)
        .with_access_key_id(&server.access_key)
        .with_secret_access_key(canary_secret)
        .build()
        .unwrap();
    let s = ObjectStoreStorage::new(Arc::new(store), "denied", "s3://pgkeep-test/denied");
    let started = std::time::Instant::now();
    for e in [
        s.put("some/key", Bytes::from_static(b"x"))
            .await
            .unwrap_err(),
        s.get("some/key").await.unwrap_err(),
        s.list("some/").await.unwrap_err(),
    ] {
        assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
        assert!(e.message.contains("s3://pgkeep-test/denied"), "{e}");
        assert!(!e.message.contains(canary_secret), "{e}");
        assert!(!e.message.contains("CANARY"), "{e}");
    }
    assert!(
        started.elapsed().as_secs() < 10,
        "permission errors were retried"
    );
}

/// open_storage with an s3:// URL, credentials from the environment of the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_storage_reaches_seaweedfs() {
    let server = S3Server::start().await.expect("start SeaweedFS");
    // This test binary's only use of AWS_* variables; no other test here reads them.
    for (k, v) in server.env() {
        std::env::set_var(k, v);
    }
    let prefix = unique_prefix("open");
    let s = open_storage(&server.url(&prefix), &server.storage_options()).unwrap();
    s.put("x/y", Bytes::from_static(b"hello")).await.unwrap();
    assert_eq!(&s.get("x/y").await.unwrap()[..], b"hello");
    assert_eq!(s.location(), format!("s3://pgkeep-test/{prefix}"));
    // The environment alone (AWS_ENDPOINT, AWS_ALLOW_HTTP, …) is enough, as for the binary
    // run by crash-loop tests: default options must not reset it.
    let s2 = open_storage(&server.url(&prefix), &Default::default()).unwrap();
    assert_eq!(&s2.get("x/y").await.unwrap()[..], b"hello");
    // The object really is below the prefix in the bucket.
    let raw = server.object_store(&server.bucket);
    let got = raw
        .get(&object_store::path::Path::from(format!("{prefix}/x/y")))
        .await
        .unwrap();
    assert_eq!(&got.bytes().await.unwrap()[..], b"hello");
}

/// A failed multipart upload leaves nothing visible under the key (RELIABILITY row 8): the
/// server refuses a part below S3's 5 MiB minimum, the upload is aborted, and the key stays
/// absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_multipart_leaves_nothing() {
    let server = S3Server::start().await.expect("start SeaweedFS");
    let prefix = unique_prefix("mp");
    let s = ObjectStoreStorage::new(server.object_store(&server.bucket), &prefix, "s3 test")
        // 1 KiB parts: every part but the last is below S3's minimum part size.
        .with_multipart(4096, 1024);
    // SeaweedFS enforces S3's minimum part size (EntityTooSmall), so the upload fails.
    let e = s
        .put("big", conformance::pattern(10_000, 1))
        .await
        .expect_err("a multipart upload with 1 KiB parts succeeded");
    assert_ne!(e.kind, ErrorKind::NotFound, "{e}");
    assert!(e.message.contains("big"), "{e}");
    assert_eq!(s.head("big").await.unwrap_err().kind, ErrorKind::NotFound);
    assert!(s.list("").await.unwrap().is_empty());
}

/// `storage_class` reaches the server for the prefixes it names, and only those; `sse` is
/// sent with every write. SeaweedFS records both from the request headers (its filer's
/// metadata shows them), so this checks what pgkeep sends, as far as SeaweedFS honours it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_goes_to_the_named_prefixes_and_sse_to_every_object() {
    let server = S3Server::start().await.expect("start SeaweedFS");
    let prefix = unique_prefix("class");
    let opts = pgkeep_storage::StorageOptions {
        storage_class: Some("STANDARD_IA".into()),
        storage_class_prefixes: vec!["packs/".into()],
        sse: Some("AES256".into()),
        ..server.storage_options()
    };
    let envs = server.env();
    for (k, v) in &envs {
        std::env::set_var(k, v);
    }
    let s = open_storage(&server.url(&prefix), &opts).expect("open");
    s.put("packs/ab/pack1", Bytes::from(vec![7u8; 1 << 20]))
        .await
        .unwrap();
    s.put_if_absent("index/i1", Bytes::from_static(b"index"))
        .await
        .unwrap();
    // A pack above the multipart threshold goes up in parts, with the class too.
    let big = pgkeep_storage::DEFAULT_MULTIPART_THRESHOLD + 1;
    s.put("packs/cd/pack2", Bytes::from(vec![9u8; big]))
        .await
        .unwrap();
    let extended = |key: &str| {
        let e = server
            .filer_entry(&server.bucket, &format!("{prefix}/{key}"))
            .unwrap();
        serde_json::to_string(&e["Extended"]).unwrap()
    };
    let (pack1, pack2, index) = (
        extended("packs/ab/pack1"),
        extended("packs/cd/pack2"),
        extended("index/i1"),
    );
    // The filer keeps header values base64-encoded.
    let standard_ia = "U1RBTkRBUkRfSUE="; // STANDARD_IA
    assert!(pack1.contains(standard_ia), "{pack1}");
    assert!(pack2.contains(standard_ia), "{pack2}");
    assert!(!index.contains(standard_ia), "{index}");
    for (what, e) in [("pack1", &pack1), ("pack2", &pack2), ("index", &index)] {
        assert!(
            e.to_ascii_lowercase().contains("server-side-encryption"),
            "{what}: {e}"
        );
    }
    // Reads are unaffected.
    assert_eq!(
        s.get("index/i1").await.unwrap(),
        Bytes::from_static(b"index")
    );
}
