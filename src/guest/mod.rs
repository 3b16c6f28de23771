//! The QEMU guest agent protocol: commands with deadlines and bounded output, file transfer with
//! digests. The guest is untrusted: every reply is validated and its output is treated as data.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// How one agent request reaches the guest. Implemented by libvirt domains and by test fakes.
pub trait AgentChannel: Send + Sync {
    /// Sends one JSON request and returns the raw JSON reply; `timeout` bounds the wait for it.
    fn call(&self, request: &str, timeout: Duration) -> Result<String, AgentError>;
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reach the guest agent: {0}")]
    Unreachable(String),
    #[error("get an answer from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error("understand the guest agent's reply to {command}: {reason}")]
    Malformed { command: &'static str, reason: String },
    #[error("run {command} in the guest: the agent says {message}")]
    Refused { command: &'static str, message: String },
    #[error("finish `{program}` in the guest within {deadline:?}")]
    Deadline { program: String, deadline: Duration },
    #[error("deliver {path}: the guest has sha256 {actual}, the host sent {expected}")]
    DigestMismatch { path: String, expected: String, actual: String },
    #[error("cancelled")]
    Cancelled,
}

impl AgentError {
    /// True when the failure says the guest or agent is gone, not that a command misbehaved.
    pub fn is_infrastructure(&self) -> bool {
        !matches!(self, AgentError::Deadline { .. } | AgentError::DigestMismatch { .. })
    }
}

/// Largest chunk for guest-file-write: bigger writes stall qemu-ga for a minute (LAB-NOTES).
const CHUNK: usize = 64 * 1024;
/// How much of a command's stdout and stderr a result keeps; the sha256 covers all of it.
pub const DEFAULT_OUTPUT_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub program: String,
    pub args: Vec<String>,
    pub deadline: Duration,
    pub output_limit: usize,
}

impl ExecRequest {
    pub fn new(program: &str, args: &[&str], deadline: Duration) -> Self {
        ExecRequest { program: program.into(), args: args.iter().map(|a| a.to_string()).collect(), deadline, output_limit: DEFAULT_OUTPUT_LIMIT }
    }

    pub fn command_line(&self) -> String {
        std::iter::once(self.program.as_str()).chain(self.args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
    }
}

/// Captured output, cut to a limit, with the digest and length of all of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    /// The first `limit` bytes.
    pub text: String,
    pub bytes: u64,
    pub sha256: String,
    pub truncated: bool,
    /// When truncated: the last bytes (up to `limit`, none of them in `text`); the bytes between
    /// `text` and `tail` are not kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<String>,
}

impl Output {
    pub fn capture(data: &[u8], limit: usize) -> Output {
        let tail = &data[data.len().saturating_sub(limit)..];
        Output::from_ends(&data[..data.len().min(limit)], tail, data.len() as u64, hex::encode(Sha256::digest(data)), limit)
    }

    /// From the first bytes (`head`) and the last ones (`tail`, up to `limit` each) of `bytes` bytes
    /// whose digest is `sha256`.
    fn from_ends(head: &[u8], tail: &[u8], bytes: u64, sha256: String, limit: usize) -> Output {
        let truncated = bytes > limit as u64;
        // Only the part of the tail that the head does not already hold.
        let fresh = (bytes.saturating_sub(limit as u64)).min(tail.len() as u64) as usize;
        let tail = (truncated && fresh > 0).then(|| String::from_utf8_lossy(&tail[tail.len() - fresh..]).into_owned());
        Output { text: String::from_utf8_lossy(&head[..head.len().min(limit)]).into_owned(), bytes, sha256, truncated, tail }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecResult {
    pub command: String,
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: Output,
    pub stderr: Output,
    pub duration_ms: u64,
}

impl ExecResult {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// What the agent reported about one command, before any bounding.
struct RawExec {
    exit_code: Option<i64>,
    signal: Option<i64>,
    out: Vec<u8>,
    err: Vec<u8>,
    duration_ms: u64,
}

/// `sh -c CAPTURE patchlab-capture PREFIX LIMIT PROGRAM ARGS...`: stdout and stderr of the
/// command go to FIFOs `PREFIX.out` and `PREFIX.err` (on /run, a tmpfs: a full disk does not stop
/// it); for each, `tee -p` feeds a reader keeping the first LIMIT bytes, one keeping the last LIMIT
/// bytes, `wc -c`, and `sha256sum`, and `PREFIX.<stream>.done` appears when all four have finished.
/// The readers hold neither the agent's pipes nor the command's. Then the command is `exec`ed, so
/// the agent sees its own exit status. Few processes: each costs tens of milliseconds under TCG.
pub(crate) const CAPTURE: &str = r#"set -eu
d=$1 n=$2
shift 2
mkfifo -m 600 "$d.out" "$d.out.h" "$d.out.t" "$d.out.c" "$d.err" "$d.err.h" "$d.err.t" "$d.err.c"
for s in out err; do
  (
    head -c "$n" < "$d.$s.h" > "$d.$s.head" &
    tail -c "$n" < "$d.$s.t" > "$d.$s.tail" &
    wc -c < "$d.$s.c" > "$d.$s.bytes" &
    tee -p "$d.$s.h" "$d.$s.t" "$d.$s.c" < "$d.$s" | sha256sum > "$d.$s.sha256"
    wait
    : > "$d.$s.done"
  ) < /dev/null > /dev/null 2>&1 &
done
exec "$@" > "$d.out" 2> "$d.err"
"#;

/// `sh -c COLLECT patchlab-collect PREFIX TENTHS`: waits up to TENTHS tenths of a second for both
/// streams' readers (exit 4 if they do not finish), prints `BYTES SHA256` for stdout and stderr,
/// then the kept head and tail of each, and removes the files. Exit 3: the capture was never set up.
pub(crate) const COLLECT: &str = r#"d=$1 i=0
[ -p "$d.out" ] || { echo "no capture at $d" >&2; exit 3; }
while [ ! -e "$d.out.done" ] || [ ! -e "$d.err.done" ]; do
  i=$((i+1))
  [ "$i" -le "$2" ] || { rm -f -- "$d".*; exit 4; }
  sleep 0.1
done
for s in out err; do
  read -r bytes < "$d.$s.bytes"
  read -r sha _ < "$d.$s.sha256"
  printf '%s %s\n' "$bytes" "$sha"
done
cat "$d.out.head" "$d.out.tail" "$d.err.head" "$d.err.tail"
rm -f -- "$d".*
"#;

/// A prefix for capture files that no other command of this process uses.
fn capture_dir() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("/run/patchlab-out.{}.{}.{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Parses what [`COLLECT`] printed: two `BYTES SHA256` lines, then head and tail of stdout and of
/// stderr, each `min(BYTES, limit)` long.
fn parse_collected(data: &[u8], limit: usize) -> Result<(Output, Output), String> {
    let mut rest = data;
    let mut header = |what: &str| -> Result<(u64, String), String> {
        let end = rest.iter().position(|&b| b == b'\n').ok_or(format!("no {what} line"))?;
        let line = std::str::from_utf8(&rest[..end]).map_err(|_| format!("{what} line is not text"))?;
        rest = &rest[end + 1..];
        let (bytes, sha256) = line.split_once(' ').ok_or(format!("{what} line {line:?} is not `BYTES SHA256`"))?;
        let bytes: u64 = bytes.parse().map_err(|_| format!("{what} byte count {bytes:?} is not a number"))?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{what} digest {sha256:?} is not a sha256"));
        }
        Ok((bytes, sha256.to_ascii_lowercase()))
    };
    let out = header("stdout")?;
    let err = header("stderr")?;
    let kept = |bytes: u64| bytes.min(limit as u64) as usize;
    let expected = 2 * kept(out.0) + 2 * kept(err.0);
    if rest.len() != expected {
        return Err(format!("{} bytes of kept output, expected {expected}", rest.len()));
    }
    let (out_head, rest) = rest.split_at(kept(out.0));
    let (out_tail, rest) = rest.split_at(kept(out.0));
    let (err_head, err_tail) = rest.split_at(kept(err.0));
    Ok((Output::from_ends(out_head, out_tail, out.0, out.1, limit), Output::from_ends(err_head, err_tail, err.0, err.1, limit)))
}

/// What [`COLLECT`] prints for a command whose stdout and stderr were `out` and `err` (for fakes).
pub(crate) fn collected_for(out: &[u8], err: &[u8], limit: usize) -> Vec<u8> {
    let mut text = Vec::new();
    for data in [out, err] {
        text.extend(format!("{} {}\n", data.len(), hex::encode(Sha256::digest(data))).into_bytes());
    }
    for data in [out, err] {
        text.extend_from_slice(&data[..data.len().min(limit)]);
        text.extend_from_slice(&data[data.len().saturating_sub(limit)..]);
    }
    text
}

pub struct Agent<'a> {
    channel: &'a dyn AgentChannel,
    cancel: CancellationToken,
}

/// How long one agent request may wait for its reply. Replies come in milliseconds on an idle host;
/// a 2-core host emulating several guests under TCG has been seen to take over 10 s.
const REPLY_TIMEOUT: Duration = Duration::from_secs(45);

/// guest-exec-status polling: every 15 ms for a command's first 300 ms (most of a cell's commands
/// finish within it), every 40 ms up to 3 s, then every 80 ms. The slack this adds to a command (its
/// exit to the poll that sees it) was about 1 s per cell when polls started at 10 ms and doubled up to
/// 80 ms (`cargo xtask bench`, docs/performance.md); a poll costs the guest a few milliseconds.
fn poll_interval(elapsed: Duration) -> Duration {
    match elapsed.as_millis() {
        0..300 => Duration::from_millis(15),
        300..3000 => Duration::from_millis(40),
        _ => Duration::from_millis(80),
    }
}

impl<'a> Agent<'a> {
    pub fn new(channel: &'a dyn AgentChannel, cancel: CancellationToken) -> Self {
        Agent { channel, cancel }
    }

    fn request(&self, command: &'static str, arguments: Option<Value>, timeout: Duration) -> Result<Value, AgentError> {
        if self.cancel.is_cancelled() {
            return Err(AgentError::Cancelled);
        }
        let request = match arguments {
            Some(args) => json!({ "execute": command, "arguments": args }),
            None => json!({ "execute": command }),
        };
        let reply = self.channel.call(&request.to_string(), timeout)?;
        let mut reply: Value = serde_json::from_str(&reply).map_err(|e| AgentError::Malformed { command, reason: e.to_string() })?;
        if let Some(err) = reply.get("error") {
            let message = err.get("desc").and_then(Value::as_str).unwrap_or("an unspecified error").to_string();
            return Err(AgentError::Refused { command, message });
        }
        reply.get_mut("return").map(Value::take).ok_or(AgentError::Malformed { command, reason: "no `return` member".into() })
    }

    pub fn ping(&self, timeout: Duration) -> Result<(), AgentError> {
        self.request("guest-ping", None, timeout).map(drop)
    }

    /// Pings until the agent answers or the deadline passes.
    pub fn wait_ready(&self, deadline: Duration) -> Result<Duration, AgentError> {
        let started = Instant::now();
        loop {
            let left = deadline.saturating_sub(started.elapsed());
            match self.ping(left.min(Duration::from_secs(5)).max(Duration::from_secs(1))) {
                Ok(()) => return Ok(started.elapsed()),
                Err(AgentError::Cancelled) => return Err(AgentError::Cancelled),
                Err(_) if started.elapsed() < deadline => std::thread::sleep(Duration::from_millis(200)),
                Err(AgentError::Timeout(_)) | Err(_) => return Err(AgentError::Timeout(deadline)),
            }
        }
    }

    /// Waits until systemd has finished booting (running or degraded) and every named service is active.
    pub fn wait_booted(&self, services: &[String], deadline: Duration) -> Result<(), AgentError> {
        let started = Instant::now();
        loop {
            // Right after a boot the agent may come and go while systemd settles: until the
            // deadline, an unreachable agent means "not yet".
            let state = match self.exec(&ExecRequest::new("/bin/systemctl", &["is-system-running"], Duration::from_secs(30))) {
                Ok(state) => state.stdout.text.trim().to_string(),
                Err(e @ (AgentError::Cancelled | AgentError::Malformed { .. })) => return Err(e),
                Err(e) if started.elapsed() > deadline => return Err(e),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            let mut inactive = Vec::new();
            if matches!(state.as_str(), "running" | "degraded") {
                for service in services {
                    if !self.exec(&ExecRequest::new("/bin/systemctl", &["is-active", service], Duration::from_secs(30)))?.success() {
                        inactive.push(service.clone());
                    }
                }
                if inactive.is_empty() {
                    return Ok(());
                }
            }
            if started.elapsed() > deadline {
                return Err(AgentError::Refused { command: "guest-exec", message: format!("the guest did not finish booting in {deadline:?}: system state {state:?}, services not active: {inactive:?}") });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The kernel's boot id: it changes exactly when the guest has rebooted.
    pub fn boot_id(&self) -> Result<String, AgentError> {
        Ok(String::from_utf8_lossy(&self.read_file("/proc/sys/kernel/random/boot_id", 64)?).trim().to_string())
    }

    /// Reboots the guest and waits until it is back (new boot id) and booted.
    pub fn reboot(&self, deadline: Duration) -> Result<Duration, AgentError> {
        let started = Instant::now();
        let before = self.boot_id()?;
        // --no-block: the agent's own process is stopped by the reboot, so do not wait for it. The
        // agent may even go before it reports the command's exit: that is the reboot under way.
        match self.run_ok("/bin/systemctl", &["--no-block", "reboot"], Duration::from_secs(30)) {
            Ok(_) | Err(AgentError::Unreachable(_) | AgentError::Timeout(_) | AgentError::Refused { command: "guest-exec-status", .. }) => {}
            Err(e) => return Err(e),
        }
        loop {
            if started.elapsed() > deadline {
                return Err(AgentError::Timeout(deadline));
            }
            std::thread::sleep(Duration::from_secs(1));
            if self.ping(Duration::from_secs(2)).is_err() {
                continue;
            }
            match self.boot_id() {
                Ok(now) if now != before => break,
                Err(AgentError::Cancelled) => return Err(AgentError::Cancelled),
                _ => continue,
            }
        }
        self.wait_booted(&[], deadline.saturating_sub(started.elapsed()))?;
        self.set_time_now()?;
        Ok(started.elapsed())
    }

    /// Names of the systemd units in the `failed` state.
    pub fn failed_units(&self) -> Result<Vec<String>, AgentError> {
        let out = self.run_ok("/bin/systemctl", &["list-units", "--state=failed", "--plain", "--no-legend", "--no-pager", "--full"], Duration::from_secs(60))?;
        let mut units: Vec<String> = out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
        units.sort();
        Ok(units)
    }

    /// Sets the guest clock to the host's: a restored guest wakes at the moment it was saved.
    ///
    /// With `date -s` in the guest rather than the agent's `guest-set-time`: that one also writes
    /// the hardware clock (`hwclock -w`), which under TCG took 0.5–1.6 s of every clone (measured
    /// from restore to ready, docs/performance.md), and a throwaway clone never reads its RTC again.
    /// Falls back to `guest-set-time` when the guest's `date` cannot set the clock.
    pub fn set_time_now(&self) -> Result<(), AgentError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
        let at = format!("@{}.{:09}", now.as_secs(), now.subsec_nanos());
        if self.exec(&ExecRequest::new("/bin/date", &["-u", "-s", &at], Duration::from_secs(30)))?.success() {
            return Ok(());
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
        self.request("guest-set-time", Some(json!({ "time": now.as_nanos() as u64 })), REPLY_TIMEOUT).map(drop)
    }

    pub fn exec(&self, req: &ExecRequest) -> Result<ExecResult, AgentError> {
        let raw = self.exec_raw(req, &req.program, &req.args)?;
        Ok(ExecResult {
            command: req.command_line(),
            exit_code: raw.exit_code,
            signal: raw.signal,
            stdout: Output::capture(&raw.out, req.output_limit),
            stderr: Output::capture(&raw.err, req.output_limit),
            duration_ms: raw.duration_ms,
        })
    }

    /// Runs `program args` (as `req`'s command) under `req`'s deadline and returns what the agent
    /// reported: exit status and the output it captured.
    fn exec_raw(&self, req: &ExecRequest, program: &str, args: &[String]) -> Result<RawExec, AgentError> {
        let started = Instant::now();
        let ret = self.request("guest-exec", Some(json!({ "path": program, "arg": args, "capture-output": true })), REPLY_TIMEOUT)?;
        let pid = ret.get("pid").and_then(Value::as_i64).ok_or(AgentError::Malformed { command: "guest-exec", reason: "no numeric pid".into() })?;
        loop {
            let status = self.request("guest-exec-status", Some(json!({ "pid": pid })), REPLY_TIMEOUT)?;
            let exited = status.get("exited").and_then(Value::as_bool).ok_or(AgentError::Malformed { command: "guest-exec-status", reason: "no boolean `exited`".into() })?;
            if exited {
                let decode = |key: &str| -> Result<Vec<u8>, AgentError> {
                    match status.get(key) {
                        None => Ok(Vec::new()),
                        Some(Value::String(s)) => B64.decode(s).map_err(|e| AgentError::Malformed { command: "guest-exec-status", reason: format!("{key} is not base64: {e}") }),
                        Some(_) => Err(AgentError::Malformed { command: "guest-exec-status", reason: format!("{key} is not a string") }),
                    }
                };
                return Ok(RawExec {
                    exit_code: status.get("exitcode").and_then(Value::as_i64),
                    signal: status.get("signal").and_then(Value::as_i64),
                    out: decode("out-data")?,
                    err: decode("err-data")?,
                    duration_ms: started.elapsed().as_millis() as u64,
                });
            }
            if started.elapsed() > req.deadline {
                // Best effort: the agent has no kill verb, so ask the guest to kill it.
                let kill = json!({ "path": "/bin/kill", "arg": ["-KILL", pid.to_string()] });
                let _ = self.request("guest-exec", Some(kill), Duration::from_secs(5));
                return Err(AgentError::Deadline { program: req.command_line(), deadline: req.deadline });
            }
            std::thread::sleep(poll_interval(started.elapsed()));
        }
    }

    /// Like [`Agent::exec`], for commands whose output may be of any size (a patch's install and
    /// remove commands): the agent captures at most 16 MiB and libvirt carries about 4 MiB per
    /// reply, so the output never goes through them. In the guest, stdout and stderr go to pipes
    /// whose readers keep the first and last `output_limit` bytes and count and hash all of it
    /// (`CAPTURE`, nothing written to the guest's disk); the command is `exec`ed, so its exit
    /// status and signal are its own. A second command (`COLLECT`) returns the kept ends, the
    /// counts and the digests, and removes the capture files.
    pub fn exec_bounded(&self, req: &ExecRequest) -> Result<ExecResult, AgentError> {
        let started = Instant::now();
        let dir = capture_dir();
        let limit = req.output_limit.to_string();
        let args: Vec<String> = ["-c", CAPTURE, "patchlab-capture", &dir, &limit, &req.program].into_iter().map(String::from).chain(req.args.iter().cloned()).collect();
        let ran = match self.exec_raw(req, "/bin/sh", &args) {
            Ok(ran) => ran,
            Err(e) => {
                // The command was killed at its deadline (or the agent broke): drop what it wrote.
                if matches!(e, AgentError::Deadline { .. }) {
                    let _ = self.exec(&ExecRequest::new("/bin/sh", &["-c", "rm -f -- \"$1\".*", "patchlab-clean", &dir], Duration::from_secs(30)));
                }
                return Err(e);
            }
        };
        // The command's own output went to the pipes: anything here comes from the capture itself.
        let setup: Vec<u8> = ran.out.iter().chain(&ran.err).copied().collect();
        // The readers finish right after the command (it could only write as fast as they read),
        // unless something the command left running holds its output open: that counts against
        // its deadline, as it does when the agent captures the output.
        let wait = req.deadline.saturating_sub(started.elapsed()).max(Duration::from_secs(10));
        let collect = ExecRequest::new("/bin/sh", &["-c", COLLECT, "patchlab-collect", &dir, &(wait.as_millis() / 100).to_string()], wait + Duration::from_secs(60));
        let collected = self.exec_raw(&collect, &collect.program, &collect.args)?;
        match collected.exit_code {
            Some(0) => {}
            Some(4) => return Err(AgentError::Deadline { program: req.command_line(), deadline: req.deadline }),
            _ => {
                let why = String::from_utf8_lossy(&collected.err);
                return Err(AgentError::Refused { command: "guest-exec", message: format!("capturing the output of `{}` failed: {} {}", req.command_line(), String::from_utf8_lossy(&setup).trim(), why.trim()) });
            }
        }
        let (stdout, stderr) = parse_collected(&collected.out, req.output_limit).map_err(|reason| AgentError::Malformed { command: "guest-exec", reason: format!("output capture: {reason}") })?;
        Ok(ExecResult { command: req.command_line(), exit_code: ran.exit_code, signal: ran.signal, stdout, stderr, duration_ms: started.elapsed().as_millis() as u64 })
    }

    /// Runs a command that must succeed and returns its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str], deadline: Duration) -> Result<String, AgentError> {
        let result = self.exec(&ExecRequest::new(program, args, deadline))?;
        if !result.success() {
            return Err(AgentError::Refused { command: "guest-exec", message: format!("`{}` exited with {:?}: {}", result.command, result.exit_code, result.stderr.text.trim()) });
        }
        Ok(result.stdout.text)
    }

    /// Writes `data` to `path` in the guest in 64 KiB chunks, then checks its sha256 inside the guest.
    /// Returns the digest.
    pub fn push_file(&self, data: &[u8], path: &str) -> Result<String, AgentError> {
        let expected = hex::encode(Sha256::digest(data));
        let handle = self.request("guest-file-open", Some(json!({ "path": path, "mode": "w" })), REPLY_TIMEOUT)?;
        let handle = handle.as_i64().ok_or(AgentError::Malformed { command: "guest-file-open", reason: "handle is not an integer".into() })?;
        let written = data.chunks(CHUNK).try_for_each(|chunk| {
            let ret = self.request("guest-file-write", Some(json!({ "handle": handle, "buf-b64": B64.encode(chunk) })), Duration::from_secs(30))?;
            match ret.get("count").and_then(Value::as_u64) {
                Some(n) if n as usize == chunk.len() => Ok(()),
                other => Err(AgentError::Malformed { command: "guest-file-write", reason: format!("wrote {other:?} of {} bytes", chunk.len()) }),
            }
        });
        let closed = self.request("guest-file-close", Some(json!({ "handle": handle })), REPLY_TIMEOUT);
        written?;
        closed?;
        let actual = self.sha256_of(path)?;
        if actual != expected {
            return Err(AgentError::DigestMismatch { path: path.into(), expected, actual });
        }
        Ok(actual)
    }

    /// The sha256 of a guest file, computed in the guest.
    pub fn sha256_of(&self, path: &str) -> Result<String, AgentError> {
        let out = self.run_ok("/usr/bin/sha256sum", &["--", path], Duration::from_secs(60))?;
        let digest = out.split_whitespace().next().unwrap_or_default();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AgentError::Malformed { command: "guest-exec", reason: format!("sha256sum printed {out:?}") });
        }
        Ok(digest.to_ascii_lowercase())
    }

    /// Reads a guest file, refusing files larger than `limit`.
    pub fn read_file(&self, path: &str, limit: usize) -> Result<Vec<u8>, AgentError> {
        let handle = self.request("guest-file-open", Some(json!({ "path": path, "mode": "r" })), REPLY_TIMEOUT)?;
        let handle = handle.as_i64().ok_or(AgentError::Malformed { command: "guest-file-open", reason: "handle is not an integer".into() })?;
        let mut data = Vec::new();
        let result = loop {
            let ret = match self.request("guest-file-read", Some(json!({ "handle": handle, "count": CHUNK })), Duration::from_secs(30)) {
                Ok(ret) => ret,
                Err(e) => break Err(e),
            };
            let chunk = match ret.get("buf-b64").and_then(Value::as_str).map(|s| B64.decode(s)) {
                Some(Ok(chunk)) => chunk,
                _ => break Err(AgentError::Malformed { command: "guest-file-read", reason: "buf-b64 missing or not base64".into() }),
            };
            data.extend_from_slice(&chunk);
            if data.len() > limit {
                break Err(AgentError::Malformed { command: "guest-file-read", reason: format!("{path} is larger than {limit} bytes") });
            }
            if ret.get("eof").and_then(Value::as_bool).unwrap_or(true) || chunk.is_empty() {
                break Ok(());
            }
        };
        let closed = self.request("guest-file-close", Some(json!({ "handle": handle })), REPLY_TIMEOUT);
        result?;
        closed?;
        Ok(data)
    }
}

pub mod fake;

#[cfg(test)]
mod bounded_tests {
    use super::*;
    use crate::guest::fake::FakeGuest;

    fn run(out: Vec<u8>, err: Vec<u8>, code: i64) -> ExecResult {
        let guest = FakeGuest::new(move |program, _| (program == "/bin/flood").then(|| (code, out.clone(), err.clone())));
        let result = Agent::new(&guest, CancellationToken::new()).exec_bounded(&ExecRequest::new("/bin/flood", &["--now"], Duration::from_secs(5))).unwrap();
        assert_eq!(guest.commands(), vec!["/bin/flood --now"], "only the command itself is logged");
        result
    }

    #[test]
    fn bounded_output_keeps_both_ends_and_digests_all_of_it() {
        let mut out = b"first line\n".to_vec();
        out.extend(std::iter::repeat_n(b'y', 3 * DEFAULT_OUTPUT_LIMIT));
        out.extend(b"last line\n");
        let r = run(out.clone(), b"warning\n".to_vec(), 7);
        assert_eq!((r.exit_code, r.command.as_str()), (Some(7), "/bin/flood --now"));
        assert_eq!(r.stdout.bytes, out.len() as u64);
        assert_eq!(r.stdout.sha256, hex::encode(Sha256::digest(&out)));
        assert!(r.stdout.truncated);
        assert!(r.stdout.text.starts_with("first line\n") && r.stdout.text.len() == DEFAULT_OUTPUT_LIMIT);
        let tail = r.stdout.tail.as_deref().unwrap();
        assert!(tail.ends_with("yyylast line\n") && tail.len() == DEFAULT_OUTPUT_LIMIT, "{}", tail.len());
        assert_eq!(r.stderr, Output::capture(b"warning\n", DEFAULT_OUTPUT_LIMIT));
        assert_eq!(r.stderr.tail, None);
    }

    #[test]
    fn the_tail_holds_only_what_the_head_does_not() {
        let out: Vec<u8> = (0..DEFAULT_OUTPUT_LIMIT + 10).map(|i| b'a' + (i % 26) as u8).collect();
        let r = run(out.clone(), vec![], 0);
        assert_eq!(r.stdout.tail.as_deref().unwrap().as_bytes(), &out[DEFAULT_OUTPUT_LIMIT..]);
        // Exactly at the limit: nothing is cut.
        let r = run(vec![b'x'; DEFAULT_OUTPUT_LIMIT], vec![], 0);
        assert!(!r.stdout.truncated && r.stdout.tail.is_none());
        assert_eq!(Output::capture(&out, DEFAULT_OUTPUT_LIMIT), run(out, vec![], 0).stdout, "same record as an agent capture");
    }

    #[test]
    fn malformed_collect_output_is_an_error() {
        let good = collected_for(b"abc", b"", 2);
        assert!(parse_collected(&good, 2).is_ok());
        for (what, bad) in [
            ("empty", Vec::new()),
            ("no digest", b"3\n0 e3b0\n".to_vec()),
            ("count not a number", b"x 0000000000000000000000000000000000000000000000000000000000000000\n".to_vec()),
            ("short", good[..good.len() - 1].to_vec()),
            ("long", [&good[..], b"more"].concat()),
        ] {
            assert!(parse_collected(&bad, 2).is_err(), "{what}");
        }
    }
}
