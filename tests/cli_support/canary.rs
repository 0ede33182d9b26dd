//! Canary secrets and the places they must never show up (issue 18 item 7, RELIABILITY.md
//! row 25): a process-list sampler, byte search, and the plaintext inside zstd frames.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A named canary: a distinctive value planted as a secret.
#[derive(Debug, Clone)]
pub struct Canary {
    pub name: String,
    pub value: String,
    /// A fixed value other tests on this machine use too (the test servers' credentials):
    /// in the process list, only a process descending from this test counts.
    pub shared: bool,
}

impl Canary {
    /// A fixed value (see [`Canary::shared`]).
    pub fn shared(name: &str, value: &str) -> Self {
        Canary {
            name: name.to_string(),
            value: value.to_string(),
            shared: true,
        }
    }
}

/// A distinctive value for `name`: unique to this run (pid, time), so it can only come
/// from where this test put it.
pub fn fresh(name: &str) -> Canary {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    Canary {
        name: name.to_string(),
        value: format!("{name}CANARY{}x{nanos:08x}x{n}", std::process::id()),
        shared: false,
    }
}

/// True when `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() || hay.len() < needle.len() {
        return needle.is_empty();
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return false,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return true;
                }
                i += 1;
            }
        }
    }
    false
}

/// The names of the canaries found in `hay`.
pub fn hits(canaries: &[Canary], hay: &[u8]) -> Vec<String> {
    canaries
        .iter()
        .filter(|c| contains(hay, c.value.as_bytes()))
        .map(|c| c.name.clone())
        .collect()
}

/// The decompressed contents of every zstd frame found anywhere in `bytes` (pack blobs,
/// sealed metadata of a plain repository: zstd, then a hash). A frame that does not decode
/// to its end still yields what it gave.
pub fn zstd_plaintexts(bytes: &[u8]) -> Vec<Vec<u8>> {
    use std::io::Read;
    const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    let mut out = Vec::new();
    let mut i = 0;
    while i + 4 <= bytes.len() {
        if bytes[i..i + 4] == MAGIC {
            if let Ok(d) = zstd::stream::read::Decoder::new(&bytes[i..]) {
                let mut plain = Vec::new();
                let _ = d.single_frame().take(256 << 20).read_to_end(&mut plain);
                if !plain.is_empty() {
                    out.push(plain);
                }
            }
        }
        i += 1;
    }
    out
}

/// Every regular file under `root` (symlinks not followed), except below `skip`.
pub fn files_under(root: &Path, skip: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if skip.iter().any(|s| d.starts_with(s)) {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && !skip.iter().any(|s| e.path().starts_with(s)) {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// The programs whose sightings the sampler reports (when they descend from this test).
pub const WATCHED: [&str; 6] = [
    "pgkeep",
    "pg_dump",
    "pg_dumpall",
    "pg_restore",
    "psql",
    "postgres",
];

/// Samples `/proc/*/cmdline` of every process from a background thread, every couple of
/// milliseconds, and records each command line holding a canary.
pub struct CmdlineSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    found: Arc<Mutex<BTreeSet<String>>>,
    seen: Arc<Mutex<BTreeMap<String, u64>>>,
    samples: Arc<AtomicU64>,
}

/// What the sampler saw.
pub struct Sampled {
    /// `canary names: pid: command line` of every hit.
    pub hits: Vec<String>,
    /// Programs of [`WATCHED`] (argv[0] basename, up to the first space or colon) run by
    /// this test's own process tree, and the markers, with how many passes saw each.
    pub seen: BTreeMap<String, u64>,
    /// Passes over /proc.
    pub samples: u64,
}

impl CmdlineSampler {
    /// Starts sampling for `canaries`. `markers`: substrings counted in the command lines of
    /// this test's own processes (reported in [`Sampled::seen`] as `marker:<m>`).
    pub fn start(canaries: Vec<Canary>, markers: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let found = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let samples = Arc::new(AtomicU64::new(0));
        let (st, fo, se, sa) = (stop.clone(), found.clone(), seen.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = Vec::with_capacity(4096);
            // pid -> descends from this test (pids are not reused within a test's minutes).
            let mut cache: std::collections::HashMap<String, bool> = Default::default();
            while !st.load(Ordering::Relaxed) {
                let mut names = BTreeSet::new();
                if let Ok(rd) = std::fs::read_dir("/proc") {
                    for e in rd.flatten() {
                        let pid = e.file_name();
                        let pid = pid.to_string_lossy();
                        if !pid.bytes().all(|b| b.is_ascii_digit()) {
                            continue;
                        }
                        buf.clear();
                        let Ok(mut f) = std::fs::File::open(e.path().join("cmdline")) else {
                            continue;
                        };
                        use std::io::Read;
                        if f.read_to_end(&mut buf).is_err() || buf.is_empty() {
                            continue;
                        }
                        let mut h = hits(&canaries, &buf);
                        let line = String::from_utf8_lossy(&buf).replace('\0', " ");
                        let argv0 = line.split([' ', ':']).next().unwrap_or("");
                        let base = argv0.rsplit('/').next().unwrap_or(argv0);
                        let watched = WATCHED.contains(&base);
                        let mut ours = |pid: &str| {
                            *cache
                                .entry(pid.to_string())
                                .or_insert_with(|| descends_from_us(pid))
                        };
                        if !h.is_empty() {
                            let ours = ours(&pid);
                            h.retain(|n| {
                                ours || canaries.iter().any(|c| &c.name == n && !c.shared)
                            });
                        }
                        if !h.is_empty() {
                            fo.lock()
                                .unwrap()
                                .insert(format!("{}: pid {pid}: {line}", h.join(",")));
                        }
                        if watched && ours(&pid) {
                            names.insert(base.to_string());
                            for m in &markers {
                                if line.contains(m.as_str()) {
                                    names.insert(format!("marker:{m}"));
                                }
                            }
                        }
                    }
                }
                {
                    let mut s = se.lock().unwrap();
                    for n in names {
                        *s.entry(n).or_insert(0) += 1;
                    }
                }
                sa.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        CmdlineSampler {
            stop,
            thread: Some(thread),
            found,
            seen,
            samples,
        }
    }

    /// Stops the thread and returns what it saw.
    pub fn finish(mut self) -> Sampled {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        Sampled {
            hits: self.found.lock().unwrap().iter().cloned().collect(),
            seen: self.seen.lock().unwrap().clone(),
            samples: self.samples.load(Ordering::Relaxed),
        }
    }
}

/// Whether process `pid` is this process or one of its descendants (its parent chain in
/// /proc reaches our pid). A process already gone counts as not ours.
fn descends_from_us(pid: &str) -> bool {
    let me = std::process::id();
    let mut cur: u32 = match pid.parse() {
        Ok(p) => p,
        Err(_) => return false,
    };
    for _ in 0..64 {
        if cur == me {
            return true;
        }
        if cur <= 1 {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{cur}/stat")) else {
            return false;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        match after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            Some(p) => cur = p,
            None => return false,
        }
    }
    false
}

impl Drop for CmdlineSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Standard base64 (for an HTTP basic-auth header built in-process, never on a command line).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn helpers_find_what_they_should() {
    assert!(contains(b"xxabcxx", b"abc"));
    assert!(!contains(b"xxabxcx", b"abc"));
    assert!(contains(b"abc", b"abc"));
    assert!(!contains(b"ab", b"abc"));
    let z = zstd::bulk::compress(b"hello secret world", 3).unwrap();
    let mut blob = b"header".to_vec();
    blob.extend_from_slice(&z);
    blob.extend_from_slice(&[7u8; 32]);
    let p = zstd_plaintexts(&blob);
    assert!(p.iter().any(|x| contains(x, b"secret")));
    assert_eq!(base64(b"ops:pw"), "b3BzOnB3");
    assert_eq!(base64(b"a"), "YQ==");
    assert_eq!(base64(b"ab"), "YWI=");
    let child = std::process::Command::new("sleep")
        .arg("5")
        .spawn()
        .unwrap();
    assert!(descends_from_us(&child.id().to_string()));
    assert!(!descends_from_us("1"));
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
}
