//! Physical backups and restores of real PostgreSQL 15 clusters (pgkeep_testing::Cluster) into
//! a repository in a temporary directory, and once into SeaweedFS.
//!
//! What a user relies on: a backup taken under write load restores to a cluster that starts
//! and holds exactly the data of the backup's end point; tablespaces survive (relocated);
//! `--delta` over a stale copy gives the very same files as a fresh restore; a second backup
//! after a small change stores a small fraction of the first; a corrupted page is named by
//! file and block; a second backup of the same cluster is locked out (exit 11); another
//! cluster under the same name is refused (exit 15); a non-empty or running target is
//! refused (exit 2).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgkeep_core::commands::backup::{backup, BackupOptions};
use pgkeep_core::commands::list::{info, list, InfoOptions, ListOptions};
use pgkeep_core::commands::restore::{
    restore, RestoreOptions, TablespaceMapping, INCOMPLETE_MARKER,
};
use pgkeep_core::progress::{NoProgress, Phase, Progress};
use pgkeep_core::Report;
use pgkeep_repo::{InitOptions, KdfParams, LockKind, Repository};
use pgkeep_storage::{LocalStorage, Storage};
use pgkeep_testing::cluster::{first_difference, PG_BIN_DIR};
use pgkeep_testing::Cluster;

type TestResult = anyhow::Result<()>;

async fn local_repo(dir: &Path) -> Repository {
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir).unwrap());
    Repository::init(storage, InitOptions::default())
        .await
        .unwrap()
}

fn opts(c: &Cluster, cluster: &str) -> BackupOptions {
    BackupOptions {
        cluster: cluster.into(),
        pgdata: Some(c.pgdata().to_path_buf()),
        conninfo: Some(c.conninfo()),
        label: Some("test".into()),
        full_read: false,
        threads: 0,
        relation_chunk_size: 0,
        archive_timeout_secs: None,
        method: Default::default(),
    }
}

fn restore_opts(id: &str, target: &Path) -> RestoreOptions {
    RestoreOptions {
        cluster: "main".into(),
        id: id.into(),
        target_dir: target.to_path_buf(),
        ..RestoreOptions::default()
    }
}

/// Runs a closure when the backup reaches `pg_backup_stop` (the hook tests use to freeze the
/// source and take the reference dump of the backup's end point), and records phases.
struct Hook<'a> {
    at_stop: Mutex<Option<Box<dyn FnOnce() + Send + 'a>>>,
    phases: Mutex<Vec<Phase>>,
    bytes: AtomicU64,
}

impl<'a> Hook<'a> {
    fn new(f: impl FnOnce() + Send + 'a) -> Self {
        Hook {
            at_stop: Mutex::new(Some(Box::new(f))),
            phases: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
        }
    }
}

impl Progress for Hook<'_> {
    fn begin(&self, phase: Phase, _: u64, _: u64) {
        self.phases.lock().unwrap().push(phase);
    }
    fn advance(&self, bytes: u64, _: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn note(&self, message: &str) {
        if message == "pg_backup_stop" {
            if let Some(f) = self.at_stop.lock().unwrap().take() {
                f();
            }
        }
    }
}

/// A writer that runs short pgbench rounds until stopped; `stop` returns once the round in
/// progress has finished, so nothing is in flight afterwards.
struct Writer {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(c: &Cluster) -> Writer {
        let env = c.env();
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let out = std::process::Command::new(format!("{PG_BIN_DIR}/pgbench"))
                    .envs(env.clone())
                    .args(["-n", "-c", "2", "-T", "1"])
                    .output()
                    .expect("pgbench");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        Writer {
            stop,
            rounds,
            handle: Some(handle),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("writer thread");
        }
        self.rounds.load(Ordering::SeqCst)
    }
}

/// Every entry under `root` (tablespace links followed into their locations under the same
/// relative path): kind, mode and content (or link target, with tablespace locations
/// normalized away). `tablespace_map` holds locations: only its presence counts.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                out.insert(r.clone(), "symlink".into());
                if rel == "pg_tblspc" {
                    walk(&std::fs::read_link(e.path()).unwrap(), &r, out);
                }
            } else if meta.is_dir() {
                out.insert(r.clone(), format!("dir {mode:o}"));
                walk(&e.path(), &r, out);
            } else if r == "tablespace_map" {
                out.insert(r, "present".into());
            } else {
                let data = std::fs::read(e.path()).unwrap();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                data.hash(&mut h);
                out.insert(r, format!("file {mode:o} {} {:x}", data.len(), h.finish()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, "", &mut out);
    out
}

fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    for (k, v) in &ta {
        assert_eq!(
            Some(v),
            tb.get(k),
            "{k} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
    for k in tb.keys() {
        assert!(ta.contains_key(k), "{k} only in {}", b.display());
    }
}

/// Waits until `since` is older than the unchanged-file safety margin, so files written by
/// initdb can be recognised as unchanged by the next backup.
fn wait_past_margin(since: Instant) {
    let need = pgkeep_core::commands::backup::MTIME_SAFETY_MARGIN + Duration::from_secs(1);
    if since.elapsed() < need {
        std::thread::sleep(need - since.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_under_load_restores_exactly_with_tablespace_incremental_and_delta() -> TestResult {
    let src = Cluster::builder().setting("max_wal_size", "1GB").start()?;
    // After initdb and the start, not before: on a loaded machine initdb alone took long
    // enough that the files it wrote last fell inside the margin of backup 1's start and
    // backup 2 found no file unchanged.
    let created = Instant::now();
    let ts_dir = src.scratch_dir("ts1")?;
    src.sql(&format!(
        "create tablespace ts1 location '{}'",
        ts_dir.display()
    ))?;
    src.sql(
        "create table in_ts(id int primary key, v text) tablespace ts1; \
         insert into in_ts select g, md5(g::text) from generate_series(1, 20000) g",
    )?;
    src.pgbench(&["-i", "-s", "4", "-q"])?;
    let ts_oid: u32 = src
        .sql("select oid from pg_tablespace where spcname = 'ts1'")?
        .parse()?;
    wait_past_margin(created);

    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;

    // Backup 1 under pgbench load; the writer stops right before pg_backup_stop and the
    // reference dump is taken then: it is the content at the backup's end point.
    let mut writer = Writer::start(&src);
    std::thread::sleep(Duration::from_millis(500));
    let dump_a: Mutex<Option<String>> = Mutex::new(None);
    let rounds: AtomicU64 = AtomicU64::new(0);
    let hook = Hook::new(|| {
        rounds.store(writer.stop(), Ordering::SeqCst);
        *dump_a.lock().unwrap() = Some(src.pg_dump("postgres").unwrap());
    });
    let t = Instant::now();
    let r1 = backup(&repo, &opts(&src, "main"), &hook).await?;
    let backup1_secs = t.elapsed().as_secs_f64();
    let phases = hook.phases.lock().unwrap().clone();
    let hook_bytes = hook.bytes.load(Ordering::Relaxed);
    drop(hook);
    let dump_a = dump_a
        .into_inner()
        .unwrap()
        .expect("the hook ran at pg_backup_stop");
    assert!(
        rounds.load(Ordering::SeqCst) >= 1,
        "the writer ran during the backup"
    );
    assert_eq!(phases, vec![Phase::Backup, Phase::Wal]);
    assert!(
        r1.warnings.is_empty() && r1.page_checksum_failures.is_empty(),
        "{r1}"
    );
    assert_eq!(r1.exit_code(), 0);
    assert!(r1.totals.wal_files >= 1);
    assert!(r1.totals.logical_bytes > 40 << 20, "{r1}");
    assert!(hook_bytes >= r1.totals.bytes_read);
    eprintln!("backup 1: {backup1_secs:.1} s, {r1}");

    let m1 = pgkeep_core::manifest::load_physical(&repo, "main", &r1.id).await?;
    assert_eq!(m1.tablespaces.len(), 1);
    assert_eq!(m1.tablespaces[0].oid, ts_oid);
    assert_eq!(Path::new(&m1.tablespaces[0].location), ts_dir.as_path());
    assert!(m1
        .tablespace_map
        .as_deref()
        .unwrap_or("")
        .contains(&ts_oid.to_string()));
    assert!(m1.backup_label.contains("START WAL LOCATION"));
    let json = serde_json::to_string(&m1)?;
    assert!(
        !json.contains("conninfo") && !json.contains(&src.conninfo()),
        "no connection string in the manifest"
    );
    assert!(m1.files.iter().any(|f| f.path == "global/pg_control"));
    assert!(!m1
        .files
        .iter()
        .any(|f| f.path == "postmaster.pid" || f.path.starts_with("pg_wal/0")));
    assert!(m1
        .files
        .iter()
        .any(|f| f.path.starts_with(&format!("pg_tblspc/{ts_oid}/PG_15_"))));

    // Fresh restore, tablespace relocated; the restored cluster starts and has the same data.
    let work = tempfile::tempdir()?;
    let r1_dir = work.path().join("r1");
    let ts_r1 = work.path().join("ts_r1");
    let map = |to: &Path| {
        vec![TablespaceMapping {
            old: ts_dir.display().to_string(),
            new: to.display().to_string(),
        }]
    };
    let t = Instant::now();
    let rr = restore(
        &repo,
        &RestoreOptions {
            tablespace_map: map(&ts_r1),
            ..restore_opts("latest", &r1_dir)
        },
        &NoProgress,
    )
    .await?;
    let restore1_secs = t.elapsed().as_secs_f64();
    eprintln!("restore 1: {restore1_secs:.1} s, {rr}");
    assert_eq!(rr.id, r1.id);
    assert!(!r1_dir.join(INCOMPLETE_MARKER).exists());
    assert!(r1_dir.join("backup_label").exists());
    assert_eq!(
        std::fs::metadata(&r1_dir)?.permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::read_link(r1_dir.join(format!("pg_tblspc/{ts_oid}")))?,
        ts_r1
    );
    assert!(std::fs::read_to_string(r1_dir.join("tablespace_map"))?
        .contains(&ts_r1.display().to_string()));
    let mut c1 = Cluster::builder().start_existing(&r1_dir)?;
    let dump_r1 = c1.pg_dump("postgres")?;
    assert_eq!(
        first_difference(&dump_a, &dump_r1),
        None,
        "restored data differs from the backup's end point"
    );
    assert_eq!(c1.sql("select count(*) from in_ts")?, "20000");
    assert_eq!(
        c1.sql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'ts1'")?,
        ts_r1.display().to_string()
    );

    // Backup 2 of the quiet cluster (the load of backup 1 touched pages everywhere), then a
    // small change and backup 3: mostly unchanged files and deduplicated chunks.
    let r2 = backup(&repo, &opts(&src, "main"), &NoProgress).await?;
    eprintln!("backup 2: {r2}");
    assert!(r2.id > r1.id);
    assert_eq!(r2.previous.as_deref(), Some(r1.id.as_str()));
    assert!(r2.totals.files_skipped_unchanged > 0, "{r2}");
    src.sql("update pgbench_accounts set abalance = abalance + 1 where aid <= 20")?;
    let r3 = backup(&repo, &opts(&src, "main"), &NoProgress).await?;
    let dump_b = src.pg_dump("postgres")?;
    eprintln!("backup 3: {r3}");
    assert!(r3.totals.files_skipped_unchanged > 0, "{r3}");
    assert!(
        r3.totals.new_bytes * 10 < r1.totals.new_bytes
            && r3.totals.stored_bytes * 10 < r1.totals.stored_bytes,
        "backup 3 added {} new bytes ({} stored), backup 1 {} ({} stored)",
        r3.totals.new_bytes,
        r3.totals.stored_bytes,
        r1.totals.new_bytes,
        r1.totals.stored_bytes
    );
    let r2 = r3;

    // The restored copy goes stale and diverges; --delta brings it to backup 2 exactly.
    c1.sql("insert into in_ts select g, 'stale' from generate_series(20001, 20100) g; delete from pgbench_accounts where aid < 50; checkpoint")?;
    c1.stop()?;
    std::fs::write(r1_dir.join("stray-file"), b"not in the backup")?;
    let t = Instant::now();
    let rd = restore(
        &repo,
        &RestoreOptions {
            delta: true,
            tablespace_map: map(&ts_r1),
            ..restore_opts(&r2.id, &r1_dir)
        },
        &NoProgress,
    )
    .await?;
    eprintln!("delta restore: {:.1} s, {rd}", t.elapsed().as_secs_f64());
    assert!(rd.files_unchanged > 0 && rd.files_written > 0, "{rd}");
    // The stale copy's hint bits and checkpoints touched its big relations; the small files
    // (most of them) are found identical and left alone.
    assert!(
        rd.files_written * 10 < rd.files_unchanged,
        "delta rewrote too many files: {rd}"
    );
    assert!(rd.entries_removed > 0);
    assert!(!r1_dir.join("stray-file").exists());
    let r2_dir = work.path().join("r2");
    let ts_r2 = work.path().join("ts_r2");
    restore(
        &repo,
        &RestoreOptions {
            tablespace_map: map(&ts_r2),
            ..restore_opts(&r2.id, &r2_dir)
        },
        &NoProgress,
    )
    .await?;
    assert_same_tree(&r1_dir, &r2_dir);
    let c1 = Cluster::builder().start_existing(&r1_dir)?;
    assert_eq!(first_difference(&dump_b, &c1.pg_dump("postgres")?), None);

    // A running cluster's directory is refused even with --delta; a non-empty one without it.
    let e = restore(
        &repo,
        &RestoreOptions {
            delta: true,
            ..restore_opts("latest", &r1_dir)
        },
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("postmaster.pid"), "{e}");
    drop(c1);
    let e = restore(&repo, &restore_opts("latest", &r2_dir), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(
        e.to_string().contains("not empty") && e.to_string().contains("--delta"),
        "{e}"
    );

    // list and info.
    let l = list(
        &repo,
        &ListOptions {
            cluster: "main".into(),
        },
    )
    .await?;
    let ids: Vec<&str> = l.backups.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids.len(), 3);
    assert_eq!((ids[0], ids[2]), (r1.id.as_str(), r2.id.as_str()));
    assert!(l.to_string().contains(&r2.id));
    let i = info(
        &repo,
        &InfoOptions {
            cluster: "main".into(),
            id: "latest".into(),
        },
    )
    .await?;
    assert_eq!(i.backup.id, r2.id);
    let p = i.physical.as_ref().unwrap();
    assert_eq!(p.tablespaces.len(), 1);
    assert_eq!(p.stop_lsn, r2.stop_lsn);
    serde_json::to_string(&i)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_page_is_reported_by_file_and_block() -> TestResult {
    let mut c = Cluster::builder().setting("autovacuum", "off").start()?;
    c.sql("create table t(id int, v text); insert into t select g, repeat('x', 100) from generate_series(1, 5000) g; checkpoint")?;
    let rel = c.sql("select pg_relation_filepath('t')")?;
    c.stop()?;
    let path = c.pgdata().join(&rel);
    let mut data = std::fs::read(&path)?;
    assert!(data.len() > 3 * 8192);
    data[2 * 8192 + 4000] ^= 0x5a;
    std::fs::write(&path, &data)?;
    c.start()?;

    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    let r = backup(&repo, &opts(&c, "main"), &NoProgress).await?;
    assert_eq!(r.page_checksum_failures.len(), 1, "{r}");
    let f = &r.page_checksum_failures[0];
    assert_eq!(
        (f.path.as_str(), f.block, f.rel_block),
        (rel.as_str(), 2, 2)
    );
    assert!(f.reason.contains("checksum"), "{}", f.reason);
    assert_eq!(r.exit_code(), 3, "done with warnings");
    assert!(r.to_string().contains(&format!("{rel} block 2")), "{r}");
    let i = info(
        &repo,
        &InfoOptions {
            cluster: "main".into(),
            id: r.id.clone(),
        },
    )
    .await?;
    assert_eq!(
        i.physical.unwrap().page_checksum_failures,
        r.page_checksum_failures
    );
    assert_eq!(i.backup.page_checksum_failures, Some(1));
    Ok(())
}

/// A progress sink that signals when reading starts and then holds the backup for a while.
struct Slow(std::sync::mpsc::SyncSender<()>);

impl Progress for Slow {
    fn begin(&self, phase: Phase, _: u64, _: u64) {
        if phase == Phase::Backup {
            let _ = self.0.send(());
            std::thread::sleep(Duration::from_secs(3));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locks_cluster_identity_and_ids() -> TestResult {
    let a = Cluster::new()?;
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;

    // A lock held by a backup of this cluster: refused at once, the holder named.
    let held = repo
        .lock(LockKind::Shared, Some("backup:main"), "backup")
        .await?;
    let t = Instant::now();
    let e = backup(&repo, &opts(&a, "main"), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 11, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // Another cluster's backup is not blocked by it.
    let other = backup(&repo, &opts(&a, "other"), &NoProgress).await?;
    held.release().await?;

    // Two real backups at once: the second fails with the lock error, the first completes.
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let first = {
        let (repo, o) = (repo.clone(), opts(&a, "main"));
        tokio::spawn(async move { backup(&repo, &o, &Slow(tx)).await })
    };
    tokio::task::spawn_blocking(move || rx.recv()).await??;
    let e = backup(&repo, &opts(&a, "main"), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 11, "{e}");
    let r1 = first.await??;
    // Back to back in the same second: the id still increases.
    let r2 = backup(&repo, &opts(&a, "main"), &NoProgress).await?;
    assert!(r2.id > r1.id, "{} then {}", r1.id, r2.id);
    assert_ne!(other.id, "");

    // Another cluster under the same name: refused before anything is written.
    let b = Cluster::new()?;
    let before = repo.list_manifests(None).await?.len();
    let e = backup(&repo, &opts(&b, "main"), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 15, "{e}");
    assert!(e.to_string().contains("system identifier"), "{e}");
    assert_eq!(repo.list_manifests(None).await?.len(), before);

    // An id from the future (a clock ahead, elsewhere): refused with a clock hint.
    let future = serde_json::json!({"format": 1, "kind": "logical", "id": "20991231T000000Z", "cluster": "skewed"});
    repo.save_manifest("skewed", "20991231T000000Z", &future)
        .await?;
    let e = backup(&repo, &opts(&a, "skewed"), &NoProgress)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("clock skew"), "{e}");
    assert_eq!(e.exit_code(), 1, "RELIABILITY.md row 24: {e}");
    assert_eq!(
        repo.list_manifests(Some("skewed")).await?.len(),
        1,
        "nothing was written beside the future id"
    );

    // A password in the connection string is refused before connecting.
    let mut o = opts(&a, "main");
    o.conninfo = Some(format!("{} password=hunter2", a.conninfo()));
    let e = backup(&repo, &o, &NoProgress).await.unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(!e.to_string().contains("hunter2"));

    // Restore of an unknown backup names it.
    let target = tempfile::tempdir()?;
    let e = restore(
        &repo,
        &restore_opts("20000101T000000Z", &target.path().join("x")),
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("20000101T000000Z"), "{e}");
    assert!(
        !target.path().join("x").exists(),
        "nothing created for a failed lookup"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_restore_is_marked_and_cannot_start() -> TestResult {
    // A restore that fails midway (its data missing from the repository) leaves the marker, no
    // backup_label and no pg_control, so PostgreSQL cannot start it; the error names the
    // file; a rerun without --delta/--force is refused and says why.
    let c = Cluster::builder().start()?;
    c.pgbench(&["-i", "-s", "1", "-q"])?;
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    let r = backup(&repo, &opts(&c, "main"), &NoProgress).await?;
    drop(c);
    // Remove every pack: every file's content is now missing.
    let packs = repo_dir.path().join("packs");
    std::fs::remove_dir_all(&packs)?;
    let work = tempfile::tempdir()?;
    let target = work.path().join("t");
    let e = restore(&repo, &restore_opts(&r.id, &target), &NoProgress)
        .await
        .unwrap_err();
    assert!(e.exit_code() == 13 || e.exit_code() == 1, "{e}");
    assert!(
        e.to_string().contains("restoring "),
        "the file is named: {e}"
    );
    assert!(target.join(INCOMPLETE_MARKER).exists());
    assert!(!target.join("backup_label").exists());
    assert!(!target.join("global/pg_control").exists());
    let e = restore(&repo, &restore_opts(&r.id, &target), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("incomplete restore"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encrypted_backup_to_seaweedfs_restores() -> TestResult {
    let s3 = pgkeep_testing::s3::S3Server::start().await?;
    let repo = Repository::init(
        s3.storage(),
        InitOptions {
            passphrase: Some("correct horse".into()),
            kdf: KdfParams {
                m_kib: 256,
                t: 1,
                p: 1,
            },
            ..InitOptions::default()
        },
    )
    .await?;
    let c = Cluster::new()?;
    c.pgbench(&["-i", "-s", "2", "-q"])?;
    let t = Instant::now();
    // Relation files cut into aligned 128 KiB pieces: restores byte for byte all the same.
    let o = BackupOptions {
        relation_chunk_size: 128 * 1024,
        ..opts(&c, "main")
    };
    let r = backup(&repo, &o, &NoProgress).await?;
    eprintln!("s3 backup: {:.1} s, {r}", t.elapsed().as_secs_f64());
    let dump = c.pg_dump("postgres")?;
    let work = tempfile::tempdir()?;
    let target: PathBuf = work.path().join("r");
    let t = Instant::now();
    let rr = restore(&repo, &restore_opts("latest", &target), &NoProgress).await?;
    eprintln!("s3 restore: {:.1} s, {rr}", t.elapsed().as_secs_f64());
    let restored = Cluster::builder().start_existing(&target)?;
    assert_eq!(
        first_difference(&dump, &restored.pg_dump("postgres")?),
        None
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_waits_for_its_wal_when_pgkeep_archives() -> TestResult {
    // archive_command names pgkeep but archives nothing: the backup must not report success
    // (nor save a manifest) before its WAL is in the archive.
    let c = Cluster::builder()
        .archive_command("test -n 'pgkeep archive-push'; false")
        .start()?;
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    let o = BackupOptions {
        archive_timeout_secs: Some(2),
        ..opts(&c, "main")
    };
    let e = backup(&repo, &o, &NoProgress).await.unwrap_err();
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(
        e.to_string().contains("0000000100000000000000"),
        "names the segments: {e}"
    );
    assert!(repo.list_manifests(None).await?.is_empty());
    Ok(())
}
