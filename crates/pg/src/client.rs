//! Connections to a running server and the backup API on a held connection.
//!
//! Connection parameters come from a conninfo string (`key=value ...` or a `postgresql://` URI)
//! laid over the libpq environment (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`,
//! `PGAPPNAME`, `PGCONNECT_TIMEOUT`), then libpq's defaults; a missing password is looked up in
//! `PGPASSFILE` or `~/.pgpass`. TLS follows libpq's `sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey` and `PGSSL*` variables (see [`crate::tls`]).

use crate::error::{PgError, Result};
use crate::lsn::Lsn;
use crate::tls::SslParams;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// libpq's default unix socket directory on Debian and derivatives.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";
/// libpq's default port.
pub const DEFAULT_PORT: u16 = 5432;

/// Whether a conninfo string (key/value or URI form) carries a password. Callers refuse such
/// strings on the command line (they show in the process list); use PGPASSWORD or ~/.pgpass.
pub fn conninfo_has_password(conninfo: &str) -> bool {
    let s = conninfo.trim();
    if is_uri(s) {
        let rest = s.split_once("://").map(|x| x.1).unwrap_or("");
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if userinfo.contains(':') {
                return true;
            }
        }
        if let Some((_, query)) = rest.split_once('?') {
            return query
                .split('&')
                .any(|kv| kv.split('=').next().map(|k| k.trim()) == Some("password"));
        }
        return false;
    }
    match parse_keyvalue(s) {
        Ok(pairs) => pairs.iter().any(|(k, _)| k == "password"),
        // Unparseable: be safe and look for the key anywhere.
        Err(_) => s.contains("password"),
    }
}

pub(crate) fn is_uri(s: &str) -> bool {
    let s = s.trim();
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Whether a URI names a port (`host:port` in the authority or `port=` in the query).
fn uri_has_port(s: &str) -> bool {
    let rest = s.trim().split_once("://").map(|x| x.1).unwrap_or("");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let hosts = rest[..end]
        .rsplit_once('@')
        .map(|x| x.1)
        .unwrap_or(&rest[..end]);
    // An IPv6 literal is bracketed; a port follows the closing bracket.
    let has_host_port = hosts.split(',').any(|h| match h.rfind(']') {
        Some(i) => h[i..].contains(':'),
        None => h.contains(':'),
    });
    has_host_port
        || rest
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("port=")))
}

/// Split a `key=value key='quoted value'` conninfo into pairs (libpq's rules: spaces around `=`
/// allowed, single quotes, backslash escapes).
pub(crate) fn parse_keyvalue(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return Err(PgError::Conninfo(format!("missing \"=\" after {key:?}")));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut value = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    Some('\\') => value.extend(it.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(PgError::Conninfo(format!(
                            "unterminated quoted value for {key:?}"
                        )))
                    }
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

/// Resolved connection parameters. `Debug` and [`ConnParams::describe`] never show the password.
#[derive(Clone)]
pub struct ConnParams {
    /// Host name, IP address, or unix socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub application_name: Option<String>,
    pub connect_timeout: Option<Duration>,
    /// TLS settings (`sslmode` and the certificate files).
    pub ssl: SslParams,
    password: Option<String>,
}

impl std::fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn os_user_name() -> String {
    // SAFETY: getpwuid with our own uid; the result is copied out immediately.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() && !(*pw).pw_name.is_null() {
            return std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned();
        }
    }
    std::env::var("USER").unwrap_or_else(|_| "postgres".into())
}

/// The home directory as libpq finds it: `HOME`, else the password database.
fn home_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(h) = env("HOME") {
        return Some(PathBuf::from(h));
    }
    // SAFETY: getpwuid with our own uid; the result is copied out immediately.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if !pw.is_null() && !(*pw).pw_dir.is_null() {
            let dir = std::ffi::CStr::from_ptr((*pw).pw_dir).to_string_lossy();
            return Some(PathBuf::from(dir.into_owned()));
        }
    }
    None
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl ConnParams {
    /// Resolve parameters from an optional conninfo string, the libpq environment and defaults.
    pub fn resolve(conninfo: Option<&str>) -> Result<ConnParams> {
        Self::resolve_with(conninfo, &|k| env_nonempty(k))
    }

    /// Like [`ConnParams::resolve`] with a custom environment lookup (for tests).
    pub fn resolve_with(
        conninfo: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnParams> {
        // The TLS settings are ours: tokio-postgres knows neither verify-ca/verify-full nor
        // certificate files.
        let (ssl_pairs, rest) = match conninfo.map(str::trim).filter(|s| !s.is_empty()) {
            Some(ci) => crate::tls::split_conninfo(ci)?,
            None => (Vec::new(), String::new()),
        };
        let cfg = match rest.trim() {
            "" => tokio_postgres::Config::new(),
            rest => tokio_postgres::Config::from_str(rest)
                // tokio-postgres's message does not echo the string, so no secret leaks here.
                .map_err(|e| PgError::Conninfo(e.to_string()))?,
        };
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => env("PGHOST").unwrap_or_else(|| DEFAULT_SOCKET_DIR.to_string()),
        };
        // tokio-postgres fills in 5432 for a URI host without a port; libpq would use PGPORT.
        let explicit_port = conninfo.is_some_and(|ci| !is_uri(ci) || uri_has_port(ci));
        let port = match cfg.get_ports().first().filter(|_| explicit_port) {
            Some(p) => *p,
            None => match env("PGPORT") {
                Some(p) => p
                    .parse()
                    .map_err(|_| PgError::Conninfo(format!("PGPORT {p:?} is not a port number")))?,
                None => DEFAULT_PORT,
            },
        };
        let user = cfg
            .get_user()
            .map(str::to_string)
            .or_else(|| env("PGUSER"))
            .unwrap_or_else(os_user_name);
        let dbname = cfg
            .get_dbname()
            .map(str::to_string)
            .or_else(|| env("PGDATABASE"))
            .unwrap_or_else(|| user.clone());
        let application_name = cfg
            .get_application_name()
            .map(str::to_string)
            .or_else(|| env("PGAPPNAME"));
        let connect_timeout = cfg.get_connect_timeout().copied().or_else(|| {
            env("PGCONNECT_TIMEOUT")
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|s| *s > 0)
                .map(Duration::from_secs)
        });
        let mut p = ConnParams {
            host,
            port,
            user,
            dbname,
            application_name,
            connect_timeout,
            ssl: SslParams::resolve(&ssl_pairs, env, home_dir(env))?,
            password: cfg
                .get_password()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .or_else(|| env("PGPASSWORD")),
        };
        if p.password.is_none() {
            let file = env("PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")));
            if let Some(file) = file {
                p.password = pgpass_lookup(&file, &p);
            }
        }
        Ok(p)
    }

    /// The same server and user, another database.
    pub fn with_dbname(&self, dbname: &str) -> ConnParams {
        ConnParams {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }

    /// Whether a password is known (from the conninfo, PGPASSWORD or the password file).
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// `host=... port=... user=... dbname=...` for messages; never includes the password.
    pub fn describe(&self) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            self.host, self.port, self.user, self.dbname
        )
    }

    /// Whether the host is a unix socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// A tokio-postgres configuration for these parameters.
    pub fn to_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        if self.is_unix_socket() {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port).user(&self.user).dbname(&self.dbname);
        c.application_name(self.application_name.as_deref().unwrap_or("pgkeep"));
        if let Some(pw) = &self.password {
            c.password(pw);
        }
        if let Some(t) = self.connect_timeout {
            c.connect_timeout(t);
        }
        c
    }

    /// libpq environment variables for a child process (pg_dump, pg_restore, ...). The password,
    /// when known, goes in PGPASSWORD: the environment of a child is not visible to other users,
    /// unlike its arguments.
    pub fn libpq_env(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("PGHOST".to_string(), self.host.clone()),
            ("PGPORT".to_string(), self.port.to_string()),
            ("PGUSER".to_string(), self.user.clone()),
            ("PGDATABASE".to_string(), self.dbname.clone()),
        ];
        if let Some(pw) = &self.password {
            v.push(("PGPASSWORD".to_string(), pw.clone()));
        }
        if let Some(app) = &self.application_name {
            v.push(("PGAPPNAME".to_string(), app.clone()));
        }
        v.extend(self.ssl.libpq_env());
        v
    }
}

/// Split one `.pgpass` line into its five fields (`\` escapes `:` and `\`).
fn pgpass_fields(line: &str) -> Option<Vec<String>> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.extend(chars.next()),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    (fields.len() == 5).then_some(fields)
}

/// Look the password up in a libpq password file. Like libpq, a file readable by group or
/// others is ignored (with a warning), and the default socket directory matches `localhost`.
fn pgpass_lookup(file: &Path, p: &ConnParams) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; ignored (chmod 0600 it)",
            file.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    let host = if p.host == DEFAULT_SOCKET_DIR || p.host.is_empty() {
        "localhost".to_string()
    } else {
        p.host.clone()
    };
    let port = p.port.to_string();
    let want = [
        host.as_str(),
        port.as_str(),
        p.dbname.as_str(),
        p.user.as_str(),
    ];
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some(f) = pgpass_fields(line) else {
            continue;
        };
        if f[..4]
            .iter()
            .zip(want)
            .all(|(pat, val)| pat == "*" || pat == val)
        {
            return Some(f[4].clone());
        }
    }
    None
}

/// Facts about a server that a backup records and checks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerInfo {
    /// `server_version_num`, e.g. 150018.
    pub version_num: u32,
    /// `server_version`, e.g. "15.18 (Debian 15.18-0+deb12u1)".
    pub version: String,
    pub system_identifier: u64,
    pub data_directory: PathBuf,
    pub in_recovery: bool,
    pub data_checksums: bool,
    pub wal_segment_size: u32,
    pub block_size: u32,
}

impl ServerInfo {
    /// Major version (15 for 150018).
    pub fn major_version(&self) -> u32 {
        self.version_num / 10000
    }

    /// Refuses a server of a release pgkeep does not handle (before anything is read from
    /// it); `target` names the server.
    pub fn ensure_supported(&self, target: &str) -> Result<()> {
        if crate::control::is_supported_major(self.major_version()) {
            return Ok(());
        }
        Err(PgError::UnsupportedVersion {
            subject: format!("the server at {target}"),
            found: format!("PostgreSQL {} ({})", self.major_version(), self.version),
        })
    }
}

/// A connection to a server. The connection task runs on the tokio runtime until the client is
/// dropped.
pub struct PgClient {
    client: tokio_postgres::Client,
    target: String,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PgClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgClient({})", self.target)
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgClient {
    /// Connect with resolved parameters.
    pub async fn connect(params: &ConnParams) -> Result<PgClient> {
        let target = params.describe();
        let (client, task) = crate::tls::connect(params).await?;
        Ok(PgClient {
            client,
            target,
            task,
        })
    }

    /// Resolve `conninfo` over the libpq environment and connect.
    pub async fn connect_conninfo(conninfo: Option<&str>) -> Result<PgClient> {
        Self::connect(&ConnParams::resolve(conninfo)?).await
    }

    /// The underlying tokio-postgres client, for queries this type does not wrap.
    pub fn inner(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// `host=... port=... user=... dbname=...` of this connection.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn query_err(&self, what: &'static str, e: tokio_postgres::Error) -> PgError {
        PgError::Query {
            what,
            target: self.target.clone(),
            reason: error_text(&e),
        }
    }

    /// Run a query returning one text value (`NULL` as `None`).
    pub async fn query_text(&self, what: &'static str, sql: &str) -> Result<Option<String>> {
        let row = self
            .client
            .query_one(sql, &[])
            .await
            .map_err(|e| self.query_err(what, e))?;
        row.try_get::<_, Option<String>>(0)
            .map_err(|e| self.query_err(what, e))
    }

    async fn text(&self, what: &'static str, sql: &str) -> Result<String> {
        self.query_text(what, sql)
            .await?
            .ok_or_else(|| PgError::Query {
                what,
                target: self.target.clone(),
                reason: "returned NULL".into(),
            })
    }

    async fn parsed<T: FromStr>(&self, what: &'static str, sql: &str) -> Result<T> {
        let t = self.text(what, sql).await?;
        t.trim().parse().map_err(|_| PgError::Query {
            what,
            target: self.target.clone(),
            reason: format!("unexpected value {t:?}"),
        })
    }

    /// `current_setting(name)`.
    pub async fn setting(&self, name: &str) -> Result<String> {
        let row = self
            .client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .map_err(|e| self.query_err("reading a setting", e))?;
        row.try_get(0)
            .map_err(|e| self.query_err("reading a setting", e))
    }

    /// `server_version_num`, e.g. 150018.
    pub async fn server_version_num(&self) -> Result<u32> {
        self.parsed(
            "reading server_version_num",
            "SELECT current_setting('server_version_num')",
        )
        .await
    }

    /// The cluster's system identifier (`pg_control_system()`).
    pub async fn system_identifier(&self) -> Result<u64> {
        self.parsed(
            "reading the system identifier",
            "SELECT system_identifier::text FROM pg_control_system()",
        )
        .await
    }

    /// The server's data directory (needs superuser or pg_read_all_settings).
    pub async fn data_directory(&self) -> Result<PathBuf> {
        self.text(
            "reading data_directory",
            "SELECT current_setting('data_directory')",
        )
        .await
        .map(PathBuf::from)
    }

    /// Whether the server is a standby (or otherwise in recovery).
    pub async fn is_in_recovery(&self) -> Result<bool> {
        let t = self
            .text(
                "checking recovery state",
                "SELECT pg_is_in_recovery()::text",
            )
            .await?;
        Ok(t == "true")
    }

    /// Whether data page checksums are on.
    pub async fn data_checksums(&self) -> Result<bool> {
        Ok(self.setting("data_checksums").await? == "on")
    }

    /// Everything of [`ServerInfo`] in one round trip.
    pub async fn server_info(&self) -> Result<ServerInfo> {
        const WHAT: &str = "reading server information";
        let row = self
            .client
            .query_one(
                "SELECT current_setting('server_version_num'), current_setting('server_version'), \
                 (SELECT system_identifier::text FROM pg_control_system()), \
                 current_setting('data_directory'), pg_is_in_recovery()::text, \
                 current_setting('data_checksums'), current_setting('wal_segment_size'), \
                 current_setting('block_size')",
                &[],
            )
            .await
            .map_err(|e| self.query_err(WHAT, e))?;
        let g =
            |i: usize| -> Result<String> { row.try_get(i).map_err(|e| self.query_err(WHAT, e)) };
        let num = |i: usize| -> Result<u64> {
            let s = g(i)?;
            s.parse().map_err(|_| PgError::Query {
                what: WHAT,
                target: self.target.clone(),
                reason: format!("unexpected value {s:?}"),
            })
        };
        Ok(ServerInfo {
            version_num: num(0)? as u32,
            version: g(1)?,
            system_identifier: num(2)?,
            data_directory: PathBuf::from(g(3)?),
            in_recovery: g(4)? == "true",
            data_checksums: g(5)? == "on",
            wal_segment_size: parse_size(&g(6)?).ok_or_else(|| PgError::Query {
                what: WHAT,
                target: self.target.clone(),
                reason: "unexpected wal_segment_size".into(),
            })? as u32,
            block_size: num(7)? as u32,
        })
    }
}

impl PgClient {
    /// Where a standby stands: what it replayed and received, and whether its WAL receiver
    /// streams from a primary. One round trip; on a primary the LSNs are `None`.
    pub async fn standby_status(&self) -> Result<StandbyStatus> {
        const WHAT: &str = "reading the standby's replay and WAL receiver state";
        // pg_stat_wal_receiver has a row only while a WAL receiver runs; its columns other
        // than pid read NULL without pg_read_all_stats, hence `receiver_running` on its own.
        let row = self
            .client
            .query_one(
                "SELECT pg_is_in_recovery()::text, \
                 coalesce(pg_last_wal_replay_lsn()::text, ''), \
                 coalesce(pg_last_wal_receive_lsn()::text, ''), \
                 (SELECT min_recovery_end_timeline::text FROM pg_control_recovery()), \
                 (SELECT count(*)::text FROM pg_stat_wal_receiver), \
                 coalesce((SELECT status FROM pg_stat_wal_receiver), ''), \
                 coalesce((SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver), ''), \
                 coalesce((SELECT last_msg_receipt_time::text FROM pg_stat_wal_receiver), '')",
                &[],
            )
            .await
            .map_err(|e| self.query_err(WHAT, e))?;
        let g =
            |i: usize| -> Result<String> { row.try_get(i).map_err(|e| self.query_err(WHAT, e)) };
        let lsn = |s: String| -> Result<Option<Lsn>> {
            if s.is_empty() {
                Ok(None)
            } else {
                s.parse().map(Some)
            }
        };
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        Ok(StandbyStatus {
            in_recovery: g(0)? == "true",
            replay_lsn: lsn(g(1)?)?,
            receive_lsn: lsn(g(2)?)?,
            min_recovery_timeline: g(3)?.parse().unwrap_or(0),
            receiver_running: g(4)? != "0",
            receiver_status: nonempty(g(5)?),
            sender: nonempty(g(6)?),
            last_message: nonempty(g(7)?),
        })
    }
}

/// What [`PgClient::standby_status`] read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StandbyStatus {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// `pg_last_wal_replay_lsn()`: the end of the last record replayed.
    pub replay_lsn: Option<Lsn>,
    /// `pg_last_wal_receive_lsn()`: the end of the WAL streamed and flushed to disk.
    pub receive_lsn: Option<Lsn>,
    /// `pg_control_recovery().min_recovery_end_timeline` (0 on a primary).
    pub min_recovery_timeline: u32,
    /// Whether a WAL receiver process runs (it exits while its primary cannot be reached).
    pub receiver_running: bool,
    /// `pg_stat_wal_receiver.status` (`streaming`, `starting`, ...) when visible.
    pub receiver_status: Option<String>,
    /// `sender_host:sender_port` of the upstream server, when visible.
    pub sender: Option<String>,
    /// `last_msg_receipt_time` from the upstream server, when visible.
    pub last_message: Option<String>,
}

impl StandbyStatus {
    /// The WAL receiver's state in words, for messages.
    pub fn receiver_text(&self) -> String {
        if !self.receiver_running {
            return "no WAL receiver runs: the standby is not streaming from a primary (is the primary down or unreachable?)".into();
        }
        let status = self
            .receiver_status
            .as_deref()
            .unwrap_or("state not visible");
        let mut s = format!("WAL receiver {status}");
        if let Some(h) = &self.sender {
            s.push_str(&format!(" from {h}"));
        }
        if let Some(t) = &self.last_message {
            s.push_str(&format!(", last message from the primary at {t}"));
        }
        if status != "streaming" && self.receiver_status.is_some() {
            s.push_str(": the standby is not streaming from a primary (is the primary down or unreachable?)");
        }
        s
    }
}

/// Parse a size setting as shown by `current_setting` ("16MB", "1GB", "8192").
fn parse_size(s: &str) -> Option<u64> {
    let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = digits.parse().ok()?;
    let mult = match s[digits.len()..].trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    Some(n * mult)
}

/// A tokio-postgres error as one line: the server's message (with detail and hint) when there
/// is one, else the client-side error chain.
pub(crate) fn error_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" DETAIL: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!(" HINT: {h}"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!(": {inner}"));
        src = inner.source();
    }
    s
}

/// What `pg_backup_start` returned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupStart {
    pub lsn: Lsn,
    /// Timeline of the checkpoint the backup starts from.
    pub timeline: u32,
    pub time: chrono::DateTime<chrono::Utc>,
    pub label: String,
    /// Name of the temporary replication slot that pins the WAL from `lsn`.
    pub slot: String,
}

/// What `pg_backup_stop` returned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupStop {
    /// End of the WAL a restore must replay to be consistent.
    pub lsn: Lsn,
    /// Content of the backup_label file to put into the restored data directory.
    pub backup_label: String,
    /// Content of tablespace_map (empty when the cluster has no tablespaces).
    pub tablespace_map: String,
    pub time: chrono::DateTime<chrono::Utc>,
}

/// Fields of a backup_label file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupLabel {
    pub start_lsn: Lsn,
    pub start_wal_file: String,
    pub checkpoint_lsn: Lsn,
    pub start_timeline: u32,
    pub backup_from: String,
    pub label: String,
}

impl BackupLabel {
    /// Parse backup_label text (`START WAL LOCATION: 0/2000028 (file 0000...)`, ...).
    pub fn parse(text: &str) -> Result<BackupLabel> {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
                .ok_or_else(|| {
                    PgError::parse("backup_label", key.trim_end_matches(':'), "field missing")
                })
        };
        let start = field("START WAL LOCATION:")?;
        let (lsn, file) = start.split_once(" (file ").ok_or_else(|| {
            PgError::parse(
                "backup_label START WAL LOCATION",
                &start,
                "expected LSN (file NAME)",
            )
        })?;
        Ok(BackupLabel {
            start_lsn: lsn.trim().parse()?,
            start_wal_file: file.trim_end_matches(')').to_string(),
            checkpoint_lsn: field("CHECKPOINT LOCATION:")?.parse()?,
            start_timeline: field("START TIMELINE:")?
                .parse()
                .map_err(|_| PgError::parse("backup_label", "START TIMELINE", "not a number"))?,
            backup_from: field("BACKUP FROM:").unwrap_or_else(|_| "primary".into()),
            label: field("LABEL:").unwrap_or_default(),
        })
    }
}

/// A base backup in progress on a held connection (PostgreSQL's non-exclusive backup API).
///
/// [`BackupSession::start`] first creates a temporary physical replication slot with
/// `immediately_reserve`, so the WAL from the slot's restart point (the last checkpoint's redo,
/// at or before the backup's start LSN) cannot be removed or recycled until the session ends —
/// even when `archive_command` belongs to another tool and archives nothing for us. Then it
/// calls `pg_backup_start(label, fast => true)`. [`BackupSession::stop`] calls
/// `pg_backup_stop(wait_for_archive => false)` and checks that the slot still holds the WAL.
/// Keep the session until the WAL up to the stop LSN has been copied from pg_wal, then call
/// [`BackupSession::finish`] (drops the slot). Dropping the session without `stop` closes the
/// connection, which aborts the backup and drops the temporary slot on the server.
pub struct BackupSession {
    client: PgClient,
    start: BackupStart,
    version_num: u32,
    stopped: bool,
}

impl std::fmt::Debug for BackupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupSession")
            .field("target", &self.client.target)
            .field("start", &self.start)
            .field("stopped", &self.stopped)
            .finish()
    }
}

fn slot_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // Slot names: lower-case letters, digits, underscore; at most 63 bytes.
    format!(
        "pgkeep_{}_{:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

impl BackupSession {
    /// Create the WAL-pinning slot and start the backup (with an immediate checkpoint).
    pub async fn start(client: PgClient, label: &str) -> Result<BackupSession> {
        let version_num = client.server_version_num().await?;
        if !crate::control::is_supported_major(version_num / 10000) {
            return Err(PgError::UnsupportedVersion {
                subject: format!("the server at {}", client.target),
                found: format!(
                    "PostgreSQL {} (server_version_num {version_num})",
                    version_num / 10000
                ),
            });
        }
        let slot = slot_name();
        client
            .client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true, true)",
                &[&slot],
            )
            .await
            .map_err(|e| PgError::Query {
                what: "creating the temporary replication slot that pins the backup's WAL",
                target: client.target.clone(),
                reason: format!(
                    "{} (HINT: the user needs the REPLICATION attribute or superuser, and max_replication_slots must leave one free)",
                    error_text(&e)
                ),
            })?;
        let sql = if version_num >= 150000 {
            "SELECT pg_backup_start($1, true)::text"
        } else {
            "SELECT pg_start_backup($1, true, false)::text"
        };
        let row = client
            .client
            .query_one(sql, &[&label])
            .await
            .map_err(|e| client.query_err("starting the backup (pg_backup_start)", e))?;
        let lsn: String = row
            .try_get(0)
            .map_err(|e| client.query_err("starting the backup (pg_backup_start)", e))?;
        let timeline: i32 = client
            .client
            .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(|e| client.query_err("reading the backup's timeline", e))?;
        let start = BackupStart {
            lsn: lsn.parse()?,
            timeline: timeline as u32,
            time: chrono::Utc::now(),
            label: label.to_string(),
            slot,
        };
        Ok(BackupSession {
            client,
            start,
            version_num,
            stopped: false,
        })
    }

    /// The start LSN, timeline, label and slot.
    pub fn start_info(&self) -> &BackupStart {
        &self.start
    }

    /// The held connection (e.g. for server facts while the backup runs).
    pub fn client(&self) -> &PgClient {
        &self.client
    }

    /// Finish the backup on the server: `pg_backup_stop(wait_for_archive => false)`. The slot
    /// stays until [`BackupSession::finish`]. Fails if the slot lost its WAL meanwhile
    /// (`max_slot_wal_keep_size`).
    pub async fn stop(&mut self) -> Result<BackupStop> {
        if self.stopped {
            return Err(PgError::Query {
                what: "stopping the backup",
                target: self.client.target.clone(),
                reason: "the backup was already stopped".into(),
            });
        }
        let sql = if self.version_num >= 150000 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        const WHAT: &str = "stopping the backup (pg_backup_stop)";
        let row = self
            .client
            .client
            .query_one(sql, &[])
            .await
            .map_err(|e| self.client.query_err(WHAT, e))?;
        self.stopped = true;
        let lsn: String = row.try_get(0).map_err(|e| self.client.query_err(WHAT, e))?;
        let label: Option<String> = row.try_get(1).map_err(|e| self.client.query_err(WHAT, e))?;
        let map: Option<String> = row.try_get(2).map_err(|e| self.client.query_err(WHAT, e))?;
        self.check_slot().await?;
        Ok(BackupStop {
            lsn: lsn.parse()?,
            backup_label: label.unwrap_or_default(),
            tablespace_map: map.unwrap_or_default(),
            time: chrono::Utc::now(),
        })
    }

    /// Check that the slot still exists and holds its WAL.
    pub async fn check_slot(&self) -> Result<()> {
        let row = self
            .client
            .client
            .query_opt(
                "SELECT coalesce(wal_status, ''), coalesce(restart_lsn::text, '') FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.start.slot],
            )
            .await
            .map_err(|e| self.client.query_err("checking the backup's replication slot", e))?;
        let Some(row) = row else {
            return Err(PgError::WalLost(format!(
                "the backup's replication slot {} on {} disappeared; WAL needed by the backup may be gone",
                self.start.slot, self.client.target
            )));
        };
        let status: String = row.get(0);
        if status == "lost" {
            return Err(PgError::WalLost(format!(
                "the backup's replication slot {} on {} lost its WAL (max_slot_wal_keep_size exceeded during the backup). HINT: raise max_slot_wal_keep_size or take the backup at a quieter time",
                self.start.slot, self.client.target
            )));
        }
        Ok(())
    }

    /// Drop the slot and close the connection. Call after the WAL up to the stop LSN is safe.
    pub async fn finish(self) -> Result<()> {
        self.client
            .client
            .execute("SELECT pg_drop_replication_slot($1)", &[&self.start.slot])
            .await
            .map_err(|e| {
                self.client
                    .query_err("dropping the backup's replication slot", e)
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_passwords() {
        assert!(conninfo_has_password("host=x password=secret"));
        assert!(conninfo_has_password("host=x password = 'se cret'"));
        assert!(conninfo_has_password("postgresql://u:pw@host/db"));
        assert!(conninfo_has_password(
            "postgres://host/db?user=u&password=pw"
        ));
        assert!(!conninfo_has_password("host=x user=u dbname=d"));
        assert!(!conninfo_has_password(
            "postgresql://u@host:5432/db?sslmode=disable"
        ));
        assert!(!conninfo_has_password(
            "host=x application_name='my password app'"
        ));
        assert!(!conninfo_has_password("postgresql://host/db#pw:x"));
    }

    #[test]
    fn keyvalue_parsing() {
        let p = parse_keyvalue(r"host=/tmp port = 5 application_name='a b\'c' x=y\ z").unwrap();
        assert_eq!(
            p,
            vec![
                ("host".into(), "/tmp".into()),
                ("port".into(), "5".into()),
                ("application_name".into(), "a b'c".into()),
                ("x".into(), "y z".into())
            ]
        );
        assert!(parse_keyvalue("host").is_err());
        assert!(parse_keyvalue("host='x").is_err());
    }

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn conninfo_over_environment() {
        let env = env_of(&[
            ("PGHOST", "/run/pg"),
            ("PGPORT", "6543"),
            ("PGUSER", "alice"),
            ("PGDATABASE", "shop"),
        ]);
        let p = ConnParams::resolve_with(None, &env).unwrap();
        assert_eq!(
            p.describe(),
            "host=/run/pg port=6543 user=alice dbname=shop"
        );
        assert!(p.is_unix_socket());
        let p = ConnParams::resolve_with(Some("host=db.example port=5433 dbname=x"), &env).unwrap();
        assert_eq!(
            p.describe(),
            "host=db.example port=5433 user=alice dbname=x"
        );
        let p = ConnParams::resolve_with(Some("postgresql://bob@h2/d2"), &env).unwrap();
        assert_eq!(
            (p.user.as_str(), p.host.as_str(), p.port),
            ("bob", "h2", 6543)
        );
        let env = env_of(&[]);
        let p = ConnParams::resolve_with(Some("user=carol"), &env).unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.dbname.as_str()),
            (DEFAULT_SOCKET_DIR, 5432, "carol")
        );
        assert!(ConnParams::resolve_with(Some("port=notaport"), &env).is_err());
        let bad = env_of(&[("PGPORT", "x")]);
        assert!(ConnParams::resolve_with(None, &bad).is_err());
    }

    #[test]
    fn password_sources_and_secrecy() {
        let env = env_of(&[("PGPASSWORD", "s3cret"), ("PGUSER", "u")]);
        let p = ConnParams::resolve_with(Some("host=h"), &env).unwrap();
        assert!(p.has_password());
        assert!(!format!("{p:?}").contains("s3cret"));
        assert!(!p.describe().contains("s3cret"));
        assert!(p
            .libpq_env()
            .contains(&("PGPASSWORD".into(), "s3cret".into())));
        // A malformed conninfo error does not echo the string.
        let e = ConnParams::resolve_with(Some("host=h password='hunter2-never-shown"), &env)
            .unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn pgpass_file() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("pgpass");
        std::fs::write(
            &f,
            "# comment\nother:5432:*:u:wrong\nlocalhost:5432:db:u:local\\:pw\n/sock:*:*:*:sockpw\n*:*:*:u:any\n",
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let fstr: &'static str = Box::leak(f.display().to_string().into_boxed_str());
        let leak =
            |v: Vec<(&'static str, &'static str)>| -> &'static [(&'static str, &'static str)] {
                Box::leak(v.into_boxed_slice())
            };
        let env = env_of(leak(vec![("PGPASSFILE", fstr), ("PGUSER", "u")]));
        let pw = |ci: &str| ConnParams::resolve_with(Some(ci), &env).unwrap().password;
        assert_eq!(
            pw("host=/var/run/postgresql dbname=db").as_deref(),
            Some("local:pw")
        );
        assert_eq!(pw("host=/sock dbname=db").as_deref(), Some("sockpw"));
        assert_eq!(pw("host=elsewhere dbname=db").as_deref(), Some("any"));
        // Group-readable files are ignored, as libpq does.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(pw("host=elsewhere dbname=db"), None);
    }

    #[test]
    fn backup_label_parsing() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2024-01-01 00:00:00 UTC\nLABEL: nightly\nSTART TIMELINE: 1\n";
        let l = BackupLabel::parse(text).unwrap();
        assert_eq!(l.start_lsn.to_string(), "0/2000028");
        assert_eq!(l.start_wal_file, "000000010000000000000002");
        assert_eq!(l.checkpoint_lsn.to_string(), "0/2000060");
        assert_eq!(
            (l.start_timeline, l.label.as_str(), l.backup_from.as_str()),
            (1, "nightly", "primary")
        );
        assert!(BackupLabel::parse("LABEL: x\n").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("8192"), Some(8192));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
    }
}
