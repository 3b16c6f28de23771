//! Choosing between KVM and TCG by measuring, not by assuming.
//!
//! `/dev/kvm` existing is not enough: under nested or paravirtual KVM (kvm_pvm) a guest kernel can
//! be a thousand times slower than under plain emulation. The probe boots the platform's own kernel
//! under KVM with no root file system and `panic=-1`: on a working KVM host it panics and QEMU exits
//! within a second or two; if it has not exited within the deadline, KVM is not worth using.

use std::path::Path;
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

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("use KVM: /dev/kvm cannot be opened ({0}); load the kvm module and give this user access, or pass --accel tcg")]
    KvmUnavailable(std::io::Error),
}

const PROBE_DEADLINE: Duration = Duration::from_secs(20);

pub fn decide(choice: AccelChoice, qemu: &str, probe_kernel: &Path) -> Result<AccelDecision, AccelError> {
    match choice {
        AccelChoice::Tcg => Ok(AccelDecision { accel: Accel::Tcg, reason: "tcg requested".into() }),
        AccelChoice::Kvm => {
            open_kvm().map_err(AccelError::KvmUnavailable)?;
            Ok(AccelDecision { accel: Accel::Kvm, reason: "kvm requested".into() })
        }
        AccelChoice::Auto => Ok(probe(qemu, probe_kernel)),
    }
}

/// Like [`decide`], but remembers the outcome of an `auto` probe in `cache_dir/accel-probe.json`,
/// keyed by the host kernel and the QEMU binary, so the probe's seconds are paid once per host.
pub fn decide_cached(choice: AccelChoice, qemu: &str, probe_kernel: &Path, cache_dir: &Path) -> Result<AccelDecision, AccelError> {
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
    let binary = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(qemu)).find(|p| p.is_file()))
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| format!("{}:{:?}", m.len(), m.modified().ok()))
        .unwrap_or_default();
    let kvm = Path::new("/dev/kvm").exists();
    format!("{}|{binary}|kvm={kvm}", kernel.trim())
}

fn open_kvm() -> std::io::Result<()> {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").map(drop)
}

fn probe(qemu: &str, kernel: &Path) -> AccelDecision {
    let tcg = |reason: String| AccelDecision { accel: Accel::Tcg, reason };
    if let Err(e) = open_kvm() {
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
