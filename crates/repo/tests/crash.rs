//! Crash loop (RELIABILITY row 1): a process killed with SIGKILL after any number of storage
//! writes during an ingest leaves a repository that passes `check`, whose earlier backups are
//! intact, and in which the next run succeeds.
//!
//! The test binary re-runs itself as the child (`crash_child`, a no-op unless
//! PGKEEP_CRASH_CHILD_DIR is set), with the storage test hook PGKEEP_TEST_KILL_AFTER_OPS=N.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;

use pgkeep_repo::{CheckOptions, InitOptions, Repository, StreamRef, WriterOptions};
use pgkeep_storage::{wrap_from_env, LocalStorage, Storage, KILL_AFTER_OPS_ENV};
use rand::{RngCore, SeedableRng};

const CHILD_ENV: &str = "PGKEEP_CRASH_CHILD_DIR";
/// For the S3 run: the child opens `s3://…` with this endpoint (credentials from AWS_*).
const CHILD_ENDPOINT_ENV: &str = "PGKEEP_CRASH_CHILD_ENDPOINT";

fn data(seed: u64, len: usize) -> Vec<u8> {
    // Random, so every chunk is its own ~1 MiB blob and the 1 MiB packs give many kill points.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

async fn ingest_and_commit(repo: &Repository, id: &str, bytes: Vec<u8>) -> StreamRef {
    let w = repo.writer(WriterOptions {
        index_every_packs: 2,
        ..Default::default()
    });
    let w2 = w.clone();
    let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&bytes))
        .await
        .unwrap()
        .unwrap();
    w.finish().await.unwrap();
    repo.save_manifest("main", id, &serde_json::json!({ "data": s }))
        .await
        .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(location) = std::env::var(CHILD_ENV) else {
        return;
    };
    let storage = match std::env::var(CHILD_ENDPOINT_ENV) {
        Ok(endpoint) => {
            let opts = pgkeep_storage::StorageOptions {
                endpoint: Some(endpoint),
                region: Some("us-east-1".into()),
                force_path_style: Some(true),
                allow_http: true,
                ..Default::default()
            };
            wrap_from_env(pgkeep_storage::open_storage_unwrapped(&location, &opts).unwrap())
        }
        Err(_) => wrap_from_env(Arc::new(LocalStorage::new(&location).unwrap())),
    };
    let repo = Repository::open(storage, None).await.unwrap();
    ingest_and_commit(&repo, "b1", data(1, 9 << 20)).await;
}

async fn restore(repo: &Repository, id: &str) -> Vec<u8> {
    let body = repo.load_manifest("main", id).await.unwrap();
    let s: StreamRef = serde_json::from_value(body["data"].clone()).unwrap();
    let mut out = Vec::new();
    repo.read_stream(&s, &mut out).await.unwrap();
    out
}

/// Runs the loop; `fresh` gives a new empty storage, the location the child opens, and the
/// environment the child needs to reach it.
async fn crash_loop(fresh: impl Fn() -> (Arc<dyn Storage>, String, Vec<(String, String)>)) {
    let exe = std::env::current_exe().unwrap();
    let mut kills = 0;
    for n in 0.. {
        let (storage, location, env) = fresh();
        let opts = InitOptions {
            pack_size: 1 << 20,
            ..Default::default()
        };
        let repo = Repository::init(storage.clone(), opts).await.unwrap();
        ingest_and_commit(&repo, "b0", data(0, 3 << 20)).await;

        let status = Command::new(&exe)
            .args(["crash_child", "--exact", "--test-threads=1", "--quiet"])
            .env(CHILD_ENV, &location)
            .envs(env)
            .env(KILL_AFTER_OPS_ENV, n.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        let finished = status.success();
        if !finished {
            assert_eq!(
                status.signal(),
                Some(9),
                "child failed without being killed at op {n}: {status}"
            );
            kills += 1;
        }

        let repo = Repository::open(storage.clone(), None).await.unwrap();
        let report = repo.check(CheckOptions { read_data: true }).await.unwrap();
        assert!(
            report.is_ok(),
            "after a kill at write {n}: {:?}",
            report.problems
        );
        assert_eq!(
            restore(&repo, "b0").await,
            data(0, 3 << 20),
            "earlier backup damaged (kill at {n})"
        );
        let ids: Vec<String> = repo
            .list_manifests(Some("main"))
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        if ids.contains(&"b1".to_string()) {
            assert_eq!(restore(&repo, "b1").await, data(1, 9 << 20), "kill at {n}");
        } else {
            // The next run succeeds and gives the same result.
            ingest_and_commit(&repo, "b1", data(1, 9 << 20)).await;
            assert_eq!(restore(&repo, "b1").await, data(1, 9 << 20));
            assert!(repo
                .check(CheckOptions { read_data: true })
                .await
                .unwrap()
                .is_ok());
        }
        if finished {
            break;
        }
        assert!(n < 200, "the child never finished");
    }
    // 9 MiB in 1 MiB packs: at least ~8 packs, index files and the manifest were each a kill point.
    assert!(kills >= 8, "only {kills} kill points were exercised");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_point_of_an_ingest_leaves_a_repository_that_passes_check() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dirs = std::sync::Mutex::new(Vec::new());
    crash_loop(|| {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
        let location = dir.path().display().to_string();
        dirs.lock().unwrap().push(dir);
        (storage, location, vec![])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_point_of_an_ingest_on_s3_leaves_a_repository_that_passes_check() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let server = pgkeep_testing::s3::S3Server::start().await.unwrap();
    crash_loop(|| {
        let prefix = pgkeep_testing::s3::unique_prefix("crash");
        let mut env = server.env();
        env.push((CHILD_ENDPOINT_ENV.into(), server.endpoint.clone()));
        (
            server.storage_with_prefix(&prefix),
            server.url(&prefix),
            env,
        )
    })
    .await;
}
