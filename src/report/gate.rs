//! The release gate: may these patch files ship on the strength of this report? A pure function
//! over a parsed, verified report and facts the caller gathered (the time, the patch files' digests).

use jiff::{SignedDuration, Timestamp};

use super::{Report, Verdict};

/// What the gate is asked, besides the report.
#[derive(Debug, Clone)]
pub struct GateFacts {
    pub now: Timestamp,
    /// The report must have finished no longer ago than this.
    pub max_age: SignedDuration,
    /// The files about to ship: (how to name it in a reason, lowercase hex sha256).
    pub patch_files: Vec<(String, String)>,
    /// Platforms every one of whose cells must have passed.
    pub platforms: Vec<String>,
}

/// Clock skew tolerated before a report's finished_at counts as "in the future".
const SKEW: SignedDuration = SignedDuration::from_secs(300);

/// Every reason the report does not clear the gate; empty when it does.
pub fn gate(report: &Report, facts: &GateFacts) -> Vec<String> {
    let mut reasons = Vec::new();
    if !report.complete {
        reasons.push("report is incomplete: the run stopped before every cell finished".to_string());
    }
    if report.verdict != Verdict::Pass {
        reasons.push(format!("report verdict is {}, not pass", verdict_name(report.verdict)));
    }
    match report.finished_at.parse::<Timestamp>() {
        Err(e) => reasons.push(format!("report finished_at `{}` is not a timestamp: {e}", report.finished_at)),
        Ok(finished) => {
            let age = facts.now.duration_since(finished);
            if age > facts.max_age {
                reasons.push(format!("report finished at {finished}, {} ago, older than the maximum age {}", human(age), human(facts.max_age)));
            } else if age < -SKEW {
                reasons.push(format!("report finished at {finished}, which is in the future"));
            }
        }
    }
    if facts.patch_files.is_empty() {
        reasons.push("no patch file given: the gate approves specific files".to_string());
    }
    for (name, digest) in &facts.patch_files {
        let tested = report.patches.iter().flat_map(|p| p.files.iter().map(move |f| (p, f))).find(|(_, f)| f.sha256.eq_ignore_ascii_case(digest));
        if tested.is_none() {
            reasons.push(format!("patch file {name} (sha256 {digest}) is not a file this report tested"));
        }
    }
    for platform in &facts.platforms {
        let cells: Vec<_> = report.results.iter().filter(|c| &c.platform == platform).collect();
        if !report.platforms.iter().any(|p| &p.name == platform) {
            reasons.push(format!("platform {platform} is not in the report"));
            continue;
        }
        let expected = report.patches.len();
        if cells.len() < expected {
            reasons.push(format!("platform {platform}: {} of {expected} cells have a result", cells.len()));
        }
        for cell in cells.iter().filter(|c| c.verdict != Verdict::Pass) {
            reasons.push(format!("platform {platform}: patch {} is {}{}", cell.patch, verdict_name(cell.verdict), cell.error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()));
        }
    }
    reasons
}

/// `gate --min-coverage PERCENT`: the report's coverage condition passed, and the covered share
/// of the inventory's hosts is at least `min_percent` (integers: covered × 100 ≥ min × total).
pub fn coverage_gate(report: &Report, min_percent: u32) -> Vec<String> {
    let c = &report.coverage;
    let mut reasons = Vec::new();
    if c.status != super::Status::Pass {
        let why = if c.inventory.is_none() { " (the lab names no inventory)" } else { "" };
        let status = match c.status {
            super::Status::Pass => "pass",
            super::Status::Fail => "fail",
            super::Status::Skipped => "skipped",
            super::Status::Error => "error",
        };
        reasons.push(format!("coverage status is {status}, not pass{why}"));
    }
    if u64::from(c.covered_hosts) * 100 < u64::from(min_percent) * u64::from(c.total_hosts) {
        reasons.push(format!("coverage {} of {} inventory hosts is below the minimum {min_percent}%", c.covered_hosts, c.total_hosts));
    }
    reasons
}

pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Pass => "pass",
        Verdict::Fail => "fail",
        Verdict::Error => "error",
    }
}

fn human(d: SignedDuration) -> String {
    let s = d.as_secs().unsigned_abs();
    let sign = if d.is_negative() { "-" } else { "" };
    match s {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{sign}{}d", s / 86_400),
        s if s >= 86_400 => format!("{sign}{}d{}h", s / 86_400, (s % 86_400) / 3600),
        s if s >= 3600 => format!("{sign}{}h{}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{sign}{}m{}s", s / 60, s % 60),
        s => format!("{sign}{s}s"),
    }
}

/// Parses a duration such as `7d`, `36h`, `1w2d`, `90m`, `45s` (units w, d, h, m, s; a day is 24h).
pub fn parse_duration(s: &str) -> Result<SignedDuration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            'w' => 7 * 86_400,
            'd' => 86_400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(format!("`{s}`: unknown unit `{c}` (use w, d, h, m or s, e.g. 7d)")),
        };
        let n: i64 = num.parse().map_err(|_| format!("`{s}`: expected a number before `{c}`"))?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(|| format!("`{s}`: too long"))?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!("`{s}`: missing a unit after {num} (use w, d, h, m or s, e.g. 7d)"));
    }
    Ok(SignedDuration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{CellResult, Conditions, FileRef, LabRef, PatchRef, PlatformRef, Tool};

    fn cell(platform: &str, patch: &str, verdict: Verdict) -> CellResult {
        CellResult { platform: platform.into(), patch: patch.into(), verdict, host: "h".into(), clone: "c".into(), error: None, conditions: Conditions::default(), phases: vec![], duration_ms: 1, evidence: vec![] }
    }

    fn platform(name: &str) -> PlatformRef {
        PlatformRef { name: name.into(), origin: format!("image:{name}"), os: Some("debian".into()), version: Some("12".into()), arch: Some("x86_64".into()), image_recipe_digest: None, image_disk_sha256: None, golden_disk_sha256: "g".into(), golden_state_sha256: "s".into() }
    }

    fn good() -> Report {
        Report {
            schema_version: crate::report::SCHEMA_VERSION,
            run_id: "r".into(),
            complete: true,
            verdict: Verdict::Pass,
            lab: LabRef { name: "lab".into(), file: "lab.toml".into(), sha256: "x".into() },
            patchlab: Tool { version: "0".into(), commit: "c".into() },
            hosts: vec![],
            started_at: "2025-01-01T00:00:00Z".into(),
            finished_at: "2025-01-01T01:00:00Z".into(),
            platforms: vec![platform("debian"), platform("ubuntu")],
            patches: vec![PatchRef { name: "fix".into(), kind: "deb".into(), files: vec![FileRef { name: "fix.deb".into(), path: "patches/fix/fix.deb".into(), sha256: "aa".into(), package: "fix".into() }] }],
            coverage: Default::default(),
            results: vec![cell("debian", "fix", Verdict::Pass), cell("ubuntu", "fix", Verdict::Pass)],
            signer: None,
        }
    }

    fn facts() -> GateFacts {
        GateFacts { now: "2025-01-02T00:00:00Z".parse().unwrap(), max_age: SignedDuration::from_hours(7 * 24), patch_files: vec![("fix.deb".into(), "aa".into())], platforms: vec!["debian".into()] }
    }

    /// The facts of a gate call, plus `--min-coverage` when given.
    struct Facts {
        gate: GateFacts,
        min_coverage: Option<u32>,
    }

    impl std::ops::Deref for Facts {
        type Target = GateFacts;
        fn deref(&self) -> &GateFacts {
            &self.gate
        }
    }

    impl std::ops::DerefMut for Facts {
        fn deref_mut(&mut self) -> &mut GateFacts {
            &mut self.gate
        }
    }

    fn covered(r: &mut Report, status: crate::report::Status, covered: u32, total: u32) {
        r.coverage.status = status;
        r.coverage.inventory = Some(crate::report::InventoryRef { file: "inventory.toml".into(), sha256: "ii".into() });
        r.coverage.covered_hosts = covered;
        r.coverage.total_hosts = total;
    }

    #[test]
    fn table() {
        use crate::report::Status;
        type Edit = fn(&mut Report, &mut Facts);
        let table: &[(&str, Edit, &[&str])] = &[
            ("all good", |_, _| {}, &[]),
            ("incomplete", |r, _| r.complete = false, &["incomplete"]),
            ("verdict fail", |r, _| r.verdict = Verdict::Fail, &["verdict is fail"]),
            ("old", |_, f| f.now = "2025-02-01T00:00:00Z".parse().unwrap(), &["older than the maximum age 7d"]),
            ("future", |_, f| f.now = "2024-12-01T00:00:00Z".parse().unwrap(), &["in the future"]),
            ("bad timestamp", |r, _| r.finished_at = "yesterday".into(), &["not a timestamp"]),
            ("wrong patch file", |_, f| f.patch_files = vec![("other.deb".into(), "bb".into())], &["patch file other.deb (sha256 bb) is not a file this report tested"]),
            ("no patch file", |_, f| f.patch_files.clear(), &["no patch file"]),
            (
                "named platform failed",
                |r, f| {
                    r.results[1].verdict = Verdict::Fail;
                    r.verdict = Verdict::Fail;
                    f.platforms = vec!["ubuntu".into()];
                },
                &["verdict is fail", "platform ubuntu: patch fix is fail"],
            ),
            ("unnamed platform failed, other named", |r, _| r.results[1].verdict = Verdict::Error, &[]),
            ("unknown platform", |_, f| f.platforms = vec!["arch".into()], &["platform arch is not in the report"]),
            ("missing cell", |r, _| {
                r.results.remove(0);
            }, &["platform debian: 0 of 1 cells"]),
            (
                "several at once",
                |r, f| {
                    r.complete = false;
                    r.verdict = Verdict::Error;
                    f.patch_files.push(("x.deb".into(), "cc".into()));
                },
                &["incomplete", "verdict is error", "x.deb"],
            ),
            ("coverage not asked, not evaluated", |_, _| {}, &[]),
            ("coverage at the minimum", |r, f| {
                covered(r, Status::Pass, 3, 5);
                f.min_coverage = Some(60);
            }, &[]),
            ("coverage above the minimum", |r, f| {
                covered(r, Status::Pass, 5, 5);
                f.min_coverage = Some(100);
            }, &[]),
            ("coverage below the minimum", |r, f| {
                covered(r, Status::Pass, 3, 5);
                f.min_coverage = Some(61);
            }, &["coverage 3 of 5 inventory hosts is below the minimum 61%"]),
            ("coverage failed", |r, f| {
                covered(r, Status::Fail, 2, 5);
                f.min_coverage = Some(40);
            }, &["coverage status is fail, not pass"]),
            ("coverage failed and below", |r, f| {
                covered(r, Status::Fail, 1, 5);
                f.min_coverage = Some(50);
            }, &["coverage status is fail", "coverage 1 of 5 inventory hosts is below the minimum 50%"]),
            ("coverage asked, no inventory", |_, f| f.min_coverage = Some(0), &["coverage status is skipped, not pass (the lab names no inventory)"]),
        ];
        for (name, edit, want) in table {
            let (mut r, mut f) = (good(), Facts { gate: facts(), min_coverage: None });
            edit(&mut r, &mut f);
            let mut got = gate(&r, &f);
            if let Some(min) = f.min_coverage {
                got.extend(coverage_gate(&r, min));
            }
            assert_eq!(got.len(), want.len(), "{name}: {got:?}");
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(g.contains(w), "{name}: `{g}` lacks `{w}`");
            }
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7d").unwrap(), SignedDuration::from_hours(168));
        assert_eq!(parse_duration("1w2d").unwrap(), SignedDuration::from_hours(216));
        assert_eq!(parse_duration("90m").unwrap(), SignedDuration::from_secs(5400));
        assert_eq!(parse_duration("45s").unwrap(), SignedDuration::from_secs(45));
        for bad in ["", "7", "d", "7x", "1.5d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
