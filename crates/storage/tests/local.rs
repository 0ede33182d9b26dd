//! LocalStorage: the conformance suite plus what only a file system can get wrong
//! (temp files, disk full, read-only file systems).

use std::process::Command;
use std::sync::Arc;

use bytes::Bytes;
use pgkeep_storage::{conformance, ErrorKind, LocalStorage, Storage};

#[tokio::test]
async fn local_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let s: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir.path().join("repo")).unwrap());
    conformance::run_all(s).await;
}

#[tokio::test]
async fn relative_root_is_resolved_once() {
    let dir = tempfile::tempdir_in(".").unwrap();
    let rel = dir.path().file_name().unwrap().to_owned();
    let s = LocalStorage::new(&rel).unwrap();
    assert!(s.root().is_absolute());
    s.put("k", Bytes::from_static(b"v")).await.unwrap();
    assert_eq!(std::fs::read(dir.path().join("k")).unwrap(), b"v");
}

#[tokio::test]
async fn invalid_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path()).unwrap();
    for key in ["", "/abs", "a//b", "a/../b", "..", "a/.tmp-x", "a/"] {
        let e = s.put(key, Bytes::from_static(b"x")).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Other, "key {key:?}: {e}");
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
}

#[tokio::test]
async fn temp_files_are_never_listed() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path()).unwrap();
    s.put("a/b", Bytes::from_static(b"x")).await.unwrap();
    // A temp file left by a killed writer.
    std::fs::write(dir.path().join("a/.tmp-1234-0-0"), b"partial").unwrap();
    let keys: Vec<String> = s
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(keys, vec!["a/b"]);
}

/// A small tmpfs mounted over a temp dir; unmounted on drop. The tests run as root (as
/// `.ci/run` does); without the privilege to mount, the test fails saying so.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn new(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }
    fn remount_ro(&self) {
        let st = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in walk(dir) {
        v.push(e.strip_prefix(dir).unwrap().display().to_string());
    }
    v.sort();
    v
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// RELIABILITY row 5: disk full mid-write fails cleanly, names the path, leaves no temp
/// file and nothing under the final name, and earlier objects stay readable.
#[tokio::test]
async fn disk_full_is_clean() {
    let fs = SmallFs::new("1m");
    let s = LocalStorage::new(fs.dir.path()).unwrap();
    s.put("packs/aa/first", Bytes::from(vec![7u8; 100_000]))
        .await
        .unwrap();
    let before = entries(fs.dir.path());
    let big = Bytes::from(vec![1u8; 2 << 20]);
    for r in [
        s.put("packs/aa/second", big.clone()).await,
        s.put_if_absent("packs/aa/third", big.clone()).await,
    ] {
        let e = r.unwrap_err();
        assert_eq!(e.kind, ErrorKind::StorageFull, "{e}");
        assert!(
            e.message.contains(&fs.dir.path().display().to_string()),
            "{e}"
        );
        assert!(e.message.contains("HINT"), "{e}");
    }
    assert_eq!(
        entries(fs.dir.path()),
        before,
        "a temp or partial file was left behind"
    );
    assert_eq!(s.get("packs/aa/first").await.unwrap().len(), 100_000);
}

/// A read-only repository file system is a permission problem, reported with a hint.
#[tokio::test]
async fn read_only_fs_is_permission_denied() {
    let fs = SmallFs::new("1m");
    let s = LocalStorage::new(fs.dir.path()).unwrap();
    s.put("a/x", Bytes::from_static(b"x")).await.unwrap();
    fs.remount_ro();
    let e = s.put("a/y", Bytes::from_static(b"y")).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
    assert!(e.message.contains("read-only"), "{e}");
    let e = s.delete("a/x").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
    assert_eq!(&s.get("a/x").await.unwrap()[..], b"x");
}

#[tokio::test]
async fn short_file_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path()).unwrap();
    s.put("p", Bytes::from(vec![0u8; 10])).await.unwrap();
    let e = s.get_range("p", 5..11).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
    assert!(e.message.contains("10 bytes"), "{e}");
}

/// Objects of 1 MiB and more are written with O_DIRECT through an aligned staging buffer,
/// padded and truncated back; file systems that refuse direct I/O get buffered writes. Sizes
/// straddle the threshold, the alignment and the staging-buffer size, on ext4 (the test's
/// temp dir) and on tmpfs.
#[tokio::test]
async fn large_objects_round_trip_byte_exact_with_direct_io_and_without() {
    use std::os::unix::fs::PermissionsExt;
    let tmpfs = SmallFs::new("64m");
    let disk = tempfile::tempdir().unwrap();
    for root in [disk.path(), tmpfs.dir.path()] {
        let s = LocalStorage::new(root.join("repo")).unwrap();
        for (i, size) in [
            (1usize << 20) - 1,
            1 << 20,
            (1 << 20) + 1,
            (4 << 20) + 4095,
            4 << 20,
            (9 << 20) + 17,
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..size)
                .map(|j| (j as u32).wrapping_mul(2654435761).rotate_right(13) as u8)
                .collect();
            let key = format!("packs/{i:02}/obj");
            s.put(&key, Bytes::from(data.clone())).await.unwrap();
            let back = s.get(&key).await.unwrap();
            assert!(
                back[..] == data[..],
                "{size} bytes under {}",
                root.display()
            );
            let md = std::fs::metadata(root.join("repo").join(&key)).unwrap();
            assert_eq!(md.len(), size as u64);
            assert_eq!(md.permissions().mode() & 0o777, 0o600);
            let tail = s
                .get_range(&key, size as u64 - 5..size as u64)
                .await
                .unwrap();
            assert_eq!(&tail[..], &data[size - 5..]);
            s.put_if_absent(&format!("{key}-2"), Bytes::from(data))
                .await
                .unwrap();
        }
        assert!(
            entries(&root.join("repo"))
                .iter()
                .all(|e| !e.contains(".tmp-")),
            "a temp file was left"
        );
    }
}
