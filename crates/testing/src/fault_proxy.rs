//! A fault-injecting HTTP/1.1 proxy for S3 tests: it sits on loopback between pgkeep (or any
//! S3 client) and the SeaweedFS server of [`crate::s3`], forwards requests byte for byte, and
//! breaks the ones a script selects.
//!
//! A script is a list of [`Rule`]s: which requests ([`Match`]: the S3 operation [`Kind`], the
//! method, substrings of the request target such as `/wal/`, `uploadId=` or `partNumber=`),
//! which occurrences of them (the Nth matching request, the first N, every one), and what
//! goes wrong ([`Fault`]): an HTTP 500 or a 503 SlowDown with the S3 XML error body, a
//! connection reset in the middle of the request or of the response body, a truncated
//! response (the full `Content-Length` announced, half the body sent, then a clean close), a
//! 200 answer with an `<Error>` body (what S3 does when CompleteMultipartUpload fails late),
//! and stalls (the request read, no answer, the connection held; before or after the server
//! acted on it).
//!
//! A faulted request that has no response from the server (status codes, 200-with-error,
//! stalls, request resets) is never forwarded whole: the server does not act on it, like a
//! load balancer that failed before the storage node saw the request. Response faults
//! (truncation, response resets, a stall after forwarding) are forwarded first: the server
//! did act.
//!
//! Every request is recorded with its kind and the fault it got, so a test can report how many
//! requests of each kind it took and how many were retries of failed ones.
//!
//! Plain std threads and `TcpStream`s: one thread per client connection, one upstream
//! connection per request. Only what S3 clients send is parsed: the request line, headers,
//! `Content-Length` and chunked bodies.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The S3 operation a request performs, from its method, target and headers (path-style
/// addressing: `/bucket/key?query`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `GET /bucket?list-type=2…`.
    List,
    /// `GET /bucket/key` (whole object or a `Range`).
    Get,
    /// `HEAD /bucket/key`.
    Head,
    /// `PUT /bucket/key` (single-request upload).
    Put,
    /// `POST /bucket/key?uploads`.
    CreateMultipart,
    /// `PUT /bucket/key?partNumber=N&uploadId=…`.
    UploadPart,
    /// `POST /bucket/key?uploadId=…`.
    CompleteMultipart,
    /// `DELETE /bucket/key?uploadId=…`.
    AbortMultipart,
    /// `DELETE /bucket/key`.
    Delete,
    /// `POST /bucket?delete`.
    DeleteObjects,
    /// Anything else (copies, ListParts, …).
    Other,
}

/// Which requests a [`Rule`] applies to. Every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    kind: Option<Kind>,
    method: Option<String>,
    contains: Vec<String>,
}

impl Match {
    /// Every request.
    pub fn any() -> Self {
        Match::default()
    }

    /// Requests of one S3 operation.
    pub fn kind(kind: Kind) -> Self {
        Match {
            kind: Some(kind),
            ..Match::default()
        }
    }

    /// Requests with this HTTP method (`GET`, `PUT`, `POST`, …).
    pub fn method(method: &str) -> Self {
        Match {
            method: Some(method.to_ascii_uppercase()),
            ..Match::default()
        }
    }

    /// Also requires the request target (path and query, as sent) to contain `needle`, e.g.
    /// `/wal/`, `/packs/`, `uploadId=`, `partNumber=2`.
    pub fn target_contains(mut self, needle: &str) -> Self {
        self.contains.push(needle.to_owned());
        self
    }

    /// Also requires this HTTP method.
    pub fn with_method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    fn matches(&self, req: &RequestHead, kind: Kind) -> bool {
        self.kind.is_none_or(|k| k == kind)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m == req.method.as_str())
            && self.contains.iter().all(|n| req.target.contains(n))
    }
}

/// What goes wrong with a selected request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and an S3 XML error body with this `<Code>`, without
    /// forwarding the request.
    Status {
        /// HTTP status.
        status: u16,
        /// The S3 error code in the body (`InternalError`, `SlowDown`, …).
        code: String,
    },
    /// Read the head and half the request body, then reset the connection (RST): the body
    /// is cut in the middle. The server gets the same half and a reset.
    ResetRequestBody,
    /// Forward the request, send the client the response head and half its body, then reset.
    ResetResponseBody,
    /// Forward the request, send the client the response head (with its full
    /// `Content-Length`) and half the body, then close the connection cleanly.
    Truncate,
    /// Answer `200 OK` with an S3 `<Error>` body with this `<Code>`, without forwarding the
    /// request (S3's late CompleteMultipartUpload failure).
    ErrorBody200 {
        /// The S3 error code in the body.
        code: String,
    },
    /// Read the request and answer nothing for this long (or until the client gives up),
    /// then close the connection. The server never sees the request.
    Stall(Duration),
    /// Forward the request (the server acts on it) but hold its answer back for this long
    /// (or until the client gives up), then close: the acknowledgement is lost.
    StallAfterForward(Duration),
}

impl Fault {
    /// `500 InternalError`.
    pub fn internal_error() -> Self {
        Fault::Status {
            status: 500,
            code: "InternalError".into(),
        }
    }

    /// `503 SlowDown`.
    pub fn slow_down() -> Self {
        Fault::Status {
            status: 503,
            code: "SlowDown".into(),
        }
    }

    /// `200 OK` with `<Error><Code>code</Code>…`.
    pub fn error_body_200(code: &str) -> Self {
        Fault::ErrorBody200 { code: code.into() }
    }

    fn label(&self) -> String {
        match self {
            Fault::Status { status, code } => format!("{status} {code}"),
            Fault::ResetRequestBody => "reset mid-request".into(),
            Fault::ResetResponseBody => "reset mid-response".into(),
            Fault::Truncate => "truncated response".into(),
            Fault::ErrorBody200 { code } => format!("200 with <Error> {code}"),
            Fault::Stall(d) => format!("stall {d:?}"),
            Fault::StallAfterForward(d) => format!("stall {d:?} after forwarding"),
        }
    }
}

/// One line of the script: a fault for some occurrences of the requests a [`Match`] selects.
#[derive(Debug, Clone)]
pub struct Rule {
    matcher: Match,
    fault: Fault,
    /// Matching requests let through before the first fault.
    skip: usize,
    /// Faults to inject (then the rule is spent).
    times: usize,
}

impl Rule {
    /// `fault` for the first matching request only; see [`Rule::nth`], [`Rule::times`],
    /// [`Rule::always`].
    pub fn new(matcher: Match, fault: Fault) -> Self {
        Rule {
            matcher,
            fault,
            skip: 0,
            times: 1,
        }
    }

    /// Only the `n`th matching request (1-based) gets the fault, counted from when the
    /// rule was added.
    pub fn nth(mut self, n: usize) -> Self {
        assert!(n >= 1, "requests are counted from 1");
        self.skip = n - 1;
        self
    }

    /// `n` consecutive matching requests get the fault (from the `nth`, default the first).
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }

    /// Every matching request (from the `nth`) gets the fault.
    pub fn always(mut self) -> Self {
        self.times = usize::MAX;
        self
    }
}

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// The S3 operation.
    pub kind: Kind,
    /// HTTP method.
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// The `Range` header, if any (ranged GETs).
    pub range: Option<String>,
    /// Request body bytes announced (`Content-Length`, or the chunked total).
    pub body_len: usize,
    /// The fault injected, if any ([`Fault`] in words).
    pub fault: Option<String>,
    /// The status the server answered (forwarded requests whose response head arrived).
    pub status: Option<u16>,
}

impl Record {
    /// What identifies the same request sent again: kind, method, path and part number (a
    /// retried multipart upload gets a new upload id, and a resumed read another range, so
    /// both are left out).
    fn identity(&self) -> (Kind, String, String, Option<String>) {
        let (path, query) = self.target.split_once('?').unwrap_or((&self.target, ""));
        let part = query
            .split('&')
            .find(|p| p.starts_with("partNumber="))
            .map(str::to_owned);
        (self.kind, self.method.clone(), path.to_owned(), part)
    }

    /// Whether this request failed: a fault, or a 5xx from the server.
    fn failed(&self) -> bool {
        self.fault.is_some() || self.status.is_some_and(|s| s >= 500)
    }
}

/// Requests and injected faults of one [`Kind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindCount {
    /// Requests received.
    pub requests: usize,
    /// Of them, requests that got a fault.
    pub faulted: usize,
}

struct ScriptLine {
    rule: Rule,
    seen: usize,
    fired: usize,
}

#[derive(Default)]
struct State {
    script: Vec<ScriptLine>,
    records: Vec<Record>,
}

struct Shared {
    upstream: String,
    stop: AtomicBool,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Identifies a rule added with [`FaultProxy::add`], to ask how often it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleId(usize);

/// The proxy. Listens on `127.0.0.1` on a free port until dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .finish()
    }
}

/// How long the proxy waits on the server before it gives up on a forwarded request.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`, e.g. [`crate::s3::S3Server`]'s
    /// `endpoint`) with an empty script: every request is forwarded untouched.
    pub fn start(upstream: &str) -> Result<FaultProxy> {
        let Some(hostport) = upstream.strip_prefix("http://") else {
            bail!("the fault proxy forwards plain http:// only, not {upstream}");
        };
        let hostport = hostport.trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: hostport,
            stop: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("fault-proxy-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if s.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let s = s.clone();
                    let _ = std::thread::Builder::new()
                        .name("fault-proxy-conn".into())
                        .spawn(move || {
                            let _ = serve(&s, conn);
                        });
                }
            })?;
        Ok(FaultProxy {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// `http://127.0.0.1:PORT`: the endpoint a client should use instead of the server's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Appends a rule to the script. Rules are consulted in order; every rule whose
    /// [`Match`] selects a request counts it, and the first one whose turn it is faults it.
    pub fn add(&self, rule: Rule) -> RuleId {
        let mut st = self.shared.lock();
        st.script.push(ScriptLine {
            rule,
            seen: 0,
            fired: 0,
        });
        RuleId(st.script.len() - 1)
    }

    /// Empties the script: from now on every request is forwarded untouched. Records stay.
    pub fn clear(&self) {
        self.shared.lock().script.clear();
    }

    /// How many faults rule `id` injected (0 once the script was cleared).
    pub fn fired(&self, id: RuleId) -> usize {
        self.shared
            .lock()
            .script
            .get(id.0)
            .map(|l| l.fired)
            .unwrap_or(0)
    }

    /// Every request since the start or the last [`FaultProxy::reset_records`].
    pub fn records(&self) -> Vec<Record> {
        self.shared.lock().records.clone()
    }

    /// Forgets the recorded requests (the script is kept).
    pub fn reset_records(&self) {
        self.shared.lock().records.clear();
    }

    /// Requests and faults per kind, from the records.
    pub fn counts(&self) -> BTreeMap<Kind, KindCount> {
        let mut out: BTreeMap<Kind, KindCount> = BTreeMap::new();
        for r in self.shared.lock().records.iter() {
            let c = out.entry(r.kind).or_default();
            c.requests += 1;
            c.faulted += usize::from(r.fault.is_some());
        }
        out
    }

    /// Requests that repeat an earlier one that failed (same kind, method, path and part
    /// number), each failure answered by at most one: the retries the store saw, whoever
    /// made them (object_store's own retries or pgkeep's). Repeats of requests that succeeded
    /// (the same range read for two files) are not counted.
    pub fn retries(&self) -> usize {
        let st = self.shared.lock();
        let mut pending: BTreeMap<_, usize> = BTreeMap::new();
        let mut n = 0;
        for r in st.records.iter() {
            let id = r.identity();
            if let Some(p) = pending.get_mut(&id).filter(|p| **p > 0) {
                *p -= 1;
                n += 1;
            }
            if r.failed() {
                *pending.entry(id).or_default() += 1;
            }
        }
        n
    }

    /// One line for a test's output: requests per kind, faults, retries.
    pub fn summary(&self) -> String {
        let counts = self.counts();
        let total: usize = counts.values().map(|c| c.requests).sum();
        let faulted: usize = counts.values().map(|c| c.faulted).sum();
        let kinds: Vec<String> = counts
            .iter()
            .map(|(k, c)| {
                if c.faulted > 0 {
                    format!("{k:?} {} ({} faulted)", c.requests, c.faulted)
                } else {
                    format!("{k:?} {}", c.requests)
                }
            })
            .collect();
        format!(
            "{total} requests, {faulted} faulted, {} retried: {}",
            self.retries(),
            kinds.join(", ")
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// The head of one HTTP request.
struct RequestHead {
    raw: Vec<u8>,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl RequestHead {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    header(headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(headers: &[(String, String)]) -> Option<usize> {
    header(headers, "content-length").and_then(|v| v.trim().parse().ok())
}

/// Splits a head (without the final blank line handling) into its first line and headers.
fn parse_head(raw: &[u8]) -> io::Result<(String, Vec<(String, String)>)> {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    for l in lines {
        if l.is_empty() {
            continue;
        }
        let Some((k, v)) = l.split_once(':') else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad header line {l:?}"),
            ));
        };
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok((first, headers))
}

fn classify(req: &RequestHead) -> Kind {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let params: HashSet<&str> = query
        .split('&')
        .map(|p| p.split_once('=').map(|(k, _)| k).unwrap_or(p))
        .collect();
    // Path style: `/bucket` or `/bucket/key…`.
    let has_key = path.trim_start_matches('/').contains('/');
    match req.method.as_str() {
        "GET" if params.contains("list-type") || !has_key => Kind::List,
        "GET" if params.contains("uploadId") => Kind::Other,
        "GET" => Kind::Get,
        "HEAD" => Kind::Head,
        "PUT" if params.contains("partNumber") && params.contains("uploadId") => Kind::UploadPart,
        "PUT" if req.header("x-amz-copy-source").is_some() => Kind::Other,
        "PUT" => Kind::Put,
        "POST" if params.contains("uploads") => Kind::CreateMultipart,
        "POST" if params.contains("uploadId") => Kind::CompleteMultipart,
        "POST" if params.contains("delete") => Kind::DeleteObjects,
        "DELETE" if params.contains("uploadId") => Kind::AbortMultipart,
        "DELETE" => Kind::Delete,
        _ => Kind::Other,
    }
}

/// A buffered reader over a socket that can hand back raw bytes of heads and bodies.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(s: TcpStream) -> Self {
        Conn { s, buf: Vec::new() }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 64 * 1024];
        let n = self.s.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// The next head, up to and including the blank line; `None` if the peer closed
    /// before sending a byte of it.
    fn read_head(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                return Ok(Some(head));
            }
            if self.buf.len() > 1 << 20 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
            }
            if self.fill()? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    fn read_n(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                return Ok(self.buf.drain(..i + 2).collect());
            }
            if self.fill()? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// A chunked body as raw bytes (sizes, data, trailers), and its decoded length.
    fn read_chunked(&mut self) -> io::Result<(Vec<u8>, usize)> {
        let mut raw = Vec::new();
        let mut total = 0;
        loop {
            let line = self.read_line()?;
            let text = String::from_utf8_lossy(&line);
            let size_hex = text.trim().split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size {text:?}"),
                )
            })?;
            raw.extend_from_slice(&line);
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let t = self.read_line()?;
                    raw.extend_from_slice(&t);
                    if t == b"\r\n" {
                        return Ok((raw, total));
                    }
                }
            }
            raw.extend_from_slice(&self.read_n(size + 2)?);
            total += size;
        }
    }

    fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Closes `s` with a TCP reset instead of a FIN (SO_LINGER with a zero timeout).
fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a properly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

fn s3_error_xml(code: &str, resource: &str) -> String {
    let message = match code {
        "SlowDown" => "Please reduce your request rate.",
        "InternalError" => "We encountered an internal error. Please try again.",
        _ => "Injected by the pgkeep test fault proxy.",
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><Resource>{resource}</Resource>\
         <RequestId>fault-proxy</RequestId></Error>"
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Injected",
    }
}

/// Serves one client connection: request after request until the client closes or a fault
/// ends the connection.
fn serve(shared: &Shared, client: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    // Idle keep-alive connections of a finished client are not kept forever.
    client.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut client = Conn::new(client);
    loop {
        let Some(raw) = client.read_head()? else {
            return Ok(());
        };
        let (first, headers) = parse_head(&raw)?;
        let mut parts = first.split(' ');
        let method = parts.next().unwrap_or_default().to_ascii_uppercase();
        let target = parts.next().unwrap_or_default().to_owned();
        let req = RequestHead {
            raw,
            method,
            target,
            headers,
        };
        let kind = classify(&req);
        let chunked = is_chunked(&req.headers);
        let declared = if chunked {
            None
        } else {
            Some(content_length(&req.headers).unwrap_or(0))
        };

        // Decide and record under one lock, so concurrent requests count in a fixed order.
        let (fault, index) = {
            let mut st = shared.lock();
            let mut chosen = None;
            for line in st.script.iter_mut() {
                if !line.rule.matcher.matches(&req, kind) {
                    continue;
                }
                let n = line.seen;
                line.seen += 1;
                if chosen.is_none() && n >= line.rule.skip && n - line.rule.skip < line.rule.times {
                    line.fired += 1;
                    chosen = Some(line.rule.fault.clone());
                }
            }
            st.records.push(Record {
                kind,
                method: req.method.clone(),
                target: req.target.clone(),
                range: req.header("range").map(str::to_owned),
                body_len: declared.unwrap_or(0),
                fault: chosen.as_ref().map(Fault::label),
                status: None,
            });
            (chosen, st.records.len() - 1)
        };

        if fault == Some(Fault::ResetRequestBody) {
            // Half the body to the client's side and to the server, then a reset on both.
            let half = match declared {
                Some(n) => client.read_n(n / 2)?,
                None => {
                    let (raw, _) = client.read_chunked()?;
                    raw[..raw.len() / 2].to_vec()
                }
            };
            if let Ok(mut up) = TcpStream::connect(&shared.upstream) {
                let _ = up.write_all(&req.raw);
                let _ = up.write_all(&half);
                reset(up);
            }
            reset(client.s);
            return Ok(());
        }

        let body = match declared {
            Some(n) => client.read_n(n)?,
            None => {
                let (raw, total) = client.read_chunked()?;
                shared.lock().records[index].body_len = total;
                raw
            }
        };
        let head_request = req.method == "HEAD";

        match fault {
            Some(Fault::Status { status, code }) => {
                let xml = s3_error_xml(&code, req.target.split('?').next().unwrap_or(""));
                respond(&mut client.s, status, &xml, head_request)?;
                continue;
            }
            Some(Fault::ErrorBody200 { code }) => {
                let xml = s3_error_xml(&code, req.target.split('?').next().unwrap_or(""));
                respond(&mut client.s, 200, &xml, head_request)?;
                continue;
            }
            Some(Fault::Stall(d)) => {
                stall(shared, &mut client.s, d);
                let _ = client.s.shutdown(Shutdown::Both);
                return Ok(());
            }
            _ => {}
        }

        // Forward, then answer (perhaps broken).
        let (resp_head, resp_body, close_after) = match forward(shared, &req, &body, head_request) {
            Ok(r) => r,
            Err(_) => {
                // The server is gone or broke the connection: so does the proxy.
                reset(client.s);
                return Ok(());
            }
        };
        if let Ok((first, _)) = parse_head(&resp_head) {
            let status = first.split(' ').nth(1).and_then(|s| s.parse().ok());
            shared.lock().records[index].status = status;
        }
        match fault {
            Some(Fault::StallAfterForward(d)) => {
                stall(shared, &mut client.s, d);
                let _ = client.s.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::ResetResponseBody) | Some(Fault::Truncate) => {
                client.s.write_all(&resp_head)?;
                client.s.write_all(&resp_body[..resp_body.len() / 2])?;
                client.s.flush()?;
                if fault == Some(Fault::Truncate) {
                    // A clean close: the client sees fewer bytes than announced.
                    let _ = client.s.shutdown(Shutdown::Both);
                } else {
                    reset(client.s);
                }
                return Ok(());
            }
            _ => {
                client.s.write_all(&resp_head)?;
                client.s.write_all(&resp_body)?;
                client.s.flush()?;
                if close_after {
                    let _ = client.s.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
        }
    }
}

fn respond(s: &mut TcpStream, status: u16, body: &str, head_request: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         x-amz-request-id: fault-proxy\r\nServer: pgkeep-fault-proxy\r\n\r\n",
        reason(status),
        body.len()
    );
    s.write_all(head.as_bytes())?;
    if !head_request {
        s.write_all(body.as_bytes())?;
    }
    s.flush()
}

/// Holds the connection without answering for `d`, or until the client hangs up or the
/// proxy stops.
fn stall(shared: &Shared, s: &mut TcpStream, d: Duration) {
    let end = Instant::now() + d;
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut byte = [0u8; 1];
    while Instant::now() < end && !shared.stop.load(Ordering::Relaxed) {
        match s.peek(&mut byte) {
            Ok(0) => return, // the client gave up
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Sends the request to the server on a new connection and reads the whole response:
/// (head, raw body, whether the connection must close after it).
fn forward(
    shared: &Shared,
    req: &RequestHead,
    body: &[u8],
    head_request: bool,
) -> io::Result<(Vec<u8>, Vec<u8>, bool)> {
    let up = TcpStream::connect(&shared.upstream)?;
    up.set_nodelay(true)?;
    up.set_read_timeout(Some(UPSTREAM_TIMEOUT))?;
    up.set_write_timeout(Some(UPSTREAM_TIMEOUT))?;
    let mut up = Conn::new(up);
    up.s.write_all(&req.raw)?;
    up.s.write_all(body)?;
    up.s.flush()?;
    loop {
        let head = up.read_head()?.ok_or(io::ErrorKind::UnexpectedEof)?;
        let (first, headers) = parse_head(&head)?;
        let status: u16 = first
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
        if (100..200).contains(&status) {
            // Interim answers (100 Continue) are not passed on: the client did not ask.
            continue;
        }
        if head_request || status == 204 || status == 304 {
            return Ok((head, Vec::new(), false));
        }
        if is_chunked(&headers) {
            let (raw, _) = up.read_chunked()?;
            return Ok((head, raw, false));
        }
        if let Some(n) = content_length(&headers) {
            let body = up.read_n(n)?;
            return Ok((head, body, false));
        }
        // No length: the body runs to the end of the connection, and so must ours.
        let body = up.read_to_end()?;
        return Ok((head, body, true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, target: &str) -> RequestHead {
        RequestHead {
            raw: Vec::new(),
            method: method.into(),
            target: target.into(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn classifies_s3_requests() {
        let cases = [
            ("GET", "/b?list-type=2&prefix=p%2F", Kind::List),
            ("GET", "/b/p/packs/ab/abcd", Kind::Get),
            ("HEAD", "/b/p/config", Kind::Head),
            ("PUT", "/b/p/config", Kind::Put),
            ("POST", "/b/p/packs/ab/abcd?uploads", Kind::CreateMultipart),
            (
                "PUT",
                "/b/p/packs/ab/abcd?partNumber=2&uploadId=xyz",
                Kind::UploadPart,
            ),
            (
                "POST",
                "/b/p/packs/ab/abcd?uploadId=xyz",
                Kind::CompleteMultipart,
            ),
            (
                "DELETE",
                "/b/p/packs/ab/abcd?uploadId=xyz",
                Kind::AbortMultipart,
            ),
            ("DELETE", "/b/p/locks/1", Kind::Delete),
            ("POST", "/b?delete", Kind::DeleteObjects),
        ];
        for (m, t, k) in cases {
            assert_eq!(classify(&head(m, t)), k, "{m} {t}");
        }
    }

    #[test]
    fn rules_select_the_nth_matching_request() {
        let m = Match::kind(Kind::UploadPart).target_contains("partNumber=2");
        let part2 = head("PUT", "/b/k?partNumber=2&uploadId=u");
        let part1 = head("PUT", "/b/k?partNumber=1&uploadId=u");
        assert!(m.matches(&part2, classify(&part2)));
        assert!(!m.matches(&part1, classify(&part1)));
        assert!(!Match::method("GET").matches(&part2, classify(&part2)));
    }

    #[test]
    fn retries_ignore_the_upload_id() {
        let r = |t: &str| Record {
            kind: Kind::UploadPart,
            method: "PUT".into(),
            target: t.into(),
            range: None,
            body_len: 0,
            fault: None,
            status: None,
        };
        assert_eq!(
            r("/b/k?partNumber=1&uploadId=a").identity(),
            r("/b/k?partNumber=1&uploadId=b").identity()
        );
        assert_ne!(
            r("/b/k?partNumber=1&uploadId=a").identity(),
            r("/b/k?partNumber=2&uploadId=a").identity()
        );
    }
}
