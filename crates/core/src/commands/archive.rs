//! `pgkeep archive-push PATH` and `pgkeep archive-get WALNAME DEST`: continuous WAL archiving.
//!
//! # Object layout
//!
//! ```text
//! wal/<cluster>/identity                    the cluster's identity (system id, major, segment size)
//! wal/<cluster>/<TLI><LOG>/<segment>        one object per segment, e.g.
//!                                           wal/main/0000000100000000/000000010000000000000003
//! wal/<cluster>/<TLI><LOG>/<segment>.summary  what point-in-time recovery needs of the segment
//! wal/<cluster>/<TLI><LOG>/<seg>.partial    last, incomplete segment of an old timeline
//! wal/<cluster>/<TLI><LOG>/<seg>.<off>.backup   backup history file
//! wal/<cluster>/<TLI>00000000/<TLI>.history timeline history file
//! ```
//!
//! Every object is the file's bytes, zstd-compressed and sealed by
//! [`Repository::put_sealed_if_absent`] with the object's key as associated data, so an
//! object moved under another name fails authentication. The identity is a sealed JSON
//! [`ClusterIdentity`].
//!
//! A segment's summary ([`SegmentSummary`]: the span of its transaction-end times, the xids
//! that ended in it, its restore points) is computed by `archive-push` while it has the
//! segment in memory (a walk over its records, a few milliseconds) and stored as a sealed
//! JSON object of its own, written once after the segment, so the pre-flight of a
//! point-in-time restore reads kilobytes instead of the whole archive. Sealed like every
//! object: nothing of it is readable without the key in an encrypted repository. A segment
//! without a summary (pushed by an older pgkeep, or a push killed between the two writes and
//! not retried) is read and scanned when needed ([`segment_summary`]).
//!
//! # Invariants
//!
//! - A WAL object is written once, with put-if-absent (atomic on every backend), and never
//!   replaced. A second push of identical content succeeds with a warning and writes nothing;
//!   different content fails with exit 14 and leaves the stored object untouched. History files
//!   follow the same rule.
//! - The segment's long page header must carry the system identifier, major version and segment
//!   size recorded in `wal/<cluster>/identity` (written put-if-absent by the first push or
//!   backup); a foreign cluster is refused with exit 15 before anything is written.
//! - Start-up reads no index ([`Repository::open_metadata_only`]): a push costs the `config`
//!   read (plus the key files when encrypted), the identity read, a HEAD and two conditional
//!   writes (segment, summary). A file already archived is compared before anything is
//!   uploaded (HEAD, then a read of the stored copy), so a retried push sends no body.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use pgkeep_pg::wal::{WalFileName, WalPageHeader, WalSegmentName, DEFAULT_SEGMENT_SIZE};
use pgkeep_pg::walrecords::SegmentSummary;
use pgkeep_repo::{ErrorKind as RepoErrorKind, RepoError, Repository};
use pgkeep_storage::ErrorKind as StorageErrorKind;
use serde::{Deserialize, Serialize};

use crate::context::{Context, Report};
use crate::error::{Error, ErrorKind, Result};

/// zstd level of WAL objects, whatever the repository's level for backups. On real WAL
/// (bench/archive.sh: md5-text rows and their index) level 1 is twice as fast as level 3
/// and compresses a little *better* (35.4 vs 37.5 MiB for 7 segments): WAL has few of the
/// long repeats the slower levels hunt for, and push time is what keeps pg_wal small.
pub const WAL_COMPRESSION_LEVEL: i32 = 1;

/// Version of the [`ClusterIdentity`] layout.
pub const IDENTITY_FORMAT: u32 = 1;

/// The key prefix of a cluster's WAL archive: `wal/<cluster>/`.
pub fn wal_prefix(cluster: &str) -> String {
    format!("wal/{cluster}/")
}

/// The key of a cluster's identity object.
pub fn identity_key(cluster: &str) -> String {
    format!("wal/{cluster}/identity")
}

/// The key of one archived WAL file: `wal/<cluster>/<archive dir>/<name>`.
pub fn wal_key(cluster: &str, name: &WalFileName) -> String {
    format!("wal/{cluster}/{}/{name}", name.archive_dir())
}

/// The key of a segment's summary: `wal/<cluster>/<archive dir>/<segment>.summary`.
pub fn summary_key(cluster: &str, seg: &WalSegmentName) -> String {
    format!("wal/{cluster}/{}/{seg}.summary", seg.archive_dir())
}

/// Parses a key below `wal/<cluster>/` back into a WAL file name (`None` for the identity
/// object and anything else that is not an archived WAL file).
pub fn parse_wal_key(cluster: &str, key: &str) -> Option<WalFileName> {
    let rest = key.strip_prefix(&wal_prefix(cluster))?;
    let (dir, name) = rest.split_once('/')?;
    let parsed = WalFileName::parse(name).ok()?;
    (parsed.archive_dir() == dir).then_some(parsed)
}

fn check_cluster_name(cluster: &str) -> Result<()> {
    crate::config::check_name("cluster name", cluster).map_err(Error::usage)
}

// ---------------------------------------------------------------------------------------------
// Cluster identity

/// What the repository knows of the PostgreSQL cluster archived under one name. Written once
/// (put-if-absent) by the first `archive-push` or backup; every later push is compared to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    /// [`IDENTITY_FORMAT`].
    pub format: u32,
    /// `pg_control`'s system identifier, decimal text (u64 does not survive every JSON reader).
    pub system_identifier: String,
    /// PostgreSQL major version, e.g. 15.
    pub pg_major: u32,
    /// WAL segment size in bytes.
    pub wal_segment_size: u32,
    /// When the record was written.
    pub created: DateTime<Utc>,
    /// Which command wrote it (`archive-push` or `backup`).
    pub created_by: String,
}

impl ClusterIdentity {
    /// A new identity record.
    pub fn new(system_identifier: u64, pg_major: u32, wal_segment_size: u32, by: &str) -> Self {
        ClusterIdentity {
            format: IDENTITY_FORMAT,
            system_identifier: system_identifier.to_string(),
            pg_major,
            wal_segment_size,
            created: Utc::now(),
            created_by: by.to_string(),
        }
    }

    fn same_cluster(&self, other: &ClusterIdentity) -> bool {
        self.system_identifier == other.system_identifier
            && self.pg_major == other.pg_major
            && self.wal_segment_size == other.wal_segment_size
    }

    fn describe(&self) -> String {
        format!(
            "system identifier {}, PostgreSQL {}, WAL segment size {} MiB",
            self.system_identifier,
            self.pg_major,
            self.wal_segment_size >> 20
        )
    }
}

/// Reads the identity of `cluster`, `None` when no push or backup recorded one yet.
pub async fn load_identity(repo: &Repository, cluster: &str) -> Result<Option<ClusterIdentity>> {
    check_cluster_name(cluster)?;
    let key = identity_key(cluster);
    match repo.get_sealed(&key, key.as_bytes()).await {
        Ok(plain) => serde_json::from_slice(&plain).map(Some).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("the cluster identity object {key} does not parse: {e}"),
            )
        }),
        Err(e) if e.kind() == RepoErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Checks `found` against the identity recorded for `cluster`, recording it first when there
/// is none (put-if-absent: of two first writers racing, one wins and the other is compared
/// to it). A different cluster fails with [`ErrorKind::ClusterMismatch`] (exit 15).
///
/// The backup command should call this too, so a backup taken before the first push pins
/// the identity as well.
pub async fn ensure_identity(
    repo: &Repository,
    cluster: &str,
    found: &ClusterIdentity,
    what: &str,
) -> Result<ClusterIdentity> {
    let key = identity_key(cluster);
    let recorded = match load_identity(repo, cluster).await? {
        Some(r) => r,
        None => {
            let json = serde_json::to_vec(found).expect("identity serializes");
            match repo.put_sealed_if_absent(&key, key.as_bytes(), &json).await {
                Ok(()) => return Ok(found.clone()),
                Err(RepoError::Storage(e)) if e.kind == StorageErrorKind::AlreadyExists => {
                    load_identity(repo, cluster).await?.ok_or_else(|| {
                        Error::new(
                            ErrorKind::Failure,
                            format!("{key} exists but cannot be read back"),
                        )
                    })?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    if recorded.same_cluster(found) {
        Ok(recorded)
    } else {
        Err(Error::with_hint(
            ErrorKind::ClusterMismatch,
            format!(
                "{what} comes from another cluster ({}) than the one archived as {cluster:?} in this repository ({})",
                found.describe(),
                recorded.describe()
            ),
            "give this cluster its own --cluster name (or repository); nothing was written",
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Opening the repository the fast way

/// Opens the repository without reading its index (see [`Repository::open_metadata_only`]),
/// with the same passphrase rules as [`Context::open_repository`].
pub async fn open_repository_fast(ctx: &Context) -> Result<Repository> {
    let storage = ctx.open_storage()?;
    if ctx.passphrases.is_given() {
        let p = ctx.passphrases.current()?;
        return Ok(Repository::open_metadata_only(storage, p.as_ref().map(|s| s.expose())).await?);
    }
    match Repository::open_metadata_only(storage.clone(), None).await {
        Err(e) if e.kind() == RepoErrorKind::PassphraseRequired && ctx.passphrases.has_source() => {
            let p = ctx.passphrases.current()?;
            Ok(Repository::open_metadata_only(storage, p.as_ref().map(|s| s.expose())).await?)
        }
        other => Ok(other?),
    }
}

// ---------------------------------------------------------------------------------------------
// archive-push

/// Options of `archive-push`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivePushOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// Path of the WAL file (`%p`).
    pub path: PathBuf,
}

/// What happened to a pushed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushOutcome {
    /// Stored now.
    Stored,
    /// Already in the repository with identical content; nothing written.
    AlreadyArchived,
}

/// What `archive-push` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivePushReport {
    /// File name, e.g. `000000010000000000000003`.
    pub file: String,
    /// Object key in the repository.
    pub key: String,
    /// Stored, or already there.
    pub outcome: PushOutcome,
    /// Size of the file.
    pub bytes: u64,
    /// Wall time of the push inside the process (repository open excluded), milliseconds.
    pub elapsed_ms: f64,
    /// Of which reading the segment's records for its summary, milliseconds (segments only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_ms: Option<f64>,
}

impl fmt::Display for ArchivePushReport {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // archive_command's output lands in the server log once per segment: a success is
        // silent (the duplicate case is a logged warning); `--json` gives the details.
        Ok(())
    }
}

// A duplicate push is success (exit 0): PostgreSQL must not see exit 3 as a failure.
impl Report for ArchivePushReport {}

/// `pgkeep archive-push PATH`: opens the repository the fast way and pushes one file.
pub async fn archive_push(ctx: &Context, opts: &ArchivePushOptions) -> Result<ArchivePushReport> {
    check_cluster_name(&opts.cluster)?;
    // Parse the name before touching the repository: a wrong %p is a usage error.
    WalFileName::from_path(&opts.path).map_err(|e| {
        Error::usage_hint(
            format!("{}: {e}", opts.path.display()),
            "archive_command must pass %p, the path of a WAL file PostgreSQL archives",
        )
    })?;
    // `options.spool_dir` in the configuration file (the flag and PGKEEP_SPOOL_DIR reach
    // the asynchronous mode directly) makes the push asynchronous.
    if let Some(spool_dir) = &ctx.settings.spool_dir {
        use crate::commands::archive_async::{
            push_async, AsyncPushOptions, DEFAULT_JOBS, DEFAULT_TIMEOUT,
        };
        let a = AsyncPushOptions {
            cluster: opts.cluster.clone(),
            spool_dir: spool_dir.clone(),
            jobs: DEFAULT_JOBS,
            timeout: DEFAULT_TIMEOUT,
        };
        return push_async(ctx, &a, &opts.path).await;
    }
    // One process per segment: opening the repository (for an encrypted one, the passphrase
    // derivation, tens of milliseconds on one core) runs while the segment is read and
    // compressed on the other cores, which is most of a push. Compression needs no key; the
    // identity check still comes before anything is written.
    let path = opts.path.clone();
    let prepare = tokio::task::spawn_blocking(move || WalFileContent::read_compressed(&path));
    let repo = open_repository_fast(ctx).await;
    let content = prepare
        .await
        .map_err(|e| Error::new(ErrorKind::Failure, format!("compression task failed: {e}")));
    // A repository that does not open is the error to report, as before any read.
    let repo = repo?;
    let content = content??;
    if ctx.settings.cluster.copy_to.is_empty() {
        return push_content(&repo, &opts.cluster, &opts.path, content).await;
    }
    // Acknowledged only when every repository has it (cluster.copy_to).
    let copies = crate::commands::mirror::open_copies(ctx).await?;
    let report = push_content(&repo, &opts.cluster, &opts.path, content.clone()).await?;
    crate::commands::mirror::push_to_copies(&copies, &opts.cluster, &opts.path, &content).await?;
    Ok(report)
}

/// A WAL file read into memory, with its compressed form when it was computed ahead.
#[derive(Clone)]
pub struct WalFileContent {
    data: Vec<u8>,
    compressed: Option<Vec<u8>>,
}

impl WalFileContent {
    /// Reads the file at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let data =
            std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        Ok(Self {
            data,
            compressed: None,
        })
    }

    /// Reads the file at `path` and compresses it as [`push_content`] would store it.
    pub fn read_compressed(path: &Path) -> Result<Self> {
        let mut c = Self::read(path)?;
        c.compressed = Some(compress_parallel(&c.data, WAL_COMPRESSION_LEVEL)?);
        Ok(c)
    }
}

/// Reads the identity a segment's long page header carries, checking that the header
/// describes the segment the file is named after.
fn segment_identity(path: &Path, data: &[u8], seg: &WalSegmentName) -> Result<ClusterIdentity> {
    let h = WalPageHeader::parse(data, path)
        .map_err(|e| Error::new(ErrorKind::Failure, format!("{e}; nothing was archived")))?;
    let major = h.major_version().ok_or_else(|| {
        Error::new(
            ErrorKind::ClusterMismatch,
            format!(
                "{}: WAL page magic {:#06X} belongs to no PostgreSQL release this pgkeep knows (it supports PostgreSQL 13 to 18); nothing was archived",
                path.display(),
                h.magic
            ),
        )
    })?;
    // The first page of a timeline's first segment carries the old timeline (PostgreSQL
    // copies the segment at the switch), so only the position is compared, not the timeline.
    if h.segment_name().segno(h.seg_size) != seg.segno(h.seg_size) {
        return Err(Error::new(
            ErrorKind::Failure,
            format!(
                "{}: its page header starts at {} (segment {}), not at segment {seg}; nothing was archived",
                path.display(),
                h.page_addr,
                h.segment_name()
            ),
        ));
    }
    if data.len() as u64 != h.seg_size as u64 {
        return Err(Error::new(
            ErrorKind::Failure,
            format!(
                "{}: {} bytes, but its header says segments are {} bytes; nothing was archived",
                path.display(),
                data.len(),
                h.seg_size
            ),
        ));
    }
    Ok(ClusterIdentity::new(
        h.system_identifier,
        major,
        h.seg_size,
        "archive-push",
    ))
}

/// Pushes one WAL file (segment, `.partial`, `.backup` or `.history`) into `repo` under
/// `cluster`. Library form of `archive-push`, also used by the asynchronous pusher.
pub async fn push_file(repo: &Repository, cluster: &str, path: &Path) -> Result<ArchivePushReport> {
    check_cluster_name(cluster)?;
    WalFileName::from_path(path).map_err(|e| Error::usage(format!("{}: {e}", path.display())))?;
    push_content(repo, cluster, path, WalFileContent::read(path)?).await
}

/// [`push_file`] for content already read from `path` (and maybe compressed).
pub async fn push_content(
    repo: &Repository,
    cluster: &str,
    path: &Path,
    content: WalFileContent,
) -> Result<ArchivePushReport> {
    let started = Instant::now();
    check_cluster_name(cluster)?;
    let name = WalFileName::from_path(path)
        .map_err(|e| Error::usage(format!("{}: {e}", path.display())))?;
    let WalFileContent { data, compressed } = content;
    match &name {
        WalFileName::Segment(seg) => {
            let found = segment_identity(path, &data, seg)?;
            ensure_identity(repo, cluster, &found, &format!("WAL segment {name}")).await?;
        }
        WalFileName::Partial(seg) => {
            // A partial segment is a full-size file whose tail was never written.
            let found = segment_identity(path, &data, seg)?;
            ensure_identity(repo, cluster, &found, &format!("WAL file {name}")).await?;
        }
        // History and backup history files are text without a header to check.
        WalFileName::History(_) | WalFileName::Backup(..) => {}
    }
    // The summary is computed before anything is written: a segment this pgkeep cannot read
    // (another major version) is still archived, only without one.
    let scan_started = Instant::now();
    let summary = match &name {
        WalFileName::Segment(_) => match SegmentSummary::of_segment(&data, path) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("{name}: no record summary ({e}); point-in-time pre-flights will read the segment");
                None
            }
        },
        _ => None,
    };
    let scan_ms = matches!(name, WalFileName::Segment(_))
        .then(|| scan_started.elapsed().as_secs_f64() * 1000.0);
    let key = wal_key(cluster, &name);
    // Already archived (a retry after a crash, or a duplicate): compare without uploading.
    // Absent: put-if-absent, which still settles a race with another pusher.
    let exists = match repo.storage().head(&key).await {
        Ok(_) => true,
        Err(e) if e.kind == StorageErrorKind::NotFound => false,
        Err(e) => return Err(e.into()),
    };
    let stored = if exists {
        false
    } else {
        match store_sealed(repo, &key, &data, compressed).await {
            Ok(()) => true,
            Err(RepoError::Storage(e)) if e.kind == StorageErrorKind::AlreadyExists => false,
            Err(e) => return Err(e.into()),
        }
    };
    let outcome = if stored {
        PushOutcome::Stored
    } else {
        compare_existing(repo, &key, &name, &data).await?;
        tracing::warn!(
            "WAL file {name} was already archived with identical content; nothing written"
        );
        PushOutcome::AlreadyArchived
    };
    if let (Some(sum), WalFileName::Segment(seg)) = (&summary, &name) {
        // After the segment, so a summary never describes an object that is not there; on
        // a duplicate push it completes a push that was killed between the two writes.
        store_summary(
            repo,
            cluster,
            seg,
            sum,
            outcome == PushOutcome::AlreadyArchived,
        )
        .await?;
    }
    Ok(ArchivePushReport {
        file: name.to_string(),
        key,
        outcome,
        bytes: data.len() as u64,
        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
        scan_ms,
    })
}

/// Compresses `data` into independent zstd frames, one per piece, on all cores.
/// Concatenated frames are one valid zstd stream (what [`Repository::get_sealed`] decodes),
/// so the object has exactly the layout of [`Repository::put_sealed_if_absent`]; a 16 MiB
/// segment compresses in a fraction of the single-threaded time, which is most of a push.
pub fn compress_parallel(data: &[u8], level: i32) -> Result<Vec<u8>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);
    // Pieces of at least 1 MiB: smaller ones cost ratio for nothing.
    let piece = data.len().div_ceil(threads).max(1 << 20);
    let compress = |p: &[u8]| {
        zstd::bulk::compress(p, level)
            .map_err(|e| Error::new(ErrorKind::Failure, format!("zstd failed: {e}")))
    };
    if data.len() <= piece {
        return compress(data);
    }
    let parts: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = data
            .chunks(piece)
            .map(|p| s.spawn(move || compress(p)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Failure,
                        "compression thread panicked",
                    ))
                })
            })
            .collect()
    });
    let mut out = Vec::with_capacity(data.len() / 2);
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

/// Stores `data` under `key` put-if-absent, compressed in parallel and sealed with the key as
/// associated data (readable with [`Repository::get_sealed`]).
/// `compressed` is `data` as [`compress_parallel`] at [`WAL_COMPRESSION_LEVEL`] gives it, when
/// the caller computed it ahead.
async fn store_sealed(
    repo: &Repository,
    key: &str,
    data: &[u8],
    compressed: Option<Vec<u8>>,
) -> Result<(), RepoError> {
    let z = match compressed {
        Some(z) => z,
        None => compress_parallel(data, WAL_COMPRESSION_LEVEL)
            .map_err(|e| RepoError::Invalid(e.to_string()))?,
    };
    let sealed = repo.sealer().seal_meta(key.as_bytes(), &z);
    drop(z);
    repo.storage()
        .put_if_absent(key, bytes::Bytes::from(sealed))
        .await?;
    Ok(())
}

/// Stores a segment's summary once (put-if-absent; an existing one is left as it is). With
/// `check_first`, a HEAD avoids the write when it is already there.
async fn store_summary(
    repo: &Repository,
    cluster: &str,
    seg: &WalSegmentName,
    summary: &SegmentSummary,
    check_first: bool,
) -> Result<()> {
    let key = summary_key(cluster, seg);
    if check_first && repo.storage().head(&key).await.is_ok() {
        return Ok(());
    }
    let json = serde_json::to_vec(summary).expect("summary serializes");
    match repo.put_sealed_if_absent(&key, key.as_bytes(), &json).await {
        Ok(()) => Ok(()),
        Err(RepoError::Storage(e)) if e.kind == StorageErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reads the stored summary of `seg`; `None` when there is none.
pub async fn load_summary(
    repo: &Repository,
    cluster: &str,
    seg: &WalSegmentName,
) -> Result<Option<SegmentSummary>> {
    let key = summary_key(cluster, seg);
    match repo.get_sealed(&key, key.as_bytes()).await {
        Ok(plain) => serde_json::from_slice(&plain).map(Some).map_err(|e| {
            Error::with_hint(
                ErrorKind::Integrity,
                format!("the WAL summary object {key} does not parse: {e}"),
                "it was written by a newer pgkeep, or is damaged; `pgkeep verify --read-data` checks the archive",
            )
        }),
        Err(e) if e.kind() == RepoErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The summary of an archived segment: the stored one, else the segment read, verified and
/// scanned now (not stored: a restore only reads). `None` when the segment is not archived.
pub async fn segment_summary(
    repo: &Repository,
    cluster: &str,
    seg: &WalSegmentName,
) -> Result<Option<SegmentSummary>> {
    if let Some(s) = load_summary(repo, cluster, seg).await? {
        return Ok(Some(s));
    }
    let Some(data) = fetch(repo, cluster, &WalFileName::Segment(*seg)).await? else {
        return Ok(None);
    };
    summarize_bytes(&data, seg).map(Some)
}

/// Scans segment bytes (read from the archive or a backup) into a summary.
pub fn summarize_bytes(data: &[u8], seg: &WalSegmentName) -> Result<SegmentSummary> {
    SegmentSummary::of_segment(data, Path::new(&seg.to_string())).map_err(|e| {
        Error::with_hint(
            ErrorKind::Failure,
            format!("reading the records of WAL segment {seg}: {e}"),
            "point-in-time targets by time, xid or name are checked by reading the WAL (PostgreSQL 13 to 18)",
        )
    })
}

/// The stored object of `key` exists: success when its content equals `data`, else a WAL
/// conflict (exit 14). Nothing is written either way.
async fn compare_existing(
    repo: &Repository,
    key: &str,
    name: &WalFileName,
    data: &[u8],
) -> Result<()> {
    let stored = repo.get_sealed(key, key.as_bytes()).await.map_err(|e| {
        Error::with_hint(
            e.kind().into(),
            format!("WAL file {name} is already archived ({key}) but the stored copy cannot be read to compare it: {e}"),
            "run `pgkeep verify --read-data`; the stored object was left as it is",
        )
    })?;
    if stored == data {
        return Ok(());
    }
    let first_diff = stored
        .iter()
        .zip(data)
        .position(|(a, b)| a != b)
        .unwrap_or(stored.len().min(data.len()));
    Err(Error::with_hint(
        ErrorKind::WalConflict,
        format!(
            "WAL file {name} is already archived with different content ({} bytes stored, {} bytes pushed, first difference at byte {first_diff}); the stored copy was left untouched",
            stored.len(),
            data.len()
        ),
        "two clusters may be archiving under one --cluster name, or a restored copy re-archives an old timeline; give each cluster its own name",
    ))
}

// ---------------------------------------------------------------------------------------------
// archive-get

/// Options of `archive-get`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveGetOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// The WAL file name PostgreSQL asks for (`%f`).
    pub walname: String,
    /// Where to write it (`%p`).
    pub dest: PathBuf,
}

/// What `archive-get` wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchiveGetReport {
    /// File name.
    pub file: String,
    /// Where it was written.
    pub dest: PathBuf,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time inside the process (repository open excluded), milliseconds.
    pub elapsed_ms: f64,
}

impl fmt::Display for ArchiveGetReport {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // restore_command output goes to the server log for every segment: stay silent.
        Ok(())
    }
}

impl Report for ArchiveGetReport {}

/// The error of a file that is not in the archive: exit 1, one line, no hint (PostgreSQL
/// asks for files past the end of the archive as a matter of course).
pub fn missing_error(cluster: &str, name: &str) -> Error {
    Error::new(
        ErrorKind::Failure,
        format!("WAL file {name} is not in the archive of cluster {cluster}"),
    )
}

/// `pgkeep archive-get WALNAME DEST`.
pub async fn archive_get(ctx: &Context, opts: &ArchiveGetOptions) -> Result<ArchiveGetReport> {
    check_cluster_name(&opts.cluster)?;
    let name = WalFileName::parse(&opts.walname).map_err(|e| {
        Error::usage_hint(
            e.to_string(),
            "restore_command must pass %f (the WAL file name) and %p (where to write it)",
        )
    })?;
    if let Some(spool_dir) = &ctx.settings.spool_dir {
        use crate::commands::archive_async::{get_async, AsyncGetOptions, DEFAULT_PREFETCH};
        let a = AsyncGetOptions {
            cluster: opts.cluster.clone(),
            spool_dir: spool_dir.clone(),
            prefetch: DEFAULT_PREFETCH,
        };
        return get_async(ctx, &a, &opts.walname, &opts.dest).await;
    }
    let repo = open_repository_fast(ctx).await?;
    match get_file(&repo, &opts.cluster, &name, &opts.dest).await? {
        Some(r) => Ok(r),
        None => Err(missing_error(&opts.cluster, &opts.walname)),
    }
}

/// Fetches one WAL file, verifies it and writes it to `dest` atomically (temporary file in
/// the same directory, fsync, rename). `Ok(None)` when the archive does not have it.
pub async fn get_file(
    repo: &Repository,
    cluster: &str,
    name: &WalFileName,
    dest: &Path,
) -> Result<Option<ArchiveGetReport>> {
    let started = Instant::now();
    let data = match fetch(repo, cluster, name).await? {
        Some(d) => d,
        None => return Ok(None),
    };
    write_restored(dest, &data)?;
    Ok(Some(ArchiveGetReport {
        file: name.to_string(),
        dest: dest.to_path_buf(),
        bytes: data.len() as u64,
        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
    }))
}

/// Reads and verifies one archived WAL file; `None` when absent. The object is authenticated
/// under its key; a segment's header must also name the segment asked for.
pub async fn fetch(
    repo: &Repository,
    cluster: &str,
    name: &WalFileName,
) -> Result<Option<Vec<u8>>> {
    check_cluster_name(cluster)?;
    let key = wal_key(cluster, name);
    let data = match repo.get_sealed(&key, key.as_bytes()).await {
        Ok(d) => d,
        Err(e) if e.kind() == RepoErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if let WalFileName::Segment(seg) | WalFileName::Partial(seg) = name {
        let h = WalPageHeader::parse(&data, Path::new(&key))
            .map_err(|e| Error::new(ErrorKind::Integrity, e.to_string()))?;
        if h.segment_name().segno(h.seg_size) != seg.segno(h.seg_size) {
            return Err(Error::new(
                ErrorKind::Integrity,
                format!(
                    "archived object {key} holds segment {}, not {seg}",
                    h.segment_name()
                ),
            ));
        }
    }
    Ok(Some(data))
}

/// Writes `data` to `dest` so that `dest` never holds a partial file.
pub fn write_atomically(dest: &Path, data: &[u8]) -> Result<()> {
    write_replacing(dest, data, true)
}

/// [`write_atomically`] without the fsync, for WAL handed to PostgreSQL by
/// `restore_command` (and the spool that feeds it): the server makes a restored segment
/// durable itself when it keeps one (a standby's `durable_rename`), and a crash only makes it
/// ask again. Syncing 16 MiB per segment twice (spool, then `pg_wal`) cost a third of the
/// WAL replay of a 2 GiB recovery on a disk that syncs at ~400 MB/s.
pub fn write_restored(dest: &Path, data: &[u8]) -> Result<()> {
    write_replacing(dest, data, false)
}

fn write_replacing(dest: &Path, data: &[u8], sync: bool) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = dest
        .file_name()
        .ok_or_else(|| Error::usage(format!("{} is not a file path", dest.display())))?;
    let tmp = dir.join(format!(
        ".{}.pgkeep-{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let io =
        |what: &str, p: &Path, e: std::io::Error| Error::io(format!("{what} {}", p.display()), e);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
        f.write_all(data).map_err(|e| io("writing", &tmp, e))?;
        if sync {
            f.sync_all().map_err(|e| io("syncing", &tmp, e))?;
        }
        std::fs::rename(&tmp, dest).map_err(|e| io("renaming into", dest, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Waiting for WAL (backups, check)

/// Whether the archive of `cluster` holds `name`.
pub async fn is_archived(repo: &Repository, cluster: &str, name: &WalFileName) -> Result<bool> {
    match repo.storage().head(&wal_key(cluster, name)).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind == StorageErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Waits until every segment in `segments` is in the archive of `cluster`, polling (100 ms,
/// backing off to 1 s) for at most `timeout`. A backup calls this after `pg_backup_stop` when
/// archiving is on, so it does not report success before the WAL it needs for point-in-time
/// recovery is in *this* repository. On timeout: exit 1, naming the missing segments.
pub async fn wait_for_wal_archived(
    repo: &Repository,
    cluster: &str,
    segments: &[WalSegmentName],
    timeout: Duration,
) -> Result<()> {
    check_cluster_name(cluster)?;
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<WalSegmentName> = segments.to_vec();
    let mut delay = Duration::from_millis(100);
    loop {
        let mut still = Vec::new();
        for s in pending {
            if !is_archived(repo, cluster, &WalFileName::Segment(s)).await? {
                still.push(s);
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let names: Vec<String> = pending.iter().map(|s| s.to_string()).collect();
            return Err(Error::with_hint(
                ErrorKind::Failure,
                format!(
                    "WAL not archived into this repository within {}s: {} (cluster {cluster})",
                    timeout.as_secs(),
                    names.join(", ")
                ),
                "check archive_command (it must run `pgkeep archive-push %p` with this repository and cluster) and pg_stat_archiver.last_failed_wal",
            ));
        }
        tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Everything archived for `cluster`, grouped: segments (and partials) by timeline, sorted.
#[derive(Debug, Clone, Default)]
pub struct ArchiveListing {
    /// Complete segments, sorted.
    pub segments: Vec<WalSegmentName>,
    /// `.partial` segments, sorted.
    pub partials: Vec<WalSegmentName>,
    /// Timelines with a history file.
    pub histories: Vec<u32>,
    /// Backup history files (names).
    pub backup_files: Vec<String>,
}

impl ArchiveListing {
    /// The newest complete segment (highest timeline, then position).
    pub fn last_segment(&self) -> Option<WalSegmentName> {
        self.segments.iter().max().copied()
    }
}

/// Lists the WAL archive of `cluster` (one `list` call).
pub async fn list_archive(repo: &Repository, cluster: &str) -> Result<ArchiveListing> {
    check_cluster_name(cluster)?;
    let mut out = ArchiveListing::default();
    for m in repo.storage().list(&wal_prefix(cluster)).await? {
        match parse_wal_key(cluster, &m.key) {
            Some(WalFileName::Segment(s)) => out.segments.push(s),
            Some(WalFileName::Partial(s)) => out.partials.push(s),
            Some(WalFileName::History(t)) => out.histories.push(t),
            Some(b @ WalFileName::Backup(..)) => out.backup_files.push(b.to_string()),
            None => {}
        }
    }
    out.segments.sort();
    out.partials.sort();
    out.histories.sort();
    out.backup_files.sort();
    Ok(out)
}

/// The segment size recorded for `cluster`, else PostgreSQL's default.
pub async fn segment_size(repo: &Repository, cluster: &str) -> Result<u32> {
    Ok(load_identity(repo, cluster)
        .await?
        .map(|i| i.wal_segment_size)
        .unwrap_or(DEFAULT_SEGMENT_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for n in [
            "000000010000000000000003",
            "000000020000000A000000FF.partial",
            "00000002.history",
            "000000010000000000000003.00000028.backup",
        ] {
            let name = WalFileName::parse(n).unwrap();
            let key = wal_key("main", &name);
            assert!(key.starts_with("wal/main/"), "{key}");
            assert_eq!(parse_wal_key("main", &key), Some(name));
            assert_eq!(parse_wal_key("other", &key), None);
        }
        assert_eq!(
            wal_key(
                "main",
                &WalFileName::parse("000000010000000A00000003").unwrap()
            ),
            "wal/main/000000010000000A/000000010000000A00000003"
        );
        assert_eq!(parse_wal_key("main", "wal/main/identity"), None);
        // A file filed under the wrong directory is not taken for an archived segment.
        assert_eq!(
            parse_wal_key("main", "wal/main/0000000100000001/000000010000000000000003"),
            None
        );
    }

    #[test]
    fn identity_comparison_ignores_provenance() {
        let a = ClusterIdentity::new(7, 15, 16 << 20, "archive-push");
        let mut b = ClusterIdentity::new(7, 15, 16 << 20, "backup");
        b.created = a.created - chrono::Duration::days(1);
        assert!(a.same_cluster(&b));
        assert!(!a.same_cluster(&ClusterIdentity::new(8, 15, 16 << 20, "x")));
        assert!(!a.same_cluster(&ClusterIdentity::new(7, 16, 16 << 20, "x")));
        assert!(!a.same_cluster(&ClusterIdentity::new(7, 15, 64 << 20, "x")));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        std::fs::write(&dest, b"old").unwrap();
        write_atomically(&dest, b"new content").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new content");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        assert!(write_atomically(&dir.path().join("missing/x"), b"x").is_err());
    }
}
