//! `/healthz` and `/api/...`: the health check, status, history and backup list of each
//! cluster as the CLI computes them, and the schedules' state, as JSON (`/healthz`: text,
//! or JSON with `?format=json`).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::App;
use pgkeep_core::health::{status, HealthStatus};
use pgkeep_core::history::{self, HistoryFilter, RunKind};

/// The query parameters the endpoints read.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    /// One cluster (default: every cluster of the file).
    pub cluster: Option<String>,
    /// `/healthz`: `json` for a JSON body.
    pub format: Option<String>,
    /// `/api/history`: only this kind.
    pub kind: Option<String>,
    /// `/api/history`: only the newest N records per cluster.
    pub limit: Option<usize>,
    /// `/healthz`: `ok` to answer 200 when the worst item is a WARNING.
    pub warning: Option<String>,
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

/// The clusters a request is about; the 404 message when it names an unknown one.
fn selected(app: &App, p: &Params) -> std::result::Result<Vec<String>, String> {
    let all = app.shared.clusters();
    match &p.cluster {
        None => Ok(all),
        Some(c) if all.contains(c) => Ok(vec![c.clone()]),
        Some(c) => Err(format!(
            "no cluster {c:?} in the configuration (clusters: {})",
            all.join(", ")
        )),
    }
}

fn failed(cluster: &str, e: impl std::fmt::Display) -> Value {
    json!({ "cluster": cluster, "error": e.to_string() })
}

/// Runs `f` with the context of each cluster and answers their results as a JSON array (a
/// cluster whose context or command fails is `{cluster, error}` in it).
async fn per_cluster<T, F, Fut>(app: &App, clusters: Vec<String>, f: F) -> Response
where
    T: serde::Serialize,
    F: Fn(pgkeep_core::context::Context) -> Fut,
    Fut: std::future::Future<Output = pgkeep_core::error::Result<T>>,
{
    let mut out = Vec::new();
    for c in clusters {
        let r = match app.shared.context(&c) {
            Ok(ctx) => f(ctx).await,
            Err(e) => Err(e),
        };
        out.push(match r {
            Ok(v) => serde_json::to_value(&v).unwrap_or_else(|e| failed(&c, e)),
            Err(e) => failed(&c, e),
        });
    }
    Json(Value::Array(out)).into_response()
}

/// `GET /api/clusters`: the names of the clusters served.
pub async fn clusters(State(app): State<Arc<App>>) -> Response {
    Json(json!({ "clusters": app.shared.clusters() })).into_response()
}

/// `GET /api/status`: `pgkeep status --json` of each cluster, in an array.
pub async fn status(State(app): State<Arc<App>>, Query(p): Query<Params>) -> Response {
    let clusters = match selected(&app, &p) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::NOT_FOUND, m),
    };
    per_cluster(&app, clusters, |ctx| {
        let app = app.clone();
        async move {
            let s = status::status(&ctx).await?;
            if let Some(l) = s.wal_lag_secs {
                app.note_lag(&ctx.settings.cluster.name, l);
            }
            Ok(s)
        }
    })
    .await
}

/// `GET /api/history[?kind=K][&limit=N]`: `pgkeep history --json` of each cluster.
pub async fn history(State(app): State<Arc<App>>, Query(p): Query<Params>) -> Response {
    let clusters = match selected(&app, &p) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::NOT_FOUND, m),
    };
    let kind = match &p.kind {
        None => None,
        Some(k) => match serde_json::from_value::<RunKind>(Value::String(k.clone())) {
            Ok(k) => Some(k),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("kind={k:?} is not a run kind (backup, dump, archive-push, expire, verify, copy, drill, check, ...)"),
                )
            }
        },
    };
    let filter = HistoryFilter {
        kind,
        limit: p.limit,
    };
    per_cluster(&app, clusters, |ctx| {
        let filter = filter.clone();
        async move { history::history(&ctx, &filter).await }
    })
    .await
}

/// `GET /api/backups`: `pgkeep list --json` of each cluster (backups and dumps).
pub async fn backups(State(app): State<Arc<App>>, Query(p): Query<Params>) -> Response {
    use pgkeep_core::commands::list::{list, ListOptions};
    let clusters = match selected(&app, &p) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::NOT_FOUND, m),
    };
    per_cluster(&app, clusters, |ctx| async move {
        let repo = ctx.open_repository().await?;
        let opts = ListOptions {
            cluster: ctx.settings.cluster.name.clone(),
        };
        list(&repo, &opts).await
    })
    .await
}

/// `GET /api/schedules`: the daemon's state (every schedule, its next run, the run going
/// on and the last one); `?cluster=` keeps that cluster's schedules.
pub async fn schedules(State(app): State<Arc<App>>, Query(p): Query<Params>) -> Response {
    let clusters = match selected(&app, &p) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::NOT_FOUND, m),
    };
    let mut state = app.shared.state();
    if p.cluster.is_some() {
        state.schedules.retain(|s| clusters.contains(&s.cluster));
    }
    let mut v = serde_json::to_value(&state).unwrap_or_else(|e| json!({ "error": e.to_string() }));
    v["now"] = json!(chrono::Utc::now());
    Json(v).into_response()
}

/// `GET /api/wal-lag`: the WAL archive lag samples the daemon took (each `/api/status` or
/// `/metrics` request computes one), per cluster: `[[time, seconds], ...]`.
pub async fn wal_lag(State(app): State<Arc<App>>, Query(p): Query<Params>) -> Response {
    let clusters = match selected(&app, &p) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::NOT_FOUND, m),
    };
    let out: Vec<Value> = clusters
        .iter()
        .map(|c| {
            let samples: Vec<Value> = app
                .lag_of(c)
                .into_iter()
                .map(|(t, s)| json!([t, s]))
                .collect();
            json!({ "cluster": c, "samples": samples })
        })
        .collect();
    Json(Value::Array(out)).into_response()
}

/// `GET /healthz[?format=json][&warning=ok]`: `pgkeep check` of every cluster; 200 when
/// each is OK (or, with `warning=ok`, no worse than WARNING), else 503 with the failing
/// checks. A check is reused for a few seconds (see `HEALTH_TTL`).
pub async fn healthz(State(app): State<Arc<App>>, Query(p): Query<Params>) -> Response {
    let clusters = match selected(&app, &p) {
        Ok(c) => c,
        Err(m) => return error(StatusCode::NOT_FOUND, m),
    };
    let tolerate_warning = p.warning.as_deref() == Some("ok");
    let mut healthy = true;
    let mut text = String::new();
    let mut docs = Vec::new();
    for c in clusters {
        let checked = app.health_of(&c).await;
        match checked.result {
            Ok(rep) => {
                use pgkeep_core::context::Report as _;
                let failure = rep.failure().map(|e| e.to_string());
                let ok = failure.is_none()
                    && (rep.status == HealthStatus::Ok
                        || (tolerate_warning && rep.status == HealthStatus::Warning));
                healthy &= ok;
                let _ = writeln!(text, "cluster {c}: {}", rep.status.word());
                let bad: Vec<_> = rep
                    .items
                    .iter()
                    .filter(|i| i.status != HealthStatus::Ok)
                    .collect();
                for i in &bad {
                    let _ = writeln!(text, "  {:<9} {} {}", i.status.word(), i.name, i.message);
                }
                docs.push(json!({
                    "cluster": c,
                    "checked": checked.checked,
                    "ok": ok,
                    "status": rep.status,
                    "failing": bad,
                    "checks": rep.items,
                }));
            }
            Err(e) => {
                healthy = false;
                let _ = writeln!(text, "cluster {c}: UNKNOWN: the check did not run: {e}");
                docs.push(json!({
                    "cluster": c,
                    "checked": checked.checked,
                    "ok": false,
                    "status": HealthStatus::Unknown,
                    "error": e.to_string(),
                }));
            }
        }
    }
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if p.format.as_deref() == Some("json") {
        let doc = json!({ "status": if healthy { "ok" } else { "failing" }, "clusters": docs });
        return (code, Json(doc)).into_response();
    }
    let head = if healthy { "OK" } else { "FAILING" };
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("pgkeep health: {head}\n{text}"),
    )
        .into_response()
}
