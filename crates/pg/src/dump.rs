//! Runners for pg_dump, pg_dumpall and pg_restore as tokio child processes.
//!
//! Connection parameters reach the children through the libpq environment
//! ([`ConnParams::libpq_env`]), never through arguments, so a password does not show in the
//! process list. Each child's stderr is captured and becomes the error message on failure.
//!
//! [`DatabaseProperties`] holds what a database is besides its contents (owner, encoding and
//! locale, privileges, settings, comment), read from the catalogs so that a restore under any
//! name can apply it: `pg_restore` only restores those archive entries with `--create`, and
//! then only under the archive's own database name.

use crate::client::{ConnParams, PgClient};
use crate::error::{PgError, Result};
use crate::tools::ClientTools;
use serde::{Deserialize, Serialize};
use std::process::Stdio;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// A running client tool.
#[derive(Debug)]
pub struct ToolChild {
    program: String,
    child: Child,
    stderr: tokio::task::JoinHandle<String>,
}

fn base_command(tools: &ClientTools, program: &str, params: &ConnParams) -> Command {
    let mut cmd = Command::new(tools.path(program));
    // Settings from the caller's environment must not redirect the child elsewhere.
    for v in [
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGPASSWORD",
        "PGOPTIONS",
        "PGHOSTADDR",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(params.libpq_env());
    cmd.kill_on_drop(true);
    cmd
}

fn spawn(program: &str, mut cmd: Command, stdin: bool, stdout: bool) -> Result<ToolChild> {
    cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(if stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| PgError::Tool {
        program: program.to_string(),
        status: "not started".into(),
        stderr: format!("{e} (HINT: install the PostgreSQL client tools or put them on PATH)"),
    })?;
    let mut err = child.stderr.take().expect("piped stderr");
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s).await;
        s
    });
    Ok(ToolChild {
        program: program.to_string(),
        child,
        stderr,
    })
}

impl ToolChild {
    /// The child's stdout (for pg_dump / pg_dumpall); take it once.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's stdin (for pg_restore); take it once and drop it to signal end of input.
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Wait for the child; an unsuccessful exit becomes [`PgError::Tool`] with its stderr.
    /// Returns the stderr text (warnings) on success.
    pub async fn wait(mut self) -> Result<String> {
        drop(self.child.stdin.take());
        let status = self.child.wait().await.map_err(|e| PgError::Tool {
            program: self.program.clone(),
            status: "wait failed".into(),
            stderr: e.to_string(),
        })?;
        let stderr = self.stderr.await.unwrap_or_default();
        if !status.success() {
            return Err(PgError::Tool {
                program: self.program,
                status: status.to_string(),
                stderr: stderr.trim().to_string(),
            });
        }
        Ok(stderr)
    }

    /// Kill the child (e.g. when the consumer of its output failed).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Start `pg_dump -Fc -Z0` of database `db`, writing the archive to stdout. Compression is off
/// so that day-to-day dumps deduplicate; the repository compresses.
pub fn pg_dump(
    tools: &ClientTools,
    params: &ConnParams,
    db: &str,
    extra_args: &[&str],
) -> Result<ToolChild> {
    let mut cmd = base_command(tools, "pg_dump", params);
    cmd.env("PGDATABASE", db)
        .args(["--format=custom", "--compress=0", "--no-sync"])
        .args(extra_args);
    spawn("pg_dump", cmd, false, true)
}

/// Start `pg_dumpall --globals-only` (roles and tablespaces as SQL text) to stdout.
pub fn pg_dumpall_globals(tools: &ClientTools, params: &ConnParams) -> Result<ToolChild> {
    let mut cmd = base_command(tools, "pg_dumpall", params);
    cmd.args(["--globals-only", "--no-sync"]);
    spawn("pg_dumpall", cmd, false, true)
}

/// Start `pg_restore` reading a custom-format archive from stdin into database `db`
/// (`extra_args` e.g. `--clean`, `--create`, `--single-transaction`).
pub fn pg_restore(
    tools: &ClientTools,
    params: &ConnParams,
    db: &str,
    extra_args: &[&str],
) -> Result<ToolChild> {
    let mut cmd = base_command(tools, "pg_restore", params);
    // A role or database whose default_transaction_read_only is on (a common safety net)
    // would make every statement of the restore fail; options of the connection itself
    // take precedence over those settings.
    cmd.env("PGOPTIONS", "-c default_transaction_read_only=off");
    cmd.arg(format!("--dbname={db}"))
        .arg("--exit-on-error")
        .args(extra_args);
    spawn("pg_restore", cmd, true, false)
}

/// Start `pg_restore -f - ` turning a custom-format archive on stdin into SQL text on stdout
/// (no connection; for exporting a dump as plain SQL).
pub fn pg_restore_to_sql(tools: &ClientTools, extra_args: &[&str]) -> Result<ToolChild> {
    let mut cmd = Command::new(tools.path("pg_restore"));
    cmd.args(["--file=-"]).args(extra_args).kill_on_drop(true);
    spawn("pg_restore", cmd, true, true)
}

/// Start `psql` running the SQL script on its stdin in database `db`, stopping at the first
/// error (for a restore script; see [`pg_restore_to_sql`]).
pub fn psql_script(tools: &ClientTools, params: &ConnParams, db: &str) -> Result<ToolChild> {
    let mut cmd = base_command(tools, "psql", params);
    // As for pg_restore: a read-only default would make every statement fail.
    cmd.env("PGOPTIONS", "-c default_transaction_read_only=off")
        .env("PGDATABASE", db)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", "-"]);
    spawn("psql", cmd, true, false)
}

/// An SQL identifier in double quotes (always quoted: correct for every name, keywords and
/// mixed case included).
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// An SQL string literal. Backslashes make it an `E''` literal, so the text means the same
/// whatever `standard_conforming_strings` says.
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// One privilege on a database, as `aclexplode(datacl)` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseGrant {
    /// The role that granted it.
    pub grantor: String,
    /// The role it is granted to; `None` is PUBLIC.
    pub grantee: Option<String>,
    /// `CONNECT`, `CREATE` or `TEMPORARY`.
    pub privilege: String,
    /// WITH GRANT OPTION.
    pub grantable: bool,
}

/// Per-database settings of one role (`ALTER ROLE r IN DATABASE d SET ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleSettings {
    /// The role.
    pub role: String,
    /// `name=value` items exactly as `pg_db_role_setting.setconfig` holds them.
    pub settings: Vec<String>,
}

/// What a database is besides its contents: the properties `pg_dump` writes into the
/// archive's DATABASE, DATABASE PROPERTIES, COMMENT and ACL entries, which `pg_restore` only
/// applies with `--create` (and then only under the archive's own database name).
///
/// Read from the catalogs at dump time by [`DatabaseProperties::read`], applied to a database
/// of any name with the statements of [`DatabaseProperties::create_sql`],
/// [`DatabaseProperties::early_statements`] and [`DatabaseProperties::late_statements`].
/// Setting values may be secrets (`ALTER DATABASE d SET app.jwt_secret = ...` is a common
/// pattern): they only travel inside the statements, never in descriptions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseProperties {
    /// Database name at dump time.
    pub name: String,
    /// Owner role.
    pub owner: String,
    /// Server encoding, e.g. `UTF8`.
    pub encoding: String,
    /// `libc`, `icu` or `builtin` (servers before 15: always `libc`).
    pub locale_provider: String,
    /// LC_COLLATE.
    pub collate: String,
    /// LC_CTYPE.
    pub ctype: String,
    /// The provider's locale (`daticulocale` / `datlocale`) when the provider is not libc.
    pub provider_locale: Option<String>,
    /// ICU tailoring rules (PostgreSQL 16 and later).
    pub icu_rules: Option<String>,
    /// Default tablespace, when not `pg_default`.
    pub tablespace: Option<String>,
    /// CONNECTION LIMIT (-1: none).
    pub connection_limit: i32,
    /// Whether it is a template database.
    pub is_template: bool,
    /// COMMENT ON DATABASE.
    pub comment: Option<String>,
    /// The privileges when they are not the defaults (`datacl` not NULL), in catalog order.
    pub grants: Option<Vec<DatabaseGrant>>,
    /// `ALTER DATABASE ... SET` items (`name=value`).
    pub settings: Vec<String>,
    /// `ALTER ROLE ... IN DATABASE ... SET` items.
    pub role_settings: Vec<RoleSettings>,
}

/// One statement applying a property, with a description that holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyStatement {
    /// What it does, e.g. `set work_mem for database "x"` (never a setting's value).
    pub what: String,
    /// The SQL (may hold a setting's value).
    pub sql: String,
    /// A value to mask in the server's error message, should it quote it.
    pub secret: Option<String>,
}

impl PropertyStatement {
    fn new(what: String, sql: String) -> Self {
        PropertyStatement {
            what,
            sql,
            secret: None,
        }
    }
}

/// Settings whose value is a list of names that pg_dump quotes one by one (a value such as
/// `app, "my schema"` must become `'app', 'my schema'`, not one quoted string).
const LIST_SETTINGS: &[&str] = &[
    "local_preload_libraries",
    "search_path",
    "session_preload_libraries",
    "shared_preload_libraries",
    "temp_tablespaces",
    "unix_socket_directories",
];

/// Splits the flattened value of a list setting: comma-separated names, each either bare
/// or in double quotes (`""` inside quotes is one `"`). `None` when the text does not parse.
fn split_setting_list(value: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut item = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        item.push('"');
                    }
                    '"' => break,
                    c => item.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                item.push(c);
                chars.next();
            }
            if item.is_empty() && out.is_empty() && chars.peek().is_none() {
                // An empty value is an empty list.
                return Some(out);
            }
        }
        out.push(item);
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

/// `name TO value` for a `setconfig` item `name=value`, quoted the way the server reads it
/// back to the same value. `None` for an item without `=`.
fn set_clause(item: &str) -> Option<(String, String, String)> {
    let (name, value) = item.split_once('=')?;
    let list = LIST_SETTINGS.contains(&name.to_ascii_lowercase().as_str());
    let rendered = match list.then(|| split_setting_list(value)).flatten() {
        Some(items) if !items.is_empty() => items
            .iter()
            .map(|i| quote_literal(i))
            .collect::<Vec<_>>()
            .join(", "),
        _ => quote_literal(value),
    };
    Some((
        name.to_string(),
        format!("{} TO {rendered}", quote_ident(name)),
        value.to_string(),
    ))
}

fn query_error(what: &'static str, client: &PgClient, e: tokio_postgres::Error) -> PgError {
    PgError::Query {
        what,
        target: client.target().to_string(),
        reason: match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => e.to_string(),
        },
    }
}

impl DatabaseProperties {
    /// Reads the properties of database `db` through `client` (any database of the same
    /// server). `server_version_num` picks the catalog columns of that version.
    pub async fn read(client: &PgClient, db: &str, server_version_num: u32) -> Result<Self> {
        let provider = if server_version_num >= 150000 {
            "CASE d.datlocprovider WHEN 'c' THEN 'libc' WHEN 'i' THEN 'icu' WHEN 'b' THEN 'builtin' ELSE d.datlocprovider::text END"
        } else {
            "'libc'"
        };
        let locale = if server_version_num >= 170000 {
            "d.datlocale::text"
        } else if server_version_num >= 150000 {
            "d.daticulocale::text"
        } else {
            "NULL::text"
        };
        let rules = if server_version_num >= 160000 {
            "d.daticurules::text"
        } else {
            "NULL::text"
        };
        let sql = format!(
            "SELECT pg_get_userbyid(d.datdba)::text, pg_encoding_to_char(d.encoding)::text,
                    d.datcollate::text, d.datctype::text, {provider}, {locale}, {rules},
                    CASE WHEN t.spcname = 'pg_default' THEN NULL ELSE t.spcname::text END,
                    d.datconnlimit, d.datistemplate, shobj_description(d.oid, 'pg_database'),
                    d.datacl IS NOT NULL
             FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace
             WHERE d.datname = $1"
        );
        let c = client.inner();
        let row = c
            .query_opt(sql.as_str(), &[&db])
            .await
            .map_err(|e| query_error("reading the database's properties", client, e))?
            .ok_or_else(|| PgError::Query {
                what: "reading the database's properties",
                target: client.target().to_string(),
                reason: format!("no database {db:?} in pg_database"),
            })?;
        let provider: String = row.get(4);
        let mut p = DatabaseProperties {
            name: db.to_string(),
            owner: row.get(0),
            encoding: row.get(1),
            collate: row.get(2),
            ctype: row.get(3),
            provider_locale: if provider == "libc" { None } else { row.get(5) },
            locale_provider: provider,
            icu_rules: row.get(6),
            tablespace: row.get(7),
            connection_limit: row.get(8),
            is_template: row.get(9),
            comment: row.get(10),
            grants: None,
            settings: Vec::new(),
            role_settings: Vec::new(),
        };
        if row.get::<_, bool>(11) {
            let rows = c
                .query(
                    "SELECT pg_get_userbyid(a.grantor)::text,
                            CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee)::text END,
                            a.privilege_type, a.is_grantable
                     FROM pg_database d, aclexplode(d.datacl) WITH ORDINALITY a
                     WHERE d.datname = $1 ORDER BY a.ordinality",
                    &[&db],
                )
                .await
                .map_err(|e| query_error("reading the database's privileges", client, e))?;
            p.grants = Some(
                rows.iter()
                    .map(|r| DatabaseGrant {
                        grantor: r.get(0),
                        grantee: r.get(1),
                        privilege: r.get(2),
                        grantable: r.get(3),
                    })
                    .collect(),
            );
        }
        let rows = c
            .query(
                "SELECT r.rolname::text, s.setconfig
                 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
                 LEFT JOIN pg_roles r ON r.oid = s.setrole
                 WHERE d.datname = $1 ORDER BY r.rolname NULLS FIRST",
                &[&db],
            )
            .await
            .map_err(|e| query_error("reading the database's settings", client, e))?;
        for r in rows {
            let role: Option<String> = r.get(0);
            let settings: Vec<String> = r.get::<_, Option<Vec<String>>>(1).unwrap_or_default();
            match role {
                None => p.settings = settings,
                Some(role) => p.role_settings.push(RoleSettings { role, settings }),
            }
        }
        Ok(p)
    }

    /// `CREATE DATABASE` of `target` from template0 with this encoding, locale and (when
    /// `with_tablespace`) tablespace, for a server of `target_version_num`. The owner is set
    /// afterwards ([`DatabaseProperties::early_statements`]), as pg_dump does: a missing role
    /// must not stop the database from being created.
    pub fn create_sql(
        &self,
        target: &str,
        target_version_num: u32,
        with_tablespace: bool,
    ) -> Result<String> {
        let mut sql = format!(
            "CREATE DATABASE {} TEMPLATE template0 ENCODING {}",
            quote_ident(target),
            quote_literal(&self.encoding)
        );
        if target_version_num >= 150000 {
            sql.push_str(&format!(" LOCALE_PROVIDER {}", self.locale_provider));
        } else if self.locale_provider != "libc" {
            return Err(PgError::Unsupported {
                what: "locale provider",
                detail: format!(
                    "database {:?} uses the {} locale provider, which the target server (version {target_version_num}) does not have",
                    self.name, self.locale_provider
                ),
            });
        }
        sql.push_str(&format!(
            " LC_COLLATE {} LC_CTYPE {}",
            quote_literal(&self.collate),
            quote_literal(&self.ctype)
        ));
        match (self.locale_provider.as_str(), &self.provider_locale) {
            ("icu", Some(l)) => sql.push_str(&format!(" ICU_LOCALE {}", quote_literal(l))),
            ("builtin", Some(l)) => sql.push_str(&format!(" BUILTIN_LOCALE {}", quote_literal(l))),
            _ => {}
        }
        if let Some(r) = &self.icu_rules {
            sql.push_str(&format!(" ICU_RULES {}", quote_literal(r)));
        }
        if let (true, Some(t)) = (with_tablespace, &self.tablespace) {
            sql.push_str(&format!(" TABLESPACE {}", quote_ident(t)));
        }
        Ok(sql)
    }

    /// Owner (unless `no_owner`), comment and privileges (unless `no_acl`) of `target`: run
    /// before the contents are restored.
    ///
    /// Privileges are replayed whole, the way they read in the catalog: the defaults are
    /// revoked, then each grant is made again by its grantor (a grant made through a grant
    /// option runs under `SET ROLE` of the role that made it). With `no_owner` the restoring
    /// role owns the database, so the original owner's own privileges are left alone.
    pub fn early_statements(
        &self,
        target: &str,
        no_owner: bool,
        no_acl: bool,
    ) -> Vec<PropertyStatement> {
        let q = quote_ident(target);
        let mut out = Vec::new();
        if !no_owner {
            out.push(PropertyStatement::new(
                format!("give database {target:?} to its owner {:?}", self.owner),
                format!("ALTER DATABASE {q} OWNER TO {}", quote_ident(&self.owner)),
            ));
        }
        if let Some(c) = &self.comment {
            out.push(PropertyStatement::new(
                format!("set the comment of database {target:?}"),
                format!("COMMENT ON DATABASE {q} IS {}", quote_literal(c)),
            ));
        }
        if let (false, Some(grants)) = (no_acl, &self.grants) {
            out.push(PropertyStatement::new(
                format!("revoke the default privileges on database {target:?}"),
                if no_owner {
                    format!("REVOKE ALL ON DATABASE {q} FROM PUBLIC")
                } else {
                    format!(
                        "REVOKE ALL ON DATABASE {q} FROM PUBLIC; REVOKE ALL ON DATABASE {q} FROM {}",
                        quote_ident(&self.owner)
                    )
                },
            ));
            // One GRANT per (grantor, grantee, grant option), in catalog order; grants by
            // the owner first, since other grantors hold their grant option from those.
            let mut groups: Vec<(&str, Option<&str>, bool, Vec<&str>)> = Vec::new();
            for g in grants {
                if no_owner && g.grantee.as_deref() == Some(self.owner.as_str()) {
                    continue;
                }
                let key = (g.grantor.as_str(), g.grantee.as_deref(), g.grantable);
                match groups.iter_mut().find(|(a, b, c, _)| (*a, *b, *c) == key) {
                    Some(grp) => grp.3.push(&g.privilege),
                    None => groups.push((key.0, key.1, key.2, vec![&g.privilege])),
                }
            }
            groups.sort_by_key(|g| g.0 != self.owner);
            for (grantor, grantee, grantable, privs) in groups {
                let to = grantee.map_or("PUBLIC".to_string(), quote_ident);
                let mut sql = format!(
                    "GRANT {} ON DATABASE {q} TO {to}{}",
                    privs.join(", "),
                    if grantable { " WITH GRANT OPTION" } else { "" }
                );
                if grantor != self.owner {
                    sql = format!("SET ROLE {}; {sql}; RESET ROLE", quote_ident(grantor));
                }
                out.push(PropertyStatement::new(
                    format!(
                        "grant {} on database {target:?} to {}",
                        privs.join(", "),
                        grantee.unwrap_or("PUBLIC")
                    ),
                    sql,
                ));
            }
        }
        out
    }

    /// Connection limit, settings (the database's and its roles') and the template flag of
    /// `target`: run after the contents are restored, so that none of them (a read-only
    /// default, a connection limit of 1, a preload library) gets in the way of the restore.
    pub fn late_statements(&self, target: &str) -> Vec<PropertyStatement> {
        let q = quote_ident(target);
        let mut out = Vec::new();
        if self.connection_limit != -1 {
            out.push(PropertyStatement::new(
                format!("set the connection limit of database {target:?}"),
                format!(
                    "ALTER DATABASE {q} CONNECTION LIMIT {}",
                    self.connection_limit
                ),
            ));
        }
        let mut settings: Vec<(Option<&str>, &str)> =
            self.settings.iter().map(|s| (None, s.as_str())).collect();
        for rs in &self.role_settings {
            settings.extend(
                rs.settings
                    .iter()
                    .map(|s| (Some(rs.role.as_str()), s.as_str())),
            );
        }
        for (role, item) in settings {
            let Some((name, clause, value)) = set_clause(item) else {
                continue;
            };
            let (what, sql) = match role {
                None => (
                    format!("set {name} for database {target:?}"),
                    format!("ALTER DATABASE {q} SET {clause}"),
                ),
                Some(r) => (
                    format!("set {name} for role {r:?} in database {target:?}"),
                    format!("ALTER ROLE {} IN DATABASE {q} SET {clause}", quote_ident(r)),
                ),
            };
            out.push(PropertyStatement {
                what,
                sql,
                secret: (!value.is_empty()).then_some(value),
            });
        }
        if self.is_template {
            out.push(PropertyStatement::new(
                format!("mark database {target:?} as a template"),
                format!("ALTER DATABASE {q} IS_TEMPLATE true"),
            ));
        }
        out
    }

    /// Names of the settings (the database's, then `role: name` for its roles), for
    /// reports: never the values.
    pub fn setting_names(&self) -> Vec<String> {
        let name = |s: &String| s.split_once('=').map_or(s.clone(), |(n, _)| n.to_string());
        let mut out: Vec<String> = self.settings.iter().map(name).collect();
        for rs in &self.role_settings {
            out.extend(
                rs.settings
                    .iter()
                    .map(|s| format!("{}: {}", rs.role, name(s))),
            );
        }
        out
    }

    /// How the encoding and locale of `other` (an existing database) differ from these,
    /// one line per property; empty when they agree.
    pub fn locale_differences(&self, other: &DatabaseProperties) -> Vec<String> {
        let pairs = [
            ("encoding", &self.encoding, &other.encoding),
            (
                "locale provider",
                &self.locale_provider,
                &other.locale_provider,
            ),
            ("LC_COLLATE", &self.collate, &other.collate),
            ("LC_CTYPE", &self.ctype, &other.ctype),
        ];
        let mut out: Vec<String> = pairs
            .iter()
            .filter(|(_, a, b)| a != b)
            .map(|(what, a, b)| format!("{what} {b} (the dump's: {a})"))
            .collect();
        if self.provider_locale != other.provider_locale {
            out.push(format!(
                "provider locale {} (the dump's: {})",
                other.provider_locale.as_deref().unwrap_or("none"),
                self.provider_locale.as_deref().unwrap_or("none")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }

    #[test]
    fn list_settings_are_quoted_item_by_item() {
        assert_eq!(
            set_clause("search_path=app, \"my schema\", public")
                .unwrap()
                .1,
            "\"search_path\" TO 'app', 'my schema', 'public'"
        );
        assert_eq!(
            set_clause("search_path=\"a\"\"b\",c").unwrap().1,
            "\"search_path\" TO 'a\"b', 'c'"
        );
        assert_eq!(
            set_clause("search_path=\"\"").unwrap().1,
            "\"search_path\" TO ''"
        );
        // A value that is not a list of names stays one literal.
        assert_eq!(
            set_clause("search_path=\"open").unwrap().1,
            "\"search_path\" TO '\"open'"
        );
        assert_eq!(
            set_clause("work_mem=7MB").unwrap().1,
            "\"work_mem\" TO '7MB'"
        );
        assert_eq!(
            set_clause("app.note=x=y, z").unwrap(),
            (
                "app.note".to_string(),
                "\"app.note\" TO 'x=y, z'".to_string(),
                "x=y, z".to_string()
            )
        );
        assert!(set_clause("garbage").is_none());
    }

    fn props() -> DatabaseProperties {
        DatabaseProperties {
            name: "db1".into(),
            owner: "app_owner".into(),
            encoding: "LATIN1".into(),
            locale_provider: "libc".into(),
            collate: "C".into(),
            ctype: "C".into(),
            provider_locale: None,
            icu_rules: None,
            tablespace: Some("fast".into()),
            connection_limit: 7,
            is_template: true,
            comment: Some("it's db1".into()),
            grants: Some(vec![
                DatabaseGrant {
                    grantor: "app_owner".into(),
                    grantee: Some("app_owner".into()),
                    privilege: "CREATE".into(),
                    grantable: false,
                },
                DatabaseGrant {
                    grantor: "app_owner".into(),
                    grantee: Some("app_owner".into()),
                    privilege: "CONNECT".into(),
                    grantable: false,
                },
                DatabaseGrant {
                    grantor: "auditor".into(),
                    grantee: None,
                    privilege: "CONNECT".into(),
                    grantable: false,
                },
                DatabaseGrant {
                    grantor: "app_owner".into(),
                    grantee: Some("auditor".into()),
                    privilege: "CONNECT".into(),
                    grantable: true,
                },
            ]),
            settings: vec!["app.secret=hunter2".into()],
            role_settings: vec![RoleSettings {
                role: "auditor".into(),
                settings: vec!["statement_timeout=5s".into()],
            }],
        }
    }

    #[test]
    fn statements_name_the_target_and_hide_values() {
        let p = props();
        assert_eq!(
            p.create_sql("new", 150000, true).unwrap(),
            "CREATE DATABASE \"new\" TEMPLATE template0 ENCODING 'LATIN1' LOCALE_PROVIDER libc LC_COLLATE 'C' LC_CTYPE 'C' TABLESPACE \"fast\""
        );
        assert!(!p
            .create_sql("new", 150000, false)
            .unwrap()
            .contains("TABLESPACE"));
        let early: Vec<String> = p
            .early_statements("new", false, false)
            .into_iter()
            .map(|s| s.sql)
            .collect();
        assert_eq!(
            early,
            [
                "ALTER DATABASE \"new\" OWNER TO \"app_owner\"",
                "COMMENT ON DATABASE \"new\" IS 'it''s db1'",
                "REVOKE ALL ON DATABASE \"new\" FROM PUBLIC; REVOKE ALL ON DATABASE \"new\" FROM \"app_owner\"",
                "GRANT CREATE, CONNECT ON DATABASE \"new\" TO \"app_owner\"",
                "GRANT CONNECT ON DATABASE \"new\" TO \"auditor\" WITH GRANT OPTION",
                "SET ROLE \"auditor\"; GRANT CONNECT ON DATABASE \"new\" TO PUBLIC; RESET ROLE",
            ]
        );
        // --no-owner: no owner change, the original owner's own privileges left alone.
        let early = p.early_statements("new", true, false);
        assert!(early.iter().all(|s| !s.sql.contains("OWNER TO")
            && !s.sql.contains("FROM \"app_owner\"")
            && !s.sql.contains("TO \"app_owner\"")));
        // --no-acl: no privileges.
        assert!(p
            .early_statements("new", false, true)
            .iter()
            .all(|s| !s.sql.contains("GRANT")));
        let late = p.late_statements("new");
        let sql: Vec<&str> = late.iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(
            sql,
            [
                "ALTER DATABASE \"new\" CONNECTION LIMIT 7",
                "ALTER DATABASE \"new\" SET \"app.secret\" TO 'hunter2'",
                "ALTER ROLE \"auditor\" IN DATABASE \"new\" SET \"statement_timeout\" TO '5s'",
                "ALTER DATABASE \"new\" IS_TEMPLATE true",
            ]
        );
        assert!(late.iter().all(|s| !s.what.contains("hunter2")));
        assert_eq!(late[1].secret.as_deref(), Some("hunter2"));
        assert_eq!(
            p.setting_names(),
            ["app.secret", "auditor: statement_timeout"]
        );
    }

    #[test]
    fn icu_and_old_servers() {
        let mut p = props();
        p.locale_provider = "icu".into();
        p.provider_locale = Some("de-DE".into());
        p.tablespace = None;
        assert_eq!(
            p.create_sql("x", 150004, true).unwrap(),
            "CREATE DATABASE \"x\" TEMPLATE template0 ENCODING 'LATIN1' LOCALE_PROVIDER icu LC_COLLATE 'C' LC_CTYPE 'C' ICU_LOCALE 'de-DE'"
        );
        let e = p.create_sql("x", 140000, true).unwrap_err();
        assert!(e.to_string().contains("icu"), "{e}");
        let mut other = props();
        other.collate = "C.utf8".into();
        assert_eq!(
            props().locale_differences(&other),
            ["LC_COLLATE C.utf8 (the dump's: C)"]
        );
    }
}
