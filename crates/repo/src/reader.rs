//! Reading streams back: parallel range reads, every blob verified before use.

use std::io::Write;

use futures::stream::{self, StreamExt};

use crate::error::{RepoError, Result};
use crate::format::StreamRef;
use crate::id::{BlobId, PackId};
use crate::index::BlobLocation;
use crate::pack::{decode_blob, pack_key};
use crate::repository::Repository;

/// Reads larger than this are not coalesced further.
const MAX_REQUEST: u64 = 8 * 1024 * 1024;
/// Range reads in flight per stream.
const READS_IN_FLIGHT: usize = 6;
/// A request is also cut at this many decoded bytes: its blobs are held decoded until
/// written, and well-compressing data (pgbench's compresses ~35x) would otherwise put
/// hundreds of MiB of one 8 MiB range in memory (restores peaked near 300 MiB).
const MAX_REQUEST_RAW: u64 = 8 * 1024 * 1024;

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

    async fn fetch_and_decode(&self, req: &Request) -> Result<Vec<Vec<u8>>> {
        let key = pack_key(&req.pack);
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
                let sealer = self.sealer().clone();
                let blobs = req.blobs.clone();
                let (start, pack) = (req.start, req.pack);
                tokio::task::spawn_blocking(move || {
                    let mut d = zstd::bulk::Decompressor::new()
                        .map_err(|e| RepoError::Invalid(format!("zstd init: {e}")))?;
                    let name = format!("pack {pack}");
                    blobs
                        .iter()
                        .map(|(id, loc)| {
                            let s = (loc.offset as u64 - start) as usize;
                            let stored = &data[s..s + loc.length as usize];
                            decode_blob(&sealer, &mut d, id, loc.raw_length, stored, &name)
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .await
                .map_err(|e| RepoError::Invalid(format!("decode task failed: {e}")))?
            }
            .await;
            match res {
                // A garbled or short read may be the network's fault: read once more.
                Err(e) if attempt == 1 && is_integrity(&e) => {
                    tracing::warn!("{e}; reading it again");
                    continue;
                }
                other => return other,
            }
        }
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
