//! Installs and starts what the lab needs, idempotently: a second run does nothing but check.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{run_ok, run_status, step};

/// Debian packages the lab needs. On bookworm they come from bookworm-backports, because the
/// machine's qemu-utils does (LAB-NOTES.md); elsewhere from the default suite.
const PACKAGES: &[&str] = &["qemu-system-x86", "qemu-utils", "libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients", "libvirt-dev", "pkg-config"];
/// chromium and libxml2-utils (xmllint) are for tests/renderings.rs: the HTML report in a headless
/// browser, junit.xml against the JUnit schema.
const PACKAGES_ANY_SUITE: &[&str] = &["debootstrap", "openssh-client", "chromium", "libxml2-utils"];

/// Images the default lab and the test suite run on.
pub const IMAGES: &[&str] = &["images/debian-11.toml", "images/debian-12.toml", "images/debian-12-point.toml", "images/debian-13.toml"];

pub fn all(root: &Path) -> Result<(), String> {
    packages()?;
    daemons()?;
    build_patchlab(root)?;
    images(root, IMAGES)
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query").args(["-W", "-f=${Status}", package]).output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn codename() -> String {
    std::fs::read_to_string("/etc/os-release").unwrap_or_default().lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=")).unwrap_or_default().trim_matches('"').to_string()
}

pub fn packages() -> Result<(), String> {
    let missing: Vec<&str> = PACKAGES.iter().chain(PACKAGES_ANY_SUITE).copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        return Err(format!("these packages are missing and there is no apt-get to install them: {}", missing.join(" ")));
    }
    step(&format!("installing {}", missing.join(" ")));
    let backports = codename() == "bookworm";
    if backports {
        let list = Path::new("/etc/apt/sources.list.d/patchlab-backports.list");
        let already = std::fs::read_dir("/etc/apt/sources.list.d").into_iter().flatten().flatten().any(|e| std::fs::read_to_string(e.path()).unwrap_or_default().contains("bookworm-backports"));
        if !already {
            std::fs::write(list, "deb http://deb.debian.org/debian bookworm-backports main\n").map_err(|e| format!("write {}: {e} (run as root)", list.display()))?;
        }
    }
    let apt = |args: &[&str]| run_ok(Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive"));
    apt(&["update", "-q"])?;
    let mut from_backports = vec!["install", "-y", "-q", "--no-install-recommends"];
    if backports {
        from_backports.extend(["-t", "bookworm-backports"]);
    }
    from_backports.extend(PACKAGES);
    apt(&from_backports)?;
    let mut rest = vec!["install", "-y", "-q", "--no-install-recommends"];
    rest.extend(PACKAGES_ANY_SUITE);
    apt(&rest)
}

/// Pids of the live processes named `comm`. An exited process whose parent has not reaped it yet
/// (a zombie: PID 1 may take seconds) still has its name but runs nothing, so it does not count.
fn pids_of(comm: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == comm))
        .filter(|e| !std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'))))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn running(comm: &str) -> bool {
    !pids_of(comm).is_empty()
}

/// Whether every running libvirtd runs under xtask's reaper.
fn libvirtd_reaped() -> bool {
    let pids: Vec<u32> = pids_of("libvirtd").iter().filter_map(|p| p.parse().ok()).collect();
    !pids.is_empty() && pids.into_iter().all(crate::reaper::is_reaped)
}

fn wait_for(path: &str, timeout: Duration) -> Result<(), String> {
    let started = Instant::now();
    while !Path::new(path).exists() {
        if started.elapsed() > timeout {
            return Err(format!("{path} did not appear within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// libvirtd's configuration when xtask starts it: the stock settings plus a TCP listener on the
/// loopback address only, without authentication, so the fleet test can reach the same daemon as
/// `qemu+tcp://127.0.0.1/system`, a second transport that goes through libvirt's remote protocol.
/// Anyone with a local account can use that socket as root: this is a lab machine's setting.
pub const LIBVIRTD_CONF: &str = "/etc/libvirt/patchlab-libvirtd.conf";
pub const LIBVIRTD_TCP: &str = "127.0.0.1:16509";

fn libvirtd_conf() -> String {
    let stock = std::fs::read_to_string("/etc/libvirt/libvirtd.conf").unwrap_or_default();
    format!("{stock}\n# Added by patchlab's xtask (xtask/src/setup.rs): TCP on the loopback address only.\nlisten_tls = 0\nlisten_tcp = 1\nlisten_addr = \"127.0.0.1\"\nauth_tcp = \"none\"\n")
}

fn tcp_listening() -> bool {
    std::net::TcpStream::connect_timeout(&LIBVIRTD_TCP.parse().expect("address"), Duration::from_secs(1)).is_ok()
}

/// Starts virtlogd and libvirtd: with systemd when it runs the machine, directly otherwise, and then
/// libvirtd under a reaper (see `reaper.rs`: QEMU's exit is not waited on by a slow PID 1).
/// libvirtd also listens on TCP at 127.0.0.1 (see [`LIBVIRTD_CONF`]); a libvirtd running without
/// that listener, or without systemd and not under a reaper, is restarted (its running domains
/// survive a restart).
pub fn daemons() -> Result<(), String> {
    let systemd = Path::new("/run/systemd/system").exists();
    for (daemon, socket) in [("virtlogd", "/run/libvirt/virtlogd-sock"), ("libvirtd", "/run/libvirt/libvirt-sock")] {
        let is_libvirtd = daemon == "libvirtd";
        if running(daemon) && Path::new(socket).exists() && (!is_libvirtd || (tcp_listening() && (systemd || libvirtd_reaped()))) {
            continue;
        }
        if systemd {
            step(&format!("starting {daemon}"));
            if is_libvirtd {
                // libvirtd-tcp.socket owns the listener under systemd; auth_tcp comes from libvirtd.conf.
                std::fs::write("/etc/libvirt/libvirtd.conf", libvirtd_conf()).map_err(|e| format!("write /etc/libvirt/libvirtd.conf: {e}"))?;
                run_ok(Command::new("systemctl").args(["start", "libvirtd-tcp.socket"]))?;
            }
            run_ok(Command::new("systemctl").args(["start", daemon]))?;
        } else if is_libvirtd {
            if running(daemon) {
                step("restarting libvirtd with a TCP listener on 127.0.0.1, under a reaper");
                stop("libvirtd")?;
            } else {
                step("starting libvirtd");
            }
            std::fs::write(LIBVIRTD_CONF, libvirtd_conf()).map_err(|e| format!("write {LIBVIRTD_CONF}: {e}"))?;
            // In the foreground (no -d) under the reaper, which stays its parent.
            crate::reaper::spawn(daemon, &["--listen", "-f", LIBVIRTD_CONF])?;
        } else {
            step(&format!("starting {daemon}"));
            run_ok(Command::new(daemon).arg("-d"))?;
        }
        wait_for(socket, Duration::from_secs(30))?;
        if is_libvirtd {
            let started = Instant::now();
            while !tcp_listening() {
                if started.elapsed() > Duration::from_secs(30) {
                    return Err(format!("libvirtd does not listen on {LIBVIRTD_TCP}; see {LIBVIRTD_CONF}"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

/// Stops a daemon started without systemd and waits until it is gone.
fn stop(comm: &str) -> Result<(), String> {
    // The shell's own `kill`: procps may not be installed. libvirtd shuts down gracefully on
    // SIGTERM (its domains keep running); one that has not stopped after 30 s gets SIGKILL, which
    // is as safe for the domains, since libvirtd reconnects to them when it starts again.
    for (signal, wait) in [("TERM", 30), ("KILL", 10)] {
        let pids = pids_of(comm);
        if pids.is_empty() {
            return Ok(());
        }
        if signal == "KILL" {
            step(&format!("{comm} did not stop within 30 s of SIGTERM; sending SIGKILL"));
        }
        let _ = run_status(Command::new("sh").args(["-c", &format!("kill -{signal} {} 2>/dev/null", pids.join(" "))]));
        let started = Instant::now();
        while running(comm) && started.elapsed() < Duration::from_secs(wait) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if running(comm) {
        return Err(format!("{comm} did not stop, even after SIGKILL"));
    }
    Ok(())
}

pub fn build_patchlab(root: &Path) -> Result<(), String> {
    step("building patchlab");
    run_ok(Command::new(env!("CARGO")).current_dir(root).args(["build", "--quiet", "--package", "patchlab"]))
}

pub fn patchlab_bin(root: &Path) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|| root.join("target"));
    target.join("debug").join("patchlab")
}

/// Builds the images (cached by recipe digest) in parallel: debootstrap waits on the network
/// and on dpkg more than on the CPU.
pub fn images(root: &Path, recipes: &[&str]) -> Result<(), String> {
    step(&format!("ensuring images {}", recipes.join(" ")));
    let bin = patchlab_bin(root);
    let children: Vec<_> = recipes
        .iter()
        .map(|r| Command::new(&bin).current_dir(root).args(["image", "build", r]).stdout(std::process::Stdio::null()).spawn().map(|c| (r, c)).map_err(|e| format!("start {}: {e}", bin.display())))
        .collect::<Result<_, _>>()?;
    let mut failed = Vec::new();
    for (recipe, mut child) in children {
        if !child.wait().map(|s| s.success()).unwrap_or(false) {
            failed.push(*recipe);
        }
    }
    if failed.is_empty() { Ok(()) } else { Err(format!("building images failed: {}", failed.join(" "))) }
}
