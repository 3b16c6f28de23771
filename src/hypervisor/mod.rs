//! The seam to the hypervisor. Only this module talks to libvirt; everything above works through
//! [`Machine`] and [`CloneSource`], so orchestration can be tested with fakes.

pub mod accel;
pub mod clean;
pub mod domain_xml;
pub mod golden;
pub mod libvirt;
pub mod remote;
pub mod runlock;
pub mod saveimage;

use std::path::{Path, PathBuf};

pub use accel::{Accel, AccelChoice, AccelDecision};

use crate::guest::AgentChannel;

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("connect to libvirt at {uri}: {message}; is libvirtd running? (`cargo xtask lab` starts it, or run `virtlogd -d && libvirtd -d`)")]
    Connect { uri: String, message: String },
    #[error("{action}: {message}")]
    Libvirt { action: String, message: String },
    #[error("{action}: {source}")]
    Io { action: String, #[source] source: std::io::Error },
    #[error("run `{command}`: {stderr}")]
    Command { command: String, stderr: String },
    #[error(transparent)]
    SaveImage(#[from] saveimage::SaveImageError),
    #[error(transparent)]
    Rewrite(#[from] domain_xml::RewriteError),
    #[error(transparent)]
    Accel(#[from] accel::AccelError),
    #[error("prepare golden state of {platform}: {reason}")]
    Golden { platform: String, reason: String },
    #[error("not enough free space for a clone in {dir}: {available_mib} MiB free, a clone needs {needed_mib} MiB (its state copy and disk overlay); free some space or point --cache-dir (PATCHLAB_CACHE_DIR) at a larger disk")]
    NoRoom { dir: String, available_mib: u64, needed_mib: u64 },
    #[error("cancelled")]
    Cancelled,
}

/// Room a clone's overlay may grow into while a cell runs, beyond the copy of the golden state.
pub const CLONE_DISK_HEADROOM: u64 = 256 << 20;

/// Refuses to clone when `available` bytes cannot hold a clone needing `needed` bytes.
pub fn check_room(dir: &Path, available: u64, needed: u64) -> Result<(), HypervisorError> {
    if available < needed {
        return Err(HypervisorError::NoRoom { dir: dir.display().to_string(), available_mib: available >> 20, needed_mib: needed.div_ceil(1 << 20) });
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on the file system holding `path`.
pub fn available_bytes(path: &Path) -> Result<u64, HypervisorError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| HypervisorError::Io { action: format!("check free space in {}", path.display()), source: std::io::ErrorKind::InvalidInput.into() })?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(HypervisorError::io(format!("check free space in {}", path.display()))(std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod room_tests {
    use super::*;

    #[test]
    fn a_clone_needs_room_for_its_state_and_overlay() {
        let dir = Path::new("/var/cache/patchlab/clones/r1");
        assert!(check_room(dir, 1 << 30, 400 << 20).is_ok());
        assert!(check_room(dir, 400 << 20, 400 << 20).is_ok());
        let e = check_room(dir, 100 << 20, (400 << 20) + 1).unwrap_err().to_string();
        assert!(e.contains("/var/cache/patchlab/clones/r1") && e.contains("100 MiB free") && e.contains("needs 401 MiB"), "{e}");
        assert!(available_bytes(Path::new("/")).unwrap() > 0);
        assert!(available_bytes(Path::new("/no/such/dir")).is_err());
    }
}

impl HypervisorError {
    pub fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> HypervisorError {
        let action = action.into();
        move |source| HypervisorError::Io { action, source }
    }

    pub fn libvirt(action: impl Into<String>) -> impl FnOnce(virt::error::Error) -> HypervisorError {
        let action = action.into();
        move |e| HypervisorError::Libvirt { action, message: e.message().to_string() }
    }
}

/// What bounds how many clones a host holds at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// libvirt's name for the host: URIs that reach the same host share its budget.
    pub hostname: String,
    pub cpus: usize,
    pub free_mib: u64,
}

/// Memory this machine can still give without swapping (`MemAvailable`, which counts the page
/// cache QEMU's memory can displace; libvirt's free memory does not).
pub fn local_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())).map(|kib| kib / 1024).unwrap_or(2048)
}

/// Removes the leftovers of dead runs on the host at `uri`: local or remote (see `remote`).
pub fn reap_host(uri: &str, dirs: &Dirs) -> Result<Vec<String>, HypervisorError> {
    if remote::is_remote(uri) { remote::PoolHost::connect(uri, dirs.clone())?.reap() } else { libvirt::LibvirtHost::connect(uri, dirs.clone())?.reap() }
}

/// One running throwaway machine, owned by one cell. Dropping it tears it down.
pub trait Machine: Send + Sync {
    fn name(&self) -> &str;
    fn agent_channel(&self) -> &dyn AgentChannel;
    /// Where the checks reach `guest_port` from this process, if it is forwarded: a port on
    /// 127.0.0.1 for a local host, on the address its URI names for a remote one.
    fn forwarded(&self, guest_port: u16) -> Option<std::net::SocketAddr>;
    /// The serial console's output so far, kept as evidence; `None` when there is none.
    fn console_log(&self) -> Option<Vec<u8>>;
    /// Destroys the machine and removes its files. Idempotent.
    fn teardown(&mut self) -> Result<(), HypervisorError>;
    /// The golden state this machine was restored from, when it is one this process can keep
    /// derived data beside (the baseline fingerprint, `fingerprint::baseline`).
    fn golden(&self) -> Option<&golden::GoldenRef> {
        None
    }
}

/// Where clones come from: one prepared golden state per platform.
pub trait CloneSource: Send + Sync {
    fn clone_machine(&self, platform: &str, clone_name: &str, guest_ports: &[u16]) -> Result<Box<dyn Machine>, HypervisorError>;
}

/// Runs an external tool, with its stderr in the error.
pub fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> Result<String, HypervisorError> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(HypervisorError::io(format!("start {program}")))?;
    if !out.status.success() {
        let command = std::iter::once(program.to_string()).chain(args.iter().map(|a| a.to_string_lossy().into_owned())).collect::<Vec<_>>().join(" ");
        return Err(HypervisorError::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates a qcow2 overlay whose backing file is `backing` (never written through the overlay).
pub fn create_overlay(backing: &Path, overlay: &Path) -> Result<(), HypervisorError> {
    run_tool("qemu-img", &["create".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), "-F".as_ref(), "qcow2".as_ref(), "-b".as_ref(), backing.as_os_str(), overlay.as_os_str()]).map(drop)
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, HypervisorError> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).map_err(HypervisorError::io(format!("open {}", path.display())))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(HypervisorError::io(format!("read {}", path.display())))?;
    Ok(hex::encode(hasher.finalize()))
}

/// The directory tree patchlab keeps outside the repository.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub root: PathBuf,
}

impl Dirs {
    pub fn new(root: PathBuf) -> Self {
        Dirs { root }
    }
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn golden(&self) -> PathBuf {
        self.root.join("golden")
    }
    pub fn clones(&self) -> PathBuf {
        self.root.join("clones")
    }
    pub fn runs(&self) -> PathBuf {
        self.root.join("runs")
    }
}
