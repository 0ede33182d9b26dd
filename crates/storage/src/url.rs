//! From a repository URL to a storage backend.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::aws::AmazonS3ConfigKey;
use object_store::azure::AzureConfigKey;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::gcp::GoogleConfigKey;
use object_store::{ClientConfigKey, ObjectStore, RetryConfig};
use serde::Deserialize;

use crate::redact::{redact_text, redact_url};
use crate::{
    global_retry_counter, ErrorKind, LocalStorage, ObjectStoreStorage, Result, Retry, RetryPolicy,
    Storage, StorageError,
};

/// Options for opening a repository, beside its URL. Credentials are deliberately absent:
/// they come from the environment only (`AWS_*`, `AZURE_STORAGE_*`,
/// `GOOGLE_APPLICATION_CREDENTIALS`/`GOOGLE_SERVICE_ACCOUNT`), so they never sit in a
/// config file, a URL or the process list. Embeddable in the config file (unknown keys
/// rejected).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageOptions {
    /// Custom endpoint URL for S3-compatible stores (`http://127.0.0.1:8333`) or Azure
    /// (`http://127.0.0.1:10000/devstoreaccount1`), or the base URL of a GCS-compatible
    /// server. Default: the provider's public endpoint (or `AWS_ENDPOINT` & co from the
    /// environment).
    pub endpoint: Option<String>,
    /// S3 region (default: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// S3 addressing: `true` = path style (`endpoint/bucket/key`), `false` = virtual-hosted
    /// style (`bucket.endpoint/key`). Unset: object_store's default (path style), or
    /// `AWS_VIRTUAL_HOSTED_STYLE_REQUEST` from the environment.
    pub force_path_style: Option<bool>,
    /// Allow plain-HTTP endpoints (test servers on loopback). Default: HTTPS only.
    pub allow_http: bool,
    /// Azure: talk to the Azurite emulator (account `devstoreaccount1`, its public key, at
    /// `AZURITE_BLOB_STORAGE_URL` or `http://127.0.0.1:10000`). Default: false.
    pub azure_use_emulator: bool,
    /// Azure storage account name (default: `AZURE_STORAGE_ACCOUNT_NAME`). Not a secret.
    pub azure_account: Option<String>,
    /// Attempts per operation for temporary failures (HTTP 5xx, 429, timeouts), the first
    /// included; default 5. Permanent errors are never retried.
    pub retry_max_attempts: u32,
    /// Base of the exponential backoff between attempts, in milliseconds; default 200.
    pub retry_base_delay_ms: u64,
    /// Timeout of one HTTP request, in seconds; default 120 (an 8 MiB PUT or part on a slow link).
    pub request_timeout_secs: u64,
    /// Storage class of the objects whose keys start with one of `storage_class_prefixes`
    /// (S3 `x-amz-storage-class`, e.g. `STANDARD_IA`; Azure access tier; GCS storage class).
    /// Other objects get the bucket's default. `None`: every object the default.
    pub storage_class: Option<String>,
    /// Key prefixes that get `storage_class` (empty: every key).
    pub storage_class_prefixes: Vec<String>,
    /// S3 server-side encryption: `AES256` (SSE-S3), `aws:kms` (SSE-KMS) or `aws:kms:dsse`.
    pub sse: Option<String>,
    /// S3 SSE-KMS key id or ARN (with `sse` = `aws:kms` or `aws:kms:dsse`). Not a secret.
    pub sse_kms_key_id: Option<String>,
    /// S3 SSE-KMS: use an S3 Bucket Key (fewer KMS requests).
    pub sse_bucket_key: Option<bool>,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            endpoint: None,
            region: None,
            force_path_style: None,
            allow_http: false,
            azure_use_emulator: false,
            azure_account: None,
            retry_max_attempts: 5,
            retry_base_delay_ms: 200,
            request_timeout_secs: 120,
            storage_class: None,
            storage_class_prefixes: Vec::new(),
            sse: None,
            sse_kms_key_id: None,
            sse_bucket_key: None,
        }
    }
}

impl StorageOptions {
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.retry_max_attempts.max(1),
            base_delay: Duration::from_millis(self.retry_base_delay_ms),
            ..RetryPolicy::default()
        }
    }

    /// HTTP client settings as config keys, applied on top of what `from_env` read, so an
    /// environment setting (`AWS_ALLOW_HTTP=true`, …) is not reset by our defaults.
    fn client_config(&self) -> Vec<(ClientConfigKey, String)> {
        let mut v = vec![
            (
                ClientConfigKey::Timeout,
                format!("{}s", self.request_timeout_secs.max(1)),
            ),
            (ClientConfigKey::ConnectTimeout, "10s".to_owned()),
        ];
        if self.allow_http {
            v.push((ClientConfigKey::AllowHttp, "true".to_owned()));
        }
        v
    }

    /// object_store's own retries stay short (they cover single requests and multipart
    /// parts); [`Retry`] above handles whole operations.
    fn inner_retry(&self) -> RetryConfig {
        RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(60),
            ..RetryConfig::default()
        }
    }
}

const ACCEPTED: &str = "a directory path, file:///path, s3://bucket/prefix, \
                        az://container/prefix or gs://bucket/prefix";

fn config_err(message: String) -> StorageError {
    StorageError::new(ErrorKind::Config, None, message)
}

/// Opens the storage a repository URL names, wrapped in [`Retry`] (counting into
/// [`global_retry_counter`]) and in the crash-test hook [`crate::wrap_from_env`], which is
/// inert in release builds and unless its variable is set (see [`crate::crashpoint`]).
///
/// Accepted: a plain path (relative allowed) or `file:///path` → [`LocalStorage`];
/// `s3://bucket/prefix`, `az://container/prefix` (also `azure://`) and `gs://bucket/prefix` →
/// [`ObjectStoreStorage`] with credentials from the environment. A URL holding credentials
/// (`user:password@`, signature-like query parameters) is refused with
/// [`ErrorKind::Config`]; no message repeats the secret.
pub fn open_storage(url: &str, opts: &StorageOptions) -> Result<Arc<dyn Storage>> {
    let inner = open_storage_unwrapped(url, opts)?;
    let retry = Retry::new(inner, opts.retry_policy()).with_counter(global_retry_counter());
    Ok(crate::wrap_from_env(Arc::new(retry)))
}

/// Like [`open_storage`] but the bare backend: no retries, no test hook.
pub fn open_storage_unwrapped(url: &str, opts: &StorageOptions) -> Result<Arc<dyn Storage>> {
    let shown = redact_url(url);
    if url.trim().is_empty() {
        return Err(config_err(format!(
            "empty repository location. HINT: give {ACCEPTED}"
        )));
    }
    let Some(scheme) = scheme_of(url) else {
        return Ok(Arc::new(LocalStorage::new(url)?));
    };
    let parsed = ::url::Url::parse(url).map_err(|e| {
        config_err(format!(
            "cannot parse repository URL {shown}: {e}. HINT: give {ACCEPTED}"
        ))
    })?;
    refuse_credentials(&parsed, &shown)?;
    match scheme.as_str() {
        "file" => {
            if !matches!(parsed.host_str(), None | Some("") | Some("localhost")) {
                return Err(config_err(format!(
                    "repository URL {shown} names a remote host; file:// URLs must be local \
                     (file:///absolute/path). HINT: or give the plain path"
                )));
            }
            let path = parsed.to_file_path().map_err(|_| {
                config_err(format!("repository URL {shown} is not a valid file path"))
            })?;
            Ok(Arc::new(LocalStorage::new(path)?))
        }
        "s3" => {
            let (bucket, prefix) = bucket_and_prefix(&parsed, &shown, "bucket")?;
            let mut b = AmazonS3Builder::from_env()
                .with_http_connector(counting_connector())
                .with_bucket_name(&bucket)
                .with_retry(opts.inner_retry());
            for (k, v) in opts.client_config() {
                b = b.with_config(AmazonS3ConfigKey::Client(k), v);
            }
            if let Some(e) = &opts.endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &opts.region {
                b = b.with_region(r);
            }
            if let Some(p) = opts.force_path_style {
                b = b.with_virtual_hosted_style_request(!p);
            }
            // object_store's own configuration names (its encryption key enum is not public).
            let sse = [
                ("aws_server_side_encryption", opts.sse.clone()),
                ("aws_sse_kms_key_id", opts.sse_kms_key_id.clone()),
                (
                    "aws_sse_bucket_key_enabled",
                    opts.sse_bucket_key.map(|b| b.to_string()),
                ),
            ];
            for (name, value) in sse {
                if let Some(v) = value {
                    let key: AmazonS3ConfigKey = name.parse().expect("object_store knows the key");
                    b = b.with_config(key, v);
                }
            }
            let store = b
                .build()
                .map_err(|e| build_err(&shown, e, "AWS_ACCESS_KEY_ID"))?;
            Ok(object_backend(
                Arc::new(store),
                &prefix,
                format!("s3://{bucket}"),
                opts,
            ))
        }
        "az" | "azure" => {
            let (container, prefix) = bucket_and_prefix(&parsed, &shown, "container")?;
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_http_connector(counting_connector())
                .with_container_name(&container)
                .with_retry(opts.inner_retry());
            for (k, v) in opts.client_config() {
                b = b.with_config(AzureConfigKey::Client(k), v);
            }
            if opts.azure_use_emulator {
                b = b.with_use_emulator(true);
            }
            if let Some(a) = &opts.azure_account {
                b = b.with_account(a);
            }
            if let Some(e) = &opts.endpoint {
                b = b.with_endpoint(e.clone());
            }
            let store = b.build().map_err(|e| {
                build_err(
                    &shown,
                    e,
                    "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
                )
            })?;
            Ok(object_backend(
                Arc::new(store),
                &prefix,
                format!("az://{container}"),
                opts,
            ))
        }
        "gs" => {
            let (bucket, prefix) = bucket_and_prefix(&parsed, &shown, "bucket")?;
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_http_connector(counting_connector())
                .with_bucket_name(&bucket)
                .with_retry(opts.inner_retry());
            for (k, v) in opts.client_config() {
                b = b.with_config(GoogleConfigKey::Client(k), v);
            }
            if let Some(e) = &opts.endpoint {
                b = b.with_base_url(e);
            }
            let store = b
                .build()
                .map_err(|e| build_err(&shown, e, "GOOGLE_APPLICATION_CREDENTIALS"))?;
            Ok(object_backend(
                Arc::new(store),
                &prefix,
                format!("gs://{bucket}"),
                opts,
            ))
        }
        other => Err(config_err(format!(
            "unsupported repository URL scheme {other:?} in {shown}. HINT: give {ACCEPTED}"
        ))),
    }
}

fn object_backend(
    store: Arc<dyn ObjectStore>,
    prefix: &str,
    base: String,
    opts: &StorageOptions,
) -> Arc<dyn Storage> {
    let location = if prefix.is_empty() {
        base
    } else {
        format!("{base}/{prefix}")
    };
    let mut s = ObjectStoreStorage::new(store, prefix, location);
    if let Some(class) = &opts.storage_class {
        s = s.with_storage_class(class, &opts.storage_class_prefixes);
    }
    Arc::new(s)
}

fn build_err(shown: &str, e: object_store::Error, vars: &str) -> StorageError {
    config_err(format!(
        "cannot configure storage for {shown}: {}. HINT: check the storage options and the \
         environment ({vars})",
        redact_text(&e.to_string())
    ))
}

/// `Some(lowercase scheme)` when `s` starts like a URL (`scheme://`); plain paths — even
/// with a ':' inside — are `None`.
fn scheme_of(s: &str) -> Option<String> {
    let i = s.find("://")?;
    let scheme = &s[..i];
    let mut chars = scheme.chars();
    let first = chars.next()?;
    if first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        Some(scheme.to_ascii_lowercase())
    } else {
        None
    }
}

/// Query parameter names that carry secrets in the URL forms people paste: S3 presigned
/// URLs, Azure SAS tokens, GCS signed URLs, and generic names.
fn secret_like(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    const WORDS: [&str; 8] = [
        "secret",
        "password",
        "passwd",
        "token",
        "key",
        "sig",
        "credential",
        "auth",
    ];
    WORDS.iter().any(|w| n.contains(w))
        || matches!(n.as_str(), "sv" | "se" | "sp" | "st" | "srt" | "ss")
}

fn refuse_credentials(u: &::url::Url, shown: &str) -> Result<()> {
    let has_userinfo = !u.username().is_empty() || u.password().is_some();
    let secret_query = u.query_pairs().any(|(k, _)| secret_like(&k));
    if has_userinfo || secret_query {
        return Err(config_err(format!(
            "refusing repository URL {shown}: it contains credentials, which would show in \
             the process list, shell history and logs. HINT: remove them from the URL and set \
             them in the environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for \
             s3://, AZURE_STORAGE_ACCOUNT_NAME / AZURE_STORAGE_ACCOUNT_KEY or \
             AZURE_STORAGE_SAS_KEY for az://, GOOGLE_APPLICATION_CREDENTIALS for gs://)"
        )));
    }
    if u.query().is_some() {
        return Err(config_err(format!(
            "repository URL {shown} has query parameters, which pgkeep does not use. HINT: \
             put endpoint, region and similar settings in the config file's storage options"
        )));
    }
    Ok(())
}

fn bucket_and_prefix(u: &::url::Url, shown: &str, what: &str) -> Result<(String, String)> {
    let bucket = u.host_str().unwrap_or("").to_owned();
    if bucket.is_empty() {
        return Err(config_err(format!(
            "repository URL {shown} names no {what}. HINT: write {}://{what}/optional/prefix",
            u.scheme()
        )));
    }
    if u.port().is_some() {
        return Err(config_err(format!(
            "repository URL {shown}: a port belongs in the endpoint option, not in the {what} \
             name. HINT: set storage option endpoint"
        )));
    }
    let prefix = u.path().trim_matches('/').to_owned();
    if prefix.split('/').any(|s| s == "." || s == "..") || prefix.contains("//") {
        return Err(config_err(format!(
            "repository URL {shown} has an invalid prefix (empty, '.' or '..' segments)"
        )));
    }
    Ok((bucket, prefix))
}

/// Every object-storage backend counts its HTTP requests in the process-wide counter.
fn counting_connector() -> crate::requests::CountingConnector {
    crate::requests::CountingConnector::new(crate::requests::global_request_counter())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert_eq!(scheme_of("s3://b/p").as_deref(), Some("s3"));
        assert_eq!(scheme_of("S3://b").as_deref(), Some("s3"));
        assert_eq!(scheme_of("/tmp/a:b"), None);
        assert_eq!(scheme_of("relative/dir"), None);
        assert_eq!(scheme_of("./x://y"), None);
    }
}
