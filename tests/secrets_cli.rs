//! Secrets never leak (issue 18 item 7, RELIABILITY.md row 25), through the built binary.
//!
//! One scenario plants distinctive canary values in every secret pgkeep is given, makes each
//! of them really used, then runs every command at debug verbosity (`-vv`, `-vvv` for the
//! object-store failures), with `--json` and in text, and finds none of the canaries in:
//! stdout, stderr, `--json` output, the PostgreSQL server log (where the archiver's
//! `archive-push` writes), every file pgkeep wrote on this host (notification and daemon
//! state, `metrics --output`, the restored data directory, the local repository), the
//! metrics text, the run history, the dashboard's HTML and the daemon's API, every object of
//! the S3 bucket and the Azure container (plain repositories: every zstd frame decompressed
//! as well), the requests and mails the notification receivers got (apart from each
//! channel's own secret where the protocol puts it), and the command line of every process
//! on the machine, sampled from a background thread every 2 ms during the whole run
//! (pgkeep, its pg_dump / pg_restore / psql children, the archiver's `archive-push`, the
//! drill's throwaway `postgres`, the daemon's jobs).
//!
//! The secrets, each really used:
//! - `PGPASSWORD`: the cluster's role `keeper` has that password and `pg_hba.conf` asks
//!   for it (scram-sha-256, socket and TCP); a wrong one makes `dump` and `backup` fail.
//! - `PGKEEP_PASSPHRASE`: the local repository is encrypted with it (the archiver reads the
//!   same value from a `passphrase_file`); a wrong one gives exit 12.
//! - `AWS_SECRET_ACCESS_KEY`: SeaweedFS's key for the S3 repository; a wrong one is refused
//!   with 403 (`list`, `dump`, `repo check`).
//! - `AZURE_STORAGE_ACCOUNT_KEY`: Azurite's account key for the Azure repository; a wrong
//!   one is refused with 403.
//! - The notification secrets: the webhook's HMAC secret, the Slack webhook URL, the
//!   PagerDuty routing key (from a file) and the SMTP password (STARTTLS + AUTH required by
//!   the receiver); `notify test` and the notified failures deliver to all four.
//! - `PGKEEP_DAEMON_PASSWORD`: the daemon's basic-auth password, used by the scrapes.
//! - `PGKEEP_NEW_PASSPHRASE`: `repo key add` adds it, and a `list` opens the repository
//!   with it.
//!
//! Commands: repo init/info/check/key add/key list/prune, backup, list, info, restore,
//! archive-push (sync and async), archive-get, dump, restore-dump, export-dump, verify,
//! expire, pin, unpin, copy, check (and --nagios), status, metrics (text, --output,
//! cloudwatch), history, notify test, drill (physical and dump), generate, daemon.
//!
//! A second test gives secrets on the command line (`--pg` with a password, `--repo` with
//! credentials, `--primary-conninfo` with a password): refused with exit 2, never echoed.

#[path = "cli_support/canary.rs"]
mod canary;
mod cli_support;
#[path = "../crates/notify/tests/support/mod.rs"]
mod notify_support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use canary::{fresh, hits, Canary, CmdlineSampler};
use cli_support::{Run, Sandbox};
use pgkeep_testing::azure::AzuriteServer;
use pgkeep_testing::s3::S3Server;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");

/// Where each secret comes from in this scenario.
struct Secrets {
    pg: Canary,
    pg_wrong: Canary,
    passphrase: Canary,
    passphrase_wrong: Canary,
    aws: Canary,
    aws_wrong: Canary,
    azure: Canary,
    azure_wrong: Canary,
    hook: Canary,
    slack: Canary,
    pd: Canary,
    smtp: Canary,
    daemon: Canary,
    new_passphrase: Canary,
}

impl Secrets {
    fn all(&self) -> Vec<Canary> {
        vec![
            self.pg.clone(),
            self.pg_wrong.clone(),
            self.passphrase.clone(),
            self.passphrase_wrong.clone(),
            self.aws.clone(),
            self.aws_wrong.clone(),
            self.azure.clone(),
            self.azure_wrong.clone(),
            self.hook.clone(),
            self.slack.clone(),
            self.pd.clone(),
            self.smtp.clone(),
            self.daemon.clone(),
            self.new_passphrase.clone(),
        ]
    }
}

/// Runs pgkeep with every secret in its environment, keeping each output to search later.
struct Runner {
    home: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    /// (what, bytes) of every output to search.
    outputs: Vec<(String, Vec<u8>)>,
    log: Vec<String>,
}

impl Runner {
    /// `pgkeep ARGS` with the common environment, `extra` over it and `remove` taken out;
    /// asserts the exit code is one of `codes`.
    fn run(
        &mut self,
        what: &str,
        args: &[&str],
        extra: &[(&str, &str)],
        remove: &[&str],
        codes: &[i32],
    ) -> Run {
        let started = Instant::now();
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("PGKEEP_CONFIG", &self.config)
            .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
            .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
            .current_dir(&self.home)
            .stdin(Stdio::null())
            .args(args);
        for (k, v) in &self.env {
            if !remove.contains(&k.as_str()) {
                cmd.env(k, v);
            }
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        for k in remove {
            cmd.env_remove(k);
        }
        let run = Run(cmd.output().unwrap());
        self.log.push(format!(
            "{what}: pgkeep {} -> {} in {:.1}s",
            args.join(" "),
            run.code(),
            started.elapsed().as_secs_f64()
        ));
        assert!(
            codes.contains(&run.code()),
            "{what}: pgkeep {args:?} exited {} (expected one of {codes:?})\n--- stdout\n{}\n--- stderr\n{}",
            run.code(),
            run.stdout(),
            run.stderr()
        );
        if args.contains(&"--json") {
            run.json();
        }
        self.outputs
            .push((format!("{what} stdout"), run.0.stdout.clone()));
        self.outputs
            .push((format!("{what} stderr"), run.0.stderr.clone()));
        run
    }

    fn keep(&mut self, what: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.outputs.push((what.into(), bytes.into()));
    }
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn chown_postgres(path: &Path) {
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "chown -R postgres {}", path.display());
}

/// Switches WAL and waits until the archiver stored the segment; returns its name.
fn switch_and_wait(c: &pgkeep_testing::Cluster) -> String {
    let last = c.sql("SELECT pg_walfile_name(pg_switch_wal())").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = c
            .sql("SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver")
            .unwrap();
        let (archived, failed) = row.split_once('|').unwrap();
        assert_eq!(failed, "0", "archive_command failed:\n{}", c.log_tail());
        if archived >= last.as_str() {
            return last;
        }
        assert!(Instant::now() < deadline, "{last} not archived");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` on the daemon with basic auth built here (no password on a command line).
fn http_get(port: u16, path: &str, user: &str, password: &str) -> (u16, String) {
    let auth = canary::base64(format!("{user}:{password}").as_bytes());
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

fn leaks_in(canaries: &[Canary], what: &str, bytes: &[u8], found: &mut Vec<String>) {
    let h = hits(canaries, bytes);
    if !h.is_empty() {
        let text = String::from_utf8_lossy(bytes);
        let mut excerpt = String::new();
        for c in canaries.iter().filter(|c| h.contains(&c.name)) {
            if let Some(p) = text.find(&c.value) {
                let mut lo = p.saturating_sub(200);
                while !text.is_char_boundary(lo) {
                    lo -= 1;
                }
                let mut hi = (p + c.value.len() + 200).min(text.len());
                while !text.is_char_boundary(hi) {
                    hi += 1;
                }
                excerpt.push_str(&format!("\n    ...{}...", &text[lo..hi]));
            }
        }
        found.push(format!("{what}: {}{excerpt}", h.join(", ")));
    }
}

/// Searches every object of `storage` (raw, and each zstd frame decompressed).
async fn scan_store(
    canaries: &[Canary],
    what: &str,
    storage: &dyn pgkeep_storage::Storage,
    found: &mut Vec<String>,
) -> usize {
    let objects = storage.list("").await.unwrap();
    for o in &objects {
        let bytes = storage.get(&o.key).await.unwrap();
        leaks_in(canaries, &format!("{what} {}", o.key), &bytes, found);
        for (i, plain) in canary::zstd_plaintexts(&bytes).iter().enumerate() {
            leaks_in(
                canaries,
                &format!("{what} {} (zstd frame {i})", o.key),
                plain,
                found,
            );
        }
    }
    objects.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_shows_in_any_output_file_object_or_process_list() {
    if !pgkeep_testing::cluster::require_root(
        "the drill's server and the archiver run as postgres; chown of the repository",
    ) {
        return;
    }
    let t0 = Instant::now();
    let sec = Secrets {
        pg: fresh("pgpassword"),
        pg_wrong: fresh("pgpasswordwrong"),
        passphrase: fresh("passphrase"),
        passphrase_wrong: fresh("passphrasewrong"),
        // SeaweedFS and Azurite take fixed test credentials (crates/testing): distinctive
        // values all the same, found nowhere unless leaked.
        aws: Canary::shared("aws_secret", pgkeep_testing::s3::SECRET_KEY),
        aws_wrong: fresh("awssecretwrong"),
        azure: Canary::shared("azure_key", pgkeep_testing::azure::ACCOUNT_KEY),
        // Valid base64 of 63 bytes (no padding), as an account key must be.
        azure_wrong: Canary {
            name: "azure_key_wrong".into(),
            value: canary::base64(format!("{:x<63}", fresh("azurewrong").value).as_bytes()),
            shared: false,
        },
        hook: fresh("hookhmac"),
        slack: fresh("slackurl"),
        pd: fresh("pdroutingkey"),
        smtp: fresh("smtppassword"),
        daemon: fresh("daemonpassword"),
        new_passphrase: fresh("newpassphrase"),
    };
    let canaries = sec.all();
    // The sandbox first: its paths mark this test's own archiver, drill server and daemon
    // jobs in the process list.
    let sb = Sandbox::new();
    let sampler = CmdlineSampler::start(
        canaries.clone(),
        vec![
            sb.path()
                .join("archive.toml archive-push")
                .display()
                .to_string(),
            sb.path()
                .join("scratch/pgkeep-drill-")
                .display()
                .to_string(),
            sb.path()
                .join("daemon-state/daemon-config.toml")
                .display()
                .to_string(),
        ],
    );

    // Receivers: HTTP for webhook/Slack/PagerDuty, aiosmtpd with STARTTLS and AUTH.
    let http = notify_support::Receiver::start();
    let certs = tempfile::tempdir().unwrap();
    notify_support::make_certs(certs.path());
    let smtp = notify_support::SmtpSink::starttls_auth(
        &certs.path().join("server.pem"),
        &certs.path().join("server.key"),
        "pgkeep",
        &sec.smtp.value,
    );
    let s3 = S3Server::start().await.unwrap();
    let azurite = AzuriteServer::start().await.unwrap();

    // The sandbox: traversable by the server user (archiver, drill server), secrets apart.
    std::fs::set_permissions(sb.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let secrets_dir = sb.path().join("secrets");
    std::fs::create_dir(&secrets_dir).unwrap();
    std::fs::set_permissions(&secrets_dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let pd_key = secrets_dir.join("pd-key");
    write_private(&pd_key, &format!("{}\n", sec.pd.value));
    let archiver_pass = secrets_dir.join("archiver-passphrase");
    write_private(&archiver_pass, &format!("{}\n", sec.passphrase.value));
    chown_postgres(&archiver_pass);
    let scratch = sb.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let repo = sb.repo();

    // The cluster: role keeper with the canary password, password authentication for it.
    let archive_cfg = sb.path().join("archive.toml");
    std::fs::write(
        &archive_cfg,
        format!(
            "[[repository]]\nname = \"local\"\nurl = \"{}\"\npassphrase_file = \"{}\"\n",
            repo.display(),
            archiver_pass.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&archive_cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut c = pgkeep_testing::Cluster::builder()
        .archive_command(&format!(
            "{BIN} --config {} archive-push %p",
            archive_cfg.display()
        ))
        .init()
        .unwrap();
    std::fs::write(
        c.pgdata().join("pg_hba.conf"),
        "local all postgres trust\nlocal replication postgres trust\n\
         local all all scram-sha-256\nlocal replication all scram-sha-256\n\
         host all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();

    let prefix = pgkeep_testing::s3::unique_prefix("secrets");
    let main_cfg = sb.path().join("pgkeep.toml");
    let pg_tcp = |port: u16| format!("host=127.0.0.1 port={port} user=keeper dbname=postgres");

    let mut r = Runner {
        home: sb.path().to_path_buf(),
        config: main_cfg.clone(),
        env: vec![
            ("PGPASSWORD".into(), sec.pg.value.clone()),
            ("PGKEEP_PASSPHRASE".into(), sec.passphrase.value.clone()),
            (
                "AWS_ACCESS_KEY_ID".into(),
                pgkeep_testing::s3::ACCESS_KEY.into(),
            ),
            ("AWS_SECRET_ACCESS_KEY".into(), sec.aws.value.clone()),
            ("AWS_REGION".into(), pgkeep_testing::s3::REGION.into()),
            (
                "AZURE_STORAGE_ACCOUNT_NAME".into(),
                pgkeep_testing::azure::ACCOUNT.into(),
            ),
            ("AZURE_STORAGE_ACCOUNT_KEY".into(), sec.azure.value.clone()),
            ("CANARY_HOOK_SECRET".into(), sec.hook.value.clone()),
            (
                "CANARY_SLACK_URL".into(),
                http.url(&format!("/services/{}", sec.slack.value)),
            ),
            ("CANARY_SMTP_PASSWORD".into(), sec.smtp.value.clone()),
            ("PGKEEP_DAEMON_PASSWORD".into(), sec.daemon.value.clone()),
        ],
        outputs: Vec::new(),
        log: Vec::new(),
    };

    // The encrypted local repository, writable by the archiver.
    r.run(
        "repo init",
        &[
            "--config",
            archive_cfg.to_str().unwrap(),
            "-vv",
            "--json",
            "repo",
            "init",
        ],
        &[],
        &[],
        &[0],
    );
    chown_postgres(&repo);
    c.start().unwrap();
    c.sql(&format!(
        "CREATE ROLE keeper LOGIN SUPERUSER REPLICATION PASSWORD '{}'",
        sec.pg.value
    ))
    .unwrap();
    c.sql("CREATE DATABASE app").unwrap();
    c.sql_db(
        "app",
        "CREATE TABLE orders (id int PRIMARY KEY, note text); \
         INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 5000) g",
    )
    .unwrap();
    // keeper cannot connect without the password: the canary is really what lets pgkeep in.
    let no_pw = Command::new(c.client_program("psql"))
        .args(["-w", "-XAtc", "SELECT 1", &pg_tcp(c.port())])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(
        !no_pw.status.success() && String::from_utf8_lossy(&no_pw.stderr).contains("password"),
        "keeper must need its password: {}",
        String::from_utf8_lossy(&no_pw.stderr)
    );

    // The configuration: three repositories, the cluster, notifications to all four kinds
    // of channel (secrets from the environment and a file), the daemon with basic auth.
    let daemon_port = pgkeep_testing::cluster::free_port().unwrap();
    write_private(
        &main_cfg,
        &format!(
            r#"[[repository]]
name = "local"
url = "{repo}"

[[repository]]
name = "s3"
url = "s3://{bucket}/{prefix}"
endpoint = "{s3_endpoint}"
region = "{region}"
force_path_style = true
allow_http = true
retry_max_attempts = 2
retry_base_delay_ms = 50

[[repository]]
name = "az"
url = "az://{container}/{prefix}"
endpoint = "{az_endpoint}"
azure_account = "{account}"
allow_http = true
retry_max_attempts = 2
retry_base_delay_ms = 50

[[cluster]]
name = "main"
pgdata = "{pgdata}"
pg = "{pg}"
repository = "local"

[drill]
scratch_dir = "{scratch}"

[notify]
retries = 0
timeout = "5s"
state_dir = "{state}"

[[notify.webhook]]
url = "{hook}"
secret_env = "CANARY_HOOK_SECRET"

[[notify.slack]]
name = "ops-slack"
webhook_url_env = "CANARY_SLACK_URL"

[[notify.pagerduty]]
routing_key_file = "{pd_key}"
url = "{pd}"

[[notify.email]]
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
tls = "starttls"
ca_file = "{ca}"
username = "pgkeep"
password_env = "CANARY_SMTP_PASSWORD"
from = "pgkeep@db1.example"
to = ["dba@example.com"]

[daemon]
listen = "127.0.0.1:{daemon_port}"
user = "ops"
missed_runs = "skip"
state_dir = "{daemon_state}"

[[schedule]]
job = "dump"
db = "app"
cron = "*/2 * * * * *"
"#,
            repo = repo.display(),
            bucket = s3.bucket,
            s3_endpoint = s3.endpoint,
            region = s3.region,
            container = azurite.container,
            az_endpoint = azurite.endpoint,
            account = azurite.account,
            pgdata = c.pgdata().display(),
            pg = pg_tcp(c.port()),
            scratch = scratch.display(),
            state = sb.path().join("notify-state").display(),
            hook = http.url("/hook"),
            pd_key = pd_key.display(),
            pd = http.url("/pd"),
            smtp_port = smtp.port,
            ca = certs.path().join("ca.pem").display(),
            daemon_state = sb.path().join("daemon-state").display(),
        ),
    );
    // It holds no secret (only where they come from), and the drill's server user must read
    // it: the drill's archive-get runs as postgres with this configuration.
    std::fs::set_permissions(&main_cfg, std::fs::Permissions::from_mode(0o644)).unwrap();

    // ---- The local encrypted repository: every command.
    let vv = "-vv";
    r.run("backup (json)", &[vv, "--json", "backup"], &[], &[], &[0]);
    c.sql_db(
        "app",
        "INSERT INTO orders VALUES (100001, 'after the first backup')",
    )
    .unwrap();
    let segment = switch_and_wait(&c);
    r.run(
        "backup (text)",
        &[vv, "backup", "--label", "second"],
        &[],
        &[],
        &[0],
    );
    for json in [true, false] {
        let j: &[&str] = if json { &["--json"] } else { &[] };
        let with = |a: &[&'static str]| -> Vec<&'static str> { [&[vv][..], j, a].concat() };
        r.run("list", &with(&["list"]), &[], &[], &[0]);
        r.run("info", &with(&["info", "latest"]), &[], &[], &[0]);
        r.run("repo info", &with(&["repo", "info"]), &[], &[], &[0]);
        r.run("status", &with(&["status"]), &[], &[], &[0, 3]);
        r.run("history", &with(&["history"]), &[], &[], &[0]);
    }
    r.run(
        "repo check",
        &[vv, "--json", "repo", "check", "--read-data"],
        &[],
        &[],
        &[0],
    );
    // archive-push of a segment the archiver stored already (identical: a warning), sync
    // and through the async spool; archive-get of it.
    let seg_path = c.pgdata().join("pg_wal").join(&segment);
    if seg_path.exists() {
        r.run(
            "archive-push",
            &[vv, "--json", "archive-push", seg_path.to_str().unwrap()],
            &[],
            &[],
            &[0],
        );
    }
    let fetched = sb.path().join("fetched-segment");
    r.run(
        "archive-get",
        &[vv, "archive-get", &segment, fetched.to_str().unwrap()],
        &[],
        &[],
        &[0],
    );
    let dump = r.run(
        "dump (json)",
        &[vv, "--json", "dump", "--db", "app"],
        &[],
        &[],
        &[0],
    );
    let dump_id = dump.json()["id"].as_str().unwrap().to_string();
    r.run("dump --all", &[vv, "dump", "--all"], &[], &[], &[0]);
    r.run(
        "restore-dump",
        &[
            vv,
            "--json",
            "restore-dump",
            &dump_id,
            "--target-db",
            "app_copy",
            "--create",
        ],
        &[],
        &[],
        &[0],
    );
    assert_eq!(
        c.sql_db("app_copy", "SELECT count(*) FROM orders").unwrap(),
        "5001"
    );
    let restored = sb.path().join("restored");
    r.run(
        "restore",
        &[
            vv,
            "--json",
            "restore",
            "latest",
            "--target-dir",
            restored.to_str().unwrap(),
        ],
        &[],
        &[],
        &[0, 3],
    );
    assert!(restored.join("PG_VERSION").is_file());
    r.run("check (json)", &[vv, "--json", "check"], &[], &[], &[0, 3]);
    r.run(
        "check --nagios",
        &[vv, "check", "--nagios"],
        &[],
        &[],
        &[0, 1],
    );
    let m = r.run("metrics", &[vv, "metrics"], &[], &[], &[0]);
    cli_support::promtool(&m.stdout());
    let prom = sb.path().join("pgkeep.prom");
    r.run(
        "metrics --output",
        &[vv, "metrics", "--output", prom.to_str().unwrap()],
        &[],
        &[],
        &[0],
    );
    r.run(
        "metrics cloudwatch",
        &[vv, "metrics", "--format", "cloudwatch-json"],
        &[],
        &[],
        &[0],
    );
    let nt = r.run(
        "notify test",
        &[vv, "--json", "notify", "test"],
        &[],
        &[],
        &[0],
    );
    let delivered = nt.json()["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["delivered"] == true)
        .count();
    assert_eq!(
        delivered,
        4,
        "every channel gets the test:\n{}",
        nt.stdout()
    );
    r.run("drill", &[vv, "--json", "drill", "latest"], &[], &[], &[0]);
    r.run(
        "drill --dump",
        &[vv, "--json", "drill", "--dump", "latest", "--db", "app"],
        &[],
        &[],
        &[0],
    );

    // ---- Failures that carry secrets nearby: a wrong PostgreSQL password, a wrong
    // passphrase. Each failed run is notified on every channel.
    r.run(
        "dump, wrong PGPASSWORD",
        &[vv, "--json", "dump", "--db", "app"],
        &[("PGPASSWORD", &sec.pg_wrong.value)],
        &[],
        &[1],
    );
    r.run(
        "backup, wrong PGPASSWORD",
        &[vv, "backup"],
        &[("PGPASSWORD", &sec.pg_wrong.value)],
        &[],
        &[1],
    );
    r.run(
        "list, wrong passphrase",
        &["-vvv", "list"],
        &[("PGKEEP_PASSPHRASE", &sec.passphrase_wrong.value)],
        &[],
        &[12],
    );

    // ---- S3 (plain repository, so its objects are searchable plaintext): init, a copy of
    // everything with the WAL, commands on it, and a wrong secret (403).
    let on_s3 = [("PGKEEP_REPOSITORY", "s3")];
    r.run(
        "s3 repo init",
        &[vv, "--json", "repo", "init", "--no-encryption"],
        &on_s3,
        &["PGKEEP_PASSPHRASE"],
        &[0],
    );
    r.run(
        "copy to s3",
        &[vv, "--json", "copy", "--to", "s3", "--all", "--wal"],
        &[],
        &[],
        &[0],
    );
    r.run("s3 list", &["-vvv", "--json", "list"], &on_s3, &[], &[0]);
    r.run(
        "s3 dump",
        &[vv, "--json", "dump", "--db", "app"],
        &on_s3,
        &[],
        &[0],
    );
    r.run(
        "s3 repo check",
        &[vv, "--json", "repo", "check", "--read-data"],
        &on_s3,
        &[],
        &[0],
    );
    r.run(
        "s3 archive-get",
        &[
            vv,
            "archive-get",
            &segment,
            sb.path().join("s3-segment").to_str().unwrap(),
        ],
        &on_s3,
        &[],
        &[0],
    );
    r.run("s3 history", &[vv, "--json", "history"], &on_s3, &[], &[0]);
    let wrong_s3 = [
        ("PGKEEP_REPOSITORY", "s3"),
        ("AWS_SECRET_ACCESS_KEY", sec.aws_wrong.value.as_str()),
    ];
    let denied = r.run(
        "s3 list, wrong secret",
        &["-vvv", "list"],
        &wrong_s3,
        &[],
        &[1, 10],
    );
    assert!(
        denied.stderr().contains("403")
            || denied.stderr().to_lowercase().contains("denied")
            || denied.stderr().contains("Forbidden")
            || denied.stderr().contains("SignatureDoesNotMatch"),
        "a refused secret is reported as such:\n{}",
        denied.stderr()
    );
    r.run(
        "s3 dump, wrong secret",
        &[vv, "--json", "dump", "--db", "app"],
        &wrong_s3,
        &[],
        &[1, 10],
    );
    r.run(
        "s3 repo check, wrong secret",
        &["-vvv", "repo", "check"],
        &wrong_s3,
        &[],
        &[1, 10],
    );

    // ---- Azure (plain too): init, a dump, commands, a wrong account key (403).
    let on_az = [("PGKEEP_REPOSITORY", "az")];
    r.run(
        "az repo init",
        &[vv, "--json", "repo", "init", "--no-encryption"],
        &on_az,
        &["PGKEEP_PASSPHRASE"],
        &[0],
    );
    r.run(
        "az dump",
        &[vv, "--json", "dump", "--db", "app"],
        &on_az,
        &[],
        &[0],
    );
    r.run("az list", &[vv, "--json", "list"], &on_az, &[], &[0]);
    r.run(
        "az repo check",
        &[vv, "repo", "check", "--read-data"],
        &on_az,
        &[],
        &[0],
    );
    let wrong_az = [
        ("PGKEEP_REPOSITORY", "az"),
        ("AZURE_STORAGE_ACCOUNT_KEY", sec.azure_wrong.value.as_str()),
    ];
    let denied = r.run(
        "az list, wrong key",
        &["-vvv", "list"],
        &wrong_az,
        &[],
        &[1, 10],
    );
    assert!(
        denied.stderr().contains("403")
            || denied.stderr().to_lowercase().contains("denied")
            || denied.stderr().contains("Forbidden")
            || denied.stderr().contains("AuthorizationFailure")
            || denied.stderr().contains("AuthenticationFailed"),
        "a refused key is reported as such:\n{}",
        denied.stderr()
    );
    r.run(
        "az dump, wrong key",
        &[vv, "dump", "--db", "app"],
        &wrong_az,
        &[],
        &[1, 10],
    );

    // ---- The rest of the commands on the local repository: a second key (its passphrase
    // a canary too), verify, export-dump, pin/unpin, prune, generate, async archive-push.
    r.run(
        "repo key add",
        &[vv, "--json", "repo", "key", "add"],
        &[("PGKEEP_NEW_PASSPHRASE", &sec.new_passphrase.value)],
        &[],
        &[0],
    );
    // The archiver (postgres) reads every key file: the one root just wrote too.
    chown_postgres(&repo.join("keys"));
    r.run(
        "list with the new key",
        &[vv, "list"],
        &[("PGKEEP_PASSPHRASE", &sec.new_passphrase.value)],
        &[],
        &[0],
    );
    r.run(
        "repo key list",
        &[vv, "--json", "repo", "key", "list"],
        &[],
        &[],
        &[0],
    );
    r.run(
        "verify",
        &[vv, "--json", "verify", "--read-data"],
        &[],
        &[],
        &[0],
    );
    let exported = sb.path().join("app.dump.sql");
    r.run(
        "export-dump",
        &[
            vv,
            "export-dump",
            &dump_id,
            "--output",
            exported.to_str().unwrap(),
            "--format",
            "plain",
        ],
        &[],
        &[],
        &[0],
    );
    r.run("pin", &[vv, "--json", "pin", &dump_id], &[], &[], &[0]);
    r.run("unpin", &[vv, "unpin", &dump_id], &[], &[], &[0]);
    r.run(
        "repo prune --dry-run",
        &[vv, "--json", "repo", "prune", "--dry-run"],
        &[],
        &[],
        &[0],
    );
    // systemd only: cron(8) cannot express the daemon's every-2-seconds schedule (exit 2).
    r.run(
        "generate systemd",
        &[vv, "generate", "systemd", "--mode", "jobs"],
        &[],
        &[],
        &[0],
    );
    let spool = sb.path().join("spool");
    if seg_path.exists() {
        r.run(
            "archive-push (async)",
            &[
                vv,
                "archive-push",
                "--spool-dir",
                spool.to_str().unwrap(),
                seg_path.to_str().unwrap(),
            ],
            &[],
            &[],
            &[0],
        );
    }

    // ---- Retention on the local repository.
    r.run(
        "expire",
        &[vv, "--json", "expire", "--keep-last", "1"],
        &[],
        &[],
        &[0],
    );

    // ---- The daemon: a scheduled dump every 2 s, then /metrics, the dashboard and the API.
    let daemon_log = sb.path().join("daemon.stderr");
    let mut daemon = {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", sb.path())
            .env("PGKEEP_CONFIG", &main_cfg)
            .env("PGKEEP_HEALTH_FREE_SPACE_WARN", "1")
            .env("PGKEEP_HEALTH_FREE_SPACE_CRIT", "1")
            .envs(r.env.iter().map(|(k, v)| (k, v)))
            .current_dir(sb.path())
            .args(["-vv", "daemon"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&daemon_log).unwrap());
        cmd.spawn().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", daemon_port)).is_err() {
        if let Some(st) = daemon.try_wait().unwrap() {
            panic!(
                "the daemon exited ({st}):\n{}",
                std::fs::read_to_string(&daemon_log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the daemon does not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A scheduled dump ran and ended (its child pgkeep had every secret in its environment).
    let deadline = Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(&daemon_log)
        .unwrap_or_default()
        .contains("dump-main-app ended")
    {
        assert!(
            Instant::now() < deadline,
            "no scheduled dump ended within 90 s:\n{}",
            std::fs::read_to_string(&daemon_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for path in [
        "/",
        "/index.html",
        "/metrics",
        "/healthz",
        "/api/status",
        "/api/history",
        "/api/backups",
        "/api/schedules",
        "/api/wal-lag",
        "/api/clusters",
    ] {
        let (code, body) = http_get(daemon_port, path, "ops", &sec.daemon.value);
        assert!(
            code == 200 || (path == "/healthz" && code == 503),
            "GET {path}: {code}\n{body}"
        );
        r.keep(format!("daemon GET {path}"), body);
    }
    let (code, _) = http_get(daemon_port, "/metrics", "ops", "not-the-password");
    assert_eq!(code, 401, "the daemon password is really checked");
    let st = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(90);
    let st = loop {
        if let Some(st) = daemon.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let daemon_err = std::fs::read(&daemon_log).unwrap();
    assert_eq!(
        st.code(),
        Some(0),
        "daemon:\n{}",
        String::from_utf8_lossy(&daemon_err)
    );

    // A last history of the local repository (the daemon's dumps, the failures).
    r.run(
        "history (after)",
        &[vv, "--json", "history"],
        &[],
        &[],
        &[0],
    );

    // ---- Everything is done: stop sampling, then search.
    switch_and_wait(&c);
    let sampled = sampler.finish();
    let mut found = Vec::new();
    for (what, bytes) in &r.outputs {
        leaks_in(&canaries, what, bytes, &mut found);
    }
    // Every file pgkeep wrote on this host, the repository included (skipping only where
    // this test put the secrets on purpose).
    let files = canary::files_under(sb.path(), std::slice::from_ref(&secrets_dir));
    assert!(
        files.len() > 100,
        "the sandbox holds the repository and restored data"
    );
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        leaks_in(&canaries, &f.display().to_string(), &bytes, &mut found);
    }
    let server_log = std::fs::read(c.log_path()).unwrap();
    leaks_in(&canaries, "PostgreSQL server log", &server_log, &mut found);
    // The object stores: every object, raw and decompressed.
    let mut objects = 0;
    for bucket in &s3.buckets {
        let store = pgkeep_storage::ObjectStoreStorage::new(s3.object_store(bucket), "", bucket);
        objects += scan_store(&canaries, &format!("s3://{bucket}"), &store, &mut found).await;
    }
    let az_store = azurite.storage_with_prefix("");
    objects += scan_store(&canaries, "az://", az_store.as_ref(), &mut found).await;
    assert!(
        objects > 20,
        "the object stores hold the copies and dumps ({objects})"
    );
    // What the receivers got: each channel's own secret only where its protocol puts it.
    let received = http.requests();
    assert!(
        received.iter().filter(|q| q.path == "/hook").count() >= 2,
        "the webhook got the test and failures"
    );
    for q in &received {
        let mut own = Vec::new();
        if q.path.starts_with("/services/") {
            own.push(sec.slack.name.clone());
        }
        if q.path == "/pd" {
            own.push(sec.pd.name.clone());
        }
        let others: Vec<Canary> = canaries
            .iter()
            .filter(|c| !own.contains(&c.name))
            .cloned()
            .collect();
        let mut bytes = format!("{} {}\n{:?}\n", q.method, q.path, q.headers).into_bytes();
        bytes.extend_from_slice(&q.body);
        leaks_in(
            &others,
            &format!(
                "request to {}",
                q.path.split('/').take(2).collect::<Vec<_>>().join("/")
            ),
            &bytes,
            &mut found,
        );
    }
    let mails = smtp.wait_for(1);
    assert!(!mails.is_empty(), "the e-mail channel received mail");
    for (i, m) in mails.iter().enumerate() {
        leaks_in(&canaries, &format!("mail {i}"), m.as_bytes(), &mut found);
    }
    for hit in &sampled.hits {
        found.push(format!("process list: {hit}"));
    }
    // The sampler really watched pgkeep and its children.
    // The sampler really watched this test's pgkeep runs and their children: pg_dump and
    // pg_restore, the archiver's archive-push, the drill's throwaway server, the daemon's jobs.
    let mut expected: Vec<String> = ["pgkeep", "pg_dump", "pg_restore", "postgres"]
        .map(String::from)
        .to_vec();
    for m in [
        "archive.toml archive-push",
        "scratch/pgkeep-drill-",
        "daemon-state/daemon-config.toml",
    ] {
        expected.push(format!("marker:{}", sb.path().join(m).display()));
    }
    for what in &expected {
        assert!(
            sampled.seen.contains_key(what),
            "the process sampler never saw {what} ({} passes; saw {:?})",
            sampled.samples,
            sampled.seen
        );
    }
    eprintln!(
        "{} runs in {:.0}s, {} outputs, {} files, {} objects, {} requests, {} mails, {} /proc passes",
        r.log.len(),
        t0.elapsed().as_secs_f64(),
        r.outputs.len(),
        files.len(),
        objects,
        received.len(),
        mails.len(),
        sampled.samples
    );
    assert!(
        found.is_empty(),
        "secrets leaked ({}):\n{}\n\nruns:\n{}",
        found.len(),
        found.join("\n"),
        r.log.join("\n")
    );
}

#[test]
fn secrets_on_the_command_line_are_refused_with_exit_2_and_never_echoed() {
    let sb = Sandbox::new();
    let secret = fresh("cmdline");
    let s = secret.value.as_str();
    let pg_kv = format!("host=127.0.0.1 port=5432 user=keeper password={s}");
    let pg_uri = format!("postgresql://keeper:{s}@127.0.0.1:5432/app");
    let s3_url = format!("s3://AKIAEXAMPLE:{s}@bucket/prefix");
    let az_sas = format!("az://container/prefix?sig={s}");
    let primary = format!("host=primary user=replicator password={s}");
    let target = sb.path().join("target");
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "backup --pg with a password",
            vec!["backup", "--pg", &pg_kv],
        ),
        (
            "dump --pg with a password (URI)",
            vec!["dump", "--pg", &pg_uri, "--db", "app"],
        ),
        (
            "restore-dump --pg with a password",
            vec!["restore-dump", "latest", "--pg", &pg_kv, "--target-db", "x"],
        ),
        (
            "drill --dump --pg with a password",
            vec!["drill", "--dump", "latest", "--db", "app", "--pg", &pg_kv],
        ),
        ("--repo with credentials", vec!["--repo", &s3_url, "list"]),
        (
            "--repo with a SAS signature",
            vec!["--repo", &az_sas, "list"],
        ),
        (
            "--primary-conninfo with a password",
            vec![
                "restore",
                "latest",
                "--target-dir",
                target.to_str().unwrap(),
                "--standby",
                "--primary-conninfo",
                &primary,
            ],
        ),
    ];
    for (what, args) in cases {
        let mut full = vec!["-vv"];
        full.extend(args.iter().copied());
        // The --repo cases name their own repository.
        let run = if full.contains(&"--repo") {
            sb.run(&full, &[])
        } else {
            sb.run_repo(&full, &[])
        };
        assert_eq!(
            run.code(),
            2,
            "{what}: exit code\n--- stdout\n{}\n--- stderr\n{}",
            run.stdout(),
            run.stderr()
        );
        for (stream, text) in [("stdout", run.stdout()), ("stderr", run.stderr())] {
            assert!(
                !text.contains(s),
                "{what}: {stream} echoes the secret:\n{text}"
            );
        }
        let err = run.stderr();
        assert!(
            err.contains("HINT") || err.contains("refus"),
            "{what}: the refusal says what to do instead:\n{err}"
        );
    }
    // The same through the environment (no process list, but still refused, not echoed).
    let run = sb.run_repo(&["backup"], &[("PGKEEP_PG", &pg_kv)]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(!run.stderr().contains(s), "{}", run.stderr());
    let run = sb.run(&["list"], &[("PGKEEP_REPO", &s3_url)]);
    assert_eq!(run.code(), 2, "{}", run.stderr());
    assert!(!run.stderr().contains(s), "{}", run.stderr());
}
