//! Timeline history files (`pg_wal/0000000N.history`).
//!
//! Each line records one ancestor timeline: `parentTLI<TAB>switchpoint<TAB>reason`, where the
//! switchpoint is the LSN at which the next timeline branched off. Blank lines and lines starting
//! with `#` are ignored, as PostgreSQL does.

use crate::error::{PgError, Result};
use crate::lsn::Lsn;

/// One line of a history file: `timeline` was followed by the next one at `switchpoint`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineHistoryEntry {
    /// The ancestor timeline.
    pub timeline: u32,
    /// Where the ancestor ended (first LSN of the next timeline).
    pub switchpoint: Lsn,
    /// Free-text reason (e.g. "no recovery target specified").
    pub reason: String,
}

/// The parsed history of timeline `timeline`: its ancestors, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineHistory {
    /// The timeline whose history this is (the N of `0000000N.history`).
    pub timeline: u32,
    /// Ancestors in ascending timeline order.
    pub entries: Vec<TimelineHistoryEntry>,
}

impl TimelineHistory {
    /// Parse the text of `0000000N.history` for timeline `timeline`. Ancestor timelines must be
    /// increasing, below `timeline`, with non-decreasing switchpoints.
    pub fn parse(timeline: u32, text: &str) -> Result<Self> {
        let mut entries: Vec<TimelineHistoryEntry> = Vec::new();
        for (no, raw) in text.lines().enumerate() {
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |reason: &str| {
                PgError::parse(
                    "timeline history line",
                    raw,
                    format!("line {}: {reason}", no + 1),
                )
            };
            let mut parts = line.splitn(3, ['\t', ' ']);
            let tli: u32 = parts
                .next()
                .unwrap_or("")
                .parse()
                .map_err(|_| bad("timeline is not a number"))?;
            let sp: Lsn = parts
                .next()
                .map(str::trim)
                .ok_or_else(|| bad("missing switchpoint"))?
                .parse()
                .map_err(|_| bad("switchpoint is not an LSN"))?;
            let reason = parts.next().unwrap_or("").trim().to_string();
            if let Some(prev) = entries.last() {
                if tli <= prev.timeline {
                    return Err(bad("timelines must increase"));
                }
                if sp < prev.switchpoint {
                    return Err(bad("switchpoints must not decrease"));
                }
            }
            if tli >= timeline {
                return Err(bad("ancestor timeline not below the file's timeline"));
            }
            entries.push(TimelineHistoryEntry {
                timeline: tli,
                switchpoint: sp,
                reason,
            });
        }
        Ok(TimelineHistory { timeline, entries })
    }

    /// Format as PostgreSQL writes it (tab-separated, one line per ancestor).
    pub fn to_text(&self) -> String {
        self.entries
            .iter()
            .map(|e| format!("{}\t{}\t{}\n", e.timeline, e.switchpoint, e.reason))
            .collect()
    }

    /// Every timeline of this history, oldest first, including `self.timeline`.
    pub fn timelines(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.entries.iter().map(|e| e.timeline).collect();
        v.push(self.timeline);
        v
    }

    /// The timeline that was current at `lsn` along this history (PostgreSQL's
    /// tliOfPointInHistory): the first ancestor whose switchpoint is after `lsn`, else the
    /// newest timeline.
    pub fn timeline_at(&self, lsn: Lsn) -> u32 {
        self.entries
            .iter()
            .find(|e| lsn < e.switchpoint)
            .map(|e| e.timeline)
            .unwrap_or(self.timeline)
    }

    /// Where `tli` ended in this history, `None` if it is the newest (it has not ended) or is
    /// not part of the history.
    pub fn switchpoint_of(&self, tli: u32) -> Option<Lsn> {
        self.entries
            .iter()
            .find(|e| e.timeline == tli)
            .map(|e| e.switchpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "1\t0/3000000\tno recovery target specified\n\n# comment\n2\t0/5000120\tat restore point \"before\"\n";

    #[test]
    fn parse_and_format() {
        let h = TimelineHistory::parse(3, TEXT).unwrap();
        assert_eq!(h.entries.len(), 2);
        assert_eq!(h.entries[0].timeline, 1);
        assert_eq!(h.entries[0].switchpoint.to_string(), "0/3000000");
        assert_eq!(h.entries[1].reason, "at restore point \"before\"");
        assert_eq!(h.timelines(), [1, 2, 3]);
        let again = TimelineHistory::parse(3, &h.to_text()).unwrap();
        assert_eq!(again, h);
        assert_eq!(
            h.to_text(),
            "1\t0/3000000\tno recovery target specified\n2\t0/5000120\tat restore point \"before\"\n"
        );
    }

    #[test]
    fn timeline_at_points() {
        let h = TimelineHistory::parse(3, TEXT).unwrap();
        assert_eq!(h.timeline_at("0/2FFFFFF".parse().unwrap()), 1);
        assert_eq!(h.timeline_at("0/3000000".parse().unwrap()), 2);
        assert_eq!(h.timeline_at("0/6000000".parse().unwrap()), 3);
        assert_eq!(h.switchpoint_of(2), Some("0/5000120".parse().unwrap()));
        assert_eq!(h.switchpoint_of(3), None);
    }

    #[test]
    fn rejects_bad_histories() {
        assert!(TimelineHistory::parse(3, "x\t0/1\tr\n").is_err());
        assert!(TimelineHistory::parse(3, "1\tnope\tr\n").is_err());
        assert!(TimelineHistory::parse(3, "2\t0/1\tr\n1\t0/2\tr\n").is_err());
        assert!(TimelineHistory::parse(3, "1\t0/5\tr\n2\t0/2\tr\n").is_err());
        assert!(TimelineHistory::parse(2, "2\t0/5\tr\n").is_err());
        assert!(TimelineHistory::parse(2, "1\n").is_err());
        assert_eq!(TimelineHistory::parse(1, "").unwrap().entries.len(), 0);
    }
}
