//! The HTTP listener of the daemon (`[daemon] listen`): `/metrics`, `/healthz`, `/api/...`
//! and the dashboard (`/`).
//!
//! A layer above the commands: every figure comes from the pgkeep-core function the CLI
//! calls (`metrics::gather`, `health::check`, `status::status`, `history::history`,
//! `list::list`) with the [`Context`](pgkeep_core::context::Context) of
//! [`Shared::context`]; nothing here reads the repository or the server itself. Those
//! functions redact secrets, and nothing else goes into a response.
//!
//! The address, the credentials and TLS are read when the daemon starts (a SIGHUP reload
//! changes the clusters and schedules served, not the listener).

mod api;
mod auth;
mod metrics;
mod tls;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::Shared;
use pgkeep_core::error::{Error, ErrorKind, Result};
use pgkeep_core::health::{self, HealthOptions, HealthReport};

pub use auth::{BasicAuth, PASSWORD_ENV};

/// The dashboard: one page, its CSS and script inline, nothing fetched from elsewhere.
const DASHBOARD: &str = include_str!("../assets/dashboard.html");

/// WAL lag samples kept per cluster for the dashboard's chart.
const LAG_SAMPLES: usize = 2880;

/// How long `/healthz` reuses a cluster's health check (each runs the end-to-end archiving
/// check, a WAL switch on the server): probes every few seconds do not switch WAL each time.
/// A reloaded configuration invalidates it.
const HEALTH_TTL: Duration = Duration::from_secs(10);

/// A health check kept for [`HEALTH_TTL`].
#[derive(Clone)]
pub(crate) struct CheckedHealth {
    at: Instant,
    loaded: Option<DateTime<Utc>>,
    /// When it ran.
    pub(crate) checked: DateTime<Utc>,
    /// The report, or why the check did not run.
    pub(crate) result: std::result::Result<HealthReport, String>,
}

/// WAL lag samples (time, seconds) per cluster, oldest first.
type LagSamples = BTreeMap<String, VecDeque<(DateTime<Utc>, f64)>>;

/// What the handlers share.
pub(crate) struct App {
    pub(crate) shared: Arc<Shared>,
    auth: Option<BasicAuth>,
    /// The WAL archive lag (seconds) per cluster, each time the daemon computed it (status
    /// or metrics requests), oldest first: the dashboard's lag chart.
    lag: Mutex<LagSamples>,
    /// The last health check of each cluster; its lock also makes concurrent probes wait
    /// for the check going on instead of starting their own.
    health: tokio::sync::Mutex<BTreeMap<String, CheckedHealth>>,
}

impl App {
    /// Remembers a WAL lag figure of `cluster` (at most one per 10 s).
    pub(crate) fn note_lag(&self, cluster: &str, secs: f64) {
        let now = Utc::now();
        let mut all = self.lag.lock().expect("lag lock");
        let q = all.entry(cluster.to_string()).or_default();
        if let Some((t, _)) = q.back() {
            if (now - *t).num_seconds() < 10 {
                return;
            }
        }
        q.push_back((now, secs));
        while q.len() > LAG_SAMPLES {
            q.pop_front();
        }
    }

    /// `pgkeep check` of `cluster`, reused for [`HEALTH_TTL`].
    pub(crate) async fn health_of(&self, cluster: &str) -> CheckedHealth {
        let mut cache = self.health.lock().await;
        let loaded = self.shared.state().loaded;
        if let Some(c) = cache.get(cluster) {
            if c.at.elapsed() < HEALTH_TTL && c.loaded == loaded {
                return c.clone();
            }
        }
        let result = match self.shared.context(cluster) {
            Ok(ctx) => health::check(&ctx, &HealthOptions::default())
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let c = CheckedHealth {
            at: Instant::now(),
            loaded,
            checked: Utc::now(),
            result,
        };
        cache.insert(cluster.to_string(), c.clone());
        c
    }

    /// The lag samples of `cluster`.
    pub(crate) fn lag_of(&self, cluster: &str) -> Vec<(DateTime<Utc>, f64)> {
        self.lag
            .lock()
            .expect("lag lock")
            .get(cluster)
            .map(|q| q.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// The socket address of `[daemon] listen`: `ADDR:PORT`, `[v6]:PORT`, `HOST:PORT`, or a
/// bare `:PORT` for 127.0.0.1.
pub async fn listen_addr(listen: &str) -> Result<SocketAddr> {
    let text = listen.trim();
    let full = match text.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None => text.to_string(),
    };
    if let Ok(a) = full.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bad = |why: String| {
        Error::usage_hint(
            format!("[daemon] listen = {listen:?}: {why}"),
            "write ADDR:PORT, e.g. \"127.0.0.1:9187\", or \":9187\" for 127.0.0.1",
        )
    };
    match full.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            let mut addrs = tokio::net::lookup_host(&full)
                .await
                .map_err(|e| bad(format!("cannot resolve {host}: {e}")))?;
            addrs
                .next()
                .ok_or_else(|| bad(format!("{host} has no address")))
        }
        _ => Err(bad("not an ADDR:PORT".into())),
    }
}

/// Binds `[daemon] listen` and serves until `stop` turns true; `None` when no listener is
/// configured. Binding errors fail the daemon's start.
pub async fn start(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Result<Option<JoinHandle<()>>> {
    let file = shared.file();
    let Some(listen) = file.daemon.listen.clone() else {
        return Ok(None);
    };
    let addr = listen_addr(&listen).await?;
    let auth = BasicAuth::from_config(&file.daemon, &shared.env)?;
    let acceptor = match (&file.daemon.tls_cert, &file.daemon.tls_key) {
        (Some(c), Some(k)) => Some(tls::acceptor(c, k)?),
        (None, None) => None,
        _ => {
            return Err(Error::usage(
                "[daemon] tls_cert and tls_key go together: set both for HTTPS, or neither",
            ))
        }
    };
    let tcp = TcpListener::bind(addr).await.map_err(|e| {
        Error::with_hint(
            ErrorKind::Failure,
            format!("[daemon] listen = {listen:?}: cannot listen on {addr}: {e}"),
            "another process may hold the port; pick another one in [daemon] listen",
        )
    })?;
    let local = tcp.local_addr().unwrap_or(addr);
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    tracing::info!(
        "daemon: serving {scheme}://{local}/ (/metrics, /healthz, /api/...){}",
        if auth.is_some() {
            ", basic authentication required"
        } else {
            ""
        }
    );
    if auth.is_none() && !local.ip().is_loopback() {
        tracing::warn!(
            "daemon: listening on {local} without [daemon] user: anyone who reaches it sees the dashboard"
        );
    }
    let app = Arc::new(App {
        shared,
        auth,
        lag: Mutex::new(BTreeMap::new()),
        health: tokio::sync::Mutex::new(BTreeMap::new()),
    });
    let router = router(app);
    let shutdown = async move {
        let mut stop = stop;
        while !*stop.borrow_and_update() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    };
    let handle = match acceptor {
        None => tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, router)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!("daemon: the HTTP listener stopped: {e}");
            }
        }),
        Some(acceptor) => {
            let listener = tls::TlsListener::new(tcp, acceptor)
                .map_err(|e| Error::io(format!("listening on {addr}"), e))?;
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!("daemon: the HTTPS listener stopped: {e}");
                }
            })
        }
    };
    Ok(Some(handle))
}

/// Every route, behind the authentication check.
pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/index.html", get(dashboard))
        .route("/metrics", get(metrics::metrics))
        .route("/healthz", get(api::healthz))
        .route("/api/status", get(api::status))
        .route("/api/history", get(api::history))
        .route("/api/backups", get(api::backups))
        .route("/api/schedules", get(api::schedules))
        .route("/api/wal-lag", get(api::wal_lag))
        .route("/api/clusters", get(api::clusters))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            authenticate,
        ))
        .with_state(app)
}

async fn authenticate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(a) = &app.auth {
        if !a.allows(req.headers()) {
            return (
                StatusCode::UNAUTHORIZED,
                [
                    (
                        header::WWW_AUTHENTICATE,
                        "Basic realm=\"pgkeep\", charset=\"UTF-8\"",
                    ),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                "authentication required\n",
            )
                .into_response();
        }
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, "no-store".parse().expect("header"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().expect("header"),
    );
    resp
}

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
            ),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found: the daemon serves /, /metrics, /healthz, /api/status, /api/history, \
         /api/backups, /api/schedules, /api/wal-lag, /api/clusters\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listen_addresses() {
        assert_eq!(
            listen_addr(":9187").await.unwrap(),
            "127.0.0.1:9187".parse().unwrap()
        );
        assert_eq!(
            listen_addr("0.0.0.0:80").await.unwrap(),
            "0.0.0.0:80".parse().unwrap()
        );
        assert_eq!(
            listen_addr("[::1]:9187").await.unwrap(),
            "[::1]:9187".parse().unwrap()
        );
        assert!(listen_addr("localhost:9187")
            .await
            .unwrap()
            .ip()
            .is_loopback());
        for bad in ["9187", "host", ":x", ":", "1.2.3.4:99999"] {
            let e = listen_addr(bad).await.unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
