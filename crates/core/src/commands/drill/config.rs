//! `[drill]` and `[[drill.assert]]` of the configuration file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::server::FORCED_SETTINGS;
use crate::health::config::Limit;

/// `[drill]` as written; every key optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// Directory in which each drill makes its scratch directory
    /// (`pgkeep-drill-<random>`); default `$TMPDIR`, else `/var/tmp`.
    pub scratch_dir: Option<PathBuf>,
    /// Longest time the scratch server may take to start and replay WAL (default `6h`).
    pub timeout: Option<Limit>,
    /// Role the checks connect as (default: the user of the cluster's connection string,
    /// else `postgres`, else this operating-system user).
    pub user: Option<String>,
    /// Whether to run pg_amcheck when it and the amcheck extension are installed (default
    /// true; false reads every table instead).
    pub amcheck: Option<bool>,
    /// Settings of the scratch server over those of the backup's configuration, e.g.
    /// `shared_buffers = "256MB"`, `shared_preload_libraries = ""` (values as text). The
    /// settings that keep the drill apart from production (port, sockets, archiving) are the
    /// drill's own and refused here.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// SQL assertions checked on every drill (`[[drill.assert]]`).
    #[serde(default, rename = "assert")]
    pub assertions: Vec<DrillAssertion>,
}

/// One `[[drill.assert]]`: the first value of `query`, run in `database`, must be
/// `expected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillAssertion {
    /// Its name in reports (default: the query).
    pub name: Option<String>,
    /// Only for drills of this cluster (default: every cluster).
    pub cluster: Option<String>,
    /// The database to run it in. In a dump drill it runs in the scratch database when this
    /// is the dumped database.
    pub database: String,
    /// A query whose first row's first column is compared.
    pub query: String,
    /// The value expected, compared as text (`true`/`t`, `false`/`f` alike). Numbers and
    /// booleans may be written bare.
    #[serde(deserialize_with = "value_as_text")]
    pub expected: String,
}

impl DrillAssertion {
    /// The name, or the query.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.query.clone())
    }
}

fn value_as_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = toml::Value::deserialize(d)?;
    Ok(match v {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a string, number or boolean, not {}",
                other.type_str()
            )))
        }
    })
}

impl DrillConfig {
    /// Refuses settings the drill must own, and names that are not setting names.
    pub fn validate(&self) -> Result<(), String> {
        for k in self.settings.keys() {
            if FORCED_SETTINGS.contains(&k.as_str()) {
                return Err(format!(
                    "[drill] settings: {k} is set by the drill itself (it keeps the scratch server apart from production)"
                ));
            }
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                return Err(format!("[drill] settings: {k:?} is not a setting name"));
            }
        }
        Ok(())
    }

    /// The scratch parent directory.
    pub fn scratch_parent(&self) -> PathBuf {
        self.scratch_dir.clone().unwrap_or_else(|| {
            std::env::var_os("TMPDIR")
                .filter(|t| !t.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        })
    }

    /// The assertions that apply to `cluster`.
    pub fn assertions_for<'a>(
        &'a self,
        cluster: &'a str,
    ) -> impl Iterator<Item = &'a DrillAssertion> {
        self.assertions
            .iter()
            .filter(move |a| a.cluster.as_deref().is_none_or(|c| c == cluster))
    }
}
