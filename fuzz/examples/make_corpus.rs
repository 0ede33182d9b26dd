//! Writes the seeds of the repository targets made by pgkeep's own writers into
//! `fuzz/corpus/`: blobs (raw, zstd, delta), packs, index files, the `config` object, key
//! files and a lock object, from real repositories this program creates in a temporary
//! directory. `--from-repo DIR` also takes the manifests and index files of an existing
//! plain repository (fuzz/make-corpus.sh passes the one it backs a real cluster up into).
//! From files kept in the repository: the WAL records of each release (crates/pg's test
//! fixtures, decoded from real WAL), the segment summaries of the `wal_segment` seeds, and
//! the pg_control files of each release.
//!
//! ```sh
//! cargo run -p pgkeep-fuzz --example make_corpus [-- --from-repo DIR]
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pgkeep_fuzz::corpus_dir;
use pgkeep_fuzz::targets::repo::{delta_base, INDEX_AAD, PACK_HEADER_AAD};
use pgkeep_repo::crypto::Sealer;
use pgkeep_repo::pack::{blob_compressor, encode_blob, encode_delta_blob, PackWriter};
use pgkeep_repo::{ChunkerParams, InitOptions, KdfParams, LockKind, Repository, WriterOptions};
use pgkeep_storage::LocalStorage;

fn put(target: &str, name: &str, bytes: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
    println!("{target}/{name}: {} bytes", bytes.len());
}

fn with_mode(mode: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(body);
    v
}

/// The files under `dir` (recursively), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Blobs as `encode_blob` / `encode_delta_blob` store them, and a pack of them.
fn blobs_and_pack() {
    let sealer = Sealer::Plain;
    let mut c = blob_compressor(3).unwrap();
    let base = delta_base();
    let base_id = sealer.blob_id(base);
    let mut changed = base.to_vec();
    for i in (0..changed.len()).step_by(9000) {
        changed[i] = b'#';
    }
    // Incompressible: stored raw.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..600)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 56) as u8
        })
        .collect();
    let text = b"INSERT INTO orders VALUES (42, 'new', 17.50, now());\n".repeat(40);
    let mut pw = PackWriter::with_capacity(1 << 20);
    for (name, plain) in [("zstd", &text[..]), ("raw", &noise[..]), ("empty", &[][..])] {
        let id = sealer.blob_id(plain);
        let mut stored = Vec::new();
        encode_blob(&sealer, &mut c, &id, plain, &mut stored).unwrap();
        put("blob", name, &blob_input(&id.0, plain.len(), &stored));
        pw.add(id, &stored, plain.len() as u32, &[]);
    }
    let id = sealer.blob_id(&changed);
    let mut stored = Vec::new();
    let ok = encode_delta_blob(
        &sealer,
        3,
        &id,
        &changed,
        &[base_id],
        base,
        changed.len(),
        &mut stored,
    )
    .unwrap();
    assert!(ok, "the delta did not fit");
    put("blob", "delta", &blob_input(&id.0, changed.len(), &stored));
    pw.add(id, &stored, changed.len() as u32, &[base_id]);
    let (_, pack, _) = pw.finish(&sealer);
    put("pack", "writer-with-delta", &with_mode(0, &pack));
    put(
        "pack",
        "writer-with-delta-plaintext",
        &plaintext_pack(&pack),
    );
}

fn blob_input(id: &[u8; 32], len: usize, stored: &[u8]) -> Vec<u8> {
    let mut v = id.to_vec();
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.extend_from_slice(stored);
    v
}

/// A pack in the `pack` target's odd mode: data length, data, header plaintext.
fn plaintext_pack(pack: &[u8]) -> Vec<u8> {
    let t = pack.len();
    let hlen = u32::from_le_bytes(pack[t - 8..t - 4].try_into().unwrap()) as usize;
    let data = &pack[..t - 8 - hlen];
    let header = Sealer::Plain
        .open_meta(PACK_HEADER_AAD, &pack[t - 8 - hlen..t - 8])
        .expect("a plain pack header opens");
    let mut v = vec![1];
    v.extend_from_slice(&(data.len() as u16).to_le_bytes());
    v.extend_from_slice(data);
    v.extend_from_slice(&header);
    v
}

/// A plain repository with two versions of a stream (the second partly as deltas): its
/// packs, index files and `config`; an encrypted one's key file (passphrase `fuzz`, small
/// KDF parameters so the target can run the derivation) and a lock.
async fn repositories(tmp: &Path) {
    let plain_dir = tmp.join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let storage = Arc::new(LocalStorage::new(&plain_dir).unwrap());
    let opts = InitOptions {
        pack_size: 1 << 20,
        chunker: ChunkerParams {
            min: 64 << 10,
            avg: 128 << 10,
            max: 256 << 10,
            whole_pieces: true,
        },
        ..Default::default()
    };
    let repo = Repository::init(storage, opts).await.unwrap();
    let v1: Vec<u8> = (0..20_000u32)
        .flat_map(|i| format!("{i}\tstatus ok\trow {}\n", i % 13).into_bytes())
        .collect();
    let mut v2 = v1.clone();
    for i in (0..v2.len()).step_by(40_000) {
        v2[i] = b'!';
    }
    let w = repo.writer(WriterOptions::default());
    let first = tokio::task::block_in_place(|| w.ingest_bytes(&v1)).unwrap();
    let w2 = w.clone();
    tokio::task::block_in_place(|| w2.ingest_reader_against(&mut &v2[..], Some(&first))).unwrap();
    w.finish().await.unwrap();
    for (i, p) in files(&plain_dir.join("packs")).iter().enumerate() {
        let b = std::fs::read(p).unwrap();
        if b.len() < 128 << 10 {
            put("pack", &format!("repo-{i}"), &with_mode(0, &b));
        }
    }
    for (i, p) in files(&plain_dir.join("index")).iter().enumerate() {
        index_seeds(&format!("writer-{i}"), &std::fs::read(p).unwrap());
    }
    put(
        "repo_config",
        "plain",
        &std::fs::read(plain_dir.join("config")).unwrap(),
    );

    let enc_dir = tmp.join("encrypted");
    std::fs::create_dir_all(&enc_dir).unwrap();
    let storage = Arc::new(LocalStorage::new(&enc_dir).unwrap());
    let opts = InitOptions {
        passphrase: Some("fuzz".into()),
        kdf: KdfParams {
            m_kib: 64,
            t: 1,
            p: 1,
        },
        ..Default::default()
    };
    let repo = Repository::init(storage, opts).await.unwrap();
    repo.add_key("another passphrase").await.unwrap();
    for (i, p) in files(&enc_dir.join("keys")).iter().enumerate() {
        put("key_file", &format!("key-{i}"), &std::fs::read(p).unwrap());
    }
    put(
        "repo_config",
        "encrypted",
        &std::fs::read(enc_dir.join("config")).unwrap(),
    );
    let lock = repo
        .lock(LockKind::Shared, Some("backup:main"), "backup")
        .await
        .unwrap();
    for (i, p) in files(&enc_dir.join("locks")).iter().enumerate() {
        put(
            "repo_config",
            &format!("lock-{i}"),
            &std::fs::read(p).unwrap(),
        );
    }
    drop(lock);
}

/// An index file in both modes of the `index_file` target.
fn index_seeds(name: &str, stored: &[u8]) {
    put("index_file", name, &with_mode(0, stored));
    let z = Sealer::Plain
        .open_meta(INDEX_AAD, stored)
        .expect("a plain index file opens");
    let json = zstd::stream::decode_all(&z[..]).unwrap();
    put("index_file", &format!("{name}-json"), &with_mode(1, &json));
}

/// Manifests (both modes of the `manifest` target) and index files of a plain repository.
fn from_repo(dir: &Path) {
    for p in files(&dir.join("backups")) {
        let key = p.strip_prefix(dir).unwrap().to_str().unwrap().to_string();
        let stored = std::fs::read(&p).unwrap();
        let plain = Sealer::Plain
            .open_meta(key.as_bytes(), &stored)
            .expect("a plain manifest opens");
        let json = zstd::stream::decode_all(&plain[..]).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let kind = v["kind"].as_str().unwrap().to_string();
        let mut raw = vec![0, key.len() as u8];
        raw.extend_from_slice(key.as_bytes());
        raw.extend_from_slice(&stored);
        put("manifest", &format!("{kind}-stored"), &raw);
        if let Some(files) = v["files"].as_array() {
            // The JSON of a physical manifest lists every file of the cluster (200 KB for a
            // fresh one, milliseconds to parse): kept whole only in its stored form above,
            // and as JSON with its first files only, so that mutations get far more tries.
            let mut small = v.clone();
            small["files"] = serde_json::Value::Array(files.iter().take(12).cloned().collect());
            let json = serde_json::to_vec(&small).unwrap();
            put(
                "manifest",
                &format!("{kind}-json-12-files"),
                &with_mode(1, &json),
            );
        } else {
            put("manifest", &format!("{kind}-json"), &with_mode(1, &json));
        }
    }
    for (i, p) in files(&dir.join("index")).iter().enumerate().take(2) {
        index_seeds(&format!("backup-{i}"), &std::fs::read(p).unwrap());
    }
}

/// The records of crates/pg's fixtures (real WAL of each release), for the `wal_record`
/// target's even mode (major, split point, record), and the summaries of the `wal_segment`
/// seeds for its odd mode.
fn wal_records() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/pg/tests/fixtures");
    for major in 13u8..=18 {
        let text =
            std::fs::read_to_string(fixtures.join(format!("wal_records/records-{major}.hex")))
                .unwrap();
        let lines = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty());
        for (i, line) in lines.enumerate() {
            let mut v = vec![0, major - 13, 128];
            v.extend(
                (0..line.len())
                    .step_by(2)
                    .map(|k| u8::from_str_radix(&line[k..k + 2], 16).unwrap()),
            );
            put("wal_record", &format!("pg{major}-record-{i}"), &v);
        }
        let ctl = std::fs::read(fixtures.join(format!("pg_control/pg_control-{major}"))).unwrap();
        put(
            "pg_control",
            &format!("pg{major}-fixture"),
            &with_mode(0, &ctl),
        );
        if major == 15 || major == 18 {
            put(
                "pg_control",
                &format!("pg{major}-fixture-crc-fixed"),
                &with_mode(1, &ctl),
            );
        }
    }
    let mut all = Vec::new();
    for p in files(&corpus_dir("wal_segment")) {
        let data = std::fs::read(&p).unwrap();
        let s = pgkeep_pg::walrecords::SegmentSummary::of_segment(&data, &p).unwrap();
        let name = p.file_name().unwrap().to_str().unwrap();
        put(
            "wal_record",
            &format!("summary-{name}"),
            &with_mode(1, &serde_json::to_vec(&s).unwrap()),
        );
        all.push(s);
    }
    if all.len() >= 2 {
        put(
            "wal_record",
            "summaries-pair",
            &with_mode(1, &serde_json::to_vec(&all[..2]).unwrap()),
        );
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    blobs_and_pack();
    wal_records();
    let tmp = tempfile::tempdir().unwrap();
    repositories(tmp.path()).await;
    if let Some(i) = args.iter().position(|a| a == "--from-repo") {
        from_repo(Path::new(&args[i + 1]));
    }
}
