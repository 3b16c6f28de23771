//! A parent that reaps libvirtd's orphans at once, for machines whose PID 1 is not systemd.
//!
//! libvirtd starts each QEMU as a daemon, so an exited QEMU stays a zombie until whoever adopts
//! orphans reaps it, and `virDomainDestroy` waits for that: libvirt polls the pid every 200 ms
//! until it is gone, and a zombie still counts. Under systemd that is PID 1 and immediate. On a
//! machine whose PID 1 reaps late it is most of a clone's teardown: here PID 1 reaped orphans
//! 1.2–1.8 s after they died, while QEMU itself exits 15 ms after libvirt's SIGTERM
//! (docs/performance.md). So without systemd xtask starts libvirtd in the foreground under this
//! reaper: a child subreaper (`PR_SET_CHILD_SUBREAPER`) in its own session, which adopts what
//! libvirtd leaves behind (QEMU), reaps it as soon as it exits, and exits with libvirtd.
//!
//! No dependencies (xtask has none): the three libc calls are declared here.

use std::process::{Command, Stdio};

/// The hidden xtask command that runs the reaper: `xtask __reap PROGRAM ARGS...`.
pub const COMMAND: &str = "__reap";

const PR_SET_CHILD_SUBREAPER: i32 = 36;

unsafe extern "C" {
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    fn setsid() -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
}

/// Starts `program args` under a reaper (this executable, detached) and returns at once.
pub fn spawn(program: &str, args: &[&str]) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("find the xtask executable: {e}"))?;
    Command::new(exe)
        .arg(COMMAND)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("start {program} under a reaper: {e}"))
}

/// The reaper itself: runs `argv` and reaps every child it has or adopts until `argv` exits.
pub fn run(argv: &[String]) -> u8 {
    let Some((program, args)) = argv.split_first() else { return 2 };
    // SAFETY: plain system calls on this process, with no pointers.
    unsafe {
        setsid();
        if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            return 3;
        }
    }
    let Ok(child) = Command::new(program).args(args).spawn() else { return 3 };
    let child = child.id() as i32;
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid, writable int.
        let pid = unsafe { waitpid(-1, &mut status, 0) };
        if pid == child {
            return 0;
        }
        if pid < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return 0;
        }
    }
}

/// Whether the process `pid` runs under a reaper started by [`spawn`].
pub fn is_reaped(pid: u32) -> bool {
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(") ").and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_string)));
    parent.and_then(|ppid| std::fs::read(format!("/proc/{ppid}/cmdline")).ok()).is_some_and(|cmdline| cmdline.split(|&b| b == 0).nth(1) == Some(COMMAND.as_bytes()))
}
