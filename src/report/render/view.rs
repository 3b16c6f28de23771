//! What the templates show: the report flattened into strings, with every inline string already
//! escaped for the target format (Markdown), or left raw for askama's HTML escaping. Code-block
//! contents (command output, the fingerprint diff) stay raw in both: HTML escapes them, Markdown
//! fences them with [`fence`].

use crate::checks::CheckResult;
use crate::guest::Output;
use crate::report::{CellResult, Condition, Report, Status, Verdict};

use super::status_name;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// HTML: askama escapes every value.
    None,
    Markdown,
}

impl Escape {
    fn s(self, text: &str) -> String {
        match self {
            Escape::None => text.to_string(),
            Escape::Markdown => md_inline(text),
        }
    }
}

/// Backslash-escapes Markdown punctuation and folds newlines, so untrusted text stays one inline
/// run of literal characters (also inside a table cell).
pub fn md_inline(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '{' | '}' | '[' | ']' | '(' | ')' | '<' | '>' | '#' | '+' | '!' | '|' | '~' | '&' => {
                out.push('\\');
                out.push(c);
            }
            '\r' | '\n' => out.push(' '),
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A backtick fence longer than any backtick run in `text` (at least three), so the text cannot
/// close its code block.
pub fn fence(text: &str) -> String {
    let (mut longest, mut run) = (0, 0);
    for c in text.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    "`".repeat((longest + 1).max(3))
}

/// A relative link target, percent-encoded; `None` for anything that is not a plain relative path
/// (absolute, a scheme, `..`), which is then shown as text only.
fn href(path: &str) -> Option<String> {
    let plain = !path.is_empty() && !path.starts_with('/') && !path.contains(':') && !path.contains('\\') && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if !plain {
        return None;
    }
    let mut out = String::new();
    for b in path.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => out.push(b as char),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    Some(out)
}

fn verdict_name(v: Verdict) -> &'static str {
    crate::report::gate::verdict_name(v)
}

/// Digits grouped by thousands: `65536` → `65,536`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub struct View {
    pub verdict: &'static str,
    pub headline: String,
    pub complete: bool,
    pub run_id: String,
    pub lab_name: String,
    pub lab_file: String,
    pub lab_sha256: String,
    pub started_at: String,
    pub finished_at: String,
    pub version: String,
    pub commit: String,
    pub schema_version: u32,
    pub counts: String,
    pub hosts: Vec<HostView>,
    /// Who signed: the key's comment and fingerprint, and a warning for development keys; "unsigned" otherwise.
    pub signer: String,
    pub platforms: Vec<PlatformView>,
    pub patches: Vec<PatchView>,
    pub coverage: CoverageView,
    pub patch_names: Vec<String>,
    pub grid: Vec<GridRow>,
    pub cells: Vec<CellView>,
}

pub struct HostView {
    pub uri: String,
    pub accel: String,
    pub reason: String,
}

pub struct PlatformView {
    pub name: String,
    pub origin: String,
    pub simulates: String,
    pub golden_disk: String,
    pub golden_state: String,
    pub image_disk: String,
    pub recipe: String,
}

pub struct PatchView {
    pub name: String,
    pub kind: String,
    pub files: Vec<FileView>,
}

pub struct FileView {
    pub name: String,
    pub package: String,
    pub path: String,
    pub href: Option<String>,
    pub sha256: String,
}

pub struct CoverageView {
    pub status: &'static str,
    pub summary: String,
    pub inventory_file: Option<String>,
    pub inventory_sha256: String,
    pub hosts: Vec<HostCoverageView>,
    pub uncovered_platforms: Vec<String>,
}

pub struct HostCoverageView {
    pub host: String,
    pub platform: String,
    pub role: String,
    pub criticality: String,
    pub lab_platform: String,
    pub covered: bool,
}

pub struct GridRow {
    pub platform: String,
    pub cells: Vec<GridCell>,
}

pub struct GridCell {
    /// False when the run has no result for this platform × patch (it stopped first).
    pub present: bool,
    pub verdict: &'static str,
    pub anchor: String,
    pub badges: Vec<Badge>,
}

pub struct Badge {
    pub name: &'static str,
    pub status: &'static str,
}

pub struct CellView {
    pub anchor: String,
    pub platform: String,
    pub patch: String,
    pub verdict: &'static str,
    pub host: String,
    pub clone: String,
    pub error: Option<String>,
    pub duration_ms: String,
    pub phases: Vec<PhaseView>,
    pub evidence: Vec<FileView>,
    pub conditions: Vec<ConditionView>,
}

pub struct PhaseView {
    pub name: String,
    pub ms: String,
}

pub struct ConditionView {
    pub name: &'static str,
    pub note: &'static str,
    pub status: &'static str,
    /// Shown expanded: anything but a pass.
    pub open: bool,
    pub reason: Option<String>,
    pub checks: Vec<CheckView>,
    pub commands: Vec<CommandView>,
    pub delivered: Vec<DeliveredView>,
    pub diff: Vec<DiffLine>,
    /// The diff as one text (Markdown's ```diff block) and its fence.
    pub diff_text: String,
    pub diff_fence: String,
    pub allowed_differences: u64,
    pub burn_in: Vec<RoundView>,
}

pub struct CheckView {
    pub name: String,
    pub status: &'static str,
    pub attempts: u32,
    pub detail: String,
    pub duration_ms: String,
}

pub struct CommandView {
    pub command: String,
    pub exit: String,
    pub duration_ms: String,
    pub streams: Vec<StreamView>,
}

pub struct StreamView {
    pub name: &'static str,
    pub text: String,
    pub fence: String,
    pub empty: bool,
    pub bytes: String,
    pub sha256: String,
    pub truncated: bool,
    /// When truncated: the last part kept (shown after a "not kept" marker); empty otherwise.
    pub tail: String,
    pub tail_fence: String,
    pub has_tail: bool,
}

pub struct DeliveredView {
    pub file: String,
    pub host_sha256: String,
    pub guest_sha256: String,
    /// The digest the lab file pins the patch file to, if it does.
    pub pinned_sha256: String,
    pub matches: bool,
}

pub struct DiffLine {
    pub class: &'static str,
    pub text: String,
}

pub struct RoundView {
    pub at_ms: String,
    pub status: &'static str,
    pub checks: Vec<CheckView>,
}

impl View {
    pub fn new(r: &Report, e: Escape) -> View {
        let verdict = verdict_name(r.verdict);
        let headline = match (r.verdict, r.complete) {
            (Verdict::Pass, _) => "PASS: every condition passed on every platform".to_string(),
            (Verdict::Fail, true) => "FAIL: at least one patch failed a condition".to_string(),
            (Verdict::Fail, false) => "FAIL: at least one patch failed a condition (and the run is incomplete)".to_string(),
            (Verdict::Error, true) => "ERROR: the lab broke; this says nothing about the patch".to_string(),
            (Verdict::Error, false) => "ERROR: the run is incomplete; this says nothing about the patch".to_string(),
        };
        let count = |v: Verdict| r.results.iter().filter(|c| c.verdict == v).count();
        let expected = r.platforms.len() * r.patches.len();
        let counts = format!("{} cells: {} pass, {} fail, {} error, {} without a result.", expected.max(r.results.len()), count(Verdict::Pass), count(Verdict::Fail), count(Verdict::Error), expected.saturating_sub(r.results.len()));
        let cells: Vec<CellView> = r.results.iter().enumerate().map(|(i, c)| cell_view(c, i, e)).collect();
        let grid = r
            .platforms
            .iter()
            .map(|p| GridRow {
                platform: e.s(&p.name),
                cells: r
                    .patches
                    .iter()
                    .map(|patch| match r.results.iter().position(|c| c.platform == p.name && c.patch == patch.name) {
                        Some(i) => {
                            let c = &r.results[i];
                            GridCell { present: true, verdict: verdict_name(c.verdict), anchor: anchor(i), badges: conditions(c).into_iter().map(|(name, _, cond)| Badge { name, status: status_name(cond.status) }).collect() }
                        }
                        None => GridCell { present: false, verdict: "none", anchor: String::new(), badges: vec![] },
                    })
                    .collect(),
            })
            .collect();
        let c = &r.coverage;
        let percent = if c.total_hosts > 0 { format!("{}%", u64::from(c.covered_hosts) * 100 / u64::from(c.total_hosts)) } else { "n/a".into() };
        let summary = match &c.inventory {
            None => "no inventory named: coverage not evaluated".to_string(),
            Some(_) => format!("{} of {} inventory hosts covered ({percent}); must be more than {}%", c.covered_hosts, c.total_hosts, c.threshold_percent),
        };
        View {
            verdict,
            headline,
            complete: r.complete,
            run_id: e.s(&r.run_id),
            lab_name: e.s(&r.lab.name),
            lab_file: e.s(&r.lab.file),
            lab_sha256: e.s(&r.lab.sha256),
            started_at: e.s(&r.started_at),
            finished_at: e.s(&r.finished_at),
            version: e.s(&r.patchlab.version),
            commit: e.s(&r.patchlab.commit),
            schema_version: r.schema_version,
            counts,
            hosts: r.hosts.iter().map(|h| HostView { uri: e.s(&h.uri), accel: e.s(&h.accel), reason: e.s(&h.accel_reason) }).collect(),
            signer: match &r.signer {
                None => "unsigned".into(),
                Some(s) if s.development => e.s(&format!("{} ({}), a DEVELOPMENT key: not for approving a release", s.key_comment, s.key_fingerprint)),
                Some(s) => e.s(&format!("{} ({})", s.key_comment, s.key_fingerprint)),
            },
            platforms: r
                .platforms
                .iter()
                .map(|p| {
                    let simulates = [&p.os, &p.version, &p.arch].iter().filter_map(|x| x.as_deref()).collect::<Vec<_>>().join(" ");
                    PlatformView {
                        name: e.s(&p.name),
                        origin: e.s(&p.origin),
                        simulates: e.s(if simulates.is_empty() { "-" } else { &simulates }),
                        golden_disk: e.s(&p.golden_disk_sha256),
                        golden_state: e.s(&p.golden_state_sha256),
                        image_disk: e.s(p.image_disk_sha256.as_deref().unwrap_or("-")),
                        recipe: e.s(p.image_recipe_digest.as_deref().unwrap_or("-")),
                    }
                })
                .collect(),
            patches: r.patches.iter().map(|p| PatchView { name: e.s(&p.name), kind: e.s(&p.kind), files: p.files.iter().map(|f| FileView { name: e.s(&f.name), package: e.s(&f.package), path: e.s(&f.path), href: href(&f.path), sha256: e.s(&f.sha256) }).collect() }).collect(),
            coverage: CoverageView {
                status: status_name(c.status),
                summary,
                inventory_file: c.inventory.as_ref().map(|i| e.s(&i.file)),
                inventory_sha256: c.inventory.as_ref().map(|i| e.s(&i.sha256)).unwrap_or_default(),
                hosts: c.hosts.iter().map(|h| HostCoverageView { host: e.s(&h.host), platform: e.s(&h.platform), role: e.s(&h.role), criticality: e.s(&h.criticality), lab_platform: e.s(h.lab_platform.as_deref().unwrap_or("none")), covered: h.covered }).collect(),
                uncovered_platforms: c.uncovered_platforms.iter().map(|p| e.s(p)).collect(),
            },
            patch_names: r.patches.iter().map(|p| e.s(&p.name)).collect(),
            grid,
            cells,
        }
    }
}

fn anchor(index: usize) -> String {
    format!("cell-{}", index + 1)
}

/// The conditions of a cell in the order they run, with what each one means to an auditor.
fn conditions(c: &CellResult) -> [(&'static str, &'static str, &Condition); 5] {
    let k = &c.conditions;
    [
        ("baseline", "the lab's checks on the untouched clone: the evidence operations compares against", &k.baseline),
        ("delivery", "the patch files pushed into the guest, sha256 checked inside it", &k.delivery),
        ("install", "the patch installed with its kind's method, under a deadline", &k.install),
        ("operations", "every check that passed at baseline passes again with the patch installed", &k.operations),
        ("removal", "the patch removed, the checks pass, and the fingerprint matches the baseline", &k.removal),
    ]
}

fn check_view(c: &CheckResult, e: Escape) -> CheckView {
    CheckView { name: e.s(&c.name), status: if c.passed { "pass" } else { "fail" }, attempts: c.attempts, detail: e.s(&c.detail), duration_ms: thousands(c.duration_ms) }
}

fn stream(name: &'static str, o: &Output) -> StreamView {
    let tail = o.tail.as_deref().unwrap_or_default();
    StreamView {
        name,
        text: o.text.strip_suffix('\n').unwrap_or(&o.text).to_string(),
        fence: fence(&o.text),
        empty: o.text.is_empty(),
        bytes: thousands(o.bytes),
        sha256: o.sha256.clone(),
        truncated: o.truncated,
        tail: tail.strip_suffix('\n').unwrap_or(tail).to_string(),
        tail_fence: fence(tail),
        has_tail: !tail.is_empty(),
    }
}

fn one_line(s: &str) -> String {
    s.replace('\r', "\\r").replace('\n', "\\n")
}

fn cell_view(c: &CellResult, index: usize, e: Escape) -> CellView {
    CellView {
        anchor: anchor(index),
        platform: e.s(&c.platform),
        patch: e.s(&c.patch),
        verdict: verdict_name(c.verdict),
        host: e.s(&c.host),
        clone: e.s(&c.clone),
        error: c.error.as_ref().map(|x| e.s(x)),
        duration_ms: thousands(c.duration_ms),
        phases: c.phases.iter().map(|p| PhaseView { name: e.s(&p.name), ms: thousands(p.ms) }).collect(),
        evidence: c.evidence.iter().map(|f| FileView { name: e.s(&f.path), package: String::new(), path: e.s(&f.path), href: href(&f.path), sha256: format!("{} ({} bytes)", e.s(&f.sha256), thousands(f.bytes)) }).collect(),
        conditions: conditions(c)
            .into_iter()
            .map(|(name, note, k)| {
                let diff: Vec<DiffLine> = k
                    .differences
                    .iter()
                    .flat_map(|d| {
                        let what = format!("{} {}", d.kind, d.item);
                        let mut lines = Vec::new();
                        if let Some(b) = &d.before {
                            lines.push(DiffLine { class: "del", text: one_line(&format!("- {what}: {b}")) });
                        }
                        if let Some(a) = &d.after {
                            lines.push(DiffLine { class: "add", text: one_line(&format!("+ {what}: {a}")) });
                        }
                        if lines.is_empty() {
                            lines.push(DiffLine { class: "ctx", text: one_line(&format!("  {what}")) });
                        }
                        lines
                    })
                    .collect();
                let diff_text = diff.iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n");
                ConditionView {
                    name,
                    note,
                    status: status_name(k.status),
                    open: k.status != Status::Pass,
                    reason: k.reason.as_ref().map(|x| e.s(x)),
                    checks: k.checks.iter().map(|x| check_view(x, e)).collect(),
                    commands: k
                        .commands
                        .iter()
                        .map(|x| CommandView {
                            command: e.s(&x.command),
                            exit: match (x.exit_code, x.signal) {
                                (Some(code), _) => format!("exit {code}"),
                                (None, Some(sig)) => format!("signal {sig}"),
                                (None, None) => "no exit status (deadline)".into(),
                            },
                            duration_ms: thousands(x.duration_ms),
                            streams: vec![stream("stdout", &x.stdout), stream("stderr", &x.stderr)],
                        })
                        .collect(),
                    delivered: k.delivered.iter().map(|d| DeliveredView {
                            file: e.s(&d.file),
                            host_sha256: e.s(&d.host_sha256),
                            guest_sha256: e.s(&d.guest_sha256),
                            pinned_sha256: e.s(d.pinned_sha256.as_deref().unwrap_or("-")),
                            matches: d.host_sha256 == d.guest_sha256 && d.pinned_sha256.as_ref().is_none_or(|p| p.eq_ignore_ascii_case(&d.host_sha256)),
                        }).collect(),
                    diff_fence: fence(&diff_text),
                    diff_text,
                    diff,
                    allowed_differences: k.allowed_differences,
                    burn_in: k.burn_in.iter().map(|round| RoundView { at_ms: thousands(round.at_ms), status: if round.checks.iter().all(|c| c.passed) { "pass" } else { "fail" }, checks: round.checks.iter().map(|x| check_view(x, e)).collect() }).collect(),
                }
            })
            .collect(),
    }
}
