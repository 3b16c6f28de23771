//! `junit.xml`: one testsuite per platform, one testcase per patch × condition, for CI test
//! viewers; plus a `coverage` testsuite for the report-level coverage condition.

use std::time::Duration;

use quick_junit::{NonSuccessKind, Property, TestCase, TestCaseStatus, TestSuite};

use crate::report::{CellResult, Condition, Report, Status};

use super::status_name;

const CONDITIONS: [&str; 5] = ["baseline", "delivery", "install", "operations", "removal"];

fn condition<'a>(c: &'a CellResult, name: &str) -> &'a Condition {
    let k = &c.conditions;
    match name {
        "baseline" => &k.baseline,
        "delivery" => &k.delivery,
        "install" => &k.install,
        "operations" => &k.operations,
        _ => &k.removal,
    }
}

/// The failure's text: the failed checks, failing commands and the fingerprint diff.
fn description(k: &Condition) -> String {
    let mut lines = Vec::new();
    for c in k.checks.iter().filter(|c| !c.passed) {
        lines.push(format!("check {} failed after {} attempt(s): {}", c.name, c.attempts, c.detail));
    }
    for round in &k.burn_in {
        for c in round.checks.iter().filter(|c| !c.passed) {
            lines.push(format!("burn-in at {} ms: check {} failed: {}", round.at_ms, c.name, c.detail));
        }
    }
    for x in k.commands.iter().filter(|x| !x.success()) {
        let status = match (x.exit_code, x.signal) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "no exit status".into(),
        };
        lines.push(format!("command `{}`: {status}", x.command));
        if !x.stderr.text.is_empty() {
            lines.push(format!("stderr ({} bytes, sha256 {}{}):\n{}", x.stderr.bytes, x.stderr.sha256, if x.stderr.truncated { ", truncated" } else { "" }, x.stderr.text.trim_end()));
            if let Some(tail) = &x.stderr.tail {
                lines.push(format!("[... the middle is not kept; the last part:]\n{}", tail.trim_end()));
            }
        }
    }
    for d in k.delivered.iter().filter(|d| d.host_sha256 != d.guest_sha256 || d.pinned_sha256.as_ref().is_some_and(|p| !p.eq_ignore_ascii_case(&d.host_sha256))) {
        lines.push(format!("delivered {}: sha256 {} on the host, {} in the guest, {} pinned by the lab", d.file, d.host_sha256, d.guest_sha256, d.pinned_sha256.as_deref().unwrap_or("none")));
    }
    if !k.differences.is_empty() {
        lines.push("fingerprint, baseline -> after removal:".into());
        for d in &k.differences {
            if let Some(b) = &d.before {
                lines.push(format!("- {} {}: {b}", d.kind, d.item));
            }
            if let Some(a) = &d.after {
                lines.push(format!("+ {} {}: {a}", d.kind, d.item));
            }
        }
    }
    lines.join("\n")
}

fn status(k: &Condition, cell_error: Option<&str>) -> TestCaseStatus {
    let reason = k.reason.clone().or_else(|| cell_error.map(str::to_string)).unwrap_or_else(|| status_name(k.status).to_string());
    let mut s = match k.status {
        Status::Pass => return TestCaseStatus::success(),
        Status::Fail => TestCaseStatus::non_success(NonSuccessKind::Failure),
        Status::Error => TestCaseStatus::non_success(NonSuccessKind::Error),
        Status::Skipped => TestCaseStatus::skipped(),
    };
    s.set_message(reason);
    s.set_type(status_name(k.status));
    let text = description(k);
    if !text.is_empty() {
        s.set_description(text);
    }
    s
}

pub fn junit(r: &Report) -> String {
    let mut report = quick_junit::Report::new(format!("patchlab {}", r.lab.name));
    report.set_time(Duration::from_millis(r.results.iter().map(|c| c.duration_ms).sum()));
    for platform in &r.platforms {
        let mut suite = TestSuite::new(platform.name.clone());
        suite.add_property(Property::new("origin", platform.origin.clone()));
        suite.add_property(Property::new("run_id", r.run_id.clone()));
        let mut total_ms = 0;
        for patch in &r.patches {
            let cell = r.results.iter().find(|c| c.platform == platform.name && c.patch == patch.name);
            if let Some(c) = cell {
                total_ms += c.duration_ms;
            }
            for name in CONDITIONS {
                let s = match cell {
                    Some(c) => status(condition(c, name), c.error.as_deref()),
                    None => {
                        let mut s = TestCaseStatus::non_success(NonSuccessKind::Error);
                        s.set_message("no result: the run stopped before this cell finished");
                        s.set_type("error");
                        s
                    }
                };
                let mut case = TestCase::new(format!("{} / {name}", patch.name), s);
                case.set_classname(format!("{}.{}", platform.name, patch.name));
                suite.add_test_case(case);
            }
        }
        suite.set_time(Duration::from_millis(total_ms));
        report.add_test_suite(suite);
    }
    let c = &r.coverage;
    let mut coverage = TestSuite::new("coverage");
    let k = Condition {
        status: c.status,
        reason: Some(match &c.inventory {
            None => "no inventory named: coverage not evaluated".into(),
            Some(i) => format!("{} of {} hosts of {} covered; must be more than {}%{}", c.covered_hosts, c.total_hosts, i.file, c.threshold_percent, if c.uncovered_platforms.is_empty() { String::new() } else { format!("; uncovered platforms: {}", c.uncovered_platforms.join(", ")) }),
        }),
        ..Default::default()
    };
    let mut case = TestCase::new("coverage", status(&k, None));
    case.set_classname("inventory");
    if c.status == Status::Pass {
        case.set_system_out(k.reason.clone().unwrap_or_default());
    }
    coverage.add_test_case(case);
    report.add_test_suite(coverage);
    let xml = report.to_string().expect("a junit report serializes");
    strip_root_skipped(xml)
}

/// quick-junit writes a `skipped` count on `<testsuites>`, which the Jenkins JUnit schema (and
/// consumers validating with it) does not allow there; the per-suite counts carry it.
fn strip_root_skipped(xml: String) -> String {
    let Some(start) = xml.find("<testsuites") else { return xml };
    let end = xml[start..].find('>').map(|e| start + e).unwrap_or(xml.len());
    let tag = &xml[start..end];
    let Some(at) = tag.find(" skipped=\"") else { return xml };
    let close = tag[at + 10..].find('"').map(|c| at + 10 + c + 1).unwrap_or(tag.len());
    format!("{}{}{}", &xml[..start + at], &tag[close..], &xml[end..])
}

#[cfg(test)]
mod tests {
    #[test]
    fn root_skipped_count_is_dropped() {
        let xml = "<?xml version=\"1.0\"?>\n<testsuites name=\"x\" tests=\"2\" skipped=\"1\" failures=\"0\">\n<testsuite name=\"a\" skipped=\"1\"/>\n</testsuites>".to_string();
        assert_eq!(super::strip_root_skipped(xml), "<?xml version=\"1.0\"?>\n<testsuites name=\"x\" tests=\"2\" failures=\"0\">\n<testsuite name=\"a\" skipped=\"1\"/>\n</testsuites>");
    }
}
