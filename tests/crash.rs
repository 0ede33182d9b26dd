//! Crash loop (RELIABILITY row 1, design.md invariants 1 and 2): a process SIGKILLed at any
//! point of an ingest — between two storage writes, inside a local write after its temp file
//! is complete but before the rename, or in the middle of a multipart upload to SeaweedFS —
//! leaves a repository that the real binary's `pgkeep repo check --read-data` passes (exit 0),
//! whose earlier backup is intact, and in which a rerun of the same ingest succeeds and
//! uploads only the blobs that had not reached an index.
//!
//! The killed child is this test binary run again (`crash_child`, a no-op unless
//! PGKEEP_CRASH_CHILD_DIR is set) with one of pgkeep-storage's kill hooks set:
//! PGKEEP_TEST_KILL_AFTER_OPS=N or PGKEEP_TEST_KILL_AT=<point>:<k> (test builds only).

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;

use pgkeep_repo::{InitOptions, Repository, StreamRef, WriteStats, WriterOptions};
use pgkeep_storage::conformance::pattern;
use pgkeep_storage::crashpoint::KILL_AT_ENV;
use pgkeep_storage::{wrap_from_env, LocalStorage, Storage, KILL_AFTER_OPS_ENV};

const CHILD_ENV: &str = "PGKEEP_CRASH_CHILD_DIR";
/// For the S3 runs: the child opens `s3://…` with this endpoint (credentials from AWS_*).
const CHILD_ENDPOINT_ENV: &str = "PGKEEP_CRASH_CHILD_ENDPOINT";
/// The size of the stream the child ingests.
const CHILD_ENV_LEN: &str = "PGKEEP_CRASH_CHILD_LEN";
/// Pack uploads the child's writer runs at once.
const CHILD_ENV_UPLOADS: &str = "PGKEEP_CRASH_CHILD_UPLOADS";

/// Incompressible, so every chunk is its own ~1 MiB blob and small packs give many kill
/// points.
fn data(seed: u64, len: usize) -> Vec<u8> {
    pattern(len, seed).to_vec()
}

async fn ingest(repo: &Repository, bytes: Vec<u8>, uploads: usize) -> (StreamRef, WriteStats) {
    let w = repo.writer(WriterOptions {
        index_every_packs: 2,
        uploads,
        ..Default::default()
    });
    let w2 = w.clone();
    let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&bytes))
        .await
        .unwrap()
        .unwrap();
    (s, w.finish().await.unwrap())
}

async fn ingest_and_commit(
    repo: &Repository,
    id: &str,
    bytes: Vec<u8>,
    uploads: usize,
) -> (StreamRef, WriteStats) {
    let (s, stats) = ingest(repo, bytes, uploads).await;
    repo.save_manifest("main", id, &serde_json::json!({ "data": s }))
        .await
        .unwrap();
    (s, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(location) = std::env::var(CHILD_ENV) else {
        return;
    };
    let len: usize = std::env::var(CHILD_ENV_LEN).unwrap().parse().unwrap();
    let uploads: usize = std::env::var(CHILD_ENV_UPLOADS).unwrap().parse().unwrap();
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
    ingest_and_commit(&repo, "b1", data(1, len), uploads).await;
}

async fn restore(repo: &Repository, id: &str) -> Vec<u8> {
    let body = repo.load_manifest("main", id).await.unwrap();
    let s: StreamRef = serde_json::from_value(body["data"].clone()).unwrap();
    let mut out = Vec::new();
    repo.read_stream(&s, &mut out).await.unwrap();
    out
}

/// One way of killing the child, and what it should exercise.
struct Plan {
    /// The variable and its value for kill number `n` (0-based).
    hook: fn(u64) -> (&'static str, String),
    pack_size: u64,
    /// Bytes the child ingests.
    len: usize,
    /// Pack uploads the child runs at once (1 makes the order of writes deterministic).
    uploads: usize,
    /// At least this many runs must have been killed.
    min_kills: u64,
}

/// Where the repository lives: a fresh empty storage, the location the child and the binary
/// open, and the environment they need to reach it.
type Fresh<'a> = &'a dyn Fn() -> (Arc<dyn Storage>, String, Vec<(String, String)>);

/// `pgkeep repo check --read-data` through the real binary: exit 0 or the test fails with
/// its output.
fn binary_check(location: &str, env: &[(String, String)], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgkeep"))
        .arg("--config")
        .arg(&config)
        .args(["--repo", location, "repo", "check", "--read-data"])
        .env_remove("PGKEEP_REPO")
        .env_remove("PGKEEP_PASSPHRASE")
        .env_remove(KILL_AFTER_OPS_ENV)
        .env_remove(KILL_AT_ENV)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgkeep repo check --read-data after {what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn crash_loop(fresh: Fresh<'_>, plan: Plan) {
    let exe = std::env::current_exe().unwrap();
    let (mut kills, mut reruns_that_reused, mut reused_bytes) = (0, 0, 0);
    for n in 0.. {
        let (storage, location, env) = fresh();
        let opts = InitOptions {
            pack_size: plan.pack_size,
            ..Default::default()
        };
        let repo = Repository::init(storage.clone(), opts).await.unwrap();
        ingest_and_commit(&repo, "b0", data(0, 3 << 20), 4).await;

        let (var, value) = (plan.hook)(n);
        let what = format!("a kill at {var}={value}");
        let status = Command::new(&exe)
            .args(["crash_child", "--exact", "--test-threads=1", "--quiet"])
            .env(CHILD_ENV, &location)
            .env(CHILD_ENV_LEN, plan.len.to_string())
            .env(CHILD_ENV_UPLOADS, plan.uploads.to_string())
            .envs(env.iter().cloned())
            .env_remove(KILL_AFTER_OPS_ENV)
            .env_remove(KILL_AT_ENV)
            .env(var, &value)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        let finished = status.success();
        if !finished {
            assert_eq!(
                status.signal(),
                Some(9),
                "child failed without being killed ({what}): {status}"
            );
            kills += 1;
        }

        binary_check(&location, &env, &what);
        let repo = Repository::open(storage.clone(), None).await.unwrap();
        assert_eq!(
            restore(&repo, "b0").await,
            data(0, 3 << 20),
            "earlier backup damaged by {what}"
        );
        let ids: Vec<String> = repo
            .list_manifests(Some("main"))
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        if ids.contains(&"b1".to_string()) {
            assert_eq!(restore(&repo, "b1").await, data(1, plan.len), "{what}");
        } else {
            // The rerun succeeds and stores only what no index named: `repo` still holds
            // the index as it was before the rerun.
            let rerun = Repository::open(storage.clone(), None).await.unwrap();
            let (s, stats) = ingest_and_commit(&rerun, "b1", data(1, plan.len), 4).await;
            let reused: u64 = s
                .blobs
                .iter()
                .filter(|b| repo.has_blob(&b.id))
                .map(|b| b.len as u64)
                .sum();
            assert_eq!(
                stats.bytes_new,
                s.size - reused,
                "the rerun after {what} did not reuse the {reused} indexed bytes"
            );
            if reused > 0 {
                reruns_that_reused += 1;
                reused_bytes += reused;
            }
            assert_eq!(restore(&rerun, "b1").await, data(1, plan.len));
            binary_check(&location, &env, &format!("the rerun after {what}"));
        }
        if finished {
            break;
        }
        assert!(n < 200, "the child never finished");
    }
    eprintln!(
        "crash loop: {kills} kills, {reruns_that_reused} reruns reused indexed blobs, {reused_bytes} bytes not uploaded again"
    );
    assert!(
        kills >= plan.min_kills,
        "only {kills} kill points were exercised"
    );
    assert!(
        reruns_that_reused >= 1,
        "no rerun found blobs of the killed run in an index"
    );
}

fn local_fresh(
    dirs: &std::sync::Mutex<Vec<tempfile::TempDir>>,
) -> impl Fn() -> (Arc<dyn Storage>, String, Vec<(String, String)>) + '_ {
    move || {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path()).unwrap());
        let location = dir.path().display().to_string();
        dirs.lock().unwrap().push(dir);
        (storage, location, vec![])
    }
}

fn after_ops(n: u64) -> (&'static str, String) {
    (KILL_AFTER_OPS_ENV, n.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_writes_of_an_ingest_leaves_a_repository_that_passes_check() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dirs = std::sync::Mutex::new(Vec::new());
    // 9 MiB in 1 MiB packs: ~9 packs, index files and the manifest are each a kill point.
    let plan = Plan {
        hook: after_ops,
        pack_size: 1 << 20,
        len: 9 << 20,
        uploads: 4,
        min_kills: 8,
    };
    crash_loop(&local_fresh(&dirs), plan).await;
}

/// Killed after a local write's temp file is complete and fsynced, before its rename: the
/// temp file is left behind, never listed, and the repository is as if the write never began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_before_a_local_rename_leaves_a_repository_that_passes_check() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dirs = std::sync::Mutex::new(Vec::new());
    let plan = Plan {
        hook: |n| (KILL_AT_ENV, format!("before-rename:{}", n + 1)),
        pack_size: 1 << 20,
        len: 9 << 20,
        uploads: 4,
        min_kills: 8,
    };
    crash_loop(&local_fresh(&dirs), plan).await;
    // The kills really came inside writes: each killed repository holds a leftover temp file.
    let leftovers = dirs
        .lock()
        .unwrap()
        .iter()
        .filter(|d| has_temp_file(d.path()))
        .count();
    assert!(leftovers >= 8, "only {leftovers} kills left a temp file");
}

fn has_temp_file(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            has_temp_file(&p)
        } else {
            e.file_name().to_string_lossy().starts_with(".tmp-")
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_writes_of_an_ingest_on_s3_leaves_a_repository_that_passes_check() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let server = pgkeep_testing::s3::S3Server::start().await.unwrap();
    let fresh = s3_fresh(&server);
    let plan = Plan {
        hook: after_ops,
        pack_size: 1 << 20,
        len: 9 << 20,
        uploads: 4,
        min_kills: 8,
    };
    crash_loop(&fresh, plan).await;
}

/// Killed while a pack's multipart upload has parts on the server but is not completed: no
/// pack appears, and the rerun uploads it again. Packs of 9 MiB are above the 8 MiB multipart
/// threshold the child's storage uses by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_a_multipart_upload_on_s3_leaves_a_repository_that_passes_check() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let server = pgkeep_testing::s3::S3Server::start().await.unwrap();
    let fresh = s3_fresh(&server);
    let plan = Plan {
        hook: |n| (KILL_AT_ENV, format!("mid-multipart:{}", n + 1)),
        pack_size: 9 << 20,
        len: 40 << 20,
        // One pack at a time: the index written after the second pack is on the server
        // before the third upload starts, so later kills leave blobs for the rerun to reuse.
        uploads: 1,
        min_kills: 4,
    };
    crash_loop(&fresh, plan).await;
}

fn s3_fresh(
    server: &pgkeep_testing::s3::S3Server,
) -> impl Fn() -> (Arc<dyn Storage>, String, Vec<(String, String)>) + '_ {
    move || {
        let prefix = pgkeep_testing::s3::unique_prefix("crash");
        let mut env = server.env();
        env.push((CHILD_ENDPOINT_ENV.into(), server.endpoint.clone()));
        (
            server.storage_with_prefix(&prefix),
            server.url(&prefix),
            env,
        )
    }
}
