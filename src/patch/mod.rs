//! Patches as artifacts: built or copied into the run directory exactly as tested, with digests,
//! and the guest-side steps of each kind (deliver, install, remove).

mod repack;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::guest::{Agent, AgentError, ExecRequest, ExecResult};
use crate::lab::{Patch, PatchKind, PatchSource};

/// Where delivered files live in the guest.
pub const GUEST_DIR: &str = "/var/tmp/patchlab";

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("prepare patch `{patch}`: {reason}")]
    Prepare { patch: String, reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct PatchFile {
    pub name: String,
    pub sha256: String,
    /// The Debian package in the file; empty for files that are not packages (script patches).
    pub package: String,
    /// The digest the lab pins for this file, if any.
    pub pinned: Option<String>,
    #[serde(skip)]
    pub path: PathBuf,
}

/// A patch ready to deliver: its files in `<run>/patches/<patch>/`, as they will be reported.
#[derive(Debug, Clone)]
pub struct PreparedPatch {
    pub name: String,
    pub kind: PatchKind,
    pub files: Vec<PatchFile>,
    /// `upgrade`: the previous packages supplied with the patch, in `<run>/patches/<patch>/rollback/`.
    pub rollback: Vec<PatchFile>,
}

pub fn prepare(patch: &Patch, run_dir: &Path) -> Result<PreparedPatch, PatchError> {
    let fail = |reason: String| PatchError::Prepare { patch: patch.name.clone(), reason };
    let dir = run_dir.join("patches").join(&patch.name);
    let is_package = !matches!(patch.kind, PatchKind::Script { .. });
    let files = collect(&patch.sources, &dir, is_package, &patch.pins).map_err(fail)?;
    let rollback = collect(&patch.rollback, &dir.join("rollback"), true, &Default::default()).map_err(fail)?;
    if let Some(unknown) = patch.pins.keys().find(|k| !files.iter().any(|f| &f.name == *k)) {
        return Err(fail(format!("the lab pins a sha256 for `{unknown}`, which is not one of the patch's files")));
    }
    Ok(PreparedPatch { name: patch.name.clone(), kind: patch.kind.clone(), files, rollback })
}

fn collect(sources: &[PatchSource], dir: &Path, is_package: bool, pins: &std::collections::BTreeMap<String, String>) -> Result<Vec<PatchFile>, String> {
    if sources.is_empty() {
        return Ok(vec![]);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for source in sources {
        let path = match source {
            PatchSource::File(file) => {
                let dest = dir.join(file.file_name().ok_or_else(|| format!("{} has no file name", file.display()))?);
                std::fs::copy(file, &dest).map_err(|e| format!("copy {}: {e}", file.display()))?;
                dest
            }
            PatchSource::Tree(tree) => build_deb(tree, dir)?,
        };
        let data = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let package = if is_package { deb_field(&path, "Package")? } else { String::new() };
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        files.push(PatchFile { pinned: pins.get(&name).cloned(), name, sha256: sha256_hex(&data), package, path });
    }
    Ok(files)
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

fn tool(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("start {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds a package tree into `<out>/<package>_<version>_<arch>.deb`. Ownership is root's and
/// timestamps are clamped, so the same tree gives the same bytes.
fn build_deb(tree: &Path, out: &Path) -> Result<PathBuf, String> {
    let control = std::fs::read_to_string(tree.join("DEBIAN/control")).map_err(|e| format!("read {}/DEBIAN/control: {e}", tree.display()))?;
    let field = |name: &str| control.lines().find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_string())).ok_or(format!("{}/DEBIAN/control has no {name} field", tree.display()));
    let file = out.join(format!("{}_{}_{}.deb", field("Package")?, field("Version")?, field("Architecture")?));
    // dpkg-deb refuses maintainer scripts that are not executable; git does not always keep modes.
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let p = tree.join("DEBIAN").join(script);
        if p.exists() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
        }
    }
    tool(Command::new("dpkg-deb").env("SOURCE_DATE_EPOCH", "1700000000").args(["--root-owner-group", "-Zxz", "--build"]).arg(tree).arg(&file))?;
    Ok(file)
}

fn deb_field(deb: &Path, field: &str) -> Result<String, String> {
    tool(Command::new("dpkg-deb").arg("--field").arg(deb).arg(field))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivered {
    pub file: String,
    pub host_sha256: String,
    pub guest_sha256: String,
    pub pinned_sha256: Option<String>,
}

/// Why delivery did not pass: the patch's fault (a digest that does not match), not the lab's.
#[derive(Debug)]
pub enum DeliveryFailure {
    /// The host file does not have the digest the lab pins: it is not the file the advisory names.
    PinMismatch { file: String, pinned: String, actual: String },
    /// The bytes that arrived are not the bytes sent.
    Corrupted { file: String, expected: String, actual: String },
    Agent(AgentError),
}

/// What an `upgrade` kept before installing, so that removal can put it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kept {
    /// Guest paths of the previous packages, reinstalled on removal.
    pub debs: Vec<String>,
    /// Packages the upgrade installed new (not installed before): purged on removal.
    pub new_packages: Vec<String>,
    /// One line per package: how its previous version was kept.
    pub notes: Vec<String>,
}

impl PreparedPatch {
    pub fn guest_path(file: &PatchFile) -> String {
        format!("{GUEST_DIR}/{}", file.name)
    }

    /// Pushes every file into the guest; each is digest-checked there, and against its pin.
    pub fn deliver(&self, agent: &Agent<'_>) -> Result<Vec<Delivered>, DeliveryFailure> {
        agent.run_ok("/bin/mkdir", &["-p", GUEST_DIR], Duration::from_secs(30)).map_err(DeliveryFailure::Agent)?;
        let mut delivered = Vec::new();
        for file in &self.files {
            if let Some(pinned) = &file.pinned {
                if *pinned != file.sha256 {
                    return Err(DeliveryFailure::PinMismatch { file: file.name.clone(), pinned: pinned.clone(), actual: file.sha256.clone() });
                }
            }
            let data = std::fs::read(&file.path).map_err(|e| DeliveryFailure::Agent(AgentError::Unreachable(format!("read {}: {e}", file.path.display()))))?;
            let guest_sha256 = match agent.push_file(&data, &Self::guest_path(file)) {
                Ok(digest) => digest,
                Err(AgentError::DigestMismatch { expected, actual, .. }) => return Err(DeliveryFailure::Corrupted { file: file.name.clone(), expected, actual }),
                Err(e) => return Err(DeliveryFailure::Agent(e)),
            };
            delivered.push(Delivered { file: file.name.clone(), host_sha256: file.sha256.clone(), guest_sha256, pinned_sha256: file.pinned.clone() });
        }
        Ok(delivered)
    }

    /// For `upgrade`: records the installed version of every package the patch upgrades and keeps
    /// that exact package in the guest (a supplied rollback file, else repacked from the installed
    /// files, since clones have no network to download it). Other kinds keep nothing.
    pub fn keep_previous(&self, agent: &Agent<'_>) -> Result<Kept, AgentError> {
        let mut kept = Kept::default();
        if self.kind != PatchKind::Upgrade {
            return Ok(kept);
        }
        for file in &self.files {
            let package = &file.package;
            let version = agent.exec(&ExecRequest::new("/usr/bin/dpkg-query", &["--show", "--showformat=${Version}\t${db:Status-Status}", package], Duration::from_secs(60)))?;
            let installed = version.success() && version.stdout.text.trim_end().ends_with("\tinstalled");
            if !installed {
                kept.new_packages.push(package.clone());
                kept.notes.push(format!("{package}: not installed before; purged on removal"));
                continue;
            }
            let previous = version.stdout.text.split('\t').next().unwrap_or_default().to_string();
            if let Some(supplied) = self.rollback.iter().find(|r| &r.package == package) {
                let data = std::fs::read(&supplied.path).map_err(|e| AgentError::Unreachable(format!("read {}: {e}", supplied.path.display())))?;
                let guest = format!("{GUEST_DIR}/rollback-{}", supplied.name);
                agent.push_file(&data, &guest)?;
                kept.notes.push(format!("{package} {previous}: supplied as {} (sha256 {})", supplied.name, supplied.sha256));
                kept.debs.push(guest);
            } else {
                let guest = format!("{GUEST_DIR}/rollback-{package}.deb");
                repack::repack(agent, package, &guest)?;
                kept.notes.push(format!("{package} {previous}: repacked from the installed files"));
                kept.debs.push(guest);
            }
        }
        Ok(kept)
    }

    /// Installs the patch. Its commands' output can be of any size: see [`Agent::exec_bounded`].
    pub fn install(&self, agent: &Agent<'_>, deadline: Duration) -> Result<ExecResult, AgentError> {
        let exec = |program: &str, args: Vec<String>| agent.exec_bounded(&ExecRequest { program: program.into(), args, deadline, output_limit: crate::guest::DEFAULT_OUTPUT_LIMIT });
        match &self.kind {
            PatchKind::Deb | PatchKind::Upgrade => exec("/usr/bin/dpkg", std::iter::once("--install".to_string()).chain(self.files.iter().map(Self::guest_path)).collect()),
            PatchKind::Script { install, .. } => exec(&install[0], install[1..].to_vec()),
        }
    }

    /// Removes the patch: purge (deb), reinstall what was kept (upgrade), or the remove command (script).
    pub fn remove(&self, agent: &Agent<'_>, kept: &Kept, deadline: Duration) -> Result<Vec<ExecResult>, AgentError> {
        let exec = |program: &str, args: Vec<String>| agent.exec_bounded(&ExecRequest { program: program.into(), args, deadline, output_limit: crate::guest::DEFAULT_OUTPUT_LIMIT });
        match &self.kind {
            PatchKind::Deb => Ok(vec![exec("/usr/bin/dpkg", std::iter::once("--purge".to_string()).chain(self.files.iter().map(|f| f.package.clone())).collect())?]),
            PatchKind::Upgrade => {
                let mut results = Vec::new();
                if !kept.debs.is_empty() {
                    results.push(exec("/usr/bin/dpkg", std::iter::once("--install".to_string()).chain(kept.debs.iter().cloned()).collect())?);
                }
                if !kept.new_packages.is_empty() && results.iter().all(ExecResult::success) {
                    results.push(exec("/usr/bin/dpkg", std::iter::once("--purge".to_string()).chain(kept.new_packages.iter().cloned()).collect())?);
                }
                Ok(results)
            }
            PatchKind::Script { remove, .. } => Ok(vec![exec(&remove[0], remove[1..].to_vec())?]),
        }
    }

    /// Removes what patchlab itself put in the guest, so the removal proof sees only the patch.
    pub fn clean_delivery(&self, agent: &Agent<'_>) -> Result<(), AgentError> {
        agent.run_ok("/bin/rm", &["-rf", "--", GUEST_DIR], Duration::from_secs(60)).map(drop)
    }
}
