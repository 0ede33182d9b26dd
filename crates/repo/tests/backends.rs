//! The same user-level checks on every backend that runs here: local disk and a real
//! S3-compatible server (SeaweedFS, started by the test). Data is altered through the storage
//! itself, as a faulty disk or a careless operator would.

use std::sync::Arc;

use bytes::Bytes;
use pgkeep_repo::{
    CheckOptions, ErrorKind, InitOptions, KdfParams, Repository, StreamRef, WriterOptions,
};
use pgkeep_storage::{LocalStorage, Storage};
use pgkeep_testing::s3::S3Server;
use rand::{RngCore, SeedableRng};

fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v[len / 2..]);
    for (i, b) in v[..len / 2].iter_mut().enumerate() {
        *b = b"select * from pgbench_accounts where aid = 42;\n"[i % 47];
    }
    v
}

async fn store(repo: &Repository, data: Arc<Vec<u8>>) -> (StreamRef, pgkeep_repo::WriteStats) {
    let w = repo.writer(WriterOptions::default());
    let w2 = w.clone();
    let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&data))
        .await
        .unwrap()
        .unwrap();
    (s, w.finish().await.unwrap())
}

async fn read_back(repo: &Repository, s: &StreamRef) -> Result<Vec<u8>, pgkeep_repo::RepoError> {
    let mut out = Vec::new();
    repo.read_stream(s, &mut out).await?;
    Ok(out)
}

async fn listing(s: &dyn Storage) -> Vec<(String, Bytes)> {
    let mut v = Vec::new();
    for m in s.list("").await.unwrap() {
        v.push((m.key.clone(), s.get(&m.key).await.unwrap()));
    }
    v.sort();
    v
}

/// 0 bytes to 200 MiB, plain and encrypted, read back through a freshly opened repository;
/// the second ingest of the same data uploads no pack.
async fn round_trips_and_dedup(storage: Arc<dyn Storage>, big: bool) {
    let opts = InitOptions {
        passphrase: Some("pw".into()),
        kdf: KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        },
        ..Default::default()
    };
    let repo = Repository::init(storage.clone(), opts).await.unwrap();
    let mut sizes = vec![0usize, 1, 65_537, 5 << 20];
    if big {
        sizes.push(200 << 20);
    }
    for (i, len) in sizes.into_iter().enumerate() {
        let data = Arc::new(mixed_data(len, i as u64));
        let (s, first) = store(&repo, data.clone()).await;
        let reopened = Repository::open(storage.clone(), Some("pw")).await.unwrap();
        let back = read_back(&reopened, &s).await.unwrap();
        assert!(
            back == *data,
            "{len} bytes differ after the round trip on {}",
            storage.location()
        );
        let packs = storage.list("packs/").await.unwrap().len();
        let (s2, second) = store(&reopened, data).await;
        assert_eq!(s, s2);
        assert_eq!(
            second.packs, 0,
            "re-ingest of {len} bytes uploaded packs ({first:?} then {second:?})"
        );
        assert_eq!(storage.list("packs/").await.unwrap().len(), packs);
    }
    let report = repo.check(CheckOptions { read_data: true }).await.unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// A flipped byte, a truncated pack, a missing pack: each is an integrity error naming the
/// pack, and `check` names the damaged backup. A wrong passphrase writes nothing.
async fn damage_is_detected_and_named(storage: Arc<dyn Storage>) {
    let opts = InitOptions {
        passphrase: Some("right".into()),
        kdf: KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        },
        ..Default::default()
    };
    let repo = Repository::init(storage.clone(), opts).await.unwrap();
    let (s, _) = store(&repo, Arc::new(mixed_data(3 << 20, 3))).await;
    repo.save_manifest("main", "b1", &serde_json::json!({ "file": s }))
        .await
        .unwrap();
    let packs = storage.list("packs/").await.unwrap();
    assert_eq!(packs.len(), 1);
    let pack = packs[0].key.clone();
    let pack_id = pack.rsplit('/').next().unwrap().to_string();
    let original = storage.get(&pack).await.unwrap();

    let before = listing(storage.as_ref()).await;
    let err = Repository::open(storage.clone(), Some("wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    assert_eq!(
        before,
        listing(storage.as_ref()).await,
        "a wrong passphrase changed the repository"
    );

    let mut flipped = original.to_vec();
    flipped[1000] ^= 0x01;
    let mut truncated = original.to_vec();
    truncated.truncate(original.len() / 2);
    for (what, bytes) in [
        ("flipped byte", Some(flipped)),
        ("truncated pack", Some(truncated)),
        ("missing pack", None),
    ] {
        storage.delete(&pack).await.unwrap();
        if let Some(b) = bytes {
            storage.put(&pack, Bytes::from(b)).await.unwrap();
        }
        let err = read_back(&repo, &s).await.unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::Integrity | ErrorKind::Storage),
            "{what}: {err} is not an integrity error"
        );
        assert!(
            err.to_string().contains(&pack_id),
            "{what}: {err} does not name the pack"
        );
        let report = repo.check(CheckOptions { read_data: true }).await.unwrap();
        assert!(
            report.problems.iter().any(|p| p.object.contains(&pack_id)),
            "{what}: {report:?}"
        );
        assert_eq!(
            report.damaged_manifests,
            vec!["main/b1".to_string()],
            "{what}"
        );
    }
    storage.put(&pack, original).await.unwrap();
    assert_eq!(read_back(&repo, &s).await.unwrap(), mixed_data(3 << 20, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_round_trips_up_to_200_mib_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    round_trips_and_dedup(Arc::new(LocalStorage::new(dir.path()).unwrap()), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_damage_is_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    damage_is_detected_and_named(Arc::new(LocalStorage::new(dir.path()).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_round_trips_up_to_200_mib_and_dedup() {
    let server = S3Server::start().await.unwrap();
    round_trips_and_dedup(server.storage(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_damage_is_detected_and_named() {
    let server = S3Server::start().await.unwrap();
    damage_is_detected_and_named(server.storage()).await;
}
