//! Patches as artifacts: built or copied into the run directory exactly as tested, with digests,
//! and the guest-side steps of each kind (deliver, install, remove).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

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
    pub package: String,
    #[serde(skip)]
    pub path: PathBuf,
}

/// A patch ready to deliver: its files in `<run>/patches/<patch>/`, as they will be reported.
#[derive(Debug, Clone)]
pub struct PreparedPatch {
    pub name: String,
    pub kind: PatchKind,
    pub files: Vec<PatchFile>,
}

pub fn prepare(patch: &Patch, run_dir: &Path) -> Result<PreparedPatch, PatchError> {
    let fail = |reason: String| PatchError::Prepare { patch: patch.name.clone(), reason };
    let dir = run_dir.join("patches").join(&patch.name);
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("create {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for source in &patch.sources {
        let path = match source {
            PatchSource::File(file) => {
                let dest = dir.join(file.file_name().ok_or_else(|| fail(format!("{} has no file name", file.display())))?);
                std::fs::copy(file, &dest).map_err(|e| fail(format!("copy {}: {e}", file.display())))?;
                dest
            }
            PatchSource::Tree(tree) => build_deb(tree, &dir).map_err(fail)?,
        };
        let data = std::fs::read(&path).map_err(|e| fail(format!("read {}: {e}", path.display())))?;
        let package = deb_field(&path, "Package").map_err(fail)?;
        files.push(PatchFile { name: path.file_name().unwrap().to_string_lossy().into_owned(), sha256: sha256_hex(&data), package, path });
    }
    Ok(PreparedPatch { name: patch.name.clone(), kind: patch.kind, files })
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

impl PreparedPatch {
    pub fn guest_path(file: &PatchFile) -> String {
        format!("{GUEST_DIR}/{}", file.name)
    }

    /// Pushes every file into the guest; each is digest-checked there.
    pub fn deliver(&self, agent: &Agent<'_>) -> Result<Vec<Delivered>, AgentError> {
        agent.run_ok("/bin/mkdir", &["-p", GUEST_DIR], Duration::from_secs(30))?;
        let mut delivered = Vec::new();
        for file in &self.files {
            let data = std::fs::read(&file.path).map_err(|e| AgentError::Unreachable(format!("read {}: {e}", file.path.display())))?;
            let guest_sha256 = agent.push_file(&data, &Self::guest_path(file))?;
            delivered.push(Delivered { file: file.name.clone(), host_sha256: file.sha256.clone(), guest_sha256 });
        }
        Ok(delivered)
    }

    pub fn install(&self, agent: &Agent<'_>, deadline: Duration) -> Result<ExecResult, AgentError> {
        match self.kind {
            PatchKind::Deb => {
                let mut args = vec!["--install".to_string()];
                args.extend(self.files.iter().map(Self::guest_path));
                agent.exec(&ExecRequest { program: "/usr/bin/dpkg".into(), args, deadline, output_limit: crate::guest::DEFAULT_OUTPUT_LIMIT })
            }
        }
    }

    pub fn remove(&self, agent: &Agent<'_>, deadline: Duration) -> Result<ExecResult, AgentError> {
        match self.kind {
            PatchKind::Deb => {
                let mut args = vec!["--purge".to_string()];
                args.extend(self.files.iter().map(|f| f.package.clone()));
                agent.exec(&ExecRequest { program: "/usr/bin/dpkg".into(), args, deadline, output_limit: crate::guest::DEFAULT_OUTPUT_LIMIT })
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivered {
    pub file: String,
    pub host_sha256: String,
    pub guest_sha256: String,
}
