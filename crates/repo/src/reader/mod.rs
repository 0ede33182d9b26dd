//! Reading streams back: parallel range reads, every blob verified before use.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use futures::FutureExt;
use tokio_util::task::AbortOnDropHandle;

use crate::error::{RepoError, Result};
use crate::format::StreamRef;
use crate::id::{BlobId, PackId};
use crate::index::BlobLocation;

mod many;
use crate::pack::{decode_blob, decode_blob_into, pack_key, BasePlaintexts};
use crate::repository::Repository;
pub use many::{StreamTarget, StreamsError, MAX_GAP};
use pgkeep_storage::{AlignedBuf, DIRECT_IO_ALIGN};

/// Reads larger than this are not coalesced further.
const MAX_REQUEST: u64 = 8 * 1024 * 1024;
/// Range reads in flight per stream.
const READS_IN_FLIGHT: usize = 6;
/// A request is also cut at this many decoded bytes: its blobs are held decoded until
/// written, and well-compressing data (pgbench's compresses ~35x) would otherwise put
/// hundreds of MiB of one 8 MiB range in memory (restores peaked near 300 MiB).
const MAX_REQUEST_RAW: u64 = 8 * 1024 * 1024;

/// Range reads in flight in this process, over all streams: each holds up to
/// [`MAX_REQUEST`] stored bytes and [`MAX_REQUEST_RAW`] decoded ones, so this caps read-back
/// memory near 12 x 16 MiB whatever the parallelism of the caller.
static RANGE_READS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(12);

/// Size of the pooled decode buffers: one request's decoded bytes plus alignment slack.
const POOLED_BUF: usize = MAX_REQUEST_RAW as usize + 2 * DIRECT_IO_ALIGN;

/// Decode buffers kept for reuse: fresh memory costs a page fault and zeroing per page,
/// about as much as the decoding itself.
static BUF_POOL: std::sync::Mutex<Vec<AlignedBuf>> = std::sync::Mutex::new(Vec::new());

fn take_buffer(len: usize) -> AlignedBuf {
    if len > POOLED_BUF {
        return AlignedBuf::new(len);
    }
    BUF_POOL
        .lock()
        .unwrap()
        .pop()
        .unwrap_or_else(|| AlignedBuf::new(POOLED_BUF))
}

fn give_back(buf: AlignedBuf) {
    let mut pool = BUF_POOL.lock().unwrap();
    // As many as reads can be in flight; the rest are freed.
    if buf.len() == POOLED_BUF && pool.len() < 12 {
        pool.push(buf);
    }
}

thread_local! {
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's zstd decompression context (made once per thread: making one
/// per range read showed in profiles).
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> Result<T>,
) -> Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| RepoError::Invalid(format!("zstd init: {e}")))?,
            );
        }
        f(slot.as_mut().expect("just set"))
    })
}

/// Decodes the blobs of one range read (with the bases its delta blobs need), handing each
/// to a visitor with its index.
trait DecodeRequest:
    Fn(Bytes, &BasePlaintexts, &mut dyn FnMut(usize, Vec<u8>) -> Result<()>) -> Result<()>
    + Clone
    + Send
    + 'static
{
}

impl<F> DecodeRequest for F where
    F: Fn(Bytes, &BasePlaintexts, &mut dyn FnMut(usize, Vec<u8>) -> Result<()>) -> Result<()>
        + Clone
        + Send
        + 'static
{
}

/// Decoded bases kept for delta blobs: the delta blobs of a stream share most of their
/// bases with their neighbours, so each is fetched and decoded about once.
const BASE_CACHE_BYTES: usize = 32 << 20;

/// A small FIFO cache of base plaintexts (see [`BASE_CACHE_BYTES`]).
#[derive(Default)]
pub(crate) struct BaseCache {
    map: std::collections::HashMap<BlobId, Bytes>,
    order: std::collections::VecDeque<BlobId>,
    bytes: usize,
}

impl BaseCache {
    fn get(&self, id: &BlobId) -> Option<Bytes> {
        self.map.get(id).cloned()
    }

    fn insert(&mut self, id: BlobId, plain: Bytes) {
        if self.map.contains_key(&id) {
            return;
        }
        self.bytes += plain.len();
        self.map.insert(id, plain);
        self.order.push_back(id);
        while self.bytes > BASE_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.map.remove(&old) {
                self.bytes -= b.len();
            }
        }
    }
}

/// A destination written by position, from several threads at once (a file, through
/// `pwrite`). Each byte range is written at least once, in no particular order.
pub trait PositionalSink: Send + Sync + 'static {
    /// Writes all of `data` at `offset`. The address of `data` is congruent to `offset`
    /// modulo [`DIRECT_IO_ALIGN`], so its whole pages can go to a file opened with
    /// `O_DIRECT` as they are.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
}

/// A range read from a pack, with what decoding its blobs needs.
struct FetchedRange<'a> {
    /// The bytes read, from `start` in the pack.
    data: &'a [u8],
    start: u64,
    /// The pack, for errors.
    name: &'a str,
    sealer: &'a crate::crypto::Sealer,
    bases: &'a BasePlaintexts,
}

impl FetchedRange<'_> {
    /// Decodes a run of blobs (consecutive in one file) into one buffer that lines up with
    /// the file's pages, so the sink can write whole pages directly, and writes it at `at`
    /// with one call. Returns the bytes written.
    fn write_run<'b>(
        &self,
        d: &mut zstd::bulk::Decompressor<'_>,
        blobs: impl Iterator<Item = (&'b BlobId, &'b BlobLocation)> + Clone,
        at: u64,
        sink: &dyn PositionalSink,
    ) -> Result<u64> {
        let total: usize = blobs.clone().map(|(_, l)| l.raw_length as usize).sum();
        let pad = (at % DIRECT_IO_ALIGN as u64) as usize;
        let mut buf = take_buffer(pad + total);
        let dst = &mut buf.as_mut_slice()[pad..pad + total];
        let mut pos = 0usize;
        for (id, loc) in blobs {
            let s = (loc.offset as u64 - self.start) as usize;
            let stored = &self.data[s..s + loc.length as usize];
            let n = loc.raw_length as usize;
            decode_blob_into(
                self.sealer,
                d,
                id,
                stored,
                &mut dst[pos..pos + n],
                self.bases,
                self.name,
            )?;
            pos += n;
        }
        sink.write_at(at, dst)
            .map_err(|e| RepoError::Invalid(format!("writing restored data failed: {e}")))?;
        give_back(buf);
        Ok(total as u64)
    }
}

/// The result of a spawned read; a panic in it is resumed here.
fn joined<T>(r: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    match r {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(RepoError::Invalid(format!("read task failed: {e}"))),
    }
}

struct Request {
    pack: PackId,
    start: u64,
    end: u64,
    blobs: Vec<(BlobId, BlobLocation)>,
}

impl Repository {
    fn plan(&self, stream: &StreamRef) -> Result<Vec<Request>> {
        let index = self.inner.index.read().unwrap();
        let mut reqs: Vec<Request> = Vec::new();
        for b in &stream.blobs {
            let loc = index.get(&b.id).ok_or_else(|| {
                RepoError::integrity(
                    format!("blob {}", b.id),
                    "referenced but not in the index (its pack is missing or was never indexed)",
                )
            })?;
            if loc.raw_length != b.len {
                return Err(RepoError::integrity(
                    format!("blob {}", b.id),
                    format!(
                        "index says {} bytes, the stream says {}",
                        loc.raw_length, b.len
                    ),
                ));
            }
            let (pack, _) = index.pack(loc.pack);
            let (s, e) = (loc.offset as u64, loc.offset as u64 + loc.length as u64);
            match reqs.last_mut() {
                Some(r)
                    if r.pack == pack
                        && r.end == s
                        && e - r.start <= MAX_REQUEST
                        && r.blobs
                            .iter()
                            .map(|(_, l)| l.raw_length as u64)
                            .sum::<u64>()
                            + loc.raw_length as u64
                            <= MAX_REQUEST_RAW =>
                {
                    r.end = e;
                    r.blobs.push((b.id, loc));
                }
                _ => reqs.push(Request {
                    pack,
                    start: s,
                    end: e,
                    blobs: vec![(b.id, loc)],
                }),
            }
        }
        Ok(reqs)
    }

    /// Reads the request's byte range and runs `decode` on it (on the blocking pool). A
    /// garbled or short read may be the transfer's fault, so an integrity failure is read
    /// once more before it is reported.
    async fn fetch_then<T, F>(&self, req: &Request, decode: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(Bytes, &BasePlaintexts) -> Result<T> + Clone + Send + 'static,
    {
        let key = pack_key(&req.pack);
        // Bases first, before a read permit is taken: they are read without one.
        let needed: Vec<BlobId> = {
            let index = self.inner.index.read().unwrap();
            req.blobs
                .iter()
                .filter_map(|(id, _)| index.bases_of(id))
                .flat_map(|b| b.to_vec())
                .collect()
        };
        let bases = Arc::new(self.load_bases(&needed).await?);
        // Bounds what all streams of this process hold at once (stored and decoded bytes),
        // however many files a restore writes in parallel.
        let _permit = RANGE_READS
            .acquire()
            .await
            .map_err(|e| RepoError::Invalid(format!("read limiter closed: {e}")))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = async {
                let data = self.storage().get_range(&key, req.start..req.end).await?;
                if data.len() as u64 != req.end - req.start {
                    return Err(RepoError::integrity(
                        format!("pack {}", req.pack),
                        format!(
                            "short read: {} of {} bytes",
                            data.len(),
                            req.end - req.start
                        ),
                    ));
                }
                let (decode, bases) = (decode.clone(), bases.clone());
                tokio::task::spawn_blocking(move || decode(data, &bases))
                    .await
                    .map_err(|e| RepoError::Invalid(format!("decode task failed: {e}")))?
            }
            .await;
            match res {
                Err(e) if attempt == 1 && is_integrity(&e) => {
                    tracing::warn!("{e}; reading it again");
                    continue;
                }
                other => return other,
            }
        }
    }

    /// Verifies and decodes each blob of `req` from `data` (its byte range), in order,
    /// handing each to `each` with its index in the request.
    fn decode_request(&self, req: &Request) -> impl DecodeRequest {
        let sealer = self.sealer().clone();
        let blobs = Arc::new(req.blobs.clone());
        let (start, pack) = (req.start, req.pack);
        move |data: Bytes,
              bases: &BasePlaintexts,
              each: &mut dyn FnMut(usize, Vec<u8>) -> Result<()>| {
            with_decompressor(|d| {
                let name = format!("pack {pack}");
                for (i, (id, loc)) in blobs.iter().enumerate() {
                    let s = (loc.offset as u64 - start) as usize;
                    let stored = &data[s..s + loc.length as usize];
                    each(
                        i,
                        decode_blob(&sealer, d, id, loc.raw_length, stored, bases, &name)?,
                    )?;
                }
                Ok(())
            })
        }
    }

    async fn fetch_and_decode(&self, req: &Request) -> Result<Vec<Vec<u8>>> {
        let decode = self.decode_request(req);
        self.fetch_then(req, move |data, bases| {
            let mut out = Vec::new();
            decode(data, bases, &mut |_, b| {
                out.push(b);
                Ok(())
            })?;
            Ok(out)
        })
        .await
    }

    /// Writes the stream to `out`, in order. Every byte written was authenticated.
    pub async fn read_stream<W: Write + Send>(
        &self,
        stream: &StreamRef,
        out: &mut W,
    ) -> Result<u64> {
        let reqs = self.plan(stream)?;
        // Each read runs as its own task, so the reads ahead keep fetching and decoding
        // while `out` blocks: polled only from here, they stood still during every write
        // into a full pipe, and pg_restore's server then waited for each next range to be
        // decoded (COPY took a tenth longer than from a local file).
        let mut results = stream::iter(reqs)
            .map(|r| {
                let repo = self.clone();
                // Aborted when dropped (an earlier range failed, or the caller gave up), so
                // no read outlives its stream.
                AbortOnDropHandle::new(tokio::spawn(async move { repo.fetch_and_decode(&r).await }))
                    .map(joined)
            })
            .buffered(READS_IN_FLIGHT);
        let mut written = 0u64;
        while let Some(blobs) = results.next().await {
            for b in blobs? {
                out.write_all(&b).map_err(|e| {
                    RepoError::Invalid(format!("writing restored data failed: {e}"))
                })?;
                written += b.len() as u64;
            }
        }
        if written != stream.size {
            return Err(RepoError::integrity(
                "stream",
                format!("restored {written} bytes, expected {}", stream.size),
            ));
        }
        Ok(written)
    }

    /// Writes the stream through `sink` at `base + offset in the stream`, out of order: the
    /// blobs of each range read are verified and decoded into one page-aligned buffer per run
    /// of blobs consecutive in the file, which the decoding thread writes at once, so decoding
    /// and writing of several ranges overlap and no decoded range waits for an earlier one.
    /// Every byte written was authenticated; a range may be written twice when it is read
    /// again after a failed verification. Returns the bytes written (the stream's size).
    ///
    /// The reads are planned in pack order, as for [`Repository::read_streams_at`], not in
    /// the stream's order: a backup's writer threads compress a file's pieces in parallel and
    /// the packer appends them as they finish, so consecutive pieces often sit swapped in the
    /// pack, and reads planned along the file found no two neighbours (a restore of pgbench
    /// scale 50 from S3 made 229 requests of one 1 MiB piece each; 137 requests in all now,
    /// from 379).
    pub async fn read_stream_at(
        &self,
        stream: &StreamRef,
        base: u64,
        sink: Arc<dyn PositionalSink>,
    ) -> Result<u64> {
        let target = many::StreamTarget {
            stream: stream.clone(),
            base,
            sink,
        };
        let written = self
            .read_streams_at(std::slice::from_ref(&target))
            .await
            .map_err(|e| e.error)?;
        Ok(written[0])
    }

    /// The plaintexts of the full blobs `ids` (duplicates allowed), from the base cache or
    /// fetched and verified in parallel. A base that is itself a delta is refused: bases are
    /// always full blobs, so decoding never chains.
    pub async fn load_bases(&self, ids: &[BlobId]) -> Result<BasePlaintexts> {
        if ids.is_empty() {
            return Ok(BasePlaintexts::new());
        }
        // One caller at a time: the ranges read in parallel share bases with their
        // neighbours, and each would otherwise fetch and decode the shared ones again.
        let _turn = self.inner.base_loader.lock().await;
        let mut out = BasePlaintexts::new();
        let mut missing = Vec::new();
        {
            let cache = self.inner.base_cache.lock().unwrap();
            for id in ids {
                if out.contains_key(id) || missing.contains(id) {
                    continue;
                }
                match cache.get(id) {
                    Some(b) => {
                        out.insert(*id, b);
                    }
                    None => missing.push(*id),
                }
            }
        }
        let fetched: Vec<Result<(BlobId, Bytes)>> = stream::iter(missing)
            .map(|id| self.fetch_base(id))
            .buffer_unordered(4)
            .collect()
            .await;
        let mut cache = self.inner.base_cache.lock().unwrap();
        for f in fetched {
            let (id, plain) = f?;
            cache.insert(id, plain.clone());
            out.insert(id, plain);
        }
        Ok(out)
    }

    async fn fetch_base(&self, id: BlobId) -> Result<(BlobId, Bytes)> {
        let (loc, pack, nested) = {
            let index = self.inner.index.read().unwrap();
            let loc = index.get(&id).ok_or_else(|| {
                RepoError::integrity(
                    format!("blob {id}"),
                    "a delta base that is in no index (its pack is missing or was never indexed)",
                )
            })?;
            (loc, index.pack(loc.pack).0, index.bases_of(&id).is_some())
        };
        if nested {
            return Err(RepoError::integrity(
                format!("blob {id}"),
                "a delta base that is itself a delta",
            ));
        }
        // A full blob needs no bases, so the load_bases inside returns before it would wait
        // for the turn its caller holds.
        let req = Request {
            pack,
            start: loc.offset as u64,
            end: loc.offset as u64 + loc.length as u64,
            blobs: vec![(id, loc)],
        };
        let plain = self.fetch_and_decode(&req).await?.pop().expect("one blob");
        Ok((id, Bytes::from(plain)))
    }

    /// Reads one blob.
    pub async fn read_blob(&self, id: &BlobId) -> Result<Vec<u8>> {
        let loc = self.inner.index.read().unwrap().get(id);
        let loc = loc.ok_or_else(|| RepoError::NotFound {
            what: format!("blob {id}"),
        })?;
        let s = StreamRef {
            size: loc.raw_length as u64,
            blobs: vec![crate::format::BlobRef {
                id: *id,
                len: loc.raw_length,
            }],
        };
        let mut v = Vec::with_capacity(loc.raw_length as usize);
        self.read_stream(&s, &mut v).await?;
        Ok(v)
    }
}

fn is_integrity(e: &RepoError) -> bool {
    e.kind() == crate::error::ErrorKind::Integrity
}
