//! Real guests through the real CLI: `patchlab run labs/default.toml` passes and leaves nothing.

mod common;

use assert_cmd::Command;

#[test]
fn the_default_lab_passes_through_the_cli() {
    let Some(host) = common::host() else { return };
    let out = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    // Every `patchlab` of the test gets this TMPDIR; the leak check requires it empty.
    let tmp = tempfile::tempdir().unwrap();
    let tmpdir = common::cli_tmpdir(tmp.path());
    let keygen = Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).args(["keygen", "--identity", "release@patchlab.test", "--out"]).arg(keys.path().join("k")).output().unwrap();
    assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));
    let key = keys.path().join("k/id_ed25519");
    let allowed = keys.path().join("k/allowed_signers");
    let assert = Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).current_dir(common::root()).args(["run", "labs/default.toml", "--key"]).arg(&key).arg("--out").arg(out.path()).assert();
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
        let rounds = r["conditions"]["operations"]["burn_in"].as_array().map(Vec::len).unwrap_or(0);
        assert!(rounds >= 2, "the lab's 6 s burn-in repeated the checks every 3 s: {rounds} rounds");
        let delivered = &r["conditions"]["delivery"]["delivered"][0];
        assert_eq!(delivered["guest_sha256"], delivered["host_sha256"]);
    }
    // The patch as tested is kept beside the report, with the digest the report names.
    let file = &report["patches"][0]["files"][0];
    let kept = std::fs::read(out.path().join(file["path"].as_str().unwrap())).unwrap();
    assert_eq!(patchlab::guest::Output::capture(&kept, 0).sha256, file["sha256"].as_str().unwrap());

    // The signed report of a real run: stock OpenSSH and `patchlab verify` accept it...
    let sig = std::fs::File::open(&report_path).unwrap();
    let stock = std::process::Command::new("ssh-keygen").args(["-Y", "verify", "-f"]).arg(&allowed).args(["-I", "release@patchlab.test", "-n", "patchlab-report", "-s"]).arg(out.path().join("report.json.sig")).stdin(sig).output().unwrap();
    assert!(String::from_utf8_lossy(&stock.stdout).contains("Good \"patchlab-report\" signature"), "ssh-keygen: {} {}", String::from_utf8_lossy(&stock.stdout), String::from_utf8_lossy(&stock.stderr));
    let verify = Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).arg("verify").arg(&report_path).arg("--allowed-signers").arg(&allowed).output().unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", String::from_utf8_lossy(&verify.stdout));
    assert_eq!(report["signer"]["key_comment"], "release@patchlab.test");
    assert_eq!(report["signer"]["development"], false);
    // ...the gate approves the very file that was tested...
    let deb = out.path().join(file["path"].as_str().unwrap());
    let gate = Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).arg("gate").arg(&report_path).arg("--allowed-signers").arg(&allowed).arg("--patch").arg(&deb).args(["--min-coverage", "51"]).output().unwrap();
    assert_eq!(gate.status.code(), Some(0), "{}{}", String::from_utf8_lossy(&gate.stdout), String::from_utf8_lossy(&gate.stderr));
    // ...and a rollout plan follows from it and the inventory it was measured against.
    let plan = out.path().join("rollout");
    let planned = Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).current_dir(common::root()).arg("rollout").arg("plan").arg(&report_path).arg("--allowed-signers").arg(&allowed).args(["--inventory", "fixtures/inventory.toml", "--out"]).arg(&plan).output().unwrap();
    assert_eq!(planned.status.code(), Some(0), "{}{}", String::from_utf8_lossy(&planned.stdout), String::from_utf8_lossy(&planned.stderr));
    let plan_json = common::read_json(&plan.join("plan.json"));
    let waves = plan_json["waves"].as_array().unwrap();
    assert!(waves.len() >= 2 && waves.last().unwrap()["hosts"].as_array().unwrap().iter().any(|h| h == "db-01"), "critical hosts go last: {plan_json:#}");
    let blocked = plan_json["blocked"].to_string();
    assert!(blocked.contains("legacy-01") && blocked.contains("batch-01"), "uncovered platforms are blocked: {blocked}");
    let next = Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).arg("rollout").arg("next").arg(&plan).output().unwrap();
    assert_eq!(next.status.code(), Some(0), "{}", String::from_utf8_lossy(&next.stderr));
    assert!(!String::from_utf8_lossy(&next.stdout).trim().is_empty(), "the pilot wave may start");

    let run_id = report["run_id"].as_str().unwrap();
    let goldens: Vec<_> = std::fs::read_dir(host.dirs.golden()).unwrap().flatten().filter_map(|e| patchlab::hypervisor::golden::Golden::load(&e.path()).ok().flatten()).filter(|g| report["platforms"].as_array().unwrap().iter().any(|p| p["golden_state_sha256"] == g.record.state_sha256.as_str())).collect();
    assert_eq!(goldens.len(), 2, "both platforms' goldens are found");
    common::LeakCheck::new(&host, run_id, &goldens.iter().collect::<Vec<_>>()).with_tmpdir(&tmpdir).assert_clean();
}
