//! The rollout journal: JSON lines, append-only. Each entry carries `prev_sha256`, the sha256 of
//! the previous line's bytes (without its newline); the first entry's is the sha256 of plan.json.
//! Editing, removing or reordering a line, or editing the plan once the journal has begun, breaks
//! the chain.
//!
//! A wave *starts* when `rollout next` first returns it: that writes a `wave-started` entry. Hosts
//! may be recorded only in a started wave, once each. Replaying the journal re-checks every rule
//! (a `wave-started` entry is valid only if `next` would have allowed it at that entry's time).

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Plan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryStatus {
    /// `rollout next` released the wave.
    WaveStarted,
    Ok,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub prev_sha256: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub wave: String,
    /// Absent for `wave-started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub status: EntryStatus,
    /// The deployment log given with `--log`, as named on the command line, and its sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_sha256: Option<String>,
}

impl Entry {
    /// The line as written, without its newline: canonical JSON.
    pub fn line(&self) -> Vec<u8> {
        serde_jcs::to_vec(self).expect("a journal entry serializes")
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The `prev_sha256` the next appended entry must carry.
pub fn chain_head(plan_bytes: &[u8], journal_bytes: &[u8]) -> String {
    let body = journal_bytes.strip_suffix(b"\n").unwrap_or(journal_bytes);
    match body.iter().rposition(|&b| b == b'\n') {
        _ if body.is_empty() => sha256_hex(plan_bytes),
        Some(i) => sha256_hex(&body[i + 1..]),
        None => sha256_hex(body),
    }
}

/// Parses the journal and checks its hash chain from the plan's bytes.
pub fn verify_chain(plan_bytes: &[u8], journal_bytes: &[u8]) -> Result<Vec<Entry>, String> {
    if journal_bytes.is_empty() {
        return Ok(Vec::new());
    }
    let lines: Vec<&[u8]> = journal_bytes.split(|&b| b == b'\n').collect();
    let (last, lines) = lines.split_last().expect("split yields at least one piece");
    if !last.is_empty() {
        return Err(format!("journal line {} does not end with a newline: the journal was cut short or edited", lines.len() + 1));
    }
    let mut prev = sha256_hex(plan_bytes);
    let mut entries = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let entry: Entry = serde_json::from_slice(line).map_err(|e| format!("journal line {n} is not a journal entry: {e}"))?;
        if !entry.prev_sha256.eq_ignore_ascii_case(&prev) {
            let what = if n == 1 { "plan.json".to_string() } else { format!("line {}", n - 1) };
            return Err(format!(
                "journal line {n}: prev_sha256 is {} but {what} has sha256 {prev}: the journal{} was edited after it was written",
                entry.prev_sha256,
                if n == 1 { " or the plan" } else { "" }
            ));
        }
        prev = sha256_hex(line);
        entries.push(entry);
    }
    Ok(entries)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostStatus {
    Ok,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub status: HostStatus,
    pub time: Timestamp,
    pub log_sha256: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WaveProgress {
    pub started_at: Option<Timestamp>,
    pub records: BTreeMap<String, Record>,
}

/// Where the rollout stands: one entry per wave of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub waves: Vec<WaveProgress>,
    /// The time of the last journal entry.
    pub last_time: Option<Timestamp>,
}

impl Progress {
    pub fn new(plan: &Plan) -> Progress {
        Progress { waves: vec![WaveProgress::default(); plan.waves.len()], last_time: None }
    }
}

/// What `rollout next` decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// This wave may start now.
    Start { wave: usize },
    /// A host of this started wave failed: no further wave starts.
    Halted { wave: usize, failed: Vec<String> },
    /// This started wave has hosts not yet recorded.
    Pending { wave: usize, hosts: Vec<String> },
    /// This wave is done; its burn time runs until then.
    Burning { wave: usize, until: Timestamp },
    /// Every wave started and every host was recorded ok.
    Done,
}

impl Decision {
    /// One line, `<word>: why`, for people and for scripts (`waiting`, `halted`, `pending`, `done`).
    pub fn reason(&self, plan: &Plan, now: Timestamp) -> String {
        let name = |w: &usize| plan.waves[*w].name.as_str();
        match self {
            Decision::Start { wave } => format!("start: wave {} ({} hosts)", name(wave), plan.waves[*wave].hosts.len()),
            Decision::Halted { wave, failed } => format!("halted: wave {} has failed hosts: {}; no further wave will start", name(wave), failed.join(", ")),
            Decision::Pending { wave, hosts } => format!("pending: wave {} has hosts not yet recorded: {}", name(wave), hosts.join(", ")),
            Decision::Burning { wave, until } => {
                let left = until.duration_since(now).as_millis().max(0) as u64;
                format!("waiting: wave {} is burning in for {} more (until {until})", name(wave), super::human_ms(left))
            }
            Decision::Done => "done: every wave has been patched".to_string(),
        }
    }
}

/// The wave that may start at `now`, or why none may.
pub fn decide_next(plan: &Plan, progress: &Progress, now: Timestamp) -> Decision {
    for (i, w) in progress.waves.iter().enumerate() {
        let failed: Vec<String> = w.records.iter().filter(|(_, r)| r.status == HostStatus::Failed).map(|(h, _)| h.clone()).collect();
        if !failed.is_empty() {
            return Decision::Halted { wave: i, failed };
        }
    }
    let next = progress.waves.iter().position(|w| w.started_at.is_none()).unwrap_or(plan.waves.len());
    if next > 0 {
        let prev = next - 1;
        let w = &progress.waves[prev];
        let pending: Vec<String> = plan.waves[prev].hosts.iter().filter(|h| !w.records.contains_key(*h)).cloned().collect();
        if !pending.is_empty() {
            return Decision::Pending { wave: prev, hosts: pending };
        }
        if next == plan.waves.len() {
            return Decision::Done;
        }
        let last = w.records.values().map(|r| r.time).max().or(w.started_at).expect("a started wave with every host recorded has a time");
        let until = last + SignedDuration::from_millis(plan.waves[prev].burn_time_ms as i64);
        if now < until {
            return Decision::Burning { wave: prev, until };
        }
    }
    if next == plan.waves.len() {
        return Decision::Done;
    }
    Decision::Start { wave: next }
}

/// Whether `host` may be recorded now: the wave that holds it, or why not.
pub fn check_record(plan: &Plan, progress: &Progress, host: &str) -> Result<usize, String> {
    if let Some(b) = plan.blocked.iter().find(|b| b.host == host) {
        return Err(format!("host {host} is blocked and in no wave: {}", b.reason));
    }
    let Some(wave) = plan.wave_of(host) else {
        return Err(format!("host {host} is not in the plan"));
    };
    let name = &plan.waves[wave].name;
    let w = &progress.waves[wave];
    if w.started_at.is_none() {
        return Err(format!("host {host} is in wave {name}, which has not started (`patchlab rollout next` starts it when it may)"));
    }
    if let Some(r) = w.records.get(host) {
        return Err(format!("host {host} was already recorded as {} at {}", if r.status == HostStatus::Ok { "ok" } else { "failed" }, r.time));
    }
    Ok(wave)
}

/// Applies one entry to `progress`, checking every rule; `n` is its line number for messages.
pub fn apply(plan: &Plan, progress: &mut Progress, entry: &Entry, n: usize) -> Result<(), String> {
    let time: Timestamp = entry.time.parse().map_err(|e| format!("journal line {n}: time `{}` is not an RFC 3339 timestamp: {e}", entry.time))?;
    if let Some(last) = progress.last_time {
        if time < last {
            return Err(format!("journal line {n}: time {time} is earlier than the entry before it ({last})"));
        }
    }
    match (entry.status, &entry.host) {
        (EntryStatus::WaveStarted, None) => {
            let wave = plan.waves.iter().position(|w| w.name == entry.wave).ok_or_else(|| format!("journal line {n}: wave `{}` is not in the plan", entry.wave))?;
            match decide_next(plan, progress, time) {
                Decision::Start { wave: w } if w == wave => progress.waves[wave].started_at = Some(time),
                d => return Err(format!("journal line {n}: wave {} could not start at {time} ({})", entry.wave, d.reason(plan, time))),
            }
        }
        (EntryStatus::WaveStarted, Some(_)) => return Err(format!("journal line {n}: a wave-started entry names no host")),
        (_, None) => return Err(format!("journal line {n}: a host entry names no host")),
        (status, Some(host)) => {
            let wave = check_record(plan, progress, host).map_err(|e| format!("journal line {n}: {e}"))?;
            if plan.waves[wave].name != entry.wave {
                return Err(format!("journal line {n}: host {host} is in wave {}, not {}", plan.waves[wave].name, entry.wave));
            }
            let status = if status == EntryStatus::Ok { HostStatus::Ok } else { HostStatus::Failed };
            progress.waves[wave].records.insert(host.clone(), Record { status, time, log_sha256: entry.log_sha256.clone() });
        }
    }
    progress.last_time = Some(time);
    Ok(())
}

/// Replays verified entries into the progress they describe, checking every rule.
pub fn replay(plan: &Plan, entries: &[Entry]) -> Result<Progress, String> {
    let mut progress = Progress::new(plan);
    for (i, e) in entries.iter().enumerate() {
        apply(plan, &mut progress, e, i + 1)?;
    }
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::InventoryRef;
    use crate::rollout::{PlanReportRef, Wave};

    fn plan() -> Plan {
        let wave = |name: &str, hosts: &[&str], burn: u64| Wave { name: name.into(), hosts: hosts.iter().map(|h| h.to_string()).collect(), burn_time_ms: burn };
        Plan {
            schema_version: 1,
            created_at: "2025-01-01T00:00:00Z".into(),
            report: PlanReportRef { file: "r.json".into(), sha256: "a".repeat(64), run_id: "r".into(), finished_at: "2025-01-01T00:00:00Z".into() },
            inventory: InventoryRef { file: "i.toml".into(), sha256: "b".repeat(64) },
            pilot_percent: 10,
            waves: vec![wave("pilot", &["a"], 60_000), wave("remaining", &["b", "c"], 60_000), wave("critical", &["d"], 120_000)],
            blocked: vec![crate::rollout::Blocked { host: "x".into(), platform: "debian 10 x86_64".into(), criticality: "low".into(), reason: "platform debian 10 x86_64 is not covered".into() }],
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_735_689_600 + secs).unwrap()
    }

    /// Appends entries as the CLI would; returns the journal bytes.
    fn journal(plan_bytes: &[u8], events: &[(i64, &str, Option<&str>, EntryStatus)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (secs, wave, host, status) in events {
            let e =
                Entry { prev_sha256: chain_head(plan_bytes, &out), time: t(*secs).to_string(), wave: wave.to_string(), host: host.map(str::to_string), status: *status, log: None, log_sha256: None };
            out.extend(e.line());
            out.push(b'\n');
        }
        out
    }

    use EntryStatus::{Failed, Ok as Done, WaveStarted};

    #[test]
    fn next_decisions() {
        let p = plan();
        type Case<'a> = (&'a str, Vec<(i64, &'a str, Option<&'a str>, EntryStatus)>, i64, Decision);
        let table: Vec<Case> = vec![
            ("nothing yet: the pilot may start", vec![], 0, Decision::Start { wave: 0 }),
            ("pilot started, nothing recorded", vec![(0, "pilot", None, WaveStarted)], 10, Decision::Pending { wave: 0, hosts: vec!["a".into()] }),
            ("pilot done, burning", vec![(0, "pilot", None, WaveStarted), (10, "pilot", Some("a"), Done)], 69, Decision::Burning { wave: 0, until: t(70) }),
            ("pilot done and burned in", vec![(0, "pilot", None, WaveStarted), (10, "pilot", Some("a"), Done)], 70, Decision::Start { wave: 1 }),
            ("pilot failed", vec![(0, "pilot", None, WaveStarted), (10, "pilot", Some("a"), Failed)], 1000, Decision::Halted { wave: 0, failed: vec!["a".into()] }),
            (
                "remaining half done",
                vec![(0, "pilot", None, WaveStarted), (10, "pilot", Some("a"), Done), (80, "remaining", None, WaveStarted), (90, "remaining", Some("c"), Done)],
                1000,
                Decision::Pending { wave: 1, hosts: vec!["b".into()] },
            ),
            (
                "a failure halts even with hosts pending",
                vec![(0, "pilot", None, WaveStarted), (10, "pilot", Some("a"), Done), (80, "remaining", None, WaveStarted), (90, "remaining", Some("c"), Failed)],
                1000,
                Decision::Halted { wave: 1, failed: vec!["c".into()] },
            ),
            (
                "burn time counts from the last host recorded",
                vec![(0, "pilot", None, WaveStarted), (10, "pilot", Some("a"), Done), (80, "remaining", None, WaveStarted), (90, "remaining", Some("c"), Done), (200, "remaining", Some("b"), Done)],
                259,
                Decision::Burning { wave: 1, until: t(260) },
            ),
            (
                "all done: the last wave's burn time does not hold `next`",
                vec![
                    (0, "pilot", None, WaveStarted),
                    (10, "pilot", Some("a"), Done),
                    (80, "remaining", None, WaveStarted),
                    (90, "remaining", Some("c"), Done),
                    (100, "remaining", Some("b"), Done),
                    (200, "critical", None, WaveStarted),
                    (210, "critical", Some("d"), Done),
                ],
                211,
                Decision::Done,
            ),
        ];
        let plan_bytes = p.canonical_bytes();
        for (case, events, now, want) in table {
            let j = journal(&plan_bytes, &events);
            let entries = verify_chain(&plan_bytes, &j).unwrap_or_else(|e| panic!("{case}: {e}"));
            let progress = replay(&p, &entries).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(decide_next(&p, &progress, t(now)), want, "{case}");
        }
    }

    #[test]
    fn replay_refuses_what_record_and_next_refuse() {
        let p = plan();
        let plan_bytes = p.canonical_bytes();
        type Case<'a> = (&'a str, Vec<(i64, &'a str, Option<&'a str>, EntryStatus)>, &'a str);
        let table: Vec<Case> = vec![
            ("host in a wave not started", vec![(0, "remaining", Some("b"), Done)], "has not started"),
            ("recorded twice", vec![(0, "pilot", None, WaveStarted), (1, "pilot", Some("a"), Done), (2, "pilot", Some("a"), Failed)], "already recorded"),
            ("blocked host", vec![(0, "pilot", None, WaveStarted), (1, "pilot", Some("x"), Done)], "blocked"),
            ("unknown host", vec![(0, "pilot", None, WaveStarted), (1, "pilot", Some("zz"), Done)], "not in the plan"),
            ("a wave started during burn time", vec![(0, "pilot", None, WaveStarted), (1, "pilot", Some("a"), Done), (30, "remaining", None, WaveStarted)], "burning in"),
            ("a wave started out of order", vec![(0, "remaining", None, WaveStarted)], "could not start"),
            ("time going backwards", vec![(10, "pilot", None, WaveStarted), (5, "pilot", Some("a"), Done)], "earlier than"),
            ("host recorded under the wrong wave", vec![(0, "pilot", None, WaveStarted), (1, "critical", Some("a"), Done)], "not critical"),
        ];
        for (case, events, want) in table {
            let j = journal(&plan_bytes, &events);
            let entries = verify_chain(&plan_bytes, &j).unwrap();
            let err = replay(&p, &entries).expect_err(case);
            assert!(err.contains(want), "{case}: {err}");
        }
    }

    #[test]
    fn the_chain_detects_edits() {
        let p = plan();
        let plan_bytes = p.canonical_bytes();
        let j = journal(&plan_bytes, &[(0, "pilot", None, WaveStarted), (10, "pilot", Some("a"), Failed), (20, "pilot", None, WaveStarted)]);
        assert_eq!(verify_chain(&plan_bytes, &j).unwrap().len(), 3);
        assert_eq!(verify_chain(&plan_bytes, b"").unwrap(), vec![]);

        let text = String::from_utf8(j.clone()).unwrap();
        let edited = text.replacen("\"failed\"", "\"ok\"", 1);
        assert!(verify_chain(&plan_bytes, edited.as_bytes()).unwrap_err().contains("journal line 3: prev_sha256"));

        let lines: Vec<&str> = text.lines().collect();
        let dropped = format!("{}\n{}\n", lines[0], lines[2]);
        assert!(verify_chain(&plan_bytes, dropped.as_bytes()).unwrap_err().contains("line 2"));

        let truncated = &j[..j.len() - 1];
        assert!(verify_chain(&plan_bytes, truncated).unwrap_err().contains("does not end with a newline"));

        let mut other_plan = p.clone();
        other_plan.waves[0].hosts.push("b".into());
        assert!(verify_chain(&other_plan.canonical_bytes(), &j).unwrap_err().contains("journal line 1: prev_sha256"));

        assert!(verify_chain(&plan_bytes, b"not json\n").unwrap_err().contains("journal line 1 is not a journal entry"));
    }

    #[test]
    fn check_record_cases() {
        let p = plan();
        let mut progress = Progress::new(&p);
        assert!(check_record(&p, &progress, "a").unwrap_err().contains("has not started"));
        progress.waves[0].started_at = Some(t(0));
        assert_eq!(check_record(&p, &progress, "a"), Ok(0));
        assert!(check_record(&p, &progress, "x").unwrap_err().contains("blocked"));
        assert!(check_record(&p, &progress, "nope").unwrap_err().contains("not in the plan"));
    }
}
