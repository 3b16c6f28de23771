//! The qualification report: plain data, the verdict rules, and its canonical bytes.
//! Nothing here does IO except [`Report::write`].

pub mod gate;
pub mod render;
pub mod sign;
pub mod verdict;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use verdict::{Status, Verdict};

use crate::checks::CheckResult;
use crate::guest::ExecResult;
use crate::patch::Delivered;

/// Bumped on any change a reader would notice; see docs/report-format.md.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub schema_version: u32,
    pub run_id: String,
    /// False when the run was interrupted or broke before every cell finished.
    pub complete: bool,
    pub verdict: Verdict,
    pub lab: LabRef,
    pub patchlab: Tool,
    pub hosts: Vec<HostRef>,
    pub started_at: String,
    pub finished_at: String,
    pub platforms: Vec<PlatformRef>,
    pub patches: Vec<PatchRef>,
    /// Condition 1: the share of the inventory's hosts the lab simulates and the patch passed on.
    pub coverage: Coverage,
    pub results: Vec<CellResult>,
    /// The key `patchlab run --key` signs this report with; `None` when the run was not signed.
    /// Who may sign is decided by the verifier's allowed_signers file, not by this field.
    #[serde(default)]
    pub signer: Option<SignerRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerRef {
    /// The key's comment, by convention the signer's identity (`patchlab keygen --identity`).
    pub key_comment: String,
    /// `SHA256:...` of the public key.
    pub key_fingerprint: String,
    /// A throwaway development key (`cargo xtask lab` makes one on first use): fine for trying
    /// patchlab, not for approving a release.
    pub development: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Coverage {
    /// `pass` when covered hosts exceed the threshold; `skipped` when the lab names no inventory.
    pub status: Status,
    pub inventory: Option<InventoryRef>,
    /// Coverage must be strictly above this share of the inventory's hosts, in percent (default 50: a majority).
    pub threshold_percent: u32,
    pub covered_hosts: u32,
    pub total_hosts: u32,
    /// Every inventory host: whether a lab platform on which the patch passed represents it.
    pub hosts: Vec<HostCoverage>,
    /// Inventory platforms (`os version arch`) that no passing lab platform represents.
    pub uncovered_platforms: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryRef {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCoverage {
    pub host: String,
    /// `os version arch`, e.g. `debian 12 x86_64`.
    pub platform: String,
    pub role: String,
    pub criticality: String,
    /// The lab platform that represents this host, if any.
    pub lab_platform: Option<String>,
    /// True when that lab platform exists and every cell on it passed.
    pub covered: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabRef {
    pub name: String,
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    pub version: String,
    pub commit: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRef {
    pub uri: String,
    pub accel: String,
    pub accel_reason: String,
    /// The golden state each platform was cloned from on this host, when it is not the one
    /// `platforms` names: a remote host boots and saves its own (see docs/lab-format.md, `hosts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden_states: Vec<GoldenStateRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenStateRef {
    pub platform: String,
    pub golden_disk_sha256: String,
    pub golden_state_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformRef {
    pub name: String,
    /// `image:<recipe name>` or `domain:<domain>/<snapshot>`.
    pub origin: String,
    /// What the platform simulates, matched against the inventory: e.g. `debian`, `12`, `x86_64`.
    pub os: Option<String>,
    pub version: Option<String>,
    pub arch: Option<String>,
    pub image_recipe_digest: Option<String>,
    pub image_disk_sha256: Option<String>,
    pub golden_disk_sha256: String,
    pub golden_state_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRef {
    pub name: String,
    pub kind: String,
    pub files: Vec<FileRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub name: String,
    /// Relative to the report: the artifact exactly as tested.
    pub path: String,
    pub sha256: String,
    pub package: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellResult {
    pub platform: String,
    pub patch: String,
    pub verdict: Verdict,
    pub host: String,
    pub clone: String,
    /// Why the cell is `error`, when it is.
    pub error: Option<String>,
    pub conditions: Conditions,
    pub phases: Vec<Phase>,
    pub duration_ms: u64,
    /// Evidence files beside the report (console log), by relative path.
    pub evidence: Vec<EvidenceRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceRef {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    pub ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    pub baseline: Condition,
    pub delivery: Condition,
    pub install: Condition,
    pub operations: Condition,
    pub removal: Condition,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub status: Status,
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<ExecResult>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub delivered: Vec<Delivered>,
    /// Removal: every difference between the baseline fingerprint and the one after removal that
    /// the lab does not allow (allowed ones are counted in `allowed_differences`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<Difference>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub allowed_differences: u64,
    /// Operations: the checks repeated during burn-in, round by round.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub burn_in: Vec<BurnInRound>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One item of state that differs between two fingerprints.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Difference {
    /// `file`, `package`, `unit`, `socket`, `user`, `group`, `cron`, `module`.
    pub kind: String,
    pub item: String,
    /// The state at baseline; `None` when the item did not exist.
    pub before: Option<String>,
    /// The state after removal; `None` when the item no longer exists.
    pub after: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurnInRound {
    /// Milliseconds since the burn-in started.
    pub at_ms: u64,
    pub checks: Vec<CheckResult>,
}

impl Condition {
    pub fn pass() -> Self {
        Condition { status: Status::Pass, ..Default::default() }
    }
    pub fn with(status: Status, reason: impl Into<String>) -> Self {
        Condition { status, reason: Some(reason.into()), ..Default::default() }
    }
}

impl Report {
    /// The bytes that are written and signed: RFC 8785 canonical JSON.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        serde_jcs::to_vec(self).expect("the report model serializes")
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<std::path::PathBuf> {
        let path = dir.join("report.json");
        let tmp = dir.join(".report.json.tmp");
        std::fs::write(&tmp, self.canonical_bytes())?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    pub fn exit_code(&self) -> i32 {
        self.verdict.exit_code()
    }
}
