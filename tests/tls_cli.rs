//! TLS for every connection pgkeep opens, through the built binary, against real PostgreSQL
//! 15 servers with `ssl = on`, a CA and certificates made here (rcgen), and a pg_hba.conf that
//! allows `hostssl` only.
//!
//! What a user relies on: `sslmode=verify-full` with the CA in `sslrootcert` backs up and
//! dumps (pg_dump and pg_basebackup get the same settings, or they would fail to verify);
//! `require` encrypts without verifying; `allow` falls back to TLS when plaintext is refused;
//! a host name the certificate does not name, a CA that did not sign it, or a root file in
//! `~/.postgresql` that does not fit, fail with exit 1 and say so; a server without TLS where
//! TLS is required fails with exit 1 and a hint; a missing `sslrootcert` under verify-full or
//! a weak mode with `sslrootcert=system` are configuration mistakes (exit 2).

mod cli_support;

use cli_support::Sandbox;
use pgkeep_testing::Cluster;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A CA and what it signed, as PEM files in one directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server_crt: String,
    server_key: String,
    client_crt: PathBuf,
    client_key: PathBuf,
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn new_ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

/// A CA; a server certificate naming only `localhost` (so 127.0.0.1 is a wrong host name);
/// a client certificate for user `postgres`; and a second, unrelated CA.
fn make_pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let (ca_params, ca_key, ca_pem) = new_ca("pgkeep test CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        (
            p.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_crt, server_key) = leaf(vec!["localhost".into()], "localhost");
    let (client_crt_pem, client_key_pem) = leaf(Vec::new(), "postgres");
    let (_, _, other_pem) = new_ca("some other CA");
    let p = |n: &str| dir.path().join(n);
    write(&p("ca.crt"), &ca_pem, 0o644);
    write(&p("other-ca.crt"), &other_pem, 0o644);
    write(&p("client.crt"), &client_crt_pem, 0o644);
    write(&p("client.key"), &client_key_pem, 0o600);
    Pki {
        ca: p("ca.crt"),
        other_ca: p("other-ca.crt"),
        server_crt,
        server_key,
        client_crt: p("client.crt"),
        client_key: p("client.key"),
        dir,
    }
}

/// A started cluster with TLS on, a database `shop` (250 rows) and `certdb` (client
/// certificate required), then a pg_hba.conf with `hostssl` lines only.
fn tls_cluster(pki: &Pki) -> Cluster {
    let mut c = Cluster::builder().init().unwrap();
    let tls = c.scratch_dir("tls").unwrap();
    write(&tls.join("server.crt"), &pki.server_crt, 0o644);
    write(&tls.join("server.key"), &pki.server_key, 0o600);
    std::fs::copy(&pki.ca, tls.join("ca.crt")).unwrap();
    if pgkeep_testing::cluster::running_as_root() {
        for f in ["server.crt", "server.key", "ca.crt"] {
            let st = std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(tls.join(f))
                .status()
                .unwrap();
            assert!(st.success());
        }
    }
    let conf = c.pgdata().join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str(&format!(
        "\nssl = on\nssl_cert_file = '{0}/server.crt'\nssl_key_file = '{0}/server.key'\nssl_ca_file = '{0}/ca.crt'\n",
        tls.display()
    ));
    std::fs::write(&conf, text).unwrap();
    c.start().unwrap();
    c.sql("CREATE DATABASE shop").unwrap();
    c.sql("CREATE DATABASE certdb").unwrap();
    c.sql_db(
        "shop",
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric); INSERT INTO orders SELECT g, g FROM generate_series(1, 250) g",
    )
    .unwrap();
    std::fs::write(
        c.pgdata().join("pg_hba.conf"),
        "hostssl certdb all 127.0.0.1/32 cert\n\
         hostssl all all 127.0.0.1/32 trust\n\
         hostssl replication all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    c.sql("SELECT pg_reload_conf()").unwrap();
    // The reload is asynchronous: wait until the socket is refused, as the new file says.
    for _ in 0..100 {
        if c.sql("SELECT 1").is_err() {
            return c;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("pg_hba.conf was not reloaded:\n{}", c.log_tail());
}

fn conninfo(host: &str, c: &Cluster, db: &str, ssl: &str) -> String {
    format!(
        "host={host} port={} user=postgres dbname={db} {ssl}",
        c.port()
    )
}

/// `pgkeep dump --db DB` with this conninfo; the run.
fn dump(s: &Sandbox, pg: &str, db: &str) -> cli_support::Run {
    s.run_repo(&["--json", "dump", "--db", db], &[("PGKEEP_PG", pg)])
}

#[test]
fn verify_full_and_require_back_up_and_dump_over_hostssl_only() {
    let pki = make_pki();
    let c = tls_cluster(&pki);
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let ca = pki.ca.display().to_string();
    let full = conninfo(
        "localhost",
        &c,
        "postgres",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    );

    // A root file in ~/.postgresql that would fail any verification: the explicit
    // sslrootcert must win, for us and for the child tools (which fall back to this file if
    // they do not get the setting).
    let dotdir = s.path().join(".postgresql");
    std::fs::create_dir_all(&dotdir).unwrap();
    std::fs::copy(&pki.other_ca, dotdir.join("root.crt")).unwrap();

    // A physical backup over a verified connection.
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    let b = s
        .run_repo(
            &["--json", "backup", "--pgdata", &pgdata, "--pg", &full],
            &[],
        )
        .expect(0)
        .json();
    assert!(b["id"].is_string(), "{b}");

    // pg_basebackup gets the same settings (without PGSSLROOTCERT it would find no root
    // certificate in the sandbox's ~/.postgresql and refuse verify-full).
    s.run_repo(
        &[
            "backup",
            "--method",
            "basebackup",
            "--pg",
            &full,
            "--label",
            "remote",
        ],
        &[],
    )
    .expect(0);

    // A dump: our connection and pg_dump's, both verify-full.
    let d = dump(
        &s,
        &conninfo(
            "localhost",
            &c,
            "postgres",
            &format!("sslmode=verify-full sslrootcert={ca}"),
        ),
        "shop",
    )
    .expect(0)
    .json();
    let id = d["id"].as_str().expect("id in dump --json").to_string();
    let info = s.run_repo(&["--json", "info", &id], &[]).expect(0).json();
    assert_eq!(
        info["dump"]["databases"][0]["tables"][0]["rows"], 250,
        "the dump holds the table's rows: {info}"
    );

    std::fs::remove_dir_all(&dotdir).unwrap();

    // require: encrypted, not verified (no root file anywhere): works against 127.0.0.1, a
    // name the certificate does not hold.
    let d = dump(
        &s,
        &conninfo("127.0.0.1", &c, "postgres", "sslmode=require"),
        "shop",
    )
    .expect(0)
    .json();
    let id = d["id"].as_str().unwrap().to_string();
    let info = s.run_repo(&["info", &id], &[]).expect(0).stdout();
    assert!(info.contains("public.orders: 250 rows"), "{info}");

    // The same through PGSSLMODE, and the default (prefer) uses TLS too.
    s.run_repo(
        &["dump", "--db", "shop"],
        &[
            ("PGKEEP_PG", &conninfo("127.0.0.1", &c, "postgres", "")),
            ("PGSSLMODE", "require"),
        ],
    )
    .expect(0);
    dump(&s, &conninfo("127.0.0.1", &c, "postgres", ""), "shop").expect(0);

    // allow: plaintext is refused by pg_hba.conf, then TLS succeeds.
    dump(
        &s,
        &conninfo("127.0.0.1", &c, "postgres", "sslmode=allow"),
        "shop",
    )
    .expect(0);

    // disable: the server's refusal, exit 1.
    let r = dump(
        &s,
        &conninfo("127.0.0.1", &c, "postgres", "sslmode=disable"),
        "shop",
    );
    let err = r.stderr();
    assert_eq!(r.code(), 1, "{err}");
    assert!(
        err.contains("no pg_hba.conf entry") && err.contains("no encryption"),
        "{err}"
    );

    // A client certificate: certdb needs one (hba `cert`); sent with sslcert/sslkey, by us
    // and by pg_dump.
    let r = dump(
        &s,
        &conninfo("localhost", &c, "certdb", "sslmode=require"),
        "certdb",
    );
    assert_eq!(r.code(), 1, "without a client certificate: {}", r.stderr());
    assert!(r.stderr().contains("certdb"), "{}", r.stderr());
    let with_cert = format!(
        "sslmode=verify-full sslrootcert={ca} sslcert={} sslkey={}",
        pki.client_crt.display(),
        pki.client_key.display()
    );
    dump(
        &s,
        &conninfo("localhost", &c, "certdb", &with_cert),
        "certdb",
    )
    .expect(0);
}

#[test]
fn tls_verification_failures_are_reported_with_their_cause() {
    let pki = make_pki();
    let c = tls_cluster(&pki);
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let ca = pki.ca.display().to_string();

    // verify-full against a host name the certificate does not hold: exit 1, naming both.
    let r = dump(
        &s,
        &conninfo(
            "127.0.0.1",
            &c,
            "postgres",
            &format!("sslmode=verify-full sslrootcert={ca}"),
        ),
        "shop",
    );
    let err = r.stderr();
    assert_eq!(r.code(), 1, "{err}");
    assert!(
        err.contains("server certificate does not match host name \"127.0.0.1\"")
            && err.contains("localhost")
            && err.contains("HINT: "),
        "{err}"
    );
    // verify-ca checks the chain only: the same host name is fine.
    dump(
        &s,
        &conninfo(
            "127.0.0.1",
            &c,
            "postgres",
            &format!("sslmode=verify-ca sslrootcert={ca}"),
        ),
        "shop",
    )
    .expect(0);

    // A CA that did not sign the server's certificate.
    let other = pki.other_ca.display().to_string();
    let r = dump(
        &s,
        &conninfo(
            "localhost",
            &c,
            "postgres",
            &format!("sslmode=verify-ca sslrootcert={other}"),
        ),
        "shop",
    );
    let err = r.stderr();
    assert_eq!(r.code(), 1, "{err}");
    assert!(
        err.contains("not signed by a CA trusted in sslrootcert") && err.contains(&other),
        "{err}"
    );

    // libpq's rule: with ~/.postgresql/root.crt present, require verifies the chain too.
    let dotdir = s.path().join(".postgresql");
    std::fs::create_dir_all(&dotdir).unwrap();
    std::fs::copy(&pki.other_ca, dotdir.join("root.crt")).unwrap();
    let require = conninfo("localhost", &c, "postgres", "sslmode=require");
    let r = dump(&s, &require, "shop");
    let err = r.stderr();
    assert_eq!(r.code(), 1, "{err}");
    assert!(
        err.contains("root.crt") && err.contains("not signed"),
        "{err}"
    );
    std::fs::copy(&pki.ca, dotdir.join("root.crt")).unwrap();
    dump(&s, &require, "shop").expect(0);
    // ... and the default file serves verify-full as well (for pg_dump too).
    dump(
        &s,
        &conninfo("localhost", &c, "postgres", "sslmode=verify-full"),
        "shop",
    )
    .expect(0);
    std::fs::remove_dir_all(&dotdir).unwrap();

    // Configuration mistakes: exit 2, naming the setting.
    let missing = pki.dir.path().join("missing-ca.crt");
    let r = dump(
        &s,
        &conninfo(
            "localhost",
            &c,
            "postgres",
            &format!("sslmode=verify-full sslrootcert={}", missing.display()),
        ),
        "shop",
    );
    let err = r.stderr();
    assert_eq!(r.code(), 2, "{err}");
    assert!(
        err.contains("missing-ca.crt") && err.contains("does not exist") && err.contains("HINT: "),
        "{err}"
    );
    let r = dump(
        &s,
        &conninfo(
            "localhost",
            &c,
            "postgres",
            "sslmode=require sslrootcert=system",
        ),
        "shop",
    );
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(
        r.stderr().contains("weak sslmode \"require\""),
        "{}",
        r.stderr()
    );
    let r = dump(
        &s,
        &conninfo("localhost", &c, "postgres", "sslmode=verify-everything"),
        "shop",
    );
    assert_eq!(r.code(), 2, "{}", r.stderr());
    assert!(
        r.stderr().contains("invalid sslmode value"),
        "{}",
        r.stderr()
    );
}

#[test]
fn tls_required_against_a_server_without_tls_fails_with_a_hint() {
    let c = Cluster::new().unwrap();
    let s = Sandbox::new();
    s.run_repo(&["repo", "init", "--no-encryption"], &[])
        .expect(0);
    let pgdata = c.pgdata().to_str().unwrap().to_string();
    for mode in ["require", "verify-ca", "verify-full"] {
        // verify-* need a root file; an existing one makes this about the server, not it.
        let pki_ca = tempfile::NamedTempFile::new().unwrap();
        let (_, _, pem) = new_ca("unused CA");
        std::fs::write(pki_ca.path(), pem).unwrap();
        let pg = conninfo(
            "localhost",
            &c,
            "postgres",
            &format!("sslmode={mode} sslrootcert={}", pki_ca.path().display()),
        );
        let r = s.run_repo(&["backup", "--pgdata", &pgdata, "--pg", &pg], &[]);
        let err = r.stderr();
        assert_eq!(r.code(), 1, "{mode}: {err}");
        assert!(
            err.contains("server does not support SSL, but SSL was required")
                && err.contains(&format!("sslmode={mode}"))
                && err.contains("HINT: ")
                && err.contains("ssl = on"),
            "{mode}: {err}"
        );
    }
    let l = s.run_repo(&["--json", "list"], &[]).expect(0).json();
    assert_eq!(l["backups"].as_array().unwrap().len(), 0, "{l}");

    // prefer (the default) and allow go on without TLS.
    for ssl in ["", "sslmode=prefer", "sslmode=allow"] {
        s.run_repo(
            &[
                "backup",
                "--pgdata",
                &pgdata,
                "--pg",
                &conninfo("127.0.0.1", &c, "postgres", ssl),
            ],
            &[],
        )
        .expect(0);
    }
}
