//! Real guests: a lab spread over several libvirt hosts. Three URIs reach the local libvirtd by
//! three transports: `qemu:///system` directly, `qemu+unix:///system` through libvirt's remote
//! driver over its UNIX socket, and `qemu+tcp://127.0.0.1/system` over TCP (xtask starts libvirtd
//! with a loopback-only listener). A URI that names a host is handled as a remote host: its
//! images, golden states and clones live in its `patchlab` storage pool and go through libvirt's
//! storage, stream and domain APIs only (src/hypervisor/remote.rs).

mod common;

use std::process::Command;

const TCP: &str = "qemu+tcp://127.0.0.1/system";

#[test]
fn a_lab_is_spread_over_a_local_and_a_remote_host() {
    let Some(host) = common::host() else { return };
    let work = tempfile::tempdir().unwrap();
    let r = common::root();
    let r = r.display();
    let lab = work.path().join("fleet.toml");
    let platforms: String = ["11", "12", "13"].iter().map(|v| format!("[platforms.debian-{v}]\nimage = \"{r}/images/debian-{v}.toml\"\n")).collect();
    std::fs::write(
        &lab,
        format!(
            "name = \"fleet\"\n{platforms}[patches.a-good]\nkind = \"deb\"\npackage_trees = [\"{r}/fixtures/patches/good\"]\n[patches.b-upgrade]\nkind = \"upgrade\"\npackage_trees = [\"{r}/fixtures/patches/upgrade\"]\n[checks.web]\nkind = \"http\"\nport = 80\nstatus = 200\n"
        ),
    )
    .unwrap();
    let out = work.path().join("run");
    let tmp = common::cli_tmpdir(work.path());
    let hosts = [common::URI, "qemu+unix:///system", TCP];
    let t = std::time::Instant::now();
    let output = Command::new(assert_cmd::cargo::cargo_bin("patchlab"))
        .arg("run")
        .arg(&lab)
        .arg("--out")
        .arg(&out)
        .args(["--jobs", "2", "--ci", "--host", hosts[0], "--host", hosts[1], "--host", hosts[2]])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    eprintln!("run took {:?}", t.elapsed());
    let report = common::read_json(&out.join("report.json"));
    assert_eq!(output.status.code(), Some(0), "{}\n{report:#}", String::from_utf8_lossy(&output.stderr));
    let report_hosts: Vec<&str> = report["hosts"].as_array().unwrap().iter().map(|h| h["uri"].as_str().unwrap()).collect();
    assert_eq!(report_hosts, hosts);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 6, "3 platforms × 2 patches");
    let cell_hosts: Vec<&str> = results.iter().map(|c| c["host"].as_str().unwrap()).collect();
    assert_eq!(cell_hosts, [hosts[0], hosts[1], hosts[2], hosts[0], hosts[1], hosts[2]], "round-robin in lab order");
    assert!(results.iter().all(|c| c["verdict"] == "pass"), "{report:#}");

    // The two local transports share the cache directory's golden states; the TCP host has its
    // own, booted and saved on it, and the report names them.
    let platforms = report["platforms"].as_array().unwrap();
    assert!(report["hosts"][0].get("golden_states").is_none() && report["hosts"][1].get("golden_states").is_none(), "{report:#}");
    let remote_goldens = report["hosts"][2]["golden_states"].as_array().unwrap_or_else(|| panic!("the TCP host names its golden states: {report:#}"));
    assert_eq!(remote_goldens.len(), 3);
    for (p, g) in platforms.iter().zip(remote_goldens) {
        assert_eq!(p["name"], g["platform"]);
        assert_ne!(p["golden_state_sha256"], g["golden_state_sha256"], "a remote host boots its own golden state");
    }

    // The remote host's files are volumes of its `patchlab` pool, reached through libvirt only.
    let remote = patchlab::hypervisor::remote::PoolHost::connect(TCP, host.dirs.clone()).unwrap();
    let pool_dir = remote.pool_dir().display().to_string();
    assert!(!pool_dir.starts_with(&host.dirs.root.display().to_string()), "the pool is not the cache directory: {pool_dir}");

    let goldens: Vec<_> = std::fs::read_dir(host.dirs.golden()).unwrap().flatten().filter_map(|e| patchlab::hypervisor::golden::Golden::load(&e.path()).ok().flatten()).filter(|g| platforms.iter().any(|p| p["golden_state_sha256"] == g.record.state_sha256.as_str())).collect();
    assert_eq!(goldens.len(), 3, "the local hosts used one golden state per platform");
    let golden_refs: Vec<_> = goldens.iter().collect();
    common::LeakCheck::new(&host, report["run_id"].as_str().unwrap(), &golden_refs).with_remote(TCP).with_tmpdir(&tmp).assert_clean();
}
