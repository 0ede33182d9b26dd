//! `pgkeep expire`, `pgkeep pin` / `unpin` and `pgkeep repo prune`.
//!
//! Expire works in the reverse of the write order (docs/design.md), under the exclusive lock,
//! so that an interruption at any point leaves a usable repository:
//! 1. the manifests of the backups the policy lets go are deleted (a backup exists if and only
//!    if its manifest does, so from here on they are gone and nothing else refers to them);
//! 2. archived WAL that no kept backup and no kept recovery window needs is deleted;
//! 3. garbage collection ([`Repository::prune`]) removes the blobs no manifest needs.
//!
//! A rerun after an interruption recomputes every step from what is left, so it finishes the
//! work. Pins are small sealed objects `pins/<cluster>/<id>` beside the manifests (manifests
//! are written once and never changed); a pinned backup is never expired.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use pgkeep_pg::wal::{WalFileName, WalSegmentName};
use pgkeep_repo::{LockKind, PruneOptions, PruneReport, Repository};
use serde::{Deserialize, Serialize};

use crate::commands::archive::{list_archive, summary_key, wal_key};
use crate::commands::dump::KIND_DUMP;
use crate::context::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::manifest::{self, ManifestHeader, KIND_PHYSICAL};
use crate::retention::{self, Candidate, Decision, RetentionPolicy};

/// Which kind of backup a rule set applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackupKind {
    /// Physical base backups (and, through them, the WAL archive).
    Physical,
    /// Logical dumps, each database on its own.
    Dump,
}

/// Options of `expire`.
#[derive(Debug, Clone, Default)]
pub struct ExpireOptions {
    /// Cluster name in the repository.
    pub cluster: String,
    /// Only this kind (`None`: each kind with its own policy).
    pub kind: Option<BackupKind>,
    /// Only the dumps of this database.
    pub db: Option<String>,
    /// Policy of physical backups.
    pub physical: RetentionPolicy,
    /// Policy of dumps (applied per database).
    pub dump: RetentionPolicy,
    /// Continuous WAL only from the newest N kept physical backups on; older kept backups
    /// keep their own WAL (start to stop). `None`: from the oldest kept backup on.
    pub keep_wal_for: Option<u32>,
    /// Decide and report, change nothing.
    pub dry_run: bool,
    /// Allow a policy to remove every backup of a group.
    pub allow_remove_all: bool,
    /// Garbage collection settings.
    pub prune: PruneOptions,
    /// Run history records older than this go (the newest of each kind and database
    /// stays); `None`: the history is left alone.
    pub history_max_age: Option<std::time::Duration>,
}

/// The decisions for one group of backups (a cluster's physical backups, one database's dumps).
#[derive(Debug, Clone, Serialize)]
pub struct GroupDecisions {
    /// `physical` or `dump`.
    pub kind: BackupKind,
    /// The database, for dumps (`None` for physical backups and `--all` dumps).
    pub database: Option<String>,
    /// Whether the group is the `--all` dumps.
    pub all_databases: bool,
    /// The policy applied, as text.
    pub policy: String,
    /// One decision per backup, newest first, with the rules that keep it.
    pub decisions: Vec<Decision>,
}

impl GroupDecisions {
    fn name(&self) -> String {
        match (&self.kind, &self.database, self.all_databases) {
            (BackupKind::Physical, _, _) => "physical backups".into(),
            (BackupKind::Dump, _, true) => "dumps of all databases (--all)".into(),
            (BackupKind::Dump, Some(db), _) => format!("dumps of database {db}"),
            (BackupKind::Dump, None, _) => "dumps".into(),
        }
    }
}

/// What happened to the WAL archive.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WalExpiry {
    /// Continuous WAL is kept from this segment position on (any timeline), if any backup stays.
    pub keep_from: Option<String>,
    /// Segments (and `.partial`/`.backup` files) removed, or that would be.
    pub files_removed: u64,
    /// Names of the first and last segment removed.
    pub removed_range: Option<(String, String)>,
    /// Segments kept because an older kept backup needs them for its own consistency.
    pub files_kept_for_older_backups: u64,
    /// Why nothing was removed, when nothing was.
    pub note: Option<String>,
}

/// What `expire` did (or, with `--dry-run`, would do).
#[derive(Debug, Clone, Serialize)]
pub struct ExpireReport {
    /// The cluster.
    pub cluster: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Decisions per group.
    pub groups: Vec<GroupDecisions>,
    /// Ids of the backups and dumps removed (or to remove).
    pub removed: Vec<String>,
    /// How many stay.
    pub kept: usize,
    /// The WAL archive (physical backups only).
    pub wal: Option<WalExpiry>,
    /// Garbage collection (not run with `--dry-run`).
    pub prune: Option<PruneReport>,
    /// Run history records removed (or, with `--dry-run`, that would be).
    pub history: Option<crate::history::HistoryExpiry>,
}

impl fmt::Display for ExpireReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for g in &self.groups {
            writeln!(
                f,
                "{} of cluster {} ({}):",
                g.name(),
                self.cluster,
                g.policy
            )?;
            for d in &g.decisions {
                let what = if d.keep { "keep  " } else { "remove" };
                let why = if d.keep {
                    d.reasons.join(", ")
                } else {
                    String::new()
                };
                writeln!(
                    f,
                    "  {what} {:<18} {}  {why}",
                    d.id,
                    d.time.format("%Y-%m-%d %H:%M:%S")
                )?;
            }
        }
        writeln!(
            f,
            "{verb} {} backups and dumps, {} kept",
            self.removed.len(),
            self.kept
        )?;
        if let Some(w) = &self.wal {
            match (&w.removed_range, &w.note) {
                (Some((a, z)), _) => writeln!(
                    f,
                    "WAL: {verb} {} files ({a} .. {z}); continuous WAL kept from {}",
                    w.files_removed,
                    w.keep_from.as_deref().unwrap_or("-")
                )?,
                (None, Some(n)) => writeln!(f, "WAL: nothing removed: {n}")?,
                (None, None) => writeln!(f, "WAL: nothing to remove")?,
            }
        }
        if let Some(h) = &self.history {
            writeln!(
                f,
                "run history: {verb} {} records, {} kept",
                h.removed, h.kept
            )?;
        }
        match &self.prune {
            Some(p) => write!(f, "{p}")?,
            None if self.dry_run => writeln!(
                f,
                "dry run: nothing changed; a real run then prunes unused data"
            )?,
            None => {}
        }
        Ok(())
    }
}

impl Report for ExpireReport {}

/// The key of a pin.
pub fn pin_key(cluster: &str, id: &str) -> String {
    format!("pins/{cluster}/{id}")
}

/// Ids of the pinned backups and dumps of `cluster`.
pub async fn pinned_ids(repo: &Repository, cluster: &str) -> Result<BTreeSet<String>> {
    let prefix = format!("pins/{cluster}/");
    Ok(repo
        .storage()
        .list(&prefix)
        .await?
        .into_iter()
        .filter_map(|m| m.key.strip_prefix(&prefix).map(str::to_owned))
        .collect())
}

/// Applies the policies, then (unless `dry_run`) removes what they let go.
pub async fn expire(repo: &Repository, opts: &ExpireOptions) -> Result<ExpireReport> {
    check_options(opts)?;
    // The exclusive lock first: no backup may commit, and no pin change, while we decide.
    let lock = if opts.dry_run {
        None
    } else {
        Some(repo.lock(LockKind::Exclusive, None, "expire").await?)
    };
    let headers = manifest::load_summaries(repo, &opts.cluster).await?;
    let pins = pinned_ids(repo, &opts.cluster).await?;
    let groups = decide(&headers, &pins, opts)?;
    let removed: Vec<String> = groups
        .iter()
        .flat_map(|g| g.decisions.iter().filter(|d| !d.keep).map(|d| d.id.clone()))
        .collect();
    let kept = groups
        .iter()
        .map(|g| g.decisions.iter().filter(|d| d.keep).count())
        .sum();
    let expires_physical = opts.kind != Some(BackupKind::Dump) && opts.db.is_none();
    let wal_plan = if expires_physical {
        Some(plan_wal(repo, opts, &headers, &removed).await?)
    } else {
        None
    };
    let mut report = ExpireReport {
        cluster: opts.cluster.clone(),
        dry_run: opts.dry_run,
        groups,
        removed,
        kept,
        wal: wal_plan.as_ref().map(|p| p.expiry.clone()),
        prune: None,
        history: None,
    };
    if let Some(age) = opts.history_max_age {
        let now = chrono::Utc::now();
        let h = crate::history::expire_history(repo, &opts.cluster, age, now, opts.dry_run);
        report.history = Some(h.await?);
    }
    if let Some(lock) = lock {
        for id in &report.removed {
            repo.delete_manifest(&opts.cluster, id).await?;
        }
        if let Some(plan) = &wal_plan {
            for key in &plan.keys {
                repo.storage().delete(key).await?;
            }
        }
        report.prune = Some(repo.prune(&opts.prune).await?);
        lock.release().await?;
    }
    Ok(report)
}

fn check_options(opts: &ExpireOptions) -> Result<()> {
    if opts.db.is_some() && opts.kind == Some(BackupKind::Physical) {
        return Err(Error::usage(
            "--db selects dumps of one database; it does not go with --kind physical",
        ));
    }
    Ok(())
}

/// Groups the manifests and applies the policy of each group.
fn decide(
    headers: &[(ManifestHeader, serde_json::Value)],
    pins: &BTreeSet<String>,
    opts: &ExpireOptions,
) -> Result<Vec<GroupDecisions>> {
    let mut groups: BTreeMap<(u8, Option<String>, bool), Vec<Candidate>> = BTreeMap::new();
    for (h, body) in headers {
        let Some(time) = h.stop_time.or(h.start_time) else {
            continue; // not a backup pgkeep wrote; never a candidate
        };
        let key = match h.kind.as_str() {
            KIND_PHYSICAL if wants(opts, BackupKind::Physical) => (0, None, false),
            KIND_DUMP if wants(opts, BackupKind::Dump) => {
                let all = body.get("all").and_then(|v| v.as_bool()).unwrap_or(false);
                let db = if all { None } else { dump_database(body) };
                if opts.db.is_some() && (all || db != opts.db) {
                    continue;
                }
                (1, db, all)
            }
            _ => continue,
        };
        groups.entry(key).or_default().push(Candidate {
            id: h.id.clone(),
            time,
            label: h.label.clone(),
            pinned: pins.contains(&h.id),
        });
    }
    let mut out = Vec::new();
    for ((kind, database, all), members) in groups {
        let (kind, policy) = if kind == 0 {
            (BackupKind::Physical, &opts.physical)
        } else {
            (BackupKind::Dump, &opts.dump)
        };
        let g = GroupDecisions {
            kind,
            database,
            all_databases: all,
            policy: policy.to_string(),
            decisions: retention::apply(policy, &members),
        };
        refuse_removing_everything(&g, policy, opts)?;
        out.push(g);
    }
    Ok(out)
}

fn wants(opts: &ExpireOptions, kind: BackupKind) -> bool {
    match (opts.kind, &opts.db) {
        (_, Some(_)) => kind == BackupKind::Dump,
        (Some(k), None) => k == kind,
        (None, None) => true,
    }
}

pub(crate) fn dump_database(body: &serde_json::Value) -> Option<String> {
    let dbs = body.get("databases")?.as_array()?;
    match dbs.as_slice() {
        [one] => one.get("name")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn refuse_removing_everything(
    g: &GroupDecisions,
    policy: &RetentionPolicy,
    opts: &ExpireOptions,
) -> Result<()> {
    if g.decisions.iter().any(|d| d.keep) || opts.allow_remove_all {
        return Ok(());
    }
    let what = g.name();
    if policy.is_empty() {
        return Err(Error::usage_hint(
            format!(
                "no retention rule for the {what} of cluster {}: expire would remove all {}",
                opts.cluster,
                g.decisions.len()
            ),
            "give rules such as --keep-daily 7 --keep-weekly 4, or a [retention] section in the \
             config file (see docs/config.md); --allow-remove-all removes everything",
        ));
    }
    Err(Error::usage_hint(
        format!(
            "the policy ({}) would remove every one of the {} {what} of cluster {}",
            g.policy,
            g.decisions.len(),
            opts.cluster
        ),
        "check the rules (a --keep-label that matches nothing, say), or add \
         --allow-remove-all if that is what you want",
    ))
}

/// The WAL objects to delete, and the report of it.
struct WalPlan {
    expiry: WalExpiry,
    keys: Vec<String>,
}

/// What WAL no kept backup needs: everything before the start segment of the oldest backup
/// in the continuous set (all kept backups, or the newest `keep_wal_for`), except the start
/// to stop range of each older kept backup. History files always stay (PostgreSQL reads them
/// to follow timelines, and they are tiny).
/// What WAL retention needs of a kept physical backup (from [`manifest::load_summaries`]).
#[derive(Debug, Deserialize)]
struct WalSpan {
    #[serde(skip)]
    id: String,
    #[serde(skip)]
    start_time: Option<chrono::DateTime<chrono::Utc>>,
    timeline: u32,
    start_lsn: String,
    stop_lsn: String,
    wal_segment_size: u32,
}

impl WalSpan {
    fn of(h: &ManifestHeader, body: &serde_json::Value) -> Result<Self> {
        let mut span: WalSpan = serde_json::from_value(body.clone()).map_err(|e| {
            Error::new(
                ErrorKind::Integrity,
                format!("manifest {}/{} lacks its WAL span: {e}", h.cluster, h.id),
            )
        })?;
        span.id = h.id.clone();
        span.start_time = h.start_time;
        Ok(span)
    }
}

async fn plan_wal(
    repo: &Repository,
    opts: &ExpireOptions,
    headers: &[(ManifestHeader, serde_json::Value)],
    removed: &[String],
) -> Result<WalPlan> {
    let removed: BTreeSet<&str> = removed.iter().map(String::as_str).collect();
    let mut kept: Vec<WalSpan> = Vec::new();
    for (h, body) in headers {
        if h.kind == KIND_PHYSICAL && !removed.contains(h.id.as_str()) {
            kept.push(WalSpan::of(h, body)?);
        }
    }
    if kept.is_empty() {
        return Ok(WalPlan {
            expiry: WalExpiry {
                note: Some("no physical backup stays; the archive is left as it is".into()),
                ..Default::default()
            },
            keys: vec![],
        });
    }
    kept.sort_by_key(|m| std::cmp::Reverse(m.start_time));
    let seg_size = kept[0].wal_segment_size;
    let range = |m: &WalSpan| -> Result<(u64, u64)> {
        let lsn = |s: &str| {
            s.parse::<pgkeep_pg::lsn::Lsn>().map_err(|e| {
                Error::new(
                    ErrorKind::Integrity,
                    format!("backup {} has a bad LSN {s:?}: {e}", m.id),
                )
            })
        };
        let start = WalSegmentName::from_lsn(lsn(&m.start_lsn)?, m.timeline, seg_size);
        let stop = WalSegmentName::from_end_lsn(lsn(&m.stop_lsn)?, m.timeline, seg_size);
        Ok((start.segno(seg_size), stop.segno(seg_size)))
    };
    let continuous = opts
        .keep_wal_for
        .map(|n| (n as usize).clamp(1, kept.len()))
        .unwrap_or(kept.len());
    let mut keep_from = u64::MAX;
    for m in &kept[..continuous] {
        keep_from = keep_from.min(range(m)?.0);
    }
    let own: Vec<(u64, u64)> = kept[continuous..]
        .iter()
        .map(range)
        .collect::<Result<_>>()?;
    let listing = list_archive(repo, &opts.cluster).await?;
    let mut plan = WalPlan {
        expiry: WalExpiry {
            keep_from: Some(
                WalSegmentName::from_segno(keep_from, kept[0].timeline, seg_size).to_string(),
            ),
            ..Default::default()
        },
        keys: vec![],
    };
    let mut first_last: Option<(WalSegmentName, WalSegmentName)> = None;
    let files = listing
        .segments
        .iter()
        .map(|s| (*s, WalFileName::Segment(*s)))
        .chain(
            listing
                .partials
                .iter()
                .map(|s| (*s, WalFileName::Partial(*s))),
        )
        .chain(listing.backup_files.iter().filter_map(|n| {
            let f = WalFileName::parse(n).ok()?;
            Some((f.segment()?, f))
        }));
    for (seg, file) in files {
        let segno = seg.segno(seg_size);
        if segno >= keep_from {
            continue;
        }
        if own.iter().any(|(a, z)| (*a..=*z).contains(&segno)) {
            plan.expiry.files_kept_for_older_backups += 1;
            continue;
        }
        plan.keys.push(wal_key(&opts.cluster, &file));
        if matches!(file, WalFileName::Segment(_)) {
            plan.keys.push(summary_key(&opts.cluster, &seg));
        }
        plan.expiry.files_removed += 1;
        first_last = Some(match first_last {
            None => (seg, seg),
            Some((a, z)) => (a.min(seg), z.max(seg)),
        });
    }
    plan.expiry.removed_range = first_last.map(|(a, z)| (a.to_string(), z.to_string()));
    Ok(plan)
}

/// What `pin` / `unpin` did.
#[derive(Debug, Clone, Serialize)]
pub struct PinReport {
    /// The cluster.
    pub cluster: String,
    /// The backup or dump.
    pub id: String,
    /// Whether it is pinned now.
    pub pinned: bool,
    /// Whether this call changed anything.
    pub changed: bool,
}

impl fmt::Display for PinReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.pinned { "pinned" } else { "not pinned" };
        let note = if self.changed { "" } else { " (already)" };
        writeln!(
            f,
            "{} of cluster {} is {state}{note}",
            self.id, self.cluster
        )
    }
}

impl Report for PinReport {}

/// Pins (`pinned = true`) or unpins a backup or dump; `latest` is the newest of any kind.
pub async fn set_pin(
    repo: &Repository,
    cluster: &str,
    id: &str,
    pinned: bool,
) -> Result<PinReport> {
    let ids = manifest::list_ids(repo, cluster).await?;
    let id = match id {
        "latest" => ids.last().cloned(),
        _ => ids.iter().find(|i| *i == id).cloned(),
    }
    .ok_or_else(|| {
        Error::with_hint(
            ErrorKind::Failure,
            format!("backup {id} of cluster {cluster} not found"),
            "`pgkeep list` shows the backups and dumps",
        )
    })?;
    // Shared: a pin never races an expire, which holds the exclusive lock while it decides.
    let lock = repo.lock(LockKind::Shared, Some(cluster), "pin").await?;
    let key = pin_key(cluster, &id);
    let was = pinned_ids(repo, cluster).await?.contains(&id);
    if pinned && !was {
        repo.put_sealed_if_absent(&key, key.as_bytes(), id.as_bytes())
            .await?;
    } else if !pinned && was {
        repo.storage().delete(&key).await?;
    }
    lock.release().await?;
    Ok(PinReport {
        cluster: cluster.to_string(),
        id,
        pinned,
        changed: pinned != was,
    })
}

/// What `repo prune` did.
#[derive(Debug, Clone, Serialize)]
pub struct RepoPruneReport {
    /// The garbage collection.
    #[serde(flatten)]
    pub prune: PruneReport,
}

impl fmt::Display for RepoPruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.prune)
    }
}

impl Report for RepoPruneReport {}

/// `repo prune`: garbage collection alone, under the exclusive lock.
pub async fn repo_prune(repo: &Repository, opts: &PruneOptions) -> Result<RepoPruneReport> {
    // Even a dry run: what is live can only be judged while no backup commits.
    let lock = repo.lock(LockKind::Exclusive, None, "repo prune").await?;
    let prune = repo.prune(opts).await?;
    lock.release().await?;
    Ok(RepoPruneReport { prune })
}
