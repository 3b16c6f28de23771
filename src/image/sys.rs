//! Small system helpers for the image builder: running external commands (never through a
//! shell), chroot mounts with a guard, mount-aware recursive removal, hashing.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::ImageError;

/// PATH given to every command the builder runs (host and chroot).
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Effective uid of this process (owner of `/proc/self`), without libc.
pub fn euid() -> u32 {
    fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

fn tail(bytes: &[u8], max_lines: usize, max_chars: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(max_lines);
    let mut s = lines[start..].join("\n");
    if s.len() > max_chars {
        let cut = s.len() - max_chars;
        let cut = (cut..s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(s.len());
        s = format!("...{}", &s[cut..]);
    }
    s
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with a clean, fixed environment, stdin closed, stdout and stderr
/// captured. On failure the error carries the command line and the tail of stderr (or of stdout
/// when stderr is empty: debootstrap and apt write some errors there). Returns stdout.
pub fn run(step: &str, cmd: &mut Command) -> Result<String, ImageError> {
    cmd.env_clear()
        .env("PATH", SAFE_PATH)
        .env("LC_ALL", "C.UTF-8")
        .env("LANG", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("DEBCONF_NONINTERACTIVE_SEEN", "true")
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = describe(cmd);
    tracing::debug!(step, command = %command, "running");
    let out = cmd.output().map_err(|source| ImageError::Spawn {
        step: step.to_string(),
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !out.status.success() {
        let mut stderr_tail = tail(&out.stderr, 15, 3000);
        if stderr_tail.is_empty() {
            stderr_tail = tail(&out.stdout, 15, 3000);
        } else {
            let so = tail(&out.stdout, 5, 800);
            if !so.is_empty() {
                stderr_tail = format!("{stderr_tail}\n(stdout tail:)\n{so}");
            }
        }
        if stderr_tail.is_empty() {
            stderr_tail = "(no output)".into();
        }
        return Err(ImageError::Command {
            step: step.to_string(),
            command,
            status: out.status.to_string(),
            stderr_tail,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `chroot ROOT PROGRAM ARGS...` as a Command.
pub fn chroot(root: &Path, program: &str, args: &[&str]) -> Command {
    let mut c = Command::new("chroot");
    c.arg(root).arg(program).args(args);
    c
}

/// Mount points (decoded) currently in this mount namespace.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut v: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn umount(path: &Path) -> bool {
    let ok = |args: &[&str]| {
        Command::new("umount")
            .args(args)
            .arg(path)
            .env_clear()
            .env("PATH", SAFE_PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    ok(&[]) || ok(&["--lazy"])
}

/// Mounts proc, sys, dev and dev/pts into a chroot; unmounts them (in reverse order) on
/// [`ChrootMounts::unmount`] or on drop, so they are also released on every error path.
pub struct ChrootMounts {
    mounted: Vec<PathBuf>,
}

impl ChrootMounts {
    pub fn mount(root: &Path) -> Result<ChrootMounts, ImageError> {
        let mut g = ChrootMounts {
            mounted: Vec::new(),
        };
        let specs: [(&str, &[&str]); 4] = [
            ("proc", &["-t", "proc", "proc"]),
            ("sys", &["-t", "sysfs", "sysfs"]),
            ("dev", &["--bind", "/dev"]),
            (
                "dev/pts",
                &["-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts"],
            ),
        ];
        for (sub, args) in specs {
            let target = root.join(sub);
            fs::create_dir_all(&target)
                .map_err(|e| ImageError::io("create mount point", &target, e))?;
            let mut c = Command::new("mount");
            c.args(args).arg(&target);
            run(&format!("mount {sub} into the chroot"), &mut c)?;
            g.mounted.push(target);
        }
        Ok(g)
    }

    /// Unmounts everything; reports the first failure (after trying all).
    pub fn unmount(mut self) -> Result<(), ImageError> {
        self.release()
    }

    fn release(&mut self) -> Result<(), ImageError> {
        let mut failed = None;
        while let Some(m) = self.mounted.pop() {
            // Anything a package mounted below ours (binfmt_misc, ...) goes first.
            for inner in mounts_under(&m) {
                if inner != m {
                    umount(&inner);
                }
            }
            if !umount(&m) && failed.is_none() {
                failed = Some(m);
            }
        }
        match failed {
            None => Ok(()),
            Some(m) => Err(ImageError::io(
                "unmount",
                &m,
                std::io::Error::other("umount and umount --lazy both failed"),
            )),
        }
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!("failed to {e}");
        }
    }
}

/// Removes a directory tree, but first unmounts anything mounted below it and refuses to remove
/// it if a mount remains: a recursive delete through a bind mount of /dev would wipe the host.
pub fn remove_tree(dir: &Path) -> Result<(), ImageError> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    for m in mounts_under(dir) {
        umount(&m);
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(ImageError::io(
            "remove",
            dir,
            std::io::Error::other(format!(
                "refusing to delete: still mounted below it: {}",
                left.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        ));
    }
    fs::remove_dir_all(dir).map_err(|e| ImageError::io("remove", dir, e))
}

/// Removes a directory tree on drop unless disarmed (build temp dirs).
pub struct TreeGuard {
    dir: Option<PathBuf>,
}

impl TreeGuard {
    pub fn new(dir: PathBuf) -> TreeGuard {
        TreeGuard { dir: Some(dir) }
    }
    pub fn disarm(mut self) {
        self.dir = None;
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take().filter(|d| fs::symlink_metadata(d).is_ok()) {
            tracing::info!(dir = %d.display(), "removing temporary build directory");
            if let Err(e) = remove_tree(&d) {
                tracing::error!("failed to {e}");
            }
        }
    }
}

pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = fs::File::open(path).map_err(|e| ImageError::io("open", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| ImageError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

pub fn create_dir_all_mode(dir: &Path, mode: u32) -> Result<(), ImageError> {
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(|e| ImageError::io("create directory", dir, e))?;
        set_mode(dir, mode)?;
    }
    Ok(())
}

pub fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io(format!("chmod {mode:o}"), path, e))
}

/// Writes a file (creating parent directories) and sets its mode.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), ImageError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| ImageError::io("create directory", parent, e))?;
    }
    // Replace, never write through, an existing symlink (e.g. /etc/resolv.conf).
    if fs::symlink_metadata(path)
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false)
    {
        fs::remove_file(path).map_err(|e| ImageError::io("remove symlink", path, e))?;
    }
    fs::write(path, contents).map_err(|e| ImageError::io("write", path, e))?;
    set_mode(path, mode)
}

pub fn fsync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        let t = tail(b"a\nb\n\nc\nd\n", 2, 100);
        assert_eq!(t, "c\nd");
    }

    #[test]
    fn run_reports_stderr_tail() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo boom >&2; exit 3"]);
        let e = run("test step", &mut c).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("test step"), "{s}");
        assert!(s.contains("boom"), "{s}");
        assert!(s.contains("exit status: 3"), "{s}");
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn remove_tree_removes_plain_dirs() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("x/y");
        fs::create_dir_all(&t).unwrap();
        fs::write(t.join("f"), "1").unwrap();
        remove_tree(&d.path().join("x")).unwrap();
        assert!(!d.path().join("x").exists());
    }
}
