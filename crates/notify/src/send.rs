//! Delivery to one channel: payloads, HMAC signatures, HTTP and SMTP, timeouts and retries.
//!
//! Error texts are built from the channel's kind and the failure's cause only (reqwest errors
//! without their URL), then scrubbed of every secret value of the channel as a last line of
//! defence: a Slack URL, routing key, HMAC secret or SMTP password never reaches a report,
//! a log line or the state file.

use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde::Serialize;

use crate::config::{
    EmailSink, NotifyConfig, PagerDutySink, SecretValue, SlackSink, SmtpTls, Trigger, WebhookSink,
    DEFAULT_RETRIES, DEFAULT_RETRY_DELAY, DEFAULT_TIMEOUT,
};
use crate::event::{Notice, RunResult};

/// Header with the HMAC-SHA256 signature of a webhook body: `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Pgkeep-Signature";
/// Header with the Unix time (seconds) the signature covers.
pub const TIMESTAMP_HEADER: &str = "X-Pgkeep-Timestamp";
/// Header with the notice's id, the same on every retry.
pub const DELIVERY_HEADER: &str = "X-Pgkeep-Delivery";
/// Header with the trigger (`failure`, `recovery`, ...).
pub const EVENT_HEADER: &str = "X-Pgkeep-Event";

/// The signature of a webhook body: hex HMAC-SHA256 over `"<timestamp>.<body>"` with the
/// shared secret. Signing the timestamp with the body lets a receiver refuse replays (reject
/// timestamps more than a few minutes old).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Which kind of channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// `[[notify.webhook]]`.
    Webhook,
    /// `[[notify.slack]]`.
    Slack,
    /// `[[notify.pagerduty]]`.
    Pagerduty,
    /// `[[notify.email]]`.
    Email,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum SinkRef<'a> {
    Webhook(&'a WebhookSink),
    Slack(&'a SlackSink),
    PagerDuty(&'a PagerDutySink),
    Email(&'a EmailSink),
}

/// One configured channel.
#[derive(Debug, Clone)]
pub(crate) struct Sink<'a> {
    /// `name`, else `<channel>[<index>]`: names pending notices in the state file.
    pub id: String,
    pub channel: Channel,
    pub on: &'a [Trigger],
    pub target: String,
    pub sink: SinkRef<'a>,
}

/// Every channel of the configuration, in file order per kind.
pub(crate) fn sinks(c: &NotifyConfig) -> Vec<Sink<'_>> {
    let id = |name: &Option<String>, ch: &str, i: usize| {
        name.clone().unwrap_or_else(|| format!("{ch}[{i}]"))
    };
    let mut out = Vec::new();
    for (i, s) in c.webhook.iter().enumerate() {
        out.push(Sink {
            id: id(&s.name, "webhook", i),
            channel: Channel::Webhook,
            on: &s.on,
            target: origin(&s.url),
            sink: SinkRef::Webhook(s),
        });
    }
    for (i, s) in c.slack.iter().enumerate() {
        // The URL is the secret: only its host is shown, and only when inline.
        let target = match &s.webhook_url {
            crate::config::SecretRef::Inline(u) => origin(u.expose()),
            other => serde_json::to_value(other)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        };
        out.push(Sink {
            id: id(&s.name, "slack", i),
            channel: Channel::Slack,
            on: &s.on,
            target,
            sink: SinkRef::Slack(s),
        });
    }
    for (i, s) in c.pagerduty.iter().enumerate() {
        out.push(Sink {
            id: id(&s.name, "pagerduty", i),
            channel: Channel::Pagerduty,
            on: &s.on,
            target: origin(&s.url),
            sink: SinkRef::PagerDuty(s),
        });
    }
    for (i, s) in c.email.iter().enumerate() {
        let target = format!(
            "smtp://{}:{} to {}",
            s.smtp_host,
            s.smtp_port,
            s.to.join(", ")
        );
        out.push(Sink {
            id: id(&s.name, "email", i),
            channel: Channel::Email,
            on: &s.on,
            target,
            sink: SinkRef::Email(s),
        });
    }
    out
}

/// `scheme://host[:port]` of a URL: paths and queries may hold tokens.
fn origin(url: &str) -> String {
    reqwest::Url::parse(url)
        .map(|u| u.origin().ascii_serialization())
        .unwrap_or_else(|_| "(invalid URL)".into())
}

/// Why one attempt failed, and whether trying again may help.
#[derive(Debug)]
pub(crate) struct Failure {
    pub message: String,
    pub retryable: bool,
}

impl Failure {
    fn permanent(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            retryable: false,
        }
    }
    fn temporary(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            retryable: true,
        }
    }
}

/// Sends notices with timeouts and retries.
pub(crate) struct Sender {
    http: reqwest::Client,
    timeout: Duration,
    retries: u32,
    retry_delay: Duration,
}

impl Sender {
    pub fn new(c: &NotifyConfig) -> Self {
        let timeout = c.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            // A redirect would carry the body (and its signature) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("pgkeep/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Sender {
            http,
            timeout,
            retries: c.retries.unwrap_or(DEFAULT_RETRIES),
            retry_delay: c.retry_delay.unwrap_or(DEFAULT_RETRY_DELAY),
        }
    }

    /// Delivers with retries and exponential backoff. Returns the attempts made, and the
    /// last failure (scrubbed of secrets) when every attempt failed.
    pub async fn deliver(&self, sink: &Sink<'_>, notice: &Notice) -> (u32, Option<Failure>) {
        let mut delay = self.retry_delay;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (result, secrets) = self.attempt(sink, notice).await;
            match result {
                Ok(()) => return (attempts, None),
                Err(mut f) => {
                    f.message = scrub(&f.message, &secrets);
                    if !f.retryable || attempts > self.retries {
                        return (attempts, Some(f));
                    }
                    tracing::info!(
                        "notification to {} failed (attempt {attempts}): {}; retrying in {delay:?}",
                        sink.id,
                        f.message
                    );
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }

    /// One attempt; also returns the secrets it used, for scrubbing.
    async fn attempt(
        &self,
        sink: &Sink<'_>,
        n: &Notice,
    ) -> (Result<(), Failure>, Vec<SecretValue>) {
        match sink.sink {
            SinkRef::Webhook(w) => {
                let secret = match w.secret.as_ref().map(|s| s.resolve()).transpose() {
                    Ok(s) => s,
                    Err(m) => return (Err(Failure::permanent(format!("secret: {m}"))), vec![]),
                };
                let r = self.webhook(&w.url, secret.as_ref(), n).await;
                (r, secret.into_iter().collect())
            }
            SinkRef::Slack(s) => match s.webhook_url.resolve() {
                Ok(url) => (
                    self.post_json(url.expose(), &slack_json(n), &[]).await,
                    vec![url],
                ),
                Err(m) => (Err(Failure::permanent(format!("webhook_url: {m}"))), vec![]),
            },
            SinkRef::PagerDuty(p) => match p.routing_key.resolve() {
                Ok(key) => (self.pagerduty(p, &key, n).await, vec![key]),
                Err(m) => (Err(Failure::permanent(format!("routing_key: {m}"))), vec![]),
            },
            SinkRef::Email(e) => {
                let password = match e.password.as_ref().map(|s| s.resolve()).transpose() {
                    Ok(p) => p,
                    Err(m) => return (Err(Failure::permanent(format!("password: {m}"))), vec![]),
                };
                let r = self.email(e, password.as_ref(), n).await;
                (r, password.into_iter().collect())
            }
        }
    }

    async fn webhook(
        &self,
        url: &str,
        secret: Option<&SecretValue>,
        n: &Notice,
    ) -> Result<(), Failure> {
        let body =
            serde_json::to_vec(&n.webhook_json()).map_err(|e| Failure::permanent(e.to_string()))?;
        let ts = chrono::Utc::now().timestamp();
        let mut headers = vec![
            (TIMESTAMP_HEADER, ts.to_string()),
            (DELIVERY_HEADER, n.id.clone()),
            (EVENT_HEADER, n.trigger.name().to_string()),
        ];
        if let Some(s) = secret {
            headers.push((
                SIGNATURE_HEADER,
                format!("sha256={}", sign(s.expose().as_bytes(), ts, &body)),
            ));
        }
        self.post(url, body, &headers).await
    }

    async fn pagerduty(
        &self,
        p: &PagerDutySink,
        key: &SecretValue,
        n: &Notice,
    ) -> Result<(), Failure> {
        let mut bodies = vec![pagerduty_json(key.expose(), n)];
        if n.trigger == Trigger::Test {
            // A test page is resolved at once: it proves the route without leaving an incident.
            let mut resolve = bodies[0].clone();
            resolve["event_action"] = "resolve".into();
            resolve.as_object_mut().map(|o| o.remove("payload"));
            bodies.push(resolve);
        }
        for b in bodies {
            self.post_json(&p.url, &b, &[]).await?;
        }
        Ok(())
    }

    async fn post_json(
        &self,
        url: &str,
        body: &serde_json::Value,
        headers: &[(&str, String)],
    ) -> Result<(), Failure> {
        let bytes = serde_json::to_vec(body).map_err(|e| Failure::permanent(e.to_string()))?;
        self.post(url, bytes, headers).await
    }

    async fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        headers: &[(&str, String)],
    ) -> Result<(), Failure> {
        let mut req = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::temporary(http_error(e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let msg = format!("the receiver answered HTTP {status}");
        // 408 and 429 and 5xx may pass later; other answers will not change by themselves.
        if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
            Err(Failure::temporary(msg))
        } else {
            Err(Failure::permanent(msg))
        }
    }

    async fn email(
        &self,
        e: &EmailSink,
        password: Option<&SecretValue>,
        n: &Notice,
    ) -> Result<(), Failure> {
        use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
        use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
        let message = email_message(e, n).map_err(Failure::permanent)?;
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&e.smtp_host)
            .port(e.smtp_port)
            .timeout(Some(self.timeout));
        if e.tls != SmtpTls::None {
            let mut params = TlsParameters::builder(e.smtp_host.clone());
            if let Some(ca) = &e.ca_file {
                let pem = std::fs::read(ca).map_err(|err| {
                    Failure::permanent(format!("cannot read ca_file {}: {err}", ca.display()))
                })?;
                let cert = Certificate::from_pem(&pem).map_err(|err| {
                    Failure::permanent(format!("ca_file {}: {err}", ca.display()))
                })?;
                params = params.add_root_certificate(cert);
            }
            let params = params
                .build_rustls()
                .map_err(|err| Failure::permanent(format!("TLS setup: {err}")))?;
            builder = builder.tls(match e.tls {
                SmtpTls::Tls => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        if let (Some(user), Some(pw)) = (&e.username, password) {
            builder =
                builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
                    user.clone(),
                    pw.expose().to_string(),
                ));
        }
        // lettre's timeout covers connecting, not every reply: bound the whole exchange.
        let sent = tokio::time::timeout(self.timeout, builder.build().send(message)).await;
        match sent {
            Err(_) => Err(Failure::temporary(format!(
                "SMTP: no answer within {}",
                humantime::format_duration(self.timeout)
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => {
                let text = chain(&err);
                // Permanent SMTP answers (5xx: bad recipient, auth refused) will not pass later.
                if err.is_permanent() {
                    Err(Failure::permanent(format!("SMTP: {text}")))
                } else {
                    Err(Failure::temporary(format!("SMTP: {text}")))
                }
            }
        }
    }
}

fn email_message(e: &EmailSink, n: &Notice) -> Result<lettre::Message, String> {
    let mut b = lettre::Message::builder()
        .from(e.from.parse().map_err(|err| format!("from: {err}"))?)
        .subject(n.summary())
        .header(lettre::message::header::ContentType::TEXT_PLAIN);
    for to in &e.to {
        b = b.to(to.parse().map_err(|err| format!("to {to:?}: {err}"))?);
    }
    b.body(n.text()).map_err(|err| err.to_string())
}

/// The Slack incoming-webhook payload: `text` for notifications and old clients, blocks for
/// the layout.
pub(crate) fn slack_json(n: &Notice) -> serde_json::Value {
    let icon = match n.trigger {
        Trigger::Failure => ":red_circle:",
        Trigger::Recovery | Trigger::Success => ":large_green_circle:",
        Trigger::Warning => ":large_yellow_circle:",
        Trigger::Test => ":white_check_mark:",
    };
    serde_json::json!({
        "text": format!("{icon} {}", n.summary()),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": truncate(&n.summary(), 150)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": truncate(&format!("```{}```", n.text()), 3000)}},
        ],
    })
}

/// The PagerDuty Events API v2 body: `trigger` for failures and warnings (and tests),
/// `resolve` for recoveries and successes, one incident per job through the dedup key.
pub(crate) fn pagerduty_json(routing_key: &str, n: &Notice) -> serde_json::Value {
    let e = &n.event;
    let (action, severity) = match n.trigger {
        Trigger::Failure => ("trigger", "critical"),
        Trigger::Warning => ("trigger", "warning"),
        Trigger::Test => ("trigger", "info"),
        Trigger::Recovery | Trigger::Success => ("resolve", "info"),
    };
    let dedup_key = if n.trigger == Trigger::Test {
        format!("pgkeep/notify-test/{}", e.host)
    } else {
        n.dedup_key()
    };
    let mut body = serde_json::json!({
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key,
        "client": "pgkeep",
    });
    if action == "trigger" {
        body["payload"] = serde_json::json!({
            "summary": truncate(&n.summary(), 1024),
            "source": e.host,
            "severity": severity,
            "timestamp": e.ended,
            "component": e.cluster,
            "group": e.kind,
            "class": if e.result == RunResult::Interrupted { "interrupted" } else { n.trigger.name() },
            "custom_details": n.webhook_json(),
        });
    }
    body
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
    t.push('…');
    t
}

fn http_error(e: reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    format!("{what}: {}", chain(&e))
}

/// An error and its sources, joined with `: ` (repeated texts skipped).
fn chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// Replaces every secret value (at least 4 characters long) in `text` by `***`.
pub(crate) fn scrub(text: &str, secrets: &[SecretValue]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.expose().len() >= 4 {
            out = out.replace(s.expose(), "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 shape, with our "<ts>." prefix folded into the data.
        let sig = sign(b"Jefe", 0, b"what do ya want for nothing?");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"0.what do ya want for nothing?");
        assert_eq!(sig, hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig.len(), 64);
    }

    #[test]
    fn scrub_masks_secret_values_only() {
        let s = [SecretValue::new("hunter22"), SecretValue::new("ab")];
        assert_eq!(scrub("auth hunter22 failed ab", &s), "auth *** failed ab");
    }

    #[test]
    fn origin_drops_paths_and_queries() {
        assert_eq!(
            origin("https://hooks.slack.com/services/T/B/XYZ?t=1"),
            "https://hooks.slack.com"
        );
        assert_eq!(origin("http://127.0.0.1:9/x"), "http://127.0.0.1:9");
    }
}
