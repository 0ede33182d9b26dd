//! Retry and Faulty over a real LocalStorage (RELIABILITY rows 6, 7, 10, 11).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgkeep_storage::{conformance, ErrorKind, Faulty, LocalStorage, Retry, RetryPolicy, Storage};

fn local() -> (tempfile::TempDir, LocalStorage) {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path()).unwrap();
    (dir, s)
}

fn fast() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(50),
    }
}

/// 503, 503, then success: the call succeeds and the counter shows two retries.
#[tokio::test]
async fn retries_temporary_errors_then_succeeds() {
    let (_d, s) = local();
    let faulty = Arc::new(Faulty::new(s));
    let retry = Retry::new(faulty.clone(), fast());
    faulty.fail_next(2);
    retry.put("k", Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(retry.retries(), 2);
    assert_eq!(faulty.injected(), 2);
    assert_eq!(faulty.calls(), 3);
    faulty.fail_next(2);
    assert_eq!(&retry.get("k").await.unwrap()[..], b"v");
    assert_eq!(retry.counter().load(Ordering::Relaxed), 4);
}

/// Temporary errors beyond max_attempts surface as Temporary, after exactly max_attempts.
#[tokio::test]
async fn gives_up_after_max_attempts() {
    let (_d, s) = local();
    let faulty = Arc::new(Faulty::new(s));
    let retry = Retry::new(faulty.clone(), fast());
    faulty.fail_next(100);
    let e = retry.head("k").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Temporary);
    assert_eq!(faulty.calls(), 4);
    assert_eq!(retry.retries(), 3);
}

/// Permanent kinds are returned at once: no retry storm.
#[tokio::test]
async fn permanent_errors_are_not_retried() {
    for kind in [
        ErrorKind::PermissionDenied,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::Corrupt,
        ErrorKind::StorageFull,
    ] {
        let (_d, s) = local();
        let faulty = Arc::new(Faulty::new(s));
        let retry = Retry::new(faulty.clone(), fast());
        faulty.fail_after(0, kind);
        let e = retry.put("k", Bytes::from_static(b"v")).await.unwrap_err();
        assert_eq!(e.kind, kind);
        assert_eq!(faulty.calls(), 1, "{kind:?} was retried");
        assert_eq!(retry.retries(), 0);
    }
    // And a real NotFound from the backend.
    let (_d, s) = local();
    let faulty = Arc::new(Faulty::new(s));
    let retry = Retry::new(faulty.clone(), fast());
    assert_eq!(
        retry.get("missing").await.unwrap_err().kind,
        ErrorKind::NotFound
    );
    assert_eq!(faulty.calls(), 1);
}

/// fail_after lets the first N calls through.
#[tokio::test]
async fn fail_after_counts_calls() {
    let (_d, s) = local();
    let f = Faulty::new(s);
    f.fail_after(2, ErrorKind::StorageFull);
    f.put("a", Bytes::from_static(b"1")).await.unwrap();
    f.put("b", Bytes::from_static(b"2")).await.unwrap();
    assert_eq!(
        f.put("c", Bytes::from_static(b"3")).await.unwrap_err().kind,
        ErrorKind::StorageFull
    );
    f.heal();
    assert_eq!(f.list("").await.unwrap().len(), 2);
}

/// A body cut short is Corrupt for the caller, for get and get_range; the next read is fine.
#[tokio::test]
async fn cut_body_is_corrupt() {
    let (_d, s) = local();
    let f = Faulty::new(s);
    let data = conformance::pattern(10_000, 1);
    f.put("k", data.clone()).await.unwrap();
    f.cut_next_reads(2, 100);
    let e = f.get("k").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    let e = f.get_range("k", 0..5000).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(f.get("k").await.unwrap() == data);
    // Through Retry, Corrupt is not retried (the repository layer decides).
    let f = Arc::new(f);
    let retry = Retry::new(f.clone(), fast());
    f.cut_next_reads(1, 0);
    assert_eq!(retry.get("k").await.unwrap_err().kind, ErrorKind::Corrupt);
    assert_eq!(retry.retries(), 0);
}

/// A flipped bit arrives silently: same length, different bytes (only hashes catch it).
#[tokio::test]
async fn bit_flip_is_visible_in_content() {
    let (_d, s) = local();
    let f = Faulty::new(s);
    let data = conformance::pattern(4096, 2);
    f.put("k", data.clone()).await.unwrap();
    f.flip_next_reads(1);
    let got = f.get("k").await.unwrap();
    assert_eq!(got.len(), data.len());
    assert_ne!(got, data);
    let diff: u32 = got
        .iter()
        .zip(data.iter())
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    assert_eq!(diff, 1);
    assert!(
        f.get("k").await.unwrap() == data,
        "the flip must not persist"
    );
}

#[tokio::test]
async fn latency_is_added() {
    let (_d, s) = local();
    let f = Faulty::new(s);
    f.with_latency(Duration::from_millis(50));
    let t = Instant::now();
    let _ = f.head("x").await;
    assert!(t.elapsed() >= Duration::from_millis(50));
}

/// The SIGKILL hook, exercised in a child process (this test binary re-run with a filter):
/// after N completed writes the child dies by SIGKILL, with exactly N objects written. In a
/// release build the hook is inert, and the child writes everything.
#[test]
fn kill_after_mutations_kills_the_process() {
    if let Ok(dir) = std::env::var("PGKEEP_FAULTS_CHILD_DIR") {
        // Child mode: write objects through the env hook until killed.
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let s: Arc<dyn Storage> = Arc::new(LocalStorage::new(&dir).unwrap());
            let s = pgkeep_storage::wrap_from_env(s);
            for i in 0..10 {
                s.put(&format!("obj-{i}"), Bytes::from_static(b"x"))
                    .await
                    .unwrap();
            }
        });
        std::process::exit(0);
    }
    use std::os::unix::process::ExitStatusExt;
    for n in [0u64, 1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kill_after_mutations_kills_the_process",
                "--nocapture",
            ])
            .env("PGKEEP_FAULTS_CHILD_DIR", dir.path())
            .env(pgkeep_storage::KILL_AFTER_OPS_ENV, n.to_string())
            .status()
            .unwrap();
        let written = std::fs::read_dir(dir.path()).unwrap().count() as u64;
        if pgkeep_storage::crashpoint::HOOKS_ARMED {
            assert_eq!(status.signal(), Some(libc::SIGKILL), "n={n}: {status:?}");
            assert_eq!(written, n, "n={n}");
        } else {
            // A release build (`cargo test --release`) ignores the variable: the child lives.
            assert!(
                status.success(),
                "release build killed at n={n}: {status:?}"
            );
            assert_eq!(written, 10, "n={n}");
        }
    }
    // Without the variable the hook is a no-op.
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill_after_mutations_kills_the_process"])
        .env("PGKEEP_FAULTS_CHILD_DIR", dir.path())
        .env_remove(pgkeep_storage::KILL_AFTER_OPS_ENV)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 10);
}
