//! `pgkeep generate systemd|cron|k8s`: the set-up files for running pgkeep unattended,
//! written from the loaded configuration file.
//!
//! Pure functions: [`generate`] takes the [`ConfigFile`] and [`GenerateOptions`] and returns
//! the files as (name, contents); [`write_files`] puts them in a directory. Jobs run as the
//! same command lines as the daemon's scheduler runs them
//! (`pgkeep --config FILE --cluster NAME <job> <options>`, see
//! [`ScheduleConfig::command_args`](pgkeep_core::schedule::ScheduleConfig::command_args)).
//!
//! - systemd: one `pgkeep.service` running the daemon, or a `.service` + `.timer` per
//!   `[[schedule]]` (`OnCalendar=` converted from the cron expression, see
//!   [`cron_to_oncalendar`]); hardened; secrets from an `EnvironmentFile=`, never inline.
//! - cron: an `/etc/cron.d` file, one line per schedule (see [`cron_to_five_fields`]), with
//!   `flock -n` against overlapping runs.
//! - k8s: a ConfigMap with the configuration file, Secret references for the passphrase and
//!   credentials, PersistentVolumeClaims for local paths, and a Deployment running the daemon
//!   (with a Service when it listens) or a CronJob per schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value};

use crate::scheduler::{jobs_of, Job};
use pgkeep_core::config::ConfigFile;
use pgkeep_core::error::{Error, Result};
use pgkeep_core::schedule::{CronSchedule, MissedRuns};
use pgkeep_core::Report;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// systemd units.
    Systemd,
    /// An /etc/cron.d file.
    Cron,
    /// Kubernetes manifests.
    K8s,
}

/// How the jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One long-running `pgkeep daemon` that runs every schedule.
    Daemon,
    /// The platform's own scheduler runs each schedule (timers, cron, CronJobs).
    Jobs,
}

impl Mode {
    /// The default of a target: the daemon for systemd and Kubernetes, jobs for cron.
    pub fn default_for(target: Target) -> Mode {
        match target {
            Target::Cron => Mode::Jobs,
            Target::Systemd | Target::K8s => Mode::Daemon,
        }
    }
}

/// Options of `pgkeep generate`.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// What to generate.
    pub target: Target,
    /// Daemon or jobs (default: [`Mode::default_for`]).
    pub mode: Mode,
    /// The `pgkeep` executable the units and cron lines run (absolute).
    pub binary: PathBuf,
    /// The configuration file's absolute path on the host (systemd, cron).
    pub config_path: PathBuf,
    /// The configuration file's text (k8s: the ConfigMap).
    pub config_text: String,
    /// The container image (k8s).
    pub image: String,
    /// The user the jobs run as (systemd `User=`, the cron.d user field).
    pub user: String,
}

/// Default of `--image`.
pub const DEFAULT_IMAGE: &str = "pgkeep:latest";
/// Default of `--user`.
pub const DEFAULT_USER: &str = "postgres";
/// The environment file the systemd units read secrets from.
pub const ENV_FILE: &str = "/etc/pgkeep/pgkeep.env";
/// Where the Kubernetes pods mount the configuration file.
pub const K8S_CONFIG_PATH: &str = "/etc/pgkeep/pgkeep.toml";
/// The Secret the Kubernetes pods take their environment (passphrase, credentials) from.
pub const K8S_SECRET: &str = "pgkeep-secrets";
/// Added to `[daemon] stop_timeout` for systemd's `TimeoutStopSec=`: the daemon's grace
/// after interrupting running jobs (30 s), its final wait (5 s) and a margin.
const STOP_MARGIN_SECS: u64 = 60;

/// One generated file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GeneratedFile {
    /// File name (no directory).
    pub name: String,
    /// Its contents.
    pub contents: String,
}

impl GeneratedFile {
    fn new(name: impl Into<String>, contents: impl Into<String>) -> Self {
        GeneratedFile {
            name: name.into(),
            contents: contents.into(),
        }
    }
}

/// The files for `opts.target` and `opts.mode`.
pub fn generate(file: &ConfigFile, opts: &GenerateOptions) -> Result<Vec<GeneratedFile>> {
    let at = file.path.display().to_string();
    let jobs = jobs_of(file).map_err(|m| Error::usage(format!("{at}: {m}")))?;
    if opts.mode == Mode::Jobs && jobs.is_empty() {
        return Err(Error::usage_hint(
            format!("{at}: no [[schedule]] to generate jobs for"),
            "add [[schedule]] tables (job, cron, cluster, ...)",
        ));
    }
    if opts.mode == Mode::Daemon && jobs.is_empty() && file.daemon.listen.is_none() {
        return Err(Error::usage_hint(
            format!("{at}: nothing for the daemon to do: no [[schedule]] and no [daemon] listen"),
            "add [[schedule]] tables or [daemon] listen = \"127.0.0.1:9187\"",
        ));
    }
    match (opts.target, opts.mode) {
        (Target::Systemd, Mode::Daemon) => Ok(vec![systemd_daemon(file, opts)]),
        (Target::Systemd, Mode::Jobs) => systemd_jobs(file, &jobs, opts),
        (Target::Cron, Mode::Daemon) => Err(Error::usage_hint(
            "generate cron: cron runs jobs only, not the daemon",
            "use --mode jobs (the default for cron), or generate systemd or k8s for the daemon",
        )),
        (Target::Cron, Mode::Jobs) => cron_file(&jobs, opts).map(|f| vec![f]),
        (Target::K8s, mode) => k8s(file, &jobs, mode, opts),
    }
}

// ---------------------------------------------------------------------------------------
// Cron expressions.

struct FieldSpec {
    what: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    name_base: u32,
}

const SECOND: FieldSpec = FieldSpec {
    what: "second",
    min: 0,
    max: 59,
    names: &[],
    name_base: 0,
};
const MINUTE: FieldSpec = FieldSpec {
    what: "minute",
    min: 0,
    max: 59,
    names: &[],
    name_base: 0,
};
const HOUR: FieldSpec = FieldSpec {
    what: "hour",
    min: 0,
    max: 23,
    names: &[],
    name_base: 0,
};
const DAY: FieldSpec = FieldSpec {
    what: "day of month",
    min: 1,
    max: 31,
    names: &[],
    name_base: 0,
};
const MONTH: FieldSpec = FieldSpec {
    what: "month",
    min: 1,
    max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
    name_base: 1,
};
const WEEKDAY: FieldSpec = FieldSpec {
    what: "day of week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    name_base: 0,
};

/// A cron expression as sets of values (day of week 0-6, Sunday 0).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CronSets {
    second: BTreeSet<u32>,
    minute: BTreeSet<u32>,
    hour: BTreeSet<u32>,
    day: BTreeSet<u32>,
    month: BTreeSet<u32>,
    weekday: BTreeSet<u32>,
    /// The day of month and day of week as the daemon reads them (croner): when neither
    /// field is `*` (nor the day of week starts with `+`), a day matches when either does.
    either_day: bool,
}

impl CronSets {
    /// The days as "both must match" sets, or `None` when either matching day runs and
    /// neither field covers every day (inexpressible as an intersection).
    fn and_days(&self) -> Option<(BTreeSet<u32>, BTreeSet<u32>)> {
        if !self.either_day {
            return Some((self.day.clone(), self.weekday.clone()));
        }
        if is_full(&self.day, &DAY) || is_full(&self.weekday, &WEEKDAY) {
            return Some((full(&DAY), full(&WEEKDAY)));
        }
        None
    }
}

fn full(spec: &FieldSpec) -> BTreeSet<u32> {
    let max = if spec.what == WEEKDAY.what {
        6
    } else {
        spec.max
    };
    (spec.min..=max).collect()
}

fn is_full(set: &BTreeSet<u32>, spec: &FieldSpec) -> bool {
    *set == full(spec)
}

fn field_value(text: &str, spec: &FieldSpec) -> std::result::Result<u32, String> {
    if let Ok(n) = text.parse::<u32>() {
        if n < spec.min || n > spec.max {
            return Err(format!(
                "{} {n} is out of range {}-{}",
                spec.what, spec.min, spec.max
            ));
        }
        return Ok(n);
    }
    spec.names
        .iter()
        .position(|n| n.eq_ignore_ascii_case(text))
        .map(|i| i as u32 + spec.name_base)
        .ok_or_else(|| format!("{} {text:?} is not a number or a name", spec.what))
}

fn expand_field(text: &str, spec: &FieldSpec) -> std::result::Result<BTreeSet<u32>, String> {
    let mut set = BTreeSet::new();
    if text == "?" && (spec.what == DAY.what || spec.what == WEEKDAY.what) {
        return Ok(full(spec));
    }
    for item in text.split(',') {
        if item
            .chars()
            .any(|c| matches!(c, 'L' | 'l' | 'W' | 'w' | '#'))
            && spec.names.iter().all(|n| !n.eq_ignore_ascii_case(item))
        {
            return Err(format!(
                "{} {item:?}: L, W and # (last, nearest weekday, nth weekday) cannot be converted",
                spec.what
            ));
        }
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let s: u32 = s
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{} {item:?}: bad step", spec.what))?;
                (r, Some(s))
            }
            None => (item, None),
        };
        let (lo, hi) = if range == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = range.split_once('-') {
            (field_value(a, spec)?, field_value(b, spec)?)
        } else {
            let a = field_value(range, spec)?;
            (a, if step.is_some() { spec.max } else { a })
        };
        if lo > hi {
            return Err(format!(
                "{} {item:?}: a range that wraps around cannot be converted; write it as two ranges",
                spec.what
            ));
        }
        for v in (lo..=hi).step_by(step.unwrap_or(1) as usize) {
            // Sunday is 0 or 7.
            set.insert(if spec.what == WEEKDAY.what && v == 7 {
                0
            } else {
                v
            });
        }
    }
    Ok(set)
}

/// Parses a cron expression as the daemon does (five fields, or six with a leading seconds
/// field, or an `@` macro) into sets of values.
fn parse_cron(expr: &str) -> std::result::Result<(CronSets, bool), String> {
    // The daemon's own parser first: what it refuses is refused here with its message.
    expr.parse::<CronSchedule>()?;
    let expr = expr.trim();
    let expanded = match expr.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
        "@monthly" => "0 0 1 * *".to_string(),
        "@weekly" => "0 0 * * 0".to_string(),
        "@daily" | "@midnight" => "0 0 * * *".to_string(),
        "@hourly" => "0 * * * *".to_string(),
        m if m.starts_with('@') => {
            return Err(format!("cron {expr:?}: {m} cannot be converted"));
        }
        _ => expr.to_string(),
    };
    let fields: Vec<&str> = expanded.split_whitespace().collect();
    let (has_seconds, f) = match fields.len() {
        5 => (false, [&["0"][..], &fields[..]].concat()),
        6 => (true, fields.clone()),
        n => {
            return Err(format!(
                "cron {expr:?}: {n} fields; give five (minute hour day month weekday) or six with a leading seconds field"
            ))
        }
    };
    let ctx = |e: String| format!("cron {expr:?}: {e}");
    let (and_prefix, weekday) = match f[5].strip_prefix('+') {
        Some(w) => (true, w),
        None => (false, f[5]),
    };
    let star = |t: &str| t == "*" || t == "?";
    Ok((
        CronSets {
            second: expand_field(f[0], &SECOND).map_err(ctx)?,
            minute: expand_field(f[1], &MINUTE).map_err(ctx)?,
            hour: expand_field(f[2], &HOUR).map_err(ctx)?,
            day: expand_field(f[3], &DAY).map_err(ctx)?,
            month: expand_field(f[4], &MONTH).map_err(ctx)?,
            weekday: expand_field(weekday, &WEEKDAY).map_err(ctx)?,
            either_day: !and_prefix && !star(f[3]) && !star(weekday),
        },
        has_seconds,
    ))
}

/// `Some((first, step))` when `set` is (at least three values) first, first+step, ... up to the end of the range.
fn progression(set: &BTreeSet<u32>, max: u32) -> Option<(u32, u32)> {
    let v: Vec<u32> = set.iter().copied().collect();
    if v.len() < 3 {
        return None;
    }
    let step = v[1] - v[0];
    if step < 2 || v.windows(2).any(|w| w[1] - w[0] != step) || v[v.len() - 1] + step <= max {
        return None;
    }
    Some((v[0], step))
}

/// Runs of consecutive values: (first, last).
fn runs(v: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &x in v {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == x => *last = x,
            _ => out.push((x, x)),
        }
    }
    out
}

fn systemd_component(set: &BTreeSet<u32>, spec: &FieldSpec) -> String {
    if is_full(set, spec) {
        return "*".into();
    }
    if let Some((first, step)) = progression(set, spec.max) {
        return format!("{first:02}/{step}");
    }
    let v: Vec<u32> = set.iter().copied().collect();
    runs(&v)
        .into_iter()
        .flat_map(|(a, b)| match b - a {
            0 => vec![format!("{a:02}")],
            1 => vec![format!("{a:02}"), format!("{b:02}")],
            _ => vec![format!("{a:02}..{b:02}")],
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn systemd_weekdays(set: &BTreeSet<u32>) -> String {
    const NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    // Monday first, as systemd orders them.
    let v: Vec<u32> = set
        .iter()
        .map(|d| (d + 6) % 7)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    runs(&v)
        .into_iter()
        .flat_map(|(a, b)| match b - a {
            0 => vec![NAMES[a as usize].to_string()],
            1 => vec![NAMES[a as usize].to_string(), NAMES[b as usize].to_string()],
            _ => vec![format!("{}..{}", NAMES[a as usize], NAMES[b as usize])],
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A cron expression of a `[[schedule]]` as a systemd `OnCalendar=` value (in UTC, as the
/// daemon reads cron): numbers, lists, ranges, steps, `*`, the `@` macros and the optional
/// seconds field. Refused: `L`, `W`, `#`, ranges that wrap around, and a day of month and a
/// day of week both restricted (cron runs on either, systemd only on both).
pub fn cron_to_oncalendar(expr: &str) -> std::result::Result<String, String> {
    let (c, _) = parse_cron(expr)?;
    let Some((day, weekdays)) = c.and_days() else {
        return Err(format!(
            "cron {expr:?}: both the day of month and the day of week are restricted, which cron reads as either and systemd as both; split it into two [[schedule]] entries (or prefix the day of week with + for both)"
        ));
    };
    let weekday = if is_full(&weekdays, &WEEKDAY) {
        String::new()
    } else {
        format!("{} ", systemd_weekdays(&weekdays))
    };
    Ok(format!(
        "{weekday}*-{}-{} {}:{}:{} UTC",
        systemd_component(&c.month, &MONTH),
        systemd_component(&day, &DAY),
        systemd_component(&c.hour, &HOUR),
        systemd_component(&c.minute, &MINUTE),
        systemd_component(&c.second, &SECOND),
    ))
}

fn cron_component(set: &BTreeSet<u32>, spec: &FieldSpec, no_star: bool) -> String {
    let max = if spec.what == WEEKDAY.what {
        6
    } else {
        spec.max
    };
    if is_full(set, spec) {
        return if no_star {
            format!("{}-{max}", spec.min)
        } else {
            "*".into()
        };
    }
    if let Some((first, step)) = progression(set, max) {
        return if first == spec.min && !no_star {
            format!("*/{step}")
        } else {
            format!("{first}-{max}/{step}")
        };
    }
    let v: Vec<u32> = set.iter().copied().collect();
    runs(&v)
        .into_iter()
        .flat_map(|(a, b)| match b - a {
            0 => vec![a.to_string()],
            1 => vec![a.to_string(), b.to_string()],
            _ => vec![format!("{a}-{b}")],
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A cron expression of a `[[schedule]]` in the five fields of cron(8) (minute hour day
/// month weekday), normalised (numbers, no names or macros). A seconds field other than 0
/// cannot be expressed and is refused.
pub fn cron_to_five_fields(expr: &str) -> std::result::Result<String, String> {
    let (c, _) = parse_cron(expr)?;
    if c.second != BTreeSet::from([0]) {
        return Err(format!(
            "cron {expr:?}: runs at seconds other than 0, which cron(8) cannot express (it runs at most once a minute, on the minute); use generate systemd or the daemon, or a seconds field of 0"
        ));
    }
    // cron(8) runs on either day when neither day field starts with `*`, else on both.
    let (either, day, weekday) = match c.and_days() {
        // Either: spell steps as ranges so that neither field starts with `*`.
        None => (true, c.day.clone(), c.weekday.clone()),
        Some((d, w)) if is_full(&d, &DAY) || is_full(&w, &WEEKDAY) => (false, d, w),
        Some(_) => {
            return Err(format!(
                "cron {expr:?}: runs only on days matching both the day of month and the day of week (+), which cron(8) cannot express; use generate systemd or the daemon"
            ))
        }
    };
    Ok(format!(
        "{} {} {} {} {}",
        cron_component(&c.minute, &MINUTE, false),
        cron_component(&c.hour, &HOUR, false),
        cron_component(&day, &DAY, either),
        cron_component(&c.month, &MONTH, false),
        cron_component(&weekday, &WEEKDAY, either),
    ))
}

// ---------------------------------------------------------------------------------------
// Quoting and names.

/// One argument of `ExecStart=`: `%` and `$` escaped, quoted when needed.
fn systemd_arg(a: &str) -> String {
    let escaped = a.replace('%', "%%").replace('$', "$$");
    if !escaped.is_empty()
        && !escaped
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';'))
    {
        return escaped;
    }
    format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A path in a unit file setting (`ReadWritePaths=` and the like).
fn systemd_path(p: &Path) -> String {
    systemd_arg(&p.display().to_string())
}

/// One argument of a shell command line (cron), with cron's `%` escaped.
fn shell_arg(a: &str) -> String {
    let quoted = if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=@,+-".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    };
    quoted.replace('%', "\\%")
}

/// A name made of `[a-z0-9-]` (Kubernetes), or with `_` and `.` too (systemd, cron lock
/// files).
fn slug(name: &str, k8s: bool) -> String {
    let mut out = String::new();
    for c in name.chars() {
        let c = if k8s { c.to_ascii_lowercase() } else { c };
        let keep = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || c == '-'
            || (!k8s && (c.is_ascii_uppercase() || c == '_' || c == '.'));
        let c = if keep { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    let mut out = out.trim_matches('-').to_string();
    if k8s && out.len() > 44 {
        out.truncate(44);
        out = out.trim_end_matches('-').to_string();
    }
    if out.is_empty() {
        out.push_str("job");
    }
    out
}

/// `slug` of each job's name, refusing two that come out the same.
fn job_slugs(jobs: &[Job], k8s: bool) -> Result<Vec<String>> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    let mut out = Vec::new();
    for j in jobs {
        let s = slug(&j.name, k8s);
        if let Some(other) = seen.insert(s.clone(), &j.name) {
            return Err(Error::usage_hint(
                format!(
                    "the schedules {other:?} and {:?} both become {s:?} as {} names",
                    j.name,
                    if k8s { "Kubernetes" } else { "file" }
                ),
                "give one of them another name = \"...\" in its [[schedule]]",
            ));
        }
        out.push(s);
    }
    Ok(out)
}

/// The job's command line after the executable.
fn job_args(job: &Job, config: &Path) -> Vec<String> {
    let mut a = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--cluster".to_string(),
        job.cluster.clone(),
    ];
    a.extend(job.config.command_args());
    a
}

/// A repository URL that is a local directory: its path.
fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(p) = url.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    (!url.contains("://")).then(|| PathBuf::from(url))
}

/// The directories the jobs write to on this host: local repositories, the spool, state
/// and drill scratch directories (those configured).
fn writable_paths(file: &ConfigFile) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = file
        .repositories
        .iter()
        .filter_map(|r| local_path(&r.url))
        .collect();
    out.extend(file.options.spool_dir.clone());
    out.extend(file.daemon.state_dir.clone());
    out.extend(file.notify.state_dir.clone());
    out.extend(file.drill.scratch_dir.clone());
    let mut seen = BTreeSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

// ---------------------------------------------------------------------------------------
// systemd.

fn stop_timeout_secs(file: &ConfigFile) -> u64 {
    file.daemon
        .stop_timeout
        .and_then(|l| l.duration())
        .unwrap_or(crate::DEFAULT_STOP_TIMEOUT)
        .as_secs()
}

/// `[Service]` lines shared by the daemon and the job services: user, environment,
/// sandboxing.
fn systemd_service_common(file: &ConfigFile, opts: &GenerateOptions) -> String {
    let mut s = String::new();
    let w = |s: &mut String, line: String| {
        s.push_str(&line);
        s.push('\n');
    };
    w(&mut s, format!("User={}", opts.user));
    w(&mut s, format!("Group={}", opts.user));
    w(
        &mut s,
        "# Secrets (PGKEEP_PASSPHRASE, PGPASSWORD, AWS_SECRET_ACCESS_KEY, ...) come from this\n\
         # file (mode 0600, owned by root), never from this unit. Or use LoadCredential= and\n\
         # PGKEEP_PASSPHRASE_FILE=%d/passphrase."
            .into(),
    );
    w(&mut s, format!("EnvironmentFile=-{ENV_FILE}"));
    w(
        &mut s,
        "# pgkeep's own state (notification state, restore speed log) lives in /var/lib/pgkeep-state."
            .into(),
    );
    w(&mut s, "StateDirectory=pgkeep-state".into());
    w(&mut s, "StateDirectoryMode=0700".into());
    w(&mut s, "Environment=XDG_STATE_HOME=%S/pgkeep-state".into());
    w(&mut s, "UMask=0077".into());
    w(&mut s, "# Hardening.".into());
    for line in [
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "PrivateDevices=true",
        "ProtectKernelTunables=true",
        "ProtectKernelModules=true",
        "ProtectKernelLogs=true",
        "ProtectControlGroups=true",
        "ProtectClock=true",
        "ProtectHostname=true",
        "RestrictSUIDSGID=true",
        "RestrictRealtime=true",
        "RestrictNamespaces=true",
        "LockPersonality=true",
        "SystemCallArchitectures=native",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
    ] {
        w(&mut s, line.into());
    }
    let mut read_paths: Vec<PathBuf> = vec![opts.config_path.clone(), opts.binary.clone()];
    read_paths.extend(
        file.repositories
            .iter()
            .filter_map(|r| r.passphrase_file.clone()),
    );
    let writable = writable_paths(file);
    let under_home = read_paths
        .iter()
        .chain(&writable)
        .any(|p| p.starts_with("/home") || p.starts_with("/root") || p.starts_with("/run/user"));
    if read_paths
        .iter()
        .chain(&writable)
        .any(|p| p.starts_with("/tmp") || p.starts_with("/var/tmp"))
    {
        w(
            &mut s,
            "# Not PrivateTmp: a file or directory of the configuration is under /tmp or /var/tmp."
                .into(),
        );
    } else {
        w(&mut s, "PrivateTmp=true".into());
    }
    w(
        &mut s,
        format!(
            "ProtectHome={}",
            if under_home { "read-only" } else { "true" }
        ),
    );
    if !writable.is_empty() {
        w(
            &mut s,
            "# Local repositories, spool, state and scratch directories of the configuration."
                .into(),
        );
        w(
            &mut s,
            format!(
                "ReadWritePaths={}",
                writable
                    .iter()
                    .map(|p| systemd_path(p))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
    }
    s
}

fn systemd_unit_head(description: &str) -> String {
    format!(
        "# Generated by `pgkeep generate systemd`.\n\
         [Unit]\n\
         Description={}\n\
         Wants=network-online.target\n\
         After=network-online.target postgresql.service\n",
        description.replace('%', "%%")
    )
}

fn systemd_daemon(file: &ConfigFile, opts: &GenerateOptions) -> GeneratedFile {
    let exec = [
        opts.binary.display().to_string(),
        "--config".into(),
        opts.config_path.display().to_string(),
        "daemon".into(),
    ]
    .iter()
    .map(|a| systemd_arg(a))
    .collect::<Vec<_>>()
    .join(" ");
    let stop = stop_timeout_secs(file);
    let mut s = systemd_unit_head("pgkeep daemon: scheduled backups, dumps and checks");
    s.push_str("\n[Service]\nType=simple\n");
    s.push_str(&format!("ExecStart={exec}\n"));
    s.push_str("ExecReload=/bin/kill -HUP $MAINPID\n");
    s.push_str(&format!(
        "# SIGTERM to the daemon only: it lets running jobs end ([daemon] stop_timeout = {stop} s),\n\
         # then interrupts them cleanly; the rest of the group is killed only after this.\n\
         KillMode=mixed\n\
         TimeoutStopSec={}s\n",
        stop + STOP_MARGIN_SECS
    ));
    s.push_str("Restart=on-failure\nRestartSec=10s\n");
    s.push_str(&systemd_service_common(file, opts));
    s.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    GeneratedFile::new("pgkeep.service", s)
}

fn systemd_jobs(
    file: &ConfigFile,
    jobs: &[Job],
    opts: &GenerateOptions,
) -> Result<Vec<GeneratedFile>> {
    let slugs = job_slugs(jobs, false)?;
    let mut out = Vec::new();
    for (job, slug) in jobs.iter().zip(slugs) {
        let calendar = cron_to_oncalendar(&job.config.cron).map_err(|m| {
            Error::usage_hint(
                format!("schedule {}: {m}", job.name),
                "change its cron, or run it with the daemon (--mode daemon)",
            )
        })?;
        let unit = format!("pgkeep-{slug}");
        let mut args = vec![opts.binary.display().to_string()];
        args.extend(job_args(job, &opts.config_path));
        let exec = args
            .iter()
            .map(|a| systemd_arg(a))
            .collect::<Vec<_>>()
            .join(" ");
        let mut s = systemd_unit_head(&format!("pgkeep {}", job.name));
        s.push_str("\n[Service]\nType=oneshot\n");
        s.push_str(&format!("ExecStart={exec}\n"));
        s.push_str(
            "# Exit 3: done with warnings (pgkeep notifies them); not a failed unit.\n\
             SuccessExitStatus=3\n\
             # Backups take as long as they take; SIGTERM interrupts them cleanly (exit 130).\n\
             TimeoutStartSec=infinity\n",
        );
        s.push_str(&systemd_service_common(file, opts));
        out.push(GeneratedFile::new(format!("{unit}.service"), s));

        let mut t = format!(
            "# Generated by `pgkeep generate systemd --mode jobs`.\n\
             # [[schedule]] {}: cron {:?} (UTC).\n\
             [Unit]\n\
             Description=pgkeep {} ({})\n\
             \n\
             [Timer]\n\
             OnCalendar={calendar}\n\
             Unit={unit}.service\n",
            job.name,
            job.config.cron,
            job.name.replace('%', "%%"),
            job.config.cron
        );
        if job.missed == MissedRuns::RunOnce {
            t.push_str("# Missed runs (machine off): run once at start-up.\nPersistent=true\n");
        }
        if let Some(j) = job.config.jitter.and_then(|l| l.duration()) {
            t.push_str(&format!("RandomizedDelaySec={}s\n", j.as_secs().max(1)));
        }
        if parse_cron(&job.config.cron)
            .map(|(_, secs)| secs)
            .unwrap_or(false)
        {
            t.push_str("AccuracySec=1s\n");
        }
        t.push_str("\n[Install]\nWantedBy=timers.target\n");
        out.push(GeneratedFile::new(format!("{unit}.timer"), t));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// cron.

fn cron_file(jobs: &[Job], opts: &GenerateOptions) -> Result<GeneratedFile> {
    let slugs = job_slugs(jobs, false)?;
    let mut s = String::from(
        "# Generated by `pgkeep generate cron`: install as /etc/cron.d/pgkeep (mode 0644).\n\
         # Times are UTC, as pgkeep reads [[schedule]] cron: set CRON_TZ=UTC where cron\n\
         # supports it, or run the system clock in UTC.\n\
         # Each job takes a lock with flock -n: a run still going when the next is due is\n\
         # skipped. Secrets: passphrase_file in the configuration, or PGKEEP_PASSPHRASE_FILE\n\
         # below; never a passphrase in this file.\n\
         # Output goes to the cron mail of the user: set MAILTO, e.g.\n\
         # MAILTO=dba@example.com\n\
         SHELL=/bin/sh\n\
         PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         CRON_TZ=UTC\n\
         # PGKEEP_PASSPHRASE_FILE=/etc/pgkeep/passphrase\n\n",
    );
    for (job, slug) in jobs.iter().zip(slugs) {
        let when = cron_to_five_fields(&job.config.cron).map_err(|m| {
            Error::usage_hint(
                format!("schedule {}: {m}", job.name),
                "change its cron, or generate systemd units or run the daemon",
            )
        })?;
        let mut cmd = vec![
            "flock".to_string(),
            "-n".into(),
            format!("/run/lock/pgkeep-{slug}.lock"),
            opts.binary.display().to_string(),
        ];
        cmd.extend(job_args(job, &opts.config_path));
        let cmd: Vec<String> = cmd.iter().map(|a| shell_arg(a)).collect();
        s.push_str(&format!(
            "# {}: cron {:?}{}\n",
            job.name,
            job.config.cron,
            if job.config.jitter.and_then(|l| l.duration()).is_some() {
                " (jitter is not applied by cron)"
            } else {
                ""
            }
        ));
        s.push_str(&format!("{when} {} {}\n", opts.user, cmd.join(" ")));
    }
    Ok(GeneratedFile::new("pgkeep", s))
}

// ---------------------------------------------------------------------------------------
// Kubernetes.

fn labels(component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "pgkeep",
        "app.kubernetes.io/component": component,
    })
}

/// The listener's port, refusing addresses a kubelet probe or a Service cannot reach.
fn k8s_listen(listen: &str) -> Result<u16> {
    let (host, port) = listen.rsplit_once(':').unwrap_or(("", listen));
    let port: u16 = port
        .parse()
        .map_err(|_| Error::usage(format!("[daemon] listen {listen:?}: no port")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host == "localhost" || host.starts_with("127.") || host == "::1" {
        return Err(Error::usage_hint(
            format!(
                "[daemon] listen {listen:?} is reachable only inside the pod: the probe and the Service could not reach it"
            ),
            format!("listen on all addresses in the pod: [daemon] listen = \"0.0.0.0:{port}\""),
        ));
    }
    Ok(port)
}

struct PodParts {
    volumes: Vec<Value>,
    mounts: Vec<Value>,
    claims: Vec<GeneratedFile>,
}

fn pvc(name: &str, size: &str, what: &str) -> GeneratedFile {
    let doc = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": labels("storage")},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": size}},
        },
    });
    GeneratedFile::new(
        format!("{name}-pvc.yaml"),
        format!(
            "# {what}. Adjust the size (and storageClassName) to your cluster.\n{}",
            yaml(&doc)
        ),
    )
}

fn pod_parts(file: &ConfigFile) -> PodParts {
    let mut p = PodParts {
        volumes: vec![
            json!({"name": "config", "configMap": {"name": "pgkeep-config"}}),
            json!({"name": "tmp", "emptyDir": {}}),
            json!({"name": "state", "persistentVolumeClaim": {"claimName": "pgkeep-state"}}),
        ],
        mounts: vec![
            json!({"name": "config", "mountPath": "/etc/pgkeep", "readOnly": true}),
            json!({"name": "tmp", "mountPath": "/tmp"}),
            json!({"name": "state", "mountPath": "/var/lib/pgkeep-state"}),
        ],
        claims: vec![pvc(
            "pgkeep-state",
            "1Gi",
            "pgkeep's state: notification state, the daemon's last runs",
        )],
    };
    for r in &file.repositories {
        if let Some(path) = local_path(&r.url) {
            let name = format!("pgkeep-repo-{}", slug(&r.name, true));
            p.volumes
                .push(json!({"name": name, "persistentVolumeClaim": {"claimName": name}}));
            p.mounts
                .push(json!({"name": name, "mountPath": path.display().to_string()}));
            p.claims.push(pvc(
                &name,
                "100Gi",
                &format!("The local repository {:?} at {}", r.name, path.display()),
            ));
        }
        if let Some(pf) = &r.passphrase_file {
            let name = format!("pgkeep-passphrase-{}", slug(&r.name, true));
            p.volumes.push(json!({
                "name": name,
                "secret": {"secretName": name, "defaultMode": 0o400},
            }));
            p.mounts.push(json!({
                "name": name,
                "mountPath": pf.display().to_string(),
                "subPath": "passphrase",
                "readOnly": true,
            }));
        }
    }
    if let Some(spool) = &file.options.spool_dir {
        p.volumes.push(
            json!({"name": "pgkeep-spool", "persistentVolumeClaim": {"claimName": "pgkeep-spool"}}),
        );
        p.mounts
            .push(json!({"name": "pgkeep-spool", "mountPath": spool.display().to_string()}));
        p.claims.push(pvc(
            "pgkeep-spool",
            "10Gi",
            &format!("The spool directory {}", spool.display()),
        ));
    }
    p
}

fn container(name: &str, args: Vec<String>, opts: &GenerateOptions, parts: &PodParts) -> Value {
    json!({
        "name": name,
        "image": opts.image,
        "command": ["pgkeep"],
        "args": args,
        "env": [
            {"name": "XDG_STATE_HOME", "value": "/var/lib/pgkeep-state"},
            {"name": "HOME", "value": "/tmp"},
        ],
        "envFrom": [{"secretRef": {"name": K8S_SECRET, "optional": true}}],
        "volumeMounts": parts.mounts,
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
    })
}

fn pod_security() -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": 999,
        "runAsGroup": 999,
        "fsGroup": 999,
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

fn k8s(
    file: &ConfigFile,
    jobs: &[Job],
    mode: Mode,
    opts: &GenerateOptions,
) -> Result<Vec<GeneratedFile>> {
    // A ConfigMap is not secret: a file with inline secrets (accepted only at mode 0600) is
    // refused. Parsing it as if group-readable tells.
    if ConfigFile::parse(&opts.config_text, &file.path, 0o044).is_err() {
        return Err(Error::usage_hint(
            format!(
                "{}: the configuration file holds secrets, which a ConfigMap would show to anyone who can read it",
                file.path.display()
            ),
            format!(
                "move them to environment variables in the Secret {K8S_SECRET} (PGKEEP_PASSPHRASE, PGPASSWORD, ...) or to *_file settings, then generate again"
            ),
        ));
    }
    let mut out = Vec::new();
    let cm = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "pgkeep-config", "labels": labels("config")},
        "data": {"pgkeep.toml": opts.config_text},
    });
    out.push(GeneratedFile::new(
        "pgkeep-config-configmap.yaml",
        format!(
            "# Generated by `pgkeep generate k8s`: the configuration file, mounted at {K8S_CONFIG_PATH}.\n\
             # Secrets are not here: create the Secret {K8S_SECRET} with the variables the jobs need,\n\
             # e.g. kubectl create secret generic {K8S_SECRET} --from-literal=PGKEEP_PASSPHRASE=...\n\
             #   (and PGPASSWORD, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ... as the repository needs).\n{}",
            yaml(&cm)
        ),
    ));
    let parts = pod_parts(file);
    let config = PathBuf::from(K8S_CONFIG_PATH);
    match mode {
        Mode::Daemon => {
            let port = match &file.daemon.listen {
                Some(l) => Some(k8s_listen(l)?),
                None => None,
            };
            let mut c = container(
                "pgkeep",
                vec!["--config".into(), K8S_CONFIG_PATH.into(), "daemon".into()],
                opts,
                &parts,
            );
            if let Some(port) = port {
                c["ports"] = json!([{"name": "http", "containerPort": port}]);
                // The liveness probe asks whether the daemon serves, not whether the backups
                // are healthy: /healthz turns 503 when a backup failed or is late, and a
                // restart would not repair that but interrupt the run that does; each
                // /healthz also runs the archiving check (a WAL switch). Alert on /healthz
                // or /metrics instead.
                c["livenessProbe"] = json!({
                    "tcpSocket": {"port": "http"},
                    "initialDelaySeconds": 10,
                    "periodSeconds": 30,
                    "failureThreshold": 5,
                });
            }
            let stop = stop_timeout_secs(file) + STOP_MARGIN_SECS;
            let deploy = json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "pgkeep", "labels": labels("daemon")},
                "spec": {
                    "replicas": 1,
                    "strategy": {"type": "Recreate"},
                    "selector": {"matchLabels": labels("daemon")},
                    "template": {
                        "metadata": {"labels": labels("daemon")},
                        "spec": {
                            "terminationGracePeriodSeconds": stop,
                            "securityContext": pod_security(),
                            "containers": [c],
                            "volumes": parts.volumes,
                        },
                    },
                },
            });
            out.push(GeneratedFile::new(
                "pgkeep-deployment.yaml",
                format!(
                    "# Generated by `pgkeep generate k8s`: one pgkeep daemon runs every [[schedule]].\n\
                     # One replica and Recreate: two daemons would run every job twice.\n\
                     # The liveness probe checks that the daemon serves; the backups' health is\n\
                     # /healthz (200, or 503 with the failing checks) for your monitoring to alert\n\
                     # on: a restart would not repair a failed backup, and would interrupt the next.\n\
                     # runAsUser 999 is the postgres user of Debian-based images: adjust to the image.\n{}",
                    yaml(&deploy)
                ),
            ));
            if let Some(port) = port {
                let svc = json!({
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "pgkeep", "labels": labels("daemon")},
                    "spec": {
                        "selector": labels("daemon"),
                        "ports": [{"name": "http", "port": port, "targetPort": "http"}],
                    },
                });
                out.push(GeneratedFile::new(
                    "pgkeep-service.yaml",
                    format!(
                        "# /metrics, /healthz, /api and the dashboard of the daemon.\n{}",
                        yaml(&svc)
                    ),
                ));
            }
        }
        Mode::Jobs => {
            let slugs = job_slugs(jobs, true)?;
            for (job, slug) in jobs.iter().zip(slugs) {
                let when = cron_to_five_fields(&job.config.cron).map_err(|m| {
                    Error::usage_hint(
                        format!("schedule {}: {m}", job.name),
                        "change its cron, or run it with the daemon (--mode daemon)",
                    )
                })?;
                let name = format!("pgkeep-{slug}");
                let c = container("pgkeep", job_args(job, &config), opts, &parts);
                let cj = json!({
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "metadata": {"name": name, "labels": labels("job")},
                    "spec": {
                        "schedule": when,
                        "timeZone": "Etc/UTC",
                        "concurrencyPolicy": "Forbid",
                        "startingDeadlineSeconds": if job.missed == MissedRuns::RunOnce { 86400 } else { 300 },
                        "successfulJobsHistoryLimit": 3,
                        "failedJobsHistoryLimit": 3,
                        "jobTemplate": {
                            "metadata": {"labels": labels("job")},
                            "spec": {
                                "backoffLimit": 0,
                                "template": {
                                    "metadata": {"labels": labels("job")},
                                    "spec": {
                                        "restartPolicy": "Never",
                                        "securityContext": pod_security(),
                                        "containers": [c],
                                        "volumes": parts.volumes,
                                    },
                                },
                            },
                        },
                    },
                });
                out.push(GeneratedFile::new(
                    format!("{name}-cronjob.yaml"),
                    format!(
                        "# Generated by `pgkeep generate k8s --mode jobs`: [[schedule]] {}, cron {:?} (UTC).\n\
                         # concurrencyPolicy Forbid: a run still going when the next is due is skipped.\n{}",
                        job.name,
                        job.config.cron,
                        yaml(&cj)
                    ),
                ));
            }
        }
    }
    out.extend(parts.claims);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// A small YAML writer (block style) for JSON values.

fn yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) => yaml_map(m, 0, &mut out),
        other => {
            out.push_str(&yaml_scalar(other));
            out.push('\n');
        }
    }
    out
}

fn yaml_plain(s: &str) -> bool {
    let mut chars = s.chars();
    let first_ok =
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '/' || c == '_');
    first_ok
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        )
}

fn yaml_scalar(v: &Value) -> String {
    match v {
        Value::String(s) if yaml_plain(s) => s.clone(),
        Value::Object(m) if m.is_empty() => "{}".into(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

/// A multi-line string that can be a literal block (`|`).
fn yaml_block(s: &str) -> Option<String> {
    if !s.contains('\n')
        || s.starts_with(' ')
        || s.starts_with('\n')
        || s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return None;
    }
    Some(
        if !s.ends_with('\n') {
            "|-"
        } else if s.ends_with("\n\n") {
            "|+"
        } else {
            "|"
        }
        .to_string(),
    )
}

fn yaml_value_after_key(v: &Value, indent: usize, out: &mut String) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            yaml_map(m, indent + 2, out);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            yaml_seq(a, indent + 2, out);
        }
        Value::String(s) => match yaml_block(s) {
            Some(indicator) => {
                out.push(' ');
                out.push_str(&indicator);
                out.push('\n');
                let body = s.strip_suffix('\n').unwrap_or(s);
                for line in body.split('\n') {
                    if !line.is_empty() {
                        out.push_str(&" ".repeat(indent + 2));
                        out.push_str(line);
                    }
                    out.push('\n');
                }
            }
            None => {
                out.push(' ');
                out.push_str(&yaml_scalar(v));
                out.push('\n');
            }
        },
        other => {
            out.push(' ');
            out.push_str(&yaml_scalar(other));
            out.push('\n');
        }
    }
}

fn yaml_map(m: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    for (k, v) in m {
        out.push_str(&" ".repeat(indent));
        out.push_str(&yaml_scalar(&Value::String(k.clone())));
        out.push(':');
        yaml_value_after_key(v, indent, out);
    }
}

fn yaml_seq(a: &[Value], indent: usize, out: &mut String) {
    for item in a {
        match item {
            Value::Object(m) if !m.is_empty() => {
                let mut s = String::new();
                yaml_map(m, indent + 2, &mut s);
                out.push_str(&" ".repeat(indent));
                out.push_str("- ");
                out.push_str(&s[indent + 2..]);
            }
            other => {
                out.push_str(&" ".repeat(indent));
                out.push_str("- ");
                out.push_str(&yaml_scalar(other));
                out.push('\n');
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writing and reporting.

/// One file of the report.
#[derive(Debug, Clone, Serialize)]
pub struct FileEntry {
    /// File name.
    pub name: String,
    /// Where it was written (with `--output`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Its size.
    pub bytes: usize,
    /// `written`, `replaced` or `unchanged` (with `--output`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    /// Its contents (without `--output`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contents: Option<String>,
}

/// What `pgkeep generate` did.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateReport {
    /// `systemd`, `cron`, `k8s`, `completions` or `man`.
    pub target: String,
    /// `daemon` or `jobs` (systemd, cron, k8s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// The directory written to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// The files.
    pub files: Vec<FileEntry>,
    /// Without `--output`: print the one file as it is, without a header (completions, man).
    #[serde(skip)]
    pub raw: bool,
    /// Printed after the list of written files.
    #[serde(skip)]
    pub next_steps: Vec<String>,
}

impl GenerateReport {
    /// The report of files printed on stdout.
    pub fn printed(target: &str, mode: Option<Mode>, files: Vec<GeneratedFile>, raw: bool) -> Self {
        GenerateReport {
            target: target.to_string(),
            mode,
            output: None,
            files: files
                .into_iter()
                .map(|f| FileEntry {
                    bytes: f.contents.len(),
                    name: f.name,
                    path: None,
                    status: None,
                    contents: Some(f.contents),
                })
                .collect(),
            raw,
            next_steps: Vec::new(),
        }
    }
}

impl fmt::Display for GenerateReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.output.is_none() {
            for (i, file) in self.files.iter().enumerate() {
                let contents = file.contents.as_deref().unwrap_or_default();
                if self.raw {
                    f.write_str(contents)?;
                    continue;
                }
                if self.target == "k8s" {
                    writeln!(f, "---")?;
                } else if i > 0 {
                    writeln!(f)?;
                }
                writeln!(f, "# ==> {} <==", file.name)?;
                f.write_str(contents)?;
            }
            return Ok(());
        }
        for file in &self.files {
            writeln!(
                f,
                "{} {}",
                file.status.unwrap_or("written"),
                file.path
                    .as_deref()
                    .unwrap_or(Path::new(&file.name))
                    .display()
            )?;
        }
        for line in &self.next_steps {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

impl Report for GenerateReport {}

/// Writes `files` into `dir` (created when missing), mode 0644. An existing file with other
/// contents is refused unless `force`, before anything is written.
pub fn write_files(dir: &Path, files: &[GeneratedFile], force: bool) -> Result<Vec<FileEntry>> {
    let mut plan = Vec::new();
    for f in files {
        let path = dir.join(&f.name);
        let status = match std::fs::read(&path) {
            Ok(old) if old == f.contents.as_bytes() => "unchanged",
            Ok(_) if force => "replaced",
            Ok(_) => {
                return Err(Error::usage_hint(
                    format!("{} exists with other contents", path.display()),
                    "give --force to replace it, or another --output directory",
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "written",
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        plan.push((f, path, status));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut out = Vec::new();
    for (f, path, status) in plan {
        if status != "unchanged" {
            let tmp = dir.join(format!(".{}.tmp", f.name));
            let write = || -> std::io::Result<()> {
                let mut w = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o644)
                    .open(&tmp)?;
                w.write_all(f.contents.as_bytes())?;
                w.sync_all()?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
                std::fs::rename(&tmp, &path)
            };
            write().map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        out.push(FileEntry {
            name: f.name.clone(),
            path: Some(path),
            bytes: f.contents.len(),
            status: Some(status),
            contents: None,
        });
    }
    Ok(out)
}

/// How to install what `generate` wrote into `dir`.
pub fn next_steps(target: Target, mode: Mode, dir: &Path, files: &[GeneratedFile]) -> Vec<String> {
    let d = dir.display();
    match (target, mode) {
        (Target::Systemd, Mode::Daemon) => vec![
            format!("next: cp {d}/pgkeep.service /etc/systemd/system/ && systemctl daemon-reload && systemctl enable --now pgkeep.service"),
        ],
        (Target::Systemd, Mode::Jobs) => {
            let timers: Vec<&str> = files
                .iter()
                .filter(|f| f.name.ends_with(".timer"))
                .map(|f| f.name.as_str())
                .collect();
            vec![format!(
                "next: cp {d}/pgkeep-*.service {d}/pgkeep-*.timer /etc/systemd/system/ && systemctl daemon-reload && systemctl enable --now {}",
                timers.join(" ")
            )]
        }
        (Target::Cron, _) => vec![format!("next: install -m 0644 {d}/pgkeep /etc/cron.d/pgkeep")],
        (Target::K8s, _) => vec![
            format!("next: kubectl create secret generic {K8S_SECRET} --from-literal=PGKEEP_PASSPHRASE=... (and the credentials), then kubectl apply -f {d}"),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_to_oncalendar_common_forms() {
        for (cron, cal) in [
            ("30 2 * * *", "*-*-* 02:30:00 UTC"),
            ("0 3 * * 0", "Sun *-*-* 03:00:00 UTC"),
            ("0 3 * * 7", "Sun *-*-* 03:00:00 UTC"),
            ("*/15 * * * *", "*-*-* *:00/15:00 UTC"),
            ("5,35 */6 * * *", "*-*-* 00/6:05,35:00 UTC"),
            ("*/20 * * * *", "*-*-* *:00/20:00 UTC"),
            ("0 9-17 * * 1-5", "Mon..Fri *-*-* 09..17:00:00 UTC"),
            ("0 0 1 1 *", "*-01-01 00:00:00 UTC"),
            ("0 4 1,15 * *", "*-*-01,15 04:00:00 UTC"),
            ("0 4 * 3-5 *", "*-03..05-* 04:00:00 UTC"),
            ("0 0 * * MON,WED,FRI", "Mon,Wed,Fri *-*-* 00:00:00 UTC"),
            ("0 0 * JAN,JUL *", "*-01,07-* 00:00:00 UTC"),
            ("0 0 * * 6,0", "Sat,Sun *-*-* 00:00:00 UTC"),
            ("0 0 1-7 * +MON", "Mon *-*-01..07 00:00:00 UTC"),
            ("0 0 1-31 * 1", "*-*-* 00:00:00 UTC"),
            ("@daily", "*-*-* 00:00:00 UTC"),
            ("@hourly", "*-*-* *:00:00 UTC"),
            ("@weekly", "Sun *-*-* 00:00:00 UTC"),
            ("@monthly", "*-*-01 00:00:00 UTC"),
            ("@yearly", "*-01-01 00:00:00 UTC"),
            ("*/5 * * * * *", "*-*-* *:*:00/5 UTC"),
            ("30 0 3 * * *", "*-*-* 03:00:30 UTC"),
            ("0 10-40/10 * * * *", "*-*-* *:10,20,30,40:00 UTC"),
            ("0 0 12 * * ?", "*-*-* 12:00:00 UTC"),
            ("0 0 */2 * *", "*-*-01/2 00:00:00 UTC"),
            ("* * * * *", "*-*-* *:*:00 UTC"),
            ("0 1,2,3,7 * * *", "*-*-* 01..03,07:00:00 UTC"),
        ] {
            assert_eq!(cron_to_oncalendar(cron).as_deref(), Ok(cal), "{cron}");
        }
    }

    #[test]
    fn what_systemd_cannot_say_is_refused() {
        for (cron, msg) in [
            ("0 0 1 * 1", "both the day of month and the day of week"),
            ("0 0 L * *", "cannot be converted"),
            ("0 0 * * 5#3", "cannot be converted"),
            ("61 * * * *", "cron \"61 * * * *\""),
            ("0 0 * * FRI-MON", "cron \"0 0 * * FRI-MON\""),
        ] {
            let e = cron_to_oncalendar(cron).unwrap_err();
            assert!(e.contains(msg), "{cron}: {e}");
        }
    }

    #[test]
    fn five_field_cron_and_seconds() {
        for (cron, five) in [
            ("30 2 * * *", "30 2 * * *"),
            ("0 30 2 * * *", "30 2 * * *"),
            ("@weekly", "0 0 * * 0"),
            ("0 0 * * 7", "0 0 * * 0"),
            ("*/15 * * * *", "*/15 * * * *"),
            ("5-59/20 * * * *", "5-59/20 * * * *"),
            ("5,25,45 * * * *", "5-59/20 * * * *"),
            ("0 9-17 * * MON-FRI", "0 9-17 * * 1-5"),
            ("0 0 */2 * 1", "0 0 1-31/2 * 1"),
            ("0 0 1,2 JAN *", "0 0 1,2 1 *"),
            ("0 0 1-31 * 1", "0 0 * * *"),
            ("0 0 1 * 0,7", "0 0 1 * 0"),
        ] {
            assert_eq!(cron_to_five_fields(cron).as_deref(), Ok(five), "{cron}");
        }
        let e = cron_to_five_fields("0 0 1-7 * +MON").unwrap_err();
        assert!(e.contains("cron(8) cannot express"), "{e}");
        let e = cron_to_five_fields("*/5 * * * * *").unwrap_err();
        assert!(e.contains("cron(8) cannot express"), "{e}");
    }

    #[test]
    fn quoting() {
        assert_eq!(systemd_arg("/usr/bin/pgkeep"), "/usr/bin/pgkeep");
        assert_eq!(systemd_arg("a b"), "\"a b\"");
        assert_eq!(systemd_arg("50%"), "50%%");
        assert_eq!(shell_arg("it's"), "'it'\\''s'");
        assert_eq!(shell_arg("50%"), "'50\\%'");
        assert_eq!(slug("Dump main/App_1", true), "dump-main-app-1");
        assert_eq!(slug("dump-main-app_1", false), "dump-main-app_1");
    }

    #[test]
    fn yaml_writer() {
        let v = json!({
            "a": {"b": [{"c": 1, "d": "x y"}, "plain"]},
            "e": "line1\nline2\n",
            "f": [],
            "g": "true",
        });
        assert_eq!(
            yaml(&v),
            "a:\n  b:\n    - c: 1\n      d: \"x y\"\n    - plain\ne: |\n  line1\n  line2\nf: []\ng: \"true\"\n"
        );
    }
}
