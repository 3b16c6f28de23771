//! The baseline fingerprint, captured once per golden state and reused by every clone of it.
//!
//! Every clone of a golden state starts from the same disk and the same memory (restored bit for
//! bit from files whose digests are checked at every run start), and a cell takes its baseline
//! right after the same two steps (restore, set the clock). So the baseline of one clone is the
//! baseline of all of them: the first cell of a golden state captures it as before and keeps it
//! beside the golden state (`<golden>/baseline-<key>.json`); later cells, in this run or a later
//! one, load it instead of capturing again, which saves a full capture (2-4 s under TCG) per cell.
//!
//! A kept baseline is used only for the golden state it was taken on (its disk and memory
//! digests are in the file and must equal the golden record's) and for the exact capture command
//! (the script and the watched paths with their modes: `key` hashes them, and the file repeats
//! the digest). Anything else, or a file that does not parse, and the baseline is captured again.
//! The baseline checks run on the clone before the fingerprint is taken, and a `command` check
//! may change the guest (`apt-get update`, a file it writes): so the kept baseline is also keyed
//! by the lab's checks (`context`, a digest of their definitions, in lab order), and a lab with
//! other checks captures and keeps its own.
//! What it trusts beyond a per-cell capture: that the cache directory, like the golden states in
//! it, is written only by patchlab (it is root's, and `golden.json` is trusted the same way).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Fingerprint, FingerprintSpec, capture, request};
use crate::guest::{Agent, AgentError};
use crate::hypervisor::golden::GoldenRef;

/// Bumped when the kept file's meaning changes.
const FORMAT: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kept {
    format: u32,
    golden_disk_sha256: String,
    golden_state_sha256: String,
    /// sha256 of the capture command: program and every argument (script, modes, paths).
    command_sha256: String,
    captured_at: String,
    fingerprint: Fingerprint,
}

/// Where the baseline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Captured on this clone (no golden state to keep it beside, or none kept yet).
    Captured,
    /// Loaded: captured on an earlier clone of the same golden state with the same command.
    Kept,
}

/// sha256 of the capture command and of `context`, what ran on the clone before it.
fn command_sha256(spec: &FingerprintSpec, context: &str) -> String {
    let req = request(spec);
    let mut h = Sha256::new();
    for part in std::iter::once(&req.program).chain(&req.args).chain(std::iter::once(&context.to_string())) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The file a baseline for `spec` is kept in beside `golden`.
pub fn path(golden: &GoldenRef, spec: &FingerprintSpec, context: &str) -> PathBuf {
    golden.dir.join(format!("baseline-{}.json", &command_sha256(spec, context)[..16]))
}

/// The kept baseline for `spec` on `golden`, if there is one that belongs to them.
pub fn load(golden: &GoldenRef, spec: &FingerprintSpec, context: &str) -> Option<Fingerprint> {
    let text = std::fs::read(path(golden, spec, context)).ok()?;
    let kept: Kept = serde_json::from_slice(&text).ok()?;
    let belongs = kept.format == FORMAT && kept.golden_disk_sha256 == golden.disk_sha256 && kept.golden_state_sha256 == golden.state_sha256 && kept.command_sha256 == command_sha256(spec, context);
    belongs.then_some(kept.fingerprint)
}

/// Keeps `fingerprint` as the baseline for `spec` on `golden` (written whole, then renamed).
pub fn store(golden: &GoldenRef, spec: &FingerprintSpec, context: &str, fingerprint: &Fingerprint) -> std::io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let kept = Kept {
        format: FORMAT,
        golden_disk_sha256: golden.disk_sha256.clone(),
        golden_state_sha256: golden.state_sha256.clone(),
        command_sha256: command_sha256(spec, context),
        captured_at: jiff::Timestamp::now().to_string(),
        fingerprint: fingerprint.clone(),
    };
    let to = path(golden, spec, context);
    // Cells of one golden state may store at once: each writes its own temporary file.
    let tmp = to.with_file_name(format!(".{}.{}.{}.json.tmp", to.file_stem().unwrap_or_default().to_string_lossy(), std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let written = std::fs::write(&tmp, serde_json::to_vec(&kept).expect("a fingerprint serializes")).and_then(|()| std::fs::rename(&tmp, &to));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The baseline of a clone restored from `golden` just now (clock set, then only what `context`
/// names has run): the kept one when there is one, else captured here and kept for the next clone.
pub fn baseline(agent: &Agent<'_>, spec: &FingerprintSpec, golden: Option<&GoldenRef>, context: &str) -> Result<(Fingerprint, Origin), AgentError> {
    if let Some(kept) = golden.and_then(|g| load(g, spec, context)) {
        return Ok((kept, Origin::Kept));
    }
    let fingerprint = capture(agent, spec)?;
    if let Some(golden) = golden {
        if let Err(e) = store(golden, spec, context, &fingerprint) {
            tracing::warn!(file = %path(golden, spec, context).display(), "cannot keep the baseline fingerprint for the next clones: {e}");
        }
    }
    Ok((fingerprint, Origin::Captured))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::guest::fake::FakeGuest;

    fn golden(dir: &Path) -> GoldenRef {
        GoldenRef { dir: dir.to_path_buf(), disk_sha256: "d".repeat(64), state_sha256: "s".repeat(64) }
    }

    fn guest() -> FakeGuest {
        FakeGuest::new(|program, _| (program == "/bin/sh").then(|| (0, super::super::collect::empty_output(), vec![])))
    }

    #[test]
    fn the_first_clone_captures_and_keeps_later_ones_load() {
        let dir = tempfile::tempdir().unwrap();
        let g = golden(dir.path());
        let spec = FingerprintSpec::with_defaults(&[], &[]).unwrap();
        let first = guest();
        let (fp, origin) = baseline(&Agent::new(&first, Default::default()), &spec, Some(&g), "checks").unwrap();
        assert_eq!((origin, first.commands().len()), (Origin::Captured, 1));
        assert!(path(&g, &spec, "checks").exists());
        let second = guest();
        let (kept, origin) = baseline(&Agent::new(&second, Default::default()), &spec, Some(&g), "checks").unwrap();
        assert_eq!((origin, second.commands().len()), (Origin::Kept, 0), "no command in the guest");
        assert_eq!(kept, fp);
        // No temporary file left beside it.
        let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Without a golden state to keep it beside, every clone captures.
        let third = guest();
        assert_eq!(baseline(&Agent::new(&third, Default::default()), &spec, None, "checks").unwrap().1, Origin::Captured);
    }

    #[test]
    fn a_kept_baseline_is_used_only_for_its_golden_state_and_command() {
        let dir = tempfile::tempdir().unwrap();
        let g = golden(dir.path());
        let spec = FingerprintSpec::with_defaults(&[], &[]).unwrap();
        let fp = Fingerprint { entries: [(super::super::collect::key("file", "/etc/x"), "file".to_string())].into(), capture_ms: 5 };
        store(&g, &spec, "checks", &fp).unwrap();
        assert_eq!(load(&g, &spec, "checks"), Some(fp.clone()));
        // Other checks ran before it (a lab whose command check writes to the guest): not used.
        assert_ne!(path(&g, &spec, "other checks"), path(&g, &spec, "checks"));
        assert_eq!(load(&g, &spec, "other checks"), None);
        // Another golden state in the same directory (rebuilt, or a changed file): not used.
        for other in [GoldenRef { disk_sha256: "e".repeat(64), ..g.clone() }, GoldenRef { state_sha256: "t".repeat(64), ..g.clone() }] {
            assert_eq!(load(&other, &spec, "checks"), None);
        }
        // Another watch list: another file, and a file renamed to look like it is not used.
        let more = FingerprintSpec::with_defaults(&["/var/www".to_string()], &[]).unwrap();
        assert_ne!(path(&g, &more, "checks"), path(&g, &spec, "checks"));
        assert_eq!(load(&g, &more, "checks"), None);
        std::fs::copy(path(&g, &spec, "checks"), path(&g, &more, "checks")).unwrap();
        assert_eq!(load(&g, &more, "checks"), None, "the file names its command");
        // The allowlist does not change the capture: same file.
        let allowing = FingerprintSpec::with_defaults(&[], &["unit:*.timer".to_string()]).unwrap();
        assert_eq!(load(&g, &allowing, "checks"), Some(fp.clone()));
        // A damaged file is captured again, not trusted.
        std::fs::write(path(&g, &spec, "checks"), b"{\"format\": 1").unwrap();
        assert_eq!(load(&g, &spec, "checks"), None);
    }
}
