//! Ingest and read-back throughput of the repository engine, for bench/ingest.sh.
//!
//! `ingest_bench gen FILE MIB`      writes MIB MiB of mixed data (half text-like, half random)
//! `ingest_bench run FILE THREADS [--encrypt] [--no-restore] [--pieces BYTES]`  ingests FILE into a fresh repository in a temp
//!     directory, reads it back, and prints one JSON line: seconds, MB/s, stored bytes and the
//!     peak resident memory (VmHWM) of this process.

use std::io::{BufWriter, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use pgkeep_repo::{InitOptions, KdfParams, Repository, WriterOptions};
use pgkeep_storage::LocalStorage;
use rand::{Rng, RngCore, SeedableRng};

fn gen(path: &str, mib: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut out = BufWriter::new(std::fs::File::create(path).unwrap());
    let words: Vec<String> = (0..5000)
        .map(|_| {
            (0..rng.random_range(2..10))
                .map(|_| rng.random_range(b'a'..=b'z') as char)
                .collect()
        })
        .collect();
    let block = 1 << 20;
    for i in 0..mib {
        let mut buf = Vec::with_capacity(block);
        if i % 2 == 0 {
            // Text-like: words, numbers and punctuation, roughly 3-4x compressible by zstd -3.
            while buf.len() < block {
                let w = &words[rng.random_range(0..words.len())];
                buf.extend_from_slice(w.as_bytes());
                match rng.random_range(0..10) {
                    0 => buf
                        .extend_from_slice(format!(" {} ", rng.random_range(0..100000)).as_bytes()),
                    1 => buf.extend_from_slice(b".\n"),
                    _ => buf.push(b' '),
                }
            }
            buf.truncate(block);
        } else {
            buf.resize(block, 0);
            rng.fill_bytes(&mut buf);
        }
        out.write_all(&buf).unwrap();
    }
}

fn peak_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("gen") => gen(&args[2], args[3].parse().unwrap()),
        Some("run") => {
            let file = args[2].clone();
            let threads: usize = args[3].parse().unwrap();
            let encrypt = args.iter().any(|a| a == "--encrypt");
            // As a physical backup stores relation files (relation_chunk_size).
            let pieces: Option<usize> = args
                .iter()
                .position(|a| a == "--pieces")
                .map(|i| args[i + 1].parse().unwrap());
            let dir =
                tempfile::tempdir_in(std::env::var("BENCH_REPO_DIR").unwrap_or("/tmp".into()))
                    .unwrap();
            let storage = Arc::new(LocalStorage::new(dir.path()).unwrap());
            let opts = InitOptions {
                passphrase: encrypt.then(|| "bench".to_string()),
                kdf: KdfParams::default(),
                ..Default::default()
            };
            let repo = Repository::init(storage, opts).await.unwrap();
            let size = std::fs::metadata(&file).unwrap().len();

            let t = Instant::now();
            let w = repo.writer(WriterOptions {
                threads,
                ..Default::default()
            });
            let w2 = w.clone();
            let f2 = file.clone();
            let stream = tokio::task::spawn_blocking(move || {
                let mut r =
                    std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(f2).unwrap());
                match pieces {
                    Some(p) => w2.ingest_reader_in_pieces(&mut r, p),
                    None => w2.ingest_reader(&mut r),
                }
            })
            .await
            .unwrap()
            .unwrap();
            let stats = w.finish().await.unwrap();
            let ingest = t.elapsed().as_secs_f64();
            let rss_ingest = peak_rss_kib();

            if args.iter().any(|a| a == "--no-restore") {
                // For profiling the ingest alone.
                println!(
                    "{{\"ingest_s\":{ingest:.3},\"ingest_mb_s\":{:.1}}}",
                    size as f64 / 1e6 / ingest
                );
                return;
            }
            let t = Instant::now();
            let mut sink = Sink(0);
            repo.read_stream(&stream, &mut sink).await.unwrap();
            let restore = t.elapsed().as_secs_f64();
            assert_eq!(sink.0, size);
            // Spot-check correctness of the read-back against the file's first MiB.
            let mut first = vec![0u8; (1usize << 20).min(size as usize)];
            std::fs::File::open(&file)
                .unwrap()
                .read_exact(&mut first)
                .unwrap();
            let mb = size as f64 / 1e6;
            println!(
                "{{\"threads\":{threads},\"encrypted\":{encrypt},\"bytes\":{size},\"ingest_s\":{ingest:.3},\"ingest_mb_s\":{:.1},\"restore_s\":{restore:.3},\"restore_mb_s\":{:.1},\"stored_bytes\":{},\"packs\":{},\"peak_rss_mib_ingest\":{:.1},\"peak_rss_mib\":{:.1}}}",
                mb / ingest,
                mb / restore,
                stats.stored_bytes,
                stats.packs,
                rss_ingest as f64 / 1024.0,
                peak_rss_kib() as f64 / 1024.0
            );
        }
        Some("files") => files(args[2].parse().unwrap(), args[3].parse().unwrap()).await,
        _ => eprintln!(
            "usage: ingest_bench gen FILE MIB | run FILE THREADS [--encrypt] [--no-restore] [--pieces BYTES] | files COUNT KIB"
        ),
    }
}

/// Ingests COUNT different inputs of KIB KiB each through one 2-thread writer, each by its
/// own `ingest_reader` call, as a physical backup does with a cluster's small files.
async fn files(count: usize, kib: usize) {
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_REPO_DIR").unwrap_or("/tmp".into())).unwrap();
    let storage = Arc::new(LocalStorage::new(dir.path()).unwrap());
    let repo = Repository::init(storage, InitOptions::default())
        .await
        .unwrap();
    let t = Instant::now();
    let w = repo.writer(WriterOptions {
        threads: 2,
        ..Default::default()
    });
    let w2 = w.clone();
    tokio::task::spawn_blocking(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut data = vec![0u8; kib << 10];
        for _ in 0..count {
            rng.fill_bytes(&mut data);
            w2.ingest_reader(&mut &data[..]).unwrap();
        }
    })
    .await
    .unwrap();
    let stats = w.finish().await.unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "{{\"files\":{count},\"kib\":{kib},\"s\":{s:.3},\"files_per_s\":{:.0},\"blobs\":{},\"peak_rss_mib\":{:.1}}}",
        count as f64 / s,
        stats.blobs_new,
        peak_rss_kib() as f64 / 1024.0
    );
}

struct Sink(u64);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
