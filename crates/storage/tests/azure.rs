//! The conformance suite against a real Azurite blob server.

use bytes::Bytes;
use pgkeep_storage::{conformance, ErrorKind, Storage};
use pgkeep_testing::azure::AzuriteServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azurite_conformance() {
    let server = AzuriteServer::start().await.expect("start Azurite");
    conformance::run_all(server.storage()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_missing_container_is_an_error() {
    let server = AzuriteServer::start().await.expect("start Azurite");
    let s = pgkeep_storage::ObjectStoreStorage::new(
        server.object_store("no-such-container"),
        "p",
        "az://no-such-container/p",
    );
    let e = s.put("k", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(e.message.contains("az://no-such-container/p/k"), "{e}");
    assert!(!e.message.contains(&server.account_key), "{e}");
    assert_eq!(e.kind, ErrorKind::Config, "{e}");
}
