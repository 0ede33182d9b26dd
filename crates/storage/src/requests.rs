//! Counting the HTTP requests pgkeep sends to object storage.
//!
//! Providers bill per request (S3 charges PUT, POST and LIST about ten times GET), and request
//! counts are what a repository layout trades against bytes: a user comparing tools or
//! tuning pack sizes needs them. [`CountingConnector`] sits under `object_store`'s HTTP
//! client, so every request on the wire is counted, including multipart initiations and
//! completions, list pages, credential fetches and `object_store`'s own retries, none of
//! which the [`crate::Storage`] calls show.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};

/// The HTTP methods counted one by one; any other lands in `OTHER`.
const METHODS: [&str; 5] = ["GET", "PUT", "POST", "HEAD", "DELETE"];

/// Requests sent, by HTTP method. Counts only grow.
#[derive(Debug, Default)]
pub struct RequestCounter {
    by_method: [AtomicU64; METHODS.len() + 1],
}

impl RequestCounter {
    fn add(&self, method: &str) {
        let i = METHODS
            .iter()
            .position(|m| *m == method)
            .unwrap_or(METHODS.len());
        self.by_method[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests sent so far, in total.
    pub fn total(&self) -> u64 {
        self.by_method
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests sent so far by method (`GET`, `PUT`, `POST`, `HEAD`, `DELETE`, `OTHER`),
    /// methods never used left out.
    pub fn by_method(&self) -> BTreeMap<String, u64> {
        METHODS
            .iter()
            .copied()
            .chain(["OTHER"])
            .zip(&self.by_method)
            .map(|(m, c)| (m.to_string(), c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// The process-wide counter that [`crate::open_storage`] wires into every object-storage
/// backend it builds (local disk sends no requests and is not counted).
pub fn global_request_counter() -> Arc<RequestCounter> {
    static COUNTER: OnceLock<Arc<RequestCounter>> = OnceLock::new();
    COUNTER.get_or_init(Default::default).clone()
}

/// An [`HttpConnector`] giving `object_store` the usual reqwest client, wrapped so that each
/// request is counted in a [`RequestCounter`] before it is sent.
#[derive(Debug)]
pub struct CountingConnector {
    counter: Arc<RequestCounter>,
}

impl CountingConnector {
    /// Counts into `counter`.
    pub fn new(counter: Arc<RequestCounter>) -> Self {
        Self { counter }
    }
}

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(CountingService {
            inner,
            counter: self.counter.clone(),
        }))
    }
}

#[derive(Debug)]
struct CountingService {
    inner: HttpClient,
    counter: Arc<RequestCounter>,
}

#[async_trait]
impl HttpService for CountingService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.counter.add(req.method().as_str());
        self.inner.execute(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_method_and_leaves_unused_methods_out() {
        let c = RequestCounter::default();
        for m in ["PUT", "PUT", "GET", "PATCH"] {
            c.add(m);
        }
        assert_eq!(c.total(), 4);
        let want: BTreeMap<String, u64> = [("GET", 1), ("OTHER", 1), ("PUT", 2)]
            .into_iter()
            .map(|(m, n)| (m.to_string(), n))
            .collect();
        assert_eq!(c.by_method(), want);
    }
}
