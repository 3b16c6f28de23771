//! The guest is hostile (issue 6): its agent replies are validated and a malformed one is an
//! error, never a panic; its output is bounded and digested; and a clone has no network path out,
//! only the forwarded ports the checks use.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use patchlab::guest::{Agent, AgentChannel, AgentError, ExecRequest};
use serde_json::{Value, json};

type Replier = Box<dyn Fn(&str, &Value) -> Result<String, AgentError> + Send + Sync>;

/// An agent channel that answers each command with whatever the test's closure returns.
struct Scripted {
    reply: Replier,
    calls: Mutex<Vec<String>>,
}

impl Scripted {
    fn new(reply: impl Fn(&str, &Value) -> Result<String, AgentError> + Send + Sync + 'static) -> Self {
        Scripted { reply: Box::new(reply), calls: Mutex::default() }
    }
}

impl AgentChannel for Scripted {
    fn call(&self, request: &str, _timeout: Duration) -> Result<String, AgentError> {
        let req: Value = serde_json::from_str(request).expect("the agent layer sends JSON");
        let command = req["execute"].as_str().unwrap_or_default().to_string();
        self.calls.lock().unwrap().push(command.clone());
        (self.reply)(&command, &req["arguments"])
    }
}

fn ok(v: Value) -> Result<String, AgentError> {
    Ok(json!({ "return": v }).to_string())
}

/// A guest whose `guest-exec` works and whose `guest-exec-status` answers `status`.
fn exec_status(status: impl Fn() -> Result<String, AgentError> + Send + Sync + 'static) -> Scripted {
    Scripted::new(move |cmd, _| match cmd {
        "guest-exec" => ok(json!({ "pid": 7 })),
        "guest-exec-status" => status(),
        _ => ok(json!({})),
    })
}

fn exec(channel: &Scripted) -> Result<patchlab::guest::ExecResult, AgentError> {
    Agent::new(channel, Default::default()).exec(&ExecRequest::new("/bin/true", &[], Duration::from_secs(2)))
}

fn assert_malformed<T: std::fmt::Debug>(what: &str, r: Result<T, AgentError>) {
    match r {
        Err(AgentError::Malformed { .. }) => {}
        other => panic!("{what}: expected a Malformed error, got {other:?}"),
    }
}

#[test]
fn malformed_agent_replies_are_errors_not_panics() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(&str, String)> = vec![
        ("not JSON", "}{ definitely not json".into()),
        ("empty", String::new()),
        ("binary", String::from_utf8_lossy(&[0xff, 0x00, 0xfe, 0x7b]).into_owned()),
        ("no return member", json!({ "retrun": {} }).to_string()),
        ("a bare array", "[1,2,3]".into()),
        ("nested 100000 deep", deep.clone()),
        ("status is a string", json!({ "return": "exited" }).to_string()),
        ("exited not a boolean", json!({ "return": { "exited": "yes" } }).to_string()),
        ("out-data not base64", json!({ "return": { "exited": true, "exitcode": 0, "out-data": "!!!not base64!!!" } }).to_string()),
        ("out-data a number", json!({ "return": { "exited": true, "exitcode": 0, "out-data": 12 } }).to_string()),
        ("err-data an object", json!({ "return": { "exited": true, "exitcode": 0, "err-data": { "a": 1 } } }).to_string()),
    ];
    for (what, reply) in cases {
        let channel = exec_status(move || Ok(reply.clone()));
        assert_malformed(what, exec(&channel));
    }
    // The pid of guest-exec must be a number.
    for pid in [json!("7"), json!(null), json!(1.5), json!([7])] {
        let channel = Scripted::new(move |cmd, _| if cmd == "guest-exec" { ok(json!({ "pid": pid.clone() })) } else { ok(json!({})) });
        assert_malformed("pid", exec(&channel));
    }
    // An `error` member of any shape is a refusal, not a crash.
    for error in [json!("boom"), json!(42), json!({ "desc": 5 }), json!({ "class": "GenericError", "desc": "no" })] {
        let channel = Scripted::new(move |_, _| Ok(json!({ "error": error.clone() }).to_string()));
        match Agent::new(&channel, Default::default()).ping(Duration::from_secs(1)) {
            Err(AgentError::Refused { .. }) => {}
            other => panic!("error member: {other:?}"),
        }
    }
    // Deep nesting in a ping reply too: serde_json's recursion limit, not a stack overflow.
    let channel = Scripted::new(move |_, _| Ok(deep.clone()));
    assert_malformed("deep ping", Agent::new(&channel, Default::default()).ping(Duration::from_secs(1)));
}

#[test]
fn malformed_file_transfer_replies_are_errors() {
    let agent_with = |f: fn(&str, &Value) -> Result<String, AgentError>| Scripted::new(f);
    // guest-file-open returns a handle that is not an integer.
    let c = agent_with(|cmd, _| if cmd == "guest-file-open" { ok(json!("3")) } else { ok(json!({})) });
    assert_malformed("handle", Agent::new(&c, Default::default()).read_file("/etc/hostname", 1024));
    assert_malformed("handle", Agent::new(&c, Default::default()).push_file(b"x", "/tmp/x"));
    // guest-file-read: bad base64, a missing buffer, wrong types.
    for ret in [json!({ "buf-b64": "%%%", "eof": true }), json!({ "count": 3, "eof": true }), json!({ "buf-b64": 17 }), json!("abc")] {
        let c = Scripted::new(move |cmd, _| match cmd {
            "guest-file-open" => ok(json!(3)),
            "guest-file-read" => ok(ret.clone()),
            _ => ok(json!({})),
        });
        assert_malformed("file read", Agent::new(&c, Default::default()).read_file("/etc/hostname", 1024));
        assert!(c.calls.lock().unwrap().iter().any(|x| x == "guest-file-close"), "the handle is closed after a bad read");
    }
    // A guest that never says eof and keeps sending data: refused at the size limit.
    let chunk = base64::engine::general_purpose::STANDARD.encode(vec![b'A'; 65536]);
    let c = Scripted::new(move |cmd, _| match cmd {
        "guest-file-open" => ok(json!(3)),
        "guest-file-read" => ok(json!({ "count": 65536, "buf-b64": chunk.clone(), "eof": false })),
        _ => ok(json!({})),
    });
    assert_malformed("endless file", Agent::new(&c, Default::default()).read_file("/dev/zero", 1 << 20));
    // guest-file-write claims to have written something else than it was given.
    for count in [json!(0), json!(-1), json!("65536"), json!(u64::MAX)] {
        let c = Scripted::new(move |cmd, _| match cmd {
            "guest-file-open" => ok(json!(3)),
            "guest-file-write" => ok(json!({ "count": count.clone(), "eof": false })),
            _ => ok(json!({})),
        });
        assert_malformed("write count", Agent::new(&c, Default::default()).push_file(&[1u8; 1000], "/tmp/x"));
    }
    // sha256sum prints something that is not a digest.
    for out in ["", "zzzz  /tmp/x\n", "<script>alert(1)</script>\n"] {
        let data = base64::engine::general_purpose::STANDARD.encode(out);
        let c = exec_status(move || ok(json!({ "exited": true, "exitcode": 0, "out-data": data.clone() })));
        assert_malformed("sha256sum", Agent::new(&c, Default::default()).sha256_of("/tmp/x"));
    }
}

#[test]
fn huge_output_is_bounded_and_digested() {
    // 24 MiB of output (more than qemu-ga ever captures): kept to 64 KiB, digest and length of all.
    let data = vec![b'y'; 24 << 20];
    let want = patchlab::guest::Output::capture(&data, 0).sha256;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&data);
    let c = exec_status(move || ok(json!({ "exited": true, "exitcode": 0, "out-data": encoded.clone(), "out-truncated": true })));
    let result = exec(&c).expect("a big but well-formed reply is fine");
    assert_eq!(result.stdout.bytes, 24 << 20);
    assert_eq!(result.stdout.sha256, want);
    assert!(result.stdout.truncated);
    assert_eq!(result.stdout.text.len(), patchlab::guest::DEFAULT_OUTPUT_LIMIT);
}

#[test]
fn a_command_that_never_exits_meets_its_deadline_and_is_killed() {
    let c = exec_status(|| ok(json!({ "exited": false })));
    let t = Instant::now();
    let r = Agent::new(&c, Default::default()).exec(&ExecRequest::new("/bin/sleep", &["infinity"], Duration::from_millis(500)));
    assert!(matches!(r, Err(AgentError::Deadline { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(c.calls.lock().unwrap().iter().filter(|x| *x == "guest-exec").count(), 2, "the second guest-exec is the kill");
}

#[test]
fn an_agent_that_stops_answering_meets_a_deadline() {
    let c = Scripted::new(|_, _| Err(AgentError::Timeout(Duration::from_secs(1))));
    let t = Instant::now();
    let r = Agent::new(&c, Default::default()).wait_ready(Duration::from_secs(2));
    assert!(matches!(r, Err(AgentError::Timeout(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
    // A command whose status the agent stops answering is an infrastructure error.
    let c = Scripted::new(|cmd, _| if cmd == "guest-exec" { ok(json!({ "pid": 1 })) } else { Err(AgentError::Timeout(Duration::from_secs(10))) });
    let e = exec(&c).unwrap_err();
    assert!(e.is_infrastructure(), "{e:?}");
}

/// From inside a real clone: no TCP connection to the host (its loopback through the gateway,
/// its own address) or anywhere else succeeds, while the forwarded port still works inward.
#[test]
fn a_clone_cannot_connect_out() {
    let Some(host) = common::host() else { return };
    let run_id = patchlab::hypervisor::runlock::new_run_id();
    let _lock = patchlab::hypervisor::runlock::RunLock::acquire(&host.dirs, &run_id).unwrap();
    let golden = common::golden(&host, "debian-12", "images/debian-12.toml", &run_id);
    let leaks = common::LeakCheck::new(&host, &run_id, &[&golden]);
    let t = Instant::now();
    // Listeners on every host address: any connection that gets out is seen here too.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let mut clone = host.restore_clone(&golden, &run_id, &format!("patchlab-{run_id}-net"), &[80]).expect("restore clone");
    {
        use patchlab::hypervisor::Machine;
        let agent = Agent::new(clone.agent_channel(), Default::default());
        agent.wait_ready(Duration::from_secs(60)).unwrap();
        // The guest's default gateway (user-mode networking's view of the host).
        let routes = String::from_utf8(agent.read_file("/proc/net/route", 1 << 16).unwrap()).unwrap();
        // With `restrict=on` user networking offers no default route at all; try its host alias too.
        let gateway = routes
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[1] == "00000000")
            .map(|f| std::net::Ipv4Addr::from(u32::from_str_radix(f[2], 16).unwrap().swap_bytes()).to_string())
            .unwrap_or_else(|| "10.0.2.2".into());
        let host_addrs: Vec<String> = String::from_utf8(std::process::Command::new("hostname").arg("-I").output().unwrap().stdout).unwrap().split_whitespace().filter(|a| !a.contains(':')).map(String::from).collect();
        let mut targets: Vec<(String, String)> = vec![(gateway.clone(), port.clone()), (gateway, "22".into()), ("127.0.0.1".into(), port.clone())];
        targets.extend(host_addrs.iter().map(|a| (a.clone(), port.clone())));
        // "Anywhere else": a documentation address, never a real one.
        targets.push(("198.51.100.7".into(), "80".into()));
        let mut reached = Vec::new();
        for (addr, p) in &targets {
            // nc stays connected until its deadline when the connection was made.
            match agent.exec(&ExecRequest::new("/bin/busybox", &["nc", "-w", "3", addr, p], Duration::from_secs(10))) {
                Ok(r) if !r.success() => eprintln!("guest -> {addr}:{p}: refused ({})", r.stderr.text.trim()),
                Ok(_) | Err(AgentError::Deadline { .. }) => reached.push(format!("{addr}:{p}")),
                Err(e) => panic!("{e}"),
            }
        }
        let accepted = listener.accept().is_ok();
        assert!(reached.is_empty() && !accepted, "the clone reached {reached:?} (host listener saw a connection: {accepted})");
        // Inward, through the forwarded port, the clone still answers.
        assert_eq!(common::http_status(clone.forwarded(80).unwrap()), 200);
    }
    use patchlab::hypervisor::Machine;
    clone.teardown().unwrap();
    eprintln!("network drill: {:?}", t.elapsed());
    leaks.assert_clean();
}
