//! Real guests: a platform taken from a libvirt domain and snapshot the user already has.
//! The test makes such a domain itself (not named `patchlab-`: it is the user's), snapshots it
//! with a marker file inside, runs a lab on it through the CLI, and checks the clone saw the
//! snapshot's disk state and the user's domain was left as it was.

mod common;

use std::time::Duration;

use patchlab::guest::Agent;
use patchlab::hypervisor::domain_xml::{BootSpec, Identity, boot_xml};

struct UserDomain {
    name: String,
    dir: tempfile::TempDir,
}

impl Drop for UserDomain {
    fn drop(&mut self) {
        let _ = std::process::Command::new("virsh").args(["-q", "-c", common::URI, "destroy", &self.name]).output();
        let _ = std::process::Command::new("virsh").args(["-q", "-c", common::URI, "undefine", "--snapshots-metadata", &self.name]).output();
        let _ = &self.dir;
    }
}

fn virsh(args: &[&str]) -> String {
    let out = std::process::Command::new("virsh").arg("-c").arg(common::URI).args(args).output().unwrap();
    assert!(out.status.success(), "virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_users_domain_snapshot_is_a_platform() {
    let Some(host) = common::host() else { return };
    let image = patchlab::image::ensure_built(&common::root().join("images/debian-12.toml"), &host.dirs.root).unwrap();
    let accel = common::accel_for(&image);
    let name = format!("plabtest-user-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // Under /var/tmp, not /tmp's private namespace: QEMU runs as libvirt-qemu and must reach it.
    let dir = tempfile::Builder::new().prefix("plabtest-").tempdir_in("/var/tmp").unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let user = UserDomain { name: name.clone(), dir };
    let disk = user.dir.path().join("user.qcow2");
    patchlab::hypervisor::create_overlay(&image.disk, &disk).unwrap();
    let spec = BootSpec {
        identity: Identity { name: name.clone(), uuid: uuid::Uuid::new_v4().to_string(), disk: disk.clone(), console: user.dir.path().join("console.log"), ports: vec![] },
        accel,
        memory_mib: 512,
        vcpus: 1,
        kernel: Some((image.kernel.clone(), image.initrd.clone(), image.cmdline.clone())),
    };
    // A plain domain: the metadata element is harmless, but the user's domain is not patchlab's, so drop it.
    let xml = boot_xml(&spec, "user", "user");
    let xml = xml.replace(&xml[xml.find("<metadata>").unwrap()..xml.find("</metadata>").unwrap() + "</metadata>".len()], "");
    let xml_path = user.dir.path().join("domain.xml");
    std::fs::write(&xml_path, xml).unwrap();
    virsh(&["define", xml_path.to_str().unwrap()]);
    virsh(&["start", &name]);
    let domain = host.lookup(&name).unwrap();
    let channel = patchlab::hypervisor::libvirt::DomainChannel(domain);
    let agent = Agent::new(&channel, Default::default());
    agent.wait_ready(Duration::from_secs(600)).expect("the user's domain boots");
    agent.run_ok("/bin/sh", &["-c", "echo before-patch > /etc/user-marker && sync"], Duration::from_secs(60)).unwrap();
    virsh(&["snapshot-create-as", &name, "before-patch"]);
    // After the snapshot the user's domain moves on; the platform must still be the snapshot's state.
    agent.run_ok("/bin/sh", &["-c", "echo after-snapshot > /etc/user-marker && sync"], Duration::from_secs(60)).unwrap();
    virsh(&["destroy", &name]);
    let user_disk_before = patchlab::hypervisor::sha256_file(&disk).unwrap();

    let lab = user.dir.path().join("lab.toml");
    std::fs::write(
        &lab,
        format!(
            "[platforms.users-vm]\ndomain = \"{name}\"\nsnapshot = \"before-patch\"\n\n[patches.good]\nkind = \"deb\"\npackage_trees = [\"{}/fixtures/patches/good\"]\n\n[checks.marker]\nkind = \"command\"\nargv = [\"/bin/grep\", \"-qx\", \"before-patch\", \"/etc/user-marker\"]\n\n[checks.web]\nkind = \"http\"\nport = 80\n",
            common::root().display()
        ),
    )
    .unwrap();
    let out = user.dir.path().join("run");
    let tmpdir = common::cli_tmpdir(user.dir.path());
    let output = assert_cmd::Command::cargo_bin("patchlab").unwrap().env("TMPDIR", &tmpdir).args(["run"]).arg(&lab).arg("--out").arg(&out).arg("--accel").arg(accel.as_str()).output().unwrap();
    assert!(out.join("report.json").exists(), "no report; stderr: {}", String::from_utf8_lossy(&output.stderr));
    let report = common::read_json(&out.join("report.json"));
    assert_eq!(output.status.code(), Some(0), "stderr: {}\nreport: {report:#}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(report["platforms"][0]["origin"], format!("domain:{name}/before-patch"));
    let baseline = &report["results"][0]["conditions"]["baseline"]["checks"];
    assert!(baseline.as_array().unwrap().iter().all(|c| c["passed"] == true), "the clone has the snapshot's marker and nginx: {baseline:#}");

    // The user's domain and disk were only read.
    assert_eq!(patchlab::hypervisor::sha256_file(&disk).unwrap(), user_disk_before);
    assert!(virsh(&["snapshot-list", "--name", &name]).contains("before-patch"));
    let golden_dir = std::fs::read_dir(host.dirs.golden()).unwrap().flatten().map(|e| e.path()).find(|p| patchlab::hypervisor::golden::Golden::load(p).ok().flatten().is_some_and(|g| g.record.state_sha256 == report["platforms"][0]["golden_state_sha256"].as_str().unwrap())).expect("golden of the snapshot");
    let golden = patchlab::hypervisor::golden::Golden::load(&golden_dir).unwrap().unwrap();
    common::LeakCheck::new(&host, report["run_id"].as_str().unwrap(), &[&golden]).with_tmpdir(&tmpdir).assert_clean();
    // Goldens of throwaway test domains are not worth keeping in the cache.
    let _ = std::fs::remove_dir_all(&golden_dir);
}
