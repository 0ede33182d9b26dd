//! Storage over any `object_store` backend (S3 and compatibles, Azure Blob, GCS).

use std::error::Error as _;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions,
    PutPayload,
};

use crate::redact::redact_text;
use crate::{validate_key, validate_prefix, ErrorKind, ObjectMeta, Result, Storage, StorageError};

/// Objects up to this size are written with one PUT; larger ones with a multipart upload.
/// Half the repository's default pack size (16 MiB), so default and larger packs go up as
/// parts in parallel (one big PUT runs on one connection, and a failed part is retried alone
/// instead of the whole object); packs set to 8 MiB or less go in one PUT.
pub const DEFAULT_MULTIPART_THRESHOLD: usize = 8 * 1024 * 1024;
/// Part size of multipart uploads. S3 wants at least 5 MiB for every part but the last
/// (SeaweedFS enforces it too), Azure blocks and GCS parts have no such floor.
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts of one object uploaded at once.
const PART_CONCURRENCY: usize = 4;

/// A [`Storage`] over an `object_store` store, with every key below a fixed prefix.
///
/// Invariants: an object is visible only once completely written (single PUT, or a
/// completed multipart upload; a failed multipart upload is aborted); every write is
/// followed by a HEAD whose size must match, so a 200-with-error answer or a short object
/// is reported as [`ErrorKind::Corrupt`]; `put_if_absent` uses a conditional create
/// (`If-None-Match: *`) with a single PUT whatever the size.
#[derive(Debug, Clone)]
pub struct ObjectStoreStorage {
    store: Arc<dyn ObjectStore>,
    /// Key prefix without leading or trailing `/`; may be empty.
    prefix: String,
    /// For messages, e.g. `s3://bucket/prefix`; never holds credentials.
    location: String,
    multipart_threshold: usize,
    part_size: usize,
    /// Storage class and the key prefixes it applies to (empty: every key).
    storage_class: Option<(String, Vec<String>)>,
}

impl ObjectStoreStorage {
    /// Wraps `store`; keys are stored below `prefix` (leading/trailing `/` ignored).
    /// `location` names the place in messages (`s3://bucket/prefix`), without credentials.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, location: impl Into<String>) -> Self {
        ObjectStoreStorage {
            store,
            prefix: prefix.trim_matches('/').to_owned(),
            location: location.into(),
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
            storage_class: None,
        }
    }

    /// Changes when multipart uploads start and their part size (at least 5 MiB for S3).
    pub fn with_multipart(mut self, threshold: usize, part_size: usize) -> Self {
        self.multipart_threshold = threshold;
        self.part_size = part_size.max(1);
        self
    }

    /// Writes objects whose keys start with one of `prefixes` (every object when empty) with
    /// the storage class `class` (S3 `x-amz-storage-class`, Azure access tier, GCS class).
    pub fn with_storage_class(mut self, class: &str, prefixes: &[String]) -> Self {
        self.storage_class = Some((class.to_owned(), prefixes.to_vec()));
        self
    }

    /// The attributes of a new object under `key`: its storage class, if one applies.
    fn attributes_for(&self, key: &str) -> Attributes {
        let mut a = Attributes::new();
        if let Some((class, prefixes)) = &self.storage_class {
            if prefixes.is_empty() || prefixes.iter().any(|p| key.starts_with(p.as_str())) {
                a.insert(Attribute::StorageClass, class.clone().into());
            }
        }
        a
    }

    /// The underlying store, for tests and tools that need raw access.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn path_of(&self, key: &str) -> Result<Path> {
        validate_key(key)?;
        Path::parse(self.full_key(key)).map_err(|e| {
            StorageError::new(
                ErrorKind::Other,
                Some(key),
                format!("invalid object key {key:?}: {e}"),
            )
        })
    }

    fn err(&self, op: &str, key: &str, e: object_store::Error) -> StorageError {
        map_error(op, &self.location, key, e)
    }

    async fn check_size(&self, op: &str, key: &str, path: &Path, expected: u64) -> Result<()> {
        let meta = self
            .store
            .head(path)
            .await
            .map_err(|e| self.err(op, key, e))?;
        if meta.size != expected {
            return Err(StorageError::new(
                ErrorKind::Corrupt,
                Some(key),
                format!(
                    "{op} {}/{key}: the store reports {} bytes after writing {expected}. \
                     HINT: the upload did not complete; retry, and check the object store",
                    self.location, meta.size
                ),
            ));
        }
        Ok(())
    }

    async fn put_multipart(&self, key: &str, path: &Path, data: Bytes) -> Result<()> {
        let opts = PutMultipartOptions {
            attributes: self.attributes_for(key),
            ..Default::default()
        };
        let mut upload = self
            .store
            .put_multipart_opts(path, opts)
            .await
            .map_err(|e| self.err("put", key, e))?;
        // put_part must be called in order (it numbers the parts); the returned futures
        // may run concurrently.
        let mut parts = Vec::new();
        let mut off = 0;
        while off < data.len() {
            let end = (off + self.part_size).min(data.len());
            parts.push(upload.put_part(PutPayload::from_bytes(data.slice(off..end))));
            off = end;
        }
        let mut stored = 0usize;
        let uploaded: std::result::Result<Vec<()>, _> = futures::stream::iter(parts)
            .buffer_unordered(PART_CONCURRENCY)
            .inspect_ok(|()| {
                stored += 1;
                if stored == 1 {
                    // Crash tests kill here: parts on the server, the upload never completed.
                    crate::crashpoint::reached(crate::crashpoint::KillPoint::MidMultipart);
                }
            })
            .try_collect()
            .await;
        let result = match uploaded {
            Ok(_) => upload.complete().await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            // Nothing may become visible after a failure: abort so the parts are dropped.
            if let Err(abort) = upload.abort().await {
                tracing::warn!(
                    "aborting the multipart upload of {}/{key} failed too: {}",
                    self.location,
                    redact_text(&abort.to_string())
                );
            }
            return Err(self.err("put", key, e));
        }
        Ok(())
    }
}

#[async_trait]
impl Storage for ObjectStoreStorage {
    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path_of(key)?;
        let res = self
            .store
            .get(&path)
            .await
            .map_err(|e| self.err("get", key, e))?;
        let expected = res.meta.size;
        let data = res.bytes().await.map_err(|e| self.err("get", key, e))?;
        if data.len() as u64 != expected {
            return Err(short_read(&self.location, key, expected, data.len()));
        }
        Ok(data)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path_of(key)?;
        if range.start > range.end {
            return Err(StorageError::new(
                ErrorKind::Other,
                Some(key),
                format!("invalid range {range:?} for {key} (this is a bug in the caller)"),
            ));
        }
        let want = range.end - range.start;
        if want == 0 {
            // Stores reject empty ranges; an empty read of an existing object is valid.
            self.head(key).await?;
            return Ok(Bytes::new());
        }
        match self.store.get_range(&path, range.clone()).await {
            Ok(data) if data.len() as u64 == want => Ok(data),
            Ok(data) => Err(short_read(&self.location, key, want, data.len())),
            Err(e) => {
                let err = self.err("get_range", key, e);
                if matches!(err.kind, ErrorKind::Other) {
                    // Stores answer a range past the end in their own ways (416, a
                    // truncated body); name it plainly when the object is too short.
                    if let Ok(meta) = self.head(key).await {
                        if meta.size < range.end {
                            return Err(StorageError::new(
                                ErrorKind::Corrupt,
                                Some(key),
                                format!(
                                    "object {}/{key} is {} bytes, shorter than the requested \
                                     range {}..{}. HINT: the object is truncated or the index \
                                     is wrong; run `pgkeep repo check`",
                                    self.location, meta.size, range.start, range.end
                                ),
                            ));
                        }
                    }
                }
                Err(err)
            }
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path_of(key)?;
        let len = data.len() as u64;
        if data.len() <= self.multipart_threshold {
            self.store
                .put_opts(
                    &path,
                    PutPayload::from_bytes(data),
                    PutOptions {
                        attributes: self.attributes_for(key),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| self.err("put", key, e))?;
        } else {
            self.put_multipart(key, &path, data).await?;
        }
        self.check_size("put", key, &path, len).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path_of(key)?;
        let len = data.len() as u64;
        self.store
            .put_opts(
                &path,
                PutPayload::from_bytes(data),
                PutOptions {
                    mode: PutMode::Create,
                    attributes: self.attributes_for(key),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| self.err("put_if_absent", key, e))?;
        self.check_size("put_if_absent", key, &path, len).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        // object_store lists whole path segments; list the enclosing segment and filter,
        // which gives the plain string-prefix semantics of the trait.
        let full = if self.prefix.is_empty() {
            prefix.to_owned()
        } else {
            format!("{}/{prefix}", self.prefix)
        };
        let dir = match full.rfind('/') {
            Some(i) => Some(Path::parse(&full[..i]).map_err(|e| {
                StorageError::new(
                    ErrorKind::Other,
                    None,
                    format!("invalid prefix {prefix:?}: {e}"),
                )
            })?),
            None => None,
        };
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let mut stream = self.store.list(dir.as_ref());
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|e| self.err("list", prefix, e))?;
            let loc = meta.location.as_ref();
            if loc.len() < strip || !loc.starts_with(&full) {
                continue;
            }
            out.push(ObjectMeta {
                key: loc[strip..].to_owned(),
                size: meta.size,
                last_modified: meta.last_modified,
            });
        }
        Ok(out)
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let path = self.path_of(key)?;
        let meta = self
            .store
            .head(&path)
            .await
            .map_err(|e| self.err("head", key, e))?;
        Ok(ObjectMeta {
            key: key.to_owned(),
            size: meta.size,
            last_modified: meta.last_modified,
        })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match self.store.delete(&path).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    fn location(&self) -> String {
        self.location.clone()
    }
}

fn short_read(location: &str, key: &str, expected: u64, got: usize) -> StorageError {
    StorageError::new(
        ErrorKind::Corrupt,
        Some(key),
        format!(
            "reading {location}/{key}: got {got} bytes, expected {expected} (body cut short). \
             HINT: usually a dropped connection; retry"
        ),
    )
}

/// Pulls an HTTP status out of object_store's error text ("status code: 503 …").
fn status_in(text: &str) -> Option<u16> {
    let i = text.find("status code: ")? + "status code: ".len();
    text.get(i..i + 3)?.parse().ok()
}

/// Whether any error in the chain is a connection-level failure worth retrying.
fn is_transport_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
            use object_store::client::HttpErrorKind as K;
            return matches!(
                h.kind(),
                K::Connect | K::Request | K::Timeout | K::Interrupted
            );
        }
        cur = err.source();
    }
    false
}

/// The first error in the chain that says a TLS certificate was refused, as text. Retrying
/// cannot help, and "check the network" would send the user the wrong way.
fn certificate_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if text.contains("certificate") {
            return Some(text);
        }
        cur = err.source();
    }
    None
}

/// Maps an object_store error to a [`StorageError`]: kind for retries and exit codes, a
/// message naming the operation, location and key, with URLs and bodies redacted.
pub(crate) fn map_error(
    op: &str,
    location: &str,
    key: &str,
    e: object_store::Error,
) -> StorageError {
    use object_store::Error as E;
    let mut text = redact_text(&e.to_string());
    let refused_certificate = std::error::Error::source(&e).and_then(certificate_error);
    let (kind, hint) = match &e {
        E::NotFound { .. } => (ErrorKind::NotFound, ""),
        E::AlreadyExists { .. } | E::Precondition { .. } => (ErrorKind::AlreadyExists, ""),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
            ErrorKind::PermissionDenied,
            " HINT: check the credentials in the environment (AWS_*, AZURE_*, \
             GOOGLE_APPLICATION_CREDENTIALS) and the bucket policy",
        ),
        E::NotSupported { .. } | E::NotImplemented { .. } | E::UnknownConfigurationKey { .. } => (
            ErrorKind::Config,
            " HINT: this store or its configuration does not support the operation \
             (conditional create needs If-None-Match support)",
        ),
        E::InvalidPath { .. } => (ErrorKind::Other, ""),
        _ => {
            let status = status_in(&text);
            let source: Option<&(dyn std::error::Error + 'static)> = e.source();
            match status {
                Some(401) | Some(403) => (
                    ErrorKind::PermissionDenied,
                    " HINT: check the credentials in the environment and the bucket policy",
                ),
                Some(404) => (ErrorKind::NotFound, ""),
                Some(507) => (ErrorKind::StorageFull, " HINT: the store is out of space"),
                Some(s) if s >= 500 || s == 429 || s == 408 => (
                    ErrorKind::Temporary,
                    " HINT: the store is busy or failing; retry later",
                ),
                _ if text.contains("SlowDown")
                    || text.contains("InternalError")
                    || text.contains("ServiceUnavailable") =>
                {
                    (
                        ErrorKind::Temporary,
                        " HINT: the store is busy or failing; retry later",
                    )
                }
                _ if refused_certificate.is_some() => {
                    let why = refused_certificate.unwrap_or_default();
                    if !text.contains(&why) {
                        text = format!("{text} ({})", redact_text(&why));
                    }
                    (
                        ErrorKind::Config,
                        " HINT: the server's TLS certificate is not trusted. For a private CA, \
                         point SSL_CERT_FILE at a PEM file holding the usual roots and that CA",
                    )
                }
                _ if source.is_some_and(is_transport_error) => (
                    ErrorKind::Temporary,
                    " HINT: check the network and the endpoint; retry later",
                ),
                _ => (ErrorKind::Other, ""),
            }
        }
    };
    let message = match kind {
        // A write cannot miss its object: the bucket or container itself is missing.
        ErrorKind::NotFound if op.starts_with("put") => {
            return StorageError::new(
                ErrorKind::Config,
                Some(key),
                format!(
                    "{op} {location}/{key} failed: the bucket or container does not exist \
                     ({text}). HINT: create it, or fix the repository URL"
                ),
            );
        }
        ErrorKind::NotFound => format!("object {location}/{key} not found"),
        ErrorKind::AlreadyExists => format!("object {location}/{key} already exists"),
        _ => format!("{op} {location}/{key} failed: {text}.{hint}"),
    };
    StorageError::new(kind, Some(key), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(text: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: text.to_owned().into(),
        }
    }

    #[test]
    fn a_refused_tls_certificate_is_a_configuration_error_naming_ssl_cert_file() {
        let e = map_error(
            "get",
            "s3://b/p",
            "config",
            generic("error sending request: invalid peer certificate: UnknownIssuer"),
        );
        assert_eq!(e.kind, ErrorKind::Config, "{e}");
        assert!(e.message.contains("UnknownIssuer"), "{e}");
        assert!(
            e.message
                .contains("HINT: the server's TLS certificate is not trusted. For a private CA, point SSL_CERT_FILE at"),
            "{e}"
        );
    }

    #[test]
    fn maps_kinds_and_redacts() {
        let cases = [
            ("Error performing PUT http://h/b/k?X-Amz-Signature=SECRETSIG in 1ms - Server returned non-2xx status code: 503 Service Unavailable", ErrorKind::Temporary),
            ("Server returned non-2xx status code: 429 Too Many Requests", ErrorKind::Temporary),
            ("Server returned non-2xx status code: 500 Internal Server Error", ErrorKind::Temporary),
            ("Server returned non-2xx status code: 403 Forbidden", ErrorKind::PermissionDenied),
            ("Server returned error response: <Error><Code>SlowDown</Code></Error>", ErrorKind::Temporary),
            ("Server returned non-2xx status code: 400 Bad Request", ErrorKind::Other),
        ];
        for (text, kind) in cases {
            let e = map_error("put", "s3://b/p", "k", generic(text));
            assert_eq!(e.kind, kind, "{text}");
            assert!(e.message.contains("s3://b/p/k"), "{e}");
            assert!(!e.message.contains("SECRETSIG"), "{e}");
        }
        let nf = object_store::Error::NotFound {
            path: "p/k".into(),
            source: "404".into(),
        };
        assert_eq!(
            map_error("get", "s3://b/p", "k", nf).kind,
            ErrorKind::NotFound
        );
        let nf = object_store::Error::NotFound {
            path: "p/k".into(),
            source: "404".into(),
        };
        // A write that cannot find its target: the bucket is missing.
        assert_eq!(
            map_error("put", "s3://b/p", "k", nf).kind,
            ErrorKind::Config
        );
        let pre = object_store::Error::Precondition {
            path: "p/k".into(),
            source: "412".into(),
        };
        assert_eq!(
            map_error("put_if_absent", "s3://b/p", "k", pre).kind,
            ErrorKind::AlreadyExists
        );
        let unauth = object_store::Error::Unauthenticated {
            path: "p/k".into(),
            source: "401".into(),
        };
        assert_eq!(
            map_error("get", "s3://b/p", "k", unauth).kind,
            ErrorKind::PermissionDenied
        );
    }

    #[test]
    fn finds_status() {
        assert_eq!(
            status_in("x Server returned non-2xx status code: 503 Service"),
            Some(503)
        );
        assert_eq!(status_in("nothing"), None);
    }
}
