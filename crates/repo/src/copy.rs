//! Copying manifests and sealed objects from one repository into another.
//!
//! Two repositories never share blob ids when either is encrypted: an id is BLAKE3 of the
//! plaintext keyed with the repository's own id key. So a blob is copied by reading its
//! plaintext from the source, storing it through the target's writer (the target's id, its
//! compression and its encryption) and rewriting every reference in the manifest body. Blob
//! boundaries are the source's: the copied backups deduplicate among themselves exactly as
//! they did in the source.
//!
//! A [`BlobTranslation`] remembers which source blob became which target blob. It is kept in
//! the target as sealed objects `copies/<source repository id>/<time>-<random>` (written after
//! the blobs they name are indexed), so a later copy of a newer backup reads from the source
//! only the blobs the target lacks. An entry whose target blob is no longer indexed (pruned
//! meanwhile) is ignored, so the translation is only ever a cache and never a reference: the
//! target's garbage collection does not need to know it.
//!
//! Write order in the target is the repository's usual one (packs, index, manifest), so an
//! interrupted copy leaves at most unreferenced packs, which the next copy's writer reuses
//! once indexed or the target's prune removes.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use futures::{stream, StreamExt, TryStreamExt};
use serde::Serialize;

use crate::error::{RepoError, Result};
use crate::format::{BlobRef, StreamRef};
use crate::id::BlobId;
use crate::repository::Repository;
use crate::writer::BlobWriter;
use pgkeep_storage::ErrorKind as SErr;

/// Source blobs read at once per window: bounds memory (a window is held in memory).
const WINDOW_BYTES: u64 = 32 << 20;
/// Windows read concurrently.
const WINDOWS_IN_FLIGHT: usize = 2;
/// Translation objects above which a copy merges them into one.
const TRANSLATION_OBJECTS_MAX: usize = 32;

/// What one copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyStats {
    /// Blobs referenced by what was copied.
    pub blobs: u64,
    /// Blobs read from the source (the target lacked them or their translation).
    pub blobs_read: u64,
    /// Plaintext bytes read from the source.
    pub bytes_read: u64,
    /// Blobs the target did not have and now stores.
    pub blobs_new: u64,
    /// Plaintext bytes of those.
    pub bytes_new: u64,
}

impl CopyStats {
    fn add(&mut self, o: &CopyStats) {
        self.blobs += o.blobs;
        self.blobs_read += o.blobs_read;
        self.bytes_read += o.bytes_read;
        self.blobs_new += o.blobs_new;
        self.bytes_new += o.bytes_new;
    }
}

/// Source blob id → target blob id, for one pair of repositories.
#[derive(Debug, Default)]
pub struct BlobTranslation {
    source_id: String,
    map: HashMap<BlobId, BlobId>,
    /// Pairs learned since the last [`BlobTranslation::save`].
    fresh: Vec<(BlobId, BlobId)>,
    /// Keys of the translation objects read at load.
    objects: Vec<String>,
}

fn translation_prefix(source_id: &str) -> String {
    format!("copies/{source_id}/")
}

impl BlobTranslation {
    /// Loads what earlier copies from `source` into `target` recorded. Objects that fail to
    /// read are skipped (the translation is a cache: a blob then is read again).
    pub async fn load(source: &Repository, target: &Repository) -> Result<BlobTranslation> {
        let source_id = source.config().id.clone();
        let mut t = BlobTranslation {
            source_id: source_id.clone(),
            ..Default::default()
        };
        let mut keys: Vec<String> = target
            .storage()
            .list(&translation_prefix(&source_id))
            .await?
            .into_iter()
            .map(|m| m.key)
            .collect();
        keys.sort();
        for key in keys {
            let Ok(plain) = target.get_sealed(&key, key.as_bytes()).await else {
                tracing::warn!("copy translation {key} does not read; its blobs are read again");
                continue;
            };
            let Ok(pairs) = serde_json::from_slice::<Vec<(BlobId, BlobId)>>(&plain) else {
                continue;
            };
            t.map.extend(pairs);
            t.objects.push(key);
        }
        Ok(t)
    }

    /// The target id of a source blob, when known and still indexed in `target`.
    fn get(&self, target: &Repository, src: &BlobId) -> Option<BlobId> {
        self.map.get(src).copied().filter(|d| target.has_blob(d))
    }

    fn learn(&mut self, src: BlobId, dst: BlobId) {
        if self.map.insert(src, dst) != Some(dst) {
            self.fresh.push((src, dst));
        }
    }

    /// Stores the pairs learned since the last save in `target`. Call only after the target
    /// blobs they name are indexed (the writer finished). Merges the objects into one when
    /// there are many.
    pub async fn save(&mut self, target: &Repository) -> Result<()> {
        if self.fresh.is_empty() {
            return Ok(());
        }
        let merge = self.objects.len() + 1 > TRANSLATION_OBJECTS_MAX;
        let pairs: Vec<(BlobId, BlobId)> = if merge {
            self.map.iter().map(|(a, b)| (*a, *b)).collect()
        } else {
            std::mem::take(&mut self.fresh)
        };
        let key = format!(
            "{}{}-{}",
            translation_prefix(&self.source_id),
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
            crate::repository::random_suffix()
        );
        let json = serde_json::to_vec(&pairs).expect("pairs serialize");
        target
            .put_sealed_if_absent(&key, key.as_bytes(), &json)
            .await?;
        self.fresh.clear();
        if merge {
            // The merged object holds every pair: the older ones may go.
            for old in std::mem::take(&mut self.objects) {
                match target.storage().delete(&old).await {
                    Ok(()) => {}
                    Err(e) if e.kind == SErr::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.objects.push(key);
        Ok(())
    }
}

/// Copies the blobs of `streams` from `source` through `writer` (a writer of the target) and
/// returns the streams with the target's blob ids. BLOCKING parts run on the blocking pool.
pub async fn copy_streams(
    source: &Repository,
    target: &Repository,
    writer: &BlobWriter,
    translation: &mut BlobTranslation,
    streams: &[StreamRef],
) -> Result<(Vec<StreamRef>, CopyStats)> {
    let mut stats = CopyStats::default();
    // Source blobs to read: unknown to the translation, once each.
    let mut wanted: Vec<BlobRef> = Vec::new();
    let mut queued: HashSet<BlobId> = HashSet::new();
    for s in streams {
        for b in &s.blobs {
            stats.blobs += 1;
            if translation.get(target, &b.id).is_none() && queued.insert(b.id) {
                wanted.push(*b);
            }
        }
    }
    let windows = windows_of(&wanted);
    let mut reads = stream::iter(windows)
        .map(|w| {
            let src = source.clone();
            async move {
                let mut buf = Vec::with_capacity(w.size as usize);
                src.read_stream(&w, &mut buf).await?;
                Ok::<_, RepoError>((w, Bytes::from(buf)))
            }
        })
        .buffered(WINDOWS_IN_FLIGHT);
    while let Some((w, data)) = reads.try_next().await? {
        let writer = writer.clone();
        let before = writer.progress();
        let blobs = w.blobs.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let mut pos = 0usize;
            let mut out = Vec::with_capacity(blobs.len());
            for b in &blobs {
                let piece = data.slice(pos..pos + b.len as usize);
                pos += b.len as usize;
                out.push((b.id, writer.store_blob(piece)?));
            }
            Ok::<_, RepoError>((out, writer.progress()))
        })
        .await
        .map_err(|e| RepoError::Invalid(format!("copy task failed: {e}")))??;
        let (pairs, after) = stored;
        stats.blobs_read += pairs.len() as u64;
        stats.bytes_read += w.size;
        stats.blobs_new += after.blobs_new.saturating_sub(before.blobs_new);
        stats.bytes_new += after.bytes_new.saturating_sub(before.bytes_new);
        for (src, dst) in pairs {
            translation.learn(src, dst.id);
        }
    }
    let out = streams
        .iter()
        .map(|s| translate(s, translation))
        .collect::<Result<Vec<_>>>()?;
    Ok((out, stats))
}

/// Consecutive groups of blobs of at most [`WINDOW_BYTES`] (one blob may exceed it).
fn windows_of(blobs: &[BlobRef]) -> Vec<StreamRef> {
    let mut out: Vec<StreamRef> = Vec::new();
    for b in blobs {
        match out.last_mut() {
            Some(w) if w.size + b.len as u64 <= WINDOW_BYTES => {
                w.size += b.len as u64;
                w.blobs.push(*b);
            }
            _ => out.push(StreamRef {
                size: b.len as u64,
                blobs: vec![*b],
            }),
        }
    }
    out
}

fn translate(s: &StreamRef, t: &BlobTranslation) -> Result<StreamRef> {
    let blobs = s
        .blobs
        .iter()
        .map(|b| {
            t.map
                .get(&b.id)
                .map(|id| BlobRef {
                    id: *id,
                    len: b.len,
                })
                .ok_or_else(|| RepoError::Invalid(format!("blob {} was not copied", b.id)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StreamRef {
        size: s.size,
        blobs,
    })
}

/// Replaces, in order, every stream reference of a manifest body (found by shape, as
/// [`crate::format::collect_stream_refs`] finds them) with the given ones.
pub fn replace_stream_refs(value: &mut serde_json::Value, with: &[StreamRef]) -> Result<()> {
    let mut it = with.iter();
    replace_refs(value, &mut it)?;
    if it.next().is_some() {
        return Err(RepoError::Invalid(
            "more stream references given than the manifest has".into(),
        ));
    }
    Ok(())
}

fn replace_refs<'a>(
    value: &mut serde_json::Value,
    it: &mut impl Iterator<Item = &'a StreamRef>,
) -> Result<()> {
    let is_ref = matches!(&*value, serde_json::Value::Object(map)
        if map.len() == 2 && map.contains_key("size") && map.contains_key("blobs"))
        && serde_json::from_value::<StreamRef>(value.clone()).is_ok();
    if is_ref {
        let s = it.next().ok_or_else(|| {
            RepoError::Invalid("fewer stream references given than the manifest has".into())
        })?;
        *value = serde_json::to_value(s).expect("stream ref serializes");
        return Ok(());
    }
    match value {
        serde_json::Value::Object(map) => {
            for v in map.values_mut() {
                replace_refs(v, it)?;
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                replace_refs(v, it)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Copies one manifest (`backups/<cluster>/<id>`) and every blob it references. Returns
/// `None` when the target already has the manifest (nothing is read or written). The caller
/// holds a shared lock on both repositories.
pub async fn copy_manifest(
    source: &Repository,
    target: &Repository,
    writer_threads: usize,
    translation: &mut BlobTranslation,
    cluster: &str,
    id: &str,
) -> Result<Option<CopyStats>> {
    if target.has_manifest(cluster, id).await? {
        return Ok(None);
    }
    let mut body = source.load_manifest(cluster, id).await?;
    let streams = Repository::stream_refs(&body);
    let writer = target.writer(crate::writer::WriterOptions {
        threads: writer_threads,
        ..Default::default()
    });
    let copied = copy_streams(source, target, &writer, translation, &streams).await;
    // Finish the writer also after a failure, so what was stored is indexed for the rerun.
    let finished = writer.finish().await;
    let (new_streams, stats) = copied?;
    finished?;
    translation.save(target).await?;
    replace_stream_refs(&mut body, &new_streams)?;
    target.save_manifest(cluster, id, &body).await?;
    Ok(Some(stats))
}

/// Copies the sealed object `key` (written by [`Repository::put_sealed_if_absent`] with the
/// key as associated data) into `target` under the same key, sealed with the target's key.
/// Returns the plaintext length, or `None` when the target has the object already.
pub async fn copy_sealed_object(
    source: &Repository,
    target: &Repository,
    key: &str,
) -> Result<Option<u64>> {
    let plain = source.get_sealed(key, key.as_bytes()).await?;
    match target
        .put_sealed_if_absent(key, key.as_bytes(), &plain)
        .await
    {
        Ok(()) => Ok(Some(plain.len() as u64)),
        Err(RepoError::Storage(e)) if e.kind == SErr::AlreadyExists => Ok(None),
        Err(e) => Err(e),
    }
}

/// Totals over several copies.
pub fn sum_stats<'a>(all: impl IntoIterator<Item = &'a CopyStats>) -> CopyStats {
    let mut t = CopyStats::default();
    for s in all {
        t.add(s);
    }
    t
}
