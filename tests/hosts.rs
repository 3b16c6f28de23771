//! Real guests: cells spread round-robin over several libvirt URIs. Both URIs reach the local
//! libvirtd (`qemu:///system` directly, `qemu+unix:///system` through libvirt's remote driver over
//! its UNIX socket), which is what works today; see docs/lab-format.md (`hosts`).

mod common;

use std::process::Command;

#[test]
fn cells_are_spread_over_hosts_round_robin() {
    let Some(host) = common::host() else { return };
    let work = tempfile::tempdir().unwrap();
    let r = common::root();
    let r = r.display();
    let lab = work.path().join("hosts.toml");
    std::fs::write(
        &lab,
        format!(
            "name = \"hosts\"\n[platforms.debian-12]\nimage = \"{r}/images/debian-12.toml\"\n[patches.a-good]\nkind = \"deb\"\npackage_trees = [\"{r}/fixtures/patches/good\"]\n[patches.b-upgrade]\nkind = \"upgrade\"\npackage_trees = [\"{r}/fixtures/patches/upgrade\"]\n[checks.web]\nkind = \"http\"\nport = 80\nstatus = 200\n"
        ),
    )
    .unwrap();
    let out = work.path().join("run");
    let hosts = [common::URI, "qemu+unix:///system"];
    let t = std::time::Instant::now();
    let output = Command::new(assert_cmd::cargo::cargo_bin("patchlab")).arg("run").arg(&lab).arg("--out").arg(&out).args(["--jobs", "2", "--ci", "--host", hosts[0], "--host", hosts[1]]).output().unwrap();
    eprintln!("run took {:?}", t.elapsed());
    let report = common::read_json(&out.join("report.json"));
    assert_eq!(output.status.code(), Some(0), "{}\n{report:#}", String::from_utf8_lossy(&output.stderr));
    let report_hosts: Vec<&str> = report["hosts"].as_array().unwrap().iter().map(|h| h["uri"].as_str().unwrap()).collect();
    assert_eq!(report_hosts, hosts);
    let cell_hosts: Vec<&str> = report["results"].as_array().unwrap().iter().map(|c| c["host"].as_str().unwrap()).collect();
    assert_eq!(cell_hosts, hosts, "one cell per host, in lab order");
    let goldens: Vec<_> = std::fs::read_dir(host.dirs.golden()).unwrap().flatten().filter_map(|e| patchlab::hypervisor::golden::Golden::load(&e.path()).ok().flatten()).filter(|g| report["platforms"][0]["golden_state_sha256"] == g.record.state_sha256.as_str()).collect();
    assert_eq!(goldens.len(), 1, "both hosts used the same golden state");
    common::LeakCheck::new(&host, report["run_id"].as_str().unwrap(), &[&goldens[0]]).assert_clean();
}
