//! Reading streams back: parallel range reads, every blob verified before use.

use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};

use crate::error::{RepoError, Result};
use crate::format::StreamRef;
use crate::id::{BlobId, PackId};
use crate::index::BlobLocation;
use crate::pack::{decode_blob, decode_blob_into, pack_key};
use crate::repository::Repository;
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

/// Decodes the blobs of one range read, handing each to a visitor with its index.
trait DecodeRequest:
    Fn(Bytes, &mut dyn FnMut(usize, Vec<u8>) -> Result<()>) -> Result<()> + Clone + Send + 'static
{
}

impl<F> DecodeRequest for F where
    F: Fn(Bytes, &mut dyn FnMut(usize, Vec<u8>) -> Result<()>) -> Result<()>
        + Clone
        + Send
        + 'static
{
}

/// A destination written by position, from several threads at once (a file, through
/// `pwrite`). Each byte range is written at least once, in no particular order.
pub trait PositionalSink: Send + Sync + 'static {
    /// Writes all of `data` at `offset`. The address of `data` is congruent to `offset`
    /// modulo [`DIRECT_IO_ALIGN`], so its whole pages can go to a file opened with
    /// `O_DIRECT` as they are.
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
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
        F: Fn(Bytes) -> Result<T> + Clone + Send + 'static,
    {
        let key = pack_key(&req.pack);
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
                let decode = decode.clone();
                tokio::task::spawn_blocking(move || decode(data))
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
        move |data: Bytes, each: &mut dyn FnMut(usize, Vec<u8>) -> Result<()>| {
            with_decompressor(|d| {
                let name = format!("pack {pack}");
                for (i, (id, loc)) in blobs.iter().enumerate() {
                    let s = (loc.offset as u64 - start) as usize;
                    let stored = &data[s..s + loc.length as usize];
                    each(
                        i,
                        decode_blob(&sealer, d, id, loc.raw_length, stored, &name)?,
                    )?;
                }
                Ok(())
            })
        }
    }

    async fn fetch_and_decode(&self, req: &Request) -> Result<Vec<Vec<u8>>> {
        let decode = self.decode_request(req);
        self.fetch_then(req, move |data| {
            let mut out = Vec::new();
            decode(data, &mut |_, b| {
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
        let mut results = stream::iter(reqs.iter())
            .map(|r| self.fetch_and_decode(r))
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
    /// blobs of each range read are verified and decoded into one page-aligned buffer, which
    /// the decoding thread writes at once, so decoding and writing of several ranges overlap
    /// and no decoded range waits for an earlier one. Every byte written was authenticated; a
    /// range may be written twice when it is read again after a failed verification. Returns
    /// the bytes written (the stream's size).
    pub async fn read_stream_at(
        &self,
        stream: &StreamRef,
        base: u64,
        sink: Arc<dyn PositionalSink>,
    ) -> Result<u64> {
        let reqs = self.plan(stream)?;
        let mut offset = base;
        let mut jobs = Vec::with_capacity(reqs.len());
        for r in &reqs {
            jobs.push((r, offset));
            offset += r
                .blobs
                .iter()
                .map(|(_, l)| l.raw_length as u64)
                .sum::<u64>();
        }
        if offset - base != stream.size {
            return Err(RepoError::integrity(
                "stream",
                format!(
                    "its blobs hold {} bytes, the stream says {}",
                    offset - base,
                    stream.size
                ),
            ));
        }
        let mut results = stream::iter(jobs)
            .map(|(r, at)| {
                let sealer = self.sealer().clone();
                let blobs = Arc::new(r.blobs.clone());
                let (start, pack) = (r.start, r.pack);
                let sink = sink.clone();
                self.fetch_then(r, move |data| {
                    let total: usize = blobs.iter().map(|(_, l)| l.raw_length as usize).sum();
                    // The decoded range sits in its buffer at the same offset modulo the page
                    // size as in the file, so that the sink can hand its whole pages to the
                    // file system without a copy (direct I/O).
                    let pad = (at % DIRECT_IO_ALIGN as u64) as usize;
                    let mut buf = take_buffer(pad + total);
                    let dst = &mut buf.as_mut_slice()[pad..pad + total];
                    with_decompressor(|d| {
                        let name = format!("pack {pack}");
                        let mut pos = 0usize;
                        for (id, loc) in blobs.iter() {
                            let s = (loc.offset as u64 - start) as usize;
                            let stored = &data[s..s + loc.length as usize];
                            let n = loc.raw_length as usize;
                            decode_blob_into(
                                &sealer,
                                d,
                                id,
                                stored,
                                &mut dst[pos..pos + n],
                                &name,
                            )?;
                            pos += n;
                        }
                        Ok(())
                    })?;
                    sink.write_at(at, dst).map_err(|e| {
                        RepoError::Invalid(format!("writing restored data failed: {e}"))
                    })?;
                    give_back(buf);
                    Ok(total as u64)
                })
            })
            .buffer_unordered(READS_IN_FLIGHT);
        let mut written = 0u64;
        while let Some(n) = results.next().await {
            written += n?;
        }
        Ok(written)
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
