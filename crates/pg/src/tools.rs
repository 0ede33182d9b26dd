//! Choosing the PostgreSQL client tools (pg_dump, pg_dumpall, pg_restore, psql) for a server.
//!
//! pg_dump refuses a server newer than itself, and pg_restore cannot read archives written by
//! a newer pg_dump; a newer tool serves older servers. A host often has several installations
//! (Debian's `/usr/lib/postgresql/<major>/bin`, the cache of `scripts/install-deps.sh`, a build
//! named by `PGKEEP_PG_BIN`, whatever is on PATH), so [`ClientTools::find`] looks at all of them,
//! asks each `--version`, and takes the server's own major when present, else the OLDEST that
//! is at least the major needed: the closest newer tool writes archives that the most
//! pg_restore versions read (a pg_restore older than the archive's pg_dump cannot), and newer
//! tools add session settings older servers reject (pg_restore 17 and later begin with
//! `SET transaction_timeout`, unknown before PostgreSQL 17). When none fits it says which it
//! found and how to get one.

use crate::error::{PgError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Names a directory of PostgreSQL binaries that is looked at first.
pub const PG_BIN_ENV: &str = "PGKEEP_PG_BIN";

/// Names the cache directory of `scripts/install-deps.sh` (`<dir>/<major>/bin`).
pub const PG_CACHE_ENV: &str = "PGKEEP_PG_CACHE";

/// The cache directory of `scripts/install-deps.sh` when [`PG_CACHE_ENV`] is not set.
pub const DEFAULT_PG_CACHE: &str = "/var/cache/pgkeep/pg";

/// Debian's layout: one `<major>/bin` per installed version.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// The client tools of one installation, chosen for a server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientTools {
    /// The directory the tools are run from.
    pub bin_dir: PathBuf,
    /// Major version of the tools, e.g. 18.
    pub major: u32,
    /// The first line of `<tool> --version`, e.g. `pg_dump (PostgreSQL) 18.6`.
    pub version: String,
}

/// What a command needs of the tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolNeed<'a> {
    /// Programs that must all be in the chosen directory; the first one's version counts.
    pub programs: &'a [&'a str],
    /// The oldest major that can do the job (the server's, or a newer archive's).
    pub min_major: u32,
    /// The major preferred when present (the server's own).
    pub preferred_major: u32,
    /// What the tools are for, for the error message (e.g. `the PostgreSQL 16 server`).
    pub purpose: &'a str,
}

impl ClientTools {
    /// The path of `program` in the chosen directory.
    pub fn path(&self, program: &str) -> PathBuf {
        self.bin_dir.join(program)
    }

    /// The path of `program` as text, for reports.
    pub fn display(&self, program: &str) -> String {
        self.path(program).display().to_string()
    }

    /// Chooses the tools for `need` among the installations of this host (see the module
    /// documentation). Runs `--version` of each candidate: call it off an async runtime's
    /// worker threads (e.g. in `spawn_blocking`).
    pub fn find(need: &ToolNeed<'_>) -> Result<ClientTools> {
        let candidates = candidate_dirs(
            std::env::var_os(PG_BIN_ENV),
            std::env::var_os(PG_CACHE_ENV),
            std::env::var_os("PATH"),
        );
        choose(need, &candidates)
    }
}

/// Directories that may hold client tools, most preferred first, without repeats: the
/// `PGKEEP_PG_BIN` directory, Debian's, the install-deps cache's (both ascending by major),
/// then PATH.
pub fn candidate_dirs(
    pg_bin: Option<std::ffi::OsString>,
    cache: Option<std::ffi::OsString>,
    path: Option<std::ffi::OsString>,
) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = pg_bin.filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    let cache = cache
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PG_CACHE));
    for root in [Path::new(DEBIAN_ROOT), cache.as_path()] {
        dirs.extend(major_bin_dirs(root));
    }
    if let Some(p) = path {
        dirs.extend(std::env::split_paths(&p).filter(|d| d.is_absolute()));
    }
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = d.canonicalize().unwrap_or_else(|_| d.clone());
        if seen.contains(&key) {
            false
        } else {
            seen.push(key);
            true
        }
    });
    dirs
}

/// `<root>/<major>/bin` for every numeric `<major>` under `root`, ascending by version.
fn major_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, e.path().join("bin")))
        })
        .filter(|(_, bin)| bin.is_dir())
        .collect();
    found.sort();
    found.into_iter().map(|(_, bin)| bin).collect()
}

/// One installation found: where, which major, what it said.
#[derive(Debug, Clone)]
struct Found {
    dir: PathBuf,
    major: u32,
    version: String,
}

fn choose(need: &ToolNeed<'_>, dirs: &[PathBuf]) -> Result<ClientTools> {
    let first = need.programs.first().copied().unwrap_or("pg_dump");
    let found: Vec<Found> = dirs
        .iter()
        .filter(|d| need.programs.iter().all(|p| is_executable(&d.join(p))))
        .filter_map(|d| {
            let version = version_line(&d.join(first))?;
            let major = major_of(&version)?;
            Some(Found {
                dir: d.clone(),
                major,
                version,
            })
        })
        .collect();
    let fits = |f: &&Found| f.major >= need.min_major;
    let pick = found
        .iter()
        .filter(fits)
        .find(|f| f.major == need.preferred_major)
        .or_else(|| {
            // The closest newer one; among equals the earlier (more preferred) directory.
            found
                .iter()
                .filter(fits)
                .fold(None, |best: Option<&Found>, f| match best {
                    Some(b) if b.major <= f.major => Some(b),
                    _ => Some(f),
                })
        });
    match pick {
        Some(f) => Ok(ClientTools {
            bin_dir: f.dir.clone(),
            major: f.major,
            version: f.version.clone(),
        }),
        None => Err(PgError::NoClientTools {
            program: first.to_string(),
            purpose: need.purpose.to_string(),
            min_major: need.min_major,
            found: if found.is_empty() {
                "none".to_string()
            } else {
                found
                    .iter()
                    .map(|f| format!("{} ({})", f.dir.join(first).display(), f.major))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first line of `program --version`, or `None` when it does not run or says nothing.
fn version_line(program: &Path) -> Option<String> {
    let out = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?.trim().to_string();
    (out.status.success() && !line.is_empty()).then_some(line)
}

/// The major version in a `--version` line: `pg_dump (PostgreSQL) 15.18 (Debian ...)` is 15,
/// `... 18devel` is 18, `... 9.6.24` is 9.
pub fn major_of(version_line: &str) -> Option<u32> {
    let rest = version_line.split_once("(PostgreSQL) ")?.1;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake installation: `bin/<program>` scripts that print a version line.
    fn install(root: &Path, name: &str, version: &str, programs: &[&str]) -> PathBuf {
        let bin = root.join(name).join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for p in programs {
            let f = bin.join(p);
            std::fs::write(
                &f,
                format!("#!/bin/sh\necho '{p} (PostgreSQL) {version}'\n"),
            )
            .unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }

    fn need(min: u32, preferred: u32) -> ToolNeed<'static> {
        ToolNeed {
            programs: &["pg_dump", "pg_dumpall"],
            min_major: min,
            preferred_major: preferred,
            purpose: "the test server",
        }
    }

    #[test]
    fn versions_are_read_from_the_version_line() {
        assert_eq!(
            major_of("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(major_of("pg_dump (PostgreSQL) 18devel"), Some(18));
        assert_eq!(major_of("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(major_of("something else"), None);
    }

    #[test]
    fn the_same_major_wins_else_the_closest_newer_one() {
        let t = tempfile::tempdir().unwrap();
        let both = ["pg_dump", "pg_dumpall"];
        let v14 = install(t.path(), "14", "14.9", &both);
        let v15 = install(t.path(), "15", "15.18", &both);
        let v18 = install(t.path(), "18", "18.6", &both);
        let v17 = install(t.path(), "17", "17.10", &both);
        // A server-only directory (no pg_dump) never counts.
        let server_only = install(t.path(), "16", "16.4", &["postgres"]);
        // Half an installation (no pg_dumpall) does not count either.
        let half = install(t.path(), "16b", "16.4", &["pg_dump"]);
        let dirs = vec![
            server_only,
            half,
            v14.clone(),
            v15.clone(),
            v18.clone(),
            v17.clone(),
        ];
        assert_eq!(choose(&need(15, 15), &dirs).unwrap().bin_dir, v15);
        assert_eq!(choose(&need(17, 17), &dirs).unwrap().bin_dir, v17);
        // 16: no pg_dump 16 with its pg_dumpall, so the next one up.
        let c = choose(&need(16, 16), &dirs).unwrap();
        assert_eq!((c.bin_dir, c.major), (v17.clone(), 17));
        assert_eq!(c.version, "pg_dump (PostgreSQL) 17.10");
        assert_eq!(choose(&need(13, 13), &dirs).unwrap().bin_dir, v14);
        assert_eq!(choose(&need(18, 16), &dirs).unwrap().bin_dir, v18);
        // An archive of pg_dump 17 restored into a 14 server: 14 is too old to read it.
        assert_eq!(choose(&need(17, 14), &dirs).unwrap().bin_dir, v17);
        // Earlier directories win among equal majors.
        let v18b = install(t.path(), "18b", "18.1", &both);
        let c = choose(&need(16, 16), &[v18b.clone(), v18.clone(), v14]).unwrap();
        assert_eq!(c.bin_dir, v18b);
    }

    #[test]
    fn none_new_enough_is_refused_with_what_was_found() {
        let t = tempfile::tempdir().unwrap();
        let v15 = install(t.path(), "15", "15.18", &["pg_dump", "pg_dumpall"]);
        let e = choose(&need(17, 17), std::slice::from_ref(&v15)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("PostgreSQL 17 or newer"), "{msg}");
        assert!(msg.contains(&format!("{} (15)", v15.join("pg_dump").display())));
        assert!(msg.contains("HINT") && msg.contains(PG_BIN_ENV), "{msg}");
        let e = choose(&need(13, 13), &[]).unwrap_err().to_string();
        assert!(e.contains("found: none"), "{e}");
    }

    #[test]
    fn candidates_come_in_order_without_repeats() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("cache");
        let c18 = install(&cache, "18", "18.6", &["pg_dump"]);
        let c13 = install(&cache, "13", "13.2", &["postgres"]);
        let own = install(t.path(), "own", "16.1", &["pg_dump"]);
        let path = std::env::join_paths([own.clone(), c18.clone(), PathBuf::from("rel")]).unwrap();
        let dirs = candidate_dirs(
            Some(own.clone().into()),
            Some(cache.clone().into()),
            Some(path),
        );
        let pos = |d: &Path| dirs.iter().position(|x| x == d).unwrap();
        assert_eq!(pos(&own), 0);
        assert!(pos(&c13) < pos(&c18));
        // Each directory once, relative PATH entries never.
        assert_eq!(dirs.iter().filter(|d| **d == own || **d == c18).count(), 2);
        assert!(!dirs.contains(&PathBuf::from("rel")));
    }
}
