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

/// Captured output, cut to a limit, with the digest and length of everything the agent returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub text: String,
    pub bytes: u64,
    pub sha256: String,
    pub truncated: bool,
}

impl Output {
    pub fn capture(data: &[u8], limit: usize) -> Output {
        let kept = &data[..data.len().min(limit)];
        Output {
            text: String::from_utf8_lossy(kept).into_owned(),
            bytes: data.len() as u64,
            sha256: hex::encode(Sha256::digest(data)),
            truncated: data.len() > limit,
        }
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

pub struct Agent<'a> {
    channel: &'a dyn AgentChannel,
    cancel: CancellationToken,
}

/// How long one agent request may wait for its reply. Replies come in milliseconds on an idle host;
/// a 2-core host emulating several guests under TCG has been seen to take over 10 s.
const REPLY_TIMEOUT: Duration = Duration::from_secs(45);

/// guest-exec-status polling: fast at first (most commands finish in well under a second), then
/// backing off. The slack this adds to every command (exit to the poll that sees it) was measured
/// at up to 2-2.7 s per cell with a 200 ms cap (`cargo xtask bench`, docs/performance.md).
const POLL_START: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(80);

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
    pub fn set_time_now(&self) -> Result<(), AgentError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
        self.request("guest-set-time", Some(json!({ "time": now.as_nanos() as u64 })), REPLY_TIMEOUT).map(drop)
    }

    pub fn exec(&self, req: &ExecRequest) -> Result<ExecResult, AgentError> {
        let started = Instant::now();
        let args = json!({ "path": req.program, "arg": req.args, "capture-output": true });
        let ret = self.request("guest-exec", Some(args), REPLY_TIMEOUT)?;
        let pid = ret.get("pid").and_then(Value::as_i64).ok_or(AgentError::Malformed { command: "guest-exec", reason: "no numeric pid".into() })?;
        let mut poll = POLL_START;
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
                return Ok(ExecResult {
                    command: req.command_line(),
                    exit_code: status.get("exitcode").and_then(Value::as_i64),
                    signal: status.get("signal").and_then(Value::as_i64),
                    stdout: Output::capture(&decode("out-data")?, req.output_limit),
                    stderr: Output::capture(&decode("err-data")?, req.output_limit),
                    duration_ms: started.elapsed().as_millis() as u64,
                });
            }
            if started.elapsed() > req.deadline {
                // Best effort: the agent has no kill verb, so ask the guest to kill it.
                let kill = json!({ "path": "/bin/kill", "arg": ["-KILL", pid.to_string()] });
                let _ = self.request("guest-exec", Some(kill), Duration::from_secs(5));
                return Err(AgentError::Deadline { program: req.command_line(), deadline: req.deadline });
            }
            std::thread::sleep(poll);
            poll = (poll * 2).min(POLL_MAX);
        }
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
