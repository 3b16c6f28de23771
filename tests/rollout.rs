//! The deployment phase end to end, without libvirt: a hand-built report whose coverage is computed
//! from fixtures/inventory.toml, signed with a fresh key, then `patchlab rollout plan`, `next`,
//! `record` and `status` driven wave by wave with burn times of seconds. Also: every invalid
//! inventory in fixtures/inventories/ is refused with file, line and column (snapshotted), and
//! reports that fail the gate or belong to another inventory give no plan.

use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;
use patchlab::inventory::{coverage, Inventory, PlatformId};
use patchlab::report::sign;
use patchlab::report::{CellResult, Conditions, Coverage, FileRef, LabRef, PatchRef, PlatformRef, Report, Tool, Verdict, SCHEMA_VERSION};
use patchlab::rollout::Plan;
use sha2::{Digest, Sha256};

const INVENTORY: &str = "fixtures/inventory.toml";
const DEB: &[u8] = b"!<arch>\nthe bytes the report binds\n";

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn platform(name: &str, version: &str) -> PlatformRef {
    PlatformRef {
        name: name.into(),
        origin: format!("image:{name}"),
        os: Some("debian".into()),
        version: Some(version.into()),
        arch: Some("x86_64".into()),
        image_recipe_digest: None,
        image_disk_sha256: None,
        golden_disk_sha256: "f".repeat(64),
        golden_state_sha256: "0".repeat(64),
    }
}

fn cell(platform: &str, verdict: Verdict) -> CellResult {
    CellResult {
        platform: platform.into(),
        patch: "good".into(),
        verdict,
        host: "qemu:///system".into(),
        clone: format!("patchlab-t-{platform}"),
        error: None,
        conditions: Conditions::default(),
        phases: vec![],
        duration_ms: 9000,
        evidence: vec![],
    }
}

fn coverage_of(inventory_text: &str) -> Coverage {
    let inventory = Inventory::parse(Path::new(INVENTORY), inventory_text).unwrap();
    let labs: Vec<PlatformId> = [platform("debian-12", "12"), platform("debian-13", "13")].iter().filter_map(PlatformId::from_report).collect();
    coverage(&inventory, INVENTORY, &labs, &|_| true, 50)
}

/// A complete, passing, just-finished report of the default lab (Debian 12 and 13) over the example inventory.
fn good_report() -> Report {
    let now = jiff::Timestamp::now();
    Report {
        schema_version: SCHEMA_VERSION,
        run_id: "rollout-test".into(),
        complete: true,
        verdict: Verdict::Pass,
        lab: LabRef { name: "default".into(), file: "labs/default.toml".into(), sha256: "a".repeat(64) },
        patchlab: Tool { version: "0.1.0".into(), commit: "deadbeef".into() },
        hosts: vec![],
        started_at: (now - jiff::SignedDuration::from_mins(5)).to_string(),
        finished_at: now.to_string(),
        platforms: vec![platform("debian-12", "12"), platform("debian-13", "13")],
        patches: vec![PatchRef {
            name: "good".into(),
            kind: "deb".into(),
            files: vec![FileRef { name: "good.deb".into(), path: "patches/good/good.deb".into(), sha256: sha256(DEB), package: "good".into() }],
        }],
        coverage: coverage_of(&std::fs::read_to_string(INVENTORY).unwrap()),
        results: vec![cell("debian-12", Verdict::Pass), cell("debian-13", Verdict::Pass)],
        signer: None,
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    report: PathBuf,
    key: PathBuf,
    allowed_signers: PathBuf,
}

fn signed(report: &Report) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let keys = sign::keygen(&dir.path().join("keys"), "release@example.org").unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(run.join("patches/good")).unwrap();
    std::fs::write(run.join("patches/good/good.deb"), DEB).unwrap();
    let path = report.write(&run).unwrap();
    sign::sign(&path, &keys.private_key).unwrap();
    Fixture { report: path, key: keys.private_key, allowed_signers: keys.allowed_signers, dir }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

fn patchlab<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Out {
    let out = Command::cargo_bin("patchlab").unwrap().args(args).env("PATCHLAB_LOG", "warn").env_remove("PATCHLAB_SIGNING_KEY").output().unwrap();
    Out { code: out.status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn plan_cmd(f: &Fixture, inventory: &str, out: &Path, extra: &[&str]) -> Out {
    let mut args: Vec<std::ffi::OsString> = vec![
        "rollout".into(),
        "plan".into(),
        f.report.clone().into(),
        "--allowed-signers".into(),
        f.allowed_signers.clone().into(),
        "--inventory".into(),
        inventory.into(),
        "--out".into(),
        out.into(),
    ];
    args.extend(extra.iter().map(Into::into));
    patchlab(&args)
}

fn next(dir: &Path) -> Out {
    patchlab(&[os("rollout"), os("next"), dir.as_os_str()])
}

fn record(dir: &Path, host: &str, status: &str) -> Out {
    patchlab(&[os("rollout"), os("record"), dir.as_os_str(), os("--host"), os(host), os("--status"), os(status)])
}

fn status(dir: &Path, format: &str) -> Out {
    patchlab(&[os("rollout"), os("status"), dir.as_os_str(), os("--format"), os(format)])
}

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn plan_then_drive_every_wave_to_the_end() {
    let f = signed(&good_report());
    let dir = f.dir.path().join("plan");
    let key = f.key.display().to_string();
    let o = plan_cmd(&f, INVENTORY, &dir, &["--burn-time", "2s", "--critical-burn-time", "1s", "--key", &key]);
    assert_eq!(o.code, 0, "{o:?}");

    // The plan: bound to the report and inventory, signed like the report, in the documented shape.
    let plan_bytes = std::fs::read(dir.join("plan.json")).unwrap();
    let plan: Plan = serde_json::from_slice(&plan_bytes).unwrap();
    assert_eq!(plan.report.sha256, sha256(&std::fs::read(&f.report).unwrap()));
    assert_eq!(plan.inventory.sha256, sha256(&std::fs::read(INVENTORY).unwrap()));
    let waves: Vec<(&str, Vec<&str>, u64)> = plan.waves.iter().map(|w| (w.name.as_str(), w.hosts.iter().map(String::as_str).collect(), w.burn_time_ms)).collect();
    assert_eq!(
        waves,
        vec![("pilot", vec!["cache-02", "web-01"], 2000), ("remaining", vec!["web-02", "web-04", "cache-01", "web-03", "batch-03", "db-02"], 2000), ("critical", vec!["db-01", "db-03"], 1000),]
    );
    assert_eq!(plan.blocked.iter().map(|b| b.host.as_str()).collect::<Vec<_>>(), ["batch-01", "batch-02", "legacy-01"]);
    assert!(plan.blocked[2].reason.contains("debian 10 x86_64 is not covered"), "{:?}", plan.blocked);
    let json: serde_json::Value = serde_json::from_slice(&plan_bytes).unwrap();
    assert!(json["waves"][0]["burn_time_ms"].is_u64() && json["waves"][0]["hosts"].is_array() && json["waves"][0]["name"] == "pilot");
    let sig = std::fs::read_to_string(dir.join("plan.json.sig")).unwrap();
    sign::verify_signature(&plan_bytes, &sig, &std::fs::read_to_string(&f.allowed_signers).unwrap(), Some("release@example.org")).unwrap();

    // A plan is never overwritten.
    assert_eq!(plan_cmd(&f, INVENTORY, &dir, &[]).code, 2);

    // Nothing may be recorded before its wave starts.
    let o = record(&dir, "cache-02", "ok");
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stdout.contains("has not started"), "{o:?}");

    // The pilot.
    let o = next(&dir);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(lines(&o.stdout), ["cache-02", "web-01"]);
    let o = next(&dir);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("pending: wave pilot has hosts not yet recorded: cache-02, web-01"), "{o:?}");

    let log = f.dir.path().join("cache-02.log");
    std::fs::write(&log, "deployed\n").unwrap();
    let o = patchlab(&[os("rollout"), os("record"), dir.as_os_str(), os("--host"), os("cache-02"), os("--status"), os("ok"), os("--log"), log.as_os_str()]);
    assert_eq!(o.code, 0, "{o:?}");
    let o = record(&dir, "cache-02", "ok");
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stdout.contains("already recorded"), "{o:?}");
    for (host, why) in [("legacy-01", "blocked"), ("db-01", "has not started"), ("web-02", "has not started"), ("nobody", "not in the plan")] {
        let o = record(&dir, host, "ok");
        assert_eq!(o.code, 1, "{host}: {o:?}");
        assert!(o.stdout.contains(why), "{host}: {o:?}");
    }
    assert_eq!(record(&dir, "web-01", "ok").code, 0);
    let journal = std::fs::read_to_string(dir.join("journal.jsonl")).unwrap();
    assert!(journal.contains(&format!("\"log_sha256\":\"{}\"", sha256(b"deployed\n"))), "{journal}");

    // Burn time: refused, then allowed.
    let o = next(&dir);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.starts_with("waiting: wave pilot is burning in"), "{o:?}");
    let o = status(&dir, "text");
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("wave 1 pilot: burning in") && o.stdout.contains("(burn time 2s, ") && o.stdout.contains(" left)"), "{o:?}");
    std::thread::sleep(Duration::from_millis(2100));
    let o = next(&dir);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(lines(&o.stdout), ["web-02", "web-04", "cache-01", "web-03", "batch-03", "db-02"]);
    for h in lines(&o.stdout) {
        assert_eq!(record(&dir, h, "ok").code, 0, "{h}");
    }

    // `next --wait` sleeps through the burn time and starts the critical wave.
    assert_eq!(next(&dir).code, 1);
    let started = std::time::Instant::now();
    let o = patchlab(&[os("rollout"), os("next"), dir.as_os_str(), os("--wait")]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(lines(&o.stdout), ["db-01", "db-03"]);
    assert!(started.elapsed() >= Duration::from_millis(1000), "waited {:?}", started.elapsed());
    assert!(o.stderr.contains("waiting: wave remaining is burning in"), "{o:?}");
    assert_eq!(record(&dir, "db-01", "ok").code, 0);
    assert_eq!(record(&dir, "db-03", "ok").code, 0);

    // Done: `next` has nothing more, `status` has the final summary in every format.
    let o = next(&dir);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.starts_with("done:"), "{o:?}");
    let o = status(&dir, "text");
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("journal:   13 entries, chain verified"), "{o:?}");
    assert!(o.stdout.contains("Rollout complete: 10 host(s) patched in 3 wave(s)"), "{o:?}");
    assert!(o.stdout.contains("batch-01 (debian 11 x86_64)") && o.stdout.contains("legacy-01 (debian 10 x86_64)"), "{o:?}");
    assert!(o.stdout.contains("signed (plan.json.sig)"), "{o:?}");
    let md = status(&dir, "md");
    assert!(md.code == 0 && md.stdout.contains("| critical | ") && md.stdout.contains("## Summary"), "{md:?}");
    let html = status(&dir, "html");
    assert!(html.code == 0 && html.stdout.starts_with("<!DOCTYPE html>") && html.stdout.contains("<h2>Summary</h2>"), "{html:?}");

    // A journal edited by hand is detected, whatever the edit.
    let journal = std::fs::read_to_string(dir.join("journal.jsonl")).unwrap();
    let edits: Vec<(&str, String)> = vec![
        ("a status flipped", journal.replacen("\"status\":\"ok\"", "\"status\":\"failed\"", 1)),
        ("a line removed", journal.lines().enumerate().filter(|(i, _)| *i != 3).map(|(_, l)| format!("{l}\n")).collect()),
        ("a time moved", journal.replacen("\"time\":\"20", "\"time\":\"19", 2)),
        ("cut short", journal[..journal.len() - 1].to_string()),
    ];
    for (what, edited) in edits {
        assert_ne!(edited, journal, "{what}");
        std::fs::write(dir.join("journal.jsonl"), &edited).unwrap();
        let o = status(&dir, "text");
        assert_eq!(o.code, 1, "{what}: {o:?}");
        assert!(o.stdout.contains("refused: the journal does not verify"), "{what}: {o:?}");
        assert_eq!(next(&dir).code, 1, "{what}");
        assert_eq!(record(&dir, "db-01", "ok").code, 1, "{what}");
    }
    // So is an edited plan.
    std::fs::write(dir.join("journal.jsonl"), &journal).unwrap();
    assert_eq!(status(&dir, "text").code, 0);
    std::fs::write(dir.join("plan.json"), String::from_utf8(plan_bytes).unwrap().replace("\"legacy-01\"", "\"legacy-02\"")).unwrap();
    let o = status(&dir, "text");
    assert!(o.code == 1 && o.stdout.contains("journal line 1: prev_sha256"), "{o:?}");
}

#[test]
fn a_failure_halts_the_rollout() {
    let f = signed(&good_report());
    let dir = f.dir.path().join("plan");
    assert_eq!(plan_cmd(&f, INVENTORY, &dir, &["--burn-time", "0s"]).code, 0);
    assert_eq!(next(&dir).code, 0);
    assert_eq!(record(&dir, "cache-02", "failed").code, 0);
    let o = next(&dir);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.contains("halted: wave pilot has failed hosts: cache-02"), "{o:?}");
    // The rest of the wave may still be recorded (it may have been deployed already), but no wave starts.
    assert_eq!(record(&dir, "web-01", "ok").code, 0);
    let o = next(&dir);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stderr.starts_with("halted:"), "{o:?}");
    let o = status(&dir, "text");
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stdout.contains("wave 1 pilot: halted") && o.stdout.contains("failed:  cache-02"), "{o:?}");
    assert!(o.stdout.contains("Rollout halted in wave pilot: cache-02 failed"), "{o:?}");
}

#[test]
fn no_plan_from_a_report_that_fails_the_gate_or_covers_another_inventory() {
    let dir = tempfile::tempdir().unwrap();
    let mut failed = good_report();
    failed.verdict = Verdict::Fail;
    failed.results[1].verdict = Verdict::Fail;
    let mut incomplete = good_report();
    incomplete.complete = false;
    let mut old = good_report();
    old.finished_at = "2020-01-01T00:00:00Z".into();
    let mut no_inventory = good_report();
    no_inventory.coverage = Coverage::default();
    let mut other = good_report();
    other.coverage = coverage_of(&std::fs::read_to_string(INVENTORY).unwrap().replace("criticality = \"low\"", "criticality = \"medium\""));
    let mut low = good_report();
    low.coverage.status = patchlab::report::Status::Fail;
    let table: Vec<(&str, Report, &str)> = vec![
        ("failed", failed, "report verdict is fail, not pass"),
        ("incomplete", incomplete, "report is incomplete"),
        ("too old", old, "older than the maximum age"),
        ("no inventory", no_inventory, "the report has no inventory (coverage is skipped)"),
        ("another inventory", other, "it belongs to another inventory"),
        ("coverage failed", low, "coverage is fail: 10 of 13 hosts covered"),
    ];
    for (case, report, want) in table {
        let f = signed(&report);
        let out = dir.path().join(case.replace(' ', "-"));
        let o = plan_cmd(&f, INVENTORY, &out, &[]);
        assert_eq!(o.code, 1, "{case}: {o:?}");
        assert!(o.stdout.contains(want), "{case}: {o:?}");
        assert!(!out.join("plan.json").exists(), "{case}");
    }

    // A report changed after signing does not verify.
    let f = signed(&good_report());
    let text = std::fs::read_to_string(&f.report).unwrap().replace("rollout-test", "rollout-tesT");
    std::fs::write(&f.report, text).unwrap();
    let o = plan_cmd(&f, INVENTORY, &dir.path().join("tampered"), &[]);
    assert!(o.code == 1 && o.stdout.contains("report does not verify"), "{o:?}");

    // Invalid input: exit 2.
    let f = signed(&good_report());
    let o = plan_cmd(&f, "fixtures/inventories/unknown-criticality.toml", &dir.path().join("bad"), &[]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("fixtures/inventories/unknown-criticality.toml:13:15:"), "{o:?}");
    assert_eq!(plan_cmd(&f, INVENTORY, &dir.path().join("p"), &["--pilot", "0"]).code, 2);
    assert_eq!(plan_cmd(&f, INVENTORY, &dir.path().join("p"), &["--burn-time", "10"]).code, 2);
    assert_eq!(next(&dir.path().join("nothing-here")).code, 2);
}

#[test]
fn every_invalid_inventory_is_refused_with_where_and_what() {
    const WHOLE_FILE: &[&str] = &["empty-file", "no-hosts"];
    let mut files: Vec<PathBuf> =
        std::fs::read_dir("fixtures/inventories").unwrap().map(|e| Path::new("fixtures/inventories").join(e.unwrap().file_name())).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
    files.sort();
    assert!(files.len() >= 10, "{} files", files.len());
    for path in files {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let e = Inventory::load(&path).expect_err(&name);
        if WHOLE_FILE.contains(&name.as_str()) {
            assert_eq!(e.line, 0, "{name}: {e}");
        } else {
            assert!(e.line > 0 && e.column > 0 && e.source_line.is_some(), "{name}: {e}");
        }
        insta::assert_snapshot!(format!("inventory-{name}"), e.to_string());
    }
    assert_eq!(Inventory::load(Path::new(INVENTORY)).unwrap().hosts.len(), 13);
}

#[test]
fn with_allowed_signers_only_a_plan_whose_signature_verifies_is_acted_on() {
    let f = signed(&good_report());
    let signers = f.allowed_signers.clone();
    let trusted = |cmd: &str, dir: &Path| patchlab(&[os("rollout"), os(cmd), dir.as_os_str(), os("--allowed-signers"), signers.as_os_str(), os("--identity"), os("release@example.org")]);

    // Signed and intact: next and status go ahead and say whose signature they checked.
    let dir = f.dir.path().join("signed");
    let key = f.key.display().to_string();
    assert_eq!(plan_cmd(&f, INVENTORY, &dir, &["--burn-time", "0s", "--key", &key]).code, 0);
    let o = trusted("status", &dir);
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.stderr.contains("plan.json.sig verified: signed by release@example.org (SHA256:"), "{o:?}");
    let o = trusted("next", &dir);
    assert_eq!(o.code, 0, "{o:?}");

    // Edited after signing (one host moved between waves): refused, nothing appended.
    let plan = dir.join("plan.json");
    let journal_before = std::fs::read(dir.join("journal.jsonl")).unwrap();
    let text = std::fs::read_to_string(&plan).unwrap();
    std::fs::write(&plan, text.replacen("cache-02", "cache-0X", 1)).unwrap();
    for cmd in ["next", "status"] {
        let o = trusted(cmd, &dir);
        assert_eq!(o.code, 1, "{cmd}: {o:?}");
        assert!(o.stdout.contains("refused: the plan's signature does not verify"), "{cmd}: {o:?}");
    }
    assert_eq!(std::fs::read(dir.join("journal.jsonl")).unwrap(), journal_before);

    // Unsigned: refused when a signature is required, accepted without --allowed-signers.
    let dir = f.dir.path().join("unsigned");
    assert_eq!(plan_cmd(&f, INVENTORY, &dir, &["--burn-time", "0s"]).code, 0);
    let o = trusted("next", &dir);
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.stdout.contains("has no signature") && o.stdout.contains("plan.json.sig is missing"), "{o:?}");
    assert_eq!(next(&dir).code, 0);
}
