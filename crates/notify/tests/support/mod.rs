//! Real receivers for the notification tests: an HTTP listener that records every request
//! (webhook, Slack, PagerDuty) and aiosmtpd for e-mail. Shared with the binary's tests
//! (tests/notify_cli.rs includes this file by path).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One recorded HTTP request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lowercase.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A minimal HTTP/1.1 server on loopback, one thread per connection; answers 200 to
/// everything and records the requests. Stops listening when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    /// Listens on a free port.
    pub fn start() -> Self {
        Self::start_on(0)
    }

    /// Listens on `port` (0: any).
    pub fn start_on(port: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    let r = r.clone();
                    std::thread::spawn(move || serve(c, r));
                }
            }
        });
        Receiver {
            addr,
            requests,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests to `path`.
    pub fn at(&self, path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and closes the listener.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: TcpStream, requests: Arc<Mutex<Vec<Request>>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        requests.lock().unwrap().push(Request {
            method,
            path,
            headers,
            body,
        });
        let mut w = &conn;
        let _ = w.write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}");
    }
}

/// A loopback port that nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fails the test, naming the install script, when aiosmtpd is missing: never a silent skip.
pub fn require_aiosmtpd() {
    let ok = Command::new("python3")
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "the e-mail tests need the Python package aiosmtpd: run scripts/install-deps.sh (or `python3 -m pip install aiosmtpd`)");
}

/// An SMTP server (aiosmtpd) writing every mail into a Maildir. Killed when dropped.
pub struct SmtpSink {
    pub port: u16,
    pub maildir: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl SmtpSink {
    /// Plain SMTP, no authentication: `python3 -m aiosmtpd -n -l 127.0.0.1:PORT -c
    /// aiosmtpd.handlers.Mailbox DIR`.
    pub fn plain() -> Self {
        require_aiosmtpd();
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("mail");
        for d in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self::ready(SmtpSink {
            port,
            maildir,
            child,
            _dir: dir,
        })
    }

    /// SMTPS (TLS from the first byte), no authentication: aiosmtpd's `--smtpscert`.
    pub fn smtps(cert: &Path, key: &Path) -> Self {
        require_aiosmtpd();
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("mail");
        for d in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg("--smtpscert")
            .arg(cert)
            .arg("--smtpskey")
            .arg(key)
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self::ready(SmtpSink {
            port,
            maildir,
            child,
            _dir: dir,
        })
    }

    /// STARTTLS required, then AUTH (PLAIN/LOGIN) with `user`/`password` required, with the
    /// certificate and key files given (PEM).
    pub fn starttls_auth(cert: &Path, key: &Path, user: &str, password: &str) -> Self {
        require_aiosmtpd();
        let dir = tempfile::tempdir().unwrap();
        let maildir = dir.path().join("mail");
        for d in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.join(d)).unwrap();
        }
        let port = free_port();
        let child = Command::new("python3")
            .arg("-c")
            .arg(SMTP_TLS_AUTH)
            .arg(port.to_string())
            .arg(&maildir)
            .arg(cert)
            .arg(key)
            .arg(user)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // The password goes through the environment, not the process list.
            .env("SMTP_TEST_PASSWORD", password)
            .spawn()
            .unwrap();
        Self::ready(SmtpSink {
            port,
            maildir,
            child,
            _dir: dir,
        })
    }

    fn ready(mut s: Self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", s.port)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!(
                    "aiosmtpd exited at start ({st}); is it installed? run scripts/install-deps.sh"
                );
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not listen on port {} within 15 s",
                s.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    /// The mails received so far, as text.
    pub fn mails(&self) -> Vec<String> {
        let mut out: Vec<(std::time::SystemTime, String)> =
            std::fs::read_dir(self.maildir.join("new"))
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| {
                    (
                        e.metadata().unwrap().modified().unwrap(),
                        std::fs::read_to_string(e.path()).unwrap(),
                    )
                })
                .collect();
        out.sort();
        out.into_iter().map(|(_, t)| t).collect()
    }

    /// Waits up to 10 s for `n` mails.
    pub fn wait_for(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.mails();
            if m.len() >= n || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SMTP_TLS_AUTH: &str = r#"
import os, ssl, sys
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword
port, mdir, cert, key, user = sys.argv[1:6]
password = os.environ["SMTP_TEST_PASSWORD"]
def auth(server, session, envelope, mechanism, data):
    ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
    # handled=False: aiosmtpd answers 535 itself (without it, a refusal left the client waiting).
    return AuthResult(success=ok, handled=False)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
c = Controller(Mailbox(mdir), hostname="127.0.0.1", port=int(port), authenticator=auth,
               tls_context=ctx, require_starttls=True, auth_require_tls=True, auth_required=True)
c.start()
sys.stdin.read()
"#;

/// A CA and a server certificate for 127.0.0.1, written as `ca.pem`, `server.pem` and
/// `server.key` into `dir`.
pub fn make_certs(dir: &Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "pgkeep notify test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    std::fs::write(
        dir.join("server.pem"),
        p.signed_by(&key, &issuer).unwrap().pem(),
    )
    .unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
}
