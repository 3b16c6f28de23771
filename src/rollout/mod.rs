//! The deployment phase: from a signed, passing report and the inventory it covers, a plan of
//! waves (pilot, remaining, critical), then a journal of what was patched, wave by wave.
//!
//! The decisions are pure functions: [`plan_refusals`] and [`plan_waves`] build the plan,
//! [`journal::verify_chain`] and [`journal::replay`] read the journal, [`journal::decide_next`]
//! says which wave may start at a given time, [`status::view`] summarizes. [`cli`] does the IO.
//! See docs/rollout.md.

pub mod cli;
pub mod journal;
pub mod status;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::inventory::{Criticality, Host, Inventory};
use crate::report::gate::{self, GateFacts};
use crate::report::{Coverage, InventoryRef, Report, Status};

pub const PLAN_SCHEMA_VERSION: u32 = 1;
/// In the plan directory: the plan (and `plan.json.sig` when signed) and the journal.
pub const PLAN_FILE: &str = "plan.json";
pub const JOURNAL_FILE: &str = "journal.jsonl";

pub const PILOT: &str = "pilot";
pub const REMAINING: &str = "remaining";
pub const CRITICAL: &str = "critical";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub schema_version: u32,
    pub created_at: String,
    /// The report this plan rests on.
    pub report: PlanReportRef,
    /// The inventory the waves are drawn from; the report's coverage names the same sha256.
    pub inventory: InventoryRef,
    pub pilot_percent: u32,
    /// In order; a wave with no hosts is left out.
    pub waves: Vec<Wave>,
    /// Hosts never in a wave: the lab did not pass their platform.
    pub blocked: Vec<Blocked>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanReportRef {
    pub file: String,
    pub sha256: String,
    pub run_id: String,
    pub finished_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    pub name: String,
    /// Lowest criticality first, then by name.
    pub hosts: Vec<String>,
    /// How long to watch this wave after its last host was recorded as patched, before the next one may start.
    pub burn_time_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blocked {
    pub host: String,
    pub platform: String,
    pub criticality: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    /// Share of the non-critical covered hosts in the pilot wave, rounded up (1..=100); the pilot
    /// also holds at least one host per covered platform that has non-critical hosts.
    pub pilot_percent: u32,
    /// Burn time of the pilot and remaining waves.
    pub burn_time_ms: u64,
    /// Burn time of the critical wave.
    pub critical_burn_time_ms: u64,
}

/// The waves and the blocked hosts, before they are bound to a report in a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanShape {
    pub waves: Vec<Wave>,
    pub blocked: Vec<Blocked>,
}

impl Plan {
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_jcs::to_vec(self).expect("the plan model serializes")
    }

    /// The wave holding `host`, by index.
    pub fn wave_of(&self, host: &str) -> Option<usize> {
        self.waves.iter().position(|w| w.hosts.iter().any(|h| h == host))
    }

    pub fn host_count(&self) -> usize {
        self.waves.iter().map(|w| w.hosts.len()).sum()
    }
}

/// Every reason the report gives no plan for `inventory`; empty when it may. The report must clear
/// the gate (complete, passed, recent, every cell of every platform passed) — `problems` are the
/// verification problems of its signature and files — and its coverage must be of this very
/// inventory (same sha256) and pass.
pub fn plan_refusals(report: Option<&Report>, problems: &[String], inventory: &Inventory, inventory_file: &str, now: jiff::Timestamp, max_age: jiff::SignedDuration) -> Vec<String> {
    let mut reasons: Vec<String> = problems.iter().map(|p| format!("report does not verify: {p}")).collect();
    let Some(report) = report else {
        if reasons.is_empty() {
            reasons.push("the report could not be read".into());
        }
        return reasons;
    };
    // The plan ships every file the report tested, on every platform it ran.
    let patch_files = report.patches.iter().flat_map(|p| p.files.iter().map(|f| (f.name.clone(), f.sha256.clone()))).collect();
    let platforms = report.platforms.iter().map(|p| p.name.clone()).collect();
    reasons.extend(gate::gate(report, &GateFacts { now, max_age, patch_files, platforms }));
    let c = &report.coverage;
    match &c.inventory {
        None => reasons.push(format!(
            "the report has no inventory (coverage is {}): the lab named no inventory, so the report says nothing about which hosts it covers; run the lab with `inventory = \"{inventory_file}\"`",
            status_name(c.status)
        )),
        Some(inv) if !inv.sha256.eq_ignore_ascii_case(&inventory.sha256) => reasons.push(format!(
            "the report covers inventory {} (sha256 {}), not {inventory_file} (sha256 {}): it belongs to another inventory, or the inventory changed since the lab ran",
            inv.file, inv.sha256, inventory.sha256
        )),
        Some(_) if c.status != Status::Pass => {
            reasons.push(format!("coverage is {}: {} of {} hosts covered, not above the threshold of {}%", status_name(c.status), c.covered_hosts, c.total_hosts, c.threshold_percent))
        }
        Some(_) => {}
    }
    reasons
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Pass => "pass",
        Status::Fail => "fail",
        Status::Skipped => "skipped",
        Status::Error => "error",
    }
}

/// Splits the inventory into waves from the report's coverage of it. Hosts the coverage does not
/// mark covered are blocked. Of the covered hosts, the pilot takes, for each covered platform, its
/// lowest-criticality non-critical host, then more of the lowest-criticality hosts (preferring
/// roles not yet in the pilot) up to `pilot_percent` of the non-critical hosts, rounded up; the
/// remaining non-critical hosts follow; `critical` hosts are only in the last wave.
pub fn plan_waves(inventory: &Inventory, coverage: &Coverage, opts: &PlanOptions) -> PlanShape {
    let mut blocked = Vec::new();
    let mut eligible: Vec<&Host> = Vec::new();
    for host in &inventory.hosts {
        let platform = host.platform.to_string();
        let reason = match coverage.hosts.iter().find(|c| c.host == host.name) {
            None => Some("the report's coverage does not list this host".to_string()),
            Some(c) if c.covered => None,
            Some(c) => Some(match &c.lab_platform {
                None => format!("platform {platform} is not covered: no lab platform simulates it"),
                Some(lp) => format!("platform {platform} failed in the lab (lab platform {lp})"),
            }),
        };
        match reason {
            None => eligible.push(host),
            Some(reason) => blocked.push(Blocked { host: host.name.clone(), platform, criticality: host.criticality.to_string(), reason }),
        }
    }
    let by_risk = |a: &&Host, b: &&Host| (a.criticality, &a.name).cmp(&(b.criticality, &b.name));
    let (mut critical, mut rest): (Vec<&Host>, Vec<&Host>) = eligible.into_iter().partition(|h| h.criticality == Criticality::Critical);
    critical.sort_by(by_risk);
    rest.sort_by(by_risk);

    let pct = opts.pilot_percent.clamp(1, 100) as usize;
    let target = (rest.len() * pct).div_ceil(100);
    let mut pilot: Vec<&Host> = Vec::new();
    let platforms: BTreeSet<_> = rest.iter().map(|h| &h.platform).collect();
    for p in platforms {
        if let Some(h) = rest.iter().find(|h| &h.platform == p) {
            pilot.push(h);
        }
    }
    while pilot.len() < target {
        let roles: BTreeSet<&str> = pilot.iter().map(|h| h.role.as_str()).collect();
        let next = rest.iter().filter(|h| !pilot.iter().any(|p| p.name == h.name)).min_by_key(|h| (h.criticality, roles.contains(h.role.as_str()), &h.name));
        match next {
            Some(h) => pilot.push(h),
            None => break,
        }
    }
    pilot.sort_by(by_risk);
    let remaining: Vec<&Host> = rest.iter().copied().filter(|h| !pilot.iter().any(|p| p.name == h.name)).collect();

    let names = |hosts: &[&Host]| hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>();
    let mut waves = Vec::new();
    for (name, hosts, burn) in [(PILOT, &pilot, opts.burn_time_ms), (REMAINING, &remaining, opts.burn_time_ms), (CRITICAL, &critical, opts.critical_burn_time_ms)] {
        if !hosts.is_empty() {
            waves.push(Wave { name: name.to_string(), hosts: names(hosts), burn_time_ms: burn });
        }
    }
    PlanShape { waves, blocked }
}

/// `1d2h`, `3m20s`, `450ms`: a duration for people.
pub fn human_ms(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms.div_ceil(1000);
    let (d, h, m, s) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    for (n, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::tests::{inv, lab};
    use crate::inventory::{coverage, PlatformId};

    const D12: &str = "debian 12 x86_64";
    const D13: &str = "debian 13 x86_64";
    const D10: &str = "debian 10 x86_64";

    fn opts(pilot: u32) -> PlanOptions {
        PlanOptions { pilot_percent: pilot, burn_time_ms: 1000, critical_burn_time_ms: 5000 }
    }

    fn shape(hosts: &[(&str, &str, &str)], labs: &[PlatformId], failed: &[&str], pilot: u32) -> PlanShape {
        let inventory = inv(hosts);
        let c = coverage(&inventory, "inv.toml", labs, &|n| !failed.contains(&n), 50);
        plan_waves(&inventory, &c, &opts(pilot))
    }

    fn waves(s: &PlanShape) -> Vec<(&str, Vec<&str>)> {
        s.waves.iter().map(|w| (w.name.as_str(), w.hosts.iter().map(String::as_str).collect())).collect()
    }

    fn blocked(s: &PlanShape) -> Vec<(&str, &str)> {
        s.blocked.iter().map(|b| (b.host.as_str(), b.reason.as_str())).collect()
    }

    #[test]
    fn plan_shapes() {
        let both = vec![lab("debian-12", D12), lab("debian-13", D13)];
        type Case<'a> = (&'a str, Vec<(&'a str, &'a str, &'a str)>, Vec<PlatformId>, Vec<&'a str>, u32, Vec<(&'a str, Vec<&'a str>)>, Vec<&'a str>);
        let table: Vec<Case> = vec![
            (
                "one pilot host per platform, lowest criticality first",
                vec![("web-1", D12, "medium"), ("web-2", D12, "low"), ("web-3", D13, "high"), ("web-4", D13, "medium"), ("db-1", D12, "critical")],
                both.clone(),
                vec![],
                10,
                vec![("pilot", vec!["web-2", "web-4"]), ("remaining", vec!["web-1", "web-3"]), ("critical", vec!["db-1"])],
                vec![],
            ),
            (
                "the pilot percentage is of the non-critical hosts, rounded up, preferring new roles",
                vec![("web-1", D12, "low"), ("web-2", D12, "low"), ("web-3", D12, "low"), ("cache-1", D12, "low"), ("db-1", D12, "medium"), ("db-2", D12, "critical")],
                both.clone(),
                vec![],
                40,
                vec![("pilot", vec!["cache-1", "web-1"]), ("remaining", vec!["web-2", "web-3", "db-1"]), ("critical", vec!["db-2"])],
                vec![],
            ),
            (
                "critical hosts only in the last wave, even when they are all there is",
                vec![("db-1", D12, "critical"), ("db-2", D13, "critical")],
                both.clone(),
                vec![],
                10,
                vec![("critical", vec!["db-1", "db-2"])],
                vec![],
            ),
            (
                "uncovered and failed platforms are blocked, never in a wave",
                vec![("web-1", D12, "low"), ("web-2", D12, "low"), ("web-3", D13, "low"), ("old-1", D10, "low"), ("db-1", D13, "critical")],
                both.clone(),
                vec!["debian-13"],
                10,
                vec![("pilot", vec!["web-1"]), ("remaining", vec!["web-2"])],
                vec!["db-1", "old-1", "web-3"],
            ),
            ("one platform, one host: a pilot and nothing else", vec![("web-1", D12, "high")], vec![lab("debian-12", D12)], vec![], 10, vec![("pilot", vec!["web-1"])], vec![]),
            ("100% pilot leaves no remaining wave", vec![("web-1", D12, "low"), ("web-2", D12, "medium")], both.clone(), vec![], 100, vec![("pilot", vec!["web-1", "web-2"])], vec![]),
            ("empty coverage: no wave, everything blocked", vec![("web-1", D10, "low"), ("db-1", D10, "critical")], both.clone(), vec![], 10, vec![], vec!["db-1", "web-1"]),
            ("no hosts at all", vec![], both.clone(), vec![], 10, vec![], vec![]),
        ];
        for (case, hosts, labs, failed, pilot, want_waves, want_blocked) in table {
            let s = shape(&hosts, &labs, &failed, pilot);
            assert_eq!(waves(&s), want_waves, "{case}");
            assert_eq!(s.blocked.iter().map(|b| b.host.as_str()).collect::<Vec<_>>(), want_blocked, "{case}");
            // Every host is in exactly one wave or blocked.
            let mut all: Vec<&str> = s.waves.iter().flat_map(|w| w.hosts.iter().map(String::as_str)).chain(s.blocked.iter().map(|b| b.host.as_str())).collect();
            all.sort();
            let mut names: Vec<&str> = hosts.iter().map(|h| h.0).collect();
            names.sort();
            assert_eq!(all, names, "{case}");
        }
    }

    #[test]
    fn blocked_reasons_and_burn_times() {
        let s = shape(&[("a", D12, "low"), ("b", D13, "low"), ("c", D10, "low"), ("d", D12, "critical")], &[lab("debian-12", D12), lab("debian-13", D13)], &["debian-13"], 10);
        assert_eq!(blocked(&s), vec![("b", "platform debian 13 x86_64 failed in the lab (lab platform debian-13)"), ("c", "platform debian 10 x86_64 is not covered: no lab platform simulates it")]);
        assert_eq!(s.waves.iter().map(|w| (w.name.as_str(), w.burn_time_ms)).collect::<Vec<_>>(), vec![("pilot", 1000), ("critical", 5000)]);
    }

    #[test]
    fn the_example_inventory() {
        let inventory = Inventory::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/inventory.toml"))).unwrap();
        let labs = [lab("debian-12", D12), lab("debian-13", D13)];
        let c = coverage(&inventory, "fixtures/inventory.toml", &labs, &|_| true, 50);
        assert_eq!((c.covered_hosts, c.total_hosts, c.status), (10, 13, Status::Pass));
        assert_eq!(c.uncovered_platforms, ["debian 10 x86_64", "debian 11 x86_64"]);
        let s = plan_waves(&inventory, &c, &opts(10));
        assert_eq!(waves(&s), vec![("pilot", vec!["cache-02", "web-01"]), ("remaining", vec!["web-02", "web-04", "cache-01", "web-03", "batch-03", "db-02"]), ("critical", vec!["db-01", "db-03"])]);
        assert_eq!(s.blocked.iter().map(|b| b.host.as_str()).collect::<Vec<_>>(), ["batch-01", "batch-02", "legacy-01"]);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_ms(0), "0ms");
        assert_eq!(human_ms(1500), "2s");
        assert_eq!(human_ms(90_000), "1m30s");
        assert_eq!(human_ms(86_400_000 + 3_600_000), "1d1h");
    }
}
