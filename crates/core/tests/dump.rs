//! Logical dumps of real PostgreSQL 15 clusters (pgkeep_testing::Cluster) into a repository in
//! a temporary directory, and back.
//!
//! What a user relies on: dump then restore into a new database gives the very same schema and
//! contents (piped, and with parallel jobs through a temporary file); row counts recorded in the
//! dump's own snapshot match the restored tables even when the dump ran under write load; the
//! same unchanged database dumped twice stores almost nothing new; an exported file is a
//! standard pg_dump archive; a pg_dump that fails (missing database, permission denied, server
//! stopped mid-way) leaves no dump; restoring over a database holding objects is refused
//! without --force (exit 2) or while it is in use (exit 1), and with --force takes a safety dump
//! that restores to what was replaced; `--all` brings roles and every database into a fresh
//! cluster.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgkeep_core::commands::dump::{dump, load_dump, DumpOptions, SAFETY_LABEL};
use pgkeep_core::commands::export_dump::{export_dump, ExportDumpOptions, ExportFormat};
use pgkeep_core::commands::list::{info, list, InfoOptions, ListOptions};
use pgkeep_core::commands::restore_dump::{restore_dump, RestoreDumpOptions};
use pgkeep_core::progress::{NoProgress, Progress};
use pgkeep_core::Report;
use pgkeep_repo::{InitOptions, Repository};
use pgkeep_storage::{LocalStorage, Storage};
use pgkeep_testing::cluster::{first_difference, strip_restrict_lines, PG_BIN_DIR};
use pgkeep_testing::Cluster;

type TestResult = anyhow::Result<()>;

async fn local_repo(dir: &Path) -> Repository {
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(dir).unwrap());
    Repository::init(storage, InitOptions::default())
        .await
        .unwrap()
}

fn dump_opts(c: &Cluster, db: &str) -> DumpOptions {
    DumpOptions {
        cluster: "main".into(),
        conninfo: Some(c.conninfo()),
        db: Some(db.into()),
        label: Some("daily".into()),
        ..DumpOptions::default()
    }
}

fn restore_opts(c: &Cluster, id: &str, target: &str) -> RestoreDumpOptions {
    RestoreDumpOptions {
        cluster: "main".into(),
        id: id.into(),
        conninfo: Some(c.conninfo()),
        target_db: Some(target.into()),
        ..RestoreDumpOptions::default()
    }
}

/// `pg_dump` of one database with extra arguments, `\restrict` lines removed.
fn pg_dump_text(c: &Cluster, db: &str, args: &[&str]) -> String {
    let out = c
        .client_command("pg_dump")
        .args(["--no-sync", "-d", db])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    strip_restrict_lines(&String::from_utf8(out.stdout).unwrap())
}

fn assert_same_db(a: &Cluster, db_a: &str, b: &Cluster, db_b: &str) {
    let (sa, sb) = (
        pg_dump_text(a, db_a, &["--schema-only"]),
        pg_dump_text(b, db_b, &["--schema-only"]),
    );
    assert!(sa.contains("CREATE TABLE"), "{sa}");
    if let Some(d) = first_difference(&sa, &sb) {
        panic!("schema of {db_a} and {db_b} differ: {d}");
    }
    let (da, db) = (a.pg_dump(db_a).unwrap(), b.pg_dump(db_b).unwrap());
    if let Some(d) = first_difference(&da, &db) {
        panic!("contents of {db_a} and {db_b} differ: {d}");
    }
}

/// Everything about database `db` that is not its contents, names instead of oids, in a
/// stable order: owner, encoding, LC_COLLATE, LC_CTYPE, locale provider and ICU locale,
/// connection limit, template flag, comment, privileges (grantor>grantee:privilege, `*` for
/// the grant option) and settings (the database's `*`, then per role).
fn db_properties(c: &Cluster, db: &str) -> String {
    let sql = format!(
        "SELECT concat_ws(' | ', pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding),
            d.datcollate, d.datctype, d.datlocprovider, coalesce(d.daticulocale, '-'),
            d.datconnlimit, d.datistemplate, coalesce(shobj_description(d.oid, 'pg_database'), '-'),
            coalesce((SELECT string_agg(x, ',' ORDER BY x) FROM (
                SELECT format('%s>%s:%s%s', pg_get_userbyid(a.grantor),
                    CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END,
                    a.privilege_type, CASE WHEN a.is_grantable THEN '*' ELSE '' END) AS x
                FROM aclexplode(d.datacl) a) q), 'default'),
            coalesce((SELECT string_agg(x, ',' ORDER BY x) FROM (
                SELECT format('%s:%s', coalesce(r.rolname, '*'), array_to_string(s.setconfig, ';')) AS x
                FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole
                WHERE s.setdatabase = d.oid) q), 'no settings'))
         FROM pg_database d WHERE d.datname = '{db}'"
    );
    let out = c.sql(&sql).unwrap();
    assert!(!out.is_empty(), "no database {db}");
    out
}

fn count_dumps(v: &[pgkeep_core::commands::list::BackupSummary]) -> usize {
    v.iter().filter(|b| b.kind == "dump").count()
}

/// A database with a bit of everything: quoted names, a sequence, a view, an index, a
/// function, a trigger, NULLs, bytea and a 100k-row table.
fn make_shop(c: &Cluster, db: &str) {
    // Not the cluster's locale (C): a restore must keep the database's own.
    c.sql(&format!(
        "CREATE DATABASE {db} TEMPLATE template0 LOCALE 'C.utf8'"
    ))
    .unwrap();
    c.sql_db(
        db,
        r#"
        CREATE SCHEMA sales;
        CREATE TABLE sales.orders (id bigserial PRIMARY KEY, customer int NOT NULL, total numeric(12,2),
            note text, created timestamptz NOT NULL DEFAULT '2026-01-01');
        INSERT INTO sales.orders (customer, total, note)
            SELECT g % 997, (g * 1.37)::numeric(12,2), CASE WHEN g % 10 = 0 THEN NULL ELSE md5(g::text) END
            FROM generate_series(1, 100000) g;
        CREATE INDEX orders_customer ON sales.orders (customer);
        CREATE TABLE public."Odd ""Name""" (k text PRIMARY KEY, v bytea);
        INSERT INTO public."Odd ""Name""" VALUES ('a', '\x00ff'), ('b', NULL);
        CREATE TABLE public.empty_one (x int);
        CREATE VIEW sales.big_customers AS SELECT customer, sum(total) FROM sales.orders GROUP BY 1;
        CREATE FUNCTION sales.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.created := now(); RETURN NEW; END $$;
        CREATE TRIGGER orders_touch BEFORE UPDATE ON sales.orders FOR EACH ROW EXECUTE FUNCTION sales.touch();
        "#,
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_restore_export_and_dedup() -> TestResult {
    let t0 = Instant::now();
    let c = Cluster::new()?;
    make_shop(&c, "shop");
    // What the database is besides its contents (pg_restore applies none of it without
    // --create, and with --create only under the original name).
    c.sql(
        "CREATE ROLE shop_owner LOGIN; CREATE ROLE shop_reader LOGIN;
         ALTER DATABASE shop OWNER TO shop_owner;
         REVOKE CONNECT, TEMPORARY ON DATABASE shop FROM PUBLIC;
         GRANT CONNECT ON DATABASE shop TO shop_reader;
         COMMENT ON DATABASE shop IS 'the shop''s orders';
         ALTER DATABASE shop CONNECTION LIMIT 50;
         ALTER DATABASE shop SET work_mem = '7MB';
         ALTER DATABASE shop SET search_path = sales, \"my schema\", public;
         ALTER DATABASE shop SET app.api_key = 'CANARY-SECRET-42';
         ALTER ROLE shop_reader IN DATABASE shop SET statement_timeout = '5s';",
    )?;
    let shop_props = db_properties(&c, "shop");
    assert!(
        shop_props.starts_with(
            "shop_owner | UTF8 | C.utf8 | C.utf8 | c | - | 50 | f | the shop's orders"
        ),
        "{shop_props}"
    );
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;

    let r1 = dump(&repo, &dump_opts(&c, "shop"), &NoProgress).await?;
    assert_eq!(r1.exit_code(), 0, "{r1}");
    let m = load_dump(&repo, "main", "latest").await?;
    assert_eq!(m.id, r1.id);
    assert_eq!(m.kind, "dump");
    assert_eq!(m.label.as_deref(), Some("daily"));
    assert!(
        m.pg_dump_version.contains("PostgreSQL"),
        "{}",
        m.pg_dump_version
    );
    assert!(m.server_version_num >= 150000);
    let d = &m.databases[0];
    assert_eq!(d.name, "shop");
    assert!(d.counts_in_dump_snapshot);
    assert!(
        d.database_bytes > 1_000_000 && d.dump_bytes > 1_000_000,
        "{d:?}"
    );
    let orders = d.tables.iter().find(|t| t.table == "orders").unwrap();
    assert_eq!(
        (orders.schema.as_str(), orders.rows, orders.exact),
        ("sales", Some(100_000), true)
    );
    assert_eq!(d.tables.len(), 3, "{:?}", d.tables);
    // The manifest holds no connection string.
    let raw = serde_json::to_string(&repo.load_manifest("main", &m.id).await?)?;
    assert!(
        !raw.contains(&c.socket_dir().display().to_string()),
        "{raw}"
    );
    // Nor a setting's value (it may be a secret): those are in a sealed stream.
    assert!(!raw.contains("CANARY-SECRET-42"), "{raw}");
    assert!(d.properties.is_some(), "{raw}");

    // The same unchanged database again: almost nothing new.
    let r2 = dump(&repo, &dump_opts(&c, "shop"), &NoProgress).await?;
    assert!(
        r2.totals.new_bytes <= 64 * 1024,
        "second dump stored {} new bytes, first {}",
        r2.totals.new_bytes,
        r1.totals.new_bytes
    );
    eprintln!(
        "dump 1: {} archive bytes, {} new; dump 2: {} new",
        r1.totals.logical_bytes, r1.totals.new_bytes, r2.totals.new_bytes
    );

    // list and info show the dumps.
    let l = list(
        &repo,
        &ListOptions {
            cluster: "main".into(),
        },
    )
    .await?;
    assert_eq!(count_dumps(&l.backups), 2);
    assert!(l.backups.iter().all(|b| b.logical_bytes.is_some()), "{l}");
    let i = info(
        &repo,
        &InfoOptions {
            cluster: "main".into(),
            id: r1.id.clone(),
        },
    )
    .await?;
    assert_eq!(i.backup.kind, "dump");
    let details = i.dump.as_ref().expect("dump details in info");
    assert_eq!(details.databases[0].tables.len(), 3);
    assert!(i.to_string().contains("sales.orders: 100000 rows"), "{i}");

    // Restore through a pipe into a new database.
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            ..restore_opts(&c, &r1.id, "shop_copy")
        },
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.exit_code(), 0, "{rr}");
    let rd = &rr.databases[0];
    assert!(
        rd.created && !rd.temp_file && rd.safety_dump.is_none(),
        "{rr}"
    );
    assert_eq!(rd.tables_checked, 3);
    assert!(rd.row_differences.is_empty(), "{rr}");
    assert_same_db(&c, "shop", &c, "shop_copy");
    // Under its new name, the same owner, encoding, locale, privileges, settings (the role's
    // in this database too) and comment; the report names the setting, never its value.
    assert_eq!(db_properties(&c, "shop_copy"), shop_props);
    let text = rr.to_string();
    assert!(
        text.contains("database properties: owner shop_owner") && text.contains("app.api_key"),
        "{text}"
    );
    assert!(
        !text.contains("CANARY-SECRET-42")
            && !serde_json::to_string(&rr)?.contains("CANARY-SECRET-42"),
        "{text}"
    );

    // Parallel restore goes through a 0600 temporary file that is gone afterwards.
    let tmp = tempfile::tempdir()?;
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            jobs: 2,
            temp_dir: Some(tmp.path().to_path_buf()),
            ..restore_opts(&c, "latest", "shop_par")
        },
        &NoProgress,
    )
    .await?;
    assert!(rr.databases[0].temp_file, "{rr}");
    assert_eq!(std::fs::read_dir(tmp.path())?.count(), 0);
    assert_same_db(&c, "shop", &c, "shop_par");
    assert_eq!(db_properties(&c, "shop_par"), shop_props);

    // --clean --force over a database holding changed rows brings it back to the dump.
    c.sql_db("shop_copy", "DELETE FROM sales.orders WHERE id <= 10")?;
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            clean: true,
            force: true,
            no_safety_dump: true,
            ..restore_opts(&c, &r1.id, "shop_copy")
        },
        &NoProgress,
    )
    .await?;
    assert!(rr.databases[0].row_differences.is_empty(), "{rr}");
    assert_same_db(&c, "shop", &c, "shop_copy");

    // Dry run: says what it would do, changes nothing.
    c.sql_db("shop_copy", "CREATE TABLE marker (x int)")?;
    let before = c.pg_dump("shop_copy")?;
    let dry = restore_dump(
        &repo,
        &RestoreDumpOptions {
            clean: true,
            dry_run: true,
            ..restore_opts(&c, "latest", "shop_copy")
        },
        &NoProgress,
    )
    .await?;
    let text = dry.to_string();
    assert!(dry.dry_run && text.contains("DRY RUN"), "{text}");
    let dd = &dry.databases[0];
    assert_eq!(
        dd.objects.get("TABLE").copied(),
        Some(3),
        "{:?}",
        dd.objects
    );
    assert_eq!(
        dd.objects.get("TABLE DATA").copied(),
        Some(3),
        "{:?}",
        dd.objects
    );
    assert!(
        dd.checks.iter().any(|c| c.contains("safety dump")),
        "{text}"
    );
    assert!(
        dd.checks.iter().any(|c| c.contains("confirmation")),
        "{text}"
    );
    assert_eq!(c.pg_dump("shop_copy")?, before);
    let l = list(
        &repo,
        &ListOptions {
            cluster: "main".into(),
        },
    )
    .await?;
    assert_eq!(count_dumps(&l.backups), 2, "a dry run took a safety dump");

    // Export: the custom file is a standard archive pg_restore accepts; plain is SQL; 0600.
    let out = tempfile::tempdir()?;
    let custom = out.path().join("shop.dump");
    let e = export_dump(
        &repo,
        &ExportDumpOptions {
            cluster: "main".into(),
            id: "latest".into(),
            output: custom.clone(),
            ..ExportDumpOptions::default()
        },
        &NoProgress,
    )
    .await?;
    assert_eq!(e.bytes, m.databases[0].dump_bytes);
    assert_eq!(
        std::fs::metadata(&custom)?.permissions().mode() & 0o777,
        0o600
    );
    c.sql("CREATE DATABASE shop_from_file")?;
    let st = c
        .client_command("pg_restore")
        .args(["--exit-on-error", "-d", "shop_from_file"])
        .arg(&custom)
        .status()?;
    assert!(st.success());
    assert_same_db(&c, "shop", &c, "shop_from_file");
    let plain = out.path().join("shop.sql");
    export_dump(
        &repo,
        &ExportDumpOptions {
            cluster: "main".into(),
            id: r1.id.clone(),
            output: plain.clone(),
            format: ExportFormat::Plain,
            db: None,
        },
        &NoProgress,
    )
    .await?;
    let sql = std::fs::read_to_string(&plain)?;
    assert!(
        sql.contains("CREATE TABLE sales.orders"),
        "{}",
        &sql[..sql.len().min(500)]
    );
    assert_eq!(
        std::fs::metadata(&plain)?.permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_dir(out.path())?.count(),
        2,
        "temporary files left behind"
    );
    eprintln!(
        "dump_restore_export_and_dedup: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Counts bytes, and fires once when `trigger_at` bytes went by.
struct Trip {
    bytes: AtomicU64,
    trigger_at: u64,
    fired: AtomicBool,
    pid: i32,
}

impl Progress for Trip {
    fn advance(&self, bytes: u64, _: u64) {
        let n = self.bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if n >= self.trigger_at && !self.fired.swap(true, Ordering::SeqCst) {
            // SAFETY: kill(2) on our own test server's postmaster: an immediate shutdown.
            unsafe {
                libc::kill(self.pid, libc::SIGQUIT);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pg_dump_leaves_no_dump() -> TestResult {
    let t0 = Instant::now();
    let mut c = Cluster::new()?;
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;

    // A database that does not exist.
    let e = dump(&repo, &dump_opts(&c, "nosuchdb"), &NoProgress)
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("nosuchdb") && msg.contains("does not exist"),
        "{msg}"
    );
    assert_eq!(e.exit_code(), 1);

    // Permission denied on one table: pg_dump's own message, naming the database.
    c.sql("CREATE ROLE reader LOGIN; CREATE DATABASE locked; ")?;
    c.sql_db("locked", "CREATE TABLE secret (x int); INSERT INTO secret VALUES (1); REVOKE ALL ON secret FROM PUBLIC;")?;
    let mut o = dump_opts(&c, "locked");
    o.conninfo = Some(c.conninfo().replace("user=postgres", "user=reader"));
    let e = dump(&repo, &o, &NoProgress).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("permission denied") && msg.contains("locked") && msg.contains("pg_dump"),
        "{msg}"
    );

    // Server stopped in the middle of a dump of ~150 MB.
    c.sql("CREATE DATABASE big")?;
    c.sql_db(
        "big",
        "CREATE TABLE t AS SELECT g, repeat(md5(g::text), 4) AS pad FROM generate_series(1, 1000000) g",
    )?;
    let l = list(
        &repo,
        &ListOptions {
            cluster: "main".into(),
        },
    )
    .await?;
    assert_eq!(count_dumps(&l.backups), 0);
    let pid: i32 = std::fs::read_to_string(c.pgdata().join("postmaster.pid"))?
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()?;
    let trip = Trip {
        bytes: AtomicU64::new(0),
        trigger_at: 8 << 20,
        fired: AtomicBool::new(false),
        pid,
    };
    let e = dump(&repo, &dump_opts(&c, "big"), &trip).await.unwrap_err();
    assert!(
        trip.fired.load(Ordering::SeqCst),
        "the server was not stopped during the dump"
    );
    let msg = e.to_string();
    assert!(msg.contains("\"big\"") && msg.contains("pg_dump"), "{msg}");
    eprintln!(
        "server stopped after {} bytes: {msg}",
        trip.bytes.load(Ordering::SeqCst)
    );
    let _ = c.stop_mode(pgkeep_testing::StopMode::Immediate);
    let l = list(
        &repo,
        &ListOptions {
            cluster: "main".into(),
        },
    )
    .await?;
    assert_eq!(count_dumps(&l.backups), 0, "{l}");
    // The repository is still sound, and the next run works.
    c.start()?;
    let r = dump(&repo, &dump_opts(&c, "big"), &NoProgress).await?;
    assert!(r.databases[0].dump_bytes > 100_000_000, "{r}");
    let check = repo
        .check(pgkeep_repo::CheckOptions { read_data: false })
        .await?;
    assert!(check.is_ok(), "{:?}", check.problems);
    eprintln!(
        "failed_pg_dump_leaves_no_dump: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_dump_is_taken_and_restorable() -> TestResult {
    let t0 = Instant::now();
    let c = Cluster::new()?;
    make_shop(&c, "app");
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;
    let first = dump(&repo, &dump_opts(&c, "app"), &NoProgress).await?;
    let state_a = c.pg_dump("app")?;
    c.sql_db("app", "INSERT INTO sales.orders (customer, total) SELECT 1, 2 FROM generate_series(1, 500); DELETE FROM public.\"Odd \"\"Name\"\"\" WHERE k = 'b'")?;
    let state_b = c.pg_dump("app")?;
    assert_ne!(state_a, state_b);

    // Not on a terminal, no --force: refused with exit 2, nothing changed, no dump taken.
    let e = restore_dump(
        &repo,
        &RestoreDumpOptions {
            clean: true,
            ..restore_opts(&c, &first.id, "app")
        },
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    assert!(e.to_string().contains("--force"), "{e}");
    assert_eq!(c.pg_dump("app")?, state_b);

    // In use: refused (exit 1) without --force even when confirmed.
    let params = pgkeep_pg::ConnParams::resolve(Some(&c.conninfo_db("app")))?;
    let session = pgkeep_pg::PgClient::connect(&params).await?;
    let e = restore_dump(
        &repo,
        &RestoreDumpOptions {
            clean: true,
            interactive: true,
            ..restore_opts(&c, &first.id, "app")
        },
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert_eq!(e.exit_code(), 1, "{e}");
    assert!(e.to_string().contains("in use"), "{e}");
    let l = list(
        &repo,
        &ListOptions {
            cluster: "main".into(),
        },
    )
    .await?;
    assert_eq!(count_dumps(&l.backups), 1);

    // --force: safety dump first, the session is terminated, the target is state A again.
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            clean: true,
            force: true,
            ..restore_opts(&c, &first.id, "app")
        },
        &NoProgress,
    )
    .await?;
    let d = &rr.databases[0];
    assert_eq!(d.sessions_terminated, 1, "{rr}");
    assert!(d.row_differences.is_empty(), "{rr}");
    let safety_id = d.safety_dump.clone().expect("a safety dump");
    assert!(
        session.inner().simple_query("SELECT 1").await.is_err(),
        "session survived"
    );
    if let Some(diff) = first_difference(&state_a, &c.pg_dump("app")?) {
        panic!("restored app differs from the dump: {diff}");
    }
    let safety = load_dump(&repo, "main", &safety_id).await?;
    assert_eq!(safety.label.as_deref(), Some(SAFETY_LABEL));
    // `latest` is now the safety dump; it restores to what was replaced.
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            ..restore_opts(&c, "latest", "app_before")
        },
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.id, safety_id);
    if let Some(diff) = first_difference(&state_b, &c.pg_dump("app_before")?) {
        panic!("safety dump does not restore the replaced state: {diff}");
    }

    // --create over an existing database without --clean is refused; with --create --clean
    // --force it is dropped and created again (and a safety dump taken).
    let e = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            force: true,
            ..restore_opts(&c, &first.id, "app_before")
        },
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            clean: true,
            force: true,
            ..restore_opts(&c, &first.id, "app_before")
        },
        &NoProgress,
    )
    .await?;
    assert!(
        rr.databases[0].dropped && rr.databases[0].safety_dump.is_some(),
        "{rr}"
    );
    assert_eq!(c.pg_dump("app_before")?, state_a);
    eprintln!(
        "safety_dump_is_taken_and_restorable: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_match_under_write_load() -> TestResult {
    let c = Cluster::new()?;
    c.pgbench(&["-i", "-s", "2", "-q"])?;
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (s, env) = (stop.clone(), c.env());
    let writer = std::thread::spawn(move || {
        let mut rounds = 0;
        while !s.load(Ordering::SeqCst) {
            let out = std::process::Command::new(format!("{PG_BIN_DIR}/pgbench"))
                .envs(env.clone())
                .args(["-n", "-c", "2", "-T", "1"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            rounds += 1;
        }
        rounds
    });
    std::thread::sleep(Duration::from_millis(700));
    let r = dump(&repo, &dump_opts(&c, "postgres"), &NoProgress).await?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    assert!(writer.join().unwrap() > 0);
    let m = load_dump(&repo, "main", &r.id).await?;
    let history = m.databases[0]
        .tables
        .iter()
        .find(|t| t.table == "pgbench_history")
        .unwrap();
    let now: i64 = c.sql("SELECT count(*) FROM pgbench_history")?.parse()?;
    assert!(
        history.rows.unwrap() < now,
        "the writer did not write after the dump's snapshot"
    );
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            ..restore_opts(&c, &r.id, "copy")
        },
        &NoProgress,
    )
    .await?;
    assert!(rr.databases[0].row_differences.is_empty(), "{rr}");
    assert_eq!(rr.databases[0].tables_checked, 4);
    let copied: i64 = c
        .sql_db("copy", "SELECT count(*) FROM pgbench_history")?
        .parse()?;
    assert_eq!(Some(copied), history.rows);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_restores_roles_and_databases_into_a_fresh_cluster() -> TestResult {
    let t0 = Instant::now();
    let a = Cluster::new()?;
    // db1: owned by a non-superuser, LATIN1, with privileges, settings (its own and a
    // role's in it), a connection limit and a comment; db2: the ICU locale provider.
    a.sql(
        "CREATE ROLE app_owner LOGIN; CREATE ROLE auditor NOLOGIN;
         CREATE DATABASE db1 OWNER app_owner TEMPLATE template0 ENCODING 'LATIN1' LOCALE 'C' CONNECTION LIMIT 20;
         CREATE DATABASE db2 TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'de-DE' LOCALE 'C.utf8';
         REVOKE CONNECT, TEMPORARY ON DATABASE db1 FROM PUBLIC;
         GRANT CONNECT ON DATABASE db1 TO auditor;
         GRANT CREATE ON DATABASE db1 TO auditor WITH GRANT OPTION;
         COMMENT ON DATABASE db1 IS 'items of the app';
         ALTER DATABASE db1 SET work_mem = '7MB';
         ALTER DATABASE db1 SET search_path = app, \"my schema\", public;
         ALTER ROLE auditor IN DATABASE db1 SET statement_timeout = '5s';",
    )?;
    a.sql_db("db1", "SET ROLE app_owner; CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 1000) g; RESET ROLE; GRANT SELECT ON items TO auditor")?;
    a.sql_db(
        "db2",
        "CREATE TABLE t (x int); INSERT INTO t SELECT generate_series(1, 10)",
    )?;
    a.sql("CREATE TABLE in_postgres (y text); INSERT INTO in_postgres VALUES ('kept')")?;
    // Templates, which pg_dumpall keeps too: template1's contents (what every new database
    // starts with) and a user template with its own.
    a.sql("CREATE DATABASE tmpl IS_TEMPLATE true")?;
    a.sql_db(
        "tmpl",
        "CREATE TABLE invoice_lines (id int PRIMARY KEY, amount numeric); INSERT INTO invoice_lines VALUES (1, 9.5)",
    )?;
    a.sql_db(
        "template1",
        "CREATE TABLE house_rules (rule text); INSERT INTO house_rules VALUES ('no friday deploys')",
    )?;
    // A common safety net, restored with the roles: it must not make the restore read-only.
    a.sql("ALTER ROLE postgres SET default_transaction_read_only = on")?;
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;
    let r = dump(
        &repo,
        &DumpOptions {
            all: true,
            db: None,
            label: Some("weekly".into()),
            ..dump_opts(&a, "")
        },
        &NoProgress,
    )
    .await?;
    assert!(r.globals, "{r}");
    let names: Vec<&str> = r.databases.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["template1", "db1", "db2", "postgres", "tmpl"]);

    // One database out of an --all dump needs to be named.
    let e = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            ..restore_opts(&a, "latest", "x")
        },
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("--db"), "{e}");

    let b = Cluster::new()?;
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            all: true,
            target_db: None,
            ..restore_opts(&b, "latest", "")
        },
        &NoProgress,
    )
    .await?;
    assert!(rr.globals_errors.is_empty(), "{rr}");
    assert_eq!(rr.exit_code(), 0, "{rr}");
    assert_eq!(
        b.sql("SELECT rolname FROM pg_roles WHERE rolname IN ('app_owner', 'auditor') ORDER BY 1")?,
        "app_owner\nauditor"
    );
    for db in ["template1", "db1", "db2", "postgres", "tmpl"] {
        assert_same_db(&a, db, &b, db);
        assert_eq!(db_properties(&b, db), db_properties(&a, db), "{db}");
    }
    let db1 = db_properties(&b, "db1");
    assert!(
        db1.starts_with("app_owner | LATIN1 | C | C | c | - | 20 | f | items of the app | ")
            && db1.contains("app_owner>auditor:CREATE*")
            && db1.contains("auditor:statement_timeout=5s"),
        "{db1}"
    );
    assert!(
        db_properties(&b, "db2").contains("| i | de-DE |"),
        "{}",
        db_properties(&b, "db2")
    );
    assert_eq!(
        b.sql("SELECT array_to_string(rolconfig, ',') FROM pg_roles WHERE rolname = 'postgres'")?,
        "default_transaction_read_only=on"
    );
    // The user template is a template again, and new databases get its contents.
    assert!(
        db_properties(&b, "tmpl").contains("| t |"),
        "{}",
        db_properties(&b, "tmpl")
    );
    assert!(
        rr.to_string().contains("template"),
        "the report does not say tmpl is a template: {rr}"
    );
    b.sql("SET default_transaction_read_only = off; CREATE DATABASE from_tmpl TEMPLATE tmpl")?;
    assert_eq!(
        b.sql_db("from_tmpl", "SELECT amount FROM invoice_lines")?,
        "9.5"
    );
    assert_eq!(
        b.sql_db(
            "db1",
            "SELECT tableowner FROM pg_tables WHERE tablename = 'items'"
        )?,
        "app_owner"
    );
    eprintln!(
        "all_restores_roles_and_databases: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_count_difference_after_restore_is_a_warning() -> TestResult {
    let c = Cluster::new()?;
    c.sql("CREATE DATABASE ledger")?;
    c.sql_db(
        "ledger",
        "CREATE TABLE entries (id int PRIMARY KEY, amount numeric NOT NULL);
         INSERT INTO entries SELECT g, g * 0.5 FROM generate_series(1, 100) g;
         CREATE TABLE notes (t text); INSERT INTO notes VALUES ('a'), ('b'), ('c');",
    )?;
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;
    let r = dump(&repo, &dump_opts(&c, "ledger"), &NoProgress).await?;

    // The target changes rows as they load: an event trigger, as auditing or multi-tenant
    // tooling installs them, attaches a row filter to each new table it is told about. The
    // restore itself succeeds; only the count check can tell that rows are missing.
    c.sql("CREATE DATABASE ledger_copy")?;
    c.sql_db(
        "ledger_copy",
        r#"
        CREATE FUNCTION public.skip_odd() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN IF NEW.id % 2 = 1 THEN RETURN NULL; END IF; RETURN NEW; END $$;
        CREATE FUNCTION public.attach_filter() RETURNS event_trigger LANGUAGE plpgsql AS $$
        DECLARE r record;
        BEGIN
            FOR r IN SELECT * FROM pg_event_trigger_ddl_commands()
                     WHERE command_tag = 'CREATE TABLE' AND object_identity = 'public.entries' LOOP
                EXECUTE 'CREATE TRIGGER skip_odd BEFORE INSERT ON public.entries FOR EACH ROW EXECUTE FUNCTION public.skip_odd()';
            END LOOP;
        END $$;
        CREATE EVENT TRIGGER attach_filter ON ddl_command_end WHEN TAG IN ('CREATE TABLE')
            EXECUTE FUNCTION public.attach_filter();
        "#,
    )?;
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            force: true,
            no_safety_dump: true,
            ..restore_opts(&c, &r.id, "ledger_copy")
        },
        &NoProgress,
    )
    .await?;
    assert_eq!(
        c.sql_db("ledger_copy", "SELECT count(*) FROM entries")?,
        "50",
        "the filter did not act: the test proves nothing"
    );
    assert_eq!(rr.exit_code(), 3, "{rr}");
    let d = &rr.databases[0];
    assert_eq!(d.tables_checked, 2);
    assert_eq!(d.row_differences.len(), 1, "{rr}");
    let diff = &d.row_differences[0];
    assert_eq!(
        (diff.table.as_str(), diff.expected, diff.found, diff.exact),
        ("entries", Some(100), Some(50), true)
    );
    let text = rr.to_string();
    assert!(
        text.contains(
            "WARNING: ledger_copy: table public.entries has 50 rows, the dump recorded 100"
        ) && text.contains("2 tables compared, 1 differ"),
        "{text}"
    );
    Ok(())
}

/// Every file under `dir`, read whole.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_repository_dumps_restore_and_export_identically() -> TestResult {
    const CANARY: &str = "PLAINTEXT-CANARY-7319";
    let c = Cluster::new()?;
    make_shop(&c, "shop");
    c.sql_db(
        "shop",
        &format!("UPDATE sales.orders SET note = '{CANARY}' WHERE id % 100 = 0"),
    )?;
    c.sql(&format!("ALTER DATABASE shop SET app.token = '{CANARY}'"))?;
    let rdir = tempfile::tempdir()?;
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::new(rdir.path())?);
    let repo = Repository::init(
        storage.clone(),
        InitOptions {
            passphrase: Some("correct horse".into()),
            kdf: pgkeep_repo::KdfParams {
                m_kib: 256,
                t: 1,
                p: 1,
            },
            ..InitOptions::default()
        },
    )
    .await?;
    let r = dump(&repo, &dump_opts(&c, "shop"), &NoProgress).await?;
    assert!(r.totals.logical_bytes > 1_000_000, "{r}");
    // Nothing of the data, the settings or the row counts' table names in clear on disk.
    for (path, bytes) in files_under(rdir.path()) {
        for needle in [CANARY, "sales.orders", "big_customers"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} in clear in {}",
                path.display()
            );
        }
    }
    // Without the passphrase there is no way in.
    let e = Repository::open(storage.clone(), Some("wrong"))
        .await
        .unwrap_err();
    assert_eq!(pgkeep_core::Error::from(e).exit_code(), 12);
    let repo = Repository::open(storage, Some("correct horse")).await?;

    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            ..restore_opts(&c, "latest", "shop_copy")
        },
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.exit_code(), 0, "{rr}");
    assert_same_db(&c, "shop", &c, "shop_copy");
    assert_eq!(db_properties(&c, "shop_copy"), db_properties(&c, "shop"));

    // The exported archive is pg_dump's own, byte for byte the stored stream: pg_restore
    // reads it, and its plain export is what pg_restore makes of it.
    let out = tempfile::tempdir()?;
    let custom = out.path().join("shop.dump");
    let e = export_dump(
        &repo,
        &ExportDumpOptions {
            cluster: "main".into(),
            id: r.id.clone(),
            output: custom.clone(),
            ..ExportDumpOptions::default()
        },
        &NoProgress,
    )
    .await?;
    assert_eq!(e.bytes, r.databases[0].dump_bytes);
    assert_eq!(&std::fs::read(&custom)?[..5], b"PGDMP");
    c.sql("CREATE DATABASE shop_from_file")?;
    let st = c
        .client_command("pg_restore")
        .args(["--exit-on-error", "-d", "shop_from_file"])
        .arg(&custom)
        .status()?;
    assert!(st.success());
    assert_same_db(&c, "shop", &c, "shop_from_file");
    let plain = out.path().join("shop.sql");
    export_dump(
        &repo,
        &ExportDumpOptions {
            cluster: "main".into(),
            id: r.id.clone(),
            output: plain.clone(),
            format: ExportFormat::Plain,
            db: None,
        },
        &NoProgress,
    )
    .await?;
    let via_pg_restore = c
        .client_command("pg_restore")
        .arg("--file=-")
        .arg(&custom)
        .output()?;
    assert!(via_pg_restore.status.success());
    assert_eq!(
        strip_restrict_lines(&std::fs::read_to_string(&plain)?),
        strip_restrict_lines(&String::from_utf8(via_pg_restore.stdout)?)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_and_table_selection_no_owner_and_no_acl() -> TestResult {
    let c = Cluster::new()?;
    c.sql(
        "CREATE ROLE app_owner; CREATE ROLE sales_owner; CREATE ROLE reader;
         CREATE DATABASE app OWNER app_owner;
         GRANT CONNECT ON DATABASE app TO reader;",
    )?;
    c.sql_db(
        "app",
        "CREATE SCHEMA sales AUTHORIZATION sales_owner;
         COMMENT ON SCHEMA sales IS 'what we sold';
         GRANT USAGE ON SCHEMA sales TO reader;
         CREATE TABLE sales.orders (id int PRIMARY KEY, total numeric);
         INSERT INTO sales.orders SELECT g, g FROM generate_series(1, 100) g;
         ALTER TABLE sales.orders OWNER TO app_owner;
         GRANT SELECT ON sales.orders TO reader;
         CREATE SCHEMA hr;
         CREATE TABLE hr.people (id int PRIMARY KEY, name text);
         INSERT INTO hr.people SELECT g, 'p' || g FROM generate_series(1, 10) g;
         CREATE TABLE public.config (k text PRIMARY KEY, v text);
         INSERT INTO public.config VALUES ('a', '1'), ('b', '2'), ('c', '3');",
    )?;
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;
    let r = dump(&repo, &dump_opts(&c, "app"), &NoProgress).await?;
    let schemas = |db: &str| {
        c.sql_db(
            db,
            "SELECT string_agg(nspname || ':' || pg_get_userbyid(nspowner) || ':' || coalesce(obj_description(oid, 'pg_namespace'), '-'), ',' ORDER BY nspname) FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'",
        )
        .unwrap()
    };
    let tables = |db: &str| {
        c.sql_db(
            db,
            "SELECT string_agg(schemaname || '.' || tablename || ':' || tableowner, ',' ORDER BY 1) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        )
        .unwrap()
    };
    let restore = |target: &str, f: &dyn Fn(&mut RestoreDumpOptions)| {
        let mut o = RestoreDumpOptions {
            create: true,
            ..restore_opts(&c, &r.id, target)
        };
        f(&mut o);
        o
    };

    // A dry run says what a selection restores, and creates nothing.
    let dry = restore_dump(
        &repo,
        &restore("only_sales", &|o| {
            o.schemas = vec!["sales".into()];
            o.dry_run = true;
        }),
        &NoProgress,
    )
    .await?;
    let d = &dry.databases[0];
    assert_eq!(d.objects.get("SCHEMA").copied(), Some(1), "{:?}", d.objects);
    assert_eq!(d.objects.get("TABLE").copied(), Some(1), "{:?}", d.objects);
    assert!(
        d.checks
            .iter()
            .any(|c| c.contains("only schemas sales") && c.contains("created from the dump")),
        "{dry}"
    );
    assert_eq!(
        c.sql("SELECT count(*) FROM pg_database WHERE datname = 'only_sales'")?,
        "0"
    );

    // One schema into a new database: pg_restore --schema alone would fail here (it leaves
    // out CREATE SCHEMA); the schema comes with its owner and comment, nothing else comes.
    let rr = restore_dump(
        &repo,
        &restore("only_sales", &|o| o.schemas = vec!["sales".into()]),
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.exit_code(), 0, "{rr}");
    assert_eq!(rr.databases[0].tables_checked, 1, "{rr}");
    assert_eq!(
        schemas("only_sales"),
        "public:pg_database_owner:standard public schema,sales:sales_owner:what we sold"
    );
    assert_eq!(tables("only_sales"), "sales.orders:app_owner");
    assert_eq!(
        c.sql_db("only_sales", "SELECT count(*) FROM sales.orders")?,
        "100"
    );
    assert_eq!(
        c.sql_db(
            "only_sales",
            "SELECT has_table_privilege('reader', 'sales.orders', 'SELECT')"
        )?,
        "t"
    );

    // One table by name: its schema is created for it.
    let rr = restore_dump(
        &repo,
        &restore("only_people", &|o| o.tables = vec!["people".into()]),
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.exit_code(), 0, "{rr}");
    assert_eq!(rr.databases[0].tables_checked, 1, "{rr}");
    assert_eq!(tables("only_people"), "hr.people:postgres");
    assert_eq!(
        c.sql_db("only_people", "SELECT count(*) FROM hr.people")?,
        "10"
    );

    // A schema left out is not even created empty.
    let rr = restore_dump(
        &repo,
        &restore("no_hr", &|o| o.exclude_schemas = vec!["hr".into()]),
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.exit_code(), 0, "{rr}");
    assert_eq!(rr.databases[0].tables_checked, 2, "{rr}");
    assert!(!schemas("no_hr").contains("hr:"), "{}", schemas("no_hr"));
    assert_eq!(
        tables("no_hr"),
        "public.config:postgres,sales.orders:app_owner"
    );

    // --no-owner --no-acl: everything (the database too) owned by the restoring role, no
    // privileges granted, the same contents.
    let rr = restore_dump(
        &repo,
        &restore("plain_copy", &|o| {
            o.no_owner = true;
            o.no_acl = true;
        }),
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.exit_code(), 0, "{rr}");
    assert_eq!(
        tables("plain_copy"),
        "hr.people:postgres,public.config:postgres,sales.orders:postgres"
    );
    assert!(
        schemas("plain_copy").contains("sales:postgres:what we sold"),
        "{}",
        schemas("plain_copy")
    );
    assert_eq!(
        c.sql_db(
            "plain_copy",
            "SELECT has_table_privilege('reader', 'sales.orders', 'SELECT')"
        )?,
        "f"
    );
    let props = db_properties(&c, "plain_copy");
    assert!(
        props.starts_with("postgres | ") && props.contains("| default |"),
        "{props}"
    );
    let text = |db: &str| pg_dump_text(&c, db, &["--no-owner", "--no-acl"]);
    if let Some(d) = first_difference(&text("app"), &text("plain_copy")) {
        panic!("contents differ: {d}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimated_counts_follow_the_table_size() -> TestResult {
    let c = Cluster::new()?;
    c.sql("CREATE DATABASE est")?;
    // Statistics taken at 20000 rows, then as many loaded again before autovacuum came by
    // (here: never): the table is above the exact-count size, so its count is an estimate.
    c.sql_db(
        "est",
        "CREATE TABLE big (id int, pad text) WITH (autovacuum_enabled = off);
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
         ANALYZE big;
         INSERT INTO big SELECT g, md5(g::text) FROM generate_series(20001, 40000) g;",
    )?;
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;
    let r = dump(
        &repo,
        &DumpOptions {
            exact_count_max_bytes: 0,
            ..dump_opts(&c, "est")
        },
        &NoProgress,
    )
    .await?;
    let m = load_dump(&repo, "main", &r.id).await?;
    let big = &m.databases[0].tables[0];
    assert!(!big.exact, "{big:?}");
    let rows = big.rows.expect("an estimate");
    assert!(
        (36_000..=44_000).contains(&rows),
        "the estimate ignores the rows loaded after the last ANALYZE: {rows}"
    );
    // The restored table (statistics of its own only after an ANALYZE) agrees.
    let rr = restore_dump(
        &repo,
        &RestoreDumpOptions {
            create: true,
            ..restore_opts(&c, &r.id, "est_copy")
        },
        &NoProgress,
    )
    .await?;
    assert_eq!(rr.exit_code(), 0, "{rr}");
    assert_eq!(rr.databases[0].tables_checked, 1);
    assert!(rr.databases[0].row_differences.is_empty(), "{rr}");
    Ok(())
}

/// The day-to-day case deduplication alone handles worst: updates spread over a whole table
/// change every chunk of the archive. The second dump is stored as deltas against the first
/// (a small fraction of it) and restores to the same contents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_after_updates_all_over_a_table_is_stored_as_deltas_and_restores_identically(
) -> TestResult {
    let c = Cluster::new()?;
    c.sql("CREATE DATABASE ledger")?;
    c.sql_db(
        "ledger",
        "CREATE TABLE entries (id int PRIMARY KEY, account int, amount numeric(12,2), memo text);
         INSERT INTO entries SELECT g, g % 1000, (g * 0.37)::numeric(12,2),
             md5(g::text) || md5((g + 1)::text) FROM generate_series(1, 200000) g;",
    )?;
    let rdir = tempfile::tempdir()?;
    let repo = local_repo(rdir.path()).await;
    let r1 = dump(&repo, &dump_opts(&c, "ledger"), &NoProgress).await?;
    // One row in 200, all over the table: every 1 MiB chunk of the archive changes.
    c.sql_db(
        "ledger",
        "UPDATE entries SET amount = amount + 1 WHERE id % 200 = 0",
    )?;
    let r2 = dump(&repo, &dump_opts(&c, "ledger"), &NoProgress).await?;
    assert_eq!(r2.exit_code(), 0, "{r2}");
    assert!(
        r2.totals.new_bytes * 10 > r1.totals.new_bytes * 9,
        "chunks were left unchanged ({} new bytes of {}): the test no longer tests deltas",
        r2.totals.new_bytes,
        r1.totals.new_bytes
    );
    assert!(
        r2.totals.stored_bytes * 8 < r1.totals.stored_bytes,
        "second dump stored {} bytes, the first {}",
        r2.totals.stored_bytes,
        r1.totals.stored_bytes
    );
    let opts = RestoreDumpOptions {
        create: true,
        ..restore_opts(&c, &r2.id, "ledger_copy")
    };
    let rr = restore_dump(&repo, &opts, &NoProgress).await?;
    assert_eq!(rr.exit_code(), 0, "{rr}");
    assert_same_db(&c, "ledger", &c, "ledger_copy");
    let check = repo
        .check(pgkeep_repo::CheckOptions { read_data: true })
        .await?;
    assert!(check.is_ok(), "{:?}", check.problems);
    Ok(())
}
