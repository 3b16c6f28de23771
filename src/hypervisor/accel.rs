//! Choosing between KVM and TCG by measuring, not by assuming.
//!
//! `/dev/kvm` existing is not enough: under nested or paravirtual KVM (kvm_pvm) a guest kernel can
//! be a thousand times slower than under plain emulation. The probe boots the platform's own kernel
//! under KVM with no root file system and `panic=-1`: on a working KVM host it panics and QEMU exits
//! within a second or two; if it has not exited within the deadline, KVM is not worth using.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The libvirt `<domain type=...>` value.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AccelChoice {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// A missing prerequisite, each said in one sentence that names what to do.
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("{}", kvm_sentence(device, source))]
    KvmUnavailable { device: PathBuf, source: std::io::Error },
    #[error("find QEMU: `{qemu}` is not on PATH; install Debian's qemu-system-x86 package (`cargo xtask setup` does) or put its directory on PATH")]
    NoQemu { qemu: String },
}

/// Why KVM was asked for (`--accel kvm`) and cannot be used, and what to do about it.
fn kvm_sentence(device: &Path, e: &std::io::Error) -> String {
    let device = device.display();
    let what_to_do = match e.kind() {
        std::io::ErrorKind::NotFound => "the kvm module is not loaded (`modprobe kvm_intel` or `modprobe kvm_amd`) or this machine has no hardware virtualization",
        std::io::ErrorKind::PermissionDenied => "this user may not use it: add the user to its group (usually `kvm`) or run as root",
        _ => "check that the kvm module is loaded and that this user may open it",
    };
    format!("use KVM (--accel kvm): {device} cannot be opened ({e}): {what_to_do}, or pass --accel tcg to emulate without it")
}

const PROBE_DEADLINE: Duration = Duration::from_secs(20);

/// The device KVM is used through.
pub const KVM_DEVICE: &str = "/dev/kvm";

pub fn decide(choice: AccelChoice, qemu: &str, probe_kernel: &Path) -> Result<AccelDecision, AccelError> {
    decide_with(choice, qemu, probe_kernel, Path::new(KVM_DEVICE))
}

/// [`decide`] with the KVM device at `kvm` (tests point it elsewhere).
pub fn decide_with(choice: AccelChoice, qemu: &str, probe_kernel: &Path, kvm: &Path) -> Result<AccelDecision, AccelError> {
    require_qemu(qemu)?;
    match choice {
        AccelChoice::Tcg => Ok(AccelDecision { accel: Accel::Tcg, reason: "tcg requested".into() }),
        AccelChoice::Kvm => {
            open_kvm(kvm).map_err(|source| AccelError::KvmUnavailable { device: kvm.to_path_buf(), source })?;
            Ok(AccelDecision { accel: Accel::Kvm, reason: "kvm requested".into() })
        }
        AccelChoice::Auto => Ok(probe(qemu, probe_kernel)),
    }
}

/// Where `qemu` is on PATH, if it is.
fn find_on_path(qemu: &str) -> Option<PathBuf> {
    if qemu.contains('/') {
        return Path::new(qemu).is_file().then(|| PathBuf::from(qemu));
    }
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(qemu)).find(|p| p.is_file()))
}

/// QEMU must be installed on this machine when its own libvirtd runs the clones: the KVM probe runs
/// it and libvirtd starts every clone with it (a remote host is probed through its own libvirtd).
fn require_qemu(qemu: &str) -> Result<(), AccelError> {
    find_on_path(qemu).map(drop).ok_or_else(|| AccelError::NoQemu { qemu: qemu.into() })
}

/// Like [`decide`], but remembers the outcome of an `auto` probe in `cache_dir/accel-probe.json`,
/// keyed by the host kernel and the QEMU binary, so the probe's seconds are paid once per host.
pub fn decide_cached(choice: AccelChoice, qemu: &str, probe_kernel: &Path, cache_dir: &Path) -> Result<AccelDecision, AccelError> {
    require_qemu(qemu)?;
    if choice != AccelChoice::Auto {
        return decide(choice, qemu, probe_kernel);
    }
    let key = probe_key(qemu);
    let file = cache_dir.join("accel-probe.json");
    if let Some(cached) = std::fs::read_to_string(&file).ok().and_then(|t| serde_json::from_str::<CachedProbe>(&t).ok()).filter(|c| c.key == key) {
        return Ok(AccelDecision { accel: cached.accel, reason: format!("{} (cached probe)", cached.reason) });
    }
    let decision = decide(choice, qemu, probe_kernel)?;
    let cached = CachedProbe { key, accel: decision.accel, reason: decision.reason.clone() };
    let _ = std::fs::create_dir_all(cache_dir);
    let _ = std::fs::write(&file, serde_json::to_string_pretty(&cached).expect("serializes"));
    Ok(decision)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedProbe {
    key: String,
    accel: Accel,
    reason: String,
}

fn probe_key(qemu: &str) -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let binary = find_on_path(qemu)
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| format!("{}:{:?}", m.len(), m.modified().ok()))
        .unwrap_or_default();
    let kvm = Path::new(KVM_DEVICE).exists();
    format!("{}|{binary}|kvm={kvm}", kernel.trim())
}

fn open_kvm(device: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new().read(true).write(true).open(device).map(drop)
}

fn probe(qemu: &str, kernel: &Path) -> AccelDecision {
    let tcg = |reason: String| AccelDecision { accel: Accel::Tcg, reason };
    if let Err(e) = open_kvm(Path::new(KVM_DEVICE)) {
        return tcg(format!("/dev/kvm unusable ({e})"));
    }
    let started = Instant::now();
    let child = Command::new(qemu)
        .args(["-accel", "kvm", "-machine", "pc", "-m", "256", "-nodefaults", "-nographic", "-no-reboot", "-serial", "none", "-kernel"])
        .arg(kernel)
        .args(["-append", "panic=-1 root=/dev/null console=none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return tcg(format!("could not start {qemu} for the KVM probe ({e})")),
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let elapsed = started.elapsed();
                return if status.success() {
                    AccelDecision { accel: Accel::Kvm, reason: format!("probe kernel panicked under kvm in {} ms", elapsed.as_millis()) }
                } else {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut err);
                    }
                    tcg(format!("kvm probe failed ({status}): {}", err.trim()))
                };
            }
            Ok(None) if started.elapsed() > PROBE_DEADLINE => {
                let _ = child.kill();
                let _ = child.wait();
                return tcg(format!("probe kernel did not finish under kvm within {} s (nested or paravirtual KVM?)", PROBE_DEADLINE.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return tcg(format!("kvm probe: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_asked_for_but_unusable_is_one_sentence_saying_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("kvm");
        let e = decide_with(AccelChoice::Kvm, "sh", Path::new(""), &missing).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("use KVM (--accel kvm): {} cannot be opened (No such file or directory (os error 2)): the kvm module is not loaded (`modprobe kvm_intel` or `modprobe kvm_amd`) or this machine has no hardware virtualization, or pass --accel tcg to emulate without it", missing.display())
        );
        // Permission denied cannot be made real for root (the tests run as root): the error is injected.
        let e = AccelError::KvmUnavailable { device: KVM_DEVICE.into(), source: std::io::ErrorKind::PermissionDenied.into() }.to_string();
        assert_eq!(e, "use KVM (--accel kvm): /dev/kvm cannot be opened (permission denied): this user may not use it: add the user to its group (usually `kvm`) or run as root, or pass --accel tcg to emulate without it");
        // A usable device, and TCG, which needs none.
        let file = dir.path().join("usable");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(decide_with(AccelChoice::Kvm, "sh", Path::new(""), &file).unwrap().accel, Accel::Kvm);
        assert_eq!(decide_with(AccelChoice::Tcg, "sh", Path::new(""), &missing).unwrap().accel, Accel::Tcg);
    }

    #[test]
    fn no_qemu_is_one_sentence_saying_what_to_do() {
        let e = decide_with(AccelChoice::Tcg, "qemu-system-patchlab-none", Path::new(""), Path::new(KVM_DEVICE)).unwrap_err().to_string();
        assert_eq!(e, "find QEMU: `qemu-system-patchlab-none` is not on PATH; install Debian's qemu-system-x86 package (`cargo xtask setup` does) or put its directory on PATH");
        let cached = decide_cached(AccelChoice::Auto, "qemu-system-patchlab-none", Path::new(""), Path::new("/nonexistent")).unwrap_err();
        assert!(matches!(cached, AccelError::NoQemu { .. }), "a cached probe does not hide a missing QEMU: {cached}");
        assert!(matches!(decide_with(AccelChoice::Tcg, "/no/such/qemu", Path::new(""), Path::new(KVM_DEVICE)), Err(AccelError::NoQemu { .. })));
    }
}
