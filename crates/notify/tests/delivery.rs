//! Notifications against real receivers started here: an HTTP listener for webhook, Slack and
//! PagerDuty, aiosmtpd for e-mail (issue 15, item 5).

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use chrono::Utc;
use hmac::{KeyInit, Mac};
use pgkeep_notify::{
    notify_run, notify_test, NotifyConfig, NotifyEvent, NotifyReport, RunResult, Trigger,
};
use support::{free_port, make_certs, Receiver, SmtpSink};

const HMAC_CANARY: &str = "hmac-CANARY-7f3a91";
const SLACK_CANARY: &str = "T00/B00/slackCANARY42";
const PD_CANARY: &str = "pdCANARYroutingkey0042";
const SMTP_CANARY: &str = "smtpCANARYpassw0rd!";

fn config(text: &str) -> NotifyConfig {
    #[derive(serde::Deserialize)]
    struct File {
        notify: NotifyConfig,
    }
    toml::from_str::<File>(text).unwrap().notify
}

fn event(result: RunResult, message: Option<&str>) -> NotifyEvent {
    let now = Utc::now();
    NotifyEvent {
        kind: "backup".into(),
        cluster: "main".into(),
        database: None,
        result,
        exit_code: if result.is_failure() { 1 } else { 0 },
        message: message.map(str::to_string),
        hint: message
            .map(|_| "free space in the repository, then run the backup again".to_string()),
        host: "db1.example".into(),
        started: now - chrono::Duration::seconds(75),
        ended: now,
        backup_id: None,
        details: BTreeMap::new(),
    }
}

fn triggers(r: &NotifyReport) -> Vec<(String, &'static str, bool)> {
    r.deliveries
        .iter()
        .map(|d| (d.sink.clone(), d.event.name(), d.delivered))
        .collect()
}

/// Checks the webhook signature the way a receiver would, with the hmac crate directly.
fn verify_signature(req: &support::Request, secret: &str) {
    let ts = &req.headers["x-pgkeep-timestamp"];
    let sig = req.headers["x-pgkeep-signature"]
        .strip_prefix("sha256=")
        .expect("sha256= prefix");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(&req.body);
    mac.verify_slice(&hex::decode(sig).unwrap())
        .expect("HMAC matches");
    let age = Utc::now().timestamp() - ts.parse::<i64>().unwrap();
    assert!((0..60).contains(&age), "timestamp is now: {age}");
}

fn assert_no_canary(what: &str, text: &str) {
    for c in [HMAC_CANARY, SLACK_CANARY, PD_CANARY, SMTP_CANARY] {
        assert!(!text.contains(c), "{what} holds a secret ({c}):\n{text}");
    }
}

fn state_text(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("notify-state.json")).unwrap_or_default()
}

#[tokio::test]
async fn failure_dedup_and_recovery_reach_every_channel() {
    let http = Receiver::start();
    let smtp = SmtpSink::plain();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hmac");
    std::fs::write(&secret_file, format!("{HMAC_CANARY}\n")).unwrap();
    let cfg = config(&format!(
        r#"
[notify]
dedup_window = "1h"
[[notify.webhook]]
url = "{}"
secret_file = "{}"
[[notify.slack]]
webhook_url = "{}"
[[notify.pagerduty]]
routing_key = "{PD_CANARY}"
url = "{}"
[[notify.email]]
smtp_host = "127.0.0.1"
smtp_port = {}
tls = "none"
from = "pgkeep@db1.example"
to = ["dba@example.com", "oncall@example.com"]
"#,
        http.url("/hook"),
        secret_file.display(),
        http.url(&format!("/services/{SLACK_CANARY}")),
        http.url("/v2/enqueue"),
        smtp.port
    ));
    let state = dir.path().join("state");

    // A failure: every channel.
    let r = notify_run(
        &cfg,
        &state,
        &event(
            RunResult::Failed,
            Some("repository /srv/backup: no space left on device"),
        ),
    )
    .await;
    assert_eq!(r.trigger, Some(Trigger::Failure));
    assert_eq!(r.failed(), 0, "{r}");
    assert_eq!(r.deliveries.len(), 4, "{r}");

    let hook = http.at("/hook");
    assert_eq!(hook.len(), 1);
    verify_signature(&hook[0], HMAC_CANARY);
    let j = hook[0].json();
    assert_eq!(j["event"], "failure");
    assert_eq!(j["cluster"], "main");
    assert_eq!(j["host"], "db1.example");
    assert_eq!(j["result"], "failed");
    assert_eq!(
        j["message"],
        "repository /srv/backup: no space left on device"
    );
    assert!(j["text"].as_str().unwrap().contains("What to do"), "{j}");

    let slack = http.at(&format!("/services/{SLACK_CANARY}"));
    assert_eq!(slack.len(), 1);
    let s = slack[0].json();
    assert!(
        s["text"]
            .as_str()
            .unwrap()
            .contains("FAILED: backup of cluster main on db1.example"),
        "{s}"
    );
    assert!(s["blocks"][1]["text"]["text"]
        .as_str()
        .unwrap()
        .contains("no space left on device"));

    let pd = http.at("/v2/enqueue");
    assert_eq!(pd.len(), 1);
    let p = pd[0].json();
    assert_eq!(p["routing_key"], PD_CANARY);
    assert_eq!(p["event_action"], "trigger");
    assert_eq!(p["dedup_key"], "pgkeep/backup/main");
    assert_eq!(p["payload"]["severity"], "critical");
    assert_eq!(p["payload"]["source"], "db1.example");

    let mails = smtp.wait_for(1);
    assert_eq!(mails.len(), 1);
    assert!(
        mails[0].contains("Subject: [pgkeep] FAILED: backup of cluster main on db1.example"),
        "{}",
        mails[0]
    );
    assert!(
        mails[0].contains("no space left on device") && mails[0].contains("HINT: free space"),
        "{}",
        mails[0]
    );
    assert!(mails[0].contains("oncall@example.com"));

    // The same failure again within the window: nothing sent.
    let r = notify_run(
        &cfg,
        &state,
        &event(
            RunResult::Failed,
            Some("repository /srv/backup: no space left on device"),
        ),
    )
    .await;
    assert!(
        r.suppressed_since.is_some() && r.deliveries.is_empty(),
        "{r}"
    );
    assert_eq!(http.requests().len(), 3);

    // Success: a recovery to everyone; PagerDuty resolves the same incident.
    let r = notify_run(&cfg, &state, &event(RunResult::Ok, None)).await;
    assert_eq!(r.trigger, Some(Trigger::Recovery));
    assert_eq!(r.failed(), 0, "{r}");
    let pd = http.at("/v2/enqueue");
    assert_eq!(pd.len(), 2);
    assert_eq!(pd[1].json()["event_action"], "resolve");
    assert_eq!(pd[1].json()["dedup_key"], pd[0].json()["dedup_key"]);
    let hook = http.at("/hook");
    verify_signature(&hook[1], HMAC_CANARY);
    assert_eq!(hook[1].json()["event"], "recovery");
    assert_eq!(hook[1].json()["failed_runs"], 2);
    assert!(
        http.at(&format!("/services/{SLACK_CANARY}"))[1].json()["text"]
            .as_str()
            .unwrap()
            .contains("RECOVERED")
    );
    let mails = smtp.wait_for(2);
    assert!(
        mails
            .iter()
            .any(|m| m.contains("Subject: [pgkeep] RECOVERED")),
        "{mails:?}"
    );

    // Another success: not asked for by any channel.
    let r = notify_run(&cfg, &state, &event(RunResult::Ok, None)).await;
    assert_eq!(r.trigger, Some(Trigger::Success));
    assert!(r.deliveries.is_empty(), "{r}");
    assert_eq!(http.requests().len(), 6);

    assert_no_canary("state file", &state_text(&state));
    assert_no_canary(
        "report",
        &format!("{r}{}", serde_json::to_string(&r).unwrap()),
    );
}

#[tokio::test]
async fn success_and_warning_only_when_asked() {
    let http = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!(
        "[[notify.webhook]]\nurl = \"{}\"\non = [\"success\", \"warning\"]\n[[notify.pagerduty]]\nrouting_key = \"k\"\nurl = \"{}\"\non = [\"warning\"]\n",
        http.url("/ok"),
        http.url("/pd")
    ));
    let state = dir.path().join("s");
    let r = notify_run(&cfg, &state, &event(RunResult::Ok, None)).await;
    assert_eq!(
        triggers(&r),
        vec![("webhook[0]".to_string(), "success", true)]
    );
    let mut w = event(RunResult::Warning, Some("2 files changed while being read"));
    w.exit_code = 3;
    let r = notify_run(&cfg, &state, &w).await;
    assert_eq!(
        triggers(&r),
        vec![
            ("webhook[0]".to_string(), "warning", true),
            ("pagerduty[0]".to_string(), "warning", true)
        ]
    );
    let pd = http.at("/pd")[0].json();
    assert_eq!(pd["payload"]["severity"], "warning");
    // Unsigned without a secret.
    assert!(!http.at("/ok")[0].headers.contains_key("x-pgkeep-signature"));
    // A failure is not in either `on` list.
    let r = notify_run(&cfg, &state, &event(RunResult::Failed, Some("boom"))).await;
    assert_eq!(r.trigger, Some(Trigger::Failure));
    assert!(r.deliveries.is_empty());
    assert_eq!(http.requests().len(), 3);
    assert_eq!(http.at("/ok")[1].json()["event"], "warning");
}

#[tokio::test]
async fn undelivered_notices_are_kept_and_sent_when_the_receiver_is_back() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!(
        "[notify]\nretries = 1\nretry_delay = \"10ms\"\ntimeout = \"2s\"\n[[notify.slack]]\nwebhook_url = \"http://127.0.0.1:{port}/services/{SLACK_CANARY}\"\n[[notify.pagerduty]]\nrouting_key = \"{PD_CANARY}\"\nurl = \"http://127.0.0.1:{port}/pd\"\n"
    ));
    let state = dir.path().join("s");

    // First run: nobody listens. Two attempts each, the command is not failed, both kept.
    let r = notify_run(
        &cfg,
        &state,
        &event(RunResult::Failed, Some("cannot connect to PostgreSQL")),
    )
    .await;
    assert_eq!(r.failed(), 2, "{r}");
    assert!(
        r.deliveries
            .iter()
            .all(|d| d.kept_for_retry && d.attempts == 2),
        "{r:?}"
    );
    assert_eq!(r.pending, 2);
    let text = format!("{r}");
    assert!(
        text.contains("cannot connect") && text.contains("kept for the next run"),
        "{text}"
    );
    assert_no_canary(
        "report",
        &format!("{text}{}", serde_json::to_string(&r).unwrap()),
    );
    assert_no_canary("state file", &state_text(&state));
    assert!(state_text(&state).contains("cannot connect to PostgreSQL"));

    // Second run: the receiver is back. The kept failure goes first, then the recovery.
    let http = Receiver::start_on(port);
    let r = notify_run(&cfg, &state, &event(RunResult::Ok, None)).await;
    assert_eq!(r.failed(), 0, "{r}");
    assert_eq!(r.pending, 0);
    let pd: Vec<String> = http
        .at("/pd")
        .iter()
        .map(|q| q.json()["event_action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pd, ["trigger", "resolve"]);
    let slack = http.at(&format!("/services/{SLACK_CANARY}"));
    assert!(slack[0].json()["text"].as_str().unwrap().contains("FAILED"));
    assert!(slack[1].json()["text"]
        .as_str()
        .unwrap()
        .contains("RECOVERED"));
    assert!(r.deliveries.iter().filter(|d| d.earlier).count() == 2);
    assert!(!state_text(&state).contains("cannot connect to PostgreSQL"));
}

#[tokio::test]
async fn refused_notices_are_not_kept() {
    // A receiver answering 4xx will not change its mind: reported, not retried forever.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in listener.incoming().flatten() {
            use std::io::{Read, Write};
            let mut c = c;
            let mut buf = [0u8; 65536];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!(
        "[[notify.webhook]]\nurl = \"http://127.0.0.1:{port}/x\"\n"
    ));
    let r = notify_run(
        &cfg,
        &dir.path().join("s"),
        &event(RunResult::Failed, Some("x")),
    )
    .await;
    assert_eq!(r.failed(), 1);
    assert!(
        !r.deliveries[0].kept_for_retry && r.deliveries[0].attempts == 1,
        "{r:?}"
    );
    assert!(
        r.deliveries[0]
            .error
            .as_deref()
            .unwrap()
            .contains("HTTP 403"),
        "{r:?}"
    );
    assert_eq!(r.pending, 0);
}

#[tokio::test]
async fn email_over_starttls_with_authentication() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let smtp = SmtpSink::starttls_auth(
        &certs.path().join("server.pem"),
        &certs.path().join("server.key"),
        "pgkeep",
        SMTP_CANARY,
    );
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("smtp-password");
    std::fs::write(&pw, SMTP_CANARY).unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, format!("{SMTP_CANARY}-wrong")).unwrap();
    let email = |name: &str, file: &Path| {
        format!(
            "[[notify.email]]\nname = \"{name}\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\ntls = \"starttls\"\nca_file = \"{}\"\nusername = \"pgkeep\"\npassword_file = \"{}\"\nfrom = \"pgkeep@db1.example\"\nto = [\"dba@example.com\"]\n",
            smtp.port,
            certs.path().join("ca.pem").display(),
            file.display()
        )
    };
    // A good password and a wrong one.
    let cfg = config(&format!(
        "[notify]\nretries = 1\nretry_delay = \"10ms\"\ntimeout = \"5s\"\n{}{}",
        email("good", &pw),
        email("bad", &wrong)
    ));
    let r = notify_test(&cfg, "db1.example").await.unwrap();
    let good = r.deliveries.iter().find(|d| d.sink == "good").unwrap();
    let bad = r.deliveries.iter().find(|d| d.sink == "bad").unwrap();
    assert!(good.delivered, "{r}");
    assert!(!bad.delivered, "{r}");
    // A refused password is a permanent SMTP answer: reported, not retried.
    let err = bad.error.as_deref().unwrap();
    assert!(
        err.contains("535") && err.contains("Authentication credentials invalid"),
        "{r}"
    );
    assert_eq!(bad.attempts, 1, "{r}");
    assert_no_canary(
        "report",
        &format!("{r}{}", serde_json::to_string(&r).unwrap()),
    );
    let mails = smtp.wait_for(1);
    assert_eq!(mails.len(), 1);
    assert!(mails[0].contains("Subject: [pgkeep] TEST"), "{}", mails[0]);

    // Without the CA the server's certificate is refused: STARTTLS really is verified.
    let no_ca = email("noca", &pw).replace(
        &format!("ca_file = \"{}\"\n", certs.path().join("ca.pem").display()),
        "",
    );
    let r = notify_test(&config(&format!("[notify]\nretries = 0\n{no_ca}")), "h")
        .await
        .unwrap();
    assert!(!r.deliveries[0].delivered, "{r}");
}

#[tokio::test]
async fn test_notice_goes_to_every_channel_and_reports_each() {
    let http = Receiver::start();
    let down = free_port();
    let cfg = config(&format!(
        "[notify]\nretries = 0\n[[notify.webhook]]\nurl = \"{}\"\nsecret = \"{HMAC_CANARY}\"\non = [\"success\"]\n[[notify.pagerduty]]\nrouting_key = \"{PD_CANARY}\"\nurl = \"{}\"\n[[notify.slack]]\nwebhook_url = \"http://127.0.0.1:{down}/services/{SLACK_CANARY}\"\n[[notify.slack]]\nname = \"ops\"\nwebhook_url_env = \"PGKEEP_TEST_SLACK_UNSET_VARIABLE\"\n",
        http.url("/hook"),
        http.url("/pd")
    ));
    let r = notify_test(&cfg, "db1.example").await.unwrap();
    let by: BTreeMap<&str, bool> = r
        .deliveries
        .iter()
        .map(|d| (d.sink.as_str(), d.delivered))
        .collect();
    assert_eq!(
        by,
        BTreeMap::from([
            ("webhook[0]", true),
            ("pagerduty[0]", true),
            ("slack[0]", false),
            ("ops", false)
        ])
    );
    assert_eq!(r.failed(), 2);
    let ops = r.deliveries.iter().find(|d| d.sink == "ops").unwrap();
    assert!(
        ops.error
            .as_deref()
            .unwrap()
            .contains("PGKEEP_TEST_SLACK_UNSET_VARIABLE is not set"),
        "{r}"
    );
    let hook = &http.at("/hook")[0];
    verify_signature(hook, HMAC_CANARY);
    assert_eq!(hook.json()["event"], "test");
    // The test page is triggered and resolved at once.
    let pd: Vec<String> = http
        .at("/pd")
        .iter()
        .map(|q| q.json()["event_action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pd, ["trigger", "resolve"]);
    assert_no_canary(
        "report",
        &format!("{r}{}", serde_json::to_string(&r).unwrap()),
    );
    assert!(notify_test(&NotifyConfig::default(), "h").await.is_err());
}

#[tokio::test]
async fn email_over_smtps() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let smtp = SmtpSink::smtps(
        &certs.path().join("server.pem"),
        &certs.path().join("server.key"),
    );
    let cfg = config(&format!(
        "[notify]\nretries = 0\ntimeout = \"5s\"\n[[notify.email]]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\ntls = \"tls\"\nca_file = \"{}\"\nfrom = \"pgkeep@db1.example\"\nto = [\"dba@example.com\"]\non = [\"warning\"]\n",
        smtp.port,
        certs.path().join("ca.pem").display()
    ));
    let dir = tempfile::tempdir().unwrap();
    let r = notify_run(
        &cfg,
        dir.path(),
        &event(RunResult::Warning, Some("2 files changed while being read")),
    )
    .await;
    assert_eq!(r.failed(), 0, "{r}");
    let mails = smtp.wait_for(1);
    assert!(
        mails[0].contains("Subject: [pgkeep] WARNING: backup of cluster main"),
        "{}",
        mails[0]
    );
}
