//! Walking a data directory for a base backup: what to copy, what to skip, and which files are
//! relation data (whose pages carry checksums).
//!
//! The rules follow PostgreSQL's documentation of base backups ("Backing Up the Data
//! Directory") and what pg_basebackup skips:
//! - the contents of `pg_wal`, `pg_replslot`, `pg_dynshmem`, `pg_notify`, `pg_serial`,
//!   `pg_snapshots`, `pg_stat_tmp` and `pg_subtrans` (the directories themselves are kept, empty;
//!   `pg_wal/archive_status` too, and from PostgreSQL 17 on `pg_wal/summaries`, the WAL
//!   summaries of incremental backups, kept empty as pg_basebackup sends it; a symlinked
//!   `pg_wal` becomes a plain directory);
//! - `postmaster.pid`, `postmaster.opts`, `backup_label`, `tablespace_map` and their `.old`
//!   copies, `postgresql.auto.conf.tmp`, `current_logfiles.tmp` (the backup's own backup_label
//!   and tablespace_map come from `pg_backup_stop`);
//! - `backup_manifest`: pg_basebackup leaves one in a data directory it wrote, and it
//!   describes that older backup, not this one (a restore started with it and checked by
//!   `pg_verifybackup` would be reported as damaged);
//! - `pg_internal.init*` files anywhere (rebuilt at start-up);
//! - anything whose name starts with `pgsql_tmp` (temporary files and directories);
//! - temporary relations `t<backend>_<relfilenode>[...]`;
//! - every fork of an unlogged relation except its init fork; a relation is unlogged when
//!   `<relfilenode>_init` exists in the same database directory (the init fork is copied, the
//!   main fork is recreated from it at the end of recovery).
//!
//! Tablespaces: each `pg_tblspc/<oid>` symlink is listed as a symlink, and the tablespace's
//! version directory (`PG_<major>_<catversion>`) is walked as if it were at
//! `pg_tblspc/<oid>/PG_...` inside the data directory. Files that vanish during the walk
//! (dropped tables, finished temp files) are skipped silently: the backup's WAL covers them.

use crate::error::{PgError, Result};
use std::collections::HashSet;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Directories whose contents a base backup skips (the directory itself is kept).
pub const EXCLUDED_DIR_CONTENTS: &[&str] = &[
    "pg_wal",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Subdirectories of `pg_wal` a base backup keeps, empty: `archive_status`, and `summaries`
/// (PostgreSQL 17 and later; its WAL summary files are WAL-derived and not copied).
pub const KEPT_WAL_SUBDIRS: &[&str] = &["archive_status", "summaries"];

/// Top-level files a base backup skips.
pub const EXCLUDED_TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_label.old",
    "tablespace_map.old",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    // Describes the pg_basebackup run that produced this directory, not the new backup.
    "backup_manifest",
];

/// What an entry is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// One entry to back up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataDirEntry {
    /// Path relative to the data directory, `/`-separated; tablespace contents appear under
    /// `pg_tblspc/<oid>/...` (through the symlink).
    pub rel_path: String,
    pub kind: EntryKind,
    /// File size in bytes (0 for directories; for symlinks, the link's own size).
    pub size: u64,
    /// Modification time (nanosecond precision where the file system has it).
    pub mtime: SystemTime,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Tablespace oid for entries in (or being) a tablespace under pg_tblspc.
    pub tablespace: Option<u32>,
    /// Whether this is a relation data file whose pages carry checksums.
    pub is_relation: bool,
    /// For symlinks: the target.
    pub link_target: Option<PathBuf>,
}

impl DataDirEntry {
    /// For relation files, the parsed file name (fork, segment number).
    pub fn relation_file(&self) -> Option<RelFileName> {
        if !self.is_relation {
            return None;
        }
        RelFileName::parse(self.rel_path.rsplit('/').next().unwrap_or(""))
    }
}

/// Why an entry was left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExcludeReason {
    /// Inside one of [`EXCLUDED_DIR_CONTENTS`].
    DirContents,
    /// One of [`EXCLUDED_TOP_FILES`].
    ServerFile,
    /// `pg_internal.init*`.
    RelcacheInit,
    /// `pgsql_tmp*`.
    TempFile,
    /// A temporary relation `t<backend>_<relfilenode>`.
    TempRelation,
    /// A non-init fork of an unlogged relation.
    UnloggedFork,
    /// A tablespace directory of another PostgreSQL version.
    OtherVersion,
}

/// An entry left out of the backup, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExcludedEntry {
    pub rel_path: String,
    pub reason: ExcludeReason,
}

/// The result of walking a data directory.
#[derive(Debug, Clone, Default)]
pub struct DataDirListing {
    /// Entries to back up, sorted by `rel_path` (a directory before its contents).
    pub entries: Vec<DataDirEntry>,
    /// Entries skipped, with the reason.
    pub excluded: Vec<ExcludedEntry>,
}

/// Fork of a relation file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fork {
    Main,
    Fsm,
    Vm,
    Init,
}

/// A parsed relation file name: `[t<backend>_]<relfilenode>[_<fork>][.<segno>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RelFileName {
    /// Backend id for temporary relations.
    pub temp_backend: Option<u32>,
    pub relfilenode: u32,
    pub fork: Fork,
    /// Segment number (the `.N` suffix; 0 for the first 1 GiB).
    pub segno: u32,
}

fn parse_oid(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0')
    {
        return None;
    }
    s.parse().ok()
}

impl RelFileName {
    /// Parse a file name in a database directory; `None` if it is not a relation file.
    pub fn parse(name: &str) -> Option<RelFileName> {
        let (body, segno) = match name.split_once('.') {
            Some((b, s)) => (b, parse_oid(s)?),
            None => (name, 0),
        };
        let (temp_backend, body) = match body.strip_prefix('t') {
            Some(rest) => {
                let (be, rel) = rest.split_once('_')?;
                (
                    Some(parse_oid(be).or_else(|| (be == "0").then_some(0))?),
                    rel,
                )
            }
            None => (None, body),
        };
        let (rel, fork) = match body.split_once('_') {
            Some((r, "fsm")) => (r, Fork::Fsm),
            Some((r, "vm")) => (r, Fork::Vm),
            Some((r, "init")) => (r, Fork::Init),
            Some(_) => return None,
            None => (body, Fork::Main),
        };
        Some(RelFileName {
            temp_backend,
            relfilenode: parse_oid(rel)?,
            fork,
            segno,
        })
    }
}

/// Read the major version from `<pgdata>/PG_VERSION` (e.g. 15).
pub fn read_pg_version(pgdata: &Path) -> Result<u32> {
    let p = pgdata.join("PG_VERSION");
    let text = std::fs::read_to_string(&p).map_err(|e| PgError::io("reading", &p, e))?;
    text.trim().parse().map_err(|_| PgError::BadFile {
        what: "PG_VERSION file",
        path: p.clone(),
        reason: format!("content {:?} is not a major version", text.trim()),
    })
}

/// Walk `pgdata` (a data directory, running or not) and its tablespaces. Fails if `pgdata` is
/// not a data directory (no PG_VERSION) or a directory cannot be read.
pub fn walk(pgdata: &Path) -> Result<DataDirListing> {
    let major = read_pg_version(pgdata)?;
    let mut w = Walker {
        version_prefix: format!("PG_{major}_"),
        out: DataDirListing::default(),
    };
    w.walk_dir(pgdata, "", Place::Top, None)?;
    w.out.entries.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    w.out.excluded.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    Ok(w.out)
}

/// Where in the data directory layout a directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The data directory itself.
    Top,
    /// `base/`
    Base,
    /// `pg_tblspc/`
    TblspcRoot,
    /// `pg_tblspc/<oid>/` (the tablespace location).
    TblspcLocation,
    /// `pg_tblspc/<oid>/PG_15_x/`
    TblspcVersion,
    /// A directory holding relation files: `base/<db>`, `global`, `pg_tblspc/<oid>/PG_.../<db>`.
    RelDir,
    /// Anything else.
    Other,
}

struct Walker {
    version_prefix: String,
    out: DataDirListing,
}

fn join_rel(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// Read a directory's entry names; a directory that vanished reads as empty.
fn list(dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(PgError::io("reading directory", dir, e)),
    };
    let mut names = Vec::new();
    for e in rd {
        match e {
            Ok(e) => match e.file_name().into_string() {
                Ok(n) => names.push(n),
                Err(n) => {
                    return Err(PgError::BadFile {
                        what: "data directory entry",
                        path: dir.join(n),
                        reason: "file name is not UTF-8".into(),
                    })
                }
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(PgError::io("reading directory", dir, e)),
        }
    }
    names.sort();
    Ok(names)
}

impl Walker {
    fn exclude(&mut self, rel_path: String, reason: ExcludeReason) {
        self.out.excluded.push(ExcludedEntry { rel_path, reason });
    }

    fn push(
        &mut self,
        path: &Path,
        rel_path: String,
        meta: &std::fs::Metadata,
        kind: EntryKind,
        tablespace: Option<u32>,
        is_relation: bool,
    ) -> Result<()> {
        let link_target = if kind == EntryKind::Symlink {
            Some(std::fs::read_link(path).map_err(|e| PgError::io("reading symlink", path, e))?)
        } else {
            None
        };
        self.out.entries.push(DataDirEntry {
            rel_path,
            kind,
            size: if kind == EntryKind::Dir {
                0
            } else {
                meta.len()
            },
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            mode: meta.permissions().mode() & 0o7777,
            tablespace,
            is_relation,
            link_target,
        });
        Ok(())
    }

    /// Walk the contents of `dir` (whose own entry, if any, was already pushed).
    fn walk_dir(
        &mut self,
        dir: &Path,
        rel: &str,
        place: Place,
        tablespace: Option<u32>,
    ) -> Result<()> {
        let names = list(dir)?;
        // Unlogged relations of this database directory: those with an init fork.
        let unlogged: HashSet<u32> = if place == Place::RelDir {
            names
                .iter()
                .filter_map(|n| RelFileName::parse(n))
                .filter(|r| r.fork == Fork::Init && r.temp_backend.is_none())
                .map(|r| r.relfilenode)
                .collect()
        } else {
            HashSet::new()
        };
        for name in names {
            let path = dir.join(&name);
            let rel_path = join_rel(rel, &name);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(PgError::io("reading metadata of", &path, e)),
            };
            let ft = meta.file_type();

            // Exclusions by name.
            if name.starts_with("pgsql_tmp") {
                self.exclude(rel_path, ExcludeReason::TempFile);
                continue;
            }
            if name.starts_with("pg_internal.init") && !ft.is_dir() {
                self.exclude(rel_path, ExcludeReason::RelcacheInit);
                continue;
            }
            if place == Place::Top && EXCLUDED_TOP_FILES.contains(&name.as_str()) && !ft.is_dir() {
                self.exclude(rel_path, ExcludeReason::ServerFile);
                continue;
            }
            let relfile = if place == Place::RelDir && ft.is_file() {
                RelFileName::parse(&name)
            } else {
                None
            };
            if let Some(r) = relfile {
                if r.temp_backend.is_some() {
                    self.exclude(rel_path, ExcludeReason::TempRelation);
                    continue;
                }
                if r.fork != Fork::Init && unlogged.contains(&r.relfilenode) {
                    self.exclude(rel_path, ExcludeReason::UnloggedFork);
                    continue;
                }
            }

            // Directories whose contents are skipped.
            if place == Place::Top && EXCLUDED_DIR_CONTENTS.contains(&name.as_str()) {
                let meta = if ft.is_symlink() {
                    // A relocated pg_wal (initdb -X) is restored as a plain directory.
                    match std::fs::metadata(&path) {
                        Ok(m) => m,
                        Err(e) => return Err(PgError::io("following symlink", &path, e)),
                    }
                } else {
                    meta
                };
                self.push(&path, rel_path.clone(), &meta, EntryKind::Dir, None, false)?;
                for sub in list(&path)? {
                    let sub_rel = join_rel(&rel_path, &sub);
                    let sub_path = path.join(&sub);
                    if name == "pg_wal" && KEPT_WAL_SUBDIRS.contains(&sub.as_str()) {
                        if let Ok(m) = std::fs::symlink_metadata(&sub_path) {
                            if m.is_dir() {
                                self.push(
                                    &sub_path,
                                    sub_rel.clone(),
                                    &m,
                                    EntryKind::Dir,
                                    None,
                                    false,
                                )?;
                                for f in list(&sub_path)? {
                                    self.exclude(
                                        join_rel(&sub_rel, &f),
                                        ExcludeReason::DirContents,
                                    );
                                }
                                continue;
                            }
                        }
                    }
                    self.exclude(sub_rel, ExcludeReason::DirContents);
                }
                continue;
            }

            if ft.is_symlink() {
                // pg_tblspc/<oid> -> tablespace location.
                if place == Place::TblspcRoot {
                    if let Some(oid) = parse_oid(&name) {
                        self.push(
                            &path,
                            rel_path.clone(),
                            &meta,
                            EntryKind::Symlink,
                            Some(oid),
                            false,
                        )?;
                        // Follow the link: the location's version directory is walked.
                        self.walk_dir(&path, &rel_path, Place::TblspcLocation, Some(oid))?;
                        continue;
                    }
                }
                self.push(
                    &path,
                    rel_path,
                    &meta,
                    EntryKind::Symlink,
                    tablespace,
                    false,
                )?;
                continue;
            }

            if ft.is_dir() {
                let child_place = match (place, name.as_str()) {
                    (Place::Top, "base") => Place::Base,
                    (Place::Top, "global") => Place::RelDir,
                    (Place::Top, "pg_tblspc") => Place::TblspcRoot,
                    (Place::Base, n) if parse_oid(n).is_some() => Place::RelDir,
                    // An in-place tablespace (allow_in_place_tablespaces): a plain directory.
                    (Place::TblspcRoot, n) if parse_oid(n).is_some() => Place::TblspcLocation,
                    (Place::TblspcLocation, n) if n.starts_with(&self.version_prefix) => {
                        Place::TblspcVersion
                    }
                    (Place::TblspcLocation, _) => {
                        self.exclude(rel_path, ExcludeReason::OtherVersion);
                        continue;
                    }
                    (Place::TblspcVersion, n) if parse_oid(n).is_some() => Place::RelDir,
                    _ => Place::Other,
                };
                let ts = if place == Place::TblspcRoot {
                    parse_oid(&name)
                } else {
                    tablespace
                };
                self.push(&path, rel_path.clone(), &meta, EntryKind::Dir, ts, false)?;
                self.walk_dir(&path, &rel_path, child_place, ts)?;
                continue;
            }

            if ft.is_file() {
                let is_relation = relfile.is_some();
                self.push(
                    &path,
                    rel_path,
                    &meta,
                    EntryKind::File,
                    tablespace,
                    is_relation,
                )?;
            }
            // Sockets, fifos and devices have no place in a data directory: skipped.
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_names() {
        let r = RelFileName::parse("16384").unwrap();
        assert_eq!(
            (r.relfilenode, r.fork, r.segno, r.temp_backend),
            (16384, Fork::Main, 0, None)
        );
        let r = RelFileName::parse("16384_fsm").unwrap();
        assert_eq!(r.fork, Fork::Fsm);
        let r = RelFileName::parse("16384_vm.2").unwrap();
        assert_eq!((r.fork, r.segno), (Fork::Vm, 2));
        let r = RelFileName::parse("16384.12").unwrap();
        assert_eq!(r.segno, 12);
        let r = RelFileName::parse("16384_init").unwrap();
        assert_eq!(r.fork, Fork::Init);
        let r = RelFileName::parse("t3_16390").unwrap();
        assert_eq!(r.temp_backend, Some(3));
        let r = RelFileName::parse("t3_16390_fsm.1").unwrap();
        assert_eq!((r.temp_backend, r.fork, r.segno), (Some(3), Fork::Fsm, 1));
        for bad in [
            "pg_filenode.map",
            "PG_VERSION",
            "pg_internal.init",
            "16384_foo",
            "016384",
            "16384.",
            "",
            "t_1",
            "1234a",
            "pg_control",
            "99999999999",
        ] {
            assert_eq!(RelFileName::parse(bad), None, "{bad:?}");
        }
    }

    fn touch(p: &Path, content: &[u8]) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    #[test]
    fn walk_applies_the_rules() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        let ts = t.path().join("ts");
        touch(&d.join("PG_VERSION"), b"15\n");
        touch(&d.join("postgresql.conf"), b"");
        touch(&d.join("postgresql.auto.conf"), b"");
        // Every top-level file PostgreSQL's documentation and pg_basebackup leave out. The
        // names are spelled out here rather than taken from EXCLUDED_TOP_FILES, so dropping
        // one from the list fails this test.
        let server_files = [
            "postmaster.pid",
            "postmaster.opts",
            "backup_label",
            "backup_label.old",
            "tablespace_map",
            "tablespace_map.old",
            "postgresql.auto.conf.tmp",
            "current_logfiles.tmp",
            "backup_manifest",
        ];
        for f in server_files {
            touch(&d.join(f), b"x");
        }
        touch(&d.join("current_logfiles"), b"stderr log/x.log\n");
        touch(&d.join("global/pg_control"), b"x");
        touch(&d.join("global/1262"), b"x");
        touch(&d.join("global/pg_internal.init"), b"x");
        touch(&d.join("base/5/1259"), b"12345678");
        touch(&d.join("base/5/1259_fsm"), b"x");
        touch(&d.join("base/5/1259_vm"), b"x");
        touch(&d.join("base/5/1259.1"), b"x");
        touch(&d.join("base/5/PG_VERSION"), b"15");
        touch(&d.join("base/5/pg_filenode.map"), b"x");
        // The relcache init file and its temporary variant (pg_internal.init.<pid>).
        touch(&d.join("base/5/pg_internal.init"), b"x");
        touch(&d.join("base/5/pg_internal.init.4242"), b"x");
        // An unlogged relation: every fork and segment but the init fork is left out.
        for f in ["16400", "16400.1", "16400_fsm", "16400_vm"] {
            touch(&d.join("base/5/").join(f), b"x");
        }
        touch(&d.join("base/5/16400_init"), b"x");
        // Temporary relations of backend 3 (all forks and segments).
        for f in ["t3_16500", "t3_16500.1", "t3_16500_fsm", "t3_16500_vm"] {
            touch(&d.join("base/5/").join(f), b"x");
        }
        // Temporary files: the pgsql_tmp directory, and any name starting with pgsql_tmp.
        touch(&d.join("base/pgsql_tmp/pgsql_tmp123.0"), b"x");
        touch(&d.join("base/5/pgsql_tmp99.1"), b"x");
        touch(&d.join("pg_wal/000000010000000000000001"), b"x");
        touch(&d.join("pg_wal/00000002.history"), b"x");
        std::fs::create_dir_all(d.join("pg_wal/archive_status")).unwrap();
        touch(
            &d.join("pg_wal/archive_status/000000010000000000000001.done"),
            b"",
        );
        // Directories whose contents are left out; the directories themselves are kept.
        let dir_contents = [
            ("pg_dynshmem", "mmap.1234"),
            ("pg_notify", "0000"),
            ("pg_serial", "0000"),
            ("pg_snapshots", "00000003-00000002-1"),
            ("pg_stat_tmp", "global.stat"),
            ("pg_subtrans", "0000"),
            ("pg_replslot", "slot1"),
        ];
        for (dir, file) in dir_contents {
            if dir == "pg_replslot" {
                touch(&d.join(dir).join(file).join("state"), b"x");
            } else {
                touch(&d.join(dir).join(file), b"x");
            }
        }
        touch(&d.join("pg_xact/0000"), b"x");
        touch(&d.join("pg_stat/pgstat.stat"), b"x");
        touch(&d.join("pg_logical/replorigin_checkpoint"), b"x");
        touch(&ts.join("PG_15_202209061/5/16600"), b"x");
        touch(&ts.join("PG_15_202209061/5/16600.1"), b"x");
        touch(&ts.join("PG_15_202209061/5/16700"), b"x");
        touch(&ts.join("PG_15_202209061/5/16700_init"), b"x");
        touch(&ts.join("PG_15_202209061/5/t4_16800"), b"x");
        touch(&ts.join("PG_15_202209061/pgsql_tmp/pgsql_tmp7.0"), b"x");
        touch(&ts.join("PG_14_202107181/5/16600"), b"x");
        std::fs::create_dir_all(d.join("pg_tblspc")).unwrap();
        std::os::unix::fs::symlink(&ts, d.join("pg_tblspc/16599")).unwrap();

        let l = walk(&d).unwrap();
        let get = |p: &str| l.entries.iter().find(|e| e.rel_path == p);
        let excluded = |p: &str| {
            l.excluded
                .iter()
                .find(|e| e.rel_path == p)
                .map(|e| e.reason)
        };
        let tsv = "pg_tblspc/16599/PG_15_202209061";
        for inc in [
            "PG_VERSION",
            "postgresql.conf",
            "postgresql.auto.conf",
            "current_logfiles",
            "global/pg_control",
            "global/1262",
            "base/5/1259",
            "base/5/1259_fsm",
            "base/5/1259_vm",
            "base/5/1259.1",
            "base/5/16400_init",
            "pg_wal",
            "pg_wal/archive_status",
            "pg_xact/0000",
            "pg_stat/pgstat.stat",
            "pg_logical/replorigin_checkpoint",
            "base/5/pg_filenode.map",
            &format!("{tsv}/5/16600"),
            &format!("{tsv}/5/16600.1"),
            &format!("{tsv}/5/16700_init"),
        ] {
            assert!(get(inc).is_some(), "{inc} missing");
        }
        for f in server_files {
            assert_eq!(excluded(f), Some(ExcludeReason::ServerFile), "{f}");
            assert!(get(f).is_none(), "{f}");
        }
        for (dir, file) in dir_contents {
            let kept = get(dir).unwrap_or_else(|| panic!("{dir} itself is kept"));
            assert_eq!(kept.kind, EntryKind::Dir, "{dir}");
            let inside = format!("{dir}/{file}");
            assert_eq!(
                excluded(&inside),
                Some(ExcludeReason::DirContents),
                "{inside}"
            );
            assert!(
                !l.entries.iter().any(|e| e.rel_path.starts_with(&inside)),
                "nothing under {inside}"
            );
        }
        for wal in ["pg_wal/000000010000000000000001", "pg_wal/00000002.history"] {
            assert_eq!(excluded(wal), Some(ExcludeReason::DirContents), "{wal}");
        }
        assert!(get("pg_wal/archive_status/000000010000000000000001.done").is_none());
        assert_eq!(
            excluded("pg_wal/archive_status/000000010000000000000001.done"),
            Some(ExcludeReason::DirContents)
        );
        for init in [
            "global/pg_internal.init",
            "base/5/pg_internal.init",
            "base/5/pg_internal.init.4242",
        ] {
            assert_eq!(excluded(init), Some(ExcludeReason::RelcacheInit), "{init}");
        }
        for fork in [
            "base/5/16400",
            "base/5/16400.1",
            "base/5/16400_fsm",
            "base/5/16400_vm",
            &format!("{tsv}/5/16700"),
        ] {
            assert_eq!(excluded(fork), Some(ExcludeReason::UnloggedFork), "{fork}");
        }
        for temp in [
            "base/5/t3_16500",
            "base/5/t3_16500.1",
            "base/5/t3_16500_fsm",
            "base/5/t3_16500_vm",
            &format!("{tsv}/5/t4_16800"),
        ] {
            assert_eq!(excluded(temp), Some(ExcludeReason::TempRelation), "{temp}");
        }
        for tmp in [
            "base/pgsql_tmp",
            "base/5/pgsql_tmp99.1",
            &format!("{tsv}/pgsql_tmp"),
        ] {
            assert_eq!(excluded(tmp), Some(ExcludeReason::TempFile), "{tmp}");
        }
        assert!(!l
            .entries
            .iter()
            .any(|e| e.rel_path.contains("pgsql_tmp") || e.rel_path.contains("/t3_")));
        assert_eq!(
            excluded("pg_tblspc/16599/PG_14_202107181"),
            Some(ExcludeReason::OtherVersion)
        );

        let rel = get("base/5/1259").unwrap();
        assert!(rel.is_relation && rel.kind == EntryKind::File && rel.size == 8);
        assert!(get("global/1262").unwrap().is_relation);
        assert!(get("base/5/16400_init").unwrap().is_relation);
        for not_rel in [
            "global/pg_control",
            "base/5/PG_VERSION",
            "base/5/pg_filenode.map",
            "pg_xact/0000",
            "PG_VERSION",
        ] {
            assert!(!get(not_rel).unwrap().is_relation, "{not_rel}");
        }
        let link = get("pg_tblspc/16599").unwrap();
        assert_eq!(link.kind, EntryKind::Symlink);
        assert_eq!(link.link_target.as_deref(), Some(ts.as_path()));
        assert_eq!(link.tablespace, Some(16599));
        let tsfile = get(&format!("{tsv}/5/16600.1")).unwrap();
        assert!(tsfile.is_relation);
        assert_eq!(tsfile.tablespace, Some(16599));
        assert_eq!(tsfile.relation_file().unwrap().segno, 1);
        // Sorted, directories before their contents.
        let paths: Vec<&str> = l.entries.iter().map(|e| e.rel_path.as_str()).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
    }

    #[test]
    fn a_symlinked_pg_wal_becomes_an_empty_directory() {
        // initdb -X puts pg_wal elsewhere behind a symlink; a restore gets a plain directory
        // (with archive_status) and none of the WAL files.
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        let wal = t.path().join("wal");
        touch(&d.join("PG_VERSION"), b"15\n");
        touch(&wal.join("000000010000000000000001"), b"x");
        std::fs::create_dir_all(wal.join("archive_status")).unwrap();
        std::os::unix::fs::symlink(&wal, d.join("pg_wal")).unwrap();
        let l = walk(&d).unwrap();
        let get = |p: &str| l.entries.iter().find(|e| e.rel_path == p);
        assert_eq!(get("pg_wal").unwrap().kind, EntryKind::Dir);
        assert_eq!(get("pg_wal/archive_status").unwrap().kind, EntryKind::Dir);
        assert!(get("pg_wal/000000010000000000000001").is_none());
        assert!(l
            .excluded
            .iter()
            .any(|e| e.rel_path == "pg_wal/000000010000000000000001"));
    }

    #[test]
    fn wal_summaries_of_17_and_18_are_kept_as_an_empty_directory() {
        // PostgreSQL 17's WAL summarizer writes pg_wal/summaries/*.summary for incremental
        // backups; pg_basebackup sends the directory, empty, like archive_status.
        for major in ["17", "18"] {
            let t = tempfile::tempdir().unwrap();
            let d = t.path().join("data");
            touch(&d.join("PG_VERSION"), format!("{major}\n").as_bytes());
            let summary = "pg_wal/summaries/0000000100000000010000280000000001000130.summary";
            touch(&d.join(summary), b"x");
            touch(&d.join("pg_wal/summaries/temp.summary"), b"x");
            touch(
                &d.join("pg_wal/archive_status/000000010000000000000001.ready"),
                b"",
            );
            touch(&d.join("pg_wal/000000010000000000000001"), b"x");
            let l = walk(&d).unwrap();
            let get = |p: &str| l.entries.iter().find(|e| e.rel_path == p);
            let excluded = |p: &str| l.excluded.iter().any(|e| e.rel_path == p);
            for dir in ["pg_wal", "pg_wal/summaries", "pg_wal/archive_status"] {
                assert_eq!(
                    get(dir).map(|e| e.kind),
                    Some(EntryKind::Dir),
                    "{major} {dir}"
                );
            }
            assert!(
                !l.entries
                    .iter()
                    .any(|e| e.rel_path.starts_with("pg_wal/summaries/")),
                "{major}: a summary file was listed"
            );
            assert!(excluded(summary) && excluded("pg_wal/summaries/temp.summary"));
            assert!(excluded(
                "pg_wal/archive_status/000000010000000000000001.ready"
            ));
            assert!(excluded("pg_wal/000000010000000000000001"));
        }
    }

    #[test]
    fn walk_requires_a_data_directory() {
        let t = tempfile::tempdir().unwrap();
        assert!(walk(t.path()).is_err());
    }
}
