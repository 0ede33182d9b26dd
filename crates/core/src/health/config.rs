//! `[health]` and `[cluster.health]`: the thresholds of `pgkeep check` (and what `status`
//! and `metrics` compare against). Every key is optional; a cluster's own table overrides
//! the file's `[health]` key by key, and unset keys take the defaults of [`HealthSettings`].

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A duration threshold that can be switched off: `"26h"`, `"90d"`, `"1s"`, `"30m"`,
/// `"2w"`, or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Not checked.
    Off,
    /// Crossed when a value exceeds this.
    After(Duration),
}

impl Limit {
    /// The duration, when on.
    pub fn duration(self) -> Option<Duration> {
        match self {
            Limit::Off => None,
            Limit::After(d) => Some(d),
        }
    }

    /// The threshold in seconds, when on.
    pub fn secs(self) -> Option<f64> {
        self.duration().map(|d| d.as_secs_f64())
    }
}

/// Parses `"<n>s|m|h|d|w"` or `"off"`.
pub fn parse_limit(text: &str) -> Result<Limit, String> {
    let t = text.trim();
    if t == "off" {
        return Ok(Limit::Off);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. \"26h\", \"90d\", \"off\")"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: give a number with a unit s, m, h, d or w (e.g. \"26h\"), or \"off\""
            ))
        }
    };
    if n == 0 {
        return Err(format!("{text:?}: a zero duration; use \"off\" to disable"));
    }
    Ok(Limit::After(Duration::from_secs(n * secs)))
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Off => f.write_str("off"),
            Limit::After(d) => {
                let s = d.as_secs();
                for (unit, n) in [("w", 604_800), ("d", 86_400), ("h", 3600), ("m", 60)] {
                    if s % n == 0 {
                        return write!(f, "{}{unit}", s / n);
                    }
                }
                write!(f, "{s}s")
            }
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_limit(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A percentage from 1 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Percent(pub u32);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if (1..=100).contains(&n) {
            Ok(Percent(n as u32))
        } else {
            Err(serde::de::Error::custom(format!(
                "{n} is not a percentage from 1 to 100"
            )))
        }
    }
}

/// `[health]` as written: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Age of the newest physical backup that warns.
    pub backup_warn_age: Option<Limit>,
    /// Age of the newest physical backup that is critical.
    pub backup_crit_age: Option<Limit>,
    /// Age of the newest dump of a database that warns.
    pub dump_warn_age: Option<Limit>,
    /// Age of the newest dump of a database that is critical.
    pub dump_crit_age: Option<Limit>,
    /// Whether `check` connects to the server to check archiving end to end.
    pub check_archiving: Option<bool>,
    /// Age of the newest archived segment that warns (default: twice the server's
    /// `archive_timeout` plus a minute, when it is set and the server is reachable).
    pub wal_warn_age: Option<Limit>,
    /// Age of the newest archived segment that is critical.
    pub wal_crit_age: Option<Limit>,
    /// Segments waiting to be archived (`.ready`) that warn.
    pub ready_warn: Option<u64>,
    /// Segments waiting to be archived that are critical.
    pub ready_crit: Option<u64>,
    /// Drop of the newest backup's or dump's size against the previous ones that warns.
    pub size_drop_warn: Option<Percent>,
    /// Drop that is critical (the classic empty dump).
    pub size_drop_crit: Option<Percent>,
    /// Growth of the newest run's duration against the previous ones that warns, percent
    /// (100: twice as long).
    pub duration_growth_warn: Option<u32>,
    /// Duration of the newest backup or dump that warns, whatever the previous ones took.
    pub duration_warn: Option<Limit>,
    /// Free space (percent of the file system) under which the repository's or the spool's
    /// file system warns.
    pub free_space_warn: Option<Percent>,
    /// Free space under which it is critical.
    pub free_space_crit: Option<Percent>,
    /// Age of the last restore drill that warns; also makes "no drill yet" a warning.
    pub drill_max_age: Option<Limit>,
    /// Run history records older than this are removed by `expire` (the newest of each
    /// kind and database stays).
    pub history_max_age: Option<Limit>,
}

impl HealthConfig {
    /// `other`'s keys over `self`'s.
    pub fn overlay(&self, other: &HealthConfig) -> HealthConfig {
        macro_rules! pick {
            ($($f:ident),*) => { HealthConfig { $($f: other.$f.or(self.$f),)* } };
        }
        pick!(
            backup_warn_age,
            backup_crit_age,
            dump_warn_age,
            dump_crit_age,
            check_archiving,
            wal_warn_age,
            wal_crit_age,
            ready_warn,
            ready_crit,
            size_drop_warn,
            size_drop_crit,
            duration_growth_warn,
            duration_warn,
            free_space_warn,
            free_space_crit,
            drill_max_age,
            history_max_age
        )
    }
}

/// The thresholds in force: [`HealthConfig`] with the defaults filled in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthSettings {
    /// Default 26 h: a nightly backup may run late, not skip a night.
    pub backup_warn_age: Limit,
    /// Default 50 h: two nights missed.
    pub backup_crit_age: Limit,
    /// Default 26 h.
    pub dump_warn_age: Limit,
    /// Default 50 h.
    pub dump_crit_age: Limit,
    /// Default true.
    pub check_archiving: bool,
    /// Default: derived from `archive_timeout` (see [`HealthConfig::wal_warn_age`]).
    pub wal_warn_age: Option<Limit>,
    /// Default off.
    pub wal_crit_age: Limit,
    /// Default 10.
    pub ready_warn: u64,
    /// Default 100.
    pub ready_crit: u64,
    /// Default 25 %.
    pub size_drop_warn: u32,
    /// Default 50 %.
    pub size_drop_crit: u32,
    /// Default 100 % (twice as long as the previous ones).
    pub duration_growth_warn: u32,
    /// Default off.
    pub duration_warn: Limit,
    /// Default 10 %.
    pub free_space_warn: u32,
    /// Default 5 %.
    pub free_space_crit: u32,
    /// Default off: no drill is not a warning until one is asked for.
    pub drill_max_age: Limit,
    /// Default 90 days.
    pub history_max_age: Limit,
}

impl From<&HealthConfig> for HealthSettings {
    fn from(c: &HealthConfig) -> Self {
        let hours = |h: u64| Limit::After(Duration::from_secs(h * 3600));
        HealthSettings {
            backup_warn_age: c.backup_warn_age.unwrap_or(hours(26)),
            backup_crit_age: c.backup_crit_age.unwrap_or(hours(50)),
            dump_warn_age: c.dump_warn_age.unwrap_or(hours(26)),
            dump_crit_age: c.dump_crit_age.unwrap_or(hours(50)),
            check_archiving: c.check_archiving.unwrap_or(true),
            wal_warn_age: c.wal_warn_age,
            wal_crit_age: c.wal_crit_age.unwrap_or(Limit::Off),
            ready_warn: c.ready_warn.unwrap_or(10),
            ready_crit: c.ready_crit.unwrap_or(100),
            size_drop_warn: c.size_drop_warn.map_or(25, |p| p.0),
            size_drop_crit: c.size_drop_crit.map_or(50, |p| p.0),
            duration_growth_warn: c.duration_growth_warn.unwrap_or(100),
            duration_warn: c.duration_warn.unwrap_or(Limit::Off),
            free_space_warn: c.free_space_warn.map_or(10, |p| p.0),
            free_space_crit: c.free_space_crit.map_or(5, |p| p.0),
            drill_max_age: c.drill_max_age.unwrap_or(Limit::Off),
            history_max_age: c
                .history_max_age
                .unwrap_or(hours(crate::history::DEFAULT_HISTORY_MAX_AGE_DAYS * 24)),
        }
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings::from(&HealthConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_print() {
        assert_eq!(
            parse_limit("26h"),
            Ok(Limit::After(Duration::from_secs(26 * 3600)))
        );
        assert_eq!(parse_limit("1s"), Ok(Limit::After(Duration::from_secs(1))));
        assert_eq!(parse_limit("off"), Ok(Limit::Off));
        assert!(parse_limit("0h").is_err());
        assert!(parse_limit("26").is_err());
        assert!(parse_limit("h").is_err());
        assert_eq!(parse_limit("90d").unwrap().to_string(), "90d");
        assert_eq!(parse_limit("90s").unwrap().to_string(), "90s");
    }

    #[test]
    fn a_cluster_table_overrides_key_by_key() {
        let file: HealthConfig =
            toml::from_str("backup_warn_age = \"2h\"\nready_warn = 3").unwrap();
        let own: HealthConfig = toml::from_str("backup_warn_age = \"1h\"").unwrap();
        let s = HealthSettings::from(&file.overlay(&own));
        assert_eq!(s.backup_warn_age, parse_limit("1h").unwrap());
        assert_eq!(s.ready_warn, 3);
        assert_eq!(s.size_drop_crit, 50);
        assert!(toml::from_str::<HealthConfig>("backup_max = \"1h\"").is_err());
        assert!(toml::from_str::<HealthConfig>("size_drop_crit = 150").is_err());
    }
}
