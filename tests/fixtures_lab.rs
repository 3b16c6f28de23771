//! Real guests: `labs/fixtures.toml` tells a good patch from each kind of bad one, on Debian 11,
//! 12 and 13, condition by condition. This is the test that shows the harness can be trusted.

mod common;

use assert_cmd::Command;
use serde_json::Value;

/// baseline, delivery, install, operations, removal
const P: &str = "pass";
const F: &str = "fail";
const S: &str = "skipped";

const EXPECTED: &[(&str, &str, [&str; 5])] = &[
    ("good", "pass", [P, P, P, P, P]),
    ("breaks-service", "fail", [P, P, P, F, S]),
    ("leaves-residue", "fail", [P, P, P, P, F]),
    ("fails-install", "fail", [P, P, F, S, S]),
    ("fails-removal", "fail", [P, P, P, P, F]),
    ("tampered", "fail", [P, F, S, S, S]),
    ("upgrade", "pass", [P, P, P, P, P]),
    ("needs-reboot", "pass", [P, P, P, P, P]),
];
const PLATFORMS: &[&str] = &["debian-11", "debian-12", "debian-13"];

fn cell<'a>(report: &'a Value, platform: &str, patch: &str) -> &'a Value {
    report["results"].as_array().unwrap().iter().find(|r| r["platform"] == platform && r["patch"] == patch).unwrap_or_else(|| panic!("no cell {platform} × {patch}"))
}

#[test]
fn the_fixtures_lab_tells_each_kind_of_bad_patch_from_a_good_one() {
    let Some(host) = common::host() else { return };
    let out = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let tmpdir = common::cli_tmpdir(scratch.path());
    let output = Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).current_dir(common::root()).args(["run", "labs/fixtures.toml", "--out"]).arg(out.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(out.path().join("report.json").exists(), "no report; stderr: {stderr}");
    let report = common::read_json(&out.path().join("report.json"));
    assert_eq!(output.status.code(), Some(1), "a lab with failing patches exits 1; stderr: {stderr}");
    assert_eq!(report["verdict"], "fail");
    assert_eq!(report["complete"], true);
    assert_eq!(report["results"].as_array().unwrap().len(), PLATFORMS.len() * EXPECTED.len());

    let kind = |name: &str| report["patches"].as_array().unwrap().iter().find(|p| p["name"] == name).map(|p| p["kind"].clone()).unwrap();
    assert_eq!((kind("good"), kind("upgrade"), kind("needs-reboot")), ("deb".into(), "upgrade".into(), "script".into()));

    let mut mismatches = Vec::new();
    for platform in PLATFORMS {
        for (patch, verdict, statuses) in EXPECTED {
            let c = cell(&report, platform, patch);
            let got: Vec<&str> = ["baseline", "delivery", "install", "operations", "removal"].iter().map(|k| c["conditions"][k]["status"].as_str().unwrap()).collect();
            if c["verdict"] != *verdict || got != statuses {
                mismatches.push(format!("{platform} × {patch}: verdict {} {got:?}, expected {verdict} {statuses:?}; error {}; reasons {}", c["verdict"], c["error"], ["delivery", "install", "operations", "removal"].iter().map(|k| format!("{k}: {}", c["conditions"][k]["reason"])).collect::<Vec<_>>().join(" | ")));
            }
        }
    }
    assert!(mismatches.is_empty(), "cells that did not get their expected verdict:\n{}", mismatches.join("\n"));

    for platform in PLATFORMS {
        // The removal proof names what the residue patch left behind.
        let residue = &cell(&report, platform, "leaves-residue")["conditions"]["removal"]["differences"];
        let items: Vec<String> = residue.as_array().unwrap().iter().map(|d| format!("{}:{}", d["kind"].as_str().unwrap(), d["item"].as_str().unwrap())).collect();
        for expected in ["user:patchlab-residue", "group:patchlab-residue", "cron:/etc/cron.d/patchlab-residue", "file:/var/lib/patchlab-residue/state"] {
            assert!(items.iter().any(|i| i == expected), "{platform}: {expected} not among the differences {items:?}");
        }
        // A clean package leaves no difference, and neither does undoing an upgrade.
        for patch in ["good", "upgrade", "needs-reboot"] {
            let differences = &cell(&report, platform, patch)["conditions"]["removal"]["differences"];
            assert!(differences.as_array().is_none_or(|d| d.is_empty()), "{platform} × {patch}: {differences:#}");
        }
        let upgrade = &cell(&report, platform, "upgrade")["conditions"]["install"]["reason"];
        assert!(upgrade.as_str().unwrap_or_default().contains("patchlab-fixture-app 1.0"), "{platform}: the upgrade kept 1.0 for removal: {upgrade}");
        let reboot = &cell(&report, platform, "needs-reboot")["conditions"]["install"]["reason"];
        assert!(reboot.as_str().unwrap_or_default().contains("rebooted"), "{platform}: the clone was rebooted: {reboot}");
        let tampered = &cell(&report, platform, "tampered")["conditions"]["delivery"]["reason"];
        assert!(tampered.as_str().unwrap_or_default().contains("pins"), "{platform}: {tampered}");
    }

    let goldens: Vec<_> = std::fs::read_dir(host.dirs.golden()).unwrap().flatten().filter_map(|e| patchlab::hypervisor::golden::Golden::load(&e.path()).ok().flatten()).filter(|g| report["platforms"].as_array().unwrap().iter().any(|p| p["golden_state_sha256"] == g.record.state_sha256.as_str())).collect();
    assert_eq!(goldens.len(), PLATFORMS.len());
    common::LeakCheck::new(&host, report["run_id"].as_str().unwrap(), &goldens.iter().collect::<Vec<_>>()).with_tmpdir(&tmpdir).assert_clean();
}
