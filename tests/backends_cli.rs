//! Every backend end to end through the built binary (issue 18, item 2): the same scenario on
//! local disk, SeaweedFS (S3) and Azurite (Azure), one test each.
//!
//! The repository is encrypted and reached as a user reaches it: a configuration file with
//! one `[[repository]]` (URL, endpoint, addressing, `passphrase_file`) and the credentials in
//! the environment only (see `cli_support/backends.rs`). The PostgreSQL 15 server archives
//! through `archive_command` = `pgkeep archive-push`, and the restored servers fetch WAL
//! through the `restore_command` that `pgkeep restore` writes. For each backend:
//!
//! - a base backup taken while pgbench writes, restored and replayed to the end of the
//!   archive, gives a server whose `pg_dumpall` equals the source's: several databases, roles
//!   with a membership and a grant, a change in template1, a tablespace holding a database
//!   (relocated by `--tablespace-map`); amcheck finds the restored indexes sound;
//! - `archive-get` of a segment the server pushed returns exactly the bytes of the segment
//!   in `pg_wal`;
//! - a restore with `--target-time` between two batches has every row committed before the
//!   time and none of those committed after it;
//! - `dump` and `restore-dump` of one database give a database whose `pg_dump` equals the
//!   source's;
//! - `repo check --read-data` exits 0 at the end.

#[path = "cli_support/backends.rs"]
mod backends;
mod cli_support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use backends::{chown_postgres, Repo, Store};
use cli_support::switch_and_wait;
use pgkeep_testing::cluster::first_difference;
use pgkeep_testing::Cluster;

/// Starts a restored data directory and waits until recovery ended with a promotion.
fn start_promoted(dir: &Path) -> Cluster {
    let c = Cluster::builder()
        .start_timeout(Duration::from_secs(180))
        .start_existing(dir)
        .unwrap();
    c.wait_until_promoted(Duration::from_secs(120)).unwrap();
    c
}

/// Row counts of `shop.events` per batch, `batch:count` in batch order.
fn batches(c: &Cluster) -> String {
    c.sql_db(
        "shop",
        "SELECT string_agg(batch || ':' || n, ' ' ORDER BY batch) FROM \
         (SELECT batch, count(*) n FROM events GROUP BY batch) s",
    )
    .unwrap()
}

fn scenario(store: Store) {
    let started = Instant::now();
    let name = store.name();
    let repo = Repo::new(&store, true);
    repo.init();
    let c = Cluster::builder()
        .archive_command(&repo.archive_command())
        // Keep the segments the server archived in pg_wal, to compare archive-get with them.
        .setting("wal_keep_size", "256MB")
        .start()
        .unwrap();
    let conninfo = c.conninfo();
    let pg = [("PGKEEP_PG", conninfo.as_str())];

    // A whole cluster: roles, a tablespace holding a database, several databases, template1
    // changed (the databases created afterwards inherit it), pgbench tables.
    let ts = c.scratch_dir("ts").unwrap();
    c.sql_db(
        "template1",
        "CREATE TABLE template_marker (note text); INSERT INTO template_marker VALUES ('from template1');
         COMMENT ON TABLE template_marker IS 'changed in template1';",
    )
    .unwrap();
    c.sql(&format!(
        "CREATE ROLE app LOGIN; CREATE ROLE reader NOLOGIN; GRANT reader TO app;
         CREATE TABLESPACE fast LOCATION '{}';
         CREATE DATABASE shop OWNER app; CREATE DATABASE stats TABLESPACE fast;",
        ts.display()
    ))
    .unwrap();
    c.sql_db(
        "shop",
        // No sequences: recovery leaves them up to 32 values ahead of the source.
        "CREATE TABLE events (id bigint PRIMARY KEY, batch int NOT NULL, payload text NOT NULL);
         ALTER TABLE events OWNER TO app; GRANT SELECT ON events TO reader;
         INSERT INTO events SELECT g, 0, md5(g::text) FROM generate_series(1, 2000) g;",
    )
    .unwrap();
    c.sql_db(
        "stats",
        "CREATE TABLE m (k int PRIMARY KEY, v float8);
         INSERT INTO m SELECT g, g / 7.0 FROM generate_series(1, 5000) g;",
    )
    .unwrap();
    c.pgbench(&["-i", "-s", "1", "-q"]).unwrap();

    // The base backup, taken while pgbench writes.
    let load = c
        .client_command("pgbench")
        .args(["-n", "-c", "2", "-T", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let b = repo
        .run(&["--json", "backup", "--pgdata", &pgdata], &pg)
        .expect(0)
        .json();
    let backup_id = b["id"].as_str().unwrap().to_string();
    let out = load.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pgbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Two batches on either side of a target time.
    let batch = |n: u32| {
        c.sql_db(
            "shop",
            &format!(
                "INSERT INTO events SELECT {n} * 10000 + g, {n}, md5(g::text) FROM generate_series(1, 1000) g"
            ),
        )
        .unwrap();
    };
    batch(1);
    let before_time = batches(&c);
    let time = c.sql("SELECT clock_timestamp()").unwrap();
    // The next commit is clearly after the target time.
    std::thread::sleep(Duration::from_millis(1100));
    batch(2);
    let seg = switch_and_wait(&c);
    // archive-get of a segment the server pushed: the bytes in pg_wal, exactly.
    let in_pg_wal = std::fs::read(c.pgdata().join("pg_wal").join(&seg)).unwrap();
    let fetched = repo.path().join("fetched");
    repo.run(&["archive-get", &seg, fetched.to_str().unwrap()], &[])
        .expect(0);
    let got = std::fs::read(&fetched).unwrap();
    assert!(
        got == in_pg_wal,
        "{name}: archive-get {seg} returned {} bytes that differ from pg_wal's {}",
        got.len(),
        in_pg_wal.len()
    );

    let source = c.pg_dumpall().unwrap();
    assert!(
        source.contains("CREATE ROLE app;")
            && source.contains("CREATE TABLESPACE fast")
            && source.contains("changed in template1")
            && source.contains("\\connect stats"),
        "the source has roles, the tablespace, template1's change and the databases"
    );
    assert_eq!(batches(&c), "0:2000 1:1000 2:1000", "the source's batches");

    // The base backup replayed to the end of the archive: the whole cluster as the source.
    let work = repo.path().join("restores");
    std::fs::create_dir_all(&work).unwrap();
    chown_postgres(&work);
    let restore = |dir: &Path, dir_ts: &Path, args: &[&str]| {
        let map = format!("{}={}", ts.display(), dir_ts.display());
        let mut all = vec![
            "restore",
            backup_id.as_str(),
            "--target-dir",
            dir.to_str().unwrap(),
            "--tablespace-map",
            &map,
        ];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--target-action", "promote"]);
        repo.run(&all, &[]).expect(0);
        repo.give_restored_server_credentials(dir);
    };
    let full = work.join("full");
    let full_ts = work.join("full_ts");
    restore(&full, &full_ts, &[]);
    let r = start_promoted(&full);
    let want = source.replace(ts.to_str().unwrap(), full_ts.to_str().unwrap());
    if let Some(d) = first_difference(&want, &r.pg_dumpall().unwrap()) {
        panic!(
            "{name}: pg_dumpall of the restore differs from the source's: {d}\nrestored log:\n{}",
            r.log_tail()
        );
    }
    // The restored indexes are sound (amcheck, with the heap checked against them).
    let checked = r
        .sql(
            "CREATE EXTENSION amcheck;
             SELECT count(bt_index_check(c.oid, true)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relpersistence = 'p'",
        )
        .unwrap();
    assert!(
        checked.parse::<u32>().unwrap() > 10,
        "amcheck checked {checked} indexes"
    );
    drop(r);

    // Point in time: the rows committed before the time, none of those after.
    let pitr = work.join("time");
    let pitr_ts = work.join("time_ts");
    restore(&pitr, &pitr_ts, &["--target-time", &time]);
    let r = start_promoted(&pitr);
    assert_eq!(
        batches(&r),
        before_time,
        "{name}: --target-time {time} restored the wrong rows"
    );
    assert_eq!(before_time, "0:2000 1:1000");
    drop(r);

    // A logical dump of one database, restored under another name: the same database.
    let d = repo
        .run(&["--json", "dump", "--db", "shop"], &pg)
        .expect(0)
        .json();
    let dump_id = d["id"].as_str().unwrap().to_string();
    repo.run(
        &[
            "restore-dump",
            &dump_id,
            "--target-db",
            "shop_copy",
            "--create",
        ],
        &pg,
    )
    .expect(0);
    let want = c.pg_dump("shop").unwrap();
    if let Some(d) = first_difference(&want, &c.pg_dump("shop_copy").unwrap()) {
        panic!("{name}: the restored dump differs from the database: {d}");
    }

    let l = repo.run(&["--json", "list"], &[]).expect(0).json();
    let ids: Vec<&str> = l["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [backup_id.as_str(), dump_id.as_str()], "{l}");
    repo.run(&["repo", "check", "--read-data"], &[]).expect(0);
    eprintln!(
        "{name}: scenario passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(c);
    drop(store);
}

#[test]
fn local_disk_backup_restore_wal_pitr_and_dump_through_the_binary() {
    scenario(Store::local());
}

#[test]
fn s3_seaweedfs_backup_restore_wal_pitr_and_dump_through_the_binary() {
    scenario(Store::s3());
}

#[test]
fn azure_azurite_backup_restore_wal_pitr_and_dump_through_the_binary() {
    scenario(Store::azure());
}

/// A repository given by the environment alone (`PGKEEP_REPO`, `PGKEEP_REPO_ENDPOINT`,
/// `PGKEEP_REPO_ALLOW_HTTP`, `PGKEEP_REPO_AZURE_ACCOUNT`, no configuration file), restored
/// onto a server whose environment holds only the Azure key (a fresh host): the
/// `restore_command` that `pgkeep restore` writes must carry the repository's settings, or
/// archive-get asks Azure's public endpoint, every fetch fails and the server promotes at the
/// backup's end without the WAL archived after it.
#[test]
fn restore_command_carries_repository_settings_given_by_environment_on_azure() {
    use std::os::unix::fs::PermissionsExt;
    let store = Store::azure();
    let Store::Azure(az) = &store else {
        unreachable!()
    };
    let s = cli_support::Sandbox::new();
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(
        s.path().join("empty.toml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let url = format!(
        "az://{}/{}",
        az.container,
        pgkeep_testing::s3::unique_prefix("env")
    );
    let creds = [("AZURE_STORAGE_ACCOUNT_KEY", az.account_key.as_str())];
    let settings = [
        ("PGKEEP_REPO", url.as_str()),
        ("PGKEEP_REPO_ENDPOINT", az.endpoint.as_str()),
        ("PGKEEP_REPO_ALLOW_HTTP", "true"),
        ("PGKEEP_REPO_AZURE_ACCOUNT", az.account.as_str()),
    ];
    let all: Vec<(&str, &str)> = creds.iter().chain(settings.iter()).copied().collect();
    // An environment wrapper for the server: `vars` exported, then the binary.
    let wrapper = |name: &str, vars: &[(&str, &str)]| {
        let p = s.path().join(name);
        let mut script = String::from("#!/bin/sh\n");
        for (k, v) in vars {
            script.push_str(&format!("export {k}='{v}'\n"));
        }
        script.push_str(&format!("exec '{}' \"$@\"\n", backends::BIN));
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        chown_postgres(&p);
        p
    };
    let archiver = wrapper("archiver", &all);
    let fresh_host = wrapper("fresh-host", &creds);

    s.run(&["repo", "init", "--no-encryption"], &all).expect(0);
    let c = Cluster::builder()
        .archive_command(&format!(
            "{} --config {} archive-push %p",
            archiver.display(),
            s.path().join("empty.toml").display()
        ))
        .start()
        .unwrap();
    c.sql("CREATE TABLE t (id int PRIMARY KEY)").unwrap();
    let conninfo = c.conninfo();
    let mut with_pg = all.clone();
    with_pg.push(("PGKEEP_PG", conninfo.as_str()));
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    s.run(&["-q", "backup", "--pgdata", &pgdata], &with_pg)
        .expect(0);
    // Rows that only the archive holds.
    c.sql("INSERT INTO t SELECT generate_series(1, 500)")
        .unwrap();
    switch_and_wait(&c);

    let dir = s.path().join("restored");
    s.run(
        &[
            "-q",
            "restore",
            "latest",
            "--target-dir",
            dir.to_str().unwrap(),
            "--target-action",
            "promote",
        ],
        &all,
    )
    .expect(0);
    let auto = dir.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto).unwrap();
    assert!(!text.contains(&az.account_key), "a secret in {text}");
    std::fs::write(
        &auto,
        text.replace(backends::BIN, &fresh_host.display().to_string()),
    )
    .unwrap();
    let r = start_promoted(&dir);
    assert_eq!(
        r.sql("SELECT count(*) FROM t").unwrap(),
        "500",
        "the restored server did not replay the archive; restore_command:\n{}\nlog:\n{}",
        text.lines()
            .filter(|l| l.starts_with("restore_command"))
            .collect::<Vec<_>>()
            .join("\n"),
        r.log_tail()
    );
}
