//! Reliability drills (issue 6), through the real CLI on real guests: patches that misbehave, a
//! clone whose QEMU dies, signals mid-run, a corrupt golden state, a host without room for a clone,
//! bad usage. Every drill ends with the shared leak check (tests/common: `LeakCheck`).
//!
//! The drills share the debian-12 golden state and one lab run for all misbehaving patches, so the
//! whole file stays within a few minutes under TCG.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A script patch: name, install script, remove script.
type ScriptPatch<'a> = (&'a str, &'a str, &'a str);

/// Writes a lab over debian-12 with one script patch per entry, into `dir`.
fn write_lab(dir: &Path, patches: &[ScriptPatch<'_>], settings: &str) -> PathBuf {
    let mut lab = format!("name = \"drill\"\n[platforms.debian-12]\nimage = \"{}\"\n", common::root().join("images/debian-12.toml").display());
    for (name, install, remove) in patches {
        let pdir = dir.join(name);
        std::fs::create_dir_all(&pdir).unwrap();
        std::fs::write(pdir.join("install.sh"), format!("#!/bin/sh\n{install}\n")).unwrap();
        std::fs::write(pdir.join("remove.sh"), format!("#!/bin/sh\n{remove}\n")).unwrap();
        lab += &format!(
            "[patches.{name}]\nkind = \"script\"\nfiles = [\"{0}/install.sh\", \"{0}/remove.sh\"]\ninstall = [\"/bin/sh\", \"/var/tmp/patchlab/install.sh\"]\nremove = [\"/bin/sh\", \"/var/tmp/patchlab/remove.sh\"]\n",
            pdir.display()
        );
    }
    lab += "[checks.nginx]\nkind = \"command\"\nargv = [\"/bin/systemctl\", \"is-active\", \"nginx\"]\nretries = 1\n";
    lab += "[checks.disk-writable]\nkind = \"command\"\nargv = [\"/bin/sh\", \"-c\", \"echo probe > /var/tmp/drill-probe && rm /var/tmp/drill-probe\"]\nretries = 0\n";
    lab += settings;
    let path = dir.join("drill.toml");
    std::fs::write(&path, lab).unwrap();
    path
}

/// A `patchlab run` child whose stderr is collected line by line.
struct Run {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

/// Runs `patchlab run LAB --out OUT EXTRA...` with its own TMPDIR, [`cli_tmp`] of `out`.
fn spawn(lab: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_patchlab"))
        .args(["run"])
        .arg(lab)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("NO_COLOR", "1")
        .env("TMPDIR", common::cli_tmpdir(out.parent().unwrap()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  | {line}");
            sink.lock().unwrap().push(line);
        }
    });
    Run { child, log }
}

impl Run {
    /// The clone name of the cell of `patch`, once its "cell started" line is logged.
    fn clone_of(&self, patch: &str, deadline: Duration) -> String {
        let t = Instant::now();
        loop {
            let found = self.log.lock().unwrap().iter().filter(|l| l.contains("cell started") && field(l, "patch").as_deref() == Some(patch)).find_map(|l| field(l, "clone"));
            if let Some(clone) = found {
                return clone;
            }
            assert!(t.elapsed() < deadline, "no cell of {patch} started within {deadline:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Like [`Run::wait`], also returning the peak resident memory of the `patchlab` process (and of
    /// the children it waited for), in bytes, from wait4(2).
    fn wait_measured(self, deadline: Duration) -> (i32, String, u64) {
        let pid = self.child.id() as libc::pid_t;
        let t = Instant::now();
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own child's pid, with valid pointers to locals.
            let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if reaped == pid {
                std::thread::sleep(Duration::from_millis(200)); // let the reader drain
                let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 };
                return (code, self.log.lock().unwrap().join("\n"), usage.ru_maxrss as u64 * 1024);
            }
            assert!(reaped == 0, "wait4: {}", std::io::Error::last_os_error());
            if t.elapsed() > deadline {
                let mut child = self.child;
                let _ = child.kill();
                panic!("patchlab run did not end within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait(mut self, deadline: Duration) -> (i32, String) {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200)); // let the reader drain
                return (status.code().unwrap_or(-1), self.log.lock().unwrap().join("\n"));
            }
            if t.elapsed() > deadline {
                let _ = self.child.kill();
                panic!("patchlab run did not end within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The TMPDIR [`spawn`] gives the run writing into `out`: the leak check requires it empty.
fn cli_tmp(out: &Path) -> PathBuf {
    out.parent().unwrap().join("cli-tmp")
}

/// `key=value` or `key="value"` in a log line.
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let value = if let Some(quoted) = rest.strip_prefix('"') { &quoted[..quoted.find('"')?] } else { rest.split_whitespace().next()? };
    Some(value.to_string())
}

/// Waits until `marker` appears in the clone's console log (scripts write to /dev/ttyS0).
fn wait_console(clone: &str, marker: &str, deadline: Duration) {
    let t = Instant::now();
    loop {
        let found = console_files(clone).iter().any(|f| std::fs::read(f).is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker)));
        if found {
            return;
        }
        assert!(t.elapsed() < deadline, "{clone} did not print {marker} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pid of the QEMU process running `clone` (its `-name guest=CLONE,...` argument).
fn qemu_pid(clone: &str) -> Option<i32> {
    let needle = format!("guest={clone},");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline).contains(&needle).then_some(pid)
    })
}

fn cell<'a>(report: &'a Value, patch: &str) -> &'a Value {
    report["results"].as_array().unwrap().iter().find(|r| r["patch"] == patch).unwrap_or_else(|| panic!("no cell for {patch}: {report:#}"))
}

fn statuses(cell: &Value) -> Vec<String> {
    ["baseline", "delivery", "install", "operations", "removal"].iter().map(|c| cell["conditions"][*c]["status"].as_str().unwrap().to_string()).collect()
}

/// Copies what a test-only cache dir needs from the shared one, without writing into it.
fn cache_with(shared: &Path, cache: &Path) {
    std::fs::create_dir_all(cache).unwrap();
    std::os::unix::fs::symlink(shared.join("images"), cache.join("images")).unwrap();
    if shared.join("accel-probe.json").exists() {
        std::fs::copy(shared.join("accel-probe.json"), cache.join("accel-probe.json")).unwrap();
    }
}

#[test]
fn misbehaving_patches_and_a_killed_qemu_are_contained() {
    let Some(host) = common::host() else { return };
    let setup = patchlab::hypervisor::runlock::new_run_id();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &setup);
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let lab = write_lab(
        dir.path(),
        &[
            ("hangs", "echo installing; exec sleep 100000", "true"),
            // Fills the guest's disk (root's reserved blocks too), then exits 0: the harness must
            // keep working on a full disk, and the disk check fails.
            ("fills-disk", "i=0; for s in 256M 16M 1M 64K 4K; do while fallocate -l $s /var/tmp/fill.$i 2>/dev/null; do i=$((i+1)); done; done; df /var/tmp; exit 0", "rm -f /var/tmp/fill.*"),
            ("stops-agent", "systemctl stop qemu-guest-agent; sleep 60", "true"),
            ("qemu-killed", "echo PATCHLAB-DRILL-KILL-ME > /dev/ttyS0; exec sleep 100000", "true"),
        ],
        "[settings]\ninstall_timeout = \"20s\"\nremove_timeout = \"20s\"\n",
    );
    let out = dir.path().join("out");
    let run = spawn(&lab, &out, &["--jobs", "2"]);
    // Kill the QEMU of the qemu-killed cell while its install runs.
    let clone = run.clone_of("qemu-killed", Duration::from_secs(300));
    wait_console(&clone, "PATCHLAB-DRILL-KILL-ME", Duration::from_secs(180));
    let pid = qemu_pid(&clone).expect("the clone's qemu process");
    eprintln!("killing qemu {pid} of {clone}");
    // SAFETY: plain kill(2) on the pid of the QEMU this test's run started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let (code, log) = run.wait(Duration::from_secs(600));
    let report = common::read_json(&out.join("report.json"));
    eprintln!("misbehaving patches drill: {:?}, exit {code}", t.elapsed());
    for r in report["results"].as_array().unwrap() {
        eprintln!("  {}: {} {:?} error={} install={}", r["patch"], r["verdict"], statuses(r), r["error"], r["conditions"]["install"]["reason"]);
    }
    assert!(!log.contains("panicked"), "the harness panicked:\n{log}");
    assert_eq!(report["complete"], true, "every cell finished: {report:#}");
    assert_eq!(report["results"].as_array().unwrap().len(), 4);

    // A hanging install meets its deadline: the patch's fault.
    let hangs = cell(&report, "hangs");
    assert_eq!(hangs["verdict"], "fail");
    assert_eq!(statuses(hangs)[2], "fail");
    assert!(hangs["conditions"]["install"]["reason"].as_str().unwrap().contains("did not finish within 20s"), "{hangs:#}");
    // A full disk: a condition fails (the disk check), the harness does not break.
    let fills = cell(&report, "fills-disk");
    assert_eq!(fills["verdict"], "fail", "{fills:#}");
    assert!(fills["error"].is_null(), "{fills:#}");
    // The agent gone, or the whole QEMU: the lab broke, so `error`, with the reason.
    for patch in ["stops-agent", "qemu-killed"] {
        let c = cell(&report, patch);
        assert_eq!(c["verdict"], "error", "{patch}: {c:#}");
        assert_eq!(statuses(c)[2], "error", "{patch}");
        assert!(c["error"].as_str().is_some_and(|e| e.contains("guest agent")), "{patch}: {c:#}");
    }
    assert_eq!(code, 1, "a failed patch outweighs errors (exit 1)");
    common::LeakCheck::new(&host, report["run_id"].as_str().unwrap(), &[&golden]).with_tmpdir(&cli_tmp(&out)).assert_clean();
}

/// A patch whose install prints 300 MiB on stdout and whose removal prints 20 MiB on stderr: far
/// more than qemu-ga captures (16 MiB) and libvirt carries (about 4 MiB per reply).
#[test]
fn a_flood_of_output_is_kept_bounded_with_the_digest_of_all_of_it() {
    let Some(host) = common::host() else { return };
    let setup = patchlab::hypervisor::runlock::new_run_id();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &setup);
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    const FLOOD: u64 = 300 << 20;
    let lab = write_lab(
        dir.path(),
        &[("floods", "head -c 300M /dev/zero | tr '\\0' y; echo; echo PATCHLAB-FLOOD-END; echo flood-done >&2; exit 0", "head -c 20M /dev/zero | tr '\\0' e >&2; exit 5")],
        // Under TCG the guest pushes 300 MiB through its pipes in about a minute when the host is idle.
        "[settings]\ninstall_timeout = \"900s\"\nremove_timeout = \"300s\"\n",
    );
    let out = dir.path().join("out");
    let (code, log, max_rss) = spawn(&lab, &out, &[]).wait_measured(Duration::from_secs(1800));
    let report = common::read_json(&out.join("report.json"));
    let c = cell(&report, "floods");
    eprintln!("flood drill: {:?}, exit {code}, patchlab max RSS {} MiB, {:?} {}", t.elapsed(), max_rss >> 20, statuses(c), c["conditions"]["removal"]["reason"]);
    assert!(!log.contains("panicked"), "{log}");

    // The verdicts come from the exit statuses: install 0 passes, removal 5 fails.
    assert_eq!(statuses(c), ["pass", "pass", "pass", "pass", "fail"], "{c:#}");
    assert!(c["error"].is_null(), "{c:#}");
    assert_eq!(c["conditions"]["removal"]["reason"].as_str().unwrap(), "`/bin/sh /var/tmp/patchlab/remove.sh` exited with Some(5)");
    assert_eq!((code, report["verdict"].as_str()), (1, Some("fail")));

    // stdout of the install: both ends kept, the count and digest of all of it.
    let install = &c["conditions"]["install"]["commands"][0];
    let stdout = &install["stdout"];
    let mut all = Sha256::new();
    let chunk = vec![b'y'; 1 << 20];
    (0..FLOOD >> 20).for_each(|_| all.update(&chunk));
    all.update(b"\nPATCHLAB-FLOOD-END\n");
    assert_eq!(stdout["bytes"], FLOOD + 20);
    assert_eq!(stdout["sha256"].as_str().unwrap(), hex::encode(all.finalize()), "the digest of all 300 MiB, computed in the guest");
    assert_eq!(stdout["truncated"], true);
    let head = stdout["text"].as_str().unwrap();
    assert!(head.len() == 64 * 1024 && head.bytes().all(|b| b == b'y'), "the first 64 KiB");
    let tail = stdout["tail"].as_str().unwrap();
    assert!(tail.len() == 64 * 1024 && tail.ends_with("yyy\nPATCHLAB-FLOOD-END\n"), "the last 64 KiB");
    assert_eq!(install["stderr"]["text"], "flood-done\n");
    assert_eq!(install["stderr"]["truncated"], false);
    // stderr of the removal: the same, on the other stream.
    let stderr = &c["conditions"]["removal"]["commands"][0]["stderr"];
    assert_eq!((stderr["bytes"].as_u64(), stderr["truncated"].as_bool()), (Some(20 << 20), Some(true)));
    let mut all = Sha256::new();
    (0..20).for_each(|_| all.update(vec![b'e'; 1 << 20]));
    assert_eq!(stderr["sha256"].as_str().unwrap(), hex::encode(all.finalize()));
    // The renderings say so.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("314,572,820 bytes") && md.contains("only the first and the last part are kept"), "{md}");

    // patchlab's memory: nowhere near the flood (the output never reaches the host).
    assert!(max_rss < 200 << 20, "patchlab peaked at {} MiB of resident memory", max_rss >> 20);
    common::LeakCheck::new(&host, report["run_id"].as_str().unwrap(), &[&golden]).with_tmpdir(&cli_tmp(&out)).assert_clean();
}

#[test]
fn sigint_and_sigterm_tear_everything_down_and_leave_an_incomplete_report() {
    let Some(host) = common::host() else { return };
    let setup = patchlab::hypervisor::runlock::new_run_id();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &setup);
    // Both signals at once, each on its own run: the drills share the machine's two cores.
    std::thread::scope(|s| {
        for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
            let (host, golden) = (&host, &golden);
            s.spawn(move || signal_drill(host, golden, signal, name));
        }
    });
}

fn signal_drill(host: &patchlab::hypervisor::libvirt::LibvirtHost, golden: &patchlab::hypervisor::golden::Golden, signal: i32, name: &str) {
    {
        let t = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let lab = write_lab(dir.path(), &[("a-slow", "echo PATCHLAB-DRILL-SLOW > /dev/ttyS0; exec sleep 100000", "true"), ("b-slow", "exec sleep 100000", "true")], "");
        let out = dir.path().join("out");
        let run = spawn(&lab, &out, &["--jobs", "1"]);
        let clone = run.clone_of("a-slow", Duration::from_secs(300));
        wait_console(&clone, "PATCHLAB-DRILL-SLOW", Duration::from_secs(180));
        assert!(host.lookup(&clone).is_some(), "{clone} runs");
        // SAFETY: kill(2) on the child this test spawned.
        assert_eq!(unsafe { libc::kill(run.child.id() as i32, signal) }, 0);
        let (code, log) = run.wait(Duration::from_secs(120));
        let report = common::read_json(&out.join("report.json"));
        eprintln!("{name} drill: {:?}, exit {code}", t.elapsed());
        assert!(!log.contains("panicked"), "{log}");
        assert_eq!(report["complete"], false, "{name}: {report:#}");
        assert_eq!(report["verdict"], "error", "{name}");
        assert_eq!(code, 3, "{name}: an incomplete run is the lab's error");
        assert!(report["results"].as_array().unwrap().iter().all(|r| r["patch"] != "b-slow"), "{name}: no cell starts after the signal");
        common::LeakCheck::new(host, report["run_id"].as_str().unwrap(), &[golden]).with_tmpdir(&cli_tmp(&out)).assert_clean();
    }
}

#[test]
fn a_corrupt_or_missing_golden_state_is_named_and_nothing_runs() {
    let Some(host) = common::host() else { return };
    let setup = patchlab::hypervisor::runlock::new_run_id();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &setup);
    for variant in ["corrupt", "missing"] {
        let t = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        // A test-only cache whose golden is a copy: the shared goldens are never touched.
        let cache = dir.path().join("cache");
        cache_with(&host.dirs.root, &cache);
        let copy = cache.join("golden").join(golden.dir.file_name().unwrap());
        std::fs::create_dir_all(&copy).unwrap();
        for f in ["golden.json", "console.log", "state.save"] {
            std::fs::copy(golden.dir.join(f), copy.join(f)).unwrap();
        }
        let state = copy.join("state.save");
        if variant == "corrupt" {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(&state).unwrap();
            f.seek(SeekFrom::End(-4096)).unwrap();
            f.write_all(b"corrupted by the drill").unwrap();
        } else {
            std::fs::remove_file(&state).unwrap();
        }
        let lab = write_lab(dir.path(), &[("noop", "true", "true")], "");
        let out = dir.path().join("out");
        let run = spawn(&lab, &out, &["--cache-dir", cache.to_str().unwrap()]);
        let (code, log) = run.wait(Duration::from_secs(300));
        eprintln!("golden {variant} drill: {:?}, exit {code}", t.elapsed());
        assert_eq!(code, 3, "{variant}: {log}");
        assert!(log.contains(&state.display().to_string()), "{variant}: the error names {}:\n{log}", state.display());
        let report = common::read_json(&out.join("report.json"));
        assert_eq!(report["complete"], false);
        assert_eq!(report["verdict"], "error");
        assert!(report["results"].as_array().unwrap().is_empty());
        // Nothing was cloned from it.
        let clones: Vec<_> = std::fs::read_dir(cache.join("clones")).into_iter().flatten().flatten().map(|e| e.path()).collect();
        assert!(clones.is_empty(), "{clones:?}");
        assert!(host.patchlab_domains().unwrap().iter().all(|d| !d.contains(report["run_id"].as_str().unwrap())));
        common::assert_tmpdir_empty(&cli_tmp(&out));
    }
    common::LeakCheck::new(&host, "no-run", &[&golden]).assert_clean();
}

/// The clones directory on a 64 MiB file system: every cell is refused before anything is cloned.
#[test]
fn a_host_without_room_for_a_clone_is_refused_before_cloning() {
    let Some(host) = common::host() else { return };
    let setup = patchlab::hypervisor::runlock::new_run_id();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &setup);
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=64M", "tmpfs"]).arg(&cache).status().is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a small tmpfs here; the room check is unit-tested in hypervisor::room_tests");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(cache.clone());
    cache_with(&host.dirs.root, &cache);
    std::fs::create_dir_all(cache.join("golden")).unwrap();
    std::os::unix::fs::symlink(&golden.dir, cache.join("golden").join(golden.dir.file_name().unwrap())).unwrap();
    let lab = write_lab(dir.path(), &[("noop", "true", "true")], "");
    let out = dir.path().join("out");
    let (code, log) = spawn(&lab, &out, &["--cache-dir", cache.to_str().unwrap()]).wait(Duration::from_secs(300));
    eprintln!("no room drill: {:?}, exit {code}", t.elapsed());
    assert_eq!(code, 3, "{log}");
    let report = common::read_json(&out.join("report.json"));
    let c = cell(&report, "noop");
    assert_eq!(c["verdict"], "error");
    assert!(c["error"].as_str().unwrap().contains("not enough free space for a clone"), "{c:#}");
    assert!(!log.contains("restore clone"), "refused before restoring: {log}");
    let run_id = report["run_id"].as_str().unwrap();
    assert!(!cache.join("clones").join(run_id).exists());
    common::LeakCheck::new(&host, run_id, &[&golden]).with_tmpdir(&cli_tmp(&out)).assert_clean();
}

#[test]
fn bad_usage_exits_2_and_a_missing_libvirtd_is_one_clear_sentence() {
    let patchlab = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_patchlab"));
        c.env("NO_COLOR", "1").stdin(Stdio::null());
        c
    };
    for args in [&[][..], &["run"], &["frobnicate"], &["run", "--jobs", "many", "labs/default.toml"], &["run", "--accel", "warp", "labs/default.toml"], &["run", "/no/such/lab.toml"]] {
        let out = patchlab().current_dir(common::root()).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "patchlab {args:?}: {stderr}");
        assert!(stderr.contains("Usage") || stderr.contains("error:"), "patchlab {args:?} says why: {stderr}");
    }
    // No libvirtd at that socket: exit 3, one sentence saying what to do, and an incomplete report.
    // Patches are built before libvirt is reached: a deb patch makes `dpkg-deb` use the TMPDIR too.
    let dir = tempfile::tempdir().unwrap();
    let lab = write_lab(dir.path(), &[("noop", "true", "true")], "");
    assert!(Command::new("cp").arg("-r").arg(common::root().join("fixtures/patches/good")).arg(dir.path().join("deb-tree")).status().unwrap().success());
    let mut text = std::fs::read_to_string(&lab).unwrap();
    text += &format!("[patches.deb]\nkind = \"deb\"\npackage_trees = [\"{}\"]\n", dir.path().join("deb-tree").display());
    std::fs::write(&lab, text).unwrap();
    let out_dir = dir.path().join("out");
    let out = patchlab().arg("run").arg(&lab).arg("--out").arg(&out_dir).args(["--connect", "qemu+unix:///system?socket=/nonexistent/libvirt-sock"]).env("TMPDIR", common::cli_tmpdir(dir.path())).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "{stderr}");
    assert!(error_lines[0].contains("is libvirtd running?") && error_lines[0].contains("libvirtd -d"), "{stderr}");
    let report = common::read_json(&out_dir.join("report.json"));
    assert_eq!((report["complete"].as_bool(), report["verdict"].as_str()), (Some(false), Some("error")));
    assert!(out_dir.join("patches/deb").read_dir().unwrap().count() > 0, "the deb patch was built");
    common::assert_tmpdir_empty(&dir.path().join("cli-tmp"));
}

/// Missing prerequisites, each one `error:` line saying what to do, exit 3 and an incomplete report:
/// QEMU not on PATH, and `--accel kvm` without a usable /dev/kvm (hidden from the run by a private
/// mount namespace whose /dev is an empty tmpfs: the KVM of this machine stays untouched).
#[test]
fn no_qemu_and_no_usable_kvm_are_one_clear_sentence_each() {
    let Some(host) = common::host() else { return };
    patchlab::image::ensure_built(&common::root().join("images/debian-12.toml"), &host.dirs.root).expect("image builds");
    let dir = tempfile::tempdir().unwrap();
    let lab = write_lab(dir.path(), &[("noop", "true", "true")], "");
    let empty_path = dir.path().join("empty-path");
    std::fs::create_dir_all(&empty_path).unwrap();
    let run = |name: &str, wrap: &[&str], path: Option<&Path>, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut cmd = Command::new(wrap.first().copied().unwrap_or(env!("CARGO_BIN_EXE_patchlab")));
        if !wrap.is_empty() {
            cmd.args(&wrap[1..]).arg(env!("CARGO_BIN_EXE_patchlab"));
        }
        cmd.arg("run").arg(&lab).arg("--out").arg(&out).args(["--ci"]).args(extra).env("NO_COLOR", "1").env("TMPDIR", common::cli_tmpdir(dir.path())).stdin(Stdio::null());
        if let Some(path) = path {
            cmd.env("PATH", path);
        }
        let t = Instant::now();
        let output = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        eprintln!("{name}: {:?}, exit {:?}\n{stderr}", t.elapsed(), output.status.code());
        (output.status.code(), stderr, out)
    };
    let one_error_line = |stderr: &str| -> String {
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        lines[0].to_string()
    };
    let incomplete = |out: &Path| {
        let report = common::read_json(&out.join("report.json"));
        assert_eq!((report["complete"].as_bool(), report["verdict"].as_str()), (Some(false), Some("error")));
        assert!(report["results"].as_array().unwrap().is_empty());
    };

    // No QEMU on PATH.
    let (code, stderr, out) = run("no-qemu", &[], Some(&empty_path), &[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(one_error_line(&stderr), "error: failed to find QEMU: `qemu-system-x86_64` is not on PATH; install Debian's qemu-system-x86 package (`cargo xtask setup` does) or put its directory on PATH");
    incomplete(&out);

    // --accel kvm without /dev/kvm.
    let hide_dev = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o mode=755 patchlab-drill-dev /dev && mknod -m 666 /dev/null c 1 3 && exec \"$@\"", "sh"];
    let (code, stderr, out) = run("no-kvm", &hide_dev, None, &["--accel", "kvm"]);
    if code != Some(3) && stderr.contains("unshare") {
        eprintln!("SKIPPED the /dev/kvm part: no private mount namespace here ({stderr}); the sentence is unit-tested in hypervisor::accel");
    } else {
        assert_eq!(code, Some(3), "{stderr}");
        assert_eq!(
            one_error_line(&stderr),
            "error: failed to use KVM (--accel kvm): /dev/kvm cannot be opened (No such file or directory (os error 2)): the kvm module is not loaded (`modprobe kvm_intel` or `modprobe kvm_amd`) or this machine has no hardware virtualization, or pass --accel tcg to emulate without it"
        );
        incomplete(&out);
    }
    common::assert_tmpdir_empty(&dir.path().join("cli-tmp"));
    assert!(Path::new("/dev/kvm").exists() == Path::new("/sys/module/kvm").exists(), "the machine's /dev was not touched");
}

/// The running libvirtd: its pid and the argv it was started with (from /proc).
fn libvirtd() -> Option<(i32, Vec<String>)> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        (std::fs::read_to_string(e.path().join("comm")).ok()?.trim() == "libvirtd").then_some(())?;
        let argv: Vec<String> = std::fs::read(e.path().join("cmdline")).ok()?.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        Some((pid, argv))
    })
}

/// Starts libvirtd with `argv` as it was started before: as a daemon (`-d`), or detached in its own
/// session when it ran in the foreground under some supervisor, then waits until it answers.
fn start_libvirtd(argv: &[String]) {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir("/").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    if argv.iter().any(|a| a == "-d" || a == "--daemon") {
        let status = cmd.status().unwrap_or_else(|e| panic!("start {argv:?}: {e}"));
        assert!(status.success(), "{argv:?}: {status}");
    } else {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid(2) between fork and exec touches no memory of the parent.
        unsafe { cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }) };
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {argv:?}: {e}"));
        // It outlives this test; should it exit while the test runs, it is reaped here.
        std::thread::spawn(move || child.wait());
    }
    let t = Instant::now();
    while patchlab::hypervisor::libvirt::LibvirtHost::connect(common::URI, common::dirs()).is_err() {
        assert!(t.elapsed() < Duration::from_secs(60), "libvirtd ({argv:?}) does not answer 60 s after starting");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What started libvirtd `pid` with `argv`: xtask's reaper (`xtask __reap libvirtd ...`, see
/// xtask/src/reaper.rs) when it is its parent, so that it is started again under a reaper; else
/// libvirtd's own command line.
fn launcher(pid: i32, argv: &[String]) -> Vec<String> {
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(") ").and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string)));
    let parent_argv: Vec<String> = parent.and_then(|ppid| std::fs::read(format!("/proc/{ppid}/cmdline")).ok()).map(|c| c.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()).unwrap_or_default();
    if parent_argv.get(1).map(String::as_str) == Some("__reap") && parent_argv[2..] == argv[..] { parent_argv } else { argv.to_vec() }
}

/// Whatever the drill does, libvirtd (as it was started) and virtlogd run again afterwards.
struct RestoreDaemons(Vec<String>);

impl Drop for RestoreDaemons {
    fn drop(&mut self) {
        if libvirtd().is_none() {
            eprintln!("restarting libvirtd as it was: {:?}", self.0);
            start_libvirtd(&self.0);
        }
        let virtlogd = std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "virtlogd"));
        if !virtlogd {
            let _ = Command::new("virtlogd").arg("-d").status();
        }
    }
}

/// libvirtd is restarted mid-run (SIGTERM, then started again exactly as it was started: the argv
/// of the running daemon, from /proc). This stops the daemon for every user of the machine, so it
/// only runs when asked for: `cargo xtask test` runs it alone after the suite (`--ignored`, with
/// PATCHLAB_DRILL_RESTART_LIBVIRTD=1).
#[test]
#[ignore = "restarts the machine's libvirtd: `cargo xtask test` runs it alone after the suite"]
fn libvirtd_restarted_mid_run() {
    restart_drill(None);
}

/// The same drill on a remote host (`qemu+tcp://127.0.0.1/system`, handled through the storage
/// pool and streams): the run reconnects to it, and the clone of the lost connection is destroyed
/// and its volumes deleted through a new one.
#[test]
#[ignore = "restarts the machine's libvirtd: `cargo xtask test` runs it alone after the suite"]
fn libvirtd_restarted_mid_run_on_a_remote_host() {
    restart_drill(Some("qemu+tcp://127.0.0.1/system"));
}

/// Where a clone's console log is while it runs: its clone directory, or its volume in a remote
/// host's `patchlab` pool.
fn console_files(clone: &str) -> Vec<PathBuf> {
    let dirs = common::dirs();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dirs.clones()).into_iter().flatten().flatten().map(|run| run.path().join(clone).join("console.log")).collect();
    files.extend(std::fs::read_dir(patchlab::hypervisor::remote::DEFAULT_POOL_DIR).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(&format!("--{clone}-console.log")))));
    files
}

fn restart_drill(remote: Option<&str>) {
    // A second guard: `cargo test -- --include-ignored` must not stop the daemon under the other tests.
    assert!(
        std::env::var_os("PATCHLAB_DRILL_RESTART_LIBVIRTD").is_some(),
        "this drill restarts the machine's libvirtd: run it alone with PATCHLAB_DRILL_RESTART_LIBVIRTD=1 (`cargo xtask test` does)"
    );
    let Some(host) = common::host() else { return };
    let setup = patchlab::hypervisor::runlock::new_run_id();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &setup);
    let (pid, argv) = libvirtd().expect("a running libvirtd");
    eprintln!("libvirtd {pid} runs as {argv:?}");
    let start = launcher(pid, &argv);
    let restore = RestoreDaemons(start.clone());
    let t = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    // One cell is installing when libvirtd goes; the next one starts after it is back.
    let lab = write_lab(dir.path(), &[("a-slow", "echo PATCHLAB-DRILL-SLOW > /dev/ttyS0; sleep 15", "true"), ("b-after", "true", "true")], "");
    let out = dir.path().join("out");
    let mut args = vec!["--jobs", "1"];
    if let Some(uri) = remote {
        args.extend(["--host", uri]);
    }
    let run = spawn(&lab, &out, &args);
    let clone = run.clone_of("a-slow", Duration::from_secs(600));
    wait_console(&clone, "PATCHLAB-DRILL-SLOW", Duration::from_secs(180));
    // SAFETY: kill(2) on the pid of the process whose comm is libvirtd.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    while Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let down = Instant::now();
    start_libvirtd(&start);
    eprintln!("libvirtd down and back in {:?}", down.elapsed());
    let (again, argv_again) = libvirtd().expect("libvirtd runs again");
    assert_eq!(argv_again, argv, "libvirtd {again} runs exactly as before");
    let (code, log) = run.wait(Duration::from_secs(600));
    eprintln!("libvirtd restart drill: {:?}, exit {code}", t.elapsed());
    assert!(!log.contains("panicked"), "{log}");
    let report = common::read_json(&out.join("report.json"));
    let run_id = report["run_id"].as_str().unwrap().to_string();
    for r in report["results"].as_array().unwrap() {
        eprintln!("  {}: {} {:?} error={}", r["patch"], r["verdict"], statuses(r), r["error"]);
    }
    // The run reconnected and finished: the cell whose agent channel died with the old connection
    // is the lab's error and says why; the next cell ran on a new connection and passed.
    assert_eq!(report["complete"], true, "{report:#}");
    let slow = cell(&report, "a-slow");
    assert_eq!(slow["verdict"], "error", "{slow:#}");
    assert!(slow["error"].as_str().unwrap().contains("the connection to libvirtd was lost (libvirtd restarted or stopped?)"), "{slow:#}");
    assert!(!slow["error"].as_str().unwrap().contains("teardown"), "{slow:#}");
    assert_eq!(cell(&report, "b-after")["verdict"], "pass", "{report:#}");
    assert_eq!(code, 3, "a cell in error: exit 3\n{log}");
    // Nothing leaked, without any cleaning up by the test: the run tore its clone down itself.
    let host = patchlab::hypervisor::libvirt::LibvirtHost::connect(common::URI, common::dirs()).unwrap();
    let mut leaks = common::LeakCheck::new(&host, &run_id, &[&golden]).with_tmpdir(&cli_tmp(&out));
    if let Some(uri) = remote {
        leaks = leaks.with_remote(uri);
    }
    leaks.assert_clean();
    drop(restore);
}
