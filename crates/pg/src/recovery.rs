//! Recovery configuration of a restored data directory (PostgreSQL 12+): `recovery.signal` or
//! `standby.signal`, plus settings appended to `postgresql.auto.conf` (later lines win, so
//! appending overrides older values without editing the user's lines). This is the same for
//! every release pgkeep supports (13 to 18): none of them reads `recovery.conf` (a server
//! refuses to start with one), and the settings written here exist under these names in all.

use crate::error::{PgError, Result};
use crate::lsn::Lsn;
use std::io::Write;
use std::path::Path;

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "value")]
pub enum RecoveryTarget {
    /// Replay all available WAL (no target setting).
    End,
    /// Stop as soon as the backup is consistent (`recovery_target = 'immediate'`).
    Immediate,
    /// `recovery_target_time` (PostgreSQL timestamptz text).
    Time(String),
    /// `recovery_target_lsn`.
    Lsn(Lsn),
    /// `recovery_target_xid`.
    Xid(String),
    /// `recovery_target_name` (a restore point made with pg_create_restore_point).
    Name(String),
}

/// `recovery_target_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetAction {
    Pause,
    Promote,
    Shutdown,
}

impl TargetAction {
    fn as_str(&self) -> &'static str {
        match self {
            TargetAction::Pause => "pause",
            TargetAction::Promote => "promote",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// `recovery_target_timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetTimeline {
    Latest,
    Current,
    Id(u32),
}

/// Which signal file to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryMode {
    /// `recovery.signal`: targeted recovery, then the target action.
    Recovery,
    /// `standby.signal`: stay in recovery as a standby.
    Standby,
}

/// Settings for a restored cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecoveryConfig {
    pub mode: RecoveryMode,
    /// `restore_command` (e.g. `pgkeep archive-get %f %p`). Required in
    /// [`RecoveryMode::Recovery`]: PostgreSQL refuses recovery.signal without one.
    pub restore_command: Option<String>,
    /// `primary_conninfo` of a standby (streaming replication from a primary). Never a
    /// password: the server reads it from a passfile or its user's `.pgpass`.
    pub primary_conninfo: Option<String>,
    pub target: RecoveryTarget,
    /// `recovery_target_inclusive` (`None`: server default, true).
    pub inclusive: Option<bool>,
    pub action: Option<TargetAction>,
    pub timeline: Option<TargetTimeline>,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            mode: RecoveryMode::Recovery,
            restore_command: None,
            primary_conninfo: None,
            target: RecoveryTarget::End,
            inclusive: None,
            action: None,
            timeline: None,
        }
    }
}

/// Quote a value for postgresql.conf: single quotes, with `'` doubled and `\` escaped.
pub fn quote_conf_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('\'');
    for c in v.chars() {
        match c {
            '\'' => s.push_str("''"),
            '\\' => s.push_str("\\\\"),
            c => s.push(c),
        }
    }
    s.push('\'');
    s
}

impl RecoveryConfig {
    /// The `name = 'value'` settings this configuration produces, in order.
    pub fn settings(&self) -> Result<Vec<(&'static str, String)>> {
        let mut v = Vec::new();
        if self.mode == RecoveryMode::Recovery && self.restore_command.is_none() {
            // PostgreSQL exits at start-up with "must specify restore_command when standby mode
            // is not enabled"; fail here, where the message can say what to do.
            return Err(PgError::parse(
                "recovery configuration",
                "recovery.signal",
                "targeted recovery needs a restore_command (use one that fails, e.g. 'false', to replay only the WAL in pg_wal)",
            ));
        }
        if let Some(rc) = &self.restore_command {
            if rc.contains('\n') {
                return Err(PgError::parse("restore_command", rc, "contains a newline"));
            }
            v.push(("restore_command", rc.clone()));
        }
        if let Some(pc) = &self.primary_conninfo {
            v.push(("primary_conninfo", pc.clone()));
        }
        match &self.target {
            RecoveryTarget::End => {}
            RecoveryTarget::Immediate => v.push(("recovery_target", "immediate".into())),
            RecoveryTarget::Time(t) => v.push(("recovery_target_time", t.clone())),
            RecoveryTarget::Lsn(l) => v.push(("recovery_target_lsn", l.to_string())),
            RecoveryTarget::Xid(x) => v.push(("recovery_target_xid", x.clone())),
            RecoveryTarget::Name(n) => v.push(("recovery_target_name", n.clone())),
        }
        if let Some(i) = self.inclusive {
            v.push((
                "recovery_target_inclusive",
                if i { "on" } else { "off" }.into(),
            ));
        }
        if let Some(a) = self.action {
            v.push(("recovery_target_action", a.as_str().into()));
        }
        if let Some(t) = self.timeline {
            v.push((
                "recovery_target_timeline",
                match t {
                    TargetTimeline::Latest => "latest".into(),
                    TargetTimeline::Current => "current".into(),
                    TargetTimeline::Id(n) => n.to_string(),
                },
            ));
        }
        for (k, val) in &v {
            if val.contains('\n') || val.contains('\r') {
                return Err(PgError::parse(k, val.clone(), "contains a line break"));
            }
        }
        Ok(v)
    }

    /// Write the signal file and append the settings to `postgresql.auto.conf` in `pgdata`.
    /// Files are created mode 0600 (PostgreSQL's own mode for them).
    pub fn write(&self, pgdata: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let settings = self.settings()?;
        let signal = match self.mode {
            RecoveryMode::Recovery => "recovery.signal",
            RecoveryMode::Standby => "standby.signal",
        };
        let sp = pgdata.join(signal);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&sp)
            .map_err(|e| PgError::io("creating", &sp, e))?;
        let auto = pgdata.join("postgresql.auto.conf");
        let existing = match std::fs::read(&auto) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(PgError::io("reading", &auto, e)),
        };
        let mut text = String::new();
        if !existing.is_empty() && !existing.ends_with(b"\n") {
            text.push('\n');
        }
        text.push_str("# recovery settings added by pgkeep restore\n");
        for (k, v) in settings {
            text.push_str(&format!("{k} = {}\n", quote_conf_value(&v)));
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&auto)
            .map_err(|e| PgError::io("opening", &auto, e))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| PgError::io("writing", &auto, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_conf_value("a'b\\c"), "'a''b\\\\c'");
        assert_eq!(
            quote_conf_value("pgkeep archive-get %f \"%p\""),
            "'pgkeep archive-get %f \"%p\"'"
        );
    }

    #[test]
    fn writes_signal_and_settings() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("postgresql.auto.conf"), "work_mem = '1MB'").unwrap();
        let cfg = RecoveryConfig {
            restore_command: Some("pgkeep archive-get %f %p".into()),
            target: RecoveryTarget::Time("2026-11-22 14:31:07.52+00".into()),
            inclusive: Some(false),
            action: Some(TargetAction::Promote),
            timeline: Some(TargetTimeline::Latest),
            ..Default::default()
        };
        cfg.write(t.path()).unwrap();
        assert!(t.path().join("recovery.signal").exists());
        assert!(!t.path().join("standby.signal").exists());
        let text = std::fs::read_to_string(t.path().join("postgresql.auto.conf")).unwrap();
        assert_eq!(
            text,
            "work_mem = '1MB'\n# recovery settings added by pgkeep restore\n\
             restore_command = 'pgkeep archive-get %f %p'\n\
             recovery_target_time = '2026-11-22 14:31:07.52+00'\n\
             recovery_target_inclusive = 'off'\n\
             recovery_target_action = 'promote'\n\
             recovery_target_timeline = 'latest'\n"
        );
        let standby = RecoveryConfig {
            mode: RecoveryMode::Standby,
            restore_command: Some("false".into()),
            target: RecoveryTarget::Lsn(Lsn(0x3000028)),
            ..Default::default()
        };
        standby.write(t.path()).unwrap();
        assert!(t.path().join("standby.signal").exists());
        let text = std::fs::read_to_string(t.path().join("postgresql.auto.conf")).unwrap();
        assert!(text.ends_with("recovery_target_lsn = '0/3000028'\n"));
        let follower = RecoveryConfig {
            mode: RecoveryMode::Standby,
            restore_command: Some("false".into()),
            primary_conninfo: Some("host=/run/pg port=5433 user=rep passfile='/x y'".into()),
            ..Default::default()
        };
        assert_eq!(
            follower.settings().unwrap()[1],
            (
                "primary_conninfo",
                "host=/run/pg port=5433 user=rep passfile='/x y'".to_string()
            )
        );
    }

    #[test]
    fn recovery_mode_needs_restore_command() {
        assert!(RecoveryConfig::default().settings().is_err());
        let standby = RecoveryConfig {
            mode: RecoveryMode::Standby,
            ..Default::default()
        };
        assert!(standby.settings().unwrap().is_empty());
    }

    #[test]
    fn rejects_line_breaks() {
        let cfg = RecoveryConfig {
            restore_command: Some("false".into()),
            target: RecoveryTarget::Name("a\nrestore_command='rm -rf /'".into()),
            ..Default::default()
        };
        assert!(cfg.settings().is_err());
    }
}
