//! Real guests: a run interrupted by SIGINT after its first cell leaves nothing behind, writes an
//! incomplete report and a journal of the finished cells, and `patchlab run --resume` finishes it
//! into one signed report for the whole lab whose results are the union of both sessions.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("patchlab")
}

/// `patchlab` with a TMPDIR of its own in `work` (the leak check requires it empty).
fn cli(work: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.env("TMPDIR", common::cli_tmpdir(work));
    cmd
}

/// One platform × three patches; names sort in the order the cells run (jobs 1).
fn write_lab(dir: &Path) -> PathBuf {
    let root = common::root();
    let r = root.display();
    let text = format!(
        r#"name = "resume"
[platforms.debian-12]
image = "{r}/images/debian-12.toml"

[patches.a-good]
kind = "deb"
package_trees = ["{r}/fixtures/patches/good"]

[patches.b-upgrade]
kind = "upgrade"
package_trees = ["{r}/fixtures/patches/upgrade"]

[patches.c-fails-install]
kind = "deb"
package_trees = ["{r}/fixtures/patches/fails-install"]

[checks.web]
kind = "http"
port = 80
status = 200

[checks.nginx-active]
kind = "command"
argv = ["/bin/systemctl", "is-active", "nginx"]
"#
    );
    let path = dir.join("resume.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn journal_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("journal.jsonl")).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn journaled_cells(out: &Path) -> Vec<Value> {
    journal_lines(out).into_iter().filter(|l| l["kind"] == "cell").map(|l| l["result"].clone()).collect()
}

fn goldens_of(host: &patchlab::hypervisor::libvirt::LibvirtHost, report: &Value) -> Vec<patchlab::hypervisor::golden::Golden> {
    std::fs::read_dir(host.dirs.golden())
        .unwrap()
        .flatten()
        .filter_map(|e| patchlab::hypervisor::golden::Golden::load(&e.path()).ok().flatten())
        .filter(|g| report["platforms"].as_array().unwrap().iter().any(|p| p["golden_state_sha256"] == g.record.state_sha256.as_str()))
        .collect()
}

fn key(r: &Value) -> (String, String) {
    (r["platform"].as_str().unwrap().to_string(), r["patch"].as_str().unwrap().to_string())
}

#[test]
fn an_interrupted_run_resumes_into_one_complete_report() {
    let Some(host) = common::host() else { return };
    let work = tempfile::tempdir().unwrap();
    let lab = write_lab(work.path());
    let out = work.path().join("run");
    let keys = work.path().join("keys");
    let keygen = cli(work.path()).arg("keygen").arg("--out").arg(&keys).arg("--identity").arg("resume-test@patchlab").output().unwrap();
    assert!(keygen.status.success(), "{}", String::from_utf8_lossy(&keygen.stderr));

    // 1. Start the run, wait for the first cell in the journal, interrupt it.
    let t0 = Instant::now();
    let stderr_path = work.path().join("first.stderr");
    let mut child = cli(work.path())
        .current_dir(common::root())
        .arg("run")
        .arg(&lab)
        .arg("--out")
        .arg(&out)
        .args(["--jobs", "1", "--ci", "--key"])
        .arg(keys.join("id_ed25519"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(1200);
    while journaled_cells(&out).is_empty() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before any cell finished: {}", std::fs::read_to_string(&stderr_path).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "no cell finished in time");
        std::thread::sleep(Duration::from_millis(200));
    }
    let first_cell_at = t0.elapsed();
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    eprintln!("first session: first cell after {first_cell_at:?}, exited {status} after {:?}", t0.elapsed());
    assert!(stderr.contains("interrupted"), "stderr: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "--ci logs carry no control characters");

    let report = common::read_json(&out.join("report.json"));
    assert_eq!(report["complete"], false, "{report:#}");
    assert_eq!(report["verdict"], "error", "an interrupted run whose finished cells passed is `error`");
    assert_eq!(status.code(), Some(3), "stderr: {stderr}");
    let finished = journaled_cells(&out);
    assert!(!finished.is_empty() && finished.len() < 3, "journal: {finished:#?}");
    assert_eq!(key(&finished[0]), ("debian-12".into(), "a-good".into()));
    assert_eq!(finished[0]["verdict"], "pass");
    for f in &finished {
        let in_report = report["results"].as_array().unwrap().iter().find(|r| key(r) == key(f)).expect("a journaled cell is in the report");
        assert_eq!(in_report, f, "the journal holds the full result");
    }
    // Cells cut short are in the interrupted report as `error`, but not in the journal.
    for r in report["results"].as_array().unwrap() {
        if !finished.iter().any(|f| key(f) == key(r)) {
            assert_eq!(r["verdict"], "error", "{r:#}");
        }
    }
    let header = &journal_lines(&out)[0];
    assert_eq!(header["kind"], "header");
    assert_eq!(header["run_id"], report["run_id"]);
    let first_session = report["run_id"].as_str().unwrap().to_string();
    let goldens = goldens_of(&host, &report);
    assert_eq!(goldens.len(), 1);
    common::LeakCheck::new(&host, &first_session, &goldens.iter().collect::<Vec<_>>()).with_tmpdir(&work.path().join("cli-tmp")).assert_clean();

    // 2. A fresh run into the same directory is refused: it would lose the unfinished run.
    let again = cli(work.path()).arg("run").arg(&lab).arg("--out").arg(&out).output().unwrap();
    assert_eq!(again.status.code(), Some(2), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));

    // 3. Resume (the lab file comes from the journal) into one complete report.
    let t1 = Instant::now();
    let resumed = cli(work.path()).current_dir(common::root()).arg("run").arg("--resume").arg(&out).args(["--jobs", "1", "--ci", "--key"]).arg(keys.join("id_ed25519")).output().unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    eprintln!("resumed session: {:?}", t1.elapsed());
    let report = common::read_json(&out.join("report.json"));
    assert_eq!(resumed.status.code(), Some(1), "c-fails-install fails; stderr: {stderr}\n{report:#}");
    assert_eq!(report["complete"], true);
    assert_eq!(report["verdict"], "fail");
    assert_eq!(report["run_id"].as_str(), Some(first_session.as_str()), "one run across sessions");
    let results = report["results"].as_array().unwrap();
    let keys_in_order: Vec<_> = results.iter().map(key).collect();
    assert_eq!(keys_in_order, [("debian-12".to_string(), "a-good".to_string()), ("debian-12".into(), "b-upgrade".into()), ("debian-12".into(), "c-fails-install".into())]);
    let verdicts: Vec<&str> = results.iter().map(|r| r["verdict"].as_str().unwrap()).collect();
    assert_eq!(verdicts, ["pass", "pass", "fail"]);
    // The union: cells of the first session unchanged, the others from the resumed session.
    let sessions: Vec<String> = journal_lines(&out).iter().filter(|l| l["kind"] == "resumed").map(|l| l["run_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(sessions.len(), 1);
    for r in results {
        match finished.iter().find(|f| key(f) == key(r)) {
            Some(f) => assert_eq!(f, r),
            None => assert!(r["clone"].as_str().unwrap().contains(&sessions[0]), "{}", r["clone"]),
        }
    }
    assert_eq!(journaled_cells(&out).len(), 3);
    common::LeakCheck::new(&host, &sessions[0], &goldens.iter().collect::<Vec<_>>()).with_tmpdir(&work.path().join("cli-tmp")).assert_clean();
    assert_eq!(goldens_of(&host, &report).len(), 1, "the same golden state");

    let verify = cli(work.path()).arg("verify").arg(out.join("report.json")).arg("--allowed-signers").arg(keys.join("allowed_signers")).output().unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", String::from_utf8_lossy(&verify.stdout));
    assert!(out.join("junit.xml").exists());

    // 4. A changed lab file is refused on resume, before any guest starts.
    let mut text = std::fs::read_to_string(&lab).unwrap();
    text.push_str("# changed\n");
    std::fs::write(&lab, text).unwrap();
    let refused = cli(work.path()).arg("run").arg("--resume").arg(&out).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("changed since the run began"), "{}", String::from_utf8_lossy(&refused.stderr));
}
