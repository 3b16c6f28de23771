//! The build itself: debootstrap a Debian rootfs, configure it for direct kernel boot under
//! libvirt/QEMU, pack it into an ext4 qcow2, copy kernel and initrd out.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::recipe::{Recipe, BUILDER_VERSION};
use super::sys::{self, chroot, run, write_file, ChrootMounts, TreeGuard};
use super::{BuiltImage, FileMeta, ImageError, ImageMeta, IMAGE_JSON};

/// Packages debootstrap installs into every image: init, device manager, module loader, the guest
/// agent (started by udev when the `org.qemu.guest_agent.0` virtio port appears), busybox for the
/// initramfs, iproute2 for diagnostics in the guest.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "kmod",
    "busybox",
    "qemu-guest-agent",
    "iproute2",
];

/// Packages installed only when the suite has them and the thing they provide is missing from the
/// base system: `(package, paths inside the rootfs of which one must exist afterwards)`.
/// - trixie moved `hwclock` out of util-linux into util-linux-extra (needed by `virsh domtime`);
/// - newer suites split systemd-networkd out of the systemd package.
const CONDITIONAL_PACKAGES: &[(&str, &[&str])] = &[
    ("util-linux-extra", &["usr/sbin/hwclock", "sbin/hwclock"]),
    (
        "systemd-networkd",
        &[
            "usr/lib/systemd/systemd-networkd",
            "lib/systemd/systemd-networkd",
        ],
    ),
];

/// Modules put into the (small, `MODULES=list`) initramfs.
pub const INITRAMFS_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "ext4",
    "virtio_console",
    "virtio_net",
];

/// Units masked so a booted guest does not drift (apt, man-db, periodic fs jobs, clock sync) or
/// burn CPU under TCG after boot. Masking a unit that a suite lacks is harmless.
pub const MASKED_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "man-db.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "logrotate.timer",
    "dpkg-db-backup.timer",
    "systemd-timesyncd.service",
    // cleans /tmp 15 min after boot and daily: a clone's files would change under a check.
    "systemd-tmpfiles-clean.timer",
    // nothing here needs "network online"; waiting for it only delays boot (up to 2 min).
    "systemd-networkd-wait-online.service",
];

/// Kernel command line for direct kernel boot. `mitigations=off` is fine for a lab under TCG and
/// saves boot time; `quiet` keeps the serial console log short.
pub const CMDLINE: &str =
    "root=/dev/vda rootfstype=ext4 rw console=ttyS0 net.ifnames=0 quiet mitigations=off";

const POLICY_RC_D: &str = "usr/sbin/policy-rc.d";

fn apt_get(root: &Path, args: &[&str]) -> Command {
    let mut all = vec![
        "-y",
        "-q",
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ];
    all.extend_from_slice(args);
    chroot(root, "apt-get", &all)
}

/// Builds `recipe` into `out_dir` (which must not exist or be empty). On failure everything this
/// call created in `out_dir` is removed (after unmounting the chroot mounts).
pub fn build(recipe: &Recipe, out_dir: &Path) -> Result<BuiltImage, ImageError> {
    let uid = sys::euid();
    if uid != 0 {
        return Err(ImageError::NotRoot {
            name: recipe.name.clone(),
            uid,
        });
    }
    if let Ok(mut rd) = fs::read_dir(out_dir) {
        if rd.next().is_some() {
            return Err(ImageError::Build {
                name: recipe.name.clone(),
                reason: format!("output directory {} is not empty", out_dir.display()),
            });
        }
    }
    fs::create_dir_all(out_dir).map_err(|e| ImageError::io("create directory", out_dir, e))?;
    let guard = TreeGuard::new(out_dir.to_path_buf());
    let img = build_inner(recipe, out_dir)?;
    guard.disarm();
    Ok(img)
}

fn build_inner(recipe: &Recipe, out: &Path) -> Result<BuiltImage, ImageError> {
    let started = Instant::now();
    let name = recipe.name.as_str();
    let digest = recipe.digest();
    let root = out.join("rootfs");
    sys::set_mode(out, 0o755)?;

    // 1. debootstrap
    tracing::info!(image = name, suite = %recipe.suite, mirror = %recipe.mirror, "debootstrap (minbase)");
    let t = Instant::now();
    let mut c = Command::new("debootstrap");
    c.arg("--variant=minbase")
        .arg(format!("--arch={}", recipe.debian_arch()))
        .arg("--components=main")
        .arg(format!("--include={}", BASE_PACKAGES.join(",")))
        .arg(&recipe.suite)
        .arg(&root)
        .arg(&recipe.mirror);
    run(&format!("debootstrap {}", recipe.suite), &mut c)?;
    tracing::info!(
        image = name,
        seconds = t.elapsed().as_secs(),
        "debootstrap done"
    );

    // 2. files written before any package is configured
    configure_files(recipe, &root, &digest)?;

    // 3. packages, kernel, units: inside the chroot with proc/sys/dev/devpts mounted; the guard
    //    unmounts on every path out of this block.
    let (kernel_version, packages) = {
        let mounts = ChrootMounts::mount(&root)?;
        let r = chroot_phase(recipe, &root);
        mounts.unmount()?;
        r?
    };
    fs::remove_file(root.join(POLICY_RC_D))
        .map_err(|e| ImageError::io("remove", &root.join(POLICY_RC_D), e))?;
    // The build used the host's resolver (debootstrap copied it in); it means nothing in a guest.
    write_file(
        &root.join("etc/resolv.conf"),
        "# patchlab guest: no DNS configured (clones have no outside network)\n",
        0o644,
    )?;

    // The image is complete: mark /etc and /var as up to date with /usr. Without these stamps the
    // first boot runs the ConditionNeedsUpdate units (ldconfig, sysusers, catalog update, ...) and
    // later boots do not, so a clone rebooted by a patch would differ from its baseline in units
    // the patch never touched.
    for stamp in ["etc/.updated", "var/.updated"] {
        write_file(&root.join(stamp), "# written by the patchlab image builder after the last package was installed\n", 0o644)?;
    }

    // 4. kernel and initrd out of the rootfs
    let kernel = out.join("kernel");
    let initrd = out.join("initrd");
    for (from, to) in [
        (format!("boot/vmlinuz-{kernel_version}"), &kernel),
        (format!("boot/initrd.img-{kernel_version}"), &initrd),
    ] {
        let src = root.join(&from);
        fs::copy(&src, to)
            .map_err(|e| ImageError::io(format!("copy {from} out of the rootfs to"), to, e))?;
    }

    // 5. rootfs -> ext4 raw -> qcow2
    let left = sys::mounts_under(&root);
    if !left.is_empty() {
        return Err(ImageError::Build {
            name: name.into(),
            reason: format!("rootfs still has mounts: {left:?}"),
        });
    }
    tracing::info!(
        image = name,
        size_mib = recipe.disk_size_mib,
        "creating ext4 filesystem from rootfs"
    );
    let raw = out.join("base.raw");
    let disk = out.join("base.qcow2");
    let mut c = Command::new("mke2fs");
    c.args(["-q", "-t", "ext4", "-L", "root", "-d"])
        .arg(&root)
        .arg(&raw)
        .arg(format!("{}M", recipe.disk_size_mib));
    run("create the ext4 filesystem (mke2fs -d)", &mut c)?;
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk);
    run("convert the raw disk to qcow2 (qemu-img convert)", &mut c)?;
    fs::remove_file(&raw).map_err(|e| ImageError::io("remove", &raw, e))?;
    sys::remove_tree(&root)?;

    // 6. seal: hashes, read-only files, image.json last
    let mut metas = Vec::new();
    for p in [&disk, &kernel, &initrd] {
        fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| ImageError::io("sync", p, e))?;
        sys::set_mode(p, 0o444)?;
        let size = fs::metadata(p)
            .map_err(|e| ImageError::io("stat", p, e))?
            .len();
        metas.push(FileMeta {
            file: p.file_name().unwrap().to_string_lossy().into_owned(),
            size_bytes: size,
            sha256: sys::sha256_file(p)?,
        });
    }
    let [disk_meta, kernel_meta, initrd_meta]: [FileMeta; 3] = metas.try_into().unwrap();
    let meta = ImageMeta {
        builder_version: BUILDER_VERSION.to_string(),
        recipe: recipe.clone(),
        recipe_digest: digest.clone(),
        debootstrap_suite: recipe.suite.clone(),
        kernel_version,
        cmdline: CMDLINE.to_string(),
        disk_virtual_size_bytes: u64::from(recipe.disk_size_mib) * 1024 * 1024,
        build_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        built_at: jiff::Timestamp::now().to_string(),
        packages,
        disk: disk_meta,
        kernel: kernel_meta,
        initrd: initrd_meta,
    };
    let json_path = out.join(IMAGE_JSON);
    let json = serde_json::to_string_pretty(&meta).map_err(|source| ImageError::Metadata {
        action: "serialise".into(),
        path: json_path.clone(),
        source,
    })?;
    write_file(&json_path, &(json + "\n"), 0o444)?;
    fs::File::open(&json_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ImageError::io("sync", &json_path, e))?;
    sys::fsync_dir(out);
    tracing::info!(
        image = name,
        seconds = meta.build_seconds,
        disk_bytes = meta.disk.size_bytes,
        kernel = %meta.kernel_version,
        "image built"
    );
    Ok(BuiltImage {
        recipe: recipe.clone(),
        dir: out.to_path_buf(),
        disk,
        kernel,
        initrd,
        cmdline: meta.cmdline,
        disk_sha256: meta.disk.sha256,
        recipe_digest: digest,
    })
}

fn sources_list(recipe: &Recipe) -> String {
    let s = &recipe.suite;
    let mut t = format!("deb {} {s} main\n", recipe.mirror);
    if recipe.security_updates {
        t.push_str(&format!("deb {} {s}-updates main\n", recipe.mirror));
        t.push_str(&format!(
            "deb {} {s}-security main\n",
            recipe.security_mirror
        ));
    }
    t
}

/// Fixed machine-id derived from the recipe digest: a non-empty machine-id avoids systemd's
/// "first boot" (which would run `preset-all` and could re-enable what we disabled), and a
/// fixed one keeps the image deterministic per recipe. Clones are memory copies anyway.
fn machine_id(digest: &str) -> String {
    let h = Sha256::digest(format!("machine-id:{digest}").as_bytes());
    hex::encode(&h[..16])
}

fn configure_files(recipe: &Recipe, root: &Path, digest: &str) -> Result<(), ImageError> {
    let host = recipe.hostname();
    let modules: String = INITRAMFS_MODULES.iter().map(|m| format!("{m}\n")).collect();
    let files: Vec<(&str, String, u32)> = vec![
        // No service may start inside the chroot during the build; removed afterwards.
        (POLICY_RC_D, "#!/bin/sh\n# patchlab image build: never start services in the chroot\nexit 101\n".into(), 0o755),
        ("etc/apt/sources.list", sources_list(recipe), 0o644),
        ("etc/hostname", format!("{host}\n"), 0o644),
        (
            "etc/hosts",
            format!("127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
            0o644,
        ),
        ("etc/fstab", "/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n".into(), 0o644),
        // Clones use libvirt user-mode networking (passt/slirp), which answers DHCP on eth0.
        (
            "etc/systemd/network/10-eth0.network",
            "[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n".into(),
            0o644,
        ),
        ("etc/machine-id", format!("{}\n", machine_id(digest)), 0o444),
        // Journal in RAM: a booted clone does not grow its disk with logs; `journalctl` still works.
        ("etc/systemd/journald.conf.d/patchlab.conf", "[Journal]\nStorage=volatile\n".into(), 0o644),
        // Small initrd: only the listed modules. Not initramfs.conf itself: editing that conffile
        // makes the kernel install stop on a conffile prompt.
        ("etc/initramfs-tools/conf.d/patchlab", "MODULES=list\n".into(), 0o644),
        ("usr/share/initramfs-tools/modules.d/patchlab", modules, 0o644),
    ];
    for (rel, text, mode) in files {
        write_file(&root.join(rel), &text, mode)?;
    }
    Ok(())
}

fn chroot_ok(root: &Path, program: &str, args: &[&str]) -> bool {
    chroot(root, program, args)
        .env_clear()
        .env("PATH", sys::SAFE_PATH)
        .env("LC_ALL", "C.UTF-8")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Returns (kernel version, `package version` list).
fn chroot_phase(recipe: &Recipe, root: &Path) -> Result<(String, Vec<String>), ImageError> {
    let name = recipe.name.as_str();
    tracing::info!(
        image = name,
        security = recipe.security_updates,
        "apt-get update / upgrade"
    );
    // --error-on=any: without it apt-get update exits 0 when a source cannot be fetched.
    run(
        "apt-get update in the chroot",
        &mut apt_get(root, &["--error-on=any", "update"]),
    )?;
    run(
        "apt-get upgrade in the chroot",
        &mut apt_get(root, &["upgrade"]),
    )?;

    let mut pkgs: Vec<String> = vec![recipe.kernel_package.clone()];
    for (pkg, provides) in CONDITIONAL_PACKAGES {
        let present = provides.iter().any(|p| root.join(p).exists());
        if !present && chroot_ok(root, "apt-cache", &["show", "--no-all-versions", pkg]) {
            pkgs.push((*pkg).to_string());
        }
    }
    pkgs.extend(recipe.packages.iter().cloned());
    tracing::info!(image = name, packages = ?pkgs, "installing kernel and packages");
    let t = Instant::now();
    let mut args = vec!["install", "--no-install-recommends"];
    args.extend(pkgs.iter().map(String::as_str));
    run(
        "apt-get install kernel and packages in the chroot",
        &mut apt_get(root, &args),
    )?;
    tracing::info!(
        image = name,
        seconds = t.elapsed().as_secs(),
        "packages installed"
    );

    install_local_packages(recipe, root)?;

    for (pkg, provides) in CONDITIONAL_PACKAGES {
        if !provides.iter().any(|p| root.join(p).exists()) {
            return Err(ImageError::Build {
                name: name.into(),
                reason: format!(
                    "{} is missing after install (package {pkg} not in suite {}?)",
                    provides[0], recipe.suite
                ),
            });
        }
    }
    let agent_unit = [
        "usr/lib/systemd/system/qemu-guest-agent.service",
        "lib/systemd/system/qemu-guest-agent.service",
    ];
    if !agent_unit.iter().any(|p| root.join(p).exists()) {
        return Err(ImageError::Build {
            name: name.into(),
            reason: "qemu-guest-agent.service is missing from the rootfs".into(),
        });
    }

    // Units: networkd + recipe services enabled, drift-prone units masked, boot to multi-user.
    let mut enable = vec!["systemd-networkd.service".to_string()];
    enable.extend(recipe.service_units());
    let mut args = vec!["enable"];
    args.extend(enable.iter().map(String::as_str));
    run(
        "enable services (systemctl enable)",
        &mut chroot(root, "systemctl", &args),
    )?;
    let mut args = vec!["mask"];
    args.extend_from_slice(MASKED_UNITS);
    run(
        "mask drift-prone units (systemctl mask)",
        &mut chroot(root, "systemctl", &args),
    )?;
    run(
        "set the default target",
        &mut chroot(root, "systemctl", &["set-default", "multi-user.target"]),
    )?;
    for unit in &enable {
        let out = chroot(root, "systemctl", &["is-enabled", unit])
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if out != "enabled" {
            return Err(ImageError::Build {
                name: name.into(),
                reason: format!("unit {unit} is {out:?} after systemctl enable, not \"enabled\""),
            });
        }
    }

    let packages: Vec<String> = run(
        "list installed packages (dpkg-query)",
        &mut chroot(root, "dpkg-query", &["-W", "-f", "${Package} ${Version}\n"]),
    )?
    .lines()
    .map(str::to_string)
    .collect();

    // Drop the package cache and the apt lists: clones have no outside network, so lists cannot
    // serve downloads there, and patches arrive as .deb files pushed into the guest and installed
    // with dpkg/apt from local files, which needs no lists. They would only add ~50-100 MB and
    // go stale. The sources.list stays, so `apt-get update` works wherever a network exists.
    run(
        "apt-get clean in the chroot",
        &mut apt_get(root, &["clean"]),
    )?;
    let lists = root.join("var/lib/apt/lists");
    if let Ok(rd) = fs::read_dir(&lists) {
        for e in rd.flatten() {
            let p = e.path();
            let r = if p.is_dir() {
                Ok(())
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|err| ImageError::io("remove apt list", &p, err))?;
        }
    }

    kernel_version(recipe, root).map(|k| (k, packages))
}

/// Builds each `local_packages` tree on the host and installs it in the chroot with dpkg.
fn install_local_packages(recipe: &Recipe, root: &Path) -> Result<(), ImageError> {
    for dir in recipe.local_package_dirs() {
        let name = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let deb_in_root = format!("var/tmp/{name}.deb");
        let deb = root.join(&deb_in_root);
        // dpkg-deb refuses maintainer scripts that are not executable; git does not always keep modes.
        for script in ["preinst", "postinst", "prerm", "postrm"] {
            let p = dir.join("DEBIAN").join(script);
            if p.exists() {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o755));
            }
        }
        run(
            "build a local package (dpkg-deb --build)",
            Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&dir).arg(&deb),
        )?;
        let installed = run("install a local package in the chroot (dpkg -i)", &mut chroot(root, "dpkg", &["--install", &format!("/{deb_in_root}")]));
        let _ = fs::remove_file(&deb);
        installed?;
        tracing::info!(image = recipe.name, package = name, "local package installed");
    }
    Ok(())
}

fn kernel_version(recipe: &Recipe, root: &Path) -> Result<String, ImageError> {
    let boot: PathBuf = root.join("boot");
    let mut versions: Vec<String> = fs::read_dir(&boot)
        .map_err(|e| ImageError::io("read", &boot, e))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
        })
        .filter(|v| boot.join(format!("initrd.img-{v}")).exists())
        .collect();
    versions.sort();
    match versions.as_slice() {
        [v] => Ok(v.clone()),
        [] => Err(ImageError::Build {
            name: recipe.name.clone(),
            reason: format!(
                "no vmlinuz-*/initrd.img-* pair in {} after installing {}",
                boot.display(),
                recipe.kernel_package
            ),
        }),
        many => Err(ImageError::Build {
            name: recipe.name.clone(),
            reason: format!("several kernels in {}: {many:?}", boot.display()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_include_security_and_updates_when_asked() {
        let text = include_str!("../../images/debian-12.toml");
        let mut r = Recipe::parse(text, Path::new("debian-12.toml")).unwrap();
        r.security_updates = true;
        let s = sources_list(&r);
        assert!(s.contains("deb http://deb.debian.org/debian bookworm main\n"));
        assert!(s.contains("bookworm-updates main"));
        assert!(s.contains("deb http://deb.debian.org/debian-security bookworm-security main"));
        r.security_updates = false;
        assert_eq!(sources_list(&r).lines().count(), 1);
    }

    #[test]
    fn machine_id_is_32_hex() {
        let m = machine_id("abc");
        assert_eq!(m.len(), 32);
        assert!(m.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
