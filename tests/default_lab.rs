//! Real guests through the real CLI: `patchlab run labs/default.toml` passes and leaves nothing.

mod common;

use assert_cmd::Command;

#[test]
fn the_default_lab_passes_through_the_cli() {
    let Some(host) = common::host() else { return };
    let out = tempfile::tempdir().unwrap();
    let assert = Command::cargo_bin("patchlab").unwrap().current_dir(common::root()).args(["run", "labs/default.toml", "--out"]).arg(out.path()).assert();
    let output = assert.get_output().clone();
    let report_path = out.path().join("report.json");
    let report = common::read_json(&report_path);
    assert_eq!(output.status.code(), Some(0), "stderr: {}\nreport: {report:#}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains(&report_path.display().to_string()), "the CLI says where the report is");
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["verdict"], "pass");
    assert_eq!(report["complete"], true);
    let results = report["results"].as_array().unwrap();
    let mut cells: Vec<(String, String, String)> = results.iter().map(|r| (r["platform"].as_str().unwrap().into(), r["patch"].as_str().unwrap().into(), r["verdict"].as_str().unwrap().into())).collect();
    cells.sort();
    assert_eq!(cells, [("debian-12".into(), "good".into(), "pass".into()), ("debian-13".into(), "good".into(), "pass".into())]);
    for r in results {
        for condition in ["baseline", "delivery", "install", "operations", "removal"] {
            assert_eq!(r["conditions"][condition]["status"], "pass", "{condition} of {}", r["platform"]);
        }
        let delivered = &r["conditions"]["delivery"]["delivered"][0];
        assert_eq!(delivered["guest_sha256"], delivered["host_sha256"]);
    }
    // The patch as tested is kept beside the report, with the digest the report names.
    let file = &report["patches"][0]["files"][0];
    let kept = std::fs::read(out.path().join(file["path"].as_str().unwrap())).unwrap();
    assert_eq!(patchlab::guest::Output::capture(&kept, 0).sha256, file["sha256"].as_str().unwrap());

    let run_id = report["run_id"].as_str().unwrap();
    let goldens: Vec<_> = std::fs::read_dir(host.dirs.golden()).unwrap().flatten().filter_map(|e| patchlab::hypervisor::golden::Golden::load(&e.path()).ok().flatten()).filter(|g| report["platforms"].as_array().unwrap().iter().any(|p| p["golden_state_sha256"] == g.record.state_sha256.as_str())).collect();
    assert_eq!(goldens.len(), 2, "both platforms' goldens are found");
    common::LeakCheck::new(&host, run_id, &goldens.iter().collect::<Vec<_>>()).assert_clean();
}
