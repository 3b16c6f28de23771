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

/// How long a forwarded connection must stay open to count as accepted by the guest.
const TCP_SETTLE: Duration = Duration::from_millis(750);

/// Connects to a forwarded guest port. QEMU's user-mode networking accepts the host's connection
/// itself, before it knows whether the guest will: when nothing listens in the guest, the
/// connection is accepted and then closed at once. So a connection counts only if the guest
/// sends data or it stays open for [`TCP_SETTLE`] (services that wait for the client to speak).
fn tcp_probe(addr: std::net::SocketAddr, port: u16, timeout: Duration) -> Result<String, String> {
    use std::io::Read;
    let started = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("guest port {port}: {e}"))?;
    let settle = TCP_SETTLE.min(timeout.saturating_sub(started.elapsed())).max(Duration::from_millis(100));
    stream.set_read_timeout(Some(settle)).map_err(|e| format!("guest port {port}: {e}"))?;
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Err(format!("guest port {port}: the connection was closed at once (nothing listens in the guest)")),
        Ok(_) => Ok(format!("guest port {port} accepted a connection and spoke first")),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(format!("guest port {port} accepted a connection (open after {} ms)", settle.as_millis())),
        Err(e) => Err(format!("guest port {port}: {e}")),
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
            Ok(tcp_probe(addr, *port, check.timeout))
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

#[cfg(test)]
mod tcp_tests {
    use std::io::Write;
    use std::net::TcpListener;

    use super::*;

    /// A listener on 127.0.0.1 that treats each connection as `serve` says, like a guest behind
    /// QEMU's user-mode networking would (closed at once when nothing listens in the guest).
    fn server(serve: fn(std::net::TcpStream)) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                serve(stream);
            }
        });
        addr
    }

    #[test]
    fn a_connection_counts_only_if_the_guest_keeps_it_or_speaks() {
        let t = Duration::from_secs(5);
        let closed = server(drop);
        let e = tcp_probe(closed, 81, t).unwrap_err();
        assert!(e.contains("closed at once"), "{e}");
        let silent = server(|s| {
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        assert!(tcp_probe(silent, 80, t).unwrap().contains("open after"));
        let banner = server(|mut s| {
            let _ = s.write_all(b"SSH-2.0-OpenSSH\r\n");
            std::thread::sleep(Duration::from_secs(1));
        });
        assert!(tcp_probe(banner, 22, t).unwrap().contains("spoke first"));
        let nobody = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(tcp_probe(nobody, 9, t).is_err());
    }
}
