//! The repository: opening, keys, metadata objects and manifests.

use std::sync::{Arc, RwLock};

use bytes::Bytes;
use chrono::Utc;
use futures::stream::{self, StreamExt, TryStreamExt};
use pgkeep_storage::{ErrorKind as SErr, Storage};
use rand::RngCore;
use serde::de::DeserializeSeed;
use serde::Serialize;

use crate::crypto::{derive_kek, unwrap_master, wrap_master, MasterKey, Sealer};
use crate::error::{RepoError, Result};
use crate::format::{
    collect_stream_refs, BlobRefWalk, ChunkerParams, IndexFile, KdfParams, KeyFile, RepoConfig,
    StreamRef, FORMAT_VERSION,
};
use crate::id::{BlobId, Id};
use crate::index::Index;

/// Default target size of a pack: big enough that per-object costs (requests, index entries)
/// are small, small enough that an interrupted upload loses little and that object stores
/// take it as a few parallel multipart parts.
pub const DEFAULT_PACK_SIZE: u64 = 16 << 20;

pub use crate::format::PACK_SIZE_LIMITS;

/// Most bytes a sealed object ([`Repository::get_sealed`]) may decompress to: a WAL segment
/// of PostgreSQL's largest size (1 GiB) and some room. zstd expands a few bytes into
/// gigabytes, and in a plain repository anyone who can write to the store can forge a
/// metadata object: decompression stops here instead of at the memory's end.
pub const MAX_SEALED_LEN: usize = (1 << 30) + (1 << 20);

/// Most bytes an index file may decompress to.
pub const MAX_INDEX_LEN: usize = 1 << 30;

/// How `init` sets up a repository.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Encrypt with a master key wrapped by this passphrase; `None` makes a plain repository.
    pub passphrase: Option<String>,
    /// zstd level for blobs (1..=22).
    pub compression_level: i32,
    /// Chunking parameters.
    pub chunker: ChunkerParams,
    /// Target pack size in bytes, in [`PACK_SIZE_LIMITS`] (default [`DEFAULT_PACK_SIZE`]).
    /// Fixed for the repository's life: it is stored in `config`.
    pub pack_size: u64,
    /// Argon2id parameters for the first key.
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            passphrase: None,
            compression_level: 3,
            chunker: ChunkerParams::default(),
            pack_size: DEFAULT_PACK_SIZE,
            kdf: KdfParams::default(),
        }
    }
}

/// One key of the repository, as `repo key list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    /// Key id (hex).
    pub id: String,
    /// When it was added.
    pub created: chrono::DateTime<Utc>,
    /// Host that added it.
    pub host: String,
    /// Whether this key opened the repository now.
    pub current: bool,
}

/// Figures about a repository, as `repo info` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct RepoInfo {
    /// Repository id.
    pub id: String,
    /// Format version.
    pub version: u32,
    /// Whether it is encrypted.
    pub encrypted: bool,
    /// Where it is (no credentials).
    pub location: String,
    /// zstd level.
    pub compression_level: i32,
    /// Chunker parameters.
    pub chunker: ChunkerParams,
    /// Target pack size in bytes.
    pub pack_size: u64,
    /// Number of indexed packs.
    pub packs: usize,
    /// Bytes in indexed packs.
    pub pack_bytes: u64,
    /// Number of indexed blobs.
    pub blobs: usize,
    /// Sum of the blobs' plaintext sizes.
    pub blob_raw_bytes: u64,
    /// Number of index files.
    pub index_files: usize,
    /// Number of keys.
    pub keys: usize,
    /// Number of locks present.
    pub locks: usize,
    /// Number of manifests (backups and dumps).
    pub manifests: usize,
}

/// Identifies one manifest: `backups/<cluster>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ManifestKey {
    /// Cluster name.
    pub cluster: String,
    /// Backup or dump id.
    pub id: String,
}

impl ManifestKey {
    /// The storage key.
    pub fn key(&self) -> String {
        format!("backups/{}/{}", self.cluster, self.id)
    }
}

pub(crate) struct RepoInner {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) config: RepoConfig,
    pub(crate) sealer: Sealer,
    pub(crate) key_id: Option<String>,
    pub(crate) index: RwLock<Index>,
    pub(crate) index_files: RwLock<Vec<String>>,
    /// Locks held through this handle, and the lock timing.
    pub(crate) locks: crate::lock::LockState,
    /// Index files that failed verification at the last load (key, reason).
    pub(crate) damaged_index: RwLock<Vec<(String, String)>>,
    /// Decoded bases of delta blobs, shared by every reader of this handle.
    pub(crate) base_cache: std::sync::Mutex<crate::reader::BaseCache>,
    /// Taken by whoever fetches bases (see `load_bases`).
    pub(crate) base_loader: tokio::sync::Mutex<()>,
}

/// An open repository. Cheap to clone; all clones share the index.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<RepoInner>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.inner.storage.location())
            .finish()
    }
}

const INDEX_AAD: &[u8] = b"pgkeep-index";

/// 16 random hex digits, to make object names unique across hosts.
pub(crate) fn random_suffix() -> String {
    random_hex(8)
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Checks a cluster name or manifest id so it is one safe path segment.
pub(crate) fn check_segment(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!(
            "invalid {what} {s:?}: use letters, digits, '-', '_', '.' or ':' (at most 128)"
        )))
    }
}

impl Repository {
    /// True when `storage` holds a repository (a `config` object).
    pub async fn exists(storage: &dyn Storage) -> Result<bool> {
        match storage.head("config").await {
            Ok(_) => Ok(true),
            Err(e) if e.kind == SErr::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates a repository. Fails with [`RepoError::AlreadyExists`] when one is there.
    ///
    /// Write order: the key first, then `config` (put-if-absent), so a half-made repository
    /// has no `config` and is not taken for a repository.
    pub async fn init(storage: Arc<dyn Storage>, opts: InitOptions) -> Result<Repository> {
        let config = RepoConfig {
            version: FORMAT_VERSION,
            id: random_hex(16),
            created: Utc::now(),
            encrypted: opts.passphrase.is_some(),
            compression_level: opts.compression_level,
            chunker: opts.chunker,
            pack_size: opts.pack_size,
        };
        config.check().map_err(RepoError::Invalid)?;
        opts.kdf.check().map_err(RepoError::Invalid)?;
        if Self::exists(storage.as_ref()).await? {
            return Err(RepoError::AlreadyExists {
                location: storage.location(),
            });
        }
        let (sealer, key_id) = match &opts.passphrase {
            Some(p) => {
                let master = MasterKey::generate();
                let id = write_key(storage.as_ref(), &master, p, opts.kdf).await?;
                (Sealer::Encrypted(Box::new(master)), Some(id))
            }
            None => (Sealer::Plain, None),
        };
        let body = serde_json::to_vec_pretty(&config).expect("config serializes");
        match storage.put_if_absent("config", Bytes::from(body)).await {
            Ok(()) => {}
            Err(e) if e.kind == SErr::AlreadyExists => {
                return Err(RepoError::AlreadyExists {
                    location: storage.location(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Repository {
            inner: Arc::new(RepoInner {
                storage,
                config,
                sealer,
                key_id,
                index: RwLock::new(Index::default()),
                index_files: RwLock::new(Vec::new()),
                locks: Default::default(),
                damaged_index: RwLock::new(Vec::new()),
                base_cache: Default::default(),
                base_loader: Default::default(),
            }),
        })
    }

    /// Opens a repository and loads its index. Reads only: a wrong passphrase writes nothing.
    pub async fn open(storage: Arc<dyn Storage>, passphrase: Option<&str>) -> Result<Repository> {
        let repo = Self::open_metadata_only(storage, passphrase).await?;
        repo.reload_index().await?;
        Ok(repo)
    }

    /// Opens a repository without reading its index: the `config` object and, when encrypted,
    /// the key files only. For commands whose start-up time matters and that touch only
    /// one-object-per-file data ([`Repository::put_sealed_if_absent`] /
    /// [`Repository::get_sealed`], e.g. WAL) or manifests. The in-memory index is empty:
    /// `has_blob` answers false and `save_manifest` refuses blob references until
    /// [`Repository::reload_index`] runs. Reads only, like [`Repository::open`].
    pub async fn open_metadata_only(
        storage: Arc<dyn Storage>,
        passphrase: Option<&str>,
    ) -> Result<Repository> {
        let location = storage.location();
        let raw = match storage.get("config").await {
            Ok(b) => b,
            Err(e) if e.kind == SErr::NotFound => {
                return Err(RepoError::NotARepository {
                    location,
                    reason: "there is no `config` object".into(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let config = parse_config(&raw, &location)?;
        let (sealer, key_id) = if config.encrypted {
            let p = passphrase.ok_or(RepoError::PassphraseRequired {
                location: location.clone(),
            })?;
            let (master, id) = find_key(storage.as_ref(), p).await?;
            (Sealer::Encrypted(Box::new(master)), Some(id))
        } else {
            refuse_plain_config_beside_keys(storage.as_ref()).await?;
            if passphrase.is_some() {
                tracing::warn!(
                    "a passphrase was given, but the repository at {location} is not encrypted: \
                     nothing it stores is encrypted"
                );
            }
            (Sealer::Plain, None)
        };
        Ok(Repository {
            inner: Arc::new(RepoInner {
                storage,
                config,
                sealer,
                key_id,
                index: RwLock::new(Index::default()),
                index_files: RwLock::new(Vec::new()),
                locks: Default::default(),
                damaged_index: RwLock::new(Vec::new()),
                base_cache: Default::default(),
                base_loader: Default::default(),
            }),
        })
    }

    /// Reads every index file again (to see what other processes added).
    ///
    /// An index file that fails verification (altered, truncated, unreadable) does not stop
    /// the repository from opening: it is skipped with a loud warning and listed by
    /// [`Repository::damaged_index_files`]. Its blobs then look absent, which is safe for
    /// writers (they store them again) and shows up in `check`; `repo repair-index`
    /// ([`Repository::repair_index`]) rebuilds what it described from the pack headers. Storage
    /// failures still fail the load.
    pub async fn reload_index(&self) -> Result<()> {
        let names: Vec<String> = self
            .inner
            .storage
            .list("index/")
            .await?
            .into_iter()
            .map(|m| m.key)
            .collect();
        // Per file: the index, or None when it vanished meanwhile (a concurrent repair), or
        // why it failed verification.
        type Loaded = std::result::Result<Option<IndexFile>, String>;
        let loaded: Vec<(String, Loaded)> = stream::iter(names)
            .map(|key| async move {
                match self.read_index_file(&key).await {
                    Ok(f) => Ok((key, Ok(Some(f)))),
                    Err(RepoError::Storage(e)) if e.kind == SErr::NotFound => Ok((key, Ok(None))),
                    Err(RepoError::Integrity { reason, .. }) => Ok((key, Err(reason))),
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        let mut index = Index::default();
        let mut keys = Vec::with_capacity(loaded.len());
        let mut damaged = Vec::new();
        for (key, f) in loaded {
            match f {
                Ok(Some(f)) => {
                    index.add_file(&f);
                    keys.push(key);
                }
                Ok(None) => {}
                Err(reason) => {
                    tracing::warn!(
                        "index file {key} is damaged ({reason}) and was skipped; the blobs it \
                         lists look absent until `pgkeep repo repair-index` rebuilds it from the \
                         packs"
                    );
                    damaged.push((key, reason));
                }
            }
        }
        damaged.sort();
        *self.inner.damaged_index.write().unwrap() = damaged;
        *self.inner.index.write().unwrap() = index;
        *self.inner.index_files.write().unwrap() = keys;
        Ok(())
    }

    /// Index files skipped at the last load because they failed verification, with why.
    /// Anything that removes data must refuse to run while this is not empty: packs listed
    /// only there would look unreferenced.
    pub fn damaged_index_files(&self) -> Vec<(String, String)> {
        self.inner.damaged_index.read().unwrap().clone()
    }

    pub(crate) async fn read_index_file(&self, key: &str) -> Result<IndexFile> {
        let raw = self.inner.storage.get(key).await?;
        parse_index_file(&self.inner.sealer, key, &raw)
    }

    /// Writes an index file and adds it to the in-memory index.
    /// Refuses when a lock of this handle is lost ([`Repository::ensure_locks_held`]).
    pub(crate) async fn write_index_file(&self, file: IndexFile) -> Result<String> {
        let key = self.store_index_file(&file).await?;
        self.inner.index.write().unwrap().add_file(&file);
        self.inner.index_files.write().unwrap().push(key.clone());
        Ok(key)
    }

    /// Stores an index file without adding it to the in-memory index (garbage collection
    /// rebuilds that once at the end). Refuses when a lock of this handle is lost.
    pub(crate) async fn store_index_file(&self, file: &IndexFile) -> Result<String> {
        self.ensure_locks_held()?;
        let json = serde_json::to_vec(file).expect("index serializes");
        let z = zstd::bulk::compress(&json, 3)
            .map_err(|e| RepoError::Invalid(format!("zstd failed: {e}")))?;
        let sealed = self.inner.sealer.seal_meta(INDEX_AAD, &z);
        let key = format!("index/{}", hex::encode(blake3::hash(&sealed).as_bytes()));
        self.inner.storage.put(&key, Bytes::from(sealed)).await?;
        Ok(key)
    }

    /// The repository's configuration.
    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }

    /// The storage it lives on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    /// The sealer (plain or encrypted) of this repository.
    pub fn sealer(&self) -> &Sealer {
        &self.inner.sealer
    }

    /// True when the blob is in the index.
    pub fn has_blob(&self, id: &Id) -> bool {
        self.inner.index.read().unwrap().contains(id)
    }

    /// Seals and stores a metadata object under `key` if absent (the WAL archive and manifests
    /// use it). `aad` must be the same when reading.
    pub async fn put_sealed_if_absent(&self, key: &str, aad: &[u8], plain: &[u8]) -> Result<()> {
        let z = zstd::bulk::compress(plain, self.inner.config.compression_level)
            .map_err(|e| RepoError::Invalid(format!("zstd failed: {e}")))?;
        let sealed = self.inner.sealer.seal_meta(aad, &z);
        self.inner
            .storage
            .put_if_absent(key, Bytes::from(sealed))
            .await?;
        Ok(())
    }

    /// Reads and verifies an object written by [`Repository::put_sealed_if_absent`].
    pub async fn get_sealed(&self, key: &str, aad: &[u8]) -> Result<Vec<u8>> {
        let raw = match self.inner.storage.get(key).await {
            Ok(r) => r,
            Err(e) if e.kind == SErr::NotFound => {
                return Err(RepoError::NotFound {
                    what: format!("object {key}"),
                })
            }
            Err(e) => return Err(e.into()),
        };
        open_sealed(&self.inner.sealer, key, aad, &raw, MAX_SEALED_LEN)
    }

    /// Stores a manifest: the commit point of a backup or dump.
    ///
    /// Refuses (before writing) when the body references a blob that is not indexed, so a
    /// manifest only ever references committed data (write order: packs, index, manifest),
    /// and when a lock taken through this handle is lost ([`RepoError::LockLost`]): the data
    /// it references may have been removed meanwhile by a process that took the lock for
    /// stale.
    pub async fn save_manifest<T: Serialize>(
        &self,
        cluster: &str,
        id: &str,
        body: &T,
    ) -> Result<()> {
        check_segment("cluster name", cluster)?;
        check_segment("backup id", id)?;
        self.ensure_locks_held()?;
        // Serialized once, and its references walked in the text: a JSON tree of a backup of
        // 80,000 files was 140 MiB, most of a backup's peak memory.
        let json = serde_json::to_vec(body).map_err(|e| RepoError::Invalid(e.to_string()))?;
        let mut unindexed = None;
        {
            let index = self.inner.index.read().unwrap();
            let mut check = |b: BlobId| {
                if unindexed.is_none() && !index.contains(&b) {
                    unindexed = Some(b);
                }
            };
            let mut de = serde_json::Deserializer::from_slice(&json);
            BlobRefWalk::new(&mut check)
                .deserialize(&mut de)
                .map_err(|e| RepoError::Invalid(format!("manifest body: {e}")))?;
        }
        if let Some(b) = unindexed {
            return Err(RepoError::Invalid(format!(
                "manifest {cluster}/{id} references blob {b} that is not indexed (finish the writer before saving the manifest)"
            )));
        }
        let key = ManifestKey {
            cluster: cluster.into(),
            id: id.into(),
        }
        .key();
        match self.put_sealed_if_absent(&key, key.as_bytes(), &json).await {
            Err(RepoError::Storage(e)) if e.kind == SErr::AlreadyExists => Err(RepoError::Invalid(
                format!("manifest {cluster}/{id} already exists; manifests are never overwritten"),
            )),
            other => other,
        }
    }

    /// Loads and verifies a manifest.
    pub async fn load_manifest(&self, cluster: &str, id: &str) -> Result<serde_json::Value> {
        let plain = self.load_manifest_text(cluster, id).await?;
        serde_json::from_slice(&plain).map_err(|e| {
            let key = ManifestKey {
                cluster: cluster.into(),
                id: id.into(),
            }
            .key();
            RepoError::integrity(&key, format!("manifest does not parse: {e}"))
        })
    }

    /// Loads and verifies a manifest, as its JSON text (for readers that parse it into their
    /// own types rather than into a JSON value).
    pub async fn load_manifest_text(&self, cluster: &str, id: &str) -> Result<Vec<u8>> {
        check_segment("cluster name", cluster)?;
        check_segment("backup id", id)?;
        let key = ManifestKey {
            cluster: cluster.into(),
            id: id.into(),
        }
        .key();
        match self.get_sealed(&key, key.as_bytes()).await {
            Err(RepoError::NotFound { .. }) => Err(RepoError::NotFound {
                what: format!("backup {id} of cluster {cluster}"),
            }),
            other => other,
        }
    }

    /// True when the manifest `backups/<cluster>/<id>` exists (a HEAD; nothing is read).
    pub async fn has_manifest(&self, cluster: &str, id: &str) -> Result<bool> {
        check_segment("cluster name", cluster)?;
        check_segment("backup id", id)?;
        let key = ManifestKey {
            cluster: cluster.into(),
            id: id.into(),
        }
        .key();
        match self.inner.storage.head(&key).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind == SErr::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists manifests, sorted by cluster then id.
    pub async fn list_manifests(&self, cluster: Option<&str>) -> Result<Vec<ManifestKey>> {
        let prefix = match cluster {
            Some(c) => {
                check_segment("cluster name", c)?;
                format!("backups/{c}/")
            }
            None => "backups/".to_string(),
        };
        let mut out: Vec<ManifestKey> = self
            .inner
            .storage
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|m| {
                let rest = m.key.strip_prefix("backups/")?;
                let (c, id) = rest.split_once('/')?;
                (!id.contains('/') && !id.starts_with('.')).then(|| ManifestKey {
                    cluster: c.into(),
                    id: id.into(),
                })
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Deletes a manifest (needs the caller to hold an exclusive lock).
    pub async fn delete_manifest(&self, cluster: &str, id: &str) -> Result<()> {
        let key = ManifestKey {
            cluster: cluster.into(),
            id: id.into(),
        }
        .key();
        self.inner.storage.delete(&key).await?;
        Ok(())
    }

    /// Every stream referenced by a manifest body.
    pub fn stream_refs(body: &serde_json::Value) -> Vec<StreamRef> {
        let mut v = Vec::new();
        collect_stream_refs(body, &mut v);
        v
    }

    /// Figures for `repo info`.
    pub async fn info(&self) -> Result<RepoInfo> {
        let s = &self.inner.storage;
        let (keys, locks, manifests) =
            tokio::try_join!(s.list("keys/"), s.list("locks/"), s.list("backups/"))?;
        let index = self.inner.index.read().unwrap();
        let c = &self.inner.config;
        Ok(RepoInfo {
            id: c.id.clone(),
            version: c.version,
            encrypted: c.encrypted,
            location: s.location(),
            compression_level: c.compression_level,
            chunker: c.chunker,
            pack_size: c.pack_size,
            packs: index.packs().len(),
            pack_bytes: index.packs().iter().map(|p| p.1).sum(),
            blobs: index.blob_count(),
            blob_raw_bytes: index.iter().map(|(_, l)| l.raw_length as u64).sum(),
            index_files: self.inner.index_files.read().unwrap().len(),
            keys: keys.len(),
            locks: locks.len(),
            manifests: manifests.len(),
        })
    }

    /// Adds a passphrase: the master key wrapped again. Data is not rewritten.
    pub async fn add_key(&self, new_passphrase: &str) -> Result<KeyInfo> {
        let Sealer::Encrypted(master) = &self.inner.sealer else {
            return Err(RepoError::Invalid(
                "this repository is not encrypted; it has no keys to add".into(),
            ));
        };
        let id = write_key(
            self.inner.storage.as_ref(),
            master,
            new_passphrase,
            KdfParams::default(),
        )
        .await?;
        Ok(self
            .list_keys()
            .await?
            .into_iter()
            .find(|k| k.id == id)
            .expect("just written"))
    }

    /// Lists keys.
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let mut out = Vec::new();
        for m in self.inner.storage.list("keys/").await? {
            let id = m.key.trim_start_matches("keys/").to_string();
            let raw = self.inner.storage.get(&m.key).await?;
            let kf: KeyFile = serde_json::from_slice(&raw).map_err(|e| {
                RepoError::integrity(&m.key, format!("key file does not parse: {e}"))
            })?;
            let current = self.inner.key_id.as_deref() == Some(id.as_str());
            out.push(KeyInfo {
                id,
                created: kf.created,
                host: kf.host,
                current,
            });
        }
        out.sort_by_key(|a| a.created);
        Ok(out)
    }

    /// Removes a key by id or unique prefix. Refuses the key in use and the last key.
    pub async fn remove_key(&self, id_or_prefix: &str) -> Result<KeyInfo> {
        let keys = self.list_keys().await?;
        let matches: Vec<&KeyInfo> = keys
            .iter()
            .filter(|k| k.id.starts_with(id_or_prefix))
            .collect();
        let k = match matches.as_slice() {
            [k] => *k,
            [] => {
                return Err(RepoError::NotFound {
                    what: format!("key {id_or_prefix}"),
                })
            }
            _ => {
                return Err(RepoError::Invalid(format!(
                    "key prefix {id_or_prefix} is ambiguous ({} keys match)",
                    matches.len()
                )))
            }
        };
        if k.current {
            return Err(RepoError::Invalid(format!(
                "key {} is the one in use; open the repository with another passphrase to remove it",
                k.id
            )));
        }
        if keys.len() == 1 {
            return Err(RepoError::Invalid("refusing to remove the last key".into()));
        }
        self.inner.storage.delete(&format!("keys/{}", k.id)).await?;
        Ok(k.clone())
    }

    /// Id of the key used to open the repository.
    pub fn key_id(&self) -> Option<&str> {
        self.inner.key_id.as_deref()
    }
}

async fn write_key(
    storage: &dyn Storage,
    master: &MasterKey,
    passphrase: &str,
    kdf: KdfParams,
) -> Result<String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let kek = derive_kek(passphrase, &salt, kdf).map_err(RepoError::Invalid)?;
    let kf = KeyFile {
        version: FORMAT_VERSION,
        created: Utc::now(),
        host: crate::lock::hostname(),
        kdf: "argon2id".into(),
        kdf_params: kdf,
        salt: hex::encode(salt),
        wrapped: hex::encode(wrap_master(&kek, master)),
    };
    let id = random_hex(16);
    let body = serde_json::to_vec_pretty(&kf).expect("key file serializes");
    storage
        .put_if_absent(&format!("keys/{id}"), Bytes::from(body))
        .await?;
    Ok(id)
}

/// A plain repository never has key files (`repo init --no-encryption` writes none and
/// `repo key add` refuses), so key files beside a `config` that says "not encrypted" mean the
/// config was altered: opening it would write every later backup in plaintext into an
/// encrypted repository (an encryption downgrade). The `config` object is plain JSON and
/// carries no MAC, so this is the check that catches it.
async fn refuse_plain_config_beside_keys(storage: &dyn Storage) -> Result<()> {
    let keys = storage.list("keys/").await?;
    if keys.is_empty() {
        return Ok(());
    }
    Err(RepoError::integrity(
        format!("{}/config", storage.location()),
        format!(
            "it says the repository is not encrypted, but the repository holds {} key file(s): \
             the config was altered, and writing to it would store plaintext in an encrypted \
             repository; nothing was written. Restore `config` from a copy, or set \
             \"encrypted\": true in it again",
            keys.len()
        ),
    ))
}

async fn find_key(storage: &dyn Storage, passphrase: &str) -> Result<(MasterKey, String)> {
    let keys = storage.list("keys/").await?;
    if keys.is_empty() {
        return Err(RepoError::integrity(
            storage.location(),
            "the repository is encrypted but has no key files",
        ));
    }
    // A key file this process cannot read (root's 0600 key, read by the archiver running as
    // postgres) must not hide another key that matches: skip it, and say so only if none does.
    let mut unreadable = None;
    for m in keys {
        let raw = match storage.get(&m.key).await {
            Ok(raw) => raw,
            Err(e) if e.kind == SErr::PermissionDenied => {
                tracing::debug!(key = %m.key, "skipping a key file this process cannot read: {e}");
                unreadable.get_or_insert(e);
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let k = match KeyFile::parse(&raw) {
            Ok((_, k)) => k,
            Err(e) => {
                tracing::warn!(key = %m.key, "skipping unreadable key file: {e}");
                continue;
            }
        };
        let kek = derive_kek(passphrase, &k.salt, k.kdf_params).map_err(RepoError::Invalid)?;
        if let Some(master) = unwrap_master(&kek, &k.wrapped) {
            return Ok((master, m.key.trim_start_matches("keys/").to_string()));
        }
    }
    match unreadable {
        Some(e) => Err(e.into()),
        None => Err(RepoError::WrongPassphrase {
            location: storage.location(),
        }),
    }
}

/// Parses and checks a repository's `config` object ([`RepoConfig::check`]): its format
/// version must be this build's, its settings within what the writers handle.
pub fn parse_config(raw: &[u8], location: &str) -> Result<RepoConfig> {
    let config: RepoConfig =
        serde_json::from_slice(raw).map_err(|e| RepoError::NotARepository {
            location: location.to_string(),
            reason: format!("its `config` object is unreadable ({e})"),
        })?;
    if config.version != FORMAT_VERSION {
        return Err(RepoError::Invalid(format!(
            "repository at {location} has format version {}, this pgkeep reads version {FORMAT_VERSION}\nHINT: use a pgkeep release that supports it",
            config.version
        )));
    }
    config.check().map_err(|reason| RepoError::NotARepository {
        location: location.to_string(),
        reason: format!("its `config` object holds settings no pgkeep writes ({reason})"),
    })?;
    Ok(config)
}

/// Verifies, decompresses (at most [`MAX_INDEX_LEN`] bytes), parses and checks
/// ([`IndexFile::check`]) an index file as stored under `key`.
pub fn parse_index_file(sealer: &Sealer, key: &str, raw: &[u8]) -> Result<IndexFile> {
    let plain = sealer
        .open_meta(INDEX_AAD, raw)
        .ok_or_else(|| RepoError::integrity(key, "index file failed authentication"))?;
    let json = decompress_bounded(&plain, MAX_INDEX_LEN)
        .map_err(|e| RepoError::integrity(key, format!("index file does not decompress: {e}")))?;
    let file: IndexFile = serde_json::from_slice(&json)
        .map_err(|e| RepoError::integrity(key, format!("index file does not parse: {e}")))?;
    file.check()
        .map_err(|e| RepoError::integrity(key, format!("index file is invalid: {e}")))?;
    Ok(file)
}

/// Verifies and decompresses a metadata object as [`Repository::put_sealed_if_absent`]
/// stored it under `key` with `aad`; more than `max` bytes once decompressed is an integrity
/// error ([`Repository::get_sealed`] allows [`MAX_SEALED_LEN`]).
pub fn open_sealed(
    sealer: &Sealer,
    key: &str,
    aad: &[u8],
    raw: &[u8],
    max: usize,
) -> Result<Vec<u8>> {
    let z = sealer
        .open_meta(aad, raw)
        .ok_or_else(|| RepoError::integrity(key, "failed authentication (altered or truncated)"))?;
    decompress_bounded(&z, max)
        .map_err(|e| RepoError::integrity(key, format!("does not decompress: {e}")))
}

/// Decompresses zstd frames (one or several, concatenated), refusing more than `limit`
/// bytes of output. Memory grows with the output actually produced, not with the size a
/// frame header claims (at most 64 MiB is reserved ahead on its word).
fn decompress_bounded(z: &[u8], limit: usize) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(z) {
        out.reserve((n.min(limit as u64) as usize).min(64 << 20));
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(z).map_err(|e| e.to_string())?;
    let n = decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if n > limit {
        return Err(format!("more than {limit} bytes once decompressed"));
    }
    Ok(out)
}
