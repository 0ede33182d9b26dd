//! Reading many small streams with few requests.
//!
//! A restore writes hundreds of small files (catalogs, free-space and visibility maps, small
//! relations) whose blobs lie next to each other in the same packs. Read one stream at a
//! time, each costs at least one range request; on object storage a request costs a round
//! trip and the server's CPU, and those requests were most of a restore of pgbench scale 50
//! from S3 (about 1,000 requests for 33 MiB stored). Planned together, neighbouring blobs of
//! different streams share one range read, and gaps of up to [`MAX_GAP`] are read and skipped
//! rather than paid for with another request.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::stream::{self, StreamExt};

use super::{
    with_decompressor, FetchedRange, PositionalSink, Request, MAX_REQUEST, MAX_REQUEST_RAW,
    READS_IN_FLIGHT,
};
use crate::error::RepoError;
use crate::format::StreamRef;
use crate::id::{BlobId, PackId};
use crate::index::BlobLocation;
use crate::repository::Repository;

/// Stored bytes a shared read may span between two wanted blobs: reading them costs less
/// than another request (a round trip on object storage).
pub const MAX_GAP: u64 = 256 * 1024;

/// One stream of a [`Repository::read_streams_at`] call: its bytes go through `sink`,
/// starting at `base`.
pub struct StreamTarget {
    /// What to write.
    pub stream: StreamRef,
    /// Where its first byte goes in the sink.
    pub base: u64,
    /// Where it goes.
    pub sink: Arc<dyn PositionalSink>,
}

/// A failure of [`Repository::read_streams_at`], with the index of the target it hit (for a
/// failed read shared by several, the first of them).
#[derive(Debug)]
pub struct StreamsError {
    /// Index in the targets given.
    pub target: usize,
    /// What went wrong.
    pub error: RepoError,
}

/// A blob to read, and where its plaintext goes.
#[derive(Clone, Copy)]
struct Placed {
    id: BlobId,
    loc: BlobLocation,
    target: usize,
    at: u64,
}

/// One range read serving blobs of one or more targets.
struct SharedRead {
    pack: PackId,
    pack_no: u32,
    start: u64,
    end: u64,
    raw: u64,
    blobs: Vec<Placed>,
}

impl Repository {
    /// Writes every target's stream through its sink, out of order, planning the range reads
    /// of all of them together: blobs that lie within [`MAX_GAP`] of each other in a pack
    /// are fetched by one read, whichever streams they belong to, up to the same size and
    /// decoded-size limits as [`Repository::read_stream_at`]. Every byte written was
    /// authenticated. Returns the bytes written per target (each its stream's size).
    pub async fn read_streams_at(
        &self,
        targets: &[StreamTarget],
    ) -> std::result::Result<Vec<u64>, StreamsError> {
        let reads = self.plan_shared(targets)?;
        let sinks: Arc<Vec<Arc<dyn PositionalSink>>> =
            Arc::new(targets.iter().map(|t| t.sink.clone()).collect());
        let mut written = vec![0u64; targets.len()];
        let mut results = stream::iter(reads)
            .map(|r| self.fetch_shared(r, sinks.clone()))
            .buffer_unordered(READS_IN_FLIGHT);
        while let Some(done) = results.next().await {
            for (t, n) in done? {
                written[t] += n;
            }
        }
        for (t, target) in targets.iter().enumerate() {
            if written[t] != target.stream.size {
                return Err(StreamsError {
                    target: t,
                    error: RepoError::integrity(
                        "stream",
                        format!(
                            "restored {} bytes, expected {}",
                            written[t], target.stream.size
                        ),
                    ),
                });
            }
        }
        Ok(written)
    }

    /// The order in which to hand streams to [`Repository::read_streams_at`] so that
    /// neighbours in the packs come together: by the location of each stream's first blob
    /// (empty or unknown streams last). Returns indices into `streams`.
    pub fn order_by_location(&self, streams: &[&StreamRef]) -> Vec<usize> {
        let index = self.inner.index.read().unwrap();
        let mut keyed: Vec<((u32, u32), usize)> = streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let key = s
                    .blobs
                    .first()
                    .and_then(|b| index.get(&b.id))
                    .map_or((u32::MAX, 0), |l| (l.pack, l.offset));
                (key, i)
            })
            .collect();
        keyed.sort();
        keyed.into_iter().map(|(_, i)| i).collect()
    }

    fn plan_shared(
        &self,
        targets: &[StreamTarget],
    ) -> std::result::Result<Vec<SharedRead>, StreamsError> {
        let index = self.inner.index.read().unwrap();
        let mut placed = Vec::new();
        for (t, target) in targets.iter().enumerate() {
            let fail = |error| StreamsError { target: t, error };
            let mut at = target.base;
            for b in &target.stream.blobs {
                let loc = index.get(&b.id).ok_or_else(|| {
                    fail(RepoError::integrity(
                        format!("blob {}", b.id),
                        "referenced but not in the index (its pack is missing or was never indexed)",
                    ))
                })?;
                if loc.raw_length != b.len {
                    return Err(fail(RepoError::integrity(
                        format!("blob {}", b.id),
                        format!(
                            "index says {} bytes, the stream says {}",
                            loc.raw_length, b.len
                        ),
                    )));
                }
                placed.push(Placed {
                    id: b.id,
                    loc,
                    target: t,
                    at,
                });
                at += b.len as u64;
            }
            if at - target.base != target.stream.size {
                return Err(fail(RepoError::integrity(
                    "stream",
                    format!(
                        "its blobs hold {} bytes, the stream says {}",
                        at - target.base,
                        target.stream.size
                    ),
                )));
            }
        }
        placed.sort_by_key(|p| (p.loc.pack, p.loc.offset, p.target, p.at));
        let mut reads: Vec<SharedRead> = Vec::new();
        for p in placed {
            let (s, e) = (
                p.loc.offset as u64,
                p.loc.offset as u64 + p.loc.length as u64,
            );
            let raw = p.loc.raw_length as u64;
            match reads.last_mut() {
                Some(r)
                    if r.pack_no == p.loc.pack
                        && s <= r.end + MAX_GAP
                        && e.max(r.end) - r.start <= MAX_REQUEST
                        && r.raw + raw <= MAX_REQUEST_RAW =>
                {
                    r.end = r.end.max(e);
                    r.raw += raw;
                    r.blobs.push(p);
                }
                _ => reads.push(SharedRead {
                    pack: index.pack(p.loc.pack).0,
                    pack_no: p.loc.pack,
                    start: s,
                    end: e,
                    raw,
                    blobs: vec![p],
                }),
            }
        }
        Ok(reads)
    }

    /// Reads one shared range, decodes its blobs and writes each run of them (consecutive
    /// blobs of one target at consecutive offsets) with one positional write. Returns the
    /// bytes written per target.
    async fn fetch_shared(
        &self,
        read: SharedRead,
        sinks: Arc<Vec<Arc<dyn PositionalSink>>>,
    ) -> std::result::Result<Vec<(usize, u64)>, StreamsError> {
        // The target being written when an error comes: the one to name.
        let current = Arc::new(AtomicUsize::new(read.blobs[0].target));
        let req = Request {
            pack: read.pack,
            start: read.start,
            end: read.end,
            blobs: read.blobs.iter().map(|p| (p.id, p.loc)).collect(),
        };
        let sealer = self.sealer().clone();
        let placed = Arc::new(read.blobs);
        let (start, pack) = (read.start, read.pack);
        let cur = current.clone();
        self.fetch_then(&req, move |data, bases| {
            let mut out = Vec::new();
            let name = format!("pack {pack}");
            let range = FetchedRange {
                data: &data,
                start,
                name: &name,
                sealer: &sealer,
                bases,
            };
            with_decompressor(|d| {
                for run in runs(&placed) {
                    let run = &placed[run];
                    let (t, at) = (run[0].target, run[0].at);
                    cur.store(t, Ordering::Relaxed);
                    let blobs = run.iter().map(|p| (&p.id, &p.loc));
                    out.push((t, range.write_run(d, blobs, at, &*sinks[t])?));
                }
                Ok(())
            })?;
            Ok(out)
        })
        .await
        .map_err(|error| StreamsError {
            target: current.load(Ordering::Relaxed),
            error,
        })
    }
}

/// Index ranges of `placed` that are runs: consecutive blobs of the same target at
/// consecutive offsets, written with one call.
fn runs(placed: &[Placed]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, p) in placed.iter().enumerate() {
        match out.last_mut() {
            Some(r) => {
                let prev = &placed[i - 1];
                if prev.target == p.target && prev.at + prev.loc.raw_length as u64 == p.at {
                    r.end = i + 1;
                } else {
                    out.push(i..i + 1);
                }
            }
            None => out.push(i..i + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(target: usize, at: u64, raw: u32) -> Placed {
        Placed {
            id: crate::id::Id([0; 32]),
            loc: BlobLocation {
                pack: 0,
                offset: 0,
                length: raw,
                raw_length: raw,
            },
            target,
            at,
        }
    }

    #[test]
    fn runs_break_at_a_new_target_or_a_jump() {
        let p = [
            placed(0, 0, 10),
            placed(0, 10, 5),
            placed(1, 0, 4),
            placed(1, 8, 4),
            placed(0, 15, 1),
        ];
        assert_eq!(runs(&p), vec![0..2, 2..3, 3..4, 4..5]);
        assert!(runs(&[]).is_empty());
    }

    /// Writes by position into memory, as a restore writes into a file.
    #[derive(Default)]
    struct VecSink(std::sync::Mutex<Vec<u8>>);

    impl PositionalSink for VecSink {
        fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut v = self.0.lock().unwrap();
            let end = offset as usize + data.len();
            if v.len() < end {
                v.resize(end, 0);
            }
            v[offset as usize..end].copy_from_slice(data);
            Ok(())
        }
    }

    /// A backup's writer threads compress a file's pieces in parallel and its packer appends
    /// them as they finish, so consecutive pieces often sit swapped in the pack. Reads
    /// planned along the file then found no two neighbours: a restore of pgbench scale 50
    /// from S3 made 229 requests of one 1 MiB piece each. Planned in pack order (as shared
    /// reads are), a stream costs about one read per 8 MiB decoded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_whose_pieces_are_swapped_in_the_pack_is_read_with_one_request_per_8_mib() {
        use pgkeep_storage::{Faulty, LocalStorage};
        let dir = tempfile::tempdir().unwrap();
        let faulty = Arc::new(Faulty::new(LocalStorage::new(dir.path()).unwrap()));
        let repo = Repository::init(faulty.clone(), crate::InitOptions::default())
            .await
            .unwrap();
        let piece = 1usize << 20;
        let pieces: Vec<Vec<u8>> = (0..64)
            .map(|p| {
                let mut v = Vec::with_capacity(piece);
                let mut row = 0;
                while v.len() < piece {
                    v.extend_from_slice(format!("piece {p:02} row {row:06} filler\n").as_bytes());
                    row += 1;
                }
                v.truncate(piece);
                v
            })
            .collect();
        // Stored in the order 1, 0, 3, 2, ...: each piece's neighbour in the file is never
        // the next blob in the pack.
        let w = repo.writer(crate::WriterOptions {
            threads: 1,
            ..Default::default()
        });
        let (w2, p2) = (w.clone(), pieces.clone());
        let mut refs = tokio::task::spawn_blocking(move || {
            let mut refs = vec![None; p2.len()];
            for pair in (0..p2.len()).collect::<Vec<_>>().chunks(2) {
                for &i in pair.iter().rev() {
                    refs[i] = Some(w2.store_blob(bytes::Bytes::from(p2[i].clone())).unwrap());
                }
            }
            refs
        })
        .await
        .unwrap();
        w.finish().await.unwrap();
        let stream = StreamRef {
            size: (pieces.len() * piece) as u64,
            blobs: refs.iter_mut().map(|r| r.take().unwrap()).collect(),
        };
        let packs = repo.storage().list("packs/").await.unwrap().len() as u64;
        let sink = Arc::new(VecSink::default());
        let before = faulty.calls();
        let n = repo.read_stream_at(&stream, 0, sink.clone()).await.unwrap();
        let reads = faulty.calls() - before;
        assert_eq!(n, stream.size);
        assert!(*sink.0.lock().unwrap() == pieces.concat(), "read back");
        assert!(
            reads <= 64 / 8 + 2 * packs,
            "{reads} reads for 64 MiB in {packs} pack(s)"
        );
    }
}
