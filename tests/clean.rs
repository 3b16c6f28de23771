//! Real guests: `patchlab clean` removes what a dead run left (a running clone restored under a run
//! id whose lock nobody holds, its clone directory, its run lock), interrupted golden preparations
//! and image builds whose lock is free, and nothing else: not a golden being prepared (lock held),
//! not a `patchlab-` domain without patchlab's metadata, not the golden states.

mod common;

use std::process::Command;

use patchlab::hypervisor::Machine;

#[test]
fn clean_removes_a_dead_runs_leftovers_and_nothing_else() {
    let Some(host) = common::host() else { return };
    let dirs = host.dirs.clone();
    let live_id = patchlab::hypervisor::runlock::new_run_id();
    let _live = patchlab::hypervisor::runlock::RunLock::acquire(&dirs, &live_id).unwrap();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &live_id);

    // A run that dies: a clone restored under its id while it holds its lock (so no concurrent
    // reap takes it mid-restore), then the lock released without tearing the clone down, and a
    // stale lock file left, as after SIGKILL.
    let dead = patchlab::hypervisor::runlock::new_run_id();
    let dying = patchlab::hypervisor::runlock::RunLock::acquire(&dirs, &dead).unwrap();
    let clone_name = format!("patchlab-{dead}-1");
    let clone = host.restore_clone(&golden, &dead, &clone_name, &[80]).expect("restore a clone");
    let clone_dir = clone.dir().to_path_buf();
    assert_eq!(clone.name(), clone_name);
    assert!(host.lookup(&clone_name).is_some_and(|d| d.is_active().unwrap_or(false)));
    std::mem::forget(clone); // the process "dies" without tearing it down
    drop(dying);
    std::fs::write(dirs.runs().join(format!("{dead}.lock")), "").unwrap();

    // Interrupted preparations: a golden and an image build nobody holds, and a golden being prepared.
    let stale_golden = dirs.golden().join(format!("zz-cleantest-{dead}"));
    std::fs::create_dir_all(&stale_golden).unwrap();
    std::fs::write(stale_golden.join("disk.qcow2"), "half").unwrap();
    let busy_golden = dirs.golden().join(format!("zz-cleantest-busy-{dead}"));
    std::fs::create_dir_all(&busy_golden).unwrap();
    let busy_lock = std::fs::File::create(busy_golden.with_extension("lock")).unwrap();
    busy_lock.lock().unwrap();
    let stale_build = dirs.images().join(format!(".tmp-zz-cleantest-{}-1", &dead[dead.len() - 6..]));
    std::fs::create_dir_all(&stale_build).unwrap();

    // A patchlab- name without patchlab's metadata: not patchlab's, never touched.
    let foreign = format!("patchlab-foreign-{}", &dead[dead.len() - 6..]);
    let xml_path = dirs.root.join(format!("{foreign}.xml"));
    std::fs::write(&xml_path, format!("<domain type='qemu'><name>{foreign}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>")).unwrap();
    let defined = Command::new("virsh").args(["-c", common::URI, "define"]).arg(&xml_path).output().unwrap();
    assert!(defined.status.success(), "{}", String::from_utf8_lossy(&defined.stderr));
    let _ = std::fs::remove_file(&xml_path);

    let t = std::time::Instant::now();
    let out = Command::new(assert_cmd::cargo::cargo_bin("patchlab")).env("PATCHLAB_CACHE_DIR", &dirs.root).args(["clean", "--connect", common::URI]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("clean took {:?}:\n{stdout}", t.elapsed());
    let foreign_still_there = host.lookup(&foreign).is_some();
    let _ = Command::new("virsh").args(["-c", common::URI, "undefine", &foreign]).output();
    drop(busy_lock);
    let _ = std::fs::remove_dir_all(&busy_golden);
    let _ = std::fs::remove_file(busy_golden.with_extension("lock"));

    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(foreign_still_there, "a domain without patchlab's metadata was touched");
    // Any patchlab process reaps dead runs (every run does before it starts), so another one may
    // have taken the leftovers first: what matters is that they are gone.
    if !stdout.contains(&format!("removed {clone_name}")) {
        eprintln!("note: {clone_name} was reaped by another patchlab process before `patchlab clean`");
    }
    assert!(host.lookup(&clone_name).is_none(), "the dead run's clone is gone");
    assert!(!clone_dir.exists(), "its overlay and state copy are gone");
    assert!(!dirs.runs().join(format!("{dead}.lock")).exists(), "its stale lock is gone");
    assert!(!stale_golden.exists(), "{stdout}");
    assert!(!stale_build.exists(), "{stdout}");
    assert!(stdout.contains(&format!("kept {}: being prepared", busy_golden.display())), "{stdout}");
    assert!(dirs.runs().join(format!("{live_id}.lock")).exists(), "a live run's lock stays");
    common::LeakCheck::new(&host, &dead, &[&golden]).assert_clean();
}
