//! Real guests: the state fingerprint absorbs the noise of a running system, sees nothing after a
//! clean install and purge, and names every piece of residue.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use patchlab::fingerprint::{self, Fingerprint, FingerprintSpec};
use patchlab::guest::Agent;
use patchlab::hypervisor::Machine;
use patchlab::hypervisor::runlock::{RunLock, new_run_id};
use patchlab::report::Difference;

/// One clone at a time: two TCG guests on a small host would slow each other's captures, and the
/// capture times are measured.
static SERIAL: Mutex<()> = Mutex::new(());

const T: Duration = Duration::from_secs(120);

/// Restores a clone of `platform`, runs `scenario` on its agent, tears down on every path and
/// checks that nothing is left behind.
fn on_clone(platform: &str, recipe: &str, scenario: impl FnOnce(&Agent<'_>)) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(host) = common::host() else { return };
    let run_id = new_run_id();
    let _lock = RunLock::acquire(&host.dirs, &run_id).unwrap();
    let golden = common::golden(&host, platform, recipe, &run_id);
    let leaks = common::LeakCheck::new(&host, &run_id, &[&golden]);
    let mut clone = host.restore_clone(&golden, &run_id, &format!("patchlab-{run_id}-fp"), &[]).expect("restore clone");
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let agent = Agent::new(clone.agent_channel(), Default::default());
        agent.wait_ready(Duration::from_secs(60)).expect("agent answers after restore");
        // As a cell does right after restore.
        agent.set_time_now().expect("clock set");
        scenario(&agent);
    }));
    clone.teardown().expect("teardown");
    leaks.assert_clean();
    if let Err(panic) = outcome {
        resume_unwind(panic);
    }
}

fn timed_capture(agent: &Agent<'_>, spec: &FingerprintSpec, platform: &str, what: &str) -> Fingerprint {
    let started = Instant::now();
    let fp = fingerprint::capture(agent, spec).unwrap_or_else(|e| panic!("capture ({what}): {e}"));
    eprintln!("{platform}: capture {what}: {} entries in {} ms (wall {} ms)", fp.entries.len(), fp.capture_ms, started.elapsed().as_millis());
    fp
}

fn show(differences: &[Difference]) -> String {
    differences.iter().map(|d| format!("\n  {}:{:?} {:?} -> {:?}", d.kind, d.item, d.before, d.after)).collect()
}

fn assert_no_differences(before: &Fingerprint, after: &Fingerprint, spec: &FingerprintSpec, what: &str) {
    let out = fingerprint::diff(before, after, spec);
    let (_, allowed) = fingerprint::diff_detailed(before, after, spec);
    eprintln!("{what}: {} differences, {} allowed:{}", out.differences.len(), out.allowed, show(&allowed));
    assert!(out.differences.is_empty(), "{what}: unexpected differences:{}", show(&out.differences));
}

fn sh(agent: &Agent<'_>, script: &str) -> String {
    agent.run_ok("/bin/sh", &["-c", script], T).unwrap_or_else(|e| panic!("{script}: {e}"))
}

/// A small package with a conffile, a file under /usr, a unit file, and maintainer scripts that
/// add a system user on install and remove it on purge (the usual source of backup-file noise).
fn probe_deb(dir: &std::path::Path) -> Vec<u8> {
    let tree = dir.join("tree");
    let write = |rel: &str, text: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("DEBIAN/control", "Package: patchlab-fp-probe\nVersion: 1.0\nArchitecture: all\nMaintainer: patchlab <patchlab@example.invalid>\nDescription: fingerprint test probe\n", 0o644);
    write("DEBIAN/conffiles", "/etc/patchlab-fp-probe.conf\n", 0o644);
    write("DEBIAN/postinst", "#!/bin/sh\nset -e\nif [ \"$1\" = configure ] && ! getent passwd patchlab-fp-probe >/dev/null; then\n  useradd --system --no-create-home --shell /usr/sbin/nologin patchlab-fp-probe\nfi\n", 0o755);
    write("DEBIAN/postrm", "#!/bin/sh\nset -e\nif [ \"$1\" = purge ] && getent passwd patchlab-fp-probe >/dev/null; then\n  userdel patchlab-fp-probe\nfi\n", 0o755);
    write("etc/patchlab-fp-probe.conf", "setting = 1\n", 0o644);
    write("usr/share/patchlab-fp-probe/README", "probe\n", 0o644);
    write("usr/lib/systemd/system/patchlab-fp-probe.service", "[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n", 0o644);
    let deb = dir.join("probe.deb");
    let out = std::process::Command::new("dpkg-deb").env("SOURCE_DATE_EPOCH", "1700000000").args(["--root-owner-group", "--build"]).arg(&tree).arg(&deb).output().expect("run dpkg-deb");
    assert!(out.status.success(), "dpkg-deb: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&deb).unwrap()
}

#[test]
fn fingerprint_absorbs_noise_sees_a_clean_purge_and_names_residue_on_debian_12() {
    let platform = "debian-12";
    on_clone(platform, "images/debian-12.toml", |agent| {
        let spec = FingerprintSpec::with_defaults(&[], &[]).unwrap();
        let base = timed_capture(agent, &spec, platform, "baseline");
        for kind in ["package", "file", "unit", "socket", "user", "group", "module"] {
            assert!(base.entries.keys().any(|k| k.starts_with(&format!("{kind}\0"))), "the baseline has {kind} entries");
        }
        assert!(base.entries.contains_key("package\0nginx"), "nginx is installed in the image");
        assert!(base.entries.contains_key("socket\0tcp 0.0.0.0:80"), "nginx listens: {:?}", base.entries.keys().filter(|k| k.starts_with("socket")).collect::<Vec<_>>());

        // The noise of a running system over seconds: nothing but allowed differences.
        let again = timed_capture(agent, &spec, platform, "immediately again");
        assert_no_differences(&base, &again, &spec, "immediately again");
        std::thread::sleep(Duration::from_secs(5));
        let later = timed_capture(agent, &spec, platform, "5 s later");
        assert_no_differences(&base, &later, &spec, "5 s later");

        // Install a package: the fingerprint sees it; purge it: the fingerprint is back to baseline.
        let tmp = tempfile::tempdir().unwrap();
        let deb = probe_deb(tmp.path());
        sh(agent, "mkdir -p /var/tmp/patchlab");
        agent.push_file(&deb, "/var/tmp/patchlab/probe.deb").expect("push the probe package");
        sh(agent, "dpkg -i /var/tmp/patchlab/probe.deb");
        let installed = timed_capture(agent, &spec, platform, "installed");
        let seen = fingerprint::diff(&base, &installed, &spec);
        let names: Vec<String> = seen.differences.iter().map(|d| format!("{}:{}", d.kind, d.item)).collect();
        for expected in ["package:patchlab-fp-probe", "file:/etc/patchlab-fp-probe.conf", "file:/usr/share/patchlab-fp-probe/README", "file:/usr/lib/systemd/system/patchlab-fp-probe.service", "user:patchlab-fp-probe"] {
            assert!(names.iter().any(|n| n == expected), "installed: {expected} not among the differences:{}", show(&seen.differences));
        }
        sh(agent, "dpkg --purge patchlab-fp-probe && rm -f /var/tmp/patchlab/probe.deb");
        let purged = timed_capture(agent, &spec, platform, "purged");
        assert_no_differences(&base, &purged, &spec, "after install and purge");

        // Residue: every piece is named, with the state that shows it.
        sh(agent, "useradd patchlab-residue && echo 'keep = me' > /etc/residue.conf && mkdir -p /etc/cron.d && echo '* * * * * root true' > /etc/cron.d/patchlab-residue");
        let residue = timed_capture(agent, &spec, platform, "residue");
        let out = fingerprint::diff(&base, &residue, &spec);
        eprintln!("residue differences:{}", show(&out.differences));
        let find = |kind: &str, item: &str| out.differences.iter().find(|d| d.kind == kind && d.item == item).unwrap_or_else(|| panic!("{kind}:{item} not named:{}", show(&out.differences))).clone();
        let user = find("user", "patchlab-residue");
        assert_eq!(user.before, None);
        assert!(user.after.as_deref().unwrap().contains("home=/home/patchlab-residue"), "{user:?}");
        find("group", "patchlab-residue");
        let conf = find("file", "/etc/residue.conf");
        assert!(conf.before.is_none() && conf.after.as_deref().unwrap().contains("sha256="), "{conf:?}");
        let cron = find("cron", "/etc/cron.d/patchlab-residue");
        assert!(cron.before.is_none(), "{cron:?}");
        let passwd = find("file", "/etc/passwd");
        assert_ne!(passwd.before, passwd.after);
        let sorted = {
            let mut s = out.differences.clone();
            s.sort();
            s
        };
        assert_eq!(out.differences, sorted, "differences are sorted");
    });
}

/// Two captures seconds apart on an untouched clone differ only where the allowlist expects it.
fn absorbs_noise(platform: &str, recipe: &str) {
    on_clone(platform, recipe, |agent| {
        let spec = FingerprintSpec::with_defaults(&[], &[]).unwrap();
        let base = timed_capture(agent, &spec, platform, "baseline");
        let again = timed_capture(agent, &spec, platform, "immediately again");
        assert_no_differences(&base, &again, &spec, "immediately again");
        std::thread::sleep(Duration::from_secs(5));
        let later = timed_capture(agent, &spec, platform, "5 s later");
        assert_no_differences(&base, &later, &spec, "5 s later");
    });
}

#[test]
fn fingerprint_absorbs_noise_on_debian_13() {
    absorbs_noise("debian-13", "images/debian-13.toml");
}

#[test]
fn fingerprint_absorbs_noise_on_debian_11() {
    absorbs_noise("debian-11", "images/debian-11.toml");
}

/// The baseline kept beside a golden state (captured on one clone of it, `fingerprint::baseline`)
/// is what another clone of it captures itself at the same point (restored, clock set): nothing
/// differs but what the allowlist expects. This is what reusing it across clones rests on.
#[test]
fn a_kept_baseline_is_what_every_clone_of_its_golden_state_captures() {
    for (platform, recipe) in [("debian-12", "images/debian-12.toml"), ("debian-13", "images/debian-13.toml"), ("debian-11", "images/debian-11.toml")] {
        let Some(host) = common::host() else { return };
        let golden = {
            let run_id = new_run_id();
            let _lock = RunLock::acquire(&host.dirs, &run_id).unwrap();
            common::golden(&host, platform, recipe, &run_id).reference()
        };
        let spec = FingerprintSpec::with_defaults(&[], &[]).unwrap();
        let mut kept = None;
        on_clone(platform, recipe, |agent| {
            let (fp, origin) = fingerprint::baseline::baseline(agent, &spec, Some(&golden), "no checks").expect("baseline");
            eprintln!("{platform}: baseline {origin:?}, {} entries", fp.entries.len());
            kept = Some(fp);
        });
        let kept = kept.expect("the first clone ran");
        assert_eq!(fingerprint::baseline::load(&golden, &spec, "no checks").as_ref(), Some(&kept), "{platform}: the baseline is kept beside the golden state");
        on_clone(platform, recipe, |agent| {
            let own = timed_capture(agent, &spec, platform, "on a fresh clone");
            assert_no_differences(&kept, &own, &spec, &format!("{platform}: kept baseline vs a fresh clone's own capture"));
        });
    }
}
