//! `patchlab run` in CI: plain log lines without control characters, JSON logs with --log-json.
//! No guests: the run stops at an unreachable libvirt URI (exit 3) after logging its start.

use assert_cmd::Command;

#[test]
fn ci_logs_are_plain_and_json_logs_are_json_lines() {
    let work = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let lab = work.path().join("lab.toml");
    std::fs::write(&lab, format!("[platforms.p]\nimage = \"{0}/images/debian-12.toml\"\n[patches.good]\nkind = \"deb\"\npackage_trees = [\"{0}/fixtures/patches/good\"]\n[checks.web]\nkind = \"http\"\nport = 80\n", root.display())).unwrap();
    let json = work.path().join("log.jsonl");
    let out = Command::cargo_bin("patchlab")
        .unwrap()
        .env("CI", "true")
        .env("PATCHLAB_CACHE_DIR", work.path().join("cache"))
        .arg("run")
        .arg(&lab)
        .arg("--out")
        .arg(work.path().join("run"))
        .args(["--connect", "qemu+unix:///system?socket=/nonexistent/libvirt-sock"])
        .arg("--log-json")
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "an unreachable libvirt is the lab's fault: {stderr}");
    assert!(stderr.contains("run started"), "{stderr}");
    // libvirt is reached before any image is built: a host that is down costs no debootstrap.
    assert!(!work.path().join("cache/images").exists(), "an image was built before libvirt was reached: {stderr}");
    assert!(!stderr.chars().any(|c| c.is_control() && c != '\n'), "control characters in CI logs: {stderr:?}");
    let lines = std::fs::read_to_string(&json).unwrap();
    assert!(!lines.is_empty());
    for line in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
    assert!(lines.contains("\"run started\""));
}
