//! Cache files that no live process owns: what `patchlab clean` removes besides dead runs' domains
//! and clone directories ([`super::libvirt::LibvirtHost::reap`]).
//!
//! Always removed:
//! - `runs/<id>.lock` of runs that are no longer alive (a run killed with SIGKILL leaves it);
//! - `golden/<dir>/` without `golden.json` (an interrupted preparation) whose `<dir>.lock` is free,
//!   and stray `golden.json.tmp` files;
//! - `images/.tmp-<key>-*` (a crashed image build) whose `<key>.lock` is free.
//!
//! With `--cache`, also golden states and images not used for a given time, but only while no run
//! is alive (a live run may be about to restore any golden), each under its own lock, goldens
//! first, and an image only when no remaining golden was booted from it. "Used" is the newest of
//! `last-used` (touched by every run that uses the directory) and `golden.json`/`image.json`.
//!
//! Lock files of goldens and images are never removed: another process may be opening one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::Dirs;
use super::golden::{Golden, GoldenOrigin};
use super::runlock;

/// Touched in a golden or image directory each time a run uses it.
pub const LAST_USED: &str = "last-used";

/// Records that a run used `dir` now (best effort: a read-only cache only loses `--cache` precision).
pub fn mark_used(dir: &Path) {
    let path = dir.join(LAST_USED);
    let _ = File::create(&path).and_then(|f| f.set_modified(SystemTime::now()));
}

#[derive(Debug, Clone, Default)]
pub struct CleanOptions {
    /// Remove goldens and images not used for this long (`--cache --older-than`).
    pub unused_for: Option<Duration>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleaned {
    pub removed: Vec<String>,
    /// What was left on purpose, and why (a held lock, a live run).
    pub kept: Vec<String>,
}

/// An exclusive lock on `path` if nobody holds it (a missing lock file is free: nothing holds it).
enum Lock {
    Free(Option<File>),
    Held,
}

fn try_lock(path: &Path) -> Lock {
    match File::open(path) {
        Err(_) => Lock::Free(None),
        Ok(f) => match f.try_lock() {
            Ok(()) => Lock::Free(Some(f)),
            Err(_) => Lock::Held,
        },
    }
}

fn remove_dir(path: &Path, cleaned: &mut Cleaned) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => cleaned.removed.push(path.display().to_string()),
        Err(e) => cleaned.kept.push(format!("{}: {e}", path.display())),
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

fn name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn last_used(dir: &Path, record: &str) -> SystemTime {
    [LAST_USED, record].iter().filter_map(|f| std::fs::metadata(dir.join(f)).and_then(|m| m.modified()).ok()).max().unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Removes what no live process owns; see the module documentation.
pub fn clean_files(dirs: &Dirs, opts: &CleanOptions) -> Cleaned {
    let mut cleaned = Cleaned::default();
    // Run locks of dead runs.
    let mut alive = Vec::new();
    for path in entries(&dirs.runs()) {
        let Some(id) = name(&path).strip_suffix(".lock").map(str::to_string) else { continue };
        if runlock::is_alive(dirs, &id) {
            alive.push(id);
        } else if std::fs::remove_file(&path).is_ok() {
            cleaned.removed.push(path.display().to_string());
        }
    }
    // Interrupted golden preparations.
    for path in entries(&dirs.golden()) {
        if !path.is_dir() {
            continue;
        }
        let tmp = path.join("golden.json.tmp");
        if path.join("golden.json").exists() {
            if tmp.exists() && std::fs::remove_file(&tmp).is_ok() {
                cleaned.removed.push(tmp.display().to_string());
            }
            continue;
        }
        match try_lock(&path.with_extension("lock")) {
            Lock::Held => cleaned.kept.push(format!("{}: being prepared (its lock is held)", path.display())),
            Lock::Free(_guard) => remove_dir(&path, &mut cleaned),
        }
    }
    // Crashed image builds: `.tmp-<key>-<suffix>`, locked by `<key>.lock`.
    for path in entries(&dirs.images()) {
        let n = name(&path);
        let Some(rest) = n.strip_prefix(".tmp-") else { continue };
        let key = rest.rsplit_once('-').map(|(k, _)| k).unwrap_or(rest);
        match try_lock(&dirs.images().join(format!("{key}.lock"))) {
            Lock::Held => cleaned.kept.push(format!("{}: being built (its lock is held)", path.display())),
            Lock::Free(_guard) => remove_dir(&path, &mut cleaned),
        }
    }
    if let Some(unused_for) = opts.unused_for {
        if alive.is_empty() {
            clean_unused(dirs, unused_for, &mut cleaned);
        } else {
            cleaned.kept.push(format!("golden states and images: runs are alive ({}), so none is removed for being unused", alive.join(", ")));
        }
    }
    cleaned
}

fn clean_unused(dirs: &Dirs, unused_for: Duration, cleaned: &mut Cleaned) {
    let cutoff = SystemTime::now().checked_sub(unused_for).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut remaining_recipe_digests = Vec::new();
    for path in entries(&dirs.golden()) {
        let Ok(Some(golden)) = Golden::load(&path) else { continue };
        let digest = match &golden.record.origin {
            GoldenOrigin::Image { recipe_digest, .. } => Some(recipe_digest.clone()),
            GoldenOrigin::DomainSnapshot { .. } => None,
        };
        if last_used(&path, "golden.json") >= cutoff {
            remaining_recipe_digests.extend(digest);
            continue;
        }
        match try_lock(&path.with_extension("lock")) {
            Lock::Held => {
                remaining_recipe_digests.extend(digest);
                cleaned.kept.push(format!("{}: its lock is held", path.display()));
            }
            Lock::Free(_guard) => {
                remove_dir(&path, cleaned);
                if path.exists() {
                    remaining_recipe_digests.extend(digest);
                }
            }
        }
    }
    for path in entries(&dirs.images()) {
        let n = name(&path);
        if n.starts_with('.') || !path.is_dir() || !path.join(crate::image::IMAGE_JSON).exists() {
            continue;
        }
        if last_used(&path, crate::image::IMAGE_JSON) >= cutoff {
            continue;
        }
        // `<name>-<first 16 hex of the recipe digest>`: a golden booted from it still needs it.
        let short = n.rsplit_once('-').map(|(_, d)| d).unwrap_or_default();
        if remaining_recipe_digests.iter().any(|d| !short.is_empty() && d.starts_with(short)) {
            cleaned.kept.push(format!("{}: a golden state kept in the cache was booted from it", path.display()));
            continue;
        }
        match try_lock(&dirs.images().join(format!("{n}.lock"))) {
            Lock::Held => cleaned.kept.push(format!("{}: its lock is held", path.display())),
            Lock::Free(_guard) => remove_dir(&path, cleaned),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path, days: u64) {
        let f = File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(days * 86_400)).unwrap();
    }

    fn golden_record(platform: &str, recipe_digest: &str, dir: &Path) -> String {
        serde_json::json!({
            "format": super::super::golden::GOLDEN_FORMAT, "platform": platform,
            "origin": {"kind": "image", "recipe": platform, "recipe_digest": recipe_digest, "image_disk_sha256": "00"},
            "accel": "tcg", "memory_mib": 512, "domain_name": "patchlab-golden-x", "domain_uuid": "u",
            "disk": dir.join("disk.qcow2"), "console": dir.join("console.log"),
            "disk_sha256": "00", "state_sha256": "00", "boot_ms": 1, "created_at": "2025-01-01T00:00:00Z"
        })
        .to_string()
    }

    /// A golden directory with a record and a state file that has a valid save-image header.
    fn golden(dirs: &Dirs, name: &str, recipe_digest: &str, days_unused: u64) -> PathBuf {
        let dir = dirs.golden().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("golden.json"), golden_record(name, recipe_digest, &dir)).unwrap();
        std::fs::write(dir.join("state.save"), super::super::saveimage::encode_header(&super::super::saveimage::SaveHeader { version: 2, was_running: 1, format: 0, xml: String::new(), cookie: None, stream_offset: 0 }, "<domain/>")).unwrap();
        age(&dir.join("golden.json"), days_unused);
        dir
    }

    fn image(dirs: &Dirs, name: &str, days_unused: u64) -> PathBuf {
        let dir = dirs.images().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(crate::image::IMAGE_JSON), "{}").unwrap();
        age(&dir.join(crate::image::IMAGE_JSON), days_unused);
        dir
    }

    #[test]
    fn leftovers_go_and_anything_locked_stays() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs::new(tmp.path().into());
        for d in [dirs.runs(), dirs.golden(), dirs.images()] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(dirs.runs().join("dead-run.lock"), "").unwrap();
        let live = runlock::RunLock::acquire(&dirs, "live-run").unwrap();
        // Interrupted preparations: one abandoned, one in progress (its lock held).
        std::fs::create_dir_all(dirs.golden().join("p-abandoned")).unwrap();
        std::fs::write(dirs.golden().join("p-abandoned/disk.qcow2"), "x").unwrap();
        std::fs::create_dir_all(dirs.golden().join("p-busy")).unwrap();
        let held = File::create(dirs.golden().join("p-busy.lock")).unwrap();
        held.lock().unwrap();
        std::fs::create_dir_all(dirs.images().join(".tmp-debian-12-0123456789abcdef-1")).unwrap();
        std::fs::create_dir_all(dirs.images().join(".tmp-debian-13-0123456789abcdef-1")).unwrap();
        let building = File::create(dirs.images().join("debian-13-0123456789abcdef.lock")).unwrap();
        building.lock().unwrap();
        let old = golden(&dirs, "old-1111", "aaaa", 90);

        let cleaned = clean_files(&dirs, &CleanOptions { unused_for: Some(Duration::from_secs(30 * 86_400)) });
        assert!(!dirs.runs().join("dead-run.lock").exists());
        assert!(dirs.runs().join("live-run.lock").exists());
        assert!(!dirs.golden().join("p-abandoned").exists());
        assert!(dirs.golden().join("p-busy").exists());
        assert!(dirs.golden().join("p-busy.lock").exists(), "lock files stay");
        assert!(!dirs.images().join(".tmp-debian-12-0123456789abcdef-1").exists());
        assert!(dirs.images().join(".tmp-debian-13-0123456789abcdef-1").exists());
        assert!(old.exists(), "nothing is removed for being unused while a run is alive");
        assert!(cleaned.kept.iter().any(|k| k.contains("runs are alive")), "{cleaned:?}");
        assert_eq!(cleaned.removed.len(), 3, "{cleaned:?}");
        drop((live, held, building));
    }

    #[test]
    fn with_cache_unused_goldens_go_and_images_only_without_goldens() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs::new(tmp.path().into());
        let old_golden = golden(&dirs, "debian-11-aaaa", "1111111111111111ffff", 90);
        let recent_golden = golden(&dirs, "debian-12-bbbb", "2222222222222222ffff", 90);
        mark_used(&recent_golden);
        let old_image = image(&dirs, "debian-11-1111111111111111", 90);
        let needed_image = image(&dirs, "debian-12-2222222222222222", 90);
        let recent_image = image(&dirs, "debian-13-3333333333333333", 1);

        let cleaned = clean_files(&dirs, &CleanOptions { unused_for: Some(Duration::from_secs(30 * 86_400)) });
        assert!(!old_golden.exists(), "{cleaned:?}");
        assert!(recent_golden.exists());
        assert!(!old_image.exists(), "its only golden went first");
        assert!(needed_image.exists(), "a kept golden was booted from it");
        assert!(recent_image.exists());

        // Without --cache nothing complete is touched.
        let again = golden(&dirs, "debian-11-cccc", "1111111111111111ffff", 90);
        clean_files(&dirs, &CleanOptions::default());
        assert!(again.exists());
    }
}
