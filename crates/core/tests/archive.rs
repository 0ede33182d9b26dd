//! WAL archiving at library level, on segments written by real PostgreSQL 15 clusters.
//!
//! The clusters archive with `cp` into a directory (the pgkeep binary is exercised by the
//! root package's tests/archive_cli.rs); these tests push those real segments with
//! `push_file` and check what a user relies on: a second identical push succeeds and writes
//! nothing, a modified one fails with exit 14 and leaves the stored copy as it was, a
//! segment of another initdb is refused with exit 15 before anything is written, history
//! files are never overwritten, `get_file` gives back identical bytes and `None` for a
//! missing file, `verify` finds a segment deleted in the middle and names the backup whose
//! recovery window it breaks, and a backup's WAL wait is bounded. Once against SeaweedFS.
//! A duplicate push uploads nothing (counted by the fault layer, which is a pass-through
//! here); segment summaries missing from the archive are computed from the segments, equal
//! to the stored ones, and give the point-in-time pre-flight the same answers.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeep_core::commands::archive::{
    fetch, get_file, list_archive, load_identity, load_summary, push_file, segment_summary,
    summary_key, wait_for_wal_archived, wal_key, PushOutcome,
};
use pgkeep_core::commands::backup::{backup, BackupOptions};
use pgkeep_core::commands::pitr::{ArchiveReach, PitrOptions};
use pgkeep_core::commands::verify::{recovery_window, verify_repository, VerifyOptions};
use pgkeep_core::progress::NoProgress;
use pgkeep_core::Report;
use pgkeep_pg::recovery::RecoveryTarget;
use pgkeep_pg::wal::{WalFileName, WalSegmentName};
use pgkeep_repo::{InitOptions, Repository};
use pgkeep_storage::{Faulty, LocalStorage, Storage};
use pgkeep_testing::Cluster;

type TestResult = anyhow::Result<()>;

/// A cluster whose archive_command copies each WAL file into `<cluster dir>/cp-archive`.
/// A physical backup of `c` under the cluster name `main`.
async fn backup_of(
    repo: &pgkeep_repo::Repository,
    c: &Cluster,
) -> anyhow::Result<pgkeep_core::commands::backup::BackupReport> {
    Ok(backup(
        repo,
        &BackupOptions {
            cluster: "main".into(),
            pgdata: Some(c.pgdata().to_path_buf()),
            conninfo: Some(c.conninfo()),
            ..BackupOptions::default()
        },
        &NoProgress,
    )
    .await?)
}

fn archiving_cluster() -> anyhow::Result<(Cluster, PathBuf)> {
    let c = Cluster::builder()
        .archive_command("cp %p ../cp-archive/%f")
        .init()?;
    let archive = c.dir().join("cp-archive");
    std::fs::create_dir(&archive)?;
    chown_postgres(&archive)?;
    let mut c = c;
    c.start()?;
    Ok((c, archive))
}

fn chown_postgres(p: &Path) -> anyhow::Result<()> {
    if pgkeep_testing::cluster::running_as_root() {
        let st = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(p)
            .status()?;
        anyhow::ensure!(st.success(), "chown failed");
    }
    Ok(())
}

/// Writes a little, switches WAL `n` times and waits until the archive holds every
/// switched segment. Returns their names.
fn switch_and_wait(c: &Cluster, archive: &Path, n: usize) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for i in 0..n {
        c.sql(&format!(
            "CREATE TABLE IF NOT EXISTS t (i int, s text); INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, {}) g",
            100 * (i + 1)
        ))?;
        names.push(c.sql("SELECT pg_walfile_name(pg_switch_wal())")?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in &names {
        // `cp` is not atomic: wait for the whole segment, not just the name.
        while std::fs::metadata(archive.join(n))
            .map(|m| m.len())
            .unwrap_or(0)
            < 16 << 20
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{n} not archived; log:\n{}",
                c.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(names)
}

/// Archived segment files in order (complete ones only).
fn archived_segments(archive: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(archive)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(WalFileName::from_path(p), Ok(WalFileName::Segment(_))))
        .collect();
    v.sort();
    v
}

async fn local_repo(dir: &Path) -> Repository {
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir).unwrap());
    Repository::init(storage, InitOptions::default())
        .await
        .unwrap()
}

async fn keys(repo: &Repository) -> BTreeSet<String> {
    repo.storage()
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect()
}

/// A copy of `src` named `name` in `dir`, with one byte changed at `offset` (optional).
fn copy_as(src: &Path, dir: &Path, name: &str, flip_at: Option<usize>) -> PathBuf {
    let mut data = std::fs::read(src).unwrap();
    if let Some(o) = flip_at {
        data[o] ^= 0x5A;
    }
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_conflict_foreign_and_get() -> TestResult {
    let (c, archive) = archiving_cluster()?;
    switch_and_wait(&c, &archive, 2)?;
    let segs = archived_segments(&archive);
    assert!(segs.len() >= 2, "{segs:?}");
    let seg = &segs[0];
    let seg_name = seg.file_name().unwrap().to_str().unwrap().to_string();
    let original = std::fs::read(seg)?;

    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    let scratch = tempfile::tempdir()?;

    // First push stores; the identity is recorded from the page header.
    let r = push_file(&repo, "main", seg).await?;
    assert_eq!(r.outcome, PushOutcome::Stored);
    assert_eq!(r.bytes, 16 << 20);
    let identity = load_identity(&repo, "main")
        .await?
        .expect("identity recorded");
    assert_eq!(identity.pg_major, 15);
    let sysid = c.sql("SELECT system_identifier FROM pg_control_system()")?;
    assert_eq!(identity.system_identifier, sysid);
    let stored_key = wal_key("main", &WalFileName::parse(&seg_name)?);
    let stored_meta = repo.storage().head(&stored_key).await?;

    // The same content again (PostgreSQL retrying after a crash): success, nothing written.
    let before = keys(&repo).await;
    let r = push_file(&repo, "main", seg).await?;
    assert_eq!(r.outcome, PushOutcome::AlreadyArchived);
    assert_eq!(r.exit_code(), 0);
    assert_eq!(keys(&repo).await, before);

    // Different content under the same name: exit 14, naming the segment; stored copy intact.
    let modified = copy_as(seg, scratch.path(), &seg_name, Some(100_000));
    let e = push_file(&repo, "main", &modified).await.unwrap_err();
    assert_eq!(e.exit_code(), 14, "{e}");
    assert!(e.to_string().contains(&seg_name), "{e}");
    assert!(e.to_string().contains("byte 100000"), "{e}");
    let after = repo.storage().head(&stored_key).await?;
    assert_eq!(after.size, stored_meta.size);
    assert_eq!(after.last_modified, stored_meta.last_modified);
    let name = WalFileName::parse(&seg_name)?;
    assert!(fetch(&repo, "main", &name).await?.unwrap() == original);

    // A segment of another initdb: exit 15 before anything is written, even for a name the
    // archive does not have yet.
    let (other, other_archive) = archiving_cluster()?;
    switch_and_wait(&other, &other_archive, 1)?;
    let foreign_src = &archived_segments(&other_archive)[0];
    let foreign = copy_as(
        foreign_src,
        scratch.path(),
        foreign_src.file_name().unwrap().to_str().unwrap(),
        None,
    );
    let before = keys(&repo).await;
    let e = push_file(&repo, "main", &foreign).await.unwrap_err();
    assert_eq!(e.exit_code(), 15, "{e}");
    assert!(e.to_string().contains("system identifier"), "{e}");
    assert_eq!(keys(&repo).await, before, "nothing may be written");
    // Under its own cluster name it is welcome.
    assert_eq!(
        push_file(&repo, "other", &foreign).await?.outcome,
        PushOutcome::Stored
    );

    // A file whose header names another segment than its file name is refused.
    let misnamed = copy_as(seg, scratch.path(), "0000000100000000000000F1", None);
    let e = push_file(&repo, "main", &misnamed).await.unwrap_err();
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(e.to_string().contains("not at segment"), "{e}");

    // History files: stored once, identical again is fine, different is a conflict.
    let hist = scratch.path().join("00000002.history");
    std::fs::write(&hist, "1\t0/3000000\tno recovery target specified\n")?;
    assert_eq!(
        push_file(&repo, "main", &hist).await?.outcome,
        PushOutcome::Stored
    );
    assert_eq!(
        push_file(&repo, "main", &hist).await?.outcome,
        PushOutcome::AlreadyArchived
    );
    std::fs::write(&hist, "1\t0/4000000\tno recovery target specified\n")?;
    let e = push_file(&repo, "main", &hist).await.unwrap_err();
    assert_eq!(e.exit_code(), 14, "{e}");
    assert!(e.to_string().contains("00000002.history"), "{e}");

    // Backup history and partial files.
    let bfile = scratch.path().join(format!("{seg_name}.00000028.backup"));
    std::fs::write(&bfile, "START WAL LOCATION: 0/2000028\n")?;
    push_file(&repo, "main", &bfile).await?;
    let partial = copy_as(
        &segs[1],
        scratch.path(),
        &format!("{}.partial", segs[1].file_name().unwrap().to_str().unwrap()),
        None,
    );
    push_file(&repo, "main", &partial).await?;
    let listing = list_archive(&repo, "main").await?;
    assert_eq!(listing.segments.len(), 1);
    assert_eq!(listing.partials.len(), 1);
    assert_eq!(listing.histories, vec![2]);
    assert_eq!(listing.backup_files.len(), 1);

    // archive-get: identical bytes, atomically at DEST; None when missing.
    let dest = scratch.path().join("RECOVERYXLOG");
    let got = get_file(&repo, "main", &name, &dest)
        .await?
        .expect("present");
    assert_eq!(got.bytes, 16 << 20);
    assert!(std::fs::read(&dest)? == original, "restored bytes differ");
    let missing = WalFileName::parse("0000000100000000000000EE")?;
    assert!(get_file(&repo, "main", &missing, &scratch.path().join("x"))
        .await?
        .is_none());
    assert!(!scratch.path().join("x").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_deleted_segment_and_the_backup_it_breaks() -> TestResult {
    let (c, archive) = archiving_cluster()?;
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    switch_and_wait(&c, &archive, 1)?;
    let b = backup_of(&repo, &c).await?;
    switch_and_wait(&c, &archive, 5)?;
    for s in archived_segments(&archive) {
        push_file(&repo, "main", &s).await?;
    }
    let ok = verify_repository(&repo, "main", &VerifyOptions::default()).await?;
    assert!(ok.gaps.is_empty(), "{ok}");
    assert_eq!(ok.exit_code(), 0, "{ok}");
    assert_eq!(ok.backups.len(), 1);
    assert_eq!(ok.backups[0].id, b.id);

    // The backup's WAL is all there: the wait returns at once; a missing one times out.
    let stop_seg = WalSegmentName::from_end_lsn(b.stop_lsn.parse()?, b.timeline, 16 << 20);
    let start_seg = WalSegmentName::from_lsn(b.start_lsn.parse()?, b.timeline, 16 << 20);
    let t = Instant::now();
    wait_for_wal_archived(
        &repo,
        "main",
        &[start_seg, stop_seg],
        Duration::from_secs(5),
    )
    .await?;
    assert!(t.elapsed() < Duration::from_secs(1));
    let far = WalSegmentName::from_segno(0x7F, 1, 16 << 20);
    let e = wait_for_wal_archived(&repo, "main", &[stop_seg, far], Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&far.to_string()), "{e}");
    assert!(!e.to_string().contains(&stop_seg.to_string()), "{e}");
    assert_eq!(e.exit_code(), 1);

    // Delete one segment after the backup's stop, in the middle of the archive.
    let listing = list_archive(&repo, "main").await?;
    let victim = *listing
        .segments
        .iter()
        .find(|s| **s > stop_seg.next(16 << 20))
        .expect("a segment after the stop");
    assert!(listing.segments.iter().any(|s| *s > victim));
    repo.storage()
        .delete(&wal_key("main", &WalFileName::Segment(victim)))
        .await?;
    let report = verify_repository(&repo, "main", &VerifyOptions::default()).await?;
    assert_eq!(report.gaps.len(), 1, "{report}");
    assert_eq!(report.gaps[0].first, victim.to_string());
    assert_eq!(report.gaps[0].last, victim.to_string());
    assert_eq!(report.gaps[0].breaks, vec![b.id.clone()]);
    assert_eq!(
        report.backups[0].reachable_until,
        victim.start_lsn(16 << 20).to_string()
    );
    assert_eq!(report.exit_code(), 13, "{report}");
    let m = pgkeep_core::manifest::load_physical(&repo, "main", &b.id).await?;
    let (from, to) = recovery_window(&repo, "main", &m).await?;
    assert_eq!(from.to_string(), b.stop_lsn);
    assert_eq!(to, victim.start_lsn(16 << 20));
    let text = report.to_string();
    assert!(
        text.contains(&victim.to_string()) && text.contains(&b.id),
        "{text}"
    );

    // --read-data reads every WAL object and the backup's data.
    let full = Repository::open(repo.storage().clone(), None).await?;
    let deep = verify_repository(
        &full,
        "main",
        &VerifyOptions {
            read_data: true,
            ..Default::default()
        },
    )
    .await?;
    assert!(deep.wal_problems.is_empty(), "{deep}");
    assert!(deep.repository.as_ref().unwrap().is_ok(), "{deep}");
    assert_eq!(deep.wal_files_read, Some(listing.segments.len() - 1));

    // A flipped byte in a stored WAL object is caught by --read-data.
    let some = listing.segments[0];
    let path = repo_dir
        .path()
        .join(wal_key("main", &WalFileName::Segment(some)));
    let mut raw = std::fs::read(&path)?;
    let mid = raw.len() / 2;
    raw[mid] ^= 1;
    let mut perms = std::fs::metadata(&path)?.permissions();
    perms.set_mode(0o600);
    std::fs::set_permissions(&path, perms)?;
    std::fs::write(&path, raw)?;
    let deep = verify_repository(
        &full,
        "main",
        &VerifyOptions {
            read_data: true,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(deep.wal_problems.len(), 1, "{deep}");
    assert!(deep.wal_problems[0].contains(&some.to_string()), "{deep}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_get_on_seaweedfs() -> TestResult {
    let s3 = pgkeep_testing::s3::S3Server::start().await?;
    let (c, archive) = archiving_cluster()?;
    switch_and_wait(&c, &archive, 1)?;
    let seg = archived_segments(&archive)[0].clone();
    let name = WalFileName::from_path(&seg)?;
    let original = std::fs::read(&seg)?;
    let repo = Repository::init(s3.storage(), InitOptions::default()).await?;
    assert_eq!(
        push_file(&repo, "main", &seg).await?.outcome,
        PushOutcome::Stored
    );
    assert_eq!(
        push_file(&repo, "main", &seg).await?.outcome,
        PushOutcome::AlreadyArchived
    );
    let scratch = tempfile::tempdir()?;
    let modified = copy_as(
        &seg,
        scratch.path(),
        seg.file_name().unwrap().to_str().unwrap(),
        Some(8192 * 3 + 17),
    );
    let e = push_file(&repo, "main", &modified).await.unwrap_err();
    assert_eq!(e.exit_code(), 14, "{e}");
    let dest = scratch.path().join("RECOVERYXLOG");
    get_file(&repo, "main", &name, &dest)
        .await?
        .expect("present");
    assert!(std::fs::read(&dest)? == original, "restored bytes differ");
    let missing = WalFileName::parse("0000000100000000000000EE")?;
    assert!(get_file(&repo, "main", &missing, &dest).await?.is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_push_uploads_nothing_and_completes_a_missing_summary() -> TestResult {
    let (c, archive) = archiving_cluster()?;
    switch_and_wait(&c, &archive, 1)?;
    let seg = archived_segments(&archive)[0].clone();
    let name = WalFileName::from_path(&seg)?;
    let WalFileName::Segment(segname) = name else {
        unreachable!()
    };
    let dir = tempfile::tempdir()?;
    let faulty = Arc::new(Faulty::new(LocalStorage::new(dir.path())?));
    let storage: Arc<dyn Storage> = faulty.clone();
    let repo = Repository::init(storage, InitOptions::default()).await?;
    assert_eq!(
        push_file(&repo, "main", &seg).await?.outcome,
        PushOutcome::Stored
    );
    assert!(load_summary(&repo, "main", &segname).await?.is_some());
    // PostgreSQL retrying: compared with the stored copy, nothing sent.
    let before = faulty.mutations();
    assert_eq!(
        push_file(&repo, "main", &seg).await?.outcome,
        PushOutcome::AlreadyArchived
    );
    assert_eq!(
        faulty.mutations(),
        before,
        "a duplicate push wrote or uploaded"
    );
    // A push killed between the segment and its summary: the retry writes the summary only.
    repo.storage()
        .delete(&summary_key("main", &segname))
        .await?;
    let before = faulty.mutations();
    push_file(&repo, "main", &seg).await?;
    assert_eq!(faulty.mutations(), before + 1);
    assert!(load_summary(&repo, "main", &segname).await?.is_some());
    Ok(())
}

fn target(t: RecoveryTarget) -> PitrOptions {
    PitrOptions {
        target: t,
        action: None,
        timeline: None,
        restore_command: "false".into(),
        standby: false,
        primary_conninfo: None,
    }
}

/// The verdicts of the pre-flight for a few targets, as exit codes (0 = reachable).
async fn verdicts(
    repo: &Repository,
    m: &pgkeep_core::manifest::BackupManifest,
    targets: &[PitrOptions],
) -> anyhow::Result<Vec<i32>> {
    let reach = ArchiveReach::load(repo, "main").await?;
    let mut v = Vec::new();
    for t in targets {
        v.push(match reach.check(m, t).await {
            Ok(()) => 0,
            Err(e) => e.exit_code(),
        });
    }
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_summaries_are_computed_from_the_segments_with_the_same_answers() -> TestResult {
    let (c, archive) = archiving_cluster()?;
    let repo_dir = tempfile::tempdir()?;
    let repo = local_repo(repo_dir.path()).await;
    switch_and_wait(&c, &archive, 1)?;
    let b = backup_of(&repo, &c).await?;
    let xid = c.sql(
        "BEGIN; CREATE TABLE u (i int); INSERT INTO u VALUES (1); SELECT txid_current(); COMMIT;",
    )?;
    let time = c.sql("SELECT clock_timestamp()")?;
    c.sql("SELECT pg_create_restore_point('rp1')")?;
    switch_and_wait(&c, &archive, 3)?;
    let future = c.sql("SELECT clock_timestamp() + interval '1 day'")?;
    for s in archived_segments(&archive) {
        push_file(&repo, "main", &s).await?;
    }
    let m = pgkeep_core::manifest::load_physical(&repo, "main", &b.id).await?;
    let targets = [
        target(RecoveryTarget::Name("rp1".into())),
        target(RecoveryTarget::Name("nope".into())),
        target(RecoveryTarget::Xid(xid.clone())),
        target(RecoveryTarget::Xid("4000000000".into())),
        target(RecoveryTarget::Time(time.clone())),
        target(RecoveryTarget::Time(future.clone())),
    ];
    let want = vec![0, 16, 0, 16, 0, 16];
    assert_eq!(verdicts(&repo, &m, &targets).await?, want);

    // As if pushed by an older pgkeep: no summaries at all.
    let listing = list_archive(&repo, "main").await?;
    let mut stored = Vec::new();
    for s in &listing.segments {
        stored.push(
            load_summary(&repo, "main", s)
                .await?
                .expect("stored summary"),
        );
        repo.storage().delete(&summary_key("main", s)).await?;
    }
    for (s, want) in listing.segments.iter().zip(&stored) {
        assert!(load_summary(&repo, "main", s).await?.is_none());
        let computed = segment_summary(&repo, "main", s).await?.expect("segment");
        assert_eq!(&computed, want, "{s}");
    }
    assert_eq!(verdicts(&repo, &m, &targets).await?, want);
    Ok(())
}
