//! A small, size-limited file system for full-disk tests: a tmpfs mounted (as root) on a
//! fresh directory, resizable, with a helper that fills it to the last byte, unmounted on
//! drop, also when the test panics.

#![allow(dead_code)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a chosen size; see the module documentation.
pub struct Tmpfs {
    dir: PathBuf,
    // Dropped after `Drop::drop` has unmounted `dir`.
    _parent: tempfile::TempDir,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_mib` MiB (mode 0755, so the server user can reach what a test
    /// puts there).
    pub fn mount(size_mib: u64) -> Tmpfs {
        let parent = tempfile::Builder::new()
            .prefix("pgkeep-fulldisk-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let d = dir.to_str().unwrap();
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size_mib}M,mode=0755"),
            "tmpfs",
            d,
        ])
        .expect("mounting a tmpfs (needs root)");
        Tmpfs {
            dir,
            _parent: parent,
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Gives the file system a new size (what it holds stays).
    pub fn resize(&self, size_mib: u64) {
        run(&[
            "mount",
            "-o",
            &format!("remount,size={size_mib}M"),
            self.dir.to_str().unwrap(),
        ])
        .unwrap();
    }

    /// (total, free) bytes, as statvfs reports them.
    fn stat(&self) -> (u64, u64) {
        let out = Command::new("stat")
            .args(["-f", "-c", "%b %a %S"])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(out.status.success());
        let s = String::from_utf8(out.stdout).unwrap();
        let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
        (v[0] * v[2], v[1] * v[2])
    }

    /// Bytes free.
    pub fn free(&self) -> u64 {
        self.stat().1
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        let (total, free) = self.stat();
        total - free
    }

    /// Writes zeros into `name` (owned by root, so the server user cannot remove it) until the
    /// file system is full; returns the file, whose removal frees the space again.
    pub fn fill(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for chunk in [1 << 20, 64 << 10, 4 << 10, 512, 1] {
            loop {
                match f.write(&zeros[..chunk]) {
                    Ok(n) if n == chunk => {}
                    Ok(_) => break,
                    Err(e) if e.raw_os_error() == Some(28) => break,
                    Err(e) => panic!("filling {}: {e}", p.display()),
                }
            }
        }
        assert_eq!(self.free(), 0, "{} is full", self.dir.display());
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let d = self.dir.to_str().unwrap();
        // A process still using it (a server being stopped) makes a plain umount fail: detach
        // it then, so the mount never outlives the test.
        if run(&["umount", d]).is_err() {
            if let Err(e) = run(&["umount", "-l", d]) {
                eprintln!("cannot unmount {d}: {e}");
            }
        }
    }
}
