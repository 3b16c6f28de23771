//! Real guests: a check that already fails on the untouched clone. By default it is reported and
//! not held against the patch; with `require_baseline = true` the cell fails at the baseline and
//! the patch is never installed.

mod common;

use std::process::Command;

fn lab(dir: &std::path::Path, require_baseline: bool) -> std::path::PathBuf {
    let r = common::root();
    let r = r.display();
    let path = dir.join(format!("baseline-{require_baseline}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"baseline\"\n[settings]\nrequire_baseline = {require_baseline}\n[platforms.debian-12]\nimage = \"{r}/images/debian-12.toml\"\n[patches.good]\nkind = \"deb\"\npackage_trees = [\"{r}/fixtures/patches/good\"]\n[checks.web]\nkind = \"http\"\nport = 80\nstatus = 200\n[checks.nothing-on-81]\nkind = \"tcp\"\nport = 81\ntimeout = \"2s\"\nretries = 0\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_check_failing_before_the_patch_is_held_against_it_only_when_the_lab_says_so() {
    let Some(host) = common::host() else { return };
    let work = tempfile::tempdir().unwrap();
    let tmp = common::cli_tmpdir(work.path());
    for require in [true, false] {
        let out = work.path().join(format!("run-{require}"));
        let output = Command::new(assert_cmd::cargo::cargo_bin("patchlab")).arg("run").arg(lab(work.path(), require)).arg("--out").arg(&out).arg("--ci").env("TMPDIR", &tmp).output().unwrap();
        let report = common::read_json(&out.join("report.json"));
        let cell = &report["results"][0];
        let baseline = &cell["conditions"]["baseline"];
        let checks: Vec<(&str, bool)> = baseline["checks"].as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap(), c["passed"].as_bool().unwrap())).collect();
        assert_eq!(checks, [("nothing-on-81", false), ("web", true)], "{report:#}");
        if require {
            assert_eq!(output.status.code(), Some(1), "a failed cell: {}", String::from_utf8_lossy(&output.stderr));
            assert_eq!(cell["verdict"], "fail");
            assert_eq!(baseline["status"], "fail");
            assert!(baseline["reason"].as_str().unwrap().contains("the lab requires all to pass: nothing-on-81"), "{baseline:#}");
            assert_eq!(cell["conditions"]["install"]["status"], "skipped", "never installed: {cell:#}");
        } else {
            assert_eq!(output.status.code(), Some(0), "{}\n{report:#}", String::from_utf8_lossy(&output.stderr));
            assert_eq!(cell["verdict"], "pass");
            assert_eq!(baseline["status"], "pass");
            assert!(baseline["reason"].as_str().unwrap().contains("not held against it: nothing-on-81"), "{baseline:#}");
            // Only checks that worked before count as operations that must still work.
            let after: Vec<&str> = cell["conditions"]["operations"]["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
            assert_eq!(after, ["web"], "{cell:#}");
        }
        common::LeakCheck::new(&host, report["run_id"].as_str().unwrap(), &[]).with_tmpdir(&tmp).assert_clean();
    }
}
