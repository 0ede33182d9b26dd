//! Repository behaviour on a real local directory: what a user would check.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use pgkeep_repo::{
    CheckOptions, ErrorKind, InitOptions, KdfParams, LockKind, Repository, StreamRef, WriterOptions,
};
use pgkeep_storage::{LocalStorage, Storage};
use rand::{RngCore, SeedableRng};

fn fast_kdf() -> KdfParams {
    KdfParams {
        m_kib: 256,
        t: 1,
        p: 1,
    }
}

fn local(dir: &std::path::Path) -> Arc<dyn Storage> {
    Arc::new(LocalStorage::new(dir).unwrap())
}

/// Half text-like (compressible), half random.
fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    let half = len / 2;
    let words: [&[u8]; 6] = [
        b"select ", b"from ", b"pgkeep ", b"backup ", b"12345 ", b"\n",
    ];
    let mut i = 0;
    while i < half {
        let w = words[(rng.next_u32() % 6) as usize];
        let n = w.len().min(half - i);
        v[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
    rng.fill_bytes(&mut v[half..]);
    v
}

async fn store(repo: &Repository, data: Vec<u8>) -> (StreamRef, pgkeep_repo::WriteStats) {
    let w = repo.writer(WriterOptions::default());
    let w2 = w.clone();
    let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&data))
        .await
        .unwrap()
        .unwrap();
    let stats = w.finish().await.unwrap();
    (s, stats)
}

async fn read_back(repo: &Repository, s: &StreamRef) -> Result<Vec<u8>, pgkeep_repo::RepoError> {
    let mut out = Vec::new();
    repo.read_stream(s, &mut out).await?;
    Ok(out)
}

/// A sink that writes by position into memory, as a restore writes into a file.
#[derive(Default)]
struct VecSink(std::sync::Mutex<Vec<u8>>);

impl pgkeep_repo::PositionalSink for VecSink {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut v = self.0.lock().unwrap();
        let (start, end) = (offset as usize, offset as usize + data.len());
        if v.len() < end {
            v.resize(end, 0);
        }
        v[start..end].copy_from_slice(data);
        Ok(())
    }
}

/// Reads `s` through the out-of-order positional path, placed at `base`.
async fn read_back_at(
    repo: &Repository,
    s: &StreamRef,
    base: u64,
) -> Result<Vec<u8>, pgkeep_repo::RepoError> {
    let sink = Arc::new(VecSink::default());
    let n = repo.read_stream_at(s, base, sink.clone()).await?;
    assert_eq!(n, s.size, "read_stream_at reported a wrong length");
    let v = std::mem::take(&mut *sink.0.lock().unwrap());
    Ok(v.get(base as usize..)
        .map(<[u8]>::to_vec)
        .unwrap_or_default())
}

async fn plain_repo(dir: &std::path::Path) -> Repository {
    Repository::init(local(dir), InitOptions::default())
        .await
        .unwrap()
}

async fn encrypted_repo(dir: &std::path::Path, pass: &str) -> Repository {
    let opts = InitOptions {
        passphrase: Some(pass.into()),
        kdf: fast_kdf(),
        ..Default::default()
    };
    Repository::init(local(dir), opts).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_data_of_every_size_comes_back_identical() {
    for encrypted in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let repo = if encrypted {
            encrypted_repo(dir.path(), "pw").await
        } else {
            plain_repo(dir.path()).await
        };
        for (i, len) in [0usize, 1, 4095, 1 << 20, 3 * (1 << 20) + 17, 20 << 20]
            .into_iter()
            .enumerate()
        {
            let data = mixed_data(len, i as u64);
            let (s, _) = store(&repo, data.clone()).await;
            assert_eq!(s.size, len as u64);
            // Read through a freshly opened repository: nothing comes from memory.
            let pass = encrypted.then_some("pw");
            let reopened = Repository::open(local(dir.path()), pass).await.unwrap();
            let back = read_back(&reopened, &s).await.unwrap();
            assert!(
                back == data,
                "{len} bytes (encrypted: {encrypted}) differ after the round trip"
            );
            let at = read_back_at(&reopened, &s, 4096).await.unwrap();
            assert!(
                at == data,
                "{len} bytes (encrypted: {encrypted}) differ after the positional round trip"
            );
        }
        assert!(repo
            .check(CheckOptions { read_data: true })
            .await
            .unwrap()
            .is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingesting_the_same_data_twice_uploads_no_new_pack() {
    let dir = tempfile::tempdir().unwrap();
    let repo = plain_repo(dir.path()).await;
    let data = mixed_data(30 << 20, 7);
    let (s1, st1) = store(&repo, data.clone()).await;
    assert!(st1.packs > 0);
    let packs_before = repo.storage().list("packs/").await.unwrap().len();
    let reopened = Repository::open(local(dir.path()), None).await.unwrap();
    let (s2, st2) = store(&reopened, data).await;
    assert_eq!(s1, s2);
    assert_eq!(st2.packs, 0, "second ingest uploaded packs: {st2:?}");
    assert_eq!(st2.blobs_new, 0);
    assert_eq!(
        repo.storage().list("packs/").await.unwrap().len(),
        packs_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_change_stores_only_a_small_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let repo = plain_repo(dir.path()).await;
    let mut data = mixed_data(40 << 20, 9);
    let (_, first) = store(&repo, data.clone()).await;
    // Insert 100 bytes in the middle: content-defined chunking resynchronises.
    data.splice(20 << 20..20 << 20, std::iter::repeat_n(0xAB, 100));
    let (s, second) = store(&repo, data.clone()).await;
    assert!(
        second.bytes_new * 5 < first.bytes_new,
        "first {first:?}, second {second:?}"
    );
    assert_eq!(read_back(&repo, &s).await.unwrap(), data);
}

async fn one_pack_repo(dir: &std::path::Path) -> (Repository, StreamRef, String) {
    let repo = plain_repo(dir).await;
    let (s, _) = store(&repo, mixed_data(3 << 20, 3)).await;
    repo.save_manifest("main", "b1", &serde_json::json!({ "file": s }))
        .await
        .unwrap();
    let packs = repo.storage().list("packs/").await.unwrap();
    assert_eq!(packs.len(), 1);
    (repo, s, packs[0].key.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_a_pack_is_detected_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, s, pack) = one_pack_repo(dir.path()).await;
    let path = dir.path().join(&pack);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 0x01;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let err = read_back(&repo, &s).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    let msg = err.to_string();
    let pack_id = pack.rsplit('/').next().unwrap();
    assert!(msg.contains(pack_id) && msg.contains("blob"), "{msg}");
    let report = repo.check(CheckOptions { read_data: true }).await.unwrap();
    assert!(!report.is_ok());
    assert!(
        report.problems.iter().any(|p| p.object.contains(pack_id)),
        "{report:?}"
    );
    assert_eq!(report.damaged_manifests, vec!["main/b1".to_string()]);
    // Without --read-data the structure is intact, so check passes.
    assert!(repo.check(CheckOptions::default()).await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_passphrase_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = encrypted_repo(dir.path(), "right").await;
    store(&repo, mixed_data(1 << 20, 1)).await;
    let before = listing(dir.path());
    let err = Repository::open(local(dir.path()), Some("wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
    assert!(!err.to_string().contains("right"));
    let err = Repository::open(local(dir.path()), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PassphraseRequired);
    assert_eq!(before, listing(dir.path()));
}

/// RELIABILITY.md row 13: the `config` object is plain JSON. Flipping its `encrypted` to
/// false used to open the repository as plain, and every later write was stored unencrypted
/// beside the encrypted data, without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_flipped_to_plain_beside_key_files_is_refused_as_an_encryption_downgrade() {
    let dir = tempfile::tempdir().unwrap();
    let repo = encrypted_repo(dir.path(), "right").await;
    store(&repo, mixed_data(1 << 20, 1)).await;
    let config = dir.path().join("config");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"encrypted\": true"), "{text}");
    std::fs::write(
        &config,
        text.replace("\"encrypted\": true", "\"encrypted\": false"),
    )
    .unwrap();
    let before = listing(dir.path());
    for passphrase in [Some("right"), None] {
        let err = Repository::open(local(dir.path()), passphrase)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
        assert!(
            err.to_string().contains(
                "it says the repository is not encrypted, but the repository holds 1 key file(s)"
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("right"), "{err}");
    }
    assert_eq!(
        before,
        listing(dir.path()),
        "a refused open wrote something"
    );
    // Set back, it opens and reads as before.
    std::fs::write(&config, text).unwrap();
    let back = Repository::open(local(dir.path()), Some("right"))
        .await
        .unwrap();
    let (s2, _) = store(&back, mixed_data(1 << 19, 2)).await;
    assert_eq!(read_back(&back, &s2).await.unwrap(), mixed_data(1 << 19, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_can_be_added_and_removed_without_rewriting_data() {
    let dir = tempfile::tempdir().unwrap();
    let repo = encrypted_repo(dir.path(), "one").await;
    let (s, _) = store(&repo, mixed_data(2 << 20, 5)).await;
    let packs = listing(&dir.path().join("packs"));
    let k2 = repo.add_key("two").await.unwrap();
    let by_two = Repository::open(local(dir.path()), Some("two"))
        .await
        .unwrap();
    assert_eq!(
        read_back(&by_two, &s).await.unwrap(),
        mixed_data(2 << 20, 5)
    );
    // The key in use cannot be removed; the other one can.
    assert!(by_two.remove_key(&k2.id).await.is_err());
    let first = repo.key_id().unwrap().to_string();
    by_two.remove_key(&first).await.unwrap();
    let err = Repository::open(local(dir.path()), Some("one"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::WrongPassphrase);
    assert_eq!(
        packs,
        listing(&dir.path().join("packs")),
        "packs were rewritten"
    );
    assert!(
        by_two.remove_key(&k2.id[..8]).await.is_err(),
        "removed the last key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_conflict_by_kind_and_scope_and_stale_ones_are_removable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = plain_repo(dir.path()).await;
    let a = repo
        .lock(LockKind::Shared, Some("backup:main"), "backup")
        .await
        .unwrap();
    let b = repo
        .lock(LockKind::Shared, Some("backup:other"), "backup")
        .await
        .unwrap();
    let err = repo
        .lock(LockKind::Shared, Some("backup:main"), "backup")
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Locked);
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(repo
        .lock(LockKind::Exclusive, None, "expire")
        .await
        .is_err());
    a.release().await.unwrap();
    b.release().await.unwrap();
    let x = repo
        .lock(LockKind::Exclusive, None, "expire")
        .await
        .unwrap();
    assert!(repo.lock(LockKind::Shared, None, "backup").await.is_err());
    x.release().await.unwrap();
    assert!(
        repo.storage().list("locks/").await.unwrap().is_empty(),
        "a failed attempt left a lock"
    );

    // A lock of a dead process on this host is stale: it blocks nothing and unlock removes it.
    let dead = serde_json::json!({"exclusive": true, "scope": null, "purpose": "backup",
        "host": pgkeep_repo::lock::hostname(), "pid": 999_999_999u32, "created": "2026-01-01T00:00:00Z"});
    repo.storage()
        .put("locks/deadbeef", serde_json::to_vec(&dead).unwrap().into())
        .await
        .unwrap();
    let l = repo.lock(LockKind::Shared, None, "backup").await.unwrap();
    let removed = repo.unlock(false).await.unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].id, "deadbeef");
    l.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_never_references_uncommitted_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let repo = plain_repo(dir.path()).await;
    let w = repo.writer(WriterOptions::default());
    let w2 = w.clone();
    let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&mixed_data(2 << 20, 11)))
        .await
        .unwrap()
        .unwrap();
    // Before finish the blobs are not indexed: saving must be refused.
    let err = repo
        .save_manifest("main", "early", &serde_json::json!({ "f": s }))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not indexed"), "{err}");
    w.finish().await.unwrap();
    repo.save_manifest("main", "late", &serde_json::json!({ "f": s }))
        .await
        .unwrap();
    // Manifests are write-once.
    assert!(repo
        .save_manifest("main", "late", &serde_json::json!({}))
        .await
        .is_err());
    let m = repo.list_manifests(Some("main")).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].id, "late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_0600_and_directories_0700_under_umask_000() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    let old = unsafe { libc::umask(0) };
    let repo = encrypted_repo(&root, "pw").await;
    let (s, _) = store(&repo, mixed_data(2 << 20, 2)).await;
    repo.save_manifest("main", "b", &serde_json::json!({ "s": s }))
        .await
        .unwrap();
    let l = repo.lock(LockKind::Shared, None, "t").await.unwrap();
    unsafe { libc::umask(old) };
    for p in walk(&root) {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", p.display());
    }
    l.release().await.unwrap();
}
fn listing(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        out.push((
            e.display().to_string(),
            std::fs::read(&e).unwrap_or_default(),
        ));
    }
    out.sort();
    out
}
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.push(p.clone());
            v.extend(walk(&p));
        } else {
            v.push(p);
        }
    }
    v
}

/// RELIABILITY row 10: a garbled or short read during a restore is detected by the hash/AEAD
/// and read again; when it persists, the error names the blob and the pack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_read_is_retried_and_a_persistent_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(pgkeep_storage::Faulty::new(
        LocalStorage::new(dir.path()).unwrap(),
    ));
    let storage: Arc<dyn Storage> = faulty.clone();
    let opts = InitOptions {
        passphrase: Some("pw".into()),
        kdf: fast_kdf(),
        ..Default::default()
    };
    let repo = Repository::init(storage, opts).await.unwrap();
    let data = mixed_data(3 << 20, 21);
    let (s, _) = store(&repo, data.clone()).await;

    faulty.flip_next_reads(1);
    assert_eq!(
        read_back(&repo, &s).await.unwrap(),
        data,
        "one flipped read was not retried"
    );
    faulty.cut_next_reads(1, 100);
    assert_eq!(
        read_back(&repo, &s).await.unwrap(),
        data,
        "one short read was not retried"
    );

    faulty.flip_next_reads(1);
    assert_eq!(
        read_back_at(&repo, &s, 0).await.unwrap(),
        data,
        "one flipped positional read was not retried"
    );
    faulty.cut_next_reads(1, 100);
    assert_eq!(
        read_back_at(&repo, &s, 0).await.unwrap(),
        data,
        "one short positional read was not retried"
    );

    faulty.flip_next_reads(1000);
    let err = read_back_at(&repo, &s, 0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    faulty.flip_next_reads(1000);
    let err = read_back(&repo, &s).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    assert!(
        err.to_string().contains("blob") && err.to_string().contains("pack"),
        "{err}"
    );
}

/// A pack that waited `index_every` for an index file gets one without waiting for
/// `index_every_packs` more: what a killed backup stored is found again by its rerun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_packs_are_indexed_after_index_every_even_below_the_pack_count() {
    for (every, at_most) in [
        (std::time::Duration::ZERO, usize::MAX),
        (std::time::Duration::from_secs(3600), 1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            pack_size: 1 << 20,
            ..Default::default()
        };
        let repo = Repository::init(local(dir.path()), opts).await.unwrap();
        let w = repo.writer(WriterOptions {
            index_every_packs: 1000,
            uploads: 1,
            index_every: every,
            ..Default::default()
        });
        let w2 = w.clone();
        let data = mixed_data(12 << 20, 5);
        tokio::task::spawn_blocking(move || w2.ingest_bytes(&data))
            .await
            .unwrap()
            .unwrap();
        let stats = w.finish().await.unwrap();
        assert!(stats.packs >= 4, "{stats:?}");
        let index_files = stats.index_files as usize;
        if at_most == 1 {
            assert_eq!(index_files, 1, "no pack was overdue: one index at the end");
        } else {
            assert!(
                index_files >= 3,
                "every pack was overdue at once, yet only {index_files} index files for {} packs",
                stats.packs
            );
        }
    }
}

async fn store_in_pieces(
    repo: &Repository,
    data: Vec<u8>,
    piece: usize,
) -> (StreamRef, pgkeep_repo::WriteStats) {
    let w = repo.writer(WriterOptions::default());
    let w2 = w.clone();
    let s = tokio::task::spawn_blocking(move || {
        w2.ingest_reader_in_pieces(&mut std::io::Cursor::new(data), piece)
    })
    .await
    .unwrap()
    .unwrap();
    let stats = w.finish().await.unwrap();
    (s, stats)
}

/// Pieces have been stored whole since 2026-12-05. A repository made before (its `config`
/// has no `whole_pieces`) must keep cutting them with FastCDC: otherwise every piece would
/// get new blob ids and the first backup after an upgrade would store the cluster again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_made_before_whole_pieces_keeps_cutting_them_so_old_blobs_still_dedupe() {
    let dir = tempfile::tempdir().unwrap();
    let repo = plain_repo(dir.path()).await;
    assert!(repo.config().chunker.whole_pieces, "new repositories");
    let path = dir.path().join("config");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(v["chunker"]["whole_pieces"], true, "{v}");
    v["chunker"].as_object_mut().unwrap().remove("whole_pieces");
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();

    let old = Repository::open(local(dir.path()), None).await.unwrap();
    assert!(!old.config().chunker.whole_pieces);
    let piece = 1 << 20;
    let data = mixed_data(24 << 20, 3);
    let (s1, _) = store_in_pieces(&old, data.clone(), piece).await;
    assert!(
        s1.blobs.len() > 24,
        "cut inside pieces: {} blobs",
        s1.blobs.len()
    );
    let (s2, second) = store_in_pieces(&old, data.clone(), piece).await;
    assert_eq!(s1, s2);
    assert_eq!(second.blobs_new, 0, "{second:?}");
    assert_eq!(read_back(&old, &s1).await.unwrap(), data);

    // The same data in a new repository: one blob per piece.
    let dir2 = tempfile::tempdir().unwrap();
    let new = plain_repo(dir2.path()).await;
    let (s3, _) = store_in_pieces(&new, data.clone(), piece).await;
    assert_eq!(s3.blobs.len(), 24);
    assert_eq!(read_back(&new, &s3).await.unwrap(), data);
}
