//! Invariant 7 / RELIABILITY row 26: files 0600 and directories 0700 whatever the umask.
//! Its own test binary, because the umask is process-wide.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use pgkeep_storage::{conformance, LocalStorage, Storage};

fn modes(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, bool, u32)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = e.metadata().unwrap();
        out.push((e.path(), md.is_dir(), md.permissions().mode() & 0o7777));
        if md.is_dir() {
            modes(&e.path(), out);
        }
    }
}

#[tokio::test]
async fn modes_under_umask_000() {
    // SAFETY: umask(2) only changes this process's file creation mask.
    let old = unsafe { libc::umask(0) };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("new/repo");
    let s: Arc<dyn Storage> = Arc::new(LocalStorage::new(&root).unwrap());
    conformance::round_trip(s.clone()).await;
    conformance::put_if_absent_race(s.clone(), 16).await;
    conformance::list_semantics(s.clone()).await;
    unsafe { libc::umask(old) };

    let mut all = Vec::new();
    modes(&root, &mut all);
    assert!(
        all.iter().filter(|m| !m.1).count() >= 8,
        "too few files: {all:?}"
    );
    for (path, is_dir, mode) in &all {
        let want = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} has mode {mode:o}", path.display());
    }
    for d in [dir.path().join("new"), root.clone()] {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{} has mode {mode:o}", d.display());
    }
}
