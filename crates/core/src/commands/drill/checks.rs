//! The checks of a drill, run on the scratch server once it accepts connections: every
//! database connects, every table and index is read (pg_amcheck, or a full read of every
//! table where it is not installed), the configured SQL assertions hold, and a time target
//! was not overshot.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::config::DrillAssertion;
use crate::commands::backup::pg_error;
use crate::error::{Error, ErrorKind, Result};
use pgkeep_pg::client::{ConnParams, PgClient};

/// How a check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// It held.
    Ok,
    /// It did not: the drill fails (exit 1).
    Failed,
    /// It could not run here (e.g. amcheck not installed); said why.
    Skipped,
}

/// One check of a drill.
#[derive(Debug, Clone, Serialize)]
pub struct DrillCheck {
    /// Its name: `connect:<db>`, `amcheck`, `read:<db>`, `assert:<name>`, `target`, ...
    pub name: String,
    /// How it ended.
    pub status: CheckStatus,
    /// What was found, in words.
    pub detail: String,
}

impl DrillCheck {
    pub(crate) fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        DrillCheck {
            name: name.into(),
            status: CheckStatus::Ok,
            detail: detail.into(),
        }
    }

    pub(crate) fn failed(name: impl Into<String>, detail: impl Into<String>) -> Self {
        DrillCheck {
            name: name.into(),
            status: CheckStatus::Failed,
            detail: detail.into(),
        }
    }

    pub(crate) fn skipped(name: impl Into<String>, detail: impl Into<String>) -> Self {
        DrillCheck {
            name: name.into(),
            status: CheckStatus::Skipped,
            detail: detail.into(),
        }
    }
}

/// The text of a PostgreSQL error: the server's message when there is one.
pub(crate) fn pg_error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => d.message().to_string(),
        None => e.to_string(),
    }
}

/// Connects to `conninfo` (no libpq environment: the scratch server is reached by its
/// socket, as the role given).
pub(crate) async fn connect(conninfo: &str) -> Result<PgClient> {
    let params = ConnParams::resolve(Some(conninfo)).map_err(pg_error)?;
    PgClient::connect(&params).await.map_err(pg_error)
}

/// The first column of the first row of `sql` as text (`None`: no row or NULL).
pub(crate) async fn first_value(
    c: &PgClient,
    sql: &str,
) -> std::result::Result<Option<String>, String> {
    let msgs = c
        .inner()
        .simple_query(sql)
        .await
        .map_err(|e| pg_error_text(&e))?;
    for m in msgs {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).map(str::to_string));
        }
    }
    Ok(None)
}

/// Every column 0 of `sql`'s rows.
pub(crate) async fn column(c: &PgClient, sql: &str) -> std::result::Result<Vec<String>, String> {
    let msgs = c
        .inner()
        .simple_query(sql)
        .await
        .map_err(|e| pg_error_text(&e))?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect())
}

/// Databases that accept connections (template0 does not).
pub(crate) async fn databases(c: &PgClient) -> Result<Vec<String>> {
    column(
        c,
        "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
    )
    .await
    .map_err(|e| {
        Error::new(
            ErrorKind::Failure,
            format!("drill: listing the databases: {e}"),
        )
    })
}

/// Reads every page of every table, materialized view and TOAST table of the database
/// `c` is connected to: a damaged page fails its checksum (or its header check) on the way
/// into shared buffers. Indexes are not read this way (that needs amcheck).
pub(crate) async fn read_every_table(c: &PgClient, db: &str) -> DrillCheck {
    let name = format!("read:{db}");
    let rels = match column(
        c,
        "SELECT c.oid::regclass::text FROM pg_class c \
         WHERE c.relkind IN ('r', 'm', 't') AND c.relpersistence = 'p' ORDER BY c.oid",
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return DrillCheck::failed(name, format!("listing the tables: {e}")),
    };
    let mut pages = 0u64;
    for rel in &rels {
        // count(*) reads every heap page; no index is used with these settings.
        let sql = format!(
            "SET enable_indexscan = off; SET enable_bitmapscan = off; \
             SET enable_indexonlyscan = off; SELECT count(*) FROM ONLY {rel}"
        );
        if let Err(e) = first_value(c, &sql).await {
            return DrillCheck::failed(name, format!("reading {rel}: {e}"));
        }
        if let Ok(Some(n)) = first_value(
            c,
            &format!(
                "SELECT pg_relation_size('{}') / 8192",
                rel.replace('\'', "''")
            ),
        )
        .await
        {
            pages += n.parse::<u64>().unwrap_or(0);
        }
    }
    DrillCheck::ok(
        name,
        format!(
            "read {} tables ({pages} pages) without error; indexes not read (pg_amcheck is not installed)",
            rels.len()
        ),
    )
}

/// Runs `pg_amcheck --all --heapallindexed --install-missing` on the scratch server.
/// `Ok(None)` when pg_amcheck is not beside the server binaries or amcheck is not
/// installed for that server.
pub(crate) async fn amcheck(
    bin_dir: &Path,
    c: &PgClient,
    socket_dir: &Path,
    port: u16,
    user: &str,
    run_as: Option<super::server::RunAs>,
) -> Option<DrillCheck> {
    let exe = bin_dir.join("pg_amcheck");
    if !exe.exists() {
        return None;
    }
    match first_value(
        c,
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'amcheck'",
    )
    .await
    {
        Ok(Some(n)) if n != "0" => {}
        _ => return None,
    }
    let mut cmd = tokio::process::Command::new(&exe);
    cmd.args([
        "--all",
        "--heapallindexed",
        "--install-missing",
        "--no-password",
        "--host",
    ])
    .arg(socket_dir)
    .args(["--port", &port.to_string(), "--username", user])
    .env_remove("PGPASSWORD")
    .env_remove("PGSERVICE")
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    if let Some(r) = run_as {
        // The socket directory is only the server user's.
        cmd.uid(r.uid).gid(r.gid);
    }
    let out = match tokio::time::timeout(Duration::from_secs(24 * 3600), cmd.output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            return Some(DrillCheck::failed(
                "amcheck",
                format!("running {}: {e}", exe.display()),
            ))
        }
        Err(_) => return Some(DrillCheck::failed("amcheck", "pg_amcheck ran for a day")),
    };
    let report = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    Some(if out.status.success() {
        DrillCheck::ok(
            "amcheck",
            "pg_amcheck --all --heapallindexed: every table and index of every database is intact",
        )
    } else {
        let lines: Vec<&str> = report
            .lines()
            .chain(errors.lines())
            .filter(|l| !l.trim().is_empty())
            .take(10)
            .collect();
        DrillCheck::failed(
            "amcheck",
            format!(
                "pg_amcheck found damage ({}): {}",
                out.status,
                lines.join(" | ")
            ),
        )
    })
}

/// Runs one `[[drill.assert]]` on `c`: its query's first value must equal `expected` (as
/// text; `t`/`true` and `f`/`false` are the same).
pub(crate) async fn assertion(c: &PgClient, a: &DrillAssertion) -> DrillCheck {
    let name = format!("assert:{}", a.display_name());
    match first_value(c, &a.query).await {
        Err(e) => DrillCheck::failed(name, format!("the query failed: {e}")),
        Ok(got) => {
            let got = got.unwrap_or_else(|| "NULL".into());
            if same_value(&got, &a.expected) {
                DrillCheck::ok(name, format!("{} = {got}", a.query))
            } else {
                DrillCheck::failed(
                    name,
                    format!("{} returned {got}, expected {}", a.query, a.expected),
                )
            }
        }
    }
}

fn same_value(got: &str, expected: &str) -> bool {
    let norm = |s: &str| match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" => "true".to_string(),
        "f" | "false" => "false".to_string(),
        other => other.to_string(),
    };
    norm(got) == norm(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assertion_values_compare_as_text_with_booleans_either_way() {
        assert!(same_value("t", "true"));
        assert!(same_value("false", "f"));
        assert!(same_value("42", "42"));
        assert!(!same_value("41", "42"));
        assert!(!same_value("NULL", "0"));
    }
}
