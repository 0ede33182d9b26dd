//! `pgkeep notify test` and the notification of a failed backup, through the binary, against
//! an HTTP receiver started here (issue 15, item 5).

mod cli_support;
#[path = "../crates/notify/tests/support/mod.rs"]
mod notify_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use cli_support::Sandbox;
use notify_support::{free_port, Receiver};

const HMAC_CANARY: &str = "hmacCANARY-cli-5150";
const SLACK_CANARY: &str = "slackCANARY/cli/8086";
const PD_CANARY: &str = "pdCANARYcli6502";

fn write_config(sb: &Sandbox, text: &str) -> PathBuf {
    let path = sb.path().join("pgkeep.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn channels(webhook: &str, pd: &str, pd_key_file: &Path) -> String {
    format!(
        "[notify]\nretries = 0\ntimeout = \"3s\"\n\
         [[notify.webhook]]\nurl = \"{webhook}\"\nsecret = \"{HMAC_CANARY}\"\n\
         [[notify.slack]]\nname = \"ops-slack\"\nwebhook_url_env = \"TEST_SLACK_URL\"\n\
         [[notify.pagerduty]]\nrouting_key_file = \"{}\"\nurl = \"{pd}\"\n",
        pd_key_file.display()
    )
}

fn assert_no_canary(what: &str, text: &str) {
    for c in [HMAC_CANARY, SLACK_CANARY, PD_CANARY] {
        assert!(!text.contains(c), "{what} holds a secret ({c}):\n{text}");
    }
}

#[test]
fn notify_test_reports_every_channel_and_fails_when_one_is_down() {
    let sb = Sandbox::new();
    let http = Receiver::start();
    let key = sb.path().join("pd-key");
    std::fs::write(&key, format!("{PD_CANARY}\n")).unwrap();
    let cfg = write_config(&sb, &channels(&http.url("/hook"), &http.url("/pd"), &key));
    let cfg = cfg.to_str().unwrap();
    let slack_up = http.url(&format!("/services/{SLACK_CANARY}"));

    let run = sb
        .run(
            &["--config", cfg, "notify", "test"],
            &[("TEST_SLACK_URL", &slack_up)],
        )
        .expect(0);
    let out = run.stdout();
    assert_eq!(out.matches("delivered").count(), 3, "{out}");
    assert!(
        out.contains("ops-slack") && out.contains("webhook[0]") && out.contains("pagerduty[0]"),
        "{out}"
    );
    assert_no_canary("stdout", &out);
    assert_no_canary("stderr", &run.stderr());
    assert_eq!(http.at("/hook").len(), 1);
    assert!(http.at("/hook")[0].headers["x-pgkeep-signature"].starts_with("sha256="));
    assert_eq!(http.at(&format!("/services/{SLACK_CANARY}")).len(), 1);
    assert_eq!(http.at("/pd")[0].json()["routing_key"], PD_CANARY);

    // Slack's receiver is down: exit 1, each channel's outcome in the JSON, no secret anywhere.
    let slack_down = format!("http://127.0.0.1:{}/services/{SLACK_CANARY}", free_port());
    let run = sb
        .run(
            &["--config", cfg, "--json", "notify", "test"],
            &[("TEST_SLACK_URL", &slack_down)],
        )
        .expect(1);
    let doc = run.json();
    let d = doc["deliveries"].as_array().unwrap();
    assert_eq!(d.len(), 3, "{doc}");
    let slack = d.iter().find(|x| x["sink"] == "ops-slack").unwrap();
    assert_eq!(slack["delivered"], false);
    assert!(
        slack["error"].as_str().unwrap().contains("cannot connect"),
        "{doc}"
    );
    assert!(
        d.iter().filter(|x| x["delivered"] == true).count() == 2,
        "{doc}"
    );
    assert!(
        run.stderr()
            .contains("1 of 3 notification channel(s) did not receive the test message"),
        "{}",
        run.stderr()
    );
    assert_no_canary("stdout", &run.stdout());
    assert_no_canary("stderr", &run.stderr());
}

#[test]
fn notify_test_without_channels_is_a_usage_error() {
    let sb = Sandbox::new();
    let run = sb.run(&["notify", "test"], &[]).expect(2);
    assert!(
        run.stderr()
            .contains("no notification channel is configured"),
        "{}",
        run.stderr()
    );
}

#[test]
fn a_config_with_an_inline_slack_url_must_be_private() {
    let sb = Sandbox::new();
    let cfg = write_config(
        &sb,
        &format!(
            "[[notify.slack]]\nwebhook_url = \"https://hooks.slack.com/services/{SLACK_CANARY}\"\n"
        ),
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = sb
        .run(&["--config", cfg.to_str().unwrap(), "notify", "test"], &[])
        .expect(2);
    assert!(
        run.stderr()
            .contains("holds secrets (notify.slack.webhook_url)"),
        "{}",
        run.stderr()
    );
    assert_no_canary("stderr", &run.stderr());
}

#[test]
fn a_failed_backup_is_notified_without_changing_its_exit_code() {
    let sb = Sandbox::new();
    let http = Receiver::start();
    let state = sb.path().join("state");
    let cfg = write_config(
        &sb,
        &format!(
            "[notify]\nretries = 0\nstate_dir = \"{}\"\n[[notify.webhook]]\nurl = \"{}\"\nsecret = \"{HMAC_CANARY}\"\n",
            state.display(),
            http.url("/hook")
        ),
    );
    let cfg = cfg.to_str().unwrap();
    let missing = sb.path().join("no-repo");
    let args = [
        "--config",
        cfg,
        "--repo",
        missing.to_str().unwrap(),
        "backup",
        "--pgdata",
        "/nonexistent",
    ];
    let first = sb.run(&args, &[]).expect(10);
    assert!(
        first.stderr().contains("pgkeep: error:"),
        "{}",
        first.stderr()
    );
    let hook = http.at("/hook");
    assert_eq!(hook.len(), 1, "{}", first.stderr());
    let j = hook[0].json();
    assert_eq!(j["event"], "failure");
    assert_eq!(j["kind"], "backup");
    assert_eq!(j["cluster"], "main");
    assert_eq!(j["exit_code"], 10);
    assert!(
        j["message"]
            .as_str()
            .unwrap()
            .contains(missing.to_str().unwrap()),
        "{j}"
    );

    // The same failure again: suppressed by the dedup window (1 h by default).
    sb.run(&args, &[]).expect(10);
    assert_eq!(http.at("/hook").len(), 1);

    // The receiver is down and the failure is new (another cluster): the backup's exit code
    // and error stand, a warning says the notice is kept, and the state file keeps it.
    drop(http);
    let down = format!("http://127.0.0.1:{}/hook", free_port());
    let cfg2 = write_config(
        &sb,
        &format!("[notify]\nretries = 0\nstate_dir = \"{}\"\n[[notify.webhook]]\nurl = \"{down}\"\nsecret = \"{HMAC_CANARY}\"\n", state.display()),
    );
    let mut args2 = args.to_vec();
    args2[1] = cfg2.to_str().unwrap();
    args2.extend(["--cluster", "other"]);
    let run = sb.run(&args2, &[]).expect(10);
    let err = run.stderr();
    assert!(
        err.contains("pgkeep: error:")
            && err.contains("not delivered")
            && err.contains("kept and retried on the next run"),
        "{err}"
    );
    let saved = std::fs::read_to_string(state.join("notify-state.json")).unwrap();
    assert!(saved.contains("backup/other"), "{saved}");
    assert_no_canary("state file", &saved);
    assert_no_canary("stderr", &err);
}
