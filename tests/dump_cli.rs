//! `pgkeep dump`, `list`, `info` and `restore-dump` through the built binary, against a real
//! PostgreSQL 15 cluster.
//!
//! What a user relies on: a dump of a database that does not exist fails (exit 1) naming it,
//! with a hint, and records nothing; `list` (text and `--json`) shows a dump beside a physical
//! backup with its kind; `info <dump-id>` shows the dump's databases and row counts;
//! `restore-dump` over a database holding objects, without `--force` and without a terminal
//! to confirm on, exits 2 saying what to do and changes neither the database nor the
//! repository's backups.

mod cli_support;

use cli_support::Sandbox;
use pgkeep_testing::Cluster;

fn kinds(list: &serde_json::Value) -> Vec<(String, String)> {
    list["backups"]
        .as_array()
        .expect("backups array in list --json")
        .iter()
        .map(|b| {
            (
                b["kind"].as_str().unwrap().to_string(),
                b["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn dump_list_info_and_a_refused_restore_through_the_binary() {
    let c = Cluster::new().unwrap();
    c.sql("CREATE DATABASE shop").unwrap();
    c.sql_db(
        "shop",
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric); INSERT INTO orders SELECT g, g FROM generate_series(1, 250) g",
    )
    .unwrap();
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let conninfo = c.conninfo();
    let pg = [("PGKEEP_PG", conninfo.as_str())];

    // A database that does not exist: a failure naming it, with a hint; nothing recorded.
    let r = s.run_repo(&["dump", "--db", "missing_db"], &pg);
    assert_ne!(r.code(), 0, "{}", r.stderr());
    assert_eq!(r.code(), 1, "{}", r.stderr());
    let err = r.stderr();
    assert!(
        err.contains("pgkeep: error:")
            && err.contains("\"missing_db\"")
            && err.contains("does not exist")
            && err.contains("HINT: "),
        "{err}"
    );
    let l = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert!(kinds(&l).is_empty(), "{l}");

    // A physical backup and a dump, side by side.
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    s.run_repo(&["backup", "--pgdata", &pgdata, "--label", "base"], &pg)
        .expect(0);
    let d = s
        .run_repo(&["--json", "dump", "--db", "shop", "--label", "daily"], &pg)
        .expect(0)
        .json();
    let dump_id = d["id"].as_str().expect("id in dump --json").to_string();
    assert_eq!(d["databases"][0]["name"], "shop", "{d}");

    let l = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    let k = kinds(&l);
    assert_eq!(k.len(), 2, "{l}");
    assert_eq!(k[0].0, "physical", "{l}");
    assert_eq!(k[1], ("dump".to_string(), dump_id.clone()), "{l}");
    let text = s.run_repo(&["list"], &[]).expect(0).stdout();
    let line = text
        .lines()
        .find(|l| l.starts_with(&dump_id))
        .unwrap_or_else(|| panic!("no line for {dump_id}:\n{text}"));
    assert!(
        line.contains("dump") && line.trim_end().ends_with("daily"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("physical") && l.trim_end().ends_with("base")),
        "{text}"
    );

    let info = s.run_repo(&["info", &dump_id], &[]).expect(0).stdout();
    assert!(
        info.contains(&dump_id) && info.contains("database    shop"),
        "{info}"
    );
    assert!(info.contains("public.orders: 250 rows"), "{info}");
    let info = s
        .run_repo(&["--json", "info", &dump_id], &[])
        .expect(0)
        .json();
    assert_eq!(info["backup"]["kind"], "dump", "{info}");
    assert_eq!(
        info["dump"]["databases"][0]["tables"][0]["rows"], 250,
        "{info}"
    );

    // Restoring over `shop` (which holds objects) without --force, with no terminal to ask
    // on (the test's stdin is not one): refused, exit 2, nothing changed, no safety dump.
    c.sql_db("shop", "DELETE FROM orders WHERE id > 200")
        .unwrap();
    let before = c.pg_dump("shop").unwrap();
    let r = s
        .run_repo(
            &["restore-dump", &dump_id, "--target-db", "shop", "--clean"],
            &pg,
        )
        .expect(2);
    let err = r.stderr();
    assert!(
        err.contains("\"shop\"") && err.contains("--force") && err.contains("HINT: "),
        "{err}"
    );
    assert_eq!(c.pg_dump("shop").unwrap(), before, "the database changed");
    let l = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert_eq!(kinds(&l).len(), 2, "a dump was taken: {l}");

    // The same with --force restores the dump's 250 rows (a safety dump taken first).
    s.run_repo(
        &[
            "restore-dump",
            &dump_id,
            "--target-db",
            "shop",
            "--clean",
            "--force",
        ],
        &pg,
    )
    .expect(0);
    assert_eq!(
        c.sql_db("shop", "SELECT count(*) FROM orders").unwrap(),
        "250"
    );
    let l = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert_eq!(kinds(&l).len(), 3, "no safety dump: {l}");

    // pg_restore's options that scripts use reach it: one schema, no owner, no privileges.
    let r = s
        .run_repo(
            &[
                "--json",
                "restore-dump",
                &dump_id,
                "--target-db",
                "shop_public",
                "--create",
                "--schema",
                "public",
                "--no-owner",
                "--no-acl",
            ],
            &pg,
        )
        .expect(0)
        .json();
    let checks = r["databases"][0]["checks"].to_string();
    assert!(
        checks.contains("--no-owner")
            && checks.contains("--no-acl")
            && checks.contains("only schemas public"),
        "{r}"
    );
    assert_eq!(
        c.sql_db("shop_public", "SELECT count(*) FROM orders")
            .unwrap(),
        "250"
    );
}
