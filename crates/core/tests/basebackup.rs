//! `backup --method basebackup` on real PostgreSQL 15 clusters: the backup is taken only
//! through connections (pg_basebackup's stream and SQL), never by reading the data directory,
//! and restores like a local one.
//!
//! What a user relies on: a quiet cluster restores to exactly its data; a backup under
//! pgbench load restores to a consistent cluster (TPC-B's balances agree with its history);
//! a backup after a small change stores a small fraction of the first; a corrupted page is named by file and
//! block (exit 3, backup kept); a cluster with tablespaces is refused with exit 2 and a hint.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgkeep_core::commands::backup::{backup, BackupMethod, BackupOptions};
use pgkeep_core::commands::restore::{restore, RestoreOptions, INCOMPLETE_MARKER};
use pgkeep_core::progress::NoProgress;
use pgkeep_core::Report;
use pgkeep_repo::{InitOptions, Repository};
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

/// Options with no data directory: the method must not need one.
fn opts(c: &Cluster) -> BackupOptions {
    BackupOptions {
        cluster: "main".into(),
        conninfo: Some(c.conninfo()),
        method: BackupMethod::Basebackup,
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

/// TPC-B's invariant: every balance change is in the history, so all four sums agree.
fn tpcb_sums(c: &Cluster) -> anyhow::Result<String> {
    c.sql(
        "select (select sum(abalance) from pgbench_accounts) || ' ' || \
                (select sum(bbalance) from pgbench_branches) || ' ' || \
                (select sum(tbalance) from pgbench_tellers) || ' ' || \
                (select coalesce(sum(delta), 0) from pgbench_history)",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basebackup_restores_exactly_and_consistently_under_load() -> TestResult {
    let src = Cluster::new()?;
    src.pgbench(&["-i", "-s", "3", "-q"])?;
    src.sql("create table marks(id int primary key, v text); insert into marks select g, md5(g::text) from generate_series(1, 3000) g")?;
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;

    // Quiet cluster: the restored copy holds exactly the same data.
    let dump = src.pg_dump("postgres")?;
    let r1 = backup(&repo, &opts(&src), &NoProgress).await?;
    eprintln!("basebackup 1: {r1}");
    assert_eq!(r1.exit_code(), 0, "{r1}");
    assert!(r1.warnings.is_empty(), "{r1}");
    let m1 = pgkeep_core::manifest::load_physical(&repo, "main", &r1.id).await?;
    assert_eq!(m1.method, "basebackup");
    assert!(m1.backup_label.contains("START WAL LOCATION"));
    assert!(m1.backup_label.contains("BACKUP METHOD: streamed"));
    assert!(m1.files.iter().any(|f| f.path == "global/pg_control"));
    assert!(
        !m1.files.iter().any(|f| f.path == "backup_label"
            || f.path == "backup_manifest"
            || f.path == "postmaster.pid"
            || f.path.starts_with("pg_wal/0")),
        "pg_basebackup's own files and WAL are not data files"
    );
    assert!(m1.tablespace_map.is_none());
    assert!(!m1.wal.is_empty());
    // The last WAL segment is stored only up to the stop LSN.
    let last = m1.wal.last().unwrap();
    assert!(
        last.stream.size < last.size,
        "{} stored {} of {}",
        last.name,
        last.stream.size,
        last.size
    );
    let work = tempfile::tempdir()?;
    let t1 = work.path().join("r1");
    restore(&repo, &restore_opts(&r1.id, &t1), &NoProgress).await?;
    assert!(!t1.join(INCOMPLETE_MARKER).exists());
    let c1 = Cluster::builder().start_existing(&t1)?;
    assert_eq!(first_difference(&dump, &c1.pg_dump("postgres")?), None);
    drop(c1);

    // A small change: the next backup stores a small fraction of the first (deduplication
    // works on the stream as on files read locally).
    src.sql("update marks set v = 'changed' where id <= 50")?;
    let rs = backup(&repo, &opts(&src), &NoProgress).await?;
    assert!(
        rs.totals.new_bytes * 10 < r1.totals.new_bytes,
        "after a small change {} new bytes, the first backup {}",
        rs.totals.new_bytes,
        r1.totals.new_bytes
    );

    // Under pgbench load: a consistent cluster, with at least the transactions committed
    // before the backup began.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let env = src.env();
    let load = {
        let (stop, rounds) = (stop.clone(), rounds.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
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
                rounds.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let history_before: i64 = src.sql("select count(*) from pgbench_history")?.parse()?;
    assert!(history_before > 0, "the load runs");
    let r2 = backup(&repo, &opts(&src), &NoProgress).await?;
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    eprintln!("basebackup 2 under load: {r2}");
    assert!(rounds.load(Ordering::SeqCst) >= 1);
    let t2 = work.path().join("r2");
    restore(&repo, &restore_opts("latest", &t2), &NoProgress).await?;
    let c2 = Cluster::builder().start_existing(&t2)?;
    let sums = tpcb_sums(&c2)?;
    let parts: Vec<&str> = sums.split(' ').collect();
    assert!(
        parts.len() == 4 && parts.iter().all(|p| *p == parts[0]),
        "inconsistent restore: {sums}"
    );
    let history_restored: i64 = c2.sql("select count(*) from pgbench_history")?.parse()?;
    assert!(
        history_restored >= history_before,
        "{history_restored} < {history_before}"
    );
    assert_eq!(c2.sql("select count(*) from marks")?, "3000");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basebackup_reports_a_corrupted_page_and_refuses_tablespaces() -> TestResult {
    let mut c = Cluster::builder().setting("autovacuum", "off").start()?;
    c.sql("create table t(id int, v text); insert into t select g, repeat('x', 100) from generate_series(1, 5000) g; checkpoint")?;
    let rel = c.sql("select pg_relation_filepath('t')")?;
    c.stop()?;
    let path = c.pgdata().join(&rel);
    let mut data = std::fs::read(&path)?;
    data[2 * 8192 + 4000] ^= 0x5a;
    std::fs::write(&path, &data)?;
    c.start()?;

    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    let r = backup(&repo, &opts(&c), &NoProgress).await?;
    assert_eq!(r.page_checksum_failures.len(), 1, "{r}");
    let f = &r.page_checksum_failures[0];
    assert_eq!(
        (f.path.as_str(), f.block, f.rel_block),
        (rel.as_str(), 2, 2)
    );
    assert!(f.reason.contains("checksum"), "{}", f.reason);
    assert_eq!(r.exit_code(), 3, "done with warnings: {r}");
    assert_eq!(
        repo.list_manifests(None).await?.len(),
        1,
        "the backup is kept"
    );

    let ts = c.scratch_dir("ts")?;
    c.sql(&format!("create tablespace ts location '{}'", ts.display()))?;
    let e = backup(&repo, &opts(&c), &NoProgress).await.unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("tablespaces (ts)"), "{e}");
    assert!(e.to_string().contains("--method local"), "{e}");
    assert_eq!(repo.list_manifests(None).await?.len(), 1);
    // No slot left behind by the refused or the completed backup.
    assert_eq!(c.sql("select count(*) from pg_replication_slots")?, "0");
    Ok(())
}
