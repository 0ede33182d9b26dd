//! The archive rechunker against real pg_dump output: the rewritten archive restores exactly
//! what the original does, with its row-sized data pieces merged.

use std::io::Write;
use std::process::{Command, Stdio};

use pgkeep_pg::archive::{Rechunker, TARGET_PIECE};
use pgkeep_testing::Cluster;

fn run(mut cmd: Command, input: &[u8]) -> Vec<u8> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The archive through a rechunker, written in pieces of awkward sizes so that every field
/// of the format is split across writes somewhere.
fn rechunked(archive: &[u8]) -> (Vec<u8>, pgkeep_pg::archive::RechunkStats) {
    let mut r = Rechunker::new(Vec::new());
    let sizes = [1usize, 2, 3, 5, 7, 4096, 65_537, 1 << 20];
    let (mut pos, mut k) = (0, 0);
    while pos < archive.len() {
        let n = sizes[k % sizes.len()].min(archive.len() - pos);
        r.write_all(&archive[pos..pos + n]).unwrap();
        pos += n;
        k += 1;
    }
    r.finish().unwrap()
}

#[test]
fn a_rechunked_archive_restores_the_same_rows_large_objects_and_huge_values() {
    let c = Cluster::new().unwrap();
    c.sql("create database src; create database dst").unwrap();
    c.sql_db(
        "src",
        &format!(
            "create table t(id int primary key, v text);
             insert into t select g, 'row ' || g || repeat('x', g % 50) from generate_series(1, 30000) g;
             create table empty(a int);
             create schema other;
             create table other.wide(id int, big text);
             insert into other.wide values (1, repeat('y', {big})), (2, 'small'), (3, repeat('z', {big}));
             select lo_from_bytea(4242, decode(repeat('0123456789abcdef', 20000), 'hex'));
             select lo_from_bytea(4343, '');
             comment on table t is 'kept';",
            big = 3 * TARGET_PIECE
        ),
    )
    .unwrap();
    let mut dump = c.client_command("pg_dump");
    dump.args(["--format=custom", "--compress=0", "--no-sync", "-d", "src"]);
    let archive = run(dump, b"");
    let (out, stats) = rechunked(&archive);
    assert!(stats.understood, "{stats:?}");
    assert!(
        stats.pieces_in > 30_000 && stats.pieces_out * 100 < stats.pieces_in,
        "{stats:?}"
    );
    assert!(out.len() < archive.len());

    // The same SQL, large objects included, from both archives (but for the random key of
    // the `\restrict` lines of newer pg_restore versions).
    let sql = |a: &[u8]| {
        let mut cmd = Command::new("pg_restore");
        cmd.args(["--file=-"]);
        String::from_utf8(run(cmd, a))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        sql(&out) == sql(&archive),
        "the rewritten archive restores other SQL"
    );

    // And a real restore brings back the database.
    let mut restore = c.client_command("pg_restore");
    restore.args(["--exit-on-error", "--single-transaction", "-d", "dst"]);
    run(restore, &out);
    assert_eq!(c.pg_dump("src").unwrap(), c.pg_dump("dst").unwrap());
    assert_eq!(
        c.sql_db(
            "dst",
            "select length(lo_get(4242)), length(lo_get(4343)), count(*) from t"
        )
        .unwrap()
        .trim(),
        "160000|0|30000"
    );
}

#[test]
fn a_compressed_archive_passes_through_unchanged() {
    let c = Cluster::new().unwrap();
    c.sql("create table t as select g from generate_series(1, 1000) g")
        .unwrap();
    let mut dump = c.client_command("pg_dump");
    dump.args(["--format=custom", "--no-sync", "-d", "postgres"]);
    let archive = run(dump, b"");
    let (out, stats) = rechunked(&archive);
    assert!(!stats.understood);
    assert!(out == archive, "a compressed archive was changed");
    // A cut-short archive also comes out as it went in.
    let cut = &archive[..archive.len() / 2];
    let (out, _) = rechunked(cut);
    assert!(out == cut);
}
