//! Real guests and a real Debian security update: libssl3 from bookworm-security, downloaded by
//! the host's apt, qualified as an `upgrade` on a bookworm image built without bookworm-security.
//! Removal must put back the exact previous libssl3, so the fingerprint equals the baseline.

mod common;

use assert_cmd::Command;

#[test]
fn a_real_bookworm_security_update_qualifies_as_an_upgrade() {
    let Some(host) = common::host() else { return };
    let codename = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    if !codename.contains("VERSION_CODENAME=bookworm") {
        assert!(std::env::var_os("PATCHLAB_REQUIRE_LAB").is_none(), "this test downloads from bookworm-security and needs a bookworm host");
        eprintln!("SKIPPED: not a bookworm host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The host's apt knows bookworm-security (Debian's default sources); the package registry is
    // the one network this machine has.
    let download = std::process::Command::new("apt-get").args(["download", "-q", "libssl3/bookworm-security"]).current_dir(dir.path()).output().unwrap();
    assert!(download.status.success(), "apt-get download libssl3/bookworm-security: {}", String::from_utf8_lossy(&download.stderr));
    let deb = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "deb")).expect("a downloaded .deb");
    let lab = dir.path().join("lab.toml");
    std::fs::write(
        &lab,
        format!(
            "name = \"security-update\"\n\n[platforms.debian-12-point]\nimage = \"{root}/images/debian-12-point.toml\"\n\n[patches.libssl3]\nkind = \"upgrade\"\nfiles = [\"{deb}\"]\n\n[checks.web]\nkind = \"http\"\nport = 80\n\n[checks.openssl-loads]\nkind = \"command\"\nargv = [\"/usr/sbin/nginx\", \"-t\"]\n",
            root = common::root().display(),
            deb = deb.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("run");
    let tmpdir = common::cli_tmpdir(dir.path());
    let output = Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).args(["run"]).arg(&lab).arg("--out").arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(out.join("report.json").exists(), "no report; stderr: {stderr}");
    let report = common::read_json(&out.join("report.json"));
    let cell = &report["results"][0];
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}\ncell: {cell:#}");
    for condition in ["baseline", "delivery", "install", "operations", "removal"] {
        assert_eq!(cell["conditions"][condition]["status"], "pass", "{condition}: {cell:#}");
    }
    let kept = cell["conditions"]["install"]["reason"].as_str().unwrap_or_default();
    assert!(kept.contains("libssl3") && kept.contains("repacked"), "the previous libssl3 was kept: {kept}");
    let installed = &cell["conditions"]["install"]["commands"][0]["stdout"]["text"];
    assert!(installed.as_str().unwrap_or_default().contains("over ("), "dpkg upgraded an installed version: {installed}");
    let golden = std::fs::read_dir(host.dirs.golden()).unwrap().flatten().filter_map(|e| patchlab::hypervisor::golden::Golden::load(&e.path()).ok().flatten()).find(|g| report["platforms"][0]["golden_state_sha256"] == g.record.state_sha256.as_str()).unwrap();
    common::LeakCheck::new(&host, report["run_id"].as_str().unwrap(), &[&golden]).with_tmpdir(&tmpdir).assert_clean();
}
