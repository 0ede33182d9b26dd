//! The `[notify]` section of the configuration file.
//!
//! Parsed with serde (`deny_unknown_fields` everywhere, so pgkeep-core reports unknown keys
//! with file and line). Cross-field checks run in `TryFrom` conversions: toml then gives their
//! errors the position of the offending table.
//!
//! Secrets (HMAC secret, Slack webhook URL, PagerDuty routing key, SMTP password) are given
//! one of three ways, as pgkeep does for its other secrets: inline in the file (the file must
//! then be private, 0600, which pgkeep-core checks with [`inline_secret_keys`]), `<key>_env`
//! naming an environment variable, or `<key>_file` naming a file whose first line is the
//! value. They are resolved only when a message is sent, so a missing variable fails that one
//! channel and never the command that is being reported.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// Default `dedup_window`: identical failures are re-sent at most once an hour.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(3600);
/// Default `timeout` of one delivery attempt.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `retries` after a failed attempt, within one run.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default `retry_delay`, doubled after each retry.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_millis(500);
/// The PagerDuty Events API v2 endpoint.
pub const PAGERDUTY_EVENTS_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// What a channel is told about (`on = [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// A run failed (or was interrupted).
    Failure,
    /// The first successful run after a failure.
    Recovery,
    /// A successful run (only when asked for).
    Success,
    /// A run that completed with warnings (only when asked for).
    Warning,
    /// `pgkeep notify test` (sent to every channel, whatever its `on`).
    Test,
}

impl Trigger {
    /// The lowercase name used in payloads, the state file and `on`.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Failure => "failure",
            Trigger::Recovery => "recovery",
            Trigger::Success => "success",
            Trigger::Warning => "warning",
            Trigger::Test => "test",
        }
    }
}

fn default_on() -> Vec<Trigger> {
    vec![Trigger::Failure, Trigger::Recovery]
}

/// A secret value, wiped on drop, never shown by `Debug`.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        SecretValue(Zeroizing::new(s.into()))
    }

    /// The secret text: keep the borrow short and never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a secret comes from. Serializes without the value (`"inline"`, `"env:NAME"`,
/// `"file:/path"`), so a configuration dump never holds it.
#[derive(Debug, Clone)]
pub enum SecretRef {
    /// Written in the (private) configuration file.
    Inline(SecretValue),
    /// The value of this environment variable.
    Env(String),
    /// The first line of this file.
    File(PathBuf),
}

impl Serialize for SecretRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SecretRef::Inline(_) => s.serialize_str("inline"),
            SecretRef::Env(n) => s.serialize_str(&format!("env:{n}")),
            SecretRef::File(p) => s.serialize_str(&format!("file:{}", p.display())),
        }
    }
}

impl SecretRef {
    /// Builds the source from the three spellings of `key`; at most one may be given.
    fn pick(
        key: &str,
        inline: Option<String>,
        env: Option<String>,
        file: Option<PathBuf>,
    ) -> Result<Option<SecretRef>, String> {
        match (inline, env, file) {
            (None, None, None) => Ok(None),
            (Some(v), None, None) => Ok(Some(SecretRef::Inline(SecretValue::new(v)))),
            (None, Some(n), None) if !n.is_empty() => Ok(Some(SecretRef::Env(n))),
            (None, None, Some(p)) => Ok(Some(SecretRef::File(p))),
            (None, Some(_), None) => Err(format!("{key}_env: empty variable name")),
            _ => Err(format!("give only one of {key}, {key}_env and {key}_file")),
        }
    }

    /// Reads the secret. The error names the variable or file, never a value.
    pub fn resolve(&self) -> Result<SecretValue, String> {
        match self {
            SecretRef::Inline(v) => Ok(v.clone()),
            SecretRef::Env(name) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(SecretValue::new(v)),
                _ => Err(format!("environment variable {name} is not set")),
            },
            SecretRef::File(path) => read_first_line(path),
        }
    }
}

fn read_first_line(path: &Path) -> Result<SecretValue, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?,
    );
    match text.lines().next() {
        Some(l) if !l.is_empty() => Ok(SecretValue::new(l)),
        _ => Err(format!(
            "the first line of secret file {} is empty",
            path.display()
        )),
    }
}

/// `[notify]`: channels and delivery settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// A failure (or warning, or success) identical to the last one sent for the same job
    /// is not sent again within this window (`"1h"`, `"30m"`, `"0s"` to send every time).
    #[serde(
        default,
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub dedup_window: Option<Duration>,
    /// Where the state file lives (default `$XDG_STATE_HOME/pgkeep`, else
    /// `~/.local/state/pgkeep`; `PGKEEP_NOTIFY_STATE_DIR` overrides).
    pub state_dir: Option<PathBuf>,
    /// Timeout of one delivery attempt.
    #[serde(
        default,
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub timeout: Option<Duration>,
    /// Retries after a failed attempt within one run (undelivered messages are also kept
    /// and retried on the next run).
    pub retries: Option<u32>,
    /// Delay before the first retry, doubled after each one.
    #[serde(
        default,
        deserialize_with = "de_duration",
        serialize_with = "ser_duration"
    )]
    pub retry_delay: Option<Duration>,
    /// `[[notify.webhook]]`: generic JSON webhooks.
    #[serde(default)]
    pub webhook: Vec<WebhookSink>,
    /// `[[notify.slack]]`: Slack incoming webhooks.
    #[serde(default)]
    pub slack: Vec<SlackSink>,
    /// `[[notify.pagerduty]]`: PagerDuty Events API v2.
    #[serde(default)]
    pub pagerduty: Vec<PagerDutySink>,
    /// `[[notify.email]]`: e-mail over SMTP.
    #[serde(default)]
    pub email: Vec<EmailSink>,
}

impl NotifyConfig {
    /// True when no channel is configured.
    pub fn is_empty(&self) -> bool {
        self.webhook.is_empty()
            && self.slack.is_empty()
            && self.pagerduty.is_empty()
            && self.email.is_empty()
    }

    /// `dedup_window` or its default.
    pub fn dedup_window(&self) -> Duration {
        self.dedup_window.unwrap_or(DEFAULT_DEDUP_WINDOW)
    }

    /// Where the state file lives: `state_dir`, else `PGKEEP_NOTIFY_STATE_DIR`, else
    /// `$XDG_STATE_HOME/pgkeep`, else `$HOME/.local/state/pgkeep`.
    pub fn state_dir(&self, env: impl Fn(&str) -> Option<String>) -> PathBuf {
        let var = |n: &str| env(n).filter(|v| !v.is_empty());
        if let Some(d) = var("PGKEEP_NOTIFY_STATE_DIR") {
            return PathBuf::from(d);
        }
        if let Some(d) = &self.state_dir {
            return d.clone();
        }
        if let Some(x) = var("XDG_STATE_HOME") {
            return PathBuf::from(x).join("pgkeep");
        }
        let home = var("HOME").unwrap_or_else(|| "/var/lib".to_string());
        PathBuf::from(home).join(".local/state/pgkeep")
    }
}

/// Parses a duration such as `"1h"`, `"30m"`, `"90s"`, `"1h 30m"` (humantime's syntax).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write e.g. \"1h\", \"30m\", \"10s\"")
    })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn ser_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

/// Checks an `http(s)://` URL without printing it (it may hold a token).
fn check_http_url(key: &str, url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{key}: not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!("{key}: must be an http:// or https:// URL"));
    }
    Ok(())
}

/// One `[[notify.webhook]]`: a JSON POST, optionally HMAC-signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawWebhook")]
pub struct WebhookSink {
    /// Name in reports (default `webhook[N]`).
    pub name: Option<String>,
    /// Where to POST (`http://` or `https://`).
    pub url: String,
    /// Shared secret for the `X-Pgkeep-Signature` header; unsigned without one.
    pub secret: Option<SecretRef>,
    /// What to send.
    pub on: Vec<Trigger>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    name: Option<String>,
    url: String,
    secret: Option<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    #[serde(default = "default_on")]
    on: Vec<Trigger>,
}

impl TryFrom<RawWebhook> for WebhookSink {
    type Error = String;
    fn try_from(r: RawWebhook) -> Result<Self, String> {
        check_http_url("notify.webhook.url", &r.url)?;
        let secret = SecretRef::pick("secret", r.secret, r.secret_env, r.secret_file)
            .map_err(|m| format!("notify.webhook: {m}"))?;
        Ok(WebhookSink {
            name: r.name,
            url: r.url,
            secret,
            on: r.on,
        })
    }
}

/// One `[[notify.slack]]`: a Slack incoming webhook (its URL is the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawSlack")]
pub struct SlackSink {
    /// Name in reports (default `slack[N]`).
    pub name: Option<String>,
    /// The incoming-webhook URL.
    pub webhook_url: SecretRef,
    /// What to send.
    pub on: Vec<Trigger>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSlack {
    name: Option<String>,
    webhook_url: Option<String>,
    webhook_url_env: Option<String>,
    webhook_url_file: Option<PathBuf>,
    #[serde(default = "default_on")]
    on: Vec<Trigger>,
}

impl TryFrom<RawSlack> for SlackSink {
    type Error = String;
    fn try_from(r: RawSlack) -> Result<Self, String> {
        if let Some(u) = &r.webhook_url {
            check_http_url("notify.slack.webhook_url", u)?;
        }
        let url = SecretRef::pick(
            "webhook_url",
            r.webhook_url,
            r.webhook_url_env,
            r.webhook_url_file,
        )
        .map_err(|m| format!("notify.slack: {m}"))?
        .ok_or("notify.slack: give webhook_url, webhook_url_env or webhook_url_file")?;
        Ok(SlackSink {
            name: r.name,
            webhook_url: url,
            on: r.on,
        })
    }
}

/// One `[[notify.pagerduty]]`: PagerDuty Events API v2.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawPagerDuty")]
pub struct PagerDutySink {
    /// Name in reports (default `pagerduty[N]`).
    pub name: Option<String>,
    /// The integration's routing key.
    pub routing_key: SecretRef,
    /// The Events API endpoint (default [`PAGERDUTY_EVENTS_URL`]).
    pub url: String,
    /// What to send.
    pub on: Vec<Trigger>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPagerDuty {
    name: Option<String>,
    routing_key: Option<String>,
    routing_key_env: Option<String>,
    routing_key_file: Option<PathBuf>,
    url: Option<String>,
    #[serde(default = "default_on")]
    on: Vec<Trigger>,
}

impl TryFrom<RawPagerDuty> for PagerDutySink {
    type Error = String;
    fn try_from(r: RawPagerDuty) -> Result<Self, String> {
        let url = r.url.unwrap_or_else(|| PAGERDUTY_EVENTS_URL.to_string());
        check_http_url("notify.pagerduty.url", &url)?;
        let key = SecretRef::pick(
            "routing_key",
            r.routing_key,
            r.routing_key_env,
            r.routing_key_file,
        )
        .map_err(|m| format!("notify.pagerduty: {m}"))?
        .ok_or("notify.pagerduty: give routing_key, routing_key_env or routing_key_file")?;
        Ok(PagerDutySink {
            name: r.name,
            routing_key: key,
            url,
            on: r.on,
        })
    }
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required; port 587 by default).
    Starttls,
    /// TLS from the first byte (SMTPS, port 465 by default).
    Tls,
    /// No encryption (port 25 by default): only for a relay on the same host or network.
    None,
}

/// One `[[notify.email]]`: e-mail over SMTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawEmail")]
pub struct EmailSink {
    /// Name in reports (default `email[N]`).
    pub name: Option<String>,
    /// SMTP server.
    pub smtp_host: String,
    /// SMTP port (default 587 for starttls, 465 for tls, 25 for none).
    pub smtp_port: u16,
    /// Connection security (default starttls).
    pub tls: SmtpTls,
    /// A PEM file of extra CA certificates to trust (a private CA).
    pub ca_file: Option<PathBuf>,
    /// SMTP user (authentication when set; needs a password).
    pub username: Option<String>,
    /// SMTP password.
    pub password: Option<SecretRef>,
    /// Sender address.
    pub from: String,
    /// Recipients (at least one).
    pub to: Vec<String>,
    /// What to send.
    pub on: Vec<Trigger>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmail {
    name: Option<String>,
    smtp_host: String,
    smtp_port: Option<u16>,
    tls: Option<SmtpTls>,
    ca_file: Option<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    password_env: Option<String>,
    password_file: Option<PathBuf>,
    from: String,
    to: Vec<String>,
    #[serde(default = "default_on")]
    on: Vec<Trigger>,
}

impl TryFrom<RawEmail> for EmailSink {
    type Error = String;
    fn try_from(r: RawEmail) -> Result<Self, String> {
        let tls = r.tls.unwrap_or(SmtpTls::Starttls);
        let password = SecretRef::pick("password", r.password, r.password_env, r.password_file)
            .map_err(|m| format!("notify.email: {m}"))?;
        if r.username.is_some() != password.is_some() {
            return Err("notify.email: username and a password (password, password_env or password_file) go together".into());
        }
        if r.to.is_empty() {
            return Err("notify.email.to: give at least one recipient".into());
        }
        for a in r.to.iter().chain(std::iter::once(&r.from)) {
            a.parse::<lettre::message::Mailbox>()
                .map_err(|e| format!("notify.email: {a:?} is not an e-mail address ({e})"))?;
        }
        let smtp_port = r.smtp_port.unwrap_or(match tls {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        });
        Ok(EmailSink {
            name: r.name,
            smtp_host: r.smtp_host,
            smtp_port,
            tls,
            ca_file: r.ca_file,
            username: r.username,
            password,
            from: r.from,
            to: r.to,
            on: r.on,
        })
    }
}

/// Dotted paths of secrets written inline under `[notify]` that pgkeep-core's generic
/// secret-name check does not see (a Slack webhook URL is a secret by itself). pgkeep-core
/// refuses a file holding any of them unless it is private (0600).
pub fn inline_secret_keys(notify: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(toml::Value::Array(items)) = notify.get("slack") {
        if items
            .iter()
            .any(|i| i.as_table().is_some_and(|t| t.contains_key("webhook_url")))
        {
            out.push("notify.slack.webhook_url".to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NotifyConfig, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            notify: NotifyConfig,
        }
        toml::from_str::<File>(text)
            .map(|f| f.notify)
            .map_err(|e| e.message().to_string())
    }

    #[test]
    fn every_channel_parses_with_defaults() {
        let c = parse(
            r#"
[notify]
dedup_window = "30m"
[[notify.webhook]]
url = "https://hooks.example.com/pgkeep"
[[notify.slack]]
webhook_url_env = "SLACK_URL"
on = ["failure", "recovery", "warning"]
[[notify.pagerduty]]
routing_key_file = "/etc/pgkeep/pd"
[[notify.email]]
smtp_host = "mail.example.com"
from = "pgkeep@example.com"
to = ["dba@example.com"]
"#,
        )
        .unwrap();
        assert_eq!(c.dedup_window(), Duration::from_secs(1800));
        assert_eq!(c.webhook[0].on, vec![Trigger::Failure, Trigger::Recovery]);
        assert!(c.webhook[0].secret.is_none());
        assert_eq!(c.slack[0].on.len(), 3);
        assert_eq!(c.pagerduty[0].url, PAGERDUTY_EVENTS_URL);
        assert_eq!(c.email[0].smtp_port, 587);
        assert_eq!(c.email[0].tls, SmtpTls::Starttls);
    }

    #[test]
    fn bad_values_are_refused_without_echoing_secrets() {
        let cases = [
            ("[[notify.webhook]]\nurl = \"ftp://x\"\n", "notify.webhook.url: must be an http:// or https:// URL"),
            ("[[notify.webhook]]\nurl = \"http://x\"\nsecret = \"s\"\nsecret_env = \"E\"\n", "notify.webhook: give only one of secret, secret_env and secret_file"),
            ("[[notify.webhook]]\nurl = \"http://x\"\non = [\"sometimes\"]\n", "unknown variant `sometimes`"),
            ("[[notify.webhook]]\nurl = \"http://x\"\nuri = 1\n", "unknown field `uri`"),
            ("[[notify.slack]]\n", "notify.slack: give webhook_url, webhook_url_env or webhook_url_file"),
            ("[[notify.pagerduty]]\nrouting_key_env = \"PD\"\nurl = \"nope\"\n", "notify.pagerduty.url: not a URL"),
            ("[notify]\ndedup_window = \"soon\"\n", "\"soon\" is not a duration"),
            ("[[notify.email]]\nsmtp_host = \"h\"\nfrom = \"a@b\"\nto = []\n", "notify.email.to: give at least one recipient"),
            ("[[notify.email]]\nsmtp_host = \"h\"\nfrom = \"a@b\"\nto = [\"c@d\"]\nusername = \"u\"\n", "username and a password"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = parse("[[notify.slack]]\nwebhook_url = \"xoxb CANARY\"\n").unwrap_err();
        assert!(!e.contains("CANARY"), "{e}");
    }

    #[test]
    fn secrets_serialize_as_their_source_only() {
        let c = parse("[[notify.pagerduty]]\nrouting_key = \"CANARY-KEY\"\n[[notify.slack]]\nwebhook_url_env = \"SLACK\"\n").unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("CANARY"), "{json}");
        assert!(
            json.contains("\"inline\"") && json.contains("env:SLACK"),
            "{json}"
        );
        assert!(!format!("{c:?}").contains("CANARY"));
    }

    #[test]
    fn inline_slack_urls_are_secrets() {
        let t: toml::Table = toml::from_str("[[slack]]\nwebhook_url = \"https://x\"\n").unwrap();
        assert_eq!(inline_secret_keys(&t), vec!["notify.slack.webhook_url"]);
        let t: toml::Table = toml::from_str("[[slack]]\nwebhook_url_env = \"X\"\n").unwrap();
        assert!(inline_secret_keys(&t).is_empty());
    }

    #[test]
    fn state_dir_precedence() {
        let c = NotifyConfig::default();
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == n)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            c.state_dir(env(&[("HOME", "/h")])),
            PathBuf::from("/h/.local/state/pgkeep")
        );
        assert_eq!(
            c.state_dir(env(&[("HOME", "/h"), ("XDG_STATE_HOME", "/x")])),
            PathBuf::from("/x/pgkeep")
        );
        let c = NotifyConfig {
            state_dir: Some("/s".into()),
            ..Default::default()
        };
        assert_eq!(
            c.state_dir(env(&[("XDG_STATE_HOME", "/x")])),
            PathBuf::from("/s")
        );
        assert_eq!(
            c.state_dir(env(&[("PGKEEP_NOTIFY_STATE_DIR", "/e")])),
            PathBuf::from("/e")
        );
    }
}
