//! The ingest pipeline.
//!
//! ```text
//! caller threads: read -> FastCDC chunk -> id (BLAKE3) -> dedup check --+
//!                                                                        v  bounded channel
//! worker threads (N):            zstd compress -> seal (AES-GCM) -------+
//!                                                                        v  bounded channel
//! packer thread:                 append to pack; full pack -> upload task (at most U at once)
//! upload tasks (tokio):          put pack -> remember (pack, blobs) -> index file every K packs
//! ```
//! Every channel is bounded, so memory stays flat whatever the input size: roughly
//! (2N chunks + 2N sealed blobs) x chunk size + (U + 1) x pack size.
//!
//! A stream ingested as a new version of another ([`BlobWriter::ingest_reader_against`])
//! has its new chunks compressed against the parent's chunks at the same place (a zstd
//! reference prefix, see [`DeltaPlanner`]) when that makes them less than half as big:
//! a dump whose rows changed here and there stores the changes, not the chunks around them.
//!
//! Write order (invariant 2): a pack is uploaded completely before any index file names it,
//! and [`BlobWriter::finish`] returns only after every pack and index file is stored, so a
//! manifest saved afterwards references only committed blobs.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, Sender};
use serde::Serialize;

use crate::chunker::Chunker;
use crate::error::{RepoError, Result};
use crate::format::{BlobRef, IndexFile, IndexPack, StreamRef, FORMAT_VERSION, MAX_BLOB_LEN};
use crate::id::BlobId;
use crate::pack::{
    blob_compressor, encode_blob, encode_delta_blob, pack_key, PackWriter, MAX_DELTA_BASES,
};
use crate::repository::Repository;

/// Tuning of one writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Compression/encryption threads; 0 means one per core.
    pub threads: usize,
    /// Pack uploads in flight at once.
    pub uploads: usize,
    /// Write an index file after this many packs (bounds what a crash leaves unindexed).
    pub index_every_packs: usize,
    /// ... or once a stored pack has waited this long for an index file: a backup killed
    /// after a few slow minutes should find its uploads again on the rerun, not only after
    /// `index_every_packs` packs (512 MiB at the default pack size).
    pub index_every: std::time::Duration,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            threads: 0,
            uploads: 4,
            index_every_packs: 32,
            index_every: std::time::Duration::from_secs(30),
        }
    }
}

/// What a writer did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WriteStats {
    /// Bytes given to the writer.
    pub bytes_in: u64,
    /// Plaintext bytes of blobs that were new to the repository.
    pub bytes_new: u64,
    /// New blobs stored.
    pub blobs_new: u64,
    /// Blobs that were already stored (deduplicated).
    pub blobs_dedup: u64,
    /// Packs uploaded.
    pub packs: u64,
    /// Bytes uploaded in packs (compressed, sealed, with headers).
    pub stored_bytes: u64,
    /// Index files written.
    pub index_files: u64,
    /// New blobs stored as deltas against a parent stream's blobs.
    pub blobs_delta: u64,
}

#[derive(Default)]
struct Counters {
    blobs_delta: AtomicU64,
    bytes_in: AtomicU64,
    bytes_new: AtomicU64,
    blobs_new: AtomicU64,
    blobs_dedup: AtomicU64,
    packs: AtomicU64,
    stored_bytes: AtomicU64,
    index_files: AtomicU64,
}

struct Job {
    id: BlobId,
    /// A slice of the block it was cut from: shared, never copied.
    data: Bytes,
    /// Full blobs to try as delta bases (empty: store it in full).
    bases: Vec<BlobId>,
}

struct Sealed {
    id: BlobId,
    bytes: Vec<u8>,
    raw_len: u32,
    /// The bases it was stored against (empty: a full blob).
    bases: Vec<BlobId>,
}

/// Largest reference prefix of one delta blob (the sum of its bases' lengths).
const MAX_DELTA_PREFIX: u64 = 16 << 20;

/// Chooses delta bases for the new chunks of a stream from the stream it is a new version
/// of. Chunks both streams share are anchors: a new chunk at `anchor + d` in the new stream
/// most likely replaces what sat at `anchor + d` in the parent, so the parent's chunks
/// overlapping that range (each resolved to its full bases when it is a delta itself) are the
/// candidates. Insertions and deletions between anchors shift this guess, which long-distance
/// matching over the whole prefix absorbs.
pub(crate) struct DeltaPlanner {
    /// Start offset of each parent chunk that is a usable base, in stream order, with the
    /// full blobs standing for it and their total length.
    parent: Vec<(u64, u32, Arc<[BlobId]>, u64)>,
    /// Where each parent blob starts (its first occurrence).
    starts: HashMap<BlobId, u64>,
    /// The last anchor's end in the new stream and in the parent.
    anchor: (u64, u64),
}

impl DeltaPlanner {
    fn new(repo: &Repository, parent: &StreamRef) -> Self {
        let index = repo.inner.index.read().unwrap();
        let (mut chunks, mut starts, mut at) = (Vec::new(), HashMap::new(), 0u64);
        for b in &parent.blobs {
            starts.entry(b.id).or_insert(at);
            let bases: Arc<[BlobId]> = match index.bases_of(&b.id) {
                Some(bases) => bases,
                None => Arc::from([b.id]),
            };
            let len: Option<u64> = bases
                .iter()
                .map(|x| {
                    let full = index.bases_of(x).is_none();
                    index.get(x).filter(|_| full).map(|l| l.raw_length as u64)
                })
                .sum();
            if let Some(len) = len {
                chunks.push((at, b.len, bases, len));
            }
            at += b.len as u64;
        }
        DeltaPlanner {
            parent: chunks,
            starts,
            anchor: (0, 0),
        }
    }

    /// A chunk of the new stream at `offset` that is already stored.
    fn seen(&mut self, id: &BlobId, offset: u64, len: u64) {
        if let Some(&p) = self.starts.get(id) {
            self.anchor = (offset + len, p + len);
        }
    }

    /// The bases to try for a new chunk at `offset`.
    fn bases_for(&self, offset: u64, len: u64) -> Vec<BlobId> {
        let guess = self.anchor.1 + (offset - self.anchor.0);
        let first = self
            .parent
            .partition_point(|(s, l, _, _)| s + *l as u64 <= guess);
        let (mut out, mut prefix) = (Vec::new(), 0u64);
        for (s, _, bases, blen) in &self.parent[first..] {
            if *s >= guess + len {
                break;
            }
            if bases.iter().all(|b| out.contains(b)) {
                continue;
            }
            if out.len() + bases.len() > MAX_DELTA_BASES || prefix + blen > MAX_DELTA_PREFIX {
                break;
            }
            for b in bases.iter() {
                if !out.contains(b) {
                    out.push(*b);
                }
            }
            prefix += blen;
        }
        out
    }
}

struct Shared {
    repo: Repository,
    opts: WriterOptions,
    work_tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    uploads: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    seen: Mutex<HashSet<BlobId>>,
    chunker: Chunker,
    blocks: Arc<BlockPool>,
    /// Stored packs no index file names yet, and when the first of them was stored.
    pending_index: Mutex<(Vec<IndexPack>, Option<std::time::Instant>)>,
    error: Mutex<Option<RepoError>>,
    failed: AtomicBool,
    counters: Counters,
    runtime: tokio::runtime::Handle,
}

impl Shared {
    fn fail(&self, e: RepoError) {
        let mut slot = self.error.lock().unwrap();
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn take_error(&self) -> Option<RepoError> {
        self.error.lock().unwrap().take()
    }
}

/// Stores byte streams as deduplicated blobs. Cheap to clone; clones share one pipeline,
/// so several threads can ingest files at once.
#[derive(Clone)]
pub struct BlobWriter {
    shared: Arc<Shared>,
}

impl Repository {
    /// Starts an ingest pipeline. Must be called inside a tokio runtime.
    pub fn writer(&self, opts: WriterOptions) -> BlobWriter {
        BlobWriter::new(self.clone(), opts)
    }
}

impl BlobWriter {
    fn new(repo: Repository, mut opts: WriterOptions) -> Self {
        if opts.threads == 0 {
            opts.threads = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2);
        }
        opts.uploads = opts.uploads.max(1);
        opts.index_every_packs = opts.index_every_packs.max(1);
        let (work_tx, work_rx) = bounded::<Job>(opts.threads * 2);
        let (sealed_tx, sealed_rx) = bounded::<Sealed>(opts.threads * 2);
        let shared = Arc::new(Shared {
            chunker: Chunker::new(repo.config().chunker),
            blocks: Arc::new(BlockPool::default()),
            repo,
            opts: opts.clone(),
            work_tx: Mutex::new(Some(work_tx)),
            threads: Mutex::new(Vec::new()),
            uploads: Mutex::new(Vec::new()),
            seen: Mutex::new(HashSet::new()),
            pending_index: Mutex::new((Vec::new(), None)),
            error: Mutex::new(None),
            failed: AtomicBool::new(false),
            counters: Counters::default(),
            runtime: tokio::runtime::Handle::current(),
        });
        let mut threads = Vec::new();
        for n in 0..opts.threads {
            let (rx, tx, sh) = (work_rx.clone(), sealed_tx.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("pgkeep-seal-{n}"))
                    .spawn(move || seal_worker(sh, rx, tx))
                    .expect("spawn worker"),
            );
        }
        drop(sealed_tx);
        let sh = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("pgkeep-packer".into())
                .spawn(move || packer(sh, sealed_rx))
                .expect("spawn packer"),
        );
        *shared.threads.lock().unwrap() = threads;
        BlobWriter { shared }
    }

    /// Reads `reader` to its end and stores it. BLOCKING: call from a plain thread or
    /// `spawn_blocking`, never from an async task.
    ///
    /// The input is read in large blocks and each chunk is a slice of its block, handed to
    /// the workers without a copy (fastcdc's StreamCDC copied every chunk out and moved its
    /// buffer down after each one: a tenth of the ingest's CPU).
    pub fn ingest_reader<R: Read>(&self, reader: &mut R) -> Result<StreamRef> {
        self.ingest_reader_against(reader, None)
    }

    /// Like [`BlobWriter::ingest_reader`], for a new version of the stream `parent`: new
    /// chunks are stored as deltas against the parent's chunks at the same place when that
    /// at least halves them (see [`DeltaPlanner`]).
    pub fn ingest_reader_against<R: Read>(
        &self,
        reader: &mut R,
        parent: Option<&StreamRef>,
    ) -> Result<StreamRef> {
        let mut planner = parent.map(|p| DeltaPlanner::new(&self.shared.repo, p));
        let mut out = StreamRef::default();
        let max = self.shared.repo.config().chunker.max as usize;
        // A block holds several maximal chunks, so that carrying the uncut tail over to the
        // next block (the only copy) moves little.
        let block_len = (4 * max).max(16 << 20);
        let pool = &self.shared.blocks;
        let mut tail = Bytes::new();
        loop {
            let mut block = pool.take(block_len);
            block[..tail.len()].copy_from_slice(&tail);
            let have = tail.len();
            drop(tail);
            let (n, eof) = fill(reader, &mut block, have)?;
            if n == 0 {
                pool.give(block);
                break;
            }
            let whole = pool.share(block, n, eof);
            let lens = self.cuts(&whole, eof);
            let cut: usize = lens.iter().sum();
            self.store_chunks(&whole, &lens, &mut out, planner.as_mut())?;
            if eof {
                debug_assert_eq!(cut, n, "at the end every byte is cut");
                break;
            }
            tail = whole.slice(cut..);
        }
        self.check_failed()?;
        Ok(out)
    }

    /// Reads `reader` to its end in pieces of `piece` bytes and stores each piece as one blob
    /// or, in repositories made without [`ChunkerParams::whole_pieces`], as a stream of its
    /// own cut by FastCDC within it (chunks never span pieces); the result is their
    /// concatenation (a stream is just its blobs in order). BLOCKING, like
    /// [`BlobWriter::ingest_reader`]. Pieces are read into the writer's reused blocks, so
    /// no piece is zeroed first.
    pub fn ingest_reader_in_pieces<R: Read>(
        &self,
        reader: &mut R,
        piece: usize,
    ) -> Result<StreamRef> {
        let piece = piece.clamp(1, MAX_BLOB_LEN as usize);
        let whole_pieces = self.shared.repo.config().chunker.whole_pieces;
        let pool = &self.shared.blocks;
        let mut out = StreamRef::default();
        loop {
            let mut block = pool.take(piece);
            let (n, eof) = fill(reader, &mut block, 0)?;
            if n == 0 {
                pool.give(block);
                break;
            }
            let whole = pool.share(block, n, eof);
            let lens = if whole_pieces {
                vec![n]
            } else {
                self.cuts(&whole, true)
            };
            self.store_chunks(&whole, &lens, &mut out, None)?;
            if eof {
                break;
            }
        }
        self.check_failed()?;
        Ok(out)
    }

    /// Stores a byte slice. BLOCKING, like [`BlobWriter::ingest_reader`]. Copies it once;
    /// [`BlobWriter::ingest_shared`] does not.
    pub fn ingest_bytes(&self, data: &[u8]) -> Result<StreamRef> {
        self.ingest_shared(Bytes::copy_from_slice(data))
    }

    /// Stores shared bytes without copying them: each chunk is a slice of `data`. BLOCKING,
    /// like [`BlobWriter::ingest_reader`].
    pub fn ingest_shared(&self, data: Bytes) -> Result<StreamRef> {
        let mut out = StreamRef::default();
        let lens = self.cuts(&data, true);
        self.store_chunks(&data, &lens, &mut out, None)?;
        self.check_failed()?;
        Ok(out)
    }

    /// Stores `data` as one blob, as given (no chunking): for copying blobs from another
    /// repository with their boundaries. Deduplicated like any chunk. BLOCKING, like
    /// [`BlobWriter::ingest_reader`].
    pub fn store_blob(&self, data: Bytes) -> Result<BlobRef> {
        let mut out = StreamRef::default();
        let len = data.len();
        self.store_chunks(&data, &[len], &mut out, None)?;
        self.check_failed()?;
        Ok(out.blobs[0])
    }

    /// The lengths of the FastCDC chunks at the start of `data`. Unless `eof`, a chunk is cut
    /// only when `max` bytes follow its start, since its cut may depend on any of them: so
    /// the cut points are those of FastCDC over the whole stream, whatever the blocks.
    fn cuts(&self, data: &[u8], eof: bool) -> Vec<usize> {
        let max = self.shared.repo.config().chunker.max as usize;
        let mut lens = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() && (eof || data.len() - pos >= max) {
            let len = self.shared.chunker.cut(&data[pos..]);
            if len == 0 {
                break;
            }
            lens.push(len);
            pos += len;
        }
        lens
    }

    /// Hashes, deduplicates and queues the chunks of `whole` (of lengths `lens`), appending
    /// them to `out`; `planner` picks delta bases for the new ones.
    fn store_chunks(
        &self,
        whole: &Bytes,
        lens: &[usize],
        out: &mut StreamRef,
        mut planner: Option<&mut DeltaPlanner>,
    ) -> Result<()> {
        let sh = &self.shared;
        let tx = sh
            .work_tx
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| RepoError::Invalid("writer already finished".into()))?;
        let sealer = sh.repo.sealer();
        let mut pos = 0usize;
        for &len in lens {
            if sh.failed.load(Ordering::Relaxed) {
                break;
            }
            let data = whole.slice(pos..pos + len);
            pos += len;
            let id = sealer.blob_id(&data);
            let offset = out.size;
            out.size += len as u64;
            out.blobs.push(BlobRef {
                id,
                len: len as u32,
            });
            sh.counters
                .bytes_in
                .fetch_add(len as u64, Ordering::Relaxed);
            let new = !sh.repo.has_blob(&id) && sh.seen.lock().unwrap().insert(id);
            if new {
                sh.counters.blobs_new.fetch_add(1, Ordering::Relaxed);
                sh.counters
                    .bytes_new
                    .fetch_add(len as u64, Ordering::Relaxed);
                let bases = planner
                    .as_deref()
                    .map(|p| p.bases_for(offset, len as u64))
                    .unwrap_or_default();
                if tx.send(Job { id, data, bases }).is_err() {
                    break;
                }
            } else {
                if let Some(p) = planner.as_deref_mut() {
                    p.seen(&id, offset, len as u64);
                }
                sh.counters.blobs_dedup.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn check_failed(&self) -> Result<()> {
        let sh = &self.shared;
        if sh.failed.load(Ordering::SeqCst) {
            let e = sh.error.lock().unwrap().as_ref().map(|e| e.to_string());
            return Err(RepoError::Invalid(format!(
                "storing data failed: {}",
                e.unwrap_or_else(|| "see the first error".into())
            )));
        }
        Ok(())
    }

    /// Figures so far (for progress display).
    pub fn progress(&self) -> WriteStats {
        let c = &self.shared.counters;
        WriteStats {
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_new: c.bytes_new.load(Ordering::Relaxed),
            blobs_new: c.blobs_new.load(Ordering::Relaxed),
            blobs_dedup: c.blobs_dedup.load(Ordering::Relaxed),
            packs: c.packs.load(Ordering::Relaxed),
            stored_bytes: c.stored_bytes.load(Ordering::Relaxed),
            index_files: c.index_files.load(Ordering::Relaxed),
            blobs_delta: c.blobs_delta.load(Ordering::Relaxed),
        }
    }

    /// Flushes the last pack, waits for every upload and writes the remaining index.
    /// After it returns `Ok`, every blob of every stream ingested is committed.
    pub async fn finish(self) -> Result<WriteStats> {
        let sh = self.shared.clone();
        drop(self);
        sh.work_tx.lock().unwrap().take();
        let threads = std::mem::take(&mut *sh.threads.lock().unwrap());
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await
        .map_err(|e| RepoError::Invalid(format!("writer thread panicked: {e}")))?;
        let uploads = std::mem::take(&mut *sh.uploads.lock().unwrap());
        for u in uploads {
            if let Err(e) = u.await {
                sh.fail(RepoError::Invalid(format!("upload task failed: {e}")));
            }
        }
        if let Some(e) = sh.take_error() {
            return Err(e);
        }
        flush_index(&sh, 0).await?;
        Ok(BlobWriter { shared: sh }.progress())
    }
}

fn seal_worker(sh: Arc<Shared>, rx: Receiver<Job>, tx: Sender<Sealed>) {
    let sealer = sh.repo.sealer().clone();
    let mut compressor = match blob_compressor(sh.repo.config().compression_level) {
        Ok(c) => c,
        Err(e) => return sh.fail(e),
    };
    for job in rx {
        if sh.failed.load(Ordering::Relaxed) {
            continue; // drain so senders never block
        }
        // Empty: the encoder reserves what the blob can take, and growing a guess by realloc
        // copied the guess's bytes, garbage, for every chunk.
        let mut out = Vec::new();
        let res = match encode_job(&sh, &sealer, &mut compressor, &job, &mut out) {
            Ok(true) => Ok(job.bases.clone()),
            Ok(false) => Ok(vec![]),
            Err(e) => Err(e),
        };
        match res {
            Ok(bases) => {
                if !bases.is_empty() {
                    sh.counters.blobs_delta.fetch_add(1, Ordering::Relaxed);
                }
                let s = Sealed {
                    id: job.id,
                    bytes: out,
                    raw_len: job.data.len() as u32,
                    bases,
                };
                if tx.send(s).is_err() {
                    return;
                }
            }
            Err(e) => sh.fail(e),
        }
    }
}

/// Encodes the job's chunk into `out`: as a delta when it has bases and the delta is at most
/// half the size of the chunk compressed on its own (or a sixteenth of the chunk, which
/// needs no comparison), else in full. True for a delta. A base that cannot be read only
/// costs the delta: the chunk is then stored in full.
fn encode_job(
    sh: &Shared,
    sealer: &crate::crypto::Sealer,
    compressor: &mut zstd::bulk::Compressor<'_>,
    job: &Job,
    out: &mut Vec<u8>,
) -> Result<bool> {
    let plain = &job.data[..];
    let bases = if job.bases.is_empty() {
        None
    } else {
        match sh.runtime.block_on(sh.repo.load_bases(&job.bases)) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!("delta bases of a new chunk unreadable, stored in full: {e}");
                None
            }
        }
    };
    let Some(bases) = bases else {
        encode_blob(sealer, compressor, &job.id, plain, out)?;
        return Ok(false);
    };
    let mut prefix = Vec::new();
    for b in &job.bases {
        prefix.extend_from_slice(&bases[b]);
    }
    let level = sh.repo.config().compression_level;
    // Compressed against the prefix once, then judged.
    encode_delta_blob(
        sealer,
        level,
        &job.id,
        plain,
        &job.bases,
        &prefix,
        usize::MAX,
        out,
    )?;
    if out.len() <= plain.len() / 16 {
        return Ok(true);
    }
    let mut full = Vec::new();
    encode_blob(sealer, compressor, &job.id, plain, &mut full)?;
    if out.len() <= full.len() / 2 {
        return Ok(true);
    }
    *out = full;
    Ok(false)
}

fn packer(sh: Arc<Shared>, rx: Receiver<Sealed>) {
    let target = sh.repo.config().pack_size as usize;
    // Tokens bound the uploads in flight; the packer blocks here when they are all busy.
    let (token_tx, token_rx) = bounded::<()>(sh.opts.uploads);
    for _ in 0..sh.opts.uploads {
        token_tx.send(()).unwrap();
    }
    let mut pack = PackWriter::with_capacity(target + 4 * 1024 * 1024);
    for s in rx {
        if sh.failed.load(Ordering::Relaxed) {
            continue;
        }
        pack.add(s.id, &s.bytes, s.raw_len, &s.bases);
        if pack.len() >= target {
            let full = std::mem::replace(
                &mut pack,
                PackWriter::with_capacity(target + 4 * 1024 * 1024),
            );
            upload(&sh, full, &token_rx, &token_tx);
        }
    }
    if !pack.is_empty() && !sh.failed.load(Ordering::Relaxed) {
        upload(&sh, pack, &token_rx, &token_tx);
    }
}

fn upload(sh: &Arc<Shared>, pack: PackWriter, tokens: &Receiver<()>, give_back: &Sender<()>) {
    let sealer = sh.repo.sealer().clone();
    let (id, bytes, header) = pack.finish(&sealer);
    if tokens.recv().is_err() {
        return;
    }
    let size = bytes.len() as u64;
    let (sh2, give_back) = (sh.clone(), give_back.clone());
    let task = sh.runtime.spawn(async move {
        let key = pack_key(&id);
        match sh2.repo.storage().put(&key, Bytes::from(bytes)).await {
            Ok(()) => {
                sh2.counters.packs.fetch_add(1, Ordering::Relaxed);
                sh2.counters.stored_bytes.fetch_add(size, Ordering::Relaxed);
                {
                    let mut p = sh2.pending_index.lock().unwrap();
                    p.0.push(IndexPack {
                        id,
                        size,
                        blobs: header.blobs,
                        deltas: header.deltas,
                    });
                    p.1.get_or_insert_with(std::time::Instant::now);
                }
                if let Err(e) = flush_index(&sh2, sh2.opts.index_every_packs).await {
                    sh2.fail(e);
                }
            }
            Err(e) => sh2.fail(RepoError::Storage(e)),
        }
        let _ = give_back.send(());
    });
    sh.uploads.lock().unwrap().push(task);
}

/// Writes an index file for the uploaded packs when at least `min_packs` are waiting, or
/// the oldest has waited `index_every` (0: whenever any are).
async fn flush_index(sh: &Arc<Shared>, min_packs: usize) -> Result<()> {
    let packs = {
        let mut p = sh.pending_index.lock().unwrap();
        let overdue = p.1.is_some_and(|t| t.elapsed() >= sh.opts.index_every);
        if p.0.is_empty() || (p.0.len() < min_packs && !overdue) {
            return Ok(());
        }
        p.1 = None;
        std::mem::take(&mut p.0)
    };
    sh.repo
        .write_index_file(IndexFile {
            version: FORMAT_VERSION,
            packs,
        })
        .await?;
    sh.counters.index_files.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Reads from `reader` into `buf` after its first `have` bytes until it is full or the input
/// ends: the bytes `buf` now holds, and true at the end.
fn fill<R: Read>(reader: &mut R, buf: &mut [u8], have: usize) -> Result<(usize, bool)> {
    let mut n = have;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => return Ok((n, true)),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RepoError::Invalid(format!("reading the input failed: {e}"))),
        }
    }
    Ok((n, false))
}

/// Bytes of free input blocks kept for the next reads, at most (two default blocks).
const POOL_KEPT_BYTES: usize = 32 << 20;

/// Input blocks of a writer, reused. A fresh block per read was zeroed in full: a 16 MiB
/// memset for every input, even an 8 KiB one, and with the page faults of fresh memory about
/// 2.5% of a large ingest's time (perf). A block comes back here when the last chunk cut from
/// it is sealed; blocks are initialized once (zero pages from the allocator), so reads can
/// go straight into them.
#[derive(Default)]
struct BlockPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Blocks made so far (for tests).
    made: AtomicU64,
}

impl BlockPool {
    /// A block of `len` initialized bytes (a free one, or fresh zeros).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock().unwrap();
            free.iter()
                .rposition(|b| b.len() == len)
                .map(|i| free.swap_remove(i))
        };
        reused.unwrap_or_else(|| {
            self.made.fetch_add(1, Ordering::Relaxed);
            vec![0u8; len]
        })
    }

    /// The first `len` bytes of `block` as shared bytes, which give the block back when the
    /// last chunk sliced from them is dropped. The last read of an input (`last`), when it
    /// fills at most a quarter of the block (most files of a cluster), is copied out instead
    /// and the block given back at once, so a small input does not hold a whole block until
    /// its chunk is sealed.
    fn share(self: &Arc<Self>, block: Vec<u8>, len: usize, last: bool) -> Bytes {
        if last && len <= block.len() / 4 {
            let small = Bytes::copy_from_slice(&block[..len]);
            self.give(block);
            return small;
        }
        Bytes::from_owner(PooledBlock {
            buf: block,
            len,
            pool: self.clone(),
        })
    }

    fn give(&self, block: Vec<u8>) {
        let mut free = self.free.lock().unwrap();
        let kept: usize = free.iter().map(Vec::len).sum();
        if kept + block.len() <= POOL_KEPT_BYTES {
            free.push(block);
        }
    }
}

/// A block whose first `len` bytes were read, shared by the chunks cut from it; it goes
/// back to its pool when the last of them is dropped.
struct PooledBlock {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BlockPool>,
}

impl AsRef<[u8]> for PooledBlock {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledBlock {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::{RngCore, SeedableRng};

    use super::*;
    use crate::InitOptions;

    /// Hands out at most `step` bytes per read, as a pipe or a socket does.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    /// Each `ingest_reader` call took a fresh 16 MiB block and zeroed it, a millisecond of
    /// memset per input even for an 8 KiB one: a physical backup pays it for every WAL
    /// segment and every file it does not cut into relation pieces (all files with
    /// `relation_chunk_size = cdc`). 3000 such inputs took 3.0 s instead of 0.08 s
    /// (`ingest_bench files 3000 8`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_inputs_reuse_one_input_block_instead_of_zeroing_a_fresh_one_each() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(pgkeep_storage::LocalStorage::new(dir.path()).unwrap());
        let repo = Repository::init(storage, InitOptions::default())
            .await
            .unwrap();
        let w = repo.writer(WriterOptions::default());
        let w2 = w.clone();
        let streams = tokio::task::spawn_blocking(move || {
            (0..200u32)
                .map(|i| {
                    let data = vec![(i % 251) as u8; 8192 + i as usize];
                    (data.clone(), w2.ingest_reader(&mut &data[..]).unwrap())
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        assert_eq!(w.shared.blocks.made.load(Ordering::Relaxed), 1);
        w.finish().await.unwrap();
        for (data, s) in streams {
            let mut back = Vec::new();
            repo.read_stream(&s, &mut back).await.unwrap();
            assert!(back == data, "{} bytes read back", data.len());
        }
    }

    /// Relation files are stored in fixed pieces (`relation_chunk_size`): one blob each in a
    /// repository with `whole_pieces` (new ones), each cut by FastCDC on its own in one
    /// without (made before it). Either way chunks never span a piece, the stream reads back
    /// whole, whatever the read sizes, and the pieces are read into reused blocks (each was a
    /// fresh zeroed buffer).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pieces_are_stored_whole_or_cut_each_on_its_own_in_reused_blocks() {
        for whole_pieces in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let storage = Arc::new(pgkeep_storage::LocalStorage::new(dir.path()).unwrap());
            let chunker = crate::format::ChunkerParams {
                whole_pieces,
                ..Default::default()
            };
            let opts = InitOptions {
                chunker,
                ..Default::default()
            };
            let repo = Repository::init(storage, opts).await.unwrap();
            let piece = 3 << 20;
            let mut data = vec![0u8; 40 * piece + 12345];
            rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut data);
            let mut want = Vec::new();
            for p in data.chunks(piece) {
                if whole_pieces {
                    want.push(p.len());
                } else {
                    let cdc =
                        fastcdc::v2020::FastCDC::new(p, chunker.min, chunker.avg, chunker.max);
                    want.extend(cdc.map(|ch| ch.length));
                }
            }
            assert!(
                whole_pieces || want.len() > 41,
                "FastCDC cuts inside the pieces"
            );
            let w = repo.writer(WriterOptions {
                threads: 2,
                ..Default::default()
            });
            let (w2, d2) = (w.clone(), data.clone());
            let (a, b) = tokio::task::spawn_blocking(move || {
                let a = w2
                    .ingest_reader_in_pieces(&mut std::io::Cursor::new(&d2), piece)
                    .unwrap();
                let b = w2
                    .ingest_reader_in_pieces(
                        &mut Trickle {
                            data: &d2,
                            step: 100_000,
                        },
                        piece,
                    )
                    .unwrap();
                (a, b)
            })
            .await
            .unwrap();
            // At most the pieces in flight (two channels of 2 x 2 jobs, 2 workers, the one read).
            let made = w.shared.blocks.made.load(Ordering::Relaxed);
            assert!(made <= 12, "{made} blocks made for 82 pieces");
            w.finish().await.unwrap();
            for s in [&a, &b] {
                let lens: Vec<usize> = s.blobs.iter().map(|b| b.len as usize).collect();
                assert_eq!(lens, want, "whole_pieces = {whole_pieces}");
                let mut back = Vec::new();
                repo.read_stream(s, &mut back).await.unwrap();
                assert!(back == data, "read back");
            }
        }
    }

    /// The block-wise chunker must cut exactly where FastCDC's own streaming chunker cuts
    /// (repositories written before it dedupe against what is written now), for any read
    /// sizes and across block boundaries.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_are_cut_where_fastcdc_streaming_cuts_them_whatever_the_reads() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(pgkeep_storage::LocalStorage::new(dir.path()).unwrap());
        let repo = Repository::init(storage, InitOptions::default())
            .await
            .unwrap();
        let c = repo.config().chunker;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for len in [0usize, 1, 300 << 10, (5 << 20) + 3, (40 << 20) + 123] {
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            // Some long runs too, where FastCDC cuts at its maximum.
            for b in data.iter_mut().skip(len / 3).take(len / 4) {
                *b = 0;
            }
            let want: Vec<usize> =
                fastcdc::v2020::StreamCDC::new(std::io::Cursor::new(&data), c.min, c.avg, c.max)
                    .map(|ch| ch.unwrap().length)
                    .collect();
            let w = repo.writer(WriterOptions::default());
            let (w2, d2) = (w.clone(), data.clone());
            let got = tokio::task::spawn_blocking(move || {
                let a = w2.ingest_reader(&mut std::io::Cursor::new(&d2)).unwrap();
                let b = w2
                    .ingest_reader(&mut Trickle {
                        data: &d2,
                        step: 7777,
                    })
                    .unwrap();
                let s = w2.ingest_shared(Bytes::from(d2.clone())).unwrap();
                (a, b, s)
            })
            .await
            .unwrap();
            w.finish().await.unwrap();
            for (how, s) in [("reader", &got.0), ("trickle", &got.1), ("shared", &got.2)] {
                let lens: Vec<usize> = s.blobs.iter().map(|b| b.len as usize).collect();
                assert_eq!(lens, want, "{len} bytes through {how}");
                assert_eq!(s.size, len as u64);
                let mut pos = 0;
                for b in &s.blobs {
                    let chunk = &data[pos..pos + b.len as usize];
                    assert_eq!(b.id, repo.sealer().blob_id(chunk), "{how}: id at {pos}");
                    pos += b.len as usize;
                }
            }
            let mut back = Vec::new();
            repo.read_stream(&got.1, &mut back).await.unwrap();
            assert!(back == data, "{len} bytes read back");
        }
    }
}
