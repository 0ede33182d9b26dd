//! A repository in a local directory.
//!
//! Not object_store's `LocalFileSystem`: that one neither fsyncs nor sets modes, and a backup
//! repository needs both. Every write goes to a temporary file (`.tmp-…`) in the target's
//! directory, is fsynced, renamed into place and the directory fsynced, so after a crash a
//! key holds either nothing or the whole object.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::{validate_key, validate_prefix, ErrorKind, ObjectMeta, Result, Storage, StorageError};

/// Mode of every file we create, whatever the umask (invariant 7).
const FILE_MODE: u32 = 0o600;
/// Mode of every directory we create, whatever the umask (invariant 7).
const DIR_MODE: u32 = 0o700;
/// Prefix of temporary files; never listed, never valid as a key segment.
const TMP_PREFIX: &str = ".tmp-";

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Objects as files under a root directory; keys map to relative paths.
///
/// Invariants: writes are atomic and durable (temp file + fsync + rename + directory
/// fsync); `put_if_absent` has exactly one winner among concurrent writers (hard link or
/// `renameat2(RENAME_NOREPLACE)`, both atomic in the kernel); files are 0600 and
/// directories 0700; temp files are removed on every failure path and never listed.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Opens (creating it, mode 0700, when missing) the directory `root`. A relative path
    /// is resolved against the current directory now, so later `chdir`s do not matter.
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| io_err(e, "resolve the current directory for", root))?
                .join(root)
        };
        create_dirs(&root)?;
        let md = fs::metadata(&root).map_err(|e| io_err(e, "open repository directory", &root))?;
        if !md.is_dir() {
            return Err(StorageError::new(
                ErrorKind::Config,
                None,
                format!(
                    "{} is not a directory. HINT: point the repository at a directory",
                    root.display()
                ),
            ));
        }
        Ok(LocalStorage { root })
    }

    /// The root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        tokio::task::spawn_blocking(f).await.map_err(|e| {
            StorageError::new(
                ErrorKind::Other,
                None,
                format!("local storage task failed: {e}"),
            )
        })?
    }
}

/// Maps an I/O error to a storage error whose message names the path and what to do.
fn io_err(e: io::Error, what: &str, path: &Path) -> StorageError {
    let (kind, hint) = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => (
            ErrorKind::StorageFull,
            "HINT: free space on that file system (or raise the quota), then rerun; \
             nothing partial was left under a final name",
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => (
            ErrorKind::PermissionDenied,
            "HINT: check the owner and mode of the repository directory (pgkeep wants 0700 \
             directories and 0600 files owned by the user running it)",
        ),
        Some(libc::EROFS) => (
            ErrorKind::PermissionDenied,
            "HINT: the file system is mounted read-only; remount it read-write",
        ),
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::EISDIR) => (
            ErrorKind::NotFound,
            "HINT: check the key and the repository path",
        ),
        Some(libc::EINTR) | Some(libc::EAGAIN) => (ErrorKind::Temporary, "HINT: retry"),
        _ => (
            ErrorKind::Other,
            "HINT: check the file system and the system log",
        ),
    };
    StorageError::new(
        kind,
        None,
        format!("cannot {what} {}: {e}. {hint}", path.display()),
    )
}

fn with_key(mut e: StorageError, key: &str) -> StorageError {
    e.key = Some(key.to_owned());
    e
}

/// Creates `dir` and its missing parents with mode 0700 (set explicitly, since DirBuilder's
/// mode is filtered by the umask), fsyncing each parent so the new entries are durable.
fn create_dirs(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs(parent)?;
    }
    match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
                .map_err(|e| io_err(e, "set the mode of directory", dir))?;
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
            Ok(())
        }
        // Another writer created it between our check and mkdir: fine.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_err(e, "create directory", dir)),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(e, "fsync directory", dir))
}

/// Removes the temporary file when dropped unless disarmed: every failure path cleans up.
struct TempGuard {
    path: Option<PathBuf>,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = fs::remove_file(p);
        }
    }
}

/// Writes `data` into a fresh 0600 temp file next to `target` and fsyncs it.
fn write_temp(target: &Path, data: &[u8]) -> Result<(PathBuf, TempGuard)> {
    let dir = target.parent().expect("keys are never the root");
    create_dirs(dir)?;
    let name = format!(
        "{TMP_PREFIX}{}-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    );
    let tmp = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(|e| io_err(e, "create temporary file", &tmp))?;
    let guard = TempGuard {
        path: Some(tmp.clone()),
    };
    // The umask may have removed bits from FILE_MODE: set it explicitly.
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))
        .map_err(|e| io_err(e, "set the mode of", &tmp))?;
    if data.len() < DIRECT_MIN || !write_direct(&f, data) {
        f.set_len(0)
            .and_then(|()| f.write_all(data))
            .map_err(|e| io_err(e, "write temporary file", &tmp))?;
    }
    f.sync_all()
        .map_err(|e| io_err(e, "fsync temporary file", &tmp))?;
    // Crash tests kill here: a complete temp file that never got its final name.
    crate::crashpoint::reached(crate::crashpoint::KillPoint::BeforeRename);
    Ok((tmp, guard))
}

/// Objects at least this large (packs, WAL segments) are written with `O_DIRECT`.
const DIRECT_MIN: usize = 1 << 20;
/// Alignment of `O_DIRECT` buffers, offsets and lengths.
const DIRECT_ALIGN: usize = crate::DIRECT_IO_ALIGN;
/// Size of the aligned staging buffer that each writing thread keeps.
const DIRECT_PIECE: usize = 4 << 20;

thread_local! {
    static DIRECT_BUF: std::cell::RefCell<Option<crate::AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

/// Writes `data` to the empty file `f` with `O_DIRECT`, staged through this thread's aligned
/// buffer; false when the file system refuses direct I/O (tmpfs, some FUSE and network file
/// systems), so the caller writes through the page cache instead.
///
/// Why: a pack is written once, fsynced at once and rarely read soon, so copying it into the
/// page cache only costs CPU (on a fresh VM, where every new page-cache page is a host fault,
/// about 2 s of system time per GiB) and evicts pages PostgreSQL needs. The last piece is
/// padded to the alignment and the file then truncated to its true length.
fn write_direct(f: &File, data: &[u8]) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) } < 0
    {
        return false;
    }
    let ok = DIRECT_BUF.with(|cell| {
        let mut slot = cell.borrow_mut();
        let buf = slot
            .get_or_insert_with(|| crate::AlignedBuf::new(DIRECT_PIECE))
            .as_mut_slice();
        let mut offset = 0usize;
        for piece in data.chunks(DIRECT_PIECE) {
            let padded = piece.len().div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
            buf[..piece.len()].copy_from_slice(piece);
            buf[piece.len()..padded].fill(0);
            if f.write_all_at(&buf[..padded], offset as u64).is_err() {
                return false;
            }
            offset += piece.len();
        }
        true
    });
    // SAFETY: as above; back to buffered I/O for the truncate, the fallback and fsync.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags) };
    ok && f.set_len(data.len() as u64).is_ok()
}

/// Renames `from` to `to` only if `to` does not exist. Ok(false) when it exists.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_from = CString::new(from.as_os_str().as_bytes())?;
    let c_to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(false),
        // The file system does not know RENAME_NOREPLACE: a hard link is just as atomic.
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            match fs::hard_link(from, to) {
                Ok(()) => {
                    let _ = fs::remove_file(from);
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        }
        _ => Err(err),
    }
}

fn meta_of(key: String, md: &fs::Metadata) -> ObjectMeta {
    let last_modified: DateTime<Utc> = md.modified().map(DateTime::<Utc>::from).unwrap_or_default();
    ObjectMeta {
        key,
        size: md.len(),
        last_modified,
    }
}

/// Walks `dir` recursively, collecting files whose key (relative to `root`) starts with
/// `prefix`. Temp files and anything that is not a regular file are skipped.
fn walk(root: &Path, dir: &Path, prefix: &str, out: &mut Vec<ObjectMeta>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(e, "list directory", dir)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err(e, "list directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("walk stays below the root")
            .to_str()
            .expect("built from UTF-8 parts")
            .to_owned();
        let ft = entry.file_type().map_err(|e| io_err(e, "stat", &path))?;
        if ft.is_dir() {
            // Descend only where keys can still match the prefix.
            let as_dir = format!("{rel}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                walk(root, &path, prefix, out)?;
            }
        } else if ft.is_file() && rel.starts_with(prefix) {
            match entry.metadata() {
                Ok(md) => out.push(meta_of(rel, &md)),
                // Deleted while we listed: it is simply not there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e, "stat", &path)),
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Storage for LocalStorage {
    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path_of(key)?;
        let k = key.to_owned();
        self.blocking(move || {
            fs::read(&path)
                .map(Bytes::from)
                .map_err(|e| with_key(io_err(e, "read object", &path), &k))
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path_of(key)?;
        if range.start > range.end {
            return Err(StorageError::new(
                ErrorKind::Other,
                Some(key),
                format!("invalid range {range:?} for {key} (this is a bug in the caller)"),
            ));
        }
        let k = key.to_owned();
        self.blocking(move || {
            let f = File::open(&path).map_err(|e| with_key(io_err(e, "open object", &path), &k))?;
            let size = f
                .metadata()
                .map_err(|e| with_key(io_err(e, "stat object", &path), &k))?
                .len();
            if range.end > size {
                return Err(StorageError::new(
                    ErrorKind::Corrupt,
                    Some(&k),
                    format!(
                        "object {k} ({}) is {size} bytes, shorter than the requested range \
                         {}..{}. HINT: the object is truncated or the index is wrong; run \
                         `pgkeep repo check`",
                        path.display(),
                        range.start,
                        range.end
                    ),
                ));
            }
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            f.read_exact_at(&mut buf, range.start).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    StorageError::new(
                        ErrorKind::Corrupt,
                        Some(&k),
                        format!("object {k} ({}) shrank while being read", path.display()),
                    )
                } else {
                    with_key(io_err(e, "read object", &path), &k)
                }
            })?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path_of(key)?;
        let k = key.to_owned();
        self.blocking(move || {
            let (tmp, mut guard) = write_temp(&path, &data).map_err(|e| with_key(e, &k))?;
            fs::rename(&tmp, &path).map_err(|e| with_key(io_err(e, "rename into", &path), &k))?;
            guard.path = None;
            fsync_dir(path.parent().expect("has parent")).map_err(|e| with_key(e, &k))
        })
        .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path_of(key)?;
        let k = key.to_owned();
        self.blocking(move || {
            if path.exists() {
                return Err(already_exists(&k, &path));
            }
            let (tmp, mut guard) = write_temp(&path, &data).map_err(|e| with_key(e, &k))?;
            let won = rename_noreplace(&tmp, &path)
                .map_err(|e| with_key(io_err(e, "create", &path), &k))?;
            if !won {
                return Err(already_exists(&k, &path));
            }
            guard.path = None;
            fsync_dir(path.parent().expect("has parent")).map_err(|e| with_key(e, &k))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        self.blocking(move || {
            // Start at the deepest directory the prefix names completely.
            let start = match prefix.rfind('/') {
                Some(i) => root.join(&prefix[..i]),
                None => root.clone(),
            };
            let mut out = Vec::new();
            walk(&root, &start, &prefix, &mut out)?;
            Ok(out)
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let path = self.path_of(key)?;
        let k = key.to_owned();
        self.blocking(move || {
            let md =
                fs::metadata(&path).map_err(|e| with_key(io_err(e, "stat object", &path), &k))?;
            if !md.is_file() {
                return Err(StorageError::not_found(&k));
            }
            Ok(meta_of(k, &md))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        let k = key.to_owned();
        self.blocking(move || match fs::remove_file(&path) {
            Ok(()) => fsync_dir(path.parent().expect("has parent")).map_err(|e| with_key(e, &k)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(with_key(io_err(e, "delete object", &path), &k)),
        })
        .await
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

fn already_exists(key: &str, path: &Path) -> StorageError {
    StorageError::new(
        ErrorKind::AlreadyExists,
        Some(key),
        format!("object {key} already exists ({})", path.display()),
    )
}
