//! A throwaway Azure Blob server for tests: Azurite (`azurite-blob`) on loopback, in memory.
//!
//! Each [`AzuriteServer`] listens on its own free port, has a container created at start
//! and uses Azurite's well-known development account (public, documented by Microsoft). It
//! is stopped with SIGTERM on drop. If `azurite-blob` is missing the start fails with the
//! install command: tests never skip silently.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use hmac::{KeyInit, Mac};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::ObjectStore;
use pgkeep_storage::{ObjectStoreStorage, Storage};

use crate::s3::{free_port, unique_prefix};

/// Azurite's development account name.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's development account key: public, the same in every Azurite installation.
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The container created at start.
pub const CONTAINER: &str = "pgkeep-test";

fn azurite_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PGKEEP_AZURITE") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("azurite-blob"))
        .find(|p| p.is_file())
        .context(
            "Azurite `azurite-blob` not found on PATH. Install it with `npm install -g azurite` \
             (or point PGKEEP_AZURITE at it); the Azure tests need it",
        )
}

/// A running Azurite blob server.
#[derive(Debug)]
pub struct AzuriteServer {
    child: Child,
    dir: tempfile::TempDir,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Account endpoint, path style: `http://127.0.0.1:PORT/devstoreaccount1`.
    pub endpoint: String,
    /// Account name ([`ACCOUNT`]).
    pub account: String,
    /// Account key ([`ACCOUNT_KEY`]).
    pub account_key: String,
    /// The container created at start ([`CONTAINER`]).
    pub container: String,
}

impl AzuriteServer {
    /// Starts Azurite in memory on a free port, waits for it and creates [`CONTAINER`].
    pub async fn start() -> Result<AzuriteServer> {
        let bin = azurite_binary()?;
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(&bin) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }

    fn try_start(bin: &PathBuf) -> Result<AzuriteServer> {
        let dir = tempfile::Builder::new()
            .prefix("pgkeep-azurite-")
            .tempdir()?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("azurite.log"))?;
        let child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args([
                "--inMemoryPersistence",
                "--loose",
                "--skipApiVersionCheck",
                "--disableTelemetry",
                "--silent",
            ])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = AzuriteServer {
            child,
            dir,
            port,
            endpoint: format!("http://127.0.0.1:{port}/{ACCOUNT}"),
            account: ACCOUNT.to_owned(),
            account_key: ACCOUNT_KEY.to_owned(),
            container: CONTAINER.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "azurite-blob exited ({status}) during start-up:\n{}",
                    server.log_tail()
                );
            }
            match server.create_container(CONTAINER) {
                Ok(()) => return Ok(server),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "Azurite not ready after 30 s ({e:#}):\n{}",
                        server.log_tail()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The last lines of Azurite's output, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("azurite.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Creates a container with one SharedKey-signed `PUT ?restype=container` (object_store
    /// cannot create containers). An existing container is fine.
    pub fn create_container(&self, name: &str) -> Result<()> {
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let version = "2021-08-06";
        let path = format!("/{ACCOUNT}/{name}");
        // Blob service SharedKey string-to-sign: verb, eleven standard headers (all empty
        // here; Content-Length is empty when 0), canonical x-ms-* headers, then the
        // canonical resource "/account" + path, with query parameters one per line.
        let string_to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}{path}\nrestype:container"
        );
        let key = base64::engine::general_purpose::STANDARD.decode(ACCOUNT_KEY)?;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key)
            .map_err(|e| anyhow::anyhow!("bad key: {e}"))?;
        mac.update(string_to_sign.as_bytes());
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let request = format!(
            "PUT {path}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-date: {date}\r\n\
             x-ms-version: {version}\r\nAuthorization: SharedKey {ACCOUNT}:{sig}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        let mut conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        let status = response.split_whitespace().nth(1).unwrap_or("");
        match status {
            "201" | "409" => Ok(()),
            _ => bail!(
                "creating container {name}: {}",
                response.lines().next().unwrap_or("no answer")
            ),
        }
    }

    /// A raw object_store client for `container` with the development account.
    pub fn object_store(&self, container: &str) -> Arc<dyn ObjectStore> {
        // Not `with_use_emulator`: that reads the port from the process-wide
        // AZURITE_BLOB_STORAGE_URL, which cannot differ between servers in one process.
        let store = MicrosoftAzureBuilder::new()
            .with_account(&self.account)
            .with_access_key(&self.account_key)
            .with_endpoint(self.endpoint.clone())
            .with_allow_http(true)
            .with_container_name(container)
            .build()
            .expect("valid Azure configuration");
        Arc::new(store)
    }

    /// An [`ObjectStoreStorage`] on [`CONTAINER`] below a fresh unique prefix.
    pub fn storage(&self) -> Arc<dyn Storage> {
        self.storage_with_prefix(&unique_prefix("t"))
    }

    /// An [`ObjectStoreStorage`] on [`CONTAINER`] below `prefix`.
    pub fn storage_with_prefix(&self, prefix: &str) -> Arc<dyn Storage> {
        Arc::new(ObjectStoreStorage::new(
            self.object_store(&self.container),
            prefix,
            format!("az://{}/{prefix}", self.container),
        ))
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child, which we have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        // Azurite waits for idle keep-alive connections (up to 5 s) before exiting; it keeps
        // everything in memory, so after a short grace period SIGKILL loses nothing.
        let deadline = Instant::now() + Duration::from_millis(500);
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
