//! RELIABILITY row 9: a store that answers 200 but keeps a short object (the
//! 200-with-error / lost-tail case) is caught by the HEAD size check after every write.
//! The store is object_store's in-memory one behind a scripted wrapper that drops the last
//! byte of every upload — the one fault a real server cannot be made to produce on demand.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use pgkeep_storage::{conformance, ErrorKind, ObjectStoreStorage, Storage};

#[derive(Debug)]
struct DropsLastByte(InMemory);

impl fmt::Display for DropsLastByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DropsLastByte")
    }
}

#[async_trait]
impl ObjectStore for DropsLastByte {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let data = Bytes::from(payload);
        let short = data.slice(..data.len().saturating_sub(1));
        self.0
            .put_opts(location, PutPayload::from_bytes(short), opts)
            .await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.0.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.0.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.0.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.0.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.0.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.0.copy_opts(from, to, options).await
    }
}

#[tokio::test]
async fn short_stored_object_fails_the_write() {
    let s = ObjectStoreStorage::new(Arc::new(DropsLastByte(InMemory::new())), "p", "mem://p");
    for r in [
        s.put("a", conformance::pattern(1000, 1)).await,
        s.put_if_absent("b", conformance::pattern(1000, 2)).await,
    ] {
        let e = r.expect_err("a short object was accepted");
        assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
        assert!(e.message.contains("999 bytes after writing 1000"), "{e}");
    }
}

/// The same suite as for real servers passes on object_store's in-memory store, which
/// pins down that ObjectStoreStorage itself (prefixing, list filtering, range checks) is
/// right independently of any server.
#[tokio::test]
async fn in_memory_conformance() {
    let s: Arc<dyn Storage> = Arc::new(ObjectStoreStorage::new(
        Arc::new(InMemory::new()),
        "pre/fix",
        "mem://pre/fix",
    ));
    conformance::run_all(s).await;
}
