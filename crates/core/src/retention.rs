//! Retention policies: which backups `expire` keeps, and why.
//!
//! The rules are restic's (`restic forget`), applied per group of backups (one cluster's
//! physical backups; one database's dumps):
//! - `keep_last N`: the N newest;
//! - `keep_hourly/daily/weekly/monthly/yearly N`: walking from the newest backup to the
//!   oldest, the newest backup of each of the N most recent hours / days / ISO weeks / months /
//!   years (UTC) that have a backup;
//! - `keep_within D`: every backup less than D older than the newest one (not than "now", so
//!   a repository that stopped receiving backups is not emptied by the calendar);
//! - `keep_label L`: every backup labelled L.
//!
//! A backup kept by any rule stays; a pinned backup always stays. Only complete backups are
//! candidates (a backup exists only once its manifest does, so an interrupted one never
//! appears and never pushes a good one out of "the last N").

use std::fmt;

use chrono::{DateTime, Datelike, Duration, Months, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A retention policy; every `None`/empty rule keeps nothing by itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep the N newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// Keep the newest of each of the N most recent hours with a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    /// Same per day (UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    /// Same per ISO week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    /// Same per month.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    /// Same per year.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Keep everything newer than this, measured from the newest backup (e.g. `30d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<KeepWithin>,
    /// Keep every backup with one of these labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_label: Vec<String>,
}

impl RetentionPolicy {
    /// Whether no rule is set (such a policy would keep nothing but pinned backups).
    pub fn is_empty(&self) -> bool {
        self == &RetentionPolicy::default()
    }

    /// Refuses counts of 0, which keep nothing and are almost always a typo for "unset".
    pub fn validate(&self) -> Result<()> {
        for (name, v) in self.counts() {
            if v == Some(0) {
                return Err(Error::usage_hint(
                    format!("--{name} 0 keeps nothing"),
                    format!("give a count of at least 1, or leave --{name} out"),
                ));
            }
        }
        Ok(())
    }

    /// Overlays `other` on `self`: every rule `other` sets wins (per-cluster over per-kind).
    pub fn overlay(&self, other: &RetentionPolicy) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: other.keep_last.or(self.keep_last),
            keep_hourly: other.keep_hourly.or(self.keep_hourly),
            keep_daily: other.keep_daily.or(self.keep_daily),
            keep_weekly: other.keep_weekly.or(self.keep_weekly),
            keep_monthly: other.keep_monthly.or(self.keep_monthly),
            keep_yearly: other.keep_yearly.or(self.keep_yearly),
            keep_within: other.keep_within.or(self.keep_within),
            keep_label: if other.keep_label.is_empty() {
                self.keep_label.clone()
            } else {
                other.keep_label.clone()
            },
        }
    }

    fn counts(&self) -> [(&'static str, Option<u32>); 6] {
        [
            ("keep-last", self.keep_last),
            ("keep-hourly", self.keep_hourly),
            ("keep-daily", self.keep_daily),
            ("keep-weekly", self.keep_weekly),
            ("keep-monthly", self.keep_monthly),
            ("keep-yearly", self.keep_yearly),
        ]
    }
}

impl fmt::Display for RetentionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .counts()
            .iter()
            .filter_map(|(n, v)| v.map(|v| format!("{n} {v}")))
            .collect();
        if let Some(w) = self.keep_within {
            parts.push(format!("keep-within {w}"));
        }
        for l in &self.keep_label {
            parts.push(format!("keep-label {l}"));
        }
        if parts.is_empty() {
            parts.push("no rule".into());
        }
        f.write_str(&parts.join(", "))
    }
}

/// A duration of `keep_within`: years, months, weeks, days and hours, as in `1y6m`, `30d`,
/// `2w`, `36h`. Months and years are calendar months (a month back from March 31 is the end
/// of February), as restic counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeepWithin {
    /// Calendar months (a year is 12).
    pub months: u32,
    /// Hours (a week is 168, a day 24).
    pub hours: u64,
}

impl KeepWithin {
    /// The instant `self` before `t`.
    pub fn before(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let t = t
            .checked_sub_months(Months::new(self.months))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        t - Duration::hours(self.hours as i64)
    }
}

impl std::str::FromStr for KeepWithin {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::usage_hint(
                format!("{s:?} is not a duration"),
                "write a number and a unit: y (years), m (months), w (weeks), d (days), h \
                 (hours), e.g. 30d, 2w, 1y6m",
            )
        };
        let mut out = KeepWithin::default();
        let mut digits = String::new();
        for c in s.trim().chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let n: u64 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            match c {
                'y' => out.months += u32::try_from(n * 12).map_err(|_| bad())?,
                'm' => out.months += u32::try_from(n).map_err(|_| bad())?,
                'w' => out.hours += n * 24 * 7,
                'd' => out.hours += n * 24,
                'h' => out.hours += n,
                _ => return Err(bad()),
            }
        }
        if !digits.is_empty() || out == KeepWithin::default() {
            return Err(bad());
        }
        Ok(out)
    }
}

impl fmt::Display for KeepWithin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m) = (self.months / 12, self.months % 12);
        let (d, h) = (self.hours / 24, self.hours % 24);
        let mut out = String::new();
        for (n, unit) in [(y as u64, 'y'), (m as u64, 'm'), (d, 'd'), (h, 'h')] {
            if n > 0 {
                out.push_str(&format!("{n}{unit}"));
            }
        }
        f.write_str(&out)
    }
}

impl Serialize for KeepWithin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeepWithin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One backup as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Backup id.
    pub id: String,
    /// When it was taken (its end; the start when the end is unknown).
    pub time: DateTime<Utc>,
    /// Its label.
    pub label: Option<String>,
    /// Pinned backups are never expired.
    pub pinned: bool,
}

/// Why a backup stays, or that it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Backup id.
    pub id: String,
    /// When it was taken.
    pub time: DateTime<Utc>,
    /// Whether it stays.
    pub keep: bool,
    /// Every rule that keeps it (`last`, `daily`, `within 30d`, `label nightly`, `pinned`...).
    pub reasons: Vec<String>,
}

/// The bucket a time falls in, for one calendar rule.
type BucketOf = fn(&DateTime<Utc>) -> i64;

/// The calendar buckets of the count rules, in the order they are reported.
const BUCKETS: [(&str, BucketOf); 5] = [
    ("hourly", |t| t.timestamp().div_euclid(3600)),
    ("daily", |t| t.num_days_from_ce() as i64),
    ("weekly", |t| {
        let w = t.iso_week();
        w.year() as i64 * 100 + w.week() as i64
    }),
    ("monthly", |t| t.year() as i64 * 100 + t.month() as i64),
    ("yearly", |t| t.year() as i64),
];

/// Applies `policy` to `candidates` (any order). Returns one decision per candidate, newest
/// first. Ties in time are broken by id so the result does not depend on the input order.
pub fn apply(policy: &RetentionPolicy, candidates: &[Candidate]) -> Vec<Decision> {
    let mut sorted: Vec<&Candidate> = candidates.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
    let newest = sorted.first().map(|c| c.time);
    let within_from = policy.keep_within.zip(newest).map(|(w, t)| w.before(t));
    let counts = [
        policy.keep_hourly,
        policy.keep_daily,
        policy.keep_weekly,
        policy.keep_monthly,
        policy.keep_yearly,
    ];
    let mut left: Vec<u32> = counts.iter().map(|c| c.unwrap_or(0)).collect();
    let mut last_bucket: Vec<Option<i64>> = vec![None; BUCKETS.len()];
    sorted
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut reasons = Vec::new();
            if c.pinned {
                reasons.push("pinned".to_string());
            }
            if policy.keep_last.is_some_and(|n| (i as u64) < n as u64) {
                reasons.push("last".to_string());
            }
            for (b, (name, bucket_of)) in BUCKETS.iter().enumerate() {
                let bucket = bucket_of(&c.time);
                if left[b] > 0 && last_bucket[b] != Some(bucket) {
                    last_bucket[b] = Some(bucket);
                    left[b] -= 1;
                    reasons.push(name.to_string());
                }
            }
            if let (Some(from), Some(w)) = (within_from, policy.keep_within) {
                if c.time > from {
                    reasons.push(format!("within {w}"));
                }
            }
            if let Some(l) = c.label.as_ref().filter(|l| policy.keep_label.contains(l)) {
                reasons.push(format!("label {l}"));
            }
            Decision {
                id: c.id.clone(),
                time: c.time,
                keep: !reasons.is_empty(),
                reasons,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn cand(id: &str, t: DateTime<Utc>) -> Candidate {
        Candidate {
            id: id.into(),
            time: t,
            label: None,
            pinned: false,
        }
    }

    /// 400 days of backups at 01:30 and 13:30 UTC, some days skipped, as the test makes them.
    fn simulated_400_days() -> Vec<Candidate> {
        let start = at("2025-10-30T01:30:00Z");
        let mut out = Vec::new();
        for day in 0..400i64 {
            if day % 17 == 5 || day % 29 == 11 {
                continue; // a failed night: no backup that day
            }
            for half in [0, 12] {
                let t = start + Duration::days(day) + Duration::hours(half);
                out.push(cand(&crate::manifest::new_id(t), t));
            }
        }
        out
    }

    /// The expected set computed another way: group by calendar key, take the newest of each
    /// group, keep the N newest groups.
    fn newest_per_group(
        c: &[Candidate],
        key: impl Fn(&DateTime<Utc>) -> (i32, u32, u32),
        n: usize,
    ) -> BTreeSet<String> {
        let mut groups: BTreeMap<(i32, u32, u32), &Candidate> = BTreeMap::new();
        for x in c {
            let e = groups.entry(key(&x.time)).or_insert(x);
            if x.time > e.time {
                *e = x;
            }
        }
        groups
            .values()
            .rev()
            .take(n)
            .map(|x| x.id.clone())
            .collect()
    }

    fn kept(d: &[Decision]) -> BTreeSet<String> {
        d.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect()
    }

    #[test]
    fn gfs_over_400_simulated_days_matches_an_independent_computation() {
        let c = simulated_400_days();
        let policy = RetentionPolicy {
            keep_last: Some(3),
            keep_daily: Some(14),
            keep_weekly: Some(8),
            keep_monthly: Some(12),
            keep_yearly: Some(3),
            ..Default::default()
        };
        let got = kept(&apply(&policy, &c));
        let mut by_time = c.clone();
        by_time.sort_by_key(|x| std::cmp::Reverse(x.time));
        let mut want: BTreeSet<String> = by_time.iter().take(3).map(|x| x.id.clone()).collect();
        want.extend(newest_per_group(&c, |t| (t.year(), t.ordinal(), 0), 14));
        want.extend(newest_per_group(
            &c,
            |t| (t.iso_week().year(), t.iso_week().week(), 0),
            8,
        ));
        want.extend(newest_per_group(&c, |t| (t.year(), t.month(), 0), 12));
        want.extend(newest_per_group(&c, |t| (t.year(), 0, 0), 3));
        assert_eq!(got, want);
        // 3 last (2 of them also daily) + 14 daily + ~6 more weekly + ~10 more monthly + 1 yearly
        assert!(got.len() > 25 && got.len() < 40, "{}", got.len());
    }

    #[test]
    fn hourly_counts_only_hours_that_have_a_backup() {
        let t = at("2026-11-01T10:05:00Z");
        let c = vec![
            cand("a", t),
            cand("b", t + Duration::minutes(30)),
            cand("c", t + Duration::hours(5)),
            cand("d", t + Duration::hours(5) + Duration::minutes(1)),
        ];
        let p = RetentionPolicy {
            keep_hourly: Some(2),
            ..Default::default()
        };
        assert_eq!(kept(&apply(&p, &c)), ["b", "d"].map(String::from).into());
    }

    #[test]
    fn within_is_measured_from_the_newest_backup_not_from_now() {
        let t = at("2020-01-31T00:00:00Z");
        let c = vec![
            cand("old", t - Duration::days(40)),
            cand("edge", t - Duration::days(29)),
            cand("new", t),
        ];
        let p = RetentionPolicy {
            keep_within: Some("30d".parse().unwrap()),
            ..Default::default()
        };
        let d = apply(&p, &c);
        assert_eq!(kept(&d), ["edge", "new"].map(String::from).into());
        assert_eq!(d[0].reasons, vec!["within 30d".to_string()]);
        // A calendar month back from March 31 is February's end.
        let m: KeepWithin = "1m".parse().unwrap();
        assert_eq!(
            m.before(at("2026-03-31T12:00:00Z")),
            at("2026-02-28T12:00:00Z")
        );
    }

    #[test]
    fn pinned_and_labelled_backups_stay_and_say_why() {
        let t = at("2026-11-01T00:00:00Z");
        let mut c = vec![
            cand("a", t),
            cand("b", t + Duration::days(1)),
            cand("c", t + Duration::days(2)),
        ];
        c[0].pinned = true;
        c[1].label = Some("before-upgrade".into());
        let p = RetentionPolicy {
            keep_last: Some(1),
            keep_label: vec!["before-upgrade".into()],
            ..Default::default()
        };
        let d = apply(&p, &c);
        let reasons: Vec<(&str, Vec<String>)> = d
            .iter()
            .map(|d| (d.id.as_str(), d.reasons.clone()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("c", vec!["last".to_string()]),
                ("b", vec!["label before-upgrade".to_string()]),
                ("a", vec!["pinned".to_string()]),
            ]
        );
        assert!(d.iter().all(|d| d.keep));
    }

    #[test]
    fn durations_parse_and_bad_ones_say_how_to_write_them() {
        let w: KeepWithin = "1y6m2w3d4h".parse().unwrap();
        assert_eq!(w.months, 18);
        assert_eq!(w.hours, 14 * 24 + 3 * 24 + 4);
        assert_eq!(w.to_string(), "1y6m17d4h");
        for bad in ["", "30", "d", "3x", "-3d"] {
            let e = bad.parse::<KeepWithin>().unwrap_err();
            assert_eq!(e.exit_code(), 2);
            assert!(e.to_string().contains("30d, 2w, 1y6m"), "{e}");
        }
    }

    #[test]
    fn a_count_of_zero_is_refused_and_policies_overlay() {
        let p = RetentionPolicy {
            keep_daily: Some(0),
            ..Default::default()
        };
        let e = p.validate().unwrap_err();
        assert_eq!(
            e.to_string().lines().next().unwrap(),
            "--keep-daily 0 keeps nothing"
        );
        let base = RetentionPolicy {
            keep_daily: Some(7),
            keep_weekly: Some(4),
            ..Default::default()
        };
        let over = RetentionPolicy {
            keep_daily: Some(30),
            ..Default::default()
        };
        let both = base.overlay(&over);
        assert_eq!(both.keep_daily, Some(30));
        assert_eq!(both.keep_weekly, Some(4));
        assert_eq!(both.to_string(), "keep-daily 30, keep-weekly 4");
    }
}
