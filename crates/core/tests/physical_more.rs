//! More physical backups and restores of real PostgreSQL 15 clusters: what the CLI does by
//! default and the rules a user relies on without seeing them.
//!
//! - Relation files in aligned 1 MiB pieces (the CLI's default) under pgbench load restore to
//!   exactly the backup's end point, `amcheck` finds nothing, and a small change costs little.
//! - `--full-read` reads every file again and stores the same content.
//! - The unchanged-file rule (size + mtime older than the previous start minus a margin):
//!   what it guarantees, tested as such, and what it cannot see.
//! - Unlogged relations come back empty and usable (init fork only); temporary relations are
//!   not copied.
//! - `restore --force` empties a non-empty target (never following its symlinks); a target
//!   holding postmaster.pid is refused even with `--force`/`--delta`, before anything changes.
//! - A cluster archiving with another tool (`cp`) is backed up without waiting for pgkeep's
//!   archive, and the backup restores with no archive at all, WAL switches during the backup
//!   included.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pgkeep_core::commands::backup::{
    backup, BackupOptions, BackupReport, DEFAULT_RELATION_CHUNK_SIZE, MTIME_SAFETY_MARGIN,
};
use pgkeep_core::commands::restore::{restore, RestoreOptions, RestoreReport};
use pgkeep_core::manifest::{load_physical, BackupManifest, FileEntry};
use pgkeep_core::progress::{NoProgress, Progress};
use pgkeep_repo::{InitOptions, Repository, StreamRef};
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

/// Backup options as the CLI sets them by default (aligned 1 MiB relation pieces).
fn opts(c: &Cluster) -> BackupOptions {
    BackupOptions {
        cluster: "main".into(),
        pgdata: Some(c.pgdata().to_path_buf()),
        conninfo: Some(c.conninfo()),
        relation_chunk_size: DEFAULT_RELATION_CHUNK_SIZE,
        ..BackupOptions::default()
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

async fn restore_into(repo: &Repository, id: &str, target: &Path) -> RestoreReport {
    restore(repo, &restore_opts(id, target), &NoProgress)
        .await
        .unwrap_or_else(|e| panic!("restore of {id} into {}: {e}", target.display()))
}

/// Runs a closure when the backup reaches `pg_backup_stop`: tests freeze the source there and
/// take the reference dump of the backup's end point.
struct AtStop<'a>(Mutex<Option<Box<dyn FnOnce() + Send + 'a>>>);

impl<'a> AtStop<'a> {
    fn new(f: impl FnOnce() + Send + 'a) -> Self {
        AtStop(Mutex::new(Some(Box::new(f))))
    }
    fn ran(&self) -> bool {
        self.0.lock().unwrap().is_none()
    }
}

impl Progress for AtStop<'_> {
    fn note(&self, message: &str) {
        if message == "pg_backup_stop" {
            if let Some(f) = self.0.lock().unwrap().take() {
                f();
            }
        }
    }
}

/// Short pgbench rounds until stopped; `stop` returns once the round in progress is done.
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

/// Waits until files written before `since` are older than the unchanged-file margin.
fn wait_past_margin(since: Instant) {
    let need = MTIME_SAFETY_MARGIN + Duration::from_secs(1);
    if since.elapsed() < need {
        std::thread::sleep(need - since.elapsed());
    }
}

/// RELIABILITY row 29: `amcheck` on a restored cluster. Every btree index is checked with
/// `bt_index_check(heapallindexed => true)` (an error fails the query, hence the test) and
/// every table with `verify_heapam` (which returns one row per problem). Returns how many
/// indexes were checked.
fn amcheck(c: &Cluster) -> anyhow::Result<u64> {
    c.sql("create extension if not exists amcheck")?;
    // One output row per index, so each call is certainly evaluated.
    let checked = c.sql(
        "select c.relname, bt_index_check(i.indexrelid, true) from pg_index i \
         join pg_class c on c.oid = i.indexrelid join pg_am a on a.oid = c.relam \
         where a.amname = 'btree' and c.relpersistence <> 't' and i.indisvalid and i.indisready",
    )?;
    let indexes = checked.lines().count() as u64;
    let problems = c.sql(
        "select coalesce(string_agg(format('%s block %s: %s', c.relname, v.blkno, v.msg), '; '), '') \
         from pg_class c cross join lateral verify_heapam(c.oid) v \
         where c.relkind in ('r', 'm', 't') and c.relpersistence <> 't'",
    )?;
    assert_eq!(problems, "", "verify_heapam found problems");
    Ok(indexes)
}

fn file<'a>(m: &'a BackupManifest, path: &str) -> Option<&'a FileEntry> {
    m.files.iter().find(|f| f.path == path)
}

async fn stream_bytes(repo: &Repository, s: &StreamRef) -> Vec<u8> {
    let mut out = Vec::new();
    repo.read_stream(s, &mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aligned_pieces_under_load_restore_exactly_amcheck_clean_and_full_read_rereads(
) -> TestResult {
    let src = Cluster::builder().setting("max_wal_size", "1GB").start()?;
    // After the start: see backup_under_load_restores_exactly_with_tablespace_incremental_and_delta.
    let created = Instant::now();
    src.pgbench(&["-i", "-s", "4", "-q"])?;
    wait_past_margin(created);
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;

    // Backup 1 under pgbench load; the writer stops at pg_backup_stop and the reference dump
    // is taken then: the content at the backup's end point.
    let mut writer = Writer::start(&src);
    std::thread::sleep(Duration::from_millis(500));
    let dump_a: Mutex<Option<String>> = Mutex::new(None);
    let rounds = AtomicU64::new(0);
    let hook = AtStop::new(|| {
        rounds.store(writer.stop(), Ordering::SeqCst);
        *dump_a.lock().unwrap() = Some(src.pg_dump("postgres").unwrap());
    });
    let r1 = backup(&repo, &opts(&src), &hook).await?;
    assert!(hook.ran());
    drop(hook);
    let dump_a = dump_a
        .into_inner()
        .unwrap()
        .expect("dump at pg_backup_stop");
    assert!(
        rounds.load(Ordering::SeqCst) >= 1,
        "load ran during the backup"
    );
    assert!(r1.warnings.is_empty(), "{r1}");
    eprintln!("backup 1: {r1}");

    // Relation files really are cut at every 1 MiB: each multiple of the piece size inside a
    // relation file is a blob boundary (content-defined chunks would put them anywhere).
    let m1 = load_physical(&repo, "main", &r1.id).await?;
    let piece = DEFAULT_RELATION_CHUNK_SIZE as u64;
    let accounts = src.sql("select pg_relation_filepath('pgbench_accounts')")?;
    let acc = file(&m1, &accounts).expect("pgbench_accounts in the manifest");
    assert!(
        acc.size > 8 * piece,
        "a relation of many pieces: {}",
        acc.size
    );
    let mut big_relations = 0;
    for f in &m1.files {
        let Some(s) = &f.stream else { continue };
        let is_rel = pgkeep_pg::datadir::RelFileName::parse(f.path.rsplit('/').next().unwrap())
            .is_some()
            && (f.path.starts_with("base/") || f.path.starts_with("global/"));
        if !is_rel || s.size <= piece {
            continue;
        }
        big_relations += 1;
        let mut boundaries = std::collections::HashSet::new();
        let mut off = 0u64;
        for b in &s.blobs {
            assert!(b.len as u64 <= piece, "{}: blob of {} bytes", f.path, b.len);
            off += b.len as u64;
            boundaries.insert(off);
        }
        assert_eq!(off, s.size);
        for k in 1..=(s.size - 1) / piece {
            assert!(
                boundaries.contains(&(k * piece)),
                "{}: no blob boundary at {} MiB",
                f.path,
                k
            );
        }
    }
    assert!(big_relations >= 1);

    let work = tempfile::tempdir()?;
    let t1 = work.path().join("r1");
    restore_into(&repo, &r1.id, &t1).await;
    let c1 = Cluster::builder().start_existing(&t1)?;
    assert_eq!(
        first_difference(&dump_a, &c1.pg_dump("postgres")?),
        None,
        "restored data differs from the backup's end point"
    );
    let checked = amcheck(&c1)?;
    assert!(
        checked >= 4,
        "pgbench's and the catalogs' indexes: {checked}"
    );
    drop(c1);

    // The load of backup 1 dirtied pages all over pgbench_accounts (and the reference dump
    // set hint bits on them); they reach the files at the next checkpoint. A backup of the
    // quiet cluster takes them in, then a small change: the next backup stores a small
    // fraction (the 1 MiB pieces around the changed pages; files unchanged not even read).
    let settle = backup(&repo, &opts(&src), &NoProgress).await?;
    eprintln!("settling backup: {settle}");
    src.sql("update pgbench_accounts set abalance = abalance + 7 where aid <= 30")?;
    let r2 = backup(&repo, &opts(&src), &NoProgress).await?;
    let dump_b = src.pg_dump("postgres")?;
    eprintln!("backup 2: {r2}");
    assert!(r2.totals.files_skipped_unchanged > 0, "{r2}");
    assert!(
        r2.totals.new_bytes * 10 < r1.totals.new_bytes
            && r2.totals.stored_bytes * 10 < r1.totals.stored_bytes,
        "backup 2 added {} ({} stored), backup 1 {} ({} stored)",
        r2.totals.new_bytes,
        r2.totals.stored_bytes,
        r1.totals.new_bytes,
        r1.totals.stored_bytes
    );
    let t2 = work.path().join("r2");
    restore_into(&repo, &r2.id, &t2).await;
    let c2 = Cluster::builder().start_existing(&t2)?;
    assert_eq!(first_difference(&dump_b, &c2.pg_dump("postgres")?), None);
    drop(c2);

    // --full-read on the quiet cluster: every file read (none taken from backup 2), what was
    // read deduplicates against what is stored, and the restore is the same.
    let r3 = backup(
        &repo,
        &BackupOptions {
            full_read: true,
            ..opts(&src)
        },
        &NoProgress,
    )
    .await?;
    eprintln!("backup 3 (full read): {r3}");
    assert_eq!(r3.totals.files_skipped_unchanged, 0, "{r3}");
    assert_eq!(r3.totals.bytes_skipped_unchanged, 0);
    assert_eq!(r3.totals.bytes_read, r3.totals.logical_bytes, "{r3}");
    assert!(
        r3.totals.new_bytes * 10 < r3.totals.bytes_read,
        "re-read data is already stored: {r3}"
    );
    // A file backup 2 could have taken as unchanged (same size and mtime) holds the very
    // same content when read again.
    let m2 = load_physical(&repo, "main", &r2.id).await?;
    let m3 = load_physical(&repo, "main", &r3.id).await?;
    let mut same_meta = 0;
    for f3 in &m3.files {
        if let Some(f2) = file(&m2, &f3.path) {
            if f3.stream.is_some()
                && (f2.size, f2.mtime, f2.mtime_nsec) == (f3.size, f3.mtime, f3.mtime_nsec)
            {
                same_meta += 1;
                assert_eq!(f2.stream, f3.stream, "{} read again differs", f3.path);
            }
        }
    }
    assert!(same_meta > 100, "most files did not change: {same_meta}");
    // Without --full-read the same state skips files: the option is what made the difference.
    let r4 = backup(&repo, &opts(&src), &NoProgress).await?;
    assert!(r4.totals.files_skipped_unchanged > 0, "{r4}");
    let t3 = work.path().join("r3");
    restore_into(&repo, &r3.id, &t3).await;
    let c3 = Cluster::builder().start_existing(&t3)?;
    assert_eq!(first_difference(&dump_b, &c3.pg_dump("postgres")?), None);
    Ok(())
}

/// Sets a file's modification time exactly (to the nanosecond).
fn set_mtime(p: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// Rewrites a file with other bytes of the same length, keeping its mtime as it was.
fn rewrite_keeping_mtime(p: &Path, content: &[u8]) {
    let t = mtime(p);
    std::fs::write(p, content).unwrap();
    set_mtime(p, t);
    assert_eq!(mtime(p), t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_file_rule_rereads_what_the_margin_covers() -> TestResult {
    // The rule: a file is taken from the previous backup when its size and mtime (to the
    // nanosecond) are those recorded and that mtime is older than the previous backup's start
    // by MTIME_SAFETY_MARGIN. What it guarantees: a write after the previous backup read the
    // file is seen, even when the file system did not move the mtime (coarse timestamps: a
    // write in the same tick as the read) or the clock stepped back a little, as long as
    // that happens within the margin. What it cannot guarantee: a file rewritten and then
    // given back an mtime older than the margin (touch -d, a restore tool preserving
    // times) looks unchanged; --full-read is the answer.
    let c = Cluster::new()?;
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    let d = c.pgdata();
    let recent = d.join("pgkeep-test-recent");
    let within = d.join("pgkeep-test-within-margin");
    let written = d.join("pgkeep-test-written");
    let rewound = d.join("pgkeep-test-rewound");
    for p in [&recent, &within, &written, &rewound] {
        std::fs::write(p, vec![b'a'; 4096])?;
    }
    // `recent` is as just written; `within` 2 s old (inside the margin, however fast the
    // backup starts: checked below); `written` and `rewound` far older than the margin.
    let now = SystemTime::now();
    set_mtime(&within, now - Duration::from_secs(2));
    set_mtime(&written, now - Duration::from_secs(600));
    set_mtime(&rewound, now - Duration::from_secs(600));
    let r1 = backup(&repo, &opts(&c), &NoProgress).await?;
    let m1 = load_physical(&repo, "main", &r1.id).await?;
    let start1 = SystemTime::from(m1.start_time);
    for p in [&recent, &within] {
        let age = start1.duration_since(mtime(p)).unwrap_or_default();
        assert!(
            age < MTIME_SAFETY_MARGIN,
            "premise: {} is within the margin of backup 1's start ({age:?})",
            p.display()
        );
    }

    // After backup 1 read them: same size, other bytes.
    rewrite_keeping_mtime(&recent, &[b'B'; 4096]);
    rewrite_keeping_mtime(&within, &[b'C'; 4096]);
    std::fs::write(&written, [b'D'; 4096])?; // the mtime moves on, as writes do
    rewrite_keeping_mtime(&rewound, &[b'E'; 4096]);

    let r2 = backup(&repo, &opts(&c), &NoProgress).await?;
    assert!(r2.totals.files_skipped_unchanged > 0, "{r2}");
    let m2 = load_physical(&repo, "main", &r2.id).await?;
    let content = |m: &BackupManifest, p: &Path| {
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        file(m, &name)
            .and_then(|f| f.stream.clone())
            .unwrap_or_else(|| panic!("{name} in the manifest"))
    };
    assert_eq!(
        stream_bytes(&repo, &content(&m2, &recent)).await,
        [b'B'; 4096]
    );
    assert_eq!(
        stream_bytes(&repo, &content(&m2, &within)).await,
        [b'C'; 4096]
    );
    assert_eq!(
        stream_bytes(&repo, &content(&m2, &written)).await,
        [b'D'; 4096]
    );
    // The documented blind spot: size and an old mtime as recorded, so taken as unchanged.
    assert_eq!(
        stream_bytes(&repo, &content(&m2, &rewound)).await,
        [b'a'; 4096],
        "the rule trusts an mtime older than the margin; if this now sees the change, \
         update the rule's documentation"
    );
    // --full-read sees it.
    let r3 = backup(
        &repo,
        &BackupOptions {
            full_read: true,
            ..opts(&c)
        },
        &NoProgress,
    )
    .await?;
    let m3 = load_physical(&repo, "main", &r3.id).await?;
    assert_eq!(
        stream_bytes(&repo, &content(&m3, &rewound)).await,
        [b'E'; 4096]
    );
    Ok(())
}

/// Pages of an unlogged or temporary relation on disk, and their files' paths.
fn relpath(c: &Cluster, rel: &str) -> anyhow::Result<String> {
    c.sql(&format!("select pg_relation_filepath('{rel}')"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlogged_come_back_empty_and_usable_temp_are_not_copied() -> TestResult {
    let c = Cluster::new()?;
    c.sql(
        "create table kept(id int primary key, v text); \
         insert into kept select g, md5(g::text) from generate_series(1, 20000) g; \
         create unlogged table u(id int primary key, v text); \
         insert into u select g, repeat('u', 200) from generate_series(1, 50000) g; \
         checkpoint",
    )?;
    let u_path = relpath(&c, "u")?;
    let u_idx = relpath(&c, "u_pkey")?;
    for p in [&u_path, &u_idx] {
        assert!(c.pgdata().join(p).exists() && c.pgdata().join(format!("{p}_init")).exists());
    }
    assert!(std::fs::metadata(c.pgdata().join(&u_path))?.len() > 1 << 20);

    // A session holding a temporary table big enough to leave temp_buffers (8 MB) for disk,
    // open while the backup runs.
    let mut session = c
        .client_command("psql")
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    {
        use std::io::Write;
        let stdin = session.stdin.as_mut().unwrap();
        stdin.write_all(
            b"create temp table tt as select g, repeat('t', 200) v from generate_series(1, 100000) g;\n",
        )?;
        stdin.flush()?;
    }
    // Another session sees it in the catalog (and its file name: t<backend>_<relfilenode>).
    let t = Instant::now();
    let tt_path = loop {
        let p = c.sql(
            "select pg_relation_filepath(oid) from pg_class where relname = 'tt' and relpersistence = 't'",
        )?;
        if !p.is_empty() {
            break p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "temp table never appeared"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let tt_name = tt_path.rsplit('/').next().unwrap().to_string();
    assert!(
        tt_name.starts_with('t') && tt_name.contains('_'),
        "{tt_path}"
    );
    assert!(
        std::fs::metadata(c.pgdata().join(&tt_path))?.len() > 1 << 20,
        "the temporary relation is on disk"
    );

    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    let r = backup(&repo, &opts(&c), &NoProgress).await?;
    drop(session.stdin.take());
    session.wait()?;

    let m = load_physical(&repo, "main", &r.id).await?;
    for p in [&u_path, &u_idx] {
        for fork in ["", "_fsm", "_vm", ".1"] {
            assert!(
                file(&m, &format!("{p}{fork}")).is_none(),
                "{p}{fork} copied"
            );
        }
        assert!(file(&m, &format!("{p}_init")).is_some(), "{p}_init missing");
    }
    let tt_dir = tt_path.rsplit_once('/').unwrap().0;
    let temp_files: Vec<&str> = m
        .files
        .iter()
        .map(|f| f.path.as_str())
        .filter(|p| {
            p.strip_prefix(tt_dir)
                .and_then(|rest| rest.strip_prefix("/t"))
                .is_some()
        })
        .collect();
    assert!(
        temp_files.is_empty(),
        "temporary relations copied: {temp_files:?}"
    );
    assert!(file(&m, &relpath(&c, "kept")?).is_some());

    let work = tempfile::tempdir()?;
    let target = work.path().join("r");
    restore_into(&repo, &r.id, &target).await;
    assert!(target.join(format!("{u_path}_init")).exists());
    assert!(!target.join(&tt_path).exists());
    let rc = Cluster::builder().start_existing(&target)?;
    // Recovery recreated the main forks from the init forks: empty, and usable.
    assert_eq!(rc.sql("select count(*) from u")?, "0");
    assert!(target.join(&u_path).exists(), "main fork recreated");
    rc.sql("insert into u select g, 'new' from generate_series(1, 1000) g")?;
    assert_eq!(
        rc.sql("set enable_seqscan = off; select v from u where id = 500")?,
        "new"
    );
    assert_eq!(rc.sql("select count(*) from kept")?, "20000");
    // (The temporary table's catalog row is logged and comes back, in the dead session's
    // temp schema, until autovacuum drops it; its data never existed on the restored side.)
    // The logged table's data is exactly the source's.
    assert_eq!(
        rc.sql("select md5(string_agg(v, ',' order by id)) from kept")?,
        c.sql("select md5(string_agg(v, ',' order by id)) from kept")?
    );
    amcheck(&rc)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_empties_the_target_and_postmaster_pid_is_always_refused() -> TestResult {
    let c = Cluster::new()?;
    c.sql("create table t(id int); insert into t select generate_series(1, 1000)")?;
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    let r = backup(&repo, &opts(&c), &NoProgress).await?;
    let dump = c.pg_dump("postgres")?;

    // A non-empty target: files, a directory tree, and a symlink to a directory outside that
    // must survive (--force removes the link, never what it points to).
    let work = tempfile::tempdir()?;
    let target = work.path().join("t");
    let outside = work.path().join("outside");
    std::fs::create_dir_all(target.join("junkdir/deeper"))?;
    std::fs::create_dir_all(&outside)?;
    std::fs::write(target.join("junk"), b"junk")?;
    std::fs::write(target.join("junkdir/deeper/x"), b"x")?;
    std::fs::write(target.join("PG_VERSION"), b"14\n")?;
    std::fs::write(outside.join("keep"), b"keep")?;
    std::os::unix::fs::symlink(&outside, target.join("link"))?;

    // Without a flag: refused, nothing touched.
    let e = restore(&repo, &restore_opts(&r.id, &target), &NoProgress)
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert!(target.join("junk").exists());

    // A postmaster.pid (a server may run there): refused with --force and with --delta, before
    // anything is removed.
    std::fs::write(target.join("postmaster.pid"), b"12345\n")?;
    for (force, delta) in [(true, false), (false, true)] {
        let e = restore(
            &repo,
            &RestoreOptions {
                force,
                delta,
                ..restore_opts(&r.id, &target)
            },
            &NoProgress,
        )
        .await
        .unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let text = e.to_string();
        assert!(
            text.contains("postmaster.pid") && text.contains("HINT"),
            "{text}"
        );
        assert!(target.join("junk").exists() && target.join("junkdir/deeper/x").exists());
        assert!(!target
            .join(pgkeep_core::commands::restore::INCOMPLETE_MARKER)
            .exists());
    }
    std::fs::remove_file(target.join("postmaster.pid"))?;

    let rr = restore(
        &repo,
        &RestoreOptions {
            force: true,
            ..restore_opts(&r.id, &target)
        },
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.mode, "force");
    for gone in ["junk", "junkdir", "link"] {
        assert!(
            std::fs::symlink_metadata(target.join(gone)).is_err(),
            "{gone} left behind"
        );
    }
    assert_eq!(std::fs::read(outside.join("keep"))?, b"keep");
    assert_eq!(std::fs::read_to_string(target.join("PG_VERSION"))?, "15\n");
    assert_eq!(
        std::fs::metadata(&target)?.permissions().mode() & 0o777,
        0o700
    );
    let rc = Cluster::builder().start_existing(&target)?;
    assert_eq!(first_difference(&dump, &rc.pg_dump("postgres")?), None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tools_archiving_backup_restores_without_any_archive() -> TestResult {
    // The archive directory must exist before the server archives into it; it lives outside
    // the cluster so the test can empty it while the cluster runs.
    let archive_root = tempfile::tempdir()?;
    let archive: PathBuf = archive_root.path().join("wal");
    std::fs::create_dir_all(&archive)?;
    std::fs::set_permissions(archive_root.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&archive, std::fs::Permissions::from_mode(0o777))?;
    let src = Cluster::builder()
        .archive_command(&format!(
            "test ! -f {0}/%f && cp %p {0}/%f",
            archive.display()
        ))
        .start()?;
    let created = Instant::now();
    src.pgbench(&["-i", "-s", "2", "-q"])?;
    wait_past_margin(created);
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;

    // Load during the whole backup, and WAL switches while it runs: the backup's WAL spans
    // several segments, each archived (and recyclable) by the other tool.
    let mut writer = Writer::start(&src);
    std::thread::sleep(Duration::from_millis(300));
    let dump: Mutex<Option<String>> = Mutex::new(None);
    let hook = AtStop::new(|| {
        for _ in 0..3 {
            src.pgbench(&["-n", "-t", "50"]).unwrap();
            src.sql("select pg_switch_wal()").unwrap();
        }
        writer.stop();
        *dump.lock().unwrap() = Some(src.pg_dump("postgres").unwrap());
    });
    let t = Instant::now();
    let r: BackupReport = backup(&repo, &opts(&src), &hook).await?;
    let secs = t.elapsed().as_secs_f64();
    assert!(hook.ran());
    drop(hook);
    let dump = dump.into_inner().unwrap().expect("dump at pg_backup_stop");
    eprintln!("backup with cp archiving: {secs:.1} s, {r}");
    assert!(
        r.totals.wal_files >= 4,
        "WAL switches inside the backup: {r}"
    );
    assert!(r.warnings.is_empty(), "{r}");
    // The other tool did archive: the scenario is real.
    let t = Instant::now();
    while std::fs::read_dir(&archive)?.count() < 3 {
        assert!(t.elapsed() < Duration::from_secs(60), "cp archived nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    // And pgkeep did not wait for its own archive (it would have failed after 60 s).
    assert!(secs < 50.0, "the backup waited: {secs:.1} s");

    // No archive at all for the restore: the other tool's copies are gone, the restored
    // cluster has no restore_command.
    for e in std::fs::read_dir(&archive)? {
        std::fs::remove_file(e?.path())?;
    }
    let work = tempfile::tempdir()?;
    let target = work.path().join("r");
    let rr = restore_into(&repo, &r.id, &target).await;
    assert_eq!(rr.wal_files, r.totals.wal_files);
    let auto = std::fs::read_to_string(target.join("postgresql.auto.conf")).unwrap_or_default();
    assert!(!auto.contains("restore_command"), "{auto}");
    assert!(!target.join("recovery.signal").exists());
    let rc = Cluster::builder().start_existing(&target)?;
    assert_eq!(
        first_difference(&dump, &rc.pg_dump("postgres")?),
        None,
        "restored data differs from the backup's end point"
    );
    amcheck(&rc)?;
    Ok(())
}
