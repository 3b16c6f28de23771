//! report.html, report.md and junit.xml from a hand-built report that has every kind of result:
//! pass, fail (fingerprint differences, a failing check, hostile guest output), error, skipped,
//! and coverage with uncovered hosts. Fixed timestamps and digests, so the snapshots need no
//! redaction. The HTML is also opened in headless Chromium, and junit.xml is checked against the
//! Jenkins JUnit schema with xmllint.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use patchlab::checks::CheckResult;
use patchlab::guest::{ExecResult, Output};
use patchlab::patch::Delivered;
use patchlab::report::render;
use patchlab::report::{BurnInRound, CellResult, Condition, Conditions, Coverage, Difference, EvidenceRef, FileRef, HostCoverage, HostRef, InventoryRef, LabRef, PatchRef, Phase, PlatformRef, Report, SCHEMA_VERSION, Status, Tool, Verdict};

const HOSTILE: &str = "<script>alert(1)</script>";
const HOSTILE_CELL: &str = "</td><td>INJECTED";

fn digest(c: char) -> String {
    c.to_string().repeat(64)
}

fn out(text: &str) -> Output {
    Output { text: text.into(), bytes: text.len() as u64, sha256: digest('5'), truncated: false, tail: None }
}

fn check(name: &str, passed: bool, detail: &str) -> CheckResult {
    CheckResult { name: name.into(), passed, attempts: if passed { 1 } else { 3 }, detail: detail.into(), duration_ms: 12 }
}

fn exec(command: &str, exit: i64, stdout: &str, stderr: &str) -> ExecResult {
    ExecResult { command: command.into(), exit_code: Some(exit), signal: None, stdout: out(stdout), stderr: out(stderr), duration_ms: 840 }
}

fn checks_ok() -> Vec<CheckResult> {
    vec![check("nginx-http", true, "GET / answered 200"), check("ssh-port", true, "guest port 22 accepted a connection")]
}

fn delivered() -> Vec<Delivered> {
    vec![Delivered { file: "nginx-fix_1.0_all.deb".into(), host_sha256: digest('a'), guest_sha256: digest('a'), pinned_sha256: Some(digest('a')) }]
}

fn phases() -> Vec<Phase> {
    ["restore", "baseline", "deliver", "install", "operations", "remove", "teardown"].iter().enumerate().map(|(i, n)| Phase { name: n.to_string(), ms: 100 * (i as u64 + 1) }).collect()
}

fn all_pass() -> Conditions {
    Conditions {
        baseline: Condition { checks: checks_ok(), ..Condition::pass() },
        delivery: Condition { delivered: delivered(), ..Condition::pass() },
        install: Condition { commands: vec![exec("dpkg -i /var/tmp/patchlab/nginx-fix_1.0_all.deb", 0, "Setting up nginx-fix (1.0) ...\n", "")], ..Condition::pass() },
        operations: Condition { checks: checks_ok(), burn_in: vec![BurnInRound { at_ms: 0, checks: checks_ok() }, BurnInRound { at_ms: 30_000, checks: checks_ok() }], ..Condition::pass() },
        removal: Condition { commands: vec![exec("dpkg --purge nginx-fix", 0, "Removing nginx-fix (1.0) ...\n", "")], checks: checks_ok(), allowed_differences: 3, ..Condition::pass() },
    }
}

fn cell(platform: &str, patch: &str, verdict: Verdict, conditions: Conditions, error: Option<&str>) -> CellResult {
    CellResult {
        platform: platform.into(),
        patch: patch.into(),
        verdict,
        host: "qemu:///system".into(),
        clone: format!("patchlab-20250101T000000Z-{platform}-{patch}"),
        error: error.map(Into::into),
        conditions,
        phases: phases(),
        duration_ms: 9_876,
        evidence: vec![EvidenceRef { path: format!("evidence/{platform}-{patch}/console.log"), sha256: digest('c'), bytes: 20_480 }],
    }
}

fn platform(name: &str, version: &str) -> PlatformRef {
    PlatformRef { name: name.into(), origin: format!("image:{name}"), os: Some("debian".into()), version: Some(version.into()), arch: Some("x86_64".into()), image_recipe_digest: Some(digest('d')), image_disk_sha256: Some(digest('e')), golden_disk_sha256: digest('f'), golden_state_sha256: digest('0') }
}

fn patch(name: &str) -> PatchRef {
    PatchRef { name: name.into(), kind: "deb".into(), files: vec![FileRef { name: format!("{name}_1.0_all.deb"), path: format!("patches/{name}/{name}_1.0_all.deb"), sha256: digest('a'), package: name.into() }] }
}

fn host(name: &str, platform: &str, lab: Option<&str>, covered: bool) -> HostCoverage {
    HostCoverage { host: name.into(), platform: platform.into(), role: "web".into(), criticality: "high".into(), lab_platform: lab.map(Into::into), covered }
}

/// Every kind of result: pass, fail, error and skipped conditions; coverage that fails.
pub fn mixed_report() -> Report {
    let failed = Conditions {
        removal: Condition {
            status: Status::Fail,
            reason: Some("2 fingerprint differences after removal; check nginx-http failed".into()),
            commands: vec![ExecResult {
                // A flood on stderr: the first and the last part kept, the tail as hostile as the rest.
                stderr: Output { bytes: 314_572_800, truncated: true, tail: Some(format!("{HOSTILE}\n````\nend of the flood\n")), ..out("dpkg: warning: while removing openssl-fix, directory '/etc/ssl/fix' not empty so not removed\n") },
                ..exec("dpkg --purge openssl-fix", 0, &format!("Removing openssl-fix ...\n{HOSTILE}\n{HOSTILE_CELL}\n```\nnot a fence end\n"), "")
            }],
            checks: vec![check("nginx-http", false, &format!("GET / answered 502, body {HOSTILE}")), check("ssh-port", true, "guest port 22 accepted a connection")],
            differences: vec![
                Difference { kind: "file".into(), item: "/etc/ssl/fix/openssl.cnf".into(), before: None, after: Some("sha256 1111 mode 0644 root:root".into()) },
                Difference { kind: "unit".into(), item: "nginx.service".into(), before: Some("active".into()), after: Some(format!("failed {HOSTILE}")) },
            ],
            ..Condition::pass()
        },
        ..all_pass()
    };
    let broke = Conditions {
        install: Condition::with(Status::Error, "the guest agent stopped answering during install"),
        operations: Condition::with(Status::Skipped, "install did not pass"),
        removal: Condition::with(Status::Skipped, "install did not pass"),
        ..all_pass()
    };
    Report {
        schema_version: SCHEMA_VERSION,
        run_id: "20250101T000000Z-abcd".into(),
        complete: true,
        verdict: Verdict::Fail,
        lab: LabRef { name: "release-2025-01".into(), file: "labs/release.toml".into(), sha256: digest('1') },
        patchlab: Tool { version: "0.1.0".into(), commit: "0123456789ab".into() },
        hosts: vec![HostRef { uri: "qemu:///system".into(), accel: "tcg".into(), accel_reason: "KVM probe did not finish in 20 s".into(), golden_states: vec![] }],
        started_at: "2025-01-01T00:00:00Z".into(),
        finished_at: "2025-01-01T00:12:34Z".into(),
        platforms: vec![platform("debian-12", "12"), platform("debian-13", "13")],
        patches: vec![patch("nginx-fix"), patch("openssl-fix")],
        coverage: Coverage {
            status: Status::Fail,
            inventory: Some(InventoryRef { file: "fixtures/inventory.toml".into(), sha256: digest('2') }),
            threshold_percent: 50,
            covered_hosts: 2,
            total_hosts: 5,
            hosts: vec![
                host("web-1", "debian 12 x86_64", Some("debian-12"), true),
                host("web-2", "debian 12 x86_64", Some("debian-12"), true),
                host("db-1", "debian 13 x86_64", Some("debian-13"), false),
                host("legacy-1", "debian 11 x86_64", None, false),
                host(&format!("evil{HOSTILE}"), "debian 11 x86_64", None, false),
            ],
            uncovered_platforms: vec!["debian 11 x86_64".into(), "debian 13 x86_64".into()],
        },
        results: vec![
            cell("debian-12", "nginx-fix", Verdict::Pass, all_pass(), None),
            cell("debian-12", "openssl-fix", Verdict::Fail, failed, None),
            cell("debian-13", "nginx-fix", Verdict::Error, broke, Some("the guest agent stopped answering during install")),
            cell("debian-13", "openssl-fix", Verdict::Pass, all_pass(), None),
        ],
        signer: Some(patchlab::report::SignerRef { key_comment: "patchlab-dev@ci".into(), key_fingerprint: "SHA256:AAAAfixturefingerprint".into(), development: true }),
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let dir = if target.is_absolute() { target } else { root().join(target) }.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn require_lab() -> bool {
    std::env::var("PATCHLAB_REQUIRE_LAB").is_ok_and(|v| v == "1")
}

#[test]
fn html_snapshot() {
    insta::assert_snapshot!("report.html", render::html(&mixed_report()));
}

#[test]
fn markdown_snapshot() {
    insta::assert_snapshot!("report.md", render::markdown(&mixed_report()));
}

#[test]
fn junit_snapshot() {
    insta::assert_snapshot!("junit.xml", render::junit(&mixed_report()));
}

#[test]
fn report_json_snapshot_is_canonical_and_has_no_floats() {
    let r = mixed_report();
    let bytes = r.canonical_bytes();
    assert_eq!(bytes, mixed_report().canonical_bytes(), "the same data gives the same bytes");
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    fn integers_only(v: &serde_json::Value, at: &str) {
        match v {
            serde_json::Value::Number(n) => assert!(n.is_u64() || n.is_i64(), "{at} is not an integer: {n}"),
            serde_json::Value::Array(a) => a.iter().enumerate().for_each(|(i, x)| integers_only(x, &format!("{at}[{i}]"))),
            serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| integers_only(x, &format!("{at}.{k}"))),
            _ => {}
        }
    }
    integers_only(&value, "$");
    assert_eq!(value["schema_version"], SCHEMA_VERSION);
    insta::assert_snapshot!("report.json", String::from_utf8(bytes).unwrap());
}

#[test]
fn guest_text_is_escaped_never_markup() {
    let html = render::html(&mixed_report());
    assert!(!html.contains("<script"), "no script element, hostile or not");
    assert!(!html.contains(HOSTILE_CELL), "guest output closed a table cell");
    assert!(!html.contains("INJECTED</"), "guest output became markup");
    assert!(html.contains("&#60;script&#62;alert(1)&#60;/script&#62;") || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "the hostile text is shown, escaped");
    // Every tag in the page is one the template wrote.
    let allowed = ["html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "div", "dl", "dt", "dd", "code", "p", "table", "thead", "tbody", "tfoot", "tr", "th", "td", "a", "span", "ul", "li", "details", "summary", "strong", "pre", "!DOCTYPE"];
    for (i, _) in html.match_indices('<') {
        let tag: String = html[i + 1..].trim_start_matches('/').chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '!' || *c == '-').collect::<String>();
        assert!(allowed.contains(&tag.as_str()), "unexpected tag <{tag}> at byte {i}: {}", &html[i..(i + 60).min(html.len())]);
    }

    let md = render::markdown(&mixed_report());
    assert!(!md.contains(&format!("body {HOSTILE}")), "inline guest text is escaped in Markdown");
    assert!(md.contains("````text\nRemoving openssl-fix"), "a fence longer than the output's backtick run");
    assert!(md.contains("`````text\n<script>alert(1)</script>\n````\nend of the flood\n`````"), "the kept tail of a flood is fenced too:\n{md}");
    assert!(html.contains("only the first and the last part are kept") && md.contains("the middle is not kept"), "a truncation marker");
}

#[test]
fn rendering_leaves_report_json_alone() {
    let dir = tempfile::tempdir().unwrap();
    let r = mixed_report();
    let path = r.write(dir.path()).unwrap();
    let before = std::fs::read(&path).unwrap();
    let written = render::write_all(&r, dir.path()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, render::FILES);
    assert_eq!(std::fs::read_to_string(dir.path().join("report.html")).unwrap(), render::html(&r));
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn junit_parses_and_counts() {
    let xml = render::junit(&mixed_report());
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let suites: Vec<_> = doc.root_element().children().filter(|n| n.has_tag_name("testsuite")).collect();
    let names: Vec<_> = suites.iter().map(|s| s.attribute("name").unwrap()).collect();
    assert_eq!(names, ["debian-12", "debian-13", "coverage"]);
    assert_eq!(suites[0].attribute("tests"), Some("10"), "2 patches × 5 conditions");
    assert_eq!(suites[0].attribute("failures"), Some("1"));
    assert_eq!(suites[1].attribute("errors"), Some("1"));
    assert_eq!(suites[1].attribute("skipped"), Some("2"));
    let failure = doc.descendants().find(|n| n.has_tag_name("failure")).unwrap();
    assert!(failure.attribute("message").unwrap().contains("fingerprint differences"));
    assert!(failure.text().unwrap().contains("+ file /etc/ssl/fix/openssl.cnf"));
}

/// xmllint from Debian's libxml2-utils (installed by `cargo xtask setup`).
#[test]
fn junit_validates_against_the_jenkins_schema() {
    if !Path::new("/usr/bin/xmllint").exists() {
        assert!(!require_lab(), "PATCHLAB_REQUIRE_LAB=1 but xmllint is missing: run `cargo xtask setup`");
        println!("SKIPPED: xmllint is not installed (apt-get install libxml2-utils)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("junit.xml");
    std::fs::write(&file, render::junit(&mixed_report())).unwrap();
    let schema = root().join("fixtures/reports/junit-jenkins.xsd");
    let out = Command::new("/usr/bin/xmllint").arg("--noout").arg("--schema").arg(&schema).arg(&file).output().unwrap();
    assert!(out.status.success(), "junit.xml does not validate:\n{}", String::from_utf8_lossy(&out.stderr));
    // The schema is not a rubber stamp: it refuses a testsuite without its counts.
    let bad = dir.path().join("bad.xml");
    std::fs::write(&bad, "<testsuites><testsuite name=\"x\"><testcase name=\"y\"/></testsuite></testsuites>").unwrap();
    let out = Command::new("/usr/bin/xmllint").arg("--noout").arg("--schema").arg(&schema).arg(&bad).output().unwrap();
    assert!(!out.status.success(), "the schema accepted a testsuite without tests/failures/errors");
}

/// Runs a command with a deadline; returns its stdout. Chromium can hang on a broken setup.
fn run_with_deadline(cmd: &mut Command, deadline: Duration) -> (bool, String, String) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start chromium");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out, err) = (out_reader.join().unwrap(), err_reader.join().unwrap());
    (status.is_some_and(|s| s.success()), out, err)
}

fn chromium(profile: &Path) -> Command {
    let mut cmd = Command::new("/usr/bin/chromium");
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]).arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// Debian's chromium (installed by `cargo xtask setup`) loads the page, renders the verdict
/// table, and leaves a screenshot in target/test-artifacts/report.png for a person to look at.
#[test]
fn chromium_renders_the_verdict_table() {
    if !Path::new("/usr/bin/chromium").exists() {
        assert!(!require_lab(), "PATCHLAB_REQUIRE_LAB=1 but /usr/bin/chromium is missing: run `cargo xtask setup`");
        println!("SKIPPED: /usr/bin/chromium is not installed (apt-get install chromium)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = mixed_report();
    r.write(dir.path()).unwrap();
    render::write_all(&r, dir.path()).unwrap();
    let page = format!("file://{}", dir.path().join("report.html").display());

    let profile = tempfile::tempdir().unwrap();
    let (ok, dom, err) = run_with_deadline(chromium(profile.path()).arg("--dump-dom").arg(&page), Duration::from_secs(120));
    assert!(ok, "chromium --dump-dom failed:\n{err}");
    assert!(dom.contains("id=\"verdict-table\""), "no verdict table in the DOM:\n{dom}");
    let doc_start = dom.find("id=\"verdict-table\"").unwrap();
    let table = &dom[doc_start..dom[doc_start..].find("</tbody>").map(|e| doc_start + e).unwrap()];
    for want in ["debian-12", "debian-13", "nginx-fix", "openssl-fix", "removal"] {
        assert!(table.contains(want), "verdict table lacks {want}");
    }
    assert_eq!(table.matches("<td class=\"v-").count(), 4, "one cell per platform × patch");
    assert!(!dom.contains("<script"), "the hostile output became a script element");

    let shot = artifacts().join("report.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    let (ok, _, err) = run_with_deadline(chromium(profile.path()).arg(format!("--screenshot={}", shot.display())).arg("--window-size=1280,2000").arg(&page), Duration::from_secs(120));
    assert!(ok, "chromium --screenshot failed:\n{err}");
    let png = std::fs::read(&shot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    println!("screenshot: {}", shot.display());
}
