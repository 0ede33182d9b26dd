//! Many small streams read back together (`Repository::read_streams_at`), as a restore
//! reads its small files: identical bytes, few range reads, faults retried or named.

use std::sync::Arc;

use pgkeep_repo::{
    ErrorKind, InitOptions, KdfParams, PositionalSink, Repository, StreamRef, StreamTarget,
    WriterOptions,
};
use pgkeep_storage::{Faulty, LocalStorage, Storage};
use rand::{RngCore, SeedableRng};

/// A sink that writes by position into memory, as a restore writes into a file.
#[derive(Default)]
struct VecSink(std::sync::Mutex<Vec<u8>>);

impl PositionalSink for VecSink {
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut v = self.0.lock().unwrap();
        let (start, end) = (offset as usize, offset as usize + data.len());
        if v.len() < end {
            v.resize(end, 0);
        }
        v[start..end].copy_from_slice(data);
        Ok(())
    }
}

/// Half compressible, half random, `len` bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    for (i, b) in v[..len / 2].iter_mut().enumerate() {
        *b = b"pgkeep small file "[i % 18];
    }
    rng.fill_bytes(&mut v[len / 2..]);
    v
}

/// An encrypted repository on a local directory behind a fault injector, holding `n` small
/// streams of 0 to ~64 KiB (the second one a copy of the first, deduplicated), stored by one
/// writer as a backup stores a directory of small files.
async fn small_streams(
    dir: &std::path::Path,
    n: usize,
) -> (
    Repository,
    Arc<Faulty<LocalStorage>>,
    Vec<(StreamRef, Vec<u8>)>,
) {
    let faulty = Arc::new(Faulty::new(LocalStorage::new(dir).unwrap()));
    let storage: Arc<dyn Storage> = faulty.clone();
    let opts = InitOptions {
        passphrase: Some("pw".into()),
        kdf: KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        },
        ..Default::default()
    };
    let repo = Repository::init(storage, opts).await.unwrap();
    let w = repo.writer(WriterOptions::default());
    let mut out = Vec::new();
    for i in 0..n {
        let bytes = match i {
            0 => data(40_000, 0),
            1 => data(40_000, 0),
            2 => Vec::new(),
            _ => data((i * 7919) % 65_536, i as u64),
        };
        let (w2, b2) = (w.clone(), bytes.clone());
        let s = tokio::task::spawn_blocking(move || w2.ingest_bytes(&b2))
            .await
            .unwrap()
            .unwrap();
        out.push((s, bytes));
    }
    w.finish().await.unwrap();
    (repo, faulty, out)
}

/// Reads every stream through one `read_streams_at` call, stream `i` placed at `i * 512`
/// in its sink (so that page alignment varies), and returns what each sink got from there.
async fn read_all(
    repo: &Repository,
    streams: &[(StreamRef, Vec<u8>)],
) -> Result<Vec<Vec<u8>>, pgkeep_repo::StreamsError> {
    let sinks: Vec<Arc<VecSink>> = streams.iter().map(|_| Arc::default()).collect();
    let targets: Vec<StreamTarget> = streams
        .iter()
        .zip(&sinks)
        .enumerate()
        .map(|(i, ((s, _), sink))| StreamTarget {
            stream: s.clone(),
            base: i as u64 * 512,
            sink: sink.clone(),
        })
        .collect();
    let written = repo.read_streams_at(&targets).await?;
    let sizes: Vec<u64> = streams.iter().map(|(s, _)| s.size).collect();
    assert_eq!(written, sizes, "bytes reported per stream");
    Ok(sinks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v = s.0.lock().unwrap();
            v.get(i * 512..).map(<[u8]>::to_vec).unwrap_or_default()
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_streams_read_together_come_back_identical_with_a_few_range_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, faulty, streams) = small_streams(dir.path(), 200).await;
    let packs = repo.storage().list("packs/").await.unwrap().len() as u64;
    let before = faulty.calls();
    let got = read_all(&repo, &streams).await.unwrap();
    let reads = faulty.calls() - before;
    for (i, ((_, want), got)) in streams.iter().zip(&got).enumerate() {
        assert!(
            got == want,
            "stream {i}: {} bytes back, {} stored",
            got.len(),
            want.len()
        );
    }
    // One stream at a time, 197 non-empty streams cost 197 reads at least; read together,
    // about one per 8 MiB decoded of each pack.
    assert!(
        reads <= 2 * packs + 2,
        "{reads} storage calls for 200 streams in {packs} pack(s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_shared_read_is_read_again_and_a_persistent_one_names_a_stream_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, faulty, streams) = small_streams(dir.path(), 40).await;
    faulty.flip_next_reads(1);
    let got = read_all(&repo, &streams).await.unwrap();
    assert!(
        streams.iter().zip(&got).all(|((_, want), got)| got == want),
        "one flipped read was not read again"
    );
    faulty.flip_next_reads(1000);
    let err = read_all(&repo, &streams)
        .await
        .expect_err("every read garbled");
    assert_eq!(err.error.kind(), ErrorKind::Integrity, "{:?}", err.error);
    assert!(
        err.target < streams.len() && streams[err.target].0.size > 0,
        "{err:?}"
    );
    let msg = err.error.to_string();
    assert!(msg.contains("blob") && msg.contains("pack"), "{msg}");
}
