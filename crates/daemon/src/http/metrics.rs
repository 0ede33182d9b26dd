//! `/metrics`: `pgkeep metrics` of every cluster (one family each name, the clusters'
//! samples together), then the daemon's own families (schedules, start time, which
//! clusters could be read).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};

use super::App;
use crate::state::DaemonState;
use pgkeep_core::health::metrics::{self, Family, Metrics, Sample};

/// Adds `more`'s samples to `into`, family by family.
pub fn merge(into: &mut Metrics, more: Metrics) {
    for f in more.families {
        match into.families.iter_mut().find(|g| g.name == f.name) {
            Some(g) => g.samples.extend(f.samples),
            None => into.families.push(f),
        }
    }
}

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

fn family(name: &'static str, kind: &'static str, help: &'static str) -> Family {
    Family {
        name,
        kind,
        help,
        samples: Vec::new(),
    }
}

fn push(f: &mut Family, labels: Vec<(&'static str, String)>, value: f64) {
    f.samples.push(Sample { labels, value });
}

/// Results a schedule's last run may have.
const RESULTS: [&str; 5] = ["ok", "warning", "failed", "interrupted", "skipped"];

/// The daemon's families: its start, each schedule's next and last run, and which clusters
/// `/metrics` could read (`up`).
pub fn daemon_families(state: &DaemonState, up: &[(String, bool)]) -> Metrics {
    let mut start = family(
        "pgkeep_daemon_start_time_seconds",
        "gauge",
        "When the daemon started, Unix time.",
    );
    if let Some(t) = state.started {
        push(&mut start, vec![], ts(t));
    }
    let mut loaded = family(
        "pgkeep_daemon_config_loaded_timestamp_seconds",
        "gauge",
        "When the configuration in force was loaded, Unix time.",
    );
    if let Some(t) = state.loaded {
        push(&mut loaded, vec![], ts(t));
    }
    let mut cluster_up = family(
        "pgkeep_daemon_cluster_up",
        "gauge",
        "1 when the cluster's metrics could be gathered for this scrape, else 0 (see the daemon's log).",
    );
    for (c, ok) in up {
        push(
            &mut cluster_up,
            vec![("cluster", c.clone())],
            if *ok { 1.0 } else { 0.0 },
        );
    }
    let mut next = family(
        "pgkeep_daemon_schedule_next_run_timestamp_seconds",
        "gauge",
        "When the schedule runs next, Unix time.",
    );
    let mut running = family(
        "pgkeep_daemon_schedule_running",
        "gauge",
        "1 while a run of the schedule is going on.",
    );
    let mut last_end = family(
        "pgkeep_daemon_schedule_last_run_timestamp_seconds",
        "gauge",
        "When the schedule's last run ended (or was skipped), Unix time.",
    );
    let mut last_duration = family(
        "pgkeep_daemon_schedule_last_run_duration_seconds",
        "gauge",
        "How long the schedule's last run took.",
    );
    let mut last_result = family(
        "pgkeep_daemon_schedule_last_run_result",
        "gauge",
        "Result of the schedule's last run (1 for its result, 0 for the others).",
    );
    let mut skipped = family(
        "pgkeep_daemon_schedule_skipped_runs_total",
        "counter",
        "Runs skipped since the daemon started because the previous run was still going.",
    );
    for s in &state.schedules {
        let l = || {
            vec![
                ("schedule", s.name.clone()),
                ("job", s.job.as_str().to_string()),
                ("cluster", s.cluster.clone()),
            ]
        };
        if let Some(t) = s.next_run {
            push(&mut next, l(), ts(t));
        }
        push(
            &mut running,
            l(),
            if s.running.is_some() { 1.0 } else { 0.0 },
        );
        push(&mut skipped, l(), s.skipped as f64);
        if let Some(r) = &s.last {
            if let Some(end) = r.ended {
                push(&mut last_end, l(), ts(end));
                push(
                    &mut last_duration,
                    l(),
                    (end - r.started).num_milliseconds().max(0) as f64 / 1000.0,
                );
            }
            for res in RESULTS {
                let mut labels = l();
                labels.push(("result", res.to_string()));
                push(
                    &mut last_result,
                    labels,
                    if r.result == res { 1.0 } else { 0.0 },
                );
            }
        }
    }
    Metrics {
        families: vec![
            start,
            loaded,
            cluster_up,
            next,
            running,
            last_end,
            last_duration,
            last_result,
            skipped,
        ],
    }
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut all = Metrics::default();
    let mut up = Vec::new();
    for c in app.shared.clusters() {
        let r = match app.shared.context(&c) {
            Ok(ctx) => metrics::gather(&ctx).await,
            Err(e) => Err(e),
        };
        match r {
            Ok((snap, m)) => {
                if let Some(t) = snap.wal.newest_time {
                    app.note_lag(&c, (snap.now - t).num_milliseconds() as f64 / 1000.0);
                }
                merge(&mut all, m);
                up.push((c, true));
            }
            Err(e) => {
                tracing::warn!("daemon: /metrics: cluster {c}: {e}");
                up.push((c, false));
            }
        }
    }
    merge(&mut all, daemon_families(&app.shared.state(), &up));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        all.to_prometheus(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{JobRun, ScheduleStatus};
    use pgkeep_core::schedule::JobKind;

    #[test]
    fn merged_families_appear_once_and_schedules_have_their_figures() {
        let t: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let state = DaemonState {
            started: Some(t),
            loaded: Some(t),
            schedules: vec![ScheduleStatus {
                name: "check-main".into(),
                job: JobKind::Check,
                cluster: "main".into(),
                db: None,
                cron: "0 0 1 1 *".into(),
                command: vec![],
                next_run: Some(t),
                running: None,
                last: Some(JobRun {
                    started: t,
                    ended: Some(t + chrono::Duration::seconds(3)),
                    exit_code: Some(1),
                    result: "failed".into(),
                    output_tail: "boom".into(),
                }),
                skipped: 2,
            }],
        };
        let mut m = daemon_families(&state, &[("main".into(), true)]);
        merge(
            &mut m,
            daemon_families(&DaemonState::default(), &[("other".into(), false)]),
        );
        let text = m.to_prometheus();
        assert_eq!(
            text.matches("# TYPE pgkeep_daemon_cluster_up gauge")
                .count(),
            1,
            "{text}"
        );
        assert!(text.contains("pgkeep_daemon_cluster_up{cluster=\"other\"} 0"));
        assert!(text.contains(
            "pgkeep_daemon_schedule_next_run_timestamp_seconds{schedule=\"check-main\",job=\"check\",cluster=\"main\"} 1767225600"
        ), "{text}");
        assert!(text.contains(
            "pgkeep_daemon_schedule_last_run_result{schedule=\"check-main\",job=\"check\",cluster=\"main\",result=\"failed\"} 1"
        ));
        assert!(text.contains("pgkeep_daemon_schedule_last_run_duration_seconds{schedule=\"check-main\",job=\"check\",cluster=\"main\"} 3"));
        assert!(text.contains("pgkeep_daemon_schedule_skipped_runs_total{schedule=\"check-main\",job=\"check\",cluster=\"main\"} 2"));
        assert!(!text.contains("boom"));
    }
}
