//! Smoke checks: does the platform still do what it did? HTTP and TCP go from the host through
//! the clone's forwarded port, commands run in the guest. Each has a timeout and bounded retries.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::guest::{Agent, AgentError, ExecRequest};
use crate::lab::{Check, CheckKind};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    /// Attempts made; more than one means a retry was needed.
    pub attempts: u32,
    pub detail: String,
    pub duration_ms: u64,
}

/// Where checks reach the machine from.
pub struct Target<'a> {
    pub agent: &'a Agent<'a>,
    /// Where a forwarded guest port is reached from this process.
    pub forwarded: &'a dyn Fn(u16) -> Option<std::net::SocketAddr>,
    pub runtime: &'a tokio::runtime::Handle,
}

const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Runs a check with its retries. An `Err` means the agent itself failed, not the check.
pub fn run(check: &Check, target: &Target<'_>) -> Result<CheckResult, AgentError> {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = attempt(check, target)?;
        if outcome.is_ok() || attempts > check.retries {
            let (passed, detail) = match outcome {
                Ok(detail) => (true, detail),
                Err(detail) => (false, detail),
            };
            return Ok(CheckResult { name: check.name.clone(), passed, attempts, detail, duration_ms: started.elapsed().as_millis() as u64 });
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

fn attempt(check: &Check, target: &Target<'_>) -> Result<Result<String, String>, AgentError> {
    match &check.kind {
        CheckKind::Http { port, path, status, body_contains } => {
            let Some(addr) = (target.forwarded)(*port) else { return Ok(Err(format!("guest port {port} is not forwarded"))) };
            let url = format!("http://{addr}{path}");
            Ok(target.runtime.block_on(http(&url, check.timeout, *status, body_contains.as_deref())))
        }
        CheckKind::Tcp { port } => {
            let Some(addr) = (target.forwarded)(*port) else { return Ok(Err(format!("guest port {port} is not forwarded"))) };
            Ok(match std::net::TcpStream::connect_timeout(&addr, check.timeout) {
                Ok(_) => Ok(format!("guest port {port} accepted a connection")),
                Err(e) => Err(format!("guest port {port}: {e}")),
            })
        }
        CheckKind::Command { argv, exit_code, stdout_contains } => {
            let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
            let result = match target.agent.exec(&ExecRequest::new(&argv[0], &args, check.timeout)) {
                Ok(result) => result,
                Err(AgentError::Deadline { .. }) => return Ok(Err(format!("`{}` did not finish within {:?}", argv.join(" "), check.timeout))),
                Err(e) => return Err(e),
            };
            if result.exit_code != Some(*exit_code) {
                return Ok(Err(format!("`{}` exited with {:?}, expected {exit_code}: {}", result.command, result.exit_code, result.stderr.text.trim())));
            }
            if let Some(want) = stdout_contains {
                if !result.stdout.text.contains(want.as_str()) {
                    return Ok(Err(format!("`{}` printed no {want:?}", result.command)));
                }
            }
            Ok(Ok(format!("`{}` exited with {exit_code}", result.command)))
        }
    }
}

async fn http(url: &str, timeout: Duration, want_status: u16, body_contains: Option<&str>) -> Result<String, String> {
    let client = reqwest::Client::builder().no_proxy().timeout(timeout).build().map_err(|e| e.to_string())?;
    let response = client.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status().as_u16();
    if status != want_status {
        return Err(format!("GET {url}: status {status}, expected {want_status}"));
    }
    if let Some(want) = body_contains {
        let body = response.text().await.map_err(|e| format!("GET {url}: reading body: {e}"))?;
        if !body.contains(want) {
            return Err(format!("GET {url}: body does not contain {want:?}"));
        }
    }
    Ok(format!("GET {url}: status {status}"))
}
