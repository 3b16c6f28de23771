//! Signed reports end to end, without libvirt: a hand-built report with one evidence file and one
//! patch file, signed with a fresh key, checked by stock `ssh-keygen -Y verify`, `patchlab verify`
//! and `patchlab gate`, and tampered with in every way a reader must notice.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};

use assert_cmd::Command;
use patchlab::report::sign::{self, SignError};
use patchlab::report::{CellResult, Conditions, EvidenceRef, FileRef, LabRef, PatchRef, PlatformRef, Report, SCHEMA_VERSION, Tool, Verdict};
use sha2::{Digest, Sha256};

const IDENTITY: &str = "release@example.org";
const EVIDENCE: &[u8] = b"[    0.000000] Linux version 6.1.0\nlogin: \n";
const DEB: &[u8] = b"!<arch>\nnot really a deb, but its bytes are what the report binds\n";

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn cell(platform: &str, patch: &str, verdict: Verdict, evidence: Vec<EvidenceRef>) -> CellResult {
    CellResult { platform: platform.into(), patch: patch.into(), verdict, host: "qemu:///system".into(), clone: format!("patchlab-test-{platform}"), error: None, conditions: Conditions::default(), phases: vec![], duration_ms: 1234, evidence }
}

fn platform(name: &str) -> PlatformRef {
    PlatformRef { name: name.into(), origin: format!("image:{name}"), os: Some("debian".into()), version: Some("12".into()), arch: Some("x86_64".into()), image_recipe_digest: Some("d".repeat(64)), image_disk_sha256: Some("e".repeat(64)), golden_disk_sha256: "f".repeat(64), golden_state_sha256: "0".repeat(64) }
}

/// A passing, complete, just-finished report over two platforms and one patch.
fn good_report() -> Report {
    let now = jiff::Timestamp::now();
    Report {
        schema_version: SCHEMA_VERSION,
        run_id: "test-run".into(),
        complete: true,
        verdict: Verdict::Pass,
        lab: LabRef { name: "demo".into(), file: "labs/demo.toml".into(), sha256: "a".repeat(64) },
        patchlab: Tool { version: "0.1.0".into(), commit: "deadbeef".into() },
        hosts: vec![],
        started_at: (now - jiff::SignedDuration::from_mins(10)).to_string(),
        finished_at: now.to_string(),
        platforms: vec![platform("debian12"), platform("ubuntu24")],
        patches: vec![PatchRef { name: "openssl-fix".into(), kind: "deb".into(), files: vec![FileRef { name: "openssl_3.0.1_amd64.deb".into(), path: "patches/openssl-fix/openssl_3.0.1_amd64.deb".into(), sha256: sha256(DEB), package: "openssl".into() }] }],
        coverage: Default::default(),
        results: vec![
            cell("debian12", "openssl-fix", Verdict::Pass, vec![EvidenceRef { path: "evidence/debian12-openssl-fix-console.log".into(), sha256: sha256(EVIDENCE), bytes: EVIDENCE.len() as u64 }]),
            cell("ubuntu24", "openssl-fix", Verdict::Pass, vec![]),
        ],
        signer: None,
    }
}

struct Keys {
    _dir: tempfile::TempDir,
    private: PathBuf,
    allowed_signers: PathBuf,
}

fn keys(identity: &str) -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let files = sign::keygen(dir.path(), identity).unwrap();
    let mode = std::fs::metadata(&files.private_key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "private key mode");
    Keys { private: files.private_key, allowed_signers: files.allowed_signers, _dir: dir }
}

/// Writes the report, its evidence and patch files into a fresh directory and signs it.
fn signed(report: &Report, key: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("evidence")).unwrap();
    std::fs::write(dir.path().join("evidence/debian12-openssl-fix-console.log"), EVIDENCE).unwrap();
    std::fs::create_dir_all(dir.path().join("patches/openssl-fix")).unwrap();
    std::fs::write(dir.path().join("patches/openssl-fix/openssl_3.0.1_amd64.deb"), DEB).unwrap();
    let path = report.write(dir.path()).unwrap();
    let sig = sign::sign(&path, key).unwrap();
    assert_eq!(sig, dir.path().join("report.json.sig"));
    (dir, path)
}

fn patchlab(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = Command::cargo_bin("patchlab").unwrap().args(args).env("PATCHLAB_LOG", "warn").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn verify(report: &Path, allowed_signers: &Path, identity: Option<&str>) -> (i32, String) {
    let mut args = vec![os("verify"), report.as_os_str(), os("--allowed-signers"), allowed_signers.as_os_str()];
    if let Some(id) = identity {
        args.extend([os("--identity"), os(id)]);
    }
    patchlab(&args)
}

#[test]
fn stock_ssh_keygen_accepts_the_signature() {
    let k = keys(IDENTITY);
    let (_dir, report) = signed(&good_report(), &k.private);
    let sig = sign::signature_path(&report);
    let out = StdCommand::new("ssh-keygen")
        .args(["-Y", "verify", "-f"])
        .arg(&k.allowed_signers)
        .args(["-I", IDENTITY, "-n", "patchlab-report", "-s"])
        .arg(&sig)
        .stdin(Stdio::from(std::fs::File::open(&report).unwrap()))
        .output()
        .expect("ssh-keygen (openssh-client) must be installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("Good \"patchlab-report\" signature"), "{text}");
    // And the armor is the stock one.
    assert!(std::fs::read_to_string(&sig).unwrap().starts_with("-----BEGIN SSH SIGNATURE-----"));
}

#[test]
fn verify_accepts_a_good_report_and_prints_a_summary() {
    let k = keys(IDENTITY);
    let (_dir, report) = signed(&good_report(), &k.private);
    let (code, out) = verify(&report, &k.allowed_signers, None);
    assert_eq!(code, 0, "{out}");
    for want in ["verdict:  pass", "complete: yes", "demo", IDENTITY, "debian12", "ubuntu24", "openssl-fix", "valid:"] {
        assert!(out.contains(want), "summary lacks `{want}`:\n{out}");
    }
    let (code, out) = verify(&report, &k.allowed_signers, Some(IDENTITY));
    assert_eq!(code, 0, "{out}");
    let (code, out) = verify(&report, &k.allowed_signers, Some("someone@else"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("someone@else"), "{out}");
}

#[test]
fn any_changed_byte_of_the_report_is_caught() {
    let k = keys(IDENTITY);
    let (_dir, report) = signed(&good_report(), &k.private);
    let original = std::fs::read(&report).unwrap();
    let samples = 20;
    for i in 0..samples {
        let at = i * (original.len() - 1) / (samples - 1);
        let mut bytes = original.clone();
        bytes[at] ^= 0x01;
        std::fs::write(&report, &bytes).unwrap();
        let (code, out) = verify(&report, &k.allowed_signers, None);
        assert_eq!(code, 1, "byte {at} flipped yet verify said:\n{out}");
        assert!(out.contains("invalid:"), "{out}");
    }
    std::fs::write(&report, &original).unwrap();
    assert_eq!(verify(&report, &k.allowed_signers, None).0, 0);
}

#[test]
fn changed_evidence_or_patch_files_are_named() {
    let k = keys(IDENTITY);
    let (dir, report) = signed(&good_report(), &k.private);
    std::fs::write(dir.path().join("evidence/debian12-openssl-fix-console.log"), b"edited\n").unwrap();
    let (code, out) = verify(&report, &k.allowed_signers, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.lines().any(|l| l.starts_with("invalid:") && l.contains("evidence/debian12-openssl-fix-console.log")), "{out}");

    std::fs::remove_file(dir.path().join("patches/openssl-fix/openssl_3.0.1_amd64.deb")).unwrap();
    let (code, out) = verify(&report, &k.allowed_signers, None);
    assert_eq!(code, 1, "{out}");
    let reasons: Vec<_> = out.lines().filter(|l| l.starts_with("invalid:")).collect();
    assert_eq!(reasons.len(), 2, "every reason is printed:\n{out}");
    assert!(reasons.iter().any(|l| l.contains("patches/openssl-fix/openssl_3.0.1_amd64.deb")), "{out}");
}

#[test]
fn paths_outside_the_report_directory_are_refused() {
    let k = keys(IDENTITY);
    for bad in ["../outside.log", "/etc/hostname", "evidence/../../x"] {
        let mut r = good_report();
        r.results[0].evidence[0].path = bad.into();
        let (_dir, report) = signed(&r, &k.private);
        let (code, out) = verify(&report, &k.allowed_signers, None);
        assert_eq!(code, 1, "{bad}: {out}");
        assert!(out.contains(bad) && out.contains("inside the report directory"), "{bad}: {out}");
    }
}

#[test]
fn another_key_or_a_missing_signature_is_refused() {
    let trusted = keys(IDENTITY);
    let stranger = keys("mallory@example.org");
    let (dir, report) = signed(&good_report(), &stranger.private);
    let (code, out) = verify(&report, &trusted.allowed_signers, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no allowed signers line"), "{out}");

    std::fs::remove_file(dir.path().join("report.json.sig")).unwrap();
    let (code, out) = verify(&report, &trusted.allowed_signers, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("report.json.sig"), "{out}");
}

#[test]
fn an_unknown_schema_version_is_refused() {
    let k = keys(IDENTITY);
    let mut r = good_report();
    r.schema_version = 99;
    let (_dir, report) = signed(&r, &k.private);
    let (code, out) = verify(&report, &k.allowed_signers, None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("schema_version 99"), "{out}");
}

#[test]
fn a_key_others_can_read_is_refused() {
    let k = keys(IDENTITY);
    let dir = tempfile::tempdir().unwrap();
    let path = good_report().write(dir.path()).unwrap();
    std::fs::set_permissions(&k.private, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = sign::sign(&path, &k.private).unwrap_err();
    assert!(matches!(err, SignError::KeyPermissions { mode: 0o644, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&k.private.display().to_string()) && msg.contains("0644"), "{msg}");
    assert!(!dir.path().join("report.json.sig").exists());
}

#[test]
fn keygen_cli_writes_a_usable_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keys");
    let (code, text) = patchlab(&[os("keygen"), os("--out"), out.as_os_str(), os("--identity"), os(IDENTITY)]);
    assert_eq!(code, 0, "{text}");
    let line = std::fs::read_to_string(out.join("allowed_signers")).unwrap();
    assert!(line.starts_with(&format!("{IDENTITY} namespaces=\"patchlab-report\" ssh-ed25519 AAAA")), "{line}");
    let (_r, report) = signed(&good_report(), &out.join("id_ed25519"));
    assert_eq!(verify(&report, &out.join("allowed_signers"), Some(IDENTITY)).0, 0);
    let (code, text) = patchlab(&[os("keygen"), os("--out"), out.as_os_str()]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("already exists"), "{text}");
}

#[test]
fn gate_table() {
    let k = keys(IDENTITY);
    let good_deb = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(good_deb.path(), DEB).unwrap();
    let other_deb = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(other_deb.path(), b"a different build").unwrap();

    /// (name, report edit, use the other patch file, --platform, want exit, want reasons)
    type Row = (&'static str, fn(&mut Report), bool, &'static [&'static str], i32, &'static [&'static str]);
    let table: &[Row] = &[
        ("all good", |_| {}, false, &["debian12"], 0, &[]),
        ("all good, no platform named", |_| {}, false, &[], 0, &[]),
        ("incomplete", |r| r.complete = false, false, &[], 1, &["incomplete"]),
        ("verdict fail", |r| r.verdict = Verdict::Fail, false, &[], 1, &["verdict is fail"]),
        ("old finished_at", |r| r.finished_at = "2020-01-01T00:00:00Z".into(), false, &[], 1, &["older than the maximum age 7d"]),
        ("wrong patch file", |_| {}, true, &[], 1, &["is not a file this report tested"]),
        (
            "named platform failed",
            |r| {
                r.results[1].verdict = Verdict::Fail;
                r.verdict = Verdict::Fail;
            },
            false,
            &["ubuntu24"],
            1,
            &["verdict is fail", "platform ubuntu24: patch openssl-fix is fail"],
        ),
        ("unknown platform", |_| {}, false, &["arch"], 1, &["platform arch is not in the report"]),
    ];
    for (name, edit, other, platforms, want_code, want) in table {
        let mut r = good_report();
        edit(&mut r);
        let (_dir, report) = signed(&r, &k.private);
        let deb = if *other { other_deb.path() } else { good_deb.path() };
        let mut args: Vec<&std::ffi::OsStr> = vec![os("gate"), report.as_os_str(), os("--allowed-signers"), k.allowed_signers.as_os_str(), os("--patch"), deb.as_os_str()];
        for p in *platforms {
            args.extend([os("--platform"), os(p)]);
        }
        let (code, out) = patchlab(&args);
        assert_eq!(code, *want_code, "{name}:\n{out}");
        let reasons: Vec<_> = out.lines().filter(|l| l.starts_with("refused: ")).collect();
        assert_eq!(reasons.len(), want.len(), "{name}: {reasons:?}");
        for w in *want {
            assert!(reasons.iter().any(|l| l.contains(w)), "{name}: no reason contains `{w}`:\n{out}");
        }
        if *want_code == 0 {
            assert!(out.contains("approved:"), "{name}: {out}");
        }
    }
}

#[test]
fn gate_refuses_an_unverified_report_and_lists_every_reason() {
    let k = keys(IDENTITY);
    let mut r = good_report();
    r.complete = false;
    let (dir, report) = signed(&r, &k.private);
    std::fs::write(dir.path().join("evidence/debian12-openssl-fix-console.log"), b"edited\n").unwrap();
    let deb = dir.path().join("patches/openssl-fix/openssl_3.0.1_amd64.deb");
    let (code, out) = patchlab(&[os("gate"), report.as_os_str(), os("--allowed-signers"), k.allowed_signers.as_os_str(), os("--patch"), deb.as_os_str(), os("--max-age"), os("1h")]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused: report does not verify") && out.contains("console.log"), "{out}");
    assert!(out.contains("refused: report is incomplete"), "{out}");

    // Usage errors are 2: a bad duration, a missing patch file.
    let (code, out) = patchlab(&[os("gate"), report.as_os_str(), os("--allowed-signers"), k.allowed_signers.as_os_str(), os("--patch"), deb.as_os_str(), os("--max-age"), os("7 days")]);
    assert_eq!(code, 2, "{out}");
    let (code, out) = patchlab(&[os("gate"), report.as_os_str(), os("--allowed-signers"), k.allowed_signers.as_os_str(), os("--patch"), os("/nonexistent.deb")]);
    assert_eq!(code, 2, "{out}");
}
