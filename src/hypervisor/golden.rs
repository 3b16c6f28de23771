//! Golden states: a platform booted once and saved running, from which every clone is restored.
//!
//! Layout: `golden/<platform>-<key>/{disk.qcow2, state.save, console.log, golden.json}`. `golden.json`
//! is written last and atomically, so a directory without it is an interrupted preparation and is
//! wiped before the next attempt. The disk and the state are made read-only once saved; their
//! digests are recorded and are what a report names.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Accel, HypervisorError, saveimage};

/// Bumped when the way golden states are made changes, so old ones are not reused.
/// 4: the warm-up also runs the fingerprint's queries (see [`WARM_UP`]).
pub const GOLDEN_FORMAT: u32 = 4;

/// Run in the guest just before it is saved. udev may still be loading modules when systemd says
/// it is up (a clone would then differ from itself seconds later), and the saved memory includes
/// the page and dentry caches: walking the trees every clone's baseline reads (the state
/// fingerprint, dpkg's database) makes every clone start warm, which took the first fingerprint
/// of a clone from 6-11 s to about 2 s under TCG.
///
/// It also runs the fingerprint's queries once: the first `ss` of a boot loads the socket
/// diagnostics modules (0.3-0.4 s under TCG), and a clone's first `systemctl` and `getent` read
/// files the cache did not hold yet. With the baseline fingerprint taken once per golden state
/// (`fingerprint::baseline`), the capture after removal is a clone's first, so this is its cost.
pub const WARM_UP: &str = "udevadm settle --timeout=60 || true
find /usr /etc /var/lib /opt /srv /run/systemd/system -xdev -printf '%y %m %U %G %s %T@ %p\\n' >/dev/null 2>&1
find /etc /var/lib /opt /srv -xdev -type f -print0 2>/dev/null | xargs -0 -r cat >/dev/null 2>&1
dpkg-query -W >/dev/null 2>&1
ss -Hltun >/dev/null 2>&1
systemctl list-units --all --plain --no-legend --no-pager --full >/dev/null 2>&1
getent passwd >/dev/null 2>&1
getent group >/dev/null 2>&1
sync";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum GoldenOrigin {
    /// Booted from a patchlab image recipe.
    Image { recipe: String, recipe_digest: String, image_disk_sha256: String },
    /// Taken from a libvirt domain's snapshot the user already had.
    DomainSnapshot { domain: String, snapshot: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenRecord {
    pub format: u32,
    pub platform: String,
    pub origin: GoldenOrigin,
    pub accel: Accel,
    pub memory_mib: u32,
    pub domain_name: String,
    pub domain_uuid: String,
    pub disk: PathBuf,
    pub console: PathBuf,
    pub disk_sha256: String,
    pub state_sha256: String,
    pub boot_ms: u64,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct Golden {
    pub dir: PathBuf,
    pub record: GoldenRecord,
    pub header: saveimage::SaveHeader,
}

/// Which golden state a clone was restored from: its directory (where data derived from it is
/// kept, e.g. the baseline fingerprint) and the digests that identify its disk and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldenRef {
    pub dir: PathBuf,
    pub disk_sha256: String,
    pub state_sha256: String,
}

impl Golden {
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.save")
    }

    pub fn reference(&self) -> GoldenRef {
        GoldenRef { dir: self.dir.clone(), disk_sha256: self.record.disk_sha256.clone(), state_sha256: self.record.state_sha256.clone() }
    }

    pub fn load(dir: &Path) -> Result<Option<Golden>, HypervisorError> {
        let record_path = dir.join("golden.json");
        let text = match std::fs::read_to_string(&record_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(HypervisorError::io(format!("read {}", record_path.display()))(e)),
        };
        let record: GoldenRecord = serde_json::from_str(&text).map_err(|e| HypervisorError::Golden { platform: dir.display().to_string(), reason: format!("{} is unreadable: {e}", record_path.display()) })?;
        let header = saveimage::read_header(&dir.join("state.save"))?;
        Ok(Some(Golden { dir: dir.to_path_buf(), record, header }))
    }

    pub fn store(dir: &Path, record: &GoldenRecord) -> Result<(), HypervisorError> {
        let tmp = dir.join("golden.json.tmp");
        let text = serde_json::to_string_pretty(record).expect("record serializes");
        std::fs::write(&tmp, text).map_err(HypervisorError::io(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, dir.join("golden.json")).map_err(HypervisorError::io(format!("rename {}", tmp.display())))
    }

    /// Recomputes the digests of the disk and state and compares them with the record.
    pub fn verify_digests(&self) -> Result<(), HypervisorError> {
        for (path, recorded) in [(self.record.disk.clone(), &self.record.disk_sha256), (self.state_path(), &self.record.state_sha256)] {
            let actual = super::sha256_file(&path).map_err(|e| HypervisorError::Golden { platform: self.record.platform.clone(), reason: format!("golden file {} is unreadable ({e}); delete {} to rebuild it", path.display(), self.dir.display()) })?;
            if &actual != recorded {
                return Err(HypervisorError::Golden {
                    platform: self.record.platform.clone(),
                    reason: format!("golden file {} is corrupt: sha256 {actual}, recorded {recorded} when it was saved; delete {} to rebuild it", path.display(), self.dir.display()),
                });
            }
        }
        Ok(())
    }
}
