//! Flaky object storage (issue 18 item 4; RELIABILITY rows 6-10): the pgkeep binary talks to a
//! real SeaweedFS through `pgkeep_testing::fault_proxy`, which answers chosen requests with
//! 500 or 503 SlowDown, resets connections in the middle of a body, truncates responses,
//! answers CompleteMultipartUpload with 200 and an `<Error>` body, or stalls.
//!
//! Under `backup`, `restore`, `archive-push`, `archive-get` and `expire`, every run either
//! completes with identical data (the restored cluster's `pg_dumpall` equals the original's;
//! archive-get returns the segment's bytes) or fails with exit 1 and a message naming the
//! repository, within a bounded time; afterwards `repo check --read-data` passes, a failed
//! backup is not listed and the next run succeeds. Retries are bounded by the repository's
//! `retry_max_attempts` and `request_timeout_secs` (set small here) and reported: pgkeep's own
//! retries as a warning on stderr; the proxy counts what the store saw.

mod cli_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli_support::{Run, Sandbox};
use pgkeep_storage::{ObjectMeta, Storage};
use pgkeep_testing::cluster::first_difference;
use pgkeep_testing::fault_proxy::{Fault, FaultProxy, Kind, Match, Rule};
use pgkeep_testing::s3::{unique_prefix, S3Server};
use pgkeep_testing::Cluster;

const BIN: &str = env!("CARGO_BIN_EXE_pgkeep");
/// `request_timeout_secs` of the runs: what one stalled request may cost.
const REQUEST_TIMEOUT_SECS: u64 = 3;
/// `retry_max_attempts` of the runs.
const ATTEMPTS: u32 = 3;
/// The longest any single run may take, faults included. With the settings above a stalled
/// request costs at most 3 attempts (object_store's own, for idempotent requests) × 3
/// (pgkeep's) × 3 s plus backoff; a run that waited out a stall (600 s) would blow it.
const RUN_BOUND: Duration = Duration::from_secs(90);
/// A stall longer than any bounded run.
const LONG_STALL: Duration = Duration::from_secs(600);

/// A SeaweedFS server, the fault proxy in front of it and a sandbox whose configuration file
/// points an S3 repository at the proxy.
struct Rig {
    rt: tokio::runtime::Runtime,
    server: S3Server,
    proxy: FaultProxy,
    s: Sandbox,
    prefix: String,
    config: PathBuf,
}

impl Rig {
    fn new(label: &str) -> Rig {
        use std::os::unix::fs::PermissionsExt;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(S3Server::start()).unwrap();
        let proxy = FaultProxy::start(&server.endpoint).unwrap();
        let s = Sandbox::new();
        let prefix = unique_prefix(label);
        let config = s.path().join("s3.toml");
        std::fs::write(
            &config,
            format!(
                "[[repository]]\nname = \"s3\"\nurl = \"{}\"\nendpoint = \"{}\"\nregion = \"{}\"\n\
                 force_path_style = true\nallow_http = true\nretry_max_attempts = {ATTEMPTS}\n\
                 retry_base_delay_ms = 50\nrequest_timeout_secs = {REQUEST_TIMEOUT_SECS}\n\n\
                 [[cluster]]\nname = \"main\"\nrepository = \"s3\"\n",
                server.url(&prefix),
                proxy.endpoint(),
                server.region
            ),
        )
        .unwrap();
        // The server user runs archive-push / archive-get with this file.
        std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
        let rig = Rig {
            rt,
            server,
            proxy,
            s,
            prefix,
            config,
        };
        rig.run(&["repo", "init", "--no-encryption"]).expect(0);
        rig
    }

    /// `pgkeep ARGS` with the S3 configuration and credentials.
    fn run(&self, args: &[&str]) -> Run {
        let config = self.config.display().to_string();
        self.s.run(
            args,
            &[
                ("PGKEEP_CONFIG", config.as_str()),
                ("AWS_ACCESS_KEY_ID", self.server.access_key.as_str()),
                ("AWS_SECRET_ACCESS_KEY", self.server.secret_key.as_str()),
            ],
        )
    }

    /// [`Rig::run`], asserting it ended within [`RUN_BOUND`]; prints what the store saw.
    fn run_bounded(&self, what: &str, args: &[&str]) -> Run {
        self.proxy.reset_records();
        let t = Instant::now();
        let r = self.run(args);
        let took = t.elapsed();
        eprintln!(
            "{what}: exit {} in {took:.1?}; {} retry warning(s) from pgkeep; store saw {}",
            r.code(),
            retry_warnings(&r),
            self.proxy.summary()
        );
        if r.code() != 0 {
            for l in r
                .stderr()
                .lines()
                .filter(|l| l.contains("error") || l.contains("HINT"))
            {
                eprintln!("  {l}");
            }
        }
        assert!(
            took < RUN_BOUND,
            "{what} took {took:?} (bound {RUN_BOUND:?})\n{}",
            r.stderr()
        );
        assert!(
            !r.stderr().contains(&self.server.secret_key)
                && !r.stdout().contains(&self.server.secret_key),
            "{what}: the secret key shows in the output"
        );
        r
    }

    /// The pgkeep command line a PostgreSQL server runs (as `postgres`, whose environment
    /// has no credentials): `VAR=… pgkeep --config FILE`.
    fn shell_command(&self) -> String {
        format!(
            "AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} {BIN} --config {}",
            self.server.access_key,
            self.server.secret_key,
            self.config.display()
        )
    }

    /// The repository seen directly, without the proxy.
    fn direct(&self) -> Arc<dyn Storage> {
        self.server.storage_with_prefix(&self.prefix)
    }

    fn objects(&self) -> Vec<ObjectMeta> {
        self.rt.block_on(self.direct().list("")).unwrap()
    }

    /// The physical backups `list` shows.
    fn backups(&self) -> Vec<String> {
        let l = self.run(&["--json", "list"]).expect(0).json();
        l["backups"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["kind"] == "physical")
            .map(|b| b["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// `repo check --read-data` through the proxy (no faults left): exit 0, no problem; and
    /// no object of 0 bytes anywhere.
    fn check_clean(&self, after: &str) {
        self.proxy.clear();
        let r = self.run(&["--json", "repo", "check", "--read-data"]);
        assert_eq!(
            r.code(),
            0,
            "repo check --read-data after {after}:\n{}\n{}",
            r.stdout(),
            r.stderr()
        );
        assert_eq!(
            r.json()["problems"].as_array().map(|a| a.len()),
            Some(0),
            "after {after}: {}",
            r.stdout()
        );
        let empty: Vec<String> = self
            .objects()
            .into_iter()
            .filter(|o| o.size == 0)
            .map(|o| o.key)
            .collect();
        assert!(empty.is_empty(), "0-byte objects after {after}: {empty:?}");
    }

    /// The keys (below the prefix) of the objects whose every CompleteMultipartUpload the
    /// proxy answered with a fault.
    fn failed_completions(&self) -> Vec<String> {
        let marker = format!("/{}/", self.prefix);
        let key_of = |target: &str| {
            let path = target.split('?').next()?;
            let i = path.find(&marker)?;
            Some(path[i + marker.len()..].to_owned())
        };
        let records = self.proxy.records();
        let completes = || records.iter().filter(|r| r.kind == Kind::CompleteMultipart);
        let mut keys: Vec<String> = completes()
            .filter_map(|r| key_of(&r.target))
            .filter(|k| {
                completes()
                    .filter(|r| key_of(&r.target).as_ref() == Some(k))
                    .all(|r| r.fault.is_some())
            })
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    fn backup(&self, what: &str, c: &Cluster) -> Run {
        let pgdata = c.pgdata().display().to_string();
        self.run_bounded(
            what,
            &["backup", "--pgdata", &pgdata, "--pg", &c.conninfo()],
        )
    }

    /// `restore ID` into `dir` of the sandbox, through the proxy (with whatever script it has).
    fn restore(&self, what: &str, id: &str, dir: &str) -> Run {
        let target = self.s.path().join(dir);
        self.run_bounded(
            what,
            &["restore", id, "--target-dir", target.to_str().unwrap()],
        )
    }

    /// A successful [`Rig::restore`]; starts the copy and returns its `pg_dumpall`.
    fn restored_dump(&self, what: &str, id: &str, dir: &str) -> String {
        self.restore(what, id, dir).expect(0);
        self.dump_of_restored(dir)
    }

    /// Starts the copy restored into `dir` (with no faults left) and returns its `pg_dumpall`.
    fn dump_of_restored(&self, dir: &str) -> String {
        self.proxy.clear();
        let c = Cluster::builder()
            .restore_command(&format!("{} archive-get %f %p", self.shell_command()))
            .start_timeout(Duration::from_secs(120))
            .start_existing(&self.s.path().join(dir))
            .unwrap();
        c.pg_dumpall().unwrap()
    }
}

/// Lines in which pgkeep's retry layer reports a retry.
fn retry_warnings(r: &Run) -> usize {
    r.stderr()
        .lines()
        .filter(|l| l.contains("retrying in"))
        .count()
}

/// A cluster with two databases, a role and a template1 change, and ~24 MiB of incompressible
/// rows: one full 16 MiB pack at least, which goes up as a multipart upload of 8 MiB parts.
fn source_cluster(rows: u32) -> Cluster {
    let c = Cluster::builder()
        .setting("max_wal_size", "64MB")
        .start()
        .unwrap();
    c.sql("create role app login").unwrap();
    c.sql_db(
        "template1",
        "create table t1_marker(x int); insert into t1_marker values (1)",
    )
    .unwrap();
    c.sql("create database app owner app").unwrap();
    add_random_rows(&c, "r", rows);
    c.sql("checkpoint").unwrap();
    c
}

/// Table `name` of database `app` with `rows` rows of ~1 KiB of random bytes.
fn add_random_rows(c: &Cluster, name: &str, rows: u32) {
    c.sql_db(
        "app",
        &format!(
            "create table {name}(id int primary key, b bytea) with (autovacuum_enabled = off); \
             insert into {name} select g, (select decode(string_agg(md5(random()::text || x || g), ''), 'hex') \
             from generate_series(1, 63) x) from generate_series(1, {rows}) g"
        ),
    )
    .unwrap();
}

fn assert_same(what: &str, expected: &str, got: &str) {
    assert_eq!(first_difference(expected, got), None, "{what}");
}

/// A failed run: exit 1 and a message naming the repository.
fn assert_clear_failure(what: &str, r: &Run, rig: &Rig) {
    assert_eq!(
        r.code(),
        1,
        "{what}: expected exit 1\n--- stdout\n{}\n--- stderr\n{}",
        r.stdout(),
        r.stderr()
    );
    let location = rig.server.url(&rig.prefix);
    assert!(
        r.stderr().contains(&location),
        "{what}: the error does not name {location}:\n{}",
        r.stderr()
    );
}

#[test]
fn a_backup_through_503_slowdown_500_and_a_200_error_body_retries_succeeds_and_restores_identically(
) {
    let rig = Rig::new("faults-backup-5xx");
    let src = source_cluster(24_000);
    let dump = src.pg_dumpall().unwrap();

    // More 503s on one PUT than object_store's own 2 retries: pgkeep's retry layer takes over
    // (and says so). A 500 on a part, a SlowDown on the first read, and S3's late failure of
    // a CompleteMultipartUpload (200 with <Error><Code>InternalError</Code>), once.
    let put = rig.proxy.add(
        Rule::new(
            Match::kind(Kind::Put).target_contains("/index/"),
            Fault::slow_down(),
        )
        .times(3),
    );
    let part = rig
        .proxy
        .add(Rule::new(Match::kind(Kind::UploadPart), Fault::internal_error()).nth(2));
    let get = rig
        .proxy
        .add(Rule::new(Match::method("GET"), Fault::slow_down()));
    let complete = rig.proxy.add(Rule::new(
        Match::kind(Kind::CompleteMultipart),
        Fault::error_body_200("InternalError"),
    ));
    let r = rig.backup("backup under 5xx", &src).expect(0);
    for (name, id, n) in [
        ("PUT index 503", put, 3),
        ("part 500", part, 1),
        ("GET 503", get, 1),
        ("complete 200-with-error", complete, 1),
    ] {
        assert_eq!(
            rig.proxy.fired(id),
            n,
            "{name}: the fault did not happen as scripted"
        );
    }
    assert!(
        retry_warnings(&r) >= 1,
        "pgkeep did not report its retry of the index PUT:\n{}",
        r.stderr()
    );
    // Every fault was followed by a retry of the same request.
    assert!(rig.proxy.retries() >= 6, "{}", rig.proxy.summary());
    assert_eq!(rig.backups().len(), 1);
    // pgkeep's own retries (the index PUT's, past object_store's two) are in the run's record
    // and in the metric (RELIABILITY.md row 6).
    let h = rig
        .run(&["--json", "history", "--kind", "backup"])
        .expect(0)
        .json();
    let retried = h["records"].as_array().unwrap().last().unwrap()["storage_retries"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        retried >= 1,
        "no storage_retries in the backup's record: {h}"
    );
    let m = rig.run(&["metrics"]).expect(0).stdout();
    assert_eq!(
        cli_support::sample(
            &m,
            "pgkeep_storage_retries_total{cluster=\"main\",kind=\"backup\"}"
        ),
        retried as f64,
        "{m}"
    );
    rig.check_clean("a backup through 5xx");

    let restored = rig.restored_dump("restore", "latest", "restored");
    assert_same("the restored cluster", &dump, &restored);
}

#[test]
fn a_connection_reset_in_the_middle_of_a_part_is_retried_and_when_it_persists_the_backup_fails_unlisted(
) {
    let rig = Rig::new("faults-backup-reset");
    let src = source_cluster(24_000);
    let dump = src.pg_dumpall().unwrap();

    // Once: the part goes up again.
    let once = rig.proxy.add(Rule::new(
        Match::kind(Kind::UploadPart),
        Fault::ResetRequestBody,
    ));
    rig.backup("backup, one part reset mid-body", &src)
        .expect(0);
    assert_eq!(rig.proxy.fired(once), 1);
    assert_eq!(rig.backups().len(), 1);

    // Every time (row 8): the retries run out, the multipart uploads are aborted, the run
    // fails with exit 1 and lists nothing new; no object of the failed uploads is visible.
    // New incompressible data, so the backup has new packs to upload.
    add_random_rows(&src, "r2", 20_000);
    let dump2 = src.pg_dumpall().unwrap();
    let every = rig
        .proxy
        .add(Rule::new(Match::kind(Kind::UploadPart), Fault::ResetRequestBody).always());
    let r = rig.backup("backup, every part reset mid-body", &src);
    assert_clear_failure("backup with every part reset", &r, &rig);
    assert!(rig.proxy.fired(every) >= 2);
    let aborted = rig
        .proxy
        .records()
        .iter()
        .filter(|r| r.kind == Kind::AbortMultipart)
        .count();
    assert!(aborted >= 1, "no upload aborted: {}", rig.proxy.summary());
    let stored: Vec<String> = rig.objects().into_iter().map(|o| o.key).collect();
    for r in rig.proxy.records() {
        if r.kind == Kind::CreateMultipart {
            let key = r.target.split('?').next().unwrap();
            let key = &key[key.find(&rig.prefix).unwrap() + rig.prefix.len() + 1..];
            assert!(
                !stored.iter().any(|k| k == key),
                "{key}: the failed upload is visible"
            );
        }
    }
    assert_eq!(rig.backups().len(), 1, "the failed backup is listed");
    rig.check_clean("a backup that failed on resets");

    // The next run, with the store healthy again, succeeds; both backups restore.
    rig.backup("backup after the faults", &src).expect(0);
    let ids = rig.backups();
    assert_eq!(ids.len(), 2);
    assert_same(
        "the first backup",
        &dump,
        &rig.restored_dump("restore first", &ids[0], "first"),
    );
    assert_same(
        "the backup after the failure",
        &dump2,
        &rig.restored_dump("restore last", &ids[1], "last"),
    );
}

#[test]
fn complete_multipart_answering_200_with_an_error_fails_the_backup_and_the_object_is_not_visible() {
    let rig = Rig::new("faults-complete");
    let src = source_cluster(24_000);
    let dump = src.pg_dumpall().unwrap();

    // Row 9, as S3 does it: every CompleteMultipartUpload answers 200 with an InternalError
    // body (object_store retries those, then pgkeep does), and, in a second run, once with an
    // error object_store does not know (AccessDenied): both are failures, never success.
    for (code, rule) in [
        (
            "InternalError",
            Rule::new(
                Match::kind(Kind::CompleteMultipart),
                Fault::error_body_200("InternalError"),
            )
            .always(),
        ),
        (
            "AccessDenied",
            Rule::new(
                Match::kind(Kind::CompleteMultipart),
                Fault::error_body_200("AccessDenied"),
            ),
        ),
    ] {
        rig.proxy.clear();
        let id = rig.proxy.add(rule);
        let r = rig.backup(
            &format!("backup, CompleteMultipartUpload 200 with {code}"),
            &src,
        );
        assert_clear_failure(&format!("200 with {code}"), &r, &rig);
        assert!(rig.proxy.fired(id) >= 1);
        let failed = rig.failed_completions();
        assert!(!failed.is_empty(), "{}", rig.proxy.summary());
        for key in &failed {
            let head = rig.rt.block_on(rig.direct().head(key));
            assert!(
                head.is_err(),
                "{key}: visible although its completion failed ({code})"
            );
        }
        assert!(
            rig.backups().is_empty(),
            "a failed backup is listed ({code})"
        );
        rig.check_clean(&format!("CompleteMultipartUpload 200 with {code}"));
    }

    rig.backup("backup after the faults", &src).expect(0);
    assert_same(
        "the restored cluster",
        &dump,
        &rig.restored_dump("restore", "latest", "restored"),
    );
}

#[test]
fn truncated_and_reset_reads_during_a_restore_are_retried_and_the_restore_is_identical() {
    let rig = Rig::new("faults-restore");
    let src = source_cluster(24_000);
    let dump = src.pg_dumpall().unwrap();
    rig.backup("backup", &src).expect(0);

    // Row 10: the first pack read is cut short (full Content-Length, half the body, then a
    // clean close), the third is reset in the middle, the fifth gets a SlowDown.
    let packs = || Match::method("GET").target_contains("/packs/");
    let truncated = rig.proxy.add(Rule::new(packs(), Fault::Truncate));
    let reset = rig
        .proxy
        .add(Rule::new(packs(), Fault::ResetResponseBody).nth(3));
    let slow = rig.proxy.add(Rule::new(packs(), Fault::slow_down()).nth(5));
    rig.restore("restore through cut reads", "latest", "restored")
        .expect(0);
    for (name, id) in [("truncation", truncated), ("reset", reset), ("503", slow)] {
        assert_eq!(rig.proxy.fired(id), 1, "{name} did not happen");
    }
    assert!(rig.proxy.retries() >= 3, "{}", rig.proxy.summary());
    assert_same(
        "the restored cluster",
        &dump,
        &rig.dump_of_restored("restored"),
    );

    // Every pack read cut short: the restore fails, within the bound, naming the repository.
    rig.proxy.add(Rule::new(packs(), Fault::Truncate).always());
    let r = rig.restore("restore, every read cut", "latest", "failed");
    assert_clear_failure("restore with every read cut", &r, &rig);
    assert!(r.stderr().contains("packs/"), "{}", r.stderr());
    rig.check_clean("restores through cut reads");
}

/// The backup's run record counts, by method, exactly the requests the store received
/// (multipart steps, list pages and object_store's own retries included): what the user pays
/// for at a provider that bills per request.
#[test]
fn the_run_record_counts_every_request_the_store_received_by_method() {
    let rig = Rig::new("faults-requests");
    let src = source_cluster(24_000);
    // A retried part: the retry is a request the provider bills too.
    rig.proxy.add(Rule::new(
        Match::kind(Kind::UploadPart),
        Fault::internal_error(),
    ));
    rig.proxy.reset_records();
    rig.backup("backup", &src).expect(0);
    // The count is taken when the command ends. Recording comes after: it opens the
    // repository again (GET config, then the key list) and PUTs the record. Compare with
    // what the store received before that.
    let records = rig.proxy.records();
    let record_put = records
        .iter()
        .position(|r| r.method == "PUT" && r.target.contains("/history/"))
        .unwrap_or_else(|| panic!("no PUT of the run record among {records:#?}"));
    let recording = records[..record_put]
        .iter()
        .rposition(|r| r.method == "GET" && r.target.ends_with("/config"))
        .expect("the recording opened the repository");
    let mut seen = std::collections::BTreeMap::<String, u64>::new();
    for r in &records[..recording] {
        *seen.entry(r.method.clone()).or_default() += 1;
    }
    let h = rig
        .run(&["--json", "history", "--kind", "backup"])
        .expect(0)
        .json();
    let record = h["records"].as_array().unwrap().last().unwrap().clone();
    let counted: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(record["storage_requests"].clone())
            .unwrap_or_else(|e| panic!("no storage_requests in {record}: {e}"));
    assert_eq!(
        counted,
        seen,
        "{}\nthe recording's requests: {:#?}",
        rig.proxy.summary(),
        &records[recording..]
    );
    assert!(counted["PUT"] >= 3 && counted["POST"] >= 2, "{counted:?}");
    assert!(rig.proxy.retries() >= 1, "{}", rig.proxy.summary());
}

/// Writes a little, switches to a new WAL segment and returns the name of the one completed.
fn switch(c: &Cluster) -> String {
    c.sql("create table if not exists w(i int); insert into w select generate_series(1, 1000)")
        .unwrap();
    c.sql("select pg_walfile_name(pg_switch_wal())").unwrap()
}

/// (last archived WAL, failed count) of pg_stat_archiver.
fn archiver(c: &Cluster) -> (String, u64) {
    let row = c
        .sql("select coalesce(last_archived_wal, ''), failed_count from pg_stat_archiver")
        .unwrap();
    let (a, f) = row.split_once('|').unwrap();
    (a.to_owned(), f.parse().unwrap())
}

fn wait_for(what: &str, c: &Cluster, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < limit,
            "{what} not within {limit:?}:\n{}",
            c.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wal_objects(rig: &Rig, seg: &str) -> Vec<String> {
    rig.objects()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.contains(seg))
        .collect()
}

#[test]
fn a_stalled_wal_upload_ends_within_the_timeout_and_postgresql_gets_no_ack_until_it_is_stored() {
    let rig = Rig::new("faults-wal");
    let c = Cluster::builder()
        .archive_command(&format!("{} archive-push %p", rig.shell_command()))
        .start()
        .unwrap();
    let seg1 = switch(&c);
    wait_for(
        "the first segment archived",
        &c,
        Duration::from_secs(60),
        || archiver(&c).0 >= seg1,
    );
    assert_eq!(archiver(&c).1, 0, "{}", c.log_tail());

    // Every WAL PUT from now on stalls for 10 minutes: the server never gets them.
    let wal_puts = || Match::kind(Kind::Put).target_contains("/wal/main/0000000100000000/");
    let stall = rig
        .proxy
        .add(Rule::new(wal_puts(), Fault::Stall(LONG_STALL)).always());
    let seg2 = switch(&c);
    assert!(seg2 > seg1);
    let copy = rig.s.path().join(&seg2);
    std::fs::copy(c.pgdata().join("pg_wal").join(&seg2), &copy).unwrap();

    // A push of it by hand fails with exit 1 within the bound.
    let r = rig.run_bounded(
        "archive-push, PUT stalled",
        &["archive-push", copy.to_str().unwrap()],
    );
    assert_clear_failure("archive-push with the PUT stalled", &r, &rig);
    assert!(rig.proxy.fired(stall) >= 1);

    // PostgreSQL's own attempt fails too: the segment is not acknowledged, and not stored.
    wait_for("a failed archive attempt", &c, RUN_BOUND, || {
        archiver(&c).1 >= 1
    });
    assert!(
        archiver(&c).0 < seg2,
        "{seg2} acknowledged while its upload stalls"
    );
    assert_eq!(wal_objects(&rig, &seg2), Vec::<String>::new());

    // The store answers again: PostgreSQL's next attempt stores it.
    rig.proxy.clear();
    let seg3 = switch(&c);
    wait_for(
        "the stalled segment archived",
        &c,
        Duration::from_secs(120),
        || archiver(&c).0 >= seg3,
    );

    // The answer to a stored segment's PUT is lost (forwarded, then stalled): the retry
    // finds the identical object and the push succeeds, once, without a second copy.
    let lost = rig
        .proxy
        .add(Rule::new(wal_puts(), Fault::StallAfterForward(LONG_STALL)));
    let failed_before = archiver(&c).1;
    let seg4 = switch(&c);
    wait_for(
        "the segment whose ack was lost archived",
        &c,
        RUN_BOUND,
        || archiver(&c).0 >= seg4,
    );
    assert_eq!(rig.proxy.fired(lost), 1);
    assert_eq!(archiver(&c).1, failed_before, "{}", c.log_tail());

    // archive-get through a truncated and a reset read returns the exact bytes.
    let wal_get = || Match::method("GET").target_contains(&seg2);
    let t = rig.proxy.add(Rule::new(wal_get(), Fault::Truncate));
    let x = rig
        .proxy
        .add(Rule::new(wal_get(), Fault::ResetResponseBody).nth(2));
    let dest = rig.s.path().join("fetched");
    rig.run_bounded(
        "archive-get through cut reads",
        &["archive-get", &seg2, dest.to_str().unwrap()],
    )
    .expect(0);
    assert_eq!(rig.proxy.fired(t) + rig.proxy.fired(x), 2);
    assert!(
        std::fs::read(&dest).unwrap() == std::fs::read(&copy).unwrap(),
        "archive-get returned other bytes than the segment"
    );

    // archive-get with every read of it stalled: exit 1 within the bound, nothing written.
    rig.proxy
        .add(Rule::new(wal_get(), Fault::Stall(LONG_STALL)).always());
    let dest2 = rig.s.path().join("fetched2");
    let r = rig.run_bounded(
        "archive-get, GET stalled",
        &["archive-get", &seg2, dest2.to_str().unwrap()],
    );
    assert_clear_failure("archive-get with every GET stalled", &r, &rig);
    assert!(!dest2.exists(), "archive-get left a file behind");
    rig.check_clean("WAL faults");
}

#[test]
fn faults_during_expire_leave_a_repository_that_checks_clean_and_a_rerun_completes() {
    let rig = Rig::new("faults-expire");
    let src = source_cluster(2_000);
    for i in 0..3 {
        src.sql_db(
            "app",
            &format!("insert into r values ({}, 'x')", 1_000_000 + i),
        )
        .unwrap();
        rig.backup(&format!("backup {i}"), &src).expect(0);
    }
    let dump = src.pg_dumpall().unwrap();
    let ids = rig.backups();
    assert_eq!(ids.len(), 3);

    // object_store sends a single delete as DeleteObjects. Every DELETE answers 503: expire gives up, bounded, with exit 1.
    rig.proxy
        .add(Rule::new(Match::kind(Kind::DeleteObjects), Fault::slow_down()).always());
    let r = rig.run_bounded("expire, every DELETE 503", &["expire", "--keep-last", "1"]);
    assert_clear_failure("expire with every DELETE failing", &r, &rig);
    assert!(retry_warnings(&r) >= 1, "{}", r.stderr());
    rig.check_clean("expire with every DELETE failing");
    assert!(rig.backups().contains(&ids[2]));

    // A mix: a reset DELETE answer, a truncated listing, a stalled read.
    rig.proxy
        .add(Rule::new(Match::kind(Kind::DeleteObjects), Fault::ResetResponseBody).nth(2));
    rig.proxy
        .add(Rule::new(Match::kind(Kind::List), Fault::Truncate).nth(2));
    rig.proxy
        .add(Rule::new(Match::kind(Kind::Get), Fault::Stall(LONG_STALL)).nth(2));
    let r = rig.run_bounded("expire, mixed faults", &["expire", "--keep-last", "1"]);
    assert!(
        r.code() == 0 || r.code() == 1,
        "expire under mixed faults: exit {}\n{}",
        r.code(),
        r.stderr()
    );
    rig.check_clean("expire under mixed faults");

    // Healthy again: expire completes and the kept backup restores to its data.
    rig.run_bounded("expire, no faults", &["expire", "--keep-last", "1"])
        .expect(0);
    assert_eq!(rig.backups(), vec![ids[2].clone()]);
    rig.check_clean("the rerun of expire");
    assert_same(
        "the kept backup",
        &dump,
        &rig.restored_dump("restore the kept backup", &ids[2], "kept"),
    );
}
